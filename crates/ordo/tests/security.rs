//! ordo against a nats-server that requires TLS with client certificates and the accounts,
//! users and permissions docker/nats-accounts.conf ships, and a PostgreSQL that asks every role for its
//! password, where the workers' role may only read and write rows: ordo works end to end with
//! each component as its own user; the workers' role cannot change a table; wrong credentials
//! fail at once with a clear message; no secret reaches a log. (crates/ordo/tests/redteam.rs
//! attacks the same configuration.)

use ordo_contract::Endpoint;
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use ordo_testkit::{NatsServer, OrdoProcess, PostgresServer};
use serde_json::{Value, json};
use shipped::{COMPONENTS, USERS, accounts_config, inbox_prefix, password};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

mod certificates;
mod shipped;

use certificates::Certificates;

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");
const HTTP_TOKEN: &str = "http-token-9d02aa";
const METRICS_TOKEN: &str = "metrics-token-61f0c8";
const OWNER_PASSWORD: &str = "owner-pw-0b7d35";
const WORKER_PASSWORD: &str = "worker-pw-a93c21";
const READER_PASSWORD: &str = "reader-pw-17b3e0";

/// A PostgreSQL set up as the README's Security section says: role `ordo_owner` owns database
/// `ordo`, role `ordo_worker` may log in and nothing more until `ordo migrate --grant-to`, and
/// both must give their passwords (only `postgres`, the test's administrator, need not).
struct Database {
    server: PostgresServer,
}

impl Database {
    async fn start() -> Self {
        let server = PostgresServer::start();
        let mut admin = PgConnection::connect(&server.url("postgres"))
            .await
            .unwrap();
        for statement in [
            format!("CREATE ROLE ordo_owner LOGIN PASSWORD '{OWNER_PASSWORD}'"),
            "CREATE DATABASE ordo OWNER ordo_owner".to_owned(),
            format!("CREATE ROLE ordo_worker LOGIN PASSWORD '{WORKER_PASSWORD}'"),
            format!("CREATE ROLE ordo_reader LOGIN PASSWORD '{READER_PASSWORD}'"),
        ] {
            admin.execute(AssertSqlSafe(statement)).await.unwrap();
        }
        server.require_passwords().unwrap();
        // The server reads pg_hba.conf again a moment after the reload.
        let without_password = server.url_as("ordo_worker", "", "ordo");
        let deadline = Instant::now() + Duration::from_secs(10);
        while PgConnection::connect(&without_password).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL still lets roles in without a password"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { server }
    }

    fn owner_url(&self) -> String {
        self.server.url_as("ordo_owner", OWNER_PASSWORD, "ordo")
    }

    fn worker_url(&self) -> String {
        self.server.url_as("ordo_worker", WORKER_PASSWORD, "ordo")
    }

    /// The read API's role: it may read rows, nothing more.
    fn reader_url(&self) -> String {
        self.server.url_as("ordo_reader", READER_PASSWORD, "ordo")
    }

    /// `ordo migrate --grant-to ordo_worker --grant-read-to ordo_reader` as the owner; returns
    /// what it printed.
    fn migrate(&self) -> String {
        let (output, _) = run_to_end(
            &[
                "migrate",
                "--grant-to",
                "ordo_worker",
                "--grant-read-to",
                "ordo_reader",
            ],
            &[("ORDO_DATABASE_URL", self.owner_url())],
            Duration::from_secs(60),
        );
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "ordo migrate failed: {printed}");
        assert!(!printed.contains(OWNER_PASSWORD), "{printed}");
        printed
    }
}

/// nats-server's configuration: TLS that verifies client certificates, and the accounts and
/// users of `docker/nats-accounts.conf`.
fn server_config(certificates: &Certificates) -> String {
    format!(
        r#"
tls {{
  cert_file: "{server_cert}"
  key_file: "{server_key}"
  ca_file: "{ca}"
  verify: true
}}
{accounts}
"#,
        server_cert = certificates.server_cert.display(),
        server_key = certificates.server_key.display(),
        ca = certificates.ca.display(),
        accounts = accounts_config(),
    )
}

