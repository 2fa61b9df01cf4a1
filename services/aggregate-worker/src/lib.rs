//! aggregate-worker: turns one generation of a window's manifest into this facilitator's sum part.
//!
//! Which batches make up a window is not the worker's decision, nor the task's: the leader
//! (facilitator 0) writes it down once, in a signed, create-only window manifest
//! (`manifests/{agg}/{window}/{generation}.manifest`) in both facilitators' stores. An `aggregate`
//! task only names the window and the manifest's generation. The worker reads that manifest from
//! its own store and checks that it is there, that it verifies with the facilitators' key ring,
//! that the leader signed it, and that it is about the task's aggregation, window and generation.
//! A task naming no manifest (forged or mistaken) is refused by name and never aggregated.
//!
//! It then aggregates exactly the manifest's batches, streaming: one batch at a time it loads its
//! own verify states and both facilitators' validation batches, folds the batch into the running
//! aggregate on a blocking thread, and drops it before loading the next. Memory holds the
//! accumulator, the set of report ids seen and the ids included (for the digest), never the
//! window's batches. The fold combines the two verifier shares of each report
//! (`verifier_shares_to_message`, `verify_next`) and accumulates the output share. A report is
//! included only if both sides marked it valid and verification finishes. The report ids are
//! walked in a fixed order (batches in manifest order, ids sorted within a batch), and an id seen
//! before is dropped and counted invalid, so both facilitators include exactly the same reports.
//!
//! A missing input is transient: the peer's validation batch may still be on its way. An input
//! that cannot be read (undecodable, wrongly signed, about another batch) is permanent: the
//! manifest lists a batch this facilitator cannot read. The signed sum part carries the
//! manifest's generation and digest, plus the counts, the digest of the included ids and the
//! aggregate share. It goes create-only to `sums/{agg}/{window}/{generation}.sum.{i}` in the
//! collector's store, and a `sum-part-ready` message naming the generation goes to the collect
//! topic. A redelivered task finds its part already written, checks it, and announces it again.
//!
//! **The threshold is this facilitator's to enforce.** A window with fewer valid reports than the
//! aggregation's `min_reports` gets no sum part: the worker writes a signed [`ShareRefusal`] (no
//! aggregate share) to `sums/{agg}/{window}/{generation}.refused.{i}`, records the computation as
//! REFUSED in its own store, and announces it like a part. The collector never holds a share of
//! an under-threshold window, whatever its own mill would decide.
//!
//! Every report left out is counted by reason: what intake decided (`undecryptable`,
//! `unverifiable`, `duplicate`, `outside-window`, `bad-time`; facilitator 0's reason first when
//! both marked it), `replayed` for an id already met in an earlier batch of the window, and
//! `verify-failed` when the combined proof does not verify.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use millrace_bus::{Bus, Message};
use millrace_protocol::agreement::{mismatch, AggregationDigest};
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::crypto::{KeyRing, Signer25519};
use millrace_protocol::formats::{
    report_digest, InvalidCounts, InvalidReason, ShareRefusal, SumPart, ValidationBatch, Verdict,
    VerifyStates, WindowBatch, WindowManifest,
};
use millrace_protocol::layout::{
    computation_key, manifest_key, share_refusal_key, states_key, sum_part_key, validation_key,
    Window,
};
use millrace_protocol::results::{Computation, ComputationState, COMPUTATION_VERSION};
use millrace_protocol::tasks::{
    topics, AggregateTask, SumPartReady, TaskMessage, SUM_PART_READY_VERSION,
};
use millrace_protocol::vdaf::{Accumulator, Prio3Vdaf, ReportId};
use millrace_runtime::{lag, propagation, zeroed, Handler, Task, TaskError};
use millrace_store::Store;

pub struct AggregateWorker {
    config: Arc<Config>,
    facilitator: u8,
    own: Store,
    collector: Store,
    bus: Arc<dyn Bus>,
    topic_prefix: String,
    signer: Signer25519,
    /// Verifies our own private verify states.
    own_keys: KeyRing,
    facilitator_keys: KeyRing,
    /// Each aggregation's digest as this facilitator runs it.
    digests: BTreeMap<String, AggregationDigest>,
}

/// One batch's inputs to the fold step.
struct BatchInputs {
    states: VerifyStates,
    validations: [ValidationBatch; 2],
}

