//! The NATS JetStream backend (`nats://host:port`), through `async-nats`.
//!
//! # Connecting: TLS and authentication
//!
//! The bus URL is `nats://HOST[:PORT][?PARAMETERS]` (port 4222 by default), or `tls://…`, which is
//! `nats://…?tls=required`. Parameters, all optional ([`NatsSettings::from_url`] reads them):
//!
//! | parameter | value | meaning |
//! |---|---|---|
//! | `tls` | `required` or `first` | refuse a connection that is not TLS; `first` starts TLS before the server's greeting (the server needs `handshake_first`, nats-server 2.10+) |
//! | `cacert` | path to a PEM file | trust only these CAs for the server's certificate (instead of the system's) |
//! | `cert`, `key` | paths to PEM files | the client certificate and its private key (mutual TLS), always together |
//! | `creds` | path, `file:PATH` or `env:VAR` | a `.creds` file (user JWT and nkey seed), as `nsc` and Synadia Cloud issue them |
//! | `nkey` | `file:PATH` or `env:VAR` | a user nkey seed (`SU…`) |
//! | `token` | `file:PATH` or `env:VAR` | a token |
//! | `user`, `password` | a name; `file:PATH` or `env:VAR` | user and password, always together |
//!
//! Any of `cacert`, `cert` or `key` also makes TLS required: a client told whom to trust never
//! falls back to plain text. At most one of `creds`, `nkey`, `token` and `user`/`password` may be
//! given. Every secret is a reference (see `millrace_secrets`): a literal token, password or seed is
//! refused ([`SecretError::NotAReference`]), and so is a user-info part (`nats://u:p@host`). Key
//! and creds files are named by path, since the file itself is where the secret lives. An unknown
//! or repeated parameter is an error that names it. Secrets are read once, at start-up; a rotated
//! secret takes effect when the process restarts. A connection the server refuses (a wrong
//! credential, an untrusted certificate) is a start-up error that names the server and the
//! reference, never the secret, and the URL reaches errors and logs only through
//! `millrace_secrets::redact`.
//!
//! Synadia Cloud (NGS): download the user's `.creds` file, mount it (a Kubernetes Secret) and use
//! `nats://connect.ngs.global?tls=required&creds=/etc/nats/ngs.creds` (the system's CAs verify
//! the server).
//!
//! How the [`Bus`] port maps onto JetStream:
//!
//! * **One stream per topic.** The stream's only subject is the topic itself; its name is derived
//!   from the topic by [`stream_name`] (stream names cannot contain `.`). File storage, `Limits`
//!   retention: a stream keeps every message whether or not a consumer exists yet (so nothing
//!   published before the first subscriber is lost) and every consumer group reads all of it.
//!   `Interest` retention would drop messages published while no group exists, and `WorkQueue`
//!   allows only one group. Acked messages therefore stay on disk until [`MAX_AGE`] passes.
//!   Streams are created on demand by `publish`, `subscribe` and `create_topic`.
//! * **Publish** is a JetStream publish that waits for the stream's ack. Every message carries a
//!   fresh `Nats-Msg-Id`, kept across our own retries, so a retry whose first attempt did land is
//!   deduplicated by the stream (within its two-minute duplicate window). Transient failures
//!   (server restarting, no responders while JetStream recovers, timeouts) are retried for up to
//!   [`PUBLISH_RETRY_FOR`]. The returned id is the stream sequence, the same id a delivery carries.
//! * **Attributes** travel as NATS headers. Keys that are not valid header names, keys that would
//!   collide with NATS's own `Nats-*` headers, and values that headers cannot carry verbatim
//!   (CR/LF, or leading/trailing whitespace, which the client trims) are hex-encoded under a
//!   `Millrace-X-` header and decoded on receipt; `Nats-*` headers are stripped on receipt.
//! * **A consumer group is one durable pull consumer** on the stream (name from [`consumer_name`]),
//!   shared by every competing subscription in every process: `AckPolicy::Explicit`,
//!   `DeliverPolicy::All`, `AckWait` = the subscription's lease, `MaxDeliver` unlimited (-1).
//!   JetStream itself never dead-letters (at `MaxDeliver` it would only emit an advisory and stop
//!   delivering); the worker loop counts attempts and moves a message to `{topic}.dead` itself.
//!   `max_ack_pending` (group-wide) is at least [`MIN_MAX_ACK_PENDING`] and at least the prefetch;
//!   messages waiting out a `nack(delay)` count against it on the server, though they hold no slot
//!   of ours. `subscribe` creates or updates the consumer, so the group's `AckWait` is the lease of
//!   the most recent subscription: subscriptions of one group should use one lease.
//! * **Pulling.** Each subscription has one background task that issues pull requests (one at a
//!   time, for at most `prefetch` minus what is buffered) only when there is demand: a caller
//!   waiting in `next`, or a buffer that has run below half the prefetch. A subscription nobody
//!   reads therefore does not hoard messages that another consumer of the group could take. The
//!   task owns the pull, so cancelling `next` never drops a message on the floor: if the caller of
//!   `next` goes away (a timeout, a `select!`), a pull made for it is withdrawn (its inbox is
//!   unsubscribed, and the server skips waiting pulls without interest) and anything it already
//!   delivered is `-NAK`ed back. A message the server sends in the instant before it sees the
//!   unsubscribe is the one thing that waits for `AckWait` to come back. On every reconnect a new
//!   pull is issued at once (a restarted server forgets pending pulls) while the old one keeps
//!   draining aside; failed pulls are retried with backoff, re-creating the stream and consumer if
//!   needed. Nothing waits forever: every pull expires on the server after five seconds
//!   (`PULL_EXPIRES`) and is given up client-side two seconds later.
//! * **Leases.** JetStream's lease is `AckWait`, counted from when the server sent the message. We
//!   track each delivery's deadline client-side (arrival + `AckWait`, minus a safety margin of a
//!   tenth of `AckWait`, at most a second) because JetStream would accept an ack from a stale
//!   delivery and so silently settle a message another consumer now holds: after the deadline,
//!   `ack`, `nack` and `extend` return [`BusError::LeaseLost`], and a buffered message whose
//!   deadline passed before `next` handed it out is skipped (the server redelivers it).
//!   `extend` sends `+WPI` (`AckKind::Progress`), which restarts the server's timer at `AckWait`
//!   from now; JetStream cannot extend by any other amount, so `extend(lease)` with `lease` longer
//!   than `AckWait` starts a small task that repeats `+WPI` every half `AckWait` until `lease` has
//!   passed or the delivery is settled.
//! * **Settling.** `ack` is `+ACK` and `nack(delay)` is `-NAK` with a delay (`NakWithDelay`), both
//!   sent as a request so they return only once the server has processed them. The attempt is the
//!   `delivered` count from the message's reply subject (`info().delivered`). A delivery dropped
//!   unsettled is `-NAK`ed at once, so another consumer gets it now rather than after `AckWait`.
//! * **Close** stops pulling, `-NAK`s what was buffered and not handed out, and `-NAK`s whatever a
//!   pull still in flight delivers later. Deliveries already handed out stay settleable.

