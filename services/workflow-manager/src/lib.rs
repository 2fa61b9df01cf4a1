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
//!
//! Failures are contained. A store error in one aggregation (a listing that fails, a marker that
//! cannot be read) is logged at most once a minute per aggregation, counted in
//! `millrace_pass_failures_total{aggregation,cause}` and reported in
//! [`PassReport::failed_aggregations`], and the pass goes on with the next aggregation. A bus error
//! ends the pass, since every later publish would wait out the same publish retry; its claim is
//! released at once ([`markers::release`]), and [`WorkflowManager::run`] tries again a few seconds
//! later rather than a whole `--interval` later. A pass that did not finish every aggregation
//! returns [`PassIncomplete`], so `--once` exits non-zero once it has done what it could. Objects
//! in a listing that are not Millrace keys are skipped, counted in
//! `millrace_listing_ignored_objects_total{aggregation,listing}` and warned about once a minute
//! per prefix.

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
use millrace_store::{LogLimiter, Store};

/// The subject under which incomplete passes are rate-limited (not an aggregation id, which is
/// `[A-Za-z0-9_-]` only).
const INCOMPLETE_PASS: &str = "(incomplete pass)";

/// How soon [`WorkflowManager::run`] tries again after a pass that the bus ended early.
pub const RETRY_AFTER_BUS_FAILURE: Duration = Duration::from_secs(2);

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
    /// Aggregations whose pass failed, in config order. After a store error the pass went on
    /// with the next aggregation; after a bus error it ended (see [`PassReport::not_reached`]).
    pub failed_aggregations: Vec<AggregationFailure>,
    /// Aggregations not visited because the bus failed before their turn.
    pub not_reached: Vec<String>,
}

impl PassReport {
    /// Did every aggregation's pass finish?
    pub fn is_complete(&self) -> bool {
        self.failed_aggregations.is_empty() && self.not_reached.is_empty()
    }

    /// Did the bus end the pass early?
    pub fn bus_failed(&self) -> bool {
        self.failed_aggregations
            .iter()
            .any(|f| f.cause == FailureCause::Bus)
    }
}

/// One aggregation whose pass failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregationFailure {
    pub aggregation: String,
    pub cause: FailureCause,
    /// The error, which names the key or topic involved.
    pub error: String,
}

/// What failed an aggregation's pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    Store,
    Bus,
}

impl FailureCause {
    fn label(self) -> &'static str {
        match self {
            FailureCause::Store => "store",
            FailureCause::Bus => "bus",
        }
    }
}

/// A pass that did not finish every aggregation; `report` has what it did and what failed.
#[derive(Debug, thiserror::Error)]
#[error("pass incomplete: {}", describe(.report))]
pub struct PassIncomplete {
    pub report: PassReport,
}

fn describe(report: &PassReport) -> String {
    let mut parts: Vec<String> = report
        .failed_aggregations
        .iter()
        .map(|f| {
            format!(
                "aggregation {} failed ({}): {}",
                f.aggregation,
                f.cause.label(),
                f.error
            )
        })
        .collect();
    if !report.not_reached.is_empty() {
        parts.push(format!(
            "not reached after the bus failed: {}",
            report.not_reached.join(", ")
        ));
    }
    parts.join("; ")
}

