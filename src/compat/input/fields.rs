//! Reading REST bodies field by field. A value of the wrong JSON type is 1199000, as bk-cmdb's
//! JSON decoding into typed structs answered; `null` counts as absent.

use crate::compat::codes::{ApiError, ErrorCode};
use serde_json::{Map, Value};

pub(super) type Body = Map<String, Value>;

/// The body as a JSON object.
pub(super) fn object(body: &[u8]) -> Result<Body, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        _ => Err(json_decode()),
    }
}

/// A string field.
pub(super) fn string<'a>(body: &'a Body, key: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(json_decode()),
    }
}

/// An integer field, also given as a numeric string (herald leniency: some clients quote
/// numbers). A blank string counts as absent; a fraction or another string is 1199000.
pub(super) fn integer(body: &Body, key: &str) -> Result<Option<i64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(json_decode),
        Some(Value::String(text)) if text.trim().is_empty() => Ok(None),
        Some(Value::String(text)) => text.trim().parse().map(Some).map_err(|_| json_decode()),
        Some(_) => Err(json_decode()),
    }
}

/// The trimmed value of a required string, or 1199010 naming it when absent or blank.
pub(super) fn required<'a>(value: Option<&'a str>, key: &str) -> Result<&'a str, ApiError> {
    value.map(str::trim).filter(|v| !v.is_empty()).ok_or_else(|| ApiError::missing(key))
}

fn json_decode() -> ApiError {
    ApiError::new(ErrorCode::JsonDecode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Body {
        match value {
            Value::Object(fields) => fields,
            _ => Body::new(),
        }
    }

    #[test]
    fn objects_only() {
        let table: [(&[u8], bool); 6] =
            [(b"{}", true), (br#"{"a": 1}"#, true), (b"", false), (b"[]", false), (b"\"x\"", false), (b"{", false)];
        for (raw, ok) in table {
            assert_eq!(object(raw).is_ok(), ok, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn strings() {
        let table = [
            (json!({}), Ok(None)),
            (json!({"k": null}), Ok(None)),
            (json!({"k": " v "}), Ok(Some(" v "))),
            (json!({"k": 1}), Err(ErrorCode::JsonDecode)),
            (json!({"k": ["v"]}), Err(ErrorCode::JsonDecode)),
        ];
        for (fields, expected) in table {
            let fields = body(fields);
            assert_eq!(string(&fields, "k").map_err(|e| e.code), expected);
        }
    }

    #[test]
    fn integers() {
        let table = [
            (json!({}), Ok(None)),
            (json!({"k": null}), Ok(None)),
            (json!({"k": 30}), Ok(Some(30))),
            (json!({"k": -1}), Ok(Some(-1))),
            (json!({"k": " 30 "}), Ok(Some(30))),
            (json!({"k": " "}), Ok(None)),
            (json!({"k": 1.5}), Err(ErrorCode::JsonDecode)),
            (json!({"k": "1.5"}), Err(ErrorCode::JsonDecode)),
            (json!({"k": "ten"}), Err(ErrorCode::JsonDecode)),
            (json!({"k": true}), Err(ErrorCode::JsonDecode)),
            (json!({"k": u64::MAX}), Err(ErrorCode::JsonDecode)),
        ];
        for (fields, expected) in table {
            let fields = body(fields);
            assert_eq!(integer(&fields, "k").map_err(|e| e.code), expected);
        }
    }

    #[test]
    fn required_values() {
        let table = [(Some(" a "), Ok("a")), (Some("  "), Err("k")), (None, Err("k"))];
        for (value, expected) in table {
            let result = required(value, "k").map_err(|e| (e.code, e.detail));
            assert_eq!(result, expected.map_err(|k| (ErrorCode::FieldMissing, Some(k.to_string()))));
        }
    }
}
