//! The controller against the real kube-apiserver: validation at apply time, ids,
//! conditions, tenancy, restarts. Run through tests/run.sh.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::*;
use futures::{StreamExt, TryStreamExt};
use herald::crd::{SUBSCRIPTION_ID_LABEL, SUPPLIER_ACCOUNTS_LABEL};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

const CONFIG: &str = "controller:\n  resyncSeconds: 600\n";

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn examples_apply_and_become_ready_with_distinct_ids() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("examples", &[]).await;
    let _herald = Herald::start(&cluster, &ns, CONFIG).await;

    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/");
    let (ok, out, err) = cluster.kubectl(&["apply", "-n", &ns, "-f", examples]);
    assert!(ok, "kubectl apply -f examples/: {out}{err}");
    let (ok, out, err) =
        cluster.kubectl(&["wait", "-n", &ns, "--for=condition=Ready", "esub", "--all", "--timeout=60s"]);
    assert!(ok, "kubectl wait: {out}{err}");

    let (ok, table, err) = cluster.kubectl(&["get", "esub", "-n", &ns]);
    assert!(ok, "{err}");
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ID", "EVENTS", "CALLBACK", "READY", "TOTAL", "FAILURE", "AGE"], "{table}");
    assert!(table.contains("host-changes") && table.contains("True"), "{table}");

    let api = cluster.subscriptions(&ns);
    let subs = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(subs.items.len(), 2);
    let ids: BTreeSet<i64> = subs.items.iter().filter_map(id).collect();
    assert_eq!(ids.len(), 2, "distinct ids: {ids:?}");
    // The id label is written by the API call after the status that made it Ready.
    for sub in &subs.items {
        wait_for(&api, &sub.name_any(), Duration::from_secs(30), "the id label", |s| {
            id(s).is_some_and(|id| s.labels().get(SUBSCRIPTION_ID_LABEL) == Some(&id.to_string()))
        })
        .await;
    }
    // The short name and label selection work as documented.
    let first = ids.iter().next().unwrap().to_string();
    let (ok, out, err) =
        cluster.kubectl(&["get", "esub", "-n", &ns, "-l", &format!("{SUBSCRIPTION_ID_LABEL}={first}"), "-o", "name"]);
    assert!(ok && out.lines().count() == 1, "{out}{err}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn two_racing_allocators_give_fifty_distinct_ids_that_never_change() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("race", &[]).await;
    // Blocks of one id force the allocators to contend on the counter for every id.
    let config = "controller:\n  idBlockSize: 1\nleaderElection:\n  enabled: false\n";
    let first = Herald::start(&cluster, &ns, config).await;
    let second =
        Herald::start_in(&cluster, &ns, config, &std::env::temp_dir().join(format!("{}-second", ns.name))).await;
    let api = cluster.subscriptions(&ns);

    // Record every id each object ever shows, from before the first create.
    let watch_api = api.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let observed = tokio::spawn(async move {
        let mut seen: HashMap<String, BTreeSet<i64>> = HashMap::new();
        let mut stream = watch_api.watch(&WatchParams::default(), "0").await.unwrap().boxed();
        let mut stopped = std::pin::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                event = stream.try_next() => match event {
                    Ok(Some(WatchEvent::Added(obj) | WatchEvent::Modified(obj))) => {
                        if let Some(id) = id(&obj) {
                            seen.entry(obj.name_any()).or_default().insert(id);
                        }
                    }
                    Ok(Some(_)) => {}
                    other => panic!("watch ended: {other:?}"),
                },
            }
        }
        seen
    });

    let creates = (0..50).map(|i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &subscription(&format!("s{i}"), basic_spec(&format!("race-{i}"))))
                .await
                .expect("create")
        }
    });
    futures::future::join_all(creates).await;
    let mut ids = BTreeMap::new();
    for i in 0..50 {
        let sub = wait_ready(&api, &format!("s{i}")).await;
        ids.insert(sub.name_any(), id(&sub).unwrap());
    }
    let distinct: BTreeSet<i64> = ids.values().copied().collect();
    assert_eq!(distinct.len(), 50, "ids: {ids:?}");

    // Let any late write of a losing allocator arrive before judging.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop.send(());
    let seen = observed.await.unwrap();
    assert_eq!(seen.len(), 50);
    for (name, shown) in &seen {
        assert_eq!(shown.len(), 1, "{name} showed several ids over time: {shown:?}");
    }
    // Both allocators reserved from the one counter.
    let counter =
        Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns).get("herald-subscription-ids").await.unwrap();
    let next: i64 = counter.data.unwrap()["next"].parse().unwrap();
    assert!(next > *distinct.iter().max().unwrap(), "counter {next} is past every id");
    let logs = format!("{}{}", first.log_text(), second.log_text());
    assert!(!logs.contains("panicked"), "{logs}");
    drop((first, second));

    // Later reads still show the same ids.
    for (name, original) in &ids {
        assert_eq!(id(&api.get(name).await.unwrap()), Some(*original));
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_forged_id_label_is_replaced_by_a_fresh_id() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("forged", &[]).await;
    let _herald = Herald::start(&cluster, &ns, CONFIG).await;
    let api = cluster.subscriptions(&ns);
    let mut forged = subscription("forged", basic_spec("forged"));
    forged.metadata.labels = Some(BTreeMap::from([(SUBSCRIPTION_ID_LABEL.to_string(), "999999".to_string())]));
    api.create(&PostParams::default(), &forged).await.unwrap();
    let sub = wait_for(&api, "forged", Duration::from_secs(30), "labelled with its id", |s| {
        id(s).is_some_and(|id| s.labels().get(SUBSCRIPTION_ID_LABEL) == Some(&id.to_string()))
    })
    .await;
    assert_ne!(id(&sub), Some(999999), "an id is never taken from a label");

    // Forging it again on a live object is corrected too.
    let patch = serde_json::json!({"metadata": {"labels": {SUBSCRIPTION_ID_LABEL: "424242"}}});
    api.patch("forged", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let again = wait_for(&api, "forged", Duration::from_secs(30), "label corrected", |s| {
        s.labels().get(SUBSCRIPTION_ID_LABEL) == Some(&id(&sub).unwrap().to_string())
    })
    .await;
    assert_eq!(id(&again), id(&sub));
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn invalid_specs_are_refused_at_apply_time_naming_the_field() {
    let cluster = cluster().await;
    let ns = cluster.namespace("schema", &[]).await;
    let cases = [
        ("no callbackUrl", serde_json::json!({"subscriptionName": "a", "events": ["hostcreate"]}), "spec.callbackUrl"),
        (
            "relative URL",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "/events", "events": ["hostcreate"]}),
            "spec.callbackUrl",
        ),
        (
            "no scheme",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "example.com/events", "events": ["hostcreate"]}),
            "spec.callbackUrl",
        ),
        (
            "ftp URL",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "ftp://127.0.0.1/x", "events": ["hostcreate"]}),
            "spec.callbackUrl",
        ),
        (
            "unknown confirm mode",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": ["hostcreate"], "confirm": {"mode": "json"}}),
            "spec.confirm.mode",
        ),
        (
            "status pattern not a code",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": ["hostcreate"], "confirm": {"mode": "httpstatus", "pattern": "ok"}}),
            "spec.confirm.pattern",
        ),
        (
            "timeout 0",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": ["hostcreate"], "timeoutSeconds": 0}),
            "spec.timeoutSeconds",
        ),
        (
            "timeout 301",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": ["hostcreate"], "timeoutSeconds": 301}),
            "spec.timeoutSeconds",
        ),
        (
            "empty events",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": []}),
            "spec.events",
        ),
        (
            "duplicate events",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": ["hostcreate", "hostcreate"]}),
            "spec.events",
        ),
        (
            "blank name",
            serde_json::json!({"subscriptionName": "  ", "callbackUrl": "http://127.0.0.1/x", "events": ["hostcreate"]}),
            "spec.subscriptionName",
        ),
        (
            "too many events",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": "http://127.0.0.1/x", "events": (0..10_000).map(|i| format!("e{i}")).collect::<Vec<_>>()}),
            "spec.events",
        ),
        (
            "8 KB URL",
            serde_json::json!({"subscriptionName": "a", "callbackUrl": format!("http://127.0.0.1/{}", "a".repeat(8192)), "events": ["hostcreate"]}),
            "spec.callbackUrl",
        ),
    ];
    for (case, spec, field) in cases {
        let object = serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "EventSubscription",
            "metadata": {"name": "invalid"}, "spec": spec,
        });
        let err = cluster.create_raw(&ns, object).await.expect_err(case);
        let kube::Error::Api(status) = err else { panic!("{case}: not an API error: {err}") };
        assert_eq!(status.code, 422, "{case}: {status:?}");
        assert!(status.message.contains(field), "{case}: message should name {field}: {}", status.message);
    }
    // kubectl users see the same.
    let file = std::env::temp_dir().join(format!("{}-invalid.yaml", ns.name));
    std::fs::write(&file, "apiVersion: herald.dev/v1alpha1\nkind: EventSubscription\nmetadata: {name: k}\nspec: {subscriptionName: k, callbackUrl: /x, events: [hostcreate]}\n").unwrap();
    let (ok, _, err) = cluster.kubectl(&["apply", "-n", &ns, "-f", file.to_str().unwrap()]);
    assert!(!ok && err.contains("spec.callbackUrl"), "{err}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_regex_that_does_not_compile_gives_invalid_pattern_and_a_warning_event() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("pattern", &[]).await;
    let _herald = Herald::start(&cluster, &ns, CONFIG).await;
    let api = cluster.subscriptions(&ns);
    let mut spec = basic_spec("bad-regex");
    spec["confirm"] = serde_json::json!({"mode": "regular", "pattern": "result(true"});
    api.create(&PostParams::default(), &subscription("bad-regex", spec)).await.unwrap();
    let sub = wait_reason(&api, "bad-regex", "InvalidPattern").await;
    assert!(id(&sub).is_some(), "an invalid subscription still gets its id");

    let events = Api::<Event>::namespaced(cluster.client.clone(), &ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let warning = list.items.iter().find(|e| {
            e.reason.as_deref() == Some("InvalidPattern")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad-regex")
        });
        if let Some(warning) = warning {
            assert!(warning.note.as_deref().unwrap_or_default().contains("confirm.pattern"), "{warning:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Warning event: {:?}", list.items);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Fixing the spec makes it Ready.
    let fix = serde_json::json!({"spec": {"confirm": {"mode": "regular", "pattern": "result.*true"}}});
    api.patch("bad-regex", &PatchParams::default(), &Patch::Merge(&fix)).await.unwrap();
    let fixed = wait_ready(&api, "bad-regex").await;
    assert_eq!(id(&fixed), id(&sub));
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_second_subscription_with_the_same_account_and_name_is_a_duplicate_until_the_first_goes() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("dup", &[]).await;
    let _herald = Herald::start(&cluster, &ns, CONFIG).await;
    let api = cluster.subscriptions(&ns);
    api.create(&PostParams::default(), &subscription("first", basic_spec("same-name"))).await.unwrap();
    wait_ready(&api, "first").await;
    // Same name after bk-cmdb's trimming, same (default) account.
    let mut spec = basic_spec(" same-name ");
    spec["supplierAccount"] = "0".into();
    api.create(&PostParams::default(), &subscription("second", spec)).await.unwrap();
    let second = wait_reason(&api, "second", "DuplicateName").await;
    let message = &second.status.as_ref().unwrap().conditions[0].message;
    assert!(message.contains("first"), "{message}");
    // Another account may use the name.
    let mut other = basic_spec("same-name");
    other["supplierAccount"] = "7".into();
    api.create(&PostParams::default(), &subscription("other-account", other)).await.unwrap();
    wait_ready(&api, "other-account").await;

    api.delete("first", &DeleteParams::default()).await.unwrap();
    wait_ready(&api, "second").await;
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_namespace_not_allowed_for_the_account_is_refused_until_labelled() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let herald_ns = cluster.namespace("tenancy-herald", &[]).await;
    let team_ns = cluster.namespace("tenancy-team", &[(SUPPLIER_ACCOUNTS_LABEL, "1")]).await;
    let _herald = Herald::start(&cluster, &herald_ns, CONFIG).await;
    // A team member with namespace edit rights on herald's resources only.
    let member = cluster.namespace_editor(&team_ns).await;
    let api: Api<herald::crd::EventSubscription> = Api::namespaced(member.clone(), &team_ns);
    let mut spec = basic_spec("tenant-sub");
    spec["supplierAccount"] = "2".into();
    api.create(&PostParams::default(), &subscription("tenant", spec)).await.unwrap();
    wait_reason(&api, "tenant", "NamespaceNotAllowed").await;

    // The member cannot grant it; a cluster admin allows account 2 in that namespace.
    let label = serde_json::json!({"metadata": {"labels": {SUPPLIER_ACCOUNTS_LABEL: "1.2"}}});
    let refused = Api::<Namespace>::all(member).patch(&team_ns, &PatchParams::default(), &Patch::Merge(&label)).await;
    assert!(matches!(refused, Err(kube::Error::Api(ref s)) if s.code == 403), "{refused:?}");
    Api::<Namespace>::all(cluster.client.clone())
        .patch(&team_ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    wait_ready(&api, "tenant").await;
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_spec_change_moves_generation_and_last_time_and_the_spec_stays_as_applied() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("generation", &[]).await;
    let _herald = Herald::start(&cluster, &ns, CONFIG).await;
    let api = cluster.subscriptions(&ns);
    // Unnormalised on purpose: herald must not rewrite it.
    let spec = serde_json::json!({
        "subscriptionName": " spaced name ",
        "callbackUrl": "http://127.0.0.1:9/events",
        "events": ["hostupdate", "hostcreate"],
    });
    api.patch("gen", &PatchParams::apply("test-user"), &Patch::Apply(&subscription("gen", spec.clone())))
        .await
        .unwrap();
    let first = wait_ready(&api, "gen").await;
    let first_status = first.status.clone().unwrap();
    assert_eq!(first_status.observed_generation, Some(1));
    assert_eq!(first_status.operator.as_deref(), Some("test-user"));
    assert_eq!(serde_json::to_value(&first.spec).unwrap(), spec);

    // lastTime has one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut changed = spec.clone();
    changed["events"] = serde_json::json!(["moduletransfer"]);
    api.patch("gen", &PatchParams::apply("test-user"), &Patch::Apply(&subscription("gen", changed.clone())))
        .await
        .unwrap();
    let second = wait_for(&api, "gen", Duration::from_secs(30), "observedGeneration 2", |s| {
        s.status.as_ref().and_then(|st| st.observed_generation) == Some(2)
    })
    .await;
    let status = second.status.clone().unwrap();
    assert!(status.last_time > first_status.last_time, "{:?} after {:?}", status.last_time, first_status.last_time);
    assert_eq!(status.subscription_id, first_status.subscription_id);
    assert_eq!(status.conditions[0].observed_generation, Some(2));
    assert_eq!(serde_json::to_value(&second.spec).unwrap(), changed);

    // Another writer's change makes it the operator.
    let params = PatchParams { field_manager: Some("second-user".into()), ..Default::default() };
    api.patch("gen", &params, &Patch::Merge(serde_json::json!({"spec": {"systemName": "cmdb"}}))).await.unwrap();
    let third = wait_for(&api, "gen", Duration::from_secs(30), "observedGeneration 3", |s| {
        s.status.as_ref().and_then(|st| st.observed_generation) == Some(3)
    })
    .await;
    assert_eq!(third.status.unwrap().operator.as_deref(), Some("second-user"));
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn after_sigkill_and_restart_ids_are_kept_and_unchanged_objects_are_not_written() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("restart", &[]).await;
    let mut herald = Herald::start(&cluster, &ns, CONFIG).await;
    let api = cluster.subscriptions(&ns);
    for i in 0..10 {
        api.create(&PostParams::default(), &subscription(&format!("r{i}"), basic_spec(&format!("restart-{i}"))))
            .await
            .unwrap();
    }
    let mut before = BTreeMap::new();
    for i in 0..10 {
        let sub = wait_ready(&api, &format!("r{i}")).await;
        before.insert(sub.name_any(), id(&sub).unwrap());
    }
    // Settle: the id label write follows the status write.
    for name in before.keys() {
        wait_for(&api, name, Duration::from_secs(30), "labelled", |s| s.labels().contains_key(SUBSCRIPTION_ID_LABEL))
            .await;
    }
    herald.kill();
    let list = api.list(&ListParams::default()).await.unwrap();
    let version = list.metadata.resource_version.clone().unwrap();

    // Every write to these objects from now on shows up on this watch.
    let watch_api = api.clone();
    let writes = tokio::spawn(async move {
        let mut stream = watch_api.watch(&WatchParams::default(), &version).await.unwrap().boxed();
        let mut writes = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
        while let Ok(Ok(Some(event))) = tokio::time::timeout_at(deadline, stream.try_next()).await {
            if let WatchEvent::Modified(obj) | WatchEvent::Added(obj) | WatchEvent::Deleted(obj) = event {
                writes.push(obj.name_any());
            }
        }
        writes
    });
    let restarted = Herald::start(&cluster, &ns, CONFIG).await;
    let writes = writes.await.unwrap();
    assert!(writes.is_empty(), "herald wrote unchanged objects after restart: {writes:?}\n{}", restarted.log_text());
    for (name, original) in &before {
        assert_eq!(id(&api.get(name).await.unwrap()), Some(*original), "{name} kept its id");
    }
    // The restarted controller is live: a new object still gets a new, distinct id.
    api.create(&PostParams::default(), &subscription("after", basic_spec("after-restart"))).await.unwrap();
    let after = wait_ready(&api, "after").await;
    assert!(!before.values().any(|v| Some(*v) == id(&after)));
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn sigterm_shuts_herald_down_cleanly() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("sigterm", &[]).await;
    let mut herald = Herald::start(&cluster, &ns, CONFIG).await;
    let (status, took) = herald.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", herald.log_text());
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    assert!(herald.log_text().contains("controller stopped"), "{}", herald.log_text());
}
