//! `millrace status`: every window the collector knows of, and its state; with the facilitators'
//! stores, also what each facilitator left out of a window (late batches, batches one side
//! lacked) and the windows it gave up on.

use millrace_protocol::config::Config;
use millrace_protocol::layout::{computation_key, result_key, Window};
use millrace_protocol::results::{
    AggregationResult, BatchExclusion, Computation, ComputationState,
};
use millrace_store::Store;

/// One row of the status table.
#[derive(Clone, Debug)]
pub struct WindowStatus {
    pub aggregation: String,
    pub window: String,
    pub state: String,
    pub detail: Option<String>,
    pub result: Option<AggregationResult>,
    /// The computation record's manifest generation (none for an unreadable record).
    pub generation: Option<u32>,
    /// While waiting for a sum part: since when (unix seconds); the mill's deadline counts from it.
    pub since: Option<i64>,
}

pub async fn collect(config: &Config, collector: &Store) -> anyhow::Result<Vec<WindowStatus>> {
    let mut rows = Vec::new();
    for agg in &config.aggregations {
        for obj in collector.list(&format!("computations/{}/", agg.id)).await? {
            let Some(bytes) = collector.get(&obj.key).await? else {
                continue;
            };
            let c = match Computation::from_json(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    rows.push(WindowStatus {
                        aggregation: agg.id.clone(),
                        window: obj.key.clone(),
                        state: "UNREADABLE".to_string(),
                        detail: Some(e.to_string()),
                        result: None,
                        generation: None,
                        since: None,
                    });
                    continue;
                }
            };
            let result = match Window::parse(&c.window) {
                Ok(w) => match collector.get(&result_key(&agg.id, w)).await? {
                    Some(b) => AggregationResult::from_json(&b).ok(),
                    None => None,
                },
                Err(_) => None,
            };
            let detail = match (c.state, c.since) {
                (millrace_protocol::results::ComputationState::WaitingForParts, Some(since)) => {
                    Some(format!(
                        "generation {}: one sum part here since {}; FAILED if the other has not come by {}",
                        c.generation,
                        Window::rfc3339(since),
                        Window::rfc3339(since + agg.wait_deadline.as_secs() as i64)
                    ))
                }
                _ => c.detail,
            };
            rows.push(WindowStatus {
                aggregation: agg.id.clone(),
                window: c.window,
                state: format!("{:?}", c.state),
                detail,
                result,
                generation: Some(c.generation),
                since: c.since,
            });
        }
    }
    Ok(rows)
}

pub fn print(rows: &[WindowStatus]) {
    print!("{}", collector_table(rows));
}

/// The collector's table, as [`print`] prints it.
pub fn collector_table(rows: &[WindowStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<31} {:<16} {:>9} {:>8}  result",
        "aggregation", "window", "state", "reports", "invalid"
    );
    for r in rows {
        let (reports, invalid, value) = match &r.result {
            Some(res) => (
                res.report_count.to_string(),
                res.invalid_count.to_string(),
                res.result.to_string(),
            ),
            None => ("-".into(), "-".into(), r.detail.clone().unwrap_or_default()),
        };
        let _ = writeln!(
            out,
            "{:<12} {:<31} {:<16} {:>9} {:>8}  {}",
            r.aggregation, r.window, r.state, reports, invalid, value
        );
        if let Some(reasons) = r
            .result
            .as_ref()
            .filter(|res| !res.invalid_reasons.is_empty())
            .map(|res| invalid_reasons(&res.invalid_reasons))
        {
            let _ = writeln!(out, "{:<12} {:<31} invalid: {reasons}", "", "");
        }
    }
    out
}

/// `undecryptable 3, outside-window 2`: a result's invalid counts by reason.
pub fn invalid_reasons(reasons: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    parts.join(", ")
}

/// One row of a facilitator's view: a batch left out of a window, or a window it gave up on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FacilitatorRow {
    pub facilitator: u8,
    pub aggregation: String,
    pub window: String,
    /// `FAILED`, or for a batch `EXCLUDED (late)`, `EXCLUDED (peer-missing)`, …
    pub what: String,
    pub batch: Option<String>,
    pub detail: String,
}

/// What the facilitators' stores say beyond the collector's: every exclusion record and every
/// window a facilitator recorded as FAILED.
pub async fn facilitator_rows(
    config: &Config,
    stores: &[(u8, Store)],
) -> anyhow::Result<Vec<FacilitatorRow>> {
    let mut rows = Vec::new();
    for (f, store) in stores {
        for agg in &config.aggregations {
            let exclusions = records(store, &format!("excluded/{}/", agg.id), |bytes| {
                let e = BatchExclusion::from_json(bytes)?;
                Ok(FacilitatorRow {
                    facilitator: *f,
                    what: format!("EXCLUDED ({})", e.reason),
                    batch: Some(format!("{} {}", e.partition, e.batch)),
                    detail: format!(
                        "{} (seen {}, recorded by {})",
                        e.detail,
                        Window::rfc3339(e.seen_at),
                        e.by
                    ),
                    aggregation: e.aggregation,
                    window: e.window,
                })
            })
            .await?;
            let failed = records(store, &format!("computations/{}/", agg.id), |bytes| {
                let c = Computation::from_json(bytes)?;
                Ok(FacilitatorRow {
                    facilitator: *f,
                    what: format!("{:?}", c.state).to_uppercase(),
                    batch: None,
                    detail: c.detail.unwrap_or_default(),
                    aggregation: c.aggregation,
                    window: c.window,
                })
            })
            .await?;
            for (key, row) in exclusions.into_iter().chain(failed) {
                rows.push(row.unwrap_or_else(|err| FacilitatorRow {
                    facilitator: *f,
                    aggregation: agg.id.clone(),
                    window: key,
                    what: "UNREADABLE".to_string(),
                    batch: None,
                    detail: err.to_string(),
                }));
            }
        }
    }
    Ok(rows)
}

/// Every record under `prefix`, each read with `parse` (an error stays beside its key).
async fn records<T>(
    store: &Store,
    prefix: &str,
    parse: impl Fn(&[u8]) -> Result<T, millrace_protocol::FormatError>,
) -> anyhow::Result<Vec<(String, Result<T, millrace_protocol::FormatError>)>> {
    let mut out = Vec::new();
    for obj in store.list(prefix).await? {
        if let Some(bytes) = store.get(&obj.key).await? {
            out.push((obj.key, parse(&bytes)));
        }
    }
    Ok(out)
}

pub fn print_facilitators(rows: &[FacilitatorRow]) {
    print!("{}", facilitators_table(rows));
}

/// The facilitators' records, as [`print_facilitators`] prints them.
pub fn facilitators_table(rows: &[FacilitatorRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n");
    if rows.is_empty() {
        out.push_str("facilitators: no batch left out of any window, no window given up on\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<3} {:<12} {:<31} {:<24} {:<40}  detail",
        "f", "aggregation", "window", "what", "batch"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<3} {:<12} {:<31} {:<24} {:<40}  {}",
            r.facilitator,
            r.aggregation,
            r.window,
            r.what,
            r.batch.as_deref().unwrap_or("-"),
            r.detail
        );
    }
    out
}

/// What the collector holds for one window.
#[derive(Clone, Debug)]
pub enum WindowOutcome {
    /// Nothing final yet.
    Pending,
    Released(Box<AggregationResult>),
    /// Refused (too few valid reports, by a facilitator or the mill): nothing released.
    Refused(String),
    Failed(String),
}

impl WindowOutcome {
    pub fn is_final(&self) -> bool {
        !matches!(self, WindowOutcome::Pending)
    }

    pub fn result(&self) -> Option<&AggregationResult> {
        match self {
            WindowOutcome::Released(r) => Some(r),
            _ => None,
        }
    }

    /// The collector's result for `window` of `aggregation`, or its computation record's final
    /// state.
    pub async fn read(
        collector: &Store,
        aggregation: &str,
        window: Window,
    ) -> anyhow::Result<Self> {
        if let Some(b) = collector.get(&result_key(aggregation, window)).await? {
            return Ok(WindowOutcome::Released(Box::new(
                AggregationResult::from_json(&b)?,
            )));
        }
        let Some(b) = collector.get(&computation_key(aggregation, window)).await? else {
            return Ok(WindowOutcome::Pending);
        };
        let c = Computation::from_json(&b)?;
        let detail = || c.detail.clone().unwrap_or_else(|| format!("{:?}", c.state));
        Ok(match c.state {
            ComputationState::Refused => WindowOutcome::Refused(detail()),
            ComputationState::Failed => WindowOutcome::Failed(detail()),
            _ => WindowOutcome::Pending,
        })
    }
}

impl std::fmt::Display for WindowOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowOutcome::Pending => write!(f, "no result"),
            WindowOutcome::Released(r) => write!(
                f,
                "{} ({} valid, {} invalid)",
                r.result, r.report_count, r.invalid_count
            ),
            WindowOutcome::Refused(why) => write!(f, "REFUSED: {why}"),
            WindowOutcome::Failed(why) => write!(f, "FAILED: {why}"),
        }
    }
}

