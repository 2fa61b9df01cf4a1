//! The messages services send each other. The body on the bus is exactly this JSON (no
//! envelope); decoding is strict (unknown fields, wrong versions and invalid ids are refused).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::FormatError;
use crate::layout::{validate_id, Partition, Window};

/// The version of the result-ready task this build writes and reads.
pub const TASK_VERSION: u32 = 1;
/// The version of the intake task (2: it carries the aggregation digest).
pub const INTAKE_TASK_VERSION: u32 = 2;
/// The version of the aggregate task (2: it names a window manifest instead of listing batches;
/// 3: it carries the aggregation digest).
pub const AGGREGATE_TASK_VERSION: u32 = 3;
/// The version of sum-part-ready (2: it carries the manifest generation; 3: the aggregation
/// digest).
pub const SUM_PART_READY_VERSION: u32 = 3;

/// One ingestion batch to validate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntakeTask {
    pub version: u32,
    pub aggregation: String,
    /// Hex [`crate::agreement::AggregationDigest`] of the aggregation as the publisher runs it;
    /// a worker whose own differs refuses the task.
    pub aggregation_digest: String,
    pub batch: String,
    /// The batch's time partition, `YYYY/MM/DD/HH`.
    pub partition: String,
}

/// One window to aggregate: exactly the batches of generation `generation` of the window's
/// manifest (`manifests/{agg}/{window}/{generation}.manifest` in the facilitator's own store,
/// signed by the leader). The task names the manifest rather than listing batches, so its body
/// stays small whatever the window's size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateTask {
    pub version: u32,
    pub aggregation: String,
    /// As in [`IntakeTask::aggregation_digest`].
    pub aggregation_digest: String,
    /// The window's name, `START-END` (see [`Window::name`]).
    pub window: String,
    pub generation: u32,
}

/// A facilitator's sum part for generation `generation` of a window is in the collector's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SumPartReady {
    pub version: u32,
    pub aggregation: String,
    /// As in [`IntakeTask::aggregation_digest`].
    pub aggregation_digest: String,
    pub window: String,
    pub generation: u32,
    pub facilitator: u8,
}

/// A window's result is in the collector's store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultReady {
    pub version: u32,
    pub aggregation: String,
    pub window: String,
    pub result_key: String,
}

/// Shared by every task type: JSON in and out, with validation.
pub trait TaskMessage: Serialize + DeserializeOwned {
    const NAME: &'static str;
    /// The only version of this task this build reads.
    const VERSION: u32;
    fn version(&self) -> u32;
    /// Checks ids and fields beyond what the JSON shape says.
    fn validate(&self) -> Result<(), FormatError>;

    fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        // The version first, so that a newer task is refused by its version rather than by a
        // field this build does not know.
        #[derive(serde::Deserialize)]
        struct Versioned {
            version: u32,
        }
        let head: Versioned = serde_json::from_slice(bytes)
            .map_err(|e| FormatError::Invalid(format!("{} task: {e}", Self::NAME)))?;
        if head.version != Self::VERSION {
            return Err(FormatError::Invalid(format!(
                "{} task: unsupported version {} (this build reads version {})",
                Self::NAME,
                head.version,
                Self::VERSION
            )));
        }
        let task: Self = serde_json::from_slice(bytes)
            .map_err(|e| FormatError::Invalid(format!("{} task: {e}", Self::NAME)))?;
        task.validate()?;
        Ok(task)
    }
}

fn check_digest(digest: &str) -> Result<(), FormatError> {
    crate::agreement::AggregationDigest::parse(digest)
        .map(|_| ())
        .ok_or_else(|| {
            FormatError::Invalid(format!(
                "aggregation digest {digest:?} is not 64 hex digits"
            ))
        })
}

fn check_facilitator(f: u8) -> Result<(), FormatError> {
    if f > 1 {
        return Err(FormatError::Invalid(format!(
            "facilitator {f} is not 0 or 1"
        )));
    }
    Ok(())
}

impl TaskMessage for IntakeTask {
    const NAME: &'static str = "intake";
    const VERSION: u32 = INTAKE_TASK_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn validate(&self) -> Result<(), FormatError> {
        validate_id("aggregation id", &self.aggregation)?;
        check_digest(&self.aggregation_digest)?;
        validate_id("batch id", &self.batch)?;
        Partition::parse(&self.partition)?;
        Ok(())
    }
}

impl TaskMessage for AggregateTask {
    const NAME: &'static str = "aggregate";
    const VERSION: u32 = AGGREGATE_TASK_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn validate(&self) -> Result<(), FormatError> {
        validate_id("aggregation id", &self.aggregation)?;
        check_digest(&self.aggregation_digest)?;
        Window::parse(&self.window)?;
        Ok(())
    }
}

