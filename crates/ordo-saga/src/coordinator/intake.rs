//! Intake: order events in, sagas started or extended.
//!
//! The coordinators share the partitions of `ORDO_ORDERS` (group `saga` in the partition bucket,
//! with the command service's count): each instance reads the stream by sequence, as the
//! projectors do, and takes in the events of the partitions it holds, so that all of an order's
//! events are taken in by one instance, in stream order. Each partition has a checkpoint
//! (`saga_intake`), written after the sagas of the events it passes (at most every 200 ms while
//! events come), fenced on the value it was read at (an instance that lost the partition cannot
//! move it). Taking an event in twice changes nothing
//! (a saga starts once; an extension a saga already has leaves it as it is), so a checkpoint
//! written after the rows never loses an event, and reading again from it (after a crash or a
//! takeover) never does one twice.
//!
//! An event the intake cannot take in (a newer schema during a rolling upgrade, or an extension
//! of a saga that does not exist) is held back: recorded in `unreadable_events`, shown, and
//! tried again by itself, less and less often, until a build that reads it takes it; the later
//! events of its order wait behind it, and every other order goes on.

use ordo_eventstore::{
    ConsumerId, OwnershipConfig, Partition,
    consume::{Reader, Stored},
    partition_of,
    progress::Reporter,
    terms::{self, Membership},
};

use super::*;

/// Order events read per batch, at most.
pub(super) const INTAKE_BATCH: usize = 256;

/// How often the intake writes its checkpoints while it reads. Under load its batches are small
/// and many; a checkpoint write per batch was a commit per batch. Reading again what was taken in
/// since the last write (after a crash or a takeover) changes nothing, and costs at most this
/// much of the stream.
const WRITE_CHECKPOINTS_EVERY: Duration = Duration::from_millis(200);

/// The intake's group in the partition bucket.
fn group() -> &'static str {
    ConsumerId::Saga
        .partition_group()
        .expect("the saga's intake reads by partition")
}

const STREAM: &str = ordo_eventstore::StreamId::Orders.name();

fn js_err(err: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::JetStream(err.to_string())
}

