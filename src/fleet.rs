//! Every service of both facilitators and the mill in one process, on one bus: what
//! `millrace demo` and the end-to-end tests run.

use std::sync::Arc;
use std::time::Duration;

use millrace_aggregate_worker::AggregateWorker;
use millrace_bus::Bus;
use millrace_cleaner::{Cleaner, Role};
use millrace_intake_worker::IntakeWorker;
use millrace_mill::Mill;
use millrace_protocol::config::Config;
use millrace_protocol::tasks::{groups, topics};
use millrace_runtime::{run_worker, Shutdown, WorkerConfig};
use millrace_store::Store;
use millrace_workflow_manager::{Settings, WorkflowManager};
use tokio::task::JoinHandle;

/// Where each party keeps its objects.
#[derive(Clone, Debug)]
pub struct Stores {
    pub facilitators: [Store; 2],
    pub collector: Store,
}

/// How the in-process fleet runs.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    pub topic_prefix: String,
    pub concurrency: usize,
    pub wm_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            topic_prefix: "millrace".to_string(),
            concurrency: 5,
            wm_interval: Duration::from_millis(250),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// The running fleet.
pub struct Fleet {
    pub shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts all eleven services (per facilitator: workflow-manager, intake-worker,
    /// aggregate-worker, cleaner; plus the mill and the collector's cleaner).
    pub fn start(
        config: Arc<Config>,
        bus: Arc<dyn Bus>,
        stores: Stores,
        settings: &FleetSettings,
    ) -> anyhow::Result<Fleet> {
        let shutdown = Shutdown::new();
        let mut tasks = Vec::new();
        let worker_config = |topic: String, group: String| {
            let mut c = WorkerConfig::new(topic, group);
            c.concurrency = settings.concurrency;
            c.backoff_base = settings.backoff_base;
            c.backoff_max = settings.backoff_max;
            c.max_attempts = 40;
            c
        };
        let prefix = &settings.topic_prefix;
        for f in 0..2u8 {
            let own = stores.facilitators[usize::from(f)].clone();
            let peer = stores.facilitators[usize::from(1 - f)].clone();
            let intake = Arc::new(IntakeWorker::new(config.clone(), f, own.clone(), peer)?);
            let aggregate = Arc::new(AggregateWorker::new(
                config.clone(),
                f,
                own.clone(),
                stores.collector.clone(),
                bus.clone(),
                prefix,
            )?);
            for (topic, group, handler) in [
                (
                    topics::intake(prefix, f),
                    groups::intake(f),
                    intake as Arc<dyn millrace_runtime::Handler>,
                ),
                (
                    topics::aggregate(prefix, f),
                    groups::aggregate(f),
                    aggregate as Arc<dyn millrace_runtime::Handler>,
                ),
            ] {
                let (bus, sd, cfg) = (bus.clone(), shutdown.clone(), worker_config(topic, group));
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = run_worker(bus, cfg, handler, sd).await {
                        tracing::error!(error = %e, "worker stopped");
                    }
                }));
            }
            let wm = WorkflowManager::new(
                config.clone(),
                own.clone(),
                bus.clone(),
                Settings {
                    facilitator: f,
                    topic_prefix: prefix.clone(),
                    instance: format!("demo-wm-{f}"),
                    claim_timeout: Duration::from_secs(600),
                    dry_run: false,
                },
            )
            .with_peer_store(stores.facilitators[usize::from(1 - f)].clone());
            let (sd, interval) = (shutdown.clone(), settings.wm_interval);
            tasks.push(tokio::spawn(async move { wm.run(interval, sd).await }));
            let cleaner = Cleaner::new(
                config.clone(),
                own,
                millrace_cleaner::Settings {
                    role: Role::Facilitator,
                    ttl: Duration::from_secs(7 * 24 * 3600),
                    dry_run: false,
                },
            );
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                cleaner.run(Duration::from_secs(3600), sd).await
            }));
        }
        let mill = Arc::new(Mill::new(
            config.clone(),
            stores.collector.clone(),
            bus.clone(),
            prefix,
        )?);
        let (b, sd, cfg) = (
            bus.clone(),
            shutdown.clone(),
            worker_config(topics::collect(prefix), groups::collect()),
        );
        let worker_mill = mill.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = run_worker(b, cfg, worker_mill, sd).await {
                tracing::error!(error = %e, "mill stopped");
            }
        }));
        // The mill's sweep of waiting windows (lost messages, wait deadlines), often here.
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            mill.run_sweeps(Duration::from_secs(1), sd).await
        }));
        let cleaner = Cleaner::new(
            config,
            stores.collector,
            millrace_cleaner::Settings {
                role: Role::Collector,
                ttl: Duration::from_secs(7 * 24 * 3600),
                dry_run: false,
            },
        );
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            cleaner.run(Duration::from_secs(3600), sd).await
        }));
        Ok(Fleet { shutdown, tasks })
    }

    /// Stops every service and waits for them.
    pub async fn stop(self) {
        self.shutdown.trigger();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
