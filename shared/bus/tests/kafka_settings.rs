//! The Kafka bus's settings, without a broker: the librdkafka configuration Millrace would send,
//! built from the URL, a properties file and the environment, with secrets resolved from
//! references; and start-up errors for settings that cannot work, naming the setting and never
//! the secret. TLS and SASL are only asserted: the test broker, tansu 0.6.0, cannot serve TLS, and
//! answers librdkafka's SASL handshake with UNSUPPORTED_SASL_MECHANISM (see the README).

use std::collections::BTreeMap;
use std::sync::Once;

use millrace_bus::kafka::{ClientRole, KafkaBus, KafkaSettings, RESERVED_PROPERTIES};

const SECRET: &str = "pa55-Wd.shh-7f3a";
const OTHER_SECRET: &str = "key-pa55-91c0";
/// Set once, before any test reads the environment (every test calls `setup` first).
const PASSWORD_VAR: &str = "MILLRACE_TEST_KAFKA_SETTINGS_PASSWORD";

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only this binary's tests run here, and each waits for this before anything else.
        std::env::set_var(PASSWORD_VAR, SECRET);
    });
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(url: &str, vars: &[(&str, &str)]) -> Result<KafkaSettings, String> {
    setup();
    KafkaSettings::parse(url, env(vars)).map_err(|e| e.to_string())
}

fn parse_err(url: &str, vars: &[(&str, &str)]) -> String {
    match parse(url, vars) {
        Ok(settings) => panic!("{url} was accepted: {settings:?}"),
        Err(e) => {
            assert!(!e.contains(SECRET), "the error leaks the secret: {e}");
            assert!(!e.contains(OTHER_SECRET), "the error leaks a secret: {e}");
            e
        }
    }
}

fn consumer() -> ClientRole {
    ClientRole::Consumer {
        group_id: "intake~workers".to_string(),
        prefetch: 8,
    }
}

#[test]
fn sasl_ssl_scram_from_the_url_is_sent_to_librdkafka_exactly_with_the_secret_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let url = format!(
        "kafka://b1.example:9096,b2.example:9096?security.protocol=SASL_SSL\
         &sasl.mechanism=SCRAM-SHA-512&sasl.username=millrace&sasl.password=env:{PASSWORD_VAR}\
         &ssl.ca.location={}&partitions=3",
        ca.display()
    );
    let settings = parse(&url, &[]).unwrap();
    assert_eq!(settings.bootstrap(), "b1.example:9096,b2.example:9096");
    assert_eq!(settings.partitions(), 3);
    let debug = format!("{settings:?}");
    assert!(!debug.contains(SECRET), "Debug shows the secret: {debug}");

    let expected_common = [
        ("bootstrap.servers", "b1.example:9096,b2.example:9096"),
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "millrace"),
        ("sasl.password", SECRET),
        ("ssl.ca.location", ca.to_str().unwrap()),
    ];
    let mut producer: BTreeMap<String, String> = expected_common
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [
        ("client.id", "millrace-bus"),
        ("acks", "all"),
        ("enable.idempotence", "false"),
        ("linger.ms", "0"),
        ("message.timeout.ms", "10000"),
    ] {
        producer.insert(k.to_string(), v.to_string());
    }
    assert_eq!(settings.client_properties(&ClientRole::Producer), producer);

    let mut consumer_expected: BTreeMap<String, String> = expected_common
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [
        ("client.id", "millrace-bus"),
        ("group.id", "intake~workers"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("allow.auto.create.topics", "false"),
        ("session.timeout.ms", "3000"),
        ("heartbeat.interval.ms", "300"),
        ("fetch.wait.max.ms", "100"),
        ("queued.min.messages", "160"),
        ("queued.max.messages.kbytes", "8192"),
    ] {
        consumer_expected.insert(k.to_string(), v.to_string());
    }
    assert_eq!(settings.client_properties(&consumer()), consumer_expected);

    let mut admin: BTreeMap<String, String> = expected_common
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    admin.insert("client.id".to_string(), "millrace-bus-admin".to_string());
    assert_eq!(settings.client_properties(&ClientRole::Admin), admin);
    // The rdkafka configuration is the same map.
    let config = settings.client_config(&ClientRole::Producer);
    assert_eq!(config.get("sasl.password"), Some(SECRET));
    assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
}

