//! [`Settings`]: everything a deployment of ordo is configured with, as flags and environment
//! variables of the `ordo` command and as a value for a program that runs ordo as a library.

use std::{net::SocketAddr, path::PathBuf};

use crate::{
    components::{HttpAccess, LoadSheddingOptions, SagaOptions, StreamSettings},
    connect::NatsAuth,
};

/// The name of the home directory `ordo up` makes when none is configured or found.
const DEFAULT_HOME: &str = ".ordo";

#[derive(clap::Args, Clone, Debug)]
pub struct Settings {
    /// NATS server URL (a comma-separated list for a cluster). Unset, `ordo up` uses
    /// 127.0.0.1:4222 if a nats-server >= 2.12 with JetStream answers there, else starts one;
    /// the commands a person types use NATS_URL or the context --nats-context names when none
    /// of ordo's NATS settings is given, else the server `ordo up` started. (Its value is never
    /// shown by --help: a URL may carry a password.)
    #[arg(long, env = "ORDO_NATS_URL", hide_env_values = true, global = true)]
    pub nats_url: Option<String>,

    /// A context of the `nats` CLI (a name under ~/.config/nats/context, or a .json file) for
    /// the commands a person types: its URL, credentials and TLS files are used when none of
    /// ordo's NATS settings is given and the NATS_* variables do not give them. `ordo up`
    /// writes one named `ordo` for the local server it uses.
    #[arg(long, env = "NATS_CONTEXT", global = true)]
    pub nats_context: Option<String>,

    /// PostgreSQL URL of the read views. Unset, `ordo up` uses database `ordo` on a local server
    /// that accepts `postgres` without a password, else starts a private one under .ordo/pg.
    /// (Its value is never shown by --help: a URL may carry a password.)
    #[arg(long, env = "ORDO_DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Address of the HTTP read API.
    #[arg(
        long,
        env = "ORDO_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub http_addr: SocketAddr,

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
    pub http_max_reads_in_flight: usize,

    /// The console's link from an order to its trace: a trace viewer's URL with `{trace_id}` in
    /// it, e.g. `http://localhost:16686/trace/{trace_id}` for Jaeger. Unset: the trace id is
    /// shown without a link.
    #[arg(long, env = "ORDO_TRACE_URL", value_parser = trace_url, global = true)]
    pub trace_url: Option<String>,

    /// `ordo run`: serve this process's metrics (Prometheus text, `GET /metrics`) on this
    /// address. `ordo up` and `ordo run api` serve them on the API's address (and `ordo up` only
    /// there).
    #[arg(long, env = "ORDO_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,

    /// How many partitions the command service and each view's projectors spread aggregates
    /// over, each owned by one instance at a time. Every instance must run with the same count:
    /// one started with another count than the live ones stops with an error, and a projector
    /// refuses a view that keeps another count (a rebuild gives the view this one). How to
    /// choose it and how to change it: docs/operations.md, "Partitions".
    #[arg(
        long,
        env = "ORDO_PARTITIONS",
        default_value_t = ordo_commands::service::DEFAULT_PARTITIONS,
        value_parser = clap::value_parser!(u32)
            .range(1..=i64::from(ordo_eventstore::ownership::MAX_PARTITIONS)),
        global = true
    )]
    pub partitions: u32,

    /// Where `ordo up` keeps the data of servers it starts itself, and records their URLs for
    /// the other commands. Unset: the nearest `.ordo` directory here or above (as git finds
    /// `.git`), else `.ordo` here.
    #[arg(long, env = "ORDO_HOME", global = true)]
    pub home: Option<PathBuf>,

    #[command(flatten)]
    pub nats_auth: NatsAuth,

    #[command(flatten)]
    pub http_access: HttpAccess,

    #[command(flatten)]
    pub saga: SagaOptions,

    #[command(flatten)]
    pub load_shedding: LoadSheddingOptions,

    #[command(flatten)]
    pub streams: StreamSettings,
}

impl Settings {
    /// Settings from `ordo`'s flags, and from its environment variables as the binary reads
    /// them, for a program that runs ordo as a library:
    /// `Settings::from_args(["--nats-url", url, "--database-url", database])`.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            settings: Settings,
        }
        let args = std::iter::once("ordo".into()).chain(args.into_iter().map(Into::into));
        <Flags as clap::Parser>::try_parse_from(args).map(|flags| flags.settings)
    }

    /// When none of ordo's own NATS settings is given, takes the NATS URL, credentials and TLS
    /// files from the `NATS_*` variables and the context named by `--nats-context`
    /// ([`crate::nats_tools`]). The binary does so for the commands a person types, not for
    /// `ordo up`, `ordo run` or `ordo chaos`.
    pub fn adopt_nats_tool_settings(&mut self) -> anyhow::Result<()> {
        crate::nats_tools::fill_in(
            &mut self.nats_url,
            &mut self.nats_auth,
            self.nats_context.as_deref(),
            &|name| std::env::var(name).ok(),
        )
    }

    /// The home directory: as configured, else the nearest `.ordo` here or above, else `.ordo`.
    pub fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(|| {
            std::env::current_dir()
                .ok()
                .and_then(|here| {
                    here.ancestors()
                        .map(|dir| dir.join(DEFAULT_HOME))
                        .find(|home| home.is_dir())
                })
                .unwrap_or_else(|| PathBuf::from(DEFAULT_HOME))
        })
    }

    /// The NATS URL: as configured, else the one `ordo up` recorded, else the default.
    pub fn nats_url(&self) -> String {
        crate::connect::configured_url(self.nats_url.clone(), &self.home())
    }

    /// The database URL: as configured, else the one `ordo up` recorded, else the default.
    pub fn database_url(&self) -> String {
        crate::database::configured_url(self.database_url.clone(), &self.home())
    }
}

/// A trace viewer's URL template: http(s), with `{trace_id}` where the id goes.
fn trace_url(text: &str) -> Result<String, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err(format!("{text:?} is not an http:// or https:// URL"));
    }
    if !text.contains("{trace_id}") {
        return Err(format!(
            "{text:?} has no {{trace_id}} for the trace id to go in"
        ));
    }
    Ok(text.to_owned())
}
