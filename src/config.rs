//! herald's configuration: one YAML file (`--config`), then flags and environment
//! variables override single keys. Every key, its default and its override are listed in
//! docs/configuration.md.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: "herald-system".into(),
            instance: "herald".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            controller: ControllerConfig::default(),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            id_counter: "herald-subscription-ids".into(),
            id_block_size: 10,
            resync_seconds: 600,
            enforce_tenancy: true,
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
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
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
        Ok(())
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
    fn unknown_keys_are_refused() {
        assert!(Config::from_yaml("namespcae: typo\n").is_err());
    }
}
