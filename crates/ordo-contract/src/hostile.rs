//! Hostile requests, generated: what a careless or malicious client may send to each command
//! subject. Every one of them must be refused as `invalid_command` and change nothing. Used by
//! the wire parser's property tests and by the service test that sends thousands over NATS.

use rand::{Rng, seq::IndexedRandom};
use serde_json::{Value, json};

use crate::{Endpoint, MAX_BODY_BYTES};

/// A request that must be refused.
#[derive(Debug, Clone)]
pub struct Hostile {
    pub endpoint: Endpoint,
    pub body: Vec<u8>,
    /// A `Nats-Msg-Id` to send with it.
    pub command_id: Option<String>,
    /// What is wrong with it, for failure messages.
    pub kind: &'static str,
}

/// A valid body for `endpoint`: the base every mutation starts from.
pub fn valid_body(endpoint: Endpoint) -> Value {
    match endpoint {
        Endpoint::OrderPlace => json!({"order_id": "o-1", "customer_id": "c1",
            "lines": [{"sku": "A1", "qty": 2, "unit_price_cents": 500}], "currency": "USD"}),
        Endpoint::OrderCancel => json!({"order_id": "o-1", "reason": "why"}),
        Endpoint::OrderShip | Endpoint::OrderConfirm => json!({"order_id": "o-1"}),
        Endpoint::OrderReject => json!({"order_id": "o-1", "reason": "why"}),
        Endpoint::StockReceive => json!({"sku": "A1", "qty": 5}),
        Endpoint::StockReserve => json!({"sku": "A1", "order_id": "o-1", "qty": 2}),
        Endpoint::StockRelease | Endpoint::StockDeduct => json!({"sku": "A1", "order_id": "o-1"}),
    }
}

/// Ids that cannot be subject tokens.
const BAD_IDS: [&str; 12] = [
    "",
    "a.b",
    "a b",
    "*",
    ">",
    "a>",
    "o-1.>",
    "é",
    "a\u{0}b",
    "tab\t",
    "semi;colon",
    "sixty-five-characters-are-one-too-many-for-an-id-aaaaaaaaaaaaaaaaa",
];

/// Numbers no count or amount can be: negative, zero, fractional, past 64 bits, as strings.
fn bad_quantity(rng: &mut impl Rng) -> Value {
    let choices = [
        json!(0),
        json!(-1),
        json!(rng.random_range(i64::MIN..0)),
        json!(1.5),
        json!(1e308),
        json!(u64::MAX),
        serde_json::from_str("18446744073709551616").expect("a JSON number"),
        json!("5"),
        Value::Null,
        json!([5]),
    ];
    choices.choose(rng).expect("not empty").clone()
}

/// A value of another type than `field` holds.
fn wrong_type(field: &str, rng: &mut impl Rng) -> Value {
    let candidates: &[Value] = match field {
        "qty" => &[json!(true), json!({}), json!(["x"]), json!("5")],
        "lines" => &[json!(42), json!(true), json!({}), json!(["x"]), json!("A1")],
        _ => &[
            json!(42),
            json!(true),
            json!([]),
            json!({}),
            json!(-0.0),
            json!(["x"]),
        ],
    };
    candidates.choose(rng).expect("not empty").clone()
}

