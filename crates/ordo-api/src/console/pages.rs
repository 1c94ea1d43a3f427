//! The console's pages. Each reads what it shows (views, the saga's tables, the order's stream,
//! the partition bucket) and renders it; every value goes through maud, which escapes it.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use ordo_domain::{CustomerId, OrderId, Sku};
use serde::Deserialize;

use super::{encode, layout};
use crate::{
    ApiState,
    bodies::{
        Notification, NotificationStatus, Order, OrderHistory, OrderStatus, Saga, SagaState,
        SagaStep, StepKind, StepState, Stock,
    },
    error::ApiError,
    reads::ORDER_COLUMNS,
};

/// The command service's partition group (`ordo_commands::service::PARTITION_GROUP`; a test
/// holds the two equal).
pub const COMMANDS_GROUP: &str = "commands";
/// Orders listed on the home page.
const RECENT: i64 = 50;
/// A view further behind its stream than this is shown as lagging.
const LAGGING_FROM: u64 = 1_000;

/// A page, or the page that says why it cannot be shown.
type Page = Result<Markup, Response>;

fn failed(state: &ApiState, err: ApiError) -> Response {
    let (status, message) = status_and_message(err);
    let title = status.canonical_reason().unwrap_or("Error");
    (
        status,
        layout(
            title,
            logged_in(state),
            html! { p.error role="alert" { (message) } },
        ),
    )
        .into_response()
}

fn status_and_message(err: ApiError) -> (StatusCode, String) {
    match err {
        ApiError::InvalidQuery(message) => (StatusCode::BAD_REQUEST, message),
        ApiError::NotFound(message) => (StatusCode::NOT_FOUND, message),
        ApiError::Unavailable(message) | ApiError::Overloaded(message) => {
            (StatusCode::SERVICE_UNAVAILABLE, message)
        }
        ApiError::Internal(message) => (StatusCode::INTERNAL_SERVER_ERROR, message),
        ApiError::Unauthorized(message) => (StatusCode::UNAUTHORIZED, message),
        ApiError::NotCaughtUp { .. } => (StatusCode::GATEWAY_TIMEOUT, "not caught up".into()),
    }
}

/// The page for an id in the URL that is not one: the id as it came, shown as text.
fn invalid_id(state: &ApiState, what: &str, raw: &str, err: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        layout(
            "Bad Request",
            logged_in(state),
            html! {
                p.error role="alert" { "Not a valid " (what) ": " code #asked { (raw) } }
                p { (err) }
            },
        ),
    )
        .into_response()
}

fn logged_in(state: &ApiState) -> bool {
    state.tokens.api.is_some()
}

fn when(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string()
}

fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", cents / 100, cents % 100)
}

fn order_link(order_id: &str) -> Markup {
    html! { a href={ "/ui/orders/" (encode(order_id)) } { (order_id) } }
}

fn sku_link(sku: &str) -> Markup {
    html! { a href={ "/ui/stock/" (encode(sku)) } { (sku) } }
}

fn badge(text: &str) -> Markup {
    html! { span class={ "badge " (text) } { (text) } }
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("values serialize")
}

fn empty_as_none(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.trim().is_empty())
}

#[derive(Deserialize)]
pub(super) struct HomeQuery {
    order_id: Option<String>,
    customer_id: Option<String>,
    status: Option<String>,
}

#[derive(sqlx::FromRow)]
struct StuckSaga {
    order_id: String,
    reason: Option<String>,
    updated_at: DateTime<Utc>,
}

pub(super) async fn home(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<HomeQuery>,
) -> Response {
    match home_page(&state, query).await {
        Ok(page) => page.into_response(),
        Err(response) => response,
    }
}

