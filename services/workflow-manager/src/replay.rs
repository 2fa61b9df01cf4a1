//! Replays and re-aggregation: recovery after an outage, a bad deploy or a FAILED window.
//!
//! A **replay** publishes one batch's intake task or one window's aggregate task again. It goes
//! through the marker protocol like any other publish, so it is safe to run while the
//! workflow-managers run:
//!
//! * a task that was never published is scheduled through its normal marker (claim, publish, mark
//!   published), so the workflow-manager will not publish it a second time;
//! * a task that was published is published once more under a replay record
//!   (`markers::claim_replay`), which says who replayed it, when and why, and which two operators
//!   replaying the same task at the same moment cannot both win.
//!
//! A window's replayed aggregate task names the newest manifest generation in this facilitator's
//! store, exactly as the first one did. Workers are idempotent (their outputs are create-only and
//! deterministic), so replaying a task that had in fact completed changes nothing.
//!
//! **Re-aggregation** ([`WorkflowManager::reaggregate`], leader only) re-runs a FAILED or stuck
//! window end to end: the leader writes the next generation of the window's manifest (from the
//! batches both facilitators have validated now, with a note of who, when and why), to both
//! stores, and publishes its aggregate task for it; the helper follows on its next pass; both
//! aggregate-workers write that generation's sum parts under new keys, and the mill joins them.
//! Nothing is overwritten. A window whose result exists is refused: a window is released once.

use millrace_bus::Message;
use millrace_protocol::config::Aggregation;
use millrace_protocol::formats::{ExcludedBatch, ExclusionReason, WindowBatch, WindowManifest};
use millrace_protocol::layout::{
    aggregate_marker_key, ingestion_prefix, intake_marker_key, manifest_key,
    manifest_window_prefix, parse_ingestion_key, parse_manifest_key, parse_validation_key,
    result_key, settled_marker_key, validation_prefix, Partition, Window,
};
use millrace_protocol::tasks::{
    topics, AggregateTask, IntakeTask, TaskMessage, AGGREGATE_TASK_VERSION, INTAKE_TASK_VERSION,
};
use millrace_runtime::propagation::{batch_context, publish, window_context};
use millrace_store::markers::{self, ReplayClaim};
use millrace_store::Store;

use crate::windows::{WindowView, LEADER};
use crate::{PassError, PassReport, Scheduled, WorkflowManager};

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
    /// Batches of the replayed window's manifest.
    pub batches: usize,
}

