//! Minimality of herald's RBAC (issue 5). For every verb of every rule in the chart's
//! ClusterRole and Role, a test applies the chart's RBAC objects with just that permission
//! taken away, runs herald out of cluster as the chart's ServiceAccount (a token from the
//! TokenRequest API, nothing else), and shows the herald code path that then fails, observed
//! from outside: readiness, subscription status, Events, REST answers, delivery statistics.
//! `with_every_rule_each_path_works` shows the same observations succeeding with all rules,
//! and `every_verb_of_every_rule_has_a_test` keeps the list of cases in step with the chart
//! and docs/rbac.md. Run through tests/run.sh (helm and kubectl come from $HERALD_TOOLS_BIN).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::*;
use herald::crd::EventSubscription;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/herald");
/// herald reconciles, retries and reports within a second or two; a refusal it has not
/// logged by then is not coming.
const WITHIN: Duration = Duration::from_secs(20);
/// How long a "never happens" is watched for after herald logged the refusal behind it.
const HOLD: Duration = Duration::from_secs(2);
const COUNTER: &str = "herald-subscription-ids";
const LEASE: &str = "herald-leader";

// ---------------------------------------------------------------------------------------
// The permissions of the chart's roles, and which test takes each one away.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ClusterRole,
    Role,
}

/// One verb of one rule: the role it is in, the rule's API group and resource, whether the
/// rule names its objects (`resourceNames`), and the verb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Perm {
    kind: Kind,
    group: &'static str,
    resource: &'static str,
    named: bool,
    verb: &'static str,
}

const fn cluster_perm(group: &'static str, resource: &'static str, verb: &'static str) -> Perm {
    Perm { kind: Kind::ClusterRole, group, resource, named: false, verb }
}

const fn role_perm(group: &'static str, resource: &'static str, named: bool, verb: &'static str) -> Perm {
    Perm { kind: Kind::Role, group, resource, named, verb }
}

const ESUB_GET: Perm = cluster_perm("herald.dev", "eventsubscriptions", "get");
const ESUB_LIST: Perm = cluster_perm("herald.dev", "eventsubscriptions", "list");
const ESUB_WATCH: Perm = cluster_perm("herald.dev", "eventsubscriptions", "watch");
const ESUB_PATCH: Perm = cluster_perm("herald.dev", "eventsubscriptions", "patch");
const ESUB_DELETE: Perm = cluster_perm("herald.dev", "eventsubscriptions", "delete");
const STATUS_PATCH: Perm = cluster_perm("herald.dev", "eventsubscriptions/status", "patch");
const CSRC_LIST: Perm = cluster_perm("herald.dev", "cmdbsources", "list");
const CSRC_WATCH: Perm = cluster_perm("herald.dev", "cmdbsources", "watch");
const CSRC_STATUS_PATCH: Perm = cluster_perm("herald.dev", "cmdbsources/status", "patch");
const EVENTS_CREATE: Perm = cluster_perm("events.k8s.io", "events", "create");
const EVENTS_PATCH: Perm = cluster_perm("events.k8s.io", "events", "patch");
const NAMESPACES_LIST: Perm = cluster_perm("", "namespaces", "list");
const NAMESPACES_WATCH: Perm = cluster_perm("", "namespaces", "watch");
const TOKENREVIEWS_CREATE: Perm = cluster_perm("authentication.k8s.io", "tokenreviews", "create");
const SARS_CREATE: Perm = cluster_perm("authorization.k8s.io", "subjectaccessreviews", "create");
const ESUB_CREATE: Perm = role_perm("herald.dev", "eventsubscriptions", false, "create");
const COUNTER_GET: Perm = role_perm("", "configmaps", true, "get");
const COUNTER_UPDATE: Perm = role_perm("", "configmaps", true, "update");
const CONFIGMAPS_CREATE: Perm = role_perm("", "configmaps", false, "create");
const LEASE_GET: Perm = role_perm("coordination.k8s.io", "leases", true, "get");
const LEASE_UPDATE: Perm = role_perm("coordination.k8s.io", "leases", true, "update");
const LEASES_CREATE: Perm = role_perm("coordination.k8s.io", "leases", false, "create");
const SECRETS_GET: Perm = role_perm("", "secrets", true, "get");
// Granted only with the JetStream engine (`JETSTREAM`): the shard and member Leases.
const SHARD_LEASES_GET: Perm = role_perm("coordination.k8s.io", "leases", false, "get");
const SHARD_LEASES_UPDATE: Perm = role_perm("coordination.k8s.io", "leases", false, "update");
const SHARD_LEASES_LIST: Perm = role_perm("coordination.k8s.io", "leases", false, "list");

/// The chart's values for the JetStream engine, whose Role adds the shard Leases' rule.
const JETSTREAM: &[&str] = &["--set", "config.store.engine=jetstream"];

