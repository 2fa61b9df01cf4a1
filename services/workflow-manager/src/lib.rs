//! workflow-manager: finds work in object storage and publishes tasks, each exactly once.
//!
//! Each pass, per aggregation, it lists only the hourly partitions that can still hold new work
//! (from the oldest window not yet past its max age up to now), and:
//!
//! * publishes an `intake` task for every ingestion batch without a published intake marker;
//! * publishes an `aggregate` task for every window that is closed and past its grace period once
//!   every batch of the window has been validated by both facilitators — or, when the window's max
//!   age has passed, for the batches that have been.
//!
//! Every task goes through the marker protocol in [`millrace_store::markers`]: claim
//! (create-only), publish, mark published. Two workflow-managers racing, or one crashing at any
//! step, neither lose a task nor schedule one twice. `--dry-run` writes and publishes nothing and
//! logs each action it would take.

mod replay;

pub use replay::{ReplayError, ReplayKind, ReplayTarget, Replayed};

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use millrace_bus::{Bus, Message};
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::layout::{
    aggregate_marker_key, ingestion_prefix, intake_marker_key, parse_ingestion_key,
    parse_validation_key, validation_prefix, Partition, Window,
};
use millrace_protocol::tasks::{
    topics, AggregateTask, BatchRef, IntakeTask, TaskMessage, TASK_VERSION,
};
use millrace_runtime::Shutdown;
use millrace_store::markers::{self, Claim};
use millrace_store::Store;

/// Settings of one workflow-manager.
#[derive(Clone, Debug)]
pub struct Settings {
    pub facilitator: u8,
    pub topic_prefix: String,
    /// Who we are in marker records (host name + pid by default).
    pub instance: String,
    /// A claim older than this is considered abandoned and taken over.
    pub claim_timeout: Duration,
    pub dry_run: bool,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub intake_published: usize,
    pub aggregate_published: usize,
    /// Tasks skipped because their marker says they were published (or another instance holds it).
    pub skipped_by_marker: usize,
    /// Windows closed but still waiting for validations.
    pub windows_waiting: usize,
    /// Actions a dry run would have taken.
    pub would_publish: usize,
}

