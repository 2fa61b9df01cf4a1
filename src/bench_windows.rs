//! Benchmarks of the window machinery (not tests; `make bench` runs them):
//!
//! * `millrace bench scan`: one workflow-manager pass over N settled historical batches within
//!   the scan horizon plus 100 new ones, on a local-file store. Settled partitions are not listed,
//!   so the pass time should not grow with N.
//! * `millrace bench aggregate --reports N`: the aggregate-worker's peak resident memory for one
//!   window of N Sum reports in batches of 1,000. The window is prepared (ingested, validated by
//!   both facilitators, its manifest written) in this process; the aggregation runs in a child
//!   process (`bench aggregate-child`) so that its peak RSS is the aggregate-worker's alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use millrace_aggregate_worker::AggregateWorker;
use millrace_bus::memory::MemoryBus;
use millrace_intake_worker::IntakeWorker;
use millrace_protocol::config::{Config, ConfigFile};
use millrace_protocol::formats::{WindowBatch, WindowManifest};
use millrace_protocol::layout::{
    ingestion_key, intake_marker_key, manifest_key, parse_ingestion_key, settled_marker_key,
    Partition, Window,
};
use millrace_protocol::tasks::{
    AggregateTask, IntakeTask, AGGREGATE_TASK_VERSION, INTAKE_TASK_VERSION,
};
use millrace_store::Store;
use millrace_workflow_manager::{Settings, WorkflowManager};

use crate::demo::demo_stores;
use crate::ingest::{ingest, IngestPlan};

/// One row of `bench scan`.
pub struct ScanRow {
    pub settled_batches: usize,
    pub new_batches: usize,
    /// A pass that finds the new batches and publishes their intake tasks (the median of five).
    pub first_pass: Duration,
    /// A pass with nothing new (the median of five).
    pub idle_pass: Duration,
    pub partitions_listed: usize,
}

/// One pass per history size in `sizes`, each on a fresh local-file store.
/// With `settled` false, the history's partitions are left unsettled: every pass lists them all,
/// as a workflow-manager without settled markers would (the comparison the numbers need).
pub async fn bench_scan(
    sizes: &[usize],
    new_batches: usize,
    settled: bool,
) -> anyhow::Result<Vec<ScanRow>> {
    let mut rows = Vec::new();
    for &n in sizes {
        let dir = tempfile::tempdir().context("a temporary directory")?;
        let config = Arc::new(Config::load(&crate::keygen::keygen(dir.path(), true)?)?);
        let agg = config
            .aggregations
            .first()
            .context("keygen wrote no aggregation")?
            .id
            .clone();
        let store = Store::open(&format!("file://{}/store", dir.path().display()))?;
        let now = chrono::Utc::now().timestamp();
        let current = Partition::of(now);
        // The last 24 whole hours hold the history, each hour settled.
        let hours: Vec<Partition> = (1..=24)
            .map(|h| Partition::of(current.start - h * 3600))
            .collect();
        let mut keys: Vec<String> = (0..n)
            .map(|i| ingestion_key(&agg, hours[i % hours.len()], &format!("old-{i:07}")))
            .collect();
        if settled {
            keys.extend(hours.iter().map(|p| settled_marker_key(&agg, *p)));
        } else {
            // Unsettled history still has its intake published: only the listing differs.
            keys.extend((0..n).map(|i| {
                millrace_store::markers::published_key(&intake_marker_key(
                    &agg,
                    hours[i % hours.len()],
                    &format!("old-{i:07}"),
                ))
            }));
        }
        let writes = futures::stream::iter(keys.into_iter().map(|k| {
            let store = store.clone();
            async move { store.create(&k, vec![0u8; 16]).await }
        }))
        .buffer_unordered(64);
        let results: Vec<_> = writes.collect().await;
        for r in results {
            r?;
        }
        let wm = WorkflowManager::new(
            config.clone(),
            store.clone(),
            Arc::new(MemoryBus::new()),
            Settings {
                facilitator: 1,
                topic_prefix: "bench".to_string(),
                instance: "bench".to_string(),
                claim_timeout: Duration::from_secs(600),
                dry_run: false,
            },
        );
        // Five rounds: each writes `new_batches` new batches into the current hour, lets the
        // writes reach the disk (`sync`, best effort, so that write-back does not land in the timed
        // pass), and times one pass; the median is reported.
        let mut firsts = Vec::new();
        let mut partitions_listed = 0;
        for round in 0..5 {
            for i in 0..new_batches {
                store
                    .create(
                        &ingestion_key(&agg, current, &format!("new-{round}-{i:05}")),
                        vec![0u8; 16],
                    )
                    .await?;
            }
            let _ = std::process::Command::new("sync").status();
            let started = Instant::now();
            let pass = wm.run_once(now).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            firsts.push(started.elapsed());
            anyhow::ensure!(
                pass.intake_published == new_batches,
                "the pass published {} intake tasks, expected {new_batches}",
                pass.intake_published
            );
            partitions_listed = pass.partitions_listed;
        }
        firsts.sort();
        // The median of five passes with nothing new.
        let mut idle = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            wm.run_once(now).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            idle.push(started.elapsed());
        }
        idle.sort();
        rows.push(ScanRow {
            settled_batches: n,
            new_batches,
            first_pass: firsts[firsts.len() / 2],
            idle_pass: idle[idle.len() / 2],
            partitions_listed,
        });
    }
    Ok(rows)
}

