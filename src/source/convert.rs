//! bk-cmdb watch events as bk-cmdb v3.5 events (docs/sources.md has the table): which
//! event type, object type and action each watched change becomes, its `cur_data` and
//! `pre_data`, and the key under which an instance's last detail is kept for pre-images.
//! Pure functions.

use crate::crd::{WatchEventType, WatchResource};
use crate::event::{EventData, PublishedEvent, StoredEvent, event_name, is_noop_update};
use serde::Deserialize;
use serde_json::Value;

/// One event of a watch answer (`bk_events[]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct WatchEvent {
    pub bk_cursor: String,
    #[serde(default)]
    pub bk_resource: String,
    #[serde(default)]
    pub bk_event_type: String,
    #[serde(default)]
    pub bk_detail: Value,
}

/// Why a watch event is not pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// The resource's `eventTypes` or `objects` leave it out.
    Filtered,
    /// Its detail names another supplier account than the source's.
    OtherAccount,
    /// An update that changes nothing but `last_time` (bk-cmdb v3.5 dropped those too).
    NoOp,
    /// A change v3.5 had no event for (an update of a relation), or one without the
    /// fields its v3.5 event needs (`bk_obj_id` of a model instance).
    NoCounterpart,
}

impl Skipped {
    pub fn as_str(self) -> &'static str {
        match self {
            Skipped::Filtered => "filtered",
            Skipped::OtherAccount => "other_account",
            Skipped::NoOp => "noop",
            Skipped::NoCounterpart => "no_counterpart",
        }
    }
}

/// What a watched resource's events become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `instdata` with this object type.
    Instance(&'static str),
    /// `instdata` with the instance's model (`bk_obj_id`) as object type.
    ModelInstance,
    /// `relation` with this object type; creates and deletes only.
    Relation(&'static str),
    /// `relation/hostidentifier/update`, whatever the watch calls the change.
    HostIdentifier,
}

fn kind(resource: WatchResource) -> Kind {
    match resource {
        WatchResource::Host => Kind::Instance("host"),
        WatchResource::Biz => Kind::Instance("biz"),
        WatchResource::Set => Kind::Instance("set"),
        WatchResource::Module => Kind::Instance("module"),
        WatchResource::Process => Kind::Instance("process"),
        WatchResource::Plat => Kind::Instance("plat"),
        WatchResource::ObjectInstance | WatchResource::MainlineInstance => Kind::ModelInstance,
        WatchResource::HostRelation => Kind::Relation("moduletransfer"),
        WatchResource::ProcessInstanceRelation => Kind::Relation("processmodule"),
        WatchResource::HostIdentifier => Kind::HostIdentifier,
    }
}

/// bk-cmdb's name of a resource in watch paths.
pub fn resource_name(resource: WatchResource) -> &'static str {
    match resource {
        WatchResource::Host => "host",
        WatchResource::HostRelation => "host_relation",
        WatchResource::Biz => "biz",
        WatchResource::Set => "set",
        WatchResource::Module => "module",
        WatchResource::Process => "process",
        WatchResource::ProcessInstanceRelation => "process_instance_relation",
        WatchResource::Plat => "plat",
        WatchResource::ObjectInstance => "object_instance",
        WatchResource::MainlineInstance => "mainline_instance",
        WatchResource::HostIdentifier => "host_identifier",
    }
}

/// The id field of an instance of the resource; None for relations, which have no
/// pre-image to keep (a delete carries the deleted row).
fn id_field(resource: WatchResource) -> Option<&'static str> {
    match resource {
        WatchResource::Host | WatchResource::HostIdentifier => Some("bk_host_id"),
        WatchResource::Biz => Some("bk_biz_id"),
        WatchResource::Set => Some("bk_set_id"),
        WatchResource::Module => Some("bk_module_id"),
        WatchResource::Process => Some("bk_process_id"),
        WatchResource::Plat => Some("bk_cloud_id"),
        WatchResource::ObjectInstance | WatchResource::MainlineInstance => Some("bk_inst_id"),
        WatchResource::HostRelation | WatchResource::ProcessInstanceRelation => None,
    }
}

