//! `millrace bench ingest`: the ingestor's throughput and memory, beside the rate at which one
//! client core can make the reports it takes.
//!
//! The target (issue 14): the ingestor is never the bottleneck. With pre-sealed bulk uploads it
//! must accept at least 5× the reports one core of a client can shard and seal, and under a
//! sustained overload it must answer 429 rather than grow.
//!
//! What runs, all on one machine in one run:
//!
//! 1. **Shard + seal, one core**: `millrace-client`'s [`AggregationConfig::seal`] (Prio3 shard,
//!    two HPKE seals) on one thread, timed; then the rest of the reports on every core, untimed.
//!    Every report is made now, so the ingestor takes it (it refuses closed windows).
//! 2. **Single-report uploads**: every report in its own request, from `--concurrency`
//!    connections with one request in flight each, against a fresh `ingestor` process.
//! 3. **Bulk uploads**: the same reports, `--bulk-size` per request, from `--bulk-concurrency`
//!    connections, against another fresh `ingestor`; five times (each a fresh `ingestor`), since
//!    one run is short, and the median run is reported.
//! 4. **Overload**: for `--overload-secs`, bulk bodies against one more fresh `ingestor` whose
//!    pending limit holds two bodies, from `--overload-concurrency` senders that resend at once
//!    on 429 (ignoring `Retry-After`, as a misbehaving fleet would). The pre-sealed bodies go
//!    first; once they are all taken, the same reports go again under new report ids (the
//!    ingestor opens no share, so to it they are new reports, of the same sizes; their shares
//!    would not open at intake, which nothing runs here). Its peak resident memory is sampled
//!    each second: bounded memory means the peak stops rising while the 429s keep coming.
//!    What still grows is the open window's set of report ids (for the duplicate check), in
//!    steps as its hash table doubles, with the reports accepted, not with the 429s, up to the
//!    ingestor's `--max-remembered-ids` (1,000,000 by default), where it forgets the stored
//!    ones; the output shows that growth per report. The plateau itself is the bodies in flight: it grows with
//!    `--overload-concurrency` times the body size, not with the pending limit.
//!
//! Each ingestor is the real binary (`ingestor`, built beside `millrace`), a child process with
//! local-file stores in a temporary directory, so its peak RSS (`VmHWM`) and CPU time are its
//! own. Each phase uses a fresh one because the ingestor remembers the report ids of an open
//! window: the same reports sent to the same process again would be acknowledged as
//! duplicates without being stored. The load generator (this process) shares the machine's
//! cores with the ingestor; the table shows both processes' CPU time, and the ingestor's rate
//! per CPU-second of its own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use millrace_client::AggregationConfig;
use millrace_protocol::config::Config;
use millrace_protocol::upload::{
    encode_report_list, new_report_id, HpkeConfigDocument, UploadReport, REPORT_LIST_MEDIA_TYPE,
    REPORT_MEDIA_TYPE,
};
use millrace_protocol::vdaf::{Measurement, VdafSpec};

/// The ingestor's throughput target: bulk uploads accepted per second, as a multiple of the
/// reports one client core shards and seals per second.
pub const TARGET_RATIO: f64 = 5.0;

/// Reports sealed on one thread to time the one-core rate (or all of them, if fewer).
const SEAL_SAMPLE: usize = 5_000;

/// Runs of the bulk phase; the median is reported.
const BULK_RUNS: usize = 5;

/// Linux reports process CPU time in `/proc/PID/stat` in USER_HZ ticks, 100 a second on every
/// architecture Millrace builds for.
const USER_HZ: f64 = 100.0;

