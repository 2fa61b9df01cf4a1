//! What a client sends an ingestor, and what the ingestor tells clients about the keys to seal to.
//!
//! **One report** (media type [`REPORT_MEDIA_TYPE`], version [`UPLOAD_REPORT_VERSION`]), all
//! integers big-endian:
//!
//! ```text
//! version u8 (1)
//! report id [16]
//! time i64                     unix seconds, rounded down to the aggregation's time precision
//! public share  u32 length | bytes
//! 2 × sealed input share, facilitator 0 then 1:
//!     HPKE key id u8 | encapsulated key [32] | ciphertext u32 length | bytes
//! ```
//!
//! **Many reports** (media type [`REPORT_LIST_MEDIA_TYPE`], version [`UPLOAD_LIST_VERSION`]):
//!
//! ```text
//! version u8 (1) | count u32 (at least 1) | count × (u32 length | one report, as above)
//! ```
//!
//! Each report of a list is length-prefixed, so an error names the report it is in (its index,
//! from 0). Decoding is strict: every length is checked against what is left, trailing bytes are
//! refused (after a report, and after the list), and an unknown version is refused naming it.
//! `tests/vectors/upload-report-v1.hex` (fields in `upload-report-v1.json`) and
//! `upload-report-list-v1.hex` pin the layout byte for byte.
//!
//! Each input share is sealed exactly as the facilitator opens it from an ingestion batch:
//! [`input_share_info`] (aggregation and facilitator) and [`input_share_aad`] (report id, time,
//! public share), so the ingestor only re-packs what it receives and can change nothing.
//!
//! **The HPKE configs** (`GET /aggregations/{id}/hpke-config`, JSON, version
//! [`HPKE_CONFIG_VERSION`]) list each facilitator's keys active now, preferred first, with the
//! aggregation's VDAF and time precision: everything a client needs to make a report.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::codec::{Reader, Writer};
use crate::config::{Aggregation, Config, ConfigError};
use crate::crypto::{random_bytes, HpkePublicKey, ENCAPPED_KEY_LEN};
use crate::error::{CryptoError, FormatError, VdafError};
use crate::formats::{input_share_aad, input_share_info, versions_text, EncryptedReport};
use crate::parties::{HpkeKeyEntry, Validity};
use crate::vdaf::{Measurement, Prio3Vdaf, ReportId, VdafSpec};

/// The media type of a body holding one report.
pub const REPORT_MEDIA_TYPE: &str = "application/vnd.millrace.report";
/// The media type of a body holding many reports.
pub const REPORT_LIST_MEDIA_TYPE: &str = "application/vnd.millrace.report-list";

/// The report encoding this build writes, and the ones it reads.
pub const UPLOAD_REPORT_VERSION: u8 = 1;
pub const UPLOAD_REPORT_VERSIONS: &[u8] = &[1];
/// The list encoding this build writes, and the ones it reads.
pub const UPLOAD_LIST_VERSION: u8 = 1;
pub const UPLOAD_LIST_VERSIONS: &[u8] = &[1];

/// The fixed part of one encoded report: version, id, time, the public share's length, and per
/// facilitator the key id, encapsulated key and ciphertext length.
pub const REPORT_FIXED_LEN: usize = 1 + 16 + 8 + 4 + 2 * (1 + ENCAPPED_KEY_LEN + 4);

/// One input share sealed to one facilitator's HPKE key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedShare {
    /// The id of the facilitator's HPKE key it is sealed to (from the HPKE config answer).
    pub hpke_key_id: u8,
    pub encapped_key: [u8; ENCAPPED_KEY_LEN],
    pub ciphertext: Vec<u8>,
}

/// One report as a client uploads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadReport {
    pub report_id: ReportId,
    /// Unix seconds, rounded down to the aggregation's time precision; bound into both shares.
    pub time: i64,
    pub public_share: Vec<u8>,
    /// Facilitator 0's share, then facilitator 1's.
    pub shares: [SealedShare; 2],
}

/// Why an upload body was not accepted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UploadError {
    /// The body's media type is not one of the two upload types.
    #[error(
        "unsupported media type {found:?} (send {REPORT_MEDIA_TYPE} for one report or \
         {REPORT_LIST_MEDIA_TYPE} for many)"
    )]
    MediaType { found: String },
    /// Something outside any one report: the list's version, count or trailing bytes.
    #[error("report list: {0}")]
    List(FormatError),
    /// Report `index` (0 for a single-report body) is malformed.
    #[error("report {index}: {error}")]
    Report { index: usize, error: FormatError },
}

