//! Test support: a corpus of hostile task bodies, and the check that each one landed exactly once
//! on its topic's `.rejected` companion with a bounded copy.
//!
//! The corpus is built per topic and per broker: only what the broker itself accepts from a plain
//! client goes in (SNS carries non-empty SQS text only, NATS caps a message at its `max_payload`,
//! Kafka at librdkafka's `message.max.bytes`, Pub/Sub attribute values at 1024 bytes). Every item
//! carries the attribute [`CORPUS_ID`], which the worker loop copies onto what it moves aside, so
//! the check can tell which item each copy is.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use millrace_bus::limits::{ATTR_BODY_BYTES, MAX_REASON_BYTES};
use millrace_bus::{
    rejected_topic, Attributes, Bus, Bytes, SubscribeOptions, ATTR_ATTEMPT, ATTR_ORIGIN_TOPIC,
    ATTR_REASON, INSPECT_GROUP,
};
use tokio::time::Instant;

/// The attribute naming a corpus item (set by the plain client, copied by the worker loop).
pub const CORPUS_ID: &str = "test-corpus-id";
/// The attribute carrying an oversized header value.
pub const BIG_HEADER: &str = "test-big-header";

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// What a broker accepts from a plain client, in one message.
#[derive(Clone, Copy, Debug)]
pub struct Broker {
    pub name: &'static str,
    /// Body and attributes together, in bytes.
    pub max_message: usize,
    /// Only non-empty text made of SQS characters (no NUL, no invalid UTF-8).
    pub text_only: bool,
    /// The longest attribute value.
    pub max_attribute_value: usize,
}

impl Broker {
    /// The in-memory bus: no broker, nothing refused; its declared 16 MiB is far above the corpus.
    pub const MEMORY: Broker = Broker {
        name: "memory",
        max_message: 16 * MIB,
        text_only: false,
        max_attribute_value: 100 * KIB,
    };
    /// RabbitMQ 3.10: `max_message_size` 128 MiB; a header must fit one 128 KiB frame.
    pub const AMQP: Broker = Broker {
        name: "amqp",
        max_message: 128 * MIB,
        text_only: false,
        max_attribute_value: 100 * KIB,
    };
    /// Kafka: librdkafka's default `message.max.bytes` (1,000,000) on the producer.
    pub const KAFKA: Broker = Broker {
        name: "kafka",
        max_message: 1_000_000,
        text_only: false,
        max_attribute_value: 100 * KIB,
    };
    /// SNS: 256 KiB of body and attributes, text only, no empty body.
    pub const SNS: Broker = Broker {
        name: "sns-sqs",
        max_message: 256 * KIB,
        text_only: true,
        max_attribute_value: 100 * KIB,
    };
    /// Pub/Sub: 10 MB per message; attribute values at most 1024 bytes.
    pub const PUBSUB: Broker = Broker {
        name: "pubsub",
        max_message: 10_000_000,
        text_only: false,
        max_attribute_value: 1024,
    };

    /// NATS JetStream: the server's `max_payload` (headers included); JetStream refuses headers
    /// over 64 KiB in all (error 10097), so the big header stays below that.
    pub fn nats(max_payload: usize) -> Broker {
        Broker {
            name: "nats",
            max_message: max_payload,
            text_only: false,
            max_attribute_value: 60 * KIB,
        }
    }
}

/// Which task a topic carries (the fields its hostile bodies stretch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Intake,
    Aggregate,
    Collect,
}

impl Kind {
    fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Intake => &["aggregation", "batch", "partition"],
            Kind::Aggregate => &["aggregation", "window", "batch"],
            Kind::Collect => &["aggregation", "window"],
        }
    }

    /// The task's JSON with `field` set to `value` (every other field plausible).
    fn task(self, field: &str, value: &str) -> Vec<u8> {
        let pick = |name: &str, default: &str| -> String {
            if name == field {
                value.to_string()
            } else {
                default.to_string()
            }
        };
        let window = pick("window", "20260101T0000Z-20260101T0100Z");
        let aggregation = pick("aggregation", "count");
        let batch = pick("batch", "b-1");
        let partition = pick("partition", "2026/01/01/00");
        let task = match self {
            Kind::Intake => serde_json::json!({
                "version": 1, "aggregation": aggregation, "batch": batch, "partition": partition,
            }),
            Kind::Aggregate => serde_json::json!({
                "version": 1, "aggregation": aggregation, "window": window,
                "batches": [{"batch": batch, "partition": partition}],
            }),
            Kind::Collect => serde_json::json!({
                "version": 1, "aggregation": aggregation, "window": window, "facilitator": 0,
            }),
        };
        serde_json::to_vec(&task).unwrap()
    }
}

