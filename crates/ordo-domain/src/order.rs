//! The Order aggregate.
//!
//! ```text
//! (new) --place--> pending --confirm--> confirmed --ship--> shipped
//!                     |                     |
//!                     +--reject--> rejected |
//!                     +--cancel--> cancelled <--cancel--+
//! ```
//! `confirm` and `reject` are the saga's commands; `place`, `cancel` and `ship` are the customer's.

use serde::{Deserialize, Serialize};

use crate::{Aggregate, Currency, CustomerId, DomainEvent, OrderId, Rejection, Sku};

/// The most lines one order may have; keeps one order within one message.
pub const MAX_LINES: usize = 100;

/// The longest reason (bytes of UTF-8) an order keeps for its rejection or cancellation.
pub const MAX_REASON_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    pub sku: Sku,
    pub qty: u32,
    pub unit_price_cents: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
    Shipped,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
            Self::Shipped => "shipped",
        }
    }
}

/// A placed order. Before `OrderPlaced` there is no order: the state is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub customer_id: CustomerId,
    pub lines: Vec<OrderLine>,
    pub currency: Currency,
    pub total_cents: u64,
    pub status: OrderStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place {
        order_id: OrderId,
        customer_id: CustomerId,
        lines: Vec<OrderLine>,
        currency: Currency,
    },
    Confirm {
        order_id: OrderId,
    },
    Reject {
        order_id: OrderId,
        reason: String,
    },
    Cancel {
        order_id: OrderId,
        reason: Option<String>,
    },
    Ship {
        order_id: OrderId,
    },
}

impl OrderCommand {
    pub fn order_id(&self) -> &OrderId {
        match self {
            Self::Place { order_id, .. }
            | Self::Confirm { order_id }
            | Self::Reject { order_id, .. }
            | Self::Cancel { order_id, .. }
            | Self::Ship { order_id } => order_id,
        }
    }
}

/// The stored facts of an order. The envelope carries the order id; `data` carries the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", deny_unknown_fields)]
pub enum OrderEvent {
    OrderPlaced {
        customer_id: CustomerId,
        lines: Vec<OrderLine>,
        currency: Currency,
        total_cents: u64,
    },
    OrderConfirmed {},
    OrderRejected {
        reason: String,
    },
    OrderCancelled {
        reason: Option<String>,
    },
    OrderShipped {},
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::OrderPlaced { .. } => "OrderPlaced",
            Self::OrderConfirmed {} => "OrderConfirmed",
            Self::OrderRejected { .. } => "OrderRejected",
            Self::OrderCancelled { .. } => "OrderCancelled",
            Self::OrderShipped {} => "OrderShipped",
        }
    }
}

pub struct OrderAggregate;

impl Aggregate for OrderAggregate {
    const CATEGORY: &'static str = "order";
    type State = Option<Order>;
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn weight(state: &Option<Order>) -> usize {
        // The struct and its ids, then each line with its SKU.
        state
            .as_ref()
            .map_or(64, |order| 160 + order.lines.len() * 96)
    }

