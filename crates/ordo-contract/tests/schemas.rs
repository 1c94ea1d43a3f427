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
    let rewrite = std::env::var_os("ORDO_WRITE_CONTRACTS").is_some();
    for (path, generated) in contract_files() {
        let file = dir.join(&path);
        if rewrite {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            committed == generated,
            "contracts/{path} differs from the wire types: run \
             `ORDO_WRITE_CONTRACTS=1 cargo test -p ordo-contract --test schemas` and commit it"
        );
    }
    // And nothing else: a file of a subject that no longer exists would mislead.
    let mut files: Vec<String> = std::fs::read_dir(dir.join("commands"))
        .unwrap()
        .map(|entry| format!("commands/{}", entry.unwrap().file_name().to_string_lossy()))
        .collect();
    files.push("reply.json".to_owned());
    files.sort();
    let mut expected: Vec<String> = contract_files().into_iter().map(|(path, _)| path).collect();
    expected.sort();
    assert_eq!(files, expected);
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
    let command_id = &place["properties"]["command_id"];
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

    // The saga's commands are marked internal.
    for endpoint in Endpoint::ALL {
        assert_eq!(
            request_schema(endpoint)["x-ordo-internal"],
            endpoint.is_internal(),
            "{}",
            endpoint.subject()
        );
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
    assert_eq!(reply["required"], json!(["ok"]));
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
