//! How a workflow-manager pass contains failures: a store error in one aggregation, a name that
//! is not a key, and a publish that fails. The workflow-manager reads only the names of
//! ingestion batches, so these tests write empty objects under ingestion keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use millrace_bus::memory::MemoryBus;
use millrace_bus::{Bus, BusError, Capabilities, Limits, Message, SubscribeOptions, Subscription};
use millrace_protocol::config::Config;
use millrace_protocol::layout::{ingestion_key, ingestion_prefix, Partition};
use millrace_protocol::tasks::{topics, IntakeTask, TaskMessage};
use millrace_runtime::health::Liveness;
use millrace_runtime::Shutdown;
use millrace_store::Store;
use millrace_workflow_manager::{FailureCause, PassIncomplete, Settings, WorkflowManager};

const PREFIX: &str = "t";
const CLAIM_TIMEOUT: Duration = Duration::from_secs(600);

fn config(aggregations: &[&str]) -> Arc<Config> {
    let mut text = r#"
version = 1

[[ingestor]]
name = "ing"
public_key = "PUB"

[[facilitator]]
index = 0
name = "alpha"
signing_public_key = "PUB"
hpke_public_key = "HPKE"

[[facilitator]]
index = 1
name = "beta"
signing_public_key = "PUB"
hpke_public_key = "HPKE"
"#
    .to_string();
    for id in aggregations {
        text.push_str(&format!(
            r#"
[[aggregation]]
id = "{id}"
vdaf = {{ type = "count" }}
window = "1h"
grace = "5m"
max_age = "1day"
min_reports = 1
verify_key = "env:UNUSED"
verify_key_id = "0011223344556677"
ingestors = ["ing"]
"#
        ));
    }
    Arc::new(Config::parse(&text, Path::new("test.toml"), Path::new(".")).unwrap())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The partition of an hour ago (a window still open, so no aggregate task gets in the way).
fn partition() -> Partition {
    Partition::of(now() - 3600)
}

/// Writes `n` ingestion batches of `agg`; returns their names.
async fn batches(store: &Store, agg: &str, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{agg}-batch-{i}");
        store
            .create(&ingestion_key(agg, partition(), &name), "x")
            .await
            .unwrap();
        names.push(name);
    }
    names
}

fn wm(config: Arc<Config>, store: &Store, bus: Arc<dyn Bus>, instance: &str) -> WorkflowManager {
    WorkflowManager::new(
        config,
        store.clone(),
        bus,
        Settings {
            facilitator: 0,
            topic_prefix: PREFIX.to_string(),
            instance: instance.to_string(),
            claim_timeout: CLAIM_TIMEOUT,
            dry_run: false,
        },
    )
}

/// The intake tasks on the bus: (aggregation, batch) → how many times.
async fn intake_tasks(bus: &MemoryBus) -> BTreeMap<(String, String), usize> {
    let mut sub = bus
        .subscribe(&topics::intake(PREFIX, 0), SubscribeOptions::new("test"))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        let t = IntakeTask::from_json(&d.body).unwrap();
        *out.entry((t.aggregation, t.batch)).or_insert(0) += 1;
        d.ack().await.unwrap();
    }
    out
}

fn once_each(agg: &str, names: &[String]) -> BTreeMap<(String, String), usize> {
    names
        .iter()
        .map(|b| ((agg.to_string(), b.clone()), 1))
        .collect()
}

fn file_store(dir: &tempfile::TempDir) -> (Store, std::path::PathBuf) {
    let root = dir.path().join("store");
    let store = Store::open(&format!("file://{}", root.display())).unwrap();
    (store, root)
}

