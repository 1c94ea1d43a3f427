//! The JetStream event store.
//!
//! # Layout
//! - [`streams`]: the stream definitions of `streams/*.json` and their idempotent `apply`.
//! - [`consumers`]: [`ConsumerId`], every durable consumer of those streams: its name, stream,
//!   ack policy and settings.
//! - [`consume`]: the one consumer loop of the workers: [`consume::Batches`] pulls and hands
//!   out what has arrived as a batch; the worker settles each message of it.
//! - [`envelope`]: the stored event format (the JSON envelope and its headers), kept apart from
//!   the domain types so that old schemas can be upcast on read.
//! - [`publish`]: the one conditional append every write goes through, and how JetStream's answers
//!   map to typed outcomes (conflict, duplicate, unavailable).
//! - [`store`]: [`EventStore`], which loads an aggregate from its subject and appends one event
//!   with optimistic concurrency, with a moka cache of `(state, last sequence)` per aggregate.
//! - [`history`]: an aggregate's events as stored, with their trace context, for people to read.
//! - [`partition`]: which partition an aggregate belongs to (the server's own hash).
//! - [`ownership`]: one owner per partition: leases in a KV bucket, spread over the live
//!   instances by rendezvous hashing.
//! - [`terms`]: a reader's share of a partitioned stream (a view's projectors, the saga's
//!   intake), taken in terms that change only between batches; [`progress`]: how far each
//!   instance has read, reported in the same bucket.
//! - [`trace`]: W3C trace context in NATS headers, so that one trace follows an order.
//!
//! Subjects are `ordo.<category>.events.<aggregate id>`; the stream sequence of an aggregate's last
//! event is the expected sequence of its next append (0 for a new aggregate).

pub mod backoff;
pub mod consume;
pub mod consumers;
pub mod envelope;
pub mod history;
pub mod ownership;
pub mod partition;
pub mod progress;
pub mod publish;
pub mod store;
pub mod streams;
pub mod terms;
pub mod trace;

pub use consumers::ConsumerId;
pub use envelope::{DecodeError, EventEnvelope, EventMetadata, RecordedEvent};
pub use ownership::{Grant, Grants, GroupStatus, Owners, Ownership, OwnershipConfig};
pub use partition::{Partition, partition_of};
pub use publish::{Appended, PublishError};
pub use store::{EventStore, LoadError, Loaded, Repository};
pub use streams::{StreamDefinition, StreamId, StreamsError};

/// The KV bucket `config` names, created with `config` if it does not exist yet (an existing
/// one is used as it is: its settings change only by an operator's hand).
pub async fn key_value(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, String> {
    match js.get_key_value(&config.bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(config)
            .await
            .map_err(|err| err.to_string()),
    }
}

/// The value of header `name` of `message`, if it has one.
pub fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str().to_owned())
}

/// The subject an aggregate's events are stored under.
pub fn aggregate_subject(category: &str, aggregate_id: &str) -> String {
    format!("ordo.{category}.events.{aggregate_id}")
}

/// The stream holding a category's events, if the category is known.
pub fn stream_for_category(category: &str) -> Option<&'static str> {
    StreamId::of_category(category).map(StreamId::name)
}

/// The stream of an aggregate type; every aggregate of the domain has one.
pub fn stream_of<A: ordo_domain::Aggregate>() -> &'static str {
    stream_for_category(A::CATEGORY).unwrap_or_else(|| {
        panic!(
            "no stream is defined for aggregate category {}",
            A::CATEGORY
        )
    })
}
