//! Both facilitators agree on a window before they aggregate it: the leader's window manifests,
//! the peer deadline, late batches, forged manifests and tasks, the mill's wait and its deadline,
//! re-aggregation, grace and max age. Each service step is driven directly, with chosen times
//! (`run_once(now)`, `expire_waiting(now)`), on the in-memory bus and stores.

#[path = "support/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{harness, now, Harness, PREFIX};
use millrace::ingest::{ingest, IngestPlan};
use millrace_mill::MillOutcome;
use millrace_protocol::formats::{ExclusionReason, WindowBatch, WindowManifest};
use millrace_protocol::layout::{
    computation_key, exclusion_key, ingestion_key, manifest_key, parse_ingestion_key, result_key,
    sum_part_key, validation_key, Partition, Window,
};
use millrace_protocol::results::{
    AggregationResult, BatchExclusion, Computation, ComputationState,
};
use millrace_protocol::tasks::{
    topics, AggregateTask, SumPartReady, TaskMessage, AGGREGATE_TASK_VERSION,
};
use millrace_runtime::TaskError;
use millrace_store::Store;
use millrace_workflow_manager::PassReport;

/// Seconds in a minute, for readable simulated times.
const MIN: i64 = 60;

/// The first expected window of the harness, and its aggregation.
fn first_window(h: &Harness) -> (String, Window) {
    let e = &h.expectations.windows[0];
    (e.aggregation.clone(), Window::parse(&e.window).unwrap())
}

/// One more honest, correctly signed batch of `agg` for `window`, as written for each
/// facilitator: (key, bytes for facilitator 0, bytes for facilitator 1).
async fn extra_batch(h: &Harness, agg: &str, window: Window) -> (String, Vec<u8>, Vec<u8>) {
    let stores = [Store::memory(), Store::memory()];
    let n = h.config.aggregations.len();
    ingest(
        &h.config,
        millrace::keygen::INGESTOR,
        [&stores[0], &stores[1]],
        &IngestPlan {
            reports: 20 * n,
            invalid_fraction: 0.0,
            batch_size: 20,
            start: window.start,
            end: window.end,
        },
        |_| {},
    )
    .await
    .unwrap();
    let o = stores[0]
        .list(&format!("ingestion/{agg}/"))
        .await
        .unwrap()
        .into_iter()
        .find(|o| parse_ingestion_key(agg, &o.key).is_some())
        .unwrap();
    let b0 = stores[0].get_required(&o.key).await.unwrap().to_vec();
    let b1 = stores[1].get_required(&o.key).await.unwrap().to_vec();
    (o.key, b0, b1)
}

/// The batch id of an ingestion key.
fn batch_of(agg: &str, key: &str) -> (Partition, String) {
    parse_ingestion_key(agg, key).unwrap()
}

/// One pass of facilitator `f` at `now`; its aggregate tasks, taken off the bus.
async fn pass(h: &Harness, f: u8, now: i64) -> (PassReport, Vec<AggregateTask>) {
    let report = h.wm(f, &format!("wm-{f}")).run_once(now).await.unwrap();
    let mut tasks = Vec::new();
    for d in h.drain(&topics::aggregate(PREFIX, f)).await {
        tasks.push(AggregateTask::from_json(&d.body).unwrap());
        d.ack().await.unwrap();
    }
    (report, tasks)
}

/// Aggregates `tasks` on facilitator `f`, then lets the mill join every part announced.
async fn aggregate_and_join(h: &Harness, tasks: &[(u8, AggregateTask)]) {
    for (f, t) in tasks {
        h.aggregator(*f).aggregate(t).await.unwrap();
    }
    let mill = h.mill();
    for d in h.drain(&topics::collect(PREFIX)).await {
        let outcome = mill
            .join(&SumPartReady::from_json(&d.body).unwrap())
            .await
            .unwrap();
        if std::env::var_os("MILLRACE_TEST_DEBUG").is_some() {
            println!("{outcome:?}");
        }
        d.ack().await.unwrap();
    }
}