/// One hostile request for `endpoint`.
pub fn generate(endpoint: Endpoint, rng: &mut impl Rng) -> Hostile {
    let mut body = valid_body(endpoint);
    let fields: Vec<String> = body
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    let id_fields: Vec<&String> = fields
        .iter()
        .filter(|f| ["order_id", "customer_id", "sku"].contains(&f.as_str()))
        .collect();
    let hostile = |body: Vec<u8>, kind| Hostile {
        endpoint,
        body,
        command_id: None,
        kind,
    };
    let json = |value: &Value| serde_json::to_vec(value).expect("JSON");
    match rng.random_range(0..10) {
        0 => {
            // Not JSON: random bytes, or valid JSON cut short.
            let text = json(&body);
            let cut = rng.random_range(0..text.len());
            let bytes = if rng.random_bool(0.5) {
                text[..cut].to_vec()
            } else {
                (0..rng.random_range(1..64))
                    .map(|_| rng.random::<u8>())
                    .collect()
            };
            // Random bytes could form a valid body by chance only if they were an object.
            let bytes = if bytes.first() == Some(&b'{') {
                bytes[1..].to_vec()
            } else {
                bytes
            };
            hostile(bytes, "not JSON")
        }
        1 => {
            let not_object = [
                json!([1, 2]),
                json!("text"),
                json!(7),
                Value::Null,
                json!(true),
            ];
            hostile(
                json(not_object.choose(rng).expect("not empty")),
                "not an object",
            )
        }
        2 => {
            let field = fields.choose(rng).expect("fields").clone();
            body.as_object_mut().expect("an object").remove(&field);
            // Only required fields make a body invalid when missing.
            let optional = matches!(
                (endpoint, field.as_str()),
                (Endpoint::OrderPlace, "order_id" | "currency") | (Endpoint::OrderCancel, "reason")
            );
            if optional {
                body["surplus"] = json!(1);
            }
            hostile(json(&body), "a required field missing")
        }
        3 => {
            let field = fields.choose(rng).expect("fields").clone();
            body[field.as_str()] = wrong_type(&field, rng);
            hostile(json(&body), "a field of the wrong type")
        }
        4 => {
            match endpoint {
                Endpoint::OrderPlace => {
                    let (what, value) = if rng.random_bool(0.5) {
                        ("qty", bad_quantity(rng))
                    } else {
                        let price = [json!(-1), json!(0.5), json!(u64::MAX), json!("500")];
                        (
                            "unit_price_cents",
                            price.choose(rng).expect("not empty").clone(),
                        )
                    };
                    body["lines"][0][what] = value;
                }
                Endpoint::StockReceive | Endpoint::StockReserve => body["qty"] = bad_quantity(rng),
                // No number on this subject: a number where an id goes.
                _ => body[id_fields[0].as_str()] = json!(rng.random::<i64>()),
            }
            hostile(json(&body), "a number no count or amount can be")
        }
        5 => {
            let field = id_fields.choose(rng).expect("every subject has an id");
            body[field.as_str()] = json!(BAD_IDS.choose(rng).expect("not empty"));
            hostile(json(&body), "an id that is not a subject token")
        }
        6 => {
            let padding = "x".repeat(MAX_BODY_BYTES + rng.random_range(1..4096));
            body["padding"] = json!(padding);
            hostile(json(&body), "an oversized body")
        }
        7 => {
            body[["colour", "ok", "Order_id", "__proto__"]
                .choose(rng)
                .expect("not empty")
                .to_owned()] = json!("surprise");
            hostile(json(&body), "an unknown field")
        }
        9 => {
            // A string PostgreSQL's text and jsonb cannot hold (U+0000), among any other text,
            // in the free-text field where there is one, else in an id.
            let around: String = (0..rng.random_range(0..8))
                .map(|_| rng.random::<char>())
                .collect();
            let at = around
                .char_indices()
                .map(|(i, _)| i)
                .chain([around.len()])
                .collect::<Vec<_>>();
            let at = *at.choose(rng).expect("not empty");
            let text = format!("{}\u{0}{}", &around[..at], &around[at..]);
            let field = if body.get("reason").is_some() {
                "reason"
            } else {
                id_fields
                    .choose(rng)
                    .expect("every subject has an id")
                    .as_str()
            };
            body[field] = json!(text);
            hostile(json(&body), "a string PostgreSQL cannot hold")
        }
        _ => {
            let bad = ["has space", "", &"x".repeat(200), "tab\there", "ünï"];
            Hostile {
                command_id: Some(bad.choose(rng).expect("not empty").to_string()),
                ..hostile(json(&body), "a command id that is not printable ASCII")
            }
        }
    }
}
