//! The system under test: a nats-server and a database of the benchmark's own, and `ordo`
//! processes (the release binary built next to this one) against them.

use ordo_contract::Endpoint;
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use ordo_testkit::{NatsServer, TestDatabase};

pub struct Servers {
    pub nats: NatsServer,
    pub database: TestDatabase,
    pub client: async_nats::Client,
    pub logs: tempfile::TempDir,
}

impl Servers {
    pub async fn start() -> anyhow::Result<Self> {
        let nats = NatsServer::start();
        let client = nats.client().await;
        NatsServer::wait_for_jetstream(&client).await;
        let database = TestDatabase::create().await;
        Ok(Self {
            nats,
            database,
            client,
            // ORDO_BENCH_KEEP_LOGS=1 keeps the processes' logs for a look after the run.
            logs: tempfile::Builder::new()
                .prefix("ordo-bench-")
                .disable_cleanup(std::env::var_os("ORDO_BENCH_KEEP_LOGS").is_some())
                .tempdir()?,
        })
    }

    /// Sends a stock receive until it is accepted: the command service is up.
    pub async fn received(&self, sku: &str, qty: u64, what: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({"sku": sku, "qty": qty}).to_string();
        wait_until(Duration::from_secs(60), what, || {
            let (client, body) = (self.client.clone(), body.clone());
            async move {
                client
                    .request(Endpoint::StockReceive.subject(), body.into())
                    .await
                    .is_ok_and(|reply| crate::measure::reply_outcome(&reply.payload) == "ok")
            }
        })
        .await
    }

    /// Starts `ordo <args>` against these servers; it is killed when dropped.
    pub fn spawn(&self, name: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Ordo> {
        let log = std::fs::File::create(self.logs.path().join(format!("{name}.log")))?;
        let child = Command::new(ordo_binary()?)
            .args(args)
            .env("ORDO_NATS_URL", self.nats.url())
            .env("ORDO_DATABASE_URL", self.database.url())
            .env(
                "RUST_LOG",
                std::env::var("ORDO_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ordo")?;
        Ok(Ordo { child })
    }
}

pub struct Ordo {
    child: Child,
}

impl Ordo {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in MiB, from /proc (Linux).
    pub fn resident_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }
}

impl Drop for Ordo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `ordo` binary of the same build as this benchmark.
pub fn ordo_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::current_exe()?.with_file_name("ordo");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it with `cargo build --release -p ordo` (scripts/bench does)",
        binary.display()
    );
    Ok(binary)
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// Waits until `ready` says yes, up to `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !ready().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// CPU time spent between two readings, from /proc (Linux): the whole machine's, and that of a
/// few processes of interest.
pub struct CpuMeter {
    machine: f64,
    processes: Vec<(&'static str, u32, f64)>,
}

/// Seconds of CPU the machine spent busy (user, nice, system, irq, softirq), since boot.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let jiffies: Vec<f64> = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .map(|fields| {
            fields
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .filter_map(|i| jiffies.get(*i))
        .sum::<f64>();
    busy / clock_ticks()
}

/// Seconds of CPU process `pid` spent (user and system), since it started.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0.0))
                .collect()
        })
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    // USER_HZ: 100 on every Linux this runs on.
    100.0
}

impl CpuMeter {
    pub fn start(processes: &[(&'static str, u32)]) -> Self {
        Self {
            machine: machine_cpu_seconds(),
            processes: processes
                .iter()
                .map(|(name, pid)| (*name, *pid, process_cpu_seconds(*pid)))
                .collect(),
        }
    }

    /// CPU seconds since `start`: the machine's, and each process's by name.
    pub fn read(&self) -> (f64, Vec<(&'static str, f64)>) {
        let machine = machine_cpu_seconds() - self.machine;
        let processes = self
            .processes
            .iter()
            .map(|(name, pid, before)| (*name, process_cpu_seconds(*pid) - before))
            .collect();
        (machine, processes)
    }
}
