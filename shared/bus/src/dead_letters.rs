//! Dead letters an operator can act on: list, show, redrive and purge what the worker loop moved
//! to `{topic}.dead`, on every backend, through the [`Bus`] trait alone.
//!
//! Why it lives here and not in the `millrace` command: the conformance suite
//! ([`crate::conformance::dead_letters_list_redrive_and_purge`]) runs exactly this code against
//! every backend, so a backend on which a listing would consume messages, or a redrive would lose
//! an attribute, fails its own suite. The command only parses flags and prints.
//!
//! # How it works
//!
//! Every operation is one *scan*: it subscribes to `{topic}.dead` with the
//! [`INSPECT_GROUP`](crate::INSPECT_GROUP) (the group services create beside every `.dead` topic,
//! so that what lands there is kept), receives for a bounded time ([`ScanOptions`]: until nothing
//! new came for `idle`, at most `max_wait`, at most `limit` messages) while holding every
//! delivery unsettled, with a lease longer than the whole operation. Holding them is what makes
//! the scan see each message once: a message released during the scan would come straight back.
//! Then it acts on the selected messages (ack to purge; publish the original, then ack, to
//! redrive) and releases every other one with `nack(release_delay)` (6 s by default, see
//! [`ScanOptions::release_delay`]), so that it is deliverable again to the next scan. Messages are shown sorted by id (digits compared as
//! numbers), so positions are stable between two scans of an unchanged topic.
//!
//! # What a listing changes, per backend
//!
//! A listing removes nothing, but a released message counts as delivered once more on every
//! backend, and on some it is physically a new copy; and it is deliverable again only after the
//! release delay (6 s; a later scan waits that long before it concludes the topic is empty). No
//! worker consumes `.dead` topics, so nothing acts on these counts; the dead copy's own
//! `millrace-attempt` (the attempt at which it was dead-lettered) never changes.
//!
//! * memory: held in the group's delayed set, then back in its queue; its delivery count rises.
//! * amqp (RabbitMQ): `nack` republishes the message through a wait queue to the `inspect` queue
//!   with `x-millrace-attempt` + 1 and acks the old one: same `message_id`, now at the back.
//! * nats (JetStream): a NAK with the delay; the stream keeps the message where it is (same id,
//!   the stream sequence); `num_delivered` rises. The consumer has no `max_deliver`, so it is
//!   never dropped. (Why the delay is not zero: [`ScanOptions::release_delay`].)
//! * kafka: republished to `{topic}.dead.retry` for the `inspect` group (same id, carried in a
//!   header; attempt + 1, a not-before time) and the original's offset committed past.
//! * sns-sqs: `ChangeMessageVisibility`; `ApproximateReceiveCount` rises, as on every receive.
//!   The queues have no redrive policy, so repeated listings cannot move a message anywhere.
//! * pubsub: `nack` republishes a copy to `{topic}.dead` (same id, in a bookkeeping attribute) and
//!   acks the old one. A subscription created outside Millrace *with* a service-side dead-letter
//!   policy would count these deliveries towards that policy: do not attach one to `inspect`.
//!
//! A scan that ends abnormally (the process killed) leaves what it held with the broker until its
//! lease (`max_wait` + [`HOLD_MARGIN`]) has run out: invisible on SQS, Pub/Sub and NATS.
//!
//! Known gap: against the Pub/Sub emulator the conformance case does not pass yet: messages a
//! scan released are not all delivered to the next scan within the case's 30 s (with a 1 ms
//! release delay two listings pass, and a later scan still misses some). Where they go between
//! the closing subscription's stream and the next one is not yet understood.
//!
//! Two scans of the same `.dead` topic at once share its messages between them (they are
//! competing consumers of one group): each sees only part. Run one at a time.
//!
//! # Redrive
//!
//! A redrive republishes the original body and the original attributes (the dead copy's minus
//! [`ADDED_WHEN_DEAD_LETTERED`]) to the original topic, and only once the bus accepted it acks the
//! dead copy. The redriven message starts again at attempt 1. Refused, and left on `.dead`:
//!
//! * a copy whose body was cut to fit the broker ([`ATTR_BODY_BYTES`] present): its original body
//!   is gone, and a partial task is not the task;
//! * a copy whose `millrace-origin-topic` names another topic than the one asked for.
//!
//! A copy that lost attributes to the broker's caps ([`ATTR_DROPPED_ATTRIBUTES`]) is redriven
//! with what it kept (trace context and the like; Millrace's tasks are their bodies) and the
//! report says so.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::limits::{bounded_text, ATTR_BODY_BYTES, ATTR_DROPPED_ATTRIBUTES};
use crate::{
    dead_topic, Attributes, Bus, BusError, Bytes, Delivery, Message, SubscribeOptions,
    Subscription, ATTR_ATTEMPT, ATTR_ORIGIN_TOPIC, ATTR_REASON, INSPECT_GROUP,
};

