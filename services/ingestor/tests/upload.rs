//! The ingestor from the outside: a plain HTTP client (reqwest, not the client library) fetches
//! the HPKE configs, seals reports itself and uploads them. What gets 201 must be in a batch in
//! both stores that both facilitators' intake-workers accept; every refusal must carry its status
//! and a problem document naming what was wrong. No test waits on a clock: batches close by size,
//! or by an explicit shutdown.

#[path = "support/fixture.rs"]
mod fixture;

use std::sync::Arc;
use std::time::Duration;

use fixture::{fixture, now, partition_of_key, Fixture, Running};
use millrace_ingestor::Settings;
use millrace_protocol::layout::{Partition, Window};
use millrace_protocol::upload::{
    encode_report_list, new_report_id, seal_report, HpkeConfigDocument, UploadReport,
    REPORT_LIST_MEDIA_TYPE, REPORT_MEDIA_TYPE,
};
use millrace_protocol::vdaf::Measurement;
use millrace_store::Store;
use serde_json::Value;

async fn hpke_config(base: &str, aggregation: &str) -> HpkeConfigDocument {
    let response = reqwest::get(format!("{base}/aggregations/{aggregation}/hpke-config"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    HpkeConfigDocument::from_json(&response.bytes().await.unwrap()).unwrap()
}

/// A Count report of `value` made at `time` (rounded to the time precision).
fn report(doc: &HpkeConfigDocument, time: i64, value: bool) -> UploadReport {
    let keys = [doc.sealing_key(0).unwrap(), doc.sealing_key(1).unwrap()];
    seal_report(
        &doc.aggregation.id,
        &doc.vdaf().unwrap(),
        new_report_id(),
        doc.report_time(time),
        &Measurement::Count(value),
        [(keys[0].0, &keys[0].1), (keys[1].0, &keys[1].1)],
    )
    .unwrap()
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    content_type: String,
    json: Value,
}

async fn post(base: &str, aggregation: &str, content_type: &str, body: Vec<u8>) -> Answer {
    let response = reqwest::Client::new()
        .post(format!("{base}/aggregations/{aggregation}/reports"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type").unwrap_or_default();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
    Answer {
        status,
        retry_after,
        content_type,
        json,
    }
}

async fn post_one(base: &str, r: &UploadReport) -> Answer {
    post(base, "clicks", REPORT_MEDIA_TYPE, r.encode().unwrap()).await
}

/// Checks a refusal: its status, its problem type, and words its detail must contain.
fn assert_problem(a: &Answer, status: u16, slug: &str, detail: &[&str]) {
    assert_eq!(a.status, status, "{}", a.json);
    assert_eq!(a.content_type, "application/problem+json");
    assert_eq!(a.json["type"], format!("urn:millrace:problem:{slug}"));
    assert_eq!(a.json["status"], status);
    assert!(a.json["title"].as_str().is_some_and(|t| !t.is_empty()));
    let text = a.json["detail"].as_str().unwrap();
    for word in detail {
        assert!(text.contains(word), "{text:?} should mention {word:?}");
    }
}

fn memory_stores() -> [Store; 2] {
    [Store::memory(), Store::memory()]
}

/// Batches close by size (or shutdown): the age limit is far longer than any test takes. (It
/// also decides how long before its window closes a report is refused: 65 s here.)
fn by_size(reports: usize) -> Settings {
    Settings {
        max_batch_reports: reports,
        max_batch_age: Duration::from_secs(60),
        ..Settings::default()
    }
}

async fn stop(running: Running) {
    running.shutdown.trigger();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_hpke_config_lists_each_facilitators_active_keys_and_is_cacheable() {
    let f = fixture();
    let running = f.start(memory_stores(), Settings::default()).await;
    let response = reqwest::get(format!("{}/aggregations/clicks/hpke-config", running.base))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["cache-control"].to_str().unwrap(),
        "public, max-age=300"
    );
    let doc = HpkeConfigDocument::from_json(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(doc.aggregation.id, "clicks");
    assert_eq!(doc.aggregation.time_precision_secs, 60);
    // Key 1 of alpha expired in 2021: only key 2 is offered.
    let ids: Vec<Vec<u8>> = doc
        .facilitators
        .iter()
        .map(|f| f.configs.iter().map(|c| c.id).collect())
        .collect();
    assert_eq!(ids, [vec![2], vec![5]]);
    assert_eq!(
        doc.facilitators[0].configs[0].kem,
        "DHKEM(X25519, HKDF-SHA256)"
    );
    let missing = reqwest::get(format!("{}/aggregations/nope/hpke-config", running.base))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    stop(running).await;
}

#[tokio::test]
async fn uploaded_reports_land_in_batches_both_intake_workers_accept() {
    let f = fixture();
    let stores = memory_stores();
    let running = f.start(stores.clone(), by_size(4)).await;
    let doc = hpke_config(&running.base, "clicks").await;
    let t = now();
    // A bulk body of 4 fills one batch; 4 single uploads in parallel fill another.
    let bulk: Vec<UploadReport> = (0..4).map(|i| report(&doc, t, i % 2 == 0)).collect();
    let a = post(
        &running.base,
        "clicks",
        REPORT_LIST_MEDIA_TYPE,
        encode_report_list(&bulk).unwrap(),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.json);
    assert_eq!(a.json["reports"], 4);
    assert_eq!(a.json["duplicates"], 0);
    let singles: Vec<UploadReport> = (0..4).map(|_| report(&doc, t, true)).collect();
    let answers = futures_join(&running.base, &singles).await;
    assert!(answers.iter().all(|s| *s == 201), "{answers:?}");

    for store in &stores {
        let batches = f.batches(store, "clicks").await;
        assert_eq!(batches.len(), 2);
        for (key, batch) in &batches {
            // The batch's time is in the window of its reports and in the partition it is
            // stored under.
            assert_eq!(partition_of_key("clicks", key), Partition::of(batch.time));
            let w = Window::containing(t, 3600);
            assert!(batch.time >= w.start && batch.time < w.end);
            assert_eq!(batch.reports.len(), 4);
        }
    }
    assert_eq!(f.validate_all(&stores, "clicks").await, [8, 8]);
    stop(running).await;
}

/// Uploads each report in its own request, all at once; returns the statuses.
async fn futures_join(base: &str, reports: &[UploadReport]) -> Vec<u16> {
    let mut tasks = Vec::new();
    for r in reports {
        let (base, r) = (base.to_string(), r.clone());
        tasks.push(tokio::spawn(
            async move { post_one(&base, &r).await.status },
        ));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn every_refusal_has_its_status_and_a_problem_naming_what_was_wrong() {
    let f = fixture();
    let stores = memory_stores();
    let settings = Settings {
        max_body_bytes: 64 << 10,
        ..by_size(1)
    };
    let running = f.start(stores.clone(), settings).await;
    let base = running.base.as_str();
    let doc = hpke_config(base, "clicks").await;
    let t = now();
    let good = report(&doc, t, true);

    let a = post(base, "nope", REPORT_MEDIA_TYPE, good.encode().unwrap()).await;
    assert_problem(&a, 404, "unknown-aggregation", &["\"nope\""]);

    let a = post(
        base,
        "clicks",
        "application/octet-stream",
        good.encode().unwrap(),
    )
    .await;
    assert_problem(&a, 415, "unsupported-media-type", &[REPORT_MEDIA_TYPE]);

    let bytes = good.encode().unwrap();
    let a = post(base, "clicks", REPORT_MEDIA_TYPE, bytes[..40].to_vec()).await;
    assert_problem(&a, 400, "malformed-report", &["report 0", "truncated"]);

    let mut versioned = bytes.clone();
    versioned[0] = 9;
    let a = post(base, "clicks", REPORT_MEDIA_TYPE, versioned).await;
    assert_problem(&a, 400, "malformed-report", &["version 9"]);

    let mut list = encode_report_list(&[good.clone(), good.clone()]).unwrap();
    list.push(0);
    let a = post(base, "clicks", REPORT_LIST_MEDIA_TYPE, list).await;
    assert_problem(&a, 400, "malformed-report", &["1 trailing bytes"]);

    let a = post(base, "clicks", REPORT_MEDIA_TYPE, vec![1; 100 << 10]).await;
    assert_problem(&a, 413, "too-large", &["65536 bytes"]);

    let mut unknown_key = good.clone();
    unknown_key.shares[1].hpke_key_id = 9;
    let a = post_one(base, &unknown_key).await;
    assert_problem(
        &a,
        400,
        "outdated-config",
        &["facilitator 1 (beta)", "no HPKE key 9"],
    );

    let mut expired_key = good.clone();
    expired_key.shares[0].hpke_key_id = 1;
    let a = post_one(base, &expired_key).await;
    assert_problem(
        &a,
        400,
        "outdated-config",
        &["facilitator 0 (alpha)", "key 1 has expired"],
    );

    let late = report(&doc, t - 3 * 3600, true);
    let a = post_one(base, &late).await;
    assert_problem(&a, 400, "report-too-late", &["closes to new reports"]);

    let early = report(&doc, t + 2 * 3600, true);
    let a = post_one(base, &early).await;
    assert_problem(&a, 400, "report-too-early", &["clock skew"]);

    let mut unrounded = good.clone();
    unrounded.time += 1;
    let a = post_one(base, &unrounded).await;
    assert_problem(&a, 400, "bad-time", &["time precision (60 s)"]);

    // One bad report refuses the whole body, naming it; nothing of it is stored.
    let body = encode_report_list(&[good.clone(), report(&doc, t, false), late]).unwrap();
    let a = post(base, "clicks", REPORT_LIST_MEDIA_TYPE, body).await;
    assert_problem(&a, 400, "report-too-late", &["report 2: "]);

    for store in &stores {
        assert!(f.batches(store, "clicks").await.is_empty());
    }
    // The good report itself is taken afterwards: nothing above admitted it.
    let a = post_one(base, &good).await;
    assert_eq!(a.status, 201, "{}", a.json);
    assert_eq!(a.json["duplicates"], 0);
    stop(running).await;
}

#[tokio::test]
async fn a_duplicate_report_is_acknowledged_and_stored_once() {
    let f = fixture();
    let stores = memory_stores();
    let running = f.start(stores.clone(), by_size(1)).await;
    let doc = hpke_config(&running.base, "clicks").await;
    let r = report(&doc, now(), true);
    let first = post_one(&running.base, &r).await;
    assert_eq!(first.status, 201, "{}", first.json);
    assert_eq!(first.json["duplicates"], 0);
    let again = post_one(&running.base, &r).await;
    assert_eq!(again.status, 201, "{}", again.json);
    assert_eq!(again.json["duplicates"], 1);
    // Twice more in one body, next to a new report.
    let other = report(&doc, now(), false);
    let body = encode_report_list(&[r.clone(), other.clone(), r.clone()]).unwrap();
    let a = post(&running.base, "clicks", REPORT_LIST_MEDIA_TYPE, body).await;
    assert_eq!(a.status, 201, "{}", a.json);
    assert_eq!(a.json["reports"], 3);
    assert_eq!(a.json["duplicates"], 2);

    for store in &stores {
        let ids: Vec<_> = f
            .batches(store, "clicks")
            .await
            .into_iter()
            .flat_map(|(_, b)| b.reports.into_iter().map(|r| r.report_id))
            .collect();
        assert_eq!(ids.iter().filter(|id| **id == r.report_id).count(), 1);
        assert_eq!(ids.len(), 2, "the report and the other one, once each");
    }
    assert_eq!(f.validate_all(&stores, "clicks").await, [2, 2]);
    stop(running).await;
}

#[tokio::test]
async fn a_busy_window_forgets_stored_ids_past_its_limit_and_a_later_repeat_is_stored_again() {
    let f = fixture();
    let stores = memory_stores();
    let running = f
        .start(
            stores.clone(),
            Settings {
                max_remembered_ids: 2,
                ..by_size(1)
            },
        )
        .await;
    let doc = hpke_config(&running.base, "clicks").await;
    let reports: Vec<_> = (0..3).map(|i| report(&doc, now(), i % 2 == 0)).collect();
    for r in &reports[..2] {
        assert_eq!(post_one(&running.base, r).await.status, 201);
    }
    // Two stored ids, within the limit: a repeat is acknowledged, not stored.
    assert_eq!(
        post_one(&running.base, &reports[0]).await.json["duplicates"],
        1
    );
    // The third stored id passes the limit: the window forgets them all, so the same repeat
    // is now stored a second time (the facilitators drop it as `replayed`).
    assert_eq!(post_one(&running.base, &reports[2]).await.status, 201);
    let again = post_one(&running.base, &reports[0]).await;
    assert_eq!(again.status, 201, "{}", again.json);
    assert_eq!(again.json["duplicates"], 0);
    for store in &stores {
        let copies = f
            .batches(store, "clicks")
            .await
            .into_iter()
            .flat_map(|(_, b)| b.reports.into_iter().map(|r| r.report_id))
            .filter(|id| *id == reports[0].report_id)
            .count();
        assert_eq!(copies, 2);
    }
    stop(running).await;
}

#[tokio::test]
async fn created_is_answered_only_once_both_stores_hold_the_batch() {
    use object_store::memory::InMemory;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    let f = fixture();
    // Facilitator 1's store takes a while to write: a 201 sent after the first store alone
    // would be caught by the reads below.
    let slow = ThrottledStore::new(
        InMemory::new(),
        ThrottleConfig {
            wait_put_per_call: Duration::from_millis(300),
            ..ThrottleConfig::default()
        },
    );
    let stores = [
        Store::memory(),
        Store::from_object_store("memory://slow", Arc::new(slow)),
    ];
    let running = f.start(stores.clone(), by_size(1)).await;
    let doc = hpke_config(&running.base, "clicks").await;
    for _ in 0..3 {
        let r = report(&doc, now(), true);
        let a = post_one(&running.base, &r).await;
        assert_eq!(a.status, 201, "{}", a.json);
        for store in &stores {
            let held = f
                .batches(store, "clicks")
                .await
                .into_iter()
                .any(|(_, b)| b.reports.iter().any(|x| x.report_id == r.report_id));
            assert!(held, "201 before {} held the report", store.url());
        }
    }
    stop(running).await;
}

#[tokio::test]
async fn a_store_that_refuses_the_batch_gets_503_and_the_retry_is_stored() {
    let f = fixture();
    let broken = tempfile::tempdir().unwrap();
    // `ingestion` is a plain file where the store needs a directory: every batch write fails.
    std::fs::write(broken.path().join("ingestion"), "not a directory").unwrap();
    let url = format!("file://{}", broken.path().display());
    let stores = [Store::memory(), Store::open(&url).unwrap()];
    let settings = Settings {
        store_attempts: 1,
        ..by_size(1)
    };
    let running = f.start(stores.clone(), settings).await;
    let doc = hpke_config(&running.base, "clicks").await;
    let r = report(&doc, now(), true);
    let a = post_one(&running.base, &r).await;
    assert_problem(
        &a,
        503,
        "unavailable",
        &["could not be stored", "facilitator 1"],
    );
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    // The store recovers; the client's retry of the same report is stored, not taken for a
    // duplicate of the copy that failed.
    std::fs::remove_file(broken.path().join("ingestion")).unwrap();
    let a = post_one(&running.base, &r).await;
    assert_eq!(a.status, 201, "{}", a.json);
    assert_eq!(a.json["duplicates"], 0);
    stop(running).await;
}

#[tokio::test]
async fn overload_is_refused_with_429_and_shutdown_answers_what_was_admitted() {
    let f: Fixture = fixture();
    let stores = memory_stores();
    let settings = Settings {
        max_pending_reports: 1,
        ..by_size(100)
    };
    let running = f.start(stores.clone(), settings).await;
    let doc = hpke_config(&running.base, "clicks").await;
    let first = report(&doc, now(), true);
    let waiting = {
        let (base, r) = (running.base.clone(), first.clone());
        tokio::spawn(async move { post_one(&base, &r).await })
    };
    // Until the first report is admitted (its batch stays open: 100 reports, a minute).
    while running.ingestor.pending_reports() == 0 {
        assert!(
            !waiting.is_finished(),
            "the first upload was answered at once"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a = post_one(&running.base, &report(&doc, now(), true)).await;
    assert_problem(&a, 429, "overloaded", &["1 reports", "limit of 1 reports"]);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert!(f.batches(&stores[0], "clicks").await.is_empty());
    // Shed before decoding: while the budget is spent even a malformed body costs nothing but
    // a 429 (not a 400 naming what is wrong with it).
    let garbage = post(&running.base, "clicks", REPORT_MEDIA_TYPE, vec![0xff; 64]).await;
    assert_problem(&garbage, 429, "overloaded", &["limit of 1 reports"]);

    // Shutdown writes the open batch and answers it before the server stops.
    assert!(running.readiness.is_ready());
    running.shutdown.trigger();
    let answered = waiting.await.unwrap();
    assert_eq!(answered.status, 201, "{}", answered.json);
    running.served.await.unwrap().unwrap();
    for store in &stores {
        assert_eq!(f.batches(store, "clicks").await.len(), 1);
    }
}

#[tokio::test]
async fn a_closing_ingestor_refuses_new_reports_with_503() {
    let f = fixture();
    let running = f.start(memory_stores(), by_size(1)).await;
    let doc = hpke_config(&running.base, "clicks").await;
    running.ingestor.close().await;
    let a = post_one(&running.base, &report(&doc, now(), true)).await;
    assert_problem(&a, 503, "unavailable", &["shutting down"]);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    stop(running).await;
}
