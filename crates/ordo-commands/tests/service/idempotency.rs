//! A command id is used once: repeating it returns the first outcome and appends nothing, within
//! JetStream's duplicate window and after it, and even when the first run died before replying.

use std::time::Duration;

use ordo_commands::{
    intake,
    outcomes::{OutcomeRecord, OutcomeState, Outcomes},
};
use ordo_contract::{Endpoint, ErrorCode, Reply, headers};
use ordo_domain::stock::{StockAggregate, StockEvent};
use ordo_eventstore::{EventEnvelope, EventMetadata, EventStore, StreamDefinition};
use serde_json::json;

use crate::support::{Engine, line, outcome};

/// What a run of a `stock.receive` on A1 records before it appends: its intent to append after
/// `expected_last_seq`, in the writer's batch `batch` if one sent it.
async fn record_receive_intent(
    store: &EventStore,
    command_id: &str,
    body: &[u8],
    expected_last_seq: u64,
    batch: Option<&str>,
) {
    record_intent(
        store,
        Endpoint::StockReceive,
        command_id,
        body,
        expected_last_seq,
        batch,
    )
    .await;
}

/// What a run of a stock command on A1 records before it appends.
async fn record_intent(
    store: &EventStore,
    endpoint: Endpoint,
    command_id: &str,
    body: &[u8],
    expected_last_seq: u64,
    batch: Option<&str>,
) {
    let parsed = intake::parse(
        endpoint,
        body,
        Some(command_id),
        &intake::Caller::OwnAccount,
    )
    .unwrap();
    let intent = OutcomeRecord {
        command_id: command_id.into(),
        fingerprint: parsed.fingerprint,
        state: OutcomeState::Appending {
            category: "stock".into(),
            aggregate_id: "A1".into(),
            expected_last_seq,
            batch: batch.map(str::to_owned),
        },
    };
    Outcomes::new(store.clone()).put(&intent, 0).await.unwrap();
}

/// Stores `event` as A1's next event, conditional on `expected_last_seq`, as command
/// `command_id` of the writer's batch `batch` would have: the writer's part of a chain.
async fn store_chained(
    engine: &Engine,
    command_id: &str,
    version: u64,
    event: StockEvent,
    expected_last_seq: u64,
    batch: &str,
) -> u64 {
    let metadata = EventMetadata {
        command_id: command_id.into(),
        correlation_id: command_id.into(),
        ..Default::default()
    };
    let envelope = EventEnvelope::new("A1", version, &event, &metadata, chrono::Utc::now());
    let mut headers = envelope.headers(&metadata);
    headers.insert(ordo_eventstore::store::BATCH_HEADER, batch);
    ordo_eventstore::publish::conditional_publish(
        &engine.client,
        "ordo.stock.events.A1",
        headers,
        envelope.to_bytes().into(),
        command_id,
        expected_last_seq,
        Duration::from_secs(2),
    )
    .await
    .unwrap()
    .seq
}

/// The command service's event store, as a writer that died half-way left it.
async fn command_store(engine: &Engine) -> EventStore {
    EventStore::open(
        engine.client.clone(),
        &ordo_commands::CommandService::STREAMS,
    )
    .await
    .unwrap()
}

/// The saga's resolve of order `order`'s reserve of 2 A1: the reserve again, under its id,
/// asked to be voided if it has not run.
async fn resolve_reserve(engine: &Engine, order: &str) -> Result<serde_json::Value, String> {
    let mut request_headers = async_nats::HeaderMap::new();
    request_headers.insert("Nats-Msg-Id", format!("saga:{order}:reserve:A1").as_str());
    request_headers.insert(headers::VOID_IF_NOT_RUN, "true");
    let body = json!({"sku": "A1", "order_id": order, "qty": 2}).to_string();
    engine
        .try_request_with_headers(
            Endpoint::StockReserve.subject(),
            body.into_bytes(),
            request_headers,
            Duration::from_secs(10),
        )
        .await
}

