//! `ordo`: runs the engine and talks to it.
//!
//! - `ordo up`: every component in one process, with local defaults for NATS and PostgreSQL.
//! - `ordo run commands|projector|api|saga|notifier`: one component, to run many side by side.
//! - `ordo sagas retry ORDER_ID`: an operator's retry of a saga stuck in a compensation.
//! - `ordo streams apply`, `ordo projections status`: operating the streams and views.
//! - `ordo order place|cancel|ship`, `ordo stock receive`: send the JSON `nats req` would.
//! - `ordo chaos`: a drill of the whole system under faults, and a check of every invariant.

mod chaos;
mod client;
mod components;
mod connect;
mod database;
mod telemetry;

/// glibc's allocator took a fifth of ordo's CPU time under load (see bench/reports/profiles.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use components::Shutdown;
use ordo_eventstore::streams::apply_all;
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(
    name = "ordo",
    version,
    about = "An event-sourced order engine on NATS JetStream"
)]
struct Cli {
    /// NATS server URL (a comma-separated list for a cluster). Unset, `ordo up` uses
    /// 127.0.0.1:4222 if a nats-server >= 2.10 with JetStream answers there, else starts one.
    /// (Its value is never shown by --help: a URL may carry a password.)
    #[arg(long, env = "ORDO_NATS_URL", hide_env_values = true, global = true)]
    nats_url: Option<String>,

    /// PostgreSQL URL of the read views. Unset, `ordo up` uses database `ordo` on a local server
    /// that accepts `postgres` without a password, else starts a private one under .ordo/pg.
    /// (Its value is never shown by --help: a URL may carry a password.)
    #[arg(long, env = "ORDO_DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    /// Address of the HTTP read API.
    #[arg(
        long,
        env = "ORDO_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    http_addr: SocketAddr,

    /// HTTP reads served at once, those waiting for their `min_seq` included; past it a read is
    /// answered 503 with `Retry-After` at once (each read in flight holds a connection and
    /// memory, a waiting one for up to 5 s). Health, readiness and metrics are not counted.
    #[arg(
        long,
        env = "ORDO_HTTP_MAX_READS_IN_FLIGHT",
        default_value_t = ordo_api::DEFAULT_MAX_READS_IN_FLIGHT,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..),
        global = true
    )]
    http_max_reads_in_flight: usize,

    /// Serve this process's metrics (Prometheus text, `GET /metrics`) on this address. `ordo up`
    /// and `ordo run api` also serve them on the API's address.
    #[arg(long, env = "ORDO_METRICS_ADDR", global = true)]
    metrics_addr: Option<SocketAddr>,

    /// How log lines are written to stderr: readable text, or one JSON object per line.
    #[arg(
        long,
        env = "ORDO_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    log_format: telemetry::LogFormat,

    /// Where `ordo up` keeps the data of servers it starts itself.
    #[arg(long, env = "ORDO_HOME", default_value = ".ordo", global = true)]
    home: PathBuf,

    #[command(flatten)]
    nats_auth: connect::NatsAuth,

    #[command(flatten)]
    http_access: components::HttpAccess,

    #[command(flatten)]
    saga: components::SagaOptions,

    #[command(flatten)]
    load_shedding: components::LoadSheddingOptions,

    #[command(flatten)]
    streams: components::StreamSettings,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every component in this process, starting local servers if none answer.
    Up,
    /// Run one component.
    Run {
        #[command(subcommand)]
        component: Component,
    },
    /// Set up the database as its owner: run the migrations and create the views. With
    /// --grant-to, let the role the workers connect as read and write rows and nothing more;
    /// with --grant-read-to, let the read API's role read them.
    Migrate {
        /// The workers' role (it must exist): SELECT, INSERT, UPDATE and DELETE on ordo's
        /// tables, now and on those later migrations and rebuilds create; no DDL.
        #[arg(long, env = "ORDO_DATABASE_WORKER_ROLE")]
        grant_to: Option<String>,
        /// The read API's role (it must exist): SELECT on ordo's tables, now and later; nothing
        /// else.
        #[arg(long, env = "ORDO_DATABASE_READER_ROLE")]
        grant_read_to: Option<String>,
    },
    /// Manage the JetStream streams.
    Streams {
        #[command(subcommand)]
        action: StreamsAction,
    },
    /// Inspect the read views.
    Projections {
        #[command(subcommand)]
        action: ProjectionsAction,
    },
    /// Operate sagas.
    Sagas {
        #[command(subcommand)]
        action: SagasAction,
    },
    /// Operate notifications.
    Notifications {
        #[command(subcommand)]
        action: NotificationsAction,
    },
    /// Send an order command and print the reply.
    Order {
        #[command(subcommand)]
        action: client::OrderAction,
    },
    /// Send a stock command and print the reply.
    Stock {
        #[command(subcommand)]
        action: client::StockAction,
    },
    /// Run a chaos drill: the whole system as processes, a mixed load, SIGKILLs, nats-server
    /// restarts and outages; then check every invariant. Exits 0 only with no violation.
    Chaos(chaos::ChaosOptions),
}

