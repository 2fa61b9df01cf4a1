//! The Kafka backend, through `rdkafka` (librdkafka, built with TLS and SASL). URL:
//! `kafka://HOST:PORT[,HOST:PORT...][?SETTINGS]`: `partitions=N` (partitions of the topics this bus
//! creates; default 4), `properties=file:PATH` (a properties file), and any librdkafka property
//! (`security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512&sasl.username=u&sasl.password=env:V`),
//! also from `MILLRACE_KAFKA_*` environment variables. Secrets are `file:`/`env:` references. The
//! [`settings`] module says how the sources combine and which properties Millrace keeps for itself.
//!
//! Kafka is a log, not a queue: a consumer group splits a topic's *partitions* between its members
//! and remembers one committed offset per partition. It has no per-message ack, nack, delay or
//! lease. This module builds the [`Bus`] port's semantics on top of that, client-side:
//!
//! * **Topics.** Created explicitly with the admin API (by [`Bus::create_topic`], on the first
//!   publish to a topic this bus has not created yet, and on subscribe), each with its retry topic
//!   `{topic}.retry`. Brokers like tansu do not auto-create on produce.
//! * **Publish.** The raw body is the record value; attributes are record headers. Publish waits
//!   for the delivery report (`acks=all`) and retries transient errors for up to 30 s. The message
//!   id is `topic/partition/offset`. Header names starting with `millrace-kafka-` are this
//!   module's bookkeeping and are stripped on receipt (so callers must not use that prefix).
//! * **Subscribe.** One `StreamConsumer` per subscription, `group.id` = `{topic}~{group}` (the
//!   port's group, scoped to its topic as the port means it: a Kafka group spanning topics would
//!   rebalance consumers of one topic whenever one of another joins), subscribed to
//!   `{topic}` and `{topic}.retry`, `enable.auto.commit=false`, `auto.offset.reset=earliest` (tansu
//!   cannot look up `latest`). A background task reads the stream into the subscription's own
//!   buffer (pausing the partitions while `prefetch` messages wait there) and `next` hands them out.
//!   `subscribe` returns once the group has given the consumer its first assignment, so a group
//!   that is set up before publishing does not rebalance under the first messages.
//! * **Ack = commit, contiguously.** Per partition the subscription tracks every offset it has read
//!   and not settled; what it commits is the lowest unsettled offset (or one past the last read),
//!   so a message is never committed past while an earlier one is still being worked on.
//!   Commits are asynchronous while running and synchronous on revocation and close.
//! * **Nack and delay.** `nack(delay)` republishes the message (same body and attributes; attempt+1,
//!   a not-before time, the group and the original id in bookkeeping headers) to `{topic}.retry`
//!   and only then marks the original settled. The subscription holds a retry message in its
//!   buffer, without handing it out and without using a worker slot, until its not-before time.
//!   The retry topic is shared by all groups of a topic: a group skips (and commits past) retry
//!   messages addressed to another group.
//! * **Leases are client-side.** Each delivery has a deadline; `extend` moves it. When it passes
//!   unsettled, the subscription republishes the message to the retry topic (attempt+1, no delay)
//!   and marks the original settled; later `ack`/`nack`/`extend` of it say
//!   [`BusError::LeaseLost`]. A delivery dropped unsettled (`abandon`) is republished the same way
//!   at once. Where the retry copy goes is chosen by partition: after a lease expiry, to a retry
//!   partition some *other* member owns (the holder looks stuck); after a nack or a drop, to one
//!   this member owns (it is alive and takes it back). Either way the group gets it.
//! * **Attempts** are counted in a header (1 on the first delivery); Kafka counts nothing.
//! * **Consumers that die** commit nothing more: the group re-reads their uncommitted messages
//!   (at-least-once). Messages buffered but not yet handed out are never committed past either.
//! * **Rebalances** (eager protocol): on revocation the subscription commits what is contiguous
//!   and stops handing out; on the next assignment it keeps its state for partitions it got back
//!   (skipping the re-read of offsets it already holds) and forgets the others — deliveries from a
//!   partition that moved away say `LeaseLost`, because their new owner re-reads them.
//! * **Close** stops handing out, drops the buffer (uncommitted, so re-read by the group), and
//!   leaves the group once every delivery already handed out is settled or its lease has expired;
//!   then it commits what is contiguous and unsubscribes. `close` returns at once while
//!   deliveries are out; called (again) when none is, it waits up to 30 s until the consumer has
//!   committed and left. (A member joining while another is still leaving can wait a long time for
//!   its assignment on tansu, so the worker loop closes again after its drain.) `flush` flushes
//!   the producer.
//! * **Reconnecting** is librdkafka's job; errors from the consumer stream are logged and the
//!   subscription keeps reading. [`Bus::connection`] is as good as librdkafka lets it be: a
//!   consumer told that *all* brokers are down marks the bus's connection lost, and a metadata
//!   request (started by asking, at most one at a time) that the brokers answer marks it up
//!   again. A bus without subscriptions hears of no outage (its producer retries by itself).
//!
//! Capabilities: no native delay (retry topic), lease extension yes (client-side), no native
//! attempt count (header), durable, multi-process.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