/// `millrace bench ingest` options.
#[derive(clap::Args, Clone, Debug)]
pub struct IngestBenchOptions {
    /// The aggregation of the default config (`millrace keygen`) to report to: clicks (Count),
    /// spend (Sum), latency (Histogram) or features (SumVec).
    #[arg(long, default_value = "spend")]
    pub aggregation: String,
    /// Pre-sealed reports; each upload phase sends all of them once.
    #[arg(long, default_value_t = 50_000)]
    pub reports: usize,
    /// Connections of the single-report phase, each with one request in flight (one client
    /// each). Below `--max-batch-reports` (1000) a batch closes by age (1 s), not by size.
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Reports per body in the bulk and overload phases.
    #[arg(long, default_value_t = 1000)]
    pub bulk_size: usize,
    /// Connections of the bulk phase, each with one request in flight.
    #[arg(long, default_value_t = 4)]
    pub bulk_concurrency: usize,
    /// Senders of the overload phase, each resending its body at once on 429.
    #[arg(long, default_value_t = 64)]
    pub overload_concurrency: usize,
    /// How long the overload lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    pub overload_secs: u64,
}

/// One upload phase.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: String,
    pub connections: usize,
    /// Requests answered 201.
    pub requests: usize,
    /// Reports in the requests answered 201.
    pub reports: usize,
    /// 429 and 503 answers (each retried with the same body).
    pub refused: usize,
    pub elapsed: Duration,
    /// Latency of the requests answered 201, send to the end of the answer.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The ingestor's CPU time (user + system) during the phase.
    pub ingestor_cpu: Option<Duration>,
    /// This process's CPU time (the load generator) during the phase.
    pub client_cpu: Option<Duration>,
    /// The ingestor's peak resident memory at the end of the phase.
    pub ingestor_peak_rss: Option<u64>,
}

impl Phase {
    pub fn per_sec(&self) -> f64 {
        self.reports as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Reports accepted per CPU-second of the ingestor.
    pub fn per_ingestor_cpu_sec(&self) -> Option<f64> {
        let cpu = self.ingestor_cpu?.as_secs_f64();
        (cpu > 0.0).then(|| self.reports as f64 / cpu)
    }
}

/// The overload phase's memory.
#[derive(Clone, Debug)]
pub struct Overload {
    pub phase: Phase,
    /// The ingestor's pending limit (reports).
    pub max_pending_reports: usize,
    /// Resident memory of the idle ingestor, before the phase.
    pub idle_rss: Option<u64>,
    /// Peak resident memory halfway through the phase, and the reports accepted by then.
    pub half_peak_rss: Option<u64>,
    pub half_reports: usize,
    /// Each second: the reports accepted so far and the peak resident memory then.
    pub each_second: Vec<(usize, Option<u64>)>,
    /// Peak resident memory at the end.
    pub end_peak_rss: Option<u64>,
}

impl Overload {
    /// How much the peak rose in the second half, per report accepted in it.
    pub fn growth_per_report(&self) -> Option<f64> {
        let rose = self.end_peak_rss?.checked_sub(self.half_peak_rss?)?;
        let reports = self.phase.reports.checked_sub(self.half_reports)?;
        (reports > 0).then(|| rose as f64 / reports as f64)
    }
}

/// What `millrace bench ingest` measured.
#[derive(Clone, Debug)]
pub struct IngestBench {
    pub aggregation: String,
    pub vdaf: VdafSpec,
    pub reports: usize,
    /// The mean encoded size of one report.
    pub report_bytes: usize,
    pub bulk_size: usize,
    pub cores: usize,
    /// Reports timed on one thread.
    pub seal_sample: usize,
    /// Reports one core shards and seals per second.
    pub seal_per_sec: f64,
    pub single: Phase,
    pub bulk: Phase,
    pub overload: Overload,
}

impl IngestBench {
    /// Bulk reports accepted per second over the one-core shard + seal rate.
    pub fn ratio(&self) -> f64 {
        self.bulk.per_sec() / self.seal_per_sec.max(1e-9)
    }

