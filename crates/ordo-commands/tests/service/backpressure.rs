//! `order.place` sheds load while the saga falls behind, and takes orders again once it catches
//! up; nothing is appended for a shed request.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use ordo_commands::{ServiceConfig, backpressure::BacklogLimits};
use serde_json::json;

use crate::support::{Engine, line, outcome};

fn order(i: usize) -> serde_json::Value {
    json!({"order_id": format!("o-{i}"), "customer_id": "c1", "lines": [line("A1", 1, 100)]})
}

#[tokio::test]
async fn place_is_refused_unavailable_while_the_saga_backlog_is_over_its_bound() {
    let mut engine = Engine::start_with(0, ordo_eventstore::StreamDefinition::built_in()).await;
    engine
        .add_instance_with(ServiceConfig {
            backlog_limits: Some(BacklogLimits {
                saga: 10,
                projection: 1_000_000,
                check_every: Duration::from_millis(50),
            }),
            ..Default::default()
        })
        .await;
    // The saga's consumer exists (as once a coordinator has run), but nothing takes events in.
    let js = jetstream::new(engine.client.clone());
    let consumer = js
        .get_stream(ordo_eventstore::StreamId::Orders.name())
        .await
        .unwrap()
        .get_or_create_consumer(
            "ordo-saga",
            pull::Config {
                durable_name: Some("ordo-saga".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let first = engine
        .request_with_id("ordo.cmd.order.place", order(0), "place-0")
        .await;
    assert_eq!(outcome(&first), "ok", "{first}");
    let mut second = serde_json::Value::Null;
    for i in 1..11 {
        let reply = engine.request("ordo.cmd.order.place", order(i)).await;
        assert_eq!(outcome(&reply), "ok");
        if i == 1 {
            second = reply;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let appended = engine
        .message_count(ordo_eventstore::StreamId::Orders.name())
        .await;
    let reply = engine.request("ordo.cmd.order.place", order(100)).await;
    assert_eq!(outcome(&reply), "unavailable", "{reply}");
    let retry_after = reply["error"]["retry_after_ms"].as_u64().unwrap();
    assert!((100..=10_000).contains(&retry_after), "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("11 order events not yet taken in by the saga"),
        "{reply}"
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Orders.name())
            .await,
        appended
    );
    // A repeat of an order that was accepted is not shed: it gets its first outcome, under
    // the client's command id and under the natural key alike.
    assert_eq!(
        engine
            .request_with_id("ordo.cmd.order.place", order(0), "place-0")
            .await,
        first
    );
    assert_eq!(
        engine.request("ordo.cmd.order.place", order(1)).await,
        second
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Orders.name())
            .await,
        appended,
        "the repeats appended nothing"
    );
    // Other commands are not shed: they are how the backlog drains.
    let receive = json!({"sku": "A1", "qty": 5});
    assert_eq!(
        outcome(&engine.request("ordo.cmd.stock.receive", receive).await),
        "ok"
    );

    // The saga catches up: orders are taken again.
    let mut messages = consumer.fetch().max_messages(11).messages().await.unwrap();
    while let Some(message) = messages.next().await {
        message.unwrap().double_ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        outcome(&engine.request("ordo.cmd.order.place", order(100)).await),
        "ok"
    );
}
