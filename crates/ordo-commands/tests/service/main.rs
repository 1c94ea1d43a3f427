//! Integration tests of the command service against a real nats-server, one per test. Requests
//! are plain NATS requests with JSON bodies, as `nats req` sends them.

mod attacks;
mod backpressure;
mod concurrency;
mod contract;
mod faults;
mod idempotency;
mod partitions;
mod ratelimit;
mod support;
