//! The reference side of `millrace bench bus`: the plainest loop each client crate allows against
//! the same broker, with the same delivery guarantees as the bus backend, so the worker loop can be
//! reported as a fraction of it.
//!
//! Each function publishes `messages` bodies of `body_size` bytes from `publishers` concurrent
//! tasks (each publish waits for the broker's confirmation, as the backends do), with the publish
//! time in the [`SENT_AT`] header; one consumer records publish→received latency, settles each
//! message as it arrives, and stops when it has them all. Throughput counts from the first publish
//! to the last receipt. What each function creates on the broker it deletes at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;

use crate::bench::{summarize, unix_nanos, BusBench, SENT_AT};

/// How long the consumer may take to receive every message.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// A body of `size` bytes (the same shape `bench_bus_worker` publishes).
fn body(size: usize) -> Vec<u8> {
    std::iter::once(b'{')
        .chain(std::iter::repeat_n(b'x', size.saturating_sub(2)))
        .chain(std::iter::once(b'}'))
        .collect()
}

/// How many messages each of `publishers` tasks publishes (the split `bench_bus_worker` uses).
fn shares(messages: usize, publishers: usize) -> Vec<usize> {
    let publishers = publishers.max(1);
    let per = messages.div_ceil(publishers);
    (0..publishers)
        .map(|p| per.min(messages.saturating_sub(p * per)))
        .collect()
}

/// Milliseconds since `sent` (unix nanoseconds, as text).
fn latency_ms(sent: Option<&str>) -> f64 {
    let sent: u128 = sent.and_then(|s| s.parse().ok()).unwrap_or(0);
    unix_nanos().saturating_sub(sent) as f64 / 1e6
}

/// Waits for the publishers, then for the receiver; returns the latencies.
async fn finish(
    pubs: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    receiver: tokio::task::JoinHandle<anyhow::Result<Vec<f64>>>,
) -> anyhow::Result<Vec<f64>> {
    let abort = receiver.abort_handle();
    for p in pubs {
        if let Err(e) = p.await.map_err(anyhow::Error::from).and_then(|r| r) {
            abort.abort();
            return Err(e.context("publishing"));
        }
    }
    match tokio::time::timeout(RECEIVE_TIMEOUT, receiver).await {
        Ok(joined) => joined?.context("receiving"),
        Err(_) => {
            abort.abort();
            anyhow::bail!("the consumer did not receive every message within {RECEIVE_TIMEOUT:?}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ (lapin)

/// RabbitMQ: a durable quorum queue (the queue type the AMQP backend declares), publisher confirms,
/// persistent messages to the queue through the default exchange, one consumer with
/// `basic_qos(prefetch)` acking each delivery as it arrives.
pub async fn reference_amqp(
    url: &str,
    topic: &str,
    messages: usize,
    body_size: usize,
    publishers: usize,
    prefetch: u16,
) -> anyhow::Result<BusBench> {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", millrace_secrets::redact(url)))?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = ShortString::try_new(topic).context("queue name")?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    publisher
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .with_context(|| format!("declaring queue {topic}"))?;

    let run = async {
        let consuming = connection.create_channel().await?;
        consuming
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = consuming
            .basic_consume(
                queue.clone(),
                "millrace-reference".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            while latencies.len() < messages {
                let delivery = consumer
                    .next()
                    .await
                    .context("the consumer was cancelled")??;
                let sent = match delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(SENT_AT))
                {
                    Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
                    _ => None,
                };
                latencies.push(latency_ms(sent));
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            anyhow::Ok(latencies)
        });

        let payload = Arc::new(body(body_size));
        let start = Instant::now();
        let mut pubs = Vec::new();
        for count in shares(messages, publishers) {
            let (channel, queue, payload) = (publisher.clone(), queue.clone(), payload.clone());
            pubs.push(tokio::spawn(async move {
                for _ in 0..count {
                    let mut headers = FieldTable::default();
                    headers.insert(
                        SENT_AT.into(),
                        AMQPValue::LongString(unix_nanos().to_string().into()),
                    );
                    let properties = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers);
                    let confirmation = channel
                        .basic_publish(
                            ShortString::default(),
                            queue.clone(),
                            BasicPublishOptions::default(),
                            &payload,
                            properties,
                        )
                        .await?
                        .await?;
                    anyhow::ensure!(confirmation.is_ack(), "the broker nacked a message");
                }
                anyhow::Ok(())
            }));
        }
        let latencies = finish(pubs, receiver).await?;
        let elapsed = start.elapsed();
        consuming.close(200, "done".into()).await?;
        anyhow::Ok(summarize(latencies, elapsed))
    };
    let result = run.await;

    publisher
        .queue_delete(queue, QueueDeleteOptions::default())
        .await
        .with_context(|| format!("deleting queue {topic}"))?;
    connection.close(200, "done".into()).await?;
    result
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream (async-nats)

/// NATS JetStream: a file-storage stream whose only subject is `topic`, a durable pull consumer
/// with explicit ack, publishes that wait for the PubAck, and one consumer fetching batches of
/// `prefetch` and acking each message as it arrives.
pub async fn reference_nats(
    url: &str,
    topic: &str,
    messages: usize,
    body_size: usize,
    publishers: usize,
    prefetch: usize,
) -> anyhow::Result<BusBench> {
    use async_nats::jetstream::{self, consumer, stream};

    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {}", millrace_secrets::redact(url)))?;
    let js = jetstream::new(client);
    let name = format!("reference-{topic}");
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![topic.to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name}"))?;

    let run = async {
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some("reference".to_string()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .context("creating the consumer")?;
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            while latencies.len() < messages {
                let mut batch = consumer
                    .batch()
                    .max_messages(prefetch.max(1).min(messages - latencies.len()))
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await?;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| anyhow::anyhow!(e))?;
                    let sent = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(SENT_AT))
                        .map(|v| v.as_str());
                    latencies.push(latency_ms(sent));
                    message.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                }
            }
            anyhow::Ok(latencies)
        });

        let payload = millrace_bus::Bytes::from(body(body_size));
        let start = Instant::now();
        let mut pubs = Vec::new();
        for count in shares(messages, publishers) {
            let (js, topic, payload) = (js.clone(), topic.to_string(), payload.clone());
            pubs.push(tokio::spawn(async move {
                for _ in 0..count {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(SENT_AT, unix_nanos().to_string().as_str());
                    js.publish_with_headers(topic.clone(), headers, payload.clone())
                        .await?
                        .await?;
                }
                anyhow::Ok(())
            }));
        }
        let latencies = finish(pubs, receiver).await?;
        anyhow::Ok(summarize(latencies, start.elapsed()))
    };
    let result = run.await;

    js.delete_stream(&name)
        .await
        .with_context(|| format!("deleting stream {name}"))?;
    result
}

