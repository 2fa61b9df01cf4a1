//! Parties and their keys: what each organisation generates for itself and hands to the others.
//!
//! Every party (an ingestor, a facilitator, the collector) generates its own keys; nobody else
//! ever sees its private keys. What it hands out is its **party document**
//! (`{name}.party.toml`, version [`PARTY_DOCUMENT_VERSION`]): its name, role, and public keys, each
//! with an id. Other parties' configs reference that document; the party's own config references
//! it too, plus the directory (or secret references) holding its private keys.
//!
//! - **Signing keys** (Ed25519) have string ids (`alpha-1`, `alpha-2`, …). Every signed object
//!   names the id of the key that signed it, and a reader trusts every listed key of a party. The
//!   party signs with its newest key that is not `retired`; a retired key stays listed so that what
//!   it signed before stays readable.
//! - **HPKE keys** (X25519, facilitators only) have one-byte ids, as DAP's HPKE config ids. Each
//!   report names, per share, the id of the key that sealed it, and the facilitator decrypts with
//!   that key. A key is *pending* before its `not_before`, *active* from then, and *expired* from
//!   its `expires`: clients seal to the newest active key; a share sealed to a key that had
//!   expired at its batch's time is invalid (`expired-key`).
//!
//! `millrace keys rotate` adds a new HPKE key (and, with `--signing`, a new signing key) and
//! gives the keys it replaces an expiry one overlap later, so reports sealed to the previous key
//! during the overlap still count.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{hpke_generate, Signer25519};
use crate::error::FormatError;
use crate::layout::validate_id;

/// The party-document format this build writes, and the versions it reads.
pub const PARTY_DOCUMENT_VERSION: u32 = 1;
pub const PARTY_DOCUMENT_VERSIONS: &[u32] = &[1];

/// What a party does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartyRole {
    Ingestor,
    Facilitator,
    Collector,
}

/// One Ed25519 signing key of a party (public half).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyEntry {
    pub id: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    /// Still trusted for what it signed, never used to sign again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// One X25519 HPKE key of a facilitator (public half).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HpkeKeyEntry {
    /// The id reports name (as DAP's HPKE config id).
    pub id: u8,
    /// X25519 public key, hex.
    pub public_key: String,
    /// RFC 3339: pending before this; active from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// RFC 3339: shares sealed to this key in batches from this time on are `expired-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// What a party hands to the others: `{name}.party.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartyDocument {
    pub version: u32,
    pub name: String,
    pub role: PartyRole,
    /// For facilitators: the VDAF aggregator index (0 is the leader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u8>,
    #[serde(default)]
    pub signing_keys: Vec<SigningKeyEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hpke_keys: Vec<HpkeKeyEntry>,
    /// The aggregations this party runs, with their shared parameters and digests (`millrace
    /// config publish`), for its peers' `millrace config check`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aggregations: Vec<crate::agreement::PublishedAggregation>,
}

/// Parses an RFC 3339 time of a key.
pub fn parse_time(what: &str, text: &str) -> Result<i64, FormatError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp())
        .map_err(|e| FormatError::Invalid(format!("{what} {text:?} is not an RFC 3339 time: {e}")))
}

fn rfc3339(t: i64) -> String {
    DateTime::<Utc>::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// An HPKE key's validity window, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Option<i64>,
    pub expires: Option<i64>,
}

impl Validity {
    pub fn of(key: &HpkeKeyEntry) -> Result<Self, FormatError> {
        let what = |field: &str| format!("HPKE key {} {field}", key.id);
        Ok(Validity {
            not_before: key
                .not_before
                .as_deref()
                .map(|t| parse_time(&what("not_before"), t))
                .transpose()?,
            expires: key
                .expires
                .as_deref()
                .map(|t| parse_time(&what("expires"), t))
                .transpose()?,
        })
    }
    /// Expired at `at`?
    pub fn expired_at(&self, at: i64) -> bool {
        self.expires.is_some_and(|e| at >= e)
    }
    /// Active at `at`: past `not_before`, not expired.
    pub fn active_at(&self, at: i64) -> bool {
        self.not_before.is_none_or(|n| at >= n) && !self.expired_at(at)
    }
    /// `pending`, `active` or `expired` at `at`.
    pub fn state_at(&self, at: i64) -> &'static str {
        if self.expired_at(at) {
            "expired"
        } else if self.active_at(at) {
            "active"
        } else {
            "pending"
        }
    }
}

