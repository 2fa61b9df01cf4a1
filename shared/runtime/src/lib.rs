//! What every Millrace service shares: the worker loop (written once, here), the shutdown signal,
//! the health and metrics endpoint, logging and traces (with the trace context carried across
//! topics), and opening buses and stores from URLs.

pub mod cli;
pub mod conformance;
pub mod health;
pub mod lag;
pub mod propagation;
pub mod push;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
pub mod zeroed;

pub use shutdown::Shutdown;
pub use worker::{
    run_worker, run_worker_observed, Handler, Task, TaskError, WorkerConfig, WorkerReport,
};