mod settings;
pub use settings::{ClientRole, KafkaSettings, ENV_PREFIX, RESERVED_PROPERTIES};

use crate::lock;
use crate::Limits;
use crate::{
    Attributes, Bus, BusError, Capabilities, Delivery, Message, Settle, SubscribeOptions,
    Subscription,
};

const BACKEND: &str = "kafka";
/// Prefix of this module's bookkeeping headers; stripped on receipt.
const HEADER_PREFIX: &str = "millrace-kafka-";
const HEADER_ATTEMPT: &str = "millrace-kafka-attempt";
const HEADER_NOT_BEFORE: &str = "millrace-kafka-not-before-ms";
const HEADER_GROUP: &str = "millrace-kafka-group";
const HEADER_ID: &str = "millrace-kafka-id";
/// How long `publish` keeps retrying transient errors.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long `subscribe` waits for the group's first assignment before returning anyway.
const ASSIGNMENT_WAIT: Duration = Duration::from_secs(30);
/// How long admin and metadata requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn backend_error(message: impl Into<String>) -> BusError {
    BusError::Backend {
        backend: BACKEND,
        message: message.into(),
    }
}

/// The Kafka consumer group of the port's `group` on `topic`. The port scopes a group to one
/// topic; a Kafka group spans every topic its members subscribe to, and one member joining on one
/// topic would rebalance (and take work away from) the members on all the others.
fn kafka_group_id(topic: &str, group: &str) -> String {
    format!("{topic}~{group}")
}

/// The retry topic of `topic`.
fn retry_topic(topic: &str) -> String {
    format!("{topic}.retry")
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The Kafka bus. Cloning is cheap; clones share the producer and the admin client.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<BusInner>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("bootstrap", &self.inner.bootstrap)
            .finish_non_exhaustive()
    }
}

struct BusInner {
    bootstrap: String,
    partitions: i32,
    /// Resolved settings (secrets included), for each subscription's consumer.
    settings: KafkaSettings,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics this bus has created (or found existing): no admin request for them again.
    known_topics: Mutex<HashSet<String>>,
    /// Partition counts, for choosing a retry partition.
    partition_counts: Mutex<HashMap<String, i32>>,
    /// What the consumers have heard about the brokers, for [`Bus::connection`].
    link: Arc<BrokerLink>,
}

/// Set when a consumer hears from librdkafka that every broker is down; cleared by a metadata
/// request that the brokers answer.
#[derive(Default)]
struct BrokerLink {
    down: Mutex<Option<String>>,
    probing: std::sync::atomic::AtomicBool,
}

/// Where a republished retry copy should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A retry partition this member owns (it takes the message back).
    Mine,
    /// A retry partition another member owns (this one looks stuck).
    Others,
}

impl KafkaBus {
    /// Connects to the brokers in `url` (`kafka://HOST:PORT[,HOST:PORT...][?SETTINGS]`, with the
    /// properties file and `MILLRACE_KAFKA_*` environment variables it may be completed by: see
    /// [`KafkaSettings`]) and checks that they answer.
    pub async fn connect(url: &str) -> Result<KafkaBus, BusError> {
        KafkaBus::connect_with(KafkaSettings::from_url(url)?).await
    }

    /// Connects with settings already read (see [`KafkaSettings::parse`]).
    pub async fn connect_with(settings: KafkaSettings) -> Result<KafkaBus, BusError> {
        let bootstrap = settings.bootstrap().to_string();
        let partitions = settings.partitions();
        // librdkafka's errors here (an unreadable key, a bad certificate) are scrubbed of secrets.
        let producer: FutureProducer = settings
            .client_config(&ClientRole::Producer)
            .create()
            .map_err(|e| {
                backend_error(format!(
                    "creating a producer for {bootstrap}: {}",
                    settings.librdkafka_error(&e)
                ))
            })?;
        let admin: AdminClient<DefaultClientContext> = settings
            .client_config(&ClientRole::Admin)
            .create()
            .map_err(|e| {
                backend_error(format!(
                    "creating an admin client for {bootstrap}: {}",
                    settings.librdkafka_error(&e)
                ))
            })?;

        // Fail now, plainly, if nothing answers.
        let probe = producer.clone();
        let answered = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, REQUEST_TIMEOUT)
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| backend_error(format!("metadata probe task: {e}")))?;
        let brokers = answered.map_err(|e| {
            backend_error(format!(
                "cannot reach Kafka at {bootstrap}: {}",
                settings.librdkafka_error(&e)
            ))
        })?;
        info!(bootstrap = %bootstrap, brokers, partitions, "connected to kafka");

        Ok(KafkaBus {
            inner: Arc::new(BusInner {
                bootstrap,
                partitions,
                settings,
                producer,
                admin,
                known_topics: Mutex::new(HashSet::new()),
                partition_counts: Mutex::new(HashMap::new()),
                link: Arc::new(BrokerLink::default()),
            }),
        })
    }
}

