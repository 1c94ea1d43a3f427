//! Intake: order events in, sagas started or extended.

use ordo_eventstore::{
    ConsumerId,
    consume::{Batches, Settle},
};

use super::*;

/// Order events taken in per statement, at most.
pub(super) const INTAKE_BATCH: usize = 256;

impl<G: PaymentGateway> Coordinator<G> {
    pub(super) async fn intake_forever(&self, started: mpsc::Sender<Claimed>) {
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
    pub(super) async fn intake(
        &self,
        backoff: &mut Backoff,
        started: &mpsc::Sender<Claimed>,
    ) -> Result<(), CoordinatorError> {
        let js = jetstream::new(self.nats.clone());
        let mut batches = Batches::open(&js, ConsumerId::Saga, ConsumerId::ACK_WAIT, INTAKE_BATCH)
            .await
            .map_err(|err| CoordinatorError::JetStream(err.to_string()))?;
        loop {
            let batch = batches
                .next()
                .await
                .map_err(|err| CoordinatorError::JetStream(err.to_string()))?;
            if batch.is_empty() {
                continue;
            }
            let (taken_in, new_sagas) = match self.take_in(&batch.messages).await {
                Ok(taken_in) => taken_in,
                Err(err) => {
                    batch.retry_all(Duration::from_secs(1)).await;
                    return Err(err);
                }
            };
            backoff.reset();
            let mut settles = Vec::with_capacity(taken_in.len());
            for (message, taken_in) in batch.messages.iter().zip(taken_in) {
                settles.push(match taken_in {
                    TakenIn::Done => {
                        unreadable::handled(&self.pool, CONSUMER, message).await;
                        Settle::Ack
                    }
                    // The saga's OrderPlaced is not in yet (another coordinator holds it, or
                    // it is held back unreadable): asked again less and less often.
                    TakenIn::TooEarly => {
                        let deliveries = message.info().map_or(1, |info| info.delivered);
                        Settle::Nak(unreadable::redelivery_delay(
                            Duration::from_millis(200),
                            deliveries,
                        ))
                    }
                    TakenIn::Unreadable(why) => Settle::Nak(
                        unreadable::hold_back(&self.pool, CONSUMER, message, &why).await,
                    ),
                });
            }
            // Redelivered after ack_wait if a settle is lost; taking it in again changes nothing.
            batch.settle(settles).await;
            for saga in new_sagas {
                if started.send(saga).await.is_err() {
                    return Ok(()); // Stopping.
                }
            }
        }
    }

    /// Applies a batch of order events to their sagas: the new sagas in one statement, then
    /// the events that extend one, in stream order (an order's OrderPlaced always comes first).
    /// Returns what to do with each message, and the sagas it started, leased to this
    /// coordinator (not those an earlier delivery of the same events started).
    pub(super) async fn take_in(
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

pub(super) enum TakenIn {
    Done,
    TooEarly,
    Unreadable(Unreadable),
}
