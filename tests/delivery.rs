//! Event delivery end to end: herald as a real process, the real kube-apiserver, and
//! real callback servers on 127.0.0.1 recording what they receive. Run by tests/run.sh.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::*;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

fn host_event(account: &str, seq: i64) -> serde_json::Value {
    serde_json::json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": seq}, "pre_data": null}],
        "bk_supplier_account": account,
    })
}

async fn publish(herald: &Herald, events: serde_json::Value) -> serde_json::Value {
    let response =
        reqwest::Client::new().post(herald.url("/api/v3/event/publish")).json(&events).send().await.expect("publish");
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("publish answer");
    assert!(status.is_success() && body["result"] == true, "publish: {status} {body}");
    body
}

/// Creates a subscription in `ns` (herald's namespace) and waits until it is Ready;
/// returns its id.
async fn subscribe(api: &Api<herald::crd::EventSubscription>, name: &str, url: &str, extra: serde_json::Value) -> i64 {
    let mut spec = serde_json::json!({ "subscriptionName": name, "callbackUrl": url, "events": ["hostcreate"] });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    api.create(&PostParams::default(), &subscription(name, spec)).await.expect("create subscription");
    id(&wait_ready(api, name).await).expect("id")
}

fn statistics(sub: &herald::crd::EventSubscription) -> (i64, i64) {
    sub.status.as_ref().and_then(|s| s.statistics.as_ref()).map(|s| (s.total, s.failure)).unwrap_or_default()
}