impl<G: PaymentGateway> Coordinator<G> {
    pub(super) async fn intake_forever(&self, started: mpsc::Sender<Claimed>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), terms::RETRY_AT_MOST);
        loop {
            let began = std::time::Instant::now();
            match self.intake(&mut backoff, &started).await {
                Ok(()) => return, // Stopping.
                Err(err) => {
                    let delay = backoff.after_run(began.elapsed());
                    tracing::warn!(%err, retry_in = ?delay, "saga intake stopped; starting again");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// A membership of the intake's partition group: terms over the partitions held. Returns
    /// when the membership cannot go on, or `Ok` when the driving has stopped.
    async fn intake(
        &self,
        backoff: &mut Backoff,
        started: &mpsc::Sender<Claimed>,
    ) -> Result<(), CoordinatorError> {
        let js = jetstream::new(self.nats.clone());
        let mut membership = Membership::join(
            &js,
            OwnershipConfig {
                replicas: self.config.replicas,
                ..OwnershipConfig::new(group(), self.config.partitions)
            },
        )
        .await
        .map_err(js_err)?;
        let mut reporter = Reporter::open(&js, group(), membership.instance())
            .await
            .map_err(CoordinatorError::JetStream)?;
        loop {
            let partitions = membership.next_term().await.map_err(js_err)?;
            let began = std::time::Instant::now();
            match self
                .term(&js, &partitions, &mut membership, &mut reporter, started)
                .await
            {
                Ok(TermEnded::Changed) => {}
                Ok(TermEnded::Stopping) => return Ok(()),
                // The membership cannot go on: joined again (after `intake_forever`'s pause).
                Ok(TermEnded::LeasesStopped(why)) => return Err(CoordinatorError::JetStream(why)),
                Err(err) => {
                    let wait = backoff.after_run(began.elapsed());
                    tracing::warn!(%err, retry_in = ?wait, "saga intake term ended; starting again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One term over `partitions`: reads the stream from the checkpoint of the partition
    /// furthest behind and takes in these partitions' events, and the held-back ones when they
    /// are due, until something fails or the partitions held change.
    async fn term(
        &self,
        js: &jetstream::Context,
        partitions: &[Partition],
        membership: &mut Membership,
        reporter: &mut Reporter,
        started: &mpsc::Sender<Claimed>,
    ) -> Result<TermEnded, CoordinatorError> {
        let stream = js.get_stream(STREAM).await.map_err(js_err)?;
        let created = created_micros(stream.cached_info().created.unix_timestamp_nanos());
        let all = checkpoints(&self.pool, js, self.config.partitions, created).await?;
        let mut checkpoints: BTreeMap<Partition, u64> = partitions
            .iter()
            .map(|partition| (*partition, all[*partition as usize]))
            .collect();
        reporter.report(&checkpoints).await;
        let mut position = checkpoints.values().copied().min().unwrap_or(0);
        let mut reader = Reader::from(js, ConsumerId::Saga, position + 1, INTAKE_BATCH)
            .await
            .map_err(js_err)?;
        if reader.stream_created_micros() != created {
            return Err(js_err(format!(
                "stream {STREAM} was created again as the intake began; reading again"
            )));
        }
        let mut held = HeldBack::load(&self.pool, self.config.partitions, &checkpoints).await?;
        tracing::info!(partitions = ?partitions, from = position + 1, "saga intake takes in its partitions");
        // Taken in up to `position`; the checkpoints say so once written.
        let mut written_at = tokio::time::Instant::now();
        loop {
            let unwritten = checkpoints
                .values()
                .any(|checkpoint| *checkpoint < position);
            let messages = tokio::select! {
                change = membership.changed() => {
                    write_on_leaving(&self.pool, &mut checkpoints, position).await;
                    return Ok(TermEnded::from(change));
                }
                () = tokio::time::sleep_until(written_at + WRITE_CHECKPOINTS_EVERY), if unwritten => {
                    advance(&self.pool, &mut checkpoints, position).await?;
                    written_at = tokio::time::Instant::now();
                    continue;
                }
                () = reporter.sent_late() => continue,
                () = held.next_due() => {
                    let new_sagas = self.retry_held(&stream, &mut held).await?;
                    if let Some(ended) = hand_over(new_sagas, started, membership).await {
                        write_on_leaving(&self.pool, &mut checkpoints, position).await;
                        return Ok(ended);
                    }
                    continue;
                }
                messages = reader.next() => messages.map_err(js_err)?,
            };
            let mut read_to = position;
            let mut batch = Vec::new();
            for message in messages {
                if message.seq <= read_to {
                    continue; // Read before.
                }
                if message.seq != read_to + 1 {
                    return Err(js_err(format!(
                        "expected event {} next but got {}: reading again from the checkpoint",
                        read_to + 1,
                        message.seq
                    )));
                }
                read_to = message.seq;
                let partition =
                    partition_of(aggregate_of(&message.subject), self.config.partitions);
                if checkpoints
                    .get(&partition)
                    .is_some_and(|checkpoint| message.seq > *checkpoint)
                {
                    batch.push(message);
                }
            }
            if read_to == position {
                continue;
            }
            let new_sagas = self.take_in_batch(&batch, &mut held).await?;
            position = read_to;
            if written_at.elapsed() >= WRITE_CHECKPOINTS_EVERY {
                advance(&self.pool, &mut checkpoints, position).await?;
                written_at = tokio::time::Instant::now();
            }
            // What was taken in is done, written or not: load shedding reads this.
            reporter
                .report(
                    &checkpoints
                        .iter()
                        .map(|(partition, checkpoint)| (*partition, position.max(*checkpoint)))
                        .collect(),
                )
                .await;
            if let Some(ended) = hand_over(new_sagas, started, membership).await {
                write_on_leaving(&self.pool, &mut checkpoints, position).await;
                return Ok(ended);
            }
        }
    }

    /// Takes in a batch of this term's events, in stream order: those it cannot take in (and the
    /// later events of their orders) are held back. Returns the sagas it started.
    async fn take_in_batch(
        &self,
        batch: &[Stored],
        held: &mut HeldBack,
    ) -> Result<Vec<Claimed>, CoordinatorError> {
        let mut readable = Vec::with_capacity(batch.len());
        for stored in batch {
            if held.holds_seq(stored.seq) {
                continue; // Recorded before this term read it again: its retries take it.
            }
            if let Some(event) = self.readable_or_held(held, stored, 1).await? {
                readable.push((stored, event));
            }
        }
        let (taken_in, new_sagas) = self.take_in(&readable).await?;
        for ((stored, event), taken_in) in readable.iter().zip(taken_in) {
            if taken_in == TakenIn::TooEarly {
                self.hold_back(held, stored, &no_saga(event), 1).await?;
            }
        }
        Ok(new_sagas)
    }

    /// Tries the held-back events that are due, in stream order; an event whose order has an
    /// earlier one still held waits behind it.
    async fn retry_held(
        &self,
        stream: &jetstream::stream::Stream,
        held: &mut HeldBack,
    ) -> Result<Vec<Claimed>, CoordinatorError> {
        let mut started = Vec::new();
        for (seq, entry) in held.due() {
            let stored = match stream.direct_get(seq).await {
                Ok(message) => Stored {
                    seq,
                    subject: message.subject.to_string(),
                    headers: Some(message.headers),
                    payload: message.payload,
                },
                Err(err)
                    if err.kind()
                        == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
                {
                    tracing::error!(
                        seq,
                        subject = entry.subject,
                        "a held-back order event is no longer in the stream; dropped from the held-back list"
                    );
                    self.handled(held, seq).await?;
                    continue;
                }
                Err(err) => return Err(js_err(err)),
            };
            let deliveries = entry.deliveries + 1;
            let Some(event) = self.readable_or_held(held, &stored, deliveries).await? else {
                continue;
            };
            let (taken_in, new_sagas) = self.take_in(&[(&stored, event.clone())]).await?;
            if taken_in.first() == Some(&TakenIn::TooEarly) {
                self.hold_back(held, &stored, &no_saga(&event), deliveries)
                    .await?;
                continue;
            }
            self.handled(held, seq).await?;
            tracing::info!(seq, subject = %stored.subject, "a held-back order event is taken in");
            started.extend(new_sagas);
        }
        Ok(started)
    }

    /// An order event as the intake meets it (its `deliveries`-th try): held back if it cannot
    /// be read or an earlier event of its order is held back, else read.
    async fn readable_or_held(
        &self,
        held: &mut HeldBack,
        stored: &Stored,
        deliveries: i64,
    ) -> Result<Option<ReadEvent>, CoordinatorError> {
        let why = match unreadable::read_order_event(&stored.payload) {
            Ok(event) => match held.holds_order_before(&stored.subject, stored.seq) {
                None => return Ok(Some(event)),
                Some(earlier) => waiting(&event, earlier),
            },
            Err(why) => why,
        };
        self.hold_back(held, stored, &why, deliveries).await?;
        Ok(None)
    }

    async fn hold_back(
        &self,
        held: &mut HeldBack,
        stored: &Stored,
        why: &Unreadable,
        deliveries: i64,
    ) -> Result<(), CoordinatorError> {
        let delay = unreadable::redelivery_delay(Duration::from_secs(1), deliveries);
        let at = unreadable::HeldAt {
            stream: STREAM,
            seq: stored.seq,
            subject: &stored.subject,
            deliveries,
        };
        unreadable::record(&self.pool, CONSUMER, at, why, Some(delay)).await?;
        held.hold(stored.seq, stored.subject.clone(), deliveries, delay);
        Ok(())
    }

    async fn handled(&self, held: &mut HeldBack, seq: u64) -> Result<(), CoordinatorError> {
        sqlx::query(
            "DELETE FROM unreadable_events WHERE consumer = $1 AND stream = $2 AND seq = $3",
        )
        .bind(CONSUMER)
        .bind(STREAM)
        .bind(seq as i64)
        .execute(&self.pool)
        .await?;
        held.handled(seq);
        Ok(())
    }

    /// Applies order events to their sagas: the new sagas in one statement, then the events that
    /// extend one, in stream order (an order's OrderPlaced always comes first). Returns what
    /// became of each event, and the sagas it started, leased to this coordinator (not those an
    /// earlier reading of the same events started).
    pub(super) async fn take_in(
        &self,
        events: &[(&Stored, ReadEvent)],
    ) -> Result<(Vec<TakenIn>, Vec<Claimed>), CoordinatorError> {
        let mut starts: BTreeMap<String, (Saga, DateTime<Utc>, Option<String>)> = BTreeMap::new();
        for (stored, event) in events {
            if let ReadEvent {
                order_id,
                envelope,
                event:
                    OrderEvent::OrderPlaced {
                        customer_id,
                        lines,
                        total_cents,
                        ..
                    },
            } = event
            {
                let saga = Saga::start(order_id.clone(), customer_id.clone(), lines, *total_cents);
                let traceparent = trace::traceparent(&trace::extract(stored.headers.as_ref()));
                starts.insert(order_id.to_string(), (saga, envelope.at, traceparent));
            }
        }
        let mut new_sagas = Vec::new();
        if !starts.is_empty() {
            let rows: Vec<Value> = starts
                .values()
                .map(|(saga, at, traceparent)| {
                    json!({
                        "order_id": saga.order_id.as_str(),
                        "state": saga.state.as_str(),
                        "steps": steps_json(saga),
                        "data": saga,
                        "started_at": at,
                        "traceparent": traceparent,
                    })
                })
                .collect();
            let inserted: Vec<String> = sqlx::query_scalar(
                "INSERT INTO sagas (order_id, state, steps, data, started_at, updated_at, next_attempt_at, traceparent)
                 SELECT order_id, state, steps, data, started_at, now(), now() + make_interval(secs => $2), traceparent
                 FROM jsonb_to_recordset($1)
                      AS s(order_id text, state text, steps jsonb, data jsonb, started_at timestamptz,
                           traceparent text)
                 ON CONFLICT (order_id) DO NOTHING
                 RETURNING order_id",
            )
            .bind(Value::Array(rows))
            .bind(self.config.lease().as_secs_f64())
            .fetch_all(&self.pool)
            .await?;
            for order_id in inserted {
                if let Some((saga, placed_at, traceparent)) = starts.remove(&order_id) {
                    new_sagas.push(Claimed {
                        saga,
                        version: 0,
                        deadline_passed: false,
                        traceparent,
                        placed_at,
                    });
                }
            }
        }
        let mut taken_in = Vec::with_capacity(events.len());
        for (_, event) in events {
            let order_id = &event.order_id;
            taken_in.push(match &event.event {
                OrderEvent::OrderCancelled { .. } => self.extend(order_id, Saga::cancel).await?,
                OrderEvent::OrderShipped {} => self.extend(order_id, Saga::ship).await?,
                OrderEvent::OrderRejected { reason } => {
                    self.extend(order_id, |saga| saga.order_rejected(reason))
                        .await?
                }
                // Started above; the saga's own doings.
                _ => TakenIn::Done,
            });
        }
        Ok((taken_in, new_sagas))
    }

    pub(super) async fn extend(
        &self,
        order_id: &OrderId,
        change: impl FnOnce(Saga) -> Saga,
    ) -> Result<TakenIn, CoordinatorError> {
        let mut tx = self.pool.begin().await?;
        let Some(saga) = load_for_update(&mut tx, order_id.as_str()).await? else {
            return Ok(TakenIn::TooEarly);
        };
        let changed = change(saga.clone());
        if changed != saga {
            // A coordinator driving the saga now finds its version moved and lets it go.
            save(&mut *tx, &changed, None, Some(Duration::ZERO), None).await?;
        }
        tx.commit().await?;
        Ok(TakenIn::Done)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TakenIn {
    Done,
    /// It extends a saga that does not exist.
    TooEarly,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TermEnded {
    Changed,
    /// The driving has stopped: so does the intake.
    Stopping,
    /// The partition leases stopped: the membership cannot go on.
    LeasesStopped(String),
}

impl From<Result<(), ordo_eventstore::terms::LeasesStopped>> for TermEnded {
    fn from(change: Result<(), ordo_eventstore::terms::LeasesStopped>) -> Self {
        match change {
            Ok(()) => Self::Changed,
            Err(stopped) => Self::LeasesStopped(stopped.to_string()),
        }
    }
}

/// Hands the sagas a batch started to the driving, already leased. When the driving's slots are
/// all taken this waits, but not past a change of the partitions held: the sagas not handed
/// over then are left to their leases in PostgreSQL (the driving claims them once those end),
/// so that a partition taken away is let go at once. Returns how the term ends, if it does.
async fn hand_over(
    new_sagas: Vec<Claimed>,
    started: &mpsc::Sender<Claimed>,
    membership: &mut Membership,
) -> Option<TermEnded> {
    for saga in new_sagas {
        tokio::select! {
            sent = started.send(saga) => if sent.is_err() {
                return Some(TermEnded::Stopping);
            },
            change = membership.changed() => return Some(TermEnded::from(change)),
        }
    }
    None
}

/// The aggregate an event subject (`ordo.order.events.<id>`) is of.
fn aggregate_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

fn created_micros(nanos: i128) -> i64 {
    (nanos / 1_000) as i64
}

/// Why a readable event is held back: an earlier event of its order is.
fn waiting(event: &ReadEvent, earlier: u64) -> Unreadable {
    Unreadable {
        reason: format!("waits for event {earlier} of its order, which is held back"),
        event_type: Some(event.envelope.event_type.clone()),
        schema: Some(event.envelope.schema),
        order_id: Some(event.order_id.to_string()),
    }
}

/// Why a readable event is held back: it extends a saga that does not exist.
fn no_saga(event: &ReadEvent) -> Unreadable {
    Unreadable {
        reason: "its order's saga does not exist (its OrderPlaced was not taken in)".into(),
        event_type: Some(event.envelope.event_type.clone()),
        schema: Some(event.envelope.schema),
        order_id: Some(event.order_id.to_string()),
    }
}

/// One held-back event of the term's partitions.
#[derive(Debug, Clone)]
struct HeldEvent {
    subject: String,
    deliveries: i64,
    due: tokio::time::Instant,
}

/// The held-back events of the term's partitions, by sequence.
struct HeldBack {
    entries: BTreeMap<u64, HeldEvent>,
}

impl HeldBack {
    /// The rows of `unreadable_events` the intake recorded for these partitions.
    async fn load(
        pool: &PgPool,
        partitions: u32,
        checkpoints: &BTreeMap<Partition, u64>,
    ) -> Result<Self, sqlx::Error> {
        let rows: Vec<(i64, String, i64, f64)> = sqlx::query_as(
            "SELECT seq, subject, deliveries,
                    greatest(extract(epoch FROM coalesce(next_attempt_at, now()) - now()), 0)::float8
             FROM unreadable_events WHERE consumer = $1 AND stream = $2",
        )
        .bind(CONSUMER)
        .bind(STREAM)
        .fetch_all(pool)
        .await?;
        let now = tokio::time::Instant::now();
        let entries = rows
            .into_iter()
            .filter(|(_, subject, _, _)| {
                checkpoints.contains_key(&partition_of(aggregate_of(subject), partitions))
            })
            .map(|(seq, subject, deliveries, due_in)| {
                let due = now + Duration::from_secs_f64(due_in.min(3600.0));
                (
                    seq as u64,
                    HeldEvent {
                        subject,
                        deliveries,
                        due,
                    },
                )
            })
            .collect();
        Ok(Self { entries })
    }

    fn hold(&mut self, seq: u64, subject: String, deliveries: i64, delay: Duration) {
        let due = tokio::time::Instant::now() + delay;
        self.entries.insert(
            seq,
            HeldEvent {
                subject,
                deliveries,
                due,
            },
        );
    }

    /// `seq` is taken in: the next held-back event of its order, waiting behind it, is due now.
    fn handled(&mut self, seq: u64) {
        let Some(entry) = self.entries.remove(&seq) else {
            return;
        };
        let now = tokio::time::Instant::now();
        if let Some(next) = self
            .entries
            .range_mut(seq..)
            .map(|(_, next)| next)
            .find(|next| next.subject == entry.subject)
        {
            next.due = next.due.min(now);
        }
    }

    fn holds_seq(&self, seq: u64) -> bool {
        self.entries.contains_key(&seq)
    }

    /// The first held-back event before `seq` of the order `subject` is of, if any.
    fn holds_order_before(&self, subject: &str, seq: u64) -> Option<u64> {
        self.entries
            .range(..seq)
            .find(|(_, entry)| entry.subject == subject)
            .map(|(seq, _)| *seq)
    }

    /// Completes when a held-back event is due; never, while none is held.
    async fn next_due(&self) {
        match self.entries.values().map(|entry| entry.due).min() {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
    }

    /// The events due now, in stream order.
    fn due(&self) -> Vec<(u64, HeldEvent)> {
        let now = tokio::time::Instant::now();
        self.entries
            .iter()
            .filter(|(_, entry)| entry.due <= now)
            .map(|(seq, entry)| (*seq, entry.clone()))
            .collect()
    }
}

/// Every partition's checkpoint, for a stream created at `created` (microseconds): the rows of
/// `saga_intake`, made when there are none (from the durable consumer of earlier builds, which
/// is then deleted), dealt again when their count is not `partitions`, and started over for a
/// partition whose sequence is of a stream deleted since.
async fn checkpoints(
    pool: &PgPool,
    js: &jetstream::Context,
    partitions: u32,
    created: i64,
) -> Result<Vec<u64>, CoordinatorError> {
    let created = DateTime::<Utc>::from_timestamp_micros(created).unwrap_or_default();
    let rows: Vec<(i32, i64, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT partition, seq, stream_created FROM saga_intake ORDER BY partition")
            .fetch_all(pool)
            .await?;
    if rows.len() != partitions as usize {
        // First start, or another count: every partition begins where the intake surely had
        // taken everything in (taking an event in again changes nothing); a row of a stream
        // deleted since counts as 0.
        let of_this_stream = |(_, seq, stream_created): &(i32, i64, Option<DateTime<Utc>>)| {
            if stream_created.is_none_or(|recorded| recorded == created) {
                *seq as u64
            } else {
                0
            }
        };
        let from = match rows.iter().map(of_this_stream).min() {
            Some(from) => from,
            None => durable_consumer_floor(js).await?,
        };
        let mut tx = pool.begin().await?;
        sqlx::query("LOCK TABLE saga_intake IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_intake")
            .fetch_one(&mut *tx)
            .await?;
        if count == rows.len() as i64 {
            sqlx::query("DELETE FROM saga_intake")
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO saga_intake (partition, seq, stream_created)
                 SELECT partition, $2, $3 FROM generate_series(0, $1 - 1) AS partition",
            )
            .bind(partitions as i32)
            .bind(from as i64)
            .bind(created)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
    }
    let checkpoints = checkpoints_of(pool, partitions, created).await?;
    // Once the checkpoints exist, nothing reads the durable consumer of earlier builds (deleted
    // at every term, in case a start died between its checkpoints and the deletion).
    if let Ok(stream) = js.get_stream_no_info(STREAM).await {
        let _ = stream.delete_consumer(CONSUMER).await;
    }
    Ok(checkpoints)
}

/// The rows of `saga_intake` as they are (`partitions` of them), a partition of another stream
/// started over.
async fn checkpoints_of(
    pool: &PgPool,
    partitions: u32,
    created: DateTime<Utc>,
) -> Result<Vec<u64>, CoordinatorError> {
    // A partition whose sequence is of a stream deleted since starts over (the sagas of orders
    // that stream held are kept, and not started twice: order ids are their keys).
    // Its held-back events go with it: their sequences are of the old stream.
    let mut tx = pool.begin().await?;
    let restarted: Vec<i32> = sqlx::query_scalar(
        "UPDATE saga_intake SET seq = 0, stream_created = $1, updated_at = now()
         WHERE stream_created IS DISTINCT FROM $1 AND stream_created IS NOT NULL
         RETURNING partition",
    )
    .bind(created)
    .fetch_all(&mut *tx)
    .await?;
    if !restarted.is_empty() {
        sqlx::query("DELETE FROM unreadable_events WHERE consumer = $1 AND stream = $2")
            .bind(CONSUMER)
            .bind(STREAM)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if !restarted.is_empty() {
        tracing::warn!(
            stream = STREAM,
            partitions = ?restarted,
            "the stream was created again since the saga's intake last read it: it reads it from the start"
        );
    }
    sqlx::query("UPDATE saga_intake SET stream_created = $1 WHERE stream_created IS NULL")
        .bind(created)
        .execute(pool)
        .await?;
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, seq FROM saga_intake ORDER BY partition")
            .fetch_all(pool)
            .await?;
    if rows.len() != partitions as usize {
        return Err(CoordinatorError::JetStream(format!(
            "the saga's intake keeps {} partition checkpoints while it runs with {partitions}: \
             another coordinator changed them; starting again",
            rows.len()
        )));
    }
    Ok(rows.into_iter().map(|(_, seq)| seq as u64).collect())
}

/// Where the durable consumer of builds before the partitioned intake had acknowledged every
/// event up to (0 when there is none). An answer that does not say (NATS unreachable) is an
/// error, not a 0: the term starts again rather than read the whole stream.
async fn durable_consumer_floor(js: &jetstream::Context) -> Result<u64, CoordinatorError> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    let stream = js.get_stream_no_info(STREAM).await.map_err(js_err)?;
    match stream.consumer_info(CONSUMER).await {
        Ok(info) => Ok(info.ack_floor.stream_sequence),
        Err(err)
            if matches!(
                err.kind(),
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
            ) =>
        {
            Ok(0)
        }
        Err(err) => Err(js_err(err)),
    }
}

/// Writes the checkpoints up to `position` as a term ends, if they are behind, so that the next
/// holder of a partition does not read again what this one took in. Best effort and brief: if
/// another instance already took a partition over, the fence refuses the write; if PostgreSQL is
/// slow, the term ends without it (reading again changes nothing).
async fn write_on_leaving(
    pool: &PgPool,
    checkpoints: &mut BTreeMap<Partition, u64>,
    position: u64,
) {
    if checkpoints
        .values()
        .all(|checkpoint| *checkpoint >= position)
    {
        return;
    }
    let written = tokio::time::timeout(
        Duration::from_millis(500),
        advance(pool, checkpoints, position),
    )
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("the intake's checkpoints not written as its term ended");
    }
}

/// Moves the checkpoint of each of `checkpoints`' partitions from what it says to `to` (and
/// `checkpoints` with them), or fails if another instance moved one (it took the partition over).
async fn advance(
    pool: &PgPool,
    checkpoints: &mut BTreeMap<Partition, u64>,
    to: u64,
) -> Result<(), CoordinatorError> {
    let (partitions, expected): (Vec<i32>, Vec<i64>) = checkpoints
        .iter()
        .map(|(partition, seq)| (*partition as i32, *seq as i64))
        .unzip();
    let moved = sqlx::query(
        "UPDATE saga_intake c SET seq = greatest(c.seq, $3), updated_at = now()
         FROM unnest($1::int[], $2::bigint[]) AS e(partition, expected)
         WHERE c.partition = e.partition AND c.seq = e.expected",
    )
    .bind(&partitions)
    .bind(&expected)
    .bind(to as i64)
    .execute(pool)
    .await?
    .rows_affected();
    if moved != partitions.len() as u64 {
        return Err(CoordinatorError::JetStream(
            "a partition's checkpoint of the saga's intake moved since this instance read it: \
             another instance took it over"
                .into(),
        ));
    }
    for checkpoint in checkpoints.values_mut() {
        *checkpoint = (*checkpoint).max(to);
    }
    Ok(())
}