/// The attributes the worker loop adds to a copy it moves to `{topic}.dead` (see
/// `millrace_runtime::worker` and [`crate::limits::bound_copy`]); a redrive leaves them out.
pub const ADDED_WHEN_DEAD_LETTERED: [&str; 5] = [
    ATTR_REASON,
    ATTR_ATTEMPT,
    ATTR_ORIGIN_TOPIC,
    ATTR_BODY_BYTES,
    ATTR_DROPPED_ATTRIBUTES,
];

/// How long past `max_wait` the deliveries of a scan are leased, for acting on them and releasing
/// them afterwards.
pub const HOLD_MARGIN: Duration = Duration::from_secs(120);

/// The original topic of `topic`, which may be given with or without its `.dead` suffix.
pub fn origin_topic(topic: &str) -> &str {
    topic.strip_suffix(".dead").unwrap_or(topic)
}

/// How long and how much one scan of a `.dead` topic receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanOptions {
    /// The scan ends once nothing new has arrived for this long.
    pub idle: Duration,
    /// The scan ends after this long whatever still arrives (the result is then marked
    /// incomplete).
    pub max_wait: Duration,
    /// The most messages one scan holds (also the prefetch asked of the bus); a topic with more
    /// is handled in several runs.
    pub limit: usize,
    /// What a scan releases is deliverable again only after this (`nack(release_delay)`), and a
    /// scan is not over before `idle` has passed after this, so that it sees what the scan before
    /// it released. Not zero because of NATS: the server sends a message nak'ed without
    /// a delay at once to a pull request it still holds, and the one a scan has just withdrawn
    /// (its inbox unsubscribed) stays there until it expires (5 s): the message would then wait
    /// out the scan's whole lease. A delay past that expiry avoids it on every backend alike.
    pub release_delay: Duration,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            idle: Duration::from_secs(3),
            max_wait: Duration::from_secs(30),
            limit: 1000,
            release_delay: Duration::from_secs(6),
        }
    }
}

/// Which dead letters an operation acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every message the scan received.
    All,
    /// The message with this id (as `list` shows it).
    Id(String),
    /// The message at this position (1-based) in the order `list` shows.
    Position(usize),
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selection::All => f.write_str("all messages"),
            Selection::Id(id) => write!(f, "message {id:?}"),
            Selection::Position(n) => write!(f, "position {n}"),
        }
    }
}

/// Errors of a dead-letter operation.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The bus failed while reading `topic`.
    #[error("{topic}: {source}")]
    Bus {
        topic: String,
        #[source]
        source: BusError,
    },
    /// Nothing on the topic matched the selection.
    #[error("{topic}: no {selection} among the {seen} message(s) found there{}", if *.complete { "" } else { " (the scan stopped before the topic was exhausted)" })]
    NotFound {
        topic: String,
        selection: String,
        seen: usize,
        complete: bool,
    },
    /// Position 0 or an empty id.
    #[error("{0}")]
    InvalidSelection(String),
    /// The copy on `.dead` is not the whole original; it stays on `.dead`.
    #[error("message {id} on {topic}: its body was cut to {kept} of {original} bytes to fit the broker when it was dead-lettered, so the original task cannot be redriven faithfully; it stays on {topic} (purge it once it is handled)")]
    BodyCut {
        id: String,
        topic: String,
        kept: usize,
        original: String,
    },
    /// The copy says it came from another topic than the one asked for; it stays on `.dead`.
    #[error("message {id} on {topic}: it was dead-lettered from {origin:?}, not {expected:?}; not redriven")]
    OtherOrigin {
        id: String,
        topic: String,
        origin: String,
        expected: String,
    },
    /// Publishing the original failed; the dead copy stays.
    #[error("message {id}: republishing it to {to} failed, it stays on {topic}: {source}")]
    Republish {
        id: String,
        topic: String,
        to: String,
        #[source]
        source: BusError,
    },
}

