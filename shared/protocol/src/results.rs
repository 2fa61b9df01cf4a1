//! The JSON documents the mill writes: a window's result and the mill's record of the
//! computation (its state, for operators and for the cleaner).

use serde::{Deserialize, Serialize};

use crate::error::FormatError;
use crate::vdaf::{AggregateValue, VdafSpec};

pub const RESULT_VERSION: u32 = 1;
pub const COMPUTATION_VERSION: u32 = 1;

/// `results/{agg}/{window}.result.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationResult {
    pub version: u32,
    pub aggregation: String,
    pub window: String,
    pub window_start: String,
    pub window_end: String,
    pub vdaf: VdafSpec,
    pub result: AggregateValue,
    pub report_count: u64,
    pub invalid_count: u64,
    /// Hex SHA-256 over the sorted ids of the included reports.
    pub report_digest: String,
    pub batches: Vec<String>,
}

/// Where a window's computation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ComputationState {
    /// One sum part has arrived; waiting for the other.
    WaitingForParts,
    /// The result is written.
    Succeeded,
    /// The parts could not be joined (mismatch, policy); the reason is in `detail`.
    Failed,
}

impl ComputationState {
    /// States the cleaner may delete once they are older than the TTL.
    pub fn is_terminal(self) -> bool {
        matches!(self, ComputationState::Succeeded | ComputationState::Failed)
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
    /// Unix seconds of the last change.
    pub updated_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn from_json<T: for<'de> Deserialize<'de>>(
    what: &str,
    version: u32,
    get_version: impl Fn(&T) -> u32,
    bytes: &[u8],
) -> Result<T, FormatError> {
    let doc: T =
        serde_json::from_slice(bytes).map_err(|e| FormatError::Invalid(format!("{what}: {e}")))?;
    let found = get_version(&doc);
    if found != version {
        return Err(FormatError::Invalid(format!(
            "{what}: unsupported version {found} (this build reads {version})"
        )));
    }
    Ok(doc)
}

impl AggregationResult {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        from_json("result", RESULT_VERSION, |d: &Self| d.version, bytes)
    }
}

impl Computation {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        from_json(
            "computation",
            COMPUTATION_VERSION,
            |d: &Self| d.version,
            bytes,
        )
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
            vdaf: VdafSpec::Histogram {
                length: 3,
                chunk_length: 2,
            },
            result: AggregateValue::Vector(vec![1, 2, 3]),
            report_count: 6,
            invalid_count: 1,
            report_digest: "00".into(),
            batches: vec!["b".into()],
        };
        assert_eq!(AggregationResult::from_json(&r.to_json()).unwrap(), r);
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
            updated_at: 5,
            detail: Some("digests differ".into()),
        };
        assert_eq!(Computation::from_json(&c.to_json()).unwrap(), c);
        assert!(ComputationState::Succeeded.is_terminal());
        assert!(!ComputationState::WaitingForParts.is_terminal());
    }
}
