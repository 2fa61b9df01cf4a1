//! Keys: Ed25519 signatures on every artefact, HPKE (X25519, HKDF-SHA256, ChaCha20-Poly1305) for
//! input shares, and 32-byte VDAF verify keys. Keys are stored hex-encoded; secrets are named by a
//! reference (`file:PATH` or `env:VAR`) so that they never appear in flags, configs or logs.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use hpke::{Deserializable, Kem as _, Serializable};
use zeroize::Zeroizing;

use crate::error::{CryptoError, FormatError};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Length of an HPKE encapsulated key for X25519.
pub const ENCAPPED_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Fills `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::RngCore;
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

fn decode_hex<const N: usize>(name: &str, text: &str) -> Result<[u8; N], CryptoError> {
    let raw = hex::decode(text.trim()).map_err(|e| CryptoError::BadKey {
        name: name.to_string(),
        reason: format!("not hex: {e}"),
    })?;
    raw.try_into().map_err(|raw: Vec<u8>| CryptoError::BadKey {
        name: name.to_string(),
        reason: format!("expected {N} bytes, found {}", raw.len()),
    })
}

/// Reads a secret named by `reference`: `file:PATH` (relative to `base_dir`) or `env:VAR`
/// (the one convention of [`millrace_secrets`], shared with bus and store settings).
pub fn read_secret(reference: &str, base_dir: &Path) -> Result<Zeroizing<String>, CryptoError> {
    millrace_secrets::resolve_in(reference, base_dir).map_err(|e| match e {
        millrace_secrets::SecretError::Unreadable { reference, reason } => {
            CryptoError::Secret { reference, reason }
        }
        other => CryptoError::Secret {
            reference: reference.to_string(),
            reason: other.to_string(),
        },
    })
}

/// The private half of a party's signing key, with the key id its signatures carry.
#[derive(Clone)]
pub struct Signer25519 {
    key_id: String,
    key: SigningKey,
}

impl fmt::Debug for Signer25519 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer25519")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer25519 {
    pub fn generate(key_id: impl Into<String>) -> Self {
        let seed = Zeroizing::new(random_bytes::<32>());
        Signer25519 {
            key_id: key_id.into(),
            key: SigningKey::from_bytes(&seed),
        }
    }
    pub fn from_hex(key_id: impl Into<String>, text: &str) -> Result<Self, CryptoError> {
        let key_id = key_id.into();
        let seed = Zeroizing::new(decode_hex::<32>(&key_id, text)?);
        Ok(Signer25519 {
            key: SigningKey::from_bytes(&seed),
            key_id,
        })
    }
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.key.to_bytes()))
    }
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }
    pub fn public(&self) -> VerifyingKey {
        self.key.verifying_key()
    }
    pub(crate) fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(msg).to_bytes()
    }
}

/// The public signing keys a reader trusts, by key id, each with the party that owns it. A party
/// may have several (a new one and the ones it signed with before); a signature names its key
/// id, and a verified object is attributed to the key's owner.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: HashMap<String, (String, VerifyingKey)>,
}

impl KeyRing {
    pub fn new() -> Self {
        KeyRing::default()
    }
    /// Trusts `key`, id `key_id`, as a key of `owner`.
    pub fn add(&mut self, key_id: impl Into<String>, owner: impl Into<String>, key: VerifyingKey) {
        self.keys.insert(key_id.into(), (owner.into(), key));
    }
    pub fn add_hex(
        &mut self,
        key_id: impl Into<String>,
        owner: impl Into<String>,
        text: &str,
    ) -> Result<(), CryptoError> {
        let key_id = key_id.into();
        let raw = decode_hex::<32>(&key_id, text)?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|e| CryptoError::BadKey {
            name: key_id.clone(),
            reason: format!("not an Ed25519 public key: {e}"),
        })?;
        self.keys.insert(key_id, (owner.into(), key));
        Ok(())
    }
    /// Trusts `signer`'s public key, owned by a party named like its key id.
    pub fn with(mut self, signer: &Signer25519) -> Self {
        self.add(signer.key_id(), signer.key_id(), signer.public());
        self
    }
    /// Trusts `signer`'s public key as a key of `owner`.
    pub fn with_owned(mut self, signer: &Signer25519, owner: &str) -> Self {
        self.add(signer.key_id(), owner, signer.public());
        self
    }
    /// The keys of `owner` only.
    pub fn only(&self, owner: &str) -> KeyRing {
        KeyRing {
            keys: self
                .keys
                .iter()
                .filter(|(_, (o, _))| o == owner)
                .map(|(id, v)| (id.clone(), v.clone()))
                .collect(),
        }
    }
    /// Every key id trusted for `owner`, sorted.
    pub fn key_ids_of(&self, owner: &str) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .keys
            .iter()
            .filter(|(_, (o, _))| o == owner)
            .map(|(id, _)| id.as_str())
            .collect();
        ids.sort_unstable();
        ids
    }
    /// Verifies `signature` by key `key_id`; returns the key's owner.
    pub(crate) fn verify(
        &self,
        key_id: &str,
        msg: &[u8],
        signature: &[u8; SIGNATURE_LEN],
    ) -> Result<String, FormatError> {
        let (owner, key) = self
            .keys
            .get(key_id)
            .ok_or_else(|| FormatError::UnknownKey {
                key_id: key_id.to_string(),
            })?;
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        key.verify(msg, &signature)
            .map_err(|_| FormatError::BadSignature {
                key_id: key_id.to_string(),
            })?;
        Ok(owner.clone())
    }
}

/// A facilitator's HPKE public key: what ingestors encrypt input shares to.
#[derive(Clone)]
pub struct HpkePublicKey(<Kem as hpke::Kem>::PublicKey);

/// A facilitator's HPKE private key.
#[derive(Clone)]
pub struct HpkePrivateKey(<Kem as hpke::Kem>::PrivateKey);

impl fmt::Debug for HpkePrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HpkePrivateKey(..)")
    }
}

impl fmt::Debug for HpkePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HpkePublicKey({})", self.to_hex())
    }
}

/// Generates an HPKE key pair.
pub fn hpke_generate() -> (HpkePrivateKey, HpkePublicKey) {
    let (sk, pk) = Kem::gen_keypair(&mut rand::rng());
    (HpkePrivateKey(sk), HpkePublicKey(pk))
}

impl HpkePublicKey {
    pub fn from_hex(name: &str, text: &str) -> Result<Self, CryptoError> {
        let raw = decode_hex::<32>(name, text)?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&raw)
            .map(HpkePublicKey)
            .map_err(|e| CryptoError::BadKey {
                name: name.to_string(),
                reason: format!("not an X25519 public key: {e}"),
            })
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Encrypts `plaintext`; returns the encapsulated key and the ciphertext (with tag).
    pub fn seal(
        &self,
        info: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<([u8; ENCAPPED_KEY_LEN], Vec<u8>), CryptoError> {
        let (encapped, ciphertext) = hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
            &hpke::OpModeS::Base,
            &self.0,
            info,
            plaintext,
            aad,
            &mut rand::rng(),
        )
        .map_err(|e| CryptoError::Hpke(e.to_string()))?;
        let mut enc = [0u8; ENCAPPED_KEY_LEN];
        enc.copy_from_slice(&encapped.to_bytes());
        Ok((enc, ciphertext))
    }
}

impl HpkePrivateKey {
    pub fn from_hex(name: &str, text: &str) -> Result<Self, CryptoError> {
        let raw = Zeroizing::new(decode_hex::<32>(name, text)?);
        <Kem as hpke::Kem>::PrivateKey::from_bytes(raw.as_slice())
            .map(HpkePrivateKey)
            .map_err(|e| CryptoError::BadKey {
                name: name.to_string(),
                reason: format!("not an X25519 private key: {e}"),
            })
    }
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.to_bytes()))
    }
    pub fn public(&self) -> HpkePublicKey {
        HpkePublicKey(<Kem as hpke::Kem>::sk_to_pk(&self.0))
    }

    /// Decrypts what [`HpkePublicKey::seal`] produced.
    pub fn open(
        &self,
        info: &[u8],
        aad: &[u8],
        encapped: &[u8; ENCAPPED_KEY_LEN],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(encapped)
            .map_err(|e| CryptoError::Hpke(e.to_string()))?;
        hpke::single_shot_open::<Aead, Kdf, Kem>(
            &hpke::OpModeR::Base,
            &self.0,
            &encapped,
            info,
            ciphertext,
            aad,
        )
        .map_err(|e| CryptoError::Hpke(e.to_string()))
    }
}

/// A 32-byte VDAF verify key shared by both facilitators of one aggregation.
#[derive(Clone)]
pub struct VerifyKey(pub(crate) Zeroizing<[u8; 32]>);

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VerifyKey(..)")
    }
}

impl VerifyKey {
    pub fn generate() -> Self {
        VerifyKey(Zeroizing::new(random_bytes::<32>()))
    }
    pub fn from_hex(name: &str, text: &str) -> Result<Self, CryptoError> {
        Ok(VerifyKey(Zeroizing::new(decode_hex::<32>(name, text)?)))
    }
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.0))
    }
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpke_round_trip_and_wrong_aad_fails() {
        let (sk, pk) = hpke_generate();
        let (enc, ct) = pk.seal(b"info", b"aad", b"hello").unwrap();
        assert_eq!(sk.open(b"info", b"aad", &enc, &ct).unwrap(), b"hello");
        assert!(sk.open(b"info", b"other", &enc, &ct).is_err());
        let sk2 = HpkePrivateKey::from_hex("k", &sk.to_hex()).unwrap();
        assert_eq!(sk2.public().to_hex(), pk.to_hex());
    }

    #[test]
    fn signatures_verify_only_with_the_right_key() {
        let a = Signer25519::generate("a");
        let b = Signer25519::generate("b");
        let ring = KeyRing::new().with(&a);
        let sig = a.sign(b"msg");
        assert_eq!(ring.verify("a", b"msg", &sig).unwrap(), "a");
        let owned = KeyRing::new().with_owned(&a, "alpha");
        assert_eq!(owned.verify("a", b"msg", &sig).unwrap(), "alpha");
        assert_eq!(owned.key_ids_of("alpha"), ["a"]);
        assert!(matches!(
            ring.verify("a", b"msg2", &sig),
            Err(FormatError::BadSignature { .. })
        ));
        assert!(matches!(
            ring.verify("b", b"msg", &b.sign(b"msg")),
            Err(FormatError::UnknownKey { .. })
        ));
    }

    #[test]
    fn secrets_come_from_files_or_env_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "abcd\n").unwrap();
        assert_eq!(read_secret("file:k", dir.path()).unwrap().trim(), "abcd");
        assert!(read_secret("abcd", dir.path()).is_err());
        assert!(read_secret("env:MILLRACE_TEST_SURELY_UNSET", dir.path()).is_err());
    }
}
