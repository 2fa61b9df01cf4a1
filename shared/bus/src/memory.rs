//! The in-memory bus: every semantic of the [`Bus`] port, inside one process.
//!
//! Why it exists: the all-in-one demo and every test run the whole fleet on it, so it has to behave
//! like a real broker in everything the worker loop relies on — leases that expire and can be
//! extended, delayed redelivery, attempt counts, consumer groups, hand-back on drop — or the tests
//! would prove nothing about the real backends.
//!
//! How it works:
//!
//! * A topic holds one queue per consumer group. `publish` copies the message into every group's
//!   ready queue; messages published while a topic has no group yet wait in a backlog that the first
//!   group created takes over (a broker subscription created up front would have kept them too).
//! * A group's state is `ready` (deliverable now), `delayed` (nacked with a delay, keyed by due
//!   time) and `in_flight` (handed out, keyed by a per-delivery token, with a lease deadline). Each
//!   delivery gets a fresh token, so a stale delivery — one whose lease expired and whose message
//!   went out again — no longer finds its token and gets `LeaseLost` instead of settling twice.
//! * There is no background task. Due delayed messages and expired leases are moved back to `ready`
//!   lazily ("reaped") whenever the group's state is touched. A consumer waiting in `next` sleeps on
//!   the group's `Notify` *and* a timer set to the group's next due time, so it wakes exactly when
//!   something may have become deliverable, and never spins.
//! * Time is `tokio::time::Instant`, so tests may pause and advance the clock.
//! * Subscriptions pull on demand: nothing is prefetched, so `close` has nothing to hand back and
//!   `prefetch` has nothing to bound. Competing consumers therefore share work message by message.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock;
use crate::Limits;
use crate::{
    Attributes, Bus, BusError, Capabilities, Delivery, Message, Settle, SubscribeOptions,
    Subscription,
};

/// The in-process bus. Cloning is cheap and every clone shares the same topics.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    topics: Mutex<HashMap<String, TopicState>>,
    next_message_id: AtomicU64,
}

#[derive(Default)]
struct TopicState {
    /// Messages published while the topic had no group; the first group takes them.
    backlog: Vec<Arc<Stored>>,
    groups: HashMap<String, Arc<Group>>,
}

/// A published message, shared by every group's copy.
struct Stored {
    id: String,
    body: Bytes,
    attributes: Attributes,
}

/// One group's copy of a message.
struct Entry {
    message: Arc<Stored>,
    /// How many times this copy has been delivered so far.
    delivered: u32,
}

struct InFlight {
    entry: Entry,
    deadline: Instant,
}

#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    /// Woken whenever something may have become deliverable sooner than a waiter thinks.
    notify: Notify,
}

#[derive(Default)]
struct GroupState {
    ready: VecDeque<Entry>,
    /// Keyed by (due time, sequence) so equal due times keep their order.
    delayed: BTreeMap<(Instant, u64), Entry>,
    in_flight: HashMap<u64, InFlight>,
    next_seq: u64,
}

/// Counts of one group's messages, for tests and progress displays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Deliverable now.
    pub ready: usize,
    /// Nacked with a delay that has not passed yet.
    pub delayed: usize,
    /// Handed to a consumer and not settled (including leases that expired but were not reaped).
    pub in_flight: usize,
}

impl Depth {
    /// Everything not yet acked.
    pub fn total(&self) -> usize {
        self.ready + self.delayed + self.in_flight
    }
}

