//! JSON Schemas of the contract, generated from the wire types with schemars: what a client in
//! another language validates its requests and reads its replies against. They are kept in the
//! repository's `contracts/` (a test holds the files to these types) and carried in each micro
//! endpoint's metadata (`nats micro info ordo`).
//!
//! The domain's ids and the contract's checked numbers and reasons are read by hand-written
//! deserializers; their schemas here say the same rules (the tests check the id pattern against
//! the domain's own check).

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::Value;

use crate::{
    Endpoint, MAX_NUMBER, Quantity, Reason, Reply,
    request::{
        CancelOrder, ConfirmOrder, DeductStock, PlaceOrder, ReceiveStock, RejectOrder,
        ReleaseStock, ReserveStock, ShipOrder,
    },
};

/// An id of an order, a customer or a SKU: it becomes a NATS subject token.
pub(crate) struct Id;

impl JsonSchema for Id {
    fn schema_name() -> Cow<'static, str> {
        "Id".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[A-Za-z0-9_-]{1,64}$",
            // Validators whose `$` matches before a final newline (Python's) would take "o-1\n".
            "not": {"pattern": "\n"},
            "description": "1 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (it becomes a NATS subject token)"
        })
    }
}

/// A currency: three upper-case letters.
pub(crate) struct CurrencyCode;

impl JsonSchema for CurrencyCode {
    fn schema_name() -> Cow<'static, str> {
        "Currency".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^[A-Z]{3}$",
            "not": {"pattern": "\n"},
            "description": "an ISO 4217 code, three upper-case letters; USD when absent"
        })
    }
}

/// A whole number from 0 to [`MAX_NUMBER`] (what PostgreSQL's `bigint` holds).
pub(crate) struct Amount;

impl JsonSchema for Amount {
    fn schema_name() -> Cow<'static, str> {
        "Amount".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_NUMBER,
            "description": "a JSON integer (5, not 5.0)"
        })
    }
}

fn quantity_schema(maximum: u64) -> Schema {
    json_schema!({
        "type": "integer",
        "minimum": 1,
        "maximum": maximum,
        "description": "a whole number greater than 0, as a JSON integer (5, not 5.0)"
    })
}

impl JsonSchema for Quantity<u32> {
    fn schema_name() -> Cow<'static, str> {
        "LineQuantity".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        quantity_schema(u64::from(u32::MAX).min(MAX_NUMBER))
    }
}

impl JsonSchema for Quantity<u64> {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        quantity_schema(MAX_NUMBER)
    }
}

impl JsonSchema for Reason {
    fn schema_name() -> Cow<'static, str> {
        "Reason".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": ordo_domain::order::MAX_REASON_LEN,
            "pattern": "^[^\\u0000]*$",
            "description": "at most 1024 bytes of UTF-8, without U+0000 (maxLength counts characters: a reason of multi-byte characters can pass it and still be refused for its bytes)"
        })
    }
}

/// What the service sends (written out rather than derived: the wire form is one of two shapes,
/// which the serde types only read leniently).
impl JsonSchema for Reply {
    fn schema_name() -> Cow<'static, str> {
        "Reply".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let id = generator.subschema_for::<Id>();
        let code = generator.subschema_for::<crate::ErrorCode>();
        json_schema!({
            "title": "Reply",
            "description": "A command's reply: accepted (the event is durable) or refused (nothing was appended). `ok` comes first.",
            "oneOf": [
                {
                    "title": "Accepted",
                    "type": "object",
                    "properties": {
                        "ok": {"const": true},
                        "order_id": id,
                        "sku": id,
                        "version": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "How many events the order or SKU has, this command's included."
                        },
                        "seq": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "The event's stream sequence: a read with `?min_seq=` waits for it."
                        }
                    },
                    "required": ["ok", "version", "seq"],
                    "oneOf": [{"required": ["order_id"]}, {"required": ["sku"]}]
                },
                {
                    "title": "Refused",
                    "type": "object",
                    "properties": {
                        "ok": {"const": false},
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": code,
                                "message": {"type": "string", "description": "Why, for people."},
                                "retry_after_ms": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "description": "With unavailable (load shed, a partition moving) and rate_limited: how long to wait before sending the command again."
                                }
                            },
                            "required": ["code", "message"]
                        }
                    },
                    "required": ["ok", "error"]
                }
            ]
        })
    }
}

