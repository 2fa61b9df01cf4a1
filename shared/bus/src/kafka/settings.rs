//! The Kafka bus's settings: what the URL, a properties file and the environment say, checked and
//! resolved into the librdkafka configuration each client gets.
//!
//! * **Sources, lowest precedence first:** a properties file (`properties=file:PATH` in the URL,
//!   or `MILLRACE_KAFKA_PROPERTIES=file:PATH`; `key=value` lines, `#` comments), the environment
//!   (`MILLRACE_KAFKA_SASL_MECHANISM` is `sasl.mechanism`: the prefix goes, the rest is lowercased
//!   and `_` becomes `.`), and the URL's query. The URL names one bus, the environment a whole
//!   process, the file a deployment's defaults: the most specific wins.
//! * **Millrace's own settings** have no dot (`partitions`, `properties`); anything with a dot is a
//!   librdkafka property and passes through, except the few Millrace sets itself because the
//!   backend's semantics depend on them ([`RESERVED_PROPERTIES`]). Millrace's other defaults
//!   (`client.id`, `session.timeout.ms`, `linger.ms`, …) can be overridden.
//! * **Secrets.** A value written `file:PATH` or `env:VAR` is replaced by what it names (a file's
//!   trailing newline dropped). A property whose name holds a secret
//!   ([`millrace_secrets::is_secret_name`]: `sasl.password`, `ssl.key.password`, `ssl.key.pem`, …)
//!   must be such a reference in the URL and the environment; a properties file is a secret file
//!   itself, so it may hold the literal. `*.location` properties are paths to files librdkafka
//!   reads, not secrets. No error names a secret's value; [`KafkaSettings`]'s `Debug` shows none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use millrace_secrets::{is_reference, is_secret_name, redact, resolve, resolve_setting};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use zeroize::Zeroizing;

use crate::BusError;

/// Prefix of the environment variables that set librdkafka properties.
pub const ENV_PREFIX: &str = "MILLRACE_KAFKA_";

/// librdkafka properties Millrace sets itself and refuses from configuration: the backend's
/// at-least-once delivery, its client-side commits and its explicit topic creation depend on them.
pub const RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "allow.auto.create.topics",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "transactional.id",
];

/// SASL mechanisms this build of librdkafka has (rdkafka's `ssl` feature; no gssapi, no curl).
const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// Partitions of the topics this bus creates, unless configured.
const DEFAULT_PARTITIONS: i32 = 4;

/// Which client a configuration is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRole {
    Producer,
    Admin,
    /// A subscription's consumer: its Kafka group and the subscription's prefetch.
    Consumer {
        group_id: String,
        prefetch: usize,
    },
}

/// Where a setting came from (for error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Url,
    Env(String),
    File(PathBuf),
}

impl Source {
    fn describe(&self, name: &str) -> String {
        match self {
            Source::Url => format!("{name} (bus URL)"),
            Source::Env(var) => format!("{name} (environment variable {var})"),
            Source::File(path) => format!("{name} (properties file {})", path.display()),
        }
    }
}

struct Property {
    value: Zeroizing<String>,
    source: Source,
    secret: bool,
}

/// The Kafka bus's resolved settings. Holds resolved secrets: its `Debug` hides them, and
/// [`KafkaSettings::client_properties`] must never be logged.
pub struct KafkaSettings {
    redacted_url: String,
    bootstrap: String,
    partitions: i32,
    properties: BTreeMap<String, Property>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, p)| {
                let v = if p.secret {
                    millrace_secrets::REDACTED
                } else {
                    p.value.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("url", &self.redacted_url)
            .field("partitions", &self.partitions)
            .field("properties", &properties)
            .finish()
    }
}

/// Does the value of property `name` hold a secret? Paths (`*.location`) do not: librdkafka reads
/// the file. `sasl.oauthbearer.config` can carry one (an unsecured JWT's extensions).
fn is_secret_property(name: &str) -> bool {
    (is_secret_name(name) && !name.ends_with(".location")) || name == "sasl.oauthbearer.config"
}

