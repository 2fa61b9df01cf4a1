//! Lag: how long after an event the fleet acted on it, as Prometheus histograms with explicit
//! buckets (the same everywhere, from a second to a day), labelled by aggregation. Together they
//! answer "is it keeping up": a batch's way through intake, and a window's from its end to its
//! result.

/// Batch written (the store's time of the ingestion object) → its intake task published
/// (workflow-manager).
pub const BATCH_INTAKE: &str = "millrace_batch_intake_lag_seconds";
/// Batch written (its signed time) → validated (intake-worker).
pub const BATCH_VALIDATION: &str = "millrace_batch_validation_lag_seconds";
/// Window ended → its manifest written (the leader's workflow-manager).
pub const WINDOW_MANIFEST: &str = "millrace_window_manifest_lag_seconds";
/// Window ended → this facilitator's sum part written (aggregate-worker).
pub const WINDOW_SUM_PART: &str = "millrace_window_sum_part_lag_seconds";
/// Window ended → its result released (mill).
pub const WINDOW_RESULT: &str = "millrace_window_result_lag_seconds";

/// Every lag histogram.
pub const ALL: [&str; 5] = [
    BATCH_INTAKE,
    BATCH_VALIDATION,
    WINDOW_MANIFEST,
    WINDOW_SUM_PART,
    WINDOW_RESULT,
];

/// The buckets (seconds) of every `*_lag_seconds` histogram: minute windows with a short grace
/// land in the first rows, hour windows with a day's horizon in the last.
pub const BUCKETS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

/// Records, in `metric`, the seconds from `since` (unix seconds) to now; a `since` in the future
/// (a clock ahead of ours) counts as no lag.
pub fn record(metric: &'static str, aggregation: &str, since: i64) {
    let now = chrono_now();
    let lag = (now - since as f64).max(0.0);
    metrics::histogram!(metric, "aggregation" => aggregation.to_string()).record(lag);
}

fn chrono_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
