//! Real servers for tests (and for `ordo up`, which starts a nats-server when none answers): a nats-server with JetStream per test (free port, temporary store) that
//! can be killed with SIGKILL and restarted on the same store, and a fresh PostgreSQL database per
//! test. Nothing is mocked: tests talk to the same servers ordo runs against.
//!
//! - `ORDO_NATS_SERVER`: the nats-server binary (else the first one ≥ 2.10 on `PATH`).
//! - `ORDO_TEST_DATABASE_URL`: a PostgreSQL URL whose user may create databases
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`).

mod nats;
mod postgres;
mod postgres_server;
mod relay;

pub use nats::{MINIMUM_VERSION, NatsCluster, NatsServer, find_nats_server, parse_version};
pub use postgres::TestDatabase;
pub use postgres_server::{PostgresServer, find_postgres_bin};
pub use relay::DarkeningRelay;
