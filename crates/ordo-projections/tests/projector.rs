//! Projectors against real nats-server and PostgreSQL: events in, rows out, exactly once.

use ordo_contract::Endpoint;
use std::{collections::BTreeSet, time::Duration};

use async_nats::jetstream;
use futures::StreamExt;
use ordo_domain::{order::OrderAggregate, stock::StockAggregate};
use ordo_eventstore::{EventStore, StreamDefinition, streams::apply_all};
use ordo_harness::Engine;
use ordo_projections::{
    Projection, Projector, ProjectorConfig,
    orders::OrdersView,
    rebuild::rebuild,
    schema::{self, live_schema},
    stock::StockView,
};
use ordo_testkit::TestDatabase;
use serde_json::{Value, json};
use sqlx::{Connection, PgPool, Row};
use tokio::{sync::oneshot, task::JoinHandle};

struct Setup {
    engine: Engine,
    database: TestDatabase,
}

/// What the projectors of this test binary log, as an operator reads it: a test that asserts a
/// projector left a view alone first waits for the line that says it looked and refused.
static LOGGED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Log;

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGGED.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the warnings of every projector of this binary to [`LOGGED`], from the first test on.
fn capture_logs() {
    static CAPTURE: std::sync::Once = std::sync::Once::new();
    CAPTURE.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| Log)
            .with_ansi(false)
            .with_env_filter("ordo_projections=warn")
            .init();
    });
}

/// Where the log is now: what is logged later is after what a test did so far.
fn log_mark() -> usize {
    LOGGED.lock().unwrap().len()
}