/// bk-cmdb's standard fields of the resources whose watch needs a field list, used when
/// the spec gives none (bk-cmdb returns null for a field a model lacks).
fn standard_fields(resource: WatchResource) -> &'static [&'static str] {
    match resource {
        WatchResource::Host => &[
            "bk_host_id",
            "bk_host_name",
            "bk_host_innerip",
            "bk_host_outerip",
            "bk_cloud_id",
            "bk_os_type",
            "bk_os_name",
            "bk_os_version",
            "bk_os_bit",
            "bk_cpu",
            "bk_cpu_module",
            "bk_mem",
            "bk_disk",
            "bk_mac",
            "bk_outer_mac",
            "bk_sn",
            "bk_asset_id",
            "bk_comment",
            "bk_service_term",
            "bk_sla",
            "bk_state_name",
            "bk_province_name",
            "bk_isp_name",
            "operator",
            "bk_bak_operator",
            "bk_supplier_account",
            "create_time",
            "last_time",
        ],
        WatchResource::Biz => &[
            "bk_biz_id",
            "bk_biz_name",
            "bk_biz_maintainer",
            "bk_biz_productor",
            "bk_biz_developer",
            "bk_biz_tester",
            "operator",
            "life_cycle",
            "time_zone",
            "language",
            "default",
            "bk_supplier_account",
            "create_time",
            "last_time",
        ],
        WatchResource::Set => &[
            "bk_set_id",
            "bk_set_name",
            "bk_biz_id",
            "bk_parent_id",
            "bk_set_env",
            "bk_service_status",
            "bk_set_desc",
            "bk_capacity",
            "description",
            "set_template_id",
            "default",
            "bk_supplier_account",
            "create_time",
            "last_time",
        ],
        WatchResource::Module => &[
            "bk_module_id",
            "bk_module_name",
            "bk_set_id",
            "bk_biz_id",
            "bk_parent_id",
            "bk_module_type",
            "service_category_id",
            "service_template_id",
            "set_template_id",
            "operator",
            "bk_bak_operator",
            "default",
            "bk_supplier_account",
            "create_time",
            "last_time",
        ],
        _ => &[],
    }
}

/// The `bk_fields` of a watch: the spec's list (or the standard one) with the fields herald
/// itself needs added: the instance id (pre-images), `bk_obj_id` (model instances' event
/// names) and `bk_supplier_account` (tenancy). Empty means every field.
pub fn watch_fields(resource: WatchResource, listed: &[String]) -> Vec<String> {
    let mut fields: Vec<String> = if listed.is_empty() {
        standard_fields(resource).iter().map(ToString::to_string).collect()
    } else {
        listed.to_vec()
    };
    if fields.is_empty() {
        return fields;
    }
    let needed = id_field(resource)
        .into_iter()
        .chain((kind(resource) == Kind::ModelInstance).then_some("bk_obj_id"))
        .chain(["bk_supplier_account"]);
    for field in needed {
        if !fields.iter().any(|f| f == field) {
            fields.push(field.to_string());
        }
    }
    fields
}

/// The key an instance's last detail is kept under: None for relations and for details
/// without their id.
pub fn instance_key(resource: WatchResource, detail: &Value) -> Option<String> {
    let id = detail.get(id_field(resource)?).filter(|id| !id.is_null())?;
    let id = id.as_str().map(str::to_string).unwrap_or_else(|| id.to_string());
    Some(match kind(resource) {
        Kind::ModelInstance => format!("{}/{id}", detail.get("bk_obj_id").and_then(Value::as_str).unwrap_or_default()),
        _ => id,
    })
}

/// What herald does with one resource's events.
pub struct Rules<'a> {
    pub resource: WatchResource,
    pub event_types: &'a [WatchEventType],
    pub objects: &'a [String],
    pub supplier_account: &'a str,
}

/// A v3.5 event and the name subscriptions list it under.
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    pub event: StoredEvent,
    pub name: String,
}

fn event_type(text: &str) -> Option<WatchEventType> {
    match text {
        "create" => Some(WatchEventType::Create),
        "update" => Some(WatchEventType::Update),
        "delete" => Some(WatchEventType::Delete),
        _ => None,
    }
}

