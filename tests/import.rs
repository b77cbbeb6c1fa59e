//! `herald import` against the real kube-apiserver: from another herald's REST and ESB API
//! (a second control plane of its own, as an old installation is another cluster) and from
//! a JSON file. Ids, fields, operators and statistics arrive unchanged; re-runs change
//! nothing; collisions are refused with a clear line and a non-zero exit; racing imports
//! give each record exactly one object with its id.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::*;
use futures::StreamExt;
use herald::crd::EventSubscription;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Subscriptions of one account beyond the first page of search_subscription (200).
const PAGED: usize = 230;

/// A second control plane (tests/controlplane/up.sh in a directory of its own), stopped
/// when dropped.
struct OtherCluster {
    state: PathBuf,
    kubeconfig: PathBuf,
}

impl OtherCluster {
    fn start(name: &str) -> OtherCluster {
        let root = env!("CARGO_MANIFEST_DIR");
        let state = std::env::temp_dir().join(format!("herald-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let up = Command::new(format!("{root}/tests/controlplane/up.sh")).arg(&state).output().expect("up.sh");
        let other = OtherCluster { kubeconfig: state.join("kubeconfig"), state };
        assert!(up.status.success(), "second control plane: {}", String::from_utf8_lossy(&up.stderr));
        let crds = format!("{root}/crds/");
        assert!(other.kubectl(&["apply", "--server-side", "-f", &crds]).0, "CRD on the second control plane");
        assert!(
            other.kubectl(&["wait", "--for", "condition=Established", "crd/eventsubscriptions.herald.dev"]).0,
            "CRD established"
        );
        other
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let tools = PathBuf::from(std::env::var("HERALD_TOOLS_BIN").expect("HERALD_TOOLS_BIN"));
        let out =
            Command::new(tools.join("kubectl")).arg("--kubeconfig").arg(&self.kubeconfig).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

impl Drop for OtherCluster {
    fn drop(&mut self) {
        let root = env!("CARGO_MANIFEST_DIR");
        let _ = Command::new(format!("{root}/tests/controlplane/down.sh")).arg(&self.state).status();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// `herald import ARGS` against the test cluster: (exit success, stdout, stderr).
fn import(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("import")
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RUST_LOG", "warn")
        .output()
        .expect("herald import");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    println!("herald import {args:?}: {}\n{stdout}{stderr}", out.status);
    (out.status.success(), stdout, stderr)
}

/// A REST call as `alice`; the answer's `data`.
async fn rest(herald: &Herald, path: &str, body: Value) -> Value {
    let answer: Value = reqwest::Client::new()
        .post(herald.url(path))
        .header("BK_User", "alice")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["result"], true, "{path}: {answer}");
    answer["data"].clone()
}

async fn search(herald: &Herald, account: &str) -> Vec<Value> {
    let data = rest(
        herald,
        &format!("/api/v3/event/subscribe/search/{account}/0"),
        json!({"page": {"sort": "subscription_id"}}),
    )
    .await;
    data["info"].as_array().cloned().unwrap()
}

/// The record fields an import must carry unchanged.
fn carried(record: &Value) -> Value {
    let keys = [
        "subscription_id",
        "subscription_name",
        "system_name",
        "callback_url",
        "confirm_mode",
        "confirm_pattern",
        "time_out",
        "subscription_form",
        "operator",
        "bk_supplier_account",
        "bk_biz_id",
        "statistics",
    ];
    Value::Object(keys.iter().map(|k| (k.to_string(), record[*k].clone())).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn an_import_from_another_herald_keeps_ids_fields_operators_and_statistics() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("import", &[]).await;

    // The old installation: a herald on a control plane of its own, ids from 100.
    let old_cluster = OtherCluster::start("import-source");
    let old_ns = "cmdb-old";
    assert!(old_cluster.kubectl(&["create", "namespace", old_ns]).0);
    let counter: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "herald-subscription-ids"}, "data": {"next": "100"}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(old_cluster.client().await, old_ns)
        .create(&PostParams::default(), &counter)
        .await
        .unwrap();
    let apps = std::env::temp_dir().join(format!("{}-old-apps.yaml", ns.name));
    std::fs::write(&apps, "apps:\n- appCode: migrator\n  appSecret: s3cret\n  accounts: ['*']\n").unwrap();
    let old_dir = std::env::temp_dir().join(format!("{}-old-herald", ns.name));
    let config = format!("api:\n  esbCredentialsFile: {}\n", apps.display());
    let launch =
        Launch { config_yaml: &config, ..Launch::new(&old_cluster.kubeconfig, old_ns, "old-herald", &old_dir) };
    let mut old = Herald::from_launch(&launch);
    old.wait_ready(Duration::from_secs(60)).await;

    let receivers = CallbackServer::start().await;
    let form = |name: &str, url: String, extra: Value| {
        let mut body = json!({"subscription_name": name, "callback_url": url, "subscription_form": "hostcreate", "system_name": "cmdb-sync"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    rest(&old, "/api/v3/event/subscribe/0/0", form("hosts", receivers.url("ok", "hosts"), json!({"time_out": 15})))
        .await;
    rest(
        &old,
        "/api/v3/event/subscribe/0/3",
        form("sets", receivers.url("ok", "sets"), json!({"subscription_form": "setcreate,setdelete", "confirm_mode": "regular", "confirm_pattern": "ok|fine"})),
    )
    .await;
    rest(&old, "/api/v3/event/subscribe/7/0", form("biz", receivers.url("ok", "biz"), json!({}))).await;
    // Enough of account 7 for search_subscription to answer in several pages of 200.
    let old_api: Api<EventSubscription> = Api::namespaced(old_cluster.client().await, old_ns);
    futures::stream::iter(0..PAGED)
        .for_each_concurrent(16, |n| {
            let api = old_api.clone();
            let spec = json!({"supplierAccount": "7", "subscriptionName": format!("bulk-{n}"),
                "callbackUrl": "http://127.0.0.1:9/bulk", "events": ["setcreate"]});
            async move {
                api.create(&PostParams::default(), &subscription(&format!("bulk-{n}"), spec)).await.unwrap();
            }
        })
        .await;
    wait_until(Duration::from_secs(120), "the old herald's bulk subscriptions have ids", async || {
        let with_ids =
            old_api.list(&Default::default()).await.unwrap().items.iter().filter(|s| id(s).is_some()).count();
        if with_ids == PAGED + 3 { Ok(()) } else { Err(format!("{with_ids} with ids")) }
    })
    .await;
    // One that fails once and gives up: statistics that stay put.
    let failing = json!({"subscriptionName": "failing", "callbackUrl": receivers.url("status-500", "failing"),
        "events": ["hostcreate"], "retry": {"maxAttempts": 1}});
    old_api.create(&PostParams::default(), &subscription("failing", failing)).await.unwrap();
    wait_ready(&old_api, "failing").await;
    let event = json!({"event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": 1}}], "bk_supplier_account": "0"});
    rest(&old, "/api/v3/event/publish", event).await;
    wait_until(Duration::from_secs(60), "the old statistics settle", async || {
        let records = search(&old, "0").await;
        let stats =
            |name: &str| records.iter().find(|r| r["subscription_name"] == name).map(|r| r["statistics"].clone());
        let settled = stats("hosts") == Some(json!({"total": 1, "failure": 0}))
            && stats("failing") == Some(json!({"total": 1, "failure": 1}));
        if settled { Ok(()) } else { Err(format!("{records:?}")) }
    })
    .await;
    let mut expected: Vec<Value> =
        search(&old, "0").await.into_iter().chain(search(&old, "7").await).map(|r| carried(&r)).collect();
    expected.sort_by_key(|r| r["subscription_id"].as_i64());
    assert_eq!(expected.len(), 4 + PAGED);
    assert!(expected.iter().all(|r| r["subscription_id"].as_i64().unwrap() >= 100), "{expected:?}");

    // The new installation already has one subscription of its own (id 1).
    let herald = Herald::start(&cluster, &ns, "").await;
    let own = rest(&herald, "/api/v3/event/subscribe/0/0", form("own", receivers.url("ok", "own"), json!({}))).await;
    let own_id = own["subscription_id"].as_i64().unwrap();

    let source = old.url("");
    let args = ["--from-url", source.as_str(), "--account", "0", "--account", "7", "--namespace", ns.name.as_str()];
    // A dry run says what it would do and writes nothing.
    let dry: Vec<&str> = args.iter().copied().chain(["--dry-run"]).collect();
    let (ok, stdout, _) = import(&cluster, &dry);
    let would = format!("{} created, 0 updated, 0 skipped, 0 refused (dry run: nothing written)", 4 + PAGED);
    assert!(ok && stdout.contains(&would) && stdout.contains("would create"), "{stdout}");
    let api = cluster.subscriptions(&ns);
    assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 1, "only the new installation's own");
    let (ok, stdout, _) = import(&cluster, &args);
    let created = format!("{} created, 0 updated, 0 skipped, 0 refused", 4 + PAGED);
    assert!(ok && stdout.contains(&created), "{stdout}");

    wait_until(Duration::from_secs(180), "the imported records show in search as they were", async || {
        let mut got: Vec<Value> =
            search(&herald, "0").await.into_iter().chain(search(&herald, "7").await).map(|r| carried(&r)).collect();
        got.retain(|r| r["subscription_id"] != own_id);
        got.sort_by_key(|r| r["subscription_id"].as_i64());
        if got == expected { Ok(()) } else { Err(format!("got {got:#?}\nexpected {expected:#?}")) }
    })
    .await;
    for record in &expected {
        let object = api.get(&format!("cmdb-imported-{}", record["subscription_id"])).await.unwrap();
        assert_eq!(ready(&object).map(|(s, _)| s), Some("True".into()), "{:?}", object.status);
    }

    // New subscriptions get ids above every imported one.
    let later =
        rest(&herald, "/api/v3/event/subscribe/0/0", form("later", receivers.url("ok", "later"), json!({}))).await;
    let highest = expected.iter().filter_map(|r| r["subscription_id"].as_i64()).max().unwrap();
    assert!(later["subscription_id"].as_i64().unwrap() > highest, "{later} after {highest}");

    // Re-running changes nothing, through the direct path or the ESB one.
    // What an import writes: the spec (its generation) and the annotations. (Status keeps
    // moving meanwhile: the imported statistics are projected under the write budget.)
    let versions = |items: Vec<EventSubscription>| -> BTreeMap<String, (Option<i64>, BTreeMap<String, String>)> {
        items.into_iter().map(|s| (s.name_any(), (s.metadata.generation, s.annotations().clone()))).collect()
    };
    let before = versions(api.list(&Default::default()).await.unwrap().items);
    let (ok, stdout, _) = import(&cluster, &args);
    let skipped = format!("0 created, 0 updated, {} skipped, 0 refused", 4 + PAGED);
    assert!(ok && stdout.contains(&skipped), "{stdout}");
    let esb = [
        "--from-url",
        source.as_str(),
        "--esb",
        "--app-code",
        "migrator",
        "--app-secret",
        "s3cret",
        "--account",
        "0",
        "--account",
        "7",
        "--namespace",
        ns.name.as_str(),
    ];
    let (ok, stdout, _) = import(&cluster, &esb);
    assert!(ok && stdout.contains(&skipped), "{stdout}");
    // With --existing update the records are applied again: the same content changes nothing.
    let update: Vec<&str> = args.iter().copied().chain(["--existing", "update"]).collect();
    let (ok, stdout, _) = import(&cluster, &update);
    assert!(ok && stdout.contains(&format!("0 created, {} updated, 0 skipped, 0 refused", 4 + PAGED)), "{stdout}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(versions(api.list(&Default::default()).await.unwrap().items), before, "nothing was written again");

    // Collisions are refused, each with its line, and the exit says so.
    let file = std::env::temp_dir().join(format!("{}-records.json", ns.name));
    let records = json!([
        {"subscription_id": own_id, "subscription_name": "other", "callback_url": "http://127.0.0.1:9/", "subscription_form": "hostcreate"},
        {"subscription_id": 500, "subscription_name": "own", "callback_url": "http://127.0.0.1:9/", "subscription_form": "hostcreate"},
        {"subscription_id": 501, "subscription_name": "fine", "callback_url": "http://127.0.0.1:9/", "subscription_form": "hostcreate"},
        {"subscription_id": 502, "subscription_name": "elsewhere", "bk_supplier_account": "9",
         "callback_url": "http://127.0.0.1:9/", "subscription_form": "hostcreate"},
    ]);
    std::fs::write(&file, records.to_string()).unwrap();
    // Account 9's subscriptions go to a namespace of their own, one that receives account 9
    // and that a cluster admin trusts to import its ids.
    let team = cluster
        .namespace("import-team", &[("herald.dev/supplier-accounts", "9"), ("herald.dev/import-accounts", "9")])
        .await;
    let elsewhere = format!("9={}", team.name);
    let from_file =
        ["--file", file.to_str().unwrap(), "--namespace", ns.name.as_str(), "--account-namespace", &elsewhere];
    let (ok, stdout, _) = import(&cluster, &from_file);
    assert!(!ok, "a refused record makes the exit non-zero");
    assert!(stdout.contains(&format!("id {own_id} is held by {}/", ns.name)), "{stdout}");
    assert!(stdout.contains("name \"own\" of account \"0\" is used by"), "{stdout}");
    assert!(stdout.contains("2 created, 0 updated, 0 skipped, 2 refused"), "{stdout}");
    let fine = wait_ready(&api, "cmdb-imported-501").await;
    assert_eq!(id(&fine), Some(501));
    let placed = wait_ready(&cluster.subscriptions(&team), "cmdb-imported-502").await;
    assert_eq!(id(&placed), Some(502));
    old.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn two_imports_racing_over_the_same_records_give_each_record_one_object_with_its_id() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("import-race", &[]).await;
    let _herald = Herald::start(&cluster, &ns, "").await;
    let records: Vec<Value> = (0..30)
        .map(|n| {
            json!({"subscription_id": 7000 + n, "subscription_name": format!("raced-{n}"),
            "callback_url": "http://127.0.0.1:9/", "subscription_form": "hostcreate", "operator": "bob",
            "statistics": {"total": n, "failure": 0}})
        })
        .collect();
    let file = std::env::temp_dir().join(format!("{}-raced.json", ns.name));
    std::fs::write(&file, Value::Array(records).to_string()).unwrap();
    let run = |file: PathBuf, ns: String, kubeconfig: PathBuf| {
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_herald"))
                .args(["import", "--file"])
                .arg(&file)
                .args(["--namespace", &ns])
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .unwrap()
        })
    };
    let racers = [
        run(file.clone(), ns.name.clone(), cluster.kubeconfig.clone()),
        run(file, ns.name.clone(), cluster.kubeconfig.clone()),
    ];
    for racer in racers {
        let out = racer.join().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let api = cluster.subscriptions(&ns);
    wait_until(Duration::from_secs(60), "every record Ready under its own id", async || {
        let items = api.list(&Default::default()).await.unwrap().items;
        let ids: BTreeMap<String, Option<i64>> = items.iter().map(|s| (s.name_any(), id(s))).collect();
        let all = (0..30).all(|n| ids.get(&format!("cmdb-imported-{}", 7000 + n)) == Some(&Some(7000 + n)));
        let ready_all = items.iter().all(|s| ready(s).is_some_and(|(st, _)| st == "True"));
        if items.len() == 30 && all && ready_all { Ok(()) } else { Err(format!("{ids:?}")) }
    })
    .await;

    // The controller keeps the rule too: another object asking for an id that is held
    // gets an id of its own and receives nothing.
    let mut squatter = subscription("squatter", basic_spec("squatter"));
    squatter.metadata.annotations = Some([("herald.dev/imported-id".to_string(), "7000".to_string())].into());
    api.create(&PostParams::default(), &squatter).await.unwrap();
    let refused = wait_reason(&api, "squatter", "ImportedIdTaken").await;
    assert_ne!(id(&refused), Some(7000));
    assert_eq!(id(&api.get("cmdb-imported-7000").await.unwrap()), Some(7000));
}

/// A team-a member (the namespace receives account 0; the member holds namespace edit
/// rights on herald's resources there and nothing else) annotates subscriptions with
/// imported ids: 2^53 (past what JSON clients read exactly) and 5000 (an id a migration
/// will need). Neither is honoured: each gets a fresh id, `ImportNotAllowed` and a Warning
/// Event, and the counter records no import, so the next REST create in herald's
/// namespace gets an ordinary id and the migration still gets 5000. Where import is
/// trusted, an id above `controller.maxImportedId` is refused too. (Before: the 2^53
/// import was honoured and the next REST create was answered 9007199254740993.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_namespace_editor_cannot_claim_imported_ids_or_break_id_allocation() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("import-trust", &[]).await;
    let team = cluster.namespace("team-a", &[("herald.dev/supplier-accounts", "0")]).await;
    let herald = Herald::start(&cluster, &ns, "controller: {maxImportedId: 1000000}\n").await;
    let member = cluster.namespace_editor(&team).await;
    let member_api: Api<EventSubscription> = Api::namespaced(member, &team);
    for (name, wanted) in [("huge", "9007199254740992"), ("squat", "5000")] {
        let mut sub = subscription(name, basic_spec(name));
        sub.metadata.annotations = Some([("herald.dev/imported-id".to_string(), wanted.to_string())].into());
        member_api.create(&PostParams::default(), &sub).await.expect("the member may create subscriptions");
    }
    for name in ["huge", "squat"] {
        let refused = wait_reason(&cluster.subscriptions(&team), name, "ImportNotAllowed").await;
        let given = id(&refused).expect("a fresh id");
        assert!((1..1000).contains(&given), "{name}: {given}");
        let message = refused.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
        assert!(message.contains("herald.dev/import-accounts"), "{message}");
    }
    let counter =
        Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns).get("herald-subscription-ids").await.unwrap();
    let data = counter.data.unwrap_or_default();
    assert_eq!(data.get("imported").map(String::as_str), Some(""), "no import was recorded: {data:?}");

    // The next REST create in herald's namespace gets an ordinary id.
    let created = rest(
        &herald,
        "/api/v3/event/subscribe/0/3",
        json!({"subscription_name": "next", "callback_url": "http://127.0.0.1:9/", "subscription_form": "hostcreate"}),
    )
    .await;
    let next = created["subscription_id"].as_i64().unwrap_or_else(|| panic!("{created}"));
    assert!((1..1000).contains(&next), "{created}");

    // Where import is trusted (herald's namespace), the migration gets 5000; an id above
    // the ceiling is refused and recorded nowhere.
    let api = cluster.subscriptions(&ns);
    for (name, wanted) in [("migrated", "5000"), ("beyond", "1000001")] {
        let mut sub = subscription(name, basic_spec(name));
        sub.metadata.annotations = Some([("herald.dev/imported-id".to_string(), wanted.to_string())].into());
        api.create(&PostParams::default(), &sub).await.unwrap();
    }
    assert_eq!(id(&wait_ready(&api, "migrated").await), Some(5000));
    let beyond = wait_reason(&api, "beyond", "ImportedIdOutOfRange").await;
    assert!(id(&beyond).is_some_and(|given| given != 1000001));
    let counter =
        Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns).get("herald-subscription-ids").await.unwrap();
    let imported = counter.data.unwrap_or_default().remove("imported").unwrap_or_default();
    assert!(imported.starts_with("5000=") && !imported.contains(','), "{imported}");
    drop(herald);
}
