//! A config with fresh keys in a temporary directory, an ingestor serving it on a loopback port,
//! and the facilitators' intake-workers to check what it stored. Shared by the ingestor's and the
//! client library's tests (`#[path]`).
//!
//! Facilitator 0 (`alpha`) has two HPKE keys: 1, expired in 2021, and 2, active; facilitator 1
//! (`beta`) has key 5. Aggregation `clicks` (Count) and `spend` (Sum, at most 100) take reports
//! from ingestor `ing`: one-hour windows, grace 5 minutes, the default clock skew (5 minutes),
//! time precision 1 minute.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use millrace_ingestor::{serve, Ingestor, Settings};
use millrace_intake_worker::IntakeWorker;
use millrace_protocol::config::Config;
use millrace_protocol::crypto::{hpke_generate, Signer25519, VerifyKey};
use millrace_protocol::formats::IngestionBatch;
use millrace_protocol::layout::{parse_ingestion_key, Partition};
use millrace_protocol::tasks::{IntakeTask, INTAKE_TASK_VERSION};
use millrace_runtime::health::Readiness;
use millrace_runtime::Shutdown;
use millrace_store::Store;

pub const INGESTOR: &str = "ing";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: Arc<Config>,
}

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    std::fs::create_dir_all(dir.path().join("alpha")).unwrap();
    std::fs::create_dir_all(dir.path().join("beta")).unwrap();
    let ing = Signer25519::generate(INGESTOR);
    write("ing.key", &ing.to_hex());
    let mut facilitators = String::new();
    for (index, name, keys) in [
        (
            0,
            "alpha",
            vec![
                (
                    1u8,
                    "\nnot_before = \"2020-01-01T00:00:00Z\"\nexpires = \"2021-01-01T00:00:00Z\"",
                ),
                (2u8, ""),
            ],
        ),
        (1, "beta", vec![(5u8, "")]),
    ] {
        let signer = Signer25519::generate(name);
        write(&format!("{name}.sign"), &signer.to_hex());
        facilitators += &format!(
            "[[facilitator]]\nindex = {index}\nname = \"{name}\"\nsigning_public_key = \"{}\"\n\
             signing_key = \"file:{name}.sign\"\nprivate_key_dir = \"{name}\"\n\n",
            signer.public_hex()
        );
        for (id, validity) in keys {
            let (sk, pk) = hpke_generate();
            write(&format!("{name}/hpke-{id}.x25519"), &sk.to_hex());
            facilitators += &format!(
                "[[facilitator.hpke_keys]]\nid = {id}\npublic_key = \"{}\"{validity}\n\n",
                pk.to_hex()
            );
        }
    }
    write("clicks.vk", &VerifyKey::generate().to_hex());
    write("spend.vk", &VerifyKey::generate().to_hex());
    let text = format!(
        "version = 1\n\n[[ingestor]]\nname = \"{INGESTOR}\"\npublic_key = \"{}\"\n\
         private_key = \"file:ing.key\"\n\n{facilitators}\
         [[aggregation]]\nid = \"clicks\"\nvdaf = {{ type = \"count\" }}\nwindow = \"1h\"\n\
         grace = \"5m\"\nmax_age = \"1day\"\nmin_reports = 1\ntime_precision = \"1m\"\n\
         verify_key = \"file:clicks.vk\"\ningestors = [\"{INGESTOR}\"]\n\n\
         [[aggregation]]\nid = \"spend\"\nvdaf = {{ type = \"sum\", max_measurement = 100 }}\n\
         window = \"1h\"\ngrace = \"5m\"\nmax_age = \"1day\"\nmin_reports = 1\n\
         time_precision = \"1m\"\nverify_key = \"file:spend.vk\"\ningestors = [\"{INGESTOR}\"]\n",
        ing.public_hex()
    );
    write("millrace.toml", &text);
    let config = Arc::new(Config::load(&dir.path().join("millrace.toml")).unwrap());
    Fixture { dir, config }
}

/// A running ingestor.
pub struct Running {
    pub base: String,
    pub ingestor: Ingestor,
    pub shutdown: Shutdown,
    pub readiness: Readiness,
    pub served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Fixture {
    /// Serves an ingestor writing to `stores` on a loopback port.
    pub async fn start(&self, stores: [Store; 2], settings: Settings) -> Running {
        let ingestor = Ingestor::new(self.config.clone(), INGESTOR, stores, settings).unwrap();
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let readiness = Readiness::new();
        let served = tokio::spawn(serve(
            listener,
            ingestor.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
        Running {
            base,
            ingestor,
            shutdown,
            readiness,
            served,
        }
    }

    /// Every ingestion batch in `store` (key, batch), decoded with the ingestor's key.
    pub async fn batches(&self, store: &Store, aggregation: &str) -> Vec<(String, IngestionBatch)> {
        let keys = self.config.ingestor_keys().unwrap();
        let mut out = Vec::new();
        for object in store
            .list(&format!("ingestion/{aggregation}/"))
            .await
            .unwrap()
        {
            let bytes = store.get_required(&object.key).await.unwrap();
            let (batch, signer) = IngestionBatch::decode(&keys, &bytes).unwrap();
            assert_eq!(signer, INGESTOR);
            out.push((object.key, batch));
        }
        out
    }

    /// Runs both facilitators' intake-workers over every batch of `aggregation`; returns the
    /// number of reports each facilitator found valid, after checking that neither rejected a
    /// batch or marked a report invalid.
    pub async fn validate_all(&self, stores: &[Store; 2], aggregation: &str) -> [usize; 2] {
        let digest = self
            .config
            .aggregation_digest(self.config.aggregation(aggregation).unwrap())
            .unwrap()
            .to_string();
        let mut valid = [0, 0];
        for f in 0..2u8 {
            let worker = IntakeWorker::new(
                self.config.clone(),
                f,
                stores[usize::from(f)].clone(),
                stores[usize::from(1 - f)].clone(),
            )
            .unwrap();
            for object in stores[usize::from(f)]
                .list(&format!("ingestion/{aggregation}/"))
                .await
                .unwrap()
            {
                let (partition, batch) = parse_ingestion_key(aggregation, &object.key).unwrap();
                let task = IntakeTask {
                    version: INTAKE_TASK_VERSION,
                    aggregation: aggregation.to_string(),
                    aggregation_digest: digest.clone(),
                    batch,
                    partition: partition.path(),
                };
                let outcome = worker.validate(&task).await.unwrap();
                assert!(
                    !outcome.batch_rejected,
                    "facilitator {f} rejected {}: {:?}",
                    object.key, outcome.rejected_because
                );
                assert_eq!(
                    outcome.invalid, 0,
                    "facilitator {f}, {}: {:?}",
                    object.key, outcome.invalid_reasons
                );
                valid[usize::from(f)] += outcome.reports;
            }
        }
        valid
    }
}

/// The partition a batch is stored under must hold its signed time (the intake-worker's rule).
pub fn partition_of_key(aggregation: &str, key: &str) -> Partition {
    parse_ingestion_key(aggregation, key).unwrap().0
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
