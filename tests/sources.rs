//! Event sources against the real API server, herald as a real process, the bk-cmdb watch
//! emulator (its own process, tests/cmdb_emulator) and real callback receivers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::cmdb::{Emulator, request_id};
use common::{Herald, cluster, exclusive, subscription};
use herald::crd::CmdbSource;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

fn source(name: &str, spec: Value) -> CmdbSource {
    serde_json::from_value(json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "CmdbSource", "metadata": {"name": name}, "spec": spec,
    }))
    .expect("a CmdbSource")
}

fn condition(source: &CmdbSource, type_: &str) -> Option<(String, String, String)> {
    source
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the source satisfies `test`, failing after `within` with its status.
async fn wait_source(
    api: &Api<CmdbSource>,
    name: &str,
    within: Duration,
    what: &str,
    test: impl Fn(&CmdbSource) -> bool,
) -> CmdbSource {
    let deadline = Instant::now() + within;
    loop {
        let current = api.get(name).await.expect("get source");
        if test(&current) {
            return current;
        }
        assert!(Instant::now() < deadline, "{name}: not {what} within {within:?}: {:#?}", current.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reasons of the Events recorded in `namespace`.
async fn event_reasons(cluster: &common::Cluster, namespace: &str) -> HashSet<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cluster.client.clone(), namespace);
    events.list(&ListParams::default()).await.expect("list Events").items.into_iter().filter_map(|e| e.reason).collect()
}

/// The lines of herald's `/metrics` that start with `name{` and hold every one of `parts`.
async fn metric_lines(herald: &Herald, name: &str, parts: &[&str]) -> Vec<String> {
    let metrics = reqwest::get(herald.url("/metrics")).await.expect("metrics").text().await.expect("metrics text");
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && parts.iter().all(|p| l.contains(p)))
        .map(str::to_string)
        .collect()
}

fn is(type_: &'static str, status: &'static str) -> impl Fn(&CmdbSource) -> bool {
    move |s| condition(s, type_).is_some_and(|(st, _, _)| st == status)
}

/// `Ready=False` for this reason (not merely not yet Ready: `Starting` comes first).
fn refused(reason: &'static str) -> impl Fn(&CmdbSource) -> bool {
    move |s| condition(s, "Ready").is_some_and(|(status, r, _)| status == "False" && r == reason)
}

/// A subscription `name` to `events` whose callback is `receiver`'s key `name` (answering
/// 200), with `extra` spec fields; waits until it is Ready.
async fn subscribe(
    herald_ns: &str,
    cluster: &common::Cluster,
    receiver: &CallbackServer,
    name: &str,
    events: &[&str],
    extra: Value,
) {
    let mut spec = json!({"subscriptionName": name, "callbackUrl": receiver.url("ok", name), "events": events});
    if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    let api = cluster.subscriptions(herald_ns);
    api.create(&PostParams::default(), &subscription(name, spec)).await.expect("create subscription");
    common::wait_ready(&api, name).await;
}

fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-sources-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Sources in herald's namespace may reach the emulator on loopback.
const CONFIG: &str = "sources: {ownNamespaceAllowCidrs: ['127.0.0.0/8']}\n";

/// herald (its store in `dir`), the emulator, a receiver, a subscription `hosts` to
/// hostcreate and a Ready source `cmdb` watching host with field list [bk_host_id].
struct HostWatch {
    cluster: common::Cluster,
    ns: common::TestNamespace,
    emulator: Emulator,
    receiver: CallbackServer,
    dir: std::path::PathBuf,
    herald: Herald,
    sources: Api<CmdbSource>,
}

async fn host_watch(name: &str) -> HostWatch {
    let cluster = cluster().await;
    let ns = cluster.namespace(&format!("src-{name}"), &[]).await;
    let emulator = Emulator::start(&test_dir(name), &[]).await;
    let receiver = CallbackServer::start().await;
    let dir = test_dir(&format!("{name}-herald"));
    let herald = Herald::start_in(&cluster, &ns, CONFIG, &dir).await;
    subscribe(&ns, &cluster, &receiver, "hosts", &["hostcreate"], json!({})).await;
    let sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    let spec = json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0", "resources": [{"resource": "host", "fields": ["bk_host_id"]}]});
    sources.create(&PostParams::default(), &source("cmdb", spec)).await.expect("create source");
    wait_source(&sources, "cmdb", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    HostWatch { cluster, ns, emulator, receiver, dir, herald, sources }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn watched_changes_reach_matching_subscriptions_in_the_v3_5_layout() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-map", &[]).await;
    let emulator = Emulator::start(&test_dir("map"), &[]).await;
    let receiver = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, CONFIG).await;
    let every = [
        "hostcreate",
        "hostupdate",
        "hostdelete",
        "moduletransfer",
        "setcreate",
        "setupdate",
        "switchcreate",
        "switchupdate",
        "routercreate",
        "cluster_levelcreate",
        "processmodule",
    ];
    subscribe(&ns, &cluster, &receiver, "all", &every, json!({})).await;
    subscribe(&ns, &cluster, &receiver, "updates", &["hostupdate"], json!({})).await;
    subscribe(&ns, &cluster, &receiver, "other", &every, json!({"supplierAccount": "1"})).await;

    let sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    let spec = json!({
        "url": emulator.url(), "api": "direct", "supplierAccount": "0", "preImages": true,
        "resources": [
            {"resource": "host", "fields": ["bk_host_id", "bk_host_innerip"]},
            {"resource": "host_relation"},
            {"resource": "set", "eventTypes": ["create"]},
            {"resource": "object_instance", "objects": ["switch"]},
            {"resource": "mainline_instance"},
            {"resource": "process_instance_relation"},
        ],
    });
    sources.create(&PostParams::default(), &source("cmdb", spec)).await.expect("create source");
    wait_source(&sources, "cmdb", Duration::from_secs(30), "Ready", is("Ready", "True")).await;

    let host =
        json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.7", "bk_os_name": "linux", "bk_supplier_account": "0"});
    let moved =
        json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.8", "bk_os_name": "linux", "bk_supplier_account": "0"});
    let host_cursors =
        emulator.emit("host", &[("create", host.clone()), ("update", moved.clone()), ("delete", moved.clone())]).await;
    let row = json!({"bk_biz_id": 1, "bk_set_id": 2, "bk_module_id": 3, "bk_host_id": 7, "bk_supplier_account": "0"});
    emulator.emit("host_relation", &[("create", row.clone())]).await;
    let set = json!({"bk_set_id": 2, "bk_set_name": "web", "bk_biz_id": 1, "bk_supplier_account": "0"});
    let renamed = json!({"bk_set_id": 2, "bk_set_name": "www", "bk_biz_id": 1, "bk_supplier_account": "0"});
    emulator.emit("set", &[("create", set.clone()), ("update", renamed)]).await;
    let switch = json!({"bk_obj_id": "switch", "bk_inst_id": 4, "bk_inst_name": "sw-4", "bk_supplier_account": "0"});
    let router = json!({"bk_obj_id": "router", "bk_inst_id": 5, "bk_inst_name": "r-5", "bk_supplier_account": "0"});
    emulator.emit("object_instance", &[("create", switch.clone()), ("create", router)]).await;
    let level =
        json!({"bk_obj_id": "cluster_level", "bk_inst_id": 8, "bk_inst_name": "east", "bk_supplier_account": "0"});
    emulator.emit("mainline_instance", &[("create", level.clone())]).await;
    let binding = json!({"bk_biz_id": 1, "bk_process_id": 11, "service_instance_id": 12, "process_template_id": 0, "bk_host_id": 7, "bk_supplier_account": "0"});
    emulator.emit("process_instance_relation", &[("create", binding.clone())]).await;
    // A change of another account's instance, which this source must not publish.
    emulator.emit("host", &[("create", json!({"bk_host_id": 9, "bk_supplier_account": "1"}))]).await;

    // host ×3, moduletransfer, setcreate (not setupdate: eventTypes), switchcreate (not the router).
    let all = receiver.wait_for("all", 8, Duration::from_secs(30)).await;
    let by_name: HashMap<String, &Value> = all
        .iter()
        .map(|r| {
            let b = &r.body;
            let name = match b["event_type"].as_str() {
                Some("relation") => b["obj_type"].as_str().unwrap().to_string(),
                _ => format!("{}{}", b["obj_type"].as_str().unwrap(), b["action"].as_str().unwrap()),
            };
            (name, b)
        })
        .collect();
    let names: HashSet<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        HashSet::from([
            "hostcreate",
            "hostupdate",
            "hostdelete",
            "moduletransfer",
            "setcreate",
            "switchcreate",
            "cluster_levelcreate",
            "processmodule"
        ])
    );
    // Field list honoured (bk_os_name not asked for), pre-images from the last detail seen,
    // the deleted record as pre_data.
    let projected = json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.7", "bk_supplier_account": "0"});
    let projected_moved = json!({"bk_host_id": 7, "bk_host_innerip": "10.0.0.8", "bk_supplier_account": "0"});
    assert_eq!(by_name["hostcreate"]["data"], json!([{"cur_data": projected, "pre_data": null}]));
    assert_eq!(by_name["hostupdate"]["data"], json!([{"cur_data": projected_moved, "pre_data": projected}]));
    assert_eq!(by_name["hostdelete"]["data"], json!([{"cur_data": null, "pre_data": projected_moved}]));
    assert_eq!(by_name["hostcreate"]["request_id"], request_id(&host_cursors[0]));
    assert_eq!(by_name["hostcreate"]["event_type"], "instdata");
    assert_eq!(by_name["hostcreate"]["bk_supplier_account"], "0");
    assert_eq!(by_name["moduletransfer"]["event_type"], "relation");
    assert_eq!(by_name["moduletransfer"]["action"], "create");
    assert_eq!(by_name["moduletransfer"]["data"], json!([{"cur_data": row, "pre_data": null}]));
    assert_eq!(by_name["setcreate"]["data"][0]["cur_data"]["bk_set_name"], "web");
    assert_eq!(by_name["switchcreate"]["obj_type"], "switch");
    assert_eq!(by_name["switchcreate"]["data"][0]["cur_data"], switch);
    let ids: Vec<i64> = all.iter().map(common::callback::Received::distribution_id).collect();
    assert_eq!(by_name["cluster_levelcreate"]["event_type"], "instdata");
    assert_eq!(by_name["cluster_levelcreate"]["data"], json!([{"cur_data": level, "pre_data": null}]));
    assert_eq!(by_name["processmodule"]["event_type"], "relation");
    assert_eq!(by_name["processmodule"]["action"], "create");
    assert_eq!(by_name["processmodule"]["data"], json!([{"cur_data": binding, "pre_data": null}]));
    assert_eq!(ids.iter().copied().collect::<HashSet<_>>(), (1..=8).collect(), "{ids:?}");

    let updates = receiver.wait_for("updates", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.received("updates").len(), 1, "only hostupdate: {updates:?}");
    assert_eq!(receiver.received("all").len(), 8, "nothing more (no setupdate, router or account 1 host)");
    assert!(receiver.received("other").is_empty(), "a subscription for account 1 receives nothing");

    // Status: per-resource positions, within the write budget.
    // Each resource's watch counts on its own; a status snapshot may catch some before others.
    let expected: BTreeMap<String, i64> = BTreeMap::from([
        ("Host".into(), 4),
        ("HostRelation".into(), 1),
        ("MainlineInstance".into(), 1),
        ("ObjectInstance".into(), 2),
        ("ProcessInstanceRelation".into(), 1),
        ("Set".into(), 2),
    ]);
    wait_source(&sources, "cmdb", Duration::from_secs(30), "every resource counted, with a cursor and no lag", |s| {
        s.status.as_ref().is_some_and(|st| {
            let read: BTreeMap<String, i64> =
                st.resources.iter().map(|r| (format!("{:?}", r.resource), r.events_read)).collect();
            read == expected && st.resources.iter().all(|r| r.cursor.is_some() && r.lag_seconds == 0)
        })
    })
    .await;
    let printed = cluster.kubectl(&["get", "csrc", "-n", &ns, "cmdb"]);
    assert!(printed.0 && printed.1.contains("READY") && printed.1.contains("True"), "{printed:?}");
    drop(herald);
}

