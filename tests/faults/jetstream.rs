//! The JetStream engine under faults: herald SIGKILLed while it publishes and delivers,
//! and a NATS node SIGKILLed (and started again) under the same stream, against the
//! 3-node cluster tests/run.sh starts (tests/nats/up.sh).

use super::*;

/// herald's config for the JetStream engine, with streams of its own (`name`).
fn jetstream_config(name: &str) -> String {
    let urls = std::env::var("HERALD_TEST_NATS_URLS").expect("HERALD_TEST_NATS_URLS is set by tests/run.sh");
    let urls: Vec<String> = urls.split(',').map(|u| format!("'{u}'")).collect();
    format!("store: {{engine: jetstream, jetstream: {{urls: [{}], stream: {name}}}}}\n", urls.join(", "))
}

/// A NATS node of tests/nats/up.sh: SIGKILL by its recorded PID, start from its recorded
/// command line.
struct NatsNode(&'static str);

impl NatsNode {
    fn state() -> PathBuf {
        PathBuf::from(std::env::var("HERALD_CONTROLPLANE").expect("HERALD_CONTROLPLANE"))
    }
    fn kill(&self) {
        let pid = std::fs::read_to_string(Self::state().join(format!("{}.pid", self.0))).expect("pid file");
        let status = std::process::Command::new("kill").args(["-9", pid.trim()]).status().expect("kill");
        assert!(status.success(), "kill -9 {}", self.0);
    }
    fn start(&self) {
        let script = format!(
            "cd {state} && {{ eval \"exec $(cat {name}.cmd)\" >> {name}.log 2>&1 & echo $! > {name}.pid; }}",
            state = Self::state().display(),
            name = self.0
        );
        let status = std::process::Command::new("bash").args(["-c", &script]).status().expect("start node");
        assert!(status.success());
    }
}

/// Distribution ids received (first receipts) and whether they are exactly 1..=n.
fn first_receipts(ids: impl IntoIterator<Item = i64>) -> Vec<i64> {
    let mut seen = HashSet::new();
    ids.into_iter().filter(|d| seen.insert(*d)).collect()
}

/// SIGKILL herald at seeded random points, then SIGKILL one NATS node for 5 s, while a
/// producer publishes and two subscriptions deliver (maxInFlight 1 and 8). Every event
/// answered 200 is delivered; distribution ids are contiguous from 1; first receipts are in
/// order with one in flight; each herald crash costs at most maxInFlight + 64 redeliveries;
/// status counts each delivery once.
/// Fast subset: 3 herald rounds; full suite: 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_sigkills_of_herald_and_of_a_nats_node_lose_nothing() {
    let _turn = exclusive().await;
    let rounds = scaled(3, 10);
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    println!("JetStream SIGKILL rounds: {rounds}, seed {seed} (HERALD_FAULTS_SEED)");
    let cluster = cluster().await;
    let ns = cluster.namespace("f-js", &[]).await;
    let ok = CallbackServer::start().await;
    let dir = test_dir(&ns, "herald");
    let config = jetstream_config(&format!("HF{:08X}", rng.u32(..)));
    let mut herald = Herald::start_in(&cluster, &ns, &config, &dir).await;
    let api = cluster.subscriptions(&ns);
    let in_flight = [("narrow", 1usize), ("wide", 8)];
    subscribe(&api, "narrow", &ok.url("ok", "narrow"), json!({})).await;
    subscribe(&api, "wide", &ok.url("slow-3", "wide"), json!({"maxInFlight": 8})).await;

    let producer = Producer::start(herald.url("/api/v3/event/publish"), 1, 10, Duration::from_millis(40));
    let mut kills = Vec::new();
    for round in 0..rounds {
        let delay = Duration::from_millis(rng.u64(300..3000));
        tokio::time::sleep(delay).await;
        kills.push(Instant::now());
        herald.kill();
        println!("round {round}: herald SIGKILL after {delay:?}");
        herald = Herald::start_in(&cluster, &ns, &config, &dir).await;
        producer.retarget(herald.url("/api/v3/event/publish"));
    }
    let before_node = producer_acknowledged_so_far(&ok, "narrow");
    let node = NatsNode("nats-2");
    node.kill();
    println!("nats-2 SIGKILL (after {before_node} narrow receipts)");
    tokio::time::sleep(Duration::from_secs(5)).await;
    node.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged = producer.finish().await;
    println!("{} events acknowledged across {rounds} herald SIGKILLs and one NATS node SIGKILL", acknowledged.len());
    assert!(!acknowledged.is_empty());

    for key in ["narrow", "wide"] {
        wait_until_none_missing(key, Duration::from_secs(180), || {
            let seen: HashSet<i64> = ok.received(key).iter().map(|r| host_id(&r.body)).collect();
            let missing: Vec<i64> = acknowledged.iter().copied().filter(|s| !seen.contains(s)).collect();
            async move { missing }
        })
        .await;
    }
    let mut report = BTreeMap::new();
    for (key, max_in_flight) in in_flight {
        let receipts: Vec<(Instant, i64)> = ok.received(key).iter().map(|r| (r.at, r.distribution_id())).collect();
        let firsts = first_receipts(receipts.iter().map(|(_, d)| *d));
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=sorted.len() as i64).collect::<Vec<_>>(), "{key}: distribution ids are 1..=n");
        if max_in_flight == 1 {
            assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{key}: first receipts out of order");
        }
        let per_epoch = duplicates_per_epoch(&receipts, &kills);
        for (epoch, dup) in per_epoch.iter().enumerate() {
            assert!(
                *dup <= max_in_flight + COMMIT_BATCH,
                "{key}: {dup} redeliveries after crash {epoch} exceed maxInFlight {max_in_flight} + {COMMIT_BATCH}"
            );
        }
        report.insert(key, (sorted.len(), per_epoch));
    }
    println!("(distinct deliveries, redeliveries per epoch): {report:?}");
    for key in ["narrow", "wide"] {
        let distinct = report[key].0 as i64;
        let stats = wait_stats(&api, key, Duration::from_secs(60), "pending 0", |s| s.pending == 0).await;
        println!("{key}: status delivered {} for {distinct} distinct deliveries", stats.delivered);
        // Counted once per distribution id, however often a crash made it arrive.
        assert_eq!(stats.delivered, distinct, "{key}: status delivered against the receiver's distinct deliveries");
    }
}

/// How many deliveries `key` has had (for the log line that places the node kill).
fn producer_acknowledged_so_far(ok: &CallbackServer, key: &str) -> usize {
    ok.received(key).len()
}
