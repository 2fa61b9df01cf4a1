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
use crate::formats::InvalidReason;
use crate::layout::{validate_id, Window};
use crate::parties::{
    check_keys, hpke_key_file, signing_key_file, HpkeKeyEntry, PartyDocument, PartyRole,
    SigningKeyEntry, Validity,
};
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
    /// Its signing keys (public halves), each with the id its signatures name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<SigningKeyEntry>,
    /// Where its private keys are (only in its own config): `signing-{id}.ed25519` files,
    /// relative to this config's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_dir: Option<String>,
    /// The single-key form: an Ed25519 public key, hex, whose id is the ingestor's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The single-key form: a secret reference to its private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacilitatorEntry {
    /// 0 or 1: the VDAF aggregator index.
    pub index: u8,
    pub name: String,
    /// Its signing keys (public halves): verify its validation batches, manifests and sum parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<SigningKeyEntry>,
    /// Its HPKE keys (public halves): clients seal input shares to the newest active one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hpke_keys: Vec<HpkeKeyEntry>,
    /// Where its private keys are (only in its own config): `signing-{id}.ed25519` and
    /// `hpke-{id}.x25519` files, relative to this config's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_dir: Option<String>,
    /// The single-key form: an Ed25519 public key, hex, whose id is the facilitator's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_public_key: Option<String>,
    /// The single-key form: an X25519 HPKE public key, hex, id 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpke_public_key: Option<String>,
    /// The single-key form: secret reference to the signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// The single-key form: secret reference to the HPKE private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpke_private_key: Option<String>,
}

/// A party named by its party document (`{name}.party.toml`, as its owner's `millrace keygen
/// --party` wrote it): `[[party]] document = "beta.party.toml"`. In the party's own config, also
/// `private_key_dir`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartyRef {
    /// Path of the document, relative to this config's directory.
    pub document: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_dir: Option<String>,
}

/// One of a facilitator's HPKE private keys, with its id and validity.
#[derive(Clone, Debug)]
pub struct HpkeKeySlot {
    pub id: u8,
    pub key: HpkePrivateKey,
    pub validity: Validity,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationEntry {
    pub id: String,
    pub vdaf: VdafSpec,
    /// Window length: a whole number of hours (`1h`, `6h`, `1day`), or whole minutes dividing
    /// an hour (`1m`, `5m`, `15m`), whose batches are then partitioned by window.
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
    /// Report times are rounded down to a multiple of this (default `1h`, or the window when
    /// shorter; must divide an hour and the window). Coarser times say less about when a client reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_precision: Option<String>,
    /// How much later than its batch's signed time a report's time may be (client clocks run
    /// fast). Default 5 minutes. It never moves a report into another window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<String>,
    /// Secret reference to the 32-byte verify key shared by both facilitators.
    pub verify_key: String,
    /// The verify key's id (a fingerprint, see [`crate::agreement::verify_key_id`]): part of the
    /// aggregation digest. Derived from the key where this config can read it (and then checked
    /// against this); parties without the key (ingestors, the collector) need it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_key_id: Option<String>,
    /// Names of the ingestors whose batches this aggregation accepts.
    pub ingestors: Vec<String>,
    /// Differential privacy (`[aggregation.dp]`, Histogram and SumVec only): each facilitator
    /// noises its own aggregate share before releasing it. See [`crate::dp`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<crate::dp::DpEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The config format's version ([`CONFIG_VERSION`]); a service refuses to start on one it
    /// does not know.
    #[serde(default)]
    pub version: Option<u32>,
    /// Parties given by their party documents; each becomes an `[[ingestor]]` or
    /// `[[facilitator]]` entry when the config is loaded (collectors are only checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub party: Vec<PartyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingestor: Vec<IngestorEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
    /// See [`AggregationEntry::time_precision`], in seconds.
    pub time_precision_secs: i64,
    /// See [`AggregationEntry::clock_skew`].
    pub clock_skew: Duration,
    pub ingestors: Vec<String>,
    /// See [`AggregationEntry::dp`]; `None` releases the exact result.
    pub dp: Option<crate::dp::DpStrategy>,
    verify_key_ref: String,
    /// See [`AggregationEntry::verify_key_id`].
    pub verify_key_id: Option<String>,
}

/// The config format this build writes, and the ones it reads.
pub const CONFIG_VERSION: u32 = 1;
pub const CONFIG_VERSIONS: &[u32] = &[1];
/// Default of [`AggregationEntry::time_precision`].
pub const DEFAULT_TIME_PRECISION_SECS: i64 = 3600;
/// Default of [`AggregationEntry::clock_skew`].
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(300);
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

