//! What one message may carry, and how a copy is kept within it.
//!
//! Every broker caps a message somewhere: RabbitMQ closes the whole connection when a header frame
//! exceeds its `frame_max` (128 KiB by default), NATS refuses a payload (headers included) over the
//! server's `max_payload` (1 MiB by default), SNS takes at most 256 KiB of body and attributes and
//! delivers at most 10 attributes to a raw SQS queue, Pub/Sub allows 1024-byte attribute values,
//! Kafka's `message.max.bytes` is about 1 MB. Each backend declares its caps as [`Limits`]; the
//! worker loop keeps every message it makes about another message (the copies it moves to
//! `{topic}.rejected` and `{topic}.dead`) within them with [`bound_copy`], so that echoing hostile
//! input can never make the copy itself unsendable.
//!
//! Sizes that are documented and fixed:
//!
//! * [`MAX_REASON_BYTES`]: a reason (`millrace-reason`) is at most this long, and so is every
//!   attribute value echoed from the original message;
//! * [`bounded_text`] marks a cut with `…[+N bytes]`, so a reader knows it is not the whole text.

use std::borrow::Cow;

use crate::{Attributes, Bytes, Message};

/// The longest reason, and the longest echoed attribute value, that a copy carries (bytes, marker
/// included). Small enough for every backend's per-value cap (Pub/Sub: 1024 bytes) even after a
/// backend hex-encodes a value it cannot carry verbatim.
pub const MAX_REASON_BYTES: usize = 500;

/// Attribute on a copy whose body was cut to fit: the original body's length in bytes.
pub const ATTR_BODY_BYTES: &str = "millrace-body-bytes";

/// Attribute on a copy that could not carry every attribute of the original: how many it left out.
pub const ATTR_DROPPED_ATTRIBUTES: &str = "millrace-dropped-attributes";

/// What a backend's broker accepts in one message, as the backend's caller sees it (after the
/// backend's own bookkeeping attributes and headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest message, body and attributes (names and values) together, in bytes.
    pub max_message_bytes: usize,
    /// How many attributes one message may carry.
    pub max_attributes: usize,
    /// The longest attribute value, in bytes.
    pub max_attribute_value_bytes: usize,
    /// All attribute names and values together, in bytes.
    pub max_attributes_bytes: usize,
}

impl Limits {
    /// The largest body a task on this bus may have so that a copy of it, with the bounded
    /// attributes the worker loop adds, still fits: the message cap less room for attributes.
    pub fn max_body_bytes(&self) -> usize {
        self.max_message_bytes
            .saturating_sub(self.attribute_room())
            .max(1)
    }

    /// Room kept for attributes beside a body of [`Limits::max_body_bytes`].
    fn attribute_room(&self) -> usize {
        // Four bounded values of our own plus a few echoed ones, names included.
        (8 * (MAX_REASON_BYTES + 64)).min(self.max_attributes_bytes)
    }
}

/// `text` made safe to echo: control characters escaped (`\u{0}`), then cut to at most `max`
/// bytes on a character boundary with a `…[+N bytes]` marker saying how much was left out.
pub fn bounded_text(text: &str, max: usize) -> Cow<'_, str> {
    let escaped: Cow<'_, str> = if text.chars().any(char::is_control) {
        Cow::Owned(
            text.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    };
    if escaped.len() <= max {
        return escaped;
    }
    // The marker's length depends on the number in it; reserve for the longest.
    let reserve = "…[+ bytes]".len() + 20;
    let keep = floor_char_boundary(&escaped, max.saturating_sub(reserve));
    let left_out = escaped.len() - keep;
    Cow::Owned(format!("{}…[+{left_out} bytes]", &escaped[..keep]))
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// What [`bound_copy`] had to leave out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// The original body's length, if the body was cut.
    pub body_cut_from: Option<usize>,
    /// Attributes of the original that did not fit.
    pub dropped_attributes: usize,
}

