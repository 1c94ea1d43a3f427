//! Several instances side by side never lose an update nor oversell.

use futures::{StreamExt, stream};
use ordo_contract::Endpoint;
use serde_json::json;

use crate::support::{Engine, outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_and_200_concurrent_reserves_of_100_units_reserve_exactly_100() {
    let mut engine = Engine::start().await;
    engine.add_instance().await;
    engine.partitions_shared().await;
    assert_eq!(
        outcome(
            &engine
                .request(Endpoint::StockReceive, json!({"sku": "HOT", "qty": 100}))
                .await
        ),
        "ok"
    );

    let engine = &engine;
    let replies: Vec<String> = stream::iter(0..200)
        .map(|i| async move {
            let reserve = json!({"sku": "HOT", "order_id": format!("o-{i}"), "qty": 1});
            outcome(&engine.request(Endpoint::StockReserve, reserve).await)
        })
        .buffer_unordered(200)
        .collect()
        .await;

    let count = |code: &str| replies.iter().filter(|reply| *reply == code).count();
    // Both instances took requests from the queue group; the owner of HOT's partition ran them
    // all (a forwarded request is counted by the instance that answers it).
    let served = engine.served_by_each_instance("stock-reserve").await;
    let mut requests: Vec<u64> = served.iter().map(|(requests, _)| *requests).collect();
    requests.sort();
    assert_eq!(requests, [0, 200], "one writer: {served:?}");
    assert_eq!(count("ok"), 100, "{replies:?}");
    assert_eq!(count("insufficient_stock"), 100, "{replies:?}");
    let stored = engine.stored(ordo_eventstore::StreamId::Stock.name()).await;
    let reserved: Vec<_> = stored
        .iter()
        .filter(|event| event.envelope.event_type == "StockReserved")
        .collect();
    assert_eq!(reserved.len(), 100);
    let versions: Vec<u64> = stored.iter().map(|event| event.envelope.version).collect();
    assert_eq!(
        versions,
        (1..=101).collect::<Vec<_>>(),
        "one event per version, no gap, no fork"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_receives_through_two_instances_lose_no_update() {
    let mut engine = Engine::start().await;
    engine.add_instance().await;
    let engine = &engine;
    let replies: Vec<String> = stream::iter(0..100)
        .map(|_| async move {
            outcome(
                &engine
                    .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
                    .await,
            )
        })
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(replies.iter().all(|reply| reply == "ok"), "{replies:?}");
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        100
    );
}
