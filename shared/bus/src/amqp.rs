//! The RabbitMQ backend (AMQP 0-9-1 through `lapin`).
//!
//! RabbitMQ gives us durable queues, persistent messages, manual acks, prefetch and publisher
//! confirms. It has no per-message lease, no native delay and (on classic queues) no attempt count;
//! this module builds those on top, and this comment says how and why.
//!
//! # Connecting: the URL, TLS and credentials
//!
//! ```text
//! amqp://USER@HOST[:PORT]/VHOST?password=env:AMQP_PASSWORD
//! amqps://USER@HOST[:5671]/VHOST?password=file:/run/secrets/amqp-password
//!        &cacert=/etc/millrace/bus/ca.pem&cert=/etc/millrace/bus/client.pem
//!        &key=file:/etc/millrace/bus/client-key.pem
//! ```
//!
//! * `password`: a reference, `env:VAR` or `file:PATH` (trailing newlines are dropped), never
//!   the password itself, so the URL can sit in a ConfigMap or on a command line. For local
//!   development the password may still be written in the user-info (`amqp://guest:guest@…`);
//!   it is redacted wherever the URL is shown, but do not deploy it that way.
//! * `amqps://` is AMQP over TLS (rustls, with the aws-lc-rs provider), port 5671 by default.
//!   The server certificate is checked against the platform's trust store (the system CA
//!   bundle; `SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured), which is all CloudAMQP or Amazon MQ
//!   need. `cacert=PATH` adds a PEM bundle of CAs to trust as well (a private CA).
//! * `cert=PATH` (a PEM certificate chain) with `key=file:PATH` or `key=env:VAR` (a PEM private
//!   key, PKCS#8, PKCS#1 or SEC1) presents a client certificate; add `auth_mechanism=external` to
//!   log in as the certificate's subject instead of with a password.
//! * lapin's own parameters pass through: `heartbeat`, `connection_timeout` (ms), `frame_max`,
//!   `channel_max`, `auth_mechanism` (`plain`, `amqplain`, `external`). Any other parameter is
//!   an error, so that a misspelt `pasword=` does not silently connect without one.
//!
//! Files are read and checked once, at `connect`: a missing or unparsable CA, certificate or key
//! is an `InvalidUrl` error naming the parameter and the file, never its contents. The resolved
//! password and key live only in memory, and every error and log line shows the URL through
//! [`millrace_secrets::redact`].
//!
//! # Topology
//!
//! * A topic `T` is a durable **fanout exchange** named `T` (names are used as they are; dots are
//!   fine in RabbitMQ names).
//! * A consumer group `G` on `T` is a durable **quorum queue** `T::G` bound to `T`, so every group
//!   gets every message and the consumers of one group compete for it. `::` cannot be confused with
//!   the dots inside topic names (`T.dead` group `g` is `T.dead::g`, never `T::dead.g`).
//! * Publishing before any group exists must not lose the message. `T` is declared with an
//!   **alternate exchange** `T::unrouted` (fanout) whose durable queue `T::unrouted` keeps every
//!   message that no group queue took. When a group queue is declared (`create_topic(T, Some(G))`
//!   or `subscribe`), that backlog is moved back through `T`, now routed to the group(s): the same
//!   "the first group takes the backlog" promise as the in-memory bus. We chose this over
//!   `mandatory` + returned messages because a returned message is an error the publisher can do
//!   nothing useful with (e.g. dead letters published to `{topic}.dead` before anyone reads it), and
//!   over a default queue per topic because that queue would keep a copy of *every* message forever
//!   once real groups exist; the alternate exchange only ever holds what would have been dropped.
//!
//! # Publishing
//!
//! Each message gets a random `message_id` property (returned to the caller and kept across
//! redeliveries), `delivery_mode` 2 (persistent), the raw body and the attributes as string
//! headers. The publisher channel is in confirm mode and `publish` returns only once the broker has
//! confirmed; on a dead connection it reconnects and retries for up to 30 s, then fails with
//! `BusError::Backend`. Retrying after a lost confirm can duplicate a message, which at-least-once
//! allows. `flush` waits for any confirm still outstanding on the channel.
//!
//! # Delayed retry (`nack(delay)`; RabbitMQ has no native delay)
//!
//! The delay is rounded *up* to two significant digits (600 ms stays 600 ms, 1234 ms becomes
//! 1300 ms, so jittered backoffs share a bounded set of queues) and the message is republished to a
//! wait queue `T::G::wait-{ms}ms` with `x-message-ttl = ms`, dead-lettering through the default
//! exchange back to `T::G`, and `x-expires = ms + 60 s` so unused wait queues vanish. Only after the
//! broker confirmed the copy is the original acked. Because the wait queue's TTL is the same for
//! every message in it, messages expire in order and nothing waits behind a longer delay. The
//! broker's `x-death` bookkeeping is stripped before the attributes reach the caller.
//!
//! # Attempt count
//!
//! The attempt is `x-millrace-attempt` (our header, 1 when absent) plus the quorum queue's
//! `x-delivery-count` (how often the broker itself requeued the message: consumer died, channel
//! closed, reject with requeue), or plus one if the broker only says `redelivered` (a classic queue
//! declared by someone else). Whenever this backend hands a message back itself (`nack`, lease
//! expiry) it republishes it with `x-millrace-attempt` = attempt + 1 and acks the original, so the
//! count rises by exactly one on every path; a message that keeps crashing its consumer still counts
//! up through `x-delivery-count` and reaches the dead-letter topic. A delivery dropped unsettled
//! goes back to the front of the same subscription's buffer at once and its attempt rises by one
//! locally. Both bookkeeping headers are stripped from the caller's attributes. Because part of the
//! count lives in our header, `native_attempt_count` is `false` (the count is nevertheless exact).
//!
//! # Leases (RabbitMQ has none per message)
//!
//! Leases are kept client-side. Each delivery has a deadline, starting when it arrives from the
//! broker and restarting when `next` hands it out; a small task per delivery watches it. If it
//! passes without `ack`/`nack`/`extend`, the backend itself hands the message back (republished
//! with attempt + 1, or rejected with requeue if it was never handed out), and any later `ack`,
//! `nack` or `extend` of that delivery fails with `BusError::LeaseLost`. `extend` moves the
//! deadline, so `lease_extension` is `true`.
//!
//! The broker still has its own, coarser limit: `consumer_timeout` (default 30 min), after which it
//! closes the channel of a consumer holding an unacked delivery, requeueing everything on it. A
//! lease keeper only keeps the task alive client-side; the broker does not see `extend`. Operators
//! must therefore set `consumer_timeout` (rabbitmq.conf, in ms) above the longest task. From
//! RabbitMQ 3.11.15 on it can also be raised per queue (the `consumer-timeout` policy key or the
//! `x-consumer-timeout` queue/consumer argument); the 3.10 broker this was written against only has
//! the global setting, so this module sets no per-queue argument. If the broker does close the
//! channel anyway, the held deliveries are requeued and their late `ack` fails with `LeaseLost`.
//!
//! # Reconnecting
//!
//! One connection per `AmqpBus`, one confirm-mode channel for publishing and one channel per
//! subscription. When the connection or a channel dies (e.g. a broker restart), publishers and
//! subscriptions reconnect by themselves with backoff (100 ms doubling to 5 s), declare their
//! topology again and carry on. Deliveries from the dead channel were requeued by the broker;
//! settling them afterwards fails with `LeaseLost` (the message comes again, with a higher
//! attempt).
//!
//! `Subscription::close` cancels the consumer and requeues everything prefetched but not handed
//! out; deliveries already handed out stay settleable until they are dropped.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    Acker, BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::lock;
use crate::Limits;
use crate::{
    Attributes, Bus, BusError, Capabilities, Delivery, Message, Settle, SubscribeOptions,
    Subscription,
};

