//! [`EventStore`]: loads aggregates from their subjects and appends one event at a time with
//! optimistic concurrency. A moka cache keeps `(state, version, last sequence)` per aggregate; it
//! only saves loads: the conditional append is the one gate, and a conflict evicts the entry.

use std::{collections::HashMap, marker::PhantomData, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::{DirectGetErrorKind, Stream},
};
use chrono::Utc;
use futures::StreamExt;
use moka::future::Cache;
use ordo_domain::Aggregate;
use tracing::Instrument;

use crate::{
    aggregate_subject,
    envelope::{DecodeError, EventEnvelope, EventMetadata, RecordedEvent},
    publish::{Appended, PublishError, conditional_publish},
    stream_of,
};

/// The header naming the atomic batch an event was stored in (absent: stored on its own).
pub const BATCH_HEADER: &str = "Ordo-Batch-Id";

/// Aggregates with at most this many events are read by direct gets; longer histories through
/// an ordered consumer, which streams them in one go.
const DIRECT_GET_MAX_EVENTS: u64 = 16;

/// The stream of aggregate snapshots (streams/snapshots.json).
pub const SNAPSHOTS_STREAM: &str = crate::StreamId::Snapshots.name();
/// An aggregate gets a snapshot every this many events.
pub const SNAPSHOT_EVERY: u64 = 1_000;
/// Bumped when a state's shape or its `evolve` changes: older snapshots are then ignored.
/// (2: snapshots name their stream's creation; a SKU's state keeps no settled orders.)
const SNAPSHOT_FORMAT: u32 = 2;

/// A snapshot as stored: the state after event `version` (stream sequence `last_seq`) of the
/// stream created at `stream_created`. A stream deleted and created again under the same name
/// starts its sequences and versions over, so (version, sequence) alone could match an old
/// snapshot to a new history; the creation time tells the two streams apart, as it does for the
/// projectors' checkpoints.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot<S> {
    format: u32,
    stream_created: chrono::DateTime<Utc>,
    version: u64,
    last_seq: u64,
    state: S,
}

fn snapshot_subject(category: &str, aggregate_id: &str) -> String {
    format!("ordo.snapshots.{category}.{aggregate_id}")
}

/// Bytes of aggregate state kept in memory per aggregate type (each weighed by
/// `Aggregate::weight`): many small states or a few large ones, never more than this.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("JetStream is unavailable: {0}")]
    Unavailable(String),
    #[error("event {seq} on {subject} cannot be read: {source}")]
    Corrupt {
        subject: String,
        seq: u64,
        source: DecodeError,
    },
}

/// An aggregate's state as of its last event.
pub struct Loaded<A: Aggregate> {
    pub state: A::State,
    /// How many events the aggregate has (0 for a new one).
    pub version: u64,
    /// The stream sequence of its last event (0 for a new one): the next append's expectation.
    pub last_seq: u64,
    /// The version of the newest snapshot known to exist (0: none).
    snapshot_version: u64,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> std::fmt::Debug for Loaded<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("state", &self.state)
            .field("version", &self.version)
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

impl<A: Aggregate> Clone for Loaded<A> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
            version: self.version,
            last_seq: self.last_seq,
            snapshot_version: self.snapshot_version,
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> Loaded<A> {
    pub fn new_aggregate() -> Self {
        Self {
            state: A::State::default(),
            version: 0,
            last_seq: 0,
            snapshot_version: 0,
            _aggregate: PhantomData,
        }
    }

    /// The state after `event`, stored at stream sequence `seq`.
    pub fn then(self, event: &A::Event, seq: u64) -> Self {
        Self {
            state: A::evolve(self.state, event),
            version: self.version + 1,
            last_seq: seq,
            snapshot_version: self.snapshot_version,
            _aggregate: PhantomData,
        }
    }
}

#[derive(Clone)]
pub struct EventStore {
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Arc<HashMap<String, Stream>>,
    /// When each opened stream was created: its identity, which snapshots must name.
    created: Arc<HashMap<String, chrono::DateTime<Utc>>>,
    snapshots: Option<Stream>,
    request_timeout: Duration,
    /// The one subscription that batch gets' answers come in on, made at the first.
    batch_gets: Arc<tokio::sync::OnceCell<BatchGets>>,
}

/// Where the answers of batch direct gets arrive: one subscription for all of them (a
/// subscription per request would have the server change its interest on every batch), each
/// request's answers told apart by the last token of its reply subject.
struct BatchGets {
    inbox: String,
    next: std::sync::atomic::AtomicU64,
    waiting: Arc<
        std::sync::Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<async_nats::Message>>>,
    >,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BatchGets {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BatchGets {
    async fn open(client: &async_nats::Client) -> Result<Self, LoadError> {
        let inbox = client.new_inbox();
        let mut answers = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|err| LoadError::Unavailable(err.to_string()))?;
        let waiting: Arc<std::sync::Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<_>>>> =
            Arc::default();
        let task = tokio::spawn({
            let waiting = waiting.clone();
            async move {
                while let Some(answer) = answers.next().await {
                    let id = answer
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|id| id.parse::<u64>().ok());
                    let waiter =
                        id.and_then(|id| waiting.lock().expect("not poisoned").get(&id).cloned());
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(answer);
                    }
                }
            }
        });
        Ok(Self {
            inbox,
            next: Default::default(),
            waiting,
            task,
        })
    }
}