/// The running aggregate of a window, carried from batch to batch (and moved onto the blocking
/// thread and back for each).
struct Fold {
    acc: Accumulator,
    /// Every report id met so far, included or not: a later one with the same id is dropped.
    seen: HashSet<ReportId>,
    /// The ids included, for the report-id digest.
    included: Vec<ReportId>,
    invalid: InvalidCounts,
}

/// What this facilitator released for a window: its sum part, or its refusal to release one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Released {
    Part(SumPart),
    Refused(ShareRefusal),
}

impl Released {
    /// The sum part, if one was released.
    pub fn part(&self) -> Option<&SumPart> {
        match self {
            Released::Part(p) => Some(p),
            Released::Refused(_) => None,
        }
    }
    /// Valid reports the window had, released or not.
    pub fn report_count(&self) -> u64 {
        match self {
            Released::Part(p) => p.report_count,
            Released::Refused(r) => r.report_count,
        }
    }
}

impl AggregateWorker {
    pub fn new(
        config: Arc<Config>,
        facilitator: u8,
        own: Store,
        collector: Store,
        bus: Arc<dyn Bus>,
        topic_prefix: &str,
    ) -> anyhow::Result<Self> {
        let signer = config.facilitator_signer(facilitator)?;
        let facilitator_keys = config.facilitator_keys()?;
        // Every signing key this facilitator has had: states signed before a rotation stay
        // readable.
        let own_keys = facilitator_keys.only(config.facilitator_name(facilitator)?);
        for a in &config.aggregations {
            zeroed::counter(
                "millrace_windows_refused_total",
                &[
                    ("aggregation", &a.id),
                    ("by", config.facilitator_name(facilitator)?),
                ],
            );
        }
        let mut digests = BTreeMap::new();
        for a in &config.aggregations {
            digests.insert(a.id.clone(), config.aggregation_digest(a)?);
        }
        Ok(AggregateWorker {
            config,
            facilitator,
            own,
            collector,
            bus,
            topic_prefix: topic_prefix.to_string(),
            own_keys,
            digests,
            signer,
            facilitator_keys,
        })
    }

    /// The aggregation's digest as this facilitator runs it.
    fn digest(&self, aggregation: &str) -> Result<AggregationDigest, TaskError> {
        self.digests.get(aggregation).copied().ok_or_else(|| {
            TaskError::Permanent(format!("aggregation {aggregation:?} is not configured"))
        })
    }

    /// Refuses a peer's artefact whose aggregation digest is not ours.
    fn same_aggregation(
        &self,
        aggregation: &str,
        what: &str,
        theirs: [u8; 32],
    ) -> Result<(), TaskError> {
        let ours = self.digest(aggregation)?;
        if theirs != ours.0 {
            return Err(TaskError::Permanent(mismatch(
                aggregation,
                what,
                &AggregationDigest(theirs),
                &ours,
            )));
        }
        Ok(())
    }

    fn facilitator_name(&self, index: u8) -> Result<&str, TaskError> {
        self.config
            .facilitator_name(index)
            .map_err(|e| TaskError::Permanent(e.to_string()))
    }

    /// Reads and checks the manifest the task names: present in our own store, signed by the
    /// leader, and about the task's aggregation, window and generation.
    async fn load_manifest(
        &self,
        task: &AggregateTask,
        window: Window,
    ) -> Result<(WindowManifest, String), TaskError> {
        let key = manifest_key(&task.aggregation, window, task.generation);
        let bytes = self
            .own
            .get(&key)
            .await
            .map_err(TaskError::from)?
            .ok_or_else(|| {
                TaskError::Permanent(format!(
                    "{key}: not found: the task for {}/{} generation {} names no window \
                     manifest; refusing to aggregate it",
                    task.aggregation, task.window, task.generation
                ))
            })?;
        let leader = self.facilitator_name(0)?;
        let manifest = WindowManifest::decode_leaders(
            &self.facilitator_keys,
            leader,
            &task.aggregation,
            window,
            task.generation,
            &bytes,
        )
        .map_err(|e| {
            TaskError::Permanent(format!(
                "{}; refusing to aggregate {}/{} generation {}",
                e.in_object(&key),
                task.aggregation,
                task.window,
                task.generation
            ))
        })?;
        // One task covers the window's batches: its span links to each batch's trace.
        for b in &manifest.batches {
            propagation::link(propagation::batch_context(&task.aggregation, &b.batch));
        }
        Ok((manifest, key))
    }

