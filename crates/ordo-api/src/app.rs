//! The routes, the state they share, and the listener.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{Router, middleware, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use moka::future::Cache;
use sqlx::PgPool;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{self, AccessTokens},
    bodies::{Order, Stock},
    checkpoints::CheckpointSignals,
    ops,
    reads::{self, RowCache},
};

#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    /// For stream heads (`/projections`) and readiness.
    pub nats: async_nats::Client,
    /// How long a read with `min_seq` waits for its view.
    pub min_seq_wait: Duration,
    /// The partitions of the views (the projectors' count): a read of one order or SKU with
    /// `min_seq` waits for its partition only.
    pub partitions: u32,
    /// Reads served at once, those waiting for `min_seq` included. Each holds a connection and
    /// memory (and may wait for a database connection, or up to `min_seq_wait` for its view);
    /// past this bound a read is answered 503 with `Retry-After` at once, as `order.place` sheds
    /// load. Health, readiness and metrics are not counted: they answer under any load.
    pub reads_in_flight: Arc<tokio::sync::Semaphore>,
    /// Hot orders and SKUs, with the checkpoint their view had when they were read.
    pub orders_cache: RowCache<Order>,
    pub stock_cache: RowCache<Stock>,
    pub metrics: PrometheusHandle,
    /// Wakes reads waiting for `min_seq` when a projector commits a batch.
    pub checkpoints: CheckpointSignals,
    /// The stream definitions of this deployment: `/readyz` says how running streams differ.
    pub streams: Vec<ordo_eventstore::StreamDefinition>,
    /// The bearer tokens the API asks for (none by default).
    pub tokens: AccessTokens,
    /// The console's link to a trace viewer: a URL with `{trace_id}` in it (none by default).
    pub trace_url: Option<String>,
    /// The rebuilds the console started in this process.
    pub rebuilds: crate::console::Rebuilds,
    /// When `order.place` sheds load (the command service's bounds, for the console to show
    /// how near they are).
    pub shed_bounds: ShedBounds,
}

/// The backlogs over which the command service sheds `order.place`.
#[derive(Debug, Clone, Copy)]
pub struct ShedBounds {
    pub saga_backlog: u64,
    pub projection_lag: u64,
}

impl Default for ShedBounds {
    /// The command service's defaults.
    fn default() -> Self {
        Self {
            saga_backlog: 5_000,
            projection_lag: 50_000,
        }
    }
}

impl ApiState {
    /// `pool` must already be prepared (the saga's and the projections' tables and the views:
    /// `ordo_app::database::prepare`). Call it inside a Tokio runtime: it starts listening for
    /// checkpoint announcements.
    pub fn new(pool: PgPool, nats: async_nats::Client) -> Self {
        let views = ordo_projections::View::ALL.map(ordo_projections::View::name);
        Self {
            checkpoints: CheckpointSignals::listen(pool.clone(), &views),
            pool,
            nats,
            min_seq_wait: Duration::from_secs(5),
            partitions: ordo_eventstore::partition::DEFAULT_PARTITIONS,
            reads_in_flight: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_READS_IN_FLIGHT)),
            orders_cache: hot_rows(),
            stock_cache: hot_rows(),
            metrics: prometheus(),
            streams: ordo_eventstore::StreamDefinition::built_in(),
            tokens: AccessTokens::default(),
            trace_url: None,
            rebuilds: Default::default(),
            shed_bounds: ShedBounds::default(),
        }
    }
}

/// A cache of hot rows: a row is read again from its view at least every second.
fn hot_rows<T: Clone + Send + Sync + 'static>() -> RowCache<T> {
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(Duration::from_secs(1))
        .build()
}

/// Reads served at once, by default.
pub const DEFAULT_MAX_READS_IN_FLIGHT: usize = 1024;

