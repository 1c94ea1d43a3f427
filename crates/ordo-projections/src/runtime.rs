//! [`Projector`]: one projection's worker. See the crate documentation for the guarantees.

use std::{
    collections::BTreeMap, convert::Infallible, future::Future, marker::PhantomData, time::Duration,
};

use async_nats::jetstream;
use ordo_eventstore::{
    EventEnvelope, OwnershipConfig, Partition, RecordedEvent,
    backoff::Backoff,
    consume::Reader,
    partition::DEFAULT_PARTITIONS,
    partition_of,
    progress::Reporter,
    terms::{self, LeasesStopped, Membership},
    trace,
};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::{ApplyError, Projection, schema};

/// The PostgreSQL channel on which every batch announces its view's new checkpoint.
pub const CHECKPOINT_CHANNEL: &str = "ordo_checkpoints";

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Events fetched, and applied in one transaction, at most.
    pub batch_size: usize,
    /// Tries of an event that fails before it is parked.
    pub max_attempts: u32,
    /// The first pause between tries; it doubles each time.
    pub retry_base: Duration,
    /// The partitions of the view, spread over its projector instances (the command service's
    /// count: every instance of every group uses the same).
    pub partitions: u32,
    /// Replicas of the partition lease bucket, when this instance creates it.
    pub replicas: usize,
    /// How many transactions a rebuild applies at once, each to its share of the partitions
    /// (a live projector applies one at a time).
    pub rebuild_lanes: usize,
}

impl ProjectorConfig {
    /// For a rebuild: batches of 10,000 events. A larger batch folds more of an order's events
    /// into one row written (placed and confirmed become one insert, not an insert and an
    /// update) and pays a transaction's fixed cost less often; the live projector keeps batches
    /// small, for latency.
    pub fn for_rebuild() -> Self {
        Self {
            batch_size: 10_000,
            rebuild_lanes: 2,
            ..Self::default()
        }
    }
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            max_attempts: 5,
            retry_base: Duration::from_millis(100),
            partitions: DEFAULT_PARTITIONS,
            replicas: 1,
            rebuild_lanes: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("PostgreSQL is unavailable: {0}")]
    Unavailable(String),
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error(
        "the checkpoint of a partition of {stream} moved since this instance read it: another \
         instance took the partition over, or a rebuild swapped the view"
    )]
    Fenced { stream: String },
    #[error(
        "the view in schema {schema} keeps the checkpoints of {found} partitions, and this \
         projector runs with {configured}: run every instance with {found} partitions, or rebuild \
         the view (`ordo projections rebuild {name}`) to change its count"
    )]
    PartitionCountDiffers {
        schema: String,
        name: String,
        found: usize,
        configured: u32,
    },
    #[error("expected event {expected} next but got {got}: reading again from the checkpoint")]
    Gap { expected: u64, got: u64 },
    #[error("a rebuild of {name} is already running; this one did not start")]
    RebuildRunning { name: String },
    #[error(
        "the view was built from another {stream} ({reason}); it is left as it is. Rebuild it \
         (`ordo projections rebuild`) or point ORDO_DATABASE_URL at the database of this stream"
    )]
    ForeignStream { stream: String, reason: String },
    #[error(
        "the view in schema {schema} was built from another definition ({found}); it is left as \
         it is. Rebuild it: `ordo projections rebuild {name}`"
    )]
    OutdatedView {
        schema: String,
        name: String,
        found: String,
    },
}

/// One fetched message: its sequence, subject and payload, read as an envelope if it is one.
pub(crate) struct Fetched {
    pub(crate) seq: u64,
    pub(crate) subject: String,
    payload: Vec<u8>,
    envelope: Result<EventEnvelope, String>,
}

impl Fetched {
    pub(crate) fn new(seq: u64, subject: String, payload: Vec<u8>) -> Self {
        let envelope = EventEnvelope::from_bytes(&payload).map_err(|err| err.to_string());
        Self {
            seq,
            subject,
            payload,
            envelope,
        }
    }
}

impl Fetched {
    fn recorded(&self) -> Result<RecordedEvent, ApplyError> {
        match &self.envelope {
            Ok(envelope) => Ok(RecordedEvent {
                subject: self.subject.clone(),
                seq: self.seq,
                envelope: envelope.clone(),
            }),
            Err(reason) => Err(ApplyError::Rejected(reason.clone())),
        }
    }
}

