//! The Google Cloud Pub/Sub backend (`pubsub://PROJECT`), through the official
//! `google-cloud-pubsub` crate.
//!
//! URL: `pubsub://PROJECT[?emulator=HOST:PORT]`. With `?emulator=` (or, failing that, the
//! `PUBSUB_EMULATOR_HOST=HOST:PORT` environment variable, which the crate itself does not read)
//! every client talks plain HTTP to the emulator with anonymous credentials. Otherwise the clients
//! use the service's default endpoint with Application Default Credentials (workload identity,
//! `GOOGLE_APPLICATION_CREDENTIALS`, the metadata server); credentials are never logged.
//!
//! How the [`Bus`] port maps onto Pub/Sub:
//!
//! * **Names.** A Millrace topic becomes the Pub/Sub topic [`topic_id`]`(topic)` and a consumer
//!   group on it the subscription [`subscription_id`]`(topic, group)`, both in `PROJECT`. Pub/Sub
//!   ids must match `[A-Za-z][A-Za-z0-9-_.~+%]{2,254}` and must not start with `goog`. A topic made
//!   only of ASCII letters, digits and `-_.+`, starting with a letter, 3 to 255 characters long and
//!   not starting with `goog` (every Millrace topic, e.g. `millrace.fac-0.intake.dead`) is its own
//!   id. Any other topic becomes `x~` followed by its escaped UTF-8: every byte outside
//!   `A-Za-z0-9-.+` (so `_` too) as `_XX` in hex, which can be decoded back. (Not `%XX`: the admin
//!   API takes names in URL paths, and a `%` there is decoded by the service.) A subscription is
//!   `{topic id}~{group}`, the group escaped the same way (`x~...`) unless it is made only of
//!   `A-Za-z0-9-_.+`. Only when a name would exceed 255 characters is it cut and given a hash
//!   suffix `~~` + 16 hex digits (FNV-1a of the full Millrace name(s)); no name that is not cut
//!   contains `~~`, so cut and uncut names never collide. A cut topic id still starts with the
//!   escaped head of its topic ([`decode_topic_id`] gives it back as a prefix).
//! * **Topics and subscriptions** are created only by [`Bus::create_topic`] (idempotent:
//!   `ALREADY_EXISTS` is fine): the topic and, with a group, its subscription with a 60 s ack
//!   deadline and no expiration (the default policy would delete a subscription idle for 31 days).
//!   `publish` to a missing topic and `subscribe` to a missing topic or subscription return
//!   [`BusError::MissingTopic`]; [`PubSubBus::check_topic`] checks both up front. No dead-letter
//!   policy is attached: the worker loop dead-letters by attempt count itself (with its reason
//!   attributes), a service-side policy would need IAM grants for the Pub/Sub service agent, and
//!   a subscription created elsewhere *with* such a policy still works (its `delivery_attempt` is
//!   then used, see below).
//! * **Publish.** The body goes out as the message data, byte for byte; attributes as message
//!   attributes. One batching publisher per topic (1 ms delay threshold: `publish` waits for the
//!   server-assigned id, so batching only gathers concurrent publishes); `publish` returns the
//!   server's message id once the service has accepted the message, retrying transient failures
//!   for up to [`PUBLISH_RETRY_FOR`]. A missing topic is [`BusError::MissingTopic`]. [`Bus::flush`] flushes every
//!   publisher. Attribute keys starting with `millrace-pubsub-` are this module's bookkeeping: they
//!   are refused on publish and stripped on receipt. A message with neither data nor attributes
//!   (which Pub/Sub refuses) is sent with the bookkeeping attribute `millrace-pubsub-empty`.
//! * **Consume** with streaming pull (the crate's `MessageStream`), one stream per subscription,
//!   opened on the first `next` (a subscription nobody reads does not take messages from the
//!   group). Server-side flow control is `prefetch` outstanding messages per stream. A background
//!   task owns the stream and hands what arrives to a second task that keeps the subscription's
//!   buffer, so a cancelled `next` (a `timeout`, a `select!`) never loses a message: it stays
//!   buffered for the next call. Each subscription has its own subscriber client (and HTTP/2
//!   connection), which goes with it (see the emulator notes below).
//! * **Handing on.** A message that arrives while nobody waits in `next`, when another
//!   subscription of the same bus on the same group has a caller waiting, goes straight to that
//!   one (it stays on the lease of the stream that received it: an ack is an ack whichever client
//!   sends it). A buffered message nobody asks for is handed back: once no `next` has been waiting
//!   for [`IDLE_HANDBACK`], the buffer goes to a waiting sibling or back to the service, so that a
//!   consumer elsewhere that is asking gets it; repeated idle hand-backs back off up to
//!   [`IDLE_HANDBACK_MAX`]. "Back to the service" is a nack (ack deadline 0); with the emulator
//!   it is a republish (see below). Hand-backs of messages that were never handed out do not count
//!   as attempts.
//! * **Leases.** The crate keeps each received message's ack deadline extended (it sends
//!   `modifyAckDeadline` every few seconds, by the subscription's lease clamped to Pub/Sub's
//!   10..600 s range, for as long as the message is held). That deadline is what protects a message
//!   when this process dies. The port's lease (400 ms in the conformance suite, below Pub/Sub's
//!   whole-second, 10 s minimum) is kept client-side, as the NATS and Kafka backends do: each
//!   delivery has a deadline (`extend` moves it); when it passes unsettled the message is handed
//!   back at once (ack deadline 0) and later `ack`/`nack`/`extend` of that delivery return
//!   [`BusError::LeaseLost`]. A delivery dropped unsettled (`abandon`) is handed back the same way.
//! * **Ack** hands the ack to the crate, which sends it within 100 ms (at-least-once: an ack lost
//!   on the way means one more delivery).
//! * **Nack and delay.** The crate offers no per-message `modifyAckDeadline`, so `nack(delay)`
//!   republishes the message to its topic (same body and attributes, plus bookkeeping: the group
//!   it is for, the attempts used so far, the original message id and, for a delay, a not-before
//!   time in Unix milliseconds), and once the service has accepted the copy acks the original. The
//!   consumer that receives a copy before its not-before time holds it (its lease kept extended)
//!   without handing it out and without counting it against `prefetch`, then hands it out when it
//!   is due: the delay is kept to the millisecond and survives crashes (the copy is durable; a
//!   consumer that dies holding it lets it go to another, which waits out the rest). Like a message
//!   whose ack deadline was extended, a held copy counts against the server's flow control of the
//!   stream holding it. Delays are not limited to `modifyAckDeadline`'s 600 s; they are capped at
//!   [`MAX_DELAY`] so a copy never outlives the subscription's 7-day message retention. The copy
//!   reaches every subscription of the topic: the other groups' consumers ack it at once without
//!   handing it out (subscriptions Millrace did not create see it too). If the republish fails the
//!   original is handed back instead and `nack` returns the error.
//! * **Attempts.** `attempt` = the attempts used by earlier copies (bookkeeping attribute, so it
//!   holds across processes) + this copy's own deliveries: the service's `delivery_attempt` where it
//!   gives one (subscriptions with a dead-letter policy; it then also counts idle hand-backs), and
//!   otherwise 1 + the hand-backs after lease expiry or `abandon` counted inside this process. So a
//!   `nack` always raises the attempt by exactly one, everywhere; a lease expiry or an abandoned
//!   delivery raises it by one if the redelivery comes back to the same process (through any
//!   subscription of this bus on that group), and is not counted if it goes to another process
//!   (the emulator never gives `delivery_attempt`). The count never falls.
//! * **Close** (or dropping the subscription) stops handing out; `next` then says
//!   [`BusError::Closed`]. Deliveries already handed out stay settleable: the crate keeps their
//!   leases until they are settled. Against the service, `close` stops the stream first, then hands
//!   back what was buffered or held for a delay (so the service cannot redeliver it to the closing
//!   stream), and, when no delivery handed out is still unsettled, waits for the crate to send its
//!   pending acks. Against the emulator (which mishandles cancelled streams, below) `close` hands
//!   on what was held at once but keeps the stream open, handing on whatever still arrives, until
//!   nothing it received is out (handed out, lent or being republished) and nothing has arrived for
//!   [`DRAIN_QUIET`]; only then is the stream stopped. If messages still come back to it
//!   [`DRAIN_MAX`] after the close, it holds them instead, stops the stream once they settle
//!   ([`HOLD_SETTLE`], at most [`HOLD_MAX`]) and then nacks them.
//!
//! What the emulator does differently (found while writing this):
//!
//! * It ignores streaming pull flow control (`max_outstanding_messages`): each stream has a thread
//!   that takes every available message (up to 1,000) every [`EMULATOR_POLL`] (50 ms) and sends
//!   it. So a message goes to whichever of a subscription's streams polls first after it becomes
//!   available, which depends only on when the streams were opened: streams opened together poll
//!   together and one of them wins nearly every race. A nack becomes available on the crate's
//!   fixed 100 ms flush, so a nacked message tends to go back to the same stream however often it
//!   is nacked. Hence the in-process hand-on above, and, to hand a message to another process,
//!   a republish timed just after this stream's own poll (estimated from its last arrival), so
//!   that another stream polls first. (The service's flow control makes idle buffers rare.)
//! * It never notices a stream the client cancels (its handler for `RST_STREAM` fails inside
//!   grpc-java, see its log), so the dead stream's thread keeps taking messages, which come back
//!   only after their ack deadline. It stops once the HTTP/2 connection closes. Hence each
//!   subscription's own connection, closed right after its stream stops, and the draining close
//!   above: the stream is cancelled only once nothing is on its way to it. (In the rare case that
//!   a closing stream keeps winning every race, the messages it holds at the end are nacked just
//!   before its connection closes and may still be taken by the dead stream: they come back after
//!   the ack deadline, the lease clamped to 10..600 s.)
//! * It never fills in `delivery_attempt`.
//! * Its admin API is HTTP/JSON (as the crate's admin clients use) and decodes `%XX` in the names
//!   in URL paths; hence `_XX` escapes in names.
//!
//! Capabilities: native delay (held by the service's lease, not a retry topic), lease extension
//! (client-side, with the service's lease kept alive), no native attempt count (the service counts
//! only with a dead-letter policy, which this module cannot rely on), durable, multi-process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use google_cloud_auth::credentials::anonymous::Builder as Anonymous;
use google_cloud_auth::credentials::{Builder as CredentialsBuilder, Credentials};
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicy, RetryPolicyExt};
use google_cloud_pubsub::client::{
    BasePublisher, Publisher, Subscriber, SubscriptionAdmin, TopicAdmin,
};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::{ExpirationPolicy, Message as PubSubMessage};
use google_cloud_pubsub::retry_policy::RetryableErrors;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{ShutdownBehavior, ShutdownToken};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::encoding::fnv1a;
use crate::lock;
use crate::Limits;
use crate::{
    Attributes, Bus, BusError, Capabilities, Delivery, Message, Settle, SubscribeOptions,
    Subscription,
};

