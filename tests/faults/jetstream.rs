//! The JetStream engine under faults: herald SIGKILLed while it publishes and delivers,
//! and a NATS node SIGKILLed (and started again) under the same stream, against the
//! 3-node cluster tests/run.sh starts (tests/nats/up.sh).

use super::*;

/// SIGKILLs a NATS node of tests/nats/up.sh by its recorded PID (`Cluster::start_component`
/// starts it again from its recorded command line).
fn kill_nats_node(name: &str) {
    let state = PathBuf::from(std::env::var("HERALD_CONTROLPLANE").expect("HERALD_CONTROLPLANE"));
    let pid = std::fs::read_to_string(state.join(format!("{name}.pid"))).expect("pid file");
    let status = std::process::Command::new("kill").args(["-9", pid.trim()]).status().expect("kill");
    assert!(status.success(), "kill -9 {name}");
}

/// Waits until `key` has received every acknowledged event (by producer sequence).
async fn wait_all_arrived(ok: &CallbackServer, key: &str, acknowledged: &[i64], within: Duration) {
    wait_until_none_missing(key, within, || {
        let seen: HashSet<i64> = ok.received(key).iter().map(|r| host_id(&r.body)).collect();
        let missing: Vec<i64> = acknowledged.iter().copied().filter(|s| !seen.contains(s)).collect();
        async move { missing }
    })
    .await;
}

/// Checks what `key` received: distinct distribution ids exactly 1..=n, first receipts in
/// order with one in flight, redeliveries after each kill within maxInFlight + 64.
/// Returns n and the redeliveries per epoch (epoch k follows the k-th kill).
fn check_receipts(ok: &CallbackServer, key: &str, max_in_flight: usize, kills: &[Instant]) -> (usize, Vec<usize>) {
    let receipts: Vec<(Instant, i64)> = ok.received(key).iter().map(|r| (r.at, r.distribution_id())).collect();
    let mut seen = HashSet::new();
    let firsts: Vec<i64> = receipts.iter().map(|(_, d)| *d).filter(|d| seen.insert(*d)).collect();
    let mut sorted = firsts.clone();
    sorted.sort_unstable();
    assert!(sorted.iter().copied().eq(1..=sorted.len() as i64), "{key}: distribution ids are not 1..=n");
    if max_in_flight == 1 {
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{key}: first receipts out of order");
    }
    let per_epoch = duplicates_per_epoch(&receipts, kills);
    for (epoch, dup) in per_epoch.iter().enumerate() {
        assert!(
            *dup <= max_in_flight + COMMIT_BATCH,
            "{key}: {dup} redeliveries after kill {epoch} exceed maxInFlight {max_in_flight} + {COMMIT_BATCH}"
        );
    }
    (sorted.len(), per_epoch)
}

/// SIGKILL herald at seeded random points, then SIGKILL one NATS node for 5 s, while a
/// producer publishes and two subscriptions deliver (maxInFlight 1 and 8). Every event
/// answered 200 is delivered; distribution ids are contiguous from 1; first receipts are in
/// order with one in flight; each herald crash costs at most maxInFlight + 64 redeliveries;
/// status counts each delivery once.
/// Fast subset: 3 herald rounds; full suite: 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
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
    // Streams of this run's own (not from the seed: a replayed seed must not find the
    // streams of the run it replays).
    let config = jetstream_config(&format!("HF{:08X}", fastrand::u32(..)));
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
    kill_nats_node("nats-2");
    println!("nats-2 SIGKILL (after {before_node} narrow receipts)");
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.start_component("nats-2");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged = producer.finish().await;
    println!("{} events acknowledged across {rounds} herald SIGKILLs and one NATS node SIGKILL", acknowledged.len());
    assert!(!acknowledged.is_empty());

    for key in ["narrow", "wide"] {
        wait_all_arrived(&ok, key, &acknowledged, Duration::from_secs(180)).await;
    }
    let mut report = BTreeMap::new();
    for (key, max_in_flight) in in_flight {
        report.insert(key, check_receipts(&ok, key, max_in_flight, &kills));
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

/// A producer that spreads its publishes over whichever replicas are up: request k goes to
/// replica k mod n of `targets` (a replica being restarted is simply skipped: its URL is
/// taken out while it is down).
struct SpreadProducer {
    targets: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<i64>, usize)>,
}