/// One message on a `.dead` topic, as received by a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// 1-based, in the order shown (sorted by id).
    pub position: usize,
    /// The bus's id of the dead copy (what `--id` takes).
    pub id: String,
    pub body: Bytes,
    /// The dead copy's attributes: the worker's ([`ADDED_WHEN_DEAD_LETTERED`]) and the original's.
    pub attributes: Attributes,
    /// How often the `inspect` group has been handed this copy (listings count too).
    pub deliveries: u32,
}

impl DeadLetter {
    /// Why the worker gave up on it.
    pub fn reason(&self) -> Option<&str> {
        self.attributes.get(ATTR_REASON).map(String::as_str)
    }

    /// The attempt at which it was dead-lettered.
    pub fn attempt(&self) -> Option<&str> {
        self.attributes.get(ATTR_ATTEMPT).map(String::as_str)
    }

    /// The topic it was dead-lettered from, as the worker recorded it.
    pub fn origin(&self) -> Option<&str> {
        self.attributes.get(ATTR_ORIGIN_TOPIC).map(String::as_str)
    }

    /// The original body's length if the copy's body was cut (as recorded; not parsed, so that a
    /// malformed value is still shown and still refused).
    pub fn body_cut_from(&self) -> Option<&str> {
        self.attributes.get(ATTR_BODY_BYTES).map(String::as_str)
    }

    /// How many of the original's attributes the copy could not carry.
    pub fn dropped_attributes(&self) -> Option<&str> {
        self.attributes
            .get(ATTR_DROPPED_ATTRIBUTES)
            .map(String::as_str)
    }

