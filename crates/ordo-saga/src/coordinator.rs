//! [`Coordinator`]: starts, advances and persists order sagas.
//!
//! - Intake: a durable consumer (`ordo-saga`, shared by every coordinator) on `ORDO_ORDERS`.
//!   `OrderPlaced` starts a saga, `OrderCancelled` and `OrderShipped` extend it. Each is applied
//!   to the saga's row in one transaction, then acked; applying one twice changes nothing.
//! - Driving: workers pick a due saga with `FOR UPDATE SKIP LOCKED` (so a saga is driven by one
//!   coordinator at a time), run its next step as a command with the step's deterministic id (or
//!   a call to the payment gateway), record the outcome and commit. A step whose outcome is
//!   unknown (no answer, no responders, a transient error) is scheduled again with capped
//!   exponential back-off and jitter, for as long as it takes: an outage is waited out, not
//!   counted. The retry time and the saga's deadline are stored with it, so both survive
//!   restarts. A deadline found after the saga moved on, or after the confirm may have been
//!   sent, does nothing.
//! - The confirm is the pivot: an answer other than `ok` is resolved by reading the order's
//!   last event from the stream leader (not a replica that may lag): confirmed or shipped means
//!   the confirm happened.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use ordo_commands::{
    service::HEADER_CORRELATION_ID,
    wire::{CommandRequest, ErrorCode, Reply},
};
use ordo_domain::{
    OrderId,
    order::OrderEvent,
    saga::{Outcome, Saga, SagaState, Step},
};
use ordo_eventstore::{EventEnvelope, backoff::Backoff};
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::payment::{PaymentError, PaymentGateway};

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How long an order may stay pending before its saga gives up with reason `timeout`.
    pub saga_timeout: Duration,
    /// How long one command may take before its outcome counts as unknown.
    pub step_timeout: Duration,
    /// The first retry pause of a step whose outcome was unknown; it doubles, with jitter.
    pub retry_base: Duration,
    /// The longest retry pause: how soon after an outage ends every saga is moving again.
    pub retry_cap: Duration,
    /// Sagas driven at once by this coordinator.
    pub workers: usize,
    /// How often an idle worker looks for due sagas.
    pub poll: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            saga_timeout: Duration::from_secs(30),
            step_timeout: Duration::from_secs(5),
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(10),
            workers: 8,
            poll: Duration::from_millis(50),
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

