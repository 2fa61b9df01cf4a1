//! Where every object lives, and the ids that become parts of keys.
//!
//! A facilitator's store:
//!
//! ```text
//! ingestion/{agg}/{YYYY}/{MM}/{DD}/{HH}/{batch}.batch             written by ingestors
//! validation/{agg}/{YYYY}/{MM}/{DD}/{HH}/{batch}.validation.{i}    by facilitator i (own and peer)
//! states/{agg}/{YYYY}/{MM}/{DD}/{HH}/{batch}.states                own verify states (private)
//! markers/{agg}/intake/{YYYY}/{MM}/{DD}/{HH}/{batch}                workflow-manager markers
//! markers/{agg}/aggregate/{window}
//! ```
//!
//! The collector's store:
//!
//! ```text
//! sums/{agg}/{window}.sum.{i}
//! results/{agg}/{window}.result.json
//! computations/{agg}/{window}.json                                 the mill's record of the window
//! markers/{agg}/results/{window}                                   the mill's result-ready marker
//! ```
//!
//! Keys are partitioned by the hour the batch was collected, so the workflow-manager lists only
//! the partitions that can still hold new work: a scan costs O(new objects), never O(history).

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};

use crate::error::FormatError;

/// Checks an id that will become part of an object key: 1–64 of `[A-Za-z0-9_-]`. No dots (they
/// separate suffixes), no slashes, nothing that could climb out of a prefix.
pub fn validate_id(what: &str, id: &str) -> Result<(), FormatError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FormatError::Invalid(format!(
            "{what} {id:?} is not a valid id (1-64 characters of A-Z a-z 0-9 - _)"
        )))
    }
}

/// One hour-long time partition, `YYYY/MM/DD/HH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    /// Start of the hour, unix seconds.
    pub start: i64,
}

impl Partition {
    pub fn of(time: i64) -> Self {
        Partition {
            start: time.div_euclid(3600) * 3600,
        }
    }

    pub fn path(&self) -> String {
        match Utc.timestamp_opt(self.start, 0).single() {
            Some(t) => format!(
                "{:04}/{:02}/{:02}/{:02}",
                t.year(),
                t.month(),
                t.day(),
                t.hour()
            ),
            None => "0000/00/00/00".to_string(),
        }
    }

    /// Parses `YYYY/MM/DD/HH`.
    pub fn parse(path: &str) -> Result<Self, FormatError> {
        let bad = || FormatError::Invalid(format!("partition {path:?} is not YYYY/MM/DD/HH"));
        let parts: Vec<&str> = path.split('/').collect();
        let [y, m, d, h] = parts.as_slice() else {
            return Err(bad());
        };
        let num = |s: &str, len: usize| -> Result<u32, FormatError> {
            if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse().map_err(|_| bad())
        };
        let t = Utc
            .with_ymd_and_hms(num(y, 4)? as i32, num(m, 2)?, num(d, 2)?, num(h, 2)?, 0, 0)
            .single()
            .ok_or_else(bad)?;
        Ok(Partition {
            start: t.timestamp(),
        })
    }

    /// The partitions whose hour overlaps `[from, to)`, oldest first.
    pub fn range(from: i64, to: i64) -> Vec<Partition> {
        let mut out = Vec::new();
        let mut p = Partition::of(from);
        while p.start < to {
            out.push(p);
            p.start += 3600;
        }
        out
    }
}

/// An aggregation window `[start, end)`, aligned to multiples of its length since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub start: i64,
    pub end: i64,
}

fn compact(t: i64) -> String {
    match Utc.timestamp_opt(t, 0).single() {
        Some(t) => t.format("%Y%m%dT%H%MZ").to_string(),
        None => t.to_string(),
    }
}

impl Window {
    pub fn containing(time: i64, length_secs: i64) -> Self {
        let start = time.div_euclid(length_secs) * length_secs;
        Window {
            start,
            end: start + length_secs,
        }
    }

    /// The window's name in object keys: `20261123T1200Z-20261123T1300Z`.
    pub fn name(&self) -> String {
        format!("{}-{}", compact(self.start), compact(self.end))
    }

    pub fn parse(name: &str) -> Result<Self, FormatError> {
        let bad = || FormatError::Invalid(format!("window {name:?} is not START-END"));
        let (a, b) = name.split_once('-').ok_or_else(bad)?;
        let parse = |s: &str| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%MZ")
                .map(|t| t.and_utc().timestamp())
                .map_err(|_| bad())
        };
        let w = Window {
            start: parse(a)?,
            end: parse(b)?,
        };
        if w.end <= w.start {
            return Err(bad());
        }
        Ok(w)
    }

    pub fn rfc3339(t: i64) -> String {
        DateTime::<Utc>::from_timestamp(t, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| t.to_string())
    }
}

