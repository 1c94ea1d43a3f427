//! Sagas against real nats-server and PostgreSQL: commands in, sagas, stock and notifications out.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use ordo_contract::{
    CancelOrder, CommandRequest, Endpoint, Line, PlaceOrder, Quantity, Reason, ReceiveStock,
    RejectOrder, ShipOrder,
};
use ordo_domain::{
    CustomerId, OrderId, Sku,
    order::{OrderAggregate, OrderStatus},
    stock::StockAggregate,
};
use ordo_eventstore::{ConsumerId, EventStore};
use ordo_harness::Engine;
use ordo_saga::{
    Clock, Coordinator, CoordinatorConfig, Notifier, NotifierConfig, PaymentGateway,
    SimulatedGateway, payment::PaymentError,
};
use ordo_testkit::{DarkeningRelay, TestDatabase};
use serde_json::Value;
use sqlx::PgPool;
use tokio::task::JoinHandle;

struct Setup {
    engine: Engine,
    client: async_nats::Client,
    database: TestDatabase,
    store: EventStore,
}

fn quick() -> CoordinatorConfig {
    CoordinatorConfig {
        retry_base: Duration::from_millis(20),
        poll: Duration::from_millis(10),
        ..Default::default()
    }
}

fn gateway(decline_rate: f64, latency_ms: u64) -> SimulatedGateway {
    SimulatedGateway {
        decline_rate,
        latency: Duration::from_millis(latency_ms),
        ledger: None,
    }
}

impl Setup {
    async fn start() -> Self {
        let engine = Engine::start_with_instances(2).await;
        let database = TestDatabase::create().await;
        ordo_saga::schema::migrate(database.pool()).await.unwrap();
        Self {
            client: engine.client.clone(),
            store: engine.store.clone(),
            engine,
            database,
        }
    }

    fn pool(&self) -> &PgPool {
        self.database.pool()
    }

    fn coordinator<G: PaymentGateway>(
        &self,
        gateway: G,
        config: CoordinatorConfig,
    ) -> JoinHandle<()> {
        self.coordinator_on(self.client.clone(), gateway, config)
    }

    /// A coordinator on a connection of its own (through a relay that loses replies).
    fn coordinator_on<G: PaymentGateway>(
        &self,
        nats: async_nats::Client,
        gateway: G,
        config: CoordinatorConfig,
    ) -> JoinHandle<()> {
        let coordinator = Coordinator::new(self.pool().clone(), nats, gateway, config);
        tokio::spawn(async move { coordinator.run(std::future::pending()).await })
    }

    /// Every partition of the saga's intake back at the start of the stream, as no coordinator
    /// runs: the next coordinators take every order event in again.
    async fn saga_intake_back_to_the_start(&self) {
        let moved = sqlx::query("UPDATE saga_intake SET seq = 0")
            .execute(self.pool())
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(moved, 16, "one checkpoint per partition");
    }

