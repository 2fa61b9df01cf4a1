//! millrace-client: what a program that reports measurements to Millrace links.
//!
//! ```no_run
//! # async fn example() -> Result<(), millrace_client::ClientError> {
//! use millrace_client::Client;
//! use millrace_protocol::vdaf::Measurement;
//!
//! let client = Client::new("https://ingest.example.org")?;
//! let receipt = client.submit("clicks", &Measurement::Count(true)).await?;
//! assert_eq!(receipt.reports, 1);
//! # Ok(()) }
//! ```
//!
//! [`Client::submit`] fetches the aggregation's HPKE configs from the ingestor (cached for as long
//! as its `Cache-Control` says), shards the measurement with Prio3, seals each input share to its
//! facilitator's preferred key, stamps the report with the current time rounded down to the
//! aggregation's time precision, and uploads it. Uploads are retried with exponential backoff and
//! jitter (honouring `Retry-After`) on 429, 5xx and network errors, always with the same bytes:
//! the report id makes a retry idempotent, so a report whose first 201 was lost is acknowledged
//! and counted once. A refusal the client cannot fix by waiting (400, 404, 413, 415) is returned
//! at once as [`ClientError::Refused`] with the ingestor's problem document; "outdated config"
//! makes [`Client::submit`] fetch the configs again and seal a new report once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use millrace_protocol::crypto::HpkePublicKey;
use millrace_protocol::error::VdafError;
use millrace_protocol::layout::validate_id;
use millrace_protocol::upload::{
    encode_report_list, new_report_id, seal_report, HpkeConfigDocument, SealError, UploadReport,
    REPORT_LIST_MEDIA_TYPE, REPORT_MEDIA_TYPE,
};
use millrace_protocol::vdaf::{Measurement, Prio3Vdaf, VdafSpec};
use millrace_protocol::FormatError;
use serde::Deserialize;
use thiserror::Error;

/// Retries and caching.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Tries of one request in all (the first included).
    pub attempts: usize,
    /// The first retry's delay; it doubles per retry, with jitter.
    pub min_delay: Duration,
    /// The longest delay between two tries (also caps a `Retry-After`).
    pub max_delay: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// How long HPKE configs are cached when the answer carries no `max-age`.
    pub default_config_max_age: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            attempts: 8,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            default_config_max_age: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("ingestor URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// The ingestor refused, for a reason waiting does not fix.
    #[error("{url}: {status} {problem_type}: {detail}")]
    Refused {
        url: String,
        status: u16,
        /// The problem document's `type` (`urn:millrace:problem:…`).
        problem_type: String,
        detail: String,
    },
    /// Every try met an error worth retrying (429, 5xx, the network).
    #[error("{url}: no answer after {attempts} tries; the last: {last}")]
    GaveUp {
        url: String,
        attempts: usize,
        last: String,
    },
    #[error("{url}: {source}")]
    Config {
        url: String,
        #[source]
        source: FormatError,
    },
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Vdaf(#[from] VdafError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl ClientError {
    /// The ingestor says a share is sealed to a key it no longer takes.
    pub fn is_outdated_config(&self) -> bool {
        matches!(self, ClientError::Refused { problem_type, .. } if problem_type.ends_with(":outdated-config"))
    }
}

/// What the ingestor acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Receipt {
    /// Reports in the upload.
    pub reports: usize,
    /// Of those, reports the ingestor already had (a retry whose first answer was lost).
    pub duplicates: usize,
}

/// One aggregation as the ingestor describes it, ready to seal reports for.
pub struct AggregationConfig {
    pub document: HpkeConfigDocument,
    vdaf: Prio3Vdaf,
    keys: [(u8, HpkePublicKey); 2],
}

impl AggregationConfig {
    pub fn new(document: HpkeConfigDocument) -> Result<Self, ClientError> {
        let vdaf = document.vdaf()?;
        let keys = [document.sealing_key(0)?, document.sealing_key(1)?];
        Ok(AggregationConfig {
            document,
            vdaf,
            keys,
        })
    }