const BACKEND: &str = "pubsub";
/// Prefix of this module's bookkeeping attributes; refused on publish, stripped on receipt.
pub const ATTR_PREFIX: &str = "millrace-pubsub-";
/// Bookkeeping: the attempts used before this copy of the message (set by `nack`).
const ATTR_ATTEMPTS: &str = "millrace-pubsub-attempts";
/// Bookkeeping: not to be handed out before this time (Unix milliseconds).
const ATTR_NOT_BEFORE: &str = "millrace-pubsub-not-before-ms";
/// Bookkeeping: the consumer group a republished copy is for.
const ATTR_GROUP: &str = "millrace-pubsub-group";
/// Bookkeeping: the message id of the first copy, reported as the delivery's id.
const ATTR_ID: &str = "millrace-pubsub-id";
/// Bookkeeping: marks a message that had neither data nor attributes.
const ATTR_EMPTY: &str = "millrace-pubsub-empty";
/// How long `publish` keeps retrying transient failures (the crate's own default is 10 minutes).
pub const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long admin calls (create, check, delete) keep retrying transient failures.
pub const ADMIN_RETRY_FOR: Duration = Duration::from_secs(30);
/// The ack deadline of the subscriptions `create_topic` makes (streams extend their own).
pub const SUBSCRIPTION_ACK_DEADLINE: Duration = Duration::from_secs(60);
/// How long buffered messages wait for a `next` before they are handed back to the group.
pub const IDLE_HANDBACK: Duration = Duration::from_millis(200);
/// The longest pause between idle hand-backs while nobody asks.
pub const IDLE_HANDBACK_MAX: Duration = Duration::from_secs(5);
/// The longest `nack` delay (within the default 7-day message retention).
pub const MAX_DELAY: Duration = Duration::from_secs(6 * 24 * 3600);
/// How often the emulator looks for messages to send each stream.
pub const EMULATOR_POLL: Duration = Duration::from_millis(50);
/// With the emulator, a message is passed on this long after the stream's own poll.
const PASS_ON_OFFSET: Duration = Duration::from_millis(1);
/// How long the publishers wait to gather concurrent publishes into one request.
const PUBLISH_DELAY_THRESHOLD: Duration = Duration::from_millis(1);
/// How long `close` waits for each step of shutting a stream down.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// With the emulator: a closed subscription's stream is stopped once nothing has arrived on it
/// for this long (and nothing handed out is unsettled)...
pub const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// ...but if messages keep coming back to it for this long after the close, it stops passing
/// them on and holds them...
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// ...until nothing has arrived for this long...
pub const HOLD_SETTLE: Duration = Duration::from_millis(150);
/// ...or this long has passed, then stops, and nacks what it held.
pub const HOLD_MAX: Duration = Duration::from_secs(1);
/// Longest Pub/Sub topic or subscription id.
const MAX_ID_LEN: usize = 255;
/// In-process hand-back counts kept before old ones are pruned.
const LOCAL_COUNTS_MAX: usize = 100_000;
/// In-process hand-back counts untouched this long are pruned first.
const LOCAL_COUNT_TTL: Duration = Duration::from_secs(3600);

fn backend(message: impl Display) -> BusError {
    BusError::Backend {
        backend: BACKEND,
        message: message.to_string(),
    }
}

/// Admin calls retry what the service says is transient (UNAVAILABLE, or a failure before the
/// request was sent), for at most [`ADMIN_RETRY_FOR`].
fn admin_retry() -> impl RetryPolicy {
    Aip194Strict.with_time_limit(ADMIN_RETRY_FOR)
}

fn code_of(error: &google_cloud_pubsub::Error) -> Option<Code> {
    if let Some(status) = error.status() {
        return Some(status.code);
    }
    match error.http_status_code() {
        Some(404) => Some(Code::NotFound),
        Some(409) => Some(Code::AlreadyExists),
        _ => None,
    }
}

fn is_not_found(error: &google_cloud_pubsub::Error) -> bool {
    code_of(error) == Some(Code::NotFound)
}

fn already_exists(error: &google_cloud_pubsub::Error) -> bool {
    code_of(error) == Some(Code::AlreadyExists)
}

// ---------------------------------------------------------------------------------------------
// Names

/// Characters a verbatim name may have (ids also allow `~`, our separator, and `%`, which the
/// service decodes in URL paths).
fn plain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

/// Characters an escaped name keeps as they are (`_` is the escape).
fn unescaped_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'+')
}

fn is_plain_topic(topic: &str) -> bool {
    (3..=MAX_ID_LEN).contains(&topic.len())
        && topic.starts_with(|c: char| c.is_ascii_alphabetic())
        && topic.chars().all(plain_char)
        && !topic.to_ascii_lowercase().starts_with("goog")
}

