//! The one consumer loop of the workers: a batch is what the consumer has, and each message is
//! settled as the worker says.

use std::time::Duration;

use async_nats::jetstream;
use ordo_eventstore::{
    ConsumerId, StreamDefinition,
    consume::{Batch, Batches, Settle},
    streams::apply_all,
};
use ordo_testkit::NatsServer;

/// A server with the streams and three messages on order o-1's subject (seq 1, 2, 3).
async fn three_order_messages() -> (NatsServer, jetstream::Context) {
    let server = NatsServer::start();
    let js = jetstream::new(server.client().await);
    apply_all(&js, &StreamDefinition::built_in()).await.unwrap();
    for n in 1..=3 {
        js.publish("ordo.order.events.o-1", format!("{n}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    (server, js)
}

/// The stream sequences of a batch.
fn seqs(batch: &Batch) -> Vec<u64> {
    batch
        .messages
        .iter()
        .map(|message| message.info().unwrap().stream_sequence)
        .collect()
}

/// Takes batches until `count` messages have come, settling each as `settle` says of its
/// sequence; returns the sequences in order. (A batch is what has arrived: three messages may come
/// as one batch or more.)
async fn take(batches: &mut Batches, count: usize, settle: impl Fn(u64) -> Settle) -> Vec<u64> {
    let mut taken = Vec::new();
    while taken.len() < count {
        let batch = next(batches).await;
        let seqs = seqs(&batch);
        batch.settle(seqs.iter().map(|seq| settle(*seq))).await;
        taken.extend(seqs);
    }
    taken
}

/// The next batch, which must come within 5 s.
async fn next(batches: &mut Batches) -> Batch {
    tokio::time::timeout(Duration::from_secs(5), batches.next())
        .await
        .expect("nothing was delivered again")
        .unwrap()
}

/// Whether nothing more is delivered within half a second.
async fn nothing_more(batches: &mut Batches) -> bool {
    tokio::time::timeout(Duration::from_millis(500), batches.next())
        .await
        .is_err()
}

#[tokio::test]
async fn a_message_asked_again_comes_back_alone_and_those_acknowledged_do_not() {
    let (_server, js) = three_order_messages().await;
    let mut batches = Batches::open(&js, ConsumerId::Notifier, Duration::from_secs(30), 10)
        .await
        .unwrap();
    let ask_again_for_2 = |seq| match seq {
        2 => Settle::Nak(Duration::ZERO),
        _ => Settle::Ack,
    };
    assert_eq!(take(&mut batches, 3, ask_again_for_2).await, [1, 2, 3]);
    assert_eq!(take(&mut batches, 1, |_| Settle::Ack).await, [2]);
    assert!(nothing_more(&mut batches).await, "all settled");
}
