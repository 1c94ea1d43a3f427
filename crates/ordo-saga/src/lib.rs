//! The order saga and what reacts to its end.
//!
//! # Layout
//! - [`coordinator`]: [`Coordinator`] starts a saga per placed order, drives its steps
//!   (reserve, pay, confirm, or compensate) and keeps its state in PostgreSQL.
//! - [`payment`]: the pluggable payment gateway and its simulation.
//! - [`schema`]: the saga's tables and their migrations (`migrations/`).
//! - [`notifier`]: [`Notifier`], one notification per (order, kind), published on NATS and to an
//!   optional webhook.
//! - [`operations`]: what a person asks of the running coordinators and notifiers over NATS
//!   (the console's retries), answered with their own rights on the database.
//! - [`unreadable`]: order events this build cannot read (a newer schema) are held back (the
//!   intake tries them again by itself, the notifier leaves them unacknowledged) and shown.
//!
//! The rules themselves (which step comes next, what an outcome means) are pure, in
//! `ordo_domain::saga`.

pub mod coordinator;
pub mod notifier;
pub mod operations;
pub mod payment;
pub mod schema;
pub mod unreadable;

pub use coordinator::{Clock, Coordinator, CoordinatorConfig, StuckRetry};
pub use notifier::{Notifier, NotifierConfig};
pub use payment::{PaymentGateway, SimulatedGateway};