/// The leader's tasks and the helper's, each with the facilitator that runs it.
fn both(t0: Vec<AggregateTask>, t1: Vec<AggregateTask>) -> Vec<(u8, AggregateTask)> {
    t0.into_iter()
        .map(|t| (0, t))
        .chain(t1.into_iter().map(|t| (1, t)))
        .collect()
}

/// The leader's pass, then the helper's, at `now`; every task aggregated and joined.
async fn complete(h: &Harness, now: i64) -> [PassReport; 2] {
    let (r0, t0) = pass(h, 0, now).await;
    let (r1, t1) = pass(h, 1, now).await;
    let tasks = both(t0, t1);
    aggregate_and_join(h, &tasks).await;
    [r0, r1]
}

async fn result(h: &Harness, agg: &str, w: Window) -> Option<AggregationResult> {
    h.collector
        .get(&result_key(agg, w))
        .await
        .unwrap()
        .map(|b| AggregationResult::from_json(&b).unwrap())
}

/// Every expected window's result is there and equals the plaintext (for the aggregation with
/// differential privacy: lies within its noise bound of it), with exact counts.
async fn assert_exact(h: &Harness) {
    for e in &h.expectations.windows {
        let w = Window::parse(&e.window).unwrap();
        let r = result(h, &e.aggregation, w)
            .await
            .unwrap_or_else(|| panic!("{}/{}: no result", e.aggregation, e.window));
        assert!(
            e.accepts(&r.result),
            "{}/{}: {} against the plaintext {}",
            e.aggregation,
            e.window,
            r.result,
            e.expected
        );
        assert_eq!(
            (r.report_count, r.invalid_count),
            (e.valid, e.invalid),
            "{}/{}",
            e.aggregation,
            e.window
        );
    }
}

async fn manifest(h: &Harness, f: u8, agg: &str, w: Window, generation: u32) -> WindowManifest {
    let bytes = h.stores[usize::from(f)]
        .get_required(&manifest_key(agg, w, generation))
        .await
        .unwrap();
    WindowManifest::decode(&h.config.facilitator_keys().unwrap(), &bytes)
        .unwrap()
        .0
}

async fn exclusion(h: &Harness, f: u8, agg: &str, w: Window, batch: &str) -> BatchExclusion {
    let bytes = h.stores[usize::from(f)]
        .get_required(&exclusion_key(agg, w, batch))
        .await
        .unwrap_or_else(|e| panic!("no exclusion record for {batch} on facilitator {f}: {e}"));
    BatchExclusion::from_json(&bytes).unwrap()
}

#[tokio::test]
async fn the_helper_publishes_only_after_the_leaders_manifest_and_both_cover_the_same_batches() {
    let h = harness(400, 0.05, 50).await;
    let t = now();
    h.validate_all(t).await;
    // The helper first: no manifest yet, so no task; every closed window is waiting.
    let (r1, t1) = pass(&h, 1, t).await;
    assert!(t1.is_empty(), "{t1:?}");
    assert_eq!(r1.windows_waiting, h.expectations.windows.len(), "{r1:?}");
    // ... for the leader's manifest, the reason `millrace_windows_waiting{reason}` shows.
    assert_eq!(r1.waiting_for_manifest, r1.windows_waiting, "{r1:?}");
    assert_eq!(r1.waiting_for_validations, 0, "{r1:?}");
    // The leader decides every window and writes one manifest per window to both stores.
    let (r0, t0) = pass(&h, 0, t).await;
    assert_eq!(r0.manifests_written, h.expectations.windows.len(), "{r0:?}");
    assert_eq!(t0.len(), h.expectations.windows.len());
    let (_, t1) = pass(&h, 1, t).await;
    assert_eq!(t1.len(), t0.len());
    for (a, b) in t0.iter().zip(&t1) {
        assert_eq!((&a.window, a.generation), (&b.window, 0));
        let w = Window::parse(&a.window).unwrap();
        assert_eq!(
            manifest(&h, 0, &a.aggregation, w, 0).await,
            manifest(&h, 1, &a.aggregation, w, 0).await
        );
    }
    // An aggregate task names the manifest: its body does not grow with the window.
    assert!(t0
        .iter()
        .all(|t| t.to_json().len() < 256 && t.version == AGGREGATE_TASK_VERSION));
    let tasks = both(t0, t1);
    aggregate_and_join(&h, &tasks).await;
    assert_exact(&h).await;
}

