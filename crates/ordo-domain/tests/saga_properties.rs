//! Property: whatever the participants answer, whatever replies are lost, however often the
//! coordinator times out, and whenever the customer cancels or ships, a saga that is driven
//! until the outage ends leaves the saga, the order, the stock it holds and the payment in
//! agreement (the chaos checker's `saga_order_stock_payment_agree`).
//!
//! The world is a small model of the participants with their real rules: the stock (which
//! keeps no history of settled orders), the payment's refund barrier, the order's state
//! machine, and deduplication by command id (a step sent again returns its first answer). A
//! step can also be delayed: sent, then run at some later point (a request that waited in a
//! stalled command service), after whatever the saga did meanwhile.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::Utc;
use ordo_domain::{
    CustomerId, OrderId, Sku,
    order::OrderLine,
    saga::{Outcome, Saga, SagaState, Step},
};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Cancelled,
    Shipped,
}

/// What happens to the next step the coordinator runs, or from outside.
#[derive(Debug, Clone)]
enum Fault {
    /// The step runs and its answer arrives.
    Answered,
    /// The step runs, its answer is lost.
    ReplyLost,
    /// The step never reaches the participant (no responders, server down).
    NotDelivered,
    /// The step runs, and the coordinator dies before it records anything.
    CoordinatorDies,
    /// The step is sent and waits somewhere; it runs later (see `DelayedStepRuns`), and its
    /// answer never reaches the coordinator.
    Delayed,
    /// The oldest delayed step runs now.
    DelayedStepRuns,
    /// The step reaches the participant, who has no stock / declines (if it can).
    Refused,
    /// The saga's deadline fires.
    Deadline,
    /// The customer cancels (if the order allows it); the saga hears of it later.
    CustomerCancels,
    /// The customer ships (if the order allows it); the saga hears of it later.
    CustomerShips,
    /// The saga takes in the oldest order event it has not seen.
    IntakeDelivers,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        4 => Just(Fault::Answered),
        2 => Just(Fault::ReplyLost),
        2 => Just(Fault::NotDelivered),
        1 => Just(Fault::CoordinatorDies),
        1 => Just(Fault::Delayed),
        1 => Just(Fault::DelayedStepRuns),
        1 => Just(Fault::Refused),
        1 => Just(Fault::Deadline),
        1 => Just(Fault::CustomerCancels),
        1 => Just(Fault::CustomerShips),
        2 => Just(Fault::IntakeDelivers),
    ]
}

#[derive(Debug, Default)]
struct World {
    order: Option<OrderStatus>,
    held: BTreeMap<Sku, u64>,
    deducted: BTreeMap<Sku, u64>,
    charged: bool,
    refunded: bool,
    /// Answers already given per command id: a repeat returns the first.
    answered: HashMap<String, Outcome>,
    /// Order events the saga has not taken in yet.
    undelivered: VecDeque<OrderStatus>,
    /// Steps sent that have not run yet.
    delayed: VecDeque<(String, Step)>,
}

impl World {
    /// The participant handles `step` sent with `command_id`.
    fn handle(&mut self, command_id: &str, step: &Step, refuse: bool) -> Outcome {
        if let Some(first) = self.answered.get(command_id) {
            return first.clone();
        }
        let outcome = match step {
            // A resolve voids the reserve when it has not run (it would have been answered above).
            Step::ResolveReserve { .. } => Outcome::Failed("voided before it ran".into()),
            Step::Reserve { sku, qty } => {
                if self.held.contains_key(sku) {
                    Outcome::Failed("already reserved".into())
                } else if refuse {
                    Outcome::Failed("insufficient stock".into())
                } else {
                    self.held.insert(sku.clone(), *qty);
                    Outcome::Succeeded
                }
            }
            Step::Release { sku } => match self.held.remove(sku) {
                Some(_) => Outcome::Succeeded,
                None => Outcome::Failed("holds nothing to release".into()),
            },
            Step::Deduct { sku } => match self.held.remove(sku) {
                Some(qty) => {
                    self.deducted.insert(sku.clone(), qty);
                    Outcome::Succeeded
                }
                None => Outcome::Failed("nothing to deduct".into()),
            },
            Step::Authorize { .. } => {
                if self.refunded || refuse {
                    Outcome::Failed("declined".into())
                } else {
                    self.charged = true;
                    Outcome::Succeeded
                }
            }
            Step::Refund { .. } => {
                self.refunded = true;
                Outcome::Succeeded
            }
            Step::Confirm => self.order_moves(OrderStatus::Pending, OrderStatus::Confirmed),
            Step::Reject { .. } => self.order_moves(OrderStatus::Pending, OrderStatus::Rejected),
        };
        self.answered.insert(command_id.to_owned(), outcome.clone());
        outcome
    }

