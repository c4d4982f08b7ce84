//! `docs/openapi.json` is the document the server serves: regenerate it with
//! `UPDATE_OPENAPI=1 cargo test -p gateway-server --test openapi` after changing the API.

use std::path::Path;

#[test]
fn the_checked_in_openapi_document_is_current() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let current =
        serde_json::to_string_pretty(&gateway_server::openapi::document()).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&file, &current).unwrap();
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        checked_in == current,
        "docs/openapi.json is out of date: run UPDATE_OPENAPI=1 cargo test -p gateway-server --test openapi"
    );
}

#[test]
fn every_route_refers_only_to_schemas_it_defines() {
    let doc = gateway_server::openapi::document();
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &part[..part.find('"').unwrap()];
        assert!(
            schemas.contains_key(name),
            "{name} is referred to but not defined"
        );
    }
    for name in [
        "ClusterModel",
        "ClusterDetails",
        "UsageReport",
        "ClusterEvents",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "{name}");
    }
    // The cluster model has exactly the eight keys the stock client accepts.
    let model = schemas["ClusterModel"]["properties"].as_object().unwrap();
    assert_eq!(model.len(), 8, "{model:?}");
}