/// The boundary race: a batch reaches the helper's store between the leader's pass and the
/// helper's. Both sum parts still cover the leader's batches, the result is exact, and the late
/// batch is on record (and in `millrace status`).
#[tokio::test]
async fn a_batch_reaching_the_helper_after_the_manifest_is_late_on_record_and_the_window_exact() {
    let h = harness(400, 0.0, 50).await;
    let t = now();
    h.validate_all(t).await;
    let (agg, w) = first_window(&h);
    let (r0, t0) = pass(&h, 0, t).await;
    assert!(r0.manifests_written > 0);
    // Between the passes, a batch of that window lands in the helper's store only.
    let (key, _, bytes1) = extra_batch(&h, &agg, w).await;
    h.stores[1].create(&key, bytes1).await.unwrap();
    let (p, late) = batch_of(&agg, &key);
    let (r1, t1) = pass(&h, 1, t).await;
    assert_eq!(r1.batches_late, 1, "{r1:?}");
    assert_eq!(r1.intake_published, 1, "the late batch is still validated");
    let record = exclusion(&h, 1, &agg, w, &late).await;
    assert_eq!(
        (
            record.reason.as_str(),
            record.partition.as_str(),
            record.manifest_generation
        ),
        ("late", p.path().as_str(), Some(0))
    );
    let tasks = both(t0, t1);
    aggregate_and_join(&h, &tasks).await;
    assert_exact(&h).await;
    // A second pass records it once only.
    let (again, _) = pass(&h, 1, t).await;
    assert_eq!(again.batches_late, 0);
    // `millrace status` with the helper's store shows the late batch.
    let rows = millrace::status::facilitator_rows(&h.config, &[(1, h.stores[1].clone())])
        .await
        .unwrap();
    assert!(
        rows.iter().any(|r| r.what == "EXCLUDED (late)"
            && r.batch.as_deref().is_some_and(|b| b.contains(&late))),
        "{rows:?}"
    );
}

