//! The AWS backend (`sns-sqs://REGION`): publish to SNS topics, consume from SQS queues subscribed
//! to them with raw message delivery, through the official AWS SDK for Rust.
//!
//! # URL
//!
//! `sns-sqs://REGION` (e.g. `sns-sqs://eu-west-1`), or `sns-sqs://` to take the region from the
//! ambient AWS configuration (`AWS_REGION`, the profile). Query parameters:
//!
//! * `endpoint=http://127.0.0.1:PORT` sends both SNS and SQS to that endpoint (emulators such as
//!   moto). Without it, aws-config's own `AWS_ENDPOINT_URL` (and the per-service
//!   `AWS_ENDPOINT_URL_SNS` / `AWS_ENDPOINT_URL_SQS`) still apply.
//! * `wait=SECONDS` (0 to 20, default [`DEFAULT_WAIT_SECS`]): how long one `ReceiveMessage` long
//!   poll waits. Short, so that a subscription notices `close` and lost interest quickly; an idle
//!   subscription with a waiting consumer therefore makes about one request per `wait` seconds.
//!
//! Credentials come from aws-config's default chain (environment, profile, SSO, IMDS, ECS, IRSA
//! web identity) and are never logged. [`SnsSqsBus::connect_with`] takes a prepared
//! [`aws_config::ConfigLoader`] instead (tests use it to pass dummy credentials).
//!
//! # Topology
//!
//! * **A topic is an SNS standard topic**, named by [`topic_name`].
//! * **A consumer group is one SQS standard queue per (topic, group)**, named by [`queue_name`],
//!   subscribed to the topic with `RawMessageDelivery=true`, so that the SQS body is exactly the
//!   published body (no SNS JSON envelope) and SNS message attributes arrive as SQS message
//!   attributes. Every group gets every message; the consumers of one group compete for it.
//! * `create_topic(topic, None)` creates the SNS topic only. `create_topic(topic, Some(group))`
//!   also creates the queue (`MessageRetentionPeriod` [`RETENTION`], the maximum;
//!   `ReceiveMessageWaitTimeSeconds` 20 for other readers), sets the queue's access policy to allow
//!   exactly that topic to `sqs:SendMessage` to it (the policy is owned by the bus and rewritten
//!   on every `create_topic`), and subscribes it. All of it is idempotent; an existing
//!   subscription without raw delivery is switched to raw delivery. Topics and queues are tagged
//!   `millrace-topic` / `millrace-group` with the Millrace names (when those are valid tag values),
//!   which is how [`SnsSqsBus::delete_topics_under`] finds them. Creating tagged topics needs
//!   `sns:TagResource` and tagged queues `sqs:TagQueue` on real AWS.
//! * **SNS drops a message published while no queue is subscribed**: unlike the in-memory bus
//!   there is no backlog that the first group takes. Create the groups (`--create-topics`) before
//!   publishing; a topic that nobody subscribes to swallows what is published to it (which is why
//!   services give `{topic}.dead` and `{topic}.rejected` the [`crate::INSPECT_GROUP`] group).
//! * There is **no SQS redrive policy**: the worker loop counts attempts and moves a message to
//!   `{topic}.dead` itself after its maximum, as on every backend.
//! * Without `create_topic`, `publish` to a missing topic and `subscribe` to a missing topic or
//!   group queue fail with [`BusError::MissingTopic`] naming the Millrace topic. Nothing is created
//!   on demand. [`SnsSqsBus::check_topic`] checks topic, queue and raw subscription for a start-up
//!   check.
//!
//! # Names
//!
//! SNS topic names allow `[A-Za-z0-9_-]`, up to 256 characters; SQS queue names the same, up to
//! 80. [`topic_name`] replaces every other character (Millrace's `.`) with `_`; [`queue_name`] is
//! `{topic_name}__{group}` mapped the same way. A topic made only of ASCII letters, digits, `-` and
//! `.` (and, for queues, a group made only of ASCII letters, digits and `-`) maps one-to-one
//! (`millrace.fac-0.intake` → `millrace_fac-0_intake`, group `aggregate` →
//! `millrace_fac-0_intake__aggregate`). Any other name (one with `_`, other characters, or a group
//! with `.`), and any name that would be too long, is cut to fit and gets the suffix
//! `_h{16 hex digits}`, a 64-bit FNV-1a hash of the full Millrace name(s), so that `a.b` and `a_b`
//! stay apart. The mapping is stable across processes and versions.
//!
//! # Publishing and attributes
//!
//! `publish` is an SNS `Publish` that returns once SNS has accepted the message; its result is
//! SNS's message id. (A delivery's `message_id` is the SQS message id, which differs per group
//! queue but stays the same across redeliveries.) `flush` has nothing left to wait for.
//!
//! SNS and SQS only carry text: the body must be UTF-8 made of the characters SQS accepts
//! (tab, newline, carriage return, and U+0020 upwards except surrogates and U+FFFE/U+FFFF), not
//! empty, and at most 256 KiB together with the attributes; anything else is refused by `publish`
//! with a plain error instead of being lost between SNS and SQS.
//!
//! Attributes travel as SNS message attributes of type `String`. **At most
//! [`MAX_ATTRIBUTES`] (10) per message**: SNS does not deliver a message with more than ten
//! attributes to a raw-delivery SQS queue, so `publish` refuses more with a clear error. Names are
//! restricted to `[A-Za-z0-9_.-]` (no leading, trailing or double `.`, no `AWS.` / `Amazon.`
//! prefix) and values must be non-blank valid text; an attribute that cannot travel verbatim
//! (including an empty value) is sent hex-encoded as `Millrace-X-{hex(name)}` = `h{hex(value)}` and
//! decoded on receipt, so every attribute arrives exactly as published. An encoded name must stay
//! within SNS's 256 characters, so such names are limited to 122 bytes.
//!
//! # Receiving
//!
//! Each subscription has one background task that calls `ReceiveMessage` only when there is
//! demand: a caller waiting in `next`, or a buffer that has run below half the prefetch. A
//! subscription nobody reads therefore does not hoard messages another consumer of the group
//! could take. One receive long-polls for up to `wait` seconds, asks for `ApproximateReceiveCount`
//! and all message attributes, and for no more than `prefetch` minus what is buffered, at most
//! ten. The batch starts at one message, doubles after every receive faster than 250 ms and halves
//! after one that took over a second to return its messages, so that a slow server does not keep
//! a waiting caller for seconds (moto, for one, spends time per returned message in proportion to
//! the queue's length).
//!
//! The task owns the receive call, so cancelling `next` (a timeout, a `select!`) never loses a
//! message: if the last caller of `next` gave up and nobody has called it since, whatever the
//! receive in flight brings (made for that caller or to read ahead) is handed back at once
//! (visibility 0); otherwise it waits in the buffer. A receive in flight is never aborted (SQS
//! would keep what it returned invisible for the whole visibility timeout); it ends within `wait`
//! seconds and its messages are handed back if the subscription was closed meanwhile. Receive
//! failures are retried with backoff (100 ms doubling to 5 s); the next caller of `next` sees the
//! failure once as an error (`MissingTopic` if the queue was deleted), which the worker loop logs
//! before retrying.
//!
//! # Leases
//!
//! The lease is the SQS visibility timeout, which only has whole seconds, while Millrace leases
//! can be shorter (the conformance suite uses 400 ms). So the lease is kept client-side, as on the
//! NATS and RabbitMQ backends, with SQS's visibility always longer:
//!
//! * A receive asks for visibility `ceil(lease) + 1` seconds ([`visibility_for`], at most 12
//!   hours). Each message's client-side deadline is the moment the receive was *sent* plus the
//!   lease, so it always falls at least a second before SQS could make the message visible again.
//! * When the deadline passes unsettled (whether the delivery was handed out or still buffered),
//!   the bus hands the message back itself (`ChangeMessageVisibility` 0) and a later `ack`, `nack`
//!   or `extend` of that delivery fails with [`BusError::LeaseLost`]. This matters: SQS accepts a
//!   `DeleteMessage` with a stale receipt handle (moto does too), so without the client-side check
//!   a late ack could delete a message another consumer is working on.
//! * `extend(lease)` is `ChangeMessageVisibility(ceil(lease) + 1 s)` and moves the deadline to
//!   (sent + lease) once SQS has confirmed it. SQS caps a message's total visibility at 12 hours
//!   from its receive.
//! * Callers count the lease from when `next` hands the delivery out, SQS from the receive. A
//!   message that waited in the buffer for more than a quarter of its lease is therefore extended
//!   to a whole lease in the background as `next` hands it out (its old deadline holds until SQS
//!   confirms); one whose lease ran out in the buffer is skipped and handed back.
//! * `nack(delay)` is `ChangeMessageVisibility(ceil(delay))`: the delay is rounded **up to whole
//!   seconds** (600 ms waits 1 s), at most 12 hours; `nack(0)` makes it visible at once.
//! * `ack` is `DeleteMessage` with this delivery's receipt handle (receipt handles change with
//!   every receive; each delivery keeps its own).
//! * A delivery dropped unsettled, and on `close` everything buffered and not handed out, is handed
//!   back at once (visibility 0). A process that dies instead leaves its messages invisible until
//!   `ceil(lease) + 1` seconds after they were received.
//! * The attempt is `ApproximateReceiveCount`, which SQS raises on every receive: nack, hand-back,
//!   lease expiry and a crash all count, and so does a message handed back unseen because its
//!   receive outlived the caller that asked for it.
//!
//! `close` stops receiving and hands back the buffer; deliveries already handed out stay
//! settleable until they are settled, dropped or their lease runs out.

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_sns::error::DisplayErrorContext;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::encoding::{fnv1a, hex, unhex};
use crate::lock;
use crate::Limits;
use crate::{
    Attributes, Bus, BusError, Capabilities, Delivery, Message, Settle, SubscribeOptions,
    Subscription,
};

