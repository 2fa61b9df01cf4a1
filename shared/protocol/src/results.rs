//! The JSON documents Millrace writes for people: a window's result, the record of a window's
//! computation (the mill's in the collector's store; a facilitator's when it gave up waiting),
//! and the record of a batch left out of a window.

use serde::{Deserialize, Serialize};

use crate::error::FormatError;
use crate::vdaf::{AggregateValue, VdafSpec};

pub const RESULT_VERSION: u32 = 3;
pub const COMPUTATION_VERSION: u32 = 3;
pub const EXCLUSION_VERSION: u32 = 1;
/// Versions read: result 2 lacks `invalid_reasons` (read as empty).
pub const RESULT_VERSIONS: &[u32] = &[2, 3];
/// Computation 2 had no REFUSED state (read as is: its states are a subset).
pub const COMPUTATION_VERSIONS: &[u32] = &[2, 3];
pub const EXCLUSION_VERSIONS: &[u32] = &[1];

/// `results/{agg}/{window}.result.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationResult {
    pub version: u32,
    pub aggregation: String,
    pub window: String,
    pub window_start: String,
    pub window_end: String,
    /// The generation of the window manifest both sum parts aggregated.
    pub generation: u32,
    pub vdaf: VdafSpec,
    pub result: AggregateValue,
    pub report_count: u64,
    pub invalid_count: u64,
    /// `invalid_count` by reason label (`undecryptable`, `replayed`, `outside-window`, …; see
    /// [`crate::formats::InvalidReason::label`]). Absent in version 2.
    #[serde(default)]
    pub invalid_reasons: std::collections::BTreeMap<String, u64>,
    /// Hex SHA-256 over the sorted ids of the included reports.
    pub report_digest: String,
    pub batches: Vec<String>,
}

/// Where a window's computation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ComputationState {
    /// One sum part has arrived; waiting for the other (until `since` + the wait deadline).
    WaitingForParts,
    /// A helper waiting for the leader's window manifest.
    WaitingForManifest,
    /// The result is written.
    Succeeded,
    /// The parts could not be joined (mismatch, a part that never came); the reason is in
    /// `detail`.
    Failed,
    /// A party's privacy policy refused to release the window (too few reports): a facilitator
    /// that withheld its aggregate share, or the mill's own check. `detail` gives every party's
    /// reason.
    Refused,
}

impl ComputationState {
    /// States the cleaner may delete once they are older than the TTL.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            ComputationState::Succeeded | ComputationState::Failed | ComputationState::Refused
        )
    }
}

/// `computations/{agg}/{window}.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Computation {
    pub version: u32,
    pub aggregation: String,
    pub window: String,
    pub state: ComputationState,
    /// The manifest generation this record is about.
    pub generation: u32,
    /// Unix seconds of the last change.
    pub updated_at: i64,
    /// While waiting: since when (unix seconds), which the deadline counts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Parses a JSON document, first checking its `version` against the versions this build reads
