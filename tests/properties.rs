//! Bad input in process, generated: the search filter, the event parser and the REST body
//! parsers never panic and refuse with a documented code. Needs no control plane.
//! `HERALD_FULL_FAULTS=1` (the full fault suite) runs 50 times the cases.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

fn full_suite() -> bool {
    std::env::var("HERALD_FULL_FAULTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

use herald::compat::ErrorCode;
use herald::compat::input::{parse_ping, parse_subscription, parse_telnet};
use herald::compat::search::{Filter, InputOrder, SearchRequest, search};
use herald::event::{PublishedEvent, StoredEvent, callback_body, event_name, is_noop_update};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::Value;
use serde_json::json;

fn cases() -> u32 {
    if full_suite() { 20_000 } else { 400 }
}

const KEYS: &[&str] = &[
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$regex",
    "$exists",
    "$and",
    "$or",
    "$where",
    "$not",
    "$options",
    "subscription_id",
    "subscription_name",
    "statistics.total",
    "statistics",
    "a..b",
    ".",
    "",
    "event_type",
    "action",
    "obj_type",
    "data",
    "cur_data",
    "pre_data",
    "bk_obj_id",
    "bk_supplier_account",
    "request_id",
    "txn_id",
    "action_time",
    "last_time",
    "condition",
    "fields",
    "page",
    "start",
    "limit",
    "sort",
    "callback_url",
    "subscription_form",
    "confirm_mode",
    "confirm_pattern",
    "time_out",
    "timeout",
    "system_name",
];
const WORDS: &[&str] = &[
    "instdata",
    "relation",
    "association",
    "create",
    "update",
    "delete",
    "host",
    "object",
    "module",
    "hostcreate",
    "httpstatus",
    "regular",
    "200",
    "(",
    ".*",
    "^a$",
    "-subscription_id",
    "subscription_name,-time_out",
    "http://127.0.0.1:9/cb",
    "0",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => select(KEYS).prop_map(str::to_string), 1 => any::<String>()]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        select(WORDS).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key(), inner), 0..6).prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// Events shaped like producers' (right keys, mostly right values), with any value
/// anywhere some of the time.
fn event() -> impl Strategy<Value = Value> {
    let word =
        |words: &'static [&'static str]| prop_oneof![3 => select(words).prop_map(Value::from), 1 => json_value()];
    let item = prop_oneof![
        (json_value(), json_value()).prop_map(|(cur, pre)| json!({"cur_data": cur, "pre_data": pre})),
        ("[a-z]{0,6}", json_value()).prop_map(
            |(id, last)| json!({"cur_data": {"bk_obj_id": id, "last_time": last}, "pre_data": {"bk_obj_id": id}})
        ),
        json_value(),
    ];
    (
        word(&["instdata", "relation", "association"]),
        word(&["create", "update", "delete"]),
        word(&["host", "object", " ", "module"]),
        vec(item, 0..3),
        proptest::option::of(json_value()),
        proptest::option::of((key(), json_value())),
    )
        .prop_map(|(event_type, action, obj_type, data, account, extra)| {
            let mut event = json!({"event_type": event_type, "action": action, "obj_type": obj_type, "data": data});
            if let Some(account) = account {
                event["bk_supplier_account"] = account;
            }
            if let Some((key, value)) = extra {
                event[key] = value;
            }
            event
        })
}

fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![json_value().prop_map(|v| v.to_string().into_bytes()), vec(any::<u8>(), 0..256)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Any condition: parsed and matched against any records without a panic, or
    /// refused with 1199006 naming what it refuses.
    #[test]
    fn search_conditions_match_or_are_refused_with_1199006(condition in json_value(), records in vec(json_value(), 0..8)) {
        match Filter::parse(&condition) {
            Ok(filter) => {
                for record in &records {
                    let _ = filter.matches(record);
                }
            }
            Err(error) => {
                prop_assert_eq!(error.code, ErrorCode::FieldInvalid);
                // Names the operator or field (the empty string when that is the offending key).
                prop_assert!(error.detail.is_some(), "names the operator or field");
            }
        }
    }

    /// Any search body: filtered, sorted, paged and projected within its bounds, or
    /// refused with 1199000 / 1199006.
    #[test]
    fn search_bodies_page_within_bounds_or_are_refused(body in json_value(), records in vec(json_value(), 0..12), cap in proptest::option::of(1usize..300)) {
        match SearchRequest::from_value(&body) {
            Ok(request) => {
                let (count, page) = search(&records, &request, cap, InputOrder::Unordered);
                prop_assert!(count <= records.len());
                prop_assert!(page.len() <= count.saturating_sub(request.page.start));
                if let Some(cap) = cap {
                    prop_assert!(page.len() <= cap);
                }
            }
            Err(error) => prop_assert!(matches!(error.code, ErrorCode::JsonDecode | ErrorCode::FieldInvalid), "{:?}", error),
        }
    }

    #[test]
    fn search_bytes_parse_or_are_refused(bytes in body_bytes()) {
        if let Err(error) = SearchRequest::parse(&bytes) {
            prop_assert!(matches!(error.code, ErrorCode::JsonDecode | ErrorCode::FieldInvalid), "{:?}", error);
        }
    }

    /// Any event: named, or refused naming one of its fields; stored and rendered as
    /// a callback body that is valid JSON with every bk-cmdb key.
    #[test]
    fn events_are_named_or_refused_and_always_render_valid_callback_bodies(event in event(), distribution_id in any::<i64>(), subscription_id in any::<i64>()) {
        let Ok(published) = serde_json::from_value::<PublishedEvent>(event) else { return Ok(()) };
        match event_name(&published) {
            Ok(name) => prop_assert!(!name.trim().is_empty()),
            Err(invalid) => prop_assert!(["event_type", "action", "obj_type", "bk_obj_id"].contains(&invalid.field), "{:?}", invalid),
        }
        let _ = is_noop_update(&published);
        let stored = StoredEvent::from_published(published, "2026-01-02 03:04:05", "req-1");
        let text = serde_json::to_string(&stored).unwrap();
        let body: Value = serde_json::from_str(&callback_body(&text, distribution_id, subscription_id)).expect("callback body is JSON");
        prop_assert_eq!(&body["distribution_id"], &json!(distribution_id));
        prop_assert_eq!(&body["subscription_id"], &json!(subscription_id));
        prop_assert!(body["bk_supplier_account"].as_str().is_some_and(|a| !a.trim().is_empty()));
        prop_assert_eq!(body.as_object().map(serde_json::Map::len), Some(11));
        // The data as stored, byte for byte (compared through the same JSON parser).
        let data: Value = serde_json::from_str(&serde_json::to_string(&stored.data).unwrap()).unwrap();
        prop_assert_eq!(&body["data"], &data);
    }

    /// REST bodies of create/update, ping and telnet: accepted, or refused with
    /// 1199000, 1199006 or 1199010.
    #[test]
    fn rest_bodies_parse_or_are_refused_with_their_codes(bytes in body_bytes()) {
        let errors = [parse_subscription(&bytes, "0", 0).err(), parse_ping(&bytes).err(), parse_telnet(&bytes).err()];
        for error in errors.into_iter().flatten() {
            prop_assert!(matches!(error.code, ErrorCode::JsonDecode | ErrorCode::FieldInvalid | ErrorCode::FieldMissing), "{:?}", error);
        }
    }
}