/// The schema of a request on `endpoint`, with its subject and whether it is internal (the
/// saga's: no application may send it).
pub fn request_schema(endpoint: Endpoint) -> Value {
    let mut schema = match endpoint {
        Endpoint::OrderPlace => schemars::schema_for!(PlaceOrder),
        Endpoint::OrderCancel => schemars::schema_for!(CancelOrder),
        Endpoint::OrderShip => schemars::schema_for!(ShipOrder),
        Endpoint::OrderConfirm => schemars::schema_for!(ConfirmOrder),
        Endpoint::OrderReject => schemars::schema_for!(RejectOrder),
        Endpoint::StockReceive => schemars::schema_for!(ReceiveStock),
        Endpoint::StockReserve => schemars::schema_for!(ReserveStock),
        Endpoint::StockRelease => schemars::schema_for!(ReleaseStock),
        Endpoint::StockDeduct => schemars::schema_for!(DeductStock),
    }
    .to_value();
    // Every body may carry the command id, which the service takes out before it reads the
    // body as its type (the `Nats-Msg-Id` header wins over it).
    let prefix = ordo_domain::saga::COMMAND_ID_PREFIX;
    let mut not = vec![serde_json::json!({"pattern": "\n"})];
    if !endpoint.is_internal() {
        not.push(serde_json::json!({"pattern": format!("^{prefix}")}));
    }
    // (`not` only inside the string branch: a pattern holds for any non-string, so a `not` of
    // patterns beside `null` would refuse the null the service takes.)
    schema["properties"]["command_id"] = serde_json::json!({
        "anyOf": [
            {"type": "null"},
            {
                "type": "string",
                "pattern": format!("^[!-.0-~]{{1,{}}}$", crate::MAX_COMMAND_ID_LEN),
                "not": {"anyOf": not}
            }
        ],
        "description": format!(
            "The command id, as the Nats-Msg-Id header (which wins) gives it: 1 to {} printable \
             ASCII characters without spaces or '/'. A request sent again under it runs at most \
             once and gets the first outcome. Ids that begin with {prefix:?} are the saga's.",
            crate::MAX_COMMAND_ID_LEN,
        ),
    });
    // What a schema cannot say.
    let also = match endpoint {
        Endpoint::OrderPlace => format!(
            " Also refused: a SKU on two lines, an order total over {MAX_NUMBER}, a body over \
             {} bytes.",
            crate::MAX_BODY_BYTES
        ),
        _ => format!(
            " Also refused: a body over {} bytes.",
            crate::MAX_BODY_BYTES
        ),
    };
    let described = format!(
        "{}{also}",
        schema["description"].as_str().unwrap_or_default()
    );
    schema["description"] = described.into();
    schema["x-ordo-subject"] = endpoint.subject().into();
    schema["x-ordo-internal"] = endpoint.is_internal().into();
    schema
}

/// The schema of every reply, accepted or refused.
pub fn reply_schema() -> Value {
    schemars::schema_for!(Reply).to_value()
}

/// The files of `contracts/`, by path under it, as the types generate them today.
pub fn contract_files() -> Vec<(String, String)> {
    let pretty = |value: &Value| {
        let mut text = serde_json::to_string_pretty(value).expect("schemas serialize");
        text.push('\n');
        text
    };
    Endpoint::ALL
        .iter()
        .map(|endpoint| {
            (
                format!("commands/{}.json", endpoint.subject()),
                pretty(&request_schema(*endpoint)),
            )
        })
        .chain(std::iter::once((
            "reply.json".to_owned(),
            pretty(&reply_schema()),
        )))
        .collect()
}
