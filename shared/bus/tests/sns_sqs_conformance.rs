//! The conformance suite against SNS and SQS as moto emulates them: one test per behaviour, so a
//! failure names it, plus what is particular to this backend (raw delivery, attributes SNS cannot
//! carry as they are, missing topics, cancelled `next`).
//!
//! The emulator's endpoint comes from `MILLRACE_TEST_MOTO` (`http://127.0.0.1:PORT`). Without it,
//! the first test starts moto through `scripts/emulator.sh moto start` and the script stops it
//! again when this test process exits (`EMULATOR_STOP_WITH_PID`). No test skips: no emulator is a
//! failure. Credentials are dummies given to the bus through its configuration loader; the
//! process environment is left alone.
//!
//! Every test uses its own topic prefix and deletes what it created afterwards, pass or fail. The
//! tests take turns (one lock) so that the 400 ms leases and 300 ms quiet periods are not measured
//! on an emulator busy with another test's thousands of messages.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[path = "../../../tests/support/local_services.rs"]
mod local_services;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::types::QueueAttributeName;
use local_services::{address, MOTO};
use millrace_bus::sns_sqs::{queue_name, topic_name, SnsSqsBus};
use millrace_bus::{conformance, Bus, BusError, Message, SubscribeOptions};
use tokio::sync::Mutex;
use tokio::time::timeout;

const REGION: &str = "us-east-1";
const SOON: Duration = Duration::from_secs(10);

/// The emulator's endpoint URL, started once per test process if not given.
fn endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        let endpoint = address(&MOTO);
        reset_moto(&endpoint);
        endpoint
    })
}

/// Empties moto (its `/moto-api/reset`) before this file's tests: moto slows down with every
/// queue and topic it holds, and the suite's 400 ms leases should not measure what the test
/// binaries before this one left behind. `cargo test` runs test binaries one after another, so
/// nothing else is using it meanwhile.
fn reset_moto(endpoint: &str) {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host)
        .unwrap_or_else(|e| panic!("connecting to moto at {host}: {e}"));
    let request = format!(
        "POST /moto-api/reset HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("resetting moto: {e}"));
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "resetting moto at {host}: {response:?}"
    );
}

fn url() -> String {
    format!("sns-sqs://{REGION}?endpoint={}", endpoint())
}

fn credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "millrace-test")
}

/// A bus on the emulator with dummy credentials.
async fn connect() -> SnsSqsBus {
    let loader =
        aws_config::defaults(BehaviorVersion::latest()).credentials_provider(credentials());
    match SnsSqsBus::connect_with(&url(), loader).await {
        Ok(bus) => bus,
        Err(e) => panic!("connecting to {}: {e}", url()),
    }
}

/// Plain SDK clients on the emulator, to look at SNS and SQS without the bus in between.
async fn plain_clients() -> (aws_sdk_sns::Client, aws_sdk_sqs::Client) {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint())
        .credentials_provider(credentials())
        .load()
        .await;
    (
        aws_sdk_sns::Client::new(&config),
        aws_sdk_sqs::Client::new(&config),
    )
}

/// A topic prefix unique to this test process and test.
fn prefix(test: &str) -> String {
    format!(
        "mrt-{:x}-{:08x}.{test}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Runs `check` on a fresh bus and prefix while holding the turn, deletes everything under the
/// prefix, then reports the outcome (re-raising the check's panic, if any).
async fn with_bus<F, Fut>(test: &str, check: F)
where
    F: FnOnce(Arc<SnsSqsBus>, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    static TURN: Mutex<()> = Mutex::const_new(());
    let _turn = TURN.lock().await;
    if let Ok(filter) = std::env::var("MILLRACE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let bus = Arc::new(connect().await);
    let prefix = prefix(test);
    let outcome = tokio::spawn(check(bus.clone(), prefix.clone())).await;
    if let Err(e) = bus.delete_topics_under(&prefix).await {
        eprintln!("cleaning up under {prefix}: {e}");
    }
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{test}: {e}"),
        }
    }
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            with_bus(stringify!($name), |bus, prefix| async move {
                conformance::$name(&*bus, &prefix).await
            })
            .await;
        }
    };
}

// Four consumers sharing 5,000 messages is among them: moto 5.2 as released makes each SQS call
// walk the whole queue several times over (~0.2 s a message with 5,000 queued, ~15 min for that
// case) and hands one message to two concurrent receives; scripts/emulator.sh runs moto through
// scripts/moto_server.py, which fixes both.
millrace_bus::for_each_conformance_case!(conformance_test);

