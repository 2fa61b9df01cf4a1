//! `millrace bench vdaf`: the fleet's throughput beside the bare `prio` + HPKE rate for the same
//! reports on the same machine, measured in one run.
//!
//! The bare rate does only the cryptography both facilitators must do per report (HPKE open,
//! `verify_init` on each side, `verifier_shares_to_message` + `verify_next` on each side,
//! accumulate), on every core, with the batches already decoded in memory. The fleet rate is the
//! whole pipeline — object storage, signatures, the bus, markers, the mill — over the same reports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::crypto::{HpkePrivateKey, VerifyKey};
use millrace_protocol::formats::{input_share_aad, input_share_info, IngestionBatch};
use millrace_protocol::layout::parse_ingestion_key;

use crate::demo::{demo_stores, past_span, run_fleet_until_done};
use crate::ingest::{ingest, IngestPlan};

pub struct BenchOutcome {
    pub reports: usize,
    pub bare_per_sec: f64,
    pub fleet_per_sec: f64,
    pub threads: usize,
    pub all_correct: bool,
}

struct Work {
    agg: Aggregation,
    verify_key: VerifyKey,
    batches: [IngestionBatch; 2],
}

fn bare(work: &[Work], keys: &[HpkePrivateKey; 2], threads: usize) -> usize {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let total = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(w) = work.get(i) else { break };
                let vdaf = &w.agg.vdaf;
                let mut accs = [vdaf.accumulator(), vdaf.accumulator()];
                let infos = [
                    input_share_info(&w.agg.id, 0),
                    input_share_info(&w.agg.id, 1),
                ];
                for (r0, r1) in w.batches[0].reports.iter().zip(&w.batches[1].reports) {
                    let mut prepared = Vec::with_capacity(2);
                    for (f, r) in [(0usize, r0), (1, r1)] {
                        let aad = input_share_aad(&r.report_id, r.time, &r.public_share);
                        let Ok(share) =
                            keys[f].open(&infos[f], &aad, &r.encapped_key, &r.ciphertext)
                        else {
                            break;
                        };
                        let Ok(p) =
                            vdaf.prepare(&w.verify_key, f, &r.report_id, &r.public_share, &share)
                        else {
                            break;
                        };
                        prepared.push(p);
                    }
                    if prepared.len() != 2 {
                        continue;
                    }
                    let shares = [
                        prepared[0].verifier_share.as_slice(),
                        prepared[1].verifier_share.as_slice(),
                    ];
                    for (f, acc) in accs.iter_mut().enumerate() {
                        let _ = vdaf.verify_and_accumulate(f, &prepared[f].state, shares, acc);
                    }
                }
                total.fetch_add(
                    w.batches[0].reports.len(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            });
        }
    });
    total.into_inner()
}

pub async fn bench_vdaf(reports: usize, batch_size: usize) -> anyhow::Result<BenchOutcome> {
    let temp = tempfile::tempdir()?;
    let dir = temp.path();
    let config_path = crate::keygen::keygen(dir, true)?;
    let config = Arc::new(Config::load(&config_path)?);
    let stores = demo_stores(dir)?;
    let (start, end) = past_span(chrono::Utc::now().timestamp());
    let plan = IngestPlan {
        reports,
        invalid_fraction: 0.0,
        batch_size,
        start,
        end,
    };
    let expectations = ingest(
        &config,
        crate::keygen::INGESTOR,
        [&stores.facilitators[0], &stores.facilitators[1]],
        &plan,
        |_| {},
    )
    .await?;

    // Decode every batch up front: the bare rate measures cryptography only.
    let mut work = Vec::new();
    let ingestors = config.ingestor_keys()?;
    for agg in &config.aggregations {
        for obj in stores.facilitators[0]
            .list(&format!("ingestion/{}/", agg.id))
            .await?
        {
            if parse_ingestion_key(&agg.id, &obj.key).is_none() {
                continue;
            }
            let b0 = stores.facilitators[0].get_required(&obj.key).await?;
            let b1 = stores.facilitators[1].get_required(&obj.key).await?;
            work.push(Work {
                agg: agg.clone(),
                verify_key: config.verify_key(agg)?,
                batches: [
                    IngestionBatch::decode(&ingestors, &b0)?.0,
                    IngestionBatch::decode(&ingestors, &b1)?.0,
                ],
            });
        }
    }
    // A fresh keygen has one HPKE key per facilitator: every share is sealed to it.
    let only_key = |f: u8| -> anyhow::Result<HpkePrivateKey> {
        config
            .hpke_private_keys(f)?
            .into_iter()
            .next()
            .map(|slot| slot.key)
            .ok_or_else(|| anyhow::anyhow!("facilitator {f} has no HPKE private key"))
    };
    let keys = [only_key(0)?, only_key(1)?];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let t = Instant::now();
    let done = tokio::task::spawn_blocking(move || bare(&work, &keys, threads)).await?;
    let bare_per_sec = done as f64 / t.elapsed().as_secs_f64();

    let (rows, secs) = run_fleet_until_done(
        config,
        stores,
        &expectations,
        Duration::from_secs(1800),
        false,
    )
    .await?;
    let all_correct = rows.iter().all(|r| r.correct());
    Ok(BenchOutcome {
        reports: expectations.reports,
        bare_per_sec,
        fleet_per_sec: expectations.reports as f64 / secs,
        threads,
        all_correct,
    })
}