/// Waits up to `wait` for every expected window's result, prints each beside its expectation,
/// and says whether all of them match: equal to the plaintext, or for an aggregation with
/// differential privacy within its noise bound (the difference is printed too); a window with
/// fewer valid reports than its minimum must be refused instead.
pub async fn check(
    collector: &Store,
    expectations: &crate::ingest::Expectations,
    wait: std::time::Duration,
) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut outcomes = Vec::new();
        for e in &expectations.windows {
            let w = Window::parse(&e.window)?;
            outcomes.push(WindowOutcome::read(collector, &e.aggregation, w).await?);
        }
        let complete = outcomes.iter().all(WindowOutcome::is_final);
        if complete || std::time::Instant::now() >= deadline {
            let mut all = complete;
            for (e, o) in expectations.windows.iter().zip(&outcomes) {
                let ok = e.met_by(o);
                all &= ok;
                // A DP aggregation's result is noised: show by how much, and what is accepted.
                let noise = match (e.noise_bound, o.result()) {
                    (Some(bound), Some(r)) => {
                        match millrace_protocol::dp::Difference::between(&r.result, &e.expected) {
                            Some(d) => format!("; difference {d}, accepted within ±{bound}"),
                            None => {
                                format!("; not the plaintext's shape (accepted within ±{bound})")
                            }
                        }
                    }
                    _ => String::new(),
                };
                let wanted = if e.refused {
                    format!(
                        "REFUSED ({} valid, under the minimum; {} invalid)",
                        e.valid, e.invalid
                    )
                } else {
                    format!("{} ({} valid, {} invalid)", e.expected, e.valid, e.invalid)
                };
                println!(
                    "{:<5} {:<12} {:<31} got {o}; expected {wanted}{noise}",
                    if ok { "ok" } else { "WRONG" },
                    e.aggregation,
                    e.window,
                );
            }
            return Ok(all);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------------------------------------
// The operator's view (`millrace status` without `--expect`): per aggregation and window, both
// facilitators' progress side by side and why the window waits; the bus's dead and rejected
// messages; as text, as JSON (`--json`) or as a page that refreshes itself (`--serve`).
//
// Everything here only reads: object listings of the stores (bounded to each window's partitions
// and to the aggregation's horizon, as a workflow-manager pass lists them) and, with `--bus`, a
// scan of each `{topic}.dead` and `{topic}.rejected` in the `inspect` group that releases every
// message it received.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use millrace_bus::dead_letters::ScanOptions;
use millrace_bus::{Bus, SubscribeOptions, INSPECT_GROUP};
use millrace_protocol::config::Aggregation;
use millrace_protocol::layout::{
    ingestion_prefix, manifest_window_prefix, parse_ingestion_key, parse_manifest_key,
    parse_validation_key, share_refusal_key, sum_part_key, sum_parts_prefix, validation_prefix,
    Partition,
};
use millrace_store::ObjectInfo;
use serde::Serialize;

/// The version of the JSON document `--json` prints and `/status.json` serves. Bump it when a
/// field changes meaning or goes away; adding a field keeps it.
pub const VIEW_VERSION: u32 = 1;

/// Every window is fine (or `--fail-on-problems` was not given), or `--expect` matched.
pub const EXIT_OK: u8 = 0;
/// `--expect`: a result differs from the plaintext, or is missing after `--wait-secs`.
pub const EXIT_EXPECT_DIFFERS: u8 = 1;
/// Could not run: bad arguments or config, a store or the bus unreachable.
pub const EXIT_CANNOT_RUN: u8 = 2;
/// `--fail-on-problems`: a window FAILED, REFUSED or unreadable, or a message waits on a `.dead`
/// topic.
pub const EXIT_PROBLEMS: u8 = 3;

/// `millrace status`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[arg(long, env = "MILLRACE_CONFIG")]
    pub config: PathBuf,
    #[arg(long, env = "MILLRACE_COLLECTOR_STORE")]
    pub collector_store: String,
    /// Facilitator 0's store: adds its progress per window (batches, validations, manifest), the
    /// batches it left out or found late, the windows it gave up on. Without it, its side is shown
    /// as not visible.
    #[arg(long)]
    pub store0: Option<String>,
    /// Facilitator 1's store, likewise.
    #[arg(long)]
    pub store1: Option<String>,
    /// Expected results written by `millrace ingest --expect-out`: exit 0 only if every
    /// expected window has a result equal to it (1 if not).
    #[arg(long, conflicts_with_all = ["json", "serve", "fail_on_problems"])]
    pub expect: Option<PathBuf>,
    /// With --expect: wait up to this many seconds for the results to appear.
    #[arg(long, default_value_t = 0)]
    pub wait_secs: u64,
    /// Print the view as one JSON document (`{"version":1,...}`, see the README) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Exit 3 if a window is FAILED, REFUSED or unreadable, or a message waits on a `.dead` topic.
    #[arg(long)]
    pub fail_on_problems: bool,
    /// Serve the view as a page that refreshes itself (`/`) and as JSON (`/status.json`) on this
    /// address (`127.0.0.1:0` picks a free port; the address is printed on stdout).
    #[arg(long, conflicts_with = "json")]
    pub serve: Option<String>,
    /// With --serve: read the stores (and the bus) again this often.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub refresh: Duration,
    /// Message bus URL: adds how many messages wait on each topic's `.dead` and `.rejected`.
    #[arg(long, env = "MILLRACE_BUS")]
    pub bus: Option<String>,
    #[arg(long, env = "MILLRACE_TOPIC_PREFIX", default_value = "millrace")]
    pub topic_prefix: String,
    /// With --bus: a topic's scan ends once nothing new came for this long.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub bus_idle: Duration,
}

/// The stores `status` reads: the collector's, and each facilitator's if given.
#[derive(Clone, Debug)]
pub struct StatusStores {
    pub collector: Store,
    pub facilitators: [Option<Store>; 2],
}

/// How `status` reads the bus's dead and rejected topics.
#[derive(Clone)]
pub struct BusProbe {
    pub bus: Arc<dyn Bus>,
    pub prefix: String,
    pub scan: ScanOptions,
}

/// Runs `millrace status`; returns its exit code ([`EXIT_OK`], …). An error is [`EXIT_CANNOT_RUN`]
/// (the caller prints it).
pub async fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let config = Arc::new(
        Config::load(&args.config)
            .with_context(|| format!("loading the config {}", args.config.display()))?,
    );
    let open = |url: &str, whose: &str| {
        Store::open(url)
            .with_context(|| format!("opening {whose} store {}", millrace_secrets::redact(url)))
    };
    let collector = open(&args.collector_store, "the collector's")?;
    if let Some(path) = &args.expect {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let expectations: crate::ingest::Expectations = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not an expectations file", path.display()))?;
        let ok = check(
            &collector,
            &expectations,
            Duration::from_secs(args.wait_secs),
        )
        .await?;
        return Ok(if ok { EXIT_OK } else { EXIT_EXPECT_DIFFERS });
    }
    let stores = StatusStores {
        collector,
        facilitators: [
            args.store0
                .as_deref()
                .map(|u| open(u, "facilitator 0's"))
                .transpose()?,
            args.store1
                .as_deref()
                .map(|u| open(u, "facilitator 1's"))
                .transpose()?,
        ],
    };
    let probe = match &args.bus {
        Some(url) => Some(BusProbe {
            bus: millrace_bus::connect(url)
                .await
                .with_context(|| format!("opening the bus {}", millrace_secrets::redact(url)))?,
            prefix: args.topic_prefix.clone(),
            scan: ScanOptions {
                idle: args.bus_idle,
                ..ScanOptions::default()
            },
        }),
        None => None,
    };
    if let Some(addr) = &args.serve {
        serve(addr, config, stores, probe, args.refresh).await?;
        return Ok(EXIT_OK);
    }
    let now = chrono::Utc::now().timestamp();
    let view = build_view(&config, &stores, probe.as_ref(), now).await?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&view)?)
    } else {
        render_text(&view)
    };
    emit(&text)?;
    Ok(if args.fail_on_problems && !view.problems.is_empty() {
        EXIT_PROBLEMS
    } else {
        EXIT_OK
    })
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// Where a window stands, as one word (the page colours it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowState {
    /// Not closed yet (its end plus grace is ahead): batches may still arrive.
    Open,
    /// Closed, no final answer yet; `reason` says what it waits for.
    Waiting,
    Succeeded,
    Failed,
    Refused,
    /// A record about it could not be read.
    Unreadable,
}

