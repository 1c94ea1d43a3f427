//! Local servers, started as child processes: a nats-server with JetStream (or a cluster of
//! them) and a PostgreSQL of ordo's own, for `ordo up` when none answers, for the chaos drill
//! (which kills and restarts them) and for the tests (through `ordo-testkit`), and a database
//! created empty for one test or one drill and dropped afterwards.
//!
//! - `ORDO_NATS_SERVER`: the nats-server binary (else the first one ≥ 2.12 on `PATH`).
//! - `ORDO_TEST_DATABASE_URL`: a PostgreSQL URL whose user may create databases
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`), for [`TestDatabase`].

mod nats;
mod postgres_server;
mod postgres_url;
mod test_database;

pub use nats::{MINIMUM_VERSION, NatsCluster, NatsServer, find_nats_server, parse_version};
pub use postgres_server::{PostgresServer, find_postgres_bin};
pub use postgres_url::connect_options;
pub use test_database::TestDatabase;
