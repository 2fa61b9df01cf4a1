//! Replays: publishing one batch's intake task or one window's aggregate task again, for recovery
//! after an outage or a bad deploy (a task dead-lettered, a worker that wrote nothing).
//!
//! A replay goes through the marker protocol like any other publish, so it is safe to run while
//! the workflow-managers run:
//!
//! * a task that was never published is scheduled through its normal marker (claim, publish, mark
//!   published), so the workflow-manager will not publish it a second time;
//! * a task that was published is published once more under a replay record
//!   (`markers::claim_replay`), which says who replayed it, when and why, and which two operators
//!   replaying the same task at the same moment cannot both win.
//!
//! Workers are idempotent (their outputs are create-only and deterministic), so replaying a task
//! that had in fact completed changes nothing. A window's replayed aggregate task lists the batches
//! validated by both facilitators *now*; if that differs from what was aggregated before, the
//! aggregate-worker refuses to overwrite the earlier sum part (a create-only conflict) and says so.

use std::collections::HashSet;

use millrace_bus::Message;
use millrace_protocol::config::Aggregation;
use millrace_protocol::layout::{
    aggregate_marker_key, ingestion_prefix, intake_marker_key, parse_ingestion_key,
    parse_validation_key, validation_prefix, Partition, Window,
};
use millrace_protocol::tasks::{
    topics, AggregateTask, BatchRef, IntakeTask, TaskMessage, TASK_VERSION,
};
use millrace_store::markers::{self, ReplayClaim};

use crate::{PassError, Scheduled, WorkflowManager};

/// What to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayTarget {
    /// One ingestion batch's intake task. Without a partition (`YYYY/MM/DD/HH`), every partition
    /// of the aggregation is searched for the batch.
    Batch {
        aggregation: String,
        batch: String,
        partition: Option<String>,
    },
    /// One window's aggregate task (`window` as in object keys: `20261123T1200Z-20261123T1300Z`).
    Window { aggregation: String, window: String },
}

/// How the task went out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayKind {
    /// It had never been published: it was scheduled through its normal marker.
    FirstPublish,
    /// It had been published; this is replay number `number` of it.
    Replay { number: u32 },
    /// `--dry-run`: nothing was written or published.
    DryRun,
}

/// What a replay did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub marker: String,
    pub topic: String,
    /// The task as published (raw JSON).
    pub body: String,
    pub kind: ReplayKind,
    pub message_id: Option<String>,
    /// Batches of a replayed window left out because they are not validated by both sides.
    pub excluded_batches: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] millrace_store::StoreError),
    #[error(transparent)]
    Bus(#[from] millrace_bus::BusError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
}

impl From<PassError> for ReplayError {
    fn from(e: PassError) -> Self {
        match e {
            PassError::Store(e) => ReplayError::Store(e),
            PassError::Bus(e) => ReplayError::Bus(e),
        }
    }
}

