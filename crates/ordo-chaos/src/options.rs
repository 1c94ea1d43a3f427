//! What a drill is asked for: `ordo chaos`'s flags.

use std::path::PathBuf;

use serde::Serialize;

use crate::fleet::Component;

/// `COMPONENT:SECS`: every instance of a component killed at once, back after SECS.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Outage {
    pub component: Component,
    pub secs: f64,
}

fn outage(text: &str) -> Result<Outage, String> {
    let (name, secs) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not COMPONENT:SECS (e.g. commands:15)"))?;
    let component = Component::parse(name)
        .filter(|c| *c != Component::Api)
        .ok_or_else(|| format!("{name:?} is not one of commands, projector, saga, notifier"))?;
    let secs: f64 = secs
        .parse()
        .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("an outage lasts more than 0 s, not {secs}"));
    }
    Ok(Outage { component, secs })
}

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosOptions {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Instances of each worker (command services, projectors, saga coordinators, notifiers).
    #[arg(long, default_value_t = 2)]
    pub instances: usize,
    /// Seconds between SIGKILLs of a random worker (0: none).
    #[arg(long, default_value_t = 2.0)]
    pub kill_interval: f64,
    /// How often nats-server is SIGKILLed and kept down during the load.
    #[arg(long, default_value_t = 0)]
    pub nats_restarts: u32,
    /// How long nats-server stays down each time, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub nats_down: f64,
    /// Run against a cluster of this many nats-servers (3, 5…), every stream with as many
    /// replicas. 0: one nats-server.
    #[arg(long, default_value_t = 0)]
    pub cluster: usize,
    /// How often the node leading ORDO_ORDERS, then the one leading ORDO_STOCK (in turn), is
    /// SIGKILLed and kept down during the load (needs --cluster).
    #[arg(long, default_value_t = 0)]
    pub kill_nodes: u32,
    /// How long a killed node stays down, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub node_down: f64,
    /// Take every instance of a component away at once for SECS (repeatable), e.g. commands:15.
    #[arg(long = "outage", value_parser = outage)]
    pub outages: Vec<Outage>,
    /// Concurrent clients sending commands.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Commands per second, all clients together (about 60 % of them places). The default stays
    /// under what the saga coordinators confirm today, so that a drill tests faults, not
    /// overload.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// The seed of the load and of the fault schedule (random when absent; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How long to wait for the system to settle after the load, in seconds.
    #[arg(long, default_value_t = 180.0)]
    pub settle_timeout: f64,
    /// Share of payments the simulated gateway declines.
    #[arg(long, default_value_t = 0.2)]
    pub decline_rate: f64,
    /// Share of notification deliveries that fail (and are retried).
    #[arg(long, default_value_t = 0.1)]
    pub notify_failure_rate: f64,
    /// Where the processes' logs go (default: a new temporary directory, kept).
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// The partition count the command services run with (`ordo`'s `--partitions`, passed on
    /// by the command line; none: theirs by default).
    #[arg(skip)]
    pub partitions: Option<u32>,
}
