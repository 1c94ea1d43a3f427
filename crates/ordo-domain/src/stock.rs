//! The Stock aggregate, one per SKU.
//!
//! `on_hand` is what is in the warehouse, `reserved` what placed orders hold of it, and
//! `available = on_hand - reserved` never goes below zero. Reservations are kept per order so that
//! a release or a deduction moves exactly what that order reserved.
//!
//! A SKU's state is its counts and its open reservations, nothing of its history: an order whose
//! reservation ended leaves no trace here, so a SKU that served a million orders is as small as
//! one that served none. A late copy of a reserve (sent before a compensation, run after it)
//! cannot hold stock for an order that gave up, and that is kept by the reserve's command id,
//! not by this state: an order reserves a SKU under one id, the command service runs an id at
//! most once, and before the saga releases a reservation whose reserve had no answer it sends
//! that reserve again to learn its outcome (`ordo_domain::saga`), so every later copy finds the
//! outcome recorded and does nothing.

use imbl::OrdMap;

use serde::{Deserialize, Serialize};

use crate::{Aggregate, DomainEvent, OrderId, Rejection, Sku};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub on_hand: u64,
    pub reserved: u64,
    /// Quantity held per order that reserved and has not released or shipped yet.
    /// A persistent map: a hot SKU's state is cloned with every command (the cache hands out
    /// copies), and a clone of it shares the tree instead of copying it.
    pub reservations: OrdMap<OrderId, u64>,
}

impl Stock {
    pub fn available(&self) -> u64 {
        self.on_hand - self.reserved
    }

