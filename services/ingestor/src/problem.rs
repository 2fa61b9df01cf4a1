//! Problem documents (RFC 9457): every refusal the ingestor answers, with its status, a stable
//! `type` a client can match on, and a `detail` naming what was wrong (the report's index in a
//! bulk body, the key id, the window).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The media type of a problem document.
pub const PROBLEM_MEDIA_TYPE: &str = "application/problem+json";

/// What went wrong, one variant per `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    UnknownAggregation,
    UnsupportedMediaType,
    Malformed,
    TooLarge,
    /// The share names an HPKE key the facilitator does not have, or one that has expired (DAP's
    /// `outdatedConfig`): fetch the HPKE config again.
    OutdatedConfig,
    /// The report's window closed (past its grace) before it could be stored.
    ReportTooLate,
    /// The report's time is later than now plus the aggregation's clock skew.
    ReportTooEarly,
    /// The report's time is not a multiple of the aggregation's time precision.
    BadTime,
    /// Too many reports waiting to be stored: retry after `Retry-After`.
    Overloaded,
    /// Shutting down, or the stores did not take the batch: retry after `Retry-After`.
    Unavailable,
}

impl ProblemKind {
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::UnknownAggregation => StatusCode::NOT_FOUND,
            ProblemKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProblemKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ProblemKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::Malformed
            | ProblemKind::OutdatedConfig
            | ProblemKind::ReportTooLate
            | ProblemKind::ReportTooEarly
            | ProblemKind::BadTime => StatusCode::BAD_REQUEST,
        }
    }

    /// The last part of the `type` URI, and the `problem` label in metrics.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::UnknownAggregation => "unknown-aggregation",
            ProblemKind::UnsupportedMediaType => "unsupported-media-type",
            ProblemKind::Malformed => "malformed-report",
            ProblemKind::TooLarge => "too-large",
            ProblemKind::OutdatedConfig => "outdated-config",
            ProblemKind::ReportTooLate => "report-too-late",
            ProblemKind::ReportTooEarly => "report-too-early",
            ProblemKind::BadTime => "bad-time",
            ProblemKind::Overloaded => "overloaded",
            ProblemKind::Unavailable => "unavailable",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::UnknownAggregation => "Unknown aggregation",
            ProblemKind::UnsupportedMediaType => "Unsupported media type",
            ProblemKind::Malformed => "Malformed report",
            ProblemKind::TooLarge => "Body too large",
            ProblemKind::OutdatedConfig => "Outdated HPKE config",
            ProblemKind::ReportTooLate => "Report too late: its window has closed",
            ProblemKind::ReportTooEarly => "Report too far in the future",
            ProblemKind::BadTime => "Report time not rounded to the time precision",
            ProblemKind::Overloaded => "Too many reports pending",
            ProblemKind::Unavailable => "Service unavailable",
        }
    }
}

/// The `type` URI of a problem kind.
pub fn problem_type(kind: ProblemKind) -> String {
    format!("urn:millrace:problem:{}", kind.slug())
}

/// One refusal, ready to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: String,
    /// Seconds, for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Document<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
}

impl Problem {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The same problem about report `index` of a bulk body.
    pub fn in_report(mut self, index: usize, bulk: bool) -> Self {
        if bulk {
            self.detail = format!("report {index}: {}", self.detail);
        }
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.slug(), self.detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        let body = serde_json::to_vec(&Document {
            kind: problem_type(self.kind),
            title: self.kind.title(),
            status: status.as_u16(),
            detail: &self.detail,
        })
        .unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_MEDIA_TYPE),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