/// A client of the test's own, as a user of the server.
async fn connect_as(
    server: &NatsServer,
    certificates: &Certificates,
    user: &str,
) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password(user))
        .custom_inbox_prefix(inbox_prefix(user))
        .add_root_certificates(certificates.ca.clone())
        .add_client_certificate(
            certificates.client_cert.clone(),
            certificates.client_key.clone(),
        )
        .require_tls(true)
        .connect(server.url())
        .await
        .unwrap_or_else(|err| panic!("connect as {user}: {err}"))
}

/// The settings an ordo process of the test gets: the server, TLS, and `user`.
fn ordo_env(
    server: &NatsServer,
    certificates: &Certificates,
    user: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("ORDO_NATS_URL", server.url()),
        ("ORDO_NATS_USER", user.into()),
        ("ORDO_NATS_PASSWORD", password(user)),
        ("ORDO_NATS_CA", certificates.ca.display().to_string()),
        (
            "ORDO_NATS_CERT",
            certificates.client_cert.display().to_string(),
        ),
        (
            "ORDO_NATS_KEY",
            certificates.client_key.display().to_string(),
        ),
        ("NO_COLOR", "1".into()),
    ]
}

/// Runs `ordo args` to its end (at most `limit`), with `env`.
fn run_to_end(args: &[&str], env: &[(&str, String)], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(ORDO)
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), started.elapsed())
}

