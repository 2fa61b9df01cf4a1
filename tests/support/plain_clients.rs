//! Test support: publishing with each broker's own client crate, the way an outside producer
//! would, straight onto the broker names Millrace consumes (no Millrace bus code on the way):
//! lapin, async-nats, rdkafka, aws-sdk-sns and google-cloud-pubsub. Attributes go out as the
//! broker's plain headers or message attributes (string values).
#![allow(dead_code)]

use std::time::Duration;

use super::hostile::Sent;

/// RabbitMQ: each topic is a fanout exchange of the same name; attributes are long-string headers.
/// Publisher confirms, so every message is on the broker when this returns.
pub async fn publish_amqp(url: &str, sent: &[Sent]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("lapin: connecting to {url}: {e}"));
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for s in sent {
        for item in &s.items {
            let mut headers = FieldTable::default();
            for (k, v) in &item.attributes {
                headers.insert(
                    k.as_str().into(),
                    AMQPValue::LongString(LongString::from(v.as_bytes())),
                );
            }
            let confirm = channel
                .basic_publish(
                    s.topic.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &item.body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers),
                )
                .await
                .unwrap_or_else(|e| panic!("lapin: publishing {} to {}: {e}", item.id, s.topic))
                .await
                .unwrap_or_else(|e| panic!("lapin: confirm of {} on {}: {e}", item.id, s.topic));
            assert!(
                confirm.is_ack(),
                "RabbitMQ refused {} on {}",
                item.id,
                s.topic
            );
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

/// The NATS server's `max_payload` (headers and body together).
pub async fn nats_max_payload(url: &str) -> usize {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("async-nats: connecting to {url}: {e}"));
    client.server_info().max_payload
}

/// NATS JetStream: each topic is the subject itself (its stream exists once the service started);
/// attributes are headers. Waits for each stream ack.
pub async fn publish_nats(url: &str, sent: &[Sent]) {
    let client = async_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("async-nats: connecting to {url}: {e}"));
    let js = async_nats::jetstream::new(client.clone());
    for s in sent {
        for item in &s.items {
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in &item.attributes {
                headers.insert(k.as_str(), v.as_str());
            }
            js.publish_with_headers(s.topic.clone(), headers, item.body.clone())
                .await
                .unwrap_or_else(|e| {
                    panic!("async-nats: publishing {} to {}: {e}", item.id, s.topic)
                })
                .await
                .unwrap_or_else(|e| panic!("async-nats: ack of {} on {}: {e}", item.id, s.topic));
        }
    }
    let _ = client.flush().await;
}

/// Kafka: each topic is the Kafka topic of the same name; attributes are record headers. Waits for
/// each delivery report.
pub async fn publish_kafka(bootstrap: &str, sent: &[Sent]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap_or_else(|e| panic!("rdkafka: producer for {bootstrap}: {e}"));
    for s in sent {
        for item in &s.items {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &item.attributes {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let record = FutureRecord::<(), [u8]>::to(&s.topic)
                .payload(&item.body[..])
                .headers(headers);
            producer
                .send(record, Duration::from_secs(30))
                .await
                .unwrap_or_else(|(e, _)| {
                    panic!("rdkafka: publishing {} to {}: {e}", item.id, s.topic)
                });
        }
    }
}

/// SNS (on moto at `endpoint`): each topic is the SNS topic `sns_sqs::topic_name(topic)`, found by
/// listing; attributes are `String` message attributes; the body is the message text.
pub async fn publish_sns(endpoint: &str, sent: &[Sent]) {
    use aws_sdk_sns::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_sns::types::MessageAttributeValue;

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = aws_sdk_sns::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    let sns = aws_sdk_sns::Client::from_conf(config);
    let mut arns = Vec::new();
    let mut token = None;
    loop {
        let page = sns
            .list_topics()
            .set_next_token(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("aws-sdk-sns: listing topics: {e:?}"));
        arns.extend(
            page.topics()
                .iter()
                .filter_map(|t| t.topic_arn().map(str::to_string)),
        );
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    for s in sent {
        let name = millrace_bus::sns_sqs::topic_name(&s.topic);
        let arn = arns
            .iter()
            .find(|a| a.rsplit(':').next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("SNS topic {name} (for {}) does not exist", s.topic));
        for item in &s.items {
            let text = std::str::from_utf8(&item.body).expect("SNS carries text only");
            let mut request = sns.publish().topic_arn(arn).message(text);
            for (k, v) in &item.attributes {
                request = request.message_attributes(
                    k,
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(v)
                        .build()
                        .unwrap(),
                );
            }
            request
                .send()
                .await
                .unwrap_or_else(|e| panic!("aws-sdk-sns: publishing {} to {name}: {e:?}", item.id));
        }
    }
}

/// Pub/Sub (on the emulator at `host`, `HOST:PORT`): each topic is
/// `projects/{project}/topics/{pubsub::topic_id(topic)}`; attributes are message attributes.
/// Waits for each message id.
pub async fn publish_pubsub(host: &str, project: &str, sent: &[Sent]) {
    use google_cloud_pubsub::client::Publisher;
    use google_cloud_pubsub::model::Message;

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    for s in sent {
        let path = format!(
            "projects/{project}/topics/{}",
            millrace_bus::pubsub::topic_id(&s.topic)
        );
        let publisher = Publisher::builder(&path)
            .with_endpoint(format!("http://{host}"))
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
            .build()
            .await
            .unwrap_or_else(|e| panic!("google-cloud-pubsub: publisher for {path}: {e}"));
        for item in &s.items {
            let message = Message::new()
                .set_data(item.body.clone())
                .set_attributes(item.attributes.clone());
            publisher.publish(message).await.unwrap_or_else(|e| {
                panic!("google-cloud-pubsub: publishing {} to {path}: {e}", item.id)
            });
        }
    }
}