/// (so that a newer document is refused by its version, not by a field it added).
fn from_json<T: for<'de> Deserialize<'de>>(
    what: &str,
    supported: &[u32],
    bytes: &[u8],
) -> Result<T, FormatError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let head: Versioned =
        serde_json::from_slice(bytes).map_err(|e| FormatError::Invalid(format!("{what}: {e}")))?;
    if !supported.contains(&head.version) {
        let list: Vec<String> = supported.iter().map(u32::to_string).collect();
        return Err(FormatError::Invalid(format!(
            "{what}: unsupported version {} (this build reads version {})",
            head.version,
            list.join(" or ")
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| FormatError::Invalid(format!("{what}: {e}")))
}

/// `excluded/{agg}/{window}/{batch}.json` in a facilitator's store: a batch that is not part of
/// the window it belongs to, and why. Written once, by whichever workflow-manager (or cleaner)
/// noticed; `millrace status` lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchExclusion {
    pub version: u32,
    pub aggregation: String,
    pub window: String,
    pub batch: String,
    /// `YYYY/MM/DD/HH`.
    pub partition: String,
    /// `late`, `peer-missing`, `max-age` or `beyond-horizon` (see
    /// [`crate::formats::ExclusionReason`]).
    pub reason: String,
    /// The manifest generation the batch is not in (none for `beyond-horizon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_generation: Option<u32>,
    /// For `peer-missing`: the facilitator (0 or 1) that lacked the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lacking: Option<u8>,
    /// Who wrote the record (a facilitator's name and service).
    pub by: String,
    /// When the batch was seen (unix seconds).
    pub seen_at: i64,
    pub detail: String,
}

impl BatchExclusion {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let doc: Self = from_json("batch exclusion", EXCLUSION_VERSIONS, bytes)?;
        if crate::formats::ExclusionReason::parse(&doc.reason).is_none() {
            return Err(FormatError::Invalid(format!(
                "batch exclusion: unknown reason {:?}",
                doc.reason
            )));
        }
        Ok(doc)
    }
}

impl AggregationResult {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        from_json("result", RESULT_VERSIONS, bytes)
    }
}

impl Computation {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        from_json("computation", COMPUTATION_VERSIONS, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trips_and_refuses_unknown_fields() {
        let r = AggregationResult {
            version: RESULT_VERSION,
            aggregation: "a".into(),
            window: "w".into(),
            window_start: "s".into(),
            window_end: "e".into(),
            generation: 0,
            vdaf: VdafSpec::Histogram {
                length: 3,
                chunk_length: 2,
            },
            result: AggregateValue::Vector(vec![1, 2, 3]),
            report_count: 6,
            invalid_count: 1,
            invalid_reasons: [("replayed".to_string(), 1)].into(),
            report_digest: "00".into(),
            batches: vec!["b".into()],
        };
        assert_eq!(AggregationResult::from_json(&r.to_json()).unwrap(), r);
        // Version 2 had no invalid counts by reason: read as none.
        let mut v: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        v["version"] = 2.into();
        v.as_object_mut().unwrap().remove("invalid_reasons");
        let old = AggregationResult::from_json(v.to_string().as_bytes()).unwrap();
        assert!(old.invalid_reasons.is_empty());
        // A newer version is refused by its number, before any field it may have added.
        v["version"] = 4.into();
        v["new_field"] = 1.into();
        let err = AggregationResult::from_json(v.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported version 4"), "{err}");
        let mut v: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        v["surprise"] = 1.into();
        assert!(AggregationResult::from_json(v.to_string().as_bytes()).is_err());
        v = serde_json::from_slice(&r.to_json()).unwrap();
        v["version"] = 9.into();
        assert!(AggregationResult::from_json(v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn computation_round_trips() {
        let c = Computation {
            version: COMPUTATION_VERSION,
            aggregation: "a".into(),
            window: "w".into(),
            state: ComputationState::Failed,
            generation: 1,
            updated_at: 5,
            since: Some(3),
            detail: Some("digests differ".into()),
        };
        assert_eq!(Computation::from_json(&c.to_json()).unwrap(), c);
        let e = BatchExclusion {
            version: EXCLUSION_VERSION,
            aggregation: "a".into(),
            window: "w".into(),
            batch: "b".into(),
            partition: "2026/11/23/12".into(),
            reason: "late".into(),
            manifest_generation: Some(0),
            lacking: None,
            by: "alpha workflow-manager".into(),
            seen_at: 9,
            detail: "arrived after the manifest".into(),
        };
        assert_eq!(BatchExclusion::from_json(&e.to_json()).unwrap(), e);
        let mut bad = e.clone();
        bad.reason = "tardy".into();
        assert!(BatchExclusion::from_json(&bad.to_json()).is_err());
        assert!(ComputationState::Succeeded.is_terminal());
        assert!(!ComputationState::WaitingForParts.is_terminal());
    }
}
