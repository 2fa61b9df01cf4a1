//! A real OTLP/HTTP trace receiver for tests: an HTTP endpoint on a loopback port that decodes
//! what the services export (`POST /v1/traces`, protobuf) and keeps every span with its
//! service's name. Services find it through `OTEL_EXPORTER_OTLP_ENDPOINT`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

/// One received span, its ids in hex.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    /// OTLP's span kind: 4 producer, 5 consumer.
    pub kind: i32,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// The trace ids this span links to.
    pub links: Vec<String>,
    pub attributes: BTreeMap<String, String>,
}

pub const PRODUCER: i32 = 4;
pub const CONSUMER: i32 = 5;

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
pub struct Received {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Bodies that were not OTLP protobuf (counted: the test fails on any).
    undecodable: Arc<Mutex<Vec<String>>>,
}

impl Received {
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
    pub fn undecodable(&self) -> Vec<String> {
        self.undecodable
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

fn text(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

async fn traces(State(received): State<Received>, body: Bytes) -> StatusCode {
    let request = match ExportTraceServiceRequest::decode(body.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            if let Ok(mut bad) = received.undecodable.lock() {
                bad.push(format!("{} bytes: {e}", body.len()));
            }
            return StatusCode::BAD_REQUEST;
        }
    };
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    kind: span.kind,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| hex::encode(&l.trace_id))
                        .collect(),
                    attributes: text(&span.attributes),
                });
            }
        }
    }
    if let Ok(mut spans) = received.spans.lock() {
        spans.extend(out);
    }
    StatusCode::OK
}

/// Starts the receiver on `runtime`; returns its base URL (`http://127.0.0.1:PORT`) and what it
/// receives.
pub fn start(runtime: &tokio::runtime::Runtime) -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(received.clone());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the OTLP receiver");
    let addr = listener.local_addr().expect("the receiver's address");
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), received)
}