fn is_plain_group(group: &str) -> bool {
    !group.is_empty() && group.chars().all(plain_char)
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if unescaped_char(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

fn unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if unescaped_char(bytes[i]) {
            out.push(bytes[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// `name` if it fits in an id; otherwise its head (not splitting a `_XX` escape) and `~~` plus
/// a hash of `key`. `name` is ASCII.
fn fit(name: String, key: &[&[u8]]) -> String {
    if name.len() <= MAX_ID_LEN {
        return name;
    }
    let suffix = format!("~~{:016x}", fnv1a(key));
    let mut cut = MAX_ID_LEN - suffix.len();
    let bytes = name.as_bytes();
    for back in 1..=2 {
        if cut >= back && bytes.get(cut - back) == Some(&b'_') {
            cut -= back;
            break;
        }
    }
    let head = name.get(..cut).unwrap_or_default();
    format!("{head}{suffix}")
}

/// The Pub/Sub topic id of a Millrace topic (see the module documentation).
pub fn topic_id(topic: &str) -> String {
    if is_plain_topic(topic) {
        return topic.to_string();
    }
    fit(format!("x~{}", escape(topic)), &[topic.as_bytes()])
}

/// The Pub/Sub subscription id of consumer group `group` on a Millrace topic.
pub fn subscription_id(topic: &str, group: &str) -> String {
    let group_part = if is_plain_group(group) {
        group.to_string()
    } else {
        format!("x~{}", escape(group))
    };
    fit(
        format!("{}~{group_part}", topic_id(topic)),
        &[topic.as_bytes(), group.as_bytes()],
    )
}

/// What a Pub/Sub topic id says about the Millrace topic it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodedTopic {
    /// The whole Millrace topic.
    Full(String),
    /// The id was cut (and hashed): the Millrace topic starts with this.
    Prefix(String),
}

/// Decodes a topic id made by [`topic_id`]; `None` for ids it cannot have made.
pub fn decode_topic_id(id: &str) -> Option<DecodedTopic> {
    if !id.contains('~') {
        return is_plain_topic(id).then(|| DecodedTopic::Full(id.to_string()));
    }
    let encoded = id.strip_prefix("x~")?;
    match encoded.split_once("~~") {
        Some((head, _hash)) => unescape(head).map(DecodedTopic::Prefix),
        None if !encoded.contains('~') => unescape(encoded).map(DecodedTopic::Full),
        None => None,
    }
}

fn check_names(topic: &str, group: Option<&str>) -> Result<(), BusError> {
    if topic.is_empty() {
        return Err(backend("the topic name is empty"));
    }
    if group.is_some_and(str::is_empty) {
        return Err(backend("the consumer group name is empty"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The URL

struct Config {
    project: String,
    /// `http://HOST:PORT` of the emulator, if any.
    emulator: Option<String>,
}

fn parse_url(url: &str) -> Result<Config, BusError> {
    let invalid = |reason: &str| BusError::InvalidUrl {
        url: millrace_secrets::redact(url),
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if parsed.scheme() != "pubsub" {
        return Err(invalid("expected pubsub://PROJECT[?emulator=HOST:PORT]"));
    }
    let project = parsed.host_str().unwrap_or_default().to_string();
    if project.is_empty() {
        return Err(invalid(
            "no project: expected pubsub://PROJECT[?emulator=HOST:PORT]",
        ));
    }
    if !matches!(parsed.path(), "" | "/") {
        return Err(invalid(
            "unexpected path: expected pubsub://PROJECT[?emulator=HOST:PORT]",
        ));
    }
    let mut emulator = None;
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "emulator" if !value.trim().is_empty() => emulator = Some(value.trim().to_string()),
            "emulator" => return Err(invalid("emulator= needs HOST:PORT")),
            other => {
                return Err(invalid(&format!(
                    "unknown parameter {other:?} (only emulator=HOST:PORT is understood)"
                )))
            }
        }
    }
    let emulator = emulator.or_else(|| {
        std::env::var("PUBSUB_EMULATOR_HOST")
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    });
    let emulator = emulator.map(|host| {
        if host.contains("://") {
            host
        } else {
            format!("http://{host}")
        }
    });
    Ok(Config { project, emulator })
}

// ---------------------------------------------------------------------------------------------
// The bus

/// The Google Cloud Pub/Sub bus. See the module documentation for how it maps the port.
/// Cloning is cheap; clones share the clients.
#[derive(Clone)]
pub struct PubSubBus {
    inner: Arc<BusInner>,
}

struct BusInner {
    project: String,
    emulator: Option<String>,
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
    /// How to build more clients (each subscription gets a subscriber client of its own).
    clients: Clients,
    base_publisher: BasePublisher,
    /// One batching publisher per topic id.
    publishers: Mutex<HashMap<String, Publisher>>,
    /// Hand-backs (lease expiry, abandon) per `(subscription, message id)` seen in this process.
    local_counts: Mutex<HashMap<String, LocalCount>>,
    /// The open subscriptions of this bus, by subscription path.
    groups: Mutex<HashMap<String, Vec<Weak<SubShared>>>>,
}

/// Endpoint and credentials for the clients of one bus.
struct Clients {
    /// The emulator's `http://HOST:PORT`; `None`: the service's default endpoint.
    endpoint: Option<String>,
    credentials: Credentials,
}

impl Clients {
    /// `builder` with the bus's credentials, and its endpoint if there is one.
    fn apply<B>(
        &self,
        builder: B,
        endpoint: impl FnOnce(B, String) -> B,
        credentials: impl FnOnce(B, Credentials) -> B,
    ) -> B {
        let builder = credentials(builder, self.credentials.clone());
        match &self.endpoint {
            Some(url) => endpoint(builder, url.clone()),
            None => builder,
        }
    }

    /// A subscriber client of its own for one subscription. Its own HTTP/2 connection, closed
    /// with the subscription: the emulator never notices a single cancelled stream (its
    /// RST_STREAM handling fails) and keeps sending messages into it until their ack deadline,
    /// but it does clean up when the connection closes.
    async fn subscriber(&self) -> Result<Subscriber, BusError> {
        self.apply(
            Subscriber::builder(),
            |b, v| b.with_endpoint(v),
            |b, c| b.with_credentials(c),
        )
        .build()
        .await
        .map_err(|e| backend(format!("subscriber client: {e}")))
    }
}

struct LocalCount {
    handbacks: u32,
    touched: Instant,
}

impl std::fmt::Debug for PubSubBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSubBus")
            .field("project", &self.inner.project)
            .field("emulator", &self.inner.emulator)
            .finish_non_exhaustive()
    }
}

impl PubSubBus {
    /// Builds the clients for `url` (`pubsub://PROJECT[?emulator=HOST:PORT]`). Nothing is sent
    /// to the service until the bus is used.
    pub async fn connect(url: &str) -> Result<PubSubBus, BusError> {
        let config = parse_url(url)?;
        // ring and aws-lc-rs are both in the graph; rustls needs one chosen process-wide.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let what = match &config.emulator {
            Some(endpoint) => format!("the Pub/Sub emulator at {endpoint}"),
            None => "Pub/Sub with Application Default Credentials".to_string(),
        };
        let failed = |client: &str, e: &dyn Display| backend(format!("{client} for {what}: {e}"));
        // One set of credentials for every client (and one token cache).
        let credentials = match &config.emulator {
            Some(_) => Anonymous::new().build(),
            None => CredentialsBuilder::default()
                .build()
                .map_err(|e| failed("credentials", &e))?,
        };
        let clients = Clients {
            endpoint: config.emulator.clone(),
            credentials,
        };

        let topics = clients
            .apply(
                TopicAdmin::builder().with_retry_policy(admin_retry()),
                |b, v| b.with_endpoint(v),
                |b, c| b.with_credentials(c),
            )
            .build()
            .await
            .map_err(|e| failed("topic admin client", &e))?;
        let subscriptions = clients
            .apply(
                SubscriptionAdmin::builder().with_retry_policy(admin_retry()),
                |b, v| b.with_endpoint(v),
                |b, c| b.with_credentials(c),
            )
            .build()
            .await
            .map_err(|e| failed("subscription admin client", &e))?;
        let base_publisher = clients
            .apply(
                BasePublisher::builder()
                    .with_retry_policy(RetryableErrors.with_time_limit(PUBLISH_RETRY_FOR)),
                |b, v| b.with_endpoint(v),
                |b, c| b.with_credentials(c),
            )
            .build()
            .await
            .map_err(|e| failed("publisher client", &e))?;

        debug!(backend = BACKEND, project = %config.project, emulator = ?config.emulator, "clients built");
        Ok(PubSubBus {
            inner: Arc::new(BusInner {
                project: config.project,
                emulator: config.emulator,
                clients,
                topics,
                subscriptions,
                base_publisher,
                publishers: Mutex::new(HashMap::new()),
                local_counts: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The project this bus works in.
    pub fn project(&self) -> &str {
        &self.inner.project
    }

    /// Checks that `topic` exists and, with a group, that its subscription does; otherwise
    /// [`BusError::MissingTopic`]. For a start-up check without `--create-topics`.
    pub async fn check_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        check_names(topic, group)?;
        let inner = &self.inner;
        let topic_path = inner.topic_path(topic);
        inner
            .topics
            .get_topic()
            .set_topic(&topic_path)
            .send()
            .await
            .map_err(|e| inner.admin_error(topic, &format!("looking up {topic_path}"), &e))?;
        if let Some(group) = group {
            inner.check_subscription(topic, group).await?;
        }
        Ok(())
    }

    /// Deletes every topic whose Millrace name starts with `prefix`, and its subscriptions (for
    /// tests). A topic whose id was cut is deleted only if its readable head starts with `prefix`.
    pub async fn delete_topics_under(&self, prefix: &str) -> Result<(), BusError> {
        let inner = &self.inner;
        let project_path = format!("projects/{}", inner.project);
        let mut victims = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = inner
                .topics
                .list_topics()
                .set_project(&project_path)
                .set_page_token(&page_token)
                .send()
                .await
                .map_err(|e| backend(format!("listing the topics of {project_path}: {e}")))?;
            for topic in page.topics {
                let id = topic.name.rsplit('/').next().unwrap_or_default();
                let matches = match decode_topic_id(id) {
                    Some(DecodedTopic::Full(name)) | Some(DecodedTopic::Prefix(name)) => {
                        name.starts_with(prefix)
                    }
                    None => false,
                };
                if matches {
                    victims.push(topic.name);
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        for topic_path in victims {
            let mut subscriptions = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = match inner
                    .topics
                    .list_topic_subscriptions()
                    .set_topic(&topic_path)
                    .set_page_token(&page_token)
                    .send()
                    .await
                {
                    Ok(page) => page,
                    Err(e) if is_not_found(&e) => break,
                    Err(e) => {
                        return Err(backend(format!(
                            "listing the subscriptions of {topic_path}: {e}"
                        )))
                    }
                };
                subscriptions.extend(page.subscriptions);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            for subscription in subscriptions {
                match inner
                    .subscriptions
                    .delete_subscription()
                    .set_subscription(&subscription)
                    .send()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(backend(format!("deleting {subscription}: {e}"))),
                }
            }
            match inner
                .topics
                .delete_topic()
                .set_topic(&topic_path)
                .send()
                .await
            {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(backend(format!("deleting {topic_path}: {e}"))),
            }
            let id = topic_path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            lock(&inner.publishers).remove(&id);
        }
        Ok(())
    }
}

impl BusInner {
    fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{}", self.project, topic_id(topic))
    }

    fn subscription_path(&self, topic: &str, group: &str) -> String {
        format!(
            "projects/{}/subscriptions/{}",
            self.project,
            subscription_id(topic, group)
        )
    }

    fn admin_error(&self, topic: &str, doing: &str, e: &google_cloud_pubsub::Error) -> BusError {
        if is_not_found(e) {
            BusError::MissingTopic {
                topic: topic.to_string(),
            }
        } else {
            backend(format!("{doing}: {e}"))
        }
    }

    /// The subscription of `group` on `topic` exists and is still attached to a topic.
    async fn check_subscription(&self, topic: &str, group: &str) -> Result<String, BusError> {
        let path = self.subscription_path(topic, group);
        let subscription = self
            .subscriptions
            .get_subscription()
            .set_subscription(&path)
            .send()
            .await
            .map_err(|e| self.admin_error(topic, &format!("looking up {path}"), &e))?;
        if subscription.topic != self.topic_path(topic) {
            // `_deleted-topic_` once its topic is gone.
            return Err(BusError::MissingTopic {
                topic: topic.to_string(),
            });
        }
        Ok(path)
    }

    fn publisher(&self, topic: &str) -> Publisher {
        let id = topic_id(topic);
        let mut publishers = lock(&self.publishers);
        if let Some(publisher) = publishers.get(&id) {
            return publisher.clone();
        }
        let publisher = self
            .base_publisher
            .publisher(self.topic_path(topic))
            .set_delay_threshold(PUBLISH_DELAY_THRESHOLD)
            .build();
        publishers.insert(id, publisher.clone());
        publisher
    }

    /// Publishes `body` with `attributes` (bookkeeping included) and waits for the message id.
    async fn publish_raw(
        &self,
        topic: &str,
        body: Bytes,
        mut attributes: HashMap<String, String>,
    ) -> Result<String, BusError> {
        if body.is_empty() && attributes.is_empty() {
            attributes.insert(ATTR_EMPTY.to_string(), "1".to_string());
        }
        let message = PubSubMessage::new()
            .set_data(body)
            .set_attributes(attributes);
        match self.publisher(topic).publish(message).await {
            Ok(id) => Ok(id),
            Err(PublishError::Rpc(e)) if is_not_found(&e) => Err(BusError::MissingTopic {
                topic: topic.to_string(),
            }),
            Err(e) => Err(backend(format!("publishing to {topic:?}: {e}"))),
        }
    }

    fn count_key(subscription: &str, message_id: &str) -> String {
        format!("{subscription}\n{message_id}")
    }

    fn local_handbacks(&self, subscription: &str, message_id: &str) -> u32 {
        lock(&self.local_counts)
            .get(&Self::count_key(subscription, message_id))
            .map_or(0, |c| c.handbacks)
    }

    fn count_handback(&self, subscription: &str, message_id: &str) {
        let now = Instant::now();
        let mut counts = lock(&self.local_counts);
        if counts.len() >= LOCAL_COUNTS_MAX {
            counts.retain(|_, c| now.duration_since(c.touched) < LOCAL_COUNT_TTL);
            if counts.len() >= LOCAL_COUNTS_MAX {
                counts.clear();
            }
        }
        let count = counts
            .entry(Self::count_key(subscription, message_id))
            .or_insert(LocalCount {
                handbacks: 0,
                touched: now,
            });
        count.handbacks = count.handbacks.saturating_add(1);
        count.touched = now;
    }

    fn forget_handbacks(&self, subscription: &str, message_id: &str) {
        lock(&self.local_counts).remove(&Self::count_key(subscription, message_id));
    }
}

#[async_trait]
impl Bus for PubSubBus {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_delay: true,
            lease_extension: true,
            native_attempt_count: false,
            durable: true,
            multi_process: true,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            // Pub/Sub: 10 MB of data and attributes together per message.
            max_message_bytes: 10_000_000 - 64 * 1024,
            // 100 attributes per message, less the ones this backend keeps for itself.
            max_attributes: 100 - 6,
            // Attribute values are at most 1024 bytes (keys 256).
            max_attribute_value_bytes: 1024,
            max_attributes_bytes: 64 * 1024,
        }
    }

    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        check_names(topic, group)?;
        let inner = &self.inner;
        let topic_path = inner.topic_path(topic);
        match inner
            .topics
            .create_topic()
            .set_name(&topic_path)
            .send()
            .await
        {
            Ok(_) => debug!(backend = BACKEND, %topic, %topic_path, "topic created"),
            Err(e) if already_exists(&e) => {}
            Err(e) => return Err(backend(format!("creating {topic_path}: {e}"))),
        }
        if let Some(group) = group {
            let path = inner.subscription_path(topic, group);
            let deadline = i32::try_from(SUBSCRIPTION_ACK_DEADLINE.as_secs()).unwrap_or(60);
            match inner
                .subscriptions
                .create_subscription()
                .set_name(&path)
                .set_topic(&topic_path)
                .set_ack_deadline_seconds(deadline)
                .set_expiration_policy(ExpirationPolicy::new())
                .send()
                .await
            {
                Ok(_) => {
                    debug!(backend = BACKEND, %topic, %group, subscription = %path, "subscription created")
                }
                Err(e) if already_exists(&e) => {}
                Err(e) => return Err(inner.admin_error(topic, &format!("creating {path}"), &e)),
            }
        }
        Ok(())
    }

    async fn check_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        // The inherent method of the same name.
        PubSubBus::check_topic(self, topic, group).await
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        check_names(topic, None)?;
        if let Some(key) = message
            .attributes
            .keys()
            .find(|k| k.starts_with(ATTR_PREFIX))
        {
            return Err(backend(format!(
                "attribute {key:?}: the prefix {ATTR_PREFIX:?} is reserved for the bus's bookkeeping"
            )));
        }
        let attributes = message.attributes.into_iter().collect();
        self.inner
            .publish_raw(topic, message.body, attributes)
            .await
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        check_names(topic, Some(&options.group))?;
        let path = self.inner.check_subscription(topic, &options.group).await?;
        let client = self.inner.clients.subscriber().await?;
        let now = Instant::now();
        let shared = Arc::new(SubShared {
            bus: self.inner.clone(),
            topic: topic.to_string(),
            group: options.group.clone(),
            path,
            lease: options.lease,
            prefetch: options.prefetch.max(1),
            emulator: self.inner.emulator.is_some(),
            state: Mutex::new(SubState {
                started: false,
                closed_at: None,
                holding: false,
                stopping: false,
                ready: VecDeque::new(),
                parked: BTreeMap::new(),
                seq: 0,
                handed_out: 0,
                waiters: 0,
                last_demand: now,
                last_handback: None,
                idle_rounds: 0,
                last_arrival: now,
                lent: 0,
                passing: 0,
                token: None,
                fault: None,
            }),
            wake_consumer: Notify::new(),
            wake_pump: Notify::new(),
            wake_reader: Notify::new(),
        });
        lock(&self.inner.groups)
            .entry(shared.path.clone())
            .or_default()
            .push(Arc::downgrade(&shared));
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read(shared.clone(), client, tx));
        let pump = tokio::spawn(pump(shared.clone(), rx));
        Ok(Box::new(PubSubSubscription {
            shared,
            reader: Some(reader),
            pump: Some(pump),
        }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        let publishers: Vec<Publisher> = lock(&self.inner.publishers).values().cloned().collect();
        futures::future::join_all(publishers.iter().map(Publisher::flush)).await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// A message as received, bookkeeping parsed out.
struct Pending {
    handler: Handler,
    /// The id of this copy (what the service redelivers under).
    physical_id: String,
    /// The id reported to the caller: the first copy's.
    message_id: String,
    body: Bytes,
    attributes: Attributes,
    /// Attempts used by earlier copies.
    base_attempts: u32,
    /// The service's `delivery_attempt`, where it gives one.
    native_attempt: Option<u32>,
    /// Not to be handed out before this (Unix milliseconds), for a delayed copy.
    not_before_ms: Option<u64>,
    /// Set once the message has moved to another subscription than the one whose stream
    /// received it: that stream must stay up until the message is settled.
    lent: Option<Lent>,
}

impl Pending {
    /// The attempts this message has used so far (its next delivery is this + 1).
    fn attempts_used(&self, shared: &SubShared) -> u32 {
        match self.native_attempt {
            Some(native) => self.base_attempts.saturating_add(native - 1),
            None => self
                .base_attempts
                .saturating_add(shared.bus.local_handbacks(&shared.path, &self.physical_id)),
        }
    }
}

/// Counts a message lent by the subscription whose stream received it to a sibling; the count
/// drops when the message is settled or passed on (when this is dropped).
struct Lent {
    origin: Arc<SubShared>,
}

impl Lent {
    fn new(origin: Arc<SubShared>) -> Lent {
        lock(&origin.state).lent += 1;
        Lent { origin }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let closed = {
            let mut state = lock(&self.origin.state);
            state.lent = state.lent.saturating_sub(1);
            state.closed()
        };
        if closed {
            self.origin.wake_pump.notify_one();
        }
    }
}

/// How a subscription hands back a message it will not hand out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HandOn {
    /// Republish it (with the emulator; a nack on the service).
    PassOn,
    /// Nack it.
    Nack,
}

struct SubShared {
    bus: Arc<BusInner>,
    topic: String,
    group: String,
    /// `projects/P/subscriptions/S`.
    path: String,
    lease: Duration,
    prefetch: usize,
    /// Talking to the emulator: hand messages back by republishing them at a chosen moment, and
    /// on close keep the stream open (passing on whatever arrives) until it has gone quiet,
    /// instead of cancelling it at once (see the module documentation).
    emulator: bool,
    state: Mutex<SubState>,
    /// Something for `next`: a message, a fault, or the close.
    wake_consumer: Notify,
    /// The pump's timers may have changed (a waiter left, a delivery was settled, a close).
    wake_pump: Notify,
    /// The first `next`, or the close.
    wake_reader: Notify,
}

struct SubState {
    /// The first `next` has been called: the stream is (to be) open.
    started: bool,
    /// When `close` was called (or the subscription dropped).
    closed_at: Option<Instant>,
    /// Closed, and no longer passing on what arrives: holding it until the stream has stopped.
    holding: bool,
    /// The stream has been told to stop.
    stopping: bool,
    /// Due messages not yet handed out, oldest first.
    ready: VecDeque<Pending>,
    /// Copies waiting out a `nack` delay, by due time.
    parked: BTreeMap<(Instant, u64), Pending>,
    seq: u64,
    /// Deliveries handed out and not yet settled (or lost).
    handed_out: usize,
    /// Messages this stream received that a sibling subscription holds.
    lent: usize,
    /// Messages being passed on (republished) right now.
    passing: usize,
    /// Callers waiting in `next` (0 or 1).
    waiters: usize,
    /// When a caller last asked (entered or left `next`).
    last_demand: Instant,
    /// When the buffer was last handed back for want of demand.
    last_handback: Option<Instant>,
    /// Idle hand-backs since the last demand (for the back-off).
    idle_rounds: u32,
    /// When the stream last delivered something.
    last_arrival: Instant,
    /// Stops the current stream.
    token: Option<ShutdownToken>,
    /// A stream failure for `next` to report (once).
    fault: Option<BusError>,
}

impl SubState {
    fn closed(&self) -> bool {
        self.closed_at.is_some()
    }

    /// When the buffer may next be handed back for want of demand (`None`: not now).
    fn idle_handback_at(&self) -> Option<Instant> {
        if self.closed() || self.waiters > 0 || self.ready.is_empty() {
            return None;
        }
        let mut at = self.last_demand + IDLE_HANDBACK;
        if let Some(last) = self.last_handback {
            if self.idle_rounds > 0 {
                let backoff = IDLE_HANDBACK
                    .saturating_mul(1u32 << self.idle_rounds.min(8))
                    .min(IDLE_HANDBACK_MAX);
                at = at.max(last + backoff);
            }
        }
        Some(at)
    }

    /// When a closed subscription's draining stream may be stopped (`None`: not yet known):
    /// once nothing is out, and nothing has arrived for [`DRAIN_QUIET`]; once it is holding what
    /// arrives, for [`HOLD_SETTLE`] (or at the latest [`HOLD_MAX`] after it began to).
    fn stop_at(&self) -> Option<Instant> {
        let closed_at = self.closed_at?;
        if self.stopping || self.handed_out > 0 || self.lent > 0 || self.passing > 0 {
            return None;
        }
        if self.holding {
            Some((self.last_arrival + HOLD_SETTLE).min(closed_at + DRAIN_MAX + HOLD_MAX))
        } else {
            Some(self.last_arrival + DRAIN_QUIET)
        }
    }

    /// When a closed subscription whose stream still gets messages stops passing them on.
    fn hold_at(&self) -> Option<Instant> {
        match self.closed_at {
            Some(closed_at) if !self.holding && !self.stopping => Some(closed_at + DRAIN_MAX),
            _ => None,
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        [
            self.parked.keys().next().map(|(due, _)| *due),
            self.idle_handback_at(),
            self.stop_at(),
            self.hold_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

fn copy_attributes(attributes: &Attributes) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn epoch_ms_to_due(ms: u64) -> Option<Instant> {
    let target = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    match target.duration_since(SystemTime::now()) {
        Ok(remaining) if !remaining.is_zero() => Instant::now().checked_add(remaining),
        _ => None,
    }
}

/// Unix milliseconds `delay` from now, rounded up (so a copy is never due early).
fn not_before_ms(delay: Duration) -> u64 {
    let at = SystemTime::now()
        .checked_add(delay)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let ms = u64::try_from(at.as_millis()).unwrap_or(u64::MAX);
    if at.subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    }
}

/// The first moment after `now`, `offset` past one of the emulator's polls of the stream that
/// delivered at `anchor` (its polls come every [`EMULATOR_POLL`]).
fn after_own_poll(anchor: Instant, now: Instant, offset: Duration) -> Instant {
    let period = EMULATOR_POLL.as_nanos().max(1);
    let first = anchor + offset;
    if now <= first {
        return first;
    }
    let periods = (now - first).as_nanos().div_ceil(period);
    let periods = u32::try_from(periods).unwrap_or(u32::MAX);
    first + EMULATOR_POLL.saturating_mul(periods)
}

impl SubShared {
    /// Sorts out one received message: another group's copy is acked and dropped; on a closed
    /// subscription, or one nobody waits on while a sibling does, it goes on; a copy not yet due
    /// is parked; anything else joins the buffer.
    fn accept(self: &Arc<Self>, message: PubSubMessage, handler: Handler) {
        let mut attributes = Attributes::new();
        let mut base_attempts = 0u32;
        let mut not_before = None;
        let mut group = None;
        let mut original_id = None;
        for (key, value) in message.attributes {
            match key.as_str() {
                ATTR_ATTEMPTS => base_attempts = value.parse().unwrap_or(0),
                ATTR_NOT_BEFORE => not_before = value.parse::<u64>().ok(),
                ATTR_GROUP => group = Some(value),
                ATTR_ID => original_id = Some(value),
                k if k.starts_with(ATTR_PREFIX) => {}
                _ => {
                    attributes.insert(key, value);
                }
            }
        }
        if group.as_ref().is_some_and(|g| *g != self.group) {
            // A copy republished by `nack` for another group of this topic.
            handler.ack();
            return;
        }
        let native_attempt = handler
            .delivery_attempt()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0);
        let pending = Pending {
            handler,
            message_id: original_id.unwrap_or_else(|| message.message_id.clone()),
            physical_id: message.message_id,
            body: message.data,
            attributes,
            base_attempts,
            native_attempt,
            not_before_ms: not_before,
            lent: None,
        };
        let due = not_before.and_then(epoch_ms_to_due);
        let (closed, waiting) = {
            let mut state = lock(&self.state);
            state.last_arrival = Instant::now();
            (state.closed(), state.waiters > 0)
        };
        if closed {
            self.keep(pending, None);
            return;
        }
        if due.is_none() && !waiting {
            if let Some(pending) = self.lend_to_sibling(pending) {
                self.keep(pending, due);
            }
        } else {
            self.keep(pending, due);
        }
    }

    /// Buffers (or parks, until `due`) a message. A closed subscription passes it on at once,
    /// or, once it is holding what arrives, buffers it until its stream has stopped.
    fn keep(self: &Arc<Self>, pending: Pending, due: Option<Instant>) {
        let mut state = lock(&self.state);
        if state.closed() {
            if state.holding || state.stopping {
                state.ready.push_back(pending);
            } else {
                drop(state);
                self.hand_on(vec![pending], HandOn::PassOn);
            }
            return;
        }
        match due {
            Some(due) => {
                state.seq += 1;
                let seq = state.seq;
                state.parked.insert((due, seq), pending);
            }
            None => {
                state.ready.push_back(pending);
                drop(state);
                self.wake_consumer.notify_one();
            }
        }
    }

    /// Another open subscription of this bus on the same group with a caller waiting in `next`.
    fn waiting_sibling(self: &Arc<Self>) -> Option<Arc<SubShared>> {
        let siblings: Vec<Arc<SubShared>> = {
            let mut groups = lock(&self.bus.groups);
            let list = groups.get_mut(&self.path)?;
            list.retain(|s| s.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        siblings.into_iter().find(|s| {
            !Arc::ptr_eq(s, self) && {
                let state = lock(&s.state);
                !state.closed() && state.waiters > 0
            }
        })
    }

    /// Moves a message to a sibling subscription whose caller is waiting (the message stays on
    /// this stream's lease: acks and nacks of any subscription go to the same subscription).
    /// Gives the message back if there is none.
    fn lend_to_sibling(self: &Arc<Self>, mut pending: Pending) -> Option<Pending> {
        let Some(sibling) = self.waiting_sibling() else {
            return Some(pending);
        };
        if pending.lent.is_none() {
            pending.lent = Some(Lent::new(self.clone()));
        }
        let mut state = lock(&sibling.state);
        if state.closed() {
            return Some(pending);
        }
        state.ready.push_back(pending);
        drop(state);
        sibling.wake_consumer.notify_one();
        None
    }

    /// Hands messages this subscription holds but will not hand out to the rest of the group:
    /// to a sibling subscription in this process with a caller waiting if there is one, else
    /// back to the service: with a nack, or (`PassOn`, with the emulator) a republish.
    fn hand_on(self: &Arc<Self>, messages: Vec<Pending>, how: HandOn) {
        let mut rest = Vec::new();
        for pending in messages {
            if let Some(pending) = self.lend_to_sibling(pending) {
                rest.push(pending);
            }
        }
        if rest.is_empty() {
            return;
        }
        if self.emulator && how == HandOn::PassOn {
            self.pass_on(rest);
        } else {
            for pending in rest {
                pending.handler.nack();
            }
        }
    }

    /// With the emulator: republishes messages (same id, attempts and not-before time) and acks
    /// them once the copies are accepted (or, if that fails, nacks them). The emulator gives an
    /// available message to whichever of the subscription's streams polls first (each polls
    /// every [`EMULATOR_POLL`]); nacks go out on the crate's fixed 100 ms flush, so a nacked
    /// message tends to come back to the same stream however often it is nacked. The copies are
    /// published just after this stream's own poll, so that another stream polls first.
    fn pass_on(self: &Arc<Self>, messages: Vec<Pending>) {
        let anchor = {
            let mut state = lock(&self.state);
            state.passing += messages.len();
            state.last_arrival
        };
        let shared = self.clone();
        tokio::spawn(async move {
            let at = after_own_poll(anchor, Instant::now(), PASS_ON_OFFSET);
            tokio::time::sleep_until(at).await;
            let passes = messages.into_iter().map(|pending| {
                let shared = shared.clone();
                async move {
                    let used = pending.attempts_used(&shared);
                    let mut attributes = copy_attributes(&pending.attributes);
                    attributes.insert(ATTR_GROUP.to_string(), shared.group.clone());
                    attributes.insert(ATTR_ATTEMPTS.to_string(), used.to_string());
                    attributes.insert(ATTR_ID.to_string(), pending.message_id.clone());
                    if let Some(ms) = pending.not_before_ms {
                        attributes.insert(ATTR_NOT_BEFORE.to_string(), ms.to_string());
                    }
                    match shared
                        .bus
                        .publish_raw(&shared.topic, pending.body, attributes)
                        .await
                    {
                        Ok(_) => {
                            shared
                                .bus
                                .forget_handbacks(&shared.path, &pending.physical_id);
                            pending.handler.ack();
                        }
                        Err(e) => {
                            warn!(backend = BACKEND, message_id = %pending.message_id, error = %e,
                                "passing a message on failed; nacking it instead");
                            pending.handler.nack();
                        }
                    }
                    drop(pending.lent);
                    let closed = {
                        let mut state = lock(&shared.state);
                        state.passing = state.passing.saturating_sub(1);
                        state.closed()
                    };
                    if closed {
                        shared.wake_pump.notify_one();
                    }
                }
            });
            futures::future::join_all(passes).await;
        });
    }

    /// Moves due copies to the buffer; hands the buffer on if nobody has been asking; stops a
    /// closed subscription's stream once it may.
    fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let mut handed_back = Vec::new();
        let mut stop = None;
        {
            let mut state = lock(&self.state);
            if state.closed() {
                if state.hold_at().is_some_and(|at| at <= now) {
                    debug!(backend = BACKEND, subscription = %self.path,
                        "closed, but messages keep arriving; holding them until the stream stops");
                    state.holding = true;
                }
                if state.stop_at().is_some_and(|at| at <= now) {
                    state.stopping = true;
                    stop = state.token.take();
                }
            } else {
                let mut woke = false;
                while let Some(entry) = state.parked.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let pending = entry.remove();
                    state.ready.push_back(pending);
                    woke = true;
                }
                if woke {
                    self.wake_consumer.notify_one();
                }
                if state.idle_handback_at().is_some_and(|at| at <= now) {
                    handed_back.extend(state.ready.drain(..));
                    state.last_handback = Some(now);
                    state.idle_rounds = state.idle_rounds.saturating_add(1);
                }
            }
        }
        if !handed_back.is_empty() {
            debug!(backend = BACKEND, subscription = %self.path, count = handed_back.len(),
                "nobody is asking; handing buffered messages on to the group");
            self.hand_on(handed_back, HandOn::PassOn);
        }
        if let Some(token) = stop {
            debug!(backend = BACKEND, subscription = %self.path, "closed and drained; stopping the stream");
            tokio::spawn(async move { token.shutdown().await });
        }
    }

    /// Hands on everything buffered or parked.
    fn hand_on_held(self: &Arc<Self>, how: HandOn) {
        let held: Vec<Pending> = {
            let mut state = lock(&self.state);
            let parked = std::mem::take(&mut state.parked);
            state.ready.drain(..).chain(parked.into_values()).collect()
        };
        if !held.is_empty() {
            debug!(backend = BACKEND, subscription = %self.path, count = held.len(), "closed; handing on what was held");
            self.hand_on(held, how);
        }
    }

    /// A delivery handed out is settled, lost or abandoned.
    fn release(&self) {
        let closed = {
            let mut state = lock(&self.state);
            state.handed_out = state.handed_out.saturating_sub(1);
            state.closed()
        };
        if closed {
            self.wake_pump.notify_one();
        }
    }

    fn server_lease(&self) -> Duration {
        let secs = self.lease.as_secs() + u64::from(self.lease.subsec_nanos() > 0);
        Duration::from_secs(secs.clamp(10, 600))
    }

    /// Closes the subscription (once). Returns the stream's shutdown if it was stopped at once
    /// (it completes when the crate has sent every pending ack and nack).
    fn close(self: &Arc<Self>) -> Option<JoinHandle<()>> {
        let token = {
            let mut state = lock(&self.state);
            if state.closed() {
                return None;
            }
            state.closed_at = Some(Instant::now());
            if self.emulator {
                None
            } else {
                state.stopping = true;
                state.token.take()
            }
        };
        if self.emulator {
            // The stream stays open: what was held goes on now, and so does whatever arrives
            // until the stream may be stopped.
            self.hand_on_held(HandOn::PassOn);
        }
        self.wake_reader.notify_one();
        self.wake_pump.notify_one();
        self.wake_consumer.notify_one();
        token.map(|token| tokio::spawn(async move { token.shutdown().await }))
    }
}

/// Owns the streaming pull: opens it on the first `next`, forwards what arrives to the pump, and
/// reopens it (with back-off) if it ends by itself. The subscriber client (and its connection)
/// goes with it.
async fn read(
    shared: Arc<SubShared>,
    client: Subscriber,
    tx: mpsc::UnboundedSender<(PubSubMessage, Handler)>,
) {
    loop {
        let notified = shared.wake_reader.notified();
        {
            let state = lock(&shared.state);
            if state.closed() {
                return;
            }
            if state.started {
                break;
            }
        }
        notified.await;
    }
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut stream = client
            .subscribe(&shared.path)
            .set_max_outstanding_messages(i64::try_from(shared.prefetch).unwrap_or(i64::MAX))
            .set_max_lease_extension(shared.server_lease())
            .set_max_lease(Duration::MAX)
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        let token = stream.shutdown_token();
        let stopping = {
            let mut state = lock(&shared.state);
            if !state.stopping {
                state.token = Some(token.clone());
            }
            state.stopping
        };
        if stopping {
            // Not opened yet (the stream connects on the first `next` below): nothing to drain.
            token.shutdown().await;
            return;
        }
        loop {
            match stream.next().await {
                Some(Ok(received)) => {
                    backoff = Duration::from_millis(500);
                    if tx.send(received).is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(backend = BACKEND, subscription = %shared.path, error = %e, "streaming pull failed");
                    let fault = if is_not_found(&e) {
                        BusError::MissingTopic {
                            topic: shared.topic.clone(),
                        }
                    } else {
                        backend(format!("streaming pull from {}: {e}", shared.path))
                    };
                    lock(&shared.state).fault = Some(fault);
                    shared.wake_consumer.notify_one();
                }
                None => break,
            }
        }
        drop(stream);
        let notified = shared.wake_reader.notified();
        if lock(&shared.state).closed() {
            return;
        }
        warn!(backend = BACKEND, subscription = %shared.path, retry_in = ?backoff, "streaming pull ended; reopening");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = notified => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Keeps the buffer: sorts out what the reader receives, releases delayed copies when due, hands
/// on what nobody asks for, and stops a closed subscription's stream. Once the reader is gone,
/// hands on everything still held.
async fn pump(shared: Arc<SubShared>, mut rx: mpsc::UnboundedReceiver<(PubSubMessage, Handler)>) {
    loop {
        let notified = shared.wake_pump.notified();
        let wake_at = lock(&shared.state).next_wake();
        let sleep = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = rx.recv() => match received {
                Some((message, handler)) => shared.accept(message, handler),
                None => break,
            },
            _ = sleep => {}
            _ = notified => {}
        }
        shared.maintain();
    }
    // The stream has stopped: a nack cannot bring anything back to it.
    shared.hand_on_held(HandOn::Nack);
    let path = shared.path.clone();
    let mut groups = lock(&shared.bus.groups);
    if let Some(list) = groups.get_mut(&path) {
        list.retain(|s| s.strong_count() > 0 && !std::ptr::eq(s.as_ptr(), Arc::as_ptr(&shared)));
        if list.is_empty() {
            groups.remove(&path);
        }
    }
}

struct PubSubSubscription {
    shared: Arc<SubShared>,
    reader: Option<JoinHandle<()>>,
    pump: Option<JoinHandle<()>>,
}

/// Counts a caller waiting in `next`; when it goes (woken or cancelled) the demand is recorded
/// and the pump reconsiders its idle timer.
struct Waiting<'a> {
    shared: &'a SubShared,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.shared.state);
            state.waiters = state.waiters.saturating_sub(1);
            state.last_demand = Instant::now();
        }
        self.shared.wake_pump.notify_one();
    }
}

/// Waits until a stream stopped at `close` is down and what it held has been handed on, and,
/// when nothing handed out is still unsettled, until the crate has sent its pending acks.
async fn finish_close(
    shared: Arc<SubShared>,
    reader: Option<JoinHandle<()>>,
    pump: Option<JoinHandle<()>>,
    shutdown: JoinHandle<()>,
) {
    // The reader ends once the stream has stopped; only then does the pump hand on what was
    // held, so the service cannot send it straight back to this stream.
    for (what, task) in [("reader", reader), ("pump", pump)] {
        if let Some(task) = task {
            if tokio::time::timeout(CLOSE_WAIT, task).await.is_err() {
                warn!(backend = BACKEND, subscription = %shared.path, what, "closing: task did not stop in time");
            }
        }
    }
    let idle = {
        let state = lock(&shared.state);
        state.handed_out == 0 && state.lent == 0
    };
    if idle && tokio::time::timeout(CLOSE_WAIT, shutdown).await.is_err() {
        warn!(backend = BACKEND, subscription = %shared.path, "closing: pending acks were not sent in time");
    }
}

#[async_trait]
impl Subscription for PubSubSubscription {
    /// Cancel safe: the buffer only changes in the synchronous step that returns the delivery.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        {
            let mut state = lock(&self.shared.state);
            if state.closed() {
                return Err(BusError::Closed);
            }
            if !state.started {
                state.started = true;
                drop(state);
                self.shared.wake_reader.notify_one();
            }
        }
        loop {
            let notified = self.shared.wake_consumer.notified();
            let waiting = {
                let mut state = lock(&self.shared.state);
                if state.closed() {
                    return Err(BusError::Closed);
                }
                if let Some(fault) = state.fault.take() {
                    return Err(fault);
                }
                state.last_demand = Instant::now();
                state.idle_rounds = 0;
                if let Some(pending) = state.ready.pop_front() {
                    state.handed_out += 1;
                    drop(state);
                    return Ok(into_delivery(&self.shared, pending));
                }
                state.waiters += 1;
                Waiting {
                    shared: &self.shared,
                }
            };
            notified.await;
            drop(waiting);
        }
    }

    async fn close(&mut self) -> Result<(), BusError> {
        if let Some(shutdown) = self.shared.close() {
            finish_close(
                self.shared.clone(),
                self.reader.take(),
                self.pump.take(),
                shutdown,
            )
            .await;
        }
        Ok(())
    }
}

impl Drop for PubSubSubscription {
    fn drop(&mut self) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let _guard = handle.enter();
                // The tasks finish by themselves; nothing to wait for here.
                drop(self.shared.close());
            }
            Err(_) => {
                let mut state = lock(&self.shared.state);
                if !state.closed() {
                    state.closed_at = Some(Instant::now());
                    warn!(
                        backend = BACKEND,
                        subscription = %self.shared.path,
                        "subscription dropped outside a runtime; held messages return after their ack deadline"
                    );
                }
            }
        }
    }
}

