//! One delivery attempt: the callback request (docs/design.md §4) and its answer, read up
//! to the body cap and paid for from the global answer budget.

use super::confirm::retry_after;
use crate::event::callback_body;
use crate::outbound::body::{BodyEnd, ByteBudget, HeldBytes, read_body};
use crate::outbound::guard::GuardError;
use crate::outbound::{Outbound, describe};
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
    /// As read: at most the body cap, and only what the answer budget could hold.
    pub body: Vec<u8>,
    /// The answer budget ran out before the answer (up to the body cap) was read, so
    /// `body` is only its start.
    pub cut: bool,
    /// The budget bytes `body` holds, given back when the answer is dropped.
    pub held: HeldBytes,
}

/// The `webhook-id`: stable for one event and one subscription across retries, replays
/// and restarts, so receivers can de-duplicate.
pub fn message_id(subscription_id: i64, distribution_id: i64) -> String {
    format!("msg_herald_{subscription_id}_{distribution_id}")
}

pub struct Request<'a> {
    /// `None` when the callback URL does not parse.
    pub url: Option<&'a reqwest::Url>,
    pub item: &'a Queued,
    pub attempt: u32,
    pub timeout: Duration,
    pub signing_key: Option<&'a [u8]>,
    pub body_cap: usize,
    pub answer_budget: &'a ByteBudget,
    pub retry_after_cap: Duration,
}

/// Why an attempt got no answer. The texts become `lastError`, so they never carry the
/// URL (which may hold credentials).
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// Refused by the callback guard before any request (or its host did not resolve).
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("{}", describe(.0))]
    Send(#[source] reqwest::Error),
    #[error("reading the response body: {}", describe(.0))]
    ReadBody(#[source] reqwest::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the callback URL is not a valid URL")]
    InvalidUrl,
}

pub async fn send(outbound: &Outbound, request: Request<'_>) -> Result<Answer, CallbackError> {
    let item = request.item;
    let body = callback_body(&item.body, item.distribution_id, item.subscription_id);
    let id = message_id(item.subscription_id, item.distribution_id);
    let timestamp = jiff::Timestamp::now().as_second();
    let mut builder = outbound
        .post(request.url.ok_or(CallbackError::InvalidUrl)?)
        .await?
        .timeout(request.timeout)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(HEADER_ID, &id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_ATTEMPT, request.attempt.to_string());
    if let Some(key) = request.signing_key {
        builder = builder.header(HEADER_SIGNATURE, super::signing::sign(key, &id, timestamp, body.as_bytes()));
    }
    let exchange = async {
        let mut response = builder.body(body).send().await.map_err(CallbackError::Send)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, jiff::Timestamp::now(), request.retry_after_cap));
        // The answer budget cuts an answer rather than wait (`outbound::body`).
        read_body(&mut response, request.body_cap, Some(request.answer_budget))
            .await
            .map(|body| Answer {
                status,
                retry_after,
                body: body.bytes,
                cut: body.end == BodyEnd::BudgetSpent,
                held: body.held,
            })
            .map_err(CallbackError::ReadBody)
    };
    // reqwest's timeout covers the exchange too; this outer one also bounds the body read.
    match tokio::time::timeout(request.timeout, exchange).await {
        Ok(Err(CallbackError::Send(error) | CallbackError::ReadBody(error))) if error.is_timeout() => {
            Err(CallbackError::Timeout(request.timeout))
        }
        Ok(result) => result,
        Err(_) => Err(CallbackError::Timeout(request.timeout)),
    }
}
