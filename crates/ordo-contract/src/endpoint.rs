//! The command subjects: one [`Endpoint`] per subject, and the headers a request may carry.

/// Every public command subject starts with this: the commands applications may send.
pub const SUBJECT_PREFIX: &str = "ordo.cmd";
/// Every internal command subject starts with this: the saga's commands, a subject space of
/// their own so that no grant of `ordo.cmd.>` to an application reaches them.
pub const INTERNAL_SUBJECT_PREFIX: &str = "ordo.internal";

/// The largest request body the service accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub use ordo_domain::ids::MAX_COMMAND_ID_LEN;
/// The longest value of a header that ordo copies into the event it appends.
pub const MAX_HEADER_VALUE_LEN: usize = 128;

/// The headers of a request, and of a reply, that mean something to ordo.
pub mod headers {
    /// The command id (else the body's `command_id`, else a natural key): a request sent again
    /// under the same id runs at most once and gets the first outcome again.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// Sets the event's correlation id (default: the command id).
    pub const CORRELATION_ID: &str = "Ordo-Correlation-Id";
    /// Sets the event's causation id (the saga sets it to the event that caused the command).
    pub const CAUSATION_ID: &str = "Ordo-Causation-Id";
    /// With `true`, the saga asks for its reserve to be voided if that command id has not run.
    pub const VOID_IF_NOT_RUN: &str = "Ordo-Void-If-Not-Run";
    /// Set by the NATS server on a request that crossed accounts: it names the caller's account.
    pub const REQUEST_INFO: &str = "Nats-Request-Info";
    /// On a refusal: `<code>: <message>`, one line (the NATS micro service convention).
    pub const SERVICE_ERROR: &str = "Nats-Service-Error";
    /// On a refusal: the HTTP-like status of its code ([`crate::ErrorCode::status`]).
    pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
}

/// One command subject: `ordo.cmd.<category>.<action>`, or `ordo.internal.<category>.<action>`
/// for the saga's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    OrderPlace,
    OrderCancel,
    OrderShip,
    OrderConfirm,
    OrderReject,
    StockReceive,
    StockReserve,
    StockRelease,
    StockDeduct,
}

impl Endpoint {
    pub const ALL: [Endpoint; 9] = [
        Self::OrderPlace,
        Self::OrderCancel,
        Self::OrderShip,
        Self::OrderConfirm,
        Self::OrderReject,
        Self::StockReceive,
        Self::StockReserve,
        Self::StockRelease,
        Self::StockDeduct,
    ];

    /// The subject the service answers on. The one place each subject is written.
    pub fn subject(self) -> &'static str {
        match self {
            Self::OrderPlace => "ordo.cmd.order.place",
            Self::OrderCancel => "ordo.cmd.order.cancel",
            Self::OrderShip => "ordo.cmd.order.ship",
            Self::OrderConfirm => "ordo.internal.order.confirm",
            Self::OrderReject => "ordo.internal.order.reject",
            Self::StockReceive => "ordo.cmd.stock.receive",
            Self::StockReserve => "ordo.internal.stock.reserve",
            Self::StockRelease => "ordo.internal.stock.release",
            Self::StockDeduct => "ordo.internal.stock.deduct",
        }
    }

    /// The subject after its prefix, e.g. `order.place`.
    pub fn name(self) -> &'static str {
        let prefix = if self.is_internal() {
            INTERNAL_SUBJECT_PREFIX
        } else {
            SUBJECT_PREFIX
        };
        &self.subject()[prefix.len() + 1..]
    }

    /// Its place in [`Self::ALL`].
    pub fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|endpoint| *endpoint == self)
            .expect("every endpoint is in ALL")
    }

    /// `order` or `stock`: the aggregate the subject's commands act on.
    pub fn category(self) -> &'static str {
        self.name()
            .split('.')
            .next()
            .expect("names are category.action")
    }

    /// Internal commands are the saga's; customers use the others.
    pub fn is_internal(self) -> bool {
        matches!(
            self,
            Self::OrderConfirm
                | Self::OrderReject
                | Self::StockReserve
                | Self::StockRelease
                | Self::StockDeduct
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subjects are a contract with every client and with deployments (docker/nats-accounts.conf's
    /// permissions and imports): this is the one place they are written as text.
    #[test]
    fn every_subject_keeps_its_shipped_name() {
        assert_eq!(
            Endpoint::ALL.map(Endpoint::subject),
            [
                "ordo.cmd.order.place",
                "ordo.cmd.order.cancel",
                "ordo.cmd.order.ship",
                "ordo.internal.order.confirm",
                "ordo.internal.order.reject",
                "ordo.cmd.stock.receive",
                "ordo.internal.stock.reserve",
                "ordo.internal.stock.release",
                "ordo.internal.stock.deduct",
            ]
        );
    }

    #[test]
    fn names_and_prefixes_follow_the_subject() {
        for endpoint in Endpoint::ALL {
            let prefix = if endpoint.is_internal() {
                INTERNAL_SUBJECT_PREFIX
            } else {
                SUBJECT_PREFIX
            };
            assert_eq!(endpoint.subject(), format!("{prefix}.{}", endpoint.name()));
            assert_eq!(Endpoint::ALL[endpoint.index()], endpoint);
            assert!(["order", "stock"].contains(&endpoint.category()));
        }
    }
}
