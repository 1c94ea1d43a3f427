//! The command service: the NATS micro service `ordo` that answers on `ordo.cmd.*`, turns each
//! JSON request into at most one event and replies with the outcome.
//!
//! # Layout
//! - [`intake`]: how a request (read with the contract's types, `ordo_contract`) becomes a
//!   command: its caller, its command id, its fingerprint.
//! - [`outcomes`]: the durable record of each command id's first outcome.
//! - [`handler`]: [`CommandHandler`], which runs one command: outcome check, load, decide, append
//!   with optimistic concurrency, retry on conflict.
//! - [`service`]: [`CommandService`], the micro service with its queue group, concurrency limit and
//!   graceful shutdown.
//! - [`ratelimit`]: per-customer token buckets on `order.place`, shared by every instance.
//! - [`backpressure`]: load shedding of `order.place` while a watched consumer's backlog (the
//!   saga's, a view's; `ordo_eventstore::ConsumerId`) is over its bound.
//! - [`micro`]: the NATS micro service protocol (discovery and per-endpoint stats that count
//!   error replies).

pub mod backpressure;
pub mod handler;
pub mod intake;
pub mod micro;
pub mod outcomes;
pub mod ratelimit;
pub mod routing;
pub mod service;
pub mod writer;

pub use handler::CommandHandler;
pub use service::{CommandService, ServiceConfig, ServiceError};
