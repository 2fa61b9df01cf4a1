//! NATS over TLS with authentication, against nats-servers this test starts itself on free
//! loopback ports, with certificates, nkeys and JWTs it generates:
//!
//! * **operator** — operator mode (JWTs it signs itself, a memory resolver), mutual TLS, JetStream:
//!   a creds file plus a client certificate. The whole bus conformance suite runs here.
//! * **users** — TLS, a user with a password and a user nkey.
//! * **token** — TLS and a token.
//!
//! Each right credential connects and carries a message; each wrong one (token, password, nkey
//! seed, creds signed by an unknown account, a server certificate from a CA the client does not
//! trust, no client certificate where one is required) is a start-up error that names the server
//! and does not contain the secret. Plus the URL's parameters, checked without a server.
//!
//! Every server runs under a small shell that kills it when the test process's end closes its
//! standard input, so no server outlives the test, whatever happens in it; the per-test servers
//! are also stopped by a `Drop` guard.

use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use millrace_bus::conformance;
use millrace_bus::nats::{NatsAuth, NatsBus, NatsSettings, NatsUrlError, TlsMode};
use millrace_bus::{Bus, Message, SubscribeOptions};
use millrace_secrets::SecretError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::time::timeout;

const NATS_SERVER: &str = "/usr/sbin/nats-server";

// ---------------------------------------------------------------------------------------------
// Key material

