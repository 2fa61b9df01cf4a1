//! What two organisations must agree on to run one aggregation, and the digest that proves it.
//!
//! An aggregation's **shared parameters** are those both facilitators (and the ingestors and the
//! collector) must hold identically: the VDAF and its parameters, the window, grace and max age,
//! the minimum report count, the time precision and clock skew, differential privacy, and the id
//! of the verify key. They hash into the **aggregation digest**, which every task and every signed
//! artefact that crosses a boundary carries. A party that finds a peer's artefact with another
//! digest refuses it, naming the aggregation and both digests, instead of failing later on
//! invalid reports or mismatched sums. Local policy (`peer_deadline`, `wait_deadline`) is not
//! shared and not in the digest.
//!
//! `millrace config check` lists the parameters that differ between a local config and the
//! aggregations a peer published in its party document.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Aggregation;
use crate::crypto::VerifyKey;

/// The digest of an aggregation's shared parameters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregationDigest(pub [u8; 32]);

impl fmt::Display for AggregationDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for AggregationDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AggregationDigest({self})")
    }
}

impl AggregationDigest {
    /// Parses the hex form (as tasks and party documents carry it).
    pub fn parse(text: &str) -> Option<Self> {
        let raw = hex::decode(text).ok()?;
        raw.try_into().ok().map(AggregationDigest)
    }
}

/// The id of a verify key: a fingerprint that names it without revealing it (SHA-256 over a
/// label and the key, first 8 bytes, hex). Both facilitators derive the same id from the same
/// key; parties without the key read it from the config (`verify_key_id`).
pub fn verify_key_id(key: &VerifyKey) -> String {
    let mut h = Sha256::new();
    h.update(b"millrace verify key id/1");
    h.update(key.bytes());
    hex::encode(&h.finalize()[..8])
}

/// The shared parameters of `aggregation`, by name, in a fixed order and a canonical text form.
pub fn shared_parameters(
    aggregation: &Aggregation,
    verify_key_id: &str,
) -> BTreeMap<String, String> {
    let secs = |d: std::time::Duration| format!("{}s", d.as_secs());
    let mut p = BTreeMap::new();
    p.insert("id".to_string(), aggregation.id.clone());
    p.insert(
        "vdaf".to_string(),
        serde_json::to_string(aggregation.vdaf.spec()).unwrap_or_default(),
    );
    p.insert(
        "window".to_string(),
        format!("{}s", aggregation.window_secs),
    );
    p.insert("grace".to_string(), secs(aggregation.grace));
    p.insert("max_age".to_string(), secs(aggregation.max_age));
    p.insert(
        "min_reports".to_string(),
        aggregation.min_reports.to_string(),
    );
    p.insert(
        "time_precision".to_string(),
        format!("{}s", aggregation.time_precision_secs),
    );
    p.insert("clock_skew".to_string(), secs(aggregation.clock_skew));
    p.insert(
        "dp".to_string(),
        aggregation
            .dp
            .as_ref()
            .map_or_else(|| "none".to_string(), |dp| dp.to_string()),
    );
    p.insert("verify_key_id".to_string(), verify_key_id.to_string());
    p
}

/// The digest of shared parameters (as [`shared_parameters`] lists them).
pub fn digest_of(parameters: &BTreeMap<String, String>) -> AggregationDigest {
    let mut h = Sha256::new();
    h.update(b"millrace aggregation/1");
    for (name, value) in parameters {
        for part in [name.as_bytes(), value.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    AggregationDigest(h.finalize().into())
}

/// One aggregation as a party publishes it in its party document, for `millrace config check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedAggregation {
    pub id: String,
    /// Hex [`AggregationDigest`].
    pub digest: String,
    pub parameters: BTreeMap<String, String>,
}

impl PublishedAggregation {
    pub fn new(parameters: BTreeMap<String, String>) -> Self {
        PublishedAggregation {
            id: parameters.get("id").cloned().unwrap_or_default(),
            digest: digest_of(&parameters).to_string(),
            parameters,
        }
    }
}

/// What differs between our shared parameters and a peer's, one line per parameter.
pub fn differences(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut names: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|name| {
            let (a, b) = (ours.get(name), theirs.get(name));
            (a != b).then(|| {
                format!(
                    "{name}: ours {}, theirs {}",
                    a.map_or("(absent)", String::as_str),
                    b.map_or("(absent)", String::as_str)
                )
            })
        })
        .collect()
}

/// The error text for a peer's artefact whose digest is not ours.
pub fn mismatch(
    aggregation: &str,
    what: &str,
    theirs: &AggregationDigest,
    ours: &AggregationDigest,
) -> String {
    format!(
        "aggregation {aggregation}: {what} carries aggregation digest {theirs}, ours is {ours}: \
         the parties do not run the same aggregation (compare with `millrace config check`)"
    )
}