/// A validation that reaches one store only (the helper's copy of its own validation never
/// reaches the leader): the old workflow-managers disagreed at max age; now the leader leaves the
/// batch out and the helper follows, so both parts agree and the window is exact.
#[tokio::test]
async fn validations_reaching_one_store_only_give_the_same_batches_on_both_sides() {
    let h = harness(400, 0.0, 50).await;
    let (agg, w) = first_window(&h);
    let (key, b0, b1) = extra_batch(&h, &agg, w).await;
    h.stores[0].create(&key, b0).await.unwrap();
    h.stores[1].create(&key, b1).await.unwrap();
    let t = now();
    h.validate_all(t).await;
    let (p, extra) = batch_of(&agg, &key);
    // The helper's validation of the extra batch is lost on its way to the leader's store.
    h.stores[0]
        .delete(&validation_key(&agg, p, &extra, 1))
        .await
        .unwrap();
    let max_age = h.config.aggregation(&agg).unwrap().max_age.as_secs() as i64;
    complete(&h, w.end + max_age).await;
    assert_exact(&h).await;
    let m = manifest(&h, 1, &agg, w, 0).await;
    assert!(!m.batches.iter().any(|b| b.batch == extra));
    let e = exclusion(&h, 0, &agg, w, &extra).await;
    assert_eq!((e.reason.as_str(), e.lacking), ("peer-missing", Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workflow_managers_of_each_facilitator_publish_every_task_once() {
    let h = harness(400, 0.0, 25).await;
    let t = now();
    h.validate_all(t).await;
    let windows = h.expectations.windows.len();
    for f in 0..2u8 {
        let (a, b) = (h.wm(f, "a"), h.wm(f, "b"));
        let (ra, rb) = tokio::join!(a.run_once(t), b.run_once(t));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.aggregate_published + rb.aggregate_published, windows);
        if f == 0 {
            assert!(ra.manifests_written + rb.manifests_written >= windows);
        }
        let bodies: Vec<Vec<u8>> = h
            .drain(&topics::aggregate(PREFIX, f))
            .await
            .into_iter()
            .map(|d| d.body.to_vec())
            .collect();
        let unique: std::collections::BTreeSet<&Vec<u8>> = bodies.iter().collect();
        assert_eq!((bodies.len(), unique.len()), (windows, windows));
    }
    for e in &h.expectations.windows {
        let w = Window::parse(&e.window).unwrap();
        for f in 0..2 {
            let listed = h.stores[f]
                .list(&format!("manifests/{}/", e.aggregation))
                .await
                .unwrap();
            let of_window: Vec<_> = listed
                .iter()
                .filter(|o| o.key.contains(&w.name()))
                .collect();
            assert_eq!(of_window.len(), 1, "one manifest per window: {of_window:?}");
        }
    }
}

/// The mill waits for a part without failing; past the aggregation's wait deadline the window is
/// FAILED with a reason naming what never came; `reaggregate` then produces the exact result and
/// a SUCCEEDED window cannot be re-aggregated.
#[tokio::test]
async fn a_part_that_never_comes_fails_the_window_and_reaggregate_recovers_it() {
    let h = harness(400, 0.0, 50).await;
    let t = now();
    h.validate_all(t).await;
    let (agg, w) = first_window(&h);
    let (_, t0) = pass(&h, 0, t).await;
    pass(&h, 1, t).await; // the helper's task is lost
    let task = t0
        .iter()
        .find(|x| x.window == w.name() && x.aggregation == agg)
        .unwrap();
    h.aggregator(0).aggregate(task).await.unwrap();
    let mill = h.mill();
    let ready = SumPartReady::from_json(&h.drain(&topics::collect(PREFIX)).await[0].body).unwrap();
    assert!(matches!(
        mill.join(&ready).await,
        Ok(MillOutcome::Waiting { missing: 1 })
    ));
    // Ten minutes later: still waiting, nothing failed.
    mill.expire_waiting(now() + 10 * MIN).await.unwrap();
    let record = |h: &Harness| {
        let collector = h.collector.clone();
        let agg = agg.clone();
        async move {
            Computation::from_json(
                &collector
                    .get_required(&computation_key(&agg, w))
                    .await
                    .unwrap(),
            )
            .unwrap()
        }
    };
    assert_eq!(record(&h).await.state, ComputationState::WaitingForParts);
    // Past the deadline (an hour by default): FAILED, naming the part that never came.
    mill.expire_waiting(now() + 2 * 60 * MIN).await.unwrap();
    let failed = record(&h).await;
    assert_eq!(failed.state, ComputationState::Failed);
    let detail = failed.detail.unwrap_or_default();
    assert!(
        detail.contains("facilitator 1") && detail.contains("never came"),
        "{detail}"
    );
    // A late message of the failed generation changes nothing.
    assert!(matches!(mill.join(&ready).await, Ok(MillOutcome::Stale(_))));
    assert!(result(&h, &agg, w).await.is_none());

    // Re-aggregation: generation 1, written by the leader to both stores.
    let done = h
        .wm(0, "alice@ops")
        .reaggregate(&agg, &w.name(), "part 1 lost in an outage", &h.collector)
        .await
        .unwrap();
    assert_eq!((done.generation, done.previous), (1, Some(0)));
    let m = manifest(&h, 1, &agg, w, 1).await;
    assert!(
        m.note.contains("alice@ops") && m.note.contains("part 1 lost"),
        "{}",
        m.note
    );
    let leader_tasks: Vec<(u8, AggregateTask)> = h
        .drain(&topics::aggregate(PREFIX, 0))
        .await
        .into_iter()
        .map(|d| (0, AggregateTask::from_json(&d.body).unwrap()))
        .collect();
    assert_eq!(leader_tasks.len(), 1);
    let (_, helper) = pass(&h, 1, t).await;
    assert_eq!(helper.len(), 1);
    assert_eq!(helper[0].generation, 1);
    let mut tasks = leader_tasks;
    tasks.push((1, helper[0].clone()));
    aggregate_and_join(&h, &tasks).await;
    let e = h
        .expectations
        .windows
        .iter()
        .find(|e| e.aggregation == agg && e.window == w.name())
        .unwrap();
    let r = result(&h, &agg, w).await.expect("the re-aggregated result");
    assert_eq!(
        (&r.result, r.report_count, r.generation),
        (&e.expected, e.valid, 1)
    );
    assert_eq!(record(&h).await.state, ComputationState::Succeeded);
    // Generation 0's part is still there, untouched (nothing is overwritten).
    assert!(h
        .collector
        .exists(&sum_part_key(&agg, w, 0, 0))
        .await
        .unwrap());
    let err = h
        .wm(0, "bob@ops")
        .reaggregate(&agg, &w.name(), "again", &h.collector)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("SUCCEEDED"), "{err}");
    // Only the leader re-aggregates.
    let err = h
        .wm(1, "carol@ops")
        .reaggregate(&agg, &h.expectations.windows[1].window, "x", &h.collector)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("only the leader"), "{err}");
}

