//! `millrace ingest`: simulated clients. Each report gets a known plaintext measurement, is
//! sharded with Prio3, and each input share is HPKE-encrypted to its facilitator; reports are
//! batched, each batch signed by the ingestor and written once per facilitator. A chosen share of
//! reports is deliberately invalid, cycling through the ways a real report goes bad, so the run
//! knows exactly which reports the pipeline must exclude and what each window's result must be.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use millrace_protocol::config::{Aggregation, Config};
use millrace_protocol::crypto::{hpke_generate, random_bytes, HpkePublicKey, Signer25519};
use millrace_protocol::formats::{
    input_share_aad, input_share_info, EncryptedReport, IngestionBatch,
};
use millrace_protocol::layout::{ingestion_key, Window};
use millrace_protocol::vdaf::{AggregateValue, Measurement};
use millrace_store::Store;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What to generate.
#[derive(Clone, Debug)]
pub struct IngestPlan {
    /// Reports in all, split evenly across the aggregations.
    pub reports: usize,
    /// Share of reports made invalid on purpose (0.0–1.0).
    pub invalid_fraction: f64,
    pub batch_size: usize,
    /// Batch times are spread over `[start, end)` (unix seconds).
    pub start: i64,
    pub end: i64,
}

/// What one window's result must be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowExpectation {
    pub aggregation: String,
    pub window: String,
    /// The plaintext result.
    pub expected: AggregateValue,
    pub valid: u64,
    pub invalid: u64,
    /// For an aggregation with differential privacy, how far each coordinate of the released
    /// result may lie from the plaintext ([`millrace_protocol::dp::DpStrategy::noise_bound`]);
    /// absent, the result must equal the plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_bound: Option<u64>,
    /// Fewer valid reports than the aggregation's `min_reports`: the facilitators must refuse
    /// the window (REFUSED, nothing released) rather than release a result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

impl WindowExpectation {
    /// Whether `released` is the result this window must have: the plaintext exactly, or for a
    /// DP aggregation within the noise bound of it.
    pub fn accepts(&self, released: &AggregateValue) -> bool {
        millrace_protocol::dp::accepts(self.noise_bound, released, &self.expected)
    }

    /// Whether what the collector holds for the window is what it must be: a result equal to
    /// the plaintext (or within the noise bound) with exact counts, or, for a window under its
    /// minimum, a refusal.
    pub fn met_by(&self, outcome: &crate::status::WindowOutcome) -> bool {
        use crate::status::WindowOutcome;
        match outcome {
            WindowOutcome::Released(r) => {
                !self.refused
                    && self.accepts(&r.result)
                    && r.report_count == self.valid
                    && r.invalid_count == self.invalid
            }
            WindowOutcome::Refused(_) => self.refused,
            WindowOutcome::Pending | WindowOutcome::Failed(_) => false,
        }
    }
}

/// Every window's expectation, keyed by `(aggregation, window)`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Expectations {
    pub windows: Vec<WindowExpectation>,
    pub reports: usize,
}

/// The ways the simulated clients break a report.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Facilitator 0's ciphertext has a flipped bit: it cannot decrypt.
    Ciphertext,
    /// Facilitator 1's input share is truncated before encryption: it cannot decode.
    Truncated,
    /// Facilitator 1's input share is altered but still decodes: the proof fails.
    Tampered,
    /// Facilitator 0's share is encrypted to a stranger's key.
    WrongKey,
    /// A second report reusing an earlier report's id.
    Duplicate,
    /// An honest report made in the previous window, carried by this window's batch: its
    /// (HPKE-bound) time says where it belongs.
    OutsideWindow,
}

const DAMAGES: [Damage; 6] = [
    Damage::Ciphertext,
    Damage::Truncated,
    Damage::Tampered,
    Damage::WrongKey,
    Damage::Duplicate,
    Damage::OutsideWindow,
];

struct Keys {
    /// Whose HPKE keys shares are sealed to: each batch picks each facilitator's newest key
    /// active at the batch's time.
    config: Config,
    /// Each aggregation's digest, computed once (it reads the verify key).
    digests: std::collections::BTreeMap<String, millrace_protocol::agreement::AggregationDigest>,
    stranger: HpkePublicKey,
    signer: Signer25519,
}