/// Waits (up to 20 s) until a projector has logged `text` after `mark`.
async fn logged_since(mark: usize, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&LOGGED.lock().unwrap()[mark..]).contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "no projector logged {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Setup {
    async fn start() -> Self {
        capture_logs();
        let engine = Engine::start().await;
        let database = TestDatabase::create().await;
        schema::migrate(database.pool()).await.unwrap();
        Self { engine, database }
    }

    fn pool(&self) -> &PgPool {
        self.database.pool()
    }

    async fn command(&self, endpoint: Endpoint, body: Value) -> Value {
        self.engine.command(endpoint, body).await
    }

    /// Starts a projector instance; dropping the handle's sender stops it, aborting kills it.
    fn projector<P: Projection>(&self) -> (oneshot::Sender<()>, JoinHandle<()>) {
        let projector = Projector::<P>::new(
            self.pool().clone(),
            jetstream::new(self.engine.client.clone()),
            ProjectorConfig {
                batch_size: 32,
                retry_base: Duration::from_millis(20),
                max_attempts: 3,
                ..ProjectorConfig::default()
            },
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            projector
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        (stop, task)
    }

    /// Waits until the view's checkpoint reaches the stream's last sequence.
    async fn caught_up<P: Projection>(&self) {
        let mut stream = jetstream::new(self.engine.client.clone())
            .get_stream(P::STREAM)
            .await
            .unwrap();
        let head = stream.info().await.unwrap().state.last_sequence;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let checkpoint = schema::checkpoint::<P>(self.pool(), &live_schema::<P>())
                .await
                .unwrap_or(0);
            if checkpoint >= head {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} stuck at {checkpoint} of {head}; the projectors logged: {}",
                P::NAME,
                String::from_utf8_lossy(&LOGGED.lock().unwrap())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn parked(&self) -> Vec<(String, i64, String)> {
        sqlx::query("SELECT projection, seq, reason FROM parked_events ORDER BY projection, seq")
            .fetch_all(self.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    /// The aggregates that have events in `stream`: the last token of each subject.
    async fn aggregates_in_stream(&self, stream: ordo_eventstore::StreamId) -> BTreeSet<String> {
        let stream = jetstream::new(self.engine.client.clone())
            .get_stream(stream.name())
            .await
            .unwrap();
        let subjects = stream.info_with_subjects(">").await.unwrap();
        subjects
            .map(|subject| {
                let (subject, _count) = subject.unwrap();
                subject.rsplit('.').next().unwrap().to_owned()
            })
            .collect()
            .await
    }

    /// The view holds a row for every SKU of the stream and for nothing else, and each row is
    /// the SKU folded from its events by the domain.
    async fn stock_view_matches_the_stream(&self) {
        let store = EventStore::open(
            self.engine.client.clone(),
            &[ordo_eventstore::StreamId::Stock],
        )
        .await
        .unwrap();
        let rows = sqlx::query(
            "SELECT sku, on_hand, reserved, available, version FROM view_stock.stock ORDER BY sku",
        )
        .fetch_all(self.pool())
        .await
        .unwrap();
        let in_view: BTreeSet<String> = rows.iter().map(|row| row.get("sku")).collect();
        let in_stream = self
            .aggregates_in_stream(ordo_eventstore::StreamId::Stock)
            .await;
        assert!(!in_stream.is_empty(), "the test wrote no stock");
        assert_eq!(in_view, in_stream, "the SKUs of the view and of the stream");
        for row in rows {
            let sku: String = row.get("sku");
            let loaded = store.load::<StockAggregate>(&sku).await.unwrap();
            let stock = loaded.state.unwrap();
            let view: (i64, i64, i64, i64) = (
                row.get("on_hand"),
                row.get("reserved"),
                row.get("available"),
                row.get("version"),
            );
            let expected = (
                stock.on_hand as i64,
                stock.reserved as i64,
                stock.available() as i64,
                loaded.version as i64,
            );
            assert_eq!(view, expected, "{sku}");
        }
    }

    /// The view holds a row for every order of the stream and for nothing else, and each row is
    /// the order folded from its events by the domain.
    async fn orders_view_matches_the_stream(&self) {
        let store = EventStore::open(
            self.engine.client.clone(),
            &[ordo_eventstore::StreamId::Orders],
        )
        .await
        .unwrap();
        let rows =
            sqlx::query("SELECT order_id, status, version, total_cents FROM view_orders.orders")
                .fetch_all(self.pool())
                .await
                .unwrap();
        let in_view: BTreeSet<String> = rows.iter().map(|row| row.get("order_id")).collect();
        let in_stream = self
            .aggregates_in_stream(ordo_eventstore::StreamId::Orders)
            .await;
        assert!(!in_stream.is_empty(), "the test wrote no order");
        assert_eq!(
            in_view, in_stream,
            "the orders of the view and of the stream"
        );
        for row in &rows {
            let order_id: String = row.get("order_id");
            let loaded = store.load::<OrderAggregate>(&order_id).await.unwrap();
            let order = loaded.state.unwrap();
            let view: (String, i64, i64) = (
                row.get("status"),
                row.get("version"),
                row.get("total_cents"),
            );
            assert_eq!(
                view,
                (
                    order.status.as_str().to_owned(),
                    loaded.version as i64,
                    order.total_cents as i64
                ),
                "{order_id}"
            );
        }
    }
}

#[tokio::test]
async fn the_views_follow_the_commands() {
    let setup = Setup::start().await;
    let _orders = setup.projector::<OrdersView>();
    let _stock = setup.projector::<StockView>();

    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    setup
        .command(
            Endpoint::OrderPlace,
            json!({"order_id": "o-1", "customer_id": "c1", "lines": [
                {"sku": "A1", "qty": 2, "unit_price_cents": 500},
                {"sku": "B2", "qty": 1, "unit_price_cents": 250}
            ]}),
        )
        .await;
    setup
        .command(
            Endpoint::StockReserve,
            json!({"sku": "A1", "order_id": "o-1", "qty": 2}),
        )
        .await;
    setup
        .command(Endpoint::OrderConfirm, json!({"order_id": "o-1"}))
        .await;
    setup.caught_up::<OrdersView>().await;
    setup.caught_up::<StockView>().await;

    let order = sqlx::query("SELECT customer_id, status, total_cents, version FROM view_orders.orders WHERE order_id = 'o-1'")
        .fetch_one(setup.pool())
        .await
        .unwrap();
    let order: (String, String, i64, i64) =
        (order.get(0), order.get(1), order.get(2), order.get(3));
    assert_eq!(order, ("c1".into(), "confirmed".into(), 1250, 2));
    let lines: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT sku, qty, unit_price_cents FROM view_orders.order_lines WHERE order_id = 'o-1' ORDER BY line_no")
            .fetch_all(setup.pool())
            .await
            .unwrap();
    assert_eq!(lines, [("A1".into(), 2, 500), ("B2".into(), 1, 250)]);
    let stock: (i64, i64, i64) = sqlx::query_as(
        "SELECT on_hand, reserved, available FROM view_stock.stock WHERE sku = 'A1'",
    )
    .fetch_one(setup.pool())
    .await
    .unwrap();
    assert_eq!(stock, (5, 2, 3));
    assert!(setup.parked().await.is_empty());
}

#[tokio::test]
async fn an_event_that_cannot_be_applied_is_parked_and_the_view_goes_on() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    for qty in [5, 1] {
        setup
            .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": qty}))
            .await;
    }
    let js = jetstream::new(setup.engine.client.clone());
    let bad = js
        .publish("ordo.stock.events.BAD", "not an event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
        .await;
    setup.caught_up::<StockView>().await;

    let parked = setup.parked().await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        (parked[0].0.as_str(), parked[0].1),
        ("stock", bad.sequence as i64)
    );
    assert!(
        parked[0].2.starts_with("not an event envelope"),
        "{}",
        parked[0].2
    );
    let on_hand: i64 = sqlx::query_scalar("SELECT on_hand FROM view_stock.stock WHERE sku = 'A1'")
        .fetch_one(setup.pool())
        .await
        .unwrap();
    assert_eq!(on_hand, 7, "the event after the parked one was applied");

    // Rebuilt in one batch: the events before the unreadable one go set-wise, it is parked at
    // once (its bytes will not read otherwise on another try), and the one after it applies.
    rebuild::<StockView>(setup.pool(), &js, ProjectorConfig::for_rebuild(), |_| {})
        .await
        .unwrap();
    let parked: Vec<(i64, i32)> =
        sqlx::query_as("SELECT seq, attempts FROM parked_events WHERE projection = 'stock'")
            .fetch_all(setup.pool())
            .await
            .unwrap();
    assert_eq!(parked, vec![(bad.sequence as i64, 1)]);
    let on_hand: i64 = sqlx::query_scalar("SELECT on_hand FROM view_stock.stock WHERE sku = 'A1'")
        .fetch_one(setup.pool())
        .await
        .unwrap();
    assert_eq!(on_hand, 7);
}

#[tokio::test]
async fn once_an_event_of_an_aggregate_is_parked_its_later_events_are_parked_at_once_and_the_rest_goes_on()
 {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    let js = jetstream::new(setup.engine.client.clone());
    let publish = |payload: Vec<u8>| {
        let js = js.clone();
        async move {
            js.publish("ordo.stock.events.A1", payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    // Version 2 of A1 cannot be read; versions 3 and 4 are fine but cannot follow it.
    let broken = publish(b"not an event".to_vec()).await;
    for version in [3, 4] {
        let metadata = ordo_eventstore::EventMetadata {
            command_id: format!("later-{version}"),
            ..Default::default()
        };
        let event = ordo_domain::stock::StockEvent::StockReceived { qty: 1 };
        let envelope = ordo_eventstore::EventEnvelope::new(
            "A1",
            version,
            &event,
            &metadata,
            chrono::Utc::now(),
        );
        publish(envelope.to_bytes()).await;
    }
    setup
        .command(Endpoint::StockReceive, json!({"sku": "B2", "qty": 7}))
        .await;
    setup.caught_up::<StockView>().await;

    let parked = setup.parked().await;
    assert_eq!(parked.len(), 3, "{parked:?}");
    assert_eq!(parked[0].1, broken as i64);
    for later in &parked[1..] {
        assert!(
            later
                .2
                .starts_with("an earlier event of ordo.stock.events.A1 is parked"),
            "{}",
            later.2
        );
    }
    let b2: i64 = sqlx::query_scalar("SELECT on_hand FROM view_stock.stock WHERE sku = 'B2'")
        .fetch_one(setup.pool())
        .await
        .unwrap();
    assert_eq!(b2, 7, "the rest of the view goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_projector_is_taken_over_and_no_event_is_lost_or_applied_twice() {
    let setup = Setup::start().await;
    // The first instances are alone, so they hold every partition; the second ones join once
    // there is work in hand, and take half the partitions.
    let (_stop_stock, first_stock) = setup.projector::<StockView>();
    let (_stop_orders, first_orders) = setup.projector::<OrdersView>();

    let load = |range: std::ops::Range<usize>| {
        let setup = &setup;
        async move {
            for i in range {
                let (sku, order) = (format!("S{}", i % 7), format!("o-{i}"));
                setup
                    .command(Endpoint::StockReceive, json!({"sku": sku, "qty": 3}))
                    .await;
                setup
                    .command(
                        Endpoint::OrderPlace,
                        json!({"order_id": order, "customer_id": "c1",
                               "lines": [{"sku": sku, "qty": 1, "unit_price_cents": 100 + i}]}),
                    )
                    .await;
                setup
                    .command(
                        Endpoint::StockReserve,
                        json!({"sku": sku, "order_id": order, "qty": 1}),
                    )
                    .await;
                if i % 3 == 0 {
                    setup
                        .command(
                            Endpoint::StockRelease,
                            json!({"sku": sku, "order_id": order}),
                        )
                        .await;
                    setup
                        .command(Endpoint::OrderCancel, json!({"order_id": order}))
                        .await;
                }
            }
        }
    };
    // The first instances work through the first part; the second ones join.
    load(0..30).await;
    setup.caught_up::<StockView>().await;
    setup.caught_up::<OrdersView>().await;
    let _stock_second = setup.projector::<StockView>();
    let _orders_second = setup.projector::<OrdersView>();
    // The first instances are killed while the rest is being written (and applied). The views'
    // checkpoints are read at once, on a connection of the test's own: from the pool, the read
    // could wait behind the projectors' connections until the second ones had taken over and
    // finished.
    let mut observer = sqlx::PgConnection::connect(setup.database.url())
        .await
        .unwrap();
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        first_stock.abort();
        first_orders.abort();
        let (stock, orders): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT min(seq) FROM view_stock.partition_checkpoints),
                    (SELECT min(seq) FROM view_orders.partition_checkpoints)",
        )
        .fetch_one(&mut observer)
        .await
        .unwrap();
        (stock as u64, orders as u64)
    };
    let ((), (stock_killed_at, orders_killed_at)) = tokio::join!(load(30..100), chaos);
    let head = |stream: ordo_eventstore::StreamId| {
        let client = setup.engine.client.clone();
        async move {
            jetstream::new(client)
                .get_stream(stream.name())
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .last_sequence
        }
    };
    let (stock_head, orders_head) = (
        head(ordo_eventstore::StreamId::Stock).await,
        head(ordo_eventstore::StreamId::Orders).await,
    );
    assert!(
        stock_killed_at < stock_head && orders_killed_at < orders_head,
        "the first instances died before the end (stock {stock_killed_at} of {stock_head}, \
         orders {orders_killed_at} of {orders_head})"
    );
    setup.caught_up::<StockView>().await;
    setup.caught_up::<OrdersView>().await;
    setup.stock_view_matches_the_stream().await;
    setup.orders_view_matches_the_stream().await;
    assert!(
        setup.parked().await.is_empty(),
        "a double apply would have been refused and parked"
    );
}

#[tokio::test]
async fn a_restarted_nats_server_does_not_stop_the_projector() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    setup.caught_up::<StockView>().await;
    setup.engine.server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    setup.engine.server.restart();
    setup.engine.wait_until_serving().await;
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 2}))
        .await;
    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
}