impl UploadReport {
    /// The encoded length of this report.
    pub fn encoded_len(&self) -> usize {
        REPORT_FIXED_LEN
            + self.public_share.len()
            + self
                .shares
                .iter()
                .map(|s| s.ciphertext.len())
                .sum::<usize>()
    }

    fn write(&self, w: &mut Writer) -> Result<(), FormatError> {
        w.u8(UPLOAD_REPORT_VERSION);
        w.raw(&self.report_id);
        w.i64(self.time);
        w.bytes(&self.public_share)?;
        for share in &self.shares {
            w.u8(share.hpke_key_id);
            w.raw(&share.encapped_key);
            w.bytes(&share.ciphertext)?;
        }
        Ok(())
    }

    /// Encodes one report (the body of a [`REPORT_MEDIA_TYPE`] upload).
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let mut w = Writer::with_capacity(self.encoded_len());
        self.write(&mut w)?;
        Ok(w.buf)
    }

    /// Decodes one report; refuses an unknown version, truncation and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if !UPLOAD_REPORT_VERSIONS.contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                what: "upload report",
                found: version,
                supported: versions_text(UPLOAD_REPORT_VERSIONS),
            });
        }
        let report_id = r.array("report id")?;
        let time = r.i64("time")?;
        let public_share = r.bytes("public share")?.to_vec();
        let mut share = |names: [&str; 3]| -> Result<SealedShare, FormatError> {
            Ok(SealedShare {
                hpke_key_id: r.u8(names[0])?,
                encapped_key: r.array(names[1])?,
                ciphertext: r.bytes(names[2])?.to_vec(),
            })
        };
        let shares = [
            share([
                "facilitator 0's HPKE key id",
                "facilitator 0's encapsulated key",
                "facilitator 0's ciphertext",
            ])?,
            share([
                "facilitator 1's HPKE key id",
                "facilitator 1's encapsulated key",
                "facilitator 1's ciphertext",
            ])?,
        ];
        r.finish("upload report")?;
        Ok(UploadReport {
            report_id,
            time,
            public_share,
            shares,
        })
    }

    /// Facilitator `facilitator`'s copy of this report, as an ingestion batch carries it.
    pub fn encrypted_report(&self, facilitator: u8) -> EncryptedReport {
        let share = &self.shares[usize::from(facilitator.min(1))];
        EncryptedReport {
            report_id: self.report_id,
            time: self.time,
            hpke_key_id: share.hpke_key_id,
            public_share: self.public_share.clone(),
            encapped_key: share.encapped_key,
            ciphertext: share.ciphertext.clone(),
        }
    }
}

/// Encodes many reports (the body of a [`REPORT_LIST_MEDIA_TYPE`] upload).
pub fn encode_report_list(reports: &[UploadReport]) -> Result<Vec<u8>, FormatError> {
    let total: usize = reports.iter().map(|r| 4 + r.encoded_len()).sum();
    let mut w = Writer::with_capacity(5 + total);
    w.u8(UPLOAD_LIST_VERSION);
    w.u32(u32::try_from(reports.len()).map_err(|_| {
        FormatError::Invalid(format!("{} reports do not fit one list", reports.len()))
    })?);
    for report in reports {
        w.bytes(&report.encode()?)?;
    }
    Ok(w.buf)
}

/// Decodes a report list; an error in one report names its index.
pub fn decode_report_list(bytes: &[u8]) -> Result<Vec<UploadReport>, UploadError> {
    let mut r = Reader::new(bytes);
    let version = r.u8("version").map_err(UploadError::List)?;
    if !UPLOAD_LIST_VERSIONS.contains(&version) {
        return Err(UploadError::List(FormatError::UnsupportedVersion {
            what: "upload report list",
            found: version,
            supported: versions_text(UPLOAD_LIST_VERSIONS),
        }));
    }
    let count = r
        .count("reports", 4 + REPORT_FIXED_LEN)
        .map_err(UploadError::List)?;
    if count == 0 {
        return Err(UploadError::List(FormatError::Invalid(
            "the list holds no report".to_string(),
        )));
    }
    let mut reports = Vec::with_capacity(count);
    for index in 0..count {
        let bytes = r
            .bytes("report")
            .map_err(|error| UploadError::Report { index, error })?;
        reports.push(
            UploadReport::decode(bytes).map_err(|error| UploadError::Report { index, error })?,
        );
    }
    r.finish("upload report list").map_err(UploadError::List)?;
    Ok(reports)
}