impl KafkaSettings {
    /// Settings from `url` and the process environment.
    pub fn from_url(url: &str) -> Result<KafkaSettings, BusError> {
        KafkaSettings::parse(url, std::env::vars())
    }

    /// Settings from `url` and the environment variables `env` (only those starting with
    /// [`ENV_PREFIX`] are read). `file:` and `env:` references are resolved from the file system
    /// and the process environment.
    pub fn parse(
        url: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<KafkaSettings, BusError> {
        let redacted_url = redact(url);
        let url_in_errors = redacted_url.clone();
        let invalid = |reason: String| BusError::InvalidUrl {
            url: url_in_errors.clone(),
            reason,
        };
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| invalid("expected kafka://HOST:PORT".to_string()))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bootstrap = location.trim_end_matches('/').to_string();
        if bootstrap.contains('@') {
            return Err(invalid(
                "credentials do not go in a Kafka URL: set security.protocol, sasl.mechanism, \
                 sasl.username and sasl.password=file:PATH or env:VAR"
                    .to_string(),
            ));
        }
        if bootstrap.is_empty() || bootstrap.contains('/') {
            return Err(invalid(
                "expected kafka://HOST:PORT[,HOST:PORT...]".to_string(),
            ));
        }

        // Raw settings per source: (name, value, source). Later sources override earlier ones.
        let mut url_settings = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            url_settings.push((
                key.into_owned(),
                Zeroizing::new(value.into_owned()),
                Source::Url,
            ));
        }
        let mut env_settings = Vec::new();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (var, value) in env {
            let name = var[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .replace('_', ".");
            env_settings.push((name, Zeroizing::new(value), Source::Env(var)));
        }

        // The properties file: named by the URL, else by the environment.
        let file_ref = url_settings
            .iter()
            .chain(env_settings.iter())
            .find(|(name, _, _)| name == "properties")
            .map(|(name, value, source)| (source.describe(name), value.to_string()));
        let mut file_settings = Vec::new();
        if let Some((what, reference)) = file_ref {
            let path = reference.strip_prefix("file:").ok_or_else(|| {
                invalid(format!(
                    "{what} must be `file:PATH` (a properties file), not {reference:?}"
                ))
            })?;
            file_settings = read_properties_file(Path::new(path)).map_err(invalid)?;
        }

        let mut partitions = DEFAULT_PARTITIONS;
        let mut properties: BTreeMap<String, Property> = BTreeMap::new();
        for (name, value, source) in file_settings
            .into_iter()
            .chain(env_settings)
            .chain(url_settings)
        {
            let what = source.describe(&name);
            if name == "properties" {
                if matches!(source, Source::File(_)) {
                    return Err(invalid(format!(
                        "{what}: a properties file cannot name another"
                    )));
                }
                continue;
            }
            if name == "partitions" {
                partitions = value
                    .trim()
                    .parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| invalid(format!("{what} must be a positive number")))?;
                continue;
            }
            if RESERVED_PROPERTIES.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "{what}: Millrace sets {name} itself and it cannot be overridden"
                )));
            }
            if !name.contains('.') {
                return Err(invalid(format!(
                    "unknown parameter {what}: Millrace's own are `partitions` and \
                     `properties`; librdkafka properties have a dot (security.protocol, …)"
                )));
            }
            let secret = is_secret_property(&name);
            if name.ends_with(".location") && value.starts_with("file:") {
                return Err(invalid(format!(
                    "{what} is a path librdkafka reads itself: give the path, without `file:`"
                )));
            }
            let resolved = if secret && !matches!(source, Source::File(_)) {
                resolve_setting(&what, &value).map_err(|e| invalid(e.to_string()))?
            } else if is_reference(&value) {
                resolve(&value).map_err(|e| invalid(format!("{what}: {e}")))?
            } else {
                value
            };
            let resolved = trim_newline(resolved);
            properties.insert(
                name,
                Property {
                    value: resolved,
                    source,
                    secret,
                },
            );
        }

        let settings = KafkaSettings {
            redacted_url,
            bootstrap,
            partitions,
            properties,
        };
        settings.check().map_err(invalid)?;
        // librdkafka's own checks of every property name and value (no broker needed).
        for role in [ClientRole::Producer, ClientRole::Admin] {
            settings
                .client_config(&role)
                .create_native_config()
                .map_err(|e| invalid(settings.librdkafka_error(&e)))?;
        }
        Ok(settings)
    }

    /// The brokers, `HOST:PORT[,HOST:PORT...]`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Partitions of the topics this bus creates.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The bus URL with its secrets redacted.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// The resolved value of a configured librdkafka property (secrets resolved).
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(|p| p.value.as_str())
    }

    /// The complete librdkafka configuration the client `role` is created with: Millrace's
    /// settings, then the configured properties. Holds resolved secrets: never log it.
    pub fn client_properties(&self, role: &ClientRole) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            map.insert(k.to_string(), v);
        };
        // Defaults that configuration may override.
        match role {
            ClientRole::Producer => {
                set("client.id", "millrace-bus".into());
                set("linger.ms", "0".into());
                set("message.timeout.ms", "10000".into());
            }
            ClientRole::Admin => set("client.id", "millrace-bus-admin".into()),
            ClientRole::Consumer { prefetch, .. } => {
                set("client.id", "millrace-bus".into());
                set("session.timeout.ms", "3000".into());
                set("heartbeat.interval.ms", "300".into());
                set("fetch.wait.max.ms", "100".into());
                set("queued.min.messages", (prefetch * 20).max(100).to_string());
                set("queued.max.messages.kbytes", "8192".into());
            }
        }
        // Configured properties: librdkafka warns about, and ignores, those of another client
        // type (a consumer setting on the producer), so every client gets all of them.
        for (name, property) in &self.properties {
            set(name, property.value.to_string());
        }
        // Reserved: Millrace's, always.
        set("bootstrap.servers", self.bootstrap.clone());
        match role {
            ClientRole::Producer => {
                set("acks", "all".into());
                set("enable.idempotence", "false".into());
            }
            ClientRole::Admin => {}
            ClientRole::Consumer { group_id, .. } => {
                set("group.id", group_id.clone());
                set("enable.auto.commit", "false".into());
                set("enable.auto.offset.store", "false".into());
                set("auto.offset.reset", "earliest".into());
                set("allow.auto.create.topics", "false".into());
            }
        }
        map
    }

    /// [`KafkaSettings::client_properties`] as an rdkafka `ClientConfig`.
    pub fn client_config(&self, role: &ClientRole) -> ClientConfig {
        self.client_properties(role).into_iter().collect()
    }

    /// A librdkafka error as text that names the property but no value, and no secret.
    pub fn librdkafka_error(&self, error: &KafkaError) -> String {
        match error {
            KafkaError::ClientConfig(_, description, key, value) => {
                let description = if value.is_empty() {
                    description.clone()
                } else {
                    description.replace(value.as_str(), "…")
                };
                let what = self
                    .properties
                    .get(key)
                    .map_or_else(|| key.clone(), |p| p.source.describe(key));
                format!("librdkafka refuses {what}: {}", self.scrub(&description))
            }
            KafkaError::Nul(_) => "a Kafka setting contains a NUL character".to_string(),
            other => self.scrub(&other.to_string()),
        }
    }

    /// `text` with every secret property's value replaced.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for property in self.properties.values().filter(|p| p.secret) {
            if !property.value.is_empty() {
                text = text.replace(property.value.as_str(), millrace_secrets::REDACTED);
            }
        }
        text
    }

    fn get_with_source(&self, name: &str) -> Option<(&str, String)> {
        self.properties
            .get(name)
            .map(|p| (p.value.as_str(), p.source.describe(name)))
    }

    /// Combinations librdkafka would accept but that cannot work, and files it could not read,
    /// caught before a client starts: each error names the setting, never a secret.
    fn check(&self) -> Result<(), String> {
        let protocol = match self.get_with_source("security.protocol") {
            Some((value, what)) => {
                let p = value.to_ascii_lowercase();
                if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&p.as_str()) {
                    return Err(format!(
                        "{what} must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, not {value:?}"
                    ));
                }
                p
            }
            None => "plaintext".to_string(),
        };
        let sasl = protocol.starts_with("sasl_");
        let mechanism = match (
            self.get_with_source("sasl.mechanism"),
            self.get_with_source("sasl.mechanisms"),
        ) {
            (Some(_), Some(_)) => {
                return Err(
                    "sasl.mechanism and sasl.mechanisms are the same property: set one".into(),
                )
            }
            (Some(m), None) | (None, Some(m)) => Some(m),
            (None, None) => None,
        };
        match (sasl, mechanism) {
            (true, None) => {
                return Err(format!(
                    "security.protocol={} needs sasl.mechanism ({})",
                    protocol.to_ascii_uppercase(),
                    MECHANISMS.join(", ")
                ))
            }
            (false, Some((_, what))) => {
                return Err(format!(
                    "{what} is set but security.protocol is {}: the credentials would not be \
                     used (SASL_SSL, or SASL_PLAINTEXT without TLS)",
                    protocol.to_ascii_uppercase()
                ))
            }
            (true, Some((value, what))) => {
                let m = value.to_ascii_uppercase();
                if !MECHANISMS.contains(&m.as_str()) {
                    return Err(format!(
                        "{what}: {value:?} is not supported by this build (supported: {}; \
                         GSSAPI/Kerberos and AWS_MSK_IAM are not)",
                        MECHANISMS.join(", ")
                    ));
                }
                if m == "OAUTHBEARER" {
                    if let Some((method, what)) = self.get_with_source("sasl.oauthbearer.method") {
                        if method.eq_ignore_ascii_case("oidc") {
                            return Err(format!(
                                "{what}=oidc needs librdkafka built with curl, which this build \
                                 is not"
                            ));
                        }
                    }
                } else {
                    for needed in ["sasl.username", "sasl.password"] {
                        if !self.properties.contains_key(needed) {
                            return Err(format!("sasl.mechanism={m} needs {needed}"));
                        }
                    }
                }
            }
            (false, None) => {}
        }
        for (name, property) in &self.properties {
            if !name.ends_with(".location") {
                continue;
            }
            let path = property.value.as_str();
            if name == "ssl.ca.location" && path == "probe" {
                continue;
            }
            if let Err(e) = std::fs::metadata(path).and_then(|m| {
                if m.is_dir() {
                    Ok(())
                } else {
                    std::fs::File::open(path).map(|_| ())
                }
            }) {
                return Err(format!(
                    "{}: cannot read {path}: {e}",
                    property.source.describe(name)
                ));
            }
        }
        Ok(())
    }
}

/// Drops one trailing newline (`\n` or `\r\n`), as files written by editors and Secrets carry.
fn trim_newline(mut value: Zeroizing<String>) -> Zeroizing<String> {
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    value
}

/// Reads a properties file: `key=value` lines, `#` comments, blank lines. Errors name the file
/// and the line number, never a line's content (it may hold a secret).
#[allow(clippy::type_complexity)]
fn read_properties_file(path: &Path) -> Result<Vec<(String, Zeroizing<String>, Source)>, String> {
    let text = std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| format!("properties file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "properties file {} line {}: expected property=value",
                path.display(),
                index + 1
            ));
        };
        out.push((
            key.trim().to_string(),
            Zeroizing::new(value.trim().to_string()),
            Source::File(path.to_path_buf()),
        ));
    }
    Ok(out)
}
