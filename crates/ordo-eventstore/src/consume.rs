//! The one way ordo's workers read a durable consumer: [`Batches`] fetches a batch at a time,
//! and each [`Batch`] is settled as its worker says, by the consumer's ack policy. The projector
//! runtime, the saga intake and the notifier all read so; what they do with a batch is theirs.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind, Message,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer},
};
use futures::StreamExt;

use crate::ConsumerId;

/// What becomes of a message once its batch is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Handled: not delivered again.
    Ack,
    /// Not handled now: delivered again after this long.
    Nak(Duration),
}

#[derive(Debug, thiserror::Error)]
#[error("consumer {consumer}: {reason}")]
pub struct ConsumeError {
    pub consumer: ConsumerId,
    pub reason: String,
}

/// A durable consumer, read a batch at a time.
pub struct Batches {
    id: ConsumerId,
    consumer: PullConsumer,
    max: usize,
    wait: Duration,
}

impl Batches {
    /// The consumer `id`, created as the catalogue says if it is missing (an existing one is
    /// taken as it is). Batches of up to `max` messages; a fetch waits up to `wait` for one.
    pub async fn open(
        js: &jetstream::Context,
        id: ConsumerId,
        ack_wait: Duration,
        max: usize,
        wait: Duration,
    ) -> Result<Self, ConsumeError> {
        let error = |err: &dyn std::fmt::Display| ConsumeError {
            consumer: id,
            reason: err.to_string(),
        };
        let stream = js
            .get_stream(id.stream().name())
            .await
            .map_err(|err| error(&err))?;
        let consumer = stream
            .get_or_create_consumer(id.name(), id.config(DeliverPolicy::All, ack_wait))
            .await
            .map_err(|err| error(&err))?;
        Ok(Self {
            id,
            consumer,
            max,
            wait,
        })
    }

    /// The consumer `id`, created anew to deliver from stream sequence `start`: for a
    /// projector, whose checkpoint, not the consumer's acknowledgements, says where it is.
    pub async fn recreated_at(
        js: &jetstream::Context,
        id: ConsumerId,
        start: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Self, ConsumeError> {
        let error = |err: &dyn std::fmt::Display| ConsumeError {
            consumer: id,
            reason: err.to_string(),
        };
        let stream = js
            .get_stream(id.stream().name())
            .await
            .map_err(|err| error(&err))?;
        let _ = stream.delete_consumer(id.name()).await;
        let deliver = DeliverPolicy::ByStartSequence {
            start_sequence: start,
        };
        let consumer = stream
            .create_consumer(id.config(deliver, ConsumerId::ACK_WAIT))
            .await
            .map_err(|err| error(&err))?;
        Ok(Self {
            id,
            consumer,
            max,
            wait,
        })
    }

    /// The next batch: what is there, up to `max`, once at least one message is or `wait` has
    /// passed (then it may be empty).
    pub async fn next(&mut self) -> Result<Batch, ConsumeError> {
        let error = |err: &dyn std::fmt::Display| ConsumeError {
            consumer: self.id,
            reason: err.to_string(),
        };
        let mut fetched = self
            .consumer
            .fetch()
            .max_messages(self.max)
            .expires(self.wait)
            .messages()
            .await
            .map_err(|err| error(&err))?;
        let mut messages = Vec::new();
        while let Some(message) = fetched.next().await {
            messages.push(message.map_err(|err| error(&err))?);
        }
        Ok(Batch {
            id: self.id,
            messages,
        })
    }
}

/// Messages fetched together, in stream order.
pub struct Batch {
    id: ConsumerId,
    pub messages: Vec<Message>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Settles each message as `settles` says, in order. Under ack policy `all` (a
    /// projector's), a batch handled whole is acknowledged by its last message, and the reply
    /// to that acknowledgement waited for. A lost acknowledgement only means a redelivery, which
    /// every worker takes in again without effect.
    pub async fn settle(self, settles: impl IntoIterator<Item = Settle>) {
        let settles: Vec<Settle> = settles.into_iter().collect();
        debug_assert_eq!(settles.len(), self.messages.len(), "one settle per message");
        if self.id.ack_policy() == AckPolicy::All && settles.iter().all(|s| *s == Settle::Ack) {
            if let Some(last) = self.messages.last()
                && let Err(err) = last.double_ack().await
            {
                tracing::debug!(consumer = %self.id, %err, "ack not confirmed");
            }
            return;
        }
        for (message, settle) in self.messages.iter().zip(settles) {
            let kind = match settle {
                Settle::Ack => AckKind::Ack,
                Settle::Nak(delay) => AckKind::Nak(Some(delay)),
            };
            if let Err(err) = message.ack_with(kind).await {
                tracing::debug!(consumer = %self.id, %err, "ack not sent");
            }
        }
    }

    /// Every message delivered again after `delay`: the batch could not be handled.
    pub async fn retry_all(self, delay: Duration) {
        let count = self.messages.len();
        self.settle(std::iter::repeat_n(Settle::Nak(delay), count))
            .await;
    }
}