// ---------------------------------------------------------------------------------------------
// Backend specifics

#[test]
fn topic_and_queue_names_are_valid_readable_and_distinct() {
    assert_eq!(topic_name("millrace.fac-0.intake"), "millrace_fac-0_intake");
    assert_eq!(
        topic_name("millrace.fac-0.intake.dead"),
        "millrace_fac-0_intake_dead"
    );
    assert_eq!(
        queue_name("millrace.fac-0.intake", "intake-worker"),
        "millrace_fac-0_intake__intake-worker"
    );
    assert_ne!(topic_name("a.b"), topic_name("a_b"));
    assert_ne!(queue_name("a.b", "c"), queue_name("a", "b.c"));
    assert_ne!(
        queue_name("millrace.fac-0.intake", "g"),
        queue_name("millrace.fac-0.intake.dead", "g")
    );
    let long = format!("millrace.{}.intake", "facilitator".repeat(10));
    for (name, max) in [
        (topic_name("a b/c*>ü"), 256),
        (topic_name(&"x".repeat(300)), 256),
        (queue_name(&long, "aggregate-worker"), 80),
        (queue_name("t", "g_1 ü"), 80),
    ] {
        assert!(
            !name.is_empty()
                && name.len() <= max
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{name:?}"
        );
    }
    assert_ne!(
        queue_name(&long, "aggregate-worker-1"),
        queue_name(&long, "aggregate-worker-2")
    );
}

/// The body reaches SQS byte for byte (raw delivery), read with a plain SQS `ReceiveMessage`
/// rather than through the bus, and the attributes arrive as SQS message attributes. A
/// subscription without raw delivery would have delivered the SNS JSON envelope instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_delivery_keeps_the_body_exact() {
    with_bus("raw", |bus, prefix| async move {
        let topic = format!("{prefix}.intake");
        let body = r#"{"kind":"intake","batch":"x","note":"ünï ✓ \"q\"\t\n"}"#;
        bus.create_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("create_topic: {e}"));

        // A second queue, subscribed by hand *without* raw delivery, for contrast. Tagged like the
        // bus's own queues so that the clean-up finds it.
        let (sns, sqs) = plain_clients().await;
        let envelope_queue = sqs
            .create_queue()
            .queue_name(queue_name(&topic, "envelope"))
            .tags("millrace-topic", &topic)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create envelope queue: {e:?}"))
            .queue_url
            .unwrap_or_else(|| panic!("no queue URL"));
        let envelope_arn = sqs
            .get_queue_attributes()
            .queue_url(&envelope_queue)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .ok()
            .and_then(|out| out.attributes?.remove(&QueueAttributeName::QueueArn))
            .unwrap_or_else(|| panic!("no queue ARN"));
        let topic_arn = sns
            .list_topics()
            .send()
            .await
            .unwrap_or_else(|e| panic!("list topics: {e:?}"))
            .topics
            .unwrap_or_default()
            .into_iter()
            .filter_map(|t| t.topic_arn)
            .find(|arn| arn.ends_with(&format!(":{}", topic_name(&topic))))
            .unwrap_or_else(|| panic!("topic {topic} not found by listing"));
        sns.subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&envelope_arn)
            .send()
            .await
            .unwrap_or_else(|e| panic!("subscribe envelope queue: {e:?}"));

        let message = Message::new(body)
            .with_attribute(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .with_attribute("millrace-attempt", "3")
            .with_attribute("empty", "");
        bus.publish(&topic, message.clone())
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));

        let raw_queue = sqs
            .get_queue_url()
            .queue_name(queue_name(&topic, "g"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("get_queue_url: {e:?}"))
            .queue_url
            .unwrap_or_else(|| panic!("no queue URL"));
        let receive = |queue: String| {
            let sqs = sqs.clone();
            async move {
                let out = sqs
                    .receive_message()
                    .queue_url(queue)
                    .message_attribute_names("All")
                    .wait_time_seconds(5)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("receive_message: {e:?}"));
                let mut messages = out.messages.unwrap_or_default();
                assert_eq!(messages.len(), 1, "one message expected: {messages:?}");
                messages.remove(0)
            }
        };

        let raw = receive(raw_queue).await;
        assert_eq!(
            raw.body().map(str::as_bytes),
            Some(body.as_bytes()),
            "raw delivery changed the body"
        );
        let attributes = raw.message_attributes.unwrap_or_default();
        for name in ["traceparent", "millrace-attempt"] {
            assert_eq!(
                attributes.get(name).and_then(|v| v.string_value()),
                message.attributes.get(name).map(String::as_str),
                "attribute {name} did not arrive as an SQS message attribute: {attributes:?}"
            );
        }
        // SNS/SQS refuse empty values: it travels encoded (and the bus decodes it).
        assert!(
            !attributes.contains_key("empty")
                && attributes.keys().any(|k| k.starts_with("Millrace-X-")),
            "{attributes:?}"
        );

        let wrapped = receive(envelope_queue).await;
        let wrapped = wrapped.body().unwrap_or_default();
        assert_ne!(
            wrapped, body,
            "without raw delivery the body should be wrapped"
        );
        assert!(
            wrapped.contains("\"Type\"")
                && wrapped.contains("Notification")
                && wrapped.contains(&topic_arn),
            "expected the SNS JSON envelope without raw delivery, got {wrapped}"
        );

        // And through the bus, attributes come back exactly (the encoded one decoded).
        let mut sub = bus
            .subscribe(
                &topic,
                SubscribeOptions::new("g").lease(Duration::from_secs(5)),
            )
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        // The plain receive above holds the message for the queue's default visibility (30 s):
        // publish again and read the new one.
        bus.publish(&topic, message.clone())
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
        let delivery = match timeout(SOON, sub.next()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("next: {e}"),
            Err(_) => panic!("nothing delivered within {SOON:?}"),
        };
        assert_eq!(delivery.body, message.body);
        assert_eq!(delivery.attributes, message.attributes);
        assert_eq!(delivery.attempt, 1);
        delivery.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));
        let _ = sub.close().await;
    })
    .await;
}

