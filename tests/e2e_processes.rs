//! End to end as separate processes: every service of both facilitators and the mill runs as
//! its own OS process (its own binary), sharing only a real broker and local-file stores; the
//! ingestor runs as its own process too, `millrace ingest` sends it reports made now (the config
//! has minute-long windows) while the fleet runs, and `millrace status --expect` checks every
//! result against the plaintext. Run one with `make e2e BUS=amqp` (or nats, kafka, sns-sqs, pubsub); `make test`
//! runs all five.
//!
//! While the real tasks flow, the test also publishes a hostile corpus (tests/support/hostile.rs)
//! with the broker's own client crate (tests/support/plain_clients.rs) onto both facilitators'
//! intake and aggregate topics and the collect topic. Once the results are checked it reads each
//! `{topic}.rejected` with the `inspect` group: every item must be there exactly once, bounded,
//! and nothing else; and the services' logs must stay small.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; the Makefile does it).

#[path = "support/emulators.rs"]
mod emulators;
#[path = "support/hostile.rs"]
mod hostile;
#[path = "support/otlp.rs"]
mod otlp;
#[path = "support/plain_clients.rs"]
mod plain_clients;

use std::path::{Path, PathBuf};

use millrace_protocol::tasks::{groups, topics};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_millrace"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first (`cargo build --workspace --bins`, which `make test` and `make e2e` do)",
        path.display()
    );
    path
}

/// `line` without its terminal colour codes (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn run(cmd: &mut Command, what: &str) -> String {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    started(&child);
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

struct Fleet {
    children: Vec<(String, Child)>,
    logs: PathBuf,
    env: Vec<(String, String)>,
}

impl Fleet {
    fn spawn(&mut self, name: &str, binary: &str, args: &[String]) {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let err = log.try_clone().unwrap();
        let child = Command::new(bin(binary))
            .args(args)
            .envs(self.env.iter().cloned())
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        started(&child);
        self.children.push((name.to_string(), child));
    }

