//! Privacy enforced by the parties that hold the data: each facilitator withholds its share of a
//! window below the minimum report count, and a report counts in one window, once, whatever an
//! ingestor does with it. Each service step is driven directly on the in-memory bus and stores.

#[path = "support/harness.rs"]
mod harness;

use harness::{harness, now, Harness, PREFIX};
use millrace::ingest::{ingest, IngestPlan};
use millrace_protocol::crypto::random_bytes;
use millrace_protocol::formats::{
    input_share_aad, input_share_info, EncryptedReport, IngestionBatch, InvalidReason, SumPart,
    ValidationBatch, Verdict,
};
use millrace_protocol::layout::{
    computation_key, ingestion_key, result_key, share_refusal_key, sum_part_key, validation_key,
    Partition, Window,
};
use millrace_protocol::results::{AggregationResult, Computation, ComputationState};
use millrace_protocol::tasks::{AggregateTask, IntakeTask};
use millrace_protocol::vdaf::{AggregateValue, Measurement, ReportId};

async fn computation(store: &millrace_store::Store, agg: &str, w: Window) -> Computation {
    let bytes = store
        .get_required(&computation_key(agg, w))
        .await
        .unwrap_or_else(|e| panic!("no computation record for {agg}/{}: {e}", w.name()));
    Computation::from_json(&bytes).unwrap()
}

async fn result(h: &Harness, agg: &str, w: Window) -> Option<AggregationResult> {
    h.collector
        .get(&result_key(agg, w))
        .await
        .unwrap()
        .map(|b| AggregationResult::from_json(&b).unwrap())
}

/// The window `hours_ago` hours before the current hour (one-hour windows).
fn window_hours_ago(hours_ago: i64) -> Window {
    let hour = now().div_euclid(3600) * 3600;
    Window::containing(hour - hours_ago * 3600, 3600)
}

