//! `millrace dead-letters` on the pipeline (in-memory bus, one process): intake tasks that really
//! fail until the worker loop dead-letters them, and, once the cause is fixed, a redrive that
//! makes them complete, with every window's result exact.

#[path = "support/harness.rs"]
mod harness;

use harness::{now, Harness, PREFIX};

use std::sync::Arc;
use std::time::Duration;

use millrace::dead_letters::{run, Action};
use millrace::demo::past_span;
use millrace::ingest::{ingest, IngestPlan};
use millrace_bus::dead_letters::{ScanOptions, Selection};
use millrace_bus::{dead_topic, Bus, INSPECT_GROUP};
use millrace_protocol::layout::{result_key, Window};
use millrace_protocol::tasks::{topics, IntakeTask, TaskMessage};
use millrace_runtime::{run_worker, Shutdown, WorkerConfig, WorkerReport};
use millrace_store::Store;

/// Quick scans: the memory bus hands a released message back at once.
fn scan() -> ScanOptions {
    ScanOptions {
        idle: Duration::from_millis(300),
        max_wait: Duration::from_secs(10),
        limit: 1000,
        release_delay: Duration::from_millis(1),
    }
}

/// Runs facilitator 0's intake-worker (two attempts, quick retries) until `done`, then stops it.
async fn intake_worker_0(h: &Harness, done: impl AsyncFn() -> bool) -> WorkerReport {
    let mut config = WorkerConfig::new(topics::intake(PREFIX, 0), "intake-worker-0");
    config.max_attempts = 2;
    config.backoff_base = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(20);
    let shutdown = Shutdown::new();
    let worker = tokio::spawn(run_worker(
        h.bus.clone(),
        config,
        Arc::new(h.intake(0)),
        shutdown.clone(),
    ));
    let mut finished = false;
    for _ in 0..400 {
        if done().await {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    shutdown.trigger();
    let report = worker.await.unwrap().unwrap();
    assert!(finished, "the worker did not get there: {report:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_intake_tasks_complete_after_a_redrive_with_exact_results() {
    // Facilitator 1's store is a local directory, so that it can really become unwritable.
    let dir = tempfile::tempdir().unwrap();
    let beta_root = dir.path().join("beta");
    let beta = Store::open(&format!("file://{}", beta_root.display())).unwrap();
    let mut h = harness::harness_on([Store::memory(), beta]);
    let (start, end) = past_span(now());
    h.expectations = ingest(
        &h.config,
        millrace::keygen::INGESTOR,
        [&h.stores[0], &h.stores[1]],
        &IngestPlan {
            reports: 300,
            invalid_fraction: 0.0,
            batch_size: 100,
            start,
            end,
        },
        |_| {},
    )
    .await
    .unwrap();
    let batches = h.batch_count().await;
    assert!(batches >= 2, "{batches}");
    let topic = topics::intake(PREFIX, 0);
    let dead = dead_topic(&topic);
    // As the services do at start-up: `.dead` has its inspect group, so what lands there is kept.
    h.bus
        .create_topic(&dead, Some(INSPECT_GROUP))
        .await
        .unwrap();

    // Facilitator 1 validates its side while its store is still fine.
    h.wm(1, "wm-1").run_once(now()).await.unwrap();
    let intake1 = h.intake(1);
    for d in h.drain(&topics::intake(PREFIX, 1)).await {
        intake1
            .validate(&IntakeTask::from_json(&d.body).unwrap())
            .await
            .unwrap();
        d.ack().await.unwrap();
    }

    // Then facilitator 1's store breaks (its directory is now a plain file): facilitator 0's
    // intake-worker validates each batch but cannot write the peer's copy, a transient store
    // error, until its attempts are used up and the task is dead-lettered.
    std::fs::rename(&beta_root, dir.path().join("beta.away")).unwrap();
    std::fs::write(&beta_root, b"not a directory").unwrap();
    h.wm(0, "wm-0").run_once(now()).await.unwrap();
    let report = intake_worker_0(&h, async || {
        run(&*h.bus, &topic, &Action::List, &scan())
            .await
            .is_ok_and(|o| o.text.starts_with(&format!("{dead}: {batches} message(s)")))
    })
    .await;
    assert_eq!(
        (report.dead, report.succeeded),
        (batches as u64, 0),
        "{report:?}"
    );

    // Listed (twice: a listing consumes nothing), with the reason and attempt.
    let listing = millrace_bus::dead_letters::list(&*h.bus, &dead, &scan())
        .await
        .unwrap();
    assert!(listing.complete);
    assert_eq!(listing.letters.len(), batches);
    for letter in &listing.letters {
        assert_eq!(letter.attempt(), Some("2"), "{letter:?}");
        assert_eq!(letter.origin(), Some(topic.as_str()));
        assert!(letter.reason().is_some_and(|r| !r.is_empty()), "{letter:?}");
        IntakeTask::from_json(&letter.body).unwrap();
    }
    let again = millrace_bus::dead_letters::list(&*h.bus, &topic, &scan())
        .await
        .unwrap();
    assert_eq!(again.letters.len(), batches);
    let first = &listing.letters[0];
    let shown = run(
        &*h.bus,
        &topic,
        &Action::Show(Selection::Id(first.id.clone())),
        &scan(),
    )
    .await
    .unwrap();
    assert!(shown
        .text
        .contains(&String::from_utf8_lossy(&first.body).into_owned()));
    assert!(shown.text.contains("millrace-reason = "), "{}", shown.text);

    // A dry run changes nothing.
    let dry = run(
        &*h.bus,
        &topic,
        &Action::Redrive {
            which: Selection::All,
            dry_run: true,
        },
        &scan(),
    )
    .await
    .unwrap();
    assert!(dry.ok, "{}", dry.text);
    assert!(
        dry.text.contains(&format!("{batches} would redrive")),
        "{}",
        dry.text
    );
    assert!(h.drain(&topic).await.is_empty(), "a dry run published");
    let unchanged = millrace_bus::dead_letters::list(&*h.bus, &dead, &scan())
        .await
        .unwrap();
    assert_eq!(unchanged.letters.len(), batches);

    // The cause is fixed; redrive all of them and the worker completes them.
    std::fs::remove_file(&beta_root).unwrap();
    std::fs::rename(dir.path().join("beta.away"), &beta_root).unwrap();
    let redriven = run(
        &*h.bus,
        &dead,
        &Action::Redrive {
            which: Selection::All,
            dry_run: false,
        },
        &scan(),
    )
    .await
    .unwrap();
    assert!(redriven.ok, "{}", redriven.text);
    assert!(
        redriven
            .text
            .contains(&format!("{batches} redrove, 0 refused")),
        "{}",
        redriven.text
    );
    let left = millrace_bus::dead_letters::list(&*h.bus, &dead, &scan())
        .await
        .unwrap();
    assert!(left.letters.is_empty(), "{:?}", left.letters);
    let report = intake_worker_0(&h, async || {
        h.stores[1].list("validation/").await.unwrap().len() == 2 * batches
    })
    .await;
    assert_eq!(
        (report.succeeded, report.dead),
        (batches as u64, 0),
        "{report:?}"
    );

    // Every window's result is exact.
    h.complete(now()).await;
    assert!(!h.expectations.windows.is_empty());
    for e in &h.expectations.windows {
        let w = Window::parse(&e.window).unwrap();
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
