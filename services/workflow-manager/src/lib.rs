//! workflow-manager: finds work in object storage and publishes tasks, each exactly once, and —
//! on the leader — decides which batches make up each window.
//!
//! Each pass, per aggregation, it lists only the hourly partitions that are not yet *settled*
//! (see below), from the scan horizon ([`Aggregation::horizon`]: the oldest window not yet past
//! its max age and wait deadline) up to now, and:
//!
//! * publishes an `intake` task for every ingestion batch without a published intake marker;
//! * on facilitator 0, **the leader**, decides each window once it is ready (closed, past its
//!   grace period, every batch validated by both facilitators; or past the peer deadline with
//!   only batches one side lacks still pending; or past its max age): it writes a signed,
//!   create-only **window manifest** (the sorted batches, their digest, and the batches left out
//!   and why) to its own store and to its peer's, then publishes its `aggregate` task naming that
//!   manifest. Batches left out get an `excluded/…` record, a metric and a warning;
//! * on facilitator 1, **the helper**, publishes its own `aggregate` task only once the leader's
//!   manifest is in its store, for exactly that manifest. Past `max_age + wait_deadline` without
//!   one it records the window as FAILED in its store, naming what never came;
//! * on both, records every batch that reaches a window after its manifest as `late` (a record,
//!   `millrace_batches_late_total{aggregation}` and a warning): it is never folded into a window
//!   already decided, since releasing a window twice would let a collector difference the two;
//! * marks a partition settled (`markers/{agg}/settled/…`) once every batch in it is scheduled
//!   and its window's manifest exists, its task is published and every batch of the partition is
//!   in the manifest or recorded as left out. Settled partitions are not listed again, so a pass
//!   costs O(new work), not O(history). (Batches that land in a settled partition, or beyond the
//!   horizon, are found by the cleaner, which walks the whole store anyway.)
//!
//! Every task goes through the marker protocol in [`millrace_store::markers`]: claim
//! (create-only), publish, mark published. Two workflow-managers racing, or one crashing at any
//! step, neither lose a task nor schedule one twice; two leaders racing write one manifest (the
//! loser finds the winner's and follows it). `--dry-run` writes and publishes nothing and logs
//! each action it would take.
//!
//! Failures are contained. A store error in one window (a manifest that cannot be written) is
//! logged, counted in `millrace_pass_failures_total{aggregation,cause}` and retried next pass
//! while the other windows proceed; one in an aggregation's listing fails that aggregation only.
//! A bus error ends the pass, since every later publish would wait out the same publish retry;
//! its claim is released at once ([`markers::release`]), and [`WorkflowManager::run`] tries again
//! a few seconds later rather than a whole `--interval` later. A pass that did not finish
//! everything returns [`PassIncomplete`], so `--once` exits non-zero once it has done what it
//! could. Objects in a listing that are not Millrace keys are skipped, counted in
//! `millrace_listing_ignored_objects_total{aggregation,listing}` and warned about once a minute
//! per prefix.

mod replay;
mod windows;

pub use replay::{Reaggregated, ReplayError, ReplayKind, ReplayTarget, Replayed};

use std::sync::Arc;
use std::time::Duration;

use millrace_bus::{Bus, Message};
use millrace_protocol::agreement::AggregationDigest;
#[cfg(doc)]
use millrace_protocol::config::Aggregation;
use millrace_protocol::config::Config;
use millrace_protocol::crypto::{KeyRing, Signer25519};
use millrace_protocol::formats::ExclusionReason;
use millrace_runtime::health::{Liveness, HEARTBEAT_EVERY};
use millrace_runtime::propagation::{publish, SpanContext};
use millrace_runtime::zeroed;
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
    /// Windows closed and past grace but not decided yet: on the leader, waiting for
    /// validations; on the helper, for the leader's manifest.
    pub windows_waiting: usize,
    /// Of those, the leader's windows waiting for validations.
    pub waiting_for_validations: usize,
    /// Of those, the helper's windows waiting for the leader's manifest.
    pub waiting_for_manifest: usize,
    /// Actions a dry run would have taken.
    pub would_publish: usize,
    /// Window manifests the leader wrote in this pass.
    pub manifests_written: usize,
    /// Batches the leader left out of the manifests it wrote (one side lacked them, or max age).
    pub batches_excluded: usize,
    /// Batches newly recorded as late (they reached a window after its manifest).
    pub batches_late: usize,
    /// Windows the helper gave up on (no manifest by the wait deadline).
    pub windows_failed: usize,
    /// Partitions listed in this pass (the unsettled ones within the horizon).
    pub partitions_listed: usize,
    /// Partitions marked settled in this pass.
    pub partitions_settled: usize,
    /// Windows whose step failed on a store error; retried next pass.
    pub failed_windows: Vec<WindowFailure>,
    /// Aggregations whose pass failed, in config order. After a store error the pass went on
    /// with the next aggregation; after a bus error it ended (see [`PassReport::not_reached`]).
    pub failed_aggregations: Vec<AggregationFailure>,
    /// Aggregations not visited because the bus failed before their turn.
    pub not_reached: Vec<String>,
}

impl PassReport {
    /// Did every aggregation's pass finish?
    pub fn is_complete(&self) -> bool {
        self.failed_aggregations.is_empty()
            && self.not_reached.is_empty()
            && self.failed_windows.is_empty()
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

/// One window whose step failed; the rest of the pass went on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowFailure {
    pub aggregation: String,
    pub window: String,
    /// The error, which names the object involved.
    pub error: String,
}

/// What failed an aggregation's pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    Store,
    Bus,
    /// What this workflow-manager needs to run the aggregation is missing (a key, a peer store,
    /// a computable aggregation digest): fixed by its operator, not by retrying.
    Setup,
}

