//! `/metrics` (Prometheus text), `/healthz` and `/readyz` on `--metrics-addr`.
//!
//! * **`/readyz`** ([`Readiness`]) is 200 while the service takes work: it has started consuming
//!   (or serving), its bus connection is up ([`millrace_bus::Bus::connection`], for buses that
//!   hold one) and its subscription is not failing to receive. Otherwise 503, with a short body
//!   saying why (`bus connection lost: …`). It turns true again by itself once the bus has
//!   reconnected: readiness takes a pod out of rotation, it does not restart it.
//! * **`/healthz`** ([`Liveness`]) is 200 while the service's loop makes progress: the worker
//!   loop (or the workflow-manager's pass loop) beats at least every second, idle waits
//!   included, and `/healthz` turns 503 (saying since when) once the last beat is older than
//!   `--heartbeat-timeout`, or once one task has been running longer than `--stuck-task-after`.
//!   A failing liveness probe restarts the pod, so it only fails for a loop that is wedged, never
//!   for a broker outage (that is what readiness is for).
//!
//! Both are cheap: they read atomics and the bus's own view of its connection, never a broker.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use millrace_bus::{Bus, Connection};

use crate::Shutdown;

/// The default `--heartbeat-timeout`: far above the worker loop's one-second beat, and above a
/// slow workflow-manager pass.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The default `--stuck-task-after`: RabbitMQ's default `consumer_timeout`, after which the
/// broker itself would take the task away.
pub const DEFAULT_STUCK_TASK_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a loop beats while it waits (for a message, a free slot, the next pass).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Readiness: "started" (flipped by the service once it is consuming or serving), combined
/// with the live state of the bus (if one is watched) and of the worker loop's subscription.
#[derive(Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Default)]
struct ReadinessInner {
    started: AtomicBool,
    bus: OnceLock<Arc<dyn Bus>>,
    /// Set by the worker loop while its subscription keeps failing to receive.
    receive_failing: Mutex<Option<String>>,
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readiness")
            .field("started", &self.0.started.load(Ordering::Relaxed))
            .field("bus", &self.0.bus.get().map(|b| b.name()))
            .field("receive_failing", &*lock(&self.0.receive_failing))
            .finish()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Marks the service as started (consuming, serving) or stopped.
    pub fn set_ready(&self, ready: bool) {
        self.0.started.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200 now.
    pub fn is_ready(&self) -> bool {
        self.check().is_ok()
    }

    /// Makes readiness follow `bus`'s connection too ([`Bus::connection`]). The first bus given
    /// is the one watched.
    pub fn watch_bus(&self, bus: Arc<dyn Bus>) {
        let _ = self.0.bus.set(bus);
    }

    /// The worker loop's subscription keeps failing to receive (`why`), or (`None`) works again.
    pub fn set_receive_failing(&self, why: Option<String>) {
        *lock(&self.0.receive_failing) = why;
    }

    /// `Ok` if ready; otherwise why not, in a few words.
    pub fn check(&self) -> Result<(), String> {
        if !self.0.started.load(Ordering::Relaxed) {
            return Err("not started".to_string());
        }
        if let Some(bus) = self.0.bus.get() {
            if let Connection::Lost(why) = bus.connection() {
                return Err(format!("bus connection lost: {why}"));
            }
        }
        if let Some(why) = lock(&self.0.receive_failing).as_ref() {
            return Err(why.clone());
        }
        Ok(())
    }
}

/// Liveness: the heartbeat of the service's loop and the tasks it runs. Until the first beat
/// (a service still starting, one that has no loop, a one-shot pass) it is healthy.
#[derive(Clone)]
pub struct Liveness(Arc<LivenessInner>);

struct LivenessInner {
    /// The longest silence of the loop before `/healthz` fails.
    timeout: Duration,
    /// The longest one task may run before `/healthz` fails.
    stuck_after: Mutex<Duration>,
    /// The last beat: when (monotonic, to measure) and when (wall clock, to say).
    beat: Mutex<Option<(Instant, SystemTime)>>,
    /// The tasks running now, by a sequence number: when each started.
    tasks: Mutex<BTreeMap<u64, (Instant, SystemTime)>>,
    next_task: AtomicU64,
}

impl fmt::Debug for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Liveness")
            .field("timeout", &self.0.timeout)
            .field("stuck_after", &*lock(&self.0.stuck_after))
            .field("tasks", &lock(&self.0.tasks).len())
            .finish()
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new(DEFAULT_HEARTBEAT_TIMEOUT)
    }
}

