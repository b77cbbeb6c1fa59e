//! Full suite only: schemathesis and the soak.

use super::*;

/// schemathesis (PyPI) against herald's /openapi.json: generated and negative requests
/// to every operation but the probes (ping, telnet, testing_connection dial what the
/// body names, so generated URLs could leave the machine). Callbacks of subscriptions it
/// creates go through a proxy on a closed loopback port, so nothing leaves the machine
/// either. Checks: no server error, documented status codes, content types and response
/// schemas. The binary: HERALD_SCHEMATHESIS, else the venv tests/faults/run-all.sh makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full suite (tests/faults/run-all.sh): needs schemathesis"]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let _turn = exclusive().await;
    let binary = std::env::var_os("HERALD_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/herald-faults/venv/bin/schemathesis")
    });
    assert!(binary.exists(), "schemathesis not found at {} (tests/faults/run-all.sh installs it)", binary.display());
    let cluster = cluster().await;
    let ns = cluster.namespace("f-schema", &[]).await;
    let apps = test_dir(&ns, "apps.yaml");
    std::fs::write(&apps, "apps:\n- appCode: cmdb\n  appSecret: fuzz\n  accounts: ['*']\n").unwrap();
    let config = format!(
        "callbackGuard:\n  proxy: {SAFE_CALLBACK}\napi:\n  maxBodyBytes: 65536\n  esbCredentialsFile: {}\n",
        apps.display()
    );
    let herald = Herald::start(&cluster, &ns, &config).await;
    let report = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let examples = scaled(50, 200).to_string();
    let seed = seed().to_string();
    let checks = std::env::var("HERALD_SCHEMATHESIS_CHECKS").unwrap_or_else(|_| {
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance".into()
    });
    std::fs::create_dir_all(&report).unwrap();
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(&binary)
            .args(["run", &herald.url("/openapi.json"), "--url", &herald.url(""), "--checks", &checks])
            .args([
                "--exclude-path-regex",
                "(ping|telnet|testing_connection)",
                "--max-examples",
                &examples,
                "--seed",
                &seed,
            ])
            .args([
                "--workers",
                "2",
                "--request-timeout",
                "30",
                "--phases",
                "examples,coverage,fuzzing",
                "--suppress-health-check",
                "all",
            ])
            .args(["--report", "junit", "--report-dir"])
            .arg(&report)
            .env("NO_COLOR", "1")
            // schemathesis keeps a cache directory (.schemathesis/) in its working directory.
            .current_dir(&report)
            .output()
            .expect("run schemathesis")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    std::fs::write(report.join("output.txt"), &text).unwrap();
    println!("{text}");
    assert!(alive(herald.pid()), "herald survived");
    assert!(output.status.success(), "schemathesis found problems (report in {})", report.display());
}

/// 10 minutes (HERALD_SOAK_SECONDS) at about half the measured maximum throughput, with
/// herald's RSS and the store's size sampled every 10 s: both flat once steady, and
/// delivery keeps pace. Samples: target/tmp/soak.csv.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full suite (tests/faults/run-all.sh): 10-minute soak"]
async fn a_soak_at_half_the_maximum_throughput_keeps_memory_and_store_flat() {
    let _turn = exclusive().await;
    let soak =
        Duration::from_secs(std::env::var("HERALD_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600));
    let cluster = cluster().await;
    let ns = cluster.namespace("f-soak", &[]).await;
    let server = CallbackServer::start().await;
    let dir = test_dir(&ns, "herald");
    let store = dir.join("store");
    let herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    let api = cluster.subscriptions(&ns);
    const SUBSCRIPTIONS: usize = 4;
    for i in 0..SUBSCRIPTIONS {
        subscribe(&api, &format!("s{i}"), &server.url("ok", &format!("s{i}")), json!({"maxInFlight": 4})).await;
    }
    let delivered = || (0..SUBSCRIPTIONS).map(|i| server.received(&format!("s{i}")).len()).min().unwrap_or(0);

    // The maximum: four producers back to back for 20 s; the rate is what was both
    // accepted and delivered to every subscription in that time.
    let measure = Duration::from_secs(20);
    let started = Instant::now();
    let producers: Vec<_> = (0..4i64)
        .map(|p| {
            let url = herald.url("/api/v3/event/publish");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut accepted = 0usize;
                let mut next = p * 10_000_000;
                while started.elapsed() < measure {
                    if client
                        .post(&url)
                        .json(&host_events(next..next + 50))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                    {
                        accepted += 50;
                    }
                    next += 50;
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for producer in producers {
        accepted += producer.await.unwrap();
    }
    let delivered_in_time = delivered();
    let rate = (accepted.min(delivered_in_time) as f64 / measure.as_secs_f64()).max(10.0);
    println!(
        "maximum: {accepted} events accepted, {delivered_in_time} delivered to each of {SUBSCRIPTIONS} subscriptions in {measure:?}: {rate:.0} events/s"
    );
    // Let the backlog drain before the soak.
    let drain = Instant::now();
    while delivered() < accepted && drain.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let target = rate / 2.0;
    let batch = 10i64;
    let pause = Duration::from_secs_f64(batch as f64 / target);
    let producer = Producer::start(herald.url("/api/v3/event/publish"), 100_000_000, batch, pause);
    let base = delivered();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut csv = String::from("seconds,rss_kb,store_bytes,delivered_per_subscription\n");
    while started.elapsed() < soak {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let sample =
            (started.elapsed().as_secs(), proc_kb(herald.pid(), "VmRSS"), store_bytes(&store), delivered() - base);
        csv.push_str(&format!("{},{},{},{}\n", sample.0, sample.1, sample.2, sample.3));
        samples.push(sample);
    }
    let acknowledged = producer.finish().await;
    let csv_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("soak.csv");
    std::fs::write(&csv_path, &csv).unwrap();
    println!(
        "soak at {target:.0} events/s x {SUBSCRIPTIONS} subscriptions for {soak:?}; samples in {}:\n{csv}",
        csv_path.display()
    );
    // Steady after the first quarter: the last third may not exceed the first third of the
    // steady part by more than 10 % plus a little slack.
    let steady: Vec<_> = samples.iter().filter(|s| s.0 >= soak.as_secs() / 4).collect();
    let third = (steady.len() / 3).max(1);
    let (early, late) = (&steady[..third], &steady[steady.len() - third..]);
    let max = |part: &[&(u64, u64, u64, usize)], f: fn(&(u64, u64, u64, usize)) -> u64| {
        part.iter().map(|s| f(s)).max().unwrap_or(0)
    };
    let (rss_early, rss_late) = (max(early, |s| s.1), max(late, |s| s.1));
    let (store_early, store_late) = (max(early, |s| s.2), max(late, |s| s.2));
    println!(
        "RSS {rss_early} -> {rss_late} kB; store {store_early} -> {store_late} B; {} events acknowledged",
        acknowledged.len()
    );
    assert!(rss_late <= rss_early + rss_early / 10 + 8 * 1024, "RSS grew from {rss_early} kB to {rss_late} kB");
    assert!(
        store_late <= store_early + store_early / 10 + (1 << 20),
        "the store grew from {store_early} B to {store_late} B"
    );
    // Delivery kept pace: within 10 s of work of the end.
    wait_until_none_missing("s0", Duration::from_secs(60), || {
        let seen: HashSet<i64> = server.received("s0").iter().map(|r| host_id(&r.body)).collect();
        let missing: Vec<i64> = acknowledged.iter().copied().filter(|s| !seen.contains(s)).collect();
        async move { missing }
    })
    .await;
}
