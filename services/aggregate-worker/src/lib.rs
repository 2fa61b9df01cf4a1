//! aggregate-worker: turns one window's validated batches into this facilitator's sum part.
//!
//! For an `aggregate` task (a window and exactly the batches to include) it reads, per batch, its
//! own verify states and both facilitators' validation batches, combines the two verifier shares
//! of each report (`verifier_shares_to_message`, `verify_next`), and accumulates the output shares.
//! A report is included only if both sides marked it valid and verification finishes; the union
//! of report ids is walked in a fixed order (batches as listed, ids sorted) and a report id seen
//! before is dropped, so both facilitators include exactly the same reports. The signed sum part
//! (counts, digest of included ids, aggregate share) goes to the collector's store, and a
//! `sum-part-ready` message to the collect topic.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use millrace_bus::{Bus, Message};
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::crypto::{KeyRing, Signer25519};
use millrace_protocol::formats::{report_digest, SumPart, ValidationBatch, Verdict, VerifyStates};
use millrace_protocol::layout::{states_key, sum_part_key, validation_key, Partition, Window};
use millrace_protocol::tasks::{topics, AggregateTask, SumPartReady, TaskMessage, TASK_VERSION};
use millrace_protocol::vdaf::ReportId;
use millrace_runtime::{Handler, Task, TaskError};
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
}

/// One batch's inputs to the combine step.
struct BatchInputs {
    states: VerifyStates,
    validations: [ValidationBatch; 2],
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
        Ok(AggregateWorker {
            config,
            facilitator,
            own,
            collector,
            bus,
            topic_prefix: topic_prefix.to_string(),
            own_keys: KeyRing::new().with(&signer),
            signer,
            facilitator_keys,
        })
    }

    async fn load_validation(
        &self,
        agg: &str,
        p: Partition,
        batch: &str,
        by: u8,
    ) -> Result<ValidationBatch, TaskError> {
        let key = validation_key(agg, p, batch, by);
        let bytes = self
            .own
            .get(&key)
            .await
            .map_err(TaskError::from)?
            .ok_or_else(|| {
                TaskError::Transient(format!(
                    "{key}: validation by facilitator {by} not here yet"
                ))
            })?;
        let (v, signer) = ValidationBatch::decode(&self.facilitator_keys, &bytes)
            .map_err(|e| TaskError::Permanent(e.in_object(&key).to_string()))?;
        let expected = self
            .config
            .facilitator_name(by)
            .map_err(|e| TaskError::Permanent(e.to_string()))?;
        if signer != expected || v.facilitator != by || v.batch_id != batch || v.aggregation != agg
        {
            return Err(TaskError::Permanent(format!(
                "{key}: signed by {signer:?} for {}/{} facilitator {}, expected {expected:?}",
                v.aggregation, v.batch_id, v.facilitator
            )));
        }
        Ok(v)
    }

    pub async fn aggregate(&self, task: &AggregateTask) -> Result<SumPart, TaskError> {
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
        let part_key = sum_part_key(&agg.id, window, self.facilitator);

        let part = match self
            .collector
            .get(&part_key)
            .await
            .map_err(TaskError::from)?
        {
            // Already done (a redelivery): announce it again, the mill is idempotent.
            Some(bytes) => {
                SumPart::decode(&self.facilitator_keys, &bytes)
                    .map_err(|e| TaskError::Permanent(e.in_object(&part_key).to_string()))?
                    .0
            }
            None => {
                let mut batches = task.batches.clone();
                batches.sort();
                batches.dedup();
                let mut inputs = Vec::with_capacity(batches.len());
                for b in &batches {
                    let p = Partition::parse(&b.partition)
                        .map_err(|e| TaskError::Permanent(e.to_string()))?;
                    let skey = states_key(&agg.id, p, &b.batch);
                    let sbytes = self
                        .own
                        .get(&skey)
                        .await
                        .map_err(TaskError::from)?
                        .ok_or_else(|| {
                            TaskError::Transient(format!("{skey}: verify states not here yet"))
                        })?;
                    let states = VerifyStates::decode(&self.own_keys, &sbytes)
                        .map_err(|e| TaskError::Permanent(e.in_object(&skey).to_string()))?;
                    let v0 = self.load_validation(&agg.id, p, &b.batch, 0).await?;
                    let v1 = self.load_validation(&agg.id, p, &b.batch, 1).await?;
                    inputs.push(BatchInputs {
                        states,
                        validations: [v0, v1],
                    });
                }
                let facilitator = self.facilitator;
                let agg2 = agg.clone();
                let batch_ids: Vec<String> = batches.iter().map(|b| b.batch.clone()).collect();
                let part = tokio::task::spawn_blocking(move || {
                    combine(&agg2, facilitator, window, batch_ids, &inputs)
                })
                .await
                .map_err(|e| TaskError::Transient(format!("combine step failed: {e}")))??;
                let bytes = part
                    .encode(&self.signer)
                    .map_err(|e| TaskError::Permanent(e.to_string()))?;
                self.collector
                    .create(&part_key, bytes)
                    .await
                    .map_err(TaskError::from)?;
                tracing::info!(
                    aggregation = %agg.id,
                    window = %task.window,
                    reports = part.report_count,
                    invalid = part.invalid_count,
                    "sum part written"
                );
                part
            }
        };
        let ready = SumPartReady {
            version: TASK_VERSION,
            aggregation: agg.id.clone(),
            window: task.window.clone(),
            facilitator: self.facilitator,
        };
        self.bus
            .publish(
                &topics::collect(&self.topic_prefix),
                Message::new(ready.to_json()),
            )
            .await
            .map_err(|e| TaskError::Transient(e.to_string()))?;
        Ok(part)
    }
}