/// The partitions a projector instance applies in a term, and the checkpoint of each: every event
/// of a partition at or below its checkpoint is in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lanes {
    pub(crate) partitions: u32,
    pub(crate) checkpoints: BTreeMap<Partition, u64>,
}

impl Lanes {
    /// Where the term's reader starts: after the checkpoint of the partition furthest behind.
    pub(crate) fn start(&self) -> u64 {
        self.checkpoints.values().copied().min().unwrap_or(0)
    }

    /// These partitions dealt into `count` lanes (partition modulo `count`), each to be applied
    /// on its own.
    pub(crate) fn split(self, count: usize) -> Vec<Lanes> {
        let count = count.clamp(1, self.checkpoints.len().max(1));
        let mut lanes: Vec<Lanes> = (0..count)
            .map(|_| Lanes {
                partitions: self.partitions,
                checkpoints: BTreeMap::new(),
            })
            .collect();
        for (partition, checkpoint) in self.checkpoints {
            lanes[partition as usize % count]
                .checkpoints
                .insert(partition, checkpoint);
        }
        lanes
    }

    /// Whether the event at `seq` on `subject` is one of these partitions' and not in the view.
    pub(crate) fn takes(&self, subject: &str, seq: u64) -> bool {
        let aggregate_id = subject.rsplit('.').next().unwrap_or(subject);
        self.checkpoints
            .get(&partition_of(aggregate_id, self.partitions))
            .is_some_and(|checkpoint| seq > *checkpoint)
    }

    /// Every partition's checkpoint once the events up to `to` are in the view.
    fn advanced_to(&self, to: u64) -> BTreeMap<Partition, u64> {
        self.checkpoints
            .iter()
            .map(|(partition, checkpoint)| (*partition, (*checkpoint).max(to)))
            .collect()
    }
}

/// The partition group of `P`'s projectors in the lease bucket.
fn group<P: Projection>() -> &'static str {
    P::CONSUMER
        .partition_group()
        .expect("a view's consumer has a partition group")
}

/// The partition group of `view`'s projectors in the lease bucket (`ordo partitions status
/// --group`).
pub fn group_of(view: crate::View) -> &'static str {
    view.info()
        .consumer
        .partition_group()
        .expect("a view's consumer has a partition group")
}

pub struct Projector<P: Projection> {
    pool: PgPool,
    js: jetstream::Context,
    config: ProjectorConfig,
    _projection: PhantomData<fn() -> P>,
}

impl<P: Projection> Projector<P> {
    pub fn new(pool: PgPool, js: jetstream::Context, config: ProjectorConfig) -> Self {
        Self {
            pool,
            js,
            config,
            _projection: PhantomData,
        }
    }

