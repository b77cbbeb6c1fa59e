//! The bk-cmdb watch emulator (tests/cmdb_emulator/emulator.py) as a child process on
//! 127.0.0.1, with its state in a file so that it can be killed and restarted on the same
//! port with the same chains, and its control interface (emit, expire, outage, stats).

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Emulator {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    control: Control,
}

/// The emulator's control interface; cheap to clone into a producer task.
#[derive(Clone)]
pub struct Control {
    url: String,
    http: reqwest::Client,
}

impl std::ops::Deref for Emulator {
    type Target = Control;
    fn deref(&self) -> &Control {
        &self.control
    }
}

impl Emulator {
    /// Starts the emulator with `args` (such as `--app CODE:SECRET`) in `dir`.
    pub async fn start(dir: &std::path::Path, args: &[&str]) -> Emulator {
        std::fs::create_dir_all(dir).expect("emulator directory");
        let mut emulator = Emulator {
            child: None,
            port: 0,
            dir: dir.to_path_buf(),
            args: args.iter().map(ToString::to_string).collect(),
            control: Control { url: String::new(), http: reqwest::Client::new() },
        };
        emulator.spawn().await;
        emulator
    }

    async fn spawn(&mut self) {
        let port_file = self.dir.join("port");
        let _ = std::fs::remove_file(&port_file);
        let log = std::fs::File::options().create(true).append(true).open(self.dir.join("emulator.log")).expect("log");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cmdb_emulator/emulator.py");
        let child = Command::new("python3")
            .arg(script)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--state")
            .arg(self.dir.join("state.jsonl"))
            .args(["--port", &self.port.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the emulator (python3)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()) {
                self.port = port;
                self.control.url = format!("http://127.0.0.1:{port}");
                return;
            }
            assert!(Instant::now() < deadline, "the emulator did not start: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("emulator.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash of bk-cmdb.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same state.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn control(&self) -> Control {
        self.control.clone()
    }
}

impl Control {
    pub fn url(&self) -> String {
        self.url.clone()
    }

    async fn call(&self, path: &str, body: Value) -> Value {
        let response = self.http.post(format!("{}{path}", self.url)).json(&body).send().await.expect("emulator");
        assert!(response.status().is_success(), "emulator {path}: {}", response.status());
        response.json().await.expect("emulator JSON")
    }

    /// Emits events `[(type, detail)]` on `resource`; returns their cursors.
    pub async fn emit(&self, resource: &str, events: &[(&str, Value)]) -> Vec<String> {
        let events: Vec<Value> = events.iter().map(|(t, d)| json!({"type": t, "detail": d})).collect();
        let answer = self.call("/emulator/events", json!({"resource": resource, "events": events})).await;
        serde_json::from_value(answer["cursors"].clone()).expect("cursors")
    }

    /// Drops every event held so far, as bk-cmdb's retention would.
    pub async fn expire(&self) {
        self.call("/emulator/expire", json!({})).await;
    }

    /// Answers every watch with HTTP `status` for `seconds`.
    pub async fn outage(&self, status: u16, seconds: u64) {
        self.call("/emulator/outage", json!({"status": status, "seconds": seconds})).await;
    }

    pub async fn stats(&self) -> Value {
        self.http.get(format!("{}/emulator/stats", self.url)).send().await.expect("stats").json().await.expect("JSON")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// herald's request id of the watch event at `cursor` (docs/sources.md): the first 16
/// bytes of its SHA-256, in hex.
pub fn request_id(cursor: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cursor.as_bytes());
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}
