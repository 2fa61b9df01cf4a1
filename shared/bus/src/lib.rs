//! The message bus port.
//!
//! Millrace's services talk to each other only through topics. This crate is the one small
//! interface they use for that, shaped for the hardest backends (leases that expire and can be
//! extended, delayed retry, attempt counts, dead letters), with one module per backend behind a
//! cargo feature and one conformance suite ([`conformance`]) that every backend runs.
//!
//! * [`Bus`] publishes raw bodies with string attributes and opens subscriptions.
//! * [`Subscription`] yields [`Delivery`]s; a consumer group (`SubscribeOptions::group`) shares the
//!   work between competing consumers.
//! * A [`Delivery`] is settled exactly once: [`Delivery::ack`] or [`Delivery::nack`] (with a delay
//!   before redelivery). While it is being worked on, [`Delivery::extend`] keeps the lease. A
//!   delivery dropped without being settled is handed back to the group, as if the consumer died.
//!
//! Backends differ in what they do natively; they say so in [`Capabilities`] instead of callers
//! branching on the backend's name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
/// Bodies are `Bytes`; re-exported so handlers need no direct dependency on `bytes`.
pub use bytes::Bytes;
pub use limits::Limits;

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod conformance;
pub mod dead_letters;
mod encoding;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod limits;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "pubsub")]
pub mod pubsub;
#[cfg(feature = "sns-sqs")]
pub mod sns_sqs;

/// Message metadata. Bodies stay raw; everything else (trace context, attempt, reason) travels here.
pub type Attributes = BTreeMap<String, String>;

/// Attribute set by the worker loop on messages it moves to `{topic}.dead` or `{topic}.rejected`.
pub const ATTR_REASON: &str = "millrace-reason";
/// Attribute: the attempt number at which a message was dead-lettered or rejected.
pub const ATTR_ATTEMPT: &str = "millrace-attempt";
/// Attribute: the topic a dead-lettered or rejected message came from.
pub const ATTR_ORIGIN_TOPIC: &str = "millrace-origin-topic";

/// The consumer group operators read `{topic}.dead`, `{topic}.rejected` and the results topic
/// with. Services create it beside those topics, so that on buses where a topic nobody subscribes
/// to drops its messages (SNS, Pub/Sub) what lands there is kept.
pub const INSPECT_GROUP: &str = "inspect";

/// A message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The body, exactly as it goes on the wire (for Millrace: the raw task JSON).
    pub body: Bytes,
    /// String attributes (headers).
    pub attributes: Attributes,
}

impl Message {
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            body: body.into(),
            attributes: Attributes::new(),
        }
    }

    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

/// What a backend does natively. The worker loop and the conformance suite read these; where a
/// capability is missing the backend provides the documented fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `nack(delay)` is honoured by the broker itself (otherwise: a delay queue or retry topic).
    pub native_delay: bool,
    /// Leases can be extended (otherwise: the lease is a broker-wide timeout, e.g. RabbitMQ's
    /// `consumer_timeout`, and `extend` is a no-op that must still not fail).
    pub lease_extension: bool,
    /// The broker counts delivery attempts (otherwise: the backend carries its own count in an
    /// attribute).
    pub native_attempt_count: bool,
    /// Messages survive the process that published them (false only for the in-memory bus).
    pub durable: bool,
    /// Several processes can share this bus (false only for the in-memory bus).
    pub multi_process: bool,
}

/// What a backend knows, right now, about its link to the broker; read by readiness probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Connected, or a backend without a long-lived connection (each request opens its own).
    Up,
    /// The connection is lost and the backend is reconnecting; the text says what is wrong, for
    /// a probe's answer (no secret in it).
    Lost(String),
}

impl Connection {
    pub fn is_up(&self) -> bool {
        matches!(self, Connection::Up)
    }
}

/// How a subscription behaves.
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    /// The consumer group: consumers with the same group on the same topic share its messages;
    /// each group gets every message.
    pub group: String,
    /// How long a delivery may stay unsettled before the bus hands it to another consumer.
    pub lease: Duration,
    /// How many deliveries the backend may hold for this consumer at once (prefetch). The worker
    /// loop sets it to its concurrency limit.
    pub prefetch: usize,
}

impl SubscribeOptions {
    pub fn new(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: group.into(),
            lease: Duration::from_secs(60),
            prefetch: 5,
        }
    }

    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
}