/// Decodes an upload body by its media type (parameters such as `; charset=` are ignored).
pub fn decode_upload(media_type: &str, bytes: &[u8]) -> Result<Vec<UploadReport>, UploadError> {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        REPORT_MEDIA_TYPE => UploadReport::decode(bytes)
            .map(|r| vec![r])
            .map_err(|error| UploadError::Report { index: 0, error }),
        REPORT_LIST_MEDIA_TYPE => decode_report_list(bytes),
        _ => Err(UploadError::MediaType {
            found: media_type.to_string(),
        }),
    }
}

/// Why a report could not be made.
#[derive(Debug, Error)]
pub enum SealError {
    #[error("sharding: {0}")]
    Vdaf(#[from] VdafError),
    #[error("sealing facilitator {facilitator}'s share: {source}")]
    Crypto {
        facilitator: u8,
        #[source]
        source: CryptoError,
    },
}

/// Shards `measurement` with Prio3 and seals each input share to its facilitator's key (`keys`:
/// facilitator 0's key id and key, then facilitator 1's), as a client does. `time` must already
/// be rounded to the aggregation's time precision ([`Aggregation::report_time`]).
pub fn seal_report(
    aggregation: &str,
    vdaf: &Prio3Vdaf,
    report_id: ReportId,
    time: i64,
    measurement: &Measurement,
    keys: [(u8, &HpkePublicKey); 2],
) -> Result<UploadReport, SealError> {
    let (public_share, input_shares) = vdaf.shard(measurement, &report_id)?;
    let aad = input_share_aad(&report_id, time, &public_share);
    let seal = |f: u8| -> Result<SealedShare, SealError> {
        let (id, key) = keys[usize::from(f)];
        let (encapped_key, ciphertext) = key
            .seal(
                &input_share_info(aggregation, f),
                &aad,
                &input_shares[usize::from(f)],
            )
            .map_err(|source| SealError::Crypto {
                facilitator: f,
                source,
            })?;
        Ok(SealedShare {
            hpke_key_id: id,
            encapped_key,
            ciphertext,
        })
    };
    let shares = [seal(0)?, seal(1)?];
    Ok(UploadReport {
        report_id,
        time,
        public_share,
        shares,
    })
}

/// A new random report id.
pub fn new_report_id() -> ReportId {
    random_bytes()
}

/// The HPKE config document's version this build writes, and the ones it reads.
pub const HPKE_CONFIG_VERSION: u32 = 1;
pub const HPKE_CONFIG_VERSIONS: &[u32] = &[1];
/// The HPKE suite every Millrace key uses, by its RFC 9180 names.
pub const KEM: &str = "DHKEM(X25519, HKDF-SHA256)";
pub const KDF: &str = "HKDF-SHA256";
pub const AEAD: &str = "ChaCha20Poly1305";

/// One HPKE key a facilitator accepts shares sealed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpkeConfig {
    /// The key id a sealed share names.
    pub id: u8,
    pub kem: String,
    pub kdf: String,
    pub aead: String,
    /// The X25519 public key, hex.
    pub public_key: String,
    /// RFC 3339: when the key stops being accepted, if it is being replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// One facilitator's active HPKE configs, preferred (newest) first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilitatorHpkeConfigs {
    pub index: u8,
    pub name: String,
    pub configs: Vec<HpkeConfig>,
}

/// What a client needs to know about the aggregation to make a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregationInfo {
    pub id: String,
    pub vdaf: VdafSpec,
    /// Report times are rounded down to a multiple of this many seconds.
    pub time_precision_secs: i64,
}

/// The answer of `GET /aggregations/{id}/hpke-config`. Unknown fields are ignored (a newer
/// ingestor may add some within a version); a breaking change raises the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpkeConfigDocument {
    pub version: u32,
    pub aggregation: AggregationInfo,
    /// Facilitator 0, then facilitator 1.
    pub facilitators: Vec<FacilitatorHpkeConfigs>,
}