/// A stable request id for the event of `cursor`: the same watch event always gets the
/// same id, so a receiver can recognise a redelivery across herald restarts.
pub fn request_id(cursor: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cursor.as_bytes());
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The v3.5 event of one watch event. `previous` is the last detail herald kept of the
/// instance (pre-images), `now` bk-cmdb's time format of the moment it was read.
pub fn convert(
    rules: &Rules<'_>,
    watched: &WatchEvent,
    previous: Option<&Value>,
    now: &str,
) -> Result<Converted, Skipped> {
    let Some(change) = event_type(&watched.bk_event_type) else { return Err(Skipped::NoCounterpart) };
    if !rules.event_types.is_empty() && !rules.event_types.contains(&change) {
        return Err(Skipped::Filtered);
    }
    let detail = &watched.bk_detail;
    // A detail without the field (bk-cmdb's projection gives null) is the source's account;
    // one naming another account, as text or as a number, is not published.
    let account = detail.get("bk_supplier_account").filter(|a| !a.is_null());
    if let Some(account) = account
        && account.as_str().map_or_else(|| account.to_string(), str::to_string) != rules.supplier_account
    {
        return Err(Skipped::OtherAccount);
    }
    let model = detail.get("bk_obj_id").and_then(Value::as_str).filter(|m| !m.is_empty());
    let (event_type, obj_type, action) = match kind(rules.resource) {
        Kind::Instance(obj_type) => ("instdata", obj_type.to_string(), watched.bk_event_type.as_str()),
        Kind::ModelInstance => {
            let Some(model) = model else { return Err(Skipped::NoCounterpart) };
            if !rules.objects.is_empty() && !rules.objects.iter().any(|o| o == model) {
                return Err(Skipped::Filtered);
            }
            ("instdata", model.to_string(), watched.bk_event_type.as_str())
        }
        Kind::Relation(_) if change == WatchEventType::Update => return Err(Skipped::NoCounterpart),
        Kind::Relation(obj_type) => ("relation", obj_type.to_string(), watched.bk_event_type.as_str()),
        Kind::HostIdentifier => ("relation", "hostidentifier".to_string(), "update"),
    };
    // The kept detail is the pre-image of an update only: a create has none (one kept from
    // before a gap or a delete herald missed is not this instance's past), and a delete's
    // detail is the deleted record itself.
    let previous = || previous.cloned().unwrap_or(Value::Null);
    let (cur_data, pre_data) = match (kind(rules.resource), change) {
        (Kind::HostIdentifier, _) | (_, WatchEventType::Update) => (detail.clone(), previous()),
        (_, WatchEventType::Create) => (detail.clone(), Value::Null),
        (_, WatchEventType::Delete) => (Value::Null, detail.clone()),
    };
    let published = PublishedEvent {
        event_type: event_type.into(),
        action: action.into(),
        obj_type,
        data: vec![EventData { cur_data, pre_data }],
        bk_supplier_account: Some(rules.supplier_account.to_string()),
        request_id: Some(request_id(&watched.bk_cursor)),
        txn_id: None,
        action_time: None,
    };
    if !published.data[0].pre_data.is_null() && is_noop_update(&published) {
        return Err(Skipped::NoOp);
    }
    let name = event_name(&published).map_err(|_| Skipped::NoCounterpart)?;
    Ok(Converted { event: StoredEvent::from_published(published, now, ""), name })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn watched(event_type: &str, detail: Value) -> WatchEvent {
        WatchEvent {
            bk_cursor: "cursor-1".into(),
            bk_resource: String::new(),
            bk_event_type: event_type.into(),
            bk_detail: detail,
        }
    }

    fn rules(resource: WatchResource) -> Rules<'static> {
        Rules { resource, event_types: &[], objects: &[], supplier_account: "0" }
    }

    fn body(converted: &Converted) -> Value {
        serde_json::to_value(&converted.event).unwrap()
    }

    #[test]
    fn instance_changes_become_instdata_events_named_as_in_v3_5() {
        let host = json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.7", "bk_supplier_account": "0"});
        let created = convert(&rules(WatchResource::Host), &watched("create", host.clone()), None, "t").unwrap();
        assert_eq!(created.name, "hostcreate");
        let b = body(&created);
        assert_eq!(
            (b["event_type"].as_str(), b["obj_type"].as_str(), b["action"].as_str()),
            (Some("instdata"), Some("host"), Some("create"))
        );
        assert_eq!(b["data"], json!([{"cur_data": host, "pre_data": null}]));
        assert_eq!(b["request_id"], request_id("cursor-1"));
        assert_eq!(b["txn_id"], "");
        assert_eq!(b["bk_supplier_account"], "0");

        let before = json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.6", "bk_supplier_account": "0"});
        let updated =
            convert(&rules(WatchResource::Host), &watched("update", host.clone()), Some(&before), "t").unwrap();
        assert_eq!(updated.name, "hostupdate");
        assert_eq!(body(&updated)["data"], json!([{"cur_data": host, "pre_data": before}]));

        let deleted =
            convert(&rules(WatchResource::Set), &watched("delete", json!({"bk_set_id": 3})), None, "t").unwrap();
        assert_eq!(deleted.name, "setdelete");
        assert_eq!(body(&deleted)["data"], json!([{"cur_data": null, "pre_data": {"bk_set_id": 3}}]));
    }

    #[test]
    fn model_instances_take_their_model_as_object_type() {
        let switch = json!({"bk_obj_id": "switch", "bk_inst_id": 4, "bk_inst_name": "sw-4"});
        let converted =
            convert(&rules(WatchResource::ObjectInstance), &watched("update", switch.clone()), None, "t").unwrap();
        assert_eq!(converted.name, "switchupdate");
        assert_eq!(body(&converted)["obj_type"], "switch");
        let only_routers = ["router".to_string()];
        let filtered = Rules { objects: &only_routers, ..rules(WatchResource::ObjectInstance) };
        assert_eq!(convert(&filtered, &watched("update", switch), None, "t"), Err(Skipped::Filtered));
        assert_eq!(
            convert(&rules(WatchResource::MainlineInstance), &watched("create", json!({"bk_inst_id": 1})), None, "t"),
            Err(Skipped::NoCounterpart)
        );
    }

    #[test]
    fn host_relations_become_moduletransfer_creates_and_deletes() {
        let row =
            json!({"bk_biz_id": 1, "bk_set_id": 2, "bk_module_id": 3, "bk_host_id": 7, "bk_supplier_account": "0"});
        let added = convert(&rules(WatchResource::HostRelation), &watched("create", row.clone()), None, "t").unwrap();
        assert_eq!(added.name, "moduletransfer");
        let b = body(&added);
        assert_eq!(
            (b["event_type"].as_str(), b["obj_type"].as_str(), b["action"].as_str()),
            (Some("relation"), Some("moduletransfer"), Some("create"))
        );
        assert_eq!(b["data"], json!([{"cur_data": row, "pre_data": null}]));
        let removed = convert(&rules(WatchResource::HostRelation), &watched("delete", row.clone()), None, "t").unwrap();
        assert_eq!(body(&removed)["data"], json!([{"cur_data": null, "pre_data": row}]));
        assert_eq!(
            convert(&rules(WatchResource::HostRelation), &watched("update", row), None, "t"),
            Err(Skipped::NoCounterpart)
        );
    }

    #[test]
    fn host_identifiers_are_hostidentifier_relation_updates_with_the_last_one_seen() {
        let now = json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.8", "bk_supplier_account": "0"});
        let before = json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.7", "bk_supplier_account": "0"});
        for change in ["create", "update"] {
            let converted =
                convert(&rules(WatchResource::HostIdentifier), &watched(change, now.clone()), Some(&before), "t")
                    .unwrap();
            assert_eq!(converted.name, "hostidentifier");
            let b = body(&converted);
            assert_eq!((b["event_type"].as_str(), b["action"].as_str()), (Some("relation"), Some("update")));
            assert_eq!(b["data"], json!([{"cur_data": now, "pre_data": before}]));
        }
        assert_eq!(instance_key(WatchResource::HostIdentifier, &now).as_deref(), Some("7"));
    }

    #[test]
    fn filters_accounts_and_noop_updates_skip_events() {
        let types = [WatchEventType::Create];
        let creates_only = Rules { event_types: &types, ..rules(WatchResource::Host) };
        assert_eq!(convert(&creates_only, &watched("update", json!({})), None, "t"), Err(Skipped::Filtered));
        let other = json!({"bk_host_id": 1, "bk_supplier_account": "1"});
        assert_eq!(
            convert(&rules(WatchResource::Host), &watched("create", other), None, "t"),
            Err(Skipped::OtherAccount)
        );
        let now = json!({"bk_host_id": 1, "last_time": "b"});
        let before = json!({"bk_host_id": 1, "last_time": "a"});
        assert_eq!(
            convert(&rules(WatchResource::Host), &watched("update", now), Some(&before), "t"),
            Err(Skipped::NoOp)
        );
        assert_eq!(
            convert(&rules(WatchResource::Host), &watched("", Value::Null), None, "t"),
            Err(Skipped::NoCounterpart)
        );
    }

    #[test]
    fn field_lists_always_carry_what_herald_needs() {
        assert!(watch_fields(WatchResource::Host, &[]).contains(&"bk_host_innerip".to_string()));
        let listed = watch_fields(WatchResource::ObjectInstance, &["bk_inst_name".to_string()]);
        assert_eq!(listed, ["bk_inst_name", "bk_inst_id", "bk_obj_id", "bk_supplier_account"]);
        assert!(watch_fields(WatchResource::Process, &[]).is_empty(), "every field");
        assert_eq!(
            instance_key(WatchResource::ObjectInstance, &json!({"bk_obj_id": "sw", "bk_inst_id": 4})).as_deref(),
            Some("sw/4")
        );
        assert_eq!(instance_key(WatchResource::HostRelation, &json!({"bk_host_id": 4})), None);
    }
}
