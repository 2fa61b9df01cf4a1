//! End-to-end behaviour of the pipeline on the embedded backends (in-memory bus, in-memory and
//! local-file stores): each service step driven directly, so each test can interfere exactly
//! where the behaviour it proves lives.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/hostile.rs"]
mod hostile;

use harness::{harness, now, Harness, PREFIX};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use millrace::demo::{run_demo, DemoOptions};
use millrace_bus::{rejected_topic, Bus, Message, ATTR_REASON};
use millrace_cleaner::{Cleaner, Role};
use millrace_mill::MillOutcome;
use millrace_protocol::layout::{
    intake_marker_key, parse_ingestion_key, result_key, sum_part_key, Window,
};
use millrace_protocol::results::{Computation, ComputationState};
use millrace_protocol::tasks::{
    topics, AggregateTask, IntakeTask, SumPartReady, TaskMessage, INTAKE_TASK_VERSION,
    SUM_PART_READY_VERSION,
};
use millrace_runtime::{run_worker, Shutdown, TaskError, WorkerConfig};
use millrace_store::Store;
use millrace_workflow_manager::WorkflowManager;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prio3_variant_matches_the_plaintext_result_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_demo(&DemoOptions {
        dir: Some(dir.path().to_path_buf()),
        reports: 2_000,
        invalid_fraction: 0.05,
        batch_size: 100,
        timeout: Duration::from_secs(180),
        show_progress: false,
    })
    .await
    .unwrap();
    let aggs: BTreeSet<&str> = outcome
        .rows
        .iter()
        .map(|r| r.expectation.aggregation.as_str())
        .collect();
    assert_eq!(
        aggs.len(),
        5,
        "one row set per Prio3 variant and one with differential privacy: {aggs:?}"
    );
    for row in &outcome.rows {
        assert!(row.correct(), "{row:?}");
    }
    // The reports went in through the ingestor (HTTP, the client library), made now, into
    // minute-long windows; a run crossing a minute boundary splits an aggregation in two.
    assert!(outcome.ingestor.starts_with("http://127.0.0.1:"));
    for agg in &aggs {
        let rows: Vec<_> = outcome
            .rows
            .iter()
            .filter(|r| r.expectation.aggregation == *agg)
            .collect();
        // Every aggregation had deliberately broken reports (undecryptable, truncated,
        // tampered, sealed to a wrong key); they were excluded on both sides and counted.
        let invalid: u64 = rows.iter().map(|r| r.expectation.invalid).sum();
        assert!(invalid > 0, "{agg}: {rows:?}");
        // A window with enough reports was released, not refused.
        assert!(
            rows.iter().any(|r| r.outcome.result().is_some()),
            "{agg}: {rows:?}"
        );
    }
    // The repeated reports the clients sent were acknowledged and stored once by the ingestor:
    // they count neither as valid nor as invalid.
    assert!(outcome.acknowledged_repeats > 0);
    let counted: u64 = outcome
        .rows
        .iter()
        .map(|r| r.expectation.valid + r.expectation.invalid)
        .sum();
    assert_eq!(
        counted as usize + outcome.acknowledged_repeats,
        outcome.reports
    );
}

