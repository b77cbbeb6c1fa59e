//! herald's configuration: one YAML file (`--config`), then flags and environment
//! variables override single keys. Every key, its default and its override are listed in
//! docs/configuration.md.

use crate::compat::time::TimeZoneSetting;
use crate::outbound::GuardConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// herald's own namespace: REST-created subscriptions live here, the id counter too,
    /// and subscriptions here may receive every supplier account's events.
    pub namespace: String,
    /// This process's name (the pod name in Kubernetes): Event reporter instance.
    pub instance: String,
    /// Address of the HTTP server (REST API, health, metrics).
    pub listen: SocketAddr,
    pub controller: ControllerConfig,
    pub store: StoreConfig,
    pub delivery: DeliveryConfig,
    pub callback_guard: GuardConfig,
    pub leader_election: LeaderElectionConfig,
    pub metrics: MetricsConfig,
    pub api: ApiConfig,
    pub sources: SourcesConfig,
    /// Time zone of bk-cmdb time strings (`last_time`, `action_time`): `UTC`, an offset
    /// such as `+08:00`, or an IANA name such as `Asia/Shanghai`.
    pub time_zone: TimeZoneSetting,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ApiConfig {
    pub auth: AuthConfig,
    /// Largest request body accepted (publish's limit); larger ones answer 413.
    pub max_body_bytes: usize,
    /// Largest body of every other route (subscription bodies are small); never more than
    /// `maxBodyBytes`.
    pub max_body_bytes_except_publish: usize,
    /// Bytes of publish bodies held at once across all callers. Bodies are read before the
    /// caller is authorised (its accounts are in the body), so this bounds what callers
    /// without rights can make herald hold; past it a publish answers 503 + Retry-After.
    pub publish_buffer_bytes: usize,
    /// A request's headers, and a TLS handshake, must arrive within this long; a kept-alive
    /// connection idle this long is closed too.
    pub header_read_timeout_seconds: u64,
    /// A request's body must arrive within this long of its headers (else 408).
    pub body_read_timeout_seconds: u64,
    /// A response write that makes no progress this long closes the connection.
    pub write_timeout_seconds: u64,
    /// Connections served at once; further ones wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// BlueKing ESB app credentials: `apps: [{appCode, appSecret, accounts: [...]}]`, from a
    /// file or from key `apps.yaml` of a Secret in herald's namespace.
    pub esb_credentials_file: Option<PathBuf>,
    pub esb_credentials_secret: Option<String>,
    /// Timeout of the ping and telnet probes.
    pub probe_timeout_seconds: u64,
    /// Serve HTTPS with this certificate and key (PEM) instead of plain HTTP.
    pub tls: Option<TlsConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl ApiConfig {
    pub fn probe_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.probe_timeout_seconds.max(1))
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept Kubernetes bearer tokens (TokenReview) and authorise them with
    /// SubjectAccessReviews. Off: only ESB app credentials (or anonymous) are accepted.
    pub kubernetes: bool,
    /// Development only: accept requests without credentials, allowed everything.
    pub anonymous: bool,
    /// Audience that Kubernetes tokens must be issued for.
    pub audience: String,
    /// How long TokenReview and SubjectAccessReview answers are reused.
    pub cache_seconds: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            auth: AuthConfig::default(),
            max_body_bytes: 4 << 20,
            max_body_bytes_except_publish: 64 << 10,
            publish_buffer_bytes: 64 << 20,
            header_read_timeout_seconds: 30,
            body_read_timeout_seconds: 30,
            write_timeout_seconds: 30,
            max_connections: 1024,
            esb_credentials_file: None,
            esb_credentials_secret: None,
            probe_timeout_seconds: 10,
            tls: None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { kubernetes: true, anonymous: false, audience: "herald".into(), cache_seconds: 5 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, one active herald) or `jetstream` (NATS JetStream, docs/engines.md).
    pub engine: StoreEngine,
    /// Directory of the embedded store (a PersistentVolume in Kubernetes).
    pub path: PathBuf,
    /// Publishes answer 503 while the store is larger than this.
    pub quota_bytes: u64,
    /// Pending deliveries per subscription beyond which new events are dead-lettered.
    pub backlog_cap: i64,
    /// Dead letters are deleted after this long.
    pub dead_letter_retention_seconds: u64,
    /// The JetStream engine's connection and streams.
    pub jetstream: JetStreamConfig,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreEngine {
    #[default]
    Sqlite,
    Jetstream,
}

/// `store.jetstream`: where JetStream is and how herald's streams are laid out.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// NATS server URLs (`nats://host:4222`, `tls://...`); any one of the cluster serves.
    pub urls: Vec<String>,
    /// Name of herald's streams (`NAME`, `NAME_STATE`, `NAME_LOG`): one per installation.
    pub stream: String,
    /// Replicas of each stream (3 survives the loss of one NATS node).
    pub replicas: usize,
    /// Window in which JetStream drops a watch event committed twice (a crash between a
    /// page's batches); also how long a crashed herald may stay away without a page's
    /// events being queued again.
    pub duplicate_window_seconds: u64,
    /// At most one of these, each a file (a mounted Secret): a `.creds` file, an NKey
    /// seed, or a token.
    pub credentials_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// CA bundle (PEM) of the NATS servers' certificates; TLS is required when set.
    pub ca_file: Option<PathBuf>,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            urls: vec!["nats://nats:4222".into()],
            stream: "HERALD".into(),
            replicas: 3,
            duplicate_window_seconds: 600,
            credentials_file: None,
            nkey_seed_file: None,
            token_file: None,
            ca_file: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Most of a callback's response body that is read (and matched by `regular`).
    pub body_cap_bytes: usize,
    /// Longest wait a 429's Retry-After can impose.
    pub retry_after_cap_seconds: u64,
    /// A delivery still pending after this long is dead-lettered (reason Expired).
    pub max_age_seconds: u64,
    /// Budget of status writes per second across all subscriptions.
    pub status_writes_per_second: f64,
    /// Callback attempts in flight across all subscriptions (each one's `maxInFlight`
    /// still applies); at least 1.
    pub max_attempts_in_flight: usize,
    /// Bytes of callback answers held at once across all attempts; an answer it cannot
    /// hold is cut (a failed `regular` confirmation). Keep it at least `bodyCapBytes`.
    pub answer_buffer_bytes: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    /// One active herald per namespace: hold a Lease before serving.
    pub enabled: bool,
    pub lease_name: String,
    pub lease_duration_seconds: u64,
    /// With the JetStream engine, every replica serves and subscriptions are delivered in
    /// this many shards, one Lease each (`<leaseName>-shard-<n>`), spread over the replicas.
    pub shards: u32,
}

