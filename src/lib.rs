//! The `millrace` command's library: keygen, simulated ingestion, the in-process fleet used by
//! `millrace demo` and the end-to-end tests, status, and benchmarks.

pub mod bench;
pub mod bench_ingest;
pub mod bench_reference;
pub mod bench_windows;
pub mod config_check;
pub mod dead_letters;
pub mod demo;
pub mod fleet;
pub mod ingest;
pub mod keygen;
pub mod replay;
pub mod status;
