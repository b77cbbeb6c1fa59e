//! REST request bodies → validated, normalised values: subscriptions (create and update) and
//! the diagnostics.

mod fields;
mod probe;
mod url;

pub use probe::{DialTarget, PingInput, parse_ping, parse_telnet};
pub use url::{MAX_URL_CHARS, parse_authority_url, parse_http_url};

use crate::compat::codes::ApiError;
use crate::crd::{Confirm, ConfirmMode, EventSubscriptionSpec};
use crate::effective::{
    DEFAULT_HTTPSTATUS_PATTERN, DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS, compile_confirm_regex, normalise_events,
};

/// Limits of the CRD's schema, checked here so that bad input is a 1199006 naming the
/// field rather than a refused write.
const MAX_SUPPLIER_ACCOUNT_CHARS: usize = 64;
const MAX_NAME_CHARS: usize = 256;
const MAX_PATTERN_CHARS: usize = 1024;
const MAX_EVENTS: usize = 512;
const MAX_EVENT_NAME_CHARS: usize = 128;

/// A subscription as the REST API received it, validated and normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionInput {
    pub supplier_account: String,
    pub biz_id: i64,
    pub subscription_name: String,
    pub system_name: String,
    pub callback_url: String,
    pub confirm_mode: ConfirmMode,
    pub confirm_pattern: String,
    /// Spaces removed, de-duplicated, sorted.
    pub events: Vec<String>,
    pub timeout_seconds: i64,
}

impl SubscriptionInput {
    /// The spec to write, every bk-cmdb field set explicitly so that the stored object
    /// reads the same whatever herald's defaults become. herald-only fields (`retry`,
    /// `maxInFlight`, `paused`, `signing`) are left unset.
    pub fn to_spec(&self) -> EventSubscriptionSpec {
        EventSubscriptionSpec {
            supplier_account: Some(self.supplier_account.clone()),
            biz_id: Some(self.biz_id),
            subscription_name: self.subscription_name.clone(),
            system_name: Some(self.system_name.clone()),
            callback_url: self.callback_url.clone(),
            confirm: Some(Confirm { mode: Some(self.confirm_mode), pattern: Some(self.confirm_pattern.clone()) }),
            events: self.events.clone(),
            timeout_seconds: Some(self.timeout_seconds),
            ..Default::default()
        }
    }
}

/// Parses a create or update body as bk-cmdb v3.5 does, with herald's leniencies.
///
/// The first failing check answers, in this order:
/// 1. the body is a JSON object and every known field has its JSON type (1199000);
///    `time_out`/`timeout` may also be numeric strings;
/// 2. the path's supplier account (1 to 64 characters) and business id (≥ 0) (1199006);
/// 3. `subscription_name`, `callback_url`, `subscription_form` present and not blank
///    (1199010, in that order);
/// 4. `confirm_mode`, `confirm_pattern`, `callback_url`, `time_out`, `subscription_form`,
///    `subscription_name`, `system_name` valid (1199006 naming the field).
///
/// Leniencies and choices: a missing or empty `confirm_mode` means `httpstatus` (bk-cmdb
/// refused it); `time_out` wins over `timeout` when both are given, and an error names the
/// key the client used; `bk_supplier_account` and `bk_biz_id` in the body are ignored in
/// favour of the path's (the body's copies are informational in bk-cmdb's docs, and the
/// path is what authorisation checked). `subscription_name` and `callback_url` are trimmed;
/// a `regular` pattern is kept as written, since spaces in a regex matter.
pub fn parse_subscription(body: &[u8], path_account: &str, path_biz: i64) -> Result<SubscriptionInput, ApiError> {
    let body = fields::object(body)?;
    let name = fields::string(&body, "subscription_name")?;
    let system_name = fields::string(&body, "system_name")?;
    let callback_url = fields::string(&body, "callback_url")?;
    let confirm_mode = fields::string(&body, "confirm_mode")?;
    let confirm_pattern = fields::string(&body, "confirm_pattern")?;
    let form = fields::string(&body, "subscription_form")?;
    let time_out = fields::integer(&body, "time_out")?.map(|seconds| ("time_out", seconds));
    let timeout = time_out.or(fields::integer(&body, "timeout")?.map(|seconds| ("timeout", seconds)));

    let supplier_account = path_account.trim();
    if supplier_account.is_empty() || supplier_account.chars().count() > MAX_SUPPLIER_ACCOUNT_CHARS {
        return Err(ApiError::invalid("bk_supplier_account"));
    }
    if path_biz < 0 {
        return Err(ApiError::invalid("bk_biz_id"));
    }

    let name = fields::required(name, "subscription_name")?;
    let callback_url = fields::required(callback_url, "callback_url")?;
    let events = normalise_events(fields::required(form, "subscription_form")?.split(','));
    if events.is_empty() {
        return Err(ApiError::missing("subscription_form"));
    }

    let confirm_mode = parse_confirm_mode(confirm_mode)?;
    let confirm_pattern = parse_confirm_pattern(confirm_mode, confirm_pattern.unwrap_or_default())?;
    parse_http_url(callback_url).ok_or_else(|| ApiError::invalid("callback_url"))?;
    let timeout_seconds = match timeout {
        Some((key, seconds)) if seconds > MAX_TIMEOUT_SECONDS => return Err(ApiError::invalid(key)),
        Some((_, seconds)) if seconds > 0 => seconds,
        _ => DEFAULT_TIMEOUT_SECONDS,
    };
    if events.len() > MAX_EVENTS || events.iter().any(|e| e.chars().count() > MAX_EVENT_NAME_CHARS) {
        return Err(ApiError::invalid("subscription_form"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::invalid("subscription_name"));
    }
    let system_name = system_name.unwrap_or_default();
    if system_name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::invalid("system_name"));
    }

    Ok(SubscriptionInput {
        supplier_account: supplier_account.to_string(),
        biz_id: path_biz,
        subscription_name: name.to_string(),
        system_name: system_name.to_string(),
        callback_url: callback_url.to_string(),
        confirm_mode,
        confirm_pattern,
        events,
        timeout_seconds,
    })
}

