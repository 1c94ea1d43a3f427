//! The NATS configuration docker/ ships, for the tests that run ordo under it: its accounts
//! (docker/nats-accounts.conf) as they are, a password for each of its users, and which user each component runs as.

use std::path::Path;

/// The users of docker/nats-accounts.conf and the variable each one's password is read from.
pub const USERS: [(&str, &str); 9] = [
    ("ordo-operator", "ORDO_OPERATOR_NATS_PASSWORD"),
    ("ordo-admin", "ORDO_ADMIN_NATS_PASSWORD"),
    ("ordo-commands", "ORDO_COMMANDS_NATS_PASSWORD"),
    ("ordo-projector", "ORDO_PROJECTOR_NATS_PASSWORD"),
    ("ordo-saga", "ORDO_SAGA_NATS_PASSWORD"),
    ("ordo-notifier", "ORDO_NOTIFIER_NATS_PASSWORD"),
    ("ordo-api", "ORDO_API_NATS_PASSWORD"),
    ("shop", "SHOP_NATS_PASSWORD"),
    ("warehouse", "WAREHOUSE_NATS_PASSWORD"),
];

/// The long-running components (`ordo run …`) and the user each connects as, as compose.yaml
/// runs them.
pub const COMPONENTS: [(&str, &str); 5] = [
    ("commands", "ordo-commands"),
    ("projector", "ordo-projector"),
    ("saga", "ordo-saga"),
    ("notifier", "ordo-notifier"),
    ("api", "ordo-api"),
];

/// The password this test run gives `user`.
pub fn password(user: &str) -> String {
    format!("{user}-pw-4e1d")
}

/// The inbox `user` may read: ordo's users their own, applications `_INBOX` (the default of
/// NATS clients).
pub fn inbox_prefix(user: &str) -> String {
    if user.starts_with("ordo-") {
        format!("_INBOX_{user}")
    } else {
        "_INBOX".to_owned()
    }
}

/// The password variables, then docker/nats-accounts.conf as shipped: the part of a test
/// server's configuration that says who may do what.
pub fn accounts_config() -> String {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docker/nats-accounts.conf"),
    )
    .unwrap();
    let variables: String = USERS
        .iter()
        .map(|(user, variable)| format!("{variable}: \"{}\"\n", password(user)))
        .collect();
    format!("{variables}{shipped}")
}

/// ordo deployed as docker/compose.yaml deploys it, on a test server with the shipped accounts:
/// the streams applied as the operator, the database set up, then each component its own
/// process connected as its own user. Killed when dropped.
#[allow(dead_code)] // Each test binary uses its part.
pub struct Shipped {
    pub server: ordo_testkit::NatsServer,
    pub database: ordo_testkit::TestDatabase,
    /// The components' logs, and their home.
    pub dir: tempfile::TempDir,
    /// The read API's address.
    pub http: String,
    /// Settings every component is started with, beside its user's.
    extra_env: Vec<(String, String)>,
    processes: std::collections::BTreeMap<&'static str, ordo_testkit::OrdoProcess>,
}

#[allow(dead_code)]
impl Shipped {
    pub const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

    /// Starts every component, each given `extra_env` too (flags' variables, tokens).
    pub async fn start(extra_env: &[(&str, &str)]) -> Self {
        let server = ordo_testkit::NatsServer::start_with_config(&accounts_config());
        let database = ordo_testkit::TestDatabase::create().await;
        let dir = tempfile::tempdir().unwrap();
        let http = free_address();
        let mut shipped = Self {
            server,
            database,
            dir,
            http,
            extra_env: extra_env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            processes: Default::default(),
        };
        // Set-up, as compose's one-shot services: the streams as the operator, then the database.
        for (args, user) in [
            (&["streams", "apply"][..], "ordo-admin"),
            (&["migrate"][..], "ordo-admin"),
        ] {
            let output = std::process::Command::new(Self::ORDO)
                .args(args)
                .envs(shipped.env(user))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "ordo {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        for (component, _) in COMPONENTS {
            shipped.start_component(component);
        }
        shipped
    }

    /// The environment of a process connected as `user`.
    pub fn env(&self, user: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("ORDO_NATS_URL".into(), self.server.url()),
            ("ORDO_NATS_USER".into(), user.into()),
            ("ORDO_NATS_PASSWORD".into(), password(user)),
            ("ORDO_DATABASE_URL".into(), self.database.url().into()),
            ("ORDO_HTTP_ADDR".into(), self.http.clone()),
            ("ORDO_HOME".into(), self.dir.path().display().to_string()),
            ("NO_COLOR".into(), "1".into()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// Starts `component` (one of [`COMPONENTS`]) as its user, logging to `<component>.log`
    /// (appended to, across restarts).
    pub fn start_component(&mut self, component: &'static str) {
        let (_, user) = COMPONENTS
            .into_iter()
            .find(|(known, _)| *known == component)
            .unwrap_or_else(|| panic!("no component {component}"));
        let log = self.dir.path().join(format!("{component}.log"));
        let earlier = std::fs::read_to_string(&log).unwrap_or_default();
        let process =
            ordo_testkit::OrdoProcess::start(Self::ORDO, &["run", component], self.env(user), &log);
        // OrdoProcess writes the log afresh: keep what the earlier process wrote before it.
        if !earlier.is_empty() {
            std::fs::write(
                self.dir.path().join(format!("{component}.earlier.log")),
                earlier,
            )
            .unwrap();
        }
        self.processes.insert(component, process);
    }

    /// Stops `component` with SIGKILL.
    pub fn kill_component(&mut self, component: &str) {
        if let Some(process) = self.processes.remove(component) {
            process.signal("-KILL");
        }
    }

    /// No component was refused anything by the server: the shipped permissions are enough for
    /// ordo itself.
    pub fn components_were_refused_nothing(&self) {
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|extension| extension == "log") {
                let logged = std::fs::read_to_string(&path).unwrap();
                assert!(
                    !logged.contains("Permissions Violation"),
                    "{} was refused: {logged}",
                    path.display()
                );
            }
        }
    }
}

/// A connection to `url` as `user`, with the inbox the server lets that user read.
#[allow(dead_code)]
pub async fn connect_as(url: &str, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .custom_inbox_prefix(inbox_prefix(user))
        .connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect as {user}: {err}"))
}

/// `127.0.0.1:<a port nothing listens on now>`.
#[allow(dead_code)]
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
}
