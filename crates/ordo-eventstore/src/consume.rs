//! How ordo's workers read the streams. [`Batches`] pulls a durable consumer continuously and
//! hands out what has arrived a batch at a time, and each [`Batch`] is settled as its worker
//! says: the saga intake and the notifier read so. A projector instance reads through a
//! [`Reader`] of its own, by sequence, without a consumer (the view's checkpoints say where it
//! is).
//! What a worker does with a batch is its own.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind, Message,
    consumer::{DeliverPolicy, PullConsumer, pull},
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
    pub async fn settle(self, settles: impl IntoIterator<Item = Settle>) {
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
    /// batch: for a consumer that handles messages concurrently.
    pub fn one_by_one(self) -> Vec<Delivery> {
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

/// One message of a stream as a [`Reader`] returns it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    /// The headers it was published with (a trace context, among others).
    pub headers: Option<async_nats::HeaderMap>,
    pub payload: bytes::Bytes,
}

/// A projector instance's reading of a stream, whole and in order, from a sequence on, without a
/// consumer: batches of stored messages asked for by sequence (JetStream's batch direct get),
/// the next asked for as soon as one is taken, and, at the stream's head, as soon as an event is
/// published (the reader listens to the stream's subjects) or every [`Reader::POLL`] otherwise.
///
/// Why no consumer: creating one, of any name, lets the creator change every consumer of the
/// stream (a create request names the consumer in its body and updates an existing one), and a
/// projector's credentials must not reach the saga's consumer. Reading by sequence needs only
/// the permission to read the stream, which a projector has anyway.
pub struct Reader {
    client: async_nats::Client,
    stream: jetstream::stream::Stream,
    /// When the stream read was created: one deleted and created again under the same name
    /// starts its sequences over, and must not be read as the same.
    created: i128,
    id: ConsumerId,
    /// The next sequence to ask for.
    next: u64,
    /// What was read and not returned yet: a `next` dropped before it returned (its caller
    /// turned to something else) leaves it for the next call, which returns it first.
    read: Vec<Stored>,
    max: usize,
    /// Where the answers to this reader's requests arrive: `<inbox>.<request>`.
    inbox: String,
    answers: async_nats::Subscriber,
    requests: u64,
    /// Every event published on the stream's subjects: a sign that there is more to read.
    published: async_nats::Subscriber,
}

/// The most messages one batch direct get returns.
const DIRECT_BATCH: usize = 1000;

impl Reader {
    /// When the stream this reader reads was created, in microseconds since the epoch.
    pub fn stream_created_micros(&self) -> i64 {
        (self.created / 1_000) as i64
    }

    /// How long a reader at the head waits for a sign of a new event before it asks anyway.
    pub const POLL: Duration = Duration::from_millis(250);

    /// Reads `id`'s stream from sequence `start`, in batches of up to `max` messages.
    pub async fn from(
        js: &jetstream::Context,
        id: ConsumerId,
        start: u64,
        max: usize,
    ) -> Result<Self, ConsumeError> {
        let client = js.client();
        let stream = stream_of(js, id).await?;
        let created = stream.cached_info().created.unix_timestamp_nanos();
        let published = client
            .subscribe(id.stream().subjects())
            .await
            .map_err(|err| ConsumeError::of(id, err))?;
        let inbox = client.new_inbox();
        let answers = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|err| ConsumeError::of(id, err))?;
        Ok(Self {
            client,
            stream,
            created,
            id,
            next: start.max(1),
            read: Vec::new(),
            max: max.max(1),
            inbox,
            answers,
            requests: 0,
            published,
        })
    }

    /// The next messages, in stream order: those stored from the next sequence on, up to `max`,
    /// waiting for the first as long as it takes. Cancel-safe: what a dropped call read is
    /// returned by the next one.
    pub async fn next(&mut self) -> Result<Vec<Stored>, ConsumeError> {
        loop {
            // Signs that came before this read are answered by it.
            while let Some(Some(_)) = futures::FutureExt::now_or_never(self.published.next()) {}
            if self.read().await? {
                return self.of_the_same_stream().await;
            }
            // At the head: a publish may reach this reader a moment before the stream stores
            // it, so a sign is followed by a few quick reads.
            if tokio::time::timeout(Self::POLL, self.published.next())
                .await
                .is_ok()
            {
                for pause in [1, 2, 4, 8, 16] {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    if self.read().await? {
                        return self.of_the_same_stream().await;
                    }
                }
            }
        }
    }

    /// What was read, if the stream is still the one this reader began on: read first and
    /// checked after, so that messages of a stream created again in between are never returned.
    async fn of_the_same_stream(&mut self) -> Result<Vec<Stored>, ConsumeError> {
        let created = self
            .stream
            .get_info()
            .await
            .map_err(|err| ConsumeError::of(self.id, err))?
            .created
            .unix_timestamp_nanos();
        if created != self.created {
            return Err(ConsumeError::of(
                self.id,
                format!(
                    "stream {} was deleted and created again while it was read",
                    self.id.stream()
                ),
            ));
        }
        Ok(std::mem::take(&mut self.read))
    }

    /// What the stream holds from the next sequence on, up to `max` messages (several batch
    /// direct gets, each of up to [`DIRECT_BATCH`]), without a hole.
    ///
    /// In a cluster a direct get is answered by any replica, and one that is catching up may
    /// lack a stretch of messages: what it returns past a hole is left, and the hole asked again
    /// (another replica, or the same one caught up, fills it). A hole that stays is returned as
    /// it is, for the caller to see.
    ///
    /// Keeps what it reads (with what an earlier call left) for [`Self::of_the_same_stream`];
    /// returns whether there is anything.
    async fn read(&mut self) -> Result<bool, ConsumeError> {
        let mut holes = 0;
        while self.read.len() < self.max {
            let wanted = (self.max - self.read.len()).min(DIRECT_BATCH);
            let mut batch = self.direct_batch(wanted).await?;
            let contiguous = batch
                .iter()
                .zip(self.next..)
                .take_while(|(stored, seq)| stored.seq == *seq)
                .count();
            if contiguous < batch.len() && holes < 10 {
                batch.truncate(contiguous);
                if batch.is_empty() && !self.read.is_empty() {
                    // What was read before the hole goes first; the hole is asked next time.
                    break;
                }
                if batch.is_empty() {
                    holes += 1;
                    tokio::time::sleep(Duration::from_millis(5 * holes)).await;
                    continue;
                }
            }
            if let Some(last) = batch.last() {
                self.next = last.seq + 1;
            }
            let whole = batch.len() == wanted;
            self.read.extend(batch);
            if !whole {
                break;
            }
        }
        Ok(!self.read.is_empty())
    }

    /// One batch direct get of up to `wanted` messages from the next sequence (ADR-31): the
    /// messages come one by one to this reader's inbox, and a status ends them (204: the batch
    /// is done; 404: nothing stored from that sequence on).
    async fn direct_batch(&mut self, wanted: usize) -> Result<Vec<Stored>, ConsumeError> {
        self.requests += 1;
        let request = self.requests.to_string();
        let reply = format!("{}.{request}", self.inbox);
        let body = serde_json::json!({"seq": self.next, "batch": wanted});
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{}", self.id.stream().name()),
                reply,
                body.to_string().into(),
            )
            .await
            .map_err(|err| ConsumeError::of(self.id, err))?;
        let mut batch = Vec::with_capacity(wanted);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), self.answers.next())
                .await
                .map_err(|_| ConsumeError::of(self.id, "no answer to a batch read within 5 s"))?
                .ok_or_else(|| ConsumeError::of(self.id, "the reader's inbox closed"))?;
            if !message.subject.ends_with(&format!(".{request}")) {
                continue; // The late answer of an earlier request that timed out.
            }
            match message.status {
                None => batch.push(stored(self.id, message)?),
                Some(status) if status.as_u16() == 204 || status.as_u16() == 404 => {
                    return Ok(batch);
                }
                Some(status) => {
                    return Err(ConsumeError::of(
                        self.id,
                        format!(
                            "batch read refused: {status} {}",
                            message.description.unwrap_or_default()
                        ),
                    ));
                }
            }
        }
    }
}

/// A direct get's answer as the message it returns.
fn stored(id: ConsumerId, message: async_nats::Message) -> Result<Stored, ConsumeError> {
    let seq = crate::header(&message, "Nats-Sequence")
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(|| ConsumeError::of(id, "a batch read's message has no sequence"))?;
    let subject = crate::header(&message, "Nats-Subject")
        .ok_or_else(|| ConsumeError::of(id, "a batch read's message has no subject"))?;
    Ok(Stored {
        seq,
        subject,
        headers: message.headers,
        payload: message.payload,
    })
}

/// How far behind the durable consumer `id` is: its events not yet delivered or delivered and
/// not acknowledged, and the stream sequence below which it has acknowledged everything. `None`
/// when it cannot be read (not created yet, NATS unreachable). (A view's projectors read
/// without a consumer: `progress` says how far they are.)
pub async fn backlog(js: &jetstream::Context, id: ConsumerId) -> Option<(u64, u64)> {
    let stream = js.get_stream_no_info(id.stream().name()).await.ok()?;
    let info = stream.consumer_info(id.name()).await.ok()?;
    Some((
        info.num_pending + info.num_ack_pending as u64,
        info.ack_floor.stream_sequence,
    ))
}
