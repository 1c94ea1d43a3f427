//! The view endpoints. Path and query parameters are validated before any read; a read with
//! `min_seq` waits (up to 5 s) until the view's checkpoint reaches it, else answers 504: for one
//! order or SKU, the checkpoint of its partition; for a list, the view's (every partition's).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
};
use ordo_domain::{CustomerId, OrderId, Sku};
use ordo_projections::schema::{ProjectionInfo, checkpoint_of, checkpoint_of_partition};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{Row, postgres::PgRow};

use crate::{ApiState, checkpoints::RECHECK, error::ApiError};

type Shared = State<Arc<ApiState>>;

/// The largest page of `/orders`.
const MAX_LIMIT: i64 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    min_seq: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    customer_id: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    min_seq: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationParams {
    order_id: Option<String>,
}

fn params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(params)| params)
        .map_err(|rejection| ApiError::InvalidQuery(rejection.body_text()))
}

fn orders_view() -> ProjectionInfo {
    ProjectionInfo::of::<ordo_projections::orders::OrdersView>()
}

fn stock_view() -> ProjectionInfo {
    ProjectionInfo::of::<ordo_projections::stock::StockView>()
}

/// What a read waits for: the view as a whole, or the partition of one aggregate.
#[derive(Debug, Clone, Copy)]
enum Scope {
    View,
    AggregateOf(u32),
}

impl Scope {
    fn of_aggregate(state: &ApiState, aggregate_id: &str) -> Self {
        Self::AggregateOf(ordo_eventstore::partition_of(
            aggregate_id,
            state.partitions,
        ))
    }

    /// Its checkpoint in the view's table.
    async fn checkpoint(self, state: &ApiState, view: &ProjectionInfo) -> Result<u64, sqlx::Error> {
        match self {
            Self::View => checkpoint_of(&state.pool, &view.schema(), view.stream).await,
            Self::AggregateOf(partition) => {
                checkpoint_of_partition(
                    &state.pool,
                    &view.schema(),
                    view.stream,
                    state.partitions,
                    partition,
                )
                .await
            }
        }
    }

    /// Its checkpoint as the projectors announced it.
    fn announced(self, announced: &crate::checkpoints::Announced) -> u64 {
        match self {
            Self::View => announced.of_view(),
            Self::AggregateOf(partition) => announced.of_partition(partition),
        }
    }
}

/// Waits until `view` has applied `min_seq` (if asked) for `scope`, and returns the
/// checkpoint of `scope`.
async fn caught_up(
    state: &ApiState,
    view: ProjectionInfo,
    scope: Scope,
    min_seq: Option<u64>,
) -> Result<u64, ApiError> {
    let deadline = Instant::now() + state.min_seq_wait;
    let mut announced = state.checkpoints.subscribe(view.name);
    loop {
        let checkpoint = scope.checkpoint(state, &view).await?;
        match min_seq {
            Some(wanted) if checkpoint < wanted => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(ApiError::NotCaughtUp {
                        min_seq: wanted,
                        checkpoint,
                    });
                }
                let wait = RECHECK.min(deadline - now);
                match &mut announced {
                    // Announced already, yet not in the view's table: a rebuild's new view, not
                    // swapped in yet. Poll.
                    Some(announced) if scope.announced(&announced.borrow()) >= wanted => {
                        tokio::time::sleep(wait.min(Duration::from_millis(20))).await;
                    }
                    Some(announced) => {
                        let _ = tokio::time::timeout(
                            wait,
                            announced.wait_for(|announced| scope.announced(announced) >= wanted),
                        )
                        .await;
                    }
                    None => tokio::time::sleep(wait.min(Duration::from_millis(20))).await,
                }
            }
            _ => return Ok(checkpoint),
        }
    }
}

/// A cached row when it is at least as new as asked, else `read` (and the result is cached).
async fn cached<F>(
    state: &ApiState,
    key: String,
    checkpoint: u64,
    min_seq: Option<u64>,
    read: F,
) -> Result<Value, ApiError>
where
    F: Future<Output = Result<Value, ApiError>>,
{
    if let Some((value, at)) = state.cache.get(&key).await
        && at >= min_seq.unwrap_or(0)
    {
        return Ok(value);
    }
    let value = read.await?;
    state.cache.insert(key, (value.clone(), checkpoint)).await;
    Ok(value)
}