fn into_delivery(shared: &Arc<SubShared>, pending: Pending) -> Delivery {
    let attempt = pending.attempts_used(shared).saturating_add(1);
    let inner = Arc::new(SettleInner {
        shared: shared.clone(),
        message_id: pending.message_id.clone(),
        physical_id: pending.physical_id,
        body: pending.body.clone(),
        attributes: pending.attributes.clone(),
        attempt,
        _lent: pending.lent,
        state: Mutex::new(SettleState {
            deadline: Instant::now() + shared.lease,
            handler: Some(pending.handler),
        }),
    });
    tokio::spawn(watch_lease(Arc::downgrade(&inner)));
    Delivery::new(
        pending.message_id,
        pending.body,
        pending.attributes,
        attempt,
        Arc::new(PubSubSettle { inner }),
    )
}

// ---------------------------------------------------------------------------------------------
// Settling

struct SettleState {
    /// Client-side lease deadline.
    deadline: Instant,
    /// `None` once settled, abandoned or lost.
    handler: Option<Handler>,
}

struct SettleInner {
    shared: Arc<SubShared>,
    message_id: String,
    physical_id: String,
    body: Bytes,
    attributes: Attributes,
    attempt: u32,
    /// Keeps the stream that received the message up until the delivery is gone.
    _lent: Option<Lent>,
    state: Mutex<SettleState>,
}