impl Liveness {
    /// Fails once the loop has not beaten for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Liveness(Arc::new(LivenessInner {
            timeout,
            stuck_after: Mutex::new(DEFAULT_STUCK_TASK_AFTER),
            beat: Mutex::new(None),
            tasks: Mutex::new(BTreeMap::new()),
            next_task: AtomicU64::new(0),
        }))
    }

    /// A task running longer than `limit` counts as stuck.
    pub fn set_stuck_after(&self, limit: Duration) {
        *lock(&self.0.stuck_after) = limit;
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        self.beat_at(Instant::now(), SystemTime::now());
    }

    /// The loop was alive at `at` (`wall`: the same moment by the wall clock). For tests.
    pub fn beat_at(&self, at: Instant, wall: SystemTime) {
        *lock(&self.0.beat) = Some((at, wall));
    }

    /// A task starts; it counts as running until the guard is dropped.
    pub fn task_started(&self) -> TaskGuard {
        self.task_started_at(Instant::now(), SystemTime::now())
    }

    /// As [`Liveness::task_started`], as of `at`. For tests.
    pub fn task_started_at(&self, at: Instant, wall: SystemTime) -> TaskGuard {
        let id = self.0.next_task.fetch_add(1, Ordering::Relaxed);
        lock(&self.0.tasks).insert(id, (at, wall));
        TaskGuard {
            liveness: self.clone(),
            id,
        }
    }

    /// `Ok` if alive now; otherwise what is wrong and since when.
    pub fn check(&self) -> Result<(), String> {
        self.check_at(Instant::now())
    }

    /// As [`Liveness::check`], as of `now`.
    pub fn check_at(&self, now: Instant) -> Result<(), String> {
        if let Some((at, wall)) = *lock(&self.0.beat) {
            let silent = now.saturating_duration_since(at);
            if silent > self.0.timeout {
                return Err(format!(
                    "no progress since {} ({} ago; the limit is {}, --heartbeat-timeout)",
                    humantime::format_rfc3339_seconds(wall),
                    humantime::format_duration(whole_seconds(silent)),
                    humantime::format_duration(self.0.timeout),
                ));
            }
        }
        let stuck_after = *lock(&self.0.stuck_after);
        let oldest = lock(&self.0.tasks)
            .values()
            .min_by_key(|(at, _)| *at)
            .copied();
        if let Some((at, wall)) = oldest {
            let running = now.saturating_duration_since(at);
            if running > stuck_after {
                return Err(format!(
                    "a task has been running since {} ({}; the limit is {}, --stuck-task-after)",
                    humantime::format_rfc3339_seconds(wall),
                    humantime::format_duration(whole_seconds(running)),
                    humantime::format_duration(stuck_after),
                ));
            }
        }
        Ok(())
    }
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// A running task, as [`Liveness`] sees it; dropping it ends the task.
#[derive(Debug)]
pub struct TaskGuard {
    liveness: Liveness,
    id: u64,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        lock(&self.liveness.0.tasks).remove(&self.id);
    }
}

/// What the health endpoint reads: readiness for `/readyz`, liveness for `/healthz`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub readiness: Readiness,
    pub liveness: Liveness,
}

impl Health {
    pub fn new(readiness: Readiness, liveness: Liveness) -> Self {
        Health {
            readiness,
            liveness,
        }
    }
}

/// A service without a loop to watch (the ingestor): liveness never fails.
impl From<Readiness> for Health {
    fn from(readiness: Readiness) -> Self {
        Health {
            readiness,
            liveness: Liveness::default(),
        }
    }
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            // Lag is a histogram with the same explicit buckets everywhere (`crate::lag`).
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_lag_seconds".to_string()),
                    &crate::lag::BUCKETS,
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full("millrace_task_attempts".to_string()),
                        &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0],
                    )
                })
                .ok()
                .and_then(|builder| builder.install_recorder().ok())
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Option<PrometheusHandle>,
}

async fn metrics(State(state): State<AppState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(h) => {
            // Histograms are summarised lazily; bring them up to date so a scrape is current.
            h.run_upkeep();
            (StatusCode::OK, h.render())
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n".to_string(),
        ),
    }
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.liveness.check() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The router, separate from binding so tests can call it.
pub fn router(health: impl Into<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            health: health.into(),
            metrics: metrics_handle(),
        })
}

