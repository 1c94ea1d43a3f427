//! What the tests share: real servers (from `ordo-local`: a nats-server with JetStream per test
//! on a free port with a temporary store, which can be killed with SIGKILL and restarted on the
//! same store; a fresh PostgreSQL database per test), a relay that loses replies on cue, and
//! [`OrdoProcess`], the one wrapper of an `ordo` process the tests of the binary share; and
//! [`generated`], the committed files held to what the code generates.
//! Nothing is mocked: tests talk to the same servers ordo runs against.

pub mod generated;
mod process;
mod relay;

pub use ordo_local::{
    MINIMUM_VERSION, NatsCluster, NatsServer, PostgresServer, TestDatabase, find_nats_server,
    find_postgres_bin, parse_version,
};
pub use process::OrdoProcess;
pub use relay::DarkeningRelay;