/// Exactly `httpstatus` or `regular`; missing or empty is `httpstatus` (herald leniency).
fn parse_confirm_mode(mode: Option<&str>) -> Result<ConfirmMode, ApiError> {
    match mode.unwrap_or_default() {
        "" | "httpstatus" => Ok(ConfirmMode::Httpstatus),
        "regular" => Ok(ConfirmMode::Regular),
        _ => Err(ApiError::invalid("confirm_mode")),
    }
}

/// httpstatus: a status code 100-599, empty meaning "200". regular: a regex that compiles.
fn parse_confirm_pattern(mode: ConfirmMode, pattern: &str) -> Result<String, ApiError> {
    let invalid = || ApiError::invalid("confirm_pattern");
    match mode {
        ConfirmMode::Httpstatus => match pattern.trim() {
            "" => Ok(DEFAULT_HTTPSTATUS_PATTERN.to_string()),
            code if is_status_code(code) => Ok(code.to_string()),
            _ => Err(invalid()),
        },
        ConfirmMode::Regular if pattern.chars().count() > MAX_PATTERN_CHARS => Err(invalid()),
        ConfirmMode::Regular => compile_confirm_regex(pattern).map(|_| pattern.to_string()).map_err(|_| invalid()),
    }
}

/// Three digits, 100 to 599: what the CRD's rule `^[1-5][0-9][0-9]$` accepts.
fn is_status_code(code: &str) -> bool {
    matches!(code.as_bytes(), [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::codes::ErrorCode;
    use serde_json::{Value, json};

    fn base() -> Value {
        json!({
            "subscription_name": "hosts",
            "callback_url": "http://127.0.0.1:9000/cb",
            "subscription_form": "hostcreate",
        })
    }

    /// The base body with `changes` applied; a key `"-name"` with value null removes `name`.
    fn with(changes: Value) -> Vec<u8> {
        let mut body = base();
        if let (Some(body), Some(changes)) = (body.as_object_mut(), changes.as_object()) {
            for (key, value) in changes {
                match value {
                    Value::Null if key.starts_with('-') => body.remove(&key[1..]),
                    _ => body.insert(key.clone(), value.clone()),
                };
            }
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }

    fn parse(body: &[u8]) -> Result<SubscriptionInput, (ErrorCode, Option<String>)> {
        parse_subscription(body, "0", 2).map_err(|e| (e.code, e.detail))
    }

    #[test]
    fn normalises_and_defaults() {
        let parsed = parse(&with(json!({
            "subscription_name": " hosts ",
            "subscription_form": " hostupdate, hostcreate ,,host create,hostupdate",
            "bk_supplier_account": "other",
            "bk_biz_id": 99,
            "unknown": [1],
        })))
        .unwrap();
        assert_eq!(
            parsed,
            SubscriptionInput {
                supplier_account: "0".into(),
                biz_id: 2,
                subscription_name: "hosts".into(),
                system_name: String::new(),
                callback_url: "http://127.0.0.1:9000/cb".into(),
                confirm_mode: ConfirmMode::Httpstatus,
                confirm_pattern: "200".into(),
                events: vec!["hostcreate".into(), "hostupdate".into()],
                timeout_seconds: 10,
            }
        );
    }

    #[test]
    fn field_values() {
        type Pick = fn(&SubscriptionInput) -> String;
        let mode: Pick = |s| format!("{:?}", s.confirm_mode);
        let pattern: Pick = |s| s.confirm_pattern.clone();
        let timeout: Pick = |s| s.timeout_seconds.to_string();
        let system: Pick = |s| s.system_name.clone();
        let table: [(Value, Pick, &str); 16] = [
            (json!({"confirm_mode": ""}), mode, "Httpstatus"),
            (json!({"confirm_mode": null}), mode, "Httpstatus"),
            (json!({"confirm_mode": "regular", "confirm_pattern": " ok "}), mode, "Regular"),
            (json!({"confirm_mode": "regular", "confirm_pattern": " ok "}), pattern, " ok "),
            (json!({"confirm_mode": "regular", "confirm_pattern": ""}), pattern, ""),
            (json!({"confirm_pattern": " 204 "}), pattern, "204"),
            (json!({"confirm_pattern": ""}), pattern, "200"),
            (json!({"time_out": 30}), timeout, "30"),
            (json!({"time_out": "45"}), timeout, "45"),
            (json!({"timeout": 20}), timeout, "20"),
            (json!({"time_out": 30, "timeout": 999}), timeout, "30"),
            (json!({"time_out": 0}), timeout, "10"),
            (json!({"time_out": -5}), timeout, "10"),
            (json!({"time_out": 300}), timeout, "300"),
            (json!({"time_out": ""}), timeout, "10"),
            (json!({"system_name": " cmdb "}), system, " cmdb "),
        ];
        for (changes, pick, expected) in table {
            let parsed = parse(&with(changes.clone())).unwrap_or_else(|e| panic!("{changes}: {e:?}"));
            assert_eq!(pick(&parsed), expected, "{changes}");
        }
    }

    #[test]
    fn rejections() {
        let long = "x".repeat(257);
        let many: Vec<String> = (0..513).map(|i| format!("e{i}")).collect();
        let table: [(Vec<u8>, ErrorCode, Option<&str>); 33] = [
            (b"".to_vec(), ErrorCode::JsonDecode, None),
            (b"[]".to_vec(), ErrorCode::JsonDecode, None),
            (b"{".to_vec(), ErrorCode::JsonDecode, None),
            (with(json!({"subscription_name": 5})), ErrorCode::JsonDecode, None),
            (with(json!({"confirm_mode": 1})), ErrorCode::JsonDecode, None),
            (with(json!({"subscription_form": ["hostcreate"]})), ErrorCode::JsonDecode, None),
            (with(json!({"time_out": "soon"})), ErrorCode::JsonDecode, None),
            (with(json!({"timeout": 1.5})), ErrorCode::JsonDecode, None),
            (with(json!({"time_out": 30, "timeout": true})), ErrorCode::JsonDecode, None),
            // Type errors come before missing fields.
            (with(json!({"-subscription_name": null, "system_name": 1})), ErrorCode::JsonDecode, None),
            (with(json!({"-subscription_name": null})), ErrorCode::FieldMissing, Some("subscription_name")),
            (with(json!({"subscription_name": "  "})), ErrorCode::FieldMissing, Some("subscription_name")),
            (with(json!({"-callback_url": null})), ErrorCode::FieldMissing, Some("callback_url")),
            (with(json!({"subscription_form": " , ,"})), ErrorCode::FieldMissing, Some("subscription_form")),
            (with(json!({"subscription_form": ""})), ErrorCode::FieldMissing, Some("subscription_form")),
            // Missing fields are reported in bk-cmdb's order.
            (
                with(json!({"-subscription_name": null, "-callback_url": null, "-subscription_form": null})),
                ErrorCode::FieldMissing,
                Some("subscription_name"),
            ),
            (
                with(json!({"-callback_url": null, "-subscription_form": null})),
                ErrorCode::FieldMissing,
                Some("callback_url"),
            ),
            (with(json!({"confirm_mode": "HTTPSTATUS"})), ErrorCode::FieldInvalid, Some("confirm_mode")),
            (with(json!({"confirm_mode": "1"})), ErrorCode::FieldInvalid, Some("confirm_mode")),
            (with(json!({"confirm_pattern": "2000"})), ErrorCode::FieldInvalid, Some("confirm_pattern")),
            (with(json!({"confirm_pattern": "600"})), ErrorCode::FieldInvalid, Some("confirm_pattern")),
            (with(json!({"confirm_pattern": "ok"})), ErrorCode::FieldInvalid, Some("confirm_pattern")),
            (
                with(json!({"confirm_mode": "regular", "confirm_pattern": "ok("})),
                ErrorCode::FieldInvalid,
                Some("confirm_pattern"),
            ),
            (
                with(json!({"confirm_mode": "regular", "confirm_pattern": "a".repeat(1025)})),
                ErrorCode::FieldInvalid,
                Some("confirm_pattern"),
            ),
            (with(json!({"callback_url": "127.0.0.1:9000/cb"})), ErrorCode::FieldInvalid, Some("callback_url")),
            (with(json!({"callback_url": "ftp://127.0.0.1/"})), ErrorCode::FieldInvalid, Some("callback_url")),
            (with(json!({"time_out": 301})), ErrorCode::FieldInvalid, Some("time_out")),
            (with(json!({"timeout": "301"})), ErrorCode::FieldInvalid, Some("timeout")),
            (with(json!({"subscription_form": many.join(",")})), ErrorCode::FieldInvalid, Some("subscription_form")),
            (with(json!({"subscription_form": "x".repeat(129)})), ErrorCode::FieldInvalid, Some("subscription_form")),
            (with(json!({"subscription_name": long})), ErrorCode::FieldInvalid, Some("subscription_name")),
            (with(json!({"system_name": long})), ErrorCode::FieldInvalid, Some("system_name")),
            (
                with(json!({"confirm_mode": "bogus", "callback_url": "nope"})),
                ErrorCode::FieldInvalid,
                Some("confirm_mode"),
            ),
        ];
        for (body, code, detail) in table {
            let expected = Err((code, detail.map(str::to_string)));
            assert_eq!(parse(&body), expected, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn path_values_are_checked() {
        let body = with(json!({}));
        let long_account = "a".repeat(65);
        let table = [
            (" ", 0, Some("bk_supplier_account")),
            (long_account.as_str(), 0, Some("bk_supplier_account")),
            ("0", -1, Some("bk_biz_id")),
            (" tenant ", 0, None),
        ];
        for (account, biz, invalid) in table {
            let result = parse_subscription(&body, account, biz);
            match invalid {
                Some(field) => assert_eq!(
                    result.map_err(|e| (e.code, e.detail)),
                    Err((ErrorCode::FieldInvalid, Some(field.to_string())))
                ),
                None => assert_eq!(result.map(|s| s.supplier_account).ok().as_deref(), Some("tenant")),
            }
        }
    }

    #[test]
    fn spec_sets_every_bk_cmdb_field() {
        let input = parse(&with(
            json!({"confirm_mode": "regular", "confirm_pattern": "ok", "time_out": 30, "system_name": "sync"}),
        ))
        .unwrap();
        let spec = input.to_spec();
        let expected = json!({
            "supplierAccount": "0",
            "bizId": 2,
            "subscriptionName": "hosts",
            "systemName": "sync",
            "callbackUrl": "http://127.0.0.1:9000/cb",
            "confirm": {"mode": "regular", "pattern": "ok"},
            "events": ["hostcreate"],
            "timeoutSeconds": 30,
        });
        assert_eq!(serde_json::to_value(&spec).ok(), Some(expected));
        // The effective view of the written spec is what the client sent.
        let effective = crate::effective::Effective::from_spec(&spec);
        assert_eq!(
            (effective.subscription_name, effective.events, effective.confirm_pattern, effective.timeout.as_secs()),
            (input.subscription_name, input.events, input.confirm_pattern, 30)
        );
    }
}
