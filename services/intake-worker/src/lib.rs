//! intake-worker: validates one ingestion batch per task.
//!
//! For an `intake` task it reads the signed ingestion batch from this facilitator's store,
//! decrypts each report's input share, runs Prio3 `verify_init` (nonce = report id), and writes
//! two objects: the signed validation batch (one verifier share or an explicit *invalid* entry per
//! report) to its own store **and** to the peer's store, and its private verify states to its own
//! store for the aggregate step. Everything written is deterministic and create-only, so the same
//! task delivered twice changes nothing.
//!
//! A batch that cannot be read at all (truncated, tampered, wrongly signed), or whose signed time
//! is not in the partition it is stored under (a batch copied into another hour or window), is logged
//! with the object's key, counted, and answered with an empty validation batch, so both
//! facilitators agree to exclude it and its window is not held up.
//!
//! Every report carries its time, bound into the HPKE associated data of both of its input
//! shares. A report counts only in the window its time falls in: one whose time is outside the
//! batch's window is invalid as `outside-window`, one stamped later than its batch by more than
//! the clock skew (or not rounded to the time precision) as `bad-time`. Both facilitators apply
//! the same checks to the same signed times, so both mark the same reports. A report id repeated
//! in another batch of the same window is caught when the window is aggregated (`replayed`).
//!
//! Each share names the HPKE key it is sealed to, and is opened with that key: a facilitator
//! keeps several (see `millrace_protocol::parties`). A share naming a key this facilitator does
//! not have is `unknown-key`; one sealed to a key that had expired at the batch's signed time is
//! `expired-key` (deterministic: a rerun of the same batch decides the same).

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use millrace_protocol::agreement::{mismatch, AggregationDigest};
use millrace_protocol::config::HpkeKeySlot;
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::crypto::{HpkePrivateKey, KeyRing, Signer25519, VerifyKey};
use millrace_protocol::formats::{
    input_share_aad, input_share_info, IngestionBatch, InvalidCounts, InvalidReason,
    ValidationBatch, Verdict, VerifyStates,
};
use millrace_protocol::layout::{ingestion_key, states_key, validation_key, Partition};
use millrace_protocol::tasks::{IntakeTask, TaskMessage};
use millrace_runtime::{lag, propagation, zeroed, Handler, Task, TaskError};
use millrace_store::Store;

/// What one intake-worker needs.
pub struct IntakeWorker {
    config: Arc<Config>,
    facilitator: u8,
    own: Store,
    peer: Store,
    signer: Signer25519,
    /// Every HPKE key of this facilitator, by id, with its validity.
    hpke: Arc<Vec<HpkeKeySlot>>,
    ingestors: KeyRing,
    verify_keys: Vec<(String, VerifyKey, AggregationDigest)>,
}

/// Outcome of validating one batch, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntakeOutcome {
    pub reports: usize,
    pub invalid: usize,
    /// `invalid` by reason.
    pub invalid_reasons: InvalidCounts,
    pub batch_rejected: bool,
    /// Why the batch was rejected, when it was.
    pub rejected_because: Option<String>,
    /// The batch's signed time (when the ingestor wrote it), once its signature verified.
    pub batch_time: Option<i64>,
}

impl IntakeWorker {
    /// Loads this facilitator's keys from `config`.
    pub fn new(
        config: Arc<Config>,
        facilitator: u8,
        own: Store,
        peer: Store,
    ) -> anyhow::Result<Self> {
        for a in &config.aggregations {
            zeroed::counter("millrace_batches_rejected_total", &[("aggregation", &a.id)]);
        }
        let signer = config.facilitator_signer(facilitator)?;
        let hpke = Arc::new(config.hpke_private_keys(facilitator)?);
        let ingestors = config.ingestor_keys()?;
        let mut verify_keys = Vec::new();
        for a in &config.aggregations {
            verify_keys.push((
                a.id.clone(),
                config.verify_key(a)?,
                config.aggregation_digest(a)?,
            ));
        }
        Ok(IntakeWorker {
            config,
            facilitator,
            own,
            peer,
            signer,
            hpke,
            ingestors,
            verify_keys,
        })
    }

