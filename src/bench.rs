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
                        let aad = input_share_aad(&r.report_id, &r.public_share);
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
    let keys = [config.hpke_private_key(0)?, config.hpke_private_key(1)?];
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