    /// The original's attributes: the copy's without those the worker added.
    pub fn original_attributes(&self) -> Attributes {
        self.attributes
            .iter()
            .filter(|(k, _)| !ADDED_WHEN_DEAD_LETTERED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A short, printable start of the body (control characters escaped).
    pub fn preview(&self, max: usize) -> String {
        let text = String::from_utf8_lossy(&self.body);
        bounded_text(&text, max).into_owned()
    }

    /// The original message, as it was before it was dead-lettered, for republishing to
    /// `expected_origin`; refused if the copy is not faithful or came from elsewhere.
    pub fn original(&self, dead: &str, expected_origin: &str) -> Result<Message, DeadLetterError> {
        if let Some(original) = self.body_cut_from() {
            return Err(DeadLetterError::BodyCut {
                id: self.id.clone(),
                topic: dead.to_string(),
                kept: self.body.len(),
                original: original.to_string(),
            });
        }
        if let Some(origin) = self.origin() {
            if origin != expected_origin {
                return Err(DeadLetterError::OtherOrigin {
                    id: self.id.clone(),
                    topic: dead.to_string(),
                    origin: origin.to_string(),
                    expected: expected_origin.to_string(),
                });
            }
        }
        Ok(Message {
            body: self.body.clone(),
            attributes: self.original_attributes(),
        })
    }
}

/// What a scan found.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The `.dead` topic read.
    pub topic: String,
    /// Sorted by id.
    pub letters: Vec<DeadLetter>,
    /// False if the scan stopped at `max_wait` or `limit` while messages were still coming: there
    /// may be more than listed.
    pub complete: bool,
}

/// One redriven message.
#[derive(Clone, Debug)]
pub struct Redriven {
    pub letter: DeadLetter,
    /// The id the bus gave the republished original (`None` in a dry run).
    pub new_id: Option<String>,
    /// Set if the original was republished but the dead copy could not be removed: it is still on
    /// `.dead` (purge it by id; the workers are idempotent, so the duplicate is harmless).
    pub still_on_dead: Option<String>,
}

/// What `redrive` did.
#[derive(Debug)]
pub struct RedriveReport {
    pub topic: String,
    /// Where the originals went.
    pub to: String,
    pub dry_run: bool,
    pub redriven: Vec<Redriven>,
    /// Refused or failed, each with its error; they stay on `.dead`.
    pub refused: Vec<(DeadLetter, DeadLetterError)>,
    pub complete: bool,
}

/// What `purge` did.
#[derive(Debug)]
pub struct PurgeReport {
    pub topic: String,
    pub dry_run: bool,
    /// Removed (or, in a dry run, those that would be).
    pub purged: Vec<DeadLetter>,
    /// Selected but could not be removed, each with the bus's error.
    pub failed: Vec<(DeadLetter, BusError)>,
    pub complete: bool,
}

/// Lists `{topic}.dead` without removing anything (`topic` with or without `.dead`).
pub async fn list(
    bus: &dyn Bus,
    topic: &str,
    options: &ScanOptions,
) -> Result<Listing, DeadLetterError> {
    let scan = Scan::receive(bus, topic, options).await?;
    let listing = Listing {
        topic: scan.topic.clone(),
        letters: scan.letters(),
        complete: scan.complete,
    };
    scan.finish().await;
    Ok(listing)
}

/// One message of `{topic}.dead`, whole; nothing is removed.
pub async fn show(
    bus: &dyn Bus,
    topic: &str,
    which: &Selection,
    options: &ScanOptions,
) -> Result<DeadLetter, DeadLetterError> {
    if *which == Selection::All {
        return Err(DeadLetterError::InvalidSelection(
            "show takes one message: an id or a position".to_string(),
        ));
    }
    let scan = {
        check(which)?;
        Scan::receive(bus, topic, options).await?
    };
    let found = scan.selected(which);
    scan.finish().await;
    let mut found = found?;
    match found.pop() {
        Some((_, letter)) => Ok(letter),
        None => Err(DeadLetterError::InvalidSelection(format!(
            "nothing selected by {which}"
        ))),
    }
}

/// Republishes the selected dead letters' originals to the original topic and removes them from
/// `{topic}.dead`; with `dry_run`, only says what it would do.
pub async fn redrive(
    bus: &dyn Bus,
    topic: &str,
    which: &Selection,
    dry_run: bool,
    options: &ScanOptions,
) -> Result<RedriveReport, DeadLetterError> {
    let mut scan = {
        check(which)?;
        Scan::receive(bus, topic, options).await?
    };
    let to = origin_topic(topic).to_string();
    let selected = match scan.selected(which) {
        Ok(selected) => selected,
        Err(e) => {
            scan.finish().await;
            return Err(e);
        }
    };
    let mut report = RedriveReport {
        topic: scan.topic.clone(),
        to: to.clone(),
        dry_run,
        redriven: Vec::new(),
        refused: Vec::new(),
        complete: scan.complete,
    };
    for (index, letter) in selected {
        let original = match letter.original(&scan.topic, &to) {
            Ok(original) => original,
            Err(e) => {
                report.refused.push((letter, e));
                continue;
            }
        };
        if dry_run {
            report.redriven.push(Redriven {
                letter,
                new_id: None,
                still_on_dead: None,
            });
            continue;
        }
        match bus.publish(&to, original).await {
            Ok(new_id) => {
                let still_on_dead = match scan.take(index) {
                    Some(held) => held.ack().await.err().map(|e| e.to_string()),
                    None => Some("the delivery was no longer held".to_string()),
                };
                report.redriven.push(Redriven {
                    letter,
                    new_id: Some(new_id),
                    still_on_dead,
                });
            }
            Err(source) => report.refused.push((
                letter.clone(),
                DeadLetterError::Republish {
                    id: letter.id,
                    topic: scan.topic.clone(),
                    to: to.clone(),
                    source,
                },
            )),
        }
    }
    if !dry_run && !report.redriven.is_empty() {
        // Everything republished is with the broker before the scan lets go of anything.
        if let Err(source) = bus.flush().await {
            scan.finish().await;
            return Err(DeadLetterError::Bus { topic: to, source });
        }
    }
    scan.finish().await;
    Ok(report)
}

/// Removes the selected dead letters from `{topic}.dead`; with `dry_run`, only says which.
pub async fn purge(
    bus: &dyn Bus,
    topic: &str,
    which: &Selection,
    dry_run: bool,
    options: &ScanOptions,
) -> Result<PurgeReport, DeadLetterError> {
    let mut scan = {
        check(which)?;
        Scan::receive(bus, topic, options).await?
    };
    let selected = match scan.selected(which) {
        Ok(selected) => selected,
        Err(e) => {
            scan.finish().await;
            return Err(e);
        }
    };
    let mut report = PurgeReport {
        topic: scan.topic.clone(),
        dry_run,
        purged: Vec::new(),
        failed: Vec::new(),
        complete: scan.complete,
    };
    for (index, letter) in selected {
        if dry_run {
            report.purged.push(letter);
            continue;
        }
        match scan.take(index) {
            Some(held) => match held.ack().await {
                Ok(()) => report.purged.push(letter),
                Err(e) => report.failed.push((letter, e)),
            },
            None => report.failed.push((
                letter.clone(),
                BusError::LeaseLost {
                    message_id: letter.id,
                },
            )),
        }
    }
    scan.finish().await;
    Ok(report)
}

/// Checks a selection. Every scan reads the topic until it is quiet, even one looking for one id:
/// stopping while messages are still on their way would leave those in flight (on NATS, sent to
/// a pull request being withdrawn, they come back only after the scan's lease).
fn check(which: &Selection) -> Result<(), DeadLetterError> {
    match which {
        Selection::All => Ok(()),
        Selection::Id(id) if id.trim().is_empty() => Err(DeadLetterError::InvalidSelection(
            "the message id is empty".to_string(),
        )),
        Selection::Position(0) => Err(DeadLetterError::InvalidSelection(
            "positions start at 1".to_string(),
        )),
        Selection::Position(_) | Selection::Id(_) => Ok(()),
    }
}

/// Compares ids with runs of digits compared as numbers (`mem-9` before `mem-10`).
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let run_a = a.len() - a.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let run_b = b.len() - b.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                let (da, db) = (
                    a[..run_a].trim_start_matches('0'),
                    b[..run_b].trim_start_matches('0'),
                );
                let order = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if order != Ordering::Equal {
                    return order;
                }
                a = &a[run_a..];
                b = &b[run_b..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                a = &a[x.len_utf8()..];
                b = &b[y.len_utf8()..];
            }
        }
    }
}

