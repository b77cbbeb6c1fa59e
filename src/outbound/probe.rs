//! The diagnostics of bk-cmdb's event page: `ping` (a test push: POST a body, report
//! whatever the destination answers) and `telnet` (dial TCP, send nothing, close). Both
//! obey the callback guard, and a refused destination is refused before any connection.

use super::body::read_body;
use super::guard::{GuardError, Refused};
use super::{Outbound, describe};
use std::time::Duration;

/// What a pinged destination answered: any HTTP status is an answer.
#[derive(Debug)]
pub struct PingAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The destination is in a refused range: the caller's input, not a failed probe.
    #[error(transparent)]
    Refused(Refused),
    #[error("not an absolute URL")]
    InvalidUrl,
    #[error("{0}")]
    Resolve(#[source] GuardError),
    #[error("{}", describe(.0))]
    Request(#[source] reqwest::Error),
    #[error("reading the response body: {}", describe(.0))]
    ReadBody(#[source] reqwest::Error),
    #[error("connect {target}: {source}")]
    Connect { target: String, source: std::io::Error },
    #[error("{}timed out after {timeout:?}", target.as_deref().map(|t| format!("connect {t}: ")).unwrap_or_default())]
    Timeout { target: Option<String>, timeout: Duration },
    #[error(
        "telnet is not available while callbackGuard.proxy is set: herald opens no direct connection around the egress proxy (ping goes through it)"
    )]
    Proxied,
}

impl From<GuardError> for ProbeError {
    fn from(error: GuardError) -> Self {
        match error {
            GuardError::Refused(refused) => ProbeError::Refused(refused),
            other => ProbeError::Resolve(other),
        }
    }
}

impl Outbound {
    /// POSTs `data` as JSON to `url`, within `timeout`, reading at most `body_cap` bytes
    /// of the answer.
    pub async fn ping(
        &self,
        url: &str,
        data: String,
        timeout: Duration,
        body_cap: usize,
    ) -> Result<PingAnswer, ProbeError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| ProbeError::InvalidUrl)?;
        let host = parsed.host_str().unwrap_or_default();
        // The resolver checks again at connect time; this answers a refused host name
        // as refused input rather than as a transport failure.
        self.guard.resolve(host, parsed.port_or_known_default().unwrap_or(80)).await?;
        let request = self.post(&parsed).await?;
        let exchange = async {
            let mut response = request
                .timeout(timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(data)
                .send()
                .await
                .map_err(ProbeError::Request)?;
            let status = response.status().as_u16();
            let body = read_body(&mut response, body_cap, None).await.map_err(ProbeError::ReadBody)?.bytes;
            Ok(PingAnswer { status, body })
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(ProbeError::Timeout { target: None, timeout }))
    }

    /// Dials `host:port` within `timeout` and closes the connection; refused while
    /// `callbackGuard.proxy` is set.
    pub async fn telnet(&self, host: &str, port: u16, timeout: Duration) -> Result<(), ProbeError> {
        // With a proxy configured, all of herald's egress goes through it, and a direct dial
        // would bypass it and its egress policy. Dialling through it (HTTP CONNECT) would
        // test the proxy's CONNECT rules (often port 443 only) more than the destination,
        // so telnet is refused before any lookup or connection; ping still goes through
        // the proxy, judged as every callback is.
        if self.proxied {
            return Err(ProbeError::Proxied);
        }
        let addrs = self.guard.resolve(host, port).await?;
        let target = format!("{host}:{port}");
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addrs.as_slice())).await {
            Ok(Ok(_stream)) => Ok(()),
            Ok(Err(source)) => Err(ProbeError::Connect { target, source }),
            Err(_) => Err(ProbeError::Timeout { target: Some(target), timeout }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::GuardConfig;
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A loopback listener that counts the connections it accepts.
    async fn counting_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn telnet_is_refused_without_any_connection_while_a_proxy_is_configured() {
        let (target, dialled) = counting_listener().await;
        let (proxy, proxied) = counting_listener().await;
        // Loopback allowed, so only the proxy setting stands between telnet and the target.
        let allowed = GuardConfig { allow_cidrs: vec!["127.0.0.0/8".parse().unwrap()], ..GuardConfig::default() };
        let timeout = Duration::from_secs(2);

        let direct = Outbound::new(&allowed).unwrap();
        direct.telnet("127.0.0.1", target.port(), timeout).await.unwrap();
        // The connection was made when telnet returned; the listener counts it when it runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dialled.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dialled.load(Ordering::SeqCst), 1, "without a proxy telnet dials the target");

        let config = GuardConfig { proxy: Some(format!("http://{proxy}")), ..allowed };
        let through_proxy = Outbound::new(&config).unwrap();
        for host in ["127.0.0.1", "localhost"] {
            let refused = through_proxy.telnet(host, target.port(), timeout).await.unwrap_err();
            assert!(matches!(refused, ProbeError::Proxied), "{refused}");
            assert!(refused.to_string().contains("callbackGuard.proxy"), "{refused}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(dialled.load(Ordering::SeqCst), 1, "the target was not dialled again");
        assert_eq!(proxied.load(Ordering::SeqCst), 0, "nothing reached the proxy");
    }
}
