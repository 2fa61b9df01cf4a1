//! The operator's kit in deploy/monitoring, checked with the real tools:
//!
//! * `promtool check rules` accepts the alert rules, and `promtool test rules` passes their unit
//!   tests (which must show the dead-letter alert both firing and silent); a rule broken on
//!   purpose makes promtool fail, so these checks can fail.
//! * The Prometheus Operator's copy (deploy/k8s/components/monitoring/prometheusrule.yaml) holds
//!   exactly the same groups.
//! * Every `millrace_…` metric the rules and the Grafana dashboard query is one the Rust sources
//!   define (a string literal under services/, shared/ or src/), so a typo fails.
//! * The dashboard is a Grafana JSON model with its Prometheus datasource as a variable, and a
//!   real Prometheus (started with scripts/prometheus.sh and the Docker Compose scrape config)
//!   loads the rules and evaluates every dashboard query.
//!
//! Needs promtool and prometheus (`scripts/prometheus.sh install`, which `make test` runs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_norway::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn monitoring(file: &str) -> PathBuf {
    root().join("deploy/monitoring").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_norway::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("monitoring-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

const PROMTOOL_WHY: &str = "install it with `scripts/prometheus.sh install` (Debian's prometheus \
package; `make test` does this)";

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running promtool {}: {e}; {PROMTOOL_WHY}", args.join(" ")))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `promtool check rules` and `promtool test rules` over the files in `dir`.
fn promtool_problems(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for args in [
        ["check", "rules", "prometheus-rules.yaml"],
        ["test", "rules", "prometheus-rules.test.yaml"],
    ] {
        let out = promtool(&args, dir);
        if !out.status.success() {
            problems.push(format!(
                "promtool {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                text(&out)
            ));
        }
    }
    problems
}

fn copy_rules_to(dir: &Path, edit: impl FnOnce(String) -> String) {
    let rules = read(&monitoring("prometheus-rules.yaml"));
    let edited = edit(rules.clone());
    assert_ne!(edited, rules, "the edit changed nothing");
    std::fs::write(dir.join("prometheus-rules.yaml"), edited).unwrap();
    std::fs::copy(
        monitoring("prometheus-rules.test.yaml"),
        dir.join("prometheus-rules.test.yaml"),
    )
    .unwrap();
}

#[test]
fn promtool_accepts_the_rules_and_passes_their_unit_tests() {
    let problems = promtool_problems(&root().join("deploy/monitoring"));
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));

    // The unit tests show the dead-letter alert firing after dead letters and silent without.
    let tests = yaml(&monitoring("prometheus-rules.test.yaml"));
    let cases: Vec<&Value> = tests["tests"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .filter(|c| c["alertname"].as_str() == Some("MillraceDeadLetters"))
        .collect();
    let firing = cases
        .iter()
        .any(|c| c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()));
    let silent = cases
        .iter()
        .any(|c| c["exp_alerts"].as_sequence().is_some_and(|a| a.is_empty()));
    assert!(
        firing && silent,
        "prometheus-rules.test.yaml must test MillraceDeadLetters both firing (non-empty exp_alerts) \
         and silent (exp_alerts: []); firing: {firing}, silent: {silent}"
    );
}

