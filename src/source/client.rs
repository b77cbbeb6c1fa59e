//! One request to bk-cmdb's resource watch, through the direct API, the ESB or the API
//! gateway, and its answer as a page of events or a typed failure (docs/sources.md lists
//! the codes).
//! Requests leave through `crate::outbound`, so the callback guard judges bk-cmdb's
//! address as it would a callback's.

use super::convert::WatchEvent;
use crate::crd::SourceApi;
use crate::outbound::body::{BodyEnd, ByteBudget, HeldBytes, read_body};
use crate::outbound::guard::GuardError;
use crate::outbound::{Outbound, describe};
use serde::Deserialize;
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde_json::json;
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

/// bk-cmdb answers a long poll within 20 s (25 s before 3.10); the rest is slack.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// bk-cmdb's page of a watch answer; a full page means more is waiting.
pub const FULL_PAGE: usize = 200;

/// Most events a bk-cmdb watch answer holds: a full page, and one more when bk-cmdb adds
/// the event its cursor pointed at. A page with more is refused before it is decoded.
pub const MAX_PAGE_EVENTS: usize = FULL_PAGE + 1;

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
    /// Largest answer read (`sources.maxAnswerBytes`).
    pub max_answer_bytes: usize,
    /// Shared by every watch of every source (`sources.readBudgetBytes`).
    pub read_budget: ByteBudget,
}

/// A watch answer: the events after the position (oldest first, empty when bk-cmdb had
/// none) and the cursor to continue after.
#[derive(Debug)]
pub struct Page {
    pub events: Vec<WatchEvent>,
    pub cursor: String,
    /// Events of the page that do not decode as watch events: skipped, not retried.
    pub undecodable: Vec<Undecodable>,
    /// The answer's bytes, still counted against the read budget: the decoded page takes
    /// their place until it is committed (`sources.readBudgetBytes`).
    pub held: HeldBytes,
}

/// A watch event that does not decode (its cursor when that much could be read).
#[derive(Clone, Debug, PartialEq)]
pub struct Undecodable {
    pub cursor: Option<String>,
    pub error: String,
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
    #[error("bk-cmdb's answer is larger than {cap} bytes, more than a watch page of {MAX_PAGE_EVENTS} events needs")]
    AnswerTooLarge { cap: usize },
    #[error("bk-cmdb's page holds more than the {MAX_PAGE_EVENTS} events a watch page holds at most")]
    PageTooLarge,
    #[error(
        "not read now: the watches being read hold herald's whole budget of {budget} bytes (sources.readBudgetBytes)"
    )]
    ReadBudgetExhausted { budget: usize },
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
            WatchError::AnswerTooLarge { .. } => "answer_too_large",
            WatchError::PageTooLarge => "page_too_large",
            WatchError::ReadBudgetExhausted { .. } => "read_budget",
            WatchError::CursorExpired { .. } => "cursor_expired",
            WatchError::StartOutOfRange { .. } => "start_out_of_range",
            WatchError::Unauthorized { .. } => "unauthorized",
            WatchError::Rejected { .. } => "rejected",
        }
    }

    /// Failures that waiting alone does not fix: the spec, the credentials or bk-cmdb's
    /// configuration must change. They make the source not Ready and are retried slowly.
    /// An oversized answer or page is not a bk-cmdb's: its url points elsewhere.
    pub fn needs_a_change(&self) -> bool {
        matches!(
            self,
            WatchError::Guard(_)
                | WatchError::Unauthorized { .. }
                | WatchError::Rejected { .. }
                | WatchError::AnswerTooLarge { .. }
                | WatchError::PageTooLarge
        )
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
        let answer = read_body(&mut response, self.max_answer_bytes, Some(&self.read_budget))
            .await
            .map_err(|e| WatchError::Unreachable(describe(&e)))?;
        match answer.end {
            BodyEnd::Whole => {}
            BodyEnd::Capped => return Err(WatchError::AnswerTooLarge { cap: self.max_answer_bytes }),
            BodyEnd::BudgetSpent => {
                return Err(WatchError::ReadBudgetExhausted { budget: self.read_budget.capacity() });
            }
        }
        let mut page = parse_answer(status, &answer.bytes, matches!(position, Position::StartFrom(_)))?;
        page.held = answer.held;
        Ok(page)
    }
}