impl BusInner {
    /// Creates each of `topics` that this bus has not created yet; "already exists" is fine.
    async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let missing: Vec<&str> = {
            let known = lock(&self.known_topics);
            topics
                .iter()
                .copied()
                .filter(|t| !known.contains(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| NewTopic::new(t, self.partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|e| backend_error(format!("creating topics {missing:?}: {e}")))?;
        for result in results {
            match result {
                Ok(topic) => {
                    debug!(topic = %topic, partitions = self.partitions, "created topic");
                    lock(&self.known_topics).insert(topic);
                }
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    lock(&self.known_topics).insert(topic);
                }
                Err((topic, code)) => {
                    return Err(backend_error(format!("creating topic {topic:?}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// The partition count of `topic` (cached after the first metadata request).
    async fn partition_count(&self, topic: &str) -> Option<i32> {
        if let Some(n) = lock(&self.partition_counts).get(topic) {
            return Some(*n);
        }
        let producer = self.producer.clone();
        let name = topic.to_string();
        let count = tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&name), REQUEST_TIMEOUT)
                .ok()?;
            let topic = metadata.topics().iter().find(|t| t.name() == name)?;
            i32::try_from(topic.partitions().len())
                .ok()
                .filter(|n| *n > 0)
        })
        .await
        .ok()
        .flatten()?;
        lock(&self.partition_counts).insert(topic.to_string(), count);
        Some(count)
    }

    /// Produces one record and waits for its delivery report, retrying transient errors for up
    /// to [`PUBLISH_RETRY_FOR`]. Returns (partition, offset).
    async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        body: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(i32, i64), BusError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record = FutureRecord::<(), [u8]>::to(topic)
                .payload(body)
                .headers(headers.clone());
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            let error = match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(delivery) => return Ok((delivery.partition, delivery.offset)),
                Err((error, _)) => error,
            };
            let transient = is_transient(&error);
            if !transient || started.elapsed() + backoff > PUBLISH_RETRY_FOR {
                return Err(backend_error(format!(
                    "publishing to {topic:?} failed{}: {error}",
                    if transient {
                        format!(" for {:?}", started.elapsed())
                    } else {
                        String::new()
                    }
                )));
            }
            warn!(topic = %topic, error = %error, retry_in = ?backoff, "publish failed; retrying");
            if matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
            ) {
                lock(&self.known_topics).remove(topic);
                if let Err(e) = self.ensure_topics(&[topic]).await {
                    warn!(topic = %topic, error = %e, "re-creating the topic failed");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Republishes `pending` to its retry topic for `group`: attempt+1, not before `delay` from
    /// now, on a partition chosen by `target` among `owned` (the member's retry partitions).
    async fn republish(
        &self,
        pending: &Pending,
        group: &str,
        delay: Duration,
        target: Target,
        owned: Vec<i32>,
    ) -> Result<(), BusError> {
        let retry = retry_topic(&pending.origin_topic);
        self.ensure_topics(&[&retry]).await?;
        let partition = match self.partition_count(&retry).await {
            Some(count) => choose_partition(count, &owned, pending.tp.1, target),
            None => None,
        };
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        let mut headers = attribute_headers(&pending.attributes);
        for (key, value) in [
            (
                HEADER_ATTEMPT,
                (pending.attempt.saturating_add(1)).to_string(),
            ),
            (
                HEADER_NOT_BEFORE,
                now_unix_ms().saturating_add(delay_ms).to_string(),
            ),
            (HEADER_GROUP, group.to_string()),
            (HEADER_ID, pending.id.clone()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let (partition, offset) = self
            .produce(&retry, partition, &pending.body, headers)
            .await?;
        debug!(message_id = %pending.id, retry_topic = %retry, partition, offset,
               attempt = pending.attempt + 1, delay = ?delay, "republished for retry");
        Ok(())
    }
}

/// Picks the retry partition: one of `owned` for [`Target::Mine`], one not in `owned` for
/// [`Target::Others`], falling back to the other kind and then to the librdkafka partitioner.
fn choose_partition(count: i32, owned: &[i32], original: i32, target: Target) -> Option<i32> {
    let mine: Vec<i32> = (0..count).filter(|p| owned.contains(p)).collect();
    let others: Vec<i32> = (0..count).filter(|p| !owned.contains(p)).collect();
    let (first, second) = match target {
        Target::Mine => (mine, others),
        Target::Others => (others, mine),
    };
    let pick = |candidates: &[i32]| -> Option<i32> {
        if candidates.is_empty() {
            return None;
        }
        let index = match target {
            // Keep messages of one original partition together where possible.
            Target::Mine => usize::try_from(original).unwrap_or(0) % candidates.len(),
            Target::Others => rand::random_range(0..candidates.len()),
        };
        candidates.get(index).copied()
    };
    pick(&first).or_else(|| pick(&second))
}

fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidTopic
            | C::InvalidRecord
            | C::UnsupportedVersion
            | C::InvalidArgument
            | C::Conflict
            | C::Fatal,
        ) => false,
        Some(_) => true,
        None => matches!(error, KafkaError::MessageProduction(_)),
    }
}

/// User attributes as headers (bookkeeping ones are added separately).
fn attribute_headers(attributes: &Attributes) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(attributes.len() + 4);
    for (key, value) in attributes {
        headers = headers.insert(Header {
            key: key.as_str(),
            value: Some(value.as_bytes()),
        });
    }
    headers
}

#[async_trait]
impl Bus for KafkaBus {
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

    /// Lost once a consumer heard that all brokers are down, until a metadata request (started
    /// here, one at a time) is answered.
    fn connection(&self) -> crate::Connection {
        use std::sync::atomic::Ordering;
        let Some(why) = lock(&self.inner.link.down).clone() else {
            return crate::Connection::Up;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if !self.inner.link.probing.swap(true, Ordering::AcqRel) {
                let inner = self.inner.clone();
                runtime.spawn_blocking(move || {
                    let answered = inner
                        .producer
                        .client()
                        .fetch_metadata(None, REQUEST_TIMEOUT)
                        .is_ok();
                    if answered {
                        *lock(&inner.link.down) = None;
                    }
                    inner.link.probing.store(false, Ordering::Release);
                });
            }
        }
        crate::Connection::Lost(why)
    }

    fn limits(&self) -> Limits {
        Limits {
            // librdkafka's default `message.max.bytes` (1,000,000) less the record and batch
            // framing and this backend's own headers.
            max_message_bytes: 1_000_000 - 4096,
            max_attributes: 1000,
            max_attribute_value_bytes: 64 * 1024,
            max_attributes_bytes: 64 * 1024,
        }
    }

    async fn create_topic(&self, topic: &str, _group: Option<&str>) -> Result<(), BusError> {
        // Consumer groups need no creation in Kafka; the retry topic does.
        self.inner
            .ensure_topics(&[topic, &retry_topic(topic)])
            .await
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        self.inner
            .ensure_topics(&[topic, &retry_topic(topic)])
            .await?;
        let headers = attribute_headers(&message.attributes);
        let (partition, offset) = self
            .inner
            .produce(topic, None, &message.body, headers)
            .await?;
        Ok(format!("{topic}/{partition}/{offset}"))
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let retry = retry_topic(topic);
        self.inner.ensure_topics(&[topic, &retry]).await?;

        let (assigned_tx, mut assigned_rx) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            topic: topic.to_string(),
            retry_topic: retry.clone(),
            group: options.group.clone(),
            state: Mutex::new(State::default()),
            ready_notify: Notify::new(),
            task_wake: Notify::new(),
            assignments: assigned_tx,
        });
        let prefetch = options.prefetch.max(1);
        let role = ClientRole::Consumer {
            group_id: kafka_group_id(topic, &options.group),
            prefetch,
        };
        let consumer: StreamConsumer<SubContext> = self
            .inner
            .settings
            .client_config(&role)
            .create_with_context(SubContext {
                shared: shared.clone(),
                link: self.inner.link.clone(),
            })
            .map_err(|e| {
                backend_error(format!(
                    "creating a consumer for {topic:?}: {}",
                    self.inner.settings.librdkafka_error(&e)
                ))
            })?;
        consumer
            .subscribe(&[topic, retry.as_str()])
            .map_err(|e| backend_error(format!("subscribing to {topic:?}: {e}")))?;
        let consumer = Arc::new(consumer);
        let task = tokio::spawn(run_consumer(
            consumer,
            shared.clone(),
            self.inner.clone(),
            prefetch,
        ));

        // Wait for the first assignment, so that a group set up before publishing is stable.
        let waited = tokio::time::timeout(ASSIGNMENT_WAIT, assigned_rx.wait_for(|n| *n > 0)).await;
        if !matches!(waited, Ok(Ok(_))) {
            warn!(topic = %topic, group = %options.group, waited = ?ASSIGNMENT_WAIT,
                  "no partition assignment yet; the subscription keeps waiting in the background");
        }
        Ok(Box::new(KafkaSubscription {
            shared,
            bus: self.inner.clone(),
            lease: options.lease,
            task: Some(task),
        }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        let producer = self.inner.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30)))
            .await
            .map_err(|e| backend_error(format!("flush task: {e}")))?
            .map_err(|e| backend_error(format!("flush: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Subscription state

type Tp = (String, i32);

/// A message read from a partition and not yet settled.
struct Pending {
    tp: Tp,
    offset: i64,
    /// The tracker this offset belongs to (a partition that moved away and came back gets a new
    /// one; a settle for the old one must not touch it).
    epoch: u64,
    /// The topic the message was first published to (also for retry copies).
    origin_topic: String,
    id: String,
    body: Bytes,
    attributes: Attributes,
    attempt: u32,
}

struct InFlight {
    pending: Pending,
    deadline: Instant,
}

/// Offsets of one assigned partition.
struct Track {
    epoch: u64,
    /// Offsets read and not settled.
    unsettled: BTreeSet<i64>,
    /// One past the highest offset read.
    next: Option<i64>,
    /// The last offset committed (or about to be).
    committed: Option<i64>,
}

impl Track {
    /// The offset to commit, if it moved: the lowest unsettled one, else one past the last read.
    /// Whether [`Track::commit_point`] would return something (without recording it).
    fn commit_pending(&self) -> bool {
        self.unsettled
            .first()
            .copied()
            .or(self.next)
            .is_some_and(|point| self.committed.is_none_or(|c| c < point))
    }

    fn commit_point(&mut self) -> Option<i64> {
        let point = self.unsettled.first().copied().or(self.next)?;
        if self.committed.is_some_and(|c| c >= point) {
            return None;
        }
        self.committed = Some(point);
        Some(point)
    }
}

#[derive(Default)]
struct State {
    tracks: HashMap<Tp, Track>,
    /// The current assignment (empty while a rebalance is in progress).
    assigned: HashSet<Tp>,
    rebalancing: bool,
    /// Read and deliverable now, not handed out.
    ready: VecDeque<Pending>,
    /// Retry messages held until their not-before time.
    delayed: BTreeMap<(Instant, u64), Pending>,
    in_flight: HashMap<u64, InFlight>,
    /// Republishes under way (their originals are not settled yet).
    republishing: usize,
    next_seq: u64,
    closing: bool,
    finished: bool,
    paused: bool,
    resync_pause: bool,
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Marks one offset settled (if its tracker is still the same).
    fn settle_offset(&mut self, tp: &Tp, offset: i64, epoch: u64) {
        if let Some(track) = self.tracks.get_mut(tp) {
            if track.epoch == epoch {
                track.unsettled.remove(&offset);
            }
        }
    }

    /// Commit points of every assigned partition that moved.
    fn commit_pending(&self) -> bool {
        self.tracks.values().any(Track::commit_pending)
    }

    fn commits(&mut self, only: Option<&HashSet<Tp>>) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, track) in self.tracks.iter_mut() {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            if let Some(point) = track.commit_point() {
                out.push((tp.clone(), point));
            }
        }
        out
    }

    fn owned_partitions(&self, topic: &str) -> Vec<i32> {
        self.assigned
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// What the subscription, its deliveries, its task and its rebalance callbacks share.
struct Shared {
    topic: String,
    retry_topic: String,
    group: String,
    state: Mutex<State>,
    /// Woken when `ready` may have something, or on close.
    ready_notify: Notify,
    /// Wakes the background task (a settle, an extend, a close).
    task_wake: Notify,
    /// Counts assignments received.
    assignments: watch::Sender<u64>,
}

impl Shared {
    fn wake_task(&self) {
        self.task_wake.notify_one();
    }

    fn begin_close(&self) {
        {
            let mut state = lock(&self.state);
            if state.closing {
                return;
            }
            state.closing = true;
            // Uncommitted, so the group reads them again.
            state.ready.clear();
            state.delayed.clear();
        }
        self.ready_notify.notify_waiters();
        self.wake_task();
    }

    /// Revocation: returns the contiguous commit points of the revoked partitions.
    fn on_revoke(&self, revoked: &TopicPartitionList) -> Vec<(Tp, i64)> {
        let tps: HashSet<Tp> = revoked
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut state = lock(&self.state);
        state.rebalancing = true;
        state.assigned.retain(|tp| !tps.contains(tp));
        info!(topic = %self.topic, group = %self.group, partitions = tps.len(), "partitions revoked");
        state.commits(Some(&tps))
    }

    /// Assignment: keeps the state of partitions that came back, forgets the others.
    fn on_assign(&self, assigned: &TopicPartitionList) {
        let tps: HashSet<Tp> = assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        {
            let mut state = lock(&self.state);
            state.tracks.retain(|tp, _| tps.contains(tp));
            state.ready.retain(|p| tps.contains(&p.tp));
            state.delayed.retain(|_, p| tps.contains(&p.tp));
            // Deliveries from partitions that moved away: their new owner re-reads them.
            state.in_flight.retain(|_, f| tps.contains(&f.pending.tp));
            for tp in &tps {
                if !state.tracks.contains_key(tp) {
                    let epoch = state.seq();
                    state.tracks.insert(
                        tp.clone(),
                        Track {
                            epoch,
                            unsettled: BTreeSet::new(),
                            next: None,
                            committed: None,
                        },
                    );
                }
            }
            state.assigned = tps;
            state.rebalancing = false;
            // librdkafka may keep a partition's pause across a rebalance: the task sets the pause
            // state of the whole new assignment explicitly.
            state.resync_pause = true;
            info!(topic = %self.topic, group = %self.group, partitions = state.assigned.len(),
                  "partitions assigned");
        }
        self.assignments.send_modify(|n| *n += 1);
        self.ready_notify.notify_waiters();
        self.wake_task();
    }
}

struct SubContext {
    shared: Arc<Shared>,
    link: Arc<BrokerLink>,
}

impl ClientContext for SubContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            *lock(&self.link.down) = Some(format!("Kafka: all brokers are down ({reason})"));
        }
        warn!(topic = %self.shared.topic, group = %self.shared.group, error = %error,
              reason = %reason, "kafka consumer error");
    }
}

impl ConsumerContext for SubContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let commits = self.shared.on_revoke(revoked);
            if let Some(tpl) = to_tpl(&commits) {
                // Synchronous: the next owner starts from here.
                if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                    warn!(topic = %self.shared.topic, group = %self.shared.group, error = %e,
                          "commit on revocation failed; the next owner may re-read some messages");
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => self.shared.on_assign(assigned),
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                warn!(topic = %self.shared.topic, group = %self.shared.group, error = %e,
                      "rebalance error")
            }
        }
    }
}

