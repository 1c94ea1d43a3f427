//! A given / when / then harness, so that a specification reads as the rule it states:
//!
//! ```
//! use ordo_domain::{spec::given, stock::*, Sku};
//! let sku = Sku::parse("A1").unwrap();
//! given::<StockAggregate>([StockEvent::StockReceived { qty: 5 }])
//!     .when(StockCommand::Receive { sku, qty: 2 })
//!     .then(StockEvent::StockReceived { qty: 2 });
//! ```

use crate::{Aggregate, Rejection};

/// Starts a specification from the events that already happened.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let state = events
        .into_iter()
        .fold(A::State::default(), |state, event| A::evolve(state, &event));
    Given { state }
}

pub struct Given<A: Aggregate> {
    state: A::State,
}

impl<A: Aggregate> Given<A> {
    /// The state the given events fold into.
    pub fn state(&self) -> &A::State {
        &self.state
    }

    pub fn when(self, command: A::Command) -> Then<A> {
        let outcome = A::decide(&self.state, &command);
        Then {
            state: self.state,
            command,
            outcome,
        }
    }
}

pub struct Then<A: Aggregate> {
    state: A::State,
    command: A::Command,
    outcome: Result<A::Event, Rejection>,
}

impl<A: Aggregate> Then<A> {
    /// Asserts the command produced exactly `expected`, and returns the state after it.
    #[track_caller]
    pub fn then(self, expected: A::Event) -> A::State {
        match self.outcome {
            Ok(event) => {
                assert_eq!(event, expected, "command {:?}", self.command);
                A::evolve(self.state, &event)
            }
            Err(rejection) => panic!(
                "command {:?} was rejected ({rejection}), expected {expected:?}",
                self.command
            ),
        }
    }

    /// Asserts the command was refused with exactly `expected`.
    #[track_caller]
    pub fn then_rejected(self, expected: Rejection) {
        match self.outcome {
            Ok(event) => panic!(
                "command {:?} produced {event:?}, expected rejection {expected:?}",
                self.command
            ),
            Err(rejection) => assert_eq!(rejection, expected, "command {:?}", self.command),
        }
    }
}
