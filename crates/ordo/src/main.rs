//! `ordo`: runs the engine and talks to it.
//!
//! - `ordo up`: every component in one process, with local defaults for NATS and PostgreSQL.
//! - `ordo run commands|projector|api|saga|notifier`: one component, to run many side by side.
//! - `ordo migrate`, `ordo streams apply`, `ordo projections status|rebuild`, `ordo sagas retry`,
//!   `ordo notifications retry`: the operator's commands ([`admin`]).
//! - `ordo order place|cancel|ship`, `ordo stock receive`: send the JSON `nats req` would
//!   ([`client`]).
//! - `ordo chaos`: a drill of the whole system under faults, and a check of every invariant
//!   (the `ordo-chaos` crate).
//! - `ordo completions <shell>`, `ordo man`: shell completions and the manual pages.
//!
//! The system itself is the `ordo-app` crate; this binary parses the command line ([`cli`]),
//! sets up logs and traces ([`telemetry`]) and dispatches.

mod admin;
mod cli;
mod client;
mod telemetry;

/// glibc's allocator took a fifth of ordo's CPU time under load (see bench/reports/profiles.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command};
use ordo_app::{App, Role, Shutdown};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS implementation for every client that asks rustls for the process's provider (the
    // OTLP/HTTP exporter's): ring, as async-nats, sqlx and the webhook client use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            cli::print_completions(*shell);
            return Ok(());
        }
        Command::Man { dir } => return cli::print_man(dir.as_deref()),
        // The engine and the drill run on ordo's own settings alone: a shell's NATS_URL must
        // not point them at another system (and a drill kills the servers it uses).
        Command::Up | Command::Run { .. } | Command::Chaos(_) => {}
        // The commands a person types follow the NATS tools' conventions too.
        _ => cli.settings.adopt_nats_tool_settings()?,
    }
    let role = match &cli.command {
        Command::Up => Some(Role::Everything),
        Command::Run { component } => Some(Role::Only(component.clone())),
        _ => None,
    };
    // Only the long-running commands log to stderr; the others print their answers.
    let _telemetry = telemetry::init(role.is_none(), cli.log_format)?;
    if let Some(role) = role {
        return run(cli.settings, role).await;
    }
    let settings = &cli.settings;
    match cli.command {
        Command::Up | Command::Run { .. } => unreachable!("a role, run above"),
        Command::Completions { .. } | Command::Man { .. } => unreachable!("printed above"),
        Command::Migrate {
            grant_to,
            grant_read_to,
        } => admin::migrate(settings, grant_to.as_deref(), grant_read_to.as_deref()).await,
        Command::Streams { action } => admin::streams(settings, action).await,
        Command::Partitions { action } => admin::partitions(settings, action).await,
        Command::Projections { action } => admin::projections(settings, action).await,
        Command::Sagas { action } => admin::sagas(settings, action).await,
        Command::Notifications { action } => admin::notifications(settings, action).await,
        Command::Order {
            action: client::OrderAction::Get { order_id, min_seq },
        } => client::get_order(settings, &order_id, min_seq).await,
        Command::Order { action } => client::send(settings, action.into_request()?).await,
        Command::Stock { action } => client::send(settings, action.into_request()?).await,
        Command::Chaos(options) => chaos(options, settings).await,
    }
}

/// `ordo up` and `ordo run`: the app, until SIGINT or SIGTERM (or a component stops).
async fn run(settings: ordo_app::Settings, role: Role) -> anyhow::Result<()> {
    // Ctrl-C and SIGTERM stop it at any moment, also while it still waits for a server at
    // start-up.
    let shutdown = Shutdown::new();
    let stop_on_signal = shutdown.clone();
    let signalled =
        ordo_app::shutdown_signal().context("install the SIGINT and SIGTERM handlers")?;
    tokio::spawn(async move {
        signalled.await;
        stop_on_signal.trigger();
    });
    match App::build(settings, role, &shutdown).await? {
        Some(app) => app.run_until_stopped(shutdown).await,
        None => Ok(()),
    }
    // The servers `ordo up` started stop here, after every component.
}

async fn chaos(
    mut options: ordo_chaos::ChaosOptions,
    settings: &ordo_app::Settings,
) -> anyhow::Result<()> {
    options.partitions = Some(settings.partitions);
    let report_file = options.report.clone();
    // Ctrl-C ends the drill and, as its processes and servers are dropped, kills them.
    let report = tokio::select! {
        report = ordo_chaos::run(options, settings.nats_url.clone(), settings.database_url.clone()) => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: the drill's processes are stopped"),
    };
    ordo_chaos::print(&report);
    if let Some(file) = report_file {
        std::fs::write(&file, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing the report to {}", file.display()))?;
    }
    if !report.passed {
        std::process::exit(1);
    }
    Ok(())
}
