//! The worker loop, written once for every consumer service: receive → lease → handle →
//! ack / retry / dead-letter / reject.
//!
//! Why here and not in each service: the rules that keep a fleet correct under at-least-once
//! delivery are the same everywhere, and easy to get subtly wrong —
//!
//! * **Bounded concurrency without hoarding.** A permit is taken *before* asking the bus for a
//!   message, so a worker never holds a delivery it has no slot for (its lease would tick away
//!   while it waits, and another worker could have done it).
//! * **Leases kept while working.** A long task would otherwise be handed to a second worker
//!   half-way through; a keeper extends the lease every third of it while the handler runs.
//! * **Retries without holding a slot.** A transient failure is `nack`ed with exponential backoff
//!   and jitter, so the bus waits, not the worker; after `max_attempts` the message goes to
//!   `{topic}.dead` with the reason. A permanent failure (malformed, bad signature) goes to
//!   `{topic}.rejected` at once. Nothing is acked off the main topic unless it is done or has
//!   been copied elsewhere.
//! * **A panicking handler is a failed attempt**, not a dead worker.
//! * **Graceful shutdown.** Stop receiving, give in-flight tasks `drain_grace` to finish, then drop
//!   the rest unsettled — the bus hands them to another worker at once — and flush publishers.
//! * **Everything written about a message is bounded.** A body over `max_body` (and over what the
//!   bus can carry, [`millrace_bus::Limits`]) is rejected without being read. Every copy moved to
//!   `.rejected`/`.dead` is built by [`millrace_bus::limits::bound_copy`]: its reason and echoed
//!   attributes are cut to [`millrace_bus::limits::MAX_REASON_BYTES`] with a marker, and it fits
//!   the broker's caps, so echoing hostile input can never make the copy unsendable (RabbitMQ
//!   closes the whole connection on an oversized header; NATS refuses oversized payloads).
//! * **Moving aside is idempotent.** A copy already published for a (topic, body) is not published
//!   again when the original comes back (its ack was lost with a connection). A copy that cannot be
//!   published is retried with backoff; once the message's attempts are used up it is settled
//!   anyway, logged and counted in `millrace_messages_unmovable_total`, never redelivered in a loop.
//! * **Log volume is bounded.** A failure of one kind logs its detail once a minute per topic
//!   ([`LogLimiter`]), with the number of occurrences it stands for; the rest is counted. No log
//!   line carries more than a bounded slice of a message.
//! * **Health is observed.** The loop beats [`Liveness`] every iteration and at least every
//!   [`HEARTBEAT_EVERY`] while it waits (for a slot or a message), so an idle worker stays alive
//!   and a wedged one goes silent; each running task is registered, so one that runs longer
//!   than `stuck_task_after` shows. After [`RECEIVE_FAILURES_UNREADY`] failed receives in a row
//!   the loop marks [`Readiness`] as failing (for buses without a connection to watch, such as
//!   SNS/SQS and Pub/Sub, this is the signal); a delivery, or a wait of
//!   [`RECEIVE_OK_AFTER`] without a failure, clears it.
//! * **Metrics are current.** A task's outcome is counted the moment it is settled, not when the
//!   loop next looks, so a scrape of an idle worker agrees with its log.
//!
//! Each service supplies only a [`Handler`].

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use millrace_bus::limits::{bound_copy, bounded_text, MAX_REASON_BYTES};
use millrace_bus::{
    dead_topic, rejected_topic, Attributes, Bus, BusError, Bytes, Delivery, LeaseKeeper, Limits,
    SubscribeOptions, ATTR_ATTEMPT, ATTR_ORIGIN_TOPIC, ATTR_REASON,
};
use millrace_store::LogLimiter;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::health::{Health, Liveness, Readiness, DEFAULT_STUCK_TASK_AFTER, HEARTBEAT_EVERY};
use crate::Shutdown;

/// Failed receives in a row after which the worker reports its subscription as failing.
pub const RECEIVE_FAILURES_UNREADY: u32 = 3;
/// A receive that has waited this long without failing counts as working again (an idle
/// subscription hands out nothing, yet is fine).
pub const RECEIVE_OK_AFTER: Duration = Duration::from_secs(10);

