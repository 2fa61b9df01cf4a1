//! Where every object lives, and the ids that become parts of keys.
//!
//! A facilitator's store:
//!
//! ```text
//! ingestion/{agg}/{YYYY}/{MM}/{DD}/{HH}/{batch}.batch             written by ingestors
//! validation/{agg}/{YYYY}/{MM}/{DD}/{HH}/{batch}.validation.{i}    by facilitator i (own and peer)
//! states/{agg}/{YYYY}/{MM}/{DD}/{HH}/{batch}.states                own verify states (private)
//! manifests/{agg}/{window}/{generation}.manifest                   the leader's window manifest (both stores)
//! excluded/{agg}/{window}/{batch}.json                             a batch left out of a window, and why
//! computations/{agg}/{window}.json                                 this facilitator's record of a window it gave up on
//! markers/{agg}/intake/{YYYY}/{MM}/{DD}/{HH}/{batch}                workflow-manager markers
//! markers/{agg}/aggregate/{window}.{generation}
//! markers/{agg}/settled/{YYYY}/{MM}/{DD}/{HH}                       a partition no pass needs to list again
//! ```
//!
//! The collector's store:
//!
//! ```text
//! sums/{agg}/{window}/{generation}.sum.{i}
//! results/{agg}/{window}.result.json
//! computations/{agg}/{window}.json                                 the mill's record of the window
//! waiting/{agg}/{window}                                           windows the mill waits on (an index)
//! markers/{agg}/results/{window}                                   the mill's result-ready marker
//! ```
//!
//! Keys are partitioned by the hour the batch was collected (by its window, for windows shorter
//! than an hour: `{HH}/{MM}-{MM}`), and a partition whose batches are
//! all scheduled and whose window has its manifest is marked settled, so the workflow-manager
//! lists only partitions that can still hold new work: a pass costs O(new objects), not
//! O(history).

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

/// One time partition of an aggregation's batches: an hour, `YYYY/MM/DD/HH`, or for an
/// aggregation whose windows are shorter than an hour, one window, `YYYY/MM/DD/HH/MM-MM` (the
/// minutes of the hour it spans: `2026/11/28/16/05-10`, the last one of an hour ending in `60`).
/// Every partition lies inside one window, and a path says its own length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    /// Start, unix seconds.
    pub start: i64,
    /// Length in seconds: 3600, or a whole number of minutes dividing the hour.
    pub secs: i64,
}

/// The partition length of an aggregation with windows of `window_secs`: the window itself
/// when shorter than an hour, the hour otherwise.
pub fn partition_secs(window_secs: i64) -> i64 {
    window_secs.clamp(60, 3600)
}

impl Partition {
    /// The hour-long partition holding `time`.
    pub fn of(time: i64) -> Self {
        Self::with_length(time, 3600)
    }

    /// The partition of length `secs` holding `time` ([`partition_secs`] of the aggregation's
    /// window).
    pub fn with_length(time: i64, secs: i64) -> Self {
        let secs = partition_secs(secs);
        Partition {
            start: time.div_euclid(secs) * secs,
            secs,
        }
    }

    pub fn end(&self) -> i64 {
        self.start + self.secs
    }

    pub fn path(&self) -> String {
        let Some(t) = Utc.timestamp_opt(self.start, 0).single() else {
            return "0000/00/00/00".to_string();
        };
        let hour = format!(
            "{:04}/{:02}/{:02}/{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour()
        );
        if self.secs >= 3600 {
            hour
        } else {
            let from = t.minute() as i64;
            format!("{hour}/{from:02}-{:02}", from + self.secs / 60)
        }
    }

