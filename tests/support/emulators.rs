//! Test support: the local cloud emulators (moto for S3/SNS/SQS, the Pub/Sub emulator,
//! fake-gcs-server) and the bucket set-up a real deployment leaves to Terraform.
//!
//! Each emulator's address comes from an environment variable (`MILLRACE_TEST_MOTO`,
//! `MILLRACE_TEST_PUBSUB`, `MILLRACE_TEST_GCS`), which `make test` sets after starting them. Without
//! it, the first test that needs one starts it with `scripts/emulator.sh NAME start`, and the
//! script stops it again when this test process exits. No test skips: no emulator is a failure.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn env_var(name: &str) -> &'static str {
    match name {
        "moto" => "MILLRACE_TEST_MOTO",
        "pubsub" => "MILLRACE_TEST_PUBSUB",
        "gcs" => "MILLRACE_TEST_GCS",
        other => panic!("no emulator called {other}"),
    }
}

/// The address of emulator `name` (`moto`, `pubsub`, `gcs`), started if needed: an endpoint URL
/// for moto and gcs, `HOST:PORT` for pubsub.
pub fn emulator(name: &str) -> String {
    static STARTED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);
    let var = env_var(name);
    if let Ok(addr) = std::env::var(var) {
        if !addr.trim().is_empty() {
            return addr.trim().to_string();
        }
    }
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    let started = started.get_or_insert_with(HashMap::new);
    if let Some(addr) = started.get(name) {
        return addr.clone();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/emulator.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(name)
        .arg("start")
        .current_dir(&root)
        .env("EMULATOR_STOP_WITH_PID", std::process::id().to_string())
        .output()
        .unwrap_or_else(|e| panic!("running {} {name} start: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} {name} start failed ({}); set {var} to use a running emulator.\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let addr = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        !addr.is_empty(),
        "{} {name} start printed no address",
        script.display()
    );
    started.insert(name.to_string(), addr.clone());
    addr
}

/// A name unique to this test process and call, usable as a bucket name or topic prefix.
pub fn unique(label: &str) -> String {
    format!(
        "mr-{label}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Sends one HTTP/1.1 request to `endpoint` (`http://HOST:PORT`) and returns the status code and
/// body. Enough for the emulators' bucket APIs, which need no signature.
pub async fn http(endpoint: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let host = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{endpoint}: only http:// emulators"))
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{method} {host}{path}: {e}"));
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .unwrap_or_else(|e| panic!("{method} {host}{path}: {e}"));
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {host}{path}: no HTTP status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Creates an S3 bucket on moto.
pub async fn create_s3_bucket(endpoint: &str, bucket: &str) {
    let (status, body) = http(endpoint, "PUT", &format!("/{bucket}"), "").await;
    assert!(
        status == 200,
        "creating bucket {bucket} on {endpoint}: HTTP {status}: {body}"
    );
}

/// Creates a GCS bucket on fake-gcs-server (JSON API).
pub async fn create_gcs_bucket(endpoint: &str, bucket: &str) {
    let (status, body) = http(
        endpoint,
        "POST",
        "/storage/v1/b?project=millrace-test",
        &format!("{{\"name\":\"{bucket}\"}}"),
    )
    .await;
    assert!(
        status == 200,
        "creating bucket {bucket} on {endpoint}: HTTP {status}: {body}"
    );
}

/// Uploads an object through fake-gcs-server's JSON upload API (which it serves, unlike the XML
/// API's PUT that `object_store` writes with).
pub async fn upload_gcs_object(endpoint: &str, bucket: &str, name: &str, body: &str) {
    let encoded: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let (status, response) = http(
        endpoint,
        "POST",
        &format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={encoded}"),
        body,
    )
    .await;
    assert!(
        status == 200,
        "uploading {name} to {bucket} on {endpoint}: HTTP {status}: {response}"
    );
}