/// A facilitator's HPKE key entries, whichever form the config gives them in.
pub fn facilitator_hpke_entries(config: &Config, index: u8) -> Vec<HpkeKeyEntry> {
    let Some(f) = config.file.facilitator.iter().find(|f| f.index == index) else {
        return Vec::new();
    };
    if !f.hpke_keys.is_empty() {
        return f.hpke_keys.clone();
    }
    f.hpke_public_key
        .iter()
        .map(|p| HpkeKeyEntry {
            id: 0,
            public_key: p.clone(),
            not_before: None,
            expires: None,
        })
        .collect()
}

impl HpkeConfigDocument {
    /// Each facilitator's keys active at `now`, preferred first (latest `not_before`, then
    /// highest id: the key [`Config::hpke_public_key_at`] picks).
    pub fn from_config(
        config: &Config,
        aggregation: &Aggregation,
        now: i64,
    ) -> Result<Self, ConfigError> {
        let mut facilitators = Vec::with_capacity(2);
        for index in 0..2u8 {
            let name = config.facilitator_name(index)?.to_string();
            let mut active = Vec::new();
            for k in facilitator_hpke_entries(config, index) {
                let v = Validity::of(&k).map_err(|e| ConfigError::Invalid {
                    path: format!("facilitator {name}"),
                    reason: e.to_string(),
                })?;
                if v.active_at(now) {
                    active.push(((v.not_before.unwrap_or(i64::MIN), k.id), k));
                }
            }
            active.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
            facilitators.push(FacilitatorHpkeConfigs {
                index,
                name,
                configs: active
                    .into_iter()
                    .map(|(_, k)| HpkeConfig {
                        id: k.id,
                        kem: KEM.to_string(),
                        kdf: KDF.to_string(),
                        aead: AEAD.to_string(),
                        public_key: k.public_key.trim().to_lowercase(),
                        expires: k.expires,
                    })
                    .collect(),
            });
        }
        Ok(HpkeConfigDocument {
            version: HPKE_CONFIG_VERSION,
            aggregation: AggregationInfo {
                id: aggregation.id.clone(),
                vdaf: aggregation.vdaf.spec().clone(),
                time_precision_secs: aggregation.time_precision_secs,
            },
            facilitators,
        })
    }

