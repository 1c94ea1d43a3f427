//! The orders view: an order with its lines, by id, by customer and by status.

use ordo_domain::order::{OrderEvent, OrderStatus};
use ordo_eventstore::RecordedEvent;
use sqlx::PgConnection;

use crate::{ApplyError, Projection, projection::bigint};

pub struct OrdersView;

impl Projection for OrdersView {
    const NAME: &'static str = "orders";
    const STREAM: &'static str = "ORDO_ORDERS";
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
}
