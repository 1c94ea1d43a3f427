//! TLS to everything ordo talks to besides NATS (security.rs covers NATS): PostgreSQL with
//! `sslmode=verify-full`, an `https://` webhook and an `https://` trace collector, each a server
//! of the test's own whose certificate a CA of the test's own signed. A client that did not
//! verify that certificate, or could not speak TLS at all, fails these tests; a server that no
//! trusted CA vouches for gets nothing.

use ordo_contract::Endpoint;
use std::{
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use certificates::{Certificates, pem};
use ordo_testkit::{NatsServer, OrdoProcess, PostgresServer, TestDatabase};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
};

mod certificates;

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

/// An HTTPS server that answers every request `200` and records what reached it: the request
/// line and body of HTTP/1.1, or `h2` for the HTTP/2 preface (gRPC). It offers both by ALPN.
struct HttpsRecorder {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HttpsRecorder {
    async fn start(certificates: &Certificates) -> Self {
        let chain = vec![CertificateDer::from_pem_file(&certificates.server_cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(&certificates.server_key).unwrap();
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, recorded) = (acceptor.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return; // A client that did not trust the certificate.
                    };
                    let mut read = Vec::new();
                    let mut buffer = [0u8; 8192];
                    while let Ok(n) = stream.read(&mut buffer).await {
                        if n == 0 {
                            return;
                        }
                        read.extend_from_slice(&buffer[..n]);
                        if read.starts_with(b"PRI * HTTP/2.0") {
                            recorded.lock().unwrap().push("h2".into());
                            return;
                        }
                        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&read[..end]).into_owned();
                            let length = head
                                .lines()
                                .find_map(|line| {
                                    let (name, value) = line.split_once(':')?;
                                    name.eq_ignore_ascii_case("content-length")
                                        .then(|| value.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if read.len() < end + 4 + length {
                                continue;
                            }
                            let body = String::from_utf8_lossy(&read[end + 4..end + 4 + length]);
                            let line = head.lines().next().unwrap_or_default().to_owned();
                            recorded.lock().unwrap().push(format!("{line}\n{body}"));
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            read.clear();
                        }
                    }
                });
            }
        });
        Self { port, seen }
    }

    /// Waits until a request whose line starts with `start` arrived; returns it with its body.
    async fn received(&self, start: &str, logs: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(found) = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .find(|request| request.starts_with(start))
            {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "nothing like {start:?} arrived over TLS; see the logs in {}",
                logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `ordo up` on servers of its own with `env` added, its log in `dir`, after it placed order o-1
/// for customer c1 (every component running).
async fn up_with_an_order(
    dir: &Path,
    env: &[(&str, String)],
) -> (OrdoProcess, NatsServer, TestDatabase) {
    let nats = NatsServer::start();
    let database = TestDatabase::create().await;
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.join("up.log");
    let settings = [
        ("ORDO_NATS_URL", nats.url()),
        ("ORDO_DATABASE_URL", database.url().to_owned()),
        ("ORDO_HTTP_ADDR", http.to_string()),
        ("ORDO_HOME", dir.display().to_string()),
    ];
    let up = OrdoProcess::start(
        ORDO,
        &["up"],
        settings.into_iter().chain(env.iter().cloned()),
        &log,
    );
    let client = nats.client().await;
    for (subject, body) in [
        (
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 5}),
        ),
        (
            Endpoint::OrderPlace.subject(),
            json!({"order_id": "o-1", "customer_id": "c1",
                   "lines": [{"sku": "A1", "qty": 1, "unit_price_cents": 500}]}),
        ),
    ] {
        let reply = NatsServer::request_until_answered(
            &client,
            subject,
            &body,
            None,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(reply["ok"], true, "{reply}; see {}", log.display());
    }
    (up, nats, database)
}

#[test]
fn postgresql_is_reached_over_tls_with_its_certificate_verified() {
    let dir = tempfile::tempdir().unwrap();
    let certificates = Certificates::issue(dir.path());
    let server = PostgresServer::start();
    server
        .require_tls(
            &pem(&certificates.server_cert),
            &pem(&certificates.server_key),
        )
        .unwrap();
    let migrate = |url: String| {
        Command::new(ORDO)
            .arg("migrate")
            .env("ORDO_DATABASE_URL", url)
            .output()
            .unwrap()
    };
    let verified_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.url("postgres"),
        certificates.ca.display()
    );
    let verified = migrate(verified_url);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(String::from_utf8_lossy(&verified.stdout).contains("created what was missing"));

    // A server whose certificate another CA signed is refused, and so is plain text.
    let other = tempfile::tempdir().unwrap();
    let stranger = Certificates::issue(other.path());
    let refused = migrate(format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.url("postgres"),
        stranger.ca.display()
    ));
    assert!(!refused.status.success());
    let plain = migrate(format!("{}?sslmode=disable", server.url("postgres")));
    assert!(
        !plain.status.success(),
        "the server took a connection without TLS"
    );
}

