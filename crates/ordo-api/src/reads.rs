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
use moka::future::Cache;
use ordo_domain::{CustomerId, OrderId, Sku};
use ordo_projections::schema::{ProjectionInfo, checkpoint_of, checkpoint_of_partition};

use crate::{
    ApiState,
    bodies::{
        ErrorBody, ListParams, NotificationParams, Notifications, Order, OrderLine, OrderPage,
        OrderStatus, ReadParams, Saga, Stock,
    },
    checkpoints::RECHECK,
    error::ApiError,
};

type Shared = State<Arc<ApiState>>;

/// The largest page of `/orders`.
const MAX_LIMIT: i64 = 500;

/// Hot rows by key, with the checkpoint their view had when they were read.
pub type RowCache<T> = Cache<String, (T, u64)>;

pub(crate) fn params<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
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
async fn cached<T, F>(
    cache: &RowCache<T>,
    key: String,
    checkpoint: u64,
    min_seq: Option<u64>,
    read: F,
) -> Result<T, ApiError>
where
    T: Clone + Send + Sync + 'static,
    F: Future<Output = Result<T, ApiError>>,
{
    if let Some((row, at)) = cache.get(&key).await
        && at >= min_seq.unwrap_or(0)
    {
        return Ok(row);
    }
    let row = read.await?;
    cache.insert(key, (row.clone(), checkpoint)).await;
    Ok(row)
}

/// `parked_events` counts the order's events the projector could not apply: when it is not 0,
/// the row is behind its stream (and `ordo projections status` says why).
pub(crate) const ORDER_COLUMNS: &str = "order_id, customer_id, status, currency, total_cents, reason, version,
     placed_seq, placed_at, updated_at, last_seq,
     (SELECT count(*) FROM public.parked_events p
      WHERE p.projection = 'orders' AND p.parked_in = 'view_orders' AND p.subject = 'ordo.order.events.' || order_id) AS parked_events";

/// An order of the view with the sequence of its `OrderPlaced`, by which `/orders` pages.
#[derive(sqlx::FromRow)]
struct PlacedOrder {
    #[sqlx(flatten)]
    order: Order,
    placed_seq: i64,
}

/// A line of an order, with the order it belongs to.
#[derive(sqlx::FromRow)]
struct LineOf {
    order_id: String,
    #[sqlx(flatten)]
    line: OrderLine,
}

/// The lines of `order_ids`, by order.
pub(crate) async fn lines_of(
    state: &ApiState,
    order_ids: &[String],
) -> Result<std::collections::HashMap<String, Vec<OrderLine>>, ApiError> {
    let rows: Vec<LineOf> = sqlx::query_as(
        "SELECT order_id, sku, qty, unit_price_cents FROM view_orders.order_lines
         WHERE order_id = ANY($1) ORDER BY order_id, line_no",
    )
    .bind(order_ids)
    .fetch_all(&state.pool)
    .await?;
    let mut lines: std::collections::HashMap<String, Vec<OrderLine>> = Default::default();
    for row in rows {
        lines.entry(row.order_id).or_default().push(row.line);
    }
    Ok(lines)
}

/// One order, with its lines.
#[utoipa::path(
    get,
    path = "/orders/{order_id}",
    tag = "reads",
    params(("order_id" = String, Path, description = "The order's id"), ReadParams),
    responses(
        (status = 200, description = "The order as the view holds it", body = Order),
        (status = 400, description = "An id or parameter that is not valid", body = ErrorBody),
        (status = 404, description = "Not in the view (yet, when no min_seq was given)", body = ErrorBody),
        (status = 504, description = "The view did not reach min_seq in time", body = ErrorBody),
    ),
)]
pub async fn get_order(
    State(state): Shared,
    Path(order_id): Path<String>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Order>, ApiError> {
    let params = params(query)?;
    let order_id =
        OrderId::parse(order_id).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let scope = Scope::of_aggregate(&state, order_id.as_str());
    let checkpoint = caught_up(&state, orders_view(), scope, params.min_seq).await?;
    let key = format!("order:{order_id}");
    let order = cached(
        &state.orders_cache,
        key,
        checkpoint,
        params.min_seq,
        async {
            let mut order: Order = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {ORDER_COLUMNS} FROM view_orders.orders WHERE order_id = $1"
            )))
            .bind(order_id.as_str())
            .fetch_optional(&state.pool)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("order {order_id} is not in the view")))?;
            let mut lines = lines_of(&state, &[order_id.to_string()]).await?;
            order.lines = lines.remove(order_id.as_str()).unwrap_or_default();
            Ok(order)
        },
    )
    .await?;
    Ok(Json(order))
}