const CONSUMER: &str = "ordo-saga";

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

    /// Runs the intake and the workers until `shutdown` completes. Failures are logged and
    /// retried; nothing is lost, since events are acked only once applied.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut tasks = tokio::task::JoinSet::new();
        let intake = self.clone();
        tasks.spawn(async move { intake.intake_forever().await });
        for worker in 0..self.config.workers {
            let driver = self.clone();
            tasks.spawn(async move { driver.drive_forever(worker).await });
        }
        shutdown.await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn intake_forever(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            if let Err(err) = self.intake(&mut backoff).await {
                let delay = backoff.next_delay();
                tracing::warn!(%err, retry_in = ?delay, "saga intake stopped; starting again");
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// Takes order events in until the consumer fails; every event taken in resets `backoff`.
    async fn intake(&self, backoff: &mut Backoff) -> Result<(), CoordinatorError> {
        let js = jetstream::new(self.nats.clone());
        let js_err = |err: &dyn std::fmt::Display| CoordinatorError::JetStream(err.to_string());
        let stream = js
            .get_stream("ORDO_ORDERS")
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
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| js_err(&err))?;
        let mut messages = consumer.messages().await.map_err(|err| js_err(&err))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|err| js_err(&err))?;
            match self.take_in(&message.payload).await {
                Ok(TakenIn::Done) => {
                    backoff.reset();
                    if let Err(err) = message.ack().await {
                        // Redelivered after ack_wait; taking it in again changes nothing.
                        tracing::debug!(%err, "ack not sent");
                    }
                }
                Ok(TakenIn::TooEarly) => {
                    // The saga's OrderPlaced is not in yet (another coordinator holds it).
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_millis(200))))
                        .await;
                }
                Err(err) => {
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Applies one order event to its saga.
    async fn take_in(&self, payload: &[u8]) -> Result<TakenIn, CoordinatorError> {
        let Ok(envelope) = EventEnvelope::from_bytes(payload) else {
            tracing::warn!("not an order event; the saga coordinator ignores it");
            return Ok(TakenIn::Done);
        };
        let Ok(event) = envelope.decode::<OrderEvent>() else {
            tracing::warn!(event_type = %envelope.event_type, "unreadable order event; ignored by the saga");
            return Ok(TakenIn::Done);
        };
        let Ok(order_id) = OrderId::parse(envelope.aggregate_id.clone()) else {
            return Ok(TakenIn::Done);
        };
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                lines,
                total_cents,
                ..
            } => {
                let saga = Saga::start(order_id, customer_id, &lines, total_cents);
                let deadline = envelope.at
                    + chrono::Duration::from_std(self.config.saga_timeout).unwrap_or_default();
                sqlx::query(
                    "INSERT INTO sagas (order_id, state, steps, data, started_at, updated_at, deadline_at, next_attempt_at)
                     VALUES ($1, $2, $3, $4, $5, now(), $6, now())
                     ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(saga.order_id.as_str())
                .bind(saga.state.as_str())
                .bind(steps_json(&saga))
                .bind(serde_json::to_value(&saga).expect("sagas serialize"))
                .bind(envelope.at)
                .bind(deadline)
                .execute(&self.pool)
                .await?;
                Ok(TakenIn::Done)
            }
            OrderEvent::OrderCancelled { .. } => self.extend(&order_id, Saga::cancel).await,
            OrderEvent::OrderShipped {} => self.extend(&order_id, Saga::ship).await,
            // The saga's own doings.
            OrderEvent::OrderConfirmed {} | OrderEvent::OrderRejected { .. } => Ok(TakenIn::Done),
        }
    }

    async fn extend(
        &self,
        order_id: &OrderId,
        change: fn(Saga) -> Saga,
    ) -> Result<TakenIn, CoordinatorError> {
        let mut tx = self.pool.begin().await?;
        let Some(saga) = load_for_update(&mut tx, order_id.as_str()).await? else {
            return Ok(TakenIn::TooEarly);
        };
        let changed = change(saga.clone());
        if changed != saga {
            save(&mut tx, &changed, Some(Utc::now())).await?;
        }
        tx.commit().await?;
        Ok(TakenIn::Done)
    }

    async fn drive_forever(&self, worker: usize) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match self.drive_one().await {
                Ok(true) => backoff.reset(),
                Ok(false) => {
                    backoff.reset();
                    tokio::time::sleep(self.config.poll).await;
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(worker, %err, retry_in = ?delay, "saga worker failed; pausing");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Runs one step of one due saga. Returns false when no saga was due.
    pub async fn drive_one(&self) -> Result<bool, CoordinatorError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            // A running saga is never due later than its deadline (see `save`), so one range
            // scan of the `sagas_due` index finds both retries and deadlines.
            "SELECT order_id, data, deadline_at FROM sagas
             WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= now()
             ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let mut saga: Saga = match serde_json::from_value(row.get("data")) {
            Ok(saga) => saga,
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
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(true);
            }
        };
        let deadline: Option<DateTime<Utc>> = row.get("deadline_at");
        if saga.state == SagaState::Running
            && deadline.is_some_and(|deadline| deadline <= Utc::now())
        {
            tracing::info!(order_id = %saga.order_id, "saga deadline passed; compensating");
            saga = saga.time_out();
        }
        let next_attempt = match saga.next_step() {
            None => None,
            Some((index, planned)) => {
                let step = planned.step.clone();
                let outcome = self.run_step(&saga, index, &step).await;
                tracing::debug!(order_id = %saga.order_id, step = step.kind(), ?outcome, "saga step");
                let unknown = matches!(outcome, Outcome::Unknown(_));
                saga = saga.record(index, outcome, Utc::now());
                let attempts = saga.steps[index].attempts;
                match saga.next_step() {
                    None => None,
                    Some(_) if unknown => Some(Utc::now() + self.backoff(attempts)),
                    Some(_) => Some(Utc::now()),
                }
            }
        };
        save(&mut tx, &saga, next_attempt).await?;
        tx.commit().await?;
        if !saga.state.is_active() {
            metrics::counter!("ordo_sagas_finished_total", "state" => saga.state.as_str())
                .increment(1);
        }
        Ok(true)
    }

    fn backoff(&self, attempts: u32) -> chrono::Duration {
        let exponential = self.config.retry_base.saturating_mul(1 << attempts.min(16));
        let capped = exponential.min(self.config.retry_cap);
        // Full jitter: anywhere between half and all of it, so retries do not move in step.
        let jittered = capped.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        chrono::Duration::from_std(jittered).unwrap_or_default()
    }

    async fn run_step(&self, saga: &Saga, index: usize, step: &Step) -> Outcome {
        let order_id = saga.order_id.clone();
        let request = match step {
            Step::Reserve { sku, qty } => CommandRequest::ReserveStock {
                sku: sku.clone(),
                order_id,
                qty: *qty,
            },
            Step::Release { sku } => CommandRequest::ReleaseStock {
                sku: sku.clone(),
                order_id,
            },
            Step::Deduct { sku } => CommandRequest::DeductStock {
                sku: sku.clone(),
                order_id,
            },
            Step::Reject { reason } => CommandRequest::RejectOrder {
                order_id,
                reason: reason.clone(),
            },
            Step::Confirm => {
                let request = CommandRequest::ConfirmOrder { order_id };
                return match self.send_command(saga, index, &request).await {
                    Outcome::Succeeded => Outcome::Succeeded,
                    not_ok => self.resolve_confirm(&saga.order_id, not_ok).await,
                };
            }
            Step::Authorize { amount_cents } => {
                let call = self.gateway.authorize(&saga.order_id, *amount_cents);
                return payment_outcome(tokio::time::timeout(self.config.step_timeout, call).await);
            }
            Step::Refund { amount_cents } => {
                let call = self.gateway.refund(&saga.order_id, *amount_cents);
                return payment_outcome(tokio::time::timeout(self.config.step_timeout, call).await);
            }
        };
        self.send_command(saga, index, &request).await
    }

    /// Sends step `index` of `saga` as a command and says what its reply means.
    async fn send_command(&self, saga: &Saga, index: usize, command: &CommandRequest) -> Outcome {
        let subject = command.subject();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", saga.command_id(index).as_str());
        headers.insert(
            HEADER_CORRELATION_ID,
            format!("order:{}", saga.order_id).as_str(),
        );
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(command.body_bytes().into())
            .timeout(Some(self.config.step_timeout));
        let reply = match self.nats.send_request(subject.clone(), request).await {
            Ok(reply) => reply,
            Err(err) => return Outcome::Unknown(format!("{subject}: {err}")),
        };
        match Reply::parse(&reply.payload) {
            Ok(Reply::Accepted { .. }) => Outcome::Succeeded,
            Ok(Reply::Refused { code, message }) => match code {
                // Definite: retrying the same command gets the same answer.
                ErrorCode::InsufficientStock
                | ErrorCode::NotFound
                | ErrorCode::InvalidState
                | ErrorCode::InvalidCommand => Outcome::Failed(message),
                // Of the moment: it may work when sent again.
                ErrorCode::Conflict | ErrorCode::Unavailable => {
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
                .get_stream("ORDO_ORDERS")
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
        save(&mut tx, &saga, Some(Utc::now())).await?;
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

/// Writes the saga; `next_attempt_at` is when a worker should run it next (none once finished).
async fn save(
    tx: &mut Transaction<'_, Postgres>,
    saga: &Saga,
    next_attempt_at: Option<DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    let next_attempt_at = if saga.state.is_active() {
        next_attempt_at
    } else {
        None
    };
    sqlx::query(
        "UPDATE sagas SET state = $2, steps = $3, reason = $4, data = $5, updated_at = now(),
                next_attempt_at = CASE WHEN $7 THEN least($6, deadline_at) ELSE $6 END
         WHERE order_id = $1",
    )
    .bind(saga.order_id.as_str())
    .bind(saga.state.as_str())
    .bind(steps_json(saga))
    .bind(saga.shown_reason())
    .bind(serde_json::to_value(saga).expect("sagas serialize"))
    .bind(next_attempt_at)
    // The deadline bounds only the steps before the confirm.
    .bind(saga.state == SagaState::Running && !saga.reached_pivot())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