/// `parked_events` counts the order's events the projector could not apply: when it is not 0,
/// the row is behind its stream (and `ordo projections status` says why).
const ORDER_COLUMNS: &str = "order_id, customer_id, status, currency, total_cents, reason, version,
     placed_seq, placed_at, updated_at, last_seq,
     (SELECT count(*) FROM public.parked_events p
      WHERE p.projection = 'orders' AND p.parked_in = 'view_orders' AND p.subject = 'ordo.order.events.' || order_id) AS parked_events";

fn order_json(row: &PgRow, lines: Vec<Value>) -> Value {
    json!({
        "order_id": row.get::<String, _>("order_id"),
        "customer_id": row.get::<String, _>("customer_id"),
        "status": row.get::<String, _>("status"),
        "currency": row.get::<String, _>("currency"),
        "total_cents": row.get::<i64, _>("total_cents"),
        "reason": row.get::<Option<String>, _>("reason"),
        "lines": lines,
        "version": row.get::<i64, _>("version"),
        "placed_at": row.get::<chrono::DateTime<chrono::Utc>, _>("placed_at"),
        "updated_at": row.get::<chrono::DateTime<chrono::Utc>, _>("updated_at"),
        "last_seq": row.get::<i64, _>("last_seq"),
        "parked_events": row.get::<i64, _>("parked_events"),
    })
}

/// The lines of `order_ids`, by order.
async fn lines_of(
    state: &ApiState,
    order_ids: &[String],
) -> Result<std::collections::HashMap<String, Vec<Value>>, ApiError> {
    let rows = sqlx::query(
        "SELECT order_id, sku, qty, unit_price_cents FROM view_orders.order_lines
         WHERE order_id = ANY($1) ORDER BY order_id, line_no",
    )
    .bind(order_ids)
    .fetch_all(&state.pool)
    .await?;
    let mut lines: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for row in rows {
        lines.entry(row.get("order_id")).or_default().push(json!({
            "sku": row.get::<String, _>("sku"),
            "qty": row.get::<i64, _>("qty"),
            "unit_price_cents": row.get::<i64, _>("unit_price_cents"),
        }));
    }
    Ok(lines)
}

pub async fn get_order(
    State(state): Shared,
    Path(order_id): Path<String>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = params(query)?;
    let order_id =
        OrderId::parse(order_id).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let scope = Scope::of_aggregate(&state, order_id.as_str());
    let checkpoint = caught_up(&state, orders_view(), scope, params.min_seq).await?;
    let key = format!("order:{order_id}");
    let order = cached(&state, key, checkpoint, params.min_seq, async {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM view_orders.orders WHERE order_id = $1"
        )))
        .bind(order_id.as_str())
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("order {order_id} is not in the view")))?;
        let mut lines = lines_of(&state, &[order_id.to_string()]).await?;
        Ok(order_json(
            &row,
            lines.remove(order_id.as_str()).unwrap_or_default(),
        ))
    })
    .await?;
    Ok(Json(order))
}

pub async fn list_orders(
    State(state): Shared,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = params(query)?;
    let customer_id = params
        .customer_id
        .map(CustomerId::parse)
        .transpose()
        .map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    const STATUSES: [&str; 5] = ["pending", "confirmed", "rejected", "cancelled", "shipped"];
    if let Some(status) = &params.status
        && !STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::InvalidQuery(format!(
            "status {status:?} is not one of {}",
            STATUSES.join(", ")
        )));
    }
    let limit = params.limit.unwrap_or(50);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::InvalidQuery(format!(
            "limit must be 1 to {MAX_LIMIT}, got {limit}"
        )));
    }
    let after: i64 = match &params.cursor {
        None => 0,
        Some(cursor) => cursor
            .parse::<i64>()
            .ok()
            .filter(|seq| *seq > 0)
            .ok_or_else(|| {
                ApiError::InvalidQuery(format!("cursor {cursor:?} is not one this API returned"))
            })?,
    };
    caught_up(&state, orders_view(), Scope::View, params.min_seq).await?;
    // Keyset paging on the sequence of OrderPlaced: orders placed later sort after every cursor,
    // so a page never repeats or skips an order while others are inserted.
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM view_orders.orders
         WHERE ($1::text IS NULL OR customer_id = $1) AND ($2::text IS NULL OR status = $2)
           AND placed_seq > $3
         ORDER BY placed_seq LIMIT $4"
    )))
    .bind(customer_id.as_ref().map(|id| id.as_str()))
    .bind(params.status.as_deref())
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let ids: Vec<String> = page.iter().map(|row| row.get("order_id")).collect();
    let mut lines = lines_of(&state, &ids).await?;
    let orders: Vec<Value> = page
        .iter()
        .map(|row| {
            order_json(
                row,
                lines
                    .remove(&row.get::<String, _>("order_id"))
                    .unwrap_or_default(),
            )
        })
        .collect();
    let next_cursor = more.then(|| {
        page.last()
            .map(|row| row.get::<i64, _>("placed_seq").to_string())
    });
    Ok(Json(
        json!({"orders": orders, "next_cursor": next_cursor.flatten()}),
    ))
}

