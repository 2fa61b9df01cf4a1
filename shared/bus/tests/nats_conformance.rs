//! The conformance suite against NATS JetStream on 127.0.0.1:4222 (override with
//! `MILLRACE_TEST_NATS_URL`): one test per behaviour, each on its own topics (a prefix unique to
//! the process and the test) whose streams are deleted afterwards, pass or fail. Plus a broker
//! restart in the middle of a stream of messages, which must lose nothing.

use std::collections::HashSet;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use millrace_bus::conformance;
use millrace_bus::nats::NatsBus;
use millrace_bus::{Bus, BusError, Message, SubscribeOptions};
use tokio::time::{timeout, Instant};

const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
const SERVER_ADDR: &str = "127.0.0.1:4222";
const STOP: &str = "start-stop-daemon --stop --oknodo --retry 10 --exec /usr/sbin/nats-server";
const START: &str = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server \
    -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log";

fn url() -> String {
    std::env::var("MILLRACE_TEST_NATS_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

fn unique_prefix(test: &str) -> String {
    format!(
        "mrtest-{}-{:08x}-{test}",
        std::process::id(),
        rand::random::<u32>()
    )
}

async fn connect() -> Arc<NatsBus> {
    match NatsBus::connect(&url()).await {
        Ok(bus) => Arc::new(bus),
        Err(e) => panic!("connecting to NATS at {}: {e}", url()),
    }
}

/// Runs `check` on a fresh bus and prefix, deletes the prefix's streams, then reports the
/// outcome (re-raising the check's panic, if any).
async fn with_bus<F, Fut>(test: &str, check: F)
where
    F: FnOnce(Arc<NatsBus>, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let bus = connect().await;
    let prefix = unique_prefix(test);
    let outcome = tokio::spawn(check(bus.clone(), prefix.clone())).await;
    if let Err(e) = bus.delete_topics_under(&prefix).await {
        eprintln!("cleaning up streams under {prefix}: {e}");
    }
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{test}: {e}"),
        }
    }
}

/// [`with_bus`] while holding the server for reading (see [`SERVER`]).
async fn shared<F, Fut>(test: &str, check: F)
where
    F: FnOnce(Arc<NatsBus>, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let _shared = SERVER.read().await;
    with_bus(test, check).await;
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            shared(stringify!($name), |bus, prefix| async move {
                conformance::$name(&*bus, &prefix).await
            })
            .await;
        }
    };
}

millrace_bus::for_each_conformance_case!(conformance_test);

// ---------------------------------------------------------------------------------------------
// Backend specifics

#[test]
fn stream_and_consumer_names_are_valid_and_distinct() {
    use millrace_bus::nats::{consumer_name, stream_name};
    assert_eq!(stream_name("mr.fac-1.intake"), "mr_fac-1_intake");
    assert_eq!(consumer_name("aggregate-worker"), "aggregate-worker");
    assert_ne!(stream_name("a.b"), stream_name("a_b"));
    for name in [stream_name("a b/c*>"), consumer_name("g.1 x")] {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{name:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_attributes_arrive_exactly_as_published() {
    shared("attributes", |bus, prefix| async move {
        let topic = format!("{prefix}.attributes");
        let message = Message::new("{}")
            .with_attribute("seq", "1")
            .with_attribute("note", "ünï-码 ✓ with spaces=and;symbols")
            .with_attribute("padded", "  x \t")
            .with_attribute("multi line", "a\r\nb")
            .with_attribute("Nats-Msg-Id", "mine")
            .with_attribute("empty", "");
        let id = bus
            .publish(&topic, message.clone())
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
        let mut sub = bus
            .subscribe(&topic, SubscribeOptions::new("g"))
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        let delivery = match timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(delivery)) => delivery,
            Ok(Err(e)) => panic!("next() failed: {e}"),
            Err(_) => panic!("nothing delivered within 10s"),
        };
        assert_eq!(delivery.message_id, id, "publish and delivery ids differ");
        assert_eq!(delivery.attributes, message.attributes);
        assert_eq!(delivery.body, message.body);
        delivery.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Broker restart

/// The restart test stops the one shared server: tests that share it must not run meanwhile.
/// (Cargo runs this file's tests in one process, so a process-wide lock is enough; every other
/// test here holds it for reading.)
static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn port_open() -> bool {
    SERVER_ADDR
        .parse::<SocketAddr>()
        .ok()
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
}

fn sh(command: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for_port(within: Duration) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if port_open() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Restarts the server: `MILLRACE_TEST_NATS_RESTART` if set, else stop and start it here.
fn restart_server() {
    let ok = match std::env::var("MILLRACE_TEST_NATS_RESTART") {
        Ok(command) => sh(&command),
        Err(_) => sh(STOP) && sh(START),
    };
    assert!(ok, "restarting nats-server failed");
    assert!(
        wait_for_port(Duration::from_secs(20)),
        "nats-server did not accept connections within 20s of the restart"
    );
}

/// Starts the server again if it is down when the test ends, whatever happened in it.
struct ServerGuard;

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if !port_open() {
            eprintln!("nats-server is down after the test; starting it");
            sh(START);
            wait_for_port(Duration::from_secs(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing() {
    const N: usize = 500;
    let _exclusive = SERVER.write().await;
    let _guard = ServerGuard;
    with_bus("restart", |bus, prefix| async move {
        let topic = format!("{prefix}.restart");
        bus.create_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("create_topic: {e}"));
        let seen = Arc::new(Mutex::new(HashSet::new()));

        let consumer = {
            let (bus, topic, seen) = (bus.clone(), topic.clone(), seen.clone());
            tokio::spawn(async move {
                let options = SubscribeOptions::new("g")
                    .lease(Duration::from_secs(5))
                    .prefetch(20);
                let mut sub = bus
                    .subscribe(&topic, options)
                    .await
                    .unwrap_or_else(|e| panic!("subscribe: {e}"));
                let until = Instant::now() + Duration::from_secs(75);
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
                    let seq: usize = delivery
                        .attributes
                        .get("seq")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("no seq on {}", delivery.message_id));
                    // An ack lost to the restart only means a redelivery: at least once.
                    if delivery.ack().await.is_ok() {
                        if let Ok(mut seen) = seen.lock() {
                            seen.insert(seq);
                        }
                    }
                }
                let _ = sub.close().await;
            })
        };

        let restarter = {
            let mut restarted = None;
            for seq in 0..N {
                if seq == N / 3 {
                    restarted = Some(tokio::task::spawn_blocking(restart_server));
                }
                let message = Message::new(format!("{{\"seq\":{seq}}}"))
                    .with_attribute("seq", seq.to_string());
                if let Err(e) = bus.publish(&topic, message).await {
                    panic!("publish of seq {seq} failed across the restart: {e}");
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            restarted
        };
        if let Some(restarted) = restarter {
            if let Err(e) = restarted.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        if let Err(e) = consumer.await {
            std::panic::resume_unwind(e.into_panic());
        }
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        let lost: Vec<usize> = (0..N).filter(|seq| !seen.contains(seq)).collect();
        assert!(
            lost.is_empty(),
            "{} of {N} messages never arrived across the restart, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    })
    .await;
}