#[test]
fn a_properties_file_then_the_environment_then_the_url_each_override_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kafka.properties");
    let key_password = dir.path().join("key-password");
    std::fs::write(&key_password, format!("{OTHER_SECRET}\n")).unwrap();
    std::fs::write(
        &file,
        format!(
            "# Confluent Cloud, from a Secret\n\
             security.protocol = SASL_SSL\n\
             sasl.mechanism=PLAIN\n\
             sasl.username=FILE-USER\n\
             sasl.password={SECRET}\n\
             \n\
             session.timeout.ms=45000\n\
             client.id=from-file\n\
             socket.keepalive.enable=true\n\
             ssl.key.password=file:{}\n",
            key_password.display()
        ),
    )
    .unwrap();
    let url = format!(
        "kafka://pkc-1.example:9092?properties=file:{}&client.id=from-url",
        file.display()
    );
    let settings = parse(
        &url,
        &[
            ("MILLRACE_KAFKA_SASL_USERNAME", "ENV-USER"),
            ("MILLRACE_KAFKA_CLIENT_ID", "from-env"),
            ("MILLRACE_KAFKA_SESSION_TIMEOUT_MS", "30000"),
            ("UNRELATED_SASL_PASSWORD", "ignored"),
        ],
    )
    .unwrap();
    let props = settings.client_properties(&consumer());
    let get = |k: &str| props.get(k).map(String::as_str);
    // The file's literal secret is allowed (the file is the secret); its reference is resolved
    // and the trailing newline dropped.
    assert_eq!(get("sasl.password"), Some(SECRET));
    assert_eq!(get("ssl.key.password"), Some(OTHER_SECRET));
    assert_eq!(get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(get("sasl.mechanism"), Some("PLAIN"));
    assert_eq!(get("socket.keepalive.enable"), Some("true"));
    // environment over file, URL over both.
    assert_eq!(get("sasl.username"), Some("ENV-USER"));
    assert_eq!(get("session.timeout.ms"), Some("30000"));
    assert_eq!(get("client.id"), Some("from-url"));
    // Millrace's own stay.
    assert_eq!(get("group.id"), Some("intake~workers"));
    assert_eq!(get("enable.auto.commit"), Some("false"));
    assert_eq!(get("bootstrap.servers"), Some("pkc-1.example:9092"));
    assert!(!props.contains_key("properties"));

    // The file may also come from the environment.
    let settings = parse(
        "kafka://pkc-1.example:9092",
        &[(
            "MILLRACE_KAFKA_PROPERTIES",
            &format!("file:{}", file.display()),
        )],
    )
    .unwrap();
    assert_eq!(settings.property("sasl.username"), Some("FILE-USER"));
    assert_eq!(settings.property("client.id"), Some("from-file"));
}

#[test]
fn a_literal_secret_in_the_url_or_the_environment_is_refused_naming_the_setting() {
    let e = parse_err(
        &format!(
            "kafka://b:9092?security.protocol=SASL_SSL&sasl.mechanism=PLAIN&sasl.username=u\
             &sasl.password={SECRET}"
        ),
        &[],
    );
    assert!(
        e.contains("sasl.password (bus URL) must be a reference"),
        "{e}"
    );
    let e = parse_err(
        "kafka://b:9092?security.protocol=SASL_SSL&sasl.mechanism=PLAIN&sasl.username=u",
        &[("MILLRACE_KAFKA_SASL_PASSWORD", SECRET)],
    );
    assert!(
        e.contains(
            "sasl.password (environment variable MILLRACE_KAFKA_SASL_PASSWORD) must be a reference"
        ),
        "{e}"
    );
    let e = parse_err(&format!("kafka://b:9092?ssl.key.pem={OTHER_SECRET}"), &[]);
    assert!(
        e.contains("ssl.key.pem (bus URL) must be a reference"),
        "{e}"
    );
    // A reference to nothing names the reference.
    let e = parse_err(
        "kafka://b:9092?security.protocol=SASL_SSL&sasl.mechanism=PLAIN&sasl.username=u\
         &sasl.password=env:MILLRACE_TEST_SURELY_UNSET_KAFKA",
        &[],
    );
    assert!(e.contains("MILLRACE_TEST_SURELY_UNSET_KAFKA"), "{e}");
    // Credentials in the user-info part are refused, redacted.
    let e = parse_err(&format!("kafka://millrace:{SECRET}@b:9092"), &[]);
    assert!(e.contains("credentials do not go in a Kafka URL"), "{e}");
}