#[tokio::test]
async fn webhooks_and_traces_go_over_tls_to_servers_the_configured_ca_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let certificates = Certificates::issue(dir.path());
    let https = HttpsRecorder::start(&certificates).await;
    let ca = certificates.ca.display().to_string();
    let log = dir.path().join("up.log");
    let endpoint = format!("https://127.0.0.1:{}", https.port);
    let _up = up_with_an_order(
        dir.path(),
        &[
            ("ORDO_WEBHOOK_URL", format!("{endpoint}/hook?token=s3cret")),
            // Webhooks trust the system's CAs; SSL_CERT_FILE names another bundle.
            ("SSL_CERT_FILE", ca.clone()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.clone()),
        ],
    )
    .await;
    let hook = https.received("POST /hook", dir.path()).await;
    assert!(hook.contains("\"order_id\":\"o-1\""), "{hook}");
    https.received("POST /v1/traces", dir.path()).await;

    // Over gRPC too: a command service exporting to the same server speaks HTTP/2 to it once
    // the handshake has verified its certificate. It has a nats-server of its own, so that
    // it, not `ordo up`, answers the commands that make its spans.
    let grpc_nats = NatsServer::start();
    let client = grpc_nats.client().await;
    let grpc_log = dir.path().join("grpc.log");
    let _commands = OrdoProcess::start(
        ORDO,
        &["run", "commands"],
        [
            ("ORDO_NATS_URL", grpc_nats.url()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.clone()),
        ],
        &grpc_log,
    );
    for _ in 0..20 {
        let _ = NatsServer::request_until_answered(
            &client,
            Endpoint::StockReceive.subject(),
            &json!({"sku": "B1", "qty": 1}),
            None,
            Duration::from_secs(60),
        )
        .await;
    }
    https.received("h2", dir.path()).await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("s3cret"),
        "the webhook's token in the log: {logged}"
    );
}

#[tokio::test]
async fn a_webhook_whose_certificate_no_trusted_ca_signed_gets_nothing_and_its_url_stays_secret() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = Certificates::issue(dir.path());
    let other = tempfile::tempdir().unwrap();
    let stranger = HttpsRecorder::start(&Certificates::issue(other.path())).await;
    let log = dir.path().join("up.log");
    let _up = up_with_an_order(
        dir.path(),
        &[
            (
                "ORDO_WEBHOOK_URL",
                format!("https://127.0.0.1:{}/hook?token=s3cret", stranger.port),
            ),
            ("SSL_CERT_FILE", trusted.ca.display().to_string()),
        ],
    )
    .await;
    // The delivery fails at the handshake, and says so without the URL.
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let logged = std::fs::read_to_string(&log).unwrap();
        if let Some(line) = logged
            .lines()
            .find(|line| line.contains("notification not delivered"))
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no failed delivery in the log: {logged}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(failed.contains("webhook"), "{failed}");
    assert!(
        stranger.seen.lock().unwrap().is_empty(),
        "the webhook got the notification"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.contains("s3cret"),
        "the webhook's token in the log: {logged}"
    );
}
