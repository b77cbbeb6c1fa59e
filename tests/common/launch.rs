//! The one way tests and the benchmark start `herald run`: a child process with the test
//! defaults (a store of its own, loopback callbacks allowed, the anonymous API, a 5 s
//! Lease) and a YAML overlay, its output in a log file. Needs nothing but std and
//! serde_yaml, so benches/bench.rs includes this file by path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// What every test herald runs with, before the test's own YAML is merged over it.
const TEST_DEFAULTS: &str = "callbackGuard: {allowCidrs: ['127.0.0.0/8']}\napi: {auth: {anonymous: true}}\nleaderElection: {leaseDurationSeconds: 5}\n";

/// One `herald run`. `name` names its config and log files in `dir`, so two herald
/// processes can share a directory (and so a store).
pub struct Launch<'a> {
    pub kubeconfig: &'a Path,
    pub namespace: &'a str,
    pub instance: &'a str,
    pub dir: &'a Path,
    pub name: &'a str,
    /// YAML merged over the test defaults.
    pub config_yaml: &'a str,
    pub rust_log: &'a str,
    /// The herald binary, and what to run it under (for example valgrind), if anything.
    pub binary: PathBuf,
    pub wrap: &'a [String],
}

/// A started herald: the child, its port on 127.0.0.1, its log, and the configuration
/// it was given.
pub struct Launched {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub config: serde_yaml::Value,
}

impl<'a> Launch<'a> {
    /// The debug build of this crate's herald at `RUST_LOG=info,kube=warn`, named
    /// "herald", with the test defaults only.
    pub fn new(kubeconfig: &'a Path, namespace: &'a str, instance: &'a str, dir: &'a Path) -> Self {
        Launch {
            kubeconfig,
            namespace,
            instance,
            dir,
            name: "herald",
            config_yaml: "",
            rust_log: "info,kube=warn",
            binary: PathBuf::from(env!("CARGO_BIN_EXE_herald")),
            wrap: &[],
        }
    }

    pub fn spawn(&self) -> Launched {
        std::fs::create_dir_all(self.dir).expect("herald directory");
        let mut config: serde_yaml::Value = serde_yaml::from_str(TEST_DEFAULTS).expect("test defaults");
        let path = serde_yaml::Value::String(self.dir.join("store").display().to_string());
        let store = serde_yaml::Mapping::from_iter([("path".into(), path)]);
        merge(&mut config, serde_yaml::Mapping::from_iter([("store".into(), store.into())]).into());
        merge(&mut config, serde_yaml::from_str(self.config_yaml).expect("test config YAML"));
        let file = self.dir.join(format!("{}.yaml", self.name));
        std::fs::write(&file, serde_yaml::to_string(&config).expect("config YAML")).expect("write config");
        let port = free_port();
        let log = self.dir.join(format!("{}-{port}.log", self.name));
        let (program, prefix): (PathBuf, Vec<OsString>) = match self.wrap.split_first() {
            Some((program, rest)) => (
                PathBuf::from(program),
                rest.iter().map(Into::into).chain([self.binary.clone().into_os_string()]).collect(),
            ),
            None => (self.binary.clone(), Vec::new()),
        };
        let child = Command::new(program)
            .args(prefix)
            .args(["run", "--config"])
            .arg(&file)
            .args(["--namespace", self.namespace, "--instance", self.instance, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("KUBECONFIG", self.kubeconfig)
            .env("RUST_LOG", self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log).expect("log file")))
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log).expect("log file")))
            .spawn()
            .expect("spawn herald");
        Launched { child, port, log, config }
    }
}

/// herald's config for the JetStream engine at `urls` (comma-separated), with streams named
/// `stream` (a run's own: a replayed run must not find an earlier run's streams).
pub fn jetstream_config_for(urls: &str, stream: &str) -> String {
    let urls: Vec<String> = urls.split(',').map(|u| format!("'{u}'")).collect();
    format!("store: {{engine: jetstream, jetstream: {{urls: [{}], stream: {stream}}}}}\n", urls.join(", "))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Deep-merges `overlay` into `base` (maps key by key, anything else replaced).
pub fn merge(base: &mut serde_yaml::Value, overlay: serde_yaml::Value) {
    match (base, overlay) {
        (serde_yaml::Value::Mapping(base), serde_yaml::Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (_, serde_yaml::Value::Null) => {}
        (base, overlay) => *base = overlay,
    }
}
