//! The diagnostics of bk-cmdb's event page: `ping` (a test push: POST a body, report
//! whatever the destination answers) and `telnet` (dial TCP, send nothing, close). Both
//! obey the callback guard, and a refused destination is refused before any connection.

use super::guard::{GuardError, Refused};
use super::{Outbound, describe, read_capped};
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
            let body = read_capped(&mut response, body_cap).await.map_err(ProbeError::ReadBody)?;
            Ok(PingAnswer { status, body })
        };
        tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(ProbeError::Timeout { target: None, timeout }))
    }

    /// Dials `host:port` within `timeout` and closes the connection.
    pub async fn telnet(&self, host: &str, port: u16, timeout: Duration) -> Result<(), ProbeError> {
        let addrs = self.guard.resolve(host, port).await?;
        let target = format!("{host}:{port}");
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addrs.as_slice())).await {
            Ok(Ok(_stream)) => Ok(()),
            Ok(Err(source)) => Err(ProbeError::Connect { target, source }),
            Err(_) => Err(ProbeError::Timeout { target: Some(target), timeout }),
        }
    }
}
