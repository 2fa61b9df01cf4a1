//! A RabbitMQ outage of twice the publish retry while a workflow-manager runs: every intake task
//! is published within seconds of the broker's return, once per batch, rather than after the
//! claim timeout.
//!
//! This binary stops the machine's RabbitMQ (`rabbitmqctl stop_app`, see `support/rabbitmq.rs`),
//! so it holds this one test: no other test of the same binary runs while the broker is down. A
//! guard starts the broker again even when the test fails, and the test's exchange and queue are
//! deleted afterwards. It takes about 75 s.
//!
//! The workflow-manager reads only the names of ingestion batches, so the batches here are empty
//! objects under ingestion keys.

#[path = "support/rabbitmq.rs"]
mod rabbitmq;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use millrace_bus::amqp::AmqpBus;
use millrace_bus::{Bus, SubscribeOptions, Subscription};
use millrace_protocol::config::Config;
use millrace_protocol::layout::{ingestion_key, Partition};
use millrace_protocol::tasks::{groups, topics, IntakeTask, TaskMessage};
use millrace_runtime::Shutdown;
use millrace_store::Store;
use millrace_workflow_manager::{Settings, WorkflowManager};
use rabbitmq::BrokerUp;
use tokio::time::{timeout, Instant};

/// How long the amqp backend retries a publish (`RETRY_FOR` in `shared/bus/src/amqp.rs`).
const PUBLISH_RETRY: Duration = Duration::from_secs(30);
/// After the broker is back, every task must be published (and delivered) within this.
const WITHIN: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
version = 1

[[ingestor]]
name = "ing"
public_key = "PUB"

[[facilitator]]
index = 0
name = "alpha"
signing_public_key = "PUB"
hpke_public_key = "HPKE"

[[facilitator]]
index = 1
name = "beta"
signing_public_key = "PUB"
hpke_public_key = "HPKE"

[[aggregation]]
id = "outage"
vdaf = { type = "count" }
window = "1h"
grace = "5m"
max_age = "1day"
min_reports = 1
verify_key = "env:UNUSED"
verify_key_id = "0011223344556677"
ingestors = ["ing"]
"#;

async fn connect() -> AmqpBus {
    // Right after a restart the broker may refuse a connection for a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match AmqpBus::connect(&rabbitmq::url()).await {
            Ok(bus) => return bus,
            Err(e) if Instant::now() > deadline => {
                panic!("RabbitMQ at {} is not reachable: {e}", rabbitmq::url())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Deletes the test's topic and queue when dropped (after the broker is started again).
struct Cleanup {
    topic: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let topic = std::mem::take(&mut self.topic);
        // Drop cannot await: run the delete on a runtime of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    if let Ok(bus) = AmqpBus::connect(&rabbitmq::url()).await {
                        let _ = bus.delete_topic(&topic, &[&groups::intake(0)]).await;
                    }
                });
            }
        })
        .join();
    }
}

/// Receives intake tasks until `expected` distinct batches have come or `deadline` passes, then
/// `linger` longer to catch duplicates; returns batch → deliveries, and when the last distinct
/// batch came.
async fn receive(
    sub: &mut Box<dyn Subscription>,
    expected: usize,
    deadline: Instant,
    linger: Duration,
) -> (BTreeMap<String, usize>, Option<Instant>) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut until = deadline;
    let mut complete = None;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match timeout(left, sub.next()).await {
            Err(_) => break,
            Ok(Err(e)) => panic!("receiving intake tasks failed: {e}"),
            Ok(Ok(d)) => {
                let task = IntakeTask::from_json(&d.body).expect("an intake task");
                *seen.entry(task.batch).or_insert(0) += 1;
                d.ack().await.expect("ack");
                if seen.len() == expected && until == deadline {
                    complete = Some(Instant::now());
                    until = Instant::now() + linger;
                }
            }
        }
    }
    (seen, complete)
}

async fn write_batches(store: &Store, names: &[String]) {
    let p = Partition::of(chrono::Utc::now().timestamp() - 3600);
    for name in names {
        store
            .create(&ingestion_key("outage", p, name), "x")
            .await
            .expect("write a batch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_of_twice_the_publish_retry_delays_tasks_by_the_outage_only() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("MILLRACE_TEST_LOG").unwrap_or_else(|_| "warn".to_string()))
        .with_test_writer()
        .try_init();
    let prefix = format!(
        "millrace-test.outage-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let topic = topics::intake(&prefix, 0);
    let group = groups::intake(0);
    // Declared before the broker guard, so dropped after it: the broker is up for the clean-up.
    let _cleanup = Cleanup {
        topic: topic.clone(),
    };
    let _broker_up = BrokerUp;

    let consumer = connect().await;
    consumer
        .create_topic(&topic, Some(&group))
        .await
        .expect("create the intake topic");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(&format!("file://{}/store", dir.path().display())).expect("store");
    let config = Arc::new(
        Config::parse(CONFIG, Path::new("outage.toml"), Path::new(".")).expect("the config"),
    );
    let before: Vec<String> = (0..3).map(|i| format!("before-{i}")).collect();
    let during: Vec<String> = (0..5).map(|i| format!("during-{i}")).collect();
    write_batches(&store, &before).await;

    let manager = WorkflowManager::new(
        config,
        store.clone(),
        Arc::new(connect().await),
        Settings {
            facilitator: 0,
            topic_prefix: prefix.clone(),
            instance: "outage-test".to_string(),
            claim_timeout: Duration::from_secs(600),
            dry_run: false,
        },
    );
    let shutdown = Shutdown::new();
    let looping = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { manager.run(Duration::from_secs(1), shutdown).await })
    };

    // Before the outage: the first batches are published.
    let mut sub = consumer
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe");
    let (seen, _) = receive(
        &mut sub,
        before.len(),
        Instant::now() + Duration::from_secs(20),
        Duration::ZERO,
    )
    .await;
    assert_eq!(seen.len(), before.len(), "before the outage: {seen:?}");
    let _ = sub.close().await;
    drop(sub);
    drop(consumer);

    // The outage: new batches arrive while the broker is down for twice the publish retry.
    assert!(
        tokio::task::spawn_blocking(rabbitmq::stop_broker)
            .await
            .unwrap_or(false),
        "stopping RabbitMQ failed"
    );
    let stopped = Instant::now();
    write_batches(&store, &during).await;
    tokio::time::sleep_until(stopped + 2 * PUBLISH_RETRY).await;
    assert!(
        tokio::task::spawn_blocking(rabbitmq::start_broker)
            .await
            .unwrap_or(false),
        "starting RabbitMQ again failed"
    );
    let back = Instant::now();

    // After it: every task of the outage within seconds, each once (and none of before again).
    let consumer = connect().await;
    let mut sub = consumer
        .subscribe(&topic, SubscribeOptions::new(group.clone()))
        .await
        .expect("subscribe after the outage");
    let (seen, complete) = receive(
        &mut sub,
        during.len(),
        back + WITHIN,
        Duration::from_secs(3),
    )
    .await;
    shutdown.trigger();
    let _ = sub.close().await;
    looping.await.expect("the workflow-manager loop");
    let expected: BTreeMap<String, usize> = during.iter().map(|b| (b.clone(), 1)).collect();
    assert_eq!(
        seen,
        expected,
        "every batch of the outage once, within {WITHIN:?} of the broker's return (outage {:?})",
        back - stopped
    );
    if let Some(complete) = complete {
        eprintln!(
            "outage {:?}; every task arrived {:?} after the broker's return",
            back - stopped,
            complete - back
        );
    }
}
