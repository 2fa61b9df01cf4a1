//! The deployment files, checked against the binaries they run:
//!
//! * `docker-compose.yml`: every flag and `MILLRACE_*` variable a service passes is one its
//!   binary accepts (read from the built binary's `--help`), every required setting is given,
//!   images come from stages `deploy/Dockerfile` has, `depends_on` targets, named volumes and
//!   brokers exist, ports bind to 127.0.0.1, and every profile is a whole fleet on its own bus,
//!   with an ingestor that publishes its upload port, is what the simulated clients reach, and
//!   sees no other party's private keys.
//! * `deploy/k8s`: each overlay as `kubectl kustomize` renders it: kinds, schedules, probes (on
//!   paths the binary says it serves), grace periods, settings and their URLs per cloud, the
//!   config and key files each container needs (and no more), network policies, the ingestor's
//!   Service, PodDisruptionBudget and autoscaler; and the facilitator-1 component.
//! * The operator's kit: the compose profile `monitoring` scrapes exactly the services that serve
//!   metrics; in the cloud overlays a PodMonitor selects every Deployment's pods on their metrics
//!   port, each worker has a KEDA ScaledObject on its own SQS queue or Pub/Sub subscription (as
//!   the bus names them), and every Deployment a PodDisruptionBudget that lets nodes drain.
//! * `deploy/terraform`: `terraform fmt -check`, and the AWS module's SNS/SQS naming against the
//!   bus's own mapping.
//!
//! Each checker returns the problems it finds; the `*_is_caught` tests hand each one a broken
//! input to prove it can fail.
//!
//! Needs the binaries (`cargo build --workspace --bins`, which `make test` does), `kubectl` and
//! `terraform`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use serde_norway::Value;

/// The binaries the images hold (one Dockerfile target each).
const BINARIES: [&str; 7] = [
    "millrace",
    "ingestor",
    "workflow-manager",
    "intake-worker",
    "aggregate-worker",
    "mill",
    "cleaner",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bin(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_millrace"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first (`cargo build --workspace --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// Finds an external tool, or says what to install.
fn require_tool(name: &str, why: &str) -> Result<(), String> {
    match Command::new(name).arg("version").output() {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "`{name}` cannot be run ({e}): install {name} — {why}. These checks do not skip \
             themselves."
        )),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ------------------------------------------------------------------------------------------------
// What a binary accepts, from its --help
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Cli {
    /// `--flag` → the environment variable that also sets it, if any.
    flags: BTreeMap<String, Option<String>>,
    /// `--flag` → its default, as `--help` shows it.
    defaults: BTreeMap<String, String>,
    /// `--flag` → its whole help text (what it says the flag is for).
    help: BTreeMap<String, String>,
    /// Flags the usage line requires.
    required: BTreeSet<String>,
    /// Subcommands (the `millrace` CLI's).
    subcommands: BTreeSet<String>,
    /// `MILLRACE_*` variables read outside the flags (the runtime's logging set-up).
    extra_env: BTreeSet<String>,
}

impl Cli {
    fn accepts_env(&self, name: &str) -> bool {
        self.extra_env.contains(name) || self.flags.values().any(|e| e.as_deref() == Some(name))
    }
    fn env_of(&self, flag: &str) -> Option<&str> {
        self.flags.get(flag).and_then(|e| e.as_deref())
    }
}

fn between<'a>(text: &'a str, start: &str, ends: &[char]) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let rest = &text[from..];
    let to = rest.find(|c| ends.contains(&c)).unwrap_or(rest.len());
    Some(&rest[..to])
}

/// Reads clap's `--help`: option blocks (an option line and its more-indented continuation
/// lines), the usage line's required flags and the subcommand list.
fn parse_help(text: &str) -> Cli {
    let mut cli = Cli::default();
    let mut blocks: Vec<(String, usize, String)> = Vec::new();
    let mut open = false;
    let mut in_commands = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(usage) = line.strip_prefix("Usage:") {
            for token in usage.split_whitespace() {
                if token.starts_with("--") {
                    cli.required.insert(token.to_string());
                }
            }
            continue;
        }
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            match trimmed.split_whitespace().next() {
                Some(word) if indent > 0 => {
                    cli.subcommands.insert(word.to_string());
                }
                _ => in_commands = false,
            }
            continue;
        }
        let option = trimmed.strip_prefix('-').filter(|_| indent > 0).map(|_| {
            match trimmed.split_once(", --") {
                Some((short, long)) if short.len() == 2 => format!("--{long}"),
                _ => trimmed.to_string(),
            }
        });
        match option {
            Some(opt) if opt.starts_with("--") => {
                let name: String = opt[2..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                blocks.push((format!("--{name}"), indent, opt.clone()));
                open = true;
            }
            _ => match blocks.last_mut() {
                Some((_, block_indent, body))
                    if open && !trimmed.is_empty() && indent > *block_indent =>
                {
                    body.push(' ');
                    body.push_str(trimmed);
                }
                _ => open = false,
            },
        }
    }
    for (flag, _, body) in blocks {
        let env = between(&body, "[env: ", &['=', ']']).map(str::to_string);
        if let Some(default) = between(&body, "[default: ", &[']']) {
            cli.defaults.insert(flag.clone(), default.to_string());
        }
        cli.help.insert(flag.clone(), body);
        cli.flags.insert(flag, env);
    }
    cli
}

/// `MILLRACE_*` names the runtime reads itself (not flags): string literals in its telemetry.
fn runtime_env() -> BTreeSet<String> {
    let text = read(&root().join("shared/runtime/src/telemetry.rs"));
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("MILLRACE_")
                && s.len() > "MILLRACE_".len()
                && s.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// The `--help` of `binary` (or of `millrace SUB`), parsed once per test process.
fn cli(binary: &str, sub: Option<&str>) -> Cli {
    static CACHE: OnceLock<Mutex<BTreeMap<String, Cli>>> = OnceLock::new();
    let key = format!("{binary} {}", sub.unwrap_or(""));
    let cache = CACHE.get_or_init(|| Mutex::new(BTreeMap::new()));
    if let Some(found) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return found.clone();
    }
    let mut cmd = Command::new(bin(binary));
    cmd.env_clear();
    if let Some(sub) = sub {
        cmd.arg(sub);
    }
    let out = cmd
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running `{key} --help`: {e}"));
    assert!(
        out.status.success(),
        "`{key} --help` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parsed = parse_help(&String::from_utf8_lossy(&out.stdout));
    parsed.extra_env = runtime_env();
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, parsed.clone());
    parsed
}

/// One run of a Millrace binary: its arguments (the subcommand first, for `millrace`) and
/// environment.
#[derive(Clone, Debug)]
struct Invocation {
    who: String,
    binary: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

impl Invocation {
    fn sub(&self) -> Option<&str> {
        (self.binary == "millrace")
            .then(|| self.args.first().map(String::as_str))
            .flatten()
    }

    /// A setting, from `--flag value`, `--flag=value` or the flag's environment variable.
    fn setting(&self, cli: &Cli, flag: &str) -> Option<String> {
        let mut args = self.args.iter();
        while let Some(a) = args.next() {
            if a == flag {
                return match args.next() {
                    Some(v) if !v.starts_with("--") => Some(v.clone()),
                    _ => Some("true".to_string()),
                };
            }
            if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                return Some(v.to_string());
            }
        }
        cli.env_of(flag).and_then(|e| self.env.get(e)).cloned()
    }
}

fn cli_for(inv: &Invocation) -> Cli {
    cli(&inv.binary, inv.sub())
}

/// The binaries every deployment gives the peer facilitator's store (`--peer-store`). The
/// intake-worker's `--help` marks it required; the workflow-manager needs it only as facilitator
/// 0, the leader, which writes each window's manifest to both stores (something `--help` cannot
/// say), and the deployments give it to both facilitators alike.
const PEER_STORE_USERS: [&str; 2] = ["intake-worker", "workflow-manager"];

/// Every flag and `MILLRACE_*` variable is one the binary accepts, and every required flag is
/// given (as a flag or through its variable), the peer store included where
/// [`PEER_STORE_USERS`] says so.
fn check_invocation(inv: &Invocation, cli: &Cli) -> Vec<String> {
    let mut problems = Vec::new();
    let what = match inv.sub() {
        Some(sub) => format!("millrace {sub}"),
        None => inv.binary.clone(),
    };
    if !BINARIES.contains(&inv.binary.as_str()) {
        problems.push(format!("{}: runs unknown binary {:?}", inv.who, inv.binary));
        return problems;
    }
    for arg in &inv.args {
        if let Some(flag) = arg.strip_prefix("--") {
            let name = format!("--{}", flag.split('=').next().unwrap_or(""));
            if !cli.flags.contains_key(&name) {
                problems.push(format!("{}: `{what}` has no flag {name}", inv.who));
            }
        }
    }
    for name in inv.env.keys().filter(|k| k.starts_with("MILLRACE_")) {
        if !cli.accepts_env(name) {
            problems.push(format!(
                "{}: `{what}` reads no environment variable {name}",
                inv.who
            ));
        }
    }
    for flag in &cli.required {
        if inv.setting(cli, flag).is_none() {
            problems.push(format!(
                "{}: `{what}` needs {flag}{} and gets neither",
                inv.who,
                cli.env_of(flag)
                    .map(|e| format!(" (or {e})"))
                    .unwrap_or_default()
            ));
        }
    }
    if PEER_STORE_USERS.contains(&inv.binary.as_str())
        && !cli.required.contains("--peer-store")
        && inv.setting(cli, "--peer-store").is_none()
    {
        problems.push(format!(
            "{}: `{what}` needs --peer-store (or MILLRACE_PEER_STORE) and gets neither: \
             facilitator 0's, the leader's, refuses to start without it, and both facilitators \
             get it alike",
            inv.who
        ));
    }
    problems
}

// ------------------------------------------------------------------------------------------------
// YAML
// ------------------------------------------------------------------------------------------------

fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge_key),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        Value::Tagged(t) => has_merge_key(&t.value),
        _ => false,
    }
}

/// Parses one YAML document, resolving aliases and merge keys (`<<`) as compose does.
fn load_yaml(text: &str, what: &str) -> Value {
    let mut doc: Value =
        serde_norway::from_str(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
    // Merged-in mappings may carry merge keys of their own: apply until none is left.
    for _ in 0..8 {
        if !has_merge_key(&doc) {
            break;
        }
        doc.apply_merge()
            .unwrap_or_else(|e| panic!("{what}: bad merge key: {e}"));
    }
    assert!(!has_merge_key(&doc), "{what}: merge keys left unresolved");
    doc
}

fn load_all_yaml(text: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| {
            use serde::Deserialize;
            Value::deserialize(d).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(s) => s.iter().filter_map(str_of).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

// ------------------------------------------------------------------------------------------------
// docker-compose.yml
// ------------------------------------------------------------------------------------------------

/// Each profile, the scheme of its bus URL and the image of its broker.
const PROFILES: [(&str, &str, &str); 5] = [
    ("rabbitmq", "amqp", "rabbitmq:"),
    ("nats", "nats", "nats:"),
    ("kafka", "kafka", "apache/kafka:"),
    ("aws", "sns-sqs", "motoserver/moto:"),
    (
        "pubsub",
        "pubsub",
        "gcr.io/google.com/cloudsdktool/google-cloud-cli:",
    ),
];

/// Profiles that add to a broker profile rather than run a fleet of their own.
const ADD_ON_PROFILES: [&str; 1] = ["monitoring"];

/// Splits a `sh -c` script into simple commands (words), joining `\`-continued lines and
/// honouring quotes; `;`, `&&`, `||`, `|` and newlines separate commands.
fn shell_commands(script: &str) -> Vec<Vec<String>> {
    let script = script.replace("\\\n", " ");
    let mut commands = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, words: &mut Vec<String>| {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                word.push(n);
                            }
                        }
                        _ => word.push(q),
                    }
                }
            }
            '\n' | ';' | '&' | '|' => {
                end_word(&mut word, &mut in_word, &mut words);
                if !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            c if c.is_whitespace() => end_word(&mut word, &mut in_word, &mut words),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut words);
    if !words.is_empty() {
        commands.push(words);
    }
    commands
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Mapping(m) => m
            .iter()
            .filter_map(|(k, v)| Some((str_of(k)?, str_of(v).unwrap_or_default())))
            .collect(),
        Value::Sequence(s) => s
            .iter()
            .filter_map(str_of)
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The Millrace binary a service's image holds: its build target in deploy/Dockerfile, or its
/// image name `millrace/BINARY:TAG`.
fn compose_binary(svc: &Value) -> Option<String> {
    if let Some(target) = str_of(&svc["build"]["target"]) {
        return Some(target);
    }
    let image = str_of(&svc["image"])?;
    let name = image.strip_prefix("millrace/")?.split(':').next()?;
    Some(name.to_string())
}

/// The Millrace runs of a service: its command given to the image's entrypoint, or each
/// Millrace command of a `sh -c` script.
fn compose_invocations(name: &str, svc: &Value) -> Result<Vec<Invocation>, String> {
    let Some(binary) = compose_binary(svc) else {
        return Ok(Vec::new());
    };
    let env = environment(svc);
    let entrypoint = strings(&svc["entrypoint"]);
    let command = strings(&svc["command"]);
    let shell = entrypoint
        .first()
        .is_some_and(|e| e.ends_with("/sh") || e.ends_with("/bash") || e == "sh" || e == "bash");
    if !shell {
        if !entrypoint.is_empty() {
            return Err(format!(
                "{name}: entrypoint {entrypoint:?} is neither the image's binary nor a shell"
            ));
        }
        return Ok(vec![Invocation {
            who: name.to_string(),
            binary,
            args: command,
            env,
        }]);
    }
    // `sh -ec SCRIPT`: the script is the first command word (or the last entrypoint word).
    let script = match &svc["command"] {
        Value::Sequence(s) => s.first().and_then(str_of),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
    .or_else(|| entrypoint.last().cloned())
    .unwrap_or_default();
    let mut runs = Vec::new();
    for words in shell_commands(&script) {
        let Some(first) = words.first() else { continue };
        let program = first.rsplit('/').next().unwrap_or(first);
        if !BINARIES.contains(&program) {
            continue;
        }
        if program != binary {
            return Err(format!(
                "{name}: its script runs {program}, but its image holds {binary}"
            ));
        }
        runs.push(Invocation {
            who: name.to_string(),
            binary: binary.clone(),
            args: words[1..].to_vec(),
            env: env.clone(),
        });
    }
    if runs.is_empty() {
        return Err(format!("{name}: its script runs no Millrace command"));
    }
    Ok(runs)
}

fn profiles_of(svc: &Value) -> BTreeSet<String> {
    strings(&svc["profiles"]).into_iter().collect()
}

/// One mount of a compose service: a named volume (or a host path), the path inside it that is
/// mounted (`volume.subpath`; empty for all of it), and where it appears in the container.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    source: String,
    subpath: String,
    target: String,
}

/// A service's mounts, in the short syntax (`SOURCE:TARGET[:MODE]`) or the long one.
fn compose_mounts(svc: &Value) -> Vec<Mount> {
    let Value::Sequence(vols) = &svc["volumes"] else {
        return Vec::new();
    };
    vols.iter()
        .filter_map(|v| match v {
            Value::Mapping(_) => Some(Mount {
                source: str_of(&v["source"]).unwrap_or_default(),
                subpath: str_of(&v["volume"]["subpath"])
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_string(),
                target: str_of(&v["target"])?,
            }),
            other => {
                let text = str_of(other)?;
                let mut parts = text.split(':');
                let (source, target) = (parts.next()?, parts.next()?);
                Some(Mount {
                    source: source.to_string(),
                    subpath: String::new(),
                    target: target.to_string(),
                })
            }
        })
        .collect()
}

/// Where a container path lies in the volumes a service mounts: (volume, path inside it).
fn volume_path(mounts: &[Mount], path: &str) -> Option<(String, String)> {
    mounts
        .iter()
        .filter_map(|m| {
            let target = m.target.trim_end_matches('/');
            let rest = path.strip_prefix(target)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let inside = [m.subpath.as_str(), rest.trim_matches('/')]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("/");
            Some((target.len(), (m.source.clone(), inside)))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, found)| found)
}

/// Is `path` (inside a volume) `dir` or inside it?
fn within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"))
}

