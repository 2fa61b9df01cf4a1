//! mill: joins both facilitators' sum parts of a window into the result.
//!
//! On `sum-part-ready` it looks for both parts in the collector's store. If one is missing it
//! records the computation as waiting and re-queues the message with backoff — it never sleeps
//! holding a slot. With both parts it refuses to unshard unless their report counts, report-id
//! digests and batch lists agree (both facilitators must have aggregated exactly the same
//! reports), enforces the aggregation's minimum report count, unshards, writes
//! `results/{agg}/{window}.result.json`, publishes `result-ready` and marks the computation
//! SUCCEEDED.
//!
//! Both parts' messages of a window can be handled at the same moment (by one mill or by two), and
//! both then find both parts. The result itself is deterministic and written create-only, so both
//! writes agree; announcing it goes through an idempotency marker
//! (`markers/{agg}/results/{window}`, the same claim → publish → mark protocol the
//! workflow-manager uses), so `result-ready` is published, and the window counted in
//! `millrace_windows_succeeded_total`, once. A window whose marker says it was announced is done:
//! later messages for it are acknowledged as is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use millrace_bus::{Bus, Message};
use millrace_protocol::config::Config;
use millrace_protocol::crypto::KeyRing;
use millrace_protocol::formats::SumPart;
use millrace_protocol::layout::{
    computation_key, result_key, result_marker_key, sum_part_key, Window,
};
use millrace_protocol::results::{
    AggregationResult, Computation, ComputationState, COMPUTATION_VERSION, RESULT_VERSION,
};
use millrace_protocol::tasks::{topics, ResultReady, SumPartReady, TaskMessage, TASK_VERSION};
use millrace_runtime::{Handler, Task, TaskError};
use millrace_store::markers::{self, Claim};
use millrace_store::Store;

/// A claim to announce a result older than this is taken over (its holder is presumed dead).
/// Announcing is one publish, which a backend retries for at most about 30 s.
const ANNOUNCE_CLAIM_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Mill {
    config: Arc<Config>,
    collector: Store,
    bus: Arc<dyn Bus>,
    topic_prefix: String,
    facilitator_keys: KeyRing,
    /// Who this mill is in marker records (`mill-{host}-{pid}`).
    instance: String,
    /// Numbers each join, so that two joins in this process never mistake each other's claim
    /// for their own.
    joins: AtomicU64,
}

/// What happened to a window when a message for it was handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MillOutcome {
    Succeeded(AggregationResult),
    AlreadyDone,
    /// Refused by policy (too few reports); recorded as FAILED, nothing to retry.
    Refused(String),
}

impl Mill {
    pub fn new(
        config: Arc<Config>,
        collector: Store,
        bus: Arc<dyn Bus>,
        topic_prefix: &str,
    ) -> anyhow::Result<Self> {
        let facilitator_keys = config.facilitator_keys()?;
        Ok(Mill {
            config,
            collector,
            bus,
            topic_prefix: topic_prefix.to_string(),
            facilitator_keys,
            instance: format!(
                "mill-{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_string()),
                std::process::id()
            ),
            joins: AtomicU64::new(0),
        })
    }

    async fn record(
        &self,
        agg: &str,
        window: Window,
        state: ComputationState,
        detail: Option<String>,
    ) -> Result<(), TaskError> {
        let c = Computation {
            version: COMPUTATION_VERSION,
            aggregation: agg.to_string(),
            window: window.name(),
            state,
            updated_at: chrono::Utc::now().timestamp(),
            detail,
        };
        self.collector
            .overwrite(&computation_key(agg, window), c.to_json())
            .await
            .map_err(TaskError::from)
    }

    async fn part(&self, agg: &str, window: Window, f: u8) -> Result<Option<SumPart>, TaskError> {
        let key = sum_part_key(agg, window, f);
        let Some(bytes) = self.collector.get(&key).await.map_err(TaskError::from)? else {
            return Ok(None);
        };
        let (part, signer) = SumPart::decode(&self.facilitator_keys, &bytes)
            .map_err(|e| TaskError::Permanent(e.in_object(&key).to_string()))?;
        let expected = self
            .config
            .facilitator_name(f)
            .map_err(|e| TaskError::Permanent(e.to_string()))?;
        if signer != expected
            || part.facilitator != f
            || part.aggregation != agg
            || part.window_start != window.start
            || part.window_end != window.end
        {
            return Err(TaskError::Permanent(format!(
                "{key}: signed by {signer:?} for {} facilitator {}, expected {expected:?}",
                part.aggregation, part.facilitator
            )));
        }
        Ok(Some(part))
    }

