//! An order's history, read from its stream rather than from a view: every event as stored,
//! with the order's state right after it, folded by the domain's own `evolve` (time travel: what
//! the order was at any sequence).

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
};
use ordo_domain::{
    Aggregate, OrderId,
    order::{OrderAggregate, OrderEvent},
};
use ordo_eventstore::{LoadError, StreamId, history::read_subject};

use crate::{
    ApiState,
    bodies::{ErrorBody, HistoryEvent, HistoryParams, OrderHistory},
    error::ApiError,
};

/// The most events a history shows (an order has a handful).
pub const AT_MOST: usize = 200;

/// The events of `order_id`, up to `at_seq` when given, each with the order's state after it.
pub async fn of_order(
    state: &ApiState,
    order_id: &OrderId,
    at_seq: Option<u64>,
) -> Result<OrderHistory, ApiError> {
    let js = async_nats::jetstream::new(state.nats.clone());
    let subject = ordo_eventstore::aggregate_subject(OrderAggregate::CATEGORY, order_id.as_str());
    let read = read_subject(&js, StreamId::Orders.name(), &subject, at_seq, AT_MOST)
        .await
        .map_err(|err| match err {
            LoadError::Unavailable(message) => {
                ApiError::Unavailable(format!("JetStream is unavailable: {message}"))
            }
            corrupt @ LoadError::Corrupt { .. } => ApiError::Internal(corrupt.to_string()),
        })?;
    if read.events.is_empty() {
        return Err(ApiError::NotFound(match at_seq {
            Some(seq) => format!("order {order_id} has no event at or before sequence {seq}"),
            None => format!("order {order_id} has no events"),
        }));
    }
    let mut order = None;
    let mut events = Vec::with_capacity(read.events.len());
    for stored in &read.events {
        let envelope = &stored.recorded.envelope;
        let event: OrderEvent = envelope.decode().map_err(|err| {
            ApiError::Internal(format!(
                "event {} of order {order_id} cannot be read by this build: {err}",
                stored.recorded.seq
            ))
        })?;
        order = OrderAggregate::evolve(order, &event);
        events.push(HistoryEvent {
            seq: stored.recorded.seq,
            version: envelope.version,
            event_type: envelope.event_type.clone(),
            schema: envelope.schema,
            at: envelope.at,
            command_id: envelope.command_id.clone(),
            correlation_id: envelope.correlation_id.clone(),
            causation_id: envelope.causation_id.clone(),
            trace_id: stored.trace_id().map(str::to_owned),
            data: envelope.data.clone(),
            state: serde_json::to_value(&order).expect("the domain's states serialize"),
        });
    }
    Ok(OrderHistory {
        order_id: order_id.to_string(),
        events,
        more: read.more,
    })
}

/// An order's events as its stream holds them, each with the order's state right after it.
/// With `at_seq`, the history up to that sequence: its last state is the order as it was then.
#[utoipa::path(
    get,
    path = "/orders/{order_id}/history",
    tag = "reads",
    params(("order_id" = String, Path, description = "The order's id"), HistoryParams),
    responses(
        (status = 200, description = "The order's events, oldest first", body = OrderHistory),
        (status = 400, description = "An id or parameter that is not valid", body = ErrorBody),
        (status = 404, description = "No event of this order (up to at_seq)", body = ErrorBody),
    ),
)]
pub async fn get_order_history(
    State(state): State<Arc<ApiState>>,
    Path(order_id): Path<String>,
    query: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<OrderHistory>, ApiError> {
    let params = crate::reads::params(query)?;
    let order_id =
        OrderId::parse(order_id).map_err(|err| ApiError::InvalidQuery(err.to_string()))?;
    Ok(Json(of_order(&state, &order_id, params.at_seq).await?))
}