impl PartyDocument {
    pub fn to_toml(&self) -> String {
        let header = format!(
            "# Party document of {:?}: its public keys, to hand to the other parties.\n\
             # Written by `millrace keygen --party` / `millrace keys rotate`. No private key is in here.\n\n",
            self.name
        );
        format!(
            "{header}{}",
            toml::to_string_pretty(self).unwrap_or_default()
        )
    }

    /// Parses and checks a party document (`what` names it in errors).
    pub fn from_toml(what: &str, text: &str) -> Result<Self, FormatError> {
        #[derive(Deserialize)]
        struct Versioned {
            version: Option<u32>,
        }
        let head: Versioned = toml::from_str(text)
            .map_err(|e| FormatError::Invalid(format!("party document {what}: {e}")))?;
        match head.version {
            Some(v) if PARTY_DOCUMENT_VERSIONS.contains(&v) => {}
            Some(v) => {
                return Err(FormatError::Invalid(format!(
                    "party document {what}: unsupported version {v} (this build reads version \
                     {PARTY_DOCUMENT_VERSION})"
                )))
            }
            None => {
                return Err(FormatError::Invalid(format!(
                    "party document {what}: no `version`"
                )))
            }
        }
        let doc: PartyDocument = toml::from_str(text)
            .map_err(|e| FormatError::Invalid(format!("party document {what}: {e}")))?;
        doc.check()
            .map_err(|e| FormatError::Invalid(format!("party document {what}: {e}")))?;
        Ok(doc)
    }

    /// The rules every party's keys follow, whether from a document or inline in a config.
    pub fn check(&self) -> Result<(), String> {
        validate_id("party name", &self.name).map_err(|e| e.to_string())?;
        match (self.role, self.index) {
            (PartyRole::Facilitator, Some(0 | 1)) => {}
            (PartyRole::Facilitator, other) => {
                return Err(format!(
                    "facilitator {:?} needs `index` 0 or 1, found {other:?}",
                    self.name
                ))
            }
            (_, Some(_)) => {
                return Err(format!(
                    "{:?} is not a facilitator and has no index",
                    self.name
                ))
            }
            (_, None) => {}
        }
        check_keys(
            &self.name,
            self.role == PartyRole::Facilitator,
            &self.signing_keys,
            &self.hpke_keys,
        )
    }

    /// The key this party signs with: its newest signing key that is not retired.
    pub fn current_signing_key(&self) -> Option<&SigningKeyEntry> {
        self.signing_keys.iter().rev().find(|k| !k.retired)
    }
}

/// Checks one party's key lists: at least one signing key that is not retired, unique ids, and
/// for a facilitator at least one HPKE key, unique ids, readable times.
pub fn check_keys(
    party: &str,
    needs_hpke: bool,
    signing: &[SigningKeyEntry],
    hpke: &[HpkeKeyEntry],
) -> Result<(), String> {
    if signing.iter().all(|k| k.retired) {
        return Err(format!(
            "party {party:?} has no signing key that is not retired"
        ));
    }
    let mut ids = BTreeSet::new();
    for k in signing {
        validate_id("signing key id", &k.id).map_err(|e| e.to_string())?;
        if !ids.insert(k.id.as_str()) {
            return Err(format!("party {party:?}: signing key id {:?} twice", k.id));
        }
    }
    if needs_hpke && hpke.is_empty() {
        return Err(format!("facilitator {party:?} has no HPKE key"));
    }
    if !needs_hpke && !hpke.is_empty() {
        return Err(format!(
            "party {party:?} is not a facilitator and has HPKE keys"
        ));
    }
    let mut hpke_ids = BTreeSet::new();
    for k in hpke {
        if !hpke_ids.insert(k.id) {
            return Err(format!("party {party:?}: HPKE key id {} twice", k.id));
        }
        let v = Validity::of(k).map_err(|e| format!("party {party:?}: {e}"))?;
        if let (Some(n), Some(e)) = (v.not_before, v.expires) {
            if e <= n {
                return Err(format!(
                    "party {party:?}: HPKE key {} expires before it becomes active",
                    k.id
                ));
            }
        }
    }
    Ok(())
}