    /// Keeps this instance's share of the view up to date until `shutdown` completes: it joins
    /// the view's partition group, and applies the partitions it is granted. Failures
    /// (PostgreSQL or NATS down, a partition taken over) end the current term; the projector
    /// then starts again from its partitions' checkpoints, after a pause that grows up to
    /// [`terms::RETRY_AT_MOST`].
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(self.config.retry_base, terms::RETRY_AT_MOST);
        loop {
            let began = std::time::Instant::now();
            let err = tokio::select! {
                () = &mut shutdown => return,
                Err(err) = self.serve(&mut backoff) => err,
            };
            let wait = backoff.after_run(began.elapsed());
            tracing::warn!(projection = P::NAME, %err, retry_in = ?wait, "projector stopped; starting again");
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// A membership of the view's partition group: terms over the partitions held, each ended
    /// when one is taken away or another is granted. Returns when the membership cannot go on.
    /// (`run` drops it at shutdown, in the middle of a batch if it must: its transaction then
    /// never commits.)
    async fn serve(&self, backoff: &mut Backoff) -> Result<Infallible, ProjectorError> {
        let mut membership = Membership::join(
            &self.js,
            OwnershipConfig {
                replicas: self.config.replicas,
                ..OwnershipConfig::new(group::<P>(), self.config.partitions)
            },
        )
        .await
        .map_err(|err| ProjectorError::JetStream(err.to_string()))?;
        let mut reporter = Reporter::open(&self.js, group::<P>(), membership.instance())
            .await
            .map_err(ProjectorError::JetStream)?;
        self.remove_durable_of_earlier_builds().await;
        loop {
            let partitions = membership
                .next_term()
                .await
                .map_err(|err| ProjectorError::JetStream(err.to_string()))?;
            let began = std::time::Instant::now();
            match self.term(&partitions, &mut membership, &mut reporter).await {
                Ok(Ok(())) => {}
                Ok(Err(stopped)) => return Err(ProjectorError::JetStream(stopped.to_string())),
                Err(err) => {
                    let wait = backoff.after_run(began.elapsed());
                    tracing::warn!(projection = P::NAME, %err, retry_in = ?wait, "projector term ended; starting again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Builds before partitioned projectors read through one durable consumer per view; nothing
    /// reads it any more, and it would keep its place in the stream for ever.
    async fn remove_durable_of_earlier_builds(&self) {
        if let Ok(stream) = self.js.get_stream_no_info(P::STREAM).await {
            let _ = stream.delete_consumer(P::CONSUMER.name()).await;
        }
    }

    /// One term over `partitions`: reads the stream from the checkpoint of the partition
    /// furthest behind and applies the events of these partitions, until something fails or the
    /// partitions held change (returns what `membership` said). A change is taken in between
    /// batches, never in the middle of one's transaction.
    async fn term(
        &self,
        partitions: &[Partition],
        membership: &mut Membership,
        reporter: &mut Reporter,
    ) -> Result<Result<(), LeasesStopped>, ProjectorError> {
        let schema = schema::live_schema::<P>();
        schema::ensure_view::<P>(&self.pool, &schema).await?;
        let found = schema::definition_of(&self.pool, &schema).await?;
        if found.as_deref() != Some(schema::definition::<P>().as_str()) {
            return Err(ProjectorError::OutdatedView {
                schema,
                name: P::NAME.to_owned(),
                found: found.unwrap_or_else(|| "no definition mark".into()),
            });
        }
        let all =
            schema::partition_checkpoints::<P>(&self.pool, &schema, self.config.partitions).await?;
        let mut lanes = Lanes {
            partitions: self.config.partitions,
            checkpoints: partitions
                .iter()
                .map(|partition| (*partition, all[*partition as usize]))
                .collect(),
        };
        reporter.report(&lanes.checkpoints).await;
        let furthest = lanes.checkpoints.values().copied().max().unwrap_or(0);
        let mut position = lanes.start();
        let mut reader = Reader::from(&self.js, P::CONSUMER, position + 1, self.config.batch_size)
            .await
            .map_err(|err| ProjectorError::JetStream(err.to_string()))?;
        // After the reader began: the stream it reads is the one checked (the reader then checks
        // that it stays so).
        let checked = self.check_same_stream(&schema, furthest).await?;
        if checked.timestamp_micros() != reader.stream_created_micros() {
            return Err(ProjectorError::JetStream(format!(
                "stream {} was created again as the projector began; reading again",
                P::STREAM
            )));
        }
        tracing::info!(
            projection = P::NAME,
            partitions = ?partitions,
            from = position + 1,
            "projector applies its partitions"
        );
        loop {
            let messages = tokio::select! {
                change = membership.changed() => return Ok(change),
                () = reporter.sent_late() => continue,
                messages = reader.next() => {
                    messages.map_err(|err| ProjectorError::JetStream(err.to_string()))?
                }
            };
            let mut batch = Vec::new();
            // A span per event, under the command that wrote it, only for a trace viewer.
            let mut spans = Vec::new();
            let mut read_to = position;
            for message in &messages {
                let seq = message.seq;
                if !is_next(seq, read_to)? {
                    continue;
                }
                read_to = seq;
                if !lanes.takes(&message.subject, seq) {
                    continue;
                }
                if trace::exporting() {
                    let span = tracing::info_span!(
                        "project",
                        otel.name = %format_args!("project {}", P::NAME),
                        projection = P::NAME,
                        seq,
                        trace_id = tracing::field::Empty,
                    );
                    trace::follow(&span, trace::extract(message.headers.as_ref()));
                    spans.push(span);
                }
                batch.push(Fetched::new(
                    seq,
                    message.subject.clone(),
                    message.payload.to_vec(),
                ));
            }
            if read_to == position {
                continue;
            }
            let started = std::time::Instant::now();
            self.apply_batch(&schema, &mut lanes, &batch, read_to)
                .await?;
            position = read_to;
            reporter.report(&lanes.checkpoints).await;
            if !batch.is_empty() {
                let labels = [("projection", P::NAME)];
                metrics::histogram!("ordo_projection_batch_size", &labels)
                    .record(batch.len() as f64);
                metrics::histogram!("ordo_projection_batch_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("ordo_projection_events_total", &labels)
                    .increment(batch.len() as u64);
            }
            // Each event's span ends with the transaction that applied it.
            drop(spans);
        }
    }

    /// Refuses to go on with a view built from another stream of the same name: its checkpoint
    /// would skip the new stream's first events.
    /// Returns when the stream checked was created.
    async fn check_same_stream(
        &self,
        schema: &str,
        checkpoint: u64,
    ) -> Result<chrono::DateTime<chrono::Utc>, ProjectorError> {
        let (created, last_sequence) = stream_identity(&self.js, P::STREAM).await?;
        let recorded: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT stream_created FROM {schema}.checkpoints WHERE stream = $1"
            )))
            .bind(P::STREAM)
            .fetch_one(&self.pool)
            .await?;
        let foreign = |reason: String| ProjectorError::ForeignStream {
            stream: P::STREAM.to_owned(),
            reason,
        };
        match recorded {
            Some(recorded) if recorded != created => {
                return Err(foreign(format!("created {recorded}, this one {created}")));
            }
            Some(_) => {}
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {schema}.checkpoints SET stream_created = $2 WHERE stream = $1"
                )))
                .bind(P::STREAM)
                .bind(created)
                .execute(&self.pool)
                .await?;
            }
        }
        if checkpoint > last_sequence {
            return Err(foreign(format!(
                "its checkpoint {checkpoint} is past this stream's last sequence {last_sequence}"
            )));
        }
        Ok(created)
    }

