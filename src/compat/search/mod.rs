//! Subscription search as bk-cmdb answers it: the request body `{condition, fields, page}`,
//! then filter, sort, page and project over the records (see `compat::subscription_record`).

mod filter;

pub use filter::Filter;

use crate::compat::codes::{ApiError, ErrorCode};
use filter::{compare_numbers, lookup};
use serde_json::{Map, Value};
use std::cmp::Ordering;

/// The field every search is finally ordered by, so that pages are stable.
const ID_FIELD: &str = "subscription_id";

/// A search request. Every part is optional: an empty body lists everything.
#[derive(Clone, Debug, Default)]
pub struct SearchRequest {
    pub condition: Filter,
    /// Top-level record keys to return; empty returns whole records.
    pub fields: Vec<String>,
    pub page: Page,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Matching records to skip.
    pub start: usize,
    /// Records to return; `<= 0` means no limit (capped on ESB, see [`search`]).
    pub limit: i64,
    /// Sort keys in priority order, from the comma list `"-subscription_id,subscription_name"`.
    pub sort: Vec<SortKey>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SortKey {
    /// Dotted path into the record, such as `statistics.total`.
    pub field: String,
    pub descending: bool,
}

impl SearchRequest {
    /// Parses a direct-path body. An empty body is an empty request.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(SearchRequest::default());
        }
        let body: Value = serde_json::from_slice(body).map_err(|_| json_decode())?;
        SearchRequest::from_value(&body)
    }

    /// Parses an already decoded body (ESB bodies carry other keys too, which are ignored).
    /// Wrong JSON types are 1199000; a `condition` that is not an object, or that the
    /// filter refuses, is 1199006.
    pub fn from_value(body: &Value) -> Result<Self, ApiError> {
        let body = match body {
            Value::Object(body) => body,
            Value::Null => return Ok(SearchRequest::default()),
            _ => return Err(json_decode()),
        };
        let condition = match body.get("condition") {
            None | Some(Value::Null) => Filter::default(),
            Some(condition) => Filter::parse(condition)?,
        };
        let page = match body.get("page") {
            None | Some(Value::Null) => Page::default(),
            Some(Value::Object(page)) => Page::from_map(page)?,
            Some(_) => return Err(json_decode()),
        };
        Ok(SearchRequest { condition, fields: parse_fields(body.get("fields"))?, page })
    }
}

impl Page {
    fn from_map(page: &Map<String, Value>) -> Result<Self, ApiError> {
        let start = integer(page.get("start"))?;
        Ok(Page {
            start: usize::try_from(start).unwrap_or(0),
            limit: integer(page.get("limit"))?,
            sort: parse_sort(page.get("sort"))?,
        })
    }
}

/// The order search's input comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputOrder {
    /// Ascending `subscription_id`, bk-cmdb's default order: a search in that order
    /// skips sorting (herald's catalog keeps records so).
    ById,
    Unordered,
}

/// Filters, sorts, skips `start`, takes `limit`, projects `fields`; returns the number of
/// all matching records and the page. Only the page's records are copied.
///
/// Sorting is stable; a missing field sorts first ascending (last descending), and values
/// of different types sort null < numbers < strings < objects < arrays < booleans, as in
/// MongoDB. `subscription_id` ascending is the default and the final tie-breaker, so pages
/// do not depend on the order `records` come in.
///
/// `max_limit` caps the page (ESB passes `Some(200)`): then a limit `<= 0` or above the cap
/// means the cap. Without it a limit `<= 0` means no limit, as on bk-cmdb's direct paths.
///
/// Projection keeps exactly the listed top-level keys, like a MongoDB projection of named
/// fields except that `subscription_id` is not added implicitly; dotted names select
/// nothing.
pub fn search<'a>(
    records: impl IntoIterator<Item = &'a Value>,
    request: &SearchRequest,
    max_limit: Option<usize>,
    order: InputOrder,
) -> (usize, Vec<Value>) {
    let mut matching: Vec<&Value> = records.into_iter().filter(|r| request.condition.matches(r)).collect();
    let count = matching.len();
    let keys = sort_keys(&request.page.sort);
    let default_order = matches!(keys.as_slice(), [only] if only.field == ID_FIELD && !only.descending);
    if !(default_order && order == InputOrder::ById) {
        matching.sort_by(|a, b| compare_records(a, b, &keys));
    }
    let page = matching
        .into_iter()
        .skip(request.page.start)
        .take(page_size(request.page.limit, max_limit))
        .map(|record| project(record, &request.fields))
        .collect();
    (count, page)
}

fn page_size(limit: i64, max_limit: Option<usize>) -> usize {
    let requested = usize::try_from(limit).ok().filter(|&limit| limit > 0);
    match (requested, max_limit) {
        (Some(limit), Some(max)) => limit.min(max),
        (None, Some(max)) => max,
        (Some(limit), None) => limit,
        (None, None) => usize::MAX,
    }
}

