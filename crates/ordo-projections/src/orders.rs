//! The orders view: an order with its lines, by id, by customer and by status.

use ordo_domain::order::{OrderEvent, OrderStatus};
use ordo_eventstore::RecordedEvent;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;

use crate::{
    ApplyError, Projection,
    projection::{CopyRows, bigint, copy_all, timestamp, write_all},
};

pub struct OrdersView;

impl Projection for OrdersView {
    const NAME: &'static str = "orders";
    const CONSUMER: ordo_eventstore::ConsumerId = ordo_eventstore::ConsumerId::OrdersView;
    const DDL: &'static str = include_str!("../../../projections/orders.sql");

    async fn apply(
        connection: &mut PgConnection,
        recorded: &RecordedEvent,
    ) -> Result<(), ApplyError> {
        let envelope = &recorded.envelope;
        let event: OrderEvent = envelope
            .decode()
            .map_err(|err| ApplyError::Rejected(err.to_string()))?;
        let (order_id, version, seq) = (
            &envelope.aggregate_id,
            bigint(envelope.version, "version")?,
            bigint(recorded.seq, "seq")?,
        );
        let (status, reason) = match &event {
            OrderEvent::OrderPlaced {
                customer_id,
                lines,
                currency,
                total_cents,
            } => {
                sqlx::query(
                    "INSERT INTO orders (order_id, customer_id, status, currency, total_cents, version,
                                         placed_seq, placed_at, updated_at, last_seq)
                     VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $7, $6)",
                )
                .bind(order_id)
                .bind(customer_id.as_str())
                .bind(currency.as_str())
                .bind(bigint(*total_cents, "total_cents")?)
                .bind(version)
                .bind(seq)
                .bind(envelope.at)
                .execute(&mut *connection)
                .await?;
                for (line_no, line) in lines.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO order_lines (order_id, line_no, sku, qty, unit_price_cents)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(order_id)
                    .bind(line_no as i32)
                    .bind(line.sku.as_str())
                    .bind(i64::from(line.qty))
                    .bind(bigint(line.unit_price_cents, "unit_price_cents")?)
                    .execute(&mut *connection)
                    .await?;
                }
                return Ok(());
            }
            OrderEvent::OrderConfirmed {} => (OrderStatus::Confirmed, None),
            OrderEvent::OrderShipped {} => (OrderStatus::Shipped, None),
            OrderEvent::OrderRejected { reason } => (OrderStatus::Rejected, Some(reason.clone())),
            OrderEvent::OrderCancelled { reason } => (OrderStatus::Cancelled, reason.clone()),
        };
        let updated = sqlx::query(
            "UPDATE orders SET status = $2, reason = COALESCE($3, reason), version = $4,
                               updated_at = $5, last_seq = $6
             WHERE order_id = $1 AND version = $4 - 1",
        )
        .bind(order_id)
        .bind(status.as_str())
        .bind(reason)
        .bind(version)
        .bind(envelope.at)
        .bind(seq)
        .execute(&mut *connection)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(ApplyError::Rejected(format!(
                "{} of order {order_id} (version {version}) does not follow the order's version in the view",
                envelope.event_type
            )));
        }
        Ok(())
    }

    async fn apply_all(
        connection: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<bool, ApplyError> {
        let Some(folded) = fold(events) else {
            return Ok(false);
        };
        let (mut placed, mut lines, mut changed) =
            (CopyRows::default(), CopyRows::default(), Vec::new());
        for order in folded {
            let Some(placed_row) = order.placed else {
                changed.push(json!({
                    "order_id": order.order_id,
                    "status": order.status.as_str(),
                    "reason": order.reason,
                    "first_version": order.first_version,
                    "version": order.version,
                    "updated_at": timestamp(&order.updated_at),
                    "last_seq": order.last_seq,
                }));
                continue;
            };
            for (line_no, line) in placed_row.lines.iter().enumerate() {
                lines
                    .text(&order.order_id)
                    .int(line_no as i64)
                    .text(line.sku.as_str())
                    .int(i64::from(line.qty))
                    .int(bigint(line.unit_price_cents, "unit_price_cents")?)
                    .end_row();
            }
            placed
                .text(&order.order_id)
                .text(&placed_row.customer_id)
                .text(order.status.as_str())
                .text(&placed_row.currency)
                .int(bigint(placed_row.total_cents, "total_cents")?)
                .optional_text(order.reason.as_deref())
                .int(order.version)
                .int(placed_row.seq)
                .timestamp(&placed_row.at)
                .timestamp(&order.updated_at)
                .int(order.last_seq)
                .end_row();
        }
        // Any row not written (an order already there, a version that does not follow): the
        // batch goes event by event, which finds the event and parks it.
        Ok(copy_all(connection, INSERT_ORDERS, placed).await?
            && copy_all(connection, INSERT_LINES, lines).await?
            && write_all(connection, UPDATE_ORDERS, changed).await?)
    }
}

