//! The conformance suite: what every bus backend must do for the worker loop to be correct.
//!
//! Shaped like object_store's `integration.rs`: one plain `pub async fn` per behaviour, taking the
//! bus under test and a topic-name prefix unique to the run (so runs against a shared broker do
//! not see each other's messages). Each backend's test file calls every function against its own
//! instance; [`run_all`] calls them in turn. A failure panics with a message saying which promise
//! was broken — this is test support code, so panicking *is* the error path.
//!
//! Backends differ in what they do natively and say so in [`Capabilities`]. Where a capability is
//! missing, the function checks the fallback the capability documents (a delay queue still waits
//! the delay; a broker-wide lease still does not fail `extend`; an attribute-carried attempt count
//! still rises across nacks) instead of skipping the behaviour.
//!
//! Durations are short (leases of 400 ms) so the whole suite takes seconds on the memory bus; the
//! generous "soon" bound (10 s) is only there so a broken backend fails instead of hanging.
//! Bodies are UTF-8 (JSON-like, as Millrace's tasks are) because some brokers (SQS) only carry
//! text; attributes stay under ten per message for the same reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::{timeout, Instant};

use crate::dead_letters::{self, DeadLetter, ScanOptions, Selection};
use crate::limits::bound_copy;
use crate::{
    dead_topic, Attributes, Bus, BusError, Delivery, Message, SubscribeOptions, Subscription,
    ATTR_ATTEMPT, ATTR_ORIGIN_TOPIC, ATTR_REASON, INSPECT_GROUP,
};

/// Upper bound for anything that should happen "soon": only a broken backend waits this long.
const SOON: Duration = Duration::from_secs(10);
/// The lease used where expiry matters.
const LEASE: Duration = Duration::from_millis(400);
/// A lease long enough never to expire during a test.
const LONG_LEASE: Duration = Duration::from_secs(30);
/// How long to watch for a delivery that must not happen.
const QUIET: Duration = Duration::from_millis(300);
/// The delay used for `nack(delay)`.
const NACK_DELAY: Duration = Duration::from_millis(600);

/// Invokes `$case!(name)` once for every bus-level behaviour above, named as its function here.
/// Backend test files expand it with a `$case` macro of their own that writes one test, so every
/// backend runs the whole list and a new behaviour reaches all of them from this one place:
/// `millrace_bus::for_each_conformance_case!(conformance_test);`
#[macro_export]
macro_rules! for_each_conformance_case {
    ($case:ident) => {
        $case!(publish_and_receive_roundtrip);
        $case!(competing_consumers_share_messages);
        $case!(nack_redelivers);
        $case!(nack_with_delay_redelivers_after_the_delay);
        $case!(expired_lease_redelivers);
        $case!(extended_lease_is_kept);
        $case!(attempt_count_rises_across_redeliveries);
        $case!(abandoned_delivery_goes_to_another_consumer);
        $case!(close_and_reopen_loses_nothing);
        $case!(flush_after_publish_loses_nothing);
        $case!(dead_letters_list_redrive_and_purge);
    };
}

