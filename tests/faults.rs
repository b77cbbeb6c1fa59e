//! The fault and abuse suite (issue 7): process, control-plane, store and callback
//! faults, bad input and security abuse, against herald as a real process, the real
//! kube-apiserver and etcd, and real callback receivers on loopback. Every case, what it
//! expects and what it showed is in docs/RELIABILITY.md.
//!
//! Two sizes:
//! - the fast subset: every test here without `#[ignore]`. `cargo test` (tests/run.sh,
//!   CI) always runs it; nothing in it is skipped or gated.
//! - the full suite: `tests/faults/run-all.sh`, which installs schemathesis and runs
//!   `HERALD_FULL_FAULTS=1 tests/run.sh --test faults -- --include-ignored`. The
//!   variable scales the seeded cases (24 SIGKILL rounds instead of 3, ten times the
//!   fuzz cases); `--include-ignored` adds the long cases (etcd outage, the 10-minute
//!   soak, schemathesis), which are `#[ignore]`d so that CI lists them as ignored
//!   instead of silently passing them.
//!
//! `HERALD_FAULTS_SEED` replays a run (the seed is printed by every seeded case).
//! Tests that show a herald bug are marked `HERALD BUG` with the finding number of
//! docs/RELIABILITY.md; they fail until the bug is fixed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

mod common;

use common::callback::CallbackServer;
use common::*;
use herald::crd::{EventSubscription, Statistics};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Suite size, seeds and small helpers
// ---------------------------------------------------------------------------------------

fn full_suite() -> bool {
    std::env::var("HERALD_FULL_FAULTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn scaled(fast: usize, full: usize) -> usize {
    if full_suite() { full } else { fast }
}

fn seed() -> u64 {
    std::env::var("HERALD_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_260_707)
}

fn host_event(seq: i64) -> Value {
    json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": seq}, "pre_data": null}],
        "bk_supplier_account": "0",
    })
}

fn host_events(seqs: impl IntoIterator<Item = i64>) -> Value {
    Value::Array(seqs.into_iter().map(host_event).collect())
}

/// The producer's sequence number carried in an event or callback body.
fn host_id(body: &Value) -> i64 {
    body["data"][0]["cur_data"]["bk_host_id"].as_i64().unwrap_or(-1)
}

/// One HTTP answer: status, JSON body (Null when not JSON), raw text and Retry-After.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    text: String,
    retry_after: Option<String>,
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Answer { status, body, text, retry_after })
}

async fn publish(herald: &Herald, events: &Value) -> Answer {
    send(reqwest::Client::new().post(herald.url("/api/v3/event/publish")).json(events)).await.expect("publish request")
}

async fn publish_ok(herald: &Herald, events: &Value) {
    let answer = publish(herald, events).await;
    assert!(answer.status == 200 && answer.body["result"] == true, "publish: {answer:?}");
}

/// Creates a subscription to `hostcreate` in `api`'s namespace with `extra` spec fields
/// and waits until it is Ready; returns its id.
async fn subscribe(api: &Api<EventSubscription>, name: &str, url: &str, extra: Value) -> i64 {
    let mut spec = json!({ "subscriptionName": name, "callbackUrl": url, "events": ["hostcreate"] });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    api.create(&PostParams::default(), &subscription(name, spec)).await.expect("create subscription");
    id(&wait_ready(api, name).await).expect("id")
}

async fn patch_spec(api: &Api<EventSubscription>, name: &str, spec: Value) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec }))).await.expect("patch spec");
}

fn stats(sub: &EventSubscription) -> Statistics {
    sub.status.as_ref().and_then(|s| s.statistics.clone()).unwrap_or_default()
}

async fn wait_stats(
    api: &Api<EventSubscription>,
    name: &str,
    within: Duration,
    what: &str,
    condition: impl Fn(&Statistics) -> bool,
) -> Statistics {
    stats(&wait_for(api, name, within, what, move |s| condition(&stats(s))).await)
}

/// A field of /proc/PID/status in kB (VmHWM, VmRSS).
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The store's size on disk: database plus WAL (what the quota measures).
fn store_bytes(store: &Path) -> u64 {
    ["herald.db", "herald.db-wal"].iter().map(|f| std::fs::metadata(store.join(f)).map(|m| m.len()).unwrap_or(0)).sum()
}

fn test_dir(ns: &str, what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{ns}-{what}"))
}

/// Producer sequence numbers in a subscription's dead letters (through the REST API).
async fn dead_lettered(herald: &Herald, id: i64) -> HashSet<i64> {
    let url = herald.url(&format!("/api/v3/herald/dead_letters/{id}?limit=10000"));
    let answer = send(reqwest::Client::new().get(url)).await.expect("dead letters");
    assert_eq!(answer.status, 200, "dead letters: {}", answer.text);
    answer.body["data"]["info"]
        .as_array()
        .map(|letters| letters.iter().map(|l| host_id(&l["event"])).collect())
        .unwrap_or_default()
}

/// A continuous producer: batches of `batch` events every `pause`, to whatever URL
/// `target` holds (it changes when herald restarts); records what was answered 200.
struct Producer {
    target: Arc<Mutex<String>>,
    hold: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<i64>>,
}

impl Producer {
    fn start(url: String, first: i64, batch: i64, pause: Duration) -> Producer {
        let target = Arc::new(Mutex::new(url));
        let hold = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, h, s) = (target.clone(), hold.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
            let mut acknowledged = Vec::new();
            let mut next = first;
            while !s.load(Ordering::Acquire) {
                if h.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let seqs: Vec<i64> = (next..next + batch).collect();
                next += batch;
                let url = t.lock().unwrap().clone();
                let answer = client.post(url).json(&host_events(seqs.clone())).send().await;
                if answer.is_ok_and(|a| a.status().is_success()) {
                    acknowledged.extend(seqs);
                }
                tokio::time::sleep(pause).await;
            }
            acknowledged
        });
        Producer { target, hold, stop, task }
    }

    fn retarget(&self, url: String) {
        *self.target.lock().unwrap() = url;
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("producer")
    }
}

/// Waits until `pending()` returns an empty set (what is still missing), failing after `within`.
async fn wait_until_none_missing<F, Fut>(what: &str, within: Duration, mut missing: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<i64>>,
{
    let deadline = Instant::now() + within;
    loop {
        let left = missing().await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} still missing after {within:?}, e.g. {:?}",
            left.len(),
            &left[..left.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------
// A raw-TCP callback receiver for the faults an HTTP framework will not produce
// ---------------------------------------------------------------------------------------

/// One request a [`FaultServer`] read.
#[derive(Clone, Debug)]
struct Hit {
    key: String,
    body: Value,
    at: Instant,
}

/// Callback receiver on 127.0.0.1 (and [::1], the redirect target the guard refuses)
/// speaking HTTP/1.1 by hand, one request per connection: `/{behaviour}/{key}` where
/// behaviour is `ok`, `status-N`, `flaky` (500 when the producer sequence is a multiple
/// of 3, else 200), `reset` (TCP RST after reading the request), `reset-mid-body`
/// (headers and part of the body, then RST), `hang` (never answers), `hang-once` (the
/// first request of a key hangs, later ones get 200), `slowloris` (headers promising
/// 100 kB, then a byte every 300 ms), `redirect-self` (301 to itself) or
/// `redirect-refused` (301 to the same path on [::1], under key `{key}-followed`).
#[derive(Clone)]
struct FaultServer {
    port: u16,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl FaultServer {
    async fn start() -> FaultServer {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await.expect("bind [::1]");
        let ports = (v4.local_addr().unwrap().port(), v6.local_addr().unwrap().port());
        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        for listener in [v4, v6] {
            let hits = hits.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_fault(stream, ports, hits.clone()));
                }
            });
        }
        FaultServer { port: ports.0, hits }
    }

    fn url(&self, behaviour: &str, key: &str) -> String {
        format!("http://127.0.0.1:{}/{behaviour}/{key}", self.port)
    }

    fn hits(&self, key: &str) -> Vec<Hit> {
        self.hits.lock().unwrap().iter().filter(|h| h.key == key).cloned().collect()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.lines().next()?.split_whitespace().nth(1)?.to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((path, body))
}

fn http_answer(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra_headers}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn serve_fault(mut stream: tokio::net::TcpStream, (port, v6_port): (u16, u16), hits: Arc<Mutex<Vec<Hit>>>) {
    let Some((path, body)) = read_request(&mut stream).await else { return };
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let behaviour = parts.next().unwrap_or_default().to_string();
    let key = parts.next().unwrap_or_default().to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let seq = host_id(&body);
    let earlier = {
        let mut hits = hits.lock().unwrap();
        let earlier = hits.iter().filter(|h| h.key == key).count();
        hits.push(Hit { key: key.clone(), body, at: Instant::now() });
        earlier
    };
    let hang = |mut stream: tokio::net::TcpStream| async move {
        // Holds the connection until the client gives up on it.
        let mut buf = [0u8; 256];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let answer = match behaviour.as_str() {
        "ok" => http_answer("200 OK", "", "ok"),
        "flaky" if seq % 3 == 0 => http_answer("500 Internal Server Error", "", "flaky"),
        "flaky" => http_answer("200 OK", "", "ok"),
        "reset" => {
            let _ = stream.set_zero_linger();
            return;
        }
        "reset-mid-body" => {
            let _ =
                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\npartial").await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.set_zero_linger();
            return;
        }
        "hang" => return hang(stream).await,
        "hang-once" if earlier == 0 => return hang(stream).await,
        "hang-once" => http_answer("200 OK", "", "ok"),
        "slowloris" => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n").await;
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
            }
        }
        "redirect-self" => http_answer(
            "301 Moved Permanently",
            &format!("Location: http://127.0.0.1:{port}/redirect-self/{key}\r\n"),
            "",
        ),
        "redirect-refused" => {
            http_answer("301 Moved Permanently", &format!("Location: http://[::1]:{v6_port}/ok/{key}-followed\r\n"), "")
        }
        other => match other.strip_prefix("status-").and_then(|c| c.parse::<u16>().ok()) {
            Some(code) => http_answer(&format!("{code} Status"), "", "status"),
            None => http_answer("404 Not Found", "", "unknown behaviour"),
        },
    };
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// An https receiver whose certificate nobody trusts (self-signed, made with openssl);
/// counts the requests that got through TLS.
async fn untrusted_tls_server(dir: &Path) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    std::fs::create_dir_all(dir).expect("tls dir");
    let script = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE -keyout tls.key -out tls.crt";
    let made = std::process::Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success(), "openssl made no certificate");
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(dir.join("tls.crt"), dir.join("tls.key"))
        .await
        .expect("tls config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::AcqRel);
            "ok"
        }
    });
    let server = axum_server::tls_rustls::from_tcp_rustls(listener, config).expect("tls server");
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    (port, count)
}

