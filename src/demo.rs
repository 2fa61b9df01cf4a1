//! `millrace demo`: keygen (with minute-long windows), every service of both facilitators plus
//! the mill in one process on the in-memory bus and local-file stores, and an ingestor in front
//! of them on a loopback port. Simulated clients send reports made now through the ingestor's
//! upload API; once every window they fell in has closed and has a result, a table per
//! aggregation compares each result with the plaintext result. A result must equal
//! the plaintext, except for an aggregation with differential privacy: its result is noised by
//! both facilitators, and the table shows the difference, accepted within the noise bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use millrace_bus::memory::MemoryBus;
use millrace_protocol::config::Config;
use millrace_protocol::dp::{Difference, NOISE_BOUND_FAILURE};
use millrace_protocol::layout::Window;
use millrace_runtime::health::Readiness;
use millrace_runtime::Shutdown;
use millrace_store::Store;

use crate::fleet::{Fleet, FleetSettings, Stores};
use crate::ingest::{upload, Expectations, UploadPlan, WindowExpectation};
use crate::keygen::WindowTiming;
use crate::status::WindowOutcome;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Keep keys, config and stores here (a temporary directory otherwise).
    pub dir: Option<PathBuf>,
    pub reports: usize,
    pub invalid_fraction: f64,
    /// Reports per upload body.
    pub batch_size: usize,
    pub timeout: Duration,
    pub show_progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            dir: None,
            reports: 20_000,
            invalid_fraction: 0.02,
            batch_size: 500,
            timeout: Duration::from_secs(600),
            show_progress: true,
        }
    }
}

/// One window: what came out against what had to.
#[derive(Clone, Debug)]
pub struct DemoRow {
    pub expectation: WindowExpectation,
    pub outcome: WindowOutcome,
}

impl DemoRow {
    /// The counts are exact; the result equals the plaintext, or for a DP aggregation lies within
    /// its noise bound of it; a window under its minimum is refused.
    pub fn correct(&self) -> bool {
        self.expectation.met_by(&self.outcome)
    }

    /// The released result minus the plaintext, once there is a result.
    pub fn difference(&self) -> Option<Difference> {
        let r = self.outcome.result()?;
        Difference::between(&r.result, &self.expectation.expected)
    }
}

#[derive(Clone, Debug)]
pub struct DemoOutcome {
    pub rows: Vec<DemoRow>,
    pub reports: usize,
    /// Where the reports went in: the ingestor's address.
    pub ingestor: String,
    /// Repeated reports the ingestor acknowledged and stored once.
    pub acknowledged_repeats: usize,
    pub ingest_secs: f64,
    /// From the first report sent to the last window's result (windows have to close first).
    pub pipeline_secs: f64,
    /// From the last window's close (its end plus grace) to the last result.
    pub after_close_secs: f64,
    pub dir: PathBuf,
}

impl DemoOutcome {
    pub fn all_correct(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(DemoRow::correct)
    }
    pub fn reports_per_sec(&self) -> f64 {
        self.reports as f64 / self.ingest_secs.max(1e-9)
    }
}

fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}") {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_prefix(what.to_string());
    b
}

/// The stores of a demo directory.
pub fn demo_stores(dir: &std::path::Path) -> anyhow::Result<Stores> {
    let url = |name: &str| format!("file://{}", dir.join("stores").join(name).display());
    Ok(Stores {
        facilitators: [Store::open(&url("alpha"))?, Store::open(&url("beta"))?],
        collector: Store::open(&url("collector"))?,
    })
}

/// The time span simulated reports written straight to the stores are given: three whole
/// hours, ending an hour ago, so every window is closed and past its grace period when the
/// fleet starts (the benchmarks and tests that drive the pipeline step by step).
pub fn past_span(now: i64) -> (i64, i64) {
    let hour = now.div_euclid(3600) * 3600;
    (hour - 4 * 3600, hour - 3600)
}

/// The in-process ingestor of the demo, on a loopback port.
pub struct LocalIngestor {
    pub url: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalIngestor {
    /// Serves ingestor `name` of `config` on 127.0.0.1 (a free port), writing to `stores`.
    pub async fn start(
        config: Arc<Config>,
        name: &str,
        stores: [Store; 2],
        settings: millrace_ingestor::Settings,
    ) -> anyhow::Result<Self> {
        let ingestor = millrace_ingestor::Ingestor::new(config, name, stores, settings)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the ingestor to a loopback port")?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(millrace_ingestor::serve(
            listener,
            ingestor,
            Readiness::new(),
            shutdown.clone(),
        ));
        Ok(LocalIngestor {
            url,
            shutdown,
            task,
        })
    }

    /// Stops taking reports, writes what it admitted, and returns.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.task.await.context("the ingestor task")??;
        Ok(())
    }
}

