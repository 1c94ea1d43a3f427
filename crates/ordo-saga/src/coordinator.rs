//! [`Coordinator`]: starts, advances and persists order sagas.
//!
//! - Intake: the coordinators share the partitions of `ORDO_ORDERS`; each reads the stream by
//!   sequence and takes in its partitions' events in batches, with a checkpoint per partition
//!   (see [`intake`]). The `OrderPlaced` of a batch start their sagas in one statement;
//!   `OrderCancelled`, `OrderShipped` and `OrderRejected` extend theirs one by one. Applying an
//!   event twice changes nothing.
//! - Driving: a coordinator claims due sagas in batches (`FOR UPDATE SKIP LOCKED`), leasing each
//!   (its `next_attempt_at` moves past the lease), and drives up to `in_flight` of them at once,
//!   each in a task of its own that holds no lock and no connection while a step runs. A step is
//!   a command with the step's deterministic id (or a call to the payment gateway); its outcome
//!   is saved before the next step is sent, guarded by the saga's `version`: a saga that an order
//!   event or another coordinator changed meanwhile is let go, and its step runs again
//!   (harmlessly: the same command id gets the same answer). A coordinator that dies leaves its
//!   sagas to whoever claims them once their lease ends.
//! - A step whose outcome is unknown (no answer, no responders, a transient error) is scheduled
//!   again with capped exponential back-off and jitter, for as long as it takes: an outage is
//!   waited out, not counted.
//! - The deadline bounds what can hang, not time spent queued inside ordo: it starts at the
//!   first step before the confirm that has no answer, and once it passes, a saga that has not
//!   reached the confirm compensates with reason `timeout`.
//! - One clock decides: leases, retries and the deadline are written and compared in PostgreSQL's
//!   `now()`, never a coordinator's clock, and a plan the deadline changed is saved (version-fenced)
//!   before its first compensation is sent.
//! - The confirm is the pivot: an answer other than `ok` is resolved by reading the order's
//!   last event from the stream leader (not a replica that may lag): confirmed or shipped means
//!   the confirm happened.
//!
//! Its parts: [`intake`] (order events in), [`leases`] (due sagas claimed), [`driving`] (a
//! saga's steps run and their outcomes judged), [`saves`] (a saga's row written, version-fenced,
//! in batches).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use opentelemetry::Context;
use ordo_contract::{
    CommandRequest, ConfirmOrder, DeductStock, ErrorCode, Quantity, Reason, RejectOrder,
    ReleaseStock, Reply, ReserveStock, headers,
};
use ordo_domain::{
    OrderId,
    order::OrderEvent,
    saga::{Outcome, Saga, SagaState, Step},
};
use ordo_eventstore::{EventEnvelope, backoff::Backoff, trace};
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::{
    payment::{PaymentError, PaymentGateway},
    unreadable::{self, ReadEvent, Unreadable},
};
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How long a saga whose step before the confirm has no answer may keep trying before it
    /// gives up with reason `timeout`, counted from that first unanswered step.
    pub saga_timeout: Duration,
    /// How long one command may take before its outcome counts as unknown.
    pub step_timeout: Duration,
    /// The first retry pause of a step whose outcome was unknown; it doubles, with jitter.
    pub retry_base: Duration,
    /// The longest retry pause: how soon after an outage ends every saga is moving again.
    pub retry_cap: Duration,
    /// Sagas driven at once by this coordinator.
    pub in_flight: usize,
    /// The partitions of the order events, shared by the coordinators' intakes (the command
    /// service's count: every instance of every group uses the same).
    pub partitions: u32,
    /// Replicas of the partition lease bucket, when this coordinator creates it.
    pub replicas: usize,
    /// How often an idle coordinator looks for due sagas (new ones wake it at once).
    pub poll: Duration,
    /// The time this coordinator stamps on what it only shows (a step's last attempt). Leases,
    /// retries and the deadline are never read from it: they are PostgreSQL's `now()`, the one
    /// clock every coordinator shares, so that a coordinator whose clock is off cannot end
    /// another's lease early or see a deadline pass that has not.
    pub clock: Clock,
}

/// A coordinator's own clock: the system's, or one set off from it (to test that a coordinator
/// whose clock is wrong still decides by PostgreSQL's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    offset: chrono::TimeDelta,
}