    fn log_tails(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text =
                std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("\n--- {name} ---\n{tail}\n"));
        }
        out
    }

    /// The address `name` logged after `key` (`listen=127.0.0.1:40123`) in its "started" line,
    /// once it has.
    fn logged_address(&self, name: &str, key: &str) -> String {
        let path = self.logs.join(format!("{name}.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let found = text
                .lines()
                .map(strip_ansi)
                .filter(|l| l.contains("started"))
                .find_map(|l| {
                    let rest = l.split(key).nth(1)?;
                    Some(
                        rest.split_whitespace()
                            .next()?
                            .trim_matches('"')
                            .to_string(),
                    )
                });
            if let Some(address) = found {
                return address;
            }
            assert!(
                Instant::now() < deadline,
                "{name} logged no {key} within a minute:\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `name`'s log has a line containing every one of `needles`.
    fn wait_for_log(&self, name: &str, needles: &[&str], within: Duration) {
        let path = self.logs.join(format!("{name}.log"));
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not log {needles:?} within {within:?}:\n{}",
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every service's log stays small: no line over `max_line` bytes, all of them together at
    /// most `max_total` bytes (a hostile body must never be echoed whole, nor a failure logged in
    /// a loop).
    fn check_log_volume(&self, max_line: usize, max_total: usize) -> Vec<String> {
        let mut problems = Vec::new();
        let (mut total, mut longest) = (0, 0);
        for (name, _) in &self.children {
            let bytes = std::fs::read(self.logs.join(format!("{name}.log"))).unwrap_or_default();
            total += bytes.len();
            longest = bytes
                .split(|b| *b == b'\n')
                .map(<[u8]>::len)
                .fold(longest, usize::max);
            if let Some((n, line)) = bytes
                .split(|b| *b == b'\n')
                .enumerate()
                .max_by_key(|(_, l)| l.len())
                .filter(|(_, l)| l.len() > max_line)
            {
                problems.push(format!(
                    "{name}.log line {}: {} bytes (at most {max_line}): {}…",
                    n + 1,
                    line.len(),
                    String::from_utf8_lossy(&line[..300])
                ));
            }
        }
        println!("the services logged {total} bytes; the longest line has {longest} bytes");
        if total > max_total {
            problems.push(format!(
                "the services logged {total} bytes (at most {max_total})"
            ));
        }
        problems
    }

    /// Every log line of every service that contains `secret` (which must never be logged).
    fn lines_containing(&self, secret: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (name, _) in &self.children {
            let text =
                std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
            let lines = text.lines().count();
            assert!(lines > 0, "{name} logged nothing at all");
            for (n, line) in text.lines().enumerate() {
                if line.contains(secret) {
                    found.push(format!(
                        "{name}.log line {} shows the password: {}",
                        n + 1,
                        line.replace(secret, "<THE PASSWORD>")
                    ));
                }
            }
        }
        found
    }

    /// SIGTERM to every process; each must exit by itself, successfully, within the drain time.
    fn stop(&mut self) -> Vec<String> {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let mut problems = Vec::new();
        for (name, child) in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            problems.push(format!("{name} exited with {status} after SIGTERM"));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        problems.push(format!("{name} did not stop within 40s of SIGTERM"));
                        break;
                    }
                }
            }
        }
        problems
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Retry settings for the services that may find an input not there yet (the aggregate-worker, a
/// peer's validation copy still on its way; the mill, a result another mill is announcing):
/// short backoff, many attempts. (Waiting for a second sum part spends no attempt at all.)
const WAITING_RETRIES: &[&str] = &[
    "--backoff-base",
    "200ms",
    "--backoff-max",
    "2s",
    "--max-attempts",
    "50",
];

/// Every process the tests started, so that the watchdog can stop them all.
static STARTED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn started(child: &Child) {
    STARTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(child.id());
}

/// Turns a run that hangs into a failure that says where: a run that takes longer than `limit`
/// (several times what one ever needs) gets its current step and every service's log tail
/// written to stderr, every process the tests started killed, and the test binary ended with a
/// failure, so that `make test` fails in minutes instead of waiting forever.
struct Watchdog {
    finished: Arc<AtomicBool>,
    step: Arc<Mutex<String>>,
}

impl Watchdog {
    fn start(label: &str, logs: PathBuf, limit: Duration) -> Watchdog {
        let finished = Arc::new(AtomicBool::new(false));
        let step = Arc::new(Mutex::new("starting".to_string()));
        let (label, watched_finish, watched_step) =
            (label.to_string(), finished.clone(), step.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if watched_finish.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let step = watched_step
                .lock()
                .map(|s| s.clone())
                .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
            let mut report = format!(
                "\n{label}: the run did not finish within {limit:?}; it was {step}. The services' logs end:\n"
            );
            let mut names: Vec<PathBuf> = std::fs::read_dir(&logs)
                .map(|dir| dir.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            names.sort();
            for path in names {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                report.push_str(&format!(
                    "\n--- {} ---\n{}\n",
                    path.display(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                ));
            }
            // Straight to the file descriptor: the test harness would hold back `eprintln!`.
            let _ = std::io::stderr().lock().write_all(report.as_bytes());
            let pids = STARTED
                .lock()
                .map(|p| p.clone())
                .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
            std::process::exit(101);
        });
        Watchdog { finished, step }
    }

    /// What the run is doing now (shown if it hangs).
    fn step(&self, what: &str) {
        let mut step = self
            .step
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *step = what.to_string();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Relaxed);
    }
}

/// How long one end-to-end run may take before the watchdog ends it (a run takes one to two
/// minutes: a minute window must close, then every worker drains).
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// One fleet at a time: three fleets of seven processes at once would only fight over two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where the run keeps its three stores (both facilitators' and the collector's).
enum Stores {
    /// Local directories under the run's temporary folder.
    Files,
    /// Three fresh buckets on S3 (moto at this endpoint).
    S3 { endpoint: String },
}

impl Stores {
    /// The three store URLs, creating buckets where needed.
    fn urls(&self, dir: &Path, label: &str) -> [String; 3] {
        let names = ["alpha", "beta", "collector"];
        let runtime = tokio::runtime::Runtime::new().unwrap();
        names.map(|name| match self {
            Stores::Files => format!("file://{}", dir.join("stores").join(name).display()),
            Stores::S3 { endpoint } => {
                let bucket = emulators::unique(&format!("{label}-{name}"));
                runtime.block_on(emulators::create_s3_bucket(endpoint, &bucket));
                format!("s3://{bucket}?endpoint={endpoint}&region=us-east-1")
            }
        })
    }
}

/// How the test publishes the hostile corpus: the broker's own client crate.
enum Plain {
    Amqp,
    Nats,
    /// Bootstrap `HOST:PORT`.
    Kafka(String),
    /// moto's endpoint URL.
    Sns(String),
    /// The emulator's `HOST:PORT` and the project.
    PubSub(String, String),
}

impl Plain {
    /// What the broker takes from a plain client.
    fn broker(&self, bus_url: &str, runtime: &tokio::runtime::Runtime) -> hostile::Broker {
        match self {
            Plain::Amqp => hostile::Broker::AMQP,
            Plain::Nats => {
                hostile::Broker::nats(runtime.block_on(plain_clients::nats_max_payload(bus_url)))
            }
            Plain::Kafka(_) => hostile::Broker::KAFKA,
            Plain::Sns(_) => hostile::Broker::SNS,
            Plain::PubSub(..) => hostile::Broker::PUBSUB,
        }
    }

    async fn publish(&self, bus_url: &str, sent: &[hostile::Sent]) {
        match self {
            Plain::Amqp => plain_clients::publish_amqp(bus_url, sent).await,
            Plain::Nats => plain_clients::publish_nats(bus_url, sent).await,
            Plain::Kafka(bootstrap) => plain_clients::publish_kafka(bootstrap, sent).await,
            Plain::Sns(endpoint) => plain_clients::publish_sns(endpoint, sent).await,
            Plain::PubSub(host, project) => {
                plain_clients::publish_pubsub(host, project, sent).await
            }
        }
    }
}

/// The longest log line a service may write, and what all of them may log in one run.
const MAX_LOG_LINE: usize = 8 * 1024;
const MAX_LOG_TOTAL: usize = 1024 * 1024;

fn e2e(bus_url: &str, label: &str, stores: Stores, env: &[(&str, &str)], plain: Plain) -> Scraped {
    e2e_with(
        BusUrls {
            services: bus_url,
            test: bus_url,
            secret: None,
        },
        label,
        stores,
        env,
        plain,
        None,
    )
}

/// A check run while the fleet still runs, every result in, with each service's name and its
/// metrics address (`127.0.0.1:PORT`).
type WhileRunning<'a> = &'a dyn Fn(&[(String, String)]);

/// What each service's `/metrics` showed once every result was in (service name → text).
type Scraped = Vec<(String, String)>;

/// The bus URL the services get, the one the test's own clients use, and a secret no service may
/// ever log. The two URLs differ when the services read their password from a reference the
/// test process does not have (`password=env:…`, set only in the services' environment).
struct BusUrls<'a> {
    services: &'a str,
    test: &'a str,
    secret: Option<&'a str>,
}

fn e2e_with(
    urls: BusUrls,
    label: &str,
    stores: Stores,
    env: &[(&str, &str)],
    plain: Plain,
    while_running: Option<WhileRunning>,
) -> Scraped {
    let bus_url = urls.test;
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("millrace.toml");
    // Minute-long windows: the reports are made now, through the ingestor, and their windows
    // close (past a 10 s grace) about a minute later.
    run(
        Command::new(bin("millrace"))
            .args(["keygen", "--short-windows", "--dir"])
            .arg(d),
        "millrace keygen",
    );
    let [s0, s1, sc] = stores.urls(d, label);
    let expect = d.join("expect.json");
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let watchdog = Watchdog::start(label, logs.clone(), RUN_LIMIT);
    let prefix = format!(
        "e2e-{label}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis() % 100_000
    );
    let _cleanup = CleanupGuard {
        bus_url: bus_url.to_string(),
        prefix: prefix.clone(),
    };
    let cfg = config.display().to_string();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--bus",
            urls.services,
            "--topic-prefix",
            &prefix,
            "--create-topics",
            "--metrics-addr",
            "127.0.0.1:0",
            "--config",
            &cfg,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut fleet = Fleet {
        children: Vec::new(),
        logs,
        env: env.clone(),
    };
    fleet.spawn(
        "mill",
        "mill",
        &common(&[&["--collector-store", &sc][..], WAITING_RETRIES].concat()),
    );
    for (f, own, peer) in [("0", &s0, &s1), ("1", &s1, &s0)] {
        fleet.spawn(
            &format!("intake-worker-{f}"),
            "intake-worker",
            &common(&["--facilitator", f, "--store", own, "--peer-store", peer]),
        );
        fleet.spawn(
            &format!("aggregate-worker-{f}"),
            "aggregate-worker",
            &common(
                &[
                    &["--facilitator", f, "--store", own, "--collector-store", &sc][..],
                    WAITING_RETRIES,
                ]
                .concat(),
            ),
        );
    }
    // Consumers first, so their queues and groups exist (each logs "started" once it has
    // created its topics); then the publishers.
    watchdog.step("waiting for the consumers to start");
    for (name, _) in &fleet.children {
        fleet.wait_for_log(name, &["started", "service"], Duration::from_secs(60));
    }
    // The hostile corpus, published with the broker's own client while the real tasks flow.
    watchdog.step("connecting the test's own bus clients");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bus = runtime
        .block_on(millrace_bus::connect(bus_url))
        .unwrap_or_else(|e| panic!("{label}: {}: {e}", millrace_secrets::redact(bus_url)));
    let broker = plain.broker(bus_url, &runtime);
    let limit = hostile::worker_limit(&bus.limits());
    let sent = hostile::corpus_for(&prefix, &broker, limit);
    let publisher = {
        let (sent, bus_url) = (sent.clone(), bus_url.to_string());
        std::thread::spawn(move || {
            let started = Instant::now();
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(plain.publish(&bus_url, &sent));
            started.elapsed()
        })
    };
    // The ingestor, the fleet's front door, and the simulated clients sending it reports made
    // now, while the fleet runs (as a real deployment is fed).
    watchdog.step("starting the ingestor");
    fleet.spawn(
        "ingestor",
        "ingestor",
        &[
            "--config",
            &cfg,
            "--ingestor",
            millrace::keygen::INGESTOR,
            "--store0",
            &s0,
            "--store1",
            &s1,
            "--listen",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let ingestor_url = format!("http://{}", fleet.logged_address("ingestor", "listen="));
    let clients = {
        let (env, config, expect, ingestor_url) = (
            env.clone(),
            config.clone(),
            expect.clone(),
            ingestor_url.clone(),
        );
        std::thread::spawn(move || {
            run(
                Command::new(bin("millrace"))
                    .envs(env.iter().cloned())
                    .args(["ingest", "--config"])
                    .arg(&config)
                    .args([
                        "--ingestor-url",
                        &ingestor_url,
                        "--reports",
                        "2000",
                        "--invalid-fraction",
                        "0.05",
                        "--batch-size",
                        "100",
                        "--expect-out",
                    ])
                    .arg(&expect),
                "millrace ingest",
            )
        })
    };
    for (f, own, peer) in [("0", &s0, &s1), ("1", &s1, &s0)] {
        fleet.spawn(
            &format!("workflow-manager-{f}"),
            "workflow-manager",
            &common(&[
                "--facilitator",
                f,
                "--store",
                own,
                "--peer-store",
                peer,
                "--interval",
                "1s",
            ]),
        );
    }
    watchdog.step("waiting for `millrace ingest` (uploading reports to the ingestor)");
    let uploaded = clients
        .join()
        .unwrap_or_else(|_| panic!("{label}: millrace ingest failed (above)"));
    println!("{label}: {}", uploaded.trim());
    watchdog.step("waiting for `millrace status --wait-secs 240`");
    let status = Command::new(bin("millrace"))
        .envs(env.iter().cloned())
        .args(["status", "--config"])
        .arg(&config)
        .args(["--collector-store", &sc, "--wait-secs", "240", "--expect"])
        .arg(&expect)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    started(&status);
    let status = status.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&status.stdout).to_string();
    watchdog.step("scraping every service's /metrics");
    let mut scraped = Vec::new();
    let mut addresses = Vec::new();
    for (name, _) in &fleet.children {
        let addr = fleet.logged_address(name, "metrics=");
        addresses.push((name.clone(), addr.clone()));
        let text = runtime
            .block_on(async {
                reqwest::get(format!("http://{addr}/metrics"))
                    .await?
                    .text()
                    .await
            })
            .unwrap_or_else(|e| panic!("{label}: scraping {name}'s /metrics at {addr}: {e}"));
        scraped.push((name.clone(), text));
    }
    if let Some(check) = while_running {
        watchdog.step("checking the running fleet (a real Prometheus scraping it)");
        check(&addresses);
    }
    watchdog.step("waiting for the hostile corpus to be published");
    let published = publisher.join();
    watchdog.step("stopping the fleet (SIGTERM)");
    let problems = fleet.stop();
    assert!(
        status.status.success(),
        "{label}: results differ from the plaintext or are missing:\n{report}\n{}",
        fleet.log_tails()
    );
    let published = published
        .unwrap_or_else(|_| panic!("{label}: publishing the hostile corpus failed (above)"));
    // Each hostile item once on its topic's .rejected, bounded; nothing else there.
    watchdog.step("reading every topic's .rejected");
    let summary = runtime.block_on(hostile::check_rejected(
        bus.clone(),
        &sent,
        limit,
        Duration::from_secs(60),
        Duration::from_secs(2),
    ));
    println!(
        "{label}: hostile corpus published in {published:.1?}:\n{}{}",
        hostile::describe(&sent),
        summary.join("\n")
    );
    let mut log_problems = fleet.check_log_volume(MAX_LOG_LINE, MAX_LOG_TOTAL);
    if let Some(secret) = urls.secret {
        log_problems.extend(fleet.lines_containing(secret));
    }
    assert!(log_problems.is_empty(), "{label}: {log_problems:#?}");
    assert!(
        problems.is_empty(),
        "{label}: {problems:?}\n{}",
        fleet.log_tails()
    );
    watchdog.step("running the cleaner once on each store");
    // The cleaner needs no bus: one pass over each store must succeed (and, with a week's TTL,
    // delete nothing that is this young).
    for s in [&s0, &s1] {
        run(
            Command::new(bin("cleaner"))
                .envs(env.iter().cloned())
                .args(["--config", &cfg, "--store", s, "--once"]),
            "cleaner --once",
        );
    }
    run(
        Command::new(bin("cleaner"))
            .envs(env.iter().cloned())
            .args([
                "--config",
                &cfg,
                "--store",
                &sc,
                "--role",
                "collector",
                "--once",
            ]),
        "cleaner --once (collector)",
    );
    println!("{label}: every result equals the plaintext\n{report}");
    watchdog.step("removing the run's topics from the broker");
    scraped
}

/// Every topic the fleet used, with the consumer group on it.
fn fleet_topics(prefix: &str) -> Vec<(String, Option<String>)> {
    let inspect = Some(millrace_bus::INSPECT_GROUP.to_string());
    let mut out = Vec::new();
    let mut add = |topic: String, group: Option<String>| {
        out.push((format!("{topic}.dead"), inspect.clone()));
        out.push((format!("{topic}.rejected"), inspect.clone()));
        out.push((topic, group));
    };
    for f in 0..2 {
        add(topics::intake(prefix, f), Some(groups::intake(f)));
        add(topics::aggregate(prefix, f), Some(groups::aggregate(f)));
    }
    add(topics::collect(prefix), Some(groups::collect()));
    add(topics::results(prefix), inspect.clone());
    out
}

/// Removes what a run created on the shared brokers (they outlive the test).
fn cleanup(bus_url: &str, prefix: &str) {
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        return;
    };
    runtime.block_on(async {
        if bus_url.starts_with("nats:") {
            if let Ok(bus) = millrace_bus::nats::NatsBus::connect(bus_url).await {
                let _ = bus.delete_topics_under(prefix).await;
            }
        } else if bus_url.starts_with("amqp:") {
            if let Ok(bus) = millrace_bus::amqp::AmqpBus::connect(bus_url).await {
                for (topic, group) in fleet_topics(prefix) {
                    let groups: Vec<&str> = group.iter().map(String::as_str).collect();
                    let _ = bus.delete_topic(&topic, &groups).await;
                }
            }
        }
    });
}

/// Cleans up the run's topics however the test ends.
struct CleanupGuard {
    bus_url: String,
    prefix: String,
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup(&self.bus_url, &self.prefix);
    }
}

/// A RabbitMQ user with a random password, made with `rabbitmqctl` for one test and deleted
/// when dropped, however the test ends.
struct RabbitUser {
    name: String,
    password: String,
}

impl RabbitUser {
    fn create() -> RabbitUser {
        use rand::distr::{Alphanumeric, SampleString};
        let mut rng = rand::rng();
        let user = RabbitUser {
            name: format!("millrace-e2e-{}", Alphanumeric.sample_string(&mut rng, 8)),
            password: Alphanumeric.sample_string(&mut rng, 32),
        };
        for args in [
            vec!["add_user", &user.name, &user.password],
            vec!["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"],
        ] {
            let out = Command::new("rabbitmqctl")
                .args(&args)
                .output()
                .unwrap_or_else(|e| panic!("this test needs rabbitmqctl on the PATH: {e}"));
            assert!(
                out.status.success(),
                "rabbitmqctl {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr).replace(&user.password, "<THE PASSWORD>")
            );
        }
        user
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// RabbitMQ as a deployment would use it: a user of its own whose password the services read
/// from their environment (`password=env:…` in the URL, the variable set only for them). The
/// fleet must work, and no line any service logs may contain the password.
#[test]
fn e2e_amqp() {
    let user = RabbitUser::create();
    const VAR: &str = "MILLRACE_E2E_AMQP_PASSWORD";
    let services = format!("amqp://{}@127.0.0.1:5672/%2f?password=env:{VAR}", user.name);
    let test = format!("amqp://{}:{}@127.0.0.1:5672/%2f", user.name, user.password);
    e2e_with(
        BusUrls {
            services: &services,
            test: &test,
            secret: Some(&user.password),
        },
        "amqp",
        Stores::Files,
        &[(VAR, &user.password)],
        Plain::Amqp,
        None,
    );
}

/// NATS, with every process exporting its spans to a real OTLP receiver: one batch's trace runs
/// from the ingestor through both facilitators' workflow-managers and intake-workers, and the
/// window's trace, which links to it, through the aggregate-workers to the mill.
#[test]
fn e2e_nats() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, received) = otlp::start(&runtime);
    let url = "nats://127.0.0.1:4222";
    let scraped = e2e_with(
        BusUrls {
            services: url,
            test: url,
            secret: None,
        },
        "nats",
        Stores::Files,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "500"),
        ],
        Plain::Nats,
        Some(&prometheus_scrapes_every_queried_metric),
    );
    assert!(
        received.undecodable().is_empty(),
        "the OTLP receiver got bodies it could not decode: {:?}",
        received.undecodable()
    );
    let trace = one_batch_trace(&received.spans());
    println!("nats: one batch's trace, as the OTLP receiver got it:\n{trace}");
    check_metrics_reference(&scraped);
}

