//! The worker loop against the in-memory bus: concurrency, retry, dead letters, rejects, lease
//! extension, shutdown hand-back, panics and broker hiccups. Durations are tens to hundreds of
//! milliseconds; the tests assert what happened, never how fast.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use millrace_bus::memory::MemoryBus;
use millrace_bus::{
    Bus, BusError, Capabilities, Delivery, Limits, Message, Settle, SubscribeOptions, Subscription,
    ATTR_ATTEMPT, ATTR_ORIGIN_TOPIC, ATTR_REASON,
};
use millrace_runtime::{
    run_worker, Handler, Shutdown, Task, TaskError, WorkerConfig, WorkerReport,
};
use tokio::task::JoinHandle;

/// Small numbers so failures and retries happen within a test's patience.
fn config(topic: &str) -> WorkerConfig {
    let mut config = WorkerConfig::new(topic, "workers");
    config.lease = Duration::from_millis(300);
    config.max_attempts = 3;
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(40);
    config.drain_grace = Duration::from_secs(5);
    config
}

fn start(
    bus: &MemoryBus,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
) -> (Shutdown, JoinHandle<Result<WorkerReport, BusError>>) {
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        Arc::new(bus.clone()),
        config,
        handler,
        shutdown.clone(),
    ));
    (shutdown, worker)
}

async fn stop(
    shutdown: Shutdown,
    worker: JoinHandle<Result<WorkerReport, BusError>>,
) -> WorkerReport {
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(20), worker)
        .await
        .expect("worker stops after shutdown")
        .expect("worker task does not panic")
        .expect("worker ends without error")
}

/// Waits (up to 10 s) until `condition` holds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn publish(bus: &MemoryBus, topic: &str, body: &str) {
    bus.publish(
        topic,
        Message::new(body.to_string()).with_attribute("trace", "t-1"),
    )
    .await
    .expect("publish");
}

async fn receive(bus: &MemoryBus, topic: &str) -> Delivery {
    let mut sub = bus
        .subscribe(topic, SubscribeOptions::new("inspect"))
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap_or_else(|_| panic!("a message on {topic}"))
        .expect("next")
}

/// Sleeps `delay`, counting starts, completions, and the most tasks running at once.
#[derive(Default)]
struct Recorder {
    delay: Duration,
    running: AtomicUsize,
    max_running: AtomicUsize,
    started: AtomicUsize,
    completed: AtomicUsize,
    attempts: Mutex<Vec<u32>>,
}

impl Recorder {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Recorder {
            delay,
            ..Recorder::default()
        })
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.attempts.lock().unwrap().push(task.attempt);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.completed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_never_exceeds_the_limit() {
    let bus = MemoryBus::new();
    for i in 0..30 {
        publish(&bus, "jobs", &format!("{{\"n\":{i}}}")).await;
    }
    let recorder = Recorder::new(Duration::from_millis(20));
    let mut config = config("jobs");
    config.concurrency = 3;
    let (shutdown, worker) = start(&bus, config, recorder.clone());
    eventually("all 30 are done", || {
        recorder.completed.load(Ordering::SeqCst) == 30
    })
    .await;
    let report = stop(shutdown, worker).await;

    let max = recorder.max_running.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} tasks ran at once with a limit of 3");
    assert!(
        max >= 2,
        "tasks never overlapped (max {max}), so the limit was not exercised"
    );
    assert_eq!(report.succeeded, 30);
    assert_eq!(bus.depth("jobs", "workers"), 0);
}

/// Fails transiently (or permanently, or by panicking) on the attempts listed, succeeds otherwise.
struct Flaky {
    transient_until: u32,
    panic_on_first: bool,
    calls: AtomicU32,
}

