//! The Helm chart and the plain manifests against the real control plane: lint, values
//! schema, server-side dry runs, drift of the chart's CRD copy and of deploy/herald.yaml,
//! the NetworkPolicy and the Secrets the Role names, install/upgrade/uninstall, aggregation
//! of the user roles into view/edit, and herald running with exactly the chart's permissions.
//! Run through tests/run.sh (helm and kubectl come from $HERALD_TOOLS_BIN). These releases'
//! pods never start: the one node is tainted for tests/node.rs, which runs the chart's pod
//! for real.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::helm::*;
use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A ServiceAccount token from the TokenRequest API.
fn token(cluster: &Cluster, namespace: &str, service_account: &str) -> String {
    let (ok, out, err) = cluster.kubectl(&["create", "token", service_account, "-n", namespace, "--duration", "1h"]);
    assert!(ok, "kubectl create token {service_account}: {err}");
    out.trim().to_string()
}

fn temp_file(namespace: &str, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{namespace}-{name}"))
}

fn write_subscription(namespace: &str, name: &str) -> PathBuf {
    let file = temp_file(namespace, &format!("{name}.yaml"));
    let yaml = format!(
        "apiVersion: herald.dev/v1alpha1\nkind: EventSubscription\nmetadata: {{name: {name}}}\n\
         spec: {{subscriptionName: {name}, callbackUrl: 'http://127.0.0.1:9/events', events: [hostcreate]}}\n"
    );
    std::fs::write(&file, yaml).expect("write subscription");
    file
}

/// `helm template` with `values`, which must succeed.
fn render(values: &[&str]) -> String {
    let out = run(Command::new(tools().join("helm")).args(["template", "herald", CHART]).args(values));
    assert!(out.ok, "helm template {values:?}: {out}");
    out.stdout
}

/// The config file the chart's ConfigMap holds, rendered with `values`.
fn chart_config(values: &[&str]) -> String {
    let mut args = vec!["--show-only", "templates/configmap.yaml"];
    args.extend(values);
    let configmap: ConfigMap = serde_yaml::from_str(&render(&args)).expect("ConfigMap YAML");
    configmap.data.expect("data")["config.yaml"].clone()
}

/// The objects of a multi-document YAML stream, as JSON.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let value = serde_yaml::Value::deserialize(doc).expect("rendered YAML");
            (!value.is_null()).then(|| serde_json::to_value(value).expect("YAML as JSON"))
        })
        .collect()
}

/// The objects `helm template` renders with `values`.
fn objects(values: &[&str]) -> Vec<Value> {
    documents(&render(values))
}

/// The one object of `kind` rendered with `values`, if any.
fn rendered(values: &[&str], kind: &str) -> Option<Value> {
    let mut found: Vec<Value> = objects(values).into_iter().filter(|o| o["kind"] == kind).collect();
    assert!(found.len() <= 1, "{values:?}: more than one {kind}: {found:?}");
    found.pop()
}

/// The rules of the Role rendered with `values` that grant anything on Secrets.
fn role_secrets_rules(values: &[&str]) -> Vec<Value> {
    let role = rendered(values, "Role").expect("a Role");
    role["rules"].as_array().expect("rules").iter().filter(|r| grants_secrets(r)).cloned().collect()
}

/// Whether an RBAC rule reaches Secrets (core group, or any group, and secrets or any resource).
fn grants_secrets(rule: &Value) -> bool {
    let has = |field: &str, wanted: &[&str]| {
        rule[field].as_array().into_iter().flatten().any(|v| v.as_str().is_some_and(|v| wanted.contains(&v)))
    };
    has("apiGroups", &["", "*"]) && has("resources", &["secrets", "*"])
}

#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn the_chart_passes_helm_lint_strict() {
    for strict in [false, true] {
        let mut args = vec!["lint", CHART];
        if strict {
            args.push("--strict");
        }
        let out = run(Command::new(tools().join("helm")).args(&args));
        assert!(out.ok, "helm {args:?}: {out}");
    }
}

#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn the_values_schema_rejects_wrong_types() {
    let cases: [(&[&str], &str); 5] = [
        (&["--set", "replicaCount=two"], "/replicaCount"),
        (&["--set", "replicaCount=2"], "/replicaCount"),
        (&["--set", "resources=5"], "/resources"),
        (&["--set", "persistence.enabled=yes"], "/persistence/enabled"),
        (&["--set", "tls.enabled=true"], "/tls/secretName"),
    ];
    for (values, field) in cases {
        let out = run(Command::new(tools().join("helm")).args(["template", "herald", CHART]).args(values));
        assert!(!out.ok, "{values:?} must be refused: {out}");
        assert!(
            out.stderr.contains("schema") && out.stderr.contains(field),
            "{values:?}: the error should name {field}: {out}"
        );
    }
    let typo = run(Command::new(tools().join("helm")).args(["template", "herald", CHART, "--set", "replicas=1"]));
    assert!(!typo.ok && typo.stderr.contains("replicas"), "an unknown top-level key is refused: {typo}");
}