/// What one bus benchmark measured.
#[derive(Clone, Debug)]
pub struct BusBench {
    pub messages: usize,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Attribute carrying the publish time (unix nanoseconds) through the bus.
pub const SENT_AT: &str = "bench-sent-at-ns";

pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Turns latencies (ms) and the elapsed time into a [`BusBench`].
pub fn summarize(mut latencies: Vec<f64>, elapsed: Duration) -> BusBench {
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[i.min(latencies.len() - 1)]
    };
    BusBench {
        messages: latencies.len(),
        per_sec: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
    }
}

struct LatencyRecorder {
    latencies: std::sync::Mutex<Vec<f64>>,
    done: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl millrace_runtime::Handler for LatencyRecorder {
    async fn handle(
        &self,
        task: &millrace_runtime::Task,
    ) -> Result<(), millrace_runtime::TaskError> {
        let sent: u128 = task
            .attributes
            .get(SENT_AT)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let ms = (unix_nanos().saturating_sub(sent)) as f64 / 1e6;
        if let Ok(mut l) = self.latencies.lock() {
            l.push(ms);
        }
        self.done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The worker loop's throughput and publish→handled latency on `bus`: `messages` bodies of
/// `body_size` bytes published by `publishers` concurrent tasks, consumed by one worker with
/// `concurrency` slots.
pub async fn bench_bus_worker(
    bus: Arc<dyn millrace_bus::Bus>,
    topic: &str,
    messages: usize,
    body_size: usize,
    concurrency: usize,
    publishers: usize,
) -> anyhow::Result<BusBench> {
    bus.create_topic(topic, Some("bench")).await?;
    for t in [
        millrace_bus::dead_topic(topic),
        millrace_bus::rejected_topic(topic),
    ] {
        bus.create_topic(&t, None).await?;
    }
    let recorder = Arc::new(LatencyRecorder {
        latencies: std::sync::Mutex::new(Vec::with_capacity(messages)),
        done: std::sync::atomic::AtomicUsize::new(0),
    });
    let shutdown = millrace_runtime::Shutdown::new();
    let mut config = millrace_runtime::WorkerConfig::new(topic, "bench");
    config.concurrency = concurrency;
    let worker = tokio::spawn(millrace_runtime::run_worker(
        bus.clone(),
        config,
        recorder.clone(),
        shutdown.clone(),
    ));
    let body: Vec<u8> = std::iter::once(b'{')
        .chain(std::iter::repeat_n(b'x', body_size.saturating_sub(2)))
        .chain(std::iter::once(b'}'))
        .collect();
    let body = millrace_bus::Bytes::from(body);
    // Warm up: one message through the whole path, so joining a consumer group (seconds on
    // Kafka) is not counted as throughput or latency.
    bus.publish(
        topic,
        millrace_bus::Message::new(body.clone()).with_attribute(SENT_AT, unix_nanos().to_string()),
    )
    .await?;
    let warm_deadline = Instant::now() + Duration::from_secs(120);
    while recorder.done.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        anyhow::ensure!(
            Instant::now() < warm_deadline,
            "the warm-up message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    recorder.done.store(0, std::sync::atomic::Ordering::SeqCst);
    if let Ok(mut l) = recorder.latencies.lock() {
        l.clear();
    }
    let start = Instant::now();
    let mut pubs = Vec::new();
    let per = messages.div_ceil(publishers.max(1));
    for p in 0..publishers.max(1) {
        let (bus, body, topic) = (bus.clone(), body.clone(), topic.to_string());
        let count = per.min(messages.saturating_sub(p * per));
        pubs.push(tokio::spawn(async move {
            for _ in 0..count {
                let m = millrace_bus::Message::new(body.clone())
                    .with_attribute(SENT_AT, unix_nanos().to_string());
                bus.publish(&topic, m).await?;
            }
            anyhow::Ok(())
        }));
    }
    for p in pubs {
        p.await??;
    }
    let published_in = start.elapsed();
    tracing::info!(
        per_sec = messages as f64 / published_in.as_secs_f64().max(1e-9),
        "publishing finished"
    );
    eprintln!(
        "  (published {messages} in {:.2}s: {:.0} msg/s)",
        published_in.as_secs_f64(),
        messages as f64 / published_in.as_secs_f64().max(1e-9)
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    while recorder.done.load(std::sync::atomic::Ordering::SeqCst) < messages {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker did not receive every message within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    shutdown.trigger();
    worker.await??;
    let latencies = recorder
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    Ok(summarize(latencies, elapsed))
}