/// Binds `addr` and serves until `shutdown`. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    health: impl Into<Health>,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(health);
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use millrace_bus::{BusError, Capabilities, Limits, Message, SubscribeOptions, Subscription};

    /// A bus whose connection a test turns off and on; nothing else works.
    #[derive(Default)]
    struct Switch(AtomicBool);

    #[async_trait]
    impl Bus for Switch {
        fn name(&self) -> &'static str {
            "switch"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                native_delay: false,
                lease_extension: false,
                native_attempt_count: false,
                durable: false,
                multi_process: false,
            }
        }
        fn limits(&self) -> Limits {
            Limits {
                max_message_bytes: 1024,
                max_attributes: 10,
                max_attribute_value_bytes: 1024,
                max_attributes_bytes: 1024,
            }
        }
        fn connection(&self) -> Connection {
            if self.0.load(Ordering::Relaxed) {
                Connection::Lost("switched off".to_string())
            } else {
                Connection::Up
            }
        }
        async fn create_topic(&self, _: &str, _: Option<&str>) -> Result<(), BusError> {
            Ok(())
        }
        async fn publish(&self, _: &str, _: Message) -> Result<String, BusError> {
            Err(BusError::Closed)
        }
        async fn subscribe(
            &self,
            _: &str,
            _: SubscribeOptions,
        ) -> Result<Box<dyn Subscription>, BusError> {
            Err(BusError::Closed)
        }
        async fn flush(&self) -> Result<(), BusError> {
            Ok(())
        }
    }

    /// Serves `health` on a loopback port; `get` asks it over real HTTP.
    struct Endpoint {
        addr: SocketAddr,
        shutdown: Shutdown,
    }

    impl Endpoint {
        async fn start(health: impl Into<Health>) -> Endpoint {
            let shutdown = Shutdown::new();
            let addr = serve(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                health,
                shutdown.clone(),
            )
            .await
            .expect("bind a loopback port");
            Endpoint { addr, shutdown }
        }

        async fn get(&self, path: &str) -> (u16, String) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .expect("connect to the health endpoint");
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
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
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (status, body)
        }
    }

    impl Drop for Endpoint {
        fn drop(&mut self) {
            self.shutdown.trigger();
        }
    }

    #[tokio::test]
    async fn stale_heartbeat_fails_healthz_and_says_since_when() {
        let liveness = Liveness::new(Duration::from_secs(30));
        let health = Health::new(Readiness::new(), liveness.clone());
        let endpoint = Endpoint::start(health).await;

        // No loop yet: alive.
        assert_eq!(endpoint.get("/healthz").await.0, 200);

        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let old = now.checked_sub(Duration::from_secs(90)).expect("uptime");
        liveness.beat_at(old, wall);
        let (status, body) = endpoint.get("/healthz").await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("no progress since 2027-01-15T08:00:00Z"),
            "{body}"
        );
        assert!(body.contains("--heartbeat-timeout"), "{body}");

        liveness.beat();
        let (status, body) = endpoint.get("/healthz").await;
        assert_eq!(status, 200, "{body}");
    }

    #[test]
    fn heartbeat_within_the_limit_is_alive_and_past_it_is_not() {
        let liveness = Liveness::new(Duration::from_secs(30));
        let start = Instant::now();
        liveness.beat_at(start, SystemTime::now());
        assert_eq!(liveness.check_at(start + Duration::from_secs(30)), Ok(()));
        assert!(liveness.check_at(start + Duration::from_secs(31)).is_err());
    }

    #[test]
    fn a_task_running_past_the_stuck_limit_fails_liveness_until_it_ends() {
        let liveness = Liveness::new(Duration::from_secs(30));
        liveness.set_stuck_after(Duration::from_secs(600));
        let start = Instant::now();
        liveness.beat_at(start, SystemTime::now());
        let task = liveness.task_started_at(start, SystemTime::UNIX_EPOCH);
        let later = start + Duration::from_secs(601);
        // The loop itself still beats; the task does not end.
        liveness.beat_at(later, SystemTime::now());
        let why = liveness.check_at(later).expect_err("a stuck task");
        assert!(why.contains("running since 1970-01-01T00:00:00Z"), "{why}");
        assert!(why.contains("--stuck-task-after"), "{why}");
        drop(task);
        assert_eq!(liveness.check_at(later), Ok(()));
    }

    #[tokio::test]
    async fn lost_bus_connection_fails_readyz_and_reconnecting_restores_it() {
        let bus = Arc::new(Switch::default());
        let readiness = Readiness::new();
        readiness.watch_bus(bus.clone());
        let endpoint = Endpoint::start(readiness.clone()).await;

        let (status, body) = endpoint.get("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("not started"), "{body}");

        readiness.set_ready(true);
        assert_eq!(endpoint.get("/readyz").await.0, 200);

        bus.0.store(true, Ordering::Relaxed);
        let (status, body) = endpoint.get("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("bus connection lost: switched off"), "{body}");

        bus.0.store(false, Ordering::Relaxed);
        assert_eq!(endpoint.get("/readyz").await.0, 200);
    }

    #[tokio::test]
    async fn a_failing_subscription_fails_readyz_until_it_receives_again() {
        let readiness = Readiness::new();
        readiness.set_ready(true);
        let endpoint = Endpoint::start(readiness.clone()).await;
        readiness.set_receive_failing(Some("receiving from t failed 3 times".to_string()));
        let (status, body) = endpoint.get("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("receiving from t failed"), "{body}");
        readiness.set_receive_failing(None);
        assert_eq!(endpoint.get("/readyz").await.0, 200);
    }
}