/// The default `max_body`: task bodies are small JSON documents; 256 KiB is SNS's whole message.
pub const DEFAULT_MAX_BODY: usize = 256 * 1024;

/// One message, as a handler sees it.
#[derive(Clone, Debug)]
pub struct Task {
    /// The bus's id for the message (stable across redeliveries where the broker allows).
    pub message_id: String,
    /// The raw body (for Millrace: the task JSON).
    pub body: Bytes,
    /// The message's attributes (trace context and the like).
    pub attributes: Attributes,
    /// 1 on the first delivery, rising with every redelivery.
    pub attempt: u32,
    /// The topic it came from.
    pub topic: String,
}

/// Why a handler failed, which decides what happens to the message.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Worth retrying (a store or broker hiccup, a marker held by someone else): retried with
    /// backoff, dead-lettered after `max_attempts`.
    #[error("{0}")]
    Transient(String),
    /// Will never succeed (malformed task, bad signature): moved to `{topic}.rejected` at once.
    #[error("{0}")]
    Permanent(String),
}

/// What a service does with one task.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, task: &Task) -> Result<(), TaskError>;
}

/// How the worker loop consumes one topic.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The topic to consume.
    pub topic: String,
    /// The consumer group; workers sharing it share the topic's messages.
    pub group: String,
    /// Tasks handled at once; also the subscription's prefetch. Default 5.
    pub concurrency: usize,
    /// The lease asked of the bus, extended every third of it while a task runs. Default 60 s.
    pub lease: Duration,
    /// Deliveries of one message before it is dead-lettered. Default 8.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with every attempt. Default 1 s.
    pub backoff_base: Duration,
    /// The longest delay between retries. Default 5 min.
    pub backoff_max: Duration,
    /// How long in-flight tasks may run on after shutdown before they are handed back. Default
    /// 25 s, inside Kubernetes' default 30 s termination grace period.
    pub drain_grace: Duration,
    /// The longest task body handled, in bytes; a longer one is rejected unread. The bus's own
    /// cap ([`Limits::max_body_bytes`]) lowers it further. Default [`DEFAULT_MAX_BODY`].
    pub max_body: usize,
    /// A task running longer than this makes `/healthz` fail (the worker is presumed wedged).
    /// Default [`DEFAULT_STUCK_TASK_AFTER`] (30 min).
    pub stuck_task_after: Duration,
}

impl WorkerConfig {
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        WorkerConfig {
            topic: topic.into(),
            group: group.into(),
            concurrency: 5,
            lease: Duration::from_secs(60),
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5 * 60),
            drain_grace: Duration::from_secs(25),
            max_body: DEFAULT_MAX_BODY,
            stuck_task_after: DEFAULT_STUCK_TASK_AFTER,
        }
    }
}

/// What one run of the worker loop did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Handled and acked.
    pub succeeded: u64,
    /// Failed transiently (or could not be moved aside) and nacked for a later retry.
    pub retried: u64,
    /// Moved to `{topic}.dead` after `max_attempts`.
    pub dead: u64,
    /// Moved to `{topic}.rejected` after a permanent error.
    pub rejected: u64,
    /// Still running when the drain grace ran out at shutdown; handed back unsettled.
    pub handed_back: u64,
    /// Could not be moved to `.rejected`/`.dead` within its attempts; settled anyway (logged and
    /// counted in `millrace_messages_unmovable_total`) rather than redelivered in a loop.
    pub unmovable: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Retried,
    Dead,
    Rejected,
    HandedBack,
    Unmovable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Rejected => "rejected",
            Outcome::HandedBack => "handed_back",
            Outcome::Unmovable => "unmovable",
        }
    }

    /// Counts the outcome in `millrace_tasks_total` (at the moment the task ends, so that a
    /// scrape is current even while the loop waits for the next message).
    fn record(self, topic: &str) -> Self {
        metrics::counter!(
            "millrace_tasks_total",
            "topic" => topic.to_string(),
            "outcome" => self.label()
        )
        .increment(1);
        self
    }
}

