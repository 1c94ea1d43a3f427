//! The `ordo` binary as a person uses it: against a real nats-server, through its CLI.

use ordo_contract::Endpoint;
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use ordo_eventstore::ConsumerId;
use ordo_testkit::{NatsServer, OrdoProcess};
use serde_json::{Value, json};

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

/// `ordo run commands` on `url` in the background, its log in `log`.
fn commands(url: &str, log: &Path) -> OrdoProcess {
    OrdoProcess::start(ORDO, &["run", "commands"], [("ORDO_NATS_URL", url)], log)
}

/// A port nothing listens on yet.
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port nothing listens on yet, and its NATS URL.
fn unused_nats_url() -> (u16, String) {
    let port = unused_port();
    (port, format!("nats://127.0.0.1:{port}"))
}

/// What `ordo streams apply` prints on a server that has none of the streams yet.
const EVERY_STREAM_CREATED: &str = "ORDO_ORDERS: created\nORDO_STOCK: created\nORDO_COMMAND_OUTCOMES: created\nORDO_SNAPSHOTS: created\n";

fn ordo(url: &str, args: &[&str]) -> Output {
    Command::new(ORDO)
        .args(args)
        .env("ORDO_NATS_URL", url)
        .output()
        .unwrap()
}

/// Waits (up to 30 s) until `log` holds `text`, and returns the log.
fn logged(log: &Path, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let logged = std::fs::read_to_string(log).unwrap_or_default();
        if logged.contains(text) {
            return logged;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never said {text:?}: {logged}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a request until the service answers (it may still be starting), for up to 30 s.
async fn request_when_up(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    NatsServer::request_until_answered(client, subject, &body, None, Duration::from_secs(30)).await
}

#[tokio::test]
async fn the_command_service_waits_for_nats_then_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (port, url) = unused_nats_url();
    let log = dir.path().join("ordo.log");
    let service = commands(&url, &log);
    logged(&log, "NATS is unreachable; retrying");

    let server = NatsServer::start_kept(&dir.path().join("nats"), port).unwrap();
    assert_eq!(server.port(), port);
    let client = server.client().await;
    let reply = request_when_up(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 5}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"ok": true, "sku": "A1", "version": 1, "seq": 1})
    );

    assert!(service.terminate().success());
}

#[test]
fn ctrl_c_stops_a_component_that_is_still_waiting_for_its_servers() {
    let dir = tempfile::tempdir().unwrap();
    let (_, url) = unused_nats_url();
    for args in [&["run", "commands"][..], &["run", "saga"][..]] {
        let log = dir.path().join(format!("{}.log", args[1]));
        let waiting = OrdoProcess::start(ORDO, args, [("ORDO_NATS_URL", &url)], &log);
        // The handlers are installed before the component reaches for its servers.
        logged(&log, "unreachable; retrying");
        assert!(waiting.signal("-INT").success(), "{args:?}");
    }
}

#[tokio::test]
async fn the_command_service_reconnects_after_nats_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let service = commands(&server.url(), &dir.path().join("ordo.log"));
    let client = server.client().await;
    let first = request_when_up(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 1}),
    )
    .await;
    assert_eq!(first["ok"], true);

    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();

    let after = request_when_up(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 1}),
    )
    .await;
    assert_eq!(
        after,
        json!({"ok": true, "sku": "A1", "version": 2, "seq": 2})
    );
    drop(service);
}

