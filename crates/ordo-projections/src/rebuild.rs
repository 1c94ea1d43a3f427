//! Rebuilding a view from its stream without downtime.
//!
//! 1. A fresh schema `view_<name>_next` gets the view's tables; every event of the stream, from
//!    the first, is applied to it (same batches, retries and parking as the live projector),
//!    while the live view keeps serving and updating.
//! 2. The new view catches up with the live one without any lock, round after round, until it
//!    is within a batch of the live checkpoint (events keep coming while it replays).
//! 3. The swap locks the live checkpoint tables against writes (`EXCLUSIVE`: reads go on, so
//!    the API keeps answering), which pauses the live projectors between batches; the new view
//!    applies the last few events to reach at least the checkpoint of the live partition
//!    furthest ahead (a view never goes back), and the two schemas are renamed in one
//!    transaction. The old schema is dropped afterwards. The new view keeps the checkpoints of
//!    the partitions the rebuild was told of (`ProjectorConfig::partitions`): a rebuild is how a
//!    view changes its count.
//! 4. Parked events of the projection that applied this time are no longer parked (a rebuild is
//!    how a parked event is retried once its cause is fixed).
//! 5. A live projector caught in the middle of a batch finds its checkpoint fenced, starts a new
//!    term and goes on from the new view's checkpoint. The fence is on the view's generation
//!    (its schema's object id, new with every rebuild) as well as on the checkpoint value, which
//!    the new view may share with the old one: a batch whose rows went to the old view rolls
//!    back whole.

use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
};
use futures::StreamExt;
use sqlx::{AssertSqlSafe, PgPool};

use crate::{
    Projection, Projector, ProjectorConfig,
    runtime::{Fetched, Lanes, ProjectorError, stream_identity},
    schema::{self, checkpoint, ensure_view, live_schema, partition_checkpoints},
};

/// Rounds of catching up with the live view before the swap locks it: enough for any stream
/// whose replay is faster than its writes, and a bound for one whose is not.
const MAX_CATCH_UP_ROUNDS: usize = 20;

/// How near the live view the new one gets before the swap locks the live checkpoint (or
/// within a batch, if batches are smaller): the live projector then usually waits while the new
/// view applies about this many events (more if the catch-up rounds ran out, or the live view
/// moved on before the lock).
const CATCH_UP_MARGIN: u64 = 1_000;

/// Where a rebuild is: events applied to the new view, and the stream's head when it started.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub applied: u64,
    pub target: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Rebuilt {
    /// The checkpoint of the view that now serves.
    pub checkpoint: u64,
    pub took: Duration,
}