/// The private key directories of parties other than `own` that `mounts` show: `keygen --dir`
/// writes every party's keys to `keys/NAME/` in its directory (`keygen_dir`: volume, path in it),
/// so a mount of that directory, of its `keys/`, or of another party's `keys/NAME/` shows them.
fn foreign_keys_seen(mounts: &[Mount], keygen_dir: &(String, String), own: &str) -> Vec<String> {
    let (volume, dir) = keygen_dir;
    let keys = [dir.as_str(), "keys"]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    let own_keys = format!("{keys}/{own}");
    mounts
        .iter()
        .filter(|m| &m.source == volume)
        .filter(|m| {
            // All of keys/ (or more), or inside it but not inside this party's own directory.
            within(&keys, &m.subpath)
                || (within(&m.subpath, &keys) && !within(&m.subpath, &own_keys))
        })
        .map(|m| {
            format!(
                "{} (volume {volume}, {})",
                m.target,
                if m.subpath.is_empty() {
                    "all of it".to_string()
                } else {
                    format!("subpath {}", m.subpath)
                }
            )
        })
        .collect()
}

/// The host a bus or store URL reaches (for emulators: the `endpoint` / `emulator` parameter).
fn url_host(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    for (k, v) in url.query_pairs() {
        if k == "endpoint" {
            return url::Url::parse(&v).ok()?.host_str().map(str::to_string);
        }
        if k == "emulator" {
            return v.split(':').next().map(str::to_string);
        }
    }
    url.host_str().map(str::to_string)
}

fn dockerfile_stages(path: &Path) -> BTreeSet<String> {
    read(path)
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                [from, _, as_, stage]
                    if from.eq_ignore_ascii_case("FROM") && as_.eq_ignore_ascii_case("AS") =>
                {
                    Some(stage.to_string())
                }
                _ => None,
            }
        })
        .collect()
}

fn check_compose(doc: &Value, cli: &dyn Fn(&Invocation) -> Cli) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(services) = doc["services"].as_mapping() else {
        return vec!["docker-compose.yml has no services".to_string()];
    };
    let services: BTreeMap<String, &Value> = services
        .iter()
        .filter_map(|(k, v)| Some((str_of(k)?, v)))
        .collect();
    let volumes: BTreeSet<String> = doc["volumes"]
        .as_mapping()
        .map(|m| m.keys().filter_map(str_of).collect())
        .unwrap_or_default();

    let declared_secrets: BTreeSet<String> = doc["secrets"]
        .as_mapping()
        .map(|m| m.keys().filter_map(str_of).collect())
        .unwrap_or_default();

    let mut runs: BTreeMap<String, Vec<Invocation>> = BTreeMap::new();
    for (name, svc) in &services {
        // Secrets: none inline (in the environment or on a command line); they come from an
        // env_file or a compose secret, and a `file:/run/secrets/NAME` reference has NAME mounted.
        for (var, value) in environment(svc) {
            let mut found = literal_secrets(&value);
            if millrace_secrets::is_secret_name(&var)
                && !millrace_secrets::is_reference(&value)
                && !value.is_empty()
            {
                found.push(format!("{var} itself"));
            }
            if !found.is_empty() {
                problems.push(format!(
                    "{name}: {var} holds a secret inline ({}): use an env_file or a compose secret",
                    found.join(", ")
                ));
            }
            for reference in url_references(&value) {
                let Some(path) = reference.strip_prefix("file:") else {
                    continue;
                };
                let mounted = path
                    .strip_prefix("/run/secrets/")
                    .filter(|s| declared_secrets.contains(*s))
                    .is_some_and(|s| strings(&svc["secrets"]).iter().any(|m| m == s));
                if !mounted {
                    problems.push(format!(
                        "{name}: {var} refers to {reference}, which is not a compose secret it mounts"
                    ));
                }
            }
        }
        let mut words = strings(&svc["entrypoint"]);
        for part in strings(&svc["command"]) {
            words.extend(part.split_whitespace().map(str::to_string));
        }
        let on_command_line = command_line_secrets(&words);
        if !on_command_line.is_empty() {
            problems.push(format!(
                "{name}: a secret on the command line ({})",
                on_command_line.join(", ")
            ));
        }

        // Ports: loopback only.
        if let Value::Sequence(ports) = &svc["ports"] {
            for p in ports {
                let ok = match p {
                    Value::Mapping(_) => str_of(&p["host_ip"]).as_deref() == Some("127.0.0.1"),
                    other => str_of(other).is_some_and(|s| s.starts_with("127.0.0.1:")),
                };
                if !ok {
                    problems.push(format!("{name}: port {p:?} is not bound to 127.0.0.1"));
                }
            }
        }
        // Named volumes exist.
        if let Value::Sequence(vols) = &svc["volumes"] {
            for v in vols {
                let source = match v {
                    Value::Mapping(_) => str_of(&v["source"]).unwrap_or_default(),
                    other => str_of(other)
                        .and_then(|s| s.split(':').next().map(str::to_string))
                        .unwrap_or_default(),
                };
                let named = !source.is_empty()
                    && !source.starts_with('/')
                    && !source.starts_with('.')
                    && !source.starts_with('~');
                if named && !volumes.contains(&source) {
                    problems.push(format!("{name}: volume {source:?} is not declared"));
                }
            }
        }
        // depends_on: the target exists in the same profiles; the condition can be met.
        let deps: Vec<(String, String)> = match &svc["depends_on"] {
            Value::Mapping(m) => m
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        str_of(k)?,
                        str_of(&v["condition"]).unwrap_or_else(|| "service_started".to_string()),
                    ))
                })
                .collect(),
            Value::Sequence(s) => s
                .iter()
                .filter_map(str_of)
                .map(|k| (k, "service_started".to_string()))
                .collect(),
            _ => Vec::new(),
        };
        for (target, condition) in deps {
            let Some(t) = services.get(&target) else {
                problems.push(format!(
                    "{name}: depends on {target:?}, which does not exist"
                ));
                continue;
            };
            let (mine, theirs) = (profiles_of(svc), profiles_of(t));
            if !theirs.is_empty() && !mine.is_subset(&theirs) {
                problems.push(format!(
                    "{name}: depends on {target:?}, which is not in all of its profiles {mine:?}"
                ));
            }
            match condition.as_str() {
                "service_started" => {}
                "service_healthy" if t["healthcheck"].is_mapping() => {}
                "service_completed_successfully"
                    if str_of(&t["restart"]).as_deref().unwrap_or("no") == "no" => {}
                other => problems.push(format!(
                    "{name}: depends on {target:?} with condition {other:?}, which it cannot meet"
                )),
            }
        }
        // Built from this repository: the Dockerfile and its stage exist.
        if svc["build"].is_mapping() {
            let dockerfile = str_of(&svc["build"]["dockerfile"]).unwrap_or_default();
            let path = root().join(&dockerfile);
            if !path.is_file() {
                problems.push(format!("{name}: dockerfile {dockerfile:?} does not exist"));
            } else if let Some(target) = str_of(&svc["build"]["target"]) {
                if !dockerfile_stages(&path).contains(&target) {
                    problems.push(format!("{name}: {dockerfile} has no stage {target:?}"));
                }
            }
        } else if str_of(&svc["image"]).is_none() {
            problems.push(format!("{name}: neither image nor build"));
        }
        // Every Millrace run: flags and variables the binary accepts.
        match compose_invocations(name, svc) {
            Ok(found) => {
                for inv in &found {
                    if !BINARIES.contains(&inv.binary.as_str()) {
                        problems.push(format!(
                            "{name}: its image holds no Millrace binary {:?}",
                            inv.binary
                        ));
                        continue;
                    }
                    if inv.binary == "millrace" {
                        let top = cli(&Invocation {
                            args: Vec::new(),
                            ..inv.clone()
                        });
                        match inv.sub() {
                            Some(sub) if top.subcommands.contains(sub) => {}
                            other => {
                                problems
                                    .push(format!("{name}: millrace has no subcommand {other:?}"));
                                continue;
                            }
                        }
                    }
                    problems.extend(check_invocation(inv, &cli(inv)));
                }
                runs.insert(
                    name.clone(),
                    found
                        .into_iter()
                        .filter(|inv| BINARIES.contains(&inv.binary.as_str()))
                        .collect(),
                );
            }
            Err(e) => problems.push(e),
        }
    }

    // Every profile is a whole fleet on its own broker.
    let all_profiles: BTreeSet<String> = services.values().flat_map(|s| profiles_of(s)).collect();
    for p in &all_profiles {
        if ADD_ON_PROFILES.contains(&p.as_str()) {
            continue;
        }
        let Some((_, scheme, broker_image)) = PROFILES.iter().find(|(name, _, _)| name == p) else {
            problems.push(format!(
                "profile {p:?} is not one this test knows (add it to PROFILES)"
            ));
            continue;
        };
        let in_profile: BTreeMap<&String, &&Value> = services
            .iter()
            .filter(|(_, s)| {
                let ps = profiles_of(s);
                ps.is_empty() || ps.contains(p)
            })
            .collect();
        if !in_profile
            .values()
            .any(|s| str_of(&s["image"]).is_some_and(|i| i.starts_with(broker_image)))
        {
            problems.push(format!("profile {p}: no broker (image {broker_image}…)"));
        }
        let mut by_role: BTreeMap<String, Vec<&Invocation>> = BTreeMap::new();
        for name in in_profile.keys() {
            for inv in runs.get(*name).into_iter().flatten() {
                let role = match inv.sub() {
                    Some(sub) => format!("millrace {sub}"),
                    None => inv.binary.clone(),
                };
                by_role.entry(role).or_default().push(inv);
            }
        }
        for (role, want) in [
            ("workflow-manager", 2),
            ("intake-worker", 2),
            ("aggregate-worker", 2),
            ("mill", 1),
            ("ingestor", 1),
        ] {
            let found = by_role.get(role).map(Vec::as_slice).unwrap_or_default();
            if found.len() != want {
                problems.push(format!(
                    "profile {p}: {} {role} service(s), expected {want}",
                    found.len()
                ));
            }
            if want == 2 {
                let indexes: BTreeSet<String> = found
                    .iter()
                    .filter_map(|inv| inv.setting(&cli(inv), "--facilitator"))
                    .collect();
                if indexes != BTreeSet::from(["0".to_string(), "1".to_string()]) {
                    problems.push(format!(
                        "profile {p}: {role} runs for facilitators {indexes:?}, expected 0 and 1"
                    ));
                }
            }
        }
        if by_role.get("cleaner").map_or(0, Vec::len) < 2 {
            problems.push(format!(
                "profile {p}: fewer than two cleaners (one per facilitator store)"
            ));
        }
        // The one-shot jobs: keys and reports first, then the results beside the plaintext.
        for role in ["millrace keygen", "millrace ingest", "millrace status"] {
            if !by_role.contains_key(role) {
                problems.push(format!("profile {p}: nothing runs `{role}`"));
            }
        }
        problems.extend(check_compose_ingestor(p, &in_profile, &runs, cli));
        // Each bus user talks to this profile's broker; each store is reachable.
        for (name, svc) in &in_profile {
            let mounts: Vec<String> = compose_mounts(svc).into_iter().map(|m| m.target).collect();
            for inv in runs.get(*name).into_iter().flatten() {
                let c = cli(inv);
                if c.flags.contains_key("--bus") {
                    match inv.setting(&c, "--bus") {
                        Some(bus) => {
                            if !bus.starts_with(&format!("{scheme}://")) {
                                problems.push(format!(
                                    "{name}: bus {bus:?} is not a {scheme}:// URL (profile {p})"
                                ));
                            }
                            match url_host(&bus) {
                                Some(host) if in_profile.contains_key(&host) => {}
                                other => problems.push(format!(
                                    "{name}: bus {bus:?} reaches {other:?}, not a service of profile {p}"
                                )),
                            }
                        }
                        // A CLI command for which the bus is optional (`millrace status
                        // --bus` adds dead-letter counts) may go without.
                        None if !uses_bus_binary(&inv.binary) && !c.required.contains("--bus") => {}
                        None => problems.push(format!("{name}: no bus URL")),
                    }
                }
                for flag in [
                    "--store",
                    "--peer-store",
                    "--collector-store",
                    "--store0",
                    "--store1",
                ] {
                    if !c.flags.contains_key(flag) {
                        continue;
                    }
                    let Some(store) = inv.setting(&c, flag) else {
                        continue;
                    };
                    if let Some(path) = store.strip_prefix("file://") {
                        if !mounts.iter().any(|m| path.starts_with(m.as_str())) {
                            problems.push(format!(
                                "{name}: store {store:?} is not inside a mounted volume {mounts:?}"
                            ));
                        }
                    } else {
                        match url_host(&store) {
                            Some(host) if in_profile.contains_key(&host) => {}
                            other => problems.push(format!(
                                "{name}: store {store:?} reaches {other:?}, not a service of profile {p}"
                            )),
                        }
                    }
                }
            }
        }
    }
    for (p, _, _) in PROFILES {
        if !all_profiles.contains(p) {
            problems.push(format!("profile {p} is missing"));
        }
    }
    problems
}

/// The ingestor of one profile: it listens beyond the container's loopback on a port published on
/// the host, the simulated clients (`millrace ingest`) reach it, its config is mounted, and it
/// sees no other party's private keys (the keys `millrace keygen --dir` wrote for every party).
fn check_compose_ingestor(
    p: &str,
    in_profile: &BTreeMap<&String, &&Value>,
    runs: &BTreeMap<String, Vec<Invocation>>,
    cli: &dyn Fn(&Invocation) -> Cli,
) -> Vec<String> {
    let mut problems = Vec::new();
    let of_profile = |binary: &str, sub: Option<&str>| -> Vec<(&String, &Invocation)> {
        in_profile
            .keys()
            .flat_map(|name| {
                runs.get(*name)
                    .into_iter()
                    .flatten()
                    .map(move |inv| (*name, inv))
            })
            .filter(|(_, inv)| inv.binary == binary && inv.sub() == sub)
            .collect()
    };
    // Where keygen wrote every party's keys: its --dir, inside the job's volume.
    let keygen_dirs: Vec<(String, String)> = of_profile("millrace", Some("keygen"))
        .into_iter()
        .filter_map(|(name, inv)| {
            let dir = inv.setting(&cli(inv), "--dir")?;
            volume_path(&compose_mounts(in_profile.get(name)?), &dir)
        })
        .collect();
    for (name, inv) in of_profile("ingestor", None) {
        let Some(svc) = in_profile.get(name) else {
            continue;
        };
        let c = cli(inv);
        let mounts = compose_mounts(svc);
        // Its upload API: on all of the container's interfaces, published on the host.
        let listen = inv
            .setting(&c, "--listen")
            .or_else(|| c.defaults.get("--listen").cloned())
            .unwrap_or_default();
        let port = listen.rsplit(':').next().unwrap_or_default().to_string();
        if !listen.starts_with("0.0.0.0:") {
            problems.push(format!(
                "{name}: --listen {listen:?} must bind 0.0.0.0, or nothing outside the container reaches it"
            ));
        }
        let published = strings(&svc["ports"])
            .iter()
            .any(|p| p.rsplit(':').next() == Some(port.as_str()));
        if !published {
            problems.push(format!(
                "{name}: its upload port {port} is not published on the host"
            ));
        }
        // Its config, and no other party's keys.
        let config = inv.setting(&c, "--config").unwrap_or_default();
        if volume_path(&mounts, &config).is_none() {
            problems.push(format!(
                "{name}: --config {config:?} is not inside a mounted volume"
            ));
        }
        let own = inv.setting(&c, "--ingestor").unwrap_or_default();
        if keygen_dirs.is_empty() {
            problems.push(format!(
                "profile {p}: no `millrace keygen --dir` inside a volume, so {name}'s keys cannot be checked"
            ));
        }
        for dir in &keygen_dirs {
            let seen = foreign_keys_seen(&mounts, dir, &own);
            if !seen.is_empty() {
                problems.push(format!(
                    "{name}: sees other parties' private keys (keygen wrote them to {}/keys in volume {}) through {}: mount only ingestor {own:?}'s own directory",
                    dir.1,
                    dir.0,
                    seen.join(", ")
                ));
            }
        }
        // The simulated clients send their reports to this ingestor.
        for (client, ingest) in of_profile("millrace", Some("ingest")) {
            let ic = cli(ingest);
            if ingest.setting(&ic, "--direct-to-stores").is_some() {
                continue;
            }
            let url = ingest
                .setting(&ic, "--ingestor-url")
                .or_else(|| ic.defaults.get("--ingestor-url").cloned())
                .unwrap_or_default();
            let reaches = url::Url::parse(&url)
                .ok()
                .and_then(|u| Some((u.host_str()?.to_string(), u.port_or_known_default()?)));
            if reaches != Some((name.to_string(), port.parse().unwrap_or(0))) {
                problems.push(format!(
                    "{client}: --ingestor-url {url:?} does not reach {name} on its port {port}"
                ));
            }
        }
    }
    problems
}