/// `sources`: event sources (CmdbSource).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// CIDRs that sources in herald's own namespace may reach besides `callbackGuard.allowCidrs`
    /// (an in-cluster bk-cmdb); sources in other namespaces get the callback guard only.
    pub own_namespace_allow_cidrs: Vec<crate::outbound::guard::Cidr>,
    /// Largest watch answer read. A bk-cmdb page holds at most 201 events; 8 MiB gives each
    /// 40 KiB, several times a large host's detail.
    pub max_answer_bytes: usize,
    /// Answer bytes all sources' watches hold at once. A read that finds it spent gives
    /// up and retries later (`ReadBudgetExhausted`) rather than grow herald's memory.
    pub read_budget_bytes: usize,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig { own_namespace_allow_cidrs: Vec::new(), max_answer_bytes: 8 << 20, read_budget_bytes: 64 << 20 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Label delivery metrics with the subscription id (one series per subscription).
    pub per_subscription: bool,
    /// Serve `/metrics` on this address only (plain HTTP), not on `listen`: the metrics
    /// name every source and, per subscription, ids and counts, so a NetworkPolicy can
    /// then open this port to the monitoring namespace alone.
    pub listen: Option<SocketAddr>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            engine: StoreEngine::Sqlite,
            path: PathBuf::from("herald-data"),
            quota_bytes: 8 << 30,
            backlog_cap: 100_000,
            dead_letter_retention_seconds: 7 * 24 * 3600,
            jetstream: JetStreamConfig::default(),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            body_cap_bytes: 1 << 20,
            retry_after_cap_seconds: 300,
            max_age_seconds: 7 * 24 * 3600,
            status_writes_per_second: 20.0,
            max_attempts_in_flight: 512,
            answer_buffer_bytes: 64 << 20,
        }
    }
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            enabled: true,
            lease_name: "herald-leader".into(),
            lease_duration_seconds: 15,
            shards: 16,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// ConfigMap (in `namespace`) holding the next free subscription id.
    pub id_counter: String,
    /// Ids reserved from the counter per write; unused ones are skipped after a restart.
    pub id_block_size: u32,
    /// Each subscription is reconciled at least this often.
    pub resync_seconds: u64,
    /// Refuse subscriptions in namespaces not allowed for their supplier account.
    pub enforce_tenancy: bool,
    /// Largest `herald.dev/imported-id` honoured. Ids herald allocates itself continue above
    /// the highest imported one, so the ceiling keeps that headroom (up to 2^53 - 1, the
    /// largest id JSON clients read exactly).
    pub max_imported_id: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "herald-system".into(),
            instance: "herald".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            controller: ControllerConfig::default(),
            store: StoreConfig::default(),
            delivery: DeliveryConfig::default(),
            callback_guard: GuardConfig::default(),
            leader_election: LeaderElectionConfig::default(),
            metrics: MetricsConfig::default(),
            api: ApiConfig::default(),
            sources: SourcesConfig::default(),
            time_zone: TimeZoneSetting::default(),
        }
    }
}

