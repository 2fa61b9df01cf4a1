//! The signed objects Millrace writes to object storage.
//!
//! Every object is one signed envelope:
//!
//! ```text
//! "MLRC" | kind u8 | version u8 | key id (u8 length + UTF-8) | payload (u32 length + bytes) | Ed25519 signature (64)
//! ```
//!
//! Each kind's decoder names the versions it reads ([`INGESTION_VERSIONS`] and the like) and
//! refuses any other with [`FormatError::UnsupportedVersion`], naming the version found. A
//! decoder that reads an older version as well as the current one is what lets a rolling upgrade
//! update readers before writers (see the README's "Upgrading").
//!
//! The signature covers everything before it, so the kind, version and signer are bound to the
//! content. Decoding is strict: the envelope is checked, the signature verified against a
//! [`KeyRing`], and the payload parsed to its last byte; trailing bytes are refused. Encoding is
//! deterministic (Ed25519 is), so a rerun produces byte-identical objects and create-only writes
//! can compare instead of overwrite.

use sha2::{Digest, Sha256};

use crate::codec::{Reader, Writer};
use crate::crypto::{KeyRing, Signer25519, ENCAPPED_KEY_LEN, SIGNATURE_LEN};
use crate::error::FormatError;
use crate::layout::{validate_id, Partition, Window};
use crate::vdaf::ReportId;

const MAGIC: &[u8; 4] = b"MLRC";

/// The kinds of signed object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    IngestionBatch = 1,
    ValidationBatch = 2,
    VerifyStates = 3,
    SumPart = 4,
    WindowManifest = 5,
    ShareRefusal = 6,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::IngestionBatch => "ingestion batch",
            Kind::ValidationBatch => "validation batch",
            Kind::VerifyStates => "verify-state batch",
            Kind::SumPart => "sum part",
            Kind::WindowManifest => "window manifest",
            Kind::ShareRefusal => "share refusal",
        }
    }
}

/// Format versions this build writes.
pub const INGESTION_VERSION: u8 = 2;
pub const VALIDATION_VERSION: u8 = 2;
pub const VERIFY_STATES_VERSION: u8 = 1;
pub const SUM_PART_VERSION: u8 = 3;
pub const MANIFEST_VERSION: u8 = 2;
pub const SHARE_REFUSAL_VERSION: u8 = 1;

/// Format versions this build reads. Ingestion batch 1 had no report times (refused: a report
/// without a time bound to its shares cannot be placed in one window); validation batch 1 and
/// window manifest 1 carried no aggregation digest (refused: nothing would show that both
/// organisations run the same aggregation); sum part 2 had neither invalid counts by reason nor
/// the aggregation digest (read as "none given": the mill compares only what both parts carry).
pub const INGESTION_VERSIONS: &[u8] = &[2];
pub const VALIDATION_VERSIONS: &[u8] = &[2];
pub const VERIFY_STATES_VERSIONS: &[u8] = &[1];
pub const SUM_PART_VERSIONS: &[u8] = &[2, 3];
pub const MANIFEST_VERSIONS: &[u8] = &[2];
pub const SHARE_REFUSAL_VERSIONS: &[u8] = &[1];

/// `version 2` or `versions 2 and 3`, for errors.
pub(crate) fn versions_text(supported: &[u8]) -> String {
    let list: Vec<String> = supported.iter().map(u8::to_string).collect();
    match list.as_slice() {
        [one] => format!("version {one}"),
        [init @ .., last] => format!("versions {} and {last}", init.join(", ")),
        [] => "no version".to_string(),
    }
}

fn seal(
    kind: Kind,
    version: u8,
    signer: &Signer25519,
    payload: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let mut w = Writer::with_capacity(payload.len() + 96);
    w.raw(MAGIC);
    w.u8(kind as u8);
    w.u8(version);
    w.short_str(signer.key_id())?;
    w.bytes(payload)?;
    let signature = signer.sign(&w.buf);
    w.raw(&signature);
    Ok(w.buf)
}

/// An envelope that passed [`open`].
struct Opened<'a> {
    /// The party that owns the signing key (see [`KeyRing`]); what decoders return as the
    /// signer.
    key_id: String,
    version: u8,
    payload: &'a [u8],
}

/// Checks the envelope and signature; returns the signer's key id, the version and the payload.
fn open<'a>(
    kind: Kind,
    supported: &[u8],
    keys: &KeyRing,
    bytes: &'a [u8],
) -> Result<Opened<'a>, FormatError> {
    let mut r = Reader::new(bytes);
    if r.take(4, "magic").map_err(|_| FormatError::BadMagic)? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let found = r.u8("kind")?;
    if found != kind as u8 {
        return Err(FormatError::WrongKind {
            expected: kind.name(),
            found,
        });
    }
    let version = r.u8("version")?;
    if !supported.contains(&version) {
        return Err(FormatError::UnsupportedVersion {
            what: kind.name(),
            found: version,
            supported: versions_text(supported),
        });
    }
    let key_id = r.short_str("key id")?;
    let payload = r.bytes("payload")?;
    let signed_len = r.position();
    let signature: [u8; SIGNATURE_LEN] = r.array("signature")?;
    r.finish(kind.name())?;
    let owner = keys.verify(&key_id, &bytes[..signed_len], &signature)?;
    Ok(Opened {
        key_id: owner,
        version,
        payload,
    })
}

/// One client report as a facilitator receives it: the public share in the clear and this
/// facilitator's input share encrypted to its HPKE key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedReport {
    pub report_id: ReportId,
    /// When the report was made (unix seconds), rounded down to the aggregation's time
    /// precision. Bound into both input shares' HPKE associated data, so it cannot be changed
    /// without the shares failing to decrypt: it decides the one window the report counts in.
    pub time: i64,
    /// The id of the facilitator's HPKE key this share is sealed to (see
    /// [`crate::parties`]): the facilitator decrypts with that key.
    pub hpke_key_id: u8,
    pub public_share: Vec<u8>,
    pub encapped_key: [u8; ENCAPPED_KEY_LEN],
    pub ciphertext: Vec<u8>,
}

