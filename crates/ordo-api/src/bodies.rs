//! What the API answers, as types: the handlers return these, and the OpenAPI document
//! (`GET /openapi.json`, `contracts/openapi.json`) is generated from the same types, so the two
//! cannot drift apart. Those that are rows of a view read straight from their columns
//! (`FromRow`).
//!
//! A field that may be null is always sent (as null): the document marks it required.
//!
//! The closed sets (statuses, states, kinds) mirror the domain's rather than reuse them: they are
//! this API's published contract, and the pure domain carries no OpenAPI. A test holds each to
//! the domain's values.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

/// A closed set read from a text column by its JSON name: a value this build does not know (a
/// newer build's, during a rolling upgrade) fails the read rather than being guessed.
macro_rules! read_from_text_column {
    ($($closed_set:ty),*) => {$(
        impl TryFrom<String> for $closed_set {
            type Error = serde_json::Error;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                serde_json::from_value(serde_json::Value::String(value))
            }
        }
    )*};
}

read_from_text_column!(OrderStatus, SagaState, NotificationStatus);

/// An order as the orders view holds it.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    #[sqlx(try_from = "String")]
    pub status: OrderStatus,
    /// ISO 4217 code of every price in the order.
    pub currency: String,
    pub total_cents: i64,
    /// Why the order was rejected or cancelled.
    #[schema(required)]
    pub reason: Option<String>,
    // Read apart, from `order_lines`.
    #[sqlx(skip)]
    pub lines: Vec<OrderLine>,
    /// The order's version: how many of its events the view applied.
    pub version: i64,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The stream sequence of the last event applied to this row.
    pub last_seq: i64,
    /// The order's events the projector could not apply: when not 0, the row is behind its
    /// stream (`GET /projections` says why).
    pub parked_events: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
    Shipped,
}

impl OrderStatus {
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Confirmed,
        Self::Rejected,
        Self::Cancelled,
        Self::Shipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
            Self::Shipped => "shipped",
        }
    }

    pub fn parse(status: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|known| known.as_str() == status)
    }
}

#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct OrderLine {
    pub sku: String,
    pub qty: i64,
    pub unit_price_cents: i64,
}

/// A page of orders in the order they were placed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderPage {
    pub orders: Vec<Order>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(required)]
    pub next_cursor: Option<String>,
}

/// An order's events as its stream holds them, each with the order's state right after it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderHistory {
    pub order_id: String,
    /// Oldest first; with `at_seq`, none after it.
    pub events: Vec<HistoryEvent>,
    /// True when the order has more events than the at most 200 shown.
    pub more: bool,
}

/// One stored event of an order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HistoryEvent {
    /// The stream sequence.
    pub seq: u64,
    /// 1 for the order's first event, then +1 per event.
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema: u32,
    pub at: DateTime<Utc>,
    /// The command that wrote it (its `command_id`, or the saga's id for its step).
    pub command_id: String,
    pub correlation_id: String,
    #[schema(required)]
    pub causation_id: Option<String>,
    /// The W3C trace id of the command that wrote it, if it was traced.
    #[schema(required)]
    pub trace_id: Option<String>,
    /// The event's data, as stored.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// The order right after this event, folded from its events by the domain's own rules.
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

/// `?at_seq=` of an order's history.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// Only the events up to this stream sequence: the last one's `state` is the order as it
    /// was then.
    pub at_seq: Option<u64>,
}

/// A SKU's stock as the stock view holds it.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct Stock {
    pub sku: String,
    pub on_hand: i64,
    /// Held for orders not confirmed yet, or confirmed and not shipped.
    pub reserved: i64,
    /// `on_hand - reserved`: what a new order can reserve.
    pub available: i64,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
    pub last_seq: i64,
    /// Not 0: events of this SKU could not be applied; the row is behind.
    pub parked_events: i64,
}

/// An order's saga: its steps, their attempts and outcomes.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct Saga {
    pub order_id: String,
    #[sqlx(try_from = "String")]
    pub state: SagaState,
    #[sqlx(json)]
    pub steps: Vec<SagaStep>,
    /// Why the order was rejected or the saga is stuck.
    #[schema(required)]
    pub reason: Option<String>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the saga gives up on reserving and authorising, while it still may.
    #[schema(required)]
    pub deadline_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    Running,
    Compensating,
    Confirmed,
    Rejected,
    Cancelling,
    Cancelled,
    Shipping,
    Shipped,
    /// A compensation has had no answer for a while: it keeps being retried, and shows here
    /// for an operator to look at (`ordo sagas retry`).
    CompensationStuck,
}