const BACKEND: &str = "sns-sqs";
/// The most message attributes SNS delivers to a raw-delivery SQS queue.
pub const MAX_ATTRIBUTES: usize = 10;
/// SNS topic names: at most this many characters of `[A-Za-z0-9_-]`.
pub const TOPIC_NAME_MAX: usize = 256;
/// SQS queue names: at most this many characters of `[A-Za-z0-9_-]`.
pub const QUEUE_NAME_MAX: usize = 80;
/// How long a group queue keeps a message nobody acks (SQS's maximum, 14 days).
pub const RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
/// Default long-poll wait of one `ReceiveMessage`, in seconds (the URL's `wait`).
pub const DEFAULT_WAIT_SECS: u8 = 1;
/// The most messages one `ReceiveMessage` returns.
const MAX_BATCH: usize = 10;
/// A receive that returned messages more slowly than this halves the next batch.
const SLOW_RECEIVE: Duration = Duration::from_secs(1);
/// A receive faster than this doubles the next batch again (up to [`MAX_BATCH`]).
const FAST_RECEIVE: Duration = Duration::from_millis(250);
/// SQS's longest visibility timeout (12 hours), in seconds.
const MAX_VISIBILITY_SECS: u64 = 43_200;
/// Attribute-name prefix of attributes sent hex-encoded.
const ENCODED_PREFIX: &str = "Millrace-X-";
/// Tag carrying the Millrace topic on SNS topics and SQS queues.
const TAG_TOPIC: &str = "millrace-topic";
/// Tag carrying the consumer group on SQS queues.
const TAG_GROUP: &str = "millrace-group";
/// How many characters of a prefix [`SnsSqsBus::delete_topics_under`] uses to pre-select names
/// (every name keeps at least this much of its readable part).
const NAME_PREFIX_FILTER: usize = 40;
// A cut name keeps `max - 18` readable characters (the hash suffix is 18).
const _: () = assert!(QUEUE_NAME_MAX - 18 >= NAME_PREFIX_FILTER);

fn backend(message: impl Display) -> BusError {
    BusError::Backend {
        backend: BACKEND,
        message: message.to_string(),
    }
}

/// An SDK error with its whole chain of causes (the SDK's own `Display` only says "service error").
fn sdk<E: std::error::Error>(error: E) -> String {
    DisplayErrorContext(error).to_string()
}

fn invalid_url(url: &str, reason: impl Into<String>) -> BusError {
    BusError::InvalidUrl {
        url: millrace_secrets::redact(url),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Names

/// Letters, digits, `-` and `.` only: these names map one-to-one.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// Every character SNS and SQS names cannot hold becomes `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `readable`, cut to fit `max` together with the hash suffix of `key`.
fn with_hash(mut readable: String, key: &[u8], max: usize) -> String {
    let suffix = format!("_h{:016x}", fnv1a(&[key]));
    // `readable` is ASCII (sanitized), so any byte index is a character boundary.
    readable.truncate(max.saturating_sub(suffix.len()));
    readable.push_str(&suffix);
    readable
}

/// The SNS topic name of Millrace topic `topic` (see the module documentation).
pub fn topic_name(topic: &str) -> String {
    let readable = sanitize(topic);
    if plain(topic) && readable.len() <= TOPIC_NAME_MAX {
        readable
    } else {
        with_hash(readable, topic.as_bytes(), TOPIC_NAME_MAX)
    }
}

/// The SQS queue name of consumer group `group` on Millrace topic `topic`.
pub fn queue_name(topic: &str, group: &str) -> String {
    let readable = format!("{}__{}", sanitize(topic), sanitize(group));
    // The group's part holds no `_`, so the last `__` splits an unhashed name unambiguously.
    if plain(topic) && plain(group) && !group.contains('.') && readable.len() <= QUEUE_NAME_MAX {
        readable
    } else {
        let key = format!("{topic}\u{0}{group}");
        with_hash(readable, key.as_bytes(), QUEUE_NAME_MAX)
    }
}

/// How long SQS keeps a message received with client-side lease `lease` invisible: whole
/// seconds, at least a second longer than the lease, at most 12 hours.
pub fn visibility_for(lease: Duration) -> u64 {
    (ceil_secs(lease) + 1).min(MAX_VISIBILITY_SECS)
}

/// The client-side lease actually granted for `lease` (always below SQS's visibility).
fn client_lease(lease: Duration) -> Duration {
    lease.min(Duration::from_secs(MAX_VISIBILITY_SECS - 1))
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The batch size for the next receive, after one that returned `got` messages in `took`: a
/// waiting caller should not wait seconds for a server to assemble a full batch (moto, for one,
/// spends time per returned message in proportion to the queue's length).
fn next_batch(batch: usize, got: usize, took: Duration) -> usize {
    if got > 0 && took > SLOW_RECEIVE {
        (got / 2).clamp(1, MAX_BATCH)
    } else if took < FAST_RECEIVE {
        (batch * 2).clamp(1, MAX_BATCH)
    } else {
        batch
    }
}

fn secs_i32(secs: u64) -> i32 {
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn check_name(kind: &str, name: &str) -> Result<(), BusError> {
    if name.is_empty() {
        Err(backend(format!("the {kind} name is empty")))
    } else {
        Ok(())
    }
}

/// A valid tag value for both SNS and SQS (letters, digits, spaces and `_ . : / = + - @`).
fn tag_safe(value: &str) -> bool {
    !value.is_empty()
        && value.chars().count() <= 256
        && value
            .chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

// ---------------------------------------------------------------------------------------------
// Bodies and attributes

/// A character SQS accepts in bodies and attribute values.
fn sqs_char(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..
    )
}

fn body_text(topic: &str, body: &Bytes) -> Result<String, BusError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        backend(format!(
            "publish to {topic:?}: SNS/SQS carry text only and the body is not UTF-8"
        ))
    })?;
    if text.is_empty() {
        return Err(backend(format!(
            "publish to {topic:?}: SNS does not accept an empty body"
        )));
    }
    if let Some(bad) = text.chars().find(|&c| !sqs_char(c)) {
        return Err(backend(format!(
            "publish to {topic:?}: the body holds character U+{:04X}, which SQS does not carry",
            u32::from(bad)
        )));
    }
    Ok(text.to_string())
}

/// An attribute name SNS and SQS accept as it is (and that is not ours).
fn name_verbatim(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && !lower.starts_with(&ENCODED_PREFIX.to_ascii_lowercase())
}

/// An attribute value that travels unchanged: not blank, only SQS characters, no CR (which XML
/// handling on the way may turn into LF).
fn value_verbatim(value: &str) -> bool {
    !value.trim().is_empty() && value.chars().all(|c| sqs_char(c) && c != '\r')
}

/// The SNS message attributes (name, string value) for `attributes`.
fn encode_attributes(
    topic: &str,
    attributes: &Attributes,
) -> Result<Vec<(String, String)>, BusError> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(backend(format!(
            "publish to {topic:?}: {} attributes, but SNS delivers at most {MAX_ATTRIBUTES} \
             message attributes to an SQS queue",
            attributes.len()
        )));
    }
    attributes
        .iter()
        .map(|(name, value)| {
            if name_verbatim(name) && value_verbatim(value) {
                return Ok((name.clone(), value.clone()));
            }
            let encoded = format!("{ENCODED_PREFIX}{}", hex(name.as_bytes()));
            if encoded.len() > 256 {
                return Err(backend(format!(
                    "publish to {topic:?}: attribute name {name:?} cannot be carried: it needs \
                     encoding for SNS and is then longer than 256 characters (at most 122 bytes)"
                )));
            }
            Ok((encoded, format!("h{}", hex(value.as_bytes()))))
        })
        .collect()
}