impl WindowState {
    pub const ALL: [WindowState; 6] = [
        WindowState::Open,
        WindowState::Waiting,
        WindowState::Succeeded,
        WindowState::Failed,
        WindowState::Refused,
        WindowState::Unreadable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            WindowState::Open => "open",
            WindowState::Waiting => "waiting",
            WindowState::Succeeded => "succeeded",
            WindowState::Failed => "failed",
            WindowState::Refused => "refused",
            WindowState::Unreadable => "unreadable",
        }
    }

    /// What the legend says about the state.
    pub fn meaning(self) -> &'static str {
        match self {
            WindowState::Open => "not closed yet: batches may still arrive",
            WindowState::Waiting => "closed, waiting (the reason says for what)",
            WindowState::Succeeded => "result released",
            WindowState::Failed => "no result; re-run it with millrace replay window --reaggregate",
            WindowState::Refused => "too few valid reports: nothing released",
            WindowState::Unreadable => "a record about it cannot be read",
        }
    }

    /// The page's colour for the state (CSS).
    pub fn colour(self) -> &'static str {
        match self {
            WindowState::Open => "#9aa5b1",
            WindowState::Waiting => "#f0b429",
            WindowState::Succeeded => "#2f9e44",
            WindowState::Failed => "#d64545",
            WindowState::Refused => "#8e44ad",
            WindowState::Unreadable => "#3c3c3c",
        }
    }

    pub fn is_problem(self) -> bool {
        matches!(
            self,
            WindowState::Failed | WindowState::Refused | WindowState::Unreadable
        )
    }
}

/// One facilitator's sum part of a window's manifest generation, in the collector's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SumPartState {
    Written,
    /// A signed refusal (too few valid reports): no share.
    Refused,
    Missing,
}

impl SumPartState {
    pub fn label(self) -> &'static str {
        match self {
            SumPartState::Written => "written",
            SumPartState::Refused => "refused",
            SumPartState::Missing => "missing",
        }
    }
}

/// What one facilitator's store shows of one window. Counts are of the window's partitions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Side {
    /// Ingestion batches in this store.
    pub batches: usize,
    /// Of those, without this facilitator's validation yet (its intake is behind).
    pub awaiting_intake: usize,
    /// Of those, validated by this facilitator.
    pub validated: usize,
    /// Batches validated by the peer (its validations copied into this store).
    pub peer_validated: usize,
    /// The newest manifest generation in this store (by key; signatures are the services' job).
    pub manifest_generation: Option<u32>,
    /// Batches recorded as reaching this store after the manifest.
    pub late: usize,
    /// Batches recorded as left out of the manifest (peer-missing, max-age, beyond-horizon).
    pub excluded: usize,
    /// This facilitator recorded the window FAILED (the helper gave up on the manifest): why.
    pub gave_up: Option<String>,
}

/// What the collector's store shows of one window.
#[derive(Clone, Debug, PartialEq)]
pub enum CollectorSide {
    Nothing,
    Released(ResultView),
    WaitingForParts { since: Option<i64> },
    Failed(String),
    Refused(String),
    Unreadable(String),
}

/// Everything read about one window, before it is judged.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    pub window: Window,
    pub collector: CollectorSide,
    /// `None`: that facilitator's store is not visible.
    pub sides: [Option<Side>; 2],
    /// Batches seen in any visible store that lack a validation by either facilitator.
    pub pending_validation: usize,
    /// Of the batches seen, how many lack facilitator 0's validation, and facilitator 1's.
    pub lacking_validation: [usize; 2],
    /// The generation the sum parts are of (the newest manifest, or the newest sum part).
    pub generation: Option<u32>,
    pub sum_parts: [SumPartState; 2],
}

/// The aggregation's deadlines, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub grace: i64,
    pub max_age: i64,
    pub peer_deadline: i64,
    pub wait_deadline: i64,
}

impl Timing {
    pub fn of(agg: &Aggregation) -> Self {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4);
        Timing {
            grace: secs(agg.grace),
            max_age: secs(agg.max_age),
            peer_deadline: secs(agg.peer_deadline),
            wait_deadline: secs(agg.wait_deadline),
        }
    }
}

/// A window's state, why, and the next deadline that changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub state: WindowState,
    pub reason: String,
    pub deadline: Option<i64>,
}

/// Judges a window from what the stores show: the final answer if there is one, else the first
/// thing it waits for, in the order the pipeline does them (close, validations, manifest, sum
/// parts, the mill's join). `names` are the facilitators' names.
pub fn judge(f: &Facts, t: &Timing, names: &[String; 2], now: i64) -> Verdict {
    let who = |i: usize| format!("facilitator {i} ({})", names[i]);
    let at = Window::rfc3339;
    let verdict = |state, reason: String, deadline| Verdict {
        state,
        reason,
        deadline,
    };
    match &f.collector {
        CollectorSide::Released(r) => {
            return verdict(
                WindowState::Succeeded,
                format!(
                    "result {} ({} valid, {} invalid)",
                    r.value, r.report_count, r.invalid_count
                ),
                None,
            )
        }
        CollectorSide::Failed(why) => return verdict(WindowState::Failed, why.clone(), None),
        CollectorSide::Refused(why) => return verdict(WindowState::Refused, why.clone(), None),
        CollectorSide::Unreadable(why) => {
            return verdict(
                WindowState::Unreadable,
                format!("the collector's record cannot be read: {why}"),
                None,
            )
        }
        CollectorSide::Nothing | CollectorSide::WaitingForParts { .. } => {}
    }
    for (i, side) in f.sides.iter().enumerate() {
        if let Some(why) = side.as_ref().and_then(|s| s.gave_up.as_ref()) {
            return verdict(
                WindowState::Failed,
                format!("{} gave up: {why}", who(i)),
                None,
            );
        }
    }
    let closes = f.window.end + t.grace;
    if now < closes {
        return verdict(
            WindowState::Open,
            format!(
                "window not closed until {} (its end {} plus {} s grace)",
                at(closes),
                at(f.window.end),
                t.grace
            ),
            Some(closes),
        );
    }
    let max_age = f.window.end + t.max_age;
    let manifests: Vec<Option<u32>> = f
        .sides
        .iter()
        .map(|s| s.as_ref().and_then(|s| s.manifest_generation))
        .collect();
    let any_manifest = manifests.iter().any(Option::is_some);
    if !any_manifest && f.generation.is_none() {
        if f.pending_validation > 0 {
            let behind: Vec<String> = (0..2)
                .filter(|i| f.lacking_validation[*i] > 0)
                .map(|i| format!("{}: {}", who(i), f.lacking_validation[i]))
                .collect();
            let (when, deadline) = if now >= max_age {
                (
                    format!(
                        "past max age ({}): the leader leaves them out at its next pass",
                        at(max_age)
                    ),
                    None,
                )
            } else {
                (
                    format!(
                        "left out at the peer deadline ({} s after one side validated it) or by \
                         max age {}",
                        t.peer_deadline,
                        at(max_age)
                    ),
                    Some(max_age),
                )
            };
            return verdict(
                WindowState::Waiting,
                format!(
                    "waiting for validations: {} batch{}{}; {when}",
                    f.pending_validation,
                    if f.pending_validation == 1 { "" } else { "es" },
                    if behind.is_empty() {
                        String::new()
                    } else {
                        format!(" (not validated yet by {})", behind.join(", "))
                    }
                ),
                deadline,
            );
        }
        let helper_gives_up = max_age + t.wait_deadline;
        let unseen = if f.sides[0].is_none() {
            " (facilitator 0's store is not visible here)"
        } else {
            ""
        };
        return verdict(
            WindowState::Waiting,
            format!(
                "waiting for the manifest: every batch seen is validated by both; {} writes it at \
                 its next pass{unseen}; {} gives up at {}",
                who(0),
                who(1),
                at(helper_gives_up)
            ),
            Some(helper_gives_up),
        );
    }
    // A manifest exists somewhere: the helper follows it once it is in its own store.
    if let (Some(Some(_)), Some(None)) = (
        f.sides[0].as_ref().map(|s| s.manifest_generation),
        f.sides[1].as_ref().map(|s| s.manifest_generation),
    ) {
        if f.sum_parts[1] == SumPartState::Missing {
            return verdict(
                WindowState::Waiting,
                format!(
                    "waiting for the manifest in {}'s store (the leader copies it there)",
                    who(1)
                ),
                None,
            );
        }
    }
    let generation = f
        .generation
        .or_else(|| manifests.iter().flatten().max().copied())
        .unwrap_or(0);
    let missing: Vec<usize> = (0..2)
        .filter(|i| f.sum_parts[*i] == SumPartState::Missing)
        .collect();
    let since = match &f.collector {
        CollectorSide::WaitingForParts { since } => *since,
        _ => None,
    };
    match missing.as_slice() {
        [] => {
            let refused = f.sum_parts.contains(&SumPartState::Refused);
            verdict(
                WindowState::Waiting,
                if refused {
                    format!(
                        "waiting for the mill: both answers of generation {generation} are in, at \
                         least one a refusal; the mill records it REFUSED"
                    )
                } else {
                    format!(
                        "waiting for the mill to join both sum parts of generation {generation}"
                    )
                },
                None,
            )
        }
        [one] => {
            let deadline = since.map(|s| s + t.wait_deadline);
            verdict(
                WindowState::Waiting,
                format!(
                    "waiting for {}'s sum part (generation {generation}){}",
                    who(*one),
                    match deadline {
                        Some(d) => format!("; the mill records it FAILED at {}", at(d)),
                        None => String::new(),
                    }
                ),
                deadline,
            )
        }
        _ => verdict(
            WindowState::Waiting,
            format!(
                "waiting for both facilitators' sum parts (generation {generation}): their \
                 aggregate-workers have the task"
            ),
            None,
        ),
    }
}