fn to_tpl(commits: &[(Tp, i64)]) -> Option<TopicPartitionList> {
    if commits.is_empty() {
        return None;
    }
    let mut tpl = TopicPartitionList::with_capacity(commits.len());
    for ((topic, partition), offset) in commits {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            warn!(topic = %topic, partition, offset, error = %e, "cannot build a commit");
        }
    }
    Some(tpl)
}

// ---------------------------------------------------------------------------------------------
// The background task: reads the consumer, expires leases, releases due retries, commits.

/// How often offsets are committed while a subscription runs.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Buffered (not yet handed out) messages at which the subscription pauses fetching.
const BUFFER_HIGH_WATER: usize = 1000;

async fn run_consumer(
    consumer: Arc<StreamConsumer<SubContext>>,
    shared: Arc<Shared>,
    bus: Arc<BusInner>,
    prefetch: usize,
) {
    // Offsets are committed at most every COMMIT_INTERVAL while running (one OffsetCommit per
    // settled message would load the broker for nothing: a crash re-reads at most that much more,
    // which at-least-once delivery allows). Revocation and close commit at once.
    let mut last_commit: Option<Instant> = None;
    // Reading runs in a task of its own: `recv` is never cancelled by the housekeeping wake-ups
    // (two per message), which would otherwise recreate the receive future for every settle.
    let reader = {
        let (consumer, shared) = (consumer.clone(), shared.clone());
        tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(message) => ingest(&shared, &message),
                    Err(e) => {
                        warn!(topic = %shared.topic, group = %shared.group, error = %e,
                              "error from the kafka consumer; continuing");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    loop {
        // Housekeeping under the lock; the network work after it.
        let mut republish = Vec::new();
        let mut pause_change = None;
        let (commits, next_due, done, released) = {
            let mut state = lock(&shared.state);
            let now = Instant::now();
            let mut released = false;
            while let Some(entry) = state.delayed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let pending = entry.remove();
                state.ready.push_back(pending);
                released = true;
            }
            let expired: Vec<u64> = state
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(token, _)| *token)
                .collect();
            for token in expired {
                if let Some(flight) = state.in_flight.remove(&token) {
                    state.republishing += 1;
                    let owned = state.owned_partitions(&shared.retry_topic);
                    republish.push((flight.pending, owned));
                }
            }
            let commit_now = last_commit.is_none_or(|t| now.duration_since(t) >= COMMIT_INTERVAL);
            let commits = if commit_now {
                state.commits(None)
            } else {
                Vec::new()
            };
            if !commits.is_empty() {
                last_commit = Some(now);
            }
            let commit_due = (!commit_now && state.commit_pending())
                .then(|| last_commit.map(|t| t + COMMIT_INTERVAL))
                .flatten();
            let buffered = state.ready.len();
            // Pause well above the prefetch: librdkafka drops what it fetched for a paused
            // partition and refetches on resume, so pausing at the prefetch itself would turn
            // every handful of messages into a fetch round trip. Buffered messages are not
            // leased and belong to partitions only this member reads, so holding more is safe.
            let want_paused = state.closing || buffered >= (prefetch * 100).max(BUFFER_HIGH_WATER);
            if want_paused != state.paused || state.resync_pause {
                state.paused = want_paused;
                state.resync_pause = false;
                pause_change = Some(want_paused);
            }
            let delayed_due = state.delayed.keys().next().map(|(due, _)| *due);
            let lease_due = state.in_flight.values().map(|f| f.deadline).min();
            let next_due = [delayed_due, lease_due, commit_due]
                .into_iter()
                .flatten()
                .min();
            let done = state.closing && state.in_flight.is_empty() && state.republishing == 0;
            (commits, next_due, done, released)
        };
        if released {
            shared.ready_notify.notify_waiters();
        }
        for (pending, owned) in republish {
            tokio::spawn(republish_and_settle(
                bus.clone(),
                shared.clone(),
                pending,
                Duration::ZERO,
                Target::Others,
                owned,
                "lease expired",
            ));
        }
        if let Some(tpl) = to_tpl(&commits) {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                warn!(topic = %shared.topic, group = %shared.group, error = %e, "commit failed");
            }
        }
        if let Some(pause) = pause_change {
            match consumer.assignment() {
                Ok(assignment) => {
                    let result = if pause {
                        consumer.pause(&assignment)
                    } else {
                        consumer.resume(&assignment)
                    };
                    if let Err(e) = result {
                        warn!(topic = %shared.topic, error = %e, pause, "pause/resume failed");
                    }
                }
                Err(e) => warn!(topic = %shared.topic, error = %e, "reading the assignment failed"),
            }
        }
        if done {
            break;
        }

        let sleep = async {
            match next_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.task_wake.notified() => {}
            _ = sleep => {}
        }
    }
    reader.abort();
    let _ = reader.await;

    // Closing: commit what is contiguous, leave the group. Blocking calls, off the runtime.
    let commits = {
        let mut state = lock(&shared.state);
        state.finished = true;
        state.commits(None)
    };
    let topic = shared.topic.clone();
    let left = tokio::task::spawn_blocking(move || {
        if let Some(tpl) = to_tpl(&commits) {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                warn!(topic = %topic, error = %e, "final commit failed; some messages will be re-read");
            }
        }
        consumer.unsubscribe();
        // Dropping the last handle closes the consumer: it leaves the group.
        drop(consumer);
    })
    .await;
    if let Err(e) = left {
        warn!(topic = %shared.topic, error = %e, "closing the consumer failed");
    }
    debug!(topic = %shared.topic, group = %shared.group, "subscription closed");
}

