//! The command service: the NATS micro service `ordo` that answers on `ordo.cmd.*`, turns each
//! JSON request into at most one event and replies with the outcome.
//!
//! # Layout
//! - [`wire`]: the subjects, the strict parsing of request bodies, command ids and the JSON
//!   replies with their error codes (the one place a failure gets its code).
//! - [`outcomes`]: the durable record of each command id's first outcome.
//! - [`handler`]: [`CommandHandler`], which runs one command: outcome check, load, decide, append
//!   with optimistic concurrency, retry on conflict.
//! - [`service`]: [`CommandService`], the micro service with its queue group, concurrency limit and
//!   graceful shutdown.
//! - [`ratelimit`]: per-customer token buckets on `order.place`, shared by every instance.
//! - [`backpressure`]: load shedding of `order.place` while a watched consumer's backlog (the
//!   saga's, a view's; `ordo_eventstore::ConsumerId`) is over its bound.
//! - [`hostile`]: generated hostile requests, each of a kind the parser must refuse, for the
//!   wire property tests, the service test that sends thousands, and the chaos drill's attacker.
//! - [`micro`]: the NATS micro service protocol (discovery and per-endpoint stats that count
//!   error replies).

pub mod backpressure;
pub mod handler;
pub mod hostile;
pub mod micro;
pub mod outcomes;
pub mod ratelimit;
pub mod service;
pub mod wire;

pub use handler::CommandHandler;
pub use service::{CommandService, ServiceConfig};
