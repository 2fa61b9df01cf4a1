//! The conformance suite against a real Kafka-compatible broker: one test per behaviour, so a
//! failure names it.
//!
//! The broker's address comes from `MILLRACE_TEST_KAFKA` (`HOST:PORT`). Without it, the first test
//! starts tansu through `scripts/kafka-broker.sh start` and the script stops it again when this
//! test process exits (`KAFKA_STOP_WITH_PID`). No test skips: no broker is a failure.
//!
//! Every run uses its own topic prefix, so runs against a shared broker do not see each other.
//! The tests take turns (one lock) so that their short leases and quiet periods are not measured
//! on a machine busy with the other tests' thousands of messages.
//!
//! There is no broker-restart test: tansu's memory storage forgets everything on restart.

#[path = "../../../tests/support/local_services.rs"]
mod local_services;

use local_services::{address, run_prefix, KAFKA};
use millrace_bus::conformance;
use millrace_bus::kafka::KafkaBus;
use millrace_bus::Bus;
use tokio::sync::Mutex;

/// Connects to the broker and holds the turn for one test.
async fn bus() -> (KafkaBus, tokio::sync::MutexGuard<'static, ()>) {
    static TURN: Mutex<()> = Mutex::const_new(());
    let turn = TURN.lock().await;
    let addr = address(&KAFKA);
    let url = format!("kafka://{addr}");
    match KafkaBus::connect(&url).await {
        Ok(bus) => (bus, turn),
        Err(e) => panic!("connecting to {url}: {e}"),
    }
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (bus, _turn) = bus().await;
            conformance::$name(&bus, &run_prefix(stringify!($name))).await;
            if let Err(e) = bus.flush().await {
                panic!("flush at the end: {e}");
            }
        }
    };
}

millrace_bus::for_each_conformance_case!(conformance_test);

/// A bad URL and an unreachable broker fail plainly instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_url_and_unreachable_broker_fail_plainly() {
    let err = KafkaBus::connect("kafka://")
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("kafka://")),
        "{err:?}"
    );
    let err = KafkaBus::connect("kafka://127.0.0.1:1")
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("cannot reach Kafka at 127.0.0.1:1")),
        "{err:?}"
    );
}