/// Locks a backend's state. The state stays consistent between statements, so a panic while
/// one caller held the lock must not wedge every later caller: the poison is ignored.
#[cfg_attr(
    not(any(
        feature = "amqp",
        feature = "kafka",
        feature = "memory",
        feature = "nats",
        feature = "pubsub",
        feature = "sns-sqs"
    )),
    allow(dead_code)
)]
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors from a bus backend.
///
/// Nothing here ever shows a secret: the URL of [`BusError::InvalidUrl`] is redacted when the
/// error is made ([`BusError::invalid_url`]) and, like every backend message, again whenever the
/// error is displayed or debug-printed (with [`millrace_secrets::redact`], the one redaction bus
/// and store URLs share), so a backend that formats a URL into a message leaks nothing either.
#[derive(thiserror::Error)]
pub enum BusError {
    /// The bus URL could not be understood. `url` is redacted.
    #[error("bus URL {:?}: {}", millrace_secrets::redact(.url), millrace_secrets::redact(.reason))]
    InvalidUrl { url: String, reason: String },
    /// A topic does not exist and the caller did not ask to create it.
    #[error("topic {topic:?} does not exist (run with --create-topics to create it)")]
    MissingTopic { topic: String },
    /// The subscription or bus was closed.
    #[error("the bus is closed")]
    Closed,
    /// The delivery can no longer be settled (its lease expired and it went to someone else).
    #[error("message {message_id}: lease lost, the message has been handed to another consumer")]
    LeaseLost { message_id: String },
    /// The backend does not support this operation.
    #[error("{backend} does not support {operation}")]
    NotSupported {
        backend: &'static str,
        operation: &'static str,
    },
    /// Anything the broker or its client said.
    #[error("{backend}: {}", millrace_secrets::redact(.message))]
    Backend {
        backend: &'static str,
        message: String,
    },
}

impl BusError {
    /// The bus URL `url` is wrong because of `reason`; the error keeps only the redacted URL.
    pub fn invalid_url(url: &str, reason: impl Into<String>) -> BusError {
        BusError::InvalidUrl {
            url: millrace_secrets::redact(url),
            reason: reason.into(),
        }
    }
}

/// As derived, but with the URL and messages redacted (`{:?}` reaches logs and test output too).
impl fmt::Debug for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use millrace_secrets::redact;
        match self {
            BusError::InvalidUrl { url, reason } => f
                .debug_struct("InvalidUrl")
                .field("url", &redact(url))
                .field("reason", &redact(reason))
                .finish(),
            BusError::MissingTopic { topic } => f
                .debug_struct("MissingTopic")
                .field("topic", topic)
                .finish(),
            BusError::Closed => f.write_str("Closed"),
            BusError::LeaseLost { message_id } => f
                .debug_struct("LeaseLost")
                .field("message_id", message_id)
                .finish(),
            BusError::NotSupported { backend, operation } => f
                .debug_struct("NotSupported")
                .field("backend", backend)
                .field("operation", operation)
                .finish(),
            BusError::Backend { backend, message } => f
                .debug_struct("Backend")
                .field("backend", backend)
                .field("message", &redact(message))
                .finish(),
        }
    }
}

/// The bus: publish and subscribe.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// A short name for logs and errors (`memory`, `amqp`, ...).
    fn name(&self) -> &'static str;

    /// What this backend does natively.
    fn capabilities(&self) -> Capabilities;

    /// What one message may carry on this backend's broker (see [`limits`]).
    fn limits(&self) -> Limits;

    /// The state of the connection to the broker, cheaply, without a round trip (readiness
    /// probes ask it often). Backends holding a connection report it (RabbitMQ and NATS
    /// exactly, Kafka as far as librdkafka tells its consumers); connectionless HTTP backends (SNS/SQS, Pub/Sub) and the in-memory bus keep this default,
    /// `Up`: for them a failing receive is the signal, which the worker loop counts.
    fn connection(&self) -> Connection {
        Connection::Up
    }

    /// Creates `topic` (and, where the backend needs one, the subscription for `group`) if missing.
    /// Idempotent. Used by `--create-topics` and by tests.
    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError>;

    /// Checks that `topic` (and, with a group, its subscription) exists, for a start-up check
    /// without `--create-topics`: `Err(BusError::MissingTopic)` names what is missing. Backends
    /// that create topics on demand (NATS, RabbitMQ, Kafka) have nothing to check.
    async fn check_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        let _ = (topic, group);
        Ok(())
    }

    /// Publishes one message; returns the broker's message id once the broker has accepted it.
    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError>;

    /// Opens a consumer on `topic` in `options.group`.
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// Waits until everything accepted by `publish` is with the broker.
    async fn flush(&self) -> Result<(), BusError>;
}

/// A consumer on one topic.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery. Waits until one is available. `Err(BusError::Closed)` once closed.
    async fn next(&mut self) -> Result<Delivery, BusError>;

    /// Stops receiving and hands back anything prefetched but not yet returned by `next`.
    /// Deliveries already returned stay settleable. Closing again is allowed: once every
    /// delivery returned is settled or dropped, `close` also waits (within bounds) until the
    /// backend has let go of the group — Kafka commits and leaves its consumer group — so that a
    /// process exiting next loses no commit and a successor joins a group that is not still
    /// waiting for this member.
    async fn close(&mut self) -> Result<(), BusError>;
}

