//! The command line: what `ordo` takes, and nothing else. The deployment's settings are
//! `ordo_app::Settings`, flattened in here.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{client, telemetry};

#[derive(Parser)]
#[command(
    name = "ordo",
    version,
    about = "An event-sourced order engine on NATS JetStream"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: ordo_app::Settings,

    /// How log lines are written to stderr: readable text, or one JSON object per line.
    #[arg(
        long,
        env = "ORDO_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: telemetry::LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run every component in this process, starting local servers if none answer.
    Up,
    /// Run one component.
    Run {
        #[command(subcommand)]
        component: ordo_app::Component,
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
    /// See who owns each partition of the commands.
    Partitions {
        #[command(subcommand)]
        action: PartitionsAction,
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
    Chaos(ordo_chaos::ChaosOptions),
}

#[derive(Subcommand)]
pub enum StreamsAction {
    /// Create missing streams and update those whose definition changed: the only command that
    /// changes a running stream (the components only create missing ones).
    Apply {
        /// Apply the *.json definitions of this directory (the same as --streams-dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum NotificationsAction {
    /// Deliver a dead-lettered notification again.
    Retry {
        order_id: String,
        /// confirmed, rejected, cancelled or shipped
        kind: String,
    },
}

#[derive(Subcommand)]
pub enum SagasAction {
    /// Retry a saga shown as compensation_stuck now, with a fresh count (it is also retried on
    /// its own, with capped back-off).
    Retry { order_id: String },
}

#[derive(Subcommand)]
pub enum PartitionsAction {
    /// Each partition's owner and when its lease was last renewed, and each instance of the
    /// group with its heartbeat and how many partitions it holds.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Whose partitions: the command service's (`commands`), the saga coordinators' intake
        /// (`saga`) or a view's projectors' (`projection-orders`, `projection-stock`).
        #[arg(long, default_value = ordo_commands::service::PARTITION_GROUP)]
        group: String,
    },
}

#[derive(Subcommand)]
pub enum ProjectionsAction {
    /// Checkpoint, stream head, lag and parked events of each projection (as GET /projections).
    Status,
    /// Replay a projection's stream into a new view and swap it in; the live view keeps serving.
    Rebuild {
        /// orders or stock
        view: ordo_projections::View,
    },
}