/// The envelope of every answer, typed: `data` is kept as raw text and decoded only for
/// a successful answer, and no JSON tree of the whole answer is ever built. The code and
/// message are read leniently (a field of another type counts as absent), as before.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    bk_error_code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    code: Option<&'a RawValue>,
    #[serde(default, borrow)]
    bk_error_msg: Option<&'a RawValue>,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// The first of `fields` present that reads as a `T`.
fn lenient<T: DeserializeOwned>(fields: [Option<&RawValue>; 2]) -> Option<T> {
    fields.into_iter().flatten().find_map(|raw| serde_json::from_str(raw.get()).ok())
}

#[derive(Deserialize)]
struct WatchData {
    bk_watched: bool,
    bk_events: PageEvents,
}

/// `data.bk_events`, refused as soon as it holds more than `MAX_PAGE_EVENTS` events. Each
/// event decodes on its own: one that does not is set aside with its cursor, so that a
/// single odd event cannot hold up the whole watch.
struct PageEvents(Vec<Result<WatchEvent, Undecodable>>);

/// Just the cursor of an event that does not decode whole.
#[derive(Deserialize)]
struct CursorOnly {
    bk_cursor: String,
}

fn decode_event(raw: &RawValue) -> Result<WatchEvent, Undecodable> {
    serde_json::from_str(raw.get()).map_err(|error| Undecodable {
        cursor: serde_json::from_str::<CursorOnly>(raw.get()).ok().map(|c| c.bk_cursor),
        error: clip(error.to_string()),
    })
}

/// Marks the decode error of a page with too many events, to tell it from malformed JSON.
const TOO_MANY_EVENTS: &str = "herald: too many events in one page";

impl<'de> Deserialize<'de> for PageEvents {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Events(PhantomData<Box<RawValue>>);
        impl<'de> Visitor<'de> for Events {
            type Value = PageEvents;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_PAGE_EVENTS} watch events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PageEvents, A::Error> {
                let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PAGE_EVENTS));
                while let Some(event) = seq.next_element::<&'de RawValue>()? {
                    if events.len() == MAX_PAGE_EVENTS {
                        return Err(serde::de::Error::custom(TOO_MANY_EVENTS));
                    }
                    events.push(decode_event(event));
                }
                Ok(PageEvents(events))
            }
        }
        deserializer.deserialize_seq(Events(PhantomData))
    }
}

/// A watch answer as a page, or the failure it reports. bk-cmdb's direct API names its
/// fields `bk_error_code`/`bk_error_msg`, ESB and the API gateway `code`/`message`; the
/// gateway refuses credentials with HTTP 400 and 1640001.
pub fn parse_answer(status: u16, body: &[u8], started_from_time: bool) -> Result<Page, WatchError> {
    let envelope: Option<Envelope<'_>> = serde_json::from_slice(body).ok();
    let e = envelope.as_ref();
    let code: i64 = e.and_then(|e| lenient([e.bk_error_code, e.code])).unwrap_or(0);
    let message = clip(e.and_then(|e| lenient::<String>([e.bk_error_msg, e.message])).unwrap_or_default());
    let result: Option<bool> = e.and_then(|e| lenient([e.result, None]));
    let auth = matches!(code, HEADER_MISSING | ESB_AUTH_FAILED | APIGW_INVALID_ARGS | NO_PERMISSION);
    if !(200..300).contains(&status) {
        return Err(match status {
            _ if auth || status == 401 || status == 403 => WatchError::Unauthorized { code, message },
            404 | 405 => WatchError::Rejected { code, message: format!("no watch API at this url (HTTP {status})") },
            _ => WatchError::Unavailable { status },
        });
    }
    let Some(envelope) = envelope else { return Err(WatchError::Malformed("not JSON".into())) };
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
    let data = envelope.data.ok_or_else(|| WatchError::Malformed("no data".into()))?;
    let WatchData { bk_watched: watched, bk_events: PageEvents(events) } =
        serde_json::from_str(data.get()).map_err(|e| match e.to_string().starts_with(TOO_MANY_EVENTS) {
            true => WatchError::PageTooLarge,
            false => WatchError::Malformed(format!("data: {}", clip(e.to_string()))),
        })?;
    let cursor = match events.last() {
        Some(Ok(last)) => Some(last.bk_cursor.clone()),
        Some(Err(last)) => last.cursor.clone(),
        None => None,
    }
    .filter(|c| !c.is_empty());
    let Some(cursor) = cursor else { return Err(WatchError::Malformed("no cursor in data.bk_events".into())) };
    if !watched {
        return Ok(Page { events: Vec::new(), cursor, undecodable: Vec::new(), held: HeldBytes::default() });
    }
    let (mut decoded, mut undecodable) = (Vec::with_capacity(events.len()), Vec::new());
    for event in events {
        match event {
            Ok(event) => decoded.push(event),
            Err(odd) => undecodable.push(odd),
        }
    }
    Ok(Page { events: decoded, cursor, undecodable, held: HeldBytes::default() })
}