/// Forged manifests (wrong signer, tampered bytes, a batch nobody has) and forged tasks (naming no
/// manifest, or in the old shape with a batch list) are refused by name; no sum part is written
/// for them, and the real window stays exact.
#[tokio::test]
async fn forged_manifests_and_tasks_are_refused_by_name() {
    let h = harness(400, 0.0, 50).await;
    let t = now();
    h.validate_all(t).await;
    let (agg, w) = first_window(&h);
    let (_, t0) = pass(&h, 0, t).await;
    let (_, t1) = pass(&h, 1, t).await;
    let real = manifest(&h, 1, &agg, w, 0).await;
    let real_bytes = h.stores[1]
        .get_required(&manifest_key(&agg, w, 0))
        .await
        .unwrap();
    let helper_key = h.config.facilitator_signer(1).unwrap();
    let leader_key = h.config.facilitator_signer(0).unwrap();
    let forge = |generation: u32| {
        let mut m = real.clone();
        m.generation = generation;
        m
    };
    // Generation 3: the helper's own signature. 4: the leader's bytes, one byte flipped.
    // 5: signed by the leader but listing a batch nobody has.
    h.stores[1]
        .create(
            &manifest_key(&agg, w, 3),
            forge(3).encode(&helper_key).unwrap(),
        )
        .await
        .unwrap();
    let mut tampered = forge(4).encode(&leader_key).unwrap();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    h.stores[1]
        .create(&manifest_key(&agg, w, 4), tampered)
        .await
        .unwrap();
    let mut ghost = forge(5);
    ghost.batches.push(WindowBatch {
        batch: "zz-ghost".into(),
        partition: Partition::of(w.start),
    });
    h.stores[1]
        .create(
            &manifest_key(&agg, w, 5),
            ghost.encode(&leader_key).unwrap(),
        )
        .await
        .unwrap();
    let task = |generation| AggregateTask {
        version: AGGREGATE_TASK_VERSION,
        aggregation: agg.clone(),
        aggregation_digest: h.digest(&agg),
        window: w.name(),
        generation,
    };
    let worker = h.aggregator(1);
    for (generation, needle) in [
        (3, "not by the leader"),
        (4, "manifest"),
        (5, "zz-ghost"),
        (9, "manifest"),
    ] {
        let err = match worker.aggregate(&task(generation)).await {
            Err(TaskError::Permanent(e) | TaskError::Transient(e)) => e,
            Ok(part) => panic!("generation {generation} aggregated: {part:?}"),
        };
        assert!(err.contains(needle), "generation {generation}: {err}");
        assert!(
            err.contains(&manifest_key(&agg, w, generation)),
            "names the manifest: {err}"
        );
        assert!(!h
            .collector
            .exists(&sum_part_key(&agg, w, generation, 1))
            .await
            .unwrap());
    }
    // The old task shape, an empty batch list for a real window, is not a task at all.
    let old = format!(
        r#"{{"version":1,"aggregation":"{agg}","window":"{}","batches":[]}}"#,
        w.name()
    );
    assert!(AggregateTask::from_json(old.as_bytes()).is_err());
    // The real window is untouched by all this.
    assert_eq!(
        h.stores[1]
            .get_required(&manifest_key(&agg, w, 0))
            .await
            .unwrap(),
        real_bytes
    );
    let tasks = both(t0, t1);
    aggregate_and_join(&h, &tasks).await;
    assert_exact(&h).await;
}