    /// Waits until the saga's intake has read every order event there is, in every partition.
    async fn saga_intake_caught_up(&self) {
        let head = self.orders_head().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let taken_in: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM saga_intake")
                .fetch_one(self.pool())
                .await
                .unwrap();
            if taken_in >= Some(head as i64) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the intake is at {taken_in:?} of {head}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn orders_head(&self) -> u64 {
        jetstream::new(self.client.clone())
            .get_stream(ordo_eventstore::StreamId::Orders.name())
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence
    }

    /// Deletes `consumer` (its owner makes it again, from the first event) and waits until the
    /// new one has acknowledged every order event there was: each was delivered again and
    /// handled, so that what a test then checks is after the redelivery, not before it.
    async fn deliver_every_order_event_again(&self, consumer: &str) {
        let mut stream = jetstream::new(self.client.clone())
            .get_stream(ordo_eventstore::StreamId::Orders.name())
            .await
            .unwrap();
        let head = stream.info().await.unwrap().state.last_sequence;
        stream.delete_consumer(consumer).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut again) = stream
                .get_consumer::<jetstream::consumer::pull::Config>(consumer)
                .await
                && let Ok(info) = again.info().await
                && info.ack_floor.stream_sequence >= head
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{consumer} did not take every order event in again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The customer cancels the order.
    async fn cancel(&self, order_id: &str) {
        self.engine
            .accepted(&CommandRequest::CancelOrder(CancelOrder {
                order_id: OrderId::parse(order_id).unwrap(),
                reason: None,
            }))
            .await;
    }

    /// The order's row in the payment ledger.
    async fn payment(&self, order_id: &str) -> Option<LedgerRow> {
        ledger_row(self.pool(), order_id).await
    }

    /// (state, whether the deadline has passed by PostgreSQL's clock, attempts of the confirm).
    async fn confirm_progress(&self, order_id: &str) -> (String, bool, u64) {
        let (state, passed, steps): (String, bool, Value) = sqlx::query_as(
            "SELECT state, coalesce(deadline_at <= now(), false), steps FROM sagas WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_one(self.pool())
        .await
        .unwrap();
        let attempts = steps
            .as_array()
            .unwrap()
            .iter()
            .find(|step| step["kind"] == "confirm")
            .map_or(0, |step| step["attempts"].as_u64().unwrap());
        (state, passed, attempts)
    }

    async fn notifier(&self) -> JoinHandle<()> {
        self.notifier_with(NotifierConfig::default()).await
    }

    async fn notifier_with(&self, config: NotifierConfig) -> JoinHandle<()> {
        let notifier = Notifier::connect(self.pool().clone(), self.client.clone(), config)
            .await
            .unwrap();
        tokio::spawn(async move { notifier.run(std::future::pending()).await })
    }

    async fn receive(&self, sku: &str, qty: u64) {
        self.engine
            .accepted(&CommandRequest::ReceiveStock(ReceiveStock {
                sku: Sku::parse(sku).unwrap(),
                qty: Quantity::new(qty).unwrap(),
            }))
            .await;
    }

    async fn place(&self, order_id: &str, lines: &[(&str, u32)]) {
        let lines = lines
            .iter()
            .map(|(sku, qty)| Line {
                sku: Sku::parse(*sku).unwrap(),
                qty: Quantity::new(*qty).unwrap(),
                unit_price_cents: 100,
            })
            .collect();
        self.engine
            .accepted(&CommandRequest::PlaceOrder(PlaceOrder {
                order_id: Some(OrderId::parse(order_id).unwrap()),
                customer_id: CustomerId::parse("c1").unwrap(),
                lines,
                currency: None,
            }))
            .await;
    }

    async fn saga(&self, order_id: &str) -> Option<(String, Option<String>, Value)> {
        sqlx::query_as("SELECT state, reason, steps FROM sagas WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(self.pool())
            .await
            .unwrap()
    }

    /// Waits until the saga of `order_id` is in `state`, and returns its reason.
    async fn saga_ends(&self, order_id: &str, state: &str) -> Option<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let saga = self.saga(order_id).await;
            if let Some((now, reason, _)) = &saga
                && now == state
            {
                return reason.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "saga of {order_id}: {saga:?}, expected {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn order_status(&self, order_id: &str) -> OrderStatus {
        self.store
            .load::<OrderAggregate>(order_id)
            .await
            .unwrap()
            .state
            .unwrap()
            .status
    }

    /// (on hand, reserved) of a SKU, folded from its events.
    async fn stock(&self, sku: &str) -> (u64, u64) {
        let stock = self
            .store
            .load::<StockAggregate>(sku)
            .await
            .unwrap()
            .state
            .unwrap();
        (stock.on_hand, stock.reserved)
    }

    /// How many events of `event_type` the stock stream holds.
    async fn stock_events(&self, event_type: &str) -> usize {
        let mut stream = jetstream::new(self.client.clone())
            .get_stream(ordo_eventstore::StreamId::Stock.name())
            .await
            .unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut count = 0;
        for seq in 1..=last {
            let message = stream.direct_get(seq).await.unwrap();
            if message.headers.get("Ordo-Event-Type").map(|v| v.as_str()) == Some(event_type) {
                count += 1;
            }
        }
        count
    }

    /// The order's notifications once there are some and none is pending (or after 10 s).
    async fn notifications(&self, order_id: &str) -> Vec<(String, String)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT kind, status FROM notifications WHERE order_id = $1 ORDER BY kind",
            )
            .bind(order_id)
            .fetch_all(self.pool())
            .await
            .unwrap();
            // No row yet is not settled: the notifier may not have taken the event in.
            let settled = !rows.is_empty() && rows.iter().all(|(_, status)| status != "pending");
            if settled || std::time::Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn a_placed_order_is_reserved_paid_confirmed_and_notified() {
    let setup = Setup::start().await;
    let mut published = setup
        .client
        .subscribe("ordo.notifications.>")
        .await
        .unwrap();
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let _notifier = setup.notifier().await;
    setup.receive("A1", 5).await;
    setup.receive("B2", 5).await;
    setup.place("o-1", &[("A1", 2), ("B2", 1)]).await;

    setup.saga_ends("o-1", "confirmed").await;
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Confirmed);
    assert_eq!(
        (setup.stock("A1").await, setup.stock("B2").await),
        ((5, 2), (5, 1))
    );
    let (_, _, steps) = setup.saga("o-1").await.unwrap();
    let steps: Vec<(String, String)> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["kind"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let succeeded = |kind: &str| (kind.to_owned(), "succeeded".to_owned());
    assert_eq!(
        steps,
        [
            succeeded("reserve"),
            succeeded("reserve"),
            succeeded("authorize"),
            succeeded("confirm")
        ]
    );

    assert_eq!(
        setup.notifications("o-1").await,
        [("confirmed".into(), "sent".into())]
    );
    let message = tokio::time::timeout(Duration::from_secs(10), published.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.subject.as_str(), "ordo.notifications.c1");
    // One id per order and kind: a stream or subscriber downstream drops a redelivered copy.
    assert_eq!(
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .map(|id| id.as_str()),
        Some("notification:o-1:confirmed")
    );
    let notification: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        (
            notification["order_id"].as_str(),
            notification["kind"].as_str()
        ),
        (Some("o-1"), Some("confirmed"))
    );
}

#[tokio::test]
async fn a_line_out_of_stock_releases_the_others_and_rejects_the_order() {
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let _notifier = setup.notifier().await;
    setup.receive("A1", 5).await;
    setup.receive("B2", 1).await;
    setup.place("o-1", &[("A1", 2), ("B2", 3)]).await;

    let reason = setup.saga_ends("o-1", "rejected").await.unwrap();
    assert_eq!(
        reason,
        "insufficient stock for B2: requested 3, available 1"
    );
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Rejected);
    assert_eq!(
        (setup.stock("A1").await, setup.stock("B2").await),
        ((5, 0), (1, 0))
    );
    assert_eq!(setup.stock_events("StockReleased").await, 1);
    assert_eq!(
        setup.notifications("o-1").await,
        [("rejected".into(), "sent".into())]
    );
}

#[tokio::test]
async fn a_declined_payment_releases_every_reservation_and_rejects_the_order() {
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(gateway(1.0, 1), quick());
    setup.receive("A1", 5).await;
    setup.receive("B2", 5).await;
    setup.place("o-1", &[("A1", 2), ("B2", 1)]).await;

    let reason = setup.saga_ends("o-1", "rejected").await.unwrap();
    assert!(reason.starts_with("payment declined"), "{reason}");
    assert_eq!(
        (setup.stock("A1").await, setup.stock("B2").await),
        ((5, 0), (5, 0))
    );
    assert_eq!(setup.stock_events("StockReleased").await, 2);
}

/// A real provider's decline may explain itself at length, or carry U+0000: the order still ends
/// rejected (the reject command refuses a reason over 1 KiB or with U+0000).
#[tokio::test]
async fn a_decline_longer_than_a_reject_may_carry_still_rejects_the_order() {
    struct VerboseDecline;
    impl PaymentGateway for VerboseDecline {
        async fn authorize(&self, order_id: &OrderId, _: u64) -> Result<(), PaymentError> {
            let detail = if order_id.as_str() == "o-1" {
                "detail ".repeat(300)
            } else {
                "a NUL \0 inside".to_owned()
            };
            Err(PaymentError::Declined(format!("card refused: {detail}")))
        }
        async fn refund(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
            Ok(())
        }
    }
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(VerboseDecline, quick());
    setup.receive("A1", 5).await;
    for (order_id, cut) in [("o-1", true), ("o-2", false)] {
        setup.place(order_id, &[("A1", 2)]).await;
        let reason = setup.saga_ends(order_id, "rejected").await.unwrap();
        assert!(
            reason.starts_with("payment declined: card refused"),
            "{reason}"
        );
        assert!(reason.len() <= 1024 && !reason.contains('\0'), "{reason}");
        assert_eq!(reason.ends_with('…'), cut, "{reason}");
        assert_eq!(
            setup.order_status(order_id).await,
            OrderStatus::Rejected,
            "{order_id} was left pending"
        );
        let (_, last) = setup
            .store
            .last_message(
                ordo_eventstore::StreamId::Orders.name(),
                &format!("ordo.order.events.{order_id}"),
            )
            .await
            .unwrap()
            .unwrap();
        let rejected = ordo_eventstore::EventEnvelope::from_bytes(&last).unwrap();
        assert_eq!(rejected.event_type, "OrderRejected");
        assert_eq!(
            rejected.data["reason"],
            reason.as_str(),
            "the order keeps the saga's reason"
        );
    }
    assert_eq!(setup.stock("A1").await, (5, 0));
}

#[tokio::test]
async fn cancelling_a_confirmed_order_releases_its_stock_and_shipping_deducts_it() {
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let _notifier = setup.notifier().await;
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    setup.place("o-2", &[("A1", 1)]).await;
    setup.saga_ends("o-1", "confirmed").await;
    setup.saga_ends("o-2", "confirmed").await;

    let o = |id: &str| OrderId::parse(id).unwrap();
    setup.cancel("o-1").await;
    setup.saga_ends("o-1", "cancelled").await;
    setup
        .engine
        .accepted(&CommandRequest::ShipOrder(ShipOrder { order_id: o("o-2") }))
        .await;
    setup.saga_ends("o-2", "shipped").await;

    assert_eq!(
        setup.stock("A1").await,
        (4, 0),
        "o-1 released its 2, o-2 took its 1"
    );
    assert_eq!(
        setup.notifications("o-1").await,
        [
            ("cancelled".into(), "sent".into()),
            ("confirmed".into(), "sent".into())
        ]
    );
    assert_eq!(
        setup.notifications("o-2").await,
        [
            ("confirmed".into(), "sent".into()),
            ("shipped".into(), "sent".into())
        ]
    );
}

#[tokio::test]
async fn an_order_past_its_deadline_is_rejected_with_reason_timeout_after_compensating() {
    let setup = Setup::start().await;
    let config = CoordinatorConfig {
        saga_timeout: Duration::from_millis(600),
        step_timeout: Duration::from_millis(200),
        ..quick()
    };
    // The payment gateway hangs on every authorisation, and the deadline passes before the
    // confirm is reached. (Refunds work.)
    struct HangingAuthorizations;
    impl PaymentGateway for HangingAuthorizations {
        async fn authorize(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
            std::future::pending().await
        }
        async fn refund(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
            Ok(())
        }
    }
    let _coordinator = setup.coordinator(HangingAuthorizations, config);
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    assert_eq!(
        setup.saga_ends("o-1", "rejected").await.as_deref(),
        Some("timeout")
    );
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Rejected);
    assert_eq!(setup.stock("A1").await, (5, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_an_order_spends_queued_inside_ordo_does_not_count_against_its_deadline() {
    let setup = Setup::start().await;
    let config = CoordinatorConfig {
        saga_timeout: Duration::from_millis(300),
        ..quick()
    };
    setup.receive("A1", 100).await;
    // Orders placed while no coordinator runs wait in the stream for three deadlines' time,
    // and more than one coordinator's worth (in_flight) of them.
    let orders: Vec<String> = (0..40).map(|i| format!("q-{i}")).collect();
    for order_id in &orders {
        setup.place(order_id, &[("A1", 1)]).await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let _coordinator = setup.coordinator(
        gateway(0.0, 0),
        CoordinatorConfig {
            in_flight: 8,
            ..config
        },
    );
    for order_id in &orders {
        setup.saga_ends(order_id, "confirmed").await;
    }
    assert_eq!(setup.stock("A1").await, (100, 40));
}

/// The confirm is the point of no return: once it may have been appended, no deadline undoes the
/// order. Here the confirm reaches the command service and is appended, and its reply (and the
/// read that would resolve it) is lost: the coordinator's connection goes dark as the confirm
/// passes. The deadline passes while the confirm's outcome is unknown, and the coordinator is
/// still sure of nothing; the order must end confirmed, with its stock held and its charge kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_never_undoes_an_order_whose_confirm_may_have_been_sent() {
    let setup = Setup::start().await;
    let relay =
        DarkeningRelay::start(setup.engine.server.port(), Endpoint::OrderConfirm.subject()).await;
    let nats = async_nats::ConnectOptions::new()
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 50).min(500)))
        .connect(relay.url())
        .await
        .unwrap();
    // The first authorisation goes unanswered (after charging): the deadline starts then.
    let gateway = FirstAnswersLost::new(setup.pool());
    let config = CoordinatorConfig {
        saga_timeout: Duration::from_millis(800),
        step_timeout: Duration::from_millis(200),
        retry_cap: Duration::from_millis(100),
        ..quick()
    };
    let _coordinator = setup.coordinator_on(nats, gateway, config);
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;