/// Default `controller.maxImportedId`: bk-cmdb's own ids are far below it, and 32-bit
/// clients still read every imported id.
pub const DEFAULT_MAX_IMPORTED_ID: i64 = i32::MAX as i64;

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            id_counter: "herald-subscription-ids".into(),
            id_block_size: 10,
            resync_seconds: 600,
            enforce_tenancy: true,
            max_imported_id: DEFAULT_MAX_IMPORTED_ID,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing config file {path}: {source}")]
    Parse { path: String, source: serde_yaml::Error },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Overrides taken from flags or the environment (see `main.rs`).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub namespace: Option<String>,
    pub instance: Option<String>,
    pub listen: Option<SocketAddr>,
}

impl Config {
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
                Self::from_yaml(&text).map_err(|source| ConfigError::Parse { path: shown, source })?
            }
            None => Config::default(),
        };
        if let Some(namespace) = overrides.namespace {
            config.namespace = namespace;
        }
        if let Some(instance) = overrides.instance {
            config.instance = instance;
        }
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        config.check()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.namespace.is_empty() {
            return Err(ConfigError::Invalid("namespace must not be empty".into()));
        }
        if self.controller.id_block_size == 0 {
            return Err(ConfigError::Invalid("controller.idBlockSize must be at least 1".into()));
        }
        if self.sources.max_answer_bytes < 64 << 10 || self.sources.read_budget_bytes < self.sources.max_answer_bytes {
            return Err(ConfigError::Invalid(
                "sources.maxAnswerBytes must be at least 64 KiB and sources.readBudgetBytes at least maxAnswerBytes"
                    .into(),
            ));
        }
        if !(1..=crate::controller::ids::MAX_ID).contains(&self.controller.max_imported_id) {
            return Err(ConfigError::Invalid("controller.maxImportedId must be 1 to 2^53 - 1".into()));
        }
        if self.store.engine == StoreEngine::Jetstream {
            self.store.jetstream.settings()?;
        }
        if !(1..=256).contains(&self.leader_election.shards) {
            return Err(ConfigError::Invalid("leaderElection.shards must be 1 to 256".into()));
        }
        Ok(())
    }
}

