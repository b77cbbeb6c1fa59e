//! Test harness for the integration tests: the real control plane started by
//! `tests/run.sh`, per-test namespaces, and herald as a real child process.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod browser;
pub mod callback;
pub mod cmdb;
pub mod helm;
pub mod launch;

#[allow(unused_imports)] // each test binary uses a different part of the harness
pub use launch::{Launch, free_port};

use herald::crd::EventSubscription;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The control plane of `tests/run.sh`. Tests that need it fail (never skip) without it.
pub struct Cluster {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub tools: PathBuf,
}

pub async fn cluster() -> Cluster {
    let kubeconfig = PathBuf::from(std::env::var("HERALD_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!("HERALD_TEST_KUBECONFIG is not set: run the integration tests with tests/run.sh, which starts the control plane")
    }));
    let tools = PathBuf::from(std::env::var("HERALD_TOOLS_BIN").expect("HERALD_TOOLS_BIN is set by tests/run.sh"));
    let kc = Kubeconfig::read_from(&kubeconfig).expect("readable kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("valid kubeconfig");
    let client = Client::try_from(config).expect("kube client");
    Cluster { client, kubeconfig, tools }
}

static HERALD_PROCESSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Herald watches the whole cluster, so tests that run herald processes take turns.
/// An async lock: each test has its own runtime, and a failed test must not poison it.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    HERALD_PROCESSES.lock().await
}

/// A name no other test of this run has used: the counter separates the tests of one
/// binary (sixteen bits of the clock alone once collided with a namespace still being
/// deleted), the process id and the clock separate binaries and runs.
fn unique(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let count = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    format!("{prefix}-{:x}-{count:x}-{nanos:x}", std::process::id())
}