impl SpreadProducer {
    fn start(targets: Vec<String>, total: i64, batch: i64, pause: Duration) -> SpreadProducer {
        let targets = Arc::new(Mutex::new(targets.into_iter().map(Some).collect::<Vec<_>>()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (targets.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
            let (mut acknowledged, mut refused) = (Vec::new(), 0);
            let mut next = 1;
            let mut request = 0usize;
            while !s.load(Ordering::Acquire) && next <= total {
                let up: Vec<String> = t.lock().unwrap().iter().flatten().cloned().collect();
                if up.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let url = &up[request % up.len()];
                request += 1;
                let seqs: Vec<i64> = (next..(next + batch).min(total + 1)).collect();
                match client.post(url).json(&host_events(seqs.clone())).send().await {
                    Ok(answer) if answer.status().is_success() => {
                        acknowledged.extend(&seqs);
                        next += batch;
                    }
                    Ok(answer) => {
                        // Refused (503 while JetStream fails over): the same events again.
                        assert_eq!(answer.status(), 503, "a publish answered neither 200 nor 503");
                        assert!(answer.headers().contains_key("retry-after"), "a 503 without Retry-After");
                        refused += 1;
                    }
                    Err(_) => refused += 1,
                }
                tokio::time::sleep(pause).await;
            }
            (acknowledged, refused)
        });
        SpreadProducer { targets, stop, task }
    }

    fn set(&self, replica: usize, url: Option<String>) {
        self.targets.lock().unwrap()[replica] = url;
    }

    fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    async fn finish(self) -> (Vec<i64>, usize) {
        let result = self.task.await.expect("producer");
        self.stop.store(true, Ordering::Release);
        result
    }
}

/// Replica SIGKILLs in the three-replica kill test, fast and full alike.
const REPLICA_KILLS: usize = 10;

/// What happens to the three replicas while the producer streams.
enum Disruption {
    /// A seeded replica SIGKILLed and started again, `REPLICA_KILLS` times; then NATS node
    /// nats-2 SIGKILLed for 5 s and started again.
    KillsThenNatsNode,
    /// All three SIGTERMed and started again one after another, as a Deployment's rolling
    /// update does.
    Roll,
}

/// Three herald replicas on one JetStream store, each serving publish, delivery spread in
/// shards: events published across all three (fast subset 2,000, full suite 10,000) reach
/// each of 10 subscriptions through SIGKILLs of a replica at seeded points (10 rounds) and
/// of a NATS node. Publishes answer 200 or 503 with Retry-After. Every event answered 200
/// arrives at every healthy subscription; ids are 1..n; first receipts are in order where
/// `maxInFlight` is 1; redeliveries per kill stay within maxInFlight + 64; status
/// `delivered` equals the receiver's distinct deliveries and `pending` is 0; an 11th
/// subscription's hanging callback holds nobody up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn three_replicas_deliver_every_event_once_in_order_through_replica_and_nats_node_kills() {
    three_replicas_stream_through(Disruption::KillsThenNatsNode).await;
}

/// The same stream and checks through a roll of all three replicas, one after another,
/// while the producer publishes; and nothing is delivered twice: a stopping replica
/// finishes its attempts in flight and hands its shards back once their outcomes are
/// durable, and so does one handing shards to the replica that came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "cluster"), ignore = "cluster tier: tests/run.sh (--features cluster)")]
async fn three_replicas_deliver_every_event_once_in_order_through_a_roll_of_all_three() {
    three_replicas_stream_through(Disruption::Roll).await;
}