#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn the_values_schema_checks_network_policy_rules_and_secret_names() {
    let cases: [(&str, &str); 8] = [
        (r#"networkPolicy.enabled="yes""#, "/networkPolicy/enabled"),
        (r#"networkPolicy.ingresFrom=[]"#, "/networkPolicy"),
        (r#"networkPolicy.ingressFrom=[{"podSelecter": {}}]"#, "/networkPolicy/ingressFrom/0"),
        (r#"networkPolicy.ingressFrom=[{}]"#, "/networkPolicy/ingressFrom/0"),
        // The API server refuses an ipBlock together with a selector in one peer.
        (
            r#"networkPolicy.egress=[{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}]}]"#,
            "/networkPolicy/egress/0/to/0",
        ),
        (r#"networkPolicy.egress=[{"ports": [{"protocol": "ICMP"}]}]"#, "/networkPolicy/egress/0/ports/0/protocol"),
        (r#"signingSecrets=["Webhook_Key"]"#, "/signingSecrets/0"),
        (r#"sourceCredentialsSecrets="cmdb-credentials""#, "/sourceCredentialsSecrets"),
    ];
    for (value, field) in cases {
        let out = run(Command::new(tools().join("helm")).args(["template", "herald", CHART, "--set-json", value]));
        assert!(!out.ok, "{value} must be refused: {out}");
        assert!(
            out.stderr.contains("schema") && out.stderr.contains(field),
            "{value}: the error should name {field}: {out}"
        );
    }
}

/// By default herald's pods take connections on the HTTP port alone, from anywhere (or
/// from `networkPolicy.ingressFrom`), and may connect anywhere (callbacks).
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn a_network_policy_opens_only_the_http_port_by_default() {
    let defaults = objects(&[]);
    let of_kind = |kind: &str| defaults.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
    let (policy, deployment) = (of_kind("NetworkPolicy"), of_kind("Deployment"));
    assert_eq!(policy["metadata"]["name"], "herald", "{policy}");
    assert_eq!(
        policy["spec"]["podSelector"], deployment["spec"]["selector"],
        "the policy selects herald's pods: {policy}"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]), "{policy}");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"],
        json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]),
        "herald has one port"
    );
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"protocol": "TCP", "port": 8080}]}]),
        "that port only, from anywhere: {policy}"
    );
    assert_eq!(policy["spec"]["egress"], json!([{}]), "egress open: {policy}");

    let moved = rendered(&["--set", "containerPort=9443"], "NetworkPolicy").expect("a NetworkPolicy");
    assert_eq!(moved["spec"]["ingress"], json!([{"ports": [{"protocol": "TCP", "port": 9443}]}]), "{moved}");

    let peers = json!([
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cmdb"}},
         "podSelector": {"matchLabels": {"app": "cmdb-sync"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"ipBlock": {"cidr": "10.20.0.0/16"}},
    ]);
    let from = format!("networkPolicy.ingressFrom={peers}");
    let restricted = rendered(&["--set-json", &from], "NetworkPolicy").expect("a NetworkPolicy");
    assert_eq!(
        restricted["spec"]["ingress"],
        json!([{"ports": [{"protocol": "TCP", "port": 8080}], "from": peers}]),
        "the HTTP port from those peers only: {restricted}"
    );
    assert_eq!(restricted["spec"]["egress"], json!([{}]), "{restricted}");

    assert_eq!(rendered(&["--set", "networkPolicy.enabled=false"], "NetworkPolicy"), None);

    let plain = documents(&std::fs::read_to_string(format!("{ROOT}/deploy/herald.yaml")).expect("deploy/herald.yaml"));
    let plain_policy = plain.iter().find(|o| o["kind"] == "NetworkPolicy").expect("deploy/herald.yaml's NetworkPolicy");
    assert_eq!(plain_policy["spec"], policy["spec"], "deploy/herald.yaml has the default policy");
}

/// `networkPolicy.egress` replaces the open egress with its rules, and DNS stays allowed.
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn restricted_egress_keeps_dns() {
    let rules = json!([
        {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]},
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nats"}}}],
         "ports": [{"protocol": "TCP", "port": 4222}]},
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}], "ports": [{"protocol": "TCP", "port": 443}]},
    ]);
    let egress = format!("networkPolicy.egress={rules}");
    let policy = rendered(&["--set-json", &egress], "NetworkPolicy").expect("a NetworkPolicy");
    let dns = json!({"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]});
    let mut wanted = vec![dns];
    wanted.extend(rules.as_array().expect("rules").iter().cloned());
    assert_eq!(policy["spec"]["egress"], Value::Array(wanted), "DNS, then the given rules, nothing open: {policy}");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]), "{policy}");
    assert_eq!(policy["spec"]["ingress"], json!([{"ports": [{"protocol": "TCP", "port": 8080}]}]), "{policy}");
}

