//! The system under test as OS processes: `ordo run …` instances of each component, started,
//! SIGKILLed and started again, and the nats-server the drill owns.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// A long-running component of ordo, as `ordo run` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Commands,
    Projector,
    Saga,
    Notifier,
    Api,
}

impl Component {
    /// The components a drill kills at random (the API only serves reads).
    pub const WORKERS: [Component; 4] =
        [Self::Commands, Self::Projector, Self::Saga, Self::Notifier];

    pub fn name(self) -> &'static str {
        match self {
            Self::Commands => "commands",
            Self::Projector => "projector",
            Self::Saga => "saga",
            Self::Notifier => "notifier",
            Self::Api => "api",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Commands,
            Self::Projector,
            Self::Saga,
            Self::Notifier,
            Self::Api,
        ]
        .into_iter()
        .find(|component| component.name() == name)
    }
}

/// How every process of the fleet is started.
pub struct Launch {
    pub binary: PathBuf,
    pub env: Vec<(String, String)>,
    /// The NATS user and password each component connects as (none: the server has no users).
    pub users: BTreeMap<Component, (String, String)>,
    pub logs: PathBuf,
}

struct Process {
    component: Component,
    index: usize,
    child: Option<Child>,
}

/// Every process of the system under test.
pub struct Fleet {
    launch: Launch,
    processes: Vec<Process>,
    pub kills: BTreeMap<Component, u32>,
}

impl Fleet {
    /// Starts `instances` of every worker, and one API.
    pub fn start(launch: Launch, instances: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(&launch.logs)?;
        let mut fleet = Self {
            launch,
            processes: Vec::new(),
            kills: BTreeMap::new(),
        };
        for component in Component::WORKERS {
            for index in 0..instances {
                fleet.processes.push(Process {
                    component,
                    index,
                    child: None,
                });
            }
        }
        fleet.processes.push(Process {
            component: Component::Api,
            index: 0,
            child: None,
        });
        for slot in 0..fleet.processes.len() {
            fleet.spawn(slot)?;
        }
        Ok(fleet)
    }

    fn spawn(&mut self, slot: usize) -> std::io::Result<()> {
        let process = &self.processes[slot];
        let log_path = self.launch.logs.join(format!(
            "{}-{}.log",
            process.component.name(),
            process.index
        ));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let child = Command::new(&self.launch.binary)
            .args(["run", process.component.name()])
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)))
            .envs(
                self.launch
                    .users
                    .get(&process.component)
                    .into_iter()
                    .flat_map(|(user, password)| {
                        [("ORDO_NATS_USER", user), ("ORDO_NATS_PASSWORD", password)]
                    }),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.processes[slot].child = Some(child);
        Ok(())
    }

    /// Slots of running processes of `component` (any worker when `None`).
    pub fn running(&self, component: Option<Component>) -> Vec<usize> {
        self.processes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.child.is_some() && p.component != Component::Api)
            .filter(|(_, p)| component.is_none_or(|c| c == p.component))
            .map(|(slot, _)| slot)
            .collect()
    }

    pub fn component_of(&self, slot: usize) -> Component {
        self.processes[slot].component
    }

    /// SIGKILL, as a crash: no clean-up, no goodbye.
    pub fn kill(&mut self, slot: usize) {
        if let Some(mut child) = self.processes[slot].child.take() {
            let _ = child.kill();
            let _ = child.wait();
            *self
                .kills
                .entry(self.processes[slot].component)
                .or_default() += 1;
        }
    }

    /// Starts every process that is not running (after kills or an outage).
    pub fn restart_stopped(&mut self, component: Option<Component>) -> std::io::Result<()> {
        for slot in 0..self.processes.len() {
            let process = &self.processes[slot];
            if process.child.is_none() && component.is_none_or(|c| c == process.component) {
                self.spawn(slot)?;
            }
        }
        Ok(())
    }

    /// Processes that exited on their own (not killed by the drill): a crash worth reporting.
    /// Each as (slot, component, instance, exit status).
    pub fn exited(&mut self) -> Vec<(usize, Component, usize, String)> {
        let mut exited = Vec::new();
        for (slot, process) in self.processes.iter_mut().enumerate() {
            if let Some(child) = &mut process.child
                && let Ok(Some(status)) = child.try_wait()
            {
                exited.push((slot, process.component, process.index, status.to_string()));
                process.child = None;
            }
        }
        exited
    }

    /// Starts the process of `slot` again if it is not running.
    pub fn restart(&mut self, slot: usize) -> std::io::Result<()> {
        if self.processes[slot].child.is_none() {
            self.spawn(slot)?;
        }
        Ok(())
    }

    /// SIGTERM to every process, then SIGKILL to those still running after `grace`.
    pub fn stop(&mut self, grace: std::time::Duration) {
        for process in &self.processes {
            if let Some(child) = &process.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = std::time::Instant::now() + grace;
        for process in &mut self.processes {
            if let Some(mut child) = process.child.take() {
                while std::time::Instant::now() < deadline {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for process in &mut self.processes {
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
