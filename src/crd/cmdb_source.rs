//! The `CmdbSource` custom resource: one bk-cmdb whose resource watch herald reads and
//! turns into v3.5 events (docs/sources.md). Like EventSubscription, the schema carries no
//! `default:` values; defaults are named in the descriptions and applied where the
//! supervisor plans a source's watches (`crate::source`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A bk-cmdb (3.8 or later) whose resource watch herald reads: every change of the watched
/// resources becomes a bk-cmdb v3.5 event, delivered to the subscriptions that ask for it.
// The derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "CmdbSource",
    plural = "cmdbsources",
    singular = "cmdbsource",
    shortname = "csrc",
    category = "herald",
    namespaced,
    status = "CmdbSourceStatus",
    doc = "A bk-cmdb whose resource watch herald reads and pushes to subscriptions as v3.5 events.",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url", description = "bk-cmdb base URL"),
    printcolumn(
        name = "Account",
        type_ = "string",
        json_path = ".spec.supplierAccount",
        description = "Supplier account of the events"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every watched resource is being read"
    ),
    printcolumn(
        name = "Connected",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status",
        description = "Whether bk-cmdb answered the last watch"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.api == 'direct' || has(self.credentialsSecret)")
    .message("credentialsSecret is required when api is esb or apigw"))]
pub struct CmdbSourceSpec {
    /// Base URL of bk-cmdb's API server (api `direct`), of the ESB (api `esb`), or of
    /// bk-cmdb's stage on the API gateway (api `apigw`, such as
    /// `https://bkapi.example.com/api/bk-cmdb/prod`).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''"
    ).message("url must be an absolute http or https URL"))]
    pub url: String,

    /// `direct`: `POST /api/v3/event/watch/resource/{resource}` with the `BK_User` and
    /// supplier headers. `esb`: the ESB path `/api/c/compapi/v2/cc/resource_watch/` with app
    /// credentials from `credentialsSecret`. `apigw`: the API gateway's
    /// `/api/v3/event/watch/resource/{resource}` under `url`, with those credentials in
    /// `X-Bkapi-Authorization` (the gateway serves supplier account "0" only).
    pub api: SourceApi,

    /// Supplier account (bk-cmdb `bk_supplier_account`) of the events, "0" in a default
    /// installation. The source's namespace must be allowed for it.
    #[schemars(length(min = 1, max = 64))]
    pub supplier_account: String,

    /// The bk-cmdb user the watch is made as (`BK_User`, or `bk_username` through ESB).
    /// Defaults to "admin".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub user: Option<String>,

    /// A Secret in this namespace with keys `bk_app_code` and `bk_app_secret`: the app
    /// credentials. Required when api is esb or apigw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,

    /// The resources to watch, each at most once.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.resource == a.resource))")
        .message("each resource may be listed once"))]
    pub resources: Vec<WatchedResource>,

    /// Where the first read starts when herald holds no cursor for a resource yet. Defaults
    /// to `now`: changes from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Start>,

    /// What to do when bk-cmdb no longer holds herald's cursor (it keeps events for a few
    /// hours): `oldest` (default) resumes from the oldest event bk-cmdb still holds, `now`
    /// from the present. Either way the gap is reported (`CursorExpired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_cursor_expired: Option<ExpiryPolicy>,

    /// How long bk-cmdb keeps watch events, in seconds (60 to 86400). Defaults to 10800,
    /// the 3 hours bk-cmdb documents. Used to resume from the oldest event after a gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub retention_seconds: Option<i64>,

    /// PEM certificates trusted for an https `url`, in addition to the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,

    /// Fill `pre_data` of updates with the last detail herald saw of the instance (bk-cmdb's
    /// watch gives none). herald then keeps that detail per instance in its store, up to
    /// `preImageLimit`, and drops updates that change nothing but `last_time`. Deletes carry
    /// the deleted record as `pre_data` either way. Defaults to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_images: Option<bool>,

    /// Instances remembered per resource for `preImages` (1 to 10,000,000); the least
    /// recently changed are forgotten first. Defaults to 200,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub pre_image_limit: Option<i64>,
}