async fn three_replicas_stream_through(disruption: Disruption) {
    let _turn = exclusive().await;
    let events = scaled(2_000, 10_000) as i64;
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    println!("three replicas, {events} events, seed {seed} (HERALD_FAULTS_SEED)");
    let cluster = cluster().await;
    let ns = cluster.namespace("f-replicas", &[]).await;
    let ok = CallbackServer::start().await;
    let streams = jetstream_config(&format!("HR{:08X}", fastrand::u32(..)));
    let config = format!("{streams}leaderElection: {{leaseDurationSeconds: 5, shards: 8}}\n");
    let dirs: Vec<PathBuf> = (0..3).map(|n| test_dir(&ns, &format!("replica-{n}"))).collect();
    let start = |n: usize| {
        let instance = format!("replica-{n}");
        Herald::spawn(&cluster, &ns, &config, &dirs[n], &instance)
    };
    let mut replicas: Vec<Herald> = (0..3).map(start).collect();
    for replica in &mut replicas {
        replica.wait_ready(Duration::from_secs(60)).await;
    }
    let api = cluster.subscriptions(&ns);
    let keys: Vec<String> = (0..10).map(|n| format!("s{n}")).collect();
    for (n, key) in keys.iter().enumerate() {
        let extra = if n % 2 == 0 { json!({}) } else { json!({"maxInFlight": 4}) };
        subscribe(&api, key, &ok.url("ok", key), extra).await;
    }
    subscribe(&api, "hung", &ok.url("hang", "hung"), json!({"timeoutSeconds": 60})).await;

    let urls = |replicas: &[Herald]| replicas.iter().map(|r| r.url("/api/v3/event/publish")).collect::<Vec<_>>();
    // The roll is three graceful stops: the producer goes slower so that it lasts through them.
    let pause = match disruption {
        Disruption::KillsThenNatsNode => Duration::from_millis(40),
        Disruption::Roll => Duration::from_millis(150),
    };
    let producer = SpreadProducer::start(urls(&replicas), events, 10, pause);
    let mut kills = Vec::new();
    match disruption {
        Disruption::KillsThenNatsNode => {
            for round in 0..REPLICA_KILLS {
                tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
                let victim = rng.usize(0..3);
                producer.set(victim, None);
                kills.push(Instant::now());
                replicas[victim].kill();
                println!("round {round}: replica-{victim} SIGKILL");
                replicas[victim] = start(victim);
                replicas[victim].wait_ready(Duration::from_secs(60)).await;
                producer.set(victim, Some(replicas[victim].url("/api/v3/event/publish")));
            }
            // A NATS server dies under all three replicas and comes back.
            kills.push(Instant::now());
            kill_nats_node("nats-2");
            println!("nats-2 SIGKILL");
            tokio::time::sleep(Duration::from_secs(5)).await;
            cluster.start_component("nats-2");
        }
        Disruption::Roll => {
            tokio::time::sleep(Duration::from_millis(rng.u64(500..2500))).await;
            #[allow(clippy::needless_range_loop)] // `start` replaces the element
            for victim in 0..3 {
                producer.set(victim, None);
                kills.push(Instant::now());
                let (status, took) = tokio::task::block_in_place(|| replicas[victim].terminate());
                assert!(status.success(), "replica-{victim} exit {status}");
                println!("roll: replica-{victim} stopped in {took:?}");
                replicas[victim] = start(victim);
                replicas[victim].wait_ready(Duration::from_secs(60)).await;
                producer.set(victim, Some(replicas[victim].url("/api/v3/event/publish")));
            }
            assert!(!producer.is_finished(), "the producer finished before the roll did: nothing streamed through it");
        }
    }
    let (acknowledged, refused) = producer.finish().await;
    println!("{} events acknowledged ({refused} publishes refused or failed and sent again)", acknowledged.len());
    assert_eq!(acknowledged.len() as i64, events, "the producer runs until every event is acknowledged");

    let healthy_started = Instant::now();
    for key in &keys {
        wait_all_arrived(&ok, key, &acknowledged, Duration::from_secs(600)).await;
    }
    println!("all 10 healthy subscriptions complete {:?} after the last publish", healthy_started.elapsed());
    let mut report = BTreeMap::new();
    for (n, key) in keys.iter().enumerate() {
        let max_in_flight = if n % 2 == 0 { 1 } else { 4 };
        let (distinct, per_epoch) = check_receipts(&ok, key, max_in_flight, &kills);
        // A publish cut off by a SIGKILL may have been stored without its answer; the
        // producer sends those events again, so n can exceed the events, never fall short.
        assert!(distinct as i64 >= events, "{key}: {distinct} distinct deliveries for {events} events");
        if let Disruption::Roll = disruption {
            // A stopping replica, and one handing a shard to the replica that came back,
            // keeps the shard until its last outcomes are durable.
            assert!(per_epoch.iter().all(|d| *d == 0), "{key}: the roll delivered again: {per_epoch:?}");
        }
        report.insert(key.clone(), (per_epoch, distinct));
    }
    println!("(redeliveries per disruption, distinct deliveries) per subscription: {report:?}");
    for key in &keys {
        let distinct = report[key].1 as i64;
        // Status too: a shard's new holder projects what its previous holder counted.
        wait_stats(&api, key, Duration::from_secs(60), "every distinct delivery counted, none pending", |s| {
            s.delivered == distinct && s.pending == 0
        })
        .await;
    }
    let hung = ok.received("hung").len();
    println!("the hanging subscription received {hung} attempts meanwhile");
    assert!(hung < 100, "the hanging callback took {hung} attempts: it is not hanging");
}
