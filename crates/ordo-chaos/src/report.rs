//! What a drill reports: its [`Report`], printed for a terminal, and its progress while it runs.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{Outage, check, fleet::Component, load, partitions};

#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub passed: bool,
    pub duration_secs: f64,
    pub settle_secs: f64,
    pub settled: bool,
    pub instances: usize,
    pub rate: f64,
    pub commands: load::CommandCounts,
    /// Attacks the hostile client sent, by kind (none without accounts of the drill's own).
    pub attacks: BTreeMap<&'static str, u64>,
    pub kills: BTreeMap<Component, u32>,
    pub nats_restarts: u32,
    /// Cluster nodes killed, as "n2 (leader of ORDO_ORDERS)".
    pub node_kills: Vec<String>,
    pub outages: Vec<Outage>,
    /// How quickly the command service's partitions were served again after losing an owner.
    pub partitions: partitions::PartitionsReport,
    /// Processes that exited without being killed: (component, instance, status).
    pub unexpected_exits: Vec<(Component, usize, String)>,
    pub orders: BTreeMap<String, u64>,
    /// Why rejected orders were rejected.
    pub rejections: BTreeMap<String, u64>,
    /// Notifications by status (sent, dead_lettered after their attempts).
    pub notifications: BTreeMap<String, u64>,
    pub events: BTreeMap<String, usize>,
    pub still_moving: Vec<String>,
    pub violations: Vec<check::Violation>,
    pub logs: PathBuf,
}

/// The report as a person reads it.
pub fn print(report: &Report) {
    let c = &report.commands;
    println!("ordo chaos — seed {}", report.seed);
    println!(
        "  load        {:.0} s at {} commands/s, {} instances of each worker",
        report.duration_secs, report.rate, report.instances
    );
    println!(
        "  commands    {} sent, {} acknowledged, {} refused {:?}, {} unanswered, {} retries, {} repeats of accepted orders",
        c.sent,
        c.acknowledged,
        c.refused.values().sum::<u64>(),
        c.refused,
        c.unanswered,
        c.retries,
        c.repeats
    );
    if report.attacks.is_empty() {
        println!("  attacks     none (no accounts of the drill's own)");
    } else {
        println!(
            "  attacks     {} sent as shop and warehouse {:?}",
            report.attacks.values().sum::<u64>(),
            report.attacks
        );
    }
    let kills: Vec<String> = report
        .kills
        .iter()
        .map(|(c, n)| format!("{} {n}", c.name()))
        .collect();
    println!(
        "  kills       {}",
        if kills.is_empty() {
            "none".into()
        } else {
            kills.join(", ")
        }
    );
    println!("  nats-server {} restarts", report.nats_restarts);
    if !report.node_kills.is_empty() {
        println!(
            "  nats nodes  {} killed: {}",
            report.node_kills.len(),
            report.node_kills.join(", ")
        );
    }
    for outage in &report.outages {
        println!(
            "  outage      every {} for {} s",
            outage.component.name(),
            outage.secs
        );
    }
    let p = &report.partitions;
    println!(
        "  partitions  served again {} times after losing an owner (writers, saga intake, projectors), at the latest after {:.1} s ({} s allowed){}",
        p.served_again,
        p.longest_unserved_ms as f64 / 1_000.0,
        partitions::SERVED_AGAIN_WITHIN.as_secs(),
        if p.unread_samples > 0 {
            format!("; the bucket could not be read {} times", p.unread_samples)
        } else {
            String::new()
        }
    );
    for (component, index, status) in &report.unexpected_exits {
        println!(
            "  exited      {}-{index} on its own: {status}",
            component.name()
        );
    }
    println!("  orders      {:?}", report.orders);
    println!("  rejected    {:?}", report.rejections);
    println!("  notified    {:?}", report.notifications);
    println!("  events      {:?}", report.events);
    println!(
        "  settled     {} after {:.1} s{}",
        if report.settled { "yes" } else { "NO" },
        report.settle_secs,
        if report.still_moving.is_empty() {
            String::new()
        } else {
            format!(" (still moving: {})", report.still_moving.join("; "))
        }
    );
    println!("  logs        {}", report.logs.display());
    if report.violations.is_empty() {
        println!("  violations  0 — every invariant holds");
    } else {
        println!("  violations  {}", report.violations.len());
        for violation in report.violations.iter().take(50) {
            println!("    [{}] {}", violation.invariant, violation.detail);
        }
        if report.violations.len() > 50 {
            println!(
                "    … {} more in the JSON report",
                report.violations.len() - 50
            );
        }
    }
}

/// Progress while the drill runs: a bar on a terminal, a line every 5 s otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Mutex<Instant>,
}

impl Progress {
    pub(crate) fn new(duration: Duration) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(duration.as_secs());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            last_line: Mutex::new(Instant::now()),
        }
    }

    pub(crate) fn note(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(format!("ordo chaos: {line}")),
            None => eprintln!("ordo chaos: {line}"),
        }
    }

    pub(crate) fn tick(
        &self,
        elapsed: Duration,
        history: &load::History,
        kills: &BTreeMap<Component, u32>,
    ) {
        let c = history.counts();
        let message = format!(
            "{} sent · {} ok · {} unanswered · {} retries · {} kills",
            c.sent,
            c.acknowledged,
            c.unanswered,
            c.retries,
            kills.values().sum::<u32>()
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(elapsed.as_secs());
                bar.set_message(message);
            }
            None => self.every_5_s(|| format!("{:>4.0} s: {message}", elapsed.as_secs_f64())),
        }
    }

    pub(crate) fn settling(&self, elapsed: Duration, moving: &[String]) {
        let message = if moving.is_empty() {
            "quiet".to_owned()
        } else {
            moving.join("; ")
        };
        match &self.bar {
            Some(bar) => bar.set_message(format!(
                "settling {:.0} s: {message}",
                elapsed.as_secs_f64()
            )),
            None => {
                self.every_5_s(|| format!("settling {:.0} s: {message}", elapsed.as_secs_f64()))
            }
        }
    }

    fn every_5_s(&self, line: impl FnOnce() -> String) {
        let mut last = self.last_line.lock().expect("not poisoned");
        if last.elapsed() >= Duration::from_secs(5) {
            eprintln!("ordo chaos: {}", line());
            *last = Instant::now();
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
