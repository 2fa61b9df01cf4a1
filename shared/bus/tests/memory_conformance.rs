//! The conformance suite against the in-memory bus: one test per behaviour, so a failure names it.
//! Each test gets its own bus and prefix; the multi-threaded runtime makes competing consumers and
//! timers race as they would in a service.

use std::sync::Arc;

use millrace_bus::conformance;
use millrace_bus::memory::MemoryBus;

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            conformance::$name(&MemoryBus::new(), "conf").await;
        }
    };
}

millrace_bus::for_each_conformance_case!(conformance_test);

/// All behaviours in turn on one shared bus, as a backend's CI job would run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_on_one_bus() {
    conformance::run_all(Arc::new(MemoryBus::new()), "all").await;
}