/// Starts the fleet and an ingestor in front of it, sends reports made now through the
/// ingestor's upload API (with `millrace-client`), waits until every window they fell in has
/// closed and has its result, and compares.
pub async fn run_demo(opts: &DemoOptions) -> anyhow::Result<DemoOutcome> {
    let (dir, _temp) = match &opts.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::tempdir().context("creating a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let config_path = crate::keygen::keygen_with(&dir, true, &WindowTiming::minutes())?;
    let config = Arc::new(Config::load(&config_path)?);
    let stores = demo_stores(&dir)?;
    let collector = stores.collector.clone();
    let fleet = Fleet::start(
        config.clone(),
        Arc::new(MemoryBus::new()),
        stores.clone(),
        &FleetSettings::default(),
    )?;
    let ingestor = LocalIngestor::start(
        config.clone(),
        crate::keygen::INGESTOR,
        stores.facilitators.clone(),
        millrace_ingestor::Settings::default(),
    )
    .await?;
    let client = Arc::new(millrace_client::Client::new(&ingestor.url)?);
    let plan = UploadPlan {
        reports: opts.reports,
        invalid_fraction: opts.invalid_fraction,
        bulk_size: opts.batch_size,
        concurrency: 8,
    };
    let t0 = Instant::now();
    let b = bar(opts.show_progress, opts.reports as u64, "upload");
    let sent = upload(&config, crate::keygen::INGESTOR, client, &plan, |n| {
        b.set_position(n as u64)
    })
    .await;
    b.finish();
    let ingest_secs = t0.elapsed().as_secs_f64();
    let waited = match sent {
        Ok((expectations, repeats)) => {
            wait_for_outcomes(&collector, &expectations, opts.timeout, opts.show_progress)
                .await
                .map(|rows| (rows, expectations, repeats))
        }
        Err(e) => Err(e),
    };
    let url = ingestor.url.clone();
    let stopped = ingestor.stop().await;
    fleet.stop().await;
    let (rows, expectations, acknowledged_repeats) = waited?;
    stopped?;
    let pipeline_secs = t0.elapsed().as_secs_f64();
    let last_close = last_close(&config, &expectations)?;
    let after_close_secs =
        (chrono::Utc::now().timestamp_millis() as f64 / 1000.0 - last_close as f64).max(0.0);
    Ok(DemoOutcome {
        rows,
        reports: expectations.reports,
        ingestor: url,
        acknowledged_repeats,
        ingest_secs,
        pipeline_secs,
        after_close_secs,
        dir,
    })
}

/// When the last expected window closes to batches: its end plus its aggregation's grace.
fn last_close(config: &Config, expectations: &Expectations) -> anyhow::Result<i64> {
    let mut last = 0;
    for e in &expectations.windows {
        let w = Window::parse(&e.window)?;
        let grace = config
            .aggregation(&e.aggregation)
            .map(|a| a.grace.as_secs() as i64)
            .unwrap_or(0);
        last = last.max(w.end + grace);
    }
    Ok(last)
}

/// Runs the in-process fleet over what is in `stores` until every window in `expectations` has
/// a result (or a refusal or failure), then stops it. Returns the rows and the seconds it took.
pub async fn run_fleet_until_done(
    config: Arc<Config>,
    stores: Stores,
    expectations: &Expectations,
    timeout: Duration,
    show_progress: bool,
) -> anyhow::Result<(Vec<DemoRow>, f64)> {
    let collector = stores.collector.clone();
    let bus = Arc::new(MemoryBus::new());
    let t1 = Instant::now();
    let fleet = Fleet::start(config, bus, stores, &FleetSettings::default())?;
    let rows = wait_for_outcomes(&collector, expectations, timeout, show_progress).await;
    let secs = t1.elapsed().as_secs_f64();
    fleet.stop().await;
    Ok((rows?, secs))
}

/// Polls the collector's store until every expected window has its final outcome, or `timeout`
/// (the windows still open then are failures, "no result after …").
pub async fn wait_for_outcomes(
    collector: &Store,
    expectations: &Expectations,
    timeout: Duration,
    show_progress: bool,
) -> anyhow::Result<Vec<DemoRow>> {
    let t1 = Instant::now();
    let b = bar(show_progress, expectations.windows.len() as u64, "windows");
    let mut rows: Vec<DemoRow> = expectations
        .windows
        .iter()
        .map(|e| DemoRow {
            expectation: e.clone(),
            outcome: WindowOutcome::Pending,
        })
        .collect();
    loop {
        let mut finished = 0;
        for row in rows.iter_mut() {
            if !row.outcome.is_final() {
                let w = Window::parse(&row.expectation.window)?;
                row.outcome =
                    WindowOutcome::read(collector, &row.expectation.aggregation, w).await?;
            }
            if row.outcome.is_final() {
                finished += 1;
            }
        }
        b.set_position(finished as u64);
        if finished == rows.len() {
            break;
        }
        if t1.elapsed() > timeout {
            for row in rows.iter_mut().filter(|r| !r.outcome.is_final()) {
                row.outcome =
                    WindowOutcome::Failed(format!("no result after {}s", timeout.as_secs()));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.finish();
    Ok(rows)
}

/// The table `millrace demo` prints.
pub fn print_table(outcome: &DemoOutcome) {
    let mut aggs: Vec<&str> = outcome
        .rows
        .iter()
        .map(|r| r.expectation.aggregation.as_str())
        .collect();
    aggs.dedup();
    let mut noised = false;
    for agg in aggs {
        let rows: Vec<&DemoRow> = outcome
            .rows
            .iter()
            .filter(|r| r.expectation.aggregation == agg)
            .collect();
        let bound = rows.first().and_then(|r| r.expectation.noise_bound);
        match bound {
            Some(bound) => {
                noised = true;
                println!(
                    "\n{agg}  (differential privacy: noised by both facilitators; accepted if \
                     every coordinate is within ±{bound} of the plaintext, which honest noise \
                     exceeds with probability ≤ {NOISE_BOUND_FAILURE:e} per coordinate)"
                );
                println!(
                    "  {:<31} {:>7} {:>7}  {:<6} noisy result / plaintext / difference",
                    "window", "valid", "invalid", "check"
                );
            }
            None => {
                println!("\n{agg}");
                println!(
                    "  {:<31} {:>7} {:>7}  {:<6} result / expected",
                    "window", "valid", "invalid", "check"
                );
            }
        }
        for r in rows {
            let (valid, invalid, got) = match &r.outcome {
                WindowOutcome::Released(res) => (
                    res.report_count.to_string(),
                    res.invalid_count.to_string(),
                    res.result.to_string(),
                ),
                other => ("-".to_string(), "-".to_string(), other.to_string()),
            };
            println!(
                "  {:<31} {:>7} {:>7}  {:<6} {got}",
                r.expectation.window,
                valid,
                invalid,
                if r.correct() { "ok" } else { "WRONG" }
            );
            let wanted = if r.expectation.refused {
                format!(
                    "REFUSED: fewer valid reports than the minimum ({})",
                    r.expectation.expected
                )
            } else {
                r.expectation.expected.to_string()
            };
            println!(
                "  {:<31} {:>7} {:>7}  {:<6} {wanted}",
                "", r.expectation.valid, r.expectation.invalid, ""
            );
            if bound.is_some() {
                if let Some(d) = r.difference() {
                    println!("  {:<31} {:>7} {:>7}  {:<6} {d}", "", "", "", "");
                }
            }
            if let Some(res) = r
                .outcome
                .result()
                .filter(|res| !res.invalid_reasons.is_empty())
            {
                println!(
                    "  {:<31} invalid: {}",
                    "",
                    crate::status::invalid_reasons(&res.invalid_reasons)
                );
            }
        }
    }
    println!(
        "\n{} reports sent through the ingestor at {}: {:.1}s ({:.0} reports/s; {} repeated \
         reports acknowledged and stored once)",
        outcome.reports,
        outcome.ingestor,
        outcome.ingest_secs,
        outcome.reports_per_sec(),
        outcome.acknowledged_repeats
    );
    println!(
        "every window had its result {:.1}s after the first report ({:.1}s after the last window \
         closed: its end plus grace); both facilitators, the mill and the ingestor in one process",
        outcome.pipeline_secs, outcome.after_close_secs
    );
    println!(
        "{}",
        match (outcome.all_correct(), noised) {
            (true, false) => "every result equals the plaintext result",
            (true, true) => {
                "every result equals the plaintext result (with differential privacy: lies \
                 within the noise bound of it)"
            }
            (false, _) => "SOME RESULTS DIFFER FROM THE PLAINTEXT RESULT",
        }
    );
}