/// Waits until nats-server no longer remembers the message id under which the event of
/// `command_id` was stored in `stream` (its duplicate window is a timer of the server's, not a
/// check at each publish), so that a test that then repeats the command proves ordo's outcome
/// record, not the server's memory. It asks by publishing a probe on the subject of aggregate
/// `PROBE` under that very id: a duplicate while the server remembers it, stored once it does
/// not. Returns the messages it stored in `stream` (one).
async fn forgotten_by_the_server(
    engine: &Engine,
    stream: ordo_eventstore::StreamId,
    command_id: &str,
) -> u64 {
    let stored = engine
        .stored(stream.name())
        .await
        .into_iter()
        .find(|event| event.envelope.command_id == command_id)
        .expect("the command's event");
    let msg_id = stored
        .headers
        .get("Nats-Msg-Id")
        .expect("appended under a message id")
        .to_string();
    let probe_subject = format!(
        "{}.PROBE",
        stored
            .subject
            .rsplit_once('.')
            .expect("an aggregate subject")
            .0
    );
    let metadata = EventMetadata {
        command_id: "probe".into(),
        correlation_id: "probe".into(),
        ..Default::default()
    };
    let probe = EventEnvelope::new(
        "PROBE",
        1,
        &StockEvent::StockReceived { qty: 1 },
        &metadata,
        chrono::Utc::now(),
    )
    .to_bytes();
    let js = async_nats::jetstream::new(engine.client.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let ack = js
            .publish_with_headers(probe_subject.clone(), headers, probe.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        if !ack.duplicate {
            return 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{msg_id} still remembered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Streams whose duplicate window is one second, so a test can outlast it.
fn short_duplicate_window() -> Vec<StreamDefinition> {
    StreamDefinition::built_in()
        .into_iter()
        .map(|mut definition| {
            definition.config.duplicate_window = Duration::from_secs(1);
            definition
        })
        .collect()
}

#[tokio::test]
async fn a_repeated_msg_id_header_returns_the_first_outcome_and_appends_nothing() {
    let engine = Engine::start().await;
    let body = json!({"sku": "A1", "qty": 5});
    let first = engine
        .request_with_id(Endpoint::StockReceive, body.clone(), "delivery-1")
        .await;
    let again = engine
        .request_with_id(Endpoint::StockReceive, body, "delivery-1")
        .await;
    assert_eq!(
        first,
        json!({"ok": true, "sku": "A1", "version": 1, "seq": 1})
    );
    assert_eq!(again, first);
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        1
    );
}

#[tokio::test]
async fn a_command_id_field_works_like_the_header() {
    let engine = Engine::start().await;
    let body = json!({"sku": "A1", "qty": 5, "command_id": "delivery-1"});
    let first = engine.request(Endpoint::StockReceive, body.clone()).await;
    let again = engine.request(Endpoint::StockReceive, body).await;
    assert_eq!(again, first);
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        1
    );
}

#[tokio::test]
async fn without_a_command_id_the_natural_key_makes_retries_safe() {
    let engine = Engine::start().await;
    let place = json!({"order_id": "o-1", "customer_id": "c1", "lines": [line("A1", 1, 100)]});
    let placed = engine.request(Endpoint::OrderPlace, place.clone()).await;
    assert_eq!(engine.request(Endpoint::OrderPlace, place).await, placed);
    let cancel = json!({"order_id": "o-1"});
    let cancelled = engine.request(Endpoint::OrderCancel, cancel.clone()).await;
    assert_eq!(outcome(&cancelled), "ok");
    assert_eq!(
        engine.request(Endpoint::OrderCancel, cancel).await,
        cancelled,
        "a retried cancel is not refused as 'already cancelled'"
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Orders.name())
            .await,
        2
    );
}

#[tokio::test]
async fn a_command_id_reused_for_a_different_command_is_refused() {
    let engine = Engine::start().await;
    engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 5}),
            "same-id",
        )
        .await;
    let reused = engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 7}),
            "same-id",
        )
        .await;
    assert_eq!(
        reused,
        json!({"ok": false, "error": {"code": "invalid_command",
            "message": "command id same-id was already used for a different command"}})
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        1
    );
}

