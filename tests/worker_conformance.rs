//! The worker-level conformance suite (`millrace_runtime::conformance`: dead letters after
//! max_attempts, permanent errors rejected at once, the concurrency limit, graceful shutdown) on
//! every bus backend: the in-memory bus, RabbitMQ and NATS on this machine, and Kafka (tansu) at
//! `MILLRACE_TEST_KAFKA`, which `make test` starts (or, without it, the test). SNS/SQS and
//! Pub/Sub run the same suite in `tests/worker_conformance_cloud.rs` (a process of their own, so
//! the Kafka group timings here are not measured beside the emulator clients' background tasks).

#[path = "support/local_services.rs"]
mod local_services;

use std::sync::Arc;

use millrace_bus::memory::MemoryBus;
use millrace_bus::Bus;
use millrace_runtime::conformance;

/// One backend at a time: the suites time real brokers, and four at once on two cores would
/// measure the machine instead.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prefix(backend: &str) -> String {
    format!(
        "wc-{backend}-{}-{}",
        std::process::id(),
        rand::random::<u32>() % 100_000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bus_passes_the_worker_conformance_suite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    conformance::run_all(Arc::new(MemoryBus::new()), &prefix("memory")).await;
}

/// Deletes the suite's AMQP topology (exchanges, backlog and group queues) for `prefix`.
async fn amqp_cleanup(bus: &millrace_bus::amqp::AmqpBus, prefix: &str) {
    for case in ["dl", "rj", "cc", "sd"] {
        let topic = format!("{prefix}.{case}");
        let _ = bus.delete_topic(&topic, &["conformance-workers"]).await;
        for side in [format!("{topic}.dead"), format!("{topic}.rejected")] {
            let _ = bus.delete_topic(&side, &["conformance-inspect"]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_passes_the_worker_conformance_suite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url = std::env::var("MILLRACE_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let amqp = Arc::new(
        millrace_bus::amqp::AmqpBus::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {url}: {e}")),
    );
    let bus: Arc<dyn Bus> = amqp.clone();
    let p = prefix("amqp");
    let run = tokio::spawn({
        let (bus, p) = (bus.clone(), p.clone());
        async move { conformance::run_all(bus, &p).await }
    });
    let result = run.await;
    amqp_cleanup(&amqp, &p).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_passes_the_worker_conformance_suite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url =
        std::env::var("MILLRACE_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
    let nats = Arc::new(
        millrace_bus::nats::NatsBus::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("NATS at {url}: {e}")),
    );
    let p = prefix("nats");
    let run = tokio::spawn({
        let (bus, p): (Arc<dyn Bus>, String) = (nats.clone(), p.clone());
        async move { conformance::run_all(bus, &p).await }
    });
    let result = run.await;
    let _ = nats.delete_topics_under(&p).await;
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// The log of the Kafka backend and the worker loop, kept in memory and printed only when the
/// Kafka suite fails: its shutdown case has timed out in full runs without saying why (the group
/// moves it waits for are only visible in this log).
#[derive(Clone, Default)]
struct KeptLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for KeptLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for KeptLog {
    type Writer = KeptLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl KeptLog {
    /// Installs the process-wide subscriber (this test binary installs no other).
    fn install() -> KeptLog {
        let log = KeptLog::default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "millrace_bus::kafka=debug,millrace_runtime=info",
            ))
            .with_ansi(false)
            .with_writer(log.clone())
            .try_init();
        log
    }

    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_passes_the_worker_conformance_suite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let log = KeptLog::install();
    // tansu (started by `make test`, memory storage) forgets everything when it stops, so there
    // is nothing to clean up afterwards.
    let addr = local_services::address(&local_services::KAFKA);
    let url = format!("kafka://{addr}");
    let bus: Arc<dyn Bus> = millrace_bus::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("Kafka at {url}: {e}"));
    let prefix = prefix("kafka");
    let result = tokio::spawn(async move { conformance::run_all(bus, &prefix).await }).await;
    if let Err(e) = result {
        eprintln!(
            "--- the Kafka backend's and the worker loop's log ---\n{}",
            log.text()
        );
        std::panic::resume_unwind(e.into_panic());
    }
}