/// Duplicates per epoch: receipts in epoch k (after the k-th kill) whose distribution id
/// was already received before. `receipts` are (time, distribution id).
fn duplicates_per_epoch(receipts: &[(Instant, i64)], kills: &[Instant]) -> Vec<usize> {
    let mut per_epoch = vec![0; kills.len() + 1];
    let mut seen = HashSet::new();
    let mut sorted = receipts.to_vec();
    sorted.sort_by_key(|(at, _)| *at);
    for (at, distribution_id) in sorted {
        let epoch = kills.iter().filter(|k| **k < at).count();
        if !seen.insert(distribution_id) {
            per_epoch[epoch] += 1;
        }
    }
    per_epoch
}

/// The crash bound of docs/configuration.md: `maxInFlight` + one commit batch.
const COMMIT_BATCH: usize = 64;

// ---------------------------------------------------------------------------------------
// Process faults
// ---------------------------------------------------------------------------------------

/// SIGKILL at seeded random points while a producer publishes and three subscriptions
/// deliver (strict order; `maxInFlight` 8 against a slowish receiver; a receiver that
/// fails every third event with `maxAttempts` 1, so dead letters are made across
/// crashes). Every event answered 200 is delivered or dead-lettered, and each crash
/// costs at most `maxInFlight` + 64 redeliveries per subscription.
/// Fast subset: 3 rounds; full suite: 24.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_seeded_random_points_loses_nothing_and_bounds_duplicates() {
    let _turn = exclusive().await;
    let rounds = scaled(3, 24);
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    println!("SIGKILL rounds: {rounds}, seed {seed} (HERALD_FAULTS_SEED)");
    let cluster = cluster().await;
    let ns = cluster.namespace("f-kill", &[]).await;
    let ok = CallbackServer::start().await;
    let faults = FaultServer::start().await;
    let dir = test_dir(&ns, "herald");
    let mut herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    let api = cluster.subscriptions(&ns);
    let in_flight = [("narrow", 1usize), ("wide", 8), ("flaky", 1)];
    subscribe(&api, "narrow", &ok.url("ok", "narrow"), json!({})).await;
    subscribe(&api, "wide", &ok.url("slow-3", "wide"), json!({"maxInFlight": 8})).await;
    let flaky = subscribe(&api, "flaky", &faults.url("flaky", "flaky"), json!({"retry": {"maxAttempts": 1}})).await;

    let producer = Producer::start(herald.url("/api/v3/event/publish"), 1, 10, Duration::from_millis(40));
    let mut kills = Vec::new();
    for round in 0..rounds {
        let delay = Duration::from_millis(rng.u64(300..3000));
        // Half the kills land mid-publish (the producer running), half while only
        // deliveries run (the producer held back for the moment of the kill).
        let mid_publish = rng.bool();
        if !mid_publish {
            tokio::time::sleep(delay / 2).await;
            producer.hold.store(true, Ordering::Release);
            tokio::time::sleep(delay / 2).await;
        } else {
            tokio::time::sleep(delay).await;
        }
        kills.push(Instant::now());
        herald.kill();
        println!(
            "round {round}: SIGKILL after {delay:?} ({})",
            if mid_publish { "mid-publish" } else { "deliveries only" }
        );
        herald = Herald::start_in(&cluster, &ns, "", &dir).await;
        producer.retarget(herald.url("/api/v3/event/publish"));
        producer.hold.store(false, Ordering::Release);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acknowledged = producer.finish().await;
    println!("{} events acknowledged across {rounds} SIGKILLs", acknowledged.len());
    assert!(!acknowledged.is_empty());

    // Never lost: every acknowledged event reaches narrow and wide; flaky confirms the
    // ones it accepts and the rest are in its dead letters.
    for key in ["narrow", "wide"] {
        wait_until_none_missing(key, Duration::from_secs(180), || {
            let seen: HashSet<i64> = ok.received(key).iter().map(|r| host_id(&r.body)).collect();
            let missing: Vec<i64> = acknowledged.iter().copied().filter(|s| !seen.contains(s)).collect();
            async move { missing }
        })
        .await;
    }
    let herald_ref = &herald;
    let acknowledged_ref = &acknowledged;
    wait_until_none_missing("flaky", Duration::from_secs(180), || {
        let confirmed: HashSet<i64> =
            faults.hits("flaky").iter().map(|h| host_id(&h.body)).filter(|s| s % 3 != 0).collect();
        async move {
            let dead = dead_lettered(herald_ref, flaky).await;
            acknowledged_ref
                .iter()
                .copied()
                .filter(|s| if s % 3 == 0 { !dead.contains(s) } else { !confirmed.contains(s) })
                .collect()
        }
    })
    .await;

    // Duplicates per crash within maxInFlight + one commit batch; first receipts in
    // order where maxInFlight is 1.
    let mut report = BTreeMap::new();
    for (key, max_in_flight) in in_flight {
        let receipts: Vec<(Instant, i64)> = if key == "flaky" {
            faults.hits(key).iter().map(|h| (h.at, h.body["distribution_id"].as_i64().unwrap_or(-1))).collect()
        } else {
            ok.received(key).iter().map(|r| (r.at, r.distribution_id())).collect()
        };
        let per_epoch = duplicates_per_epoch(&receipts, &kills);
        for (epoch, dup) in per_epoch.iter().enumerate() {
            assert!(
                *dup <= max_in_flight + COMMIT_BATCH,
                "{key}: {dup} redeliveries after crash {epoch} exceed maxInFlight {max_in_flight} + {COMMIT_BATCH}"
            );
        }
        if max_in_flight == 1 && key == "narrow" {
            let mut seen = HashSet::new();
            let firsts: Vec<i64> = receipts.iter().map(|(_, d)| *d).filter(|d| seen.insert(*d)).collect();
            assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{key}: first receipts out of order");
        }
        report.insert(key, per_epoch);
    }
    println!("redeliveries per epoch (epoch k follows the k-th SIGKILL): {report:?}");
    for key in ["narrow", "wide", "flaky"] {
        wait_stats(&api, key, Duration::from_secs(60), "pending 0", |s| s.pending == 0).await;
    }
}

