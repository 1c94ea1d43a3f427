//! The reply to a command: [`Reply`], with the contract's [`ErrorCode`]s.
//!
//! On the wire it is `{"ok": true, "order_id"|"sku": …, "version": n, "seq": s}` or
//! `{"ok": false, "error": {"code": …, "message": …, "retry_after_ms": n}}` (`retry_after_ms`
//! only when the service says when to try again). The command service writes it, stores it as a
//! command's outcome, and every client reads it with [`Reply::parse`].

use ordo_domain::{OrderId, Rejection, Sku};
use serde::{Deserialize, Serialize};

/// The error codes of the contract. Every refusal carries exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is not one of the contract's (malformed JSON, an unknown or missing field, an
    /// id that is not a subject token, a number out of range), or its command id was used for a
    /// different request. Sending it again will not help.
    InvalidCommand,
    /// The order or SKU does not exist.
    NotFound,
    /// The order's state does not allow the command (shipping an order not confirmed).
    InvalidState,
    /// The SKU has less available than the reserve asks.
    InsufficientStock,
    /// The order or SKU kept changing under the command's attempts (contention): try again.
    Conflict,
    /// JetStream did not answer, so the command may or may not have happened: send it again
    /// under the same command id to learn which. With `retry_after_ms` (load shed, or the
    /// partition moving): nothing was appended; send it again after that long.
    Unavailable,
    /// The customer placed orders faster than its limit allows (`retry_after_ms` says when).
    RateLimited,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        Self::InvalidCommand,
        Self::NotFound,
        Self::InvalidState,
        Self::InsufficientStock,
        Self::Conflict,
        Self::Unavailable,
        Self::RateLimited,
    ];

    /// The status a reply with this code carries in `Nats-Service-Error-Code`, as HTTP would
    /// say it: the caller's mistake (400, 404), a refusal of the current state (409), too fast
    /// (429), or try again later (503).
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidCommand => 400,
            Self::NotFound => 404,
            Self::InvalidState | Self::InsufficientStock | Self::Conflict => 409,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidCommand => "invalid_command",
            Self::NotFound => "not_found",
            Self::InvalidState => "invalid_state",
            Self::InsufficientStock => "insufficient_stock",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
        }
    }

    /// The code a reply names, if it is one of the contract's.
    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|known| known.as_str() == code)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&Rejection> for ErrorCode {
    fn from(rejection: &Rejection) -> Self {
        match rejection {
            Rejection::Invalid(_) => Self::InvalidCommand,
            Rejection::NotFound { .. } => Self::NotFound,
            Rejection::InvalidState(_) => Self::InvalidState,
            Rejection::InsufficientStock { .. } => Self::InsufficientStock,
        }
    }
}

/// The aggregate an accepted command acted on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AggregateId {
    Order(OrderId),
    Stock(Sku),
}

impl AggregateId {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Order(order_id) => order_id.as_str(),
            Self::Stock(sku) => sku.as_str(),
        }
    }
}