    /// Validates the batch named by `task`.
    pub async fn validate(&self, task: &IntakeTask) -> Result<IntakeOutcome, TaskError> {
        let agg = self.config.aggregation(&task.aggregation).ok_or_else(|| {
            TaskError::Permanent(format!(
                "aggregation {:?} is not in this facilitator's config",
                task.aggregation
            ))
        })?;
        let (verify_key, digest) = self
            .verify_keys
            .iter()
            .find(|(id, _, _)| id == &agg.id)
            .map(|(_, k, d)| (k.clone(), *d))
            .ok_or_else(|| TaskError::Permanent(format!("no verify key for {}", agg.id)))?;
        if task.aggregation_digest != digest.to_string() {
            let theirs = AggregationDigest::parse(&task.aggregation_digest)
                .unwrap_or(AggregationDigest([0; 32]));
            return Err(TaskError::Permanent(mismatch(
                &agg.id,
                "the intake task",
                &theirs,
                &digest,
            )));
        }
        let partition =
            Partition::parse(&task.partition).map_err(|e| TaskError::Permanent(e.to_string()))?;
        let f = self.facilitator;
        let own_validation = validation_key(&agg.id, partition, &task.batch, f);
        let states = states_key(&agg.id, partition, &task.batch);

        // A rerun after a crash: if our own objects are there, only make sure the peer has its copy.
        if self.own.exists(&states).await.map_err(TaskError::from)? {
            if let Some(v) = self
                .own
                .get(&own_validation)
                .await
                .map_err(TaskError::from)?
            {
                self.peer
                    .create(&own_validation, v)
                    .await
                    .map_err(TaskError::from)?;
                tracing::info!(batch = %task.batch, "already validated; peer copy ensured");
                return Ok(IntakeOutcome::default());
            }
        }

        let key = ingestion_key(&agg.id, partition, &task.batch);
        let bytes = self
            .own
            .get(&key)
            .await
            .map_err(TaskError::from)?
            .ok_or_else(|| TaskError::Permanent(format!("{key}: ingestion batch not found")))?;

        let (validation, verify_states, outcome) = {
            let this = WorkerRef {
                agg: agg.clone(),
                facilitator: f,
                hpke: self.hpke.clone(),
                ingestors: self.ingestors.clone(),
                verify_key,
                digest,
            };
            let task = task.clone();
            let key = key.clone();
            tokio::task::spawn_blocking(move || this.validate_bytes(&task, partition, &key, &bytes))
                .await
                .map_err(|e| TaskError::Transient(format!("validation task failed: {e}")))?
        };

        let validation_bytes = validation
            .encode(&self.signer)
            .map_err(|e| TaskError::Permanent(e.to_string()))?;
        let states_bytes = verify_states
            .encode(&self.signer)
            .map_err(|e| TaskError::Permanent(e.to_string()))?;
        // Own objects first (states before the validation the workflow-manager looks for), then
        // the peer's copy.
        self.own
            .create(&states, states_bytes)
            .await
            .map_err(TaskError::from)?;
        self.own
            .create(&own_validation, validation_bytes.clone())
            .await
            .map_err(TaskError::from)?;
        self.peer
            .create(&own_validation, validation_bytes)
            .await
            .map_err(TaskError::from)?;
        metrics::counter!("millrace_reports_validated_total", "aggregation" => agg.id.clone())
            .increment(outcome.reports as u64);
        if let Some(written) = outcome.batch_time {
            lag::record(lag::BATCH_VALIDATION, &agg.id, written);
        }
        for (reason, n) in outcome.invalid_reasons.by_label() {
            metrics::counter!("millrace_reports_invalid_total", "aggregation" => agg.id.clone(), "reason" => reason)
                .increment(n);
        }
        tracing::info!(
            aggregation = %agg.id,
            batch = %task.batch,
            reports = outcome.reports,
            invalid = outcome.invalid,
            "batch validated"
        );
        Ok(outcome)
    }
}

/// The CPU-bound part, moved to a blocking thread.
struct WorkerRef {
    agg: Aggregation,
    facilitator: u8,
    /// Every HPKE key of this facilitator, by id, with its validity.
    hpke: Arc<Vec<HpkeKeySlot>>,
    ingestors: KeyRing,
    verify_key: VerifyKey,
    /// The aggregation's digest as this facilitator runs it.
    digest: AggregationDigest,
}

impl WorkerRef {
    /// The private key a share sealed to HPKE key `id` opens with, in a batch signed at
    /// `batch_time`.
    fn key_for(&self, id: u8, batch_time: i64) -> Result<&HpkePrivateKey, InvalidReason> {
        let slot = self
            .hpke
            .iter()
            .find(|k| k.id == id)
            .ok_or(InvalidReason::UnknownKey)?;
        if slot.validity.expired_at(batch_time) {
            return Err(InvalidReason::ExpiredKey);
        }
        Ok(&slot.key)
    }