impl EventStore {
    /// Opens the event store on streams that already exist (see [`crate::streams::apply_all`]).
    pub async fn open(
        client: async_nats::Client,
        streams_used: &[crate::StreamId],
    ) -> Result<Self, LoadError> {
        let js = jetstream::new(client.clone());
        let mut streams = HashMap::new();
        let mut created = HashMap::new();
        for id in streams_used {
            let name = id.name();
            let stream = js
                .get_stream(name)
                .await
                .map_err(|err| LoadError::Unavailable(format!("stream {name}: {err}")))?;
            let nanos = stream.cached_info().created.unix_timestamp_nanos();
            created.insert(
                name.to_owned(),
                chrono::DateTime::from_timestamp_nanos(nanos as i64),
            );
            streams.insert(name.to_owned(), stream);
        }
        // Optional: without it, every cold load replays the whole history.
        let snapshots = js.get_stream(SNAPSHOTS_STREAM).await.ok();
        Ok(Self {
            client,
            js,
            streams: Arc::new(streams),
            created: Arc::new(created),
            snapshots,
            request_timeout: Duration::from_secs(2),
            batch_gets: Arc::default(),
        })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn stream(&self, name: &str) -> &Stream {
        self.streams
            .get(name)
            .unwrap_or_else(|| panic!("stream {name} was not opened"))
    }

    /// The last message on `subject`, or `None` when it has none.
    pub async fn last_event(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<RecordedEvent>, LoadError> {
        recorded(
            self.stream(stream)
                .direct_get_last_for_subject(subject)
                .await,
        )
    }

    /// The first message on `subject` after stream sequence `after`, or `None`.
    pub async fn event_after(
        &self,
        stream: &str,
        subject: &str,
        after: u64,
    ) -> Result<Option<RecordedEvent>, LoadError> {
        recorded(
            self.stream(stream)
                .direct_get_next_for_subject(subject, Some(after + 1))
                .await,
        )
    }

    /// The next event on `subject` after sequence `after`, with the atomic batch it was stored in
    /// (its [`BATCH_HEADER`]), if it was stored in one.
    pub async fn event_after_in_batch(
        &self,
        stream: &str,
        subject: &str,
        after: u64,
    ) -> Result<Option<(RecordedEvent, Option<String>)>, LoadError> {
        let message = self
            .stream(stream)
            .direct_get_next_for_subject(subject, Some(after + 1))
            .await;
        let batch = message.as_ref().ok().and_then(|message| {
            message
                .headers
                .get(BATCH_HEADER)
                .map(|value| value.as_str().to_owned())
        });
        Ok(recorded(message)?.map(|event| (event, batch)))
    }

    /// Whether `stream` takes atomic batches (`allow_atomic`), as it was when the store opened.
    pub fn allows_atomic_batches(&self, stream: &str) -> bool {
        self.streams
            .get(stream)
            .is_some_and(|stream| stream.cached_info().config.allow_atomic_publish)
    }

    /// The last message of each of `subjects` that has one, `subject → (sequence, payload)`,
    /// in one request per 1,000 subjects: JetStream's batch direct get (`multi_last`, nats-server
    /// 2.11+). Any replica may answer, so a message just stored may be missing: use it where a
    /// conditional write checks what was read.
    pub async fn last_messages(
        &self,
        stream: &str,
        subjects: &[String],
    ) -> Result<HashMap<String, (u64, bytes::Bytes)>, LoadError> {
        let unavailable = |err: &dyn std::fmt::Display| LoadError::Unavailable(err.to_string());
        let gets = self
            .batch_gets
            .get_or_try_init(|| BatchGets::open(&self.client))
            .await?;
        let mut found = HashMap::new();
        for chunk in subjects.chunks(1000) {
            let id = gets.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (sender, mut answers) = tokio::sync::mpsc::unbounded_channel();
            gets.waiting
                .lock()
                .expect("not poisoned")
                .insert(id, sender);
            struct Forget<'a>(&'a BatchGets, u64);
            impl Drop for Forget<'_> {
                fn drop(&mut self) {
                    self.0.waiting.lock().expect("not poisoned").remove(&self.1);
                }
            }
            let _forget = Forget(gets, id);
            let request = serde_json::json!({"multi_last": chunk, "batch": chunk.len()});
            self.client
                .publish_with_reply(
                    format!("$JS.API.DIRECT.GET.{stream}"),
                    format!("{}.{id}", gets.inbox),
                    request.to_string().into(),
                )
                .await
                .map_err(|err| unavailable(&err))?;
            let read = async {
                while let Some(answer) = answers.recv().await {
                    if let Some(status) = answer.status {
                        // 204: the end of the batch; 404: none of the subjects has a message.
                        return match status.as_u16() {
                            204 | 404 => Ok(()),
                            other => Err(LoadError::Unavailable(format!(
                                "batch get on {stream}: status {other} {}",
                                answer.description.unwrap_or_default()
                            ))),
                        };
                    }
                    let header = |name: &str| crate::header(&answer, name);
                    let (Some(subject), Some(seq)) = (
                        header("Nats-Subject"),
                        header("Nats-Sequence").and_then(|seq| seq.parse::<u64>().ok()),
                    ) else {
                        return Err(LoadError::Unavailable(format!(
                            "batch get on {stream}: an answer without its subject or sequence"
                        )));
                    };
                    found.insert(subject, (seq, answer.payload));
                }
                Err(LoadError::Unavailable(format!(
                    "batch get on {stream}: answers ended"
                )))
            };
            tokio::time::timeout(self.request_timeout, read)
                .await
                .map_err(|_| {
                    LoadError::Unavailable(format!("batch get on {stream}: no answer in time"))
                })??;
        }
        Ok(found)
    }

