//! The aggregate-worker binary: consumes `{prefix}.{facilitator}.aggregate`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use millrace_aggregate_worker::AggregateWorker;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::topics;
use millrace_runtime::cli::{BusArgs, WorkerArgs};
use millrace_store::Store;

/// Combines both facilitators' verifier shares for a window's batches and writes this
/// facilitator's signed sum part to the collector's store.
#[derive(Parser, Debug)]
#[command(name = "aggregate-worker", version)]
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
    /// This facilitator's object store.
    #[arg(long, env = "MILLRACE_STORE")]
    store: String,
    /// The collector's object store (sum parts go there).
    #[arg(long, env = "MILLRACE_COLLECTOR_STORE")]
    collector_store: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = topics::aggregate(&args.bus.topic_prefix, args.facilitator);
    let group = format!("aggregate-worker-{}", args.facilitator);
    let collect = topics::collect(&args.bus.topic_prefix);
    let service = millrace_runtime::service::start(
        "aggregate-worker",
        &args.bus,
        &[(topic.clone(), Some(group.clone())), (collect, None)],
    )
    .await?;
    let config = Arc::new(Config::load(&args.config)?);
    let worker = AggregateWorker::new(
        config,
        args.facilitator,
        Store::open(&args.store)?,
        Store::open(&args.collector_store)?,
        service.bus.clone(),
        &args.bus.topic_prefix,
    )?;
    service.readiness.set_ready(true);
    let report = millrace_runtime::run_worker(
        service.bus,
        args.worker.worker_config(topic, group),
        Arc::new(worker),
        service.shutdown,
    )
    .await?;
    tracing::info!(?report, "aggregate-worker stopped");
    Ok(())
}
