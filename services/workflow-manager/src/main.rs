//! The workflow-manager binary: one pass (`--once`, for a CronJob) or a loop (`--interval`).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::{groups, topics};
use millrace_runtime::cli::{parse_duration, BusArgs, FacilitatorArgs};
use millrace_store::Store;
use millrace_workflow_manager::{Settings, WorkflowManager};

/// Finds new ingestion batches and closed windows in this facilitator's store and publishes
/// intake and aggregate tasks, each exactly once (idempotency markers).
#[derive(Parser, Debug)]
#[command(name = "workflow-manager", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    me: FacilitatorArgs,
    /// The peer facilitator's object store. Required for facilitator 0, the leader, which writes
    /// each window's manifest to both stores; facilitator 1 reads the manifest from its own.
    #[arg(long, env = "MILLRACE_PEER_STORE")]
    peer_store: Option<String>,
    /// Run one pass and exit (for a CronJob).
    #[arg(long, env = "MILLRACE_ONCE", conflicts_with = "interval")]
    once: bool,
    /// With `--once` (a CronJob, gone before Prometheus scrapes it): a Prometheus Pushgateway
    /// (`http://host:9091`) to push the pass's metrics to, as the group
    /// `job/millrace-workflow-manager/instance/facilitator-{N}`.
    #[arg(long, env = "MILLRACE_PUSHGATEWAY", requires = "once")]
    pushgateway: Option<String>,
    /// Time between passes when running as a loop.
    #[arg(long, env = "MILLRACE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    interval: Duration,
    /// A claim older than this is taken over (its owner is presumed dead).
    #[arg(long, env = "MILLRACE_CLAIM_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    claim_timeout: Duration,
    /// Write no marker and publish nothing; log each action that would be taken.
    #[arg(long, env = "MILLRACE_DRY_RUN")]
    dry_run: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prefix = &args.bus.topic_prefix;
    let service = millrace_runtime::service::start(
        "workflow-manager",
        &args.bus,
        &[
            (
                topics::intake(prefix, args.me.facilitator),
                Some(groups::intake(args.me.facilitator)),
            ),
            (
                topics::aggregate(prefix, args.me.facilitator),
                Some(groups::aggregate(args.me.facilitator)),
            ),
        ],
    )
    .await?;
    let config = Arc::new(Config::load(&args.me.config)?);
    let peer = match (&args.peer_store, args.me.facilitator) {
        (Some(url), _) => Some(Store::open(url)?),
        (None, 0) => anyhow::bail!(
            "facilitator 0 is the leader: it writes each window's manifest to both facilitators' stores, so it needs --peer-store (MILLRACE_PEER_STORE)"
        ),
        (None, _) => None,
    };
    if args.me.facilitator == 0 {
        // The leader signs window manifests: a missing or unreadable key is a start-up error,
        // not a failure of every window later.
        config.facilitator_signer(0).map_err(|e| {
            anyhow::anyhow!("facilitator 0 is the leader and signs window manifests: {e}")
        })?;
    }
    let mut wm = WorkflowManager::new(
        config,
        Store::open(&args.me.store)?,
        service.bus.clone(),
        Settings {
            facilitator: args.me.facilitator,
            topic_prefix: prefix.clone(),
            instance: millrace_workflow_manager::default_instance_name(),
            claim_timeout: args.claim_timeout,
            dry_run: args.dry_run,
        },
    );
    if let Some(peer) = peer {
        wm = wm.with_peer_store(peer);
    }
    service.readiness.set_ready(true);
    if args.once {
        // An aggregation that failed does not stop the others; the exit status still says so.
        let result = wm.run_once(chrono::Utc::now().timestamp()).await;
        service.bus.flush().await?;
        // The pass's counters, failed or not.
        millrace_runtime::push::push_or_warn(
            args.pushgateway.as_deref(),
            "millrace-workflow-manager",
            &format!("facilitator-{}", args.me.facilitator),
        )
        .await;
        let report = result?;
        tracing::info!(?report, "pass finished");
    } else {
        wm.run_observed(args.interval, service.shutdown, &service.liveness)
            .await;
        service.bus.flush().await?;
    }
    millrace_runtime::telemetry::shutdown();
    Ok(())
}
