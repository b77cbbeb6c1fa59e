//! docs/openapi.json (served at /openapi.json) lists every route the server registers:
//! each `.route(...)` in src/api must appear in it with the same methods.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

use std::collections::{BTreeMap, BTreeSet};

/// (path, methods) of every `.route("path", method(handler)...)` in src/api.
fn registered_routes() -> BTreeMap<String, BTreeSet<String>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("src/api") {
        let source = std::fs::read_to_string(entry.expect("entry").path()).expect("source");
        for part in source.split(".route(\"").skip(1) {
            let (path, rest) = part.split_once('"').expect("route path");
            let call = &rest[..rest.find(")\n").unwrap_or(rest.len())];
            let methods = routes.entry(path.to_string()).or_default();
            for method in ["get", "post", "put", "delete", "patch"] {
                if call.contains(&format!("{method}(")) {
                    methods.insert(method.to_string());
                }
            }
        }
    }
    routes
}

fn documented_routes() -> BTreeMap<String, BTreeSet<String>> {
    let doc: serde_json::Value = serde_json::from_str(herald::api::OPENAPI).expect("docs/openapi.json is JSON");
    doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, item)| {
            // OpenAPI names path parameters after the API's fields; axum after handlers.
            let shape =
                path.split('/').map(|s| if s.starts_with('{') { "{}" } else { s }).collect::<Vec<_>>().join("/");
            (shape, item.as_object().expect("path item").keys().cloned().collect())
        })
        .collect()
}

#[test]
fn every_route_is_documented_with_its_methods() {
    let documented = documented_routes();
    let registered = registered_routes();
    assert!(registered.len() >= 15, "found the routes: {registered:?}");
    for (path, methods) in &registered {
        let shape = path.split('/').map(|s| if s.starts_with('{') { "{}" } else { s }).collect::<Vec<_>>().join("/");
        let doc_methods = documented.get(&shape).unwrap_or_else(|| panic!("{path} is missing from docs/openapi.json"));
        assert_eq!(doc_methods, methods, "{path}: methods differ");
    }
    assert_eq!(documented.len(), registered.len(), "docs/openapi.json documents routes the server does not have");
}