/// SIGKILL at seeded random points while 5,000 host changes stream, each restart followed
/// by a spec change (which restarts the watch loop too): each watch event is published
/// exactly once (one distribution id per cursor, contiguous from 1, in the stream's order)
/// and delivered to both subscriptions of it (in order where maxInFlight is 1), with
/// redeliveries only within the crash bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn sigkill_while_watch_events_stream_publishes_each_exactly_once() {
    let _turn = exclusive().await;
    let seed: u64 = std::env::var("HERALD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    let mut rng = fastrand::Rng::with_seed(seed);
    const EVENTS: usize = 5000;
    const ROUNDS: usize = 10;
    println!("seed {seed} (HERALD_FAULTS_SEED), {EVENTS} events, {ROUNDS} kills");
    let HostWatch { cluster, ns, emulator, receiver, dir, mut herald, sources } = host_watch("kill").await;
    // A second subscription of the same changes, out of order (maxInFlight 4).
    subscribe(&ns, &cluster, &receiver, "wide", &["hostcreate"], json!({"maxInFlight": 4})).await;
    let control = emulator.control();
    let producer = tokio::spawn(async move {
        let mut cursors = Vec::new();
        for batch in 0..EVENTS / 50 {
            let hosts: Vec<(&str, Value)> = (0..50)
                .map(|i| ("create", json!({"bk_host_id": batch * 50 + i + 1, "bk_supplier_account": "0"})))
                .collect();
            cursors.extend(control.emit("host", &hosts).await);
            // Paced so that the stream outlasts the ten crashes.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        cursors
    });
    let mut kills = Vec::new();
    for round in 0..ROUNDS {
        let delay = Duration::from_millis(rng.u64(500..3000));
        tokio::time::sleep(delay).await;
        kills.push(Instant::now());
        herald.kill();
        println!("round {round}: SIGKILL after {delay:?}, {} received so far", receiver.received("hosts").len());
        herald = Herald::start_in(&cluster, &ns, CONFIG, &dir).await;
        // A spec change restarts the watch as well: the old loop's page must be committed
        // before the new loop reads the position.
        let edit = json!({"spec": {"preImageLimit": round + 1}});
        sources.patch("cmdb", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&edit)).await.unwrap();
    }
    let cursors = producer.await.unwrap();
    assert_eq!(cursors.len(), EVENTS);
    for (key, max_in_flight) in [("hosts", 1usize), ("wide", 4)] {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let seen: HashSet<i64> =
                receiver.received(key).iter().map(common::callback::Received::distribution_id).collect();
            if seen.len() >= EVENTS {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{key}: {} of {EVENTS} delivered; log: {}",
                seen.len(),
                herald.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let received = receiver.received(key);
        // Exactly once into herald: each cursor has exactly one distribution id, and the ids
        // are 1..=5000 in the stream's order.
        let mut by_request: HashMap<String, HashSet<i64>> = HashMap::new();
        for r in &received {
            let id = r.body["request_id"].as_str().unwrap().to_string();
            by_request.entry(id).or_default().insert(r.distribution_id());
        }
        for (k, cursor) in cursors.iter().enumerate() {
            let ids = by_request.get(&request_id(cursor)).unwrap_or_else(|| panic!("{key}: event {k} never delivered"));
            assert_eq!(ids, &HashSet::from([k as i64 + 1]), "{key}: event {k} was published {} times", ids.len());
        }
        assert_eq!(by_request.len(), EVENTS, "{key}: nothing but the stream's events");
        if max_in_flight == 1 {
            let mut seen = HashSet::new();
            let firsts: Vec<i64> =
                received.iter().map(common::callback::Received::distribution_id).filter(|d| seen.insert(*d)).collect();
            assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{key}: first receipts in order");
        }
        let mut per_epoch = vec![0usize; kills.len() + 1];
        let mut once = HashSet::new();
        for r in &received {
            if !once.insert(r.distribution_id()) {
                per_epoch[kills.iter().filter(|k| **k < r.at).count()] += 1;
            }
        }
        println!("{key}: redeliveries per epoch (epoch k follows the k-th SIGKILL): {per_epoch:?}");
        let bound = max_in_flight + 64;
        assert!(
            per_epoch.iter().all(|d| *d <= bound),
            "{key}: within maxInFlight + one commit batch per crash: {per_epoch:?}"
        );
    }
}

/// bk-cmdb down for a minute (5xx) and restarted: herald recovers by itself, `Connected`
/// goes False and back, nothing emitted meanwhile is lost. Wrong ESB credentials: not
/// Ready with the reason, and a bounded number of requests. Right credentials through ESB
/// and through the API gateway: delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn outages_restarts_and_wrong_credentials() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-out", &[]).await;
    let mut emulator = Emulator::start(&test_dir("outage"), &["--app", "herald:right-secret"]).await;
    let receiver = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, CONFIG).await;
    subscribe(&ns, &cluster, &receiver, "hosts", &["hostcreate"], json!({})).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(cluster.client.clone(), &ns);
    let secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wrong"},
        "stringData": {"bk_app_code": "herald", "bk_app_secret": "wrong-secret"}}))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    let esb = json!({"url": emulator.url(), "api": "esb", "supplierAccount": "0", "credentialsSecret": "wrong", "resources": [{"resource": "set"}]});
    sources.create(&PostParams::default(), &source("esb", esb)).await.unwrap();
    let direct = json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0", "resources": [{"resource": "host", "fields": ["bk_host_id"]}]});
    sources.create(&PostParams::default(), &source("cmdb", direct)).await.unwrap();
    let right = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "right"},
        "stringData": {"bk_app_code": "herald", "bk_app_secret": "right-secret"}}))
    .unwrap();
    secrets.create(&PostParams::default(), &right).await.unwrap();
    let esb_ok = json!({"url": emulator.url(), "api": "esb", "supplierAccount": "0", "credentialsSecret": "right", "resources": [{"resource": "module"}]});
    sources.create(&PostParams::default(), &source("esb-ok", esb_ok)).await.unwrap();
    let gateway = json!({"url": format!("{}/api/bk-cmdb/prod", emulator.url()), "api": "apigw", "supplierAccount": "0",
        "credentialsSecret": "right", "resources": [{"resource": "plat"}]});
    sources.create(&PostParams::default(), &source("gateway", gateway)).await.unwrap();
    subscribe(&ns, &cluster, &receiver, "plats", &["platcreate"], json!({})).await;
    subscribe(&ns, &cluster, &receiver, "modules", &["modulecreate"], json!({})).await;
    wait_source(&sources, "cmdb", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    wait_source(&sources, "esb-ok", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    wait_source(&sources, "gateway", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    // Through the API gateway: its path under the stage URL, credentials in the header.
    emulator
        .emit("plat", &[("create", json!({"bk_cloud_id": 5, "bk_cloud_name": "idc", "bk_supplier_account": "0"}))])
        .await;
    let plats = receiver.wait_for("plats", 1, Duration::from_secs(30)).await;
    assert_eq!(plats[0].body["data"][0]["cur_data"]["bk_cloud_name"], "idc");
    assert!(emulator.stats().await["requests"]["apigw"].as_u64().unwrap() >= 2);
    // Through ESB with the right credentials: bk_fields for module are herald's standard list.
    let module = json!({"bk_module_id": 3, "bk_module_name": "nginx", "bk_set_id": 2, "bk_biz_id": 1, "bk_supplier_account": "0", "custom": "x"});
    emulator.emit("module", &[("create", module)]).await;
    let modules = receiver.wait_for("modules", 1, Duration::from_secs(30)).await;
    let cur = &modules[0].body["data"][0]["cur_data"];
    assert_eq!((cur["bk_module_name"].as_str(), cur.get("custom")), (Some("nginx"), None), "{cur}");
    assert!(cur.get("service_template_id").is_some_and(Value::is_null), "listed but absent fields are null: {cur}");
    let shown = wait_source(&sources, "esb", Duration::from_secs(30), "refused", refused("CredentialsRefused")).await;
    let (_, _, message) = condition(&shown, "Ready").unwrap();
    assert!(message.contains("1306000"), "{message}");

    let hosts = |from: usize, n: usize| -> Vec<(&'static str, Value)> {
        (from..from + n).map(|i| ("create", json!({"bk_host_id": i, "bk_supplier_account": "0"}))).collect()
    };
    emulator.emit("host", &hosts(1, 5)).await;
    receiver.wait_for("hosts", 5, Duration::from_secs(30)).await;
    // Refused credentials are retried slowly (from 30 s on), not in a loop.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let refused_requests = emulator.stats().await["errors"]["1306000"].as_u64().unwrap_or(0);
    println!("ESB requests refused for the wrong secret in the first 20 s or more: {refused_requests}");
    assert!((1..=2).contains(&refused_requests), "no tight loop on refused credentials: {refused_requests}");

    // A minute of 503s, with changes made meanwhile.
    emulator.outage(503, 60).await;
    let down = wait_source(&sources, "cmdb", Duration::from_secs(45), "disconnected", is("Connected", "False")).await;
    println!("during the outage: {:?}", condition(&down, "Connected"));
    emulator.emit("host", &hosts(6, 5)).await;
    wait_source(&sources, "cmdb", Duration::from_secs(100), "reconnected", is("Connected", "True")).await;
    receiver.wait_for("hosts", 10, Duration::from_secs(30)).await;

    // bk-cmdb restarted (killed, started again on the same port with its events).
    emulator.kill();
    wait_source(&sources, "cmdb", Duration::from_secs(45), "disconnected", is("Connected", "False")).await;
    emulator.restart().await;
    emulator.emit("host", &hosts(11, 5)).await;
    wait_source(&sources, "cmdb", Duration::from_secs(60), "reconnected", is("Connected", "True")).await;
    let all = receiver.wait_for("hosts", 15, Duration::from_secs(30)).await;
    let ids: Vec<i64> = all.iter().map(|r| r.body["data"][0]["cur_data"]["bk_host_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=15).collect::<Vec<_>>(), "every change once, in order");

    let still = sources.get("esb").await.unwrap();
    assert_eq!(condition(&still, "Ready").unwrap().1, "CredentialsRefused");
    drop(herald);
}

/// bk-cmdb lost herald's cursor while herald was stopped: `CursorExpired`, a Warning Event,
/// a metric, and the watch resumes from the oldest event bk-cmdb still holds. A start time
/// beyond retention is reported once, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn an_expired_cursor_is_reported_and_the_watch_resumes() {
    let _turn = exclusive().await;
    let HostWatch { cluster, ns, emulator, receiver, dir, mut herald, sources } = host_watch("expiry").await;
    let old = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(10)).to_string();
    let too_old = json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0",
        "start": {"from": "time", "time": old}, "resources": [{"resource": "module"}]});
    sources.create(&PostParams::default(), &source("too-old", too_old)).await.unwrap();
    let host = |i: i64| ("create", json!({"bk_host_id": i, "bk_supplier_account": "0"}));
    emulator.emit("host", &[host(1)]).await;
    receiver.wait_for("hosts", 1, Duration::from_secs(30)).await;

    herald.terminate();
    emulator.emit("host", &[host(2), host(3)]).await;
    emulator.expire().await;
    emulator.emit("host", &[host(4)]).await;
    let herald = Herald::start_in(&cluster, &ns, CONFIG, &dir).await;
    let gap =
        wait_source(&sources, "cmdb", Duration::from_secs(30), "CursorExpired", is("CursorExpired", "True")).await;
    let (_, _, message) = condition(&gap, "CursorExpired").unwrap();
    assert!(message.contains("may be missing") && message.contains("host"), "{message}");
    let got = receiver.wait_for("hosts", 2, Duration::from_secs(30)).await;
    let ids: Vec<i64> = got.iter().map(|r| r.body["data"][0]["cur_data"]["bk_host_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 4], "resumed from the oldest event bk-cmdb holds; 2 and 3 are the reported gap");
    assert!(event_reasons(&cluster, &ns).await.contains("CursorExpired"), "a Warning Event");
    let expiries = metric_lines(&herald, "herald_source_cursor_expiries_total", &[]).await;
    assert!(expiries.iter().any(|l| l.ends_with(" 1")), "{expiries:?}");
    // Still watching: later changes arrive.
    emulator.emit("host", &[host(5)]).await;
    receiver.wait_for("hosts", 3, Duration::from_secs(30)).await;

    wait_source(&sources, "too-old", Duration::from_secs(30), "refused", refused("StartOutsideRetention")).await;
    let before = emulator.stats().await["errors"]["1199006"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = emulator.stats().await["errors"]["1199006"].as_u64().unwrap_or(0);
    assert_eq!(before, after, "a start beyond retention is not retried");
    assert!(before <= 2, "asked once per herald process: {before}");
}

/// A source in a namespace not allowed for its account is refused and never reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_source_in_a_namespace_not_allowed_for_its_account_is_refused() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-own", &[]).await;
    let tenant = cluster.namespace("src-tenant", &[("herald.dev/supplier-accounts", "7")]).await;
    let emulator = Emulator::start(&test_dir("tenancy"), &[]).await;
    let herald = Herald::start(&cluster, &ns, CONFIG).await;
    let sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &tenant);
    let spec =
        json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0", "resources": [{"resource": "host"}]});
    sources.create(&PostParams::default(), &source("foreign", spec)).await.unwrap();
    wait_source(&sources, "foreign", Duration::from_secs(30), "refused", refused("AccountNotAllowed")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(emulator.stats().await["requests"]["direct"], 0, "a refused source never calls bk-cmdb");
    drop(herald);

    // The callback guard applies to sources: without loopback allowed for callbacks, a
    // source in a tenant namespace (allowed for its account) may not reach the emulator;
    // one in herald's namespace may, by `sources.ownNamespaceAllowCidrs`.
    let guarded = "callbackGuard: {allowCidrs: []}\nsources: {ownNamespaceAllowCidrs: ['127.0.0.0/8']}\n";
    let herald = Herald::start(&cluster, &ns, guarded).await;
    let allowed = cluster.namespace("src-tenant", &[("herald.dev/publish-accounts", "0")]).await;
    let tenant_sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &allowed);
    let spec =
        json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0", "resources": [{"resource": "set"}]});
    tenant_sources.create(&PostParams::default(), &source("tenant", spec.clone())).await.unwrap();
    let own_sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    own_sources.create(&PostParams::default(), &source("own", spec)).await.unwrap();
    wait_source(&own_sources, "own", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    wait_source(&tenant_sources, "tenant", Duration::from_secs(30), "refused", refused("DestinationRefused")).await;
    drop(herald);
}

/// A member of team-a, whose namespace receives account 0 and who holds nothing but
/// namespace edit rights on herald's resources there, runs a CmdbSource against a server
/// of their own and emits a host delete: it must not reach account 0's subscription in
/// herald's namespace (someone else's production consumer). Receiving an account is not
/// publishing into it, and the member cannot grant themselves the publish grant; once a
/// cluster admin labels the namespace `herald.dev/publish-accounts`, the same source
/// publishes. (Before the publish grant existed, the forged delete was delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_namespace_receiving_an_account_cannot_publish_into_it_without_the_publish_grant() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-prod", &[]).await;
    let team = cluster.namespace("team-a", &[("herald.dev/supplier-accounts", "0")]).await;
    let emulator = Emulator::start(&test_dir("forged"), &[]).await;
    let receiver = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, CONFIG).await;
    subscribe(&ns, &cluster, &receiver, "production", &["hostdelete"], json!({})).await;

    let member = cluster.namespace_editor(&team).await;
    let member_sources: Api<CmdbSource> = Api::namespaced(member.clone(), &team);
    let spec =
        json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0", "resources": [{"resource": "host"}]});
    member_sources
        .create(&PostParams::default(), &source("forger", spec))
        .await
        .expect("the member may create sources");
    let refusal =
        wait_source(&member_sources, "forger", Duration::from_secs(30), "refused", refused("AccountNotAllowed")).await;
    let (_, _, message) = condition(&refusal, "Ready").unwrap();
    assert!(message.contains("herald.dev/publish-accounts"), "the condition names the grant: {message}");
    emulator.emit("host", &[("delete", json!({"bk_host_id": 13, "bk_supplier_account": "0"}))]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(receiver.received("production").is_empty(), "a forged delete reached account 0's subscription");
    assert_eq!(emulator.stats().await["requests"]["direct"], 0, "a source without the grant never reads");

    // The member cannot give themselves the grant: Namespaces are cluster-scoped.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(member.clone());
    let label = json!({"metadata": {"labels": {"herald.dev/publish-accounts": "0"}}});
    let patched = namespaces.patch(&team, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&label)).await;
    assert!(matches!(patched, Err(kube::Error::Api(ref s)) if s.code == 403), "{patched:?}");

    // A cluster admin grants it: the same source publishes.
    let admin_namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client.clone());
    admin_namespaces.patch(&team, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&label)).await.unwrap();
    wait_source(&member_sources, "forger", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    emulator.emit("host", &[("delete", json!({"bk_host_id": 14, "bk_supplier_account": "0"}))]).await;
    let got = receiver.wait_for("production", 1, Duration::from_secs(30)).await;
    assert_eq!(got[0].body["data"][0]["pre_data"]["bk_host_id"], 14, "{got:?}");
    drop(herald);
}

