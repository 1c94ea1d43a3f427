//! [`Coordinator`]: starts, advances and persists order sagas.
//!
//! - Intake: a durable consumer (`ordo-saga`, shared by every coordinator) on `ORDO_ORDERS`,
//!   read in batches. The `OrderPlaced` of a batch start their sagas in one statement;
//!   `OrderCancelled` and `OrderShipped` extend theirs one by one. Events are acked once applied;
//!   applying one twice changes nothing.
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

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
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

/// Order events taken in per statement, at most.
const INTAKE_BATCH: usize = 256;

/// Sagas claimed per statement, at most.
const CLAIM_BATCH: usize = 64;

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
    /// retried; nothing is lost, since events are acked only once applied and a claimed saga's
    /// lease ends by itself.
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

    async fn intake_forever(&self, started: mpsc::Sender<Claimed>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            if let Err(err) = self.intake(&mut backoff, &started).await {
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "saga intake stopped; starting again");
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Takes order events in until the consumer fails; every batch taken in resets `backoff`.
    async fn intake(
        &self,
        backoff: &mut Backoff,
        started: &mpsc::Sender<Claimed>,
    ) -> Result<(), CoordinatorError> {
        let js = jetstream::new(self.nats.clone());
        let js_err = |err: &dyn std::fmt::Display| CoordinatorError::JetStream(err.to_string());
        let stream = js
            .get_stream(ordo_eventstore::StreamId::Orders.name())
            .await
            .map_err(|err| js_err(&err))?;
        let consumer = stream
            .get_or_create_consumer(
                CONSUMER,
                pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    description: Some(
                        "ordo saga coordinators: order events that start or extend sagas".into(),
                    ),
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    max_ack_pending: 4 * INTAKE_BATCH as i64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| js_err(&err))?;
        let messages = consumer.messages().await.map_err(|err| js_err(&err))?;
        let mut batches = messages.ready_chunks(INTAKE_BATCH);
        while let Some(batch) = batches.next().await {
            let messages = batch
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| js_err(&err))?;
            let (taken_in, new_sagas) = match self.take_in(&messages).await {
                Ok(taken_in) => taken_in,
                Err(err) => {
                    for message in &messages {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                    return Err(err);
                }
            };
            backoff.reset();
            for (message, taken_in) in messages.iter().zip(taken_in) {
                let ack = match taken_in {
                    TakenIn::Done => {
                        unreadable::handled(&self.pool, CONSUMER, message).await;
                        AckKind::Ack
                    }
                    // The saga's OrderPlaced is not in yet (another coordinator holds it, or
                    // it is held back unreadable): asked again less and less often.
                    TakenIn::TooEarly => {
                        let deliveries = message.info().map_or(1, |info| info.delivered);
                        AckKind::Nak(Some(unreadable::redelivery_delay(
                            Duration::from_millis(200),
                            deliveries,
                        )))
                    }
                    TakenIn::Unreadable(why) => {
                        unreadable::hold_back(&self.pool, CONSUMER, message, &why).await;
                        continue;
                    }
                };
                if let Err(err) = message.ack_with(ack).await {
                    // Redelivered after ack_wait; taking it in again changes nothing.
                    tracing::debug!(%err, "ack not sent");
                }
            }
            for saga in new_sagas {
                if started.send(saga).await.is_err() {
                    return Ok(()); // Stopping.
                }
            }
        }
        Ok(())
    }

    /// Applies a batch of order events to their sagas: the new sagas in one statement, then
    /// the events that extend one, in stream order (an order's OrderPlaced always comes first).
    /// Returns what to do with each message, and the sagas it started, leased to this
    /// coordinator (not those an earlier delivery of the same events started).
    async fn take_in(
        &self,
        messages: &[jetstream::Message],
    ) -> Result<(Vec<TakenIn>, Vec<Claimed>), CoordinatorError> {
        let events: Vec<Result<ReadEvent, Unreadable>> = messages
            .iter()
            .map(|message| unreadable::read_order_event(&message.payload))
            .collect();
        let mut starts: BTreeMap<String, (Saga, DateTime<Utc>, Option<String>)> = BTreeMap::new();
        for (message, event) in messages.iter().zip(&events) {
            if let Ok(ReadEvent {
                order_id,
                envelope,
                event:
                    OrderEvent::OrderPlaced {
                        customer_id,
                        lines,
                        total_cents,
                        ..
                    },
            }) = event
            {
                let saga = Saga::start(order_id.clone(), customer_id.clone(), lines, *total_cents);
                let traceparent = trace::traceparent(&trace::extract(message.headers.as_ref()));
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
        for event in events {
            taken_in.push(match event {
                Ok(ReadEvent {
                    order_id,
                    event: OrderEvent::OrderCancelled { .. },
                    ..
                }) => self.extend(&order_id, Saga::cancel).await?,
                Ok(ReadEvent {
                    order_id,
                    event: OrderEvent::OrderShipped {},
                    ..
                }) => self.extend(&order_id, Saga::ship).await?,
                Ok(ReadEvent {
                    order_id,
                    event: OrderEvent::OrderRejected { reason },
                    ..
                }) => {
                    self.extend(&order_id, |saga| saga.order_rejected(&reason))
                        .await?
                }
                // Not acknowledged: acking would lose a saga's start or its cancellation.
                Err(why) => TakenIn::Unreadable(why),
                // Started above; the saga's own doings.
                Ok(_) => TakenIn::Done,
            });
        }
        Ok((taken_in, new_sagas))
    }

    async fn extend(
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

    /// Drives the sagas the intake started and claims due ones, up to `in_flight` at once,
    /// until aborted.
    async fn drive_forever(&self, mut started: mpsc::Receiver<Claimed>, saves: Saves) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut driving = tokio::task::JoinSet::new();
        let spawn = |driving: &mut tokio::task::JoinSet<()>, claimed| {
            let (driver, saves) = (self.clone(), saves.clone());
            driving.spawn(async move { driver.drive(claimed, &saves).await });
        };
        loop {
            while driving.try_join_next().is_some() {}
            metrics::gauge!("ordo_sagas_in_flight").set(driving.len() as f64);
            let room = self.config.in_flight.saturating_sub(driving.len());
            if room == 0 {
                driving.join_next().await;
                continue;
            }
            while driving.len() < self.config.in_flight
                && let Ok(claimed) = started.try_recv()
            {
                spawn(&mut driving, claimed);
            }
            let room = self.config.in_flight.saturating_sub(driving.len());
            if room == 0 {
                continue;
            }
            match self.claim(room.min(CLAIM_BATCH)).await {
                Ok(claimed) if claimed.is_empty() => {
                    backoff.reset();
                    tokio::select! {
                        () = tokio::time::sleep(self.config.poll) => {}
                        Some(claimed) = started.recv() => spawn(&mut driving, claimed),
                        Some(_) = driving.join_next(), if !driving.is_empty() => {}
                    }
                }
                Ok(claimed) => {
                    backoff.reset();
                    for claimed in claimed {
                        spawn(&mut driving, claimed);
                    }
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, retry_in = ?delay, "claiming sagas failed; pausing");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Leases up to `limit` due sagas to this coordinator.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, CoordinatorError> {
        let rows = sqlx::query(
            // A running saga is never due later than its deadline (see `save`), so one range
            // scan of the `sagas_due` index finds both retries and deadlines.
            "UPDATE sagas s
             SET next_attempt_at = now() + make_interval(secs => $2), version = s.version + 1
             FROM (SELECT order_id FROM sagas
                   WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= now()
                   ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
             WHERE s.order_id = due.order_id
             RETURNING s.order_id, s.data, coalesce(s.deadline_at <= now(), false) AS deadline_passed,
                       s.version, s.traceparent, s.started_at",
        )
        .bind(limit as i64)
        .bind(self.config.lease().as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_value(row.get("data")) {
                Ok(saga) => claimed.push(Claimed {
                    saga,
                    version: row.get("version"),
                    deadline_passed: row.get("deadline_passed"),
                    traceparent: row.get("traceparent"),
                    placed_at: row.get("started_at"),
                }),
                Err(err) => {
                    // Claiming it again would fail the same way: set it aside, visibly.
                    let order_id: String = row.get("order_id");
                    tracing::error!(order_id, %err, "unreadable saga state; set aside for an operator");
                    metrics::counter!("ordo_sagas_unreadable_total").increment(1);
                    sqlx::query(
                        "UPDATE sagas SET next_attempt_at = NULL, reason = $2, updated_at = now()
                         WHERE order_id = $1",
                    )
                    .bind(&order_id)
                    .bind(format!("unreadable saga state: {err}"))
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        Ok(claimed)
    }

    /// Runs the steps of a claimed saga one after the other, saving each outcome before the
    /// next step is sent, until the saga finishes, waits for a retry, or is no longer ours.
    async fn drive(&self, mut claimed: Claimed, saves: &Saves) {
        loop {
            let state_before = claimed.saga.state;
            let mut next_attempt_in = None;
            let mut start_deadline_in = None;
            let mut keep_driving = false;
            if claimed.saga.state == SagaState::Running && claimed.deadline_passed {
                claimed.saga = claimed.saga.time_out();
            }
            if claimed.saga.state != state_before {
                // Timed out: the compensation plan is saved before any of it is sent, as every
                // plan change is. A coordinator that lost the saga meanwhile (its save is
                // refused) must not act on a plan that no one saved.
                tracing::info!(order_id = %claimed.saga.order_id, "saga deadline passed; compensating");
                keep_driving = true;
                next_attempt_in = Some(self.config.lease());
            } else if let Some((index, planned)) = claimed.saga.next_step() {
                let step = planned.step.clone();
                let span = tracing::info_span!(
                    "saga_step",
                    otel.name = %format_args!("saga {}", step.kind()),
                    order_id = %claimed.saga.order_id,
                    step = step.kind(),
                    index,
                    attempt = planned.attempts + 1,
                    outcome = tracing::field::Empty,
                    trace_id = tracing::field::Empty,
                );
                let passed_on = trace::follow(
                    &span,
                    trace::from_traceparent(claimed.traceparent.as_deref()),
                );
                let started = std::time::Instant::now();
                let outcome = self
                    .run_step(&claimed.saga, index, &step, &passed_on)
                    .instrument(span.clone())
                    .await;
                let outcome_name = outcome_name(&outcome);
                span.record("outcome", outcome_name);
                metrics::histogram!(
                    "ordo_saga_step_duration_seconds",
                    "step" => step.kind(),
                    "outcome" => outcome_name,
                )
                .record(started.elapsed().as_secs_f64());
                if step.is_compensation() && outcome_name == "succeeded" {
                    metrics::counter!("ordo_saga_compensations_total", "step" => step.kind())
                        .increment(1);
                }
                tracing::debug!(parent: &span, ?outcome, "saga step");
                let unknown = matches!(outcome, Outcome::Unknown(_));
                let before_pivot =
                    claimed.saga.state == SagaState::Running && !claimed.saga.reached_pivot();
                if unknown && before_pivot {
                    // The deadline starts at the first unanswered step; a later one keeps it.
                    start_deadline_in = Some(self.config.saga_timeout);
                }
                claimed.saga = claimed.saga.record(index, outcome, self.config.clock.now());
                let attempts = claimed.saga.steps[index].attempts;
                if claimed.saga.next_step().is_some() {
                    keep_driving = !unknown;
                    next_attempt_in = Some(if unknown {
                        self.backoff(attempts)
                    } else {
                        // Still leased: this coordinator goes on with the next step.
                        self.config.lease()
                    });
                }
            }
            match saves
                .save(
                    &claimed.saga,
                    claimed.version,
                    next_attempt_in,
                    start_deadline_in,
                )
                .await
            {
                Ok(Some(Written { deadline_passed })) => {
                    claimed.version += 1;
                    claimed.deadline_passed = deadline_passed;
                }
                Ok(None) => {
                    // Changed meanwhile (cancelled, shipped, or claimed by another coordinator
                    // after the lease ran out): whoever changed it made it due again.
                    tracing::debug!(order_id = %claimed.saga.order_id, "saga changed meanwhile; let go");
                    return;
                }
                Err(err) => {
                    tracing::warn!(order_id = %claimed.saga.order_id, %err, "saving a saga failed; it runs again once its lease ends");
                    return;
                }
            }
            if !claimed.saga.state.is_active() {
                metrics::counter!("ordo_sagas_finished_total", "state" => claimed.saga.state.as_str())
                    .increment(1);
            }
            let settled = matches!(
                claimed.saga.state,
                SagaState::Confirmed | SagaState::Rejected
            );
            if settled && state_before != claimed.saga.state {
                let took = (Utc::now() - claimed.placed_at)
                    .to_std()
                    .unwrap_or_default();
                metrics::histogram!("ordo_order_settle_seconds", "state" => claimed.saga.state.as_str())
                    .record(took.as_secs_f64());
            }
            if !keep_driving {
                return;
            }
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let exponential = self.config.retry_base.saturating_mul(1 << attempts.min(16));
        let capped = exponential.min(self.config.retry_cap);
        // Full jitter: anywhere between half and all of it, so retries do not move in step.
        capped.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Runs one step; `trace` is the step span's context, passed on to the command it sends.
    async fn run_step(&self, saga: &Saga, index: usize, step: &Step, trace: &Context) -> Outcome {
        let order_id = saga.order_id.clone();
        // A step the contract cannot carry is refused as the service would refuse it.
        let reserve = |sku: &ordo_domain::Sku, qty: u64| {
            let qty = Quantity::new(qty).ok_or_else(|| format!("qty: {qty} is not a quantity"))?;
            Ok::<_, String>(CommandRequest::ReserveStock(ReserveStock {
                sku: sku.clone(),
                order_id: order_id.clone(),
                qty,
            }))
        };
        let request = match step {
            Step::Reserve { sku, qty } => reserve(sku, *qty),
            Step::ResolveReserve { sku, qty } => {
                // The reserve itself, under its id, voided if it has not run.
                return match reserve(sku, *qty) {
                    Ok(reserve) => {
                        self.send_command(saga, index, &reserve, trace, Void::IfNotRun)
                            .await
                    }
                    Err(refusal) => Outcome::Failed(refusal),
                };
            }
            Step::Release { sku } => Ok(CommandRequest::ReleaseStock(ReleaseStock {
                sku: sku.clone(),
                order_id,
            })),
            Step::Deduct { sku } => Ok(CommandRequest::DeductStock(DeductStock {
                sku: sku.clone(),
                order_id,
            })),
            // Cut here too: a saga an earlier build planned may hold a reason the reject
            // refuses (its id names the planned step, and the refused copy never ran).
            Step::Reject { reason } => {
                Reason::new(ordo_domain::saga::reason_an_order_can_keep(reason.clone()))
                    .map(|reason| CommandRequest::RejectOrder(RejectOrder { order_id, reason }))
                    .map_err(|refusal| refusal.to_string())
            }
            Step::Confirm => {
                let request = CommandRequest::ConfirmOrder(ConfirmOrder { order_id });
                return match self
                    .send_command(saga, index, &request, trace, Void::No)
                    .await
                {
                    Outcome::Succeeded => Outcome::Succeeded,
                    not_ok => self.resolve_confirm(&saga.order_id, not_ok).await,
                };
            }
            Step::Authorize { amount_cents } => {
                let call = self.gateway.authorize(&saga.order_id, *amount_cents);
                let span =
                    tracing::info_span!("payment", otel.name = "payment authorize", amount_cents);
                return payment_outcome(
                    tokio::time::timeout(self.config.step_timeout, call.instrument(span)).await,
                );
            }
            Step::Refund { amount_cents } => {
                let call = self.gateway.refund(&saga.order_id, *amount_cents);
                let span =
                    tracing::info_span!("payment", otel.name = "payment refund", amount_cents);
                return payment_outcome(
                    tokio::time::timeout(self.config.step_timeout, call.instrument(span)).await,
                );
            }
        };
        match request {
            Ok(request) => {
                self.send_command(saga, index, &request, trace, Void::No)
                    .await
            }
            Err(refusal) => Outcome::Failed(refusal),
        }
    }

    /// Sends step `index` of `saga` as a command and says what its reply means.
    async fn send_command(
        &self,
        saga: &Saga,
        index: usize,
        command: &CommandRequest,
        trace: &Context,
        void: Void,
    ) -> Outcome {
        let subject = command.subject();
        let mut request_headers = async_nats::HeaderMap::new();
        trace::inject(trace, &mut request_headers);
        if void == Void::IfNotRun {
            request_headers.insert(headers::VOID_IF_NOT_RUN, "true");
        }
        request_headers.insert(headers::MSG_ID, saga.command_id(index).as_str());
        request_headers.insert(
            headers::CORRELATION_ID,
            format!("order:{}", saga.order_id).as_str(),
        );
        let request = async_nats::Request::new()
            .headers(request_headers)
            .payload(command.body_bytes().into())
            .timeout(Some(self.config.step_timeout));
        let reply = match self.nats.send_request(subject, request).await {
            Ok(reply) => reply,
            Err(err) => return Outcome::Unknown(format!("{subject}: {err}")),
        };
        match Reply::parse(&reply.payload) {
            Ok(Reply::Accepted { .. }) => Outcome::Succeeded,
            Ok(Reply::Refused { code, message, .. }) => match code {
                // Definite: retrying the same command gets the same answer.
                // The void itself was refused (not the reserve): nothing is settled, and a late
                // copy could still land. Tried again, and stuck in sight if it stays so.
                ErrorCode::InvalidCommand if void == Void::IfNotRun => {
                    Outcome::Unknown(format!("the void was refused: {message}"))
                }
                ErrorCode::InsufficientStock
                | ErrorCode::NotFound
                | ErrorCode::InvalidState
                | ErrorCode::InvalidCommand => Outcome::Failed(message),
                // Of the moment: it may work when sent again.
                ErrorCode::Conflict | ErrorCode::Unavailable | ErrorCode::RateLimited => {
                    Outcome::Unknown(format!("{}: {message}", code.as_str()))
                }
            },
            Err(err) => Outcome::Unknown(format!("{subject}: {err}")),
        }
    }

    /// A confirm that was not answered `ok` happened if the order's last event says it is
    /// confirmed or shipped. The read goes to the stream leader: a lagging replica's answer
    /// could say "pending" about a confirmed order.
    async fn resolve_confirm(&self, order_id: &OrderId, not_ok: Outcome) -> Outcome {
        let js = jetstream::new(self.nats.clone());
        let subject = format!("ordo.order.events.{order_id}");
        let last = async {
            let stream = js
                .get_stream(ordo_eventstore::StreamId::Orders.name())
                .await
                .map_err(|e| e.to_string())?;
            let message = stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .map_err(|e| e.to_string())?;
            EventEnvelope::from_bytes(&message.payload).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.config.step_timeout, last).await {
            Ok(Ok(envelope))
                if ["OrderConfirmed", "OrderShipped"].contains(&envelope.event_type.as_str()) =>
            {
                Outcome::Succeeded
            }
            Ok(Ok(envelope)) => Outcome::Unknown(format!(
                "confirm not answered ok ({}); the order's last event is {}",
                outcome_text(&not_ok),
                envelope.event_type
            )),
            Ok(Err(err)) => Outcome::Unknown(format!(
                "confirm not answered ok ({}); the order's events cannot be read: {err}",
                outcome_text(&not_ok)
            )),
            Err(_) => Outcome::Unknown(format!(
                "confirm not answered ok ({}); the order's events did not answer in time",
                outcome_text(&not_ok)
            )),
        }
    }

    /// An operator's retry of a saga stuck in a compensation.
    pub async fn retry_stuck(
        &self,
        order_id: &OrderId,
    ) -> Result<Option<SagaState>, CoordinatorError> {
        let mut tx = self.pool.begin().await?;
        let Some(saga) = load_for_update(&mut tx, order_id.as_str()).await? else {
            return Ok(None);
        };
        let saga = saga.retry_stuck();
        save(&mut *tx, &saga, None, Some(Duration::ZERO), None).await?;
        tx.commit().await?;
        Ok(Some(saga.state))
    }
}

fn outcome_text(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Succeeded => "ok",
        Outcome::Failed(reason) | Outcome::Unknown(reason) => reason,
    }
}

enum TakenIn {
    Done,
    TooEarly,
    Unreadable(Unreadable),
}

/// An outcome's name in metrics and spans.
fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed(_) => "failed",
        Outcome::Unknown(_) => "unknown",
    }
}

fn payment_outcome(
    result: Result<Result<(), PaymentError>, tokio::time::error::Elapsed>,
) -> Outcome {
    match result {
        Ok(Ok(())) => Outcome::Succeeded,
        Ok(Err(declined @ PaymentError::Declined(_))) => Outcome::Failed(declined.to_string()),
        Ok(Err(unavailable)) => Outcome::Unknown(unavailable.to_string()),
        Err(_) => Outcome::Unknown("the payment gateway did not answer in time".into()),
    }
}

/// The steps as the read model shows them.
fn steps_json(saga: &Saga) -> Value {
    Value::Array(
        saga.steps
            .iter()
            .map(|planned| {
                let mut step = serde_json::to_value(&planned.step).expect("steps serialize");
                step["state"] = json!(planned.state);
                step["attempts"] = json!(planned.attempts);
                step["last_error"] = json!(planned.last_error);
                step["last_attempt_at"] = json!(planned.last_attempt_at);
                step
            })
            .collect(),
    )
}

async fn load_for_update(
    tx: &mut Transaction<'_, Postgres>,
    order_id: &str,
) -> Result<Option<Saga>, sqlx::Error> {
    let data: Option<Value> =
        sqlx::query_scalar("SELECT data FROM sagas WHERE order_id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await?;
    data.map(|data| serde_json::from_value(data).map_err(|err| sqlx::Error::Decode(Box::new(err))))
        .transpose()
}

/// A saga's row as `save` and `save_batches` write it: `next_attempt_in` is how long from now
/// a coordinator should run it next (never, once finished); `start_deadline_in` starts the
/// deadline that bounds the steps before the confirm, if none has started. Every time is counted
/// from PostgreSQL's `now()`, never from a coordinator's clock.
fn saga_row(
    saga: &Saga,
    expected: Option<i64>,
    next_attempt_in: Option<Duration>,
    start_deadline_in: Option<Duration>,
) -> Value {
    let next_attempt_in = next_attempt_in.filter(|_| saga.state.is_active());
    json!({
        "order_id": saga.order_id.as_str(),
        "state": saga.state.as_str(),
        "steps": steps_json(saga),
        "reason": saga.shown_reason(),
        "data": saga,
        "next_attempt_in": next_attempt_in.map(|d| d.as_secs_f64()),
        "before_pivot": saga.state == SagaState::Running && !saga.reached_pivot(),
        "expected": expected,
        "deadline_in": start_deadline_in.map(|d| d.as_secs_f64()),
    })
}

/// Writes the rows (of `saga_row`) whose version is still the one expected (any version when
/// none is) and returns, for each row written, its order id, the version expected and whether
/// its deadline has passed. The version tells apart two rows of one saga in one batch (two
/// drivers of it in one coordinator, after a lease ran out): only the one whose version matches
/// is written, and only it may be told so. A running saga is never due later than its deadline,
/// so that the claim's one range scan finds both retries and deadlines.
const SAVE_SAGAS: &str = "
    UPDATE sagas s SET state = u.state, steps = u.steps, reason = u.reason, data = u.data,
           updated_at = now(),
           deadline_at = coalesce(s.deadline_at, now() + make_interval(secs => u.deadline_in)),
           next_attempt_at = CASE
               WHEN u.before_pivot
               THEN least(now() + make_interval(secs => u.next_attempt_in),
                          coalesce(s.deadline_at, now() + make_interval(secs => u.deadline_in)))
               ELSE now() + make_interval(secs => u.next_attempt_in) END,
           version = s.version + 1
    FROM jsonb_to_recordset($1) AS u(order_id text, state text, steps jsonb, reason text,
                                     data jsonb, next_attempt_in float8, before_pivot boolean,
                                     expected bigint, deadline_in float8)
    WHERE s.order_id = u.order_id AND (u.expected IS NULL OR s.version = u.expected)
    RETURNING s.order_id, u.expected, coalesce(s.deadline_at <= now(), false)";

/// Writes one saga, if its version is still `expected` (any version when `None`), and says
/// whether it did.
async fn save(
    executor: impl sqlx::PgExecutor<'_>,
    saga: &Saga,
    expected: Option<i64>,
    next_attempt_in: Option<Duration>,
    start_deadline_in: Option<Duration>,
) -> Result<bool, sqlx::Error> {
    let row = saga_row(saga, expected, next_attempt_in, start_deadline_in);
    let saved: Vec<(String, Option<i64>, bool)> = sqlx::query_as(SAVE_SAGAS)
        .bind(Value::Array(vec![row]))
        .fetch_all(executor)
        .await?;
    Ok(!saved.is_empty())
}

/// A saga's save went in.
#[derive(Debug, PartialEq, Eq)]
struct Written {
    /// Its deadline has passed, by PostgreSQL's clock.
    deadline_passed: bool,
}

/// The driving tasks' way to [`save_batches`].
#[derive(Clone)]
struct Saves(mpsc::Sender<SaveRequest>);

struct SaveRequest {
    order_id: String,
    expected: i64,
    row: Value,
    saved: oneshot::Sender<Result<Option<Written>, String>>,
}

impl Saves {
    /// Saves `saga` if its version is still `expected`; says whether it did (`None`: it moved).
    async fn save(
        &self,
        saga: &Saga,
        expected: i64,
        next_attempt_in: Option<Duration>,
        start_deadline_in: Option<Duration>,
    ) -> Result<Option<Written>, String> {
        let (saved, answer) = oneshot::channel();
        let request = SaveRequest {
            order_id: saga.order_id.to_string(),
            expected,
            row: saga_row(saga, Some(expected), next_attempt_in, start_deadline_in),
            saved,
        };
        self.0
            .send(request)
            .await
            .map_err(|_| "stopping".to_owned())?;
        answer.await.map_err(|_| "stopping".to_owned())?
    }
}

/// Group commit: every save waiting is written in one statement, so that hundreds of sagas in
/// flight cost a few statements a step, not hundreds.
async fn save_batches(pool: PgPool, mut requests: mpsc::Receiver<SaveRequest>) {
    let mut batch = Vec::new();
    while requests.recv_many(&mut batch, SAVE_BATCH).await > 0 {
        let rows = Value::Array(batch.iter().map(|request| request.row.clone()).collect());
        let result: Result<Vec<(String, Option<i64>, bool)>, sqlx::Error> =
            sqlx::query_as(SAVE_SAGAS).bind(rows).fetch_all(&pool).await;
        metrics::histogram!("ordo_saga_save_batch_size").record(batch.len() as f64);
        match result {
            Ok(saved) => {
                let saved: HashMap<(String, Option<i64>), bool> = saved
                    .into_iter()
                    .map(|(order_id, expected, deadline_passed)| {
                        ((order_id, expected), deadline_passed)
                    })
                    .collect();
                for request in batch.drain(..) {
                    let written = saved
                        .get(&(request.order_id, Some(request.expected)))
                        .map(|&deadline_passed| Written { deadline_passed });
                    let _ = request.saved.send(Ok(written));
                }
            }
            Err(err) => {
                for request in batch.drain(..) {
                    let _ = request.saved.send(Err(err.to_string()));
                }
            }
        }
    }
}

/// Saga saves written per statement, at most.
const SAVE_BATCH: usize = 256;

#[cfg(test)]
mod tests {
    use ordo_domain::{CustomerId, Sku, order::OrderLine};
    use ordo_testkit::TestDatabase;

    use super::*;

    fn saga(order_id: &str) -> Saga {
        let line = OrderLine {
            sku: Sku::parse("A1").unwrap(),
            qty: 1,
            unit_price_cents: 100,
        };
        Saga::start(
            OrderId::parse(order_id).unwrap(),
            CustomerId::parse("c1").unwrap(),
            &[line],
            100,
        )
    }

    /// A coordinator whose saga's deadline passed saves the compensation plan before it sends
    /// any of it: if the save is refused (another coordinator moved the saga meanwhile), it
    /// sends nothing, so that no compensation runs from a plan that no one saved.
    #[tokio::test]
    async fn a_plan_the_deadline_changed_is_saved_before_any_of_it_is_sent() {
        let server = ordo_testkit::NatsServer::start();
        let nats = server.client().await;
        let mut sent = nats.subscribe("ordo.>").await.unwrap();
        nats.flush().await.unwrap();
        let nowhere = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let coordinator = Coordinator::new(
            nowhere,
            nats.clone(),
            crate::SimulatedGateway::default(),
            CoordinatorConfig::default(),
        );
        // Its reserve of A1 went unanswered, and the deadline has passed.
        let saga = saga("o-1").record(0, Outcome::Unknown("no answer".into()), Utc::now());
        let claimed = Claimed {
            saga,
            version: 3,
            deadline_passed: true,
            traceparent: None,
            placed_at: Utc::now(),
        };
        let (sender, mut requests) = mpsc::channel(8);
        let driving = tokio::spawn(async move { coordinator.drive(claimed, &Saves(sender)).await });
        let first = requests.recv().await.expect("a save");
        assert_eq!(first.row["state"], "compensating", "{}", first.row);
        assert_eq!(first.expected, 3);
        first.saved.send(Ok(None)).unwrap();
        driving.await.unwrap();
        // One connection: whatever it published came back to its subscription before the answer
        // to a request it sends after (the server answers in order, on this connection).
        nats.request("$JS.API.INFO", "".into()).await.unwrap();
        let anything = futures::FutureExt::now_or_never(sent.next());
        assert!(
            anything.is_none(),
            "sent before the plan was saved: {:?}",
            anything.flatten().map(|m| m.subject)
        );
    }

    /// Two drivers of one saga in one coordinator (the first one's lease ran out and the saga
    /// was claimed again) can have their saves in one batch: only the one holding the saga's
    /// version is written and told so; the stale one must stop, not go on as if saved.
    #[tokio::test]
    async fn in_one_batch_only_the_save_at_the_sagas_version_is_told_it_was_written() {
        let database = TestDatabase::create().await;
        ordo_projections::schema::prepare(database.pool())
            .await
            .unwrap();
        let pool = database.pool().clone();
        let stale = saga("o-1");
        sqlx::query(
            "INSERT INTO sagas (order_id, state, steps, data, version, next_attempt_at)
             VALUES ('o-1', 'running', '[]', $1, 7, now())",
        )
        .bind(serde_json::to_value(&stale).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        let current = stale.clone().record(0, Outcome::Succeeded, Utc::now());

        let (sender, receiver) = mpsc::channel(8);
        let saver = tokio::spawn(save_batches(pool.clone(), receiver));
        let saves = Saves(sender);
        // Queued before the saver looks, so that both go in one statement.
        let (first, second) = tokio::join!(
            saves.save(&current, 6, Some(Duration::ZERO), None),
            saves.save(&current, 7, Some(Duration::ZERO), None),
        );
        assert_eq!(
            (first, second),
            (
                Ok(None),
                Ok(Some(Written {
                    deadline_passed: false
                }))
            )
        );
        let version: i64 = sqlx::query_scalar("SELECT version FROM sagas WHERE order_id = 'o-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(version, 8);
        drop(saves);
        saver.await.unwrap();
    }
}