fn compose_doc() -> Value {
    load_yaml(
        &read(&root().join("docker-compose.yml")),
        "docker-compose.yml",
    )
}

#[test]
fn compose_profiles_each_run_a_whole_fleet_with_flags_their_binaries_accept() {
    let problems = check_compose(&compose_doc(), &cli_for);
    assert!(
        problems.is_empty(),
        "docker-compose.yml:\n  {}",
        problems.join("\n  ")
    );
}

/// The words after `marker` up to the end of its line (`for bin in a b c; do` → a, b, c).
fn words_after(text: &str, marker: &str) -> BTreeSet<String> {
    text.lines()
        .find_map(|l| l.split_once(marker).map(|(_, rest)| rest))
        .unwrap_or_default()
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty() && *w != "do")
        .map(str::to_string)
        .collect()
}

#[test]
fn the_dockerfile_has_a_non_root_stage_per_binary_and_make_images_builds_each() {
    let path = root().join("deploy/Dockerfile");
    let stages = dockerfile_stages(&path);
    let text = read(&path);
    // The builder copies each binary out of its cache mount, and `make images` builds each stage.
    let copied = words_after(&text, "for bin in ");
    let images = words_after(&read(&root().join("Makefile")), "IMAGES := ");
    for b in BINARIES {
        assert!(
            stages.contains(b),
            "deploy/Dockerfile has no stage {b:?}: {stages:?}"
        );
        assert!(
            copied.contains(b),
            "deploy/Dockerfile's builder does not copy {b:?} out: {copied:?}"
        );
        assert!(
            images.contains(b),
            "the Makefile's IMAGES does not build {b:?}: {images:?}"
        );
    }
    assert!(
        text.lines().any(|l| l.trim() == "USER 65532:65532"),
        "deploy/Dockerfile: the runtime images must run as user 65532"
    );
    let ignore = read(&root().join(".dockerignore"));
    for entry in ["target/", "build/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore must leave out {entry}"
        );
    }
}

fn fresh_invocation(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Invocation {
    Invocation {
        who: "test".to_string(),
        binary: binary.to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn a_flag_or_variable_the_binary_lacks_is_caught() {
    let env = [
        ("MILLRACE_BUS", "nats://nats:4222"),
        ("MILLRACE_CONFIG", "/c.toml"),
        ("MILLRACE_FACILITATOR", "0"),
        ("MILLRACE_STORE", "file:///s0"),
        ("MILLRACE_PEER_STORE", "file:///s1"),
    ];
    let good = fresh_invocation("intake-worker", &["--concurrency", "4"], &env);
    assert_eq!(
        check_invocation(&good, &cli_for(&good)),
        Vec::<String>::new()
    );

    let bad_flag = fresh_invocation("intake-worker", &["--concurency", "4"], &env);
    let problems = check_invocation(&bad_flag, &cli_for(&bad_flag));
    assert!(
        problems.iter().any(|p| p.contains("no flag --concurency")),
        "{problems:?}"
    );

    let mut bad_env = good.clone();
    bad_env
        .env
        .insert("MILLRACE_CONCURENCY".to_string(), "4".to_string());
    let problems = check_invocation(&bad_env, &cli_for(&bad_env));
    assert!(
        problems.iter().any(|p| p.contains("MILLRACE_CONCURENCY")),
        "{problems:?}"
    );

    // The cleaner uses no bus.
    let cleaner = fresh_invocation(
        "cleaner",
        &[],
        &[
            ("MILLRACE_CONFIG", "/c.toml"),
            ("MILLRACE_STORE", "file:///s0"),
            ("MILLRACE_BUS", "nats://nats:4222"),
        ],
    );
    let problems = check_invocation(&cleaner, &cli_for(&cleaner));
    assert!(
        problems.iter().any(|p| p.contains("MILLRACE_BUS")),
        "{problems:?}"
    );

    let mut missing = good.clone();
    missing.env.remove("MILLRACE_PEER_STORE");
    let problems = check_invocation(&missing, &cli_for(&missing));
    assert!(
        problems.iter().any(|p| p.contains("--peer-store")),
        "{problems:?}"
    );

    // The workflow-manager's --help cannot require the peer store (only the leader needs it),
    // but every deployment gives it one, on either facilitator.
    let wm = fresh_invocation("workflow-manager", &["--interval", "10s"], &env);
    assert_eq!(check_invocation(&wm, &cli_for(&wm)), Vec::<String>::new());
    for f in ["0", "1"] {
        let mut missing = wm.clone();
        missing.env.remove("MILLRACE_PEER_STORE");
        missing
            .env
            .insert("MILLRACE_FACILITATOR".to_string(), f.to_string());
        let problems = check_invocation(&missing, &cli_for(&missing));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("`workflow-manager` needs --peer-store")),
            "facilitator {f}: {problems:?}"
        );
    }
}

#[test]
fn the_help_parser_reads_flags_variables_defaults_and_required_flags() {
    let c = cli("aggregate-worker", None);
    assert_eq!(c.env_of("--bus"), Some("MILLRACE_BUS"));
    assert_eq!(c.env_of("--help"), None);
    assert_eq!(
        c.defaults.get("--drain-grace").map(String::as_str),
        Some("25s")
    );
    assert!(c.required.contains("--collector-store"), "{:?}", c.required);
    assert!(!c.required.contains("--concurrency"), "{:?}", c.required);
    let m = cli("millrace", None);
    for sub in ["keygen", "ingest", "status", "demo"] {
        assert!(m.subcommands.contains(sub), "{:?}", m.subcommands);
    }
    assert!(cli("millrace", Some("ingest"))
        .required
        .contains("--config"));
    let ingestor = cli("ingestor", None);
    for flag in ["--config", "--ingestor", "--store0", "--store1"] {
        assert!(ingestor.required.contains(flag), "{:?}", ingestor.required);
    }
    assert_eq!(
        ingestor.defaults.get("--listen").map(String::as_str),
        Some("127.0.0.1:8080")
    );
    let serves = served_paths(&ingestor.help["--metrics-addr"]);
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert!(serves.contains(path), "{serves:?}");
    }
    assert!(!serves.contains("/ready"), "{serves:?}");
}

#[test]
fn shell_scripts_are_split_into_commands() {
    let cmds = shell_commands(
        "test -f a || millrace keygen --dir 'x y'\nmillrace ingest \\\n  --store0 \"s3://b?e=1\" ; echo done",
    );
    assert_eq!(
        cmds,
        vec![
            vec!["test", "-f", "a"],
            vec!["millrace", "keygen", "--dir", "x y"],
            vec!["millrace", "ingest", "--store0", "s3://b?e=1"],
            vec!["echo", "done"],
        ]
    );
}

fn problems_after(edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut doc = compose_doc();
    edit(&mut doc);
    check_compose(&doc, &cli_for)
}

fn expect_problem(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem mentioning {needle:?}, got {problems:?}"
    );
}

#[test]
fn a_broken_compose_file_is_caught() {
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-mill"]["environment"]["MILLRACE_BUS"] =
                Value::String("amqp://millrace:hunter2@rabbitmq:5672/%2f".to_string());
        }),
        "MILLRACE_BUS holds a secret inline (the password in the user-info",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["aws-mill"]["environment"]["AWS_SECRET_ACCESS_KEY"] =
                Value::String("hunter2".to_string());
        }),
        "AWS_SECRET_ACCESS_KEY holds a secret inline",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-intake-worker-0"]["command"] =
                serde_norway::from_str("[--bus, 'amqp://millrace@rabbitmq/%2f?password=hunter2']")
                    .unwrap_or(Value::Null);
        }),
        "a secret on the command line (password= in a URL)",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-mill"]["secrets"] = Value::Sequence(Vec::new());
        }),
        "refers to file:/run/secrets/amqp-password, which is not a compose secret it mounts",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-mill"]["ports"] =
                Value::Sequence(vec![Value::String("9464:9464".to_string())]);
        }),
        "not bound to 127.0.0.1",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["nats-intake-worker-0"]["command"] =
                Value::Sequence(vec![Value::String("--prefetch".to_string())]);
        }),
        "no flag --prefetch",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["kafka-cleaner-0"]["environment"]["MILLRACE_BUS"] =
                Value::String("kafka://kafka:9092".to_string());
        }),
        "reads no environment variable MILLRACE_BUS",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["aws-intake-worker-1"]["environment"]["MILLRACE_BUS"] =
                Value::String("nats://nats:4222".to_string());
        }),
        "is not a sns-sqs:// URL",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["pubsub-mill"]["depends_on"]["pubsub-brokr"] = Value::Null;
        }),
        "\"pubsub-brokr\", which does not exist",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-cleaner-0"]["volumes"] =
                Value::Sequence(vec![Value::String("data:/var/lib/millrace".to_string())]);
        }),
        "volume \"data\" is not declared",
    );
    expect_problem(
        &problems_after(|d| {
            if let Some(m) = d["services"].as_mapping_mut() {
                m.remove("kafka-workflow-manager-1");
            }
        }),
        "profile kafka: 1 workflow-manager service(s), expected 2",
    );
    expect_problem(
        &problems_after(|d| {
            if let Some(env) =
                d["services"]["aws-workflow-manager-0"]["environment"].as_mapping_mut()
            {
                env.remove("MILLRACE_PEER_STORE");
            }
        }),
        "aws-workflow-manager-0: `workflow-manager` needs --peer-store",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["nats-workflow-manager-0"]["environment"]["MILLRACE_PEER_STORE"] =
                Value::String("file:///srv/elsewhere".to_string());
        }),
        "store \"file:///srv/elsewhere\" is not inside a mounted volume",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["nats-ingest"]["command"] = Value::Sequence(vec![Value::String(
                "millrace keygen --dir /var/lib/millrace/config".to_string(),
            )]);
        }),
        "profile nats: nothing runs `millrace ingest`",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["aws-aggregate-worker-0"]["build"]["target"] =
                Value::String("aggregator".to_string());
        }),
        "has no stage \"aggregator\"",
    );
}

/// The ingestor's part of the compose checks: present in every profile, reachable, published,
/// and blind to the other parties' keys.
#[test]
fn a_broken_compose_ingestor_is_caught() {
    expect_problem(
        &problems_after(|d| {
            if let Some(m) = d["services"].as_mapping_mut() {
                m.remove("nats-ingestor");
                m.remove("nats-ingest");
                m.remove("nats-status");
            }
        }),
        "profile nats: 0 ingestor service(s), expected 1",
    );
    // The whole volume: keygen's directory with every party's keys.
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-ingestor"]["volumes"] = Value::Sequence(vec![Value::String(
                "rabbitmq-data:/var/lib/millrace".to_string(),
            )]);
        }),
        "rabbitmq-ingestor: sees other parties' private keys",
    );
    // Another party's key directory, on its own.
    expect_problem(
        &problems_after(|d| {
            if let Some(vols) = d["services"]["kafka-ingestor"]["volumes"].as_sequence_mut() {
                vols.push(
                    serde_norway::from_str(
                        "{type: volume, source: kafka-data, target: /k, volume: {subpath: config/keys/alpha}}",
                    )
                    .unwrap_or(Value::Null),
                );
            }
        }),
        "kafka-ingestor: sees other parties' private keys",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["pubsub-ingestor"]["environment"]["MILLRACE_STORE1"] =
                Value::String("file:///srv/fac-1".to_string());
        }),
        "pubsub-ingestor: store \"file:///srv/fac-1\" is not inside a mounted volume",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["aws-ingestor"]["command"] = Value::Sequence(Vec::new());
        }),
        "aws-ingestor: --listen \"127.0.0.1:8080\" must bind 0.0.0.0",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["aws-ingestor"]["ports"] = Value::Sequence(Vec::new());
        }),
        "aws-ingestor: its upload port 8080 is not published on the host",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["rabbitmq-ingest"]["environment"]["MILLRACE_INGESTOR_URL"] =
                Value::String("http://nats-ingestor:8080".to_string());
        }),
        "rabbitmq-ingest: --ingestor-url \"http://nats-ingestor:8080\" does not reach rabbitmq-ingestor",
    );
    expect_problem(
        &problems_after(|d| {
            d["services"]["kafka-ingestor"]["environment"]["MILLRACE_BUS"] =
                Value::String("kafka://kafka:9092".to_string());
        }),
        "kafka-ingestor: `ingestor` reads no environment variable MILLRACE_BUS",
    );
}

#[test]
fn only_keygen_directories_of_other_parties_count_as_foreign_keys() {
    let keygen = ("data".to_string(), "config".to_string());
    let mount = |subpath: &str| Mount {
        source: "data".to_string(),
        subpath: subpath.to_string(),
        target: format!("/m/{subpath}"),
    };
    for seen in [
        "",
        "config",
        "config/keys",
        "config/keys/alpha",
        "config/keys/beta/verify",
    ] {
        assert_eq!(
            foreign_keys_seen(&[mount(seen)], &keygen, "ingestor-1").len(),
            1,
            "subpath {seen:?}"
        );
    }
    for unseen in [
        "ingestor-1",
        "fac-0",
        "config/keys/ingestor-1",
        "configuration",
    ] {
        assert_eq!(
            foreign_keys_seen(&[mount(unseen)], &keygen, "ingestor-1"),
            Vec::<String>::new(),
            "subpath {unseen:?}"
        );
    }
    let mut other_volume = mount("");
    other_volume.source = "elsewhere".to_string();
    assert!(foreign_keys_seen(&[other_volume], &keygen, "ingestor-1").is_empty());
    assert_eq!(
        volume_path(&[mount(""), mount("fac-0")], "/m/fac-0/x"),
        Some(("data".to_string(), "fac-0/x".to_string()))
    );
}

// ------------------------------------------------------------------------------------------------
// Kubernetes (kustomize)
// ------------------------------------------------------------------------------------------------

const KUBECTL_WHY: &str =
    "it renders deploy/k8s offline with `kubectl kustomize` (any recent kubectl; kustomize is built in)";

fn kustomize(dir: &Path) -> Vec<Value> {
    if let Err(e) = require_tool("kubectl", KUBECTL_WHY) {
        panic!("{e}");
    }
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl kustomize {}: {e}", dir.display()));
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    load_all_yaml(
        &String::from_utf8_lossy(&out.stdout),
        &format!("kubectl kustomize {}", dir.display()),
    )
}

struct Cloud {
    name: &'static str,
    bus_scheme: &'static str,
    store_scheme: &'static str,
    identity_annotation: &'static str,
    /// Ports a pod may reach to get its cloud identity, besides HTTPS (GKE's metadata server).
    identity_ports: &'static [u64],
}

const AWS: Cloud = Cloud {
    name: "aws",
    bus_scheme: "sns-sqs://",
    store_scheme: "s3://",
    identity_annotation: "eks.amazonaws.com/role-arn",
    identity_ports: &[],
};

const GCP: Cloud = Cloud {
    name: "gcp",
    bus_scheme: "pubsub://",
    store_scheme: "gs://",
    identity_annotation: "iam.gke.io/gcp-service-account",
    identity_ports: &[80, 988],
};

/// What a rendering must contain.
struct Expect<'a> {
    deployments: &'a [&'a str],
    /// CronJob name and schedule.
    cronjobs: &'a [(&'a str, &'a str)],
    facilitator: &'a str,
    /// The ingestor with its Service, PodDisruptionBudget and autoscaler (or none of them).
    ingestor: bool,
}

/// The base as the overlays deploy it: facilitator 0, the collector's mill and the ingestor.
const FACILITATOR_0_THE_MILL_AND_THE_INGESTOR: Expect<'static> = Expect {
    deployments: &["aggregate-worker", "ingestor", "intake-worker", "mill"],
    cronjobs: &[
        ("workflow-manager", "*/10 * * * *"),
        ("cleaner", "0 * * * *"),
    ],
    facilitator: "0",
    ingestor: true,
};

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| str_of(&d["kind"]).as_deref() == Some(kind))
        .collect()
}

fn name_of(doc: &Value) -> String {
    str_of(&doc["metadata"]["name"]).unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str, name: &str) -> Option<&'a Value> {
    kind(docs, k).into_iter().find(|d| name_of(d) == name)
}

/// A duration as the services write them: `25s`, `2m`, `1h`, `500ms`.
fn seconds(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    })
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    match selector["matchLabels"].as_mapping() {
        None => true,
        Some(m) => m.iter().all(|(k, v)| labels.get(k) == Some(v)),
    }
}