    pub fn target_met(&self) -> bool {
        self.ratio() >= TARGET_RATIO
    }
}

/// A measurement of `spec`, varied with `i`.
fn measurement(spec: &VdafSpec, i: usize) -> Measurement {
    match spec {
        VdafSpec::Count {} => Measurement::Count(i.is_multiple_of(2)),
        VdafSpec::Sum { max_measurement } => {
            Measurement::Sum(i as u64 % max_measurement.saturating_add(1))
        }
        VdafSpec::Histogram { length, .. } => Measurement::Histogram(i % (*length).max(1)),
        VdafSpec::SumVec {
            max_measurement,
            length,
            ..
        } => Measurement::SumVec(
            (0..*length)
                .map(|j| (i + j) as u64 % max_measurement.saturating_add(1))
                .collect(),
        ),
    }
}

fn seal_range(
    document: &HpkeConfigDocument,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<UploadReport>> {
    let config = AggregationConfig::new(document.clone())?;
    let spec = &document.aggregation.vdaf;
    range
        .map(|i| {
            config
                .seal(&measurement(spec, i), chrono::Utc::now().timestamp())
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// Seals `n` reports: a sample on one thread, timed (reports/s), then the rest on every core.
fn seal_all(
    document: &HpkeConfigDocument,
    n: usize,
    cores: usize,
) -> anyhow::Result<(Vec<UploadReport>, usize, f64)> {
    let sample = n.min(SEAL_SAMPLE);
    let started = Instant::now();
    let mut reports = seal_range(document, 0..sample)?;
    let per_sec = sample as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let rest = n - sample;
    let per_thread = rest.div_ceil(cores.max(1));
    let parts: Vec<anyhow::Result<Vec<UploadReport>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cores.max(1))
            .map(|t| {
                let from = sample + t * per_thread;
                let to = (from + per_thread).min(n);
                s.spawn(move || seal_range(document, from..to.max(from)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a sealing thread panicked")))
            })
            .collect()
    });
    for part in parts {
        reports.extend(part?);
    }
    Ok((reports, sample, per_sec))
}

/// A field of `/proc/PID/status` in bytes (`VmRSS`, `VmHWM`; Linux only).
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A process's CPU time so far, user + system, every thread (`/proc/PID/stat`; Linux only).
fn proc_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state): utime is
    // field 14 and stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

fn cpu_between(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    after?.checked_sub(before?)
}

/// The `ingestor` binary beside this one.
fn ingestor_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the millrace binary")?;
    let exe = me.with_file_name(format!("ingestor{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        exe.is_file(),
        "{} is missing: build it beside millrace (cargo build --release --workspace --bin \
         millrace --bin ingestor)",
        exe.display()
    );
    Ok(exe)
}

/// One `ingestor` child process; killed when dropped.
struct IngestorProcess {
    child: Child,
    base: String,
    log: PathBuf,
}

impl IngestorProcess {
    /// Starts the ingestor on a free loopback port, with its own local-file stores under
    /// `dir/name/`, and waits until it serves `aggregation`'s HPKE config.
    async fn start(
        http: &reqwest::Client,
        dir: &Path,
        name: &str,
        aggregation: &str,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let stores = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = std::process::Command::new(ingestor_exe()?)
            .arg("--config")
            .arg(dir.join("millrace.toml"))
            .args(["--ingestor", crate::keygen::INGESTOR])
            .arg("--store0")
            .arg(format!("file://{}", stores.join("alpha").display()))
            .arg("--store1")
            .arg(format!("file://{}", stores.join("beta").display()))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the ingestor")?;
        let mut process = IngestorProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let url = format!("{}/aggregations/{aggregation}/hpke-config", process.base);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.child.try_wait()? {
                anyhow::bail!(
                    "the ingestor exited ({status}) before serving: {}",
                    process.log_tail()
                );
            }
            match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(process),
                Ok(r) => anyhow::bail!(
                    "the ingestor answers {url} with {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => anyhow::bail!(
                    "the ingestor did not serve {url} within 30 s ({e}): {}",
                    process.log_tail()
                ),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn reports_url(&self, aggregation: &str) -> String {
        format!("{}/aggregations/{aggregation}/reports", self.base)
    }

    fn cpu(&self) -> Option<Duration> {
        proc_cpu(&self.pid().to_string())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for IngestorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the senders do with a 429 or 503.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnRefusal {
    /// Wait as `Retry-After` says (at most a second), then resend: a well-behaved client.
    Wait,
    /// Resend at once: a fleet that ignores the ingestor.
    Hammer,
}

/// The bodies of one phase, taken in order by the senders.
struct Bodies {
    media_type: &'static str,
    /// Each encoded body and the reports it holds.
    encoded: Vec<(Vec<u8>, usize)>,
    /// With these reports (and the reports per body), the senders keep going after the last
    /// encoded body: the same bodies again, each report under a new id.
    again: Option<(Arc<Vec<UploadReport>>, usize)>,
}

impl Bodies {
    /// Body `i` and its report count; `None` past the last one.
    fn get(&self, i: usize) -> anyhow::Result<Option<(Vec<u8>, usize)>> {
        if let Some((body, n)) = self.encoded.get(i) {
            return Ok(Some((body.clone(), *n)));
        }
        let Some((reports, per_body)) = &self.again else {
            return Ok(None);
        };
        let chunks = reports.len().div_ceil((*per_body).max(1)).max(1);
        let from = (i % chunks) * per_body;
        let renamed: Vec<UploadReport> = reports[from..(from + per_body).min(reports.len())]
            .iter()
            .map(|r| UploadReport {
                report_id: new_report_id(),
                ..r.clone()
            })
            .collect();
        Ok(Some((encode_report_list(&renamed)?, renamed.len())))
    }
}

/// What the senders counted.
#[derive(Default)]
struct Counts {
    requests: usize,
    reports: usize,
    refused: usize,
    latencies_ms: Vec<f64>,
}

/// Sends every body once (resending it after each 429/503) from `connections` concurrent
/// senders, or, with `until`, as many as fit before then (a body still refused then is
/// dropped); `accepted` counts the reports answered 201 as they are.
async fn send_all(
    http: &reqwest::Client,
    url: &str,
    bodies: Arc<Bodies>,
    connections: usize,
    on_refusal: OnRefusal,
    until: Option<Instant>,
    accepted: Arc<AtomicUsize>,
) -> anyhow::Result<(Counts, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let over = move || until.is_some_and(|u| Instant::now() >= u);
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let (http, url, bodies, next, accepted) = (
            http.clone(),
            url.to_string(),
            bodies.clone(),
            next.clone(),
            accepted.clone(),
        );
        senders.spawn(async move {
            let mut counts = Counts::default();
            'bodies: while !over() {
                let Some((body, reports)) = bodies.get(next.fetch_add(1, Ordering::Relaxed))?
                else {
                    break;
                };
                while !over() {
                    let sent = Instant::now();
                    let response = http
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, bodies.media_type)
                        .body(body.clone())
                        .send()
                        .await
                        .with_context(|| format!("POST {url}"))?;
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    let answer = response
                        .bytes()
                        .await
                        .with_context(|| format!("reading the answer of POST {url}"))?;
                    match status {
                        201 => {
                            counts.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                            counts.requests += 1;
                            counts.reports += reports;
                            accepted.fetch_add(reports, Ordering::Relaxed);
                            continue 'bodies;
                        }
                        429 | 503 => {
                            counts.refused += 1;
                            if on_refusal == OnRefusal::Wait {
                                let wait = Duration::from_secs(retry_after.unwrap_or(1).min(1));
                                tokio::time::sleep(wait).await;
                            }
                        }
                        other => anyhow::bail!(
                            "POST {url}: {other}: {}",
                            String::from_utf8_lossy(&answer)
                        ),
                    }
                }
            }
            anyhow::Ok(counts)
        });
    }
    let mut total = Counts::default();
    while let Some(joined) = senders.join_next().await {
        let counts = joined.context("a sender panicked")??;
        total.requests += counts.requests;
        total.reports += counts.reports;
        total.refused += counts.refused;
        total.latencies_ms.extend(counts.latencies_ms);
    }
    Ok((total, started.elapsed()))
}

/// Everything one phase needs.
struct PhaseSpec<'a> {
    name: &'a str,
    dir: &'a Path,
    aggregation: &'a str,
    bodies: Arc<Bodies>,
    connections: usize,
    on_refusal: OnRefusal,
    /// Send for this long, rather than every body once.
    duration: Option<Duration>,
    /// Extra ingestor flags.
    flags: Vec<String>,
}

/// Memory samples of a timed phase.
#[derive(Default)]
struct Samples {
    idle_rss: Option<u64>,
    /// Each second: the reports accepted so far and the ingestor's peak RSS then.
    each_second: Vec<(usize, Option<u64>)>,
}

/// Runs one phase against a fresh ingestor. A timed phase also records the ingestor's idle
/// RSS, and its peak RSS each second.
async fn run_phase(
    http: &reqwest::Client,
    spec: PhaseSpec<'_>,
) -> anyhow::Result<(Phase, Samples)> {
    let ingestor =
        IngestorProcess::start(http, spec.dir, spec.name, spec.aggregation, &spec.flags).await?;
    let pid = ingestor.pid();
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut samples = Samples::default();
    let sampler = spec.duration.map(|d| {
        samples.idle_rss = proc_status_bytes(pid, "VmRSS:");
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut each_second = Vec::new();
            for _ in 1..d.as_secs() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                each_second.push((
                    accepted.load(Ordering::Relaxed),
                    proc_status_bytes(pid, "VmHWM:"),
                ));
            }
            each_second
        })
    });
    let (cpu_before, me_before) = (ingestor.cpu(), proc_cpu("self"));
    let sent = send_all(
        http,
        &ingestor.reports_url(spec.aggregation),
        spec.bodies.clone(),
        spec.connections,
        spec.on_refusal,
        spec.duration.map(|d| Instant::now() + d),
        accepted,
    )
    .await;
    let (cpu_after, me_after) = (ingestor.cpu(), proc_cpu("self"));
    let peak = proc_status_bytes(pid, "VmHWM:");
    let (counts, elapsed) =
        sent.with_context(|| format!("ingestor log: {}", ingestor.log_tail()))?;
    if let Some(sampler) = sampler {
        samples.each_second = sampler.await.unwrap_or_default();
        samples
            .each_second
            .push((counts.reports, proc_status_bytes(pid, "VmHWM:")));
    }
    drop(ingestor);
    // The batches are not needed any more; free the disk for the next phase.
    let _ = std::fs::remove_dir_all(spec.dir.join(spec.name));
    let summary = crate::bench::summarize(counts.latencies_ms, elapsed);
    Ok((
        Phase {
            name: spec.name.to_string(),
            connections: spec.connections,
            requests: counts.requests,
            reports: counts.reports,
            refused: counts.refused,
            elapsed,
            p50_ms: summary.p50_ms,
            p99_ms: summary.p99_ms,
            ingestor_cpu: cpu_between(cpu_before, cpu_after),
            client_cpu: cpu_between(me_before, me_after),
            ingestor_peak_rss: peak,
        },
        samples,
    ))
}

