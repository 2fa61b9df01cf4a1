//! Every error path that formats a bus URL, fed a URL with a password, never shows the password:
//! `millrace_bus::connect` with a secret in unreachable URLs (a closed loopback port, for every
//! broker scheme) and in mistyped ones (every scheme). The error's `Display` and `Debug` and
//! everything the backends log meanwhile (captured, with the `log` crate bridged in, which is how
//! librdkafka's own log arrives) must name what went wrong without the secret.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const SECRET: &str = "Sup3r-S3cret-pw";

/// Captures every log line of this test binary.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The log of this test binary, captured from its first use on (one global subscriber: librdkafka
/// logs from its own threads).
fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        captured
    })
}

/// Connects to each of `cases` (URL, what the error must name); returns every way `secret`
/// showed: in an error's `Display` or `Debug`, or in a log line.
async fn leaks(secret: &str, cases: &[(String, &str)]) -> Vec<String> {
    let captured = captured();
    let mut problems = Vec::new();
    for (url, names) in cases {
        let shown = millrace_secrets::redact(url);
        let result =
            tokio::time::timeout(Duration::from_secs(60), millrace_bus::connect(url)).await;
        let err = match result {
            Err(_) => {
                problems.push(format!("{shown}: connect did not return within 60 s"));
                continue;
            }
            Ok(Ok(_)) => {
                problems.push(format!("{shown}: connected"));
                continue;
            }
            Ok(Err(e)) => e,
        };
        let (display, debug) = (err.to_string(), format!("{err:?}"));
        for text in [&display, &debug] {
            if text.contains(secret) {
                problems.push(format!("{shown}: the error shows the password: {text}"));
            }
        }
        if !display.contains(names) {
            problems.push(format!(
                "{shown}: the error should name {names:?}: {display}"
            ));
        }
        println!("{shown}\n    -> {display}");
    }
    // librdkafka logs from its own threads: give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs =
        String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|p| p.into_inner())).to_string();
    for line in logs.lines().filter(|l| l.contains(secret)) {
        problems.push(format!("a log line shows the password: {line}"));
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_a_bus_url_never_appears_in_errors_or_logs() {
    std::env::set_var("MILLRACE_TEST_REDACTION_PASSWORD", SECRET);
    let port = closed_port();
    // (URL, something the error must still name, so the operator can tell what was wrong)
    let cases = [
        (format!("amqp://millrace:{SECRET}@127.0.0.1:{port}/%2f"), "127.0.0.1"),
        (format!("amqps://millrace:{SECRET}@127.0.0.1:{port}/prod"), "127.0.0.1"),
        (
            format!(
                "amqps://millrace@127.0.0.1:{port}/%2f?password=env:MILLRACE_TEST_REDACTION_PASSWORD"
            ),
            "127.0.0.1",
        ),
        (format!("kafka://millrace:{SECRET}@127.0.0.1:{port}"), "127.0.0.1"),
        (format!("amqp://millrace:{SECRET}@rabbit:notaport/%2f"), "bus URL"),
        (format!("amqps://millrace:{SECRET}@rabbit/%2f?pasword=env:X"), "pasword"),
        (format!("amqp://millrace:{SECRET}@rabbit/%2f?cacert=/nowhere/ca.pem"), "amqps://"),
        (format!("amqps://millrace:{SECRET}@rabbit/%2f?cacert=/nowhere/ca.pem"), "/nowhere/ca.pem"),
        (format!("amqp://millrace@rabbit/%2f?password={SECRET}"), "reference"),
        (format!("nats//millrace:{SECRET}@nats:4222"), "bus URL"),
        (format!("nats://millrace:{SECRET}@[nats:4222"), "bus URL"),
        (format!("kafka://millrace:{SECRET}@broker:9092/x?partitions=0"), "bus URL"),
        (format!("kafka:/millrace:{SECRET}@broker:9092"), "bus URL"),
        (format!("sns-sqs://us-east-1?endpoint=http://u:{SECRET}@[moto"), "bus URL"),
        (format!("sns-sqs://u:{SECRET}@us-east-1/path"), "bus URL"),
        (format!("pubsub://u:{SECRET}@project/path"), "bus URL"),
        (format!("pubsub://project?emulator=u:{SECRET}@x&token={SECRET}"), "bus URL"),
        (format!("carrier-pigeon://u:{SECRET}@loft"), "unknown scheme"),
        (format!("memory://u:{SECRET}@x"), "one process"),
        (format!("u:{SECRET}@not-a-url"), "bus URL"),
    ];
    let problems = leaks(SECRET, &cases).await;
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// NATS with credentials in the URL, to a closed port: refused (credentials are references), and
/// neither the error nor any log line, down to `async_nats`'s own at TRACE, shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_a_nats_url_never_appears_in_errors_or_logs() {
    const NATS_SECRET: &str = "Nats-S3cret-pw";
    let port = closed_port();
    let cases = [
        (
            format!("nats://millrace:{NATS_SECRET}@127.0.0.1:{port}"),
            "127.0.0.1",
        ),
        (
            format!("nats://{NATS_SECRET}@127.0.0.1:{port}"),
            "127.0.0.1",
        ),
    ];
    let problems = leaks(NATS_SECRET, &cases).await;
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}