/// A copy of a message that fits `limits`: `ours` (the copier's own attributes, most important
/// first) always travel, each value bounded by [`MAX_REASON_BYTES`]; the original's `echoed`
/// attributes follow, each bounded the same way, as long as they fit; the body is cut (on a
/// character boundary if it is text) to what is left, and [`ATTR_BODY_BYTES`] then records its
/// original length.
pub fn bound_copy(
    body: &Bytes,
    ours: &[(&str, &str)],
    echoed: &Attributes,
    limits: &Limits,
) -> (Message, Trimmed) {
    let value_cap = MAX_REASON_BYTES.min(limits.max_attribute_value_bytes);
    let mut attributes = Attributes::new();
    let mut used = 0usize;
    let mut trimmed = Trimmed::default();
    // Two slots stay free for the body-length and dropped-attributes notes.
    let slots = limits.max_attributes.saturating_sub(2).max(ours.len());
    for (key, value) in ours {
        let value = bounded_text(value, value_cap).into_owned();
        used += key.len() + value.len();
        attributes.insert((*key).to_string(), value);
    }
    for (key, value) in echoed {
        if attributes.contains_key(key) {
            continue;
        }
        let value = bounded_text(value, value_cap);
        let size = key.len() + value.len();
        if attributes.len() >= slots
            || key.len() > value_cap
            || used + size > limits.max_attributes_bytes.saturating_sub(2 * 64)
        {
            trimmed.dropped_attributes += 1;
            continue;
        }
        used += size;
        attributes.insert(key.clone(), value.into_owned());
    }
    if trimmed.dropped_attributes > 0 {
        let note = trimmed.dropped_attributes.to_string();
        used += ATTR_DROPPED_ATTRIBUTES.len() + note.len();
        attributes.insert(ATTR_DROPPED_ATTRIBUTES.to_string(), note);
    }
    // Room for the body-length note, whether or not it is needed.
    let room = limits
        .max_message_bytes
        .saturating_sub(used + ATTR_BODY_BYTES.len() + 20);
    let body = if body.len() > room {
        trimmed.body_cut_from = Some(body.len());
        attributes.insert(ATTR_BODY_BYTES.to_string(), body.len().to_string());
        let cut = match std::str::from_utf8(body) {
            Ok(text) => floor_char_boundary(text, room),
            Err(_) => room,
        };
        body.slice(..cut)
    } else {
        body.clone()
    };
    (Message { body, attributes }, trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNS_LIKE: Limits = Limits {
        max_message_bytes: 256 * 1024,
        max_attributes: 10,
        max_attribute_value_bytes: 256 * 1024,
        max_attributes_bytes: 256 * 1024,
    };

    #[test]
    fn short_text_passes_unchanged() {
        assert_eq!(bounded_text("bad signature", 100), "bad signature");
        assert!(matches!(bounded_text("plain", 100), Cow::Borrowed(_)));
    }

    #[test]
    fn long_text_is_cut_with_a_marker_within_the_bound() {
        let id = "x".repeat(200_000);
        let reason = format!("task {id}: malformed");
        let bounded = bounded_text(&reason, MAX_REASON_BYTES);
        assert!(bounded.len() <= MAX_REASON_BYTES, "{}", bounded.len());
        assert!(bounded.starts_with("task xxx"));
        let left_out = reason.len() - bounded.find('…').unwrap();
        assert!(
            bounded.ends_with(&format!("…[+{left_out} bytes]")),
            "{bounded}"
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries_and_controls_are_escaped() {
        let text = "é".repeat(1000);
        let bounded = bounded_text(&text, 101);
        assert!(bounded.len() <= 101);
        assert!(bounded.starts_with("éé"));
        assert_eq!(bounded_text("a\0b\nc", 100), "a\\u{0}b\\nc");
    }

    #[test]
    fn a_copy_of_an_oversized_message_fits_and_says_what_it_cut() {
        let body = Bytes::from("é".repeat(200_000)); // 400,000 bytes of text
        let mut echoed = Attributes::new();
        for i in 0..12 {
            echoed.insert(format!("h{i:02}"), "v".repeat(100_000));
        }
        let reason = "r".repeat(1_000_000);
        let (copy, trimmed) = bound_copy(
            &body,
            &[("millrace-reason", &reason), ("millrace-attempt", "1")],
            &echoed,
            &SNS_LIKE,
        );
        let size = copy.body.len()
            + copy
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        assert!(size <= SNS_LIKE.max_message_bytes, "{size}");
        assert!(copy.attributes.len() <= SNS_LIKE.max_attributes);
        assert!(copy.attributes["millrace-reason"].len() <= MAX_REASON_BYTES);
        assert_eq!(copy.attributes["millrace-attempt"], "1");
        assert!(std::str::from_utf8(&copy.body).is_ok(), "cut mid-character");
        assert_eq!(trimmed.body_cut_from, Some(400_000));
        assert_eq!(copy.attributes[ATTR_BODY_BYTES], "400000");
        assert!(trimmed.dropped_attributes >= 6, "{trimmed:?}");
        assert_eq!(
            copy.attributes[ATTR_DROPPED_ATTRIBUTES],
            trimmed.dropped_attributes.to_string()
        );
    }

    #[test]
    fn a_small_copy_keeps_its_body_and_attributes_whole() {
        let body = Bytes::from_static(b"{\"version\":1}");
        let mut echoed = Attributes::new();
        echoed.insert("traceparent".into(), "00-abc-def-01".into());
        let (copy, trimmed) = bound_copy(&body, &[("millrace-reason", "bad")], &echoed, &SNS_LIKE);
        assert_eq!(copy.body, body);
        assert_eq!(copy.attributes["traceparent"], "00-abc-def-01");
        assert_eq!(trimmed, Trimmed::default());
        assert!(!copy.attributes.contains_key(ATTR_BODY_BYTES));
    }

    #[test]
    fn every_task_body_up_to_the_limit_leaves_room_for_the_copy() {
        let body = Bytes::from(vec![b'a'; SNS_LIKE.max_body_bytes()]);
        let reason = "r".repeat(10_000);
        let (copy, trimmed) = bound_copy(
            &body,
            &[
                ("millrace-reason", &reason),
                ("millrace-attempt", "8"),
                ("millrace-origin-topic", "millrace.0.intake"),
            ],
            &Attributes::new(),
            &SNS_LIKE,
        );
        assert_eq!(trimmed.body_cut_from, None);
        assert_eq!(copy.body.len(), SNS_LIKE.max_body_bytes());
    }
}