/// Which bk-cmdb API the watch goes through.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceApi {
    /// bk-cmdb's API server itself (in-cluster).
    #[default]
    Direct,
    /// BlueKing's ESB gateway, with app credentials.
    Esb,
    /// BlueKing's API gateway, with app credentials.
    Apigw,
}

/// One watched resource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.objects) || self.resource in ['object_instance', 'mainline_instance']"
).message("objects applies to object_instance and mainline_instance only").field_path(".objects"))]
pub struct WatchedResource {
    /// bk-cmdb watch resource: host, host_relation, biz, set, module, process, plat,
    /// process_instance_relation, object_instance, mainline_instance or host_identifier.
    pub resource: WatchResource,

    /// Fields of each instance to read (bk-cmdb `bk_fields`); the instance's id and
    /// `bk_supplier_account` are always added. bk-cmdb requires a list for host, biz, set
    /// and module: empty means herald's list of their standard fields (docs/sources.md);
    /// for the other resources empty means every field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512), inner(length(min = 1, max = 128)))]
    pub fields: Vec<String>,

    /// Only these changes: create, update, delete. Empty means all. Filtered by herald, so
    /// that a filter never makes bk-cmdb replay its history (docs/sources.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub event_types: Vec<WatchEventType>,

    /// For object_instance and mainline_instance: only instances of these models
    /// (`bk_obj_id`). Empty means all models. Filtered by herald.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 128)))]
    pub objects: Vec<String>,
}

/// The bk-cmdb watch resources herald can turn into v3.5 events.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum WatchResource {
    #[default]
    Host,
    HostRelation,
    Biz,
    Set,
    Module,
    Process,
    ProcessInstanceRelation,
    Plat,
    ObjectInstance,
    MainlineInstance,
    HostIdentifier,
}

/// A change kind of bk-cmdb's watch.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WatchEventType {
    Create,
    Update,
    Delete,
}

/// Where a first read starts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.from != 'time' || has(self.time)")
    .message("time is required when from is time"))]
pub struct Start {
    /// `now` (default): changes made from now on. `time`: changes made after `time`, which
    /// must be within bk-cmdb's retention.
    pub from: StartFrom,
    /// RFC 3339 time, with `from: time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("timestamp(self) > timestamp('2000-01-01T00:00:00Z')")
        .message("time must be an RFC 3339 time"))]
    pub time: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Now,
    Time,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExpiryPolicy {
    /// Resume from the oldest event bk-cmdb still holds.
    #[default]
    Oldest,
    /// Resume from the present.
    Now,
}

/// Observed state of a source, written by herald.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CmdbSourceStatus {
    /// The metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: every watched resource is being read. `Connected`: bk-cmdb answered the
    /// last watch request. `CursorExpired`: bk-cmdb lost herald's place once, so changes
    /// may be missing (the message says which resource and how long the gap may be).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Where each watched resource stands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["resource".into()]))]
    pub resources: Vec<ResourceStatus>,
}

/// Where one watched resource stands.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// The watched resource.
    pub resource: WatchResource,
    /// bk-cmdb's cursor after the last change herald committed (herald's store holds the
    /// authoritative copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// When herald last read a change of this resource (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<String>,
    /// Changes read from bk-cmdb, whether or not they were pushed.
    pub events_read: i64,
    /// Changes herald went past without pushing them, because they can never be: they do
    /// not decode, or the event store cannot hold them (since herald's last start).
    #[serde(default)]
    pub events_skipped: i64,
    /// The last change skipped: when, its cursor, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_skipped: Option<String>,
    /// Seconds herald has been behind the end of the watch stream (0 when it is caught up).
    pub lag_seconds: i64,
}
