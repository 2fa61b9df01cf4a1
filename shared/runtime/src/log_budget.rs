//! Bounded logging for failures that repeat.
//!
//! A broker that is down, or a poison message that keeps coming back, must not turn into a flood:
//! the old failure mode was half a gigabyte of log lines in minutes. A [`LogBudget`] lets each kind
//! of event (a key such as `"receive"` or `"transient"`, usually with the topic) log its detail a
//! few times per window; past that it only counts, and the next line that is allowed says how many
//! were left out (`suppressed = N`). What is suppressed is still counted in
//! `millrace_log_lines_suppressed_total{kind}`, so nothing goes unseen.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How many keys are remembered before old windows are forgotten (keys are few: kinds × topics).
const MAX_KEYS: usize = 4096;

struct Entry {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Allows `per_window` detailed lines per key per `window`, and counts the rest.
pub struct LogBudget {
    per_window: u32,
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogBudget {
            per_window: per_window.max(1),
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` if a line for `key` may be logged now (`n` lines for it were suppressed since the
    /// last one that was); `None` if it is over budget, in which case it has been counted.
    pub fn allow(&self, kind: &'static str, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= MAX_KEYS && !entries.contains_key(key) {
            let window = self.window;
            entries.retain(|_, e| now.duration_since(e.window_start) < window);
            if entries.len() >= MAX_KEYS {
                entries.clear();
            }
        }
        let entry = entries.entry(key.to_string()).or_insert(Entry {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(entry.window_start) >= self.window {
            entry.window_start = now;
            entry.logged = 0;
        }
        if entry.logged < self.per_window {
            entry.logged += 1;
            Some(std::mem::take(&mut entry.suppressed))
        } else {
            entry.suppressed += 1;
            metrics::counter!("millrace_log_lines_suppressed_total", "kind" => kind).increment(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_repeating_event_logs_a_few_times_then_counts_and_reports_the_count() {
        let budget = LogBudget::new(2, Duration::from_secs(60));
        assert_eq!(budget.allow("t", "receive"), Some(0));
        assert_eq!(budget.allow("t", "receive"), Some(0));
        for _ in 0..1000 {
            assert_eq!(budget.allow("t", "receive"), None);
        }
        // Another key has its own budget.
        assert_eq!(budget.allow("t", "transient"), Some(0));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(budget.allow("t", "receive"), Some(1000));
        assert_eq!(budget.allow("t", "receive"), Some(0));
        assert_eq!(budget.allow("t", "receive"), None);
    }

    #[tokio::test]
    async fn many_keys_stay_bounded() {
        let budget = LogBudget::new(1, Duration::from_secs(60));
        for i in 0..(3 * MAX_KEYS) {
            budget.allow("t", &format!("k{i}"));
        }
        assert!(budget.entries.lock().unwrap().len() <= MAX_KEYS);
    }
}