#[tokio::test]
async fn same_intake_and_aggregate_task_delivered_twice_changes_nothing() {
    let h = harness(400, 0.05, 50).await;
    h.run_intake().await;
    let before = [
        h.snapshot(&h.stores[0]).await,
        h.snapshot(&h.stores[1]).await,
    ];
    // Deliver every intake task a second time.
    for f in 0..2u8 {
        let worker = h.intake(f);
        for a in &h.config.aggregations {
            for o in h.stores[usize::from(f)]
                .list(&format!("ingestion/{}/", a.id))
                .await
                .unwrap()
            {
                let (p, batch) = parse_ingestion_key(&a.id, &o.key).unwrap();
                let t = IntakeTask {
                    version: INTAKE_TASK_VERSION,
                    aggregation: a.id.clone(),
                    aggregation_digest: h.digest(&a.id),
                    batch,
                    partition: p.path(),
                };
                worker.validate(&t).await.unwrap();
            }
        }
    }
    assert_eq!(before[0], h.snapshot(&h.stores[0]).await);
    assert_eq!(before[1], h.snapshot(&h.stores[1]).await);

    let mut parts = Vec::new();
    for f in 0..2u8 {
        let agg = h.aggregator(f);
        for t in h.aggregate_tasks(f).await {
            let first = agg.aggregate(&t).await.unwrap();
            let second = agg.aggregate(&t).await.unwrap();
            assert_eq!(first, second);
            parts.push(first);
        }
    }
    let mill = h.mill();
    for m in h.drain(&topics::collect(PREFIX)).await {
        let msg = SumPartReady::from_json(&m.body).unwrap();
        let _ = mill.join(&msg).await;
        m.ack().await.unwrap();
    }
    for e in &h.expectations.windows {
        let w = Window::parse(&e.window).unwrap();
        let msg = SumPartReady {
            version: SUM_PART_READY_VERSION,
            aggregation: e.aggregation.clone(),
            aggregation_digest: h.digest(&e.aggregation),
            window: e.window.clone(),
            generation: 0,
            facilitator: 0,
        };
        assert_eq!(mill.join(&msg).await.unwrap(), MillOutcome::AlreadyDone);
        let r = millrace_protocol::results::AggregationResult::from_json(
            &h.collector
                .get_required(&result_key(&e.aggregation, w))
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(e.accepts(&r.result), "{e:?}: {}", r.result);
        assert_eq!((r.report_count, r.invalid_count), (e.valid, e.invalid));
    }
}

#[tokio::test]
async fn workflow_manager_run_twice_schedules_nothing_new() {
    let h = harness(200, 0.0, 25).await;
    let batches = h.batch_count().await;
    let wm = h.wm(0, "a");
    let first = wm.run_once(now()).await.unwrap();
    assert_eq!(first.intake_published, batches);
    let second = wm.run_once(now()).await.unwrap();
    assert_eq!(second.intake_published, 0);
    assert_eq!(h.drain(&topics::intake(PREFIX, 0)).await.len(), batches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workflow_managers_schedule_each_task_exactly_once() {
    let h = harness(400, 0.0, 25).await;
    let batches = h.batch_count().await;
    let (a, b) = (h.wm(0, "a"), h.wm(0, "b"));
    let (ra, rb) = tokio::join!(a.run_once(now()), b.run_once(now()));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.intake_published + rb.intake_published, batches);
    let bodies: Vec<Vec<u8>> = h
        .drain(&topics::intake(PREFIX, 0))
        .await
        .into_iter()
        .map(|d| d.body.to_vec())
        .collect();
    let unique: BTreeSet<&Vec<u8>> = bodies.iter().collect();
    assert_eq!(bodies.len(), batches);
    assert_eq!(unique.len(), batches);
}

#[tokio::test]
async fn a_stale_claim_is_taken_over_and_a_fresh_one_respected() {
    let h = harness(100, 0.0, 25).await;
    let agg = &h.config.aggregations[0];
    let listed = h.stores[0]
        .list(&format!("ingestion/{}/", agg.id))
        .await
        .unwrap();
    let (p, batch) = parse_ingestion_key(&agg.id, &listed[0].key).unwrap();
    let marker = intake_marker_key(&agg.id, p, &batch);
    let stale = serde_json::json!({"state": "claimed", "by": "crashed", "at": now() - 3600, "generation": 0});
    h.stores[0]
        .create(&format!("{marker}.claim"), stale.to_string())
        .await
        .unwrap();

    // A fresh-claim view (timeout longer than the claim's age) leaves it alone ...
    let r = h
        .wm_with(0, "b", Duration::from_secs(7200), false)
        .run_once(now())
        .await
        .unwrap();
    assert_eq!(r.intake_published, h.batch_count().await - 1);
    assert!(
        !millrace_store::markers::is_published(&h.stores[0], &marker)
            .await
            .unwrap()
    );
    // ... a stale one is taken over.
    let r = h
        .wm_with(0, "c", Duration::from_secs(60), false)
        .run_once(now())
        .await
        .unwrap();
    assert_eq!(r.intake_published, 1);
    let rec = millrace_store::markers::published(&h.stores[0], &marker)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.by.as_str(), rec.generation), ("c", 1));
}