/// The attributes as published, from the SQS message attributes.
fn decode_attributes(
    received: Option<&HashMap<String, aws_sdk_sqs::types::MessageAttributeValue>>,
) -> Attributes {
    let mut attributes = Attributes::new();
    for (name, value) in received.into_iter().flatten() {
        let Some(text) = value.string_value() else {
            debug!(
                backend = BACKEND,
                attribute = %name,
                data_type = value.data_type(),
                "non-string message attribute skipped"
            );
            continue;
        };
        let decoded = name.strip_prefix(ENCODED_PREFIX).and_then(|key| {
            let value = text.strip_prefix('h').and_then(unhex)?;
            Some((unhex(key)?, value))
        });
        match decoded {
            Some((key, value)) => attributes.insert(key, value),
            None => attributes.insert(name.clone(), text.to_string()),
        };
    }
    attributes
}

// ---------------------------------------------------------------------------------------------
// The bus

/// What the URL says.
struct UrlOptions {
    region: Option<String>,
    endpoint: Option<String>,
    wait_secs: u8,
}

fn parse_url(url: &str) -> Result<UrlOptions, BusError> {
    let parsed = url::Url::parse(url).map_err(|e| invalid_url(url, e.to_string()))?;
    if parsed.scheme() != "sns-sqs" {
        return Err(invalid_url(url, "expected sns-sqs://REGION or sns-sqs://"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.port().is_some() {
        return Err(invalid_url(
            url,
            "credentials and ports do not go in the URL; use the AWS environment or profile",
        ));
    }
    if !matches!(parsed.path(), "" | "/") {
        return Err(invalid_url(url, "expected no path: sns-sqs://REGION"));
    }
    let region = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string);
    if let Some(region) = &region {
        if !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(invalid_url(
                url,
                format!("{region:?} is not an AWS region name"),
            ));
        }
    }
    let mut options = UrlOptions {
        region,
        endpoint: None,
        wait_secs: DEFAULT_WAIT_SECS,
    };
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "endpoint" => {
                let endpoint = url::Url::parse(&value).map_err(|e| {
                    invalid_url(url, format!("endpoint {value:?} is not a URL: {e}"))
                })?;
                if !matches!(endpoint.scheme(), "http" | "https") {
                    return Err(invalid_url(
                        url,
                        format!("endpoint {value:?} must be http:// or https://"),
                    ));
                }
                options.endpoint = Some(value.trim_end_matches('/').to_string());
            }
            "wait" => {
                options.wait_secs =
                    value
                        .parse::<u8>()
                        .ok()
                        .filter(|w| *w <= 20)
                        .ok_or_else(|| {
                            invalid_url(url, format!("wait={value:?}: expected 0 to 20 seconds"))
                        })?;
            }
            other => {
                return Err(invalid_url(
                    url,
                    format!("unknown parameter {other:?}; expected endpoint or wait"),
                ))
            }
        }
    }
    Ok(options)
}

/// The SNS→SQS bus. See the module documentation for how it maps the port.
pub struct SnsSqsBus {
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    wait_secs: u8,
    /// ARNs of topics known to exist, by Millrace topic.
    topic_arns: Mutex<HashMap<String, String>>,
    /// `arn:PARTITION:sns:REGION:ACCOUNT:`, learnt from the first ARN seen, so that other topics'
    /// ARNs can be built and checked with one call instead of listing every topic.
    arn_prefix: Mutex<Option<String>>,
    /// One ARN lookup at a time (many publishes to a new topic make one lookup).
    resolving: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SnsSqsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnsSqsBus").finish_non_exhaustive()
    }
}

impl SnsSqsBus {
    /// Opens the bus named by `url` (`sns-sqs://REGION[?endpoint=URL&wait=SECONDS]`) with the
    /// ambient AWS configuration. No request is made yet: [`SnsSqsBus::check_topic`] is the
    /// start-up check.
    pub async fn connect(url: &str) -> Result<SnsSqsBus, BusError> {
        Self::connect_with(url, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// [`SnsSqsBus::connect`] with a prepared configuration loader (credentials, profile, ...).
    /// The URL's region and endpoint override the loader's.
    pub async fn connect_with(url: &str, loader: ConfigLoader) -> Result<SnsSqsBus, BusError> {
        let options = parse_url(url)?;
        // ring and aws-lc-rs are both in the graph: rustls needs to be told which to use.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut loader = loader.timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                // Long enough for the longest long poll (20 s) plus the answer.
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
        if let Some(region) = &options.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(invalid_url(
                url,
                "no AWS region: give one in the URL (sns-sqs://REGION) or set AWS_REGION",
            ));
        }
        Ok(SnsSqsBus {
            sns: aws_sdk_sns::Client::new(&config),
            sqs: aws_sdk_sqs::Client::new(&config),
            wait_secs: options.wait_secs,
            topic_arns: Mutex::new(HashMap::new()),
            arn_prefix: Mutex::new(None),
            resolving: tokio::sync::Mutex::new(()),
        })
    }

    fn remember_arn(&self, topic: &str, arn: &str) {
        if let Some((prefix, _)) = arn.rsplit_once(':') {
            lock(&self.arn_prefix).get_or_insert_with(|| format!("{prefix}:"));
        }
        lock(&self.topic_arns).insert(topic.to_string(), arn.to_string());
    }

    fn forget_arn(&self, topic: &str) {
        lock(&self.topic_arns).remove(topic);
    }

    /// The ARN of an existing topic, or `MissingTopic`.
    async fn topic_arn(&self, topic: &str) -> Result<String, BusError> {
        if let Some(arn) = lock(&self.topic_arns).get(topic) {
            return Ok(arn.clone());
        }
        let _turn = self.resolving.lock().await;
        if let Some(arn) = lock(&self.topic_arns).get(topic) {
            return Ok(arn.clone());
        }
        let name = topic_name(topic);
        let prefix = lock(&self.arn_prefix).clone();
        let found = match prefix {
            Some(prefix) => {
                let arn = format!("{prefix}{name}");
                match self.sns.get_topic_attributes().topic_arn(&arn).send().await {
                    Ok(_) => Some(arn),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_not_found_exception()) =>
                    {
                        None
                    }
                    Err(e) => {
                        return Err(backend(format!(
                            "looking up SNS topic {name} (topic {topic:?}): {}",
                            sdk(e)
                        )))
                    }
                }
            }
            None => self.find_topic_arn(topic, &name).await?,
        };
        match found {
            Some(arn) => {
                self.remember_arn(topic, &arn);
                Ok(arn)
            }
            None => Err(BusError::MissingTopic {
                topic: topic.to_string(),
            }),
        }
    }

