//! herald's custom resources: `EventSubscription` (here) and `CmdbSource` (`cmdb_source`),
//! their Rust types, OpenAPI schemas and CEL rules.
//!
//! `herald crd` prints the CRDs generated from these types; `crds/` is their committed
//! output. The schema carries no `default:` values on purpose: the API server would write
//! them into the stored spec, and herald never rewrites what the user applied (GitOps tools
//! would fight it). Defaults live in the controller's effective view (`crate::effective`)
//! and are named in each field's description.

mod cmdb_source;

pub use cmdb_source::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of herald's resources.
pub const GROUP: &str = "herald.dev";
/// Label mirroring `status.subscriptionId` so that `kubectl get esub -l` can select by id.
/// Never read back as a source of truth.
pub const SUBSCRIPTION_ID_LABEL: &str = "herald.dev/subscription-id";
/// Annotation carrying the operator (bk-cmdb `BK_User`) of the last REST change.
pub const OPERATOR_ANNOTATION: &str = "herald.dev/operator";
/// Annotation of an imported subscription (`herald import`): the id it had in the system it
/// came from. The controller honours it once, when it decides the object's id, and refuses
/// it (`ImportedIdTaken`) when another object holds that id.
pub const IMPORTED_ID_ANNOTATION: &str = "herald.dev/imported-id";
/// Annotation of an imported subscription: `{"total": N, "failure": M}` from the system it
/// came from, the starting counts of its statistics.
pub const IMPORTED_STATISTICS_ANNOTATION: &str = "herald.dev/imported-statistics";
/// Namespace label (accounts separated by `.`) and annotation (separated by `,`) listing
/// the supplier accounts whose events may reach subscriptions in that namespace.
pub const SUPPLIER_ACCOUNTS_LABEL: &str = "herald.dev/supplier-accounts";
/// Namespace label and annotation (same format) listing the supplier accounts that
/// CmdbSources in that namespace may publish into (`crate::tenancy`).
pub const PUBLISH_ACCOUNTS_LABEL: &str = "herald.dev/publish-accounts";
/// Namespace label and annotation (same format) listing the supplier accounts whose
/// subscriptions in that namespace may keep an imported id (`crate::tenancy`).
pub const IMPORT_ACCOUNTS_LABEL: &str = "herald.dev/import-accounts";

/// A subscription to BlueKing CMDB events: herald POSTs each matching event to
/// `callbackUrl` and confirms the delivery by HTTP status or by a regex over the response.
// The derive expands each `printcolumn(...)` into attributes clippy sees as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "EventSubscription",
    plural = "eventsubscriptions",
    singular = "eventsubscription",
    shortname = "esub",
    category = "herald",
    namespaced,
    status = "EventSubscriptionStatus",
    doc = "A subscription to BlueKing CMDB events, delivered to a callback URL.",
    printcolumn(
        name = "ID",
        type_ = "integer",
        json_path = ".status.subscriptionId",
        description = "Cluster-unique subscription id"
    ),
    printcolumn(name = "Events", type_ = "string", json_path = ".spec.events", description = "Subscribed event names"),
    printcolumn(name = "Callback", type_ = "string", json_path = ".spec.callbackUrl", description = "Callback URL"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether events are delivered"
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.statistics.total",
        description = "Delivery attempts"
    ),
    printcolumn(
        name = "Failure",
        type_ = "integer",
        json_path = ".status.statistics.failure",
        description = "Failed delivery attempts"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EventSubscriptionSpec {
    /// Supplier account (bk-cmdb `bk_supplier_account`) whose events this subscription
    /// receives. Defaults to "0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub supplier_account: Option<String>,

    /// Business id (bk-cmdb `bk_biz_id`). Defaults to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub biz_id: Option<i64>,

    /// Subscription name (bk-cmdb `subscription_name`), unique per supplier account.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.trim() != ''").message("subscriptionName must not be blank"))]
    pub subscription_name: String,

    /// Name of the subscribing system (bk-cmdb `system_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub system_name: Option<String>,

    /// Absolute http or https URL that events are POSTed to (bk-cmdb `callback_url`).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''"
    ).message("callbackUrl must be an absolute http or https URL"))]
    pub callback_url: String,

    /// How a delivery is confirmed. Defaults to mode httpstatus with pattern "200".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Confirm>,

    /// Event names to receive (bk-cmdb `subscription_form`), such as `hostcreate` or
    /// `moduletransfer`.
    #[schemars(length(min = 1, max = 512), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub events: Vec<String>,

    /// Seconds to wait for the callback's answer (bk-cmdb `time_out`), 1 to 300.
    /// Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: Option<i64>,

    /// Retry policy for failed deliveries. Defaults: 5 attempts, backoff 1s doubling to 300s,
    /// 20% jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,

    /// Deliveries in flight at once, 1 to 64. Defaults to 1, which keeps strict order;
    /// more trades order for throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_in_flight: Option<i32>,

    /// Stop delivering while true; matching events keep queueing. Defaults to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,

    /// Sign callbacks with the Standard Webhooks scheme using a key from a Secret in the
    /// subscription's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<Signing>,
}