impl std::fmt::Display for AggregateId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireReply", into = "WireReply")]
pub enum Reply {
    /// The command's event is durable: the aggregate is at `version`, the event at stream
    /// sequence `seq`.
    Accepted {
        aggregate: AggregateId,
        version: u64,
        seq: u64,
    },
    /// Nothing was appended, for the reason `code` and `message` give.
    Refused {
        code: ErrorCode,
        message: String,
        /// When the service says how long to wait before sending the command again.
        retry_after_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a reply of the command contract: {0}")]
pub struct InvalidReply(pub String);

impl Reply {
    pub fn accepted(aggregate: AggregateId, version: u64, seq: u64) -> Self {
        Self::Accepted {
            aggregate,
            version,
            seq,
        }
    }

    /// A refusal with no advice on when to try again.
    pub fn refused(code: ErrorCode, message: impl std::fmt::Display) -> Self {
        Self::Refused {
            code,
            message: message.to_string(),
            retry_after_ms: None,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidReply> {
        serde_json::from_slice(bytes).map_err(|err| InvalidReply(err.to_string()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("replies serialize")
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted { .. })
    }
}

/// A command's reply. `ok` comes first, so that a reader of the raw text sees it first. Accepted
/// (`ok: true`): the order's or the SKU's id, its `version` (how many events it has) and the
/// event's stream sequence `seq`. Refused (`ok: false`): the `error`.
/// (Its JSON Schema is written out in `crate::schema`: the wire form is one of two shapes.)
#[derive(Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    /// The order an accepted order command acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    order_id: Option<OrderId>,
    /// The SKU an accepted stock command acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sku: Option<Sku>,
    /// How many events the order or SKU has, this command's included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    /// The event's stream sequence: a read with `?min_seq=` waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// Why nothing was appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<WireError>,
}

/// A refusal: one code of the contract, a message for people, and for `unavailable` and
/// `rate_limited` how long to wait before sending the command again.
#[derive(Serialize, Deserialize)]
struct WireError {
    code: ErrorCode,
    #[serde(default)]
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl From<Reply> for WireReply {
    fn from(reply: Reply) -> Self {
        let empty = Self {
            ok: false,
            order_id: None,
            sku: None,
            version: None,
            seq: None,
            error: None,
        };
        match reply {
            Reply::Accepted {
                aggregate,
                version,
                seq,
            } => {
                let (order_id, sku) = match aggregate {
                    AggregateId::Order(order_id) => (Some(order_id), None),
                    AggregateId::Stock(sku) => (None, Some(sku)),
                };
                Self {
                    ok: true,
                    order_id,
                    sku,
                    version: Some(version),
                    seq: Some(seq),
                    ..empty
                }
            }
            Reply::Refused {
                code,
                message,
                retry_after_ms,
            } => Self {
                error: Some(WireError {
                    code,
                    message,
                    retry_after_ms,
                }),
                ..empty
            },
        }
    }
}

impl TryFrom<WireReply> for Reply {
    type Error = InvalidReply;
    fn try_from(wire: WireReply) -> Result<Self, InvalidReply> {
        let missing = |what: &str| InvalidReply(format!("{what} is missing"));
        if !wire.ok {
            let error = wire.error.ok_or_else(|| missing("error"))?;
            return Ok(Self::Refused {
                code: error.code,
                message: error.message,
                retry_after_ms: error.retry_after_ms,
            });
        }
        let aggregate = match (wire.order_id, wire.sku) {
            (Some(order_id), None) => AggregateId::Order(order_id),
            (None, Some(sku)) => AggregateId::Stock(sku),
            _ => return Err(InvalidReply("exactly one of order_id and sku".into())),
        };
        Ok(Self::Accepted {
            aggregate,
            version: wire.version.ok_or_else(|| missing("version"))?,
            seq: wire.seq.ok_or_else(|| missing("seq"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(reply: &Reply) -> String {
        String::from_utf8(reply.to_bytes()).unwrap()
    }

    #[test]
    fn replies_are_written_as_the_contract_says_and_read_back() {
        let stock = Reply::accepted(AggregateId::Stock(Sku::parse("A1").unwrap()), 2, 7);
        assert_eq!(
            text(&stock),
            r#"{"ok":true,"sku":"A1","version":2,"seq":7}"#
        );
        let order = Reply::accepted(AggregateId::Order(OrderId::parse("o-1").unwrap()), 1, 3);
        assert_eq!(
            text(&order),
            r#"{"ok":true,"order_id":"o-1","version":1,"seq":3}"#
        );
        let refused = Reply::refused(ErrorCode::NotFound, "x");
        assert_eq!(
            text(&refused),
            r#"{"ok":false,"error":{"code":"not_found","message":"x"}}"#
        );
        let later = Reply::Refused {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            retry_after_ms: Some(250),
        };
        assert_eq!(
            text(&later),
            r#"{"ok":false,"error":{"code":"rate_limited","message":"slow down","retry_after_ms":250}}"#
        );
        for reply in [stock, order, refused, later] {
            assert_eq!(Reply::parse(&reply.to_bytes()), Ok(reply));
        }
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
            let reply = Reply::refused(code, "why");
            assert_eq!(Reply::parse(&reply.to_bytes()), Ok(reply));
        }
    }

    #[test]
    fn what_is_not_a_reply_is_told_apart() {
        for text in [
            r#"{"ok":false,"error":{"code":"renamed"}}"#,
            r#"{"ok":false}"#,
            r#"{"ok":true,"version":1,"seq":1}"#,
            r#"{"ok":true,"order_id":"o-1","sku":"A1","version":1,"seq":1}"#,
            r#"{"ok":true,"order_id":"o-1","version":1}"#,
            "not json",
        ] {
            assert!(Reply::parse(text.as_bytes()).is_err(), "{text}");
        }
    }
}
