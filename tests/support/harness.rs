//! The pipeline's services on the embedded backends (in-memory bus, in-memory stores), each step
//! driven directly: shared by the tests that prove behaviour across services.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use millrace::demo::past_span;
use millrace::ingest::{ingest, Expectations, IngestPlan};
use millrace_aggregate_worker::AggregateWorker;
use millrace_bus::memory::MemoryBus;
use millrace_bus::{Bus, SubscribeOptions};
use millrace_intake_worker::IntakeWorker;
use millrace_mill::Mill;
use millrace_protocol::config::Config;
use millrace_protocol::layout::parse_ingestion_key;
use millrace_protocol::tasks::{topics, AggregateTask, IntakeTask, SumPartReady, TaskMessage};
use millrace_store::Store;
use millrace_workflow_manager::{Settings, WorkflowManager};

pub const PREFIX: &str = "t";

pub struct Harness {
    pub _dir: tempfile::TempDir,
    pub config: Arc<Config>,
    pub stores: [Store; 2],
    pub collector: Store,
    pub bus: Arc<MemoryBus>,
    pub expectations: Expectations,
}

pub async fn harness(reports: usize, invalid_fraction: f64, batch_size: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = millrace::keygen::keygen(dir.path(), false).unwrap();
    let config = Arc::new(Config::load(&path).unwrap());
    let stores = [Store::memory(), Store::memory()];
    let (start, end) = past_span(chrono::Utc::now().timestamp());
    let expectations = ingest(
        &config,
        millrace::keygen::INGESTOR,
        [&stores[0], &stores[1]],
        &IngestPlan {
            reports,
            invalid_fraction,
            batch_size,
            start,
            end,
        },
        |_| {},
    )
    .await
    .unwrap();
    Harness {
        _dir: dir,
        config,
        stores,
        collector: Store::memory(),
        bus: Arc::new(MemoryBus::new()),
        expectations,
    }
}

/// A harness whose facilitator stores hold no reports yet: the keys and config `keygen` writes
/// (in a fresh directory), `stores` as the facilitators' stores, a memory collector store and the
/// memory bus. For tests whose reports come in through an ingestor: pass the stores it writes to
/// (memory stores it shares, or `file://` stores opened on the same URLs as an ingestor process).
pub fn harness_on(stores: [Store; 2]) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let path = millrace::keygen::keygen(dir.path(), false).unwrap();
    let config = Arc::new(Config::load(&path).unwrap());
    Harness {
        _dir: dir,
        config,
        stores,
        collector: Store::memory(),
        bus: Arc::new(MemoryBus::new()),
        expectations: Expectations::default(),
    }
}