    fn decide(state: &Option<Order>, command: &OrderCommand) -> Result<OrderEvent, Rejection> {
        use OrderStatus::*;
        let Some(order) = state else {
            return match command {
                OrderCommand::Place {
                    customer_id,
                    lines,
                    currency,
                    ..
                } => Ok(OrderEvent::OrderPlaced {
                    customer_id: customer_id.clone(),
                    total_cents: validate_lines(lines)?,
                    lines: lines.clone(),
                    currency: currency.clone(),
                }),
                other => Err(Rejection::NotFound {
                    what: "order",
                    id: other.order_id().to_string(),
                }),
            };
        };
        let refuse = |action: &str| {
            Err(Rejection::InvalidState(format!(
                "order {} is {} and cannot be {action}",
                command.order_id(),
                order.status.as_str()
            )))
        };
        match (command, order.status) {
            (OrderCommand::Place { order_id, .. }, _) => Err(Rejection::InvalidState(format!(
                "order {order_id} already exists"
            ))),
            (OrderCommand::Confirm { .. }, Pending) => Ok(OrderEvent::OrderConfirmed {}),
            (OrderCommand::Confirm { .. }, _) => refuse("confirmed"),
            (OrderCommand::Reject { reason, .. }, Pending) => Ok(OrderEvent::OrderRejected {
                reason: reason.clone(),
            }),
            (OrderCommand::Reject { .. }, _) => refuse("rejected"),
            (OrderCommand::Cancel { reason, .. }, Pending | Confirmed) => {
                Ok(OrderEvent::OrderCancelled {
                    reason: reason.clone(),
                })
            }
            (OrderCommand::Cancel { .. }, _) => refuse("cancelled"),
            (OrderCommand::Ship { .. }, Confirmed) => Ok(OrderEvent::OrderShipped {}),
            (OrderCommand::Ship { .. }, _) => refuse("shipped"),
        }
    }

    fn evolve(state: Option<Order>, event: &OrderEvent) -> Option<Order> {
        let with_status = |status| {
            state.clone().map(|mut order| {
                order.status = status;
                order
            })
        };
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                lines,
                currency,
                total_cents,
            } => Some(Order {
                customer_id: customer_id.clone(),
                lines: lines.clone(),
                currency: currency.clone(),
                total_cents: *total_cents,
                status: OrderStatus::Pending,
            }),
            OrderEvent::OrderConfirmed {} => with_status(OrderStatus::Confirmed),
            OrderEvent::OrderRejected { .. } => with_status(OrderStatus::Rejected),
            OrderEvent::OrderCancelled { .. } => with_status(OrderStatus::Cancelled),
            OrderEvent::OrderShipped {} => with_status(OrderStatus::Shipped),
        }
    }
}

/// Checks the business rules of an order's lines and returns its total in cents.
fn validate_lines(lines: &[OrderLine]) -> Result<u64, Rejection> {
    if lines.is_empty() {
        return Err(Rejection::Invalid(
            "an order needs at least one line".into(),
        ));
    }
    if lines.len() > MAX_LINES {
        return Err(Rejection::Invalid(format!(
            "an order has at most {MAX_LINES} lines, this one has {}",
            lines.len()
        )));
    }
    let mut total: u64 = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.qty == 0 {
            return Err(Rejection::Invalid(format!(
                "line {i} ({}): qty must be greater than 0",
                line.sku
            )));
        }
        if lines[..i].iter().any(|earlier| earlier.sku == line.sku) {
            return Err(Rejection::Invalid(format!(
                "sku {} appears on more than one line; put its whole quantity on one line",
                line.sku
            )));
        }
        total = u64::from(line.qty)
            .checked_mul(line.unit_price_cents)
            .and_then(|amount| total.checked_add(amount))
            .filter(|total| *total <= crate::MAX_AMOUNT)
            .ok_or_else(|| {
                Rejection::Invalid(format!(
                    "the order total is too large (at most {} cents)",
                    crate::MAX_AMOUNT
                ))
            })?;
    }
    Ok(total)
}

#[cfg(test)]
mod specification {
    use super::*;
    use crate::spec::given;

    fn id() -> OrderId {
        OrderId::parse("o-1").unwrap()
    }

    fn line(sku: &str, qty: u32, unit_price_cents: u64) -> OrderLine {
        OrderLine {
            sku: Sku::parse(sku).unwrap(),
            qty,
            unit_price_cents,
        }
    }