/// The Secrets these tests use, named in the values: the chart's Role reads only those.
const SECRETS: &[&str] =
    &["--set", "config.api.esbCredentialsSecret=esb-apps", "--set-json", r#"signingSecrets=["webhook-key"]"#];

/// Every permission the chart grants herald, with the test that takes it away alone.
const CASES: &[(Perm, &str)] = &[
    (ESUB_GET, "without_eventsubscriptions_get_a_lost_id_race_cannot_be_reread"),
    (ESUB_LIST, "without_eventsubscriptions_list_herald_never_becomes_ready"),
    (ESUB_WATCH, "without_eventsubscriptions_watch_new_subscriptions_are_never_seen"),
    (ESUB_PATCH, "without_eventsubscriptions_patch_no_id_label_and_no_rest_writes"),
    (ESUB_DELETE, "without_eventsubscriptions_delete_rest_deletes_fail"),
    (STATUS_PATCH, "without_eventsubscriptions_status_patch_no_status_is_written"),
    (CSRC_LIST, "without_cmdbsources_list_no_source_is_read"),
    (CSRC_WATCH, "without_cmdbsources_watch_new_sources_are_never_seen"),
    (CSRC_STATUS_PATCH, "without_cmdbsources_status_patch_no_source_status_is_written"),
    (EVENTS_CREATE, "without_events_create_no_warning_event_is_recorded"),
    (EVENTS_PATCH, "without_events_patch_a_repeated_warning_is_not_counted"),
    (NAMESPACES_LIST, "without_namespaces_list_herald_never_becomes_ready"),
    (NAMESPACES_WATCH, "without_namespaces_watch_tenancy_label_changes_are_never_seen"),
    (TOKENREVIEWS_CREATE, "without_tokenreviews_create_bearer_tokens_cannot_be_checked"),
    (SARS_CREATE, "without_subjectaccessreviews_create_bearer_tokens_cannot_be_authorised"),
    (ESUB_CREATE, "without_eventsubscriptions_create_rest_creates_fail"),
    (COUNTER_GET, "without_counter_get_no_subscription_gets_an_id"),
    (COUNTER_UPDATE, "without_counter_update_no_id_once_the_counter_exists"),
    (CONFIGMAPS_CREATE, "without_configmaps_create_the_first_id_is_never_reserved"),
    (LEASE_GET, "without_lease_get_herald_never_becomes_ready"),
    (LEASE_UPDATE, "without_lease_update_an_existing_lease_is_never_taken"),
    (LEASES_CREATE, "without_leases_create_herald_never_becomes_ready_on_a_fresh_install"),
    (SECRETS_GET, "without_secrets_get_signed_subscriptions_cannot_be_delivered"),
    (SECRETS_GET, "without_secrets_get_esb_credentials_cannot_be_read"),
    (SHARD_LEASES_GET, "on_jetstream_without_leases_get_no_shard_is_held_and_nothing_is_delivered"),
    (SHARD_LEASES_UPDATE, "on_jetstream_without_leases_update_shards_are_given_up_when_they_need_renewing"),
    (SHARD_LEASES_LIST, "on_jetstream_without_leases_list_no_shard_is_held_and_nothing_is_delivered"),
];

// ---------------------------------------------------------------------------------------
// The chart's RBAC objects, rendered and applied with permissions taken away.

fn tools() -> PathBuf {
    PathBuf::from(std::env::var("HERALD_TOOLS_BIN").expect("HERALD_TOOLS_BIN is set by tests/run.sh (helm, kubectl)"))
}

/// The ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding of the chart
/// rendered with `values` for `release` in namespace `release`, by kind.
fn render(release: &str, values: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", release, CHART, "--namespace", release];
    args.extend(values);
    for template in ["templates/serviceaccount.yaml", "templates/clusterrole.yaml", "templates/role.yaml"] {
        args.extend(["--show-only", template]);
    }
    let out = Command::new(tools().join("helm")).args(&args).output().expect("run helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
        .filter_map(|doc| {
            let value = serde_yaml::Value::deserialize(doc).expect("rendered YAML");
            (!value.is_null()).then(|| serde_json::to_value(value).expect("YAML as JSON"))
        })
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("the chart renders no {kind}"))
}

fn strs(value: &Value) -> Vec<&str> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

fn rule_matches(rule: &Value, perm: &Perm) -> bool {
    strs(&rule["apiGroups"]).contains(&perm.group)
        && strs(&rule["resources"]).contains(&perm.resource)
        && rule.get("resourceNames").is_some() == perm.named
}

/// `role` without the verbs of `cuts` (of its kind); rules left without verbs are dropped.
fn without(role: &Value, kind: Kind, cuts: &[Perm]) -> Value {
    let mut role = role.clone();
    for cut in cuts.iter().filter(|c| c.kind == kind) {
        let rules = role["rules"].as_array_mut().expect("rules");
        let mut removed = false;
        for rule in rules.iter_mut().filter(|r| rule_matches(r, cut)) {
            let verbs = rule["verbs"].as_array_mut().expect("verbs");
            let before = verbs.len();
            verbs.retain(|v| v != cut.verb);
            removed |= verbs.len() < before;
        }
        assert!(removed, "the chart's {kind:?} does not grant {cut:?}");
        rules.retain(|r| !strs(&r["verbs"]).is_empty());
    }
    role
}

/// A permission as the rendered chart spells it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    kind: Kind,
    group: String,
    resource: String,
    named: bool,
    verb: String,
}

impl From<&Perm> for Grant {
    fn from(p: &Perm) -> Grant {
        Grant { kind: p.kind, group: p.group.into(), resource: p.resource.into(), named: p.named, verb: p.verb.into() }
    }
}

/// Every permission in the rendered roles.
fn granted(objects: &[Value]) -> Vec<Grant> {
    let mut grants = Vec::new();
    for (kind, name) in [(Kind::ClusterRole, "ClusterRole"), (Kind::Role, "Role")] {
        for rule in of_kind(objects, name)["rules"].as_array().expect("rules") {
            let named = rule.get("resourceNames").is_some();
            for group in strs(&rule["apiGroups"]) {
                for resource in strs(&rule["resources"]) {
                    for verb in strs(&rule["verbs"]) {
                        grants.push(Grant {
                            kind,
                            group: group.into(),
                            resource: resource.into(),
                            named,
                            verb: verb.into(),
                        });
                    }
                }
            }
        }
    }
    grants.sort();
    grants
}

/// A fresh namespace with the chart's ServiceAccount and RBAC objects in it (release name =
/// namespace name, so the cluster-scoped objects are this test's own), minus `cuts`, and a
/// kubeconfig that is that ServiceAccount and nothing else. Cluster-scoped objects are
/// deleted on drop (unless HERALD_TEST_KEEP is set); the namespace takes the rest.
struct Setup {
    cluster: Cluster,
    ns: TestNamespace,
    objects: Vec<Value>,
    /// system:serviceaccount:<ns>:<ns>
    user: String,
    kubeconfig: PathBuf,
    /// Extra cluster-scoped (kind, name) pairs to delete on drop.
    cleanup: Vec<(&'static str, String)>,
    /// Namespaces whose subscriptions are deleted on drop, so that the next test's herald
    /// (which watches the whole cluster) does not find them while the namespace goes.
    emptied: Vec<String>,
}

impl Setup {
    async fn new(cuts: &[Perm]) -> Setup {
        Setup::with_values(cuts, SECRETS).await
    }

    /// As `new`, with the chart rendered with `values`.
    async fn with_values(cuts: &[Perm], values: &[&str]) -> Setup {
        let cluster = common::cluster().await;
        let ns = cluster.namespace("herald-rbac", &[]).await;
        let objects = render(&ns, values);
        let user = format!("system:serviceaccount:{}:{}", ns.name, ns.name);
        let emptied = vec![ns.name.clone()];
        let mut setup = Setup { cluster, ns, objects, user, kubeconfig: PathBuf::new(), cleanup: Vec::new(), emptied };
        let pp = PatchParams::apply("herald-rbac-test").force();
        let client = setup.cluster.client.clone();
        let ns = setup.ns.name.clone();
        let apply = |kind: &str| {
            let object = of_kind(&setup.objects, kind).clone();
            let name = object["metadata"]["name"].as_str().expect("name").to_string();
            (object, name)
        };
        let (sa, name) = apply("ServiceAccount");
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(&sa))
            .await
            .expect("apply ServiceAccount");
        let (crb, name) = apply("ClusterRoleBinding");
        Api::<ClusterRoleBinding>::all(client.clone())
            .patch(&name, &pp, &Patch::Apply(&crb))
            .await
            .expect("apply ClusterRoleBinding");
        let (rb, name) = apply("RoleBinding");
        Api::<RoleBinding>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(&rb))
            .await
            .expect("apply RoleBinding");
        setup.apply_roles(cuts).await;

