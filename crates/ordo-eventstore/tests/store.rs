//! The event store against a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use ordo_domain::{
    OrderId,
    stock::{StockAggregate, StockEvent},
};
use ordo_eventstore::{
    EventMetadata, EventStore, LoadError, Loaded, PublishError, Repository, StreamDefinition,
    streams::{Applied, Ensured, apply_all, ensure_all},
};
use ordo_testkit::NatsServer;

async fn open() -> (NatsServer, EventStore) {
    let server = NatsServer::start();
    let client = server.client().await;
    apply_all(
        &jetstream::new(client.clone()),
        &StreamDefinition::built_in(),
    )
    .await
    .unwrap();
    let store = EventStore::open(
        client,
        &[
            ordo_eventstore::StreamId::Orders,
            ordo_eventstore::StreamId::Stock,
        ],
    )
    .await
    .unwrap();
    (server, store)
}

fn metadata(command_id: &str) -> EventMetadata {
    EventMetadata {
        command_id: command_id.into(),
        correlation_id: command_id.into(),
        ..Default::default()
    }
}

fn reserved(order: &str) -> StockEvent {
    StockEvent::StockReserved {
        order_id: OrderId::parse(order).unwrap(),
        qty: 1,
    }
}

/// Appends `events` to `sku` one after the other, as commands would.
async fn append_all(
    store: &EventStore,
    sku: &str,
    events: &[StockEvent],
) -> Loaded<StockAggregate> {
    let mut loaded = store.load::<StockAggregate>(sku).await.unwrap();
    for (i, event) in events.iter().enumerate() {
        store
            .append::<StockAggregate>(sku, &loaded, event, &metadata(&format!("{sku}-{i}")))
            .await
            .unwrap();
        loaded = store.load::<StockAggregate>(sku).await.unwrap();
    }
    loaded
}

#[tokio::test]
async fn a_new_aggregate_loads_as_version_0_at_sequence_0() {
    let (_server, store) = open().await;
    let loaded = store.load::<StockAggregate>("A1").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.last_seq, loaded.state),
        (0, 0, None)
    );
}

#[tokio::test]
async fn an_append_after_a_stale_load_is_a_typed_conflict() {
    let (_server, store) = open().await;
    let stale = store.load::<StockAggregate>("A1").await.unwrap();
    store
        .append::<StockAggregate>(
            "A1",
            &stale,
            &StockEvent::StockReceived { qty: 5 },
            &metadata("c1"),
        )
        .await
        .unwrap();
    let second = store
        .append::<StockAggregate>(
            "A1",
            &stale,
            &StockEvent::StockReceived { qty: 5 },
            &metadata("c2"),
        )
        .await;
    assert_eq!(
        second,
        Err(PublishError::Conflict {
            subject: "ordo.stock.events.A1".into(),
            expected: 0
        })
    );
}