impl WorkerReport {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Succeeded => self.succeeded += 1,
            Outcome::Retried => self.retried += 1,
            Outcome::Dead => self.dead += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::HandedBack => self.handed_back += 1,
            Outcome::Unmovable => self.unmovable += 1,
        }
    }

    fn count_join(&mut self, topic: &str, joined: Result<Outcome, JoinError>) {
        let outcome = match joined {
            // Counted in the metrics by the task itself.
            Ok(outcome) => outcome,
            // Aborted after the drain grace: its delivery was dropped unsettled, i.e. handed back.
            Err(e) if e.is_cancelled() => Outcome::HandedBack.record(topic),
            Err(e) => {
                // Handler panics are caught inside the task; this is a panic in the bus's
                // settle path. The delivery was dropped unsettled during unwinding.
                tracing::error!(topic, error = %e, "task crashed outside its handler");
                Outcome::HandedBack.record(topic)
            }
        };
        self.count(outcome);
    }
}

impl From<millrace_store::StoreError> for TaskError {
    /// Object-storage failures in a handler: a conflicting create-only write or a key that is not
    /// allowed will fail the same way every time (permanent); anything else (the store is slow or
    /// unreachable, an object is not there yet) may pass on a retry (transient).
    fn from(e: millrace_store::StoreError) -> Self {
        use millrace_store::StoreError;
        match e {
            StoreError::Conflict { .. } | StoreError::InvalidKey { .. } => {
                TaskError::Permanent(e.to_string())
            }
            _ => TaskError::Transient(e.to_string()),
        }
    }
}

/// The retry delay after failed attempt `attempt` (1-based): `base * 2^(attempt-1)`, capped at
/// `max`, with equal jitter (between half and all of it), so retries of a burst spread out
/// but never come back sooner than half the backoff.
pub fn retry_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(31);
    let full = base.saturating_mul(1u32 << exponent).min(max);
    let half = full / 2;
    let spread = u64::try_from((full - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rand::rng().random_range(0..=spread))
}

/// What every task of one worker loop shares.
struct Context {
    bus: Arc<dyn Bus>,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    /// What the bus carries in one message.
    limits: Limits,
    /// The longest body handed to the handler: `config.max_body` within `limits`.
    max_body: usize,
    moved: MovedAside,
    logs: LogLimiter,
    /// Where running tasks are registered (`/healthz`).
    liveness: Liveness,
}

impl Context {
    /// `Some(n)` if a line of this kind may be logged now (`n`: the occurrences it stands for,
    /// this one included); `None` while the kind is quiet on this topic, counted in
    /// `millrace_log_lines_suppressed_total{kind}`.
    fn may_log(&self, kind: &'static str) -> Option<u64> {
        let logged = self.logs.hit(&format!("{kind} {}", self.config.topic), 1);
        if logged.is_none() {
            metrics::counter!("millrace_log_lines_suppressed_total", "kind" => kind).increment(1);
        }
        logged
    }
}

/// Consumes `config.topic` until `shutdown`, handling each message with `handler`.
///
/// Returns the counts of what happened once in-flight work has drained (or been handed back) and
/// the bus has been flushed. Bus errors while receiving are logged and retried; only a failure to
/// subscribe or to flush, or the subscription closing by itself, ends it with an error.
pub async fn run_worker(
    bus: Arc<dyn Bus>,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    shutdown: Shutdown,
) -> Result<WorkerReport, BusError> {
    run_worker_observed(bus, config, handler, shutdown, Health::default()).await
}

