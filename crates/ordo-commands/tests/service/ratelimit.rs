//! Per-customer rate limits on `order.place`, shared by every command-service instance.

use ordo_contract::Endpoint;
use std::time::Duration;

use ordo_commands::{ServiceConfig, ratelimit::CustomerRate};
use ordo_eventstore::StreamDefinition;
use serde_json::{Value, json};

use crate::support::Engine;

fn place(order_id: &str, customer_id: &str) -> Value {
    json!({"order_id": order_id, "customer_id": customer_id,
           "lines": [{"sku": "A1", "qty": 1, "unit_price_cents": 100}]})
}

/// A command service instance that lets each customer place `per_second` orders, `burst` at once.
async fn one_limited_instance(per_second: f64, burst: u32) -> Engine {
    let mut engine = Engine::start_with(0, StreamDefinition::built_in()).await;
    engine
        .add_instance_with(ServiceConfig {
            customer_rate: Some(CustomerRate { per_second, burst }),
            ..Default::default()
        })
        .await;
    engine
}

#[tokio::test]
async fn a_customer_over_its_rate_is_refused_by_every_instance_and_nothing_is_appended() {
    let mut engine = Engine::start_with(0, StreamDefinition::built_in()).await;
    let limited = ServiceConfig {
        // A burst of 3, then one order every 100 s: nothing refills during the test.
        customer_rate: Some(CustomerRate {
            per_second: 0.01,
            burst: 3,
        }),
        ..Default::default()
    };
    for _ in 0..2 {
        engine.add_instance_with(limited.clone()).await;
    }

    // Orders of one customer, spread over both instances by the queue group: six, then more
    // until each instance has refused one.
    let mut replies = Vec::new();
    for i in 0.. {
        replies.push(
            engine
                .request(Endpoint::OrderPlace, place(&format!("o-{i}"), "c1"))
                .await,
        );
        if i >= 5
            && engine
                .served_by_each_instance("order-place")
                .await
                .iter()
                .all(|(_, refused)| *refused > 0)
        {
            break;
        }
        assert!(i < 60, "one instance took every order");
    }
    let accepted = replies.iter().filter(|reply| reply["ok"] == true).count();
    assert_eq!(accepted, 3, "exactly the burst: {replies:?}");
    for refused in replies.iter().filter(|reply| reply["ok"] != true) {
        assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
        let retry_after = refused["error"]["retry_after_ms"].as_u64().unwrap();
        assert!(retry_after > 0 && retry_after <= 100_000, "{refused}");
    }
    // Another customer has a bucket of its own.
    let other = engine
        .request(Endpoint::OrderPlace, place("o-other", "c2"))
        .await;
    assert_eq!(other["ok"], true, "{other}");
    // Only what was accepted was appended.
    assert_eq!(engine.event_counts().await, (4, 0));
}

#[tokio::test]
async fn a_repeat_of_an_accepted_order_gets_its_reply_while_its_customer_is_over_the_limit() {
    // One order, then one every 100 s: nothing refills during the test.
    let engine = one_limited_instance(0.01, 1).await;
    let first = engine
        .request(Endpoint::OrderPlace, place("o-1", "c1"))
        .await;
    assert_eq!(first["ok"], true, "{first}");
    let new_order = engine
        .request(Endpoint::OrderPlace, place("o-2", "c1"))
        .await;
    assert_eq!(new_order["error"]["code"], "rate_limited", "{new_order}");
    // The client lost the first reply and sends the same command again.
    let repeat = engine
        .request(Endpoint::OrderPlace, place("o-1", "c1"))
        .await;
    assert_eq!(repeat, first, "the original reply");
    assert_eq!(engine.event_counts().await, (1, 0));
}

#[tokio::test]
async fn tokens_come_back_at_the_configured_rate() {
    // One token a second: the second request comes long before the next token, however slow
    // the machine.
    let engine = one_limited_instance(1.0, 1).await;
    let first = engine
        .request(Endpoint::OrderPlace, place("o-1", "c1"))
        .await;
    assert_eq!(first["ok"], true, "{first}");
    let second = engine
        .request(Endpoint::OrderPlace, place("o-2", "c1"))
        .await;
    assert_eq!(second["error"]["code"], "rate_limited", "{second}");
    let wait = second["error"]["retry_after_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let third = engine
        .request(Endpoint::OrderPlace, place("o-3", "c1"))
        .await;
    assert_eq!(third["ok"], true, "after retry_after_ms: {third}");
}