/// What a re-aggregation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaggregated {
    pub aggregation: String,
    pub window: String,
    /// The manifest generation written, and the one it supersedes.
    pub generation: u32,
    pub previous: Option<u32>,
    pub manifest: String,
    pub batches: usize,
    /// Batches left out (not validated by both facilitators now), with why.
    pub excluded: Vec<(String, &'static str)>,
    /// The leader's aggregate task, as published (`None` on a dry run or an empty window).
    pub task: Option<String>,
    pub dry_run: bool,
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
            PassError::Setup(e) => ReplayError::Refused(e),
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
        let (marker, topic, body, batches, trace) = match target {
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
                    version: INTAKE_TASK_VERSION,
                    aggregation: agg.id.clone(),
                    aggregation_digest: self.digest(&agg.id)?.to_string(),
                    batch: batch.clone(),
                    partition: p.path(),
                };
                (
                    intake_marker_key(&agg.id, p, batch),
                    topics::intake(prefix, f),
                    task.to_json(),
                    1,
                    batch_context(&agg.id, batch),
                )
            }
            ReplayTarget::Window {
                aggregation,
                window,
            } => {
                let agg = self.aggregation(aggregation)?;
                let w = self.window_of(agg, window)?;
                let Some((manifest, _)) = self.latest_manifest(agg, w).await? else {
                    return Err(ReplayError::NotFound(format!(
                        "window {window} of aggregation {} has no manifest in this store: the leader writes one when the window is ready; to make one now, run `millrace replay window --reaggregate` with --facilitator 0",
                        agg.id
                    )));
                };
                if manifest.batches.is_empty() {
                    return Err(ReplayError::Refused(format!(
                        "generation {} of window {window}'s manifest lists no batch: there is nothing to aggregate",
                        manifest.generation
                    )));
                }
                let task = AggregateTask {
                    version: AGGREGATE_TASK_VERSION,
                    aggregation: agg.id.clone(),
                    aggregation_digest: self.digest(&agg.id)?.to_string(),
                    window: w.name(),
                    generation: manifest.generation,
                };
                (
                    aggregate_marker_key(&agg.id, w, manifest.generation),
                    topics::aggregate(prefix, f),
                    task.to_json(),
                    manifest.batches.len(),
                    window_context(&agg.id, &w.name()),
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
            batches,
        };
        if self.settings.dry_run {
            return Ok(done(ReplayKind::DryRun, None));
        }
        let me = &self.settings.instance;
        match markers::claim_replay(&self.store, &marker, me, reason).await? {
            ReplayClaim::NotPublished => match self.schedule(&marker, &topic, body, trace).await? {
                Scheduled::Published => {
                    let record = markers::published(&self.store, &marker).await?;
                    tracing::info!(marker, topic, by = %me, reason, "replay: first publish of a task never published");
                    Ok(done(
                        ReplayKind::FirstPublish,
                        record.and_then(|r| r.message_id),
                    ))
                }
                Scheduled::Skipped | Scheduled::Held | Scheduled::DryRun => Err(ReplayError::Refused(format!(
                    "{marker}: a workflow-manager is publishing this task right now; nothing to replay"
                ))),
            },
            ReplayClaim::RacedWith { by, at } => Err(ReplayError::Refused(format!(
                "{marker}: {by} replayed this task at {} a moment ago; not publishing it twice",
                Window::rfc3339(at)
            ))),
            ReplayClaim::Won { number } => {
                let message_id =
                    publish(self.bus.as_ref(), &topic, Message::new(body), Some(trace)).await?;
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

    /// Parses `window` and checks it is one of the aggregation's windows.
    fn window_of(&self, agg: &Aggregation, window: &str) -> Result<Window, ReplayError> {
        let w = Window::parse(window).map_err(|e| ReplayError::Refused(e.to_string()))?;
        if w.end - w.start != agg.window_secs || w.start.rem_euclid(agg.window_secs) != 0 {
            return Err(ReplayError::Refused(format!(
                "window {window} is not a window of aggregation {} (its windows are {} s long, aligned to multiples of that)",
                agg.id, agg.window_secs
            )));
        }
        Ok(w)
    }

    /// Everything in the store about window `w`, settled partitions included.
    async fn whole_window(&self, agg: &Aggregation, w: Window) -> Result<WindowView, ReplayError> {
        let mut view = WindowView::default();
        for p in Partition::range(w.start, w.end, agg.partition_secs()) {
            for obj in self.store.list(&ingestion_prefix(&agg.id, p)).await? {
                if let Some((_, batch)) = parse_ingestion_key(&agg.id, &obj.key) {
                    view.own.insert(WindowBatch {
                        batch,
                        partition: p,
                    });
                }
            }
            for obj in self.store.list(&validation_prefix(&agg.id, p)).await? {
                if let Some((_, batch, by)) = parse_validation_key(&agg.id, &obj.key) {
                    view.add_validation(batch, p, by, obj.last_modified.timestamp());
                }
            }
        }
        Ok(view)
    }

    /// Re-runs window `window` end to end under a new manifest generation (see the module docs),
    /// as this manager's instance (the operator), recording `reason`. `collector` is the
    /// collector's store, where a released result makes this refuse.
    pub async fn reaggregate(
        &self,
        aggregation: &str,
        window: &str,
        reason: &str,
        collector: &Store,
    ) -> Result<Reaggregated, ReplayError> {
        if !self.is_leader() {
            return Err(ReplayError::Refused(
                "re-aggregation writes a new window manifest, which only the leader signs: run it with --facilitator 0 (and the leader's --store and --peer-store)".to_string(),
            ));
        }
        let agg = self.aggregation(aggregation)?;
        let w = self.window_of(agg, window)?;
        let result = result_key(&agg.id, w);
        if collector.exists(&result).await? {
            return Err(ReplayError::Refused(format!(
                "window {window} of aggregation {} has SUCCEEDED ({result} is in the collector's store {}): a window is released once, never aggregated again (two results could be differenced)",
                agg.id,
                collector.redacted_url()
            )));
        }
        // The next generation after every one present, valid or not (so a forged or damaged
        // manifest cannot block the write).
        let listed = self.store.list(&manifest_window_prefix(&agg.id, w)).await?;
        let previous = listed
            .iter()
            .filter_map(|o| parse_manifest_key(&agg.id, &o.key))
            .filter(|(x, _)| *x == w)
            .map(|(_, g)| g)
            .max();
        let generation = match previous {
            Some(g) => g.checked_add(1).ok_or_else(|| {
                ReplayError::Refused(format!("window {window} has run out of generations"))
            })?,
            None => 0,
        };
        let view = self.whole_window(agg, w).await?;
        let (both, pending): (Vec<_>, Vec<_>) = view
            .batches()
            .into_iter()
            .partition(|(_, v)| v.by == [true, true]);
        let now = chrono::Utc::now().timestamp();
        let me = &self.settings.instance;
        let manifest = WindowManifest {
            aggregation: agg.id.clone(),
            aggregation_digest: self.digest(&agg.id)?.0,
            window_start: w.start,
            window_end: w.end,
            generation,
            decided_at: now,
            batches: both.into_iter().map(|(b, _)| b).collect(),
            excluded: pending
                .into_iter()
                .map(|(batch, v)| ExcludedBatch {
                    batch,
                    reason: if v.by[0] != v.by[1] {
                        ExclusionReason::PeerMissing
                    } else {
                        ExclusionReason::MaxAge
                    },
                    validated_by: v.by,
                })
                .collect(),
            note: format!(
                "re-aggregated by {me} at {}{}: {reason}",
                Window::rfc3339(now),
                previous
                    .map(|g| format!(" (superseding generation {g})"))
                    .unwrap_or_default()
            ),
        };
        let mut done = Reaggregated {
            aggregation: agg.id.clone(),
            window: w.name(),
            generation,
            previous,
            manifest: manifest_key(&agg.id, w, generation),
            batches: manifest.batches.len(),
            excluded: manifest
                .excluded
                .iter()
                .map(|e| (e.batch.batch.clone(), e.reason.label()))
                .collect(),
            task: None,
            dry_run: self.settings.dry_run,
        };
        if self.settings.dry_run {
            return Ok(done);
        }
        let mut report = PassReport::default();
        let (manifest, _) = self.write_manifest(agg, w, manifest, &mut report).await?;
        if manifest.generation != generation {
            return Err(ReplayError::Refused(format!(
                "another re-aggregation of window {window} wrote generation {generation} first"
            )));
        }
        // The window's partitions are listed again by both sides' next passes (settled markers
        // only save listings; the helper must see the new generation, and both re-settle).
        for p in Partition::range(w.start, w.end, agg.partition_secs()) {
            let key = settled_marker_key(&agg.id, p);
            self.store.delete(&key).await?;
            if let Some(peer) = &self.peer {
                peer.delete(&key).await?;
            }
        }
        tracing::warn!(target: "millrace::audit", action = "reaggregate", aggregation = %agg.id, window = %w.name(), generation, previous, by = %me, reason, "window re-aggregated under a new manifest generation");
        if !manifest.batches.is_empty() {
            let task = AggregateTask {
                version: AGGREGATE_TASK_VERSION,
                aggregation: agg.id.clone(),
                aggregation_digest: self.digest(&agg.id)?.to_string(),
                window: w.name(),
                generation,
            };
            let marker = aggregate_marker_key(&agg.id, w, generation);
            let topic = topics::aggregate(&self.settings.topic_prefix, LEADER);
            let trace = window_context(&agg.id, &task.window);
            match self
                .schedule(&marker, &topic, task.to_json(), trace)
                .await?
            {
                Scheduled::Published | Scheduled::Skipped => {
                    done.task = Some(String::from_utf8_lossy(&task.to_json()).to_string());
                }
                Scheduled::Held | Scheduled::DryRun => {}
            }
        }
        Ok(done)
    }
}