    /// Lists topics until one is named `name`.
    async fn find_topic_arn(&self, topic: &str, name: &str) -> Result<Option<String>, BusError> {
        let mut pages = self.sns.list_topics().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                backend(format!(
                    "listing SNS topics to find {name} (topic {topic:?}): {}",
                    sdk(e)
                ))
            })?;
            for arn in page.topics().iter().filter_map(|t| t.topic_arn()) {
                if lock(&self.arn_prefix).is_none() {
                    if let Some((prefix, _)) = arn.rsplit_once(':') {
                        *lock(&self.arn_prefix) = Some(format!("{prefix}:"));
                    }
                }
                if arn.rsplit_once(':').is_some_and(|(_, n)| n == name) {
                    return Ok(Some(arn.to_string()));
                }
            }
        }
        Ok(None)
    }

    /// The URL of the group's queue, or `MissingTopic`.
    async fn queue_url(&self, topic: &str, group: &str) -> Result<String, BusError> {
        let name = queue_name(topic, group);
        match self.sqs.get_queue_url().queue_name(&name).send().await {
            Ok(out) => out
                .queue_url()
                .map(str::to_string)
                .ok_or_else(|| backend(format!("GetQueueUrl for {name} returned no URL"))),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_queue_does_not_exist()) =>
            {
                Err(missing_group(topic, group))
            }
            Err(e) => Err(backend(format!(
                "looking up SQS queue {name} (topic {topic:?}, group {group:?}): {}",
                sdk(e)
            ))),
        }
    }

    async fn queue_arn(&self, url: &str) -> Result<String, BusError> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| backend(format!("reading the ARN of queue {url}: {}", sdk(e))))?;
        out.attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .ok_or_else(|| backend(format!("queue {url} has no QueueArn attribute")))
    }

    /// Creates the SNS topic (idempotent) and returns its ARN.
    async fn ensure_topic(&self, topic: &str) -> Result<String, BusError> {
        let name = topic_name(topic);
        let mut request = self.sns.create_topic().name(&name);
        if tag_safe(topic) {
            let tag = aws_sdk_sns::types::Tag::builder()
                .key(TAG_TOPIC)
                .value(topic)
                .build()
                .map_err(backend)?;
            request = request.tags(tag);
        }
        let out = request.send().await.map_err(|e| {
            backend(format!(
                "creating SNS topic {name} (topic {topic:?}): {}",
                sdk(e)
            ))
        })?;
        let arn = out
            .topic_arn()
            .ok_or_else(|| backend(format!("CreateTopic {name} returned no ARN")))?;
        self.remember_arn(topic, arn);
        Ok(arn.to_string())
    }

    /// Creates the group's queue (idempotent) and returns its URL.
    async fn ensure_queue(&self, topic: &str, group: &str) -> Result<String, BusError> {
        let name = queue_name(topic, group);
        let mut request = self
            .sqs
            .create_queue()
            .queue_name(&name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                RETENTION.as_secs().to_string(),
            )
            .attributes(QueueAttributeName::ReceiveMessageWaitTimeSeconds, "20");
        if tag_safe(topic) {
            request = request.tags(TAG_TOPIC, topic);
        }
        if tag_safe(group) {
            request = request.tags(TAG_GROUP, group);
        }
        match request.send().await {
            Ok(out) => out
                .queue_url()
                .map(str::to_string)
                .ok_or_else(|| backend(format!("CreateQueue {name} returned no URL"))),
            // Created earlier with other attributes (by hand, or an older version): use it as is.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_queue_name_exists()) =>
            {
                self.queue_url(topic, group).await
            }
            Err(e) => Err(backend(format!(
                "creating SQS queue {name} (topic {topic:?}, group {group:?}): {}",
                sdk(e)
            ))),
        }
    }

    /// Lets the topic (and only it) send to the queue.
    async fn allow_topic(
        &self,
        queue_url: &str,
        queue_arn: &str,
        topic_arn: &str,
    ) -> Result<(), BusError> {
        let policy = format!(
            r#"{{"Version":"2012-10-17","Id":"millrace","Statement":[{{"Sid":"millrace-sns-to-sqs","Effect":"Allow","Principal":{{"Service":"sns.amazonaws.com"}},"Action":"sqs:SendMessage","Resource":"{queue_arn}","Condition":{{"ArnEquals":{{"aws:SourceArn":"{topic_arn}"}}}}}}]}}"#
        );
        self.sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::Policy, policy)
            .send()
            .await
            .map_err(|e| {
                backend(format!(
                    "setting the policy of queue {queue_url}: {}",
                    sdk(e)
                ))
            })?;
        Ok(())
    }

    /// The subscription of `queue_arn` to `topic_arn`, if any.
    async fn find_subscription(
        &self,
        topic: &str,
        topic_arn: &str,
        queue_arn: &str,
    ) -> Result<Option<String>, BusError> {
        let mut pages = self
            .sns
            .list_subscriptions_by_topic()
            .topic_arn(topic_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                if e.as_service_error()
                    .is_some_and(|e| e.is_not_found_exception())
                {
                    self.forget_arn(topic);
                    return BusError::MissingTopic {
                        topic: topic.to_string(),
                    };
                }
                backend(format!(
                    "listing the subscriptions of topic {topic:?}: {}",
                    sdk(e)
                ))
            })?;
            for sub in page.subscriptions() {
                if sub.protocol() == Some("sqs") && sub.endpoint() == Some(queue_arn) {
                    if let Some(arn) = sub.subscription_arn() {
                        return Ok(Some(arn.to_string()));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Subscribes the queue to the topic with raw delivery (idempotent).
    async fn ensure_subscription(
        &self,
        topic: &str,
        topic_arn: &str,
        queue_arn: &str,
    ) -> Result<(), BusError> {
        let subscribed = self
            .sns
            .subscribe()
            .topic_arn(topic_arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await;
        let error = match subscribed {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // SNS refuses to subscribe again with different attributes: an existing subscription
        // without raw delivery. Switch it to raw delivery.
        if !error
            .as_service_error()
            .is_some_and(|e| e.is_invalid_parameter_exception())
        {
            return Err(backend(format!(
                "subscribing {queue_arn} to topic {topic:?}: {}",
                sdk(error)
            )));
        }
        let Some(subscription) = self.find_subscription(topic, topic_arn, queue_arn).await? else {
            return Err(backend(format!(
                "subscribing {queue_arn} to topic {topic:?}: {}",
                sdk(error)
            )));
        };
        self.sns
            .set_subscription_attributes()
            .subscription_arn(&subscription)
            .attribute_name("RawMessageDelivery")
            .attribute_value("true")
            .send()
            .await
            .map_err(|e| {
                backend(format!(
                    "turning on raw delivery for {subscription}: {}",
                    sdk(e)
                ))
            })?;
        Ok(())
    }

    /// Checks that `topic` exists and, with a group, that its queue exists and is subscribed to
    /// the topic with raw delivery. `MissingTopic` names what is missing; a subscription without
    /// raw delivery is a `Backend` error (`create_topic` fixes it). Creates nothing.
    pub async fn check_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        self.check_exists(topic, group).await
    }

    async fn check_exists(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        check_name("topic", topic)?;
        self.forget_arn(topic);
        let topic_arn = self.topic_arn(topic).await?;
        let Some(group) = group else {
            return Ok(());
        };
        check_name("consumer group", group)?;
        let url = self.queue_url(topic, group).await?;
        let queue_arn = self.queue_arn(&url).await?;
        let Some(subscription) = self
            .find_subscription(topic, &topic_arn, &queue_arn)
            .await?
        else {
            return Err(BusError::MissingTopic {
                topic: format!(
                    "{topic} (group {group}: queue {} is not subscribed to it)",
                    queue_name(topic, group)
                ),
            });
        };
        let out = self
            .sns
            .get_subscription_attributes()
            .subscription_arn(&subscription)
            .send()
            .await
            .map_err(|e| backend(format!("reading subscription {subscription}: {}", sdk(e))))?;
        let raw = out
            .attributes()
            .and_then(|a| a.get("RawMessageDelivery"))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if raw {
            Ok(())
        } else {
            Err(backend(format!(
                "the subscription of group {group:?} to topic {topic:?} does not use raw message \
                 delivery (bodies would arrive wrapped in SNS JSON); run with --create-topics to \
                 fix it"
            )))
        }
    }

    /// Deletes every topic and group queue (and the topics' subscriptions) whose Millrace name
    /// starts with `prefix`. Only finds what this bus tagged (see the module documentation). For
    /// tests and development clean-up. SQS refuses to re-create a deleted queue's name for 60 s.
    pub async fn delete_topics_under(&self, prefix: &str) -> Result<(), BusError> {
        let name_prefix: String = sanitize(prefix).chars().take(NAME_PREFIX_FILTER).collect();
        // Queues.
        let mut pages = self
            .sqs
            .list_queues()
            .queue_name_prefix(&name_prefix)
            .into_paginator()
            .send();
        let mut queues = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| backend(format!("listing SQS queues: {}", sdk(e))))?;
            queues.extend(page.queue_urls().iter().cloned());
        }
        for url in queues {
            let tags = match self.sqs.list_queue_tags().queue_url(&url).send().await {
                Ok(out) => out.tags().cloned().unwrap_or_default(),
                Err(e) => {
                    warn!(backend = BACKEND, queue = %url, error = %sdk(e), "cannot read the queue's tags; left alone");
                    continue;
                }
            };
            if !tags.get(TAG_TOPIC).is_some_and(|t| t.starts_with(prefix)) {
                continue;
            }
            match self.sqs.delete_queue().queue_url(&url).send().await {
                Ok(_) => debug!(backend = BACKEND, queue = %url, "queue deleted"),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_queue_does_not_exist()) => {}
                Err(e) => return Err(backend(format!("deleting queue {url}: {}", sdk(e)))),
            }
        }
        // Topics, with their subscriptions.
        let mut pages = self.sns.list_topics().into_paginator().send();
        let mut topics = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| backend(format!("listing SNS topics: {}", sdk(e))))?;
            for arn in page.topics().iter().filter_map(|t| t.topic_arn()) {
                if arn
                    .rsplit_once(':')
                    .is_some_and(|(_, name)| name.starts_with(&name_prefix))
                {
                    topics.push(arn.to_string());
                }
            }
        }
        for arn in topics {
            let tags = match self
                .sns
                .list_tags_for_resource()
                .resource_arn(&arn)
                .send()
                .await
            {
                Ok(out) => out.tags().to_vec(),
                Err(e) => {
                    warn!(backend = BACKEND, topic_arn = %arn, error = %sdk(e), "cannot read the topic's tags; left alone");
                    continue;
                }
            };
            let Some(topic) = tags
                .iter()
                .find(|t| t.key() == TAG_TOPIC)
                .map(|t| t.value().to_string())
                .filter(|t| t.starts_with(prefix))
            else {
                continue;
            };
            let mut pages = self
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(&arn)
                .into_paginator()
                .send();
            let mut subscriptions = Vec::new();
            while let Some(page) = pages.next().await {
                match page {
                    Ok(page) => subscriptions.extend(
                        page.subscriptions()
                            .iter()
                            .filter_map(|s| s.subscription_arn())
                            // "PendingConfirmation" is not an ARN; it goes with the topic.
                            .filter(|s| s.starts_with("arn:"))
                            .map(str::to_string),
                    ),
                    Err(e) => {
                        warn!(backend = BACKEND, topic_arn = %arn, error = %sdk(e), "cannot list the topic's subscriptions");
                        break;
                    }
                }
            }
            for subscription in subscriptions {
                if let Err(e) = self
                    .sns
                    .unsubscribe()
                    .subscription_arn(&subscription)
                    .send()
                    .await
                {
                    warn!(backend = BACKEND, %subscription, error = %sdk(e), "unsubscribe failed");
                }
            }
            self.sns
                .delete_topic()
                .topic_arn(&arn)
                .send()
                .await
                .map_err(|e| backend(format!("deleting topic {arn}: {}", sdk(e))))?;
            self.forget_arn(&topic);
            debug!(backend = BACKEND, topic_arn = %arn, "topic deleted");
        }
        Ok(())
    }
}

