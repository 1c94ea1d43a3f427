//! Every durable consumer of ordo's streams: the one list that the workers that read through them,
//! the command service's load shedding, the read API's metrics and the chaos drill take their
//! names from.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};

use crate::StreamId;

/// A durable consumer. Its name is its identity in JetStream, in docker/nats-accounts.conf's permissions,
/// in the `unreadable_events` rows, in metric labels and, for a view, in its projector's leader
/// lock: a name never changes, or two builds of a rolling upgrade would read as two consumers
/// (or lead one view twice). A new consumer is a new variant here; the compiler then asks for
/// the rest (a new view also gets its variant, which `ordo_projections::views` checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsumerId {
    /// The saga coordinators' intake of order events. The coordinators share the stream's
    /// partitions and read it by sequence (`consume::Reader`), as the projectors do; the name is
    /// their catalogue entry, and that of the durable consumer of builds before the partitioned
    /// intake, which they delete.
    Saga,
    /// The orders view's projectors. They read the stream without a consumer (by sequence,
    /// `consume::Reader`); the name is their catalogue entry, and that of the durable consumer
    /// of builds before partitioned projectors, which they delete.
    OrdersView,
    /// The stock view's projectors, as the orders view's.
    StockView,
    /// The notifiers', shared by every notifier.
    Notifier,
}

impl ConsumerId {
    /// In the order the command service reads backlogs (the first over its bound is reported).
    pub const ALL: [ConsumerId; 4] = [
        Self::Saga,
        Self::OrdersView,
        Self::StockView,
        Self::Notifier,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Saga => "ordo-saga",
            Self::OrdersView => "ordo-projection-orders",
            Self::StockView => "ordo-projection-stock",
            Self::Notifier => "ordo-notifier",
        }
    }

    /// The stream it reads, whole (no durable consumer of ordo filters its stream).
    pub const fn stream(self) -> StreamId {
        match self {
            Self::Saga | Self::OrdersView | Self::Notifier => StreamId::Orders,
            Self::StockView => StreamId::Stock,
        }
    }

    /// A view's projectors': no consumer (their partitions' checkpoints say how far the view is,
    /// and they read by sequence). Builds before partitioned projectors had one durable consumer
    /// of this name.
    pub const fn is_projection(self) -> bool {
        matches!(self, Self::OrdersView | Self::StockView)
    }

    /// Acknowledges each event itself and holds back those it cannot read
    /// (`ordo_saga::unreadable`), counted per consumer by the read API.
    pub const fn holds_back_unreadable(self) -> bool {
        matches!(self, Self::Saga | Self::Notifier)
    }

    /// What `nats consumer info` shows of it.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Saga => "ordo saga coordinators: order events that start or extend sagas",
            Self::OrdersView => "ordo projection orders (restarted at its checkpoint)",
            Self::StockView => "ordo projection stock (restarted at its checkpoint)",
            Self::Notifier => {
                "ordo notifier: orders that ended (confirmed, rejected, cancelled, shipped)"
            }
        }
    }

    /// The readers that share their stream's partitions and read it by sequence, without a
    /// consumer (a view's projectors, the saga's intake): their group in the partition bucket
    /// (`ordo partitions status --group`), where they share the partitions and report how far
    /// they are. `None` for a durable consumer.
    pub const fn partition_group(self) -> Option<&'static str> {
        match self {
            Self::OrdersView => Some("projection-orders"),
            Self::StockView => Some("projection-stock"),
            Self::Saga => Some("saga"),
            Self::Notifier => None,
        }
    }

    /// Read by sequence, per partition, rather than through a durable consumer.
    pub const fn reads_by_partition(self) -> bool {
        self.partition_group().is_some()
    }

    /// How long a delivered event may go unacknowledged before it is delivered again.
    pub const ACK_WAIT: Duration = Duration::from_secs(30);

    /// The consumer as JetStream keeps it, delivering from `deliver`, its events redelivered
    /// after `ack_wait` ([`Self::ACK_WAIT`] but in tests). Every delivery is retried for as
    /// long as it takes (no `max_deliver`): an event is handled or held back, never dropped.
    pub fn config(self, deliver: DeliverPolicy, ack_wait: Duration) -> pull::Config {
        debug_assert!(!self.reads_by_partition(), "{self} reads by sequence");
        pull::Config {
            durable_name: Some(self.name().to_owned()),
            description: Some(self.description().to_owned()),
            deliver_policy: deliver,
            // Each event acknowledged on its own, as it is handled, asked again or held back.
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_deliver: -1,
            ..Default::default()
        }
    }
}

impl std::fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names are a contract with deployments (permissions, rows, labels, leader locks):
    /// this is the one place they are written as text.
    #[test]
    fn every_consumer_keeps_its_shipped_name() {
        assert_eq!(
            ConsumerId::ALL.map(ConsumerId::name),
            [
                "ordo-saga",
                "ordo-projection-orders",
                "ordo-projection-stock",
                "ordo-notifier"
            ]
        );
    }

    #[test]
    fn each_consumer_is_either_a_projection_or_holds_back_what_it_cannot_read() {
        for consumer in ConsumerId::ALL {
            assert_ne!(
                consumer.is_projection(),
                consumer.holds_back_unreadable(),
                "{consumer}"
            );
        }
    }
}