/// How a delivery is confirmed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.mode) && self.mode == 'regular') || !has(self.pattern) || self.pattern == '' || self.pattern.matches('^[1-5][0-9][0-9]$')"
).message("pattern must be a three-digit HTTP status code when mode is httpstatus").field_path(".pattern"))]
pub struct Confirm {
    /// `httpstatus` (default): the answer's status code must equal `pattern`.
    /// `regular`: the regex `pattern` must match somewhere in the answer's body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ConfirmMode>,

    /// For httpstatus a status code (default "200"); for regular an RE2-style regex
    /// that must compile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub pattern: Option<String>,
}

/// Confirmation mode, as bk-cmdb's `confirm_mode`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConfirmMode {
    /// Confirm by exact HTTP status code.
    #[default]
    Httpstatus,
    /// Confirm by a regex over the response body.
    Regular,
}

/// Retry policy for failed deliveries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.initialBackoffSeconds) || !has(self.maxBackoffSeconds) || self.initialBackoffSeconds <= self.maxBackoffSeconds"
).message("initialBackoffSeconds must not exceed maxBackoffSeconds"))]
pub struct Retry {
    /// Attempts per event before it becomes a dead letter, 1 to 100. Defaults to 5;
    /// 1 is bk-cmdb's behaviour (no retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<i32>,

    /// Delay before the first retry, in seconds (1 to 3600). Defaults to 1; doubles per attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub initial_backoff_seconds: Option<i64>,

    /// Upper bound of the delay between attempts, in seconds (1 to 86400). Defaults to 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_backoff_seconds: Option<i64>,

    /// Random spread added to each delay, in percent of it (0 to 100). Defaults to 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub jitter_percent: Option<i32>,
}

/// Standard Webhooks signing of callback requests.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Signing {
    /// The Secret key holding the signing secret (raw bytes, or `whsec_`-prefixed base64).
    pub secret_ref: SecretKeyRef,
}

/// A key of a Secret in the subscription's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Observed state of a subscription, written by herald.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventSubscriptionStatus {
    /// Cluster-unique numeric id (bk-cmdb `subscription_id`), decided once and never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<i64>,

    /// The metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: events are delivered to this subscription. `CallbackHealthy`: the callback
    /// confirms deliveries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Who made the last spec change: the `herald.dev/operator` annotation set by the REST
    /// API, otherwise the field manager of that change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,

    /// When the spec last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_time: Option<String>,

    /// Delivery statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<Statistics>,
}

/// Delivery statistics of a subscription.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    /// Delivery attempts, successful or not.
    pub total: i64,
    /// Failed delivery attempts.
    pub failure: i64,
    /// Events confirmed by the callback.
    pub delivered: i64,
    /// Events given up on (attempts exhausted, backlog overflow, age limit).
    pub dead_lettered: i64,
    /// Events queued and not yet delivered or dead-lettered.
    pub pending: i64,
    /// When the last delivery was confirmed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<String>,
    /// The last failed attempt's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Failed attempts since the last confirmed delivery.
    pub consecutive_failures: i64,
}

/// Each CRD as YAML with the file it is committed as in `crds/` (and the chart's
/// `crds/`), as `herald crd` prints them.
pub fn crd_yamls() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    use kube::CustomResourceExt;
    Ok(vec![
        ("eventsubscriptions.herald.dev.yaml", serde_yaml::to_string(&EventSubscription::crd())?),
        ("cmdbsources.herald.dev.yaml", serde_yaml::to_string(&CmdbSource::crd())?),
    ])
}

/// A server-side apply body for the EventSubscription `name` (in the namespace the patch
/// is sent to): apiVersion, kind and `metadata`, with `extra_metadata` (labels,
/// annotations, resourceVersion) merged in. Callers add `spec` or `status`; an apply body
/// holds only the fields its field manager owns.
pub fn apply_body(name: &str, extra_metadata: serde_json::Value) -> serde_json::Value {
    apply_body_of::<EventSubscription>(name, extra_metadata)
}

/// `apply_body` for any of herald's resources.
pub fn apply_body_of<K: kube::Resource<DynamicType = ()>>(
    name: &str,
    extra_metadata: serde_json::Value,
) -> serde_json::Value {
    let mut metadata = serde_json::json!({ "name": name });
    if let (Some(metadata), serde_json::Value::Object(extra)) = (metadata.as_object_mut(), extra_metadata) {
        metadata.extend(extra);
    }
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": metadata,
    })
}