use std::collections::{HashSet, VecDeque};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{Acker, PublishMessage};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use millrace_secrets::{is_reference, redact, resolve, resolve_setting, SecretError};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::encoding::{fnv1a, hex, unhex};
use crate::lock;
use crate::Limits;
use crate::{
    Attributes, Bus, BusError, Capabilities, Delivery, Message, Settle, SubscribeOptions,
    Subscription,
};

const BACKEND: &str = "nats";
/// How long `publish` keeps retrying transient failures (a server restart, JetStream recovering).
pub const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long acked messages are kept (Limits retention keeps them until then).
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The group-wide `max_ack_pending` floor (JetStream's own default for pull consumers).
pub const MIN_MAX_ACK_PENDING: usize = 1000;
/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Lease used for a group created by `create_topic` before anyone subscribed.
const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Header prefix for attributes that cannot travel verbatim (hex-encoded key and value).
const ENCODED_PREFIX: &str = "Millrace-X-";

fn backend(message: impl Display) -> BusError {
    BusError::Backend {
        backend: BACKEND,
        message: message.to_string(),
    }
}

/// The JetStream stream that holds `topic`: the topic with `.` (and anything else a stream name
/// cannot hold) replaced by `_`. Topics made only of ASCII letters, digits, `-` and `.` map
/// one-to-one; any other topic gets a hash suffix so that, say, `a.b` and `a_b` stay apart.
pub fn stream_name(topic: &str) -> String {
    js_name(topic)
}

/// The durable consumer name of `group`, derived like [`stream_name`].
pub fn consumer_name(group: &str) -> String {
    js_name(group)
}

fn js_name(name: &str) -> String {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !plain {
        out.push_str(&format!("_h{:016x}", fnv1a(&[name.as_bytes()])));
    }
    out
}

fn check_topic(topic: &str) -> Result<(), BusError> {
    let valid = !topic.is_empty()
        && topic.split('.').all(|token| !token.is_empty())
        && !topic
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>');
    if valid {
        Ok(())
    } else {
        Err(backend(format!(
            "topic {topic:?} is not a valid NATS subject (no spaces, `*`, `>` or empty tokens)"
        )))
    }
}

fn check_group(group: &str) -> Result<(), BusError> {
    if group.is_empty() {
        Err(backend("the consumer group name is empty"))
    } else {
        Ok(())
    }
}

fn carries_verbatim(key: &str, value: &str) -> bool {
    let key_ok = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_graphic() && c != ':')
        && !key.to_ascii_lowercase().starts_with("nats-")
        && !key
            .to_ascii_lowercase()
            .starts_with(&ENCODED_PREFIX.to_ascii_lowercase());
    let value_ok = !value.contains(['\r', '\n']) && value.trim() == value;
    key_ok && value_ok
}