/// Egress ports a policy opens (None: a rule without ports, i.e. every port).
fn egress_ports(policy: &Value) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    if let Value::Sequence(rules) = &policy["spec"]["egress"] {
        for rule in rules {
            match &rule["ports"] {
                Value::Sequence(ports) => {
                    out.extend(ports.iter().map(|p| p["port"].as_u64()));
                }
                _ => out.push(None),
            }
        }
    }
    out
}

const BROKER_PORTS: [u64; 5] = [5672, 5671, 4222, 9092, 9093];

/// The Secret the bus's credentials come from (mounted at /etc/millrace/bus in bus users).
const BUS_CREDENTIALS: &str = "millrace-bus-credentials";

/// What in `text` is a secret written out: the password of a URL's user-info, each query
/// parameter with a secret's name (`millrace_secrets::is_secret_name`) whose value is not a
/// `file:` / `env:` reference, and `NAME=value` with a secret's name. Empty if nothing is.
fn literal_secrets(text: &str) -> Vec<String> {
    use millrace_secrets::{is_reference, is_secret_name};
    let mut found = Vec::new();
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c| c == '\'' || c == '"');
        if let Ok(url) = url::Url::parse(word) {
            if url.password().is_some_and(|p| !p.is_empty()) {
                found.push(format!(
                    "the password in the user-info of {}",
                    url.host_str().unwrap_or("a URL")
                ));
            }
            for (k, v) in url.query_pairs() {
                if is_secret_name(&k) && !v.is_empty() && !is_reference(&v) {
                    found.push(format!("{k}= in a URL"));
                }
            }
        } else if let Some((name, value)) = word.split_once('=') {
            let name = name.trim_start_matches('-');
            // `$VAR` / `$(cat FILE)` in a script is read when it runs, not written here.
            let value = value.trim_matches(|c| c == '\'' || c == '"');
            if is_secret_name(name)
                && !value.is_empty()
                && !is_reference(value)
                && !value.starts_with('$')
            {
                found.push(format!("{name}="));
            }
        }
    }
    found
}

/// The secrets written out in a command line: [`literal_secrets`] of each argument, and the
/// value after a flag with a secret's name (`--password hunter2`).
fn command_line_secrets(args: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        found.extend(literal_secrets(arg));
        if let Some(flag) = arg.strip_prefix("--").filter(|f| !f.contains('=')) {
            if let Some(value) = args.get(i + 1) {
                if millrace_secrets::is_secret_name(flag)
                    && !value.starts_with("--")
                    && !millrace_secrets::is_reference(value)
                {
                    found.push(format!("--{flag}"));
                }
            }
        }
    }
    found
}

/// The references (`file:…`, `env:…`) a bus URL's query parameters make.
fn url_references(url: &str) -> Vec<String> {
    url::Url::parse(url)
        .map(|u| {
            u.query_pairs()
                .filter(|(_, v)| millrace_secrets::is_reference(v))
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Files a container sees: mount path → where it comes from.
fn mounted_files(docs: &[Value], pod: &Value, container: &Value) -> BTreeMap<String, String> {
    let keys_of = |k: &str, name: &str| -> Vec<String> {
        let Some(doc) = find(docs, k, name) else {
            return Vec::new();
        };
        ["data", "binaryData", "stringData"]
            .iter()
            .filter_map(|f| doc[*f].as_mapping())
            .flat_map(|m| m.keys().filter_map(str_of))
            .collect()
    };
    let source_files = |source: &Value| -> Vec<(String, String)> {
        let (k, name) = if source["configMap"].is_mapping() {
            ("ConfigMap", str_of(&source["configMap"]["name"]))
        } else if source["secret"].is_mapping() {
            (
                "Secret",
                str_of(&source["secret"]["secretName"])
                    .or_else(|| str_of(&source["secret"]["name"])),
            )
        } else {
            return Vec::new();
        };
        let body = if k == "ConfigMap" {
            &source["configMap"]
        } else {
            &source["secret"]
        };
        let name = name.unwrap_or_default();
        match &body["items"] {
            Value::Sequence(items) => items
                .iter()
                .filter_map(|i| {
                    Some((
                        str_of(&i["path"])?,
                        format!("{k} {name} key {}", str_of(&i["key"])?),
                    ))
                })
                .collect(),
            _ => keys_of(k, &name)
                .into_iter()
                .map(|key| (key.clone(), format!("{k} {name} key {key}")))
                .collect(),
        }
    };
    let mut files = BTreeMap::new();
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    for mount in container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let (Some(vname), Some(path)) = (str_of(&mount["name"]), str_of(&mount["mountPath"]))
        else {
            continue;
        };
        let Some(volume) = volumes
            .iter()
            .find(|v| str_of(&v["name"]).as_deref() == Some(&vname))
        else {
            continue;
        };
        let mut inside: Vec<(String, String)> = source_files(volume);
        if let Value::Sequence(sources) = &volume["projected"]["sources"] {
            for s in sources {
                inside.extend(source_files(s));
            }
        }
        match str_of(&mount["subPath"]) {
            Some(sub) => {
                if let Some((_, from)) = inside.into_iter().find(|(p, _)| *p == sub) {
                    files.insert(path, from);
                }
            }
            None => {
                for (p, from) in inside {
                    files.insert(format!("{}/{p}", path.trim_end_matches('/')), from);
                }
            }
        }
    }
    files
}

/// Every pod template of the rendering: (owner, pod labels, pod spec, is long-running).
fn pod_templates(docs: &[Value]) -> Vec<(String, &Value, &Value, bool)> {
    let mut out = Vec::new();
    for d in kind(docs, "Deployment") {
        let t = &d["spec"]["template"];
        out.push((
            format!("Deployment {}", name_of(d)),
            &t["metadata"]["labels"],
            &t["spec"],
            true,
        ));
    }
    for c in kind(docs, "CronJob") {
        let t = &c["spec"]["jobTemplate"]["spec"]["template"];
        out.push((
            format!("CronJob {}", name_of(c)),
            &t["metadata"]["labels"],
            &t["spec"],
            false,
        ));
    }
    out
}

/// The HTTP paths a flag's help text names (`Where to serve /metrics, /healthz and /readyz.`).
fn served_paths(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with('/'))
        .map(|w| {
            w.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric()))
                .to_string()
        })
        .collect()
}

/// The Millrace binary a container runs: its image's name (`REGISTRY/millrace/BINARY:TAG`).
fn image_binary(container: &Value) -> String {
    str_of(&container["image"])
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .and_then(|i| i.split(':').next())
        .unwrap_or_default()
        .to_string()
}

/// What this test allows one write of a batch copy to a store on the ingestor's shutdown (a copy
/// is at most `--max-batch-bytes`, 4 MiB by default), and the longest wait between two attempts
/// (the batcher's retry delay is capped at 2 s).
const STORE_WRITE_SECS: f64 = 10.0;
const STORE_RETRY_MAX_SECS: f64 = 2.0;

/// How long a binary takes to stop after SIGTERM: the worker loop's `--drain-grace`; for the
/// ingestor, writing its open batches, `--store-attempts` attempts per copy at most.
fn shutdown_secs(inv: &Invocation, cli: &Cli) -> Option<f64> {
    let setting = |flag: &str| {
        inv.setting(cli, flag)
            .or_else(|| cli.defaults.get(flag).cloned())
    };
    if let Some(drain) = setting("--drain-grace") {
        return seconds(&drain);
    }
    let attempts: f64 = setting("--store-attempts")?.parse().ok()?;
    Some(attempts * (STORE_WRITE_SECS + STORE_RETRY_MAX_SECS))
}

/// The seconds a container's preStop hook sleeps before SIGTERM (`exec: sleep N` or `sleep:`).
fn pre_stop_secs(container: &Value) -> f64 {
    let hook = &container["lifecycle"]["preStop"];
    if let Some(n) = hook["sleep"]["seconds"].as_u64() {
        return n as f64;
    }
    let command = strings(&hook["exec"]["command"]);
    match command.as_slice() {
        [sleep, n] if sleep.rsplit('/').next() == Some("sleep") => {
            seconds(n).or_else(|| n.parse().ok()).unwrap_or(0.0)
        }
        _ => 0.0,
    }
}

/// The secret reference of an ingestor's signing key: its single-key `private_key`, or the file
/// of its newest signing key that is not retired in its `private_key_dir`.
fn ingestor_key_reference(i: &millrace_protocol::config::IngestorEntry) -> Option<String> {
    if let Some(reference) = &i.private_key {
        return Some(reference.clone());
    }
    let dir = i.private_key_dir.as_ref()?;
    let id = i
        .signing_keys
        .iter()
        .rev()
        .find(|k| !k.retired)
        .map(|k| k.id.clone())
        .unwrap_or_else(|| i.name.clone());
    Some(format!(
        "file:{dir}/{}",
        millrace_protocol::parties::signing_key_file(&id)
    ))
}

/// Does a NetworkPolicy rule's port list let `port` (named `name` on the container) in?
fn rule_admits(rule: &Value, port: u64, name: Option<&str>) -> bool {
    match &rule["ports"] {
        Value::Sequence(ports) => ports.iter().any(|p| {
            p["port"].as_u64() == Some(port)
                || (name.is_some() && str_of(&p["port"]).as_deref() == name)
        }),
        _ => true,
    }
}

/// The ingestor's own objects: an autoscaler (CPU) that owns its replica count, at least two
/// replicas, and a PodDisruptionBudget over its pods; or, where no ingestor runs, none of its
/// objects at all.
fn check_ingestor_objects(docs: &[Value], expect: &Expect) -> Vec<String> {
    let mut problems = Vec::new();
    let deployment = find(docs, "Deployment", "ingestor");
    if !expect.ingestor {
        for k in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceAccount",
        ] {
            if find(docs, k, "ingestor").is_some() {
                problems.push(format!(
                    "{k} ingestor is here, but this rendering runs no ingestor"
                ));
            }
        }
        if let Some(key) = kind(docs, "Secret")
            .into_iter()
            .map(name_of)
            .find(|n| n.starts_with("millrace-ingestor-key"))
        {
            problems.push(format!(
                "Secret {key} (the ingestor's key) is here, but this rendering runs no ingestor"
            ));
        }
        return problems;
    }
    let Some(deployment) = deployment else {
        return vec!["no Deployment ingestor".to_string()];
    };
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let hpa = kind(docs, "HorizontalPodAutoscaler").into_iter().find(|h| {
        let target = &h["spec"]["scaleTargetRef"];
        str_of(&target["kind"]).as_deref() == Some("Deployment")
            && str_of(&target["name"]).as_deref() == Some("ingestor")
    });
    match hpa {
        None => problems.push(
            "no HorizontalPodAutoscaler scales Deployment ingestor (it is stateless: scale it on CPU)"
                .to_string(),
        ),
        Some(h) => {
            let min = h["spec"]["minReplicas"].as_u64().unwrap_or(1);
            let max = h["spec"]["maxReplicas"].as_u64().unwrap_or(0);
            if min < 2 || max < min {
                problems.push(format!(
                    "HorizontalPodAutoscaler {}: minReplicas {min} / maxReplicas {max}: the ingestor needs at least 2 replicas",
                    name_of(h)
                ));
            }
            let on_cpu = h["spec"]["metrics"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|m| {
                    str_of(&m["type"]).as_deref() == Some("Resource")
                        && str_of(&m["resource"]["name"]).as_deref() == Some("cpu")
                });
            if !on_cpu {
                problems.push(format!(
                    "HorizontalPodAutoscaler {} does not scale on CPU",
                    name_of(h)
                ));
            }
            if !deployment["spec"]["replicas"].is_null() {
                problems.push(format!(
                    "Deployment ingestor sets replicas ({:?}): leave the count to its HorizontalPodAutoscaler, or every `kubectl apply` resets it",
                    deployment["spec"]["replicas"]
                ));
            }
        }
    }
    let pdb = kind(docs, "PodDisruptionBudget").into_iter().find(|b| {
        labels_match(&b["spec"]["selector"], labels)
            && b["spec"]["selector"]["matchLabels"].is_mapping()
    });
    match pdb {
        None => problems.push("no PodDisruptionBudget covers the ingestor's pods".to_string()),
        Some(b) => {
            let keeps_one = b["spec"]["minAvailable"].as_u64().is_some_and(|n| n >= 1)
                || !b["spec"]["maxUnavailable"].is_null()
                || str_of(&b["spec"]["minAvailable"])
                    .is_some_and(|v| v.ends_with('%') && v != "0%");
            if !keeps_one {
                problems.push(format!(
                    "PodDisruptionBudget {} lets every ingestor be evicted at once",
                    name_of(b)
                ));
            }
        }
    }
    problems
}

