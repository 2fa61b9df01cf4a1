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
//!
//! Each service supplies only a [`Handler`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use millrace_bus::{
    dead_topic, rejected_topic, Attributes, Bus, BusError, Bytes, Delivery, LeaseKeeper, Message,
    SubscribeOptions, ATTR_ATTEMPT, ATTR_ORIGIN_TOPIC, ATTR_REASON,
};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

use crate::Shutdown;

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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Retried,
    Dead,
    Rejected,
    HandedBack,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Rejected => "rejected",
            Outcome::HandedBack => "handed_back",
        }
    }
}

impl WorkerReport {
    fn count(&mut self, topic: &str, outcome: Outcome) {
        match outcome {
            Outcome::Succeeded => self.succeeded += 1,
            Outcome::Retried => self.retried += 1,
            Outcome::Dead => self.dead += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::HandedBack => self.handed_back += 1,
        }
        metrics::counter!(
            "millrace_tasks_total",
            "topic" => topic.to_string(),
            "outcome" => outcome.label()
        )
        .increment(1);
    }

    fn count_join(&mut self, topic: &str, joined: Result<Outcome, JoinError>) {
        let outcome = match joined {
            Ok(outcome) => outcome,
            // Aborted after the drain grace: its delivery was dropped unsettled, i.e. handed back.
            Err(e) if e.is_cancelled() => Outcome::HandedBack,
            Err(e) => {
                // Handler panics are caught inside the task; this is a panic in the bus's
                // settle path. The delivery was dropped unsettled during unwinding.
                tracing::error!(topic, error = %e, "task crashed outside its handler");
                Outcome::HandedBack
            }
        };
        self.count(topic, outcome);
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
    let concurrency = config.concurrency.max(1);
    let options = SubscribeOptions::new(config.group.clone())
        .lease(config.lease)
        .prefetch(concurrency);
    let mut subscription = bus.subscribe(&config.topic, options).await?;
    let config = Arc::new(config);
    let topic = config.topic.as_str();
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut report = WorkerReport::default();
    let mut closed_by_bus = false;
    tracing::info!(topic, group = %config.group, concurrency, bus = bus.name(), "worker started");

    loop {
        while let Some(joined) = tasks.try_join_next() {
            report.count_join(topic, joined);
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, there would be no slots to work in.
                Err(_) => break,
            },
        };
        let received = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            received = subscription.next() => received,
        };
        match received {
            Ok(delivery) => {
                let work = process(
                    bus.clone(),
                    config.clone(),
                    handler.clone(),
                    delivery,
                    permit,
                );
                tasks.spawn(work);
            }
            Err(BusError::Closed) => {
                tracing::warn!(topic, "subscription closed by the bus; stopping");
                closed_by_bus = true;
                break;
            }
            Err(error) => {
                // A broker hiccup must not end the worker; give back the slot while waiting.
                drop(permit);
                tracing::warn!(topic, %error, "receiving failed; retrying in 1s");
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

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
        "worker stopped"
    );
    if closed_by_bus {
        return Err(BusError::Closed);
    }
    Ok(report)
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
async fn process(
    bus: Arc<dyn Bus>,
    config: Arc<WorkerConfig>,
    handler: Arc<dyn Handler>,
    delivery: Delivery,
    _permit: OwnedSemaphorePermit,
) -> Outcome {
    let task = Task {
        message_id: delivery.message_id.clone(),
        body: delivery.body.clone(),
        attributes: delivery.attributes.clone(),
        attempt: delivery.attempt,
        topic: config.topic.clone(),
    };
    let span = tracing::info_span!(
        "task",
        topic = %task.topic,
        message_id = %task.message_id,
        attempt = task.attempt
    );
    async move {
        let _gauge = InFlightGauge::new(&task.topic);
        let started = Instant::now();
        let keeper = keep_lease(delivery.lease_keeper(), config.lease, &task.topic);
        let result = tokio::select! {
            result = AssertUnwindSafe(handler.handle(&task)).catch_unwind() => match result {
                Ok(result) => result,
                Err(panic) => Err(TaskError::Transient(format!(
                    "handler panicked: {}",
                    panic_message(panic.as_ref())
                ))),
            },
            never = keeper => match never {},
        };
        metrics::histogram!("millrace_task_duration_seconds", "topic" => task.topic.clone())
            .record(started.elapsed().as_secs_f64());
        settle(bus.as_ref(), &config, &task, delivery, result).await
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
            Err(error) => tracing::warn!(%error, "extending the lease failed; will try again"),
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
    bus: &dyn Bus,
    config: &WorkerConfig,
    task: &Task,
    delivery: Delivery,
    result: Result<(), TaskError>,
) -> Outcome {
    match result {
        Ok(()) => {
            if let Err(error) = delivery.ack().await {
                // The work is done; the message may run again (at-least-once), which handlers
                // are written to tolerate.
                tracing::warn!(%error, "ack failed after the task succeeded");
            }
            Outcome::Succeeded
        }
        Err(TaskError::Transient(reason)) if task.attempt >= config.max_attempts => {
            tracing::warn!(%reason, max_attempts = config.max_attempts, "giving up: dead-lettering");
            move_aside(
                bus,
                config,
                task,
                delivery,
                &dead_topic(&task.topic),
                &reason,
                Outcome::Dead,
            )
            .await
        }
        Err(TaskError::Transient(reason)) => {
            let delay = retry_delay(task.attempt, config.backoff_base, config.backoff_max);
            tracing::info!(%reason, ?delay, "transient failure; retrying later");
            nack(delivery, delay).await
        }
        Err(TaskError::Permanent(reason)) => {
            tracing::warn!(%reason, "permanent failure: rejecting");
            move_aside(
                bus,
                config,
                task,
                delivery,
                &rejected_topic(&task.topic),
                &reason,
                Outcome::Rejected,
            )
            .await
        }
    }
}

/// Publishes a copy of the task to `to` with the reason, then acks the original. If the copy
/// cannot be published the original is nacked instead, so the message is never lost.
async fn move_aside(
    bus: &dyn Bus,
    config: &WorkerConfig,
    task: &Task,
    delivery: Delivery,
    to: &str,
    reason: &str,
    outcome: Outcome,
) -> Outcome {
    let mut message = Message::new(task.body.clone());
    message.attributes = task.attributes.clone();
    message
        .attributes
        .insert(ATTR_REASON.to_string(), reason.to_string());
    message
        .attributes
        .insert(ATTR_ATTEMPT.to_string(), task.attempt.to_string());
    message
        .attributes
        .insert(ATTR_ORIGIN_TOPIC.to_string(), task.topic.clone());
    match bus.publish(to, message).await {
        Ok(_) => {
            if let Err(error) = delivery.ack().await {
                // The copy exists; the original may come back and be moved aside again.
                tracing::warn!(%error, to, "ack failed after moving the message aside");
            }
            outcome
        }
        Err(error) => {
            tracing::error!(%error, to, "could not move the message aside; retrying it later");
            let delay = retry_delay(task.attempt, config.backoff_base, config.backoff_max);
            nack(delivery, delay).await
        }
    }
}

async fn nack(delivery: Delivery, delay: Duration) -> Outcome {
    if let Err(error) = delivery.nack(delay).await {
        // Lost the lease: the bus redelivers it anyway.
        tracing::warn!(%error, "nack failed");
    }
    Outcome::Retried
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
