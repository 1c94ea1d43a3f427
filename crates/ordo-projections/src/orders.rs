//! The orders view: an order with its lines, by id, by customer and by status.

use ordo_domain::order::{OrderEvent, OrderStatus};
use ordo_eventstore::RecordedEvent;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;

use crate::{
    ApplyError, Projection,
    projection::{bigint, timestamp, update_all},
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
        let (mut placed, mut lines, mut changed, mut changed_ids) = (
            NewOrders::default(),
            NewLines::default(),
            Vec::new(),
            Vec::new(),
        );
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
                changed_ids.push(order.order_id);
                continue;
            };
            for (line_no, line) in placed_row.lines.iter().enumerate() {
                lines.order_id.push(order.order_id.clone());
                lines.line_no.push(line_no as i32);
                lines.sku.push(line.sku.as_str().to_owned());
                lines.qty.push(i64::from(line.qty));
                lines
                    .unit_price_cents
                    .push(bigint(line.unit_price_cents, "unit_price_cents")?);
            }
            placed
                .total_cents
                .push(bigint(placed_row.total_cents, "total_cents")?);
            placed.order_id.push(order.order_id);
            placed.customer_id.push(placed_row.customer_id);
            placed.status.push(order.status.as_str());
            placed.currency.push(placed_row.currency);
            placed.reason.push(order.reason);
            placed.version.push(order.version);
            placed.placed_seq.push(placed_row.seq);
            placed.placed_at.push(placed_row.at);
            placed.updated_at.push(order.updated_at);
            placed.last_seq.push(order.last_seq);
        }
        // Any row not written (an order already there, a version that does not follow): the
        // batch goes event by event, which finds the event and parks it.
        Ok(placed.insert(connection).await?
            && lines.insert(connection).await?
            && update_all(connection, UPDATE_ORDERS, changed, changed_ids).await?)
    }
}

/// New orders, a column each, inserted with one statement from arrays (`unnest`): sent in
/// PostgreSQL's binary form, with nothing to build or parse as JSON.
#[derive(Default)]
struct NewOrders {
    order_id: Vec<String>,
    customer_id: Vec<String>,
    status: Vec<&'static str>,
    currency: Vec<String>,
    total_cents: Vec<i64>,
    reason: Vec<Option<String>>,
    version: Vec<i64>,
    placed_seq: Vec<i64>,
    placed_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    last_seq: Vec<i64>,
}

impl NewOrders {
    /// Whether every order was inserted (a duplicate is an error, and so is a row too many).
    async fn insert(self, connection: &mut PgConnection) -> Result<bool, ApplyError> {
        if self.order_id.is_empty() {
            return Ok(true);
        }
        let expected = self.order_id.len() as u64;
        let inserted = sqlx::query(
            "INSERT INTO orders (order_id, customer_id, status, currency, total_cents, reason,
                                 version, placed_seq, placed_at, updated_at, last_seq)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                  $6::text[], $7::bigint[], $8::bigint[], $9::timestamptz[],
                                  $10::timestamptz[], $11::bigint[])",
        )
        .bind(self.order_id)
        .bind(self.customer_id)
        .bind(self.status)
        .bind(self.currency)
        .bind(self.total_cents)
        .bind(self.reason)
        .bind(self.version)
        .bind(self.placed_seq)
        .bind(self.placed_at)
        .bind(self.updated_at)
        .bind(self.last_seq)
        .execute(connection)
        .await?;
        Ok(inserted.rows_affected() == expected)
    }
}

/// The new orders' lines, a column each, as [`NewOrders`].
#[derive(Default)]
struct NewLines {
    order_id: Vec<String>,
    line_no: Vec<i32>,
    sku: Vec<String>,
    qty: Vec<i64>,
    unit_price_cents: Vec<i64>,
}

impl NewLines {
    async fn insert(self, connection: &mut PgConnection) -> Result<bool, ApplyError> {
        if self.order_id.is_empty() {
            return Ok(true);
        }
        let expected = self.order_id.len() as u64;
        let inserted = sqlx::query(
            "INSERT INTO order_lines (order_id, line_no, sku, qty, unit_price_cents)
             SELECT * FROM unnest($1::text[], $2::integer[], $3::text[], $4::bigint[],
                                  $5::bigint[])",
        )
        .bind(self.order_id)
        .bind(self.line_no)
        .bind(self.sku)
        .bind(self.qty)
        .bind(self.unit_price_cents)
        .execute(connection)
        .await?;
        Ok(inserted.rows_affected() == expected)
    }
}

const UPDATE_ORDERS: &str = "
    UPDATE orders o SET status = u.status, reason = COALESCE(u.reason, o.reason),
           version = u.version, updated_at = u.updated_at, last_seq = u.last_seq
    FROM jsonb_to_recordset($1) AS u(order_id text, status text, reason text,
         first_version bigint, version bigint, updated_at timestamptz, last_seq bigint)
    WHERE o.order_id = u.order_id AND o.version = u.first_version - 1
      AND o.order_id = ANY($2)";

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The orders of a new system are not analysed for their first thousands; a batch's status
    /// changes must still find their orders by key, not by reading every order.
    #[tokio::test]
    async fn a_batch_of_status_changes_looks_its_orders_up_by_key_in_a_view_never_analysed() {
        let database = ordo_testkit::TestDatabase::create().await;
        let pool = database.pool();
        crate::schema::ensure_view::<OrdersView>(pool, "view_orders")
            .await
            .unwrap();
        let mut connection = pool.acquire().await.unwrap();
        sqlx::query("SET search_path = view_orders, public")
            .execute(&mut *connection)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO orders (order_id, customer_id, status, currency, total_cents, version,
                                 placed_seq, placed_at, updated_at, last_seq)
             SELECT 'o-' || i, 'c1', 'pending', 'EUR', 100, 1, i, now(), now(), i
             FROM generate_series(1, 5000) i",
        )
        .execute(&mut *connection)
        .await
        .unwrap();
        let change = json!([{"order_id": "o-7", "status": "confirmed", "first_version": 2,
                             "version": 2, "updated_at": "2026-12-02T10:00:00Z", "last_seq": 5001}]);
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {UPDATE_ORDERS}")))
                .bind(change)
                .bind(vec!["o-7"])
                .fetch_all(&mut *connection)
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("orders_pkey") && !plan.contains("Seq Scan on orders"),
            "{plan}"
        );
    }
}
