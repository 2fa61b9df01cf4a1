//! The client library against a real ingestor (measurements in, batches both intake-workers
//! accept out), and against a scripted server for the retry rules: 503 and 429 are retried with
//! the same bytes, a refusal is returned at once with its problem, an outdated config is fetched
//! again.

#[path = "../../../services/ingestor/tests/support/fixture.rs"]
mod fixture;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use fixture::fixture;
use millrace_client::{Client, ClientError, ClientSettings};
use millrace_ingestor::Settings;
use millrace_protocol::crypto::hpke_generate;
use millrace_protocol::upload::{
    AggregationInfo, FacilitatorHpkeConfigs, HpkeConfig, HpkeConfigDocument, UploadReport, AEAD,
    HPKE_CONFIG_VERSION, KDF, KEM,
};
use millrace_protocol::vdaf::{Measurement, VdafSpec};
use millrace_store::Store;

fn quick() -> ClientSettings {
    ClientSettings {
        attempts: 3,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
        ..ClientSettings::default()
    }
}

#[tokio::test]
async fn submitted_measurements_end_in_batches_both_intake_workers_accept() {
    let f = fixture();
    let stores = [Store::memory(), Store::memory()];
    let settings = Settings {
        max_batch_reports: 1,
        ..Settings::default()
    };
    let running = f.start(stores.clone(), settings).await;
    let client = Client::new(&running.base).unwrap();
    for i in 0..5 {
        let receipt = client
            .submit("clicks", &Measurement::Count(i % 2 == 0))
            .await
            .unwrap();
        assert_eq!((receipt.reports, receipt.duplicates), (1, 0));
    }
    for v in [1, 50, 100] {
        client.submit("spend", &Measurement::Sum(v)).await.unwrap();
    }
    // A measurement that does not fit the aggregation is refused before anything is sent.
    assert!(matches!(
        client.submit("spend", &Measurement::Count(true)).await,
        Err(ClientError::Seal(_))
    ));
    // Bulk: sealed ahead, sent in one body; sending it again is acknowledged as duplicates.
    let config = client.aggregation("clicks").await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let reports: Vec<UploadReport> = (0..6)
        .map(|_| config.seal(&Measurement::Count(true), now).unwrap())
        .collect();
    assert!(reports.iter().all(|r| r.time % 60 == 0));
    let receipt = client.upload_many("clicks", &reports).await.unwrap();
    assert_eq!((receipt.reports, receipt.duplicates), (6, 0));
    let receipt = client.upload_many("clicks", &reports).await.unwrap();
    assert_eq!((receipt.reports, receipt.duplicates), (6, 6));

    assert_eq!(f.validate_all(&stores, "clicks").await, [11, 11]);
    assert_eq!(f.validate_all(&stores, "spend").await, [3, 3]);
    match client.submit("nope", &Measurement::Count(true)).await {
        Err(ClientError::Refused {
            status: 404,
            problem_type,
            ..
        }) => assert_eq!(problem_type, "urn:millrace:problem:unknown-aggregation"),
        other => panic!("{other:?}"),
    }
    running.shutdown.trigger();
    running.served.await.unwrap().unwrap();
}

/// A scripted ingestor: answers each POST with the next scripted status (then 201), and records
/// every body and how often the HPKE configs were fetched.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<Vec<(u16, &'static str)>>>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    config_fetches: Arc<Mutex<usize>>,
}

fn config_document() -> Vec<u8> {
    let facilitator = |index: u8, name: &str| FacilitatorHpkeConfigs {
        index,
        name: name.to_string(),
        configs: vec![HpkeConfig {
            id: 3,
            kem: KEM.to_string(),
            kdf: KDF.to_string(),
            aead: AEAD.to_string(),
            public_key: hpke_generate().1.to_hex(),
            expires: None,
        }],
    };
    HpkeConfigDocument {
        version: HPKE_CONFIG_VERSION,
        aggregation: AggregationInfo {
            id: "clicks".to_string(),
            vdaf: VdafSpec::Count {},
            time_precision_secs: 60,
        },
        facilitators: vec![facilitator(0, "alpha"), facilitator(1, "beta")],
    }
    .to_json()
    .unwrap()
}

