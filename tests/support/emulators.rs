//! Test support: the local cloud emulators (moto for S3/SNS/SQS, the Pub/Sub emulator,
//! fake-gcs-server) and the bucket set-up a real deployment leaves to Terraform.
//!
//! How each emulator is found or started is `local_services.rs`.
#![allow(dead_code)]

#[path = "local_services.rs"]
pub mod local_services;

use local_services::{address, GCS, MOTO, PUBSUB};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The address of emulator `name` (`moto`, `pubsub`, `gcs`), started if needed: an endpoint URL
/// for moto and gcs, `HOST:PORT` for pubsub.
pub fn emulator(name: &str) -> String {
    match name {
        "moto" => address(&MOTO),
        "pubsub" => address(&PUBSUB),
        "gcs" => address(&GCS),
        other => panic!("no emulator called {other}"),
    }
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