    fn order_moves(&mut self, from: OrderStatus, to: OrderStatus) -> Outcome {
        if self.order == Some(from) {
            self.order = Some(to);
            Outcome::Succeeded
        } else {
            Outcome::Failed(format!("order is {:?}", self.order))
        }
    }

    /// What the coordinator makes of an answer: a confirm that was not answered `ok` is
    /// resolved by reading the order's events.
    fn resolve(&self, step: &Step, outcome: Outcome) -> Outcome {
        match (step, &outcome) {
            (Step::Confirm, Outcome::Failed(_) | Outcome::Unknown(_))
                if matches!(
                    self.order,
                    Some(OrderStatus::Confirmed | OrderStatus::Shipped)
                ) =>
            {
                Outcome::Succeeded
            }
            _ => outcome,
        }
    }

    fn deliver(saga: Saga, event: OrderStatus) -> Saga {
        match event {
            OrderStatus::Cancelled => saga.cancel(),
            OrderStatus::Shipped => saga.ship(),
            _ => saga,
        }
    }
}

fn line(sku: &str, qty: u32) -> OrderLine {
    OrderLine {
        sku: Sku::parse(sku).unwrap(),
        qty,
        unit_price_cents: 100,
    }
}

/// Runs `saga` against `world` under `faults`, then without faults until it settles.
fn drive(mut saga: Saga, world: &mut World, faults: &[Fault]) -> Saga {
    for fault in faults {
        match fault {
            Fault::Deadline => saga = saga.time_out(),
            Fault::CustomerCancels => {
                if matches!(
                    world.order,
                    Some(OrderStatus::Pending | OrderStatus::Confirmed)
                ) {
                    world.order = Some(OrderStatus::Cancelled);
                    world.undelivered.push_back(OrderStatus::Cancelled);
                }
            }
            Fault::CustomerShips => {
                if world.order == Some(OrderStatus::Confirmed) {
                    world.order = Some(OrderStatus::Shipped);
                    world.undelivered.push_back(OrderStatus::Shipped);
                }
            }
            Fault::IntakeDelivers => {
                if let Some(event) = world.undelivered.pop_front() {
                    saga = World::deliver(saga, event);
                }
            }
            Fault::DelayedStepRuns => {
                if let Some((command_id, step)) = world.delayed.pop_front() {
                    world.handle(&command_id, &step, false);
                }
            }
            step_fault => {
                let Some((index, planned)) = saga.next_step() else {
                    continue;
                };
                let (step, command_id) = (planned.step.clone(), saga.command_id(index));
                if let Fault::CoordinatorDies = step_fault {
                    world.handle(&command_id, &step, false);
                    continue;
                }
                if let Fault::Delayed = step_fault {
                    world.delayed.push_back((command_id, step));
                    saga = saga.record(index, Outcome::Unknown("no answer yet".into()), Utc::now());
                    continue;
                }
                let outcome = match step_fault {
                    Fault::Answered => world.handle(&command_id, &step, false),
                    Fault::Refused => world.handle(&command_id, &step, true),
                    Fault::ReplyLost => {
                        world.handle(&command_id, &step, false);
                        Outcome::Unknown("reply lost".into())
                    }
                    _ => Outcome::Unknown("no responders".into()),
                };
                let outcome = world.resolve(&step, outcome);
                saga = saga.record(index, outcome, Utc::now());
            }
        }
    }
    // The outage ends: every event is taken in and every step answered; the steps still delayed
    // run at the worst moment, after the saga settled.
    for _ in 0..200 {
        if let Some(event) = world.undelivered.pop_front() {
            saga = World::deliver(saga, event);
            continue;
        }
        let Some((index, planned)) = saga.next_step() else {
            break;
        };
        let (step, command_id) = (planned.step.clone(), saga.command_id(index));
        let answer = world.handle(&command_id, &step, false);
        let outcome = world.resolve(&step, answer);
        saga = saga.record(index, outcome, Utc::now());
    }
    while let Some((command_id, step)) = world.delayed.pop_front() {
        world.handle(&command_id, &step, false);
    }
    saga
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn saga_order_stock_and_payment_agree_whatever_happens(
        faults in proptest::collection::vec(fault(), 0..60),
        lines in 1usize..=3,
    ) {
        let lines: Vec<OrderLine> = ["A1", "B2", "C3"][..lines].iter().map(|sku| line(sku, 2)).collect();
        let saga = Saga::start(
            OrderId::parse("o-1").unwrap(),
            CustomerId::parse("c-1").unwrap(),
            &lines,
            600,
        );
        let mut world = World { order: Some(OrderStatus::Pending), ..Default::default() };
        let saga = drive(saga, &mut world, &faults);
        let order = world.order.unwrap();

        prop_assert!(!saga.state.is_active(), "the saga settles once the outage ends: {saga:?}");
        let expected = match order {
            OrderStatus::Confirmed => SagaState::Confirmed,
            OrderStatus::Shipped => SagaState::Shipped,
            OrderStatus::Rejected => SagaState::Rejected,
            OrderStatus::Cancelled => SagaState::Cancelled,
            OrderStatus::Pending => panic!("the order was left pending: {saga:?}"),
        };
        prop_assert_eq!(saga.state, expected, "saga {:?} and order {:?} disagree", saga, order);
        let all: BTreeMap<Sku, u64> = lines.iter().map(|l| (l.sku.clone(), 2)).collect();
        match order {
            OrderStatus::Confirmed => {
                prop_assert_eq!(&world.held, &all, "a confirmed order holds all its stock");
                prop_assert!(world.charged && !world.refunded, "and was paid, not refunded");
            }
            OrderStatus::Shipped => {
                prop_assert!(world.held.is_empty());
                prop_assert_eq!(&world.deducted, &all, "a shipped order deducted all its stock");
                prop_assert!(world.charged && !world.refunded);
            }
            _ => {
                prop_assert!(world.held.is_empty(), "a {:?} order holds nothing: {:?}", order, world.held);
                prop_assert!(world.deducted.is_empty());
                prop_assert!(!world.charged || world.refunded, "and was refunded if charged");
            }
        }
    }
}