/// The backend side of one delivery: how to settle it.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn ack(&self) -> Result<(), BusError>;
    async fn nack(&self, delay: Duration) -> Result<(), BusError>;
    async fn extend(&self, lease: Duration) -> Result<(), BusError>;
    /// Called when the delivery is dropped unsettled: hand the message back to the group at once.
    fn abandon(&self);
}

/// One received message.
pub struct Delivery {
    /// The broker's id of this message (stable across redeliveries where the broker allows).
    pub message_id: String,
    /// The raw body.
    pub body: Bytes,
    /// Attributes as published (backends strip their own bookkeeping attributes).
    pub attributes: Attributes,
    /// 1 on the first delivery, 2 on the first redelivery, ...
    pub attempt: u32,
    settle: Arc<dyn Settle>,
    settled: bool,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message_id", &self.message_id)
            .field("attempt", &self.attempt)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Delivery {
    /// Used by backends.
    pub fn new(
        message_id: String,
        body: Bytes,
        attributes: Attributes,
        attempt: u32,
        settle: Arc<dyn Settle>,
    ) -> Self {
        Delivery {
            message_id,
            body,
            attributes,
            attempt,
            settle,
            settled: false,
        }
    }

    /// Done: the message is not delivered again.
    pub async fn ack(mut self) -> Result<(), BusError> {
        self.settled = true;
        self.settle.ack().await
    }

    /// Not done: deliver again, not before `delay` has passed.
    pub async fn nack(mut self, delay: Duration) -> Result<(), BusError> {
        self.settled = true;
        self.settle.nack(delay).await
    }

    /// Still working: keep the lease for `lease` from now.
    pub async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        self.settle.extend(lease).await
    }

    /// A handle that extends this delivery's lease from another task while the delivery itself is
    /// being worked on.
    pub fn lease_keeper(&self) -> LeaseKeeper {
        LeaseKeeper {
            settle: self.settle.clone(),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.settled {
            self.settle.abandon();
        }
    }
}

/// Extends a delivery's lease from a task other than the one holding the delivery.
#[derive(Clone)]
pub struct LeaseKeeper {
    settle: Arc<dyn Settle>,
}

impl LeaseKeeper {
    pub async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        self.settle.extend(lease).await
    }
}

/// The dead-letter topic of `topic`.
pub fn dead_topic(topic: &str) -> String {
    format!("{topic}.dead")
}

/// The rejected topic of `topic`.
pub fn rejected_topic(topic: &str) -> String {
    format!("{topic}.rejected")
}

/// Opens the bus named by `url`. `memory://` is refused here: the in-memory bus only exists inside
/// one process, so it is built directly with [`memory::MemoryBus::new`] by the all-in-one demo and
/// by tests.
pub async fn connect(url: &str) -> Result<Arc<dyn Bus>, BusError> {
    // The scheme alone picks the backend, which parses the rest itself: a Kafka URL lists
    // several brokers (`kafka://h1:9096,h2:9096`), which is no URL to a URL parser.
    let scheme = match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            scheme.to_ascii_lowercase()
        }
        _ => {
            return Err(BusError::invalid_url(
                url,
                "expected SCHEME://… (amqp, amqps, nats, tls, kafka, sns-sqs, pubsub)",
            ))
        }
    };
    match scheme.as_str() {
        "memory" => Err(BusError::invalid_url(
            url,
            "the in-memory bus only works inside one process: use `millrace demo` to run \
             every service together on it, or give each service a broker URL \
             (amqp://, amqps://, nats://, kafka://, sns-sqs://, pubsub://)",
        )),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Arc::new(amqp::AmqpBus::connect(url).await?)),
        #[cfg(feature = "nats")]
        "nats" | "tls" => Ok(Arc::new(nats::NatsBus::connect(url).await?)),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(kafka::KafkaBus::connect(url).await?)),
        #[cfg(feature = "pubsub")]
        "pubsub" => Ok(Arc::new(pubsub::PubSubBus::connect(url).await?)),
        #[cfg(feature = "sns-sqs")]
        "sns-sqs" => Ok(Arc::new(sns_sqs::SnsSqsBus::connect(url).await?)),
        #[allow(unreachable_patterns)]
        "amqp" | "amqps" | "nats" | "tls" | "kafka" | "sns-sqs" | "pubsub" => Err(BusError::invalid_url(
            url,
            format!("the {scheme} backend is not built into this binary"),
        )),
        other => Err(BusError::invalid_url(
            url,
            format!(
                "unknown scheme {other:?}; expected one of memory, amqp, amqps, nats, tls, kafka, sns-sqs, pubsub"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_url_outside_one_process_is_refused_plainly() {
        let err = connect("memory://").await.err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("only works inside one process")),
            "{err:?}"
        );
        let err = connect("carrier-pigeon://x")
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("unknown scheme")),
            "{err:?}"
        );
    }
}