/// Orders in the order they were placed, a page at a time, by customer and status.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "reads",
    params(ListParams),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "A parameter that is not valid", body = ErrorBody),
        (status = 504, description = "The view did not reach min_seq in time", body = ErrorBody),
    ),
)]
pub async fn list_orders(
    State(state): Shared,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<OrderPage>, ApiError> {
    let params = params(query)?;
    let customer_id = params
        .customer_id
        .map(CustomerId::parse)
        .transpose()
        .map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    if let Some(status) = &params.status
        && OrderStatus::parse(status).is_none()
    {
        let known: Vec<&str> = OrderStatus::ALL.map(OrderStatus::as_str).into();
        return Err(ApiError::InvalidQuery(format!(
            "status {status:?} is not one of {}",
            known.join(", ")
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
    let mut rows: Vec<PlacedOrder> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
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
    rows.truncate(limit as usize);
    let next_cursor = rows
        .last()
        .filter(|_| more)
        .map(|last| last.placed_seq.to_string());
    let ids: Vec<String> = rows.iter().map(|row| row.order.order_id.clone()).collect();
    let mut lines = lines_of(&state, &ids).await?;
    let orders = rows
        .into_iter()
        .map(|PlacedOrder { mut order, .. }| {
            order.lines = lines.remove(&order.order_id).unwrap_or_default();
            order
        })
        .collect();
    Ok(Json(OrderPage {
        orders,
        next_cursor,
    }))
}

/// One SKU's stock.
#[utoipa::path(
    get,
    path = "/stock/{sku}",
    tag = "reads",
    params(("sku" = String, Path, description = "The SKU"), ReadParams),
    responses(
        (status = 200, description = "The SKU as the view holds it", body = Stock),
        (status = 400, description = "A SKU or parameter that is not valid", body = ErrorBody),
        (status = 404, description = "Not in the view", body = ErrorBody),
        (status = 504, description = "The view did not reach min_seq in time", body = ErrorBody),
    ),
)]
pub async fn get_stock(
    State(state): Shared,
    Path(sku): Path<String>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Stock>, ApiError> {
    let params = params(query)?;
    let sku = Sku::parse(sku).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let scope = Scope::of_aggregate(&state, sku.as_str());
    let checkpoint = caught_up(&state, stock_view(), scope, params.min_seq).await?;
    let stock = cached(
        &state.stock_cache,
        format!("stock:{sku}"),
        checkpoint,
        params.min_seq,
        async {
            sqlx::query_as(
                "SELECT sku, on_hand, reserved, available, version, updated_at, last_seq,
                    (SELECT count(*) FROM public.parked_events p
                     WHERE p.projection = 'stock' AND p.parked_in = 'view_stock' AND p.subject = 'ordo.stock.events.' || sku) AS parked_events
             FROM view_stock.stock WHERE sku = $1",
            )
            .bind(sku.as_str())
            .fetch_optional(&state.pool)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("sku {sku} is not in the view")))
        },
    )
    .await?;
    Ok(Json(stock))
}

/// An order's saga: its state, and each step with its attempts and last error.
#[utoipa::path(
    get,
    path = "/sagas/{order_id}",
    tag = "reads",
    params(("order_id" = String, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The saga", body = Saga),
        (status = 400, description = "An id that is not valid", body = ErrorBody),
        (status = 404, description = "No saga for this order", body = ErrorBody),
    ),
)]
pub async fn get_saga(
    State(state): Shared,
    Path(order_id): Path<String>,
) -> Result<Json<Saga>, ApiError> {
    let order_id =
        OrderId::parse(order_id).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let saga: Saga = sqlx::query_as(
        "SELECT order_id, state, steps, reason, started_at, updated_at, deadline_at FROM sagas WHERE order_id = $1",
    )
    .bind(order_id.as_str())
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id}")))?;
    Ok(Json(saga))
}

/// Customer notifications, of one order or of all (at most 500, oldest first).
#[utoipa::path(
    get,
    path = "/notifications",
    tag = "reads",
    params(NotificationParams),
    responses(
        (status = 200, description = "The notifications and how their delivery went", body = Notifications),
        (status = 400, description = "An id that is not valid", body = ErrorBody),
    ),
)]
pub async fn list_notifications(
    State(state): Shared,
    query: Result<Query<NotificationParams>, QueryRejection>,
) -> Result<Json<Notifications>, ApiError> {
    let params = params(query)?;
    let order_id = params
        .order_id
        .map(OrderId::parse)
        .transpose()
        .map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    let notifications = sqlx::query_as(
        "SELECT order_id, kind, customer_id, status, attempts, last_error, recorded_at FROM notifications
         WHERE ($1::text IS NULL OR order_id = $1) ORDER BY recorded_at, order_id, kind LIMIT 500",
    )
    .bind(order_id.as_ref().map(|id| id.as_str()))
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(Notifications { notifications }))
}
