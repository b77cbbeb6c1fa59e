//! An EventSubscription as a bk-cmdb subscription record: what search returns and what its
//! `condition` filters over.

use super::time::{TimeZoneSetting, format_cmdb, parse_rfc3339};
use crate::crd::{ConfirmMode, EventSubscription};
use crate::effective::Effective;
use serde_json::{Value, json};

/// The record of a subscription, from its effective (normalised, defaulted) spec and its
/// status. A subscription without an id yet shows 0; `last_time` is empty until the status
/// has one. `time_out` and `timeout` carry the same value: bk-cmdb's server reads the
/// first, its documentation names the second.
pub fn subscription_record(sub: &EventSubscription, tz: &TimeZoneSetting) -> Value {
    let effective = Effective::from_spec(&sub.spec);
    let status = sub.status.clone().unwrap_or_default();
    let statistics = status.statistics.unwrap_or_default();
    let timeout_seconds = effective.timeout.as_secs();
    let last_time =
        status.last_time.as_deref().and_then(parse_rfc3339).map(|ts| format_cmdb(ts, tz)).unwrap_or_default();
    json!({
        "subscription_id": status.subscription_id.unwrap_or(0),
        "subscription_name": effective.subscription_name,
        "system_name": effective.system_name,
        "callback_url": effective.callback_url,
        "confirm_mode": confirm_mode_name(effective.confirm_mode),
        "confirm_pattern": effective.confirm_pattern,
        "time_out": timeout_seconds,
        "timeout": timeout_seconds,
        "subscription_form": effective.events.join(","),
        "operator": status.operator.unwrap_or_default(),
        "bk_supplier_account": effective.supplier_account,
        "bk_biz_id": effective.biz_id,
        "last_time": last_time,
        "statistics": {"total": statistics.total, "failure": statistics.failure},
    })
}

/// bk-cmdb's `confirm_mode` spelling.
pub fn confirm_mode_name(mode: ConfirmMode) -> &'static str {
    match mode {
        ConfirmMode::Httpstatus => "httpstatus",
        ConfirmMode::Regular => "regular",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Confirm, EventSubscriptionSpec, EventSubscriptionStatus, Statistics};

    fn subscription(status: Option<EventSubscriptionStatus>) -> EventSubscription {
        let mut sub = EventSubscription::new(
            "hosts",
            EventSubscriptionSpec {
                subscription_name: "hosts".into(),
                system_name: Some("cmdb-sync".into()),
                callback_url: "http://127.0.0.1:9000/cb".into(),
                confirm: Some(Confirm { mode: Some(ConfirmMode::Regular), pattern: Some("ok".into()) }),
                events: vec!["hostupdate".into(), "hostcreate".into(), "hostcreate".into()],
                timeout_seconds: Some(30),
                biz_id: Some(3),
                ..Default::default()
            },
        );
        sub.status = status;
        sub
    }

    #[test]
    fn records() {
        let full_status = EventSubscriptionStatus {
            subscription_id: Some(12),
            operator: Some("admin".into()),
            last_time: Some("2024-01-15T08:30:05Z".into()),
            statistics: Some(Statistics { total: 30, failure: 2, delivered: 28, ..Default::default() }),
            ..Default::default()
        };
        let unparseable_time = EventSubscriptionStatus { last_time: Some("soon".into()), ..Default::default() };
        let shanghai: TimeZoneSetting = "Asia/Shanghai".parse().unwrap();
        let table = [
            (None, TimeZoneSetting::default(), 0, "", "", json!({"total": 0, "failure": 0})),
            (Some(full_status), shanghai, 12, "admin", "2024-01-15 16:30:05", json!({"total": 30, "failure": 2})),
            (Some(unparseable_time), TimeZoneSetting::default(), 0, "", "", json!({"total": 0, "failure": 0})),
        ];
        for (status, tz, id, operator, last_time, statistics) in table {
            let expected = json!({
                "subscription_id": id,
                "subscription_name": "hosts",
                "system_name": "cmdb-sync",
                "callback_url": "http://127.0.0.1:9000/cb",
                "confirm_mode": "regular",
                "confirm_pattern": "ok",
                "time_out": 30,
                "timeout": 30,
                "subscription_form": "hostcreate,hostupdate",
                "operator": operator,
                "bk_supplier_account": "0",
                "bk_biz_id": 3,
                "last_time": last_time,
                "statistics": statistics,
            });
            assert_eq!(subscription_record(&subscription(status), &tz), expected);
        }
    }

    #[test]
    fn defaults_show_as_bk_cmdb_would() {
        let mut sub = subscription(None);
        sub.spec.confirm = None;
        sub.spec.timeout_seconds = None;
        sub.spec.system_name = None;
        let shown = subscription_record(&sub, &TimeZoneSetting::default());
        let table = [
            ("confirm_mode", json!("httpstatus")),
            ("confirm_pattern", json!("200")),
            ("time_out", json!(10)),
            ("timeout", json!(10)),
            ("system_name", json!("")),
        ];
        for (key, value) in table {
            assert_eq!(shown[key], value, "{key}");
        }
    }
}