const BACKEND: &str = "amqp";
/// Our attempt header; stripped from the attributes handed to callers.
const HDR_ATTEMPT: &str = "x-millrace-attempt";
/// Set by quorum queues on messages the broker requeued.
const HDR_DELIVERY_COUNT: &str = "x-delivery-count";
/// How long `publish` (and the other broker operations) keep retrying through an outage.
const RETRY_FOR: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an unused wait queue outlives its delay.
const WAIT_QUEUE_GRACE_MS: u64 = 60_000;
/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

fn backend(message: impl Into<String>) -> BusError {
    BusError::Backend {
        backend: BACKEND,
        message: message.into(),
    }
}

fn short(name: &str, what: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(name).map_err(|e| backend(format!("{what} {name:?}: {e}")))
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Rounds a delay up to whole milliseconds with two significant digits (at least 1 ms).
fn bucket_ms(delay: Duration) -> u64 {
    let nanos = delay.as_nanos();
    let ms = u64::try_from(nanos.div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    let mut unit = 1u64;
    while ms / unit >= 100 {
        unit = unit.saturating_mul(10);
    }
    ms.div_ceil(unit).saturating_mul(unit)
}

/// The validated broker names of a topic (and optionally a group).
#[derive(Clone, Debug)]
struct Names {
    topic: String,
    exchange: ShortString,
    backlog: ShortString,
    queue: Option<ShortString>,
}

impl Names {
    fn new(topic: &str, group: Option<&str>) -> Result<Self, BusError> {
        if topic.is_empty() {
            return Err(backend("topic names must not be empty"));
        }
        let queue = match group {
            Some(group) => Some(short(&format!("{topic}::{group}"), "queue name")?),
            None => None,
        };
        Ok(Names {
            topic: topic.to_string(),
            exchange: short(topic, "topic name")?,
            backlog: short(&format!("{topic}::unrouted"), "queue name")?,
            queue,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and retries

/// Why one try at a broker operation failed, and whether trying again can help.
struct Failure {
    message: String,
    retriable: bool,
    /// The broker said something does not exist: declared topology must be declared again.
    not_found: bool,
}

impl From<lapin::Error> for Failure {
    fn from(error: lapin::Error) -> Self {
        let soft = match error.kind() {
            ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                AMQPErrorKind::Soft(soft) => Some(soft.clone()),
                AMQPErrorKind::Hard(_) => None,
            },
            _ => None,
        };
        let not_found = matches!(soft, Some(AMQPSoftError::NOTFOUND));
        Failure {
            message: error.to_string(),
            // A channel-level refusal (precondition failed, access refused, too large) will be
            // refused again; connection trouble and missing topology are worth another try.
            retriable: soft.is_none() || not_found,
            not_found,
        }
    }
}

impl Failure {
    fn retriable(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            retriable: true,
            not_found: false,
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `RETRY_FOR` has passed, backing off from
/// 100 ms to 5 s between tries.
async fn retry<T, F, Fut>(shared: &Shared, what: &str, mut attempt: F) -> Result<T, BusError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    let mut backoff = BACKOFF_MIN;
    loop {
        // No single attempt may outlive the retry: a confirm or a connect on a connection the
        // broker dropped without a word can wait for ever. A silent attempt counts as a failure,
        // and the connection it used is given up, so the next attempt opens a new one.
        let within = deadline
            .saturating_duration_since(Instant::now())
            .max(BACKOFF_MAX);
        let failure = match tokio::time::timeout(within, attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(failure)) => failure,
            Err(_) => {
                shared.link.lock().await.take();
                Failure::retriable(format!("no answer from the broker within {within:?}"))
            }
        };
        if failure.not_found {
            shared.forget_topology();
        }
        if !failure.retriable {
            return Err(backend(format!("{what}: {}", failure.message)));
        }
        if Instant::now() + backoff > deadline {
            return Err(backend(format!(
                "{what}: still failing after {RETRY_FOR:?}: {}",
                failure.message
            )));
        }
        tracing::warn!(what, error = %failure.message, retry_in = ?backoff, "amqp operation failed");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

// ---------------------------------------------------------------------------------------------
// The connection

/// One live connection and its publisher channel.
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    publisher: Channel,
    /// Topics whose exchanges were declared on this connection.
    declared: Arc<Mutex<HashSet<String>>>,
}

struct Shared {
    target: Target,
    link: tokio::sync::Mutex<Option<Link>>,
    /// The connection of the latest link, readable without the async lock (readiness probes).
    current: Mutex<Option<Arc<Connection>>>,
    /// A reconnect started by [`Bus::connection`] is under way.
    probing: std::sync::atomic::AtomicBool,
    declared_generation: Mutex<Option<Arc<Mutex<HashSet<String>>>>>,
    consumer_seq: AtomicU64,
}

/// What to do on the publisher channel before publishing (again after a reconnect).
enum Prepare<'a> {
    Nothing,
    /// Declare the topic's exchanges once per connection.
    Topic(&'a Names),
    /// Declare a wait queue (every time: declaring also restarts its `x-expires` clock).
    WaitQueue {
        name: &'a ShortString,
        ms: u64,
        target: &'a ShortString,
    },
}

impl Shared {
    async fn open_confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// The live link, reconnecting (once) if the connection or the publisher channel is gone.
    async fn link(&self) -> Result<Link, Failure> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref() {
            if link.connection.status().connected() {
                if link.publisher.status().connected() {
                    return Ok(link.clone());
                }
                let publisher = Self::open_confirm_channel(&link.connection).await?;
                let link = Link {
                    publisher,
                    ..link.clone()
                };
                *guard = Some(link.clone());
                return Ok(link);
            }
        }
        *guard = None;
        let properties = ConnectionProperties::default().with_connection_name("millrace".into());
        let connection = self.target.connect(properties).await?;
        let publisher = Self::open_confirm_channel(&connection).await?;
        let declared = Arc::new(Mutex::new(HashSet::new()));
        *lock(&self.declared_generation) = Some(declared.clone());
        let link = Link {
            connection: Arc::new(connection),
            publisher,
            declared,
        };
        *lock(&self.current) = Some(link.connection.clone());
        *guard = Some(link.clone());
        tracing::info!("amqp: connected");
        Ok(link)
    }

    fn forget_topology(&self) {
        if let Some(declared) = lock(&self.declared_generation).as_ref() {
            lock(declared).clear();
        }
    }

    /// Publishes and waits for the broker's confirm, reconnecting and retrying for up to 30 s.
    async fn publish_confirmed(
        &self,
        routing: (&ShortString, &ShortString),
        body: &[u8],
        properties: &BasicProperties,
        prepare: Prepare<'_>,
    ) -> Result<(), BusError> {
        let (exchange, routing_key) = routing;
        let what = format!("publish to {exchange:?}/{routing_key:?}");
        retry(self, &what, || async {
            let link = self.link().await?;
            match &prepare {
                Prepare::Nothing => {}
                Prepare::Topic(names) => {
                    let known = lock(&link.declared).contains(&names.topic);
                    if !known {
                        declare_topic(&link.publisher, names).await?;
                        lock(&link.declared).insert(names.topic.clone());
                    }
                }
                Prepare::WaitQueue { name, ms, target } => {
                    let mut args = FieldTable::default();
                    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*ms as i64));
                    args.insert(
                        "x-expires".into(),
                        AMQPValue::LongLongInt(ms.saturating_add(WAIT_QUEUE_GRACE_MS) as i64),
                    );
                    args.insert(
                        "x-dead-letter-exchange".into(),
                        AMQPValue::LongString("".into()),
                    );
                    args.insert(
                        "x-dead-letter-routing-key".into(),
                        AMQPValue::LongString(target.as_str().into()),
                    );
                    link.publisher
                        .queue_declare((*name).clone(), durable_queue(), args)
                        .await?;
                }
            }
            let confirmation = link
                .publisher
                .basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
                .await?
                .await?;
            if confirmation.is_ack() {
                Ok(())
            } else {
                Err(Failure::retriable("the broker refused the message (nack)"))
            }
        })
        .await
    }

    /// Declares the topic and the group's queue and moves the topic's backlog into it.
    async fn ensure_group(&self, names: &Names) -> Result<(), BusError> {
        let what = format!(
            "declare {:?}",
            names.queue.as_ref().unwrap_or(&names.exchange)
        );
        retry(self, &what, || async {
            let link = self.link().await?;
            let channel = Self::open_confirm_channel(&link.connection).await?;
            declare_group(&channel, names).await?;
            lock(&link.declared).insert(names.topic.clone());
            let _ = channel.close(200, "done".into()).await;
            Ok(())
        })
        .await
    }

    /// Opens a channel with a consumer on the group's queue (declaring the topology first).
    async fn open_consumer(
        &self,
        names: &Names,
        prefetch: u16,
    ) -> Result<(Channel, lapin::Consumer), Failure> {
        let link = self.link().await?;
        let channel = Self::open_confirm_channel(&link.connection).await?;
        declare_group(&channel, names).await?;
        let queue = names
            .queue
            .clone()
            .ok_or_else(|| Failure::retriable("no group queue"))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let n = self.consumer_seq.fetch_add(1, Ordering::Relaxed);
        let tag = format!("millrace-{}-{n}", std::process::id());
        let consumer = channel
            .basic_consume(
                queue,
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((channel, consumer))
    }
}

/// The topic's exchange, its alternate exchange and the backlog queue behind it.
async fn declare_topic(channel: &Channel, names: &Names) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            names.backlog.clone(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            names.backlog.clone(),
            durable_queue(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            names.backlog.clone(),
            names.backlog.clone(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(names.backlog.as_str().into()),
    );
    channel
        .exchange_declare(
            names.exchange.clone(),
            ExchangeKind::Fanout,
            durable_exchange(),
            args,
        )
        .await
}

/// Declares the topic and (if named) the group's quorum queue, then hands the topic's backlog to
/// the group(s). `channel` must be in confirm mode.
async fn declare_group(channel: &Channel, names: &Names) -> Result<(), Failure> {
    declare_topic(channel, names).await?;
    let Some(queue) = names.queue.clone() else {
        return Ok(());
    };
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(queue.clone(), durable_queue(), args)
        .await?;
    channel
        .queue_bind(
            queue,
            names.exchange.clone(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Messages published while no group existed: send them through the exchange again, now that
    // it routes somewhere. Acked only once the copy is confirmed.
    while let Some(got) = channel
        .basic_get(names.backlog.clone(), BasicGetOptions::default())
        .await?
    {
        let delivery = got.delivery;
        let confirmation = channel
            .basic_publish(
                names.exchange.clone(),
                "".into(),
                BasicPublishOptions::default(),
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?
            .await?;
        if !confirmation.is_ack() {
            return Err(Failure::retriable("the broker refused a backlog message"));
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Headers

fn is_bookkeeping(key: &str) -> bool {
    key == HDR_ATTEMPT
        || key == HDR_DELIVERY_COUNT
        || key == "x-death"
        || key.starts_with("x-first-death-")
        || key.starts_with("x-last-death-")
}

fn value_to_string(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(v) => v.to_string(),
        AMQPValue::ShortShortInt(v) => v.to_string(),
        AMQPValue::ShortShortUInt(v) => v.to_string(),
        AMQPValue::ShortInt(v) => v.to_string(),
        AMQPValue::ShortUInt(v) => v.to_string(),
        AMQPValue::LongInt(v) => v.to_string(),
        AMQPValue::LongUInt(v) => v.to_string(),
        AMQPValue::LongLongInt(v) => v.to_string(),
        AMQPValue::Timestamp(v) => v.to_string(),
        AMQPValue::Float(v) => v.to_string(),
        AMQPValue::Double(v) => v.to_string(),
        _ => return None,
    })
}

fn value_to_u32(value: &AMQPValue) -> Option<u32> {
    value_to_string(value).and_then(|s| s.trim().parse().ok())
}

fn attributes_to_table(attributes: &Attributes) -> Result<FieldTable, BusError> {
    let mut table = FieldTable::default();
    for (key, value) in attributes {
        if is_bookkeeping(key) {
            return Err(backend(format!(
                "attribute {key:?} is reserved for the bus's own bookkeeping"
            )));
        }
        table.insert(
            short(key, "attribute name")?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    Ok(table)
}

fn new_message_id() -> String {
    format!("amqp-{:032x}", rand::random::<u128>())
}

// ---------------------------------------------------------------------------------------------
// The URL

/// The query parameters this backend reads itself (lapin never sees them).
const OWN_PARAMETERS: [&str; 4] = ["password", "cacert", "cert", "key"];
/// The query parameters lapin reads.
const LAPIN_PARAMETERS: [&str; 5] = [
    "heartbeat",
    "connection_timeout",
    "frame_max",
    "channel_max",
    "auth_mechanism",
];

/// Where and how to connect, as `connect` understood the URL: credentials resolved, TLS files
/// read and checked.
struct Target {
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    /// The URL as errors and logs show it (redacted).
    shown: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, BusError> {
        let invalid = |reason: String| BusError::invalid_url(url, reason);
        let mut parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let tls = match parsed.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(invalid(format!(
                    "scheme {other:?}: expected amqp:// or amqps://"
                )))
            }
        };
        let host = match parsed.host_str() {
            Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
            _ => {
                return Err(invalid(
                    "no host: expected amqp[s]://USER@HOST[:PORT]/VHOST".into(),
                ))
            }
        }
        .to_string();
        let mut own: Vec<(String, String)> = Vec::new();
        let mut passed: Vec<(String, String)> = Vec::new();
        for (name, value) in parsed.query_pairs() {
            let (name, value) = (name.into_owned(), value.into_owned());
            if OWN_PARAMETERS.contains(&name.as_str()) {
                if own.iter().any(|(n, _)| *n == name) {
                    return Err(invalid(format!("parameter {name:?} is given twice")));
                }
                own.push((name, value));
            } else if LAPIN_PARAMETERS.contains(&name.as_str()) {
                passed.push((name, value));
            } else {
                return Err(invalid(format!(
                    "unknown parameter {name:?}; expected one of {}",
                    OWN_PARAMETERS
                        .iter()
                        .chain(LAPIN_PARAMETERS.iter())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let param = |name: &str| own.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        // lapin reads the rest; the password it would find in the user-info is replaced below.
        if passed.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(passed);
        }
        let mut uri: AMQPUri = parsed.as_str().parse().map_err(|reason: String| {
            // lapin's messages may quote the URL whole.
            invalid(millrace_secrets::redact(&reason))
        })?;
        // lapin takes only a domain as the host and falls back to "localhost" for an address.
        uri.authority.host = host;
        uri.scheme = if tls {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        };
        if let Some(reference) = param("password") {
            if parsed.password().is_some() {
                return Err(invalid(
                    "a password is given both in the user-info and as password=: give only the \
                     reference"
                        .into(),
                ));
            }
            let password = millrace_secrets::resolve_setting("password", reference)
                .map_err(|e| invalid(e.to_string()))?;
            uri.authority.userinfo.password = password.trim_end_matches(['\n', '\r']).to_string();
        }
        let tls_config =
            Self::tls_config(tls, param("cacert"), param("cert"), param("key")).map_err(invalid)?;
        Ok(Target {
            uri,
            tls: tls_config,
            shown: millrace_secrets::redact(url),
        })
    }

    /// The TLS settings of `cacert`, `cert` and `key`, each file read and checked now.
    fn tls_config(
        tls: bool,
        cacert: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> Result<OwnedTLSConfig, String> {
        if !tls && (cacert.is_some() || cert.is_some() || key.is_some()) {
            return Err(
                "cacert, cert and key are TLS settings: use amqps:// (TLS, port 5671) with them"
                    .to_string(),
            );
        }
        let cert_chain = match cacert {
            Some(path) => {
                let pem = read_pem_file("cacert", path)?;
                check_certificates("cacert", path, pem.as_bytes())?;
                Some(pem.to_string())
            }
            None => None,
        };
        let identity =
            match (cert, key) {
                (None, None) => None,
                (Some(_), None) | (None, Some(_)) => return Err(
                    "a client certificate needs both cert=PATH and key=file:PATH (or key=env:VAR)"
                        .to_string(),
                ),
                (Some(cert_path), Some(key_reference)) => {
                    let pem = read_pem_file("cert", cert_path)?;
                    check_certificates("cert", cert_path, pem.as_bytes())?;
                    let key = millrace_secrets::resolve_setting("key", key_reference)
                        .map_err(|e| e.to_string())?;
                    PrivateKeyDer::from_pem_slice(key.as_bytes())
                        .map_err(|e| format!("key {key_reference}: not a PEM private key ({e})"))?;
                    Some(OwnedIdentity::PKCS8 {
                        pem: pem.as_bytes().to_vec(),
                        key: key.as_bytes().to_vec(),
                    })
                }
            };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }

    /// Opens a connection.
    async fn connect(&self, properties: ConnectionProperties) -> Result<Connection, lapin::Error> {
        Connection::connect_uri_with_config(
            self.uri.clone(),
            properties,
            self.tls.clone(),
            lapin::runtime::default_runtime()?,
        )
        .await
    }
}

/// Reads the PEM file a TLS parameter names (`PATH` or `file:PATH`); the error names the file.
fn read_pem_file(what: &str, path: &str) -> Result<Zeroizing<String>, String> {
    let path = path.strip_prefix("file:").unwrap_or(path);
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| format!("{what} {path}: cannot read: {e}"))
}

/// Checks that `pem` holds at least one certificate and nothing unparsable.
fn check_certificates(what: &str, path: &str, pem: &[u8]) -> Result<(), String> {
    let path = path.strip_prefix("file:").unwrap_or(path);
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {path}: not a PEM certificate file ({e})"))?;
    if certificates.is_empty() {
        return Err(format!("{what} {path}: holds no PEM certificate"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The bus

/// The RabbitMQ bus. Cloning is cheap; clones share one connection.
#[derive(Clone)]
pub struct AmqpBus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus").finish_non_exhaustive()
    }
}

impl AmqpBus {
    /// Connects to `url` (see the module docs: `amqp://` or `amqps://`, the password from a
    /// reference, optional CA, client certificate and key). Fails if the broker cannot be reached
    /// now; later outages are ridden out by reconnecting.
    pub async fn connect(url: &str) -> Result<AmqpBus, BusError> {
        let target = Target::parse(url)?;
        let shared = Arc::new(Shared {
            target,
            link: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            probing: std::sync::atomic::AtomicBool::new(false),
            declared_generation: Mutex::new(None),
            consumer_seq: AtomicU64::new(0),
        });
        shared.link().await.map_err(|f| {
            backend(format!(
                "connecting to {}: {}",
                shared.target.shown, f.message
            ))
        })?;
        Ok(AmqpBus { shared })
    }

    /// Deletes a topic's broker objects: its exchange, its unrouted backlog (queue and exchange)
    /// and the queue of each of `groups`. Wait queues expire by themselves. For tests and
    /// operators tidying a shared broker; a missing object is not an error.
    pub async fn delete_topic(&self, topic: &str, groups: &[&str]) -> Result<(), BusError> {
        let names = Names::new(topic, None)?;
        let mut queues = vec![names.backlog.clone()];
        for group in groups {
            if let Some(queue) = Names::new(topic, Some(group))?.queue {
                queues.push(queue);
            }
        }
        let connection = self
            .shared
            .target
            .connect(ConnectionProperties::default())
            .await
            .map_err(|e| backend(format!("connect to delete {topic:?}: {e}")))?;
        // A failed delete closes its channel, so each delete gets a fresh one.
        for queue in queues {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| backend(e.to_string()))?;
            let _ = channel
                .queue_delete(queue, lapin::options::QueueDeleteOptions::default())
                .await;
        }
        for exchange in [names.exchange, names.backlog] {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| backend(e.to_string()))?;
            let _ = channel
                .exchange_delete(exchange, lapin::options::ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "done".into()).await;
        Ok(())
    }
}

#[async_trait]
impl Bus for AmqpBus {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_delay: false,
            lease_extension: true,
            native_attempt_count: false,
            durable: true,
            multi_process: true,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            // RabbitMQ 4's default `max_message_size` (3.x allowed 128 MiB).
            max_message_bytes: 16 * 1024 * 1024,
            max_attributes: 1000,
            max_attribute_value_bytes: 64 * 1024,
            // Headers travel in one content-header frame, which must fit the negotiated
            // `frame_max` (128 KiB by default); beyond it the broker closes the whole connection.
            // Half of it leaves room for the properties and this backend's own headers.
            max_attributes_bytes: 64 * 1024,
        }
    }

    /// The state of the shared connection (subscriptions and the publisher use one). A service
    /// that only publishes reconnects when it next publishes; so that its readiness does not
    /// wait for that, asking while the connection is lost also starts one reconnect attempt in
    /// the background (at most one at a time; a probe's period is its backoff).
    fn connection(&self) -> crate::Connection {
        let current = lock(&self.shared.current).clone();
        let state = match current {
            Some(connection) if connection.status().connected() => return crate::Connection::Up,
            Some(connection) => {
                let status = connection.status();
                if status.errored() {
                    "failed"
                } else if status.closed() || status.closing() {
                    "closed"
                } else {
                    "connecting"
                }
            }
            None => "not connected",
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if !self.shared.probing.swap(true, Ordering::AcqRel) {
                let shared = self.shared.clone();
                runtime.spawn(async move {
                    if let Err(failure) = shared.link().await {
                        tracing::debug!(error = %failure.message, "amqp: reconnect attempt failed");
                    }
                    shared.probing.store(false, Ordering::Release);
                });
            }
        }
        crate::Connection::Lost(format!("RabbitMQ connection lost ({state}); reconnecting"))
    }

    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        let names = Names::new(topic, group)?;
        self.shared.ensure_group(&names).await
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        let names = Names::new(topic, None)?;
        // An oversized header frame would make the broker close the whole connection, taking
        // every other delivery's ack with it: refuse it here instead.
        let header_bytes: usize = message
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        let cap = self.limits().max_attributes_bytes;
        if header_bytes > cap {
            return Err(backend(format!(
                "publish to {topic:?}: {header_bytes} bytes of headers, over the {cap} bytes a \
                 RabbitMQ content-header frame can safely carry"
            )));
        }
        let id = new_message_id();
        let properties = BasicProperties::default()
            .with_message_id(short(&id, "message id")?)
            .with_delivery_mode(PERSISTENT)
            .with_headers(attributes_to_table(&message.attributes)?);
        self.shared
            .publish_confirmed(
                (&names.exchange, &ShortString::default()),
                &message.body,
                &properties,
                Prepare::Topic(&names),
            )
            .await?;
        Ok(id)
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let names = Names::new(topic, Some(&options.group))?;
        let queue = names
            .queue
            .clone()
            .ok_or_else(|| backend("subscribe without a group"))?;
        let prefetch = u16::try_from(options.prefetch.max(1)).unwrap_or(u16::MAX);
        let shared = self.shared.clone();
        let what = format!("subscribe to {queue:?}");
        let first = retry(&shared, &what, || shared.open_consumer(&names, prefetch)).await?;
        let sub = Arc::new(SubShared {
            state: Mutex::new(SubState::default()),
            notify: Notify::new(),
            ctx: Arc::new(SettleCtx {
                shared: shared.clone(),
                queue,
                lease: options.lease,
            }),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            shared,
            names,
            prefetch,
            sub.clone(),
            first,
            stop_rx,
        ));
        Ok(Box::new(AmqpSubscription {
            sub,
            stop: stop_tx,
            reader: Some(reader),
        }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        // `publish` returns only after its confirm; wait for any confirm still outstanding from a
        // publish that is in flight right now.
        let link = self.shared.link.lock().await.clone();
        if let Some(link) = link {
            if link.publisher.status().connected() {
                if let Err(e) = link.publisher.wait_for_confirms().await {
                    // The publishes concerned retry on a new channel themselves.
                    tracing::warn!(error = %e, "amqp: flush: publisher channel failed");
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

/// What every delivery of one subscription needs to settle itself.
struct SettleCtx {
    shared: Arc<Shared>,
    /// The group's queue (republish target).
    queue: ShortString,
    lease: Duration,
}

#[derive(Default)]
struct SubState {
    /// Received from the broker, not (or no longer) handed out. Stale entries are skipped.
    buffer: VecDeque<Arc<Slot>>,
    closed: bool,
}

struct SubShared {
    state: Mutex<SubState>,
    /// Woken when the buffer gains an entry or the subscription closes.
    notify: Notify,
    ctx: Arc<SettleCtx>,
}

impl SubShared {
    /// A delivery arrived from the broker.
    fn receive(self: &Arc<Self>, channel: &Channel, delivery: lapin::message::Delivery) {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut base = 1u32;
        let mut broker_count = None;
        let mut clean = FieldTable::default();
        let mut attributes = Attributes::new();
        for (key, value) in headers.inner() {
            match key.as_str() {
                HDR_ATTEMPT => base = value_to_u32(value).unwrap_or(1).max(1),
                HDR_DELIVERY_COUNT => broker_count = value_to_u32(value),
                k if is_bookkeeping(k) => {}
                k => {
                    clean.insert(key.clone(), value.clone());
                    if let Some(v) = value_to_string(value) {
                        attributes.insert(k.to_string(), v);
                    }
                }
            }
        }
        let broker_count = broker_count.unwrap_or(u32::from(delivery.redelivered));
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_string())
            .unwrap_or_else(|| format!("amqp-tag-{}", delivery.delivery_tag));
        let properties = delivery.properties.clone().with_headers(clean);
        let slot = Arc::new(Slot {
            channel: channel.clone(),
            acker: delivery.acker,
            message_id,
            body: Bytes::from(delivery.data),
            attributes,
            properties,
            state: Mutex::new(SlotState {
                phase: Phase::Buffered {
                    deadline: Instant::now() + self.ctx.lease,
                },
                next_attempt: base.saturating_add(broker_count),
                token: 0,
            }),
            notify: Notify::new(),
            sub: Arc::downgrade(self),
            ctx: self.ctx.clone(),
        });
        let closed = {
            let mut state = lock(&self.state);
            if !state.closed {
                state.buffer.push_back(slot.clone());
            }
            state.closed
        };
        if closed {
            tokio::spawn(async move { slot.reject_if_buffered().await });
            return;
        }
        tokio::spawn(watch_lease(slot));
        self.notify.notify_waiters();
    }

    /// Marks the subscription closed and hands back everything buffered.
    async fn close_buffer(&self) {
        let buffered: Vec<Arc<Slot>> = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.buffer.drain(..).collect()
        };
        self.notify.notify_waiters();
        for slot in buffered {
            slot.reject_if_buffered().await;
        }
    }
}

/// Reads the broker's deliveries into the subscription's buffer, reconnecting as needed, until
/// told to stop; then cancels the consumer and hands back what it had not handed out.
async fn read_loop(
    shared: Arc<Shared>,
    names: Names,
    prefetch: u16,
    sub: Arc<SubShared>,
    first: (Channel, lapin::Consumer),
    mut stop: watch::Receiver<bool>,
) {
    let mut current = Some(first);
    let mut backoff = BACKOFF_MIN;
    'outer: loop {
        let (channel, mut consumer) = match current.take() {
            Some(open) => open,
            None => {
                let opened = tokio::select! {
                    opened = shared.open_consumer(&names, prefetch) => opened,
                    _ = stop.changed() => break 'outer,
                };
                match opened {
                    Ok(open) => {
                        tracing::info!(queue = %sub.ctx.queue, "amqp: consumer reopened");
                        backoff = BACKOFF_MIN;
                        open
                    }
                    Err(failure) => {
                        tracing::warn!(queue = %sub.ctx.queue, error = %failure.message, retry_in = ?backoff, "amqp: reopening consumer failed");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.changed() => break 'outer,
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
        };
        if *stop.borrow() {
            cancel(&channel, &mut consumer, &sub).await;
            break;
        }
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    cancel(&channel, &mut consumer, &sub).await;
                    break 'outer;
                }
                item = consumer.next() => match item {
                    Some(Ok(delivery)) => sub.receive(&channel, delivery),
                    Some(Err(e)) => {
                        tracing::warn!(queue = %sub.ctx.queue, error = %e, "amqp: consumer failed");
                        break;
                    }
                    None => {
                        tracing::warn!(queue = %sub.ctx.queue, "amqp: consumer cancelled by the broker");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break 'outer,
        }
    }
    sub.close_buffer().await;
}

/// Cancels the consumer and hands back whatever it delivered after the cancel was sent.
async fn cancel(channel: &Channel, consumer: &mut lapin::Consumer, sub: &Arc<SubShared>) {
    let cancelled = tokio::time::timeout(
        Duration::from_secs(5),
        channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await;
    if !matches!(cancelled, Ok(Ok(()))) {
        return;
    }
    // Anything delivered before the broker processed the cancel comes before the stream's end.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        let _ = delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await;
    }
    let _ = sub;
}

struct AmqpSubscription {
    sub: Arc<SubShared>,
    stop: watch::Sender<bool>,
    reader: Option<JoinHandle<()>>,
}

#[async_trait]
impl Subscription for AmqpSubscription {
    /// Cancel safe: a delivery leaves the buffer in the same synchronous step that returns it.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let notified = self.sub.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = lock(&self.sub.state);
                if state.closed {
                    return Err(BusError::Closed);
                }
                while let Some(slot) = state.buffer.pop_front() {
                    if let Some(delivery) = slot.hand_out() {
                        return Ok(delivery);
                    }
                }
            }
            notified.await;
        }
    }

    async fn close(&mut self) -> Result<(), BusError> {
        lock(&self.sub.state).closed = true;
        let _ = self.stop.send(true);
        if let Some(reader) = self.reader.take() {
            if tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .is_err()
            {
                tracing::warn!(queue = %self.sub.ctx.queue, "amqp: closing the consumer timed out");
            }
        }
        self.sub.close_buffer().await;
        Ok(())
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        // The reader stops, cancels the consumer and hands back the buffer by itself.
        lock(&self.sub.state).closed = true;
        let _ = self.stop.send(true);
    }
}

// ---------------------------------------------------------------------------------------------
// Deliveries and their leases

enum Phase {
    /// In the subscription's buffer; handed back to the broker if not handed out by `deadline`.
    Buffered { deadline: Instant },
    /// Handed out as delivery `token`.
    Held { token: u64, deadline: Instant },
    /// Settled, handed back, or lost with its channel.
    Done,
}

struct SlotState {
    phase: Phase,
    /// The attempt the next hand-out carries.
    next_attempt: u32,
    /// The last hand-out's token.
    token: u64,
}

/// One message received from the broker and not yet settled there.
struct Slot {
    /// Keeps the channel open while the delivery may still be acked on it.
    channel: Channel,
    acker: Acker,
    message_id: String,
    body: Bytes,
    attributes: Attributes,
    /// The properties to republish with (bookkeeping headers stripped).
    properties: BasicProperties,
    state: Mutex<SlotState>,
    /// Wakes the lease watcher when the deadline moves or the slot is settled.
    notify: Notify,
    sub: Weak<SubShared>,
    ctx: Arc<SettleCtx>,
}

impl Slot {
    fn hand_out(self: &Arc<Self>) -> Option<Delivery> {
        let attempt = {
            let mut state = lock(&self.state);
            if !matches!(state.phase, Phase::Buffered { .. }) {
                return None;
            }
            state.token += 1;
            state.phase = Phase::Held {
                token: state.token,
                deadline: Instant::now() + self.ctx.lease,
            };
            (state.token, state.next_attempt)
        };
        self.notify.notify_one();
        let (token, attempt) = attempt;
        Some(Delivery::new(
            self.message_id.clone(),
            self.body.clone(),
            self.attributes.clone(),
            attempt,
            Arc::new(AmqpSettle {
                slot: self.clone(),
                token,
            }),
        ))
    }

    fn usable(&self) -> bool {
        self.channel.status().connected() && self.acker.usable()
    }

    /// Requeues a message that was never handed out (or was handed back by a drop).
    async fn reject_if_buffered(&self) {
        {
            let mut state = lock(&self.state);
            if !matches!(state.phase, Phase::Buffered { .. }) {
                return;
            }
            state.phase = Phase::Done;
        }
        self.notify.notify_one();
        self.reject().await;
    }

    async fn reject(&self) {
        if let Err(e) = self
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await
        {
            tracing::debug!(message_id = %self.message_id, error = %e, "amqp: reject failed; the broker requeues it with the channel");
        }
    }

    /// Hands the message back to the group by republishing it with `attempt` (after `delay`), then
    /// acking the original.
    async fn requeue(&self, attempt: u32, delay: Duration) -> Result<(), BusError> {
        if !self.usable() {
            // The channel died: the broker has requeued the message already.
            return Err(self.lease_lost());
        }
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            HDR_ATTEMPT.into(),
            AMQPValue::LongString(attempt.to_string().into()),
        );
        let properties = self.properties.clone().with_headers(headers);
        let default_exchange = ShortString::default();
        let shared = &self.ctx.shared;
        let published = if delay.is_zero() {
            shared
                .publish_confirmed(
                    (&default_exchange, &self.ctx.queue),
                    &self.body,
                    &properties,
                    Prepare::Nothing,
                )
                .await
        } else {
            let ms = bucket_ms(delay);
            let name = short(
                &format!("{}::wait-{ms}ms", self.ctx.queue),
                "wait queue name",
            )?;
            shared
                .publish_confirmed(
                    (&default_exchange, &name),
                    &self.body,
                    &properties,
                    Prepare::WaitQueue {
                        name: &name,
                        ms,
                        target: &self.ctx.queue,
                    },
                )
                .await
        };
        if let Err(e) = published {
            // Could not hand it back ourselves: let the broker have it back as it is.
            self.reject().await;
            return Err(e);
        }
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            // The channel died after the copy was confirmed: the broker requeues the original
            // too, so the message comes twice (at-least-once), never zero times.
            Ok(false) | Err(_) => {
                tracing::debug!(message_id = %self.message_id, "amqp: ack after requeue failed; a duplicate follows")
            }
        }
        Ok(())
    }

    fn lease_lost(&self) -> BusError {
        BusError::LeaseLost {
            message_id: self.message_id.clone(),
        }
    }
}

/// Watches one slot's deadline and hands the message back when it passes.
async fn watch_lease(slot: Arc<Slot>) {
    loop {
        let notified = slot.notify.notified();
        let expired = {
            let mut state = lock(&slot.state);
            let now = Instant::now();
            match state.phase {
                Phase::Done => return,
                Phase::Buffered { deadline } | Phase::Held { deadline, .. } if deadline > now => {
                    Err(deadline)
                }
                Phase::Buffered { .. } => {
                    state.phase = Phase::Done;
                    Ok(None)
                }
                Phase::Held { .. } => {
                    state.phase = Phase::Done;
                    Ok(Some(state.next_attempt.saturating_add(1)))
                }
            }
        };
        match expired {
            Err(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = notified => {}
                }
            }
            Ok(None) => {
                if slot.usable() {
                    slot.reject().await;
                }
                return;
            }
            Ok(Some(attempt)) => {
                tracing::debug!(message_id = %slot.message_id, attempt, "amqp: lease expired");
                if let Err(e) = slot.requeue(attempt, Duration::ZERO).await {
                    tracing::debug!(message_id = %slot.message_id, error = %e, "amqp: handing back an expired delivery failed");
                }
                return;
            }
        }
    }
}

/// Settles one hand-out (`token`) of a slot.
struct AmqpSettle {
    slot: Arc<Slot>,
    token: u64,
}

impl AmqpSettle {
    /// Ends this hand-out; returns its attempt, or `LeaseLost` if it already ended.
    fn take(&self) -> Result<u32, BusError> {
        let attempt = {
            let mut state = lock(&self.slot.state);
            match state.phase {
                Phase::Held { token, .. } if token == self.token => {
                    state.phase = Phase::Done;
                    state.next_attempt
                }
                _ => return Err(self.slot.lease_lost()),
            }
        };
        self.slot.notify.notify_one();
        Ok(attempt)
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn ack(&self) -> Result<(), BusError> {
        self.take()?;
        match self.slot.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.slot.lease_lost()),
            Err(e) => {
                tracing::debug!(message_id = %self.slot.message_id, error = %e, "amqp: ack failed");
                Err(self.slot.lease_lost())
            }
        }
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        let attempt = self.take()?;
        self.slot.requeue(attempt.saturating_add(1), delay).await
    }

    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        {
            let mut state = lock(&self.slot.state);
            match &mut state.phase {
                Phase::Held { token, deadline } if *token == self.token => {
                    *deadline = Instant::now() + lease;
                }
                _ => return Err(self.slot.lease_lost()),
            }
        }
        self.slot.notify.notify_one();
        Ok(())
    }

    fn abandon(&self) {
        // Back to the front of this subscription's buffer at once, with the attempt counted, so the
        // next `next` gets it without a round trip (the broker would hand it to whichever consumer
        // has a free prefetch slot). If the subscription is gone, back to the broker.
        if let Some(sub) = self.slot.sub.upgrade() {
            let mut sub_state = lock(&sub.state);
            if !sub_state.closed {
                let mut state = lock(&self.slot.state);
                match state.phase {
                    Phase::Held { token, .. } if token == self.token => {
                        state.phase = Phase::Buffered {
                            deadline: Instant::now() + self.slot.ctx.lease,
                        };
                        state.next_attempt = state.next_attempt.saturating_add(1);
                    }
                    _ => return,
                }
                drop(state);
                sub_state.buffer.push_front(self.slot.clone());
                drop(sub_state);
                self.slot.notify.notify_one();
                sub.notify.notify_waiters();
                return;
            }
        }
        {
            let mut state = lock(&self.slot.state);
            match state.phase {
                Phase::Held { token, .. } if token == self.token => state.phase = Phase::Done,
                _ => return,
            }
        }
        self.slot.notify.notify_one();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let slot = self.slot.clone();
            runtime.spawn(async move { slot.reject().await });
        }
        // Without a runtime the message goes back when its channel closes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_two_significant_digits() {
        assert_eq!(bucket_ms(Duration::from_millis(600)), 600);
        assert_eq!(bucket_ms(Duration::from_millis(1234)), 1300);
        assert_eq!(bucket_ms(Duration::from_micros(1500)), 2);
        assert_eq!(bucket_ms(Duration::from_millis(99)), 99);
        assert_eq!(bucket_ms(Duration::from_millis(45_678)), 46_000);
        assert_eq!(bucket_ms(Duration::ZERO), 1);
    }

    const SECRET: &str = "s3cr3t-Pa55-amqp";

    /// A self-signed certificate and its key (PEM files in `dir`), made with the openssl CLI.
    fn certificate(dir: &std::path::Path) -> (String, String) {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let status = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=millrace-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("these tests need the openssl command");
        assert!(status.success(), "openssl req failed");
        (cert.display().to_string(), key.display().to_string())
    }

    fn parse_err(url: &str) -> String {
        match Target::parse(url) {
            Ok(_) => panic!("{} was accepted", millrace_secrets::redact(url)),
            Err(e) => {
                let (shown, debug) = (e.to_string(), format!("{e:?}"));
                assert!(
                    !shown.contains(SECRET) && !debug.contains(SECRET),
                    "leaked: {shown} / {debug}"
                );
                shown
            }
        }
    }

    #[test]
    fn the_password_comes_from_a_reference_and_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        let url = format!(
            "amqps://millrace@rabbit.example:5671/prod?password=file:{}&heartbeat=10",
            file.display()
        );
        let target = Target::parse(&url).unwrap();
        assert_eq!(
            target.uri.authority.userinfo.password, SECRET,
            "newline trimmed"
        );
        assert_eq!(target.uri.authority.userinfo.username, "millrace");
        assert_eq!(target.uri.authority.host, "rabbit.example");
        assert_eq!(target.uri.authority.port, 5671);
        assert_eq!(target.uri.vhost, "prod");
        assert_eq!(target.uri.query.heartbeat, Some(10));
        assert!(matches!(target.uri.scheme, AMQPScheme::AMQPS));
        assert!(!target.shown.contains(SECRET));
        // In the user-info (local development) it works too, and is redacted when shown.
        let target = Target::parse(&format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f")).unwrap();
        assert_eq!(target.uri.authority.userinfo.password, SECRET);
        assert_eq!(
            target.uri.authority.host, "127.0.0.1",
            "an address stays an address"
        );
        assert!(!target.shown.contains(SECRET), "{}", target.shown);
        // The password itself as a parameter is refused, and not repeated.
        let err = parse_err(&format!("amqp://u@h/%2f?password={SECRET}"));
        assert!(err.contains("must be a reference"), "{err}");
        let err = parse_err(&format!("amqp://u:{SECRET}@h/%2f?password=env:X"));
        assert!(err.contains("both"), "{err}");
        let err = parse_err("amqp://u@h/%2f?password=env:MILLRACE_TEST_SURELY_UNSET_AMQP");
        assert!(err.contains("MILLRACE_TEST_SURELY_UNSET_AMQP"), "{err}");
    }

    #[test]
    fn mistyped_urls_are_errors_that_name_the_mistake_but_not_the_secret() {
        let err = parse_err(&format!("amqp://u:{SECRET}@h/%2f?pasword=env:X"));
        assert!(err.contains("unknown parameter \"pasword\""), "{err}");
        let err = parse_err(&format!("amqp://u:{SECRET}@h:notaport/%2f"));
        assert!(err.contains("bus URL"), "{err}");
        let err = parse_err(&format!("amqp://u:{SECRET}@h/%2f?heartbeat=often"));
        assert!(err.contains("bus URL"), "{err}");
        let err = parse_err(&format!("amqp://u:{SECRET}@h/%2f?cacert=/etc/ca.pem"));
        assert!(err.contains("amqps://"), "{err}");
    }

    #[test]
    fn tls_files_are_read_and_checked_at_connect_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let base = format!("amqps://u:{SECRET}@rabbit.example/%2f");
        let target =
            Target::parse(&format!("{base}?cacert={cert}&cert={cert}&key=file:{key}")).unwrap();
        assert!(target.tls.cert_chain.is_some());
        assert!(matches!(
            target.tls.identity,
            Some(OwnedIdentity::PKCS8 { .. })
        ));
        // The key from the environment works as well.
        std::env::set_var(
            "MILLRACE_TEST_AMQP_CLIENT_KEY",
            std::fs::read_to_string(&key).unwrap(),
        );
        Target::parse(&format!(
            "{base}?cert={cert}&key=env:MILLRACE_TEST_AMQP_CLIENT_KEY"
        ))
        .unwrap();

        let missing = dir.path().join("nope.pem").display().to_string();
        let err = parse_err(&format!("{base}?cacert={missing}"));
        assert!(err.contains("cacert") && err.contains(&missing), "{err}");
        let err = parse_err(&format!("{base}?cacert={key}"));
        assert!(
            err.contains("holds no PEM certificate") && err.contains(&key),
            "{err}"
        );
        let err = parse_err(&format!("{base}?cert={cert}"));
        assert!(err.contains("both cert"), "{err}");
        let err = parse_err(&format!("{base}?cert={cert}&key={key}"));
        assert!(err.contains("must be a reference"), "{err}");
        let err = parse_err(&format!("{base}?cert={cert}&key=file:{cert}"));
        assert!(err.contains("not a PEM private key"), "{err}");
    }

    #[test]
    fn bookkeeping_headers_are_recognised() {
        assert!(is_bookkeeping("x-death"));
        assert!(is_bookkeeping("x-first-death-queue"));
        assert!(is_bookkeeping(HDR_ATTEMPT));
        assert!(!is_bookkeeping("trace"));
    }
}
