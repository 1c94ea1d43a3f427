//! Logs to stderr (`RUST_LOG`, default `info`) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! traces to an OpenTelemetry collector over OTLP/gRPC.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Flushes the exported spans when dropped.
pub struct Telemetry(Option<SdkTracerProvider>);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

/// `quiet`: for client commands, whose output is the reply; only warnings go to stderr.
pub fn init(quiet: bool) -> anyhow::Result<Telemetry> {
    // sqlx reports PostgreSQL's "already exists, skipping" notices at info: not news.
    let default = if quiet {
        "warn"
    } else {
        "info,sqlx::postgres::notice=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(_) if !quiet => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name("ordo").build())
                    .build(),
            )
        }
        _ => None,
    };
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