    /// A permanent error for a listed batch this facilitator cannot read.
    fn unreadable(manifest_key: &str, b: &WindowBatch, why: impl std::fmt::Display) -> TaskError {
        TaskError::Permanent(format!(
            "window manifest {manifest_key} lists a batch it cannot read: batch {} (partition \
             {}): {why}",
            b.batch,
            b.partition.path()
        ))
    }

    /// One input of a batch the manifest lists, from our own store. Missing is transient: a
    /// peer's copy may still be on its way.
    async fn input(
        &self,
        key: &str,
        what: &str,
        manifest_key: &str,
    ) -> Result<millrace_bus::Bytes, TaskError> {
        self.own
            .get(key)
            .await
            .map_err(TaskError::from)?
            .ok_or_else(|| {
                TaskError::Transient(format!(
                "{key}: {what} not here yet (the batch is listed by window manifest {manifest_key})"
            ))
            })
    }

    async fn load_validation(
        &self,
        agg: &str,
        b: &WindowBatch,
        by: u8,
        manifest_key: &str,
    ) -> Result<ValidationBatch, TaskError> {
        let key = validation_key(agg, b.partition, &b.batch, by);
        let bytes = self
            .input(
                &key,
                &format!("validation by facilitator {by}"),
                manifest_key,
            )
            .await?;
        let (v, signer) = ValidationBatch::decode(&self.facilitator_keys, &bytes)
            .map_err(|e| Self::unreadable(manifest_key, b, e.in_object(&key)))?;
        self.same_aggregation(
            agg,
            &format!(
                "{key} (facilitator {by}'s validation, listed by window manifest {manifest_key})"
            ),
            v.aggregation_digest,
        )?;
        let expected = self.facilitator_name(by)?;
        if signer != expected
            || v.facilitator != by
            || v.batch_id != b.batch
            || v.aggregation != agg
        {
            return Err(Self::unreadable(
                manifest_key,
                b,
                format!(
                    "{key}: signed by {signer:?} for {}/{} facilitator {}, expected {expected:?} \
                     for {agg}/{} facilitator {by}",
                    v.aggregation, v.batch_id, v.facilitator, b.batch
                ),
            ));
        }
        Ok(v)
    }

    async fn load_states(
        &self,
        agg: &str,
        b: &WindowBatch,
        manifest_key: &str,
    ) -> Result<VerifyStates, TaskError> {
        let key = states_key(agg, b.partition, &b.batch);
        let bytes = self.input(&key, "verify states", manifest_key).await?;
        let states = VerifyStates::decode(&self.own_keys, &bytes)
            .map_err(|e| Self::unreadable(manifest_key, b, e.in_object(&key)))?;
        if states.aggregation != agg
            || states.batch_id != b.batch
            || states.facilitator != self.facilitator
        {
            return Err(Self::unreadable(
                manifest_key,
                b,
                format!(
                    "{key}: verify states of {}/{} facilitator {}, expected {agg}/{} facilitator \
                     {}",
                    states.aggregation,
                    states.batch_id,
                    states.facilitator,
                    b.batch,
                    self.facilitator
                ),
            ));
        }
        Ok(states)
    }

    /// Decodes and checks a sum part already in the collector's store (a redelivered task).
    fn check_existing(
        &self,
        part_key: &str,
        bytes: &[u8],
        manifest: &WindowManifest,
    ) -> Result<SumPart, TaskError> {
        let (part, signer) = SumPart::decode(&self.facilitator_keys, bytes)
            .map_err(|e| TaskError::Permanent(e.in_object(part_key).to_string()))?;
        let me = self.facilitator_name(self.facilitator)?;
        if signer != me
            || part.facilitator != self.facilitator
            || part.aggregation != manifest.aggregation
            || part.window_start != manifest.window_start
            || part.window_end != manifest.window_end
            || part.generation != manifest.generation
            || part.manifest_digest != manifest.digest()
            || part.aggregation_digest != Some(manifest.aggregation_digest)
        {
            return Err(TaskError::Permanent(format!(
                "{part_key}: the sum part already there (signed by {signer:?}, facilitator {}, \
                 generation {}) does not belong to this facilitator's aggregation of the \
                 window manifest",
                part.facilitator, part.generation
            )));
        }
        Ok(part)
    }