/// Takes one record from the stream into the subscription's buffer.
fn ingest(shared: &Shared, message: &rdkafka::message::BorrowedMessage<'_>) {
    let tp: Tp = (message.topic().to_string(), message.partition());
    let offset = message.offset();
    let mut attributes = Attributes::new();
    let mut attempt = None;
    let mut not_before = None;
    let mut group = None;
    let mut original_id = None;
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            match header.key {
                HEADER_ATTEMPT => attempt = value.parse::<u32>().ok(),
                HEADER_NOT_BEFORE => not_before = value.parse::<i64>().ok(),
                HEADER_GROUP => group = Some(value),
                HEADER_ID => original_id = Some(value),
                key if key.starts_with(HEADER_PREFIX) => {}
                key => {
                    attributes.insert(key.to_string(), value);
                }
            }
        }
    }
    let is_retry = tp.0 == shared.retry_topic;

    let mut state = lock(&shared.state);
    if state.closing {
        // Not tracked, so never committed past: the group reads it again.
        return;
    }
    let epoch = {
        let Some(track) = state.tracks.get_mut(&tp) else {
            // Not (or no longer) assigned here.
            return;
        };
        if track.next.is_some_and(|next| offset < next) {
            // Re-read after a rebalance gave the partition back: already held.
            return;
        }
        track.next = Some(offset + 1);
        track.unsettled.insert(offset);
        track.epoch
    };
    if is_retry && group.as_deref() != Some(shared.group.as_str()) {
        // Another group's retry: not ours to deliver.
        state.settle_offset(&tp, offset, epoch);
        drop(state);
        shared.wake_task();
        return;
    }
    let id = original_id.unwrap_or_else(|| format!("{}/{}/{}", tp.0, tp.1, offset));
    let pending = Pending {
        tp,
        offset,
        epoch,
        origin_topic: shared.topic.clone(),
        id,
        body: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        attributes,
        attempt: attempt.unwrap_or(1).max(1),
    };
    let wait_ms = not_before.map(|t| t - now_unix_ms()).unwrap_or(0);
    if is_retry && wait_ms > 0 {
        let due = Instant::now() + Duration::from_millis(wait_ms.unsigned_abs());
        let seq = state.seq();
        state.delayed.insert((due, seq), pending);
        drop(state);
        // The housekeeping task's timer must learn of the new due time.
        shared.wake_task();
    } else {
        let buffered = state.ready.len() + 1;
        state.ready.push_back(pending);
        drop(state);
        shared.ready_notify.notify_waiters();
        if buffered >= BUFFER_HIGH_WATER {
            // Time to pause fetching: the housekeeping task decides.
            shared.wake_task();
        }
    }
}