    /// Parses `YYYY/MM/DD/HH` or `YYYY/MM/DD/HH/MM-MM`.
    pub fn parse(path: &str) -> Result<Self, FormatError> {
        let bad = || {
            FormatError::Invalid(format!(
                "partition {path:?} is not YYYY/MM/DD/HH or YYYY/MM/DD/HH/MM-MM"
            ))
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (y, m, d, h, minutes) = match parts.as_slice() {
            [y, m, d, h] => (*y, *m, *d, *h, None),
            [y, m, d, h, mm] => (*y, *m, *d, *h, Some(*mm)),
            _ => return Err(bad()),
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
        let Some(minutes) = minutes else {
            return Ok(Partition {
                start: t.timestamp(),
                secs: 3600,
            });
        };
        let (from, to) = minutes.split_once('-').ok_or_else(bad)?;
        let (from, to) = (i64::from(num(from, 2)?), i64::from(num(to, 2)?));
        let len = to - from;
        // A sub-hour partition is a whole number of minutes dividing the hour, aligned to it.
        if len <= 0 || len >= 60 || 60 % len != 0 || from % len != 0 {
            return Err(bad());
        }
        Ok(Partition {
            start: t.timestamp() + from * 60,
            secs: len * 60,
        })
    }

    /// The partitions of length `secs` overlapping `[from, to)`, oldest first.
    pub fn range(from: i64, to: i64, secs: i64) -> Vec<Partition> {
        let mut out = Vec::new();
        let mut p = Partition::with_length(from, secs);
        while p.start < to {
            out.push(p);
            p.start += p.secs;
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
/// The marker of a facilitator's aggregate task for generation `generation` of a window.
pub fn aggregate_marker_key(agg: &str, w: Window, generation: u32) -> String {
    format!("markers/{agg}/aggregate/{}.{generation}", w.name())
}
/// Generation `generation` of a window's manifest (written by the leader to both stores).
pub fn manifest_key(agg: &str, w: Window, generation: u32) -> String {
    format!("manifests/{agg}/{}/{generation}.manifest", w.name())
}
/// Every generation of one window's manifest (a listing prefix).
pub fn manifest_window_prefix(agg: &str, w: Window) -> String {
    format!("manifests/{agg}/{}/", w.name())
}
/// Parses a manifest key into (window, generation).
pub fn parse_manifest_key(agg: &str, key: &str) -> Option<(Window, u32)> {
    let rest = key.strip_prefix(&format!("manifests/{agg}/"))?;
    let (window, file) = rest.split_once('/')?;
    let generation = file.strip_suffix(".manifest")?;
    Some((Window::parse(window).ok()?, parse_generation(generation)?))
}
/// The record of a batch left out of a window (late, lacking on one side, past max age).
pub fn exclusion_key(agg: &str, w: Window, batch: &str) -> String {
    format!("excluded/{agg}/{}/{batch}.json", w.name())
}
/// The marker that partition `p` of an aggregation needs no more listing.
pub fn settled_marker_key(agg: &str, p: Partition) -> String {
    format!("markers/{agg}/settled/{}", p.path())
}
pub fn settled_prefix(agg: &str) -> String {
    format!("markers/{agg}/settled/")
}
/// Parses a settled-partition marker key.
pub fn parse_settled_key(agg: &str, key: &str) -> Option<Partition> {
    Partition::parse(key.strip_prefix(&settled_prefix(agg))?).ok()
}
/// The collector's index entry for a window the mill is waiting on.
pub fn waiting_key(agg: &str, w: Window) -> String {
    format!("waiting/{agg}/{}", w.name())
}
pub fn waiting_prefix(agg: &str) -> String {
    format!("waiting/{agg}/")
}

/// A generation number as it appears in keys: decimal, no sign, no leading zeros.
fn parse_generation(text: &str) -> Option<u32> {
    if text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}
/// The collector's marker that a window's `result-ready` was published (once).
pub fn result_marker_key(agg: &str, w: Window) -> String {
    format!("markers/{agg}/results/{}", w.name())
}
pub fn sum_part_key(agg: &str, w: Window, generation: u32, facilitator: u8) -> String {
    format!("sums/{agg}/{}/{generation}.sum.{facilitator}", w.name())
}
/// Where a facilitator's [`crate::formats::ShareRefusal`] goes instead of its sum part.
pub fn share_refusal_key(agg: &str, w: Window, generation: u32, facilitator: u8) -> String {
    format!("sums/{agg}/{}/{generation}.refused.{facilitator}", w.name())
}
/// Every generation's sum parts of one window (a listing prefix).
pub fn sum_parts_prefix(agg: &str, w: Window) -> String {
    format!("sums/{agg}/{}/", w.name())
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
        assert_eq!(Partition::range(w.start, w.end, 3600), vec![p]);
        assert_eq!(Partition::range(w.start - 1, w.end, 3600).len(), 2);
    }

    #[test]
    fn minute_partitions_say_their_length_and_round_trip() {
        let t = 1_763_900_000; // 2025-11-23T12:13:20Z
        let p = Partition::with_length(t, 300);
        assert_eq!(p.path(), "2025/11/23/12/10-15");
        assert_eq!(Partition::parse(&p.path()).unwrap(), p);
        let last = Partition::with_length(t + 46 * 60, 300);
        assert_eq!(last.path(), "2025/11/23/12/55-60");
        assert_eq!(Partition::parse(&last.path()).unwrap(), last);
        assert_eq!(Partition::with_length(t, 60).path(), "2025/11/23/12/13-14");
        // Misaligned, not dividing the hour, empty, or the hour itself: refused.
        for bad in [
            "12/11-16", "12/00-07", "12/05-05", "12/00-60", "12/10-05", "12/5-10",
        ] {
            let path = format!("2025/11/23/{bad}");
            assert!(Partition::parse(&path).is_err(), "{path}");
        }
        let w = Window::containing(t, 300);
        assert_eq!(Partition::range(w.start, w.end, 300), vec![p]);
        assert_eq!(Partition::range(w.start, w.start + 3600, 300).len(), 12);
        // Keys under a minute partition parse back to it.
        let k = ingestion_key("clicks", p, "b1");
        assert_eq!(k, "ingestion/clicks/2025/11/23/12/10-15/b1.batch");
        assert_eq!(parse_ingestion_key("clicks", &k), Some((p, "b1".into())));
        assert_eq!(
            parse_settled_key("clicks", &settled_marker_key("clicks", p)),
            Some(p)
        );
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
        let w = Window::containing(1_763_900_000, 3600);
        assert_eq!(
            parse_manifest_key("clicks", &manifest_key("clicks", w, 12)),
            Some((w, 12))
        );
        assert!(manifest_key("clicks", w, 3).starts_with(&manifest_window_prefix("clicks", w)));
        for bad in ["01", "-1", "", "1x", "99999999999"] {
            let key = format!("manifests/clicks/{}/{bad}.manifest", w.name());
            assert_eq!(parse_manifest_key("clicks", &key), None, "{key}");
        }
        assert_eq!(
            parse_settled_key("clicks", &settled_marker_key("clicks", p)),
            Some(p)
        );
        assert!(sum_part_key("clicks", w, 2, 1).starts_with(&sum_parts_prefix("clicks", w)));
    }
}
