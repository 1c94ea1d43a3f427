//! The long-running components, each a task that stops when told: `ordo up` runs them all,
//! `ordo run …` one of them.

use std::net::SocketAddr;

use anyhow::Context;
use ordo_eventstore::{
    StreamDefinition,
    streams::{Ensured, ensure_all},
};
use ordo_projections::{ProjectorConfig, View};
use sqlx::PgPool;

use crate::Shutdown;

/// Which stream definitions this deployment uses: every component must be given the same.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct StreamSettings {
    /// Replicas of every stream (3 on a 3-node cluster). Unset: as the definitions say (1).
    #[arg(long, env = "ORDO_STREAM_REPLICAS", global = true)]
    pub stream_replicas: Option<usize>,
    /// A directory of stream definitions (*.json, as in streams/) to use instead of the
    /// built-in ones.
    #[arg(long, env = "ORDO_STREAMS_DIR", global = true)]
    pub streams_dir: Option<std::path::PathBuf>,
}

impl StreamSettings {
    pub fn definitions(&self) -> anyhow::Result<Vec<StreamDefinition>> {
        let definitions = match &self.streams_dir {
            Some(dir) => StreamDefinition::from_dir(dir)?,
            None => StreamDefinition::built_in(),
        };
        Ok(match self.stream_replicas {
            Some(replicas) => definitions
                .into_iter()
                .map(|definition| definition.with_replicas(replicas))
                .collect(),
            None => definitions,
        })
    }
}

/// Creates the streams that are missing. Every long-running command does it first, so that no
/// component finds a stream missing; none changes a running stream (only `ordo streams apply`
/// does): one that differs from the definitions is reported, in the log and in the gauge
/// `ordo_stream_config_drift{stream}`, and left as it is.
pub async fn ensure_streams(
    nats: &async_nats::Client,
    definitions: &[StreamDefinition],
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.clone());
    let ensured = ensure_all(&js, definitions)
        .await
        .context("creating the JetStream streams (is JetStream enabled on the server?)")?;
    for (stream, ensured) in ensured {
        let drift = match &ensured {
            Ensured::Differs(fields) => {
                tracing::warn!(
                    %stream,
                    ?fields,
                    "the stream's configuration differs from ordo's definition; left as it is \
                     (`ordo streams apply` changes it)"
                );
                1.0
            }
            Ensured::Created | Ensured::Matches => {
                tracing::info!(%stream, ?ensured, "stream");
                0.0
            }
        };
        metrics::gauge!("ordo_stream_config_drift", "stream" => stream).set(drift);
    }
    Ok(())
}

/// When `order.place` sheds load (see docs/commands.md, "Load shedding").
#[derive(clap::Args, Clone, Debug)]
pub struct LoadSheddingOptions {
    /// Order events the saga coordinators may have not taken in yet before `order.place`
    /// answers `unavailable`. Divided by the rate orders are confirmed at, it is how long an
    /// order may wait for its saga to start.
    #[arg(
        long,
        env = "ORDO_MAX_SAGA_BACKLOG",
        default_value_t = 5_000,
        global = true
    )]
    pub max_saga_backlog: u64,
    /// Events a projector may have not applied yet before `order.place` answers `unavailable`.
    #[arg(
        long,
        env = "ORDO_MAX_PROJECTION_LAG",
        default_value_t = 50_000,
        global = true
    )]
    pub max_projection_lag: u64,
    /// Orders per second one customer may place, sustained (shared by every command service);
    /// over it, `order.place` answers `rate_limited` with `retry_after_ms`. Unset: no limit.
    #[arg(long, env = "ORDO_CUSTOMER_ORDER_RATE", value_parser = positive_rate, global = true)]
    pub customer_order_rate: Option<f64>,
    /// Orders one customer may place at once after a pause (with --customer-order-rate).
    #[arg(
        long,
        env = "ORDO_CUSTOMER_ORDER_BURST",
        default_value_t = 10,
        global = true
    )]
    pub customer_order_burst: u32,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a positive number of orders per second"
        )),
    }
}

