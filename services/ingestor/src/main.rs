//! The ingestor binary: serves the upload API on `--listen`, and `/metrics`, `/healthz` and
//! `/readyz` on `--metrics-addr`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use millrace_ingestor::{serve, Ingestor, Settings};
use millrace_protocol::config::Config;
use millrace_runtime::health::{self, Readiness};
use millrace_runtime::Shutdown;
use millrace_store::Store;

/// Takes client reports over HTTP and writes them, in signed batches, to both facilitators'
/// stores; answers 201 only once both have the batch.
#[derive(Parser, Debug)]
#[command(name = "ingestor", version)]
struct Args {
    /// The aggregations file (TOML), with this ingestor's private key directory.
    #[arg(long, env = "MILLRACE_CONFIG")]
    config: PathBuf,
    /// This ingestor's name in the config: it signs with its key and serves the aggregations
    /// that list it.
    #[arg(long, env = "MILLRACE_INGESTOR")]
    ingestor: String,
    /// Facilitator 0's object store (file:///…, s3://…, gs://…).
    #[arg(long, env = "MILLRACE_STORE0")]
    store0: String,
    /// Facilitator 1's object store.
    #[arg(long, env = "MILLRACE_STORE1")]
    store1: String,
    /// Where to serve the upload API.
    #[arg(long, env = "MILLRACE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "MILLRACE_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    millrace_runtime::telemetry::init_logging("info");
    // The recorder first: the ingestor registers its failure counters at zero when it is made.
    if health::metrics_handle().is_none() {
        anyhow::bail!("ingestor: cannot install the metrics recorder");
    }
    let config = Arc::new(Config::load(&args.config)?);
    let stores = [
        Store::open(&args.store0).context("facilitator 0's store")?,
        Store::open(&args.store1).context("facilitator 1's store")?,
    ];
    let ingestor = Ingestor::new(config, &args.ingestor, stores, args.settings)?;
    let shutdown = Shutdown::from_signals();
    let readiness = Readiness::new();
    let metrics = health::serve(args.metrics_addr, readiness.clone(), shutdown.clone())
        .await
        .with_context(|| format!("ingestor: cannot serve metrics on {}", args.metrics_addr))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("ingestor: cannot listen on {}", args.listen))?;
    tracing::info!(
        service = "ingestor",
        listen = %listener.local_addr()?,
        metrics = %metrics,
        "started"
    );
    serve(listener, ingestor, readiness, shutdown)
        .await
        .context("ingestor: serving")?;
    millrace_runtime::telemetry::shutdown();
    Ok(())
}
