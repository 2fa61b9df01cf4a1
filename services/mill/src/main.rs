//! The mill binary: consumes `{prefix}.collect`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use millrace_mill::Mill;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::{groups, topics};
use millrace_runtime::cli::{BusArgs, WorkerArgs};
use millrace_store::Store;

/// Joins both facilitators' sum parts of a window into its result (the collector's service).
#[derive(Parser, Debug)]
#[command(name = "mill", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    /// The aggregations file (TOML).
    #[arg(long, env = "MILLRACE_CONFIG")]
    config: PathBuf,
    /// The collector's object store (sum parts, results, computation records).
    #[arg(long, env = "MILLRACE_COLLECTOR_STORE")]
    collector_store: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = topics::collect(&args.bus.topic_prefix);
    let group = groups::collect();
    let results = topics::results(&args.bus.topic_prefix);
    let service = millrace_runtime::service::start(
        "mill",
        &args.bus,
        &[
            (topic.clone(), Some(group.clone())),
            (results, Some(millrace_bus::INSPECT_GROUP.to_string())),
        ],
    )
    .await?;
    let config = Arc::new(Config::load(&args.config)?);
    let mill = Mill::new(
        config,
        Store::open(&args.collector_store)?,
        service.bus.clone(),
        &args.bus.topic_prefix,
    )?;
    service
        .consume(
            "mill",
            args.worker.worker_config(topic, group),
            Arc::new(mill),
        )
        .await
}
