//! [`Notifier`]: tells customers how their orders ended.
//!
//! For every `OrderConfirmed`, `OrderRejected`, `OrderCancelled` and `OrderShipped`, exactly one
//! notification per (order, kind) is recorded in PostgreSQL (its primary key), whatever is
//! redelivered. It is published on `ordo.notifications.<customer_id>` and, if configured, POSTed
//! to a webhook. Delivery is tried with growing pauses, under a lock on the record so that two
//! redeliveries never send it twice; after the last attempt the record is dead-lettered and shows
//! in `/notifications`, and an operator can retry it (`ordo notifications retry`). Notification is the saga's pivot: it is never undone, only retried.

use std::time::Duration;

use async_nats::jetstream;
use futures::{StreamExt, TryStreamExt};
use ordo_domain::order::{OrderAggregate, OrderEvent};
use ordo_eventstore::{
    ConsumerId, EventStore, StreamId,
    backoff::Backoff,
    consume::{Batches, ConsumeError, Settle},
    trace,
};
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Transaction};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::unreadable::{self, ReadEvent};

#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Also POST each notification here.
    pub webhook_url: Option<String>,
    pub webhook_timeout: Duration,
    /// Deliveries tried before the notification is dead-lettered.
    pub attempts: u32,
    /// The first pause between attempts; it doubles.
    pub retry_base: Duration,
    /// A share of deliveries made to fail on purpose, to exercise retries and dead letters.
    pub failure_rate: f64,
    /// Notifications handled at once.
    pub concurrency: usize,
    /// How long a delivered order event may go unacknowledged before the consumer gives it to
    /// another notifier: longer than a delivery takes (5 attempts, 2 s timeouts, growing pauses,
    /// about 12 s), so that a slow delivery is not done twice, and the time it takes another
    /// notifier to take over one that died in the middle of a delivery. Set when the shared
    /// consumer is created.
    pub ack_wait: Duration,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_timeout: Duration::from_secs(2),
            attempts: 5,
            retry_base: Duration::from_millis(100),
            failure_rate: 0.0,
            concurrency: 8,
            ack_wait: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("JetStream: {0}")]
    JetStream(String),
}

#[derive(Clone)]
pub struct Notifier {
    pool: PgPool,
    nats: async_nats::Client,
    store: EventStore,
    http: reqwest::Client,
    config: NotifierConfig,
    /// Each order's customer, kept from its `OrderPlaced` as it passes, so that a later event's
    /// customer is known without reading the order's events back (three reads, one of them a
    /// scan of the stream). An order's customer never changes, so what is kept is never stale;
    /// an order placed before this notifier started, or one evicted, is read from the stream.
    customers: moka::future::Cache<String, String>,
}

/// Orders whose customer a notifier keeps: about 10 MiB.
const CUSTOMERS_KEPT: u64 = 100_000;

const CONSUMER: &str = ConsumerId::Notifier.name();

impl Notifier {
    /// The streams the notifier reads: order events, and each order's customer from them.
    pub const STREAMS: [StreamId; 1] = [StreamId::Orders];

    /// The notifier as every process runs it (`ordo up`, `ordo run notifier`, `ordo
    /// notifications retry` and the tests): an event store over [`Self::STREAMS`] on `nats`.
    pub async fn connect(
        pool: PgPool,
        nats: async_nats::Client,
        config: NotifierConfig,
    ) -> Result<Self, NotifierError> {
        let store = EventStore::open(nats.clone(), &Self::STREAMS)
            .await
            .map_err(|err| NotifierError::JetStream(err.to_string()))?;
        Ok(Self::new(pool, nats, store, config))
    }

