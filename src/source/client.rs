//! One request to bk-cmdb's resource watch, through the direct API, the ESB or the API
//! gateway, and its answer as a page of events or a typed failure (docs/sources.md lists
//! the codes).
//! Requests leave through `crate::outbound`, so the callback guard judges bk-cmdb's
//! address as it would a callback's.

use super::convert::WatchEvent;
use crate::crd::SourceApi;
use crate::outbound::guard::GuardError;
use crate::outbound::{Outbound, describe, read_capped};
use serde_json::{Value, json};
use std::time::Duration;

/// bk-cmdb answers a long poll within 20 s (25 s before 3.10); the rest is slack.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest watch answer read: 200 events of large hosts fit many times over.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// bk-cmdb's page of a watch answer; a full page means more is waiting.
pub const FULL_PAGE: usize = 200;

/// Where a watch request starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// Strictly after this cursor (long poll).
    Cursor(String),
    /// After this Unix second.
    StartFrom(i64),
    /// The present: bk-cmdb answers with its latest event as a position marker.
    Now,
}

/// ESB app credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppCredentials {
    pub code: String,
    pub secret: String,
}

/// Which bk-cmdb, how, and as whom.
#[derive(Clone)]
pub struct Endpoint {
    pub outbound: Outbound,
    pub base: reqwest::Url,
    pub api: SourceApi,
    pub supplier_account: String,
    pub user: String,
    pub app: Option<AppCredentials>,
}

/// A watch answer: the events after the position (oldest first, empty when bk-cmdb had
/// none) and the cursor to continue after.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub events: Vec<WatchEvent>,
    pub cursor: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Guard(#[from] GuardError),
    #[error("bk-cmdb is unreachable: {0}")]
    Unreachable(String),
    #[error("bk-cmdb answered HTTP {status}")]
    Unavailable { status: u16 },
    #[error("bk-cmdb's answer is not a watch answer: {0}")]
    Malformed(String),
    #[error("bk-cmdb no longer holds the cursor ({code}: {message})")]
    CursorExpired { code: i64, message: String },
    #[error("the start time is outside what bk-cmdb holds ({code}: {message})")]
    StartOutOfRange { code: i64, message: String },
    #[error("bk-cmdb refused the credentials ({code}: {message})")]
    Unauthorized { code: i64, message: String },
    #[error("bk-cmdb refused the watch ({code}: {message})")]
    Rejected { code: i64, message: String },
}

impl WatchError {
    /// Metric label.
    pub fn cause(&self) -> &'static str {
        match self {
            WatchError::Guard(_) => "guard",
            WatchError::Unreachable(_) => "unreachable",
            WatchError::Unavailable { .. } => "unavailable",
            WatchError::Malformed(_) => "malformed",
            WatchError::CursorExpired { .. } => "cursor_expired",
            WatchError::StartOutOfRange { .. } => "start_out_of_range",
            WatchError::Unauthorized { .. } => "unauthorized",
            WatchError::Rejected { .. } => "rejected",
        }
    }

    /// Failures that waiting alone does not fix: the spec, the credentials or bk-cmdb's
    /// configuration must change. They make the source not Ready and are retried slowly.
    pub fn needs_a_change(&self) -> bool {
        matches!(self, WatchError::Guard(_) | WatchError::Unauthorized { .. } | WatchError::Rejected { .. })
    }
}

/// bk-cmdb's codes (resources/errors of bk-cmdb, ESB and the API gateway).
const CURSOR_NOT_EXIST: i64 = 1103007;
const START_FROM_INVALID: i64 = 1199006;
const HEADER_MISSING: i64 = 1199027;
const ESB_AUTH_FAILED: i64 = 1306000;
const APIGW_INVALID_ARGS: i64 = 1640001;
const NO_PERMISSION: i64 = 9900403;