/// Republishes a message taken out of flight, then settles its original offset. On failure the
/// message goes back into flight under a new token with a short deadline, so it is tried again.
async fn republish_and_settle(
    bus: Arc<BusInner>,
    shared: Arc<Shared>,
    pending: Pending,
    delay: Duration,
    target: Target,
    owned: Vec<i32>,
    why: &'static str,
) -> Result<(), BusError> {
    let result = bus
        .republish(&pending, &shared.group, delay, target, owned)
        .await;
    {
        let mut state = lock(&shared.state);
        state.republishing = state.republishing.saturating_sub(1);
        match &result {
            Ok(()) => state.settle_offset(&pending.tp, pending.offset, pending.epoch),
            Err(e) => {
                error!(message_id = %pending.id, why, error = %e,
                       "republishing for retry failed; trying again in 1 s");
                if !state.finished {
                    let token = state.seq();
                    state.in_flight.insert(
                        token,
                        InFlight {
                            pending,
                            deadline: Instant::now() + Duration::from_secs(1),
                        },
                    );
                }
            }
        }
    }
    shared.wake_task();
    result
}

struct KafkaSubscription {
    shared: Arc<Shared>,
    bus: Arc<BusInner>,
    lease: Duration,
    task: Option<JoinHandle<()>>,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    /// Cancel safe: a delivery leaves the buffer only in the synchronous step that returns it.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let notified = self.shared.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = lock(&self.shared.state);
                if state.closing {
                    return Err(BusError::Closed);
                }
                if !state.rebalancing {
                    if let Some(pending) = state.ready.pop_front() {
                        let token = state.seq();
                        let delivery_id = pending.id.clone();
                        let body = pending.body.clone();
                        let attributes = pending.attributes.clone();
                        let attempt = pending.attempt;
                        state.in_flight.insert(
                            token,
                            InFlight {
                                pending,
                                deadline: Instant::now() + self.lease,
                            },
                        );
                        drop(state);
                        self.shared.wake_task();
                        let settle = Arc::new(KafkaSettle {
                            shared: self.shared.clone(),
                            bus: self.bus.clone(),
                            token,
                            message_id: delivery_id.clone(),
                        });
                        return Ok(Delivery::new(
                            delivery_id,
                            body,
                            attributes,
                            attempt,
                            settle,
                        ));
                    }
                }
            }
            notified.await;
        }
    }

    async fn close(&mut self) -> Result<(), BusError> {
        self.shared.begin_close();
        let idle = lock(&self.shared.state).in_flight.is_empty();
        // With deliveries still out, the consumer stays in the group until they are settled
        // (or their leases expire); otherwise wait until it has committed and left (after the
        // republishes of hand-backs under way, which need no caller).
        if idle {
            if let Some(task) = self.task.take() {
                match tokio::time::timeout(Duration::from_secs(30), task).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(backend_error(format!("consumer task: {e}"))),
                    Err(_) => warn!(topic = %self.shared.topic, "leaving the group takes long"),
                }
            }
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // The task finishes on its own once nothing is in flight.
        self.shared.begin_close();
    }
}

