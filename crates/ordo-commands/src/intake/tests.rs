//! The intake's specification: what is refused and why, where command ids come from, and
//! that whatever is accepted is a well-formed command.

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
    assert!(invalid(Endpoint::StockReceive, "{\"sku\":").starts_with("the body is not valid JSON"));
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
        "qty: must be greater than 0, got 0"
    );
    assert_eq!(
        invalid(
            Endpoint::OrderPlace,
            r#"{"customer_id":"c1","lines":[{"sku":"A1","qty":-2,"unit_price_cents":1}]}"#
        ),
        "lines[0].qty: must be greater than 0, got -2"
    );
    let price = invalid(
        Endpoint::OrderPlace,
        r#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":-1}]}"#,
    );
    assert!(price.starts_with("lines[0].unit_price_cents: "), "{price}");
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

/// The typed request that `parsed` came from, as a client would send it.
fn typed_request(parsed: &ParsedRequest) -> CommandRequest {
    use ordo_contract::*;
    let qty = |qty: u64| Quantity::new(qty).expect("commands hold positive quantities");
    let reason = |reason: &str| Reason::new(reason).expect("commands hold valid reasons");
    match parsed.command.clone() {
        Command::Order(OrderCommand::Place {
            order_id,
            customer_id,
            lines,
            currency,
        }) => CommandRequest::PlaceOrder(PlaceOrder {
            order_id: Some(order_id),
            customer_id,
            lines: lines
                .into_iter()
                .map(|line| Line {
                    sku: line.sku,
                    qty: Quantity::new(line.qty).expect("lines hold positive quantities"),
                    unit_price_cents: line.unit_price_cents,
                })
                .collect(),
            currency: Some(currency),
        }),
        Command::Order(OrderCommand::Cancel {
            order_id,
            reason: why,
        }) => CommandRequest::CancelOrder(CancelOrder {
            order_id,
            reason: why.as_deref().map(reason),
        }),
        Command::Order(OrderCommand::Ship { order_id }) => {
            CommandRequest::ShipOrder(ShipOrder { order_id })
        }
        Command::Order(OrderCommand::Confirm { order_id }) => {
            CommandRequest::ConfirmOrder(ConfirmOrder { order_id })
        }
        Command::Order(OrderCommand::Reject {
            order_id,
            reason: why,
        }) => CommandRequest::RejectOrder(RejectOrder {
            order_id,
            reason: reason(&why),
        }),
        Command::Stock(StockCommand::Receive { sku, qty: n }) => {
            CommandRequest::ReceiveStock(ReceiveStock { sku, qty: qty(n) })
        }
        Command::Stock(StockCommand::Reserve {
            sku,
            order_id,
            qty: n,
        }) => CommandRequest::ReserveStock(ReserveStock {
            sku,
            order_id,
            qty: qty(n),
        }),
        Command::Stock(StockCommand::Release { sku, order_id }) => {
            CommandRequest::ReleaseStock(ReleaseStock { sku, order_id })
        }
        Command::Stock(StockCommand::Deduct { sku, order_id }) => {
            CommandRequest::DeductStock(DeductStock { sku, order_id })
        }
    }
}

#[test]
fn every_typed_request_is_what_the_service_parses() {
    for endpoint in Endpoint::ALL {
        // Every field given (an order id, a currency), so the command says all the request did.
        let body = ordo_contract::hostile::valid_body(endpoint);
        let request = CommandRequest::from_body(endpoint, body).unwrap();
        let parsed = parse(endpoint, &request.body_bytes(), None)
            .unwrap_or_else(|err| panic!("{request:?}: {err}"));
        assert_eq!(typed_request(&parsed), request);
    }
}

