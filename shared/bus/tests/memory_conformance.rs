//! The conformance suite against the in-memory bus: one test per behaviour, so a failure names it.
//! Each test gets its own bus and prefix; the multi-threaded runtime makes competing consumers and
//! timers race as they would in a service.

use std::sync::Arc;

use millrace_bus::conformance;
use millrace_bus::memory::MemoryBus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_receive_roundtrip() {
    conformance::publish_and_receive_roundtrip(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_messages() {
    conformance::competing_consumers_share_messages(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers() {
    conformance::nack_redelivers(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_redelivers_after_the_delay() {
    conformance::nack_with_delay_redelivers_after_the_delay(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_redelivers() {
    conformance::expired_lease_redelivers(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_lease_is_kept() {
    conformance::extended_lease_is_kept(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_count_rises_across_redeliveries() {
    conformance::attempt_count_rises_across_redeliveries(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_delivery_goes_to_another_consumer() {
    conformance::abandoned_delivery_goes_to_another_consumer(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_reopen_loses_nothing() {
    conformance::close_and_reopen_loses_nothing(&MemoryBus::new(), "conf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_after_publish_loses_nothing() {
    conformance::flush_after_publish_loses_nothing(&MemoryBus::new(), "conf").await;
}

/// All behaviours in turn on one shared bus, as a backend's CI job would run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_bus() {
    conformance::run_all(Arc::new(MemoryBus::new()), "all").await;
}