pub async fn get_stock(
    State(state): Shared,
    Path(sku): Path<String>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = params(query)?;
    let sku = Sku::parse(sku).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let scope = Scope::of_aggregate(&state, sku.as_str());
    let checkpoint = caught_up(&state, stock_view(), scope, params.min_seq).await?;
    let stock = cached(
        &state,
        format!("stock:{sku}"),
        checkpoint,
        params.min_seq,
        async {
            let row = sqlx::query(
                "SELECT sku, on_hand, reserved, available, version, updated_at, last_seq,
                    (SELECT count(*) FROM public.parked_events p
                     WHERE p.projection = 'stock' AND p.parked_in = 'view_stock' AND p.subject = 'ordo.stock.events.' || sku) AS parked_events
             FROM view_stock.stock WHERE sku = $1",
            )
            .bind(sku.as_str())
            .fetch_optional(&state.pool)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("sku {sku} is not in the view")))?;
            Ok(json!({
                "sku": row.get::<String, _>("sku"),
                "on_hand": row.get::<i64, _>("on_hand"),
                "reserved": row.get::<i64, _>("reserved"),
                "available": row.get::<i64, _>("available"),
                "version": row.get::<i64, _>("version"),
                "updated_at": row.get::<chrono::DateTime<chrono::Utc>, _>("updated_at"),
                "last_seq": row.get::<i64, _>("last_seq"),
                // Not 0: events of this SKU could not be applied; the row is behind.
                "parked_events": row.get::<i64, _>("parked_events"),
            }))
        },
    )
    .await?;
    Ok(Json(stock))
}

pub async fn get_saga(
    State(state): Shared,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let order_id =
        OrderId::parse(order_id).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let row = sqlx::query(
        "SELECT order_id, state, steps, reason, started_at, updated_at, deadline_at FROM sagas WHERE order_id = $1",
    )
    .bind(order_id.as_str())
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id}")))?;
    Ok(Json(json!({
        "order_id": row.get::<String, _>("order_id"),
        "state": row.get::<String, _>("state"),
        "steps": row.get::<Value, _>("steps"),
        "reason": row.get::<Option<String>, _>("reason"),
        "started_at": row.get::<chrono::DateTime<chrono::Utc>, _>("started_at"),
        "updated_at": row.get::<chrono::DateTime<chrono::Utc>, _>("updated_at"),
        "deadline_at": row.get::<Option<chrono::DateTime<chrono::Utc>>, _>("deadline_at"),
    })))
}

pub async fn list_notifications(
    State(state): Shared,
    query: Result<Query<NotificationParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = params(query)?;
    let order_id = params
        .order_id
        .map(OrderId::parse)
        .transpose()
        .map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let rows = sqlx::query(
        "SELECT order_id, kind, customer_id, status, attempts, last_error, recorded_at FROM notifications
         WHERE ($1::text IS NULL OR order_id = $1) ORDER BY recorded_at, order_id, kind LIMIT 500",
    )
    .bind(order_id.as_ref().map(|id| id.as_str()))
    .fetch_all(&state.pool)
    .await?;
    let notifications: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "order_id": row.get::<String, _>("order_id"),
                "kind": row.get::<String, _>("kind"),
                "customer_id": row.get::<String, _>("customer_id"),
                "status": row.get::<String, _>("status"),
                "attempts": row.get::<i32, _>("attempts"),
                "last_error": row.get::<Option<String>, _>("last_error"),
                "recorded_at": row.get::<chrono::DateTime<chrono::Utc>, _>("recorded_at"),
            })
        })
        .collect();
    Ok(Json(json!({"notifications": notifications})))
}
