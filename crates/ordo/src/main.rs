//! `ordo`: runs the engine and talks to it.
//!
//! - `ordo up`: everything in one process (today: the command service), with local defaults.
//! - `ordo run commands`: one component, to run many side by side.
//! - `ordo streams apply`: create or update the JetStream streams.
//! - `ordo order place|cancel|ship`, `ordo stock receive`: send the JSON `nats req` would.

mod client;
mod connect;
mod telemetry;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ordo_eventstore::{EventStore, StreamDefinition, streams::apply_all};

#[derive(Parser)]
#[command(
    name = "ordo",
    version,
    about = "An event-sourced order engine on NATS JetStream"
)]
struct Cli {
    /// NATS server URL. Unset, `ordo up` uses 127.0.0.1:4222 if a nats-server >= 2.10 with
    /// JetStream answers there, else starts one under .ordo/nats.
    #[arg(long, env = "ORDO_NATS_URL", global = true)]
    nats_url: Option<String>,

    /// Where `ordo up` keeps the data of servers it starts itself.
    #[arg(long, env = "ORDO_HOME", default_value = ".ordo", global = true)]
    home: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every component in this process, starting a local nats-server if none answers.
    Up,
    /// Run one component.
    Run {
        #[command(subcommand)]
        component: Component,
    },
    /// Manage the JetStream streams.
    Streams {
        #[command(subcommand)]
        action: StreamsAction,
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
}

#[derive(Subcommand)]
enum Component {
    /// The command service (NATS micro service `ordo`, queue group `ordo-commands`).
    Commands,
}

#[derive(Subcommand)]
enum StreamsAction {
    /// Create missing streams and update those whose definition changed.
    Apply {
        /// Apply the *.json definitions of this directory instead of the built-in ones.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client_only = matches!(cli.command, Command::Order { .. } | Command::Stock { .. });
    let _telemetry = telemetry::init(client_only)?;
    match cli.command {
        Command::Up => {
            let (url, _local_server) = connect::url_for_up(cli.nats_url, &cli.home).await?;
            let nats = connect::connect_with_backoff(&url).await?;
            run_command_service(nats).await
        }
        Command::Run {
            component: Component::Commands,
        } => {
            let url = connect::configured_url(cli.nats_url, &cli.home);
            run_command_service(connect::connect_with_backoff(&url).await?).await
        }
        Command::Streams {
            action: StreamsAction::Apply { dir },
        } => {
            let url = connect::configured_url(cli.nats_url, &cli.home);
            let nats = connect::connect_once(&url).await?;
            let definitions = match dir {
                Some(dir) => StreamDefinition::from_dir(&dir)?,
                None => StreamDefinition::built_in(),
            };
            let js = async_nats::jetstream::new(nats);
            for (stream, applied) in apply_all(&js, &definitions).await? {
                println!("{stream}: {applied}");
            }
            Ok(())
        }
        Command::Order { action } => {
            let url = connect::configured_url(cli.nats_url, &cli.home);
            client::send(&url, action.into_request()?).await
        }
        Command::Stock { action } => {
            let url = connect::configured_url(cli.nats_url, &cli.home);
            client::send(&url, action.into_request()).await
        }
    }
}

/// Applies the streams, then serves commands until Ctrl-C or SIGTERM.
async fn run_command_service(nats: async_nats::Client) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.clone());
    let applied = apply_all(&js, &StreamDefinition::built_in())
        .await
        .context("applying the JetStream streams (is JetStream enabled on the server?)")?;
    for (stream, applied) in applied {
        tracing::info!(%stream, %applied, "stream");
    }
    let store = EventStore::open(
        nats.clone(),
        &[
            "ORDO_ORDERS",
            "ORDO_STOCK",
            ordo_commands::outcomes::OUTCOMES_STREAM,
        ],
    )
    .await?;
    let handler = std::sync::Arc::new(ordo_commands::CommandHandler::new(store));
    ordo_commands::CommandService::start(nats.clone(), handler, Default::default())
        .await?
        .run(shutdown_signal())
        .await?;
    // Close the connection before a nats-server `ordo up` started is stopped.
    nats.drain().await.ok();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
