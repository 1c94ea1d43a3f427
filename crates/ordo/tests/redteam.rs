//! The red team: the attacks of docs/security.md, sent as an application would send them, against
//! ordo deployed as docker/ deploys it. The nats-server runs the accounts, users and permissions
//! of docker/nats-accounts.conf exactly as shipped; every component is its own process, connected as its
//! own user (`ordo-commands`, `ordo-saga`, …). The attackers are the shipped applications, `shop`
//! and `warehouse`, and a component whose password leaked.
//!
//! Each test names what the attacker tries, then asserts that nothing was written, read,
//! reserved, confirmed or leaked, and that the system still serves its honest callers.

use ordo_contract::Endpoint;
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use async_nats::{HeaderMap, jetstream};
use futures::StreamExt;
use ordo_eventstore::ConsumerId;
use ordo_testkit::NatsServer;
use serde_json::{Value, json};
use shipped::{Shipped, accounts_config, connect_as, inbox_prefix, password};

mod shipped;

const ORDO: &str = env!("CARGO_BIN_EXE_ordo");

/// ordo as docker/compose.yaml runs it, on a server with the shipped accounts.
struct System {
    shipped: Shipped,
    /// The operator's connection: it reads the streams and the service's stats.
    operator: async_nats::Client,
}

impl System {
    async fn start() -> Self {
        let shipped = Shipped::start(&[]).await;
        let operator = connect_as(&shipped.server.url(), "ordo-admin").await;
        let system = Self { shipped, operator };
        // Ready once the warehouse is answered and an order goes all the way through, to the
        // shop's notification.
        let warehouse = system.connect("warehouse").await;
        let received = system
            .answered(
                &warehouse,
                Endpoint::StockReceive.subject(),
                json!({"sku": "READY", "qty": 1}),
            )
            .await;
        assert_eq!(received["ok"], true, "{received}");
        let shop = system.connect("shop").await;
        let mut notifications = shop.subscribe("ordo.notifications.c0").await.unwrap();
        shop.flush().await.unwrap();
        let placed = system
            .answered(
                &shop,
                Endpoint::OrderPlace.subject(),
                json!({"order_id": "ready", "customer_id": "c0",
                       "lines": [{"sku": "READY", "qty": 1, "unit_price_cents": 1}]}),
            )
            .await;
        assert_eq!(placed["ok"], true, "{placed}");
        system.settled("ready", "confirmed").await;
        let notified = tokio::time::timeout(Duration::from_secs(30), notifications.next()).await;
        assert!(
            matches!(notified, Ok(Some(_))),
            "the shop was not notified; see the logs in {}",
            system.logs().display()
        );
        system
    }

    /// No component was refused anything by the server: the shipped permissions are enough for
    /// ordo itself.
    fn components_were_refused_nothing(&self) {
        self.shipped.components_were_refused_nothing();
    }

    /// A connection as `user`, with the inbox the server lets that user read.
    async fn connect(&self, user: &str) -> async_nats::Client {
        connect_as(&self.shipped.server.url(), user).await
    }

    /// The operator's view of the streams (it may read everything).
    fn admin(&self) -> jetstream::Context {
        jetstream::new(self.operator.clone())
    }

    /// Where the components log; named in every failure.
    fn logs(&self) -> PathBuf {
        self.shipped.dir.path().to_owned()
    }

    async fn answered(&self, client: &async_nats::Client, subject: &str, body: Value) -> Value {
        NatsServer::request_until_answered(client, subject, &body, None, Duration::from_secs(60))
            .await
    }