#[tokio::test]
async fn while_postgresql_is_down_nothing_is_skipped_and_the_view_resumes_after() {
    let postgres = ordo_testkit::PostgresServer::start();
    let mut setup = Setup::start().await;
    setup.database = TestDatabase::create_on(&postgres.url("postgres")).await;
    schema::migrate(setup.pool()).await.unwrap();
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    setup.caught_up::<StockView>().await;

    let mark = log_mark();
    postgres.stop();
    for i in 0..5 {
        setup
            .command(
                Endpoint::StockReserve,
                json!({"sku": "A1", "order_id": format!("o-{i}"), "qty": 1}),
            )
            .await;
    }
    // The projector took events in while PostgreSQL was down, and could not apply them: what
    // it does then is what this test checks.
    logged_since(mark, "projector term ended").await;
    postgres.start_again().unwrap();

    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
    assert!(
        setup.parked().await.is_empty(),
        "an outage is not a reason to park"
    );
}

#[tokio::test]
async fn a_view_never_follows_another_stream_of_the_same_name() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    setup.caught_up::<StockView>().await;

    // The stream is deleted and created again: its sequences start at 1, below the checkpoint.
    let js = jetstream::new(setup.engine.client.clone());
    js.delete_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap();
    apply_all(&js, &StreamDefinition::built_in()).await.unwrap();
    let reply = setup
        .command(Endpoint::StockReceive, json!({"sku": "B2", "qty": 1}))
        .await;
    assert_eq!(reply["seq"], 1);
    setup
        .command(Endpoint::StockReceive, json!({"sku": "B2", "qty": 1}))
        .await;
    setup
        .command(Endpoint::StockReceive, json!({"sku": "B2", "qty": 1}))
        .await;
    // A term that began after the new stream's events were there refused it.
    logged_since(log_mark(), "built from another ORDO_STOCK").await;

    let skus: Vec<String> = sqlx::query_scalar("SELECT sku FROM view_stock.stock ORDER BY sku")
        .fetch_all(setup.pool())
        .await
        .unwrap();
    assert_eq!(
        skus,
        ["A1"],
        "the new stream's events were neither applied nor skipped into the view"
    );
    let checkpoint = schema::checkpoint::<StockView>(setup.pool(), &live_schema::<StockView>())
        .await
        .unwrap();
    assert_eq!(checkpoint, 2);
    assert!(setup.parked().await.is_empty());
}