impl Clock {
    pub fn skewed(offset: chrono::TimeDelta) -> Self {
        Self { offset }
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.offset
    }
}

impl CoordinatorConfig {
    /// How long a claimed saga stays with its coordinator without news: longer than one step
    /// can take (a command, then the read that resolves a confirm), so that a live coordinator
    /// keeps it, and short, so that the sagas of a dead one move again soon.
    pub fn lease(&self) -> Duration {
        self.step_timeout * 2 + Duration::from_secs(1)
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            saga_timeout: Duration::from_secs(30),
            step_timeout: Duration::from_secs(5),
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(10),
            in_flight: 256,
            partitions: ordo_eventstore::partition::DEFAULT_PARTITIONS,
            replicas: 1,
            poll: Duration::from_millis(50),
            clock: Clock::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("JetStream: {0}")]
    JetStream(String),
}

pub struct Coordinator<G: PaymentGateway> {
    pool: PgPool,
    nats: async_nats::Client,
    gateway: Arc<G>,
    config: CoordinatorConfig,
}

impl<G: PaymentGateway> Clone for Coordinator<G> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            nats: self.nats.clone(),
            gateway: self.gateway.clone(),
            config: self.config.clone(),
        }
    }
}

const CONSUMER: &str = ordo_eventstore::ConsumerId::Saga.name();

/// Whether a command is sent to be voided if its id has not run (a resolve's reserve).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Void {
    No,
    IfNotRun,
}

/// A saga this coordinator has claimed: its state and the version it last read or wrote.
struct Claimed {
    saga: Saga,
    version: i64,
    /// Whether the saga's deadline had passed, by PostgreSQL's clock, when it was last read or
    /// written.
    deadline_passed: bool,
    /// The order's trace (its OrderPlaced event's `traceparent`): every step continues it.
    traceparent: Option<String>,
    /// When the order was placed: the time to settle it is counted from there.
    placed_at: DateTime<Utc>,
}

impl<G: PaymentGateway> Coordinator<G> {
    pub fn new(
        pool: PgPool,
        nats: async_nats::Client,
        gateway: G,
        config: CoordinatorConfig,
    ) -> Self {
        Self {
            pool,
            nats,
            gateway: Arc::new(gateway),
            config,
        }
    }

    /// Runs the intake and the driving until `shutdown` completes. Failures are logged and
    /// retried; nothing is lost, since a partition's checkpoint moves only once its events are
    /// applied (or held back) and a claimed saga's lease ends by itself.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        // Sagas the intake started, handed to the driving already leased: no claim needed.
        // When every slot is taken, the intake waits, and order events wait in the stream.
        let (started, started_sagas) = mpsc::channel(self.config.in_flight);
        let (saves, save_requests) = mpsc::channel(self.config.in_flight);
        let intake = self.clone();
        tasks.spawn(async move { intake.intake_forever(started).await });
        let driver = self.clone();
        tasks.spawn(async move { driver.drive_forever(started_sagas, Saves(saves)).await });
        tasks.spawn(save_batches(self.pool.clone(), save_requests));
        shutdown.await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// An operator's retry of a saga stuck in a compensation: a fresh count for its unanswered
    /// steps, due at once. A saga that is not stuck is left as it is.
    pub async fn retry_stuck(&self, order_id: &OrderId) -> Result<StuckRetry, CoordinatorError> {
        let mut tx = self.pool.begin().await?;
        let Some(saga) = load_for_update(&mut tx, order_id.as_str()).await? else {
            return Ok(StuckRetry::NoSaga);
        };
        if saga.state != SagaState::CompensationStuck {
            return Ok(StuckRetry::NotStuck(saga.state));
        }
        let saga = saga.retry_stuck();
        save(&mut *tx, &saga, None, Some(Duration::ZERO), None).await?;
        tx.commit().await?;
        Ok(StuckRetry::Retried(saga.state))
    }
}

/// What an operator's retry of a stuck saga did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StuckRetry {
    /// No saga for the order.
    NoSaga,
    /// The saga is in this state, not `compensation_stuck`: nothing was changed.
    NotStuck(SagaState),
    /// Retried: the saga is back in this state, its step due at once.
    Retried(SagaState),
}

mod driving;
mod intake;
mod leases;
mod saves;

use leases::CLAIM_BATCH;
use saves::{Saves, Written, load_for_update, save, save_batches, steps_json};