/// Attributes SNS cannot carry as they are still arrive exactly as published; more than ten, or
/// a body SQS cannot carry, are refused plainly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_attributes_arrive_exactly_as_published() {
    with_bus("attributes", |bus, prefix| async move {
        let topic = format!("{prefix}.attributes");
        bus.create_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("create_topic: {e}"));
        let message = Message::new("{}")
            .with_attribute("seq", "1")
            .with_attribute("note", "ünï-码 ✓ with spaces=and;symbols")
            .with_attribute("padded", "  x \t")
            .with_attribute("multi line", "a\r\nb")
            .with_attribute("AWS.trace", "reserved prefix")
            .with_attribute("ünï", "non-ASCII name")
            .with_attribute("empty", "")
            .with_attribute("blank", " ")
            .with_attribute("Millrace-X-41", "looks encoded")
            .with_attribute("tenth", "10");
        assert_eq!(message.attributes.len(), 10);
        bus.publish(&topic, message.clone())
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
        let mut sub = bus
            .subscribe(&topic, SubscribeOptions::new("g"))
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        let delivery = match timeout(SOON, sub.next()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("next: {e}"),
            Err(_) => panic!("nothing delivered within {SOON:?}"),
        };
        assert_eq!(delivery.attributes, message.attributes);
        assert_eq!(delivery.body, message.body);
        delivery.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));

        let eleven = message.clone().with_attribute("eleventh", "11");
        let err = bus
            .publish(&topic, eleven)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("at most 10")),
            "{err:?}"
        );
        let err = bus
            .publish(&topic, Message::new(vec![0xff, 0xfe]))
            .await
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("not UTF-8")),
            "{err:?}"
        );
        let _ = sub.close().await;
    })
    .await;
}

fn assert_missing(result: Result<(), BusError>, topic: &str, what: &str) {
    match result {
        Err(e @ BusError::MissingTopic { .. }) => assert!(
            e.to_string().contains(topic),
            "{what}: the error does not name {topic:?}: {e}"
        ),
        Err(e) => panic!("{what}: expected MissingTopic, got {e}"),
        Ok(()) => panic!("{what}: succeeded on a missing topic"),
    }
}

