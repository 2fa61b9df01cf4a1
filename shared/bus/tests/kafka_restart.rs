//! The Kafka backend across a broker restart: consumers and publishers ride it out and no message
//! is lost (at least once).
//!
//! tansu's memory storage forgets everything on restart, so this test runs its own tansu with
//! durable storage (S3 on moto) through `scripts/kafka-durable-broker.sh`: `start` before, the
//! script's `restart-broker` (kill -9 tansu, start it again on the same port and storage) in the
//! middle of the stream, and `stop` afterwards, also when the test fails. It never touches the
//! broker of `scripts/kafka-broker.sh` that the conformance tests use.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use millrace_bus::kafka::KafkaBus;
use millrace_bus::{Bus, BusError, Message, SubscribeOptions};
use tokio::time::{timeout, Instant};

/// Messages published; the broker restarts after `N / 3` of them.
const N: usize = 300;
/// How long, from the first publish, every message has to arrive.
const DEADLINE: Duration = Duration::from_secs(120);

fn script() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/kafka-durable-broker.sh");
    (root, script)
}

/// Runs `scripts/kafka-durable-broker.sh COMMAND`; returns its stdout, panics with its stderr.
fn run_script(command: &str) -> String {
    let (root, script) = script();
    let output = Command::new("bash")
        .arg(&script)
        .arg(command)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("running {} {command}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} {command} failed ({}):\n{stderr}",
        script.display(),
        output.status,
    );
    eprint!("{stderr}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Stops the durable broker (tansu and moto) when dropped, whatever happened in the test.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let (root, script) = script();
        match Command::new("bash")
            .arg(&script)
            .arg("stop")
            .current_dir(&root)
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("{} stop failed ({status})", script.display()),
            Err(e) => eprintln!("running {} stop: {e}", script.display()),
        }
    }
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("millrace-test-{}-{nanos:x}.{name}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let _guard = BrokerGuard;
    let addr = tokio::task::spawn_blocking(|| run_script("start"))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    assert!(
        !addr.is_empty(),
        "the durable broker's start printed no address"
    );
    let url = format!("kafka://{addr}");
    let bus = Arc::new(
        KafkaBus::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}")),
    );
    let topic = unique("restart");
    let group = "g";
    bus.create_topic(&topic, Some(group))
        .await
        .unwrap_or_else(|e| panic!("create_topic {topic}: {e}"));

    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let until = started + DEADLINE;

    let consumer = {
        let (bus, topic, seen, deliveries) =
            (bus.clone(), topic.clone(), seen.clone(), deliveries.clone());
        tokio::spawn(async move {
            let options = SubscribeOptions::new(group)
                .lease(Duration::from_secs(30))
                .prefetch(20);
            let mut sub = bus
                .subscribe(&topic, options)
                .await
                .unwrap_or_else(|e| panic!("subscribe: {e}"));
            while Instant::now() < until {
                if seen.lock().map(|s| s.len()).unwrap_or(0) >= N {
                    break;
                }
                let delivery = match timeout(Duration::from_secs(1), sub.next()).await {
                    Err(_) => continue,
                    Ok(Ok(delivery)) => delivery,
                    Ok(Err(BusError::Closed)) => panic!("subscription closed by itself"),
                    Ok(Err(e)) => panic!("next() failed: {e}"),
                };
                deliveries.fetch_add(1, Ordering::Relaxed);
                let body = String::from_utf8_lossy(&delivery.body).into_owned();
                // The body counts as received once handed out; an ack lost to the restart only
                // means a redelivery (at least once), so its result does not matter here.
                if let Ok(mut seen) = seen.lock() {
                    seen.insert(body);
                }
                let _ = delivery.ack().await;
            }
            let _ = sub.close().await;
        })
    };

    let publisher = {
        let (bus, topic) = (bus.clone(), topic.clone());
        tokio::spawn(async move {
            let mut restart = None;
            for seq in 0..N {
                if seq == N / 3 {
                    restart = Some(tokio::task::spawn_blocking(|| {
                        let began = std::time::Instant::now();
                        run_script("restart-broker");
                        began.elapsed()
                    }));
                }
                let message = Message::new(format!("{{\"seq\":{seq}}}"));
                if let Err(e) = bus.publish(&topic, message).await {
                    panic!("publish of seq {seq} failed across the restart: {e}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            restart
        })
    };

    let restart = publisher
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let published_in = started.elapsed();
    let restart_took = match restart {
        Some(handle) => handle
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
        None => panic!("the broker was never restarted"),
    };
    if let Err(e) = consumer.await {
        std::panic::resume_unwind(e.into_panic());
    }
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    eprintln!(
        "published {N} in {published_in:?} (restart took {restart_took:?}); received {} distinct \
         in {} deliveries after {:?}",
        seen.len(),
        deliveries.load(Ordering::Relaxed),
        started.elapsed()
    );
    let lost = missing(&seen);
    assert!(
        lost.is_empty(),
        "{} of {N} messages never arrived within {DEADLINE:?} across the broker restart, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );

    // The log itself survived: a group that joins only now reads all of it from the start,
    // including what was published before the restart. (With storage that forgets on restart,
    // the publisher would have re-created an empty topic and this group would miss those.)
    let late = read_all(
        &bus,
        &topic,
        "late",
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    let lost = missing(&late);
    assert!(
        lost.is_empty(),
        "a group joining after the restart read {} of {N} messages; missing e.g. {:?}",
        late.len(),
        &lost[..lost.len().min(10)]
    );
}

/// The sequence numbers of the `N` published bodies that are not in `seen`.
fn missing(seen: &HashSet<String>) -> Vec<usize> {
    (0..N)
        .filter(|seq| !seen.contains(&format!("{{\"seq\":{seq}}}")))
        .collect()
}

/// Reads `topic` in a new `group` until all `N` bodies have arrived or `until`; acks each.
async fn read_all(bus: &KafkaBus, topic: &str, group: &str, until: Instant) -> HashSet<String> {
    let mut sub = bus
        .subscribe(topic, SubscribeOptions::new(group).prefetch(50))
        .await
        .unwrap_or_else(|e| panic!("subscribe as {group}: {e}"));
    let mut seen = HashSet::new();
    while seen.len() < N && Instant::now() < until {
        match timeout(Duration::from_secs(1), sub.next()).await {
            Err(_) => continue,
            Ok(Ok(delivery)) => {
                seen.insert(String::from_utf8_lossy(&delivery.body).into_owned());
                let _ = delivery.ack().await;
            }
            Ok(Err(e)) => panic!("next() as {group} failed: {e}"),
        }
    }
    let _ = sub.close().await;
    seen
}
