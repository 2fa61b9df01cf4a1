//! Reports that clients upload through the ingestor's HTTP API, with the client library, carried
//! through the whole pipeline (tests/support/harness.rs, each step driven directly): every report a
//! client was answered 201 for is in its window's result exactly once. The ingestor runs in
//! process, or as its own binary killed with SIGKILL mid-upload and restarted, or as two replicas
//! on the same stores that both get some reports.
//!
//! Every report is sealed with one time taken at the start of the test, so all of a test's reports
//! are in one window whatever the clock does meanwhile. The pipeline is driven at a chosen `now`
//! past that window's grace and peer deadline; no assertion depends on how long anything took.

#[path = "support/harness.rs"]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use harness::{harness_on, now, Harness};
use millrace_client::{Client, ClientSettings, Receipt};
use millrace_ingestor::{serve, Ingestor, Settings};
use millrace_protocol::layout::{result_key, Window};
use millrace_protocol::results::{AggregationResult, BatchExclusion};
use millrace_protocol::upload::UploadReport;
use millrace_protocol::vdaf::{AggregateValue, Measurement, VdafSpec};
use millrace_runtime::health::Readiness;
use millrace_runtime::Shutdown;
use millrace_store::Store;
use tokio::sync::watch;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Retries that outlast an ingestor restart: many tries, short delays.
fn patient() -> ClientSettings {
    ClientSettings {
        attempts: 200,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        request_timeout: Duration::from_secs(20),
        ..ClientSettings::default()
    }
}

/// Small batches, closed by size or after 100 ms: a window gets several batches.
fn small_batches() -> Settings {
    Settings {
        max_batch_reports: 5,
        max_batch_age: Duration::from_millis(100),
        ..Settings::default()
    }
}

