//! Metrics of short-lived runs reach Prometheus through a real Pushgateway (Debian's
//! `prometheus-pushgateway`, which `make test` installs): `workflow-manager --once` (its CronJob
//! form) and `cleaner --once` push what they counted, and the gateway serves it for Prometheus to
//! scrape, grouped by job and instance.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; the Makefile does it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_millrace"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(name)
}

/// A Pushgateway on a free loopback port, stopped when dropped.
struct Gateway {
    child: Child,
    url: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn get(url: &str) -> Option<String> {
    let runtime = tokio::runtime::Runtime::new().ok()?;
    runtime.block_on(async { reqwest::get(url).await.ok()?.text().await.ok() })
}

fn start_gateway(dir: &Path) -> Gateway {
    let binary = [
        "/usr/bin/prometheus-pushgateway",
        "/usr/local/bin/pushgateway",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or_else(|| {
        panic!(
            "this test needs Debian's prometheus-pushgateway: `scripts/prometheus.sh install` \
                 (which `make test` runs) installs it"
        )
    });
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!(
            "--persistence.file={}",
            dir.join("pushgateway.data").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
    let gateway = Gateway {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{}/-/ready", gateway.url)).is_none() {
        assert!(
            Instant::now() < deadline,
            "the Pushgateway did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gateway
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the first sample of `metric` on the gateway whose labels include every one of
/// `labels`.
fn sample(exposition: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn short_lived_runs_push_their_metrics_to_a_real_pushgateway() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gateway = start_gateway(d);
    run(
        Command::new(bin("millrace"))
            .args(["keygen", "--dir"])
            .arg(d),
        "millrace keygen",
    );
    let config = d.join("millrace.toml").display().to_string();
    let store = format!("file://{}", d.join("alpha").display());
    let peer = format!("file://{}", d.join("beta").display());
    // The workflow-manager's CronJob form: one pass, then exit.
    let prefix = format!("pushgw-{}", std::process::id());
    run(
        Command::new(bin("workflow-manager"))
            .env("RUST_LOG", "warn")
            .args([
                "--bus",
                "nats://127.0.0.1:4222",
                "--topic-prefix",
                &prefix,
                "--create-topics",
                "--metrics-addr",
                "127.0.0.1:0",
                "--config",
                &config,
                "--facilitator",
                "0",
                "--store",
                &store,
                "--peer-store",
                &peer,
                "--once",
                "--pushgateway",
                &gateway.url,
            ]),
        "workflow-manager --once --pushgateway",
    );
    run(
        Command::new(bin("cleaner")).env("RUST_LOG", "warn").args([
            "--config",
            &config,
            "--store",
            &store,
            "--once",
            "--pushgateway",
            &gateway.url,
        ]),
        "cleaner --once --pushgateway",
    );
    let exposition = get(&format!("{}/metrics", gateway.url)).expect("the gateway's /metrics");
    let pass = sample(
        &exposition,
        "millrace_tasks_scheduled_total",
        &[
            "job=\"millrace-workflow-manager\"",
            "instance=\"facilitator-0\"",
            "kind=\"intake\"",
        ],
    );
    assert_eq!(
        pass,
        Some(0.0),
        "the workflow-manager's pass (nothing to schedule) should be on the gateway:\n{}",
        exposition
            .lines()
            .filter(|l| l.contains("millrace"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let deleted = sample(
        &exposition,
        "millrace_cleaner_deleted_total",
        &["job=\"millrace-cleaner\"", "instance=\"file://"],
    );
    assert_eq!(
        deleted,
        Some(0.0),
        "the cleaner's pass should be on the gateway:\n{}",
        exposition
            .lines()
            .filter(|l| l.contains("millrace"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // An unreachable gateway costs the run nothing but a warning.
    run(
        Command::new(bin("cleaner")).env("RUST_LOG", "warn").args([
            "--config",
            &config,
            "--store",
            &store,
            "--once",
            "--pushgateway",
            &format!("http://127.0.0.1:{}", free_port()),
        ]),
        "cleaner --once with an unreachable Pushgateway",
    );
}
