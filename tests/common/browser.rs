//! A real Chromium for the console tests: Debian's chromium, headless, driven by
//! chromedriver on a free loopback port (both installed by tests/run.sh) over the W3C
//! WebDriver protocol, which is JSON over HTTP: the few commands the tests use are here,
//! on the reqwest the tests already have.

use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The W3C key codes the tests press.
pub const KEY_TAB: char = '\u{E004}';
pub const KEY_ENTER: char = '\u{E007}';

/// W3C WebDriver's name for an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`
    session: String,
    driver: Child,
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Chromium with a `size` window, its console messages kept for `console_errors`.
    pub async fn start(size: (u32, u32)) -> Browser {
        let port = super::free_port();
        // Its own process group, so that dropping the Browser ends Chromium too.
        let driver = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (installed by tests/run.sh)");
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{driver_url}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer on {driver_url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--window-size={},{}", size.0, size.1)],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let answer: Value = http
            .post(format!("{driver_url}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("new session JSON");
        let id = answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no Chromium session: {answer}"));
        let session = format!("{driver_url}/session/{id}");
        Browser { http, session, driver }
    }

    /// One WebDriver command; its `value`, or a panic with the driver's error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let ok = response.status().is_success();
        let answer: Value = response.json().await.unwrap_or_default();
        assert!(ok, "{method} {path}: {answer}");
        answer["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.command(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.command(reqwest::Method::GET, path, None).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// Elements `css` selects now.
    pub async fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let found = self.post("/elements", json!({"using": "css selector", "value": css})).await;
        found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str())
            .map(|id| Element { browser: self, id: id.to_string() })
            .collect()
    }

    /// The first element `css` selects, once there is one (up to 10 s).
    pub async fn find(&self, css: &str) -> Element<'_> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(element) = self.find_all(css).await.into_iter().next() {
                return element;
            }
            assert!(Instant::now() < deadline, "nothing matches {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The rendered text of `css`'s first element now ("" when there is none), read in one
    /// script so that a re-rendered page cannot hand back a stale element.
    pub async fn text_of(&self, css: &str) -> String {
        let script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';";
        let text = self.post("/execute/sync", json!({"script": script, "args": [css]})).await;
        text.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the text of `css`'s first element contains `wanted` (up to 15 s).
    pub async fn wait_text(&self, css: &str, wanted: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = self.text_of(css).await;
            if text.contains(wanted) {
                return text;
            }
            if Instant::now() >= deadline {
                let page = self.text_of("main").await;
                panic!("{css} never showed {wanted:?}; it shows {text:?}; the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `text` into the input `css` selects, replacing what it held.
    pub async fn fill(&self, css: &str, text: &str) {
        let input = self.find(css).await;
        input.clear().await;
        input.send_keys(text).await;
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await;
    }

    /// The element that has the keyboard focus.
    pub async fn focused(&self) -> Element<'_> {
        let found = self.get("/element/active").await;
        Element { browser: self, id: found[ELEMENT].as_str().expect("a focused element").to_string() }
    }

    pub async fn accept_alert(&self) {
        self.post("/alert/accept", json!({})).await;
    }

    /// The cookie `name` as WebDriver reports it (with httpOnly and sameSite).
    pub async fn cookie(&self, name: &str) -> Value {
        self.get(&format!("/cookie/{name}")).await
    }

    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height})).await;
    }

    /// Console messages at level SEVERE since the last call (the driver hands each out once).
    pub async fn console_errors(&self) -> Vec<String> {
        let entries = self.post("/se/log", json!({"type": "browser"})).await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Scrolls the page until `css`'s first element is at the top of the window.
    pub async fn scroll_to(&self, css: &str) {
        let script = "document.querySelector(arguments[0]).scrollIntoView({block: 'start'});";
        self.post("/execute/sync", json!({"script": script, "args": [css]})).await;
    }

    /// A PNG of the window, written to target/console-screenshots/NAME.png.
    pub async fn screenshot(&self, name: &str) {
        use base64::Engine;
        let encoded = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().expect("base64")).expect("PNG");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }
}

impl Element<'_> {
    pub async fn click(&self) {
        self.browser.post(&format!("/element/{}/click", self.id), json!({})).await;
    }

    pub async fn clear(&self) {
        self.browser.post(&format!("/element/{}/clear", self.id), json!({})).await;
    }

    pub async fn send_keys(&self, text: &str) {
        self.browser.post(&format!("/element/{}/value", self.id), json!({"text": text})).await;
    }

    pub async fn text(&self) -> String {
        self.browser.get(&format!("/element/{}/text", self.id)).await.as_str().unwrap_or_default().to_string()
    }

    pub async fn attribute(&self, name: &str) -> Option<String> {
        self.browser.get(&format!("/element/{}/attribute/{name}", self.id)).await.as_str().map(str::to_string)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}
