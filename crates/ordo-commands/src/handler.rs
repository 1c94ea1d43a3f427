//! [`CommandHandler`]: runs one parsed command to its one outcome.
//!
//! For a command id: read its outcome record; if the command already has an outcome, return it.
//! Otherwise load the aggregate (cache or stream), decide, write the outcome record, append the
//! event on the condition that the aggregate did not move, and on a conflict start over with a
//! fresh load. Commands on one aggregate are serialised inside this process so that they do not
//! conflict with each other; across processes the conditional append is the only gate.
//!
//! Several copies of one command id may run at once (two instances, a client's retry while the
//! first run is in flight). The record written before an append names the sequence the append
//! is conditional on; while that append may still land (nothing follows that sequence yet), a
//! second run decides on exactly that state and sends the same conditional append, so at most
//! one of them lands and the record keeps pointing at it. Only once another event follows the
//! expected sequence is the earlier attempt dead, and the record may move on.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
};

use ordo_contract::{AggregateId, ErrorCode, Reply};
use ordo_domain::{Aggregate, order::OrderAggregate, stock::StockAggregate};
use ordo_eventstore::{
    EventMetadata, EventStore, LoadError, PublishError, Repository, aggregate_subject,
    stream_for_category, stream_of,
};
use tokio::sync::{Mutex, MutexGuard};

use crate::{
    intake::{Command, ParsedRequest},
    outcomes::{OutcomeRecord, OutcomeState, Outcomes},
};

/// How often a command is decided again after losing a race for its aggregate.
const MAX_ATTEMPTS: u32 = 20;
/// Stripes of the per-aggregate locks: bounded memory, rare false sharing.
const LOCK_STRIPES: usize = 1024;

pub struct CommandHandler {
    pub(crate) orders: Repository<OrderAggregate>,
    pub(crate) stock: Repository<StockAggregate>,
    pub(crate) outcomes: Outcomes,
    locks: Vec<Mutex<()>>,
}

/// What an earlier run of a command id came to.
enum EarlierRun {
    /// It has its outcome: this is the reply.
    Ended(Reply),
    /// Its append (conditional on `expected_last_seq`) has not landed and still may.
    MayStillLand { expected_last_seq: u64 },
    /// Its append can never land: another event follows its expected sequence.
    CannotLand,
}