/// SIGTERM while a slow callback (3 s) is mid-attempt: herald exits 0, and the attempt
/// is either completed before exit or made again after the restart; nothing queued
/// behind it is lost. Then SIGTERM while a callback hangs (timeoutSeconds 35): herald
/// must still exit 0 within Kubernetes' default grace period of 30 s, and the abandoned
/// attempt is made again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_redelivers_the_attempt_in_flight_and_exits_0() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-term", &[]).await;
    let ok = CallbackServer::start().await;
    let faults = FaultServer::start().await;
    let dir = test_dir(&ns, "herald");
    let mut herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "slow", &ok.url("slow-3000", "slow"), json!({"timeoutSeconds": 30})).await;
    subscribe(&api, "steady", &ok.url("ok", "steady"), json!({})).await;

    publish_ok(&herald, &host_events(1..=3)).await;
    ok.wait_for("slow", 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, took) = tokio::task::block_in_place(|| herald.terminate());
    println!("SIGTERM with a 3 s attempt in flight: {status} after {took:?}");
    assert!(status.success(), "exit status {status}; log:\n{}", herald.log_text());
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
    herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    ok.wait_for("steady", 3, Duration::from_secs(30)).await;
    wait_until_none_missing("slow", Duration::from_secs(60), || {
        let seen: HashSet<i64> = ok.received("slow").iter().map(|r| host_id(&r.body)).collect();
        async move { (1..=3).filter(|s| !seen.contains(s)).collect() }
    })
    .await;
    let first = ok.received("slow").iter().filter(|r| r.distribution_id() == 1).count();
    println!(
        "the in-flight attempt was {}",
        if first > 1 { "redelivered after the restart" } else { "completed before exit" }
    );
    wait_stats(&api, "slow", Duration::from_secs(60), "pending 0", |s| s.pending == 0 && s.delivered >= 3).await;

    // A hanging callback at SIGTERM.
    subscribe(&api, "hung", &faults.url("hang-once", "hung"), json!({"timeoutSeconds": 35})).await;
    publish_ok(&herald, &host_events(4..=4)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while faults.hits("hung").is_empty() {
        assert!(Instant::now() < deadline, "the hanging callback was never called");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, took) = tokio::task::block_in_place(|| herald.terminate());
    println!("SIGTERM with a hanging attempt in flight (timeoutSeconds 35): {status} after {took:?}");
    assert!(status.success(), "exit status {status}");
    // HERALD BUG (F4 in docs/RELIABILITY.md) while this fails: shutdown waits for the
    // hanging attempt's whole timeout, longer than the pod's grace period.
    assert!(
        took < Duration::from_secs(30),
        "SIGTERM with a hanging callback took {took:?}: Kubernetes would SIGKILL herald after 30 s"
    );
    herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    wait_stats(&api, "hung", Duration::from_secs(60), "delivered after the restart", |s| {
        s.delivered == 1 && s.pending == 0
    })
    .await;
    assert!(faults.hits("hung").len() >= 2, "the abandoned attempt was made again");
    drop(herald);
}

// ---------------------------------------------------------------------------------------
// Control-plane faults
// ---------------------------------------------------------------------------------------