/// As [`run_worker`], reporting to `health`: the loop's heartbeat and running tasks to its
/// liveness (`/healthz`), a subscription that keeps failing to receive to its readiness
/// (`/readyz`). Readiness is marked started once the subscription is open, and stopped when the
/// loop stops receiving (at shutdown).
pub async fn run_worker_observed(
    bus: Arc<dyn Bus>,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    shutdown: Shutdown,
    health: Health,
) -> Result<WorkerReport, BusError> {
    let Health {
        readiness,
        liveness,
    } = health;
    liveness.set_stuck_after(config.stuck_task_after);
    liveness.beat();
    let concurrency = config.concurrency.max(1);
    let options = SubscribeOptions::new(config.group.clone())
        .lease(config.lease)
        .prefetch(concurrency);
    let mut subscription = bus.subscribe(&config.topic, options).await?;
    // Consuming from here on; `/readyz` also follows the bus's connection and the receives.
    readiness.set_ready(true);
    for outcome in ["dead", "rejected"] {
        crate::zeroed::counter(
            "millrace_tasks_total",
            &[("topic", &config.topic), ("outcome", outcome)],
        );
    }
    for to in [dead_topic(&config.topic), rejected_topic(&config.topic)] {
        crate::zeroed::counter(
            "millrace_messages_unmovable_total",
            &[("topic", &config.topic), ("to", &to)],
        );
    }
    let limits = bus.limits();
    let max_body = config.max_body.min(limits.max_body_bytes());
    let ctx = Arc::new(Context {
        bus: bus.clone(),
        config,
        handler,
        limits,
        max_body,
        moved: MovedAside::default(),
        logs: LogLimiter::new(Duration::from_secs(60)),
        liveness: liveness.clone(),
    });
    let config = &ctx.config;
    let topic = config.topic.as_str();
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut report = WorkerReport::default();
    let mut closed_by_bus = false;
    let mut receive_failures = ReceiveFailures::new(topic, readiness);
    let mut ticks = tokio::time::interval(HEARTBEAT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(topic, group = %config.group, concurrency, max_body, bus = bus.name(), "worker started");

    'receive: loop {
        liveness.beat();
        while let Some(joined) = tasks.try_join_next() {
            report.count_join(topic, joined);
        }
        // Both waits beat while they last: an idle worker, or one whose slots are all busy, is
        // alive. Neither future is cancelled by a beat (a NATS `next` withdraws its pull when
        // cancelled), only by shutdown.
        let acquire = slots.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break 'receive,
                permit = &mut acquire => match permit {
                    Ok(permit) => break permit,
                    // The semaphore is never closed; if it were, there would be no slots to work
                    // in.
                    Err(_) => break 'receive,
                },
                _ = ticks.tick() => liveness.beat(),
            }
        };
        let waiting_since = Instant::now();
        let received = {
            let next = subscription.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => break 'receive,
                    received = &mut next => break received,
                    _ = ticks.tick() => {
                        liveness.beat();
                        if waiting_since.elapsed() >= RECEIVE_OK_AFTER {
                            receive_failures.ok();
                        }
                    }
                }
            }
        };
        match received {
            Ok(delivery) => {
                receive_failures.ok();
                tasks.spawn(process(ctx.clone(), delivery, permit));
            }
            Err(BusError::Closed) => {
                tracing::warn!(topic, "subscription closed by the bus; stopping");
                closed_by_bus = true;
                break;
            }
            Err(error) => {
                // A broker hiccup must not end the worker; give back the slot while waiting.
                drop(permit);
                let error = bounded_text(&error.to_string(), MAX_REASON_BYTES).into_owned();
                receive_failures.failed(&error);
                if let Some(occurrences) = ctx.may_log("receive") {
                    tracing::warn!(topic, %error, occurrences, "receiving failed; retrying in 1s");
                }
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    receive_failures.readiness.set_ready(false);
    tracing::info!(topic, in_flight = tasks.len(), "worker stopping; draining");
    if let Err(error) = subscription.close().await {
        tracing::warn!(topic, %error, "closing the subscription failed");
    }
    let drained = tokio::time::timeout(config.drain_grace, async {
        while let Some(joined) = tasks.join_next().await {
            report.count_join(topic, joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            topic,
            handing_back = tasks.len(),
            grace = ?config.drain_grace,
            "drain grace over; handing back unfinished tasks"
        );
        tasks.abort_all();
        while let Some(joined) = tasks.join_next().await {
            report.count_join(topic, joined);
        }
    }
    // Every delivery is settled or dropped now: closing again waits until the subscription has
    // let go of its group (Kafka: committed and left), so that exiting next loses nothing and a
    // replacement worker does not join a group still waiting for this one.
    if let Err(error) = subscription.close().await {
        tracing::warn!(topic, %error, "closing the subscription after the drain failed");
    }
    bus.flush().await?;
    tracing::info!(
        topic,
        succeeded = report.succeeded,
        retried = report.retried,
        dead = report.dead,
        rejected = report.rejected,
        handed_back = report.handed_back,
        unmovable = report.unmovable,
        "worker stopped"
    );
    if closed_by_bus {
        return Err(BusError::Closed);
    }
    Ok(report)
}

/// Counts failed receives in a row and tells readiness when there are too many.
struct ReceiveFailures<'a> {
    topic: &'a str,
    readiness: Readiness,
    in_a_row: u32,
}

impl<'a> ReceiveFailures<'a> {
    fn new(topic: &'a str, readiness: Readiness) -> Self {
        ReceiveFailures {
            topic,
            readiness,
            in_a_row: 0,
        }
    }

    fn failed(&mut self, error: &str) {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self.in_a_row >= RECEIVE_FAILURES_UNREADY {
            self.readiness.set_receive_failing(Some(format!(
                "receiving from {} failed {} times in a row: {}",
                self.topic,
                self.in_a_row,
                bounded_text(error, 200)
            )));
        }
    }

    fn ok(&mut self) {
        if self.in_a_row > 0 {
            self.in_a_row = 0;
            self.readiness.set_receive_failing(None);
        }
    }
}

/// Keeps `millrace_tasks_in_flight` right however the task ends, including by abort.
struct InFlightGauge(metrics::Gauge);

impl InFlightGauge {
    fn new(topic: &str) -> Self {
        let gauge = metrics::gauge!("millrace_tasks_in_flight", "topic" => topic.to_string());
        gauge.increment(1.0);
        InFlightGauge(gauge)
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Handles one delivery and settles it. Holds its slot (`_permit`) until it returns.
async fn process(ctx: Arc<Context>, delivery: Delivery, _permit: OwnedSemaphorePermit) -> Outcome {
    let task = Task {
        message_id: delivery.message_id.clone(),
        body: delivery.body.clone(),
        attributes: delivery.attributes.clone(),
        attempt: delivery.attempt,
        topic: ctx.config.topic.clone(),
    };
    // The publisher's trace continues here (OpenTelemetry's consumer span).
    let span = crate::propagation::consumer_span(
        ctx.bus.name(),
        &task.topic,
        &ctx.config.group,
        &bounded_text(&task.message_id, 128),
        task.attempt,
        &task.attributes,
    );
    async move {
        let _gauge = InFlightGauge::new(&task.topic);
        let _running = ctx.liveness.task_started();
        let started = Instant::now();
        let result = if task.body.len() > ctx.max_body {
            // Not read beyond its length: nothing in it can be trusted to be worth parsing.
            Err(TaskError::Permanent(format!(
                "the body is {} bytes, over the limit of {} bytes for topic {}; not read",
                task.body.len(),
                ctx.max_body,
                task.topic
            )))
        } else {
            let keeper = keep_lease(delivery.lease_keeper(), ctx.config.lease, &task.topic);
            tokio::select! {
                result = AssertUnwindSafe(ctx.handler.handle(&task)).catch_unwind() => match result {
                    Ok(result) => result,
                    Err(panic) => Err(TaskError::Transient(format!(
                        "handler panicked: {}",
                        panic_message(panic.as_ref())
                    ))),
                },
                never = keeper => match never {},
            }
        };
        metrics::histogram!("millrace_task_duration_seconds", "topic" => task.topic.clone())
            .record(started.elapsed().as_secs_f64());
        // Which delivery of its message this was: retries show as mass above 1.
        metrics::histogram!("millrace_task_attempts", "topic" => task.topic.clone())
            .record(f64::from(task.attempt));
        settle(&ctx, &task, delivery, result)
            .await
            .record(&task.topic)
    }
    .instrument(span)
    .await
}

/// Extends the lease every third of it, forever (the caller stops it by dropping it).
async fn keep_lease(keeper: LeaseKeeper, lease: Duration, topic: &str) -> std::convert::Infallible {
    let every = (lease / 3).max(Duration::from_millis(1));
    loop {
        tokio::time::sleep(every).await;
        match keeper.extend(lease).await {
            Ok(()) => {
                metrics::counter!("millrace_lease_extensions_total", "topic" => topic.to_string())
                    .increment(1);
            }
            Err(BusError::LeaseLost { .. }) => {
                // Someone else has the message now; the result of this run will not settle it.
                tracing::warn!(
                    "lease lost while the task was running; it will run again elsewhere"
                );
                return std::future::pending().await;
            }
            Err(error) => tracing::warn!(
                error = %bounded_text(&error.to_string(), MAX_REASON_BYTES),
                "extending the lease failed; will try again"
            ),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Acks, retries, dead-letters or rejects, per the handler's result.
async fn settle(
    ctx: &Context,
    task: &Task,
    delivery: Delivery,
    result: Result<(), TaskError>,
) -> Outcome {
    let config = &ctx.config;
    let topic = task.topic.as_str();
    match result {
        Ok(()) => {
            if let Err(error) = delivery.ack().await {
                // The work is done; the message may run again (at-least-once), which handlers
                // are written to tolerate.
                if let Some(occurrences) = ctx.may_log("ack") {
                    tracing::warn!(%error, occurrences, "ack failed after the task succeeded");
                }
            }
            Outcome::Succeeded
        }
        Err(TaskError::Transient(reason)) if task.attempt >= config.max_attempts => {
            let reason = bounded_text(&reason, MAX_REASON_BYTES);
            if let Some(occurrences) = ctx.may_log("dead") {
                tracing::warn!(%reason, max_attempts = config.max_attempts, occurrences, "giving up: dead-lettering");
            }
            move_aside(
                ctx,
                task,
                delivery,
                &dead_topic(topic),
                &reason,
                Outcome::Dead,
            )
            .await
        }
        Err(TaskError::Transient(reason)) => {
            let delay = retry_delay(task.attempt, config.backoff_base, config.backoff_max);
            if let Some(occurrences) = ctx.may_log("transient") {
                let reason = bounded_text(&reason, MAX_REASON_BYTES);
                tracing::info!(%reason, ?delay, occurrences, "transient failure; retrying later");
            }
            nack(ctx, delivery, delay).await
        }
        Err(TaskError::Permanent(reason)) => {
            let reason = bounded_text(&reason, MAX_REASON_BYTES);
            if let Some(occurrences) = ctx.may_log("rejected") {
                tracing::warn!(%reason, occurrences, "permanent failure: rejecting");
            }
            move_aside(
                ctx,
                task,
                delivery,
                &rejected_topic(topic),
                &reason,
                Outcome::Rejected,
            )
            .await
        }
    }
}

/// Publishes a bounded copy of the task to `to` with the reason, then acks the original. A copy
/// already published for this (topic, body) is not published again. If the copy cannot be
/// published the original is retried later, so the message is not lost; once its attempts are
/// used up it is settled anyway, with an error line and `millrace_messages_unmovable_total`, so
/// that it never circles for ever.
async fn move_aside(
    ctx: &Context,
    task: &Task,
    delivery: Delivery,
    to: &str,
    reason: &str,
    outcome: Outcome,
) -> Outcome {
    let key = MovedAside::key(&task.topic, &task.body);
    if ctx.moved.contains(&key) {
        // The original came back (its ack was lost, e.g. with a connection): the copy exists.
        ack_moved(ctx, delivery, to).await;
        return outcome;
    }
    let attempt = task.attempt.to_string();
    let mut ours = vec![
        (ATTR_REASON, reason),
        (ATTR_ATTEMPT, attempt.as_str()),
        (ATTR_ORIGIN_TOPIC, task.topic.as_str()),
    ];
    // The copy stays in the original's trace, whatever else of it has to go.
    if let Some(parent) = task.attributes.get(crate::propagation::TRACEPARENT) {
        ours.push((crate::propagation::TRACEPARENT, parent.as_str()));
    }
    let (message, trimmed) = bound_copy(&task.body, &ours, &task.attributes, &ctx.limits);
    if trimmed.body_cut_from.is_some() || trimmed.dropped_attributes > 0 {
        metrics::counter!("millrace_copies_trimmed_total", "topic" => task.topic.clone())
            .increment(1);
    }
    match ctx.bus.publish(to, message).await {
        Ok(_) => {
            ctx.moved.insert(key);
            ack_moved(ctx, delivery, to).await;
            outcome
        }
        Err(error) if task.attempt >= ctx.config.max_attempts => {
            metrics::counter!(
                "millrace_messages_unmovable_total",
                "topic" => task.topic.clone(),
                "to" => to.to_string()
            )
            .increment(1);
            tracing::error!(
                error = %bounded_text(&error.to_string(), MAX_REASON_BYTES),
                to,
                attempt = task.attempt,
                %reason,
                "could not move the message aside and its attempts are used up: settling it here; \
                 this line and millrace_messages_unmovable_total are its only record"
            );
            ack_moved(ctx, delivery, to).await;
            Outcome::Unmovable
        }
        Err(error) => {
            if let Some(occurrences) = ctx.may_log("move-aside") {
                tracing::error!(
                    error = %bounded_text(&error.to_string(), MAX_REASON_BYTES),
                    to,
                    occurrences,
                    "could not move the message aside; retrying it later"
                );
            }
            let delay = retry_delay(
                task.attempt,
                ctx.config.backoff_base,
                ctx.config.backoff_max,
            );
            nack(ctx, delivery, delay).await
        }
    }
}

async fn ack_moved(ctx: &Context, delivery: Delivery, to: &str) {
    if let Err(error) = delivery.ack().await {
        // The copy exists; the original may come back, and is then acked without a second copy.
        if let Some(occurrences) = ctx.may_log("ack") {
            tracing::warn!(%error, to, occurrences, "ack failed after moving the message aside");
        }
    }
}

async fn nack(ctx: &Context, delivery: Delivery, delay: Duration) -> Outcome {
    if let Err(error) = delivery.nack(delay).await {
        // Lost the lease: the bus redelivers it anyway.
        if let Some(occurrences) = ctx.may_log("nack") {
            tracing::warn!(%error, occurrences, "nack failed");
        }
    }
    Outcome::Retried
}

/// The (topic, body) pairs this worker has moved aside recently, so that an original that comes
/// back after its ack was lost is settled without a second copy. Bounded in count and age.
#[derive(Default)]
struct MovedAside {
    inner: Mutex<MovedAsideInner>,
}

#[derive(Default)]
struct MovedAsideInner {
    keys: HashSet<[u8; 32]>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl MovedAside {
    const CAPACITY: usize = 10_000;
    const MAX_AGE: Duration = Duration::from_secs(3600);

    fn key(topic: &str, body: &[u8]) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update((topic.len() as u64).to_be_bytes());
        hash.update(topic.as_bytes());
        hash.update(body);
        hash.finalize().into()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MovedAsideInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        let mut inner = self.lock();
        inner.expire();
        inner.keys.contains(key)
    }

    fn insert(&self, key: [u8; 32]) {
        let mut inner = self.lock();
        inner.expire();
        if inner.keys.insert(key) {
            inner.order.push_back((key, Instant::now()));
        }
        while inner.order.len() > Self::CAPACITY {
            if let Some((old, _)) = inner.order.pop_front() {
                inner.keys.remove(&old);
            }
        }
    }
}

impl MovedAsideInner {
    fn expire(&mut self) {
        while let Some((key, at)) = self.order.front().copied() {
            if at.elapsed() < MovedAside::MAX_AGE {
                break;
            }
            self.order.pop_front();
            self.keys.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_with_equal_jitter_and_is_capped() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        for _ in 0..100 {
            let first = retry_delay(1, base, max);
            assert!(first >= Duration::from_millis(500) && first <= base);
            let fourth = retry_delay(4, base, max);
            assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8));
            let late = retry_delay(40, base, max);
            assert!(late >= max / 2 && late <= max);
        }
        assert_eq!(retry_delay(0, Duration::ZERO, max), Duration::ZERO);
    }
}