/// The file (in a party's private key directory) holding the private half of signing key `id`.
pub fn signing_key_file(id: &str) -> String {
    format!("signing-{id}.ed25519")
}

/// The file (in a facilitator's private key directory) holding the private half of HPKE key `id`.
pub fn hpke_key_file(id: u8) -> String {
    format!("hpke-{id}.x25519")
}

/// A private key to write: its file name in the party's private key directory, and the secret.
pub struct PrivateKeyFile {
    pub file: String,
    pub secret: Zeroizing<String>,
}

fn new_signing_key(name: &str, n: usize) -> (SigningKeyEntry, PrivateKeyFile) {
    let id = format!("{name}-{n}");
    let signer = Signer25519::generate(&id);
    (
        SigningKeyEntry {
            id: id.clone(),
            public_key: signer.public_hex(),
            retired: false,
        },
        PrivateKeyFile {
            file: signing_key_file(&id),
            secret: signer.to_hex(),
        },
    )
}

fn new_hpke_key(id: u8, not_before: Option<i64>) -> (HpkeKeyEntry, PrivateKeyFile) {
    let (sk, pk) = hpke_generate();
    (
        HpkeKeyEntry {
            id,
            public_key: pk.to_hex(),
            not_before: not_before.map(rfc3339),
            expires: None,
        },
        PrivateKeyFile {
            file: hpke_key_file(id),
            secret: sk.to_hex(),
        },
    )
}

/// Generates a party's first keys: one signing key, and for a facilitator one HPKE key (id 1),
/// active at once. Returns its document and the private keys to write.
pub fn generate_party(
    name: &str,
    role: PartyRole,
    index: Option<u8>,
) -> Result<(PartyDocument, Vec<PrivateKeyFile>), FormatError> {
    let (signing, signing_secret) = new_signing_key(name, 1);
    let mut secrets = vec![signing_secret];
    let mut hpke_keys = Vec::new();
    if role == PartyRole::Facilitator {
        let (hpke, hpke_secret) = new_hpke_key(1, None);
        hpke_keys.push(hpke);
        secrets.push(hpke_secret);
    }
    let doc = PartyDocument {
        version: PARTY_DOCUMENT_VERSION,
        name: name.to_string(),
        role,
        index,
        signing_keys: vec![signing],
        hpke_keys,
        aggregations: Vec::new(),
    };
    doc.check().map_err(FormatError::Invalid)?;
    Ok((doc, secrets))
}

/// What [`rotate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// The new HPKE key's id (facilitators).
    pub new_hpke_key: Option<u8>,
    /// The HPKE keys given an expiry, with it.
    pub expiring: Vec<(u8, String)>,
    /// The new signing key's id (with `signing`).
    pub new_signing_key: Option<String>,
    pub retired_signing_keys: Vec<String>,
}

