//! How a request becomes a command: who sent it ([`Caller`]), which command id it runs under,
//! the digest that tells a retry from a different request under the same id, and the domain
//! command it asks for ([`parse`]). The request itself is read with the contract's types
//! (`ordo_contract`); this is the service's side of it.

use ordo_contract::{
    AggregateId, CommandRequest, Endpoint, InvalidCommand, MAX_BODY_BYTES, MAX_COMMAND_ID_LEN,
    MAX_HEADER_VALUE_LEN, headers,
};
use ordo_domain::{
    OrderId,
    order::{OrderCommand, OrderLine},
    stock::StockCommand,
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

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
                headers::REQUEST_INFO
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
    /// nothing. Set by the `Ordo-Void-If-Not-Run` header, for the saga's reserves only.
    pub void_if_not_run: bool,
    /// True when the request named no order id and no command id, so that the order id was
    /// generated here: a copy of the request sent on must carry it.
    pub generated_order_id: bool,
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

    let mut generated_order_id = false;
    let (command, natural_key) = match CommandRequest::from_body(endpoint, value)? {
        CommandRequest::PlaceOrder(place) => {
            // Without an order id, one is generated, and is the natural key. Under a command id
            // of the client's, it is derived from that id, so that every copy of the command
            // (a retry, a redelivery to another instance) places the same order.
            generated_order_id = place.order_id.is_none() && explicit_id.is_none();
            let order_id = match (place.order_id, &explicit_id) {
                (Some(id), _) => id,
                (None, Some(command_id)) => OrderId::parse(
                    uuid::Uuid::new_v5(&ORDER_ID_NAMESPACE, command_id.as_bytes()).to_string(),
                )?,
                (None, None) => OrderId::parse(uuid::Uuid::now_v7().to_string())?,
            };
            let natural_key = Some(format!("order.place:{order_id}"));
            let lines = place
                .lines
                .into_iter()
                .map(|line| OrderLine {
                    sku: line.sku,
                    qty: line.qty.get(),
                    unit_price_cents: line.unit_price_cents,
                })
                .collect();
            let command = OrderCommand::Place {
                customer_id: place.customer_id,
                order_id,
                lines,
                currency: place.currency.unwrap_or_default(),
            };
            (Command::Order(command), natural_key)
        }
        CommandRequest::CancelOrder(cancel) => {
            let key = format!("order.cancel:{}", cancel.order_id);
            let command = OrderCommand::Cancel {
                order_id: cancel.order_id,
                reason: cancel.reason.map(String::from),
            };
            (Command::Order(command), Some(key))
        }
        CommandRequest::ShipOrder(ship) => {
            let key = format!("order.ship:{}", ship.order_id);
            let command = OrderCommand::Ship {
                order_id: ship.order_id,
            };
            (Command::Order(command), Some(key))
        }
        CommandRequest::ConfirmOrder(confirm) => {
            let key = format!("order.confirm:{}", confirm.order_id);
            let command = OrderCommand::Confirm {
                order_id: confirm.order_id,
            };
            (Command::Order(command), Some(key))
        }
        CommandRequest::RejectOrder(reject) => {
            let key = format!("order.reject:{}", reject.order_id);
            let command = OrderCommand::Reject {
                order_id: reject.order_id,
                reason: reject.reason.into(),
            };
            (Command::Order(command), Some(key))
        }
        CommandRequest::ReceiveStock(receive) => {
            let command = StockCommand::Receive {
                sku: receive.sku,
                qty: receive.qty.get(),
            };
            // Two deliveries of the same quantity are both real: receive has no natural key.
            (Command::Stock(command), None)
        }
        CommandRequest::ReserveStock(reserve) => {
            let key = format!("stock.reserve:{}:{}", reserve.sku, reserve.order_id);
            let command = StockCommand::Reserve {
                sku: reserve.sku,
                order_id: reserve.order_id,
                qty: reserve.qty.get(),
            };
            (Command::Stock(command), Some(key))
        }
        CommandRequest::ReleaseStock(release) => {
            let key = format!("stock.release:{}:{}", release.sku, release.order_id);
            let command = StockCommand::Release {
                sku: release.sku,
                order_id: release.order_id,
            };
            (Command::Stock(command), Some(key))
        }
        CommandRequest::DeductStock(deduct) => {
            let key = format!("stock.deduct:{}:{}", deduct.sku, deduct.order_id);
            let command = StockCommand::Deduct {
                sku: deduct.sku,
                order_id: deduct.order_id,
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
        generated_order_id,
    })
}

impl ParsedRequest {
    /// The aggregate the command acts on.
    pub fn aggregate(&self) -> AggregateId {
        match &self.command {
            Command::Order(command) => AggregateId::Order(command.order_id().clone()),
            Command::Stock(command) => AggregateId::Stock(command.sku().clone()),
        }
    }

    /// The request's body as it is sent on to another instance: `body` itself, or with the
    /// order id generated here, so that the copy places the same order (in the same partition).
    pub fn body_to_forward(&self, body: &bytes::Bytes) -> bytes::Bytes {
        let Command::Order(OrderCommand::Place { order_id, .. }) = &self.command else {
            return body.clone();
        };
        if !self.generated_order_id {
            return body.clone();
        }
        let mut value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if let Value::Object(fields) = &mut value {
            fields.insert("order_id".into(), Value::String(order_id.to_string()));
        }
        serde_json::to_vec(&value).unwrap_or_default().into()
    }

    /// Asks for the command to be voided if its id has not run. Only a reserve of ordo's own
    /// account, under an id it chose, can be: the saga's compensation of a reserve it may have
    /// sent.
    pub fn void_if_not_run(mut self, caller: &Caller) -> Result<Self, InvalidCommand> {
        if self.endpoint != Endpoint::StockReserve
            || *caller != Caller::OwnAccount
            || !self.explicit_id
        {
            return Err(InvalidCommand(format!(
                "{} is for the saga's stock.reserve under its own command id",
                headers::VOID_IF_NOT_RUN
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

#[cfg(test)]
mod tests;
