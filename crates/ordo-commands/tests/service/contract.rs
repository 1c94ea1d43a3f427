//! The wire contract of every command subject, as a client sees it.

use ordo_contract::Endpoint;
use serde_json::json;

use crate::support::{Engine, line, outcome};

#[tokio::test]
async fn receiving_stock_creates_the_sku_and_replies_with_version_and_sequence() {
    let engine = Engine::start().await;
    let first = engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    assert_eq!(
        first,
        json!({"ok": true, "sku": "A1", "version": 1, "seq": 1})
    );
    let second = engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 3}))
        .await;
    assert_eq!(
        second,
        json!({"ok": true, "sku": "A1", "version": 2, "seq": 2})
    );
}

#[tokio::test]
async fn placing_an_order_without_an_id_returns_the_generated_id() {
    let engine = Engine::start().await;
    let reply = engine
        .request(
            Endpoint::OrderPlace,
            json!({"customer_id": "c1", "lines": [line("A1", 2, 500)]}),
        )
        .await;
    assert_eq!(outcome(&reply), "ok", "{reply}");
    let order_id = reply["order_id"].as_str().unwrap();
    assert!(ordo_domain::OrderId::parse(order_id).is_ok(), "{order_id}");
    let stored = engine
        .stored(ordo_eventstore::StreamId::Orders.name())
        .await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].subject, format!("ordo.order.events.{order_id}"));
}

#[tokio::test]
async fn an_event_is_stored_in_the_envelope_with_its_headers() {
    let engine = Engine::start().await;
    let reply = engine
        .request_with_id(
            Endpoint::OrderPlace,
            json!({"order_id": "o-1", "customer_id": "c1", "lines": [line("A1", 2, 500), line("B2", 1, 250)]}),
            "cmd-42",
        )
        .await;
    assert_eq!(
        reply,
        json!({"ok": true, "order_id": "o-1", "version": 1, "seq": 1})
    );

    let stored = engine
        .stored(ordo_eventstore::StreamId::Orders.name())
        .await;
    let event = &stored[0];
    assert_eq!(event.subject, "ordo.order.events.o-1");
    assert_eq!(event.headers.get("Nats-Msg-Id").unwrap().as_str(), "cmd-42");
    assert_eq!(
        event.headers.get("Ordo-Event-Type").unwrap().as_str(),
        "OrderPlaced"
    );
    assert!(
        event
            .headers
            .get("traceparent")
            .unwrap()
            .as_str()
            .starts_with("00-")
    );
    let envelope = &event.envelope;
    assert_eq!(
        (
            envelope.event_type.as_str(),
            envelope.schema,
            envelope.aggregate_id.as_str(),
            envelope.version
        ),
        ("OrderPlaced", 1, "o-1", 1)
    );
    assert_eq!(
        (
            envelope.command_id.as_str(),
            envelope.correlation_id.as_str()
        ),
        ("cmd-42", "cmd-42")
    );
    assert_eq!(
        envelope.data,
        json!({
            "customer_id": "c1",
            "lines": [
                {"sku": "A1", "qty": 2, "unit_price_cents": 500},
                {"sku": "B2", "qty": 1, "unit_price_cents": 250}
            ],
            "currency": "USD",
            "total_cents": 1250
        })
    );
}

#[tokio::test]
async fn the_event_carries_the_causation_the_caller_sent_and_continues_its_trace() {
    let engine = Engine::start().await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    headers.insert("Ordo-Correlation-Id", "order-o-9");
    headers.insert("Ordo-Causation-Id", "event-123");
    let body = serde_json::to_vec(&json!({"sku": "A1", "qty": 1})).unwrap();
    let reply = engine
        .try_request_with_headers(
            Endpoint::StockReceive.subject(),
            body,
            headers,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&reply), "ok");
    let stored = engine.stored(ordo_eventstore::StreamId::Stock.name()).await;
    let event = &stored[0];
    let traceparent = event.headers.get("traceparent").unwrap().as_str();
    assert!(
        traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("b7ad6b7169203331"),
        "the event is a new span: {traceparent}"
    );
    assert_eq!(event.envelope.correlation_id, "order-o-9");
    assert_eq!(event.envelope.causation_id.as_deref(), Some("event-123"));
}

