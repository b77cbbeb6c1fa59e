//! bk-cmdb event instances: what producers publish, how an event's name is derived, and
//! the body herald stores and POSTs to callbacks (bk-cmdb v3.5 field order).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One event as a producer publishes it (`POST /api/v3/event/publish`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedEvent {
    pub event_type: String,
    pub action: String,
    pub obj_type: String,
    #[serde(default)]
    pub data: Vec<EventData>,
    #[serde(default)]
    pub bk_supplier_account: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub txn_id: Option<String>,
    #[serde(default)]
    pub action_time: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct EventData {
    #[serde(default)]
    pub cur_data: Value,
    #[serde(default)]
    pub pre_data: Value,
}

/// The stored event: the callback body without the per-subscription fields, which are
/// appended at delivery (`callback_body`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredEvent {
    pub txn_id: String,
    pub event_type: String,
    pub action: String,
    pub action_time: String,
    pub obj_type: String,
    pub data: Vec<EventData>,
    pub bk_supplier_account: String,
    pub request_id: String,
    pub request_time: String,
}

/// Why a published event is refused; `field` names the offending field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidEvent {
    pub field: &'static str,
    pub reason: String,
}

const EVENT_TYPES: [&str; 3] = ["instdata", "relation", "association"];
const ACTIONS: [&str; 3] = ["create", "update", "delete"];

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidEvent {
    InvalidEvent { field, reason: reason.into() }
}

/// The event name subscriptions list, derived as bk-cmdb does: instdata → object type +
/// action (with `object` replaced by the model id `bk_obj_id` of the current data, or
/// the previous data for deletes); relation → the object type alone; association →
/// object type + "update".
pub fn event_name(event: &PublishedEvent) -> Result<String, InvalidEvent> {
    if !EVENT_TYPES.contains(&event.event_type.as_str()) {
        return Err(invalid("event_type", format!("must be one of {EVENT_TYPES:?}")));
    }
    if !ACTIONS.contains(&event.action.as_str()) {
        return Err(invalid("action", format!("must be one of {ACTIONS:?}")));
    }
    let obj_type = event.obj_type.trim();
    if obj_type.is_empty() {
        return Err(invalid("obj_type", "is required"));
    }
    Ok(match event.event_type.as_str() {
        "instdata" if obj_type == "object" => {
            let source = |d: &EventData| if event.action == "delete" { d.pre_data.clone() } else { d.cur_data.clone() };
            let model = event
                .data
                .first()
                .map(source)
                .and_then(|data| data.get("bk_obj_id").and_then(Value::as_str).map(str::to_string))
                .filter(|id| !id.is_empty())
                .ok_or_else(|| {
                    invalid("bk_obj_id", "an instdata event of obj_type object needs bk_obj_id in its data")
                })?;
            format!("{model}{}", event.action)
        }
        "instdata" => format!("{obj_type}{}", event.action),
        "relation" => obj_type.to_string(),
        _ => format!("{obj_type}update"),
    })
}

/// Producers skip an update whose current and previous data are equal but for
/// `last_time`; herald does the same for events that reach it anyway.
pub fn is_noop_update(event: &PublishedEvent) -> bool {
    fn without_last_time(value: &Value) -> Value {
        let mut value = value.clone();
        if let Some(object) = value.as_object_mut() {
            object.remove("last_time");
        }
        value
    }
    event.action == "update"
        && !event.data.is_empty()
        && event.data.iter().all(|d| without_last_time(&d.cur_data) == without_last_time(&d.pre_data))
}

impl StoredEvent {
    /// `now` and `request_id` fill what the producer left out.
    pub fn from_published(event: PublishedEvent, now: &str, request_id: &str) -> Self {
        StoredEvent {
            txn_id: event.txn_id.unwrap_or_default(),
            event_type: event.event_type,
            action: event.action,
            action_time: event.action_time.filter(|t| !t.is_empty()).unwrap_or_else(|| now.to_string()),
            obj_type: event.obj_type,
            data: event.data,
            bk_supplier_account: supplier_account(event.bk_supplier_account.as_deref()),
            request_id: event.request_id.filter(|r| !r.is_empty()).unwrap_or_else(|| request_id.to_string()),
            request_time: now.to_string(),
        }
    }
}