/// Runs every behaviour against `bus`, each on its own topics under `prefix`.
pub async fn run_all(bus: Arc<dyn Bus>, prefix: &str) {
    let bus = &*bus;
    publish_and_receive_roundtrip(bus, prefix).await;
    competing_consumers_share_messages(bus, prefix).await;
    nack_redelivers(bus, prefix).await;
    nack_with_delay_redelivers_after_the_delay(bus, prefix).await;
    expired_lease_redelivers(bus, prefix).await;
    extended_lease_is_kept(bus, prefix).await;
    attempt_count_rises_across_redeliveries(bus, prefix).await;
    abandoned_delivery_goes_to_another_consumer(bus, prefix).await;
    close_and_reopen_loses_nothing(bus, prefix).await;
    flush_after_publish_loses_nothing(bus, prefix).await;
    dead_letters_list_redrive_and_purge(bus, prefix).await;
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn setup(bus: &dyn Bus, topic: &str, group: &str) {
    if let Err(e) = bus.create_topic(topic, Some(group)).await {
        panic!(
            "{}: create_topic({topic:?}, {group:?}) failed: {e}",
            bus.name()
        );
    }
}

async fn publish(bus: &dyn Bus, topic: &str, message: Message) -> String {
    match bus.publish(topic, message).await {
        Ok(id) => id,
        Err(e) => panic!("{}: publish to {topic:?} failed: {e}", bus.name()),
    }
}

async fn flush(bus: &dyn Bus) {
    if let Err(e) = bus.flush().await {
        panic!("{}: flush failed: {e}", bus.name());
    }
}

async fn subscribe(
    bus: &dyn Bus,
    topic: &str,
    group: &str,
    lease: Duration,
    prefetch: usize,
) -> Box<dyn Subscription> {
    let options = SubscribeOptions::new(group).lease(lease).prefetch(prefetch);
    match bus.subscribe(topic, options).await {
        Ok(sub) => sub,
        Err(e) => panic!("{}: subscribe to {topic:?} failed: {e}", bus.name()),
    }
}

/// The next delivery, or a panic saying what was expected.
async fn receive(sub: &mut Box<dyn Subscription>, what: &str) -> Delivery {
    receive_within(sub, SOON, what).await
}

async fn receive_within(sub: &mut Box<dyn Subscription>, within: Duration, what: &str) -> Delivery {
    match timeout(within, sub.next()).await {
        Ok(Ok(delivery)) => delivery,
        Ok(Err(e)) => panic!("{what}: next() failed: {e}"),
        Err(_) => panic!("{what}: nothing was delivered within {within:?}"),
    }
}

/// The next delivery on whichever of two competing consumers gets one, and which one it was
/// (`false`: the first). Which competing consumer a message goes to is the broker's choice (on
/// Kafka, whoever owns its partition), so checks that follow a message from one consumer to the
/// other start from the one that got it.
async fn receive_either(
    a: &mut Box<dyn Subscription>,
    b: &mut Box<dyn Subscription>,
    what: &str,
) -> (Delivery, bool) {
    let got = timeout(SOON, async {
        tokio::select! {
            d = a.next() => d.map(|d| (d, false)),
            d = b.next() => d.map(|d| (d, true)),
        }
    })
    .await;
    match got {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => panic!("{what}: next() failed: {e}"),
        Err(_) => panic!("{what}: nothing was delivered to either consumer within {SOON:?}"),
    }
}

/// Panics if anything is delivered within `wait`.
async fn assert_quiet(sub: &mut Box<dyn Subscription>, wait: Duration, what: &str) {
    match timeout(wait, sub.next()).await {
        Err(_) => {}
        Ok(Ok(delivery)) => panic!(
            "{what}: unexpected delivery of {} (attempt {}, attributes {:?})",
            delivery.message_id, delivery.attempt, delivery.attributes
        ),
        Ok(Err(e)) => panic!("{what}: next() failed while expecting nothing: {e}"),
    }
}

async fn ack(delivery: Delivery, what: &str) {
    let id = delivery.message_id.clone();
    if let Err(e) = delivery.ack().await {
        panic!("{what}: ack of {id} failed: {e}");
    }
}

async fn nack(delivery: Delivery, delay: Duration, what: &str) {
    let id = delivery.message_id.clone();
    if let Err(e) = delivery.nack(delay).await {
        panic!("{what}: nack({delay:?}) of {id} failed: {e}");
    }
}

fn seq_of(delivery: &Delivery, what: &str) -> usize {
    match delivery.attributes.get("seq").map(|s| s.parse::<usize>()) {
        Some(Ok(seq)) => seq,
        _ => panic!(
            "{what}: delivery {} has no numeric `seq` attribute (attributes {:?})",
            delivery.message_id, delivery.attributes
        ),
    }
}

fn assert_lease_lost(result: Result<(), BusError>, what: &str) {
    match result {
        Err(BusError::LeaseLost { .. }) => {}
        Ok(()) => {
            panic!("{what}: settling a stale delivery succeeded; it must fail with LeaseLost")
        }
        Err(e) => panic!("{what}: expected LeaseLost, got {e}"),
    }
}

fn assert_same_message(delivery: &Delivery, body: &[u8], attributes: &Attributes, what: &str) {
    assert!(
        delivery.body == body,
        "{what}: body of {} changed: {:?} != {:?}",
        delivery.message_id,
        String::from_utf8_lossy(&delivery.body),
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        &delivery.attributes, attributes,
        "{what}: attributes of {} changed (bookkeeping attributes must be stripped)",
        delivery.message_id
    );
}

/// A body of varying length and content: JSON-like, with escapes, unicode and whitespace that a
/// backend re-encoding the body would alter.
fn body_for(seq: usize) -> Vec<u8> {
    let pad_len = (seq * 37) % 2048;
    let pad: String = "abc\\\"xyz ünïcødé ✓ 码 \t"
        .chars()
        .cycle()
        .take(pad_len)
        .collect();
    let trailing = if seq.is_multiple_of(3) { "\n" } else { "" };
    format!("{{\"seq\":{seq},\"pad\":\"{pad}\"}}{trailing}").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Behaviours

/// (a) 1,000 messages are delivered with their bodies byte-identical and attributes intact, and a
/// second topic's messages stay on that topic.
pub async fn publish_and_receive_roundtrip(bus: &dyn Bus, prefix: &str) {
    const N: usize = 1000;
    const OTHER: usize = 10;
    let what = "publish_and_receive_roundtrip";
    let topic = format!("{prefix}.roundtrip");
    let other = format!("{prefix}.roundtrip-other");
    setup(bus, &topic, "g").await;
    setup(bus, &other, "g").await;

    let mut expected: HashMap<usize, Message> = HashMap::new();
    for seq in 0..N {
        let message = Message::new(body_for(seq))
            .with_attribute("seq", seq.to_string())
            .with_attribute("kind", "main")
            .with_attribute("note", format!("ünï-码 ✓ {seq} with spaces=and;symbols"));
        expected.insert(seq, message.clone());
        publish(bus, &topic, message).await;
        if seq.is_multiple_of(N / OTHER) {
            let message = Message::new(format!("{{\"other\":{seq}}}"))
                .with_attribute("seq", seq.to_string())
                .with_attribute("kind", "other");
            publish(bus, &other, message).await;
        }
    }
    flush(bus).await;

    let mut sub = subscribe(bus, &topic, "g", LONG_LEASE, 50).await;
    for _ in 0..N {
        let delivery = receive(&mut sub, what).await;
        let seq = seq_of(&delivery, what);
        let Some(message) = expected.remove(&seq) else {
            panic!("{what}: seq {seq} delivered twice or from the wrong topic");
        };
        assert_same_message(&delivery, &message.body, &message.attributes, what);
        ack(delivery, what).await;
    }
    assert!(
        expected.is_empty(),
        "{what}: messages lost: {:?}",
        expected.keys()
    );
    assert_quiet(&mut sub, QUIET, what).await;

    let mut sub = subscribe(bus, &other, "g", LONG_LEASE, 50).await;
    for _ in 0..OTHER {
        let delivery = receive(&mut sub, what).await;
        assert_eq!(
            delivery.attributes.get("kind").map(String::as_str),
            Some("other"),
            "{what}: a message of {topic:?} showed up on {other:?}"
        );
        ack(delivery, what).await;
    }
    assert_quiet(&mut sub, QUIET, what).await;
}

/// (b) Four competing consumers in one group share 5,000 messages: none lost, none delivered twice
/// (there are no faults), and more than one consumer gets work.
pub async fn competing_consumers_share_messages(bus: &dyn Bus, prefix: &str) {
    const N: usize = 5000;
    const CONSUMERS: usize = 4;
    let what = "competing_consumers_share_messages";
    let topic = format!("{prefix}.competing");
    setup(bus, &topic, "workers").await;
    let mut subs = Vec::new();
    for _ in 0..CONSUMERS {
        subs.push(subscribe(bus, &topic, "workers", LONG_LEASE, 10).await);
    }
    for seq in 0..N {
        let message =
            Message::new(format!("{{\"n\":{seq}}}")).with_attribute("seq", seq.to_string());
        publish(bus, &topic, message).await;
    }
    flush(bus).await;

    let seen: Mutex<Vec<u32>> = Mutex::new(vec![0; N]);
    let total = AtomicUsize::new(0);
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let consumers = subs.iter_mut().map(|sub| {
        let (seen, total, done_tx) = (&seen, &total, &done_tx);
        let mut done_rx = done_rx.clone();
        async move {
            let mut mine = 0usize;
            loop {
                if *done_rx.borrow() {
                    break;
                }
                let delivery = tokio::select! {
                    _ = done_rx.changed() => break,
                    next = timeout(SOON, sub.next()) => match next {
                        Ok(Ok(delivery)) => delivery,
                        Ok(Err(e)) => panic!("{what}: next() failed: {e}"),
                        Err(_) => break,
                    },
                };
                let seq = seq_of(&delivery, what);
                assert!(seq < N, "{what}: unknown seq {seq}");
                seen.lock().unwrap_or_else(|p| p.into_inner())[seq] += 1;
                ack(delivery, what).await;
                mine += 1;
                if total.fetch_add(1, Ordering::SeqCst) + 1 >= N {
                    let _ = done_tx.send(true);
                }
                // Stand-in for the work a consumer does between deliveries.
                tokio::task::yield_now().await;
            }
            mine
        }
    });
    let per_consumer = join_all(consumers).await;

    let seen = seen.into_inner().unwrap_or_else(|p| p.into_inner());
    let lost: Vec<usize> = (0..N).filter(|&i| seen[i] == 0).collect();
    let twice: Vec<usize> = (0..N).filter(|&i| seen[i] > 1).collect();
    assert!(
        lost.is_empty(),
        "{what}: {} messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        twice.is_empty(),
        "{what}: {} messages delivered more than once without a fault, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let busy = per_consumer.iter().filter(|&&n| n > 0).count();
    assert!(
        busy >= 2,
        "{what}: the group did not share the work: per-consumer counts {per_consumer:?}"
    );
    join_all(subs.iter_mut().map(|sub| assert_quiet(sub, QUIET, what))).await;
}

/// (c) A nacked message is delivered again, unchanged.
pub async fn nack_redelivers(bus: &dyn Bus, prefix: &str) {
    let what = "nack_redelivers";
    let topic = format!("{prefix}.nack");
    setup(bus, &topic, "g").await;
    let message = Message::new("{\"task\":\"nack\"}").with_attribute("trace", "00-abc-def-01");
    publish(bus, &topic, message.clone()).await;
    flush(bus).await;
    let mut sub = subscribe(bus, &topic, "g", LONG_LEASE, 1).await;

    let first = receive(&mut sub, what).await;
    assert_same_message(&first, &message.body, &message.attributes, what);
    nack(first, Duration::ZERO, what).await;
    let again = receive(&mut sub, &format!("{what}: redelivery after nack")).await;
    assert_same_message(&again, &message.body, &message.attributes, what);
    ack(again, what).await;
    assert_quiet(&mut sub, QUIET, what).await;
}

/// (c) `nack(delay)` redelivers not before the delay and soon after it, and the delayed message does
/// not hold up the messages behind it. Without native delay, the backend's delay queue or retry
/// topic must keep the same promise (with more slack after the delay).
pub async fn nack_with_delay_redelivers_after_the_delay(bus: &dyn Bus, prefix: &str) {
    let what = "nack_with_delay_redelivers_after_the_delay";
    let topic = format!("{prefix}.nack-delay");
    let slack = if bus.capabilities().native_delay {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    setup(bus, &topic, "g").await;
    publish(
        bus,
        &topic,
        Message::new("first").with_attribute("seq", "0"),
    )
    .await;
    publish(
        bus,
        &topic,
        Message::new("second").with_attribute("seq", "1"),
    )
    .await;
    flush(bus).await;
    let mut sub = subscribe(bus, &topic, "g", LONG_LEASE, 2).await;

    let delayed = receive(&mut sub, what).await;
    let delayed_seq = seq_of(&delayed, what);
    let delayed_body = delayed.body.clone();
    let started = Instant::now();
    nack(delayed, NACK_DELAY, what).await;

    // The other message comes next: the delayed one holds no slot.
    let other = receive(&mut sub, what).await;
    assert_ne!(
        seq_of(&other, what),
        delayed_seq,
        "{what}: the message nacked with {NACK_DELAY:?} came back at once ({:?})",
        started.elapsed()
    );
    ack(other, what).await;

    let again = receive(
        &mut sub,
        &format!("{what}: redelivery after nack({NACK_DELAY:?})"),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        seq_of(&again, what),
        delayed_seq,
        "{what}: wrong message redelivered"
    );
    assert_eq!(
        again.body, delayed_body,
        "{what}: body changed on redelivery"
    );
    assert!(
        elapsed >= NACK_DELAY,
        "{what}: redelivered after {elapsed:?}, before the {NACK_DELAY:?} delay"
    );
    assert!(
        elapsed <= NACK_DELAY + slack,
        "{what}: redelivered only after {elapsed:?}, long after the {NACK_DELAY:?} delay"
    );
    ack(again, what).await;
    assert_quiet(&mut sub, QUIET, what).await;
}

/// (d) A delivery whose lease expires goes to another consumer; the stale delivery can then no
/// longer be extended, acked or nacked (`LeaseLost`), and settling it changes nothing. Without
/// lease extension the lease is a broker-wide timeout that a test cannot wait for: then `extend`
/// must still succeed (as a no-op) and the held message must go to another consumer once its
/// holder goes away.
pub async fn expired_lease_redelivers(bus: &dyn Bus, prefix: &str) {
    let what = "expired_lease_redelivers";
    let topic = format!("{prefix}.lease-expiry");
    let caps = bus.capabilities();
    setup(bus, &topic, "g").await;
    let message = Message::new("{\"task\":\"slow\"}").with_attribute("seq", "0");
    publish(bus, &topic, message.clone()).await;
    flush(bus).await;
    let mut a = subscribe(bus, &topic, "g", LEASE, 1).await;
    let mut b = subscribe(bus, &topic, "g", LEASE, 1).await;

    if !caps.lease_extension {
        let held = receive(&mut a, what).await;
        if let Err(e) = held.extend(LEASE).await {
            panic!("{what}: extend must be a no-op without lease extension, got {e}");
        }
        drop(held);
        drop(a);
        let again = receive(
            &mut b,
            &format!("{what}: redelivery after the holder went away"),
        )
        .await;
        assert_same_message(&again, &message.body, &message.attributes, what);
        ack(again, what).await;
        assert_quiet(&mut b, QUIET, what).await;
        return;
    }

    let started = Instant::now();
    // From here on `a` is the consumer that got the message.
    let (first, swapped) = receive_either(&mut a, &mut b, what).await;
    if swapped {
        std::mem::swap(&mut a, &mut b);
    }
    let second = receive(&mut b, &format!("{what}: redelivery after lease expiry")).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= LEASE,
        "{what}: redelivered after {elapsed:?}, while the {LEASE:?} lease was still held"
    );
    assert_same_message(&second, &message.body, &message.attributes, what);
    if caps.native_attempt_count {
        assert_eq!(
            second.attempt,
            first.attempt + 1,
            "{what}: attempt after lease expiry"
        );
    }
    assert_lease_lost(
        first.extend(LEASE).await,
        &format!("{what}: extend of the stale delivery"),
    );

    // Let the second lease expire too, then try to nack the stale second delivery.
    let third = receive(
        &mut a,
        &format!("{what}: redelivery after the second expiry"),
    )
    .await;
    assert_lease_lost(
        second.nack(Duration::ZERO).await,
        &format!("{what}: nack of the stale delivery"),
    );
    assert_lease_lost(
        first.ack().await,
        &format!("{what}: ack of the stale delivery"),
    );
    ack(third, what).await;
    tokio::join!(
        assert_quiet(&mut a, QUIET, what),
        assert_quiet(&mut b, QUIET, what)
    );
}

/// (d) A delivery whose lease is kept extended is not redelivered while held, for several lease
/// lengths, and can be acked afterwards.
pub async fn extended_lease_is_kept(bus: &dyn Bus, prefix: &str) {
    let what = "extended_lease_is_kept";
    let topic = format!("{prefix}.lease-extend");
    setup(bus, &topic, "g").await;
    publish(bus, &topic, Message::new("{\"task\":\"long\"}")).await;
    flush(bus).await;
    let mut a = subscribe(bus, &topic, "g", LEASE, 1).await;
    let mut b = subscribe(bus, &topic, "g", LEASE, 1).await;

    let (held, _) = receive_either(&mut a, &mut b, what).await;
    let keeper = held.lease_keeper();
    let hold_for = LEASE * 4;
    let keep = async {
        let until = Instant::now() + hold_for;
        while Instant::now() < until {
            tokio::time::sleep(LEASE / 3).await;
            if let Err(e) = keeper.extend(LEASE).await {
                panic!("{what}: extend while holding the delivery failed: {e}");
            }
        }
    };
    let (_, a_got, b_got) = tokio::join!(
        keep,
        timeout(hold_for, a.next()),
        timeout(hold_for, b.next())
    );
    for got in [a_got, b_got] {
        match got {
            Err(_) => {}
            Ok(Ok(d)) => panic!(
                "{what}: {} (attempt {}) redelivered while its lease was kept extended",
                d.message_id, d.attempt
            ),
            Ok(Err(e)) => panic!("{what}: next() failed: {e}"),
        }
    }
    ack(held, &format!("{what}: ack after holding for {hold_for:?}")).await;
    tokio::join!(
        assert_quiet(&mut a, QUIET, what),
        assert_quiet(&mut b, QUIET, what)
    );
}

/// (e) The attempt count starts at 1 and rises by one with every redelivery (nack, hand-back,
/// lease expiry). With an attribute-carried count (no native count) it must rise across nacks and
/// never fall; its bookkeeping attribute never shows.
pub async fn attempt_count_rises_across_redeliveries(bus: &dyn Bus, prefix: &str) {
    let what = "attempt_count_rises_across_redeliveries";
    let topic = format!("{prefix}.attempts");
    let caps = bus.capabilities();
    setup(bus, &topic, "g").await;
    let message = Message::new("{\"task\":\"flaky\"}").with_attribute("k", "v");
    publish(bus, &topic, message.clone()).await;
    flush(bus).await;
    let lease = if caps.lease_extension {
        LEASE
    } else {
        LONG_LEASE
    };
    let mut sub = subscribe(bus, &topic, "g", lease, 1).await;

    let check = |d: &Delivery, previous: u32, how: &str, strict: bool| {
        assert_same_message(d, &message.body, &message.attributes, what);
        if strict {
            assert_eq!(d.attempt, previous + 1, "{what}: attempt after {how}");
        } else {
            assert!(
                d.attempt >= previous,
                "{what}: attempt fell from {previous} to {} after {how}",
                d.attempt
            );
        }
    };

    let d = receive(&mut sub, what).await;
    assert_eq!(d.attempt, 1, "{what}: the first delivery's attempt");
    let mut last = d.attempt;
    nack(d, Duration::ZERO, what).await;

    let d = receive(&mut sub, what).await;
    check(&d, last, "nack", true);
    last = d.attempt;
    drop(d);

    let d = receive(&mut sub, &format!("{what}: after drop")).await;
    check(&d, last, "a dropped delivery", caps.native_attempt_count);
    last = d.attempt;

    let d = if caps.lease_extension {
        let again = receive(&mut sub, &format!("{what}: after lease expiry")).await;
        check(&again, last, "lease expiry", caps.native_attempt_count);
        last = again.attempt;
        drop(d);
        again
    } else {
        d
    };
    nack(d, Duration::ZERO, what).await;

    let d = receive(&mut sub, what).await;
    check(&d, last, "nack", true);
    ack(d, what).await;
    assert_quiet(&mut sub, QUIET, what).await;
}

/// (f) A delivery dropped unsettled goes back to the group at once (well before its lease), and a
/// consumer that goes away holding a delivery loses it to another consumer.
pub async fn abandoned_delivery_goes_to_another_consumer(bus: &dyn Bus, prefix: &str) {
    let what = "abandoned_delivery_goes_to_another_consumer";
    let topic = format!("{prefix}.abandon");
    setup(bus, &topic, "g").await;
    let message = Message::new("{\"task\":\"orphan\"}").with_attribute("seq", "0");
    publish(bus, &topic, message.clone()).await;
    flush(bus).await;
    // The lease is far longer than the wait below: only the hand-back can redeliver in time.
    let mut a = subscribe(bus, &topic, "g", LONG_LEASE, 1).await;
    let mut b = subscribe(bus, &topic, "g", LONG_LEASE, 1).await;

    // From here on `a` is the consumer that got the message.
    let (d, swapped) = receive_either(&mut a, &mut b, what).await;
    if swapped {
        std::mem::swap(&mut a, &mut b);
    }
    drop(d);
    let d = receive(&mut a, &format!("{what}: after dropping the delivery")).await;
    assert_same_message(&d, &message.body, &message.attributes, what);

    // The consumer goes away holding it, as if its process died.
    if let Err(e) = a.close().await {
        panic!("{what}: close failed: {e}");
    }
    drop(a);
    drop(d);
    let d = receive(
        &mut b,
        &format!("{what}: on the other consumer after the first went away"),
    )
    .await;
    assert_same_message(&d, &message.body, &message.attributes, what);
    ack(d, what).await;
    assert_quiet(&mut b, QUIET, what).await;
}

/// (g) Closing a subscription part-way and opening another in the same group loses nothing, and
/// acked messages do not come back. `next` on a closed subscription says `Closed`.
pub async fn close_and_reopen_loses_nothing(bus: &dyn Bus, prefix: &str) {
    const N: usize = 200;
    const BEFORE_CLOSE: usize = 50;
    let what = "close_and_reopen_loses_nothing";
    let topic = format!("{prefix}.reopen");
    setup(bus, &topic, "g").await;
    for seq in 0..N {
        publish(
            bus,
            &topic,
            Message::new(format!("{seq}")).with_attribute("seq", seq.to_string()),
        )
        .await;
    }
    flush(bus).await;

    let mut seen = vec![0u32; N];
    let mut first = subscribe(bus, &topic, "g", LONG_LEASE, 20).await;
    for _ in 0..BEFORE_CLOSE {
        let d = receive(&mut first, what).await;
        seen[seq_of(&d, what)] += 1;
        ack(d, what).await;
    }
    if let Err(e) = first.close().await {
        panic!("{what}: close failed: {e}");
    }
    match timeout(SOON, first.next()).await {
        Ok(Err(BusError::Closed)) => {}
        Ok(Err(e)) => panic!("{what}: next() after close: expected Closed, got {e}"),
        Ok(Ok(d)) => panic!("{what}: next() after close delivered {}", d.message_id),
        Err(_) => panic!("{what}: next() after close hung instead of returning Closed"),
    }
    drop(first);

    let mut second = subscribe(bus, &topic, "g", LONG_LEASE, 20).await;
    for _ in BEFORE_CLOSE..N {
        // Nothing may be lost, but a message the broker was handing to the closing consumer
        // at that instant may come back only once its lease runs out (JetStream sends a pull's
        // messages until it sees the unsubscribe): at-least-once allows that wait.
        let d = receive_within(
            &mut second,
            LONG_LEASE + SOON,
            &format!("{what}: after reopening"),
        )
        .await;
        let seq = seq_of(&d, what);
        assert!(
            seen[seq] == 0,
            "{what}: seq {seq} came back after it was acked"
        );
        seen[seq] += 1;
        ack(d, what).await;
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "{what}: messages lost across close and reopen"
    );
    assert_quiet(&mut second, QUIET, what).await;
}

/// (g) Messages published concurrently and then flushed are all delivered.
pub async fn flush_after_publish_loses_nothing(bus: &dyn Bus, prefix: &str) {
    const N: usize = 100;
    let what = "flush_after_publish_loses_nothing";
    let topic = format!("{prefix}.flush");
    setup(bus, &topic, "g").await;
    let topic_ref = topic.as_str();
    join_all((0..N).map(|seq| async move {
        publish(
            bus,
            topic_ref,
            Message::new(format!("{seq}")).with_attribute("seq", seq.to_string()),
        )
        .await
    }))
    .await;
    flush(bus).await;

    let mut sub = subscribe(bus, &topic, "g", LONG_LEASE, 20).await;
    let mut seen = vec![0u32; N];
    for _ in 0..N {
        let d = receive(&mut sub, &format!("{what}: after flush")).await;
        let seq = seq_of(&d, what);
        assert!(
            seq < N && seen[seq] == 0,
            "{what}: seq {seq} unknown or delivered twice"
        );
        seen[seq] += 1;
        ack(d, what).await;
    }
    assert_quiet(&mut sub, QUIET, what).await;
}

/// (j) Dead letters (`millrace dead-letters`, [`crate::dead_letters`]): copies on `{t}.dead`, made
/// as the worker loop makes them, are listed without being consumed (a second listing finds the
/// same ones), a dry run changes nothing, a redrive puts the original body and the original
/// attributes (without the worker's own) on `{t}`, where a normal group receives it as a fresh
/// message, and removes the dead copy; a purge removes exactly the one selected. Five attributes
/// on each copy, two of them the original's: within SNS's ten.
pub async fn dead_letters_list_redrive_and_purge(bus: &dyn Bus, prefix: &str) {
    let what = "dead_letters_list_redrive_and_purge";
    let topic = format!("{prefix}.dl");
    let dead = dead_topic(&topic);
    setup(bus, &topic, "g").await;
    setup(bus, &dead, INSPECT_GROUP).await;
    let original = Attributes::from([
        (
            "traceparent".to_string(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string(),
        ),
        (
            "note".to_string(),
            "ünï-码 ✓ with spaces=and;symbols".to_string(),
        ),
    ]);
    let bodies: Vec<Vec<u8>> = (40..43).map(body_for).collect();
    for body in &bodies {
        let (copy, trimmed) = bound_copy(
            &body.clone().into(),
            &[
                (ATTR_REASON, "store unreachable: connection reset"),
                (ATTR_ATTEMPT, "8"),
                (ATTR_ORIGIN_TOPIC, &topic),
            ],
            &original,
            &bus.limits(),
        );
        assert_eq!(trimmed, Default::default(), "{what}: the copy was trimmed");
        publish(bus, &dead, copy).await;
    }
    flush(bus).await;
    let options = ScanOptions {
        idle: Duration::from_secs(2),
        max_wait: SOON,
        ..ScanOptions::default()
    };

    // Listed, and listed again: nothing was consumed.
    let first = list_all(bus, &topic, &options, bodies.len(), what).await;
    let second = list_all(bus, &dead, &options, bodies.len(), what).await;
    let ids = |letters: &[DeadLetter]| letters.iter().map(|l| l.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&second),
        ids(&first),
        "{what}: a second listing found other messages"
    );
    for letter in &first {
        assert!(
            bodies.iter().any(|b| letter.body == b[..]),
            "{what}: {} has a body that was not published",
            letter.id
        );
        assert_eq!(
            letter.reason(),
            Some("store unreachable: connection reset"),
            "{what}"
        );
        assert_eq!(letter.attempt(), Some("8"), "{what}");
        assert_eq!(
            letter.original_attributes(),
            original,
            "{what}: attributes of {}",
            letter.id
        );
    }

    // A dry run redrives nothing.
    let mut sub = subscribe(bus, &topic, "g", LONG_LEASE, 10).await;
    let dry = retry_until(what, "a dry-run redrive of all", || async {
        let report = dead_letters::redrive(bus, &topic, &Selection::All, true, &options)
            .await
            .unwrap_or_else(|e| panic!("{what}: dry-run redrive failed: {e}"));
        (report.redriven.len() == bodies.len()).then_some(report)
    })
    .await;
    assert!(
        dry.refused.is_empty(),
        "{what}: dry run refused {:?}",
        dry.refused
    );
    assert_quiet(&mut sub, QUIET, &format!("{what}: after a dry run")).await;

    // Redrive one: the original arrives on the topic, as a first delivery.
    let target = &first[0];
    let report = dead_letters::redrive(
        bus,
        &topic,
        &Selection::Id(target.id.clone()),
        false,
        &options,
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: redrive of {} failed: {e}", target.id));
    assert!(
        report.refused.is_empty(),
        "{what}: refused {:?}",
        report.refused
    );
    assert_eq!(report.redriven.len(), 1, "{what}: redriven");
    assert_eq!(report.redriven[0].still_on_dead, None, "{what}");
    let d = receive(&mut sub, &format!("{what}: the redriven message")).await;
    assert_same_message(&d, &target.body, &original, what);
    assert_eq!(d.attempt, 1, "{what}: a redriven message starts again");
    ack(d, what).await;

    // Purge another.
    let purged = &first[1];
    let report = dead_letters::purge(
        bus,
        &topic,
        &Selection::Id(purged.id.clone()),
        false,
        &options,
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: purge of {} failed: {e}", purged.id));
    assert!(report.failed.is_empty(), "{what}: {:?}", report.failed);
    assert_eq!(
        ids(&report.purged),
        vec![purged.id.clone()],
        "{what}: purged"
    );

    // Only the third is left; nothing else reached the topic.
    let left = list_all(bus, &topic, &options, 1, what).await;
    assert_eq!(
        ids(&left),
        vec![first[2].id.clone()],
        "{what}: left on {dead}"
    );
    assert_quiet(&mut sub, QUIET, &format!("{what}: after the purge")).await;
    if let Err(e) = sub.close().await {
        panic!("{what}: close failed: {e}");
    }
}

/// Lists `topic`'s dead letters until at least `n` are seen at once (a scan may end before a slow
/// broker has handed out everything; listing changes nothing, so it is retried), and checks that
/// there are exactly `n`.
async fn list_all(
    bus: &dyn Bus,
    topic: &str,
    options: &ScanOptions,
    n: usize,
    what: &str,
) -> Vec<DeadLetter> {
    let listing = retry_until(what, "listing the dead letters", || async {
        let listing = dead_letters::list(bus, topic, options)
            .await
            .unwrap_or_else(|e| panic!("{what}: listing {topic} failed: {e}"));
        (listing.letters.len() >= n).then_some(listing)
    })
    .await;
    assert_eq!(
        listing.letters.len(),
        n,
        "{what}: listed {:?}",
        listing.letters
    );
    listing.letters
}

/// Runs `attempt` until it gives something, for at most three times [`SOON`].
async fn retry_until<T, F, Fut>(what: &str, doing: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + 3 * SOON;
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(
            Instant::now() < until,
            "{what}: {doing} did not succeed within {:?}",
            3 * SOON
        );
    }
}