/// Adds a new HPKE key, active from `now` (a facilitator), and gives every HPKE key without an
/// expiry an expiry `overlap` seconds later; with `signing`, also adds a new signing key and
/// retires the ones before it. Returns the changed document, the private keys to write, and
/// what changed.
pub fn rotate(
    doc: &PartyDocument,
    now: i64,
    overlap_secs: i64,
    signing: bool,
) -> Result<(PartyDocument, Vec<PrivateKeyFile>, Rotation), FormatError> {
    let mut doc = doc.clone();
    let mut secrets = Vec::new();
    let mut rotation = Rotation {
        new_hpke_key: None,
        expiring: Vec::new(),
        new_signing_key: None,
        retired_signing_keys: Vec::new(),
    };
    if doc.role == PartyRole::Facilitator {
        let next = doc
            .hpke_keys
            .iter()
            .map(|k| k.id)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| {
                FormatError::Invalid(format!(
                    "party {:?} has used every HPKE key id up to 255: remove expired keys first",
                    doc.name
                ))
            })?;
        let expires = rfc3339(now.saturating_add(overlap_secs));
        for k in &mut doc.hpke_keys {
            if k.expires.is_none() {
                k.expires = Some(expires.clone());
                rotation.expiring.push((k.id, expires.clone()));
            }
        }
        let (key, secret) = new_hpke_key(next, Some(now));
        doc.hpke_keys.push(key);
        secrets.push(secret);
        rotation.new_hpke_key = Some(next);
    } else if !signing {
        return Err(FormatError::Invalid(format!(
            "party {:?} has no HPKE keys: rotate its signing key with --signing",
            doc.name
        )));
    }
    if signing {
        for k in &mut doc.signing_keys {
            if !k.retired {
                k.retired = true;
                rotation.retired_signing_keys.push(k.id.clone());
            }
        }
        let (key, secret) = new_signing_key(&doc.name, doc.signing_keys.len() + 1);
        rotation.new_signing_key = Some(key.id.clone());
        doc.signing_keys.push(key);
        secrets.push(secret);
    }
    doc.check().map_err(FormatError::Invalid)?;
    Ok((doc, secrets, rotation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_party_document_round_trips_and_holds_no_private_key() {
        let (doc, secrets) = generate_party("alpha", PartyRole::Facilitator, Some(0)).unwrap();
        let text = doc.to_toml();
        assert_eq!(PartyDocument::from_toml("alpha", &text).unwrap(), doc);
        assert_eq!(secrets.len(), 2);
        for s in &secrets {
            assert!(!text.contains(s.secret.as_str()), "{} leaked", s.file);
        }
        assert_eq!(doc.current_signing_key().unwrap().id, "alpha-1");
        assert_eq!(doc.hpke_keys[0].id, 1);
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let (doc, _) = generate_party("beta", PartyRole::Facilitator, Some(1)).unwrap();
        let text = doc.to_toml();
        let cases = [
            (
                text.replace("version = 1", "version = 4"),
                "unsupported version 4",
            ),
            (text.replace("version = 1", ""), "no `version`"),
            (text.replace("index = 1", "index = 2"), "index"),
            (
                text.replace("role = \"facilitator\"", "role = \"ingestor\""),
                "not a facilitator",
            ),
            (format!("{text}\nsurprise = 1\n"), "surprise"),
        ];
        for (bad, needle) in cases {
            let err = PartyDocument::from_toml("beta.party.toml", &bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            assert!(err.contains("beta.party.toml"), "{err}");
        }
    }

    #[test]
    fn rotation_adds_a_key_and_expires_the_old_one_after_the_overlap() {
        let (doc, _) = generate_party("alpha", PartyRole::Facilitator, Some(0)).unwrap();
        let now = 1_800_000_000;
        let (rotated, secrets, what) = rotate(&doc, now, 3600, true).unwrap();
        assert_eq!(what.new_hpke_key, Some(2));
        assert_eq!(what.new_signing_key.as_deref(), Some("alpha-2"));
        assert_eq!(what.retired_signing_keys, ["alpha-1"]);
        assert_eq!(secrets.len(), 2);
        let old = Validity::of(&rotated.hpke_keys[0]).unwrap();
        let new = Validity::of(&rotated.hpke_keys[1]).unwrap();
        assert_eq!(old.state_at(now), "active");
        assert_eq!(old.state_at(now + 3599), "active");
        assert_eq!(old.state_at(now + 3600), "expired");
        assert_eq!(new.state_at(now - 1), "pending");
        assert_eq!(new.state_at(now), "active");
        assert_eq!(rotated.current_signing_key().unwrap().id, "alpha-2");
        // The retired key stays listed: what it signed stays readable.
        assert!(rotated
            .signing_keys
            .iter()
            .any(|k| k.id == "alpha-1" && k.retired));
        // An ingestor has no HPKE key to rotate.
        let (ing, _) = generate_party("ingestor-1", PartyRole::Ingestor, None).unwrap();
        assert!(rotate(&ing, now, 3600, false).is_err());
        assert!(rotate(&ing, now, 3600, true).is_ok());
    }
}