#[test]
fn a_broken_rule_fails_promtool() {
    // An alert that no longer fires on dead letters: its unit test fails.
    let dir = scratch("deaf");
    copy_rules_to(&dir, |r| {
        r.replacen(
            r#"rate(millrace_tasks_total{outcome="dead"}[10m])) > 0"#,
            r#"rate(millrace_tasks_total{outcome="dead"}[10m])) > 1000"#,
            1,
        )
    });
    let problems = promtool_problems(&dir);
    assert!(
        problems.len() == 1
            && problems[0].contains("promtool test rules")
            && problems[0].contains("MillraceDeadLetters"),
        "a dead-letter alert that never fires was not caught by its unit test: {problems:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A rule that does not parse.
    let dir = scratch("unparsable");
    copy_rules_to(&dir, |r| {
        r.replacen(
            r#"(rate(millrace_tasks_total{outcome="rejected"}[10m])) > 0"#,
            r#"(rate(millrace_tasks_total{outcome="rejected"}[10m]) > 0"#,
            1,
        )
    });
    let problems = promtool_problems(&dir);
    assert!(
        problems.iter().any(|p| p.contains("promtool check rules")),
        "an unparsable rule was not caught by promtool check rules: {problems:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_prometheus_operator_rule_holds_the_same_groups() {
    let plain = yaml(&monitoring("prometheus-rules.yaml"));
    let path = root().join("deploy/k8s/components/monitoring/prometheusrule.yaml");
    let operator = yaml(&path);
    assert_eq!(
        operator["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(operator["kind"].as_str(), Some("PrometheusRule"));
    let (mine, theirs) = (&operator["spec"]["groups"], &plain["groups"]);
    if mine != theirs {
        let alerts = |v: &Value| -> Vec<String> {
            v.as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
                .map(|r| serde_norway::to_string(r).unwrap_or_default())
                .collect()
        };
        let (a, b) = (alerts(mine), alerts(theirs));
        let differ: Vec<&String> = a.iter().filter(|r| !b.contains(r)).collect();
        panic!(
            "{} differs from deploy/monitoring/prometheus-rules.yaml (spec.groups must equal its \
             groups); rules only in the PrometheusRule:\n{differ:#?}",
            path.display()
        );
    }
}

/// The `millrace_…` names in `text`, without a histogram's or summary's `_bucket`, `_sum` or
/// `_count` suffix.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("millrace_") {
        let start = from + at;
        let before_ok = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start + "millrace_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok && end > start + "millrace_".len() {
            let mut name = text[start..end].trim_end_matches('_');
            for suffix in ["_bucket", "_sum", "_count"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            names.insert(name.to_string());
        }
        from = end;
    }
    names
}

/// Every `"millrace_…"` string literal in the Rust sources (tests excluded).
fn defined_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                if name != "tests" && name != "target" && !name.starts_with('.') {
                    walk(&path, out);
                }
            } else if name.ends_with(".rs") {
                let text = read(&path);
                let mut rest = text.as_str();
                while let Some(at) = rest.find("\"millrace_") {
                    rest = &rest[at + 1..];
                    let end = rest.find('"').unwrap_or(0);
                    let literal = &rest[..end];
                    if literal.len() > "millrace_".len()
                        && literal
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    {
                        out.insert(literal.to_string());
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for dir in ["services", "shared", "src"] {
        walk(&root().join(dir), &mut out);
    }
    out
}

fn dashboard() -> serde_json::Value {
    let path = monitoring("grafana-dashboard.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    panels(dashboard)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

/// The rules' expressions and annotations (which name metrics for the operator to look at).
fn rules_text() -> String {
    read(&monitoring("prometheus-rules.yaml"))
}

fn undefined(queried: &BTreeSet<String>, defined: &BTreeSet<String>) -> Vec<String> {
    queried.difference(defined).cloned().collect()
}

#[test]
fn every_metric_the_rules_and_the_dashboard_query_is_defined_in_the_code() {
    let defined = defined_metrics();
    assert!(
        defined.contains("millrace_tasks_total") && defined.len() > 20,
        "found too few metric names in the sources ({defined:?}): has the code moved?"
    );
    let from_rules = metric_names(&rules_text());
    let from_dashboard: BTreeSet<String> = dashboard_exprs(&dashboard())
        .iter()
        .flat_map(|e| metric_names(e))
        .collect();
    assert!(from_rules.len() > 10 && from_dashboard.len() > 10);
    let mut problems = Vec::new();
    for (what, names) in [
        ("deploy/monitoring/prometheus-rules.yaml", &from_rules),
        ("deploy/monitoring/grafana-dashboard.json", &from_dashboard),
    ] {
        for name in undefined(names, &defined) {
            problems.push(format!(
                "{what} queries {name}, which no Rust source under services/, shared/ or src/ defines"
            ));
        }
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

#[test]
fn a_misspelt_metric_is_caught() {
    let defined = defined_metrics();
    let queried = metric_names(
        r#"sum(rate(millrace_taks_total{outcome="dead"}[5m])) + histogram_quantile(0.9, rate(millrace_window_result_lag_seconds_bucket[1h]))"#,
    );
    assert_eq!(
        queried,
        BTreeSet::from([
            "millrace_taks_total".to_string(),
            "millrace_window_result_lag_seconds".to_string()
        ])
    );
    assert_eq!(
        undefined(&queried, &defined),
        vec!["millrace_taks_total".to_string()]
    );
    // Not metric names: a word that merely contains one, a topic, a command.
    assert!(metric_names("xmillrace_tasks_total millrace.0.intake `millrace status`").is_empty());
}

#[test]
fn the_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable() {
    let d = dashboard();
    let mut problems = Vec::new();
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let datasource = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    let Some(datasource) = datasource else {
        panic!("the dashboard has no datasource variable of type prometheus (templating.list)");
    };
    let var = format!("${{{}}}", datasource["name"].as_str().unwrap_or_default());
    for key in ["title", "uid"] {
        if d[key].as_str().unwrap_or_default().is_empty() {
            problems.push(format!("no {key}"));
        }
    }
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            problems.push(format!("panel {title:?}: duplicate or missing id"));
        }
        if p["type"] == "row" {
            continue;
        }
        for (what, ds) in std::iter::once(("panel", &p["datasource"])).chain(
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| ("target", &t["datasource"])),
        ) {
            if ds["uid"].as_str() != Some(var.as_str()) || ds["type"] != "prometheus" {
                problems.push(format!(
                    "panel {title:?}: {what} datasource {ds} is not the variable {var}"
                ));
            }
        }
        if p["targets"].as_array().is_none_or(|t| t.is_empty()) {
            problems.push(format!("panel {title:?} has no query"));
        }
    }
    // What operators look at first.
    let queried: BTreeSet<String> = dashboard_exprs(&d)
        .iter()
        .flat_map(|e| metric_names(e))
        .collect();
    for want in [
        "millrace_tasks_total",
        "millrace_task_duration_seconds",
        "millrace_tasks_in_flight",
        "millrace_messages_unmovable_total",
        "millrace_batch_validation_lag_seconds",
        "millrace_window_manifest_lag_seconds",
        "millrace_window_sum_part_lag_seconds",
        "millrace_window_result_lag_seconds",
        "millrace_windows_succeeded_total",
        "millrace_windows_failed_total",
        "millrace_windows_refused_total",
        "millrace_windows_waiting",
        "millrace_reports_validated_total",
        "millrace_reports_invalid_total",
        "millrace_ingestor_reports_accepted_total",
        "millrace_ingestor_refusals_total",
        "millrace_ingestor_overloaded_total",
        "millrace_ingestor_flush_seconds",
    ] {
        if !queried.contains(want) {
            problems.push(format!("no panel queries {want}"));
        }
    }
    for expr in dashboard_exprs(&d) {
        for lag in ["_lag_seconds_bucket"] {
            if expr.contains(lag) && !expr.contains("histogram_quantile") {
                problems.push(format!(
                    "{expr}: a lag histogram outside histogram_quantile"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// Stops the Prometheus that scripts/prometheus.sh started, however the test ends.
struct Prometheus(String);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/prometheus.sh"))
            .arg("stop")
            .output();
    }
}

fn http_get(url: &str, query: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-G", url]);
    for (k, v) in query {
        cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running curl {url}: {e}"));
    assert!(out.status.success(), "curl {url}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{url} answered no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn a_real_prometheus_loads_the_compose_config_and_evaluates_every_dashboard_query() {
    // The compose config, with its rules file where it is in this checkout.
    let dir = scratch("compose");
    let config = read(&monitoring("prometheus-compose.yml")).replace(
        "/etc/prometheus/millrace/",
        &format!("{}/", root().join("deploy/monitoring").display()),
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let out = Command::new(root().join("scripts/prometheus.sh"))
        .arg("start")
        .arg(&config_path)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/prometheus.sh start: {e}"));
    assert!(
        out.status.success(),
        "scripts/prometheus.sh start failed:\n{}",
        text(&out)
    );
    let prometheus = Prometheus(String::from_utf8_lossy(&out.stdout).trim().to_string());
    assert!(
        prometheus.0.starts_with("http://127.0.0.1:"),
        "scripts/prometheus.sh start printed {:?}, not an address",
        prometheus.0
    );

    // The rules are loaded.
    let rules = http_get(&format!("{}/api/v1/rules", prometheus.0), &[]);
    let loaded: BTreeSet<String> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect();
    let plain = yaml(&monitoring("prometheus-rules.yaml"));
    let want: BTreeSet<String> = plain["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        loaded, want,
        "Prometheus loaded other rules than prometheus-rules.yaml holds"
    );

    // Every dashboard query evaluates (with Grafana's variables filled in).
    let mut problems = Vec::new();
    for expr in dashboard_exprs(&dashboard()) {
        let query = expr.replace("$__rate_interval", "1m").replace("$job", ".*");
        let answer = http_get(
            &format!("{}/api/v1/query", prometheus.0),
            &[("query", &query)],
        );
        if answer["status"] != "success" {
            problems.push(format!("{query}: {}", answer["error"]));
        }
    }
    assert!(
        problems.is_empty(),
        "Prometheus refused dashboard queries:\n  {}",
        problems.join("\n  ")
    );
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
}