/// A released result, shortly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResultView {
    pub value: String,
    pub report_count: u64,
    pub invalid_count: u64,
    pub invalid_reasons: BTreeMap<String, u64>,
}

impl ResultView {
    fn of(r: &AggregationResult) -> Self {
        ResultView {
            value: r.result.to_string(),
            report_count: r.report_count,
            invalid_count: r.invalid_count,
            invalid_reasons: r.invalid_reasons.clone(),
        }
    }
}

/// One facilitator's column of a window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FacilitatorProgress {
    pub index: u8,
    pub name: String,
    /// False when its store was not given: `progress` is then null.
    pub visible: bool,
    /// What its store shows of the window.
    pub progress: Option<Side>,
    /// From the collector's store, so known either way.
    pub sum_part: SumPartState,
}

/// One window of one aggregation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowView {
    pub window: String,
    pub start: String,
    pub end: String,
    pub state: WindowState,
    pub reason: String,
    /// The next deadline that changes the window (RFC 3339), if one is known.
    pub deadline: Option<String>,
    pub generation: Option<u32>,
    pub result: Option<ResultView>,
    pub facilitators: Vec<FacilitatorProgress>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AggregationView {
    pub id: String,
    pub window_secs: i64,
    /// Oldest first.
    pub windows: Vec<WindowView>,
}

/// Which store was read, and which was not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreVisibility {
    /// `collector`, `facilitator 0`, `facilitator 1`.
    pub role: String,
    pub name: Option<String>,
    /// The URL with any secret redacted; null when not given.
    pub url: Option<String>,
    pub visible: bool,
}

/// Messages waiting on one topic's `.dead` and `.rejected`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopicCount {
    pub topic: String,
    pub dead: Option<usize>,
    pub rejected: Option<usize>,
    /// False if a scan stopped at its limit while messages still came: there may be more.
    pub complete: bool,
    /// Why a count is missing.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BusView {
    pub bus: String,
    pub prefix: String,
    pub topics: Vec<TopicCount>,
}

/// Everything `status` shows; `--json` prints it as is.
#[derive(Clone, Debug, Serialize)]
pub struct StatusView {
    pub version: u32,
    pub generated_at: String,
    pub stores: Vec<StoreVisibility>,
    pub aggregations: Vec<AggregationView>,
    /// Each facilitator's records: batches left out of a window (or late), windows given up on.
    pub records: Vec<FacilitatorRow>,
    /// Null without `--bus`.
    pub bus: Option<BusView>,
    /// What `--fail-on-problems` exits 3 for, one line each.
    pub problems: Vec<String>,
    /// The collector's table (printed as before, above the progress).
    #[serde(skip)]
    pub collector_rows: Vec<WindowStatus>,
}

/// Lists prefixes of one store once each.
struct Lister<'a> {
    store: &'a Store,
    cache: HashMap<String, Vec<ObjectInfo>>,
}

impl<'a> Lister<'a> {
    fn new(store: &'a Store) -> Self {
        Lister {
            store,
            cache: HashMap::new(),
        }
    }

    async fn list(&mut self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
        if let Some(found) = self.cache.get(prefix) {
            return Ok(found.clone());
        }
        let found = self
            .store
            .list(prefix)
            .await
            .with_context(|| format!("listing {prefix} in {}", self.store.redacted_url()))?;
        self.cache.insert(prefix.to_string(), found.clone());
        Ok(found)
    }
}

/// Reads the stores (and the bus) into one view, as of `now`.
pub async fn build_view(
    config: &Config,
    stores: &StatusStores,
    probe: Option<&BusProbe>,
    now: i64,
) -> anyhow::Result<StatusView> {
    let names = [0u8, 1].map(|i| {
        config
            .facilitator_name(i)
            .map(str::to_string)
            .unwrap_or_else(|_| format!("facilitator {i}"))
    });
    let collector_rows = collect(config, &stores.collector).await?;
    let visible: Vec<(u8, Store)> = (0u8..2)
        .filter_map(|i| stores.facilitators[usize::from(i)].clone().map(|s| (i, s)))
        .collect();
    let records = facilitator_rows(config, &visible).await?;
    let mut collector = Lister::new(&stores.collector);
    let mut own: Vec<Option<Lister>> = stores
        .facilitators
        .iter()
        .map(|s| s.as_ref().map(Lister::new))
        .collect();
    let mut aggregations = Vec::new();
    let mut problems = Vec::new();
    for agg in &config.aggregations {
        let timing = Timing::of(agg);
        let psecs = agg.partition_secs();
        // The windows worth showing: any the collector or a facilitator has a record or a
        // manifest of, and any with batches within the aggregation's horizon.
        let mut windows: BTreeSet<Window> = BTreeSet::new();
        for name in collector_rows
            .iter()
            .filter(|r| r.aggregation == agg.id)
            .map(|r| r.window.as_str())
            .chain(
                records
                    .iter()
                    .filter(|r| r.aggregation == agg.id)
                    .map(|r| r.window.as_str()),
            )
        {
            if let Ok(w) = Window::parse(name) {
                windows.insert(w);
            }
        }
        for lister in own.iter_mut().flatten() {
            for o in lister.list(&format!("manifests/{}/", agg.id)).await? {
                if let Some((w, _)) = parse_manifest_key(&agg.id, &o.key) {
                    windows.insert(w);
                }
            }
            for p in Partition::range(agg.horizon(now), now + 1, psecs) {
                let listed = lister.list(&ingestion_prefix(&agg.id, p)).await?;
                if listed
                    .iter()
                    .any(|o| parse_ingestion_key(&agg.id, &o.key).is_some())
                {
                    windows.insert(Window::containing(p.start, agg.window_secs));
                }
            }
        }
        let mut views = Vec::new();
        for window in windows {
            let facts = window_facts(
                agg,
                window,
                &collector_rows,
                &records,
                &mut collector,
                &mut own,
            )
            .await?;
            let verdict = judge(&facts, &timing, &names, now);
            if verdict.state.is_problem() {
                problems.push(format!(
                    "{} {}: {} ({})",
                    agg.id,
                    window.name(),
                    verdict.state.label().to_uppercase(),
                    verdict.reason
                ));
            }
            views.push(WindowView {
                window: window.name(),
                start: Window::rfc3339(window.start),
                end: Window::rfc3339(window.end),
                state: verdict.state,
                reason: verdict.reason,
                deadline: verdict.deadline.map(Window::rfc3339),
                generation: facts.generation,
                result: match &facts.collector {
                    CollectorSide::Released(r) => Some(r.clone()),
                    _ => None,
                },
                facilitators: (0u8..2)
                    .map(|i| FacilitatorProgress {
                        index: i,
                        name: names[usize::from(i)].clone(),
                        visible: facts.sides[usize::from(i)].is_some(),
                        progress: facts.sides[usize::from(i)].clone(),
                        sum_part: facts.sum_parts[usize::from(i)],
                    })
                    .collect(),
            });
        }
        aggregations.push(AggregationView {
            id: agg.id.clone(),
            window_secs: agg.window_secs,
            windows: views,
        });
    }
    for r in records.iter().filter(|r| r.what == "UNREADABLE") {
        problems.push(format!(
            "facilitator {}: unreadable record {}: {}",
            r.facilitator, r.window, r.detail
        ));
    }
    let bus = match probe {
        Some(p) => {
            let counts = count_topics(p).await;
            for c in &counts {
                if let Some(n) = c.dead.filter(|n| *n > 0) {
                    problems.push(format!("{}.dead: {n} message(s) waiting", c.topic));
                }
                if let Some(e) = &c.error {
                    problems.push(format!("{}: {e}", c.topic));
                }
            }
            Some(BusView {
                bus: p.bus.name().to_string(),
                prefix: p.prefix.clone(),
                topics: counts,
            })
        }
        None => None,
    };
    let mut store_list = vec![StoreVisibility {
        role: "collector".into(),
        name: None,
        url: Some(stores.collector.redacted_url()),
        visible: true,
    }];
    for i in 0u8..2 {
        let s = stores.facilitators[usize::from(i)].as_ref();
        store_list.push(StoreVisibility {
            role: format!("facilitator {i}"),
            name: Some(names[usize::from(i)].clone()),
            url: s.map(Store::redacted_url),
            visible: s.is_some(),
        });
    }
    Ok(StatusView {
        version: VIEW_VERSION,
        generated_at: Window::rfc3339(now),
        stores: store_list,
        aggregations,
        records,
        bus,
        problems,
        collector_rows,
    })
}

