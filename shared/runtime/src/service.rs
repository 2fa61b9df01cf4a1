//! The start-up every service binary shares: logging, the bus (with `--create-topics`), the
//! health endpoint and the shutdown signal.

use std::sync::Arc;

use anyhow::Context;
use millrace_bus::{dead_topic, rejected_topic, Bus, INSPECT_GROUP};

use crate::cli::BusArgs;
use crate::health::{self, Health, Liveness, Readiness};
use crate::worker::run_worker_observed;
use crate::{Handler, Shutdown, WorkerConfig};

/// What a running service holds.
pub struct Service {
    pub bus: Arc<dyn Bus>,
    /// `/readyz`: follows the bus's connection; the service marks it started.
    pub readiness: Readiness,
    /// `/healthz`: the service's loop beats it (`--heartbeat-timeout`).
    pub liveness: Liveness,
    pub shutdown: Shutdown,
}

/// Connects the bus named by `args`; creates `topics` (each with its `.dead` and `.rejected`
/// companions, and `group` where one is given) if `--create-topics` is set, or else checks that
/// they exist, so that a missing topic is a start-up error naming it; and starts the health
/// endpoint, whose `/readyz` follows the bus's connection from then on.
pub async fn start(
    name: &str,
    args: &BusArgs,
    topics: &[(String, Option<String>)],
) -> anyhow::Result<Service> {
    crate::telemetry::init_logging("info");
    let bus = millrace_bus::connect(&args.bus).await.with_context(|| {
        format!(
            "{name}: cannot open the bus {}",
            millrace_secrets::redact(&args.bus)
        )
    })?;
    for (topic, group) in topics {
        for t in [topic.clone(), dead_topic(topic), rejected_topic(topic)] {
            // The dead-letter and rejected topics get a group of their own so that, on buses
            // where an unsubscribed topic drops messages, what lands there is kept for operators.
            let g = if &t == topic {
                group.as_deref()
            } else {
                Some(INSPECT_GROUP)
            };
            if args.create_topics {
                bus.create_topic(&t, g)
                    .await
                    .with_context(|| format!("{name}: cannot create topic {t}"))?;
            } else {
                bus.check_topic(&t, g).await.with_context(|| {
                    format!("{name}: topic {t} is not ready (create it with Terraform, or start once with --create-topics)")
                })?;
            }
        }
    }
    let shutdown = Shutdown::from_signals();
    let readiness = Readiness::new();
    readiness.watch_bus(bus.clone());
    let liveness = Liveness::new(args.heartbeat_timeout);
    let health = Health::new(readiness.clone(), liveness.clone());
    let addr = health::serve(args.metrics_addr, health, shutdown.clone())
        .await
        .with_context(|| format!("{name}: cannot serve metrics on {}", args.metrics_addr))?;
    tracing::info!(service = name, bus = bus.name(), metrics = %addr, "started");
    Ok(Service {
        bus,
        readiness,
        liveness,
        shutdown,
    })
}

impl Service {
    /// Runs the worker loop with `handler` until SIGTERM/Ctrl-C; the loop marks the service ready
    /// once it consumes and keeps `/healthz` beating.
    pub async fn consume(
        self,
        name: &str,
        config: WorkerConfig,
        handler: Arc<dyn Handler>,
    ) -> anyhow::Result<()> {
        let health = Health::new(self.readiness, self.liveness);
        let report = run_worker_observed(self.bus, config, handler, self.shutdown, health).await?;
        tracing::info!(service = name, ?report, "stopped");
        Ok(())
    }
}
