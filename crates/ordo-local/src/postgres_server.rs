//! A PostgreSQL cluster of our own: for `ordo up` when none answers (data kept under
//! `.ordo/pg`), and for tests that stop and start the database on purpose (temporary data).
//! `initdb` and `postgres` refuse to run as root, so as root they run as the `postgres` user.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub struct PostgresServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    run_as_postgres: bool,
    /// Temporary clusters skip fsync (tests); kept ones do not.
    durable: bool,
    _temporary: Option<tempfile::TempDir>,
}

impl PostgresServer {
    /// A cluster in a temporary directory, deleted on drop.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ordo-pg-")
            .tempdir()
            .expect("create a temporary directory for PostgreSQL");
        let mut server =
            Self::start_in(dir.path(), false).unwrap_or_else(|problem| panic!("{problem}"));
        server._temporary = Some(dir);
        server
    }

    /// A cluster whose data stays in `<dir>/data` (created by initdb the first time), started
    /// on a free port with trust authentication on 127.0.0.1 only. It stops when dropped.
    pub fn start_kept(dir: &Path) -> Result<Self, String> {
        Self::start_in(dir, true)
    }

    fn start_in(dir: &Path, durable: bool) -> Result<Self, String> {
        let bin = find_postgres_bin()?;
        let run_as_postgres = is_root();
        std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
        // The server resolves relative paths from its data directory: give it absolute ones.
        let dir = &std::fs::canonicalize(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        if run_as_postgres {
            run(Command::new("chown").arg("-R").arg("postgres").arg(dir))?;
        }
        let server = Self {
            bin,
            data: dir.join("data"),
            port: crate::nats::free_port(),
            run_as_postgres,
            durable,
            _temporary: None,
        };
        if !server.data.join("PG_VERSION").exists() {
            run(server.command("initdb").arg("-D").arg(&server.data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ]))?;
        }
        server.start_again()?;
        Ok(server)
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.run_as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// The URL of `database` on this server, as the `postgres` superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the server (again) on the same port and data.
    pub fn start_again(&self) -> Result<(), String> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.data.display()
        );
        if !self.durable {
            options.push_str(" -c fsync=off");
        }
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("postgres.log"))
            .args(["-w", "-o", &options, "start"]))
    }

    /// From now on every role but `postgres` (the tests' administrator) must give its password
    /// over TCP (SCRAM), as in production.
    pub fn require_passwords(&self) -> Result<(), String> {
        let rules = "host all postgres 127.0.0.1/32 trust\n\
                     host all all 127.0.0.1/32 scram-sha-256\n";
        std::fs::write(self.data.join("pg_hba.conf"), rules)
            .map_err(|err| format!("write pg_hba.conf: {err}"))?;
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("reload"))
    }

    /// From now on the server offers TLS with `certificate` and `key` (PEM), and accepts TCP
    /// connections only over TLS, as a server on another machine should.
    pub fn require_tls(&self, certificate: &str, key: &str) -> Result<(), String> {
        let write = |name: &str, pem: &str| {
            let path = self.data.join(name);
            std::fs::write(&path, pem).map_err(|err| format!("write {name}: {err}"))?;
            // PostgreSQL reads them as the data directory's owner, and refuses a key that
            // others may read.
            #[cfg(unix)]
            {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let owner = std::fs::metadata(&self.data)
                    .map_err(|err| format!("stat the data directory: {err}"))?;
                std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))
                    .map_err(|err| format!("chown {name}: {err}"))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|err| format!("chmod {name}: {err}"))?;
            }
            Ok::<_, String>(())
        };
        write("server.crt", certificate)?;
        write("server.key", key)?;
        let mut conf = std::fs::read_to_string(self.data.join("postgresql.conf"))
            .map_err(|err| format!("read postgresql.conf: {err}"))?;
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(self.data.join("postgresql.conf"), conf)
            .map_err(|err| format!("write postgresql.conf: {err}"))?;
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .map_err(|err| format!("write pg_hba.conf: {err}"))?;
        // A restart rather than a reload: the server then answers only once TLS is on.
        self.stop();
        self.start_again()
    }

    /// The URL of `database` on this server as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Stops the server at once, as an outage would (connections are cut).
    pub fn stop(&self) {
        let _ = run(self.command("pg_ctl").arg("-D").arg(&self.data).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]));
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|err| format!("{command:?}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory of `initdb` and `pg_ctl`: Debian's newest `/usr/lib/postgresql/*/bin`, else PATH.
pub fn find_postgres_bin() -> Result<PathBuf, String> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|dir| dir.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|bin| bin.join("initdb").exists());
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|version| version.file_name())
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versions.pop() {
        return Ok(newest);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb, pg_ctl) found: install the `postgresql` package \
             (scripts/up does), or set ORDO_DATABASE_URL"
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[tokio::test]
    async fn a_private_cluster_stops_and_starts_on_the_same_data() {
        let server = PostgresServer::start();
        let mut connection = sqlx::PgConnection::connect(&server.url("postgres"))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE kept (n int)")
            .execute(&mut connection)
            .await
            .unwrap();
        drop(connection);
        server.stop();
        assert!(
            sqlx::PgConnection::connect(&server.url("postgres"))
                .await
                .is_err()
        );
        server.start_again().unwrap();
        let mut connection = sqlx::PgConnection::connect(&server.url("postgres"))
            .await
            .unwrap();
        sqlx::query("SELECT n FROM kept")
            .execute(&mut connection)
            .await
            .unwrap();
    }
}