/// Runs `ordo args` with credentials the server refuses: it must end within 10 s, say the
/// server does not accept the connection, not retry, and not print `secret`. Returns stderr.
fn refused_at_once(args: &[&str], env: &[(&str, String)], secret: &str) -> String {
    let (output, took) = run_to_end(args, env, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {stderr}");
    assert!(
        stderr.contains("does not accept this connection") && stderr.contains("Not retrying"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("unreachable; retrying"),
        "a retry storm: {stderr}"
    );
    assert!(!stderr.contains(secret), "a secret was printed: {stderr}");
    stderr
}

async fn request(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    NatsServer::request_until_answered(client, subject, &body, None, Duration::from_secs(60)).await
}

#[tokio::test]
async fn ordo_works_end_to_end_over_tls_with_each_component_as_its_own_user() {
    let dir = tempfile::tempdir().unwrap();
    let certificates = Certificates::issue(dir.path());
    let server = NatsServer::start_with_config(&server_config(&certificates));
    let database = Database::start().await;
    let migrated = database.migrate();
    assert!(migrated.contains("created what was missing"), "{migrated}");
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{http_port}");
    let env = |user: &str| {
        let mut env = ordo_env(&server, &certificates, user);
        // The workers connect as the role that may only read and write rows, the read API as
        // the one that may only read them.
        env.push((
            "ORDO_DATABASE_URL",
            if user == "ordo-api" {
                database.reader_url()
            } else {
                database.worker_url()
            },
        ));
        env.push(("ORDO_HTTP_ADDR", http.clone()));
        env.push(("ORDO_HOME", dir.path().display().to_string()));
        env.push(("ORDO_HTTP_TOKEN", HTTP_TOKEN.into()));
        env.push(("ORDO_METRICS_TOKEN", METRICS_TOKEN.into()));
        // Placing goes through the per-customer rate limit, so its bucket is used under the
        // shipped permissions too.
        env.push(("ORDO_CUSTOMER_ORDER_RATE", "100".into()));
        env
    };
    // The operator creates the streams, as compose's one-shot service does.
    let (applied, _) = run_to_end(
        &["streams", "apply"],
        &env("ordo-admin"),
        Duration::from_secs(60),
    );
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let logs: Vec<PathBuf> = COMPONENTS
        .iter()
        .map(|(component, _)| dir.path().join(format!("{component}.log")))
        .collect();
    let _components: Vec<OrdoProcess> = COMPONENTS
        .iter()
        .zip(&logs)
        .map(|((component, user), log)| {
            OrdoProcess::start(ORDO, &["run", component], env(user), log)
        })
        .collect();

    // The applications send their commands; each component does its part as its own user.
    let warehouse = connect_as(&server, &certificates, "warehouse").await;
    let received = request(
        &warehouse,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 5}),
    )
    .await;
    assert_eq!(
        received["ok"],
        true,
        "{received}; see {}",
        dir.path().display()
    );
    let shop = connect_as(&server, &certificates, "shop").await;
    let mut notifications = shop.subscribe("ordo.notifications.c1").await.unwrap();
    shop.flush().await.unwrap();
    let placed = request(
        &shop,
        Endpoint::OrderPlace.subject(),
        json!({"order_id": "o-1", "customer_id": "c1",
               "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}]}),
    )
    .await;
    assert_eq!(placed["ok"], true, "{placed}");
    let saga = async {
        let http_client = reqwest::Client::new();
        loop {
            if let Ok(response) = http_client
                .get(format!("http://{http}/sagas/o-1"))
                .bearer_auth(HTTP_TOKEN)
                .send()
                .await
                && let Ok(saga) = response.json::<Value>().await
                && saga["state"] == "confirmed"
            {
                return saga;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), saga)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "o-1 was not confirmed; see the logs in {}",
                dir.path().display()
            )
        });
    // The notifier's user published the notification, and the shop reads it.
    let notification = tokio::time::timeout(Duration::from_secs(30), notifications.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the shop was not notified; the notifier's log: {}",
                std::fs::read_to_string(dir.path().join("notifier.log")).unwrap_or_default()
            )
        })
        .unwrap();
    let notification: Value = serde_json::from_slice(&notification.payload).unwrap();
    assert_eq!(notification["kind"], "confirmed", "{notification}");

    // No secret in the logs of the whole run, nor in what the API says about itself.
    let http_client = reqwest::Client::new();
    let with_api_token = |path: &str| {
        let request = http_client
            .get(format!("http://{http}{path}"))
            .bearer_auth(HTTP_TOKEN);
        async move { request.send().await.unwrap() }
    };
    let readyz = with_api_token("/readyz").await.text().await.unwrap();
    assert!(readyz.contains("\"ready\":true"), "{readyz}");
    // The console reads as the read-only role too, and offers no rebuild it could not run.
    let order_page = with_api_token("/ui/orders/o-1").await;
    assert_eq!(order_page.status(), reqwest::StatusCode::OK);
    let order_page = order_page.text().await.unwrap();
    assert!(
        order_page.contains("OrderConfirmed") && order_page.contains("authorize payment"),
        "{order_page}"
    );
    let projections_page = with_api_token("/ui/projections")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        projections_page.contains("Rebuilds need the database's owner")
            && !projections_page.contains("/rebuild\""),
        "{projections_page}"
    );
    let rebuild = http_client
        .post(format!("http://{http}/ui/projections/orders/rebuild"))
        .bearer_auth(HTTP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(rebuild.status(), reqwest::StatusCode::CONFLICT);
    let refusal = rebuild.text().await.unwrap();
    assert!(refusal.contains("the database's owner"), "{refusal}");
    // /metrics takes its own token: the API's gets a 401.
    let unauthorized = with_api_token("/metrics").await;
    assert_eq!(unauthorized.status(), reqwest::StatusCode::UNAUTHORIZED);
    let unauthorized = unauthorized.text().await.unwrap();
    let mut secrets: Vec<String> = USERS.iter().map(|(user, _)| password(user)).collect();
    secrets.extend([HTTP_TOKEN, METRICS_TOKEN, WORKER_PASSWORD, READER_PASSWORD].map(String::from));
    for log in &logs {
        // Every component connected (the projector's work is not on o-1's way, so on a busy
        // machine it may start last).
        let logged = logged(log, "connected to NATS", Duration::from_secs(30)).await;
        for secret in &secrets {
            assert!(
                !logged.contains(secret.as_str()),
                "a secret in {}: {logged}",
                log.display()
            );
        }
    }
    for secret in &secrets {
        assert!(
            !readyz.contains(secret.as_str()),
            "a secret in /readyz: {readyz}"
        );
        assert!(!unauthorized.contains(secret.as_str()), "{unauthorized}");
    }
}