/// Runs the benchmark: keygen in a temporary directory, seal, then the three upload phases.
pub async fn bench_ingest(options: &IngestBenchOptions) -> anyhow::Result<IngestBench> {
    anyhow::ensure!(options.reports > 0, "--reports must be at least 1");
    anyhow::ensure!(options.bulk_size > 0, "--bulk-size must be at least 1");
    ingestor_exe()?;
    let temp = tempfile::tempdir().context("a temporary directory")?;
    let dir = temp.path();
    let config = Config::load(&crate::keygen::keygen(dir, true)?)?;
    let agg = config
        .aggregations
        .iter()
        .find(|a| a.id == options.aggregation)
        .with_context(|| {
            format!(
                "the default config has no aggregation {:?} (it has {})",
                options.aggregation,
                config
                    .aggregations
                    .iter()
                    .map(|a| a.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .context("an HTTP client")?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);

    // The HPKE configs, as a client gets them: from an ingestor.
    let document = {
        let ingestor = IngestorProcess::start(&http, dir, "config", &agg.id, &[]).await?;
        let client = millrace_client::Client::new(&ingestor.base)?;
        client.aggregation(&agg.id).await?.document.clone()
    };
    let n = options.reports;
    let (reports, seal_sample, seal_per_sec) =
        tokio::task::spawn_blocking(move || seal_all(&document, n, cores))
            .await
            .context("the sealing thread panicked")??;
    let report_bytes = reports.iter().map(|r| r.encoded_len()).sum::<usize>() / n;

    let single = Bodies {
        media_type: REPORT_MEDIA_TYPE,
        encoded: reports
            .iter()
            .map(|r| Ok((r.encode()?, 1)))
            .collect::<anyhow::Result<_>>()?,
        again: None,
    };
    let bulk: Vec<(Vec<u8>, usize)> = reports
        .chunks(options.bulk_size)
        .map(|c| Ok((encode_report_list(c)?, c.len())))
        .collect::<anyhow::Result<_>>()?;
    let largest_body = bulk.iter().map(|(b, _)| b.len()).max().unwrap_or(0);

    // Room for every bulk body in flight (the default limit is 100,000 reports).
    let max_pending_reports = 100_000.max(options.bulk_size * options.bulk_concurrency.max(1) * 2);
    let roomy = vec![
        "--max-pending-reports".to_string(),
        max_pending_reports.to_string(),
    ];
    let (single, _) = run_phase(
        &http,
        PhaseSpec {
            name: "single",
            dir,
            aggregation: &agg.id,
            bodies: Arc::new(single),
            connections: options.concurrency,
            on_refusal: OnRefusal::Wait,
            duration: None,
            flags: roomy.clone(),
        },
    )
    .await?;
    // The bulk phase is short (the ingestor takes bulk bodies far faster than they are sealed):
    // the median of a few runs, each against a fresh ingestor.
    let bulk_bodies = Arc::new(Bodies {
        media_type: REPORT_LIST_MEDIA_TYPE,
        encoded: bulk.clone(),
        again: None,
    });
    let mut runs = Vec::with_capacity(BULK_RUNS);
    for run in 0..BULK_RUNS {
        let (phase, _) = run_phase(
            &http,
            PhaseSpec {
                name: &format!("bulk-{run}"),
                dir,
                aggregation: &agg.id,
                bodies: bulk_bodies.clone(),
                connections: options.bulk_concurrency,
                on_refusal: OnRefusal::Wait,
                duration: None,
                flags: roomy.clone(),
            },
        )
        .await?;
        runs.push(phase);
    }
    runs.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
    let mut bulk_phase = runs.swap_remove(runs.len() / 2);
    bulk_phase.name = format!("bulk (median of {BULK_RUNS} runs)");
    // Two bodies pending at most; the byte limit must still take two of the largest body.
    let overload_pending = options.bulk_size * 2;
    let max_body = largest_body.max(1 << 20);
    let (overload, samples) = run_phase(
        &http,
        PhaseSpec {
            name: "overload",
            dir,
            aggregation: &agg.id,
            bodies: Arc::new(Bodies {
                media_type: REPORT_LIST_MEDIA_TYPE,
                encoded: bulk,
                again: Some((Arc::new(reports), options.bulk_size)),
            }),
            connections: options.overload_concurrency,
            on_refusal: OnRefusal::Hammer,
            duration: Some(Duration::from_secs(options.overload_secs.max(1))),
            flags: vec![
                "--max-pending-reports".to_string(),
                overload_pending.to_string(),
                "--max-body-bytes".to_string(),
                max_body.to_string(),
                "--max-pending-bytes".to_string(),
                (2 * max_body).to_string(),
            ],
        },
    )
    .await?;
    // Halfway: the sample taken at half the duration (the last one is the end).
    let half = samples
        .each_second
        .get((samples.each_second.len() / 2).saturating_sub(1))
        .copied();
    Ok(IngestBench {
        aggregation: agg.id.clone(),
        vdaf: agg.vdaf.spec().clone(),
        reports: n,
        report_bytes,
        bulk_size: options.bulk_size,
        cores,
        seal_sample,
        seal_per_sec,
        single,
        bulk: bulk_phase,
        overload: Overload {
            end_peak_rss: overload.ingestor_peak_rss,
            phase: overload,
            max_pending_reports: overload_pending,
            idle_rss: samples.idle_rss,
            half_peak_rss: half.and_then(|(_, rss)| rss),
            half_reports: half.map_or(0, |(reports, _)| reports),
            each_second: samples.each_second,
        },
    })
}

fn mb(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "?".to_string(), |d| format!("{:.2}", d.as_secs_f64()))
}

/// Thousands separated by commas.
fn count(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for IngestBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "aggregation {} ({:?}), {} pre-sealed reports of {} bytes on average, {} cores; \
             each phase against a fresh ingestor process (local-file stores)",
            self.aggregation,
            self.vdaf,
            count(self.reports as f64),
            self.report_bytes,
            self.cores
        )?;
        writeln!(
            f,
            "client shard + seal (millrace-client, one core): {} reports/s ({} reports timed)",
            count(self.seal_per_sec),
            count(self.seal_sample as f64)
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<26} {:>5} {:>8} {:>10} {:>8} {:>8} {:>7} {:>8} {:>8} {:>12} {:>10}",
            "upload",
            "conns",
            "requests",
            "reports/s",
            "p50 ms",
            "p99 ms",
            "429s",
            "ing CPU",
            "gen CPU",
            "per ing CPU",
            "ing peak"
        )?;
        let o = &self.overload;
        for p in [&self.single, &self.bulk, &o.phase] {
            writeln!(
                f,
                "{:<26} {:>5} {:>8} {:>10} {:>8.1} {:>8.1} {:>7} {:>7}s {:>7}s {:>12} {:>10}",
                p.name,
                p.connections,
                p.requests,
                count(p.per_sec()),
                p.p50_ms,
                p.p99_ms,
                p.refused,
                secs(p.ingestor_cpu),
                secs(p.client_cpu),
                p.per_ingestor_cpu_sec()
                    .map_or_else(|| "?".to_string(), count),
                mb(p.ingestor_peak_rss)
            )?;
        }
        writeln!(
            f,
            "  (single: one report per request; bulk and overload: {} per request. ing CPU: the \
             ingestor's CPU time; gen CPU: this load generator's, on the same cores; per ing \
             CPU: reports accepted per CPU-second of the ingestor)",
            self.bulk_size
        )?;
        writeln!(f)?;
        let per_cpu = self
            .bulk
            .per_ingestor_cpu_sec()
            .map(|r| r / self.seal_per_sec.max(1e-9));
        writeln!(
            f,
            "bulk / one-core shard + seal: {:.1}× (target ≥ {TARGET_RATIO:.0}×): {}{}",
            self.ratio(),
            if self.target_met() { "met" } else { "MISSED" },
            per_cpu.map_or_else(String::new, |r| format!(
                "; per CPU-second of the ingestor: {r:.1}×"
            ))
        )?;
        writeln!(
            f,
            "overload, {:.0} s: {} senders resending at once on 429, at most {} reports pending: \
             {} requests refused 429, {} answered 201 ({} reports, {} reports/s)",
            o.phase.elapsed.as_secs_f64(),
            o.phase.connections,
            count(o.max_pending_reports as f64),
            count(o.phase.refused as f64),
            count(o.phase.requests as f64),
            count(o.phase.reports as f64),
            count(o.phase.per_sec())
        )?;
        writeln!(
            f,
            "  ingestor memory: idle {}; peak halfway {} ({} reports accepted), at the end {} \
             ({} reports accepted){}",
            mb(o.idle_rss),
            mb(o.half_peak_rss),
            count(o.half_reports as f64),
            mb(o.end_peak_rss),
            count(o.phase.reports as f64),
            o.growth_per_report().map_or_else(String::new, |b| format!(
                "; the second half's rise is {b:.0} bytes per report accepted in it (the \
                 ingestor keeps the open window's report ids)"
            ))
        )?;
        writeln!(
            f,
            "  peak RSS each second (MB, reports accepted by then): {}",
            o.each_second
                .iter()
                .map(|(reports, rss)| format!(
                    "{} ({})",
                    rss.map_or_else(|| "?".to_string(), |b| format!("{:.0}", b as f64 / 1e6)),
                    count(*reports as f64)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        Ok(())
    }
}
