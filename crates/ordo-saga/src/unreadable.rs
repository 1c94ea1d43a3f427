//! Order events a worker cannot read, and what it does with them.
//!
//! During a rolling upgrade a newer build may write an event in a schema this build does not
//! know. Skipping it would lose it for good: the saga would never start (or never cancel) that
//! order, the notifier would never tell its customer. So an event that cannot be read is held
//! back: the notifier does not acknowledge it (its durable consumer delivers it again), the saga's
//! intake records it and tries it again by itself; either way less and less often (up to once a
//! minute), until a build that reads it takes it. Meanwhile it shows:
//! - in the `unreadable_events` table, which `/readyz` counts per consumer;
//! - in `ordo_events_unreadable_total`;
//! - in a warning that names the order.
//!
//! The worker's other orders go on: a held-back event is one pending message among many.

use std::time::Duration;

use async_nats::jetstream;
use ordo_domain::{OrderId, order::OrderEvent};
use ordo_eventstore::EventEnvelope;
use sqlx::PgPool;

/// Why an order event cannot be read, with what is known of it.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub reason: String,
    pub event_type: Option<String>,
    pub schema: Option<u32>,
    /// The order it belongs to, if its envelope could be read.
    pub order_id: Option<String>,
}

/// An order event as a worker takes it in.
#[derive(Debug, Clone)]
pub struct ReadEvent {
    pub envelope: EventEnvelope,
    pub order_id: OrderId,
    pub event: OrderEvent,
}

/// Reads an order event from a message's payload, or says why it cannot.
pub fn read_order_event(payload: &[u8]) -> Result<ReadEvent, Unreadable> {
    let envelope = EventEnvelope::from_bytes(payload).map_err(|err| Unreadable {
        reason: err.to_string(),
        event_type: None,
        schema: None,
        order_id: None,
    })?;
    let unreadable = |reason: String| Unreadable {
        reason,
        event_type: Some(envelope.event_type.clone()),
        schema: Some(envelope.schema),
        order_id: Some(envelope.aggregate_id.clone()),
    };
    let event = envelope
        .decode::<OrderEvent>()
        .map_err(|err| unreadable(err.to_string()))?;
    let order_id =
        OrderId::parse(envelope.aggregate_id.clone()).map_err(|err| unreadable(err.to_string()))?;
    Ok(ReadEvent {
        envelope,
        order_id,
        event,
    })
}

/// How long a message that was delivered `deliveries` times waits before its next delivery,
/// starting at `first`: doubling, up to a minute, so that an event that waits for an upgrade
/// (or for an event before it) costs a delivery a minute, not five a second.
pub fn redelivery_delay(first: Duration, deliveries: i64) -> Duration {
    let doublings = deliveries.saturating_sub(1).clamp(0, 16) as u32;
    first
        .saturating_mul(1 << doublings)
        .min(MAX_REDELIVERY_DELAY)
}

const MAX_REDELIVERY_DELAY: Duration = Duration::from_secs(60);

/// Where a held-back event is, and how often it was tried.
#[derive(Debug, Clone, Copy)]
pub struct HeldAt<'a> {
    pub stream: &'a str,
    pub seq: u64,
    pub subject: &'a str,
    pub deliveries: i64,
}

/// Holds back an event `consumer` cannot read: recorded, counted, logged, and not acknowledged:
/// returns how long until it is to be delivered again (a nak with that delay).
pub async fn hold_back(
    pool: &PgPool,
    consumer: &str,
    message: &jetstream::Message,
    unreadable: &Unreadable,
) -> Duration {
    let (stream, seq, deliveries) = match message.info() {
        Ok(info) => (info.stream.to_owned(), info.stream_sequence, info.delivered),
        Err(_) => (String::new(), 0, 1),
    };
    let at = HeldAt {
        stream: &stream,
        seq,
        subject: message.subject.as_str(),
        deliveries,
    };
    if let Err(err) = record(pool, consumer, at, unreadable, None).await {
        tracing::warn!(consumer, seq, %err, "an unreadable event could not be recorded");
    }
    redelivery_delay(Duration::from_secs(1), deliveries)
}