/// New orders and their lines are copied in (`COPY`), the fastest way to insert many rows.
const INSERT_ORDERS: &str = "orders (order_id, customer_id, status, currency, total_cents, \
    reason, version, placed_seq, placed_at, updated_at, last_seq)";

const INSERT_LINES: &str = "order_lines (order_id, line_no, sku, qty, unit_price_cents)";

const UPDATE_ORDERS: &str = "
    UPDATE orders o SET status = u.status, reason = COALESCE(u.reason, o.reason),
           version = u.version, updated_at = u.updated_at, last_seq = u.last_seq
    FROM jsonb_to_recordset($1) AS u(order_id text, status text, reason text,
         first_version bigint, version bigint, updated_at timestamptz, last_seq bigint)
    WHERE o.order_id = u.order_id AND o.version = u.first_version - 1";

/// An `OrderPlaced`, as its row needs it.
struct Placed {
    customer_id: String,
    currency: String,
    total_cents: u64,
    lines: Vec<ordo_domain::order::OrderLine>,
    seq: i64,
    at: DateTime<Utc>,
}

/// What a batch's events come to for one order.
struct FoldedOrder {
    order_id: String,
    placed: Option<Placed>,
    first_version: i64,
    version: i64,
    status: OrderStatus,
    reason: Option<String>,
    updated_at: DateTime<Utc>,
    last_seq: i64,
}

/// The batch's events folded per order, in order of first appearance; `None` when an event
/// cannot be read or does not follow the order's previous event in the batch.
fn fold(events: &[RecordedEvent]) -> Option<Vec<FoldedOrder>> {
    let mut orders: Vec<FoldedOrder> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for recorded in events {
        let envelope = &recorded.envelope;
        let event: OrderEvent = envelope.decode().ok()?;
        let version = i64::try_from(envelope.version).ok()?;
        let seq = i64::try_from(recorded.seq).ok()?;
        let (status, reason) = match &event {
            OrderEvent::OrderPlaced { .. } => (OrderStatus::Pending, None),
            OrderEvent::OrderConfirmed {} => (OrderStatus::Confirmed, None),
            OrderEvent::OrderShipped {} => (OrderStatus::Shipped, None),
            OrderEvent::OrderRejected { reason } => (OrderStatus::Rejected, Some(reason.clone())),
            OrderEvent::OrderCancelled { reason } => (OrderStatus::Cancelled, reason.clone()),
        };
        match index.get(envelope.aggregate_id.as_str()) {
            Some(&at) => {
                let order = &mut orders[at];
                if version != order.version + 1 || matches!(event, OrderEvent::OrderPlaced { .. }) {
                    return None;
                }
                order.version = version;
                order.status = status;
                order.reason = reason.or(order.reason.take());
                order.updated_at = envelope.at;
                order.last_seq = seq;
            }
            None => {
                let placed = match event {
                    OrderEvent::OrderPlaced {
                        customer_id,
                        lines,
                        currency,
                        total_cents,
                    } => Some(Placed {
                        customer_id: customer_id.as_str().to_owned(),
                        currency: currency.as_str().to_owned(),
                        total_cents,
                        lines,
                        seq,
                        at: envelope.at,
                    }),
                    _ => None,
                };
                index.insert(&envelope.aggregate_id, orders.len());
                orders.push(FoldedOrder {
                    order_id: envelope.aggregate_id.clone(),
                    placed,
                    first_version: version,
                    version,
                    status,
                    reason,
                    updated_at: envelope.at,
                    last_seq: seq,
                });
            }
        }
    }
    Some(orders)
}
