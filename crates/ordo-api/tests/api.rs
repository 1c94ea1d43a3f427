//! The HTTP read model over a real listener, with real nats-server, command service, projectors
//! and PostgreSQL behind it.

use ordo_contract::Endpoint;
use std::{collections::HashSet, time::Duration};

use async_nats::jetstream;
use ordo_api::ApiState;
use ordo_eventstore::ConsumerId;
use ordo_harness::Engine;
use ordo_projections::{Projector, ProjectorConfig, orders::OrdersView, schema, stock::StockView};
use ordo_testkit::{NatsServer, TestDatabase};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Long enough for projectors that have just been spawned on a busy machine to apply a write:
/// a test that reads its own write does not depend on how fast the machine is.
const READ_YOUR_WRITE_WAIT: Duration = Duration::from_secs(10);

/// `/metrics` sets the process's gauges from its own database, then renders them: the recorder is
/// one per process, so two tests' scrapes at once could show one test the other's figures.
static ONE_SCRAPE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `/metrics` of the API at `base`, one scrape at a time in this binary.
async fn scrape(http: &reqwest::Client, base: &str) -> String {
    let _alone = ONE_SCRAPE_AT_A_TIME.lock().await;
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// For the tests that wait for a sequence that never comes.
const SHORT_WAIT: Duration = Duration::from_millis(500);

struct Setup {
    engine: Engine,
    database: TestDatabase,
    base: String,
    http: reqwest::Client,
}

impl Setup {
    async fn start() -> Self {
        Self::start_with(ordo_api::AccessTokens::default()).await
    }

    async fn start_with(tokens: ordo_api::AccessTokens) -> Self {
        Self::start_configured(
            tokens,
            ordo_api::DEFAULT_MAX_READS_IN_FLIGHT,
            READ_YOUR_WRITE_WAIT,
        )
        .await
    }

    /// `min_seq_wait`: how long a read waits for a sequence its view has not applied yet.
    async fn start_configured(
        tokens: ordo_api::AccessTokens,
        max_reads_in_flight: usize,
        min_seq_wait: Duration,
    ) -> Self {
        let engine = Engine::start().await;
        let database = TestDatabase::create().await;
        ordo_saga::schema::migrate(database.pool()).await.unwrap();
        schema::prepare(database.pool()).await.unwrap();
        let config = ProjectorConfig {
            ..Default::default()
        };
        let js = jetstream::new(engine.client.clone());
        let orders =
            Projector::<OrdersView>::new(database.pool().clone(), js.clone(), config.clone());
        let stock = Projector::<StockView>::new(database.pool().clone(), js, config);
        tokio::spawn(async move { orders.run(std::future::pending()).await });
        tokio::spawn(async move { stock.run(std::future::pending()).await });

        let mut state = ApiState::new(database.pool().clone(), engine.client.clone());
        state.min_seq_wait = min_seq_wait;
        state.tokens = tokens;
        state.reads_in_flight =
            std::sync::Arc::new(tokio::sync::Semaphore::new(max_reads_in_flight));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(ordo_api::serve(listener, state, std::future::pending()));
        Self {
            engine,
            database,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn command(&self, endpoint: Endpoint, body: Value) -> Value {
        self.engine.command(endpoint, body).await
    }

    async fn place(&self, order_id: &str, customer_id: &str) -> Value {
        self.command(
            Endpoint::OrderPlace,
            json!({"order_id": order_id, "customer_id": customer_id,
                   "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}]}),
        )
        .await
    }

    /// `/metrics` as Prometheus reads it, one scrape at a time in this binary.
    async fn metrics(&self) -> String {
        scrape(&self.http, &self.base).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn each_committed_projector_batch_announces_its_views_checkpoint() {
    let setup = Setup::start().await;
    let signals = ordo_api::checkpoints::CheckpointSignals::listen(
        setup.database.pool().clone(),
        &["orders", "stock"],
    );
    let mut orders = signals.subscribe("orders").unwrap();
    // The listener is up once it hears an announcement; keep placing until one arrives.
    let mut seq = 0;
    let announced = tokio::time::timeout(Duration::from_secs(20), async {
        for i in 0.. {
            seq = setup.place(&format!("o-{i}"), "c1").await["seq"]
                .as_u64()
                .unwrap();
            let announced = orders.wait_for(|announced| announced.of_view() >= seq);
            if tokio::time::timeout(Duration::from_millis(200), announced)
                .await
                .is_ok()
            {
                break;
            }
        }
    })
    .await;
    assert!(announced.is_ok(), "no announcement of the orders view");
    assert!(orders.borrow().of_view() >= seq);
    assert!(signals.subscribe("nonexistent").is_none());
}

#[tokio::test]
async fn a_client_reads_its_own_write_with_min_seq() {
    let setup = Setup::start().await;
    let reply = setup.place("o-1", "c1").await;
    let (status, order) = setup
        .get(&format!("/orders/o-1?min_seq={}", reply["seq"]))
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["status"], "pending");
    assert_eq!(order["customer_id"], "c1");
    assert_eq!(order["total_cents"], 1000);
    assert_eq!(
        order["lines"],
        json!([{"sku": "A1", "qty": 2, "unit_price_cents": 500}])
    );
    assert_eq!(
        order["parked_events"], 0,
        "a row that is not behind its stream"
    );

    let received = setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    let (status, stock) = setup
        .get(&format!("/stock/A1?min_seq={}", received["seq"]))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            stock["on_hand"].clone(),
            stock["reserved"].clone(),
            stock["available"].clone()
        ),
        (json!(5), json!(0), json!(5))
    );

    // A later write is seen by a read that asks for it, even right after a cached read.
    let confirmed = setup
        .command(Endpoint::OrderConfirm, json!({"order_id": "o-1"}))
        .await;
    let (_, order) = setup
        .get(&format!("/orders/o-1?min_seq={}", confirmed["seq"]))
        .await;
    assert_eq!(order["status"], "confirmed");
}

#[tokio::test]
async fn a_view_that_does_not_catch_up_in_time_answers_504_with_its_checkpoint() {
    let setup = Setup::start_configured(
        ordo_api::AccessTokens::default(),
        ordo_api::DEFAULT_MAX_READS_IN_FLIGHT,
        SHORT_WAIT,
    )
    .await;
    let reply = setup.place("o-1", "c1").await;
    let ahead = reply["seq"].as_u64().unwrap() + 100;
    let (status, body) = setup.get(&format!("/orders/o-1?min_seq={ahead}")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body["error"]["code"], "not_caught_up");
    assert!(body["error"]["checkpoint"].as_u64().unwrap() < ahead);
}

/// A read of one order waits for the partition the order is in, not for the whole view: a view
/// whose other partitions are behind still answers it, while a list, which holds orders of every
/// partition, waits for all of them.
#[tokio::test]
async fn a_read_of_one_order_waits_for_its_partition_and_a_list_for_every_partition() {
    let setup = Setup::start_configured(
        ordo_api::AccessTokens::default(),
        ordo_api::DEFAULT_MAX_READS_IN_FLIGHT,
        SHORT_WAIT,
    )
    .await;
    let seq = setup.place("o-1", "c1").await["seq"].as_u64().unwrap();
    let (status, _) = setup.get(&format!("/orders/o-1?min_seq={seq}")).await;
    assert_eq!(status, StatusCode::OK);
    // Every other partition of the view back before the order (as if their projector were
    // behind; no event comes after, so none moves them again).
    let partition =
        ordo_eventstore::partition_of("o-1", ordo_eventstore::partition::DEFAULT_PARTITIONS);
    let behind =
        sqlx::query("UPDATE view_orders.partition_checkpoints SET seq = 0 WHERE partition <> $1")
            .bind(partition as i32)
            .execute(setup.database.pool())
            .await
            .unwrap();
    assert_eq!(
        behind.rows_affected(),
        u64::from(ordo_eventstore::partition::DEFAULT_PARTITIONS) - 1
    );

    let (status, order) = setup.get(&format!("/orders/o-1?min_seq={seq}")).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["order_id"], "o-1");
    let (status, body) = setup.get(&format!("/orders?min_seq={seq}")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(
        body["error"]["checkpoint"], 0,
        "the partition furthest behind"
    );
}

/// Each read in flight holds a connection and memory (a waiting one for up to 5 s); past the
/// bound, a read is shed at once (503, `Retry-After`) while health is still answered, and once
/// the reads in flight end, reads are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_bound_a_read_is_shed_with_503_and_retry_after_and_health_still_answers() {
    // Long enough that the three reads below are surely sent while the first two wait.
    let setup =
        Setup::start_configured(ordo_api::AccessTokens::default(), 2, Duration::from_secs(3)).await;
    let reply = setup.place("o-1", "c1").await;
    let seq = reply["seq"].as_u64().unwrap();
    let (status, _) = setup.get(&format!("/orders/o-1?min_seq={seq}")).await;
    assert_eq!(status, StatusCode::OK, "the view has the order");
    // Three reads wait for a sequence that does not come: the first two to arrive hold the
    // two places for the whole wait, so the third, whichever it is, is shed at once.
    let path = format!("/orders/o-1?min_seq={}", seq + 100);
    let reads: Vec<_> = (0..3)
        .map(|_| {
            let (http, url) = (setup.http.clone(), format!("{}{path}", setup.base));
            tokio::spawn(async move {
                let response = http.get(url).send().await.unwrap();
                let status = response.status();
                let retry_after = response.headers().get("retry-after").cloned();
                (status, retry_after, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    // Health is outside the bound: it answers while the places are taken.
    assert_eq!(setup.get("/healthz").await.0, StatusCode::OK);
    let mut answers = Vec::new();
    for read in reads {
        answers.push(read.await.unwrap());
    }
    let (shed, waited): (Vec<_>, Vec<_>) = answers
        .into_iter()
        .partition(|(status, ..)| *status == StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.len(), 1, "one read shed: {shed:?} {waited:?}");
    assert!(
        waited
            .iter()
            .all(|(status, ..)| *status == StatusCode::GATEWAY_TIMEOUT),
        "the two others waited their time: {waited:?}"
    );
    let (_, retry_after, body) = &shed[0];
    assert_eq!(retry_after.as_ref().unwrap(), "1");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert_eq!(body["error"]["retry_after_ms"], 1000, "{body}");
    // The reads in flight gave their places back.
    let (status, order) = setup.get("/orders/o-1").await;
    assert_eq!(status, StatusCode::OK, "{order}");
}

#[tokio::test]
async fn bad_parameters_are_400_with_the_reason_and_unknown_things_404() {
    let setup = Setup::start().await;
    for (path, reason) in [
        ("/orders/o.1", "order_id \"o.1\" is not a valid id"),
        ("/orders?status=lost", "status \"lost\" is not one of"),
        ("/orders?limit=0", "limit must be 1 to 500"),
        ("/orders?limit=lots", "limit"),
        (
            "/orders?cursor=abc",
            "cursor \"abc\" is not one this API returned",
        ),
        ("/orders?colour=red", "unknown field `colour`"),
        ("/orders?customer_id=c*", "customer_id"),
        ("/stock/A1?min_seq=-1", "min_seq"),
        ("/notifications?order_id=a%20b", "order_id"),
    ] {
        let (status, body) = setup.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{path}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(reason),
            "{path}: {message:?} should say {reason:?}"
        );
    }
    for path in [
        "/orders/nope",
        "/stock/nope",
        "/sagas/nope",
        "/no/such/route",
    ] {
        let (status, body) = setup.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_returns_every_order_once_while_orders_are_inserted() {
    let setup = Setup::start().await;
    let mut last = Value::Null;
    for i in 0..30 {
        last = setup.place(&format!("early-{i:02}"), "c1").await;
    }
    // Between two pages, three orders are placed and applied to the view before the next page
    // is read (min_seq): every page after the first is read from a view that grew under it.
    let mut seen = Vec::new();
    let mut path = format!("/orders?customer_id=c1&limit=7&min_seq={}", last["seq"]);
    let mut late = 0;
    loop {
        let (status, page) = setup.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_owned()),
        );
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        for _ in 0..3 {
            last = setup.place(&format!("late-{late:02}"), "c1").await;
            late += 1;
        }
        path = format!(
            "/orders?customer_id=c1&limit=7&cursor={cursor}&min_seq={}",
            last["seq"]
        );
    }
    assert!(late >= 12, "orders were placed between the pages: {late}");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no order twice: {seen:?}");
    for i in 0..30 {
        assert!(
            unique.contains(&format!("early-{i:02}")),
            "early-{i:02} missing"
        );
    }
    // Orders placed while paging sort after every cursor handed out: the pages reach them.
    assert!(
        unique.contains(&format!("late-{:02}", late - 1)),
        "the last order placed while paging: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "in placing order: {seen:?}"
    );
}

#[tokio::test]
async fn operators_see_projections_readiness_and_metrics() {
    let setup = Setup::start().await;
    let reply = setup.place("o-1", "c1").await;
    setup
        .get(&format!("/orders/o-1?min_seq={}", reply["seq"]))
        .await;
    let js = jetstream::new(setup.engine.client.clone());
    js.publish("ordo.order.events.bad", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let orders = loop {
        let (status, body) = setup.get("/projections").await;
        assert_eq!(status, StatusCode::OK);
        let orders = body["projections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "orders")
            .unwrap()
            .clone();
        if orders["parked"] == 1 && orders["lag"] == 0 {
            break orders;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (orders["checkpoint"].clone(), orders["stream_head"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(orders["parked_events"][0]["seq"], 2);
    assert_eq!(
        orders["parked_events"][0]["subject"],
        "ordo.order.events.bad"
    );

    assert_eq!(
        setup.get("/healthz").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    // An event the notifier holds back (this setup runs none: as it would have recorded it).
    sqlx::query(
        "INSERT INTO unreadable_events (consumer, stream, seq, subject, event_type, schema, reason, deliveries)
         VALUES ($1, 'ORDO_ORDERS', 2, 'ordo.order.events.bad', NULL, NULL, 'not an event', 3)",
    )
    .bind(ConsumerId::Notifier.name())
    .execute(setup.database.pool())
    .await
    .unwrap();
    let (status, ready) = setup.get("/readyz").await;
    assert_eq!(
        ready["unreadable_events"],
        json!({ConsumerId::Notifier.name(): 1}),
        "{ready}"
    );
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(
        ready["streams"][ordo_eventstore::StreamId::Orders.name()],
        "ok",
        "{ready}"
    );
    assert_eq!(ready["streams"]["ORDO_SNAPSHOTS"], "ok", "{ready}");
    let metrics = setup.metrics().await;
    assert!(
        metrics.contains(r#"ordo_projection_parked_events{projection="orders"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ordo_projection_lag_events{projection="stock"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"ordo_unreadable_events{{consumer="{}"}} 1"#,
            ConsumerId::Notifier
        )) && metrics.contains(&format!(
            r#"ordo_unreadable_events{{consumer="{}"}} 0"#,
            ConsumerId::Saga
        )),
        "{metrics}"
    );
}

/// The API alone over `pool` and `client` (no projector), as `ordo run api` serves it; its URL.
async fn serve_api(pool: &sqlx::PgPool, client: async_nats::Client) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(ordo_api::serve(
        listener,
        ApiState::new(pool.clone(), client),
        std::future::pending(),
    ));
    base
}

#[tokio::test]
async fn while_postgresql_is_down_reads_are_503_and_readiness_says_why() {
    let postgres = ordo_testkit::PostgresServer::start();
    let database = TestDatabase::create_on(&postgres.url("postgres")).await;
    ordo_saga::schema::migrate(database.pool()).await.unwrap();
    schema::prepare(database.pool()).await.unwrap();
    let server = NatsServer::start();
    let client = server.client().await;
    let base = serve_api(database.pool(), client).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/stock/A1"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    postgres.stop();
    let response = http.get(format!("{base}/stock/A1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The body says which dependency is missing, and that the other one is fine.
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["checks"]["nats"], "ok", "{ready}");
    let why = ready["checks"]["postgres"].as_str().unwrap_or_default();
    assert!(
        !why.is_empty() && why != "ok",
        "readiness does not say why: {ready}"
    );
    // This server has no stream yet: each one is named as missing.
    assert_eq!(
        ready["streams"][ordo_eventstore::StreamId::Orders.name()],
        "missing",
        "{ready}"
    );

    postgres.start_again().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::OK
    {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn hostile_query_parameters_are_400_with_the_json_error_shape() {
    let setup = Setup::start().await;
    let long = "x".repeat(5000);
    let hostile = [
        "/orders?limit=-1".to_owned(),
        "/orders?limit=501".to_owned(),
        "/orders?limit=1e3".to_owned(),
        "/orders?limit=99999999999999999999999".to_owned(),
        "/orders?limit=".to_owned(),
        "/orders?cursor=-5".to_owned(),
        "/orders?cursor=99999999999999999999999".to_owned(),
        "/orders?cursor=%00".to_owned(),
        "/orders?status=".to_owned(),
        "/orders?status=CONFIRMED".to_owned(),
        "/orders?status=pending&status=confirmed".to_owned(),
        "/orders?customer_id=a.b".to_owned(),
        "/orders?customer_id=%3E".to_owned(),
        format!("/orders?customer_id={long}"),
        "/orders?min_seq=abc".to_owned(),
        "/orders?min_seq=18446744073709551616".to_owned(),
        "/orders/o-1?min_seq=1.5".to_owned(),
        "/orders/o-1?min_seq=-0".to_owned(),
        "/orders/o-1?unknown=1".to_owned(),
        "/stock/A1?min_seq=%FF".to_owned(),
        "/stock/%2A".to_owned(),
        format!("/stock/{long}"),
        "/sagas/a%20b".to_owned(),
        "/notifications?order_id=".to_owned(),
        "/notifications?order_id=o-1&kind=x".to_owned(),
    ];
    for path in hostile {
        let (status, body) = setup.get(&path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{path}"
        );
    }
    // And the API still answers.
    assert_eq!(setup.get("/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn with_a_token_every_endpoint_but_healthz_answers_401_with_the_json_error_shape() {
    let setup = Setup::start_with(ordo_api::AccessTokens {
        api: Some(ordo_api::Token::new("api-token")),
        metrics: Some(ordo_api::Token::new("metrics-token")),
    })
    .await;
    let get = |path: &str, token: Option<&str>| {
        let mut request = setup.http.get(format!("{}{path}", setup.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|value| value.to_str().unwrap().to_owned());
            (
                status,
                challenge,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    for path in [
        "/orders",
        "/orders/o-1",
        "/stock/A1",
        "/sagas/o-1",
        "/notifications",
        "/projections",
        "/readyz",
        "/metrics",
        "/no-such-path",
    ] {
        for token in [None, Some("wrong-token")] {
            let (status, challenge, body) = get(path, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {token:?}");
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{path}");
            assert_eq!(body["error"]["code"], "unauthorized", "{path}: {body}");
            assert!(body["error"]["message"].is_string(), "{path}: {body}");
        }
    }
    // A liveness probe needs no token.
    assert_eq!(get("/healthz", None).await.0, StatusCode::OK);
    // With the token, reads answer as ever.
    assert_eq!(get("/orders", Some("api-token")).await.0, StatusCode::OK);
    assert_eq!(
        get("/stock/A1", Some("api-token")).await.0,
        StatusCode::NOT_FOUND
    );
    // /metrics takes its own token, not the API's.
    let _alone = ONE_SCRAPE_AT_A_TIME.lock().await;
    assert_eq!(
        get("/metrics", Some("metrics-token")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        get("/metrics", Some("api-token")).await.0,
        StatusCode::UNAUTHORIZED
    );
}

/// A row whose later events could not be applied says so on every read: it is behind its stream.
#[tokio::test]
async fn a_row_behind_its_stream_counts_its_parked_events() {
    let setup = Setup::start().await;
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    setup.place("o-1", "c1").await;
    let js = jetstream::new(setup.engine.client.clone());
    let mut last = (0, 0);
    for _ in 0..2 {
        for (i, subject) in ["ordo.stock.events.A1", "ordo.order.events.o-1"]
            .into_iter()
            .enumerate()
        {
            let seq = js
                .publish(subject, "not an event".into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence;
            if i == 0 {
                last.0 = seq;
            } else {
                last.1 = seq;
            }
        }
    }
    // A view's checkpoint moves past a parked event: min_seq waits for the parking too.
    let (status, stock) = setup.get(&format!("/stock/A1?min_seq={}", last.0)).await;
    assert_eq!(status, StatusCode::OK, "{stock}");
    assert_eq!(stock["parked_events"], 2, "{stock}");
    assert_eq!(
        (stock["on_hand"].clone(), stock["version"].clone()),
        (json!(5), json!(1)),
        "{stock}"
    );
    let (status, order) = setup.get(&format!("/orders/o-1?min_seq={}", last.1)).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["parked_events"], 2, "{order}");
    // Another row of the same view is not behind.
    let other = setup
        .command(Endpoint::StockReceive, json!({"sku": "B2", "qty": 1}))
        .await;
    let (_, b2) = setup
        .get(&format!("/stock/B2?min_seq={}", other["seq"]))
        .await;
    assert_eq!(b2["parked_events"], 0, "{b2}");
}

/// A saga stuck in a compensation is shown with the step and its last error, and counted in
/// the metrics. (This setup runs no coordinator: the row is as a coordinator writes it.)
#[tokio::test]
async fn a_stuck_saga_is_shown_with_its_step_and_counted_in_the_metrics() {
    let setup = Setup::start().await;
    sqlx::query(
        "INSERT INTO sagas (order_id, state, steps, reason, data) VALUES ('o-stuck', 'compensation_stuck', $1,
         'refund outcome unknown after 6 attempts: refunds are down', '{}')",
    )
    .bind(json!([
        {"kind": "release", "sku": "A1", "state": "succeeded", "attempts": 1,
         "last_error": null, "last_attempt_at": null},
        {"kind": "refund", "amount_cents": 1000, "state": "unknown", "attempts": 6,
         "last_error": "refunds are down", "last_attempt_at": null}
    ]))
    .execute(setup.database.pool())
    .await
    .unwrap();
    let (status, saga) = setup.get("/sagas/o-stuck").await;
    assert_eq!(status, StatusCode::OK, "{saga}");
    assert_eq!(saga["state"], "compensation_stuck", "{saga}");
    assert!(
        saga["reason"]
            .as_str()
            .unwrap()
            .starts_with("refund outcome unknown after 6 attempts"),
        "{saga}"
    );
    assert_eq!(saga["steps"][1]["attempts"], 6, "{saga}");
    assert_eq!(saga["steps"][1]["last_error"], "refunds are down", "{saga}");
    let metrics = setup.metrics().await;
    assert!(
        metrics.contains(r#"ordo_sagas{state="compensation_stuck"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ordo_sagas{state="running"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn while_nats_is_down_readiness_names_nats_and_postgresql_stays_ok() {
    let database = TestDatabase::create().await;
    ordo_saga::schema::migrate(database.pool()).await.unwrap();
    schema::prepare(database.pool()).await.unwrap();
    let server = NatsServer::start();
    let client = server.client().await;
    ordo_eventstore::streams::apply_all(
        &jetstream::new(client.clone()),
        &ordo_eventstore::StreamDefinition::built_in(),
    )
    .await
    .unwrap();
    let base = serve_api(database.pool(), client).await;
    let http = reqwest::Client::new();
    let readyz = || async {
        let response = http.get(format!("{base}/readyz")).send().await.unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    let metrics = || scrape(&http, &base);
    assert_eq!(readyz().await.0, StatusCode::OK);
    let scraped = metrics().await;
    assert!(
        scraped.contains("ordo_read_model_up 1\n")
            && scraped.contains(r#"ordo_projection_lag_events{projection="orders"} 0"#),
        "{scraped}"
    );

    server.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (status, ready) = loop {
        let (status, ready) = readyz().await;
        if status != StatusCode::OK {
            break (status, ready);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still ready with NATS down: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["checks"]["postgres"], "ok", "{ready}");
    let why = ready["checks"]["nats"].as_str().unwrap_or_default();
    assert!(
        !why.is_empty() && why != "ok",
        "readiness does not say why: {ready}"
    );
    // The read model is not up without its streams' heads, and a lag it cannot know is NaN,
    // not the last figure (which would look like a view keeping up).
    let scraped = metrics().await;
    assert!(scraped.contains("ordo_read_model_up 0\n"), "{scraped}");
    assert!(
        scraped.contains(r#"ordo_projection_lag_events{projection="orders"} NaN"#),
        "{scraped}"
    );
    assert!(
        scraped.contains(&format!(
            r#"ordo_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )),
        "{scraped}"
    );

    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while readyz().await.0 != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let scraped = metrics().await;
        if scraped.contains("ordo_read_model_up 1\n")
            && scraped.contains(r#"ordo_projection_lag_events{projection="orders"} 0"#)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not up again: {scraped}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The console's partitions page names the command service's partition group as the command
/// service does (the API does not depend on the command service).
#[test]
fn the_console_names_the_command_services_partition_group() {
    assert_eq!(
        ordo_api::console::COMMANDS_GROUP,
        ordo_commands::service::PARTITION_GROUP
    );
}

/// The console shows how near the backlogs are to the command service's default bounds.
#[test]
fn the_consoles_shedding_bounds_default_to_the_command_services() {
    let shown = ordo_api::ShedBounds::default();
    let applied = ordo_commands::backpressure::BacklogLimits::default();
    assert_eq!(
        (shown.saga_backlog, shown.projection_lag),
        (applied.saga, applied.projection)
    );
}