/// One change to a saga's plan or one outcome of its current step.
#[derive(Debug, Clone)]
enum Change {
    Outcome(u8),
    TimeOut,
    Cancel,
    Ship,
    RetryStuck,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => (0u8..3).prop_map(Change::Outcome),
        1 => Just(Change::TimeOut),
        1 => Just(Change::Cancel),
        1 => Just(Change::Ship),
        1 => Just(Change::RetryStuck),
    ]
}

/// The command a step sends: a resolve sends the reserve it resolves.
fn command_of(step: &Step) -> Step {
    match step {
        Step::ResolveReserve { sku, qty } => Step::Reserve {
            sku: sku.clone(),
            qty: *qty,
        },
        step => step.clone(),
    }
}

/// Applies `changes` to `saga`, noting every step of every plan it passes through.
fn apply(mut saga: Saga, changes: &[Change], seen: &mut Vec<(String, Step)>) -> Saga {
    for change in changes {
        saga = match change {
            Change::Outcome(outcome) => match saga.next_step() {
                Some((index, _)) => {
                    let outcome = match outcome {
                        0 => Outcome::Succeeded,
                        1 => Outcome::Failed("refused".into()),
                        _ => Outcome::Unknown("no answer".into()),
                    };
                    saga.record(index, outcome, Utc::now())
                }
                None => saga,
            },
            Change::TimeOut => saga.time_out(),
            Change::Cancel => saga.cancel(),
            Change::Ship => saga.ship(),
            Change::RetryStuck => saga.retry_stuck(),
        };
        for index in 0..saga.steps.len() {
            seen.push((saga.command_id(index), command_of(&saga.steps[index].step)));
        }
    }
    saga
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Coordinators that raced from one stored version (one acting on a plan the other's save
    /// replaced) may send the steps of different plans: whatever plans they came to, a command id
    /// means one command, so that no step is refused (and counted done) as another's repeat.
    #[test]
    fn one_command_id_is_one_command_in_every_plan_a_saga_can_come_to(
        shared in proptest::collection::vec(change(), 0..20),
        forks in proptest::collection::vec(proptest::collection::vec(change(), 0..30), 2..4),
        lines in 1usize..=3,
    ) {
        let lines: Vec<OrderLine> = ["A1", "B2", "C3"][..lines].iter().map(|sku| line(sku, 2)).collect();
        let start = Saga::start(
            OrderId::parse("o-1").unwrap(),
            CustomerId::parse("c-1").unwrap(),
            &lines,
            600,
        );
        let mut seen = Vec::new();
        let stored = apply(start, &shared, &mut seen);
        for fork in &forks {
            apply(stored.clone(), fork, &mut seen);
        }
        let mut commands: HashMap<String, Step> = HashMap::new();
        for (id, step) in seen {
            if let Some(earlier) = commands.insert(id.clone(), step.clone()) {
                prop_assert_eq!(&earlier, &step, "command id {} named two commands", id);
            }
        }
    }
}