impl Harness {
    /// The config file `keygen` wrote, for a service started as its own process.
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("millrace.toml")
    }
    pub fn wm(&self, f: u8, instance: &str) -> WorkflowManager {
        self.wm_with(f, instance, Duration::from_secs(600), false)
    }
    pub fn wm_with(
        &self,
        f: u8,
        instance: &str,
        claim_timeout: Duration,
        dry_run: bool,
    ) -> WorkflowManager {
        WorkflowManager::new(
            self.config.clone(),
            self.stores[usize::from(f)].clone(),
            self.bus.clone(),
            Settings {
                facilitator: f,
                topic_prefix: PREFIX.to_string(),
                instance: instance.to_string(),
                claim_timeout,
                dry_run,
            },
        )
        .with_peer_store(self.stores[usize::from(1 - f)].clone())
    }
    pub fn intake(&self, f: u8) -> IntakeWorker {
        IntakeWorker::new(
            self.config.clone(),
            f,
            self.stores[usize::from(f)].clone(),
            self.stores[usize::from(1 - f)].clone(),
        )
        .unwrap()
    }
    pub fn aggregator(&self, f: u8) -> AggregateWorker {
        AggregateWorker::new(
            self.config.clone(),
            f,
            self.stores[usize::from(f)].clone(),
            self.collector.clone(),
            self.bus.clone(),
            PREFIX,
        )
        .unwrap()
    }
    /// The aggregation's digest (hex), as every party of the harness runs it.
    pub fn digest(&self, aggregation: &str) -> String {
        self.config
            .aggregation_digest(self.config.aggregation(aggregation).unwrap())
            .unwrap()
            .to_string()
    }
    pub fn mill(&self) -> Mill {
        Mill::new(
            self.config.clone(),
            self.collector.clone(),
            self.bus.clone(),
            PREFIX,
        )
        .unwrap()
    }
    pub async fn batch_count(&self) -> usize {
        let mut n = 0;
        for a in &self.config.aggregations {
            n += self.stores[0]
                .list(&format!("ingestion/{}/", a.id))
                .await
                .unwrap()
                .iter()
                .filter(|o| parse_ingestion_key(&a.id, &o.key).is_some())
                .count();
        }
        n
    }
    /// Every message waiting on `topic`, taken off the bus.
    pub async fn drain(&self, topic: &str) -> Vec<millrace_bus::Delivery> {
        let mut sub = self
            .bus
            .subscribe(topic, SubscribeOptions::new("test-drain"))
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            out.push(d);
        }
        out
    }
    /// Runs intake for every published intake task of both facilitators.
    pub async fn run_intake(&self) {
        self.validate_all(now()).await;
    }
    /// Validates every batch either store has that has not been validated yet (both sides),
    /// with each facilitator's workflow-manager pass at `now`.
    pub async fn validate_all(&self, now: i64) {
        for f in 0..2u8 {
            self.wm(f, &format!("wm-{f}")).run_once(now).await.unwrap();
            let worker = self.intake(f);
            for d in self.drain(&topics::intake(PREFIX, f)).await {
                let t = IntakeTask::from_json(&d.body).unwrap();
                worker.validate(&t).await.unwrap();
                d.ack().await.unwrap();
            }
        }
    }
    /// The leader's pass, then the helper's, at `now`; every aggregate task aggregated and every
    /// announcement joined by the mill. Returns the tasks, each with its facilitator.
    pub async fn complete(&self, now: i64) -> Vec<(u8, AggregateTask)> {
        let mut tasks = Vec::new();
        for f in 0..2u8 {
            self.wm(f, &format!("wm-{f}")).run_once(now).await.unwrap();
            for d in self.drain(&topics::aggregate(PREFIX, f)).await {
                tasks.push((f, AggregateTask::from_json(&d.body).unwrap()));
                d.ack().await.unwrap();
            }
        }
        for (f, t) in &tasks {
            self.aggregator(*f).aggregate(t).await.unwrap();
        }
        let mill = self.mill();
        for d in self.drain(&topics::collect(PREFIX)).await {
            mill.join(&SumPartReady::from_json(&d.body).unwrap())
                .await
                .unwrap();
            d.ack().await.unwrap();
        }
        tasks
    }
    /// Publishes the aggregate tasks of facilitator `f` and returns them.
    pub async fn aggregate_tasks(&self, f: u8) -> Vec<AggregateTask> {
        self.wm(f, "wm").run_once(now()).await.unwrap();
        let mut out = Vec::new();
        for d in self.drain(&topics::aggregate(PREFIX, f)).await {
            out.push(AggregateTask::from_json(&d.body).unwrap());
            d.ack().await.unwrap();
        }
        out
    }
    pub async fn snapshot(&self, store: &Store) -> Vec<(String, millrace_bus::Bytes)> {
        let mut out = Vec::new();
        for prefix in [
            "ingestion/",
            "validation/",
            "states/",
            "markers/",
            "sums/",
            "results/",
            "computations/",
        ] {
            for o in store.list(prefix).await.unwrap() {
                let b = store.get_required(&o.key).await.unwrap();
                out.push((o.key, b));
            }
        }
        out
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
