//! Callback faults.

use super::*;

/// Hostile and broken receivers side by side with a healthy one: connection reset (at
/// once, and mid-body), a hang, a slowloris answer, a 301 to itself, a 301 to a refused
/// address, an untrusted TLS certificate and a 503 storm. Each attempt counts as one
/// failed attempt (docs/design.md §5), no redirect is followed, attempts run out into dead
/// letters, the healthy subscription keeps receiving promptly, and memory stays bounded.
/// (429 with Retry-After and 410 Gone: tests/delivery.rs `confirm_modes_gone_and_throttling`;
/// a 100 MB body: tests/delivery.rs `a_100_mb_response_body_costs_at_most_the_body_cap_in_memory`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn hostile_callbacks_fail_their_own_attempts_and_never_slow_a_healthy_subscription() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-callbacks", &[]).await;
    let ok = CallbackServer::start().await;
    let faults = FaultServer::start().await;
    let (tls_port, tls_requests) = untrusted_tls_server(&test_dir(&ns, "tls")).await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    let hostile = json!({"timeoutSeconds": 2, "maxInFlight": 8, "retry": {"maxAttempts": 2, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1, "jitterPercent": 0}});
    // (subscription, URL, what its lastError must say)
    let cases: Vec<(&str, String, &str)> = vec![
        ("reset", faults.url("reset", "reset"), ""),
        ("reset-mid-body", faults.url("reset-mid-body", "reset-mid-body"), ""),
        ("hang", faults.url("hang", "hang"), "timed out"),
        ("slowloris", faults.url("slowloris", "slowloris"), "timed out"),
        ("redirect-self", faults.url("redirect-self", "redirect-self"), "301"),
        ("redirect-refused", faults.url("redirect-refused", "redirect-refused"), "301"),
        ("bad-tls", format!("https://127.0.0.1:{tls_port}/bad-tls"), "certificate"),
        ("storm", faults.url("status-503", "storm"), "503"),
    ];
    for (name, url, _) in &cases {
        subscribe(&api, name, url, hostile.clone()).await;
    }
    subscribe(&api, "healthy", &ok.url("ok", "healthy"), json!({})).await;
    let hwm_before = proc_kb(herald.pid(), "VmHWM");

    // One event every 250 ms for 5 s; each reaches every subscription.
    let mut sent = Vec::new();
    let started = Instant::now();
    let mut seq = 1;
    while started.elapsed() < Duration::from_secs(5) {
        publish_ok(&herald, &host_events([seq])).await;
        sent.push((seq, Instant::now()));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let events = i64::try_from(sent.len()).unwrap();
    let healthy = ok.wait_for("healthy", sent.len(), Duration::from_secs(30)).await;
    let arrived: HashMap<i64, Instant> = healthy.iter().map(|r| (host_id(&r.body), r.at)).collect();
    let worst = sent.iter().map(|(s, at)| arrived[s].saturating_duration_since(*at)).max().unwrap_or_default();
    println!("healthy subscription: {events} events, worst latency {worst:?} beside {} hostile receivers", cases.len());
    assert!(worst < Duration::from_secs(1), "the healthy subscription was slowed to {worst:?}");

    // Every attempt failed and counted; attempts ran out into dead letters.
    let mut table = Vec::new();
    for (name, _, error) in &cases {
        let s = wait_stats(&api, name, Duration::from_secs(90), "every event dead-lettered", |s| {
            s.dead_lettered == events && s.pending == 0
        })
        .await;
        let last_error = s.last_error.clone().unwrap_or_default();
        table.push(format!(
            "{name}: total {} failure {} deadLettered {} lastError {last_error:?}",
            s.total, s.failure, s.dead_lettered
        ));
        assert_eq!(
            (s.total, s.failure, s.delivered),
            (2 * events, 2 * events, 0),
            "{name}: two failed attempts per event"
        );
        assert!(last_error.contains(error), "{name}: lastError {last_error:?} should say {error:?}");
    }
    println!("{}", table.join("\n"));
    // One request per attempt, redirects never followed, TLS never got through.
    for name in ["reset", "reset-mid-body", "hang", "slowloris", "redirect-self", "redirect-refused", "storm"] {
        assert_eq!(faults.hits(name).len(), sent.len() * 2, "{name}: one request per attempt");
    }
    assert!(faults.hits("redirect-refused-followed").is_empty(), "a redirect to a refused address was followed");
    assert_eq!(tls_requests.load(Ordering::Acquire), 0, "a request got through an untrusted certificate");
    let hwm_after = proc_kb(herald.pid(), "VmHWM");
    let grown_mb = hwm_after.saturating_sub(hwm_before) as f64 / 1024.0;
    println!("VmHWM {hwm_before} kB -> {hwm_after} kB (+{grown_mb:.1} MB)");
    assert!(grown_mb < 48.0, "peak RSS grew {grown_mb:.1} MB");
}