fn missing_group(topic: &str, group: &str) -> BusError {
    BusError::MissingTopic {
        topic: format!(
            "{topic} (group {group}: queue {})",
            queue_name(topic, group)
        ),
    }
}

#[async_trait]
impl Bus for SnsSqsBus {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_delay: true,
            lease_extension: true,
            native_attempt_count: true,
            durable: true,
            multi_process: true,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            // SNS and SQS: 256 KiB of body and attributes (names, types and values) together;
            // the rest is room for the attribute types and hex-encoded names.
            max_message_bytes: 256 * 1024 - 2048,
            max_attributes: MAX_ATTRIBUTES,
            max_attribute_value_bytes: 64 * 1024,
            max_attributes_bytes: 64 * 1024,
        }
    }

    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        check_name("topic", topic)?;
        let topic_arn = self.ensure_topic(topic).await?;
        if let Some(group) = group {
            check_name("consumer group", group)?;
            let url = self.ensure_queue(topic, group).await?;
            let queue_arn = self.queue_arn(&url).await?;
            self.allow_topic(&url, &queue_arn, &topic_arn).await?;
            self.ensure_subscription(topic, &topic_arn, &queue_arn)
                .await?;
        }
        Ok(())
    }

    async fn check_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        self.check_exists(topic, group).await
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        check_name("topic", topic)?;
        let body = body_text(topic, &message.body)?;
        let attributes = encode_attributes(topic, &message.attributes)?;
        let topic_arn = self.topic_arn(topic).await?;
        let mut request = self.sns.publish().topic_arn(&topic_arn).message(body);
        for (name, value) in attributes {
            let value = aws_sdk_sns::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(backend)?;
            request = request.message_attributes(name, value);
        }
        match request.send().await {
            Ok(out) => Ok(out.message_id().unwrap_or_default().to_string()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_not_found_exception()) =>
            {
                self.forget_arn(topic);
                Err(BusError::MissingTopic {
                    topic: topic.to_string(),
                })
            }
            Err(e) => Err(backend(format!(
                "publish to {topic:?} (SNS topic {}): {}",
                topic_name(topic),
                sdk(e)
            ))),
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        check_name("topic", topic)?;
        check_name("consumer group", &options.group)?;
        self.topic_arn(topic).await?;
        let queue_url: Arc<str> = self.queue_url(topic, &options.group).await?.into();
        let prefetch = options.prefetch.max(1);
        let shared = Arc::new(SubShared {
            state: Mutex::new(SubState::default()),
            wake_consumer: Notify::new(),
            wake_receiver: Notify::new(),
        });
        let receiver = Receiver {
            sqs: self.sqs.clone(),
            queue_url,
            topic: topic.to_string(),
            group: options.group.clone(),
            lease: options.lease,
            prefetch,
            wait_secs: self.wait_secs,
            shared: shared.clone(),
        };
        tokio::spawn(receiver.run());
        Ok(Box::new(SqsSubscription {
            shared,
            prefetch,
            lease: client_lease(options.lease),
            topic: topic.to_string(),
            group: options.group,
        }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        // `publish` returns only once SNS has accepted the message.
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

/// A message received and not yet handed out by `next`.
struct Pending {
    settle: Arc<SettleInner>,
    body: Bytes,
    attributes: Attributes,
    attempt: u32,
}

/// Why the last receive failed; shown once to the next caller of `next`.
enum Failure {
    QueueMissing,
    Other(String),
}

#[derive(Default)]
struct SubState {
    buffer: VecDeque<Pending>,
    /// Callers currently waiting in `next`.
    waiters: usize,
    /// The buffer ran low: receive ahead even though nobody waits yet.
    refill: bool,
    /// The last caller of `next` gave up waiting (its future was dropped) and nobody has called
    /// `next` since: the consumer is not reading now.
    abandoned_wait: bool,
    failure: Option<Failure>,
    closed: bool,
}

impl SubState {
    /// Nobody wants what the receive in flight brings, whether it was made for a caller of
    /// `next` or to read ahead: a read-ahead kept for a consumer that stopped reading would hold
    /// its messages until their lease runs out.
    fn demand_gone(&self) -> bool {
        self.closed || (self.abandoned_wait && self.waiters == 0)
    }
}

struct SubShared {
    state: Mutex<SubState>,
    /// Something was buffered, a receive failed, or the subscription closed.
    wake_consumer: Notify,
    /// There is demand, or the subscription closed.
    wake_receiver: Notify,
}

struct Receiver {
    sqs: aws_sdk_sqs::Client,
    queue_url: Arc<str>,
    topic: String,
    group: String,
    lease: Duration,
    prefetch: usize,
    wait_secs: u8,
    shared: Arc<SubShared>,
}

impl Receiver {
    /// How many messages to receive now, or `None` once closed.
    async fn wait_for_demand(&self) -> Option<usize> {
        loop {
            let notified = self.shared.wake_receiver.notified();
            {
                let mut state = lock(&self.shared.state);
                if state.closed {
                    return None;
                }
                let buffered = state.buffer.len();
                if buffered < self.prefetch && (state.waiters > 0 || state.refill) {
                    state.refill = false;
                    return Some(self.prefetch - buffered);
                }
            }
            notified.await;
        }
    }

    /// Sleeps for `backoff`, waking early on close.
    async fn pause(&self, backoff: Duration) {
        let until = Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                _ = self.shared.wake_receiver.notified() => {
                    if lock(&self.shared.state).closed {
                        return;
                    }
                }
            }
        }
    }

    async fn run(self) {
        let visibility = visibility_for(self.lease);
        let lease = client_lease(self.lease);
        let mut backoff = Duration::from_millis(100);
        // Slow start: one message first, doubling while receives are fast.
        let mut batch = 1;
        while let Some(want) = self.wait_for_demand().await {
            let sent = Instant::now();
            let received = self
                .sqs
                .receive_message()
                .queue_url(&*self.queue_url)
                .max_number_of_messages(i32::try_from(want.min(batch)).unwrap_or(1))
                .wait_time_seconds(i32::from(self.wait_secs))
                .visibility_timeout(secs_i32(visibility))
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_attribute_names("All")
                .send()
                .await;
            let messages = match received {
                Ok(out) => {
                    backoff = Duration::from_millis(100);
                    out.messages.unwrap_or_default()
                }
                Err(e) => {
                    let missing = e
                        .as_service_error()
                        .is_some_and(|e| e.is_queue_does_not_exist());
                    let error = sdk(e);
                    warn!(backend = BACKEND, topic = %self.topic, group = %self.group, %error, retry_in = ?backoff, "receive failed");
                    lock(&self.shared.state).failure = Some(if missing {
                        Failure::QueueMissing
                    } else {
                        Failure::Other(error)
                    });
                    self.shared.wake_consumer.notify_one();
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            batch = next_batch(batch, messages.len(), sent.elapsed());
            let deadline = sent + lease;
            let mut unwanted = Vec::new();
            for message in messages {
                let Some(pending) = self.pending(message, deadline) else {
                    continue;
                };
                let mut state = lock(&self.shared.state);
                if state.demand_gone() {
                    unwanted.push(pending);
                } else {
                    state.buffer.push_back(pending);
                    drop(state);
                    self.shared.wake_consumer.notify_one();
                }
            }
            if !unwanted.is_empty() {
                debug!(backend = BACKEND, topic = %self.topic, count = unwanted.len(), "nobody waits for these any more; handing them back");
                futures::future::join_all(unwanted.into_iter().map(|p| p.settle.hand_back())).await;
            }
        }
        debug!(backend = BACKEND, topic = %self.topic, group = %self.group, "receiver stopped");
    }

    fn pending(&self, message: aws_sdk_sqs::types::Message, deadline: Instant) -> Option<Pending> {
        let Some(receipt) = message.receipt_handle() else {
            warn!(backend = BACKEND, topic = %self.topic, "message without a receipt handle; skipped (it returns after its visibility timeout)");
            return None;
        };
        let attempt = message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        let settle = Arc::new(SettleInner {
            sqs: self.sqs.clone(),
            queue_url: self.queue_url.clone(),
            receipt: receipt.to_string(),
            message_id: message.message_id().unwrap_or_default().to_string(),
            state: Mutex::new(SettleState {
                deadline,
                settled: false,
                extending: 0,
            }),
            changed: Notify::new(),
        });
        spawn_watcher(settle.clone());
        Some(Pending {
            attributes: decode_attributes(message.message_attributes()),
            body: Bytes::from(message.body.unwrap_or_default()),
            attempt,
            settle,
        })
    }
}

struct SqsSubscription {
    shared: Arc<SubShared>,
    prefetch: usize,
    /// The client-side lease of every delivery, counted from its receive.
    lease: Duration,
    topic: String,
    group: String,
}

/// Counts a caller waiting in `next`. Dropped without `woke` set, the caller's future was
/// dropped while waiting (a timeout, a `select!`): until `next` is called again, what the receive
/// in flight brings is unwanted.
struct Waiting<'a> {
    shared: &'a SubShared,
    woke: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.waiters = state.waiters.saturating_sub(1);
        if !self.woke && state.waiters == 0 {
            state.abandoned_wait = true;
        }
    }
}

impl SqsSubscription {
    fn take_buffer(&self) -> Vec<Pending> {
        let mut state = lock(&self.shared.state);
        state.closed = true;
        state.buffer.drain(..).collect()
    }
}

#[async_trait]
impl Subscription for SqsSubscription {
    /// Cancel safe: the buffer only changes in the synchronous step that returns the delivery.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let notified = self.shared.wake_consumer.notified();
            let waiting = {
                let mut state = lock(&self.shared.state);
                if state.closed {
                    return Err(BusError::Closed);
                }
                state.abandoned_wait = false;
                while let Some(pending) = state.buffer.pop_front() {
                    if !pending.settle.live() {
                        // Its lease ran out in the buffer; the watcher hands it back.
                        continue;
                    }
                    if state.buffer.len() < self.prefetch / 2 {
                        state.refill = true;
                        self.shared.wake_receiver.notify_one();
                    }
                    if pending.settle.remaining() < self.lease * 3 / 4 {
                        // It waited in the buffer for a good part of its lease: give it a
                        // whole lease from now, as callers expect.
                        let (settle, lease) = (pending.settle.clone(), self.lease);
                        tokio::spawn(async move {
                            if let Err(e) = settle.extend(lease).await {
                                debug!(backend = BACKEND, message_id = %settle.message_id, error = %e, "refreshing the lease of a buffered message failed");
                            }
                        });
                    }
                    return Ok(into_delivery(pending));
                }
                match state.failure.take() {
                    Some(Failure::QueueMissing) => {
                        return Err(missing_group(&self.topic, &self.group))
                    }
                    Some(Failure::Other(error)) => {
                        return Err(backend(format!("receiving: {error}")))
                    }
                    None => {}
                }
                state.waiters += 1;
                Waiting {
                    shared: &self.shared,
                    woke: false,
                }
            };
            let mut waiting = waiting;
            self.shared.wake_receiver.notify_one();
            notified.await;
            waiting.woke = true;
        }
    }

    async fn close(&mut self) -> Result<(), BusError> {
        let buffered = self.take_buffer();
        self.shared.wake_receiver.notify_one();
        self.shared.wake_consumer.notify_one();
        futures::future::join_all(buffered.into_iter().map(|p| p.settle.hand_back())).await;
        Ok(())
    }
}