        let (ok, token, err) = setup.cluster.kubectl(&["create", "token", &ns, "-n", &ns, "--duration", "1h"]);
        assert!(ok, "kubectl create token: {err}");
        setup.kubeconfig =
            setup.cluster.kubeconfig_with_token(&std::env::temp_dir().join(format!("{ns}.kubeconfig")), token.trim());
        setup
    }

    /// Applies the chart's ClusterRole and Role without `cuts`, and waits until the API
    /// server's authoriser agrees: every cut verb refused, every other one allowed.
    async fn apply_roles(&mut self, cuts: &[Perm]) {
        let pp = PatchParams::apply("herald-rbac-test").force();
        let client = self.cluster.client.clone();
        let cluster_role = without(of_kind(&self.objects, "ClusterRole"), Kind::ClusterRole, cuts);
        let name = cluster_role["metadata"]["name"].as_str().expect("name").to_string();
        Api::<ClusterRole>::all(client.clone())
            .patch(&name, &pp, &Patch::Apply(&cluster_role))
            .await
            .expect("apply ClusterRole");
        if !self.cleanup.iter().any(|(kind, _)| *kind == "clusterrole") {
            self.cleanup.push(("clusterrolebinding", name.clone()));
            self.cleanup.push(("clusterrole", name));
        }
        let role = without(of_kind(&self.objects, "Role"), Kind::Role, cuts);
        let name = role["metadata"]["name"].as_str().expect("name").to_string();
        Api::<Role>::namespaced(client, &self.ns).patch(&name, &pp, &Patch::Apply(&role)).await.expect("apply Role");

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut wrong = Vec::new();
            for grant in granted(&self.objects) {
                let want = !cuts.iter().any(|cut| Grant::from(cut) == grant);
                if self.allowed(&grant).await != want {
                    wrong.push(format!("{grant:?} should be {}", if want { "allowed" } else { "refused" }));
                }
            }
            if wrong.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "RBAC did not settle: {wrong:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether herald's ServiceAccount may use `perm`, by a SubjectAccessReview (the Role's
    /// rules in herald's namespace, on the object they name).
    async fn allowed(&self, perm: &Grant) -> bool {
        let name = match (perm.resource.as_str(), perm.named) {
            ("configmaps", true) => Some(COUNTER.to_string()),
            ("leases", true) => Some(LEASE.to_string()),
            ("secrets", true) => Some("webhook-key".to_string()),
            _ => None,
        };
        let (resource, subresource) = match perm.resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_string())),
            None => (perm.resource.as_str(), None),
        };
        self.can(
            &self.user,
            &ResourceAttributes {
                group: Some(perm.group.clone()),
                resource: Some(resource.to_string()),
                subresource,
                verb: Some(perm.verb.clone()),
                name,
                namespace: (perm.kind == Kind::Role).then(|| self.ns.name.clone()),
                ..Default::default()
            },
        )
        .await
    }

    async fn can(&self, user: &str, attributes: &ResourceAttributes) -> bool {
        let namespace = user.split(':').nth(2).unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_string()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{namespace}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(attributes.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.cluster.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("SubjectAccessReview");
        answer.status.is_some_and(|s| s.allowed)
    }

    /// herald as the ServiceAccount, with `config` over the test defaults.
    fn herald(&self, config: &str) -> HeraldRun {
        HeraldRun::spawn(&self.kubeconfig, &self.ns, config)
    }

    /// herald on the JetStream engine, on streams of its own.
    fn jetstream_herald(&self) -> HeraldRun {
        self.herald(&jetstream_config(&format!("HR{:08X}", fastrand::u32(..))))
    }

    fn subscriptions(&self) -> Api<EventSubscription> {
        self.cluster.subscriptions(&self.ns)
    }

    /// Another namespace for subscriptions (not herald's own), with `labels`.
    async fn tenant(&mut self, labels: &[(&str, &str)]) -> TestNamespace {
        let ns = self.cluster.namespace("herald-rbac-tenant", labels).await;
        self.emptied.push(ns.name.clone());
        ns
    }

    /// A ServiceAccount "caller" with a token for herald's audience, allowed every action on
    /// supplier account "0" (a cluster-wide grant, as herald's reviews name no namespace).
    fn caller(&mut self) -> String {
        let token = self.cluster.service_account_token(&self.ns, "caller", "herald");
        self.cluster.grant_accounts(
            &self.ns,
            "caller",
            &["get", "list", "create", "update", "delete", "publish", "replay"],
            &["0"],
        );
        let name = format!("{}-caller", self.ns.name);
        self.cleanup.push(("clusterrolebinding", name.clone()));
        self.cleanup.push(("clusterrole", name));
        token
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if std::env::var_os("HERALD_TEST_KEEP").is_none() {
            for namespace in &self.emptied {
                let _ = self.cluster.kubectl(&["delete", "eventsubscriptions", "--all", "-n", namespace]);
            }
            for (kind, name) in &self.cleanup {
                let _ = self.cluster.kubectl(&["delete", kind, name, "--ignore-not-found", "--wait=false"]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// herald as a child process that may fail to become ready (common::Herald::start insists).

struct HeraldRun {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// Removes terminal colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl HeraldRun {
    /// `herald run` with `kubeconfig`, `namespace` as its own namespace and `config` over
    /// the defaults of tests/common (own store, loopback callbacks, anonymous API, 5 s Lease).
    fn spawn(kubeconfig: &Path, namespace: &str, config: &str) -> HeraldRun {
        let dir = std::env::temp_dir().join(format!("{namespace}-herald"));
        let instance = format!("herald-{namespace}");
        let launched = Launch { config_yaml: config, ..Launch::new(kubeconfig, namespace, &instance, &dir) }.spawn();
        HeraldRun { child: launched.child, port: launched.port, log: launched.log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        plain(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The first log line that contains every fragment.
    fn log_line(&self, fragments: &[&str]) -> Option<String> {
        self.log_text().lines().find(|line| fragments.iter().all(|f| line.contains(f))).map(str::to_string)
    }

    /// Waits until herald logs a line with every fragment; answers that line.
    async fn wait_log(&self, fragments: &[&str]) -> String {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Some(line) = self.log_line(fragments) {
                eprintln!("herald logged: {line}");
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "herald logged no line with {fragments:?} within {WITHIN:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// /readyz's status code (0 when nothing answers).
    async fn readyz(&self) -> u16 {
        match reqwest::get(self.url("/readyz")).await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("herald exited with {status}; log:\n{}", self.log_text());
            }
            if self.readyz().await == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "herald not ready within 30 s; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After herald logged why, /readyz answers 503 for HOLD and herald keeps running.
    async fn assert_never_ready(&mut self, why: &[&str]) {
        self.wait_log(why).await;
        let until = Instant::now() + HOLD;
        while Instant::now() < until {
            assert!(self.child.try_wait().ok().flatten().is_none(), "herald exited; log:\n{}", self.log_text());
            assert_eq!(self.readyz().await, 503, "herald must not be ready; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WITHIN;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "herald still running after {WITHIN:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for HeraldRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Observations.

/// A REST call in English; (HTTP status, body).
async fn rest(
    herald: &HeraldRun,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut request =
        reqwest::Client::new().request(method, herald.url(path)).header("HTTP-BLUEKING-LANGUAGE", "en").json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("REST call");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    eprintln!("REST {path}: {status} {body}");
    (status, body)
}

/// A REST call on subscription `id`, repeated while herald answers that it does not know
/// the id yet (its cache may be a moment behind the API server that showed the id).
async fn rest_on(herald: &HeraldRun, method: reqwest::Method, id: i64, body: Value) -> (u16, Value) {
    let path = format!("/api/v3/event/subscribe/0/0/{id}");
    let deadline = Instant::now() + WITHIN;
    loop {
        let (status, answer) = rest(herald, method.clone(), &path, None, body.clone()).await;
        if !code(&answer).1.ends_with(&format!("subscription {id} not found")) || Instant::now() >= deadline {
            return (status, answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// bk-cmdb's code and message of a direct-path or ESB answer.
fn code(body: &Value) -> (i64, String) {
    let code = body["bk_error_code"].as_i64().or_else(|| body["code"].as_i64()).unwrap_or(-1);
    let message = body["bk_error_msg"].as_str().or_else(|| body["message"].as_str()).unwrap_or_default();
    (code, message.to_string())
}

fn form(name: &str) -> Value {
    json!({"subscription_name": name, "callback_url": "http://127.0.0.1:9/x", "subscription_form": "hostcreate"})
}

fn host_created() -> Value {
    json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": 1}}], "bk_supplier_account": "0",
    })
}

async fn create(api: &Api<EventSubscription>, name: &str, spec: Value) {
    api.create(&PostParams::default(), &subscription(name, spec))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

fn invalid_spec(name: &str, pattern: &str) -> Value {
    let mut spec = basic_spec(name);
    spec["confirm"] = json!({"mode": "regular", "pattern": pattern});
    spec
}

async fn get(api: &Api<EventSubscription>, name: &str) -> EventSubscription {
    api.get(name).await.unwrap_or_else(|e| panic!("get {name}: {e}"))
}

async fn wait_id(api: &Api<EventSubscription>, name: &str) -> i64 {
    id(&wait_for(api, name, WITHIN, "given an id", |s| id(s).is_some()).await).expect("id")
}

/// The events.k8s.io Events about `name` with `reason`.
async fn events(setup: &Setup, name: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(setup.cluster.client.clone(), &setup.ns)
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

async fn create_secret(setup: &Setup, namespace: &str, name: &str, key: &str, value: &str) {
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {key: value}});
    Api::<Secret>::namespaced(setup.cluster.client.clone(), namespace)
        .create(&PostParams::default(), &serde_json::from_value(secret).expect("Secret"))
        .await
        .expect("create Secret");
}

const SIGNING_KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn signed_spec(name: &str, url: String, secret: &str) -> Value {
    let mut spec = basic_spec(name);
    spec["callbackUrl"] = url.into();
    spec["signing"] = json!({"secretRef": {"name": secret, "key": "key"}});
    spec
}

/// Publishes a hostcreate event until herald queues it for some subscription (a
/// subscription that just showed Ready may be a moment from herald's delivery index).
async fn publish(herald: &HeraldRun, token: Option<&str>) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let (status, body) = rest(herald, reqwest::Method::POST, "/api/v3/event/publish", token, host_created()).await;
        assert_eq!(status, 200, "publish: {body}");
        if body["data"]["queued"].as_i64() > Some(0) {
            return;
        }
        assert!(Instant::now() < deadline, "no subscription took the event: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const ESB_APPS: &str = "apps:\n- appCode: cmdb\n  appSecret: s3cret\n  accounts: ['0']\n";

// ---------------------------------------------------------------------------------------
// With every rule.

/// Every observation the tests below take away, with all of the chart's rules.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn with_every_rule_each_path_works() {
    let _turn = exclusive().await;
    let mut setup = Setup::new(&[]).await;
    let api = setup.subscriptions();
    let caller = setup.caller();
    create_secret(&setup, &setup.ns, "esb-apps", "apps.yaml", ESB_APPS).await;
    create_secret(&setup, &setup.ns, "webhook-key", "key", SIGNING_KEY).await;
    let tenant = setup.tenant(&[]).await;
    let tenants = setup.cluster.subscriptions(&tenant);
    create(&tenants, "tenant", basic_spec("rbac-tenant")).await;

    // A fresh install: the Lease is created (leases create), the counter too, one id per
    // block so that the second id updates it (configmaps create, then get and update).
    let config = "api: {auth: {anonymous: false}, esbCredentialsSecret: esb-apps}\ncontroller: {idBlockSize: 1}\n";
    let mut herald = setup.herald(config);
    herald.wait_ready().await;

    // Subscriptions created after herald is ready (watch) get an id, Ready and the label.
    create(&api, "first", basic_spec("rbac-first")).await;
    let first = wait_ready(&api, "first").await;
    wait_for(&api, "first", WITHIN, "labelled", |s| {
        s.labels().get(herald::crd::SUBSCRIPTION_ID_LABEL) == id(s).map(|i| i.to_string()).as_ref()
    })
    .await;
    create(&api, "second", basic_spec("rbac-second")).await;
    let second = wait_id(&api, "second").await;
    assert!(second > id(&first).expect("id"));
    let counter =
        Api::<ConfigMap>::namespaced(setup.cluster.client.clone(), &setup.ns).get(COUNTER).await.expect("counter");
    assert_eq!(
        counter.data.expect("data")["next"],
        (second + 1).to_string(),
        "the counter was advanced past the second id"
    );

    // A Warning Event, and its repeat counted in a series (events create, patch).
    create(&api, "invalid", invalid_spec("rbac-invalid", "result(true")).await;
    wait_reason(&api, "invalid", "InvalidPattern").await;
    let deadline = Instant::now() + WITHIN;
    while events(&setup, "invalid", "InvalidPattern").await.is_empty() {
        assert!(Instant::now() < deadline, "no InvalidPattern Event; log:\n{}", herald.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.patch("invalid", &PatchParams::default(), &Patch::Merge(json!({"spec": {"confirm": {"pattern": "result(("}}})))
        .await
        .expect("patch");
    let deadline = Instant::now() + WITHIN;
    loop {
        let found = events(&setup, "invalid", "InvalidPattern").await;
        if found.len() == 1 && found[0].series.as_ref().is_some_and(|s| s.count == 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the repeat should count 2 in one Event: {found:?}; log:\n{}",
            herald.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Tenancy follows a namespace's label as it changes (namespaces list, watch).
    wait_reason(&tenants, "tenant", "NamespaceNotAllowed").await;
    let label = json!({"metadata": {"labels": {"herald.dev/supplier-accounts": "0"}}});
    Api::<Namespace>::all(setup.cluster.client.clone())
        .patch(&tenant, &PatchParams::default(), &Patch::Merge(label))
        .await
        .expect("label");
    wait_ready(&tenants, "tenant").await;

    // The REST API with a bearer token (TokenReview, SubjectAccessReview): create (Role
    // create + patch), update (patch), search, delete.
    let (status, created) =
        rest(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/0/0", Some(&caller), form("rbac-rest")).await;
    let rest_id =
        created["data"]["subscription_id"].as_i64().unwrap_or_else(|| panic!("REST create: {status} {created}"));
    let path = format!("/api/v3/event/subscribe/0/0/{rest_id}");
    let (status, updated) = rest(&herald, reqwest::Method::PUT, &path, Some(&caller), form("rbac-rest-renamed")).await;
    assert_eq!((status, code(&updated).0), (200, 0), "REST update: {updated}");
    let (status, found) =
        rest(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/search/0/0", Some(&caller), json!({})).await;
    assert_eq!((status, code(&found).0), (200, 0), "REST search: {found}");
    let (status, deleted) = rest(&herald, reqwest::Method::DELETE, &path, Some(&caller), json!({})).await;
    assert_eq!((status, code(&deleted).0), (200, 0), "REST delete: {deleted}");

    // ESB app credentials from the Secret (secrets get at start-up).
    let credentials = json!({"bk_app_code": "cmdb", "bk_app_secret": "s3cret"}).to_string();
    let response = reqwest::Client::new()
        .post(herald.url("/api/c/compapi/v2/cc/search_subscription/"))
        .header("X-Bkapi-Authorization", credentials)
        .json(&json!({}))
        .send()
        .await
        .expect("ESB call");
    let answer: Value = response.json().await.expect("ESB answer");
    assert_eq!(code(&answer).0, 0, "ESB search: {answer}");

    // A signed delivery (secrets get); publishing needs a token now.
    let receiver = CallbackServer::start().await;
    create(&api, "signed", signed_spec("rbac-signed", receiver.url("ok", "signed"), "webhook-key")).await;
    wait_ready(&api, "signed").await;
    let deadline = Instant::now() + WITHIN;
    while receiver.received("signed").is_empty() {
        assert!(Instant::now() < deadline, "no signed callback; log:\n{}", herald.log_text());
        publish(&herald, Some(&caller)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let signed = receiver.received("signed");
    assert!(signed[0].header("webhook-signature").starts_with("v1,"));

    // The Lease is renewed (leases get, update).
    let leases = Api::<Lease>::namespaced(setup.cluster.client.clone(), &setup.ns);
    let deadline = Instant::now() + WITHIN;
    loop {
        let spec = leases.get(LEASE).await.expect("Lease").spec.expect("spec");
        if spec.renew_time.as_ref().map(|t| t.0) > spec.acquire_time.as_ref().map(|t| t.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the Lease is never renewed: {spec:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let log = herald.log_text();
    assert!(!log.contains("is forbidden: User"), "herald hit an RBAC refusal:\n{log}");
}

// ---------------------------------------------------------------------------------------
// ClusterRole: eventsubscriptions.

/// The controller's subscription cache is filled by a list: without it herald never
/// syncs its caches, so it never reports ready.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_list_herald_never_becomes_ready() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[ESUB_LIST]).await;
    let mut herald = setup.herald("");
    herald.assert_never_ready(&["cannot list resource", "eventsubscriptions"]).await;
}

/// The cache is kept current by a watch: without it herald becomes ready on the initial
/// list, but a subscription created afterwards is never seen, so never gets an id.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_watch_new_subscriptions_are_never_seen() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[ESUB_WATCH]).await;
    let api = setup.subscriptions();
    create(&api, "early", basic_spec("rbac-early")).await;
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    wait_ready(&api, "early").await;
    create(&api, "late", basic_spec("rbac-late")).await;
    herald.wait_log(&["cannot watch resource", "eventsubscriptions"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(get(&api, "late").await.status.is_none(), "late must get no status; log:\n{}", herald.log_text());
}

/// `get` serves one path: after the first status write of an id fails with a conflict
/// (the object changed while its id was being decided), the controller reads the object
/// again to keep a winner's id. To force that conflict, herald starts without the
/// namespaces rule as well, so the reconcile holds a snapshot while it waits for the
/// tenancy cache; the subscription is then changed and the namespaces rule restored.
/// Without `get` the re-read is refused and the reconcile fails (it succeeds on the retry
/// from the cache).
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_get_a_lost_id_race_cannot_be_reread() {
    let _turn = exclusive().await;
    let mut setup = Setup::new(&[ESUB_GET, NAMESPACES_LIST, NAMESPACES_WATCH]).await;
    let api = setup.subscriptions();
    create(&api, "raced", basic_spec("rbac-raced")).await;
    let herald = setup.herald("");
    herald.wait_log(&["cannot list resource", "namespaces"]).await;
    // The controller took its snapshot of "raced" when its cache listed it, before the
    // namespace list was refused; give it a moment all the same.
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.patch(
        "raced",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"touched": "yes"}}})),
    )
    .await
    .expect("annotate");
    setup.apply_roles(&[ESUB_GET]).await;
    let line = herald.wait_log(&["re-reading raced after a conflicting status write", "cannot get resource"]).await;
    assert!(line.contains("eventsubscriptions"), "{line}");
    // The retry reads the cache, which by then has the object.
    wait_id(&api, "raced").await;
}

/// `patch` is every server-side apply on subscriptions: the controller's id label, and
/// the REST API's update and create. Status (its own subresource) is still written.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_patch_no_id_label_and_no_rest_writes() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[ESUB_PATCH]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "unlabelled", basic_spec("rbac-unlabelled")).await;
    let id = wait_id(&api, "unlabelled").await;
    herald.wait_log(&["writing the id label of unlabelled", "cannot patch resource"]).await;
    tokio::time::sleep(HOLD).await;
    let sub = get(&api, "unlabelled").await;
    assert!(!sub.labels().contains_key(herald::crd::SUBSCRIPTION_ID_LABEL), "no id label: {:?}", sub.labels());

    let (status, body) = rest_on(&herald, reqwest::Method::PUT, id, form("rbac-renamed")).await;
    let (code, message) = code(&body);
    assert!(
        status == 400 && code == 1103003 && message.contains("cannot patch resource"),
        "REST update: {status} {body}"
    );
    let (status, body) =
        rest(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/0/0", None, form("rbac-new")).await;
    let (code, message) = self::code(&body);
    assert!(
        status == 500 && code == 1103000 && message.contains("cannot patch resource"),
        "REST create: {status} {body}"
    );
}

/// `delete` is the REST API's delete.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_delete_rest_deletes_fail() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[ESUB_DELETE]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "kept", basic_spec("rbac-kept")).await;
    let id = wait_id(&api, "kept").await;
    let (status, body) = rest_on(&herald, reqwest::Method::DELETE, id, json!({})).await;
    let (code, message) = code(&body);
    assert!(
        status == 400 && code == 1103001 && message.contains("cannot delete resource"),
        "REST delete: {status} {body}"
    );
    assert!(get(&api, "kept").await.metadata.deletion_timestamp.is_none());
}

/// `eventsubscriptions/status` `patch` is every status write: no id, no Ready condition.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_status_patch_no_status_is_written() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[STATUS_PATCH]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "statusless", basic_spec("rbac-statusless")).await;
    herald.wait_log(&["writing status of statusless", "cannot patch resource", "eventsubscriptions/status"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(get(&api, "statusless").await.status.is_none(), "no status; log:\n{}", herald.log_text());
}

// ---------------------------------------------------------------------------------------
// ClusterRole: cmdbsources.

fn sources(setup: &Setup) -> Api<herald::crd::CmdbSource> {
    Api::namespaced(setup.cluster.client.clone(), &setup.ns)
}

/// A source in the test's namespace (herald's own), pointing at a port nobody listens on:
/// herald reads it and reports `Connected=False`, which is all these tests need.
async fn create_source(api: &Api<herald::crd::CmdbSource>, name: &str) {
    let source = serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "CmdbSource", "metadata": {"name": name},
        "spec": {"url": "http://127.0.0.1:9", "api": "direct", "supplierAccount": "0", "resources": [{"resource": "set"}]},
    }))
    .expect("a CmdbSource");
    api.create(&PostParams::default(), &source).await.expect("create source");
}

async fn wait_source_status(api: &Api<herald::crd::CmdbSource>, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while api.get(name).await.expect("get source").status.is_none() {
        assert!(std::time::Instant::now() < deadline, "{name}: no status within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `cmdbsources` `list` is the sources' cache: without it no source is read (herald itself
/// still serves), and none gets a status.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_cmdbsources_list_no_source_is_read() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[CSRC_LIST]).await;
    let api = sources(&setup);
    create_source(&api, "unread").await;
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    herald.wait_log(&["watching CmdbSources failed", "cannot list resource", "cmdbsources"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(api.get("unread").await.unwrap().status.is_none(), "no status; log:\n{}", herald.log_text());
}

/// The cache is kept current by a watch: without it a source created after the first list
/// is never seen.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_cmdbsources_watch_new_sources_are_never_seen() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[CSRC_WATCH]).await;
    let api = sources(&setup);
    create_source(&api, "early").await;
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    wait_source_status(&api, "early").await;
    create_source(&api, "late").await;
    herald.wait_log(&["cannot watch resource", "cmdbsources"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(api.get("late").await.unwrap().status.is_none(), "late must get no status; log:\n{}", herald.log_text());
}

/// `cmdbsources/status` `patch` is every source status write.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_cmdbsources_status_patch_no_source_status_is_written() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[CSRC_STATUS_PATCH]).await;
    let api = sources(&setup);
    create_source(&api, "statusless").await;
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    herald.wait_log(&["writing source status failed", "403 Forbidden"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(api.get("statusless").await.unwrap().status.is_none(), "no status; log:\n{}", herald.log_text());
}

// ---------------------------------------------------------------------------------------
// ClusterRole: events, namespaces.

/// `events` `create` records the Warning Event of an invalid subscription; without it the
/// subscription still becomes Ready=False, but no Event appears.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_events_create_no_warning_event_is_recorded() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[EVENTS_CREATE]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "invalid", invalid_spec("rbac-invalid", "result(true")).await;
    wait_reason(&api, "invalid", "InvalidPattern").await;
    herald.wait_log(&["could not record Warning event", "cannot create resource", "events"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(events(&setup, "invalid", "InvalidPattern").await.is_empty(), "no Event may appear");
}

/// `events` `patch`: the event recorder counts a repeat of the same warning on the same
/// subscription in the existing Event's series. Without it the repeat is lost.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_events_patch_a_repeated_warning_is_not_counted() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[EVENTS_PATCH]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "invalid", invalid_spec("rbac-invalid", "result(true")).await;
    wait_reason(&api, "invalid", "InvalidPattern").await;
    let deadline = Instant::now() + WITHIN;
    while events(&setup, "invalid", "InvalidPattern").await.is_empty() {
        assert!(Instant::now() < deadline, "the first Event is created; log:\n{}", herald.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new generation that is still invalid: herald warns again.
    api.patch("invalid", &PatchParams::default(), &Patch::Merge(json!({"spec": {"confirm": {"pattern": "result(("}}})))
        .await
        .expect("patch");
    herald.wait_log(&["could not record Warning event", "cannot patch resource", "events"]).await;
    let found = events(&setup, "invalid", "InvalidPattern").await;
    assert!(found.len() == 1 && found[0].series.is_none(), "one Event, its repeat not counted: {found:?}");
}

/// Tenancy reads every namespace's label from one cache filled by a list: without it the
/// cache never syncs and herald never becomes ready.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_namespaces_list_herald_never_becomes_ready() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[NAMESPACES_LIST]).await;
    let mut herald = setup.herald("");
    herald.assert_never_ready(&["cannot list resource", "namespaces"]).await;
}

/// The tenancy cache is kept current by a watch: without it herald starts, but a namespace
/// labelled for an account afterwards stays refused.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_namespaces_watch_tenancy_label_changes_are_never_seen() {
    let _turn = exclusive().await;
    let mut setup = Setup::new(&[NAMESPACES_WATCH]).await;
    let tenant = setup.tenant(&[]).await;
    let tenants = setup.cluster.subscriptions(&tenant);
    create(&tenants, "tenant", basic_spec("rbac-tenant")).await;
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    wait_reason(&tenants, "tenant", "NamespaceNotAllowed").await;
    let label = json!({"metadata": {"labels": {"herald.dev/supplier-accounts": "0"}}});
    Api::<Namespace>::all(setup.cluster.client.clone())
        .patch(&tenant, &PatchParams::default(), &Patch::Merge(label))
        .await
        .expect("label");
    herald.wait_log(&["cannot watch resource", "namespaces"]).await;
    tokio::time::sleep(HOLD).await;
    assert_eq!(
        ready(&get(&tenants, "tenant").await),
        Some(("False".to_string(), "NamespaceNotAllowed".to_string())),
        "the label change must go unseen; log:\n{}",
        herald.log_text()
    );
}

// ---------------------------------------------------------------------------------------
// ClusterRole: the REST API's token reviews.

/// A REST call with a bearer token is first a TokenReview: without it the call answers
/// 500 with 1199999 (herald cannot tell who is calling).
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_tokenreviews_create_bearer_tokens_cannot_be_checked() {
    let _turn = exclusive().await;
    let mut setup = Setup::new(&[TOKENREVIEWS_CREATE]).await;
    let caller = setup.caller();
    let mut herald = setup.herald("api: {auth: {anonymous: false}}");
    herald.wait_ready().await;
    let (status, body) =
        rest(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/search/0/0", Some(&caller), json!({})).await;
    let (code, message) = code(&body);
    assert!(status == 500 && code == 1199999 && message.contains("TokenReview failed: 403"), "{status} {body}");
}

/// Then a SubjectAccessReview on the supplier account: without it the call answers 500
/// with 1199999 (herald cannot tell whether the caller may).
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_subjectaccessreviews_create_bearer_tokens_cannot_be_authorised() {
    let _turn = exclusive().await;
    let mut setup = Setup::new(&[SARS_CREATE]).await;
    let caller = setup.caller();
    let mut herald = setup.herald("api: {auth: {anonymous: false}}");
    herald.wait_ready().await;
    let (status, body) =
        rest(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/search/0/0", Some(&caller), json!({})).await;
    let (code, message) = code(&body);
    assert!(status == 500 && code == 1199999 && message.contains("SubjectAccessReview failed: 403"), "{status} {body}");
}

// ---------------------------------------------------------------------------------------
// Role: herald's namespace.

/// A REST create is a server-side apply of a new object in herald's namespace, which
/// needs `create` as well as `patch`; updating an existing one does not.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_eventsubscriptions_create_rest_creates_fail() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[ESUB_CREATE]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    let (status, body) =
        rest(&herald, reqwest::Method::POST, "/api/v3/event/subscribe/0/0", None, form("rbac-new")).await;
    let (code, message) = code(&body);
    assert!(
        status == 500 && code == 1103000 && message.contains("cannot create resource"),
        "REST create: {status} {body}"
    );
    create(&api, "existing", basic_spec("rbac-existing")).await;
    let id = wait_id(&api, "existing").await;
    let (status, body) = rest_on(&herald, reqwest::Method::PUT, id, form("rbac-renamed")).await;
    assert_eq!((status, self::code(&body).0), (200, 0), "REST update needs no create: {body}");
}

/// Ids are reserved from the counter ConfigMap, read first.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_counter_get_no_subscription_gets_an_id() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[COUNTER_GET]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "idless", basic_spec("rbac-idless")).await;
    herald.wait_log(&["reading id counter herald-subscription-ids", "cannot get resource", "configmaps"]).await;
    tokio::time::sleep(HOLD).await;
    assert!(get(&api, "idless").await.status.is_none(), "no id, no status; log:\n{}", herald.log_text());
}

/// Once the counter exists, every reservation is an update of it (with the
/// resourceVersion read): without `update` no subscription gets an id.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_counter_update_no_id_once_the_counter_exists() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[COUNTER_UPDATE]).await;
    let counter =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": COUNTER}, "data": {"next": "1"}});
    Api::<ConfigMap>::namespaced(setup.cluster.client.clone(), &setup.ns)
        .create(&PostParams::default(), &serde_json::from_value(counter).expect("ConfigMap"))
        .await
        .expect("create counter");
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "idless", basic_spec("rbac-idless")).await;
    herald
        .wait_log(&["reserving ids from counter herald-subscription-ids", "cannot update resource", "configmaps"])
        .await;
    tokio::time::sleep(HOLD).await;
    assert!(get(&api, "idless").await.status.is_none(), "no id, no status; log:\n{}", herald.log_text());
}

/// On a fresh install the first reservation creates the counter.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_configmaps_create_the_first_id_is_never_reserved() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[CONFIGMAPS_CREATE]).await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "idless", basic_spec("rbac-idless")).await;
    herald
        .wait_log(&["reserving ids from counter herald-subscription-ids", "cannot create resource", "configmaps"])
        .await;
    tokio::time::sleep(HOLD).await;
    assert!(get(&api, "idless").await.status.is_none(), "no id, no status; log:\n{}", herald.log_text());
}

/// Leadership starts by reading the Lease; herald serves only as leader.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_lease_get_herald_never_becomes_ready() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[LEASE_GET]).await;
    let mut herald = setup.herald("");
    herald.assert_never_ready(&["reading lease herald-leader", "cannot get resource", "leases"]).await;
}

/// An existing Lease (every restart after the first start) is taken by an update.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_lease_update_an_existing_lease_is_never_taken() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[LEASE_UPDATE]).await;
    let lease =
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": LEASE}, "spec": {}});
    Api::<Lease>::namespaced(setup.cluster.client.clone(), &setup.ns)
        .create(&PostParams::default(), &serde_json::from_value(lease).expect("Lease"))
        .await
        .expect("create Lease");
    let mut herald = setup.herald("");
    herald.assert_never_ready(&["writing lease herald-leader", "cannot update resource", "leases"]).await;
}

/// On a fresh install the first start creates the Lease.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_leases_create_herald_never_becomes_ready_on_a_fresh_install() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[LEASES_CREATE]).await;
    let mut herald = setup.herald("");
    herald.assert_never_ready(&["writing lease herald-leader", "cannot create resource", "leases"]).await;
}

/// Delivery reads a signed subscription's key from its Secret: without `get` every
/// attempt fails, and the status says which Secret could not be read.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_secrets_get_signed_subscriptions_cannot_be_delivered() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[SECRETS_GET]).await;
    create_secret(&setup, &setup.ns, "webhook-key", "key", SIGNING_KEY).await;
    let receiver = CallbackServer::start().await;
    let api = setup.subscriptions();
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&api, "signed", signed_spec("rbac-signed", receiver.url("ok", "signed"), "webhook-key")).await;
    wait_ready(&api, "signed").await;
    publish(&herald, None).await;
    let expected = format!("reading signing Secret {}/webhook-key: 403", setup.ns.name);
    let sub = wait_for(&api, "signed", WITHIN, "failing to read its Secret", |s| {
        let statistics = s.status.as_ref().and_then(|s| s.statistics.as_ref());
        statistics.is_some_and(|st| st.failure >= 1 && st.last_error.as_deref().is_some_and(|e| e.contains(&expected)))
    })
    .await;
    assert_eq!(sub.status.and_then(|s| s.statistics).map(|s| s.delivered), Some(0));
    assert!(receiver.received("signed").is_empty(), "nothing may be sent unsigned");
}

/// The ESB app credentials Secret is read at start-up: without `get` herald stops with an
/// error that names the Secret.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn without_secrets_get_esb_credentials_cannot_be_read() {
    let _turn = exclusive().await;
    let setup = Setup::new(&[SECRETS_GET]).await;
    create_secret(&setup, &setup.ns, "esb-apps", "apps.yaml", ESB_APPS).await;
    let mut herald = setup.herald("api: {esbCredentialsSecret: esb-apps}");
    let status = herald.wait_exit().await;
    assert!(!status.success(), "herald must stop: {status}");
    let expected = format!("reading ESB credentials Secret {}/esb-apps", setup.ns.name);
    assert!(herald.log_line(&[&expected, "cannot get resource", "secrets"]).is_some(), "log:\n{}", herald.log_text());
}

// ---------------------------------------------------------------------------------------
// Outside the rules.

/// herald's ServiceAccount is refused what the chart does not grant: Secrets in another
/// namespace (kube-system, or a tenant's signing key), and listing Secrets or ConfigMaps
/// in its own. herald itself, delivering for a subscription whose signing Secret lives in
/// the subscription's (tenant) namespace, is refused that Secret.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn herald_is_refused_secrets_outside_its_namespace() {
    let _turn = exclusive().await;
    let mut setup = Setup::new(&[]).await;
    let kubectl = |args: &[&str]| {
        let out = Command::new(tools().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&setup.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let own = setup.ns.name.as_str();
    for args in [
        &["get", "secrets", "-n", "kube-system"][..],
        &["get", "secret", "any-name", "-n", "kube-system"][..],
        &["get", "secrets", "-n", own][..],
        &["get", "configmaps", "-n", own][..],
        &["get", "secrets", "-A"][..],
    ] {
        let (ok, stderr) = kubectl(args);
        assert!(!ok && stderr.contains("Forbidden"), "kubectl {args:?} must be refused: {stderr}");
    }
    let secret = |namespace: &str| ResourceAttributes {
        resource: Some("secrets".into()),
        verb: Some("get".into()),
        name: Some("webhook-key".into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    assert!(setup.can(&setup.user, &secret(own)).await, "its own namespace's Secrets by name");
    assert!(!setup.can(&setup.user, &secret("kube-system")).await);

    let tenant = setup.tenant(&[("herald.dev/supplier-accounts", "0")]).await;
    create_secret(&setup, &tenant, "webhook-key", "key", SIGNING_KEY).await;
    let receiver = CallbackServer::start().await;
    let tenants = setup.cluster.subscriptions(&tenant);
    let mut herald = setup.herald("");
    herald.wait_ready().await;
    create(&tenants, "signed", signed_spec("rbac-tenant-signed", receiver.url("ok", "tenant"), "webhook-key")).await;
    wait_ready(&tenants, "signed").await;
    publish(&herald, None).await;
    let expected = format!("reading signing Secret {}/webhook-key: 403", tenant.name);
    wait_for(&tenants, "signed", WITHIN, "refused its Secret", |s| {
        s.status
            .as_ref()
            .and_then(|s| s.statistics.as_ref())
            .and_then(|st| st.last_error.as_deref())
            .is_some_and(|e| e.contains(&expected))
    })
    .await;
    assert!(receiver.received("tenant").is_empty());
}

// ---------------------------------------------------------------------------------------
// With the JetStream engine: the delivery shards' Leases.

/// The chart's JetStream roles without `cuts`, a receiver, and a JetStream herald as the
/// ServiceAccount, ready.
async fn jetstream_setup(cuts: &[Perm]) -> (Setup, CallbackServer, HeraldRun) {
    let setup = Setup::with_values(cuts, JETSTREAM).await;
    let receiver = CallbackServer::start().await;
    let mut herald = setup.jetstream_herald();
    herald.wait_ready().await;
    (setup, receiver, herald)
}

/// A subscription on a JetStream herald whose receiver counts what it gets.
async fn sharded_subscription(setup: &Setup, receiver: &CallbackServer) -> Api<EventSubscription> {
    let api = setup.subscriptions();
    let mut spec = basic_spec("rbac-sharded");
    spec["callbackUrl"] = json!(receiver.url("ok", "sharded"));
    create(&api, "sharded", spec).await;
    wait_ready(&api, "sharded").await;
    api
}

/// Publishes an event for the subscription and asserts it is queued but not delivered
/// within a worker's poll and a shard round (no replica holds its shard).
async fn assert_queued_not_delivered(herald: &HeraldRun, receiver: &CallbackServer) {
    publish(herald, None).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let received = receiver.received("sharded").len();
    assert_eq!(received, 0, "delivered without a held shard; log:\n{}", herald.log_text());
}

/// With every rule: the one replica holds every shard, renews them, and delivers.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn on_jetstream_with_every_rule_shards_are_held_renewed_and_deliver() {
    let _turn = exclusive().await;
    let (setup, receiver, herald) = jetstream_setup(&[]).await;
    sharded_subscription(&setup, &receiver).await;
    publish(&herald, None).await;
    receiver.wait_for("sharded", 1, WITHIN).await;
    // Past the 5 s Lease: delivery goes on only if the shard Leases were renewed (update).
    tokio::time::sleep(Duration::from_secs(6)).await;
    publish(&herald, None).await;
    receiver.wait_for("sharded", 2, WITHIN).await;
    let log = herald.log_text();
    assert!(!log.contains("shard given up") && !log.contains("Lease failed"), "log:\n{log}");
}

/// Without `cut`, herald logs `logged`, never acquires a shard, and delivers nothing.
async fn assert_no_shard_is_held(cut: Perm, logged: &[&str]) {
    let (setup, receiver, herald) = jetstream_setup(&[cut]).await;
    herald.wait_log(logged).await;
    sharded_subscription(&setup, &receiver).await;
    assert_queued_not_delivered(&herald, &receiver).await;
    assert!(!herald.log_text().contains("shard acquired"), "log:\n{}", herald.log_text());
}

/// Shards are taken after reading their Leases: without `get` none is held.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn on_jetstream_without_leases_get_no_shard_is_held_and_nothing_is_delivered() {
    let _turn = exclusive().await;
    let logged = ["renewing this replica's member Lease failed", "cannot get resource", "leases"];
    assert_no_shard_is_held(SHARD_LEASES_GET, &logged).await;
}

/// The fair share counts the live replicas by listing Leases: without `list` this replica
/// never knows its share, so it takes none.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn on_jetstream_without_leases_list_no_shard_is_held_and_nothing_is_delivered() {
    let _turn = exclusive().await;
    assert_no_shard_is_held(SHARD_LEASES_LIST, &["listing shard Leases failed", "cannot list resource", "leases"])
        .await;
}

/// A fresh shard Lease is created (`create`), but renewing it is an update: without
/// `update` every shard is given up before its Lease can expire, and none is taken again.
#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn on_jetstream_without_leases_update_shards_are_given_up_when_they_need_renewing() {
    let _turn = exclusive().await;
    let (setup, receiver, herald) = jetstream_setup(&[SHARD_LEASES_UPDATE]).await;
    herald.wait_log(&["renewing a shard Lease failed", "cannot update resource", "leases"]).await;
    let deadline = Instant::now() + WITHIN;
    loop {
        let log = herald.log_text();
        let (acquired, given_up) = (log.matches("shard acquired").count(), log.matches("shard given up").count());
        if acquired > 0 && given_up == acquired {
            break;
        }
        assert!(Instant::now() < deadline, "{given_up} of {acquired} shards given up; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sharded_subscription(&setup, &receiver).await;
    assert_queued_not_delivered(&herald, &receiver).await;
}

// ---------------------------------------------------------------------------------------
// The list of cases is the chart's list of permissions.

/// Every verb of every rule the chart grants herald has a test above that takes it away
/// alone, and docs/rbac.md names that test; no test takes away a verb the chart no longer
/// grants.
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn every_verb_of_every_rule_has_a_test() {
    // The default render, and the JetStream one with its extra rule.
    let mut all: Vec<Grant> =
        [&[][..], SECRETS, JETSTREAM].iter().flat_map(|values| granted(&render("herald", values))).collect();
    all.sort();
    all.dedup();
    let granted = all;
    let mut covered: Vec<Grant> = CASES.iter().map(|(perm, _)| Grant::from(perm)).collect();
    covered.sort();
    covered.dedup();
    let untested: Vec<_> = granted.iter().filter(|p| !covered.contains(p)).collect();
    let stale: Vec<_> = covered.iter().filter(|p| !granted.contains(p)).collect();
    assert!(untested.is_empty(), "permissions without a test in tests/rbac.rs: {untested:?}");
    assert!(stale.is_empty(), "tests for permissions the chart no longer grants: {stale:?}");

    let this = std::fs::read_to_string(format!("{ROOT}/tests/rbac.rs")).expect("tests/rbac.rs");
    let docs = std::fs::read_to_string(format!("{ROOT}/docs/rbac.md")).expect("docs/rbac.md");
    for (perm, test) in CASES {
        assert!(this.contains(&format!("async fn {test}()")), "{perm:?}: no test named {test}");
        assert!(docs.contains(&format!("`{test}`")), "docs/rbac.md does not name {test} (for {perm:?})");
    }
    assert!(docs.contains("`herald_is_refused_secrets_outside_its_namespace`"));
}
