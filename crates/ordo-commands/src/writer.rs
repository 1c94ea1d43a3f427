//! The partition's writer: group commit. The owner of a partition takes the commands queued for
//! it as one batch and settles them in three phases, whatever their number (a phase is one
//! round trip, except a chain's, one per event):
//!
//! 1. the outcome records of every command id, in one batch get, while the aggregates are read
//!    into the cache;
//! 2. each command decided in memory, in arrival order, on the state its aggregate has after the
//!    batch's earlier commands; then, all sent at once, the records of those that append
//!    (`appending`, naming the aggregate's sequence before the batch) and of the refusals that
//!    are final;
//! 3. the events, every aggregate's at once: an aggregate's one event on its own, conditional
//!    on that sequence; its few events (up to [`CHAIN_MAX`]) one after the other, each
//!    conditional on the one before; its many events in one JetStream atomic batch, the first
//!    conditional on it. Events of a chain or an atomic batch carry the batch's id
//!    ([`BATCH_HEADER`]).
//!
//! A refusal on a state the batch did not change is sent only once the stream leader says that
//! state is current (one request per such aggregate): the cache, or a replica that answered a
//! load, may be behind.
//!
//! It is the [`CommandHandler`]'s protocol, batched: a record says what its append expected
//! before the append is sent, so a run whose answer was lost, or whose process died, is resolved
//! by the next copy of the command exactly as a single append is (the handler reads the chain or
//! atomic batch that followed the expected sequence). Anything out of the ordinary — a repeat of a
//! command that may still be landing, two copies in one batch, a refusal on a state that is not
//! the leader's, a write refused or unanswered — goes to the handler, one command at a time,
//! after the batch.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use futures::future::join_all;
use ordo_contract::{ErrorCode, Reply};
use ordo_domain::Aggregate;
use ordo_eventstore::{
    EventEnvelope, Repository, StreamId, aggregate_subject,
    publish::{BatchMessage, atomic_publish, conditional_publish},
    store::BATCH_HEADER,
};
use tracing::Instrument;

use crate::{
    handler::{self, CommandHandler},
    intake::Command,
    outcomes::{OutcomeRecord, OutcomeState},
    routing::Job,
};

/// Commands settled together at most.
pub const MAX_BATCH: usize = 256;
/// How long each write of a batch may take before its outcome counts as unknown (a chain's
/// events are written one after another, each with this timeout).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// An aggregate's events of one batch stored one after the other at most; more go in one atomic
/// batch. A chain costs a round trip per event; an atomic batch on a one-replica file stream
/// costs a store that the server makes and removes on disk (1-30 ms, and in the burst half of
/// nats-server's CPU went to them: bench/reports/profiles.md).
pub const CHAIN_MAX: usize = 8;

/// One partition's writer, for as long as its owner holds the partition.
pub struct Writer {
    handler: Arc<CommandHandler>,
    /// Whether each event stream (orders, stock) takes atomic batches; without, an aggregate's
    /// second command of a batch runs on its own, after it.
    atomic: (bool, bool),
}

/// What a command came to in memory.
enum Decided<A: Aggregate> {
    Append {
        job: Job,
        revision: u64,
        aggregate_id: String,
        event: A::Event,
    },
    Refuse {
        job: Job,
        reply: Reply,
        /// The record to write first (`None`: the refusal is not final, nothing is recorded).
        record_at: Option<u64>,
        /// Decided on the aggregate's state as loaded (no earlier event of the batch): it
        /// stands only if the stream's leader has that state.
        on_loaded: bool,
    },
}

impl Writer {
    pub fn new(handler: Arc<CommandHandler>) -> Self {
        let store = handler.store();
        let atomic = (
            store.allows_atomic_batches(StreamId::Orders.name()),
            store.allows_atomic_batches(StreamId::Stock.name()),
        );
        if atomic != (true, true) {
            tracing::warn!(
                "the event streams do not take atomic batches (allow_atomic): an aggregate's \
                 commands are stored one at a time; `ordo streams apply` sets it"
            );
        }
        Self { handler, atomic }
    }