    /// Decodes and checks a refusal already in the collector's store (a redelivered task).
    fn check_existing_refusal(
        &self,
        key: &str,
        bytes: &[u8],
        manifest: &WindowManifest,
    ) -> Result<ShareRefusal, TaskError> {
        let (refusal, signer) = ShareRefusal::decode(&self.facilitator_keys, bytes)
            .map_err(|e| TaskError::Permanent(e.in_object(key).to_string()))?;
        let me = self.facilitator_name(self.facilitator)?;
        if signer != me
            || refusal.facilitator != self.facilitator
            || refusal.aggregation != manifest.aggregation
            || refusal.window_start != manifest.window_start
            || refusal.generation != manifest.generation
            || refusal.manifest_digest != manifest.digest()
            || refusal.aggregation_digest != manifest.aggregation_digest
        {
            return Err(TaskError::Permanent(format!(
                "{key}: the refusal already there (signed by {signer:?}, facilitator {}, \
                 generation {}) does not belong to this facilitator's aggregation of the window \
                 manifest",
                refusal.facilitator, refusal.generation
            )));
        }
        Ok(refusal)
    }

    /// Withholds the share of an under-threshold window: writes the refusal where the part would
    /// have gone and records REFUSED in this facilitator's own store.
    async fn refuse(
        &self,
        agg: &Aggregation,
        window: Window,
        part: SumPart,
        key: &str,
    ) -> Result<ShareRefusal, TaskError> {
        let me = self.facilitator_name(self.facilitator)?.to_string();
        let reason = format!(
            "{me} (facilitator {}) withholds its aggregate share of {}/{} generation {}: {} valid \
             reports, its policy requires at least {}",
            self.facilitator,
            agg.id,
            window.name(),
            part.generation,
            part.report_count,
            agg.min_reports
        );
        let refusal = ShareRefusal {
            aggregation: part.aggregation,
            window_start: part.window_start,
            window_end: part.window_end,
            generation: part.generation,
            manifest_digest: part.manifest_digest,
            aggregation_digest: part.aggregation_digest.unwrap_or_default(),
            facilitator: part.facilitator,
            report_count: part.report_count,
            invalid_count: part.invalid_count,
            invalid_reasons: part.invalid_reasons,
            min_reports: agg.min_reports,
            reason: reason.clone(),
        };
        let bytes = refusal
            .encode(&self.signer)
            .map_err(|e| TaskError::Permanent(e.in_object(key).to_string()))?;
        self.collector
            .create(key, bytes)
            .await
            .map_err(TaskError::from)?;
        let record = Computation {
            version: COMPUTATION_VERSION,
            aggregation: agg.id.clone(),
            window: window.name(),
            state: ComputationState::Refused,
            generation: refusal.generation,
            updated_at: chrono::Utc::now().timestamp(),
            since: None,
            detail: Some(reason),
        };
        self.own
            .overwrite(&computation_key(&agg.id, window), record.to_json())
            .await
            .map_err(TaskError::from)?;
        metrics::counter!("millrace_windows_refused_total", "aggregation" => agg.id.clone(), "by" => me)
            .increment(1);
        tracing::warn!(
            aggregation = %agg.id,
            window = %window.name(),
            generation = refusal.generation,
            reports = refusal.report_count,
            min_reports = agg.min_reports,
            "below the minimum report count: aggregate share withheld, refusal written"
        );
        Ok(refusal)
    }