    /// Applies `batch` (the events of `lanes`' partitions that the stream holds after their
    /// checkpoints, up to `read_to`, in stream order) and moves every partition's checkpoint to
    /// `read_to`. An event that cannot be applied is retried alone, then parked; the rest goes on.
    pub(crate) async fn apply_batch(
        &self,
        schema: &str,
        lanes: &mut Lanes,
        batch: &[Fetched],
        read_to: u64,
    ) -> Result<(), ProjectorError> {
        let mut rest = batch;
        loop {
            let (applied, failure) = self
                .apply_in_transaction(schema, lanes, rest, read_to)
                .await?;
            let Some(first_reason) = failure else {
                return Ok(());
            };
            let failing = &rest[applied];
            self.retry_or_park(schema, lanes, failing, first_reason)
                .await?;
            rest = &rest[applied + 1..];
        }
    }

    /// Applies as many events of `events` as it can in one transaction, with the checkpoints:
    /// to `read_to` if all of them applied, else to just before the one that failed. Returns
    /// how many it applied and, if it stopped early, why the next one failed.
    async fn apply_in_transaction(
        &self,
        schema: &str,
        lanes: &mut Lanes,
        events: &[Fetched],
        read_to: u64,
    ) -> Result<(usize, Option<String>), ProjectorError> {
        let (mut tx, generation) = self.begin(schema).await?;
        // The events before the first that cannot be read as an envelope (usually all of them).
        let readable: Vec<RecordedEvent> = events
            .iter()
            .map_while(|fetched| fetched.recorded().ok())
            .collect();
        if readable.len() > 1 {
            // Set-wise first: a few statements for all of them. If an event does not fit, the
            // batch is applied event by event below, which finds it and parks it.
            let mut savepoint = tx.begin().await?;
            match P::apply_all(&mut savepoint, &readable).await {
                Ok(true) => {
                    savepoint.commit().await?;
                    // The unreadable event, if any, is the caller's to retry or park.
                    let unreadable = events.get(readable.len());
                    let to = unreadable.map_or(read_to, |unreadable| unreadable.seq - 1);
                    advance_checkpoints::<P>(&mut tx, &generation, lanes, to).await?;
                    tx.commit().await?;
                    lanes.checkpoints = lanes.advanced_to(to);
                    let failure = unreadable
                        .and_then(|unreadable| unreadable.envelope.as_ref().err().cloned());
                    return Ok((readable.len(), failure));
                }
                Ok(false) | Err(ApplyError::Rejected(_)) => savepoint.rollback().await?,
                Err(ApplyError::Unavailable(reason)) => {
                    return Err(ProjectorError::Unavailable(reason));
                }
            }
        }
        let mut applied = 0;
        let mut failure = None;
        let mut to = read_to;
        for fetched in events {
            let mut savepoint = tx.begin().await?;
            let result = match fetched.recorded() {
                Ok(recorded) => P::apply(&mut savepoint, &recorded).await,
                Err(err) => Err(err),
            };
            match result {
                Ok(()) => {
                    savepoint.commit().await?;
                    applied += 1;
                }
                Err(ApplyError::Unavailable(reason)) => {
                    return Err(ProjectorError::Unavailable(reason));
                }
                Err(ApplyError::Rejected(reason)) => {
                    savepoint.rollback().await?;
                    failure = Some(reason);
                    to = fetched.seq - 1;
                    break;
                }
            }
        }
        if to > lanes.start() {
            advance_checkpoints::<P>(&mut tx, &generation, lanes, to).await?;
        }
        tx.commit().await?;
        lanes.checkpoints = lanes.advanced_to(to);
        Ok((applied, failure))
    }