    fn validate_bytes(
        &self,
        task: &IntakeTask,
        partition: Partition,
        key: &str,
        bytes: &[u8],
    ) -> (ValidationBatch, VerifyStates, IntakeOutcome) {
        let f = self.facilitator;
        let empty = |reason: String| {
            tracing::error!(object = %key, error = %reason, "ingestion batch rejected; excluded on both sides");
            metrics::counter!("millrace_batches_rejected_total", "aggregation" => self.agg.id.clone())
                .increment(1);
            (
                ValidationBatch {
                    aggregation: task.aggregation.clone(),
                    aggregation_digest: self.digest.0,
                    batch_id: task.batch.clone(),
                    facilitator: f,
                    entries: Vec::new(),
                },
                VerifyStates {
                    aggregation: task.aggregation.clone(),
                    batch_id: task.batch.clone(),
                    facilitator: f,
                    states: Vec::new(),
                },
                IntakeOutcome {
                    batch_rejected: true,
                    rejected_because: Some(reason),
                    ..Default::default()
                },
            )
        };
        let (batch, signer) = match IngestionBatch::decode(&self.ingestors, bytes) {
            Ok(x) => x,
            Err(e) => return empty(e.in_object(key).to_string()),
        };
        if !self.agg.ingestors.contains(&signer) {
            return empty(format!(
                "signed by {signer:?}, which may not submit to aggregation {}",
                self.agg.id
            ));
        }
        if batch.aggregation != task.aggregation || batch.batch_id != task.batch {
            return empty(format!(
                "batch says it is {}/{}, but is stored as {}/{}",
                batch.aggregation, batch.batch_id, task.aggregation, task.batch
            ));
        }
        if batch.aggregation_digest != self.digest.0 {
            return empty(mismatch(
                &self.agg.id,
                &format!("ingestion batch {} (signed by {signer})", batch.batch_id),
                &AggregationDigest(batch.aggregation_digest),
                &self.digest,
            ));
        }
        if batch.facilitator != f {
            return empty(format!(
                "batch is addressed to facilitator {}, not {f}",
                batch.facilitator
            ));
        }
        if self.agg.partition_of(batch.time) != partition {
            return empty(format!(
                "the batch's signed time {} is not in the partition {} it is stored under (a \
                 batch counts only in the partition it was signed for)",
                millrace_protocol::layout::Window::rfc3339(batch.time),
                partition.path()
            ));
        }
        let info = input_share_info(&batch.aggregation, f);
        let mut seen = HashSet::with_capacity(batch.reports.len());
        let mut entries = Vec::with_capacity(batch.reports.len());
        let mut states = Vec::with_capacity(batch.reports.len());
        let mut invalid = InvalidCounts::default();
        for r in &batch.reports {
            let verdict = if !seen.insert(r.report_id) {
                Err(InvalidReason::Duplicate)
            } else if let Err(reason) = self.agg.check_report_time(r.time, batch.time) {
                Err(reason)
            } else {
                let aad = input_share_aad(&r.report_id, r.time, &r.public_share);
                let opened = self.key_for(r.hpke_key_id, batch.time).and_then(|key| {
                    key.open(&info, &aad, &r.encapped_key, &r.ciphertext)
                        .map_err(|_| InvalidReason::Undecryptable)
                });
                match opened {
                    Err(reason) => Err(reason),
                    Ok(input_share) => self
                        .agg
                        .vdaf
                        .prepare(
                            &self.verify_key,
                            usize::from(f),
                            &r.report_id,
                            &r.public_share,
                            &input_share,
                        )
                        .map_err(|_| InvalidReason::Unverifiable),
                }
            };
            match verdict {
                Ok(prepared) => {
                    entries.push((r.report_id, Verdict::Valid(prepared.verifier_share)));
                    states.push(Some(prepared.state));
                }
                Err(reason) => {
                    invalid.add(reason);
                    entries.push((r.report_id, Verdict::Invalid(reason)));
                    states.push(None);
                }
            }
        }
        let outcome = IntakeOutcome {
            reports: batch.reports.len(),
            invalid: invalid.total() as usize,
            invalid_reasons: invalid,
            batch_rejected: false,
            rejected_because: None,
            batch_time: Some(batch.time),
        };
        (
            ValidationBatch {
                aggregation: batch.aggregation.clone(),
                aggregation_digest: self.digest.0,
                batch_id: batch.batch_id.clone(),
                facilitator: f,
                entries,
            },
            VerifyStates {
                aggregation: batch.aggregation,
                batch_id: batch.batch_id,
                facilitator: f,
                states,
            },
            outcome,
        )
    }
}

#[async_trait]
impl Handler for IntakeWorker {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        let intake = IntakeTask::from_json(&task.body)
            .map_err(|e| TaskError::Permanent(format!("message {}: {e}", task.message_id)))?;
        propagation::record_subject(&intake.aggregation, None, Some(&intake.batch));
        self.validate(&intake).await.map(|_| ())
    }
}
