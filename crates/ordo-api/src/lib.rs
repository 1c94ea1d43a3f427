//! The HTTP read model (axum). Every read comes from the PostgreSQL views; a read may wait until
//! a view has caught up with a command's reply (`?min_seq=`), so a client can read its own writes.
//!
//! # Layout
//! - [`bodies`]: what the API answers, as types; [`openapi`]: the OpenAPI document made from
//!   them and from the handlers (`GET /openapi.json`).
//! - [`error`]: the JSON errors and their HTTP statuses.
//! - [`reads`]: the view endpoints (`/orders`, `/stock`, `/sagas`, `/notifications`).
//! - [`history`]: an order's events from its stream, with its state after each
//!   (`/orders/{id}/history`).
//! - [`console`]: the operator console, HTML under `/ui/`.
//! - [`ops`]: `/projections`, `/healthz`, `/readyz`, `/metrics`.
//! - [`app`]: [`router`] and [`serve`]: the routes, the shared state, the listener.
//! - [`auth`]: the optional bearer tokens of the API and of `/metrics`.

pub mod app;
pub mod auth;
pub mod bodies;
pub mod checkpoints;
pub mod console;
pub mod error;
pub mod history;
pub mod openapi;
pub mod ops;
pub mod reads;

pub use app::{
    ApiState, DEFAULT_MAX_READS_IN_FLIGHT, ShedBounds, WorkerChecks, openapi_document, prometheus,
    router, serve, serve_metrics,
};
pub use auth::{AccessTokens, Token};