impl JetStreamConfig {
    /// The engine's settings, or why these keys cannot make them.
    pub fn settings(&self) -> Result<crate::store::jetstream::JetStreamSettings, ConfigError> {
        use crate::store::jetstream::{JetStreamSettings, NatsAuth};
        if self.urls.is_empty() {
            return Err(ConfigError::Invalid("store.jetstream.urls must name at least one NATS server".into()));
        }
        let valid_name =
            !self.stream.is_empty() && self.stream.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(ConfigError::Invalid(
                "store.jetstream.stream must be letters, digits, '_' or '-' (it names streams and subjects)".into(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::Invalid("store.jetstream.replicas must be 1 to 5".into()));
        }
        let auth = match (&self.credentials_file, &self.nkey_seed_file, &self.token_file) {
            (None, None, None) => NatsAuth::None,
            (Some(file), None, None) => NatsAuth::CredentialsFile(file.clone()),
            (None, Some(file), None) => NatsAuth::NkeySeedFile(file.clone()),
            (None, None, Some(file)) => NatsAuth::TokenFile(file.clone()),
            _ => {
                return Err(ConfigError::Invalid(
                    "store.jetstream: set at most one of credentialsFile, nkeySeedFile and tokenFile".into(),
                ));
            }
        };
        Ok(JetStreamSettings {
            urls: self.urls.clone(),
            stream: self.stream.clone(),
            replicas: self.replicas,
            duplicate_window: std::time::Duration::from_secs(self.duplicate_window_seconds.max(1)),
            auth,
            ca_file: self.ca_file.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let config = Config::from_yaml("namespace: team-a\ncontroller:\n  idBlockSize: 50\n").unwrap();
        assert_eq!(config.namespace, "team-a");
        assert_eq!(config.controller.id_block_size, 50);
        assert_eq!(config.controller.id_counter, "herald-subscription-ids");
        assert_eq!(config.listen, Config::default().listen);
    }

    #[test]
    fn jetstream_settings_are_checked_when_chosen() {
        let config =
            Config::from_yaml("store:\n  engine: jetstream\n  jetstream:\n    urls: [nats://a:4222]\n").unwrap();
        assert!(config.check().is_ok());
        assert_eq!(config.store.jetstream.replicas, 3);
        let two_secrets = "store:\n  engine: jetstream\n  jetstream:\n    tokenFile: /t\n    nkeySeedFile: /n\n";
        let error = Config::from_yaml(two_secrets).unwrap().check().unwrap_err().to_string();
        assert!(error.contains("at most one"), "{error}");
        let bad_name = Config::from_yaml("store:\n  engine: jetstream\n  jetstream:\n    stream: a.b\n").unwrap();
        assert!(bad_name.check().is_err());
        // Not checked while the embedded engine is chosen.
        assert!(Config::from_yaml("store:\n  jetstream:\n    urls: []\n").unwrap().check().is_ok());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::from_yaml("namespcae: typo\n").is_err());
    }

    #[test]
    fn cidrs_and_time_zones_are_parsed_once_when_read() {
        let config =
            Config::from_yaml("timeZone: Asia/Shanghai\ncallbackGuard:\n  allowCidrs: [127.0.0.0/8]\n").unwrap();
        assert_eq!(config.time_zone, "Asia/Shanghai".parse().unwrap());
        assert!(config.callback_guard.allow_cidrs[0].contains([127, 0, 0, 1].into()));
        let bad_cidr = Config::from_yaml("callbackGuard:\n  allowCidrs: [10.0.0.0/33]\n").unwrap_err();
        assert!(bad_cidr.to_string().contains("prefix must be 0..=32"), "{bad_cidr}");
        let bad_zone = Config::from_yaml("timeZone: Mars/Olympus\n").unwrap_err();
        assert!(bad_zone.to_string().contains("unknown time zone"), "{bad_zone}");
    }
}