/// The event's supplier account: bk-cmdb's default "0" when absent or blank.
pub fn supplier_account(account: Option<&str>) -> String {
    account.map(str::trim).filter(|a| !a.is_empty()).unwrap_or(crate::effective::DEFAULT_SUPPLIER_ACCOUNT).to_string()
}

/// The callback body: the stored event followed by `distribution_id` and
/// `subscription_id`. Appended to the stored JSON text rather than re-serialised, so a
/// delivery costs no parse.
pub fn callback_body(stored: &str, distribution_id: i64, subscription_id: i64) -> String {
    let head = stored.trim_end().strip_suffix('}').unwrap_or(stored);
    format!("{head},\"distribution_id\":{distribution_id},\"subscription_id\":{subscription_id}}}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(value: Value) -> PublishedEvent {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn names_follow_bk_cmdb() {
        let cases = [
            (json!({"event_type": "instdata", "action": "create", "obj_type": "host"}), "hostcreate"),
            (json!({"event_type": "instdata", "action": "update", "obj_type": "module"}), "moduleupdate"),
            (json!({"event_type": "instdata", "action": "delete", "obj_type": "biz"}), "bizdelete"),
            (
                json!({"event_type": "instdata", "action": "update", "obj_type": "object",
                    "data": [{"cur_data": {"bk_obj_id": "switch"}, "pre_data": {"bk_obj_id": "old"}}]}),
                "switchupdate",
            ),
            (
                json!({"event_type": "instdata", "action": "delete", "obj_type": "object",
                    "data": [{"cur_data": null, "pre_data": {"bk_obj_id": "router"}}]}),
                "routerdelete",
            ),
            (json!({"event_type": "relation", "action": "create", "obj_type": "moduletransfer"}), "moduletransfer"),
            (json!({"event_type": "association", "action": "delete", "obj_type": "host"}), "hostupdate"),
        ];
        for (input, name) in cases {
            assert_eq!(event_name(&event(input.clone())).as_deref(), Ok(name), "{input}");
        }
    }

    #[test]
    fn malformed_events_name_the_field() {
        let cases = [
            (json!({"event_type": "other", "action": "create", "obj_type": "host"}), "event_type"),
            (json!({"event_type": "instdata", "action": "upsert", "obj_type": "host"}), "action"),
            (json!({"event_type": "instdata", "action": "create", "obj_type": " "}), "obj_type"),
            (
                json!({"event_type": "instdata", "action": "create", "obj_type": "object", "data": [{"cur_data": {}}]}),
                "bk_obj_id",
            ),
        ];
        for (input, field) in cases {
            assert_eq!(event_name(&event(input)).unwrap_err().field, field);
        }
    }

    #[test]
    fn an_update_that_only_moves_last_time_is_a_noop() {
        let same = event(json!({"event_type": "instdata", "action": "update", "obj_type": "host",
            "data": [{"cur_data": {"a": 1, "last_time": "x"}, "pre_data": {"a": 1, "last_time": "y"}}]}));
        assert!(is_noop_update(&same));
        let changed = event(json!({"event_type": "instdata", "action": "update", "obj_type": "host",
            "data": [{"cur_data": {"a": 2}, "pre_data": {"a": 1}}]}));
        assert!(!is_noop_update(&changed));
    }

    #[test]
    fn callback_body_keeps_bk_cmdb_field_order() {
        let stored = StoredEvent::from_published(
            event(json!({"event_type": "instdata", "action": "create", "obj_type": "host",
                         "data": [{"cur_data": {"bk_host_id": 1}}]})),
            "2026-01-02 03:04:05",
            "req-1",
        );
        let body = callback_body(&serde_json::to_string(&stored).unwrap(), 3, 42);
        let keys: Vec<String> =
            serde_json::from_str::<serde_json::Map<String, Value>>(&body).unwrap().keys().cloned().collect();
        let order: Vec<usize> = [
            "txn_id",
            "event_type",
            "action",
            "action_time",
            "obj_type",
            "data",
            "bk_supplier_account",
            "request_id",
            "request_time",
            "distribution_id",
            "subscription_id",
        ]
        .iter()
        .map(|k| body.find(&format!("\"{k}\":")).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{body}");
        assert_eq!(keys.len(), 11);
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["distribution_id"], 3);
        assert_eq!(parsed["subscription_id"], 42);
        assert_eq!(parsed["bk_supplier_account"], "0");
        assert_eq!(parsed["request_id"], "req-1");
    }
}