    /// Settles `jobs` and answers each.
    pub async fn commit(&mut self, jobs: Vec<Job>) {
        // The aggregates are read into the cache while the records are read: two reads, one
        // round trip.
        let (mut order_ids, mut skus) = (Vec::new(), Vec::new());
        for job in &jobs {
            match &job.request.command {
                Command::Order(command) => order_ids.push(command.order_id().to_string()),
                Command::Stock(command) => skus.push(command.sku().to_string()),
            }
        }
        order_ids.sort();
        order_ids.dedup();
        skus.sort();
        skus.dedup();
        let handler = self.handler.clone();
        let preload = async {
            tokio::join!(
                join_all(order_ids.iter().map(|id| handler.orders.load(id))),
                join_all(skus.iter().map(|id| handler.stock.load(id))),
            )
        };
        let mut alone = Vec::new();
        let (fresh, _) = tokio::join!(self.sort_out(jobs, &mut alone), preload);
        let (mut orders, mut stock) = (Vec::new(), Vec::new());
        for (job, revision) in fresh {
            match job.request.command {
                Command::Order(_) => orders.push((job, revision)),
                Command::Stock(_) => stock.push((job, revision)),
            }
        }
        let (order_leftovers, stock_leftovers) = {
            tokio::join!(
                commit_category(
                    &handler.orders,
                    &handler,
                    self.atomic.0,
                    orders,
                    |command| {
                        match command {
                            Command::Order(command) => Some(command),
                            Command::Stock(_) => None,
                        }
                    }
                ),
                commit_category(&handler.stock, &handler, self.atomic.1, stock, |command| {
                    match command {
                        Command::Stock(command) => Some(command),
                        Command::Order(_) => None,
                    }
                }),
            )
        };
        alone.extend(order_leftovers.alone);
        alone.extend(stock_leftovers.alone);
        run_alone(&self.handler, alone).await;
    }

    /// Answers the commands whose records settle them (a final refusal, a command id reused),
    /// keeps back those that need the handler, and returns the fresh ones with their records'
    /// revisions.
    async fn sort_out(&self, jobs: Vec<Job>, alone: &mut Vec<Job>) -> Vec<(Job, u64)> {
        let mut seen = HashSet::new();
        let mut leaders = Vec::with_capacity(jobs.len());
        for job in jobs {
            if seen.insert(job.request.command_id.clone()) {
                leaders.push(job);
            } else {
                // A copy of a command in this batch: it finds the first copy's record after.
                alone.push(job);
            }
        }
        let ids: Vec<&str> = leaders
            .iter()
            .map(|job| job.request.command_id.as_str())
            .collect();
        let records = match self.handler.outcomes.get_many(&ids).await {
            Ok(records) => records,
            Err(err) => {
                tracing::debug!(%err, "outcome records not read in a batch; one at a time");
                alone.extend(leaders);
                return Vec::new();
            }
        };
        let mut fresh = Vec::with_capacity(leaders.len());
        for job in leaders {
            match records.get(&job.request.command_id) {
                None => fresh.push((job, 0)),
                // Unreadable: overwritten, as the handler does.
                Some((revision, None)) => fresh.push((job, *revision)),
                Some((_, Some(record))) if record.fingerprint != job.request.fingerprint => {
                    let reply = handler::reused_id(&job.request);
                    let _ = job.reply.send(reply);
                }
                Some((
                    _,
                    Some(OutcomeRecord {
                        state: OutcomeState::Rejected { reply },
                        ..
                    }),
                )) => {
                    let _ = job.reply.send(reply.clone());
                }
                // Appended earlier, or may still be: the handler finds out which.
                Some((_, Some(_))) => alone.push(job),
            }
        }
        fresh
    }
}

/// What a category's batch left: commands for the handler.
struct Leftovers {
    alone: Vec<Job>,
}

