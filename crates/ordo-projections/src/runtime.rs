//! [`Projector`]: one projection's worker. See the crate documentation for the guarantees.

use std::{future::Future, marker::PhantomData, time::Duration};

use async_nats::jetstream;
use ordo_eventstore::{
    EventEnvelope, RecordedEvent,
    backoff::Backoff,
    consume::{Batches, Settle},
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
    /// How often a standby instance asks whether it can take over.
    pub standby_poll: Duration,
}

impl ProjectorConfig {
    /// For a rebuild: batches of 10,000 events. A larger batch folds more of an order's events
    /// into one row written (placed and confirmed become one insert, not an insert and an
    /// update) and pays a transaction's fixed cost less often; the live projector keeps batches
    /// small, for latency.
    pub fn for_rebuild() -> Self {
        Self {
            batch_size: 10_000,
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
            standby_poll: Duration::from_secs(1),
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
    #[error("the checkpoint of {stream} is no longer {expected}: another instance took over")]
    Fenced { stream: String, expected: u64 },
    #[error("expected event {expected} next but got {got}: reading again from the checkpoint")]
    Gap { expected: u64, got: u64 },
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
    subject: String,
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

/// How a leadership term ended.
enum Term {
    /// Another instance leads: wait and ask again.
    Standby,
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

    /// Also the key of the leader lock: two builds of a rolling upgrade lock the same one.
    fn consumer_name() -> &'static str {
        P::CONSUMER.name()
    }

    /// Keeps the view up to date until `shutdown` completes. Failures (PostgreSQL or NATS down,
    /// a lost take-over) end the current term; the projector then starts again from its
    /// checkpoint, after a pause that grows up to 10 s.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(self.config.retry_base, Duration::from_secs(10));
        loop {
            let term_began = std::time::Instant::now();
            tokio::select! {
                () = &mut shutdown => return,
                ended = self.lead() => {
                    let wait = match ended {
                        Ok(Term::Standby) => self.config.standby_poll,
                        Err(err) => {
                            let wait = backoff.after_run(term_began.elapsed());
                            tracing::warn!(projection = P::NAME, %err, retry_in = ?wait, "projector stopped; starting again");
                            wait
                        }
                    };
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// One term: take the projection's lock or stand by; as leader, apply batches until
    /// something fails.
    async fn lead(&self) -> Result<Term, ProjectorError> {
        // The lock lives as long as this connection, which never goes back to the pool.
        let mut lock = self.pool.acquire().await?.detach();
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(Self::consumer_name())
            .fetch_one(&mut lock)
            .await?;
        if !leader {
            lock.close().await.ok();
            return Ok(Term::Standby);
        }
        let result = self.lead_as_leader().await;
        lock.close().await.ok();
        result
    }

    async fn lead_as_leader(&self) -> Result<Term, ProjectorError> {
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
        let mut checkpoint = schema::checkpoint::<P>(&self.pool, &schema).await?;
        self.check_same_stream(&schema, checkpoint).await?;
        let mut batches = Batches::recreated_at(
            &self.js,
            P::CONSUMER,
            checkpoint + 1,
            self.config.batch_size,
        )
        .await
        .map_err(|err| ProjectorError::JetStream(err.to_string()))?;
        tracing::info!(
            projection = P::NAME,
            checkpoint,
            "projector leads; reading from checkpoint + 1"
        );
        loop {
            let fetched = batches
                .next()
                .await
                .map_err(|err| ProjectorError::JetStream(err.to_string()))?;
            let mut batch = Vec::new();
            // A span per event, under the command that wrote it, only for a trace viewer.
            let mut spans = Vec::new();
            for message in &fetched.messages {
                let seq = message
                    .info()
                    .map_err(|err| ProjectorError::JetStream(err.to_string()))?
                    .stream_sequence;
                if is_new(seq, checkpoint, batch.len())? {
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
                        message.subject.to_string(),
                        message.payload.to_vec(),
                    ));
                }
            }
            if !batch.is_empty() {
                let started = std::time::Instant::now();
                checkpoint = self.apply_batch(&schema, checkpoint, &batch).await?;
                let labels = [("projection", P::NAME)];
                metrics::histogram!("ordo_projection_batch_size", &labels)
                    .record(batch.len() as f64);
                metrics::histogram!("ordo_projection_batch_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("ordo_projection_events_total", &labels)
                    .increment(batch.len() as u64);
                // Each event's span ends with the transaction that applied it.
                drop(spans);
            }
            // Applied, or already in the view (the checkpoint skips it).
            let applied = fetched.messages.len();
            fetched
                .settle(std::iter::repeat_n(Settle::Ack, applied))
                .await;
        }
    }

    /// Refuses to go on with a view built from another stream of the same name: its checkpoint
    /// would skip the new stream's first events.
    async fn check_same_stream(&self, schema: &str, checkpoint: u64) -> Result<(), ProjectorError> {
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
        Ok(())
    }

    /// Applies `batch` (contiguous, starting at `checkpoint + 1`) and returns the new checkpoint.
    /// An event that cannot be applied is retried alone, then parked; the rest goes on.
    pub(crate) async fn apply_batch(
        &self,
        schema: &str,
        mut checkpoint: u64,
        batch: &[Fetched],
    ) -> Result<u64, ProjectorError> {
        let mut rest = batch;
        while !rest.is_empty() {
            let (applied, failure) = self.apply_in_transaction(schema, checkpoint, rest).await?;
            checkpoint += applied as u64;
            let Some(first_reason) = failure else {
                break;
            };
            let failing = &rest[applied];
            checkpoint = self
                .retry_or_park(schema, checkpoint, failing, first_reason)
                .await?;
            rest = &rest[applied + 1..];
        }
        Ok(checkpoint)
    }

    /// Applies as many events of `events` as it can in one transaction, with the checkpoint.
    /// Returns how many it applied and, if it stopped early, why the next one failed.
    async fn apply_in_transaction(
        &self,
        schema: &str,
        checkpoint: u64,
        events: &[Fetched],
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
                    let to = checkpoint + readable.len() as u64;
                    advance_checkpoint::<P>(&mut tx, &generation, checkpoint, to).await?;
                    tx.commit().await?;
                    // The unreadable event, if any, is the caller's to retry or park.
                    let failure = events
                        .get(readable.len())
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
                    break;
                }
            }
        }
        if applied > 0 {
            let to = checkpoint + applied as u64;
            advance_checkpoint::<P>(&mut tx, &generation, checkpoint, to).await?;
        }
        tx.commit().await?;
        Ok((applied, failure))
    }

    /// Tries one failing event again with growing pauses; parks it when it keeps failing, in the
    /// same transaction as the checkpoint that moves past it.
    async fn retry_or_park(
        &self,
        schema: &str,
        checkpoint: u64,
        event: &Fetched,
        first_reason: String,
    ) -> Result<u64, ProjectorError> {
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
                .apply_in_transaction(schema, checkpoint, std::slice::from_ref(event))
                .await?;
            if applied == 1 {
                return Ok(checkpoint + 1);
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
        advance_checkpoint::<P>(&mut tx, &generation, checkpoint, checkpoint + 1).await?;
        tx.commit().await?;
        Ok(checkpoint + 1)
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

/// Moves the checkpoint from `expected` to `to`, or fails if another instance moved it, or a
/// rebuild swapped the view since the batch began (its rows went to the old view: the whole
/// transaction must roll back, and the batch is applied again to the new one).
async fn advance_checkpoint<P: Projection>(
    connection: &mut PgConnection,
    generation: &Generation,
    expected: u64,
    to: u64,
) -> Result<(), ProjectorError> {
    // The announcement (`<projection>:<checkpoint>`) is delivered when the batch commits, so
    // that reads waiting for `min_seq` wake at once (ordo-api's `checkpoints`).
    let updated = sqlx::query(
        "WITH advanced AS (
             UPDATE checkpoints SET seq = $2, updated_at = now()
             WHERE stream = $1 AND seq = $3 AND to_regnamespace($4)::oid::bigint = $5
             RETURNING seq)
         SELECT pg_notify($6, $7 || ':' || seq) FROM advanced",
    )
    .bind(P::STREAM)
    .bind(to as i64)
    .bind(expected as i64)
    .bind(&generation.schema)
    .bind(generation.oid)
    .bind(CHECKPOINT_CHANNEL)
    .bind(P::NAME)
    .execute(connection)
    .await?;
    if updated.rows_affected() != 1 {
        return Err(ProjectorError::Fenced {
            stream: P::STREAM.to_owned(),
            expected,
        });
    }
    Ok(())
}

/// Whether the event at `seq` is the next one for a view at `checkpoint` with `batched` events
/// taken in since. Below the next sequence it was taken in before: applied (at or below the
/// checkpoint) or already in this batch, a redelivery after a lost ack or an ack wait that ran
/// out, which can arrive in the same pull as the first copy; it is skipped. Past the next
/// sequence, events are missing.
fn is_new(seq: u64, checkpoint: u64, batched: usize) -> Result<bool, ProjectorError> {
    let expected = checkpoint + batched as u64 + 1;
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
    fn an_event_taken_in_before_is_skipped_and_one_past_the_next_is_a_gap() {
        // A view at 5 with two events (6, 7) taken into the batch: 8 is next.
        assert!(!is_new(1, 5, 2).unwrap(), "redelivered");
        assert!(!is_new(5, 5, 2).unwrap(), "redelivered");
        assert!(is_new(8, 5, 2).unwrap());
        assert!(!is_new(6, 5, 2).unwrap(), "a second copy in the same batch");
        assert!(!is_new(7, 5, 2).unwrap(), "a second copy in the same batch");
        assert!(matches!(
            is_new(9, 5, 2),
            Err(ProjectorError::Gap {
                expected: 8,
                got: 9
            })
        ));
        assert!(is_new(1, 0, 0).unwrap(), "a new view takes the first event");
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
        let fenced = advance_checkpoint::<StockView>(&mut live, &generation, 0, 1).await;
        assert!(
            matches!(fenced, Err(ProjectorError::Fenced { .. })),
            "{fenced:?}"
        );
    }
}
