//! The read API's OpenAPI document: generated from the handlers and the types they return,
//! committed as `contracts/openapi.json` and held to them here
//! (`ORDO_WRITE_CONTRACTS=1 cargo test -p ordo-api --test openapi` writes it again after a
//! change). That every answer of a running API fits it is tested against `ordo up`
//! (crates/ordo/tests/cli.rs).

use std::path::Path;

use serde_json::Value;

fn document() -> Value {
    serde_json::to_value(ordo_api::openapi_document()).unwrap()
}

#[test]
fn contracts_openapi_json_is_what_the_handlers_generate() {
    let generated = ordo_api::openapi_document().to_pretty_json().unwrap() + "\n";
    let mut files = ordo_testkit::generated::GeneratedFiles::default();
    files.hold(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contracts/openapi.json"),
        &generated,
    );
    files.assert_fresh("cargo test -p ordo-api --test openapi");
}

#[test]
fn every_route_is_described_with_its_answers_and_who_may_call_it() {
    let document = document();
    assert_eq!(document["openapi"], "3.1.0");
    let paths: Vec<&str> = document["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        paths,
        [
            "/healthz",
            "/metrics",
            "/notifications",
            "/orders",
            "/orders/{order_id}",
            "/orders/{order_id}/history",
            "/projections",
            "/readyz",
            "/sagas/{order_id}",
            "/stock/{sku}",
        ]
    );
    let responses = |path: &str| -> Vec<String> {
        let mut statuses: Vec<String> = document["paths"][path]["get"]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        statuses.sort();
        statuses
    };
    assert_eq!(
        responses("/orders/{order_id}"),
        ["200", "400", "401", "404", "500", "503", "504"]
    );
    assert_eq!(
        responses("/orders/{order_id}/history"),
        ["200", "400", "401", "404", "500", "503"]
    );
    assert_eq!(responses("/healthz"), ["200"]);
    assert_eq!(responses("/readyz"), ["200", "401", "503"]);
    // A bearer token for every path but /healthz, which never asks for one.
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(document["security"][0]["bearer"], serde_json::json!([]));
    assert_eq!(
        document["paths"]["/healthz"]["get"]["security"],
        serde_json::json!([{}])
    );
    // Closed sets are enums a client can generate types from.
    assert_eq!(
        document["components"]["schemas"]["OrderStatus"]["enum"],
        serde_json::json!(["pending", "confirmed", "rejected", "cancelled", "shipped"])
    );
    // A field that may be null is always sent, as null: required, and null among its types.
    let order = &document["components"]["schemas"]["Order"];
    assert!(
        order["required"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("reason")),
        "{order}"
    );
    assert_eq!(
        order["properties"]["reason"]["type"],
        serde_json::json!(["string", "null"])
    );
    let parameters: Vec<&str> = document["paths"]["/orders"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|parameter| parameter["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        parameters,
        ["customer_id", "status", "limit", "cursor", "min_seq"]
    );
}
