//! The aggregations file (TOML): parties and their public keys, and each aggregation's Prio3
//! variant, window, grace, max age, minimum report count and verify key. Private keys and verify
//! keys are never in the file itself, only references (`file:PATH` relative to the file, or
//! `env:VAR`), so the same file can be handed to every service and each one reads only the
//! secrets it has been given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::{read_secret, HpkePrivateKey, HpkePublicKey, KeyRing, Signer25519, VerifyKey};
use crate::error::CryptoError;
use crate::layout::validate_id;
use crate::vdaf::{Prio3Vdaf, VdafSpec};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("config {path}: {source}")]
    Crypto {
        path: String,
        #[source]
        source: CryptoError,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestorEntry {
    pub name: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    /// Secret reference to the private key (only the ingestor itself needs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacilitatorEntry {
    /// 0 or 1: the VDAF aggregator index.
    pub index: u8,
    pub name: String,
    /// Ed25519 public key, hex: verifies this facilitator's validation batches and sum parts.
    pub signing_public_key: String,
    /// X25519 HPKE public key, hex: ingestors encrypt input shares to it.
    pub hpke_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpke_private_key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationEntry {
    pub id: String,
    pub vdaf: VdafSpec,
    /// Window length, a whole number of hours (`1h`, `6h`, `1day`).
    pub window: String,
    /// How long after a window ends batches may still arrive.
    pub grace: String,
    /// After this long past the window's end, aggregate whatever both sides validated.
    pub max_age: String,
    /// Fewer valid reports than this and the mill refuses to publish a result.
    pub min_reports: u64,
    /// How long after `window + grace` the leader waits for a batch only one facilitator has
    /// (validated) before it leaves the batch out of the window's manifest. Default 10 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_deadline: Option<String>,
    /// How long any party waits for a peer before the window is FAILED: the helper for the
    /// leader's manifest (counted from `max_age`, by which the leader must have written it), the
    /// mill for the second sum part (from the first). Default 1 hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_deadline: Option<String>,
    /// Secret reference to the 32-byte verify key shared by both facilitators.
    pub verify_key: String,
    /// Names of the ingestors whose batches this aggregation accepts.
    pub ingestors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub ingestor: Vec<IngestorEntry>,
    pub facilitator: Vec<FacilitatorEntry>,
    pub aggregation: Vec<AggregationEntry>,
}

/// One aggregation, parsed and checked.
#[derive(Clone, Debug)]
pub struct Aggregation {
    pub id: String,
    pub vdaf: Prio3Vdaf,
    pub window_secs: i64,
    pub grace: Duration,
    pub max_age: Duration,
    pub min_reports: u64,
    /// See [`AggregationEntry::peer_deadline`].
    pub peer_deadline: Duration,
    /// See [`AggregationEntry::wait_deadline`].
    pub wait_deadline: Duration,
    pub ingestors: Vec<String>,
    verify_key_ref: String,
}

/// Default of [`AggregationEntry::peer_deadline`].
pub const DEFAULT_PEER_DEADLINE: Duration = Duration::from_secs(600);
/// Default of [`AggregationEntry::wait_deadline`].
pub const DEFAULT_WAIT_DEADLINE: Duration = Duration::from_secs(3600);

impl Aggregation {
    /// The oldest window a workflow-manager still looks at, as of `now`: windows ending before
    /// `now - max_age - wait_deadline` are past every deadline (the leader has written their
    /// manifest by `max_age`, the helper has given up waiting for it by `wait_deadline` later).
    pub fn horizon(&self, now: i64) -> i64 {
        now - self.max_age.as_secs() as i64 - self.wait_deadline.as_secs() as i64 - self.window_secs
    }
}

/// The loaded config.
#[derive(Clone, Debug)]
pub struct Config {
    path: PathBuf,
    dir: PathBuf,
    pub file: ConfigFile,
    pub aggregations: Vec<Aggregation>,
}

fn duration(path: &str, what: &str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| ConfigError::Invalid {
        path: path.to_string(),
        reason: format!("{what} {text:?}: {e}"),
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, path, &dir)
    }

    /// Parses `text`; `dir` is where `file:` references are resolved.
    pub fn parse(text: &str, path: &Path, dir: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let invalid = |reason: String| ConfigError::Invalid {
            path: shown.clone(),
            reason,
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut indexes: Vec<u8> = file.facilitator.iter().map(|f| f.index).collect();
        indexes.sort_unstable();
        if indexes != [0, 1] {
            return Err(invalid(format!(
                "expected exactly two [[facilitator]] entries with index 0 and 1, found {indexes:?}"
            )));
        }
        for f in &file.facilitator {
            validate_id("facilitator name", &f.name).map_err(|e| invalid(e.to_string()))?;
        }
        let mut aggregations = Vec::new();
        for a in &file.aggregation {
            let ctx = |reason: String| invalid(format!("aggregation {:?}: {reason}", a.id));
            validate_id("aggregation id", &a.id).map_err(|e| ctx(e.to_string()))?;
            if aggregations.iter().any(|x: &Aggregation| x.id == a.id) {
                return Err(ctx("declared twice".to_string()));
            }
            let window = duration(&shown, "window", &a.window)?;
            let window_secs = window.as_secs() as i64;
            if window_secs == 0 || window_secs % 3600 != 0 || window.subsec_nanos() != 0 {
                return Err(ctx(format!(
                    "window {:?} must be a whole number of hours (batches are partitioned by hour)",
                    a.window
                )));
            }
            for name in &a.ingestors {
                if !file.ingestor.iter().any(|i| &i.name == name) {
                    return Err(ctx(format!(
                        "ingestor {name:?} is not declared in [[ingestor]]"
                    )));
                }
            }
            let vdaf = Prio3Vdaf::new(&a.vdaf, &a.id).map_err(|e| ctx(e.to_string()))?;
            aggregations.push(Aggregation {
                id: a.id.clone(),
                vdaf,
                window_secs,
                grace: duration(&shown, "grace", &a.grace)?,
                max_age: duration(&shown, "max_age", &a.max_age)?,
                min_reports: a.min_reports,
                peer_deadline: match &a.peer_deadline {
                    Some(text) => duration(&shown, "peer_deadline", text)?,
                    None => DEFAULT_PEER_DEADLINE,
                },
                wait_deadline: match &a.wait_deadline {
                    Some(text) => duration(&shown, "wait_deadline", text)?,
                    None => DEFAULT_WAIT_DEADLINE,
                },
                ingestors: a.ingestors.clone(),
                verify_key_ref: a.verify_key.clone(),
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            file,
            aggregations,
        })
    }

    pub fn aggregation(&self, id: &str) -> Option<&Aggregation> {
        self.aggregations.iter().find(|a| a.id == id)
    }

    fn crypto(&self, source: CryptoError) -> ConfigError {
        ConfigError::Crypto {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn facilitator(&self, index: u8) -> Result<&FacilitatorEntry, ConfigError> {
        self.file
            .facilitator
            .iter()
            .find(|f| f.index == index)
            .ok_or_else(|| ConfigError::Invalid {
                path: self.path.display().to_string(),
                reason: format!("no facilitator with index {index}"),
            })
    }

    pub fn facilitator_name(&self, index: u8) -> Result<&str, ConfigError> {
        Ok(&self.facilitator(index)?.name)
    }

    fn secret_ref<'a>(&self, what: &str, r: &'a Option<String>) -> Result<&'a str, ConfigError> {
        r.as_deref().ok_or_else(|| ConfigError::Invalid {
            path: self.path.display().to_string(),
            reason: format!("{what} has no private key reference in this config"),
        })
    }

    /// Public keys of all ingestors, by name.
    pub fn ingestor_keys(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = KeyRing::new();
        for i in &self.file.ingestor {
            ring.add_hex(&i.name, &i.public_key)
                .map_err(|e| self.crypto(e))?;
        }
        Ok(ring)
    }

    /// Public signing keys of both facilitators, by name.
    pub fn facilitator_keys(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = KeyRing::new();
        for f in &self.file.facilitator {
            ring.add_hex(&f.name, &f.signing_public_key)
                .map_err(|e| self.crypto(e))?;
        }
        Ok(ring)
    }

    pub fn facilitator_signer(&self, index: u8) -> Result<Signer25519, ConfigError> {
        let f = self.facilitator(index)?;
        let r = self.secret_ref(&format!("facilitator {}", f.name), &f.signing_key)?;
        let secret = read_secret(r, &self.dir).map_err(|e| self.crypto(e))?;
        Signer25519::from_hex(&f.name, &secret).map_err(|e| self.crypto(e))
    }

    pub fn hpke_private_key(&self, index: u8) -> Result<HpkePrivateKey, ConfigError> {
        let f = self.facilitator(index)?;
        let r = self.secret_ref(&format!("facilitator {}", f.name), &f.hpke_private_key)?;
        let secret = read_secret(r, &self.dir).map_err(|e| self.crypto(e))?;
        HpkePrivateKey::from_hex(&f.name, &secret).map_err(|e| self.crypto(e))
    }

    pub fn hpke_public_key(&self, index: u8) -> Result<HpkePublicKey, ConfigError> {
        let f = self.facilitator(index)?;
        HpkePublicKey::from_hex(&f.name, &f.hpke_public_key).map_err(|e| self.crypto(e))
    }

    pub fn ingestor_signer(&self, name: &str) -> Result<Signer25519, ConfigError> {
        let i = self
            .file
            .ingestor
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| ConfigError::Invalid {
                path: self.path.display().to_string(),
                reason: format!("no ingestor named {name:?}"),
            })?;
        let r = self.secret_ref(&format!("ingestor {name}"), &i.private_key)?;
        let secret = read_secret(r, &self.dir).map_err(|e| self.crypto(e))?;
        Signer25519::from_hex(name, &secret).map_err(|e| self.crypto(e))
    }

    pub fn verify_key(&self, aggregation: &Aggregation) -> Result<VerifyKey, ConfigError> {
        let secret =
            read_secret(&aggregation.verify_key_ref, &self.dir).map_err(|e| self.crypto(e))?;
        VerifyKey::from_hex(&aggregation.id, &secret).map_err(|e| self.crypto(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[ingestor]]
name = "ing"
public_key = "PUB"

[[facilitator]]
index = 0
name = "alpha"
signing_public_key = "PUB"
hpke_public_key = "HPKE"

[[facilitator]]
index = 1
name = "beta"
signing_public_key = "PUB"
hpke_public_key = "HPKE"

[[aggregation]]
id = "clicks"
vdaf = { type = "sum", max_measurement = 100 }
window = "1h"
grace = "5m"
max_age = "1day"
min_reports = 10
verify_key = "env:X"
ingestors = ["ing"]
"#;

    #[test]
    fn a_good_config_loads() {
        let c = Config::parse(GOOD, Path::new("m.toml"), Path::new(".")).unwrap();
        let a = c.aggregation("clicks").unwrap();
        assert_eq!(a.window_secs, 3600);
        assert_eq!(a.grace, Duration::from_secs(300));
        assert_eq!(a.peer_deadline, DEFAULT_PEER_DEADLINE);
        assert_eq!(a.wait_deadline, DEFAULT_WAIT_DEADLINE);
        let c = Config::parse(
            &GOOD.replace(
                "min_reports = 10",
                "min_reports = 10\npeer_deadline = \"2m\"\nwait_deadline = \"30m\"",
            ),
            Path::new("m.toml"),
            Path::new("."),
        )
        .unwrap();
        let a = c.aggregation("clicks").unwrap();
        assert_eq!(a.peer_deadline, Duration::from_secs(120));
        assert_eq!(a.wait_deadline, Duration::from_secs(1800));
        assert_eq!(c.facilitator_name(1).unwrap(), "beta");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (
                GOOD.replace("window = \"1h\"", "window = \"90m\""),
                "whole number of hours",
            ),
            (
                GOOD.replace("ingestors = [\"ing\"]", "ingestors = [\"nobody\"]"),
                "not declared",
            ),
            (GOOD.replace("index = 1", "index = 0"), "index 0 and 1"),
            (
                GOOD.replace("min_reports = 10", "min_reports = 10\nsurprise = 1"),
                "surprise",
            ),
            (GOOD.replace("grace = \"5m\"", "grace = \"soon\""), "grace"),
            (
                GOOD.replace(
                    "grace = \"5m\"",
                    "grace = \"5m\"\npeer_deadline = \"later\"",
                ),
                "peer_deadline",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::parse(&text, Path::new("m.toml"), Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(err.contains("m.toml"), "{err:?} should name the file");
        }
    }
}