/// Every row of a view table as text, in key order: equal views give equal lists.
async fn rows(pool: &PgPool, table: &str, key: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT row_to_json(t)::text FROM {table} t ORDER BY {key}"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn busy_day(setup: &Setup, from: usize, to: usize) {
    for i in from..to {
        let sku = format!("S{}", i % 5);
        let order = format!("o-{i}");
        setup
            .command(Endpoint::StockReceive, json!({"sku": sku, "qty": 2}))
            .await;
        setup
            .command(
                Endpoint::OrderPlace,
                json!({"order_id": order, "customer_id": "c1", "lines": [{"sku": sku, "qty": 1, "unit_price_cents": 100}]}),
            )
            .await;
        setup
            .command(
                Endpoint::StockReserve,
                json!({"sku": sku, "order_id": order, "qty": 1}),
            )
            .await;
        if i % 2 == 0 {
            setup
                .command(Endpoint::OrderConfirm, json!({"order_id": order}))
                .await;
        } else if i % 3 == 0 {
            // Every character COPY's text format escapes, and one it does not.
            setup
                .command(
                    Endpoint::OrderCancel,
                    json!({"order_id": order, "reason": "out\tof \\N\r\nstock é"}),
                )
                .await;
        }
    }
}

#[tokio::test]
async fn a_rebuild_gives_the_same_rows_as_the_incremental_view() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    let _orders = setup.projector::<OrdersView>();
    busy_day(&setup, 0, 20).await;
    setup.caught_up::<StockView>().await;
    setup.caught_up::<OrdersView>().await;
    let incremental = (
        rows(setup.pool(), "view_stock.stock", "sku").await,
        rows(setup.pool(), "view_orders.orders", "order_id").await,
        rows(setup.pool(), "view_orders.order_lines", "order_id, line_no").await,
    );

    let js = jetstream::new(setup.engine.client.clone());
    let mut reports = Vec::new();
    // In one transaction, and in three at once (each applying a third of the partitions).
    let rebuilt = rebuild::<StockView>(setup.pool(), &js, ProjectorConfig::default(), |p| {
        reports.push(p)
    })
    .await
    .unwrap();
    let in_three_lanes = ProjectorConfig {
        rebuild_lanes: 3,
        ..ProjectorConfig::for_rebuild()
    };
    rebuild::<OrdersView>(setup.pool(), &js, in_three_lanes, |_| {})
        .await
        .unwrap();

    assert_eq!(rebuilt.checkpoint, reports.last().unwrap().target);
    let rebuilt_rows = (
        rows(setup.pool(), "view_stock.stock", "sku").await,
        rows(setup.pool(), "view_orders.orders", "order_id").await,
        rows(setup.pool(), "view_orders.order_lines", "order_id, line_no").await,
    );
    assert_eq!(rebuilt_rows, incremental, "row for row");
    let leftovers: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'view_%_next' OR nspname LIKE 'view_%_old'")
        .fetch_one(setup.pool())
        .await
        .unwrap();
    assert_eq!(leftovers, 0);
}