fn attributes_to_headers(attributes: &Attributes) -> Result<HeaderMap, BusError> {
    let mut headers = HeaderMap::new();
    for (key, value) in attributes {
        let (name, value) = if carries_verbatim(key, value) {
            (key.clone(), value.clone())
        } else {
            (
                format!("{ENCODED_PREFIX}{}", hex(key.as_bytes())),
                hex(value.as_bytes()),
            )
        };
        let name = async_nats::HeaderName::try_from(name)
            .map_err(|_| backend(format!("attribute {key:?} cannot be sent as a header")))?;
        let value: async_nats::HeaderValue = value.parse().map_err(|_| {
            backend(format!(
                "attribute {key:?} has a value headers cannot carry"
            ))
        })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

fn headers_to_attributes(headers: Option<&HeaderMap>) -> Attributes {
    let mut attributes = Attributes::new();
    let Some(headers) = headers else {
        return attributes;
    };
    for (name, values) in headers.iter() {
        let name = name.to_string();
        let Some(value) = values.last().map(|v| v.as_str().to_string()) else {
            continue;
        };
        if name.to_ascii_lowercase().starts_with("nats-") {
            continue;
        }
        if let Some(encoded) = name.strip_prefix(ENCODED_PREFIX) {
            match (unhex(encoded), unhex(&value)) {
                (Some(key), Some(value)) => {
                    attributes.insert(key, value);
                }
                _ => {
                    attributes.insert(name, value);
                }
            }
        } else {
            attributes.insert(name, value);
        }
    }
    attributes
}

fn stream_config(topic: &str) -> StreamConfig {
    StreamConfig {
        name: stream_name(topic),
        subjects: vec![topic.to_string()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: MAX_AGE,
        num_replicas: 1,
        description: Some(format!("millrace topic {topic}")),
        ..Default::default()
    }
}

fn consumer_config(topic: &str, group: &str, lease: Duration, prefetch: usize) -> PullConfig {
    PullConfig {
        durable_name: Some(consumer_name(group)),
        description: Some(format!("millrace group {group} on {topic}")),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: lease,
        max_deliver: -1,
        max_ack_pending: i64::try_from(prefetch.max(MIN_MAX_ACK_PENDING)).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    topic: &str,
) -> Result<jetstream::stream::Stream, BusError> {
    js.get_or_create_stream(stream_config(topic))
        .await
        .map_err(|e| backend(format!("stream for topic {topic:?}: {e}")))
}

/// Creates the group's durable consumer, or updates its lease and `max_ack_pending`.
async fn ensure_consumer(
    js: &jetstream::Context,
    topic: &str,
    group: &str,
    lease: Duration,
    prefetch: usize,
) -> Result<PullConsumer, BusError> {
    let stream = ensure_stream(js, topic).await?;
    stream
        .create_consumer(consumer_config(topic, group, lease, prefetch))
        .await
        .map_err(|e| {
            backend(format!(
                "consumer for group {group:?} on topic {topic:?}: {e}"
            ))
        })
}

// ---------------------------------------------------------------------------------------------
// Connection settings: TLS and authentication from the bus URL

/// When the connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// As the server asks (its `INFO` says whether TLS is required).
    Auto,
    /// Always; a server that does not offer TLS is a connection error.
    Required,
    /// Always, and before the server's `INFO` (the server needs `handshake_first`).
    First,
}

/// How the client proves who it is. Secrets are held as references, read only when connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials.
    None,
    /// A `.creds` file: a path, `file:PATH` or `env:VAR`.
    Creds(String),
    /// A user nkey seed: `file:PATH` or `env:VAR`.
    Nkey(String),
    /// A token: `file:PATH` or `env:VAR`.
    Token(String),
    /// A user and the reference of its password.
    UserPassword { user: String, password: String },
}

impl NatsAuth {
    /// Names the method and where its secret comes from, never the secret.
    fn describe(&self) -> String {
        match self {
            NatsAuth::None => "an anonymous connection (no credentials in the bus URL)".to_string(),
            NatsAuth::Creds(creds) => format!("the creds file {creds}"),
            NatsAuth::Nkey(nkey) => format!("the nkey seed from {nkey}"),
            NatsAuth::Token(token) => format!("the token from {token}"),
            NatsAuth::UserPassword { user, password } => {
                format!("user {user:?} with the password from {password}")
            }
        }
    }
}

/// A bus URL that cannot be used: something wrong with it, or a secret that is not a reference or
/// cannot be read. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum NatsUrlError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Everything the bus URL says about reaching the server (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// The server as the client is given it: `nats://HOST:PORT` or `tls://HOST:PORT`.
    pub server: String,
    pub tls: TlsMode,
    /// CA certificates (PEM) that replace the system's for verifying the server.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub auth: NatsAuth,
}

const PARAMETERS: &str = "tls, cacert, cert, key, creds, nkey, token, user, password";

impl NatsSettings {
    /// Reads and checks the bus URL without touching any file or variable: an unknown or repeated
    /// parameter, a literal secret ([`SecretError::NotAReference`]) or a half-given pair (a
    /// certificate without its key, a user without a password) is an error.
    pub fn from_url(url: &str) -> Result<NatsSettings, NatsUrlError> {
        let invalid = |reason: String| NatsUrlError::Invalid(reason);
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let scheme = parsed.scheme();
        if scheme != "nats" && scheme != "tls" {
            return Err(invalid(
                "expected nats://HOST:PORT or tls://HOST:PORT".to_string(),
            ));
        }
        let host = match parsed.host_str() {
            Some(host) if !host.is_empty() => host,
            _ => return Err(invalid("the URL names no server host".to_string())),
        };
        if parsed.password().is_some() {
            return Err(SecretError::NotAReference {
                what: "a password in the URL's user-info (use ?user=NAME&password=env:VAR)"
                    .to_string(),
            }
            .into());
        }
        if !parsed.username().is_empty() {
            return Err(SecretError::NotAReference {
                what: "a user or token in the URL's user-info (use ?user=NAME&password=env:VAR \
                       or ?token=env:VAR)"
                    .to_string(),
            }
            .into());
        }
        if !matches!(parsed.path(), "" | "/") || parsed.fragment().is_some() {
            return Err(invalid(
                "a NATS bus URL has no path or fragment: nats://HOST:PORT?PARAMETERS".to_string(),
            ));
        }
        let server = format!("{scheme}://{host}:{}", parsed.port().unwrap_or(4222));

        let mut seen = HashSet::new();
        let (mut tls, mut ca_cert, mut cert, mut key) = (TlsMode::Auto, None, None, None);
        let (mut creds, mut nkey, mut token, mut user, mut password) =
            (None, None, None, None, None);
        for (name, value) in parsed.query_pairs() {
            let (name, value) = (name.into_owned(), value.into_owned());
            if !seen.insert(name.clone()) {
                return Err(invalid(format!("parameter {name:?} is given twice")));
            }
            if value.is_empty() {
                return Err(invalid(format!("parameter {name:?} has no value")));
            }
            let secret = |value: String| -> Result<String, NatsUrlError> {
                if is_reference(&value) {
                    Ok(value)
                } else {
                    Err(SecretError::NotAReference {
                        what: format!("the {name} parameter of the bus URL"),
                    }
                    .into())
                }
            };
            match name.as_str() {
                "tls" => {
                    tls = match value.as_str() {
                        "required" => TlsMode::Required,
                        "first" => TlsMode::First,
                        other => {
                            return Err(invalid(format!(
                                "tls={other:?}: expected tls=required or tls=first"
                            )))
                        }
                    }
                }
                "cacert" => ca_cert = Some(file_path(&name, &value)?),
                "cert" => cert = Some(file_path(&name, &value)?),
                "key" => key = Some(file_path(&name, &value)?),
                "creds" => creds = Some(value),
                "nkey" => nkey = Some(secret(value)?),
                "token" => token = Some(secret(value)?),
                "password" => password = Some(secret(value)?),
                "user" => user = Some(value),
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?}; a NATS bus URL takes {PARAMETERS}"
                    )))
                }
            }
        }

        let client_cert = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "cert and key go together: the client certificate and its private key"
                        .to_string(),
                ))
            }
        };
        if tls == TlsMode::Auto && (scheme == "tls" || ca_cert.is_some() || client_cert.is_some()) {
            tls = TlsMode::Required;
        }
        let user_password = match (user, password) {
            (Some(user), Some(password)) => Some(NatsAuth::UserPassword { user, password }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "user and password go together (password=env:VAR or password=file:PATH)"
                        .to_string(),
                ))
            }
        };
        let methods: Vec<NatsAuth> = [
            creds.map(NatsAuth::Creds),
            nkey.map(NatsAuth::Nkey),
            token.map(NatsAuth::Token),
            user_password,
        ]
        .into_iter()
        .flatten()
        .collect();
        let auth = match <[NatsAuth; 1]>::try_from(methods) {
            Ok([auth]) => auth,
            Err(methods) if methods.is_empty() => NatsAuth::None,
            Err(_) => {
                return Err(invalid(
                    "give one way to authenticate: creds, nkey, token or user/password".to_string(),
                ))
            }
        };
        Ok(NatsSettings {
            server,
            tls,
            ca_cert,
            client_cert,
            auth,
        })
    }

    /// Reads the secrets and files the settings name into the client's options.
    pub async fn connect_options(&self) -> Result<ConnectOptions, NatsUrlError> {
        // async-nats builds its TLS configuration with rustls's process-wide provider, which
        // rustls cannot pick by itself when both of its providers are compiled in (panicking at
        // the first TLS handshake, even one only the server asked for): choose the one the
        // other backends use.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut options = ConnectOptions::new();
        match self.tls {
            TlsMode::Auto => {}
            TlsMode::Required => options = options.require_tls(true),
            TlsMode::First => options = options.tls_first(),
        }
        if let Some(ca_cert) = &self.ca_cert {
            readable("cacert", ca_cert)?;
            options = options.add_root_certificates(ca_cert.clone());
        }
        if let Some((cert, key)) = &self.client_cert {
            readable("cert", cert)?;
            readable("key", key)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::Creds(creds) => {
                let contents = if is_reference(creds) {
                    resolve(creds)?
                } else {
                    resolve(&format!("file:{creds}"))?
                };
                options.credentials(&contents).map_err(|e| {
                    NatsUrlError::Invalid(format!(
                        "creds {creds}: not a NATS credentials file: {e}"
                    ))
                })?
            }
            NatsAuth::Nkey(nkey) => {
                let seed = resolve_setting("nkey", nkey)?;
                options.nkey(trim_newline(&seed).to_string())
            }
            NatsAuth::Token(token) => {
                let token = resolve_setting("token", token)?;
                options.token(trim_newline(&token).to_string())
            }
            NatsAuth::UserPassword { user, password } => {
                let password = resolve_setting("password", password)?;
                options.user_and_password(user.clone(), trim_newline(&password).to_string())
            }
        };
        Ok(options)
    }

    /// A failed first connection as a start-up error: names the server and, for a refusal, the
    /// credential's source — never the secret.
    fn connect_error(&self, error: &ConnectError) -> BusError {
        let what = match error.kind() {
            ConnectErrorKind::AuthorizationViolation => format!(
                "the server refused {} (authorization violation)",
                self.auth.describe()
            ),
            ConnectErrorKind::Authentication => format!(
                "could not sign the server's challenge with {} (is it a user seed, `SU…`?)",
                self.auth.describe()
            ),
            // rustls's verdict on the server's certificate arrives as an IO error.
            ConnectErrorKind::Tls | ConnectErrorKind::Io
                if error.to_string().contains("certificate") =>
            {
                match &self.ca_cert {
                    Some(ca) => format!(
                        "TLS: {error} (the server's certificate must be signed by a CA in {} \
                         and name the host)",
                        ca.display()
                    ),
                    None => format!(
                        "TLS: {error} (the server's certificate is checked against the system's \
                         CAs; cacert=PATH names others)"
                    ),
                }
            }
            // What rustls says when the other end does not speak TLS.
            ConnectErrorKind::Tls | ConnectErrorKind::Io
                if error.to_string().contains("corrupt message") =>
            {
                format!("TLS: {error} (does the server offer TLS on this port?)")
            }
            ConnectErrorKind::Tls => format!("TLS: {error}"),
            _ => error.to_string(),
        };
        backend(format!("connecting to NATS server {}: {what}", self.server))
    }
}