/// A valid batch in the leader's store only and a corrupt one in the helper's store only: the
/// window waits for the peer deadline (not for max age), then completes without them, and each
/// record says which side lacked its batch.
#[tokio::test]
async fn batches_one_side_lacks_are_left_out_after_the_peer_deadline() {
    let h = harness(400, 0.0, 50).await;
    let (agg, w) = first_window(&h);
    let (valid_key, b0, _) = extra_batch(&h, &agg, w).await;
    h.stores[0].create(&valid_key, b0).await.unwrap();
    let p = Partition::of(w.start);
    let corrupt_key = ingestion_key(&agg, p, "corrupt-copy");
    h.stores[1]
        .create(&corrupt_key, b"MLRC not a batch".to_vec())
        .await
        .unwrap();
    let t = now();
    h.validate_all(t).await;
    // Right after validation: that window waits (the others are decided).
    let (r0, early) = pass(&h, 0, t).await;
    assert_eq!(r0.windows_waiting, 1, "{r0:?}");
    assert_eq!(
        (r0.waiting_for_validations, r0.waiting_for_manifest),
        (1, 0),
        "{r0:?}"
    );
    assert!(!h.stores[0].exists(&manifest_key(&agg, w, 0)).await.unwrap());
    // Past the peer deadline (10 minutes by default), far before max age.
    complete(&h, t + 11 * MIN).await;
    let early: Vec<(u8, AggregateTask)> = early.into_iter().map(|t| (0, t)).collect();
    aggregate_and_join(&h, &early).await;
    assert_exact(&h).await;
    let (_, valid) = batch_of(&agg, &valid_key);
    let e = exclusion(&h, 0, &agg, w, &valid).await;
    assert_eq!((e.reason.as_str(), e.lacking), ("peer-missing", Some(1)));
    assert!(e.detail.contains("beta"), "{}", e.detail);
    let e = exclusion(&h, 0, &agg, w, "corrupt-copy").await;
    assert_eq!((e.reason.as_str(), e.lacking), ("peer-missing", Some(0)));
    let m = manifest(&h, 1, &agg, w, 0).await;
    let reasons: Vec<(&str, ExclusionReason)> = m
        .excluded
        .iter()
        .map(|e| (e.batch.batch.as_str(), e.reason))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons
        .iter()
        .all(|(_, r)| *r == ExclusionReason::PeerMissing));
}