struct PubSubSettle {
    inner: Arc<SettleInner>,
}

impl SettleInner {
    fn lease_lost(&self) -> BusError {
        BusError::LeaseLost {
            message_id: self.message_id.clone(),
        }
    }

    /// Takes the handler if the lease is still ours.
    fn take(&self) -> Result<Handler, BusError> {
        let handler = {
            let mut state = lock(&self.state);
            if Instant::now() >= state.deadline {
                return Err(self.lease_lost());
            }
            state.handler.take().ok_or_else(|| self.lease_lost())?
        };
        self.shared.release();
        Ok(handler)
    }

    /// Hands the message back to the group at once, counting the attempt in this process.
    fn hand_back(&self, handler: Handler) {
        self.shared
            .bus
            .count_handback(&self.shared.path, &self.physical_id);
        handler.nack();
    }
}

#[async_trait]
impl Settle for PubSubSettle {
    async fn ack(&self) -> Result<(), BusError> {
        let handler = self.inner.take()?;
        let shared = &self.inner.shared;
        shared
            .bus
            .forget_handbacks(&shared.path, &self.inner.physical_id);
        handler.ack();
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        let handler = self.inner.take()?;
        let inner = &self.inner;
        let shared = &inner.shared;
        let mut attributes = copy_attributes(&inner.attributes);
        attributes.insert(ATTR_GROUP.to_string(), shared.group.clone());
        attributes.insert(ATTR_ATTEMPTS.to_string(), inner.attempt.to_string());
        attributes.insert(ATTR_ID.to_string(), inner.message_id.clone());
        if !delay.is_zero() {
            attributes.insert(
                ATTR_NOT_BEFORE.to_string(),
                not_before_ms(delay.min(MAX_DELAY)).to_string(),
            );
        }
        match shared
            .bus
            .publish_raw(&shared.topic, inner.body.clone(), attributes)
            .await
        {
            Ok(copy_id) => {
                debug!(backend = BACKEND, message_id = %inner.message_id, %copy_id, ?delay, "nacked: republished");
                shared
                    .bus
                    .forget_handbacks(&shared.path, &inner.physical_id);
                handler.ack();
                Ok(())
            }
            Err(e) => {
                warn!(backend = BACKEND, message_id = %inner.message_id, error = %e,
                    "nack: republishing failed; handing the message back instead");
                inner.hand_back(handler);
                Err(e)
            }
        }
    }

    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        let mut state = lock(&self.inner.state);
        let now = Instant::now();
        if state.handler.is_none() || now >= state.deadline {
            return Err(self.inner.lease_lost());
        }
        // The crate keeps the service's ack deadline extended while the handler is held.
        state.deadline = now + lease;
        Ok(())
    }

    fn abandon(&self) {
        let handler = lock(&self.inner.state).handler.take();
        if let Some(handler) = handler {
            self.inner.shared.release();
            self.inner.hand_back(handler);
        }
    }
}

