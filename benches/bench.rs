//! herald benchmark (issue 6): herald as a real process (release build) against the real
//! test control plane, a callback receiver in a separate process, and one table.
//!
//! `cargo bench --bench bench` runs every phase against the control plane named by
//! `HERALD_BENCH_KUBECONFIG` (benches/run.sh starts one and stops it). The same binary is
//! the receiver: `bench callback-server --port N` (the bench starts it as a child process).
//!
//! Phases (`HERALD_BENCH_PHASES`, comma list, default all):
//! - `raw`: herald's own HTTP client stack (`delivery::http_client` + `callback::send`,
//!   same ~1 KB body) straight to the receiver, concurrency sweep; no herald.
//! - `delivery`: publish → confirmed delivery with 1 ordered subscription and fan-out to
//!   100 / 1,000 subscriptions; latency publish → callback at 1,000 events/s and at half
//!   the ordered maximum; API-server status writes per phase; REST subscribe and search.
//! - `scale`: time from creating 5,000 / 10,000 subscriptions to all Ready, peak RSS; on
//!   each engine of `HERALD_BENCH_SCALE_ENGINES` (JetStream: the NATS servers' memory too).
//! - `engines`: the same ordered and fan-out runs on each store engine in one run: SQLite,
//!   JetStream with 1 herald, JetStream with 3 herald replicas (publishes spread over them),
//!   each as a ratio to the raw limit measured around it, with herald's and the NATS
//!   servers' CPU (what bounds scaling on this machine). Needs `HERALD_BENCH_NATS_URLS`.
//! - `sources`: bk-cmdb watch events through herald (the watch emulator of
//!   tests/cmdb_emulator as its own process, a CmdbSource reading from a start time) to
//!   one and to 100 subscriptions, as a ratio to the emulator's own answer rate measured
//!   by a plain reading client in the same run.
//!
//! Sizes scale down with environment variables (see `Settings::from_env`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed test step is a test failure

#[path = "../tests/common/cmdb.rs"]
#[allow(dead_code)] // the tests use more of the emulator's controls than the benchmark does
mod cmdb;
#[path = "../tests/common/launch.rs"]
#[allow(dead_code)] // the tests use more of the launcher than the benchmark does
mod launch;

use cmdb::Emulator;
use futures::{StreamExt, TryStreamExt};
use herald::crd::EventSubscription;
use herald::delivery::callback::{self, Request};
use herald::store::Queued;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use launch::{Launch, free_port};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if args.first().map(String::as_str) == Some("callback-server") {
        let port = args
            .iter()
            .position(|a| a == "--port")
            .and_then(|i| args.get(i + 1))
            .and_then(|p| p.parse().ok())
            .expect("callback-server --port N");
        runtime.block_on(receiver::serve(port));
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    runtime.block_on(run());
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The callback receiver: answers every `POST /cb/...` with 200 "ok", counts requests and
/// records (publish time carried in the body as `"bench_t":NANOS`, receive time), both
/// from CLOCK_REALTIME on this machine.
mod receiver {
    use super::now_ns;
    use axum::body::Bytes;
    use axum::routing::{get, post};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    static COUNT: AtomicU64 = AtomicU64::new(0);
    static SAMPLES: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
    const MARK: &[u8] = b"\"bench_t\":";

    pub fn sent_at(body: &[u8]) -> Option<u64> {
        let start = body.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
        let digits = body[start..].iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&body[start..start + digits]).ok()?.parse().ok().filter(|t| *t > 0)
    }

    async fn receive(body: Bytes) -> &'static str {
        let at = now_ns();
        COUNT.fetch_add(1, Ordering::Relaxed);
        if let Some(sent) = sent_at(&body)
            && let Ok(mut samples) = SAMPLES.lock()
        {
            samples.push((sent, at));
        }
        "ok"
    }

    async fn count() -> String {
        COUNT.load(Ordering::Relaxed).to_string()
    }

    /// Every (sent, received) pair since the last call, one per line.
    async fn take() -> String {
        let samples = SAMPLES.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        let mut out = String::with_capacity(samples.len() * 40);
        for (sent, at) in samples {
            out.push_str(&format!("{sent} {at}\n"));
        }
        out
    }

    pub async fn serve(port: u16) {
        let app = axum::Router::new()
            .route("/cb/{*key}", post(receive))
            // Never answers: a callback that hangs (herald's attempt times out).
            .route("/hang/{*key}", post(std::future::pending::<&'static str>))
            .route("/count", get(count))
            .route("/samples", post(take));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind receiver");
        axum::serve(listener, app).await.expect("serve receiver");
    }
}

/// What the environment asks for. Every size can be scaled down for a quick run.
struct Settings {
    kubeconfig: Option<PathBuf>,
    herald_bin: PathBuf,
    /// Command prefix for herald (for example a valgrind invocation), split on spaces.
    wrap: Vec<String>,
    phases: HashSet<String>,
    raw_seconds: f64,
    adjacent_seconds: f64,
    concurrency: Vec<usize>,
    ordered_events: usize,
    fanout: Vec<usize>,
    fanout_deliveries: usize,
    latency_seconds: f64,
    latency_rates: Vec<String>,
    rest_creates: usize,
    rest_seconds: f64,
    scale: Vec<usize>,
    scale_engines: Vec<Engine>,
    source_events: usize,
    engine_setups: Vec<(Engine, usize)>,
    engine_ordered_events: usize,
    engine_fanout: usize,
    engine_fanout_deliveries: usize,
    /// The JetStream cluster's client URLs (benches/run.sh starts one: tests/nats/up.sh).
    nats_urls: Option<String>,
    work_dir: PathBuf,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.to_string())
}

fn list<T: std::str::FromStr>(text: &str) -> Vec<T> {
    text.split(',').filter_map(|v| v.trim().parse().ok()).collect()
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            kubeconfig: std::env::var_os("HERALD_BENCH_KUBECONFIG").map(PathBuf::from),
            herald_bin: PathBuf::from(env_or("HERALD_BENCH_BIN", env!("CARGO_BIN_EXE_herald"))),
            wrap: env_or("HERALD_BENCH_WRAP", "").split_whitespace().map(str::to_string).collect(),
            phases: list::<String>(&env_or("HERALD_BENCH_PHASES", "raw,delivery,scale,sources,engines"))
                .into_iter()
                .collect(),
            raw_seconds: env_or("HERALD_BENCH_RAW_SECONDS", "3").parse().unwrap_or(3.0),
            adjacent_seconds: env_or("HERALD_BENCH_ADJACENT_SECONDS", "1.5").parse().unwrap_or(1.5),
            concurrency: list(&env_or("HERALD_BENCH_CONCURRENCY", "1,2,4,8,16,32,64")),
            ordered_events: env_or("HERALD_BENCH_ORDERED_EVENTS", "40000").parse().unwrap_or(40_000),
            fanout: list(&env_or("HERALD_BENCH_FANOUT", "100,1000")),
            fanout_deliveries: env_or("HERALD_BENCH_FANOUT_DELIVERIES", "100000").parse().unwrap_or(100_000),
            latency_seconds: env_or("HERALD_BENCH_LATENCY_SECONDS", "10").parse().unwrap_or(10.0),
            latency_rates: list(&env_or("HERALD_BENCH_LATENCY_RATES", "1000,half")),
            rest_creates: env_or("HERALD_BENCH_REST_CREATES", "200").parse().unwrap_or(200),
            rest_seconds: env_or("HERALD_BENCH_REST_SECONDS", "5").parse().unwrap_or(5.0),
            scale: list(&env_or("HERALD_BENCH_SCALE", "5000,10000")),
            scale_engines: list::<String>(&env_or("HERALD_BENCH_SCALE_ENGINES", "sqlite,jetstream"))
                .iter()
                .filter_map(|e| Engine::parse(e))
                .collect(),
            source_events: env_or("HERALD_BENCH_SOURCE_EVENTS", "20000").parse().unwrap_or(20_000),
            engine_setups: list::<String>(&env_or("HERALD_BENCH_ENGINE_SETUPS", "sqlite,jetstream,jetstream-3"))
                .iter()
                .filter_map(|setup| {
                    let (engine, replicas) = setup.split_once('-').unwrap_or((setup, "1"));
                    Some((Engine::parse(engine)?, replicas.parse().ok()?))
                })
                .collect(),
            engine_ordered_events: env_or("HERALD_BENCH_ENGINE_ORDERED_EVENTS", "3000").parse().unwrap_or(3000),
            engine_fanout: env_or("HERALD_BENCH_ENGINE_FANOUT", "100").parse().unwrap_or(100),
            engine_fanout_deliveries: env_or("HERALD_BENCH_ENGINE_FANOUT_DELIVERIES", "20000")
                .parse()
                .unwrap_or(20_000),
            nats_urls: std::env::var("HERALD_BENCH_NATS_URLS").ok().filter(|u| !u.trim().is_empty()),
            work_dir: PathBuf::from(env_or("HERALD_BENCH_DIR", &std::env::temp_dir().display().to_string())),
        }
    }
    fn phase(&self, name: &str) -> bool {
        self.phases.contains(name)
    }
}

/// herald's store engine for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Sqlite,
    JetStream,
}

