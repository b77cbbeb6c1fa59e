//! Holes a review found (docs/RELIABILITY.md, "Hardening"), each shown closed against a
//! running herald.

use super::*;
use futures::StreamExt;

/// Creates `count` subscriptions to `hostcreate` in `namespace`, 16 at a time, all posting
/// to `url`, and waits until every one is Ready.
async fn many_ready_subscriptions(cluster: &Cluster, namespace: &str, count: usize, url: &str) {
    let api = cluster.subscriptions(namespace);
    futures::stream::iter(0..count)
        .for_each_concurrent(16, |n| {
            let api = api.clone();
            let spec = json!({ "subscriptionName": format!("s{n}"), "callbackUrl": url, "events": ["hostcreate"] });
            async move {
                api.create(&PostParams::default(), &subscription(&format!("s{n}"), spec)).await.expect("create");
            }
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let listed = api.list(&Default::default()).await.expect("list");
        let ready = listed.items.iter().filter(|s| ready(s).is_some_and(|(status, _)| status == "True")).count();
        if ready == count {
            return;
        }
        assert!(Instant::now() < deadline, "{ready} of {count} Ready after 300 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Item 0 (data loss): readiness used to mean "caches synced" while publish matching was
/// still being filled by reconciles, so a publish at the first ready after a restart was
/// accepted with 200 and queued for only some of the Ready subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_publish_at_the_first_ready_after_sigkill_reaches_every_ready_subscription() {
    const SUBSCRIPTIONS: usize = 2000;
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-ready", &[]).await;
    let server = CallbackServer::start().await;
    let dir = test_dir(&ns, "herald");
    let mut herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    many_ready_subscriptions(&cluster, &ns, SUBSCRIPTIONS, &server.url("ok", "ready")).await;

    herald.kill();
    let instance = format!("herald-{}", ns.name);
    let restarted = Herald::from_launch(&Launch::new(&cluster.kubeconfig, &ns, &instance, &dir));
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !client.get(restarted.url("/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "not ready again:\n{}", restarted.log_text());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer = publish(&restarted, &host_events([1])).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["data"]["queued"], SUBSCRIPTIONS, "queued for every Ready subscription: {answer:?}");
    let delivered = server.wait_for("ready", SUBSCRIPTIONS, Duration::from_secs(180)).await;
    let subscriptions: HashSet<i64> = delivered.iter().filter_map(|r| r.body["subscription_id"].as_i64()).collect();
    assert_eq!(subscriptions.len(), SUBSCRIPTIONS, "every subscription got the event");
}

/// A search condition of `regexes` `$regex` terms over `\w{20}` (most of a MiB compiled
/// each), padded with `$in` values to `bytes`.
fn hostile_search(regexes: usize, bytes: usize) -> Value {
    let terms: Vec<Value> = (0..regexes).map(|i| json!({ format!("f{i}"): {"$regex": "\\w{20}"} })).collect();
    let padding = "x".repeat(64);
    let filler: Vec<Value> = (0..bytes / 70).map(|_| Value::String(padding.clone())).collect();
    json!({ "condition": { "$or": terms, "subscription_name": {"$nin": filler} } })
}

/// Item 1: a search body used to be parsed, and its regexes compiled, before the caller
/// was authorised: one request of 100 `$regex` terms from a token with no rights raised
/// RSS by about 90 MB. Now the caller is authorised first, and a condition is bounded
/// (regex terms, compiled size, depth, terms), past which it is 1199006 naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn an_unauthorised_flood_of_hostile_searches_costs_no_memory_and_limits_name_themselves() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-flood", &[]).await;
    // Search bodies up to publish's limit, as before routes had limits of their own: the
    // point here is that a body is not parsed before its caller is authorised.
    let herald =
        Herald::start(&cluster, &ns, "api:\n  maxBodyBytesExceptPublish: 4194304\n  auth:\n    anonymous: false\n")
            .await;
    let nobody = cluster.service_account_token(&ns, "nobody", "herald");
    let searcher = cluster.service_account_token(&ns, "searcher", "herald");
    cluster.grant_accounts(&ns, "searcher", &["list"], &["0"]);
    let url = herald.url("/api/v3/event/subscribe/search/0/0");
    let client = reqwest::Client::new();
    let search = |token: &str, body: &Value| send(client.post(&url).bearer_auth(token).json(body));

    // The limits name themselves, for a caller who may search.
    let granted_by = Instant::now() + Duration::from_secs(20);
    let over_limit = loop {
        let answer = search(&searcher, &hostile_search(9, 0)).await.unwrap();
        if answer.status != 403 {
            break answer;
        }
        assert!(Instant::now() < granted_by, "the grant did not take effect: {answer:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((over_limit.status, code(&over_limit.body)), (400, 1_199_006), "{over_limit:?}");
    assert!(over_limit.text.contains("more than 8 $regex terms"), "{}", over_limit.text);
    assert_eq!(search(&searcher, &hostile_search(8, 0)).await.unwrap().status, 200);

    // An unauthorised caller is refused before anything of the body is parsed: 403 even
    // for a condition that would be refused as over the limits.
    let refused = search(&nobody, &hostile_search(100, 0)).await.unwrap();
    assert_eq!((refused.status, code(&refused.body)), (403, 9_900_403), "{refused:?}");

    let pid = herald.pid();
    let idle_kb = proc_kb(pid, "VmRSS");
    let body = hostile_search(600, 3 << 20).to_string();
    let peak_kb = Arc::new(std::sync::atomic::AtomicU64::new(idle_kb));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak_kb, sampling) = (peak_kb.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak_kb.fetch_max(proc_kb(pid, "VmRSS"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let requests = scaled(400, 4000);
    let statuses: Vec<u16> = futures::stream::iter(0..requests)
        .map(|_| {
            let request =
                client.post(&url).bearer_auth(&nobody).header("content-type", "application/json").body(body.clone());
            async move { send(request).await.map(|a| a.status).unwrap_or(0) }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak_kb = peak_kb.load(Ordering::Relaxed);
    let grown_mb = (peak_kb.saturating_sub(idle_kb)) as f64 / 1024.0;
    println!(
        "{requests} unauthorised searches of {} KiB with 600 $regex terms, 8 at a time: RSS idle {idle_kb} kB, peak {peak_kb} kB (+{grown_mb:.1} MB); machine memory {} MB",
        body.len() / 1024,
        machine_memory_mb()
    );
    assert!(statuses.iter().all(|s| *s == 403), "every request refused: {:?}", statuses.iter().collect::<HashSet<_>>());
    assert!(grown_mb < 64.0, "RSS grew {grown_mb:.1} MB under the flood");
}

/// A random search condition from the grammar, with the limits in play: nesting up to
/// 20, up to 12 `$regex` terms, `$in` lists up to 1,500 values, patterns from cheap to
/// hostile.
fn generated_condition(rng: &mut fastrand::Rng, depth: u32, regexes: &mut u32) -> Value {
    const PATTERNS: [&str; 6] = ["^host", "\\w{20}", "(a+)+$", "[", "\\w{100}", "x{1000}{1000}"];
    if depth > 0 && rng.u8(..4) == 0 {
        let clauses: Vec<Value> = (0..rng.usize(1..4)).map(|_| generated_condition(rng, depth - 1, regexes)).collect();
        return json!({ if rng.bool() { "$and" } else { "$or" }: clauses });
    }
    let field = ["subscription_name", "callback_url", "statistics.total", "subscription_id"][rng.usize(..4)];
    let test = match rng.u8(..5) {
        0 => {
            *regexes += 1;
            json!({"$regex": PATTERNS[rng.usize(..PATTERNS.len())]})
        }
        1 => json!({"$in": (0..rng.usize(..1500)).collect::<Vec<_>>()}),
        2 => json!({"$gt": rng.i64(..)}),
        3 => json!({"$exists": rng.bool()}),
        _ => json!({"$ne": "x".repeat(rng.usize(..2000))}),
    };
    json!({ field: test })
}

/// The fuzz run with the limits in play: generated search conditions (deep, regex-heavy,
/// long lists) and publish bodies (many events, large data) never get a 5xx, are answered
/// 200 or with a documented bad-input code, and herald's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn generated_conditions_and_publish_bodies_never_5xx_and_memory_stays_bounded() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-limits", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "fuzzed", &server.url("ok", "fuzzed"), json!({})).await;
    let mut rng = fastrand::Rng::with_seed(seed());
    println!("seed {}", seed());
    let client = reqwest::Client::new();
    let pid = herald.pid();
    let idle_kb = proc_kb(pid, "VmRSS");
    let mut peak_kb = idle_kb;
    let mut by_code: BTreeMap<(u16, i64), usize> = BTreeMap::new();
    for round in 0..scaled(300, 3000) {
        let (path, body) = if round % 3 == 2 {
            let events: Vec<Value> = (0..rng.usize(1..800))
                .map(|n| {
                    let mut event = host_event(n as i64);
                    if rng.u8(..10) == 0 {
                        event["data"][0]["cur_data"]["blob"] = Value::String("y".repeat(rng.usize(..4000)));
                    }
                    if rng.u8(..20) == 0 {
                        event["action"] = "upsert".into();
                    }
                    event
                })
                .collect();
            ("/api/v3/event/publish", Value::Array(events))
        } else {
            let mut regexes = 0;
            let condition = generated_condition(&mut rng, 20, &mut regexes);
            ("/api/v3/event/subscribe/search/0/0", json!({ "condition": condition, "page": {"limit": 20} }))
        };
        let answer = send(client.post(herald.url(path)).json(&body)).await.expect("an answer");
        *by_code.entry((answer.status, code(&answer.body))).or_default() += 1;
        assert!(answer.status < 500, "{path}: {} {}", answer.status, answer.text.chars().take(300).collect::<String>());
        let documented = [0, 1_199_000, 1_199_006, 1_199_010];
        assert!(
            matches!(answer.status, 200 | 400) && documented.contains(&code(&answer.body)),
            "{path}: {} {}",
            answer.status,
            answer.text.chars().take(300).collect::<String>()
        );
        if round % 10 == 0 {
            peak_kb = peak_kb.max(proc_kb(pid, "VmRSS"));
        }
    }
    let hwm_kb = proc_kb(pid, "VmHWM");
    println!(
        "answers by (status, code): {by_code:?}; RSS idle {idle_kb} kB, peak sampled {peak_kb} kB, VmHWM {hwm_kb} kB; machine memory {} MB",
        machine_memory_mb()
    );
    assert!(peak_kb.saturating_sub(idle_kb) < 128 * 1024, "RSS grew {} kB", peak_kb - idle_kb);
}

/// Item 8: update and delete by id looked subscriptions up without the tenancy rule that
/// search applies, so a caller for account X could change a `NamespaceNotAllowed` object in
/// a namespace that merely claimed X.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn update_and_delete_by_id_reach_only_subscriptions_the_account_may_have() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-tenant", &[]).await;
    let elsewhere = cluster.namespace("f-elsewhere", &[]).await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&elsewhere);
    api.create(&PostParams::default(), &subscription("claims-0", basic_spec("claims-0"))).await.expect("create");
    let claimed = wait_reason(&api, "claims-0", "NamespaceNotAllowed").await;
    let id = id(&claimed).expect("an id, though not Ready");
    let client = reqwest::Client::new();
    let path = herald.url(&format!("/api/v3/event/subscribe/0/0/{id}"));
    let form = json!({"subscription_name": "taken-over", "callback_url": "http://127.0.0.1:9/x", "subscription_form": "hostcreate"});
    let updated = send(client.put(&path).json(&form)).await.unwrap();
    assert_eq!((updated.status, code(&updated.body)), (400, 1_103_003), "{updated:?}");
    let deleted = send(client.delete(&path)).await.unwrap();
    assert_eq!((deleted.status, code(&deleted.body)), (400, 1_103_001), "{deleted:?}");
    let unchanged = api.get("claims-0").await.expect("still there");
    assert_eq!(unchanged.spec.subscription_name, "claims-0");
}

/// Item 9: a deleted subscription kept matching publishes until the next sweep (30 s):
/// reconcile never runs for a deleted object. Its delete event now takes it out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn a_deleted_subscription_stops_matching_at_once() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-deleted", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "going", &server.url("ok", "going"), json!({})).await;
    let answer = publish(&herald, &host_events([1])).await;
    assert_eq!(answer.body["data"]["queued"], 1, "{answer:?}");
    api.delete("going", &Default::default()).await.expect("delete");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = publish(&herald, &host_events([2])).await;
        if answer.body["data"]["queued"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still matched 5 s after its deletion: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
