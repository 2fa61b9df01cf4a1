//! The aggregate-worker binary: consumes `{prefix}.{facilitator}.aggregate`.

use std::sync::Arc;

use clap::Parser;
use millrace_aggregate_worker::AggregateWorker;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::{groups, topics};
use millrace_runtime::cli::{BusArgs, FacilitatorArgs, WorkerArgs};
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
    #[command(flatten)]
    me: FacilitatorArgs,
    /// The collector's object store (sum parts go there).
    #[arg(long, env = "MILLRACE_COLLECTOR_STORE")]
    collector_store: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = topics::aggregate(&args.bus.topic_prefix, args.me.facilitator);
    let group = groups::aggregate(args.me.facilitator);
    let collect = topics::collect(&args.bus.topic_prefix);
    let service = millrace_runtime::service::start(
        "aggregate-worker",
        &args.bus,
        &[
            (topic.clone(), Some(group.clone())),
            (collect, Some(groups::collect())),
        ],
    )
    .await?;
    let config = Arc::new(Config::load(&args.me.config)?);
    let worker = AggregateWorker::new(
        config,
        args.me.facilitator,
        Store::open(&args.me.store)?,
        Store::open(&args.collector_store)?,
        service.bus.clone(),
        &args.bus.topic_prefix,
    )?;
    let consumed = service
        .consume(
            "aggregate-worker",
            args.worker.worker_config(topic, group),
            Arc::new(worker),
        )
        .await;
    millrace_runtime::telemetry::shutdown();
    consumed
}