    /// Tries one failing event again with growing pauses; parks it when it keeps failing, in the
    /// same transaction as the checkpoint that moves past it.
    async fn retry_or_park(
        &self,
        schema: &str,
        lanes: &mut Lanes,
        event: &Fetched,
        first_reason: String,
    ) -> Result<(), ProjectorError> {
        let mut reason = first_reason;
        let mut pause = self.config.retry_base;
        // Once an event of an aggregate is parked, its later events cannot apply either (their
        // versions do not follow): park them at once rather than stall the view retrying.
        let earlier_parked: bool = sqlx::query_scalar(
            "SELECT exists(SELECT 1 FROM public.parked_events
                           WHERE projection = $1 AND subject = $2 AND seq < $3 AND parked_in = $4)",
        )
        .bind(P::NAME)
        .bind(&event.subject)
        .bind(event.seq as i64)
        .bind(schema)
        .fetch_one(&self.pool)
        .await?;
        let attempts = if earlier_parked {
            reason = format!("an earlier event of {} is parked; {reason}", event.subject);
            1
        } else if event.envelope.is_err() {
            // Its bytes will not read differently on another try.
            1
        } else {
            self.config.max_attempts
        };
        for attempt in 2..=attempts {
            tracing::warn!(projection = P::NAME, seq = event.seq, %reason, attempt, "event not applied; trying again");
            tokio::time::sleep(pause).await;
            pause *= 2;
            let (applied, failure) = self
                .apply_in_transaction(schema, lanes, std::slice::from_ref(event), event.seq)
                .await?;
            if applied == 1 {
                return Ok(());
            }
            reason = failure.unwrap_or_default();
        }
        tracing::error!(projection = P::NAME, seq = event.seq, %reason, "event parked");
        metrics::counter!("ordo_projection_parked_total", "projection" => P::NAME).increment(1);
        let (mut tx, generation) = self.begin(schema).await?;
        sqlx::query(
            "INSERT INTO public.parked_events (projection, stream, seq, subject, event_type, reason, attempts, payload, parked_in)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (projection, stream, seq, parked_in) DO UPDATE
             SET reason = excluded.reason, attempts = excluded.attempts, parked_at = now()",
        )
        .bind(P::NAME)
        .bind(P::STREAM)
        .bind(event.seq as i64)
        .bind(&event.subject)
        .bind(event.envelope.as_ref().ok().map(|envelope| envelope.event_type.clone()))
        .bind(&reason)
        .bind(attempts as i32)
        .bind(String::from_utf8_lossy(&event.payload).into_owned())
        .bind(schema)
        .execute(&mut *tx)
        .await?;
        advance_checkpoints::<P>(&mut tx, &generation, lanes, event.seq).await?;
        tx.commit().await?;
        lanes.checkpoints = lanes.advanced_to(event.seq);
        Ok(())
    }

    /// A transaction on `schema`, and the generation of the schema it started on.
    async fn begin(
        &self,
        schema: &str,
    ) -> Result<(Transaction<'static, Postgres>, Generation), ProjectorError> {
        let mut tx = self.pool.begin().await?;
        // One round trip: `set_config(…, true)` is `SET LOCAL search_path`.
        let (_, oid): (String, Option<i64>) = sqlx::query_as(
            "SELECT set_config('search_path', $1 || ', public', true), to_regnamespace($1)::oid::bigint",
        )
        .bind(schema)
        .fetch_one(&mut *tx)
        .await?;
        let generation = Generation {
            schema: schema.to_owned(),
            oid: oid.unwrap_or(-1),
        };
        Ok((tx, generation))
    }
}

