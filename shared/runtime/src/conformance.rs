//! The worker-level half of the conformance suite: what the worker loop must achieve on top of
//! any bus backend — dead letters after `max_attempts` with the last error, permanent errors
//! rejected at once, hostile messages (a body over the limit, a reason echoing a large body)
//! copied once and within bounds, never more tasks in flight than the concurrency limit, and a graceful
//! shutdown that finishes what it can and hands back the rest. The bus-level half (delivery,
//! leases, nacks, attempts) is `millrace_bus::conformance`; every backend's tests run both.
//!
//! Test support code: a broken promise panics with a message naming it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use millrace_bus::{
    dead_topic, rejected_topic, Bus, Delivery, Message, SubscribeOptions, ATTR_ATTEMPT, ATTR_REASON,
};

use crate::propagation::{TRACEPARENT, TRACESTATE};
use crate::{run_worker, Handler, Shutdown, Task, TaskError, WorkerConfig, WorkerReport};

/// Generous: Kafka consumer-group rebalances on a loaded machine take seconds each.
const SOON: Duration = Duration::from_secs(60);

fn config(topic: &str) -> WorkerConfig {
    let mut c = WorkerConfig::new(topic, "conformance-workers");
    c.lease = Duration::from_secs(5);
    c.max_attempts = 3;
    c.backoff_base = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(100);
    c.drain_grace = Duration::from_secs(5);
    c
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives one message from `topic` (in a group of its own) within [`SOON`].
async fn receive_one(bus: &dyn Bus, topic: &str) -> Delivery {
    bus.create_topic(topic, Some("conformance-inspect"))
        .await
        .ok();
    let mut sub = bus
        .subscribe(
            topic,
            SubscribeOptions::new("conformance-inspect").lease(Duration::from_secs(30)),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe to {topic}: {e}"));
    let d = tokio::time::timeout(SOON, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no message arrived on {topic}"))
        .unwrap_or_else(|e| panic!("receive from {topic}: {e}"));
    let _ = sub.close().await;
    d
}

async fn prepare(bus: &dyn Bus, topic: &str) {
    for t in [topic.to_string(), dead_topic(topic), rejected_topic(topic)] {
        let group = if t == topic {
            Some("conformance-workers")
        } else {
            Some("conformance-inspect")
        };
        bus.create_topic(&t, group)
            .await
            .unwrap_or_else(|e| panic!("create {t}: {e}"));
    }
}

async fn stop(
    shutdown: Shutdown,
    worker: tokio::task::JoinHandle<Result<WorkerReport, millrace_bus::BusError>>,
) -> WorkerReport {
    shutdown.trigger();
    tokio::time::timeout(SOON * 2, worker)
        .await
        .unwrap_or_else(|_| panic!("the worker did not stop after shutdown"))
        .unwrap_or_else(|e| panic!("the worker task panicked: {e}"))
        .unwrap_or_else(|e| panic!("the worker ended with an error: {e}"))
}

/// Fails every time with a transient error naming the attempt; records the trace context each
/// delivery carried.
struct AlwaysFails {
    calls: AtomicUsize,
    traces: Mutex<Vec<Option<String>>>,
}

#[async_trait]
impl Handler for AlwaysFails {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut traces) = self.traces.lock() {
            traces.push(task.attributes.get(TRACEPARENT).cloned());
        }
        Err(TaskError::Transient(format!(
            "store unavailable (attempt {})",
            task.attempt
        )))
    }
}

/// A W3C trace context, as a publisher's span puts it in a message.
const A_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// After `max_attempts` transient failures the message is in `{topic}.dead`, body intact, with
/// the last error and the attempt in its attributes. Its trace context (`traceparent`) reaches
/// the handler at every delivery, redeliveries included, and stays on the dead copy.
pub async fn dead_letters_after_max_attempts(bus: Arc<dyn Bus>, prefix: &str) {
    let topic = format!("{prefix}.dl");
    prepare(&*bus, &topic).await;
    bus.publish(
        &topic,
        Message::new("{\"task\":\"doomed\"}")
            .with_attribute(TRACEPARENT, A_TRACEPARENT)
            .with_attribute(TRACESTATE, "millrace=conformance"),
    )
    .await
    .unwrap_or_else(|e| panic!("publish: {e}"));
    let handler = Arc::new(AlwaysFails {
        calls: AtomicUsize::new(0),
        traces: Mutex::new(Vec::new()),
    });
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config(&topic),
        handler.clone(),
        shutdown.clone(),
    ));
    let dead = receive_one(&*bus, &dead_topic(&topic)).await;
    let report = stop(shutdown, worker).await;
    assert_eq!(
        &dead.body[..],
        b"{\"task\":\"doomed\"}",
        "dead letter body is the original"
    );
    let reason = dead
        .attributes
        .get(ATTR_REASON)
        .cloned()
        .unwrap_or_default();
    assert!(
        reason.contains("attempt 3"),
        "dead letter carries the last error, got {reason:?}"
    );
    assert_eq!(
        dead.attributes.get(ATTR_ATTEMPT).map(String::as_str),
        Some("3")
    );
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        3,
        "handled exactly max_attempts times"
    );
    let traces = handler.traces.lock().map(|t| t.clone()).unwrap_or_default();
    assert_eq!(
        traces,
        vec![Some(A_TRACEPARENT.to_string()); 3],
        "every delivery, redeliveries included, carries the publisher's traceparent"
    );
    assert_eq!(
        dead.attributes.get(TRACEPARENT).map(String::as_str),
        Some(A_TRACEPARENT),
        "the dead copy stays in the original's trace: {:?}",
        dead.attributes
    );
    assert_eq!(report.dead, 1);
    let _ = dead.ack().await;
}