    pub async fn aggregate(&self, task: &AggregateTask) -> Result<Released, TaskError> {
        let agg = self
            .config
            .aggregation(&task.aggregation)
            .ok_or_else(|| {
                TaskError::Permanent(format!(
                    "aggregation {:?} is not configured",
                    task.aggregation
                ))
            })?
            .clone();
        let window =
            Window::parse(&task.window).map_err(|e| TaskError::Permanent(e.to_string()))?;
        let ours = self.digest(&agg.id)?;
        if task.aggregation_digest != ours.to_string() {
            return Err(TaskError::Permanent(mismatch(
                &agg.id,
                "the aggregate task",
                &AggregationDigest::parse(&task.aggregation_digest)
                    .unwrap_or(AggregationDigest([0; 32])),
                &ours,
            )));
        }
        let (manifest, mkey) = self.load_manifest(task, window).await?;
        self.same_aggregation(
            &agg.id,
            &format!("the leader's window manifest {mkey}"),
            manifest.aggregation_digest,
        )?;
        let part_key = sum_part_key(&agg.id, window, manifest.generation, self.facilitator);
        let refusal_key = share_refusal_key(&agg.id, window, manifest.generation, self.facilitator);

        let existing_refusal = self
            .collector
            .get(&refusal_key)
            .await
            .map_err(TaskError::from)?;
        let existing_part = match existing_refusal {
            Some(_) => None,
            None => self
                .collector
                .get(&part_key)
                .await
                .map_err(TaskError::from)?,
        };
        let released = match (existing_refusal, existing_part) {
            // Already done (a redelivery): announce it again, the mill is idempotent.
            (Some(bytes), _) => {
                Released::Refused(self.check_existing_refusal(&refusal_key, &bytes, &manifest)?)
            }
            (None, Some(bytes)) => {
                Released::Part(self.check_existing(&part_key, &bytes, &manifest)?)
            }
            (None, None) => {
                let part = self.fold_manifest(&agg, window, &manifest, &mkey).await?;
                if part.report_count < agg.min_reports {
                    Released::Refused(self.refuse(&agg, window, part, &refusal_key).await?)
                } else {
                    let bytes = part
                        .encode(&self.signer)
                        .map_err(|e| TaskError::Permanent(e.in_object(&part_key).to_string()))?;
                    self.collector
                        .create(&part_key, bytes)
                        .await
                        .map_err(TaskError::from)?;
                    tracing::info!(
                        aggregation = %agg.id,
                        window = %task.window,
                        generation = manifest.generation,
                        batches = part.batches.len(),
                        reports = part.report_count,
                        invalid = part.invalid_count,
                        "sum part written"
                    );
                    lag::record(lag::WINDOW_SUM_PART, &agg.id, window.end);
                    Released::Part(part)
                }
            }
        };
        let ready = SumPartReady {
            version: SUM_PART_READY_VERSION,
            aggregation: agg.id.clone(),
            aggregation_digest: ours.to_string(),
            window: task.window.clone(),
            generation: manifest.generation,
            facilitator: self.facilitator,
        };
        propagation::publish(
            self.bus.as_ref(),
            &topics::collect(&self.topic_prefix),
            Message::new(ready.to_json()),
            None,
        )
        .await
        .map_err(|e| TaskError::Transient(e.to_string()))?;
        Ok(released)
    }

    /// Aggregates the manifest's batches one at a time into this facilitator's sum part.
    async fn fold_manifest(
        &self,
        agg: &Aggregation,
        window: Window,
        manifest: &WindowManifest,
        mkey: &str,
    ) -> Result<SumPart, TaskError> {
        let vdaf = Arc::new(agg.vdaf.clone());
        let own = usize::from(self.facilitator);
        let mut fold = Fold {
            acc: vdaf.accumulator(),
            seen: HashSet::new(),
            included: Vec::new(),
            invalid: InvalidCounts::default(),
        };
        // `WindowManifest::decode` checked that the batches are sorted and unique: that order is
        // the fixed order both facilitators walk.
        for b in &manifest.batches {
            let states = self.load_states(&agg.id, b, mkey).await?;
            let v0 = self.load_validation(&agg.id, b, 0, mkey).await?;
            let v1 = self.load_validation(&agg.id, b, 1, mkey).await?;
            let inputs = BatchInputs {
                states,
                validations: [v0, v1],
            };
            let vdaf = vdaf.clone();
            fold = tokio::task::spawn_blocking(move || {
                fold_batch(&vdaf, own, &mut fold, &inputs);
                // `inputs` is dropped here, on the blocking thread, before the next batch loads.
                fold
            })
            .await
            .map_err(|e| {
                TaskError::Transient(format!(
                    "the fold step over batch {} of {mkey} failed: {e}",
                    b.batch
                ))
            })?;
        }
        let Fold {
            mut acc,
            seen,
            mut included,
            invalid,
        } = fold;
        drop(seen);
        // Differential privacy: this facilitator noises its own aggregate share, once, before it
        // leaves for the collector. A redelivered task finds the part already written and never
        // gets here, so no second draw of the same window's share is ever released.
        if let Some(dp) = &agg.dp {
            vdaf.add_noise(dp, &mut acc, included.len() as u64)
                .map_err(|e| TaskError::Permanent(format!("{mkey}: {e}")))?;
            tracing::info!(
                aggregation = %agg.id,
                window = %window.name(),
                generation = manifest.generation,
                dp = %dp,
                noise_bound = dp.noise_bound(),
                "differential privacy noise added to the aggregate share"
            );
        }
        let aggregate_share = vdaf
            .encode_accumulator(&acc)
            .map_err(|e| TaskError::Permanent(format!("{mkey}: {e}")))?;
        Ok(SumPart {
            aggregation: agg.id.clone(),
            window_start: window.start,
            window_end: window.end,
            generation: manifest.generation,
            manifest_digest: manifest.digest(),
            aggregation_digest: Some(manifest.aggregation_digest),
            facilitator: self.facilitator,
            report_count: included.len() as u64,
            invalid_count: invalid.total(),
            invalid_reasons: invalid,
            report_digest: report_digest(&mut included),
            batches: manifest.batches.iter().map(|b| b.batch.clone()).collect(),
            aggregate_share,
        })
    }
}