#[tokio::test]
async fn a_refusal_is_the_first_outcome_of_a_command_id() {
    let engine = Engine::start().await;
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
        .await;
    let reserve = json!({"sku": "A1", "order_id": "o-1", "qty": 5});
    let refused = engine
        .request_with_id(
            Endpoint::StockReserve,
            reserve.clone(),
            "saga-o-1-reserve-A1",
        )
        .await;
    assert_eq!(outcome(&refused), "insufficient_stock");
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 10}))
        .await;
    let repeated = engine
        .request_with_id(
            Endpoint::StockReserve,
            reserve.clone(),
            "saga-o-1-reserve-A1",
        )
        .await;
    assert_eq!(repeated, refused);
    let reserved = engine
        .stored(ordo_eventstore::StreamId::Stock.name())
        .await
        .iter()
        .filter(|event| event.envelope.event_type == "StockReserved")
        .count();
    assert_eq!(reserved, 0);
}

#[tokio::test]
async fn without_a_command_id_a_refused_command_is_decided_again_later() {
    let engine = Engine::start().await;
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 1}))
        .await;
    let reserve = json!({"sku": "A1", "order_id": "o-1", "qty": 5});
    let refused = engine
        .request(Endpoint::StockReserve, reserve.clone())
        .await;
    assert_eq!(outcome(&refused), "insufficient_stock");
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 10}))
        .await;
    let reserved = engine.request(Endpoint::StockReserve, reserve).await;
    assert_eq!(
        reserved,
        json!({"ok": true, "sku": "A1", "version": 3, "seq": 3})
    );
}

#[tokio::test]
async fn a_repeat_after_the_duplicate_window_still_returns_the_first_outcome() {
    let engine = Engine::start_with(1, short_duplicate_window()).await;
    let body = json!({"sku": "A1", "qty": 5});
    let first = engine
        .request_with_id(Endpoint::StockReceive, body.clone(), "late-retry")
        .await;
    let probes =
        forgotten_by_the_server(&engine, ordo_eventstore::StreamId::Stock, "late-retry").await;
    let again = engine
        .request_with_id(Endpoint::StockReceive, body, "late-retry")
        .await;
    assert_eq!(again, first);
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        1 + probes,
        "the receipt and the probe"
    );
}

#[tokio::test]
async fn a_command_whose_run_died_after_appending_is_not_appended_again() {
    let engine = Engine::start_with(1, short_duplicate_window()).await;
    engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 1}),
            "before",
        )
        .await;

    // Given a run of "crashed" that recorded its intent and appended, then died before replying…
    let store = command_store(&engine).await;
    let loaded = store.load::<StockAggregate>("A1").await.unwrap();
    record_receive_intent(
        &store,
        "crashed",
        br#"{"sku":"A1","qty":4}"#,
        loaded.last_seq,
        None,
    )
    .await;
    let metadata = EventMetadata {
        command_id: "crashed".into(),
        correlation_id: "crashed".into(),
        ..Default::default()
    };
    let appended = store
        .append::<StockAggregate>(
            "A1",
            &loaded,
            &StockEvent::StockReceived { qty: 4 },
            &metadata,
        )
        .await
        .unwrap();
    // …and another command landed after it, and the duplicate window has passed,
    engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 1}),
            "after",
        )
        .await;
    let probes = forgotten_by_the_server(&engine, ordo_eventstore::StreamId::Stock, "after").await;

    // when the client retries, it gets the outcome of the run that died, and nothing new is stored.
    let retried = engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 4}),
            "crashed",
        )
        .await;
    assert_eq!(
        retried,
        json!({"ok": true, "sku": "A1", "version": 2, "seq": appended.seq})
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        3 + probes,
        "before, crashed, after and the probe"
    );
}

