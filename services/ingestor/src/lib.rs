//! The ingestor: Millrace's front door for client reports, over HTTP.
//!
//! - `GET /aggregations/{id}/hpke-config` answers each facilitator's active HPKE keys (and the
//!   aggregation's VDAF and time precision), cacheable for `--hpke-config-max-age`, so clients
//!   seal to the right keys and pick up rotations.
//! - `POST /aggregations/{id}/reports` takes one report ([`REPORT_MEDIA_TYPE`]) or many
//!   ([`REPORT_LIST_MEDIA_TYPE`]), in the protocol crate's upload encoding
//!   ([`millrace_protocol::upload`]). Each report is checked (its aggregation, encoding, HPKE key
//!   ids, and time against its window, grace and the clock skew); any refusal is answered with a
//!   problem document naming what was wrong (see [`problem`]), and a body is taken whole or not
//!   at all. Accepted reports go through group commit ([`batcher`]): they are answered 201 only
//!   once the batch holding them is written create-only to **both** facilitators' stores.
//!
//! The ingestor keeps no state that another replica needs: batch ids are random, so any number of
//! replicas run side by side. A report id seen again in the same window by the same replica is
//! acknowledged and stored once; across replicas, the aggregate step drops it as `replayed`.
//!
//! On shutdown it stops admitting (503 with `Retry-After`), closes every open batch at once,
//! answers every admitted report, and only then stops serving.

pub mod batcher;
pub mod problem;

use std::collections::HashMap;

use millrace_runtime::zeroed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use millrace_protocol::config::{Aggregation, Config, ConfigError};
use millrace_protocol::layout::Window;
use millrace_protocol::parties::Validity;
use millrace_protocol::upload::{
    decode_upload, facilitator_hpke_entries, HpkeConfigDocument, UploadError, UploadReport,
};
pub use millrace_protocol::upload::{REPORT_LIST_MEDIA_TYPE, REPORT_MEDIA_TYPE};
use millrace_runtime::health::Readiness;
use millrace_runtime::Shutdown;
use millrace_store::Store;
use serde::Serialize;

use crate::batcher::{Admit, Batcher, Outcome, Wait};
use crate::problem::{Problem, ProblemKind};

fn duration(s: &str) -> Result<Duration, String> {
    millrace_runtime::cli::parse_duration(s)
}

/// Group commit, limits and caching. Each flag also reads its `MILLRACE_…` variable.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// A batch closes once it holds this many reports.
    #[arg(long, env = "MILLRACE_MAX_BATCH_REPORTS", default_value_t = 1000)]
    pub max_batch_reports: usize,
    /// A batch closes once its reports take this many bytes (64KiB, 4MiB, ...).
    #[arg(long, env = "MILLRACE_MAX_BATCH_BYTES", default_value = "4MiB", value_parser = millrace_runtime::cli::parse_bytes)]
    pub max_batch_bytes: usize,
    /// A batch closes this long after its first report, however few it holds: the latency
    /// bound of an upload when traffic is light.
    #[arg(long, env = "MILLRACE_MAX_BATCH_AGE", default_value = "1s", value_parser = duration)]
    pub max_batch_age: Duration,
    /// The largest upload body; a larger one is refused with 413.
    #[arg(long, env = "MILLRACE_MAX_BODY", default_value = "8MiB", value_parser = millrace_runtime::cli::parse_bytes)]
    pub max_body_bytes: usize,
    /// Reports admitted and not yet stored, at most; past it, uploads get 429.
    #[arg(long, env = "MILLRACE_MAX_PENDING_REPORTS", default_value_t = 100_000)]
    pub max_pending_reports: usize,
    /// Bytes of reports admitted and not yet stored, at most; past it, uploads get 429.
    #[arg(long, env = "MILLRACE_MAX_PENDING_BYTES", default_value = "256MiB", value_parser = millrace_runtime::cli::parse_bytes)]
    pub max_pending_bytes: usize,
    /// `Retry-After` of a 429 or 503.
    #[arg(long, env = "MILLRACE_RETRY_AFTER", default_value = "1s", value_parser = duration)]
    pub retry_after: Duration,
    /// Attempts at writing one batch copy to a store before its reports get 503.
    #[arg(long, env = "MILLRACE_STORE_ATTEMPTS", default_value_t = 3)]
    pub store_attempts: u32,
    /// Stored report ids one window remembers to acknowledge a repeat without storing it again;
    /// past it the window forgets them (a later repeat is stored again and dropped by the
    /// facilitators as `replayed`). About 50 bytes each.
    #[arg(long, env = "MILLRACE_MAX_REMEMBERED_IDS", default_value_t = 1_000_000)]
    pub max_remembered_ids: usize,
    /// How long clients may cache the HPKE config answer (`Cache-Control: max-age`). Keep it
    /// well below the facilitators' key rotation overlap.
    #[arg(long, env = "MILLRACE_HPKE_CONFIG_MAX_AGE", default_value = "5m", value_parser = duration)]
    pub hpke_config_max_age: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_batch_reports: 1000,
            max_batch_bytes: 4 << 20,
            max_batch_age: Duration::from_secs(1),
            max_body_bytes: 8 << 20,
            max_pending_reports: 100_000,
            max_pending_bytes: 256 << 20,
            retry_after: Duration::from_secs(1),
            store_attempts: 3,
            max_remembered_ids: 1_000_000,
            hpke_config_max_age: Duration::from_secs(300),
        }
    }
}

