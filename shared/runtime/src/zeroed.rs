//! Failure counters exist from the start, at zero, rather than appearing with the first failure:
//! an alert on `rate(...)` or `increase(...)` then sees a series before anything goes wrong, and a
//! dashboard shows 0 instead of "no data". Each service names, at start-up, the label values it
//! will count under (its aggregations, its topics).

/// Registers the counter `name` with `labels` at zero (a no-op if it already counts something).
pub fn counter(name: &'static str, labels: &[(&'static str, &str)]) {
    let labels: Vec<metrics::Label> = labels
        .iter()
        .map(|(key, value)| metrics::Label::new(*key, value.to_string()))
        .collect();
    metrics::counter!(name, labels).increment(0);
}