#[tokio::test]
async fn a_store_failure_in_one_aggregation_does_not_stop_the_pass_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (store, root) = file_store(&dir);
    batches(&store, "first", 2).await;
    let second = batches(&store, "second", 3).await;
    // A symbolic link to itself cannot be listed (ELOOP): a real listing failure, unlike a bad
    // name, so the first aggregation's pass fails.
    std::os::unix::fs::symlink(
        "loop",
        root.join(ingestion_prefix("first", partition()))
            .join("loop"),
    )
    .unwrap();
    let bus = Arc::new(MemoryBus::new());
    let err = wm(config(&["first", "second"]), &store, bus.clone(), "wm")
        .run_once(now())
        .await
        .unwrap_err();
    let PassIncomplete { report } = &err;
    assert_eq!(report.failed_aggregations.len(), 1, "{err}");
    let failure = &report.failed_aggregations[0];
    assert_eq!(
        (failure.aggregation.as_str(), failure.cause),
        ("first", FailureCause::Store)
    );
    assert!(
        failure
            .error
            .contains(&ingestion_prefix("first", partition())),
        "the error names the prefix: {}",
        failure.error
    );
    assert!(report.not_reached.is_empty());
    assert_eq!(report.intake_published, second.len());
    assert_eq!(intake_tasks(&bus).await, once_each("second", &second));
}

#[tokio::test]
async fn a_name_that_is_not_utf8_is_skipped_and_the_pass_completes_for_every_aggregation() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let (store, root) = file_store(&dir);
    let first = batches(&store, "first", 2).await;
    let second = batches(&store, "second", 2).await;
    std::fs::write(
        root.join(ingestion_prefix("first", partition()))
            .join(std::ffi::OsStr::from_bytes(b"bad-\xff\xfe.batch")),
        "x",
    )
    .unwrap();
    // And a UTF-8 object that is not an ingestion batch: ignored, with a metric and a warning.
    store
        .create(
            &format!("{}not-a-batch.txt", ingestion_prefix("second", partition())),
            "x",
        )
        .await
        .unwrap();
    let bus = Arc::new(MemoryBus::new());
    let report = wm(config(&["first", "second"]), &store, bus.clone(), "wm")
        .run_once(now())
        .await
        .unwrap();
    assert_eq!(report.intake_published, first.len() + second.len());
    let mut expected = once_each("first", &first);
    expected.extend(once_each("second", &second));
    assert_eq!(intake_tasks(&bus).await, expected);
}

/// A bus whose first `fail` publishes fail, as a broker outage longer than the publish retry
/// would make them.
struct FlakyBus {
    inner: MemoryBus,
    fail: AtomicUsize,
}

impl FlakyBus {
    fn new(fail: usize) -> Self {
        FlakyBus {
            inner: MemoryBus::new(),
            fail: AtomicUsize::new(fail),
        }
    }
}