/// One step of a saga's plan, as the coordinator stored it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SagaStep {
    pub kind: StepKind,
    /// The SKU of a reserve, release or deduct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    /// The quantity of a reserve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qty: Option<u64>,
    /// The amount of an authorisation or a refund.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_cents: Option<u64>,
    /// The reason of a reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub state: StepState,
    pub attempts: u32,
    #[schema(required)]
    pub last_error: Option<String>,
    #[serde(default)]
    #[schema(required)]
    pub last_attempt_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Reserve,
    /// A reserve asked again to be voided if it has not run, before its release.
    ResolveReserve,
    Authorize,
    Confirm,
    Release,
    Refund,
    Reject,
    Deduct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Succeeded,
    Failed,
    /// Tried, with no answer: it may have happened.
    Unknown,
    /// Dropped from the plan before it ran.
    Skipped,
    /// Given up on while its outcome was unknown: it is undone.
    Abandoned,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Notifications {
    /// At most 500, oldest first.
    pub notifications: Vec<Notification>,
}

/// A customer notification and how its delivery went.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct Notification {
    pub order_id: String,
    /// The order event it tells of (`confirmed`, `rejected`, `cancelled`, `shipped`).
    pub kind: String,
    pub customer_id: String,
    #[sqlx(try_from = "String")]
    pub status: NotificationStatus,
    pub attempts: i32,
    #[schema(required)]
    pub last_error: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotificationStatus {
    Pending,
    Sent,
    /// Given up after its attempts: `ordo notifications redeliver` sends it again.
    DeadLettered,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Projections {
    pub projections: Vec<ProjectionStatus>,
}

/// How far a view is behind its stream, and what it could not apply.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProjectionStatus {
    pub name: String,
    pub stream: String,
    /// The lowest checkpoint of its partitions: every event up to it is applied.
    pub checkpoint: u64,
    /// The stream's last sequence; null when JetStream did not answer.
    #[schema(required)]
    pub stream_head: Option<u64>,
    /// `stream_head - checkpoint`; null when the head is unknown.
    #[schema(required)]
    pub lag: Option<u64>,
    pub partitions: Vec<PartitionStatus>,
    /// How many events are parked.
    pub parked: usize,
    /// The first parked events by sequence, 100 at most (`parked` counts them all).
    pub parked_events: Vec<ParkedEvent>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartitionStatus {
    pub partition: u32,
    pub checkpoint: u64,
    #[schema(required)]
    pub lag: Option<u64>,
}

/// An event the projector could not apply, and why.
#[derive(Debug, Clone, Serialize, ToSchema, FromRow)]
pub struct ParkedEvent {
    pub seq: i64,
    pub subject: String,
    #[schema(required)]
    pub event_type: Option<String>,
    pub reason: String,
    pub attempts: i32,
    pub parked_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process answers.
    pub status: String,
}

/// Whether the API can serve reads, check by check.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// `ok`, or why not.
    pub checks: ReadinessChecks,
    /// Each stream of this deployment: `ok`, `missing`, or how it differs from its definition
    /// (not a reason to be unready: `ordo streams apply` changes it). Empty while NATS is down.
    pub streams: std::collections::BTreeMap<String, String>,
    /// Events a worker holds back because it cannot read them, by consumer.
    pub unreadable_events: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadinessChecks {
    pub postgres: String,
    pub nats: String,
}

/// Every error: `{"error": {"code", "message"}}`, with the status that goes with the code.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// With `not_caught_up`: the checkpoint the view had reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
    /// With a shed read (503 with `Retry-After`): when to try again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400
    InvalidQuery,
    /// 401
    Unauthorized,
    /// 404
    NotFound,
    /// 503: PostgreSQL or NATS does not answer, or too many reads are in flight.
    Unavailable,
    /// 504: the view did not reach `min_seq` in time.
    NotCaughtUp,
    /// 500: a row this build cannot read (a newer build wrote it, during a rolling upgrade).
    Internal,
}

/// `?min_seq=` of a read of one order or SKU.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Wait (up to 5 s) until the view has applied this stream sequence (a command's `seq`)
    /// for this aggregate's partition; 504 if it does not in time.
    pub min_seq: Option<u64>,
}