/// Refuses bodies that are not JSON objects; records what it accepted.
#[derive(Default)]
struct Strict {
    accepted: Mutex<Vec<String>>,
}

#[async_trait]
impl Handler for Strict {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        let text = String::from_utf8_lossy(&task.body).to_string();
        if !text.starts_with('{') {
            return Err(TaskError::Permanent(format!("malformed task {text:?}")));
        }
        if let Ok(mut a) = self.accepted.lock() {
            a.push(text);
        }
        Ok(())
    }
}

/// A permanent error sends the message to `{topic}.rejected` on its first attempt, and the
/// worker goes on with the next messages.
pub async fn permanent_error_rejects_at_once(bus: Arc<dyn Bus>, prefix: &str) {
    let topic = format!("{prefix}.rj");
    prepare(&*bus, &topic).await;
    bus.publish(&topic, Message::new("garbage"))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    for i in 0..3 {
        bus.publish(&topic, Message::new(format!("{{\"n\":{i}}}")))
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    let handler = Arc::new(Strict::default());
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config(&topic),
        handler.clone(),
        shutdown.clone(),
    ));
    let rejected = receive_one(&*bus, &rejected_topic(&topic)).await;
    let h = handler.clone();
    eventually(
        "the good messages after the bad one were handled",
        move || h.accepted.lock().map(|a| a.len()).unwrap_or(0) == 3,
    )
    .await;
    let report = stop(shutdown, worker).await;
    assert_eq!(&rejected.body[..], b"garbage");
    assert_eq!(
        rejected.attributes.get(ATTR_ATTEMPT).map(String::as_str),
        Some("1"),
        "rejected at once"
    );
    assert!(rejected
        .attributes
        .get(ATTR_REASON)
        .is_some_and(|r| r.contains("malformed")));
    assert_eq!((report.rejected, report.succeeded), (1, 3));
    let _ = rejected.ack().await;
}

/// Echoes the whole body into its reason, as a careless handler would (`invalid id "xxxx…"`), and
/// records every body it was handed.
#[derive(Default)]
struct Echoes {
    seen: Mutex<Vec<usize>>,
}

#[async_trait]
impl Handler for Echoes {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(task.body.len());
        }
        if task.body.starts_with(b"{") {
            return Ok(());
        }
        Err(TaskError::Permanent(format!(
            "invalid id {:?}",
            String::from_utf8_lossy(&task.body)
        )))
    }
}

/// A body over the worker's limit is rejected without reaching the handler; a reason that echoes
/// a large body is cut to `MAX_REASON_BYTES`; both copies reach `{topic}.rejected` once, and the
/// worker goes on with the next message.
pub async fn hostile_messages_are_rejected_with_bounded_copies(bus: Arc<dyn Bus>, prefix: &str) {
    use millrace_bus::limits::MAX_REASON_BYTES;
    let topic = format!("{prefix}.hb");
    prepare(&*bus, &topic).await;
    let mut config = config(&topic);
    config.max_body = 8 * 1024;
    let over = "o".repeat(config.max_body + 1);
    // Under the body limit, but echoed whole its reason would be 8 KiB.
    let echoed = "e".repeat(config.max_body - 10);
    for body in [over.as_str(), echoed.as_str(), "{\"n\":1}"] {
        bus.publish(&topic, Message::new(body.to_string()))
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    let handler = Arc::new(Echoes::default());
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        config,
        handler.clone(),
        shutdown.clone(),
    ));
    let rejected = rejected_topic(&topic);
    bus.create_topic(&rejected, Some("conformance-inspect"))
        .await
        .ok();
    let mut sub = bus
        .subscribe(
            &rejected,
            SubscribeOptions::new("conformance-inspect").lease(Duration::from_secs(30)),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe to {rejected}: {e}"));
    let mut copies = Vec::new();
    while copies.len() < 2 {
        let d = tokio::time::timeout(SOON, sub.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of 2 copies arrived on {rejected}", copies.len()))
            .unwrap_or_else(|e| panic!("receive from {rejected}: {e}"));
        copies.push((d.body.clone(), d.attributes.clone()));
        let _ = d.ack().await;
    }
    let h = handler.clone();
    eventually(
        "the good message after the bad ones was handled",
        move || h.seen.lock().map(|s| s.contains(&7)).unwrap_or(false),
    )
    .await;
    // Nothing else arrives: each bad message was copied once.
    let extra = tokio::time::timeout(Duration::from_secs(2), sub.next()).await;
    let _ = sub.close().await;
    let report = stop(shutdown, worker).await;
    assert!(
        extra.is_err(),
        "a third copy arrived on {rejected}: {:?}",
        extra.ok().and_then(|r| r.ok())
    );
    for (body, attributes) in &copies {
        let reason = attributes.get(ATTR_REASON).cloned().unwrap_or_default();
        assert!(
            reason.len() <= MAX_REASON_BYTES,
            "a reason of {} bytes, over {MAX_REASON_BYTES}",
            reason.len()
        );
        assert_eq!(
            attributes.get(millrace_bus::ATTR_ORIGIN_TOPIC),
            Some(&topic),
            "copy names its origin"
        );
        if body.len() == over.len() {
            assert!(reason.contains("not read"), "{reason}");
        } else {
            assert_eq!(body.len(), echoed.len(), "the echoed body travels whole");
            assert!(reason.starts_with("invalid id \"eee"), "{reason}");
            assert!(reason.ends_with(" bytes]"), "the cut is marked: {reason}");
        }
    }
    let seen = handler.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        !seen.contains(&over.len()),
        "the handler was given a body over the limit"
    );
    assert_eq!((report.rejected, report.succeeded), (2, 1));
}