    fn new(
        pool: PgPool,
        nats: async_nats::Client,
        store: EventStore,
        config: NotifierConfig,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.webhook_timeout)
            .build()
            .expect("an HTTP client");
        Self {
            pool,
            nats,
            store,
            http,
            config,
            customers: moka::future::Cache::new(CUSTOMERS_KEPT),
        }
    }

    /// Handles order events until `shutdown` completes; failures are logged and retried.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let began = std::time::Instant::now();
            tokio::select! {
                () = &mut shutdown => return,
                err = self.consume() => {
                    let delay = backoff.after_run(began.elapsed());
                    tracing::warn!(%err, retry_in = ?delay, "notifier stopped; starting again");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Notifies as order events arrive, `concurrency` at a time, each event settled as soon as
    /// it is handled; ends when the consumer fails, with why.
    async fn consume(&self) -> NotifierError {
        let js = jetstream::new(self.nats.clone());
        let concurrency = self.config.concurrency.max(1);
        // Batches the size of the slots: what is pulled waits for a slot at most about one
        // delivery, rather than in a long queue past its ack wait behind slow deliveries.
        let batches =
            match Batches::open(&js, ConsumerId::Notifier, self.config.ack_wait, concurrency).await
            {
                Ok(batches) => batches,
                Err(err) => return NotifierError::JetStream(err.to_string()),
            };
        let deliveries = futures::stream::try_unfold(batches, |mut batches| async move {
            let batch = batches.next().await?;
            Ok::<_, ConsumeError>(Some((batch.one_by_one(), batches)))
        })
        .map_ok(|deliveries| {
            futures::stream::iter(deliveries.into_iter().map(Ok::<_, ConsumeError>))
        })
        .try_flatten();
        // When the consumer fails, no delivery more is taken, but those under way end: one cut
        // off between its send and its record would send again when the event comes back.
        let failed = std::sync::Mutex::new(None);
        deliveries
            .take_while(|delivery| {
                if let Err(err) = delivery {
                    *failed.lock().expect("not poisoned") = Some(err.to_string());
                }
                futures::future::ready(delivery.is_ok())
            })
            .filter_map(|delivery| futures::future::ready(delivery.ok()))
            .for_each_concurrent(concurrency, |delivery| async move {
                let settle = self.notify(&delivery.message).await;
                delivery.settle(settle).await;
            })
            .await;
        let failed = failed.lock().expect("not poisoned").take();
        NotifierError::JetStream(failed.unwrap_or_else(|| "the consumer's batches ended".into()))
    }

    /// Sends the notification an order event calls for, if any, and says what becomes of it.
    async fn notify(&self, message: &jetstream::Message) -> Settle {
        let span = tracing::info_span!(
            "notify",
            otel.name = "notify",
            order_id = tracing::field::Empty,
            kind = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        trace::follow(&span, trace::extract(message.headers.as_ref()));
        let read = match unreadable::read_order_event(&message.payload) {
            Ok(read) => read,
            // Not acknowledged: acking would mean a customer never told.
            Err(why) => {
                return Settle::Nak(
                    unreadable::hold_back(&self.pool, CONSUMER, message, &why).await,
                );
            }
        };
        match self.handle(read).instrument(span).await {
            Ok(()) => {
                unreadable::handled(&self.pool, CONSUMER, message).await;
                Settle::Ack
            }
            Err(err) => {
                tracing::warn!(%err, "notification not handled; it will be redelivered");
                Settle::Nak(Duration::from_secs(1))
            }
        }
    }

    async fn handle(&self, read: ReadEvent) -> Result<(), NotifierError> {
        let ReadEvent {
            envelope, event, ..
        } = read;
        let (kind, reason) = match event {
            OrderEvent::OrderConfirmed {} => ("confirmed", None),
            OrderEvent::OrderRejected { reason } => ("rejected", Some(reason)),
            OrderEvent::OrderCancelled { reason } => ("cancelled", reason),
            OrderEvent::OrderShipped {} => ("shipped", None),
            OrderEvent::OrderPlaced { customer_id, .. } => {
                let customer_id = customer_id.as_str().to_owned();
                self.customers
                    .insert(envelope.aggregate_id, customer_id)
                    .await;
                return Ok(());
            }
        };
        let order_id = envelope.aggregate_id.clone();
        tracing::Span::current()
            .record("order_id", order_id.as_str())
            .record("kind", kind);
        // The customer comes from the order's own events, not from a view that may lag.
        let customer_id = match self.customers.get(&order_id).await {
            Some(customer_id) => customer_id,
            None => {
                let loaded = self
                    .store
                    .load::<OrderAggregate>(&order_id)
                    .await
                    .map_err(|err| NotifierError::JetStream(err.to_string()))?;
                let Some(order) = loaded.state else {
                    tracing::warn!(order_id, kind, "no such order; nothing to notify");
                    return Ok(());
                };
                order.customer_id.as_str().to_owned()
            }
        };
        let notification = json!({
            "order_id": order_id,
            "kind": kind,
            "customer_id": customer_id,
            "reason": reason,
            "at": envelope.at,
        });
        // Recorded and locked in one statement: a new notification is inserted; a redelivered
        // event finds its row, after any delivery of it under way (and gives a row of a build
        // before the payload column its payload).
        let mut tx = self.pool.begin().await?;
        let (status, customer_id, payload): (String, String, Value) = sqlx::query_as(
            "INSERT INTO notifications (order_id, kind, customer_id, status, payload)
             VALUES ($1, $2, $3, 'pending', $4)
             ON CONFLICT (order_id, kind)
             DO UPDATE SET payload = coalesce(notifications.payload, EXCLUDED.payload)
             RETURNING status, customer_id, payload",
        )
        .bind(&order_id)
        .bind(kind)
        .bind(&customer_id)
        .bind(&notification)
        .fetch_one(&mut *tx)
        .await?;
        self.deliver_locked(tx, &order_id, kind, &status, &customer_id, &payload)
            .await
    }

    /// An operator's retry of a dead-lettered notification: it is pending again and delivered
    /// now. Returns its status after the attempt, or `None` if there is no such notification.
    pub async fn retry(&self, order_id: &str, kind: &str) -> Result<Option<String>, NotifierError> {
        let reset = sqlx::query(
            "UPDATE notifications SET status = 'pending', attempts = 0 WHERE order_id = $1 AND kind = $2
             AND status = 'dead_lettered'",
        )
        .bind(order_id)
        .bind(kind)
        .execute(&self.pool)
        .await?;
        if reset.rows_affected() == 1 {
            self.deliver(order_id, kind).await?;
        }
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM notifications WHERE order_id = $1 AND kind = $2",
        )
        .bind(order_id)
        .bind(kind)
        .fetch_optional(&self.pool)
        .await?;
        Ok(status)
    }

    /// Delivers a pending notification, under a lock on its record.
    async fn deliver(&self, order_id: &str, kind: &str) -> Result<(), NotifierError> {
        let mut tx = self.pool.begin().await?;
        let (status, customer_id, payload): (String, String, Value) = sqlx::query_as(
            // Rows of builds before the payload column have none: the fields every payload has.
            "SELECT status, customer_id,
                    coalesce(payload, jsonb_build_object('order_id', order_id, 'kind', kind,
                                                         'customer_id', customer_id))
             FROM notifications WHERE order_id = $1 AND kind = $2 FOR UPDATE",
        )
        .bind(order_id)
        .bind(kind)
        .fetch_one(&mut *tx)
        .await?;
        self.deliver_locked(tx, order_id, kind, &status, &customer_id, &payload)
            .await
    }

    /// Delivers the notification whose record `tx` holds locked, if it is pending, and records
    /// how it went.
    async fn deliver_locked(
        &self,
        mut tx: Transaction<'_, Postgres>,
        order_id: &str,
        kind: &str,
        status: &str,
        customer_id: &str,
        payload: &Value,
    ) -> Result<(), NotifierError> {
        if status != "pending" {
            return Ok(());
        }
        let mut backoff = Backoff::new(self.config.retry_base, Duration::from_secs(5));
        let mut last_error = String::new();
        for attempt in 1..=self.config.attempts {
            match self.send(customer_id, order_id, kind, payload).await {
                Ok(()) => {
                    sqlx::query(
                        "UPDATE notifications SET status = 'sent', attempts = $3, last_error = NULL, sent_at = now()
                         WHERE order_id = $1 AND kind = $2",
                    )
                    .bind(order_id)
                    .bind(kind)
                    .bind(attempt as i32)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    metrics::counter!("ordo_notifications_total", "status" => "sent").increment(1);
                    return Ok(());
                }
                Err(error) => {
                    tracing::info!(order_id, kind, attempt, %error, "notification not delivered");
                    last_error = error;
                    if attempt < self.config.attempts {
                        backoff.wait().await;
                    }
                }
            }
        }
        tracing::warn!(order_id, kind, %last_error, "notification dead-lettered");
        sqlx::query(
            "UPDATE notifications SET status = 'dead_lettered', attempts = $3, last_error = $4
             WHERE order_id = $1 AND kind = $2",
        )
        .bind(order_id)
        .bind(kind)
        .bind(self.config.attempts as i32)
        .bind(&last_error)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        metrics::counter!("ordo_notifications_total", "status" => "dead_lettered").increment(1);
        Ok(())
    }

    async fn send(
        &self,
        customer_id: &str,
        order_id: &str,
        kind: &str,
        payload: &Value,
    ) -> Result<(), String> {
        if self.config.failure_rate > 0.0 && rand::random::<f64>() < self.config.failure_rate {
            return Err("simulated delivery failure (notifier failure rate)".into());
        }
        let body = serde_json::to_vec(payload).expect("payloads serialize");
        let mut headers = async_nats::HeaderMap::new();
        trace::inject(&tracing::Span::current().context(), &mut headers);
        headers.insert(
            "Nats-Msg-Id",
            format!("notification:{order_id}:{kind}").as_str(),
        );
        self.nats
            .publish_with_headers(
                format!("ordo.notifications.{customer_id}"),
                headers,
                body.clone().into(),
            )
            .await
            .map_err(|err| format!("NATS: {err}"))?;
        self.nats
            .flush()
            .await
            .map_err(|err| format!("NATS: {err}"))?;
        if let Some(url) = &self.config.webhook_url {
            let response = self
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                // Without the URL: it may carry a token, and this text reaches `last_error`, the
                // log and the trace.
                .map_err(|err| format!("webhook: {}", with_causes(&err.without_url())))?;
            if !response.status().is_success() {
                return Err(format!("webhook answered {}", response.status()));
            }
        }
        Ok(())
    }
}

/// An error and what caused it, on one line.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