/// The filters and paging of `GET /orders`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    pub customer_id: Option<String>,
    #[param(value_type = Option<OrderStatus>)]
    pub status: Option<String>,
    /// 1 to 500; 50 when not given.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// `next_cursor` of the page before.
    pub cursor: Option<String>,
    /// Wait (up to 5 s) until every partition of the view has applied this stream sequence.
    pub min_seq: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NotificationParams {
    pub order_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ordo_domain::{order, saga};

    /// Each closed set of the API reads the value the domain writes for each of the domain's
    /// variants, under the same name. The matches are exhaustive: a variant added to the domain
    /// does not compile here until the API has it too.
    #[test]
    fn the_closed_sets_are_the_domains() {
        fn same_name<T: Serialize>(api: T, domain: impl Serialize) {
            assert_eq!(
                serde_json::to_value(api).unwrap(),
                serde_json::to_value(domain).unwrap()
            );
        }
        let order_status = |status| match status {
            order::OrderStatus::Pending => OrderStatus::Pending,
            order::OrderStatus::Confirmed => OrderStatus::Confirmed,
            order::OrderStatus::Rejected => OrderStatus::Rejected,
            order::OrderStatus::Cancelled => OrderStatus::Cancelled,
            order::OrderStatus::Shipped => OrderStatus::Shipped,
        };
        for status in OrderStatus::ALL {
            let domain: order::OrderStatus =
                serde_json::from_value(status.as_str().into()).unwrap();
            assert_eq!(order_status(domain), status);
            same_name(status, domain);
        }
        let saga_state = |state| match state {
            saga::SagaState::Running => SagaState::Running,
            saga::SagaState::Compensating => SagaState::Compensating,
            saga::SagaState::Confirmed => SagaState::Confirmed,
            saga::SagaState::Rejected => SagaState::Rejected,
            saga::SagaState::Cancelling => SagaState::Cancelling,
            saga::SagaState::Cancelled => SagaState::Cancelled,
            saga::SagaState::Shipping => SagaState::Shipping,
            saga::SagaState::Shipped => SagaState::Shipped,
            saga::SagaState::CompensationStuck => SagaState::CompensationStuck,
        };
        for state in saga::SagaState::ALL {
            same_name(saga_state(state), state.as_str());
            assert_eq!(
                SagaState::try_from(state.as_str().to_owned()).unwrap(),
                saga_state(state)
            );
        }
        let step_state = |state| match state {
            saga::StepState::Pending => StepState::Pending,
            saga::StepState::Succeeded => StepState::Succeeded,
            saga::StepState::Failed => StepState::Failed,
            saga::StepState::Unknown => StepState::Unknown,
            saga::StepState::Skipped => StepState::Skipped,
            saga::StepState::Abandoned => StepState::Abandoned,
        };
        for state in [
            saga::StepState::Pending,
            saga::StepState::Succeeded,
            saga::StepState::Failed,
            saga::StepState::Unknown,
            saga::StepState::Skipped,
            saga::StepState::Abandoned,
        ] {
            same_name(step_state(state), state);
        }
        // A step as the coordinator stores it (its kind's fields, then how it went) is read, for
        // every kind: the match says which of the examples below is of which kind, and does not
        // compile once the domain has a kind more.
        let sku = ordo_domain::Sku::parse("A1").unwrap();
        let example_of = |step: &saga::Step| match step {
            saga::Step::Reserve { .. } => 0,
            saga::Step::ResolveReserve { .. } => 1,
            saga::Step::Authorize { .. } => 2,
            saga::Step::Confirm => 3,
            saga::Step::Release { .. } => 4,
            saga::Step::Refund { .. } => 5,
            saga::Step::Reject { .. } => 6,
            saga::Step::Deduct { .. } => 7,
        };
        let steps = [
            saga::Step::Reserve {
                sku: sku.clone(),
                qty: 2,
            },
            saga::Step::ResolveReserve {
                sku: sku.clone(),
                qty: 2,
            },
            saga::Step::Authorize { amount_cents: 500 },
            saga::Step::Confirm,
            saga::Step::Release { sku: sku.clone() },
            saga::Step::Refund { amount_cents: 500 },
            saga::Step::Reject {
                reason: "out of stock".into(),
            },
            saga::Step::Deduct { sku: sku.clone() },
        ];
        let examples: Vec<usize> = steps.iter().map(example_of).collect();
        assert_eq!(
            examples,
            (0..8).collect::<Vec<_>>(),
            "one example of each kind"
        );
        for step in steps {
            let mut stored = serde_json::to_value(&step).unwrap();
            stored["state"] = "succeeded".into();
            stored["attempts"] = 1.into();
            stored["last_error"] = serde_json::Value::Null;
            stored["last_attempt_at"] = serde_json::Value::Null;
            let read: SagaStep = serde_json::from_value(stored.clone()).unwrap();
            same_name(read.kind, step.kind());
            assert_eq!(serde_json::to_value(&read).unwrap(), stored);
        }
        assert_eq!(
            NotificationStatus::try_from("dead_lettered".to_owned()).unwrap(),
            NotificationStatus::DeadLettered
        );
        assert!(OrderStatus::try_from("lost".to_owned()).is_err());
    }
}
