//! The drill's faults, on a schedule drawn from the seed: a SIGKILL of a random worker every
//! `--kill-interval` (started again 0.2 to 1.5 s later), whole components taken away for
//! `--outage COMPONENT:SECS`, and the times at which nats-server goes down.

use std::time::{Duration, Instant};

use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

use super::{
    ChaosOptions, Outage, Progress,
    fleet::{Component, Fleet},
    secs,
};

/// Something the drill took away, to be started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// One killed (or crashed) process: its slot in the fleet.
    Process(usize),
    /// Every instance of a component (an outage).
    Component(Component),
}

pub struct Faults {
    rng: StdRng,
    kill_interval: Option<Duration>,
    next_kill: Instant,
    /// When each outage starts, in order.
    outages: Vec<(Duration, Outage)>,
    next_outage: usize,
    /// When nats-server goes down, in order.
    nats_server_at: Vec<Duration>,
    next_nats_server: usize,
    /// When a cluster node (the leader of a stream) is killed, in order.
    node_kill_at: Vec<Duration>,
    next_node_kill: usize,
    leader_unknown_noted: bool,
    pub node_kills: Vec<String>,
    /// What is down, and when it comes back.
    down: Vec<(Instant, Down)>,
    pub nats_restarts: u32,
    /// Processes that exited without being killed: (component, instance, status).
    pub unexpected_exits: Vec<(Component, usize, String)>,
}

impl Faults {
    pub fn new(options: &ChaosOptions, duration: Duration, rng: StdRng, started: Instant) -> Self {
        let restarts = options.nats_restarts;
        let outages = options.outages.len() as f64;
        Self {
            rng,
            kill_interval: (options.kill_interval > 0.0).then(|| secs(options.kill_interval)),
            next_kill: started + secs(options.kill_interval),
            // Outages in the first 80 % of the load, so that the system is loaded when they end.
            outages: options
                .outages
                .iter()
                .enumerate()
                .map(|(i, outage)| {
                    (
                        duration.mul_f64((i as f64 + 0.5) / (outages + 0.5) * 0.8),
                        *outage,
                    )
                })
                .collect(),
            next_outage: 0,
            nats_server_at: (1..=restarts)
                .map(|i| duration.mul_f64(f64::from(i) / f64::from(restarts + 1)))
                .collect(),
            next_nats_server: 0,
            node_kill_at: (1..=options.kill_nodes)
                .map(|i| duration.mul_f64(f64::from(i) / f64::from(options.kill_nodes + 1)))
                .collect(),
            next_node_kill: 0,
            leader_unknown_noted: false,
            node_kills: Vec::new(),
            down: Vec::new(),
            nats_restarts: 0,
            unexpected_exits: Vec::new(),
        }
    }

    /// Restarts what is due back, kills what is due, starts the outages that are due.
    pub fn tick(
        &mut self,
        fleet: &mut Fleet,
        elapsed: Duration,
        progress: &Progress,
    ) -> std::io::Result<()> {
        let now = Instant::now();
        for (slot, component, index, status) in fleet.exited() {
            // Reported, and started again at once, as a supervisor would.
            self.down.push((now, Down::Process(slot)));
            self.unexpected_exits.push((component, index, status));
        }
        // Components whose outage is over, and killed processes, come back; a process of a
        // component in an outage waits for the outage's end.
        let due: Vec<Down> = self
            .down
            .iter()
            .filter(|(until, _)| *until <= now)
            .map(|(_, what)| *what)
            .collect();
        self.down.retain(|(until, _)| *until > now);
        for what in due {
            match what {
                Down::Component(component) => {
                    progress.note(format!("outage over: {} starts again", component.name()));
                    fleet.restart_stopped(Some(component))?;
                }
                Down::Process(slot) if !self.in_outage(fleet.component_of(slot)) => {
                    fleet.restart(slot)?
                }
                Down::Process(_) => {}
            }
        }
        if let Some(interval) = self.kill_interval
            && now >= self.next_kill
        {
            let candidates: Vec<usize> = fleet
                .running(None)
                .into_iter()
                .filter(|slot| !self.in_outage(fleet.component_of(*slot)))
                .collect();
            if let Some(slot) = candidates.choose(&mut self.rng) {
                fleet.kill(*slot);
                let back_in = Duration::from_millis(self.rng.random_range(200..1500));
                self.down.push((now + back_in, Down::Process(*slot)));
            }
            self.next_kill = now + interval;
        }
        if let Some((at, outage)) = self.outages.get(self.next_outage).copied()
            && elapsed >= at
        {
            for slot in fleet.running(Some(outage.component)) {
                fleet.kill(slot);
            }
            self.down
                .push((now + secs(outage.secs), Down::Component(outage.component)));
            progress.note(format!(
                "outage: every {} instance down for {} s",
                outage.component.name(),
                outage.secs
            ));
            self.next_outage += 1;
        }
        Ok(())
    }

    /// True when nats-server is due to go down now (once per scheduled restart).
    pub fn nats_server_due(&mut self, elapsed: Duration) -> bool {
        let due = self
            .nats_server_at
            .get(self.next_nats_server)
            .is_some_and(|at| elapsed >= *at);
        if due {
            self.next_nats_server += 1;
        }
        due
    }

    /// The stream whose leader is due to be killed now: `ORDO_ORDERS`, then `ORDO_STOCK`, in
    /// turn. It stays due until [`Self::node_killed`]: while the cluster cannot name the leader
    /// yet (still electing after the last kill), the kill waits for it rather than being lost.
    pub fn node_kill_due(&self, elapsed: Duration) -> Option<&'static str> {
        let due = self
            .node_kill_at
            .get(self.next_node_kill)
            .is_some_and(|at| elapsed >= *at);
        due.then(|| {
            if self.next_node_kill.is_multiple_of(2) {
                ordo_eventstore::StreamId::Orders.name()
            } else {
                ordo_eventstore::StreamId::Stock.name()
            }
        })
    }

    /// The leader of the stream [`Self::node_kill_due`] named was killed, as `what`.
    pub fn node_killed(&mut self, what: String) {
        self.node_kills.push(what);
        self.next_node_kill += 1;
        self.leader_unknown_noted = false;
    }

    /// Whether to say that the due kill waits for a leader: once per kill.
    pub fn note_leader_unknown(&mut self) -> bool {
        !std::mem::replace(&mut self.leader_unknown_noted, true)
    }

    fn in_outage(&self, component: Component) -> bool {
        self.down
            .iter()
            .any(|(_, what)| *what == Down::Component(component))
    }
}