fn sort_keys(requested: &[SortKey]) -> Vec<SortKey> {
    let mut keys = requested.to_vec();
    if !keys.iter().any(|key| key.field == ID_FIELD) {
        keys.push(SortKey { field: ID_FIELD.to_string(), descending: false });
    }
    keys
}

fn compare_records(a: &Value, b: &Value, keys: &[SortKey]) -> Ordering {
    keys.iter()
        .map(|key| {
            let order = sort_order(lookup(a, key.field.split('.')), lookup(b, key.field.split('.')));
            if key.descending { order.reverse() } else { order }
        })
        .find(|order| order.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// A total order over optional JSON values for sorting (MongoDB's order of types).
fn sort_order(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    fn rank(value: Option<&Value>) -> u8 {
        match value {
            None => 0,
            Some(Value::Null) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(Value::Object(_)) => 4,
            Some(Value::Array(_)) => 5,
            Some(Value::Bool(_)) => 6,
        }
    }
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => compare_numbers(x, y).unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

fn project(record: &Value, fields: &[String]) -> Value {
    match record {
        Value::Object(all) if !fields.is_empty() => {
            Value::Object(fields.iter().filter_map(|f| Some((f.clone(), all.get(f)?.clone()))).collect())
        }
        other => other.clone(),
    }
}

fn parse_fields(fields: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match fields {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(names)) => names
            .iter()
            .filter_map(|name| match name {
                Value::String(name) if name.trim().is_empty() => None,
                Value::String(name) => Some(Ok(name.trim().to_string())),
                _ => Some(Err(json_decode())),
            })
            .collect(),
        Some(_) => Err(json_decode()),
    }
}

/// `"-a, b"` → a descending, b ascending; a `+` prefix is accepted for ascending.
fn parse_sort(sort: Option<&Value>) -> Result<Vec<SortKey>, ApiError> {
    let sort = match sort {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(sort)) => sort,
        Some(_) => return Err(json_decode()),
    };
    Ok(sort
        .split(',')
        .map(str::trim)
        .filter_map(|item| {
            let (field, descending) = match item.strip_prefix('-') {
                Some(field) => (field, true),
                None => (item.strip_prefix('+').unwrap_or(item), false),
            };
            let field = field.trim();
            (!field.is_empty()).then(|| SortKey { field: field.to_string(), descending })
        })
        .collect())
}

/// A JSON number (fractions truncated); absent or null is 0.
fn integer(value: Option<&Value>) -> Result<i64, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).ok_or_else(json_decode),
        Some(_) => Err(json_decode()),
    }
}