    pub fn to_json(&self) -> Result<Vec<u8>, FormatError> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| FormatError::Invalid(format!("HPKE config document: {e}")))
    }

    /// Parses and checks: a version this build reads, both facilitators in order, each with at
    /// least one key of the one suite Millrace uses, and a time precision that divides an hour.
    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let bad = |reason: String| FormatError::Invalid(format!("HPKE config document: {reason}"));
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let head: Versioned = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if !HPKE_CONFIG_VERSIONS.contains(&head.version) {
            return Err(bad(format!(
                "unsupported version {} (this build reads version {HPKE_CONFIG_VERSION})",
                head.version
            )));
        }
        let doc: HpkeConfigDocument =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let p = doc.aggregation.time_precision_secs;
        if p <= 0 || 3600 % p != 0 {
            return Err(bad(format!("time precision {p} s does not divide an hour")));
        }
        for (i, f) in doc.facilitators.iter().enumerate() {
            if usize::from(f.index) != i {
                return Err(bad(format!(
                    "facilitator {} listed at position {i}",
                    f.index
                )));
            }
            if f.configs.is_empty() {
                return Err(bad(format!("facilitator {} has no active key", f.index)));
            }
            for c in &f.configs {
                if (c.kem.as_str(), c.kdf.as_str(), c.aead.as_str()) != (KEM, KDF, AEAD) {
                    return Err(bad(format!(
                        "facilitator {} key {}: suite {} / {} / {} is not {KEM} / {KDF} / {AEAD}",
                        f.index, c.id, c.kem, c.kdf, c.aead
                    )));
                }
            }
        }
        if doc.facilitators.len() != 2 {
            return Err(bad(format!(
                "expected 2 facilitators, found {}",
                doc.facilitators.len()
            )));
        }
        Ok(doc)
    }

    /// The key facilitator `index`'s share is sealed to: its preferred config.
    pub fn sealing_key(&self, index: u8) -> Result<(u8, HpkePublicKey), FormatError> {
        let f = self
            .facilitators
            .get(usize::from(index))
            .ok_or_else(|| FormatError::Invalid(format!("no facilitator {index}")))?;
        let c = f.configs.first().ok_or_else(|| {
            FormatError::Invalid(format!("facilitator {index} has no active key"))
        })?;
        let key = HpkePublicKey::from_hex(&format!("{} HPKE key {}", f.name, c.id), &c.public_key)
            .map_err(|e| FormatError::Invalid(e.to_string()))?;
        Ok((c.id, key))
    }

    /// The aggregation's Prio3 instance, built from the document's VDAF.
    pub fn vdaf(&self) -> Result<Prio3Vdaf, VdafError> {
        Prio3Vdaf::new(&self.aggregation.vdaf, &self.aggregation.id)
    }

    /// A report time for `now`, rounded down to the time precision.
    pub fn report_time(&self, now: i64) -> i64 {
        let p = self.aggregation.time_precision_secs.max(1);
        now - now.rem_euclid(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(seed: u8) -> UploadReport {
        UploadReport {
            report_id: [seed; 16],
            time: 1_800_000_000,
            public_share: vec![seed, 1, 2],
            shares: [
                SealedShare {
                    hpke_key_id: 1,
                    encapped_key: [seed; 32],
                    ciphertext: vec![9; 20],
                },
                SealedShare {
                    hpke_key_id: 2,
                    encapped_key: [seed ^ 0xff; 32],
                    ciphertext: vec![],
                },
            ],
        }
    }

    #[test]
    fn a_report_round_trips_and_its_length_is_known() {
        let r = report(3);
        let bytes = r.encode().unwrap();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(UploadReport::decode(&bytes).unwrap(), r);
        let copy = r.encrypted_report(1);
        assert_eq!(copy.hpke_key_id, 2);
        assert_eq!(copy.encapped_key, [3 ^ 0xff; 32]);
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        let bytes = report(5).encode().unwrap();
        for cut in 0..bytes.len() {
            let err = UploadReport::decode(&bytes[..cut]).unwrap_err();
            assert!(matches!(err, FormatError::Truncated { .. }), "{cut}: {err}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            UploadReport::decode(&long).unwrap_err().to_string(),
            "1 trailing bytes after the end of the upload report"
        );
    }

    #[test]
    fn an_unknown_version_is_refused_naming_it() {
        let mut bytes = report(1).encode().unwrap();
        bytes[0] = 7;
        let err = UploadReport::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("version 7"), "{err}");
        let mut list = encode_report_list(&[report(1)]).unwrap();
        list[0] = 9;
        let err = decode_report_list(&list).unwrap_err().to_string();
        assert!(err.contains("upload report list version 9"), "{err}");
    }

    #[test]
    fn a_bad_report_in_a_list_is_named_by_its_index() {
        let reports = [report(1), report(2), report(3)];
        let list = encode_report_list(&reports).unwrap();
        assert_eq!(decode_report_list(&list).unwrap(), reports);
        // Report 2's version byte: after the list header (5) and two length-prefixed reports.
        let mut bad = list.clone();
        let at = 5 + 2 * (4 + reports[0].encoded_len()) + 4;
        bad[at] = 2;
        let err = decode_report_list(&bad).unwrap_err();
        assert!(matches!(err, UploadError::Report { index: 2, .. }), "{err}");
        assert!(err.to_string().starts_with("report 2: "), "{err}");
        let mut trailing = list.clone();
        trailing.push(1);
        assert!(matches!(
            decode_report_list(&trailing),
            Err(UploadError::List(FormatError::TrailingBytes { .. }))
        ));
        let empty = encode_report_list(&[]).unwrap();
        assert!(decode_report_list(&empty)
            .unwrap_err()
            .to_string()
            .contains("no report"));
        // A count larger than the body could hold is refused before anything is allocated.
        let mut huge = list;
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_report_list(&huge),
            Err(UploadError::List(FormatError::Truncated { .. }))
        ));
    }

    #[test]
    fn the_media_type_picks_the_decoder() {
        let one = report(1).encode().unwrap();
        assert_eq!(
            decode_upload("application/vnd.millrace.report; x=y", &one).unwrap(),
            [report(1)]
        );
        let err = decode_upload("application/octet-stream", &one).unwrap_err();
        assert!(matches!(err, UploadError::MediaType { .. }), "{err}");
        assert!(decode_upload(REPORT_LIST_MEDIA_TYPE, &one).is_err());
    }
}