/// A CA and what it signed, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `ca.pem`; `server.pem`/`server-key.pem` for 127.0.0.1 and localhost; `client.pem`/
    /// `client-key.pem`; and `other-ca.pem`, a CA that signed nothing here.
    fn generate(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "millrace test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = Issuer::new(ca_params.clone(), ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "nats test server",
        );
        let (client, client_key) = leaf(
            vec!["millrace-client".to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "millrace-client",
        );
        let other_key = KeyPair::generate().unwrap();
        let mut other_params = ca_params.clone();
        other_params.distinguished_name = rcgen::DistinguishedName::new();
        other_params
            .distinguished_name
            .push(DnType::CommonName, "some other CA");
        let other_ca = other_params.self_signed(&other_key).unwrap();

        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("server.pem", server),
            ("server-key.pem", server_key),
            ("client.pem", client),
            ("client-key.pem", client_key),
            ("other-ca.pem", other_ca.pem()),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }
}

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`, about `subject`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": format!("{:032X}", rand::random::<u128>()),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{signature}")
}

fn account_jwt(operator: &nkeys::KeyPair, account: &nkeys::KeyPair) -> String {
    jwt(
        operator,
        &account.public_key(),
        "millrace",
        serde_json::json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
            },
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        }),
    )
}

/// A `.creds` file's text: a user JWT issued by `account`, and the user's seed.
fn creds(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> String {
    let user_jwt = jwt(
        account,
        &user.public_key(),
        "millrace",
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A nats-server on a free loopback port, stopped when this is dropped or the test process ends.
struct Server {
    port: u16,
    /// The shell that runs the server and kills it once this closes (at drop or process exit).
    stdin: Option<ChildStdin>,
    shell: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `nats-server` with `config` (which it completes with `listen` and a JetStream store
    /// under `dir`), and waits until it accepts connections.
    fn start(dir: &Path, name: &str, config: &str) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let store = dir.join(format!("{name}-js"));
        let conf = dir.join(format!("{name}.conf"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {store:?} }}\n{config}\n"
            ),
        )
        .unwrap();
        let script = format!(
            "{NATS_SERVER} -c {conf:?} -l {log:?} & pid=$!; \
             read -r _; kill $pid; wait $pid"
        );
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {NATS_SERVER}: {e}"));
        let stdin = shell.stdin.take();
        let server = Server {
            port,
            stdin,
            shell,
            log,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let until = std::time::Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if std::time::Instant::now() > until {
                panic!(
                    "nats-server {name} did not listen on {addr} within 15s; its log:\n{}",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing stdin ends `read`; the shell kills the server and waits for it.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.shell.wait();
    }
}

/// Everything the tests connect with: the servers, the PKI and the secrets as files.
struct Fixture {
    dir: tempfile::TempDir,
    pki: Pki,
    operator: Server,
    users: Server,
    token: Server,
}

const PASSWORD: &str = "pw-Q7hV2c9xZk";
const TOKEN: &str = "tok-M3r8pLw5Yd";

impl Fixture {
    fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path());
        let tls = |verify: bool| {
            format!(
                "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: {verify}, \
                 timeout: 5 }}",
                pki.path("server.pem"),
                pki.path("server-key.pem"),
                pki.path("ca.pem"),
            )
        };

        // Operator mode: operator → account (JetStream enabled) → user, in a creds file.
        // JetStream needs a system account too.
        let operator_key = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let system = nkeys::KeyPair::new_account();
        let operator_jwt = jwt(
            &operator_key,
            &operator_key.public_key(),
            "millrace-test-operator",
            serde_json::json!({
                "system_account": system.public_key(),
                "type": "operator",
                "version": 2,
            }),
        );
        let system_jwt = jwt(
            &operator_key,
            &system.public_key(),
            "SYS",
            serde_json::json!({"type": "account", "version": 2}),
        );
        let operator_jwt_path = dir.path().join("operator.jwt");
        std::fs::write(&operator_jwt_path, &operator_jwt).unwrap();
        write_secret(
            dir.path(),
            "user.creds",
            &creds(&account, &nkeys::KeyPair::new_user()),
        );
        // Creds of a user whose account the operator never signed.
        write_secret(
            dir.path(),
            "stranger.creds",
            &creds(&nkeys::KeyPair::new_account(), &nkeys::KeyPair::new_user()),
        );
        let operator = Server::start(
            dir.path(),
            "operator",
            &format!(
                "operator: {operator_jwt_path:?}\nsystem_account: {}\nresolver: MEMORY\n\
                 resolver_preload: {{ {}: \"{}\", {}: \"{system_jwt}\" }}\n{}",
                system.public_key(),
                account.public_key(),
                account_jwt(&operator_key, &account),
                system.public_key(),
                tls(true)
            ),
        );

        // Users: a password and an nkey.
        let nkey_user = nkeys::KeyPair::new_user();
        write_secret(dir.path(), "password", &format!("{PASSWORD}\n"));
        write_secret(dir.path(), "seed", &nkey_user.seed().unwrap());
        write_secret(
            dir.path(),
            "wrong-seed",
            &nkeys::KeyPair::new_user().seed().unwrap(),
        );
        let users = Server::start(
            dir.path(),
            "users",
            &format!(
                "authorization {{ users: [ {{ user: millrace, password: \"{PASSWORD}\" }}, \
                 {{ nkey: {} }} ] }}\n{}",
                nkey_user.public_key(),
                tls(false)
            ),
        );

        write_secret(dir.path(), "token", &format!("{TOKEN}\n"));
        let token = Server::start(
            dir.path(),
            "token",
            &format!("authorization {{ token: \"{TOKEN}\" }}\n{}", tls(false)),
        );
        Fixture {
            dir,
            pki,
            operator,
            users,
            token,
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The URL of the operator-mode server: mutual TLS and the creds file.
    fn operator_url(&self) -> String {
        format!(
            "nats://{}?cacert={}&cert={}&key={}&creds={}",
            self.operator.host(),
            self.pki.path("ca.pem").display(),
            self.pki.path("client.pem").display(),
            self.pki.path("client-key.pem").display(),
            self.file("user.creds"),
        )
    }

    fn tls_url(&self, server: &Server, auth: &str) -> String {
        format!(
            "nats://{}?tls=required&cacert={}&{auth}",
            server.host(),
            self.pki.path("ca.pem").display()
        )
    }
}

fn write_secret(dir: &Path, name: &str, contents: &str) {
    std::fs::write(dir.join(name), contents).unwrap();
}

/// The servers every test shares, started by the first test that needs them. (Statics are never
/// dropped: the servers end with the test process, when their shells' stdin closes.)
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::start)
}

async fn connect(url: &str) -> Arc<NatsBus> {
    match NatsBus::connect(url).await {
        Ok(bus) => Arc::new(bus),
        Err(e) => panic!("connecting with {}: {e}", millrace_secrets::redact(url)),
    }
}

fn unique_prefix(test: &str) -> String {
    format!(
        "mrtls-{}-{:08x}-{test}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Runs `check` on a bus connected to `url` and a fresh prefix, deletes the prefix's streams,
/// then re-raises the check's panic, if any.
async fn with_bus<F, Fut>(url: &str, test: &str, check: F)
where
    F: FnOnce(Arc<NatsBus>, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let bus = connect(url).await;
    let prefix = unique_prefix(test);
    let outcome = tokio::spawn(check(bus.clone(), prefix.clone())).await;
    if let Err(e) = bus.delete_topics_under(&prefix).await {
        eprintln!("cleaning up streams under {prefix}: {e}");
    }
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{test}: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The conformance suite over mutual TLS with a creds file (operator mode)

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let url = fixture().operator_url();
            with_bus(&url, stringify!($name), |bus, prefix| async move {
                conformance::$name(&*bus, &prefix).await
            })
            .await;
        }
    };
}

mod conformance_over_mutual_tls_with_a_creds_file {
    use super::*;
    millrace_bus::for_each_conformance_case!(conformance_test);
}

// ---------------------------------------------------------------------------------------------
// Each way to authenticate, right and wrong

/// One message there and back, acked.
async fn roundtrip(bus: Arc<NatsBus>, prefix: String) {
    let topic = format!("{prefix}.roundtrip");
    bus.publish(&topic, Message::new("{}").with_attribute("k", "v"))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    let mut sub = bus
        .subscribe(&topic, SubscribeOptions::new("g"))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let delivery = match timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Ok(delivery)) => delivery,
        Ok(Err(e)) => panic!("next() failed: {e}"),
        Err(_) => panic!("nothing delivered within 10s"),
    };
    assert_eq!(delivery.attributes.get("k").map(String::as_str), Some("v"));
    delivery.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_nkey_token_and_creds_from_references_each_carry_a_message_over_tls() {
    let f = fixture();
    let password = format!("user=millrace&password=file:{}", f.file("password"));
    let nkey = format!("nkey=file:{}", f.file("seed"));
    let token = format!("token=file:{}", f.file("token"));
    let creds = format!(
        "cert={}&key={}&creds=file:{}",
        f.pki.path("client.pem").display(),
        f.pki.path("client-key.pem").display(),
        f.file("user.creds")
    );
    for (what, url) in [
        ("user/password", f.tls_url(&f.users, &password)),
        ("nkey", f.tls_url(&f.users, &nkey)),
        ("token", f.tls_url(&f.token, &token)),
        ("creds (file: reference)", f.tls_url(&f.operator, &creds)),
    ] {
        eprintln!("{what}");
        with_bus(&url, "auth", roundtrip).await;
    }
}

/// `NatsBus::connect(url)` fails, naming the server and containing none of `secrets`.
async fn refused(url: &str, server: &Server, secrets: &[&str], expect: &str) {
    let error = match NatsBus::connect(url).await {
        Ok(_) => panic!("connected with {}", millrace_secrets::redact(url)),
        Err(e) => e.to_string(),
    };
    eprintln!("refused as expected: {error}");
    assert!(
        error.contains(&server.host()),
        "the error does not name the server {}: {error}",
        server.host()
    );
    for secret in secrets {
        assert!(
            !error.contains(secret),
            "the error contains a secret: {error}"
        );
    }
    assert!(
        error.to_lowercase().contains(expect),
        "expected {expect:?} in: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_start_up_errors_naming_the_server_and_not_the_secret() {
    let f = fixture();
    let dir = f.dir.path();
    write_secret(dir, "wrong-password", "not-the-password-9d2F");
    write_secret(dir, "wrong-token", "not-the-token-7k1Q");
    let right_seed = std::fs::read_to_string(dir.join("seed")).unwrap();
    let wrong_seed = std::fs::read_to_string(dir.join("wrong-seed")).unwrap();
    let stranger = std::fs::read_to_string(dir.join("stranger.creds")).unwrap();
    let stranger_seed = stranger
        .lines()
        .find(|l| l.starts_with("SU"))
        .unwrap()
        .to_string();
    let secrets = [
        PASSWORD,
        TOKEN,
        "not-the-password-9d2F",
        "not-the-token-7k1Q",
        right_seed.trim(),
        wrong_seed.trim(),
        stranger_seed.as_str(),
    ];

    let url = f.tls_url(&f.token, &format!("token=file:{}", f.file("wrong-token")));
    refused(&url, &f.token, &secrets, "authorization violation").await;

    let url = f.tls_url(
        &f.users,
        &format!("user=millrace&password=file:{}", f.file("wrong-password")),
    );
    refused(&url, &f.users, &secrets, "authorization violation").await;

    let url = f.tls_url(&f.users, &format!("nkey=file:{}", f.file("wrong-seed")));
    refused(&url, &f.users, &secrets, "authorization violation").await;

    let url = format!(
        "nats://{}?cacert={}&cert={}&key={}&creds={}",
        f.operator.host(),
        f.pki.path("ca.pem").display(),
        f.pki.path("client.pem").display(),
        f.pki.path("client-key.pem").display(),
        f.file("stranger.creds"),
    );
    refused(&url, &f.operator, &secrets, "authorization violation").await;

    // The server's certificate is not signed by the CA the client trusts.
    let url = format!(
        "nats://{}?cacert={}&user=millrace&password=file:{}",
        f.users.host(),
        f.pki.path("other-ca.pem").display(),
        f.file("password")
    );
    refused(&url, &f.users, &secrets, "certificate").await;

    // The operator's server verifies clients: no client certificate, no connection.
    let url = format!(
        "nats://{}?cacert={}&creds={}",
        f.operator.host(),
        f.pki.path("ca.pem").display(),
        f.file("user.creds"),
    );
    let error = match NatsBus::connect(&url).await {
        Ok(_) => panic!("connected without a client certificate"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains(&f.operator.host()), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_requires_tls_is_not_reached_in_plain_text_and_a_plain_one_not_with_tls() {
    let f = fixture();
    // No cacert: the system's CAs do not know the test CA, so TLS fails rather than
    // falling back to plain text.
    let url = format!("nats://{}?token=file:{}", f.token.host(), f.file("token"));
    refused(&url, &f.token, &[TOKEN], "certificate").await;
    // A server without TLS: tls=required refuses it.
    let dir = tempfile::tempdir().unwrap();
    let plain = Server::start(dir.path(), "plain", "");
    let url = format!("nats://{}?tls=required", plain.host());
    refused(&url, &plain, &[], "tls").await;
    // The guard stops its server.
    let addr = SocketAddr::from(([127, 0, 0, 1], plain.port));
    drop(plain);
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "nats-server still listens on {addr} after its guard was dropped"
    );
}

// ---------------------------------------------------------------------------------------------
// The URL, without a server

#[test]
fn every_parameter_is_read_and_a_certificate_makes_tls_required() {
    let settings = NatsSettings::from_url(
        "nats://nats.example:4333?cacert=/etc/nats/ca.pem&cert=/etc/nats/client.pem\
         &key=file:/etc/nats/client-key.pem&user=millrace&password=env:NATS_PASSWORD",
    )
    .unwrap();
    assert_eq!(
        settings,
        NatsSettings {
            server: "nats://nats.example:4333".to_string(),
            tls: TlsMode::Required,
            ca_cert: Some(PathBuf::from("/etc/nats/ca.pem")),
            client_cert: Some((
                PathBuf::from("/etc/nats/client.pem"),
                PathBuf::from("/etc/nats/client-key.pem")
            )),
            auth: NatsAuth::UserPassword {
                user: "millrace".to_string(),
                password: "env:NATS_PASSWORD".to_string()
            },
        }
    );
    let plain = NatsSettings::from_url("nats://127.0.0.1").unwrap();
    assert_eq!(plain.server, "nats://127.0.0.1:4222");
    assert_eq!(plain.tls, TlsMode::Auto);
    assert_eq!(plain.auth, NatsAuth::None);
    let tls = NatsSettings::from_url("tls://connect.ngs.global?creds=/etc/nats/ngs.creds").unwrap();
    assert_eq!(tls.server, "tls://connect.ngs.global:4222");
    assert_eq!(tls.tls, TlsMode::Required);
    assert_eq!(tls.auth, NatsAuth::Creds("/etc/nats/ngs.creds".to_string()));
    for (query, auth) in [
        ("nkey=file:/s", NatsAuth::Nkey("file:/s".to_string())),
        ("token=env:T", NatsAuth::Token("env:T".to_string())),
        ("creds=env:C", NatsAuth::Creds("env:C".to_string())),
    ] {
        let url = format!("nats://h:1?tls=first&{query}");
        let settings = NatsSettings::from_url(&url).unwrap();
        assert_eq!(settings.auth, auth, "{url}");
        assert_eq!(settings.tls, TlsMode::First, "{url}");
    }
}

const LITERAL: &str = "Lit3ral-s3cret";

#[test]
fn a_literal_secret_is_refused_as_not_a_reference() {
    for url in [
        format!("nats://h:4222?token={LITERAL}"),
        format!("nats://h:4222?user=u&password={LITERAL}"),
        format!("nats://h:4222?nkey={LITERAL}"),
        format!("nats://u:{LITERAL}@h:4222"),
        format!("nats://{LITERAL}@h:4222"),
    ] {
        match NatsSettings::from_url(&url) {
            Err(NatsUrlError::Secret(SecretError::NotAReference { what })) => {
                assert!(!what.contains(LITERAL), "{what}")
            }
            other => panic!("{url}: expected NotAReference, got {other:?}"),
        }
    }
}

#[test]
fn unknown_repeated_and_half_given_parameters_are_errors_that_name_them() {
    for (url, expect) in [
        ("nats://h?tls=required&verbose=true", "\"verbose\""),
        (
            "nats://h?token=env:A&token=env:B",
            "\"token\" is given twice",
        ),
        ("nats://h?tls=yes", "tls=\"yes\""),
        ("nats://h?cert=/c.pem", "cert and key go together"),
        ("nats://h?key=/k.pem", "cert and key go together"),
        ("nats://h?user=u", "user and password go together"),
        ("nats://h?password=env:P", "user and password go together"),
        ("nats://h?token=env:T&nkey=env:N", "one way to authenticate"),
        (
            "nats://h?creds=/c&user=u&password=env:P",
            "one way to authenticate",
        ),
        ("nats://h?cacert=env:CA", "path of a PEM file"),
        ("nats://h?cacert=", "has no value"),
        ("nats://h/path", "no path"),
        ("amqp://h", "expected nats://"),
        ("nats://?token=env:T", "no server host"),
    ] {
        match NatsSettings::from_url(url) {
            Err(NatsUrlError::Invalid(reason)) => {
                assert!(reason.contains(expect), "{url}: {reason}")
            }
            other => panic!("{url}: expected an error containing {expect:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_url_that_cannot_be_used_is_an_error_without_its_secret() {
    for url in [
        format!("nats://millrace:{LITERAL}@127.0.0.1:4222"),
        format!("nats://millrace:{LITERAL}@127.0.0.1:notaport"),
        format!("nats://127.0.0.1:4222?token={LITERAL}"),
        format!("nats://127.0.0.1:4222?token={LITERAL}&bogus=1"),
        format!("nats//millrace:{LITERAL}@127.0.0.1:4222"),
    ] {
        let error = match NatsBus::connect(&url).await {
            Ok(_) => panic!("{url}: connected"),
            Err(e) => e.to_string(),
        };
        assert!(!error.contains(LITERAL), "{error}");
        assert!(error.contains("127.0.0.1"), "{error}");
    }
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_is_named_by_its_reference() {
    let url = "nats://127.0.0.1:4222?token=env:MILLRACE_TEST_NATS_TOKEN_SURELY_UNSET";
    let error = match NatsBus::connect(url).await {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("MILLRACE_TEST_NATS_TOKEN_SURELY_UNSET"),
        "{error}"
    );
    let url = "nats://127.0.0.1:4222?creds=/nonexistent/millrace.creds";
    let error = match NatsBus::connect(url).await {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("/nonexistent/millrace.creds"), "{error}");
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), "bad.creds", "not a creds file");
    let url = format!(
        "nats://127.0.0.1:4222?creds={}",
        dir.path().join("bad.creds").display()
    );
    let error = match NatsBus::connect(&url).await {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("not a NATS credentials file"), "{error}");
}