fn json_decode() -> ApiError {
    ApiError::new(ErrorCode::JsonDecode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(field: &str, descending: bool) -> SortKey {
        SortKey { field: field.to_string(), descending }
    }

    #[test]
    fn parses_lenient_bodies() {
        let table: [(&[u8], Vec<String>, Page); 6] = [
            (b"", vec![], Page::default()),
            (b" null ", vec![], Page::default()),
            (b"{}", vec![], Page::default()),
            (
                br#"{"condition": {"a": 1}, "fields": ["subscription_id", " ", "callback_url "],
                     "page": {"start": 2, "limit": 10.0, "sort": "-subscription_id, +a,,b.c"}}"#,
                vec!["subscription_id".into(), "callback_url".into()],
                Page {
                    start: 2,
                    limit: 10,
                    sort: vec![key("subscription_id", true), key("a", false), key("b.c", false)],
                },
            ),
            (
                br#"{"condition": null, "fields": null, "page": {"start": -5, "limit": -1, "sort": ""}}"#,
                vec![],
                Page { start: 0, limit: -1, sort: vec![] },
            ),
            (br#"{"page": null, "bk_supplier_account": "0"}"#, vec![], Page::default()),
        ];
        for (body, fields, page) in table {
            let request =
                SearchRequest::parse(body).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(body)));
            assert_eq!(request.fields, fields);
            assert_eq!(request.page, page);
        }
    }

    #[test]
    fn rejects_bad_bodies() {
        let table: [(&[u8], ErrorCode, Option<&str>); 10] = [
            (b"{", ErrorCode::JsonDecode, None),
            (b"[]", ErrorCode::JsonDecode, None),
            (br#"{"fields": "a,b"}"#, ErrorCode::JsonDecode, None),
            (br#"{"fields": [1]}"#, ErrorCode::JsonDecode, None),
            (br#"{"page": []}"#, ErrorCode::JsonDecode, None),
            (br#"{"page": {"limit": "10"}}"#, ErrorCode::JsonDecode, None),
            (br#"{"page": {"start": true}}"#, ErrorCode::JsonDecode, None),
            (br#"{"page": {"sort": ["a"]}}"#, ErrorCode::JsonDecode, None),
            (br#"{"condition": "a = 1"}"#, ErrorCode::FieldInvalid, Some("condition")),
            (br#"{"condition": {"$where": "1"}}"#, ErrorCode::FieldInvalid, Some("$where")),
        ];
        for (body, code, detail) in table {
            let error = SearchRequest::parse(body).expect_err(&String::from_utf8_lossy(body));
            assert_eq!((error.code, error.detail.as_deref()), (code, detail), "{}", String::from_utf8_lossy(body));
        }
    }

    fn records() -> Vec<Value> {
        vec![
            json!({"subscription_id": 3, "subscription_name": "b", "bk_supplier_account": "0", "statistics": {"total": 5}}),
            json!({"subscription_id": 1, "subscription_name": "c", "bk_supplier_account": "0", "statistics": {"total": 9}}),
            json!({"subscription_id": 2, "subscription_name": "a", "bk_supplier_account": "1"}),
            json!({"subscription_id": 4, "subscription_name": "b", "bk_supplier_account": "0", "statistics": {"total": 5}}),
            json!({"subscription_id": 5, "subscription_name": 7, "bk_supplier_account": "0"}),
        ]
    }

    fn ids(page: &[Value]) -> Vec<i64> {
        page.iter().map(|r| r["subscription_id"].as_i64().unwrap_or(-1)).collect()
    }

    #[test]
    fn filters_sorts_and_pages() {
        let table: [(Value, Option<usize>, usize, Vec<i64>); 13] = [
            (json!({}), None, 5, vec![1, 2, 3, 4, 5]),
            (json!({"page": {"sort": "-subscription_id"}}), None, 5, vec![5, 4, 3, 2, 1]),
            (json!({"page": {"sort": "subscription_name"}}), None, 5, vec![5, 2, 3, 4, 1]),
            (json!({"page": {"sort": "-subscription_name"}}), None, 5, vec![1, 3, 4, 2, 5]),
            (json!({"page": {"sort": "statistics.total"}}), None, 5, vec![2, 5, 3, 4, 1]),
            (json!({"page": {"sort": "-statistics.total,-subscription_id"}}), None, 5, vec![1, 4, 3, 5, 2]),
            (json!({"condition": {"bk_supplier_account": "0"}}), None, 4, vec![1, 3, 4, 5]),
            (json!({"page": {"start": 1, "limit": 2}}), None, 5, vec![2, 3]),
            (json!({"page": {"start": 4, "limit": 0}}), None, 5, vec![5]),
            (json!({"page": {"start": 9}}), None, 5, vec![]),
            (json!({"page": {"limit": 0}}), Some(2), 5, vec![1, 2]),
            (json!({"page": {"limit": 3}}), Some(2), 5, vec![1, 2]),
            (json!({"page": {"limit": 1}}), Some(2), 5, vec![1]),
        ];
        let mut by_id = records();
        by_id.sort_by_key(|r| r["subscription_id"].as_i64());
        for (body, max_limit, count, expected) in table {
            let request = SearchRequest::from_value(&body).unwrap();
            let (total, page) = search(&records(), &request, max_limit, InputOrder::Unordered);
            assert_eq!((total, ids(&page)), (count, expected.clone()), "{body} max {max_limit:?}");
            // Input already in id order answers the same, sorted or not.
            let (total, page) = search(&by_id, &request, max_limit, InputOrder::ById);
            assert_eq!((total, ids(&page)), (count, expected), "{body} max {max_limit:?}, input by id");
        }
    }

    #[test]
    fn forced_owner_narrows_the_count() {
        let mut request = SearchRequest::from_value(&json!({"page": {"limit": 1}})).unwrap();
        request.condition.force_owner("1");
        let (count, page) = search(&records(), &request, None, InputOrder::Unordered);
        assert_eq!((count, ids(&page)), (1, vec![2]));
    }

    #[test]
    fn projection_keeps_exactly_the_listed_keys() {
        let table = [
            (
                json!([]),
                json!({"subscription_id": 1, "subscription_name": "c", "bk_supplier_account": "0", "statistics": {"total": 9}}),
            ),
            (json!(["subscription_name"]), json!({"subscription_name": "c"})),
            (json!(["subscription_name", "nope", "statistics.total"]), json!({"subscription_name": "c"})),
        ];
        for (fields, expected) in table {
            let request = SearchRequest::from_value(&json!({"fields": fields, "page": {"limit": 1}})).unwrap();
            assert_eq!(search(&records(), &request, None, InputOrder::Unordered).1, vec![expected], "{fields}");
        }
    }
}
