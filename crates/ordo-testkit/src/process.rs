//! [`OrdoProcess`]: an `ordo` process of a test's own, for the tests of what only a process
//! shows (the command line, environment variables, signals, exit codes, per-process telemetry,
//! the shipped deployment's users). Killed when dropped.

use std::{
    ffi::OsStr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

pub struct OrdoProcess {
    child: Child,
}

impl OrdoProcess {
    /// Starts `binary args` with `env` (and `NO_COLOR`), its stdout discarded and its stderr
    /// written to `log`.
    pub fn start<K, V>(
        binary: &str,
        args: &[&str],
        env: impl IntoIterator<Item = (K, V)>,
        log: &Path,
    ) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let log = std::fs::File::create(log)
            .unwrap_or_else(|err| panic!("creating {}: {err}", log.display()));
        let child = Command::new(binary)
            .args(args)
            .envs(env)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {binary} {args:?}: {err}"));
        Self { child }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and the exit status it ends with.
    pub fn terminate(self) -> ExitStatus {
        self.signal("-TERM")
    }

    /// `signal` (as `kill` spells it), and the exit status it ends with within 10 s.
    pub fn signal(mut self, signal: &str) -> ExitStatus {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                return status;
            }
            assert!(Instant::now() < deadline, "ordo did not stop on {signal}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OrdoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