#[tokio::test]
async fn client_commands_send_the_json_a_nats_req_would_and_print_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let url = server.url();
    let _service = commands(&url, &dir.path().join("ordo.log"));
    request_when_up(
        &server.client().await,
        Endpoint::OrderShip.subject(),
        json!({"order_id": "warm-up"}),
    )
    .await;

    // The reply alone on stdout (for `| jq`), the request it sent on stderr.
    let received = ordo(&url, &["stock", "receive", "A1", "5"]);
    let stdout = String::from_utf8_lossy(&received.stdout);
    assert!(received.status.success(), "{stdout}");
    assert_eq!(
        stdout,
        "{\"ok\":true,\"sku\":\"A1\",\"version\":1,\"seq\":1}\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&received.stderr),
        "> nats req ordo.cmd.stock.receive '{\"sku\":\"A1\",\"qty\":5}'\n"
    );

    // The server named the way every NATS tool reads it: NATS_URL, or a context of the nats
    // CLI named by NATS_CONTEXT (here in a config directory of the test's own).
    let config = tempfile::tempdir().unwrap();
    let contexts = config.path().join("nats").join("context");
    std::fs::create_dir_all(&contexts).unwrap();
    std::fs::write(
        contexts.join("local.json"),
        json!({"description": "the test's", "url": url}).to_string(),
    )
    .unwrap();
    let in_nats_ways = |args: &[&str], env: (&str, &str)| {
        let mut command = Command::new(ORDO);
        // Only the one way of naming the server under test.
        for name in [
            "ORDO_NATS_URL",
            "NATS_URL",
            "NATS_CONTEXT",
            "NATS_CREDS",
            "NATS_NKEY",
            "NATS_USER",
            "NATS_PASSWORD",
            "NATS_CA",
            "NATS_CERT",
            "NATS_KEY",
        ] {
            command.env_remove(name);
        }
        command
            .args(args)
            .env("XDG_CONFIG_HOME", config.path())
            .env(env.0, env.1)
            .current_dir(config.path())
            .output()
            .unwrap()
    };
    let by_variable = in_nats_ways(&["stock", "receive", "B1", "5"], ("NATS_URL", &url));
    assert_eq!(
        String::from_utf8_lossy(&by_variable.stdout),
        "{\"ok\":true,\"sku\":\"B1\",\"version\":1,\"seq\":2}\n",
        "{}",
        String::from_utf8_lossy(&by_variable.stderr)
    );
    let by_context = in_nats_ways(&["stock", "receive", "B1", "1"], ("NATS_CONTEXT", "local"));
    assert_eq!(
        String::from_utf8_lossy(&by_context.stdout),
        "{\"ok\":true,\"sku\":\"B1\",\"version\":2,\"seq\":3}\n",
        "{}",
        String::from_utf8_lossy(&by_context.stderr)
    );
    let no_such_context = in_nats_ways(&["stock", "receive", "B1", "1"], ("NATS_CONTEXT", "nope"));
    assert!(!no_such_context.status.success());
    assert!(
        String::from_utf8_lossy(&no_such_context.stderr).contains("NATS context \"nope\""),
        "{}",
        String::from_utf8_lossy(&no_such_context.stderr)
    );

    let placed = ordo(
        &url,
        &[
            "order",
            "place",
            "--customer",
            "c1",
            "--line",
            "A1:2:500",
            "--order-id",
            "o-1",
        ],
    );
    assert!(
        placed.status.success(),
        "{}",
        String::from_utf8_lossy(&placed.stdout)
    );

    let shipped = ordo(&url, &["order", "ship", "o-1"]);
    let stdout = String::from_utf8_lossy(&shipped.stdout);
    assert_eq!(
        shipped.status.code(),
        Some(1),
        "a refused command fails: {stdout}"
    );
    assert!(stdout.contains(r#""code":"invalid_state""#), "{stdout}");

    let bad_line = ordo(
        &url,
        &["order", "place", "--customer", "c1", "--line", "A1:two:500"],
    );
    assert!(!bad_line.status.success());
    assert!(String::from_utf8_lossy(&bad_line.stderr).contains("is not a whole number"));
}

#[tokio::test]
async fn streams_apply_creates_then_leaves_the_streams_alone() {
    let server = NatsServer::start();
    let first = ordo(&server.url(), &["streams", "apply"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&first.stdout), EVERY_STREAM_CREATED);
    let again = ordo(&server.url(), &["streams", "apply"]);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "ORDO_ORDERS: unchanged\nORDO_STOCK: unchanged\nORDO_COMMAND_OUTCOMES: unchanged\nORDO_SNAPSHOTS: unchanged\n"
    );
}

