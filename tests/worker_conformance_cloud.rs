//! The worker-level conformance suite (`millrace_runtime::conformance`) on the cloud buses:
//! SNS/SQS on moto and Pub/Sub on its emulator, started by `make test` or, without it, by the first
//! test that needs them. The emulators keep everything in memory and are thrown away after the
//! run, so there is nothing to clean up.

#[path = "support/emulators.rs"]
mod emulators;

use std::sync::Arc;

use millrace_bus::Bus;
use millrace_runtime::conformance;

/// One backend at a time, as in tests/worker_conformance.rs.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prefix(backend: &str) -> String {
    format!(
        "wc-{backend}-{}-{}",
        std::process::id(),
        rand::random::<u32>() % 100_000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_sqs_passes_the_worker_conformance_suite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // moto keeps everything in memory and is thrown away after the run: nothing to clean up.
    if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    }
    let endpoint = emulators::emulator("moto");
    let url = format!("sns-sqs://us-east-1?endpoint={endpoint}");
    let bus: Arc<dyn Bus> = millrace_bus::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("SNS/SQS at {url}: {e}"));
    conformance::run_all(bus, &prefix("sns")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_passes_the_worker_conformance_suite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // The emulator keeps everything in memory and is thrown away after the run.
    let host = emulators::emulator("pubsub");
    let url = format!("pubsub://millrace-test?emulator={host}");
    let bus: Arc<dyn Bus> = millrace_bus::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("Pub/Sub at {url}: {e}"));
    conformance::run_all(bus, &prefix("pubsub")).await;
}