/// One generated batch: both facilitators' copies and what it contributes.
struct GeneratedBatch {
    batch: [IngestionBatch; 2],
    measurements: Vec<Measurement>,
    invalid: u64,
}

fn seal(
    agg: &str,
    f: u8,
    to: &HpkePublicKey,
    id: &[u8; 16],
    time: i64,
    public: &[u8],
    share: &[u8],
) -> anyhow::Result<([u8; 32], Vec<u8>)> {
    to.seal(
        &input_share_info(agg, f),
        &input_share_aad(id, time, public),
        share,
    )
    .with_context(|| format!("encrypting a share for facilitator {f}"))
}

fn generate_batch(
    agg: &Aggregation,
    keys: &Keys,
    time: i64,
    count: usize,
    invalid_every: Option<usize>,
    seed: u64,
    damage_offset: usize,
) -> anyhow::Result<GeneratedBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let hpke = [
        keys.config.hpke_public_key_at(0, time)?,
        keys.config.hpke_public_key_at(1, time)?,
    ];
    let batch_id = hex::encode(random_bytes::<8>());
    let mut copies: [Vec<EncryptedReport>; 2] =
        [Vec::with_capacity(count), Vec::with_capacity(count)];
    let mut measurements = Vec::with_capacity(count);
    let mut invalid = 0;
    let mut damage_index = damage_offset;
    for i in 0..count {
        let damage = match invalid_every {
            Some(every) if i % every == every - 1 => {
                damage_index += 1;
                Some(DAMAGES[damage_index % DAMAGES.len()])
            }
            _ => None,
        };
        if let (Some(Damage::Duplicate), Some(last)) = (damage, copies[0].last().cloned()) {
            let last1 = copies[1].last().cloned();
            copies[0].push(last);
            if let Some(l) = last1 {
                copies[1].push(l);
            }
            invalid += 1;
            continue;
        }
        let m = agg.vdaf.random_measurement(&mut rng);
        let id: [u8; 16] = random_bytes();
        let report_time = if matches!(damage, Some(Damage::OutsideWindow)) {
            agg.report_time(Window::containing(time, agg.window_secs).start - 1)
        } else {
            agg.report_time(time)
        };
        let (public, mut shares) = agg.vdaf.shard(&m, &id).context("sharding a measurement")?;
        damage_input_share(damage, &mut shares);
        for f in 0..2u8 {
            let (encapped_key, ciphertext) = seal_damaged(
                damage,
                &keys.stranger,
                (&agg.id, f, &hpke[usize::from(f)].1),
                (&id, report_time, &public),
                &shares[usize::from(f)],
            )?;
            copies[usize::from(f)].push(EncryptedReport {
                report_id: id,
                time: report_time,
                hpke_key_id: hpke[usize::from(f)].0,
                public_share: public.clone(),
                encapped_key,
                ciphertext,
            });
        }
        if damage.is_some() {
            invalid += 1;
        } else {
            measurements.push(m);
        }
    }
    let [c0, c1] = copies;
    let aggregation_digest = keys
        .digests
        .get(&agg.id)
        .with_context(|| format!("no aggregation digest for {}", agg.id))?
        .0;
    let make = |f: u8, reports: Vec<EncryptedReport>| IngestionBatch {
        aggregation: agg.id.clone(),
        aggregation_digest,
        batch_id: batch_id.clone(),
        facilitator: f,
        time,
        reports,
    };
    Ok(GeneratedBatch {
        batch: [make(0, c0), make(1, c1)],
        measurements,
        invalid,
    })
}

/// The aggregations that take reports from `ingestor`; at least one.
fn served_aggregations(config: &Config, ingestor: &str) -> anyhow::Result<Vec<Aggregation>> {
    let aggs: Vec<Aggregation> = config
        .aggregations
        .iter()
        .filter(|a| a.ingestors.iter().any(|i| i == ingestor))
        .cloned()
        .collect();
    anyhow::ensure!(
        !aggs.is_empty(),
        "ingestor {ingestor:?} takes reports for no aggregation of this config"
    );
    Ok(aggs)
}

/// Every how many reports one is broken on purpose, for a share of `fraction`.
fn invalid_every(fraction: f64) -> Option<usize> {
    (fraction > 0.0).then(|| ((1.0 / fraction).round() as usize).max(1))
}