/// The CPU-bound combine step over every batch of the window.
fn combine(
    agg: &Aggregation,
    facilitator: u8,
    window: Window,
    batch_ids: Vec<String>,
    inputs: &[BatchInputs],
) -> Result<SumPart, TaskError> {
    let vdaf = &agg.vdaf;
    let mut acc = vdaf.accumulator();
    let mut seen: HashSet<ReportId> = HashSet::new();
    let mut included: Vec<ReportId> = Vec::new();
    let mut invalid: u64 = 0;
    let own = usize::from(facilitator);
    for batch in inputs {
        // Per report id: its verdicts from facilitator 0 and 1 and our own verify state. Ids that
        // repeat inside one side's batch were marked duplicate by intake; only the first entry of
        // an id per side counts here.
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
        // A report id repeated inside a batch is one excluded report per repeat; both sides see
        // both validation batches, so both count the same.
        invalid += repeats[0].max(repeats[1]);
        for (id, verdicts) in by_id {
            if !seen.insert(id) {
                invalid += 1;
                continue;
            }
            let (Some(Verdict::Valid(s0)), Some(Verdict::Valid(s1))) = (verdicts[0], verdicts[1])
            else {
                invalid += 1;
                continue;
            };
            let Some(Some(state)) = own_state.get(&id) else {
                invalid += 1;
                continue;
            };
            match vdaf.verify_and_accumulate(own, state, [s0.as_slice(), s1.as_slice()], &mut acc) {
                Ok(()) => included.push(id),
                Err(_) => invalid += 1,
            }
        }
    }
    let aggregate_share = vdaf
        .encode_accumulator(&acc)
        .map_err(|e| TaskError::Permanent(e.to_string()))?;
    Ok(SumPart {
        aggregation: agg.id.clone(),
        window_start: window.start,
        window_end: window.end,
        facilitator,
        report_count: included.len() as u64,
        invalid_count: invalid,
        report_digest: report_digest(&mut included),
        batches: batch_ids,
        aggregate_share,
    })
}

#[async_trait]
impl Handler for AggregateWorker {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        let t = AggregateTask::from_json(&task.body)
            .map_err(|e| TaskError::Permanent(format!("message {}: {e}", task.message_id)))?;
        self.aggregate(&t).await.map(|_| ())
    }
}