#[async_trait]
impl Bus for FlakyBus {
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
        let failing = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(BusError::Backend {
                backend: "flaky",
                message: format!("{topic}: broker unreachable (test)"),
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

/// The marker objects of intake tasks, for checking what the claims look like.
async fn claim_objects(store: &Store, agg: &str) -> Vec<String> {
    store
        .list(&format!("markers/{agg}/intake/"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.contains(".claim"))
        .collect()
}

async fn a_failed_publish_is_published_by_the_next_pass_of(next_instance: &str) {
    let store = Store::memory();
    let first = batches(&store, "first", 3).await;
    let second = batches(&store, "second", 2).await;
    let bus = Arc::new(FlakyBus::new(1));
    let config = config(&["first", "second"]);
    let started = Instant::now();
    let err = wm(config.clone(), &store, bus.clone(), "wm-1")
        .run_once(now())
        .await
        .unwrap_err();
    let PassIncomplete { report } = &err;
    assert!(report.bus_failed(), "{err}");
    assert_eq!(report.failed_aggregations[0].aggregation, "first");
    // The bus failed: the pass ended rather than wait out the same failure for every task.
    assert_eq!(report.not_reached, vec!["second".to_string()]);
    // The claim of the failed publish was given up (its next generation says so).
    assert!(claim_objects(&store, "first")
        .await
        .iter()
        .any(|k| k.ends_with(".claim.1")));

    let report = wm(config, &store, bus.clone(), next_instance)
        .run_once(now())
        .await
        .unwrap();
    assert_eq!(report.intake_published, first.len() + second.len());
    assert_eq!(report.skipped_by_marker, 0);
    assert!(
        started.elapsed() < CLAIM_TIMEOUT / 10,
        "no claim timeout was waited for"
    );
    let mut expected = once_each("first", &first);
    expected.extend(once_each("second", &second));
    assert_eq!(intake_tasks(&bus.inner).await, expected);
}

#[tokio::test]
async fn a_failed_publish_is_published_by_the_same_instance_on_its_next_pass() {
    a_failed_publish_is_published_by_the_next_pass_of("wm-1").await;
}

#[tokio::test]
async fn a_failed_publish_is_published_by_another_instance_without_waiting_for_the_claim_timeout() {
    // The next run of a `--once` CronJob is a new process, so a new instance name.
    a_failed_publish_is_published_by_the_next_pass_of("wm-2").await;
}

#[tokio::test]
async fn run_tries_again_soon_after_the_bus_ended_a_pass() {
    let store = Store::memory();
    let names = batches(&store, "only", 3).await;
    let bus = Arc::new(FlakyBus::new(2));
    let manager = wm(config(&["only"]), &store, bus.clone(), "wm")
        .retry_after_bus_failure(Duration::from_millis(200));
    let shutdown = Shutdown::new();
    let started = Instant::now();
    let looping = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { manager.run(Duration::from_secs(3600), shutdown).await })
    };
    // Two failed passes, then one that publishes everything: far sooner than the interval.
    let mut sub = bus
        .subscribe(&topics::intake(PREFIX, 0), SubscribeOptions::new("test"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < names.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("every task within 10 s, not after the 1 h interval")
            .unwrap();
        seen.push(IntakeTask::from_json(&d.body).unwrap().batch);
        d.ack().await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    shutdown.trigger();
    looping.await.unwrap();
    seen.sort();
    assert_eq!(seen, names);
}

/// A bus whose publishes never return, as a pass wedged on a broker would be.
struct HangingBus(MemoryBus);

#[async_trait]
impl Bus for HangingBus {
    fn name(&self) -> &'static str {
        "hanging"
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn limits(&self) -> Limits {
        self.0.limits()
    }
    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        self.0.create_topic(topic, group).await
    }
    async fn publish(&self, _topic: &str, _message: Message) -> Result<String, BusError> {
        std::future::pending().await
    }
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.0.subscribe(topic, options).await
    }
    async fn flush(&self) -> Result<(), BusError> {
        self.0.flush().await
    }
}

#[tokio::test]
async fn the_pass_loop_beats_between_passes_so_an_idle_manager_stays_alive() {
    let store = Store::memory();
    let manager = wm(config(&["only"]), &store, Arc::new(MemoryBus::new()), "wm");
    let timeout = Duration::from_secs(1);
    let liveness = Liveness::new(timeout);
    let shutdown = Shutdown::new();
    let looping = {
        let (shutdown, liveness) = (shutdown.clone(), liveness.clone());
        tokio::spawn(async move {
            manager
                .run_observed(Duration::from_secs(3600), shutdown, &liveness)
                .await
        })
    };
    // The one pass is over at once; for three timeouts the loop waits for the next.
    let end = Instant::now() + timeout * 3;
    while Instant::now() < end {
        assert_eq!(liveness.check(), Ok(()), "waiting between passes is alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.trigger();
    looping.await.unwrap();
}

#[tokio::test]
async fn a_pass_that_hangs_stops_the_heartbeat_and_fails_liveness() {
    let store = Store::memory();
    batches(&store, "only", 1).await;
    let manager = wm(
        config(&["only"]),
        &store,
        Arc::new(HangingBus(MemoryBus::new())),
        "wm",
    );
    let liveness = Liveness::new(Duration::from_secs(1));
    let shutdown = Shutdown::new();
    let looping = {
        let (shutdown, liveness) = (shutdown.clone(), liveness.clone());
        tokio::spawn(async move {
            manager
                .run_observed(Duration::from_secs(3600), shutdown, &liveness)
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let why = loop {
        if let Err(why) = liveness.check() {
            break why;
        }
        assert!(
            Instant::now() < deadline,
            "a pass hanging on its publish still looks alive after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(why.contains("no progress since"), "{why}");
    looping.abort();
}