pub fn ingestion_prefix(agg: &str, p: Partition) -> String {
    format!("ingestion/{agg}/{}/", p.path())
}
pub fn ingestion_key(agg: &str, p: Partition, batch: &str) -> String {
    format!("ingestion/{agg}/{}/{batch}.batch", p.path())
}
pub fn validation_prefix(agg: &str, p: Partition) -> String {
    format!("validation/{agg}/{}/", p.path())
}
pub fn validation_key(agg: &str, p: Partition, batch: &str, facilitator: u8) -> String {
    format!(
        "validation/{agg}/{}/{batch}.validation.{facilitator}",
        p.path()
    )
}
pub fn states_key(agg: &str, p: Partition, batch: &str) -> String {
    format!("states/{agg}/{}/{batch}.states", p.path())
}
pub fn intake_marker_key(agg: &str, p: Partition, batch: &str) -> String {
    format!("markers/{agg}/intake/{}/{batch}", p.path())
}
pub fn aggregate_marker_key(agg: &str, w: Window) -> String {
    format!("markers/{agg}/aggregate/{}", w.name())
}
/// The collector's marker that a window's `result-ready` was published (once).
pub fn result_marker_key(agg: &str, w: Window) -> String {
    format!("markers/{agg}/results/{}", w.name())
}
pub fn sum_part_key(agg: &str, w: Window, facilitator: u8) -> String {
    format!("sums/{agg}/{}.sum.{facilitator}", w.name())
}
pub fn result_key(agg: &str, w: Window) -> String {
    format!("results/{agg}/{}.result.json", w.name())
}
pub fn computation_key(agg: &str, w: Window) -> String {
    format!("computations/{agg}/{}.json", w.name())
}

/// Parses a key of the `ingestion/` area back into (partition, batch id). `None` for anything
/// else found under the prefix (temporary files, foreign objects).
pub fn parse_ingestion_key(agg: &str, key: &str) -> Option<(Partition, String)> {
    let rest = key.strip_prefix(&format!("ingestion/{agg}/"))?;
    let (partition, file) = rest.rsplit_once('/')?;
    let batch = file.strip_suffix(".batch")?;
    validate_id("batch id", batch).ok()?;
    Some((Partition::parse(partition).ok()?, batch.to_string()))
}

/// Parses a key of the `validation/` area into (partition, batch id, facilitator).
pub fn parse_validation_key(agg: &str, key: &str) -> Option<(Partition, String, u8)> {
    let rest = key.strip_prefix(&format!("validation/{agg}/"))?;
    let (partition, file) = rest.rsplit_once('/')?;
    let (batch, facilitator) = file.rsplit_once(".validation.")?;
    let facilitator = match facilitator {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    validate_id("batch id", batch).ok()?;
    Some((
        Partition::parse(partition).ok()?,
        batch.to_string(),
        facilitator,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_prefix_are_refused() {
        for bad in ["", "..", "a/b", "a.b", "x\0", &"a".repeat(65)] {
            assert!(validate_id("batch id", bad).is_err(), "{bad:?}");
        }
        validate_id("batch id", "b-01_x").unwrap();
    }

    #[test]
    fn partitions_and_windows_round_trip() {
        let t = 1_763_900_000; // 2025-11-23T12:13:20Z
        let p = Partition::of(t);
        assert_eq!(p.path(), "2025/11/23/12");
        assert_eq!(Partition::parse(&p.path()).unwrap(), p);
        assert!(Partition::parse("2025/11/23").is_err());
        assert!(Partition::parse("2025/13/23/12").is_err());
        let w = Window::containing(t, 3600);
        assert_eq!(w.name(), "20251123T1200Z-20251123T1300Z");
        assert_eq!(Window::parse(&w.name()).unwrap(), w);
        assert_eq!(Partition::range(w.start, w.end), vec![p]);
        assert_eq!(Partition::range(w.start - 1, w.end).len(), 2);
    }

    #[test]
    fn keys_parse_back() {
        let p = Partition::of(1_763_900_000);
        let k = ingestion_key("clicks", p, "b1");
        assert_eq!(parse_ingestion_key("clicks", &k), Some((p, "b1".into())));
        assert_eq!(parse_ingestion_key("other", &k), None);
        let v = validation_key("clicks", p, "b1", 1);
        assert_eq!(
            parse_validation_key("clicks", &v),
            Some((p, "b1".into(), 1))
        );
        assert_eq!(
            parse_validation_key("clicks", "validation/clicks/2025/11/23/12/b1.validation.7"),
            None
        );
    }
}