/// A batch of reports from one ingestor for one facilitator, written as one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestionBatch {
    pub aggregation: String,
    /// The [`crate::agreement::AggregationDigest`] of the aggregation as the ingestor runs it.
    pub aggregation_digest: [u8; 32],
    pub batch_id: String,
    /// The facilitator (0 or 1) whose key the input shares are encrypted to.
    pub facilitator: u8,
    /// When the batch was collected (unix seconds), signed: it must lie in the partition
    /// the batch is stored under, and decides the batch's window.
    pub time: i64,
    pub reports: Vec<EncryptedReport>,
}

/// HPKE `info` for input shares: binds the ciphertext to the aggregation and the recipient.
pub fn input_share_info(aggregation: &str, facilitator: u8) -> Vec<u8> {
    format!("millrace input share/{aggregation}/{facilitator}").into_bytes()
}

/// HPKE additional data for one input share: binds it to its report id, its time and its public
/// share, as DAP binds report metadata. Changing any of them makes the share undecryptable.
pub fn input_share_aad(report_id: &ReportId, time: i64, public_share: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 8 + public_share.len());
    aad.extend_from_slice(report_id);
    aad.extend_from_slice(&time.to_be_bytes());
    aad.extend_from_slice(public_share);
    aad
}

impl IngestionBatch {
    pub fn encode(&self, signer: &Signer25519) -> Result<Vec<u8>, FormatError> {
        let per_report: usize = self
            .reports
            .iter()
            .map(|r| {
                16 + 8 + 1 + 4 + r.public_share.len() + ENCAPPED_KEY_LEN + 4 + r.ciphertext.len()
            })
            .sum();
        let mut w = Writer::with_capacity(per_report + 128);
        w.short_str(&self.aggregation)?;
        w.raw(&self.aggregation_digest);
        w.short_str(&self.batch_id)?;
        w.u8(self.facilitator);
        w.i64(self.time);
        w.u32(len_u32(self.reports.len())?);
        for r in &self.reports {
            w.raw(&r.report_id);
            w.i64(r.time);
            w.u8(r.hpke_key_id);
            w.bytes(&r.public_share)?;
            w.raw(&r.encapped_key);
            w.bytes(&r.ciphertext)?;
        }
        seal(Kind::IngestionBatch, INGESTION_VERSION, signer, &w.buf)
    }

    /// Decodes and verifies; returns the batch and the ingestor key id that signed it.
    pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<(Self, String), FormatError> {
        let opened = open(Kind::IngestionBatch, INGESTION_VERSIONS, keys, bytes)?;
        let key_id = opened.key_id;
        let mut r = Reader::new(opened.payload);
        let aggregation = r.short_str("aggregation id")?;
        let aggregation_digest = r.array("aggregation digest")?;
        let batch_id = r.short_str("batch id")?;
        let facilitator = r.u8("facilitator")?;
        let time = r.i64("time")?;
        let n = r.count("reports", 16 + 8 + 1 + 4 + ENCAPPED_KEY_LEN + 4)?;
        let mut reports = Vec::with_capacity(n);
        for _ in 0..n {
            reports.push(EncryptedReport {
                report_id: r.array("report id")?,
                time: r.i64("report time")?,
                hpke_key_id: r.u8("HPKE key id")?,
                public_share: r.bytes("public share")?.to_vec(),
                encapped_key: r.array("encapsulated key")?,
                ciphertext: r.bytes("ciphertext")?.to_vec(),
            });
        }
        r.finish("ingestion batch payload")?;
        Ok((
            IngestionBatch {
                aggregation,
                aggregation_digest,
                batch_id,
                facilitator,
                time,
                reports,
            },
            key_id,
        ))
    }
}

/// Why a report was marked invalid by a facilitator's intake-worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InvalidReason {
    /// HPKE decryption failed.
    Undecryptable = 1,
    /// The shares did not decode or `verify_init` refused them.
    Unverifiable = 2,
    /// The report id already appeared earlier in the batch.
    Duplicate = 3,
    /// The report's time is not in the window of the batch carrying it: a report counts only
    /// in the window its (HPKE-bound) time falls in.
    OutsideWindow = 4,
    /// The report's time is later than its batch's signed time by more than the aggregation's
    /// clock skew, or not a multiple of its time precision.
    BadTime = 5,
    /// The report id already appeared in an earlier batch of the same window (decided when the
    /// window is aggregated; both facilitators walk the batches in the manifest's order).
    Replayed = 6,
    /// Both sides' verifier shares were combined and the proof did not verify (decided when the
    /// window is aggregated).
    VerifyFailed = 7,
    /// The share names an HPKE key id the facilitator does not have.
    UnknownKey = 8,
    /// The share is sealed to an HPKE key that had expired at the batch's time.
    ExpiredKey = 9,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 9] = [
        InvalidReason::Undecryptable,
        InvalidReason::Unverifiable,
        InvalidReason::Duplicate,
        InvalidReason::OutsideWindow,
        InvalidReason::BadTime,
        InvalidReason::Replayed,
        InvalidReason::VerifyFailed,
        InvalidReason::UnknownKey,
        InvalidReason::ExpiredKey,
    ];

    pub fn from_u8(v: u8) -> Result<Self, FormatError> {
        InvalidReason::ALL
            .into_iter()
            .find(|r| *r as u8 == v)
            .ok_or_else(|| FormatError::Invalid(format!("unknown invalid reason {v}")))
    }

    /// The label in metrics, results and `millrace status`.
    pub fn label(self) -> &'static str {
        match self {
            InvalidReason::Undecryptable => "undecryptable",
            InvalidReason::Unverifiable => "unverifiable",
            InvalidReason::Duplicate => "duplicate",
            InvalidReason::OutsideWindow => "outside-window",
            InvalidReason::BadTime => "bad-time",
            InvalidReason::Replayed => "replayed",
            InvalidReason::VerifyFailed => "verify-failed",
            InvalidReason::UnknownKey => "unknown-key",
            InvalidReason::ExpiredKey => "expired-key",
        }
    }
}

