//! The one way ordo's workers read a durable consumer: [`Batches`] pulls continuously and hands
//! out what has arrived a batch at a time, and each [`Batch`] is settled as its worker says, by
//! the consumer's ack policy. The projector
//! runtime, the saga intake and the notifier all read so; what they do with a batch is theirs.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind, Message,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
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

impl ConsumeError {
    fn of(consumer: ConsumerId, err: impl std::fmt::Display) -> Self {
        Self {
            consumer,
            reason: err.to_string(),
        }
    }
}

/// The stream `id` reads.
async fn stream_of(
    js: &jetstream::Context,
    id: ConsumerId,
) -> Result<jetstream::stream::Stream, ConsumeError> {
    js.get_stream(id.stream().name())
        .await
        .map_err(|err| ConsumeError::of(id, err))
}

/// How often an idle pull hears from the server.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// A durable consumer, read a batch at a time.
pub struct Batches {
    id: ConsumerId,
    messages: futures::stream::ReadyChunks<pull::Stream>,
}

impl Batches {
    /// The consumer `id`, created as the catalogue says if it is missing (an existing one is
    /// taken as it is), read in batches of up to `max` messages.
    pub async fn open(
        js: &jetstream::Context,
        id: ConsumerId,
        ack_wait: Duration,
        max: usize,
    ) -> Result<Self, ConsumeError> {
        let consumer = stream_of(js, id)
            .await?
            .get_or_create_consumer(id.name(), id.config(DeliverPolicy::All, ack_wait))
            .await
            .map_err(|err| ConsumeError::of(id, err))?;
        Self::reading(id, consumer, max).await
    }

    /// The consumer `id`, created anew to deliver from stream sequence `start`: for a
    /// projector, whose checkpoint, not the consumer's acknowledgements, says where it is.
    pub async fn recreated_at(
        js: &jetstream::Context,
        id: ConsumerId,
        start: u64,
        max: usize,
    ) -> Result<Self, ConsumeError> {
        let stream = stream_of(js, id).await?;
        let _ = stream.delete_consumer(id.name()).await;
        let deliver = DeliverPolicy::ByStartSequence {
            start_sequence: start,
        };
        let consumer = stream
            .create_consumer(id.config(deliver, ConsumerId::ACK_WAIT))
            .await
            .map_err(|err| ConsumeError::of(id, err))?;
        Self::reading(id, consumer, max).await
    }

    /// A continuous pull of `consumer`: the server keeps up to `max` messages on their way to
    /// this client while a batch is handled, so that the next batch is there when it is done.
    async fn reading(
        id: ConsumerId,
        consumer: PullConsumer,
        max: usize,
    ) -> Result<Self, ConsumeError> {
        // Heartbeats as `consumer.messages()` has them: a pull the server lost is noticed, and the
        // stream errs for the worker to start again, rather than waiting out its expiry.
        let messages = consumer
            .stream()
            .max_messages_per_batch(max)
            .heartbeat(HEARTBEAT)
            .messages()
            .await
            .map_err(|err| ConsumeError::of(id, err))?;
        Ok(Self {
            id,
            messages: messages.ready_chunks(max),
        })
    }

    /// The next batch: the messages that have arrived, up to `max`, waiting for the first.
    pub async fn next(&mut self) -> Result<Batch, ConsumeError> {
        let arrived = self
            .messages
            .next()
            .await
            .ok_or_else(|| ConsumeError::of(self.id, "the consumer's messages ended"))?;
        let messages = arrived
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| ConsumeError::of(self.id, err))?;
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

    /// Settles each message as `settles` says, in order; a message without one is left to be
    /// delivered again after its ack wait. A lost acknowledgement only means a redelivery, which
    /// every worker takes in again without effect.
    ///
    /// Under ack policy `all` (a projector's) an acknowledgement also acknowledges every message
    /// before it: the leading messages settled `Ack` are acknowledged by the last of them (its
    /// reply waited for), the first one not is asked again, and those after it are left. (A later
    /// batch's acknowledgement would still cover it: a consumer under policy `all` acknowledges
    /// or stops, as the projector does.)
    pub async fn settle(self, settles: impl IntoIterator<Item = Settle>) {
        let settles: Vec<Settle> = settles.into_iter().collect();
        if self.id.ack_policy() == AckPolicy::All {
            let acked = settles
                .iter()
                .take_while(|settle| **settle == Settle::Ack)
                .count()
                .min(self.messages.len());
            if let Some(last) = acked.checked_sub(1).map(|i| &self.messages[i])
                && let Err(err) = last.double_ack().await
            {
                tracing::debug!(consumer = %self.id, %err, "ack not confirmed");
            }
            if let (Some(message), Some(Settle::Nak(delay))) =
                (self.messages.get(acked), settles.get(acked))
            {
                nak(self.id, message, *delay).await;
            }
            return;
        }
        for (message, settle) in self.messages.iter().zip(settles) {
            match settle {
                Settle::Ack => {
                    if let Err(err) = message.ack().await {
                        tracing::debug!(consumer = %self.id, %err, "ack not sent");
                    }
                }
                Settle::Nak(delay) => nak(self.id, message, delay).await,
            }
        }
    }

    /// Each message on its own, to be settled as soon as it is handled rather than with the
    /// batch: for a consumer that handles messages concurrently (ack policy explicit; under
    /// policy `all` one settle would settle others).
    pub fn one_by_one(self) -> Vec<Delivery> {
        assert_eq!(
            self.id.ack_policy(),
            AckPolicy::Explicit,
            "{} acknowledges batches, not messages",
            self.id
        );
        let id = self.id;
        self.messages
            .into_iter()
            .map(|message| Delivery { id, message })
            .collect()
    }

    /// Every message delivered again after `delay`: the batch could not be handled.
    pub async fn retry_all(self, delay: Duration) {
        let count = self.messages.len();
        self.settle(std::iter::repeat_n(Settle::Nak(delay), count))
            .await;
    }
}

async fn nak(consumer: ConsumerId, message: &Message, delay: Duration) {
    if let Err(err) = message.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::debug!(%consumer, %err, "nak not sent");
    }
}

/// One message of a batch, settled on its own.
pub struct Delivery {
    id: ConsumerId,
    pub message: Message,
}

impl Delivery {
    pub async fn settle(self, settle: Settle) {
        match settle {
            Settle::Ack => {
                if let Err(err) = self.message.ack().await {
                    tracing::debug!(consumer = %self.id, %err, "ack not sent");
                }
            }
            Settle::Nak(delay) => nak(self.id, &self.message, delay).await,
        }
    }
}