/// Rebuilds `P`'s view from the first event and swaps it in; `progress` is called after every
/// batch.
pub async fn rebuild<P: Projection>(
    pool: &PgPool,
    js: &jetstream::Context,
    config: ProjectorConfig,
    mut progress: impl FnMut(Progress),
) -> Result<Rebuilt, ProjectorError> {
    let started = Instant::now();
    let live = live_schema::<P>();
    let next = format!("{live}_next");
    // One rebuild of a view at a time, whoever starts it (two operators, the console and the
    // CLI): a second would drop the new view the first is filling. The lock is the session's of
    // a connection of its own, closed (and the lock with it) when the rebuild ends, however.
    let mut held = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("ordo-rebuild-{}", P::NAME))
        .fetch_one(&mut held)
        .await?;
    if !locked {
        return Err(ProjectorError::RebuildRunning {
            name: P::NAME.to_owned(),
        });
    }
    ensure_view::<P>(pool, &live).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {next} CASCADE"
    )))
    .execute(pool)
    .await?;
    ensure_view::<P>(pool, &next).await?;
    // What an earlier rebuild that did not finish parked in its new view.
    sqlx::query("DELETE FROM parked_events WHERE projection = $1 AND parked_in = $2")
        .bind(P::NAME)
        .bind(&next)
        .execute(pool)
        .await?;
    let (created, target) = stream_identity(js, P::STREAM).await?;
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {next}.checkpoints SET stream_created = $2 WHERE stream = $1"
    )))
    .bind(P::STREAM)
    .bind(created)
    .execute(pool)
    .await?;

    let lanes = Lanes {
        partitions: config.partitions,
        checkpoints: partition_checkpoints::<P>(pool, &next, config.partitions)
            .await?
            .into_iter()
            .enumerate()
            .map(|(partition, checkpoint)| (partition as u32, checkpoint))
            .collect(),
    };
    let batch_size = config.batch_size.max(1);
    let lanes = lanes.split(config.rebuild_lanes);
    let projector = Projector::<P>::new(pool.clone(), js.clone(), config);
    let mut replay = Replay::open(js, projector, next.clone(), lanes, batch_size).await?;
    replay.apply_until(target, target, &mut progress).await?;

    // Near the live view before the lock, so that the lock is held for a few events only.
    for _ in 0..MAX_CATCH_UP_ROUNDS {
        // The partition furthest ahead: the swap will apply up to it, under the lock.
        let live_checkpoint =
            schema::furthest_checkpoint_in(&mut *pool.acquire().await?, &live, P::STREAM).await?;
        if live_checkpoint <= replay.applied() + CATCH_UP_MARGIN.min(batch_size as u64) {
            break;
        }
        replay
            .apply_until(live_checkpoint, target, &mut progress)
            .await?;
    }

    // The swap: the live projectors wait at their next checkpoint update while this holds the
    // lock; readers of the checkpoints do not wait. It runs on the connection that holds the
    // rebuild's lock, so it commits only if that session (and the lock) lasted: had it been
    // cut, another rebuild could have started meanwhile, and this one gives way.
    let mut swap = sqlx::Connection::begin(&mut held).await?;
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE {live}.partition_checkpoints, {live}.checkpoints IN EXCLUSIVE MODE"
    )))
    .execute(&mut *swap)
    .await?;
    let live_checkpoint = schema::furthest_checkpoint_in(&mut swap, &live, P::STREAM).await?;
    replay
        .apply_until(live_checkpoint, target, &mut progress)
        .await?;
    let old = format!("{live}_old");
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {old} CASCADE"
    )))
    .execute(&mut *swap)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "ALTER SCHEMA {live} RENAME TO {old}"
    )))
    .execute(&mut *swap)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "ALTER SCHEMA {next} RENAME TO {live}"
    )))
    .execute(&mut *swap)
    .await?;
    // A rebuild is the retry of parked events: the new view parked those that failed again;
    // every other (parked in the old view, before or while the rebuild ran) it applied.
    sqlx::query("DELETE FROM parked_events WHERE projection = $1 AND parked_in <> $2")
        .bind(P::NAME)
        .bind(&next)
        .execute(&mut *swap)
        .await?;
    sqlx::query("UPDATE parked_events SET parked_in = $3 WHERE projection = $1 AND parked_in = $2")
        .bind(P::NAME)
        .bind(&next)
        .bind(&live)
        .execute(&mut *swap)
        .await?;
    swap.commit().await.inspect_err(|err| {
        tracing::warn!(projection = P::NAME, %err, "the swap did not commit (its lock's session may be lost): the live view is kept");
    })?;
    // Dropped after the commit: a live batch holding locks on the old tables finishes first.
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {old} CASCADE"
    )))
    .execute(pool)
    .await?;
    let checkpoint = checkpoint::<P>(pool, &live).await?;
    tracing::info!(projection = P::NAME, checkpoint, took = ?started.elapsed(), "view rebuilt and swapped in");
    Ok(Rebuilt {
        checkpoint,
        took: started.elapsed(),
    })
}

/// Batches a replay keeps read ahead of the one being applied: fetching and decoding the next
/// batches overlaps writing this one.
const READ_AHEAD: usize = 2;

/// The stream read in order from its first event, through an ordered consumer, and applied to
/// the new view in `schema`. A task reads ahead (fetches, checks that the sequences follow
/// each other, decodes) while this applies; it ends with the replay.
struct Replay<P: Projection> {
    batches: tokio::sync::mpsc::Receiver<Result<Vec<Fetched>, ProjectorError>>,
    reader: tokio::task::JoinHandle<()>,
    /// What was read ahead and not applied yet: the rest of a batch cut at a target.
    pending: Vec<Fetched>,
    projector: Projector<P>,
    schema: String,
    /// The new view's checkpoints: all partitions, at the same sequence, dealt into lanes that
    /// are applied at once, each in a transaction of its own (an aggregate's rows belong to its
    /// partition, so the lanes never touch the same row).
    lanes: Vec<Lanes>,
}