#[tokio::test]
async fn dry_run_writes_and_publishes_nothing() {
    let h = harness(100, 0.0, 25).await;
    let before = h.snapshot(&h.stores[0]).await;
    let r = h
        .wm_with(0, "dry", Duration::from_secs(600), true)
        .run_once(now())
        .await
        .unwrap();
    assert_eq!(r.would_publish, h.batch_count().await);
    assert_eq!(r.intake_published, 0);
    assert_eq!(before, h.snapshot(&h.stores[0]).await);
    assert!(h.drain(&topics::intake(PREFIX, 0)).await.is_empty());
}

/// Waiting is not failing: the first part's message is acknowledged with the window recorded as
/// waiting (no retry, no attempt spent, nothing on `.dead`, even with `max_attempts` 1); the second
/// part's own message completes the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mill_waits_for_a_missing_part_without_spending_attempts() {
    let h = harness(200, 0.0, 50).await;
    h.run_intake().await;
    let t0 = h.aggregate_tasks(0).await;
    let t1 = h.aggregate_tasks(1).await;
    let (first, rest) = (&t0[0], &t1);
    h.aggregator(0).aggregate(first).await.unwrap();
    let w = Window::parse(&first.window).unwrap();

    let shutdown = Shutdown::new();
    let mut cfg = WorkerConfig::new(topics::collect(PREFIX), "mill");
    cfg.backoff_base = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.max_attempts = 1;
    let mill_task = tokio::spawn(run_worker(
        h.bus.clone(),
        cfg,
        Arc::new(h.mill()),
        shutdown.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = Computation::from_json(
        &h.collector
            .get_required(&millrace_protocol::layout::computation_key(
                &first.aggregation,
                w,
            ))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(c.state, ComputationState::WaitingForParts);
    assert!(!h
        .collector
        .exists(&result_key(&first.aggregation, w))
        .await
        .unwrap());

    let other = rest
        .iter()
        .find(|t| t.aggregation == first.aggregation && t.window == first.window)
        .unwrap();
    let agg1 = h.aggregator(1);
    // Only the matching window's part from facilitator 1 (its message goes to the mill as well).
    agg1.aggregate(other).await.unwrap();
    let key = result_key(&first.aggregation, w);
    let mut done = false;
    for _ in 0..100 {
        if h.collector.exists(&key).await.unwrap() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.trigger();
    let report = mill_task.await.unwrap().unwrap();
    assert!(done, "the result appeared once the second part arrived");
    assert_eq!(
        (report.retried, report.dead, report.rejected),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(h
        .drain(&millrace_bus::dead_topic(&topics::collect(PREFIX)))
        .await
        .is_empty());
    let expected = h
        .expectations
        .windows
        .iter()
        .find(|e| e.aggregation == first.aggregation && e.window == first.window)
        .unwrap();
    let r = millrace_protocol::results::AggregationResult::from_json(
        &h.collector.get_required(&key).await.unwrap(),
    )
    .unwrap();
    assert!(expected.accepts(&r.result), "{expected:?}: {}", r.result);
}

#[tokio::test]
async fn mill_refuses_parts_whose_digests_differ() {
    let h = harness(200, 0.0, 50).await;
    h.run_intake().await;
    let t = h.aggregate_tasks(0).await.remove(0);
    let t1 = h
        .aggregate_tasks(1)
        .await
        .into_iter()
        .find(|x| x.aggregation == t.aggregation && x.window == t.window)
        .unwrap();
    h.aggregator(0).aggregate(&t).await.unwrap();
    let mut p1 = h
        .aggregator(1)
        .aggregate(&t1)
        .await
        .unwrap()
        .part()
        .cloned()
        .expect("a window above the minimum releases a part");
    let w = Window::parse(&t.window).unwrap();
    p1.report_digest[0] ^= 1;
    let signer = h.config.facilitator_signer(1).unwrap();
    h.collector
        .overwrite(
            &sum_part_key(&t.aggregation, w, 0, 1),
            p1.encode(&signer).unwrap(),
        )
        .await
        .unwrap();
    let msg = SumPartReady {
        version: SUM_PART_READY_VERSION,
        aggregation: t.aggregation.clone(),
        aggregation_digest: t.aggregation_digest.clone(),
        window: t.window.clone(),
        generation: 0,
        facilitator: 1,
    };
    match h.mill().join(&msg).await {
        Err(TaskError::Permanent(reason)) => assert!(reason.contains("digests differ"), "{reason}"),
        other => panic!("expected a permanent refusal, got {other:?}"),
    }
    assert!(!h
        .collector
        .exists(&result_key(&t.aggregation, w))
        .await
        .unwrap());
    let c = Computation::from_json(
        &h.collector
            .get_required(&millrace_protocol::layout::computation_key(
                &t.aggregation,
                w,
            ))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(c.state, ComputationState::Failed);
}

#[tokio::test]
async fn a_damaged_batch_is_rejected_by_name_and_excluded_on_both_sides() {
    let h = harness(200, 0.0, 50).await;
    let agg = &h.config.aggregations[0];
    let listed = h.stores[0]
        .list(&format!("ingestion/{}/", agg.id))
        .await
        .unwrap();
    let key = listed[0].key.clone();
    // Every report is valid (no invalid fraction): the damaged batch takes all of its own.
    let damaged_reports = millrace_protocol::formats::IngestionBatch::decode(
        &h.config.ingestor_keys().unwrap(),
        &h.stores[1].get_required(&key).await.unwrap(),
    )
    .unwrap()
    .0
    .reports
    .len() as u64;
    assert!(damaged_reports > 0);
    let mut bytes = h.stores[0].get_required(&key).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    h.stores[0].overwrite(&key, bytes).await.unwrap();
    h.run_intake().await;
    let mut parts = Vec::new();
    for f in 0..2u8 {
        for t in h.aggregate_tasks(f).await {
            if t.aggregation == agg.id {
                let released = h.aggregator(f).aggregate(&t).await.unwrap();
                parts.push((f, released.report_count()));
            }
        }
    }
    let total_valid: u64 = h
        .expectations
        .windows
        .iter()
        .filter(|e| e.aggregation == agg.id)
        .map(|e| e.valid)
        .sum();
    let p0: u64 = parts.iter().filter(|p| p.0 == 0).map(|p| p.1).sum();
    let p1: u64 = parts.iter().filter(|p| p.0 == 1).map(|p| p.1).sum();
    assert_eq!(p0, p1, "both sides exclude the damaged batch");
    assert_eq!(p0, total_valid - damaged_reports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_task_lands_in_rejected_and_the_worker_keeps_going() {
    let h = harness(100, 0.0, 25).await;
    let topic = topics::intake(PREFIX, 0);
    h.bus
        .publish(&topic, Message::new("{not a task"))
        .await
        .unwrap();
    h.wm(0, "wm").run_once(now()).await.unwrap();
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        h.bus.clone(),
        WorkerConfig::new(topic.clone(), "intake-worker-0"),
        Arc::new(h.intake(0)),
        shutdown.clone(),
    ));
    let batches = h.batch_count().await;
    let mut validated = 0;
    for _ in 0..200 {
        validated = h.stores[1].list("validation/").await.unwrap().len();
        if validated == batches {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    shutdown.trigger();
    let report = worker.await.unwrap().unwrap();
    assert_eq!(
        validated, batches,
        "every good task after the bad one was processed"
    );
    assert_eq!(report.rejected, 1);
    let rejected = h.drain(&rejected_topic(&topic)).await;
    assert_eq!(rejected.len(), 1);
    assert_eq!(&rejected[0].body[..], b"{not a task");
    assert!(rejected[0]
        .attributes
        .get(ATTR_REASON)
        .is_some_and(|r| r.contains("intake task")));
}

#[tokio::test]
async fn cleaner_deletes_only_expired_settled_objects_and_markers_last() {
    let h = harness(200, 0.0, 50).await;
    h.run_intake().await;
    let cleaner = |ttl: u64, dry_run: bool, role: Role, store: &Store| {
        Cleaner::new(
            h.config.clone(),
            store.clone(),
            millrace_cleaner::Settings {
                role,
                ttl: Duration::from_secs(ttl),
                dry_run,
            },
        )
    };
    let later = chrono::Utc::now() + chrono::Duration::seconds(5);
    // Not settled yet (no aggregate task published): nothing goes, even with a zero TTL.
    let r = cleaner(0, false, Role::Facilitator, &h.stores[0])
        .run_once(later)
        .await
        .unwrap();
    assert!(r.deleted.is_empty(), "{:?}", r.deleted);
    assert!(r.kept_not_settled > 0);

    for f in 0..2u8 {
        for t in h.aggregate_tasks(f).await {
            h.aggregator(f).aggregate(&t).await.unwrap();
        }
    }
    // Settled but young: a week's TTL keeps everything.
    assert!(cleaner(7 * 86400, false, Role::Facilitator, &h.stores[0])
        .run_once(later)
        .await
        .unwrap()
        .deleted
        .is_empty());
    // A dry run deletes nothing but says what it would.
    let before = h.snapshot(&h.stores[0]).await;
    let dry = cleaner(0, true, Role::Facilitator, &h.stores[0])
        .run_once(later)
        .await
        .unwrap();
    assert!(!dry.deleted.is_empty());
    assert_eq!(before, h.snapshot(&h.stores[0]).await);
    // The real pass: data first, then markers.
    let r = cleaner(0, false, Role::Facilitator, &h.stores[0])
        .run_once(later)
        .await
        .unwrap();
    assert_eq!(r.deleted, dry.deleted);
    for a in &h.config.aggregations {
        let keys: Vec<&String> = r
            .deleted
            .iter()
            .filter(|k| k.contains(&format!("/{}/", a.id)))
            .collect();
        let first_marker = keys.iter().position(|k| k.starts_with("markers/")).unwrap();
        let last_data = keys
            .iter()
            .rposition(|k| !k.starts_with("markers/"))
            .unwrap();
        assert!(last_data < first_marker, "markers go last: {keys:?}");
    }
    assert!(h.snapshot(&h.stores[0]).await.is_empty());
    // The peer's store was not touched.
    assert!(!h.snapshot(&h.stores[1]).await.is_empty());

    // Collector: a finished computation's parts and result go, the record last; a waiting one stays.
    let mill = h.mill();
    for d in h.drain(&topics::collect(PREFIX)).await {
        let _ = mill.join(&SumPartReady::from_json(&d.body).unwrap()).await;
        d.ack().await.unwrap();
    }
    let r = cleaner(0, false, Role::Collector, &h.collector)
        .run_once(later)
        .await
        .unwrap();
    assert!(!r.deleted.is_empty());
    assert!(r.deleted.last().unwrap().starts_with("computations/"));
    assert!(h.collector.list("sums/").await.unwrap().is_empty());
}

/// Takes every message waiting on `topic` off the bus (acked) and returns the bodies.
async fn drain_bodies(h: &Harness, topic: &str) -> Vec<String> {
    let mut out = Vec::new();
    for d in h.drain(topic).await {
        out.push(String::from_utf8_lossy(&d.body).to_string());
        d.ack().await.unwrap();
    }
    out
}

fn replayer(h: &Harness, by: &str) -> WorkflowManager {
    h.wm(0, by)
}

#[tokio::test]
async fn replaying_a_batch_republishes_it_once_and_records_who_and_why() {
    use millrace_store::markers;
    use millrace_workflow_manager::{ReplayKind, ReplayTarget};
    let h = harness(200, 0.0, 50).await;
    h.wm(0, "wm").run_once(now()).await.unwrap();
    let intake = topics::intake(PREFIX, 0);
    let first = drain_bodies(&h, &intake).await;
    assert!(!first.is_empty());
    let task = IntakeTask::from_json(first[0].as_bytes()).unwrap();
    let target = ReplayTarget::Batch {
        aggregation: task.aggregation.clone(),
        batch: task.batch.clone(),
        partition: None,
    };

    let r = replayer(&h, "alice@ops")
        .replay(&target, "intake-worker crash loop")
        .await
        .unwrap();
    assert_eq!(r.kind, ReplayKind::Replay { number: 1 });
    assert_eq!(
        drain_bodies(&h, &intake).await,
        vec![first[0].clone()],
        "the same task, once"
    );
    let r = replayer(&h, "bob@ops")
        .replay(&target, "again")
        .await
        .unwrap();
    assert_eq!(r.kind, ReplayKind::Replay { number: 2 });
    assert_eq!(drain_bodies(&h, &intake).await.len(), 1);

    let p = millrace_protocol::layout::Partition::parse(&task.partition).unwrap();
    let marker = millrace_protocol::layout::intake_marker_key(&task.aggregation, p, &task.batch);
    let history = markers::replays(&h.stores[0], &marker).await.unwrap();
    let who: Vec<(&str, Option<&str>, &str)> = history
        .iter()
        .map(|r| (r.by.as_str(), r.reason.as_deref(), r.state.as_str()))
        .collect();
    assert_eq!(
        who,
        vec![
            ("alice@ops", Some("intake-worker crash loop"), "replayed"),
            ("bob@ops", Some("again"), "replayed")
        ]
    );
    assert!(history.iter().all(|r| r.message_id.is_some() && r.at > 0));
    // The workflow-manager still schedules nothing new.
    assert_eq!(
        h.wm(0, "wm")
            .run_once(now())
            .await
            .unwrap()
            .intake_published,
        0
    );
}

#[tokio::test]
async fn replaying_a_batch_never_scheduled_publishes_it_through_its_marker() {
    use millrace_workflow_manager::{ReplayKind, ReplayTarget};
    let h = harness(200, 0.0, 50).await;
    let batches = h.batch_count().await;
    let a = &h.config.aggregations[0];
    let o = h.stores[0]
        .list(&format!("ingestion/{}/", a.id))
        .await
        .unwrap()
        .into_iter()
        .find(|o| parse_ingestion_key(&a.id, &o.key).is_some())
        .unwrap();
    let (p, batch) = parse_ingestion_key(&a.id, &o.key).unwrap();
    let target = ReplayTarget::Batch {
        aggregation: a.id.clone(),
        batch,
        partition: Some(p.path()),
    };
    let r = replayer(&h, "alice@ops")
        .replay(&target, "lost in outage")
        .await
        .unwrap();
    assert_eq!(r.kind, ReplayKind::FirstPublish);
    assert!(r.message_id.is_some());
    let report = h.wm(0, "wm").run_once(now()).await.unwrap();
    assert_eq!(
        report.intake_published,
        batches - 1,
        "the replayed batch is not published twice"
    );
    assert_eq!(
        drain_bodies(&h, &topics::intake(PREFIX, 0)).await.len(),
        batches
    );
}

#[tokio::test]
async fn replaying_a_window_republishes_the_same_aggregate_task() {
    use millrace_workflow_manager::{ReplayKind, ReplayTarget};
    let h = harness(200, 0.0, 50).await;
    h.run_intake().await;
    let tasks = h.aggregate_tasks(0).await;
    assert!(!tasks.is_empty());
    let original = &tasks[0];
    let target = ReplayTarget::Window {
        aggregation: original.aggregation.clone(),
        window: original.window.clone(),
    };
    let r = replayer(&h, "alice@ops")
        .replay(&target, "bad deploy of aggregate-worker")
        .await
        .unwrap();
    assert_eq!(r.kind, ReplayKind::Replay { number: 1 });
    assert!(r.batches > 0);
    let bodies = drain_bodies(&h, &topics::aggregate(PREFIX, 0)).await;
    assert_eq!(bodies.len(), 1);
    assert_eq!(
        &AggregateTask::from_json(bodies[0].as_bytes()).unwrap(),
        original
    );
}

#[tokio::test]
async fn replay_refuses_what_does_not_exist_by_name() {
    use millrace_workflow_manager::ReplayTarget;
    let h = harness(100, 0.0, 50).await;
    let agg = h.config.aggregations[0].id.clone();
    let cases = [
        (
            ReplayTarget::Batch {
                aggregation: agg.clone(),
                batch: "no-such-batch".into(),
                partition: None,
            },
            "no-such-batch",
        ),
        (
            ReplayTarget::Batch {
                aggregation: "nope".into(),
                batch: "b".into(),
                partition: None,
            },
            "no aggregation \"nope\"",
        ),
        (
            ReplayTarget::Window {
                aggregation: agg.clone(),
                window: "20261123T1200Z-20261123T1230Z".into(),
            },
            "is not a window of aggregation",
        ),
        (
            ReplayTarget::Window {
                aggregation: agg.clone(),
                window: "yesterday".into(),
            },
            "yesterday",
        ),
    ];
    for (target, expect) in cases {
        let err = replayer(&h, "ops")
            .replay(&target, "r")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expect),
            "{target:?}: {err:?} should mention {expect:?}"
        );
    }
    assert!(drain_bodies(&h, &topics::intake(PREFIX, 0))
        .await
        .is_empty());
}

/// Every log line the test process writes, for the bounded-log checks below.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test process) a subscriber that keeps every log line in memory.
fn captured_log() -> CapturedLog {
    static LOG: std::sync::OnceLock<CapturedLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = CapturedLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other test in this binary installs a global subscriber");
        log
    })
    .clone()
}

/// The hostile corpus (tests/support/hostile.rs: fields of 1 KiB to 5 MiB, NUL bytes, invalid
/// UTF-8, 100,000-deep nesting, empty, bodies at and one byte over the worker's body limit, a
/// 100 KiB header) published with the in-memory bus's own `publish` onto both facilitators'
/// intake and aggregate topics and the collect topic while the whole fleet works through real
/// ingestion: every window's result is exact, each item lands exactly once on its topic's
/// `.rejected` with a bounded reason, and no log line carries more than a bounded slice of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_land_once_on_rejected_while_every_window_completes_exactly() {
    let log = captured_log();
    let h = harness(600, 0.05, 100).await;
    let limit = hostile::worker_limit(&h.bus.limits());
    let sent = hostile::corpus_for(PREFIX, &hostile::Broker::MEMORY, limit);
    let fleet = millrace::fleet::Fleet::start(
        h.config.clone(),
        h.bus.clone(),
        millrace::fleet::Stores {
            facilitators: h.stores.clone(),
            collector: h.collector.clone(),
        },
        &millrace::fleet::FleetSettings {
            topic_prefix: PREFIX.to_string(),
            ..Default::default()
        },
    )
    .unwrap();
    // The workflow-managers' first pass runs now: the corpus arrives among the real tasks.
    for s in &sent {
        for item in &s.items {
            h.bus
                .publish(
                    &s.topic,
                    Message {
                        body: item.body.clone(),
                        attributes: item.attributes.clone(),
                    },
                )
                .await
                .unwrap();
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut missing: Vec<String> = Vec::new();
    for e in &h.expectations.windows {
        let w = Window::parse(&e.window).unwrap();
        let key = result_key(&e.aggregation, w);
        let bytes = loop {
            if let Some(bytes) = h.collector.get(&key).await.unwrap() {
                break Some(bytes);
            }
            if tokio::time::Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match bytes {
            Some(bytes) => {
                let r = millrace_protocol::results::AggregationResult::from_json(&bytes).unwrap();
                assert!(
                    e.accepts(&r.result),
                    "{key}: {} differs from the plaintext {}",
                    r.result,
                    e.expected
                );
            }
            None => missing.push(key),
        }
    }
    fleet.stop().await;
    assert!(missing.is_empty(), "no result after 120 s: {missing:?}");
    let summary = hostile::check_rejected(
        h.bus.clone(),
        &sent,
        limit,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    println!("{}{}", hostile::describe(&sent), summary.join("\n"));
    let text = log.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let longest = text.split(|b| *b == b'\n').map(<[u8]>::len).max();
    assert!(
        longest.unwrap_or(0) <= 8 * 1024,
        "a log line of {longest:?} bytes (at most 8 KiB)"
    );
    assert!(
        text.len() <= 2 * 1024 * 1024,
        "{} bytes of log for one run (at most 2 MiB)",
        text.len()
    );
}

/// An in-memory object store that yields to the scheduler before every request, as a real store's
/// network round trip does, so that two joins running at once really interleave.
#[derive(Debug, Default)]
struct Yielding(object_store::memory::InMemory);

impl std::fmt::Display for Yielding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Yielding({})", self.0)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Yielding {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        tokio::task::yield_now().await;
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        tokio::task::yield_now().await;
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.0.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

/// The mill handling both parts' messages of a window at the same moment: the window succeeds
/// once — one `result-ready`, and `millrace_windows_succeeded_total` rises by one.
#[test]
fn both_parts_joined_at_once_count_the_window_once() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    // A current-thread runtime inside the local recorder's scope: every increment the joins make
    // happens on this thread, so it lands in this test's recorder and no other test's.
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut h = harness(300, 0.0, 50).await;
            h.collector =
                Store::from_object_store("memory://yielding", Arc::new(Yielding::default()));
            h.run_intake().await;
            for f in 0..2u8 {
                let agg = h.aggregator(f);
                for t in h.aggregate_tasks(f).await {
                    agg.aggregate(&t).await.unwrap();
                }
            }
            // Take the sum-part-ready messages off the bus; the mill is driven directly.
            h.drain(&topics::collect(PREFIX)).await;
            let mill = h.mill();
            let mut succeeded = 0;
            for e in &h.expectations.windows {
                let part = |facilitator| SumPartReady {
                    version: SUM_PART_READY_VERSION,
                    aggregation: e.aggregation.clone(),
                    aggregation_digest: h.digest(&e.aggregation),
                    window: e.window.clone(),
                    generation: 0,
                    facilitator,
                };
                let (m0, m1) = (part(0), part(1));
                let (a, b) = tokio::join!(mill.join(&m0), mill.join(&m1));
                let mut outcomes = vec![a, b];
                // The one that found the other announcing is retried, as the worker would.
                for outcome in outcomes.iter_mut() {
                    if matches!(outcome, Err(TaskError::Transient(_))) {
                        *outcome = mill.join(&m0).await;
                    }
                }
                let wins = outcomes
                    .iter()
                    .filter(|o| matches!(o, Ok(MillOutcome::Succeeded(_))))
                    .count();
                assert_eq!(wins, 1, "{}/{}: {outcomes:?}", e.aggregation, e.window);
                assert!(
                    outcomes.iter().all(|o| matches!(
                        o,
                        Ok(MillOutcome::Succeeded(_) | MillOutcome::AlreadyDone)
                    )),
                    "{outcomes:?}"
                );
                succeeded += 1;
            }
            assert!(succeeded > 0, "no window to join");
            let announced = h.drain(&topics::results(PREFIX)).await.len();
            assert_eq!(announced, succeeded, "one result-ready per window");
            let text = metrics.render();
            let counted: f64 = text
                .lines()
                .filter(|l| l.starts_with("millrace_windows_succeeded_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert_eq!(counted as usize, succeeded, "{text}");
        });
    });
}