fn check_rendering(docs: &[Value], cloud: &Cloud, expect: &Expect) -> Vec<String> {
    let mut problems = Vec::new();

    // Kinds and names.
    let deployments: BTreeSet<String> = kind(docs, "Deployment").into_iter().map(name_of).collect();
    let want: BTreeSet<String> = expect.deployments.iter().map(|s| s.to_string()).collect();
    if deployments != want {
        problems.push(format!("Deployments {deployments:?}, expected {want:?}"));
    }
    for (name, schedule) in expect.cronjobs {
        match find(docs, "CronJob", name) {
            None => problems.push(format!("no CronJob {name}")),
            Some(c) => {
                if str_of(&c["spec"]["schedule"]).as_deref() != Some(*schedule) {
                    problems.push(format!(
                        "CronJob {name} runs {:?}, expected {schedule:?}",
                        c["spec"]["schedule"]
                    ));
                }
            }
        }
    }
    for c in kind(docs, "CronJob") {
        if str_of(&c["spec"]["concurrencyPolicy"]).as_deref() != Some("Forbid") {
            problems.push(format!(
                "CronJob {} must have concurrencyPolicy: Forbid",
                name_of(c)
            ));
        }
    }
    for k in ["ServiceAccount", "NetworkPolicy", "ConfigMap", "Secret"] {
        if kind(docs, k).is_empty() {
            problems.push(format!("no {k}"));
        }
    }
    for sa in kind(docs, "ServiceAccount") {
        if str_of(&sa["metadata"]["annotations"][cloud.identity_annotation])
            .unwrap_or_default()
            .is_empty()
        {
            problems.push(format!(
                "ServiceAccount {} has no {} annotation",
                name_of(sa),
                cloud.identity_annotation
            ));
        }
    }
    // No ConfigMap holds a secret: credentials come from Secrets, by reference.
    for cm in kind(docs, "ConfigMap") {
        for (key, value) in cm["data"].as_mapping().into_iter().flatten() {
            let (key, value) = (
                str_of(key).unwrap_or_default(),
                str_of(value).unwrap_or_default(),
            );
            let mut found = literal_secrets(&value);
            if millrace_secrets::is_secret_name(&key) && !millrace_secrets::is_reference(&value) {
                found.push(format!("its key {key}"));
            }
            if !found.is_empty() {
                problems.push(format!(
                    "ConfigMap {} key {key} holds a secret ({}): put it in a Secret and refer to it",
                    name_of(cm),
                    found.join(", ")
                ));
            }
        }
    }

    let policies = kind(docs, "NetworkPolicy");
    let default_deny = policies.iter().any(|p| {
        p["spec"]["podSelector"]
            .as_mapping()
            .is_none_or(|m| m.is_empty())
            && strings(&p["spec"]["policyTypes"]).len() == 2
            && p["spec"]["ingress"].is_null()
            && p["spec"]["egress"].is_null()
    });
    if !default_deny {
        problems.push(
            "no default-deny NetworkPolicy (empty podSelector, Ingress and Egress, no rules)"
                .to_string(),
        );
    }

    let config_text = |docs: &[Value]| -> Option<String> {
        kind(docs, "ConfigMap")
            .into_iter()
            .find_map(|c| str_of(&c["data"]["millrace.toml"]))
    };
    let Some(toml_text) = config_text(docs) else {
        problems.push("no ConfigMap holds millrace.toml".to_string());
        return with_overlay(cloud, problems);
    };

    let mut invocations: Vec<Invocation> = Vec::new();
    for (owner, labels, pod, long_running) in pod_templates(docs) {
        // Its identity.
        let sa = str_of(&pod["serviceAccountName"]).unwrap_or_default();
        if find(docs, "ServiceAccount", &sa).is_none() {
            problems.push(format!(
                "{owner}: ServiceAccount {sa:?} is not in the rendering"
            ));
        }
        if pod["securityContext"]["runAsNonRoot"].as_bool() != Some(true) {
            problems.push(format!("{owner}: the pod must set runAsNonRoot: true"));
        }
        // Its network policies.
        let selected: Vec<&&Value> = policies
            .iter()
            .filter(|p| labels_match(&p["spec"]["podSelector"], labels))
            .collect();
        let ports: Vec<Option<u64>> = selected.iter().flat_map(|p| egress_ports(p)).collect();
        let uses_bus = str_of(&labels["millrace.io/bus"]).as_deref() == Some("true");
        for needed in [53, 443] {
            if !ports.contains(&Some(needed)) {
                problems.push(format!(
                    "{owner}: no NetworkPolicy lets it reach port {needed}"
                ));
            }
        }
        let reaches_broker = ports
            .iter()
            .any(|p| p.is_none_or(|p| BROKER_PORTS.contains(&p)));
        let pod_binary = image_binary(&pod["containers"][0]);
        if !uses_bus_binary(&pod_binary) {
            // The cleaner and the ingestor use no bus.
            if uses_bus
                || reaches_broker
                || ports.iter().any(|p| {
                    !p.is_some_and(|p| p == 53 || p == 443 || cloud.identity_ports.contains(&p))
                })
            {
                problems.push(format!(
                    "{owner}: {pod_binary} uses no bus: it may reach only DNS, object storage and its identity endpoint, but its policies open {ports:?}"
                ));
            }
        } else if !uses_bus || !BROKER_PORTS.iter().all(|b| ports.contains(&Some(*b))) {
            problems.push(format!(
                "{owner}: a bus user must be allowed to reach the broker ports"
            ));
        }

        for container in pod["containers"].as_sequence().into_iter().flatten() {
            let image = str_of(&container["image"]).unwrap_or_default();
            let binary = image_binary(container);
            let who = format!(
                "{owner} container {}",
                str_of(&container["name"]).unwrap_or_default()
            );
            if !BINARIES.contains(&binary.as_str()) || binary == "millrace" {
                problems.push(format!("{who}: image {image:?} is not a Millrace service"));
                continue;
            }
            // Its environment, resolved; and which variables come from a Secret that has them.
            let mut env = BTreeMap::new();
            let mut from_secrets = BTreeSet::new();
            for e in container["env"].as_sequence().into_iter().flatten() {
                let name = str_of(&e["name"]).unwrap_or_default();
                if e["valueFrom"]["secretKeyRef"].is_mapping() {
                    let r = &e["valueFrom"]["secretKeyRef"];
                    let (secret, key) = (
                        str_of(&r["name"]).unwrap_or_default(),
                        str_of(&r["key"]).unwrap_or_default(),
                    );
                    let has = find(docs, "Secret", &secret).is_some_and(|s| {
                        ["data", "stringData"]
                            .iter()
                            .any(|f| !s[*f][key.as_str()].is_null())
                    });
                    if has {
                        from_secrets.insert(name.clone());
                    } else {
                        problems.push(format!(
                            "{who}: {name} refers to Secret {secret} key {key}, which the rendering lacks"
                        ));
                    }
                } else if millrace_secrets::is_secret_name(&name) {
                    problems.push(format!(
                        "{who}: {name} must come from a Secret (valueFrom.secretKeyRef), not a value or a ConfigMap"
                    ));
                }
                let value = if let Some(v) = str_of(&e["value"]) {
                    Some(v)
                } else if e["valueFrom"]["configMapKeyRef"].is_mapping() {
                    let r = &e["valueFrom"]["configMapKeyRef"];
                    let (cm, key) = (
                        str_of(&r["name"]).unwrap_or_default(),
                        str_of(&r["key"]).unwrap_or_default(),
                    );
                    let v =
                        find(docs, "ConfigMap", &cm).and_then(|c| str_of(&c["data"][key.as_str()]));
                    if v.is_none() {
                        problems.push(format!(
                            "{who}: {name} refers to {cm}/{key}, which the rendering lacks"
                        ));
                    }
                    v
                } else {
                    None
                };
                env.insert(name, value.unwrap_or_default());
            }
            let mut args = strings(&container["command"]);
            args.extend(strings(&container["args"]));
            let on_command_line = command_line_secrets(&args);
            if !on_command_line.is_empty() {
                problems.push(format!(
                    "{who}: a secret on the command line ({}): pass a file: or env: reference",
                    on_command_line.join(", ")
                ));
            }
            for (name, value) in &env {
                let found = literal_secrets(value);
                if !found.is_empty() && !from_secrets.contains(name) {
                    problems.push(format!(
                        "{who}: {name} holds a secret ({}) outside a Secret",
                        found.join(", ")
                    ));
                }
            }
            let inv = Invocation {
                who: who.clone(),
                binary: binary.clone(),
                args,
                env,
            };
            let cli = cli_for(&inv);
            for p in check_invocation(&inv, &cli) {
                problems.push(p);
            }
            invocations.push(inv.clone());
            // URLs for this cloud.
            if let Some(bus) = inv.setting(&cli, "--bus") {
                if !bus.starts_with(cloud.bus_scheme) {
                    problems.push(format!(
                        "{who}: bus {bus:?} is not a {} URL",
                        cloud.bus_scheme
                    ));
                }
            }
            for flag in [
                "--store",
                "--peer-store",
                "--collector-store",
                "--store0",
                "--store1",
            ] {
                if let Some(store) = inv
                    .setting(&cli, flag)
                    .filter(|_| cli.flags.contains_key(flag))
                {
                    if !store.starts_with(cloud.store_scheme) {
                        problems.push(format!(
                            "{who}: {flag} {store:?} is not a {} URL",
                            cloud.store_scheme
                        ));
                    }
                }
            }
            if let Some(f) = inv.setting(&cli, "--facilitator") {
                if f != expect.facilitator {
                    problems.push(format!(
                        "{who}: facilitator {f}, expected {}",
                        expect.facilitator
                    ));
                }
            }
            // Hardening.
            let sc = &container["securityContext"];
            if sc["readOnlyRootFilesystem"].as_bool() != Some(true)
                || sc["allowPrivilegeEscalation"].as_bool() != Some(false)
            {
                problems.push(format!(
                    "{who}: needs readOnlyRootFilesystem: true and allowPrivilegeEscalation: false"
                ));
            }
            for part in ["requests", "limits"] {
                if !container["resources"][part].is_mapping() {
                    problems.push(format!("{who}: no resource {part}"));
                }
            }
            // Files: the config, and exactly the secrets this binary reads.
            let files = mounted_files(docs, pod, container);
            let config_path = inv.setting(&cli, "--config").unwrap_or_default();
            if !files.contains_key(&config_path) {
                problems.push(format!(
                    "{who}: --config {config_path:?} is not a mounted file ({files:?})"
                ));
            }
            let dir = Path::new(&config_path).parent().unwrap_or(Path::new("/"));
            let config = match millrace_protocol::config::Config::parse(
                &toml_text,
                Path::new(&config_path),
                dir,
            ) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(format!("millrace.toml does not parse: {e}"));
                    continue;
                }
            };
            let index: u8 = expect.facilitator.parse().unwrap_or(0);
            let me = config.file.facilitator.iter().find(|f| f.index == index);
            let signing = me.and_then(|f| f.signing_key.clone());
            let hpke = me.and_then(|f| f.hpke_private_key.clone());
            let verify: Vec<Option<String>> = config
                .file
                .aggregation
                .iter()
                .map(|a| Some(a.verify_key.clone()))
                .collect();
            // Each ingestor's key: only that ingestor may see it.
            let me_ingestor = inv
                .setting(&cli, "--ingestor")
                .filter(|_| binary == "ingestor");
            let mut own_ingestor_key = Vec::new();
            let mut other_ingestor_keys = Vec::new();
            for i in &config.file.ingestor {
                if me_ingestor.as_deref() == Some(i.name.as_str()) {
                    own_ingestor_key.push(ingestor_key_reference(i));
                } else {
                    other_ingestor_keys.push(ingestor_key_reference(i));
                }
            }
            if let Some(name) = me_ingestor
                .as_deref()
                .filter(|_| own_ingestor_key.is_empty())
            {
                problems.push(format!("{who}: ingestor {name:?} is not in millrace.toml"));
            }
            let (needs, must_not): (Vec<Option<String>>, Vec<Option<String>>) =
                match binary.as_str() {
                    "intake-worker" => (
                        [signing, hpke].into_iter().chain(verify).collect(),
                        other_ingestor_keys,
                    ),
                    // The workflow-manager of the leader signs window manifests.
                    "aggregate-worker" | "workflow-manager" => (
                        vec![signing],
                        [hpke].into_iter().chain(other_ingestor_keys).collect(),
                    ),
                    // The ingestor signs its batches; it decrypts and verifies nothing.
                    "ingestor" => (
                        own_ingestor_key,
                        [signing, hpke]
                            .into_iter()
                            .chain(verify)
                            .chain(other_ingestor_keys)
                            .collect(),
                    ),
                    _ => (
                        Vec::new(),
                        [signing, hpke]
                            .into_iter()
                            .chain(other_ingestor_keys)
                            .collect(),
                    ),
                };
            let file_of = |reference: &str| -> Option<String> {
                reference
                    .strip_prefix("file:")
                    .map(|p| dir.join(p).display().to_string())
            };
            for reference in needs.into_iter().flatten() {
                match file_of(&reference) {
                    Some(path) if files.contains_key(&path) => {}
                    Some(path) => problems.push(format!(
                        "{who}: needs {reference} ({path}), which is not mounted"
                    )),
                    None => {
                        let var = reference.strip_prefix("env:").unwrap_or(&reference);
                        if !inv.env.contains_key(var) {
                            problems.push(format!("{who}: needs {reference}, which is not set"));
                        }
                    }
                }
            }
            for reference in must_not.into_iter().flatten() {
                if let Some(path) = file_of(&reference).filter(|p| files.contains_key(p)) {
                    problems.push(format!(
                        "{who}: may not see {reference}, but {path} is mounted"
                    ));
                }
            }
            // Every reference the bus URL makes is wired to a Secret: a file a Secret mounts,
            // or a variable set from one.
            if let Some(bus) = inv.setting(&cli, "--bus") {
                for reference in url_references(&bus) {
                    if let Some(path) = reference.strip_prefix("file:") {
                        match files.get(path) {
                            Some(from) if from.starts_with("Secret") => {}
                            Some(from) => problems.push(format!(
                                "{who}: the bus URL's {reference} comes from {from}, not a Secret"
                            )),
                            None => problems.push(format!(
                                "{who}: the bus URL's {reference} is not mounted from a Secret ({files:?})"
                            )),
                        }
                    } else if let Some(var) = reference.strip_prefix("env:") {
                        if !from_secrets.contains(var) {
                            problems.push(format!(
                                "{who}: the bus URL's {reference} is not set from a Secret"
                            ));
                        }
                    }
                }
            }
            let bus_credentials =
                |from: &String| from.starts_with(&format!("Secret {BUS_CREDENTIALS}"));
            if uses_bus_binary(&binary) {
                // Bus users may mount the bus's credentials; the cleaner uses no bus.
            } else if files.values().any(bus_credentials) {
                problems.push(format!("{who}: uses no bus, but mounts its credentials"));
            }
            if !matches!(
                binary.as_str(),
                "intake-worker" | "aggregate-worker" | "workflow-manager" | "ingestor"
            ) && files
                .values()
                .any(|from| from.starts_with("Secret") && !bus_credentials(from))
            {
                problems.push(format!("{who}: reads no secret, but mounts one"));
            }

            if long_running {
                // Probes on the metrics endpoint, which must listen beyond localhost.
                let addr = inv.setting(&cli, "--metrics-addr").unwrap_or_default();
                let port: Option<u64> = addr.rsplit(':').next().and_then(|p| p.parse().ok());
                if !addr.starts_with("0.0.0.0:") {
                    problems.push(format!(
                        "{who}: --metrics-addr {addr:?} must bind 0.0.0.0 in a pod"
                    ));
                }
                let named_port = |name: &str| -> Option<u64> {
                    container["ports"].as_sequence()?.iter().find_map(|p| {
                        (str_of(&p["name"]).as_deref() == Some(name))
                            .then(|| p["containerPort"].as_u64())
                            .flatten()
                    })
                };
                // What the binary says it serves there (`--help` of --metrics-addr).
                let serves = served_paths(
                    cli.help
                        .get("--metrics-addr")
                        .map(String::as_str)
                        .unwrap_or(""),
                );
                for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
                {
                    let get = &container[probe]["httpGet"];
                    let probe_port = get["port"]
                        .as_u64()
                        .or_else(|| str_of(&get["port"]).and_then(|n| named_port(&n)));
                    let probe_path = str_of(&get["path"]).unwrap_or_default();
                    if probe_path != path || probe_port != port || port.is_none() {
                        problems.push(format!(
                            "{who}: {probe} must GET {path} on the metrics port {port:?}"
                        ));
                    }
                    if !serves.contains(&probe_path) {
                        problems.push(format!(
                            "{who}: {probe} GETs {probe_path:?}, which `{binary} --help` does not list among what --metrics-addr serves ({serves:?})"
                        ));
                    }
                }
                // SIGTERM: the worker drains for --drain-grace, the ingestor writes its open
                // batches; after the preStop sleep. The pod must be given longer.
                let drain = shutdown_secs(&inv, &cli);
                let pre_stop = pre_stop_secs(container);
                let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30) as f64;
                match drain {
                    Some(d) if grace > d + pre_stop => {}
                    other => problems.push(format!(
                        "{who}: terminationGracePeriodSeconds {grace} is not longer than the drain grace {other:?} plus the preStop sleep ({pre_stop} s)"
                    )),
                }
                // A service that takes connections (--listen): on all interfaces, on a named
                // container port, behind a Service, and let in by a NetworkPolicy.
                if cli.flags.contains_key("--listen") {
                    let listen = inv
                        .setting(&cli, "--listen")
                        .or_else(|| cli.defaults.get("--listen").cloned())
                        .unwrap_or_default();
                    let listen_port: Option<u64> =
                        listen.rsplit(':').next().and_then(|p| p.parse().ok());
                    if !listen.starts_with("0.0.0.0:") {
                        problems.push(format!(
                            "{who}: --listen {listen:?} must bind 0.0.0.0 in a pod"
                        ));
                    }
                    let port_name = container["ports"].as_sequence().and_then(|ps| {
                        ps.iter().find_map(|p| {
                            (p["containerPort"].as_u64() == listen_port)
                                .then(|| str_of(&p["name"]))
                                .flatten()
                        })
                    });
                    if port_name.is_none() {
                        problems.push(format!(
                            "{who}: its --listen port {listen_port:?} is not a named container port"
                        ));
                    }
                    let serviced = kind(docs, "Service").into_iter().any(|svc| {
                        let selector = &svc["spec"]["selector"];
                        selector.as_mapping().is_some_and(|m| {
                            !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v))
                        }) && svc["spec"]["ports"]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .any(|p| {
                                let t = &p["targetPort"];
                                t.as_u64() == listen_port
                                    || (port_name.is_some() && str_of(t) == port_name)
                            })
                    });
                    if !serviced {
                        problems.push(format!(
                            "{who}: no Service sends traffic to its --listen port {listen_port:?}"
                        ));
                    }
                    let admitted = listen_port.is_some_and(|lp| {
                        selected.iter().any(|p| {
                            strings(&p["spec"]["policyTypes"])
                                .iter()
                                .any(|t| t == "Ingress")
                                && p["spec"]["ingress"]
                                    .as_sequence()
                                    .into_iter()
                                    .flatten()
                                    .any(|rule| rule_admits(rule, lp, port_name.as_deref()))
                        })
                    });
                    if !admitted {
                        problems.push(format!(
                            "{who}: no NetworkPolicy lets clients in to its --listen port {listen_port:?}"
                        ));
                    }
                }
            } else if inv
                .setting(&cli, "--once")
                .is_none_or(|v| v == "false" || v == "0")
            {
                problems.push(format!(
                    "{who}: a CronJob's container must run once (--once / MILLRACE_ONCE)"
                ));
            }
        }
    }
    problems.extend(check_ingestor_objects(docs, expect));
    problems.extend(check_ingestor_stores(&invocations, expect));
    with_overlay(cloud, problems)
}