/// Seals facilitator `f`'s share to its key, broken as `damage` says for facilitator 0: sealed
/// to `stranger`'s key instead, or with a flipped ciphertext bit.
fn seal_damaged(
    damage: Option<Damage>,
    stranger: &HpkePublicKey,
    (agg, f, key): (&str, u8, &HpkePublicKey),
    (id, time, public): (&[u8; 16], i64, &[u8]),
    share: &[u8],
) -> anyhow::Result<([u8; 32], Vec<u8>)> {
    let to = if f == 0 && matches!(damage, Some(Damage::WrongKey)) {
        stranger
    } else {
        key
    };
    let (encapped_key, mut ciphertext) = seal(agg, f, to, id, time, public, share)?;
    if f == 0 && matches!(damage, Some(Damage::Ciphertext)) {
        if let Some(b) = ciphertext.first_mut() {
            *b ^= 0x80;
        }
    }
    Ok((encapped_key, ciphertext))
}

/// Breaks facilitator 1's input share as `damage` says (before it is sealed).
fn damage_input_share(damage: Option<Damage>, shares: &mut [Vec<u8>; 2]) {
    match damage {
        Some(Damage::Truncated) => {
            let keep = shares[1].len() / 2;
            shares[1].truncate(keep);
        }
        Some(Damage::Tampered) => {
            if let Some(b) = shares[1].first_mut() {
                *b ^= 0x01;
            }
        }
        _ => {}
    }
}