#[tokio::test]
async fn an_order_moves_through_its_states_by_subject() {
    let engine = Engine::start().await;
    let place = json!({"order_id": "o-1", "customer_id": "c1", "lines": [line("A1", 1, 100)]});
    assert_eq!(
        outcome(&engine.request(Endpoint::OrderPlace, place).await),
        "ok"
    );
    let ship_early = engine
        .request(Endpoint::OrderShip, json!({"order_id": "o-1"}))
        .await;
    assert_eq!(
        ship_early,
        json!({"ok": false, "error": {"code": "invalid_state", "message": "order o-1 is pending and cannot be shipped"}})
    );
    let confirmed = engine
        .request(Endpoint::OrderConfirm, json!({"order_id": "o-1"}))
        .await;
    assert_eq!(
        confirmed,
        json!({"ok": true, "order_id": "o-1", "version": 2, "seq": 2})
    );
    let shipped = engine
        .request(Endpoint::OrderShip, json!({"order_id": "o-1"}))
        .await;
    assert_eq!(shipped["version"], 3);
    let cancel_late = engine
        .request(Endpoint::OrderCancel, json!({"order_id": "o-1"}))
        .await;
    assert_eq!(outcome(&cancel_late), "invalid_state");

    let place = json!({"order_id": "o-2", "customer_id": "c1", "lines": [line("A1", 1, 100)]});
    engine.request(Endpoint::OrderPlace, place).await;
    let rejected = engine
        .request(
            Endpoint::OrderReject,
            json!({"order_id": "o-2", "reason": "insufficient_stock"}),
        )
        .await;
    assert_eq!(outcome(&rejected), "ok");
    let types: Vec<String> = engine
        .stored(ordo_eventstore::StreamId::Orders.name())
        .await
        .into_iter()
        .map(|event| {
            format!(
                "{}:{}",
                event.envelope.aggregate_id, event.envelope.event_type
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            "o-1:OrderPlaced",
            "o-1:OrderConfirmed",
            "o-1:OrderShipped",
            "o-2:OrderPlaced",
            "o-2:OrderRejected"
        ]
    );
}

#[tokio::test]
async fn commands_on_unknown_aggregates_are_not_found() {
    let engine = Engine::start().await;
    let ship = engine
        .request(Endpoint::OrderShip, json!({"order_id": "nope"}))
        .await;
    assert_eq!(
        ship,
        json!({"ok": false, "error": {"code": "not_found", "message": "order nope does not exist"}})
    );
    let reserve = engine
        .request(
            Endpoint::StockReserve,
            json!({"sku": "nope", "order_id": "o-1", "qty": 1}),
        )
        .await;
    assert_eq!(outcome(&reserve), "not_found");
    assert_eq!(engine.event_counts().await, (0, 0));
}

#[tokio::test]
async fn reserve_release_and_deduct_move_reserved_and_on_hand() {
    let engine = Engine::start().await;
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    let reserve = |order: &str, qty: i64| json!({"sku": "A1", "order_id": order, "qty": qty});
    assert_eq!(
        outcome(
            &engine
                .request(Endpoint::StockReserve, reserve("o-1", 2))
                .await
        ),
        "ok"
    );
    assert_eq!(
        outcome(
            &engine
                .request(Endpoint::StockReserve, reserve("o-2", 3))
                .await
        ),
        "ok"
    );
    let too_much = engine
        .request(Endpoint::StockReserve, reserve("o-3", 1))
        .await;
    assert_eq!(
        too_much,
        json!({"ok": false, "error": {"code": "insufficient_stock",
            "message": "insufficient stock for A1: requested 1, available 0"}})
    );
    let release = engine
        .request(
            Endpoint::StockRelease,
            json!({"sku": "A1", "order_id": "o-1"}),
        )
        .await;
    assert_eq!(outcome(&release), "ok");
    let deduct = engine
        .request(
            Endpoint::StockDeduct,
            json!({"sku": "A1", "order_id": "o-2"}),
        )
        .await;
    assert_eq!(outcome(&deduct), "ok");
    let data: Vec<String> = engine
        .stored(ordo_eventstore::StreamId::Stock.name())
        .await
        .into_iter()
        .map(|event| format!("{} {}", event.envelope.event_type, event.envelope.data))
        .collect();
    assert_eq!(
        data,
        [
            r#"StockReceived {"qty":5}"#,
            r#"StockReserved {"order_id":"o-1","qty":2}"#,
            r#"StockReserved {"order_id":"o-2","qty":3}"#,
            r#"StockReleased {"order_id":"o-1","qty":2}"#,
            r#"StockDeducted {"order_id":"o-2","qty":3}"#,
        ]
    );
}

#[tokio::test]
async fn bad_input_is_an_invalid_command_and_appends_nothing() {
    let engine = Engine::start().await;
    let oversized = format!(
        r#"{{"sku":"A1","qty":1,"pad":"{}"}}"#,
        "x".repeat(64 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (Endpoint::StockReceive.subject(), b"{\"sku\": \"A1\", \"qty\":".to_vec(), "the body is not valid JSON"),
        (Endpoint::StockReceive.subject(), b"\"A1\"".to_vec(), "the body must be a JSON object"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A1","qty":1,"extra":true}"#.to_vec(), "unknown field `extra`"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A1"}"#.to_vec(), "missing field `qty`"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A1","qty":0}"#.to_vec(), "qty: must be greater than 0"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A1","qty":-1}"#.to_vec(), "qty: must be greater than 0"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A1","qty":"5"}"#.to_vec(), "invalid type"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A.1","qty":1}"#.to_vec(), "sku \"A.1\" is not a valid id"),
        (Endpoint::StockReceive.subject(), br#"{"sku":"A*","qty":1}"#.to_vec(), "is not a valid id"),
        (Endpoint::StockReceive.subject(), oversized.into_bytes(), "the limit is 65536"),
        (Endpoint::OrderPlace.subject(), br#"{"customer_id":"c1","lines":[]}"#.to_vec(), "at least one line"),
        (
            Endpoint::OrderPlace.subject(),
            br#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":1}],"currency":"usd"}"#.to_vec(),
            "currency \"usd\" is not a valid id",
        ),
        (Endpoint::OrderCancel.subject(), br#"{"order_id":"o 1"}"#.to_vec(), "is not a valid id"),
        (Endpoint::OrderShip.subject(), br#"{"order_id":"o-1","command_id":5}"#.to_vec(), "command_id must be a string"),
    ];
    for (subject, body, expected) in cases {
        let reply = engine.request_bytes(subject, body, None).await;
        assert_eq!(outcome(&reply), "invalid_command", "{subject}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(expected),
            "{subject}: {message:?} should say {expected:?}"
        );
    }
    assert_eq!(engine.event_counts().await, (0, 0));
    assert_eq!(
        engine.message_count("ORDO_COMMAND_OUTCOMES").await,
        0,
        "without a command id, a refusal is not remembered"
    );
}

#[tokio::test]
async fn the_service_is_visible_to_nats_micro_tooling() {
    let engine = Engine::start().await;
    let info = engine
        .client
        .request("$SRV.INFO.ordo", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["name"], "ordo");
    let mut subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|endpoint| endpoint["subject"].as_str().unwrap())
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            Endpoint::OrderCancel.subject(),
            Endpoint::OrderPlace.subject(),
            Endpoint::OrderShip.subject(),
            Endpoint::StockReceive.subject(),
            Endpoint::OrderConfirm.subject(),
            Endpoint::OrderReject.subject(),
            Endpoint::StockDeduct.subject(),
            Endpoint::StockRelease.subject(),
            Endpoint::StockReserve.subject(),
        ]
    );
    // Each endpoint says whether it is internal, and carries the JSON Schemas of its request
    // and reply (strings, as ADR-32's metadata is).
    for endpoint in info["endpoints"].as_array().unwrap() {
        let subject = endpoint["subject"].as_str().unwrap();
        let known = Endpoint::ALL
            .into_iter()
            .find(|known| known.subject() == subject)
            .unwrap();
        let metadata = &endpoint["metadata"];
        assert_eq!(
            metadata["internal"],
            known.is_internal().to_string(),
            "{subject}"
        );
        let request: serde_json::Value =
            serde_json::from_str(metadata["request_schema"].as_str().unwrap()).unwrap();
        assert_eq!(request["x-ordo-subject"], subject);
        let reply: serde_json::Value =
            serde_json::from_str(metadata["reply_schema"].as_str().unwrap()).unwrap();
        assert_eq!(reply["title"], "Reply");
    }
    let ping = engine
        .client
        .request("$SRV.PING.ordo", "".into())
        .await
        .unwrap();
    assert!(!ping.payload.is_empty());
}

#[tokio::test]
async fn error_replies_keep_their_json_body_carry_the_service_error_headers_and_count_as_errors() {
    let engine = Engine::start().await;
    for _ in 0..5 {
        let reply = engine
            .client
            .request(Endpoint::OrderPlace.subject(), "{not json".into())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(body["ok"], false);
        assert_eq!(body["error"]["code"], "invalid_command");
        let headers = reply.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            "400"
        );
        assert!(
            headers
                .get("Nats-Service-Error")
                .unwrap()
                .as_str()
                .starts_with("invalid_command: "),
            "{headers:?}"
        );
    }
    let accepted = engine
        .client
        .request(
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 5}).to_string().into(),
        )
        .await
        .unwrap();
    assert!(
        accepted
            .headers
            .is_none_or(|headers| headers.get("Nats-Service-Error").is_none()),
        "a success carries no error header"
    );

    let stats = engine
        .client
        .request("$SRV.STATS.ordo", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    let endpoint = |name: &str| {
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|endpoint| endpoint["name"] == name)
            .cloned()
            .unwrap()
    };
    let place = endpoint("order-place");
    assert_eq!(
        (place["num_requests"].as_u64(), place["num_errors"].as_u64()),
        (Some(5), Some(5))
    );
    assert!(
        place["last_error"]
            .as_str()
            .unwrap()
            .starts_with("invalid_command: ")
    );
    let receive = endpoint("stock-receive");
    assert_eq!(
        (
            receive["num_requests"].as_u64(),
            receive["num_errors"].as_u64()
        ),
        (Some(1), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_requests_are_all_invalid_command_append_nothing_and_leave_it_healthy()
{
    use futures::StreamExt;
    use ordo_contract::hostile;
    use rand::{SeedableRng, rngs::StdRng};

    let engine = Engine::start().await;
    let mut rng = StdRng::seed_from_u64(0x0bad_cafe);
    let requests: Vec<hostile::Hostile> = (0..10_000)
        .map(|i| hostile::generate(Endpoint::ALL[i % Endpoint::ALL.len()], &mut rng))
        .collect();
    let engine = &engine;
    let wrong: Vec<String> = futures::stream::iter(&requests)
        .map(|hostile| async move {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = &hostile.command_id {
                headers.insert("Nats-Msg-Id", id.as_str());
            }
            let reply = engine
                .try_request_with_headers(
                    hostile.endpoint.subject(),
                    hostile.body.clone(),
                    headers,
                    std::time::Duration::from_secs(10),
                )
                .await;
            match reply {
                Ok(reply) if outcome(&reply) == "invalid_command" => None,
                other => Some(format!(
                    "{} on {}: {other:?} for {:?}",
                    hostile.kind,
                    hostile.endpoint.subject(),
                    String::from_utf8_lossy(&hostile.body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                )),
            }
        })
        .buffer_unordered(64)
        .filter_map(|wrong| async move { wrong })
        .collect()
        .await;
    assert!(
        wrong.is_empty(),
        "{} not refused as invalid_command, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    assert_eq!(engine.event_counts().await, (0, 0), "nothing appended");
    // Still healthy: a good command goes through.
    let reply = engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    assert_eq!(outcome(&reply), "ok");
}

/// Every text an accepted command carries is one every view and table can hold: PostgreSQL's
/// `text` and `jsonb` refuse U+0000, so whatever a client writes in a reason, the command is
/// refused as invalid or the reason goes through PostgreSQL unchanged.
#[tokio::test]
async fn every_reason_a_command_is_accepted_with_round_trips_through_postgresql() {
    use ordo_commands::intake::{Caller, Command, parse};
    use ordo_domain::order::OrderCommand;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    let database = ordo_testkit::TestDatabase::create().await;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..3000 {
        let reason: String = (0..rng.random_range(0..12))
            .map(|_| {
                if rng.random_bool(0.05) {
                    '\0'
                } else {
                    rng.random::<char>()
                }
            })
            .collect();
        for endpoint in [Endpoint::OrderCancel, Endpoint::OrderReject] {
            let body = serde_json::to_vec(&json!({"order_id": "o-1", "reason": reason})).unwrap();
            let Ok(parsed) = parse(endpoint, &body, None, &Caller::OwnAccount) else {
                refused += 1;
                continue;
            };
            accepted += 1;
            let carried = match parsed.command {
                Command::Order(OrderCommand::Cancel { reason, .. }) => reason.unwrap_or_default(),
                Command::Order(OrderCommand::Reject { reason, .. }) => reason,
                other => panic!("{other:?}"),
            };
            let (text, in_jsonb): (String, String) = sqlx::query_as(
                "SELECT $1::text, jsonb_build_object('reason', $1::text) ->> 'reason'",
            )
            .bind(&carried)
            .fetch_one(database.pool())
            .await
            .unwrap_or_else(|err| {
                panic!("{carried:?} was accepted but PostgreSQL refuses it: {err}")
            });
            assert_eq!(
                (text.as_str(), in_jsonb.as_str()),
                (carried.as_str(), carried.as_str())
            );
        }
    }
    // Both sides of the property were exercised.
    assert!(
        accepted > 1000 && refused > 500,
        "accepted {accepted}, refused {refused}"
    );
}

/// A reason is at most 1 KiB of UTF-8 (bytes, not characters), on both commands that carry one.
#[tokio::test]
async fn a_reason_over_one_kib_is_refused_and_one_at_the_limit_is_kept_whole() {
    let engine = Engine::start().await;
    for order_id in ["o-1", "o-2"] {
        let placed = engine
            .request(
                Endpoint::OrderPlace,
                json!({"order_id": order_id, "customer_id": "c1", "lines": [line("A1", 1, 5)]}),
            )
            .await;
        assert_eq!(outcome(&placed), "ok", "{placed}");
    }
    // 1,025 bytes; and 513 characters of 2 bytes, 1,026 bytes.
    for reason in ["x".repeat(1025), "é".repeat(513)] {
        for endpoint in [Endpoint::OrderCancel, Endpoint::OrderReject] {
            let reply = engine
                .request(endpoint, json!({"order_id": "o-1", "reason": reason}))
                .await;
            assert_eq!(outcome(&reply), "invalid_command", "{endpoint:?}: {reply}");
            assert!(
                reply["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("the limit is 1024"),
                "{reply}"
            );
        }
    }
    assert_eq!(engine.event_counts().await, (2, 0), "nothing appended");
    let cancel = engine
        .request(
            Endpoint::OrderCancel,
            json!({"order_id": "o-1", "reason": "x".repeat(1024)}),
        )
        .await;
    assert_eq!(outcome(&cancel), "ok", "{cancel}");
    let reject = engine
        .request(
            Endpoint::OrderReject,
            json!({"order_id": "o-2", "reason": "é".repeat(512)}),
        )
        .await;
    assert_eq!(outcome(&reject), "ok", "{reject}");
    let stored = engine.stored("ORDO_ORDERS").await;
    let reason_of = |event_type: &str| {
        stored
            .iter()
            .find(|event| event.envelope.event_type == event_type)
            .map(|event| event.envelope.data["reason"].clone())
    };
    assert_eq!(reason_of("OrderCancelled"), Some(json!("x".repeat(1024))));
    assert_eq!(reason_of("OrderRejected"), Some(json!("é".repeat(512))));
}

/// A line's quantity is a u32: one past it is refused (not cut to fit), u32::MAX is placed; stock
/// quantities are not lines and go further.
#[tokio::test]
async fn a_line_qty_past_u32_is_refused_and_u32_max_is_placed() {
    let engine = Engine::start().await;
    let over = engine
        .request(
            Endpoint::OrderPlace,
            json!({"order_id": "o-1", "customer_id": "c1",
                   "lines": [line("A1", 1, 1), line("B2", i64::from(u32::MAX) + 1, 1)]}),
        )
        .await;
    assert_eq!(outcome(&over), "invalid_command", "{over}");
    assert!(
        over["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lines[1].qty: 4294967296 is too large"),
        "{over}"
    );
    assert_eq!(engine.event_counts().await, (0, 0));
    let at = engine
        .request(
            Endpoint::OrderPlace,
            json!({"order_id": "o-2", "customer_id": "c1",
                   "lines": [line("A1", i64::from(u32::MAX), 1)]}),
        )
        .await;
    assert_eq!(outcome(&at), "ok", "{at}");
    let stored = engine.stored("ORDO_ORDERS").await;
    assert_eq!(stored[0].envelope.data["lines"][0]["qty"], json!(u32::MAX));
    let received = engine
        .request(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": u64::from(u32::MAX) + 1}),
        )
        .await;
    assert_eq!(outcome(&received), "ok", "{received}");
}

/// An order has 1 to 100 lines: 100 (of the longest SKUs) are placed, 101 are refused.
#[tokio::test]
async fn an_order_of_100_lines_is_placed_and_one_of_101_is_refused() {
    let engine = Engine::start().await;
    let lines = |count: usize| -> Vec<serde_json::Value> {
        (0..count)
            .map(|i| line(&format!("{i:0>64}"), 1, 1))
            .collect()
    };
    let refused = engine
        .request(
            Endpoint::OrderPlace,
            json!({"order_id": "o-101", "customer_id": "c1", "lines": lines(101)}),
        )
        .await;
    assert_eq!(outcome(&refused), "invalid_command", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 100 lines"),
        "{refused}"
    );
    let placed = engine
        .request(
            Endpoint::OrderPlace,
            json!({"order_id": "o-100", "customer_id": "c1", "lines": lines(100)}),
        )
        .await;
    assert_eq!(outcome(&placed), "ok", "{placed}");
    let stored = engine.stored("ORDO_ORDERS").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].envelope.data["lines"].as_array().unwrap().len(),
        100
    );
}