    /// The reply to one request with `headers`, or the error that came instead.
    async fn request(
        client: &async_nats::Client,
        subject: &str,
        body: &Value,
        headers: HeaderMap,
    ) -> Result<Value, String> {
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .headers(headers)
            .timeout(Some(Duration::from_secs(3)));
        let reply = client
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|err| err.to_string())?;
        serde_json::from_slice(&reply.payload).map_err(|err| err.to_string())
    }

    async fn read(&self, path: &str) -> Value {
        reqwest::get(format!("http://{}{path}", self.shipped.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the saga of `order_id` is in `state`.
    async fn settled(&self, order_id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) =
                reqwest::get(format!("http://{}/sagas/{order_id}", self.shipped.http)).await
                && let Ok(saga) = response.json::<Value>().await
                && saga["state"] == state
            {
                return saga;
            }
            assert!(
                Instant::now() < deadline,
                "the saga of {order_id} did not reach {state}; see the logs in {}",
                self.logs().display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The messages of `stream` on `subject`, as the operator reads them.
    async fn stored(&self, stream: &str, subject: &str) -> Vec<Value> {
        let admin = self.admin();
        let stream = admin.get_stream(stream).await.unwrap();
        let mut messages = Vec::new();
        let mut seq = 1;
        while let Ok(message) = stream.direct_get_next_for_subject(subject, Some(seq)).await {
            seq = message.sequence + 1;
            messages.push(serde_json::from_slice(&message.payload).unwrap_or_else(
                |_| json!({"not json": String::from_utf8_lossy(&message.payload)}),
            ));
        }
        messages
    }

    /// How many requests the command service has taken in on `endpoint` (`order-cancel`), as
    /// `nats micro stats ordo` says to the operator.
    async fn requests_seen(&self, endpoint: &str) -> u64 {
        let stats = self
            .operator
            .request("$SRV.STATS.ordo", "".into())
            .await
            .unwrap();
        let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|stats| stats["name"] == endpoint)
            .and_then(|stats| stats["num_requests"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until the command service has taken in `count` requests on `endpoint`.
    async fn seen(&self, endpoint: &str, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.requests_seen(endpoint).await < count {
            assert!(
                Instant::now() < deadline,
                "{endpoint}: fewer than {count} requests arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn message_count(&self, stream: &str) -> u64 {
        let admin = self.admin();
        let mut stream = admin.get_stream(stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

/// A JetStream context whose calls give up after 2 s: a refused one gets no answer (the server
/// drops what a user may not publish), and the default would wait 5 to 10 s for each.
fn refused_soon(client: async_nats::Client) -> jetstream::Context {
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_secs(2));
    context
}

fn with_id(command_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", command_id);
    headers
}

#[tokio::test]
async fn no_reply_subject_or_header_makes_ordo_write_anywhere_but_where_the_command_decides() {
    let system = System::start().await;
    let (shop, warehouse) = (
        system.connect("shop").await,
        system.connect("warehouse").await,
    );
    let received = system
        .answered(
            &warehouse,
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 10}),
        )
        .await;
    assert_eq!(received["version"], 1, "{received}");
    let outcomes = system.message_count("ORDO_COMMAND_OUTCOMES").await;
    let (cancels, ships) = (
        system.requests_seen("order-cancel").await,
        system.requests_seen("order-ship").await,
    );

    // Attack: a request whose reply subject is an event subject, a snapshot, an outcome record,
    // a rate-limit key or the JetStream API, hoping ordo's reply lands there.
    let crafted = [
        "ordo.stock.events.A1",
        "ordo.order.events.ready",
        "ordo.snapshots.stock.A1",
        "$JS.API.STREAM.DELETE.ORDO_SNAPSHOTS",
        "$KV.ordo_rate_limits.customer.c0",
    ];
    for crafted in crafted {
        shop.publish_with_reply(
            Endpoint::OrderCancel.subject(),
            crafted,
            json!({"order_id": "nope"}).to_string().into(),
        )
        .await
        .unwrap();
        warehouse
            .publish_with_reply(Endpoint::OrderShip.subject(), crafted, "{}".into())
            .await
            .unwrap();
    }
    shop.flush().await.unwrap();
    warehouse.flush().await.unwrap();
    // Every one of them reached the command service and was answered (on the server's mapping
    // back to the caller's own account).
    system
        .seen("order-cancel", cancels + crafted.len() as u64)
        .await;
    system
        .seen("order-ship", ships + crafted.len() as u64)
        .await;

    // Attack: headers ordo copies into the event, far beyond any id, to fill the stream.
    let place = json!({"order_id": "o-big", "customer_id": "c1",
                       "lines": [{"sku": "A1", "qty": 1, "unit_price_cents": 1}]});
    for header in ["Ordo-Correlation-Id", "Ordo-Causation-Id"] {
        let mut headers = HeaderMap::new();
        headers.insert(header, "x".repeat(60 * 1024).as_str());
        let refused = System::request(&shop, Endpoint::OrderPlace.subject(), &place, headers)
            .await
            .unwrap();
        assert_eq!(refused["error"]["code"], "invalid_command", "{refused}");
    }
    // Attack: a string no view can hold.
    let nul = System::request(
        &shop,
        Endpoint::OrderCancel.subject(),
        &json!({"order_id": "ready", "reason": "x\u{0}y"}),
        HeaderMap::new(),
    )
    .await
    .unwrap();
    assert_eq!(nul["error"]["code"], "invalid_command", "{nul}");

    // Nothing but A1's receipt is stored on A1, and ready's events are its own.
    let a1 = system.stored("ORDO_STOCK", "ordo.stock.events.A1").await;
    assert_eq!(a1.len(), 1, "{a1:?}");
    assert_eq!(a1[0]["type"], "StockReceived");
    for event in system
        .stored("ORDO_ORDERS", "ordo.order.events.ready")
        .await
    {
        assert!(event["type"].is_string(), "not an event: {event}");
    }
    assert!(
        system
            .stored("ORDO_ORDERS", "ordo.order.events.o-big")
            .await
            .is_empty(),
        "the oversized order was not placed"
    );
    assert_eq!(
        system.message_count("ORDO_COMMAND_OUTCOMES").await,
        outcomes,
        "no outcome record written, none removed"
    );
    assert_eq!(
        system.message_count("ORDO_SNAPSHOTS").await,
        0,
        "the snapshots are there, empty"
    );
    // A1 still serves its honest callers.
    let again = system
        .answered(
            &warehouse,
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 1}),
        )
        .await;
    assert_eq!(again["version"], 2, "{again}");

    // Every stream and the account have byte limits, so no flood fills the server.
    let admin = system.admin();
    for stream in [
        "ORDO_ORDERS",
        "ORDO_STOCK",
        "ORDO_COMMAND_OUTCOMES",
        "ORDO_SNAPSHOTS",
    ] {
        let info = admin
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert!(info.config.max_bytes > 0, "{stream} has no byte limit");
    }
    let account = admin.query_account().await.unwrap();
    assert!(
        account.limits.max_storage.is_some_and(|bytes| bytes > 0),
        "the account has no byte limit"
    );
    system.components_were_refused_nothing();
}

#[tokio::test]
async fn an_application_reaches_only_its_own_commands_and_a_leaked_component_only_its_job() {
    let system = System::start().await;
    let (shop, warehouse) = (
        system.connect("shop").await,
        system.connect("warehouse").await,
    );
    system
        .answered(
            &warehouse,
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 10}),
        )
        .await;

    // Attack: the saga's commands, on their subjects and on the old ones, and the other
    // application's commands. None is answered; none is decided.
    let reserve = json!({"sku": "A1", "order_id": "fake", "qty": 10});
    let attempts = [
        (&shop, Endpoint::StockReserve.subject(), reserve.clone()),
        (&shop, "ordo.cmd.stock.reserve", reserve.clone()),
        (
            &warehouse,
            Endpoint::StockReserve.subject(),
            reserve.clone(),
        ),
        (
            &shop,
            Endpoint::OrderConfirm.subject(),
            json!({"order_id": "unpaid"}),
        ),
        (
            &shop,
            "ordo.cmd.order.confirm",
            json!({"order_id": "unpaid"}),
        ),
        (
            &shop,
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 1000}),
        ),
        (
            &shop,
            Endpoint::OrderShip.subject(),
            json!({"order_id": "ready"}),
        ),
        (
            &warehouse,
            Endpoint::OrderPlace.subject(),
            json!({"order_id": "w-1", "customer_id": "c9", "lines": [{"sku": "A1", "qty": 10, "unit_price_cents": 0}]}),
        ),
        (
            &warehouse,
            Endpoint::OrderCancel.subject(),
            json!({"order_id": "ready"}),
        ),
    ];
    let answers =
        futures::future::join_all(attempts.iter().map(|(client, subject, body)| {
            System::request(client, subject, body, HeaderMap::new())
        }))
        .await;
    for ((_, subject, _), answered) in attempts.iter().zip(answers) {
        assert!(answered.is_err(), "{subject} was answered: {answered:?}");
    }
    let a1 = system.stored("ORDO_STOCK", "ordo.stock.events.A1").await;
    assert_eq!(a1.len(), 1, "only the receipt: {a1:?}");

    // An order with no stock is rejected, and nobody can confirm it.
    let unpaid = system
        .answered(
            &shop,
            Endpoint::OrderPlace.subject(),
            json!({"order_id": "unpaid", "customer_id": "c1",
                         "lines": [{"sku": "NONE", "qty": 1, "unit_price_cents": 100}]}),
        )
        .await;
    assert_eq!(unpaid["ok"], true, "{unpaid}");
    system.settled("unpaid", "rejected").await;
    let confirm = System::request(
        &shop,
        Endpoint::OrderConfirm.subject(),
        &json!({"order_id": "unpaid"}),
        HeaderMap::new(),
    )
    .await;
    assert!(confirm.is_err(), "{confirm:?}");
    // A real customer gets all 10 units: no fake order holds any.
    system
        .answered(
            &shop,
            Endpoint::OrderPlace.subject(),
            json!({"order_id": "real", "customer_id": "c2",
                         "lines": [{"sku": "A1", "qty": 10, "unit_price_cents": 100}]}),
        )
        .await;
    system.settled("real", "confirmed").await;
    let unpaid_events = system
        .stored("ORDO_ORDERS", "ordo.order.events.unpaid")
        .await;
    assert!(
        unpaid_events
            .iter()
            .all(|event| event["type"] != "OrderConfirmed"),
        "{unpaid_events:?}"
    );

    // Attack with a component's leaked password. The read API's user cannot command, append
    // (an event published straight onto A1's subject), or manage a stream.
    let api = system.connect("ordo-api").await;
    let commanded = System::request(
        &api,
        Endpoint::StockRelease.subject(),
        &json!({"sku": "A1", "order_id": "real"}),
        HeaderMap::new(),
    )
    .await;
    assert!(commanded.is_err(), "{commanded:?}");
    let api_js = refused_soon(api.clone());
    let appended = api_js
        .publish("ordo.stock.events.A1", "{\"forged\":true}".into())
        .await;
    assert!(
        match appended {
            Ok(ack) => ack.await.is_err(),
            Err(_) => true,
        },
        "the API's user appended to ORDO_STOCK"
    );
    assert!(api_js.delete_stream("ORDO_SNAPSHOTS").await.is_err());
    // Nor create a consumer anywhere: the server would deliver the stream's messages to its
    // deliver subject, here A1's event subject, without asking whether the API may publish there.
    let stock_before = system.stored("ORDO_STOCK", "ordo.stock.events.A1").await;
    for stream in ["KV_ordo_partitions", "ORDO_ORDERS"] {
        let push = json!({"deliver_subject": "ordo.stock.events.A1", "ack_policy": "none"});
        consumer_request_is_refused(&api, stream, push.clone()).await;
        let named = json!({"name": "forged", "deliver_subject": "ordo.stock.events.A1",
                           "ack_policy": "none", "filter_subject": ">"});
        let answer = api
            .send_request(
                format!("$JS.API.CONSUMER.CREATE.{stream}.forged.>"),
                async_nats::Request::new()
                    .payload(
                        json!({"stream_name": stream, "config": named})
                            .to_string()
                            .into(),
                    )
                    .timeout(Some(Duration::from_secs(3))),
            )
            .await;
        assert!(
            answer.is_err()
                || serde_json::from_slice::<Value>(&answer.as_ref().unwrap().payload)
                    .map_or(true, |answer| answer.get("error").is_some()),
            "{stream}: {answer:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        system.stored("ORDO_STOCK", "ordo.stock.events.A1").await,
        stock_before,
        "a consumer of the API's delivered into ORDO_STOCK"
    );
    // A command forwarded to a partition's owner is trusted as the command service's own (its
    // `Nats-Request-Info` is not checked again): only that user may send one. A leaked saga
    // password, which may send internal commands, cannot, even to the real owner.
    let partition = ordo_eventstore::partition_of("A1", 16);
    let owner = system
        .admin()
        .get_key_value(ordo_eventstore::ownership::BUCKET)
        .await
        .unwrap()
        .get(format!("commands.owners.{partition}"))
        .await
        .unwrap()
        .map(|owner| String::from_utf8(owner.to_vec()).unwrap())
        .expect("A1's partition has an owner");
    let forged = System::request(
        &system.connect("ordo-saga").await,
        &format!("ordo.partition.{partition}.{owner}.stock.receive"),
        &json!({"sku": "A1", "qty": 1000}),
        HeaderMap::new(),
    )
    .await;
    assert!(
        forged.is_err(),
        "the saga's user forwarded a command: {forged:?}"
    );
    let a1 = system.stored("ORDO_STOCK", "ordo.stock.events.A1").await;
    assert!(
        a1.iter().all(|event| event["data"]["qty"] != 1000),
        "the forged receive was stored: {a1:?}"
    );
    // The command service's user cannot delete or purge a stream, even one that allows it.
    let commands = refused_soon(system.connect("ordo-commands").await);
    assert!(commands.delete_stream("ORDO_SNAPSHOTS").await.is_err());
    let purged = match commands.get_stream("ORDO_SNAPSHOTS").await {
        Ok(snapshots) => snapshots.purge().await.is_ok(),
        Err(_) => false,
    };
    assert!(!purged, "the command service's user purged ORDO_SNAPSHOTS");
    // The projector's user cannot delete the notifier's consumer, nor take its deliveries.
    let projector_client = system.connect("ordo-projector").await;
    let projector = refused_soon(projector_client.clone());
    assert!(
        projector
            .delete_consumer_from_stream(
                ConsumerId::Notifier.name(),
                ConsumerId::Notifier.stream().name()
            )
            .await
            .is_err()
    );
    // Any answer (a message, or JetStream's "no messages") would mean the pull went through.
    let pulled = projector_client
        .send_request(
            format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                ConsumerId::Notifier.stream().name(),
                ConsumerId::Notifier
            ),
            async_nats::Request::new()
                .payload(json!({"batch": 1, "no_wait": true}).to_string().into())
                .timeout(Some(Duration::from_secs(3))),
        )
        .await;
    assert!(
        pulled.is_err(),
        "the projector's user pulled the notifier's deliveries: {pulled:?}"
    );
    // Nor change the notifier's consumer with a consumer request (one that names the consumer in its
    // body, sent where a consumer of any name is created), nor create one of its own.
    let stream = ConsumerId::Notifier.stream().name();
    for config in [
        json!({"name": ConsumerId::Notifier.name(), "filter_subject": "ordo.order.events.none",
               "ack_policy": "explicit", "deliver_policy": "all"}),
        json!({"durable_name": "ordo-stolen", "ack_policy": "explicit", "deliver_policy": "all"}),
    ] {
        consumer_request_is_refused(&projector_client, stream, config).await;
    }
    // The saga's coordinators read by sequence too: their user cannot change the notifier's
    // consumer either.
    consumer_request_is_refused(
        &system.connect("ordo-saga").await,
        stream,
        json!({"name": ConsumerId::Notifier.name(), "filter_subject": "ordo.order.events.none",
               "ack_policy": "explicit", "deliver_policy": "all"}),
    )
    .await;
    // Nor take or forge the command service's partition leases (only its views' groups, not
    // the saga's either).
    let leases = refused_soon(projector_client.clone())
        .get_key_value("ordo_partitions")
        .await
        .unwrap();
    assert!(
        leases
            .put("commands.owners.0", "forged".into())
            .await
            .is_err(),
        "the projector's user wrote a command-service lease"
    );
    let owner = system
        .admin()
        .get_key_value("ordo_partitions")
        .await
        .unwrap()
        .get("commands.owners.0")
        .await
        .unwrap();
    assert_ne!(owner.as_deref(), Some(&b"forged"[..]));
    assert!(
        leases.put("saga.owners.0", "forged".into()).await.is_err(),
        "the projector's user wrote a saga intake lease"
    );
    let notifier_filter = system
        .admin()
        .get_stream(stream)
        .await
        .unwrap()
        .consumer_info(ConsumerId::Notifier.name())
        .await
        .unwrap()
        .config
        .filter_subject;
    assert_eq!(
        notifier_filter, "",
        "the notifier's consumer still reads every order event"
    );
    assert_eq!(system.message_count("ORDO_SNAPSHOTS").await, 0);
    assert!(
        System::request(
            &system.connect("ordo-projector").await,
            Endpoint::OrderCancel.subject(),
            &json!({"order_id": "real"}),
            HeaderMap::new()
        )
        .await
        .is_err()
    );
    assert_eq!(
        system
            .stored("ORDO_STOCK", "ordo.stock.events.A1")
            .await
            .len(),
        2,
        "receipt and real's reservation"
    );
    system.components_were_refused_nothing();
}

#[tokio::test]
async fn an_application_reads_only_its_own_replies_and_notifications() {
    let system = System::start().await;
    let (shop, warehouse) = (
        system.connect("shop").await,
        system.connect("warehouse").await,
    );

    // Attack: subscribe to everything a user may name, while the system works.
    let spy = system.connect("shop").await;
    // `_INBOX.>` is what every NATS client reads its replies on, and what ordo's processes
    // used too: under one account it showed everything they fetched.
    let mut seen_by_shop = spy.subscribe("_INBOX.>").await.unwrap();
    let warehouse_spy = system.connect("warehouse").await;
    let mut seen_by_warehouse = warehouse_spy.subscribe("_INBOX.>").await.unwrap();
    spy.flush().await.unwrap();
    warehouse_spy.flush().await.unwrap();

    system
        .answered(
            &warehouse,
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 5}),
        )
        .await;
    let placed = system
        .answered(
            &shop,
            Endpoint::OrderPlace.subject(),
            json!({"order_id": "o-1", "customer_id": "c1",
                         "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}]}),
        )
        .await;
    assert_eq!(placed["ok"], true);
    system.settled("o-1", "confirmed").await;
    // Attack: the JetStream API of ordo's account, from an application.
    let js = jetstream::new(shop.clone());
    assert!(js.get_stream("ORDO_ORDERS").await.is_err());

    // What each spy saw, up to the reply to a last request of its own: the server writes to a
    // connection in the order it routes, so whatever it routed to the spy before is there.
    async fn seen_up_to_a_last_reply(
        spy: &async_nats::Client,
        seen: &mut async_nats::Subscriber,
        subject: &str,
        body: Value,
        marker: &str,
    ) -> Vec<String> {
        spy.request(subject.to_owned(), body.to_string().into())
            .await
            .unwrap();
        let mut payloads = Vec::new();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), seen.next())
                .await
                .expect("the spy sees its own last reply")
                .unwrap();
            let payload = String::from_utf8_lossy(&message.payload).into_owned();
            let last = payload.contains(marker);
            payloads.push(payload);
            if last {
                return payloads;
            }
        }
    }
    // The shop's inbox holds the shop's replies: an order's, none of the warehouse's (which
    // name a sku), no event, outcome record or consumer delivery.
    let shop_saw = seen_up_to_a_last_reply(
        &spy,
        &mut seen_by_shop,
        Endpoint::OrderPlace.subject(),
        json!({"order_id": "last-of-the-shop", "customer_id": "c9",
               "lines": [{"sku": "A1", "qty": 1, "unit_price_cents": 1}]}),
        "last-of-the-shop",
    )
    .await;
    assert!(!shop_saw.is_empty(), "the shop's own reply is there");
    for payload in &shop_saw {
        assert!(
            payload.contains("\"order_id\""),
            "not the shop's: {payload}"
        );
        assert!(!payload.contains("\"type\""), "an event: {payload}");
    }
    let warehouse_saw = seen_up_to_a_last_reply(
        &warehouse_spy,
        &mut seen_by_warehouse,
        Endpoint::StockReceive.subject(),
        json!({"sku": "LAST-OF-THE-WAREHOUSE", "qty": 1}),
        "LAST-OF-THE-WAREHOUSE",
    )
    .await;
    assert!(
        !warehouse_saw.is_empty(),
        "the warehouse's own reply is there"
    );
    for payload in &warehouse_saw {
        assert!(
            payload.contains("\"sku\""),
            "not the warehouse's: {payload}"
        );
    }
    system.components_were_refused_nothing();
}