impl Cluster {
    /// A fresh namespace, deleted when the returned guard drops (even when the test
    /// fails) unless HERALD_TEST_KEEP is set, with extra labels (for example the
    /// tenancy label `herald.dev/supplier-accounts`).
    pub async fn namespace(&self, prefix: &str, labels: &[(&str, &str)]) -> TestNamespace {
        let name = unique(prefix);
        let mut all = BTreeMap::from([("herald.dev/test".to_string(), "true".to_string())]);
        all.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), labels: Some(all), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        TestNamespace { name, kubectl: self.tools.join("kubectl"), kubeconfig: self.kubeconfig.clone() }
    }

    /// Creates an object from raw JSON, bypassing the Rust types (which would refuse
    /// the invalid specs the API server must refuse).
    pub async fn create_raw(&self, namespace: &str, object: serde_json::Value) -> Result<DynamicObject, kube::Error> {
        let resource = ApiResource::erase::<EventSubscription>(&());
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &resource);
        let object: DynamicObject = serde_json::from_value(object).expect("object JSON");
        api.create(&PostParams::default(), &object).await
    }

    /// A ServiceAccount in `namespace` and a token for it with `audience`.
    pub fn service_account_token(&self, namespace: &str, name: &str, audience: &str) -> String {
        let _ = self.kubectl(&["create", "serviceaccount", name, "-n", namespace]);
        let (ok, token, err) =
            self.kubectl(&["create", "token", name, "-n", namespace, "--audience", audience, "--duration", "1h"]);
        assert!(ok, "create token: {err}");
        token.trim().to_string()
    }

    /// Grants a ServiceAccount `verbs` on the virtual `supplieraccounts` resource for
    /// `accounts` (cluster-scoped objects named after the namespace, so tests do not clash).
    pub fn grant_accounts(&self, namespace: &str, service_account: &str, verbs: &[&str], accounts: &[&str]) {
        let role = format!("{namespace}-{service_account}");
        let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role},
             "rules": [{"apiGroups": ["herald.dev"], "resources": ["supplieraccounts"], "resourceNames": accounts, "verbs": verbs}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": role},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
             "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
        ]});
        let file = std::env::temp_dir().join(format!("{role}-grant.json"));
        std::fs::write(&file, manifest.to_string()).expect("write grant");
        let (ok, _, err) = self.kubectl(&["apply", "-f", file.to_str().expect("path")]);
        assert!(ok, "grant: {err}");
    }

    /// Stops one control-plane component (its PID from tests/run.sh's state directory).
    pub fn stop_component(&self, name: &str) {
        let state = PathBuf::from(std::env::var("HERALD_CONTROLPLANE").expect("HERALD_CONTROLPLANE"));
        let pid = std::fs::read_to_string(state.join(format!("{name}.pid"))).expect("pid file");
        let _ = Command::new("kill").arg(pid.trim()).status();
        for _ in 0..100 {
            if !Command::new("kill").args(["-0", pid.trim()]).status().is_ok_and(|s| s.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
    }

    /// Starts a stopped component again with its recorded command line, and for the
    /// API server waits until it is ready. Blocking, so that a guard's drop can call it.
    pub fn start_component(&self, name: &str) {
        let state = PathBuf::from(std::env::var("HERALD_CONTROLPLANE").expect("HERALD_CONTROLPLANE"));
        let script = format!(
            "cd {state} && {{ eval \"exec $(cat {name}.cmd)\" >> {name}.log 2>&1 & echo $! > {name}.pid; }}",
            state = state.display()
        );
        let status = Command::new("bash").args(["-c", &script]).status().expect("restart component");
        assert!(status.success());
        if name == "kube-apiserver" {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self.kubectl(&["get", "--raw", "/readyz"]).0 {
                assert!(Instant::now() < deadline, "kube-apiserver did not come back");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    /// Stops `name` until the returned guard drops (also when the test fails).
    pub fn outage(&self, name: &'static str) -> Outage<'_> {
        self.stop_component(name);
        Outage { cluster: self, name }
    }

    /// A kubeconfig for the test cluster (server and CA of $HERALD_TEST_KUBECONFIG) that
    /// authenticates with `token` only.
    pub fn kubeconfig_with_token(&self, file: &std::path::Path, token: &str) -> PathBuf {
        let admin: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&self.kubeconfig).expect("read kubeconfig"))
                .expect("kubeconfig YAML");
        let context_name = admin["current-context"].as_str().expect("current-context");
        let contexts = admin["contexts"].as_sequence().expect("contexts");
        let context = contexts.iter().find(|c| c["name"].as_str() == Some(context_name)).expect("current context");
        let cluster_name = context["context"]["cluster"].as_str().expect("context cluster");
        let clusters = admin["clusters"].as_sequence().expect("clusters");
        let entry = clusters.iter().find(|c| c["name"].as_str() == Some(cluster_name)).expect("cluster entry");
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": entry["cluster"]["server"].as_str().expect("server"),
                "certificate-authority": entry["cluster"]["certificate-authority"].as_str().expect("certificate-authority path"),
            }}],
            "users": [{"name": "token", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "token"}}],
            "current-context": "test",
        });
        std::fs::write(file, serde_yaml::to_string(&config).expect("kubeconfig YAML")).expect("write kubeconfig");
        file.to_path_buf()
    }

    /// A client acting as a team member who holds nothing but namespace edit rights on
    /// herald's resources in `namespace` (the rules of the chart's `<fullname>-edit`, in a
    /// Role there): a ServiceAccount's token, nothing cluster-wide.
    pub async fn namespace_editor(&self, namespace: &str) -> Client {
        let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "herald-editor", "namespace": namespace},
             "rules": [{"apiGroups": ["herald.dev"], "resources": ["eventsubscriptions", "cmdbsources"],
                        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "herald-editor", "namespace": namespace},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "herald-editor"},
             "subjects": [{"kind": "ServiceAccount", "name": "editor", "namespace": namespace}]},
        ]});
        let file = std::env::temp_dir().join(format!("{namespace}-editor.json"));
        std::fs::write(&file, manifest.to_string()).expect("write editor role");
        let (ok, _, err) = self.kubectl(&["apply", "-f", file.to_str().expect("path")]);
        assert!(ok, "editor role: {err}");
        let token = self.service_account_token(namespace, "editor", "https://kubernetes.default.svc");
        let kubeconfig =
            self.kubeconfig_with_token(&std::env::temp_dir().join(format!("{namespace}-editor.kubeconfig")), &token);
        let kc = Kubeconfig::read_from(&kubeconfig).expect("editor kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("editor kubeconfig");
        Client::try_from(config).expect("editor client")
    }

    pub fn subscriptions(&self, namespace: &str) -> Api<EventSubscription> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Runs the test control plane's kubectl; returns (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(self.tools.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

pub struct Outage<'a> {
    cluster: &'a Cluster,
    name: &'static str,
}

impl Drop for Outage<'_> {
    fn drop(&mut self) {
        self.cluster.start_component(self.name);
    }
}

pub struct TestNamespace {
    pub name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl std::ops::Deref for TestNamespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("HERALD_TEST_KEEP").is_none() {
            let _ = Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["delete", "namespace", &self.name, "--wait=false"])
                .output();
        }
    }
}

/// A herald process (`herald run`) against the test cluster.
pub struct Herald {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// "https" when herald serves TLS.
    pub scheme: &'static str,
}

impl Herald {
    /// Starts herald with `namespace` as its own namespace and `config_yaml` merged over
    /// the test defaults (a store of its own, loopback callbacks allowed, anonymous API),
    /// and waits until /readyz answers 200. The instance name follows the namespace, so
    /// a restarted herald takes its predecessor's Lease at once.
    pub async fn start(cluster: &Cluster, namespace: &str, config_yaml: &str) -> Herald {
        let dir = std::env::temp_dir().join(unique("herald-test"));
        Herald::start_in(cluster, namespace, config_yaml, &dir).await
    }