    /// The length of this aggregation's batch partitions: the hour, or the window when shorter.
    pub fn partition_secs(&self) -> i64 {
        crate::layout::partition_secs(self.window_secs)
    }

    /// The partition a batch collected at `time` is stored under.
    pub fn partition_of(&self, time: i64) -> crate::layout::Partition {
        crate::layout::Partition::with_length(time, self.partition_secs())
    }

    /// A report made at `time` carries this time: rounded down to the time precision.
    pub fn report_time(&self, time: i64) -> i64 {
        time - time.rem_euclid(self.time_precision_secs)
    }

    /// Checks a report's time against the batch carrying it, as both intake-workers do: it must
    /// be a multiple of the time precision, lie in the window of the batch's signed time (a
    /// report counts only in the window its time says), and be no later than the batch's time
    /// plus the clock skew.
    pub fn check_report_time(
        &self,
        report_time: i64,
        batch_time: i64,
    ) -> Result<(), InvalidReason> {
        if report_time.rem_euclid(self.time_precision_secs) != 0 {
            return Err(InvalidReason::BadTime);
        }
        let window = Window::containing(batch_time, self.window_secs);
        if report_time < window.start || report_time >= window.end {
            return Err(InvalidReason::OutsideWindow);
        }
        if report_time > batch_time.saturating_add(self.clock_skew.as_secs() as i64) {
            return Err(InvalidReason::BadTime);
        }
        Ok(())
    }
}

/// A single-key entry's one key, or a list entry's keys; both forms at once is an error.
fn one_form<T>(party: &str, what: &str, list: &[T], single: Option<T>) -> Result<Vec<T>, String>
where
    T: Clone,
{
    match (list.is_empty(), single) {
        (false, Some(_)) => Err(format!(
            "party {party:?} gives its {what} both as a list and in the single-key form"
        )),
        (true, Some(one)) => Ok(vec![one]),
        (_, None) => Ok(list.to_vec()),
    }
}

fn ingestor_signing_keys(i: &IngestorEntry) -> Result<Vec<SigningKeyEntry>, String> {
    one_form(
        &i.name,
        "signing keys",
        &i.signing_keys,
        i.public_key.as_ref().map(|p| SigningKeyEntry {
            id: i.name.clone(),
            public_key: p.clone(),
            retired: false,
        }),
    )
}

fn facilitator_signing_keys(f: &FacilitatorEntry) -> Result<Vec<SigningKeyEntry>, String> {
    one_form(
        &f.name,
        "signing keys",
        &f.signing_keys,
        f.signing_public_key.as_ref().map(|p| SigningKeyEntry {
            id: f.name.clone(),
            public_key: p.clone(),
            retired: false,
        }),
    )
}

fn facilitator_hpke_keys(f: &FacilitatorEntry) -> Result<Vec<HpkeKeyEntry>, String> {
    one_form(
        &f.name,
        "HPKE keys",
        &f.hpke_keys,
        f.hpke_public_key.as_ref().map(|p| HpkeKeyEntry {
            id: 0,
            public_key: p.clone(),
            not_before: None,
            expires: None,
        }),
    )
}