/// A certificate or key parameter: a path, or `file:PATH`. (The client reads the file itself.)
fn file_path(name: &str, value: &str) -> Result<PathBuf, NatsUrlError> {
    if value.starts_with("env:") {
        return Err(NatsUrlError::Invalid(format!(
            "{name} is the path of a PEM file (or file:PATH), not {value}"
        )));
    }
    Ok(PathBuf::from(value.strip_prefix("file:").unwrap_or(value)))
}

fn readable(name: &str, path: &Path) -> Result<(), NatsUrlError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| NatsUrlError::Invalid(format!("{name} {}: {e}", path.display())))
}

/// Secrets read from files usually end in a newline that is not part of them.
fn trim_newline(secret: &str) -> &str {
    secret.trim_end_matches(['\r', '\n'])
}

fn invalid_url(url: &str, error: NatsUrlError) -> BusError {
    BusError::InvalidUrl {
        url: redact(url),
        reason: error.to_string(),
    }
}

/// The NATS JetStream bus. See the module documentation for how it maps the port.
pub struct NatsBus {
    client: Client,
    js: jetstream::Context,
    /// Streams known to exist, so `publish` does not ask the server every time.
    streams: Mutex<HashSet<String>>,
    /// Bumped on every (re)connect; pullers re-issue their pull requests when it changes.
    connects: watch::Receiver<u64>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus").finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Connects to `url` (`nats://host:port`, with TLS and credentials as the module
    /// documentation describes). A refused first connection is an error; after it, the client
    /// reconnects by itself for as long as the process runs.
    pub async fn connect(url: &str) -> Result<NatsBus, BusError> {
        let settings = NatsSettings::from_url(url).map_err(|e| invalid_url(url, e))?;
        let options = settings
            .connect_options()
            .await
            .map_err(|e| invalid_url(url, e))?;
        let (tx, rx) = watch::channel(0u64);
        let tx = Arc::new(tx);
        // Host and port only: the URL's parameters stay out of the log.
        let server: Arc<str> = Arc::from(settings.server.as_str());
        let client = options
            .name("millrace")
            .max_reconnects(None)
            .event_callback(move |event| {
                let (tx, server) = (tx.clone(), server.clone());
                async move {
                    match event {
                        Event::Connected => {
                            info!(backend = BACKEND, server = %server, "connected");
                            tx.send_modify(|n| *n += 1);
                        }
                        Event::Disconnected => {
                            warn!(backend = BACKEND, server = %server, "disconnected")
                        }
                        other => debug!(backend = BACKEND, event = %other, "client event"),
                    }
                }
            })
            .connect(settings.server.as_str())
            .await
            .map_err(|e| settings.connect_error(&e))?;
        let js = jetstream::new(client.clone());
        Ok(NatsBus {
            client,
            js,
            streams: Mutex::new(HashSet::new()),
            connects: rx,
        })
    }