/// The ingestor writes to facilitator 0's store as --store0 and facilitator 1's as --store1: in
/// facilitator F's rendering those are its services' --store (F) and --peer-store (the other).
fn check_ingestor_stores(invocations: &[Invocation], expect: &Expect) -> Vec<String> {
    let mut problems = Vec::new();
    let f: usize = expect.facilitator.parse().unwrap_or(0);
    let setting = |inv: &Invocation, flag: &str| inv.setting(&cli_for(inv), flag);
    for ingestor in invocations.iter().filter(|i| i.binary == "ingestor") {
        let by_index = [setting(ingestor, "--store0"), setting(ingestor, "--store1")];
        for facilitator in invocations
            .iter()
            .filter(|i| PEER_STORE_USERS.contains(&i.binary.as_str()))
        {
            for (index, flag) in [(f, "--store"), (1 - f.min(1), "--peer-store")] {
                let theirs = setting(facilitator, flag);
                if theirs.is_some() && by_index[index] != theirs {
                    problems.push(format!(
                        "{}: --store{index} {:?} is not facilitator {index}'s store {:?} ({}'s {flag})",
                        ingestor.who, by_index[index], theirs, facilitator.who
                    ));
                }
            }
        }
    }
    problems
}

/// Does `binary` use the bus (and so may see its credentials)?
fn uses_bus_binary(binary: &str) -> bool {
    matches!(
        binary,
        "intake-worker" | "aggregate-worker" | "mill" | "workflow-manager"
    )
}

fn with_overlay(cloud: &Cloud, problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .map(|p| format!("overlay {}: {p}", cloud.name))
        .collect()
}

fn overlay(name: &str) -> Vec<Value> {
    kustomize(&root().join("deploy/k8s/overlays").join(name))
}

#[test]
fn the_aws_overlay_renders_a_complete_facilitator_on_sns_sqs_and_s3() {
    let problems = check_rendering(
        &overlay("aws"),
        &AWS,
        &FACILITATOR_0_THE_MILL_AND_THE_INGESTOR,
    );
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

#[test]
fn the_gcp_overlay_renders_a_complete_facilitator_on_pubsub_and_gcs() {
    let problems = check_rendering(
        &overlay("gcp"),
        &GCP,
        &FACILITATOR_0_THE_MILL_AND_THE_INGESTOR,
    );
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

const AMAZON_MQ: Cloud = Cloud {
    name: "aws-amazon-mq",
    bus_scheme: "amqps://",
    store_scheme: "s3://",
    identity_annotation: "eks.amazonaws.com/role-arn",
    identity_ports: &[],
};

/// RabbitMQ as a managed service: amqps://, the password in a Secret mounted into every bus user,
/// the URL in the ConfigMap holding only a reference to it.
#[test]
fn the_amazon_mq_overlay_takes_the_bus_password_from_a_secret() {
    let docs = overlay("aws-amazon-mq");
    let problems = check_rendering(&docs, &AMAZON_MQ, &FACILITATOR_0_THE_MILL_AND_THE_INGESTOR);
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
    let secret = find(&docs, "Secret", BUS_CREDENTIALS)
        .unwrap_or_else(|| panic!("no Secret {BUS_CREDENTIALS}"));
    assert!(!secret["data"]["password"].is_null(), "{secret:?}");
}

fn amazon_mq_problems_after(edit: impl FnOnce(&mut Vec<Value>)) -> Vec<String> {
    let mut docs = overlay("aws-amazon-mq");
    edit(&mut docs);
    check_rendering(&docs, &AMAZON_MQ, &FACILITATOR_0_THE_MILL_AND_THE_INGESTOR)
}

#[test]
fn a_secret_outside_a_secret_or_an_unwired_reference_is_caught() {
    let bus = "amqps://millrace:hunter2@b-1.mq.us-east-1.amazonaws.com:5671/%2f";
    expect_problem(
        &amazon_mq_problems_after(|d| {
            settings_mut(d)["data"]["bus"] = Value::String(bus.to_string());
        }),
        "holds a secret (the password in the user-info",
    );
    expect_problem(
        &amazon_mq_problems_after(|d| {
            settings_mut(d)["data"]["bus"] =
                Value::String(format!("{bus}?token=hunter2").replace(":hunter2@", "@"));
        }),
        "holds a secret (token= in a URL)",
    );
    expect_problem(
        &amazon_mq_problems_after(|d| {
            doc_mut(d, "Deployment", "intake-worker")["spec"]["template"]["spec"]["containers"]
                [0]["args"] =
                serde_norway::from_str(&format!("[--bus, '{bus}']")).unwrap_or(Value::Null);
        }),
        "a secret on the command line",
    );
    expect_problem(
        &amazon_mq_problems_after(|d| {
            doc_mut(d, "Deployment", "mill")["spec"]["template"]["spec"]["containers"][0]["args"] =
                serde_norway::from_str("[--password, hunter2]").unwrap_or(Value::Null);
        }),
        "a secret on the command line (--password)",
    );
    expect_problem(
        &amazon_mq_problems_after(|d| {
            let env = &mut doc_mut(d, "Deployment", "mill")["spec"]["template"]["spec"]
                ["containers"][0]["env"];
            if let Value::Sequence(list) = env {
                list.push(
                    serde_norway::from_str("{name: MILLRACE_BUS_PASSWORD, value: hunter2}")
                        .unwrap_or(Value::Null),
                );
            }
        }),
        "MILLRACE_BUS_PASSWORD must come from a Secret",
    );
    expect_problem(
        &amazon_mq_problems_after(|d| {
            d.retain(|doc| name_of(doc) != BUS_CREDENTIALS);
        }),
        "the bus URL's file:/etc/millrace/bus/password is not mounted from a Secret",
    );
    expect_problem(
        &amazon_mq_problems_after(|d| {
            settings_mut(d)["data"]["bus"] = Value::String(
                "amqps://millrace@b-1.mq.us-east-1.amazonaws.com/%2f?password=env:AMQP_PASSWORD"
                    .to_string(),
            );
        }),
        "the bus URL's env:AMQP_PASSWORD is not set from a Secret",
    );
    assert_eq!(
        literal_secrets("amqps://u@h/?password=file:/x&cacert=/ca.pem"),
        Vec::<String>::new()
    );
}

/// Facilitator 1 = an overlay with the facilitator-1 component: no mill, no collector cleaner,
/// facilitator 1 everywhere. The overlay is written under the target directory, pointing back
/// at the repository's base and component.
#[test]
fn the_facilitator_1_component_drops_the_collector_and_sets_the_index() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-fac1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let k8s = root().join("deploy/k8s");
    // kustomize wants relative paths to other kustomizations.
    let up = "../".repeat(dir.components().count());
    let rel = |p: &str| {
        format!(
            "{up}{}",
            k8s.join(p).display().to_string().trim_start_matches('/')
        )
    };
    let text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: millrace-fac-1\n\
         resources:\n  - {}\ncomponents:\n  - {}\n\
         configMapGenerator:\n  - name: millrace-settings\n    behavior: merge\n    literals:\n\
         \x20     - bus=sns-sqs://us-east-1\n      - store=s3://b-fac-1\n      - peer-store=s3://b-fac-0\n\
         \x20     - collector-store=s3://b-collector\n\
         secretGenerator:\n  - name: millrace-signing-key\n    behavior: replace\n    literals: [beta.ed25519=x]\n\
         \x20 - name: millrace-intake-keys\n    behavior: replace\n    literals: [beta.hpke=x, clicks.verify=x]\n\
         patches:\n{}",
        rel("base"),
        rel("components/facilitator-1"),
        ["workflow-manager", "intake-worker", "aggregate-worker", "cleaner"]
            .iter()
            .map(|sa| format!(
                "  - patch: |-\n      apiVersion: v1\n      kind: ServiceAccount\n      metadata:\n        name: {sa}\n        annotations:\n          eks.amazonaws.com/role-arn: arn:aws:iam::111122223333:role/millrace-fac-1-{sa}\n"
            ))
            .collect::<String>(),
    );
    std::fs::write(dir.join("kustomization.yaml"), text)
        .unwrap_or_else(|e| panic!("writing the test overlay: {e}"));
    let docs = kustomize(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let expect = Expect {
        deployments: &["aggregate-worker", "intake-worker"],
        cronjobs: &[
            ("workflow-manager", "*/10 * * * *"),
            ("cleaner", "0 * * * *"),
        ],
        facilitator: "1",
        ingestor: false,
    };
    let problems = check_rendering(&docs, &AWS, &expect);
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
    for (k, name) in [
        ("CronJob", "cleaner-collector"),
        ("ServiceAccount", "mill"),
        ("ServiceAccount", "ingestor"),
        ("NetworkPolicy", "allow-ingestor"),
        ("PodDisruptionBudget", "mill"),
    ] {
        assert!(
            find(&docs, k, name).is_none(),
            "facilitator 1 still has {k} {name}"
        );
    }
    let problems = check_disruption_budgets(&docs);
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

fn rendering_problems_after(edit: impl FnOnce(&mut Vec<Value>)) -> Vec<String> {
    let mut docs = overlay("aws");
    edit(&mut docs);
    check_rendering(&docs, &AWS, &FACILITATOR_0_THE_MILL_AND_THE_INGESTOR)
}

fn doc_mut<'a>(docs: &'a mut [Value], k: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| str_of(&d["kind"]).as_deref() == Some(k) && name_of(d) == name)
        .unwrap_or_else(|| panic!("the aws rendering has no {k} {name}"))
}

fn settings_mut(docs: &mut [Value]) -> &mut Value {
    docs.iter_mut()
        .find(|d| {
            str_of(&d["kind"]).as_deref() == Some("ConfigMap")
                && name_of(d).starts_with("millrace-settings")
        })
        .unwrap_or_else(|| panic!("the aws rendering has no millrace-settings ConfigMap"))
}

#[test]
fn a_broken_rendering_is_caught() {
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "Deployment", "intake-worker")["spec"]["template"]["spec"]
                ["terminationGracePeriodSeconds"] =
                Value::Number(serde_norway::Number::from(20u64));
        }),
        "is not longer than the drain grace",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "CronJob", "workflow-manager")["spec"]["schedule"] =
                Value::String("@hourly".to_string());
        }),
        "CronJob workflow-manager runs",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "CronJob", "cleaner")["spec"]["concurrencyPolicy"] =
                Value::String("Allow".to_string());
        }),
        "concurrencyPolicy: Forbid",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            settings_mut(d)["data"]["bus"] = Value::String("pubsub://example-project".to_string());
        }),
        "is not a sns-sqs:// URL",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            settings_mut(d)["data"]["peer-store"] = Value::String("gs://elsewhere".to_string());
        }),
        "--peer-store \"gs://elsewhere\" is not a s3:// URL",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            let c =
                &mut doc_mut(d, "Deployment", "mill")["spec"]["template"]["spec"]["containers"][0];
            c["readinessProbe"]["httpGet"]["path"] = Value::String("/healthz".to_string());
        }),
        "readinessProbe must GET /readyz",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            let c = &mut doc_mut(d, "Deployment", "aggregate-worker")["spec"]["template"]["spec"]
                ["containers"][0];
            if let Some(env) = c["env"].as_sequence_mut() {
                env.push(
                    serde_norway::from_str("{name: MILLRACE_PEER_STORE, value: s3://x}")
                        .unwrap_or(Value::Null),
                );
            }
        }),
        "reads no environment variable MILLRACE_PEER_STORE",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            let c = &mut doc_mut(d, "CronJob", "workflow-manager")["spec"]["jobTemplate"]["spec"]
                ["template"]["spec"]["containers"][0];
            if let Some(env) = c["env"].as_sequence_mut() {
                env.retain(|e| str_of(&e["name"]).as_deref() != Some("MILLRACE_PEER_STORE"));
            }
        }),
        "`workflow-manager` needs --peer-store",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            let pod = &mut doc_mut(d, "Deployment", "intake-worker")["spec"]["template"]["spec"];
            pod["volumes"][1] =
                serde_norway::from_str("{name: keys, secret: {secretName: nothing-here}}")
                    .unwrap_or(Value::Null);
        }),
        "which is not mounted",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            let intake_keys = kind(d, "Secret")
                .into_iter()
                .map(name_of)
                .find(|n| n.starts_with("millrace-intake-keys"))
                .unwrap_or_else(|| panic!("the aws rendering has no millrace-intake-keys Secret"));
            let pod = &mut doc_mut(d, "Deployment", "aggregate-worker")["spec"]["template"]["spec"];
            pod["volumes"][1] = serde_norway::from_str(&format!(
                "{{name: keys, projected: {{sources: [{{secret: {{name: {intake_keys}}}}}]}}}}"
            ))
            .unwrap_or(Value::Null);
        }),
        "may not see file:keys/alpha.hpke",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "CronJob", "cleaner")["spec"]["jobTemplate"]["spec"]["template"]
                ["metadata"]["labels"]["millrace.io/bus"] = Value::String("true".to_string());
        }),
        "cleaner uses no bus: it may reach only DNS, object storage and its identity endpoint",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            d.retain(|doc| name_of(doc) != "default-deny");
        }),
        "no default-deny NetworkPolicy",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "ServiceAccount", "mill")["metadata"]["annotations"] = Value::Null;
        }),
        "ServiceAccount mill has no eks.amazonaws.com/role-arn annotation",
    );
}

fn ingestor_container(docs: &mut [Value]) -> &mut Value {
    &mut doc_mut(docs, "Deployment", "ingestor")["spec"]["template"]["spec"]["containers"][0]
}

fn set_env(container: &mut Value, name: &str, value: &str) {
    if let Some(env) = container["env"].as_sequence_mut() {
        env.retain(|e| str_of(&e["name"]).as_deref() != Some(name));
        env.push(
            serde_norway::from_str(&format!("{{name: {name}, value: '{value}'}}"))
                .unwrap_or(Value::Null),
        );
    }
}

#[test]
fn a_broken_ingestor_rendering_is_caught() {
    for (k, name, needle) in [
        (
            "HorizontalPodAutoscaler",
            "ingestor",
            "no HorizontalPodAutoscaler scales Deployment ingestor",
        ),
        (
            "PodDisruptionBudget",
            "ingestor",
            "no PodDisruptionBudget covers the ingestor's pods",
        ),
        (
            "Service",
            "ingestor",
            "no Service sends traffic to its --listen port Some(8080)",
        ),
        (
            "NetworkPolicy",
            "allow-ingestor",
            "no NetworkPolicy lets clients in to its --listen port Some(8080)",
        ),
    ] {
        expect_problem(
            &rendering_problems_after(|d| {
                d.retain(|doc| {
                    !(str_of(&doc["kind"]).as_deref() == Some(k) && name_of(doc) == name)
                })
            }),
            needle,
        );
    }
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "HorizontalPodAutoscaler", "ingestor")["spec"]["minReplicas"] =
                Value::Number(serde_norway::Number::from(1u64));
        }),
        "the ingestor needs at least 2 replicas",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "Deployment", "ingestor")["spec"]["replicas"] =
                Value::Number(serde_norway::Number::from(2u64));
        }),
        "leave the count to its HorizontalPodAutoscaler",
    );
    // Probes: on the metrics port, at paths the binary serves there.
    expect_problem(
        &rendering_problems_after(|d| {
            ingestor_container(d)["livenessProbe"]["httpGet"]["port"] =
                Value::String("http".to_string());
        }),
        "livenessProbe must GET /healthz on the metrics port",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            ingestor_container(d)["readinessProbe"]["httpGet"]["path"] =
                Value::String("/ready".to_string());
        }),
        "readinessProbe GETs \"/ready\", which `ingestor --help` does not list",
    );
    // Shutdown: the preStop sleep plus writing the open batches.
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "Deployment", "ingestor")["spec"]["template"]["spec"]
                ["terminationGracePeriodSeconds"] = Value::Number(serde_norway::Number::from(30u64));
        }),
        "terminationGracePeriodSeconds 30 is not longer than the drain grace Some(36.0) plus the preStop sleep (5 s)",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            set_env(ingestor_container(d), "MILLRACE_LISTEN", "127.0.0.1:8080")
        }),
        "--listen \"127.0.0.1:8080\" must bind 0.0.0.0 in a pod",
    );
    // Stores: by index, of this cloud.
    expect_problem(
        &rendering_problems_after(|d| {
            let peer = str_of(&settings_mut(d)["data"]["peer-store"]).unwrap_or_default();
            settings_mut(d)["data"]["store0"] = Value::String(peer);
        }),
        "--store0 Some(\"s3://example-millrace-fac-1?region=us-east-1\") is not facilitator 0's store",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            settings_mut(d)["data"]["store1"] = Value::String("gs://elsewhere".to_string());
        }),
        "--store1 \"gs://elsewhere\" is not a s3:// URL",
    );
    // Keys: the ingestor's own and no facilitator's; no facilitator service sees the ingestor's.
    expect_problem(
        &rendering_problems_after(|d| {
            let signing = kind(d, "Secret")
                .into_iter()
                .map(name_of)
                .find(|n| n.starts_with("millrace-signing-key"))
                .unwrap_or_default();
            let pod = &mut doc_mut(d, "Deployment", "ingestor")["spec"]["template"]["spec"];
            pod["volumes"][1]["secret"]["secretName"] = Value::String(signing);
        }),
        "may not see file:keys/alpha.ed25519",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            let key = kind(d, "Secret")
                .into_iter()
                .map(name_of)
                .find(|n| n.starts_with("millrace-ingestor-key"))
                .unwrap_or_default();
            let pod = &mut doc_mut(d, "Deployment", "aggregate-worker")["spec"]["template"]["spec"];
            pod["volumes"][1] = serde_norway::from_str(&format!(
                "{{name: keys, projected: {{sources: [{{secret: {{name: millrace-signing-key}}}}, {{secret: {{name: {key}}}}}]}}}}"
            ))
            .unwrap_or(Value::Null);
        }),
        "may not see file:keys/ingestor-1.ed25519",
    );
    expect_problem(
        &rendering_problems_after(|d| {
            set_env(ingestor_container(d), "MILLRACE_INGESTOR", "ingestor-9")
        }),
        "ingestor \"ingestor-9\" is not in millrace.toml",
    );
    // Network: no bus for the ingestor.
    expect_problem(
        &rendering_problems_after(|d| {
            doc_mut(d, "Deployment", "ingestor")["spec"]["template"]["metadata"]["labels"]
                ["millrace.io/bus"] = Value::String("true".to_string());
        }),
        "ingestor uses no bus: it may reach only DNS, object storage and its identity endpoint",
    );
    // Where no ingestor runs, none of its objects may stay behind.
    let mut docs = overlay("aws");
    docs.retain(|doc| {
        name_of(doc) != "ingestor" || str_of(&doc["kind"]).as_deref() == Some("Service")
    });
    let expect = Expect {
        deployments: &["aggregate-worker", "intake-worker", "mill"],
        ingestor: false,
        ..FACILITATOR_0_THE_MILL_AND_THE_INGESTOR
    };
    let problems = check_rendering(&docs, &AWS, &expect);
    expect_problem(
        &problems,
        "Service ingestor is here, but this rendering runs no ingestor",
    );
    expect_problem(
        &problems,
        "(the ingestor's key) is here, but this rendering runs no ingestor",
    );
}