impl Settings {
    /// How long before its window closes past grace a report is still taken: the age limit of
    /// a batch plus 5 seconds to write it, so that a report answered 201 reaches the stores
    /// before the leader may decide its window.
    pub fn closing_margin_secs(&self) -> i64 {
        self.max_batch_age.as_secs_f64().ceil() as i64 + 5
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("ingestor {0:?} may not submit to any aggregation of this config")]
    NoAggregation(String),
    #[error("ingestor: {0}")]
    Invalid(String),
}

/// One aggregation as this ingestor serves it.
struct AggState {
    agg: Aggregation,
    digest: [u8; 32],
    /// Each facilitator's HPKE keys: id and validity.
    keys: [Vec<(u8, Validity)>; 2],
}

struct Inner {
    config: Arc<Config>,
    aggregations: HashMap<String, AggState>,
    settings: Settings,
    batcher: Arc<Batcher>,
}

/// The ingestor service; cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    inner: Arc<Inner>,
}

/// The body of a 201.
#[derive(Serialize)]
struct Accepted {
    /// Reports in the body.
    reports: usize,
    /// Of those, reports already stored or admitted before (acknowledged, stored once).
    duplicates: usize,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Ingestor {
    /// The ingestor `name` of `config`, writing to facilitator 0's and 1's stores. It serves the
    /// aggregations that list it among their ingestors, and signs with its newest signing key.
    pub fn new(
        config: Arc<Config>,
        name: &str,
        stores: [Store; 2],
        settings: Settings,
    ) -> Result<Self, IngestorError> {
        let signer = config.ingestor_signer(name)?;
        if settings.max_pending_bytes < settings.max_body_bytes {
            return Err(IngestorError::Invalid(format!(
                "max pending bytes ({}) must be at least the largest body ({})",
                settings.max_pending_bytes, settings.max_body_bytes
            )));
        }
        zeroed::counter("millrace_ingestor_overloaded_total", &[]);
        for facilitator in ["0", "1"] {
            zeroed::counter(
                "millrace_ingestor_store_errors_total",
                &[("facilitator", facilitator)],
            );
        }
        let mut aggregations = HashMap::new();
        for agg in config
            .aggregations
            .iter()
            .filter(|a| a.ingestors.iter().any(|i| i == name))
        {
            zeroed::counter(
                "millrace_ingestor_batches_failed_total",
                &[("aggregation", &agg.id)],
            );
            for problem in [ProblemKind::Overloaded, ProblemKind::Unavailable] {
                zeroed::counter(
                    "millrace_ingestor_refusals_total",
                    &[("aggregation", &agg.id), ("problem", problem.slug())],
                );
            }
            let mut keys: [Vec<(u8, Validity)>; 2] = [Vec::new(), Vec::new()];
            for (f, list) in keys.iter_mut().enumerate() {
                for k in facilitator_hpke_entries(&config, f as u8) {
                    let v = Validity::of(&k).map_err(|e| IngestorError::Invalid(e.to_string()))?;
                    list.push((k.id, v));
                }
            }
            aggregations.insert(
                agg.id.clone(),
                AggState {
                    digest: config.aggregation_digest(agg)?.0,
                    agg: agg.clone(),
                    keys,
                },
            );
        }
        if aggregations.is_empty() {
            return Err(IngestorError::NoAggregation(name.to_string()));
        }
        let batcher = Arc::new(Batcher::new(settings.clone(), signer, stores));
        Ok(Ingestor {
            inner: Arc::new(Inner {
                config,
                aggregations,
                settings,
                batcher,
            }),
        })
    }

    /// The HTTP API.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/aggregations/{id}/hpke-config", get(hpke_config))
            .route("/aggregations/{id}/reports", post(upload))
            .layer(DefaultBodyLimit::max(self.inner.settings.max_body_bytes))
            .with_state(self.clone())
    }