/// Serves commands until shutdown.
pub async fn commands(
    nats: async_nats::Client,
    load_shedding: LoadSheddingOptions,
    streams: StreamSettings,
    partitions: u32,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let config = ordo_commands::ServiceConfig {
        partitions,
        backlog_limits: Some(ordo_commands::backpressure::BacklogLimits {
            saga: load_shedding.max_saga_backlog,
            projection: load_shedding.max_projection_lag,
            ..Default::default()
        }),
        customer_rate: load_shedding.customer_order_rate.map(|per_second| {
            ordo_commands::ratelimit::CustomerRate {
                per_second,
                burst: load_shedding.customer_order_burst,
            }
        }),
        replicas: streams.stream_replicas.unwrap_or(1),
        ..Default::default()
    };
    // What it needs of JetStream at start (its streams, the partition leases) may not answer
    // yet: a cluster electing leaders, a node down. That is waited for, not a failure.
    let mut backoff = ordo_eventstore::backoff::Backoff::new(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(5),
    );
    let service = loop {
        let assembled = shutdown
            .unless_triggered(ordo_commands::CommandService::assemble(
                nats.clone(),
                config.clone(),
            ))
            .await;
        match assembled {
            None => return Ok(()),
            Some(Ok(service)) => break service,
            Some(Err(err @ ordo_commands::ServiceError::Misconfigured(_))) => {
                return Err(err.into());
            }
            Some(Err(err)) => {
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "the command service cannot start yet; retrying");
                if shutdown
                    .unless_triggered(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
    };
    service.run(shutdown.signal()).await?;
    Ok(())
}

/// Runs a projector of `view` until shutdown: it shares the view's `partitions` with the
/// view's other projectors.
pub async fn projector(
    view: View,
    pool: PgPool,
    nats: async_nats::Client,
    partitions: u32,
    streams: StreamSettings,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats);
    let config = ProjectorConfig {
        partitions,
        replicas: streams.stream_replicas.unwrap_or(1),
        ..ProjectorConfig::default()
    };
    view.run_projector(pool, js, config, shutdown.signal())
        .await;
    Ok(())
}

/// How the saga coordinator and the notifier behave; shared by `up` and `run saga|notifier`.
#[derive(clap::Args, Clone, Debug)]
pub struct SagaOptions {
    /// Share of orders the simulated payment gateway declines (0 to 1).
    #[arg(long, env = "ORDO_PAYMENT_DECLINE_RATE", default_value_t = 0.0, value_parser = share, global = true)]
    pub payment_decline_rate: f64,
    /// How long the simulated payment gateway takes to answer, in milliseconds.
    #[arg(
        long,
        env = "ORDO_PAYMENT_LATENCY_MS",
        default_value_t = 5,
        global = true
    )]
    pub payment_latency_ms: u64,
    /// How long a saga waits, counted from the first step that gets no answer, before it rejects
    /// an order still reserving or paying with reason `timeout` (time queued inside ordo does not
    /// count; once its confirm may have been sent, it only goes forward).
    #[arg(
        long,
        env = "ORDO_SAGA_TIMEOUT_SECS",
        default_value_t = 30,
        global = true
    )]
    pub saga_timeout_secs: u64,
    /// Also POST every notification to this URL.
    #[arg(long, env = "ORDO_WEBHOOK_URL", hide_env_values = true, global = true)]
    pub webhook_url: Option<String>,
    /// Share of notification deliveries that fail on purpose, to exercise retries (0 to 1).
    #[arg(long, env = "ORDO_NOTIFY_FAILURE_RATE", default_value_t = 0.0, value_parser = share, global = true)]
    pub notify_failure_rate: f64,
}

fn share(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0 and 1"))
    }
}

impl SagaOptions {
    /// The simulated gateway, keeping its ledger in the `payments` table of `pool`.
    pub fn gateway(&self, pool: &PgPool) -> ordo_saga::SimulatedGateway {
        ordo_saga::SimulatedGateway {
            decline_rate: self.payment_decline_rate,
            latency: std::time::Duration::from_millis(self.payment_latency_ms),
            ledger: Some(pool.clone()),
        }
    }

    /// A coordinator whose intake shares `partitions` of the order events (the command
    /// service's count), with a partition bucket of `replicas` if it creates it.
    pub fn coordinator(
        &self,
        pool: PgPool,
        nats: async_nats::Client,
        partitions: u32,
        replicas: usize,
    ) -> ordo_saga::Coordinator<ordo_saga::SimulatedGateway> {
        let config = ordo_saga::CoordinatorConfig {
            saga_timeout: std::time::Duration::from_secs(self.saga_timeout_secs),
            partitions,
            replicas,
            ..Default::default()
        };
        let gateway = self.gateway(&pool);
        ordo_saga::Coordinator::new(pool, nats, gateway, config)
    }
}