/// The deliveries one scan holds, sorted by id, until it finishes.
struct Scan {
    topic: String,
    subscription: Box<dyn Subscription>,
    /// `None` once taken to be settled.
    held: Vec<Option<Held>>,
    ids: Vec<String>,
    letters: Vec<DeadLetter>,
    complete: bool,
    release_delay: Duration,
}

impl Scan {
    /// Receives from `{topic}.dead` in the inspect group, holding every delivery, until `idle`
    /// passes with nothing new (and at least `release_delay`), or `max_wait` or `limit` is reached.
    async fn receive(
        bus: &dyn Bus,
        topic: &str,
        options: &ScanOptions,
    ) -> Result<Scan, DeadLetterError> {
        let dead = dead_topic(origin_topic(topic));
        let bus_error = |source| DeadLetterError::Bus {
            topic: dead.clone(),
            source,
        };
        let limit = options.limit.max(1);
        let subscribe = SubscribeOptions::new(INSPECT_GROUP)
            .lease(options.max_wait + HOLD_MARGIN)
            .prefetch(limit);
        let mut subscription = bus.subscribe(&dead, subscribe).await.map_err(bus_error)?;
        let started = Instant::now();
        // Not quiet before a whole `idle` has passed after `release_delay`: what an earlier scan
        // released comes back then, and a backend may take a poll to notice.
        let quiet_from = started + options.release_delay + options.idle;
        let deadline = started
            + options
                .max_wait
                .max(options.release_delay + options.idle + options.idle);
        let mut held: Vec<Held> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let complete;
        loop {
            if held.len() >= limit {
                complete = false;
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                complete = false;
                break;
            }
            let wait = options.idle.min(deadline - now);
            match tokio::time::timeout(wait, subscription.next()).await {
                Err(_) if Instant::now() < quiet_from => {
                    // What an earlier scan released may not be due yet.
                    continue;
                }
                Err(_) => {
                    // Quiet for the whole `idle`: the topic is exhausted. Cut short by the
                    // deadline: there may be more.
                    complete = wait == options.idle;
                    break;
                }
                Ok(Ok(delivery)) => {
                    match index.get(&delivery.message_id) {
                        // The same message again (a copy the broker still had on its way, or a
                        // republished one): kept beside the first and settled with it. Dropping
                        // either would hand the message back while it is held, and it would come
                        // straight back again.
                        Some(&at) => held[at].duplicates.push(delivery),
                        None => {
                            index.insert(delivery.message_id.clone(), held.len());
                            held.push(Held {
                                delivery,
                                duplicates: Vec::new(),
                            });
                        }
                    }
                }
                Ok(Err(e)) => {
                    release(
                        held.into_iter().flat_map(Held::into_all).collect(),
                        options.release_delay,
                    )
                    .await;
                    let _ = subscription.close().await;
                    return Err(bus_error(e));
                }
            }
        }
        // The subscription stays open until `finish`: see there.
        held.sort_by(|a, b| natural_cmp(&a.delivery.message_id, &b.delivery.message_id));
        let letters = held
            .iter()
            .enumerate()
            .map(|(i, Held { delivery: d, .. })| DeadLetter {
                position: i + 1,
                id: d.message_id.clone(),
                body: d.body.clone(),
                attributes: d.attributes.clone(),
                deliveries: d.attempt,
            })
            .collect();
        Ok(Scan {
            topic: dead,
            subscription,
            ids: held.iter().map(|h| h.delivery.message_id.clone()).collect(),
            held: held.into_iter().map(Some).collect(),
            letters,
            complete,
            release_delay: options.release_delay,
        })
    }

