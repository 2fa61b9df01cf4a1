//! The mill binary: consumes `{prefix}.collect`, and sweeps the windows it waits on every
//! `--sweep-interval` (joining those whose message was lost, failing those past their
//! `wait_deadline`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// How often to sweep the windows waiting for a sum part: join those whose second part is
    /// there (a lost message), fail those past their aggregation's wait_deadline.
    #[arg(long, env = "MILLRACE_SWEEP_INTERVAL", default_value = "60s", value_parser = millrace_runtime::cli::parse_duration)]
    sweep_interval: Duration,
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
    let mill = Arc::new(Mill::new(
        config,
        Store::open(&args.collector_store)?,
        service.bus.clone(),
        &args.bus.topic_prefix,
    )?);
    // The sweep runs beside the worker loop and stops with it, on SIGTERM or if the loop fails.
    let shutdown = service.shutdown.clone();
    let sweeps = tokio::spawn({
        let (mill, shutdown, interval) = (mill.clone(), shutdown.clone(), args.sweep_interval);
        async move { mill.run_sweeps(interval, shutdown).await }
    });
    let consumed = service
        .consume("mill", args.worker.worker_config(topic, group), mill)
        .await;
    shutdown.trigger();
    if let Err(e) = sweeps.await {
        tracing::error!(error = %e, "the sweep loop ended abnormally");
    }
    millrace_runtime::telemetry::shutdown();
    consumed
}