impl WorkflowManager {
    /// Replays `target` as this manager's instance (the operator), recording `reason`.
    pub async fn replay(
        &self,
        target: &ReplayTarget,
        reason: &str,
    ) -> Result<Replayed, ReplayError> {
        let f = self.settings.facilitator;
        let prefix = &self.settings.topic_prefix;
        let (marker, topic, body, excluded) = match target {
            ReplayTarget::Batch {
                aggregation,
                batch,
                partition,
            } => {
                let agg = self.aggregation(aggregation)?;
                let p = self
                    .find_batch(&agg.id, batch, partition.as_deref())
                    .await?;
                let task = IntakeTask {
                    version: TASK_VERSION,
                    aggregation: agg.id.clone(),
                    batch: batch.clone(),
                    partition: p.path(),
                };
                (
                    intake_marker_key(&agg.id, p, batch),
                    topics::intake(prefix, f),
                    task.to_json(),
                    0,
                )
            }
            ReplayTarget::Window {
                aggregation,
                window,
            } => {
                let agg = self.aggregation(aggregation)?;
                let w = Window::parse(window).map_err(|e| ReplayError::Refused(e.to_string()))?;
                if w.end - w.start != agg.window_secs || w.start.rem_euclid(agg.window_secs) != 0 {
                    return Err(ReplayError::Refused(format!(
                        "window {window} is not a window of aggregation {} (its windows are {} s long, aligned to multiples of that)",
                        agg.id, agg.window_secs
                    )));
                }
                let (done, pending) = self.window_batches(agg, w).await?;
                if done.is_empty() {
                    return Err(ReplayError::Refused(format!(
                        "no batch of window {window} of aggregation {} is validated by both facilitators ({} batches found); replay their intake first (millrace replay batch …)",
                        agg.id, pending
                    )));
                }
                let task = AggregateTask {
                    version: TASK_VERSION,
                    aggregation: agg.id.clone(),
                    window: w.name(),
                    batches: done,
                };
                (
                    aggregate_marker_key(&agg.id, w),
                    topics::aggregate(prefix, f),
                    task.to_json(),
                    pending,
                )
            }
        };
        let text = String::from_utf8_lossy(&body).to_string();
        let done = |kind, message_id| Replayed {
            marker: marker.clone(),
            topic: topic.clone(),
            body: text.clone(),
            kind,
            message_id,
            excluded_batches: excluded,
        };
        if self.settings.dry_run {
            return Ok(done(ReplayKind::DryRun, None));
        }
        let me = &self.settings.instance;
        match markers::claim_replay(&self.store, &marker, me, reason).await? {
            ReplayClaim::NotPublished => match self.schedule(&marker, &topic, body).await? {
                Scheduled::Published => {
                    let record = markers::published(&self.store, &marker).await?;
                    tracing::info!(marker, topic, by = %me, reason, "replay: first publish of a task never published");
                    Ok(done(
                        ReplayKind::FirstPublish,
                        record.and_then(|r| r.message_id),
                    ))
                }
                Scheduled::Skipped | Scheduled::DryRun => Err(ReplayError::Refused(format!(
                    "{marker}: a workflow-manager is publishing this task right now; nothing to replay"
                ))),
            },
            ReplayClaim::RacedWith { by, at } => Err(ReplayError::Refused(format!(
                "{marker}: {by} replayed this task at {} a moment ago; not publishing it twice",
                Window::rfc3339(at)
            ))),
            ReplayClaim::Won { number } => {
                let message_id = self.bus.publish(&topic, Message::new(body)).await?;
                markers::mark_replayed(&self.store, &marker, me, number, reason, &message_id)
                    .await?;
                tracing::info!(marker, topic, number, by = %me, reason, message_id = %message_id, "task replayed");
                Ok(done(ReplayKind::Replay { number }, Some(message_id)))
            }
        }
    }

    fn aggregation(&self, id: &str) -> Result<&Aggregation, ReplayError> {
        self.config
            .aggregations
            .iter()
            .find(|a| a.id == id)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .config
                    .aggregations
                    .iter()
                    .map(|a| a.id.as_str())
                    .collect();
                ReplayError::NotFound(format!(
                    "no aggregation {id:?} in the config (it has: {})",
                    known.join(", ")
                ))
            })
    }

    /// The partition holding ingestion batch `batch`.
    async fn find_batch(
        &self,
        agg: &str,
        batch: &str,
        partition: Option<&str>,
    ) -> Result<Partition, ReplayError> {
        let listed = match partition {
            Some(p) => {
                let p = Partition::parse(p).map_err(|e| ReplayError::Refused(e.to_string()))?;
                self.store.list(&ingestion_prefix(agg, p)).await?
            }
            None => self.store.list(&format!("ingestion/{agg}/")).await?,
        };
        listed
            .iter()
            .filter_map(|o| parse_ingestion_key(agg, &o.key))
            .find(|(_, b)| b == batch)
            .map(|(p, _)| p)
            .ok_or_else(|| {
                ReplayError::NotFound(format!(
                    "no ingestion batch {batch:?} of aggregation {agg}{} in {}",
                    partition
                        .map(|p| format!(" in partition {p}"))
                        .unwrap_or_default(),
                    self.store.redacted_url()
                ))
            })
    }

    /// The batches of window `w` validated by both facilitators, and how many are not.
    async fn window_batches(
        &self,
        agg: &Aggregation,
        w: Window,
    ) -> Result<(Vec<BatchRef>, usize), ReplayError> {
        let mut batches = Vec::new();
        let mut validated: HashSet<(String, u8)> = HashSet::new();
        for p in Partition::range(w.start, w.end) {
            for obj in self.store.list(&ingestion_prefix(&agg.id, p)).await? {
                if let Some((_, batch)) = parse_ingestion_key(&agg.id, &obj.key) {
                    batches.push(BatchRef {
                        batch,
                        partition: p.path(),
                    });
                }
            }
            for obj in self.store.list(&validation_prefix(&agg.id, p)).await? {
                if let Some((_, batch, by)) = parse_validation_key(&agg.id, &obj.key) {
                    validated.insert((batch, by));
                }
            }
        }
        let total = batches.len();
        let done: Vec<BatchRef> = batches
            .into_iter()
            .filter(|b| {
                validated.contains(&(b.batch.clone(), 0))
                    && validated.contains(&(b.batch.clone(), 1))
            })
            .collect();
        let pending = total - done.len();
        Ok((done, pending))
    }
}