/// The Role reads Secrets by name only, and exactly those named in the values; with none
/// named it has no rule on Secrets at all.
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn the_roles_secrets_rule_names_exactly_the_named_secrets() {
    let rule =
        |names: &[&str]| json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": names, "verbs": ["get"]});
    assert_eq!(role_secrets_rules(&[]), Vec::<Value>::new(), "no Secret named: no rule on Secrets");
    let jetstream = ["--set", "config.store.engine=jetstream", "--set", "nats.secretName=herald-nats"];
    assert_eq!(role_secrets_rules(&jetstream), Vec::<Value>::new(), "a mounted Secret needs no rule");
    let tls = ["--set", "tls.enabled=true", "--set", "tls.secretName=herald-tls"];
    assert_eq!(role_secrets_rules(&tls), Vec::<Value>::new(), "a mounted Secret needs no rule");

    let cases: [(&[&str], &[&str]); 4] = [
        (&["--set", "config.api.esbCredentialsSecret=esb-apps"], &["esb-apps"]),
        (&["--set-json", r#"signingSecrets=["webhook-key", "team-key"]"#], &["webhook-key", "team-key"]),
        (&["--set-json", r#"sourceCredentialsSecrets=["cmdb-credentials"]"#], &["cmdb-credentials"]),
        (
            &[
                "--set",
                "config.api.esbCredentialsSecret=esb-apps",
                "--set-json",
                r#"signingSecrets=["webhook-key", "esb-apps"]"#,
                "--set-json",
                r#"sourceCredentialsSecrets=["cmdb-credentials", "webhook-key"]"#,
            ],
            &["esb-apps", "webhook-key", "cmdb-credentials"],
        ),
    ];
    for (values, names) in cases {
        assert_eq!(role_secrets_rules(values), vec![rule(names)], "{values:?}");
        for cluster_role in objects(values).iter().filter(|o| o["kind"] == "ClusterRole") {
            let rules = cluster_role["rules"].as_array().expect("rules");
            assert!(!rules.iter().any(grants_secrets), "{values:?}: no Secrets cluster-wide: {cluster_role}");
        }
    }
}

/// No role the chart or deploy/herald.yaml makes grants Secrets without naming them (nor
/// through a wildcard), whatever the values.
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn no_rule_grants_secrets_without_resource_names() {
    let variants: [&[&str]; 7] = [
        &[],
        &["--set", "config.api.esbCredentialsSecret=esb-apps", "--set-json", r#"signingSecrets=["webhook-key"]"#],
        &["--set-json", r#"sourceCredentialsSecrets=["cmdb-credentials"]"#],
        &["--set", "config.store.engine=jetstream", "--set", "replicaCount=3", "--set", "nats.secretName=herald-nats"],
        &["--set", "api.auth.kubernetes=false"],
        &["--set-json", r#"accountRoles=["0", "tenant-b"]"#],
        &[
            "--set",
            "serviceAccount.create=false",
            "--set",
            "serviceAccount.name=herald-sa",
            "--set",
            "tls.enabled=true",
            "--set",
            "tls.secretName=herald-tls",
        ],
    ];
    let plain = std::fs::read_to_string(format!("{ROOT}/deploy/herald.yaml")).expect("deploy/herald.yaml");
    let renders = variants.iter().map(|values| (format!("{values:?}"), objects(values)));
    let mut roles_seen = 0;
    for (what, objects) in renders.chain([("deploy/herald.yaml".to_string(), documents(&plain))]) {
        for role in objects.iter().filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole") {
            roles_seen += 1;
            let name = format!("{what}: {} {}", role["kind"], role["metadata"]["name"]);
            for rule in role["rules"].as_array().expect("rules") {
                for field in ["apiGroups", "resources", "verbs"] {
                    assert!(!rule[field].as_array().expect(field).contains(&json!("*")), "{name}: a wildcard: {rule}");
                }
                if grants_secrets(rule) {
                    assert_eq!(role["kind"], "Role", "{name}: Secrets outside herald's namespace: {rule}");
                    let names = rule["resourceNames"].as_array().map_or(0, Vec::len);
                    assert!(names > 0, "{name}: Secrets without resourceNames: {rule}");
                    assert_eq!(rule["verbs"], json!(["get"]), "{name}: Secrets are only read by name: {rule}");
                }
            }
        }
    }
    assert!(roles_seen >= 2 * (variants.len() + 1), "every render has a ClusterRole and a Role");
    let plain_role = documents(&plain).into_iter().find(|o| o["kind"] == "Role").expect("deploy/herald.yaml's Role");
    let reads_secrets = plain_role["rules"].as_array().expect("rules").iter().any(grants_secrets);
    assert!(
        !reads_secrets,
        "deploy/herald.yaml (default values) names no Secret, so its Role reads none: {plain_role}"
    );
}

#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn the_charts_crd_and_deploy_manifests_are_not_stale() {
    for file in ["eventsubscriptions.herald.dev.yaml", "cmdbsources.herald.dev.yaml"] {
        let committed = std::fs::read_to_string(format!("{ROOT}/crds/{file}")).expect("crds/");
        let chart_copy = std::fs::read_to_string(format!("{CHART}/crds/{file}")).expect("chart crds/");
        let generated = run(Command::new(env!("CARGO_BIN_EXE_herald")).args(["crd", file]));
        assert!(generated.ok, "herald crd: {generated}");
        assert!(
            chart_copy == committed && chart_copy == generated.stdout,
            "charts/herald/crds/{file} is stale: run `cargo run -- crd {file} > crds/{file}` and copy it to charts/herald/crds/"
        );
    }

    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{CHART}/Chart.yaml")).expect("Chart.yaml"))
            .expect("Chart.yaml YAML");
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion is the crate version"
    );

    let fresh = std::env::temp_dir().join(format!("herald-render-{}.yaml", std::process::id()));
    let path = format!("{}:{}", tools().display(), std::env::var("PATH").unwrap_or_default());
    let out = run(Command::new(format!("{ROOT}/deploy/render.sh")).arg(&fresh).env("PATH", path));
    assert!(out.ok, "deploy/render.sh: {out}");
    let rendered = std::fs::read_to_string(&fresh).expect("rendered manifests");
    let _ = std::fs::remove_file(&fresh);
    let committed = std::fs::read_to_string(format!("{ROOT}/deploy/herald.yaml")).expect("deploy/herald.yaml");
    assert!(rendered == committed, "deploy/herald.yaml is stale: run deploy/render.sh");
}

#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn values_switch_the_optional_parts() {
    let defaults = render(&[]);
    assert!(!defaults.contains("kind: ServiceMonitor") && !defaults.contains("/etc/herald/tls"), "{defaults}");
    assert!(defaults.contains("kind: PersistentVolumeClaim") && defaults.contains("claimName: herald"), "{defaults}");

    let monitored = render(&["--set", "serviceMonitor.enabled=true"]);
    assert!(monitored.contains("kind: ServiceMonitor") && monitored.contains("path: /metrics"), "{monitored}");

    let tls = render(&["--set", "tls.enabled=true", "--set", "tls.secretName=herald-tls"]);
    for wanted in
        ["secretName: herald-tls", "mountPath: /etc/herald/tls", "certFile: /etc/herald/tls/tls.crt", "scheme: HTTPS"]
    {
        assert!(tls.contains(wanted), "TLS render lacks {wanted}: {tls}");
    }

    let existing = render(&["--set", "persistence.existingClaim=store"]);
    assert!(!existing.contains("kind: PersistentVolumeClaim") && existing.contains("claimName: store"), "{existing}");
    let ephemeral = render(&["--set", "persistence.enabled=false"]);
    assert!(!ephemeral.contains("kind: PersistentVolumeClaim") && !ephemeral.contains("claimName:"), "{ephemeral}");

    let renamed =
        render(&["--set", "config.controller.idCounter=ids", "--set", "config.leaderElection.leaseName=leader"]);
    assert!(
        renamed.contains(r#"resourceNames: ["ids"]"#) && renamed.contains(r#"resourceNames: ["leader"]"#),
        "{renamed}"
    );
    let no_token_auth = render(&["--set", "api.auth.kubernetes=false"]);
    assert!(
        !no_token_auth.contains("tokenreviews") && !no_token_auth.contains("subjectaccessreviews"),
        "{no_token_auth}"
    );

    assert!(!defaults.contains("hostNetwork") && defaults.contains("containerPort: 8080"), "{defaults}");
    let on_the_node = render(&["--set", "hostNetwork=true", "--set", "containerPort=9443"]);
    for wanted in
        ["hostNetwork: true", "dnsPolicy: ClusterFirstWithHostNet", "containerPort: 9443", "listen: 0.0.0.0:9443"]
    {
        assert!(on_the_node.contains(wanted), "host network render lacks {wanted}: {on_the_node}");
    }
}

/// Several replicas only with JetStream and leader election; then no volume, a roll that replaces one pod at a
/// time with the new one up first, a PodDisruptionBudget, and the NATS Secret mounted.
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn jetstream_replicas_roll_keep_a_disruption_budget_and_need_no_volume() {
    let sqlite = run(Command::new(tools().join("helm")).args(["template", "herald", CHART, "--set", "replicaCount=3"]));
    assert!(!sqlite.ok && sqlite.stderr.contains("/replicaCount"), "3 replicas on one SQLite file: {sqlite}");
    let defaults = render(&[]);
    assert!(defaults.contains("type: Recreate") && !defaults.contains("kind: PodDisruptionBudget"), "{defaults}");

    let jetstream = [
        "--set",
        "config.store.engine=jetstream",
        "--set",
        "config.store.jetstream.urls={nats://nats:4222}",
        "--set",
        "config.store.jetstream.credentialsFile=/etc/herald/nats/herald.creds",
        "--set",
        "nats.secretName=herald-nats",
    ];
    let three = render(&[&jetstream[..], &["--set", "replicaCount=3"]].concat());
    for wanted in [
        "replicas: 3",
        "type: RollingUpdate",
        "maxSurge: 1",
        "maxUnavailable: 0",
        "kind: PodDisruptionBudget",
        "maxUnavailable: 1",
        "secretName: herald-nats",
        "mountPath: /etc/herald/nats",
        r#"verbs: ["get", "update", "list"]"#,
    ] {
        assert!(three.contains(wanted), "3 JetStream replicas: the render lacks {wanted}: {three}");
    }
    for unwanted in ["kind: PersistentVolumeClaim", "/var/lib/herald", "claimName:", "type: Recreate"] {
        assert!(!three.contains(unwanted), "3 JetStream replicas: the render has {unwanted}: {three}");
    }
    let config = herald::config::Config::from_yaml(&chart_config(&jetstream)).expect("herald's config");
    let settings = config.store.jetstream.settings().expect("JetStream settings");
    assert_eq!(settings.urls, ["nats://nats:4222"]);

    let unled = run(Command::new(tools().join("helm")).args(["template", "herald", CHART]).args(jetstream).args([
        "--set",
        "replicaCount=3",
        "--set",
        "config.leaderElection.enabled=false",
    ]));
    assert!(!unled.ok && unled.stderr.contains("/replicaCount"), "3 replicas with no leader would all write: {unled}");
    let one_unled = render(&[&jetstream[..], &["--set", "config.leaderElection.enabled=false"]].concat());
    assert!(one_unled.contains("replicas: 1"), "one replica needs no leader: {one_unled}");

    let one = render(&jetstream);
    assert!(one.contains("type: RollingUpdate") && !one.contains("kind: PodDisruptionBudget"), "{one}");
    let unbudgeted =
        render(&[&jetstream[..], &["--set", "replicaCount=3", "--set", "podDisruptionBudget.enabled=false"]].concat());
    assert!(!unbudgeted.contains("kind: PodDisruptionBudget"), "{unbudgeted}");
}

/// herald refuses unknown config keys, so a key the chart writes and herald does not know
/// would stop the pod at start-up.
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn herald_accepts_the_config_the_chart_writes() {
    let variants: [&[&str]; 2] = [&[], &["--set", "tls.enabled=true", "--set", "tls.secretName=herald-tls"]];
    for values in variants {
        let file = chart_config(values);
        if let Err(error) = herald::config::Config::from_yaml(&file) {
            panic!("herald refuses the chart's config ({values:?}): {error}\n{file}");
        }
    }
}

/// The store quota stays under the volume it lives on, so publishes answer 503 over quota
/// before the disk fills (with a full disk they would fail as a whole).
#[test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
fn the_store_quota_follows_the_volume_size() {
    let quota = |values: &[&str]| {
        let config = herald::config::Config::from_yaml(&chart_config(values)).expect("herald's config");
        config.store.quota_bytes
    };
    assert_eq!(quota(&[]), 5 * (1 << 30) * 4 / 5, "80 % of the default 5Gi");
    assert_eq!(quota(&["--set", "persistence.size=20Gi"]), 20 * (1 << 30) * 4 / 5);
    assert_eq!(quota(&["--set", "persistence.size=500M"]), 400_000_000);
    assert_eq!(quota(&["--set", "config.store.quotaBytes=1000"]), 1000, "an explicit quota wins");
    let default = herald::config::Config::default().store.quota_bytes;
    assert_eq!(quota(&["--set", "persistence.enabled=false"]), default, "no volume: herald's own default");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn rendered_and_plain_manifests_pass_a_server_side_dry_run() {
    let cluster = cluster().await;
    let ns = cluster.namespace("herald-dryrun", &[]).await;
    let replicas = ["--set", "config.store.engine=jetstream", "--set", "replicaCount=3"];
    for (name, values) in [("rendered", &[][..]), ("replicas", &replicas[..])] {
        let rendered =
            helm(&cluster.kubeconfig, &[&["template", "herald", CHART, "--namespace", &ns], values].concat());
        assert!(rendered.ok, "helm template {values:?}: {rendered}");
        let file = temp_file(&ns, &format!("{name}.yaml"));
        std::fs::write(&file, &rendered.stdout).expect("write rendered chart");
        let (ok, out, err) = cluster.kubectl(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()]);
        assert!(ok, "helm template {values:?} | kubectl apply --dry-run=server: {out}{err}");
    }

    // A dry run creates no Namespace, so the plain manifests' herald-system must exist.
    let (exists, _, _) = cluster.kubectl(&["get", "namespace", "herald-system"]);
    if !exists {
        let (ok, _, err) = cluster.kubectl(&["create", "namespace", "herald-system"]);
        assert!(ok || err.contains("AlreadyExists"), "create herald-system: {err}");
    }
    let plain = format!("{ROOT}/deploy/herald.yaml");
    let (ok, out, err) = cluster.kubectl(&["apply", "--dry-run=server", "--server-side", "-f", &plain]);
    if !exists {
        // Waits, so that a rerun against this control plane finds no terminating namespace.
        cluster.kubectl(&["delete", "namespace", "herald-system", "--timeout=60s"]);
    }
    assert!(ok, "kubectl apply --dry-run=server --server-side -f deploy/herald.yaml: {out}{err}");
    for kind in [
        "namespace/herald-system",
        "customresourcedefinition",
        "deployment.apps/herald",
        "clusterrole.rbac.authorization.k8s.io/herald-view",
    ] {
        assert!(out.contains(kind), "deploy/herald.yaml should contain {kind}: {out}");
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn install_upgrade_and_uninstall_leave_nothing_behind() {
    let cluster = cluster().await;
    // The pod must pass the restricted Pod Security Standard to be created at all.
    let ns = cluster.namespace("herald-install", &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    // Installing at all also shows that the default render has no ServiceMonitor: this
    // cluster has no monitoring.coreos.com CRDs.
    let release = Release::install(&cluster, &ns, &[]);
    let full = release.name.as_str();
    let view = format!("{full}-view");
    let edit = format!("{full}-edit");
    let namespaced = [
        "serviceaccount",
        "role",
        "rolebinding",
        "configmap",
        "persistentvolumeclaim",
        "service",
        "deployment",
        "networkpolicy",
    ];
    let cluster_scoped =
        [("clusterrole", full), ("clusterrolebinding", full), ("clusterrole", &view), ("clusterrole", &edit)];
    for kind in namespaced {
        let (ok, _, err) = cluster.kubectl(&["get", kind, full, "-n", &ns]);
        assert!(ok, "{kind}/{full} after install: {err}");
    }
    for (kind, name) in cluster_scoped {
        let (ok, _, err) = cluster.kubectl(&["get", kind, name]);
        assert!(ok, "{kind}/{name} after install: {err}");
    }

    // The ReplicaSet controller creates the pod only if Pod Security admission lets it in.
    let selector = format!("app.kubernetes.io/instance={full}");
    eventually(Duration::from_secs(30), "a pod admitted under the restricted policy", || {
        let (_, pods, _) = cluster.kubectl(&["get", "pods", "-n", &ns, "-l", &selector, "-o", "name"]);
        if pods.trim().is_empty() {
            let (_, events, _) = cluster.kubectl(&["get", "events", "-n", &ns]);
            Err(events)
        } else {
            Ok(())
        }
    })
    .await;

    let jsonpath = |kind: &str, path: &str| {
        let (ok, out, err) = cluster.kubectl(&["get", kind, full, "-n", &ns, "-o", &format!("jsonpath={path}")]);
        assert!(ok, "{kind} {path}: {err}");
        out
    };
    let checksum = "{.spec.template.metadata.annotations.checksum/config}";
    assert_eq!(jsonpath("deployment", "{.spec.strategy.type}"), "Recreate");
    assert_eq!(jsonpath("deployment", "{.spec.template.spec.containers[0].resources.limits.memory}"), "512Mi");
    let checksum_before = jsonpath("deployment", checksum);
    let rules = jsonpath("clusterrole", "{.rules[*].resources}");
    assert!(rules.contains("tokenreviews") && rules.contains("subjectaccessreviews"), "{rules}");

    let out = release.upgrade(&[
        "--set",
        "resources.limits.memory=1Gi",
        "--set",
        "config.controller.resyncSeconds=60",
        "--set",
        "api.auth.kubernetes=false",
    ]);
    assert!(out.ok, "helm upgrade: {out}");
    assert_eq!(jsonpath("deployment", "{.spec.template.spec.containers[0].resources.limits.memory}"), "1Gi");
    assert!(jsonpath("configmap", "{.data.config\\.yaml}").contains("resyncSeconds: 60"));
    assert_ne!(jsonpath("deployment", checksum), checksum_before, "a config change rolls the pod");
    let rules = jsonpath("clusterrole", "{.rules[*].resources}");
    assert!(!rules.contains("tokenreviews") && !rules.contains("subjectaccessreviews"), "{rules}");

    let out = release.uninstall();
    assert!(out.ok, "helm uninstall: {out}");
    eventually(Duration::from_secs(60), "every object gone after uninstall", || {
        let mut left = Vec::new();
        for kind in namespaced {
            if cluster.kubectl(&["get", kind, full, "-n", &ns]).0 {
                left.push(format!("{kind}/{full}"));
            }
        }
        for (kind, name) in cluster_scoped {
            if cluster.kubectl(&["get", kind, name]).0 {
                left.push(format!("{kind}/{name}"));
            }
        }
        let (_, pods, _) = cluster.kubectl(&["get", "pods", "-n", &ns, "-l", &selector, "-o", "name"]);
        left.extend(pods.lines().map(str::to_string));
        let (_, history, _) = cluster.kubectl(&["get", "secrets", "-n", &ns, "-l", "owner=helm", "-o", "name"]);
        left.extend(history.lines().map(str::to_string));
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    })
    .await;
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn the_user_roles_aggregate_into_view_and_edit() {
    let cluster = cluster().await;
    let ns = cluster.namespace("herald-roles", &[]).await;
    let release = Release::install(&cluster, &ns, &["--set-json", r#"accountRoles=["0"]"#]);
    let mut users = Vec::new();
    for (user, role) in [("alice", "view"), ("bob", "edit")] {
        let (ok, _, err) = cluster.kubectl(&["create", "serviceaccount", user, "-n", &ns]);
        assert!(ok, "{err}");
        let subject = format!("--serviceaccount={}:{user}", ns.name);
        let (ok, _, err) =
            cluster.kubectl(&["create", "rolebinding", user, "-n", &ns, &format!("--clusterrole={role}"), &subject]);
        assert!(ok, "{err}");
        let token = token(&cluster, &ns, user);
        users.push(cluster.kubeconfig_with_token(&temp_file(&ns, &format!("{user}.kubeconfig")), &token));
    }
    let (alice, bob) = (&users[0], &users[1]);

    // kube-controller-manager folds herald-view into view and herald-edit into edit.
    eventually(Duration::from_secs(30), "alice (view) lists subscriptions", || {
        let out = kubectl(alice, &["get", "esub", "-n", &ns]);
        if out.ok { Ok(()) } else { Err(out.to_string()) }
    })
    .await;
    let subscription = write_subscription(&ns, "by-alice");
    let out = kubectl(alice, &["create", "-n", &ns, "-f", subscription.to_str().unwrap()]);
    assert!(
        !out.ok && out.stderr.contains("cannot create resource \"eventsubscriptions\""),
        "alice (view) must not create subscriptions: {out}"
    );

    let subscription = write_subscription(&ns, "by-bob");
    eventually(Duration::from_secs(30), "bob (edit) creates a subscription", || {
        let out = kubectl(bob, &["create", "-n", &ns, "-f", subscription.to_str().unwrap()]);
        if out.ok { Ok(()) } else { Err(out.to_string()) }
    })
    .await;
    let out = kubectl(bob, &["delete", "esub", "by-bob", "-n", &ns]);
    assert!(out.ok, "bob (edit) deletes a subscription: {out}");

    // The virtual resource herald authorises REST calls against (supplier account "0"):
    // none through view/edit (the namespace's RoleBindings), exactly the account through
    // the account roles (ClusterRoleBindings); herald's own review is cluster-wide, which
    // the last test covers. `kubectl auth can-i` cannot name
    // the group of a resource the server does not serve, hence a SelfSubjectAccessReview
    // (without client-side validation, which would need to list CRDs).
    let can_on = |who: &Path, verb: &str, account: &str| {
        let review = serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {
                "group": "herald.dev", "resource": "supplieraccounts", "name": account, "verb": verb,
                "namespace": ns.name,
            }},
        });
        let file = temp_file(&ns, "review.json");
        std::fs::write(&file, review.to_string()).expect("write review");
        let out = kubectl(
            who,
            &["create", "--validate=false", "-f", file.to_str().unwrap(), "-o", "jsonpath={.status.allowed}"],
        );
        assert!(out.ok, "SelfSubjectAccessReview: {out}");
        out.stdout == "true"
    };
    // view and edit hand out no supplier account: the REST API (dead letters hold whole
    // CMDB events) is granted per account by the account roles.
    const VERBS: [&str; 6] = ["list", "create", "update", "delete", "publish", "replay"];
    for verb in VERBS {
        assert!(!can_on(alice, verb, "0"), "alice (view) may not {verb} supplier account 0");
        assert!(!can_on(bob, verb, "0"), "bob (edit) may not {verb} supplier account 0");
    }
    let mut granted = Vec::new();
    let mut account_users = Vec::new();
    for (user, role) in [("carol", "reader"), ("dave", "writer")] {
        let (ok, _, err) = cluster.kubectl(&["create", "serviceaccount", user, "-n", &ns]);
        assert!(ok, "{err}");
        let binding = format!("{}-{user}", ns.name);
        let role = format!("--clusterrole={}-account-0-{role}", release.name);
        let subject = format!("--serviceaccount={}:{user}", ns.name);
        let (ok, _, err) = cluster.kubectl(&["create", "clusterrolebinding", &binding, &role, &subject]);
        assert!(ok, "{err}");
        granted.push(ClusterScoped {
            kind: "clusterrolebinding",
            name: binding,
            kubeconfig: cluster.kubeconfig.clone(),
        });
        let token = token(&cluster, &ns, user);
        account_users.push(cluster.kubeconfig_with_token(&temp_file(&ns, &format!("{user}.kubeconfig")), &token));
    }
    let (carol, dave) = (&account_users[0], &account_users[1]);
    eventually(Duration::from_secs(30), "carol (account 0 reader) may list account 0", || {
        if can_on(carol, "list", "0") { Ok(()) } else { Err("not yet".into()) }
    })
    .await;
    assert!(VERBS[1..].iter().all(|verb| !can_on(carol, verb, "0")), "the reader only searches");
    eventually(Duration::from_secs(30), "dave (account 0 writer) may publish to account 0", || {
        if can_on(dave, "publish", "0") { Ok(()) } else { Err("not yet".into()) }
    })
    .await;
    for verb in VERBS {
        assert!(can_on(dave, verb, "0"), "dave (writer) may {verb} account 0");
        assert!(!can_on(dave, verb, "1"), "account 0's writer has nothing on account 1");
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn herald_runs_with_exactly_the_charts_permissions() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("herald-sa", &[]).await;
    // The signing Secret below is the one Secret herald may read (signingSecrets).
    let release = Release::install(
        &cluster,
        &ns,
        &["--set-json", r#"accountRoles=["0"]"#, "--set-json", r#"signingSecrets=["webhook-key"]"#],
    );
    let service_account = release.name.clone();
    let token = token(&cluster, &ns, &service_account);
    let kubeconfig = cluster.kubeconfig_with_token(&temp_file(&ns, "herald.kubeconfig"), &token);
    let whoami = kubectl(&kubeconfig, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(whoami.stdout, format!("system:serviceaccount:{}:{service_account}", ns.name), "{whoami}");

    // The chart's own config file, with the store in a temporary directory instead of the
    // pod's volume (the harness sets the listen address). The harness runs herald with the
    // kubeconfig of the Cluster it is given.
    let store = temp_file(&ns, "store");
    // Anonymous access is off, as in the chart, so REST calls need a token.
    let config = chart_config(&[
        "--set",
        &format!("config.store.path={}", store.display()),
        "--set",
        "config.api.auth.anonymous=false",
    ]);
    let as_chart =
        Cluster { client: cluster.client.clone(), kubeconfig: kubeconfig.clone(), tools: cluster.tools.clone() };
    let herald = Herald::start(&as_chart, &ns, &config).await;

    // Leadership: herald is ready only while it holds the Lease.
    let (ok, holder, err) =
        cluster.kubectl(&["get", "lease", "herald-leader", "-n", &ns, "-o", "jsonpath={.spec.holderIdentity}"]);
    assert!(ok && !holder.is_empty(), "herald holds the leader Lease: {holder}{err}");

    // Watch, id counter, status and label writes.
    let api = cluster.subscriptions(&ns);
    api.create(&PostParams::default(), &subscription("ok", basic_spec("chart-sa"))).await.expect("create subscription");
    let sub = wait_ready(&api, "ok").await;
    let id = id(&sub).expect("a subscription id in status");
    wait_for(&api, "ok", Duration::from_secs(30), "labelled with its id", |s| {
        s.labels().get(herald::crd::SUBSCRIPTION_ID_LABEL) == Some(&id.to_string())
    })
    .await;
    let counter = Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns).get("herald-subscription-ids").await;
    assert!(counter.is_ok(), "the id counter ConfigMap was created: {counter:?}");

    // Warning Events.
    let mut spec = basic_spec("chart-sa-bad");
    spec["confirm"] = serde_json::json!({"mode": "regular", "pattern": "result(true"});
    api.create(&PostParams::default(), &subscription("bad", spec)).await.expect("create subscription");
    wait_reason(&api, "bad", "InvalidPattern").await;
    eventually(Duration::from_secs(30), "an InvalidPattern Event", || {
        let (_, reasons, err) =
            cluster.kubectl(&["get", "events.events.k8s.io", "-n", &ns, "-o", "jsonpath={.items[*].reason}"]);
        if reasons.contains("InvalidPattern") { Ok(()) } else { Err(format!("{reasons}{err}\n{}", herald.log_text())) }
    })
    .await;

    // Signing keys: the Secret named in signingSecrets, read by name in herald's namespace (the
    // publish below delivers).
    let receiver = callback::CallbackServer::start().await;
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "webhook-key"},
        "stringData": {"key": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
    });
    Api::<Secret>::namespaced(cluster.client.clone(), &ns)
        .create(&PostParams::default(), &serde_json::from_value(secret).expect("Secret"))
        .await
        .expect("create Secret");
    let mut spec = basic_spec("chart-sa-signed");
    spec["callbackUrl"] = receiver.url("ok", "signed").into();
    spec["signing"] = serde_json::json!({"secretRef": {"name": "webhook-key", "key": "key"}});
    api.create(&PostParams::default(), &subscription("signed", spec)).await.expect("create subscription");
    wait_ready(&api, "signed").await;

    // The REST API's TokenReview and SubjectAccessReview: a producer bound to
    // <fullname>-account-0-writer publishes and creates, updates and deletes a subscription
    // (herald's own rights make the objects); one bound to <fullname>-account-0-reader may
    // search but is refused publishing by the review (not by an error).
    // Cluster-wide bindings, because herald's review names no namespace.
    let event = serde_json::json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": 1}}], "bk_supplier_account": "0",
    });
    let http = reqwest::Client::new();
    let call = async |method: reqwest::Method, path: &str, token: &str, body: &serde_json::Value| {
        let response =
            http.request(method, herald.url(path)).bearer_auth(token).json(body).send().await.expect("REST call");
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.unwrap_or_default())
    };
    let mut bindings = Vec::new();
    let mut tokens = Vec::new();
    for (client, role, publish_status) in [("producer", "account-0-writer", 200), ("viewer", "account-0-reader", 403)] {
        let (token, binding) = release.account_token(&cluster, client, role);
        bindings.push(binding);
        // herald caches review answers for a few seconds; RBAC caches take a moment too.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = call(reqwest::Method::POST, "/api/v3/event/publish", &token, &event).await;
            if status == publish_status {
                break;
            }
            assert!(Instant::now() < deadline, "{client} ({role}) publishing: {status} {body}\n{}", herald.log_text());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokens.push(token);
    }
    let (producer, viewer) = (&tokens[0], &tokens[1]);
    let mut form = serde_json::json!({"subscription_name": "rest", "callback_url": "http://127.0.0.1:9/x", "subscription_form": "hostcreate"});
    let (status, created) = call(reqwest::Method::POST, "/api/v3/event/subscribe/0/0", producer, &form).await;
    let rest_id =
        created["data"]["subscription_id"].as_i64().unwrap_or_else(|| panic!("REST create: {status} {created}"));
    form["subscription_form"] = "hostcreate,hostupdate".into();
    let path = format!("/api/v3/event/subscribe/0/0/{rest_id}");
    let (status, updated) = call(reqwest::Method::PUT, &path, producer, &form).await;
    assert_eq!((status, &updated["result"]), (200, &serde_json::json!(true)), "REST update: {updated}");
    let (status, found) =
        call(reqwest::Method::POST, "/api/v3/event/subscribe/search/0/0", viewer, &serde_json::json!({})).await;
    let ids: Vec<_> =
        found["data"]["info"].as_array().into_iter().flatten().filter_map(|r| r["subscription_id"].as_i64()).collect();
    assert!(status == 200 && ids.contains(&rest_id), "REST search as the viewer: {status} {found}");
    let (status, deleted) = call(reqwest::Method::DELETE, &path, producer, &serde_json::json!({})).await;
    assert_eq!((status, &deleted["result"]), (200, &serde_json::json!(true)), "REST delete: {deleted}");

    let signed = receiver.wait_for("signed", 1, Duration::from_secs(30)).await;
    assert!(signed[0].header("webhook-signature").starts_with("v1,"), "a signed callback: {:?}", signed[0].headers);

    // RBAC denials read `<resource> "<name>" is forbidden: User "<user>" cannot <verb> ...`.
    let log = herald.log_text();
    assert!(!log.contains("is forbidden: User"), "herald hit an RBAC refusal:\n{log}");

    // Outside the chart's rules: other namespaces' Secrets, a Secret of its own namespace
    // not named in the values, listing its own Secrets and ConfigMaps (it reads them by
    // name only).
    for (args, what) in [
        (["get", "secrets", "-n", "kube-system"], "Secrets in kube-system"),
        (["get", "secret/not-named", "-n", ns.name.as_str()], "a Secret not named in signingSecrets"),
        (["get", "secrets", "-n", ns.name.as_str()], "listing Secrets"),
        (["get", "configmaps", "-n", ns.name.as_str()], "listing ConfigMaps"),
    ] {
        let out = kubectl(&kubeconfig, &args);
        assert!(!out.ok && out.stderr.contains("Forbidden"), "{what} must be refused: {out}");
    }
}
