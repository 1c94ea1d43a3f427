//! Every aggregate has one writer: the instance that owns its partition. Any instance takes a
//! request; the owner runs it and answers. When an owner dies, another serves its partitions
//! within a few seconds, and meanwhile a request is answered `unavailable` with a delay to retry
//! after, or not at all (the requester's retry is safe).

use std::time::{Duration, Instant};

use futures::StreamExt;
use ordo_contract::Endpoint;
use ordo_eventstore::partition_of;
use serde_json::{Value, json};

use crate::support::{Engine, outcome};

/// SKUs named so that there is one in each of the 16 partitions.
fn one_sku_per_partition() -> Vec<String> {
    let mut skus: Vec<Option<String>> = vec![None; 16];
    for i in 0.. {
        let sku = format!("S{i}");
        let partition = partition_of(&sku, 16) as usize;
        skus[partition].get_or_insert(sku);
        if skus.iter().all(Option::is_some) {
            break;
        }
    }
    skus.into_iter().map(Option::unwrap).collect()
}

/// Sends the request until it is answered other than `unavailable` (a partition moving), for at
/// most `limit`; returns the answer.
async fn until_served(engine: &Engine, endpoint: Endpoint, body: &Value, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let body = serde_json::to_vec(body).unwrap();
        match engine
            .try_request(endpoint.subject(), body, None, Duration::from_millis(500))
            .await
        {
            Ok(reply) if outcome(&reply) != "unavailable" => return reply,
            Ok(_) | Err(_) if started.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("not served within {limit:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_partitions_and_each_command_is_run_by_its_owner() {
    let engine = Engine::start_with(2, ordo_eventstore::StreamDefinition::built_in()).await;
    // The second instance serves as soon as every partition has an owner; the first hands it
    // its share within moments.
    engine.partitions_shared().await;

    // A receive on each partition's SKU, sent many times: the queue group hands each to either
    // instance, and every one is answered by its owner.
    let skus = one_sku_per_partition();
    let engine = &engine;
    let replies: Vec<String> = futures::stream::iter(skus.iter().cycle().take(160))
        .map(|sku| async move {
            outcome(
                &engine
                    .request(Endpoint::StockReceive, json!({"sku": sku, "qty": 1}))
                    .await,
            )
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(replies.iter().all(|reply| reply == "ok"), "{replies:?}");
    // Each instance answered the ten receives of each partition it owns, whichever instance
    // the queue group gave them to.
    let owners = engine.owners().await;
    let mut expected: Vec<u64> = ["", ""]
        .iter()
        .enumerate()
        .map(|(index, _)| {
            let mut distinct = owners.clone();
            distinct.sort();
            distinct.dedup();
            10 * owners
                .iter()
                .filter(|owner| **owner == distinct[index])
                .count() as u64
        })
        .collect();
    expected.sort();
    let mut served: Vec<u64> = engine
        .served_by_each_instance("stock-receive")
        .await
        .iter()
        .map(|(requests, _)| *requests)
        .collect();
    served.sort();
    assert_eq!(
        served, expected,
        "requests answered by each instance, and by the owners"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_partitions_are_served_again_within_five_seconds() {
    let mut engine = Engine::start_with(2, ordo_eventstore::StreamDefinition::built_in()).await;
    let skus = one_sku_per_partition();
    for sku in &skus {
        let reply = engine
            .request(Endpoint::StockReceive, json!({"sku": sku, "qty": 1}))
            .await;
        assert_eq!(outcome(&reply), "ok", "{reply}");
    }

    engine.kill_first_instance().await;
    let killed = Instant::now();
    let engine = &engine;
    let served_after: Vec<Duration> = futures::stream::iter(&skus)
        .map(|sku| async move {
            let reply = until_served(
                engine,
                Endpoint::StockReceive,
                &json!({"sku": sku, "qty": 1}),
                Duration::from_secs(10),
            )
            .await;
            assert_eq!(outcome(&reply), "ok", "{sku}: {reply}");
            killed.elapsed()
        })
        .buffer_unordered(16)
        .collect()
        .await;
    // The first command forwarded to the dead owner finds no responders; its partitions are
    // taken at once, without waiting for its leases to run out (3 s).
    let slowest = served_after.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(2500),
        "served again after {slowest:?}"
    );
    let survivor = engine.owners().await;
    assert!(
        survivor.iter().all(|owner| *owner == survivor[0]),
        "the survivor owns every partition: {survivor:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_for_one_partition_are_stored_together_in_batches() {
    let engine = Engine::start().await;
    let receive = json!({"sku": "HOT", "qty": 1000});
    assert_eq!(
        outcome(&engine.request(Endpoint::StockReceive, receive).await),
        "ok"
    );
    let engine = &engine;
    let replies: Vec<String> = futures::stream::iter(0..300)
        .map(|i| async move {
            let reserve = json!({"sku": "HOT", "order_id": format!("o-{i}"), "qty": 1});
            outcome(&engine.request(Endpoint::StockReserve, reserve).await)
        })
        .buffer_unordered(300)
        .collect()
        .await;
    assert!(replies.iter().all(|reply| reply == "ok"), "{replies:?}");

    let stored = engine.stored(ordo_eventstore::StreamId::Stock.name()).await;
    let versions: Vec<u64> = stored.iter().map(|event| event.envelope.version).collect();
    assert_eq!(versions, (1..=301).collect::<Vec<_>>(), "no gap, no fork");
    // The receive, and a reserve that found the queue empty, were stored on their own; the
    // others with the reserves queued behind them.
    let mut batches: Vec<String> = stored
        .iter()
        .filter_map(|event| event.headers.get(ordo_eventstore::store::BATCH_HEADER))
        .map(|batch| batch.as_str().to_owned())
        .collect();
    assert!(
        batches.len() >= 250,
        "{} of 300 reserves in batches",
        batches.len()
    );
    batches.dedup();
    assert!(
        batches.len() <= 100,
        "300 reserves in flight at once went in {} batches",
        batches.len()
    );
}