/// The CPU-bound fold of one batch into the window's running aggregate.
fn fold_batch(vdaf: &Prio3Vdaf, own: usize, fold: &mut Fold, batch: &BatchInputs) {
    // Per report id: its verdicts from facilitator 0 and 1 and our own verify state. Ids that
    // repeat inside one side's batch were marked duplicate by intake; only the first entry of an
    // id per side counts here.
    let mut by_id: BTreeMap<ReportId, [Option<&Verdict>; 2]> = BTreeMap::new();
    let mut own_state: BTreeMap<ReportId, Option<&Vec<u8>>> = BTreeMap::new();
    let mut repeats = [0u64; 2];
    for (side, v) in batch.validations.iter().enumerate() {
        for (i, (id, verdict)) in v.entries.iter().enumerate() {
            let slot = by_id.entry(*id).or_insert([None, None]);
            if slot[side].is_some() {
                repeats[side] += 1;
            } else {
                slot[side] = Some(verdict);
                if side == own {
                    own_state
                        .entry(*id)
                        .or_insert(batch.states.states.get(i).and_then(|s| s.as_ref()));
                }
            }
        }
    }
    // A report id repeated inside a batch is one excluded report per repeat; both sides see both
    // validation batches, so both count the same.
    fold.invalid
        .add_n(InvalidReason::Duplicate, repeats[0].max(repeats[1]));
    for (id, verdicts) in by_id {
        if !fold.seen.insert(id) {
            fold.invalid.add(InvalidReason::Replayed);
            continue;
        }
        let (s0, s1) = match (verdicts[0], verdicts[1]) {
            (Some(Verdict::Valid(s0)), Some(Verdict::Valid(s1))) => (s0, s1),
            // Facilitator 0's reason first, so that both sides count the same reason.
            (Some(Verdict::Invalid(reason)), _) | (_, Some(Verdict::Invalid(reason))) => {
                fold.invalid.add(*reason);
                continue;
            }
            // Listed by one side only: the two copies of the batch differ.
            _ => {
                fold.invalid.add(InvalidReason::Unverifiable);
                continue;
            }
        };
        let Some(Some(state)) = own_state.get(&id) else {
            fold.invalid.add(InvalidReason::Unverifiable);
            continue;
        };
        match vdaf.verify_and_accumulate(own, state, [s0.as_slice(), s1.as_slice()], &mut fold.acc)
        {
            Ok(()) => fold.included.push(id),
            Err(_) => fold.invalid.add(InvalidReason::VerifyFailed),
        }
    }
}

#[async_trait]
impl Handler for AggregateWorker {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        let t = AggregateTask::from_json(&task.body)
            .map_err(|e| TaskError::Permanent(format!("message {}: {e}", task.message_id)))?;
        propagation::record_subject(&t.aggregation, Some(&t.window), None);
        self.aggregate(&t).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use millrace_bus::memory::MemoryBus;
    use millrace_bus::SubscribeOptions;
    use millrace_protocol::formats::InvalidReason;
    use millrace_protocol::layout::Partition;
    use millrace_protocol::tasks::AGGREGATE_TASK_VERSION;

