//! `millrace status`: every window the collector knows of, and its state.

use millrace_protocol::config::Config;
use millrace_protocol::layout::{result_key, Window};
use millrace_protocol::results::{AggregationResult, Computation};
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
            rows.push(WindowStatus {
                aggregation: agg.id.clone(),
                window: c.window,
                state: format!("{:?}", c.state),
                detail: c.detail,
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
    }
}

/// Waits up to `wait` for every expected window's result, prints each beside its expectation,
/// and says whether all of them match.
pub async fn check(
    collector: &Store,
    expectations: &crate::ingest::Expectations,
    wait: std::time::Duration,
) -> anyhow::Result<bool> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut results = Vec::new();
        for e in &expectations.windows {
            let w = Window::parse(&e.window)?;
            let r = match collector.get(&result_key(&e.aggregation, w)).await? {
                Some(b) => Some(AggregationResult::from_json(&b)?),
                None => None,
            };
            results.push(r);
        }
        let complete = results.iter().all(Option::is_some);
        if complete || std::time::Instant::now() >= deadline {
            let mut all = complete;
            for (e, r) in expectations.windows.iter().zip(&results) {
                let ok = r.as_ref().is_some_and(|r| {
                    r.result == e.expected
                        && r.report_count == e.valid
                        && r.invalid_count == e.invalid
                });
                all &= ok;
                let got = r
                    .as_ref()
                    .map(|r| {
                        format!(
                            "{} ({} valid, {} invalid)",
                            r.result, r.report_count, r.invalid_count
                        )
                    })
                    .unwrap_or_else(|| "no result".to_string());
                println!(
                    "{:<5} {:<12} {:<31} got {got}; expected {} ({} valid, {} invalid)",
                    if ok { "ok" } else { "WRONG" },
                    e.aggregation,
                    e.window,
                    e.expected,
                    e.valid,
                    e.invalid
                );
            }
            return Ok(all);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