    /// Roughly how many bytes the state takes in memory: what a cache of states weighs. In
    /// constant time (it is weighed at every command): a map entry is its id's heap string (at
    /// most 64 bytes), its header, the count and the tree's share.
    pub fn weight(&self) -> usize {
        const PER_RESERVATION: usize = 160;
        64 + self.reservations.len() * PER_RESERVATION
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockCommand {
    /// Goods arrived: adds to on-hand stock; the first receive creates the SKU.
    Receive { sku: Sku, qty: u64 },
    /// Holds `qty` for an order (the saga's step).
    Reserve {
        sku: Sku,
        order_id: OrderId,
        qty: u64,
    },
    /// Gives back whatever the order holds (the saga's compensation).
    Release { sku: Sku, order_id: OrderId },
    /// The order shipped: its reservation leaves the warehouse.
    Deduct { sku: Sku, order_id: OrderId },
}

impl StockCommand {
    pub fn sku(&self) -> &Sku {
        match self {
            Self::Receive { sku, .. }
            | Self::Reserve { sku, .. }
            | Self::Release { sku, .. }
            | Self::Deduct { sku, .. } => sku,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", deny_unknown_fields)]
pub enum StockEvent {
    StockReceived {
        qty: u64,
    },
    StockReserved {
        order_id: OrderId,
        qty: u64,
    },
    /// `qty` is what the order held (0 in events of earlier builds, whose releases also
    /// closed a barrier).
    StockReleased {
        order_id: OrderId,
        qty: u64,
    },
    StockDeducted {
        order_id: OrderId,
        qty: u64,
    },
}

impl DomainEvent for StockEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::StockReceived { .. } => "StockReceived",
            Self::StockReserved { .. } => "StockReserved",
            Self::StockReleased { .. } => "StockReleased",
            Self::StockDeducted { .. } => "StockDeducted",
        }
    }
}

pub struct StockAggregate;

impl Aggregate for StockAggregate {
    const CATEGORY: &'static str = "stock";
    type State = Option<Stock>;
    type Command = StockCommand;
    type Event = StockEvent;

    fn weight(state: &Option<Stock>) -> usize {
        state.as_ref().map_or(64, Stock::weight)
    }

    fn decide(state: &Option<Stock>, command: &StockCommand) -> Result<StockEvent, Rejection> {
        if let StockCommand::Receive { qty, .. } = command {
            let on_hand = state.as_ref().map_or(0, |stock| stock.on_hand);
            if *qty == 0 {
                return Err(Rejection::Invalid("qty must be greater than 0".into()));
            }
            if on_hand
                .checked_add(*qty)
                .is_none_or(|total| total > crate::MAX_AMOUNT)
            {
                return Err(Rejection::Invalid(format!(
                    "receiving {qty} would overflow the on-hand count of {}",
                    command.sku()
                )));
            }
            return Ok(StockEvent::StockReceived { qty: *qty });
        }
        let Some(stock) = state else {
            return Err(Rejection::NotFound {
                what: "sku",
                id: command.sku().to_string(),
            });
        };
        match command {
            StockCommand::Receive { .. } => unreachable!("handled above"),
            StockCommand::Reserve { sku, order_id, qty } => {
                if *qty == 0 {
                    return Err(Rejection::Invalid("qty must be greater than 0".into()));
                }
                if stock.reservations.contains_key(order_id) {
                    return Err(Rejection::InvalidState(format!(
                        "order {order_id} already holds a reservation on {sku}"
                    )));
                }
                if *qty > stock.available() {
                    return Err(Rejection::InsufficientStock {
                        sku: sku.to_string(),
                        requested: *qty,
                        available: stock.available(),
                    });
                }
                Ok(StockEvent::StockReserved {
                    order_id: order_id.clone(),
                    qty: *qty,
                })
            }
            StockCommand::Release { sku, order_id } => match stock.reservations.get(order_id) {
                Some(qty) => Ok(StockEvent::StockReleased {
                    order_id: order_id.clone(),
                    qty: *qty,
                }),
                None => Err(Rejection::InvalidState(format!(
                    "order {order_id} holds no reservation on {sku} to release"
                ))),
            },
            StockCommand::Deduct { sku, order_id } => match stock.reservations.get(order_id) {
                Some(qty) => Ok(StockEvent::StockDeducted {
                    order_id: order_id.clone(),
                    qty: *qty,
                }),
                None => Err(Rejection::InvalidState(format!(
                    "order {order_id} holds no reservation on {sku} to deduct"
                ))),
            },
        }
    }

    fn evolve(state: Option<Stock>, event: &StockEvent) -> Option<Stock> {
        let mut stock = state.unwrap_or_default();
        match event {
            StockEvent::StockReceived { qty } => stock.on_hand += qty,
            StockEvent::StockReserved { order_id, qty } => {
                stock.reserved += qty;
                stock.reservations.insert(order_id.clone(), *qty);
            }
            StockEvent::StockReleased { order_id, qty } => {
                stock.reserved -= qty;
                stock.reservations.remove(order_id);
            }
            StockEvent::StockDeducted { order_id, qty } => {
                stock.reserved -= qty;
                stock.on_hand -= qty;
                stock.reservations.remove(order_id);
            }
        }
        Some(stock)
    }
}

#[cfg(test)]
mod specification {
    use super::*;
    use crate::spec::given;

    fn sku() -> Sku {
        Sku::parse("A1").unwrap()
    }

    fn order(id: &str) -> OrderId {
        OrderId::parse(id).unwrap()
    }

    fn received(qty: u64) -> StockEvent {
        StockEvent::StockReceived { qty }
    }

    fn reserved(order_id: &str, qty: u64) -> StockEvent {
        StockEvent::StockReserved {
            order_id: order(order_id),
            qty,
        }
    }

    fn released(order_id: &str, qty: u64) -> StockEvent {
        StockEvent::StockReleased {
            order_id: order(order_id),
            qty,
        }
    }

    fn reserve(order_id: &str, qty: u64) -> StockCommand {
        StockCommand::Reserve {
            sku: sku(),
            order_id: order(order_id),
            qty,
        }
    }

    fn release(order_id: &str) -> StockCommand {
        StockCommand::Release {
            sku: sku(),
            order_id: order(order_id),
        }
    }

    fn deduct(order_id: &str) -> StockCommand {
        StockCommand::Deduct {
            sku: sku(),
            order_id: order(order_id),
        }
    }

    fn given_stock(events: Vec<StockEvent>) -> crate::spec::Given<StockAggregate> {
        given::<StockAggregate>(events)
    }

    fn holds_nothing(order_id: &str) -> Rejection {
        Rejection::InvalidState(format!(
            "order {order_id} holds no reservation on A1 to release"
        ))
    }

    #[test]
    fn the_first_receive_creates_the_sku() {
        let stock = given_stock(vec![])
            .when(StockCommand::Receive { sku: sku(), qty: 5 })
            .then(received(5))
            .unwrap();
        assert_eq!(
            (stock.on_hand, stock.reserved, stock.available()),
            (5, 0, 5)
        );
    }

    #[test]
    fn receiving_adds_to_on_hand() {
        let stock = given_stock(vec![received(5)])
            .when(StockCommand::Receive { sku: sku(), qty: 3 })
            .then(received(3))
            .unwrap();
        assert_eq!(stock.on_hand, 8);
    }

    #[test]
    fn receiving_nothing_is_refused() {
        given_stock(vec![])
            .when(StockCommand::Receive { sku: sku(), qty: 0 })
            .then_rejected(Rejection::Invalid("qty must be greater than 0".into()));
    }

    #[test]
    fn receiving_past_the_largest_count_a_view_holds_is_refused() {
        // Sent twice, the largest bigint is accepted once.
        given_stock(vec![received(i64::MAX as u64)])
            .when(StockCommand::Receive {
                sku: sku(),
                qty: i64::MAX as u64,
            })
            .then_rejected(Rejection::Invalid(format!(
                "receiving {} would overflow the on-hand count of A1",
                i64::MAX
            )));
        given_stock(vec![received(i64::MAX as u64)])
            .when(StockCommand::Receive { sku: sku(), qty: 1 })
            .then_rejected(Rejection::Invalid(
                "receiving 1 would overflow the on-hand count of A1".into(),
            ));
    }

    #[test]
    fn commands_on_an_unknown_sku_are_not_found() {
        for command in [reserve("o-1", 1), release("o-1"), deduct("o-1")] {
            given_stock(vec![])
                .when(command)
                .then_rejected(Rejection::NotFound {
                    what: "sku",
                    id: "A1".into(),
                });
        }
    }

    #[test]
    fn reserving_holds_stock_for_the_order() {
        let stock = given_stock(vec![received(5)])
            .when(reserve("o-1", 2))
            .then(reserved("o-1", 2))
            .unwrap();
        assert_eq!(
            (stock.on_hand, stock.reserved, stock.available()),
            (5, 2, 3)
        );
    }

    #[test]
    fn reserving_exactly_what_is_available_succeeds() {
        given_stock(vec![received(5), reserved("o-1", 2)])
            .when(reserve("o-2", 3))
            .then(reserved("o-2", 3));
    }

    #[test]
    fn reserving_more_than_is_available_is_refused() {
        given_stock(vec![received(5), reserved("o-1", 2)])
            .when(reserve("o-2", 4))
            .then_rejected(Rejection::InsufficientStock {
                sku: "A1".into(),
                requested: 4,
                available: 3,
            });
    }

    #[test]
    fn reserving_nothing_is_refused() {
        given_stock(vec![received(5)])
            .when(reserve("o-1", 0))
            .then_rejected(Rejection::Invalid("qty must be greater than 0".into()));
    }

    #[test]
    fn an_order_reserves_a_sku_once() {
        given_stock(vec![received(5), reserved("o-1", 1)])
            .when(reserve("o-1", 1))
            .then_rejected(Rejection::InvalidState(
                "order o-1 already holds a reservation on A1".into(),
            ));
    }

    #[test]
    fn releasing_gives_back_what_the_order_held() {
        let stock = given_stock(vec![received(5), reserved("o-1", 2)])
            .when(release("o-1"))
            .then(released("o-1", 2))
            .unwrap();
        assert_eq!(
            (stock.on_hand, stock.reserved, stock.available()),
            (5, 0, 5)
        );
    }

    #[test]
    fn releasing_a_reservation_that_was_never_made_is_refused_and_changes_nothing() {
        given_stock(vec![received(5)])
            .when(release("o-1"))
            .then_rejected(holds_nothing("o-1"));
    }

    #[test]
    fn a_reservation_is_released_once() {
        given_stock(vec![received(5), reserved("o-1", 2), released("o-1", 2)])
            .when(release("o-1"))
            .then_rejected(holds_nothing("o-1"));
    }

    #[test]
    fn a_release_written_by_an_earlier_build_as_a_barrier_still_folds() {
        let stock = given_stock(vec![received(5), released("o-1", 0)])
            .when(reserve("o-2", 5))
            .then(reserved("o-2", 5))
            .unwrap();
        assert_eq!((stock.on_hand, stock.reserved), (5, 5));
    }

    #[test]
    fn a_skus_state_holds_its_open_reservations_not_its_history() {
        let mut events = vec![received(1_000_000)];
        for i in 0..10_000 {
            let order_id = format!("o-{i}");
            events.push(reserved(&order_id, 1));
            events.push(if i % 2 == 0 {
                released(&order_id, 1)
            } else {
                StockEvent::StockDeducted {
                    order_id: order(&order_id),
                    qty: 1,
                }
            });
        }
        events.push(reserved("open", 3));
        let given = given_stock(events);
        let stock = given.state().as_ref().unwrap();
        assert_eq!(stock.reservations.len(), 1);
        let serialized = serde_json::to_vec(stock).unwrap();
        assert!(serialized.len() < 100, "{} bytes", serialized.len());
    }

    #[test]
    fn shipping_deducts_the_reservation_from_on_hand() {
        let stock = given_stock(vec![received(5), reserved("o-1", 2)])
            .when(deduct("o-1"))
            .then(StockEvent::StockDeducted {
                order_id: order("o-1"),
                qty: 2,
            })
            .unwrap();
        assert_eq!(
            (stock.on_hand, stock.reserved, stock.available()),
            (3, 0, 3)
        );
    }

    #[test]
    fn deducting_needs_a_reservation() {
        given_stock(vec![received(5)])
            .when(deduct("o-1"))
            .then_rejected(Rejection::InvalidState(
                "order o-1 holds no reservation on A1 to deduct".into(),
            ));
    }

    #[test]
    fn a_shipped_reservation_cannot_be_released() {
        given_stock(vec![
            received(5),
            reserved("o-1", 2),
            StockEvent::StockDeducted {
                order_id: order("o-1"),
                qty: 2,
            },
        ])
        .when(release("o-1"))
        .then_rejected(holds_nothing("o-1"));
    }

    #[test]
    fn reserved_never_exceeds_on_hand_whatever_the_order_of_commands() {
        // A small exhaustive walk: every sequence of up to 6 commands over 3 orders.
        let commands: Vec<StockCommand> = ["o-1", "o-2", "o-3"]
            .iter()
            .flat_map(|o| [reserve(o, 2), release(o), deduct(o)])
            .chain([StockCommand::Receive { sku: sku(), qty: 3 }])
            .collect();
        fn walk(state: Option<Stock>, depth: usize, commands: &[StockCommand]) {
            if let Some(stock) = &state {
                assert!(stock.reserved <= stock.on_hand, "{stock:?}");
                assert_eq!(stock.reserved, stock.reservations.values().sum::<u64>());
            }
            if depth == 0 {
                return;
            }
            for command in commands {
                if let Ok(event) = StockAggregate::decide(&state, command) {
                    walk(
                        StockAggregate::evolve(state.clone(), &event),
                        depth - 1,
                        commands,
                    );
                }
            }
        }
        walk(None, 6, &commands);
    }
}