    /// Shards and seals `measurement` as made at `now` (unix seconds; rounded down to the time
    /// precision), under a new random report id.
    pub fn seal(&self, measurement: &Measurement, now: i64) -> Result<UploadReport, ClientError> {
        let [(id0, k0), (id1, k1)] = &self.keys;
        Ok(seal_report(
            &self.document.aggregation.id,
            &self.vdaf,
            new_report_id(),
            self.document.report_time(now),
            measurement,
            [(*id0, k0), (*id1, k1)],
        )?)
    }
}

struct Cached {
    config: Arc<AggregationConfig>,
    until: Instant,
}

/// A client of one ingestor (or of a load balancer in front of several).
pub struct Client {
    http: reqwest::Client,
    base: String,
    settings: ClientSettings,
    configs: Mutex<HashMap<String, Cached>>,
}

/// One try's failure.
#[derive(Debug)]
enum Failure {
    Network(String),
    Status {
        status: u16,
        problem_type: String,
        detail: String,
        retry_after: Option<Duration>,
    },
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Network(_) => true,
            Failure::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status { retry_after, .. } => *retry_after,
            Failure::Network(_) => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Network(e) => write!(f, "{e}"),
            Failure::Status {
                status,
                problem_type,
                detail,
                ..
            } => write!(f, "{status} {problem_type}: {detail}"),
        }
    }
}

/// A 2xx answer: its body and its `Cache-Control: max-age`.
struct Success {
    body: Vec<u8>,
    max_age: Option<Duration>,
}