impl Endpoint {
    fn url(&self, resource: &str) -> Result<reqwest::Url, WatchError> {
        let path = match self.api {
            SourceApi::Direct | SourceApi::Apigw => format!("api/v3/event/watch/resource/{resource}"),
            SourceApi::Esb => "api/c/compapi/v2/cc/resource_watch/".to_string(),
        };
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        base.join(&path).map_err(|e| WatchError::Malformed(format!("the source url: {e}")))
    }

    /// One watch request of `resource` from `position`, projecting `fields` (empty: all).
    pub async fn watch(&self, resource: &str, position: &Position, fields: &[String]) -> Result<Page, WatchError> {
        let mut body = json!({ "bk_resource": resource, "bk_supplier_account": self.supplier_account });
        if !fields.is_empty() {
            body["bk_fields"] = json!(fields);
        }
        match position {
            Position::Cursor(cursor) => body["bk_cursor"] = json!(cursor),
            Position::StartFrom(second) => body["bk_start_from"] = json!(second),
            Position::Now => {}
        }
        let url = self.url(resource)?;
        let mut request =
            self.outbound.post(&url).await?.timeout(REQUEST_TIMEOUT).header("HTTP_BLUEKING_LANGUAGE", "en");
        request = match (&self.api, &self.app) {
            (SourceApi::Esb | SourceApi::Apigw, Some(app)) => request.header(
                "X-Bkapi-Authorization",
                json!({"bk_app_code": app.code, "bk_app_secret": app.secret, "bk_username": self.user}).to_string(),
            ),
            _ => request
                .header("BK_User", &self.user)
                .header("HTTP_BK_SUPPLIER_ACCOUNT", &self.supplier_account)
                .header("HTTP_BLUEKING_SUPPLIER_ID", &self.supplier_account),
        };
        let mut response = request.json(&body).send().await.map_err(|e| WatchError::Unreachable(describe(&e)))?;
        let status = response.status().as_u16();
        let answer = read_capped(&mut response, MAX_ANSWER_BYTES + 1)
            .await
            .map_err(|e| WatchError::Unreachable(describe(&e)))?;
        if answer.len() > MAX_ANSWER_BYTES {
            return Err(WatchError::Malformed(format!("the answer is larger than {MAX_ANSWER_BYTES} bytes")));
        }
        parse_answer(status, &answer, matches!(position, Position::StartFrom(_)))
    }
}