    /// The stream sequence of the last message on `subject` (0 when it has none), as the stream
    /// leader knows it. Direct gets may be answered by any replica, one of which may lag; a
    /// decision that no conditional write will check (a refusal) is confirmed with this.
    pub async fn last_seq_from_leader(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<u64, LoadError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self
            .stream(stream)
            .get_last_raw_message_by_subject(subject)
            .await
        {
            Ok(message) => Ok(message.sequence),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(err) => Err(LoadError::Unavailable(err.to_string())),
        }
    }

    /// The message at stream sequence `seq`, or `None`.
    pub async fn event_at(
        &self,
        stream: &str,
        seq: u64,
    ) -> Result<Option<RecordedEvent>, LoadError> {
        recorded(self.stream(stream).direct_get(seq).await)
    }

    /// The aggregate's state: its latest snapshot (if any, and if it agrees with the stream)
    /// with the events after it folded in, else every event of its subject folded.
    pub async fn load<A: Aggregate>(&self, aggregate_id: &str) -> Result<Loaded<A>, LoadError> {
        let stream = stream_of::<A>();
        let subject = aggregate_subject(A::CATEGORY, aggregate_id);
        let Some(last) = self.last_event(stream, &subject).await? else {
            return Ok(Loaded::new_aggregate());
        };
        // A snapshot is taken every SNAPSHOT_EVERY events: a shorter history has none to read.
        let snapshot = if last.envelope.version >= SNAPSHOT_EVERY {
            self.snapshot::<A>(aggregate_id).await.filter(|snapshot| {
                snapshot.version <= last.envelope.version && snapshot.last_seq <= last.seq
            })
        } else {
            None
        };
        let from_snapshot = match snapshot {
            Some(snapshot) => self.fold_after(stream, &subject, snapshot, &last).await?,
            None => None,
        };
        // Without a snapshot, or with one that does not line up with the stream: the stream alone.
        let mut loaded = match from_snapshot {
            Some(loaded) => loaded,
            None => self
                .fold_after(stream, &subject, Loaded::new_aggregate(), &last)
                .await?
                .ok_or_else(|| LoadError::Unavailable(format!("{subject}: version gap")))?,
        };
        if loaded.version - loaded.snapshot_version >= SNAPSHOT_EVERY {
            // A long replay: the next cold load should not repeat it.
            self.save_snapshot(aggregate_id, &loaded).await;
            loaded.snapshot_version = loaded.version;
        }
        Ok(loaded)
    }