/// How many reports were invalid, by reason (sorted by reason code, no zero counts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InvalidCounts(pub std::collections::BTreeMap<u8, u64>);

impl InvalidCounts {
    pub fn add(&mut self, reason: InvalidReason) {
        *self.0.entry(reason as u8).or_insert(0) += 1;
    }
    pub fn add_n(&mut self, reason: InvalidReason, n: u64) {
        if n > 0 {
            *self.0.entry(reason as u8).or_insert(0) += n;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    /// `{"replayed": 2, "undecryptable": 1}`-style map by label.
    pub fn by_label(&self) -> std::collections::BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(code, n)| {
                let label = InvalidReason::from_u8(*code)
                    .map(InvalidReason::label)
                    .unwrap_or("unknown");
                (label.to_string(), *n)
            })
            .collect()
    }
    fn encode(&self, w: &mut Writer) -> Result<(), FormatError> {
        w.u32(len_u32(self.0.len())?);
        for (code, n) in &self.0 {
            w.u8(*code);
            w.u64(*n);
        }
        Ok(())
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let n = r.count("invalid reasons", 9)?;
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let reason = InvalidReason::from_u8(r.u8("invalid reason")?)?;
            let count = r.u64("invalid count")?;
            if counts.insert(reason as u8, count).is_some() || count == 0 {
                return Err(FormatError::Invalid(format!(
                    "invalid counts: reason {} repeated or zero",
                    reason.label()
                )));
            }
        }
        Ok(InvalidCounts(counts))
    }
}

/// A facilitator's verdict on one report: its verifier share, or an explicit invalid entry so
/// that both facilitators agree on which reports are excluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid(Vec<u8>),
    Invalid(InvalidReason),
}

/// Per-report verdicts of one facilitator for one ingestion batch, in the batch's order. Written
/// to the facilitator's own store and to its peer's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationBatch {
    pub aggregation: String,
    /// The aggregation digest as the writing facilitator runs it.
    pub aggregation_digest: [u8; 32],
    pub batch_id: String,
    pub facilitator: u8,
    pub entries: Vec<(ReportId, Verdict)>,
}

impl ValidationBatch {
    pub fn encode(&self, signer: &Signer25519) -> Result<Vec<u8>, FormatError> {
        let mut w = Writer::with_capacity(self.entries.len() * 64 + 96);
        w.short_str(&self.aggregation)?;
        w.raw(&self.aggregation_digest);
        w.short_str(&self.batch_id)?;
        w.u8(self.facilitator);
        w.u32(len_u32(self.entries.len())?);
        for (id, verdict) in &self.entries {
            w.raw(id);
            match verdict {
                Verdict::Valid(share) => {
                    w.u8(0);
                    w.bytes(share)?;
                }
                Verdict::Invalid(reason) => {
                    w.u8(*reason as u8);
                }
            }
        }
        seal(Kind::ValidationBatch, VALIDATION_VERSION, signer, &w.buf)
    }

    pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<(Self, String), FormatError> {
        let opened = open(Kind::ValidationBatch, VALIDATION_VERSIONS, keys, bytes)?;
        let key_id = opened.key_id;
        let mut r = Reader::new(opened.payload);
        let aggregation = r.short_str("aggregation id")?;
        let aggregation_digest = r.array("aggregation digest")?;
        let batch_id = r.short_str("batch id")?;
        let facilitator = r.u8("facilitator")?;
        let n = r.count("entries", 17)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.array("report id")?;
            let verdict = match r.u8("verdict")? {
                0 => Verdict::Valid(r.bytes("verifier share")?.to_vec()),
                reason => Verdict::Invalid(InvalidReason::from_u8(reason)?),
            };
            entries.push((id, verdict));
        }
        r.finish("validation batch payload")?;
        Ok((
            ValidationBatch {
                aggregation,
                aggregation_digest,
                batch_id,
                facilitator,
                entries,
            },
            key_id,
        ))
    }
}

/// A facilitator's private `verify_init` states for one batch (never sent to the peer), so the
/// aggregate step does not decrypt and verify every report a second time. `None` for reports
/// marked invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyStates {
    pub aggregation: String,
    pub batch_id: String,
    pub facilitator: u8,
    pub states: Vec<Option<Vec<u8>>>,
}

impl VerifyStates {
    pub fn encode(&self, signer: &Signer25519) -> Result<Vec<u8>, FormatError> {
        let mut w = Writer::with_capacity(self.states.len() * 64 + 64);
        w.short_str(&self.aggregation)?;
        w.short_str(&self.batch_id)?;
        w.u8(self.facilitator);
        w.u32(len_u32(self.states.len())?);
        for state in &self.states {
            match state {
                Some(s) => {
                    w.u8(1);
                    w.bytes(s)?;
                }
                None => w.u8(0),
            }
        }
        seal(Kind::VerifyStates, VERIFY_STATES_VERSION, signer, &w.buf)
    }

    pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<Self, FormatError> {
        let opened = open(Kind::VerifyStates, VERIFY_STATES_VERSIONS, keys, bytes)?;
        let mut r = Reader::new(opened.payload);
        let aggregation = r.short_str("aggregation id")?;
        let batch_id = r.short_str("batch id")?;
        let facilitator = r.u8("facilitator")?;
        let n = r.count("states", 1)?;
        let mut states = Vec::with_capacity(n);
        for _ in 0..n {
            states.push(match r.u8("state tag")? {
                0 => None,
                1 => Some(r.bytes("verify state")?.to_vec()),
                other => return Err(FormatError::Invalid(format!("unknown state tag {other}"))),
            });
        }
        r.finish("verify-state payload")?;
        Ok(VerifyStates {
            aggregation,
            batch_id,
            facilitator,
            states,
        })
    }
}

/// One facilitator's share of one window's aggregate, for the mill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SumPart {
    pub aggregation: String,
    pub window_start: i64,
    pub window_end: i64,
    /// The generation of the window manifest this part aggregates.
    pub generation: u32,
    /// [`WindowManifest::digest`] of that manifest: both parts must carry the same one.
    pub manifest_digest: [u8; 32],
    /// The aggregation digest as the writing facilitator runs it (version 3; `None` from 2).
    pub aggregation_digest: Option<[u8; 32]>,
    pub facilitator: u8,
    /// Reports included in the aggregate share.
    pub report_count: u64,
    /// Reports excluded (invalid on either side, or duplicates).
    pub invalid_count: u64,
    /// `invalid_count` by reason (version 3; empty when read from version 2).
    pub invalid_reasons: InvalidCounts,
    /// SHA-256 over the sorted ids of the included reports: both parts must carry the same one.
    pub report_digest: [u8; 32],
    /// The ingestion batches this part covers, sorted.
    pub batches: Vec<String>,
    pub aggregate_share: Vec<u8>,
}

impl SumPart {
    pub fn encode(&self, signer: &Signer25519) -> Result<Vec<u8>, FormatError> {
        let mut w =
            Writer::with_capacity(self.aggregate_share.len() + 64 * self.batches.len() + 128);
        w.short_str(&self.aggregation)?;
        w.i64(self.window_start);
        w.i64(self.window_end);
        w.u32(self.generation);
        w.raw(&self.manifest_digest);
        w.raw(&self.aggregation_digest.unwrap_or_default());
        w.u8(self.facilitator);
        w.u64(self.report_count);
        w.u64(self.invalid_count);
        self.invalid_reasons.encode(&mut w)?;
        w.raw(&self.report_digest);
        w.u32(len_u32(self.batches.len())?);
        for b in &self.batches {
            w.short_str(b)?;
        }
        w.bytes(&self.aggregate_share)?;
        seal(Kind::SumPart, SUM_PART_VERSION, signer, &w.buf)
    }

    pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<(Self, String), FormatError> {
        let opened = open(Kind::SumPart, SUM_PART_VERSIONS, keys, bytes)?;
        let key_id = opened.key_id;
        let mut r = Reader::new(opened.payload);
        let aggregation = r.short_str("aggregation id")?;
        let window_start = r.i64("window start")?;
        let window_end = r.i64("window end")?;
        let generation = r.u32("generation")?;
        let manifest_digest = r.array("manifest digest")?;
        let aggregation_digest = if opened.version >= 3 {
            Some(r.array("aggregation digest")?)
        } else {
            None
        };
        let facilitator = r.u8("facilitator")?;
        let report_count = r.u64("report count")?;
        let invalid_count = r.u64("invalid count")?;
        let invalid_reasons = if opened.version >= 3 {
            InvalidCounts::decode(&mut r)?
        } else {
            InvalidCounts::default()
        };
        let report_digest = r.array("report digest")?;
        let n = r.count("batches", 1)?;
        let mut batches = Vec::with_capacity(n);
        for _ in 0..n {
            batches.push(r.short_str("batch id")?);
        }
        let aggregate_share = r.bytes("aggregate share")?.to_vec();
        r.finish("sum part payload")?;
        Ok((
            SumPart {
                aggregation,
                window_start,
                window_end,
                generation,
                manifest_digest,
                aggregation_digest,
                facilitator,
                report_count,
                invalid_count,
                invalid_reasons,
                report_digest,
                batches,
                aggregate_share,
            },
            key_id,
        ))
    }
}

/// A facilitator's refusal to release its aggregate share of a window: written instead of a
/// [`SumPart`] (to the same place in the collector's store, `…/{generation}.refused.{i}`) when
/// the window has fewer valid reports than the aggregation's minimum. It carries no share, so the
/// collector never holds any part of an under-threshold aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareRefusal {
    pub aggregation: String,
    pub window_start: i64,
    pub window_end: i64,
    pub generation: u32,
    pub manifest_digest: [u8; 32],
    pub aggregation_digest: [u8; 32],
    pub facilitator: u8,
    /// Valid reports the window had.
    pub report_count: u64,
    pub invalid_count: u64,
    pub invalid_reasons: InvalidCounts,
    /// The minimum this facilitator's config requires.
    pub min_reports: u64,
    /// Why, for people: names the aggregation, window, counts and the minimum.
    pub reason: String,
}

impl ShareRefusal {
    pub fn encode(&self, signer: &Signer25519) -> Result<Vec<u8>, FormatError> {
        let mut w = Writer::with_capacity(256 + self.reason.len());
        w.short_str(&self.aggregation)?;
        w.i64(self.window_start);
        w.i64(self.window_end);
        w.u32(self.generation);
        w.raw(&self.manifest_digest);
        w.raw(&self.aggregation_digest);
        w.u8(self.facilitator);
        w.u64(self.report_count);
        w.u64(self.invalid_count);
        self.invalid_reasons.encode(&mut w)?;
        w.u64(self.min_reports);
        w.bytes(self.reason.as_bytes())?;
        seal(Kind::ShareRefusal, SHARE_REFUSAL_VERSION, signer, &w.buf)
    }

    pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<(Self, String), FormatError> {
        let opened = open(Kind::ShareRefusal, SHARE_REFUSAL_VERSIONS, keys, bytes)?;
        let mut r = Reader::new(opened.payload);
        let refusal = ShareRefusal {
            aggregation: r.short_str("aggregation id")?,
            window_start: r.i64("window start")?,
            window_end: r.i64("window end")?,
            generation: r.u32("generation")?,
            manifest_digest: r.array("manifest digest")?,
            aggregation_digest: r.array("aggregation digest")?,
            facilitator: r.u8("facilitator")?,
            report_count: r.u64("report count")?,
            invalid_count: r.u64("invalid count")?,
            invalid_reasons: InvalidCounts::decode(&mut r)?,
            min_reports: r.u64("minimum reports")?,
            reason: String::from_utf8(r.bytes("reason")?.to_vec()).map_err(|_| {
                FormatError::Invalid("share refusal: reason is not UTF-8".to_string())
            })?,
        };
        r.finish("share refusal payload")?;
        Ok((refusal, opened.key_id))
    }
}

/// One batch of a window, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowBatch {
    pub batch: String,
    pub partition: Partition,
}

/// Why a batch is not part of a window's manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExclusionReason {
    /// Only one facilitator had validated it by the peer deadline: the other's store lacks the
    /// batch (or could not validate it in time).
    PeerMissing = 1,
    /// Not validated by both facilitators by the window's max age.
    MaxAge = 2,
    /// It reached the store after the window's manifest was written.
    Late = 3,
    /// It sits in a partition older than the workflow-manager's scan horizon, whose window was
    /// never decided.
    BeyondHorizon = 4,
}

impl ExclusionReason {
    fn from_u8(v: u8) -> Result<Self, FormatError> {
        match v {
            1 => Ok(ExclusionReason::PeerMissing),
            2 => Ok(ExclusionReason::MaxAge),
            3 => Ok(ExclusionReason::Late),
            4 => Ok(ExclusionReason::BeyondHorizon),
            other => Err(FormatError::Invalid(format!(
                "unknown exclusion reason {other}"
            ))),
        }
    }

    /// The label used in metrics, records and `millrace status`.
    pub fn label(self) -> &'static str {
        match self {
            ExclusionReason::PeerMissing => "peer-missing",
            ExclusionReason::MaxAge => "max-age",
            ExclusionReason::Late => "late",
            ExclusionReason::BeyondHorizon => "beyond-horizon",
        }
    }

    pub fn parse(label: &str) -> Option<Self> {
        [
            ExclusionReason::PeerMissing,
            ExclusionReason::MaxAge,
            ExclusionReason::Late,
            ExclusionReason::BeyondHorizon,
        ]
        .into_iter()
        .find(|r| r.label() == label)
    }
}

/// A batch the leader saw but left out of a window's manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExcludedBatch {
    pub batch: WindowBatch,
    pub reason: ExclusionReason,
    /// Which facilitators had validated it when the manifest was written.
    pub validated_by: [bool; 2],
}

/// The leader's decision of which batches make up one generation of a window: written once,
/// create-only, to both facilitators' stores; both aggregate-workers aggregate exactly its
/// batches. Signed by facilitator 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowManifest {
    pub aggregation: String,
    /// The aggregation digest as the leader runs it: the helper refuses a manifest whose digest
    /// is not its own.
    pub aggregation_digest: [u8; 32],
    pub window_start: i64,
    pub window_end: i64,
    /// 0 for the leader's own decision; each `reaggregate` writes the next.
    pub generation: u32,
    /// When the leader decided (unix seconds).
    pub decided_at: i64,
    /// The window's batches, sorted, each once.
    pub batches: Vec<WindowBatch>,
    /// Batches seen but left out, sorted by batch.
    pub excluded: Vec<ExcludedBatch>,
    /// Why this generation exists: empty for generation 0, else who re-aggregated, when and why.
    pub note: String,
}