impl<P: Projection> Replay<P> {
    async fn open(
        js: &jetstream::Context,
        projector: Projector<P>,
        schema: String,
        lanes: Vec<Lanes>,
        batch_size: usize,
    ) -> Result<Self, ProjectorError> {
        let js_err = |err: &dyn std::fmt::Display| ProjectorError::JetStream(err.to_string());
        let stream = js.get_stream(P::STREAM).await.map_err(|err| js_err(&err))?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|err| js_err(&err))?;
        let messages = consumer.messages().await.map_err(|err| js_err(&err))?;
        let (sender, batches) = tokio::sync::mpsc::channel(READ_AHEAD);
        let reader = tokio::spawn(read_ahead(messages, batch_size, sender));
        Ok(Self {
            batches,
            reader,
            pending: Vec::new(),
            projector,
            schema,
            lanes,
        })
    }

    /// The new view's checkpoint.
    fn applied(&self) -> u64 {
        self.lanes.iter().map(Lanes::start).min().unwrap_or(0)
    }

    /// Applies batches until the new view holds `to`, reporting progress against `target` (or
    /// `to`, once past it).
    async fn apply_until(
        &mut self,
        to: u64,
        target: u64,
        progress: &mut impl FnMut(Progress),
    ) -> Result<(), ProjectorError> {
        while self.applied() < to {
            self.apply_next_batch(self.applied(), to).await?;
            progress(Progress {
                applied: self.applied(),
                target: target.max(to),
            });
        }
        Ok(())
    }

    /// Applies the next events read ahead (waiting up to 30 s for them), no further than `to`
    /// (under the swap's lock, what the live view holds), to the new view.
    async fn apply_next_batch(&mut self, checkpoint: u64, to: u64) -> Result<(), ProjectorError> {
        if self.pending.is_empty() {
            self.pending =
                match tokio::time::timeout(Duration::from_secs(30), self.batches.recv()).await {
                    Err(_) => {
                        return Err(ProjectorError::JetStream(
                            "no event arrived within 30 s during the replay".into(),
                        ));
                    }
                    Ok(None) => {
                        return Err(ProjectorError::JetStream("the replay ended early".into()));
                    }
                    Ok(Some(batch)) => batch?,
                };
        }
        let first = self.pending.first().map_or(0, |fetched| fetched.seq);
        if first != checkpoint + 1 {
            return Err(ProjectorError::Gap {
                expected: checkpoint + 1,
                got: first,
            });
        }
        let take = self
            .pending
            .len()
            .min(to.saturating_sub(checkpoint).max(1) as usize);
        let rest = self.pending.split_off(take);
        let batch = std::mem::replace(&mut self.pending, rest);
        let read_to = checkpoint + batch.len() as u64;
        let mut shares: Vec<Vec<Fetched>> = self.lanes.iter().map(|_| Vec::new()).collect();
        for fetched in batch {
            if let Some(lane) = self
                .lanes
                .iter()
                .position(|lanes| lanes.takes(&fetched.subject, fetched.seq))
            {
                shares[lane].push(fetched);
            }
        }
        let (projector, schema) = (&self.projector, &self.schema);
        let applied = self
            .lanes
            .iter_mut()
            .zip(&shares)
            .map(|(lanes, share)| projector.apply_batch(schema, lanes, share, read_to));
        // Every lane's transaction ends before an error is returned: one is never dropped in
        // the middle.
        futures::future::join_all(applied)
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }
}

impl<P: Projection> Drop for Replay<P> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads `messages` from the stream's first event into batches of up to `batch_size`
/// contiguous events (what has arrived, once the first of a batch is there) and sends them on,
/// until the replay stops taking them or the reading fails (sent on as the last item).
async fn read_ahead(
    mut messages: jetstream::consumer::pull::Ordered,
    batch_size: usize,
    batches: tokio::sync::mpsc::Sender<Result<Vec<Fetched>, ProjectorError>>,
) {
    let mut next_seq = 1;
    loop {
        let batch = next_batch(&mut messages, batch_size, &mut next_seq).await;
        let failed = batch.is_err();
        if batches.send(batch).await.is_err() || failed {
            return;
        }
    }
}

/// Up to `batch_size` events starting at `next_seq`: what arrives within 100 ms of the first,
/// for which it waits as long as it takes. Near the stream's head, where events trickle in as
/// they are written, a batch is closed by time rather than by size.
async fn next_batch(
    messages: &mut jetstream::consumer::pull::Ordered,
    batch_size: usize,
    next_seq: &mut u64,
) -> Result<Vec<Fetched>, ProjectorError> {
    let mut batch = Vec::with_capacity(batch_size);
    let mut closes = None;
    while batch.len() < batch_size {
        let message = match closes {
            None => messages.next().await,
            Some(closes) => match tokio::time::timeout_at(closes, messages.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        closes.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(100));
        let message = message
            .ok_or_else(|| ProjectorError::JetStream("the replay ended early".into()))?
            .map_err(|err| ProjectorError::JetStream(err.to_string()))?;
        let seq = message
            .info()
            .map_err(|err| ProjectorError::JetStream(err.to_string()))?
            .stream_sequence;
        if seq != *next_seq {
            return Err(ProjectorError::Gap {
                expected: *next_seq,
                got: seq,
            });
        }
        *next_seq += 1;
        batch.push(Fetched::new(
            seq,
            message.subject.to_string(),
            message.payload.to_vec(),
        ));
    }
    Ok(batch)
}