#[test]
fn a_wrong_password_or_a_missing_certificate_fails_at_once_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let certificates = Certificates::issue(dir.path());
    let server = NatsServer::start_with_config(&server_config(&certificates));

    let mut wrong_password = ordo_env(&server, &certificates, "ordo-commands");
    wrong_password.retain(|(key, _)| *key != "ORDO_NATS_PASSWORD");
    wrong_password.push(("ORDO_NATS_PASSWORD", "not-the-password-1f3".into()));
    let stderr = refused_at_once(
        &["run", "commands"],
        &wrong_password,
        "not-the-password-1f3",
    );
    assert!(stderr.contains("refused the credentials"), "{stderr}");

    let mut no_certificate = ordo_env(&server, &certificates, "ordo-commands");
    no_certificate.retain(|(key, _)| !["ORDO_NATS_CERT", "ORDO_NATS_KEY"].contains(key));
    let stderr = refused_at_once(
        &["run", "commands"],
        &no_certificate,
        &password("ordo-commands"),
    );
    assert!(stderr.contains("TLS handshake"), "{stderr}");
}

#[test]
fn credentials_in_the_url_are_used_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let certificates = Certificates::issue(dir.path());
    let server = NatsServer::start_with_config(&server_config(&certificates));
    let mut env = ordo_env(&server, &certificates, "warehouse");
    env.retain(|(key, _)| !["ORDO_NATS_USER", "ORDO_NATS_PASSWORD", "ORDO_NATS_URL"].contains(key));
    env.push((
        "ORDO_NATS_URL",
        format!(
            "nats://warehouse:{}@127.0.0.1:{}",
            password("warehouse"),
            server.port()
        ),
    ));
    // The warehouse may send a command (nobody serves it here: "no responders").
    let (output, _) = run_to_end(
        &["stock", "receive", "A1", "1"],
        &env,
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no answer on ordo.cmd.stock.receive"),
        "the command got past the server's authentication: {stderr}"
    );
    assert!(!stderr.contains(&password("warehouse")), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains(&password("warehouse")), "{stdout}");
}