    fn letters(&self) -> Vec<DeadLetter> {
        self.letters.clone()
    }

    /// The one letter `which` names, with its index.
    fn select(&self, which: &Selection) -> Option<(DeadLetter, usize)> {
        let at = match which {
            Selection::All => return None,
            Selection::Id(id) => self.ids.iter().position(|x| x == id)?,
            Selection::Position(n) => n.checked_sub(1).filter(|i| *i < self.letters.len())?,
        };
        Some((self.letters[at].clone(), at))
    }

    /// The letters `which` names, with their indexes; `NotFound` if it names one that is not here.
    fn selected(&self, which: &Selection) -> Result<Vec<(usize, DeadLetter)>, DeadLetterError> {
        match which {
            Selection::All => Ok(self.letters.iter().cloned().enumerate().collect()),
            _ => match self.select(which) {
                Some((letter, at)) => Ok(vec![(at, letter)]),
                None => Err(DeadLetterError::NotFound {
                    topic: self.topic.clone(),
                    selection: which.to_string(),
                    seen: self.letters.len(),
                    complete: self.complete,
                }),
            },
        }
    }

    /// Takes the delivery at `index` out of the scan, to settle it.
    fn take(&mut self, index: usize) -> Option<Held> {
        self.held.get_mut(index).and_then(Option::take)
    }