/// Grace: nothing is decided before `end + grace`. Max age: a batch the leader has but never
/// validated holds the window (counted in `windows_waiting`) until max age, then is left out.
#[tokio::test]
async fn grace_holds_a_window_open_and_max_age_ends_the_wait() {
    let h = harness(400, 0.0, 50).await;
    let t = now();
    h.validate_all(t).await;
    let (agg, w) = first_window(&h);
    let a = h.config.aggregation(&agg).unwrap().clone();
    let grace = a.grace.as_secs() as i64;
    let max_age = a.max_age.as_secs() as i64;
    // Before grace is over, the window is not even waiting: it is still open to batches.
    let (r, tasks) = pass(&h, 0, w.end + grace - 1).await;
    assert!(!tasks
        .iter()
        .any(|x| x.window == w.name() && x.aggregation == agg));
    assert!(!h.stores[0].exists(&manifest_key(&agg, w, 0)).await.unwrap());
    assert_eq!(r.manifests_written, 0, "{r:?}");
    // A batch the leader has but never validated (its intake is behind).
    let (key, b0, _) = extra_batch(&h, &agg, w).await;
    h.stores[0].create(&key, b0).await.unwrap();
    let (_, stuck) = batch_of(&agg, &key);
    h.drain(&topics::intake(PREFIX, 0)).await;
    let (r, mut leader_tasks) = pass(&h, 0, w.end + grace).await;
    assert!(!leader_tasks
        .iter()
        .any(|x| x.window == w.name() && x.aggregation == agg));
    assert!(r.windows_waiting >= 1, "{r:?}");
    // Still waiting long after the peer deadline: it is this side's own batch.
    let (r, later) = pass(&h, 0, t + 5 * 60 * MIN).await;
    leader_tasks.extend(later);
    assert!(r.windows_waiting >= 1, "{r:?}");
    assert!(!h.stores[0].exists(&manifest_key(&agg, w, 0)).await.unwrap());
    // At max age the window goes ahead without it.
    complete(&h, w.end + max_age).await;
    let early: Vec<(u8, AggregateTask)> = leader_tasks.into_iter().map(|t| (0, t)).collect();
    aggregate_and_join(&h, &early).await;
    assert_exact(&h).await;
    let e = exclusion(&h, 0, &agg, w, &stuck).await;
    assert_eq!(e.reason, "max-age");
}