async fn commit_category<A: Aggregate>(
    repository: &Repository<A>,
    handler: &CommandHandler,
    atomic: bool,
    jobs: Vec<(Job, u64)>,
    command_of: impl Fn(&Command) -> Option<&A::Command>,
) -> Leftovers {
    let mut leftovers = Leftovers { alone: Vec::new() };
    if jobs.is_empty() {
        return leftovers;
    }
    // Every aggregate once, from the cache or the stream.
    let mut ids: Vec<String> = jobs
        .iter()
        .map(|(job, _)| job.request.aggregate().as_str().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    let loads = join_all(ids.iter().map(|id| repository.load(id))).await;
    let mut before = HashMap::new();
    for (id, loaded) in ids.into_iter().zip(loads) {
        if let Ok(loaded) = loaded {
            before.insert(id, loaded);
        }
    }

    // Decide in arrival order, each on the state after the batch's earlier events.
    let mut states: HashMap<String, A::State> = before
        .iter()
        .map(|(id, loaded)| (id.clone(), loaded.state.clone()))
        .collect();
    let mut appending: HashSet<String> = HashSet::new();
    let mut decided: Vec<Decided<A>> = Vec::with_capacity(jobs.len());
    for (job, revision) in jobs {
        let aggregate_id = job.request.aggregate().as_str().to_owned();
        let (Some(state), Some(command)) =
            (states.get(&aggregate_id), command_of(&job.request.command))
        else {
            leftovers.alone.push(job);
            continue;
        };
        if job.request.void_if_not_run {
            let reply = handler::voided(&job.request);
            decided.push(Decided::Refuse {
                job,
                reply,
                record_at: Some(revision),
                on_loaded: false,
            });
            continue;
        }
        if !atomic && appending.contains(&aggregate_id) {
            // Its events could not be stored together.
            leftovers.alone.push(job);
            continue;
        }
        match A::decide(state, command) {
            Ok(event) => {
                let next = A::evolve(state.clone(), &event);
                states.insert(aggregate_id.clone(), next);
                appending.insert(aggregate_id.clone());
                decided.push(Decided::Append {
                    job,
                    revision,
                    aggregate_id,
                    event,
                });
            }
            Err(rejection) => {
                let in_batch = appending.contains(&aggregate_id);
                let final_refusal = job.request.explicit_id;
                // Recorded as final on a state that holds events not stored yet: the handler
                // decides it after the batch.
                if in_batch && final_refusal {
                    leftovers.alone.push(job);
                    continue;
                }
                let reply = Reply::refused(ErrorCode::from(&rejection), &rejection);
                decided.push(Decided::Refuse {
                    job,
                    reply,
                    record_at: final_refusal.then_some(revision),
                    on_loaded: !in_batch,
                });
            }
        }
    }

    // A refusal on a state this batch did not change stands only if that state is the stream
    // leader's: the cache, or a replica that answered a load, may be behind.
    let refused_on_loaded: HashSet<String> = decided
        .iter()
        .filter_map(|decided| match decided {
            Decided::Refuse {
                job,
                on_loaded: true,
                ..
            } => Some(job.request.aggregate().as_str().to_owned()),
            _ => None,
        })
        .collect();
    if !refused_on_loaded.is_empty() {
        let stream = ordo_eventstore::stream_of::<A>();
        let before = &before;
        let checks = join_all(refused_on_loaded.iter().map(|id| async move {
            let subject = aggregate_subject(A::CATEGORY, id);
            let leader = handler.store().last_seq_from_leader(stream, &subject).await;
            (id, leader.ok() == Some(before[id].last_seq))
        }))
        .await;
        let behind: HashSet<&String> = checks
            .into_iter()
            .filter_map(|(id, current)| (!current).then_some(id))
            .collect();
        if !behind.is_empty() {
            for id in &behind {
                repository.invalidate(id).await;
            }
            // Everything decided on such a state, refused or appended, is decided again.
            let (stale, kept): (Vec<_>, Vec<_>) = decided.into_iter().partition(|decided| {
                behind.contains(&decided.job().request.aggregate().as_str().to_owned())
            });
            leftovers
                .alone
                .extend(stale.into_iter().map(Decided::into_job));
            decided = kept;
        }
    }

    // The records first: each says what its append expects (and the batch its event goes in), or
    // that its refusal is final.
    let batch_id = uuid::Uuid::new_v4().simple().to_string();
    let records: Vec<(OutcomeRecord, u64)> = decided
        .iter()
        .filter_map(|decided| {
            let (job, state, revision) = match decided {
                Decided::Append {
                    job,
                    revision,
                    aggregate_id,
                    ..
                } => (
                    job,
                    OutcomeState::Appending {
                        category: A::CATEGORY.to_owned(),
                        aggregate_id: aggregate_id.clone(),
                        expected_last_seq: before[aggregate_id].last_seq,
                        batch: Some(batch_id.clone()),
                    },
                    *revision,
                ),
                Decided::Refuse {
                    job,
                    reply,
                    record_at: Some(revision),
                    ..
                } => (
                    job,
                    OutcomeState::Rejected {
                        reply: reply.clone(),
                    },
                    *revision,
                ),
                Decided::Refuse { .. } => return None,
            };
            let record = OutcomeRecord {
                command_id: job.request.command_id.clone(),
                fingerprint: job.request.fingerprint.clone(),
                state,
            };
            Some((record, revision))
        })
        .collect();
    let written = join_all(
        records
            .iter()
            .map(|(record, revision)| handler.outcomes.put(record, *revision)),
    )
    .await;
    if let Some(Err(err)) = written.into_iter().find(Result::is_err) {
        // Some command id has a record after all (a copy ran meanwhile), or a record's fate is
        // unknown: every command of the batch runs on its own.
        tracing::debug!(%err, "a batch's outcome records were not all written; one at a time");
        leftovers
            .alone
            .extend(decided.into_iter().map(Decided::into_job));
        return leftovers;
    }

    // Then the events: an aggregate's one event on its own, conditional on the aggregate's last
    // sequence; its few events chained, each conditional on the one before; its many events in
    // one atomic batch, the first conditional on it.
    let mut appends = Vec::new();
    let mut events: HashMap<&str, Vec<Outgoing>> = HashMap::new();
    for decided in &decided {
        let Decided::Append {
            job,
            aggregate_id,
            event,
            ..
        } = decided
        else {
            continue;
        };
        let loaded = &before[aggregate_id];
        let of_aggregate = events.entry(aggregate_id).or_default();
        let version = loaded.version + 1 + of_aggregate.len() as u64;
        let metadata = &job.metadata;
        let envelope = EventEnvelope::new(aggregate_id, version, event, metadata, Utc::now());
        let subject = aggregate_subject(A::CATEGORY, aggregate_id);
        // Part of the command's trace, as long as the write takes.
        appends.push(tracing::info_span!(
            parent: &job.span,
            "append",
            otel.name = %format_args!("append {}", envelope.event_type),
            %subject,
        ));
        of_aggregate.push(Outgoing {
            message: BatchMessage {
                subject,
                headers: envelope.headers(metadata),
                payload: envelope.to_bytes().into(),
            },
            command_id: metadata.command_id.as_str(),
        });
    }
    let started = std::time::Instant::now();
    let client = handler.store().client();
    let mut together = Vec::new();
    let mut chains = Vec::new();
    for (aggregate_id, mut messages) in events {
        if messages.len() > 1 {
            for outgoing in &mut messages {
                outgoing
                    .message
                    .headers
                    .insert(BATCH_HEADER, batch_id.as_str());
            }
        }
        let expected = before[aggregate_id].last_seq;
        if messages.len() > CHAIN_MAX {
            // In a batch every message carries its conditions: its id, and the first the
            // aggregate's last sequence (the server checks them against the stream before it).
            let mut batch = Vec::with_capacity(messages.len());
            for (index, outgoing) in messages.into_iter().enumerate() {
                let mut message = outgoing.message;
                message.headers.insert("Nats-Msg-Id", outgoing.command_id);
                if index == 0 {
                    message.headers.insert(
                        "Nats-Expected-Last-Subject-Sequence",
                        expected.to_string().as_str(),
                    );
                }
                batch.push(message);
            }
            together.push((aggregate_id, batch));
        } else {
            chains.push(async move { (aggregate_id, chain(client, messages, expected).await) });
        }
    }
    let batched = async {
        if together.is_empty() {
            return None;
        }
        let ids: Vec<&str> = together.iter().map(|(id, _)| *id).collect();
        let counts: Vec<usize> = together
            .iter()
            .map(|(_, messages)| messages.len())
            .collect();
        let messages = together
            .into_iter()
            .flat_map(|(_, messages)| messages)
            .collect();
        let stored = atomic_publish(client, messages, WRITE_TIMEOUT)
            .await
            .map_err(|err| err.to_string());
        Some((ids, counts, stored))
    };
    let (chained, batched) = tokio::join!(join_all(chains), batched);
    drop(appends);
    metrics::histogram!("ordo_append_duration_seconds", "category" => A::CATEGORY)
        .record(started.elapsed().as_secs_f64());

    // Each aggregate's events stored, in order, with their sequences, and why the rest (if any)
    // were not.
    let mut stored: HashMap<&str, Stored> = HashMap::new();
    for (id, chain) in chained {
        stored.insert(id, chain);
    }
    if let Some((ids, counts, seqs)) = batched {
        let mut seqs = seqs.map(Vec::into_iter);
        for (id, count) in ids.into_iter().zip(counts) {
            let of_aggregate = match &mut seqs {
                Ok(seqs) => Stored {
                    seqs: seqs.by_ref().take(count).collect(),
                    not_stored: None,
                },
                Err(err) => Stored {
                    seqs: Vec::new(),
                    not_stored: Some(err.clone()),
                },
            };
            stored.insert(id, of_aggregate);
        }
    }
    let (mut appended, mut failed) = (0, 0);
    let mut outcome: HashMap<String, (std::vec::IntoIter<u64>, Option<String>)> = HashMap::new();
    for (id, stored) in stored {
        appended += stored.seqs.len();
        failed += usize::from(stored.not_stored.is_some());
        outcome.insert(id.to_owned(), (stored.seqs.into_iter(), stored.not_stored));
    }
    metrics::counter!("ordo_appends_total", "category" => A::CATEGORY, "outcome" => "appended")
        .increment(appended as u64);
    if failed > 0 {
        metrics::counter!("ordo_appends_total", "category" => A::CATEGORY, "outcome" => "failed")
            .increment(failed as u64);
    }

    // What was stored is cached and answered. From an aggregate's first event that was not, its
    // commands (and every refusal decided on a state that held that event) run on their own.
    let mut replies = Vec::with_capacity(decided.len());
    let mut folded: HashMap<String, Vec<(A::Event, u64)>> = HashMap::new();
    let mut broken: HashSet<String> = HashSet::new();
    for decided in decided {
        let aggregate_id = decided.job().request.aggregate().as_str().to_owned();
        if broken.contains(&aggregate_id) {
            leftovers.alone.push(decided.into_job());
            continue;
        }
        match (outcome.get_mut(&aggregate_id), decided) {
            (
                Some((seqs, not_stored)),
                Decided::Append {
                    job,
                    aggregate_id,
                    event,
                    ..
                },
            ) => {
                let Some(seq) = seqs.next() else {
                    tracing::debug!(aggregate_id, why = ?not_stored, "event not stored; running on its own");
                    broken.insert(aggregate_id);
                    leftovers.alone.push(job);
                    continue;
                };
                let history = folded.entry(aggregate_id.clone()).or_default();
                history.push((event, seq));
                let version = before[&aggregate_id].version + history.len() as u64;
                let reply = Reply::accepted(job.request.aggregate(), version, seq);
                replies.push((job, reply));
            }
            (_, Decided::Refuse { job, reply, .. }) => replies.push((job, reply)),
            (None, decided) => leftovers.alone.push(decided.into_job()),
        }
    }
    for (id, (_, not_stored)) in &outcome {
        if not_stored.is_some() {
            // Unanswered writes may still land: the stream, not the cache, says what is there.
            repository.invalidate(id).await;
            folded.remove(id);
        }
    }
    for (id, history) in folded {
        let Some(loaded) = before.remove(&id) else {
            continue;
        };
        let events: Vec<(&A::Event, u64)> = history.iter().map(|(e, s)| (e, *s)).collect();
        repository.appended(&id, loaded, &events).await;
    }
    for (job, reply) in replies {
        let _ = job.reply.send(reply);
    }
    leftovers
}

/// An event to append, and the id of the command that decided it (its `Nats-Msg-Id`).
struct Outgoing<'a> {
    message: BatchMessage,
    command_id: &'a str,
}