impl Drop for SqsSubscription {
    fn drop(&mut self) {
        let buffered = self.take_buffer();
        self.shared.wake_receiver.notify_one();
        if buffered.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(futures::future::join_all(
                    buffered.into_iter().map(|p| p.settle.hand_back()),
                ));
            }
            Err(_) => warn!(
                backend = BACKEND,
                count = buffered.len(),
                "subscription dropped outside a runtime; buffered messages return after their visibility timeout"
            ),
        }
    }
}

fn into_delivery(pending: Pending) -> Delivery {
    let message_id = pending.settle.message_id.clone();
    Delivery::new(
        message_id,
        pending.body,
        pending.attributes,
        pending.attempt,
        Arc::new(SqsSettle {
            inner: pending.settle,
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Settling

struct SettleState {
    /// Client-side lease deadline; SQS keeps the message invisible at least a second longer.
    deadline: Instant,
    /// Acked, nacked, handed back, or lost to lease expiry: nothing more may be done with it.
    settled: bool,
    /// `extend` calls in flight (the watcher waits for them before handing the message back).
    extending: u32,
}

struct SettleInner {
    sqs: aws_sdk_sqs::Client,
    queue_url: Arc<str>,
    /// This receive's receipt handle.
    receipt: String,
    message_id: String,
    state: Mutex<SettleState>,
    /// Settled or deadline moved: wakes the watcher.
    changed: Notify,
}

impl SettleInner {
    fn lease_lost(&self) -> BusError {
        BusError::LeaseLost {
            message_id: self.message_id.clone(),
        }
    }

    /// Still ours: not settled and within the lease.
    fn live(&self) -> bool {
        let state = lock(&self.state);
        !state.settled && Instant::now() < state.deadline
    }

    /// Marks the delivery settled if its lease is still ours.
    fn claim(&self) -> Result<(), BusError> {
        {
            let mut state = lock(&self.state);
            if state.settled || Instant::now() >= state.deadline {
                return Err(self.lease_lost());
            }
            state.settled = true;
        }
        self.changed.notify_one();
        Ok(())
    }

    async fn change_visibility(&self, secs: u64) -> Result<(), BusError> {
        match self
            .sqs
            .change_message_visibility()
            .queue_url(&*self.queue_url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(secs_i32(secs))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error().is_some_and(|e| {
                    e.is_message_not_inflight() || e.is_receipt_handle_is_invalid()
                }) =>
            {
                Err(self.lease_lost())
            }
            Err(e) => Err(backend(format!(
                "message {}: changing its visibility: {}",
                self.message_id,
                sdk(e)
            ))),
        }
    }

    /// Keeps the message for `lease` from now. The old deadline holds until SQS has confirmed the
    /// new visibility, so the client-side deadline never outlives SQS's.
    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        {
            let mut state = lock(&self.state);
            if state.settled || Instant::now() >= state.deadline {
                return Err(self.lease_lost());
            }
            state.extending += 1;
        }
        let sent = Instant::now();
        let result = self.change_visibility(visibility_for(lease)).await;
        {
            let mut state = lock(&self.state);
            state.extending = state.extending.saturating_sub(1);
            match &result {
                Ok(()) if !state.settled => state.deadline = sent + client_lease(lease),
                Ok(()) => {}
                Err(BusError::LeaseLost { .. }) => state.settled = true,
                Err(_) => {}
            }
        }
        self.changed.notify_one();
        result
    }

    /// How much of the lease is left.
    fn remaining(&self) -> Duration {
        lock(&self.state)
            .deadline
            .saturating_duration_since(Instant::now())
    }

    /// Makes the message visible again at once, unless it is settled or its lease ran out.
    async fn hand_back(self: Arc<Self>) {
        if self.claim().is_err() {
            return;
        }
        self.hand_back_claimed().await;
    }

    async fn hand_back_claimed(&self) {
        if let Err(e) = self.change_visibility(0).await {
            debug!(backend = BACKEND, message_id = %self.message_id, error = %e, "hand-back failed; the message returns after its visibility timeout");
        }
    }
}

struct SqsSettle {
    inner: Arc<SettleInner>,
}

#[async_trait]
impl Settle for SqsSettle {
    async fn ack(&self) -> Result<(), BusError> {
        self.inner.claim()?;
        match self
            .inner
            .sqs
            .delete_message()
            .queue_url(&*self.inner.queue_url)
            .receipt_handle(&self.inner.receipt)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_receipt_handle_is_invalid()) =>
            {
                Err(self.inner.lease_lost())
            }
            Err(e) => Err(backend(format!(
                "message {}: delete: {}",
                self.inner.message_id,
                sdk(e)
            ))),
        }
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        self.inner.claim()?;
        let secs = ceil_secs(delay).min(MAX_VISIBILITY_SECS);
        self.inner.change_visibility(secs).await
    }

    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        self.inner.extend(lease).await
    }

    fn abandon(&self) {
        if self.inner.claim().is_err() {
            // Settled already, or the lease ran out and the watcher hands it back.
            return;
        }
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { inner.hand_back_claimed().await });
            }
            Err(_) => warn!(
                backend = BACKEND,
                message_id = %self.inner.message_id,
                "delivery dropped outside a runtime; it returns after its visibility timeout"
            ),
        }
    }
}

