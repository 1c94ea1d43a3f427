//! The `ordo` binary as a person uses it: against a real nats-server, through its CLI.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use ordo_testkit::NatsServer;
use serde_json::{Value, json};

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

/// `ordo run commands` in the background, its log in `log`.
struct Running {
    child: Child,
}

impl Running {
    fn start(url: &str, log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(ORDO)
            .args(["run", "commands"])
            .env("ORDO_NATS_URL", url)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// SIGTERM, and the exit status it ends with.
    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "ordo did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ordo(url: &str, args: &[&str]) -> Output {
    Command::new(ORDO)
        .args(args)
        .env("ORDO_NATS_URL", url)
        .output()
        .unwrap()
}

/// Sends a request until the service answers (it may still be starting), for up to 30 s.
async fn request_when_up(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = async_nats::Request::new()
            .payload(serde_json::to_vec(&body).unwrap().into())
            .timeout(Some(Duration::from_secs(2)));
        match client.send_request(subject.to_owned(), request).await {
            Ok(reply) => return serde_json::from_slice(&reply.payload).unwrap(),
            Err(err) => {
                assert!(Instant::now() < deadline, "no answer on {subject}: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test]
async fn the_command_service_waits_for_nats_then_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let log = dir.path().join("ordo.log");
    let service = Running::start(&url, &log);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = std::fs::read_to_string(&log).unwrap();
    assert!(
        waiting.contains("NATS is unreachable; retrying"),
        "{waiting}"
    );

    let server = NatsServer::start_kept(&dir.path().join("nats"), port).unwrap();
    assert_eq!(server.port(), port);
    let client = server.client().await;
    let reply = request_when_up(
        &client,
        "ordo.cmd.stock.receive",
        json!({"sku": "A1", "qty": 5}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"ok": true, "sku": "A1", "version": 1, "seq": 1})
    );

    assert!(service.terminate().success());
}

#[tokio::test]
async fn the_command_service_reconnects_after_nats_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let service = Running::start(&server.url(), &dir.path().join("ordo.log"));
    let client = server.client().await;
    let first = request_when_up(
        &client,
        "ordo.cmd.stock.receive",
        json!({"sku": "A1", "qty": 1}),
    )
    .await;
    assert_eq!(first["ok"], true);

    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();

    let after = request_when_up(
        &client,
        "ordo.cmd.stock.receive",
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
    let _service = Running::start(&url, &dir.path().join("ordo.log"));
    request_when_up(
        &server.client().await,
        "ordo.cmd.order.ship",
        json!({"order_id": "warm-up"}),
    )
    .await;

    let received = ordo(&url, &["stock", "receive", "A1", "5"]);
    let stdout = String::from_utf8_lossy(&received.stdout);
    assert!(received.status.success(), "{stdout}");
    assert!(
        stdout.contains(r#"> nats req ordo.cmd.stock.receive '{"sku":"A1","qty":5}'"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"{"ok":true,"sku":"A1","version":1,"seq":1}"#),
        "{stdout}"
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
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        "ORDO_ORDERS: created\nORDO_STOCK: created\nORDO_COMMAND_OUTCOMES: created\n"
    );
    let again = ordo(&server.url(), &["streams", "apply"]);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "ORDO_ORDERS: unchanged\nORDO_STOCK: unchanged\nORDO_COMMAND_OUTCOMES: unchanged\n"
    );
}

#[test]
fn a_client_command_without_a_server_says_what_to_do() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = ordo(
        &format!("nats://127.0.0.1:{port}"),
        &["stock", "receive", "A1", "1"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is unreachable") && stderr.contains("ordo up"),
        "{stderr}"
    );
}
