//! What a caller sends beside its command (a reply subject, a command id, headers) can make
//! ordo act only on that command: these hold even on a server with no accounts or permissions at
//! all, where every client shares ordo's subjects. (crates/ordo/tests/redteam.rs attacks the
//! shipped configuration.)

use ordo_contract::Endpoint;
use std::time::Duration;

use async_nats::HeaderMap;
use serde_json::json;

use crate::support::{Engine, line, outcome};

/// How many requests of each endpoint the service has taken in (`nats micro stats ordo`).
async fn requests_seen(engine: &Engine) -> (u64, u64) {
    let stats = engine
        .client
        .request("$SRV.STATS.ordo", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let count = |name: &str| {
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|endpoint| endpoint["name"] == name)
            .and_then(|endpoint| endpoint["num_requests"].as_u64())
            .unwrap_or(0)
    };
    (count("stock-receive"), count("order-ship"))
}

#[tokio::test]
async fn a_reply_subject_that_is_not_an_inbox_is_neither_decided_nor_answered() {
    let engine = Engine::start().await;
    let received = engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    assert_eq!(outcome(&received), "ok", "{received}");
    let before = requests_seen(&engine).await;

    // Each crafted reply subject names something the service's user may write to: an event
    // subject, a snapshot (read before the events), an outcome record, a stream it may not
    // keep (snapshots may be deleted).
    let crafted = [
        "ordo.stock.events.A1",
        "ordo.order.events.o-1",
        "ordo.snapshots.stock.A1",
        "ordo.outcomes.0000",
        "$JS.API.STREAM.DELETE.ORDO_SNAPSHOTS",
    ];
    for reply_to in crafted {
        let body = json!({"sku": "A1", "qty": 1}).to_string();
        engine
            .client
            .publish_with_reply(Endpoint::StockReceive.subject(), reply_to, body.into())
            .await
            .unwrap();
        // An invalid command too: its refusal would be the reply written there.
        engine
            .client
            .publish_with_reply(Endpoint::OrderShip.subject(), reply_to, "{}".into())
            .await
            .unwrap();
    }
    engine.client.flush().await.unwrap();
    // Wait until the service has taken every one of them in (and dropped it).
    let expected = (
        before.0 + crafted.len() as u64,
        before.1 + crafted.len() as u64,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while requests_seen(&engine).await != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the crafted requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let after = engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 2}))
        .await;
    assert_eq!(
        after["version"], 2,
        "no crafted request was decided, nor its reply stored as an event of A1: {after}"
    );
    let stored = engine.stored("ORDO_STOCK").await; // Panics on anything but an event.
    assert_eq!(stored.len(), 2);
    assert_eq!(engine.message_count("ORDO_ORDERS").await, 0);
    assert_eq!(engine.message_count("ORDO_SNAPSHOTS").await, 0);
    assert_eq!(
        engine.message_count("ORDO_COMMAND_OUTCOMES").await,
        2,
        "the records of the two receives that were answered, and no reply written as one"
    );
}

#[tokio::test]
async fn the_saga_s_command_ids_cannot_be_taken_on_public_subjects() {
    let engine = Engine::start().await;
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    // The id the saga will give the first reservation of order victim-1.
    let predicted = "saga:victim-1:reserve:A1";
    let taken = engine
        .request_with_id(
            Endpoint::OrderCancel,
            json!({"order_id": "nope"}),
            predicted,
        )
        .await;
    assert_eq!(outcome(&taken), "invalid_command", "{taken}");
    let in_body = engine
        .request(
            Endpoint::OrderCancel,
            json!({"order_id": "nope", "command_id": predicted}),
        )
        .await;
    assert_eq!(outcome(&in_body), "invalid_command", "{in_body}");

    // The saga's reservation under that id then works as if nothing had been sent.
    let reserved = engine
        .request_with_id(
            Endpoint::StockReserve,
            json!({"sku": "A1", "order_id": "victim-1", "qty": 2}),
            predicted,
        )
        .await;
    assert_eq!(outcome(&reserved), "ok", "{reserved}");
}

#[tokio::test]
async fn headers_copied_into_events_are_bounded() {
    let engine = Engine::start().await;
    let place = json!({"order_id": "o-1", "customer_id": "c1", "lines": [line("A1", 1, 5)]});
    for (header, value) in [
        ("Ordo-Correlation-Id", "c".repeat(60 * 1024)),
        ("Ordo-Causation-Id", "c".repeat(129)),
        ("Ordo-Correlation-Id", "two words".to_owned()),
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(header, value.as_str());
        let reply = engine
            .try_request_with_headers(
                Endpoint::OrderPlace.subject(),
                place.to_string().into_bytes(),
                headers,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(outcome(&reply), "invalid_command", "{header}: {reply}");
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(header),
            "{reply}"
        );
    }
    assert_eq!(engine.event_counts().await, (0, 0));

    let mut headers = HeaderMap::new();
    headers.insert("Ordo-Correlation-Id", "checkout-42");
    let placed = engine
        .try_request_with_headers(
            Endpoint::OrderPlace.subject(),
            place.to_string().into_bytes(),
            headers,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&placed), "ok", "{placed}");
    let stored = engine.stored("ORDO_ORDERS").await;
    assert_eq!(stored[0].envelope.correlation_id, "checkout-42");
}

#[tokio::test]
async fn a_reason_no_view_can_store_is_refused_and_appends_nothing() {
    let engine = Engine::start().await;
    let placed = engine
        .request(
            Endpoint::OrderPlace,
            json!({"order_id": "o-1", "customer_id": "c1", "lines": [line("A1", 1, 5)]}),
        )
        .await;
    assert_eq!(outcome(&placed), "ok", "{placed}");
    let cancel = engine
        .request(
            Endpoint::OrderCancel,
            json!({"order_id": "o-1", "reason": "x\u{0}y"}),
        )
        .await;
    assert_eq!(outcome(&cancel), "invalid_command", "{cancel}");
    assert_eq!(engine.event_counts().await, (1, 0));
}