    /// `from` with the events after it up to `last` folded in; `None` when an event's version
    /// does not follow. A long history is folded as it is read, never held whole in memory.
    async fn fold_after<A: Aggregate>(
        &self,
        stream: &str,
        subject: &str,
        from: Loaded<A>,
        last: &RecordedEvent,
    ) -> Result<Option<Loaded<A>>, LoadError> {
        let remaining = last.envelope.version.saturating_sub(from.version);
        if remaining > DIRECT_GET_MAX_EVENTS {
            return self
                .fold_by_ordered_consumer(stream, subject, from, last.seq)
                .await;
        }
        let events = if remaining == 0 {
            Vec::new()
        } else if remaining == 1 {
            // The one event after `from` is the last: no read for it (the version check below
            // still holds it to following `from`).
            vec![last.clone()]
        } else {
            self.read_by_direct_get(stream, subject, from.last_seq, last)
                .await?
        };
        let mut loaded = from;
        for recorded in events {
            if recorded.envelope.version != loaded.version + 1 {
                return Ok(None);
            }
            loaded = loaded.then(&decode::<A::Event>(&recorded)?, recorded.seq);
        }
        Ok((loaded.last_seq == last.seq).then_some(loaded))
    }

    /// The aggregate's latest snapshot, if there is one that this build can read and that was
    /// taken of the stream as it is now (not of one deleted and created again since).
    async fn snapshot<A: Aggregate>(&self, aggregate_id: &str) -> Option<Loaded<A>> {
        let snapshots = self.snapshots.as_ref()?;
        let message = snapshots
            .direct_get_last_for_subject(snapshot_subject(A::CATEGORY, aggregate_id))
            .await
            .ok()?;
        let snapshot: Snapshot<A::State> = serde_json::from_slice(&message.payload).ok()?;
        let stream_created = *self.created.get(stream_of::<A>())?;
        let usable =
            snapshot.format == SNAPSHOT_FORMAT && snapshot.stream_created == stream_created;
        usable.then_some(Loaded {
            state: snapshot.state,
            version: snapshot.version,
            last_seq: snapshot.last_seq,
            snapshot_version: snapshot.version,
            _aggregate: PhantomData,
        })
    }