/// Ingests `per_aggregation` valid reports of every aggregation into `w`.
async fn ingest_into(h: &Harness, w: Window, per_aggregation: usize) {
    let n = h.config.aggregations.len();
    ingest(
        &h.config,
        millrace::keygen::INGESTOR,
        [&h.stores[0], &h.stores[1]],
        &IngestPlan {
            reports: per_aggregation * n,
            invalid_fraction: 0.0,
            batch_size: 4,
            start: w.start,
            end: w.end,
        },
        |_| {},
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_window_below_the_minimum_gets_no_share_and_is_refused_by_both_facilitators() {
    let h = harness(0, 0.0, 10).await;
    let below = window_hours_ago(4);
    let at = window_hours_ago(3);
    let min = h.config.aggregations[0].min_reports;
    assert!(h.config.aggregations.iter().all(|a| a.min_reports == min));
    ingest_into(&h, below, (min - 1) as usize).await;
    ingest_into(&h, at, min as usize).await;
    let t = now();
    h.validate_all(t).await;
    assert!(!h.complete(t).await.is_empty(), "no window was ready");

    for agg in &h.config.aggregations {
        let id = agg.id.as_str();
        // Below the minimum: neither facilitator's share reaches the collector; each wrote its
        // refusal instead, and recorded REFUSED in its own store.
        for f in 0..2u8 {
            assert!(
                !h.collector
                    .exists(&sum_part_key(id, below, 0, f))
                    .await
                    .unwrap(),
                "{id}: facilitator {f} released a share of an under-threshold window"
            );
            assert!(h
                .collector
                .exists(&share_refusal_key(id, below, 0, f))
                .await
                .unwrap());
            let own = computation(&h.stores[usize::from(f)], id, below).await;
            assert_eq!(own.state, ComputationState::Refused, "{own:?}");
        }
        let c = computation(&h.collector, id, below).await;
        assert_eq!(c.state, ComputationState::Refused, "{c:?}");
        let detail = c.detail.unwrap_or_default();
        for needle in [
            "alpha (facilitator 0) withholds",
            "beta (facilitator 1) withholds",
            &format!("{} valid reports", min - 1),
            &format!("at least {min}"),
        ] {
            assert!(detail.contains(needle), "{id}: {detail:?} lacks {needle:?}");
        }
        assert!(result(&h, id, below).await.is_none());
        // At the minimum: released and joined.
        let r = result(&h, id, at)
            .await
            .unwrap_or_else(|| panic!("{id}: no result at the minimum"));
        assert_eq!(r.report_count, min);
    }

    // `millrace status` shows the refusal, with both facilitators' reasons, and each
    // facilitator's own record.
    let rows = millrace::status::collect(&h.config, &h.collector)
        .await
        .unwrap();
    let refused: Vec<_> = rows.iter().filter(|r| r.window == below.name()).collect();
    assert_eq!(refused.len(), h.config.aggregations.len(), "{rows:?}");
    assert!(refused.iter().all(|r| r.state == "Refused"
        && r.detail
            .as_deref()
            .is_some_and(|d| d.contains("alpha") && d.contains("beta"))));
    let own = millrace::status::facilitator_rows(
        &h.config,
        &[(0, h.stores[0].clone()), (1, h.stores[1].clone())],
    )
    .await
    .unwrap();
    for f in 0..2u8 {
        assert!(
            own.iter()
                .any(|r| r.facilitator == f && r.what == "REFUSED" && r.window == below.name()),
            "{own:?}"
        );
    }
}

/// One report as a client would make it: its two sealed shares, for facilitator 0 and 1.
fn report(h: &Harness, agg: &str, value: u64, time: i64) -> [EncryptedReport; 2] {
    let a = h.config.aggregation(agg).unwrap();
    let id: ReportId = random_bytes();
    let (public, shares) = a.vdaf.shard(&Measurement::Sum(value), &id).unwrap();
    [0u8, 1].map(|f| {
        let (key_id, key) = h.config.hpke_public_key_at(f, time).unwrap();
        let (encapped_key, ciphertext) = key
            .seal(
                &input_share_info(agg, f),
                &input_share_aad(&id, time, &public),
                &shares[usize::from(f)],
            )
            .unwrap();
        EncryptedReport {
            report_id: id,
            time,
            hpke_key_id: key_id,
            public_share: public.clone(),
            encapped_key,
            ciphertext,
        }
    })
}

/// Signs and writes one batch (both facilitators' copies) under `partition`; returns its id.
async fn write_batch(
    h: &Harness,
    agg: &str,
    partition: Partition,
    time: i64,
    reports: &[[EncryptedReport; 2]],
) -> String {
    let signer = h
        .config
        .ingestor_signer(millrace::keygen::INGESTOR)
        .unwrap();
    let batch_id = hex::encode(random_bytes::<8>());
    for f in 0..2u8 {
        let batch = IngestionBatch {
            aggregation: agg.to_string(),
            aggregation_digest: millrace_protocol::agreement::AggregationDigest::parse(
                &h.digest(agg),
            )
            .unwrap()
            .0,
            batch_id: batch_id.clone(),
            facilitator: f,
            time,
            reports: reports.iter().map(|r| r[usize::from(f)].clone()).collect(),
        };
        h.stores[usize::from(f)]
            .create(
                &ingestion_key(agg, partition, &batch_id),
                batch.encode(&signer).unwrap(),
            )
            .await
            .unwrap();
    }
    batch_id
}

async fn validation(h: &Harness, f: u8, agg: &str, p: Partition, batch: &str) -> ValidationBatch {
    let bytes = h.stores[usize::from(f)]
        .get_required(&validation_key(agg, p, batch, f))
        .await
        .unwrap();
    ValidationBatch::decode(&h.config.facilitator_keys().unwrap(), &bytes)
        .unwrap()
        .0
}

fn verdict_of(v: &ValidationBatch, id: &ReportId) -> Verdict {
    v.entries
        .iter()
        .find(|(x, _)| x == id)
        .map(|(_, verdict)| verdict.clone())
        .unwrap()
}

#[tokio::test]
async fn a_report_replayed_into_another_batch_or_window_counts_once() {
    let h = harness(0, 0.0, 10).await;
    let agg = h
        .config
        .aggregations
        .iter()
        .find(|a| matches!(a.vdaf.spec(), millrace_protocol::vdaf::VdafSpec::Sum { .. }))
        .unwrap()
        .id
        .clone();
    let w = window_hours_ago(4);
    let next = window_hours_ago(3);
    let after = window_hours_ago(2);
    let (pw, pnext, pafter) = (
        Partition::of(w.start),
        Partition::of(next.start),
        Partition::of(after.start),
    );

    // Batch A: twelve honest reports of window w.
    let originals: Vec<_> = (0..12u64)
        .map(|i| report(&h, &agg, i + 1, w.start))
        .collect();
    let a = write_batch(&h, &agg, pw, w.start + 600, &originals).await;
    // Batch B, same window: a replay of report 0 and eleven fresh ones.
    let fresh_w: Vec<_> = (0..11u64)
        .map(|i| report(&h, &agg, 100 + i, w.start))
        .collect();
    let mut b_reports = vec![originals[0].clone()];
    b_reports.extend(fresh_w.iter().cloned());
    write_batch(&h, &agg, pw, w.start + 1200, &b_reports).await;
    // Batch C, the next window: a replay of report 1 as is, a replay of report 2 re-stamped
    // with the next window's time (its shares no longer decrypt), and eleven fresh ones.
    let fresh_next: Vec<_> = (0..11u64)
        .map(|i| report(&h, &agg, 200 + i, next.start))
        .collect();
    let mut restamped = originals[2].clone();
    for share in &mut restamped {
        share.time = next.start;
    }
    let mut c_reports = vec![originals[1].clone(), restamped];
    c_reports.extend(fresh_next.iter().cloned());
    let c = write_batch(&h, &agg, pnext, next.start + 600, &c_reports).await;
    // Batch A's signed bytes copied into a later hour's partition, as an outside tester did.
    for f in 0..2 {
        let bytes = h.stores[f]
            .get_required(&ingestion_key(&agg, pw, &a))
            .await
            .unwrap();
        h.stores[f]
            .create(&ingestion_key(&agg, pafter, &a), bytes)
            .await
            .unwrap();
    }

    let t = now();
    h.validate_all(t).await;
    assert!(!h.complete(t).await.is_empty(), "no window was ready");

    // Both intake-workers marked the replay into the next window, and the re-stamped one, the
    // same way.
    for f in 0..2u8 {
        let v = validation(&h, f, &agg, pnext, &c).await;
        assert_eq!(
            verdict_of(&v, &originals[1][0].report_id),
            Verdict::Invalid(InvalidReason::OutsideWindow),
            "facilitator {f}"
        );
        assert_eq!(
            verdict_of(&v, &originals[2][0].report_id),
            Verdict::Invalid(InvalidReason::Undecryptable),
            "facilitator {f}"
        );
        // The copied batch is refused whole: its signed time is not its partition's.
        let copied = validation(&h, f, &agg, pafter, &a).await;
        assert!(copied.entries.is_empty(), "facilitator {f}: {copied:?}");
    }

    let sum = |xs: &[u64]| AggregateValue::Scalar(xs.iter().sum());
    let rw = result(&h, &agg, w).await.expect("window w has a result");
    let mut expected: Vec<u64> = (1..=12).collect();
    expected.extend(100..111);
    assert_eq!(rw.result, sum(&expected));
    assert_eq!((rw.report_count, rw.invalid_count), (23, 1));
    assert_eq!(rw.invalid_reasons, [("replayed".to_string(), 1)].into());
    let rn = result(&h, &agg, next)
        .await
        .expect("the next window has a result");
    assert_eq!(rn.result, sum(&(200..211).collect::<Vec<_>>()));
    assert_eq!((rn.report_count, rn.invalid_count), (11, 2));
    assert_eq!(
        rn.invalid_reasons,
        [
            ("outside-window".to_string(), 1),
            ("undecryptable".to_string(), 1)
        ]
        .into()
    );
    // Both facilitators' parts count the same reasons.
    for window in [w, next] {
        let parts: Vec<SumPart> = sum_parts(&h, &agg, window).await;
        assert_eq!(parts[0].invalid_reasons, parts[1].invalid_reasons);
        assert_eq!(parts[0].report_digest, parts[1].report_digest);
    }
    // The copied batch's window released nothing: no valid report, refused by both.
    assert!(result(&h, &agg, after).await.is_none());
    assert_eq!(
        computation(&h.collector, &agg, after).await.state,
        ComputationState::Refused
    );
}

async fn sum_parts(h: &Harness, agg: &str, w: Window) -> Vec<SumPart> {
    let keys = h.config.facilitator_keys().unwrap();
    let mut out = Vec::new();
    for f in 0..2u8 {
        let bytes = h
            .collector
            .get_required(&sum_part_key(agg, w, 0, f))
            .await
            .unwrap();
        out.push(SumPart::decode(&keys, &bytes).unwrap().0);
    }
    out
}

/// Two organisations whose configs differ in one shared parameter: the first artefact one gets
/// from the other is refused, naming the aggregation and both digests.
#[tokio::test]
async fn a_peer_running_another_aggregation_is_refused_with_both_digests_named() {
    let h = harness(0, 0.0, 10).await;
    let agg = "spend";
    let w = window_hours_ago(4);
    ingest_into(&h, w, 20).await;
    // Beta's config differs from everyone else's in one parameter of `spend`.
    let dir = h._dir.path();
    let text = std::fs::read_to_string(dir.join("millrace.toml")).unwrap();
    let marker = "id = \"spend\"";
    let at = text.find(marker).unwrap();
    let tail = text[at..].replacen("min_reports = 10", "min_reports = 11", 1);
    std::fs::write(dir.join("beta.toml"), format!("{}{tail}", &text[..at])).unwrap();
    let beta_config = std::sync::Arc::new(
        millrace_protocol::config::Config::load(&dir.join("beta.toml")).unwrap(),
    );
    let ours = h.digest(agg);
    let theirs = beta_config
        .aggregation_digest(beta_config.aggregation(agg).unwrap())
        .unwrap()
        .to_string();
    assert_ne!(ours, theirs);

    // `millrace config check` names the parameter and both digests.
    let (peer, compared) =
        millrace::config_check::check(&beta_config, &dir.join("alpha.party.toml")).unwrap();
    assert_eq!(peer, "alpha");
    let spend = compared.iter().find(|c| c.aggregation == agg).unwrap();
    assert!(!spend.agrees());
    assert_eq!(spend.differences, ["min_reports: ours 11, theirs 10"]);
    assert_eq!(
        (spend.ours.as_deref(), spend.theirs.as_deref()),
        (Some(theirs.as_str()), Some(ours.as_str()))
    );
    assert!(compared
        .iter()
        .filter(|c| c.aggregation != agg)
        .all(|c| c.agrees()));

    // Beta's intake-worker refuses the ingestor's batches (the first artefact it gets).
    let beta_intake = millrace_intake_worker::IntakeWorker::new(
        beta_config.clone(),
        1,
        h.stores[1].clone(),
        h.stores[0].clone(),
    )
    .unwrap();
    let listed = h.stores[1]
        .list(&format!("ingestion/{agg}/"))
        .await
        .unwrap();
    let (p, batch) = millrace_protocol::layout::parse_ingestion_key(agg, &listed[0].key).unwrap();
    let outcome = beta_intake
        .validate(&IntakeTask {
            version: millrace_protocol::tasks::INTAKE_TASK_VERSION,
            aggregation: agg.to_string(),
            aggregation_digest: theirs.clone(),
            batch,
            partition: p.path(),
        })
        .await
        .unwrap();
    let why = outcome.rejected_because.unwrap_or_default();
    assert!(
        why.contains("aggregation spend") && why.contains(&ours) && why.contains(&theirs),
        "{why}"
    );

    // Beta's aggregate-worker refuses alpha's window manifest, naming both digests.
    let t = now();
    h.validate_all(t).await;
    h.wm(0, "wm-0").run_once(t).await.unwrap();
    let beta_aggregator = millrace_aggregate_worker::AggregateWorker::new(
        beta_config.clone(),
        1,
        h.stores[1].clone(),
        h.collector.clone(),
        h.bus.clone(),
        PREFIX,
    )
    .unwrap();
    let err = beta_aggregator
        .aggregate(&AggregateTask {
            version: millrace_protocol::tasks::AGGREGATE_TASK_VERSION,
            aggregation: agg.to_string(),
            aggregation_digest: theirs.clone(),
            window: w.name(),
            generation: 0,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("window manifest") && err.contains(&ours) && err.contains(&theirs),
        "{err}"
    );
    assert!(h.collector.list("sums/spend/").await.unwrap().is_empty());
}