/// A watch answer as a page, or the failure it reports. bk-cmdb's direct API names its
/// fields `bk_error_code`/`bk_error_msg`, ESB and the API gateway `code`/`message`; the
/// gateway refuses credentials with HTTP 400 and 1640001.
pub fn parse_answer(status: u16, body: &[u8], started_from_time: bool) -> Result<Page, WatchError> {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let field = |names: [&str; 2]| value.as_ref().and_then(|v| names.iter().find_map(|n| v.get(*n).cloned()));
    let code = field(["bk_error_code", "code"]).and_then(|c| c.as_i64()).unwrap_or(0);
    let message = field(["bk_error_msg", "message"]).and_then(|m| m.as_str().map(str::to_string)).unwrap_or_default();
    let result = field(["result", "result"]).and_then(|r| r.as_bool());
    let auth = matches!(code, HEADER_MISSING | ESB_AUTH_FAILED | APIGW_INVALID_ARGS | NO_PERMISSION);
    if !(200..300).contains(&status) {
        return Err(match status {
            _ if auth || status == 401 || status == 403 => WatchError::Unauthorized { code, message },
            404 | 405 => WatchError::Rejected { code, message: format!("no watch API at this url (HTTP {status})") },
            _ => WatchError::Unavailable { status },
        });
    }
    let Some(value) = value else { return Err(WatchError::Malformed("not JSON".into())) };
    if result != Some(true) {
        return Err(match code {
            CURSOR_NOT_EXIST => WatchError::CursorExpired { code, message },
            // bk-cmdb 3.8 answered an unknown cursor with code 0.
            0 if message.contains("cursor not exist") => WatchError::CursorExpired { code, message },
            START_FROM_INVALID if started_from_time => WatchError::StartOutOfRange { code, message },
            _ if auth => WatchError::Unauthorized { code, message },
            _ => WatchError::Rejected { code, message },
        });
    }
    let data = &value["data"];
    let watched = data["bk_watched"].as_bool().ok_or_else(|| WatchError::Malformed("no data.bk_watched".into()))?;
    let events: Vec<WatchEvent> = serde_json::from_value(data["bk_events"].clone())
        .map_err(|e| WatchError::Malformed(format!("data.bk_events: {e}")))?;
    let cursor = events.last().map(|e| e.bk_cursor.clone()).filter(|c| !c.is_empty());
    let Some(cursor) = cursor else { return Err(WatchError::Malformed("no cursor in data.bk_events".into())) };
    Ok(Page { events: if watched { events } else { Vec::new() }, cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_pages_or_typed_failures() {
        let page = br#"{"result":true,"bk_error_code":0,"bk_error_msg":"success","data":{"bk_watched":true,
            "bk_events":[{"bk_cursor":"a","bk_resource":"host","bk_event_type":"create","bk_detail":{"bk_host_id":1}},
                         {"bk_cursor":"b","bk_resource":"host","bk_event_type":"delete","bk_detail":{"bk_host_id":1}}]}}"#;
        let parsed = parse_answer(200, page, false).unwrap();
        assert_eq!((parsed.events.len(), parsed.cursor.as_str()), (2, "b"));
        let placeholder = br#"{"result":true,"code":0,"message":"success","data":{"bk_watched":false,
            "bk_events":[{"bk_cursor":"c","bk_resource":"host","bk_event_type":"","bk_detail":null}]}}"#;
        let parsed = parse_answer(200, placeholder, false).unwrap();
        assert_eq!((parsed.events.len(), parsed.cursor.as_str()), (0, "c"));

        let expired =
            br#"{"result":false,"bk_error_code":1103007,"bk_error_msg":"Event chain node not exist","data":null}"#;
        assert!(matches!(parse_answer(200, expired, false), Err(WatchError::CursorExpired { code: 1103007, .. })));
        let v38 = br#"{"result":false,"bk_error_code":0,"bk_error_msg":"start cursor not exist error","data":null}"#;
        assert!(matches!(parse_answer(200, v38, false), Err(WatchError::CursorExpired { .. })));
        let too_old = br#"{"result":false,"bk_error_code":1199006,"bk_error_msg":"'bk_start_from' data parameter verification does not pass","data":null}"#;
        assert!(matches!(parse_answer(200, too_old, true), Err(WatchError::StartOutOfRange { .. })));
        let gateway =
            br#"{"code":1640001,"code_name":"INVALID_ARGS","data":null,"result":false,"message":"Parameters error"}"#;
        assert!(matches!(parse_answer(400, gateway, false), Err(WatchError::Unauthorized { code: 1640001, .. })));
        let esb = br#"{"result":false,"code":1306000,"data":null,"message":"APP Secret verification failed","request_id":"x"}"#;
        assert!(matches!(parse_answer(200, esb, false), Err(WatchError::Unauthorized { code: 1306000, .. })));
        let headers = br#"{"result":false,"bk_error_code":1199027,"bk_error_msg":"[user] authorization information query failed","permission":null,"data":null}"#;
        assert!(matches!(parse_answer(500, headers, false), Err(WatchError::Unauthorized { .. })));
        assert!(matches!(parse_answer(503, b"down", false), Err(WatchError::Unavailable { status: 503 })));
        assert!(matches!(parse_answer(404, b"", false), Err(WatchError::Rejected { .. })));
        let fields =
            br#"{"result":false,"bk_error_code":1199998,"bk_error_msg":"host event must have fields","data":null}"#;
        assert!(matches!(parse_answer(200, fields, false), Err(WatchError::Rejected { code: 1199998, .. })));
        assert!(matches!(parse_answer(200, b"<html>", false), Err(WatchError::Malformed(_))));
    }
}
