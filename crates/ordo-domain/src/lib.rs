//! The pure ordo domain: what orders and stock are, which commands they accept and which events
//! they produce. No I/O, no async, no clocks: everything here is a function of its arguments.
//!
//! # Layout
//! - [`ids`]: validated identifiers (order ids, customer ids, SKUs, currencies). An id that exists
//!   is a valid NATS subject token.
//! - [`order`]: the Order aggregate (place, confirm, reject, cancel, ship).
//! - [`stock`]: the Stock aggregate, one per SKU (receive, reserve, release, deduct).
//! - [`Rejection`]: why a command was refused.
//! - [`spec`]: the given / when / then harness the specifications are written in.
//!
//! Every aggregate follows the same two rules (see [`Aggregate`]): `decide(state, command)` returns
//! exactly one event or a rejection, and `evolve(state, event)` folds an event into the state.

pub mod ids;
pub mod order;
pub mod saga;
pub mod spec;
pub mod stock;

pub use ids::{Currency, CustomerId, IdError, OrderId, Sku};

/// The largest count or amount (stock on hand, an order's total in cents) the domain accepts:
/// what every read view can hold (a PostgreSQL bigint). Past it a command is refused, never
/// stored for a view to choke on.
pub const MAX_AMOUNT: u64 = i64::MAX as u64;

use serde::{Serialize, de::DeserializeOwned};

/// An event-sourced aggregate: its state is the fold of its events.
pub trait Aggregate: Send + Sync + 'static {
    /// The aggregate family, used to name its subjects (`ordo.<CATEGORY>.events.<id>`).
    const CATEGORY: &'static str;
    /// The state before any event is `Default::default()`. Serializable for snapshots.
    type State: Default
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;
    type Command: std::fmt::Debug + Send + Sync;
    type Event: DomainEvent;

    /// Decides what a command means for the current state: one event, or why not.
    fn decide(state: &Self::State, command: &Self::Command) -> Result<Self::Event, Rejection>;

    /// Folds one event into the state. Events are facts: this never fails.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// Roughly how many bytes `state` takes in memory: what a cache of states weighs it at, so
    /// that a cache bounded in bytes holds many small states or few large ones.
    fn weight(state: &Self::State) -> usize;
}

/// What every domain event can say about itself.
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// The stable name stored in the envelope's `type` and the `Ordo-Event-Type` header.
    fn event_type(&self) -> &'static str;
}

/// Why the domain refused a command. Each kind maps to exactly one reply code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The command is well-formed JSON but breaks a business rule about its own content
    /// (no lines, the same SKU twice, a total that overflows…).
    #[error("{0}")]
    Invalid(String),
    /// The command addresses an aggregate that was never created.
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
    /// The aggregate exists but is in a state where the command does not apply.
    #[error("{0}")]
    InvalidState(String),
    /// A reservation asks for more than is available.
    #[error("insufficient stock for {sku}: requested {requested}, available {available}")]
    InsufficientStock {
        sku: String,
        requested: u64,
        available: u64,
    },
}