    fn place(lines: Vec<OrderLine>) -> OrderCommand {
        OrderCommand::Place {
            order_id: id(),
            customer_id: CustomerId::parse("c-1").unwrap(),
            lines,
            currency: Currency::default(),
        }
    }

    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            customer_id: CustomerId::parse("c-1").unwrap(),
            lines: vec![line("A1", 2, 500), line("B2", 1, 250)],
            currency: Currency::default(),
            total_cents: 1250,
        }
    }

    fn given_order(events: Vec<OrderEvent>) -> crate::spec::Given<OrderAggregate> {
        given::<OrderAggregate>(events)
    }

    fn invalid_state(status: &str, action: &str) -> Rejection {
        Rejection::InvalidState(format!("order o-1 is {status} and cannot be {action}"))
    }

    #[test]
    fn placing_a_new_order_records_its_lines_and_total() {
        let state = given_order(vec![])
            .when(place(vec![line("A1", 2, 500), line("B2", 1, 250)]))
            .then(placed());
        assert_eq!(state.unwrap().status, OrderStatus::Pending);
    }

    #[test]
    fn placing_an_order_that_exists_is_refused() {
        given_order(vec![placed()])
            .when(place(vec![line("A1", 1, 1)]))
            .then_rejected(Rejection::InvalidState("order o-1 already exists".into()));
    }

    #[test]
    fn an_order_needs_at_least_one_line() {
        given_order(vec![])
            .when(place(vec![]))
            .then_rejected(Rejection::Invalid(
                "an order needs at least one line".into(),
            ));
    }

    #[test]
    fn every_line_needs_a_positive_quantity() {
        given_order(vec![])
            .when(place(vec![line("A1", 0, 500)]))
            .then_rejected(Rejection::Invalid(
                "line 0 (A1): qty must be greater than 0".into(),
            ));
    }

    #[test]
    fn a_sku_appears_on_one_line_only() {
        given_order(vec![])
            .when(place(vec![line("A1", 1, 500), line("A1", 2, 500)]))
            .then_rejected(Rejection::Invalid(
                "sku A1 appears on more than one line; put its whole quantity on one line".into(),
            ));
    }

    #[test]
    fn an_order_has_at_most_100_lines() {
        let lines = (0..=MAX_LINES)
            .map(|i| line(&format!("S{i}"), 1, 1))
            .collect();
        given_order(vec![])
            .when(place(lines))
            .then_rejected(Rejection::Invalid(
                "an order has at most 100 lines, this one has 101".into(),
            ));
    }

    #[test]
    fn a_total_that_no_view_could_hold_is_refused() {
        let too_large = || {
            Rejection::Invalid(format!(
                "the order total is too large (at most {} cents)",
                i64::MAX
            ))
        };
        given_order(vec![])
            .when(place(vec![line("A1", u32::MAX, u64::MAX)]))
            .then_rejected(too_large());
        // Fits a u64, not a bigint.
        given_order(vec![])
            .when(place(vec![line("A1", 2, i64::MAX as u64)]))
            .then_rejected(too_large());
        given_order(vec![])
            .when(place(vec![line("A1", 1, i64::MAX as u64)]))
            .then(OrderEvent::OrderPlaced {
                customer_id: CustomerId::parse("c-1").unwrap(),
                lines: vec![line("A1", 1, i64::MAX as u64)],
                currency: Currency::default(),
                total_cents: i64::MAX as u64,
            });
    }

    #[test]
    fn commands_on_an_order_that_was_never_placed_are_not_found() {
        let not_found = || Rejection::NotFound {
            what: "order",
            id: "o-1".into(),
        };
        for command in [
            OrderCommand::Confirm { order_id: id() },
            OrderCommand::Reject {
                order_id: id(),
                reason: "x".into(),
            },
            OrderCommand::Cancel {
                order_id: id(),
                reason: None,
            },
            OrderCommand::Ship { order_id: id() },
        ] {
            given_order(vec![]).when(command).then_rejected(not_found());
        }
    }

    #[test]
    fn a_pending_order_is_confirmed() {
        let state = given_order(vec![placed()])
            .when(OrderCommand::Confirm { order_id: id() })
            .then(OrderEvent::OrderConfirmed {});
        assert_eq!(state.unwrap().status, OrderStatus::Confirmed);
    }

    #[test]
    fn only_a_pending_order_is_confirmed() {
        for (history, status) in [
            (vec![placed(), OrderEvent::OrderConfirmed {}], "confirmed"),
            (
                vec![placed(), OrderEvent::OrderRejected { reason: "x".into() }],
                "rejected",
            ),
            (
                vec![placed(), OrderEvent::OrderCancelled { reason: None }],
                "cancelled",
            ),
        ] {
            given_order(history)
                .when(OrderCommand::Confirm { order_id: id() })
                .then_rejected(invalid_state(status, "confirmed"));
        }
    }

    #[test]
    fn a_pending_order_is_rejected_with_its_reason() {
        let state = given_order(vec![placed()])
            .when(OrderCommand::Reject {
                order_id: id(),
                reason: "insufficient_stock".into(),
            })
            .then(OrderEvent::OrderRejected {
                reason: "insufficient_stock".into(),
            });
        assert_eq!(state.unwrap().status, OrderStatus::Rejected);
    }

    #[test]
    fn a_confirmed_order_cannot_be_rejected() {
        given_order(vec![placed(), OrderEvent::OrderConfirmed {}])
            .when(OrderCommand::Reject {
                order_id: id(),
                reason: "late".into(),
            })
            .then_rejected(invalid_state("confirmed", "rejected"));
    }

    #[test]
    fn pending_and_confirmed_orders_can_be_cancelled() {
        for history in [
            vec![placed()],
            vec![placed(), OrderEvent::OrderConfirmed {}],
        ] {
            let state = given_order(history)
                .when(OrderCommand::Cancel {
                    order_id: id(),
                    reason: Some("changed my mind".into()),
                })
                .then(OrderEvent::OrderCancelled {
                    reason: Some("changed my mind".into()),
                });
            assert_eq!(state.unwrap().status, OrderStatus::Cancelled);
        }
    }

    #[test]
    fn shipped_rejected_and_cancelled_orders_cannot_be_cancelled() {
        for (last, status) in [
            (OrderEvent::OrderShipped {}, "shipped"),
            (OrderEvent::OrderRejected { reason: "x".into() }, "rejected"),
            (OrderEvent::OrderCancelled { reason: None }, "cancelled"),
        ] {
            given_order(vec![placed(), OrderEvent::OrderConfirmed {}, last])
                .when(OrderCommand::Cancel {
                    order_id: id(),
                    reason: None,
                })
                .then_rejected(invalid_state(status, "cancelled"));
        }
    }

    #[test]
    fn a_confirmed_order_is_shipped() {
        let state = given_order(vec![placed(), OrderEvent::OrderConfirmed {}])
            .when(OrderCommand::Ship { order_id: id() })
            .then(OrderEvent::OrderShipped {});
        assert_eq!(state.unwrap().status, OrderStatus::Shipped);
    }

    #[test]
    fn only_a_confirmed_order_is_shipped() {
        for (history, status) in [
            (vec![placed()], "pending"),
            (
                vec![
                    placed(),
                    OrderEvent::OrderConfirmed {},
                    OrderEvent::OrderShipped {},
                ],
                "shipped",
            ),
            (
                vec![placed(), OrderEvent::OrderCancelled { reason: None }],
                "cancelled",
            ),
        ] {
            given_order(history)
                .when(OrderCommand::Ship { order_id: id() })
                .then_rejected(invalid_state(status, "shipped"));
        }
    }

    #[test]
    fn events_are_stored_as_type_and_data() {
        let json = serde_json::to_value(OrderEvent::OrderRejected {
            reason: "timeout".into(),
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "OrderRejected", "data": {"reason": "timeout"}})
        );
        let back: OrderEvent =
            serde_json::from_value(serde_json::to_value(placed()).unwrap()).unwrap();
        assert_eq!(back, placed());
    }
}