#[tokio::test]
async fn a_batch_applied_set_wise_gives_the_same_rows_as_its_events_applied_one_by_one() {
    let setup = Setup::start().await;
    busy_day(&setup, 0, 30).await;
    let js = jetstream::new(setup.engine.client.clone());
    let views = || async {
        (
            rows(setup.pool(), "view_stock.stock", "sku").await,
            rows(setup.pool(), "view_orders.orders", "order_id").await,
            rows(setup.pool(), "view_orders.order_lines", "order_id, line_no").await,
        )
    };
    // Batches of one event: each applied alone, with the statements of `apply`.
    let one_by_one = ProjectorConfig {
        batch_size: 1,
        ..Default::default()
    };
    rebuild::<StockView>(setup.pool(), &js, one_by_one.clone(), |_| {})
        .await
        .unwrap();
    rebuild::<OrdersView>(setup.pool(), &js, one_by_one, |_| {})
        .await
        .unwrap();
    let event_by_event = views().await;
    assert_eq!(event_by_event.1.len(), 30);

    // One batch of everything: applied set-wise by `apply_all`.
    rebuild::<StockView>(setup.pool(), &js, ProjectorConfig::default(), |_| {})
        .await
        .unwrap();
    rebuild::<OrdersView>(setup.pool(), &js, ProjectorConfig::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(
        views().await,
        event_by_event,
        "row for row, timestamps included"
    );
}

/// Every event of `stream`, in order, as a projection is given it.
async fn recorded_events(setup: &Setup, stream: &str) -> Vec<ordo_eventstore::RecordedEvent> {
    let js = jetstream::new(setup.engine.client.clone());
    let stream = js.get_stream(stream).await.unwrap();
    let last = stream.clone().info().await.unwrap().state.last_sequence;
    let mut events = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        events.push(ordo_eventstore::RecordedEvent {
            subject: message.subject.to_string(),
            seq,
            envelope: ordo_eventstore::EventEnvelope::from_bytes(&message.payload).unwrap(),
        });
    }
    events
}