#[tokio::test]
async fn a_command_stored_second_in_a_batch_whose_answer_was_lost_is_not_appended_again() {
    let engine = Engine::start_with(1, short_duplicate_window()).await;
    engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 1}),
            "before",
        )
        .await;

    // Given a batch that recorded two commands' intents on A1 and stored both events, the
    // second ("second") after another command's, and died before answering…
    let store = command_store(&engine).await;
    let loaded = store.load::<StockAggregate>("A1").await.unwrap();
    for (command_id, body) in [
        ("first", br#"{"sku":"A1","qty":2}"#),
        ("second", br#"{"sku":"A1","qty":4}"#),
    ] {
        record_receive_intent(&store, command_id, body, loaded.last_seq, Some("batch-1")).await;
    }
    let event = |command_id: &str, version: u64, qty: u64| {
        let metadata = EventMetadata {
            command_id: command_id.into(),
            correlation_id: command_id.into(),
            ..Default::default()
        };
        let envelope = ordo_eventstore::EventEnvelope::new(
            "A1",
            version,
            &StockEvent::StockReceived { qty },
            &metadata,
            chrono::Utc::now(),
        );
        let mut headers = envelope.headers(&metadata);
        headers.insert("Nats-Msg-Id", command_id);
        headers.insert(ordo_eventstore::store::BATCH_HEADER, "batch-1");
        if version == loaded.version + 1 {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                loaded.last_seq.to_string().as_str(),
            );
        }
        ordo_eventstore::publish::BatchMessage {
            subject: "ordo.stock.events.A1".into(),
            headers,
            payload: envelope.to_bytes().into(),
        }
    };
    let seqs = ordo_eventstore::publish::atomic_publish(
        &engine.client,
        vec![event("first", 2, 2), event("second", 3, 4)],
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    // …and another command came after, and the duplicate window has passed,
    engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 1}),
            "after",
        )
        .await;
    let probes = forgotten_by_the_server(&engine, ordo_eventstore::StreamId::Stock, "second").await;

    // when the client retries, it gets the event the batch stored for it, and nothing new.
    let retried = engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 4}),
            "second",
        )
        .await;
    assert_eq!(
        retried,
        json!({"ok": true, "sku": "A1", "version": 3, "seq": seqs[1]})
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        4 + probes,
        "before, the batch of two, after and the probe"
    );
}

/// The saga's resolve of a reserve (void if it has not run) whose writer died mid-chain: the
/// writer's next event may still be on its way, conditional on the chain's last stored event, so
/// the reserve is not voided but run there, once. When another batch took the sequence the
/// reserve expected, it can never land, and the resolve voids it.
#[tokio::test]
async fn a_resolve_runs_a_reserve_its_own_cut_chain_may_still_store_and_voids_one_another_batch_displaced()
 {
    let engine = Engine::start().await;
    engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 10}),
            "receive",
        )
        .await;
    let store = command_store(&engine).await;
    let reserve_body = |order: &str| json!({"sku": "A1", "order_id": order, "qty": 2}).to_string();

    // Given a writer that recorded the reserves of o-1 and o-2 in its batch chain-1, chained
    // their events and died once o-1's was stored…
    let loaded = store.load::<StockAggregate>("A1").await.unwrap();
    for order in ["o-1", "o-2"] {
        let id = format!("saga:{order}:reserve:A1");
        let body = reserve_body(order);
        let batch = Some("chain-1");
        record_intent(
            &store,
            Endpoint::StockReserve,
            &id,
            body.as_bytes(),
            loaded.last_seq,
            batch,
        )
        .await;
    }
    let reserved = |order: &str| StockEvent::StockReserved {
        order_id: ordo_domain::OrderId::parse(order).unwrap(),
        qty: 2,
    };
    let first = store_chained(
        &engine,
        "saga:o-1:reserve:A1",
        loaded.version + 1,
        reserved("o-1"),
        loaded.last_seq,
        "chain-1",
    )
    .await;

    // the resolve of o-2 runs it, right after o-1's event (where the chain would have put it),
    let ran = resolve_reserve(&engine, "o-2").await.unwrap();
    assert_eq!(outcome(&ran), "ok", "{ran}");
    assert_eq!(ran["version"], 3, "{ran}");
    assert_eq!(ran["seq"].as_u64(), Some(first + 1), "{ran}");
    // and every later copy gets that answer.
    assert_eq!(resolve_reserve(&engine, "o-2").await.unwrap(), ran);

    // Given a reserve of o-3 recorded in batch chain-2, whose expected sequence another batch
    // (chain-9) took…
    let loaded = store.load::<StockAggregate>("A1").await.unwrap();
    let body = reserve_body("o-3");
    record_intent(
        &store,
        Endpoint::StockReserve,
        "saga:o-3:reserve:A1",
        body.as_bytes(),
        loaded.last_seq,
        Some("chain-2"),
    )
    .await;
    store_chained(
        &engine,
        "another",
        loaded.version + 1,
        StockEvent::StockReceived { qty: 1 },
        loaded.last_seq,
        "chain-9",
    )
    .await;

    // its resolve voids it: it cannot land.
    let voided = resolve_reserve(&engine, "o-3").await.unwrap();
    assert_eq!(outcome(&voided), "invalid_state", "{voided}");
    assert!(
        voided["error"]["message"]
            .as_str()
            .unwrap()
            .contains("voided"),
        "{voided}"
    );
    assert_eq!(
        engine.event_counts().await,
        (0, 4),
        "the receive, o-1's and o-2's reserves, and the other batch's receive"
    );
}