pub struct WorkflowManager {
    config: Arc<Config>,
    store: Store,
    /// The peer facilitator's store: the leader writes window manifests there too.
    peer: Option<Store>,
    bus: Arc<dyn Bus>,
    settings: Settings,
    retry_after_bus_failure: Duration,
    /// Failure lines, per aggregation.
    failure_log: LogLimiter,
    /// Lines about listed objects that are not Millrace keys, per prefix.
    ignored_log: LogLimiter,
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
            peer: None,
            bus,
            settings,
            retry_after_bus_failure: RETRY_AFTER_BUS_FAILURE,
            failure_log: LogLimiter::default(),
            ignored_log: LogLimiter::default(),
        }
    }

    /// The peer facilitator's store. The leader (facilitator 0) needs it: it writes each window's
    /// manifest to both stores.
    pub fn with_peer_store(mut self, peer: Store) -> Self {
        self.peer = Some(peer);
        self
    }

    /// How soon [`WorkflowManager::run`] tries again after the bus ended a pass early (default
    /// [`RETRY_AFTER_BUS_FAILURE`]; never later than the interval).
    pub fn retry_after_bus_failure(mut self, delay: Duration) -> Self {
        self.retry_after_bus_failure = delay;
        self
    }

    /// Runs passes every `interval` until `shutdown`. A failed pass never ends the loop: one that
    /// the bus ended early is tried again after [`RETRY_AFTER_BUS_FAILURE`] (the broker may be
    /// back by then, and the task waits for the outage, not for the interval); one with store
    /// failures on the next tick.
    pub async fn run(&self, interval: Duration, shutdown: Shutdown) {
        loop {
            let wait = match self.run_once(chrono::Utc::now().timestamp()).await {
                Ok(report) => {
                    tracing::info!(?report, "pass finished");
                    interval
                }
                Err(incomplete) => {
                    let retry_in = if incomplete.report.bus_failed() {
                        self.retry_after_bus_failure.min(interval)
                    } else {
                        interval
                    };
                    // Each failure is logged (rate-limited) by `run_once`; this is the summary,
                    // limited the same way.
                    if let Some(passes) = self.failure_log.hit(INCOMPLETE_PASS, 1) {
                        tracing::warn!(error = %incomplete, passes, ?retry_in, "pass incomplete (logged once a minute; passes counts them)");
                    }
                    retry_in
                }
            };
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass over every aggregation, as of `now` (unix seconds). One aggregation's store
    /// failure does not stop the others; a bus failure ends the pass (see the module docs). Any
    /// failure makes the result a [`PassIncomplete`] carrying the report.
    pub async fn run_once(&self, now: i64) -> Result<PassReport, PassIncomplete> {
        let mut report = PassReport::default();
        let mut aggregations = self.config.aggregations.iter();
        for agg in aggregations.by_ref() {
            let (cause, error) = match self.pass_aggregation(agg, now, &mut report).await {
                Ok(()) => continue,
                Err(PassError::Store(e)) => (FailureCause::Store, e.to_string()),
                Err(PassError::Bus(e)) => (FailureCause::Bus, e.to_string()),
            };
            metrics::counter!(
                "millrace_pass_failures_total",
                "aggregation" => agg.id.clone(),
                "cause" => cause.label()
            )
            .increment(1);
            if let Some(failures) = self.failure_log.hit(&agg.id, 1) {
                tracing::error!(
                    aggregation = %agg.id,
                    cause = cause.label(),
                    %error,
                    failures,
                    "aggregation pass failed (logged once a minute per aggregation; failures counts them)"
                );
            }
            report.failed_aggregations.push(AggregationFailure {
                aggregation: agg.id.clone(),
                cause,
                error,
            });
            if cause == FailureCause::Bus {
                break;
            }
        }
        report.not_reached = aggregations.map(|a| a.id.clone()).collect();
        metrics::counter!("millrace_tasks_scheduled_total", "kind" => "intake")
            .increment(report.intake_published as u64);
        metrics::counter!("millrace_tasks_scheduled_total", "kind" => "aggregate")
            .increment(report.aggregate_published as u64);
        metrics::counter!("millrace_tasks_skipped_by_marker_total")
            .increment(report.skipped_by_marker as u64);
        if report.is_complete() {
            Ok(report)
        } else {
            Err(PassIncomplete { report })
        }
    }

    /// Counts an object of a listing that is not a Millrace key, and warns about it at most
    /// once a minute per prefix.
    fn ignore_object(&self, agg: &str, listing: &'static str, prefix: &str, key: &str) {
        metrics::counter!(
            "millrace_listing_ignored_objects_total",
            "aggregation" => agg.to_string(),
            "listing" => listing
        )
        .increment(1);
        if let Some(ignored) = self.ignored_log.hit(prefix, 1) {
            tracing::warn!(
                aggregation = agg,
                prefix,
                example = key,
                ignored,
                "ignoring objects that are not {listing} keys (logged once a minute per prefix; ignored counts them)"
            );
        }
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
            let prefix = ingestion_prefix(&agg.id, p);
            let listed = self.store.list(&prefix).await?;
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
                    self.ignore_object(&agg.id, "ingestion", &prefix, &obj.key);
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
            let prefix = validation_prefix(&agg.id, p);
            for obj in self.store.list(&prefix).await? {
                match parse_validation_key(&agg.id, &obj.key) {
                    Some((_, batch, by)) => {
                        validated.insert((batch, by));
                    }
                    None => self.ignore_object(&agg.id, "validation", &prefix, &obj.key),
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
                let message_id = match self.bus.publish(topic, Message::new(body)).await {
                    Ok(id) => id,
                    Err(e) => {
                        // Give the claim up at once: whichever instance passes next (this one's
                        // next pass, or the next run of a `--once` CronJob) publishes the task
                        // instead of waiting out the claim timeout.
                        let me = &self.settings.instance;
                        if let Err(release) =
                            markers::release(&self.store, marker, me, generation).await
                        {
                            tracing::warn!(marker, generation, error = %release, "could not release the claim after a failed publish; this instance still recognises it as its own");
                        }
                        return Err(e.into());
                    }
                };
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
