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
            });
        }
    }
    Ok(rows)
}

pub fn print(rows: &[WindowStatus]) {
    println!(
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
        println!(
            "{:<12} {:<31} {:<16} {:>9} {:>8}  {}",
            r.aggregation, r.window, r.state, reports, invalid, value
        );
        if let Some(reasons) = r
            .result
            .as_ref()
            .filter(|res| !res.invalid_reasons.is_empty())
            .map(|res| invalid_reasons(&res.invalid_reasons))
        {
            println!("{:<12} {:<31} invalid: {reasons}", "", "");
        }
    }
}

/// `undecryptable 3, outside-window 2`: a result's invalid counts by reason.
pub fn invalid_reasons(reasons: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    parts.join(", ")
}

/// One row of a facilitator's view: a batch left out of a window, or a window it gave up on.
#[derive(Clone, Debug)]
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
    println!();
    if rows.is_empty() {
        println!("facilitators: no batch left out of any window, no window given up on");
        return;
    }
    println!(
        "{:<3} {:<12} {:<31} {:<24} {:<40}  detail",
        "f", "aggregation", "window", "what", "batch"
    );
    for r in rows {
        println!(
            "{:<3} {:<12} {:<31} {:<24} {:<40}  {}",
            r.facilitator,
            r.aggregation,
            r.window,
            r.what,
            r.batch.as_deref().unwrap_or("-"),
            r.detail
        );
    }
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