/// The README's metrics reference against a running fleet: every `millrace_*` metric a service
/// exported is documented there, every documented one is defined in the code, the fleet's main
/// ones were exported by this run, and the lag histograms have their explicit buckets.
fn check_metrics_reference(scraped: &Scraped) {
    let readme = include_str!("../README.md");
    let section = readme
        .split("#### Metrics reference")
        .nth(1)
        .and_then(|rest| rest.split("\n#").next())
        .expect("the README has a \"Metrics reference\" table");
    let documented: std::collections::BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert!(
        documented.len() > 20,
        "the table lists too few metrics: {documented:?}"
    );
    let mut problems = Vec::new();
    let mut exported: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (service, text) in scraped {
        for line in text.lines().filter(|l| l.starts_with("millrace_")) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| documented.contains(*base))
                .unwrap_or(name);
            let services = exported.entry(family.to_string()).or_default();
            if !services.contains(service) {
                services.push(service.clone());
            }
        }
    }
    for (name, services) in &exported {
        if !documented.contains(name) {
            problems.push(format!(
                "{name} (exported by {services:?}) is not in the README's metrics reference"
            ));
        }
    }
    let code = source_text(Path::new(env!("CARGO_MANIFEST_DIR")));
    for name in &documented {
        if !code.contains(&format!("\"{name}\"")) {
            problems.push(format!(
                "{name} is in the README's metrics reference but defined nowhere in the code"
            ));
        }
    }
    for name in [
        "millrace_tasks_total",
        "millrace_tasks_scheduled_total",
        "millrace_reports_validated_total",
        "millrace_windows_succeeded_total",
        "millrace_ingestor_reports_accepted_total",
        "millrace_task_attempts",
        millrace_runtime::lag::BATCH_INTAKE,
        millrace_runtime::lag::BATCH_VALIDATION,
        millrace_runtime::lag::WINDOW_MANIFEST,
        millrace_runtime::lag::WINDOW_SUM_PART,
        millrace_runtime::lag::WINDOW_RESULT,
    ] {
        if !exported.contains_key(name) {
            problems.push(format!(
                "{name} was not exported by any service of a fleet that ran"
            ));
        }
    }
    let lags = millrace_runtime::lag::ALL.map(|name| (name, "86400"));
    for (name, last) in lags.into_iter().chain([("millrace_task_attempts", "21")]) {
        let bucket = format!("{name}_bucket{{");
        let le = format!("le=\"{last}\"");
        let has_buckets = scraped.iter().any(|(_, text)| {
            text.lines()
                .any(|l| l.starts_with(&bucket) && l.contains(&le))
        });
        if !has_buckets {
            problems.push(format!("{name} has no explicit buckets (no {le} bucket)"));
        }
    }
    assert!(
        problems.is_empty(),
        "metrics reference:\n  {}",
        problems.join("\n  ")
    );
    println!(
        "metrics reference: {} documented, {} exported by this fleet",
        documented.len(),
        exported.len()
    );
}

