//! Test support: the test broker and the cloud emulators `make test` starts (tansu for Kafka,
//! moto for S3/SNS/SQS, the Pub/Sub emulator, fake-gcs-server), found the same way by every test
//! binary of the workspace. The bus crate's tests include this file too (`#[path]`).
//!
//! A service's address comes from its environment variable (`MILLRACE_TEST_KAFKA`, ...), which
//! `make test` sets after starting it. Without it, the first test that needs the service starts
//! it with its script, and the script stops it again when this test process exits (the
//! `..._STOP_WITH_PID` variable). No test skips: a service that cannot be had is a failure.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// A service a test can ask for, and how to start it.
pub struct LocalService {
    /// Names it in failures.
    pub name: &'static str,
    /// Holds its address when something else started it.
    pub env_var: &'static str,
    /// The script (relative to the repository root) and its arguments that start it and print
    /// its address.
    pub start: &'static [&'static str],
    /// The variable telling the script to stop what it starts when this process exits.
    pub stop_with_pid: &'static str,
}

/// The Kafka-compatible test broker (tansu, memory storage): `HOST:PORT`.
pub const KAFKA: LocalService = LocalService {
    name: "the Kafka test broker",
    env_var: "MILLRACE_TEST_KAFKA",
    start: &["scripts/kafka-broker.sh", "start"],
    stop_with_pid: "KAFKA_STOP_WITH_PID",
};

/// moto (S3, SNS, SQS): an endpoint URL.
pub const MOTO: LocalService = LocalService {
    name: "moto",
    env_var: "MILLRACE_TEST_MOTO",
    start: &["scripts/emulator.sh", "moto", "start"],
    stop_with_pid: "EMULATOR_STOP_WITH_PID",
};

/// The Pub/Sub emulator: `HOST:PORT`.
pub const PUBSUB: LocalService = LocalService {
    name: "the Pub/Sub emulator",
    env_var: "MILLRACE_TEST_PUBSUB",
    start: &["scripts/emulator.sh", "pubsub", "start"],
    stop_with_pid: "EMULATOR_STOP_WITH_PID",
};

/// fake-gcs-server: an endpoint URL.
pub const GCS: LocalService = LocalService {
    name: "fake-gcs-server",
    env_var: "MILLRACE_TEST_GCS",
    start: &["scripts/emulator.sh", "gcs", "start"],
    stop_with_pid: "EMULATOR_STOP_WITH_PID",
};

/// The repository root: the nearest folder above this crate's manifest holding `Cargo.lock`.
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

/// The address of `service`, started (once per test process) if its variable is not set.
pub fn address(service: &LocalService) -> String {
    if let Ok(addr) = std::env::var(service.env_var) {
        if !addr.trim().is_empty() {
            return addr.trim().trim_end_matches('/').to_string();
        }
    }
    static STARTED: Mutex<Option<HashMap<&'static str, String>>> = Mutex::new(None);
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    let started = started.get_or_insert_with(HashMap::new);
    if let Some(addr) = started.get(service.env_var) {
        return addr.clone();
    }
    let root = repo_root();
    let command = service.start.join(" ");
    let output = Command::new("bash")
        .args(service.start)
        .current_dir(&root)
        .env(service.stop_with_pid, std::process::id().to_string())
        .output()
        .unwrap_or_else(|e| panic!("running {command} for {}: {e}", service.name));
    assert!(
        output.status.success(),
        "{command} failed ({}); set {} to use a running {} instead.\n{}",
        output.status,
        service.env_var,
        service.name,
        String::from_utf8_lossy(&output.stderr)
    );
    let addr = String::from_utf8_lossy(&output.stdout)
        .trim()
        .trim_end_matches('/')
        .to_string();
    assert!(!addr.is_empty(), "{command} printed no address");
    started.insert(service.env_var, addr.clone());
    addr
}

/// A topic prefix unique to this test process and `test`: runs against a shared broker do not
/// see each other's topics.
pub fn run_prefix(test: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("millrace-test-{}-{nanos:x}", std::process::id())
    });
    format!("{run}.{test}")
}