impl Engine {
    fn parse(text: &str) -> Option<Engine> {
        match text.trim() {
            "sqlite" => Some(Engine::Sqlite),
            "jetstream" => Some(Engine::JetStream),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::JetStream => "JetStream",
        }
    }

    /// herald's config for this engine: streams of their own per run (R3, the default, on
    /// the 3-node cluster) for JetStream, nothing to add for SQLite.
    fn config(self, settings: &Settings) -> String {
        match self {
            Engine::Sqlite => String::new(),
            Engine::JetStream => {
                let urls = settings
                    .nats_urls
                    .as_deref()
                    .expect("HERALD_BENCH_NATS_URLS is required for JetStream runs (benches/run.sh starts a cluster)");
                launch::jetstream_config_for(urls, &format!("HB{:08X}", now_ns() & 0xffff_ffff))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Machine

struct Machine {
    nproc: usize,
    cpu: String,
    mem_gb: f64,
    load_start: String,
    kernel: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn loadavg() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

impl Machine {
    fn describe() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string());
        let mem_kb: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1),
            cpu: cpu.unwrap_or_else(|| "unknown".into()),
            mem_gb: mem_kb / 1024.0 / 1024.0,
            load_start: loadavg(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        }
    }
}

/// fsync latency of the store's file system (4 KiB appends + fdatasync), the raw limit
/// under every durable publish.
fn fsync_probe(dir: &Path, seconds: f64) -> (f64, f64, f64) {
    use std::io::Write;
    let _ = std::fs::create_dir_all(dir);
    let path = dir.join("fsync-probe");
    let Ok(mut file) = std::fs::File::create(&path) else { return (0.0, 0.0, 0.0) };
    let block = vec![b'x'; 4096];
    let mut times = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        if file.write_all(&block).and_then(|_| file.sync_data()).is_err() {
            break;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = std::fs::remove_file(&path);
    let rate = times.len() as f64 / started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    (rate, percentile(&times, 0.50), percentile(&times, 0.99))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// CPU seconds (user + system) a process has used.
/// CPU seconds the control plane's kube-apiserver and etcd have used (their PIDs from the
/// state directory `tests/controlplane/up.sh` exports), when known.
fn control_plane_cpu_seconds() -> Option<f64> {
    let state = PathBuf::from(std::env::var("HERALD_CONTROLPLANE").ok()?);
    let pid = |name: &str| std::fs::read_to_string(state.join(format!("{name}.pid"))).ok()?.trim().parse::<u32>().ok();
    Some(cpu_seconds(pid("kube-apiserver")?) + cpu_seconds(pid("etcd")?))
}

/// The test NATS cluster's server processes (tests/nats/up.sh writes their PIDs beside the
/// control plane's).
fn nats_pids() -> Vec<u32> {
    let Some(state) = std::env::var_os("HERALD_CONTROLPLANE").map(PathBuf::from) else { return Vec::new() };
    (1..=3)
        .filter_map(|n| std::fs::read_to_string(state.join(format!("nats-{n}.pid"))).ok()?.trim().parse().ok())
        .collect()
}

fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

/// Resident memory now (VmRSS), MB, summed over `pids`.
fn vm_rss_mb(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| proc_status_mb(*pid, "VmRSS:")).sum()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = read(&format!("/proc/{pid}/stat"));
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(14) + ticks(15)) / 100.0
}

fn vm_hwm_mb(pid: u32) -> f64 {
    proc_status_mb(pid, "VmHWM:").unwrap_or(f64::NAN)
}

/// A kB figure of /proc/<pid>/status (`key` with its colon), in MB.
fn proc_status_mb(pid: u32, key: &str) -> Option<f64> {
    read(&format!("/proc/{pid}/status"))
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

// ---------------------------------------------------------------------------------------
// The receiver process, seen from the bench

struct Receiver {
    child: Child,
    port: u16,
    http: reqwest::Client,
}

impl Receiver {
    async fn start() -> Receiver {
        let port = free_port();
        let child = Command::new(std::env::current_exe().expect("own path"))
            .args(["callback-server", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the callback server");
        let receiver = Receiver { child, port, http: reqwest::Client::builder().no_proxy().build().expect("client") };
        for _ in 0..100 {
            if receiver.http.get(receiver.url("/count")).send().await.is_ok() {
                return receiver;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the callback server did not start");
    }
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
    fn callback(&self, key: &str) -> String {
        self.url(&format!("/cb/{key}"))
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    async fn count(&self) -> u64 {
        let text =
            self.http.get(self.url("/count")).send().await.expect("receiver count").text().await.unwrap_or_default();
        text.trim().parse().unwrap_or(0)
    }
    /// Latencies (ms) of the samples sent at or after `since_ns`; clears the receiver's list.
    async fn latencies(&self, since_ns: u64) -> Vec<f64> {
        let text = self
            .http
            .post(self.url("/samples"))
            .send()
            .await
            .expect("receiver samples")
            .text()
            .await
            .unwrap_or_default();
        let mut out: Vec<f64> = text
            .lines()
            .filter_map(|l| {
                let (sent, at) = l.split_once(' ')?;
                Some((sent.parse::<u64>().ok()?, at.parse::<u64>().ok()?))
            })
            .filter(|(sent, _)| *sent >= since_ns)
            .map(|(sent, at)| at.saturating_sub(sent) as f64 / 1e6)
            .collect();
        out.sort_by(f64::total_cmp);
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Events and the ~1 KB body

const PAD: usize = 620;

/// One published event of `obj_type` (event name `{obj_type}create`); `sent` is the
/// CLOCK_REALTIME publish time the receiver subtracts from its receive time.
fn event(obj_type: &str, seq: u64, sent: u64) -> serde_json::Value {
    serde_json::json!({
        "event_type": "instdata", "action": "create", "obj_type": obj_type,
        "data": [{"cur_data": {"bench_t": sent, "bk_host_id": seq, "bk_host_innerip": "10.0.0.1",
                               "bk_host_name": format!("bench-host-{seq}"), "pad": "x".repeat(PAD)},
                  "pre_data": null}],
        "bk_supplier_account": "0",
    })
}

/// The stored form herald keeps for `event` (what `callback::send` turns into the body).
fn stored(event: serde_json::Value) -> String {
    let published: herald::event::PublishedEvent = serde_json::from_value(event).expect("event");
    let stored = herald::event::StoredEvent::from_published(
        published,
        "2026-01-02 03:04:05",
        "bench-0123456789abcdef0123456789abcdef",
    );
    serde_json::to_string(&stored).expect("stored event")
}

// ---------------------------------------------------------------------------------------
// Phase 1: the raw limit

struct RawPoint {
    concurrency: usize,
    rate: f64,
    errors: u64,
    /// CPU of the sending (bench) process per request, µs.
    client_us: f64,
}

struct Raw {
    points: Vec<RawPoint>,
    body_bytes: usize,
    /// Receiver CPU microseconds per request over the sweep.
    receiver_us_per_request: f64,
}

impl Raw {
    fn serial(&self) -> &RawPoint {
        self.points.iter().find(|p| p.concurrency == 1).unwrap_or(&self.points[0])
    }
    fn best(&self) -> &RawPoint {
        self.points.iter().max_by(|a, b| a.rate.total_cmp(&b.rate)).expect("a sweep point")
    }
}

/// herald's own HTTP client stack (`outbound::Outbound` with the callback guard, and
/// `callback::send` with the same headers, timeout and body cap) and the same ~1 KB body.
struct RawClient {
    outbound: herald::outbound::Outbound,
    item: Arc<Queued>,
    url: Arc<reqwest::Url>,
}

impl RawClient {
    fn new(receiver: &Receiver) -> RawClient {
        let guard = herald::outbound::GuardConfig {
            allow_cidrs: vec!["127.0.0.0/8".parse().expect("a CIDR")],
            ..Default::default()
        };
        let outbound = herald::outbound::Outbound::new(&guard).expect("herald's HTTP client");
        let item = Arc::new(Queued {
            subscription_id: 1,
            position: 1,
            event_id: 1,
            distribution_id: 1,
            attempts: 0,
            enqueued_at: 0,
            body: stored(event("bnchraw", 1, 0)),
        });
        RawClient {
            outbound,
            item,
            url: Arc::new(reqwest::Url::parse(&receiver.callback("raw")).expect("callback URL")),
        }
    }

    fn body_bytes(&self) -> usize {
        herald::event::callback_body(&self.item.body, 1, 1).len()
    }

    /// Requests per second with `concurrency` senders for `seconds` (after a short warm-up).
    async fn measure(&self, concurrency: usize, seconds: f64) -> RawPoint {
        let warm = Duration::from_secs_f64(seconds * 0.15);
        let measure = Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let (from, until) = (start + warm, start + warm + measure);
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let cpu = Arc::new(std::sync::Mutex::new((0.0, 0.0)));
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (outbound, item, url) = (self.outbound.clone(), self.item.clone(), self.url.clone());
                let (done, errors) = (done.clone(), errors.clone());
                let budget = herald::outbound::body::ByteBudget::new(64 << 20);
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let request = Request {
                            url: Some(&url),
                            item: &item,
                            attempt: 1,
                            timeout: Duration::from_secs(10),
                            signing_key: None,
                            body_cap: 1 << 20,
                            answer_budget: &budget,
                            retry_after_cap: Duration::from_secs(300),
                        };
                        let ok = matches!(callback::send(&outbound, request).await, Ok(answer) if answer.status == 200);
                        let now = Instant::now();
                        if now >= from && now < until {
                            if ok { &done } else { &errors }.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let sampler = {
            let cpu = cpu.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(from.into()).await;
                let first = cpu_seconds(std::process::id());
                tokio::time::sleep_until(until.into()).await;
                if let Ok(mut cpu) = cpu.lock() {
                    *cpu = (first, cpu_seconds(std::process::id()));
                }
            })
        };
        for worker in workers {
            let _ = worker.await;
        }
        let _ = sampler.await;
        let done = done.load(Ordering::Relaxed);
        let (first, last) = cpu.lock().map(|c| *c).unwrap_or_default();
        RawPoint {
            concurrency,
            rate: done as f64 / measure.as_secs_f64(),
            errors: errors.load(Ordering::Relaxed),
            client_us: (last - first) * 1e6 / done.max(1) as f64,
        }
    }
}

async fn raw_limit(settings: &Settings, raw: &RawClient, receiver: &Receiver) -> Raw {
    let cpu_before = cpu_seconds(receiver.pid());
    let count_before = receiver.count().await;
    let mut points = Vec::new();
    for &concurrency in &settings.concurrency {
        let point = raw.measure(concurrency, settings.raw_seconds).await;
        eprintln!(
            "raw: concurrency {concurrency:>3}: {:>8.0} req/s, client CPU {:.1} µs/req",
            point.rate, point.client_us
        );
        points.push(point);
    }
    let requests = receiver.count().await - count_before;
    let receiver_us_per_request = (cpu_seconds(receiver.pid()) - cpu_before) * 1e6 / requests.max(1) as f64;
    Raw { points, body_bytes: raw.body_bytes(), receiver_us_per_request }
}

// ---------------------------------------------------------------------------------------
// The control plane and herald

struct Cluster {
    client: kube::Client,
}

impl Cluster {
    async fn connect(kubeconfig: &Path) -> Cluster {
        let kc = Kubeconfig::read_from(kubeconfig).expect("readable HERALD_BENCH_KUBECONFIG");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("valid kubeconfig");
        Cluster { client: kube::Client::try_from(config).expect("kube client") }
    }

    async fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:x}", now_ns() & 0xffffff);
        let ns =
            Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
        Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
        name
    }

    async fn delete_namespace(&self, name: &str) {
        let api = Api::<Namespace>::all(self.client.clone());
        let _ = api.delete(name, &DeleteParams::default()).await;
        let started = Instant::now();
        while api.get_opt(name).await.ok().flatten().is_some() {
            if started.elapsed() > Duration::from_secs(900) {
                eprintln!("namespace {name} still terminating after 15 minutes; going on");
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("namespace {name} deleted in {:.1} s", started.elapsed().as_secs_f64());
    }

    /// PATCHes of eventsubscriptions/status the API server has served (its own metrics;
    /// server-side apply PATCHes are counted under verb="APPLY").
    async fn status_patches(&self) -> f64 {
        let request = axum::http::Request::get("/metrics").body(Vec::new()).expect("request");
        let text = self.client.request_text(request).await.expect("API server /metrics");
        text.lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter(|l| {
                l.contains("resource=\"eventsubscriptions\"")
                    && l.contains("subresource=\"status\"")
                    && (l.contains("verb=\"PATCH\"") || l.contains("verb=\"APPLY\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn subscriptions(&self, namespace: &str) -> Api<EventSubscription> {
        Api::namespaced(self.client.clone(), namespace)
    }
}

fn is_ready(sub: &EventSubscription) -> bool {
    sub.status.as_ref().is_some_and(|s| {
        s.subscription_id.is_some() && s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Watches `api` and resolves when `want` objects are Ready (or after `within`).
fn track_ready(api: Api<EventSubscription>, want: usize, within: Duration) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        let mut ready = HashSet::new();
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let event = match tokio::time::timeout_at(deadline, stream.try_next()).await {
                Ok(Ok(Some(event))) => event,
                Ok(Ok(None)) | Err(_) => return None,
                Ok(Err(error)) => {
                    eprintln!("watch error (retrying): {error}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            match event {
                watcher::Event::Apply(sub) | watcher::Event::InitApply(sub) => {
                    let name = sub.metadata.name.clone().unwrap_or_default();
                    if is_ready(&sub) {
                        ready.insert(name);
                    } else {
                        ready.remove(&name);
                    }
                }
                watcher::Event::Delete(sub) => {
                    ready.remove(&sub.metadata.name.clone().unwrap_or_default());
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
            if ready.len() >= want {
                return Some(Instant::now());
            }
        }
    })
}

/// Creates subscriptions `(name, event name, callback)` with `concurrency` creates in flight.
async fn create_subscriptions(
    api: &Api<EventSubscription>,
    specs: Vec<(String, String, String)>,
    concurrency: usize,
) -> usize {
    futures::stream::iter(specs)
        .map(|(name, event, url)| {
            let api = api.clone();
            async move {
                let sub: EventSubscription = serde_json::from_value(serde_json::json!({
                    "apiVersion": "herald.dev/v1alpha1", "kind": "EventSubscription",
                    "metadata": {"name": name},
                    "spec": {"subscriptionName": name, "callbackUrl": url, "events": [event]},
                }))
                .expect("subscription");
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &sub).await {
                        Ok(_) => return true,
                        Err(kube::Error::Api(status)) if status.code == 409 => return true,
                        Err(error) if attempt == 4 => eprintln!("create {name}: {error}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                false
            }
        })
        .buffer_unordered(concurrency)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

/// How a herald process is started: its instance name (replicas of one namespace differ in
/// it) and the config YAML merged over the test defaults (the engine's).
#[derive(Clone)]
struct Role {
    instance: String,
    config: String,
}

impl Role {
    /// The only herald of a namespace, on the embedded store.
    fn solo() -> Role {
        Role { instance: "herald-bench".into(), config: String::new() }
    }
}

struct Herald {
    child: Child,
    port: u16,
    log: PathBuf,
    http: reqwest::Client,
    role: Role,
}

impl Herald {
    /// A fresh herald: its own empty store.
    async fn start(settings: &Settings, kubeconfig: &Path, namespace: &str, role: Role) -> Herald {
        let _ = std::fs::remove_dir_all(Herald::dir(settings, namespace, &role));
        Herald::launch(settings, kubeconfig, namespace, role).await
    }

    fn dir(settings: &Settings, namespace: &str, role: &Role) -> PathBuf {
        settings.work_dir.join(format!("herald-bench-{namespace}-{}", role.instance))
    }

    /// Starts herald on the store left in its directory and waits until /readyz is 200.
    async fn launch(settings: &Settings, kubeconfig: &Path, namespace: &str, role: Role) -> Herald {
        let dir = Herald::dir(settings, namespace, &role);
        let launched = Launch {
            binary: settings.herald_bin.clone(),
            wrap: &settings.wrap,
            config_yaml: &role.config,
            ..Launch::new(kubeconfig, namespace, &role.instance, &dir)
        }
        .spawn();
        let (child, port, log) = (launched.child, launched.port, launched.log);
        let mut herald = Herald {
            child,
            port,
            log,
            http: reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().expect("client"),
            role,
        };
        let within = if settings.wrap.is_empty() { Duration::from_secs(120) } else { Duration::from_secs(900) };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = herald.child.try_wait() {
                panic!("herald exited with {status}; see {}", herald.log.display());
            }
            if herald.http.get(herald.url("/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(started.elapsed() < within, "herald not ready within {within:?}; see {}", herald.log.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        herald
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sum of herald's `/metrics` lines starting with `prefix` that contain `matching`.
    async fn metric_sum(&self, prefix: &str, matching: &str) -> u64 {
        let text = match self.http.get(self.url("/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => return 0,
        };
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(matching))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Watch events read by every source so far (herald's own counter).
    async fn source_events_read(&self) -> u64 {
        self.metric_sum("herald_source_events_read_total{", "").await
    }

    /// Confirmed deliveries so far (herald's own counter).
    async fn delivered(&self) -> u64 {
        self.metric_sum("herald_delivery_attempts_total{", "result=\"delivered\"").await
    }

    async fn publish(&self, events: Vec<serde_json::Value>) -> bool {
        let body = serde_json::Value::Array(events);
        for _ in 0..3 {
            match self.http.post(self.url("/api/v3/event/publish")).json(&body).send().await {
                Ok(response) if response.status().is_success() => return true,
                Ok(response) => eprintln!("publish answered {}", response.status()),
                Err(error) => eprintln!("publish failed: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// One publish call; herald's answer (`data`: accepted, queued, …), if it answered 200.
    async fn publish_answer(&self, events: Vec<serde_json::Value>) -> Option<serde_json::Value> {
        let response = self.http.post(self.url("/api/v3/event/publish")).json(&events).send().await.ok()?;
        let answer: serde_json::Value = response.error_for_status().ok()?.json().await.ok()?;
        Some(answer["data"].clone())
    }

    /// SIGKILL (our own child, by PID) and reap: a crash, not a shutdown.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (our own child, by PID); SIGKILL after 60 s.
    fn stop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Phase 2-4: delivery throughput, latency, API-server writes

struct Throughput {
    label: String,
    subscriptions: usize,
    deliveries: u64,
    seconds: f64,
    rate: f64,
    publish_seconds: f64,
    status_writes_per_s: f64,
    herald_cpu_share: f64,
    receiver_cpu_share: f64,
    /// Cores the NATS servers used meanwhile (0 without JetStream).
    nats_cpu_share: f64,
    receiver_us_per_request: f64,
    /// herald CPU per confirmed delivery, µs.
    herald_us_per_delivery: f64,
    /// The raw limit measured right before and right after this run (mean), at the
    /// concurrency this run is compared with: same conditions on a shared machine.
    raw_adjacent: f64,
    raw_concurrency: usize,
}

/// Publish calls in flight during throughput runs.
const PUBLISHERS: usize = 4;

/// Publishes `events` events of `obj_type` (matched by `subscriptions` subscriptions), the
/// calls spread over `heralds` (replicas of one store), and waits until they have confirmed
/// every delivery.
#[allow(clippy::too_many_arguments)]
async fn throughput(
    cluster: &Cluster,
    heralds: &[&Herald],
    receiver: &Receiver,
    (raw, raw_concurrency, raw_seconds): (&RawClient, usize, f64),
    label: &str,
    obj_type: &str,
    subscriptions: usize,
    events: usize,
) -> Throughput {
    let raw_before = raw.measure(raw_concurrency, raw_seconds).await.rate;
    let deliveries = (events * subscriptions) as u64;
    // Fan-out rows per publish call stay near 1,000: one transaction per call.
    let batch = (1000 / subscriptions).clamp(1, 100);
    let delivered =
        || async { futures::future::join_all(heralds.iter().map(|h| h.delivered())).await.into_iter().sum::<u64>() };
    let pids: Vec<u32> = heralds.iter().map(|h| h.pid()).collect();
    let nats = nats_pids();
    let (d0, c0, w0) = (delivered().await, receiver.count().await, cluster.status_patches().await);
    let (h0, r0, n0) = (cpu_seconds_of(&pids), cpu_seconds(receiver.pid()), cpu_seconds_of(&nats));
    let started = Instant::now();
    // A few producers at once, as concurrent publishes share one commit (group commit).
    let publisher = async {
        let published: Vec<bool> = futures::stream::iter((0..events).step_by(batch).enumerate())
            .map(|(call, first)| {
                let chunk: Vec<_> =
                    (first..(first + batch).min(events)).map(|seq| event(obj_type, seq as u64, now_ns())).collect();
                heralds[call % heralds.len()].publish(chunk)
            })
            .buffer_unordered(PUBLISHERS)
            .collect()
            .await;
        assert!(published.iter().all(|ok| *ok), "publish failed");
        started.elapsed().as_secs_f64()
    };
    let waiter = async {
        let deadline = started + Duration::from_secs(600);
        loop {
            let done = delivered().await.saturating_sub(d0);
            if done >= deliveries {
                return Some(started.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                eprintln!("{label}: only {done} of {deliveries} deliveries confirmed after 600 s");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (publish_seconds, seconds) = tokio::join!(publisher, waiter);
    let seconds = seconds.unwrap_or(f64::NAN);
    let writes = cluster.status_patches().await - w0;
    let received = receiver.count().await - c0;
    let (h1, r1, n1) = (cpu_seconds_of(&pids), cpu_seconds(receiver.pid()), cpu_seconds_of(&nats));
    let _ = receiver.latencies(u64::MAX).await; // drop these samples
    let raw_after = raw.measure(raw_concurrency, raw_seconds).await.rate;
    let result = Throughput {
        label: label.to_string(),
        subscriptions,
        deliveries,
        seconds,
        rate: deliveries as f64 / seconds,
        publish_seconds,
        status_writes_per_s: writes / seconds,
        herald_cpu_share: (h1 - h0) / seconds,
        receiver_cpu_share: (r1 - r0) / seconds,
        nats_cpu_share: (n1 - n0) / seconds,
        receiver_us_per_request: (r1 - r0) * 1e6 / received.max(1) as f64,
        herald_us_per_delivery: (h1 - h0) * 1e6 / deliveries.max(1) as f64,
        raw_adjacent: (raw_before + raw_after) / 2.0,
        raw_concurrency,
    };
    eprintln!(
        "{label}: {deliveries} deliveries in {seconds:.2} s = {:.0}/s (published in {publish_seconds:.2} s; received {received}; status writes {:.1}/s; herald CPU {:.2} cores, {:.0} µs/delivery); raw c={raw_concurrency} around it: {raw_before:.0} / {raw_after:.0} req/s",
        result.rate, result.status_writes_per_s, result.herald_cpu_share, result.herald_us_per_delivery
    );
    result
}

struct Latency {
    target_rate: f64,
    achieved_rate: f64,
    samples: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    status_writes_per_s: f64,
    publish_failures: u64,
    /// Publish call (durable acknowledgement) p50 / p99, ms.
    ack_p50: f64,
    ack_p99: f64,
    /// Cores herald used meanwhile.
    herald_cpu_share: f64,
}

/// Open-loop publishing of single-event calls at `rate` per second for `seconds`; the first
/// second is warm-up and not sampled.
async fn latency(
    cluster: &Cluster,
    heralds: &[Arc<Herald>],
    receiver: &Receiver,
    obj_type: &str,
    rate: f64,
    seconds: f64,
) -> Latency {
    let _ = receiver.latencies(u64::MAX).await;
    let total = (rate * seconds) as u64;
    let warm_ns = now_ns() + 1_000_000_000;
    let delivered =
        || async { futures::future::join_all(heralds.iter().map(|h| h.delivered())).await.into_iter().sum::<u64>() };
    let pids: Vec<u32> = heralds.iter().map(|h| h.pid()).collect();
    let (d0, w0) = (delivered().await, cluster.status_patches().await);
    let h0 = cpu_seconds_of(&pids);
    let failures = Arc::new(AtomicU64::new(0));
    let acks = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
        let herald = heralds[i as usize % heralds.len()].clone();
        let (failures, acks) = (failures.clone(), acks.clone());
        let obj_type = obj_type.to_string();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            if !herald.publish(vec![event(&obj_type, i, now_ns())]).await {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut acks) = acks.lock() {
                acks.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let sent_seconds = started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = task.await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered().await.saturating_sub(d0) < total - failures.load(Ordering::Relaxed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let herald_cpu_share = (cpu_seconds_of(&pids) - h0) / elapsed;
    let writes = cluster.status_patches().await - w0;
    let samples = receiver.latencies(warm_ns).await;
    let mut acks = acks.lock().map(|a| a.clone()).unwrap_or_default();
    acks.sort_by(f64::total_cmp);
    let result = Latency {
        target_rate: rate,
        achieved_rate: total as f64 / sent_seconds,
        samples: samples.len(),
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
        p999: percentile(&samples, 0.999),
        max: samples.last().copied().unwrap_or(f64::NAN),
        status_writes_per_s: writes / elapsed,
        publish_failures: failures.load(Ordering::Relaxed),
        ack_p50: percentile(&acks, 0.50),
        ack_p99: percentile(&acks, 0.99),
        herald_cpu_share,
    };
    eprintln!(
        "latency at {rate:.0}/s (achieved {:.0}/s): n={} p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms; publish ack p50 {:.2} p99 {:.2} ms; status writes {:.1}/s; herald {:.2} cores",
        result.achieved_rate,
        result.samples,
        result.p50,
        result.p99,
        result.p999,
        result.max,
        result.ack_p50,
        result.ack_p99,
        result.status_writes_per_s,
        result.herald_cpu_share
    );
    result
}

// ---------------------------------------------------------------------------------------
// Phase 6: REST

struct Rest {
    creates: usize,
    create_rate: f64,
    create_failures: usize,
    /// The API server's own create rate for the same objects at the same concurrency.
    apiserver_create_rate: f64,
    search: Search,
}

/// Concurrent REST calls in the REST measurements.
const REST_CONCURRENCY: usize = 8;

async fn rest(
    herald: &Arc<Herald>,
    cluster: &Cluster,
    namespace: &str,
    receiver: &Receiver,
    creates: usize,
    seconds: f64,
) -> Rest {
    let url = receiver.callback("rest");
    // The same objects straight to the API server first (no herald in the path), as the
    // limit herald's creates are compared with.
    let api = cluster.subscriptions(namespace);
    let specs = (0..creates).map(|i| (format!("direct-{i}"), "bnchdirectcreate".to_string(), url.clone())).collect();
    let started = Instant::now();
    let direct = create_subscriptions(&api, specs, REST_CONCURRENCY).await;
    let apiserver_create_rate = direct as f64 / started.elapsed().as_secs_f64();
    eprintln!("API server creates: {direct} at {apiserver_create_rate:.0}/s");

    let started = Instant::now();
    let results: Vec<bool> = futures::stream::iter(0..creates)
        .map(|i| {
            let (herald, url) = (herald.clone(), url.clone());
            async move {
                let body = serde_json::json!({
                    "subscription_name": format!("rest-{i}"), "system_name": "bench", "callback_url": url,
                    "confirm_mode": "httpstatus", "confirm_pattern": "200", "time_out": 10,
                    "subscription_form": "bnchrestcreate",
                });
                match herald.http.post(herald.url("/api/v3/event/subscribe/0/0")).json(&body).send().await {
                    Ok(response) => {
                        let answer: serde_json::Value = response.json().await.unwrap_or_default();
                        answer["result"] == true && answer["data"]["subscription_id"].is_i64()
                    }
                    Err(_) => false,
                }
            }
        })
        .buffer_unordered(REST_CONCURRENCY)
        .collect()
        .await;
    let create_seconds = started.elapsed().as_secs_f64();
    let ok = results.iter().filter(|r| **r).count();
    eprintln!("REST subscribe: {ok} of {creates} in {create_seconds:.2} s");
    Rest {
        creates,
        create_rate: ok as f64 / create_seconds,
        create_failures: creates - ok,
        apiserver_create_rate,
        search: search_rate(herald, seconds).await,
    }
}

struct Search {
    rate: f64,
    failures: u64,
    /// The `count` searches answered: the subscriptions searched over.
    visible: u64,
}

/// `POST …/subscribe/search` (limit 20, sorted by id) for `seconds`, 8 concurrent.
async fn search_rate(herald: &Arc<Herald>, seconds: f64) -> Search {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let visible = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let workers: Vec<_> = (0..REST_CONCURRENCY)
        .map(|_| {
            let (herald, done, failed, visible) = (herald.clone(), done.clone(), failed.clone(), visible.clone());
            tokio::spawn(async move {
                let body =
                    serde_json::json!({"condition": {}, "page": {"start": 0, "limit": 20, "sort": "subscription_id"}});
                while Instant::now() < until {
                    let answer: Option<serde_json::Value> = match herald
                        .http
                        .post(herald.url("/api/v3/event/subscribe/search/0/0"))
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(response) => response.json().await.ok(),
                        Err(_) => None,
                    };
                    match answer {
                        Some(answer) if answer["result"] == true => {
                            visible.store(answer["data"]["count"].as_u64().unwrap_or(0), Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let result = Search {
        rate: done.load(Ordering::Relaxed) as f64 / seconds,
        failures: failed.load(Ordering::Relaxed),
        visible: visible.load(Ordering::Relaxed),
    };
    eprintln!("REST search: {:.0}/s over {} subscriptions", result.rate, result.visible);
    result
}

// ---------------------------------------------------------------------------------------
// Phase 5: controller scale

struct Scale {
    engine: Engine,
    size: usize,
    create_seconds: f64,
    ready_seconds: f64,
    rss_mb: f64,
    herald_cpu_seconds: f64,
    /// kube-apiserver and etcd over the same span.
    control_plane_cpu_seconds: Option<f64>,
    status_writes: f64,
    /// REST search over all `size` subscriptions.
    search: Option<Search>,
    /// After SIGKILL: start → /readyz 200, and the `queued` count of a publish right then.
    restart_ready_seconds: f64,
    restart_queued: u64,
    /// The deliveries of that publish confirmed, and how long it took.
    restart_delivered: u64,
    restart_delivered_seconds: f64,
    /// The NATS servers' resident memory after the run, MB (JetStream only).
    nats_rss_mb: Option<f64>,
}

async fn scale(
    settings: &Settings,
    cluster: &Cluster,
    kubeconfig: &Path,
    receiver: &Receiver,
    (engine, size): (Engine, usize),
) -> Scale {
    let ns = cluster.namespace("bench-scale").await;
    let role = Role { config: engine.config(settings), ..Role::solo() };
    let mut herald = Herald::start(settings, kubeconfig, &ns, role).await;
    let api = cluster.subscriptions(&ns);
    let w0 = cluster.status_patches().await;
    let control_plane_cpu_before = control_plane_cpu_seconds();
    let within = Duration::from_secs(1800);
    let tracker = track_ready(api.clone(), size, within);
    let url = receiver.callback("scale");
    let specs = (0..size).map(|i| (format!("s{i:05}"), "bnchscalecreate".to_string(), url.clone())).collect();
    let started = Instant::now();
    let created = create_subscriptions(&api, specs, 64).await;
    let create_seconds = started.elapsed().as_secs_f64();
    let engine_name = engine.name();
    eprintln!("scale {size} ({engine_name}): {created} created in {create_seconds:.1} s");
    let ready_at = tracker.await.ok().flatten();
    let ready_seconds = ready_at.map(|t| t.duration_since(started).as_secs_f64()).unwrap_or(f64::NAN);
    let rss_mb = vm_hwm_mb(herald.pid());
    let herald_cpu_seconds = cpu_seconds(herald.pid());
    let control_plane_cpu_seconds =
        control_plane_cpu_seconds().zip(control_plane_cpu_before).map(|(after, before)| after - before);
    let status_writes = cluster.status_patches().await - w0;
    eprintln!(
        "scale {size} ({engine_name}): all Ready after {ready_seconds:.1} s; VmHWM {rss_mb:.0} MB; herald CPU {herald_cpu_seconds:.1} s"
    );
    let search = if settings.rest_seconds > 0.0 {
        let shared = Arc::new(herald);
        let search = search_rate(&shared, settings.rest_seconds).await;
        herald = Arc::into_inner(shared).expect("the search workers have ended");
        Some(search)
    } else {
        None
    };

    // A crash with every subscription Ready: the restarted herald must match all of them
    // from the moment it reports ready.
    herald.kill();
    let restarted = Instant::now();
    let mut herald = Herald::launch(settings, kubeconfig, &ns, herald.role.clone()).await;
    let restart_ready_seconds = restarted.elapsed().as_secs_f64();
    let before = herald.delivered().await;
    let answer = herald.publish_answer(vec![event("bnchscale", 0, now_ns())]).await;
    let restart_queued = answer.as_ref().and_then(|a| a["queued"].as_u64()).unwrap_or(0);
    let published = Instant::now();
    let mut restart_delivered = 0;
    while published.elapsed() < Duration::from_secs(120) {
        restart_delivered = herald.delivered().await.saturating_sub(before);
        if restart_delivered >= size as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restart_delivered_seconds = published.elapsed().as_secs_f64();
    eprintln!(
        "scale {size} ({engine_name}): restarted after SIGKILL, ready in {restart_ready_seconds:.1} s; a publish right then queued {restart_queued}, {restart_delivered} delivered in {restart_delivered_seconds:.1} s"
    );
    let nats_rss_mb = (engine == Engine::JetStream).then(|| vm_rss_mb(&nats_pids()));
    herald.stop();
    cluster.delete_namespace(&ns).await;
    Scale {
        engine,
        size,
        create_seconds,
        ready_seconds,
        rss_mb,
        herald_cpu_seconds,
        control_plane_cpu_seconds,
        status_writes,
        search,
        restart_ready_seconds,
        restart_queued,
        restart_delivered,
        restart_delivered_seconds,
        nats_rss_mb,
    }
}

// ---------------------------------------------------------------------------------------
// The run and the table

#[derive(Default)]
struct Report {
    raw: Option<Raw>,
    fsync: Option<(f64, f64, f64)>,
    setup: Option<(usize, f64)>,
    throughput: Vec<Throughput>,
    latency: Vec<Latency>,
    rest: Option<Rest>,
    delivery_rss_mb: Option<f64>,
    scale: Vec<Scale>,
    sources: Option<Sources>,
    engines: Vec<EngineRun>,
}

async fn run() {
    let settings = Settings::from_env();
    let machine = Machine::describe();
    eprintln!("machine: {} × {} | {:.1} GiB | load {}", machine.nproc, machine.cpu, machine.mem_gb, machine.load_start);
    let receiver = Receiver::start().await;
    let raw = RawClient::new(&receiver);
    let mut report = Report::default();

    if settings.phase("raw") {
        report.raw = Some(raw_limit(&settings, &raw, &receiver).await);
    }
    let needs_cluster = ["delivery", "scale", "sources", "engines"].iter().any(|phase| settings.phase(phase));
    if needs_cluster {
        let kubeconfig = settings
            .kubeconfig
            .clone()
            .expect("HERALD_BENCH_KUBECONFIG is required for the delivery and scale phases (benches/run.sh sets it)");
        let cluster = Cluster::connect(&kubeconfig).await;
        if settings.phase("delivery") {
            report.fsync = Some(fsync_probe(&settings.work_dir.join("herald-bench-fsync"), 2.0));
            delivery(&settings, &cluster, &kubeconfig, &receiver, &raw, &mut report).await;
        }
        if settings.phase("scale") {
            for &engine in &settings.scale_engines {
                for &size in &settings.scale {
                    report.scale.push(scale(&settings, &cluster, &kubeconfig, &receiver, (engine, size)).await);
                }
            }
        }
        if settings.phase("sources") {
            report.sources = Some(sources(&settings, &cluster, &kubeconfig, &receiver).await);
        }
        if settings.phase("engines") {
            let best = report.raw.as_ref().map(|r| r.best().concurrency).unwrap_or(16);
            for &setup in &settings.engine_setups {
                let run = engine_run(&settings, &cluster, &kubeconfig, &receiver, (&raw, best), setup).await;
                report.engines.push(run);
            }
        }
    }
    print_table(&settings, &machine, &report);
}

async fn delivery(
    settings: &Settings,
    cluster: &Cluster,
    kubeconfig: &Path,
    receiver: &Receiver,
    raw: &RawClient,
    report: &mut Report,
) {
    // Each run is compared with the raw limit measured right around it: serial for the
    // ordered subscription, the sweep's best concurrency for fan-out.
    let best = report.raw.as_ref().map(|r| r.best().concurrency).unwrap_or(16);
    let adjacent = settings.adjacent_seconds;
    let ns = cluster.namespace("bench-delivery").await;
    let herald = Arc::new(Herald::start(settings, kubeconfig, &ns, Role::solo()).await);
    let api = cluster.subscriptions(&ns);
    let mut specs = vec![("ord-0".to_string(), "bnchordcreate".to_string(), receiver.callback("ord-0"))];
    for (g, &n) in settings.fanout.iter().enumerate() {
        for i in 0..n {
            let name = format!("fan{g}-{i}");
            specs.push((name.clone(), format!("bnchfan{g}create"), receiver.callback(&name)));
        }
    }
    let total = specs.len();
    let tracker = track_ready(api.clone(), total, Duration::from_secs(1800));
    let started = Instant::now();
    create_subscriptions(&api, specs, 64).await;
    let ready = tracker.await.ok().flatten().map(|t| t.duration_since(started).as_secs_f64()).unwrap_or(f64::NAN);
    eprintln!("delivery setup: {total} subscriptions Ready after {ready:.1} s");
    report.setup = Some((total, ready));
    // Let the controller's and the projector's writes of the set-up settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    hook("HERALD_BENCH_HOOK_START", herald.pid());
    if settings.ordered_events > 0 {
        report.throughput.push(
            throughput(
                cluster,
                &[&herald],
                receiver,
                (raw, 1, adjacent),
                "ordered",
                "bnchord",
                1,
                settings.ordered_events,
            )
            .await,
        );
    }
    for (g, &n) in settings.fanout.iter().enumerate() {
        let events = (settings.fanout_deliveries / n).max(1);
        let label = format!("fan-out {n}");
        report.throughput.push(
            throughput(cluster, &[&herald], receiver, (raw, best, adjacent), &label, &format!("bnchfan{g}"), n, events)
                .await,
        );
    }
    hook("HERALD_BENCH_HOOK_STOP", herald.pid());
    let ordered_max = report.throughput.iter().find(|t| t.label == "ordered").map(|t| t.rate);
    for rate in &settings.latency_rates {
        let rate = match (rate.as_str(), ordered_max) {
            ("half", Some(max)) => (max / 2.0).floor(),
            ("half", None) => continue,
            (number, _) => match number.parse() {
                Ok(rate) => rate,
                Err(_) => continue,
            },
        };
        let heralds = std::slice::from_ref(&herald);
        report.latency.push(latency(cluster, heralds, receiver, "bnchord", rate, settings.latency_seconds).await);
    }
    if settings.rest_creates > 0 {
        report.rest = Some(rest(&herald, cluster, &ns, receiver, settings.rest_creates, settings.rest_seconds).await);
    }
    report.delivery_rss_mb = Some(vm_hwm_mb(herald.pid()));
    drop(herald);
    cluster.delete_namespace(&ns).await;
}

// ---------------------------------------------------------------------------------------
// Phase 7: the store engines side by side

struct EngineRun {
    label: String,
    replicas: usize,
    ordered: Throughput,
    fanout: Throughput,
    /// Open-loop latency to the ordered subscription, alone and beside a subscription to the
    /// same events whose callback never answers.
    latency_alone: Latency,
    latency_beside_hung: Latency,
    /// Peak RSS of the largest herald, and the NATS servers' resident memory after the runs.
    herald_rss_mb: f64,
    nats_rss_mb: f64,
}

/// Events per second of the engines phase's latency runs: well under every engine's ordered
/// rate, so the figure is the path's latency, not a queue's.
const ENGINE_LATENCY_RATE: f64 = 100.0;

/// Waits until the `count` delivery shards' Leases of `namespace` are held and spread over
/// `replicas` holders, at most their fair share each (docs/engines.md "Replicas").
async fn wait_shards_spread(cluster: &Cluster, namespace: &str, replicas: usize, count: usize) {
    use k8s_openapi::api::coordination::v1::Lease;
    let api: Api<Lease> = Api::namespaced(cluster.client.clone(), namespace);
    let share = count.div_ceil(replicas);
    let started = Instant::now();
    loop {
        let leases = api.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        let mut holders: std::collections::HashMap<String, usize> = Default::default();
        for lease in leases.iter().filter(|l| l.metadata.name.as_deref().is_some_and(|n| n.contains("-shard-"))) {
            if let Some(holder) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) {
                *holders.entry(holder).or_default() += 1;
            }
        }
        let held: usize = holders.values().sum();
        if held == count && holders.len() == replicas && holders.values().all(|n| *n <= share) {
            eprintln!("shards: {count} spread over {replicas} replicas after {:.1} s", started.elapsed().as_secs_f64());
            return;
        }
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!("shards: not spread after 120 s ({holders:?}); measuring anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The ordered and fan-out runs of the delivery phase on one engine setup: `replicas`
/// heralds on one store (JetStream), publishes spread over them.
async fn engine_run(
    settings: &Settings,
    cluster: &Cluster,
    kubeconfig: &Path,
    receiver: &Receiver,
    raw: (&RawClient, usize),
    (engine, replicas): (Engine, usize),
) -> EngineRun {
    let label = if replicas == 1 {
        format!("{}, 1 herald", engine.name())
    } else {
        format!("{}, {replicas} herald replicas", engine.name())
    };
    eprintln!("engines: {label}");
    let ns = cluster.namespace("bench-engines").await;
    let config = engine.config(settings);
    let mut heralds = Vec::new();
    for n in 0..replicas {
        let role = Role { instance: format!("herald-bench-{n}"), config: config.clone() };
        heralds.push(Herald::start(settings, kubeconfig, &ns, role).await);
    }
    let api = cluster.subscriptions(&ns);
    let fanout = settings.engine_fanout.max(2);
    let mut specs = vec![("ord".to_string(), "bnchengordcreate".to_string(), receiver.callback("eng-ord"))];
    specs.extend((0..fanout).map(|i| {
        let name = format!("fan-{i}");
        (name.clone(), "bnchengfancreate".to_string(), receiver.callback(&format!("eng-{name}")))
    }));
    let tracker = track_ready(api.clone(), specs.len(), Duration::from_secs(600));
    create_subscriptions(&api, specs, 32).await;
    let _ = tracker.await;
    if replicas > 1 {
        let shards = herald::config::Config::default().leader_election.shards as usize;
        wait_shards_spread(cluster, &ns, replicas, shards).await;
    }
    // Let the set-up's status writes settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refs: Vec<&Herald> = heralds.iter().collect();
    let (raw, best) = raw;
    let adjacent = settings.adjacent_seconds;
    let ordered_events = settings.engine_ordered_events.max(1);
    let ordered = throughput(
        cluster,
        &refs,
        receiver,
        (raw, 1, adjacent),
        &format!("{label}: ordered"),
        "bnchengord",
        1,
        ordered_events,
    )
    .await;
    let events = (settings.engine_fanout_deliveries / fanout).max(1);
    let fanout = throughput(
        cluster,
        &refs,
        receiver,
        (raw, best, adjacent),
        &format!("{label}: fan-out {fanout}"),
        "bnchengfan",
        fanout,
        events,
    )
    .await;
    let heralds: Vec<Arc<Herald>> = heralds.into_iter().map(Arc::new).collect();
    let (rate, seconds) = (ENGINE_LATENCY_RATE, settings.latency_seconds.min(5.0));
    let latency_alone = latency(cluster, &heralds, receiver, "bnchengord", rate, seconds).await;
    let hung: EventSubscription = serde_json::from_value(serde_json::json!({
        "apiVersion": "herald.dev/v1alpha1", "kind": "EventSubscription", "metadata": {"name": "hung"},
        "spec": {"subscriptionName": "hung", "callbackUrl": receiver.url("/hang/hung"),
                 "events": ["bnchengordcreate"], "timeoutSeconds": 60},
    }))
    .expect("subscription");
    // Every subscription so far (the ordered one and the fan-out group) and this one.
    let tracker = track_ready(api.clone(), settings.engine_fanout.max(2) + 2, Duration::from_secs(120));
    api.create(&PostParams::default(), &hung).await.expect("create the hanging subscription");
    let _ = tracker.await;
    let latency_beside_hung = latency(cluster, &heralds, receiver, "bnchengord", rate, seconds).await;
    let herald_rss_mb = heralds.iter().map(|h| vm_hwm_mb(h.pid())).fold(0.0, f64::max);
    let nats_rss_mb = vm_rss_mb(&nats_pids());
    drop(heralds);
    cluster.delete_namespace(&ns).await;
    EngineRun { label, replicas, ordered, fanout, latency_alone, latency_beside_hung, herald_rss_mb, nats_rss_mb }
}

// ---------------------------------------------------------------------------------------
// Phase 6: event sources

struct SourceRun {
    subscriptions: usize,
    events: usize,
    seconds: f64,
    events_per_s: f64,
}

struct Sources {
    /// The emulator's own answer rate: events/s a plain client reads page by page.
    emulator_rate: f64,
    runs: Vec<SourceRun>,
}

/// Emits `count` creates of `resource`, 5,000 per control call.
async fn fill(emulator: &Emulator, resource: &str, id_field: &str, count: usize) {
    for start in (0..count).step_by(5000) {
        let events: Vec<(&str, serde_json::Value)> = (start..(start + 5000).min(count))
            .map(|i| ("create", serde_json::json!({id_field: i + 1, "bk_supplier_account": "0"})))
            .collect();
        emulator.emit(resource, &events).await;
    }
}

/// Reads the whole `resource` chain as a plain client would (start time, then cursors,
/// until a page is not full): events per second.
async fn read_rate(emulator: &Emulator, resource: &str, fields: &[&str]) -> f64 {
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let url = format!("{}/api/v3/event/watch/resource/{resource}", emulator.url());
    let start_from = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 3600;
    let mut body = serde_json::json!({"bk_start_from": start_from, "bk_fields": fields});
    let (mut events, started) = (0usize, Instant::now());
    loop {
        let answer: serde_json::Value = http
            .post(&url)
            .header("BK_User", "bench")
            .header("HTTP_BK_SUPPLIER_ACCOUNT", "0")
            .json(&body)
            .send()
            .await
            .expect("watch")
            .json()
            .await
            .expect("watch JSON");
        let page = answer["data"]["bk_events"].as_array().cloned().unwrap_or_default();
        events += page.len();
        let cursor = page.last().and_then(|e| e["bk_cursor"].as_str()).unwrap_or_default().to_string();
        if page.len() < 200 || cursor.is_empty() {
            break;
        }
        body = serde_json::json!({"bk_cursor": cursor, "bk_fields": fields});
    }
    events as f64 / started.elapsed().as_secs_f64()
}

async fn sources(settings: &Settings, cluster: &Cluster, kubeconfig: &Path, receiver: &Receiver) -> Sources {
    let ns = cluster.namespace("bench-sources").await;
    let dir = settings.work_dir.join("herald-bench-emulator");
    let _ = std::fs::remove_dir_all(&dir);
    let emulator = Emulator::start(&dir, &[]).await;
    let events = settings.source_events;
    // Module changes nobody subscribes to (herald reads and commits them only); host creates
    // to one subscription; set creates to 100, a tenth as many events.
    let fanout = 100;
    let set_events = (events / 10).max(1);
    fill(&emulator, "module", "bk_module_id", events).await;
    fill(&emulator, "host", "bk_host_id", events).await;
    fill(&emulator, "set", "bk_set_id", set_events).await;
    let emulator_rate = read_rate(&emulator, "host", &["bk_host_id", "bk_supplier_account"]).await;
    eprintln!("sources: the emulator answers {emulator_rate:.0} events/s to a plain client");
    let herald = Herald::start(settings, kubeconfig, &ns, Role::solo()).await;
    let api = cluster.subscriptions(&ns);
    let mut specs = vec![("src-one".to_string(), "hostcreate".to_string(), receiver.callback("src-one"))];
    specs.extend(
        (0..fanout)
            .map(|i| (format!("src-fan-{i}"), "setcreate".to_string(), receiver.callback(&format!("src-fan-{i}")))),
    );
    let tracker = track_ready(api.clone(), specs.len(), Duration::from_secs(600));
    create_subscriptions(&api, specs, 32).await;
    let _ = tracker.await;
    let sources_api: Api<herald::crd::CmdbSource> = Api::namespaced(cluster.client.clone(), &ns);
    let start_time = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let mut runs = Vec::new();
    for (resource, subscriptions, count) in
        [("module", 0, events), ("host", 1usize, events), ("set", fanout, set_events)]
    {
        let before = receiver.count().await;
        let source: herald::crd::CmdbSource = serde_json::from_value(serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1", "kind": "CmdbSource", "metadata": {"name": resource},
            "spec": {"url": emulator.url(), "api": "direct", "supplierAccount": "0",
                     "start": {"from": "time", "time": start_time.to_string()},
                     "resources": [{"resource": resource}]},
        }))
        .expect("a CmdbSource");
        let started = Instant::now();
        sources_api.create(&PostParams::default(), &source).await.expect("create source");
        let want = (count * subscriptions) as u64;
        let done = || async {
            if subscriptions == 0 {
                herald.source_events_read().await >= count as u64
            } else {
                receiver.count().await - before >= want
            }
        };
        while !done().await {
            assert!(started.elapsed() < Duration::from_secs(900), "sources: {resource} deliveries did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("sources: {count} {resource} events to {subscriptions} subscriptions in {seconds:.1} s");
        runs.push(SourceRun { subscriptions, events: count, seconds, events_per_s: count as f64 / seconds });
    }
    drop(herald);
    cluster.delete_namespace(&ns).await;
    Sources { emulator_rate, runs }
}

/// Runs the shell command in `variable` (if set) with HERALD_PID set, for example
/// `callgrind_control -i on $HERALD_PID` around the throughput phases when profiling.
fn hook(variable: &str, pid: u32) {
    if let Ok(command) = std::env::var(variable) {
        let status = Command::new("sh").args(["-c", &command]).env("HERALD_PID", pid.to_string()).status();
        eprintln!("{variable}: {command} → {status:?}");
    }
}

/// The REST search row; `judged` when it is the run the ≥ 1,000 req/s target is for.
fn search_row(row: &mut impl FnMut(String, String, String, String), search: &Search, judged: bool) {
    row(
        format!("REST search (POST …/subscribe/search/0/0) over {} subscriptions", search.visible),
        format!("{:.0} req/s", search.rate),
        if judged { format!("≥ 1000 req/s: {}", verdict(search.rate >= 1000.0)) } else { String::new() },
        format!("{REST_CONCURRENCY} concurrent, limit 20, sorted by id, {} failed", search.failures),
    );
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn print_table(settings: &Settings, machine: &Machine, report: &Report) {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |a: String, b: String, c: String, d: String| rows.push([a, b, c, d]);
    let raw_serial = report.raw.as_ref().map(|r| r.serial().rate);
    let raw_best = report.raw.as_ref().map(|r| r.best().rate);
    if let Some(raw) = &report.raw {
        let sweep = raw.points.iter().map(|p| format!("{}:{:.0}", p.concurrency, p.rate)).collect::<Vec<_>>().join(" ");
        let errors: u64 = raw.points.iter().map(|p| p.errors).sum();
        row(
            "raw: serial (1 at a time)".into(),
            format!("{:.0} req/s", raw.serial().rate),
            "1.00 (reference for ordered)".into(),
            format!("client CPU {:.1} µs/req", raw.serial().client_us),
        );
        row(
            format!("raw: best of sweep (c={})", raw.best().concurrency),
            format!("{:.0} req/s", raw.best().rate),
            "1.00 (reference for fan-out)".into(),
            format!(
                "sweep {sweep}; errors {errors}; body {} B; client CPU {:.1} µs/req",
                raw.body_bytes,
                raw.best().client_us
            ),
        );
        let capacity = 1e6 / raw.receiver_us_per_request * machine.nproc as f64;
        row(
            "callback server CPU per request".into(),
            format!("{:.1} µs", raw.receiver_us_per_request),
            String::new(),
            format!("⇒ capacity ≈ {capacity:.0} req/s on {} cores if it had them all", machine.nproc),
        );
    }
    if let Some((fsync_rate, p50, p99)) = report.fsync {
        row(
            "disk: 4 KiB write + fdatasync".into(),
            format!("{fsync_rate:.0} /s"),
            String::new(),
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms (store's file system)"),
        );
    }
    if let Some((n, seconds)) = report.setup {
        row(
            format!("set-up: {n} subscriptions created → Ready"),
            format!("{seconds:.1} s"),
            String::new(),
            String::new(),
        );
    }
    for t in &report.throughput {
        let (reference, target, name) =
            if t.subscriptions == 1 { (raw_serial, 0.60, "serial raw") } else { (raw_best, 0.70, "best raw") };
        let ratio = reference.map(|r| t.rate / r).unwrap_or(f64::NAN);
        let adjacent = t.rate / t.raw_adjacent;
        row(
            format!(
                "herald {}: publish → confirmed",
                if t.subscriptions == 1 {
                    "ordered, 1 sub, maxInFlight 1".to_string()
                } else {
                    format!("fan-out, {} subs", t.subscriptions)
                }
            ),
            format!("{:.0} deliveries/s", t.rate),
            format!(
                "{adjacent:.2} of {name} measured around it ({:.0} req/s, c={}); {ratio:.2} of the sweep's (target ≥ {target:.2}: {})",
                t.raw_adjacent,
                t.raw_concurrency,
                verdict(adjacent >= target)
            ),
            format!(
                "{} deliveries in {:.1} s (published in {:.1} s); herald {:.2} cores = {:.0} µs CPU/delivery; receiver {:.2} cores ({:.0} µs/req); status writes {:.1}/s",
                t.deliveries,
                t.seconds,
                t.publish_seconds,
                t.herald_cpu_share,
                t.herald_us_per_delivery,
                t.receiver_cpu_share,
                t.receiver_us_per_request,
                t.status_writes_per_s
            ),
        );
    }
    if let (Some(raw), Some(fan)) =
        (&report.raw, report.throughput.iter().filter(|t| t.subscriptions > 1).max_by(|a, b| a.rate.total_cmp(&b.rate)))
    {
        let capacity = 1e6 / raw.receiver_us_per_request * machine.nproc as f64;
        row(
            "callback server headroom".into(),
            format!("{:.1}× (CPU capacity) / {:.1}× (measured max)", capacity / fan.rate, raw.best().rate / fan.rate),
            format!("of herald's best {:.0}/s (≥ 3×: {})", fan.rate, verdict(capacity / fan.rate >= 3.0)),
            format!("receiver busy {:.0}% of one core during that run", fan.receiver_cpu_share * 100.0),
        );
    }
    for l in &report.latency {
        row(
            format!("latency publish → callback at {:.0} ev/s", l.target_rate),
            format!("p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms", l.p50, l.p99, l.p999),
            if (l.target_rate - 1000.0).abs() < 1.0 {
                format!("p99 ≤ 5 ms: {}", verdict(l.p99 <= 5.0))
            } else {
                String::new()
            },
            format!(
                "n={}, achieved {:.0} ev/s (one event per publish call), max {:.1} ms; publish acknowledged (durable) p50 {:.2} / p99 {:.2} ms, {} failed; herald {:.2} cores; status writes {:.1}/s",
                l.samples,
                l.achieved_rate,
                l.max,
                l.ack_p50,
                l.ack_p99,
                l.publish_failures,
                l.herald_cpu_share,
                l.status_writes_per_s
            ),
        );
    }
    let writes: Vec<(f64, f64)> = report
        .throughput
        .iter()
        .map(|t| (t.rate, t.status_writes_per_s))
        .chain(report.latency.iter().map(|l| (l.achieved_rate, l.status_writes_per_s)))
        .collect();
    if !writes.is_empty() {
        let max = writes.iter().map(|w| w.1).fold(0.0, f64::max);
        let detail =
            writes.iter().map(|(rate, w)| format!("{w:.1}/s at {rate:.0} deliveries/s")).collect::<Vec<_>>().join("; ");
        row(
            "API-server status PATCHes (apiserver_request_total)".into(),
            format!("≤ {max:.1} /s"),
            format!("budget 20/s: {}", verdict(max <= 20.0 * 1.1)),
            detail,
        );
    }
    if let Some(r) = &report.rest {
        row(
            "REST subscribe (POST /api/v3/event/subscribe/0/0)".into(),
            format!("{:.1} req/s", r.create_rate),
            format!(
                "{:.2} of the API server's own create rate ({:.0}/s); ≥ 500/s: {}",
                r.create_rate / r.apiserver_create_rate,
                r.apiserver_create_rate,
                verdict(r.create_rate >= 500.0)
            ),
            format!(
                "{} creates, {REST_CONCURRENCY} concurrent, distinct names, {} failed",
                r.creates, r.create_failures
            ),
        );
        search_row(&mut row, &r.search, false);
    }
    if let Some(rss) = report.delivery_rss_mb {
        row(
            "herald peak RSS after the delivery phases".into(),
            format!("{rss:.0} MB"),
            format!("≤ 256 MB: {}", verdict(rss <= 256.0)),
            String::new(),
        );
    }
    if let Some(sources) = &report.sources {
        row(
            "watch emulator: a plain client reading pages".into(),
            format!("{:.0} events/s", sources.emulator_rate),
            "1.00 (reference for sources)".into(),
            "tests/cmdb_emulator (Python), 200 events per page, one connection".into(),
        );
        for run in &sources.runs {
            let what = match run.subscriptions {
                0 => "herald source, no subscription: watch event → committed".to_string(),
                n => format!("herald source → {n} subscription(s): watch event → confirmed"),
            };
            row(
                what,
                format!("{:.0} events/s", run.events_per_s),
                format!("{:.2}", run.events_per_s / sources.emulator_rate),
                format!(
                    "{} events, {} deliveries ({:.0}/s), in {:.1} s from the CmdbSource's creation",
                    run.events,
                    run.events * run.subscriptions,
                    (run.events * run.subscriptions) as f64 / run.seconds,
                    run.seconds
                ),
            );
        }
    }
    let sqlite_fanout = report.engines.iter().find(|e| e.label.starts_with("SQLite")).map(|e| e.fanout.rate);
    for e in &report.engines {
        for (t, what) in [
            (&e.ordered, "ordered, 1 sub, maxInFlight 1".to_string()),
            (&e.fanout, format!("fan-out, {} subs", e.fanout.subscriptions)),
        ] {
            row(
                format!("engines: {}: {what}", e.label),
                format!("{:.0} deliveries/s", t.rate),
                format!(
                    "{:.3} of raw c={} measured around it ({:.0} req/s)",
                    t.rate / t.raw_adjacent,
                    t.raw_concurrency,
                    t.raw_adjacent
                ),
                format!(
                    "{} deliveries in {:.1} s (published in {:.1} s); herald {:.2} cores ({:.0} µs CPU/delivery), NATS servers {:.2} cores, receiver {:.2} cores",
                    t.deliveries,
                    t.seconds,
                    t.publish_seconds,
                    t.herald_cpu_share,
                    t.herald_us_per_delivery,
                    t.nats_cpu_share,
                    t.receiver_cpu_share
                ),
            );
        }
        for (l, beside) in
            [(&e.latency_alone, "alone"), (&e.latency_beside_hung, "beside a subscription whose callback hangs")]
        {
            row(
                format!("engines: {}: latency publish → callback at {:.0} ev/s, {beside}", e.label, l.target_rate),
                format!("p50 {:.1} / p99 {:.1} / max {:.1} ms", l.p50, l.p99, l.max),
                if std::ptr::eq(l, &e.latency_beside_hung) {
                    format!("p99 {:.2}× alone", l.p99 / e.latency_alone.p99)
                } else {
                    String::new()
                },
                format!(
                    "n={}; publish acknowledged p50 {:.1} / p99 {:.1} ms; {} failed",
                    l.samples, l.ack_p50, l.ack_p99, l.publish_failures
                ),
            );
        }
        let busy = e.fanout.herald_cpu_share + e.fanout.nats_cpu_share + e.fanout.receiver_cpu_share;
        row(
            format!("engines: {}: what bounds it", e.label),
            format!("{busy:.2} of {} cores busy in fan-out", machine.nproc),
            sqlite_fanout.map(|s| format!("fan-out {:.2}× SQLite's", e.fanout.rate / s)).unwrap_or_default(),
            format!(
                "herald {:.2} + NATS {:.2} + receiver {:.2} cores (the control plane and this bench take the rest); herald peak RSS {:.0} MB{}; NATS servers RSS {:.0} MB",
                e.fanout.herald_cpu_share,
                e.fanout.nats_cpu_share,
                e.fanout.receiver_cpu_share,
                e.herald_rss_mb,
                if e.replicas > 1 { " (largest replica)" } else { "" },
                e.nats_rss_mb
            ),
        );
    }
    for s in &report.scale {
        let engine = s.engine.name();
        if let Some(nats) = s.nats_rss_mb {
            row(
                format!("controller ({engine}): NATS servers' RSS after {} subscriptions", s.size),
                format!("{nats:.0} MB"),
                String::new(),
                "three nats-server processes (R3 streams), summed".into(),
            );
        }
        row(
            format!("controller ({engine}): {} subscriptions created → all Ready", s.size),
            format!("{:.1} s", s.ready_seconds),
            if s.size >= 10_000 { format!("≤ 60 s: {}", verdict(s.ready_seconds <= 60.0)) } else { String::new() },
            format!(
                "creates took {:.1} s; herald CPU {:.0} s; kube-apiserver + etcd CPU {}; status PATCHes {:.0}",
                s.create_seconds,
                s.herald_cpu_seconds,
                s.control_plane_cpu_seconds.map(|c| format!("{c:.0} s")).unwrap_or_else(|| "not known".into()),
                s.status_writes
            ),
        );
        row(
            format!("controller ({engine}): herald peak RSS at {}", s.size),
            format!("{:.0} MB", s.rss_mb),
            format!("≤ 256 MB: {}", verdict(s.rss_mb <= 256.0)),
            String::new(),
        );
        if let Some(search) = &s.search {
            search_row(&mut row, search, s.size >= 10_000);
        }
        row(
            format!("restart ({engine}, SIGKILL) with {} subscriptions → ready and matching all", s.size),
            format!("{:.1} s", s.restart_ready_seconds),
            if s.size >= 10_000 {
                format!("≤ 15 s: {}", verdict(s.restart_ready_seconds <= 15.0 && s.restart_queued == s.size as u64))
            } else {
                String::new()
            },
            format!(
                "a publish right after /readyz turned 200 queued {} of {}; {} delivered in {:.1} s",
                s.restart_queued, s.size, s.restart_delivered, s.restart_delivered_seconds
            ),
        );
    }

    println!();
    println!(
        "machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}; load average {} at start, {} at end (shared machine)",
        machine.nproc,
        machine.cpu,
        machine.mem_gb,
        machine.kernel,
        machine.load_start,
        loadavg()
    );
    println!("phases: {}", {
        let mut p: Vec<_> = settings.phases.iter().cloned().collect();
        p.sort();
        p.join(",")
    });
    println!();
    println!("| measure | value | ratio / target | notes |");
    println!("|---|---|---|---|");
    for [a, b, c, d] in rows {
        println!("| {a} | {b} | {c} | {d} |");
    }
}