#[tokio::test]
async fn a_whole_stream_of_orders_applies_set_wise_without_falling_back() {
    // The fallback gives the same rows, so the comparison above cannot see the set-wise path
    // fail: here it must take every event itself.
    let setup = Setup::start().await;
    busy_day(&setup, 0, 30).await;
    let events = recorded_events(&setup, OrdersView::STREAM).await;
    schema::ensure_view::<OrdersView>(setup.pool(), "view_orders_check")
        .await
        .unwrap();
    let mut tx = setup.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL search_path = view_orders_check, public")
        .execute(&mut *tx)
        .await
        .unwrap();
    let applied = OrdersView::apply_all(&mut tx, &events).await;
    assert!(matches!(applied, Ok(true)), "{applied:?}");
    let (orders, cancelled_with_reason): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE reason = E'out\\tof \\\\N\\r\\nstock é')
         FROM orders",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!((orders, cancelled_with_reason), (30, 5));
}

#[tokio::test]
async fn batches_of_changes_to_rows_already_in_the_views_apply_set_wise() {
    // Each view's first events in one batch (rows inserted), the rest in a second (rows
    // updated): the updates must take their events themselves, not fall back.
    let setup = Setup::start().await;
    busy_day(&setup, 0, 30).await;
    // Each row's first event (version 1) apart from the rest.
    let setup_ref = &setup;
    let events_of = move |stream: &'static str| async move {
        recorded_events(setup_ref, stream)
            .await
            .into_iter()
            .partition::<Vec<_>, _>(|event| event.envelope.version == 1)
    };
    let (placed, changes) = events_of(OrdersView::STREAM).await;
    let (received, stock_changes) = events_of(StockView::STREAM).await;
    assert!(!changes.is_empty() && !stock_changes.is_empty());
    for schema_name in ["view_orders_check", "view_stock_check"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema_name} CASCADE"
        )))
        .execute(setup.pool())
        .await
        .unwrap();
    }
    schema::ensure_view::<OrdersView>(setup.pool(), "view_orders_check")
        .await
        .unwrap();
    schema::ensure_view::<StockView>(setup.pool(), "view_stock_check")
        .await
        .unwrap();
    let mut tx = setup.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL search_path = view_orders_check, public")
        .execute(&mut *tx)
        .await
        .unwrap();
    for batch in [&placed, &changes] {
        let applied = OrdersView::apply_all(&mut tx, batch).await;
        assert!(matches!(applied, Ok(true)), "{applied:?}");
    }
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    assert_eq!(
        statuses,
        vec![
            ("cancelled".to_owned(), 5),
            ("confirmed".to_owned(), 15),
            ("pending".to_owned(), 10)
        ]
    );
    sqlx::query("SET LOCAL search_path = view_stock_check, public")
        .execute(&mut *tx)
        .await
        .unwrap();
    for batch in [&received, &stock_changes] {
        let applied = StockView::apply_all(&mut tx, batch).await;
        assert!(matches!(applied, Ok(true)), "{applied:?}");
    }
    let held: (i64, i64) =
        sqlx::query_as("SELECT sum(on_hand)::bigint, sum(reserved)::bigint FROM stock")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(held.0, 60, "30 receipts of 2");
    assert!(held.1 > 0, "reserves of open orders");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_during_live_writes_ends_equal_to_the_stream() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    let _orders = setup.projector::<OrdersView>();
    busy_day(&setup, 0, 30).await;

    let js = jetstream::new(setup.engine.client.clone());
    let config = ProjectorConfig {
        batch_size: 8,
        rebuild_lanes: 2,
        ..Default::default()
    };
    let (stock, orders, ()) = tokio::join!(
        rebuild::<StockView>(setup.pool(), &js, config.clone(), |_| {}),
        rebuild::<OrdersView>(setup.pool(), &js, config, |_| {}),
        busy_day(&setup, 30, 60)
    );
    stock.unwrap();
    orders.unwrap();
    busy_day(&setup, 60, 65).await;
    setup.caught_up::<StockView>().await;
    setup.caught_up::<OrdersView>().await;
    setup.stock_view_matches_the_stream().await;
    setup.orders_view_matches_the_stream().await;
    assert!(setup.parked().await.is_empty());
}

/// A projector reads its stream by sequence and creates no consumer: a projector's credentials
/// may not create one (a consumer request can change any consumer of the stream, the saga's too).
#[tokio::test]
async fn a_projector_reads_its_stream_without_a_consumer() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    for qty in 1..=5 {
        setup
            .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": qty}))
            .await;
    }
    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
    let consumers: Vec<String> = jetstream::new(setup.engine.client.clone())
        .get_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap()
        .consumer_names()
        .map(|name| name.unwrap())
        .collect()
        .await;
    assert_eq!(consumers, Vec::<String>::new());
}