// ---------------------------------------------------------------------------------------------
// Kafka (rdkafka)

/// Kafka: a one-partition topic created with the admin client, a `FutureProducer` with
/// `acks=all` awaiting each delivery report, and a `StreamConsumer` in a fresh group
/// (`auto.offset.reset=earliest`, `enable.auto.commit=false`) committing each offset
/// asynchronously after receiving it. Publishing starts once the group has assigned the partition.
pub async fn reference_kafka(
    bootstrap: &str,
    topic: &str,
    messages: usize,
    body_size: usize,
    publishers: usize,
) -> anyhow::Result<BusBench> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for created in admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .with_context(|| format!("creating topic {topic} at {bootstrap}"))?
    {
        created.map_err(|(t, code)| anyhow::anyhow!("creating topic {t}: {code}"))?;
    }

    let run = async {
        // linger.ms as the Kafka backend sets it: librdkafka's default (5 ms) would add to every
        // awaited publish.
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .context("creating the producer")?;
        let consumer: Arc<StreamConsumer> = Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("group.id", format!("{topic}-reference"))
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "false")
                // As the Kafka backend sets them: with librdkafka's defaults, joining the group
                // on tansu takes over 20 s (before the clock starts, but still).
                .set("session.timeout.ms", "3000")
                .set("heartbeat.interval.ms", "300")
                .create()
                .context("creating the consumer")?,
        );
        consumer.subscribe(&[topic])?;
        let receiving = consumer.clone();
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            while latencies.len() < messages {
                let message = receiving.recv().await?;
                let sent = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == SENT_AT))
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok());
                latencies.push(latency_ms(sent));
                receiving.commit_message(&message, CommitMode::Async)?;
            }
            anyhow::Ok(latencies)
        });
        // The group join happens while the receiver polls; publish once it has the partition.
        let joined_by = Instant::now() + Duration::from_secs(30);
        while consumer.assignment()?.count() == 0 {
            if receiver.is_finished() || Instant::now() > joined_by {
                receiver.abort();
                anyhow::bail!("the consumer was not assigned {topic} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let payload = Arc::new(body(body_size));
        let start = Instant::now();
        let mut pubs = Vec::new();
        for count in shares(messages, publishers) {
            let (producer, topic, payload) = (producer.clone(), topic.to_string(), payload.clone());
            pubs.push(tokio::spawn(async move {
                for _ in 0..count {
                    let sent = unix_nanos().to_string();
                    let record = FutureRecord::<(), [u8]>::to(&topic)
                        .payload(payload.as_slice())
                        .headers(OwnedHeaders::new().insert(Header {
                            key: SENT_AT,
                            value: Some(sent.as_str()),
                        }));
                    producer
                        .send(record, Duration::from_secs(5))
                        .await
                        .map_err(|(e, _)| e)?;
                }
                anyhow::Ok(())
            }));
        }
        let latencies = finish(pubs, receiver).await?;
        let elapsed = start.elapsed();
        consumer.unsubscribe();
        anyhow::Ok(summarize(latencies, elapsed))
    };
    let result = run.await;

    for deleted in admin
        .delete_topics(&[topic], &options)
        .await
        .with_context(|| format!("deleting topic {topic}"))?
    {
        deleted.map_err(|(t, code)| anyhow::anyhow!("deleting topic {t}: {code}"))?;
    }
    result
}
