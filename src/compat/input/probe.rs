//! Bodies of the diagnostics: `ping` (a test push) and `telnet` (a TCP connectivity check).

use super::fields;
use super::url::{parse_authority_url, parse_http_url};
use crate::compat::codes::ApiError;
use serde_json::Value;

/// A test push: POST `data` to `callback_url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingInput {
    pub callback_url: String,
    /// The request body, verbatim.
    pub data: String,
}

/// Where a connectivity check dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialTarget {
    /// Host name or IP address, IPv6 without brackets: ready for `(host, port)` socket
    /// address lookups.
    pub host: String,
    pub port: u16,
}

/// `{callback_url, data}`. bk-cmdb v3.5 wanted `data` as a JSON string; herald also takes
/// any other JSON value and sends it serialised compactly. Absent or null `data` sends an
/// empty body. `callback_url` must be an http or https URL (1199010 absent, 1199006 invalid).
pub fn parse_ping(body: &[u8]) -> Result<PingInput, ApiError> {
    let body = fields::object(body)?;
    let callback_url = fields::string(&body, "callback_url")?;
    let data = match body.get("data") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    };
    let callback_url = fields::required(callback_url, "callback_url")?;
    parse_http_url(callback_url).ok_or_else(|| ApiError::invalid("callback_url"))?;
    Ok(PingInput { callback_url: callback_url.to_string(), data })
}

/// `{callback_url}` → host and port. The port defaults by scheme, 80 for http and 443 for
/// https (bk-cmdb used 80 for both); other schemes need an explicit port. A URL without a
/// scheme, without a host, or unparseable is 1199006.
pub fn parse_telnet(body: &[u8]) -> Result<DialTarget, ApiError> {
    let body = fields::object(body)?;
    let callback_url = fields::required(fields::string(&body, "callback_url")?, "callback_url")?;
    let invalid = || ApiError::invalid("callback_url");
    let url = parse_authority_url(callback_url).ok_or_else(invalid)?;
    let port = match (url.port(), url.scheme()) {
        (Some(port), _) => port,
        (None, "http") => 80,
        (None, "https") => 443,
        (None, _) => return Err(invalid()),
    };
    let host = url.host_str().ok_or_else(invalid)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Ok(DialTarget { host: host.to_string(), port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compat::codes::ErrorCode;

    type Outcome<T> = Result<T, (ErrorCode, Option<String>)>;

    fn failure(code: ErrorCode, detail: Option<&str>) -> (ErrorCode, Option<String>) {
        (code, detail.map(str::to_string))
    }

    #[test]
    fn ping_bodies() {
        let ok = |data: &str| Ok(PingInput { callback_url: "http://127.0.0.1:9000/cb".into(), data: data.into() });
        let table: [(&str, Outcome<PingInput>); 11] = [
            (r#"{"callback_url": "http://127.0.0.1:9000/cb", "data": "{\"a\": 1}"}"#, ok(r#"{"a": 1}"#)),
            (r#"{"callback_url": " http://127.0.0.1:9000/cb ", "data": {"a": [1, 2]}}"#, ok(r#"{"a":[1,2]}"#)),
            (r#"{"callback_url": "http://127.0.0.1:9000/cb", "data": 5}"#, ok("5")),
            (r#"{"callback_url": "http://127.0.0.1:9000/cb", "data": null}"#, ok("")),
            (r#"{"callback_url": "http://127.0.0.1:9000/cb"}"#, ok("")),
            (r#"{"data": "x"}"#, Err(failure(ErrorCode::FieldMissing, Some("callback_url")))),
            (r#"{"callback_url": " "}"#, Err(failure(ErrorCode::FieldMissing, Some("callback_url")))),
            (r#"{"callback_url": "127.0.0.1:9000"}"#, Err(failure(ErrorCode::FieldInvalid, Some("callback_url")))),
            (r#"{"callback_url": "ftp://127.0.0.1/"}"#, Err(failure(ErrorCode::FieldInvalid, Some("callback_url")))),
            (r#"{"callback_url": 1}"#, Err(failure(ErrorCode::JsonDecode, None))),
            (r#"["http://127.0.0.1/"]"#, Err(failure(ErrorCode::JsonDecode, None))),
        ];
        for (body, expected) in table {
            assert_eq!(parse_ping(body.as_bytes()).map_err(|e| (e.code, e.detail)), expected, "{body}");
        }
    }

    #[test]
    fn telnet_bodies() {
        let ok = |host: &str, port| Ok(DialTarget { host: host.into(), port });
        let table: [(&str, Outcome<DialTarget>); 11] = [
            (r#"{"callback_url": "http://127.0.0.1:9000/cb"}"#, ok("127.0.0.1", 9000)),
            (r#"{"callback_url": "http://example.com/cb"}"#, ok("example.com", 80)),
            (r#"{"callback_url": "https://example.com/cb"}"#, ok("example.com", 443)),
            (r#"{"callback_url": "https://example.com:80/cb"}"#, ok("example.com", 80)),
            (r#"{"callback_url": "http://[::1]/cb"}"#, ok("::1", 80)),
            (r#"{"callback_url": "tcp://127.0.0.1:25"}"#, ok("127.0.0.1", 25)),
            (r#"{"callback_url": "tcp://127.0.0.1"}"#, Err(failure(ErrorCode::FieldInvalid, Some("callback_url")))),
            (r#"{"callback_url": "127.0.0.1:9000"}"#, Err(failure(ErrorCode::FieldInvalid, Some("callback_url")))),
            (r#"{"callback_url": "http://"}"#, Err(failure(ErrorCode::FieldInvalid, Some("callback_url")))),
            (r#"{}"#, Err(failure(ErrorCode::FieldMissing, Some("callback_url")))),
            (r#"{"callback_url": false}"#, Err(failure(ErrorCode::JsonDecode, None))),
        ];
        for (body, expected) in table {
            assert_eq!(parse_telnet(body.as_bytes()).map_err(|e| (e.code, e.detail)), expected, "{body}");
        }
    }
}
