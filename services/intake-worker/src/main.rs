//! The intake-worker binary: consumes `{prefix}.{facilitator}.intake`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use millrace_intake_worker::IntakeWorker;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::topics;
use millrace_runtime::cli::{BusArgs, WorkerArgs};
use millrace_store::Store;

/// Validates ingestion batches: decrypts each report, runs Prio3 verify_init, and writes the
/// signed validation batch to this facilitator's store and to its peer's.
#[derive(Parser, Debug)]
#[command(name = "intake-worker", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    /// The aggregations file (TOML).
    #[arg(long, env = "MILLRACE_CONFIG")]
    config: PathBuf,
    /// Which facilitator this is: 0 or 1.
    #[arg(long, env = "MILLRACE_FACILITATOR", value_parser = clap::value_parser!(u8).range(0..=1))]
    facilitator: u8,
    /// This facilitator's object store (file:///…, s3://…, gs://…).
    #[arg(long, env = "MILLRACE_STORE")]
    store: String,
    /// The peer facilitator's object store (validation batches are copied there).
    #[arg(long, env = "MILLRACE_PEER_STORE")]
    peer_store: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = topics::intake(&args.bus.topic_prefix, args.facilitator);
    let group = format!("intake-worker-{}", args.facilitator);
    let service = millrace_runtime::service::start(
        "intake-worker",
        &args.bus,
        &[(topic.clone(), Some(group.clone()))],
    )
    .await?;
    let config = Arc::new(Config::load(&args.config)?);
    let worker = IntakeWorker::new(
        config,
        args.facilitator,
        Store::open(&args.store)?,
        Store::open(&args.peer_store)?,
    )?;
    service.readiness.set_ready(true);
    let report = millrace_runtime::run_worker(
        service.bus,
        args.worker.worker_config(topic, group),
        Arc::new(worker),
        service.shutdown,
    )
    .await?;
    tracing::info!(?report, "intake-worker stopped");
    Ok(())
}