/// Prepares one window of `reports` Sum reports under `dir` and returns the aggregate task.
pub async fn prepare_aggregate(dir: &Path, reports: usize) -> anyhow::Result<AggregateTask> {
    let config_path = crate::keygen::keygen(dir, true)?;
    // Only the Sum aggregation, so that every report goes to it.
    let text = std::fs::read_to_string(&config_path)?;
    let mut file: ConfigFile = toml::from_str(&text)?;
    file.aggregation
        .retain(|a| matches!(a.vdaf, millrace_protocol::vdaf::VdafSpec::Sum { .. }));
    std::fs::write(&config_path, toml::to_string(&file)?)?;
    let config = Arc::new(Config::load(&config_path)?);
    let agg = config
        .aggregations
        .first()
        .context("no Sum aggregation")?
        .clone();
    let stores = demo_stores(dir)?;
    let now = chrono::Utc::now().timestamp();
    let window = Window::containing(now - 2 * 3600, agg.window_secs);
    ingest(
        &config,
        crate::keygen::INGESTOR,
        [&stores.facilitators[0], &stores.facilitators[1]],
        &IngestPlan {
            reports,
            invalid_fraction: 0.0,
            batch_size: 1000,
            start: window.start,
            end: window.end,
        },
        |_| {},
    )
    .await?;
    let mut batches = Vec::new();
    for o in stores.facilitators[0]
        .list(&format!("ingestion/{}/", agg.id))
        .await?
    {
        if let Some((partition, batch)) = parse_ingestion_key(&agg.id, &o.key) {
            batches.push(WindowBatch { batch, partition });
        }
    }
    batches.sort();
    let digest = config.aggregation_digest(&agg)?;
    for f in 0..2u8 {
        let worker = Arc::new(IntakeWorker::new(
            config.clone(),
            f,
            stores.facilitators[usize::from(f)].clone(),
            stores.facilitators[usize::from(1 - f)].clone(),
        )?);
        let tasks = batches.iter().map(|b| {
            let worker = worker.clone();
            let task = IntakeTask {
                version: INTAKE_TASK_VERSION,
                aggregation: agg.id.clone(),
                aggregation_digest: digest.to_string(),
                batch: b.batch.clone(),
                partition: b.partition.path(),
            };
            async move { worker.validate(&task).await }
        });
        let results: Vec<_> = futures::stream::iter(tasks)
            .buffer_unordered(4)
            .collect()
            .await;
        for r in results {
            r.map_err(|e| anyhow::anyhow!("intake: {e}"))?;
        }
    }
    let manifest = WindowManifest {
        aggregation: agg.id.clone(),
        aggregation_digest: digest.0,
        window_start: window.start,
        window_end: window.end,
        generation: 0,
        decided_at: now,
        batches,
        excluded: Vec::new(),
        note: "bench".to_string(),
    };
    let bytes = manifest.encode(&config.facilitator_signer(0)?)?;
    for s in &stores.facilitators {
        s.create(&manifest_key(&agg.id, window, 0), bytes.clone())
            .await?;
    }
    Ok(AggregateTask {
        version: AGGREGATE_TASK_VERSION,
        aggregation: agg.id,
        aggregation_digest: digest.to_string(),
        window: window.name(),
        generation: 0,
    })
}

/// What the child process reports.
pub struct AggregateRun {
    pub reports: u64,
    pub elapsed: Duration,
    pub peak_rss_bytes: Option<u64>,
}

/// The child's part: facilitator 0's aggregate-worker on the prepared window.
pub async fn run_aggregate(dir: &Path, task: &AggregateTask) -> anyhow::Result<AggregateRun> {
    let config = Arc::new(Config::load(&dir.join("millrace.toml"))?);
    let stores = demo_stores(dir)?;
    let worker = AggregateWorker::new(
        config,
        0,
        stores.facilitators[0].clone(),
        stores.collector.clone(),
        Arc::new(MemoryBus::new()),
        "bench",
    )?;
    let started = Instant::now();
    let part = worker
        .aggregate(task)
        .await
        .map_err(|e| anyhow::anyhow!("aggregate: {e}"))?;
    Ok(AggregateRun {
        reports: part.report_count(),
        elapsed: started.elapsed(),
        peak_rss_bytes: peak_rss(),
    })
}

/// This process's peak resident set size (Linux: `VmHWM` in /proc/self/status).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