/// The loaded config.
#[derive(Clone, Debug)]
pub struct Config {
    path: PathBuf,
    dir: PathBuf,
    pub file: ConfigFile,
    pub aggregations: Vec<Aggregation>,
    /// Collectors named by party documents (checked; no service uses their keys yet).
    pub collectors: Vec<PartyDocument>,
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
        let mut file: ConfigFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        match file.version {
            Some(v) if CONFIG_VERSIONS.contains(&v) => {}
            Some(v) => {
                return Err(invalid(format!(
                    "config version {v} is not one this build reads (version {CONFIG_VERSION}); \
                     upgrade this service before using the new config"
                )))
            }
            None => {
                return Err(invalid(format!(
                    "no `version` at the top of the file (this build reads config version \
                     {CONFIG_VERSION}: add `version = {CONFIG_VERSION}`)"
                )))
            }
        }
        let mut collectors = Vec::new();
        for r in &file.party {
            let doc_path = dir.join(&r.document);
            let doc_text = std::fs::read_to_string(&doc_path).map_err(|e| {
                invalid(format!(
                    "party document {}: cannot read: {e}",
                    doc_path.display()
                ))
            })?;
            let doc = PartyDocument::from_toml(&doc_path.display().to_string(), &doc_text)
                .map_err(|e| invalid(e.to_string()))?;
            match doc.role {
                PartyRole::Ingestor => file.ingestor.push(IngestorEntry {
                    name: doc.name,
                    signing_keys: doc.signing_keys,
                    private_key_dir: r.private_key_dir.clone(),
                    public_key: None,
                    private_key: None,
                }),
                PartyRole::Facilitator => file.facilitator.push(FacilitatorEntry {
                    index: doc.index.unwrap_or_default(),
                    name: doc.name,
                    signing_keys: doc.signing_keys,
                    hpke_keys: doc.hpke_keys,
                    private_key_dir: r.private_key_dir.clone(),
                    signing_public_key: None,
                    hpke_public_key: None,
                    signing_key: None,
                    hpke_private_key: None,
                }),
                PartyRole::Collector => collectors.push(doc),
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for i in &file.ingestor {
            validate_id("ingestor name", &i.name).map_err(|e| invalid(e.to_string()))?;
            check_keys(
                &i.name,
                false,
                &ingestor_signing_keys(i).map_err(&invalid)?,
                &[],
            )
            .map_err(&invalid)?;
            if !names.insert(i.name.clone()) {
                return Err(invalid(format!("party {:?} declared twice", i.name)));
            }
        }
        for f in &file.facilitator {
            validate_id("facilitator name", &f.name).map_err(|e| invalid(e.to_string()))?;
            check_keys(
                &f.name,
                true,
                &facilitator_signing_keys(f).map_err(&invalid)?,
                &facilitator_hpke_keys(f).map_err(&invalid)?,
            )
            .map_err(&invalid)?;
            if !names.insert(f.name.clone()) {
                return Err(invalid(format!("party {:?} declared twice", f.name)));
            }
        }
        let mut indexes: Vec<u8> = file.facilitator.iter().map(|f| f.index).collect();
        indexes.sort_unstable();
        if indexes != [0, 1] {
            return Err(invalid(format!(
                "expected exactly two [[facilitator]] entries with index 0 and 1, found {indexes:?}"
            )));
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
            // Batches are partitioned by hour, or by window when a window is shorter: a
            // partition lies inside one window either way.
            let whole_hours = window_secs % 3600 == 0;
            let minutes_dividing_the_hour = window_secs % 60 == 0 && 3600 % window_secs == 0;
            if window_secs == 0
                || window.subsec_nanos() != 0
                || !(whole_hours || minutes_dividing_the_hour)
            {
                return Err(ctx(format!(
                    "window {:?} must be a whole number of hours, or whole minutes dividing an \
                     hour (1m, 2m, 5m, 10m, 15m, 30m, ...)",
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
            let time_precision = match &a.time_precision {
                Some(text) => duration(&shown, "time_precision", text)?,
                None => Duration::from_secs(DEFAULT_TIME_PRECISION_SECS.min(window_secs) as u64),
            };
            let time_precision_secs = time_precision.as_secs() as i64;
            if time_precision_secs == 0
                || time_precision.subsec_nanos() != 0
                || 3600 % time_precision_secs != 0
                || window_secs % time_precision_secs != 0
            {
                return Err(ctx(format!(
                    "time_precision {:?} must be whole seconds dividing an hour (1s … 1h) and \
                     the window ({:?})",
                    a.time_precision.as_deref().unwrap_or_default(),
                    a.window
                )));
            }
            let dp = match &a.dp {
                Some(entry) => Some(
                    crate::dp::DpStrategy::from_entry(entry, &a.vdaf)
                        .map_err(|e| ctx(e.to_string()))?,
                ),
                None => None,
            };
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
                time_precision_secs,
                clock_skew: match &a.clock_skew {
                    Some(text) => duration(&shown, "clock_skew", text)?,
                    None => DEFAULT_CLOCK_SKEW,
                },
                ingestors: a.ingestors.clone(),
                dp,
                verify_key_ref: a.verify_key.clone(),
                verify_key_id: a.verify_key_id.clone(),
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            file,
            aggregations,
            collectors,
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

    fn no_private_key(&self, what: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            reason: format!("{what} has no private key reference in this config"),
        }
    }

    fn invalid(&self, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            reason,
        }
    }

    fn ingestor(&self, name: &str) -> Result<&IngestorEntry, ConfigError> {
        self.file
            .ingestor
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| self.invalid(format!("no ingestor named {name:?}")))
    }

    /// Every signing key of every ingestor, each attributed to its ingestor.
    pub fn ingestor_keys(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = KeyRing::new();
        for i in &self.file.ingestor {
            for k in ingestor_signing_keys(i).map_err(|e| self.invalid(e))? {
                ring.add_hex(&k.id, &i.name, &k.public_key)
                    .map_err(|e| self.crypto(e))?;
            }
        }
        Ok(ring)
    }

    /// Every signing key of both facilitators, each attributed to its facilitator.
    pub fn facilitator_keys(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = KeyRing::new();
        for f in &self.file.facilitator {
            for k in facilitator_signing_keys(f).map_err(|e| self.invalid(e))? {
                ring.add_hex(&k.id, &f.name, &k.public_key)
                    .map_err(|e| self.crypto(e))?;
            }
        }
        Ok(ring)
    }

    /// The key `party` signs with (its newest that is not retired), from `keys`; the secret
    /// reference is the single-key form's `single`, else the file in its private key directory.
    fn signer_from(
        &self,
        party: &str,
        keys: &[SigningKeyEntry],
        single: Option<&str>,
        dir: Option<&str>,
    ) -> Result<Signer25519, ConfigError> {
        let key = keys.iter().rev().find(|k| !k.retired).ok_or_else(|| {
            self.invalid(format!("{party} has no signing key that is not retired"))
        })?;
        let reference = match (single, dir) {
            (Some(r), _) => r.to_string(),
            (None, Some(dir)) => format!("file:{dir}/{}", signing_key_file(&key.id)),
            (None, None) => return Err(self.no_private_key(party)),
        };
        let secret = read_secret(&reference, &self.dir).map_err(|e| self.crypto(e))?;
        let signer = Signer25519::from_hex(&key.id, &secret).map_err(|e| self.crypto(e))?;
        if signer.public_hex() != key.public_key.trim().to_lowercase() {
            return Err(self.invalid(format!(
                "{party}: the private key in {reference} is not the one of signing key {:?}",
                key.id
            )));
        }
        Ok(signer)
    }

    pub fn facilitator_signer(&self, index: u8) -> Result<Signer25519, ConfigError> {
        let f = self.facilitator(index)?;
        let keys = facilitator_signing_keys(f).map_err(|e| self.invalid(e))?;
        self.signer_from(
            &format!("facilitator {}", f.name),
            &keys,
            f.signing_key.as_deref(),
            f.private_key_dir.as_deref(),
        )
    }

    pub fn ingestor_signer(&self, name: &str) -> Result<Signer25519, ConfigError> {
        let i = self.ingestor(name)?;
        let keys = ingestor_signing_keys(i).map_err(|e| self.invalid(e))?;
        self.signer_from(
            &format!("ingestor {name}"),
            &keys,
            i.private_key.as_deref(),
            i.private_key_dir.as_deref(),
        )
    }

    /// Every HPKE private key of facilitator `index` (what its intake-worker opens shares
    /// with), each with its id and validity.
    pub fn hpke_private_keys(&self, index: u8) -> Result<Vec<HpkeKeySlot>, ConfigError> {
        let f = self.facilitator(index)?;
        let what = format!("facilitator {}", f.name);
        let mut slots = Vec::new();
        for k in facilitator_hpke_keys(f).map_err(|e| self.invalid(e))? {
            let reference = match (&f.hpke_private_key, &f.private_key_dir) {
                (Some(r), _) => r.clone(),
                (None, Some(dir)) => format!("file:{dir}/{}", hpke_key_file(k.id)),
                (None, None) => return Err(self.no_private_key(&what)),
            };
            let secret = read_secret(&reference, &self.dir).map_err(|e| self.crypto(e))?;
            let key = HpkePrivateKey::from_hex(&format!("{} HPKE key {}", f.name, k.id), &secret)
                .map_err(|e| self.crypto(e))?;
            if key.public().to_hex() != k.public_key.trim().to_lowercase() {
                return Err(self.invalid(format!(
                    "{what}: the private key in {reference} is not the one of HPKE key {}",
                    k.id
                )));
            }
            let validity = Validity::of(&k).map_err(|e| self.invalid(e.to_string()))?;
            slots.push(HpkeKeySlot {
                id: k.id,
                key,
                validity,
            });
        }
        Ok(slots)
    }

    /// The HPKE key a client seals facilitator `index`'s share to at time `at`: the newest
    /// (latest `not_before`, then highest id) active key. Errors if none is active.
    pub fn hpke_public_key_at(
        &self,
        index: u8,
        at: i64,
    ) -> Result<(u8, HpkePublicKey), ConfigError> {
        let f = self.facilitator(index)?;
        let mut best: Option<(i64, u8, &str)> = None;
        let keys = facilitator_hpke_keys(f).map_err(|e| self.invalid(e))?;
        for k in &keys {
            let v = Validity::of(k).map_err(|e| self.invalid(e.to_string()))?;
            if !v.active_at(at) {
                continue;
            }
            let rank = (v.not_before.unwrap_or(i64::MIN), k.id);
            if best.is_none_or(|(n, id, _)| rank > (n, id)) {
                best = Some((rank.0, k.id, k.public_key.as_str()));
            }
        }
        let (_, id, public) = best.ok_or_else(|| {
            self.invalid(format!(
                "facilitator {} has no HPKE key active at {}",
                f.name,
                Window::rfc3339(at)
            ))
        })?;
        let key = HpkePublicKey::from_hex(&format!("{} HPKE key {id}", f.name), public)
            .map_err(|e| self.crypto(e))?;
        Ok((id, key))
    }

    /// The aggregation's shared parameters (see [`crate::agreement`]). The verify key's id is
    /// derived from the key where this config can read it (and must then equal a stated
    /// `verify_key_id`), else taken from `verify_key_id`.
    pub fn shared_parameters(
        &self,
        aggregation: &Aggregation,
    ) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
        let derived = self
            .verify_key(aggregation)
            .ok()
            .map(|k| crate::agreement::verify_key_id(&k));
        let id = match (derived, &aggregation.verify_key_id) {
            (Some(derived), Some(stated)) if &derived != stated => {
                return Err(self.invalid(format!(
                    "aggregation {:?}: its verify key's id is {derived}, but verify_key_id \
                     says {stated}",
                    aggregation.id
                )))
            }
            (Some(derived), _) => derived,
            (None, Some(stated)) => stated.clone(),
            (None, None) => {
                return Err(self.invalid(format!(
                    "aggregation {:?}: no readable verify key and no verify_key_id, so its \
                     aggregation digest cannot be computed (add `verify_key_id`, as `millrace \
                     keygen` writes it)",
                    aggregation.id
                )))
            }
        };
        Ok(crate::agreement::shared_parameters(aggregation, &id))
    }

    /// The digest of the aggregation's shared parameters, which tasks and signed artefacts carry.
    pub fn aggregation_digest(
        &self,
        aggregation: &Aggregation,
    ) -> Result<crate::agreement::AggregationDigest, ConfigError> {
        Ok(crate::agreement::digest_of(
            &self.shared_parameters(aggregation)?,
        ))
    }

    /// Every aggregation's digest, by id; an aggregation whose digest cannot be computed here is
    /// left out.
    pub fn aggregation_digests(
        &self,
    ) -> std::collections::BTreeMap<String, crate::agreement::AggregationDigest> {
        self.aggregations
            .iter()
            .filter_map(|a| Some((a.id.clone(), self.aggregation_digest(a).ok()?)))
            .collect()
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
version = 1

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
    fn a_report_counts_only_in_the_window_its_time_says() {
        let text = GOOD.replace(
            "min_reports = 10",
            "min_reports = 10\ntime_precision = \"10m\"\nclock_skew = \"2m\"",
        );
        let c = Config::parse(&text, Path::new("m.toml"), Path::new(".")).unwrap();
        let a = c.aggregation("clicks").unwrap();
        let hour = 1_700_000_000 - 1_700_000_000 % 3600;
        assert_eq!(a.report_time(hour + 1199), hour + 600);
        let batch = hour + 1800;
        assert_eq!(a.check_report_time(hour + 600, batch), Ok(()));
        assert_eq!(a.check_report_time(hour, batch), Ok(()));
        // The previous or next window, even by one precision step: outside.
        assert_eq!(
            a.check_report_time(hour - 600, batch),
            Err(InvalidReason::OutsideWindow)
        );
        assert_eq!(
            a.check_report_time(hour + 3600, hour + 3599),
            Err(InvalidReason::OutsideWindow)
        );
        // Later than the batch by more than the skew, or not rounded: a bad time.
        assert_eq!(
            a.check_report_time(hour + 2400, batch),
            Err(InvalidReason::BadTime)
        );
        assert_eq!(
            a.check_report_time(hour + 601, batch),
            Err(InvalidReason::BadTime)
        );
        assert_eq!(a.check_report_time(hour + 1800, batch - 100), Ok(()));
    }

    #[test]
    fn minute_windows_partition_by_window_and_default_their_precision_to_it() {
        let text = GOOD.replace("window = \"1h\"", "window = \"5m\"");
        let c = Config::parse(&text, Path::new("m.toml"), Path::new(".")).unwrap();
        let a = &c.aggregations[0];
        assert_eq!(a.window_secs, 300);
        assert_eq!(a.partition_secs(), 300);
        assert_eq!(a.time_precision_secs, 300);
        let t = 1_763_900_000; // 12:13:20
        assert_eq!(a.partition_of(t).path(), "2025/11/23/12/10-15");
        assert_eq!(a.report_time(t), t - 200);
        assert_eq!(a.check_report_time(t - 200, t), Ok(()));
        // The previous five minutes are another window.
        assert_eq!(
            a.check_report_time(t - 500, t),
            Err(InvalidReason::OutsideWindow)
        );
        let hourly = Config::parse(GOOD, Path::new("m.toml"), Path::new(".")).unwrap();
        assert_eq!(
            hourly.aggregations[0].partition_of(t).path(),
            "2025/11/23/12"
        );
        assert_eq!(hourly.aggregations[0].time_precision_secs, 3600);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases = [
            (
                GOOD.replace("window = \"1h\"", "window = \"90m\""),
                "whole number of hours",
            ),
            (
                GOOD.replace("window = \"1h\"", "window = \"7m\""),
                "whole minutes dividing an hour",
            ),
            (
                GOOD.replace("window = \"1h\"", "window = \"90s\""),
                "whole minutes dividing an hour",
            ),
            (
                GOOD.replace(
                    "window = \"1h\"",
                    "window = \"5m\"\ntime_precision = \"10m\"",
                ),
                "dividing an hour (1s … 1h) and the window",
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
                GOOD.replace("version = 1", "version = 7"),
                "config version 7",
            ),
            (GOOD.replace("version = 1", ""), "no `version`"),
            (
                GOOD.replace("grace = \"5m\"", "grace = \"5m\"\ntime_precision = \"7m\""),
                "time_precision",
            ),
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

    const DP: &str = "\n[aggregation.dp]\nstrategy = \"pure-dp-discrete-laplace\"\n\
                      epsilon = { numerator = 1, denominator = 2 }\n";

    /// GOOD with its aggregation turned into a Histogram, plus `dp` (a `[aggregation.dp]` table).
    fn histogram_with(dp: &str) -> String {
        GOOD.replace(
            "vdaf = { type = \"sum\", max_measurement = 100 }",
            "vdaf = { type = \"histogram\", length = 10, chunk_length = 3 }",
        ) + dp
    }

    #[test]
    fn a_dp_table_on_a_histogram_parses_and_survives_a_rewrite() {
        let parse = |text: &str| Config::parse(text, Path::new("m.toml"), Path::new(".")).unwrap();
        assert!(parse(&histogram_with("")).aggregations[0].dp.is_none());
        let c = parse(&histogram_with(DP));
        let dp = c.aggregations[0].dp.clone().unwrap();
        assert_eq!(dp.to_string(), "pure-dp-discrete-laplace, epsilon 1/2");
        assert_eq!(dp.sensitivity(), 2);
        assert_eq!(dp.noise_bound(), 93);
        // What `millrace keygen` writes (the file serialized again) reads back the same.
        let again = parse(&toml::to_string_pretty(&c.file).unwrap());
        assert_eq!(again.aggregations[0].dp, Some(dp));
    }

    #[test]
    fn a_bad_dp_setting_names_the_aggregation() {
        let cases = [
            // Count and Sum take no noise in prio: the aggregation, a Sum, is named.
            (GOOD.to_string() + DP, "\"clicks\": dp: a Sum aggregation"),
            (
                histogram_with(&DP.replace("numerator = 1", "numerator = 0")),
                "\"clicks\": dp.epsilon 0/2: epsilon must be greater than zero",
            ),
            (
                histogram_with(&DP.replace("numerator = 1", "numerator = -1")),
                "\"clicks\": dp.epsilon -1/2: numerator and denominator must both be positive",
            ),
            (
                histogram_with(&DP.replace("denominator = 2", "denominator = 0")),
                "\"clicks\": dp.epsilon 1/0: the denominator is zero",
            ),
            (
                histogram_with(&DP.replace("pure-dp-discrete-laplace", "gaussian")),
                "pure-dp-discrete-laplace",
            ),
            (histogram_with(&(DP.to_string() + "delta = 1\n")), "delta"),
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