impl FailureCause {
    fn label(self) -> &'static str {
        match self {
            FailureCause::Store => "store",
            FailureCause::Bus => "bus",
            FailureCause::Setup => "setup",
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
    parts.extend(report.failed_windows.iter().map(|w| {
        format!(
            "window {}/{} failed (retried next pass): {}",
            w.aggregation, w.window, w.error
        )
    }));
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
    /// Lines about windows waiting, per aggregation.
    waiting_log: LogLimiter,
    /// Both facilitators' signing keys: manifests must verify against the leader's.
    facilitator_keys: Result<KeyRing, String>,
    /// The leader's signing key, for its manifests (`None` on the helper).
    signer: Option<Result<Signer25519, String>>,
    /// Each aggregation's digest as this facilitator runs it: every task and manifest carries it.
    digests: std::collections::BTreeMap<String, Result<AggregationDigest, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Store(#[from] millrace_store::StoreError),
    #[error(transparent)]
    Bus(#[from] millrace_bus::BusError),
    /// Something this instance lacks to do its part (a signing key, the peer store), or a
    /// manifest in the way that is not the leader's.
    #[error("{0}")]
    Setup(String),
}

pub(crate) enum Scheduled {
    Published,
    /// The marker says it was published already.
    Skipped,
    /// Another instance holds a fresh claim on it.
    Held,
    DryRun,
}

impl WorkflowManager {
    /// The aggregation's digest as this facilitator runs it.
    pub(crate) fn digest(&self, aggregation: &str) -> Result<AggregationDigest, PassError> {
        match self.digests.get(aggregation) {
            Some(Ok(d)) => Ok(*d),
            Some(Err(e)) => Err(PassError::Setup(e.clone())),
            None => Err(PassError::Setup(format!(
                "aggregation {aggregation:?} is not configured"
            ))),
        }
    }

    pub fn new(config: Arc<Config>, store: Store, bus: Arc<dyn Bus>, settings: Settings) -> Self {
        for agg in &config.aggregations {
            let id = agg.id.as_str();
            for cause in ["store", "bus", "setup", "window"] {
                zeroed::counter(
                    "millrace_pass_failures_total",
                    &[("aggregation", id), ("cause", cause)],
                );
            }
            for reason in [
                ExclusionReason::PeerMissing,
                ExclusionReason::MaxAge,
                ExclusionReason::BeyondHorizon,
            ] {
                zeroed::counter(
                    "millrace_batches_excluded_total",
                    &[("aggregation", id), ("reason", reason.label())],
                );
            }
            for name in [
                "millrace_batches_late_total",
                "millrace_manifests_refused_total",
                "millrace_windows_failed_total",
            ] {
                zeroed::counter(name, &[("aggregation", id)]);
            }
        }
        let signer = (settings.facilitator == windows::LEADER).then(|| {
            config.facilitator_signer(windows::LEADER).map_err(|e| {
                format!(
                    "the leader signs window manifests, but its signing key cannot be loaded: {e}"
                )
            })
        });
        let digests = config
            .aggregations
            .iter()
            .map(|a| {
                (
                    a.id.clone(),
                    config.aggregation_digest(a).map_err(|e| e.to_string()),
                )
            })
            .collect();
        WorkflowManager {
            digests,
            store,
            peer: None,
            bus,
            settings,
            retry_after_bus_failure: RETRY_AFTER_BUS_FAILURE,
            failure_log: LogLimiter::default(),
            ignored_log: LogLimiter::default(),
            waiting_log: LogLimiter::default(),
            facilitator_keys: config.facilitator_keys().map_err(|e| e.to_string()),
            signer,
            config,
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
        self.run_observed(interval, shutdown, &Liveness::default())
            .await
    }

    /// As [`WorkflowManager::run`], beating `liveness` (`/healthz`) before and after each pass
    /// and every second between passes: the pass loop is this service's heartbeat, so a pass
    /// that hangs shows once it has lasted longer than `--heartbeat-timeout`.
    pub async fn run_observed(&self, interval: Duration, shutdown: Shutdown, liveness: &Liveness) {
        loop {
            liveness.beat();
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
            liveness.beat();
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = &mut sleep => break,
                    _ = tokio::time::sleep(HEARTBEAT_EVERY) => liveness.beat(),
                }
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
                Err(PassError::Setup(e)) => (FailureCause::Setup, e),
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
        for (reason, waiting) in [
            ("validations", report.waiting_for_validations),
            ("manifest", report.waiting_for_manifest),
        ] {
            metrics::gauge!(
                "millrace_windows_waiting",
                "facilitator" => self.settings.facilitator.to_string(),
                "reason" => reason
            )
            .set(waiting as f64);
        }
        metrics::counter!("millrace_partitions_listed_total")
            .increment(report.partitions_listed as u64);
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

    /// The marker protocol around one publish.
    pub(crate) async fn schedule(
        &self,
        marker: &str,
        topic: &str,
        body: Vec<u8>,
        trace: SpanContext,
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
                Ok(Scheduled::Held)
            }
            Claim::Won {
                generation,
                took_over,
            } => {
                if took_over {
                    tracing::warn!(marker, generation, "took over a stale claim");
                }
                let message_id = match publish(
                    self.bus.as_ref(),
                    topic,
                    Message::new(body),
                    Some(trace),
                )
                .await
                {
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

/// A duration as people write it (`1h`, `10m`), for messages.
pub(crate) fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `hostname-pid`, what marker records name as their owner by default.
pub fn default_instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "workflow-manager".to_string());
    format!("{host}-{}", std::process::id())
}