fn header_secs(headers: &reqwest::header::HeaderMap, name: &str) -> Option<Duration> {
    let value = headers.get(name)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').find_map(|part| {
        let (name, secs) = part.trim().split_once('=')?;
        (name.trim() == "max-age")
            .then(|| secs.trim().parse::<u64>().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Client {
    /// A client of the ingestor at `base_url` (`https://host[:port][/prefix]`).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_settings(base_url, ClientSettings::default())
    }

    pub fn with_settings(base_url: &str, settings: ClientSettings) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Url {
            url: base_url.to_string(),
            reason,
        };
        let parsed = url::Url::parse(base_url).map_err(|e| bad(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("expected an http:// or https:// URL".to_string()));
        }
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Client {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            settings,
            configs: Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, aggregation: &str, what: &str) -> Result<String, ClientError> {
        validate_id("aggregation id", aggregation)?;
        Ok(format!("{}/aggregations/{aggregation}/{what}", self.base))
    }

    /// Sends one request (built afresh by `request` for each try) until it succeeds, fails for
    /// good, or the tries run out.
    async fn send(
        &self,
        url: &str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Success, ClientError> {
        let tries = AtomicUsize::new(0);
        let (tries_ref, request) = (&tries, &request);
        let once = move || async move {
            let tries = tries_ref;
            tries.fetch_add(1, Ordering::Relaxed);
            let response = request()
                .send()
                .await
                .map_err(|e| Failure::Network(e.to_string()))?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response
                .bytes()
                .await
                .map_err(|e| Failure::Network(e.to_string()))?
                .to_vec();
            if status.is_success() {
                return Ok(Success {
                    body,
                    max_age: max_age(&headers),
                });
            }
            #[derive(Deserialize, Default)]
            struct Problem {
                #[serde(rename = "type", default)]
                kind: String,
                #[serde(default)]
                detail: String,
            }
            let problem: Problem = serde_json::from_slice(&body).unwrap_or_default();
            Err(Failure::Status {
                status: status.as_u16(),
                problem_type: problem.kind,
                detail: if problem.detail.is_empty() {
                    String::from_utf8_lossy(&body).chars().take(200).collect()
                } else {
                    problem.detail
                },
                retry_after: header_secs(&headers, "retry-after"),
            })
        };
        let max_delay = self.settings.max_delay;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.settings.min_delay)
            .with_max_delay(max_delay)
            .with_max_times(self.settings.attempts.max(1) - 1)
            .with_jitter();
        let result = once
            .retry(backoff)
            .when(Failure::retryable)
            .adjust(|failure: &Failure, delay| {
                // Wait at least what the server asked for, within the longest delay.
                delay.map(|d| failure.retry_after().map_or(d, |r| r.min(max_delay).max(d)))
            })
            .notify(|failure: &Failure, delay| {
                tracing::debug!(%url, error = %failure, ?delay, "retrying");
            })
            .await;
        result.map_err(|failure| {
            let attempts = tries.load(Ordering::Relaxed);
            match failure {
                f if f.retryable() => ClientError::GaveUp {
                    url: url.to_string(),
                    attempts,
                    last: f.to_string(),
                },
                Failure::Status {
                    status,
                    problem_type,
                    detail,
                    ..
                } => ClientError::Refused {
                    url: url.to_string(),
                    status,
                    problem_type,
                    detail,
                },
                Failure::Network(e) => ClientError::GaveUp {
                    url: url.to_string(),
                    attempts,
                    last: e,
                },
            }
        })
    }

    /// The aggregation's HPKE configs, from the cache while its `max-age` lasts.
    pub async fn aggregation(&self, id: &str) -> Result<Arc<AggregationConfig>, ClientError> {
        if let Some(c) = self.lock().get(id) {
            if c.until > Instant::now() {
                return Ok(c.config.clone());
            }
        }
        let url = self.url(id, "hpke-config")?;
        let answer = self.send(&url, || self.http.get(&url)).await?;
        let document =
            HpkeConfigDocument::from_json(&answer.body).map_err(|source| ClientError::Config {
                url: url.clone(),
                source,
            })?;
        if document.aggregation.id != id {
            return Err(ClientError::Config {
                url,
                source: FormatError::Invalid(format!(
                    "the answer describes aggregation {:?}",
                    document.aggregation.id
                )),
            });
        }
        let config = Arc::new(AggregationConfig::new(document)?);
        let ttl = answer
            .max_age
            .unwrap_or(self.settings.default_config_max_age);
        self.lock().insert(
            id.to_string(),
            Cached {
                config: config.clone(),
                until: Instant::now() + ttl,
            },
        );
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.configs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the cached configs of `aggregation` (the next call fetches them).
    pub fn forget(&self, aggregation: &str) {
        self.lock().remove(aggregation);
    }

    async fn post(
        &self,
        aggregation: &str,
        media_type: &'static str,
        body: Vec<u8>,
        reports: usize,
    ) -> Result<Receipt, ClientError> {
        let url = self.url(aggregation, "reports")?;
        let body = bytes::Bytes::from(body);
        let answer = self
            .send(&url, || {
                self.http
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        // A 201 without a readable body still means the reports are stored.
        Ok(serde_json::from_slice(&answer.body).unwrap_or(Receipt {
            reports,
            duplicates: 0,
        }))
    }

    /// Uploads one sealed report, retrying with the same bytes until it is acknowledged.
    pub async fn upload(
        &self,
        aggregation: &str,
        report: &UploadReport,
    ) -> Result<Receipt, ClientError> {
        self.post(aggregation, REPORT_MEDIA_TYPE, report.encode()?, 1)
            .await
    }

    /// Uploads many sealed reports in one body (all are taken, or none).
    pub async fn upload_many(
        &self,
        aggregation: &str,
        reports: &[UploadReport],
    ) -> Result<Receipt, ClientError> {
        self.post(
            aggregation,
            REPORT_LIST_MEDIA_TYPE,
            encode_report_list(reports)?,
            reports.len(),
        )
        .await
    }

    /// Makes a report of `measurement` now and uploads it. If the ingestor says the HPKE config
    /// is outdated, fetches it again and sends a newly sealed report once.
    pub async fn submit(
        &self,
        aggregation: &str,
        measurement: &Measurement,
    ) -> Result<Receipt, ClientError> {
        let config = self.aggregation(aggregation).await?;
        let report = config.seal(measurement, now())?;
        match self.upload(aggregation, &report).await {
            Err(e) if e.is_outdated_config() => {
                tracing::info!(%aggregation, error = %e, "HPKE config outdated; fetching it again");
                self.forget(aggregation);
                let config = self.aggregation(aggregation).await?;
                let report = config.seal(measurement, now())?;
                self.upload(aggregation, &report).await
            }
            other => other,
        }
    }
}

/// Reads a measurement of `spec` from text, as a person types it: Count `1`/`0`/`true`/`false`,
/// Sum a number, Histogram a bucket index, SumVec comma-separated numbers. Range checks are the
/// VDAF's, when the report is sharded.
pub fn parse_measurement(spec: &VdafSpec, text: &str) -> Result<Measurement, FormatError> {
    let text = text.trim();
    let bad = |what: &str| {
        FormatError::Invalid(format!(
            "measurement {text:?} is not {what} (the aggregation is {spec:?})"
        ))
    };
    let number = |t: &str| t.trim().parse::<u64>().map_err(|_| bad("a whole number"));
    Ok(match spec {
        VdafSpec::Count {} => match text {
            "1" | "true" => Measurement::Count(true),
            "0" | "false" => Measurement::Count(false),
            _ => return Err(bad("0, 1, true or false")),
        },
        VdafSpec::Sum { .. } => Measurement::Sum(number(text)?),
        VdafSpec::Histogram { .. } => Measurement::Histogram(
            usize::try_from(number(text)?).map_err(|_| bad("a bucket index"))?,
        ),
        VdafSpec::SumVec { .. } => Measurement::SumVec(
            text.split(',')
                .map(number)
                .collect::<Result<Vec<u64>, FormatError>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_parse_as_each_vdaf_reads_them() {
        let count = VdafSpec::Count {};
        assert_eq!(
            parse_measurement(&count, "1").unwrap(),
            Measurement::Count(true)
        );
        assert_eq!(
            parse_measurement(&count, "false").unwrap(),
            Measurement::Count(false)
        );
        assert!(parse_measurement(&count, "2").is_err());
        let sum = VdafSpec::Sum {
            max_measurement: 10,
        };
        assert_eq!(parse_measurement(&sum, " 7 ").unwrap(), Measurement::Sum(7));
        assert!(parse_measurement(&sum, "-1")
            .unwrap_err()
            .to_string()
            .contains("whole number"));
        let vec = VdafSpec::SumVec {
            max_measurement: 3,
            length: 3,
            chunk_length: 1,
        };
        assert_eq!(
            parse_measurement(&vec, "1, 2,3").unwrap(),
            Measurement::SumVec(vec![1, 2, 3])
        );
        let hist = VdafSpec::Histogram {
            length: 4,
            chunk_length: 2,
        };
        assert_eq!(
            parse_measurement(&hist, "3").unwrap(),
            Measurement::Histogram(3)
        );
    }

    #[test]
    fn cache_control_max_age_is_read_among_other_directives() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("cache-control", "public, max-age=300".parse().unwrap());
        assert_eq!(max_age(&h), Some(Duration::from_secs(300)));
        h.insert("cache-control", "no-store".parse().unwrap());
        assert_eq!(max_age(&h), None);
        h.insert("retry-after", " 7 ".parse().unwrap());
        assert_eq!(header_secs(&h, "retry-after"), Some(Duration::from_secs(7)));
    }

    #[test]
    fn only_429_5xx_and_the_network_are_retried() {
        let status = |s: u16| Failure::Status {
            status: s,
            problem_type: String::new(),
            detail: String::new(),
            retry_after: None,
        };
        for s in [429, 500, 502, 503, 504] {
            assert!(status(s).retryable(), "{s}");
        }
        for s in [400, 404, 413, 415] {
            assert!(!status(s).retryable(), "{s}");
        }
        assert!(Failure::Network("reset".into()).retryable());
    }

    #[test]
    fn a_bad_base_url_or_aggregation_id_is_refused() {
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("not a url").is_err());
        let c = Client::new("http://127.0.0.1:1/prefix/").unwrap();
        assert_eq!(
            c.url("clicks", "reports").unwrap(),
            "http://127.0.0.1:1/prefix/aggregations/clicks/reports"
        );
        assert!(c.url("../x", "reports").is_err());
    }
}