#[tokio::test]
async fn a_retried_append_is_stored_once() {
    let (_server, store) = open().await;
    let loaded = store.load::<StockAggregate>("A1").await.unwrap();
    let event = StockEvent::StockReceived { qty: 5 };
    let first = store
        .append::<StockAggregate>("A1", &loaded, &event, &metadata("once"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    // The server checks the expected sequence before the message id: the same append sent again
    // is a conflict (the command handler then finds its own event through its outcome record).
    let again = store
        .append::<StockAggregate>("A1", &loaded, &event, &metadata("once"))
        .await;
    assert!(
        matches!(again, Err(PublishError::Conflict { .. })),
        "{again:?}"
    );
    // Where the expectation still holds, the message id alone stops the second copy.
    let elsewhere = store.load::<StockAggregate>("B1").await.unwrap();
    let duplicate = store
        .append::<StockAggregate>("B1", &elsewhere, &event, &metadata("once"))
        .await
        .unwrap();
    assert!(duplicate.duplicate);
    assert_eq!(duplicate.seq, first.seq);
    assert_eq!(store.load::<StockAggregate>("A1").await.unwrap().version, 1);
}

#[tokio::test]
async fn loading_folds_only_the_aggregates_own_events_by_both_read_paths() {
    let (_server, store) = open().await;
    // Short histories are read by direct gets, long ones through an ordered consumer.
    for (sku, reservations) in [("SHORT", 3), ("LONG", 40)] {
        let mut events = vec![StockEvent::StockReceived { qty: 100 }];
        events.extend((0..reservations).map(|i| reserved(&format!("o-{i}"))));
        append_all(&store, sku, &events).await;
        // Interleave another aggregate's events so that the subject filter matters.
        append_all(
            &store,
            &format!("{sku}-OTHER"),
            &[StockEvent::StockReceived { qty: 1 }],
        )
        .await;
    }
    for (sku, reservations) in [("SHORT", 3u64), ("LONG", 40)] {
        let loaded = store.load::<StockAggregate>(sku).await.unwrap();
        let stock = loaded.state.unwrap();
        assert_eq!(loaded.version, reservations + 1, "{sku}");
        assert_eq!(
            (stock.on_hand, stock.reserved),
            (100, reservations),
            "{sku}"
        );
        assert_eq!(stock.reservations.len() as u64, reservations);
    }
}

#[tokio::test]
async fn catching_up_folds_what_another_instance_appended() {
    let (_server, store) = open().await;
    let repository = Repository::<StockAggregate>::new(store.clone());
    append_all(&store, "A1", &[StockEvent::StockReceived { qty: 5 }]).await;
    let cached = repository.load("A1").await.unwrap();
    // Another instance appends twice behind this repository's back.
    let mut other = store.load::<StockAggregate>("A1").await.unwrap();
    for (i, event) in [reserved("o-1"), reserved("o-2")].iter().enumerate() {
        store
            .append::<StockAggregate>("A1", &other, event, &metadata(&format!("other-{i}")))
            .await
            .unwrap();
        other = store.load::<StockAggregate>("A1").await.unwrap();
    }
    let stale = repository.load("A1").await.unwrap();
    assert_eq!(
        stale.version, cached.version,
        "the cache alone does not see it"
    );
    let current = repository.catch_up("A1", stale).await.unwrap();
    assert_eq!(
        (current.version, current.last_seq),
        (other.version, other.last_seq)
    );
    assert_eq!(current.state, other.state);
}

#[tokio::test]
async fn an_unreadable_event_is_reported_with_its_sequence_not_skipped() {
    let (server, store) = open().await;
    append_all(&store, "A1", &[StockEvent::StockReceived { qty: 5 }]).await;
    let js = jetstream::new(server.client().await);
    let ack = js
        .publish("ordo.stock.events.A1", "not an envelope".into())
        .await
        .unwrap()
        .await
        .unwrap();
    match store.load::<StockAggregate>("A1").await {
        Err(LoadError::Corrupt { subject, seq, .. }) => {
            assert_eq!(
                (subject.as_str(), seq),
                ("ordo.stock.events.A1", ack.sequence)
            );
        }
        other => panic!("expected a corrupt-event error, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_updates_a_stream_whose_definition_changed_and_leaves_the_rest() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    let mut definitions = StreamDefinition::built_in();
    apply_all(&js, &definitions).await.unwrap();
    definitions[1].config.duplicate_window = Duration::from_secs(30);
    let applied = apply_all(&js, &definitions).await.unwrap();
    let applied: Vec<(&str, Applied)> = applied
        .iter()
        .map(|(name, what)| (name.as_str(), *what))
        .collect();
    assert_eq!(
        applied,
        [
            (ordo_eventstore::StreamId::Orders.name(), Applied::Unchanged),
            (ordo_eventstore::StreamId::Stock.name(), Applied::Updated),
            ("ORDO_COMMAND_OUTCOMES", Applied::Unchanged),
            ("ORDO_SNAPSHOTS", Applied::Unchanged)
        ]
    );
    let mut stock = js
        .get_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap();
    assert_eq!(
        stock.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(30)
    );
}

#[tokio::test]
async fn the_leader_says_which_event_is_an_aggregates_last() {
    let (_server, store) = open().await;
    assert_eq!(
        store
            .last_seq_from_leader(
                ordo_eventstore::StreamId::Stock.name(),
                "ordo.stock.events.A1"
            )
            .await
            .unwrap(),
        0
    );
    append_all(&store, "B2", &[StockEvent::StockReceived { qty: 1 }]).await;
    let loaded = append_all(
        &store,
        "A1",
        &[StockEvent::StockReceived { qty: 2 }, reserved("o-1")],
    )
    .await;
    assert_eq!(
        store
            .last_seq_from_leader(
                ordo_eventstore::StreamId::Stock.name(),
                "ordo.stock.events.A1"
            )
            .await
            .unwrap(),
        loaded.last_seq
    );
}

/// Writes `count` StockReceived events of one unit to `sku`, pipelined (as a long past would have
/// left them), without any snapshot.
async fn long_past(client: &async_nats::Client, sku: &str, from_version: u64, count: u64) {
    let js = jetstream::new(client.clone());
    let mut acks = Vec::new();
    for version in from_version..from_version + count {
        let envelope = ordo_eventstore::EventEnvelope::new(
            sku,
            version,
            &StockEvent::StockReceived { qty: 1 },
            &metadata(&format!("{sku}-{version}")),
            chrono::Utc::now(),
        );
        acks.push(
            js.publish(
                format!("ordo.stock.events.{sku}"),
                envelope.to_bytes().into(),
            )
            .await
            .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

#[tokio::test]
async fn a_long_history_is_loaded_from_its_snapshot_and_the_events_after_it() {
    let (_server, store) = open().await;
    let client = store.client().clone();
    long_past(&client, "LONG", 1, 2_500).await;

    // The first cold load replays everything, and leaves a snapshot behind.
    let replayed = store.load::<StockAggregate>("LONG").await.unwrap();
    assert_eq!(
        (replayed.version, replayed.state.unwrap().on_hand),
        (2_500, 2_500)
    );
    let snapshots = jetstream::new(client.clone())
        .get_stream("ORDO_SNAPSHOTS")
        .await
        .unwrap();
    let snapshot = snapshots
        .direct_get_last_for_subject("ordo.snapshots.stock.LONG")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&snapshot.payload).contains("\"version\":2500"));

    // Later events are folded onto the snapshot: the same state as a full replay.
    long_past(&client, "LONG", 2_501, 20).await;
    let loaded = store.load::<StockAggregate>("LONG").await.unwrap();
    assert_eq!(
        (loaded.version, loaded.state.unwrap().on_hand),
        (2_520, 2_520)
    );

    // A snapshot this build cannot read, or one that does not line up with the stream, is
    // ignored: the stream is the truth.
    let created = stream_created(&client).await;
    for garbage in [
        "not json".to_owned(),
        r#"{"format":1,"version":2000,"last_seq":2000,"state":{"on_hand":7,"reserved":0,"reservations":{},"settled":[]}}"#.to_owned(),
        format!(r#"{{"format":2,"stream_created":"{created}","version":9999999,"last_seq":9999999,"state":{{"on_hand":1,"reserved":0,"reservations":{{}}}}}}"#),
        format!(r#"{{"format":2,"stream_created":"{created}","version":2000,"last_seq":1,"state":{{"on_hand":7,"reserved":0,"reservations":{{}}}}}}"#),
    ] {
        jetstream::new(client.clone())
            .publish("ordo.snapshots.stock.LONG", garbage.into())
            .await
            .unwrap()
            .await
            .unwrap();
        let loaded = store.load::<StockAggregate>("LONG").await.unwrap();
        assert_eq!((loaded.version, loaded.state.unwrap().on_hand), (2_520, 2_520));
    }
}

/// When ORDO_STOCK was created, as a snapshot names it.
async fn stream_created(client: &async_nats::Client) -> String {
    let mut stream = jetstream::new(client.clone())
        .get_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap();
    let nanos = stream.info().await.unwrap().created.unix_timestamp_nanos();
    serde_json::to_value(chrono::DateTime::from_timestamp_nanos(nanos as i64))
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// A stream deleted and created again starts its sequences and versions over. A SKU whose new
/// history reaches the (version, sequence) of a snapshot of the old stream must not load the old
/// state: a snapshot names the stream it was taken of.
#[tokio::test]
async fn a_snapshot_of_a_deleted_stream_is_not_taken_for_one_of_its_successor() {
    let (_server, store) = open().await;
    let client = store.client().clone();
    long_past(&client, "RE", 1, 1_000).await;
    let old = store.load::<StockAggregate>("RE").await.unwrap();
    assert_eq!(
        (old.version, old.last_seq, old.state.unwrap().on_hand),
        (1_000, 1_000, 1_000)
    );

    // The stock stream is deleted and created again; the snapshots are kept.
    let js = jetstream::new(client.clone());
    js.delete_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap();
    apply_all(&js, &StreamDefinition::built_in()).await.unwrap();
    let store = EventStore::open(client.clone(), &[ordo_eventstore::StreamId::Stock])
        .await
        .unwrap();
    // A new history of the same length: 1,000 receipts of 2 units.
    let mut acks = Vec::new();
    for version in 1..=1_000 {
        let envelope = ordo_eventstore::EventEnvelope::new(
            "RE",
            version,
            &StockEvent::StockReceived { qty: 2 },
            &metadata(&format!("again-{version}")),
            chrono::Utc::now(),
        );
        acks.push(
            js.publish("ordo.stock.events.RE", envelope.to_bytes().into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let loaded = store.load::<StockAggregate>("RE").await.unwrap();
    assert_eq!((loaded.version, loaded.last_seq), (1_000, 1_000));
    assert_eq!(
        loaded.state.unwrap().on_hand,
        2_000,
        "the old stream's snapshot was used"
    );
}

#[tokio::test]
async fn ensure_creates_missing_streams_and_never_changes_a_running_one() {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    // An operator set ORDO_STOCK up differently (here: a shorter duplicate window).
    let mut operators = StreamDefinition::built_in();
    operators[1].config.duplicate_window = Duration::from_secs(30);
    apply_all(&js, &operators[1..2]).await.unwrap();

    // A component started with the defaults creates the missing streams, and only reports ORDO_STOCK.
    let ensured = ensure_all(&js, &StreamDefinition::built_in())
        .await
        .unwrap();
    let ensured: Vec<(&str, &Ensured)> = ensured
        .iter()
        .map(|(name, what)| (name.as_str(), what))
        .collect();
    assert_eq!(
        ensured,
        [
            (ordo_eventstore::StreamId::Orders.name(), &Ensured::Created),
            (
                ordo_eventstore::StreamId::Stock.name(),
                &Ensured::Differs(vec!["duplicate_window".into()])
            ),
            ("ORDO_COMMAND_OUTCOMES", &Ensured::Created),
            ("ORDO_SNAPSHOTS", &Ensured::Created),
        ]
    );
    let live = js
        .get_stream(ordo_eventstore::StreamId::Stock.name())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(
        live.duplicate_window,
        Duration::from_secs(30),
        "left as the operator set it"
    );

    // Replicas come from configuration, for every definition alike.
    let three = StreamDefinition::built_in()
        .into_iter()
        .map(|definition| definition.with_replicas(3));
    assert!(
        three
            .into_iter()
            .all(|definition| definition.config.num_replicas == 3)
    );
}

/// A message for an atomic batch, conditional on `expected` when given.
fn batch_message(
    subject: &str,
    expected: Option<u64>,
    msg_id: &str,
) -> ordo_eventstore::publish::BatchMessage {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    if let Some(expected) = expected {
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
    }
    ordo_eventstore::publish::BatchMessage {
        subject: subject.to_owned(),
        headers,
        payload: "{}".into(),
    }
}

#[tokio::test]
async fn an_atomic_batch_is_stored_whole_or_not_at_all_and_a_stale_expectation_fails_it() {
    use ordo_eventstore::publish::atomic_publish;
    let (server, _store) = open().await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let timeout = Duration::from_secs(2);
    js.publish("ordo.stock.events.A", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // A writer that read A before its first event (a stale owner): nothing of its batch lands,
    // not even the event on B, whose own expectation holds.
    let stale = vec![
        batch_message("ordo.stock.events.B", Some(0), "b-1"),
        batch_message("ordo.stock.events.A", Some(0), "a-stale"),
    ];
    let refused = atomic_publish(&client, stale, timeout).await;
    assert!(
        matches!(refused, Err(PublishError::Conflict { .. })),
        "{refused:?}"
    );
    let stream = js.get_stream("ORDO_STOCK").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);

    // The first event of each subject carries the expectation; a second one on the same
    // subject carries none (the batch is atomic). The sequences follow one another.
    let current = vec![
        batch_message("ordo.stock.events.B", Some(0), "b-1"),
        batch_message("ordo.stock.events.A", Some(1), "a-2"),
        batch_message("ordo.stock.events.A", None, "a-3"),
    ];
    assert_eq!(
        atomic_publish(&client, current, timeout).await.unwrap(),
        vec![2, 3, 4]
    );

    // Sent again (its answer lost, say): a message id already stored fails the whole batch.
    let again = vec![
        batch_message("ordo.stock.events.C", Some(0), "c-1"),
        batch_message("ordo.stock.events.B", Some(2), "b-1"),
    ];
    assert!(atomic_publish(&client, again, timeout).await.is_err());
    assert_eq!(stream.get_info().await.unwrap().state.messages, 4);
}