/// A real Prometheus (scripts/prometheus.sh, Debian's package) scrapes the running fleet: every
/// metric the dashboard and the alert rules in deploy/monitoring query must be in it, by the
/// exact name the query uses.
fn prometheus_scrapes_every_queried_metric(services: &[(String, String)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut queried = std::collections::BTreeSet::new();
    for file in [
        "deploy/monitoring/prometheus-rules.yaml",
        "deploy/monitoring/grafana-dashboard.json",
    ] {
        let text = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        for (at, _) in text.match_indices("millrace_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            queried.insert(name);
        }
    }
    assert!(
        queried.len() > 10,
        "too few metrics found in deploy/monitoring: {queried:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    let targets: Vec<String> = services.iter().map(|(_, a)| format!("'{a}'")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: millrace\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let script = root.join("scripts/prometheus.sh");
    let started = Command::new(&script)
        .arg("start")
        .arg(&config)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/prometheus.sh start: {e}"));
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = Command::new(&self.0).arg("stop").output();
        }
    }
    let _stop = Stop(script.clone());
    assert!(
        started.status.success(),
        "scripts/prometheus.sh start failed:\n{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let address = String::from_utf8_lossy(&started.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        address.starts_with("http://"),
        "scripts/prometheus.sh start printed {address:?}"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let names = |url: String| -> Vec<String> {
        runtime
            .block_on(async { reqwest::get(url).await.ok()?.text().await.ok() })
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| {
                v.get("data")?.as_array().map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let known = names(format!("{address}/api/v1/label/__name__/values"));
        let missing: Vec<&String> = queried.iter().filter(|q| !known.contains(q)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        missing.is_empty(),
        "Prometheus scraped the running fleet ({} targets), but these metrics that \
         deploy/monitoring queries are not in it: {missing:?}",
        services.len()
    );
    println!(
        "prometheus: all {} metrics the dashboard and the alert rules query were scraped from {} services",
        queried.len(),
        services.len()
    );
}

/// Every Rust source under the crate's services/, shared/ and src/, concatenated.
fn source_text(root: &Path) -> String {
    let mut out = String::new();
    let mut stack: Vec<PathBuf> = ["services", "shared", "src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    out
}

/// Finds a batch whose spans form the whole chain, and returns it drawn as a tree; panics with
/// what was received when no batch does.
fn one_batch_trace(spans: &[otlp::ReceivedSpan]) -> String {
    use otlp::{CONSUMER, PRODUCER};
    let by_id: std::collections::HashMap<&str, &otlp::ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent_of = |s: &otlp::ReceivedSpan| by_id.get(s.parent_span_id.as_str()).copied();
    let mut why = Vec::new();
    for intake in spans
        .iter()
        .filter(|s| s.service == "intake-worker" && s.kind == CONSUMER)
    {
        let Some(batch) = intake.attribute("batch") else {
            continue;
        };
        let t = &intake.trace_id;
        let in_trace: Vec<&otlp::ReceivedSpan> =
            spans.iter().filter(|s| &s.trace_id == t).collect();
        let stored = in_trace
            .iter()
            .any(|s| s.service == "ingestor" && s.attribute("batch") == Some(batch));
        // Both facilitators' intake tasks: each consumer span is the child of a
        // workflow-manager's producer span of the same trace.
        let validated: Vec<_> = in_trace
            .iter()
            .filter(|s| s.service == "intake-worker" && s.kind == CONSUMER)
            .filter(|s| {
                parent_of(s).is_some_and(|p| {
                    p.service == "workflow-manager"
                        && p.kind == PRODUCER
                        && p.attribute("messaging.destination.name")
                            == s.attribute("messaging.destination.name")
                })
            })
            .collect();
        let groups: std::collections::BTreeSet<_> = validated
            .iter()
            .filter_map(|s| s.attribute("messaging.consumer.group.name"))
            .collect();
        // The aggregate-workers link to the batch's trace from their window's trace; each sends a
        // sum part the mill consumes as a child of that send.
        let aggregated: Vec<_> = spans
            .iter()
            .filter(|s| {
                s.service == "aggregate-worker" && s.kind == CONSUMER && s.links.contains(t)
            })
            .collect();
        let milled = aggregated.iter().any(|a| {
            spans.iter().any(|m| {
                m.service == "mill"
                    && m.kind == CONSUMER
                    && m.trace_id == a.trace_id
                    && parent_of(m).is_some_and(|send| {
                        send.service == "aggregate-worker"
                            && send.kind == PRODUCER
                            && send.parent_span_id == a.span_id
                    })
            })
        });
        let window_from_wm = aggregated.iter().all(|a| {
            parent_of(a).is_some_and(|p| p.service == "workflow-manager" && p.kind == PRODUCER)
        });
        if stored && groups.len() == 2 && aggregated.len() >= 2 && milled && window_from_wm {
            let window_traces: std::collections::BTreeSet<&str> =
                aggregated.iter().map(|a| a.trace_id.as_str()).collect();
            let in_window = spans
                .iter()
                .filter(|s| window_traces.contains(s.trace_id.as_str()));
            let mut lines = Vec::new();
            for s in in_trace.iter().copied().chain(in_window) {
                lines.push(format!(
                    "  trace {}… span {} parent {:16} {:>16} {:9} {} {}",
                    &s.trace_id[..8],
                    s.span_id,
                    s.parent_span_id,
                    s.service,
                    match s.kind {
                        PRODUCER => "producer",
                        CONSUMER => "consumer",
                        _ => "internal",
                    },
                    s.name,
                    if s.links.is_empty() {
                        String::new()
                    } else {
                        format!("(links to {} batch traces)", s.links.len())
                    }
                ));
            }
            return lines.join("\n");
        }
        why.push(format!(
            "batch {batch}: stored by the ingestor in its trace: {stored}; validated under a \
             workflow-manager's send by groups {groups:?}; aggregate-worker spans linking to it: {}; \
             a mill span under an aggregate-worker's send: {milled}; aggregate spans under a \
             workflow-manager's send: {window_from_wm}",
            aggregated.len()
        ));
    }
    let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for s in spans {
        *counts
            .entry((s.service.clone(), s.name.clone()))
            .or_default() += 1;
    }
    panic!(
        "no batch has a whole trace; received {} spans: {counts:#?}\n{}",
        spans.len(),
        why.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn e2e_kafka() {
    let addr = emulators::local_services::address(&emulators::local_services::KAFKA);
    e2e(
        &format!("kafka://{addr}"),
        "kafka",
        Stores::Files,
        &[],
        Plain::Kafka(addr.clone()),
    );
}

/// AWS: SNS topics, SQS queues and S3 buckets, all on moto.
#[test]
fn e2e_sns_sqs() {
    let endpoint = emulators::emulator("moto");
    // The test process reads `.rejected` through the bus, with moto's dummy credentials too.
    if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    }
    e2e(
        &format!("sns-sqs://us-east-1?endpoint={endpoint}"),
        "sns-sqs",
        Stores::S3 {
            endpoint: endpoint.clone(),
        },
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ],
        Plain::Sns(endpoint.clone()),
    );
}

/// Google Cloud: Pub/Sub on its emulator. The stores are local files: the GCS emulator cannot take
/// `object_store`'s uploads (see tests/cloud_stores.rs).
#[test]
fn e2e_pubsub() {
    let pubsub = emulators::emulator("pubsub");
    e2e(
        &format!("pubsub://millrace-e2e?emulator={pubsub}"),
        "pubsub",
        Stores::Files,
        &[],
        Plain::PubSub(pubsub.clone(), "millrace-e2e".to_string()),
    );
}

/// Without `--create-topics`, a service on a bus whose topics are infrastructure (SNS/SQS,
/// Pub/Sub) refuses to start when its topic is missing, and says which one.
#[test]
fn a_missing_topic_is_a_start_up_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        Command::new(bin("millrace"))
            .args(["keygen", "--dir"])
            .arg(d),
        "millrace keygen",
    );
    let config = d.join("millrace.toml").display().to_string();
    let store = format!("file://{}", d.join("store").display());
    let moto = emulators::emulator("moto");
    let pubsub = emulators::emulator("pubsub");
    for bus in [
        format!("sns-sqs://us-east-1?endpoint={moto}"),
        format!("pubsub://millrace-e2e?emulator={pubsub}"),
    ] {
        let prefix = emulators::unique("missing");
        let log = d.join(format!("{prefix}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(bin("intake-worker"))
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .args([
                "--bus",
                &bus,
                "--topic-prefix",
                &prefix,
                "--metrics-addr",
                "127.0.0.1:0",
                "--config",
                &config,
                "--facilitator",
                "0",
                "--store",
                &store,
                "--peer-store",
                &store,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("starting intake-worker: {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{bus}: intake-worker kept running without its topic");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!status.success(), "{bus}: exited 0 without its topic");
        let topic = topics::intake(&prefix, 0);
        assert!(
            stderr.contains(&topic) && stderr.contains("--create-topics"),
            "{bus}: the error should name {topic} and say how to create it:\n{stderr}"
        );
    }
}

/// Starts an intake-worker on each bus URL of `cases` (URL, what its output must name), at log
/// level trace, with `MILLRACE_BUS_PASSWORD` = `secret`; returns how each failed to fail at
/// start-up, or showed `secret`.
fn bad_bus_url_problems(secret: &str, cases: &[(String, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        Command::new(bin("millrace"))
            .args(["keygen", "--dir"])
            .arg(d),
        "millrace keygen",
    );
    let config = d.join("millrace.toml").display().to_string();
    let store = format!("file://{}", d.join("store").display());
    let mut problems = Vec::new();
    for (bus, names) in cases {
        let shown = millrace_secrets::redact(bus);
        let log = d.join("stderr.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(bin("intake-worker"))
            .env("MILLRACE_BUS_PASSWORD", secret)
            .env("RUST_LOG", "trace")
            .args([
                "--bus",
                bus,
                "--metrics-addr",
                "127.0.0.1:0",
                "--config",
                &config,
                "--facilitator",
                "0",
                "--store",
                &store,
                "--peer-store",
                &store,
            ])
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("starting intake-worker: {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        match status {
            None => problems.push(format!("{shown}: still running after 60 s")),
            Some(s) if s.success() => problems.push(format!("{shown}: exited 0")),
            Some(_) => {}
        }
        for line in output.lines().filter(|l| l.contains(secret)) {
            problems.push(format!("{shown}: the output shows the password: {line}"));
        }
        if !output.contains(names) {
            problems.push(format!("{shown}: the error should name {names}:\n{output}"));
        }
        println!("{shown}:\n{}", output.lines().last().unwrap_or_default());
    }
    problems
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// An intake-worker given a password in an unreachable or mistyped bus URL (every scheme) fails
/// at start-up with an error that names the host, or the mistake, but never the password, even
/// at log level trace.
#[test]
fn a_bad_bus_url_is_a_start_up_error_that_never_shows_the_password() {
    const SECRET: &str = "Sup3r-S3cret-pw";
    let port = closed_port();
    let cases = [
        (
            format!("amqp://millrace:{SECRET}@127.0.0.1:{port}/%2f"),
            "127.0.0.1",
        ),
        (
            format!("amqps://millrace:{SECRET}@127.0.0.1:{port}/%2f"),
            "127.0.0.1",
        ),
        (
            format!("amqp://millrace@127.0.0.1:{port}/%2f?password=env:MILLRACE_BUS_PASSWORD"),
            "127.0.0.1",
        ),
        (
            format!("kafka://millrace:{SECRET}@127.0.0.1:{port}"),
            "127.0.0.1",
        ),
        (
            format!("amqp://millrace:{SECRET}@rabbit.example:notaport/%2f"),
            "rabbit.example",
        ),
        (
            format!("nats//millrace:{SECRET}@nats.example:4222"),
            "nats.example",
        ),
        (format!("sns-sqs://u:{SECRET}@us-east-1/x"), "us-east-1"),
        (format!("pubsub://u:{SECRET}@project/x"), "project"),
    ];
    let problems = bad_bus_url_problems(SECRET, &cases);
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// The same for NATS credentials in the URL: the service refuses them (they must be references)
/// and never shows the password.
#[test]
fn a_bad_nats_url_is_a_start_up_error_that_never_shows_the_password() {
    const SECRET: &str = "Nats-S3cret-pw";
    let port = closed_port();
    let cases = [
        (
            format!("nats://millrace:{SECRET}@127.0.0.1:{port}"),
            "127.0.0.1",
        ),
        (format!("nats://{SECRET}@127.0.0.1:{port}"), "127.0.0.1"),
    ];
    let problems = bad_bus_url_problems(SECRET, &cases);
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}