#[tokio::test]
async fn a_run_that_died_before_appending_is_run_again() {
    let engine = Engine::start().await;
    let body = br#"{"sku":"A1","qty":4}"#;
    let store = command_store(&engine).await;
    record_receive_intent(&store, "died-early", body, 0, None).await;

    let reply = engine
        .request_bytes(
            Endpoint::StockReceive.subject(),
            body.to_vec(),
            Some("died-early"),
        )
        .await;
    assert_eq!(
        reply,
        json!({"ok": true, "sku": "A1", "version": 1, "seq": 1})
    );
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Stock.name())
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_one_command_id_sent_at_once_to_two_instances_append_once_before_and_after_the_window()
 {
    let engine = Engine::start_with(2, short_duplicate_window()).await;
    engine.partitions_shared().await;
    let engine = &engine;
    // Rounds of 6 copies of one receive, sent at once, while other commands move the same SKU.
    let mut first_replies = Vec::new();
    for round in 0..12 {
        let command_id = format!("copied-{round}");
        let copies = (0..6).map(|_| {
            engine.request_with_id(
                Endpoint::StockReceive,
                json!({"sku": "A1", "qty": 1}),
                &command_id,
            )
        });
        let other = engine.request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 100}));
        let (replies, _) = tokio::join!(futures::future::join_all(copies), other);
        assert!(
            replies.iter().all(|reply| *reply == replies[0]),
            "round {round}: every copy gets the one outcome: {replies:?}"
        );
        assert_eq!(outcome(&replies[0]), "ok");
        first_replies.push((command_id, replies[0].clone()));
    }
    // And a place without an order id, under one command id: one order, whichever copy ran.
    let place = || {
        engine.request_with_id(
            Endpoint::OrderPlace,
            json!({"customer_id": "c1", "lines": [line("A1", 1, 100)]}),
            "place-once",
        )
    };
    let placed = futures::future::join_all((0..6).map(|_| place())).await;
    assert!(placed.iter().all(|reply| *reply == placed[0]), "{placed:?}");
    // Every copy ran at the owner of A1's partition, whichever instance took it first.
    let served = engine.served_by_each_instance("stock-receive").await;
    assert!(
        served.len() == 2 && served.iter().filter(|(requests, _)| *requests > 0).count() == 1,
        "one writer: {served:?}"
    );

    // After the duplicate window, repeats still get the first outcome and append nothing.
    forgotten_by_the_server(engine, ordo_eventstore::StreamId::Stock, "copied-11").await;
    let order_probes =
        forgotten_by_the_server(engine, ordo_eventstore::StreamId::Orders, "place-once").await;
    for (command_id, first) in &first_replies {
        let again = engine
            .request_with_id(
                Endpoint::StockReceive,
                json!({"sku": "A1", "qty": 1}),
                command_id,
            )
            .await;
        assert_eq!(&again, first, "{command_id} after the window");
    }
    assert_eq!(place().await, placed[0]);
    let stock = engine.stored(ordo_eventstore::StreamId::Stock.name()).await;
    for (command_id, _) in &first_replies {
        let appended = stock
            .iter()
            .filter(|s| s.envelope.command_id == *command_id)
            .count();
        assert_eq!(appended, 1, "{command_id} appended {appended} times");
    }
    assert_eq!(
        engine
            .message_count(ordo_eventstore::StreamId::Orders.name())
            .await,
        1 + order_probes,
        "the order and the probe"
    );
}