/// Without `create_topic` nothing exists and nothing is created on demand: `publish`,
/// `subscribe` and `check_topic` say `MissingTopic`, naming the Millrace topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_reported_not_created() {
    with_bus("missing", |bus, prefix| async move {
        let topic = format!("{prefix}.intake");
        assert_missing(
            bus.publish(&topic, Message::new("{}")).await.map(|_| ()),
            &topic,
            "publish",
        );
        assert_missing(
            bus.subscribe(&topic, SubscribeOptions::new("g"))
                .await
                .map(|_| ()),
            &topic,
            "subscribe",
        );
        assert_missing(bus.check_topic(&topic, None).await, &topic, "check_topic");
        assert_missing(
            bus.check_topic(&topic, Some("g")).await,
            &topic,
            "check_topic with a group",
        );
        // Through the trait too (what services call at start-up).
        let dyn_bus: &dyn Bus = &*bus;
        assert_missing(
            dyn_bus.check_topic(&topic, None).await,
            &topic,
            "Bus::check_topic",
        );

        // The topic alone: publishing works (SNS drops it: no group), the group is still missing.
        bus.create_topic(&topic, None)
            .await
            .unwrap_or_else(|e| panic!("create_topic: {e}"));
        bus.check_topic(&topic, None)
            .await
            .unwrap_or_else(|e| panic!("check_topic after create: {e}"));
        bus.publish(&topic, Message::new("{}"))
            .await
            .unwrap_or_else(|e| panic!("publish after create: {e}"));
        assert_missing(
            bus.subscribe(&topic, SubscribeOptions::new("g"))
                .await
                .map(|_| ()),
            &topic,
            "subscribe without the group's queue",
        );
        assert_missing(
            bus.check_topic(&topic, Some("g")).await,
            &topic,
            "check_topic without the group's queue",
        );

        bus.create_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("create_topic with group: {e}"));
        // Idempotent.
        bus.create_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("create_topic again: {e}"));
        dyn_bus
            .check_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("check_topic after create: {e}"));

        // A second bus (no cached ARNs) finds the topic by itself; another missing topic is
        // still missing (looked up by ARN this time, not by listing).
        let other = connect().await;
        other
            .check_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("check_topic on a fresh bus: {e}"));
        let absent = format!("{prefix}.absent");
        assert_missing(
            other.publish(&absent, Message::new("{}")).await.map(|_| ()),
            &absent,
            "publish on a fresh bus",
        );
    })
    .await;
}

/// A `next` cancelled while its receive is in flight loses nothing: what that receive brings is
/// handed back at once, so another consumer of the group gets it long before the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_next_hands_its_message_back() {
    with_bus("cancel", |bus, prefix| async move {
        let topic = format!("{prefix}.cancel");
        bus.create_topic(&topic, Some("g"))
            .await
            .unwrap_or_else(|e| panic!("create_topic: {e}"));
        let options = SubscribeOptions::new("g")
            .lease(Duration::from_secs(30))
            .prefetch(1);
        let mut a = bus
            .subscribe(&topic, options.clone())
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        let mut b = bus
            .subscribe(&topic, options)
            .await
            .unwrap_or_else(|e| panic!("subscribe: {e}"));
        // `a` starts a long poll and gives up on it; the message arrives during that poll.
        let (gave_up, published) =
            tokio::join!(timeout(Duration::from_millis(300), a.next()), async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                bus.publish(&topic, Message::new("{\"n\":1}").with_attribute("seq", "1"))
                    .await
                    .unwrap_or_else(|e| panic!("publish: {e}"))
            });
        assert!(gave_up.is_err(), "nothing was published yet: {gave_up:?}");
        assert!(!published.is_empty());
        let started = tokio::time::Instant::now();
        let delivery = match timeout(SOON, b.next()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("next: {e}"),
            Err(_) => panic!("the message stayed with the consumer that gave up"),
        };
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(
            delivery.attributes.get("seq").map(String::as_str),
            Some("1")
        );
        delivery.ack().await.unwrap_or_else(|e| panic!("ack: {e}"));
        let _ = a.close().await;
        let _ = b.close().await;
    })
    .await;
}

/// The URL is checked plainly, and `millrace_bus::connect` knows the scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_are_checked_and_dispatched() {
    for bad in [
        "sns-sqs://us-east-1/extra",
        "sns-sqs://us-east-1?endpoint=ftp://x",
        "sns-sqs://us-east-1?bogus=1",
    ] {
        let err = SnsSqsBus::connect(bad).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("sns-sqs://")),
            "{bad}: {err:?}"
        );
    }
    // Connecting makes no request, so this works without credentials.
    let bus = millrace_bus::connect(&url())
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", url()));
    assert_eq!(bus.name(), "sns-sqs");
}