/// Two projectors of a view share its partitions: each reads for the partitions it holds and
/// moves their checkpoints (and only theirs), and the view ends equal to the stream, every
/// partition's checkpoint at the stream's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projectors_of_a_view_share_its_partitions_each_with_its_own_checkpoint() {
    let setup = Setup::start().await;
    let js = jetstream::new(setup.engine.client.clone());
    let first = setup.projector::<StockView>();
    let second = setup.projector::<StockView>();
    let group = "projection-stock";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let held_by_two = loop {
        let config = ordo_eventstore::OwnershipConfig::new(
            group,
            ordo_eventstore::partition::DEFAULT_PARTITIONS,
        );
        let status = ordo_eventstore::ownership::status(&js, &config)
            .await
            .unwrap();
        let owners: BTreeSet<String> = status
            .partitions
            .iter()
            .filter(|partition| partition.held)
            .filter_map(|partition| partition.owner.clone())
            .collect();
        let all_held = status.partitions.iter().all(|partition| partition.held);
        if all_held && owners.len() == 2 {
            break owners;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not shared: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(held_by_two.len(), 2);
    let progress = ordo_eventstore::progress::Progress::watch(js.clone(), group);

    for i in 0..40 {
        setup
            .command(
                Endpoint::StockReceive,
                json!({"sku": format!("S{i}"), "qty": 1 + i % 3}),
            )
            .await;
    }
    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
    let head = observed_head(&setup, ordo_eventstore::StreamId::Stock).await;
    let checkpoints: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, seq FROM view_stock.partition_checkpoints ORDER BY partition",
    )
    .fetch_all(setup.pool())
    .await
    .unwrap();
    assert_eq!(
        checkpoints.len(),
        ordo_eventstore::partition::DEFAULT_PARTITIONS as usize
    );
    assert!(
        checkpoints.iter().all(|(_, seq)| *seq as u64 == head),
        "every partition read up to the head {head}: {checkpoints:?}"
    );
    // What the command service's load shedding reads: both instances' reports, together at the
    // head (a report goes out at most every 250 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let partitions = ordo_eventstore::partition::DEFAULT_PARTITIONS;
    while progress.position(partitions) != Some(head) {
        assert!(
            std::time::Instant::now() < deadline,
            "reported {:?}, head {head}",
            progress.position(partitions)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each instance reports (and moves) the partitions it holds, and no other's: the two reports
    // share no partition and together hold them all.
    let bucket = js.get_key_value("ordo_partitions").await.unwrap();
    let mut reported: Vec<BTreeSet<u32>> = Vec::new();
    let mut keys = bucket.keys().await.unwrap();
    while let Some(key) = keys.next().await {
        let key = key.unwrap();
        if key.starts_with("projection-stock.progress.") {
            let report = bucket.get(&key).await.unwrap().unwrap();
            reported.push(
                String::from_utf8_lossy(&report)
                    .split(',')
                    .map(|pair| pair.split_once(':').unwrap().0.parse().unwrap())
                    .collect(),
            );
        }
    }
    assert_eq!(reported.len(), 2, "{reported:?}");
    assert!(reported[0].is_disjoint(&reported[1]), "{reported:?}");
    assert_eq!(
        reported[0].len() + reported[1].len(),
        ordo_eventstore::partition::DEFAULT_PARTITIONS as usize
    );

    // One leaves: the other takes its partitions from their checkpoints.
    let (stop_first, _first_task) = first;
    drop(stop_first);
    setup
        .command(Endpoint::StockReceive, json!({"sku": "S1", "qty": 1}))
        .await;
    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
    assert!(setup.parked().await.is_empty());
    drop(second);
}

async fn observed_head(setup: &Setup, stream: ordo_eventstore::StreamId) -> u64 {
    jetstream::new(setup.engine.client.clone())
        .get_stream(stream.name())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
}

#[tokio::test]
async fn a_view_built_from_another_definition_is_left_alone_until_rebuilt() {
    let setup = Setup::start().await;
    // A view from an older build: its schema carries another definition mark.
    schema::ensure_view::<StockView>(setup.pool(), "view_stock")
        .await
        .unwrap();
    sqlx::query(
        "COMMENT ON SCHEMA view_stock IS 'ordo projection stock definition 0000000000000000'",
    )
    .execute(setup.pool())
    .await
    .unwrap();
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    // A term that began after the event was there refused the view.
    logged_since(log_mark(), "built from another definition").await;
    assert_eq!(
        schema::checkpoint::<StockView>(setup.pool(), "view_stock")
            .await
            .unwrap(),
        0,
        "left alone"
    );

    rebuild::<StockView>(
        setup.pool(),
        &jetstream::new(setup.engine.client.clone()),
        ProjectorConfig::default(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        schema::definition_of(setup.pool(), "view_stock")
            .await
            .unwrap(),
        Some(schema::definition::<StockView>())
    );
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
        .await;
    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
}

#[tokio::test]
async fn a_rebuild_retries_parked_events_and_clears_those_that_now_apply() {
    let setup = Setup::start().await;
    // A row that should not be there makes the first event of B2 fail: it is parked.
    schema::ensure_view::<StockView>(setup.pool(), "view_stock")
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO view_stock.stock (sku, on_hand, reserved, version, updated_at, last_seq)
         VALUES ('B2', 0, 0, 1, now(), 0)",
    )
    .execute(setup.pool())
    .await
    .unwrap();
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "B2", "qty": 4}))
        .await;
    setup.caught_up::<StockView>().await;
    assert_eq!(setup.parked().await.len(), 1);

    // The rebuild starts from an empty view: the event applies, and is no longer parked.
    let js = jetstream::new(setup.engine.client.clone());
    rebuild::<StockView>(setup.pool(), &js, ProjectorConfig::default(), |_| {})
        .await
        .unwrap();
    assert!(setup.parked().await.is_empty());
    setup.stock_view_matches_the_stream().await;
}