/// Hands the message back when its client-side lease runs out unsettled.
fn spawn_watcher(inner: Arc<SettleInner>) {
    tokio::spawn(async move {
        loop {
            let notified = inner.changed.notified();
            let wait_until = {
                let mut state = lock(&inner.state);
                if state.settled {
                    return;
                }
                if state.extending == 0 && Instant::now() >= state.deadline {
                    state.settled = true;
                    break;
                }
                (state.extending == 0).then_some(state.deadline)
            };
            match wait_until {
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = notified => {}
                    }
                }
                // An extension is in flight: wait for its outcome.
                None => notified.await,
            }
        }
        debug!(backend = BACKEND, message_id = %inner.message_id, "lease ran out; handing the message back");
        inner.hand_back_claimed().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aws_valid(name: &str, max: usize) -> bool {
        !name.is_empty()
            && name.len() <= max
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }

    #[test]
    fn millrace_topics_map_readably_and_one_to_one() {
        assert_eq!(topic_name("millrace.fac-0.intake"), "millrace_fac-0_intake");
        assert_eq!(
            topic_name("millrace.fac-0.intake.dead"),
            "millrace_fac-0_intake_dead"
        );
        assert_eq!(
            queue_name("millrace.fac-0.intake", "aggregate"),
            "millrace_fac-0_intake__aggregate"
        );
    }

    #[test]
    fn ambiguous_names_get_a_hash_and_stay_apart() {
        assert_ne!(topic_name("a.b"), topic_name("a_b"));
        assert!(
            topic_name("a_b").starts_with("a_b_h"),
            "{}",
            topic_name("a_b")
        );
        assert_ne!(queue_name("a.b", "c"), queue_name("a", "b.c"));
        assert_ne!(queue_name("a", "b__c"), queue_name("a__b", "c"));
        assert_ne!(queue_name("a.", "b"), queue_name("a", ".b"));
        assert_ne!(queue_name("t", "g_1"), queue_name("t", "g.1"));
        // Deterministic: the same everywhere, every time.
        assert_eq!(topic_name("x y/z"), topic_name("x y/z"));
        assert_eq!(
            topic_name("a_b"),
            format!("a_b_h{:016x}", fnv1a(&[b"a_b".as_slice()]))
        );
        for name in [
            topic_name("ünï.码 ✓/*>"),
            queue_name("ünï.码", "g 1"),
            queue_name("t", "g.h"),
        ] {
            assert!(aws_valid(&name, QUEUE_NAME_MAX), "{name:?}");
        }
    }

    #[test]
    fn long_names_are_cut_to_fit_and_stay_distinct() {
        let long = "millrace.".repeat(40);
        let a = topic_name(&format!("{long}a"));
        let b = topic_name(&format!("{long}b"));
        assert!(aws_valid(&a, TOPIC_NAME_MAX), "{a:?}");
        assert_eq!(a.len(), TOPIC_NAME_MAX);
        assert_ne!(a, b);
        let topic = "millrace.facilitator-0.aggregate-share-verification.intake.dead";
        let q1 = queue_name(topic, "aggregate-worker-1");
        let q2 = queue_name(topic, "aggregate-worker-2");
        assert!(aws_valid(&q1, QUEUE_NAME_MAX), "{q1:?}");
        assert_eq!(q1.len(), QUEUE_NAME_MAX);
        // The readable part is cut to 80 - 18 characters, then the hash follows.
        assert!(
            q1.starts_with(&sanitize(topic)[..QUEUE_NAME_MAX - 18]),
            "{q1}"
        );
        assert!(q1[QUEUE_NAME_MAX - 18..].starts_with("_h"), "{q1}");
        assert_ne!(q1, q2);
        // Short enough: readable, no hash.
        assert_eq!(
            queue_name("millrace.facilitator-0.intake.dead", "inspect"),
            "millrace_facilitator-0_intake_dead__inspect"
        );
    }

    #[test]
    fn attributes_that_cannot_travel_verbatim_round_trip_encoded() {
        let attributes: Attributes = [
            ("seq", "1"),
            ("traceparent", "00-abc-def-01"),
            ("note", "ünï-码 ✓ with spaces=and;symbols"),
            ("empty", ""),
            ("blank", "   "),
            ("multi line", "a\r\nb"),
            ("AWS.reserved", "x"),
            (".dot", "x"),
            ("Millrace-X-00", "mine"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let encoded = encode_attributes("t", &attributes).unwrap_or_default();
        assert_eq!(encoded.len(), attributes.len());
        for (name, value) in &encoded {
            assert!(
                name_verbatim(name) || name.starts_with(ENCODED_PREFIX),
                "{name}"
            );
            assert!(value_verbatim(value), "{name}: {value:?}");
        }
        assert!(encoded.iter().any(|(n, v)| n == "seq" && v == "1"));
        let received: HashMap<String, aws_sdk_sqs::types::MessageAttributeValue> = encoded
            .into_iter()
            .filter_map(|(name, value)| {
                aws_sdk_sqs::types::MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(value)
                    .build()
                    .ok()
                    .map(|v| (name, v))
            })
            .collect();
        assert_eq!(decode_attributes(Some(&received)), attributes);
    }

    #[test]
    fn what_sns_cannot_carry_is_refused_plainly() {
        let eleven: Attributes = (0..11)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let err = encode_attributes("t", &eleven).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("at most 10")),
            "{err:?}"
        );
        let long_name: Attributes = [("ü".repeat(100), "v".to_string())].into_iter().collect();
        assert!(encode_attributes("t", &long_name).is_err());
        assert!(body_text("t", &Bytes::from_static(b"\xff")).is_err());
        assert!(body_text("t", &Bytes::from_static(b"")).is_err());
        assert!(body_text("t", &Bytes::from_static(b"a\x00b")).is_err());
        assert!(body_text("t", &Bytes::from("{\"k\":\"ü\\t\"}\n\t")).is_ok());
    }

    #[test]
    fn slow_receives_shrink_the_batch_and_fast_ones_grow_it_back() {
        let slow = Duration::from_secs(3);
        let fast = Duration::from_millis(20);
        assert_eq!(next_batch(10, 10, slow), 5);
        assert_eq!(next_batch(5, 5, slow), 2);
        assert_eq!(next_batch(2, 1, slow), 1);
        assert_eq!(next_batch(1, 1, fast), 2);
        assert_eq!(next_batch(8, 8, fast), 10);
        // A long poll that waited for messages to arrive is not a slow server.
        assert_eq!(next_batch(10, 0, slow), 10);
        assert_eq!(next_batch(4, 4, Duration::from_millis(500)), 4);
    }

    #[test]
    fn visibility_is_whole_seconds_above_the_lease() {
        assert_eq!(visibility_for(Duration::from_millis(400)), 2);
        assert_eq!(visibility_for(Duration::from_secs(30)), 31);
        assert_eq!(visibility_for(Duration::ZERO), 1);
        assert_eq!(visibility_for(Duration::from_secs(100_000)), 43_200);
        assert!(client_lease(Duration::from_secs(100_000)) < Duration::from_secs(43_200));
    }

    #[test]
    fn urls_are_parsed_strictly() {
        let ok = |url: &str| parse_url(url).map(|o| (o.region, o.endpoint, o.wait_secs));
        assert!(matches!(
            ok("sns-sqs://us-east-1"),
            Ok((Some(r), None, DEFAULT_WAIT_SECS)) if r == "us-east-1"
        ));
        assert!(matches!(ok("sns-sqs://"), Ok((None, None, _))));
        assert!(matches!(
            ok("sns-sqs://eu-west-1?endpoint=http://127.0.0.1:5000&wait=5"),
            Ok((Some(_), Some(e), 5)) if e == "http://127.0.0.1:5000"
        ));
        for bad in [
            "amqp://x",
            "sns-sqs://us-east-1/path",
            "sns-sqs://key:secret@us-east-1",
            "sns-sqs://us-east-1?endpoint=ftp://x",
            "sns-sqs://us-east-1?wait=21",
            "sns-sqs://us-east-1?region=x",
            "sns-sqs://US_EAST",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
