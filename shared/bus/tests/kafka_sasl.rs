//! The Kafka bus over SASL/SCRAM against a real broker: the conformance suite on
//! `SASL_PLAINTEXT` with `SCRAM-SHA-512` (password from a `file:` reference), a round trip with
//! `SCRAM-SHA-256` (password from an `env:` reference), and a wrong password failing at start-up
//! without the password in the error.
//!
//! The broker is a tansu of its own (the binary `scripts/kafka-broker.sh binary` installs), on a
//! free loopback port, with users this test creates (`tansu user create`, random passwords). It
//! runs without `--authentication`: tansu 0.6.0 then still checks the SCRAM exchange of a client
//! that authenticates (a wrong password is refused), but cannot create users once
//! authentication is required, and cannot serve TLS at all (its `--cert`/`--key` flags exclude
//! each other), so SASL_SSL is only asserted (`kafka_settings.rs`). A watchdog shell stops the
//! broker when this test process exits.

#[path = "../../../tests/support/local_services.rs"]
mod local_services;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use local_services::{repo_root, run_prefix};
use millrace_bus::conformance;
use millrace_bus::kafka::KafkaBus;
use millrace_bus::{Bus, Message, SubscribeOptions};
use tokio::sync::Mutex;

const USER_512: &str = "millrace-scram-512";
const USER_256: &str = "millrace-scram-256";
const PASSWORD_VAR: &str = "MILLRACE_TEST_KAFKA_SCRAM_256_PASSWORD";

struct ScramBroker {
    addr: String,
    password_512: String,
    password_256: String,
    password_file: tempfile::TempDir,
}

fn random_password(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{tag}-{:x}-{:x}", nanos, std::process::id())
}

fn tansu_binary() -> String {
    let out = Command::new(repo_root().join("scripts/kafka-broker.sh"))
        .arg("binary")
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/kafka-broker.sh binary: {e}"));
    assert!(out.status.success(), "scripts/kafka-broker.sh binary failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts the broker once per test process and creates its two users.
fn broker() -> &'static ScramBroker {
    static BROKER: OnceLock<ScramBroker> = OnceLock::new();
    BROKER.get_or_init(|| {
        let bin = tansu_binary();
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = repo_root().join(format!("build/kafka-sasl-{port}.log"));
        // The watchdog: starts tansu, and stops it once this test process has gone.
        let script = r#"
            "$1" broker --listener-url "$2" --advertised-listener-url "$2" \
                --storage-engine memory://tansu/ >"$3" 2>&1 &
            child=$!
            trap 'kill $child 2>/dev/null' EXIT
            while kill -0 "$4" 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done
        "#;
        std::fs::create_dir_all(repo_root().join("build")).unwrap();
        Command::new("bash")
            .args(["-c", script, "watchdog", &bin, &url])
            .arg(&log)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting tansu: {e}"));
        let addr = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {addr} within 30 s (log: {})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let password_512 = random_password("p512");
        let password_256 = random_password("p256");
        for (user, password, mechanism) in [
            (USER_512, &password_512, "scram512"),
            (USER_256, &password_256, "scram256"),
        ] {
            let status = Command::new(&bin)
                .args(["user", "create", "--broker", &url, "--mechanism", mechanism])
                .args([user, password.as_str()])
                .stdout(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("tansu user create: {e}"));
            assert!(status.success(), "tansu user create {user} failed");
        }
        let password_file = tempfile::tempdir().unwrap();
        std::fs::write(
            password_file.path().join("password"),
            format!("{password_512}\n"),
        )
        .unwrap();
        // Set before any bus reads the environment (the first test to get here holds the
        // OnceLock; the others wait for it).
        std::env::set_var(PASSWORD_VAR, &password_256);
        ScramBroker {
            addr,
            password_512,
            password_256,
            password_file,
        }
    })
}

fn scram_512_url(broker: &ScramBroker) -> String {
    format!(
        "kafka://{}?security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-512\
         &sasl.username={USER_512}&sasl.password=file:{}",
        broker.addr,
        broker.password_file.path().join("password").display()
    )
}

/// Connects over SCRAM-SHA-512 and holds the turn for one test.
async fn bus() -> (KafkaBus, tokio::sync::MutexGuard<'static, ()>) {
    static TURN: Mutex<()> = Mutex::const_new(());
    let turn = TURN.lock().await;
    let broker = tokio::task::spawn_blocking(broker).await.unwrap();
    match KafkaBus::connect(&scram_512_url(broker)).await {
        Ok(bus) => (bus, turn),
        Err(e) => panic!("connecting over SCRAM-SHA-512: {e}"),
    }
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (bus, _turn) = bus().await;
            conformance::$name(&bus, &run_prefix(concat!("sasl_", stringify!($name)))).await;
            if let Err(e) = bus.flush().await {
                panic!("flush at the end: {e}");
            }
        }
    };
}

millrace_bus::for_each_conformance_case!(conformance_test);

/// SCRAM-SHA-256 with the password in an environment variable: publish, receive, ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_with_an_env_reference_round_trips() {
    let (_bus512, _turn) = bus().await;
    let broker = broker();
    let url = format!(
        "kafka://{}?security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-256\
         &sasl.username={USER_256}&sasl.password=env:{PASSWORD_VAR}",
        broker.addr
    );
    let bus = KafkaBus::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connecting over SCRAM-SHA-256: {e}"));
    let topic = run_prefix("sasl_scram_256");
    bus.create_topic(&topic, Some("g")).await.unwrap();
    let mut sub = bus
        .subscribe(&topic, SubscribeOptions::new("g"))
        .await
        .unwrap();
    bus.publish(&topic, Message::new(&b"over scram-256"[..]))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("no delivery within 30 s")
        .unwrap();
    assert_eq!(&delivery.body[..], b"over scram-256");
    delivery.ack().await.unwrap();
    sub.close().await.unwrap();
    assert_ne!(broker.password_256, broker.password_512);
}

/// A wrong password is a start-up error that names the broker, not the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_at_start_up_without_the_password() {
    let (_bus, _turn) = bus().await;
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let wrong = format!("{}-wrong", broker.password_512);
    std::fs::write(dir.path().join("pw"), &wrong).unwrap();
    let url = format!(
        "kafka://{}?security.protocol=SASL_PLAINTEXT&sasl.mechanism=SCRAM-SHA-512\
         &sasl.username={USER_512}&sasl.password=file:{}",
        broker.addr,
        dir.path().join("pw").display()
    );
    let started = Instant::now();
    let e = match KafkaBus::connect(&url).await {
        Ok(_) => panic!("a wrong SCRAM password was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&broker.addr), "{e}");
    assert!(!e.contains(&wrong), "the error leaks the password: {e}");
    assert!(
        !e.contains(&broker.password_512),
        "the error leaks the password: {e}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}