/// Waits (blocking) until the API server answers /readyz.
fn wait_apiserver(cluster: &Cluster, within: Duration) {
    let deadline = Instant::now() + within;
    while !cluster.kubectl(&["get", "--raw", "/readyz"]).0 {
        assert!(Instant::now() < deadline, "the API server did not become ready within {within:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Stops `component` for `outage` while events flow: publishing keeps answering 200
/// (anonymous callers need no API server), delivery continues for the subscriptions
/// herald knows, /readyz stays 200. After recovery a spec change is picked up, status
/// catches up, and herald was never restarted.
async fn control_plane_outage(component: &'static str, prefix: &str, outage: Duration) {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace(prefix, &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "a", &server.url("ok", "a"), json!({})).await;
    subscribe(&api, "b", &server.url("ok", "b1"), json!({})).await;
    publish_ok(&herald, &host_events(1..=3)).await;
    server.wait_for("a", 3, Duration::from_secs(30)).await;
    server.wait_for("b1", 3, Duration::from_secs(30)).await;
    let pid = herald.pid();
    let client = reqwest::Client::new();

    let guard = tokio::task::block_in_place(|| cluster.outage(component));
    let stopped = Instant::now();
    let mut published = Vec::new();
    let mut seq = 100;
    let mut not_ready = 0;
    while stopped.elapsed() < outage {
        let answer = publish(&herald, &host_events([seq, seq + 1])).await;
        assert!(
            answer.status == 200 && answer.body["result"] == true,
            "publish during the {component} outage: {answer:?}"
        );
        published.push((seq, Instant::now()));
        published.push((seq + 1, Instant::now()));
        seq += 2;
        if !client.get(herald.url("/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            not_ready += 1;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Delivery went on during the outage: everything published then arrives before the
    // component comes back.
    let mut worst = Duration::ZERO;
    for key in ["a", "b1"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: HashMap<i64, Instant> = server.received(key).iter().map(|r| (host_id(&r.body), r.at)).collect();
            if published.iter().all(|(s, _)| got.contains_key(s)) {
                for (s, at) in &published {
                    worst = worst.max(got[s].saturating_duration_since(*at));
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{key}: events published during the {component} outage were not delivered during it"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "{component} down {:?}: {} events published (all 200), worst delivery latency {worst:?}, /readyz not 200 {not_ready} times",
        stopped.elapsed(),
        published.len()
    );
    assert_eq!(not_ready, 0, "/readyz failed during the {component} outage");
    assert!(worst < Duration::from_secs(3), "delivery slowed to {worst:?} during the outage");

    tokio::task::block_in_place(|| {
        drop(guard);
        wait_apiserver(&cluster, Duration::from_secs(90));
    });
    let recovered = Instant::now();
    // A spec change made right after recovery (retried until the API takes it) is
    // picked up without a restart.
    loop {
        let patched = api
            .patch(
                "b",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"callbackUrl": server.url("ok", "b2")}})),
            )
            .await;
        match patched {
            Ok(_) => break,
            Err(error) => {
                assert!(recovered.elapsed() < Duration::from_secs(60), "patch after recovery: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let changed = Instant::now();
    let generation = api.get("b").await.expect("b").metadata.generation;
    let observer = {
        let api = api.clone();
        tokio::spawn(async move {
            wait_for(&api, "b", Duration::from_secs(150), "observedGeneration", move |s| {
                s.status.as_ref().and_then(|st| st.observed_generation) == generation
            })
            .await;
            changed.elapsed()
        })
    };
    let mut probe = 10_000;
    while server.received("b2").is_empty() {
        assert!(
            changed.elapsed() < Duration::from_secs(120),
            "a spec change after the {component} outage was not picked up within 120 s"
        );
        publish_ok(&herald, &host_events([probe])).await;
        probe += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pickup = changed.elapsed();
    let observed = observer.await.expect("observer");
    // Status catches up with what the receiver counted.
    let received = i64::try_from(server.received("a").len()).unwrap();
    let a = wait_stats(&api, "a", Duration::from_secs(60), "statistics caught up", |s| {
        s.total >= received && s.pending == 0
    })
    .await;
    println!(
        "after the {component} outage: spec change delivered to in {pickup:?}, observedGeneration after {observed:?}; status of a: total {} delivered {}",
        a.total, a.delivered
    );
    assert_eq!(herald.pid(), pid);
    assert!(alive(pid), "herald is still the same running process");
    assert!(!herald.log_text().contains("herald stopped"), "herald stopped:\n{}", herald.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_outage_keeps_delivery_going_and_herald_recovers_without_restart() {
    control_plane_outage("kube-apiserver", "f-apiserver", Duration::from_secs(8)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full suite (tests/faults/run-all.sh): etcd outage"]
async fn etcd_outage_keeps_delivery_going_and_herald_recovers_without_restart() {
    control_plane_outage("etcd", "f-etcd", Duration::from_secs(20)).await;
}

// ---------------------------------------------------------------------------------------
// Store faults
// ---------------------------------------------------------------------------------------

/// A store over its quota: publish answers 503 with Retry-After and keeps nothing of that
/// request; everything accepted before is still delivered; and once the backlog has
/// drained, publishing is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_over_quota_refuses_publishes_with_503_and_loses_nothing_accepted() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-quota", &[]).await;
    let server = CallbackServer::start().await;
    let dir = test_dir(&ns, "herald");
    const QUOTA: u64 = 6 << 20;
    let herald = Herald::start_in(&cluster, &ns, &format!("store:\n  quotaBytes: {QUOTA}\n"), &dir).await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "held", &server.url("ok", "held"), json!({"paused": true})).await;
    let padding = "p".repeat(8000);
    let padded = |seqs: std::ops::Range<i64>| {
        Value::Array(seqs.map(|s| json!({"event_type": "instdata", "action": "create", "obj_type": "host", "data": [{"cur_data": {"bk_host_id": s, "pad": padding}}]})).collect())
    };
    let mut accepted = Vec::new();
    let mut refusal = None;
    for batch in 0..400i64 {
        let seqs = batch * 20 + 1..batch * 20 + 21;
        let answer = publish(&herald, &padded(seqs.clone())).await;
        match answer.status {
            200 => accepted.extend(seqs),
            503 => {
                refusal = Some((seqs, answer));
                break;
            }
            other => panic!("publish answered {other}: {}", answer.text),
        }
    }
    let (refused_seqs, answer) = refusal.expect("the store reached its quota");
    println!(
        "quota {QUOTA} B reached after {} events; store {} B; answer {} {} Retry-After {:?}",
        accepted.len(),
        store_bytes(&dir.join("store")),
        answer.status,
        answer.text,
        answer.retry_after
    );
    assert!(
        answer.retry_after.as_deref().and_then(|r| r.parse::<u64>().ok()).is_some_and(|r| r > 0),
        "503 carries Retry-After: {answer:?}"
    );
    assert_eq!(
        (answer.body["result"].as_bool(), answer.body["bk_error_code"].as_i64()),
        (Some(false), Some(1199999)),
        "{}",
        answer.text
    );
    let again = publish(&herald, &padded(100_000..100_005)).await;
    assert_eq!(again.status, 503, "still over quota: {}", again.text);

    // Nothing accepted is lost; nothing refused was kept.
    patch_spec(&api, "held", json!({"paused": false})).await;
    wait_until_none_missing("held", Duration::from_secs(120), || {
        let seen: HashSet<i64> = server.received("held").iter().map(|r| host_id(&r.body)).collect();
        let missing: Vec<i64> = accepted.iter().copied().filter(|s| !seen.contains(s)).collect();
        async move { missing }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received: HashSet<i64> = server.received("held").iter().map(|r| host_id(&r.body)).collect();
    assert!(
        refused_seqs.clone().chain(100_000..100_005).all(|s| !received.contains(&s)),
        "an event of a refused publish was delivered"
    );
    wait_stats(&api, "held", Duration::from_secs(60), "drained", |s| s.pending == 0).await;

    // HERALD BUG (F2 in docs/RELIABILITY.md) while this fails: the quota measures the
    // files, which SQLite never shrinks, so the store stays "over quota" after draining.
    let drained = Instant::now();
    loop {
        let answer = publish(&herald, &host_events([200_000])).await;
        if answer.status == 200 {
            println!("publishing accepted again {:?} after the backlog drained", drained.elapsed());
            break;
        }
        assert!(
            drained.elapsed() < Duration::from_secs(35),
            "the backlog drained (pending 0) but publish still answers {} after {:?}; store {} B on disk, quota {QUOTA} B",
            answer.status,
            drained.elapsed(),
            store_bytes(&dir.join("store"))
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The WAL frame layout (sqlite.org/fileformat2.html#walformat): (page size, frame count).
fn wal_frames(wal: &[u8]) -> (usize, usize) {
    assert!(wal.len() >= 32, "WAL has a header");
    let page_size = u32::from_be_bytes(wal[8..12].try_into().unwrap()) as usize;
    (page_size, (wal.len() - 32) / (24 + page_size))
}

/// Appends what a torn write leaves after the last commit: `partial` = the header and half
/// the page of a copy of the last frame (a frame cut mid-write), else random garbage.
fn tear_wal_tail(store: &Path, partial: bool, rng: &mut fastrand::Rng) -> String {
    let path = store.join("herald.db-wal");
    let mut wal = std::fs::read(&path).expect("read WAL");
    let before = wal.len();
    let (page_size, frames) = wal_frames(&wal);
    let tail: Vec<u8> = if partial && frames > 0 {
        let last = 32 + (frames - 1) * (24 + page_size);
        let mut torn = wal[last..last + 24 + page_size / 2].to_vec();
        // A later frame number's worth of different content: the checksum cannot match.
        for byte in torn.iter_mut().skip(24).step_by(7) {
            *byte = rng.u8(..);
        }
        torn
    } else {
        (0..777).map(|_| rng.u8(..)).collect()
    };
    wal.extend_from_slice(&tail);
    std::fs::write(&path, &wal).expect("write WAL");
    format!(
        "WAL {before} B with {frames} frames of {page_size} B + {} B {}",
        tail.len(),
        if partial { "partial frame" } else { "garbage" }
    )
}

/// kill -9, then a torn tail after the last commit of the WAL (a partial frame, then
/// random garbage): herald opens the store each time and every acknowledged event is
/// still delivered; the database passes `PRAGMA integrity_check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_wal_tail_after_sigkill_opens_and_loses_nothing_acknowledged() {
    let _turn = exclusive().await;
    let mut rng = fastrand::Rng::with_seed(seed());
    let cluster = cluster().await;
    let ns = cluster.namespace("f-wal", &[]).await;
    let server = CallbackServer::start().await;
    let dir = test_dir(&ns, "herald");
    let store = dir.join("store");
    let mut herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    let api = cluster.subscriptions(&ns);
    subscribe(&api, "held", &server.url("ok", "held"), json!({"paused": true})).await;
    subscribe(&api, "live", &server.url("ok", "live"), json!({})).await;
    let mut acknowledged = Vec::new();
    for (round, partial) in [(0i64, true), (1, false)] {
        for batch in 0..5 {
            let seqs: Vec<i64> = (0..10).map(|i| round * 1000 + batch * 10 + i).collect();
            publish_ok(&herald, &host_events(seqs.clone())).await;
            acknowledged.extend(seqs);
        }
        server.wait_for("live", acknowledged.len(), Duration::from_secs(30)).await;
        herald.kill();
        let damage = tear_wal_tail(&store, partial, &mut rng);
        println!("round {round}: {damage}");
        herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    }
    patch_spec(&api, "held", json!({"paused": false})).await;
    for key in ["held", "live"] {
        wait_until_none_missing(key, Duration::from_secs(60), || {
            let seen: HashSet<i64> = server.received(key).iter().map(|r| host_id(&r.body)).collect();
            let missing: Vec<i64> = acknowledged.iter().copied().filter(|s| !seen.contains(s)).collect();
            async move { missing }
        })
        .await;
    }
    wait_stats(&api, "held", Duration::from_secs(60), "drained", |s| s.pending == 0).await;
    herald.kill();
    let copy = dir.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["herald.db", "herald.db-wal"] {
        std::fs::copy(store.join(file), copy.join(file)).expect("copy store");
    }
    let conn = rusqlite::Connection::open(copy.join("herald.db")).expect("open copy");
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
    assert_eq!(check, "ok");
}

/// A second herald pointed at a store directory in use refuses to start: it exits
/// non-zero naming the lock. (With leader election on, a second instance in the same
/// namespace never gets as far: it waits for the Lease and stays not ready.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_herald_on_the_same_store_directory_refuses_to_start() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-lock", &[]).await;
    let dir = test_dir(&ns, "herald");
    let herald = Herald::start_in(&cluster, &ns, "", &dir).await;
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("config.yaml")).unwrap()).unwrap();
    config["leaderElection"]["enabled"] = false.into();
    let second_config = dir.join("second.yaml");
    std::fs::write(&second_config, serde_yaml::to_string(&config).unwrap()).unwrap();
    let log = dir.join("second.log");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["run", "--config"])
        .arg(&second_config)
        .args(["--namespace", &ns, "--instance", "second", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("spawn the second herald");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second herald kept running: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    println!("second herald: {status}; log:\n{text}");
    assert!(!status.success(), "the second herald exited {status}");
    assert!(
        text.contains("locked by another herald process") && text.contains(&dir.join("store").display().to_string()),
        "names the lock and the directory:\n{text}"
    );
    // The first is untouched.
    publish_ok(&herald, &host_events([1])).await;
}

// ---------------------------------------------------------------------------------------
// Callback faults
// ---------------------------------------------------------------------------------------

/// Hostile and broken receivers side by side with a healthy one: connection reset (at
/// once, and mid-body), a hang, a slowloris answer, a 301 to itself, a 301 to a refused
/// address, an untrusted TLS certificate and a 503 storm. Each attempt counts as one
/// failed attempt (docs/design.md §5), no redirect is followed, attempts run out into dead
/// letters, the healthy subscription keeps receiving promptly, and memory stays bounded.
/// (429 with Retry-After and 410 Gone: tests/delivery.rs `confirm_modes_gone_and_throttling`;
/// a 100 MB body: tests/delivery.rs `a_100_mb_response_body_costs_at_most_the_body_cap_in_memory`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

// ---------------------------------------------------------------------------------------
// Security
// ---------------------------------------------------------------------------------------

/// With no CIDR allowed, deliveries to loopback are refused before connecting, for an
/// IP literal and for a host name that resolves there (`localhost`), and count as failed
/// attempts. (The guard's classification of every refused range: unit tests in
/// src/delivery/guard.rs; ping and telnet refusals: tests/rest.rs
/// `loopback_targets_are_refused_before_connecting_unless_allowed`; a 301 to a refused
/// address is not followed: `hostile_callbacks_...` above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_refused_addresses_are_refused_before_connecting() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-guard", &[]).await;
    let server = CallbackServer::start().await;
    let herald = Herald::start(&cluster, &ns, "callbackGuard:\n  allowCidrs: []\n").await;
    let api = cluster.subscriptions(&ns);
    let once = json!({"retry": {"maxAttempts": 1}});
    subscribe(&api, "name", &format!("http://localhost:{}/ok/name", server.port), once.clone()).await;
    subscribe(&api, "literal", &server.url("ok", "literal"), once).await;
    publish_ok(&herald, &host_events([1])).await;
    let mut outcome = Vec::new();
    for key in ["name", "literal"] {
        let s = wait_stats(&api, key, Duration::from_secs(60), "attempted", |s| s.total == 1).await;
        outcome.push((key, s.failure, s.last_error.clone().unwrap_or_default(), server.received(key).len()));
    }
    println!("{outcome:?}");
    for (key, failure, error, reached) in outcome {
        // HERALD BUG (F1 in docs/RELIABILITY.md) while this fails for "literal": an IP
        // literal never reaches the guarded resolver, so deliveries skip the guard.
        assert_eq!(reached, 0, "{key}: the callback was delivered to a refused address (loopback with allowCidrs [])");
        assert_eq!(failure, 1, "{key}: a refused destination is a failed attempt");
        assert!(error.contains("refused"), "{key}: lastError {error:?}");
    }
}

/// herald at `RUST_LOG=debug` (the harness runs it at info): the secrets check reads
/// everything herald and its libraries log. Same defaults as `Herald::start`.
struct VerboseHerald {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl VerboseHerald {
    async fn start(cluster: &Cluster, ns: &str, config_yaml: &str, dir: &Path) -> VerboseHerald {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("verbose.yaml");
        let defaults = format!(
            "store: {{path: {}}}\ncallbackGuard: {{allowCidrs: ['127.0.0.0/8']}}\nleaderElection: {{leaseDurationSeconds: 5}}\n{config_yaml}",
            dir.join("store").display()
        );
        std::fs::write(&config, defaults).unwrap();
        let port = free_port();
        let log = dir.join("verbose.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--config"])
            .arg(&config)
            .args(["--namespace", ns, "--instance", &format!("herald-{ns}"), "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawn herald");
        let herald = VerboseHerald { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(herald.url("/readyz")).await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "herald not ready:\n{}", herald.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        herald
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for VerboseHerald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The documented operations: (method, path template) from docs/openapi.json.
fn documented_routes() -> Vec<(String, String)> {
    let document: Value = serde_json::from_str(include_str!("../docs/openapi.json")).expect("docs/openapi.json");
    let mut routes = Vec::new();
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for method in operations.as_object().expect("operations").keys() {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

const OPEN_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

fn is_esb(path: &str) -> bool {
    path.starts_with("/api/c/compapi/")
}

fn fill_path(template: &str, subscription_id: &str) -> String {
    template
        .replace("{version}", "v3")
        .replace("{bk_supplier_account}", "0")
        .replace("{bk_biz_id}", "0")
        .replace("{subscription_id}", subscription_id)
}

/// A body the route would accept, so that only credentials decide the answer.
fn valid_body(template: &str, subscription_id: i64, callback: &str) -> Value {
    let subscription =
        json!({"subscription_name": "probe", "callback_url": callback, "subscription_form": "hostcreate"});
    let name = template.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    match name {
        "ping" => json!({"callback_url": callback, "data": "{}"}),
        "telnet" | "testing_connection" => json!({"callback_url": callback}),
        "publish" => host_event(1),
        "replay" => json!({}),
        "search_subscription" => json!({"condition": {}}),
        "unsubcribe_event" => json!({"subscription_id": subscription_id}),
        "update_event_subscribe" => {
            let mut body = subscription;
            body["subscription_id"] = subscription_id.into();
            body
        }
        _ if template.contains("/search/") => json!({"condition": {}}),
        _ => subscription,
    }
}

fn code(body: &Value) -> i64 {
    body["bk_error_code"].as_i64().or_else(|| body["code"].as_i64()).unwrap_or(-1)
}

/// Every route but health, readiness, metrics and the OpenAPI document needs credentials
/// (401 / ESB 1199027 without, or with unusable ones) and rights on the account (403 /
/// ESB 9900403 without): iterated over docs/openapi.json. Then, after runs that used a
/// signing secret, ESB app secrets and bearer tokens (right and wrong ones), none of them
/// appears in herald's log, in any subscription's status, in the namespace's Events or in
/// any answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_credentials_and_rights_and_no_secret_leaks() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-auth", &[]).await;
    let server = CallbackServer::start().await;
    let mut rng = fastrand::Rng::with_seed(seed());
    let mut secret = |prefix: &str| format!("{prefix}{}", (0..24).map(|_| rng.alphanumeric()).collect::<String>());
    let esb_secret = secret("esb-");
    let other_secret = secret("other-");
    let wrong_secret = secret("wrong-");
    let signing_raw = secret("");
    let signing_value = format!("whsec_{}", base64_encode(signing_raw.as_bytes()));
    let url_password = secret("pw");
    let garbage_token = secret("garbage.token.");
    let apps = test_dir(&ns, "apps.yaml");
    std::fs::write(
        &apps,
        format!(
            "apps:\n- appCode: cmdb\n  appSecret: {esb_secret}\n  accounts: ['0']\n- appCode: other\n  appSecret: {other_secret}\n  accounts: ['9']\n"
        ),
    )
    .unwrap();
    let config = format!("api:\n  auth:\n    anonymous: false\n  esbCredentialsFile: {}\n", apps.display());
    let herald = VerboseHerald::start(&cluster, &ns, &config, &test_dir(&ns, "herald")).await;
    let (made, _, err) = cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "sign",
        "-n",
        &ns,
        &format!("--from-literal=key={signing_value}"),
    ]);
    assert!(made, "{err}");
    let api = cluster.subscriptions(&ns);
    let signed = subscribe(
        &api,
        "signed",
        &server.url("ok", "signed"),
        json!({"signing": {"secretRef": {"name": "sign", "key": "key"}}}),
    )
    .await;
    subscribe(
        &api,
        "no-key",
        &server.url("ok", "no-key"),
        json!({"signing": {"secretRef": {"name": "sign", "key": "missing"}}, "retry": {"maxAttempts": 1}}),
    )
    .await;
    let with_password = format!("http://user:{url_password}@127.0.0.1:{}/status-500/password", server.port);
    subscribe(&api, "password", &with_password, json!({"retry": {"maxAttempts": 1}})).await;
    let nobody = cluster.service_account_token(&ns, "nobody", "herald");
    let writer = cluster.service_account_token(&ns, "writer", "herald");
    cluster.grant_accounts(&ns, "writer", &["get", "list", "create", "update", "delete", "publish", "replay"], &["0"]);
    let admin_token = std::fs::read_to_string(&cluster.kubeconfig)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_string))
        .unwrap();

    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    let callback = server.url("ok", "probe");
    let esb_header = |code: &str, secret: &str| {
        json!({"bk_app_code": code, "bk_app_secret": secret, "bk_username": "alice"}).to_string()
    };
    for (method, template) in documented_routes() {
        if OPEN_ROUTES.contains(&template.as_str()) {
            let answer = send(http.get(herald.url(&template))).await.unwrap();
            if answer.status != 200 {
                failures.push(format!("{template}: {} without credentials", answer.status));
            }
            continue;
        }
        let ids: Vec<String> = if template.contains("{subscription_id}") {
            vec![signed.to_string(), "987654".into()]
        } else {
            vec![String::new()]
        };
        for id in ids {
            let path = fill_path(&template, &id);
            let body = valid_body(&template, signed, &callback).to_string();
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let request = || {
                http.request(method.clone(), herald.url(&path))
                    .header("content-type", "application/json")
                    .body(body.clone())
            };
            // (what, request, expected HTTP status, expected code)
            let mut tries = vec![
                ("no credentials", request(), 401, 1_199_027),
                ("an unusable token", request().bearer_auth(&garbage_token), 401, 1_199_027),
                ("a token without rights", request().bearer_auth(&nobody), 403, 9_900_403),
            ];
            if is_esb(&template) {
                tries = vec![
                    ("no credentials", request(), 200, 1_199_027),
                    (
                        "a wrong app secret",
                        request().header("X-Bkapi-Authorization", esb_header("cmdb", &wrong_secret)),
                        200,
                        1_199_027,
                    ),
                    (
                        "an app without the account",
                        request().header("X-Bkapi-Authorization", esb_header("other", &other_secret)),
                        200,
                        9_900_403,
                    ),
                    ("a token without rights", request().bearer_auth(&nobody), 200, 9_900_403),
                ];
            }
            for (what, request, status, expected) in tries {
                let answer = send(request).await.unwrap();
                let got = (answer.status, code(&answer.body), answer.body["result"].as_bool());
                if got != (status, expected, Some(false)) {
                    failures.push(format!(
                        "{method} {path} with {what}: expected {status}/{expected}, got {}/{} {}",
                        got.0, got.1, answer.text
                    ));
                }
                if expected == 9_900_403 && answer.body["permission"].is_null() && got.1 == expected {
                    failures.push(format!("{method} {path} with {what}: 403 without permission details"));
                }
                answers.push(answer.text);
            }
        }
    }

    // The rightful callers get through, and the signed deliveries happen.
    let answer = send(http.post(herald.url("/api/v3/event/publish")).bearer_auth(&writer).json(&host_events(1..=3)))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text);
    answers.push(answer.text);
    let answer = send(
        http.post(herald.url("/api/c/compapi/v2/cc/search_subscription/"))
            .header("X-Bkapi-Authorization", esb_header("cmdb", &esb_secret))
            .json(&json!({})),
    )
    .await
    .unwrap();
    assert_eq!(code(&answer.body), 0, "{}", answer.text);
    answers.push(answer.text);
    let got = server.wait_for("signed", 3, Duration::from_secs(30)).await;
    assert!(got[0].header("webhook-signature").starts_with("v1,"), "signed deliveries");
    let no_key = wait_stats(&api, "no-key", Duration::from_secs(60), "a failed attempt", |s| s.failure >= 1).await;
    assert!(
        no_key.last_error.clone().unwrap_or_default().contains("sign"),
        "names the Secret: {:?}",
        no_key.last_error
    );
    wait_stats(&api, "password", Duration::from_secs(60), "a failed attempt", |s| s.failure >= 1).await;

    let statuses = cluster.kubectl(&["get", "eventsubscriptions", "-n", &ns, "-o", "jsonpath={.items[*].status}"]).1;
    let events = cluster.kubectl(&["get", "events", "-n", &ns, "-o", "json"]).1;
    let log = herald.log_text();
    let secrets = [
        ("ESB app secret", esb_secret.as_str()),
        ("other ESB app secret", other_secret.as_str()),
        ("wrong ESB app secret", wrong_secret.as_str()),
        ("signing secret", signing_value.as_str()),
        ("signing secret (raw)", signing_raw.as_str()),
        ("callback URL password", url_password.as_str()),
        ("bearer token without rights", nobody.as_str()),
        ("bearer token with rights", writer.as_str()),
        ("unusable bearer token", garbage_token.as_str()),
        ("herald's own API token", admin_token.as_str()),
    ];
    for (what, value) in secrets {
        for (place, text) in [("herald's log", &log), ("status", &statuses), ("Events", &events)] {
            if text.contains(value) {
                failures.push(format!("the {what} appears in {place}"));
            }
        }
        // Search answers carry callback_url as configured (bk-cmdb does too), user-info included.
        if value != url_password && answers.iter().any(|a| a.contains(value)) {
            failures.push(format!("the {what} appears in an API answer"));
        }
    }
    println!("{} answers checked; debug log {} lines", answers.len(), log.lines().count());
    // HERALD BUG (F3 in docs/RELIABILITY.md) while this lists the dead-letter routes with
    // an unknown id: they answer before authenticating.
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------------------------------------
// Bad input over real HTTP
// ---------------------------------------------------------------------------------------

/// Every code of docs/design.md §3's table with its HTTP status on the direct paths.
const CODES: [(i64, u16); 13] = [
    (0, 200),
    (1_103_000, 500),
    (1_103_001, 400),
    (1_103_002, 500),
    (1_103_003, 400),
    (1_103_004, 400),
    (1_103_005, 400),
    (1_199_000, 400),
    (1_199_006, 400),
    (1_199_010, 400),
    (1_199_014, 200),
    (1_199_027, 401),
    (9_900_403, 403),
];

/// The loopback URL every generated body uses: port 9 (discard) is closed here, so a
/// ping, telnet or delivery fails at once and nothing leaves the machine.
const SAFE_CALLBACK: &str = "http://127.0.0.1:9/cb";

/// A random string that can never become a URL (no ':' or '/'), with some non-ASCII.
fn random_text(rng: &mut fastrand::Rng) -> String {
    // C0 and C1 control characters, bidi override, astral plane: all legal in JSON strings.
    const ALPHABET: &[char] = &[
        'a', 'Z', '0', '9', ' ', '_', '-', '.', ',', '$', '%', '"', '\\', '{', '[', '中', 'é', '\u{0}', '\u{7f}',
        '\u{85}', '\u{9c}', '\u{202e}', '😀',
    ];
    let len = match rng.u8(..10) {
        0 => 0,
        1 => rng.usize(200..3000),
        _ => rng.usize(1..16),
    };
    (0..len).map(|_| ALPHABET[rng.usize(..ALPHABET.len())]).collect()
}

fn random_json(rng: &mut fastrand::Rng, depth: u32) -> Value {
    match rng.u8(..if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.bool()),
        2 => json!(rng.i64(..)),
        3 => json!([0, -1, 1, 300, 301, i64::MAX, i64::MIN][rng.usize(..7)]),
        4 => json!(rng.f64() * 1e6 - 5e5),
        5 => Value::String(random_text(rng)),
        6 => Value::Array((0..rng.usize(..5)).map(|_| random_json(rng, depth - 1)).collect()),
        _ => {
            const KEYS: &[&str] = &[
                "subscription_name",
                "callback_url",
                "subscription_form",
                "confirm_mode",
                "confirm_pattern",
                "time_out",
                "timeout",
                "system_name",
                "condition",
                "fields",
                "page",
                "start",
                "limit",
                "sort",
                "data",
                "event_type",
                "action",
                "obj_type",
                "cur_data",
                "pre_data",
                "bk_obj_id",
                "bk_supplier_account",
                "bk_biz_id",
                "subscription_id",
                "distribution_ids",
                "bk_app_code",
                "bk_app_secret",
                "$eq",
                "$ne",
                "$gt",
                "$in",
                "$regex",
                "$exists",
                "$and",
                "$or",
                "$where",
                "a.b",
                "",
            ];
            let mut object = serde_json::Map::new();
            for _ in 0..rng.usize(..6) {
                let key = if rng.u8(..4) == 0 { random_text(rng) } else { KEYS[rng.usize(..KEYS.len())].to_string() };
                let value = random_json(rng, depth - 1);
                object.insert(key, value);
            }
            Value::Object(object)
        }
    }
}

/// Keeps generated bodies on loopback: any top-level `callback_url` that is not the safe
/// one is replaced by it (a mutated URL could otherwise name another host).
fn keep_on_loopback(body: Vec<u8>) -> Vec<u8> {
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut object)) if object.get("callback_url").is_some_and(|u| u != SAFE_CALLBACK) => {
            object.insert("callback_url".into(), SAFE_CALLBACK.into());
            Value::Object(object).to_string().into_bytes()
        }
        Ok(Value::Array(items)) if items.iter().any(|i| i.get("callback_url").is_some()) => b"[]".to_vec(),
        _ => body,
    }
}

/// A random request body for `template`: empty, random bytes, random JSON, the valid body,
/// the valid body with a field given a random value, a byte-mutated valid body, deep
/// nesting, an oversize body, or the valid body with unknown fields.
fn random_body(rng: &mut fastrand::Rng, template: &str, subscription_id: i64) -> (String, Vec<u8>) {
    let valid = valid_body(template, subscription_id, SAFE_CALLBACK);
    let valid_bytes = valid.to_string().into_bytes();
    let (kind, body) = match rng.u8(..9) {
        0 => ("empty", Vec::new()),
        1 => ("random bytes", (0..rng.usize(..300)).map(|_| rng.u8(..)).collect()),
        2 => ("random JSON", random_json(rng, 4).to_string().into_bytes()),
        3 => ("valid", valid_bytes),
        4 => {
            let mut body = valid.clone();
            if let Some(object) = body.as_object_mut() {
                let keys: Vec<String> = object.keys().cloned().collect();
                if !keys.is_empty() {
                    let key = keys[rng.usize(..keys.len())].clone();
                    object.insert(key, random_json(rng, 3));
                }
            }
            ("a field of a random type", body.to_string().into_bytes())
        }
        5 => {
            let mut body = valid_bytes;
            for _ in 0..rng.usize(1..4) {
                if body.is_empty() {
                    break;
                }
                let at = rng.usize(..body.len());
                match rng.u8(..4) {
                    0 => body[at] = rng.u8(..),
                    1 => {
                        let end = (at + rng.usize(1..8)).min(body.len());
                        body.drain(at..end);
                    }
                    2 => body.splice(at..at, (0..rng.usize(1..8)).map(|_| rng.u8(..))).for_each(drop),
                    _ => body.truncate(at),
                }
            }
            ("byte-mutated", body)
        }
        6 => ("deep nesting", format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes()),
        7 => ("oversize", format!("{{\"subscription_name\": \"{}\"}}", "a".repeat(70_000)).into_bytes()),
        _ => {
            let mut body = valid.clone();
            if let Some(object) = body.as_object_mut() {
                object.insert(random_text(rng), random_json(rng, 2));
            }
            ("unknown field", body.to_string().into_bytes())
        }
    };
    (kind.to_string(), keep_on_loopback(body))
}

fn random_segment(rng: &mut fastrand::Rng, placeholder: &str, subscription_id: i64) -> String {
    let common: &[&str] = &["abc", "-1", "%20", "%2F", "%E4%B8%AD", "99999999999999999999999", "0x10", "%00"];
    let specific: Vec<String> = match placeholder {
        "{version}" => vec!["v3".into(), "v3".into(), "v1".into()],
        "{bk_supplier_account}" => vec!["0".into(), "0".into(), "7".into(), "a".repeat(300)],
        "{bk_biz_id}" => vec!["0".into(), "0".into(), "3".into()],
        _ => vec![
            subscription_id.to_string(),
            subscription_id.to_string(),
            "0".into(),
            "987654".into(),
            "1e3".into(),
            "9223372036854775808".into(),
        ],
    };
    if rng.u8(..4) == 0 {
        common[rng.usize(..common.len())].to_string()
    } else {
        specific[rng.usize(..specific.len())].clone()
    }
}

/// Checks one answer against the contract: never 5xx, always the documented envelope, a
/// code from the table, and the HTTP status that code has (ESB: always 200).
fn judge_answer(esb: bool, status: u16, text: &str) -> Result<(), String> {
    if status >= 500 {
        return Err(format!("HTTP {status}"));
    }
    let body: Value = serde_json::from_str(text)
        .map_err(|_| format!("HTTP {status}: not JSON: {}", text.chars().take(200).collect::<String>()))?;
    let keys: &[&str] = if esb {
        &["result", "code", "message", "data", "permission", "request_id"]
    } else {
        &["result", "bk_error_code", "bk_error_msg", "data", "permission"]
    };
    if let Some(missing) = keys.iter().find(|k| body.get(**k).is_none()) {
        return Err(format!("HTTP {status}: envelope without {missing}"));
    }
    let code = code(&body);
    let Some((_, usual)) = CODES.iter().find(|(c, _)| *c == code) else {
        return Err(format!("HTTP {status}: code {code} is not in the table"));
    };
    let expected_ok = if esb {
        status == 200
    } else {
        status == *usual || matches!((status, code), (404 | 405, 1_199_006) | (413, 1_199_000))
    };
    if !expected_ok {
        return Err(format!("HTTP {status} with code {code} (the table says {usual})"));
    }
    if (code == 0) != (body["result"] == true) {
        return Err(format!("HTTP {status}: result {} with code {code}", body["result"]));
    }
    Ok(())
}

/// Random and mutated requests to every documented route (and to unknown paths and wrong
/// methods) over real HTTP: zero 5xx, every answer in the documented envelope with a code
/// from docs/design.md §3's table and that code's HTTP status. Fast subset: 600 requests;
/// full suite: 6,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_requests_to_every_route_never_get_a_5xx() {
    let _turn = exclusive().await;
    let requests = scaled(600, 6000);
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    println!("HTTP fuzz: {requests} requests, seed {seed}");
    let cluster = cluster().await;
    let ns = cluster.namespace("f-fuzz", &[]).await;
    let apps = test_dir(&ns, "apps.yaml");
    std::fs::write(&apps, "apps:\n- appCode: cmdb\n  appSecret: fuzz\n  accounts: ['*']\n").unwrap();
    let config =
        format!("api:\n  maxBodyBytes: 65536\n  probeTimeoutSeconds: 1\n  esbCredentialsFile: {}\n", apps.display());
    let herald = Herald::start(&cluster, &ns, &config).await;
    let api = cluster.subscriptions(&ns);
    let known = subscribe(&api, "known", SAFE_CALLBACK, json!({"retry": {"maxAttempts": 1}})).await;
    let routes: Vec<(String, String)> =
        documented_routes().into_iter().filter(|(_, t)| !OPEN_ROUTES.contains(&t.as_str())).collect();
    // A fresh connection per request: herald (hyper) closes a kept-alive connection after
    // answering a request whose large body it did not read (a body on GET or DELETE, an
    // oversize one), and a pooled client's next request on it then fails (observation O2
    // in docs/RELIABILITY.md).
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(0).build().unwrap();
    let mut failures: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut oversize_resets = 0;
    let mut previous = String::new();
    for _ in 0..requests {
        let (mut method, template) = routes[rng.usize(..routes.len())].clone();
        let mut path = template.clone();
        for placeholder in ["{version}", "{bk_supplier_account}", "{bk_biz_id}", "{subscription_id}"] {
            if path.contains(placeholder) {
                path = path.replace(placeholder, &random_segment(&mut rng, placeholder, known));
            }
        }
        let documented_method = method.clone();
        match rng.u8(..20) {
            0 => method = ["GET", "PUT", "PATCH", "DELETE", "POST"][rng.usize(..5)].to_string(),
            1 => path = format!("{path}/extra"),
            _ => {}
        }
        // Unknown paths and wrong methods answer in the direct envelope (404 / 405).
        let esb_envelope = is_esb(&template) && method == documented_method && !path.ends_with("/extra");
        let (kind, body) = random_body(&mut rng, &template, known);
        let mut request =
            http.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), herald.url(&path)).body(body.clone());
        match rng.u8(..4) {
            0 => {}
            1 => request = request.header("content-type", "text/plain"),
            _ => request = request.header("content-type", "application/json"),
        }
        if rng.bool() {
            request = request.header("HTTP_BLUEKING_LANGUAGE", "en");
        }
        if is_esb(&template) && rng.bool() {
            request = request.header("X-Bkapi-Authorization", r#"{"bk_app_code": "cmdb", "bk_app_secret": "fuzz"}"#);
        }
        let response = match request.send().await {
            Ok(response) => response,
            // herald answers an oversize body (413, or an earlier refusal) without reading
            // it all; the connection then closes under a client still sending: counted.
            Err(_) if body.len() > 65_536 => {
                oversize_resets += 1;
                continue;
            }
            Err(error) => {
                let mut cause = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(inner) = source {
                    cause.push_str(&format!(": {inner}"));
                    source = inner.source();
                }
                failures
                    .entry(format!("{method} {template}: transport error"))
                    .or_insert((0, format!("{method} {path} ({kind} body, after {previous}): {cause}")))
                    .0 += 1;
                continue;
            }
        };
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        *by_status.entry(status).or_default() += 1;
        previous = format!("{method} {path} ({kind} body of {} B) answered {status}", body.len());
        if let Err(problem) = judge_answer(esb_envelope, status, &text) {
            let entry = failures.entry(format!("{method} {template}: {problem}")).or_insert((0, String::new()));
            entry.0 += 1;
            if entry.1.is_empty() {
                entry.1 = format!(
                    "{method} {path} ({kind} body {:?}) -> {}",
                    String::from_utf8_lossy(&body).chars().take(120).collect::<String>(),
                    text.chars().take(300).collect::<String>()
                );
            }
        }
    }
    println!(
        "answers by HTTP status: {by_status:?}; oversize bodies answered by a closed connection: {oversize_resets}"
    );
    // HERALD BUG (F3 in docs/RELIABILITY.md) while this lists the dead-letter routes: an
    // unknown subscription id answers 500.
    assert!(
        failures.is_empty(),
        "{} kinds of violation:\n{}",
        failures.len(),
        failures.iter().map(|(k, (n, example))| format!("{k} ({n}x), e.g. {example}")).collect::<Vec<_>>().join("\n")
    );
    assert!(alive(herald.pid()), "herald survived");
}

/// 1199006 "names the field" (docs/design.md §3) also where the refusal has a reason to give:
/// invalid events at publish, and ping/telnet targets the callback guard refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_validation_errors_name_the_field() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-fields", &[]).await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let http = reqwest::Client::new();
    let english =
        |path: &str, body: Value| http.post(herald.url(path)).header("HTTP_BLUEKING_LANGUAGE", "en").json(&body);
    let cases = [
        ("/api/v3/event/publish", json!({"event_type": "bogus", "action": "create", "obj_type": "host"}), "event_type"),
        ("/api/v3/event/publish", json!({"event_type": "instdata", "action": "upsert", "obj_type": "host"}), "action"),
        ("/api/v3/event/publish", json!({"event_type": "instdata", "action": "create", "obj_type": " "}), "obj_type"),
        (
            "/api/v3/event/publish",
            json!({"event_type": "instdata", "action": "create", "obj_type": "object", "data": [{"cur_data": {}}]}),
            "bk_obj_id",
        ),
        // [::1] is refused: the tests allow only 127.0.0.0/8.
        ("/api/v3/event/subscribe/ping", json!({"callback_url": "http://[::1]:9/", "data": ""}), "callback_url"),
        ("/api/v3/event/subscribe/telnet", json!({"callback_url": "http://[::1]:9/"}), "callback_url"),
    ];
    let mut failures = Vec::new();
    for (path, body, field) in cases {
        let answer = send(english(path, body.clone())).await.unwrap();
        let message = answer.body["bk_error_msg"].as_str().unwrap_or_default().to_string();
        if (answer.status, code(&answer.body)) != (400, 1_199_006) || !message.contains(field) {
            failures
                .push(format!("{path} {body}: {} {} — the message should name {field}", answer.status, answer.text));
        }
    }
    // HERALD BUG (F6 in docs/RELIABILITY.md) while this fails: `ApiError::invalid(field)
    // .with_detail(reason)` replaces the field name with the reason.
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Found by schemathesis: a REST create whose strings carry C1 control characters
/// (U+0080..U+009F, which JSON leaves unescaped and YAML forbids) is refused by the API
/// server's apply-patch parser, and herald answered that bad input with 500 / 1103000.
/// Accepted (200) or refused as invalid (400 / 1199006) are both fine; 500 is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_subscription_fields_are_bad_input_not_a_server_fault() {
    let _turn = exclusive().await;
    let cluster = cluster().await;
    let ns = cluster.namespace("f-control", &[]).await;
    let herald = Herald::start(&cluster, &ns, "").await;
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for (i, field) in ["subscription_name", "system_name", "confirm_pattern", "subscription_form"].iter().enumerate() {
        let mut body = json!({"subscription_name": format!("ctl-{i}"), "callback_url": SAFE_CALLBACK, "subscription_form": "hostcreate", "confirm_mode": "regular", "confirm_pattern": "ok"});
        body[*field] = format!("a\u{8c}b\u{9f}c-{i}").into();
        let answer = send(
            http.post(herald.url("/api/v3/event/subscribe/0/0")).header("HTTP_BLUEKING_LANGUAGE", "en").json(&body),
        )
        .await
        .unwrap();
        let fine = (answer.status == 200 && code(&answer.body) == 0)
            || (answer.status == 400 && code(&answer.body) == 1_199_006);
        if !fine {
            failures.push(format!("{field} with C1 control characters: {} {}", answer.status, answer.text));
        }
    }
    // HERALD BUG (F7 in docs/RELIABILITY.md) while this fails: an API-server refusal of the
    // object is reported as a server-side create failure.
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Bad input in process: generated inputs for the search filter, the event parser and
// the REST body parsers (no cluster needed; these run beside the cluster tests)
// ---------------------------------------------------------------------------------------

mod properties {
    use super::{full_suite, json};
    use herald::compat::ErrorCode;
    use herald::compat::input::{parse_ping, parse_subscription, parse_telnet};
    use herald::compat::search::{Filter, SearchRequest, search};
    use herald::event::{PublishedEvent, StoredEvent, callback_body, event_name, is_noop_update};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::Value;

    fn cases() -> u32 {
        if full_suite() { 20_000 } else { 400 }
    }

    const KEYS: &[&str] = &[
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$regex",
        "$exists",
        "$and",
        "$or",
        "$where",
        "$not",
        "$options",
        "subscription_id",
        "subscription_name",
        "statistics.total",
        "statistics",
        "a..b",
        ".",
        "",
        "event_type",
        "action",
        "obj_type",
        "data",
        "cur_data",
        "pre_data",
        "bk_obj_id",
        "bk_supplier_account",
        "request_id",
        "txn_id",
        "action_time",
        "last_time",
        "condition",
        "fields",
        "page",
        "start",
        "limit",
        "sort",
        "callback_url",
        "subscription_form",
        "confirm_mode",
        "confirm_pattern",
        "time_out",
        "timeout",
        "system_name",
    ];
    const WORDS: &[&str] = &[
        "instdata",
        "relation",
        "association",
        "create",
        "update",
        "delete",
        "host",
        "object",
        "module",
        "hostcreate",
        "httpstatus",
        "regular",
        "200",
        "(",
        ".*",
        "^a$",
        "-subscription_id",
        "subscription_name,-time_out",
        "http://127.0.0.1:9/cb",
        "0",
    ];

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![4 => select(KEYS).prop_map(str::to_string), 1 => any::<String>()]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            select(WORDS).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((key(), inner), 0..6).prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    /// Events shaped like producers' (right keys, mostly right values), with any value
    /// anywhere some of the time.
    fn event() -> impl Strategy<Value = Value> {
        let word =
            |words: &'static [&'static str]| prop_oneof![3 => select(words).prop_map(Value::from), 1 => json_value()];
        let item = prop_oneof![
            (json_value(), json_value()).prop_map(|(cur, pre)| json!({"cur_data": cur, "pre_data": pre})),
            ("[a-z]{0,6}", json_value()).prop_map(
                |(id, last)| json!({"cur_data": {"bk_obj_id": id, "last_time": last}, "pre_data": {"bk_obj_id": id}})
            ),
            json_value(),
        ];
        (
            word(&["instdata", "relation", "association"]),
            word(&["create", "update", "delete"]),
            word(&["host", "object", " ", "module"]),
            vec(item, 0..3),
            proptest::option::of(json_value()),
            proptest::option::of((key(), json_value())),
        )
            .prop_map(|(event_type, action, obj_type, data, account, extra)| {
                let mut event = json!({"event_type": event_type, "action": action, "obj_type": obj_type, "data": data});
                if let Some(account) = account {
                    event["bk_supplier_account"] = account;
                }
                if let Some((key, value)) = extra {
                    event[key] = value;
                }
                event
            })
    }

    fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![json_value().prop_map(|v| v.to_string().into_bytes()), vec(any::<u8>(), 0..256)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        /// Any condition: parsed and matched against any records without a panic, or
        /// refused with 1199006 naming what it refuses.
        #[test]
        fn search_conditions_match_or_are_refused_with_1199006(condition in json_value(), records in vec(json_value(), 0..8)) {
            match Filter::parse(&condition) {
                Ok(filter) => {
                    for record in &records {
                        let _ = filter.matches(record);
                    }
                }
                Err(error) => {
                    prop_assert_eq!(error.code, ErrorCode::FieldInvalid);
                    // Names the operator or field (the empty string when that is the offending key).
                    prop_assert!(error.detail.is_some(), "names the operator or field");
                }
            }
        }

        /// Any search body: filtered, sorted, paged and projected within its bounds, or
        /// refused with 1199000 / 1199006.
        #[test]
        fn search_bodies_page_within_bounds_or_are_refused(body in json_value(), records in vec(json_value(), 0..12), cap in proptest::option::of(1usize..300)) {
            match SearchRequest::from_value(&body) {
                Ok(request) => {
                    let (count, page) = search(records.clone(), &request, cap);
                    prop_assert!(count <= records.len());
                    prop_assert!(page.len() <= count.saturating_sub(request.page.start));
                    if let Some(cap) = cap {
                        prop_assert!(page.len() <= cap);
                    }
                }
                Err(error) => prop_assert!(matches!(error.code, ErrorCode::JsonDecode | ErrorCode::FieldInvalid), "{:?}", error),
            }
        }

        #[test]
        fn search_bytes_parse_or_are_refused(bytes in body_bytes()) {
            if let Err(error) = SearchRequest::parse(&bytes) {
                prop_assert!(matches!(error.code, ErrorCode::JsonDecode | ErrorCode::FieldInvalid), "{:?}", error);
            }
        }

        /// Any event: named, or refused naming one of its fields; stored and rendered as
        /// a callback body that is valid JSON with every bk-cmdb key.
        #[test]
        fn events_are_named_or_refused_and_always_render_valid_callback_bodies(event in event(), distribution_id in any::<i64>(), subscription_id in any::<i64>()) {
            let Ok(published) = serde_json::from_value::<PublishedEvent>(event) else { return Ok(()) };
            match event_name(&published) {
                Ok(name) => prop_assert!(!name.trim().is_empty()),
                Err(invalid) => prop_assert!(["event_type", "action", "obj_type", "bk_obj_id"].contains(&invalid.field), "{:?}", invalid),
            }
            let _ = is_noop_update(&published);
            let stored = StoredEvent::from_published(published, "2026-01-02 03:04:05", "req-1");
            let text = serde_json::to_string(&stored).unwrap();
            let body: Value = serde_json::from_str(&callback_body(&text, distribution_id, subscription_id)).expect("callback body is JSON");
            prop_assert_eq!(&body["distribution_id"], &json!(distribution_id));
            prop_assert_eq!(&body["subscription_id"], &json!(subscription_id));
            prop_assert!(body["bk_supplier_account"].as_str().is_some_and(|a| !a.trim().is_empty()));
            prop_assert_eq!(body.as_object().map(serde_json::Map::len), Some(11));
            // The data as stored, byte for byte (compared through the same JSON parser).
            let data: Value = serde_json::from_str(&serde_json::to_string(&stored.data).unwrap()).unwrap();
            prop_assert_eq!(&body["data"], &data);
        }

        /// REST bodies of create/update, ping and telnet: accepted, or refused with
        /// 1199000, 1199006 or 1199010.
        #[test]
        fn rest_bodies_parse_or_are_refused_with_their_codes(bytes in body_bytes()) {
            let errors = [parse_subscription(&bytes, "0", 0).err(), parse_ping(&bytes).err(), parse_telnet(&bytes).err()];
            for error in errors.into_iter().flatten() {
                prop_assert!(matches!(error.code, ErrorCode::JsonDecode | ErrorCode::FieldInvalid | ErrorCode::FieldMissing), "{:?}", error);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Full suite only: schemathesis and the soak
// ---------------------------------------------------------------------------------------

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