/// Reads one window: the collector's record and sum parts, each visible facilitator's batches,
/// validations and manifests in the window's partitions, and its records.
async fn window_facts(
    agg: &Aggregation,
    window: Window,
    collector_rows: &[WindowStatus],
    records: &[FacilitatorRow],
    collector: &mut Lister<'_>,
    own: &mut [Option<Lister<'_>>],
) -> anyhow::Result<Facts> {
    let name = window.name();
    let row = collector_rows
        .iter()
        .find(|r| r.aggregation == agg.id && r.window == name);
    let mut collector_side = match row {
        Some(WindowStatus {
            result: Some(res), ..
        }) => CollectorSide::Released(ResultView::of(res)),
        Some(r) => match r.state.as_str() {
            "Failed" => CollectorSide::Failed(r.detail.clone().unwrap_or_default()),
            "Refused" => CollectorSide::Refused(r.detail.clone().unwrap_or_default()),
            "WaitingForParts" => CollectorSide::WaitingForParts { since: r.since },
            "UNREADABLE" => CollectorSide::Unreadable(r.detail.clone().unwrap_or_default()),
            _ => CollectorSide::Nothing,
        },
        None => CollectorSide::Nothing,
    };
    if collector_side == CollectorSide::Nothing {
        // A result written before the mill's record (a crash in between) still counts.
        if let WindowOutcome::Released(r) =
            WindowOutcome::read(collector.store, &agg.id, window).await?
        {
            collector_side = CollectorSide::Released(ResultView::of(&r));
        }
    }
    let partitions = Partition::range(window.start, window.end, agg.partition_secs());
    let mut sides: [Option<Side>; 2] = [None, None];
    // Every batch seen in a visible store, with who validated it.
    let mut seen: BTreeMap<String, [bool; 2]> = BTreeMap::new();
    for (i, lister) in own.iter_mut().enumerate() {
        let Some(lister) = lister else { continue };
        let mut side = Side::default();
        let mut batches: BTreeMap<String, [bool; 2]> = BTreeMap::new();
        for p in &partitions {
            for o in lister.list(&ingestion_prefix(&agg.id, *p)).await? {
                if let Some((_, batch)) = parse_ingestion_key(&agg.id, &o.key) {
                    batches.entry(batch.clone()).or_default();
                    seen.entry(batch).or_default();
                }
            }
            for o in lister.list(&validation_prefix(&agg.id, *p)).await? {
                if let Some((_, batch, by)) = parse_validation_key(&agg.id, &o.key) {
                    if let Some(flags) = batches.get_mut(&batch) {
                        flags[usize::from(by)] = true;
                    }
                    seen.entry(batch).or_default()[usize::from(by)] = true;
                }
            }
        }
        side.batches = batches.len();
        side.validated = batches.values().filter(|v| v[i]).count();
        side.awaiting_intake = side.batches - side.validated;
        side.peer_validated = batches.values().filter(|v| v[1 - i]).count();
        for o in lister
            .list(&manifest_window_prefix(&agg.id, window))
            .await?
        {
            if let Some((_, g)) = parse_manifest_key(&agg.id, &o.key) {
                side.manifest_generation = side.manifest_generation.max(Some(g));
            }
        }
        for r in records.iter().filter(|r| {
            usize::from(r.facilitator) == i && r.aggregation == agg.id && r.window == name
        }) {
            if r.what == "EXCLUDED (late)" {
                side.late += 1;
            } else if r.what.starts_with("EXCLUDED") {
                side.excluded += 1;
            } else if r.what == "FAILED" {
                side.gave_up = Some(r.detail.clone());
            }
        }
        sides[i] = Some(side);
    }
    let pending_validation = seen.values().filter(|v| !(v[0] && v[1])).count();
    let lacking_validation = [0, 1].map(|i| seen.values().filter(|v| !v[i]).count());
    // The sum parts are of the newest generation anyone shows.
    let sums = collector.list(&sum_parts_prefix(&agg.id, window)).await?;
    let sum_generation = sums
        .iter()
        .filter_map(|o| {
            let file = o.key.rsplit('/').next()?;
            file.split('.').next()?.parse::<u32>().ok()
        })
        .max();
    let manifest_generation = sides
        .iter()
        .flatten()
        .filter_map(|s| s.manifest_generation)
        .max();
    let waiting_generation = row
        .filter(|r| r.state == "WaitingForParts")
        .and_then(|r| r.generation);
    let generation = manifest_generation
        .max(sum_generation)
        .or(waiting_generation);
    let keys: BTreeSet<&str> = sums.iter().map(|o| o.key.as_str()).collect();
    let sum_parts = [0u8, 1].map(|i| match generation {
        Some(g) if keys.contains(sum_part_key(&agg.id, window, g, i).as_str()) => {
            SumPartState::Written
        }
        Some(g) if keys.contains(share_refusal_key(&agg.id, window, g, i).as_str()) => {
            SumPartState::Refused
        }
        _ => SumPartState::Missing,
    });
    Ok(Facts {
        window,
        collector: collector_side,
        sides,
        pending_validation,
        lacking_validation,
        generation,
        sum_parts,
    })
}

/// The topics whose `.dead` and `.rejected` companions `status` counts, under `prefix`.
pub fn topic_names(prefix: &str) -> Vec<String> {
    use millrace_protocol::tasks::topics;
    vec![
        topics::intake(prefix, 0),
        topics::aggregate(prefix, 0),
        topics::intake(prefix, 1),
        topics::aggregate(prefix, 1),
        topics::collect(prefix),
        topics::results(prefix),
    ]
}

/// Counts what waits on every topic's `.dead` (through the dead-letter listing of
/// [`millrace_bus::dead_letters::list`]) and `.rejected` ([`count_waiting`]), all topics at once.
pub async fn count_topics(probe: &BusProbe) -> Vec<TopicCount> {
    let scans = topic_names(&probe.prefix)
        .into_iter()
        .map(|topic| async move {
            let rejected = millrace_bus::rejected_topic(&topic);
            let (dead, waiting) = tokio::join!(
                millrace_bus::dead_letters::list(&*probe.bus, &topic, &probe.scan),
                count_waiting(&*probe.bus, &rejected, &probe.scan)
            );
            let mut errors = Vec::new();
            let mut complete = true;
            let dead = match dead {
                Ok(listing) => {
                    complete &= listing.complete;
                    Some(listing.letters.len())
                }
                Err(e) => {
                    errors.push(format!(
                        "cannot read {}: {e}",
                        millrace_bus::dead_topic(&topic)
                    ));
                    None
                }
            };
            let rejected = match waiting {
                Ok((n, done)) => {
                    complete &= done;
                    Some(n)
                }
                Err(e) => {
                    errors.push(format!("cannot read {rejected}: {e}"));
                    None
                }
            };
            TopicCount {
                topic,
                dead,
                rejected,
                complete,
                error: (!errors.is_empty()).then(|| errors.join("; ")),
            }
        });
    futures::future::join_all(scans).await
}

/// How many distinct messages wait on `topic` for the `inspect` group: receives until nothing new
/// came for `scan.idle` (at most `scan.max_wait`, `scan.limit` messages) holding every delivery,
/// then releases each unacknowledged (`nack(0)`), so nothing is removed. Returns the count and
/// whether the scan saw the topic to its end.
pub async fn count_waiting(
    bus: &dyn Bus,
    topic: &str,
    scan: &ScanOptions,
) -> Result<(usize, bool), millrace_bus::BusError> {
    let limit = scan.limit.max(1);
    let options = SubscribeOptions::new(INSPECT_GROUP)
        .lease(scan.max_wait + millrace_bus::dead_letters::HOLD_MARGIN)
        .prefetch(limit);
    let mut subscription = bus.subscribe(topic, options).await?;
    let deadline = tokio::time::Instant::now() + scan.max_wait;
    let mut held = Vec::new();
    let mut ids = BTreeSet::new();
    let outcome;
    loop {
        if ids.len() >= limit {
            outcome = Ok(false);
            break;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            outcome = Ok(false);
            break;
        }
        let wait = scan.idle.min(deadline - now);
        match tokio::time::timeout(wait, subscription.next()).await {
            Err(_) => {
                outcome = Ok(wait == scan.idle);
                break;
            }
            Ok(Ok(delivery)) => {
                ids.insert(delivery.message_id.clone());
                held.push(delivery);
            }
            Ok(Err(e)) => {
                outcome = Err(e);
                break;
            }
        }
    }
    for delivery in held {
        // Released, not removed; a failed release only delays the message to its lease's end.
        let _ = delivery.nack(Duration::ZERO).await;
    }
    let _ = subscription.close().await;
    outcome.map(|complete| (ids.len(), complete))
}

/// A count or `-` for what is not visible.
fn count(n: Option<usize>) -> String {
    n.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// The text `millrace status` prints: the collector's table, the facilitators' records, then
/// each window's progress on both sides and why it waits, the bus's dead and rejected counts, and
/// the problems.
pub fn render_text(view: &StatusView) -> String {
    use std::fmt::Write as _;
    let mut out = collector_table(&view.collector_rows);
    if view
        .stores
        .iter()
        .any(|s| s.role != "collector" && s.visible)
    {
        out.push_str(&facilitators_table(&view.records));
    }
    let names: Vec<String> = view
        .stores
        .iter()
        .filter(|s| s.role != "collector")
        .map(|s| format!("{} = {}", s.role, s.name.as_deref().unwrap_or("?")))
        .collect();
    let _ = writeln!(
        out,
        "\nprogress per window ({}; awaiting = batches without this facilitator's validation)",
        names.join(", ")
    );
    let _ = writeln!(
        out,
        "{:<12} {:<31} {:<10} {:>1} {:>7} {:>8} {:>9} {:>8} {:<8} {:>4} {:>8}  why",
        "aggregation",
        "window",
        "state",
        "f",
        "batches",
        "awaiting",
        "validated",
        "manifest",
        "sum part",
        "late",
        "excluded"
    );
    for agg in &view.aggregations {
        for w in &agg.windows {
            for (n, f) in w.facilitators.iter().enumerate() {
                let (lead, state, why) = if n == 0 {
                    let why = match &w.deadline {
                        Some(d) if !w.reason.contains(d.as_str()) => {
                            format!("{} (next deadline {d})", w.reason)
                        }
                        _ => w.reason.clone(),
                    };
                    (
                        (agg.id.as_str(), w.window.as_str()),
                        w.state.label().to_uppercase(),
                        why,
                    )
                } else {
                    (("", ""), String::new(), String::new())
                };
                let side = f.progress.as_ref();
                let manifest = match side {
                    None => "-".to_string(),
                    Some(s) => s
                        .manifest_generation
                        .map_or_else(|| "none".to_string(), |g| format!("gen {g}")),
                };
                let line = format!(
                    "{:<12} {:<31} {:<10} {:>1} {:>7} {:>8} {:>9} {:>8} {:<8} {:>4} {:>8}  {}",
                    lead.0,
                    lead.1,
                    state,
                    f.index,
                    count(side.map(|s| s.batches)),
                    count(side.map(|s| s.awaiting_intake)),
                    count(side.map(|s| s.validated)),
                    manifest,
                    f.sum_part.label(),
                    count(side.map(|s| s.late)),
                    count(side.map(|s| s.excluded)),
                    why
                );
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
    }
    for s in view.stores.iter().filter(|s| !s.visible) {
        let flag = s.role.replace("facilitator ", "--store");
        let _ = writeln!(
            out,
            "not visible: {} ({}): no {flag}, so its batches, validations, manifests and records \
             are not shown (`-`); its sum parts are, from the collector's store",
            s.role,
            s.name.as_deref().unwrap_or("?")
        );
    }
    if let Some(bus) = &view.bus {
        let _ = writeln!(
            out,
            "\nmessages waiting ({} bus, prefix {}; read in the `{INSPECT_GROUP}` group and released)",
            bus.bus, bus.prefix
        );
        let _ = writeln!(out, "{:<28} {:>6} {:>9}", "topic", "dead", "rejected");
        for t in &bus.topics {
            let _ = writeln!(
                out,
                "{:<28} {:>6} {:>9}{}{}",
                t.topic,
                count(t.dead),
                count(t.rejected),
                if t.complete {
                    ""
                } else {
                    "  (scan stopped at its limit: maybe more)"
                },
                t.error
                    .as_deref()
                    .map(|e| format!("  {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if view.problems.is_empty() {
        out.push_str("\nproblems: none\n");
    } else {
        let _ = writeln!(out, "\nproblems ({}):", view.problems.len());
        for p in &view.problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}

/// `text` with `& < > " '` escaped for HTML text and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The window's start as `MM-DD HH:MM`, for a timeline cell's label.
fn short_start(window: &str) -> String {
    match Window::parse(window) {
        Ok(w) => chrono::DateTime::<chrono::Utc>::from_timestamp(w.start, 0)
            .map(|t| t.format("%m-%d %H:%M").to_string())
            .unwrap_or_else(|| window.to_string()),
        Err(_) => window.to_string(),
    }
}

/// The status page: a timeline per aggregation (a cell per window, coloured by state), a legend,
/// each window's progress on both sides, the bus's counts and the problems. Self-contained (inline
/// CSS and a few lines of script), reloads itself every `refresh`. Everything read from the stores
/// is escaped.
pub fn render_html(view: &StatusView, refresh: Duration, error: Option<&str>) -> String {
    use std::fmt::Write as _;
    let e = escape_html;
    let mut css = String::new();
    for s in WindowState::ALL {
        let _ = writeln!(
            css,
            ".state-{} {{ background-color: {}; }}",
            s.label(),
            s.colour()
        );
    }
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<title>millrace status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #1f2933; }}
h1 {{ font-size: 1.4em; margin-bottom: 0.2em; }}
h2 {{ font-size: 1.1em; margin-top: 1.5em; }}
.meta, .note {{ color: #52606d; font-size: 0.9em; }}
.error {{ color: #b42318; font-weight: bold; }}
#legend {{ list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; }}
#legend li {{ display: flex; align-items: center; gap: 0.3em; font-size: 0.9em; }}
.swatch {{ display: inline-block; width: 1em; height: 1em; border-radius: 2px; }}
.timeline {{ display: grid; grid-template-columns: 9em 1fr; gap: 0.4em 1em; align-items: center; }}
.agg {{ font-weight: bold; }}
.cells {{ display: flex; flex-wrap: wrap; gap: 3px; }}
.cell {{ display: inline-block; min-width: 5.5em; padding: 0.25em 0.3em; border-radius: 3px; color: #fff; font-size: 0.75em; text-align: center; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #d9e2ec; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }}
th {{ background: #f0f4f8; }}
td.num {{ text-align: right; }}
td.why {{ min-width: 18em; max-width: 34em; }}
.cell.state-waiting, .cell.state-open {{ color: #1f2933; }}
{css}</style>
</head>
<body>
<h1>millrace status</h1>
<p class="meta">as of <span id="generated">{generated}</span>; this page reloads every {secs} s; the same view as JSON: <a href="/status.json">/status.json</a></p>
"#,
        refresh = refresh.as_secs().max(1),
        secs = refresh.as_secs().max(1),
        generated = e(&view.generated_at),
    );
    if let Some(err) = error {
        let _ = writeln!(
            out,
            "<p class=\"error\" id=\"refresh-error\">the last refresh failed (showing the one before): {}</p>",
            e(err)
        );
    }
    for s in view.stores.iter().filter(|s| !s.visible) {
        let _ = writeln!(
            out,
            "<p class=\"note\">{} ({}) is not visible: its batches, validations and manifests are not shown.</p>",
            e(&s.role),
            e(s.name.as_deref().unwrap_or("?"))
        );
    }
    out.push_str("<ul id=\"legend\">\n");
    for s in WindowState::ALL {
        let _ = writeln!(
            out,
            "<li data-state=\"{l}\"><span class=\"swatch state-{l}\"></span>{l}: {}</li>",
            e(s.meaning()),
            l = s.label()
        );
    }
    out.push_str("</ul>\n<h2>Windows</h2>\n<div class=\"timeline\" id=\"timeline\">\n");
    for agg in &view.aggregations {
        let _ = write!(
            out,
            "<div class=\"agg\">{}</div><div class=\"cells\">",
            e(&agg.id)
        );
        if agg.windows.is_empty() {
            out.push_str("<span class=\"note\">no windows</span>");
        }
        for w in &agg.windows {
            let _ = write!(
                out,
                "<span class=\"cell state-{state}\" data-key=\"{key}\" data-state=\"{state}\" title=\"{title}\">{label}</span>",
                state = w.state.label(),
                key = e(&format!("{}/{}", agg.id, w.window)),
                title = e(&format!("{} {}: {}", w.window, w.state.label(), w.reason)),
                label = e(&short_start(&w.window)),
            );
        }
        out.push_str("</div>\n");
    }
    out.push_str("</div>\n<h2>Progress on both sides</h2>\n<table id=\"progress\">\n<tr><th rowspan=\"2\">aggregation</th><th rowspan=\"2\">window</th><th rowspan=\"2\">state</th><th rowspan=\"2\">why / result</th>");
    let facilitators: Vec<&StoreVisibility> = view
        .stores
        .iter()
        .filter(|s| s.role != "collector")
        .collect();
    for s in &facilitators {
        let _ = write!(
            out,
            "<th colspan=\"6\">{} ({})</th>",
            e(&s.role),
            e(s.name.as_deref().unwrap_or("?"))
        );
    }
    out.push_str("</tr>\n<tr>");
    for _ in &facilitators {
        out.push_str("<th>batches</th><th>awaiting intake</th><th>validated</th><th>manifest</th><th>sum part</th><th>late</th>");
    }
    out.push_str("</tr>\n");
    for agg in &view.aggregations {
        for w in &agg.windows {
            let deadline = w
                .deadline
                .as_deref()
                .filter(|d| !w.reason.contains(d))
                .map(|d| format!(" (next deadline {d})"))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<tr data-key=\"{key}\"><td>{agg}</td><td>{window}</td><td><span class=\"cell state-{state}\">{state}</span></td><td class=\"why\">{why}</td>",
                key = e(&format!("{}/{}", agg.id, w.window)),
                agg = e(&agg.id),
                window = e(&w.window),
                state = w.state.label(),
                why = e(&format!("{}{deadline}", w.reason)),
            );
            for f in &w.facilitators {
                match &f.progress {
                    Some(s) => {
                        let _ = write!(
                            out,
                            "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>",
                            s.batches,
                            s.awaiting_intake,
                            s.validated,
                            s.manifest_generation
                                .map_or_else(|| "none".to_string(), |g| format!("gen {g}")),
                            f.sum_part.label(),
                            s.late
                        );
                    }
                    None => {
                        let _ = write!(
                            out,
                            "<td colspan=\"4\" class=\"note\">not visible</td><td>{}</td><td></td>",
                            f.sum_part.label()
                        );
                    }
                }
            }
            out.push_str("</tr>\n");
        }
    }
    out.push_str("</table>\n");
    if let Some(bus) = &view.bus {
        let _ = writeln!(
            out,
            "<h2>Messages waiting</h2>\n<p class=\"meta\">{} bus, prefix {}</p>\n<table id=\"topics\"><tr><th>topic</th><th>.dead</th><th>.rejected</th><th>note</th></tr>",
            e(&bus.bus),
            e(&bus.prefix)
        );
        for t in &bus.topics {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                e(&t.topic),
                count(t.dead),
                count(t.rejected),
                e(t.error.as_deref().unwrap_or(if t.complete {
                    ""
                } else {
                    "scan stopped at its limit: maybe more"
                }))
            );
        }
        out.push_str("</table>\n");
    }
    let _ = writeln!(out, "<h2>Problems ({})</h2>", view.problems.len());
    if view.problems.is_empty() {
        out.push_str("<p id=\"problems\">none</p>\n");
    } else {
        out.push_str("<ul id=\"problems\">\n");
        for p in &view.problems {
            let _ = writeln!(out, "<li>{}</li>", e(p));
        }
        out.push_str("</ul>\n");
    }
    if !view.records.is_empty() {
        out.push_str("<h2>Batches left out, windows given up on</h2>\n<table id=\"records\"><tr><th>f</th><th>aggregation</th><th>window</th><th>what</th><th>batch</th><th>detail</th></tr>\n");
        for r in &view.records {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                r.facilitator,
                e(&r.aggregation),
                e(&r.window),
                e(&r.what),
                e(r.batch.as_deref().unwrap_or("-")),
                e(&r.detail)
            );
        }
        out.push_str("</table>\n");
    }
    // Each cell and swatch notes the colour the browser computed for it, so a headless browser's
    // DOM dump shows what an operator sees (tests/status_page.rs reads it).
    out.push_str(
        "<script>\ndocument.querySelectorAll('.cell, .swatch').forEach(function (el) {\n  el.setAttribute('data-colour', getComputedStyle(el).backgroundColor);\n});\n</script>\n</body>\n</html>\n",
    );
    out
}

/// What the page serves: the newest view, and the error of the last refresh if it failed.
struct Served {
    view: StatusView,
    error: Option<String>,
}

type Shared = Arc<tokio::sync::RwLock<Served>>;

/// `--serve ADDR`: reads the view once (an unreachable store fails here, before serving), binds
/// `addr`, prints `status page on http://ADDR/` on stdout, then refreshes the view every `refresh`
/// in the background and serves `/` (the page) and `/status.json` until Ctrl-C.
pub async fn serve(
    addr: &str,
    config: Arc<Config>,
    stores: StatusStores,
    probe: Option<BusProbe>,
    refresh: Duration,
) -> anyhow::Result<()> {
    use axum::extract::State;
    use axum::http::header;
    use axum::response::{Html, IntoResponse};
    use axum::routing::get;
    use std::io::Write as _;

    let first = build_view(
        &config,
        &stores,
        probe.as_ref(),
        chrono::Utc::now().timestamp(),
    )
    .await?;
    let shared: Shared = Arc::new(tokio::sync::RwLock::new(Served {
        view: first,
        error: None,
    }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--serve {addr}: cannot listen there"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("--serve {addr}: the bound address"))?;
    println!("status page on http://{local}/ (JSON: http://{local}/status.json)");
    let _ = std::io::stdout().flush();
    let refresher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(refresh).await;
                let now = chrono::Utc::now().timestamp();
                let fresh = build_view(&config, &stores, probe.as_ref(), now).await;
                let mut served = shared.write().await;
                match fresh {
                    Ok(view) => {
                        served.view = view;
                        served.error = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "status page refresh failed; serving the previous view");
                        served.error = Some(format!("{e:#}"));
                    }
                }
            }
        })
    };
    async fn page(State((shared, refresh)): State<(Shared, Duration)>) -> Html<String> {
        let served = shared.read().await;
        Html(render_html(&served.view, refresh, served.error.as_deref()))
    }
    async fn json(State((shared, _)): State<(Shared, Duration)>) -> impl IntoResponse {
        let served = shared.read().await;
        let body = serde_json::to_string_pretty(&served.view).unwrap_or_else(|e| {
            format!(
                "{{\"version\":{VIEW_VERSION},\"error\":{:?}}}",
                e.to_string()
            )
        });
        ([(header::CONTENT_TYPE, "application/json")], body)
    }
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/status.json", get(json))
        .with_state((shared, refresh));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .with_context(|| format!("serving the status page on {local}"));
    refresher.abort();
    served
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use millrace_bus::memory::MemoryBus;
    use millrace_bus::Message;
    use millrace_protocol::results::COMPUTATION_VERSION;

    const HOUR: i64 = 3600;
    /// 2026-11-23T12:00Z–13:00Z.
    const W: Window = Window {
        start: 1_795_435_200,
        end: 1_795_435_200 + HOUR,
    };
    const T: Timing = Timing {
        grace: 600,
        max_age: 86_400,
        peer_deadline: 600,
        wait_deadline: 3600,
    };

    fn names() -> [String; 2] {
        ["alpha".to_string(), "beta".to_string()]
    }

    fn side(batches: usize, validated: usize, manifest: Option<u32>) -> Option<Side> {
        Some(Side {
            batches,
            awaiting_intake: batches - validated,
            validated,
            peer_validated: validated,
            manifest_generation: manifest,
            ..Side::default()
        })
    }

    fn facts(sides: [Option<Side>; 2], pending: usize) -> Facts {
        let lacking = [0, 1].map(|i| sides[i].as_ref().map_or(0, |s| s.awaiting_intake));
        Facts {
            window: W,
            collector: CollectorSide::Nothing,
            sides,
            pending_validation: pending,
            lacking_validation: lacking,
            generation: None,
            sum_parts: [SumPartState::Missing; 2],
        }
    }

    fn judged(f: &Facts, now: i64) -> Verdict {
        judge(f, &T, &names(), now)
    }

    #[test]
    fn a_window_before_its_grace_ends_is_open_until_then() {
        let v = judged(&facts([side(2, 0, None), side(2, 0, None)], 2), W.end + 60);
        assert_eq!(v.state, WindowState::Open);
        assert_eq!(v.deadline, Some(W.end + 600));
        assert!(
            v.reason
                .starts_with("window not closed until 2026-11-23T13:10:00+00:00"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn a_closed_window_names_the_batches_each_side_has_not_validated() {
        let v = judged(&facts([side(5, 2, None), side(5, 5, None)], 3), W.end + 700);
        assert_eq!(v.state, WindowState::Waiting);
        assert!(
            v.reason.starts_with(
                "waiting for validations: 3 batches (not validated yet by facilitator 0 (alpha): 3)"
            ),
            "{}",
            v.reason
        );
        assert_eq!(v.deadline, Some(W.end + T.max_age));
        // Past max age the leader decides at its next pass: no deadline ahead.
        let v = judged(
            &facts([side(5, 4, None), side(5, 5, None)], 1),
            W.end + T.max_age + 1,
        );
        assert!(
            v.reason.starts_with("waiting for validations: 1 batch ("),
            "{}",
            v.reason
        );
        assert!(v.reason.contains("past max age"), "{}", v.reason);
        assert_eq!(v.deadline, None);
    }

    #[test]
    fn a_validated_window_without_a_manifest_waits_for_the_leader() {
        let v = judged(&facts([side(4, 4, None), side(4, 4, None)], 0), W.end + 700);
        assert_eq!(v.state, WindowState::Waiting);
        assert!(
            v.reason.starts_with("waiting for the manifest: "),
            "{}",
            v.reason
        );
        assert!(
            v.reason.contains("facilitator 0 (alpha) writes it"),
            "{}",
            v.reason
        );
        assert_eq!(v.deadline, Some(W.end + T.max_age + T.wait_deadline));
        // Without the leader's store the page says so rather than guessing.
        let v = judged(&facts([None, side(4, 4, None)], 0), W.end + 700);
        assert!(
            v.reason.contains("facilitator 0's store is not visible"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn a_missing_sum_part_is_named_with_the_mills_deadline() {
        let mut f = facts([side(4, 4, Some(2)), side(4, 4, Some(2))], 0);
        f.generation = Some(2);
        f.sum_parts = [SumPartState::Written, SumPartState::Missing];
        f.collector = CollectorSide::WaitingForParts {
            since: Some(W.end + 900),
        };
        let v = judged(&f, W.end + 1000);
        assert_eq!(v.state, WindowState::Waiting);
        assert_eq!(
            v.reason,
            "waiting for facilitator 1 (beta)'s sum part (generation 2); the mill records it \
             FAILED at 2026-11-23T14:15:00+00:00"
        );
        assert_eq!(v.deadline, Some(W.end + 900 + T.wait_deadline));
        f.sum_parts = [SumPartState::Missing; 2];
        assert!(judged(&f, W.end + 1000)
            .reason
            .starts_with("waiting for both facilitators' sum parts (generation 2)"));
        f.sum_parts = [SumPartState::Written; 2];
        assert!(judged(&f, W.end + 1000)
            .reason
            .starts_with("waiting for the mill to join both sum parts"));
        f.sum_parts = [SumPartState::Written, SumPartState::Refused];
        assert!(judged(&f, W.end + 1000).reason.contains("REFUSED"));
        // The leader's manifest not yet in the helper's store.
        let mut f = facts([side(4, 4, Some(0)), side(4, 4, None)], 0);
        f.generation = Some(0);
        f.sum_parts = [SumPartState::Written, SumPartState::Missing];
        assert!(judged(&f, W.end + 1000)
            .reason
            .starts_with("waiting for the manifest in facilitator 1 (beta)'s store"));
    }

    #[test]
    fn final_answers_win_over_everything_still_visible() {
        let mut f = facts([side(4, 1, None), side(4, 4, None)], 3);
        f.collector = CollectorSide::Released(ResultView {
            value: "42".into(),
            report_count: 40,
            invalid_count: 2,
            invalid_reasons: BTreeMap::new(),
        });
        let v = judged(&f, W.end + 700);
        assert_eq!(v.state, WindowState::Succeeded);
        assert_eq!(v.reason, "result 42 (40 valid, 2 invalid)");
        f.collector = CollectorSide::Failed("digests differ".into());
        assert_eq!(
            judged(&f, W.end + 700),
            Verdict {
                state: WindowState::Failed,
                reason: "digests differ".into(),
                deadline: None
            }
        );
        f.collector = CollectorSide::Refused("3 valid reports, fewer than 10".into());
        assert_eq!(judged(&f, W.end + 700).state, WindowState::Refused);
        f.collector = CollectorSide::Nothing;
        f.sides[1] = Some(Side {
            gave_up: Some("no window manifest from the leader".into()),
            ..Side::default()
        });
        let v = judged(&f, W.end + 700);
        assert_eq!(v.state, WindowState::Failed);
        assert_eq!(
            v.reason,
            "facilitator 1 (beta) gave up: no window manifest from the leader"
        );
        for s in WindowState::ALL {
            assert_eq!(
                s.is_problem(),
                matches!(
                    s,
                    WindowState::Failed | WindowState::Refused | WindowState::Unreadable
                )
            );
        }
    }

    /// A config from `keygen`, and memory stores holding one window of `clicks` two hours ago:
    /// 3 batches, facilitator 0 validated 2 of them, nothing else.
    async fn small_state(dir: &std::path::Path, now: i64) -> (Config, StatusStores, Window) {
        let path = crate::keygen::keygen(dir, false).unwrap();
        let config = Config::load(&path).unwrap();
        let stores = StatusStores {
            collector: Store::memory(),
            facilitators: [Some(Store::memory()), None],
        };
        let w = Window::containing(now - 2 * HOUR, HOUR);
        let p = Partition::of(w.start);
        let s0 = stores.facilitators[0].as_ref().unwrap();
        for b in ["b1", "b2", "b3"] {
            s0.create(
                &millrace_protocol::layout::ingestion_key("clicks", p, b),
                b"x".to_vec(),
            )
            .await
            .unwrap();
        }
        for b in ["b1", "b2"] {
            s0.create(
                &millrace_protocol::layout::validation_key("clicks", p, b, 0),
                b"x".to_vec(),
            )
            .await
            .unwrap();
        }
        (config, stores, w)
    }

    /// A FAILED record, saying `detail`, for a window of "spend" five hours ago, in the
    /// collector's store; returns that window.
    async fn write_failed(stores: &StatusStores, now: i64, detail: &str) -> Window {
        let failed = Window::containing(now - 5 * HOUR, HOUR);
        let record = Computation {
            version: COMPUTATION_VERSION,
            aggregation: "spend".into(),
            window: failed.name(),
            state: ComputationState::Failed,
            generation: 0,
            updated_at: now,
            since: None,
            detail: Some(detail.into()),
        };
        stores
            .collector
            .create(&computation_key("spend", failed), record.to_json())
            .await
            .unwrap();
        failed
    }

    #[tokio::test]
    async fn the_json_view_is_versioned_with_a_fixed_shape() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now().timestamp();
        let (config, stores, w) = small_state(dir.path(), now).await;
        // A FAILED window of another aggregation in the collector's store.
        let failed =
            write_failed(&stores, now, "sum part of facilitator 1 (beta) never came").await;
        let view = build_view(&config, &stores, None, now).await.unwrap();
        let json = serde_json::to_value(&view).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(json["version"], 1);
        assert_eq!(
            keys(&json),
            [
                "aggregations",
                "bus",
                "generated_at",
                "problems",
                "records",
                "stores",
                "version"
            ]
        );
        assert!(json["bus"].is_null());
        assert_eq!(json["stores"][2]["role"], "facilitator 1");
        assert_eq!(json["stores"][2]["visible"], false);
        let clicks = json["aggregations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "clicks")
            .unwrap();
        let window = &clicks["windows"][0];
        assert_eq!(
            keys(window),
            [
                "deadline",
                "end",
                "facilitators",
                "generation",
                "reason",
                "result",
                "start",
                "state",
                "window"
            ]
        );
        assert_eq!(window["window"], w.name());
        assert_eq!(window["state"], "waiting");
        assert!(
            window["reason"].as_str().unwrap().starts_with(
                "waiting for validations: 3 batches (not validated yet by facilitator 0 (alpha): 1, facilitator 1 (beta): 3)"
            ),
            "{window}"
        );
        let f0 = &window["facilitators"][0];
        assert_eq!(
            keys(f0),
            ["index", "name", "progress", "sum_part", "visible"]
        );
        assert_eq!(f0["progress"]["batches"], 3);
        assert_eq!(f0["progress"]["awaiting_intake"], 1);
        assert_eq!(f0["progress"]["validated"], 2);
        assert!(f0["progress"]["manifest_generation"].is_null());
        assert_eq!(f0["sum_part"], "missing");
        let f1 = &window["facilitators"][1];
        assert_eq!(f1["visible"], false);
        assert!(f1["progress"].is_null());
        // The FAILED window is there, and is the one problem.
        let spend = json["aggregations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "spend")
            .unwrap();
        assert_eq!(spend["windows"][0]["state"], "failed");
        assert_eq!(view.problems.len(), 1, "{:?}", view.problems);
        assert!(view.problems[0].starts_with(&format!("spend {}: FAILED", failed.name())));
        // The text view says what is not visible.
        let text = render_text(&view);
        assert!(
            text.contains("not visible: facilitator 1 (beta): no --store1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_page_escapes_what_the_stores_say() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now().timestamp();
        let (config, stores, _) = small_state(dir.path(), now).await;
        let failed = write_failed(&stores, now, "<script>alert('x')</script> & \"more\"").await;
        let view = build_view(&config, &stores, None, now).await.unwrap();
        let page = render_html(&view, Duration::from_secs(5), Some("<b>boom</b>"));
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;")
        );
        assert!(page.contains("&lt;b&gt;boom&lt;/b&gt;"));
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(page.contains(&format!(
            "class=\"cell state-failed\" data-key=\"spend/{}\"",
            failed.name()
        )));
        for s in WindowState::ALL {
            assert!(page.contains(&format!("<li data-state=\"{}\">", s.label())));
        }
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external assets"
        );
    }

    #[tokio::test]
    async fn dead_and_rejected_messages_are_counted_and_left_in_place() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let prefix = "p";
        for t in topic_names(prefix) {
            bus.create_topic(&millrace_bus::dead_topic(&t), Some(INSPECT_GROUP))
                .await
                .unwrap();
            bus.create_topic(&millrace_bus::rejected_topic(&t), Some(INSPECT_GROUP))
                .await
                .unwrap();
        }
        for i in 0..2 {
            bus.publish("p.collect.dead", Message::new(format!("dead {i}")))
                .await
                .unwrap();
        }
        for i in 0..3 {
            bus.publish("p.0.intake.rejected", Message::new(format!("bad {i}")))
                .await
                .unwrap();
        }
        let probe = BusProbe {
            bus: bus.clone(),
            prefix: prefix.into(),
            scan: ScanOptions {
                idle: Duration::from_millis(200),
                max_wait: Duration::from_secs(5),
                limit: 100,
                release_delay: Duration::from_millis(100),
            },
        };
        for round in 0..2 {
            let counts = count_topics(&probe).await;
            let get = |t: &str| counts.iter().find(|c| c.topic == t).unwrap().clone();
            assert_eq!(counts.len(), 6);
            assert_eq!(get("p.collect").dead, Some(2), "round {round}: {counts:?}");
            assert_eq!(
                get("p.0.intake").rejected,
                Some(3),
                "round {round}: {counts:?}"
            );
            assert_eq!(get("p.0.intake").dead, Some(0));
            assert_eq!(get("p.1.aggregate").rejected, Some(0));
            assert!(counts.iter().all(|c| c.complete && c.error.is_none()));
            // Released, not removed: the next round sees the same (after the release delay).
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}
