//! One trace per order: the spans of an order, from the caller's `traceparent` through the
//! command, its append, the projectors, every saga step, the payment call and the notification,
//! arrive at an OTLP receiver (in this process) under one trace id, each under the right parent.

use ordo_contract::Endpoint;
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::Span,
};
use ordo_testkit::{NatsServer, OrdoProcess, TestDatabase};
use prost::Message;
use serde_json::{Value, json};

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

/// The caller's span: the test plays a client that already has a trace.
const CALLER_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN_ID: &str = "b7ad6b7169203331";
const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// What an OTLP receiver was sent: every span, whichever protocol brought it.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    fn take_in(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.0.lock().unwrap();
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }

    /// The spans of trace `trace_id` received so far.
    fn of_trace(&self, trace_id: &str) -> Vec<Span> {
        let spans = self.0.lock().unwrap();
        spans
            .iter()
            .filter(|span| hex(&span.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until trace `trace_id` holds a span named `name` whose `kind` is `kind` (the
    /// notifier also opens a `notify` span, with no kind, for the OrderPlaced it skips).
    async fn wait_for_kind(&self, trace_id: &str, name: &str, kind: &str) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.of_trace(trace_id);
            if spans
                .iter()
                .any(|span| span.name == name && attribute(span, "kind").as_deref() == Some(kind))
            {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} span of kind {kind} in trace {trace_id}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the spans of trace `trace_id` satisfy `done` (spans arrive in batches, a
    /// child's before its parent's at times: a test waits for exactly what it asserts).
    async fn wait_until(
        &self,
        trace_id: &str,
        what: &str,
        done: impl Fn(&[Span]) -> bool,
    ) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.of_trace(trace_id);
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never held in trace {trace_id}; received: {:?}",
                spans.iter().map(|span| &span.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until trace `trace_id` holds a span of every name in `names`.
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.of_trace(trace_id);
            let missing: Vec<&&str> = names
                .iter()
                .filter(|name| !spans.iter().any(|span| span.name == **name))
                .collect();
            if missing.is_empty() {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "spans missing from trace {trace_id}: {missing:?}; received: {:?}",
                spans.iter().map(|span| &span.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take_in(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free port: its endpoint URL.
async fn grpc_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    endpoint
}

/// An OTLP/HTTP receiver (protobuf bodies on `POST /v1/traces`) on a free port: its base URL.
async fn http_receiver(received: Received) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            match ExportTraceServiceRequest::decode(body) {
                Ok(request) => {
                    received.take_in(request);
                    (
                        axum::http::StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
                Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    endpoint
}

/// A webhook receiver on a free port: its URL, and the `traceparent` of every POST (order id,
/// kind, header).
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<(String, String, Option<String>)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let posts = Arc::new(Mutex::new(Vec::new()));
    let recorded = posts.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| async move {
                let traceparent = headers
                    .get("traceparent")
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned);
                recorded.lock().unwrap().push((
                    body["order_id"].as_str().unwrap_or_default().to_owned(),
                    body["kind"].as_str().unwrap_or_default().to_owned(),
                    traceparent,
                ));
                axum::http::StatusCode::OK
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, posts)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An `ordo` process exporting its spans to `endpoint`, every 100 ms rather than every 5 s.
fn exporting(args: &[&str], env: &[(&str, String)], endpoint: &str, log: &Path) -> OrdoProcess {
    let exporter = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ];
    OrdoProcess::start(ORDO, args, env.iter().cloned().chain(exporter), log)
}

/// Sends `body` to `subject` as a caller in trace [`CALLER`], until the command service answers.
async fn request_in_trace(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", CALLER);
    NatsServer::request_until_answered(
        client,
        subject,
        &body,
        Some(headers),
        Duration::from_secs(60),
    )
    .await
}

/// The name of the parent of each span named `name` ("none" for a parent not received).
fn parents_of(spans: &[Span], name: &str) -> Vec<String> {
    let by_id: HashMap<&[u8], &Span> = spans
        .iter()
        .map(|span| (span.span_id.as_slice(), span))
        .collect();
    named(spans, name)
        .into_iter()
        .map(|span| {
            by_id
                .get(span.parent_span_id.as_slice())
                .map_or("none".to_owned(), |parent| parent.name.clone())
        })
        .collect()
}

/// The spans named `name`.
fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|span| span.name == name).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        Any::StringValue(text) => Some(text.clone()),
        Any::IntValue(number) => Some(number.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Asserts that every span named `child` has a span named `parent` as its parent.
fn assert_parent(spans: &[Span], child: &str, parent: &str) {
    let by_id: HashMap<Vec<u8>, &Span> = spans
        .iter()
        .map(|span| (span.span_id.clone(), span))
        .collect();
    let children = named(spans, child);
    assert!(!children.is_empty(), "no span {child}");
    for span in children {
        let found = by_id
            .get(&span.parent_span_id)
            .map(|parent| parent.name.as_str());
        assert_eq!(
            found,
            Some(parent),
            "the parent of {child} (span {}) should be {parent}",
            hex(&span.span_id)
        );
    }
}

#[tokio::test]
async fn the_spans_of_one_order_arrive_under_one_trace_with_the_right_parents() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let database = TestDatabase::create().await;
    let received = Received::default();
    let endpoint = grpc_receiver(received.clone()).await;
    let (webhook_url, posts) = webhook_receiver().await;
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = [
        ("ORDO_NATS_URL", server.url()),
        ("ORDO_DATABASE_URL", database.url().to_owned()),
        ("ORDO_HTTP_ADDR", format!("127.0.0.1:{http_port}")),
        ("ORDO_HOME", dir.path().display().to_string()),
        ("ORDO_WEBHOOK_URL", webhook_url),
    ];
    // Exported over gRPC: the protocol when none is named.
    let _up = exporting(&["up"], &env, &endpoint, &dir.path().join("up.log"));

    let client = server.client().await;
    let received_stock = request_in_trace(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 5}),
    )
    .await;
    assert_eq!(received_stock["ok"], true, "{received_stock}");
    let placed = request_in_trace(
        &client,
        Endpoint::OrderPlace.subject(),
        json!({"order_id": "o-1", "customer_id": "c1",
               "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}]}),
    )
    .await;
    assert_eq!(placed["ok"], true, "{placed}");

    received
        .wait_for(
            CALLER_TRACE_ID,
            &[
                Endpoint::OrderPlace.subject(),
                "append OrderPlaced",
                "project orders",
                "saga reserve",
                Endpoint::StockReserve.subject(),
                "project stock",
                "saga authorize",
                "payment authorize",
                "saga confirm",
                Endpoint::OrderConfirm.subject(),
                "append OrderConfirmed",
            ],
        )
        .await;
    received
        .wait_for_kind(CALLER_TRACE_ID, "notify", "confirmed")
        .await;
    // The projector applies OrderConfirmed on its own time: wait for its span too, and for the
    // parent of every projector span (a child may be exported before its parent).
    let spans = received
        .wait_until(
            CALLER_TRACE_ID,
            "OrderPlaced and OrderConfirmed projected, each under its command",
            |spans| {
                let parents = parents_of(spans, "project orders");
                parents.contains(&Endpoint::OrderPlace.subject().to_owned())
                    && parents.contains(&Endpoint::OrderConfirm.subject().to_owned())
                    && !parents.contains(&"none".to_owned())
                    && !parents_of(spans, "project stock").contains(&"none".to_owned())
            },
        )
        .await;

    // The command continues the caller's span; its append and its event's readers follow it.
    let place = named(&spans, Endpoint::OrderPlace.subject());
    let place = place
        .iter()
        .find(|span| hex(&span.parent_span_id) == CALLER_SPAN_ID)
        .expect("order.place is a child of the caller's span");
    assert_eq!(attribute(place, "outcome").as_deref(), Some("ok"));
    assert_parent(&spans, "append OrderPlaced", Endpoint::OrderPlace.subject());
    // Every step of the saga hangs under the command that placed the order…
    for step in ["saga reserve", "saga authorize", "saga confirm"] {
        assert_parent(&spans, step, Endpoint::OrderPlace.subject());
    }
    // …and each command a step sends, under that step.
    assert_parent(&spans, Endpoint::StockReserve.subject(), "saga reserve");
    assert_parent(&spans, "payment authorize", "saga authorize");
    assert_parent(&spans, Endpoint::OrderConfirm.subject(), "saga confirm");
    assert_parent(
        &spans,
        "append OrderConfirmed",
        Endpoint::OrderConfirm.subject(),
    );
    // The notification follows the event of the confirm.
    let by_id: HashMap<Vec<u8>, &Span> = spans
        .iter()
        .map(|span| (span.span_id.clone(), span))
        .collect();
    let notified = named(&spans, "notify")
        .into_iter()
        .find(|span| attribute(span, "kind").as_deref() == Some("confirmed"))
        .expect("a notify span of kind confirmed");
    assert_eq!(
        by_id
            .get(&notified.parent_span_id)
            .map(|span| span.name.as_str()),
        Some(Endpoint::OrderConfirm.subject())
    );
    // The webhook's POST carries the notification's span as its parent, as NATS's message does.
    let deadline = Instant::now() + Duration::from_secs(30);
    let posted = loop {
        let found = posts
            .lock()
            .unwrap()
            .iter()
            .find(|(order, kind, _)| order == "o-1" && kind == "confirmed")
            .cloned();
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook POST of o-1 confirmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        posted.2,
        Some(format!(
            "00-{CALLER_TRACE_ID}-{}-01",
            hex(&notified.span_id)
        )),
        "the webhook POST's traceparent"
    );
    // A projector's apply hangs under the command whose event it applied.
    for project in named(&spans, "project orders")
        .into_iter()
        .chain(named(&spans, "project stock"))
    {
        let parent = by_id
            .get(&project.parent_span_id)
            .map(|span| span.name.as_str())
            .unwrap_or("none");
        assert!(
            parent.starts_with("ordo.cmd.") || parent.starts_with("ordo.internal."),
            "{} should follow a command, not {parent}",
            project.name
        );
    }
    let order_projected_under = named(&spans, "project orders")
        .into_iter()
        .filter_map(|span| by_id.get(&span.parent_span_id))
        .map(|span| span.name.as_str())
        .collect::<Vec<_>>();
    assert!(
        order_projected_under.contains(&Endpoint::OrderPlace.subject())
            && order_projected_under.contains(&Endpoint::OrderConfirm.subject()),
        "{order_projected_under:?}"
    );
}

#[tokio::test]
async fn spans_go_over_http_protobuf_when_the_protocol_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start();
    let received = Received::default();
    let endpoint = http_receiver(received.clone()).await;
    let env = [
        ("ORDO_NATS_URL", server.url()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
        ("ORDO_LOG_FORMAT", "json".to_owned()),
    ];
    let log = dir.path().join("commands.log");
    let _commands = exporting(&["run", "commands"], &env, &endpoint, &log);

    let client = server.client().await;
    let reply = request_in_trace(
        &client,
        Endpoint::StockReceive.subject(),
        json!({"sku": "A1", "qty": 5}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let spans = received
        .wait_for(
            CALLER_TRACE_ID,
            &[Endpoint::StockReceive.subject(), "append StockReceived"],
        )
        .await;
    assert_parent(
        &spans,
        "append StockReceived",
        Endpoint::StockReceive.subject(),
    );

    // Logs are JSON lines when asked.
    let log = std::fs::read_to_string(&log).unwrap();
    let first = log.lines().next().expect("a log line");
    let line: Value = serde_json::from_str(first).unwrap_or_else(|err| panic!("{err}: {first}"));
    assert!(
        line["level"].is_string() && line["fields"].is_object(),
        "{line}"
    );
}
