//! Everything herald sends to a destination that a user chose: callbacks (built in
//! `delivery::callback`), the `ping` and `telnet` diagnostics (`probe`), and what they all
//! share: the callback guard (`guard`), the one HTTP client whose resolver applies it, the
//! bounded response-body read (`body`), and error text without secrets (docs/design.md §7).

pub mod body;
pub mod guard;
pub mod probe;

use guard::{Cidr, Guard, GuardError, GuardedResolver};
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// `callbackGuard` in the configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GuardConfig {
    /// CIDRs allowed although they are in a refused range (loopback, private, ...).
    pub allow_cidrs: Vec<Cidr>,
    /// Proxy for callbacks; environment proxies are ignored unless this is set.
    pub proxy: Option<String>,
    /// PEM file of extra CA certificates trusted for https callbacks.
    pub ca_bundle: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid callbackGuard.proxy: {0}")]
    Proxy(#[source] reqwest::Error),
    #[error("reading callbackGuard.caBundle {path}: {source}")]
    ReadCa { path: String, source: std::io::Error },
    #[error("callbackGuard.caBundle {path} holds no usable PEM certificate: {source}")]
    ParseCa { path: String, source: reqwest::Error },
    #[error("the CA bundle holds no usable PEM certificate: {0}")]
    ParseExtraCa(#[source] reqwest::Error),
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// The HTTP client every callback and ping goes through, and the guard inside its
/// resolver: no redirects, no environment proxies unless configured. Cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    guard: Arc<Guard>,
    /// Through `callbackGuard.proxy`: the client then connects only to the proxy, and
    /// its resolver never sees the destination's name.
    proxied: bool,
}

impl Outbound {
    pub fn new(config: &GuardConfig) -> Result<Self, ClientError> {
        Self::with_roots(config, None)
    }

    /// As `new`, also trusting the PEM certificates `extra_roots` (a CmdbSource's
    /// `caBundle`).
    pub fn with_roots(config: &GuardConfig, extra_roots: Option<&[u8]>) -> Result<Self, ClientError> {
        let guard = Arc::new(Guard::new(config.allow_cidrs.clone()));
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
        if let Some(proxy) = &config.proxy {
            builder = builder.proxy(reqwest::Proxy::all(proxy).map_err(ClientError::Proxy)?);
        }
        if let Some(path) = &config.ca_bundle {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| ClientError::ReadCa { path: shown.clone(), source })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|source| ClientError::ParseCa { path: shown.clone(), source })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some(pem) = extra_roots {
            for certificate in reqwest::Certificate::from_pem_bundle(pem).map_err(ClientError::ParseExtraCa)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        Ok(Outbound { client: builder.build().map_err(ClientError::Build)?, guard, proxied: config.proxy.is_some() })
    }

    /// A POST to `url`. Host names are judged by the resolver at connect time; an IP
    /// literal never reaches a resolver, so it is judged here. Through a proxy nothing
    /// reaches the resolver, so a host name is resolved and judged here, every address
    /// of it (the proxy resolves again and may pick any): the proxy must still enforce
    /// its own egress policy against a name that changes its answer in between.
    pub async fn post(&self, url: &reqwest::Url) -> Result<reqwest::RequestBuilder, GuardError> {
        if let Some(ip) = literal_host(url) {
            self.guard.check(ip)?;
        } else if self.proxied {
            let host = url.host_str().unwrap_or_default();
            self.guard.resolve_all(host, url.port_or_known_default().unwrap_or(80)).await?;
        }
        Ok(self.client.post(url.clone()))
    }
}

/// The host of `url` when it is an IP address (IPv6 in brackets or not).
fn literal_host(url: &reqwest::Url) -> Option<IpAddr> {
    url.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Error text without secrets: reqwest errors name the URL, which may carry
/// credentials in its user-info or query; keep only the cause chain.
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.is_empty() {
        text = if error.is_timeout() { "timed out".into() } else { "request failed".into() };
    }
    if error.is_connect() { format!("connect: {text}") } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> reqwest::Url {
        reqwest::Url::parse(text).unwrap()
    }

    #[test]
    fn literal_hosts_are_found_in_both_ip_families() {
        assert_eq!(literal_host(&url("http://127.0.0.1:9/x")), Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(literal_host(&url("http://[::1]:9/x")), Some(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)));
        assert_eq!(literal_host(&url("http://localhost:9/x")), None);
    }

    #[tokio::test]
    async fn literal_targets_in_refused_ranges_get_no_request() {
        let outbound = Outbound::new(&GuardConfig::default()).unwrap();
        let refused = outbound.post(&url("http://[::ffff:10.0.0.1]/")).await.unwrap_err();
        assert!(matches!(refused, GuardError::Refused(r) if r.reason == "IPv4-mapped address of a refused range"));
        assert!(outbound.post(&url("http://8.8.8.8/")).await.is_ok());
    }

    #[tokio::test]
    async fn through_a_proxy_host_names_are_judged_before_anything_reaches_the_proxy() {
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((_socket, _)) = proxy.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        // The proxy itself is the operator's choice; the destinations are not.
        let config = GuardConfig { proxy: Some(proxy_url), ..GuardConfig::default() };
        let outbound = Outbound::new(&config).unwrap();
        let reached = || connections.load(std::sync::atomic::Ordering::SeqCst);
        // A permitted destination goes through the proxy (which never answers)...
        let permitted = outbound.post(&url("http://8.8.8.8:9/events")).await.unwrap();
        let _ = permitted.timeout(std::time::Duration::from_millis(300)).send().await;
        assert_eq!(reached(), 1, "the permitted request reached the proxy");
        // ...a refused one is refused before any request: "localhost" resolves (from
        // /etc/hosts) to loopback only.
        let refused = outbound.post(&url("http://localhost:9/events")).await.unwrap_err();
        assert!(matches!(refused, GuardError::Refused(_)), "{refused}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(reached(), 1, "nothing more reached the proxy");
    }
}