    // The confirm was appended; its reply went missing.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while setup.order_status("o-1").await != OrderStatus::Confirmed {
        assert!(std::time::Instant::now() < deadline, "never confirmed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(relay.went_dark());
    // The deadline passes while the confirm's outcome is unknown, and the coordinator takes the
    // saga up twice more knowing it has passed.
    let attempts_at_deadline = loop {
        let (state, passed, attempts) = setup.confirm_progress("o-1").await;
        assert_eq!(state, "running", "before the deadline");
        if passed {
            break attempts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the deadline never passed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    loop {
        let (state, _, attempts) = setup.confirm_progress("o-1").await;
        if attempts >= attempts_at_deadline + 2
            || !["running", "compensation_stuck"].contains(&state.as_str())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{state} after {attempts} attempts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.heal();

    setup.saga_ends("o-1", "confirmed").await;
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Confirmed);
    assert_eq!(setup.stock("A1").await, (5, 2), "the stock is still held");
    assert_eq!(setup.stock_events("StockReleased").await, 0);
    let (amount, charged, refunded) = setup.payment("o-1").await.expect("charged");
    assert_eq!(
        (amount, charged.is_some(), refunded),
        (200, true, None),
        "charged, not refunded"
    );
}

/// A gateway that says when an authorisation starts.
#[derive(Clone)]
struct PaymentStarted {
    gateway: SimulatedGateway,
    started: Arc<tokio::sync::Notify>,
}

impl PaymentGateway for PaymentStarted {
    async fn authorize(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        self.started.notify_one();
        self.gateway.authorize(order_id, amount).await
    }
    async fn refund(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        self.gateway.refund(order_id, amount).await
    }
}

/// A row of the payment ledger: (amount, authorised at, refunded at).
type LedgerRow = (i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The simulated gateway with its ledger in the test's database: it declines nothing.
fn ledgered(pool: &PgPool) -> SimulatedGateway {
    SimulatedGateway {
        decline_rate: 0.0,
        latency: Duration::ZERO,
        ledger: Some(pool.clone()),
    }
}

/// The ledgered gateway, whose first answer to an authorisation and to a refund is lost after the
/// ledger recorded the call: the saga sends each again. It keeps each call's answer and the
/// ledger's row after it.
/// A call to the gateway: which, what it answered, and the ledger row after it.
type GatewayCall = (&'static str, Result<(), PaymentError>, Option<LedgerRow>);

#[derive(Clone)]
struct FirstAnswersLost {
    ledger: SimulatedGateway,
    calls: Arc<std::sync::Mutex<Vec<GatewayCall>>>,
}

impl FirstAnswersLost {
    fn new(pool: &PgPool) -> Self {
        Self {
            ledger: ledgered(pool),
            calls: Arc::default(),
        }
    }

    async fn answer(
        &self,
        kind: &'static str,
        order_id: &OrderId,
        answer: Result<(), PaymentError>,
    ) -> Result<(), PaymentError> {
        let row = ledger_row(self.ledger.ledger.as_ref().unwrap(), order_id.as_str()).await;
        let first = {
            let mut calls = self.calls.lock().unwrap();
            let first = !calls.iter().any(|(called, ..)| *called == kind);
            calls.push((kind, answer.clone(), row));
            first
        };
        if first {
            Err(PaymentError::Unavailable("the answer was lost".into()))
        } else {
            answer
        }
    }

    /// The answers to the calls of `kind` and the ledger row after each.
    fn calls(&self, kind: &str) -> Vec<(Result<(), PaymentError>, Option<LedgerRow>)> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(called, ..)| *called == kind)
            .map(|(_, answer, row)| (answer.clone(), *row))
            .collect()
    }
}

impl PaymentGateway for FirstAnswersLost {
    async fn authorize(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        let answer = self.ledger.authorize(order_id, amount).await;
        self.answer("authorize", order_id, answer).await
    }
    async fn refund(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        let answer = self.ledger.refund(order_id, amount).await;
        self.answer("refund", order_id, answer).await
    }
}

async fn ledger_row(pool: &PgPool, order_id: &str) -> Option<LedgerRow> {
    sqlx::query_as(
        "SELECT amount_cents, authorized_at, refunded_at FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorisation_and_a_refund_sent_again_are_one_charge_and_one_refund() {
    let setup = Setup::start().await;
    let gateway = FirstAnswersLost::new(setup.pool());
    let _coordinator = setup.coordinator(gateway.clone(), quick());
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    setup.saga_ends("o-1", "confirmed").await;

    let authorisations = gateway.calls("authorize");
    assert_eq!(
        authorisations.len(),
        2,
        "sent again after its answer was lost"
    );
    assert!(authorisations.iter().all(|(answer, _)| answer.is_ok()));
    assert_eq!(
        authorisations[0].1, authorisations[1].1,
        "the repeat changed nothing in the ledger"
    );
    let (amount, charged_at, refunded_at) = setup.payment("o-1").await.expect("charged");
    assert_eq!(
        (amount, charged_at.is_some(), refunded_at),
        (200, true, None)
    );

    // The customer cancels the paid order; the refund's first answer is lost too.
    setup.cancel("o-1").await;
    setup.saga_ends("o-1", "cancelled").await;
    let refunds = gateway.calls("refund");
    assert_eq!(refunds.len(), 2, "sent again after its answer was lost");
    assert_eq!(
        refunds[0].1, refunds[1].1,
        "refunding again changed nothing"
    );
    let (amount, charged, refunded) = setup.payment("o-1").await.unwrap();
    assert_eq!(
        (amount, charged),
        (200, charged_at),
        "one charge, for the total"
    );
    assert!(refunded.is_some(), "refunded");
    assert_eq!(setup.stock("A1").await, (5, 0));
}

/// The ledgered gateway; each authorisation waits (before it reaches the ledger) until let go,
/// as a request held up on its way to the bank. It keeps what the ledger answered.
#[derive(Clone)]
struct LateAuthorizations {
    ledger: SimulatedGateway,
    arrived: Arc<tokio::sync::Notify>,
    let_go: Arc<tokio::sync::watch::Sender<bool>>,
    answers: Arc<std::sync::Mutex<Vec<Result<(), PaymentError>>>>,
}

impl PaymentGateway for LateAuthorizations {
    async fn authorize(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        self.arrived.notify_one();
        self.let_go.subscribe().wait_for(|go| *go).await.unwrap();
        let answer = self.ledger.authorize(order_id, amount).await;
        self.answers.lock().unwrap().push(answer.clone());
        answer
    }
    async fn refund(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        self.ledger.refund(order_id, amount).await
    }
}

/// The refund barrier: a customer cancels while the authorisation is on its way; the saga
/// refunds (it may have been charged), and the authorisation that reaches the bank after the
/// refund is declined and takes no money.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorisation_that_arrives_after_the_refund_is_declined_and_takes_no_money() {
    let setup = Setup::start().await;
    let gateway = LateAuthorizations {
        ledger: ledgered(setup.pool()),
        arrived: Arc::default(),
        let_go: Arc::new(tokio::sync::watch::channel(false).0),
        answers: Arc::default(),
    };
    // No step timeout cuts the held call short: it outlives the cancellation.
    let config = CoordinatorConfig {
        step_timeout: Duration::from_secs(20),
        ..quick()
    };
    let _coordinator = setup.coordinator(gateway.clone(), config);
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    tokio::time::timeout(Duration::from_secs(20), gateway.arrived.notified())
        .await
        .expect("the authorisation is on its way");

    setup.cancel("o-1").await;
    setup.saga_ends("o-1", "cancelled").await;
    let (_, charged, refunded) = setup
        .payment("o-1")
        .await
        .expect("the refund is recorded, for an order never charged");
    assert_eq!(charged, None);
    assert!(refunded.is_some());

    // Now the authorisation reaches the bank.
    gateway.let_go.send_replace(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gateway.answers.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the held authorisation never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answers = gateway.answers.lock().unwrap().clone();
    assert!(
        matches!(answers.as_slice(), [Err(PaymentError::Declined(_))]),
        "{answers:?}"
    );
    assert_eq!(
        setup.payment("o-1").await.unwrap().1,
        None,
        "no money was taken"
    );
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Cancelled);
    assert_eq!(setup.stock("A1").await, (5, 0));
}

/// The ledgered gateway: every authorisation is charged, and its answer never comes.
#[derive(Clone)]
struct ChargedUnanswered(SimulatedGateway);

impl PaymentGateway for ChargedUnanswered {
    async fn authorize(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        self.0.authorize(order_id, amount).await?;
        std::future::pending().await
    }
    async fn refund(&self, order_id: &OrderId, amount: u64) -> Result<(), PaymentError> {
        self.0.refund(order_id, amount).await
    }
}

#[tokio::test]
async fn an_order_charged_whose_authorisation_went_unanswered_past_the_deadline_is_refunded() {
    let setup = Setup::start().await;
    let config = CoordinatorConfig {
        saga_timeout: Duration::from_millis(600),
        step_timeout: Duration::from_millis(200),
        ..quick()
    };
    let _coordinator = setup.coordinator(ChargedUnanswered(ledgered(setup.pool())), config);
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    assert_eq!(
        setup.saga_ends("o-1", "rejected").await.as_deref(),
        Some("timeout")
    );
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Rejected);
    assert_eq!(setup.stock("A1").await, (5, 0));
    let (amount, charged, refunded) = setup.payment("o-1").await.unwrap();
    assert_eq!(
        (amount, charged.is_some(), refunded.is_some()),
        (200, true, true),
        "charged, and given back"
    );
}

/// A payment gateway whose first authorisation of each order goes unanswered (the saga's
/// deadline starts) and whose calls take a while; it counts the calls in flight per order.
#[derive(Clone, Default)]
struct SlowFirstUnanswered {
    calls: Arc<std::sync::Mutex<HashMap<String, (u32, u32)>>>,
    most_at_once: Arc<std::sync::atomic::AtomicU32>,
}

impl PaymentGateway for SlowFirstUnanswered {
    async fn authorize(&self, order_id: &OrderId, _: u64) -> Result<(), PaymentError> {
        let first = {
            let mut calls = self.calls.lock().unwrap();
            let (made, in_flight) = calls.entry(order_id.to_string()).or_default();
            *made += 1;
            *in_flight += 1;
            self.most_at_once
                .fetch_max(*in_flight, std::sync::atomic::Ordering::SeqCst);
            *made == 1
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.calls
            .lock()
            .unwrap()
            .get_mut(order_id.as_str())
            .unwrap()
            .1 -= 1;
        if first {
            Err(PaymentError::Unavailable("no answer".into()))
        } else {
            Ok(())
        }
    }
    async fn refund(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
        Ok(())
    }
}

/// Two coordinators whose clocks are an hour off either way decide by PostgreSQL's clock: no
/// deadline passes early (every order confirms, none is compensated), and no lease ends early
/// (no saga is driven by both at once, which would let one compensate while the other confirms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_with_skewed_clocks_decide_by_one_clock() {
    let setup = Setup::start().await;
    let gateway = SlowFirstUnanswered::default();
    let skewed = |hours: i64| CoordinatorConfig {
        saga_timeout: Duration::from_secs(20),
        clock: Clock::skewed(chrono::TimeDelta::hours(hours)),
        ..quick()
    };
    let _behind = setup.coordinator(gateway.clone(), skewed(-1));
    let _ahead = setup.coordinator(gateway.clone(), skewed(1));
    setup.receive("A1", 100).await;
    let orders: Vec<String> = (0..12).map(|i| format!("skew-{i}")).collect();
    for order_id in &orders {
        setup.place(order_id, &[("A1", 1)]).await;
    }
    for order_id in &orders {
        setup.saga_ends(order_id, "confirmed").await;
        assert_eq!(setup.order_status(order_id).await, OrderStatus::Confirmed);
    }
    assert_eq!(
        setup.stock("A1").await,
        (100, 12),
        "every order holds its stock"
    );
    assert_eq!(
        setup.stock_events("StockReleased").await,
        0,
        "nothing was compensated"
    );
    assert_eq!(
        gateway
            .most_at_once
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no saga was driven by two coordinators at once"
    );
    let calls = gateway.calls.lock().unwrap();
    assert!(
        orders.iter().all(|order_id| calls[order_id].0 == 2),
        "each order was authorised once more after its unanswered first try: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_between_reservation_and_confirmation_is_resumed_by_another() {
    let setup = Setup::start().await;
    // A 1 s step timeout: the dead coordinator's lease ends 3 s after its last save.
    let config = CoordinatorConfig {
        step_timeout: Duration::from_secs(1),
        ..quick()
    };
    let payment = PaymentStarted {
        gateway: gateway(0.0, 500),
        started: Arc::default(),
    };
    let first = setup.coordinator(payment.clone(), config.clone());
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    // Killed once the reservation is made and the payment is under way.
    tokio::time::timeout(Duration::from_secs(20), payment.started.notified())
        .await
        .expect("the payment started");
    first.abort();
    assert_eq!(setup.stock("A1").await, (5, 2));
    assert_eq!(setup.saga("o-1").await.unwrap().0, "running");

    let _second = setup.coordinator(payment, config);
    setup.saga_ends("o-1", "confirmed").await;
    assert_eq!(setup.stock("A1").await, (5, 2));
    assert_eq!(
        setup.stock_events("StockReserved").await,
        1,
        "the reservation was not made twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_taken_in_again_and_two_coordinators_never_reserve_twice() {
    let setup = Setup::start().await;
    let one = setup.coordinator(gateway(0.0, 1), quick());
    let two = setup.coordinator(gateway(0.0, 1), quick());
    setup.receive("A1", 50).await;
    for i in 0..10 {
        setup.place(&format!("o-{i}"), &[("A1", 1)]).await;
    }
    for i in 0..10 {
        setup.saga_ends(&format!("o-{i}"), "confirmed").await;
    }
    // The coordinators stop; the next ones take every order event in again, from the start.
    one.abort();
    two.abort();
    let _ = (one.await, two.await);
    setup.saga_intake_back_to_the_start().await;
    let _one = setup.coordinator(gateway(0.0, 1), quick());
    let _two = setup.coordinator(gateway(0.0, 1), quick());
    setup.saga_intake_caught_up().await;
    for i in 0..10 {
        setup.saga_ends(&format!("o-{i}"), "confirmed").await;
    }
    assert_eq!(setup.stock_events("StockReserved").await, 10);
    assert_eq!(setup.stock("A1").await, (50, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_orders_over_scarce_stock_oversell_nothing() {
    let setup = Setup::start().await;
    let _one = setup.coordinator(gateway(0.1, 1), quick());
    let _two = setup.coordinator(gateway(0.1, 1), quick());
    let _notifier = setup.notifier().await;
    let skus: Vec<String> = (0..20).map(|i| format!("S{i:02}")).collect();
    for sku in &skus {
        setup.receive(sku, 25).await;
    }
    // Orders of 1 to 3 lines, 1 to 3 units each: about twice what the stock can serve.
    let orders: Vec<(String, Vec<(String, u32)>)> = (0..500)
        .map(|i: usize| {
            let lines = (0..1 + i % 3)
                .map(|l| (skus[(i * 7 + l * 3) % 20].clone(), 1 + ((i + l) % 3) as u32))
                .collect();
            (format!("o-{i}"), lines)
        })
        .collect();
    futures::stream::iter(&orders)
        .for_each_concurrent(50, |(order_id, lines)| {
            let setup = &setup;
            async move {
                let lines: Vec<(&str, u32)> = lines
                    .iter()
                    .map(|(sku, qty)| (sku.as_str(), *qty))
                    .collect();
                setup.place(order_id, &lines).await;
            }
        })
        .await;

    // Every order leaves pending.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sagas WHERE state NOT IN ('confirmed', 'rejected')",
        )
        .fetch_one(setup.pool())
        .await
        .unwrap();
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas")
            .fetch_one(setup.pool())
            .await
            .unwrap();
        if active == 0 && total == 500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{active} sagas still active of {total}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut confirmed_units: HashMap<String, u64> = HashMap::new();
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
    for (order_id, lines) in &orders {
        let status = setup.order_status(order_id).await;
        assert_ne!(status, OrderStatus::Pending, "{order_id}");
        *outcomes.entry(status.as_str()).or_default() += 1;
        if status == OrderStatus::Confirmed {
            for (sku, qty) in lines {
                *confirmed_units.entry(sku.clone()).or_default() += u64::from(*qty);
            }
        }
    }
    for sku in &skus {
        let (on_hand, reserved) = setup.stock(sku).await;
        assert!(
            reserved <= on_hand,
            "{sku} oversold: {reserved} of {on_hand}"
        );
        assert_eq!(
            reserved,
            confirmed_units.get(sku).copied().unwrap_or(0),
            "{sku}: reserved = confirmed units"
        );
    }
    assert!(
        outcomes["confirmed"] > 0 && outcomes["rejected"] > 0,
        "{outcomes:?}"
    );

    // Exactly one notification per order, of the kind its end was.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sent: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications WHERE status = 'sent'")
                .fetch_one(setup.pool())
                .await
                .unwrap();
        if sent == 500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sent} of 500 notifications sent"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let per_order: Vec<i64> =
        sqlx::query_scalar("SELECT count(*) FROM notifications GROUP BY order_id")
            .fetch_all(setup.pool())
            .await
            .unwrap();
    assert_eq!(per_order.len(), 500);
    assert!(per_order.iter().all(|n| *n == 1));
    let kinds: Vec<(String, String)> =
        sqlx::query_as("SELECT order_id, kind FROM notifications ORDER BY order_id")
            .fetch_all(setup.pool())
            .await
            .unwrap();
    for (order_id, kind) in kinds {
        let status = setup.order_status(&order_id).await;
        assert_eq!(kind, status.as_str(), "{order_id} ended {status:?}");
    }
    eprintln!("500 orders: {outcomes:?}");
}

/// A webhook receiver: records every POST body it accepts; answers 500 to the first POST about
/// each of `orders`.
async fn webhook_failing_the_first_post_of(
    orders: &[&str],
) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let to_fail: std::sync::Mutex<std::collections::HashSet<String>> =
        std::sync::Mutex::new(orders.iter().map(|order| (*order).to_owned()).collect());
    webhook_failing(move |_, body| {
        let order_id = body["order_id"].as_str().unwrap_or_default();
        to_fail.lock().unwrap().remove(order_id)
    })
    .await
}

/// A webhook receiver: records every POST body; answers 500 to the first `fail_first` of them.
async fn webhook(fail_first: usize) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    webhook_failing(move |before, _| before < fail_first).await
}

/// A webhook receiver: records every POST body it accepts; answers 500 to those `fails` picks,
/// told how many POSTs came before and the body.
async fn webhook_failing(
    fails: impl Fn(usize, &Value) -> bool + Send + Sync + 'static,
) -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    use axum::{Json, http::StatusCode, routing::post};
    let received = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fails = Arc::new(fails);
    let (store, counter) = (received.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/hook",
        post(move |Json(body): Json<Value>| {
            let (store, counter, fails) = (store.clone(), counter.clone(), fails.clone());
            async move {
                let before = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if fails(before, &body) {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                store.lock().unwrap().push(body);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// The notifier takes a pull's events together: their notifications are recorded and sent in
/// one transaction; those whose first sending failed are tried again; a second event asking for
/// a notification already handled does not send it twice, even when its first sending failed.
#[tokio::test]
async fn a_pull_of_many_orders_notifies_each_once_and_tries_the_failed_ones_again_alone() {
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    setup.receive("A1", 100).await;
    let orders: Vec<String> = (1..=15).map(|n| format!("o-{n}")).collect();
    for order_id in &orders {
        setup.place(order_id, &[("A1", 1)]).await;
    }
    for order_id in &orders {
        setup.saga_ends(order_id, "confirmed").await;
    }
    // A second copy of o-1's confirmation, later in the stream.
    publish_envelope(
        &setup,
        "o-1",
        "OrderConfirmed",
        1,
        99,
        serde_json::json!({}),
    )
    .await;

    // Started now, the notifier finds all 31 events waiting and takes them in one pull (up to 32):
    // o-1's copy is in the same pull as its first confirmation, whose first sending fails.
    let (url, received) = webhook_failing_the_first_post_of(&["o-1", "o-7", "o-13"]).await;
    let _notifier = setup
        .notifier_with(NotifierConfig {
            webhook_url: Some(url),
            retry_base: Duration::from_millis(20),
            ..Default::default()
        })
        .await;
    for order_id in &orders {
        assert_eq!(
            setup.notifications(order_id).await,
            [("confirmed".into(), "sent".into())]
        );
    }
    let mut told: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|body| body["order_id"].as_str().unwrap().to_owned())
        .collect();
    told.sort();
    let mut expected = orders.clone();
    expected.sort();
    assert_eq!(told, expected, "each order told once");
    let attempts: Vec<i32> =
        sqlx::query_scalar("SELECT attempts FROM notifications ORDER BY attempts")
            .fetch_all(setup.pool())
            .await
            .unwrap();
    assert_eq!(
        attempts,
        [vec![1; 12], vec![2; 3]].concat(),
        "the three that failed went through on their second attempt"
    );
}

#[tokio::test]
async fn the_webhook_gets_one_post_per_order_and_kind_after_retries_and_redeliveries() {
    let setup = Setup::start().await;
    let (url, received) = webhook(1).await;
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let _notifier = setup
        .notifier_with(NotifierConfig {
            webhook_url: Some(url),
            retry_base: Duration::from_millis(20),
            ..Default::default()
        })
        .await;
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 1)]).await;
    setup.saga_ends("o-1", "confirmed").await;
    assert_eq!(
        setup.notifications("o-1").await,
        [("confirmed".into(), "sent".into())]
    );
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM notifications WHERE order_id = 'o-1'")
            .fetch_one(setup.pool())
            .await
            .unwrap();
    assert_eq!(
        attempts, 2,
        "the first POST failed, the second went through"
    );

    // Every order event is delivered to the notifier again, and taken in.
    setup
        .deliver_every_order_event_again(ConsumerId::Notifier.name())
        .await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(
        (
            received[0]["order_id"].as_str(),
            received[0]["kind"].as_str()
        ),
        (Some("o-1"), Some("confirmed"))
    );
}

#[tokio::test]
async fn a_notification_that_cannot_be_delivered_is_dead_lettered_and_visible() {
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let _notifier = setup
        .notifier_with(NotifierConfig {
            failure_rate: 1.0,
            attempts: 3,
            retry_base: Duration::from_millis(10),
            ..Default::default()
        })
        .await;
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 1)]).await;
    setup.saga_ends("o-1", "confirmed").await;
    assert_eq!(
        setup.notifications("o-1").await,
        [("confirmed".into(), "dead_lettered".into())]
    );
    let (attempts, last_error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM notifications WHERE order_id = 'o-1'")
            .fetch_one(setup.pool())
            .await
            .unwrap();
    assert_eq!(attempts, 3);
    assert!(last_error.unwrap().contains("simulated delivery failure"));
    let row = || async {
        sqlx::query_as::<_, (String, i32, Option<String>)>(
            "SELECT status, attempts, last_error FROM notifications WHERE order_id = 'o-1'",
        )
        .fetch_one(setup.pool())
        .await
        .unwrap()
    };

    // Retried while the channel still fails: tried again as often as configured, and
    // dead-lettered again with the new count.
    use ordo_saga::notifier::Redelivery;
    let still_failing = Notifier::connect(
        setup.pool().clone(),
        setup.client.clone(),
        NotifierConfig {
            failure_rate: 1.0,
            attempts: 2,
            retry_base: Duration::from_millis(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        still_failing
            .retry_dead_lettered("o-1", "confirmed")
            .await
            .unwrap(),
        Redelivery::Delivered("dead_lettered".into())
    );
    let (status, attempts, last_error) = row().await;
    assert_eq!((status.as_str(), attempts), ("dead_lettered", 2));
    assert!(last_error.is_some());

    // Once the channel works again, an operator retries it.
    let working = Notifier::connect(
        setup.pool().clone(),
        setup.client.clone(),
        NotifierConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        working
            .retry_dead_lettered("o-1", "confirmed")
            .await
            .unwrap(),
        Redelivery::Delivered("sent".into())
    );
    assert_eq!(row().await, ("sent".into(), 1, None));
    assert_eq!(
        working
            .retry_dead_lettered("o-1", "confirmed")
            .await
            .unwrap(),
        Redelivery::NotDeadLettered("sent".into()),
        "sent already: left as it is"
    );
    assert_eq!(
        working.retry_dead_lettered("o-1", "shipped").await.unwrap(),
        Redelivery::NoNotification,
        "no such notification"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_row_that_cannot_be_read_is_set_aside_visibly_and_the_others_go_on() {
    let setup = Setup::start().await;
    sqlx::query(
        "INSERT INTO sagas (order_id, state, data, next_attempt_at) VALUES ('o-bad', 'running', '{\"not\": \"a saga\"}', now())",
    )
    .execute(setup.pool())
    .await
    .unwrap();
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 1)]).await;
    setup.saga_ends("o-1", "confirmed").await;
    let (next_attempt, reason): (Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("SELECT next_attempt_at, reason FROM sagas WHERE order_id = 'o-bad'")
            .fetch_one(setup.pool())
            .await
            .unwrap();
    assert_eq!(next_attempt, None, "not claimed again and again");
    assert!(reason.unwrap().starts_with("unreadable saga state"));
}

/// An order event as a newer build would write it: schema 99, which this build cannot read.
async fn publish_newer_schema(setup: &Setup, order_id: &str, event_type: &str, version: u64) {
    let data = serde_json::json!({"in_a_shape": "this build has never seen"});
    publish_envelope(setup, order_id, event_type, 99, version, data).await;
}

/// An order event of this build's schema.
async fn publish_order_event(
    setup: &Setup,
    order_id: &str,
    event_type: &str,
    version: u64,
    data: Value,
) {
    publish_envelope(setup, order_id, event_type, 1, version, data).await;
}

async fn publish_envelope(
    setup: &Setup,
    order_id: &str,
    event_type: &str,
    schema: u32,
    version: u64,
    data: Value,
) {
    let envelope = serde_json::json!({
        "id": "0190e2b4-0000-7000-8000-000000000000", "type": event_type, "schema": schema,
        "aggregate_id": order_id, "version": version, "at": chrono::Utc::now(),
        "command_id": format!("newer-{order_id}-{version}"), "correlation_id": "newer",
        "causation_id": null, "data": data
    });
    jetstream::new(setup.client.clone())
        .publish(
            format!("ordo.order.events.{order_id}"),
            envelope.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// (deliveries so far, messages not acknowledged) of a durable consumer on the orders stream.
async fn consumer_state(setup: &Setup, name: &str) -> (u64, usize) {
    let stream = jetstream::new(setup.client.clone())
        .get_stream(ordo_eventstore::StreamId::Orders.name())
        .await
        .unwrap();
    let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(name).await.unwrap();
    let info = consumer.info().await.unwrap();
    (info.delivered.consumer_sequence, info.num_ack_pending)
}

async fn unreadable_events(setup: &Setup, consumer: &str) -> Vec<(String, Option<i64>, i64)> {
    sqlx::query_as(
        "SELECT subject, schema, deliveries FROM unreadable_events WHERE consumer = $1 ORDER BY seq",
    )
    .bind(consumer)
    .fetch_all(setup.pool())
    .await
    .unwrap()
}

/// The saga intake's held-back events: (subject, schema, deliveries, reason), in stream order.
async fn held_back(setup: &Setup) -> Vec<(String, Option<i64>, i64, String)> {
    sqlx::query_as(
        "SELECT subject, schema, deliveries, reason FROM unreadable_events
         WHERE consumer = $1 ORDER BY seq",
    )
    .bind(ConsumerId::Saga.name())
    .fetch_all(setup.pool())
    .await
    .unwrap()
}

/// During a rolling upgrade a newer build writes an order's events in a schema this build cannot
/// read. Skipping them would lose the order's saga for good; they are held back instead (tried
/// again by themselves, less and less often), shown, the order's later events wait behind them,
/// and the other orders go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_event_of_a_newer_schema_is_held_back_and_shown_not_skipped() {
    let setup = Setup::start().await;
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let _notifier = setup.notifier().await;
    setup.receive("A1", 5).await;
    publish_newer_schema(&setup, "o-newer", "OrderPlaced", 1).await;
    publish_newer_schema(&setup, "o-newer", "OrderConfirmed", 2).await;
    // A cancellation this build reads, behind the two it cannot.
    publish_order_event(
        &setup,
        "o-newer",
        "OrderCancelled",
        3,
        serde_json::json!({"reason": null}),
    )
    .await;
    setup.place("o-1", &[("A1", 1)]).await;
    setup.saga_ends("o-1", "confirmed").await;
    assert_eq!(
        setup.notifications("o-1").await,
        [("confirmed".into(), "sent".into())]
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while held_back(&setup).await.len() < 3
        || unreadable_events(&setup, ConsumerId::Notifier.name())
            .await
            .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never shown as held back: {:?}",
            held_back(&setup).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = held_back(&setup).await;
    assert_eq!(shown[0].0, "ordo.order.events.o-newer");
    assert_eq!(shown[0].1, Some(99));
    assert_eq!(shown[1].1, Some(99));
    assert_eq!(shown[2].1, Some(1), "the cancellation is readable");
    assert!(
        shown[2].3.starts_with("waits for event"),
        "held behind the placing: {}",
        shown[2].3
    );
    assert_eq!(
        setup.saga("o-newer").await,
        None,
        "no saga from an event it cannot read"
    );
    // The intake went past them (they are held, not in the way of the partition's other orders).
    setup.saga_intake_caught_up().await;
    let (_, notifier_pending) = consumer_state(&setup, ConsumerId::Notifier.name()).await;
    assert!(
        notifier_pending >= 1,
        "the notifier acknowledged an event it cannot read"
    );

    // Held back, not hammered: each is tried again less and less often (after 1 s, 2 s, 4 s,
    // …; with a fixed 200 ms pause, 4.5 seconds would take some 22 tries each).
    let tries = |shown: &[(String, Option<i64>, i64, String)]| -> i64 {
        shown.iter().map(|(_, _, deliveries, _)| deliveries).sum()
    };
    let before = tries(&held_back(&setup).await);
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let after = tries(&held_back(&setup).await);
    assert!(
        after - before <= 9,
        "{} tries of three held-back events in 4.5 s",
        after - before
    );
    // But tried again (the longest pause is a minute).
    let deadline = std::time::Instant::now() + Duration::from_secs(65);
    while tries(&held_back(&setup).await) <= before {
        assert!(std::time::Instant::now() < deadline, "never tried again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the others still go on.
    setup.place("o-2", &[("A1", 1)]).await;
    setup.saga_ends("o-2", "confirmed").await;
}

/// A payment gateway that holds every authorisation until it is let go (and says when one
/// has arrived), and counts refunds.
#[derive(Clone, Default)]
struct HeldAuthorizations {
    arrived: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    refunds: Arc<std::sync::atomic::AtomicU32>,
}

impl PaymentGateway for HeldAuthorizations {
    async fn authorize(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
        self.arrived.notify_one();
        self.release.notified().await;
        Ok(())
    }
    async fn refund(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
        self.refunds
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// An operator rejects an order while its saga is paying for it, and the saga then stands at
/// a confirm that can never happen: it gives the stock and the charge back and ends rejected,
/// rather than retrying the confirm for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_reject_while_the_saga_runs_gives_back_the_stock_and_the_charge() {
    let setup = Setup::start().await;
    let gateway = HeldAuthorizations::default();
    let _coordinator = setup.coordinator(gateway.clone(), quick());
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    // The reject lands while the payment is under way.
    tokio::time::timeout(Duration::from_secs(20), gateway.arrived.notified())
        .await
        .expect("the authorisation is under way");
    assert_eq!(setup.stock("A1").await, (5, 2));
    setup
        .engine
        .accepted(&CommandRequest::RejectOrder(RejectOrder {
            order_id: OrderId::parse("o-1").unwrap(),
            reason: Reason::new("fraud suspected").unwrap(),
        }))
        .await;
    gateway.release.notify_waiters();
    gateway.release.notify_one();
    let reason = setup.saga_ends("o-1", "rejected").await;
    assert_eq!(
        reason.as_deref(),
        Some("the order was rejected: fraud suspected")
    );
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Rejected);
    assert_eq!(
        setup.stock("A1").await,
        (5, 0),
        "the reservation was released"
    );
    assert_eq!(
        gateway.refunds.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the charge was refunded"
    );
}

/// An earlier build held an order's OrderPlaced back (it could not read it) and its cancellation
/// behind it, and moved its checkpoint past both. A build that reads them takes them in by
/// themselves, in order: the saga starts, the cancellation takes over, and the order ends
/// cancelled with nothing held; the rows are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_events_are_taken_in_in_order_by_a_build_that_reads_them() {
    let setup = Setup::start().await;
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    setup.cancel("o-1").await;
    let head = setup.orders_head().await as i64;
    sqlx::query(
        "INSERT INTO saga_intake (partition, seq) SELECT partition, $1 FROM generate_series(0, 15) AS partition",
    )
    .bind(head)
    .execute(setup.pool())
    .await
    .unwrap();
    // The cancellation is due first: it must wait for the placing all the same.
    for (seq, reason, due_in) in [
        (head - 1, "unknown schema 2 of OrderPlaced", 2.0),
        (
            head,
            "waits for event of its order, which is held back",
            0.0,
        ),
    ] {
        sqlx::query(
            "INSERT INTO unreadable_events (consumer, stream, seq, subject, reason, deliveries, next_attempt_at)
             VALUES ($1, 'ORDO_ORDERS', $2, 'ordo.order.events.o-1', $3, 4, now() + make_interval(secs => $4))",
        )
        .bind(ConsumerId::Saga.name())
        .bind(seq)
        .bind(reason)
        .bind(due_in)
        .execute(setup.pool())
        .await
        .unwrap();
    }

    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shown = held_back(&setup).await;
        if shown.iter().any(|(_, _, deliveries, reason)| {
            *deliveries == 5 && reason.starts_with("waits for event")
        }) {
            break;
        }
        assert_eq!(
            setup.saga("o-1").await,
            None,
            "the cancellation went before the placing"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the cancellation was not tried first: {shown:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup.saga_ends("o-1", "cancelled").await;
    assert_eq!(setup.order_status("o-1").await, OrderStatus::Cancelled);
    assert_eq!(setup.stock("A1").await, (5, 0));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !held_back(&setup).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still shown as held back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Upgrading from a build whose intake read through the durable consumer `ordo-saga`: the first
/// coordinator starts every partition where that consumer had acknowledged everything (not from
/// the start of the stream), and deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_coordinator_starts_where_the_durable_consumer_of_earlier_builds_stood() {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let setup = Setup::start().await;
    setup.receive("A1", 5).await;
    setup.place("o-earlier", &[("A1", 1)]).await;
    // An earlier build's intake took o-earlier's OrderPlaced in and acknowledged it.
    let stream = jetstream::new(setup.client.clone())
        .get_stream(ordo_eventstore::StreamId::Orders.name())
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(ConsumerId::Saga.name().into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.fetch().max_messages(1).messages().await.unwrap();
    messages
        .next()
        .await
        .unwrap()
        .unwrap()
        .double_ack()
        .await
        .unwrap();
    setup.place("o-later", &[("A1", 1)]).await;

    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    setup.saga_ends("o-later", "confirmed").await;
    setup.saga_intake_caught_up().await;
    // The intake reports how far it is (what the command service's load shedding reads).
    let head = setup.orders_head().await;
    let reports = jetstream::new(setup.client.clone())
        .get_key_value(ordo_eventstore::ownership::BUCKET)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut keys = reports.keys().await.unwrap();
        let mut reported = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.unwrap();
            if key.starts_with("saga.progress.")
                && let Some(report) = reports.get(&key).await.unwrap()
            {
                reported.push(String::from_utf8(report.to_vec()).unwrap());
            }
        }
        let position = ordo_eventstore::progress::position(reported.iter().map(String::as_str), 16);
        if position == Some(head) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reported {reported:?}, the head is {head}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        setup.saga("o-earlier").await,
        None,
        "read from the start: the acknowledged OrderPlaced was taken in again"
    );
    assert!(
        stream.consumer_info(ConsumerId::Saga.name()).await.is_err(),
        "the durable consumer of earlier builds is left behind"
    );
}

/// Refunds that get no answer until the gateway is repaired.
#[derive(Clone, Default)]
struct RefundsDown {
    working: Arc<std::sync::atomic::AtomicBool>,
}

impl PaymentGateway for RefundsDown {
    async fn authorize(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
        Ok(())
    }
    async fn refund(&self, _: &OrderId, _: u64) -> Result<(), PaymentError> {
        if self.working.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(PaymentError::Unavailable("refunds are down".into()))
        }
    }
}

/// A compensation with no answer after 6 attempts shows `compensation_stuck` with the step and
/// its last error; an operator's retry gives it a fresh count, due at once, and it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_with_no_answer_is_compensation_stuck_until_an_operator_retries_it() {
    let setup = Setup::start().await;
    let gateway = RefundsDown::default();
    let coordinator = setup.coordinator(gateway.clone(), quick());
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    setup.saga_ends("o-1", "confirmed").await;
    setup.cancel("o-1").await;
    let reason = setup.saga_ends("o-1", "compensation_stuck").await.unwrap();
    assert!(
        reason.starts_with("refund outcome unknown after 6 attempts")
            && reason.contains("refunds are down"),
        "{reason}"
    );
    let (_, _, steps) = setup.saga("o-1").await.unwrap();
    let refund = steps
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["kind"] == "refund")
        .unwrap()
        .clone();
    assert_eq!(refund["state"], "unknown", "{refund}");
    assert!(refund["attempts"].as_u64().unwrap() >= 6, "{refund}");
    // No coordinator runs: what the retry itself did is seen before anyone acts on it.
    coordinator.abort();
    let _ = coordinator.await;
    gateway
        .working
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let operator = Coordinator::new(
        setup.pool().clone(),
        setup.client.clone(),
        gateway.clone(),
        quick(),
    );
    let o1 = OrderId::parse("o-1").unwrap();
    assert_eq!(
        operator.retry_stuck(&o1).await.unwrap(),
        ordo_saga::StuckRetry::Retried(ordo_domain::saga::SagaState::Cancelling)
    );
    let (state, due, steps): (String, bool, Value) = sqlx::query_as(
        "SELECT state, next_attempt_at <= now(), steps FROM sagas WHERE order_id = 'o-1'",
    )
    .fetch_one(setup.pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), due), ("cancelling", true));
    let refund = steps
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["kind"] == "refund")
        .unwrap()
        .clone();
    assert_eq!(refund["attempts"], 0, "a fresh count: {refund}");
    let _coordinator = setup.coordinator(gateway, quick());
    setup.saga_ends("o-1", "cancelled").await;
    assert_eq!(setup.stock("A1").await, (5, 0));
    assert_eq!(
        operator
            .retry_stuck(&OrderId::parse("nope").unwrap())
            .await
            .unwrap(),
        ordo_saga::StuckRetry::NoSaga
    );
    // A saga that is not stuck (any more) is left as it is.
    assert_eq!(
        operator.retry_stuck(&o1).await.unwrap(),
        ordo_saga::StuckRetry::NotStuck(ordo_domain::saga::SagaState::Cancelled)
    );
}

/// A webhook whose first POST never answers (its sender is to die holding it); every later POST
/// is recorded and answered at once. Says when the first one has arrived.
async fn webhook_that_holds_the_first_post() -> (
    String,
    Arc<std::sync::Mutex<Vec<Value>>>,
    Arc<tokio::sync::Notify>,
) {
    use axum::{Json, http::StatusCode, routing::post};
    let received = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let first_arrived = Arc::new(tokio::sync::Notify::new());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (store, arrived) = (received.clone(), first_arrived.clone());
    let app = axum::Router::new().route(
        "/hook",
        post(move |Json(body): Json<Value>| {
            let (store, arrived, calls) = (store.clone(), arrived.clone(), calls.clone());
            async move {
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    arrived.notify_one();
                    std::future::pending::<()>().await;
                }
                store.lock().unwrap().push(body);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received, first_arrived)
}

/// Notifiers share one consumer: one that dies in the middle of a delivery (its process gone,
/// with its connections) is taken over by another, which delivers the notification once the
/// event's ack wait has run out; the customer is told once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifier_that_dies_mid_delivery_is_taken_over_by_another() {
    let setup = Setup::start().await;
    let (url, received, first_arrived) = webhook_that_holds_the_first_post().await;
    let config = NotifierConfig {
        webhook_url: Some(url),
        // The held POST outlives the dying notifier; the take-over comes 2 s after delivery.
        webhook_timeout: Duration::from_secs(60),
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    };
    // The first notifier on connections of its own, as its own process would have.
    let dying_pool = sqlx::PgPool::connect(setup.database.url()).await.unwrap();
    let dying_nats = setup.engine.server.client().await;
    let notifier = Notifier::connect(dying_pool.clone(), dying_nats.clone(), config.clone())
        .await
        .unwrap();
    let dying = tokio::spawn(async move { notifier.run(std::future::pending()).await });
    let _coordinator = setup.coordinator(gateway(0.0, 1), quick());
    setup.receive("A1", 5).await;
    setup.place("o-1", &[("A1", 2)]).await;
    tokio::time::timeout(Duration::from_secs(20), first_arrived.notified())
        .await
        .expect("the first notifier posts");
    // A standby joins, and the first notifier dies holding the delivery (and its row's lock,
    // which PostgreSQL lets go with the connection).
    let _standby = setup.notifier_with(config).await;
    dying.abort();
    let _ = dying.await;
    dying_pool.close().await;
    drop(dying_nats);

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every order event handled and acknowledged: nothing more is on its way to the webhook.
    let mut stream = jetstream::new(setup.client.clone())
        .get_stream(ordo_eventstore::StreamId::Orders.name())
        .await
        .unwrap();
    let head = stream.info().await.unwrap().state.last_sequence;
    loop {
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(ConsumerId::Notifier.name())
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if info.ack_floor.stream_sequence >= head && info.num_ack_pending == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        setup.notifications("o-1").await,
        [("confirmed".into(), "sent".into())]
    );
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "told once: {received:?}");
    assert_eq!(
        (
            received[0]["order_id"].as_str(),
            received[0]["kind"].as_str()
        ),
        (Some("o-1"), Some("confirmed"))
    );
}

/// The console's retries arrive over NATS: a request that is not one is refused with a reason,
/// and an answer goes only to an inbox, never to a subject of ordo's that a request names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_request_is_answered_only_when_valid_and_only_in_an_inbox() {
    use ordo_saga::operations::{OperationReply, RETRY_NOTIFICATION};
    let setup = Setup::start().await;
    let notifier = Notifier::connect(
        setup.pool().clone(),
        setup.client.clone(),
        NotifierConfig::default(),
    )
    .await
    .unwrap();
    let answering = tokio::spawn(ordo_saga::operations::answer_notification_retries(
        setup.client.clone(),
        notifier,
        std::future::pending(),
    ));
    let ask = |body: &'static str| {
        let client = setup.client.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                // The first requests may come before the subscription is in place.
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    client.request(RETRY_NOTIFICATION, body.into()),
                )
                .await
                {
                    Ok(Ok(answer)) => {
                        return serde_json::from_slice::<OperationReply>(&answer.payload).unwrap();
                    }
                    _ => assert!(std::time::Instant::now() < deadline, "no answer"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for (body, says) in [
        ("not json", "not a valid request"),
        (
            r#"{"order_id":"o-1","kind":"confirmed","extra":1}"#,
            "unknown field",
        ),
        (r#"{"order_id":"o 1","kind":"confirmed"}"#, "o 1"),
        (
            r#"{"order_id":"o-1","kind":"lunch"}"#,
            "not a kind of notification",
        ),
        (
            r#"{"order_id":"o-1","kind":"confirmed"}"#,
            "no confirmed notification for order o-1",
        ),
    ] {
        match ask(body).await {
            OperationReply::Refused { message } => {
                assert!(message.contains(says), "{body}: {message}")
            }
            other => panic!("{body}: {other:?}"),
        }
    }
    // A reply subject that is one of ordo's own gets no answer at all.
    let mut stock_events = setup.client.subscribe("ordo.stock.events.>").await.unwrap();
    setup
        .client
        .publish_with_reply(
            RETRY_NOTIFICATION,
            "ordo.stock.events.A1",
            r#"{"order_id":"o-1","kind":"confirmed"}"#.into(),
        )
        .await
        .unwrap();
    setup.client.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), stock_events.next())
            .await
            .is_err(),
        "an answer was published on a stock subject"
    );
    answering.abort();
}