/// An aggregate's events of a batch that were stored, and why the rest were not.
struct Stored {
    seqs: Vec<u64>,
    not_stored: Option<String>,
}

/// Stores an aggregate's events one after the other, each conditional on the one before (the
/// first on `expected`, the aggregate's last sequence), and stops at the first that is not
/// stored. Cheaper than an atomic batch for a few events: on a one-replica file stream the server
/// makes and removes a store on disk for every atomic batch (bench/reports/profiles.md).
async fn chain(client: &async_nats::Client, messages: Vec<Outgoing<'_>>, expected: u64) -> Stored {
    let mut stored = Stored {
        seqs: Vec::with_capacity(messages.len()),
        not_stored: None,
    };
    let mut expected = expected;
    for Outgoing {
        message,
        command_id,
    } in messages
    {
        let appended = conditional_publish(
            client,
            &message.subject,
            message.headers,
            message.payload,
            command_id,
            expected,
            WRITE_TIMEOUT,
        )
        .await;
        match appended {
            Ok(appended) if !appended.duplicate => {
                expected = appended.seq;
                stored.seqs.push(appended.seq);
            }
            Ok(_) => {
                stored.not_stored = Some("already stored under its id".to_owned());
                break;
            }
            Err(err) => {
                stored.not_stored = Some(err.to_string());
                break;
            }
        }
    }
    stored
}

impl<A: Aggregate> Decided<A> {
    fn job(&self) -> &Job {
        match self {
            Self::Append { job, .. } | Self::Refuse { job, .. } => job,
        }
    }

    fn into_job(self) -> Job {
        match self {
            Self::Append { job, .. } | Self::Refuse { job, .. } => job,
        }
    }
}

/// Runs each command on its own, through the handler, and answers it.
async fn run_alone(handler: &CommandHandler, jobs: Vec<Job>) {
    join_all(jobs.into_iter().map(|job| async move {
        let reply = handler
            .execute(&job.request, &job.metadata)
            .instrument(job.span)
            .await;
        let _ = job.reply.send(reply);
    }))
    .await;
}
