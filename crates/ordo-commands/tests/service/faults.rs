//! nats-server killed with SIGKILL and restarted in the middle of a run: no acknowledged event is
//! lost, and retrying every command afterwards stores each exactly once.

use ordo_contract::Endpoint;
use std::{collections::HashMap, time::Duration};

use futures::{FutureExt, StreamExt, stream};
use serde_json::{Value, json};

use crate::support::{Engine, outcome};

const COMMANDS: usize = 300;

async fn receive(engine: &Engine, i: usize) -> Result<Value, String> {
    let body = serde_json::to_vec(&json!({"sku": "A1", "qty": 1})).unwrap();
    engine
        .try_request(
            Endpoint::StockReceive.subject(),
            body,
            Some(&format!("r-{i}")),
            Duration::from_secs(1),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_mid_run_loses_no_acknowledged_event() {
    let engine = Engine::start().await;
    let acknowledged = tokio::sync::Mutex::new(HashMap::<usize, u64>::new());

    let load = stream::iter(0..COMMANDS)
        .map(|i| {
            let (engine, acknowledged) = (&engine, &acknowledged);
            async move {
                if let Ok(reply) = receive(engine, i).await
                    && outcome(&reply) == "ok"
                {
                    acknowledged
                        .lock()
                        .await
                        .insert(i, reply["seq"].as_u64().unwrap());
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>();
    let load_ended = std::sync::atomic::AtomicBool::new(false);
    let load = async {
        load.await;
        load_ended.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let chaos = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acknowledged.lock().await.len() < COMMANDS / 3 {
            assert!(
                !load_ended.load(std::sync::atomic::Ordering::SeqCst),
                "the load ended with fewer than {} commands acknowledged",
                COMMANDS / 3
            );
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {} commands acknowledged in 60 s",
                COMMANDS / 3
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The load keeps running while the server is gone, longer than a request waits.
        engine.server.kill();
        let acknowledged_at_kill = acknowledged.lock().await.len();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        engine.server.restart();
        acknowledged_at_kill
    };
    let ((), acknowledged_at_kill) = tokio::join!(load, chaos);
    let acknowledged = acknowledged.into_inner();
    assert!(
        acknowledged_at_kill < COMMANDS,
        "the server died in the middle of the run"
    );
    eprintln!(
        "{} of {COMMANDS} commands acknowledged in the run, {acknowledged_at_kill} of them before the kill",
        acknowledged.len()
    );
    ordo_testkit::NatsServer::wait_for_jetstream(&engine.client).await;

    // Every command is retried until it has an outcome; those acknowledged keep theirs.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for i in 0..COMMANDS {
        let reply = loop {
            match receive(&engine, i).await {
                Ok(reply) if outcome(&reply) == "ok" => break reply,
                other => {
                    assert!(std::time::Instant::now() < deadline, "r-{i}: {other:?}");
                    eprintln!("r-{i} not done yet: {other:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        if let Some(seq) = acknowledged.get(&i) {
            assert_eq!(
                reply["seq"].as_u64(),
                Some(*seq),
                "r-{i} was acknowledged at {seq}"
            );
        }
    }

    let stored = engine.stored(ordo_eventstore::StreamId::Stock.name()).await;
    for (i, seq) in &acknowledged {
        let event = stored.iter().find(|event| event.seq == *seq);
        assert_eq!(
            event.map(|event| event.envelope.command_id.as_str()),
            Some(format!("r-{i}").as_str()),
            "acknowledged event r-{i} at {seq} is in the stream"
        );
    }
    let mut command_ids: Vec<&str> = stored
        .iter()
        .map(|event| event.envelope.command_id.as_str())
        .collect();
    command_ids.sort();
    command_ids.dedup();
    assert_eq!(stored.len(), COMMANDS, "one event per command");
    assert_eq!(command_ids.len(), COMMANDS, "no command stored twice");
    let versions: Vec<u64> = stored.iter().map(|event| event.envelope.version).collect();
    assert_eq!(versions, (1..=COMMANDS as u64).collect::<Vec<_>>());
}

/// Sends 300 receives (of 300 SKUs) to the engine's one instance, which serves one at a time,
/// makes sure every one is in the instance's hands (a PING to the service comes back only after
/// the instance read everything routed to it before), stops the instance, and returns how many
/// were answered before the stop and the set answered in all.
async fn stop_with_300_delivered(
    engine: &mut Engine,
) -> (usize, std::collections::HashSet<String>) {
    let client = engine.client.clone();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
    for i in 0..300 {
        let body = json!({"sku": format!("S{i}"), "qty": 1}).to_string();
        client
            .publish_with_reply(
                Endpoint::StockReceive.subject(),
                format!("{inbox}.{i}"),
                body.into(),
            )
            .await
            .unwrap();
    }
    client.request("$SRV.PING.ordo", "".into()).await.unwrap();
    let mut answered = std::collections::HashSet::new();
    // An answer is the command's reply, not a "no responders" status.
    let answer = |reply: async_nats::Message| {
        let body: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        assert_eq!(body["ok"], true, "{:?}: {body}", reply.status);
        reply.subject.to_string()
    };
    while let Some(Some(reply)) = replies.next().now_or_never() {
        answered.insert(answer(reply));
    }
    let before_the_stop = answered.len();
    engine.stop_first_instance().await;
    // Stopped: every reply it sent is flushed; a few more moments for them to arrive.
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(2), replies.next()).await {
        answered.insert(answer(reply));
        if answered.len() == 300 {
            break;
        }
    }
    (before_the_stop, answered)
}

/// One instance that serves one request at a time, with `drain_limit`.
async fn one_at_a_time(drain_limit: Duration) -> Engine {
    let mut engine = Engine::start_with(0, ordo_eventstore::StreamDefinition::built_in()).await;
    engine
        .add_instance_with(ordo_commands::ServiceConfig {
            max_in_flight: 1,
            drain_limit,
            ..Default::default()
        })
        .await;
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_gracefully_answers_every_request_already_delivered_to_it() {
    // A drain limit no machine reaches: every request delivered is answered.
    let mut engine = one_at_a_time(Duration::from_secs(120)).await;
    let (before_the_stop, answered) = stop_with_300_delivered(&mut engine).await;
    assert!(
        before_the_stop < 300,
        "the stop came after every request was answered: it proves nothing"
    );
    assert_eq!(
        answered.len(),
        300,
        "requests delivered to the instance and never answered ({before_the_stop} before the stop)"
    );
    assert_eq!(engine.event_counts().await, (0, 300));
}

/// A stop is bounded: past the drain limit, what has not started is dropped, and what is
/// dropped never ran (its sender's retry, under the same id, is safe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_limit_what_had_not_started_is_dropped_unrun() {
    let mut engine = one_at_a_time(Duration::from_millis(50)).await;
    let (_, answered) = stop_with_300_delivered(&mut engine).await;
    assert!(answered.len() < 300, "the limit dropped nothing");
    assert_eq!(
        engine.event_counts().await,
        (0, answered.len() as u64),
        "one event for each request answered, none for those dropped"
    );
}