/// Runs a saga coordinator until shutdown.
pub async fn saga(
    options: SagaOptions,
    pool: PgPool,
    nats: async_nats::Client,
    partitions: u32,
    streams: StreamSettings,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let replicas = streams.stream_replicas.unwrap_or(1);
    let coordinator = options.coordinator(pool, nats.clone(), partitions, replicas);
    // A person's retries (the console's), answered by whichever coordinator gets them.
    let retries = tokio::spawn(ordo_saga::operations::answer_saga_retries(
        nats,
        coordinator.clone(),
        shutdown.signal(),
    ));
    coordinator.run(shutdown.signal()).await;
    let _ = retries.await;
    Ok(())
}

/// The notifier these options describe.
pub async fn notifier_of(
    options: &SagaOptions,
    pool: PgPool,
    nats: async_nats::Client,
) -> anyhow::Result<ordo_saga::Notifier> {
    let config = ordo_saga::NotifierConfig {
        webhook_url: options.webhook_url.clone(),
        failure_rate: options.notify_failure_rate,
        ..Default::default()
    };
    Ok(ordo_saga::Notifier::connect(pool, nats, config).await?)
}

/// Runs the notifier until shutdown.
pub async fn notifier(
    options: SagaOptions,
    pool: PgPool,
    nats: async_nats::Client,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let notifier = notifier_of(&options, pool, nats.clone()).await?;
    // A person's redeliveries (the console's), answered by whichever notifier gets them.
    let retries = tokio::spawn(ordo_saga::operations::answer_notification_retries(
        nats,
        notifier.clone(),
        shutdown.signal(),
    ));
    notifier.run(shutdown.signal()).await;
    let _ = retries.await;
    Ok(())
}

/// Who may read over HTTP: optional bearer tokens for the API and for `/metrics`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct HttpAccess {
    /// A bearer token every HTTP endpoint but /healthz then requires
    /// (`Authorization: Bearer <token>`). Unset: the API answers whoever reaches its address.
    #[arg(long, env = "ORDO_HTTP_TOKEN", hide_env_values = true, global = true)]
    pub http_token: Option<crate::connect::Secret>,
    /// A bearer token for `/metrics` alone (for Prometheus); unset, /metrics takes the API's.
    #[arg(
        long,
        env = "ORDO_METRICS_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub metrics_token: Option<crate::connect::Secret>,
}

impl HttpAccess {
    pub fn tokens(&self) -> ordo_api::AccessTokens {
        let token = |secret: &Option<crate::connect::Secret>| {
            secret
                .as_ref()
                .map(|secret| ordo_api::Token::new(secret.expose()))
        };
        ordo_api::AccessTokens {
            api: token(&self.http_token),
            metrics: token(&self.metrics_token),
        }
    }
}

/// Serves the HTTP read API and its console on `settings.http_addr` until shutdown.
pub async fn api(
    settings: crate::Settings,
    pool: PgPool,
    nats: async_nats::Client,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let addr = settings.http_addr;
    let mut state = ordo_api::ApiState::new(pool, nats);
    state.trace_url = settings.trace_url;
    state.shed_bounds = ordo_api::ShedBounds {
        saga_backlog: settings.load_shedding.max_saga_backlog,
        projection_lag: settings.load_shedding.max_projection_lag,
    };
    state.streams = settings.streams.definitions()?;
    state.tokens = settings.http_access.tokens();
    state.partitions = settings.partitions;
    state.reads_in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(
        settings.http_max_reads_in_flight,
    ));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening on {addr} (set ORDO_HTTP_ADDR to use another address)")
    })?;
    ordo_api::serve(listener, state, shutdown.signal()).await?;
    Ok(())
}

/// Serves this process's metrics on `addr` until shutdown.
pub async fn metrics(
    addr: SocketAddr,
    access: HttpAccess,
    checks: ordo_api::WorkerChecks,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("listening for metrics on {addr} (set ORDO_METRICS_ADDR to use another address)")
    })?;
    ordo_api::serve_metrics(listener, &access.tokens(), checks, shutdown.signal()).await?;
    Ok(())
}