#[tokio::test]
async fn no_application_can_take_or_predict_another_s_command_ids() {
    let system = System::start().await;
    let (shop, warehouse) = (
        system.connect("shop").await,
        system.connect("warehouse").await,
    );
    system
        .answered(
            &warehouse,
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 10}),
        )
        .await;

    // Attack: a refusal stored under the id the saga will give victim-1's reservation.
    let predicted = System::request(
        &shop,
        Endpoint::OrderCancel.subject(),
        &json!({"order_id": "nope"}),
        with_id("saga:victim-1:reserve:A1"),
    )
    .await
    .unwrap();
    assert_eq!(predicted["error"]["code"], "invalid_command", "{predicted}");
    // Attack: a refusal stored under an id the warehouse will use.
    let taken = System::request(
        &shop,
        Endpoint::OrderCancel.subject(),
        &json!({"order_id": "nope"}),
        with_id("delivery-7"),
    )
    .await
    .unwrap();
    assert_eq!(taken["error"]["code"], "not_found", "{taken}");

    let victim = System::request(&shop, Endpoint::OrderPlace.subject(),
                                 &json!({"order_id": "victim-1", "customer_id": "c1",
                                         "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}]}),
                                 HeaderMap::new()).await.unwrap();
    assert_eq!(victim["ok"], true, "{victim}");
    system.settled("victim-1", "confirmed").await;
    let delivery = System::request(
        &warehouse,
        Endpoint::StockReceive.subject(),
        &json!({"sku": "A1", "qty": 3}),
        with_id("delivery-7"),
    )
    .await
    .unwrap();
    assert_eq!(
        delivery["ok"], true,
        "the warehouse's id is its own: {delivery}"
    );
    // Its repeat still gets its first outcome, and the event says whose command it was.
    let repeat = System::request(
        &warehouse,
        Endpoint::StockReceive.subject(),
        &json!({"sku": "A1", "qty": 3}),
        with_id("delivery-7"),
    )
    .await
    .unwrap();
    assert_eq!(repeat, delivery);
    let a1 = system.stored("ORDO_STOCK", "ordo.stock.events.A1").await;
    let received: Vec<&Value> = a1
        .iter()
        .filter(|event| event["type"] == "StockReceived")
        .collect();
    assert_eq!(received.len(), 2, "{a1:?}");
    assert_eq!(received[1]["command_id"], "WAREHOUSE/delivery-7");
    // Read once the view holds the delivery (it may lag behind the stream).
    let stock = system
        .read(&format!("/stock/A1?min_seq={}", delivery["seq"]))
        .await;
    assert_eq!(stock["on_hand"], 13, "{stock}");
    system.components_were_refused_nothing();
}

/// The event streams are the record of what happened: only the command service may append to
/// them, and nobody but the operator may reach the JetStream API of account `ORDO` beyond what
/// each component reads. Attackers: both applications (accounts of their own) and every ordo
/// user whose password could leak.
#[tokio::test]
async fn only_the_command_service_appends_events_and_no_application_reaches_the_jetstream_api() {
    let server = NatsServer::start_with_config(&accounts_config());
    let output = Command::new(ORDO)
        .args(["streams", "apply"])
        .env("ORDO_NATS_URL", server.url())
        .env("ORDO_NATS_USER", "ordo-admin")
        .env("ORDO_NATS_PASSWORD", password("ordo-admin"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ordo streams apply: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A JetStream publish and an API call are both requests: a reply without an error is a write
    // that went through (a publish acknowledgement, a stream deleted, a consumer created).
    async fn went_through(client: &async_nats::Client, subject: &str, body: &str) -> Option<Value> {
        let request = async_nats::Request::new()
            .payload(body.to_owned().into())
            .timeout(Some(Duration::from_secs(2)));
        let reply = client
            .send_request(subject.to_owned(), request)
            .await
            .ok()?;
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
        (reply.get("error").is_none()).then_some(reply)
    }
    let event = r#"{"forged":true}"#;
    // The check itself sees a write: the command service's user may append.
    let commands = connect_as(&server.url(), "ordo-commands").await;
    let control = went_through(&commands, "ordo.stock.events.CONTROL", event).await;
    assert!(control.is_some(), "the command service could not append");

    let consumer = json!({"stream_name": "ORDO_ORDERS",
                          "config": {"durable_name": "thief", "ack_policy": "none"}})
    .to_string();
    let api_calls = [
        ("$JS.API.STREAM.NAMES", String::new()),
        ("$JS.API.STREAM.DELETE.ORDO_ORDERS", String::new()),
        ("$JS.API.STREAM.PURGE.ORDO_STOCK", String::new()),
        (
            "$JS.API.STREAM.MSG.DELETE.ORDO_STOCK",
            json!({"seq": 1}).to_string(),
        ),
        ("$JS.API.CONSUMER.CREATE.ORDO_ORDERS.thief", consumer),
    ];
    let mut attempts = Vec::new();
    for (user, _) in shipped::USERS {
        if user == "ordo-commands" {
            continue;
        }
        let client = connect_as(&server.url(), user).await;
        for subject in ["ordo.order.events.forged", "ordo.stock.events.forged"] {
            attempts.push((user, client.clone(), subject, event.to_owned()));
        }
        // The operator manages the streams: that is its job.
        if user != "ordo-admin" {
            for (subject, body) in &api_calls {
                attempts.push((user, client.clone(), subject, body.clone()));
            }
        }
    }
    let outcomes = futures::future::join_all(
        attempts
            .iter()
            .map(|(_, client, subject, body)| went_through(client, subject, body)),
    )
    .await;
    for ((user, _, subject, _), outcome) in attempts.iter().zip(outcomes) {
        assert_eq!(outcome, None, "{user} went through on {subject}");
    }
    // And the streams are as they were: the control event alone, no consumer but none.
    let admin = jetstream::new(connect_as(&server.url(), "ordo-admin").await);
    for (stream, messages) in [("ORDO_ORDERS", 0), ("ORDO_STOCK", 1)] {
        let mut stream = admin.get_stream(stream).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.state.messages, messages, "{}", info.config.name);
        assert_eq!(info.state.consumer_count, 0, "{}", info.config.name);
    }
}

/// Asserts that `client`'s consumer request on `stream` (sent where a consumer of any name is
/// created, naming it in its body) is refused: no answer, or JetStream's error.
async fn consumer_request_is_refused(client: &async_nats::Client, stream: &str, config: Value) {
    let body = json!({"stream_name": stream, "config": config}).to_string();
    let answer = client
        .send_request(
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(Duration::from_secs(3))),
        )
        .await;
    let refused = match &answer {
        Err(_) => true,
        Ok(answer) => serde_json::from_slice::<Value>(&answer.payload)
            .map(|answer| answer.get("error").is_some())
            .unwrap_or(true),
    };
    assert!(refused, "{config}: {answer:?}");
}

/// The operator's user in the system account reads the servers' reports (what `nats server
/// report jetstream` asks) and can do nothing else there: no kick, no reload.
#[tokio::test]
async fn the_operator_reads_the_servers_reports_and_can_neither_kick_nor_reload() {
    let server = NatsServer::start_with_config(&accounts_config());
    // The server's word on what it refused, so that a refusal is told from a subject nobody
    // answers.
    let refusals = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let heard = refusals.clone();
    let operator = async_nats::ConnectOptions::with_user_and_password(
        "ordo-operator".into(),
        password("ordo-operator"),
    )
    .custom_inbox_prefix(inbox_prefix("ordo-operator"))
    .event_callback(move |event| {
        let heard = heard.clone();
        async move {
            if let async_nats::Event::ServerError(err) = event {
                heard.lock().unwrap().push(err.to_string());
            }
        }
    })
    .connect(server.url())
    .await
    .unwrap();
    let report = operator
        .request("$SYS.REQ.SERVER.PING.JSZ", "{}".into())
        .await
        .expect("the operator reads the JetStream report");
    let report: Value = serde_json::from_slice(&report.payload).unwrap();
    assert!(report["data"].is_object(), "{report}");
    let server_id = report["server"]["id"].as_str().unwrap().to_owned();
    for verb in ["KICK", "RELOAD", "LDM"] {
        let answer = operator
            .send_request(
                format!("$SYS.REQ.SERVER.{server_id}.{verb}"),
                async_nats::Request::new()
                    .payload(json!({"cid": 1}).to_string().into())
                    .timeout(Some(Duration::from_secs(2))),
            )
            .await;
        assert!(answer.is_err(), "{verb} went through: {answer:?}");
        let refused = refusals.lock().unwrap().iter().any(|refusal| {
            refusal.contains("Permissions Violation") && refusal.contains(&format!(".{verb}"))
        });
        assert!(
            refused,
            "{verb}: no permissions violation, only {refusals:?}"
        );
    }
}