/// Records an event `consumer` holds back (logged and counted): shown until it is handled.
/// `next_attempt_in`: when its holder tries it again by itself (the saga's intake), if it does.
pub async fn record(
    pool: &PgPool,
    consumer: &str,
    at: HeldAt<'_>,
    unreadable: &Unreadable,
    next_attempt_in: Option<Duration>,
) -> Result<(), sqlx::Error> {
    let HeldAt {
        stream,
        seq,
        subject,
        deliveries,
    } = at;
    tracing::warn!(
        consumer,
        subject,
        seq,
        deliveries,
        order_id = unreadable.order_id.as_deref().unwrap_or("unknown"),
        event_type = unreadable.event_type.as_deref().unwrap_or("unknown"),
        schema = unreadable.schema,
        reason = %unreadable.reason,
        "an order event this build cannot take in is held back until a build that reads it takes it"
    );
    metrics::counter!("ordo_events_unreadable_total", "consumer" => consumer.to_owned())
        .increment(1);
    sqlx::query(
        "INSERT INTO unreadable_events (consumer, stream, seq, subject, event_type, schema, reason, deliveries, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))
         ON CONFLICT (consumer, stream, seq) DO UPDATE
         SET reason = excluded.reason, deliveries = excluded.deliveries, last_seen_at = now(),
             next_attempt_at = excluded.next_attempt_at",
    )
    .bind(consumer)
    .bind(stream)
    .bind(seq as i64)
    .bind(subject)
    .bind(&unreadable.event_type)
    .bind(unreadable.schema.map(i64::from))
    .bind(&unreadable.reason)
    .bind(deliveries)
    .bind(next_attempt_in.map(|delay| delay.as_secs_f64()))
    .execute(pool)
    .await?;
    Ok(())
}

/// An event that was delivered before (and may have been held back) is handled now: it is no
/// longer shown as unreadable.
pub async fn handled(pool: &PgPool, consumer: &str, message: &jetstream::Message) {
    let Ok(info) = message.info() else { return };
    if info.delivered <= 1 {
        return;
    }
    let cleared = sqlx::query(
        "DELETE FROM unreadable_events WHERE consumer = $1 AND stream = $2 AND seq = $3",
    )
    .bind(consumer)
    .bind(info.stream)
    .bind(info.stream_sequence as i64)
    .execute(pool)
    .await;
    if let Err(err) = cleared {
        tracing::debug!(consumer, %err, "an unreadable event's record was not cleared");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redeliveries_come_less_and_less_often_up_to_once_a_minute() {
        let first = Duration::from_millis(200);
        let delays: Vec<Duration> = [1, 2, 3, 10, 1_000_000]
            .into_iter()
            .map(|deliveries| redelivery_delay(first, deliveries))
            .collect();
        assert_eq!(
            delays,
            [
                Duration::from_millis(200),
                Duration::from_millis(400),
                Duration::from_millis(800),
                Duration::from_secs(60),
                Duration::from_secs(60),
            ]
        );
    }

    #[test]
    fn an_event_of_a_newer_schema_is_unreadable_and_names_its_order() {
        let placed = serde_json::json!({
            "id": "0190e2b4-0000-7000-8000-000000000000", "type": "OrderCancelled", "schema": 99,
            "aggregate_id": "o-7", "version": 2, "at": "2026-11-30T10:00:00Z",
            "command_id": "c", "correlation_id": "c", "causation_id": null,
            "data": {"reason": null, "refund_to": "wallet"}
        });
        let unreadable = read_order_event(placed.to_string().as_bytes()).unwrap_err();
        assert_eq!(unreadable.order_id.as_deref(), Some("o-7"));
        assert_eq!(unreadable.schema, Some(99));
        assert!(unreadable.reason.contains("newer"), "{}", unreadable.reason);
        let junk = read_order_event(b"not json").unwrap_err();
        assert_eq!(junk.order_id, None);
    }
}
