//! `millrace demo`: keygen, ingest, and every service of both facilitators plus the mill in one
//! process on the in-memory bus and local-file stores, until every window has a result; then a
//! table per aggregation comparing each result with the plaintext result. A result must equal
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
use millrace_protocol::layout::{computation_key, result_key, Window};
use millrace_protocol::results::{AggregationResult, Computation, ComputationState};
use millrace_store::Store;

use crate::fleet::{Fleet, FleetSettings, Stores};
use crate::ingest::{ingest, Expectations, IngestPlan, WindowExpectation};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Keep keys, config and stores here (a temporary directory otherwise).
    pub dir: Option<PathBuf>,
    pub reports: usize,
    pub invalid_fraction: f64,
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
    pub result: Option<AggregationResult>,
    pub failure: Option<String>,
}

impl DemoRow {
    /// The counts are exact; the result equals the plaintext, or for a DP aggregation lies within
    /// its noise bound of it.
    pub fn correct(&self) -> bool {
        self.result.as_ref().is_some_and(|r| {
            self.expectation.accepts(&r.result)
                && r.report_count == self.expectation.valid
                && r.invalid_count == self.expectation.invalid
        })
    }

    /// The released result minus the plaintext, once there is a result.
    pub fn difference(&self) -> Option<Difference> {
        let r = self.result.as_ref()?;
        Difference::between(&r.result, &self.expectation.expected)
    }
}

#[derive(Clone, Debug)]
pub struct DemoOutcome {
    pub rows: Vec<DemoRow>,
    pub reports: usize,
    pub ingest_secs: f64,
    pub pipeline_secs: f64,
    pub dir: PathBuf,
}

impl DemoOutcome {
    pub fn all_correct(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(DemoRow::correct)
    }
    pub fn reports_per_sec(&self) -> f64 {
        self.reports as f64 / self.pipeline_secs.max(1e-9)
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

/// The time span the demo's reports are given: three whole hours, ending an hour ago, so every
/// window is closed and past its grace period when the fleet starts.
pub fn past_span(now: i64) -> (i64, i64) {
    let hour = now.div_euclid(3600) * 3600;
    (hour - 4 * 3600, hour - 3600)
}

/// Ingests, runs the fleet until every expected window has a result, and compares.
pub async fn run_demo(opts: &DemoOptions) -> anyhow::Result<DemoOutcome> {
    let (dir, _temp) = match &opts.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::tempdir().context("creating a temporary directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let config_path = crate::keygen::keygen(&dir, true)?;
    let config = Arc::new(Config::load(&config_path)?);
    let stores = demo_stores(&dir)?;

    let (start, end) = past_span(chrono::Utc::now().timestamp());
    let plan = IngestPlan {
        reports: opts.reports,
        invalid_fraction: opts.invalid_fraction,
        batch_size: opts.batch_size,
        start,
        end,
    };
    let t0 = Instant::now();
    let b = bar(opts.show_progress, opts.reports as u64, "ingest");
    let expectations: Expectations = ingest(
        &config,
        crate::keygen::INGESTOR,
        [&stores.facilitators[0], &stores.facilitators[1]],
        &plan,
        |n| b.set_position(n as u64),
    )
    .await?;
    b.finish();
    let ingest_secs = t0.elapsed().as_secs_f64();

    let (rows, pipeline_secs) = run_fleet_until_done(
        config,
        stores,
        &expectations,
        opts.timeout,
        opts.show_progress,
    )
    .await?;
    Ok(DemoOutcome {
        rows,
        reports: expectations.reports,
        ingest_secs,
        pipeline_secs,
        dir,
    })
}

/// Runs the in-process fleet over what is in `stores` until every window in `expectations` has
/// a result (or a failure), then stops it. Returns the rows and the seconds it took.
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
    let b = bar(show_progress, expectations.windows.len() as u64, "windows");
    let mut rows: Vec<DemoRow> = expectations
        .windows
        .iter()
        .map(|e| DemoRow {
            expectation: e.clone(),
            result: None,
            failure: None,
        })
        .collect();
    loop {
        let mut finished = 0;
        for row in rows.iter_mut() {
            if row.result.is_some() || row.failure.is_some() {
                finished += 1;
                continue;
            }
            let w = Window::parse(&row.expectation.window)?;
            let agg = &row.expectation.aggregation;
            if let Some(bytes) = collector.get(&result_key(agg, w)).await? {
                row.result = Some(AggregationResult::from_json(&bytes)?);
                finished += 1;
            } else if let Some(bytes) = collector.get(&computation_key(agg, w)).await? {
                if let Ok(c) = Computation::from_json(&bytes) {
                    if c.state == ComputationState::Failed {
                        row.failure = c.detail.or(Some("FAILED".to_string()));
                        finished += 1;
                    }
                }
            }
        }
        b.set_position(finished as u64);
        if finished == rows.len() {
            break;
        }
        if t1.elapsed() > timeout {
            for row in rows
                .iter_mut()
                .filter(|r| r.result.is_none() && r.failure.is_none())
            {
                row.failure = Some(format!("no result after {}s", timeout.as_secs()));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t1.elapsed().as_secs_f64();
    b.finish();
    fleet.stop().await;
    Ok((rows, secs))
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
            let (valid, invalid, got) = match &r.result {
                Some(res) => (
                    res.report_count.to_string(),
                    res.invalid_count.to_string(),
                    res.result.to_string(),
                ),
                None => (
                    "-".to_string(),
                    "-".to_string(),
                    r.failure.clone().unwrap_or_default(),
                ),
            };
            println!(
                "  {:<31} {:>7} {:>7}  {:<6} {got}",
                r.expectation.window,
                valid,
                invalid,
                if r.correct() { "ok" } else { "WRONG" }
            );
            println!(
                "  {:<31} {:>7} {:>7}  {:<6} {}",
                "", r.expectation.valid, r.expectation.invalid, "", r.expectation.expected
            );
            if bound.is_some() {
                if let Some(d) = r.difference() {
                    println!("  {:<31} {:>7} {:>7}  {:<6} {d}", "", "", "", "");
                }
            }
            if let Some(res) = r
                .result
                .as_ref()
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
        "\n{} reports: ingest {:.1}s; pipeline {:.1}s = {:.0} reports/s (both facilitators and the mill, one process)",
        outcome.reports,
        outcome.ingest_secs,
        outcome.pipeline_secs,
        outcome.reports_per_sec()
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