/// A server of the team's own on 127.0.0.1 that answers every request with `answer` (a
/// JSON text streamed from the same buffer `repeat` times, then `tail`), counting requests.
struct HostileServer {
    url: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HostileServer {
    async fn start(head: &'static str, body: Vec<u8>, repeat: usize, tail: &'static str) -> HostileServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = requests.clone();
        let body = std::sync::Arc::new(body);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (counted, body) = (counted.clone(), body.clone());
                tokio::spawn(async move {
                    let mut request = vec![0; 64 << 10];
                    let _ = socket.read(&mut request).await;
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let length = head.len() + body.len() * repeat + tail.len();
                    let header = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n"
                    );
                    let _ = socket.write_all(header.as_bytes()).await;
                    let _ = socket.write_all(head.as_bytes()).await;
                    for _ in 0..repeat {
                        if socket.write_all(&body).await.is_err() {
                            return;
                        }
                    }
                    let _ = socket.write_all(tail.as_bytes()).await;
                });
            }
        });
        HostileServer { url, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A team-a member (publishing granted for account 0, namespace edit rights only) points
/// CmdbSources at a server that answers every watch with a 60 MB JSON array, and one that
/// answers with a page of 5,000 events. herald reads at most `sources.maxAnswerBytes` of
/// an answer, all sources together at most `sources.readBudgetBytes`, refuses the page
/// with too many events (condition, Warning Event, metric) and retries both slowly; its
/// peak RSS stays far below the chart's 512 Mi limit. (Before: one such watch took herald
/// from 40 MB to 1,080 MB in 30 s here.) Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_hostile_watch_server_cannot_take_herald_s_memory() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-hostile", &[]).await;
    let team = cluster
        .namespace("team-a", &[("herald.dev/supplier-accounts", "0"), ("herald.dev/publish-accounts", "0")])
        .await;
    // 60 MB: "[0,0,...,0]".
    let huge = HostileServer::start("[", b"0,".repeat(1 << 20), 30, "0]").await;
    let event = |i: usize| {
        format!(
            r#"{{"bk_cursor":"c{i}","bk_resource":"host","bk_event_type":"create","bk_detail":{{"bk_host_id":{i},"bk_supplier_account":"0"}}}},"#
        )
    };
    let crowded: String = (0..5000).map(event).collect();
    let page = HostileServer::start(
        r#"{"result":true,"bk_error_code":0,"data":{"bk_watched":true,"bk_events":["#,
        crowded.into_bytes(),
        1,
        r#"{"bk_cursor":"last","bk_resource":"host","bk_event_type":"create","bk_detail":{}}]}}"#,
    )
    .await;
    let herald = Herald::start(&cluster, &ns, CONFIG).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = common::proc_kb(herald.pid(), "VmHWM");

    let member = cluster.namespace_editor(&team).await;
    let sources: Api<CmdbSource> = Api::namespaced(member, &team);
    let every_resource =
        json!([{"resource": "host"}, {"resource": "biz"}, {"resource": "set"}, {"resource": "module"}]);
    for i in 0..4 {
        let spec = json!({"url": huge.url, "api": "direct", "supplierAccount": "0", "resources": every_resource});
        sources.create(&PostParams::default(), &source(&format!("huge-{i}"), spec)).await.unwrap();
    }
    let spec = json!({"url": page.url, "api": "direct", "supplierAccount": "0", "resources": [{"resource": "host"}]});
    sources.create(&PostParams::default(), &source("crowded", spec)).await.unwrap();
    for i in 0..4 {
        wait_source(&sources, &format!("huge-{i}"), Duration::from_secs(60), "refused", refused("AnswerTooLarge"))
            .await;
    }
    let crowded = wait_source(&sources, "crowded", Duration::from_secs(60), "refused", refused("PageTooLarge")).await;
    let (_, _, message) = condition(&crowded, "Ready").unwrap();
    assert!(message.contains("201"), "{message}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let peak = common::proc_kb(herald.pid(), "VmHWM");
    println!(
        "hostile watch servers: 16 watches of 60 MB answers + 1 of a 5,000-event page for 30 s: herald peak RSS {} MB -> {} MB (chart limit 512 MB; machine {} MB); requests: {} huge, {} crowded",
        rss_before / 1024,
        peak / 1024,
        common::machine_memory_mb(),
        huge.requests(),
        page.requests()
    );
    assert!(peak < rss_before + 160 * 1024, "peak RSS {rss_before} kB -> {peak} kB");
    // Slow retries (30 s and more after an oversized answer), not a loop. A watch that found
    // the shared budget spent retries sooner, a few times.
    assert!(huge.requests() <= 16 * 6 && page.requests() <= 2, "{} {}", huge.requests(), page.requests());

    let reasons = event_reasons(&cluster, &team).await;
    assert!(reasons.contains("AnswerTooLarge") && reasons.contains("PageTooLarge"), "{reasons:?}");
    for cause in ["answer_too_large", "page_too_large"] {
        let cause = format!("cause=\"{cause}\"");
        assert!(!metric_lines(&herald, "herald_source_watch_errors_total", &[&cause]).await.is_empty(), "{cause}");
    }
    drop(herald);
}

/// On JetStream a message holds at most the NATS server's `max_payload` (1 MiB here). A
/// publish of a larger event is refused at once with 413 / 1199006, not answered 503 for
/// ever; a watch page holding one such change skips it visibly (status `lastSkipped`, a
/// Warning Event, a metric) and pushes the changes around it, instead of reading the page
/// again for ever. (Before: the publish answered 503 on every retry, and the watch never
/// got past the large change.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn on_jetstream_an_event_larger_than_nats_holds_is_refused_at_publish_and_skipped_from_a_watch() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-large", &[]).await;
    let emulator = Emulator::start(&test_dir("large"), &[]).await;
    let receiver = CallbackServer::start().await;
    let config = format!("{CONFIG}{}", common::jetstream_config(&format!("LARGE{}", std::process::id())));
    let herald = Herald::start(&cluster, &ns, &config).await;
    subscribe(&ns, &cluster, &receiver, "hosts", &["hostcreate"], json!({})).await;
    let large = "x".repeat(1_500_000);

    let event = json!({"event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": 1, "bk_comment": large}, "pre_data": null}]});
    let answer = reqwest::Client::new().post(herald.url("/api/v3/event/publish")).json(&event).send().await.unwrap();
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.unwrap();
    assert_eq!((status, body["bk_error_code"].as_i64()), (413, Some(1199006)), "{body}");

    let sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    let spec = json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0",
        "resources": [{"resource": "host", "fields": ["bk_host_id", "bk_comment"]}]});
    sources.create(&PostParams::default(), &source("cmdb", spec)).await.unwrap();
    wait_source(&sources, "cmdb", Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    let host = |id: i64, comment: &str| {
        ("create", json!({"bk_host_id": id, "bk_comment": comment, "bk_supplier_account": "0"}))
    };
    let cursors = emulator.emit("host", &[host(2, "small"), host(3, &large), host(4, "small")]).await;
    let got = receiver.wait_for("hosts", 2, Duration::from_secs(60)).await;
    let ids: Vec<i64> = got.iter().map(|r| r.body["data"][0]["cur_data"]["bk_host_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [2, 4], "the changes around the large one are pushed");
    let skipped = wait_source(&sources, "cmdb", Duration::from_secs(30), "showing the skipped change", |s| {
        s.status.as_ref().is_some_and(|st| st.resources.iter().any(|r| r.events_skipped == 1))
    })
    .await;
    let last = skipped.status.unwrap().resources[0].last_skipped.clone().unwrap_or_default();
    assert!(last.contains(&cursors[1]) && last.contains("larger than the event store holds"), "{last}");
    assert!(event_reasons(&cluster, &ns).await.contains("EventSkipped"), "a Warning Event");
    let skipped = metric_lines(&herald, "herald_source_events_skipped_total", &["too_large"]).await;
    assert!(skipped.iter().any(|l| l.ends_with(" 1")), "{skipped:?}");
    drop(herald);
}

/// `preImages` over 100,000 instances: updates carry the last detail seen, the store keeps
/// at most `preImageLimit` instances per watch (the least recently changed forgotten), and
/// herald's memory does not grow with the instances (they live in the store). Prints the
/// figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn pre_images_for_100000_instances_stay_within_their_bounds() {
    let _turn = exclusive().await;
    const INSTANCES: usize = 100_000;
    let cluster = cluster().await;
    let ns = cluster.namespace("src-pre", &[]).await;
    let emulator = Emulator::start(&test_dir("pre"), &[]).await;
    let receiver = CallbackServer::start().await;
    let dir = test_dir("pre-herald");
    let herald = Herald::start_in(&cluster, &ns, CONFIG, &dir).await;
    subscribe(&ns, &cluster, &receiver, "updates", &["hostupdate"], json!({})).await;
    let sources: Api<CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    for (name, limit) in [("all", None), ("half", Some(INSTANCES as i64 / 2))] {
        let mut spec = json!({"url": emulator.url(), "api": "direct", "supplierAccount": "0", "preImages": true,
            "resources": [{"resource": "host", "fields": ["bk_host_id", "bk_host_innerip"]}]});
        if let Some(limit) = limit {
            spec["preImageLimit"] = json!(limit);
        }
        sources.create(&PostParams::default(), &source(name, spec)).await.unwrap();
        wait_source(&sources, name, Duration::from_secs(30), "Ready", is("Ready", "True")).await;
    }
    let rss_before = common::proc_kb(herald.pid(), "VmRSS");
    let started = Instant::now();
    for batch in 0..INSTANCES / 5000 {
        let hosts: Vec<(&str, Value)> = (0..5000)
            .map(|i| {
                let id = batch * 5000 + i + 1;
                ("create", json!({"bk_host_id": id, "bk_host_innerip": format!("10.{}.{}.{}", id >> 16, (id >> 8) & 255, id & 255), "bk_supplier_account": "0"}))
            })
            .collect();
        emulator.emit("host", &hosts).await;
    }
    for name in ["all", "half"] {
        wait_source(&sources, name, Duration::from_secs(300), "through the creates", |s| {
            s.status.as_ref().is_some_and(|st| st.resources.iter().any(|r| r.events_read >= INSTANCES as i64))
        })
        .await;
    }
    let took = started.elapsed();
    // The oldest instance changes: the source that kept everything knows its last detail;
    // the one kept to half forgot it (least recently changed first).
    let changed = json!({"bk_host_id": 1, "bk_host_innerip": "10.9.9.9", "bk_supplier_account": "0"});
    emulator.emit("host", &[("update", changed.clone())]).await;
    let got = receiver.wait_for("updates", 2, Duration::from_secs(30)).await;
    let pre: HashSet<String> = got.iter().map(|r| r.body["data"][0]["pre_data"].to_string()).collect();
    let first = json!({"bk_host_id": 1, "bk_host_innerip": "10.0.0.1", "bk_supplier_account": "0"});
    assert_eq!(pre, HashSet::from([first.to_string(), "null".to_string()]), "{got:?}");

    let db =
        rusqlite::Connection::open_with_flags(dir.join("store/herald.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let kept: Vec<i64> = db
        .prepare("SELECT pre_images FROM watches ORDER BY pre_images DESC")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kept, [INSTANCES as i64, INSTANCES as i64 / 2], "instances kept per watch");
    let rows: i64 = db.query_row("SELECT COUNT(*) FROM pre_images", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, INSTANCES as i64 * 3 / 2);
    let store_bytes: u64 =
        std::fs::read_dir(dir.join("store")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let rss_after = common::proc_kb(herald.pid(), "VmRSS");
    let peak = common::proc_kb(herald.pid(), "VmHWM");
    println!(
        "{INSTANCES} instances on two watches in {took:.1?} ({:.0} watch events/s); store {:.1} MB on disk for {rows} kept details; herald RSS {} -> {} MB (peak {} MB); machine {} MB",
        2.0 * INSTANCES as f64 / took.as_secs_f64(),
        store_bytes as f64 / 1e6,
        rss_before / 1024,
        rss_after / 1024,
        peak / 1024,
        common::machine_memory_mb()
    );
    assert!(rss_after < rss_before + 200 * 1024, "memory does not hold the instances: {rss_before} -> {rss_after} kB");
}