// ------------------------------------------------------------------------------------------------
// Terraform
// ------------------------------------------------------------------------------------------------

const TERRAFORM_WHY: &str =
    "`terraform fmt -check` checks deploy/terraform offline (Terraform 1.5 or later)";

fn terraform_fmt_problems(dir: &Path) -> Vec<String> {
    if let Err(e) = require_tool("terraform", TERRAFORM_WHY) {
        panic!("{e}");
    }
    let out = Command::new("terraform")
        .args(["fmt", "-check", "-recursive", "-no-color"])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running terraform fmt: {e}"));
    if out.status.success() {
        Vec::new()
    } else {
        vec![format!(
            "terraform fmt -check -recursive {} failed; not formatted:\n{}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )]
    }
}

/// Outputs of a Terraform file (`output "NAME" { … }`) that would print a secret in plain text:
/// a name or value expression with a secret's name in it (`password`, `token`, `secret`,
/// `private_key`, …) without `sensitive = true`.
fn terraform_output_problems(file: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("output \"") {
        let after = &rest[start + "output \"".len()..];
        let name = after.split('"').next().unwrap_or_default().to_string();
        // The block: up to the brace that closes it.
        let body_start = after.find('{').unwrap_or(after.len());
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[body_start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = body_start + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = &after[body_start..end];
        let secretive = millrace_secrets::is_secret_name(&name)
            || body
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty() && *w != "description")
                .any(|w| {
                    // Not every `key` (store_key_prefix is a path): the words that mean a secret.
                    let w = w.to_ascii_lowercase();
                    [
                        "password",
                        "passwd",
                        "secret",
                        "token",
                        "private_key",
                        "access_key",
                        "credentials",
                    ]
                    .iter()
                    .any(|s| w.contains(s))
                });
        let sensitive = body
            .lines()
            .any(|l| l.split_whitespace().collect::<String>() == "sensitive=true");
        if secretive && !sensitive {
            problems.push(format!(
                "{file}: output {name:?} shows a secret: mark it sensitive = true (or do not output it)"
            ));
        }
        rest = &after[end.min(after.len())..];
    }
    problems
}

fn tf_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && !path.ends_with(".terraform") {
            tf_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "tf") {
            out.push(path);
        }
    }
}

#[test]
fn terraform_outputs_no_secret_in_plain_text() {
    let mut files = Vec::new();
    tf_files(&root().join("deploy/terraform"), &mut files);
    assert!(files.len() > 4, "found only {files:?}");
    let problems: Vec<String> = files
        .iter()
        .flat_map(|f| terraform_output_problems(&f.display().to_string(), &read(f)))
        .collect();
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

#[test]
fn a_secret_terraform_output_is_caught() {
    let text = "output \"bus_url\" {\n  value = \"sns-sqs://x\"\n}\n\
                output \"broker_password\" {\n  value = random_password.broker.result\n}\n\
                output \"admin\" {\n  value = { user = \"a\", pw = aws_mq_broker.b.user[0].password }\n}\n\
                output \"hidden\" {\n  value     = random_password.broker.result\n  sensitive = true\n}\n";
    let problems = terraform_output_problems("test.tf", text);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    expect_problem(&problems, "output \"broker_password\" shows a secret");
    expect_problem(&problems, "output \"admin\" shows a secret");
}

#[test]
fn the_terraform_is_formatted() {
    let problems = terraform_fmt_problems(&root().join("deploy/terraform"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn badly_formatted_terraform_is_caught() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-tf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    std::fs::write(
        dir.join("main.tf"),
        "variable \"x\" {\n      type=string\n}\n",
    )
    .unwrap_or_else(|e| panic!("writing the test file: {e}"));
    let problems = terraform_fmt_problems(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !problems.is_empty(),
        "terraform fmt accepted a badly formatted file"
    );
}

#[test]
fn a_missing_tool_is_reported_with_what_to_install() {
    let e = require_tool("millrace-no-such-tool", "it is needed")
        .err()
        .unwrap_or_default();
    assert!(
        e.contains("install millrace-no-such-tool") && e.contains("it is needed"),
        "{e}"
    );
}

/// The Kubernetes ServiceAccounts a Terraform module gives a cloud identity (`service_account =
/// "NAME"` in its roles), beside the ones the base has: each must have one.
fn terraform_identity_problems(
    module: &str,
    text: &str,
    service_accounts: &BTreeSet<String>,
) -> Vec<String> {
    let granted: BTreeSet<String> = text
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "service_account")
                .then(|| value.trim().trim_matches('"').to_string())
                .filter(|v| !v.contains('$'))
        })
        .collect();
    service_accounts
        .difference(&granted)
        .map(|sa| {
            format!("{module}: ServiceAccount {sa:?} of the base has no cloud identity (no role with service_account = \"{sa}\")")
        })
        .collect()
}

#[test]
fn every_service_account_of_the_base_has_a_cloud_identity_in_each_terraform_module() {
    let base = kustomize(&root().join("deploy/k8s/base"));
    let service_accounts: BTreeSet<String> = kind(&base, "ServiceAccount")
        .into_iter()
        .map(name_of)
        .collect();
    assert!(
        service_accounts.contains("ingestor"),
        "{service_accounts:?}"
    );
    for module in ["aws", "gcp"] {
        let path = format!("deploy/terraform/modules/{module}/iam.tf");
        let text = read(&root().join(&path));
        let problems = terraform_identity_problems(&path, &text, &service_accounts);
        assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
        // And the check can fail: the module without its ingestor.
        let without: String = text
            .lines()
            .filter(|l| !l.contains("service_account = \"ingestor\""))
            .collect::<Vec<_>>()
            .join("\n");
        expect_problem(
            &terraform_identity_problems(&path, &without, &service_accounts),
            "ServiceAccount \"ingestor\" of the base has no cloud identity",
        );
    }
}

/// The AWS module names SNS topics and SQS queues by a rule of its own; it must be the bus's.
#[test]
fn the_aws_module_names_topics_and_queues_as_the_bus_does() {
    use millrace_bus::sns_sqs::{queue_name, topic_name};

    let module = read(&root().join("deploy/terraform/modules/aws/main.tf"));
    for rule in [
        r#"sns_name   = { for t, _ in local.topics : t => replace(t, ".", "_") }"#,
        r#"queue_name = { for t, g in local.topics : t => "${replace(t, ".", "_")}__${g}" }"#,
        r#""${local.p}.${f}.intake" => "intake-worker-${f}""#,
        r#""${local.p}.${f}.aggregate" => "aggregate-worker-${f}""#,
        r#""${local.p}.collect" = "mill""#,
        r#""${local.p}.results" = "inspect""#,
    ] {
        assert!(
            module.contains(rule),
            "deploy/terraform/modules/aws/main.tf no longer has {rule:?}; update this test with it"
        );
    }
    for (topic, group) in fleet_topics("millrace") {
        let module_topic = topic.replace('.', "_");
        assert_eq!(topic_name(&topic), module_topic, "SNS name of {topic}");
        assert_eq!(
            queue_name(&topic, &group),
            format!("{module_topic}__{group}"),
            "SQS name of {topic} / {group}"
        );
    }
}

/// The same for the Google Cloud module and the Pub/Sub backend.
#[test]
fn the_gcp_module_names_topics_and_subscriptions_as_the_bus_does() {
    use millrace_bus::pubsub::{subscription_id, topic_id};

    let module = read(&root().join("deploy/terraform/modules/gcp/main.tf"));
    for rule in [
        r#"subscription_name = { for t, g in local.topics : t => "${t}~${g}" }"#,
        r#"name    = each.key"#,
    ] {
        assert!(
            module.contains(rule)
                || read(&root().join("deploy/terraform/modules/gcp/pubsub.tf")).contains(rule),
            "deploy/terraform/modules/gcp no longer has {rule:?}; update this test with it"
        );
    }
    for (topic, group) in fleet_topics("millrace") {
        assert_eq!(topic_id(&topic), topic, "Pub/Sub topic id of {topic}");
        assert_eq!(
            subscription_id(&topic, &group),
            format!("{topic}~{group}"),
            "Pub/Sub subscription id of {topic} / {group}"
        );
    }
}

/// Every topic the fleet uses, each with the one consumer group on it.
fn fleet_topics(prefix: &str) -> Vec<(String, String)> {
    use millrace_protocol::tasks::{groups, topics};

    let mut fleet: Vec<(String, String)> = Vec::new();
    for f in 0..2u8 {
        fleet.push((topics::intake(prefix, f), groups::intake(f)));
        fleet.push((topics::aggregate(prefix, f), groups::aggregate(f)));
        // The modules' own templates for these groups.
        assert_eq!(groups::intake(f), format!("intake-worker-{f}"));
        assert_eq!(groups::aggregate(f), format!("aggregate-worker-{f}"));
    }
    assert_eq!(groups::collect(), "mill");
    fleet.push((topics::collect(prefix), groups::collect()));
    let inspect = millrace_bus::INSPECT_GROUP.to_string();
    assert_eq!(inspect, "inspect");
    fleet.push((topics::results(prefix), inspect.clone()));
    let companions: Vec<(String, String)> = fleet
        .iter()
        .flat_map(|(t, _)| {
            [
                (millrace_bus::dead_topic(t), inspect.clone()),
                (millrace_bus::rejected_topic(t), inspect.clone()),
            ]
        })
        .collect();
    fleet.extend(companions);
    fleet
}

// ---------------------------------------------------------------------------------------------
// The operator's kit: Prometheus in Docker Compose, and in Kubernetes the PodMonitor, the KEDA
// ScaledObjects and the PodDisruptionBudgets. (tests/monitoring.rs checks the rules and the
// dashboard themselves.)
// ---------------------------------------------------------------------------------------------

/// The binaries that serve /metrics.
const METRICS_BINARIES: [&str; 5] = [
    "workflow-manager",
    "intake-worker",
    "aggregate-worker",
    "mill",
    "ingestor",
];

/// Where a compose service serves /metrics (`--metrics-addr` or `MILLRACE_METRICS_ADDR`), if its
/// binary serves any; the binary's default is 127.0.0.1:9464.
fn compose_metrics_addr(svc: &Value) -> Option<String> {
    let binary = compose_binary(svc)?;
    if !METRICS_BINARIES.contains(&binary.as_str()) {
        return None;
    }
    let words = strings(&svc["command"]);
    let from_flag = words.iter().enumerate().find_map(|(i, w)| {
        if w == "--metrics-addr" {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix("--metrics-addr=").map(str::to_string)
        }
    });
    Some(
        from_flag
            .or_else(|| environment(svc).get("MILLRACE_METRICS_ADDR").cloned())
            .unwrap_or_else(|| "127.0.0.1:9464".to_string()),
    )
}

/// The `monitoring` profile: one Prometheus that loads deploy/monitoring's rules and scrapes
/// exactly the services that serve metrics, each at the port it listens on.
fn check_compose_monitoring(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(services) = doc["services"].as_mapping() else {
        return vec!["docker-compose.yml has no services".to_string()];
    };
    let services: BTreeMap<String, &Value> = services
        .iter()
        .filter_map(|(k, v)| Some((str_of(k)?, v)))
        .collect();
    let monitors: Vec<(&String, &&Value)> = services
        .iter()
        .filter(|(_, s)| profiles_of(s).contains("monitoring"))
        .collect();
    let [(name, prometheus)] = monitors.as_slice() else {
        return vec![format!(
            "profile monitoring: {} services, expected exactly one (prometheus)",
            monitors.len()
        )];
    };
    if !str_of(&prometheus["image"]).is_some_and(|i| i.starts_with("prom/prometheus:")) {
        problems.push(format!(
            "{name}: image {:?} is not prom/prometheus",
            prometheus["image"]
        ));
    }
    // deploy/monitoring is mounted; the config file and its rule files are in it.
    let mount = strings(&prometheus["volumes"]).into_iter().find_map(|v| {
        let mut parts = v.split(':');
        let (source, target) = (parts.next()?, parts.next()?);
        (source.trim_start_matches("./").trim_end_matches('/') == "deploy/monitoring")
            .then(|| target.trim_end_matches('/').to_string())
    });
    let Some(mount) = mount else {
        problems.push(format!("{name}: does not mount ./deploy/monitoring"));
        return problems;
    };
    let in_checkout = |path: &str| -> Option<PathBuf> {
        let rest = path.strip_prefix(&format!("{mount}/"))?;
        Some(root().join("deploy/monitoring").join(rest))
    };
    let config = strings(&prometheus["command"])
        .into_iter()
        .find_map(|w| w.strip_prefix("--config.file=").map(str::to_string));
    let Some(config) = config else {
        problems.push(format!("{name}: no --config.file= in its command"));
        return problems;
    };
    let Some(config_path) = in_checkout(&config).filter(|p| p.is_file()) else {
        problems.push(format!(
            "{name}: --config.file={config} is not a file of deploy/monitoring mounted at {mount}"
        ));
        return problems;
    };
    let scrape = load_yaml(&read(&config_path), &config_path.display().to_string());
    let rule_files = strings(&scrape["rule_files"]);
    if rule_files.is_empty() {
        problems.push(format!("{}: no rule_files", config_path.display()));
    }
    for rules in rule_files {
        if !in_checkout(&rules).is_some_and(|p| p.is_file()) {
            problems.push(format!(
                "{}: rule file {rules} is not a file of deploy/monitoring mounted at {mount}",
                config_path.display()
            ));
        }
    }
    // Its targets are exactly the services that serve metrics, on their ports.
    let mut targets = BTreeSet::new();
    for job in scrape["scrape_configs"].as_sequence().into_iter().flatten() {
        for group in job["static_configs"].as_sequence().into_iter().flatten() {
            targets.extend(strings(&group["targets"]));
        }
    }
    let mut want = BTreeSet::new();
    for (svc_name, svc) in &services {
        let Some(addr) = compose_metrics_addr(svc) else {
            continue;
        };
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), ""));
        if host.starts_with("127.") || host == "localhost" {
            problems.push(format!(
                "{svc_name}: serves metrics on {addr}, which Prometheus in another container cannot reach"
            ));
            continue;
        }
        want.insert(format!("{svc_name}:{port}"));
    }
    for missing in want.difference(&targets) {
        problems.push(format!(
            "{}: does not scrape {missing}, which serves metrics",
            config_path.display()
        ));
    }
    for extra in targets.difference(&want) {
        problems.push(format!(
            "{}: scrapes {extra}, which is not a compose service serving metrics there",
            config_path.display()
        ));
    }
    problems
}