impl GroupState {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Moves due delayed messages and expired leases back to `ready`. Returns whether anything moved.
    fn reap(&mut self, now: Instant) -> bool {
        let mut moved = false;
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
            moved = true;
        }
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, flight)| flight.deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some(flight) = self.in_flight.remove(&token) {
                self.ready.push_front(flight.entry);
                moved = true;
            }
        }
        moved
    }

    /// When the next delayed message becomes due or the next lease expires.
    fn next_due(&self) -> Option<Instant> {
        let delayed = self.delayed.keys().next().map(|(due, _)| *due);
        let lease = self.in_flight.values().map(|flight| flight.deadline).min();
        match (delayed, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn depth(&self) -> Depth {
        Depth {
            ready: self.ready.len(),
            delayed: self.delayed.len(),
            in_flight: self.in_flight.len(),
        }
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Finds or creates `group` on `topic` (creating the topic too). The first group takes the
    /// topic's backlog.
    fn group(&self, topic: &str, group: &str) -> Arc<Group> {
        let mut topics = lock(&self.inner.topics);
        let state = topics.entry(topic.to_string()).or_default();
        if let Some(existing) = state.groups.get(group) {
            return existing.clone();
        }
        let created = Arc::new(Group::default());
        if state.groups.is_empty() {
            let mut group_state = lock(&created.state);
            group_state
                .ready
                .extend(state.backlog.drain(..).map(|message| Entry {
                    message,
                    delivered: 0,
                }));
        }
        state.groups.insert(group.to_string(), created.clone());
        created
    }

    /// The counts of `group` on `topic`. For a group that does not exist yet this is the topic's
    /// backlog (what the first group created will receive), and all zero for an unknown topic.
    pub fn depth_of(&self, topic: &str, group: &str) -> Depth {
        let topics = lock(&self.inner.topics);
        let Some(state) = topics.get(topic) else {
            return Depth::default();
        };
        match state.groups.get(group) {
            Some(group) => lock(&group.state).depth(),
            None if state.groups.is_empty() => Depth {
                ready: state.backlog.len(),
                ..Depth::default()
            },
            None => Depth::default(),
        }
    }

    /// Messages of `group` on `topic` not yet acked: ready + delayed + in flight.
    pub fn depth(&self, topic: &str, group: &str) -> usize {
        self.depth_of(topic, group).total()
    }

    /// The topics that exist, sorted (for progress displays).
    pub fn topics(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.inner.topics).keys().cloned().collect();
        names.sort();
        names
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_delay: true,
            lease_extension: true,
            native_attempt_count: true,
            durable: false,
            multi_process: false,
        }
    }

    fn limits(&self) -> Limits {
        // No broker: caps a real broker would have, generous but finite, so that code written
        // against the in-memory bus meets limits at all.
        Limits {
            max_message_bytes: 16 * 1024 * 1024,
            max_attributes: 1000,
            max_attribute_value_bytes: 64 * 1024,
            max_attributes_bytes: 1024 * 1024,
        }
    }

    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        match group {
            Some(group) => {
                self.group(topic, group);
            }
            None => {
                lock(&self.inner.topics)
                    .entry(topic.to_string())
                    .or_default();
            }
        }
        Ok(())
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        let n = self.inner.next_message_id.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("mem-{n}");
        let stored = Arc::new(Stored {
            id: id.clone(),
            body: message.body,
            attributes: message.attributes,
        });
        let mut topics = lock(&self.inner.topics);
        let state = topics.entry(topic.to_string()).or_default();
        if state.groups.is_empty() {
            state.backlog.push(stored);
        } else {
            for group in state.groups.values() {
                lock(&group.state).ready.push_back(Entry {
                    message: stored.clone(),
                    delivered: 0,
                });
                group.notify.notify_waiters();
            }
        }
        Ok(id)
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let group = self.group(topic, &options.group);
        Ok(Box::new(MemorySubscription {
            group,
            lease: options.lease,
            closed: false,
        }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        // `publish` has already put the message in every group's queue.
        Ok(())
    }
}

struct MemorySubscription {
    group: Arc<Group>,
    lease: Duration,
    closed: bool,
}

#[async_trait]
impl Subscription for MemorySubscription {
    /// Cancel safe: the state only changes in the synchronous step that also returns the delivery.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        // A ready queue answers without ever awaiting; let other tasks (competing consumers, the
        // producer) run now and then, as a network read would.
        tokio::task::consume_budget().await;
        loop {
            if self.closed {
                return Err(BusError::Closed);
            }
            // Registered before looking at the state, so a notification sent after we look and
            // before we sleep is not missed.
            let notified = self.group.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let wake_at = {
                let now = Instant::now();
                let mut state = lock(&self.group.state);
                state.reap(now);
                if let Some(mut entry) = state.ready.pop_front() {
                    entry.delivered += 1;
                    let token = state.seq();
                    let message = entry.message.clone();
                    let attempt = entry.delivered;
                    state.in_flight.insert(
                        token,
                        InFlight {
                            entry,
                            deadline: now + self.lease,
                        },
                    );
                    let settle = Arc::new(MemorySettle {
                        group: self.group.clone(),
                        token,
                        message_id: message.id.clone(),
                    });
                    return Ok(Delivery::new(
                        message.id.clone(),
                        message.body.clone(),
                        message.attributes.clone(),
                        attempt,
                        settle,
                    ));
                }
                state.next_due()
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn close(&mut self) -> Result<(), BusError> {
        // Nothing is prefetched; deliveries already returned stay settleable.
        self.closed = true;
        Ok(())
    }
}

/// Settles one delivery, identified by its token.
struct MemorySettle {
    group: Arc<Group>,
    token: u64,
    message_id: String,
}

impl MemorySettle {
    fn lease_lost(&self) -> BusError {
        BusError::LeaseLost {
            message_id: self.message_id.clone(),
        }
    }

    /// Reaps first, so a lease that has expired is lost even if nobody has taken the message yet:
    /// the answer depends only on the clock, not on other consumers' timing.
    fn reap(&self, state: &mut GroupState) {
        if state.reap(Instant::now()) {
            self.group.notify.notify_waiters();
        }
    }

    /// Takes this delivery out of flight, or says its lease is gone.
    fn take(&self, state: &mut GroupState) -> Result<InFlight, BusError> {
        self.reap(state);
        state
            .in_flight
            .remove(&self.token)
            .ok_or_else(|| self.lease_lost())
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&self) -> Result<(), BusError> {
        let mut state = lock(&self.group.state);
        self.take(&mut state).map(drop)
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        let mut state = lock(&self.group.state);
        let flight = self.take(&mut state)?;
        if delay.is_zero() {
            state.ready.push_back(flight.entry);
        } else {
            let seq = state.seq();
            state
                .delayed
                .insert((Instant::now() + delay, seq), flight.entry);
        }
        // Either something is ready now or the next due time may be sooner: wake waiters.
        self.group.notify.notify_waiters();
        Ok(())
    }

    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        let mut state = lock(&self.group.state);
        self.reap(&mut state);
        match state.in_flight.get_mut(&self.token) {
            Some(flight) => {
                flight.deadline = Instant::now() + lease;
                Ok(())
            }
            None => Err(self.lease_lost()),
        }
    }

    fn abandon(&self) {
        let mut state = lock(&self.group.state);
        // A stale delivery's message already went back when its lease expired.
        if let Some(flight) = state.in_flight.remove(&self.token) {
            state.ready.push_front(flight.entry);
            self.group.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
        tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .expect("a delivery within 60s")
            .expect("next")
    }

    async fn quiet(sub: &mut Box<dyn Subscription>, wait: Duration) {
        if let Ok(d) = tokio::time::timeout(wait, sub.next()).await {
            panic!("expected nothing, got {:?}", d);
        }
    }

    #[tokio::test]
    async fn backlog_goes_to_the_first_group_only() {
        let bus = MemoryBus::new();
        bus.publish("t", Message::new("early")).await.unwrap();
        assert_eq!(bus.depth("t", "a"), 1);
        let mut a = bus
            .subscribe("t", SubscribeOptions::new("a"))
            .await
            .unwrap();
        let mut b = bus
            .subscribe("t", SubscribeOptions::new("b"))
            .await
            .unwrap();
        bus.publish("t", Message::new("late")).await.unwrap();
        let early = next(&mut a).await;
        assert_eq!(early.body, "early");
        let late = next(&mut b).await;
        assert_eq!(late.body, "late");
        assert_eq!(bus.depth("t", "a"), 2);
        assert_eq!(bus.depth("t", "b"), 1);
        late.ack().await.unwrap();
        quiet(&mut b, Duration::from_millis(50)).await;
        assert_eq!(bus.depth("t", "b"), 0);
        early.ack().await.unwrap();
        assert_eq!(next(&mut a).await.body, "late");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_redelivers_and_stale_settles_fail() {
        let bus = MemoryBus::new();
        let opts = SubscribeOptions::new("g").lease(Duration::from_secs(10));
        let mut sub = bus.subscribe("t", opts).await.unwrap();
        bus.publish("t", Message::new("x")).await.unwrap();
        let first = next(&mut sub).await;
        assert_eq!(first.attempt, 1);
        let started = Instant::now();
        let second = next(&mut sub).await;
        assert_eq!(second.attempt, 2);
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert!(matches!(
            first.extend(Duration::from_secs(1)).await,
            Err(BusError::LeaseLost { .. })
        ));
        assert!(matches!(first.ack().await, Err(BusError::LeaseLost { .. })));
        second.ack().await.unwrap();
        assert_eq!(bus.depth("t", "g"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn nack_with_delay_waits_and_extend_holds() {
        let bus = MemoryBus::new();
        let opts = SubscribeOptions::new("g").lease(Duration::from_secs(10));
        let mut sub = bus.subscribe("t", opts).await.unwrap();
        bus.publish("t", Message::new("x")).await.unwrap();
        let d = next(&mut sub).await;
        let started = Instant::now();
        d.nack(Duration::from_secs(3)).await.unwrap();
        assert_eq!(
            bus.depth_of("t", "g"),
            Depth {
                delayed: 1,
                ..Depth::default()
            }
        );
        let d = next(&mut sub).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(d.attempt, 2);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            d.extend(Duration::from_secs(10)).await.unwrap();
        }
        quiet(&mut sub, Duration::from_secs(5)).await;
        d.ack().await.unwrap();
        quiet(&mut sub, Duration::from_secs(60)).await;
    }

    #[tokio::test]
    async fn dropped_delivery_returns_at_once_and_close_ends_next() {
        let bus = MemoryBus::new();
        let mut sub = bus
            .subscribe("t", SubscribeOptions::new("g"))
            .await
            .unwrap();
        bus.publish("t", Message::new("x").with_attribute("k", "v"))
            .await
            .unwrap();
        let d = next(&mut sub).await;
        let id = d.message_id.clone();
        drop(d);
        let d = next(&mut sub).await;
        assert_eq!((d.message_id.as_str(), d.attempt), (id.as_str(), 2));
        assert_eq!(d.attributes.get("k").map(String::as_str), Some("v"));
        sub.close().await.unwrap();
        assert!(matches!(sub.next().await, Err(BusError::Closed)));
        d.ack().await.unwrap();
        assert_eq!(bus.depth("t", "g"), 0);
    }

    #[tokio::test]
    async fn waiting_consumer_wakes_on_publish() {
        let bus = MemoryBus::new();
        let mut sub = bus
            .subscribe("t", SubscribeOptions::new("g"))
            .await
            .unwrap();
        let publisher = bus.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            publisher.publish("t", Message::new("x")).await
        });
        assert_eq!(next(&mut sub).await.body, "x");
    }
}
