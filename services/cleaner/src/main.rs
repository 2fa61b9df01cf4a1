//! The cleaner binary: one pass (`--once`, for an hourly CronJob) or a loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use millrace_cleaner::{Cleaner, Role, Settings};
use millrace_protocol::config::Config;
use millrace_runtime::cli::parse_duration;
use millrace_store::Store;

/// The cleaner's Pushgateway job.
const JOB: &str = "millrace-cleaner";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Facilitator,
    Collector,
}

/// Deletes expired objects in deletable states, markers last, with an audit line per deletion.
/// It needs only object storage: no bus.
#[derive(Parser, Debug)]
#[command(name = "cleaner", version)]
struct Args {
    /// The aggregations file (TOML).
    #[arg(long, env = "MILLRACE_CONFIG")]
    config: PathBuf,
    /// The store to clean.
    #[arg(long, env = "MILLRACE_STORE")]
    store: String,
    /// Whether that store is a facilitator's or the collector's.
    #[arg(
        long,
        env = "MILLRACE_CLEANER_ROLE",
        value_enum,
        default_value = "facilitator"
    )]
    role: RoleArg,
    /// Objects older than this are deleted once in a deletable state.
    #[arg(long, env = "MILLRACE_TTL", default_value = "7days", value_parser = parse_duration)]
    ttl: Duration,
    /// Run one pass and exit.
    #[arg(long, env = "MILLRACE_ONCE")]
    once: bool,
    /// Time between passes when running as a loop.
    #[arg(long, env = "MILLRACE_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    interval: Duration,
    /// Delete nothing; log each deletion that would be made.
    #[arg(long, env = "MILLRACE_DRY_RUN")]
    dry_run: bool,
    /// A Prometheus Pushgateway (`http://host:9091`) to push this process's metrics to: after
    /// the pass with `--once`, every minute and at exit otherwise (the cleaner serves no
    /// /metrics of its own). The group is `job/millrace-cleaner/instance/{the store}`.
    #[arg(long, env = "MILLRACE_PUSHGATEWAY")]
    pushgateway: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    millrace_runtime::telemetry::init_logging("info");
    if args.pushgateway.is_some() {
        millrace_runtime::push::record_for_push()?;
    }
    let instance = millrace_secrets::redact(&args.store);
    let config = Arc::new(Config::load(&args.config)?);
    let cleaner = Cleaner::new(
        config,
        Store::open(&args.store)?,
        Settings {
            role: match args.role {
                RoleArg::Facilitator => Role::Facilitator,
                RoleArg::Collector => Role::Collector,
            },
            ttl: args.ttl,
            dry_run: args.dry_run,
        },
    );
    let gateway = args.pushgateway.as_deref();
    let result = if args.once {
        cleaner.run_once(chrono::Utc::now()).await.map(|report| {
            tracing::info!(deleted = report.deleted.len(), "clean pass finished");
        })
    } else {
        let pushing = gateway.map(|gateway| {
            let (gateway, instance) = (gateway.to_string(), instance.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    millrace_runtime::push::push_or_warn(Some(&gateway), JOB, &instance).await;
                }
            })
        });
        cleaner
            .run(args.interval, millrace_runtime::Shutdown::from_signals())
            .await;
        if let Some(pushing) = pushing {
            pushing.abort();
        }
        Ok(())
    };
    // The run's counters, failed or not.
    millrace_runtime::push::push_or_warn(gateway, JOB, &instance).await;
    millrace_runtime::telemetry::shutdown();
    Ok(result?)
}