/// The engine reads ordo's own settings alone: a shell's NATS_URL (often another system) does
/// not point `ordo run` at it, where a command a person types follows it.
#[tokio::test]
async fn a_worker_ignores_the_nats_tools_variables_a_typed_command_follows() {
    let home = tempfile::tempdir().unwrap();
    let elsewhere = NatsServer::start();
    // What `ordo up` would have recorded: a server that is not there.
    let (_, recorded) = unused_nats_url();
    std::fs::write(home.path().join("nats.url"), &recorded).unwrap();
    let log = home.path().join("ordo.log");
    let _worker = OrdoProcess::start(
        ORDO,
        &["run", "commands"],
        [
            ("ORDO_HOME", home.path().to_str().unwrap()),
            ("NATS_URL", elsewhere.url().as_str()),
        ],
        &log,
    );
    // It waits for the recorded server…
    logged(&log, "NATS is unreachable; retrying");
    // …and never serves on the one NATS_URL names.
    let client = elsewhere.client().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        client.request("$SRV.PING.ordo", "".into()).await.is_err(),
        "the worker followed NATS_URL"
    );
    // A typed command follows it (and finds no command service there).
    let typed = Command::new(ORDO)
        .args(["partitions", "status", "--json"])
        .env_remove("ORDO_NATS_URL")
        .env("ORDO_HOME", home.path())
        .env("NATS_URL", elsewhere.url())
        .output()
        .unwrap();
    assert!(
        typed.status.success(),
        "{}",
        String::from_utf8_lossy(&typed.stderr)
    );
}

/// As compose starts it: before the servers answer, and until JetStream takes the streams.
#[test]
fn streams_apply_with_wait_waits_for_a_server_that_starts_later() {
    let dir = tempfile::tempdir().unwrap();
    let (port, url) = unused_nats_url();
    let apply = Command::new(ORDO)
        .args(["streams", "apply", "--wait", "60"])
        .env("ORDO_NATS_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let _server = NatsServer::start_kept(&dir.path().join("nats"), port).unwrap();
    let applied = apply.wait_with_output().unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&applied.stdout),
        EVERY_STREAM_CREATED
    );
}

#[test]
fn a_client_command_without_a_server_says_what_to_do() {
    let (_, url) = unused_nats_url();
    let output = ordo(&url, &["stock", "receive", "A1", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is unreachable") && stderr.contains("ordo up"),
        "{stderr}"
    );
}

/// The python with nats-py that scripts/test installs (ORDO_PYTHON), else the one it would have
/// installed it into.
fn python_with_nats_py() -> PathBuf {
    let python = std::env::var_os("ORDO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ordo/tools/venv/bin/python")
        });
    let has_nats_py = Command::new(&python)
        .args(["-c", "import nats"])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        has_nats_py,
        "{} cannot import nats-py: run ./scripts/test (it installs it), or set ORDO_PYTHON",
        python.display()
    );
    python
}

