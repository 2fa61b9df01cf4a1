//! The intake-worker binary: consumes `{prefix}.{facilitator}.intake`.

use std::sync::Arc;

use clap::Parser;
use millrace_intake_worker::IntakeWorker;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::{groups, topics};
use millrace_runtime::cli::{BusArgs, FacilitatorArgs, WorkerArgs};
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
    #[command(flatten)]
    me: FacilitatorArgs,
    /// The peer facilitator's object store (validation batches are copied there).
    #[arg(long, env = "MILLRACE_PEER_STORE")]
    peer_store: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = topics::intake(&args.bus.topic_prefix, args.me.facilitator);
    let group = groups::intake(args.me.facilitator);
    let service = millrace_runtime::service::start(
        "intake-worker",
        &args.bus,
        &[(topic.clone(), Some(group.clone()))],
    )
    .await?;
    let config = Arc::new(Config::load(&args.me.config)?);
    let worker = IntakeWorker::new(
        config,
        args.me.facilitator,
        Store::open(&args.me.store)?,
        Store::open(&args.peer_store)?,
    )?;
    let consumed = service
        .consume(
            "intake-worker",
            args.worker.worker_config(topic, group),
            Arc::new(worker),
        )
        .await;
    millrace_runtime::telemetry::shutdown();
    consumed
}