/// Waits until `log` contains `text`.
async fn logged(log: &Path, text: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let so_far = std::fs::read_to_string(log).unwrap_or_default();
        if so_far.contains(text) {
            return so_far;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log: {so_far}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn workers_wait_for_the_owner_to_set_up_the_database_and_cannot_change_its_tables() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start();
    let database = Database::start().await;
    let env = [
        ("ORDO_NATS_URL", nats.url()),
        ("ORDO_DATABASE_URL", database.worker_url()),
        ("NO_COLOR", "1".to_owned()),
    ];
    let log = dir.path().join("projector.log");
    let _projector = OrdoProcess::start(ORDO, &["run", "projector"], env, &log);

    // Before the owner has run `ordo migrate`, the worker says what to do, and waits.
    logged(
        &log,
        "run `ordo migrate` as the database owner",
        Duration::from_secs(30),
    )
    .await;
    let migrated = database.migrate();
    assert!(migrated.contains("created what was missing"), "{migrated}");
    logged(
        &log,
        "projector applies its partitions",
        Duration::from_secs(60),
    )
    .await;
    let again = database.migrate();
    assert!(again.contains("already set up"), "{again}");

    // The workers' role reads and writes rows, and changes no table.
    let mut worker = PgConnection::connect(&database.worker_url()).await.unwrap();
    let allowed = [
        "SELECT count(*) FROM view_orders.orders",
        "UPDATE view_stock.checkpoints SET seq = seq",
        "UPDATE view_stock.partition_checkpoints SET seq = seq",
        "SELECT count(*) FROM sagas",
        "SELECT count(*) FROM _ordo_saga_migrations",
        "SELECT count(*) FROM _ordo_projection_migrations",
    ];
    for statement in allowed {
        worker
            .execute(statement)
            .await
            .unwrap_or_else(|err| panic!("{statement}: {err}"));
    }
    let refused = [
        "CREATE TABLE extra (id int)",
        "CREATE SCHEMA extra",
        "DROP TABLE sagas",
        "ALTER TABLE view_stock.stock ADD COLUMN extra int",
        "TRUNCATE notifications",
        "DELETE FROM _ordo_saga_migrations",
        "DELETE FROM _ordo_projection_migrations",
    ];
    for statement in refused {
        let err = worker.execute(statement).await.expect_err(statement);
        let code = err.as_database_error().and_then(|err| err.code());
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {err}");
    }

    // The read API's role reads rows and writes none.
    let mut reader = PgConnection::connect(&database.reader_url()).await.unwrap();
    reader
        .execute("SELECT count(*) FROM view_orders.orders")
        .await
        .expect("the reader reads the views");
    for statement in [
        "UPDATE view_stock.checkpoints SET seq = seq",
        "UPDATE view_stock.partition_checkpoints SET seq = seq",
        "DELETE FROM sagas",
        "INSERT INTO notifications (order_id, kind) VALUES ('x', 'y')",
        "CREATE TABLE extra (id int)",
    ] {
        let err = reader.execute(statement).await.expect_err(statement);
        let code = err.as_database_error().and_then(|err| err.code());
        assert_eq!(code.as_deref(), Some("42501"), "{statement}: {err}");
    }

    // A rebuild, run by the owner, creates new tables: the workers may use them too.
    let (rebuilt, _) = run_to_end(
        &["projections", "rebuild", "stock"],
        &[
            ("ORDO_NATS_URL", nats.url()),
            ("ORDO_DATABASE_URL", database.owner_url()),
        ],
        Duration::from_secs(60),
    );
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    worker
        .execute("UPDATE view_stock.partition_checkpoints SET seq = seq")
        .await
        .expect("the rebuilt view is the workers' too");

    // A wrong password ends the process at once, without printing it.
    let wrong = database
        .worker_url()
        .replace(WORKER_PASSWORD, "not-the-password");
    refused_at_once(
        &["run", "projector"],
        &[
            ("ORDO_NATS_URL", nats.url()),
            ("ORDO_DATABASE_URL", wrong),
            ("NO_COLOR", "1".into()),
        ],
        "not-the-password",
    );
    let projector_log = std::fs::read_to_string(&log).unwrap();
    assert!(!projector_log.contains(WORKER_PASSWORD), "{projector_log}");
}

#[test]
fn help_never_shows_a_secret_from_the_environment() {
    let secret = "pw-in-env-5d1c";
    let environment = [
        (
            "ORDO_NATS_URL",
            format!("nats://ordo:{secret}@127.0.0.1:4222"),
        ),
        (
            "ORDO_DATABASE_URL",
            format!("postgres://ordo:{secret}@127.0.0.1/ordo"),
        ),
        ("ORDO_NATS_PASSWORD", secret.to_owned()),
        ("ORDO_NATS_TOKEN", secret.to_owned()),
        ("ORDO_HTTP_TOKEN", secret.to_owned()),
        ("ORDO_METRICS_TOKEN", secret.to_owned()),
        (
            "ORDO_WEBHOOK_URL",
            format!("https://hooks.example/{secret}"),
        ),
    ];
    let screens: [&[&str]; 9] = [
        &[],
        &["up"],
        &["run", "commands"],
        &["run", "notifier"],
        &["run", "api"],
        &["migrate"],
        &["streams", "apply"],
        &["stock", "receive"],
        &["chaos"],
    ];
    for args in screens {
        let output = Command::new(ORDO)
            .args(args)
            .arg("--help")
            .envs(environment.iter().map(|(key, value)| (key, value)))
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "ordo {args:?} --help");
        assert!(
            help.contains("env: ORDO_"),
            "ordo {args:?} --help names its variables"
        );
        assert!(
            !help.contains(secret),
            "ordo {args:?} --help shows a secret: {help}"
        );
    }
}