    /// Stops receiving (the bus hands back what it prefetched beyond what the scan holds),
    /// releases every delivery not taken with `nack(release_delay)` (see
    /// [`ScanOptions::release_delay`]), then lets go of the group.
    async fn finish(mut self) {
        if let Err(e) = self.subscription.close().await {
            tracing::warn!(topic = %self.topic, error = %e, "dead letters: closing the scan's subscription failed");
        }
        let rest: Vec<Delivery> = self
            .held
            .iter_mut()
            .filter_map(Option::take)
            .flat_map(Held::into_all)
            .collect();
        release(rest, self.release_delay).await;
        // Everything is settled now: closing again waits until the backend has let go of the
        // group (Kafka commits and leaves it), so that the next scan finds it free.
        if let Err(e) = self.subscription.close().await {
            tracing::warn!(topic = %self.topic, error = %e, "dead letters: letting go of the inspect group failed");
        }
    }
}

/// One message held by a scan: its first delivery, and any further delivery of the same id that
/// arrived while it was held.
struct Held {
    delivery: Delivery,
    duplicates: Vec<Delivery>,
}

impl Held {
    fn into_all(self) -> impl Iterator<Item = Delivery> {
        std::iter::once(self.delivery).chain(self.duplicates)
    }

    /// Acks the message; its duplicates are acked too (on a broker where they are copies, each
    /// copy would otherwise stay), their errors ignored (where they are the same message, it is
    /// already gone).
    async fn ack(self) -> Result<(), BusError> {
        let result = self.delivery.ack().await;
        for duplicate in self.duplicates {
            let _ = duplicate.ack().await;
        }
        result
    }
}

