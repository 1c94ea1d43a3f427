//! Logs to stderr (`RUST_LOG`, default `info`), human-readable or JSON lines, and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans to an OpenTelemetry collector over OTLP: gRPC
//! unless `OTEL_EXPORTER_OTLP_PROTOCOL` (or `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`) says
//! `http/protobuf`. Without an endpoint no OpenTelemetry layer is installed at all.
//!
//! A log line written inside an order's spans carries its `trace_id` (a field every such span
//! has, see `ordo_eventstore::trace`), in either format.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event, with the fields of the spans it happened in.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`, `spans`).
    Json,
}

/// Flushes the exported spans when dropped.
pub struct Telemetry(Option<SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// `quiet`: for client commands, whose output is the reply; only warnings go to stderr and no
/// spans are exported.
pub fn init(quiet: bool, format: LogFormat) -> anyhow::Result<Telemetry> {
    // sqlx reports PostgreSQL's "already exists, skipping" notices at info: not news.
    let default = if quiet {
        "warn"
    } else {
        "info,sqlx::postgres::notice=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !quiet && !endpoint.is_empty() => Some(tracer_provider()?),
        _ => None,
    };
    ordo_eventstore::trace::set_exporting(provider.is_some());
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("ordo")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    Ok(Telemetry(provider))
}

/// The protocol the OTLP exporter speaks, as the OpenTelemetry environment variables name it.
fn protocol() -> anyhow::Result<Protocol> {
    let named = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "grpc".into());
    match named.as_str() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpBinary),
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported: use grpc or http/protobuf"
        ),
    }
}

/// Exports spans in batches on a thread of its own; the endpoint, headers and timeouts come from
/// the standard `OTEL_EXPORTER_OTLP_*` variables, `service.name` from `OTEL_SERVICE_NAME`
/// (default `ordo`).
fn tracer_provider() -> anyhow::Result<SdkTracerProvider> {
    let exporter = match protocol()? {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build(),
        protocol => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build(),
    }
    .context("setting up the OTLP span exporter")?;
    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "ordo".into());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}