pub struct WorkflowManager {
    config: Arc<Config>,
    store: Store,
    bus: Arc<dyn Bus>,
    settings: Settings,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Store(#[from] millrace_store::StoreError),
    #[error(transparent)]
    Bus(#[from] millrace_bus::BusError),
}

enum Scheduled {
    Published,
    Skipped,
    DryRun,
}

impl WorkflowManager {
    pub fn new(config: Arc<Config>, store: Store, bus: Arc<dyn Bus>, settings: Settings) -> Self {
        WorkflowManager {
            config,
            store,
            bus,
            settings,
        }
    }

    /// Runs passes every `interval` until `shutdown`. A failed pass is logged and retried on the
    /// next tick; it never ends the loop.
    pub async fn run(&self, interval: Duration, shutdown: Shutdown) {
        loop {
            match self.run_once(chrono::Utc::now().timestamp()).await {
                Ok(report) => tracing::info!(?report, "pass finished"),
                Err(e) => tracing::error!(error = %e, "pass failed; retrying next interval"),
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass over every aggregation, as of `now` (unix seconds).
    pub async fn run_once(&self, now: i64) -> Result<PassReport, PassError> {
        let mut report = PassReport::default();
        for agg in &self.config.aggregations {
            self.pass_aggregation(agg, now, &mut report).await?;
        }
        metrics::counter!("millrace_tasks_scheduled_total", "kind" => "intake")
            .increment(report.intake_published as u64);
        metrics::counter!("millrace_tasks_scheduled_total", "kind" => "aggregate")
            .increment(report.aggregate_published as u64);
        metrics::counter!("millrace_tasks_skipped_by_marker_total")
            .increment(report.skipped_by_marker as u64);
        Ok(report)
    }

    async fn pass_aggregation(
        &self,
        agg: &Aggregation,
        now: i64,
        report: &mut PassReport,
    ) -> Result<(), PassError> {
        let f = self.settings.facilitator;
        let max_age = agg.max_age.as_secs() as i64;
        // The oldest window that can still need work ends no earlier than now - max_age.
        let oldest = Window::containing(now - max_age - agg.window_secs, agg.window_secs);
        // batches per window; validations per batch
        let mut windows: BTreeMap<Window, Vec<BatchRef>> = BTreeMap::new();
        let mut validated: HashSet<(String, u8)> = HashSet::new();
        for p in Partition::range(oldest.start, now + 1) {
            let listed = self.store.list(&ingestion_prefix(&agg.id, p)).await?;
            if listed.is_empty() {
                continue;
            }
            let marker_dir = format!("markers/{}/intake/{}/", agg.id, p.path());
            let marker_objects: BTreeSet<String> = self
                .store
                .list(&marker_dir)
                .await?
                .into_iter()
                .map(|o| o.key)
                .collect();
            for obj in &listed {
                let Some((_, batch)) = parse_ingestion_key(&agg.id, &obj.key) else {
                    tracing::warn!(key = %obj.key, "ignoring an object that is not an ingestion batch");
                    continue;
                };
                let marker = intake_marker_key(&agg.id, p, &batch);
                if marker_objects.contains(&markers::published_key(&marker)) {
                    // Already scheduled in an earlier pass: no request beyond the listing.
                } else {
                    let task = IntakeTask {
                        version: TASK_VERSION,
                        aggregation: agg.id.clone(),
                        batch: batch.clone(),
                        partition: p.path(),
                    };
                    match self
                        .schedule(
                            &marker,
                            &topics::intake(&self.settings.topic_prefix, f),
                            task.to_json(),
                        )
                        .await?
                    {
                        Scheduled::Published => report.intake_published += 1,
                        Scheduled::Skipped => report.skipped_by_marker += 1,
                        Scheduled::DryRun => report.would_publish += 1,
                    }
                }
                windows
                    .entry(Window::containing(p.start, agg.window_secs))
                    .or_default()
                    .push(BatchRef {
                        batch,
                        partition: p.path(),
                    });
            }
            for obj in self.store.list(&validation_prefix(&agg.id, p)).await? {
                if let Some((_, batch, by)) = parse_validation_key(&agg.id, &obj.key) {
                    validated.insert((batch, by));
                }
            }
        }

        let grace = agg.grace.as_secs() as i64;
        for (window, batches) in windows {
            if now < window.end + grace {
                continue;
            }
            let marker = aggregate_marker_key(&agg.id, window);
            if markers::is_published(&self.store, &marker).await? {
                continue;
            }
            let (done, pending): (Vec<BatchRef>, Vec<BatchRef>) =
                batches.into_iter().partition(|b| {
                    validated.contains(&(b.batch.clone(), 0))
                        && validated.contains(&(b.batch.clone(), 1))
                });
            let past_max_age = now >= window.end + max_age;
            if !pending.is_empty() && !past_max_age {
                report.windows_waiting += 1;
                tracing::debug!(aggregation = %agg.id, window = %window.name(), pending = pending.len(), "window waiting for validations");
                continue;
            }
            if !pending.is_empty() {
                tracing::warn!(
                    aggregation = %agg.id,
                    window = %window.name(),
                    excluded = pending.len(),
                    "window past its max age: aggregating without the batches not validated by both sides"
                );
            }
            if done.is_empty() {
                continue;
            }
            let task = AggregateTask {
                version: TASK_VERSION,
                aggregation: agg.id.clone(),
                window: window.name(),
                batches: done,
            };
            match self
                .schedule(
                    &marker,
                    &topics::aggregate(&self.settings.topic_prefix, f),
                    task.to_json(),
                )
                .await?
            {
                Scheduled::Published => report.aggregate_published += 1,
                Scheduled::Skipped => report.skipped_by_marker += 1,
                Scheduled::DryRun => report.would_publish += 1,
            }
        }
        Ok(())
    }

    /// The marker protocol around one publish.
    async fn schedule(
        &self,
        marker: &str,
        topic: &str,
        body: Vec<u8>,
    ) -> Result<Scheduled, PassError> {
        if self.settings.dry_run {
            if markers::is_published(&self.store, marker).await? {
                return Ok(Scheduled::Skipped);
            }
            tracing::info!(marker, topic, body = %String::from_utf8_lossy(&body), "dry run: would claim, publish and mark");
            return Ok(Scheduled::DryRun);
        }
        match markers::claim(
            &self.store,
            marker,
            &self.settings.instance,
            self.settings.claim_timeout,
        )
        .await?
        {
            Claim::AlreadyPublished => Ok(Scheduled::Skipped),
            Claim::HeldByOther { by, age_secs } => {
                metrics::counter!("millrace_marker_contention_total").increment(1);
                tracing::debug!(marker, holder = %by, age_secs, "claimed by another instance");
                Ok(Scheduled::Skipped)
            }
            Claim::Won {
                generation,
                took_over,
            } => {
                if took_over {
                    tracing::warn!(marker, generation, "took over a stale claim");
                }
                let message_id = self.bus.publish(topic, Message::new(body)).await?;
                markers::mark_published(
                    &self.store,
                    marker,
                    &self.settings.instance,
                    generation,
                    &message_id,
                )
                .await?;
                tracing::info!(marker, topic, message_id = %message_id, "task published");
                Ok(Scheduled::Published)
            }
        }
    }
}

/// `hostname-pid`, what marker records name as their owner by default.
pub fn default_instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "workflow-manager".to_string());
    format!("{host}-{}", std::process::id())
}