    pub async fn join(&self, msg: &SumPartReady) -> Result<MillOutcome, TaskError> {
        let agg = self.config.aggregation(&msg.aggregation).ok_or_else(|| {
            TaskError::Permanent(format!(
                "aggregation {:?} is not configured",
                msg.aggregation
            ))
        })?;
        let window = Window::parse(&msg.window).map_err(|e| TaskError::Permanent(e.to_string()))?;
        let rkey = result_key(&agg.id, window);
        let announced = result_marker_key(&agg.id, window);
        if markers::is_published(&self.collector, &announced)
            .await
            .map_err(TaskError::from)?
        {
            return Ok(MillOutcome::AlreadyDone);
        }
        let p0 = self.part(&agg.id, window, 0).await?;
        let p1 = self.part(&agg.id, window, 1).await?;
        let (p0, p1) = match (p0, p1) {
            (Some(a), Some(b)) => (a, b),
            (a, _) => {
                let missing = if a.is_none() { 0 } else { 1 };
                self.record(&agg.id, window, ComputationState::WaitingForParts, None)
                    .await?;
                return Err(TaskError::Transient(format!(
                    "{}/{}: waiting for the sum part of facilitator {missing}",
                    agg.id, msg.window
                )));
            }
        };
        let mismatch = if p0.report_count != p1.report_count {
            Some(format!(
                "report counts differ: facilitator 0 has {}, facilitator 1 has {}",
                p0.report_count, p1.report_count
            ))
        } else if p0.report_digest != p1.report_digest {
            Some(
                "report-id digests differ: the facilitators aggregated different reports"
                    .to_string(),
            )
        } else if p0.batches != p1.batches {
            Some("the facilitators aggregated different batch lists".to_string())
        } else {
            None
        };
        if let Some(reason) = mismatch {
            let reason = format!("{}/{}: refusing to unshard: {reason}", agg.id, msg.window);
            self.record(
                &agg.id,
                window,
                ComputationState::Failed,
                Some(reason.clone()),
            )
            .await?;
            metrics::counter!("millrace_windows_failed_total", "aggregation" => agg.id.clone())
                .increment(1);
            return Err(TaskError::Permanent(reason));
        }
        if p0.report_count < agg.min_reports {
            let reason = format!(
                "{}/{}: only {} valid reports, the policy requires at least {}",
                agg.id, msg.window, p0.report_count, agg.min_reports
            );
            tracing::warn!(aggregation = %agg.id, window = %msg.window, reports = p0.report_count, min = agg.min_reports, "window refused by policy");
            self.record(
                &agg.id,
                window,
                ComputationState::Failed,
                Some(reason.clone()),
            )
            .await?;
            return Ok(MillOutcome::Refused(reason));
        }
        let value = agg
            .vdaf
            .unshard([&p0.aggregate_share, &p1.aggregate_share], p0.report_count)
            .map_err(|e| TaskError::Permanent(format!("{}/{}: {e}", agg.id, msg.window)))?;
        let result = AggregationResult {
            version: RESULT_VERSION,
            aggregation: agg.id.clone(),
            window: window.name(),
            window_start: Window::rfc3339(window.start),
            window_end: Window::rfc3339(window.end),
            vdaf: agg.vdaf.spec().clone(),
            result: value,
            report_count: p0.report_count,
            invalid_count: p0.invalid_count.max(p1.invalid_count),
            report_digest: hex_digest(&p0.report_digest),
            batches: p0.batches.clone(),
        };
        // Deterministic bytes: a second join of the same window writes nothing new.
        self.collector
            .create(&rkey, result.to_json())
            .await
            .map_err(TaskError::from)?;
        let me = format!(
            "{}-{}",
            self.instance,
            self.joins.fetch_add(1, Ordering::Relaxed)
        );
        let generation =
            match markers::claim(&self.collector, &announced, &me, ANNOUNCE_CLAIM_TIMEOUT)
                .await
                .map_err(TaskError::from)?
            {
                Claim::Won { generation, .. } => generation,
                Claim::AlreadyPublished => return Ok(MillOutcome::AlreadyDone),
                Claim::HeldByOther { by, .. } => {
                    // Another join is announcing it right now; by the retry it will have.
                    return Err(TaskError::Transient(format!(
                        "{}/{}: the result is being announced by {by}",
                        agg.id, msg.window
                    )));
                }
            };
        let message_id = self
            .bus
            .publish(
                &topics::results(&self.topic_prefix),
                Message::new(
                    ResultReady {
                        version: TASK_VERSION,
                        aggregation: agg.id.clone(),
                        window: window.name(),
                        result_key: rkey.clone(),
                    }
                    .to_json(),
                ),
            )
            .await
            .map_err(|e| TaskError::Transient(e.to_string()))?;
        markers::mark_published(&self.collector, &announced, &me, generation, &message_id)
            .await
            .map_err(TaskError::from)?;
        self.record(&agg.id, window, ComputationState::Succeeded, None)
            .await?;
        metrics::counter!("millrace_windows_succeeded_total", "aggregation" => agg.id.clone())
            .increment(1);
        tracing::info!(aggregation = %agg.id, window = %msg.window, reports = result.report_count, "result written");
        Ok(MillOutcome::Succeeded(result))
    }
}

fn hex_digest(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait]
impl Handler for Mill {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        let msg = SumPartReady::from_json(&task.body)
            .map_err(|e| TaskError::Permanent(format!("message {}: {e}", task.message_id)))?;
        self.join(&msg).await.map(|_| ())
    }
}