/// Bucket bounds of every `*_seconds` histogram: 1 ms to a minute.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket bounds of every `*_size` histogram (batch sizes).
const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Histograms as buckets (not per-process quantiles), so that Prometheus can add
            // up instances and compute any quantile an alert asks for.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
                })
                .expect("the bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows only this one"
                );
            }
            // Which build a process runs, for dashboards and for `up`/`absent` alerts that
            // need a series every process has.
            metrics::gauge!("ordo_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// The routes and the OpenAPI document that describes them, both from one list of handlers.
fn routes(
    reads_in_flight: Arc<tokio::sync::Semaphore>,
) -> (Router<Arc<ApiState>>, utoipa::openapi::OpenApi) {
    let reads = OpenApiRouter::new()
        .routes(routes!(reads::list_orders))
        .routes(routes!(reads::get_order))
        .routes(routes!(crate::history::get_order_history))
        .routes(routes!(reads::get_stock))
        .routes(routes!(reads::get_saga))
        .routes(routes!(reads::list_notifications))
        .routes(routes!(ops::projections))
        .layer(middleware::from_fn_with_state(reads_in_flight, shed_reads));
    let (router, mut document) = OpenApiRouter::with_openapi(crate::openapi::Document::openapi())
        .merge(reads)
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .split_for_parts();
    crate::openapi::complete(&mut document);
    (router, document)
}

/// The OpenAPI document of the read API, as `GET /openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes(Arc::new(tokio::sync::Semaphore::new(1))).1
}

pub fn router(state: ApiState) -> Router {
    let (routes, document) = routes(state.reads_in_flight.clone());
    let document = axum::body::Bytes::from(document.to_pretty_json().expect("it serializes"));
    routes
        .route(
            crate::openapi::PATH,
            get(move || {
                let document = document.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        document,
                    )
                }
            }),
        )
        .merge(crate::console::routes(state.reads_in_flight.clone()))
        .fallback(|uri: axum::http::Uri| async move {
            use axum::response::IntoResponse;
            if crate::console::is_console_path(uri.path()) {
                crate::console::not_found()
            } else {
                ops::not_found(uri).await.into_response()
            }
        })
        .layer(middleware::from_fn_with_state(
            state.tokens.clone(),
            auth::require_token,
        ))
        .with_state(Arc::new(state))
}

/// Serves a read if fewer than the bound are in flight, else answers 503 at once.
pub(crate) async fn shed_reads(
    axum::extract::State(in_flight): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match in_flight.try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            metrics::counter!("ordo_api_reads_shed_total").increment(1);
            crate::error::ApiError::Overloaded(
                "too many reads are in flight; nothing is wrong with this one: try again".into(),
            )
            .into_response()
        }
    }
}

/// What a worker's `/readyz` checks: its NATS connection, and its database when it has one.
#[derive(Clone)]
pub struct WorkerChecks {
    pub(crate) nats: async_nats::Client,
    pub(crate) pool: Option<sqlx::PgPool>,
    /// The database's last answer and when: anyone may ask `/readyz`, so PostgreSQL is asked at
    /// most once a second, one probe at a time.
    pub(crate) postgres: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
}

impl WorkerChecks {
    pub fn new(nats: async_nats::Client, pool: Option<sqlx::PgPool>) -> Self {
        Self {
            nats,
            pool,
            postgres: Arc::default(),
        }
    }
}

/// Serves the metrics port of a worker that has no HTTP API (`--metrics-addr`) on `listener`
/// until `shutdown` completes: `GET /metrics` (Prometheus text of this process), and, for an
/// orchestrator's probes and without a token, `GET /healthz` (alive) and `GET /readyz` (its
/// NATS connection up and, if it has one, its database answering).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    tokens: &AccessTokens,
    checks: WorkerChecks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = prometheus();
    // /metrics asks for what it asks for on the API; the probes for nothing.
    let tokens = AccessTokens {
        api: None,
        metrics: tokens.metrics_token().cloned(),
    };
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/healthz", get(ops::healthz))
        .route(
            "/readyz",
            get(move || {
                let checks = checks.clone();
                async move { ops::worker_readyz(&checks).await }
            }),
        )
        .fallback(ops::not_found)
        .layer(middleware::from_fn_with_state(tokens, auth::require_token));
    tracing::info!(addr = %listener.local_addr()?, "metrics ready");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP read API ready");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