#[async_trait]
impl Handler for Flaky {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panic_on_first && task.attempt == 1 {
            panic!("bug in handler");
        }
        if task.attempt <= self.transient_until {
            return Err(TaskError::Transient(format!(
                "store unavailable (attempt {})",
                task.attempt
            )));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failure_is_retried_then_succeeds() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{}").await;
    let handler = Arc::new(Flaky {
        transient_until: 2,
        panic_on_first: false,
        calls: AtomicU32::new(0),
    });
    let (shutdown, worker) = start(&bus, config("jobs"), handler.clone());
    eventually("the third attempt ran", || {
        handler.calls.load(Ordering::SeqCst) == 3
    })
    .await;
    eventually("the message is acked", || bus.depth("jobs", "workers") == 0).await;
    let report = stop(shutdown, worker).await;
    assert_eq!((report.retried, report.succeeded, report.dead), (2, 1, 0));
    assert_eq!(bus.depth("jobs.dead", "inspect"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_max_attempts_the_message_is_dead_lettered_with_its_reason() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{\"task\":1}").await;
    let handler = Arc::new(Flaky {
        transient_until: u32::MAX,
        panic_on_first: false,
        calls: AtomicU32::new(0),
    });
    let (shutdown, worker) = start(&bus, config("jobs"), handler.clone());
    let dead = receive(&bus, "jobs.dead").await;
    let report = stop(shutdown, worker).await;

    assert_eq!(dead.body, "{\"task\":1}");
    let attr = |k: &str| dead.attributes.get(k).map(String::as_str);
    assert_eq!(attr(ATTR_REASON), Some("store unavailable (attempt 3)"));
    assert_eq!(attr(ATTR_ATTEMPT), Some("3"));
    assert_eq!(attr(ATTR_ORIGIN_TOPIC), Some("jobs"));
    assert_eq!(attr("trace"), Some("t-1"), "original attributes are kept");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    assert_eq!((report.retried, report.dead, report.succeeded), (2, 1, 0));
    assert_eq!(bus.depth("jobs", "workers"), 0, "acked off the main topic");
}

/// Parses the body as a number; anything else is malformed.
struct Parser {
    calls: AtomicU32,
    parsed: AtomicU32,
}

#[async_trait]
impl Handler for Parser {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::str::from_utf8(&task.body)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| {
                TaskError::Permanent(format!("malformed task {}: not a number", task.message_id))
            })?;
        self.parsed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_rejects_at_once_and_the_worker_keeps_going() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{not json").await;
    for i in 0..3 {
        publish(&bus, "jobs", &i.to_string()).await;
    }
    let handler = Arc::new(Parser {
        calls: AtomicU32::new(0),
        parsed: AtomicU32::new(0),
    });
    let mut config = config("jobs");
    config.concurrency = 1;
    let (shutdown, worker) = start(&bus, config, handler.clone());
    let rejected = receive(&bus, "jobs.rejected").await;
    eventually("the good messages are handled", || {
        handler.parsed.load(Ordering::SeqCst) == 3
    })
    .await;
    eventually("everything is acked", || bus.depth("jobs", "workers") == 0).await;
    let report = stop(shutdown, worker).await;

    assert_eq!(rejected.body, "{not json");
    let reason = rejected
        .attributes
        .get(ATTR_REASON)
        .cloned()
        .unwrap_or_default();
    assert!(
        reason.starts_with("malformed task"),
        "reason was {reason:?}"
    );
    assert_eq!(
        rejected.attributes.get(ATTR_ATTEMPT).map(String::as_str),
        Some("1")
    );
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        4,
        "the malformed task is not retried"
    );
    assert_eq!(
        (report.rejected, report.succeeded, report.retried),
        (1, 3, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_extension_keeps_a_long_task_from_being_redelivered() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{}").await;
    // Five leases long; a free slot would pick up a redelivery at once.
    let recorder = Recorder::new(Duration::from_millis(750));
    let mut config = config("jobs");
    config.lease = Duration::from_millis(150);
    config.concurrency = 2;
    let (shutdown, worker) = start(&bus, config, recorder.clone());
    eventually("the task completes", || {
        recorder.completed.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = stop(shutdown, worker).await;

    assert_eq!(
        recorder.started.load(Ordering::SeqCst),
        1,
        "the task was redelivered while running"
    );
    assert_eq!(*recorder.attempts.lock().unwrap(), vec![1]);
    assert_eq!(report.succeeded, 1);
    assert_eq!(bus.depth("jobs", "workers"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_a_long_task_which_a_later_worker_runs_exactly_once() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{}").await;
    let mut config = config("jobs");
    // Only the hand-back, not lease expiry, can get it to the second worker in time.
    config.lease = Duration::from_secs(60);
    config.drain_grace = Duration::from_millis(100);

    let stuck = Recorder::new(Duration::from_secs(3600));
    let (shutdown, worker) = start(&bus, config.clone(), stuck.clone());
    eventually("the first worker started the task", || {
        stuck.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let first = stop(shutdown, worker).await;
    assert_eq!(first.handed_back, 1);
    assert_eq!(first.succeeded, 0);
    assert_eq!(stuck.completed.load(Ordering::SeqCst), 0);

    let quick = Recorder::new(Duration::ZERO);
    let (shutdown, worker) = start(&bus, config, quick.clone());
    eventually("the second worker completed it", || {
        quick.completed.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = stop(shutdown, worker).await;
    assert_eq!(quick.completed.load(Ordering::SeqCst), 1);
    assert_eq!(*quick.attempts.lock().unwrap(), vec![2]);
    assert_eq!(second.succeeded, 1);
    assert_eq!(bus.depth("jobs", "workers"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_tasks_finish_within_the_grace() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{}").await;
    let recorder = Recorder::new(Duration::from_millis(200));
    let (shutdown, worker) = start(&bus, config("jobs"), recorder.clone());
    eventually("the task started", || {
        recorder.started.load(Ordering::SeqCst) == 1
    })
    .await;
    let report = stop(shutdown, worker).await;
    assert_eq!((report.succeeded, report.handed_back), (1, 0));
    assert_eq!(bus.depth("jobs", "workers"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_counts_as_a_transient_failure() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{}").await;
    publish(&bus, "jobs", "{}").await;
    let handler = Arc::new(Flaky {
        transient_until: 0,
        panic_on_first: true,
        calls: AtomicU32::new(0),
    });
    let (shutdown, worker) = start(&bus, config("jobs"), handler.clone());
    eventually("both retried and done", || {
        handler.calls.load(Ordering::SeqCst) == 4
    })
    .await;
    eventually("everything is acked", || bus.depth("jobs", "workers") == 0).await;
    let report = stop(shutdown, worker).await;
    assert_eq!((report.retried, report.succeeded), (2, 2));
}

/// A bus whose subscriptions fail their first `next` with a broker error.
struct Hiccup {
    inner: MemoryBus,
}

struct HiccupSubscription {
    inner: Box<dyn Subscription>,
    failed: bool,
}

#[async_trait]
impl Bus for Hiccup {
    fn name(&self) -> &'static str {
        "hiccup"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        self.inner.create_topic(topic, group).await
    }
    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        self.inner.publish(topic, message).await
    }
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(HiccupSubscription {
            inner: self.inner.subscribe(topic, options).await?,
            failed: false,
        }))
    }
    async fn flush(&self) -> Result<(), BusError> {
        self.inner.flush().await
    }
}

#[async_trait]
impl Subscription for HiccupSubscription {
    async fn next(&mut self) -> Result<Delivery, BusError> {
        if !self.failed {
            self.failed = true;
            return Err(BusError::Backend {
                backend: "hiccup",
                message: "connection reset".into(),
            });
        }
        self.inner.next().await
    }
    async fn close(&mut self) -> Result<(), BusError> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_error_while_receiving_does_not_end_the_worker() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "{}").await;
    let recorder = Recorder::new(Duration::ZERO);
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        Arc::new(Hiccup { inner: bus.clone() }),
        config("jobs"),
        recorder.clone(),
        shutdown.clone(),
    ));
    eventually("the message is handled after the error", || {
        recorder.completed.load(Ordering::SeqCst) == 1
    })
    .await;
    let report = stop(shutdown, worker).await;
    assert_eq!(report.succeeded, 1);
}

/// A bus whose deliveries lose their first ack, as when the connection drops between the copy to
/// `.rejected` and the ack: the message comes straight back.
struct LossyAcks {
    inner: MemoryBus,
    acks_to_lose: Arc<AtomicU32>,
}

struct LossySubscription {
    inner: Box<dyn Subscription>,
    acks_to_lose: Arc<AtomicU32>,
}

struct LossySettle {
    inner: Mutex<Option<Delivery>>,
    acks_to_lose: Arc<AtomicU32>,
}

impl LossySettle {
    fn take(&self) -> Option<Delivery> {
        self.inner.lock().unwrap().take()
    }
}

#[async_trait]
impl Settle for LossySettle {
    async fn ack(&self) -> Result<(), BusError> {
        let lose = self
            .acks_to_lose
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let Some(delivery) = self.take() else {
            return Err(BusError::Closed);
        };
        if lose {
            // Dropped unsettled: the memory bus hands it back at once.
            drop(delivery);
            return Err(BusError::Backend {
                backend: "lossy",
                message: "connection reset before the ack".into(),
            });
        }
        delivery.ack().await
    }
    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        match self.take() {
            Some(d) => d.nack(delay).await,
            None => Err(BusError::Closed),
        }
    }
    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        let delivery = self
            .inner
            .lock()
            .unwrap()
            .as_ref()
            .map(|d| d.lease_keeper());
        match delivery {
            Some(keeper) => keeper.extend(lease).await,
            None => Err(BusError::Closed),
        }
    }
    fn abandon(&self) {
        drop(self.take());
    }
}

#[async_trait]
impl Bus for LossyAcks {
    fn name(&self) -> &'static str {
        "lossy"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        self.inner.create_topic(topic, group).await
    }
    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        self.inner.publish(topic, message).await
    }
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(LossySubscription {
            inner: self.inner.subscribe(topic, options).await?,
            acks_to_lose: self.acks_to_lose.clone(),
        }))
    }
    async fn flush(&self) -> Result<(), BusError> {
        self.inner.flush().await
    }
}

#[async_trait]
impl Subscription for LossySubscription {
    async fn next(&mut self) -> Result<Delivery, BusError> {
        let d = self.inner.next().await?;
        let (id, body, attributes, attempt) = (
            d.message_id.clone(),
            d.body.clone(),
            d.attributes.clone(),
            d.attempt,
        );
        Ok(Delivery::new(
            id,
            body,
            attributes,
            attempt,
            Arc::new(LossySettle {
                inner: Mutex::new(Some(d)),
                acks_to_lose: self.acks_to_lose.clone(),
            }),
        ))
    }
    async fn close(&mut self) -> Result<(), BusError> {
        self.inner.close().await
    }
}

/// Refuses everything as malformed.
struct RefuseAll {
    calls: AtomicUsize,
}

#[async_trait]
impl Handler for RefuseAll {
    async fn handle(&self, _task: &Task) -> Result<(), TaskError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(TaskError::Permanent("malformed".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_whose_ack_was_lost_is_not_copied_again() {
    let bus = MemoryBus::new();
    bus.create_topic("jobs.rejected", Some("inspect"))
        .await
        .unwrap();
    publish(&bus, "jobs", "garbage").await;
    let handler = Arc::new(RefuseAll {
        calls: AtomicUsize::new(0),
    });
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        Arc::new(LossyAcks {
            inner: bus.clone(),
            acks_to_lose: Arc::new(AtomicU32::new(1)),
        }),
        config("jobs"),
        handler.clone(),
        shutdown.clone(),
    ));
    eventually(
        "the message came back after the lost ack and was settled",
        || handler.calls.load(Ordering::SeqCst) == 2,
    )
    .await;
    let report = stop(shutdown, worker).await;
    assert_eq!(report.rejected, 2, "{report:?}");
    let mut sub = bus
        .subscribe("jobs.rejected", SubscribeOptions::new("inspect"))
        .await
        .unwrap();
    let mut copies = 0;
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        copies += 1;
        d.ack().await.unwrap();
    }
    assert_eq!(copies, 1, "one copy on jobs.rejected");
    // And nothing is left on the original topic.
    let mut original = bus
        .subscribe("jobs", SubscribeOptions::new("workers"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), original.next())
            .await
            .is_err(),
        "the original was settled"
    );
}

/// A bus whose copies to `.rejected` and `.dead` can never be published.
struct NoSideTopics {
    inner: MemoryBus,
}

#[async_trait]
impl Bus for NoSideTopics {
    fn name(&self) -> &'static str {
        "no-side-topics"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        self.inner.create_topic(topic, group).await
    }
    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        if topic.ends_with(".rejected") || topic.ends_with(".dead") {
            return Err(BusError::Backend {
                backend: "no-side-topics",
                message: "message too large".into(),
            });
        }
        self.inner.publish(topic, message).await
    }
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.inner.subscribe(topic, options).await
    }
    async fn flush(&self) -> Result<(), BusError> {
        self.inner.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_moved_aside_is_settled_after_its_attempts() {
    let bus = MemoryBus::new();
    publish(&bus, "jobs", "garbage").await;
    publish(&bus, "jobs", "{}").await;
    let handler = Arc::new(RefuseAll {
        calls: AtomicUsize::new(0),
    });
    let (shutdown, worker) = {
        let shutdown = Shutdown::new();
        let worker = tokio::spawn(run_worker(
            Arc::new(NoSideTopics { inner: bus.clone() }),
            config("jobs"),
            handler.clone(),
            shutdown.clone(),
        ));
        (shutdown, worker)
    };
    // config(): max_attempts 3, so each message is tried three times and then settled.
    eventually("both messages used up their attempts", || {
        handler.calls.load(Ordering::SeqCst) == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = stop(shutdown, worker).await;
    assert_eq!(handler.calls.load(Ordering::SeqCst), 6, "no endless loop");
    assert_eq!((report.unmovable, report.retried), (2, 4), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_s_counters_are_current_when_scraped() {
    let handle = millrace_runtime::health::metrics_handle().expect("recorder installed");
    let bus = MemoryBus::new();
    publish(&bus, "idle-metrics", "{}").await;
    let recorder = Recorder::new(Duration::ZERO);
    let (shutdown, worker) = start(&bus, config("idle-metrics"), recorder.clone());
    eventually("the message is handled", || {
        recorder.completed.load(Ordering::SeqCst) == 1
    })
    .await;
    // The worker now waits for a message that never comes; the scrape must already show it.
    let wanted = r#"millrace_tasks_total{topic="idle-metrics",outcome="succeeded"} 1"#;
    eventually("the scrape shows the task", || {
        handle.render().contains(wanted)
    })
    .await;
    stop(shutdown, worker).await;
}