/// When `stream` was created (at PostgreSQL's microsecond precision) and its last sequence.
pub(crate) async fn stream_identity(
    js: &jetstream::Context,
    stream: &str,
) -> Result<(chrono::DateTime<chrono::Utc>, u64), ProjectorError> {
    let js_err = |err: &dyn std::fmt::Display| ProjectorError::JetStream(err.to_string());
    let mut stream = js.get_stream(stream).await.map_err(|err| js_err(&err))?;
    let info = stream.info().await.map_err(|err| js_err(&err))?;
    let created = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(
        (info.created.unix_timestamp_nanos() / 1_000) as i64,
    )
    .unwrap_or_default();
    Ok((created, info.state.last_sequence))
}

/// Which view a batch started writing to: the schema's name and its object id. A rebuild swaps
/// in a new schema under the same name, so the id changes with every rebuild even when the new
/// view's checkpoint equals the old one's.
struct Generation {
    schema: String,
    oid: i64,
}

/// Moves the checkpoint of each of `lanes`' partitions from what `lanes` says to `to` (or leaves
/// one that is further as it is), or fails if another instance moved one (it took the partition
/// over), or a rebuild swapped the view since the batch began (its rows went to the old view: the
/// whole transaction must roll back, and the batch is applied again to the new one).
async fn advance_checkpoints<P: Projection>(
    connection: &mut PgConnection,
    generation: &Generation,
    lanes: &Lanes,
    to: u64,
) -> Result<(), ProjectorError> {
    let (partitions, expected): (Vec<i32>, Vec<i64>) = lanes
        .checkpoints
        .iter()
        .map(|(partition, checkpoint)| (*partition as i32, *checkpoint as i64))
        .unzip();
    // The announcement (`<projection>:<checkpoint>:<partition>,…`) is delivered when the batch
    // commits, so that reads waiting for `min_seq` wake at once (ordo-api's `checkpoints`).
    let advanced = sqlx::query(
        "WITH advanced AS (
             UPDATE partition_checkpoints c SET seq = greatest(c.seq, $3), updated_at = now()
             FROM unnest($1::int[], $2::bigint[]) AS expected(partition, seq)
             WHERE c.partition = expected.partition AND c.seq = expected.seq
               AND to_regnamespace($4)::oid::bigint = $5
             RETURNING c.partition),
         summary AS (
             SELECT count(*) AS advanced, string_agg(partition::text, ',' ORDER BY partition) AS partitions
             FROM advanced)
         SELECT pg_notify($6, $7 || ':' || $3 || ':' || partitions) FROM summary WHERE advanced = $8",
    )
    .bind(&partitions)
    .bind(&expected)
    .bind(to as i64)
    .bind(&generation.schema)
    .bind(generation.oid)
    .bind(CHECKPOINT_CHANNEL)
    .bind(P::NAME)
    .bind(partitions.len() as i64)
    .execute(connection)
    .await?;
    if advanced.rows_affected() != 1 {
        return Err(ProjectorError::Fenced {
            stream: P::STREAM.to_owned(),
        });
    }
    Ok(())
}

