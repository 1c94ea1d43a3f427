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
    /// Print a completion script for a shell, e.g. `ordo completions bash >
    /// ~/.local/share/bash-completion/completions/ordo`.
    Completions { shell: clap_complete::Shell },
    /// Print ordo's manual page (roff), e.g. `ordo man | man -l -`; with --dir, write a page for
    /// ordo and for each of its commands there (ordo.1, ordo-up.1, …).
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `ordo completions <shell>`: the script on stdout.
pub fn print_completions(shell: clap_complete::Shell) {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "ordo", &mut std::io::stdout());
}

/// `ordo man`: the top page on stdout, or every page into `dir`.
pub fn print_man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    let command = <Cli as clap::CommandFactory>::command();
    match dir {
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout())?,
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum StreamsAction {
    /// Create missing streams and update those whose definition changed: the only command that
    /// changes a running stream (the components only create missing ones).
    Apply {
        /// Apply the *.json definitions of this directory (the same as --streams-dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Wait up to this many seconds for NATS to answer and JetStream to take the streams
        /// (a cluster just started elects its JetStream leader first); 0 tries once.
        #[arg(long, default_value_t = 0)]
        wait: u64,
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
    Status {
        /// Print JSON (GET /projections' document) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replay a projection's stream into a new view and swap it in; the live view keeps serving.
    Rebuild {
        /// orders or stock
        view: ordo_projections::View,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// Every flag of the deployment (saga, payment, load shedding, webhook, …) is taken after
    /// the subcommand as well as before it, and `ordo up --help` lists it.
    #[test]
    fn component_flags_come_after_the_subcommand_and_are_in_its_help() {
        let cli = Cli::try_parse_from([
            "ordo",
            "up",
            "--payment-decline-rate",
            "0.2",
            "--max-saga-backlog",
            "7",
            "--saga-timeout-secs",
            "9",
        ])
        .unwrap();
        assert_eq!(cli.settings.saga.payment_decline_rate, 0.2);
        assert_eq!(cli.settings.load_shedding.max_saga_backlog, 7);
        assert_eq!(cli.settings.saga.saga_timeout_secs, 9);
        let cli =
            Cli::try_parse_from(["ordo", "run", "saga", "--webhook-url", "http://x/"]).unwrap();
        assert_eq!(cli.settings.saga.webhook_url.as_deref(), Some("http://x/"));

        // Built as parsing builds it: global flags reach every subcommand then.
        let mut command = Cli::command();
        command.build();
        let help = command
            .find_subcommand_mut("up")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in [
            "--payment-decline-rate",
            "--payment-latency-ms",
            "--saga-timeout-secs",
            "--webhook-url",
            "--notify-failure-rate",
            "--max-saga-backlog",
            "--max-projection-lag",
            "--customer-order-rate",
            "--customer-order-burst",
            "--nats-url",
            "--nats-context",
            "--http-token",
        ] {
            assert!(help.contains(flag), "`ordo up --help` does not list {flag}");
        }
    }

    #[test]
    fn completions_and_the_manual_page_cover_the_commands() {
        let mut command = Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut command,
            "ordo",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("complete -F _ordo"), "{script}");
        assert!(script.contains("--payment-decline-rate"));

        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH ordo"),
            "{page}"
        );
        assert!(page.contains("partitions"));

        let dir = tempfile::tempdir().unwrap();
        print_man(Some(dir.path())).unwrap();
        assert!(dir.path().join("ordo.1").is_file());
        assert!(dir.path().join("ordo-up.1").is_file());
    }
}