    async fn ensure_stream_cached(&self, topic: &str) -> Result<(), BusError> {
        let name = stream_name(topic);
        if lock(&self.streams).contains(&name) {
            return Ok(());
        }
        ensure_stream(&self.js, topic).await?;
        lock(&self.streams).insert(name);
        Ok(())
    }

    /// Deletes the stream of every topic under `prefix` (`{prefix}.…`), with its consumers.
    /// Returns how many streams were deleted. For tests and development clean-up.
    pub async fn delete_topics_under(&self, prefix: &str) -> Result<usize, BusError> {
        let under = format!("{prefix}.");
        let mut names = Vec::new();
        let mut streams = self.js.streams();
        while let Some(info) = streams.next().await {
            let info = info.map_err(backend)?;
            if info.config.subjects.iter().any(|s| s.starts_with(&under)) {
                names.push(info.config.name.clone());
            }
        }
        let mut deleted = 0;
        for name in names {
            self.js
                .delete_stream(&name)
                .await
                .map_err(|e| backend(format!("deleting stream {name}: {e}")))?;
            lock(&self.streams).remove(&name);
            deleted += 1;
        }
        Ok(deleted)
    }

    async fn publish_once(
        &self,
        topic: &str,
        publish: PublishMessage,
    ) -> Result<u64, (bool, String)> {
        if let Err(e) = self.ensure_stream_cached(topic).await {
            return Err((true, e.to_string()));
        }
        let classify = |kind: PublishErrorKind| {
            let retry = !matches!(
                kind,
                PublishErrorKind::MaxPayloadExceeded
                    | PublishErrorKind::WrongLastMessageId
                    | PublishErrorKind::WrongLastSequence
            );
            if kind == PublishErrorKind::StreamNotFound {
                lock(&self.streams).remove(&stream_name(topic));
            }
            retry
        };
        let ack = match self.js.send_publish(topic.to_string(), publish).await {
            Ok(ack) => ack,
            Err(e) => return Err((classify(e.kind()), e.to_string())),
        };
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => Err((classify(e.kind()), e.to_string())),
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_delay: true,
            lease_extension: true,
            native_attempt_count: true,
            durable: true,
            multi_process: true,
        }
    }

    /// The client's own view of its connection; it reconnects by itself (without limit).
    fn connection(&self) -> crate::Connection {
        use async_nats::connection::State;
        match self.client.connection_state() {
            State::Connected => crate::Connection::Up,
            State::Pending => crate::Connection::Lost("NATS: connecting".to_string()),
            State::Disconnected => {
                crate::Connection::Lost("NATS connection lost; reconnecting".to_string())
            }
        }
    }

    fn limits(&self) -> Limits {
        // The server's `max_payload` (1 MiB by default) covers headers and body together.
        let max_payload = self.client.server_info().max_payload;
        let max_payload = if max_payload == 0 {
            1024 * 1024
        } else {
            max_payload
        };
        Limits {
            // Room for this backend's own headers (attempt count, hex-encoded names).
            max_message_bytes: max_payload.saturating_sub(1024),
            max_attributes: 1000,
            max_attribute_value_bytes: 64 * 1024,
            // JetStream refuses more than 64 KiB of headers, framing included (error 10097).
            max_attributes_bytes: (max_payload / 4).min(60 * 1024),
        }
    }

    async fn create_topic(&self, topic: &str, group: Option<&str>) -> Result<(), BusError> {
        check_topic(topic)?;
        let stream = ensure_stream(&self.js, topic).await?;
        lock(&self.streams).insert(stream_name(topic));
        if let Some(group) = group {
            check_group(group)?;
            // Leave an existing group's lease alone; `subscribe` sets it.
            if stream
                .get_consumer::<PullConfig>(&consumer_name(group))
                .await
                .is_err()
            {
                stream
                    .create_consumer(consumer_config(topic, group, DEFAULT_LEASE, 1))
                    .await
                    .map_err(|e| {
                        backend(format!(
                            "consumer for group {group:?} on topic {topic:?}: {e}"
                        ))
                    })?;
            }
        }
        Ok(())
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<String, BusError> {
        check_topic(topic)?;
        let headers = attributes_to_headers(&message.attributes)?;
        let message_id = format!("{:032x}", rand::random::<u128>());
        let publish = PublishMessage::build()
            .payload(message.body)
            .headers(headers)
            .message_id(&message_id);
        let give_up = Instant::now() + PUBLISH_RETRY_FOR;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.publish_once(topic, publish.clone()).await {
                Ok(sequence) => return Ok(sequence.to_string()),
                Err((retry, error)) => {
                    if !retry || Instant::now() + backoff > give_up {
                        return Err(backend(format!(
                            "publish to {topic:?} (Nats-Msg-Id {message_id}): {error}"
                        )));
                    }
                    warn!(backend = BACKEND, topic, %error, retry_in = ?backoff, "publish failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        check_topic(topic)?;
        check_group(&options.group)?;
        let prefetch = options.prefetch.max(1);
        let consumer =
            ensure_consumer(&self.js, topic, &options.group, options.lease, prefetch).await?;
        lock(&self.streams).insert(stream_name(topic));
        let shared = Arc::new(SubShared {
            state: Mutex::new(SubState::default()),
            wake_consumer: Notify::new(),
            wake_puller: Notify::new(),
        });
        let puller = Puller {
            js: self.js.clone(),
            topic: topic.to_string(),
            group: options.group.clone(),
            lease: options.lease,
            prefetch,
            consumer,
            shared: shared.clone(),
            connects: self.connects.clone(),
        };
        tokio::spawn(puller.run());
        Ok(Box::new(NatsSubscription { shared, prefetch }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        // `publish` already waited for every PubAck; this pushes out acks, naks and progress.
        self.client.flush().await.map_err(backend)
    }
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

/// A message fetched from the server and not yet handed out.
struct Fetched {
    acker: Acker,
    stream_sequence: u64,
    delivered: u32,
    body: Bytes,
    attributes: Attributes,
    /// Client-side lease deadline (arrival + AckWait - margin).
    deadline: Instant,
    ack_wait: Duration,
}

impl Fetched {
    async fn nak_back(self) {
        if Instant::now() >= self.deadline {
            // Already (or about to be) redelivered by the server: leave it alone.
            return;
        }
        if let Err(e) = self.acker.ack_with(AckKind::Nak(None)).await {
            warn!(backend = BACKEND, sequence = self.stream_sequence, error = %e, "nak on close failed; the message returns after its lease");
        }
    }
}

#[derive(Default)]
struct SubState {
    buffer: VecDeque<Fetched>,
    /// Callers currently waiting in `next`.
    waiters: usize,
    /// The buffer ran low: pull ahead even though nobody waits yet.
    refill: bool,
    /// The pull in flight was issued for a caller of `next`, not to refill the buffer.
    pull_for_waiter: bool,
    /// A caller gave up waiting in `next` (its future was dropped) and nobody waits now.
    abandoned_wait: bool,
    closed: bool,
}

impl SubState {
    /// Nobody wants what the pull in flight would bring.
    fn demand_gone(&self) -> bool {
        self.closed || (self.pull_for_waiter && self.abandoned_wait && self.waiters == 0)
    }
}

struct SubShared {
    state: Mutex<SubState>,
    /// Something was buffered, or the subscription closed.
    wake_consumer: Notify,
    /// There is demand, or the subscription closed.
    wake_puller: Notify,
}

fn margin(ack_wait: Duration) -> Duration {
    (ack_wait / 10).min(Duration::from_secs(1))
}

/// Waits for a (re)connect; never returns once the client is gone.
async fn changed(connects: &mut watch::Receiver<u64>) {
    if connects.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

struct Puller {
    js: jetstream::Context,
    topic: String,
    group: String,
    lease: Duration,
    prefetch: usize,
    consumer: PullConsumer,
    shared: Arc<SubShared>,
    connects: watch::Receiver<u64>,
}

impl Puller {
    /// How many messages to pull now, or `None` once closed.
    async fn wait_for_demand(&mut self) -> Option<usize> {
        loop {
            let notified = self.shared.wake_puller.notified();
            {
                let mut state = lock(&self.shared.state);
                if state.closed {
                    return None;
                }
                let buffered = state.buffer.len();
                if buffered < self.prefetch && (state.waiters > 0 || state.refill) {
                    state.refill = false;
                    state.pull_for_waiter = state.waiters > 0;
                    state.abandoned_wait = false;
                    return Some(self.prefetch - buffered);
                }
            }
            notified.await;
        }
    }

    /// Sleeps for `backoff`, waking early on close or reconnect.
    async fn pause(&mut self, backoff: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = self.shared.wake_puller.notified() => {}
            _ = changed(&mut self.connects) => {}
        }
    }

    async fn run(mut self) {
        let ack_wait = self.lease;
        let mut backoff = Duration::from_millis(100);
        let mut failed = false;
        while let Some(want) = self.wait_for_demand().await {
            if failed {
                // The stream or consumer may be gone (a server that lost its state, a deleted
                // stream): make sure both exist before pulling again.
                match ensure_consumer(
                    &self.js,
                    &self.topic,
                    &self.group,
                    self.lease,
                    self.prefetch,
                )
                .await
                {
                    Ok(consumer) => self.consumer = consumer,
                    Err(e) => {
                        warn!(backend = BACKEND, topic = %self.topic, group = %self.group, error = %e, "re-creating the consumer failed");
                        self.pause(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            self.connects.mark_unchanged();
            let batch = self
                .consumer
                .batch()
                .max_messages(want)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    warn!(backend = BACKEND, topic = %self.topic, group = %self.group, error = %e, "pull request failed, retrying");
                    failed = true;
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            failed = false;
            let give_up = Instant::now() + PULL_EXPIRES + Duration::from_secs(2);
            let mut drain = Box::pin(drain(
                batch,
                self.shared.clone(),
                ack_wait,
                give_up,
                self.topic.clone(),
            ));
            let ended = tokio::select! {
                ended = drain.as_mut() => ended,
                _ = changed(&mut self.connects) => {
                    // A restarted server forgot this pull; a server that merely saw us reconnect
                    // may still answer it. Keep draining it aside and pull again at once.
                    debug!(backend = BACKEND, topic = %self.topic, "reconnected; re-issuing the pull request");
                    tokio::spawn(drain);
                    continue;
                }
            };
            match ended {
                Drained::Ended | Drained::Unwanted => {}
                Drained::GotMessages => backoff = Duration::from_millis(100),
                Drained::Failed(error) => {
                    warn!(backend = BACKEND, topic = %self.topic, group = %self.group, %error, "pull request ended with an error");
                    failed = true;
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        // Closed. Anything a pull still in flight delivers goes straight back.
        debug!(backend = BACKEND, topic = %self.topic, group = %self.group, "puller stopped");
    }
}

enum Drained {
    /// The pull ended (filled or expired) without delivering anything.
    Ended,
    /// The pull delivered at least one message and ended.
    GotMessages,
    /// The pull ended with an error status.
    Failed(String),
    /// Nobody wants its messages any more: the pull was withdrawn.
    Unwanted,
}

/// Moves what one pull request delivers into the subscription's buffer (or straight back, once
/// the subscription is closed), until the request is filled, expires or fails.
async fn drain(
    mut batch: async_nats::jetstream::consumer::pull::Batch,
    shared: Arc<SubShared>,
    ack_wait: Duration,
    give_up: Instant,
    topic: String,
) -> Drained {
    let mut got = false;
    loop {
        let item = tokio::select! {
            item = batch.next() => item,
            _ = tokio::time::sleep_until(give_up) => {
                debug!(backend = BACKEND, %topic, "pull request outlived its expiry; re-issuing");
                None
            }
            _ = shared.wake_puller.notified() => {
                if !lock(&shared.state).demand_gone() {
                    continue;
                }
                // Withdraw the pull: dropping the batch unsubscribes its inbox, and the server
                // skips a waiting pull whose inbox has no interest. What has already arrived
                // goes straight back. (A message the server sends in the instant before it
                // sees the unsubscribe returns only after its lease.)
                debug!(backend = BACKEND, %topic, "nobody waits any more; withdrawing the pull request");
                while let Some(Some(item)) = batch.next().now_or_never() {
                    if let Ok(message) = item {
                        if let Err(e) = message.ack_with(AckKind::Nak(None)).await {
                            warn!(backend = BACKEND, %topic, error = %e, "nak of an unwanted message failed; it returns after its lease");
                        }
                    }
                }
                return Drained::Unwanted;
            }
        };
        let message = match item {
            None if got => return Drained::GotMessages,
            None => return Drained::Ended,
            Some(Ok(message)) => message,
            Some(Err(e)) => return Drained::Failed(e.to_string()),
        };
        got = true;
        let arrived = Instant::now();
        let (stream_sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(e) => {
                warn!(backend = BACKEND, %topic, error = %e, "message without JetStream metadata; skipped");
                continue;
            }
        };
        let (message, acker) = message.split();
        let fetched = Fetched {
            acker,
            stream_sequence,
            delivered: u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
            body: message.payload,
            attributes: headers_to_attributes(message.headers.as_ref()),
            deadline: arrived + ack_wait - margin(ack_wait),
            ack_wait,
        };
        let closed = {
            let mut state = lock(&shared.state);
            if state.closed {
                Some(fetched)
            } else {
                state.buffer.push_back(fetched);
                None
            }
        };
        match closed {
            Some(fetched) => fetched.nak_back().await,
            None => shared.wake_consumer.notify_one(),
        }
    }
}

struct NatsSubscription {
    shared: Arc<SubShared>,
    prefetch: usize,
}

/// Counts a caller waiting in `next`. Dropped without `woke` set, the caller's future was
/// dropped while waiting (a timeout, a `select!`): a pull made for it may then be withdrawn.
struct Waiting<'a> {
    shared: &'a SubShared,
    woke: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.waiters = state.waiters.saturating_sub(1);
        if !self.woke && state.waiters == 0 {
            state.abandoned_wait = true;
            drop(state);
            self.shared.wake_puller.notify_one();
        }
    }
}

impl NatsSubscription {
    fn take_buffer(&self) -> Vec<Fetched> {
        let mut state = lock(&self.shared.state);
        state.closed = true;
        state.buffer.drain(..).collect()
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    /// Cancel safe: the buffer only changes in the synchronous step that returns the delivery.
    async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let notified = self.shared.wake_consumer.notified();
            let waiting = {
                let mut state = lock(&self.shared.state);
                if state.closed {
                    return Err(BusError::Closed);
                }
                let now = Instant::now();
                while let Some(fetched) = state.buffer.pop_front() {
                    if now >= fetched.deadline {
                        debug!(
                            backend = BACKEND,
                            sequence = fetched.stream_sequence,
                            "buffered message outlived its lease; skipped"
                        );
                        continue;
                    }
                    if state.buffer.len() < self.prefetch / 2 {
                        state.refill = true;
                        self.shared.wake_puller.notify_one();
                    }
                    return Ok(into_delivery(fetched));
                }
                state.waiters += 1;
                Waiting {
                    shared: &self.shared,
                    woke: false,
                }
            };
            let mut waiting = waiting;
            self.shared.wake_puller.notify_one();
            notified.await;
            waiting.woke = true;
        }
    }

    async fn close(&mut self) -> Result<(), BusError> {
        let buffered = self.take_buffer();
        self.shared.wake_puller.notify_one();
        self.shared.wake_consumer.notify_one();
        futures::future::join_all(buffered.into_iter().map(Fetched::nak_back)).await;
        Ok(())
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        let buffered = self.take_buffer();
        self.shared.wake_puller.notify_one();
        if buffered.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(futures::future::join_all(
                    buffered.into_iter().map(Fetched::nak_back),
                ));
            }
            Err(_) => warn!(
                backend = BACKEND,
                count = buffered.len(),
                "subscription dropped outside a runtime; buffered messages return after their lease"
            ),
        }
    }
}

fn into_delivery(fetched: Fetched) -> Delivery {
    let message_id = fetched.stream_sequence.to_string();
    let settle = NatsSettle {
        inner: Arc::new(SettleInner {
            acker: fetched.acker,
            message_id: message_id.clone(),
            ack_wait: fetched.ack_wait,
            state: Mutex::new(SettleState {
                deadline: fetched.deadline,
                settled: false,
                generation: 0,
            }),
        }),
    };
    Delivery::new(
        message_id,
        fetched.body,
        fetched.attributes,
        fetched.delivered,
        Arc::new(settle),
    )
}

// ---------------------------------------------------------------------------------------------
// Settling

struct SettleState {
    /// Client-side lease deadline; after it, the server may have handed the message to another.
    deadline: Instant,
    settled: bool,
    /// Bumped by every `extend`, so an older keeper task stops.
    generation: u64,
}

struct SettleInner {
    acker: Acker,
    message_id: String,
    /// The consumer's AckWait: what one `+WPI` buys.
    ack_wait: Duration,
    state: Mutex<SettleState>,
}

struct NatsSettle {
    inner: Arc<SettleInner>,
}

impl SettleInner {
    fn lease_lost(&self) -> BusError {
        BusError::LeaseLost {
            message_id: self.message_id.clone(),
        }
    }

    /// Marks the delivery settled if its lease is still ours.
    fn settle(&self) -> Result<(), BusError> {
        let mut state = lock(&self.state);
        if state.settled || Instant::now() >= state.deadline {
            return Err(self.lease_lost());
        }
        state.settled = true;
        Ok(())
    }

    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        self.acker
            .double_ack_with(kind)
            .await
            .map_err(|e| backend(format!("message {}: {e}", self.message_id)))
    }
}

#[async_trait]
impl Settle for NatsSettle {
    async fn ack(&self) -> Result<(), BusError> {
        self.inner.settle()?;
        // A plain ack (no round trip): the worker's slot is not held waiting for the server's
        // confirmation. If the ack is lost on the way, JetStream redelivers after AckWait and the
        // idempotent handler runs again: at-least-once, as every backend promises.
        self.inner
            .acker
            .ack_with(AckKind::Ack)
            .await
            .map_err(|e| backend(format!("message {}: {e}", self.inner.message_id)))
    }

    async fn nack(&self, delay: Duration) -> Result<(), BusError> {
        self.inner.settle()?;
        let delay = (!delay.is_zero()).then_some(delay);
        self.inner.send(AckKind::Nak(delay)).await
    }

    async fn extend(&self, lease: Duration) -> Result<(), BusError> {
        let generation = {
            let mut state = lock(&self.inner.state);
            if state.settled || Instant::now() >= state.deadline {
                return Err(self.inner.lease_lost());
            }
            state.generation += 1;
            state.generation
        };
        let sent = Instant::now();
        // The server restarts its AckWait timer from when it processes this.
        self.inner.send(AckKind::Progress).await?;
        let ack_wait = self.inner.ack_wait;
        {
            let mut state = lock(&self.inner.state);
            if state.settled || state.generation != generation {
                return Ok(());
            }
            state.deadline = sent + ack_wait - margin(ack_wait);
        }
        if lease > ack_wait {
            spawn_keeper(
                Arc::downgrade(&self.inner),
                generation,
                sent + lease,
                ack_wait,
            );
        }
        Ok(())
    }

    fn abandon(&self) {
        if self.inner.settle().is_err() {
            // Settled already, or the lease is gone and the message went back by itself.
            return;
        }
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = inner.acker.ack_with(AckKind::Nak(None)).await {
                        warn!(backend = BACKEND, message_id = %inner.message_id, error = %e, "nak of a dropped delivery failed; it returns after its lease");
                    }
                });
            }
            Err(_) => warn!(
                backend = BACKEND,
                message_id = %self.inner.message_id,
                "delivery dropped outside a runtime; it returns after its lease"
            ),
        }
    }
}

/// Repeats `+WPI` every half AckWait until `until`, a newer `extend`, or settlement.
fn spawn_keeper(inner: Weak<SettleInner>, generation: u64, until: Instant, ack_wait: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        loop {
            tokio::time::sleep(ack_wait / 2).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let now = Instant::now();
            {
                let state = lock(&inner.state);
                if state.settled
                    || state.generation != generation
                    || now >= until
                    || now >= state.deadline
                {
                    return;
                }
            }
            if let Err(e) = inner.acker.ack_with(AckKind::Progress).await {
                warn!(backend = BACKEND, message_id = %inner.message_id, error = %e, "lease extension failed");
                return;
            }
            let mut state = lock(&inner.state);
            if !state.settled && state.generation == generation {
                state.deadline = now + ack_wait - margin(ack_wait);
            }
        }
    });
}