/// Generates and writes every batch; returns what each window's result must be.
pub async fn ingest(
    config: &Config,
    ingestor: &str,
    stores: [&Store; 2],
    plan: &IngestPlan,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Expectations> {
    let keys = Arc::new(Keys {
        config: config.clone(),
        digests: config
            .aggregations
            .iter()
            .filter(|a| a.ingestors.iter().any(|i| i == ingestor))
            .map(|a| Ok((a.id.clone(), config.aggregation_digest(a)?)))
            .collect::<anyhow::Result<_>>()?,
        stranger: hpke_generate().1,
        signer: config.ingestor_signer(ingestor)?,
    });
    let aggs = served_aggregations(config, ingestor)?;
    let invalid_every = invalid_every(plan.invalid_fraction);
    let per_agg = plan.reports / aggs.len();
    let batch_size = plan.batch_size.max(1);
    let span = (plan.end - plan.start).max(1);
    let mut expect: BTreeMap<(String, String), (Vec<Measurement>, u64, Aggregation)> =
        BTreeMap::new();
    let mut seed: u64 = rand::rng().random();
    let mut done = 0;
    for agg in &aggs {
        let batches = per_agg.div_ceil(batch_size);
        // Generate on every core, one batch per blocking task, at most a few in flight.
        let mut pending = futures::stream::FuturesOrdered::new();
        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            * 2;
        let mut next = 0;
        loop {
            while next < batches && pending.len() < parallel {
                let count = batch_size.min(per_agg - next * batch_size);
                let time = plan.start + (span * next as i64) / batches.max(1) as i64;
                let (agg2, keys2) = (agg.clone(), keys.clone());
                seed = seed.wrapping_add(1);
                let s = seed;
                let offset = next;
                pending.push_back(tokio::task::spawn_blocking(move || {
                    let g = generate_batch(&agg2, &keys2, time, count, invalid_every, s, offset)?;
                    let encoded = [
                        g.batch[0].encode(&keys2.signer)?,
                        g.batch[1].encode(&keys2.signer)?,
                    ];
                    anyhow::Ok((g, encoded, time))
                }));
                next += 1;
            }
            use futures::StreamExt;
            let Some(joined) = pending.next().await else {
                break;
            };
            let (g, encoded, time) = joined.context("generating a batch")??;
            let p = agg.partition_of(time);
            let key = ingestion_key(&agg.id, p, &g.batch[0].batch_id);
            let [e0, e1] = encoded;
            stores[0].create(&key, e0).await?;
            stores[1].create(&key, e1).await?;
            let window = Window::containing(time, agg.window_secs).name();
            let n = g.batch[0].reports.len();
            let entry = expect
                .entry((agg.id.clone(), window))
                .or_insert_with(|| (Vec::new(), 0, agg.clone()));
            entry.0.extend(g.measurements);
            entry.1 += g.invalid;
            done += n;
            progress(done);
        }
    }
    let mut e = expectations_of(expect)?;
    e.reports = done;
    Ok(e)
}

/// What simulated clients send through an ingestor's upload API.
#[derive(Clone, Debug)]
pub struct UploadPlan {
    /// Reports in all, split evenly across the aggregations.
    pub reports: usize,
    /// Share of reports made invalid on purpose (0.0–1.0).
    pub invalid_fraction: f64,
    /// Reports per upload body (1: one report per request).
    pub bulk_size: usize,
    /// Upload requests in flight at once.
    pub concurrency: usize,
}

/// The ways a simulated client's report goes bad on the way through an ingestor. A report
/// outside its window cannot be made there (the ingestor files each report by its own time),
/// and a repeated report id is acknowledged and stored once by the ingestor: the facilitators
/// never see it.
const UPLOAD_DAMAGES: [Damage; 5] = [
    Damage::Ciphertext,
    Damage::Truncated,
    Damage::Tampered,
    Damage::WrongKey,
    Damage::Duplicate,
];

/// One report as made by a simulated client: what it was made of and whether it counts.
struct Made {
    window: String,
    /// The measurement of a report that must count; `None` for a broken one.
    measurement: Option<Measurement>,
}

/// A chunk of reports, sealed to the keys the ingestor announced, and what each one is.
struct MadeChunk {
    reports: Vec<millrace_protocol::upload::UploadReport>,
    made: Vec<Made>,
}

fn make_chunk(
    agg: &Aggregation,
    keys: &[(u8, HpkePublicKey); 2],
    stranger: &HpkePublicKey,
    count: usize,
    invalid_every: Option<usize>,
    seed: u64,
    damage_offset: usize,
) -> anyhow::Result<MadeChunk> {
    use millrace_protocol::upload::{SealedShare, UploadReport};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut reports: Vec<UploadReport> = Vec::with_capacity(count);
    let mut made = Vec::with_capacity(count);
    let mut damage_index = damage_offset;
    for i in 0..count {
        let damage = match invalid_every {
            Some(every) if i % every == every - 1 => {
                damage_index += 1;
                Some(UPLOAD_DAMAGES[damage_index % UPLOAD_DAMAGES.len()])
            }
            _ => None,
        };
        if let (Some(Damage::Duplicate), Some(last)) = (damage, reports.last().cloned()) {
            // The same report again, as a client whose answer was lost sends it: the ingestor
            // acknowledges it and stores it once, so it is neither valid nor invalid here.
            reports.push(last);
            continue;
        }
        let time = agg.report_time(chrono::Utc::now().timestamp());
        let m = agg.vdaf.random_measurement(&mut rng);
        let id: [u8; 16] = random_bytes();
        let (public, mut shares) = agg.vdaf.shard(&m, &id).context("sharding a measurement")?;
        damage_input_share(damage, &mut shares);
        let mut sealed = Vec::with_capacity(2);
        for f in 0..2u8 {
            let (key_id, key) = &keys[usize::from(f)];
            let (encapped_key, ciphertext) = seal_damaged(
                damage,
                stranger,
                (&agg.id, f, key),
                (&id, time, &public),
                &shares[usize::from(f)],
            )?;
            sealed.push(SealedShare {
                hpke_key_id: *key_id,
                encapped_key,
                ciphertext,
            });
        }
        let [s0, s1]: [SealedShare; 2] = sealed
            .try_into()
            .map_err(|_| anyhow::anyhow!("two sealed shares"))?;
        reports.push(UploadReport {
            report_id: id,
            time,
            public_share: public,
            shares: [s0, s1],
        });
        made.push(Made {
            window: Window::containing(time, agg.window_secs).name(),
            measurement: damage.is_none().then_some(m),
        });
    }
    Ok(MadeChunk { reports, made })
}

/// Simulated clients of an ingestor: makes reports now, seals them to the HPKE keys the ingestor
/// announces (`GET /aggregations/{id}/hpke-config`), and uploads them with `millrace-client`
/// (retrying until each body is acknowledged). `config` says which aggregations `ingestor`
/// serves and what their windows are. Returns what each window's result must be, and how many
/// repeated reports the ingestor acknowledged without storing them again.
pub async fn upload(
    config: &Config,
    ingestor: &str,
    client: Arc<millrace_client::Client>,
    plan: &UploadPlan,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<(Expectations, usize)> {
    let aggs = served_aggregations(config, ingestor)?;
    let invalid_every = invalid_every(plan.invalid_fraction);
    let per_agg = plan.reports / aggs.len();
    let bulk = plan.bulk_size.max(1);
    let stranger = Arc::new(hpke_generate().1);
    // Each aggregation's keys as the ingestor announces them.
    let mut keys = Vec::with_capacity(aggs.len());
    for agg in &aggs {
        let announced = client
            .aggregation(&agg.id)
            .await
            .with_context(|| format!("fetching the HPKE config of aggregation {}", agg.id))?;
        keys.push(Arc::new([
            announced.document.sealing_key(0)?,
            announced.document.sealing_key(1)?,
        ]));
    }
    // Every aggregation's bodies interleaved, `concurrency` in flight at once, as many clients
    // of different aggregations upload side by side (and group commit fills batches).
    let chunks = per_agg.div_ceil(bulk);
    let mut seed: u64 = rand::rng().random();
    let mut jobs = Vec::with_capacity(chunks * aggs.len());
    for next in 0..chunks {
        for (a, agg) in aggs.iter().enumerate() {
            seed = seed.wrapping_add(1);
            let count = bulk.min(per_agg - next * bulk);
            jobs.push((agg.clone(), keys[a].clone(), count, seed, next));
        }
    }
    let uploads = futures::stream::iter(jobs.into_iter().map(|(agg, keys, count, seed, next)| {
        let (stranger, client) = (stranger.clone(), client.clone());
        async move {
            let id = agg.id.clone();
            let chunk = tokio::task::spawn_blocking(move || {
                make_chunk(&agg, &keys, &stranger, count, invalid_every, seed, next)
                    .map(|chunk| (chunk, agg))
            })
            .await
            .context("making reports")??;
            let receipt = if chunk.0.reports.len() == 1 {
                client.upload(&id, &chunk.0.reports[0]).await
            } else {
                client.upload_many(&id, &chunk.0.reports).await
            }
            .with_context(|| format!("uploading reports of aggregation {id}"))?;
            anyhow::Ok((chunk, receipt))
        }
    }));
    use futures::StreamExt;
    let mut uploads = uploads.buffer_unordered(plan.concurrency.max(1));
    let mut expect: BTreeMap<(String, String), (Vec<Measurement>, u64, Aggregation)> =
        BTreeMap::new();
    let (mut done, mut acknowledged_repeats) = (0, 0);
    while let Some(finished) = uploads.next().await {
        let ((chunk, agg), receipt) = finished?;
        acknowledged_repeats += receipt.duplicates;
        done += chunk.reports.len();
        for made in chunk.made {
            let entry = expect
                .entry((agg.id.clone(), made.window))
                .or_insert_with(|| (Vec::new(), 0, agg.clone()));
            match made.measurement {
                Some(m) => entry.0.push(m),
                None => entry.1 += 1,
            }
        }
        progress(done);
    }
    let mut e = expectations_of(expect)?;
    e.reports = done;
    Ok((e, acknowledged_repeats))
}

/// Each window's expectation from its valid measurements and invalid count.
fn expectations_of(
    expect: BTreeMap<(String, String), (Vec<Measurement>, u64, Aggregation)>,
) -> anyhow::Result<Expectations> {
    let mut windows = Vec::new();
    let mut reports = 0;
    for ((aggregation, window), (measurements, invalid, agg)) in expect {
        reports += measurements.len() + invalid as usize;
        windows.push(WindowExpectation {
            expected: agg.vdaf.plaintext_aggregate(&measurements)?,
            valid: measurements.len() as u64,
            invalid,
            noise_bound: agg.dp.as_ref().map(|dp| dp.noise_bound()),
            refused: (measurements.len() as u64) < agg.min_reports,
            aggregation,
            window,
        });
    }
    Ok(Expectations { windows, reports })
}
