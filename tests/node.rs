//! The chart on a real node: herald's image built here from the Dockerfile
//! (tests/node/image.sh), a kubelet on containerd registered with the test control plane
//! (tests/node/up.sh), and `helm install --wait` of the chart with that image. The test
//! talks to the pod over REST, delivers to a receiver on the node, deletes the pod,
//! upgrades and uninstalls the release. Run by tests/run.sh, which starts the node in a
//! network namespace of its own (loopback only): pods use the host network there.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::helm::*;
use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What tests/node/up.sh wrote into the environment.
struct Node {
    name: String,
    ip: String,
    taint: String,
    image: String,
    storage_class: String,
    apiserver_port: String,
    containerd: String,
}

impl Node {
    fn from_env() -> Node {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the node test with tests/run.sh, which starts the node")
            })
        };
        let apiserver = var("HERALD_NODE_APISERVER");
        Node {
            name: var("HERALD_NODE_NAME"),
            ip: var("HERALD_NODE_IP"),
            taint: var("HERALD_NODE_TAINT"),
            image: var("HERALD_NODE_IMAGE"),
            storage_class: var("HERALD_NODE_STORAGE_CLASS"),
            apiserver_port: apiserver.rsplit_once(':').expect("host:port").1.to_string(),
            containerd: var("HERALD_NODE_CONTAINERD"),
        }
    }

    /// The chart values that put herald on this node: the local image (never pulled), the
    /// host network with herald on `port`, the local volume's class, the node's taint
    /// tolerated, and the API server's loopback address (there is no kube-proxy for the
    /// `kubernetes` Service's cluster IP).
    fn values(&self, port: u16) -> String {
        let (repository, tag) = self.image.rsplit_once(':').expect("image:tag");
        serde_json::json!({
            "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            "hostNetwork": true,
            "containerPort": port,
            "persistence": {"storageClass": self.storage_class, "size": "1Gi"},
            "tolerations": [{"key": self.taint, "operator": "Exists", "effect": "NoSchedule"}],
            "env": [
                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                {"name": "KUBERNETES_SERVICE_PORT", "value": self.apiserver_port},
            ],
            "config": {"callbackGuard": {"allowCidrs": ["127.0.0.0/8"]}},
            "accountRoles": ["0"],
        })
        .to_string()
    }

    /// containerd's tasks (pod sandboxes and containers): id, host PID, status.
    fn tasks(&self) -> Vec<(String, u32, String)> {
        let out = run(std::process::Command::new("ctr").args([
            "--address",
            &self.containerd,
            "--namespace",
            "k8s.io",
            "tasks",
            "ls",
        ]));
        assert!(out.ok, "ctr tasks ls: {out}");
        out.stdout
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (id, pid, status) = (fields.next()?, fields.next()?.parse().ok()?, fields.next()?);
                Some((id.to_string(), pid, status.to_string()))
            })
            .collect()
    }
}

/// The release's one pod once it is Ready (name, container id without its runtime prefix,
/// restart count), failing after `within` with the pod list and events.
async fn ready_pod(cluster: &Cluster, release: &Release, within: Duration) -> (String, String, i64) {
    let selector = format!("app.kubernetes.io/instance={}", release.name);
    eventually(within, "one Ready pod of the release", || {
        let (ok, out, err) = cluster.kubectl(&["get", "pods", "-n", &release.namespace, "-l", &selector, "-o", "json"]);
        if !ok {
            return Err(err);
        }
        let pods: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let running: Vec<&serde_json::Value> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        let [pod] = running.as_slice() else {
            return Err(format!("{} pods", running.len()));
        };
        let ready = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let container = &pod["status"]["containerStatuses"][0];
        match (ready, container["containerID"].as_str()) {
            (true, Some(id)) => Ok((
                pod["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                id.rsplit("://").next().unwrap_or_default().to_string(),
                container["restartCount"].as_i64().unwrap_or(-1),
            )),
            _ => {
                let (_, events, _) = cluster.kubectl(&["get", "events", "-n", &release.namespace]);
                Err(format!("not Ready: {}\n{events}", pod["status"]))
            }
        }
    })
    .await
}

fn host_event(seq: i64) -> serde_json::Value {
    serde_json::json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": seq}, "pre_data": null}],
        "bk_supplier_account": "0",
    })
}