    use super::*;

    const T0: i64 = 1_795_000_000;

    struct Fixture {
        worker: AggregateWorker,
        own: Store,
        collector: Store,
        bus: Arc<MemoryBus>,
        signers: [Signer25519; 2],
        window: Window,
        digest: AggregationDigest,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let signers = [
            Signer25519::generate("alpha"),
            Signer25519::generate("beta"),
        ];
        std::fs::write(dir.path().join("beta.key"), signers[1].to_hex().as_bytes()).unwrap();
        let text = format!(
            r#"
version = 1

[[facilitator]]
index = 0
name = "alpha"
signing_public_key = "{}"
hpke_public_key = "00"

[[facilitator]]
index = 1
name = "beta"
signing_public_key = "{}"
hpke_public_key = "00"
signing_key = "file:beta.key"

[[aggregation]]
id = "clicks"
vdaf = {{ type = "count" }}
window = "1h"
grace = "5m"
max_age = "1day"
min_reports = 0
verify_key = "env:MILLRACE_UNUSED"
verify_key_id = "0011223344556677"
ingestors = []
"#,
            signers[0].public_hex(),
            signers[1].public_hex()
        );
        let config =
            Arc::new(Config::parse(&text, &dir.path().join("m.toml"), dir.path()).unwrap());
        let (own, collector) = (Store::memory(), Store::memory());
        let bus = Arc::new(MemoryBus::new());
        // The helper: it did not write the manifest, it only reads it.
        let worker =
            AggregateWorker::new(config, 1, own.clone(), collector.clone(), bus.clone(), "t")
                .unwrap();
        let digest = worker.digest("clicks").unwrap();
        Fixture {
            digest,
            worker,
            own,
            collector,
            bus,
            signers,
            window: Window::containing(T0, 3600),
            _dir: dir,
        }
    }

    fn batch(name: &str) -> WindowBatch {
        WindowBatch {
            batch: name.into(),
            partition: Partition::of(T0),
        }
    }

    impl Fixture {
        fn task(&self, generation: u32) -> AggregateTask {
            AggregateTask {
                version: AGGREGATE_TASK_VERSION,
                aggregation: "clicks".into(),
                aggregation_digest: self.digest.to_string(),
                window: self.window.name(),
                generation,
            }
        }

        fn manifest(&self, generation: u32, batches: Vec<WindowBatch>) -> WindowManifest {
            WindowManifest {
                aggregation: "clicks".into(),
                aggregation_digest: self.digest.0,
                window_start: self.window.start,
                window_end: self.window.end,
                generation,
                decided_at: T0,
                batches,
                excluded: Vec::new(),
                note: String::new(),
            }
        }

        async fn put_manifest(&self, at: u32, m: &WindowManifest, by: usize) {
            self.own
                .create(
                    &manifest_key("clicks", self.window, at),
                    m.encode(&self.signers[by]).unwrap(),
                )
                .await
                .unwrap();
        }

        /// Both validation batches and our verify states of `b`, each report invalid on side 0.
        async fn put_inputs(&self, b: &WindowBatch, ids: &[u8]) {
            for side in 0..2u8 {
                let v = ValidationBatch {
                    aggregation: "clicks".into(),
                    aggregation_digest: self.digest.0,
                    batch_id: b.batch.clone(),
                    facilitator: side,
                    entries: ids
                        .iter()
                        .map(|i| {
                            let verdict = if side == 0 {
                                Verdict::Invalid(InvalidReason::Unverifiable)
                            } else {
                                Verdict::Valid(vec![*i])
                            };
                            ([*i; 16], verdict)
                        })
                        .collect(),
                };
                self.own
                    .create(
                        &validation_key("clicks", b.partition, &b.batch, side),
                        v.encode(&self.signers[usize::from(side)]).unwrap(),
                    )
                    .await
                    .unwrap();
            }
            let states = VerifyStates {
                aggregation: "clicks".into(),
                batch_id: b.batch.clone(),
                facilitator: 1,
                states: ids.iter().map(|_| None).collect(),
            };
            self.own
                .create(
                    &states_key("clicks", b.partition, &b.batch),
                    states.encode(&self.signers[1]).unwrap(),
                )
                .await
                .unwrap();
        }
    }

