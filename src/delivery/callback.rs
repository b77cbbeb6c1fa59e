//! One delivery attempt: the callback request (DESIGN.md §4) and its answer, read up to
//! the body cap.

use super::confirm::retry_after;
use crate::event::callback_body;
use crate::store::Queued;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use std::time::Duration;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";
pub const HEADER_ATTEMPT: &str = "herald-attempt";

/// What the callback answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Vec<u8>,
}

/// The `webhook-id`: stable for one event and one subscription across retries, replays
/// and restarts, so receivers can de-duplicate.
pub fn message_id(subscription_id: i64, distribution_id: i64) -> String {
    format!("msg_herald_{subscription_id}_{distribution_id}")
}

pub struct Request<'a> {
    pub url: &'a str,
    /// Judges IP-literal hosts, which never reach the client's guarded resolver.
    pub guard: &'a super::guard::Guard,
    pub item: &'a Queued,
    pub attempt: u32,
    pub timeout: Duration,
    pub signing_key: Option<&'a [u8]>,
    pub body_cap: usize,
    pub retry_after_cap: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("{0}")]
    Transport(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
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

/// Reads a response body up to `cap` bytes: a huge answer costs at most the cap.
pub async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while body.len() < cap {
        match response.chunk().await? {
            Some(chunk) => body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]),
            None => break,
        }
    }
    Ok(body)
}

pub async fn send(http: &reqwest::Client, request: Request<'_>) -> Result<Answer, CallbackError> {
    let literal = reqwest::Url::parse(request.url).ok().and_then(|url| {
        url.host_str()
            .and_then(|host| host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().ok())
    });
    if let Some(ip) = literal {
        request.guard.check(ip).map_err(|refused| CallbackError::Transport(refused.to_string()))?;
    }
    let item = request.item;
    let body = callback_body(&item.body, item.distribution_id, item.subscription_id);
    let id = message_id(item.subscription_id, item.distribution_id);
    let timestamp = jiff::Timestamp::now().as_second();
    let mut builder = http
        .post(request.url)
        .timeout(request.timeout)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(HEADER_ID, &id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_ATTEMPT, request.attempt.to_string());
    if let Some(key) = request.signing_key {
        builder = builder.header(HEADER_SIGNATURE, super::signing::sign(key, &id, timestamp, body.as_bytes()));
    }
    let exchange = async {
        let mut response = builder.body(body).send().await.map_err(|e| CallbackError::Transport(describe(&e)))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, jiff::Timestamp::now(), request.retry_after_cap));
        let body = read_capped(&mut response, request.body_cap)
            .await
            .map_err(|e| CallbackError::Transport(format!("reading the response body: {}", describe(&e))))?;
        Ok(Answer { status, retry_after, body })
    };
    // reqwest's timeout covers the exchange too; this outer one also bounds the body read.
    match tokio::time::timeout(request.timeout, exchange).await {
        Ok(Err(CallbackError::Transport(text)))
            if text.contains("timed out") || text.contains("operation timed out") =>
        {
            Err(CallbackError::Timeout(request.timeout))
        }
        Ok(result) => result,
        Err(_) => Err(CallbackError::Timeout(request.timeout)),
    }
}
