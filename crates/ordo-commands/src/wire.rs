//! The wire contract of the command subjects: JSON request bodies in, JSON replies out. Both
//! directions live here and nowhere else: the service parses requests ([`parse`]) and writes
//! replies ([`ok_reply`], [`error_reply`]); every client in ordo (the saga, the CLI, the test
//! harness) builds requests with [`CommandRequest`] and reads replies with [`Reply::parse`], so
//! a change to a subject, a field or an error code fails to compile rather than at run time.
//!
//! Parsing is strict: malformed JSON, unknown or missing fields, wrong types, non-positive
//! quantities, ids that are not subject tokens and bodies over 64 KiB are all `invalid_command`,
//! with a message that says which field and why.

use ordo_domain::{
    Currency, CustomerId, IdError, OrderId, Rejection, Sku,
    order::{MAX_REASON_LEN, OrderCommand, OrderLine},
    stock::StockCommand,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub use ordo_domain::ids::MAX_COMMAND_ID_LEN;
/// Every public command subject starts with this: the commands applications may send.
pub const SUBJECT_PREFIX: &str = "ordo.cmd";
/// Every internal command subject starts with this: the saga's commands, a subject space of
/// their own so that no grant of `ordo.cmd.>` to an application reaches them.
pub const INTERNAL_SUBJECT_PREFIX: &str = "ordo.internal";

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

    /// The subject after `ordo.cmd.`, e.g. `order.place`.
    pub fn name(self) -> &'static str {
        match self {
            Self::OrderPlace => "order.place",
            Self::OrderCancel => "order.cancel",
            Self::OrderShip => "order.ship",
            Self::OrderConfirm => "order.confirm",
            Self::OrderReject => "order.reject",
            Self::StockReceive => "stock.receive",
            Self::StockReserve => "stock.reserve",
            Self::StockRelease => "stock.release",
            Self::StockDeduct => "stock.deduct",
        }
    }

    pub fn subject(self) -> String {
        let prefix = if self.is_internal() {
            INTERNAL_SUBJECT_PREFIX
        } else {
            SUBJECT_PREFIX
        };
        format!("{prefix}.{}", self.name())
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Order(OrderCommand),
    Stock(StockCommand),
}

/// Who sent a request, as far as the NATS server vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A process of the service's own NATS account: the saga, the CLI, or any client when the
    /// server has no accounts configured.
    OwnAccount,
    /// An application in another account, whose request reached the service through a service
    /// import. The server itself names the account, in the `Nats-Request-Info` header it sets
    /// (replacing any the sender wrote), so it cannot be forged from there.
    Account(String),
}

impl Caller {
    /// The header a NATS server sets on a request that crossed into this account.
    pub const HEADER_REQUEST_INFO: &str = "Nats-Request-Info";

    /// The caller of a request with `Nats-Request-Info` set to `request_info`, if any.
    pub fn from_request_info(request_info: Option<&str>) -> Result<Self, InvalidCommand> {
        #[derive(Deserialize)]
        struct RequestInfo {
            acc: String,
        }
        let Some(text) = request_info else {
            return Ok(Self::OwnAccount);
        };
        match serde_json::from_str::<RequestInfo>(text) {
            Ok(info) if printable_ascii(&info.acc, usize::MAX, b"") => Ok(Self::Account(info.acc)),
            _ => Err(InvalidCommand(format!(
                "the {} header does not name an account",
                Self::HEADER_REQUEST_INFO
            ))),
        }
    }

    /// A command id in this caller's own space: an application's ids are prefixed with its
    /// account, so that no application can read or pre-empt another's outcome, or derive the
    /// same order id from the same command id.
    fn scoped(&self, command_id: String) -> String {
        match self {
            Self::OwnAccount => command_id,
            Self::Account(account) => format!("{account}/{command_id}"),
        }
    }
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub command: Command,
    /// From `Nats-Msg-Id`, else the body's `command_id`, else the natural key.
    pub command_id: String,
    /// A digest of what the request asks for, so that a command id reused for a different
    /// request is told apart from a retry.
    pub fingerprint: String,
    /// True when the client chose the command id. Only then is a refusal the command's final
    /// outcome; under a natural key the command is decided again (a `ship` refused while the
    /// order was pending must work once it is confirmed).
    pub explicit_id: bool,
    /// The saga resolves a reserve it may have sent: if the command id has not run, it is not
    /// run now but voided (recorded as refused), so that any copy of it that comes later runs
    /// nothing. Set by [`HEADER_VOID_IF_NOT_RUN`], for the saga's reserves only.
    pub void_if_not_run: bool,
}

/// The header with which the saga asks for a reserve to be voided if it has not run.
pub const HEADER_VOID_IF_NOT_RUN: &str = "Ordo-Void-If-Not-Run";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCommand(pub String);