async fn wait_statistics(
    api: &Api<herald::crd::EventSubscription>,
    name: &str,
    total: i64,
    failure: i64,
) -> herald::crd::EventSubscription {
    wait_for(api, name, Duration::from_secs(60), &format!("total {total} failure {failure}"), |s| {
        statistics(s) == (total, failure)
    })
    .await
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn published_events_reach_exactly_the_matching_ready_subscriptions() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("fanout", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    let a =
        subscribe(&api, "a", &server.url("ok", "a"), serde_json::json!({"events": ["hostcreate", "hostupdate"]})).await;
    let b = subscribe(&api, "b", &server.url("ok", "b"), serde_json::json!({})).await;
    subscribe(&api, "other-event", &server.url("ok", "other-event"), serde_json::json!({"events": ["setcreate"]}))
        .await;
    subscribe(&api, "other-account", &server.url("ok", "other-account"), serde_json::json!({"supplierAccount": "7"}))
        .await;
    // Not Ready: its regex does not compile.
    let mut broken = basic_spec("broken");
    broken["callbackUrl"] = server.url("ok", "broken").into();
    broken["confirm"] = serde_json::json!({"mode": "regular", "pattern": "("});
    api.create(&PostParams::default(), &subscription("broken", broken)).await.unwrap();
    wait_reason(&api, "broken", "InvalidPattern").await;

    let events: Vec<serde_json::Value> = (1..=5).map(|i| host_event("0", i)).collect();
    let answer = publish(&herald, serde_json::Value::Array(events)).await;
    assert_eq!(answer["data"]["accepted"], 5);
    assert_eq!(answer["data"]["queued"], 10);

    for (key, id) in [("a", a), ("b", b)] {
        let got = server.wait_for(key, 5, Duration::from_secs(30)).await;
        let ids: Vec<i64> = got.iter().map(common::callback::Received::distribution_id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5], "{key}: contiguous from 1, in order");
        let first = &got[0];
        assert_eq!(first.body["subscription_id"], id);
        assert_eq!(first.body["event_type"], "instdata");
        assert_eq!(first.body["action"], "create");
        assert_eq!(first.body["obj_type"], "host");
        assert_eq!(first.body["bk_supplier_account"], "0");
        assert_eq!(first.body["data"][0]["cur_data"]["bk_host_id"], 1);
        for field in ["txn_id", "action_time", "request_id", "request_time"] {
            assert!(first.body[field].is_string(), "{field} in {}", first.body);
        }
        assert_eq!(first.header("content-type"), "application/json");
        assert_eq!(first.header("webhook-id"), format!("msg_herald_{id}_1"));
        assert!(first.header("webhook-timestamp").parse::<i64>().is_ok());
        assert_eq!(first.header("herald-attempt"), "1");
        assert!(!first.headers.contains_key("webhook-signature"), "unsigned without signing.secretRef");
    }
    // Give stray deliveries a moment to show up before asserting there are none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for key in ["other-event", "other-account", "broken"] {
        assert!(server.received(key).is_empty(), "{key} must receive nothing");
    }
    for key in ["a", "b"] {
        let status = wait_statistics(&api, key, 5, 0).await;
        assert_eq!(status.status.unwrap().statistics.unwrap().delivered, 5, "{key}");
    }

    // Metrics are aggregate by default: no per-subscription series.
    let metrics = reqwest::get(herald.url("/metrics")).await.unwrap().text().await.unwrap();
    for line in [
        "herald_delivery_attempts_total{result=\"delivered\",subscription=\"\"} 10",
        "herald_events_published_total 5",
        "herald_deliveries_queued_total 10",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    for family in [
        "herald_delivery_attempt_seconds_bucket",
        "herald_queue_depth",
        "herald_store_bytes",
        "herald_status_writes_total",
    ] {
        assert!(metrics.contains(family), "{family} in:\n{metrics}");
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn confirm_modes_gone_and_throttling() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("confirm", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    let one_attempt = serde_json::json!({"retry": {"maxAttempts": 1}});
    let want_201 =
        serde_json::json!({"confirm": {"mode": "httpstatus", "pattern": "201"}, "retry": {"maxAttempts": 1}});
    subscribe(&api, "s200", &server.url("status-200", "s200"), want_201.clone()).await;
    subscribe(&api, "s201", &server.url("status-201", "s201"), want_201).await;
    let regular = |url: String| {
        (
            url,
            serde_json::json!({"confirm": {"mode": "regular", "pattern": "\"result\":\\s*true"}, "retry": {"maxAttempts": 1}}),
        )
    };
    let (url, spec) = regular(server.url("body-ok", "body-ok"));
    subscribe(&api, "body-ok", &url, spec).await;
    let (url, spec) = regular(server.url("body-no", "body-no"));
    subscribe(&api, "body-no", &url, spec).await;
    subscribe(&api, "gone", &server.url("gone", "gone"), one_attempt).await;
    subscribe(
        &api,
        "throttled",
        &server.url("throttle-3", "throttled"),
        serde_json::json!({"retry": {"maxAttempts": 3, "initialBackoffSeconds": 1}}),
    )
    .await;

    publish(&herald, host_event("0", 1)).await;
    wait_statistics(&api, "s200", 1, 1).await;
    wait_statistics(&api, "s201", 1, 0).await;
    wait_statistics(&api, "body-ok", 1, 0).await;
    wait_statistics(&api, "body-no", 1, 1).await;

    // The condition may be written before the counters of the attempt reach the status.
    wait_for(&api, "gone", Duration::from_secs(30), "CallbackHealthy=False Gone after one failed attempt", |s| {
        statistics(s) == (1, 1)
            && s.status.as_ref().is_some_and(|st| {
                st.conditions.iter().any(|c| c.type_ == "CallbackHealthy" && c.status == "False" && c.reason == "Gone")
            })
    })
    .await;
    // Delivery stopped: a second event is queued, not attempted.
    publish(&herald, host_event("0", 2)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.received("gone").len(), 1, "no attempt after 410 until the spec changes");
    assert!(
        wait_for(&api, "gone", Duration::from_secs(30), "pending 2", |s| {
            s.status.as_ref().and_then(|st| st.statistics.as_ref()).is_some_and(|st| st.pending == 2)
        })
        .await
        .status
        .is_some()
    );

    let throttled = server.wait_for("throttled", 2, Duration::from_secs(30)).await;
    let waited = throttled[1].at - throttled[0].at;
    assert!(waited >= Duration::from_secs(3), "Retry-After 3 honoured, waited {waited:?}");
    assert_eq!(throttled[1].header("herald-attempt"), "2");
    assert_eq!(throttled[0].header("webhook-id"), throttled[1].header("webhook-id"), "stable across attempts");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn retries_dead_letters_and_replay() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("retry", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    let fast = serde_json::json!({"retry": {"maxAttempts": 3, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1, "jitterPercent": 0}});
    subscribe(&api, "flaky", &server.url("fail-2", "flaky"), fast.clone()).await;
    let dead_id = subscribe(&api, "dead", &server.url("status-500", "dead"), fast).await;

    publish(&herald, host_event("0", 1)).await;
    let flaky = server.wait_for("flaky", 3, Duration::from_secs(30)).await;
    assert_eq!(flaky[2].header("herald-attempt"), "3", "delivered on attempt 3");
    wait_statistics(&api, "flaky", 3, 2).await;

    // Always failing: dead letter after 3 attempts; later events are still delivered in order.
    wait_statistics(&api, "dead", 3, 3).await;
    let patch = serde_json::json!({"spec": {"callbackUrl": server.url("ok", "dead")}});
    let patched = api.patch("dead", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // Once the controller has observed the new generation, delivery has its spec (the
    // controller hands delivery the spec before it writes status).
    let generation = patched.metadata.generation;
    wait_for(&api, "dead", Duration::from_secs(30), "the new generation observed", |s| {
        s.status.as_ref().is_some_and(|st| st.observed_generation == generation)
    })
    .await;
    publish(&herald, serde_json::json!([host_event("0", 2), host_event("0", 3)])).await;
    let dead = server.wait_for("dead", 5, Duration::from_secs(30)).await;
    assert_eq!(dead.iter().map(common::callback::Received::distribution_id).collect::<Vec<_>>(), [1, 1, 1, 2, 3]);

    let client = reqwest::Client::new();
    let letters: serde_json::Value = client
        .get(herald.url(&format!("/api/v3/herald/dead_letters/{dead_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(letters["data"]["count"], 1, "{letters}");
    assert_eq!(letters["data"]["info"][0]["distribution_id"], 1);
    assert_eq!(letters["data"]["info"][0]["reason"], "MaxAttempts");
    let replayed: serde_json::Value = client
        .post(herald.url(&format!("/api/v3/herald/dead_letters/{dead_id}/replay")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replayed["data"]["replayed"], 1, "{replayed}");
    let dead = server.wait_for("dead", 6, Duration::from_secs(30)).await;
    let replay = &dead[5];
    assert_eq!(replay.distribution_id(), 1, "the original distribution_id");
    assert_eq!(replay.header("webhook-id"), dead[0].header("webhook-id"), "the original webhook-id");
    assert_eq!(replay.header("herald-attempt"), "1");
}

/// GET `path` on herald; the envelope's `data`.
async fn get_data(herald: &Herald, path: &str) -> serde_json::Value {
    let answer: serde_json::Value =
        reqwest::get(herald.url(path)).await.expect("GET").json().await.expect("JSON envelope");
    assert_eq!(answer["result"], true, "GET {path}: {answer}");
    answer["data"].clone()
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn the_delivery_log_shows_each_attempt_and_the_minutes_count_them() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("deliveries", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    let fast = serde_json::json!({"initialBackoffSeconds": 1, "maxBackoffSeconds": 1, "jitterPercent": 0});
    let flaky = subscribe(&api, "flaky", &server.url("fail-2", "flaky"), serde_json::json!({"retry": fast})).await;
    let mut refusing_retry = fast.clone();
    refusing_retry["maxAttempts"] = 2.into();
    let refusing = serde_json::json!({
        "confirm": {"mode": "regular", "pattern": "\"result\":\\s*true"}, "retry": refusing_retry,
    });
    let refused = subscribe(&api, "refused", &server.url("body-no", "refused"), refusing).await;

    publish(&herald, host_event("0", 1)).await;
    server.wait_for("flaky", 3, Duration::from_secs(30)).await;
    wait_statistics(&api, "flaky", 3, 2).await;
    wait_statistics(&api, "refused", 2, 2).await;

    let log = get_data(&herald, &format!("/api/v3/herald/deliveries/{flaky}")).await;
    let attempts = log["info"].as_array().expect("info");
    let summary: Vec<_> =
        attempts.iter().map(|a| (a["attempt"].clone(), a["result"].clone(), a["http_status"].clone())).collect();
    assert_eq!(
        summary,
        [
            (3.into(), "delivered".into(), 200.into()),
            (2.into(), "failed".into(), 500.into()),
            (1.into(), "failed".into(), 500.into())
        ],
        "newest first: {log}"
    );
    for attempt in attempts {
        assert_eq!(attempt["distribution_id"], 1);
        assert!(
            attempt["latency_ms"].as_u64().is_some() && attempt["time"].as_str().is_some_and(|t| t.len() == 19),
            "{attempt}"
        );
    }
    assert!(attempts[1]["error"].as_str().is_some_and(|e| e.contains("500")), "{log}");
    let limited = get_data(&herald, &format!("/api/v3/herald/deliveries/{flaky}?limit=1")).await;
    assert_eq!(limited["count"], 1);

    // Confirmed by the answer's body: the log keeps the start of what the callback said.
    let log = get_data(&herald, &format!("/api/v3/herald/deliveries/{refused}")).await;
    let results: Vec<_> = log["info"].as_array().expect("info").iter().map(|a| a["result"].clone()).collect();
    assert_eq!(results, ["dead_lettered", "failed"], "{log}");
    assert_eq!(log["info"][0]["answer"], r#"{"result": false}"#);
    assert_eq!(log["info"][0]["http_status"], 200);

    let minutes = get_data(&herald, &format!("/api/v3/herald/deliveries/{flaky}/minutes")).await;
    let sum = |field: &str| {
        minutes["info"].as_array().expect("info").iter().map(|m| m[field].as_i64().unwrap_or(0)).sum::<i64>()
    };
    assert_eq!((sum("attempts"), sum("failures")), (3, 2), "{minutes}");

    let unknown = reqwest::get(herald.url("/api/v3/herald/deliveries/999999")).await.expect("GET");
    let answer: serde_json::Value = unknown.json().await.expect("JSON envelope");
    assert_eq!(answer["bk_error_code"], 1199006, "an unknown subscription: {answer}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_callback_past_its_timeout_is_a_failed_attempt_within_the_deadline() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("timeout", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    let id = subscribe(
        &api,
        "slow",
        &server.url("hang", "slow"),
        serde_json::json!({"timeoutSeconds": 2, "retry": {"maxAttempts": 1}}),
    )
    .await;
    publish(&herald, host_event("0", 1)).await;
    let sub = wait_statistics(&api, "slow", 1, 1).await;
    let error = sub.status.unwrap().statistics.unwrap().last_error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    // The attempt's own latency, as herald logged it: cut at timeoutSeconds (the callback
    // never answers), give or take scheduling; not the wall clock of status writes and watches.
    let log: serde_json::Value = reqwest::get(herald.url(&format!("/api/v3/herald/deliveries/{id}")))
        .await
        .expect("GET the delivery log")
        .json()
        .await
        .expect("JSON");
    let latency = log["data"]["info"][0]["latency_ms"].as_u64().unwrap_or_default();
    assert!((2_000..4_000).contains(&latency), "the attempt took {latency} ms: {log}");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_hanging_callback_never_delays_another_subscription() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("isolation", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "fast", &server.url("ok", "fast"), serde_json::json!({})).await;
    // B's first attempt hangs for its whole timeout; A must get everything well before it.
    subscribe(&api, "hung", &server.url("hang", "hung"), serde_json::json!({"timeoutSeconds": 120})).await;
    let started = Instant::now();
    for chunk in 0..10 {
        let events: Vec<serde_json::Value> = (1..=100).map(|i| host_event("0", chunk * 100 + i)).collect();
        publish(&herald, serde_json::Value::Array(events)).await;
    }
    // Fails after 110 s: B's attempt, begun after the publishes, runs until 120 s at least.
    let fast = server.wait_for("fast", 1000, Duration::from_secs(110)).await;
    println!("A got all 1,000 events {:?} after the first publish", started.elapsed());
    assert_eq!(
        fast.iter().map(common::callback::Received::distribution_id).collect::<Vec<_>>(),
        (1..=1000).collect::<Vec<_>>()
    );
    assert_eq!(server.received("hung").len(), 1, "B is still on its first attempt");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn sigkill_during_a_stream_loses_nothing_and_keeps_order() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("crash", &[]).await;
    let server = CallbackServer::start().await;
    let dir = std::env::temp_dir().join(format!("{}-herald", ns.name));
    let mut herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    let api = cluster.subscriptions(&ns);
    const SUBSCRIPTIONS: usize = 10;
    const EVENTS: i64 = 10_000;
    for i in 0..SUBSCRIPTIONS {
        subscribe(&api, &format!("s{i}"), &server.url("ok", &format!("s{i}")), serde_json::json!({})).await;
    }
    // A producer publishes batches of 100 every 40 ms; the kill lands mid-stream, however
    // fast deliveries keep up.
    let target = std::sync::Arc::new(std::sync::Mutex::new(herald.url("/api/v3/event/publish")));
    let producer_target = target.clone();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let producer_sent = sent.clone();
    let producer = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut acknowledged: Vec<i64> = Vec::new();
        for start in (0..EVENTS).step_by(100) {
            producer_sent.store(start, std::sync::atomic::Ordering::Relaxed);
            let batch: Vec<serde_json::Value> = (start + 1..=start + 100).map(|i| host_event("0", i)).collect();
            let url = producer_target.lock().unwrap().clone();
            let answer = client.post(url).json(&batch).send().await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                acknowledged.extend(start + 1..=start + 100);
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        acknowledged
    });
    // 1,000 deliveries in, or two fifths of the batches out when deliveries lag behind.
    while server.received("s0").len() < 1000 && sent.load(std::sync::atomic::Ordering::Relaxed) < EVENTS * 2 / 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    herald.kill();
    herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    *target.lock().unwrap() = herald.url("/api/v3/event/publish");
    let acknowledged = producer.await.unwrap();
    println!("{} of {EVENTS} events acknowledged at publish", acknowledged.len());
    assert!(acknowledged.len() as i64 > EVENTS / 2);
    assert!((acknowledged.len() as i64) < EVENTS, "some publishes met the dead process: the kill was mid-stream");
    // Every acknowledged event reaches every subscription; first receipts are in order.
    let mut duplicates = BTreeMap::new();
    for i in 0..SUBSCRIPTIONS {
        let key = format!("s{i}");
        let deadline = Instant::now() + Duration::from_secs(240);
        let got = loop {
            let got = server.received(&key);
            let seen: HashSet<i64> =
                got.iter().map(|r| r.body["data"][0]["cur_data"]["bk_host_id"].as_i64().unwrap_or(-1)).collect();
            if acknowledged.iter().all(|s| seen.contains(s)) {
                break got;
            }
            assert!(Instant::now() < deadline, "{key}: {} of {} acknowledged events", seen.len(), acknowledged.len());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut seen = HashSet::new();
        let mut last = 0;
        let mut dup = 0;
        for r in &got {
            let d = r.distribution_id();
            if seen.insert(d) {
                assert!(d > last, "{key}: distribution_id {d} after {last}: out of order");
                last = d;
            } else {
                dup += 1;
            }
        }
        assert!(dup <= 1 + 64, "{key}: {dup} duplicates exceed maxInFlight + one commit batch");
        duplicates.insert(key, dup);
    }
    println!("duplicates per subscription after SIGKILL: {duplicates:?}");
    // Status statistics equal what the callbacks counted.
    for i in 0..SUBSCRIPTIONS {
        let key = format!("s{i}");
        let sub = wait_for(&api, &key, Duration::from_secs(60), "statistics caught up", |s| {
            s.status.as_ref().and_then(|st| st.statistics.as_ref()).is_some_and(|st| st.pending == 0)
        })
        .await;
        let received = i64::try_from(server.received(&key).len()).unwrap();
        let stats = sub.status.unwrap().statistics.unwrap();
        assert_eq!(stats.failure, 0);
        // Attempts whose outcome the crash lost are delivered again but counted once.
        assert!(
            stats.total <= received && stats.total >= received - duplicates[&key],
            "{key}: total {} vs received {received}",
            stats.total
        );
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn status_writes_stay_within_the_budget_whatever_the_event_rate() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("budget", &[]).await;
    let server = CallbackServer::start().await;
    // A small budget makes the bound visible against a high event rate.
    let herald = Herald::start(&cluster, &ns, "delivery:\n  statusWritesPerSecond: 2\n").await;
    let api = cluster.subscriptions(&ns);
    for i in 0..5 {
        subscribe(&api, &format!("b{i}"), &server.url("ok", &format!("b{i}")), serde_json::json!({})).await;
    }
    // Count status writes on the API server's side: every MODIFIED event of these objects.
    let list = api.list(&Default::default()).await.unwrap();
    let version = list.metadata.resource_version.unwrap();
    let watch_api = api.clone();
    let watcher = tokio::spawn(async move {
        use futures::{StreamExt, TryStreamExt};
        let mut stream = watch_api.watch(&kube::api::WatchParams::default(), &version).await.unwrap().boxed();
        let mut writes = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Ok(Some(event))) = tokio::time::timeout_at(deadline, stream.try_next()).await {
            if matches!(event, kube::api::WatchEvent::Modified(_)) {
                writes += 1;
            }
        }
        writes
    });
    let started = Instant::now();
    let mut events = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let batch: Vec<serde_json::Value> = (0..50).map(|i| host_event("0", i)).collect();
        publish(&herald, serde_json::Value::Array(batch)).await;
        events += 50;
    }
    let writes = watcher.await.unwrap();
    println!("{events} events x 5 subscriptions in 8 s; {writes} status writes in 10 s (budget 2/s)");
    assert!(events >= 500, "the event rate was high ({events} events)");
    assert!(writes <= 2 * 10 + 2, "{writes} status writes in 10 s exceed the budget of 2/s");
    assert!(writes >= 1, "status was written at all");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_100_mb_response_body_costs_at_most_the_body_cap_in_memory() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("bigbody", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    subscribe(
        &api,
        "big",
        &server.url("big-100", "big"),
        serde_json::json!({"retry": {"maxAttempts": 1}, "confirm": {"mode": "regular", "pattern": "nomatch"}}),
    )
    .await;
    let before = proc_kb(herald.pid(), "VmHWM");
    publish(&herald, host_event("0", 1)).await;
    wait_statistics(&api, "big", 1, 1).await;
    let after = proc_kb(herald.pid(), "VmHWM");
    let grown_mb = (after.saturating_sub(before)) as f64 / 1024.0;
    println!("VmHWM {before} kB -> {after} kB (+{grown_mb:.1} MB) for a 100 MB body; cap 1 MB");
    assert!(grown_mb < 1.0 + 32.0, "peak RSS grew {grown_mb:.1} MB");
}

#[tokio::test]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn only_the_lease_holder_is_ready_and_a_successor_takes_over() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("leader", &[]).await;
    let server = CallbackServer::start().await;
    let mut leader = Herald::start(&cluster, &ns, "").await;
    let standby_dir = std::env::temp_dir().join(format!("{}-standby", ns.name));
    let mut standby = Herald::spawn(&cluster, &ns, "", &standby_dir, "standby");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!standby.is_ready().await, "a non-leader is not ready");
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "led", &server.url("ok", "led"), serde_json::json!({})).await;
    leader.kill();
    // The lease (5 s in tests) expires and the standby takes over.
    standby.wait_ready(Duration::from_secs(30)).await;
    publish(&standby, host_event("0", 1)).await;
    server.wait_for("led", 1, Duration::from_secs(30)).await;
}
