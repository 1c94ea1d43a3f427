//! Logs to stderr (`RUST_LOG`, default `info`), human-readable or JSON lines, and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans to an OpenTelemetry collector over OTLP: gRPC
//! unless `OTEL_EXPORTER_OTLP_PROTOCOL` (or `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`) says
//! `http/protobuf`. Without an endpoint no OpenTelemetry layer is installed at all. An
//! `https://` endpoint is reached over TLS, trusting the system's CAs, and the CA in the PEM file
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` when it is set.
//!
//! A log line written inside an order's spans carries its `trace_id` (a field every such span
//! has, see `ordo_eventstore::trace`), in either format.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{
    Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig,
    tonic_types::transport::{Certificate, ClientTlsConfig},
};
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

/// The CA certificate (PEM) of the collector, from `OTEL_EXPORTER_OTLP_CERTIFICATE` (or its
/// `_TRACES_` form), as the OpenTelemetry specification names it.
fn collector_ca() -> anyhow::Result<Option<Vec<u8>>> {
    let Ok(file) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_CERTIFICATE"))
    else {
        return Ok(None);
    };
    std::fs::read(&file)
        .map(Some)
        .with_context(|| format!("OTEL_EXPORTER_OTLP_CERTIFICATE={file}: cannot read it"))
}

/// An HTTP client for the OTLP/HTTP exporter that also trusts `ca`. The exporter calls it from
/// its own thread, so it is the blocking client, built off the async runtime.
fn http_client_trusting(ca: &[u8]) -> anyhow::Result<reqwest_otlp::blocking::Client> {
    let ca = reqwest_otlp::Certificate::from_pem(ca)
        .context("OTEL_EXPORTER_OTLP_CERTIFICATE is not a PEM certificate")?;
    std::thread::spawn(move || {
        reqwest_otlp::blocking::Client::builder()
            .add_root_certificate(ca)
            .timeout(std::time::Duration::from_secs(10))
            .build()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))?
    .context("building the OTLP HTTP client")
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
    let ca = collector_ca()?;
    let exporter = match protocol()? {
        Protocol::Grpc => {
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let https = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .is_ok_and(|endpoint| endpoint.starts_with("https://"));
            let builder = if https {
                let tls = ClientTlsConfig::new().with_enabled_roots();
                builder.with_tls_config(match &ca {
                    Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
                    None => tls,
                })
            } else {
                builder
            };
            builder.build()
        }
        protocol => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol);
            match &ca {
                Some(pem) => builder.with_http_client(http_client_trusting(pem)?),
                None => builder,
            }
            .build()
        }
    }
    .context("setting up the OTLP span exporter")?;
    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "ordo".into());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build())
}
