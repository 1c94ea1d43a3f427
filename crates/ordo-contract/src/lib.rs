//! ordo's command contract: what a client sends on which subject, and what it gets back. The
//! command service reads requests and writes replies with these types, and every client in ordo
//! (the saga, the CLI, the chaos drill, the benchmark, the tests) writes requests and reads
//! replies with them, so a change to a subject, a field or an error code fails to compile rather
//! than at run time. A Rust client of ordo depends on this crate and nothing else of ordo's:
//!
//! ```
//! use ordo_contract::{CommandRequest, Quantity, ReceiveStock, Reply, Sku};
//!
//! let request = CommandRequest::ReceiveStock(ReceiveStock {
//!     sku: Sku::parse("A1").unwrap(),
//!     qty: Quantity::new(5).unwrap(),
//! });
//! assert_eq!(request.subject(), "ordo.cmd.stock.receive");
//! assert_eq!(request.body_bytes(), br#"{"sku":"A1","qty":5}"#);
//! // Send it with `client.request(request.subject(), request.body_bytes().into())`, with a
//! // `Nats-Msg-Id` header to make a retry safe, and read the answer:
//! let reply = Reply::parse(br#"{"ok":true,"sku":"A1","version":1,"seq":42}"#).unwrap();
//! assert!(reply.is_accepted());
//! ```
//!
//! # Layout
//! - [`endpoint`]: the subjects ([`Endpoint`]), the headers and the size limits.
//! - [`request`]: one serde type per subject, and [`CommandRequest`], the one a request is.
//! - [`reply`]: [`Reply`] and its [`ErrorCode`]s.
//! - [`schema`]: the JSON Schemas of every request and of the reply, generated from these types
//!   (the repository's `contracts/` holds them as files).
//! - `hostile` (feature `hostile`): generated requests the service must refuse, for tests and
//!   the chaos drill's attacker.

pub mod endpoint;
#[cfg(feature = "hostile")]
pub mod hostile;
pub mod reply;
pub mod request;
pub mod schema;

pub use endpoint::{
    Endpoint, INTERNAL_SUBJECT_PREFIX, MAX_BODY_BYTES, MAX_COMMAND_ID_LEN, MAX_HEADER_VALUE_LEN,
    SUBJECT_PREFIX, headers,
};
/// The domain's validating ids, as requests carry them.
pub use ordo_domain::{Currency, CustomerId, IdError, OrderId, Sku};
pub use reply::{AggregateId, ErrorCode, InvalidReply, Reply};
pub use request::{
    CancelOrder, CommandRequest, ConfirmOrder, DeductStock, InvalidCommand, Line, MAX_NUMBER,
    PlaceOrder, Quantity, Reason, ReceiveStock, RejectOrder, ReleaseStock, ReserveStock, ShipOrder,
};