/// The saga's resolve of a reserve it may have sent (`Ordo-Void-If-Not-Run`): an id that has not
/// run is voided, refused without running, and every later copy of the reserve gets that
/// refusal and reserves nothing; an id that ran answers its outcome, and reserves nothing more.
#[tokio::test]
async fn a_reserve_voided_before_it_ran_never_runs_and_one_that_ran_answers_its_outcome() {
    let engine = Engine::start().await;
    engine
        .request(Endpoint::StockReceive, json!({"sku": "A1", "qty": 5}))
        .await;
    let reserve = |order: &str| {
        let (body, id) = (
            json!({"sku": "A1", "order_id": order, "qty": 2}),
            format!("saga:{order}:reserve:A1"),
        );
        let engine = &engine;
        async move {
            engine
                .request_with_id(Endpoint::StockReserve, body, &id)
                .await
        }
    };

    // Not run yet: voided.
    let voided = resolve_reserve(&engine, "o-1").await.unwrap();
    assert_eq!(outcome(&voided), "invalid_state", "{voided}");
    assert!(
        voided["error"]["message"]
            .as_str()
            .unwrap()
            .contains("voided")
    );
    // The late copy of the reserve gets the same answer and reserves nothing.
    assert_eq!(reserve("o-1").await, voided);
    assert_eq!(engine.event_counts().await, (0, 1), "only the receive");

    // Run already: the resolve answers its outcome and runs nothing more.
    let ran = reserve("o-2").await;
    assert_eq!(outcome(&ran), "ok", "{ran}");
    assert_eq!(resolve_reserve(&engine, "o-2").await.unwrap(), ran);
    assert_eq!(
        engine.event_counts().await,
        (0, 2),
        "the receive and one reserve"
    );

    // Only the saga's reserves can be voided.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(headers::VOID_IF_NOT_RUN, "true");
    let elsewhere = engine
        .try_request_with_headers(
            Endpoint::StockReceive.subject(),
            json!({"sku": "A1", "qty": 1}).to_string().into_bytes(),
            headers,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(outcome(&elsewhere), "invalid_command", "{elsewhere}");
}

/// Two different records written at one revision (a void racing a late reserve, two runs of one
/// id): the second is a conflict, never taken for a repeat of the first, whichever check the
/// server makes first (the expected sequence, as 2.15 does, or the message id).
#[tokio::test]
async fn two_different_outcome_records_at_one_revision_are_a_conflict_not_a_repeat() {
    let engine = Engine::start().await;
    let store = command_store(&engine).await;
    let outcomes = Outcomes::new(store);
    let record = |state| OutcomeRecord {
        command_id: "saga:o-1:reserve:A1".into(),
        fingerprint: "f".into(),
        state,
    };
    let appending = record(OutcomeState::Appending {
        category: "stock".into(),
        aggregate_id: "A1".into(),
        expected_last_seq: 1,
        batch: None,
    });
    let voided = record(OutcomeState::Rejected {
        reply: Reply::refused(ErrorCode::InvalidState, "voided"),
    });
    let written = outcomes.put(&voided, 0).await.unwrap();
    assert!(
        matches!(
            outcomes.put(&appending, 0).await,
            Err(ordo_eventstore::PublishError::Conflict { .. })
        ),
        "a different record at the same revision must be refused"
    );
    let (revision, stored) = outcomes.get("saga:o-1:reserve:A1").await.unwrap();
    assert_eq!((revision, stored), (written, Some(voided)));
}

/// A command that cannot be decided in 20 attempts is answered `conflict` ("try again"), and
/// nothing is appended. (An earlier run of the same id recorded an append after a sequence A1
/// never reaches: each attempt waits for that run's fate, which never comes.)
#[tokio::test]
async fn a_command_that_cannot_be_decided_in_20_attempts_is_a_conflict_and_appends_nothing() {
    let engine = Engine::start().await;
    let first = engine
        .request_with_id(
            Endpoint::StockReceive,
            json!({"sku": "A1", "qty": 1}),
            "first",
        )
        .await;
    assert_eq!(outcome(&first), "ok");
    let store = command_store(&engine).await;
    let body = br#"{"sku":"A1","qty":4}"#;
    record_receive_intent(&store, "stalled", body, 999, None).await;
    let reply = engine
        .request_bytes(
            Endpoint::StockReceive.subject(),
            body.to_vec(),
            Some("stalled"),
        )
        .await;
    assert_eq!(outcome(&reply), "conflict", "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gave up after 20 attempts"),
        "{reply}"
    );
    assert_eq!(
        engine.message_count("ORDO_STOCK").await,
        1,
        "nothing appended"
    );
}
