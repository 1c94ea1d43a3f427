//! The JSON Schemas in `contracts/` are the wire types' own: generated from them, held to them
//! here (`ORDO_WRITE_CONTRACTS=1 cargo test -p ordo-contract --test schemas` writes them again
//! after a change of the contract), and saying the same rules the types enforce.

use std::path::{Path, PathBuf};

use ordo_contract::{
    Endpoint,
    schema::{contract_files, reply_schema, request_schema},
};
use serde_json::{Value, json};

fn contracts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contracts")
}

#[test]
fn the_files_in_contracts_are_what_the_wire_types_generate() {
    let dir = contracts_dir();
    let mut files = ordo_testkit::generated::GeneratedFiles::default();
    for (path, generated) in contract_files() {
        files.hold(&dir.join(path), &generated);
    }
    files.assert_fresh("cargo test -p ordo-contract --test schemas");
    // And nothing else: a file of a subject that no longer exists would mislead.
    let listed = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    // openapi.json is the read API's (ordo-api's tests hold it).
    assert_eq!(listed(&dir), ["commands", "openapi.json", "reply.json"]);
    let mut expected: Vec<String> = contract_files()
        .into_iter()
        .filter_map(|(path, _)| path.strip_prefix("commands/").map(str::to_owned))
        .collect();
    expected.sort();
    assert_eq!(listed(&dir.join("commands")), expected);
}

/// The schema a property refers to (`$ref`, or its items' `$ref`), from `$defs`.
fn definition<'a>(schema: &'a Value, property: &Value) -> &'a Value {
    let reference = property["$ref"]
        .as_str()
        .or_else(|| property["items"]["$ref"].as_str())
        .unwrap_or_else(|| panic!("no $ref in {property}"));
    let name = reference.rsplit('/').next().unwrap();
    &schema["$defs"][name]
}

#[test]
fn a_request_schema_says_what_the_service_checks() {
    let place = request_schema(Endpoint::OrderPlace);
    assert_eq!(place["x-ordo-subject"], "ordo.cmd.order.place");
    assert_eq!(place["x-ordo-internal"], false);
    // Unknown fields are refused, and these are required.
    assert_eq!(place["additionalProperties"], false);
    assert_eq!(place["required"], json!(["customer_id", "lines"]));
    assert_eq!(place["properties"]["lines"]["minItems"], 1);
    let line = definition(&place, &place["properties"]["lines"]);
    assert_eq!(line["additionalProperties"], false);
    let qty = definition(&place, &line["properties"]["qty"]);
    assert_eq!(
        (qty["minimum"].clone(), qty["maximum"].clone()),
        (json!(1), json!(u32::MAX))
    );

    // The command id may ride in the body of any request.
    let command_id = &place["properties"]["command_id"]["anyOf"];
    assert_eq!(command_id[0], json!({"type": "null"}));
    let command_id = &command_id[1];
    let pattern = regex::Regex::new(command_id["pattern"].as_str().unwrap()).unwrap();
    for (id, valid) in [
        ("delivery-7", true),
        ("a:b.c_d~!", true),
        ("", false),
        ("with space", false),
        ("shop/7", false),
        ("é", false),
    ] {
        assert_eq!(pattern.is_match(id), valid, "{id:?}");
    }
    assert!(!pattern.is_match(&"x".repeat(ordo_contract::MAX_COMMAND_ID_LEN + 1)));

    // The saga's commands, in their own subject space, are marked internal; only theirs may
    // carry the saga's command ids.
    for endpoint in Endpoint::ALL {
        let schema = request_schema(endpoint);
        let internal = endpoint.subject().starts_with("ordo.internal.");
        assert_eq!(
            schema["x-ordo-internal"],
            internal,
            "{}",
            endpoint.subject()
        );
        let refused = schema["properties"]["command_id"]["anyOf"][1]["not"]["anyOf"]
            .as_array()
            .unwrap()
            .iter()
            .any(|not| not["pattern"] == "^saga:");
        assert_eq!(refused, !internal, "{}", endpoint.subject());
    }
}

/// Each reply the service can send has the keys the schema's branch for it requires, and no
/// key that branch does not name.
#[test]
fn every_reply_has_the_shape_of_its_branch_of_the_schema() {
    use ordo_contract::{AggregateId, ErrorCode, OrderId, Reply, Sku};
    let schema = reply_schema();
    let branches = schema["oneOf"].as_array().unwrap();
    let mut replies = vec![
        Reply::accepted(AggregateId::Order(OrderId::parse("o-1").unwrap()), 1, 7),
        Reply::accepted(AggregateId::Stock(Sku::parse("A1").unwrap()), 3, 9),
    ];
    for code in ErrorCode::ALL {
        replies.push(Reply::refused(code, "why"));
    }
    replies.push(Reply::Refused {
        code: ErrorCode::Unavailable,
        message: "shed".into(),
        retry_after_ms: Some(250),
    });
    for reply in replies {
        let wire: Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
        let branch = branches
            .iter()
            .find(|branch| branch["properties"]["ok"]["const"] == wire["ok"])
            .unwrap();
        let keys = |object: &Value| -> Vec<String> {
            object.as_object().unwrap().keys().cloned().collect()
        };
        for required in branch["required"].as_array().unwrap() {
            assert!(
                wire.get(required.as_str().unwrap()).is_some(),
                "{wire} lacks {required}"
            );
        }
        for key in keys(&wire) {
            assert!(
                branch["properties"].get(&key).is_some(),
                "{wire}: {key} is not in the schema"
            );
        }
        if let Some(error) = wire.get("error") {
            let error_schema = &branch["properties"]["error"];
            for required in error_schema["required"].as_array().unwrap() {
                assert!(
                    error.get(required.as_str().unwrap()).is_some(),
                    "{wire} lacks error.{required}"
                );
            }
            for key in keys(error) {
                assert!(
                    error_schema["properties"].get(&key).is_some(),
                    "{wire}: error.{key}"
                );
            }
        } else {
            // Accepted: exactly one of order_id and sku.
            assert!(
                wire.get("order_id").is_some() != wire.get("sku").is_some(),
                "{wire}"
            );
        }
    }
}

#[test]
fn the_id_pattern_accepts_exactly_the_ids_the_domain_accepts() {
    let ship = request_schema(Endpoint::OrderShip);
    let id = definition(&ship, &ship["properties"]["order_id"]);
    let pattern = regex::Regex::new(id["pattern"].as_str().unwrap()).unwrap();
    let long = "a".repeat(64);
    let too_long = "a".repeat(65);
    for candidate in [
        "o-1",
        "019aaf3c-6d1e-7c52-a7f4-2f0c3f1d9a10",
        "A_b-9",
        long.as_str(),
        too_long.as_str(),
        "",
        "o.1",
        "o 1",
        "o*",
        "o>",
        "é",
        "o/1",
        "a\n",
    ] {
        assert_eq!(
            pattern.is_match(candidate),
            ordo_domain::ids::is_valid_id(candidate),
            "{candidate:?}"
        );
    }
}

#[test]
fn the_reply_schema_names_every_error_code() {
    let reply = reply_schema();
    // One constant per code, each with what it means.
    let codes: Vec<String> = reply["$defs"]["ErrorCode"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|code| {
            assert!(code["description"].is_string(), "{code}");
            code["const"].as_str().unwrap().to_owned()
        })
        .collect();
    let expected: Vec<String> = ordo_contract::ErrorCode::ALL
        .iter()
        .map(|code| code.as_str().to_owned())
        .collect();
    assert_eq!(codes, expected);
}