/// Sleeps, counting how many run at once.
struct Slow {
    delay: Duration,
    running: AtomicUsize,
    max_running: AtomicUsize,
    done: AtomicUsize,
}

impl Slow {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Slow {
            delay,
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Handler for Slow {
    async fn handle(&self, _task: &Task) -> Result<(), TaskError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// With many messages waiting, never more than `concurrency` tasks run at once, and all finish.
pub async fn concurrency_limit_is_never_exceeded(bus: Arc<dyn Bus>, prefix: &str) {
    let topic = format!("{prefix}.cc");
    prepare(&*bus, &topic).await;
    for i in 0..40 {
        bus.publish(&topic, Message::new(format!("{{\"n\":{i}}}")))
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
    }
    let handler = Slow::new(Duration::from_millis(30));
    let mut c = config(&topic);
    c.concurrency = 3;
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        c,
        handler.clone(),
        shutdown.clone(),
    ));
    let h = handler.clone();
    eventually("all 40 tasks ran", move || {
        h.done.load(Ordering::SeqCst) >= 40
    })
    .await;
    let report = stop(shutdown, worker).await;
    let max = handler.max_running.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} tasks ran at once with a limit of 3");
    assert!(
        max >= 2,
        "the worker never ran tasks concurrently (max {max})"
    );
    assert_eq!(report.succeeded, 40);
}

/// On shutdown, a task that finishes within the grace is acked; one that does not is handed
/// back and later runs (once) on another worker.
pub async fn shutdown_finishes_in_flight_and_hands_back_the_rest(bus: Arc<dyn Bus>, prefix: &str) {
    let topic = format!("{prefix}.sd");
    prepare(&*bus, &topic).await;
    bus.publish(&topic, Message::new("{\"n\":1}"))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    let stuck = Slow::new(Duration::from_secs(3600));
    let mut c = config(&topic);
    c.lease = Duration::from_secs(60);
    c.drain_grace = Duration::from_millis(200);
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        bus.clone(),
        c.clone(),
        stuck.clone(),
        shutdown.clone(),
    ));
    let s = stuck.clone();
    eventually("the first worker started the task", move || {
        s.running.load(Ordering::SeqCst) == 1
    })
    .await;
    let first = stop(shutdown, worker).await;
    assert_eq!((first.handed_back, first.succeeded), (1, 0));

    let quick = Slow::new(Duration::from_millis(300));
    c.drain_grace = Duration::from_secs(10);
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(bus.clone(), c, quick.clone(), shutdown.clone()));
    let q = quick.clone();
    eventually(
        "the second worker started the handed-back task",
        move || q.running.load(Ordering::SeqCst) == 1,
    )
    .await;
    // Shut down while it runs: it is within the grace, so it finishes and is acked.
    let second = stop(shutdown, worker).await;
    assert_eq!((second.succeeded, second.handed_back), (1, 0));
    assert_eq!(quick.done.load(Ordering::SeqCst), 1);
}

/// Runs every worker-level behaviour on `bus`, each on its own topics under `prefix`.
pub async fn run_all(bus: Arc<dyn Bus>, prefix: &str) {
    dead_letters_after_max_attempts(bus.clone(), prefix).await;
    permanent_error_rejects_at_once(bus.clone(), prefix).await;
    hostile_messages_are_rejected_with_bounded_copies(bus.clone(), prefix).await;
    concurrency_limit_is_never_exceeded(bus.clone(), prefix).await;
    shutdown_finishes_in_flight_and_hands_back_the_rest(bus, prefix).await;
}
