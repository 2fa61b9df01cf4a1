//! Logging and tracing. Logs: structured fields, `RUST_LOG`-style filtering (`info` by default),
//! and JSON lines when `MILLRACE_LOG_FORMAT=json` (what log collectors in Kubernetes and the
//! clouds expect).
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! every span also goes to that OpenTelemetry collector over OTLP/HTTP (protobuf), named by
//! `OTEL_SERVICE_NAME` (the binary's name otherwise), with the other standard `OTEL_*` variables
//! (headers, timeout, `OTEL_RESOURCE_ATTRIBUTES`) honoured. Spans are batched and sent from a
//! thread of their own; [`shutdown`] sends what is left, and every service calls it on its way
//! out. The trace context travels between services in each message's attributes
//! ([`crate::propagation`]).

use std::sync::{Mutex, OnceLock};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The variables that turn OTLP export on (the OpenTelemetry standard names).
pub const OTLP_ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

static PROVIDER: OnceLock<Mutex<Option<SdkTracerProvider>>> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn exporting() -> bool {
    OTLP_ENDPOINT_VARIABLES
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs the global subscriber once (logs, and OTLP export if configured); later calls do
/// nothing.
pub fn init_logging(default_filter: &str) {
    if PROVIDER.get().is_some() {
        return;
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("MILLRACE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let (provider, problem) = if exporting() {
        match otlp_provider() {
            Ok(provider) => (Some(provider), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let otel = provider.as_ref().map(|p| {
        let name = service_name();
        tracing_opentelemetry::layer().with_tracer(p.tracer(name))
    });
    let _ = PROVIDER.set(Mutex::new(provider));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    if let Some(e) = problem {
        tracing::error!(error = %e, "cannot export traces over OTLP; running without");
    } else if exporting() && installed {
        tracing::info!(service = %service_name(), "exporting traces over OTLP");
    }
}

fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "millrace".to_string())
}

fn otlp_provider() -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let resource = Resource::builder()
        .with_service_name(service_name())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Sends the spans not yet exported and stops the exporter (a no-op without one). Call once, at
/// the end of `main`.
pub fn shutdown() {
    let provider = PROVIDER
        .get()
        .and_then(|p| p.lock().ok().and_then(|mut p| p.take()));
    if let Some(provider) = provider {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "sending the last spans over OTLP");
        }
    }
}