/// An ingestor served in process on a loopback port.
struct InProcess {
    base: String,
    shutdown: Shutdown,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// The harness's ingestor, writing to the harness's facilitator stores.
    async fn start(h: &Harness, settings: Settings) -> InProcess {
        let ingestor = Ingestor::new(
            h.config.clone(),
            millrace::keygen::INGESTOR,
            h.stores.clone(),
            settings,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let served = tokio::spawn(serve(
            listener,
            ingestor,
            Readiness::new(),
            shutdown.clone(),
        ));
        InProcess {
            base,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.served.await.unwrap().unwrap();
    }
}

/// The window every report sealed at `t0` is in (all aggregations of `keygen` share the window
/// length), and a `now` at which it is closed past its grace and past the peer deadline of any
/// batch only one facilitator has.
fn window_and_settled(h: &Harness, t0: i64) -> (Window, i64) {
    let a = &h.config.aggregations[0];
    let window = Window::containing(t0, a.window_secs);
    let mut settled = window.end;
    for a in &h.config.aggregations {
        assert_eq!(a.window_secs, h.config.aggregations[0].window_secs);
        let after = (a.grace + a.peer_deadline).as_secs() as i64 + 60;
        settled = settled.max(window.end + after);
    }
    (window, settled)
}

/// Validates every batch on both sides, decides the window and joins its parts, at `now`.
async fn run_pipeline(h: &Harness, now: i64) {
    h.validate_all(now).await;
    h.complete(now).await;
}

/// The result of `aggregation`'s `window`; panics naming what the collector has instead.
async fn result(h: &Harness, aggregation: &str, window: Window) -> AggregationResult {
    match h
        .collector
        .get(&result_key(aggregation, window))
        .await
        .unwrap()
    {
        Some(bytes) => AggregationResult::from_json(&bytes).unwrap(),
        None => {
            let mut held = String::new();
            for o in h.collector.list("computations/").await.unwrap() {
                let bytes = h.collector.get_required(&o.key).await.unwrap();
                held += &format!("\n{}: {}", o.key, String::from_utf8_lossy(&bytes));
            }
            panic!(
                "{aggregation}/{}: no result; the collector's computations:{held}",
                window.name()
            )
        }
    }
}

/// The result keys the collector holds.
async fn result_keys(h: &Harness) -> BTreeSet<String> {
    h.collector
        .list("results/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// The aggregate of `measurements` under `spec`, added up here in plain integers.
fn plaintext(spec: &VdafSpec, measurements: &[Measurement]) -> AggregateValue {
    match spec {
        VdafSpec::Count {} => AggregateValue::Scalar(
            measurements
                .iter()
                .filter(|m| **m == Measurement::Count(true))
                .count() as u64,
        ),
        VdafSpec::Sum { .. } => AggregateValue::Scalar(
            measurements
                .iter()
                .map(|m| match m {
                    Measurement::Sum(x) => *x,
                    other => panic!("{other:?} in a Sum"),
                })
                .sum(),
        ),
        VdafSpec::Histogram { length, .. } => {
            let mut buckets = vec![0u64; *length];
            for m in measurements {
                match m {
                    Measurement::Histogram(i) => buckets[*i] += 1,
                    other => panic!("{other:?} in a Histogram"),
                }
            }
            AggregateValue::Vector(buckets)
        }
        VdafSpec::SumVec { length, .. } => {
            let mut sums = vec![0u64; *length];
            for m in measurements {
                match m {
                    Measurement::SumVec(xs) => {
                        for (s, x) in sums.iter_mut().zip(xs) {
                            *s += *x;
                        }
                    }
                    other => panic!("{other:?} in a SumVec"),
                }
            }
            AggregateValue::Vector(sums)
        }
    }
}

fn spec(h: &Harness, aggregation: &str) -> VdafSpec {
    h.config
        .aggregation(aggregation)
        .unwrap()
        .vdaf
        .spec()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_uploaded_through_the_ingestor_give_the_exact_plaintext_result() {
    let h = harness_on([Store::memory(), Store::memory()]);
    let ingestor = InProcess::start(&h, small_batches()).await;
    let client = Client::with_settings(&ingestor.base, patient()).unwrap();
    let t0 = now();
    // Each VDAF type; each aggregation above its minimum of 10 reports, with a count that no
    // batch size divides evenly.
    let plan: Vec<(&str, Vec<Measurement>)> = vec![
        (
            "clicks",
            (0..13).map(|i| Measurement::Count(i % 3 != 0)).collect(),
        ),
        (
            "spend",
            (0..12u64)
                .map(|i| Measurement::Sum(i * 83 % 1001))
                .collect(),
        ),
        (
            "latency",
            (0..14)
                .map(|i| Measurement::Histogram(i * 7 % 10))
                .collect(),
        ),
        (
            "features",
            (0..11u64)
                .map(|i| Measurement::SumVec((0..8).map(|j| (i + 2 * j) % 16).collect()))
                .collect(),
        ),
    ];
    let mut uploads = Vec::new();
    for (aggregation, measurements) in &plan {
        let config = client.aggregation(aggregation).await.unwrap();
        for m in measurements {
            uploads.push((*aggregation, config.seal(m, t0).unwrap()));
        }
    }
    let receipts = join_all(uploads.iter().map(|(a, r)| client.upload(a, r))).await;
    for ((aggregation, _), receipt) in uploads.iter().zip(receipts) {
        let receipt = receipt.unwrap_or_else(|e| panic!("{aggregation}: {e}"));
        assert_eq!(
            receipt,
            Receipt {
                reports: 1,
                duplicates: 0
            }
        );
    }
    ingestor.stop().await;
    assert!(
        h.batch_count().await > plan.len(),
        "each window should have several batches"
    );

    let (window, settled) = window_and_settled(&h, t0);
    run_pipeline(&h, settled).await;
    for (aggregation, measurements) in &plan {
        let r = result(&h, aggregation, window).await;
        assert_eq!(
            r.result,
            plaintext(&spec(&h, aggregation), measurements),
            "{aggregation}"
        );
        assert_eq!(
            (r.report_count, r.invalid_count),
            (measurements.len() as u64, 0),
            "{aggregation}: {:?}",
            r.invalid_reasons
        );
    }
    let expected: BTreeSet<String> = plan.iter().map(|(a, _)| result_key(a, window)).collect();
    assert_eq!(result_keys(&h).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_the_same_stores_count_each_report_once() {
    let h = harness_on([Store::memory(), Store::memory()]);
    let replicas = [
        InProcess::start(&h, small_batches()).await,
        InProcess::start(&h, small_batches()).await,
    ];
    let clients = [0, 1].map(|i| Client::with_settings(&replicas[i].base, patient()).unwrap());
    let aggregation = "latency";
    let config = clients[0].aggregation(aggregation).await.unwrap();
    assert_eq!(
        clients[1].aggregation(aggregation).await.unwrap().document,
        config.document,
        "both replicas should describe the same keys"
    );
    let t0 = now();
    let measurements: Vec<Measurement> = (0..30).map(|i| Measurement::Histogram(i % 7)).collect();
    let reports: Vec<UploadReport> = measurements
        .iter()
        .map(|m| config.seal(m, t0).unwrap())
        .collect();
    // Report i goes to replica i % 2. Every fifth also goes to the other replica (a client that
    // got no answer from one and tried the other); report 1 goes to its replica twice.
    let mut sends: Vec<(usize, usize)> = (0..reports.len()).map(|i| (i, i % 2)).collect();
    let both: Vec<usize> = (0..reports.len()).step_by(5).collect();
    sends.extend(both.iter().map(|&i| (i, 1 - i % 2)));
    sends.push((1, 1));
    let receipts = join_all(
        sends
            .iter()
            .map(|&(i, replica)| clients[replica].upload(aggregation, &reports[i])),
    )
    .await;
    let mut duplicates_of_report_1 = 0;
    for (&(i, replica), receipt) in sends.iter().zip(receipts) {
        let receipt = receipt.unwrap_or_else(|e| panic!("report {i} to replica {replica}: {e}"));
        assert_eq!(receipt.reports, 1);
        if i == 1 {
            duplicates_of_report_1 += receipt.duplicates;
        } else {
            // A replica knows only the reports sent to it.
            assert_eq!(receipt.duplicates, 0, "report {i} to replica {replica}");
        }
    }
    // The same replica twice: acknowledged both times, stored once.
    assert_eq!(duplicates_of_report_1, 1);
    for replica in replicas {
        replica.stop().await;
    }

    let (window, settled) = window_and_settled(&h, t0);
    run_pipeline(&h, settled).await;
    let r = result(&h, aggregation, window).await;
    assert_eq!(r.result, plaintext(&spec(&h, aggregation), &measurements));
    assert_eq!(r.report_count, reports.len() as u64);
    // Each report both replicas stored is in two batches: the second copy is dropped as replayed.
    assert_eq!(r.invalid_count, both.len() as u64);
    assert_eq!(
        r.invalid_reasons,
        BTreeMap::from([("replayed".to_string(), both.len() as u64)])
    );
    assert_eq!(
        result_keys(&h).await,
        BTreeSet::from([result_key(aggregation, window)])
    );
}

/// A service binary built beside the `millrace` binary (`cargo build --workspace --bins`, which
/// `make test` runs first).
fn bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_millrace"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first (`cargo build --workspace --bins`, \
         which `make test` does)",
        path.display()
    );
    path
}

/// The `ingestor` binary, killed when dropped.
struct IngestorProcess {
    child: Child,
    log: PathBuf,
}

impl IngestorProcess {
    /// Starts the harness's ingestor on `listen`, writing to the stores at `stores`, logging to
    /// `log`; returns once it accepts connections.
    async fn start(h: &Harness, stores: &[String; 2], listen: SocketAddr, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("ingestor"))
            .arg("--config")
            .arg(h.config_path())
            .args(["--ingestor", millrace::keygen::INGESTOR])
            .args(["--store0", &stores[0], "--store1", &stores[1]])
            .args(["--listen", &listen.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0"])
            // Batches close at 3 reports or 200 ms: many small batches, so a kill is likely to
            // land between the two copies of one, or after both and before the 201s.
            .args(["--max-batch-reports", "3", "--max-batch-age", "200ms"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("starting the ingestor: {e}"));
        let mut process = IngestorProcess { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!(
                    "the ingestor exited ({status}) before listening:\n{}",
                    process.log_text()
                );
            }
            if tokio::net::TcpStream::connect(listen).await.is_ok() {
                return process;
            }
            assert!(
                Instant::now() < deadline,
                "the ingestor did not listen on {listen} within 60 s:\n{}",
                process.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and waits for the process to be gone (its port closed).
    fn kill(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the ingestor should have died of SIGKILL ({status}):\n{}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for IngestorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address nothing listens on right now.
fn free_loopback_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Counts the client library's "retrying" events (one per failed try it is about to repeat).
struct CountRetries(Arc<watch::Sender<usize>>);

impl<S: tracing::Subscriber> Layer<S> for CountRetries {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(Option<String>);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        if !event.metadata().target().starts_with("millrace_client") {
            return;
        }
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some("retrying") {
            self.0.send_modify(|n| *n += 1);
        }
    }
}

/// One report as a client task saw it.
struct Delivered {
    report: UploadReport,
    value: u64,
    /// Answered 201 before the first ingestor was killed.
    before_kill: bool,
}

// A current-thread runtime: every client task runs on this thread, where the retry counter is
// the tracing subscriber.
#[tokio::test]
async fn reports_uploaded_while_the_ingestor_is_killed_and_restarted_are_counted_once() {
    let (retries_tx, mut retries) = watch::channel(0usize);
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(CountRetries(Arc::new(retries_tx))),
    );
    let dir = tempfile::tempdir().unwrap();
    let urls =
        [0, 1].map(|f| format!("file://{}", dir.path().join(format!("store-{f}")).display()));
    let h = harness_on([
        Store::open(&urls[0]).unwrap(),
        Store::open(&urls[1]).unwrap(),
    ]);
    let listen = free_loopback_addr();
    let mut first =
        IngestorProcess::start(&h, &urls, listen, dir.path().join("ingestor-1.log")).await;
    let client = Arc::new(Client::with_settings(&format!("http://{listen}"), patient()).unwrap());
    let aggregation = "spend";
    let config = client.aggregation(aggregation).await.unwrap();
    let t0 = now();

    // Eight clients, each uploading its eight reports one after another.
    const CLIENTS: usize = 8;
    const EACH: usize = 8;
    const TOTAL: usize = CLIENTS * EACH;
    let (acked_tx, mut acked) = watch::channel(0usize);
    let acked_tx = Arc::new(acked_tx);
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut reports = Vec::new();
        for k in 0..EACH {
            let value = ((c * EACH + k) * 157 % 1001) as u64;
            let report = config.seal(&Measurement::Sum(value), t0).unwrap();
            reports.push((report, value));
        }
        let (client, acked_tx, killed) = (client.clone(), acked_tx.clone(), killed.clone());
        tasks.push(tokio::spawn(async move {
            let mut delivered = Vec::new();
            for (report, value) in reports {
                // The client retries until the ingestor answers 201, however long it is away.
                if let Err(e) = client.upload(aggregation, &report).await {
                    panic!("client {c}: a report was never acknowledged: {e}");
                }
                delivered.push(Delivered {
                    report,
                    value,
                    before_kill: !killed.load(Ordering::SeqCst),
                });
                acked_tx.send_modify(|n| *n += 1);
            }
            delivered
        }));
    }

    // Once a third of the reports are acknowledged, SIGKILL: the other clients are in the
    // middle of their uploads.
    acked.wait_for(|n| *n >= TOTAL / 3).await.unwrap();
    let retries_at_kill = *retries.borrow();
    first.kill();
    killed.store(true, Ordering::SeqCst);
    // Every client with reports left tries the dead port (or was cut off mid-request) and
    // retries; the restart waits for the first such retry, so it is sure to have happened.
    let retries_before_restart = *tokio::time::timeout(
        Duration::from_secs(60),
        retries.wait_for(|n| *n > retries_at_kill),
    )
    .await
    .expect("no client retried within 60 s of the kill")
    .unwrap();
    let second = IngestorProcess::start(&h, &urls, listen, dir.path().join("ingestor-2.log")).await;

    let mut delivered = Vec::new();
    for task in tasks {
        delivered.extend(task.await.unwrap());
    }
    drop(second);
    let before_kill = delivered.iter().filter(|d| d.before_kill).count();
    println!(
        "{before_kill} of {TOTAL} reports acknowledged before the kill; {} retries by then, {} \
         in all",
        retries_before_restart,
        *retries.borrow()
    );
    // The kill landed mid-upload: some reports were acknowledged by the first ingestor, the
    // rest only by the second, and the clients had to retry.
    assert!(
        before_kill > 0 && before_kill < TOTAL,
        "{before_kill} of {TOTAL}"
    );
    let ids: BTreeSet<_> = delivered.iter().map(|d| d.report.report_id).collect();
    assert_eq!(ids.len(), TOTAL, "every report acknowledged, each once");

    let (window, settled) = window_and_settled(&h, t0);
    run_pipeline(&h, settled).await;
    let r = result(&h, aggregation, window).await;
    let expected: u64 = delivered.iter().map(|d| d.value).sum();
    // A kill between a batch's two copies leaves it in one store: it is left out at the peer
    // deadline (its reports got no 201 and were sent again), and for nothing else.
    let mut excluded = Vec::new();
    for o in h.stores[0]
        .list(&format!("excluded/{aggregation}/"))
        .await
        .unwrap()
    {
        let bytes = h.stores[0].get_required(&o.key).await.unwrap();
        let e: BatchExclusion = serde_json::from_slice(&bytes).unwrap();
        excluded.push(format!("{} ({:?} lacked it)", e.reason, e.lacking));
    }
    println!(
        "result: {} reports, invalid {:?}, from {} batches; left out: {excluded:?}",
        r.report_count,
        r.invalid_reasons,
        r.batches.len()
    );
    assert!(
        excluded.iter().all(|e| e.starts_with("peer-missing ")),
        "{excluded:?}"
    );
    assert_eq!(r.result, AggregateValue::Scalar(expected));
    assert_eq!(r.report_count, TOTAL as u64);
    // A report stored before the kill and sent again after it is in two batches: the second
    // copy is dropped (replayed), never counted.
    for reason in r.invalid_reasons.keys() {
        assert!(
            reason == "replayed" || reason == "duplicate",
            "{:?}",
            r.invalid_reasons
        );
    }
    assert_eq!(
        result_keys(&h).await,
        BTreeSet::from([result_key(aggregation, window)])
    );
}