impl From<IdError> for InvalidCommand {
    fn from(err: IdError) -> Self {
        Self(err.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceBody {
    order_id: Option<String>,
    customer_id: String,
    lines: Vec<LineBody>,
    currency: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    qty: i64,
    unit_price_cents: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderIdBody {
    order_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    order_id: String,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    order_id: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveBody {
    sku: String,
    qty: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody {
    sku: String,
    order_id: String,
    qty: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SkuOrderBody {
    sku: String,
    order_id: String,
}

/// Order ids generated from a client's command id are UUIDv5 in this namespace.
const ORDER_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f72_646f_2d6f_7264_6572_2d69_6400_0001);

/// Parses a request body for `endpoint` from `caller`. `header_command_id` is the `Nats-Msg-Id`
/// header. The command id that comes out is in the caller's own space ([`Caller::scoped`]).
pub fn parse(
    endpoint: Endpoint,
    body: &[u8],
    header_command_id: Option<&str>,
    caller: &Caller,
) -> Result<ParsedRequest, InvalidCommand> {
    if endpoint.is_internal() && *caller != Caller::OwnAccount {
        return Err(InvalidCommand(format!(
            "{} is an internal command: only ordo's own processes may send it",
            endpoint.subject()
        )));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(InvalidCommand(format!(
            "the body is {} bytes; the limit is {MAX_BODY_BYTES}",
            body.len()
        )));
    }
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|err| InvalidCommand(format!("the body is not valid JSON: {err}")))?;
    let Value::Object(fields) = &mut value else {
        return Err(InvalidCommand("the body must be a JSON object".into()));
    };
    let body_command_id = match fields.remove("command_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(InvalidCommand("command_id must be a string".into())),
    };
    let fingerprint = hex_digest(&format!("{}\n{}", endpoint.name(), canonical_json(&value)));
    let explicit_id = header_command_id
        .map(str::to_owned)
        .or(body_command_id)
        .map(validate_command_id)
        .transpose()?;
    if let Some(id) = &explicit_id
        && !endpoint.is_internal()
        && id.starts_with(ordo_domain::saga::COMMAND_ID_PREFIX)
    {
        return Err(InvalidCommand(format!(
            "command id {id:?}: ids that begin with {:?} are the saga's",
            ordo_domain::saga::COMMAND_ID_PREFIX
        )));
    }
    let explicit_id = explicit_id.map(|id| caller.scoped(id));

    let (command, natural_key) = match endpoint {
        Endpoint::OrderPlace => {
            let body: PlaceBody = typed(value)?;
            // Without an order id, one is generated, and is the natural key. Under a command id
            // of the client's, it is derived from that id, so that every copy of the command
            // (a retry, a redelivery to another instance) places the same order.
            let order_id = match (body.order_id, &explicit_id) {
                (Some(id), _) => OrderId::parse(id)?,
                (None, Some(command_id)) => OrderId::parse(
                    uuid::Uuid::new_v5(&ORDER_ID_NAMESPACE, command_id.as_bytes()).to_string(),
                )?,
                (None, None) => OrderId::parse(uuid::Uuid::now_v7().to_string())?,
            };
            let natural_key = Some(format!("order.place:{order_id}"));
            let lines = body
                .lines
                .into_iter()
                .enumerate()
                .map(|(i, line)| {
                    Ok(OrderLine {
                        sku: Sku::parse(line.sku)?,
                        qty: positive(line.qty, &format!("lines[{i}].qty")).and_then(|qty| {
                            u32::try_from(qty)
                                .map_err(|_| InvalidCommand(format!("lines[{i}].qty is too large")))
                        })?,
                        unit_price_cents: u64::try_from(line.unit_price_cents).map_err(|_| {
                            InvalidCommand(format!("lines[{i}].unit_price_cents must be 0 or more"))
                        })?,
                    })
                })
                .collect::<Result<Vec<_>, InvalidCommand>>()?;
            let currency = body
                .currency
                .map(Currency::parse)
                .transpose()?
                .unwrap_or_default();
            let command = OrderCommand::Place {
                customer_id: CustomerId::parse(body.customer_id)?,
                order_id,
                lines,
                currency,
            };
            (Command::Order(command), natural_key)
        }
        Endpoint::OrderCancel => {
            let body: CancelBody = typed(value)?;
            let order_id = OrderId::parse(body.order_id)?;
            let reason = body.reason.map(bounded_reason).transpose()?;
            let key = format!("order.cancel:{order_id}");
            (
                Command::Order(OrderCommand::Cancel { order_id, reason }),
                Some(key),
            )
        }
        Endpoint::OrderShip | Endpoint::OrderConfirm => {
            let body: OrderIdBody = typed(value)?;
            let order_id = OrderId::parse(body.order_id)?;
            let key = format!("{}:{order_id}", endpoint.name());
            let command = if endpoint == Endpoint::OrderShip {
                OrderCommand::Ship { order_id }
            } else {
                OrderCommand::Confirm { order_id }
            };
            (Command::Order(command), Some(key))
        }
        Endpoint::OrderReject => {
            let body: RejectBody = typed(value)?;
            let order_id = OrderId::parse(body.order_id)?;
            let reason = bounded_reason(body.reason)?;
            let key = format!("order.reject:{order_id}");
            (
                Command::Order(OrderCommand::Reject { order_id, reason }),
                Some(key),
            )
        }
        Endpoint::StockReceive => {
            let body: ReceiveBody = typed(value)?;
            let command = StockCommand::Receive {
                sku: Sku::parse(body.sku)?,
                qty: positive(body.qty, "qty")?,
            };
            // Two deliveries of the same quantity are both real: receive has no natural key.
            (Command::Stock(command), None)
        }
        Endpoint::StockReserve => {
            let body: ReserveBody = typed(value)?;
            let (sku, order_id) = (Sku::parse(body.sku)?, OrderId::parse(body.order_id)?);
            let key = format!("stock.reserve:{sku}:{order_id}");
            let qty = positive(body.qty, "qty")?;
            (
                Command::Stock(StockCommand::Reserve { sku, order_id, qty }),
                Some(key),
            )
        }
        Endpoint::StockRelease | Endpoint::StockDeduct => {
            let body: SkuOrderBody = typed(value)?;
            let (sku, order_id) = (Sku::parse(body.sku)?, OrderId::parse(body.order_id)?);
            let key = format!("{}:{sku}:{order_id}", endpoint.name());
            let command = if endpoint == Endpoint::StockRelease {
                StockCommand::Release { sku, order_id }
            } else {
                StockCommand::Deduct { sku, order_id }
            };
            (Command::Stock(command), Some(key))
        }
    };

    let command_id = match &explicit_id {
        Some(id) => id.clone(),
        // The natural key includes what is asked, so that a different request on the same
        // aggregate is a different command (and meets the domain's rules, not a dedup refusal).
        None => caller.scoped(match natural_key {
            Some(key) => format!("{key}:{}", &fingerprint[..16]),
            None => format!("{}:{}", endpoint.name(), uuid::Uuid::now_v7()),
        }),
    };
    Ok(ParsedRequest {
        endpoint,
        command,
        command_id,
        fingerprint,
        explicit_id: explicit_id.is_some(),
        void_if_not_run: false,
    })
}

impl ParsedRequest {
    /// Asks for the command to be voided if its id has not run. Only a reserve of ordo's own
    /// account, under an id it chose, can be: the saga's compensation of a reserve it may have
    /// sent.
    pub fn void_if_not_run(mut self, caller: &Caller) -> Result<Self, InvalidCommand> {
        if self.endpoint != Endpoint::StockReserve
            || *caller != Caller::OwnAccount
            || !self.explicit_id
        {
            return Err(InvalidCommand(format!(
                "{HEADER_VOID_IF_NOT_RUN} is for the saga's stock.reserve under its own command id"
            )));
        }
        self.void_if_not_run = true;
        Ok(self)
    }
}

/// JSON text with object keys sorted at every level: the same request, whatever its key order,
/// has the same text.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            let members: Vec<String> = keys
                .into_iter()
                .map(|key| {
                    format!(
                        "{}:{}",
                        Value::String(key.clone()),
                        canonical_json(&fields[key])
                    )
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        scalar => scalar.to_string(),
    }
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T, InvalidCommand> {
    serde_json::from_value(value).map_err(|err| InvalidCommand(err.to_string()))
}

fn positive(value: i64, field: &str) -> Result<u64, InvalidCommand> {
    u64::try_from(value)
        .ok()
        .filter(|qty| *qty > 0)
        .ok_or_else(|| InvalidCommand(format!("{field} must be greater than 0, got {value}")))
}

fn bounded_reason(reason: String) -> Result<String, InvalidCommand> {
    if reason.len() > MAX_REASON_LEN {
        return Err(InvalidCommand(format!(
            "reason is {} bytes; the limit is {MAX_REASON_LEN}",
            reason.len()
        )));
    }
    // PostgreSQL's text and jsonb cannot hold U+0000: a view could not store the reason.
    if reason.contains('\0') {
        return Err(InvalidCommand(
            "reason holds the character U+0000, which no view can store".into(),
        ));
    }
    Ok(reason)
}

/// The longest value of a header that ordo copies into the event it appends.
pub const MAX_HEADER_VALUE_LEN: usize = 128;

/// The value of header `name` if ordo may copy it into an event: 1 to
/// [`MAX_HEADER_VALUE_LEN`] printable ASCII characters. Anything else is refused, so that a
/// caller cannot fill the streams with what it sends beside the body.
pub fn bounded_header(name: &str, value: &str) -> Result<String, InvalidCommand> {
    if !printable_ascii(value, MAX_HEADER_VALUE_LEN, b"") {
        return Err(InvalidCommand(format!(
            "header {name} must be 1 to {MAX_HEADER_VALUE_LEN} printable ASCII characters \
             without spaces (got {} bytes)",
            value.len()
        )));
    }
    Ok(value.to_owned())
}

/// Whether `text` is 1 to `max` printable ASCII characters (no spaces), none of them in `except`.
fn printable_ascii(text: &str, max: usize, except: &[u8]) -> bool {
    (1..=max).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_graphic() && !except.contains(&b))
}

fn validate_command_id(id: String) -> Result<String, InvalidCommand> {
    // No '/': it separates an account from its ids ([`Caller::scoped`]), so no id of one space
    // can be written as an id of another.
    if !printable_ascii(&id, MAX_COMMAND_ID_LEN, b"/") {
        return Err(InvalidCommand(format!(
            "command id {id:?} must be 1 to {MAX_COMMAND_ID_LEN} printable ASCII characters without spaces or '/'"
        )));
    }
    Ok(id)
}

pub fn hex_digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The error codes of the wire contract. Every failure maps to exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidCommand,
    NotFound,
    InvalidState,
    InsufficientStock,
    Conflict,
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
    /// say it: the caller's mistake (400, 404), a refusal of the current state (409), or try
    /// again later (503).
    pub fn status(self) -> u16 {
        match self {
            Self::InvalidCommand => 400,
            Self::NotFound => 404,
            Self::InvalidState | Self::InsufficientStock | Self::Conflict => 409,
            Self::Unavailable => 503,
            Self::RateLimited => 429,
        }
    }

    /// The code a reply names, if it is one of the contract's.
    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|known| known.as_str() == code)
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

/// A reply as JSON: `{"ok": true, "order_id"|"sku": …, "version": n, "seq": s}` or
/// `{"ok": false, "error": {"code": …, "message": …}}`.
pub fn ok_reply(category: &str, aggregate_id: &str, version: u64, seq: u64) -> Value {
    let key = if category == "stock" {
        "sku"
    } else {
        "order_id"
    };
    json!({"ok": true, key: aggregate_id, "version": version, "seq": seq})
}

pub fn error_reply(code: ErrorCode, message: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": {"code": code.as_str(), "message": message.to_string()}})
}

/// A reply as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The command's event is durable: `aggregate_id` is the order id or SKU.
    Accepted {
        aggregate_id: String,
        version: u64,
        seq: u64,
    },
    Refused {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a reply of the command contract: {0}")]
pub struct InvalidReply(pub String);

impl Reply {
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidReply> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| InvalidReply(err.to_string()))?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self, InvalidReply> {
        let missing = |what: &str| InvalidReply(format!("{what} is missing in {value}"));
        match value["ok"].as_bool() {
            Some(true) => Ok(Self::Accepted {
                aggregate_id: value["order_id"]
                    .as_str()
                    .or_else(|| value["sku"].as_str())
                    .ok_or_else(|| missing("order_id or sku"))?
                    .to_owned(),
                version: value["version"]
                    .as_u64()
                    .ok_or_else(|| missing("version"))?,
                seq: value["seq"].as_u64().ok_or_else(|| missing("seq"))?,
            }),
            Some(false) => {
                let code = value["error"]["code"]
                    .as_str()
                    .ok_or_else(|| missing("error.code"))?;
                Ok(Self::Refused {
                    code: ErrorCode::parse(code)
                        .ok_or_else(|| InvalidReply(format!("unknown error code {code:?}")))?,
                    message: value["error"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                })
            }
            None => Err(missing("ok")),
        }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted { .. })
    }
}

/// A command as a client sends it: one variant per subject, with typed, valid fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandRequest {
    PlaceOrder {
        /// Generated by the service when absent.
        order_id: Option<OrderId>,
        customer_id: CustomerId,
        lines: Vec<OrderLine>,
        currency: Option<Currency>,
    },
    CancelOrder {
        order_id: OrderId,
        reason: Option<String>,
    },
    ShipOrder {
        order_id: OrderId,
    },
    ConfirmOrder {
        order_id: OrderId,
    },
    RejectOrder {
        order_id: OrderId,
        reason: String,
    },
    ReceiveStock {
        sku: Sku,
        qty: u64,
    },
    ReserveStock {
        sku: Sku,
        order_id: OrderId,
        qty: u64,
    },
    ReleaseStock {
        sku: Sku,
        order_id: OrderId,
    },
    DeductStock {
        sku: Sku,
        order_id: OrderId,
    },
}

impl CommandRequest {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Self::PlaceOrder { .. } => Endpoint::OrderPlace,
            Self::CancelOrder { .. } => Endpoint::OrderCancel,
            Self::ShipOrder { .. } => Endpoint::OrderShip,
            Self::ConfirmOrder { .. } => Endpoint::OrderConfirm,
            Self::RejectOrder { .. } => Endpoint::OrderReject,
            Self::ReceiveStock { .. } => Endpoint::StockReceive,
            Self::ReserveStock { .. } => Endpoint::StockReserve,
            Self::ReleaseStock { .. } => Endpoint::StockRelease,
            Self::DeductStock { .. } => Endpoint::StockDeduct,
        }
    }

    pub fn subject(&self) -> String {
        self.endpoint().subject()
    }

    /// The JSON body, as `nats req` would send it.
    pub fn body(&self) -> Value {
        match self {
            Self::PlaceOrder {
                order_id,
                customer_id,
                lines,
                currency,
            } => {
                let lines: Vec<Value> = lines
                    .iter()
                    .map(|line| json!({"sku": line.sku, "qty": line.qty, "unit_price_cents": line.unit_price_cents}))
                    .collect();
                let mut body = json!({"customer_id": customer_id, "lines": lines});
                if let Some(order_id) = order_id {
                    body["order_id"] = json!(order_id);
                }
                if let Some(currency) = currency {
                    body["currency"] = json!(currency.as_str());
                }
                body
            }
            Self::CancelOrder { order_id, reason } => match reason {
                Some(reason) => json!({"order_id": order_id, "reason": reason}),
                None => json!({"order_id": order_id}),
            },
            Self::ShipOrder { order_id } | Self::ConfirmOrder { order_id } => {
                json!({"order_id": order_id})
            }
            Self::RejectOrder { order_id, reason } => {
                json!({"order_id": order_id, "reason": reason})
            }
            Self::ReceiveStock { sku, qty } => json!({"sku": sku, "qty": qty}),
            Self::ReserveStock { sku, order_id, qty } => {
                json!({"sku": sku, "order_id": order_id, "qty": qty})
            }
            Self::ReleaseStock { sku, order_id } | Self::DeductStock { sku, order_id } => {
                json!({"sku": sku, "order_id": order_id})
            }
        }
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).expect("request bodies serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request from ordo's own account, as every test here but the caller's own sends it.
    pub(super) fn parse(
        endpoint: Endpoint,
        body: &[u8],
        header_command_id: Option<&str>,
    ) -> Result<ParsedRequest, InvalidCommand> {
        super::parse(endpoint, body, header_command_id, &Caller::OwnAccount)
    }

    fn invalid(endpoint: Endpoint, body: &str) -> String {
        parse(endpoint, body.as_bytes(), None).unwrap_err().0
    }

    #[test]
    fn malformed_json_is_invalid() {
        assert!(
            invalid(Endpoint::StockReceive, "{\"sku\":").starts_with("the body is not valid JSON")
        );
        assert_eq!(
            invalid(Endpoint::StockReceive, "[1]"),
            "the body must be a JSON object"
        );
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let unknown = invalid(
            Endpoint::StockReceive,
            r#"{"sku":"A1","qty":1,"colour":"red"}"#,
        );
        assert!(unknown.contains("unknown field `colour`"), "{unknown}");
        let missing = invalid(Endpoint::StockReceive, r#"{"sku":"A1"}"#);
        assert!(missing.contains("missing field `qty`"), "{missing}");
    }

    #[test]
    fn quantities_must_be_positive() {
        assert_eq!(
            invalid(Endpoint::StockReceive, r#"{"sku":"A1","qty":0}"#),
            "qty must be greater than 0, got 0"
        );
        assert_eq!(
            invalid(
                Endpoint::OrderPlace,
                r#"{"customer_id":"c1","lines":[{"sku":"A1","qty":-2,"unit_price_cents":1}]}"#
            ),
            "lines[0].qty must be greater than 0, got -2"
        );
        assert_eq!(
            invalid(
                Endpoint::OrderPlace,
                r#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":-1}]}"#
            ),
            "lines[0].unit_price_cents must be 0 or more"
        );
    }

    #[test]
    fn ids_must_be_subject_tokens() {
        let message = invalid(Endpoint::OrderShip, r#"{"order_id":"o.1"}"#);
        assert!(
            message.starts_with("order_id \"o.1\" is not a valid id"),
            "{message}"
        );
        assert!(invalid(Endpoint::StockReceive, r#"{"sku":"A>","qty":1}"#).contains("sku"));
    }

    #[test]
    fn bodies_over_64_kib_are_refused_before_parsing() {
        let body = format!(r#"{{"order_id":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        assert_eq!(
            invalid(Endpoint::OrderShip, &body),
            format!("the body is {} bytes; the limit is 65536", body.len())
        );
    }

    #[test]
    fn an_application_s_command_ids_live_in_its_own_account_s_space() {
        let shop = Caller::from_request_info(Some(r#"{"acc":"SHOP","rtt":1000}"#)).unwrap();
        let body = br#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":5}]}"#;
        let own = parse(Endpoint::OrderPlace, body, Some("delivery-7")).unwrap();
        let shops = super::parse(Endpoint::OrderPlace, body, Some("delivery-7"), &shop).unwrap();
        assert_eq!(own.command_id, "delivery-7");
        assert_eq!(shops.command_id, "SHOP/delivery-7");
        // The order id derived from the command id differs too: another account's command of
        // the same id places another order.
        let order_id = |parsed: &ParsedRequest| match &parsed.command {
            Command::Order(OrderCommand::Place { order_id, .. }) => order_id.clone(),
            other => panic!("{other:?}"),
        };
        assert_ne!(order_id(&own), order_id(&shops));
        let natural = super::parse(Endpoint::OrderShip, br#"{"order_id":"o-1"}"#, None, &shop);
        assert!(
            natural
                .unwrap()
                .command_id
                .starts_with("SHOP/order.ship:o-1:")
        );
        assert_eq!(Caller::from_request_info(None).unwrap(), Caller::OwnAccount);
        assert!(Caller::from_request_info(Some("not json")).is_err());
        assert!(Caller::from_request_info(Some(r#"{"acc":""}"#)).is_err());
        // Nobody writes an id of another account's space.
        assert!(
            parse(
                Endpoint::OrderShip,
                br#"{"order_id":"o-1"}"#,
                Some("SHOP/delivery-7")
            )
            .is_err()
        );
    }

    #[test]
    fn the_saga_s_command_ids_and_internal_commands_are_refused_from_anyone_else() {
        let stolen = parse(
            Endpoint::OrderCancel,
            br#"{"order_id":"nope"}"#,
            Some("saga:victim-1:reserve:A1"),
        )
        .unwrap_err();
        assert!(stolen.0.contains("are the saga's"), "{stolen}");
        let in_body = invalid(
            Endpoint::OrderShip,
            r#"{"order_id":"o-1","command_id":"saga:o-1:confirm"}"#,
        );
        assert!(in_body.contains("are the saga's"), "{in_body}");
        // The saga itself sends them, on internal subjects, from ordo's own account.
        let step = br#"{"sku":"A1","order_id":"o-1","qty":1}"#;
        let reserve = parse(Endpoint::StockReserve, step, Some("saga:o-1:reserve:A1")).unwrap();
        assert_eq!(reserve.command_id, "saga:o-1:reserve:A1");
        let shop = Caller::Account("SHOP".into());
        let from_shop = super::parse(Endpoint::StockReserve, step, None, &shop).unwrap_err();
        assert!(from_shop.0.contains("internal command"), "{from_shop}");
        for endpoint in Endpoint::ALL {
            let prefix = if endpoint.is_internal() {
                "ordo.internal."
            } else {
                "ordo.cmd."
            };
            assert!(
                endpoint.subject().starts_with(prefix),
                "{}",
                endpoint.subject()
            );
        }
    }

    #[test]
    fn a_reason_no_view_can_store_is_refused() {
        let message = invalid(
            Endpoint::OrderCancel,
            r#"{"order_id":"o-1","reason":"x\u0000y"}"#,
        );
        assert!(message.contains("U+0000"), "{message}");
    }

    #[test]
    fn headers_copied_into_events_are_bounded() {
        assert_eq!(
            bounded_header("Ordo-Correlation-Id", "order:o-1").unwrap(),
            "order:o-1"
        );
        for hostile in [
            "",
            "has space",
            "tab\there",
            &"x".repeat(MAX_HEADER_VALUE_LEN + 1),
        ] {
            assert!(
                bounded_header("Ordo-Correlation-Id", hostile).is_err(),
                "{hostile:?}"
            );
        }
    }

    #[test]
    fn the_command_id_comes_from_the_header_then_the_body_then_the_natural_key() {
        let body = br#"{"order_id":"o-1","command_id":"from-body"}"#;
        let header = parse(Endpoint::OrderShip, body, Some("from-header")).unwrap();
        assert_eq!(header.command_id, "from-header");
        assert_eq!(
            parse(Endpoint::OrderShip, body, None).unwrap().command_id,
            "from-body"
        );
        let natural = parse(Endpoint::OrderShip, br#"{"order_id":"o-1"}"#, None).unwrap();
        assert_eq!(
            natural.command_id,
            format!("order.ship:o-1:{}", &natural.fingerprint[..16])
        );
        assert!(!natural.explicit_id && header.explicit_id);
        let reserve = parse(
            Endpoint::StockReserve,
            br#"{"sku":"A1","order_id":"o-1","qty":1}"#,
            None,
        )
        .unwrap();
        assert!(reserve.command_id.starts_with("stock.reserve:A1:o-1:"));
    }

    #[test]
    fn placing_without_an_order_id_generates_one_that_is_also_the_natural_key() {
        let body = br#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":1}]}"#;
        let parsed = parse(Endpoint::OrderPlace, body, None).unwrap();
        let Command::Order(OrderCommand::Place {
            order_id, currency, ..
        }) = &parsed.command
        else {
            panic!("not a place: {parsed:?}");
        };
        assert!(
            parsed
                .command_id
                .starts_with(&format!("order.place:{order_id}:"))
        );
        assert_eq!(currency.as_str(), "USD");
    }

    #[test]
    fn copies_of_a_place_without_order_id_under_one_command_id_place_the_same_order() {
        let body = br#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":1}]}"#;
        let order_of = |command_id| match parse(Endpoint::OrderPlace, body, Some(command_id))
            .unwrap()
            .command
        {
            Command::Order(OrderCommand::Place { order_id, .. }) => order_id,
            other => panic!("not a place: {other:?}"),
        };
        assert_eq!(order_of("retry-me"), order_of("retry-me"));
        assert_ne!(order_of("retry-me"), order_of("another"));
    }

    #[test]
    fn receiving_has_no_natural_key_so_two_deliveries_are_two_commands() {
        let body = br#"{"sku":"A1","qty":1}"#;
        let first = parse(Endpoint::StockReceive, body, None).unwrap();
        let second = parse(Endpoint::StockReceive, body, None).unwrap();
        assert_ne!(first.command_id, second.command_id);
    }

    #[test]
    fn the_fingerprint_ignores_key_order_and_the_command_id_but_not_values() {
        let fingerprint = |body: &str| {
            parse(Endpoint::StockReceive, body.as_bytes(), None)
                .unwrap()
                .fingerprint
        };
        assert_eq!(
            fingerprint(r#"{"sku":"A1","qty":1}"#),
            fingerprint(r#"{"qty":1,"sku":"A1","command_id":"x"}"#)
        );
        assert_ne!(
            fingerprint(r#"{"sku":"A1","qty":1}"#),
            fingerprint(r#"{"sku":"A1","qty":2}"#)
        );
    }

    #[test]
    fn command_ids_are_printable_and_bounded() {
        let body = br#"{"order_id":"o-1"}"#;
        assert!(parse(Endpoint::OrderShip, body, Some("has space")).is_err());
        assert!(parse(Endpoint::OrderShip, body, Some(&"x".repeat(129))).is_err());
        assert!(
            parse(
                Endpoint::OrderShip,
                body,
                Some("550e8400-e29b-41d4-a716-446655440000")
            )
            .is_ok()
        );
    }

    fn order(id: &str) -> OrderId {
        OrderId::parse(id).unwrap()
    }

    fn a_sku(id: &str) -> Sku {
        Sku::parse(id).unwrap()
    }

    #[test]
    fn every_typed_request_is_what_the_service_parses() {
        let line = OrderLine {
            sku: a_sku("A1"),
            qty: 2,
            unit_price_cents: 500,
        };
        let requests = [
            CommandRequest::PlaceOrder {
                order_id: Some(order("o-1")),
                customer_id: CustomerId::parse("c1").unwrap(),
                lines: vec![line.clone()],
                currency: Some(Currency::parse("EUR".to_owned()).unwrap()),
            },
            CommandRequest::CancelOrder {
                order_id: order("o-1"),
                reason: Some("changed my mind".into()),
            },
            CommandRequest::ShipOrder {
                order_id: order("o-1"),
            },
            CommandRequest::ConfirmOrder {
                order_id: order("o-1"),
            },
            CommandRequest::RejectOrder {
                order_id: order("o-1"),
                reason: "no stock".into(),
            },
            CommandRequest::ReceiveStock {
                sku: a_sku("A1"),
                qty: 5,
            },
            CommandRequest::ReserveStock {
                sku: a_sku("A1"),
                order_id: order("o-1"),
                qty: 2,
            },
            CommandRequest::ReleaseStock {
                sku: a_sku("A1"),
                order_id: order("o-1"),
            },
            CommandRequest::DeductStock {
                sku: a_sku("A1"),
                order_id: order("o-1"),
            },
        ];
        let endpoints: std::collections::HashSet<Endpoint> =
            requests.iter().map(CommandRequest::endpoint).collect();
        assert_eq!(
            endpoints.len(),
            Endpoint::ALL.len(),
            "one request per subject"
        );
        for request in requests {
            let parsed = parse(request.endpoint(), &request.body_bytes(), None)
                .unwrap_or_else(|err| panic!("{request:?}: {err}"));
            let expected = match &request {
                CommandRequest::PlaceOrder {
                    order_id,
                    customer_id,
                    lines,
                    currency,
                } => Command::Order(OrderCommand::Place {
                    order_id: order_id.clone().unwrap(),
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    currency: currency.clone().unwrap(),
                }),
                CommandRequest::CancelOrder { order_id, reason } => {
                    Command::Order(OrderCommand::Cancel {
                        order_id: order_id.clone(),
                        reason: reason.clone(),
                    })
                }
                CommandRequest::ShipOrder { order_id } => Command::Order(OrderCommand::Ship {
                    order_id: order_id.clone(),
                }),
                CommandRequest::ConfirmOrder { order_id } => {
                    Command::Order(OrderCommand::Confirm {
                        order_id: order_id.clone(),
                    })
                }
                CommandRequest::RejectOrder { order_id, reason } => {
                    Command::Order(OrderCommand::Reject {
                        order_id: order_id.clone(),
                        reason: reason.clone(),
                    })
                }
                CommandRequest::ReceiveStock { sku, qty } => {
                    Command::Stock(StockCommand::Receive {
                        sku: sku.clone(),
                        qty: *qty,
                    })
                }
                CommandRequest::ReserveStock { sku, order_id, qty } => {
                    Command::Stock(StockCommand::Reserve {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                        qty: *qty,
                    })
                }
                CommandRequest::ReleaseStock { sku, order_id } => {
                    Command::Stock(StockCommand::Release {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                    })
                }
                CommandRequest::DeductStock { sku, order_id } => {
                    Command::Stock(StockCommand::Deduct {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                    })
                }
            };
            assert_eq!(parsed.command, expected);
        }
    }

    #[test]
    fn every_reply_the_service_writes_reads_back() {
        assert_eq!(
            Reply::from_json(&ok_reply("stock", "A1", 2, 7)),
            Ok(Reply::Accepted {
                aggregate_id: "A1".into(),
                version: 2,
                seq: 7
            })
        );
        assert_eq!(
            Reply::from_json(&ok_reply("order", "o-1", 1, 3)),
            Ok(Reply::Accepted {
                aggregate_id: "o-1".into(),
                version: 1,
                seq: 3
            })
        );
        for code in ErrorCode::ALL {
            assert_eq!(
                Reply::from_json(&error_reply(code, "why")),
                Ok(Reply::Refused {
                    code,
                    message: "why".into()
                })
            );
        }
        assert!(Reply::parse(br#"{"ok":false,"error":{"code":"renamed"}}"#).is_err());
        assert!(Reply::parse(b"not json").is_err());
    }

    mod properties {
        use super::{super::*, parse};
        use crate::hostile;
        use proptest::prelude::*;
        use rand::{SeedableRng, rngs::StdRng};

        fn endpoint() -> impl Strategy<Value = Endpoint> {
            (0..Endpoint::ALL.len()).prop_map(|i| Endpoint::ALL[i])
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                "[a-zA-Z0-9_.> -]{0,70}".prop_map(Value::from),
                Just(Value::from("A1")),
                Just(Value::from("o-1")),
            ];
            leaf.prop_recursive(3, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    proptest::collection::btree_map(
                        prop_oneof![
                            Just("order_id".to_owned()),
                            Just("customer_id".to_owned()),
                            Just("sku".to_owned()),
                            Just("qty".to_owned()),
                            Just("lines".to_owned()),
                            Just("unit_price_cents".to_owned()),
                            Just("reason".to_owned()),
                            "[a-z_]{1,8}",
                        ],
                        inner,
                        0..6,
                    )
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn every_hostile_request_is_refused(seed in any::<u64>(), endpoint in endpoint()) {
                let hostile = hostile::generate(endpoint, &mut StdRng::seed_from_u64(seed));
                let parsed = parse(endpoint, &hostile.body, hostile.command_id.as_deref());
                prop_assert!(parsed.is_err(), "{} was accepted: {}", hostile.kind, String::from_utf8_lossy(&hostile.body));
            }

            #[test]
            fn any_bytes_are_parsed_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512), endpoint in endpoint()) {
                let _ = parse(endpoint, &bytes, None);
            }

        }

        /// A value for an id field: mostly a valid subject token, sometimes one that is not
        /// (a dot, a wildcard, a space, nothing, too long) or not a string at all.
        fn id_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                8 => "[A-Za-z0-9_-]{1,20}".prop_map(Value::from),
                1 => prop_oneof![
                    Just(Value::from("a.b")),
                    Just(Value::from(">")),
                    Just(Value::from("a b")),
                    Just(Value::from("")),
                    Just(Value::from("x".repeat(65))),
                    Just(Value::from(7)),
                ],
            ]
        }

        /// A quantity: mostly in range, sometimes zero, negative, over u32 or not a number.
        fn qty_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                8 => (1..=1000i64).prop_map(Value::from),
                1 => prop_oneof![
                    Just(Value::from(0)),
                    Just(Value::from(-1)),
                    Just(Value::from(u64::from(u32::MAX))),
                    Just(Value::from(u64::from(u32::MAX) + 1)),
                    Just(Value::from(i64::MAX)),
                    Just(Value::from(1.5)),
                    Just(Value::from("1")),
                ],
            ]
        }

        fn reason_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                8 => "[ -~]{0,40}".prop_map(Value::from),
                1 => prop_oneof![
                    Just(Value::from("r".repeat(MAX_REASON_LEN))),
                    Just(Value::from("r".repeat(MAX_REASON_LEN + 1))),
                    Just(Value::from("nul\u{0}inside")),
                    Just(Value::Null),
                ],
            ]
        }

        fn line_value() -> impl Strategy<Value = Value> {
            (id_value(), qty_value(), prop_oneof![8 => (0..=100_000i64).prop_map(Value::from), 1 => Just(Value::from(-1))])
                .prop_map(|(sku, qty, price)| json!({"sku": sku, "qty": qty, "unit_price_cents": price}))
        }

        /// A request body shaped like `endpoint`'s: its fields, each mostly valid (so that about
        /// half of them are accepted), sometimes a field left out or one it does not have.
        fn request_body(endpoint: Endpoint) -> BoxedStrategy<Value> {
            let fields: Vec<(&'static str, BoxedStrategy<Value>)> = match endpoint {
                Endpoint::OrderPlace => vec![
                    ("order_id", id_value().boxed()),
                    ("customer_id", id_value().boxed()),
                    ("lines", prop_oneof![
                        9 => proptest::collection::vec(line_value(), 1..4),
                        1 => proptest::collection::vec(line_value(), 0..=ordo_domain::order::MAX_LINES + 1),
                    ].prop_map(Value::from).boxed()),
                    ("currency", prop_oneof![Just(Value::from("EUR")), Just(Value::from("USD")), Just(Value::from("eur"))].boxed()),
                ],
                Endpoint::OrderCancel => vec![("order_id", id_value().boxed()), ("reason", reason_value().boxed())],
                Endpoint::OrderShip | Endpoint::OrderConfirm => vec![("order_id", id_value().boxed())],
                Endpoint::OrderReject => vec![("order_id", id_value().boxed()), ("reason", reason_value().boxed())],
                Endpoint::StockReceive => vec![("sku", id_value().boxed()), ("qty", qty_value().boxed())],
                Endpoint::StockReserve => vec![
                    ("sku", id_value().boxed()),
                    ("order_id", id_value().boxed()),
                    ("qty", qty_value().boxed()),
                ],
                Endpoint::StockRelease | Endpoint::StockDeduct => {
                    vec![("sku", id_value().boxed()), ("order_id", id_value().boxed())]
                }
            };
            let (names, values): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
            let count = names.len();
            (
                values,
                proptest::collection::vec(prop_oneof![12 => Just(true), 1 => Just(false)], count),
                prop_oneof![12 => Just(None), 1 => Just(Some(("extra", Value::from(1))))],
            )
                .prop_map(move |(values, kept, extra)| {
                    let mut body = serde_json::Map::new();
                    for ((name, value), keep) in names.iter().zip(values).zip(kept) {
                        if keep {
                            body.insert((*name).to_owned(), value);
                        }
                    }
                    if let Some((name, value)) = extra {
                        body.insert(name.to_owned(), value);
                    }
                    Value::Object(body)
                })
                .boxed()
        }

        /// The typed request that `parsed` came from, as a client library would send it.
        fn typed_request(parsed: &ParsedRequest) -> CommandRequest {
            match &parsed.command {
                Command::Order(OrderCommand::Place {
                    order_id,
                    customer_id,
                    lines,
                    currency,
                }) => CommandRequest::PlaceOrder {
                    order_id: Some(order_id.clone()),
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    currency: Some(currency.clone()),
                },
                Command::Order(OrderCommand::Cancel { order_id, reason }) => {
                    CommandRequest::CancelOrder {
                        order_id: order_id.clone(),
                        reason: reason.clone(),
                    }
                }
                Command::Order(OrderCommand::Ship { order_id }) => CommandRequest::ShipOrder {
                    order_id: order_id.clone(),
                },
                Command::Order(OrderCommand::Confirm { order_id }) => {
                    CommandRequest::ConfirmOrder {
                        order_id: order_id.clone(),
                    }
                }
                Command::Order(OrderCommand::Reject { order_id, reason }) => {
                    CommandRequest::RejectOrder {
                        order_id: order_id.clone(),
                        reason: reason.clone(),
                    }
                }
                Command::Stock(StockCommand::Receive { sku, qty }) => {
                    CommandRequest::ReceiveStock {
                        sku: sku.clone(),
                        qty: *qty,
                    }
                }
                Command::Stock(StockCommand::Reserve { sku, order_id, qty }) => {
                    CommandRequest::ReserveStock {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                        qty: *qty,
                    }
                }
                Command::Stock(StockCommand::Release { sku, order_id }) => {
                    CommandRequest::ReleaseStock {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                    }
                }
                Command::Stock(StockCommand::Deduct { sku, order_id }) => {
                    CommandRequest::DeductStock {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                    }
                }
            }
        }

        /// Whatever JSON arrives (any value, or one shaped like the endpoint's body with mostly
        /// valid fields), what is accepted is a well-formed command: sending its typed form again
        /// parses to the very same command. The accepted cases are counted, so that the property
        /// cannot hold by accepting nothing.
        #[test]
        fn whatever_is_accepted_is_a_well_formed_command() {
            use proptest::test_runner::{Config, TestRunner};
            let cases = 3000;
            let mut runner = TestRunner::new(Config::with_cases(cases));
            let accepted = std::cell::Cell::new(0u32);
            let requests = endpoint().prop_flat_map(|endpoint| {
                (
                    Just(endpoint),
                    prop_oneof![1 => json_value().boxed(), 3 => request_body(endpoint)],
                )
            });
            runner
                .run(&requests, |(endpoint, value)| {
                    let bytes = serde_json::to_vec(&value).unwrap();
                    if let Ok(parsed) = parse(endpoint, &bytes, Some("c-1")) {
                        accepted.set(accepted.get() + 1);
                        let again = typed_request(&parsed);
                        prop_assert_eq!(again.endpoint(), endpoint);
                        let reparsed = parse(endpoint, &again.body_bytes(), Some("c-1")).unwrap();
                        prop_assert_eq!(reparsed.command, parsed.command);
                    }
                    Ok(())
                })
                .unwrap();
            // Three in four cases are shaped like a body, and about half of those are valid.
            assert!(
                accepted.get() >= cases / 5,
                "only {} of {cases} requests were accepted: the property said little",
                accepted.get()
            );
        }
    }

    #[test]
    fn replies_put_ok_first() {
        assert_eq!(
            error_reply(ErrorCode::NotFound, "x").to_string(),
            r#"{"ok":false,"error":{"code":"not_found","message":"x"}}"#
        );
        assert_eq!(
            ok_reply("stock", "A1", 2, 7).to_string(),
            r#"{"ok":true,"sku":"A1","version":2,"seq":7}"#
        );
    }
}