/// The helper without a manifest: counted in `windows_waiting` until max age + the wait
/// deadline, then the window is recorded FAILED in its store, naming what never came.
#[tokio::test]
async fn a_helper_without_a_manifest_waits_then_records_the_window_failed() {
    let t = now();
    let fresh = harness(100, 0.0, 50).await;
    let other = &fresh.expectations.windows[0];
    let ow = Window::parse(&other.window).unwrap();
    fresh.validate_all(t).await;
    let (r, _) = pass(&fresh, 1, t).await;
    assert!(r.windows_waiting > 0 && r.windows_failed == 0, "{r:?}");
    let oa = fresh.config.aggregation(&other.aggregation).unwrap();
    let deadline = ow.end + oa.max_age.as_secs() as i64 + oa.wait_deadline.as_secs() as i64;
    let (r, _) = pass(&fresh, 1, deadline - 1).await;
    assert!(r.windows_waiting > 0 && r.windows_failed == 0, "{r:?}");
    assert!(!fresh.stores[1]
        .exists(&computation_key(&other.aggregation, ow))
        .await
        .unwrap());
    let (r, _) = pass(&fresh, 1, deadline).await;
    assert!(r.windows_failed > 0, "{r:?}");
    let c = Computation::from_json(
        &fresh.stores[1]
            .get_required(&computation_key(&other.aggregation, ow))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(c.state, ComputationState::Failed);
    assert!(
        c.detail
            .unwrap_or_default()
            .contains("no window manifest from the leader"),
        "names what never came"
    );
}

/// Once a window's manifest exists and its task is out, its partitions are settled and no pass
/// lists them again: the listing follows new work.
#[tokio::test]
async fn settled_partitions_are_not_listed_again() {
    let h = harness(400, 0.0, 50).await;
    let t = now();
    h.validate_all(t).await;
    let [r0, r1] = complete(&h, t).await;
    assert!(r0.partitions_settled > 0 && r1.partitions_settled > 0);
    let (again, _) = pass(&h, 0, t).await;
    assert!(
        again.partitions_listed + r0.partitions_settled <= r0.partitions_listed,
        "settled partitions listed again: {again:?} after {r0:?}"
    );
    assert_eq!(again.partitions_settled, 0);
    assert_exact(&h).await;
    // Nothing is scheduled twice after settling.
    assert_eq!((again.intake_published, again.aggregate_published), (0, 0));

    // A batch that lands in a settled partition is not listed by any pass; the cleaner, which
    // walks the whole store, records it as late. One in a window older than the horizon (never
    // decided) is recorded as beyond the horizon.
    let (agg, w) = first_window(&h);
    let (key, b0, _) = extra_batch(&h, &agg, w).await;
    h.stores[0].create(&key, b0.clone()).await.unwrap();
    let (_, late) = batch_of(&agg, &key);
    let a = h.config.aggregation(&agg).unwrap().clone();
    let ancient = Window::containing(a.horizon(t) - 10 * a.window_secs, a.window_secs);
    let ancient_key = ingestion_key(&agg, Partition::of(ancient.start), "ancient");
    h.stores[0].create(&ancient_key, b0).await.unwrap();
    let (after, _) = pass(&h, 0, t).await;
    assert_eq!(
        (after.batches_late, after.intake_published),
        (0, 0),
        "{after:?}"
    );
    let cleaner = millrace_cleaner::Cleaner::new(
        h.config.clone(),
        h.stores[0].clone(),
        millrace_cleaner::Settings {
            role: millrace_cleaner::Role::Facilitator,
            ttl: Duration::from_secs(7 * 86400),
            dry_run: false,
        },
    );
    let report = cleaner.run_once(chrono::Utc::now()).await.unwrap();
    assert_eq!(report.batches_recorded.len(), 2, "{report:?}");
    assert_eq!(exclusion(&h, 0, &agg, w, &late).await.reason, "late");
    assert_eq!(
        exclusion(&h, 0, &agg, ancient, "ancient").await.reason,
        "beyond-horizon"
    );
    assert_exact(&h).await;
    // Recorded once.
    let report = cleaner.run_once(chrono::Utc::now()).await.unwrap();
    assert!(report.batches_recorded.is_empty());
}

/// One window whose manifest cannot be written (an object of someone else's is in the way in the
/// helper's store) fails alone: it is named in the pass report and retried next pass, while every
/// other window is decided and published.
#[tokio::test]
async fn a_window_whose_manifest_cannot_be_written_fails_alone_and_is_retried() {
    let h = harness(400, 0.0, 50).await;
    let t = now();
    h.validate_all(t).await;
    let (agg, w) = first_window(&h);
    let key = manifest_key(&agg, w, 0);
    h.stores[1]
        .create(&key, b"not the leader's manifest".to_vec())
        .await
        .unwrap();
    let incomplete = h.wm(0, "wm-0").run_once(t).await.unwrap_err();
    let report = &incomplete.report;
    assert_eq!(report.failed_windows.len(), 1, "{report:?}");
    assert_eq!(report.failed_windows[0].window, w.name());
    assert!(
        report.failed_windows[0].error.contains(&key),
        "names the object: {:?}",
        report.failed_windows[0].error
    );
    let windows = h.expectations.windows.len();
    assert_eq!(report.aggregate_published, windows - 1, "{report:?}");
    let mut leader = Vec::new();
    for d in h.drain(&topics::aggregate(PREFIX, 0)).await {
        leader.push(AggregateTask::from_json(&d.body).unwrap());
        d.ack().await.unwrap();
    }
    // The operator removes the stray object; the next pass finishes the window.
    h.stores[1].delete(&key).await.unwrap();
    let (r, more) = pass(&h, 0, t).await;
    assert!(r.failed_windows.is_empty(), "{r:?}");
    assert_eq!(more.len(), 1, "{r:?} {more:?}");
    leader.extend(more);
    let (_, helper) = pass(&h, 1, t).await;
    aggregate_and_join(&h, &both(leader, helper)).await;
    assert_exact(&h).await;
}
