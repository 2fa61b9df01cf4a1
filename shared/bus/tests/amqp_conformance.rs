//! The conformance suite against a real RabbitMQ, plus a broker restart in the middle of a stream.
//!
//! The broker is `MILLRACE_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`). Each
//! test uses topics under a prefix unique to the run (process id and a random suffix) and deletes
//! its exchanges and queues afterwards, even when it fails. The restart test runs alone: it holds
//! the write side of a lock every other test holds the read side of.

#![cfg(feature = "amqp")]

#[path = "../../../tests/support/rabbitmq.rs"]
mod rabbitmq;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use millrace_bus::amqp::AmqpBus;
use millrace_bus::{conformance, Bus, Message, SubscribeOptions};
use tokio::sync::RwLock;
use tokio::time::{timeout, Instant};

/// Taken for reading by every test and for writing by the one that restarts the broker.
static BROKER: RwLock<()> = RwLock::const_new(());

fn url() -> String {
    std::env::var("MILLRACE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn unique_prefix(name: &str) -> String {
    format!(
        "millrace-test.{}-{:08x}.{name}",
        std::process::id(),
        rand::random::<u32>()
    )
}

async fn bus() -> AmqpBus {
    match AmqpBus::connect(&url()).await {
        Ok(bus) => bus,
        Err(e) => panic!("RabbitMQ at {} is not reachable: {e}", url()),
    }
}

/// Deletes a test's topics (exchanges, the unrouted backlog, group and wait queues) when dropped,
/// so that a failing test cleans up too.
struct Cleanup {
    topics: Vec<(String, Vec<&'static str>)>,
}

impl Cleanup {
    fn new(prefix: &str, topics: &[(&str, &[&'static str])]) -> Self {
        Cleanup {
            topics: topics
                .iter()
                .map(|(suffix, groups)| (format!("{prefix}.{suffix}"), groups.to_vec()))
                .collect(),
        }
    }

    async fn run(topics: Vec<(String, Vec<&'static str>)>) {
        let Ok(bus) = AmqpBus::connect(&url()).await else {
            return;
        };
        // Wait queues (`T::G::wait-…`) expire by themselves a minute after their last use.
        for (topic, groups) in topics {
            let _ = bus.delete_topic(&topic, &groups).await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let topics = std::mem::take(&mut self.topics);
        // Drop cannot await: run the deletes on a runtime of their own.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(Self::run(topics));
            }
        })
        .join();
    }
}

const G: &[&str] = &["g"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_receive_roundtrip() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("roundtrip");
    let _cleanup = Cleanup::new(&prefix, &[("roundtrip", G), ("roundtrip-other", G)]);
    conformance::publish_and_receive_roundtrip(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_messages() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("competing");
    let _cleanup = Cleanup::new(&prefix, &[("competing", &["workers"])]);
    conformance::competing_consumers_share_messages(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("nack");
    let _cleanup = Cleanup::new(&prefix, &[("nack", G)]);
    conformance::nack_redelivers(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_redelivers_after_the_delay() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("nack-delay");
    let _cleanup = Cleanup::new(&prefix, &[("nack-delay", G)]);
    conformance::nack_with_delay_redelivers_after_the_delay(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_redelivers() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("lease-expiry");
    let _cleanup = Cleanup::new(&prefix, &[("lease-expiry", G)]);
    conformance::expired_lease_redelivers(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_lease_is_kept() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("lease-extend");
    let _cleanup = Cleanup::new(&prefix, &[("lease-extend", G)]);
    conformance::extended_lease_is_kept(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_count_rises_across_redeliveries() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("attempts");
    let _cleanup = Cleanup::new(&prefix, &[("attempts", G)]);
    conformance::attempt_count_rises_across_redeliveries(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_delivery_goes_to_another_consumer() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("abandon");
    let _cleanup = Cleanup::new(&prefix, &[("abandon", G)]);
    conformance::abandoned_delivery_goes_to_another_consumer(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_reopen_loses_nothing() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("reopen");
    let _cleanup = Cleanup::new(&prefix, &[("reopen", G)]);
    conformance::close_and_reopen_loses_nothing(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_after_publish_loses_nothing() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("flush");
    let _cleanup = Cleanup::new(&prefix, &[("flush", G)]);
    conformance::flush_after_publish_loses_nothing(&bus().await, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_redrive_and_purge() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("dead-letters");
    let _cleanup = Cleanup::new(&prefix, &[("dl", G), ("dl.dead", &["inspect"])]);
    conformance::dead_letters_list_redrive_and_purge(&bus().await, &prefix).await;
}

/// Messages published before any group exists wait for the first group instead of being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_before_the_group_exists_reach_it() {
    let _gate = BROKER.read().await;
    let prefix = unique_prefix("early");
    let _cleanup = Cleanup::new(&prefix, &[("early", G)]);
    let bus = bus().await;
    let topic = format!("{prefix}.early");
    bus.create_topic(&topic, None).await.expect("create_topic");
    bus.publish(&topic, Message::new("early").with_attribute("k", "v"))
        .await
        .expect("publish");
    let mut sub = bus
        .subscribe(&topic, SubscribeOptions::new("g"))
        .await
        .expect("subscribe");
    let d = timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("the early message within 10 s")
        .expect("next");
    assert_eq!(d.body, "early");
    assert_eq!(d.attributes.get("k").map(String::as_str), Some("v"));
    assert_eq!(d.attempt, 1);
    d.ack().await.expect("ack");
}

/// A consumer acks a stream of 500 messages while the broker restarts in the middle: every
/// message still arrives (at least once), because publishes are retried until confirmed and the
/// consumer reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    const N: usize = 500;
    const RESTART_AFTER: usize = 150;
    let _gate = BROKER.write().await;
    let prefix = unique_prefix("restart");
    let _cleanup = Cleanup::new(&prefix, &[("restart", G)]);
    let _broker_up = rabbitmq::BrokerUp;
    let restart = std::env::var("MILLRACE_TEST_AMQP_RESTART")
        .unwrap_or_else(|_| "rabbitmqctl stop_app && rabbitmqctl start_app".to_string());

    let bus = Arc::new(bus().await);
    let topic = format!("{prefix}.restart");
    bus.create_topic(&topic, Some("g"))
        .await
        .expect("create_topic");
    let mut sub = bus
        .subscribe(
            &topic,
            SubscribeOptions::new("g")
                .lease(Duration::from_secs(60))
                .prefetch(20),
        )
        .await
        .expect("subscribe");

    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (bus, topic, published) = (bus.clone(), topic.clone(), published.clone());
        tokio::spawn(async move {
            for seq in 0..N {
                let message =
                    Message::new(format!("{{\"n\":{seq}}}")).with_attribute("seq", seq.to_string());
                if let Err(e) = bus.publish(&topic, message).await {
                    panic!("publish of seq {seq} failed across the restart: {e}");
                }
                published.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // A connection of our own shows whether the restart really dropped client connections (if it
    // did not, the test would prove nothing about reconnecting).
    let probe = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("probe connection");
    let restarter = {
        let published = published.clone();
        tokio::spawn(async move {
            while published.load(Ordering::SeqCst) < RESTART_AFTER {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let ok = tokio::task::spawn_blocking(move || rabbitmq::sh(&restart))
                .await
                .unwrap_or(false);
            assert!(ok, "the broker restart command failed");
            let dropped = Instant::now() + Duration::from_secs(10);
            while probe.status().connected() && Instant::now() < dropped {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                !probe.status().connected(),
                "the restart command did not drop client connections"
            );
        })
    };

    let seen: Mutex<HashSet<usize>> = Mutex::new(HashSet::new());
    let deadline = Instant::now() + Duration::from_secs(75);
    while seen.lock().map(|s| s.len()).unwrap_or(0) < N && Instant::now() < deadline {
        let d = match timeout(Duration::from_secs(1), sub.next()).await {
            Err(_) => continue,
            Ok(Err(e)) => panic!("next() failed across the restart: {e}"),
            Ok(Ok(d)) => d,
        };
        let seq: usize = d
            .attributes
            .get("seq")
            .and_then(|s| s.parse().ok())
            .expect("a numeric seq attribute");
        // An ack on the channel the restart killed fails with LeaseLost; the message comes again.
        if d.ack().await.is_ok() {
            if let Ok(mut seen) = seen.lock() {
                seen.insert(seq);
            }
        }
    }
    // Bounded, so that a publish or a restart that hangs fails the test instead of stalling it.
    timeout(Duration::from_secs(120), restarter)
        .await
        .expect("the restart task finishes within 120 s")
        .expect("the restart task");
    timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publisher finishes within 120 s")
        .expect("the publisher");
    let seen = seen.into_inner().unwrap_or_else(|p| p.into_inner());
    let lost: Vec<usize> = (0..N).filter(|seq| !seen.contains(seq)).collect();
    assert!(
        lost.is_empty(),
        "{} of {N} messages lost across the broker restart, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    let _ = sub.close().await;
}