/// An event the live projector parks while a rebuild runs is applied by the rebuild (whose new
/// view does not have the cause): once the new view serves, it is no longer parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_live_view_parked_during_a_rebuild_that_applied_it_is_no_longer_parked() {
    let setup = Setup::start().await;
    let _stock = setup.projector::<StockView>();
    setup
        .command(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
        .await;
    setup.caught_up::<StockView>().await;

    let (rebuild_began, began) = tokio::sync::oneshot::channel::<()>();
    let (live_parked, parked) = std::sync::mpsc::channel::<()>();
    let (pool, client) = (setup.pool().clone(), setup.engine.client.clone());
    let live = tokio::spawn(async move {
        began.await.unwrap();
        // A row that should not be there makes B2's first event fail in the live view only.
        sqlx::query(
            "INSERT INTO view_stock.stock (sku, on_hand, reserved, version, updated_at, last_seq)
             VALUES ('B2', 0, 0, 1, now(), 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        client
            .request(
                Endpoint::StockReceive.subject(),
                json!({"sku": "B2", "qty": 4}).to_string().into(),
            )
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
                .fetch_one(&pool)
                .await
                .unwrap();
            if parked == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the live view never parked it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        live_parked.send(()).unwrap();
    });

    let js = jetstream::new(setup.engine.client.clone());
    let mut rebuild_began = Some(rebuild_began);
    rebuild::<StockView>(setup.pool(), &js, ProjectorConfig::default(), |_| {
        // After the first batch of the replay, the rebuild waits until the live view parked.
        if let Some(began) = rebuild_began.take() {
            began.send(()).unwrap();
            parked
                .recv_timeout(Duration::from_secs(30))
                .expect("the live view parked the event");
        }
    })
    .await
    .unwrap();
    live.await.unwrap();
    let parked = setup.parked().await;
    assert!(
        parked.is_empty(),
        "still parked after the rebuild applied it: {parked:?}"
    );
    setup.stock_view_matches_the_stream().await;
}

/// A view built before partitions has one checkpoint and no `partition_checkpoints`: the
/// projections' migration adds the table, and the first projector gives every partition the
/// view's checkpoint, so that it goes on from there, applying nothing twice and skipping nothing.
#[tokio::test]
async fn a_view_built_before_partitions_goes_on_from_its_single_checkpoint() {
    let setup = Setup::start().await;
    let (stop_first, first) = setup.projector::<StockView>();
    for i in 0..6 {
        setup
            .command(
                Endpoint::StockReceive,
                json!({"sku": format!("S{i}"), "qty": 2}),
            )
            .await;
    }
    setup.caught_up::<StockView>().await;
    drop(stop_first);
    first.await.unwrap();
    // As an earlier build left it: the view's single checkpoint, no table of partitions, and the
    // migration that adds it not yet run.
    sqlx::raw_sql(
        "UPDATE view_stock.checkpoints SET seq = (SELECT min(seq) FROM view_stock.partition_checkpoints);
         DROP TABLE view_stock.partition_checkpoints;
         DELETE FROM _ordo_projection_migrations WHERE version = 2;",
    )
    .execute(setup.pool())
    .await
    .unwrap();
    let pending = schema::unapplied(setup.pool(), &schema::migrator())
        .await
        .unwrap();
    assert_eq!(pending, [2]);
    schema::migrate(setup.pool()).await.unwrap();

    let _second = setup.projector::<StockView>();
    for i in 0..6 {
        setup
            .command(
                Endpoint::StockReceive,
                json!({"sku": format!("S{i}"), "qty": 1}),
            )
            .await;
    }
    setup.caught_up::<StockView>().await;
    setup.stock_view_matches_the_stream().await;
    assert!(setup.parked().await.is_empty(), "nothing applied twice");
}