/// Settles one delivery, identified by its token.
struct KafkaSettle {
    shared: Arc<Shared>,
    bus: Arc<BusInner>,
    token: u64,
    message_id: String,
}

impl KafkaSettle {
    fn lease_lost(&self) -> BusError {
        BusError::LeaseLost {
            message_id: self.message_id.clone(),
        }
    }

    /// Takes this delivery out of flight for a republish, with the member's retry partitions.
    fn take_for_republish(&self) -> Option<(Pending, Vec<i32>)> {
        let mut state = lock(&self.shared.state);
        let flight = state.in_flight.remove(&self.token)?;
        state.republishing += 1;
        let owned = state.owned_partitions(&self.shared.retry_topic);
        Some((flight.pending, owned))
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(&self) -> Result<(), BusError> {
        {
            let mut state = lock(&self.shared.state);
            let flight = state
                .in_flight
                .remove(&self.token)
                .ok_or_else(|| self.lease_lost())?;
            let p = &flight.pending;
            state.settle_offset(&p.tp, p.offset, p.epoch);
        }
        self.shared.wake_task();
        Ok(())
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        let (pending, owned) = self.take_for_republish().ok_or_else(|| self.lease_lost())?;
        republish_and_settle(
            self.bus.clone(),
            self.shared.clone(),
            pending,
            delay,
            Target::Mine,
            owned,
            "nack",
        )
        .await
    }

    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        {
            let mut state = lock(&self.shared.state);
            let flight = state
                .in_flight
                .get_mut(&self.token)
                .ok_or_else(|| self.lease_lost())?;
            flight.deadline = Instant::now() + lease;
        }
        self.shared.wake_task();
        Ok(())
    }

    fn abandon(&self) {
        let Some((pending, owned)) = self.take_for_republish() else {
            return;
        };
        let republish = republish_and_settle(
            self.bus.clone(),
            self.shared.clone(),
            pending,
            Duration::ZERO,
            Target::Mine,
            owned,
            "dropped unsettled",
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(republish);
            }
            Err(_) => {
                // No runtime to publish from: leave it to the group (its offset stays
                // uncommitted, so the next owner reads it again).
                let mut state = lock(&self.shared.state);
                state.republishing = state.republishing.saturating_sub(1);
                drop(state);
                error!(message_id = %self.message_id,
                       "delivery dropped outside a tokio runtime; it will be re-read by the group");
                self.shared.wake_task();
            }
        }
    }
}