#[test]
fn the_monitoring_profile_scrapes_exactly_the_services_that_serve_metrics() {
    let problems = check_compose_monitoring(&compose_doc());
    assert!(
        problems.is_empty(),
        "docker-compose.yml, profile monitoring:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn a_broken_monitoring_profile_is_caught() {
    let after = |edit: &dyn Fn(&mut Value)| {
        let mut doc = compose_doc();
        edit(&mut doc);
        check_compose_monitoring(&doc)
    };
    // A new service serving metrics that Prometheus does not know about.
    expect_problem(
        &after(&|d| {
            let mill = d["services"]["nats-mill"].clone();
            d["services"]["nats-mill-2"] = mill;
        }),
        "does not scrape nats-mill-2:9464",
    );
    // A service that no longer serves metrics beyond its own loopback.
    expect_problem(
        &after(&|d| {
            d["services"]["kafka-intake-worker-1"]["environment"]["MILLRACE_METRICS_ADDR"] =
                Value::String("127.0.0.1:9464".to_string());
        }),
        "kafka-intake-worker-1: serves metrics on 127.0.0.1:9464",
    );
    // A service moved to another port.
    expect_problem(
        &after(&|d| {
            d["services"]["aws-ingestor"]["command"] = serde_norway::from_str(
                "[--listen, '0.0.0.0:8080', --metrics-addr, '0.0.0.0:9465']",
            )
            .unwrap_or(Value::Null);
        }),
        "scrapes aws-ingestor:9464, which is not a compose service serving metrics there",
    );
    // The config file outside the mount.
    expect_problem(
        &after(&|d| {
            d["services"]["prometheus"]["command"] =
                serde_norway::from_str("['--config.file=/etc/prometheus/prometheus.yml']")
                    .unwrap_or(Value::Null);
        }),
        "is not a file of deploy/monitoring",
    );
}

/// The worker Deployments KEDA scales, each with the topic and consumer group it consumes.
fn worker_queue(deployment: &str, prefix: &str, facilitator: u8) -> Option<(String, String)> {
    use millrace_protocol::tasks::{groups, topics};
    match deployment {
        "intake-worker" => Some((
            topics::intake(prefix, facilitator),
            groups::intake(facilitator),
        )),
        "aggregate-worker" => Some((
            topics::aggregate(prefix, facilitator),
            groups::aggregate(facilitator),
        )),
        "mill" => Some((topics::collect(prefix), groups::collect())),
        _ => None,
    }
}

fn settings_of(docs: &[Value]) -> BTreeMap<String, String> {
    kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| name_of(c).starts_with("millrace-settings"))
        .and_then(|c| c["data"].as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((str_of(k)?, str_of(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Each Deployment's pods have a PodDisruptionBudget that still lets a node drain.
fn check_disruption_budgets(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for d in kind(docs, "Deployment") {
        let name = name_of(d);
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let budgets: Vec<&Value> = kind(docs, "PodDisruptionBudget")
            .into_iter()
            .filter(|b| {
                b["spec"]["selector"]["matchLabels"].is_mapping()
                    && labels_match(&b["spec"]["selector"], labels)
            })
            .collect();
        let [budget] = budgets.as_slice() else {
            problems.push(format!(
                "Deployment {name}: {} PodDisruptionBudgets cover its pods, expected one",
                budgets.len()
            ));
            continue;
        };
        // The fewest replicas it runs: fixed, or its autoscaler's minimum.
        let scaler_min = kind(docs, "ScaledObject")
            .into_iter()
            .chain(kind(docs, "HorizontalPodAutoscaler"))
            .find(|s| str_of(&s["spec"]["scaleTargetRef"]["name"]).as_deref() == Some(&name))
            .and_then(|s| {
                s["spec"]["minReplicaCount"]
                    .as_u64()
                    .or(s["spec"]["minReplicas"].as_u64())
            });
        let replicas = d["spec"]["replicas"].as_u64().or(scaler_min).unwrap_or(1);
        let min_available = budget["spec"]["minAvailable"].as_u64();
        let max_unavailable = budget["spec"]["maxUnavailable"].as_u64();
        let blocks = match (min_available, max_unavailable) {
            (Some(n), _) => n >= replicas,
            (None, Some(n)) => n == 0,
            (None, None) => false,
        };
        if blocks {
            problems.push(format!(
                "PodDisruptionBudget {} lets none of Deployment {name}'s {replicas} replica(s) be evicted: node drains would hang",
                name_of(budget)
            ));
        }
    }
    problems
}

/// The PodMonitor, the PrometheusRule, and on AWS and Google Cloud a KEDA ScaledObject per worker
/// on its own queue or subscription (elsewhere none).
fn check_operations(docs: &[Value], cloud: &Cloud) -> Vec<String> {
    let mut problems = check_disruption_budgets(docs);
    let deployments: BTreeMap<String, &Value> = kind(docs, "Deployment")
        .into_iter()
        .map(|d| (name_of(d), d))
        .collect();

    // PodMonitor: every Deployment's pods are selected, on a port they name.
    let monitors = kind(docs, "PodMonitor");
    let [monitor] = monitors.as_slice() else {
        problems.push(format!("{} PodMonitors, expected one", monitors.len()));
        return problems;
    };
    if str_of(&monitor["apiVersion"]).as_deref() != Some("monitoring.coreos.com/v1") {
        problems.push(format!("PodMonitor apiVersion {:?}", monitor["apiVersion"]));
    }
    let ports: Vec<String> = monitor["spec"]["podMetricsEndpoints"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| str_of(&e["port"]))
        .collect();
    if ports.is_empty() {
        problems.push("PodMonitor has no podMetricsEndpoints with a named port".to_string());
    }
    for (name, d) in &deployments {
        let pod = &d["spec"]["template"];
        if !labels_match(&monitor["spec"]["selector"], &pod["metadata"]["labels"]) {
            problems.push(format!(
                "PodMonitor does not select Deployment {name}'s pods"
            ));
            continue;
        }
        for port in &ports {
            // The named port, and the one /readyz is probed on: the metrics server's.
            let container = pod["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|c| {
                    c["ports"].as_sequence().into_iter().flatten().any(|p| {
                        str_of(&p["name"]).as_deref() == Some(port.as_str())
                            && p["containerPort"].as_u64().is_some()
                    })
                });
            match container {
                None => problems.push(format!(
                    "PodMonitor scrapes port {port:?}, which Deployment {name}'s pods do not name"
                )),
                Some(c) => {
                    if str_of(&c["readinessProbe"]["httpGet"]["port"]).as_deref()
                        != Some(port.as_str())
                    {
                        problems.push(format!(
                            "Deployment {name}: /readyz is not probed on port {port:?}, so that port is not the metrics server's"
                        ));
                    }
                }
            }
        }
    }
    if kind(docs, "PrometheusRule").is_empty() {
        problems.push("no PrometheusRule".to_string());
    }

    // KEDA.
    let settings = settings_of(docs);
    let prefix = settings.get("topic-prefix").cloned().unwrap_or_default();
    let facilitator: u8 = settings
        .get("facilitator")
        .and_then(|f| f.parse().ok())
        .unwrap_or(u8::MAX);
    let bus = settings.get("bus").cloned().unwrap_or_default();
    let trigger_type = match cloud.name {
        "aws" => Some("aws-sqs-queue"),
        "gcp" => Some("gcp-pubsub"),
        _ => None,
    };
    let scaled = kind(docs, "ScaledObject");
    let Some(trigger_type) = trigger_type else {
        for s in &scaled {
            problems.push(format!(
                "ScaledObject {} on a bus KEDA is not set up for here",
                name_of(s)
            ));
        }
        for (name, d) in &deployments {
            if worker_queue(name, &prefix, facilitator).is_some() && d["spec"]["replicas"].is_null()
            {
                problems.push(format!(
                    "Deployment {name} sets no replicas and nothing scales it"
                ));
            }
        }
        return problems;
    };
    let auths: BTreeSet<String> = kind(docs, "TriggerAuthentication")
        .into_iter()
        .map(name_of)
        .collect();
    // The AWS account the identities are in (the IRSA role ARNs).
    let accounts: BTreeSet<String> = kind(docs, "ServiceAccount")
        .into_iter()
        .filter_map(|sa| str_of(&sa["metadata"]["annotations"][cloud.identity_annotation]))
        .filter_map(|arn| arn.split(':').nth(4).map(str::to_string))
        .collect();
    for s in &scaled {
        let target = str_of(&s["spec"]["scaleTargetRef"]["name"]).unwrap_or_default();
        let target_kind =
            str_of(&s["spec"]["scaleTargetRef"]["kind"]).unwrap_or_else(|| "Deployment".into());
        if target_kind != "Deployment" || !deployments.contains_key(&target) {
            problems.push(format!(
                "ScaledObject {} scales {target_kind} {target:?}, which is not a Deployment here",
                name_of(s)
            ));
        }
    }
    for (name, d) in &deployments {
        let Some((topic, group)) = worker_queue(name, &prefix, facilitator) else {
            continue;
        };
        let mine: Vec<&&Value> = scaled
            .iter()
            .filter(|s| str_of(&s["spec"]["scaleTargetRef"]["name"]).as_deref() == Some(name))
            .collect();
        let [s] = mine.as_slice() else {
            problems.push(format!(
                "Deployment {name}: {} ScaledObjects scale it, expected one",
                mine.len()
            ));
            continue;
        };
        let so = name_of(s);
        if !d["spec"]["replicas"].is_null() {
            problems.push(format!(
                "Deployment {name} sets replicas ({:?}): leave the count to ScaledObject {so}, or every `kubectl apply` resets it",
                d["spec"]["replicas"]
            ));
        }
        let min = s["spec"]["minReplicaCount"].as_u64().unwrap_or(0);
        let max = s["spec"]["maxReplicaCount"].as_u64().unwrap_or(100);
        if min < 1 || max < min {
            problems.push(format!(
                "ScaledObject {so}: minReplicaCount {min} / maxReplicaCount {max} (a worker must not scale to zero: it holds the bus connection /readyz reports)"
            ));
        }
        let triggers: Vec<&Value> = s["spec"]["triggers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .collect();
        if triggers.is_empty() {
            problems.push(format!("ScaledObject {so} has no trigger"));
        }
        for t in triggers {
            let ty = str_of(&t["type"]).unwrap_or_default();
            if ty != trigger_type {
                problems.push(format!(
                    "ScaledObject {so}: trigger {ty:?}, expected {trigger_type} on {}",
                    cloud.name
                ));
                continue;
            }
            let auth = str_of(&t["authenticationRef"]["name"]).unwrap_or_default();
            if !auths.contains(&auth) {
                problems.push(format!(
                    "ScaledObject {so}: authenticationRef {auth:?} is no TriggerAuthentication here"
                ));
            }
            let meta = &t["metadata"];
            match trigger_type {
                "aws-sqs-queue" => {
                    let region = bus.strip_prefix("sns-sqs://").unwrap_or_default();
                    let queue = millrace_bus::sns_sqs::queue_name(&topic, &group);
                    let url = str_of(&meta["queueURL"]).unwrap_or_default();
                    let account = url.split('/').nth(3).unwrap_or_default().to_string();
                    let want_prefix = format!("https://sqs.{region}.amazonaws.com/");
                    if !url.starts_with(&want_prefix) || !url.ends_with(&format!("/{queue}")) {
                        problems.push(format!(
                            "ScaledObject {so}: queueURL {url:?}, expected {want_prefix}ACCOUNT/{queue} (the queue of {topic} / {group})"
                        ));
                    }
                    if !accounts.contains(&account) {
                        problems.push(format!(
                            "ScaledObject {so}: queueURL's account {account:?} is not the one of the service accounts' roles {accounts:?}"
                        ));
                    }
                    if str_of(&meta["awsRegion"]).as_deref() != Some(region) {
                        problems.push(format!(
                            "ScaledObject {so}: awsRegion {:?}, but the bus is in {region:?}",
                            meta["awsRegion"]
                        ));
                    }
                }
                _ => {
                    let project = bus.strip_prefix("pubsub://").unwrap_or_default();
                    let want = format!(
                        "projects/{project}/subscriptions/{}",
                        millrace_bus::pubsub::subscription_id(&topic, &group)
                    );
                    let got = str_of(&meta["subscriptionName"]).unwrap_or_default();
                    if got != want {
                        problems.push(format!(
                            "ScaledObject {so}: subscriptionName {got:?}, expected {want:?} (the subscription of {topic} / {group})"
                        ));
                    }
                }
            }
        }
    }
    problems
}

#[test]
fn the_cloud_overlays_scale_each_worker_on_its_own_queue_and_are_monitored() {
    for cloud in [&AWS, &GCP] {
        let docs = overlay(cloud.name);
        let problems = with_overlay(cloud, check_operations(&docs, cloud));
        assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
        assert_eq!(
            kind(&docs, "ScaledObject").len(),
            3,
            "overlay {}",
            cloud.name
        );
    }
    // Amazon MQ is RabbitMQ: no SQS queue to scale on, fixed replicas instead.
    let docs = overlay("aws-amazon-mq");
    let problems = check_operations(&docs, &AMAZON_MQ);
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

#[test]
fn broken_autoscaling_or_monitoring_is_caught() {
    let after = |cloud: &Cloud, edit: &dyn Fn(&mut Vec<Value>)| {
        let mut docs = overlay(cloud.name);
        edit(&mut docs);
        check_operations(&docs, cloud)
    };
    expect_problem(
        &after(&AWS, &|docs| {
            doc_mut(docs, "ScaledObject", "aggregate-worker")["spec"]["triggers"][0]["metadata"]
                ["queueURL"] = Value::String(
                "https://sqs.us-east-1.amazonaws.com/111122223333/millrace_0_intake__intake-worker-0"
                    .to_string(),
            );
        }),
        "ScaledObject aggregate-worker: queueURL",
    );
    expect_problem(
        &after(&AWS, &|docs| {
            doc_mut(docs, "ScaledObject", "mill")["spec"]["triggers"][0]["metadata"]["awsRegion"] =
                Value::String("eu-west-1".to_string());
        }),
        "awsRegion",
    );
    expect_problem(
        &after(&GCP, &|docs| {
            doc_mut(docs, "ScaledObject", "intake-worker")["spec"]["triggers"][0]["metadata"]
                ["subscriptionName"] = Value::String(
                "projects/example-project/subscriptions/millrace.1.intake~intake-worker-1"
                    .to_string(),
            );
        }),
        "ScaledObject intake-worker: subscriptionName",
    );
    expect_problem(
        &after(&GCP, &|docs| {
            doc_mut(docs, "ScaledObject", "mill")["spec"]["scaleTargetRef"]["name"] =
                Value::String("mil".to_string());
        }),
        "scales Deployment \"mil\", which is not a Deployment here",
    );
    expect_problem(
        &after(&AWS, &|docs| {
            doc_mut(docs, "Deployment", "intake-worker")["spec"]["replicas"] = Value::from(2u64);
        }),
        "Deployment intake-worker sets replicas",
    );
    expect_problem(
        &after(&AWS, &|docs| {
            let d = doc_mut(docs, "Deployment", "aggregate-worker");
            d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] =
                Value::String("prometheus".to_string());
        }),
        "PodMonitor scrapes port \"metrics\", which Deployment aggregate-worker's pods do not name",
    );
    expect_problem(
        &after(&AWS, &|docs| {
            docs.retain(|d| {
                !(str_of(&d["kind"]).as_deref() == Some("PodDisruptionBudget")
                    && name_of(d) == "mill")
            });
        }),
        "Deployment mill: 0 PodDisruptionBudgets",
    );
    expect_problem(
        &after(&AWS, &|docs| {
            let b = doc_mut(docs, "PodDisruptionBudget", "mill");
            b["spec"] = serde_norway::from_str(
                "{minAvailable: 1, selector: {matchLabels: {app.kubernetes.io/name: mill}}}",
            )
            .unwrap_or(Value::Null);
        }),
        "node drains would hang",
    );
    expect_problem(
        &check_operations(&overlay("aws"), &AMAZON_MQ),
        "ScaledObject intake-worker on a bus KEDA is not set up for here",
    );
}
