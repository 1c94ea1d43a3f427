//! Projector workers: they read the event streams and keep PostgreSQL read views.
//!
//! # Layout
//! - [`projection`]: the [`Projection`] trait: a name, the stream it reads, the DDL of its view
//!   and how one event changes it.
//! - [`orders`] and [`stock`]: the two views of today.
//! - [`schema`]: one PostgreSQL schema per projection (`view_<name>`) holding its tables *and*
//!   its checkpoint, plus the table every projection shares (`parked_events`, from
//!   `projections/migrations`).
//! - [`runtime`]: [`Projector`], which applies batches exactly once in effect.
//! - [`rebuild`]: replays a stream into a new schema and swaps it in without downtime.
//! - [`views`]: [`View`], the list of every projection that everything else iterates.
//!
//! # How an event reaches a view exactly once
//! The checkpoint is the stream sequence of the last event applied, stored in the view's own
//! schema and written in the same transaction as the view. A projection is applied in stream
//! order, so one instance applies it at a time (a PostgreSQL advisory lock elects it; others
//! stand by and take over). At take-over the durable consumer is recreated at checkpoint + 1:
//! what the consumer believed was acked does not matter. Each fetched batch is one transaction
//! whose checkpoint update is fenced (`… WHERE seq = expected`); messages are acked after the
//! commit, and a redelivered message at or below the checkpoint is acked and skipped.

pub mod orders;
pub mod projection;
pub mod rebuild;
pub mod runtime;
pub mod schema;
pub mod stock;
pub mod views;

pub use projection::{ApplyError, Projection};
pub use runtime::{Projector, ProjectorConfig};
pub use views::View;
