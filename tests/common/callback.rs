//! A real HTTP callback server on 127.0.0.1 that records every request and answers as
//! its path says, so tests can script receivers: `/{behaviour}/{key}` where behaviour is
//! `ok` (200), `status-N` (N), `body-ok` (500 with `{"result": true}`), `body-no` (200 with
//! `{"result": false}`), `fail-N` (500 for the first N requests of that key, then 200),
//! `hang` (never answers), `slow-MS` (answers 200 after MS milliseconds), `gone` (410),
//! `throttle-S` (first request 429 with Retry-After S, then 200), `big-MB` (200 with MB
//! megabytes of body).

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Received {
    pub behaviour: String,
    pub key: String,
    pub headers: HashMap<String, String>,
    pub body: serde_json::Value,
    pub at: Instant,
}

impl Received {
    pub fn distribution_id(&self) -> i64 {
        self.body["distribution_id"].as_i64().unwrap_or(-1)
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_default()
    }
}

#[derive(Default)]
struct Log {
    received: Vec<Received>,
    counts: HashMap<String, u64>,
}

#[derive(Clone)]
pub struct CallbackServer {
    pub port: u16,
    log: Arc<Mutex<Log>>,
}

impl CallbackServer {
    pub async fn start() -> CallbackServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind callback server");
        let port = listener.local_addr().expect("addr").port();
        let log = Arc::new(Mutex::new(Log::default()));
        let app = axum::Router::new().route("/{behaviour}/{key}", axum::routing::post(answer)).with_state(log.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CallbackServer { port, log }
    }

    pub fn url(&self, behaviour: &str, key: &str) -> String {
        format!("http://127.0.0.1:{}/{behaviour}/{key}", self.port)
    }

    /// Requests received for `key`, in arrival order.
    pub fn received(&self, key: &str) -> Vec<Received> {
        self.log.lock().unwrap().received.iter().filter(|r| r.key == key).cloned().collect()
    }

    /// Waits until `key` has at least `n` requests (panics after `within`).
    pub async fn wait_for(&self, key: &str, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received(key);
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{key}: {} of {n} requests within {within:?}", got.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn answer(
    State(log): State<Arc<Mutex<Log>>>,
    Path((behaviour, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let count = {
        let mut log = log.lock().unwrap();
        let headers =
            headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string())).collect();
        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        log.received.push(Received {
            behaviour: behaviour.clone(),
            key: key.clone(),
            headers,
            body,
            at: Instant::now(),
        });
        let count = log.counts.entry(key.clone()).or_default();
        *count += 1;
        *count
    };
    let (name, arg) =
        behaviour.split_once('-').map(|(n, a)| (n, a.parse::<u64>().unwrap_or(0))).unwrap_or((behaviour.as_str(), 0));
    match (name, behaviour.as_str()) {
        (_, "ok") => (StatusCode::OK, "ok").into_response(),
        (_, "body-ok") => (StatusCode::INTERNAL_SERVER_ERROR, r#"{"result": true}"#).into_response(),
        (_, "body-no") => (StatusCode::OK, r#"{"result": false}"#).into_response(),
        (_, "gone") => StatusCode::GONE.into_response(),
        (_, "hang") => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        ("status", _) => StatusCode::from_u16(arg as u16).unwrap_or(StatusCode::OK).into_response(),
        ("fail", _) if count <= arg => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        ("fail", _) => StatusCode::OK.into_response(),
        ("slow", _) => {
            tokio::time::sleep(Duration::from_millis(arg)).await;
            StatusCode::OK.into_response()
        }
        ("throttle", _) if count == 1 => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", arg.to_string())]).into_response()
        }
        ("throttle", _) => StatusCode::OK.into_response(),
        ("big", _) => {
            let chunk = Bytes::from(vec![b'x'; 1 << 20]);
            let stream = futures::stream::iter((0..arg).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            (StatusCode::OK, Body::from_stream(stream)).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
