//! The worker-level conformance suite (`millrace_runtime::conformance`) on every bus backend:
//! the in-memory bus here, and each real broker where its test says how to reach it.

use std::sync::Arc;

use millrace_bus::memory::MemoryBus;
use millrace_runtime::conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bus_passes_the_worker_conformance_suite() {
    conformance::run_all(Arc::new(MemoryBus::new()), "wc-memory").await;
}
