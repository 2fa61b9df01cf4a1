//! The cleaner binary: one pass (`--once`, for an hourly CronJob) or a loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use millrace_cleaner::{Cleaner, Role, Settings};
use millrace_protocol::config::Config;
use millrace_runtime::cli::parse_duration;
use millrace_store::Store;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    millrace_runtime::telemetry::init_logging("info");
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
    if args.once {
        let report = cleaner.run_once(chrono::Utc::now()).await?;
        tracing::info!(deleted = report.deleted.len(), "clean pass finished");
    } else {
        cleaner
            .run(args.interval, millrace_runtime::Shutdown::from_signals())
            .await;
    }
    Ok(())
}