    /// Reports admitted and not yet answered.
    pub fn pending_reports(&self) -> usize {
        self.inner.batcher.pending_reports()
    }

    /// Stops admitting reports (503), writes every open batch now, and returns once every
    /// admitted report is answered.
    pub async fn close(&self) {
        self.inner.batcher.close().await;
    }

    fn aggregation(&self, id: &str) -> Result<&AggState, Problem> {
        self.inner.aggregations.get(id).ok_or_else(|| {
            Problem::new(
                ProblemKind::UnknownAggregation,
                format!("aggregation {id:?} is not one this ingestor takes reports for"),
            )
        })
    }

    /// Checks one report against its aggregation at `now`; returns what to admit.
    fn check(&self, a: &AggState, report: UploadReport, now: i64) -> Result<Admit, Problem> {
        let agg = &a.agg;
        if report.time.rem_euclid(agg.time_precision_secs) != 0 {
            return Err(Problem::new(
                ProblemKind::BadTime,
                format!(
                    "time {} is not a multiple of the aggregation's time precision ({} s): round \
                     it down",
                    report.time, agg.time_precision_secs
                ),
            ));
        }
        let window = Window::containing(report.time, agg.window_secs);
        let closes = window.end.saturating_add(agg.grace.as_secs() as i64);
        let margin = self.inner.settings.closing_margin_secs();
        if now.saturating_add(margin) >= closes {
            return Err(Problem::new(
                ProblemKind::ReportTooLate,
                format!(
                    "time {} is in window {}, which closes to new reports at {} (its end plus \
                     grace {}, less {margin} s to store it); now is {}",
                    Window::rfc3339(report.time),
                    window.name(),
                    Window::rfc3339(closes - margin),
                    humantime::format_duration(agg.grace),
                    Window::rfc3339(now)
                ),
            ));
        }
        let skew = agg.clock_skew.as_secs() as i64;
        if report.time > now.saturating_add(skew) {
            return Err(Problem::new(
                ProblemKind::ReportTooEarly,
                format!(
                    "time {} is later than now ({}) plus the clock skew ({})",
                    Window::rfc3339(report.time),
                    Window::rfc3339(now),
                    humantime::format_duration(agg.clock_skew)
                ),
            ));
        }
        // The batch is signed up to its age limit later (or at its window's start, for a report
        // from a fast clock): a key must still be valid then.
        let signed_by = now.saturating_add(margin).max(window.start);
        for (f, share) in report.shares.iter().enumerate() {
            let name = || {
                self.inner
                    .config
                    .facilitator_name(f as u8)
                    .unwrap_or("?")
                    .to_string()
            };
            match a.keys[f].iter().find(|(id, _)| *id == share.hpke_key_id) {
                None => {
                    return Err(Problem::new(
                        ProblemKind::OutdatedConfig,
                        format!(
                            "facilitator {f} ({}) has no HPKE key {}: fetch the HPKE config again",
                            name(),
                            share.hpke_key_id
                        ),
                    ))
                }
                Some((id, v)) if v.expired_at(signed_by) => {
                    return Err(Problem::new(
                        ProblemKind::OutdatedConfig,
                        format!(
                            "facilitator {f} ({})'s HPKE key {id} has expired (or expires before \
                             the report's batch is signed): fetch the HPKE config again",
                            name()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(Admit {
            aggregation: agg.id.clone(),
            digest: a.digest,
            window,
            closes,
            report,
        })
    }

    /// Checks, admits and waits for one upload body.
    async fn accept(
        &self,
        id: &str,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Response, Problem> {
        let a = self.aggregation(id)?;
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    ProblemKind::TooLarge,
                    format!(
                        "the body is larger than {} bytes: send fewer reports per request",
                        self.inner.settings.max_body_bytes
                    ),
                )
            } else {
                Problem::new(ProblemKind::Malformed, rejection.body_text())
            }
        })?;
        self.inner.batcher.shed(body.len())?;
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("(not text)"))
            .unwrap_or("(none)");
        let reports = decode_upload(media_type, &body).map_err(|e| match e {
            UploadError::MediaType { .. } => {
                Problem::new(ProblemKind::UnsupportedMediaType, e.to_string())
            }
            other => Problem::new(ProblemKind::Malformed, other.to_string()),
        })?;
        let bulk = reports.len() > 1 || media_type.contains(REPORT_LIST_MEDIA_TYPE);
        let n = reports.len();
        let now = now();
        let mut admits = Vec::with_capacity(n);
        for (index, report) in reports.into_iter().enumerate() {
            admits.push(
                self.check(a, report, now)
                    .map_err(|p| p.in_report(index, bulk))?,
            );
        }
        let admitted = self.inner.batcher.admit(admits, now)?;
        let retry = self.inner.settings.retry_after.as_secs().max(1);
        for wait in admitted.waits {
            let Wait::On(mut rx) = wait else { continue };
            let outcome = rx
                .wait_for(|o| *o != Outcome::Open)
                .await
                .map(|o| o.clone())
                .unwrap_or_else(|_| Outcome::Failed("the batch was dropped".to_string()));
            if let Outcome::Failed(error) = outcome {
                return Err(Problem::new(
                    ProblemKind::Unavailable,
                    format!("the report could not be stored ({error}); send it again"),
                )
                .retry_after(retry));
            }
        }
        metrics::counter!("millrace_ingestor_reports_accepted_total", "aggregation" => id.to_string())
            .increment(n as u64);
        if admitted.duplicates > 0 {
            metrics::counter!("millrace_ingestor_reports_duplicate_total", "aggregation" => id.to_string())
                .increment(admitted.duplicates as u64);
        }
        let body = serde_json::to_vec(&Accepted {
            reports: n,
            duplicates: admitted.duplicates,
        })
        .unwrap_or_default();
        Ok((
            StatusCode::CREATED,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response())
    }
}

fn refused(id: &str, problem: Problem) -> Response {
    metrics::counter!("millrace_ingestor_refusals_total", "aggregation" => id.to_string(), "problem" => problem.kind.slug())
        .increment(1);
    tracing::debug!(aggregation = %id, problem = %problem, "upload refused");
    problem.into_response()
}

async fn upload(
    State(ingestor): State<Ingestor>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match ingestor.accept(&id, &headers, body).await {
        Ok(response) => response,
        Err(problem) => refused(&id, problem),
    }
}

async fn hpke_config(State(ingestor): State<Ingestor>, Path(id): Path<String>) -> Response {
    let a = match ingestor.aggregation(&id) {
        Ok(a) => a,
        Err(problem) => return refused(&id, problem),
    };
    let doc = HpkeConfigDocument::from_config(&ingestor.inner.config, &a.agg, now())
        .map_err(|e| e.to_string())
        .and_then(|d| d.to_json().map_err(|e| e.to_string()));
    match doc {
        Ok(json) => {
            let cache = format!(
                "public, max-age={}",
                ingestor.inner.settings.hpke_config_max_age.as_secs()
            );
            let mut response = (StatusCode::OK, json).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = HeaderValue::from_str(&cache) {
                headers.insert(header::CACHE_CONTROL, v);
            }
            response
        }
        Err(error) => {
            tracing::error!(aggregation = %id, %error, "cannot build the HPKE config answer");
            refused(
                &id,
                Problem::new(
                    ProblemKind::Unavailable,
                    format!("the HPKE configs of aggregation {id:?} cannot be listed: {error}"),
                )
                .retry_after(ingestor.inner.settings.retry_after.as_secs()),
            )
        }
    }
}

/// Serves the API on `listener` until `shutdown`; then stops admitting, writes every open batch,
/// answers every admitted report and returns. `readiness` is true while reports are taken.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ingestor: Ingestor,
    readiness: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = ingestor.router();
    readiness.set_ready(true);
    let closing = {
        let ingestor = ingestor.clone();
        let readiness = readiness.clone();
        async move {
            shutdown.wait().await;
            readiness.set_ready(false);
            tracing::info!(
                pending = ingestor.pending_reports(),
                "shutting down: writing open batches"
            );
            ingestor.close().await;
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(closing)
        .await?;
    ingestor.close().await;
    tracing::info!("ingestor stopped; every admitted report answered");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn the_flag_defaults_are_the_documented_defaults() {
        let flags = Flags::try_parse_from(["ingestor"]).unwrap();
        assert_eq!(flags.settings, Settings::default());
    }
}
