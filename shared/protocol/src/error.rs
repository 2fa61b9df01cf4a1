use thiserror::Error;

/// Why bytes were not accepted as a Millrace object. Callers add the object's key with
/// [`ObjectError`]; this type says what inside the object was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("truncated: {what} runs past the end (at byte {offset})")]
    Truncated { what: String, offset: usize },
    #[error("{count} trailing bytes after the end of the {what}")]
    TrailingBytes { what: String, count: usize },
    #[error("not a Millrace object (bad magic)")]
    BadMagic,
    #[error("expected a {expected} object, found kind {found}")]
    WrongKind { expected: &'static str, found: u8 },
    #[error("unsupported {what} version {found} (this build reads {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u8,
        /// The versions this build reads, for the message (`version 2`, `versions 2 and 3`).
        supported: String,
    },
    #[error("signed by unknown key {key_id:?}")]
    UnknownKey { key_id: String },
    #[error("signature by key {key_id:?} does not verify")]
    BadSignature { key_id: String },
    #[error("{0}")]
    Invalid(String),
}

/// A format error together with the object it came from.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{object}: {error}")]
pub struct ObjectError {
    pub object: String,
    pub error: FormatError,
}

impl FormatError {
    pub fn in_object(self, object: impl Into<String>) -> ObjectError {
        ObjectError {
            object: object.into(),
            error: self,
        }
    }
}

/// Errors from keys and the cryptography around them.
#[derive(Debug, Error)]
pub enum CryptoError {
    #[error("key {name}: {reason}")]
    BadKey { name: String, reason: String },
    #[error("secret {reference:?}: {reason}")]
    Secret { reference: String, reason: String },
    #[error("HPKE: {0}")]
    Hpke(String),
}

/// Errors from the VDAF layer.
#[derive(Debug, Error)]
pub enum VdafError {
    #[error("aggregation parameters: {0}")]
    Parameters(String),
    #[error("measurement: {0}")]
    Measurement(String),
    #[error("{0}")]
    Prio(String),
}