    /// Writes `loaded` as the aggregate's latest snapshot. A snapshot that cannot be written
    /// (too large, NATS busy) means a longer replay later: a warning and
    /// `ordo_snapshots_not_saved_total`, not an error of the command that triggered it.
    pub async fn save_snapshot<A: Aggregate>(&self, aggregate_id: &str, loaded: &Loaded<A>) {
        if self.snapshots.is_none() {
            return;
        }
        let Some(&stream_created) = self.created.get(stream_of::<A>()) else {
            return;
        };
        let snapshot = Snapshot {
            format: SNAPSHOT_FORMAT,
            stream_created,
            version: loaded.version,
            last_seq: loaded.last_seq,
            state: &loaded.state,
        };
        let Ok(payload) = serde_json::to_vec(&snapshot) else {
            return;
        };
        let payload_len = payload.len();
        let subject = snapshot_subject(A::CATEGORY, aggregate_id);
        let saved = async {
            self.js
                .publish(subject.clone(), payload.into())
                .await?
                .await
                .map_err(async_nats::Error::from)
        };
        let size = payload_len;
        let not_saved = |reason: &'static str, error: String| {
            tracing::warn!(
                subject,
                version = loaded.version,
                bytes = size,
                error,
                "snapshot not saved; the next cold load of this aggregate replays its events"
            );
            metrics::counter!(
                "ordo_snapshots_not_saved_total",
                "category" => A::CATEGORY,
                "reason" => reason,
            )
            .increment(1);
        };
        match tokio::time::timeout(self.request_timeout, saved).await {
            Ok(Ok(_)) => tracing::debug!(subject, version = loaded.version, "snapshot saved"),
            Ok(Err(err)) => not_saved("refused", err.to_string()),
            Err(_) => not_saved("timeout", "no acknowledgement in time".into()),
        }
    }

    async fn read_by_direct_get(
        &self,
        stream: &str,
        subject: &str,
        after: u64,
        last: &RecordedEvent,
    ) -> Result<Vec<RecordedEvent>, LoadError> {
        let mut events = Vec::new();
        let mut after = after;
        while after < last.seq {
            match self.event_after(stream, subject, after).await? {
                Some(event) if event.seq < last.seq => {
                    after = event.seq;
                    events.push(event);
                }
                _ => break,
            }
        }
        events.push(last.clone());
        Ok(events)
    }

    /// `from` with the events of `subject` from sequence `from.last_seq + 1` up to `last_seq`
    /// folded in as an ordered consumer streams them; `None` when a version does not follow.
    async fn fold_by_ordered_consumer<A: Aggregate>(
        &self,
        stream: &str,
        subject: &str,
        from: Loaded<A>,
        last_seq: u64,
    ) -> Result<Option<Loaded<A>>, LoadError> {
        let unavailable = |err: &dyn std::fmt::Display| LoadError::Unavailable(err.to_string());
        let consumer = self
            .stream(stream)
            .create_consumer(OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.last_seq + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|err| unavailable(&err))?;
        let mut messages = consumer.messages().await.map_err(|err| unavailable(&err))?;
        let mut loaded = from;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|err| unavailable(&err))?;
            let seq = message
                .info()
                .map_err(|err| unavailable(&err))?
                .stream_sequence;
            let envelope = EventEnvelope::from_bytes(&message.payload).map_err(|source| {
                LoadError::Corrupt {
                    subject: subject.to_owned(),
                    seq,
                    source,
                }
            })?;
            if envelope.version != loaded.version + 1 {
                return Ok(None);
            }
            let recorded = RecordedEvent {
                subject: subject.to_owned(),
                seq,
                envelope,
            };
            loaded = loaded.then(&decode::<A::Event>(&recorded)?, seq);
            if seq >= last_seq {
                break;
            }
        }
        Ok((loaded.last_seq == last_seq).then_some(loaded))
    }

    /// Appends `event` as the aggregate's next event, if nothing was appended since `loaded`.
    pub async fn append<A: Aggregate>(
        &self,
        aggregate_id: &str,
        loaded: &Loaded<A>,
        event: &A::Event,
        metadata: &EventMetadata,
    ) -> Result<Appended, PublishError> {
        let subject = aggregate_subject(A::CATEGORY, aggregate_id);
        let envelope = EventEnvelope::new(
            aggregate_id,
            loaded.version + 1,
            event,
            metadata,
            Utc::now(),
        );
        let started = std::time::Instant::now();
        let appended = conditional_publish(
            &self.client,
            &subject,
            envelope.headers(metadata),
            envelope.to_bytes().into(),
            &metadata.command_id,
            loaded.last_seq,
            self.request_timeout,
        )
        .instrument(tracing::info_span!(
            "append",
            otel.name = %format_args!("append {}", envelope.event_type),
            %subject,
            expected_seq = loaded.last_seq,
        ))
        .await;
        let category = A::CATEGORY;
        metrics::histogram!("ordo_append_duration_seconds", "category" => category)
            .record(started.elapsed().as_secs_f64());
        let outcome = match &appended {
            Ok(appended) if appended.duplicate => "duplicate",
            Ok(_) => "appended",
            Err(PublishError::Conflict { .. }) => "conflict",
            Err(_) => "failed",
        };
        metrics::counter!("ordo_appends_total", "category" => category, "outcome" => outcome)
            .increment(1);
        appended
    }

    /// A raw conditional publish on any stream of this store (used for command outcomes).
    pub async fn publish_if_last(
        &self,
        subject: &str,
        payload: Vec<u8>,
        msg_id: &str,
        expected_last_subject_seq: u64,
    ) -> Result<Appended, PublishError> {
        conditional_publish(
            &self.client,
            subject,
            async_nats::HeaderMap::new(),
            payload.into(),
            msg_id,
            expected_last_subject_seq,
            self.request_timeout,
        )
        .await
    }

    /// The last raw message on `subject`: `(sequence, payload)`.
    pub async fn last_message(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<(u64, bytes::Bytes)>, LoadError> {
        match self
            .stream(stream)
            .direct_get_last_for_subject(subject)
            .await
        {
            Ok(message) => Ok(Some((message.sequence, message.payload))),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(err) => Err(LoadError::Unavailable(err.to_string())),
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

/// The domain event of a recorded one; an unreadable event names its subject and sequence.
fn decode<E: ordo_domain::DomainEvent>(recorded: &RecordedEvent) -> Result<E, LoadError> {
    recorded
        .envelope
        .decode::<E>()
        .map_err(|source| LoadError::Corrupt {
            subject: recorded.subject.clone(),
            seq: recorded.seq,
            source,
        })
}

fn recorded(
    result: Result<jetstream::message::StreamMessage, jetstream::stream::DirectGetError>,
) -> Result<Option<RecordedEvent>, LoadError> {
    match result {
        Ok(message) => {
            let envelope = EventEnvelope::from_bytes(&message.payload).map_err(|source| {
                LoadError::Corrupt {
                    subject: message.subject.to_string(),
                    seq: message.sequence,
                    source,
                }
            })?;
            Ok(Some(RecordedEvent {
                subject: message.subject.to_string(),
                seq: message.sequence,
                envelope,
            }))
        }
        Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(err) => Err(LoadError::Unavailable(err.to_string())),
    }
}

/// An aggregate repository: the event store plus a cache of loaded aggregates of one type.
pub struct Repository<A: Aggregate> {
    store: EventStore,
    cache: Cache<String, Loaded<A>>,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<A: Aggregate> Repository<A> {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            cache: Cache::builder()
                .max_capacity(CACHE_BYTES)
                .weigher(|aggregate_id: &String, loaded: &Loaded<A>| {
                    let bytes = aggregate_id.len() + A::weight(&loaded.state);
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The cached aggregate, or its events folded from the stream.
    pub async fn load(&self, aggregate_id: &str) -> Result<Loaded<A>, LoadError> {
        if let Some(loaded) = self.cache.get(aggregate_id).await {
            return Ok(loaded);
        }
        let loaded = self.store.load::<A>(aggregate_id).await?;
        self.cache
            .insert(aggregate_id.to_owned(), loaded.clone())
            .await;
        Ok(loaded)
    }

    /// `loaded` brought up to date with the events stored after it, and cached. Cheap when it is
    /// a few events behind (one direct get per event, one more to see there are no others).
    pub async fn catch_up(
        &self,
        aggregate_id: &str,
        loaded: Loaded<A>,
    ) -> Result<Loaded<A>, LoadError> {
        let stream = stream_of::<A>();
        let subject = aggregate_subject(A::CATEGORY, aggregate_id);
        let mut current = loaded;
        while let Some(recorded) = self
            .store
            .event_after(stream, &subject, current.last_seq)
            .await?
        {
            if recorded.envelope.version != current.version + 1 {
                // Not the next event of what we hold (our state was wrong): read it all again.
                tracing::warn!(
                    subject,
                    seq = recorded.seq,
                    "version gap while catching up; reloading"
                );
                current = self.store.load::<A>(aggregate_id).await?;
                break;
            }
            current = current.then(&decode::<A::Event>(&recorded)?, recorded.seq);
        }
        self.cache
            .insert(aggregate_id.to_owned(), current.clone())
            .await;
        Ok(current)
    }

    /// Caches what a batch appended to the aggregate: `loaded` with `events` (each with its stream
    /// sequence) folded in, and a snapshot if one is due.
    pub async fn appended(
        &self,
        aggregate_id: &str,
        loaded: Loaded<A>,
        events: &[(&A::Event, u64)],
    ) {
        let mut next = loaded;
        for (event, seq) in events {
            next = next.then(event, *seq);
        }
        if next.version - next.snapshot_version >= SNAPSHOT_EVERY {
            // Off the command's path: a lost or late snapshot only means a longer replay, and
            // an older one overwriting a newer one is still a true state.
            next.snapshot_version = next.version;
            let (store, id, snapshot) = (self.store.clone(), aggregate_id.to_owned(), next.clone());
            tokio::spawn(async move { store.save_snapshot(&id, &snapshot).await });
        }
        self.cache.insert(aggregate_id.to_owned(), next).await;
    }

    /// Forgets the cached state: the next load reads the stream.
    pub async fn invalidate(&self, aggregate_id: &str) {
        self.cache.invalidate(aggregate_id).await;
    }

    /// Appends `event` after `loaded` and caches the result. After a conflict, [`Self::catch_up`]
    /// brings the state up to date; any other failure evicts the cached entry.
    pub async fn append(
        &self,
        aggregate_id: &str,
        loaded: Loaded<A>,
        event: &A::Event,
        metadata: &EventMetadata,
    ) -> Result<Appended, PublishError> {
        let result = self
            .store
            .append(aggregate_id, &loaded, event, metadata)
            .await;
        match &result {
            Ok(appended) if !appended.duplicate => {
                self.appended(aggregate_id, loaded, &[(event, appended.seq)])
                    .await;
            }
            Err(PublishError::Conflict { .. }) => {}
            _ => self.cache.invalidate(aggregate_id).await,
        }
        result
    }
}
