//! `millrace status` as an operator meets it, run as a process over local-file stores that the
//! pipeline's own services filled: the page `--serve` renders in a real browser (headless
//! Chromium: Debian's `chromium`, installed by `scripts/chromium.sh install`, which `make test`
//! runs), `--json`, and the exit codes.
//!
//! The stores hold windows in every state the page colours: SUCCEEDED (ingested, validated,
//! decided, aggregated and joined by the services), waiting for facilitator 1's sum part (only
//! the leader aggregated), waiting for the manifest (validated on both sides, no leader pass
//! since), waiting for validations (nobody looked yet), open (the current hour), and a FAILED and
//! a REFUSED record of the mill's.

#[path = "support/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{harness_on, now, Harness, PREFIX};
use millrace::ingest::{ingest, Expectations, IngestPlan};
use millrace::status::WindowState;
use millrace_protocol::layout::{computation_key, Window};
use millrace_protocol::results::{Computation, ComputationState, COMPUTATION_VERSION};
use millrace_protocol::tasks::{topics, SumPartReady, TaskMessage};
use millrace_store::Store;

const HOUR: i64 = 3600;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The headless browser: MILLRACE_TEST_CHROMIUM, else what `scripts/chromium.sh path` finds. A
/// missing browser fails the test, by name: it is not skipped.
fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("MILLRACE_TEST_CHROMIUM") {
        return PathBuf::from(path);
    }
    let out = Command::new(root().join("scripts/chromium.sh"))
        .arg("path")
        .output()
        .unwrap_or_else(|e| panic!("running scripts/chromium.sh path: {e}"));
    assert!(
        out.status.success(),
        "headless Chromium is missing and this test needs it: run `scripts/chromium.sh install` \
         (as root; `make test` does), or set MILLRACE_TEST_CHROMIUM to a Chromium binary.\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs `command` to its end within `limit`; its stdout, or a panic naming `what`.
fn run_within(mut command: Command, limit: Duration, what: &str) -> String {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Every (aggregation, window) of `e`.
fn windows_of(e: &Expectations) -> Vec<(String, String)> {
    e.windows
        .iter()
        .map(|w| (w.aggregation.clone(), w.window.clone()))
        .collect()
}

/// One window the stores hold, with the state and the start of the reason status must show.
#[derive(Clone, Debug)]
struct Expected {
    aggregation: String,
    window: String,
    state: WindowState,
    reason: String,
}

struct State {
    _dir: tempfile::TempDir,
    h: Harness,
    urls: [String; 3],
    /// The windows that got a result, as `millrace ingest --expect-out` writes them.
    succeeded: Expectations,
    expected: Vec<Expected>,
}

/// Fills local-file stores through the services (see the module docs).
async fn build_state() -> State {
    let dir = tempfile::tempdir().unwrap();
    let url = |name: &str| format!("file://{}/{name}", dir.path().display());
    let urls = [url("alpha"), url("beta"), url("collector")];
    let mut h = harness_on([
        Store::open(&urls[0]).unwrap(),
        Store::open(&urls[1]).unwrap(),
    ]);
    h.collector = Store::open(&urls[2]).unwrap();
    let now = now();
    let hour = now.div_euclid(HOUR) * HOUR;
    let send = |start: i64, end: i64, reports: usize| {
        let (config, stores) = (h.config.clone(), h.stores.clone());
        async move {
            ingest(
                &config,
                millrace::keygen::INGESTOR,
                [&stores[0], &stores[1]],
                &IngestPlan {
                    reports,
                    invalid_fraction: 0.0,
                    batch_size: 20,
                    start,
                    end,
                },
                |_| {},
            )
            .await
            .unwrap()
        }
    };
    let mut expected = Vec::new();
    let mut expect = |e: &Expectations, state: WindowState, reason: &str| {
        for (aggregation, window) in windows_of(e) {
            expected.push(Expected {
                aggregation,
                window,
                state,
                reason: reason.to_string(),
            });
        }
    };
    // SUCCEEDED: two closed hours through every service.
    let succeeded = send(hour - 3 * HOUR, hour - HOUR, 500).await;
    h.validate_all(now).await;
    h.complete(now).await;
    assert!(succeeded.windows.iter().all(|w| !w.refused));
    expect(&succeeded, WindowState::Succeeded, "result ");
    // One sum part: the leader decides and aggregates, the helper never does.
    let one_part = send(hour - 13 * HOUR, hour - 12 * HOUR, 100).await;
    h.validate_all(now).await;
    let mill = h.mill();
    for task in h.aggregate_tasks(0).await {
        h.aggregator(0).aggregate(&task).await.unwrap();
    }
    for d in h.drain(&topics::collect(PREFIX)).await {
        mill.join(&SumPartReady::from_json(&d.body).unwrap())
            .await
            .unwrap();
        d.ack().await.unwrap();
    }
    expect(
        &one_part,
        WindowState::Waiting,
        "waiting for facilitator 1 (beta)'s sum part (generation 0); the mill records it FAILED at ",
    );
    // Validated on both sides; the leader has not passed since.
    let validated = send(hour - 6 * HOUR, hour - 5 * HOUR, 100).await;
    h.validate_all(now).await;
    expect(
        &validated,
        WindowState::Waiting,
        "waiting for the manifest: every batch seen is validated by both",
    );
    // Nobody has looked at these batches yet.
    let unvalidated = send(hour - 8 * HOUR, hour - 7 * HOUR, 100).await;
    expect(
        &unvalidated,
        WindowState::Waiting,
        "waiting for validations: ",
    );
    // The current hour.
    let open = send(hour, now.max(hour + 1), 100).await;
    expect(&open, WindowState::Open, "window not closed until ");
    // The mill's FAILED and REFUSED records.
    for (back, state, detail) in [
        (
            10,
            ComputationState::Failed,
            "sum part of facilitator 1 (beta) never came",
        ),
        (
            11,
            ComputationState::Refused,
            "facilitator 0 (alpha): 3 valid reports, fewer than 10",
        ),
    ] {
        let w = Window::containing(hour - back * HOUR, HOUR);
        let record = Computation {
            version: COMPUTATION_VERSION,
            aggregation: "clicks".into(),
            window: w.name(),
            state,
            generation: 0,
            updated_at: now,
            since: None,
            detail: Some(detail.into()),
        };
        h.collector
            .create(&computation_key("clicks", w), record.to_json())
            .await
            .unwrap();
        expected.push(Expected {
            aggregation: "clicks".into(),
            window: w.name(),
            state: if state == ComputationState::Failed {
                WindowState::Failed
            } else {
                WindowState::Refused
            },
            reason: detail.into(),
        });
    }
    State {
        _dir: dir,
        h,
        urls,
        succeeded,
        expected,
    }
}

/// `millrace status` with the state's config and stores, and `extra`.
fn status(state: &State, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_millrace"));
    c.arg("status")
        .arg("--config")
        .arg(state.h.config_path())
        .args(["--store0", &state.urls[0]])
        .args(["--store1", &state.urls[1]])
        .args(["--collector-store", &state.urls[2]])
        .args(extra)
        .env_remove("MILLRACE_BUS");
    c
}

/// The served status page's process, stopped when dropped.
struct Served {
    child: Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(state: &State) -> Served {
    let mut child = status(state, &["--serve", "127.0.0.1:0", "--refresh", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("millrace status --serve printed no address in 60 s"));
    let url = line
        .strip_prefix("status page on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line of millrace status --serve: {line:?}"))
        .to_string();
    Served { child, url }
}

/// `#rrggbb` as the browser reports a computed colour: `rgb(r, g, b)`.
fn rgb(hex: &str) -> String {
    let c = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).unwrap();
    format!("rgb({}, {}, {})", c(1), c(3), c(5))
}

/// The opening tag of the element carrying `attribute` in `dom`.
fn tag_with<'a>(dom: &'a str, attribute: &str) -> Option<&'a str> {
    let at = dom.find(attribute)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

fn browser(url: &str, profile: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_shows_every_window_in_the_colour_of_its_state_and_a_legend() {
    let state = build_state().await;
    let served = serve(&state);
    let profile = tempfile::tempdir().unwrap();

    // The JSON the page is made of: each window's state and why.
    let json: serde_json::Value = reqwest::get(format!("{}status.json", served.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["version"], 1);
    for e in &state.expected {
        let window = json["aggregations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["id"] == e.aggregation.as_str())
            .flat_map(|a| a["windows"].as_array().unwrap().iter())
            .find(|w| w["window"] == e.window.as_str())
            .unwrap_or_else(|| panic!("{e:?} missing from /status.json"));
        assert_eq!(window["state"], e.state.label(), "{e:?}: {window}");
        let reason = window["reason"].as_str().unwrap();
        assert!(reason.starts_with(&e.reason), "{e:?}: {reason}");
    }

    // The page as Chromium renders it, script run: every window's cell with its state's class
    // and the colour the browser computed for it, and the legend.
    let dom = tokio::task::block_in_place(|| {
        run_within(
            browser(&served.url, profile.path(), &["--dump-dom"]),
            Duration::from_secs(120),
            "chromium --dump-dom",
        )
    });
    assert!(dom.contains("<h1>millrace status</h1>"), "{dom}");
    for e in &state.expected {
        let key = format!("data-key=\"{}/{}\"", e.aggregation, e.window);
        let cell = tag_with(&dom, &key)
            .unwrap_or_else(|| panic!("no cell for {e:?} in the rendered page:\n{dom}"));
        let label = e.state.label();
        assert!(
            cell.contains(&format!("class=\"cell state-{label}\"")),
            "{e:?}: {cell}"
        );
        assert!(
            cell.contains(&format!("data-colour=\"{}\"", rgb(e.state.colour()))),
            "{e:?}: the browser computed another colour: {cell}"
        );
    }
    let legend = dom
        .split("<ul id=\"legend\">")
        .nth(1)
        .and_then(|rest| rest.split("</ul>").next())
        .unwrap_or_else(|| panic!("no legend in the rendered page:\n{dom}"));
    for s in WindowState::ALL {
        let swatch = tag_with(legend, &format!("class=\"swatch state-{}\"", s.label()))
            .unwrap_or_else(|| panic!("no legend entry for {}: {legend}", s.label()));
        assert!(
            swatch.contains(&format!("data-colour=\"{}\"", rgb(s.colour()))),
            "{swatch}"
        );
        assert!(legend.contains(s.meaning()), "{legend}");
    }
    // Both facilitators side by side in the progress table.
    assert!(dom.contains("facilitator 0 (alpha)") && dom.contains("facilitator 1 (beta)"));

    // A screenshot of it.
    let shot = root().join("build/status-page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shot);
    tokio::task::block_in_place(|| {
        run_within(
            browser(
                &served.url,
                profile.path(),
                &[
                    &format!("--screenshot={}", shot.display()),
                    "--window-size=1200,800",
                    "--hide-scrollbars",
                ],
            ),
            Duration::from_secs(120),
            "chromium --screenshot",
        )
    });
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("chromium wrote no screenshot at {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        shot.display()
    );
    assert!(
        png.len() > 10_000,
        "a blank screenshot? {} bytes",
        png.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_and_exit_codes_tell_results_problems_and_failures_apart() {
    let state = build_state().await;
    let run = |mut c: Command| {
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The view: 0, and the JSON is the documented shape.
    let (code, stdout, stderr) = run(status(&state, &["--json"]));
    assert_eq!(code, Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["problems"].as_array().unwrap().len(), 2, "{json}");
    // The text view, with both facilitators' rows and the reasons.
    let (code, text, stderr) = run(status(&state, &[]));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(text.contains("progress per window (facilitator 0 = alpha, facilitator 1 = beta"));
    for e in &state.expected {
        assert!(text.contains(&e.window), "{e:?}\n{text}");
        assert!(text.contains(&e.reason), "{e:?}\n{text}");
    }
    // A FAILED and a REFUSED window are problems: 3 when asked to fail on them.
    let (code, stdout, _) = run(status(&state, &["--fail-on-problems"]));
    assert_eq!(code, Some(3), "{stdout}");
    assert!(stdout.contains("problems (2):"), "{stdout}");
    // --expect: every released result as expected is 0, one that differs 1.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, serde_json::to_vec(&state.succeeded).unwrap()).unwrap();
    let (code, stdout, stderr) = run(status(&state, &["--expect", good.to_str().unwrap()]));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.lines().all(|l| l.starts_with("ok ")), "{stdout}");
    let mut wrong = state.succeeded.clone();
    wrong.windows[0].valid += 1;
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&wrong).unwrap()).unwrap();
    let (code, stdout, _) = run(status(&state, &["--expect", bad.to_str().unwrap()]));
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.starts_with("WRONG "), "{stdout}");
    // Could not run: 2, naming what was wrong.
    let mut c = Command::new(env!("CARGO_BIN_EXE_millrace"));
    c.args(["status", "--config"])
        .arg(state.h.config_path())
        .args(["--collector-store", "nosuch://bucket"]);
    let (code, _, stderr) = run(c);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown scheme \"nosuch\""), "{stderr}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_millrace"));
    c.args(["status", "--config", "/nonexistent/millrace.toml"])
        .args(["--collector-store", &state.urls[2]]);
    let (code, _, stderr) = run(c);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/millrace.toml"), "{stderr}");
    // Bad arguments (clap): 2 as well.
    let (code, _, stderr) = run(status(&state, &["--json", "--serve", "127.0.0.1:0"]));
    assert_eq!(code, Some(2), "{stderr}");
    // MILLRACE_TEST_KEEP_STATE=1 keeps the stores and config for a look by hand.
    if std::env::var_os("MILLRACE_TEST_KEEP_STATE").is_some() {
        println!(
            "kept: --config {} --store0 {} --store1 {} --collector-store {}",
            state.h.config_path().display(),
            state.urls[0],
            state.urls[1],
            state.urls[2]
        );
        std::mem::forget(state);
    }
}