#[derive(Subcommand)]
enum Component {
    /// The command service (NATS micro service `ordo`, queue group `ordo-commands`).
    Commands,
    /// Projector workers; one instance leads each projection, the others stand by.
    Projector {
        /// Only this projection (orders or stock); all when absent.
        #[arg(long)]
        projection: Option<ordo_projections::View>,
    },
    /// The HTTP read API.
    Api,
    /// A saga coordinator: reserve, pay, confirm, or compensate (run as many as you like).
    Saga,
    /// The notifier: one notification per (order, kind).
    Notifier,
}

#[derive(Subcommand)]
enum StreamsAction {
    /// Create missing streams and update those whose definition changed: the only command that
    /// changes a running stream (the components only create missing ones).
    Apply {
        /// Apply the *.json definitions of this directory (the same as --streams-dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NotificationsAction {
    /// Deliver a dead-lettered notification again.
    Retry {
        order_id: String,
        /// confirmed, rejected, cancelled or shipped
        kind: String,
    },
}

#[derive(Subcommand)]
enum SagasAction {
    /// Retry a saga shown as compensation_stuck now, with a fresh count (it is also retried on
    /// its own, with capped back-off).
    Retry { order_id: String },
}

#[derive(Subcommand)]
enum ProjectionsAction {
    /// Checkpoint, stream head, lag and parked events of each projection (as GET /projections).
    Status,
    /// Replay a projection's stream into a new view and swap it in; the live view keeps serving.
    Rebuild {
        /// orders or stock
        view: ordo_projections::View,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS implementation for every client that asks rustls for the process's provider (the
    // OTLP/HTTP exporter's): ring, as async-nats, sqlx and the webhook client use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let client_only = matches!(
        cli.command,
        Command::Order { .. }
            | Command::Stock { .. }
            | Command::Projections { .. }
            | Command::Sagas { .. }
            | Command::Notifications { .. }
            | Command::Migrate { .. }
            | Command::Chaos(..)
    );
    let _telemetry = telemetry::init(client_only, cli.log_format)?;
    if matches!(cli.command, Command::Up | Command::Run { .. }) {
        // The process-wide metrics recorder, before anything records a metric.
        ordo_api::prometheus();
    }
    let nats_url = connect::configured_url(cli.nats_url.clone(), &cli.home);
    let database_url = database::configured_url(cli.database_url.clone(), &cli.home);
    // Ctrl-C and SIGTERM stop a long-running command at any moment, also while it still waits
    // for a server at start-up.
    // (Only those: the other commands keep the default, where Ctrl-C ends the process.)
    let shutdown = Shutdown::new();
    if matches!(cli.command, Command::Up | Command::Run { .. }) {
        let stop_on_signal = shutdown.clone();
        let signalled = shutdown_signal().context("install the SIGINT and SIGTERM handlers")?;
        tokio::spawn(async move {
            signalled.await;
            stop_on_signal.trigger();
        });
    }
    match cli.command {
        Command::Up => up(cli, shutdown).await,
        Command::Run { ref component } => {
            let Some(nats) =
                connect_nats(&shutdown, &nats_url, &cli.nats_auth, &cli.streams).await?
            else {
                return Ok(());
            };
            let Some(pool) = shutdown
                .unless_triggered(connect_database(component, &database_url))
                .await
                .transpose()?
            else {
                return Ok(());
            };
            let mut components = JoinSet::new();
            if let Some(addr) = cli.metrics_addr {
                components.spawn(named(
                    "metrics",
                    components::metrics(addr, cli.http_access.clone(), shutdown.clone()),
                ));
            }
            spawn_component(
                &mut components,
                component,
                &cli,
                &nats,
                pool.as_ref(),
                &shutdown,
            );
            supervise(components, shutdown, nats).await
        }
        Command::Migrate {
            ref grant_to,
            ref grant_read_to,
        } => database::migrate(&database_url, grant_to.as_deref(), grant_read_to.as_deref()).await,
        Command::Streams {
            action: StreamsAction::Apply { dir },
        } => {
            let nats = connect::connect_once(&nats_url, &cli.nats_auth).await?;
            let settings = components::StreamSettings {
                streams_dir: dir.or(cli.streams.streams_dir.clone()),
                ..cli.streams.clone()
            };
            let definitions = settings.definitions()?;
            let js = async_nats::jetstream::new(nats);
            for (stream, applied) in apply_all(&js, &definitions).await? {
                println!("{stream}: {applied}");
            }
            Ok(())
        }
        Command::Projections {
            action: ProjectionsAction::Status,
        } => {
            let nats = connect::connect_once(&nats_url, &cli.nats_auth).await?;
            let pool = sqlx::PgPool::connect(&database_url).await?;
            let status = ordo_api::ops::projection_status(&pool, &nats)
                .await
                .map_err(|err| anyhow::anyhow!("{err:?}"))?;
            print!("{}", client::status_table(&status));
            Ok(())
        }
        Command::Projections {
            action: ProjectionsAction::Rebuild { view },
        } => {
            let nats = connect::connect_once(&nats_url, &cli.nats_auth).await?;
            let pool = database::connect_and_prepare(&database_url).await?;
            components::rebuild(view, &pool, &nats).await
        }
        Command::Sagas {
            action: SagasAction::Retry { order_id },
        } => {
            let order_id = ordo_domain::OrderId::parse(order_id)?;
            let nats = connect::connect_once(&nats_url, &cli.nats_auth).await?;
            let pool = sqlx::PgPool::connect(&database_url).await?;
            match cli
                .saga
                .coordinator(pool, nats)
                .retry_stuck(&order_id)
                .await?
            {
                Some(state) => println!("saga of {order_id}: {}", state.as_str()),
                None => anyhow::bail!("no saga for order {order_id}"),
            }
            Ok(())
        }
        Command::Notifications {
            action: NotificationsAction::Retry { order_id, kind },
        } => {
            let nats = connect::connect_once(&nats_url, &cli.nats_auth).await?;
            let pool = sqlx::PgPool::connect(&database_url).await?;
            match components::notifier_of(&cli.saga, pool, nats)
                .await?
                .retry(&order_id, &kind)
                .await?
            {
                Some(status) => println!("notification {kind} of {order_id}: {status}"),
                None => anyhow::bail!("no {kind} notification for order {order_id}"),
            }
            Ok(())
        }
        Command::Order { action } => {
            client::send(&nats_url, &cli.nats_auth, action.into_request()?).await
        }
        Command::Stock { action } => {
            client::send(&nats_url, &cli.nats_auth, action.into_request()?).await
        }
        Command::Chaos(options) => {
            let report_file = options.report.clone();
            // Ctrl-C ends the drill and, as its processes and servers are dropped, kills them.
            let report = tokio::select! {
                report = chaos::run(options, cli.nats_url, cli.database_url) => report?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the drill's processes are stopped"),
            };
            chaos::print(&report);
            if let Some(file) = report_file {
                std::fs::write(&file, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing the report to {}", file.display()))?;
            }
            if !report.passed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Every component in one process: the command service, the projectors, the saga coordinator,
/// the notifier and the HTTP API.
async fn up(cli: Cli, shutdown: Shutdown) -> anyhow::Result<()> {
    let (nats_url, _local_nats) = connect::url_for_up(cli.nats_url.clone(), &cli.home).await?;
    let (database_url, _local_postgres) =
        database::url_for_up(cli.database_url.clone(), &cli.home).await?;
    let Some(nats) = connect_nats(&shutdown, &nats_url, &cli.nats_auth, &cli.streams).await? else {
        return Ok(());
    };
    let Some(pool) = shutdown
        .unless_triggered(database::connect_and_prepare(&database_url))
        .await
        .transpose()?
    else {
        return Ok(());
    };
    let mut components = JoinSet::new();
    for component in [
        Component::Commands,
        Component::Projector { projection: None },
        Component::Saga,
        Component::Notifier,
        Component::Api,
    ] {
        spawn_component(
            &mut components,
            &component,
            &cli,
            &nats,
            Some(&pool),
            &shutdown,
        );
    }
    tracing::info!(api = %format!("http://{}", cli.http_addr), "ordo is up");
    supervise(components, shutdown, nats).await
    // The servers `ordo up` started stop here, after every component.
}

/// Starts `component` in `components`, configured from `cli`: `ordo run` starts the one it
/// names, `ordo up` every one, both through here. `pool` is there for every component but the
/// command service.
fn spawn_component(
    components: &mut JoinSet<(String, anyhow::Result<()>)>,
    component: &Component,
    cli: &Cli,
    nats: &async_nats::Client,
    pool: Option<&sqlx::PgPool>,
    shutdown: &Shutdown,
) {
    let pool = || {
        pool.cloned()
            .expect("a database pool: connect_database gives one to every component but commands")
    };
    match component {
        Component::Commands => {
            components.spawn(named(
                "commands",
                components::commands(
                    nats.clone(),
                    cli.load_shedding.clone(),
                    cli.streams.clone(),
                    shutdown.clone(),
                ),
            ));
        }
        Component::Projector { projection } => {
            let views = match projection {
                Some(view) => vec![*view],
                None => ordo_projections::View::ALL.to_vec(),
            };
            for view in views {
                let task = components::projector(view, pool(), nats.clone(), shutdown.clone());
                components.spawn(async move { (format!("projector {view}"), task.await) });
            }
        }
        Component::Api => {
            components.spawn(named(
                "api",
                components::api(
                    cli.http_addr,
                    cli.http_max_reads_in_flight,
                    pool(),
                    nats.clone(),
                    cli.streams.clone(),
                    cli.http_access.clone(),
                    shutdown.clone(),
                ),
            ));
        }
        Component::Saga => {
            let saga = components::saga(cli.saga.clone(), pool(), nats.clone(), shutdown.clone());
            components.spawn(named("saga", saga));
        }
        Component::Notifier => {
            let notifier =
                components::notifier(cli.saga.clone(), pool(), nats.clone(), shutdown.clone());
            components.spawn(named("notifier", notifier));
        }
    }
}

async fn named(
    name: &'static str,
    component: impl Future<Output = anyhow::Result<()>>,
) -> (String, anyhow::Result<()>) {
    (name.to_owned(), component.await)
}

/// NATS, waited for (unless a stop comes first: `None`), with the streams applied.
async fn connect_nats(
    shutdown: &Shutdown,
    url: &str,
    auth: &connect::NatsAuth,
    streams: &components::StreamSettings,
) -> anyhow::Result<Option<async_nats::Client>> {
    let Some(nats) = shutdown
        .unless_triggered(connect::connect_with_backoff(url, auth))
        .await
        .transpose()?
    else {
        return Ok(None);
    };
    // Bad definition files are an error now; a JetStream that does not answer yet (a cluster
    // electing its leaders, a node down) is waited for.
    let definitions = streams.definitions()?;
    let mut backoff = ordo_eventstore::backoff::Backoff::new(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(10),
    );
    loop {
        match shutdown
            .unless_triggered(components::ensure_streams(&nats, &definitions))
            .await
        {
            None => return Ok(None),
            Some(Ok(())) => return Ok(Some(nats)),
            Some(Err(err)) => {
                let delay = backoff.next_delay();
                tracing::warn!(err = %format!("{err:#}"), retry_in = ?delay, "the streams cannot be created or checked yet; retrying");
                if shutdown
                    .unless_triggered(tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Ok(None);
                }
            }
        }
    }
}

/// PostgreSQL for the components that use it (all but the command service).
async fn connect_database(
    component: &Component,
    url: &str,
) -> anyhow::Result<Option<sqlx::PgPool>> {
    match component {
        Component::Commands => Ok(None),
        _ => database::connect_and_prepare(url).await.map(Some),
    }
}

/// Waits for Ctrl-C or SIGTERM, or for a component to stop on its own (which stops the rest),
/// then for every component to finish. Fails if any component failed.
async fn supervise(
    mut components: JoinSet<(String, anyhow::Result<()>)>,
    shutdown: Shutdown,
    nats: async_nats::Client,
) -> anyhow::Result<()> {
    let mut failed = None;
    tokio::select! {
        () = shutdown.signal() => {}
        Some(ended) = components.join_next() => {
            let (name, result) = ended?;
            match result {
                Ok(()) => tracing::error!(component = %name, "stopped on its own; stopping the rest"),
                Err(err) => {
                    tracing::error!(component = %name, err = format!("{err:#}"), "failed; stopping the rest");
                    failed = Some(err.context(name));
                }
            }
        }
    }
    shutdown.trigger();
    while let Some(ended) = components.join_next().await {
        let (name, result) = ended?;
        if let Err(err) = result {
            tracing::error!(component = %name, err = format!("{err:#}"), "failed while stopping");
        }
    }
    // Close the connection before a nats-server `ordo up` started is stopped.
    nats.drain().await.ok();
    failed.map_or(Ok(()), Err)
}

/// Installs the SIGINT and SIGTERM handlers now, before anything is awaited (until a handler is
/// installed, a signal ends the process at once), and returns what completes at the first one.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    })
}