/// What can go wrong outside the domain while running a command.
#[derive(Debug, thiserror::Error)]
enum Infrastructure {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl CommandHandler {
    pub fn new(store: EventStore) -> Self {
        Self {
            orders: Repository::new(store.clone()),
            stock: Repository::new(store.clone()),
            outcomes: Outcomes::new(store),
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Runs the command and returns its reply. Never panics on bad input and never returns
    /// before the outcome is either durable or known not to have happened.
    pub async fn execute(&self, request: &ParsedRequest, metadata: &EventMetadata) -> Reply {
        let aggregate = request.aggregate();
        let result = match &request.command {
            Command::Order(command) => {
                self.run(&self.orders, &aggregate, command, request, metadata)
                    .await
            }
            Command::Stock(command) => {
                self.run(&self.stock, &aggregate, command, request, metadata)
                    .await
            }
        };
        result.unwrap_or_else(|err| {
            tracing::warn!(command_id = %request.command_id, %err, "command not completed");
            Reply::refused(ErrorCode::Unavailable, err)
        })
    }

    /// Whether a command with this id already has an outcome: a repeat, which gets that
    /// outcome again rather than counting as a new request.
    pub async fn has_outcome(&self, command_id: &str) -> Result<bool, LoadError> {
        let (_, record) = self.outcomes.get(command_id).await?;
        Ok(record.is_some())
    }

    async fn lock(&self, category: &str, aggregate_id: &str) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        (category, aggregate_id).hash(&mut hasher);
        self.locks[hasher.finish() as usize % LOCK_STRIPES]
            .lock()
            .await
    }

    async fn run<A: Aggregate>(
        &self,
        repository: &Repository<A>,
        aggregate: &AggregateId,
        command: &A::Command,
        request: &ParsedRequest,
        metadata: &EventMetadata,
    ) -> Result<Reply, Infrastructure> {
        let aggregate_id = aggregate.as_str();
        let _serialised = self.lock(A::CATEGORY, aggregate_id).await;
        let (mut revision, mut record) = self.outcomes.get(&request.command_id).await?;
        let mut loaded = repository.load(aggregate_id).await?;

        for attempt in 0..MAX_ATTEMPTS {
            let mut earlier_may_land = false;
            if let Some(earlier) = &record {
                if earlier.fingerprint != request.fingerprint {
                    return Ok(reused_id(request));
                }
                match self.earlier_run(earlier, aggregate).await? {
                    EarlierRun::Ended(reply) => return Ok(reply),
                    EarlierRun::MayStillLand { expected_last_seq } => {
                        // Decide on the very state the earlier run decided on.
                        if loaded.last_seq != expected_last_seq {
                            loaded = repository.catch_up(aggregate_id, loaded).await?;
                        }
                        if loaded.last_seq != expected_last_seq {
                            // It moved on meanwhile: see whether that was the earlier run.
                            (revision, record) = self.outcomes.get(&request.command_id).await?;
                            continue;
                        }
                        earlier_may_land = true;
                    }
                    EarlierRun::CannotLand => {}
                }
            }

            if request.void_if_not_run && !earlier_may_land {
                // It never ran (no record, or a run whose append can no longer land): recorded
                // as refused instead of run, so that every copy that comes later gets this
                // answer and runs nothing. (A run that may still land is decided again on its
                // very state below, as any copy is: at most one of them lands.)
                let reply = voided(request);
                if self.record_refusal(request, &reply, revision).await? {
                    return Ok(reply);
                }
                (revision, record) = self.outcomes.get(&request.command_id).await?;
                continue;
            }

            let event = match A::decide(&loaded.state, command) {
                Ok(event) => event,
                Err(rejection) => {
                    // The cache may be behind another instance, and a direct get may be answered
                    // by a replica that lags: refuse only on the state the stream leader has.
                    let current = repository.catch_up(aggregate_id, loaded.clone()).await?;
                    if current.last_seq != loaded.last_seq {
                        loaded = current;
                        continue;
                    }
                    let stream = stream_of::<A>();
                    let subject = aggregate_subject(A::CATEGORY, aggregate_id);
                    let leader_seq = self.store().last_seq_from_leader(stream, &subject).await?;
                    if leader_seq != loaded.last_seq {
                        tracing::debug!(
                            subject,
                            leader_seq,
                            read = loaded.last_seq,
                            "a replica lags; reading again"
                        );
                        // The next pass catches up again before it may refuse.
                        tokio::time::sleep(std::time::Duration::from_millis(5 << attempt.min(6)))
                            .await;
                        continue;
                    }
                    let reply = Reply::refused(ErrorCode::from(&rejection), &rejection);
                    if !request.explicit_id {
                        return Ok(reply);
                    }
                    if self.record_refusal(request, &reply, revision).await? {
                        return Ok(reply);
                    }
                    // Another instance runs the same command id: see what it did.
                    (revision, record) = self.outcomes.get(&request.command_id).await?;
                    continue;
                }
            };

            let appending = self.record(
                request,
                OutcomeState::Appending {
                    category: A::CATEGORY.to_owned(),
                    aggregate_id: aggregate_id.to_owned(),
                    expected_last_seq: loaded.last_seq,
                    batch: None,
                },
            );
            revision = match self.outcomes.put(&appending, revision).await {
                Ok(revision) => revision,
                Err(PublishError::Conflict { .. }) => {
                    (revision, record) = self.outcomes.get(&request.command_id).await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            record = Some(appending);

            let version = loaded.version + 1;
            match repository
                .append(aggregate_id, loaded.clone(), &event, metadata)
                .await
            {
                Ok(appended) if !appended.duplicate => {
                    return Ok(Reply::accepted(aggregate.clone(), version, appended.seq));
                }
                Ok(duplicate) => {
                    // JetStream had this command id already: reply with the event it stored.
                    let stream = stream_of::<A>();
                    if let Some(first) = self.store().event_at(stream, duplicate.seq).await? {
                        return Ok(Reply::accepted(
                            aggregate.clone(),
                            first.envelope.version,
                            first.seq,
                        ));
                    }
                }
                Err(PublishError::Conflict { .. }) => {
                    // Another instance appended first: take its events in and decide again,
                    // after a short random pause so that instances do not keep colliding.
                    loaded = repository.catch_up(aggregate_id, loaded).await?;
                    let pause = rand::random_range(0..=(1u64 << attempt.min(6)));
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(Reply::refused(
            ErrorCode::Conflict,
            format!(
                "{} kept changing; gave up after {MAX_ATTEMPTS} attempts, try again",
                aggregate_subject(A::CATEGORY, aggregate_id)
            ),
        ))
    }

    /// Writes `reply` as the command's final refusal, if its record is still at `revision`.
    /// False: another run of the same command id wrote first.
    async fn record_refusal(
        &self,
        request: &ParsedRequest,
        reply: &Reply,
        revision: u64,
    ) -> Result<bool, Infrastructure> {
        let refused = self.record(
            request,
            OutcomeState::Rejected {
                reply: reply.clone(),
            },
        );
        match self.outcomes.put(&refused, revision).await {
            Ok(_) => Ok(true),
            Err(PublishError::Conflict { .. }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    fn record(&self, request: &ParsedRequest, state: OutcomeState) -> OutcomeRecord {
        OutcomeRecord {
            command_id: request.command_id.clone(),
            fingerprint: request.fingerprint.clone(),
            state,
        }
    }

    /// What an earlier run of the same command id came to, as far as can be told. The run had
    /// the same fingerprint, so it acted on the same `aggregate`.
    async fn earlier_run(
        &self,
        record: &OutcomeRecord,
        aggregate: &AggregateId,
    ) -> Result<EarlierRun, LoadError> {
        match &record.state {
            OutcomeState::Rejected { reply } => Ok(EarlierRun::Ended(reply.clone())),
            OutcomeState::Appending {
                category,
                aggregate_id,
                expected_last_seq,
                batch: own_batch,
            } => {
                let Some(stream) = stream_for_category(category) else {
                    return Ok(EarlierRun::CannotLand);
                };
                let subject = aggregate_subject(category, aggregate_id);
                let next = |after| self.store().event_after_in_batch(stream, &subject, after);
                let Some((mut event, batch)) = next(*expected_last_seq).await? else {
                    return Ok(EarlierRun::MayStillLand {
                        expected_last_seq: *expected_last_seq,
                    });
                };
                // The first event after the expected sequence is the one append that was
                // conditional on it: this run's, or the first of a writer's batch (an atomic
                // batch, or a chain whose every event was conditional on the one before) that
                // may hold this run's event further on, or another's, after which this run's
                // can never land. A batch whose id this run's record does not name is
                // another's.
                loop {
                    if event.envelope.command_id == record.command_id {
                        return Ok(EarlierRun::Ended(Reply::accepted(
                            aggregate.clone(),
                            event.envelope.version,
                            event.seq,
                        )));
                    }
                    match (&batch, next(event.seq).await?) {
                        (Some(batch), Some((later, Some(later_batch))))
                            if later_batch == *batch =>
                        {
                            event = later;
                        }
                        // This run's own batch ends the subject: a chain's next event, this
                        // run's among them, may still be on its way, conditional on the last
                        // one stored.
                        (Some(batch), None) if own_batch.as_ref() == Some(batch) => {
                            return Ok(EarlierRun::MayStillLand {
                                expected_last_seq: event.seq,
                            });
                        }
                        _ => return Ok(EarlierRun::CannotLand),
                    }
                }
            }
        }
    }

    pub(crate) fn store(&self) -> &EventStore {
        self.orders.store()
    }
}

/// The answer to a request under a command id that ran a different command.
pub(crate) fn reused_id(request: &ParsedRequest) -> Reply {
    Reply::refused(
        ErrorCode::InvalidCommand,
        format!(
            "command id {} was already used for a different command",
            request.command_id
        ),
    )
}

/// The outcome of a reserve voided before it ran.
pub(crate) fn voided(request: &ParsedRequest) -> Reply {
    Reply::refused(
        ErrorCode::InvalidState,
        format!(
            "command {} was voided before it ran: its compensation came first",
            request.command_id
        ),
    )
}