/// Hands every delivery back to the group, deliverable again after `delay`.
async fn release(deliveries: Vec<Delivery>, delay: Duration) {
    for delivery in deliveries {
        let id = delivery.message_id.clone();
        if let Err(e) = delivery.nack(delay).await {
            // Lost or failed: the bus hands it back itself once its lease runs out.
            tracing::warn!(message_id = %bounded_text(&id, 128), error = %e, "dead letters: releasing a message failed; it returns when its lease runs out");
        }
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use crate::memory::MemoryBus;

    fn quick() -> ScanOptions {
        ScanOptions {
            idle: Duration::from_millis(200),
            max_wait: Duration::from_secs(5),
            limit: 100,
            release_delay: Duration::from_millis(1),
        }
    }

    #[test]
    fn ids_sort_with_numbers_compared_as_numbers() {
        let mut ids = vec!["mem-10", "mem-9", "mem-100", "a/1/2", "a/1/10", "mem-09x"];
        ids.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            ids,
            vec!["a/1/2", "a/1/10", "mem-9", "mem-09x", "mem-10", "mem-100"]
        );
    }

    #[test]
    fn the_topic_may_be_given_with_or_without_dead() {
        assert_eq!(origin_topic("m.0.intake.dead"), "m.0.intake");
        assert_eq!(origin_topic("m.0.intake"), "m.0.intake");
        assert_eq!(
            dead_topic(origin_topic("m.0.intake.dead")),
            "m.0.intake.dead"
        );
    }

    async fn dead_bus(topic: &str, messages: Vec<Message>) -> MemoryBus {
        let bus = MemoryBus::new();
        bus.create_topic(topic, Some("w")).await.unwrap();
        bus.create_topic(&dead_topic(topic), Some(INSPECT_GROUP))
            .await
            .unwrap();
        for m in messages {
            bus.publish(&dead_topic(topic), m).await.unwrap();
        }
        bus
    }

    fn dead_copy(body: &str, original: &[(&str, &str)]) -> Message {
        let mut m = Message::new(body.to_string())
            .with_attribute(ATTR_REASON, "store unreachable")
            .with_attribute(ATTR_ATTEMPT, "8")
            .with_attribute(ATTR_ORIGIN_TOPIC, "m.intake");
        for (k, v) in original {
            m = m.with_attribute(*k, *v);
        }
        m
    }

    #[tokio::test]
    async fn a_cut_copy_is_refused_by_name_and_stays_on_dead() {
        let cut = dead_copy("{\"trunc", &[]).with_attribute(ATTR_BODY_BYTES, "900000");
        let whole = dead_copy("{\"whole\":1}", &[("traceparent", "00-ab-cd-01")]);
        let bus = dead_bus("m.intake", vec![cut, whole]).await;
        let report = redrive(&bus, "m.intake", &Selection::All, false, &quick())
            .await
            .unwrap();
        assert_eq!(report.redriven.len(), 1);
        assert_eq!(&report.redriven[0].letter.body[..], b"{\"whole\":1}");
        assert_eq!(report.refused.len(), 1);
        let (letter, error) = &report.refused[0];
        let text = error.to_string();
        assert!(
            matches!(error, DeadLetterError::BodyCut { .. })
                && text.contains(&letter.id)
                && text.contains("900000"),
            "{text}"
        );
        let left = list(&bus, "m.intake.dead", &quick()).await.unwrap();
        assert_eq!(left.letters.len(), 1);
        assert_eq!(&left.letters[0].body[..], b"{\"trunc");
        // The whole one is on the original topic with only its own attribute.
        let mut sub = bus
            .subscribe("m.intake", SubscribeOptions::new("w"))
            .await
            .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&d.body[..], b"{\"whole\":1}");
        assert_eq!(
            d.attributes,
            Attributes::from([("traceparent".to_string(), "00-ab-cd-01".to_string())])
        );
        assert_eq!(d.attempt, 1);
    }

    #[tokio::test]
    async fn show_and_purge_by_position_and_id_and_unknown_ids_are_named() {
        let bus = dead_bus(
            "m.intake",
            vec![dead_copy("{\"a\":1}", &[]), dead_copy("{\"b\":2}", &[])],
        )
        .await;
        let listing = list(&bus, "m.intake", &quick()).await.unwrap();
        assert!(listing.complete);
        assert_eq!(listing.letters.len(), 2);
        let second = show(&bus, "m.intake", &Selection::Position(2), &quick())
            .await
            .unwrap();
        assert_eq!(
            second,
            DeadLetter {
                deliveries: 2,
                ..listing.letters[1].clone()
            }
        );
        assert_eq!(second.reason(), Some("store unreachable"));

        let missing = purge(
            &bus,
            "m.intake",
            &Selection::Id("nope".into()),
            false,
            &quick(),
        )
        .await
        .unwrap_err();
        assert!(missing.to_string().contains("\"nope\""), "{missing}");
        let err = show(&bus, "m.intake", &Selection::Position(0), &quick())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("positions start at 1"), "{err}");

        let dry = purge(
            &bus,
            "m.intake",
            &Selection::Id(second.id.clone()),
            true,
            &quick(),
        )
        .await
        .unwrap();
        assert_eq!(dry.purged.len(), 1);
        assert_eq!(
            list(&bus, "m.intake", &quick())
                .await
                .unwrap()
                .letters
                .len(),
            2
        );

        let done = purge(
            &bus,
            "m.intake",
            &Selection::Id(second.id.clone()),
            false,
            &quick(),
        )
        .await
        .unwrap();
        assert_eq!(done.purged.len(), 1);
        let left = list(&bus, "m.intake", &quick()).await.unwrap();
        assert_eq!(left.letters.len(), 1);
        assert_eq!(left.letters[0].id, listing.letters[0].id);
    }

    #[tokio::test]
    async fn a_copy_from_another_topic_is_not_redriven_here() {
        let bus = dead_bus(
            "m.intake",
            vec![dead_copy("{}", &[]).with_attribute(ATTR_ORIGIN_TOPIC, "m.collect")],
        )
        .await;
        let report = redrive(&bus, "m.intake", &Selection::All, false, &quick())
            .await
            .unwrap();
        assert!(report.redriven.is_empty());
        assert!(
            matches!(&report.refused[..], [(_, DeadLetterError::OtherOrigin { origin, .. })] if origin == "m.collect")
        );
        assert_eq!(
            list(&bus, "m.intake", &quick())
                .await
                .unwrap()
                .letters
                .len(),
            1
        );
    }
}