#[test]
fn settings_that_cannot_work_are_start_up_errors_naming_the_setting() {
    let password = format!("sasl.password=env:{PASSWORD_VAR}");
    for (url, vars, expected) in [
        (
            format!("kafka://b:9092?security.protocol=SASL_SSL&sasl.username=u&{password}"),
            vec![],
            "security.protocol=SASL_SSL needs sasl.mechanism",
        ),
        (
            "kafka://b:9092?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-256&sasl.username=u"
                .to_string(),
            vec![],
            "sasl.mechanism=SCRAM-SHA-256 needs sasl.password",
        ),
        (
            format!("kafka://b:9092?sasl.mechanism=PLAIN&sasl.username=u&{password}"),
            vec![],
            "sasl.mechanism (bus URL) is set but security.protocol is PLAINTEXT",
        ),
        (
            "kafka://b:9092?security.protocol=SASL_SSL&sasl.mechanism=GSSAPI".to_string(),
            vec![],
            "sasl.mechanism (bus URL): \"GSSAPI\" is not supported",
        ),
        (
            "kafka://b:9092?security.protocol=SASL_SSL&sasl.mechanism=OAUTHBEARER\
             &sasl.oauthbearer.method=oidc"
                .to_string(),
            vec![],
            "sasl.oauthbearer.method (bus URL)=oidc needs librdkafka built with curl",
        ),
        (
            "kafka://b:9092?security.protocol=TLS".to_string(),
            vec![],
            "security.protocol (bus URL) must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        ),
        (
            "kafka://b:9092?security.protocol=SSL&ssl.ca.location=/nonexistent/millrace/ca.pem"
                .to_string(),
            vec![],
            "ssl.ca.location (bus URL): cannot read /nonexistent/millrace/ca.pem",
        ),
        (
            "kafka://b:9092?security.protocol=SSL".to_string(),
            vec![("MILLRACE_KAFKA_SSL_CERTIFICATE_LOCATION", "/nonexistent/client.pem")],
            "ssl.certificate.location (environment variable \
             MILLRACE_KAFKA_SSL_CERTIFICATE_LOCATION): cannot read /nonexistent/client.pem",
        ),
        (
            "kafka://b:9092?partitions=0".to_string(),
            vec![],
            "partitions (bus URL) must be a positive number",
        ),
        (
            "kafka://b:9092?partitoins=3".to_string(),
            vec![],
            "unknown parameter partitoins (bus URL)",
        ),
        (
            "kafka://b:9092".to_string(),
            vec![("MILLRACE_KAFKA_PARTITONS", "3")],
            "unknown parameter partitons (environment variable MILLRACE_KAFKA_PARTITONS)",
        ),
        (
            "kafka://b:9092?properties=/etc/kafka.properties".to_string(),
            vec![],
            "properties (bus URL) must be `file:PATH`",
        ),
        (
            "kafka://b:9092?properties=file:/nonexistent/kafka.properties".to_string(),
            vec![],
            "properties file /nonexistent/kafka.properties",
        ),
    ] {
        let vars: Vec<(&str, &str)> = vars;
        let e = parse_err(&url, &vars);
        assert!(e.contains(expected), "{url}: expected {expected:?} in {e}");
    }
}

#[test]
fn properties_millrace_sets_itself_cannot_be_overridden() {
    for name in RESERVED_PROPERTIES {
        let e = parse_err(&format!("kafka://b:9092?{name}=x"), &[]);
        assert!(
            e.contains(&format!("Millrace sets {name} itself")),
            "{name}: {e}"
        );
    }
    let e = parse_err("kafka://b:9092", &[("MILLRACE_KAFKA_GROUP_ID", "mine")]);
    assert!(e.contains("Millrace sets group.id itself"), "{e}");
}

#[test]
fn librdkafka_refusing_a_property_names_it_but_not_its_value() {
    let e = parse_err("kafka://b:9092?ssl.no.such.property=whatever", &[]);
    assert!(e.contains("ssl.no.such.property"), "{e}");
    // A bad value of a secret property (from a file, where literals are allowed).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.properties");
    std::fs::write(&file, format!("sasl.oauthbearer.confgi={SECRET}\n")).unwrap();
    let e = parse_err(
        &format!("kafka://b:9092?properties=file:{}", file.display()),
        &[],
    );
    assert!(e.contains("sasl.oauthbearer.confgi"), "{e}");
    // A value librdkafka rejects is not repeated by the reason (the URL shows what it shows,
    // secrets redacted).
    let e = parse_err("kafka://b:9092?socket.timeout.ms=not-a-number-xyz", &[]);
    let reason = e.split_once("librdkafka refuses").map_or("", |(_, r)| r);
    assert!(reason.contains("socket.timeout.ms (bus URL)"), "{e}");
    assert!(!reason.contains("not-a-number-xyz"), "{e}");
}

#[test]
fn a_bad_properties_file_line_names_the_line_not_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.properties");
    std::fs::write(&file, format!("# ok\nsasl.username=u\n{SECRET}\n")).unwrap();
    let e = parse_err(
        &format!("kafka://b:9092?properties=file:{}", file.display()),
        &[],
    );
    assert!(e.contains("line 3: expected property=value"), "{e}");
}

/// Against a port where nothing listens, a SASL_SSL bus with a password fails at start-up
/// without the password anywhere in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_sasl_ssl_broker_fails_without_the_secret() {
    setup();
    let url = format!(
        "kafka://127.0.0.1:1?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512\
         &sasl.username=millrace&sasl.password=env:{PASSWORD_VAR}&socket.timeout.ms=2000"
    );
    let e = KafkaBus::connect(&url).await.err().map(|e| e.to_string());
    let e = e.unwrap_or_default();
    assert!(e.contains("cannot reach Kafka at 127.0.0.1:1"), "{e}");
    assert!(!e.contains(SECRET), "{e}");
}
