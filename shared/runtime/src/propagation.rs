//! Trace context across topics: what a service publishes carries its span's W3C `traceparent`
//! (and `tracestate`, when there is one) in the message attributes, and the worker loop
//! continues that trace in the span of handling the delivery. Spans follow OpenTelemetry's
//! messaging conventions: a producer span `send {topic}` around each publish and a consumer span
//! `process {topic}` around each delivery, with the system, destination, operation, consumer
//! group and message id as attributes.
//!
//! A batch has one trace from the moment the ingestor writes it: its trace id is derived from
//! the aggregation and the batch's name ([`batch_context`]), so the ingestor, the
//! workflow-manager publishing its intake task and the intake-worker validating it all land in
//! it without passing anything through storage. A window's tasks (one aggregate task covers all
//! of a window's batches, one collect task both sum parts) have a trace of their own, derived the
//! same way from the window ([`window_context`]), and link to each batch's trace.

use millrace_bus::{Attributes, Bus, BusError, Message};
use opentelemetry::propagation::{Extractor, Injector};
pub use opentelemetry::trace::SpanContext;
use opentelemetry::trace::{SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use sha2::{Digest, Sha256};
use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace-context attribute names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

struct Inject<'a>(&'a mut Attributes);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing and would spend one of SNS's ten attributes.
        if !value.is_empty() {
            self.0.insert(key.to_string(), value);
        }
    }
}

struct Extract<'a>(&'a Attributes);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Adds the current span's trace context to `attributes` (nothing when traces are not exported).
pub fn inject(attributes: &mut Attributes) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Inject(attributes))
    });
}

/// The trace context carried in `attributes` (an empty context if there is none or it is not
/// valid W3C trace context).
pub fn extract(attributes: &Attributes) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(attributes)))
}

/// The span context a message's attributes carry, if a valid one.
pub fn carried(attributes: &Attributes) -> Option<SpanContext> {
    let cx = extract(attributes);
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// A remote, sampled span context whose ids are derived from `parts`: the same parts give the
/// same trace in every process.
fn derived_context(parts: &[&str]) -> SpanContext {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    trace.copy_from_slice(&digest[..16]);
    span.copy_from_slice(&digest[16..24]);
    SpanContext::new(
        TraceId::from_bytes(trace),
        SpanId::from_bytes(span),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// The trace of one batch of `aggregation` (`batch`: its name in the store).
pub fn batch_context(aggregation: &str, batch: &str) -> SpanContext {
    derived_context(&["millrace batch", aggregation, batch])
}

/// The trace of one window of `aggregation`.
pub fn window_context(aggregation: &str, window: &str) -> SpanContext {
    derived_context(&["millrace window", aggregation, window])
}

/// Makes `parent` the parent of `span` (a no-op when traces are not exported).
pub fn set_parent(span: &tracing::Span, parent: SpanContext) {
    let cx = opentelemetry::Context::new().with_remote_span_context(parent);
    let _ = span.set_parent(cx);
}

/// Links the current span to `other` (one task that covers many messages or batches).
pub fn link(other: SpanContext) {
    tracing::Span::current().add_link(other);
}

/// Names what the current task works on, as fields of its span (in the logs and the trace).
/// The worker loop's span declares them; elsewhere this does nothing.
pub fn record_subject(aggregation: &str, window: Option<&str>, batch: Option<&str>) {
    let span = tracing::Span::current();
    span.record("aggregation", aggregation);
    if let Some(window) = window {
        span.record("window", window);
    }
    if let Some(batch) = batch {
        span.record("batch", batch);
    }
}

/// The span of handling one delivery (`process {topic}`, kind consumer), continuing the trace its
/// attributes carry. `aggregation`, `window` and `batch` are declared for the handler to record
/// ([`record_subject`]).
pub fn consumer_span(
    system: &str,
    topic: &str,
    group: &str,
    message_id: &str,
    attempt: u32,
    attributes: &Attributes,
) -> tracing::Span {
    let span = tracing::info_span!(
        "task",
        otel.name = %format!("process {topic}"),
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = topic,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.consumer.group.name = group,
        messaging.message.id = message_id,
        topic,
        message_id,
        attempt,
        aggregation = Empty,
        window = Empty,
        batch = Empty,
    );
    if let Some(parent) = carried(attributes) {
        set_parent(&span, parent);
    }
    span
}

/// Publishes `message` to `topic` in a producer span (`send {topic}`) whose trace context the
/// message carries. Inside a task's span the send is its child; `subject` (a batch's or a
/// window's trace) makes it a step of that trace instead, with the current span linked.
pub async fn publish(
    bus: &dyn Bus,
    topic: &str,
    mut message: Message,
    subject: Option<SpanContext>,
) -> Result<String, BusError> {
    let span = tracing::info_span!(
        "send",
        otel.name = %format!("send {topic}"),
        otel.kind = "producer",
        messaging.system = bus.name(),
        messaging.destination.name = topic,
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.message.id = Empty,
    );
    if let Some(subject) = subject {
        let current = tracing::Span::current().context();
        let current = current.span().span_context().clone();
        set_parent(&span, subject);
        if current.is_valid() {
            span.add_link(current);
        }
    }
    async move {
        inject(&mut message.attributes);
        let id = bus.publish(topic, message).await?;
        tracing::Span::current().record("messaging.message.id", id.as_str());
        Ok(id)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_contexts_are_stable_valid_and_distinct() {
        let a = batch_context("agg", "2026/11/28/20/x.batch");
        assert!(a.is_valid());
        assert_eq!(a, batch_context("agg", "2026/11/28/20/x.batch"));
        assert_ne!(
            a.trace_id(),
            batch_context("agg", "2026/11/28/20/y.batch").trace_id()
        );
        assert_ne!(
            a.trace_id(),
            batch_context("agg2", "2026/11/28/20/x.batch").trace_id()
        );
        // Part boundaries count: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            batch_context("ab", "c").trace_id(),
            batch_context("a", "bc").trace_id()
        );
        assert_ne!(
            window_context("agg", "w").trace_id(),
            batch_context("agg", "w").trace_id()
        );
    }

    #[test]
    fn trace_context_round_trips_through_attributes() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let sc = batch_context("agg", "b");
        let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
        let mut attributes = Attributes::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut Inject(&mut attributes))
        });
        let parent = attributes.get(TRACEPARENT).cloned().unwrap_or_default();
        assert_eq!(
            parent,
            format!("00-{}-{}-01", sc.trace_id(), sc.span_id()),
            "{attributes:?}"
        );
        // An empty tracestate is not sent.
        assert!(!attributes.contains_key(TRACESTATE), "{attributes:?}");
        let back = carried(&attributes).expect("a valid context");
        assert_eq!(back.trace_id(), sc.trace_id());
        assert_eq!(back.span_id(), sc.span_id());
        // Garbage is no context.
        let mut bad = Attributes::new();
        bad.insert(TRACEPARENT.into(), "00-zz-yy-01".into());
        assert!(carried(&bad).is_none());
    }
}