fn host_ids(received: &[common::callback::Received]) -> HashSet<i64> {
    received.iter().filter_map(|r| r.body["data"][0]["cur_data"]["bk_host_id"].as_i64()).collect()
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn helm_install_runs_herald_as_a_pod_that_delivers_and_keeps_accepted_events_across_pods() {
    let cluster = cluster().await;
    let node = Node::from_env();
    // No Pod Security label: the host network is outside the baseline and restricted levels.
    let ns = cluster.namespace("herald-node", &[]).await;
    let port = free_port();
    let values_file = std::env::temp_dir().join(format!("{}-values.json", ns.name));
    std::fs::write(&values_file, node.values(port)).expect("write values");
    let values = values_file.to_str().expect("path");

    let started = Instant::now();
    let release = Release::install(&cluster, &ns, &["--wait", "--timeout", "180s", "--values", values]);
    println!("helm install --wait: {:.1} s", started.elapsed().as_secs_f64());
    let (pod, container, restarts) = ready_pod(&cluster, &release, Duration::from_secs(10)).await;
    let (_, scheduled, _) = cluster.kubectl(&["get", "pod", &pod, "-n", &ns, "-o", "jsonpath={.spec.nodeName}"]);
    assert_eq!(scheduled, node.name, "the pod runs on the test node");
    assert_eq!(restarts, 0, "herald has not been restarted");
    // Ready means the readiness probe passed; the kubelet's probe counters show liveness.
    let probes = format!("/api/v1/nodes/{}/proxy/metrics/probes", node.name);
    eventually(Duration::from_secs(30), "a successful liveness probe and no failed ones", || {
        let (ok, metrics, err) = cluster.kubectl(&["get", "--raw", &probes]);
        let count = |result: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.contains(&format!("pod=\"{pod}\"")) && l.contains("probe_type=\"Liveness\""))
                .filter(|l| l.contains(&format!("result=\"{result}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        match (ok, count("successful"), count("failed")) {
            (true, passed, 0.0) if passed >= 1.0 => Ok(()),
            (true, passed, failed) => Err(format!("{passed} passed, {failed} failed")),
            (false, ..) => Err(err),
        }
    })
    .await;

    // The chart's security settings, as the kernel sees the process.
    let tasks = node.tasks();
    let pid = tasks.iter().find(|(id, ..)| *id == container).map(|(_, pid, _)| *pid);
    let pid = pid.unwrap_or_else(|| panic!("container {container} among containerd's tasks: {tasks:?}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_default().to_string();
    assert_eq!(field("Uid:").split_whitespace().collect::<Vec<_>>(), ["65532"; 4], "non-root: {status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "no capabilities");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let root = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).expect("a root mount");
    assert!(root.split_whitespace().nth(5).is_some_and(|o| o.split(',').any(|o| o == "ro")), "read-only root: {root}");

    // REST through the node's port, with a token bound to the chart's account-0 writer role.
    let (token, _binding) = release.account_token(&cluster, "producer", "account-0-writer");
    let base = format!("http://{}:{port}", node.ip);
    let http = reqwest::Client::new();
    let receiver = CallbackServer::start().await;
    let form = serde_json::json!({
        "subscription_name": "on-node", "callback_url": receiver.url("slow-50", "on-node"),
        "subscription_form": "hostcreate",
    });
    // herald caches review answers for a few seconds; RBAC caches take a moment too.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let response = http
            .post(format!("{base}/api/v3/event/subscribe/0/0"))
            .bearer_auth(&token)
            .json(&form)
            .send()
            .await
            .expect("REST create");
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        if let Some(id) = answer["data"]["subscription_id"].as_i64() {
            break id;
        }
        assert!(Instant::now() < deadline, "REST create: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // kubectl sees it, with its id, in herald's namespace.
    let api = cluster.subscriptions(&ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .any(|s| common::id(s) == Some(id) && ready(s).is_some_and(|(status, _)| status == "True"))
    {
        assert!(Instant::now() < deadline, "subscription {id} Ready in kubectl");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A producer publishes through the pod deletion; acknowledged events are the accepted ones.
    let acknowledged = Arc::new(Mutex::new(Vec::<i64>::new()));
    let refused = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let publish = {
        let (acknowledged, refused, stop, token) = (acknowledged.clone(), refused.clone(), stop.clone(), token.clone());
        let url = format!("{base}/api/v3/event/publish");
        tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
            let mut next = 1;
            while !stop.load(Ordering::Relaxed) {
                // A burst first, so that a backlog is on the volume when the pod goes.
                let size = if next == 1 { 100 } else { 5 };
                let batch: Vec<serde_json::Value> = (next..next + size).map(host_event).collect();
                let answer = client.post(&url).bearer_auth(&token).json(&batch).send().await;
                match answer {
                    Ok(a) if a.status().is_success() => acknowledged.lock().unwrap().extend(next..next + size),
                    _ => *refused.lock().unwrap() += 1,
                }
                next += size;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    eventually(Duration::from_secs(30), "the first burst acknowledged", || {
        if acknowledged.lock().unwrap().len() >= 100 {
            Ok(())
        } else {
            Err(format!("{} acknowledged", acknowledged.lock().unwrap().len()))
        }
    })
    .await;
    receiver.wait_for("on-node", 1, Duration::from_secs(30)).await;
    let (ok, _, err) = cluster.kubectl(&["delete", "pod", &pod, "-n", &ns, "--wait=false"]);
    assert!(ok, "kubectl delete pod: {err}");
    let delivered_before = receiver.received("on-node").len();
    let accepted_before = acknowledged.lock().unwrap().len();
    assert!(delivered_before < accepted_before, "a backlog was queued when the pod went");
    let (replacement, _, _) = ready_pod(&cluster, &release, Duration::from_secs(120)).await;
    assert_ne!(replacement, pod, "the Deployment made a new pod");
    // Keep publishing to the new pod for a moment, then stop.
    let resumed = acknowledged.lock().unwrap().len();
    eventually(Duration::from_secs(30), "publishes acknowledged by the new pod", || {
        if acknowledged.lock().unwrap().len() > resumed { Ok(()) } else { Err("none".to_string()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    publish.await.expect("producer");
    let accepted = acknowledged.lock().unwrap().clone();
    println!(
        "pod deletion: {} events accepted ({accepted_before} before it, {delivered_before} of them delivered by then), {} publishes refused while no pod listened",
        accepted.len(),
        refused.lock().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = host_ids(&receiver.received("on-node"));
        let missing: Vec<&i64> = accepted.iter().filter(|s| !seen.contains(s)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{} accepted events never delivered: {missing:?}", missing.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // An upgrade with changed values rolls the pod; herald carries on with the same store.
    let started = Instant::now();
    let out =
        release.upgrade(&["--wait", "--timeout", "180s", "--values", values, "--set", "resources.limits.memory=640Mi"]);
    assert!(out.ok, "helm upgrade: {out}");
    println!("helm upgrade --wait: {:.1} s", started.elapsed().as_secs_f64());
    let (upgraded, _, _) = ready_pod(&cluster, &release, Duration::from_secs(10)).await;
    assert_ne!(upgraded, replacement, "the upgrade rolled the pod");
    let (_, limit, _) = cluster.kubectl(&[
        "get",
        "pod",
        &upgraded,
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.containers[0].resources.limits.memory}",
    ]);
    assert_eq!(limit, "640Mi");
    let before = receiver.received("on-node").len();
    let response = http
        .post(format!("{base}/api/v3/event/publish"))
        .bearer_auth(&token)
        .json(&host_event(1_000_000))
        .send()
        .await
        .expect("publish after upgrade");
    assert!(response.status().is_success(), "publish after upgrade: {}", response.status());
    // Count alone would not do: the new pod may first redeliver what the old one had not
    // committed (at least once).
    receiver.wait_for("on-node", before + 1, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(30), "the upgraded pod delivers to the same subscription", || {
        if host_ids(&receiver.received("on-node")).contains(&1_000_000) { Ok(()) } else { Err("not yet".into()) }
    })
    .await;

    // Uninstall: no object of the release and no container on the node remain.
    let out = release.uninstall();
    assert!(out.ok, "helm uninstall: {out}");
    let selector = format!("app.kubernetes.io/instance={}", release.name);
    eventually(Duration::from_secs(90), "nothing of the release left", || {
        let (_, objects, _) = cluster.kubectl(&[
            "get",
            "deployment,replicaset,pod,service,configmap,serviceaccount,role,rolebinding,persistentvolumeclaim",
            "-n",
            &ns,
            "-l",
            &selector,
            "-o",
            "name",
        ]);
        let (_, cluster_objects, _) =
            cluster.kubectl(&["get", "clusterrole,clusterrolebinding", "-l", &selector, "-o", "name"]);
        let tasks: Vec<_> = node.tasks().into_iter().filter(|(.., status)| status == "RUNNING").collect();
        if objects.trim().is_empty() && cluster_objects.trim().is_empty() && tasks.is_empty() {
            Ok(())
        } else {
            Err(format!("{objects}{cluster_objects}{tasks:?}"))
        }
    })
    .await;
}