impl TaskMessage for SumPartReady {
    const NAME: &'static str = "sum-part-ready";
    const VERSION: u32 = SUM_PART_READY_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn validate(&self) -> Result<(), FormatError> {
        validate_id("aggregation id", &self.aggregation)?;
        check_digest(&self.aggregation_digest)?;
        Window::parse(&self.window)?;
        check_facilitator(self.facilitator)
    }
}

impl TaskMessage for ResultReady {
    const NAME: &'static str = "result-ready";
    const VERSION: u32 = TASK_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn validate(&self) -> Result<(), FormatError> {
        validate_id("aggregation id", &self.aggregation)?;
        Window::parse(&self.window)?;
        Ok(())
    }
}

/// Topic names: `{prefix}.{facilitator}.intake`, `{prefix}.{facilitator}.aggregate`,
/// `{prefix}.collect`, `{prefix}.results`.
pub mod topics {
    pub fn intake(prefix: &str, facilitator: u8) -> String {
        format!("{prefix}.{facilitator}.intake")
    }
    pub fn aggregate(prefix: &str, facilitator: u8) -> String {
        format!("{prefix}.{facilitator}.aggregate")
    }
    pub fn collect(prefix: &str) -> String {
        format!("{prefix}.collect")
    }
    pub fn results(prefix: &str) -> String {
        format!("{prefix}.results")
    }
}

/// The consumer group that reads each topic. Publishers create it too (with `--create-topics`), so
/// that on buses where a topic without a subscription drops messages (SNS, Pub/Sub) nothing
/// published before the consumer's first start is lost.
pub mod groups {
    pub fn intake(facilitator: u8) -> String {
        format!("intake-worker-{facilitator}")
    }
    pub fn aggregate(facilitator: u8) -> String {
        format!("aggregate-worker-{facilitator}")
    }
    pub fn collect() -> String {
        "mill".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_task_round_trips() {
        let t = IntakeTask {
            version: INTAKE_TASK_VERSION,
            aggregation: "clicks".into(),
            aggregation_digest: "ab".repeat(32),
            batch: "b1".into(),
            partition: "2026/11/23/12".into(),
        };
        assert_eq!(IntakeTask::from_json(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn malformed_tasks_are_refused_with_a_reason() {
        let cases: [&[u8]; 6] = [
            b"not json",
            br#"{"version":1,"aggregation":"a","batch":"b","partition":"2026/11/23/12","extra":1}"#,
            br#"{"version":2,"aggregation":"a","batch":"b","partition":"2026/11/23/12"}"#,
            br#"{"version":1,"aggregation":"a","batch":"../etc","partition":"2026/11/23/12"}"#,
            br#"{"version":1,"aggregation":"a","batch":"b","partition":"2026/11/23"}"#,
            br#"{"version":1,"aggregation":"a","batch":"b","partition":"2026/11/23/12"} x"#,
        ];
        for c in cases {
            let err = IntakeTask::from_json(c).unwrap_err();
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn sum_part_ready_refuses_a_third_facilitator() {
        let digest = "ab".repeat(32);
        let body = |version: u32, digest: &str, facilitator: u8| {
            format!(
                r#"{{"version":{version},"aggregation":"a","aggregation_digest":"{digest}","window":"20261123T1200Z-20261123T1300Z","generation":0,"facilitator":{facilitator}}}"#
            )
        };
        assert!(SumPartReady::from_json(body(3, &digest, 2).as_bytes()).is_err());
        assert!(SumPartReady::from_json(body(3, &digest, 1).as_bytes()).is_ok());
        // A digest that is not 64 hex digits, and the version before digests: refused.
        let err = SumPartReady::from_json(body(3, "abc", 1).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not 64 hex digits"), "{err}");
        let err = SumPartReady::from_json(body(2, &digest, 1).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported version 2"), "{err}");
    }

    #[test]
    fn an_aggregate_task_names_a_manifest_and_nothing_else() {
        let t = AggregateTask {
            version: AGGREGATE_TASK_VERSION,
            aggregation: "clicks".into(),
            aggregation_digest: "ab".repeat(32),
            window: "20261123T1200Z-20261123T1300Z".into(),
            generation: 2,
        };
        assert_eq!(AggregateTask::from_json(&t.to_json()).unwrap(), t);
        // The version-1 shape, with a batch list, is refused by name.
        let old = br#"{"version":1,"aggregation":"clicks","window":"20261123T1200Z-20261123T1300Z","batches":[]}"#;
        let err = AggregateTask::from_json(old).unwrap_err().to_string();
        assert!(err.contains("aggregate task"), "{err}");
        let listed = br#"{"version":2,"aggregation":"clicks","window":"20261123T1200Z-20261123T1300Z","generation":0,"batches":[]}"#;
        assert!(AggregateTask::from_json(listed).is_err());
    }
}