    fn permanent(r: Result<Released, TaskError>) -> String {
        match r {
            Err(TaskError::Permanent(m)) => m,
            other => panic!("expected a permanent error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_task_naming_no_manifest_is_refused_by_name() {
        let f = fixture();
        let err = permanent(f.worker.aggregate(&f.task(0)).await);
        assert!(err.contains(&manifest_key("clicks", f.window, 0)), "{err}");
        assert!(err.contains("names no window manifest"), "{err}");
        assert!(f.collector.list("sums/").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_manifest_not_signed_by_the_leader_or_about_another_generation_is_refused() {
        let f = fixture();
        f.put_manifest(0, &f.manifest(0, Vec::new()), 1).await;
        let err = permanent(f.worker.aggregate(&f.task(0)).await);
        assert!(
            err.contains("signed by \"beta\", not by the leader \"alpha\""),
            "{err}"
        );
        f.put_manifest(1, &f.manifest(2, Vec::new()), 0).await;
        let err = permanent(f.worker.aggregate(&f.task(1)).await);
        assert!(err.contains("generation 2"), "{err}");
        f.own
            .create(&manifest_key("clicks", f.window, 3), b"junk".to_vec())
            .await
            .unwrap();
        let err = permanent(f.worker.aggregate(&f.task(3)).await);
        assert!(err.contains(&manifest_key("clicks", f.window, 3)), "{err}");
    }

    #[tokio::test]
    async fn missing_inputs_wait_and_unreadable_ones_are_refused_naming_the_manifest() {
        let f = fixture();
        let b1 = batch("b1");
        f.put_manifest(0, &f.manifest(0, vec![b1.clone()]), 0).await;
        let mkey = manifest_key("clicks", f.window, 0);
        match f.worker.aggregate(&f.task(0)).await {
            Err(TaskError::Transient(m)) => {
                assert!(m.contains(&states_key("clicks", b1.partition, "b1")), "{m}");
                assert!(m.contains(&mkey), "{m}");
            }
            other => panic!("{other:?}"),
        }
        f.own
            .create(
                &states_key("clicks", b1.partition, "b1"),
                b"not a verify-state batch".to_vec(),
            )
            .await
            .unwrap();
        let err = permanent(f.worker.aggregate(&f.task(0)).await);
        assert!(err.contains("lists a batch it cannot read"), "{err}");
        assert!(err.contains(&mkey) && err.contains("b1"), "{err}");
    }

    #[tokio::test]
    async fn batches_are_folded_one_at_a_time_in_manifest_order_and_announced_with_the_generation()
    {
        let f = fixture();
        let (b1, b2) = (batch("b1"), batch("b2"));
        f.put_inputs(&b1, &[1, 2]).await;
        // Report id 1 again, in a later batch: dropped, counted invalid.
        f.put_inputs(&b2, &[1, 3]).await;
        let manifest = f.manifest(4, vec![b1, b2]);
        f.put_manifest(4, &manifest, 0).await;
        let mut sub = f
            .bus
            .subscribe(&topics::collect("t"), SubscribeOptions::new("test"))
            .await
            .unwrap();
        let released = f.worker.aggregate(&f.task(4)).await.unwrap();
        let Released::Part(part) = released.clone() else {
            panic!("refused: {released:?}");
        };
        assert_eq!(part.generation, 4);
        assert_eq!(part.manifest_digest, manifest.digest());
        assert_eq!(part.batches, vec!["b1".to_string(), "b2".to_string()]);
        assert_eq!((part.report_count, part.invalid_count), (0, 4));
        assert_eq!(
            part.invalid_reasons.by_label(),
            [("replayed".to_string(), 1), ("unverifiable".to_string(), 3)].into()
        );
        assert!(f
            .collector
            .exists(&sum_part_key("clicks", f.window, 4, 1))
            .await
            .unwrap());
        let ready = SumPartReady::from_json(&sub.next().await.unwrap().body).unwrap();
        assert_eq!((ready.generation, ready.facilitator), (4, 1));
        // A redelivery re-announces the same part.
        assert_eq!(f.worker.aggregate(&f.task(4)).await.unwrap(), released);
    }
}
