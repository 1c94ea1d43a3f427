//! Reading back what the system holds once it is quiet: every event of both streams, the views,
//! the sagas, the notifications and the payment ledger.

use std::collections::BTreeMap;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures::StreamExt;
use ordo_eventstore::EventEnvelope;
use sqlx::{PgPool, Row};

use super::check::{Observed, OrderRow, StockRow, StoredEvent};

/// Every event of `stream`, in order.
pub async fn stream_events(
    js: &jetstream::Context,
    name: &str,
) -> anyhow::Result<Vec<StoredEvent>> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name}"))?;
    let last_seq = stream.info().await?.state.last_sequence;
    let mut events = Vec::new();
    if last_seq == 0 {
        return Ok(events);
    }
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let seq = message
            .info()
            .map_err(|err| anyhow::anyhow!("{err}"))?
            .stream_sequence;
        let envelope = EventEnvelope::from_bytes(&message.payload)
            .with_context(|| format!("{name} seq {seq} is not an event"))?;
        events.push(StoredEvent {
            stream: name.to_owned(),
            seq,
            event_type: envelope.event_type,
            aggregate_id: envelope.aggregate_id,
            version: envelope.version,
            command_id: envelope.command_id,
            data: envelope.data,
        });
        if seq >= last_seq {
            break;
        }
    }
    Ok(events)
}

/// The checkpoint of a projection's live view (0 before its first batch): that of the
/// partition furthest behind.
async fn checkpoint(pool: &PgPool, projection: &str, stream: &str) -> anyhow::Result<i64> {
    let schema = format!("view_{projection}");
    Ok(ordo_projections::schema::checkpoint_of(pool, &schema, stream).await? as i64)
}

/// The head (last sequence) of `stream`.
pub async fn head(js: &jetstream::Context, name: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(name).await?.info().await?.state.last_sequence)
}

/// Everything the checker needs.
pub async fn observe(js: &jetstream::Context, pool: &PgPool) -> anyhow::Result<Observed> {
    let order_events = stream_events(js, ordo_eventstore::StreamId::Orders.name()).await?;
    let stock_events = stream_events(js, ordo_eventstore::StreamId::Stock.name()).await?;
    let mut lines: BTreeMap<String, Vec<(String, i64, i64)>> = BTreeMap::new();
    for row in sqlx::query("SELECT order_id, sku, qty, unit_price_cents FROM view_orders.order_lines ORDER BY order_id, line_no")
        .fetch_all(pool)
        .await?
    {
        lines
            .entry(row.get("order_id"))
            .or_default()
            .push((row.get("sku"), row.get("qty"), row.get("unit_price_cents")));
    }
    let orders_view = sqlx::query(
        "SELECT order_id, customer_id, status, total_cents, version, last_seq FROM view_orders.orders",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| {
        let order_id: String = row.get("order_id");
        OrderRow {
            lines: lines.remove(&order_id).unwrap_or_default(),
            order_id,
            customer_id: row.get("customer_id"),
            status: row.get("status"),
            total_cents: row.get("total_cents"),
            version: row.get("version"),
            last_seq: row.get("last_seq"),
        }
    })
    .collect();
    let stock_view =
        sqlx::query("SELECT sku, on_hand, reserved, version, last_seq FROM view_stock.stock")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|row| StockRow {
                sku: row.get("sku"),
                on_hand: row.get("on_hand"),
                reserved: row.get("reserved"),
                version: row.get("version"),
                last_seq: row.get("last_seq"),
            })
            .collect();
    let mut checkpoints = Vec::new();
    for view in ordo_projections::View::ALL {
        let (projection, stream) = (view.name(), view.info().stream);
        let checkpoint = checkpoint(pool, projection, stream).await?;
        checkpoints.push((projection.to_owned(), checkpoint, head(js, stream).await?));
    }
    let parked_events: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events")
        .fetch_one(pool)
        .await?;
    let sagas = sqlx::query("SELECT order_id, state FROM sagas")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| (row.get("order_id"), row.get("state")))
        .collect();
    let notifications = sqlx::query("SELECT order_id, kind, status FROM notifications")
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|row| ((row.get("order_id"), row.get("kind")), row.get("status")))
        .collect();
    let payments = sqlx::query(
        "SELECT order_id, authorized_at IS NOT NULL AS authorised, refunded_at IS NOT NULL AS refunded FROM payments",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.get("order_id"), (row.get("authorised"), row.get("refunded"))))
    .collect();
    Ok(Observed {
        order_events,
        stock_events,
        orders_view,
        stock_view,
        checkpoints,
        parked_events,
        sagas,
        notifications,
        payments,
    })
}

/// What is still moving: empty once the system is quiet.
pub async fn still_moving(js: &jetstream::Context, pool: &PgPool) -> anyhow::Result<Vec<String>> {
    let mut moving = Vec::new();
    for view in ordo_projections::View::ALL {
        let (projection, stream) = (view.name(), view.info().stream);
        let checkpoint = checkpoint(pool, projection, stream).await?;
        let head = head(js, stream).await?;
        if checkpoint != head as i64 {
            moving.push(format!("projection {projection} at {checkpoint} of {head}"));
        }
    }
    // The saga's intake: its partition furthest behind.
    let intake: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM saga_intake")
        .fetch_one(pool)
        .await?;
    let orders_head = head(js, ordo_eventstore::StreamId::Orders.name()).await?;
    if intake.unwrap_or(0) != orders_head as i64 {
        moving.push(format!(
            "saga intake at {} of {orders_head}",
            intake.unwrap_or(0)
        ));
    }
    // The durable consumers (the notifier's).
    for consumer in ordo_eventstore::ConsumerId::ALL
        .into_iter()
        .filter(|consumer| !consumer.reads_by_partition())
    {
        let info = js
            .get_stream(consumer.stream().name())
            .await?
            .consumer_info(consumer.name())
            .await?;
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            moving.push(format!(
                "consumer {consumer}: {} pending, {} unacknowledged",
                info.num_pending, info.num_ack_pending
            ));
        }
    }
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sagas WHERE state IN ('running', 'compensating', 'cancelling', 'shipping', 'compensation_stuck')",
    )
    .fetch_one(pool)
    .await?;
    if active > 0 {
        moving.push(format!("{active} sagas active"));
    }
    let undelivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE status = 'pending'")
            .fetch_one(pool)
            .await?;
    if undelivered > 0 {
        moving.push(format!("{undelivered} notifications pending"));
    }
    Ok(moving)
}

/// Rejected orders by the kind of reason.
pub async fn rejections(pool: &PgPool) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows = sqlx::query(
        "SELECT CASE WHEN reason = 'timeout' THEN 'timeout'
                     WHEN reason LIKE 'insufficient stock%' THEN 'insufficient stock'
                     WHEN reason LIKE 'payment declined%' THEN 'payment declined'
                     ELSE reason END AS kind, count(*) AS n
         FROM sagas WHERE state = 'rejected' GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            (
                row.get::<Option<String>, _>("kind").unwrap_or_default(),
                row.get::<i64, _>("n") as u64,
            )
        })
        .collect())
}