/// One hostile message.
#[derive(Clone, Debug)]
pub struct Item {
    /// Unique in the whole corpus (the value of [`CORPUS_ID`]).
    pub id: String,
    pub body: Bytes,
    pub attributes: Attributes,
}

impl Item {
    /// Body and attributes together, as a broker counts them (roughly: names and values).
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// What one topic was sent.
#[derive(Clone, Debug)]
pub struct Sent {
    pub topic: String,
    pub items: Vec<Item>,
}

/// Room kept below a broker's cap for its own framing and header encoding.
const MARGIN: usize = KIB;

/// The corpus for one topic. `label` makes the ids unique across topics; `worker_limit` is the
/// largest body the worker loop reads (min(`--max-task-body`, the bus's `max_body_bytes()`));
/// `huge` adds the 5 MiB field where the broker takes it (kept to one topic per run so that the
/// volume stays modest).
pub fn corpus(
    kind: Kind,
    label: &str,
    broker: &Broker,
    worker_limit: usize,
    huge: bool,
) -> Vec<Item> {
    let mut items = Vec::new();
    let mut add = |name: &str, body: Vec<u8>, extra: Option<(&str, String)>| {
        let id = format!("{label}/{name}");
        let mut attributes = Attributes::new();
        attributes.insert(CORPUS_ID.to_string(), id.clone());
        if let Some((k, v)) = extra {
            attributes.insert(k.to_string(), v);
        }
        let item = Item {
            id,
            body: Bytes::from(body),
            attributes,
        };
        let text_ok =
            std::str::from_utf8(&item.body).is_ok_and(|t| !t.is_empty() && !t.contains('\0'));
        if item.size() + MARGIN <= broker.max_message && (text_ok || !broker.text_only) {
            items.push(item);
        }
    };
    let fields = kind.fields();
    // String fields (ids, aggregation, window, batch) far beyond any valid id.
    let mut sizes = vec![("1KiB", KIB), ("128KiB", 128 * KIB), ("1MiB", MIB)];
    if huge {
        sizes.push(("5MiB", 5 * MIB));
    }
    for (i, (name, len)) in sizes.into_iter().enumerate() {
        let field = fields[i % fields.len()];
        add(
            &format!("{field}-{name}"),
            kind.task(field, &"x".repeat(len)),
            None,
        );
    }
    // A body the broker only just takes (where that is below the larger fields).
    if broker.max_message <= 2 * MIB {
        let base = kind.task(fields[0], "").len() + CORPUS_ID.len() + label.len() + 32;
        let len = broker.max_message - MARGIN - base;
        add("broker-max", kind.task(fields[0], &"x".repeat(len)), None);
    }
    // Exactly at the worker's body limit (read, then refused for its id) and one byte over it
    // (refused unread).
    let base = kind.task(fields[0], "").len();
    let at = kind.task(fields[0], &"y".repeat(worker_limit - base));
    assert_eq!(at.len(), worker_limit);
    add("at-body-limit", at, None);
    let over = kind.task(fields[0], &"y".repeat(worker_limit + 1 - base));
    add("over-body-limit", over, None);
    // NUL bytes: raw (not JSON) and escaped (JSON, but an id no store key may hold).
    let mut raw_nul = kind.task(fields[0], "nul-here");
    let at_nul = raw_nul.windows(8).position(|w| w == b"nul-here").unwrap();
    raw_nul[at_nul + 3] = 0;
    add("raw-nul", raw_nul, None);
    add("escaped-nul", kind.task(fields[0], "a\0b\0c"), None);
    // Not UTF-8.
    let mut bad_utf8 = kind.task(fields[0], "utf8");
    let at_utf8 = bad_utf8.windows(4).position(|w| w == b"utf8").unwrap();
    bad_utf8[at_utf8] = 0xff;
    bad_utf8[at_utf8 + 1] = 0xfe;
    add("invalid-utf8", bad_utf8, None);
    // Deep nesting: 100,000 open brackets.
    add("deep-nesting", vec![b'['; 100_000], None);
    add("deep-object", "{\"a\":".repeat(20_000).into_bytes(), None);
    add("empty", Vec::new(), None);
    add("json-null", b"null".to_vec(), None);
    add(
        "path-traversal",
        kind.task(fields[0], "../../etc/passwd"),
        None,
    );
    // An oversized header on a body that is merely wrong (version 2).
    let mut v2 = kind.task(fields[0], "count");
    let at_v = v2.windows(11).position(|w| w == b"\"version\":1").unwrap();
    v2[at_v + 10] = b'2';
    add(
        "big-header",
        v2,
        Some((
            BIG_HEADER,
            "h".repeat(broker.max_attribute_value.min(100 * KIB)),
        )),
    );
    items
}

/// The corpus for every task topic under `prefix`: both facilitators' intake and aggregate
/// topics and the collect topic (the 5 MiB field on collect only).
pub fn corpus_for(prefix: &str, broker: &Broker, worker_limit: usize) -> Vec<Sent> {
    use millrace_protocol::tasks::topics;
    let mut sent = Vec::new();
    for f in 0..2u8 {
        for (kind, topic, label) in [
            (
                Kind::Intake,
                topics::intake(prefix, f),
                format!("intake{f}"),
            ),
            (
                Kind::Aggregate,
                topics::aggregate(prefix, f),
                format!("aggregate{f}"),
            ),
        ] {
            sent.push(Sent {
                items: corpus(kind, &label, broker, worker_limit, false),
                topic,
            });
        }
    }
    sent.push(Sent {
        items: corpus(Kind::Collect, "collect", broker, worker_limit, true),
        topic: topics::collect(prefix),
    });
    sent
}

/// One line per topic: how many items of how many bytes, and their names.
pub fn describe(sent: &[Sent]) -> String {
    let mut out = String::new();
    for s in sent {
        let bytes: usize = s.items.iter().map(Item::size).sum();
        let names: Vec<&str> = s
            .items
            .iter()
            .map(|i| i.id.split_once('/').map_or(i.id.as_str(), |(_, n)| n))
            .collect();
        out.push_str(&format!(
            "{}: {} items, {:.1} MiB: {}\n",
            s.topic,
            s.items.len(),
            bytes as f64 / MIB as f64,
            names.join(", ")
        ));
    }
    out
}

/// The largest body the worker loop reads on a bus with `limits`, at the default
/// `--max-task-body` (256 KiB).
pub fn worker_limit(limits: &millrace_bus::Limits) -> usize {
    (256 * KIB).min(limits.max_body_bytes())
}

/// One copy found on a `.rejected` topic.
struct Copy {
    body: Bytes,
    attributes: Attributes,
}

/// Reads every `.rejected` companion of `sent`'s topics with the `inspect` group until each item
/// has arrived and nothing more comes for `quiet` (or `deadline` passes), then checks: each item
/// exactly once and at its first attempt, its reason at most [`MAX_REASON_BYTES`] (and naming
/// the body's size when it is over `worker_limit`), its origin topic right, every attribute
/// value bounded, its body the original (or, if cut to fit the broker, a prefix of it with
/// [`ATTR_BODY_BYTES`] giving the original length), and nothing else there. Returns one line per
/// topic for the test's output; panics with every problem found.
pub async fn check_rejected(
    bus: Arc<dyn Bus>,
    sent: &[Sent],
    worker_limit: usize,
    deadline: Duration,
    quiet: Duration,
) -> Vec<String> {
    let until = Instant::now() + deadline;
    let reads = sent.iter().map(|s| {
        let bus = bus.clone();
        async move {
            let topic = rejected_topic(&s.topic);
            let expected: BTreeSet<&str> = s.items.iter().map(|i| i.id.as_str()).collect();
            let copies = read_until_quiet(bus, &topic, &expected, until, quiet).await;
            (s, copies)
        }
    });
    let results = futures::future::join_all(reads).await;
    let mut problems = Vec::new();
    let mut summary = Vec::new();
    for (s, copies) in results {
        let topic = rejected_topic(&s.topic);
        let mut by_id: BTreeMap<String, Vec<&Copy>> = BTreeMap::new();
        for copy in &copies {
            match copy.attributes.get(CORPUS_ID) {
                Some(id) => by_id.entry(id.clone()).or_default().push(copy),
                None => problems.push(format!(
                    "{topic}: a copy that is no corpus item: attributes {:?}, body {} bytes: {:?}",
                    shown(&copy.attributes),
                    copy.body.len(),
                    String::from_utf8_lossy(&copy.body[..copy.body.len().min(200)])
                )),
            }
        }
        let mut cut = 0;
        for item in &s.items {
            let found = by_id.remove(&item.id).unwrap_or_default();
            if found.len() != 1 {
                problems.push(format!(
                    "{topic}: item {} ({} bytes) is there {} times, not once",
                    item.id,
                    item.body.len(),
                    found.len()
                ));
            }
            for copy in found {
                let a = &copy.attributes;
                match a.get(ATTR_REASON) {
                    Some(r) if r.len() <= MAX_REASON_BYTES => {}
                    Some(r) => problems.push(format!(
                        "{topic}: item {}: reason of {} bytes (at most {MAX_REASON_BYTES})",
                        item.id,
                        r.len()
                    )),
                    None => problems.push(format!("{topic}: item {}: no {ATTR_REASON}", item.id)),
                }
                if a.get(ATTR_ORIGIN_TOPIC) != Some(&s.topic) {
                    problems.push(format!(
                        "{topic}: item {}: {ATTR_ORIGIN_TOPIC} is {:?}, not {:?}",
                        item.id,
                        a.get(ATTR_ORIGIN_TOPIC),
                        s.topic
                    ));
                }
                // Refused at the first delivery: a higher attempt means the message came back
                // (an ack lost with a connection the copy broke, say).
                if a.get(ATTR_ATTEMPT).map(String::as_str) != Some("1") {
                    problems.push(format!(
                        "{topic}: item {}: {ATTR_ATTEMPT} is {:?}",
                        item.id,
                        a.get(ATTR_ATTEMPT)
                    ));
                }
                // A body over the worker's limit is refused unread, for its size.
                let size = item.body.len().to_string();
                if item.body.len() > worker_limit
                    && !a.get(ATTR_REASON).is_some_and(|r| r.contains(&size))
                {
                    problems.push(format!(
                        "{topic}: item {}: {} bytes, over the body limit of {worker_limit}, but \
                         the reason does not say its size: {:?}",
                        item.id,
                        item.body.len(),
                        a.get(ATTR_REASON)
                    ));
                }
                for (k, v) in a {
                    if k != ATTR_REASON && v.len() > MAX_REASON_BYTES {
                        problems.push(format!(
                            "{topic}: item {}: attribute {k} carries {} bytes (at most {MAX_REASON_BYTES})",
                            item.id,
                            v.len()
                        ));
                    }
                }
                if copy.body == item.body {
                    if a.contains_key(ATTR_BODY_BYTES) {
                        problems.push(format!(
                            "{topic}: item {}: whole body, yet {ATTR_BODY_BYTES} = {:?}",
                            item.id, a[ATTR_BODY_BYTES]
                        ));
                    }
                } else if copy.body.len() < item.body.len()
                    && item.body.starts_with(&copy.body)
                    && a.get(ATTR_BODY_BYTES) == Some(&item.body.len().to_string())
                {
                    cut += 1;
                } else {
                    problems.push(format!(
                        "{topic}: item {}: body of {} bytes is neither the original ({} bytes) nor \
                         a prefix of it with {ATTR_BODY_BYTES} = its length ({:?})",
                        item.id,
                        copy.body.len(),
                        item.body.len(),
                        a.get(ATTR_BODY_BYTES)
                    ));
                }
            }
        }
        for (id, copies) in by_id {
            problems.push(format!(
                "{topic}: {} copies of {id:?}, which was not sent to this topic",
                copies.len()
            ));
        }
        summary.push(format!(
            "{topic}: {} copies of {} items ({cut} with the body cut to fit)",
            copies.len(),
            s.items.len()
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problems on the .rejected topics:\n{}",
        problems.len(),
        problems.join("\n")
    );
    summary
}

/// Attributes for a failure message, each value cut to 100 bytes.
fn shown(attributes: &Attributes) -> BTreeMap<&str, String> {
    attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.chars().take(100).collect()))
        .collect()
}

async fn read_until_quiet(
    bus: Arc<dyn Bus>,
    topic: &str,
    expected: &BTreeSet<&str>,
    until: Instant,
    quiet: Duration,
) -> Vec<Copy> {
    let mut sub = bus
        .subscribe(
            topic,
            SubscribeOptions::new(INSPECT_GROUP)
                .lease(Duration::from_secs(60))
                .prefetch(10),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribing to {topic} as {INSPECT_GROUP}: {e}"));
    let mut copies = Vec::new();
    let mut seen = BTreeSet::new();
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        let all = expected.iter().all(|id| seen.contains(*id));
        let stop = if all {
            (last + quiet).min(until)
        } else {
            until
        };
        if now >= stop {
            break;
        }
        match tokio::time::timeout(stop - now, sub.next()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                // A transient receive error: say so and keep reading until the deadline.
                eprintln!("{topic}: receive: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Ok(delivery)) => {
                if let Some(id) = delivery.attributes.get(CORPUS_ID) {
                    seen.insert(id.clone());
                }
                copies.push(Copy {
                    body: delivery.body.clone(),
                    attributes: delivery.attributes.clone(),
                });
                delivery
                    .ack()
                    .await
                    .unwrap_or_else(|e| panic!("{topic}: ack: {e}"));
                last = Instant::now();
            }
        }
    }
    let _ = sub.close().await;
    copies
}