    /// Like `start`, with the store and logs in `dir` (reuse it to restart on the same store).
    pub async fn start_in(cluster: &Cluster, namespace: &str, config_yaml: &str, dir: &std::path::Path) -> Herald {
        let mut herald = Herald::spawn(cluster, namespace, config_yaml, dir, &format!("herald-{namespace}"));
        herald.wait_ready(Duration::from_secs(60)).await;
        herald
    }

    /// Starts herald as instance `instance` without waiting for readiness.
    pub fn spawn(
        cluster: &Cluster,
        namespace: &str,
        config_yaml: &str,
        dir: &std::path::Path,
        instance: &str,
    ) -> Herald {
        let launch = Launch { config_yaml, ..Launch::new(&cluster.kubeconfig, namespace, instance, dir) };
        Herald::from_launch(&launch)
    }

    /// Starts herald as `launch` says, without waiting for readiness.
    pub fn from_launch(launch: &Launch<'_>) -> Herald {
        let launched = launch.spawn();
        let scheme = if launched.config["api"]["tls"].is_mapping() { "https" } else { "http" };
        Herald { child: launched.child, port: launched.port, log: launched.log, scheme }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// Whether /readyz answers 200 now.
    pub async fn is_ready(&self) -> bool {
        let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().expect("client");
        client.get(self.url("/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    }

    pub async fn wait_ready(&mut self, within: Duration) {
        // Readiness only; tests that check TLS itself verify the certificate.
        let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().expect("client");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("herald exited with {status}; log:\n{}", self.log_text());
            }
            if let Ok(resp) = client.get(self.url("/readyz")).send().await
                && resp.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("herald not ready within {within:?}; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit status and how long the shutdown took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait().expect("wait herald");
        (status, started.elapsed())
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `Name: value kB` field of a /proc file, in kB.
fn kb_field(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in {file}"))
}

/// A field of /proc/PID/status in kB (VmHWM, VmRSS).
pub fn proc_kb(pid: u32, field: &str) -> u64 {
    kb_field(&format!("/proc/{pid}/status"), field)
}

/// The machine's memory in MB (/proc/meminfo MemTotal), printed beside memory figures.
pub fn machine_memory_mb() -> u64 {
    kb_field("/proc/meminfo", "MemTotal") / 1024
}

/// The `Ready` condition's (status, reason), if any.
pub fn ready(sub: &EventSubscription) -> Option<(String, String)> {
    sub.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone()))
}

pub fn id(sub: &EventSubscription) -> Option<i64> {
    sub.status.as_ref()?.subscription_id
}

/// Waits until `name` satisfies `condition`, failing the test after `within`.
pub async fn wait_for(
    api: &Api<EventSubscription>,
    name: &str,
    within: Duration,
    what: &str,
    condition: impl Fn(&EventSubscription) -> bool,
) -> EventSubscription {
    let cond = move |obj: Option<&EventSubscription>| obj.is_some_and(&condition);
    match tokio::time::timeout(within, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => obj,
        other => {
            let current = api.get_opt(name).await.ok().flatten();
            panic!(
                "{name}: not {what} within {within:?} ({:?}); last seen: {:#?}",
                other.map(|r| r.map(|o| o.map(|o| o.name_any()))),
                current.map(|c| c.status)
            )
        }
    }
}

/// Retries `check` every 300 ms until it passes, failing after `within` with its last word.
pub async fn wait_until(within: Duration, what: &str, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(()) => return,
            Err(last) => assert!(Instant::now() < deadline, "{what} within {within:?}: {last}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn wait_ready(api: &Api<EventSubscription>, name: &str) -> EventSubscription {
    wait_for(api, name, Duration::from_secs(30), "Ready=True", |s| ready(s).is_some_and(|(status, _)| status == "True"))
        .await
}

pub async fn wait_reason(api: &Api<EventSubscription>, name: &str, reason: &str) -> EventSubscription {
    wait_for(api, name, Duration::from_secs(30), reason, |s| {
        ready(s).is_some_and(|(status, r)| status == "False" && r == reason)
    })
    .await
}

/// An EventSubscription from YAML-like JSON.
pub fn subscription(name: &str, spec: serde_json::Value) -> EventSubscription {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "herald.dev/v1alpha1",
        "kind": "EventSubscription",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("valid EventSubscription")
}

/// herald's config for the JetStream engine on the test cluster (tests/nats/up.sh,
/// `HERALD_TEST_NATS_URLS`), with streams of its own (`stream`).
pub fn jetstream_config(stream: &str) -> String {
    let urls = std::env::var("HERALD_TEST_NATS_URLS").expect("HERALD_TEST_NATS_URLS is set by tests/run.sh");
    launch::jetstream_config_for(&urls, stream)
}

pub fn basic_spec(subscription_name: &str) -> serde_json::Value {
    serde_json::json!({
        "subscriptionName": subscription_name,
        "callbackUrl": "http://127.0.0.1:9/events",
        "events": ["hostcreate"],
    })
}