mod properties {
    use super::{super::*, parse, typed_request};
    use ordo_contract::hostile;
    use ordo_domain::order::MAX_REASON_LEN;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::StdRng};
    use serde_json::json;

    fn endpoint() -> impl Strategy<Value = Endpoint> {
        (0..Endpoint::ALL.len()).prop_map(|i| Endpoint::ALL[i])
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
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
        (
            id_value(),
            qty_value(),
            prop_oneof![8 => (0..=100_000i64).prop_map(Value::from), 1 => Just(Value::from(-1))],
        )
            .prop_map(
                |(sku, qty, price)| json!({"sku": sku, "qty": qty, "unit_price_cents": price}),
            )
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

    /// A request to any endpoint: any JSON value, or (three times in four) one shaped like the
    /// endpoint's body with mostly valid fields.
    pub(super) fn any_request() -> impl Strategy<Value = (Endpoint, Value)> {
        endpoint().prop_flat_map(|endpoint| {
            (
                Just(endpoint),
                prop_oneof![1 => json_value().boxed(), 3 => request_body(endpoint)],
            )
        })
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
        runner
            .run(&any_request(), |(endpoint, value)| {
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

/// contracts/ says what the service reads. Over bodies shaped like each endpoint's (mostly valid)
/// and any JSON, the endpoint's JSON Schema accepts what the service accepts and refuses what it
/// refuses, but for what no schema can say: a body over the size limit, a reason of at most
/// 1,024 characters that is over 1,024 bytes. Both verdicts are counted, so that agreement
/// cannot come from refusing everything.
#[test]
fn the_json_schemas_accept_exactly_what_the_service_accepts() {
    use proptest::{
        prelude::*,
        test_runner::{Config, TestRunner},
    };
    let validators = request_validators();
    let cases = 3000;
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    runner
        .run(&properties::any_request(), |(endpoint, value)| {
            let bytes = serde_json::to_vec(&value).unwrap();
            // The lines' count (at least one, at most MAX_LINES) is checked with the order's
            // other rules, after the body is read: the service refuses it all the same.
            let lines_out_of_bounds = value["lines"].as_array().is_some_and(|lines| {
                lines.is_empty() || lines.len() > ordo_domain::order::MAX_LINES
            });
            let service = parse(endpoint, &bytes, None).is_ok() && !lines_out_of_bounds;
            let schema = validators[endpoint.index()].is_valid(&value);
            let beyond_a_schema = bytes.len() > MAX_BODY_BYTES
                || value["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.len() > ordo_domain::order::MAX_REASON_LEN)
                || has_whole_float(&value);
            if service != schema && !beyond_a_schema {
                prop_assert!(
                    false,
                    "{}: the service {} and the schema {} {value}",
                    endpoint.subject(),
                    if service { "accepts" } else { "refuses" },
                    if schema { "accepts" } else { "refuses" },
                );
            }
            let count = if service { &accepted } else { &refused };
            count.set(count.get() + 1);
            Ok(())
        })
        .unwrap();
    assert!(
        accepted.get() >= cases / 5 && refused.get() >= cases / 5,
        "{} accepted and {} refused of {cases}: the property said little",
        accepted.get(),
        refused.get()
    );
}

/// The JSON Schema of each endpoint's request (contracts/), by [`Endpoint::index`].
fn request_validators() -> Vec<jsonschema::Validator> {
    Endpoint::ALL
        .iter()
        .map(|endpoint| {
            jsonschema::validator_for(&ordo_contract::schema::request_schema(*endpoint)).unwrap()
        })
        .collect()
}

/// A number written as a float with nothing after the point (`5.0`): JSON Schema's `integer`
/// takes it, the service reads whole numbers only (the schemas say "5, not 5.0").
fn has_whole_float(value: &Value) -> bool {
    match value {
        Value::Number(number) => {
            number.is_f64() && number.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        Value::Array(items) => items.iter().any(has_whole_float),
        Value::Object(fields) => fields.values().any(has_whole_float),
        _ => false,
    }
}

/// Every hostile body the service refuses for its content, the schema refuses too (one with a
/// bad command id carries it in the body, where the schema sees it).
#[test]
fn the_json_schemas_refuse_every_hostile_body() {
    use rand::{SeedableRng, rngs::StdRng};
    let validators = request_validators();
    let mut rng = StdRng::seed_from_u64(20261203);
    let mut checked = 0;
    for _ in 0..3000 {
        let endpoint = Endpoint::ALL[checked % Endpoint::ALL.len()];
        let hostile = ordo_contract::hostile::generate(endpoint, &mut rng);
        // Not JSON, or over the size limit: no schema applies.
        let Ok(mut body) = serde_json::from_slice::<Value>(&hostile.body) else {
            continue;
        };
        if hostile.body.len() > MAX_BODY_BYTES {
            continue;
        }
        if let Some(command_id) = hostile.command_id {
            body["command_id"] = command_id.into();
        }
        assert!(
            !validators[endpoint.index()].is_valid(&body),
            "{}: the schema accepts {} ({})",
            endpoint.subject(),
            body,
            hostile.kind
        );
        checked += 1;
    }
    assert!(checked > 2000, "only {checked} hostile bodies were JSON");
}

/// What a request derives is kept in outcome records and events: its fingerprint, its command id
/// under a natural key, the order id a command id places. A later build must derive the very
/// same, or a retry sent across a rolling upgrade would run again. The values are SHA-256 and
/// UUIDv5 worked out apart from this code (Python's `hashlib` and `uuid`).
#[test]
fn the_ids_a_request_derives_are_those_earlier_builds_derived() {
    let ship = parse(Endpoint::OrderShip, br#"{"order_id":"o-1"}"#, None).unwrap();
    assert_eq!(
        ship.fingerprint,
        "3dfbb9574748d9f2049a89cb6d52d934b6ec41f6eddbfe49f19abaf60c731d03"
    );
    assert_eq!(ship.command_id, "order.ship:o-1:3dfbb9574748d9f2");
    // Key order and spacing make no difference: the body is read as canonical JSON.
    let reserve = parse(
        Endpoint::StockReserve,
        br#"{"sku": "A1", "qty": 2, "order_id": "o-1"}"#,
        None,
    )
    .unwrap();
    assert_eq!(
        reserve.fingerprint,
        "bf88de6685d9efd63571555b4b40fb9390e2768c69a796fec8043f6e5084b80d"
    );
    let body = br#"{"customer_id":"c1","lines":[{"sku":"A1","qty":1,"unit_price_cents":1}]}"#;
    let place = parse(Endpoint::OrderPlace, body, Some("delivery-7")).unwrap();
    let Command::Order(OrderCommand::Place { order_id, .. }) = place.command else {
        panic!("not a place");
    };
    assert_eq!(order_id.as_str(), "d31ea1eb-0313-5877-b3cd-246dc2a03fbd");
}
