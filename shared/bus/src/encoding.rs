//! Small encodings the backends share for names and attributes their brokers cannot carry as
//! they are: lowercase hex, and a stable 64-bit hash for shortened or sanitized names.

/// Lowercase hex of `bytes`.
#[cfg_attr(not(any(feature = "nats", feature = "sns-sqs")), allow(dead_code))]
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The UTF-8 text whose [`hex`] `text` is; `None` for odd lengths, non-hex digits or bytes that
/// are not UTF-8.
#[cfg_attr(not(any(feature = "nats", feature = "sns-sqs")), allow(dead_code))]
pub(crate) fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    bytes.and_then(|b| String::from_utf8(b).ok())
}

/// 64-bit FNV-1a of `parts`, with a 0xff byte (which UTF-8 text never holds) between parts:
/// stable across Rust versions and processes, unlike `DefaultHasher`, so names derived from it
/// stay the same from one release to the next. One part hashes as plain FNV-1a of its bytes.
#[cfg_attr(
    not(any(feature = "nats", feature = "sns-sqs", feature = "pubsub")),
    allow(dead_code)
)]
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash ^= 0xff;
            hash = hash.wrapping_mul(PRIME);
        }
        for &b in *part {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_hex() {
        for text in ["", "a", "Millrace-ü ✓\r\n", " lead and trail "] {
            assert_eq!(unhex(&hex(text.as_bytes())).as_deref(), Some(text));
        }
        assert_eq!(hex(b"\x00\xffA"), "00ff41");
        assert_eq!(unhex("abc"), None, "odd length");
        assert_eq!(unhex("zz"), None, "not hex digits");
        assert_eq!(unhex("ff"), None, "not UTF-8");
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // The FNV-1a 64-bit reference values for "", "a" and "foobar".
        assert_eq!(fnv1a(&[b"".as_slice()]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a".as_slice()]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foobar".as_slice()]), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fnv1a_separates_parts() {
        assert_ne!(
            fnv1a(&[b"ab".as_slice(), b"c".as_slice()]),
            fnv1a(&[b"a".as_slice(), b"bc".as_slice()])
        );
        assert_ne!(
            fnv1a(&[b"ab".as_slice(), b"c".as_slice()]),
            fnv1a(&[b"abc".as_slice()])
        );
    }
}