/// Hands the message back when the delivery's client-side lease runs out unsettled.
async fn watch_lease(inner: Weak<SettleInner>) {
    loop {
        let deadline = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let state = lock(&inner.state);
            if state.handler.is_none() {
                return;
            }
            state.deadline
        };
        tokio::time::sleep_until(deadline).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let handler = {
            let mut state = lock(&inner.state);
            if Instant::now() < state.deadline {
                continue;
            }
            match state.handler.take() {
                Some(handler) => handler,
                None => return,
            }
        };
        debug!(backend = BACKEND, message_id = %inner.message_id, "lease expired; handing the message back");
        inner.shared.release();
        inner.hand_back(handler);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_topics_are_their_own_ids() {
        for topic in [
            "millrace.fac-0.intake",
            "millrace.fac-0.intake.dead",
            "millrace.fac-0.intake.rejected",
            "abc",
        ] {
            assert_eq!(topic_id(topic), topic);
            assert_eq!(
                decode_topic_id(topic),
                Some(DecodedTopic::Full(topic.to_string()))
            );
        }
        assert_eq!(
            subscription_id("millrace.fac-0.intake", "workers"),
            "millrace.fac-0.intake~workers"
        );
    }

    #[test]
    fn other_topics_are_encoded_reversibly() {
        for topic in ["a", "ab", "1abc", "goog.x", "Google", "a b", "ü~%", "a~b"] {
            let id = topic_id(topic);
            assert!(id.starts_with("x~"), "{topic:?} -> {id:?}");
            assert_eq!(
                decode_topic_id(&id),
                Some(DecodedTopic::Full(topic.to_string())),
                "{topic:?} -> {id:?}"
            );
        }
    }

    #[test]
    fn long_names_are_cut_and_hashed() {
        let long = "a".repeat(300);
        let id = topic_id(&format!("{long} "));
        assert!(id.len() <= MAX_ID_LEN && id.contains("~~"), "{id}");
        assert!(
            matches!(decode_topic_id(&id), Some(DecodedTopic::Prefix(p)) if long.starts_with(&p))
        );
        let a = subscription_id(&"t".repeat(250), "group-a");
        let b = subscription_id(&"t".repeat(250), "group-b");
        assert!(a.len() <= MAX_ID_LEN && b.len() <= MAX_ID_LEN);
        assert_ne!(a, b);
    }
}
