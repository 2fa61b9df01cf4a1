//! Metrics of short-lived processes (the workflow-manager as a CronJob, `cleaner --once`): a run
//! that exits before Prometheus scrapes it pushes what it counted to a Prometheus Pushgateway
//! (`--pushgateway URL`), which Prometheus scrapes in its place. Each push replaces the group
//! `job/{job}/instance/{instance}`, so the gateway keeps the last run's counters per instance.

use std::time::Duration;

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("the metrics recorder could not be installed in this process")]
    NoRecorder,
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: the Pushgateway answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
}

/// The URL of the group `job`/`instance` on the Pushgateway at `gateway`. Both values go
/// base64url-encoded (the gateway's `@base64` form), so a store URL's slashes stay one label.
pub fn group_url(gateway: &str, job: &str, instance: &str) -> String {
    use base64::Engine;
    let encode = |s: &str| base64::engine::general_purpose::URL_SAFE.encode(s.as_bytes());
    format!(
        "{}/metrics/job@base64/{}/instance@base64/{}",
        gateway.trim_end_matches('/'),
        encode(job),
        encode(instance)
    )
}

/// Installs this process's metrics recorder now (counters incremented before it exists are
/// lost): call at start-up in a process that will [`push`].
pub fn record_for_push() -> Result<(), PushError> {
    crate::health::metrics_handle()
        .map(|_| ())
        .ok_or(PushError::NoRecorder)
}

/// Replaces the group `job`/`instance` on the Pushgateway at `gateway` with everything this
/// process has counted.
pub async fn push(gateway: &str, job: &str, instance: &str) -> Result<(), PushError> {
    let handle = crate::health::metrics_handle().ok_or(PushError::NoRecorder)?;
    handle.run_upkeep();
    let body = handle.render();
    let url = group_url(gateway, job, instance);
    let http = |reason: String| PushError::Http {
        url: millrace_secrets::redact(&url),
        reason,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| http(e.to_string()))?;
    let response = client
        .put(&url)
        .header("content-type", "text/plain; version=0.0.4")
        .body(body)
        .send()
        .await
        .map_err(|e| http(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(PushError::Refused {
            url: millrace_secrets::redact(&url),
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        });
    }
    Ok(())
}

/// [`push`], logging a failure instead of returning it: losing one run's counters must not fail
/// the run.
pub async fn push_or_warn(gateway: Option<&str>, job: &str, instance: &str) {
    let Some(gateway) = gateway else {
        return;
    };
    match push(gateway, job, instance).await {
        Ok(()) => tracing::info!(job, instance, "metrics pushed to the Pushgateway"),
        Err(e) => tracing::warn!(error = %e, "could not push metrics to the Pushgateway"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_urls_carry_any_label_value() {
        assert_eq!(
            group_url("http://pgw:9091/", "millrace-cleaner", "file:///data/alpha"),
            "http://pgw:9091/metrics/job@base64/bWlsbHJhY2UtY2xlYW5lcg==/instance@base64/ZmlsZTovLy9kYXRhL2FscGhh"
        );
    }
}
