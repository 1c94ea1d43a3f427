//! ordo as a library: the whole system, assembled from its crates and configured by
//! [`Settings`]. `ordo up` is `App::build(settings, Role::Everything, …)` then
//! [`App::run_until_stopped`]; `ordo run <component>` the same with [`Role::Only`]; the tests
//! that do not kill processes run it in their own process the same way.
//!
//! # Layout
//! - [`app`]: [`App`], [`Role`] and [`Component`]: what a process runs, and its supervision.
//! - [`settings`]: [`Settings`], every flag and environment variable of a deployment.
//! - [`components`]: each long-running component as a task that stops when told, and the
//!   settings of each.
//! - [`connect`]: NATS: URLs, credentials, TLS, connecting with back-off, and the local
//!   nats-server `ordo up` starts when none answers.
//! - [`nats_tools`]: the NATS tools' conventions ordo follows: `NATS_URL`, `NATS_CREDS`, …, and
//!   the `nats` CLI's contexts, one of which `ordo up` writes.
//! - [`database`]: PostgreSQL: URLs, migrations, grants, and the local PostgreSQL `ordo up`
//!   starts when none answers.
//! - [`shutdown`]: [`Shutdown`], and the SIGINT/SIGTERM handler.

pub mod app;
pub mod components;
pub mod connect;
pub mod database;
pub mod nats_tools;
pub mod settings;
pub mod shutdown;

pub use app::{App, Component, Role};
pub use settings::Settings;
pub use shutdown::{Shutdown, shutdown_signal};
