//! Shared by the fault modules: suite size, seeds and small helpers; a raw-TCP callback receiver for the faults an HTTP framework will not produce.

use super::*;

pub(crate) fn full_suite() -> bool {
    std::env::var("HERALD_FULL_FAULTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

pub(crate) fn scaled(fast: usize, full: usize) -> usize {
    if full_suite() { full } else { fast }
}

pub(crate) fn seed() -> u64 {
    std::env::var("HERALD_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_260_707)
}

pub(crate) fn host_event(seq: i64) -> Value {
    json!({
        "event_type": "instdata", "action": "create", "obj_type": "host",
        "data": [{"cur_data": {"bk_host_id": seq}, "pre_data": null}],
        "bk_supplier_account": "0",
    })
}

pub(crate) fn host_events(seqs: impl IntoIterator<Item = i64>) -> Value {
    Value::Array(seqs.into_iter().map(host_event).collect())
}

/// The producer's sequence number carried in an event or callback body.
pub(crate) fn host_id(body: &Value) -> i64 {
    body["data"][0]["cur_data"]["bk_host_id"].as_i64().unwrap_or(-1)
}

/// One HTTP answer: status, JSON body (Null when not JSON), raw text and Retry-After.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) text: String,
    pub(crate) retry_after: Option<String>,
}

pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Answer { status, body, text, retry_after })
}

pub(crate) async fn publish(herald: &Herald, events: &Value) -> Answer {
    send(reqwest::Client::new().post(herald.url("/api/v3/event/publish")).json(events)).await.expect("publish request")
}

pub(crate) async fn publish_ok(herald: &Herald, events: &Value) {
    let answer = publish(herald, events).await;
    assert!(answer.status == 200 && answer.body["result"] == true, "publish: {answer:?}");
}

/// Creates a subscription to `hostcreate` in `api`'s namespace with `extra` spec fields
/// and waits until it is Ready; returns its id.
pub(crate) async fn subscribe(api: &Api<EventSubscription>, name: &str, url: &str, extra: Value) -> i64 {
    let mut spec = json!({ "subscriptionName": name, "callbackUrl": url, "events": ["hostcreate"] });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    api.create(&PostParams::default(), &subscription(name, spec)).await.expect("create subscription");
    id(&wait_ready(api, name).await).expect("id")
}

pub(crate) async fn patch_spec(api: &Api<EventSubscription>, name: &str, spec: Value) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec }))).await.expect("patch spec");
}

pub(crate) fn stats(sub: &EventSubscription) -> Statistics {
    sub.status.as_ref().and_then(|s| s.statistics.clone()).unwrap_or_default()
}

pub(crate) async fn wait_stats(
    api: &Api<EventSubscription>,
    name: &str,
    within: Duration,
    what: &str,
    condition: impl Fn(&Statistics) -> bool,
) -> Statistics {
    stats(&wait_for(api, name, within, what, move |s| condition(&stats(s))).await)
}

/// Whether `pid` is a live (not zombie) process.
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The store's size on disk: database plus WAL (what the quota measures).
pub(crate) fn store_bytes(store: &Path) -> u64 {
    ["herald.db", "herald.db-wal"].iter().map(|f| std::fs::metadata(store.join(f)).map(|m| m.len()).unwrap_or(0)).sum()
}

pub(crate) fn test_dir(ns: &str, what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{ns}-{what}"))
}

/// Producer sequence numbers in a subscription's dead letters (through the REST API).
pub(crate) async fn dead_lettered(herald: &Herald, id: i64) -> HashSet<i64> {
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
pub(crate) struct Producer {
    pub(crate) target: Arc<Mutex<String>>,
    pub(crate) hold: Arc<AtomicBool>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) task: tokio::task::JoinHandle<Vec<i64>>,
}

impl Producer {
    pub(crate) fn start(url: String, first: i64, batch: i64, pause: Duration) -> Producer {
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

    pub(crate) fn retarget(&self, url: String) {
        *self.target.lock().unwrap() = url;
    }

    pub(crate) async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("producer")
    }
}

/// Waits until `pending()` returns an empty set (what is still missing), failing after `within`.
pub(crate) async fn wait_until_none_missing<F, Fut>(what: &str, within: Duration, mut missing: F)
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

/// One request a [`FaultServer`] read.
#[derive(Clone, Debug)]
pub(crate) struct Hit {
    pub(crate) key: String,
    pub(crate) body: Value,
    pub(crate) at: Instant,
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
pub(crate) struct FaultServer {
    pub(crate) port: u16,
    pub(crate) hits: Arc<Mutex<Vec<Hit>>>,
}

impl FaultServer {
    pub(crate) async fn start() -> FaultServer {
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

    pub(crate) fn url(&self, behaviour: &str, key: &str) -> String {
        format!("http://127.0.0.1:{}/{behaviour}/{key}", self.port)
    }

    pub(crate) fn hits(&self, key: &str) -> Vec<Hit> {
        self.hits.lock().unwrap().iter().filter(|h| h.key == key).cloned().collect()
    }
}

pub(crate) async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
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

pub(crate) fn http_answer(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra_headers}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

pub(crate) async fn serve_fault(
    mut stream: tokio::net::TcpStream,
    (port, v6_port): (u16, u16),
    hits: Arc<Mutex<Vec<Hit>>>,
) {
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
pub(crate) async fn untrusted_tls_server(dir: &Path) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
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
pub(crate) fn duplicates_per_epoch(receipts: &[(Instant, i64)], kills: &[Instant]) -> Vec<usize> {
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
pub(crate) const COMMIT_BATCH: usize = 64;

/// The documented operations: (method, path template) from docs/openapi.json.
pub(crate) fn documented_routes() -> Vec<(String, String)> {
    let document: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).expect("docs/openapi.json");
    let mut routes = Vec::new();
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for method in operations.as_object().expect("operations").keys() {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    routes
}

pub(crate) const OPEN_ROUTES: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];

pub(crate) fn is_esb(path: &str) -> bool {
    path.starts_with("/api/c/compapi/")
}

pub(crate) fn fill_path(template: &str, subscription_id: &str) -> String {
    template
        .replace("{version}", "v3")
        .replace("{bk_supplier_account}", "0")
        .replace("{bk_biz_id}", "0")
        .replace("{subscription_id}", subscription_id)
}

/// A body the route would accept, so that only credentials decide the answer.
pub(crate) fn valid_body(template: &str, subscription_id: i64, callback: &str) -> Value {
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

pub(crate) fn code(body: &Value) -> i64 {
    body["bk_error_code"].as_i64().or_else(|| body["code"].as_i64()).unwrap_or(-1)
}

/// The loopback URL every generated body uses: port 9 (discard) is closed here, so a
/// ping, telnet or delivery fails at once and nothing leaves the machine.
pub(crate) const SAFE_CALLBACK: &str = "http://127.0.0.1:9/cb";