async fn home_page(state: &ApiState, query: HomeQuery) -> Page {
    let fail = |err: ApiError| failed(state, err);
    let order_id = empty_as_none(query.order_id);
    let customer_id = empty_as_none(query.customer_id);
    let status = empty_as_none(query.status);
    let mut problems = Vec::new();
    if let Some(order_id) = &order_id
        && let Err(err) = OrderId::parse(order_id.clone())
    {
        problems.push(err.to_string());
    }
    if let Some(customer_id) = &customer_id
        && let Err(err) = CustomerId::parse(customer_id.clone())
    {
        problems.push(err.to_string());
    }
    if let Some(status) = &status
        && OrderStatus::parse(status).is_none()
    {
        problems.push(format!("{status:?} is not an order status"));
    }
    let pool = &state.pool;
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM view_orders.orders GROUP BY status")
            .fetch_all(pool)
            .await
            .map_err(|err| fail(err.into()))?;
    let orders: Vec<Order> = if problems.is_empty() {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM view_orders.orders
             WHERE ($1::text IS NULL OR order_id = $1) AND ($2::text IS NULL OR customer_id = $2)
               AND ($3::text IS NULL OR status = $3)
             ORDER BY placed_seq DESC LIMIT {RECENT}"
        )))
        .bind(order_id.as_deref())
        .bind(customer_id.as_deref())
        .bind(status.as_deref())
        .fetch_all(pool)
        .await
        .map_err(|err| fail(err.into()))?
    } else {
        Vec::new()
    };
    let stuck: Vec<StuckSaga> = sqlx::query_as(
        "SELECT order_id, reason, updated_at FROM sagas WHERE state = 'compensation_stuck'
         ORDER BY updated_at LIMIT 50",
    )
    .fetch_all(pool)
    .await
    .map_err(|err| fail(err.into()))?;
    let dead_letters: Vec<Notification> = sqlx::query_as(
        "SELECT order_id, kind, customer_id, status, attempts, last_error, recorded_at
         FROM notifications WHERE status = 'dead_lettered' ORDER BY recorded_at LIMIT 50",
    )
    .fetch_all(pool)
    .await
    .map_err(|err| fail(err.into()))?;
    let projections = crate::ops::projection_status(pool, &state.nats)
        .await
        .map_err(fail)?;
    let lagging: Vec<_> = projections
        .iter()
        .filter(|view| view.lag.is_none_or(|lag| lag >= LAGGING_FROM))
        .collect();
    let parked: Vec<_> = projections.iter().filter(|view| view.parked > 0).collect();
    let saga_backlog = saga_backlog(state, &projections)
        .await
        .map_err(|err| fail(err.into()))?;
    let bounds = state.shed_bounds;
    let shedding: Vec<String> = saga_backlog
        .filter(|backlog| *backlog >= bounds.saga_backlog)
        .map(|backlog| {
            format!(
                "the sagas have about {backlog} order events to take in (order.place sheds from {})",
                bounds.saga_backlog
            )
        })
        .into_iter()
        .chain(
            projections
                .iter()
                .filter(|view| view.lag.is_some_and(|lag| lag >= bounds.projection_lag))
                .map(|view| {
                    format!(
                        "view {} is {} events behind (it sheds from {})",
                        view.name,
                        view.lag.unwrap_or(0),
                        bounds.projection_lag
                    )
                }),
        )
        .collect();
    let attention = !stuck.is_empty()
        || !dead_letters.is_empty()
        || !lagging.is_empty()
        || !parked.is_empty()
        || !shedding.is_empty();
    let count_of = |status: OrderStatus| {
        counts
            .iter()
            .find(|(known, _)| known == status.as_str())
            .map_or(0, |(_, count)| *count)
    };
    Ok(layout(
        "Orders",
        logged_in(state),
        html! {
            section #attention {
                h2 { "Needs a person" }
                @if !attention {
                    p.calm { "Nothing: no stuck saga, no dead letter, no parked event, every view keeping up." }
                }
                @if !shedding.is_empty() {
                    p.problem #shedding {
                        "order.place is shedding load: " (shedding.join("; ")) "."
                    }
                }
                @if !stuck.is_empty() {
                    h3 { "Sagas stuck in a compensation (" (stuck.len()) ")" }
                    table.stuck-sagas {
                        thead { tr { th { "order" } th { "why" } th { "since" } } }
                        tbody {
                            @for saga in &stuck {
                                tr {
                                    td { (order_link(&saga.order_id)) }
                                    td { (saga.reason.as_deref().unwrap_or("")) }
                                    td { (when(&saga.updated_at)) }
                                }
                            }
                        }
                    }
                }
                @if !dead_letters.is_empty() {
                    h3 { "Dead-lettered notifications (" (dead_letters.len()) ")" }
                    table.dead-letters {
                        thead { tr { th { "order" } th { "kind" } th { "attempts" } th { "last error" } } }
                        tbody {
                            @for notification in &dead_letters {
                                tr {
                                    td { (order_link(&notification.order_id)) }
                                    td { (notification.kind) }
                                    td { (notification.attempts) }
                                    td { (notification.last_error.as_deref().unwrap_or("")) }
                                }
                            }
                        }
                    }
                }
                @for view in &parked {
                    p.problem { "View " a href="/ui/projections" { (view.name) } " has " (view.parked) " parked events." }
                }
                @for view in &lagging {
                    p.problem {
                        "View " a href="/ui/projections" { (view.name) } " is "
                        @match view.lag {
                            Some(lag) => { (lag) " events behind its stream." }
                            None => { "of unknown lag: JetStream did not answer." }
                        }
                    }
                }
            }
            section #load {
                p.hint {
                    "Backlogs, about: the sagas' "
                    @match saga_backlog { Some(backlog) => { (backlog) } None => { "unknown" } }
                    " order events (order.place sheds from " (bounds.saga_backlog) "); the views' "
                    (projections.iter().map(|view| format!("{} {}", view.name, view.lag.map_or("unknown".into(), |lag| lag.to_string()))).collect::<Vec<_>>().join(", "))
                    " (sheds from " (bounds.projection_lag) ")."
                }
            }
            section #counts {
                h2 { "Orders by status" }
                dl.counts {
                    @for status in OrderStatus::ALL {
                        div { dt { (status.as_str()) } dd data-status=(status.as_str()) { (count_of(status)) } }
                    }
                }
            }
            section #orders {
                h2 { "Recent orders" }
                form.search method="get" action="/ui/" {
                    input name="order_id" placeholder="order id" value=(order_id.as_deref().unwrap_or(""));
                    input name="customer_id" placeholder="customer id" value=(customer_id.as_deref().unwrap_or(""));
                    select name="status" {
                        option value="" { "any status" }
                        @for known in OrderStatus::ALL {
                            option value=(known.as_str()) selected[status.as_deref() == Some(known.as_str())] { (known.as_str()) }
                        }
                    }
                    button type="submit" { "Search" }
                }
                @for problem in &problems {
                    p.error role="alert" { (problem) }
                }
                @if orders.is_empty() && problems.is_empty() {
                    p { "No order in the view matches." }
                }
                @if !orders.is_empty() {
                    table.orders {
                        thead { tr { th { "order" } th { "customer" } th { "status" } th { "total" } th { "reason" } th { "placed" } } }
                        tbody {
                            @for order in &orders {
                                tr {
                                    td { (order_link(&order.order_id)) }
                                    td { (order.customer_id) }
                                    td { (badge(order.status.as_str())) }
                                    td.number { (money(order.total_cents, &order.currency)) }
                                    td { (order.reason.as_deref().unwrap_or("")) }
                                    td { (when(&order.placed_at)) }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// About how many order events the saga coordinators have not taken in: the orders stream's
/// head past the intake checkpoint (in PostgreSQL, written at most every 200 ms) of the
/// partition furthest behind. The command service sheds on the positions the intakes report in
/// the partition bucket, a moment fresher; this is what the console can read without watching
/// the bucket. Unknown when the head is, or no intake has written a checkpoint yet.
async fn saga_backlog(
    state: &ApiState,
    projections: &[crate::bodies::ProjectionStatus],
) -> Result<Option<u64>, sqlx::Error> {
    let Some(head) = projections
        .iter()
        .find(|view| view.stream == ordo_eventstore::StreamId::Orders.name())
        .and_then(|view| view.stream_head)
    else {
        return Ok(None);
    };
    let furthest_behind: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM saga_intake")
        .fetch_one(&state.pool)
        .await?;
    Ok(furthest_behind.map(|seq| head.saturating_sub(u64::try_from(seq).unwrap_or(0))))
}

/// What an order's reserve steps say of the stock it holds: per SKU, the quantity and whether
/// it is held, released, shipped, or was never taken. A reserve given up on (its answer never
/// came) is answered by its resolve: refused there (recorded as done with the refusal), it never
/// ran; done without one, it ran and holds stock until its release.
fn holdings(steps: &[SagaStep]) -> Vec<(String, u64, &'static str)> {
    fn of_sku<'a>(
        steps: &'a [SagaStep],
        sku: &'a str,
        kind: StepKind,
    ) -> impl Iterator<Item = &'a SagaStep> {
        steps
            .iter()
            .filter(move |step| step.kind == kind && step.sku.as_deref() == Some(sku))
    }
    let ended_by = |sku: &str, kind: StepKind| {
        of_sku(steps, sku, kind).any(|step| step.state == StepState::Succeeded)
    };
    steps
        .iter()
        .filter(|step| step.kind == StepKind::Reserve)
        .filter_map(|step| {
            let sku = step.sku.clone()?;
            let ran = match step.state {
                StepState::Succeeded => Some(true),
                StepState::Failed | StepState::Skipped => Some(false),
                StepState::Unknown | StepState::Pending => None,
                StepState::Abandoned => of_sku(steps, &sku, StepKind::ResolveReserve)
                    .find(|resolve| resolve.state == StepState::Succeeded)
                    .map(|resolve| resolve.last_error.is_none()),
            };
            let held = match ran {
                Some(false) => "not reserved",
                _ if ended_by(&sku, StepKind::Deduct) => "shipped",
                _ if ended_by(&sku, StepKind::Release) => "released",
                Some(true) => "held",
                None => "not known yet",
            };
            Some((sku, step.qty.unwrap_or(0), held))
        })
        .collect()
}

fn is_compensation(kind: StepKind) -> bool {
    matches!(
        kind,
        StepKind::Release | StepKind::Refund | StepKind::Reject | StepKind::ResolveReserve
    )
}

fn step_kind(kind: StepKind) -> &'static str {
    match kind {
        StepKind::Reserve => "reserve",
        StepKind::ResolveReserve => "resolve reserve",
        StepKind::Authorize => "authorize payment",
        StepKind::Confirm => "confirm",
        StepKind::Release => "release",
        StepKind::Refund => "refund",
        StepKind::Reject => "reject",
        StepKind::Deduct => "deduct",
    }
}

fn step_state(state: StepState) -> &'static str {
    match state {
        StepState::Pending => "pending",
        StepState::Succeeded => "succeeded",
        StepState::Failed => "failed",
        StepState::Unknown => "unknown",
        StepState::Skipped => "skipped",
        StepState::Abandoned => "abandoned",
    }
}

fn saga_state(state: SagaState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn notification_status(status: NotificationStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[derive(sqlx::FromRow)]
struct Payment {
    amount_cents: i64,
    authorized_at: Option<DateTime<Utc>>,
    refunded_at: Option<DateTime<Utc>>,
}

/// A trace viewer's link for `trace_id`, when one is configured.
fn trace_link(state: &ApiState, trace_id: &str) -> Option<String> {
    state
        .trace_url
        .as_ref()
        .map(|template| template.replace("{trace_id}", trace_id))
}

pub(super) async fn order(
    State(state): State<Arc<ApiState>>,
    Path(order_id): Path<String>,
) -> Response {
    match order_page(&state, order_id).await {
        Ok(page) => page.into_response(),
        Err(response) => response,
    }
}

async fn order_page(state: &ApiState, order_id: String) -> Page {
    let fail = |err: ApiError| failed(state, err);
    let order_id = OrderId::parse(order_id.clone())
        .map_err(|err| invalid_id(state, "order id", &order_id, err))?;
    let pool = &state.pool;
    let mut row: Option<Order> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM view_orders.orders WHERE order_id = $1"
    )))
    .bind(order_id.as_str())
    .fetch_optional(pool)
    .await
    .map_err(|err| fail(err.into()))?;
    if let Some(row) = &mut row {
        let mut lines = crate::reads::lines_of(state, &[order_id.to_string()])
            .await
            .map_err(fail)?;
        row.lines = lines.remove(order_id.as_str()).unwrap_or_default();
    }
    // The stream is read from NATS, the rest from PostgreSQL: either may be down while the
    // other answers, and a person looking into an order wants whatever can be shown.
    let history: Result<Option<OrderHistory>, String> =
        match crate::history::of_order(state, &order_id, None).await {
            Ok(history) => Ok(Some(history)),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(err) => Err(status_and_message(err).1),
        };
    let saga: Option<Saga> = sqlx::query_as(
        "SELECT order_id, state, steps, reason, started_at, updated_at, deadline_at FROM sagas WHERE order_id = $1",
    )
    .bind(order_id.as_str())
    .fetch_optional(pool)
    .await
    .map_err(|err| fail(err.into()))?;
    let notifications: Vec<Notification> = sqlx::query_as(
        "SELECT order_id, kind, customer_id, status, attempts, last_error, recorded_at
         FROM notifications WHERE order_id = $1 ORDER BY recorded_at",
    )
    .bind(order_id.as_str())
    .fetch_all(pool)
    .await
    .map_err(|err| fail(err.into()))?;
    let payment: Option<Payment> = sqlx::query_as(
        "SELECT amount_cents, authorized_at, refunded_at FROM payments WHERE order_id = $1",
    )
    .bind(order_id.as_str())
    .fetch_optional(pool)
    .await
    .map_err(|err| fail(err.into()))?;
    if row.is_none() && matches!(history, Ok(None)) && saga.is_none() {
        return Err(fail(ApiError::NotFound(format!(
            "order {order_id} has no events, no row in the view and no saga"
        ))));
    }
    let trace_id = history
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|history| {
            history
                .events
                .iter()
                .find_map(|event| event.trace_id.clone())
        });
    let reason = row
        .as_ref()
        .and_then(|row| row.reason.clone())
        .or_else(|| saga.as_ref().and_then(|saga| saga.reason.clone()));
    let title = format!("Order {order_id}");
    Ok(layout(
        &title,
        logged_in(state),
        html! {
            section #summary {
                @match &row {
                    Some(row) => {
                        dl.facts {
                            div { dt { "status" } dd #status { (badge(row.status.as_str())) } }
                            div { dt { "customer" } dd { (row.customer_id) } }
                            div { dt { "total" } dd { (money(row.total_cents, &row.currency)) } }
                            div { dt { "placed" } dd { (when(&row.placed_at)) } }
                            div { dt { "last change" } dd { (when(&row.updated_at)) } }
                            div { dt { "view" } dd { "version " (row.version) ", sequence " (row.last_seq) } }
                        }
                        @if row.parked_events > 0 {
                            p.problem { (row.parked_events) " of this order's events are parked: the row is behind its stream." }
                        }
                        table.lines {
                            thead { tr { th { "SKU" } th { "qty" } th { "unit price" } } }
                            tbody {
                                @for line in &row.lines {
                                    tr { td { (sku_link(&line.sku)) } td.number { (line.qty) } td.number { (money(line.unit_price_cents, &row.currency)) } }
                                }
                            }
                        }
                    }
                    None => { p.problem { "Not in the orders view (yet): shown from its stream and its saga." } }
                }
                @if let Some(reason) = &reason {
                    p #reason { strong { "Reason: " } (reason) }
                }
                @if let Some(trace_id) = &trace_id {
                    p #trace {
                        "Trace "
                        @match trace_link(state, trace_id) {
                            Some(link) => { a href=(link) rel="noreferrer" target="_blank" { code { (trace_id) } } }
                            None => { code { (trace_id) } }
                        }
                    }
                }
            }
            section #events {
                h2 { "Events" }
                @match &history {
                    Err(err) => { p.error role="alert" { "The stream could not be read: " (err) } }
                    Ok(None) => { p { "No events in the stream." } }
                    Ok(Some(history)) => {
                        p.hint { "As stored in the stream. Open an event to see its data and the order right after it, folded from the events up to it." }
                        ol.timeline {
                            @for event in &history.events {
                                li data-seq=(event.seq) {
                                    details {
                                        summary {
                                            span.type { (event.event_type) }
                                            " · sequence " (event.seq)
                                            " · version " (event.version)
                                            " · " time { (when(&event.at)) }
                                            " · command " code.command { (event.command_id) }
                                        }
                                        div.event-body {
                                            h4 { "Data" }
                                            pre.data { (json(&event.data)) }
                                            h4 { "The order right after it" }
                                            pre.state { (json(&event.state)) }
                                            p.meta {
                                                "correlation " code { (event.correlation_id) }
                                                @if let Some(causation) = &event.causation_id { " · causation " code { (causation) } }
                                                @if let Some(trace) = &event.trace_id { " · trace " code { (trace) } }
                                                " · schema " (event.schema)
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        @if history.more {
                            p.hint { "The first " (history.events.len()) " events are shown." }
                        }
                    }
                }
            }
            section #saga {
                h2 { "Saga" }
                @match &saga {
                    None => { p { "No saga (yet)." } }
                    Some(saga) => {
                        p {
                            "State " span #saga-state { (badge(&saga_state(saga.state))) }
                            " · started " (when(&saga.started_at))
                            " · last change " (when(&saga.updated_at))
                            @if let Some(deadline) = &saga.deadline_at { " · gives up at " (when(deadline)) }
                        }
                        @if saga.state == SagaState::CompensationStuck {
                            form.action method="post" action={ "/ui/sagas/" (encode(order_id.as_str())) "/retry" }
                                data-confirm={ "Retry the saga of " (order_id) " now, with a fresh count of attempts?" } {
                                button #retry-saga type="submit" { "Retry the saga" }
                            }
                        }
                        table.steps {
                            thead { tr { th { "step" } th { "SKU" } th { "qty / amount" } th { "state" } th { "attempts" } th { "last error" } th { "last attempt" } } }
                            tbody {
                                @for step in &saga.steps {
                                    tr class=(if is_compensation(step.kind) { "compensation" } else { "forward" }) {
                                        td {
                                            (step_kind(step.kind))
                                            @if is_compensation(step.kind) { " " span.badge.compensating { "compensation" } }
                                            @if let Some(reason) = &step.reason { " (" (reason) ")" }
                                        }
                                        td { @if let Some(sku) = &step.sku { (sku_link(sku)) } }
                                        td.number {
                                            @if let Some(qty) = step.qty { (qty) }
                                            @if let Some(amount) = step.amount_cents { (money(amount as i64, row.as_ref().map_or("", |row| row.currency.as_str()))) }
                                        }
                                        td { (badge(step_state(step.state))) }
                                        td.number { (step.attempts) }
                                        td { (step.last_error.as_deref().unwrap_or("")) }
                                        td { @if let Some(at) = &step.last_attempt_at { (when(at)) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section #stock {
                h2 { "Stock it holds" }
                @let held = saga.as_ref().map(|saga| holdings(&saga.steps)).unwrap_or_default();
                @if held.is_empty() {
                    p { "No reservation." }
                } @else {
                    table.holdings {
                        thead { tr { th { "SKU" } th { "qty" } th { "now" } } }
                        tbody {
                            @for (sku, qty, now) in &held {
                                tr { td { (sku_link(sku)) } td.number { (qty) } td { (badge(now)) } }
                            }
                        }
                    }
                }
            }
            section #payment {
                h2 { "Payment" }
                @match &payment {
                    None => { p { "No payment authorised." } }
                    Some(payment) => {
                        p {
                            (money(payment.amount_cents, row.as_ref().map_or("", |row| row.currency.as_str())))
                            @if let Some(at) = &payment.authorized_at { " · authorised " (when(at)) }
                            @if let Some(at) = &payment.refunded_at { " · refunded " (when(at)) }
                            @else { " · not refunded" }
                        }
                    }
                }
            }
            section #notifications {
                h2 { "Notifications" }
                @if notifications.is_empty() {
                    p { "None." }
                } @else {
                    table.notifications {
                        thead { tr { th { "kind" } th { "status" } th { "attempts" } th { "last error" } th { "recorded" } th {} } }
                        tbody {
                            @for notification in &notifications {
                                tr {
                                    td { (notification.kind) }
                                    td { (badge(&notification_status(notification.status))) }
                                    td.number { (notification.attempts) }
                                    td { (notification.last_error.as_deref().unwrap_or("")) }
                                    td { (when(&notification.recorded_at)) }
                                    td {
                                        @if notification.status == NotificationStatus::DeadLettered {
                                            form.action method="post"
                                                action={ "/ui/notifications/" (encode(order_id.as_str())) "/" (encode(&notification.kind)) "/retry" }
                                                data-confirm={ "Deliver the " (notification.kind) " notification of " (order_id) " again?" } {
                                                button type="submit" { "Deliver again" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// Sagas searched for the holders of a SKU, at most.
const HOLDERS_AT_MOST: i64 = 500;

pub(super) async fn stock(State(state): State<Arc<ApiState>>, Path(sku): Path<String>) -> Response {
    match stock_page(&state, sku).await {
        Ok(page) => page.into_response(),
        Err(response) => response,
    }
}

async fn stock_page(state: &ApiState, sku: String) -> Page {
    let fail = |err: ApiError| failed(state, err);
    let sku = Sku::parse(sku.clone()).map_err(|err| invalid_id(state, "SKU", &sku, err))?;
    let row: Option<Stock> = sqlx::query_as(
        "SELECT sku, on_hand, reserved, available, version, updated_at, last_seq,
            (SELECT count(*) FROM public.parked_events p
             WHERE p.projection = 'stock' AND p.parked_in = 'view_stock' AND p.subject = 'ordo.stock.events.' || sku) AS parked_events
         FROM view_stock.stock WHERE sku = $1",
    )
    .bind(sku.as_str())
    .fetch_optional(&state.pool)
    .await
    .map_err(|err| fail(err.into()))?;
    let Some(row) = row else {
        return Err(fail(ApiError::NotFound(format!(
            "SKU {sku} is not in the stock view"
        ))));
    };
    // The newest sagas whose reserve of this SKU ran or may have run, and whose release or
    // deduct of it has not succeeded; `holdings` says which of them hold it. (No index serves
    // this: it scans the saga table, once per page view.)
    let step = |kind: &str, state: &str| serde_json::json!([{"kind": kind, "sku": sku.as_str(), "state": state}]);
    let sagas: Vec<(String, sqlx::types::Json<Vec<SagaStep>>)> = sqlx::query_as(
        "SELECT order_id, steps FROM sagas
         WHERE (steps @> $1 OR steps @> $2) AND NOT steps @> $3 AND NOT steps @> $4
         ORDER BY started_at DESC LIMIT $5",
    )
    .bind(step("reserve", "succeeded"))
    .bind(step("reserve", "abandoned"))
    .bind(step("release", "succeeded"))
    .bind(step("deduct", "succeeded"))
    .bind(HOLDERS_AT_MOST)
    .fetch_all(&state.pool)
    .await
    .map_err(|err| fail(err.into()))?;
    let holders: Vec<(String, u64)> = sagas
        .into_iter()
        .filter_map(|(order_id, steps)| {
            holdings(&steps)
                .into_iter()
                .find(|(held, _, now)| held == sku.as_str() && *now == "held")
                .map(|(_, qty, _)| (order_id, qty))
        })
        .collect();
    Ok(layout(
        &format!("Stock of {sku}"),
        logged_in(state),
        html! {
            dl.facts {
                div { dt { "on hand" } dd #on-hand { (row.on_hand) } }
                div { dt { "reserved" } dd #reserved { (row.reserved) } }
                div { dt { "available" } dd #available { (row.available) } }
                div { dt { "last change" } dd { (when(&row.updated_at)) } }
                div { dt { "view" } dd { "version " (row.version) ", sequence " (row.last_seq) } }
            }
            @if row.parked_events > 0 {
                p.problem { (row.parked_events) " of this SKU's events are parked: the row is behind its stream." }
            }
            h2 { "Orders holding it" }
            p.hint { "As their sagas recorded their reserves (the newest " (HOLDERS_AT_MOST) " at most)." }
            @if holders.is_empty() {
                p { "None." }
            } @else {
                table.holders {
                    thead { tr { th { "order" } th { "qty" } } }
                    tbody {
                        @for (order_id, qty) in &holders {
                            tr { td { (order_link(order_id)) } td.number { (qty) } }
                        }
                    }
                }
            }
        },
    ))
}

pub(super) async fn projections(State(state): State<Arc<ApiState>>) -> Response {
    let status = match crate::ops::projection_status(&state.pool, &state.nats).await {
        Ok(status) => status,
        Err(err) => return failed(&state, err),
    };
    let mut may_rebuild = std::collections::HashSet::new();
    for view in ordo_projections::View::ALL {
        if super::rebuilds::may_rebuild(&state.pool, view)
            .await
            .unwrap_or(false)
        {
            may_rebuild.insert(view.name());
        }
    }
    let rebuild_of = |name: &str| {
        name.parse::<ordo_projections::View>()
            .ok()
            .and_then(|view| state.rebuilds.of(view))
    };
    let shown = |value: Option<u64>| value.map_or("unknown".to_owned(), |value| value.to_string());
    layout(
        "Projections",
        logged_in(&state),
        html! {
            div data-live="2000" {
                p.hint { "Read at " (when(&Utc::now())) "; this page reads again every 2 s." }
                table.projections {
                    thead { tr { th { "view" } th { "stream" } th { "checkpoint" } th { "stream head" } th { "lag" } th { "parked" } } }
                    tbody {
                        @for view in &status {
                            tr data-view=(view.name) {
                                td { (view.name) }
                                td { (view.stream) }
                                td.number.checkpoint { (view.checkpoint) }
                                td.number.head { (shown(view.stream_head)) }
                                td.number.lag { (shown(view.lag)) }
                                td.number.parked { (view.parked) }
                            }
                        }
                    }
                }
                @for view in &status {
                    h2 { "Rebuild " (view.name) }
                    @if let Some(rebuild) = rebuild_of(&view.name) {
                        p.rebuild data-view=(view.name) data-state=(match &rebuild.outcome { None => "running", Some(Ok(_)) => "done", Some(Err(_)) => "failed" }) {
                            "Started " (when(&rebuild.started_at)) ": "
                            @match &rebuild.outcome {
                                None => { (rebuild.applied) " of " (rebuild.target) " events applied to the new view." }
                                Some(Ok(done)) => { (done) "." }
                                Some(Err(err)) => { "failed: " (err) }
                            }
                        }
                    }
                    @if may_rebuild.contains(view.name.as_str()) {
                        form.action method="post" action={ "/ui/projections/" (encode(&view.name)) "/rebuild" }
                            data-confirm={ "Rebuild view " (view.name) " from its stream? It keeps serving while the new one is built, then swaps." } {
                            button.rebuild type="submit" { "Rebuild " (view.name) }
                        }
                    } @else {
                        p.hint { "Rebuilds need the database's owner: " code { "ordo projections rebuild " (view.name) } "." }
                    }
                    @if !view.parked_events.is_empty() {
                        h2 { "Parked in " (view.name) }
                        p.hint { "Fix the cause, then rebuild the view: a rebuild applies every event again, and those that apply stop being parked." }
                        @if view.parked > view.parked_events.len() {
                            p.problem { (view.parked) " events are parked; the first " (view.parked_events.len()) " by sequence are listed." }
                        }
                        table.parked {
                            thead { tr { th { "sequence" } th { "subject" } th { "type" } th { "reason" } th { "attempts" } th { "parked" } } }
                            tbody {
                                @for parked in &view.parked_events {
                                    tr {
                                        td.number { (parked.seq) }
                                        td { (parked.subject) }
                                        td { (parked.event_type.as_deref().unwrap_or("")) }
                                        td { (parked.reason) }
                                        td.number { (parked.attempts) }
                                        td { (when(&parked.parked_at)) }
                                    }
                                }
                            }
                        }
                    }
                    h2 { "Partitions of " (view.name) }
                    table.view-partitions {
                        thead { tr { th { "partition" } th { "checkpoint" } th { "lag" } } }
                        tbody {
                            @for partition in &view.partitions {
                                tr { td.number { (partition.partition) } td.number { (partition.checkpoint) } td.number { (shown(partition.lag)) } }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

const PARTITIONS_READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

pub(super) async fn partitions(State(state): State<Arc<ApiState>>) -> Response {
    let js = async_nats::jetstream::new(state.nats.clone());
    let groups = std::iter::once(COMMANDS_GROUP).chain(
        ordo_eventstore::ConsumerId::ALL
            .into_iter()
            .filter_map(ordo_eventstore::ConsumerId::partition_group),
    );
    let mut shown = Vec::new();
    for group in groups {
        let config = ordo_eventstore::OwnershipConfig::new(group, state.partitions);
        // A bucket without a leader answers nothing: the page says so rather than hang.
        let status = tokio::time::timeout(
            PARTITIONS_READ_WITHIN,
            ordo_eventstore::ownership::status(&js, &config),
        )
        .await
        .map_err(|_| format!("the lease bucket gave no answer within {PARTITIONS_READ_WITHIN:?}"))
        .and_then(|status| status.map_err(|err| err.to_string()));
        shown.push((group, status));
    }
    layout(
        "Partitions",
        logged_in(&state),
        html! {
            div data-live="2000" {
                p.hint { "Who holds each partition, from the lease bucket; read at " (when(&Utc::now())) ", again every 2 s." }
                @for (group, status) in &shown {
                    section.group data-group=(group) {
                        h2 { (group) }
                        @match status {
                            Err(err) => { p.error { (err) } }
                            Ok(status) => {
                                table.members {
                                    thead { tr { th { "instance" } th { "alive" } th { "heartbeat" } th { "partitions held" } } }
                                    tbody {
                                        @for member in &status.members {
                                            tr {
                                                td { code { (member.instance) } }
                                                td { (if member.alive { "yes" } else { "no" }) }
                                                td.number { (member.heartbeat_ms_ago) " ms ago" }
                                                td.number { (member.owns) }
                                            }
                                        }
                                    }
                                }
                                @if status.members.is_empty() { p { "No instance has joined." } }
                                table.leases {
                                    thead { tr { th { "partition" } th { "owner" } th { "renewed" } th { "held" } } }
                                    tbody {
                                        @for partition in &status.partitions {
                                            tr class=(if partition.held { "held" } else { "unheld" }) {
                                                td.number { (partition.partition) }
                                                td { @if let Some(owner) = &partition.owner { code { (owner) } } }
                                                td.number { @if let Some(ago) = partition.renewed_ms_ago { (ago) " ms ago" } }
                                                td { (if partition.held { "yes" } else { "no" }) }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_shown_with_its_sign_and_two_decimals() {
        assert_eq!(money(500, "USD"), "5.00 USD");
        assert_eq!(money(7, "EUR"), "0.07 EUR");
        assert_eq!(money(-50, "USD"), "-0.50 USD");
        assert_eq!(money(-1234, "USD"), "-12.34 USD");
        assert_eq!(money(i64::MIN, "USD"), "-92233720368547758.08 USD");
    }

    fn step(kind: StepKind, sku: &str, state: StepState) -> SagaStep {
        SagaStep {
            kind,
            sku: Some(sku.into()),
            qty: Some(2),
            amount_cents: None,
            reason: None,
            state,
            attempts: 1,
            last_error: None,
            last_attempt_at: None,
        }
    }

    #[test]
    fn an_order_holds_what_it_reserved_until_it_is_released_or_shipped() {
        use StepKind::*;
        use StepState::*;
        let held = holdings(&[step(Reserve, "A1", Succeeded), step(Reserve, "B2", Failed)]);
        assert_eq!(
            held,
            [("A1".into(), 2, "held"), ("B2".into(), 2, "not reserved")]
        );
        let released = holdings(&[
            step(Reserve, "A1", Succeeded),
            step(Release, "A1", Succeeded),
        ]);
        assert_eq!(released, [("A1".into(), 2, "released")]);
        let releasing = holdings(&[step(Reserve, "A1", Succeeded), step(Release, "A1", Unknown)]);
        assert_eq!(
            releasing,
            [("A1".into(), 2, "held")],
            "held until the release is known"
        );
        let shipped = holdings(&[
            step(Reserve, "A1", Succeeded),
            step(Deduct, "A1", Succeeded),
        ]);
        assert_eq!(shipped, [("A1".into(), 2, "shipped")]);
    }

    #[test]
    fn a_reserve_given_up_on_is_answered_by_its_resolve() {
        use StepKind::*;
        use StepState::*;
        let refused = |step: SagaStep| SagaStep {
            last_error: Some("no such reservation".into()),
            ..step
        };
        let resolving = holdings(&[
            step(Reserve, "A1", Abandoned),
            step(ResolveReserve, "A1", Unknown),
        ]);
        assert_eq!(resolving, [("A1".into(), 2, "not known yet")]);
        let voided = holdings(&[
            step(Reserve, "A1", Abandoned),
            refused(step(ResolveReserve, "A1", Succeeded)),
            refused(step(Release, "A1", Succeeded)),
        ]);
        assert_eq!(voided, [("A1".into(), 2, "not reserved")]);
        let ran = holdings(&[
            step(Reserve, "A1", Abandoned),
            step(ResolveReserve, "A1", Succeeded),
            step(Release, "A1", Pending),
        ]);
        assert_eq!(
            ran,
            [("A1".into(), 2, "held")],
            "it ran: held until released"
        );
        let released = holdings(&[
            step(Reserve, "A1", Abandoned),
            step(ResolveReserve, "A1", Succeeded),
            step(Release, "A1", Succeeded),
        ]);
        assert_eq!(released, [("A1".into(), 2, "released")]);
    }
}