async fn scripted_config(State(s): State<Script>) -> Response {
    *s.config_fetches.lock().unwrap() += 1;
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "max-age=3600")],
        config_document(),
    )
        .into_response()
}

async fn scripted_upload(State(s): State<Script>, body: Bytes) -> Response {
    s.bodies.lock().unwrap().push(body.to_vec());
    let next = {
        let mut answers = s.answers.lock().unwrap();
        (!answers.is_empty()).then(|| answers.remove(0))
    };
    match next {
        None => (StatusCode::CREATED, r#"{"reports":1,"duplicates":0}"#).into_response(),
        Some((status, kind)) => {
            let problem = format!(
                r#"{{"type":"urn:millrace:problem:{kind}","title":"t","status":{status},"detail":"scripted {kind}"}}"#
            );
            (
                StatusCode::from_u16(status).unwrap(),
                [
                    (header::CONTENT_TYPE, "application/problem+json"),
                    (header::RETRY_AFTER, "0"),
                ],
                problem,
            )
                .into_response()
        }
    }
}

async fn scripted(answers: Vec<(u16, &'static str)>) -> (String, Script) {
    let script = Script {
        answers: Arc::new(Mutex::new(answers)),
        ..Script::default()
    };
    let app = Router::new()
        .route("/aggregations/clicks/hpke-config", get(scripted_config))
        .route("/aggregations/clicks/reports", post(scripted_upload))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, script)
}

#[tokio::test]
async fn overload_and_unavailability_are_retried_with_the_same_report() {
    let (base, script) = scripted(vec![(503, "unavailable"), (429, "overloaded")]).await;
    let client = Client::with_settings(&base, quick()).unwrap();
    let receipt = client
        .submit("clicks", &Measurement::Count(true))
        .await
        .unwrap();
    assert_eq!(receipt.reports, 1);
    let bodies = script.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3);
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "a retry changed the report"
    );
    assert_eq!(*script.config_fetches.lock().unwrap(), 1);
}

#[tokio::test]
async fn the_client_gives_up_after_its_tries_naming_the_last_answer() {
    let (base, script) = scripted(vec![(503, "unavailable"); 5]).await;
    let client = Client::with_settings(&base, quick()).unwrap();
    match client.submit("clicks", &Measurement::Count(true)).await {
        Err(ClientError::GaveUp { attempts, last, .. }) => {
            assert_eq!(attempts, 3);
            assert!(
                last.contains("503") && last.contains("scripted unavailable"),
                "{last}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(script.bodies.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_refusal_is_returned_at_once_with_its_problem() {
    let (base, script) = scripted(vec![(400, "report-too-late")]).await;
    let client = Client::with_settings(&base, quick()).unwrap();
    match client.submit("clicks", &Measurement::Count(true)).await {
        Err(ClientError::Refused {
            status,
            problem_type,
            detail,
            ..
        }) => {
            assert_eq!(status, 400);
            assert_eq!(problem_type, "urn:millrace:problem:report-too-late");
            assert_eq!(detail, "scripted report-too-late");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(script.bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_outdated_config_is_fetched_again_and_a_new_report_sealed() {
    let (base, script) = scripted(vec![(400, "outdated-config")]).await;
    let client = Client::with_settings(&base, quick()).unwrap();
    client
        .submit("clicks", &Measurement::Count(true))
        .await
        .unwrap();
    assert_eq!(*script.config_fetches.lock().unwrap(), 2);
    let bodies = script.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2);
    let ids: Vec<[u8; 16]> = bodies
        .iter()
        .map(|b| UploadReport::decode(b).unwrap().report_id)
        .collect();
    assert_ne!(ids[0], ids[1]);
}