impl WindowManifest {
    /// SHA-256 over what identifies the window's contents: aggregation, window, generation and
    /// the sorted batches. Sum parts carry it; the mill refuses two parts whose digests differ.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"millrace window manifest/1");
        h.update((self.aggregation.len() as u64).to_be_bytes());
        h.update(self.aggregation.as_bytes());
        h.update(self.window_start.to_be_bytes());
        h.update(self.window_end.to_be_bytes());
        h.update(self.generation.to_be_bytes());
        h.update((self.batches.len() as u64).to_be_bytes());
        for b in &self.batches {
            h.update((b.batch.len() as u64).to_be_bytes());
            h.update(b.batch.as_bytes());
            h.update(b.partition.start.to_be_bytes());
        }
        h.finalize().into()
    }

    /// Is `batch` listed, or listed as excluded?
    pub fn mentions(&self, batch: &str) -> bool {
        self.batches.iter().any(|b| b.batch == batch)
            || self.excluded.iter().any(|e| e.batch.batch == batch)
    }

    pub fn encode(&self, signer: &Signer25519) -> Result<Vec<u8>, FormatError> {
        let mut w = Writer::with_capacity(96 * (self.batches.len() + self.excluded.len()) + 256);
        w.short_str(&self.aggregation)?;
        w.raw(&self.aggregation_digest);
        w.i64(self.window_start);
        w.i64(self.window_end);
        w.u32(self.generation);
        w.i64(self.decided_at);
        w.u32(len_u32(self.batches.len())?);
        for b in &self.batches {
            w.short_str(&b.batch)?;
            w.i64(b.partition.start);
        }
        w.raw(&self.digest());
        w.u32(len_u32(self.excluded.len())?);
        for e in &self.excluded {
            w.short_str(&e.batch.batch)?;
            w.i64(e.batch.partition.start);
            w.u8(e.reason as u8);
            w.u8(u8::from(e.validated_by[0]) | (u8::from(e.validated_by[1]) << 1));
        }
        w.bytes(self.note.as_bytes())?;
        seal(Kind::WindowManifest, MANIFEST_VERSION, signer, &w.buf)
    }

    /// Decodes and verifies generation `generation` of `window`'s manifest as its readers must:
    /// signed by the leader (`leader`, facilitator 0's key id) and about exactly that
    /// aggregation, window and generation. Anything else is refused, saying what was wrong.
    pub fn decode_leaders(
        keys: &KeyRing,
        leader: &str,
        aggregation: &str,
        window: Window,
        generation: u32,
        bytes: &[u8],
    ) -> Result<Self, FormatError> {
        let (m, signer) = Self::decode(keys, bytes)?;
        if signer != leader {
            return Err(FormatError::Invalid(format!(
                "window manifest signed by {signer:?}, not by the leader {leader:?}"
            )));
        }
        let found = Window {
            start: m.window_start,
            end: m.window_end,
        };
        if m.aggregation != aggregation || found != window || m.generation != generation {
            return Err(FormatError::Invalid(format!(
                "window manifest is for {}/{} generation {}, not {aggregation}/{} generation {generation}",
                m.aggregation,
                found.name(),
                m.generation,
                window.name()
            )));
        }
        Ok(m)
    }

    /// Decodes and verifies; returns the manifest and the key id that signed it. Checks that the
    /// batches are sorted and unique, that the stored count and digest match them, and that every
    /// id and partition is well formed.
    pub fn decode(keys: &KeyRing, bytes: &[u8]) -> Result<(Self, String), FormatError> {
        let opened = open(Kind::WindowManifest, MANIFEST_VERSIONS, keys, bytes)?;
        let key_id = opened.key_id;
        let mut r = Reader::new(opened.payload);
        let aggregation = r.short_str("aggregation id")?;
        validate_id("aggregation id", &aggregation)?;
        let aggregation_digest = r.array("aggregation digest")?;
        let window_start = r.i64("window start")?;
        let window_end = r.i64("window end")?;
        if window_end <= window_start {
            return Err(FormatError::Invalid(format!(
                "window manifest: window end {window_end} is not after its start {window_start}"
            )));
        }
        let partition_secs = crate::layout::partition_secs(window_end - window_start);
        let generation = r.u32("generation")?;
        let decided_at = r.i64("decided at")?;
        let n = r.count("batches", 9)?;
        let mut batches = Vec::with_capacity(n);
        for _ in 0..n {
            batches.push(read_batch(&mut r, "batch id", partition_secs)?);
        }
        if batches.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(FormatError::Invalid(
                "window manifest: batches are not sorted and unique".to_string(),
            ));
        }
        let digest: [u8; 32] = r.array("manifest digest")?;
        let n = r.count("excluded batches", 11)?;
        let mut excluded = Vec::with_capacity(n);
        for _ in 0..n {
            let batch = read_batch(&mut r, "excluded batch id", partition_secs)?;
            let reason = ExclusionReason::from_u8(r.u8("exclusion reason")?)?;
            let flags = r.u8("validated by")?;
            if flags > 3 {
                return Err(FormatError::Invalid(format!(
                    "window manifest: validated-by flags {flags} name a third facilitator"
                )));
            }
            excluded.push(ExcludedBatch {
                batch,
                reason,
                validated_by: [flags & 1 == 1, flags & 2 == 2],
            });
        }
        let note = String::from_utf8(r.bytes("note")?.to_vec())
            .map_err(|_| FormatError::Invalid("window manifest: note is not UTF-8".to_string()))?;
        r.finish("window manifest payload")?;
        let manifest = WindowManifest {
            aggregation,
            aggregation_digest,
            window_start,
            window_end,
            generation,
            decided_at,
            batches,
            excluded,
            note,
        };
        if manifest.digest() != digest {
            return Err(FormatError::Invalid(
                "window manifest: its digest does not match its batches".to_string(),
            ));
        }
        Ok((manifest, key_id))
    }
}

/// A batch and the start of its partition, whose length is the window's
/// ([`crate::layout::partition_secs`]).
fn read_batch(
    r: &mut Reader<'_>,
    what: &str,
    partition_secs: i64,
) -> Result<WindowBatch, FormatError> {
    let batch = r.short_str(what)?;
    validate_id(what, &batch)?;
    let start = r.i64("partition")?;
    if start.rem_euclid(partition_secs) != 0 {
        return Err(FormatError::Invalid(format!(
            "window manifest: partition {start} of batch {batch} is not the start of a \
             {partition_secs}-second partition"
        )));
    }
    Ok(WindowBatch {
        batch,
        partition: Partition::with_length(start, partition_secs),
    })
}

/// SHA-256 over the sorted report ids: what both sum parts of a window must agree on.
pub fn report_digest(ids: &mut [ReportId]) -> [u8; 32] {
    ids.sort_unstable();
    let mut h = Sha256::new();
    for id in ids.iter() {
        h.update(id);
    }
    h.finalize().into()
}