/// Whether the event at `seq` is the next one for a reader that has read up to `read_to`. An
/// event at or below it was read before (an ordered consumer that was recreated may deliver
/// again what it delivered); it is skipped. Past the next sequence, events are missing.
fn is_next(seq: u64, read_to: u64) -> Result<bool, ProjectorError> {
    let expected = read_to + 1;
    if seq > expected {
        return Err(ProjectorError::Gap { expected, got: seq });
    }
    Ok(seq == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{schema::ensure_view, stock::StockView};

    #[test]
    fn an_event_read_before_is_skipped_and_one_past_the_next_is_a_gap() {
        // A reader that has read up to 7: 8 is next.
        assert!(!is_next(1, 7).unwrap(), "delivered again");
        assert!(!is_next(7, 7).unwrap(), "delivered again");
        assert!(is_next(8, 7).unwrap());
        assert!(matches!(
            is_next(9, 7),
            Err(ProjectorError::Gap {
                expected: 8,
                got: 9
            })
        ));
        assert!(is_next(1, 0).unwrap(), "a new view takes the first event");
    }

    #[test]
    fn a_views_projectors_lease_its_partitions_under_its_name() {
        assert_eq!(group::<StockView>(), group_of(crate::View::Stock));
        assert_eq!(group::<crate::orders::OrdersView>(), "projection-orders");
    }

    #[test]
    fn a_term_takes_the_events_of_its_partitions_past_their_checkpoints() {
        let partitions = 16;
        // "o-1" is in partition 8, "o-2" in 1 (partition's own test).
        let lanes = Lanes {
            partitions,
            checkpoints: BTreeMap::from([(8, 10), (3, 4)]),
        };
        assert_eq!(lanes.start(), 4, "from the partition furthest behind");
        assert!(lanes.takes("ordo.order.events.o-1", 11));
        assert!(
            !lanes.takes("ordo.order.events.o-1", 10),
            "in the view already"
        );
        assert!(
            !lanes.takes("ordo.order.events.o-2", 11),
            "another instance's"
        );
        assert_eq!(
            lanes.advanced_to(7),
            BTreeMap::from([(8, 10), (3, 7)]),
            "a checkpoint never goes back"
        );
        let split = lanes.clone().split(2);
        assert_eq!(
            split
                .iter()
                .map(|lanes| lanes.checkpoints.clone())
                .collect::<Vec<_>>(),
            [BTreeMap::from([(8, 10)]), BTreeMap::from([(3, 4)])],
            "dealt by partition, each keeping its checkpoint"
        );
        assert_eq!(lanes.split(5).len(), 2, "no lane without a partition");
    }
    use ordo_testkit::{NatsServer, TestDatabase};

    #[tokio::test]
    async fn a_batch_that_began_before_a_rebuild_swap_cannot_move_the_new_views_checkpoint() {
        let database = TestDatabase::create().await;
        let server = NatsServer::start();
        let pool = database.pool().clone();
        crate::schema::migrate(&pool).await.unwrap();
        ensure_view::<StockView>(&pool, "view_stock").await.unwrap();
        let projector = Projector::<StockView>::new(
            pool.clone(),
            jetstream::new(server.client().await),
            ProjectorConfig::default(),
        );
        crate::schema::partition_checkpoints::<StockView>(&pool, "view_stock", 1)
            .await
            .unwrap();
        // Given a live batch that began writing to the view at checkpoint 0…
        let (mut live, generation) = projector.begin("view_stock").await.unwrap();
        sqlx::query("INSERT INTO stock (sku, on_hand, reserved, version, updated_at, last_seq) VALUES ('A1', 1, 0, 1, now(), 1)")
            .execute(&mut *live)
            .await
            .unwrap();
        // …when a rebuild swaps in a new view whose checkpoint is also 0,
        ensure_view::<StockView>(&pool, "view_stock_next")
            .await
            .unwrap();
        let mut swap = pool.begin().await.unwrap();
        for rename in [
            "ALTER SCHEMA view_stock RENAME TO view_stock_old",
            "ALTER SCHEMA view_stock_next RENAME TO view_stock",
        ] {
            sqlx::query(rename).execute(&mut *swap).await.unwrap();
        }
        swap.commit().await.unwrap();
        // then the live batch's checkpoint update is fenced: its rows went to the old view.
        let lanes = Lanes {
            partitions: 1,
            checkpoints: BTreeMap::from([(0, 0)]),
        };
        let fenced = advance_checkpoints::<StockView>(&mut live, &generation, &lanes, 1).await;
        assert!(
            matches!(fenced, Err(ProjectorError::Fenced { .. })),
            "{fenced:?}"
        );
    }
}