/// examples/python/ordo_client.py, as a user runs it against `ordo up`: it sends commands with
/// nats-py (one of them twice under a command id) and reads its own write from the read API.
#[tokio::test]
async fn the_python_example_places_an_order_and_reads_it_back_from_ordo_up() {
    let python = python_with_nats_py();
    let up = UpUnderTest::start().await;
    let (server, http_addr) = (&up.server, &up.http_addr);
    // Up once a command is answered and the read API serves.
    request_when_up(
        &server.client().await,
        Endpoint::OrderShip.subject(),
        json!({"order_id": "warm-up"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://{http_addr}/healthz"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the read API never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/python/ordo_client.py");
    let ran = Command::new(&python)
        .arg(&example)
        .env("NATS_URL", server.url())
        .env("ORDO_API", format!("http://{http_addr}"))
        .env_remove("ORDO_HTTP_TOKEN")
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    let saw: Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(saw["total_cents"], 1000, "{saw}");
    assert_eq!(saw["repeat_was_the_same"], true, "{saw}");
    assert_eq!(saw["refusal"], "invalid_command", "{saw}");
    assert!(saw["order_id"].as_str().unwrap().starts_with("py-order-"));
}

/// `ordo up` on a nats-server and a database of its own, its read API on a free port.
struct UpUnderTest {
    server: NatsServer,
    _database: ordo_testkit::TestDatabase,
    dir: tempfile::TempDir,
    http_addr: String,
    /// What it was started with, for the commands run beside it.
    env: Vec<(&'static str, String)>,
    process: OrdoProcess,
}

impl UpUnderTest {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = NatsServer::start();
        let database = ordo_testkit::TestDatabase::create().await;
        let port = unused_port();
        let http_addr = format!("127.0.0.1:{port}");
        let env = vec![
            ("ORDO_NATS_URL", server.url()),
            ("ORDO_DATABASE_URL", database.url().to_owned()),
            ("ORDO_HTTP_ADDR", http_addr.clone()),
            ("ORDO_HOME", dir.path().display().to_string()),
        ];
        let process = OrdoProcess::start(
            ORDO,
            &["up"],
            env.iter().map(|(key, value)| (*key, value.as_str())),
            &dir.path().join("up.log"),
        );
        Self {
            server,
            _database: database,
            dir,
            http_addr,
            env,
            process,
        }
    }
}

#[tokio::test]
async fn ordo_up_serves_commands_and_reads_of_them_then_rebuilds_a_view() {
    let UpUnderTest {
        server,
        _database,
        dir: _dir,
        http_addr,
        env,
        process: up,
    } = UpUnderTest::start().await;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let client = server.client().await;
    let received = request_when_up(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 5}),
    )
    .await;
    assert_eq!(received["ok"], true, "{received}");
    let placed = request_when_up(
        &client,
        Endpoint::OrderPlace.subject(),
        json!({"order_id": "o-1", "customer_id": "c1", "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}]}),
    )
    .await;
    assert_eq!(placed["ok"], true, "{placed}");
    let http = reqwest::Client::new();
    let get = |path: String| {
        let (http, http_addr) = (http.clone(), http_addr.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match http.get(format!("http://{http_addr}{path}")).send().await {
                    Ok(response) if response.status().is_success() => {
                        break response.json::<Value>().await.unwrap();
                    }
                    other => {
                        assert!(Instant::now() < deadline, "no answer for {path}: {other:?}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    // The client reads its own write…
    let order = get(format!("/orders/o-1?min_seq={}", placed["seq"])).await;
    assert_eq!(order["total_cents"].as_i64(), Some(1000));
    // …and the saga confirms the order without any further command, and notifies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while get("/sagas/o-1".into()).await["state"] != "confirmed" {
        assert!(Instant::now() < deadline, "the saga did not confirm o-1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let notifications = loop {
        let notifications = get("/notifications?order_id=o-1".into()).await;
        if notifications["notifications"][0]["status"] == "sent" {
            break notifications;
        }
        assert!(
            Instant::now() < deadline,
            "no notification: {notifications}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(notifications["notifications"][0]["kind"], "confirmed");
    answers_are_what_the_openapi_document_says(&http, &http_addr).await;

    let command = |args: &[&str]| {
        Command::new(ORDO)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    // `ordo order get` reads the API at ORDO_HTTP_ADDR: the order alone on stdout; an order that
    // does not exist is the API's 404, and a failure.
    let seq = placed["seq"].to_string();
    let read = command(&["order", "get", "o-1", "--min-seq", &seq]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let read: Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read["order_id"], "o-1");
    assert_eq!(read["total_cents"].as_i64(), Some(1000));
    let missing = command(&["order", "get", "o-404"]);
    assert_eq!(missing.status.code(), Some(1));
    let missing: Value = serde_json::from_slice(&missing.stdout).unwrap();
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");

    let status = command(&["projections", "status"]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.starts_with("projection   stream"), "{status}");
    // --json: the document GET /projections answers.
    let status = command(&["projections", "status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let api_document = get("/projections".into()).await;
    let names = |document: &Value| -> Vec<String> {
        document["projections"]
            .as_array()
            .unwrap_or_else(|| panic!("{document}"))
            .iter()
            .map(|view| view["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&status), names(&api_document));
    assert_eq!(names(&status), ["orders", "stock"]);
    let rebuilt = command(&["projections", "rebuild", "stock"]);
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert!(
        String::from_utf8_lossy(&rebuilt.stdout).starts_with("stock: rebuilt up to sequence 2")
    );
    assert!(String::from_utf8_lossy(&rebuilt.stderr).contains("rebuilding stock: 2/2 events"));
    let stock = get("/stock/A1?min_seq=2".into()).await;
    assert_eq!(
        (stock["on_hand"].as_i64(), stock["reserved"].as_i64()),
        (Some(5), Some(2))
    );

    assert!(up.terminate().success());
}

/// Every path of the read API at `http_addr` (an order o-1 of customer c1 confirmed, with its
/// notification sent) answers what its `GET /openapi.json` says, in each case this can provoke.
async fn answers_are_what_the_openapi_document_says(http: &reqwest::Client, http_addr: &str) {
    let answer = |path: &str| {
        let url = format!("http://{http_addr}{path}");
        async move {
            let response = http.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response.headers()[reqwest::header::CONTENT_TYPE].clone();
            (status, content_type, response.text().await.unwrap())
        }
    };
    let (status, _, document) = answer("/openapi.json").await;
    assert_eq!(status, 200, "{document}");
    let document: Value = serde_json::from_str(&document).unwrap();
    let mut checked = std::collections::BTreeSet::new();
    for (template, path, expected) in [
        ("/orders", "/orders?customer_id=c1&status=confirmed", 200),
        ("/orders", "/orders?limit=1", 200),
        ("/orders", "/orders?limit=0", 400),
        ("/orders/{order_id}", "/orders/o-1", 200),
        ("/orders/{order_id}", "/orders/o-404", 404),
        ("/orders/{order_id}", "/orders/o.1", 400),
        // Waits the API's 5 s for a sequence that never comes.
        ("/orders/{order_id}", "/orders/o-1?min_seq=999999", 504),
        ("/orders/{order_id}/history", "/orders/o-1/history", 200),
        (
            "/orders/{order_id}/history",
            "/orders/o-1/history?at_seq=1",
            200,
        ),
        ("/orders/{order_id}/history", "/orders/o-404/history", 404),
        ("/orders/{order_id}/history", "/orders/o.1/history", 400),
        ("/stock/{sku}", "/stock/A1", 200),
        ("/sagas/{order_id}", "/sagas/o-1", 200),
        ("/sagas/{order_id}", "/sagas/o-404", 404),
        ("/notifications", "/notifications?order_id=o-1", 200),
        ("/notifications", "/notifications", 200),
        ("/projections", "/projections", 200),
        ("/healthz", "/healthz", 200),
        ("/readyz", "/readyz", 200),
        ("/metrics", "/metrics", 200),
    ] {
        let (status, content_type, body) = answer(path).await;
        assert_eq!(status, expected, "{path}: {body}");
        let documented = &document["paths"][template]["get"]["responses"][status.to_string()];
        let content = documented["content"]
            .as_object()
            .unwrap_or_else(|| panic!("{template} does not document {status}: {documented}"));
        let (media_type, content) = content.iter().next().unwrap();
        assert_eq!(
            content_type.to_str().unwrap().split(';').next(),
            Some(media_type.as_str()),
            "{path}"
        );
        if media_type == "application/json" {
            // The response's schema, with the document's components its `$ref`s point into.
            let mut schema = content["schema"].clone();
            schema["components"] = document["components"].clone();
            let validator = jsonschema::validator_for(&schema).unwrap();
            let body: Value = serde_json::from_str(&body).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|error| format!("{} at {}", error, error.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{path} ({status}): {errors:?}\n{body}");
        }
        checked.insert(template);
    }
    let documented: std::collections::BTreeSet<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(checked, documented, "every documented path is checked");
}

#[tokio::test]
async fn a_component_never_changes_a_running_stream_it_reports_the_difference() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // The operator's definitions: ORDO_STOCK with a shorter duplicate window, applied.
    let definitions = dir.path().join("streams");
    std::fs::create_dir(&definitions).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../streams");
    for file in [
        "orders.json",
        "stock.json",
        "command-outcomes.json",
        "snapshots.json",
    ] {
        let json = std::fs::read_to_string(root.join(file)).unwrap();
        let json = if file == "stock.json" {
            json.replace(
                "\"duplicate_window\": 120000000000",
                "\"duplicate_window\": 30000000000",
            )
        } else {
            json
        };
        std::fs::write(definitions.join(file), json).unwrap();
    }
    let applied = ordo(
        &server.url(),
        &["streams", "apply", "--dir", definitions.to_str().unwrap()],
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // A command service started with the built-in definitions serves, and leaves it alone.
    let log = dir.path().join("ordo.log");
    let _service = commands(&server.url(), &log);
    let client = server.client().await;
    let reply = request_when_up(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 1}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let live = jetstream::new(client)
        .get_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .duplicate_window;
    assert_eq!(live, Duration::from_secs(30));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(ordo_eventstore::StreamId::Stock.name())
            && logged.contains("differs from ordo's definition"),
        "{logged}"
    );
}

#[tokio::test]
async fn a_worker_serves_its_metrics_on_its_metrics_address_to_whoever_holds_its_token() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = unused_port();
    let addr = format!("127.0.0.1:{port}");
    let url = server.url();
    let _service = OrdoProcess::start(
        ORDO,
        &["run", "commands"],
        [
            ("ORDO_NATS_URL", url.as_str()),
            ("ORDO_METRICS_ADDR", addr.as_str()),
            ("ORDO_METRICS_TOKEN", "prometheus-only"),
            // Sheds placing as soon as one order event waits for the saga.
            ("ORDO_MAX_SAGA_BACKLOG", "0"),
        ],
        &dir.path().join("ordo.log"),
    );
    let client = server.client().await;
    // The service is up (it answers its discovery PING); then one malformed order, sent once,
    // so that a command counter moves by exactly one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.request("$SRV.PING.ordo", "".into()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the command service never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let malformed = client
        .request(
            Endpoint::OrderPlace.subject(),
            json!({"nonsense": true}).to_string().into(),
        )
        .await
        .unwrap();
    let malformed: Value = serde_json::from_slice(&malformed.payload).unwrap();
    assert_eq!(malformed["error"]["code"], "invalid_command", "{malformed}");
    // An order waits for a saga that takes nothing in: placing is shed.
    let place = |order_id: String| {
        json!({"order_id": order_id, "customer_id": "c1",
               "lines": [{"sku": "A1", "qty": 1, "unit_price_cents": 1}]})
        .to_string()
    };
    let placed = client
        .request(Endpoint::OrderPlace.subject(), place("o-1".into()).into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&placed.payload).contains("\"ok\":true"));
    // A saga intake that reported and takes nothing in.
    let mut intake = ordo_eventstore::progress::Reporter::open(
        &jetstream::new(client.clone()),
        ConsumerId::Saga.partition_group().unwrap(),
        "stalled",
    )
    .await
    .unwrap();
    let nothing_taken_in = (0..ordo_eventstore::partition::DEFAULT_PARTITIONS)
        .map(|partition| (partition, 0))
        .collect();
    intake.report(&nothing_taken_in).await;
    for probe in 0.. {
        let reply = client
            .request(
                Endpoint::OrderPlace.subject(),
                place(format!("probe-{probe}")).into(),
            )
            .await
            .unwrap();
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
        if reply["error"]["code"] == "unavailable" {
            break;
        }
        assert!(Instant::now() < deadline, "never shed: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let http = reqwest::Client::new();
    let metrics = loop {
        let scrape = http
            .get(format!("http://{addr}/metrics"))
            .bearer_auth("prometheus-only")
            .send()
            .await;
        match scrape {
            Ok(response) if response.status().is_success() => {
                break response.text().await.unwrap();
            }
            other => {
                assert!(Instant::now() < deadline, "no metrics: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        metrics
            .contains(r#"ordo_commands_total{endpoint="order.place",outcome="invalid_command"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ordo_commands_shed_total{endpoint="order.place"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"ordo_backlog_events{{consumer="{}"}} "#,
            ConsumerId::Saga
        )),
        "{metrics}"
    );
    let without_token = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(without_token.status(), reqwest::StatusCode::UNAUTHORIZED);

    // The probes of an orchestrator need no token: alive, and ready while NATS is connected
    // (the command service has no database).
    let probe = |path: &'static str| {
        let url = format!("http://{addr}{path}");
        async move {
            let response = reqwest::get(url).await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(
        probe("/healthz").await,
        (reqwest::StatusCode::OK, json!({"status": "ok"}))
    );
    assert_eq!(
        probe("/readyz").await,
        (
            reqwest::StatusCode::OK,
            json!({"ready": true, "checks": {"nats": "ok"}})
        )
    );
    server.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, ready) = loop {
        let (status, ready) = probe("/readyz").await;
        if status != reqwest::StatusCode::OK {
            break (status, ready);
        }
        assert!(
            Instant::now() < deadline,
            "still ready without NATS: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["ready"], false, "{ready}");
    assert_ne!(ready["checks"]["nats"], "ok", "{ready}");
}

/// `ordo sagas retry` gives a saga stuck in a compensation a fresh count of attempts, due at
/// once, in the state it was stuck in; an order with no saga is an error that says so.
#[tokio::test]
async fn sagas_retry_gives_a_stuck_saga_a_fresh_count_due_at_once() {
    use ordo_domain::{
        CustomerId, OrderId, Sku,
        order::OrderLine,
        saga::{Outcome, Saga, SagaState},
    };
    let server = NatsServer::start();
    let database = ordo_testkit::TestDatabase::create().await;
    ordo_app::database::prepare(database.pool()).await.unwrap();
    // A confirmed order's saga, cancelled, whose release went unanswered six times.
    let mut saga = Saga::start(
        OrderId::parse("o-1").unwrap(),
        CustomerId::parse("c1").unwrap(),
        &[OrderLine {
            sku: Sku::parse("A1").unwrap(),
            qty: 2,
            unit_price_cents: 500,
        }],
        1000,
    );
    let step = |saga: Saga, outcome: Outcome| {
        let (index, _) = saga.next_step().unwrap();
        saga.record(index, outcome, sqlx::types::chrono::Utc::now())
    };
    for _ in 0..3 {
        saga = step(saga, Outcome::Succeeded);
    }
    saga = saga.cancel();
    for _ in 0..6 {
        saga = step(saga, Outcome::Unknown("no answer".into()));
    }
    assert_eq!(saga.state, SagaState::CompensationStuck);
    sqlx::query(
        "INSERT INTO sagas (order_id, state, data, next_attempt_at)
         VALUES ('o-1', 'compensation_stuck', $1, now() + interval '1 hour')",
    )
    .bind(serde_json::to_value(&saga).unwrap())
    .execute(database.pool())
    .await
    .unwrap();

    let retry = |order_id: &str| {
        Command::new(ORDO)
            .args(["sagas", "retry", order_id])
            .env("ORDO_NATS_URL", server.url())
            .env("ORDO_DATABASE_URL", database.url())
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let retried = retry("o-1");
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&retried.stdout).trim(),
        "saga of o-1: cancelling"
    );
    let (state, due, data): (String, bool, Value) = sqlx::query_as(
        "SELECT state, next_attempt_at <= now(), data FROM sagas WHERE order_id = 'o-1'",
    )
    .fetch_one(database.pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), due), ("cancelling", true));
    let unknown: Vec<&Value> = data["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|step| step["state"] == "unknown")
        .collect();
    assert!(
        !unknown.is_empty() && unknown.iter().all(|step| step["attempts"] == 0),
        "a fresh count: {data}"
    );
    let missing = retry("nope");
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no saga for order nope"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