fn len_u32(n: usize) -> Result<u32, FormatError> {
    u32::try_from(n).map_err(|_| FormatError::Invalid(format!("{n} items is too many")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer25519 {
        Signer25519::generate("ingestor-1")
    }

    fn batch() -> IngestionBatch {
        IngestionBatch {
            aggregation: "clicks".into(),
            aggregation_digest: [4; 32],
            batch_id: "b1".into(),
            facilitator: 1,
            time: 1_700_000_000,
            reports: (0..3u8)
                .map(|i| EncryptedReport {
                    report_id: [i; 16],
                    time: 1_699_999_200 + i64::from(i) * 60,
                    hpke_key_id: i,
                    public_share: vec![i; 5],
                    encapped_key: [9; 32],
                    ciphertext: vec![i; 40],
                })
                .collect(),
        }
    }

    /// Every way of damaging `bytes` that a strict decoder must refuse.
    fn assert_rejects_damage<T: std::fmt::Debug>(
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, FormatError>,
    ) {
        for cut in [0, 1, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "truncated at {cut} accepted"
            );
        }
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(FormatError::TrailingBytes { .. })
        ));
        for pos in [0, 4, 5, 12, bytes.len() / 2, bytes.len() - 1] {
            let mut tampered = bytes.to_vec();
            tampered[pos] ^= 0x40;
            assert!(decode(&tampered).is_err(), "tampered byte {pos} accepted");
        }
    }

    #[test]
    fn ingestion_batch_round_trips_and_rejects_damage() {
        let s = signer();
        let keys = KeyRing::new().with(&s);
        let bytes = batch().encode(&s).unwrap();
        assert_eq!(
            bytes,
            batch().encode(&s).unwrap(),
            "encoding is deterministic"
        );
        let (decoded, key_id) = IngestionBatch::decode(&keys, &bytes).unwrap();
        assert_eq!(decoded, batch());
        assert_eq!(key_id, "ingestor-1");
        assert_rejects_damage(&bytes, |b| IngestionBatch::decode(&keys, b));
    }

    #[test]
    fn a_batch_signed_by_an_unknown_or_other_key_is_refused() {
        let s = signer();
        let other = Signer25519::generate("ingestor-1");
        let bytes = batch().encode(&other).unwrap();
        let keys = KeyRing::new().with(&s);
        assert!(matches!(
            IngestionBatch::decode(&keys, &bytes),
            Err(FormatError::BadSignature { .. })
        ));
        let stranger = Signer25519::generate("stranger");
        let bytes = batch().encode(&stranger).unwrap();
        assert!(matches!(
            IngestionBatch::decode(&keys, &bytes),
            Err(FormatError::UnknownKey { .. })
        ));
    }

    #[test]
    fn a_validation_batch_is_not_accepted_as_an_ingestion_batch() {
        let s = signer();
        let keys = KeyRing::new().with(&s);
        let v = ValidationBatch {
            aggregation: "a".into(),
            aggregation_digest: [4; 32],
            batch_id: "b".into(),
            facilitator: 0,
            entries: vec![],
        };
        let bytes = v.encode(&s).unwrap();
        assert!(matches!(
            IngestionBatch::decode(&keys, &bytes),
            Err(FormatError::WrongKind { .. })
        ));
    }

    #[test]
    fn validation_batch_round_trips_and_rejects_damage() {
        let s = signer();
        let keys = KeyRing::new().with(&s);
        let v = ValidationBatch {
            aggregation: "clicks".into(),
            aggregation_digest: [4; 32],
            batch_id: "b1".into(),
            facilitator: 0,
            entries: vec![
                ([1; 16], Verdict::Valid(vec![1, 2, 3])),
                ([2; 16], Verdict::Invalid(InvalidReason::Undecryptable)),
                ([3; 16], Verdict::Invalid(InvalidReason::Duplicate)),
            ],
        };
        let bytes = v.encode(&s).unwrap();
        assert_eq!(ValidationBatch::decode(&keys, &bytes).unwrap().0, v);
        assert_rejects_damage(&bytes, |b| ValidationBatch::decode(&keys, b));
    }

    #[test]
    fn verify_states_round_trip_and_reject_damage() {
        let s = signer();
        let keys = KeyRing::new().with(&s);
        let v = VerifyStates {
            aggregation: "clicks".into(),
            batch_id: "b1".into(),
            facilitator: 1,
            states: vec![Some(vec![7; 20]), None, Some(vec![])],
        };
        let bytes = v.encode(&s).unwrap();
        assert_eq!(VerifyStates::decode(&keys, &bytes).unwrap(), v);
        assert_rejects_damage(&bytes, |b| VerifyStates::decode(&keys, b));
    }

    #[test]
    fn sum_part_round_trips_and_rejects_damage() {
        let s = signer();
        let keys = KeyRing::new().with(&s);
        let p = SumPart {
            aggregation: "clicks".into(),
            window_start: 100,
            window_end: 200,
            generation: 3,
            manifest_digest: [7; 32],
            aggregation_digest: Some([4; 32]),
            facilitator: 1,
            report_count: 10,
            invalid_count: 3,
            invalid_reasons: {
                let mut c = InvalidCounts::default();
                c.add(InvalidReason::Replayed);
                c.add_n(InvalidReason::OutsideWindow, 2);
                c
            },
            report_digest: [5; 32],
            batches: vec!["a".into(), "b".into()],
            aggregate_share: vec![1; 24],
        };
        let bytes = p.encode(&s).unwrap();
        let decoded = SumPart::decode(&keys, &bytes).unwrap().0;
        assert_eq!(decoded, p);
        assert_eq!(
            decoded.invalid_reasons.by_label(),
            [
                ("outside-window".to_string(), 2),
                ("replayed".to_string(), 1)
            ]
            .into()
        );
        assert_rejects_damage(&bytes, |b| SumPart::decode(&keys, b));
    }

    #[test]
    fn an_older_readable_version_is_read_and_an_unknown_one_is_refused_by_number() {
        let s = signer();
        let keys = KeyRing::new().with(&s);
        // A version-2 sum part: the same fields without the invalid counts by reason.
        let mut w = Writer::with_capacity(256);
        w.short_str("clicks").unwrap();
        w.i64(100);
        w.i64(200);
        w.u32(0);
        w.raw(&[7; 32]);
        w.u8(0);
        w.u64(10);
        w.u64(2);
        w.raw(&[5; 32]);
        w.u32(1);
        w.short_str("a").unwrap();
        w.bytes(&[1; 8]).unwrap();
        let v2 = seal(Kind::SumPart, 2, &s, &w.buf).unwrap();
        let (part, _) = SumPart::decode(&keys, &v2).unwrap();
        assert_eq!((part.report_count, part.invalid_count), (10, 2));
        assert_eq!(part.invalid_reasons, InvalidCounts::default());
        assert_eq!(part.aggregation_digest, None);
        // The same payload as version 9, and a version-1 ingestion batch: refused, by number.
        let v9 = seal(Kind::SumPart, 9, &s, &w.buf).unwrap();
        let err = SumPart::decode(&keys, &v9).unwrap_err().to_string();
        assert!(
            err.contains("sum part version 9") && err.contains("versions 2 and 3"),
            "{err}"
        );
        let v1 = seal(Kind::IngestionBatch, 1, &s, b"whatever").unwrap();
        let err = IngestionBatch::decode(&keys, &v1).unwrap_err().to_string();
        assert!(
            err.contains("ingestion batch version 1") && err.contains("reads version 2"),
            "{err}"
        );
    }

    #[test]
    fn share_refusal_round_trips_and_rejects_damage() {
        let s = Signer25519::generate("beta");
        let keys = KeyRing::new().with(&s);
        let mut invalid_reasons = InvalidCounts::default();
        invalid_reasons.add(InvalidReason::Undecryptable);
        let r = ShareRefusal {
            aggregation: "clicks".into(),
            window_start: 3600,
            window_end: 7200,
            generation: 0,
            manifest_digest: [3; 32],
            aggregation_digest: [4; 32],
            facilitator: 1,
            report_count: 9,
            invalid_count: 1,
            invalid_reasons,
            min_reports: 10,
            reason: "only 9 valid reports, at least 10 required".into(),
        };
        let bytes = r.encode(&s).unwrap();
        assert_eq!(
            ShareRefusal::decode(&keys, &bytes).unwrap(),
            (r, "beta".into())
        );
        assert_rejects_damage(&bytes, |b| ShareRefusal::decode(&keys, b));
        assert!(matches!(
            SumPart::decode(&keys, &bytes),
            Err(FormatError::WrongKind { .. })
        ));
    }

    #[test]
    fn the_report_time_is_bound_into_the_input_share() {
        let (sk, pk) = crate::crypto::hpke_generate();
        let info = input_share_info("clicks", 0);
        let (enc, ct) = pk
            .seal(&info, &input_share_aad(&[1; 16], 3600, b"pub"), b"share")
            .unwrap();
        assert_eq!(
            sk.open(&info, &input_share_aad(&[1; 16], 3600, b"pub"), &enc, &ct)
                .unwrap(),
            b"share"
        );
        assert!(sk
            .open(&info, &input_share_aad(&[1; 16], 7200, b"pub"), &enc, &ct)
            .is_err());
    }

    fn manifest() -> WindowManifest {
        let batch = |b: &str, hour: i64| WindowBatch {
            batch: b.into(),
            partition: Partition::of(hour * 3600),
        };
        WindowManifest {
            aggregation: "clicks".into(),
            aggregation_digest: [4; 32],
            window_start: 7200,
            window_end: 14400,
            generation: 1,
            decided_at: 20000,
            batches: vec![batch("a", 2), batch("b", 3)],
            excluded: vec![ExcludedBatch {
                batch: batch("c", 2),
                reason: ExclusionReason::PeerMissing,
                validated_by: [true, false],
            }],
            note: "reaggregated by ops@host: part 1 lost".into(),
        }
    }

    #[test]
    fn window_manifest_round_trips_and_rejects_damage() {
        let s = Signer25519::generate("alpha");
        let keys = KeyRing::new().with(&s);
        let m = manifest();
        let bytes = m.encode(&s).unwrap();
        let (decoded, signer) = WindowManifest::decode(&keys, &bytes).unwrap();
        assert_eq!((decoded, signer.as_str()), (m.clone(), "alpha"));
        assert_rejects_damage(&bytes, |b| WindowManifest::decode(&keys, b));
        // Another generation, or one batch fewer, is another digest.
        let mut other = m.clone();
        other.generation = 2;
        assert_ne!(other.digest(), m.digest());
        other = m.clone();
        other.batches.pop();
        assert_ne!(other.digest(), m.digest());
        // Unsorted batches are refused even when properly signed.
        other = m.clone();
        other.batches.reverse();
        let err = WindowManifest::decode(&keys, &other.encode(&s).unwrap()).unwrap_err();
        assert!(err.to_string().contains("sorted"), "{err}");
        assert!(m.mentions("c") && m.mentions("a") && !m.mentions("d"));
        // What readers check beyond the signature: the signer is the leader, and the manifest
        // is about the window and generation they asked for.
        let window = Window {
            start: 7200,
            end: 14400,
        };
        WindowManifest::decode_leaders(&keys, "alpha", "clicks", window, 1, &bytes).unwrap();
        let beta = Signer25519::generate("beta");
        let both = KeyRing::new().with(&s).with(&beta);
        let err = WindowManifest::decode_leaders(
            &both,
            "alpha",
            "clicks",
            window,
            1,
            &m.encode(&beta).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not by the leader"), "{err}");
        for (agg, w, g) in [
            ("other", window, 1),
            (
                "clicks",
                Window {
                    start: 0,
                    end: 7200,
                },
                1,
            ),
            ("clicks", window, 0),
        ] {
            let err =
                WindowManifest::decode_leaders(&keys, "alpha", agg, w, g, &bytes).unwrap_err();
            assert!(err.to_string().contains("window manifest is for"), "{err}");
        }
    }

    #[test]
    fn report_digest_ignores_order() {
        let mut a = [[1u8; 16], [2; 16]];
        let mut b = [[2u8; 16], [1; 16]];
        assert_eq!(report_digest(&mut a), report_digest(&mut b));
        assert_ne!(report_digest(&mut a), report_digest(&mut [[1u8; 16]]));
    }
}
