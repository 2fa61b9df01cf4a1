//! Rate-limited warnings: a failure that repeats on every pass (one bad object name in a
//! partition, say) logs its detail once per period and per subject, then only counts.
//!
//! [`LogLimiter::hit`] is called on every occurrence; it answers `Some(n)` when the caller should
//! log now, `n` being the occurrences since the last logged one (this one included), and `None`
//! while the subject is quiet. Metrics are counted by the caller on every occurrence, so the
//! count is exact even when the log is not.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Subjects remembered at once; past this, subjects not logged for a period are forgotten, and if
/// that is not enough the memory is cleared (the next occurrence of each subject logs again).
const MAX_SUBJECTS: usize = 4096;

/// One warning per subject per `period`, with a count of the occurrences in between.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    subjects: Mutex<HashMap<String, Subject>>,
}

#[derive(Debug)]
struct Subject {
    logged_at: Instant,
    unlogged: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(60))
    }
}

impl LogLimiter {
    pub fn new(period: Duration) -> Self {
        LogLimiter {
            period,
            subjects: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Subject>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.subjects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `count` occurrences for `subject`; `Some(n)` if a line should be logged now, `n`
    /// being the occurrences it stands for.
    pub fn hit(&self, subject: &str, count: u64) -> Option<u64> {
        let now = Instant::now();
        let mut subjects = self.lock();
        if let Some(s) = subjects.get_mut(subject) {
            s.unlogged += count;
            if now.duration_since(s.logged_at) < self.period {
                return None;
            }
            let n = s.unlogged;
            s.logged_at = now;
            s.unlogged = 0;
            return Some(n);
        }
        if subjects.len() >= MAX_SUBJECTS {
            let period = self.period;
            subjects.retain(|_, s| now.duration_since(s.logged_at) < period);
            if subjects.len() >= MAX_SUBJECTS {
                subjects.clear();
            }
        }
        subjects.insert(
            subject.to_string(),
            Subject {
                logged_at: now,
                unlogged: 0,
            },
        );
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_subject_per_period_with_the_count_in_between() {
        let l = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(l.hit("a", 1), Some(1));
        assert_eq!(l.hit("a", 2), None);
        assert_eq!(l.hit("a", 1), None);
        assert_eq!(l.hit("b", 1), Some(1), "subjects are limited separately");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.hit("a", 1), Some(4), "the next line carries the count");
        assert_eq!(l.hit("a", 1), None);
    }

    #[test]
    fn memory_is_bounded() {
        let l = LogLimiter::new(Duration::from_secs(600));
        for i in 0..(MAX_SUBJECTS * 2) {
            assert_eq!(l.hit(&i.to_string(), 1), Some(1));
        }
        assert!(l.lock().len() <= MAX_SUBJECTS);
    }
}