/// bk-cmdb's message as herald repeats it in logs, conditions and Events: a server's
/// text of any size must not grow them.
fn clip(mut message: String) -> String {
    const MAX_MESSAGE_CHARS: usize = 256;
    if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(cut);
        message.push('…');
    }
    message
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
        let odd = br#"{"result":true,"bk_error_code":0,"data":{"bk_watched":true,
            "bk_events":[{"bk_cursor":"a","bk_resource":"host","bk_event_type":"create","bk_detail":{"bk_host_id":1}},
                         {"bk_cursor":"b","bk_event_type":7},
                         {"bk_cursor":"c","bk_resource":"host","bk_event_type":"delete","bk_detail":{"bk_host_id":1}}]}}"#;
        let parsed = parse_answer(200, odd, false).unwrap();
        assert_eq!((parsed.events.len(), parsed.cursor.as_str()), (2, "c"), "the odd event does not hold up the page");
        assert_eq!(parsed.undecodable.len(), 1);
        assert_eq!(parsed.undecodable[0].cursor.as_deref(), Some("b"));
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

    fn page_of(events: usize) -> Vec<u8> {
        let event = |i: usize| json!({"bk_cursor": format!("c{i}"), "bk_resource": "host", "bk_event_type": "create", "bk_detail": {"bk_host_id": i}});
        let events: Vec<_> = (0..events).map(event).collect();
        serde_json::to_vec(
            &json!({"result": true, "bk_error_code": 0, "data": {"bk_watched": true, "bk_events": events}}),
        )
        .unwrap()
    }

    #[test]
    fn a_page_with_more_events_than_bk_cmdb_ever_sends_is_refused() {
        assert_eq!(parse_answer(200, &page_of(MAX_PAGE_EVENTS), false).unwrap().events.len(), 201);
        assert!(matches!(parse_answer(200, &page_of(MAX_PAGE_EVENTS + 1), false), Err(WatchError::PageTooLarge)));
        assert!(matches!(parse_answer(200, &page_of(100_000), false), Err(WatchError::PageTooLarge)));
        assert!(WatchError::PageTooLarge.needs_a_change(), "retried slowly, not in a loop");
        let array = serde_json::to_vec(&vec![0; 100_000]).unwrap();
        assert!(matches!(parse_answer(200, &array, false), Err(WatchError::Malformed(_))), "a bare array is no answer");
    }

    #[test]
    fn a_servers_message_of_any_size_is_clipped_and_odd_field_types_are_ignored() {
        let long =
            json!({"result": false, "bk_error_code": 1199998, "bk_error_msg": "x".repeat(100_000), "data": null});
        let Err(WatchError::Rejected { code, message }) = parse_answer(200, &serde_json::to_vec(&long).unwrap(), false)
        else {
            panic!("a rejection")
        };
        assert_eq!((code, message.chars().count()), (1199998, 257));
        let odd = br#"{"result":"yes","bk_error_code":"7","bk_error_msg":12,"data":[]}"#;
        assert!(matches!(parse_answer(200, odd, false), Err(WatchError::Rejected { code: 0, .. })));
    }
}
