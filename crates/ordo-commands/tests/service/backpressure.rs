//! `order.place` sheds load while the saga or a view falls behind, and takes orders again once
//! it catches up; nothing is appended for a shed request.

use ordo_contract::Endpoint;
use std::time::Duration;

use async_nats::jetstream;
use ordo_commands::{ServiceConfig, backpressure::BacklogLimits};
use ordo_eventstore::ConsumerId;
use serde_json::json;

use crate::support::{Engine, line, outcome};

fn order(i: usize) -> serde_json::Value {
    json!({"order_id": format!("o-{i}"), "customer_id": "c1", "lines": [line("A1", 1, 100)]})
}

/// One command service instance whose gate reads the backlogs every 50 ms.
async fn limited(saga: u64, projection: u64) -> Engine {
    let mut engine = Engine::start_with(0, ordo_eventstore::StreamDefinition::built_in()).await;
    engine
        .add_instance_with(ServiceConfig {
            backlog_limits: Some(BacklogLimits {
                saga,
                projection,
                check_every: Duration::from_millis(50),
            }),
            ..Default::default()
        })
        .await;
    engine
}

/// A reader (the saga's intake, a view's projector) that took nothing in: its report in the
/// partition bucket, every partition at 0, as an instance that stalled at the start would have
/// left it. Returns the reporter, to report it caught up.
async fn stalled_reader(
    engine: &Engine,
    reader: ConsumerId,
) -> ordo_eventstore::progress::Reporter {
    let group = reader.partition_group().unwrap();
    let js = jetstream::new(engine.client.clone());
    let mut reporter = ordo_eventstore::progress::Reporter::open(&js, group, "stalled")
        .await
        .unwrap();
    reporter.report(&every_partition_at(0)).await;
    reporter
}

fn every_partition_at(seq: u64) -> std::collections::BTreeMap<u32, u64> {
    (0..ordo_eventstore::partition::DEFAULT_PARTITIONS)
        .map(|partition| (partition, seq))
        .collect()
}

/// Waits until the gate sheds: places o-0 (which exists) again under fresh command ids, which
/// appends nothing whether it is shed or refused by the order, until one is shed.
async fn until_shed(engine: &Engine) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for probe in 0.. {
        let reply = engine
            .request_with_id(Endpoint::OrderPlace, order(0), &format!("probe-{probe}"))
            .await;
        if outcome(&reply) == "unavailable" {
            return reply;
        }
        assert!(std::time::Instant::now() < deadline, "never shed: {reply}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// The micro stats of the (one) instance's `order-place`: requests, errors, and shed.
async fn place_stats(engine: &Engine) -> (u64, u64, u64) {
    let stats = engine
        .client
        .request("$SRV.STATS.ordo", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let place = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|endpoint| endpoint["name"] == "order-place")
        .unwrap()
        .clone();
    (
        place["num_requests"].as_u64().unwrap(),
        place["num_errors"].as_u64().unwrap(),
        place["data"]["shed"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn place_is_refused_unavailable_while_the_saga_backlog_is_over_its_bound() {
    let engine = limited(10, 1_000_000).await;
    // A coordinator's intake reported, but takes nothing in.
    let mut intake = stalled_reader(&engine, ConsumerId::Saga).await;
    let first = engine
        .request_with_id(Endpoint::OrderPlace, order(0), "place-0")
        .await;
    assert_eq!(outcome(&first), "ok", "{first}");
    let mut second = serde_json::Value::Null;
    for i in 1..11 {
        let reply = engine.request(Endpoint::OrderPlace, order(i)).await;
        assert_eq!(outcome(&reply), "ok");
        if i == 1 {
            second = reply;
        }
    }
    until_shed(&engine).await;

    let appended = engine
        .message_count(ordo_eventstore::StreamId::Orders.name())
        .await;
    let reply = engine.request(Endpoint::OrderPlace, order(100)).await;
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
            .request_with_id(Endpoint::OrderPlace, order(0), "place-0")
            .await,
        first
    );
    assert_eq!(engine.request(Endpoint::OrderPlace, order(1)).await, second);
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
        outcome(&engine.request(Endpoint::StockReceive, receive).await),
        "ok"
    );

    // The saga catches up: orders are taken again.
    tokio::time::sleep(ordo_eventstore::progress::REPORT_EVERY).await;
    intake.report(&every_partition_at(appended)).await;
    // (A shed placing appends nothing: asking until it is taken is safe.)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = engine.request(Endpoint::OrderPlace, order(100)).await;
        if outcome(&reply) == "ok" {
            break;
        }
        assert_eq!(outcome(&reply), "unavailable", "{reply}");
        assert!(std::time::Instant::now() < deadline, "still shed: {reply}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_view_that_lags_past_its_bound_sheds_placing_and_micro_stats_count_it() {
    let engine = limited(1_000_000, 3).await;
    let _projector = stalled_reader(&engine, ConsumerId::StockView).await;
    let placed = engine.request(Endpoint::OrderPlace, order(0)).await;
    assert_eq!(outcome(&placed), "ok", "{placed}");
    for _ in 0..5 {
        let received = engine
            .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
            .await;
        assert_eq!(outcome(&received), "ok");
    }
    let shed = until_shed(&engine).await;
    assert!(
        shed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5 stock events not yet in the stock view"),
        "{shed}"
    );
    assert_eq!(
        shed["error"]["retry_after_ms"], 5000,
        "not draining: {shed}"
    );
    let orders = engine
        .message_count(ordo_eventstore::StreamId::Orders.name())
        .await;
    assert_eq!(orders, 1, "only o-0");
    // The shed placings are counted apart, and as errors, in `nats micro stats ordo`.
    let (requests, errors, shed) = place_stats(&engine).await;
    assert!(shed >= 1, "shed {shed}");
    assert!(
        errors >= shed && requests > errors,
        "{requests} {errors} {shed}"
    );
    let another = engine.request(Endpoint::OrderPlace, order(1)).await;
    assert_eq!(outcome(&another), "unavailable", "{another}");
    assert_eq!(place_stats(&engine).await.2, shed + 1);
}

/// A reader that never reported (its worker never ran) sheds nothing, even at a bound of 0; once
/// it reports and falls behind, the same bound sheds.
#[tokio::test]
async fn a_reader_that_never_reported_sheds_nothing() {
    let engine = limited(0, 0).await;
    // Twenty check intervals of placings: none is shed.
    for i in 0..20 {
        let placed = engine.request(Endpoint::OrderPlace, order(i)).await;
        assert_eq!(outcome(&placed), "ok", "{placed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(place_stats(&engine).await.2, 0);
    let _intake = stalled_reader(&engine, ConsumerId::Saga).await;
    let shed = until_shed(&engine).await;
    assert!(
        shed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("20 order events not yet taken in by the saga"),
        "{shed}"
    );
}
