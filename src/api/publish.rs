//! `POST /api/v3/event/publish`: producers hand herald bk-cmdb event instances (one
//! object or an array). The answer is 200 only once the events and their fan-out are
//! durable; over the store quota it is 503 with Retry-After and nothing is kept.

use super::auth::Action;
use super::{AppState, Call, Refusal, authorize};
use crate::compat::{ApiError, ErrorCode};
use crate::event::{PublishedEvent, StoredEvent, event_name, is_noop_update, supplier_account};
use crate::store::StoreError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use std::collections::BTreeSet;
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/api/{version}/event/publish", post(publish))
}

/// The body as events: one object or an array of them.
fn parse_events(body: &Bytes) -> Result<Vec<PublishedEvent>, Refusal> {
    let value: serde_json::Value = super::json_body(body)?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        object @ serde_json::Value::Object(_) => vec![object],
        _ => {
            return Err(ApiError::new(ErrorCode::JsonDecode)
                .with_detail("expected an event object or an array of them")
                .into());
        }
    };
    if items.is_empty() {
        return Err(ApiError::missing("events").into());
    }
    items
        .into_iter()
        .map(|item| {
            serde_json::from_value(item)
                .map_err(|e| Refusal::from(ApiError::new(ErrorCode::JsonDecode).with_detail(e.to_string())))
        })
        .collect()
}

pub fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Refusal> {
    body.map_err(|rejection| Refusal {
        error: ApiError::new(ErrorCode::JsonDecode).with_detail(rejection.body_text()),
        status: Some(rejection.status()),
        permission: None,
        retry_after: None,
    })
}

async fn publish(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let call = Call::from_headers(&headers);
    call.answer(accept(&state, &call, body).await)
}

async fn accept(
    state: &AppState,
    call: &Call,
    body: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Value, Refusal> {
    let services = state.services()?;
    let events = parse_events(&read_body(body)?)?;
    let accounts: BTreeSet<String> =
        events.iter().map(|e| supplier_account(e.bk_supplier_account.as_deref())).collect();
    for account in &accounts {
        authorize(&services, call, account, Action::Publish).await?;
    }
    let now = crate::compat::time::format_cmdb(jiff::Timestamp::now(), &state.config.time_zone);
    let mut named = Vec::with_capacity(events.len());
    let mut skipped = 0;
    for event in events {
        let name = event_name(&event)
            .map_err(|invalid| Refusal::from(ApiError::invalid_because(invalid.field, invalid.reason)))?;
        if is_noop_update(&event) {
            skipped += 1;
            continue;
        }
        named.push((StoredEvent::from_published(event, &now, &call.request_id), name));
    }
    let published = services.delivery.publish(named).await.map_err(|error| match error {
        StoreError::OverQuota { .. } | StoreError::Full { .. } | StoreError::Unavailable { .. } => Refusal {
            error: ApiError::new(ErrorCode::Internal).with_detail(error.to_string()),
            status: Some(StatusCode::SERVICE_UNAVAILABLE),
            permission: None,
            retry_after: Some(30),
        },
        StoreError::TooLarge { .. } => Refusal {
            error: ApiError::new(ErrorCode::FieldInvalid).with_detail(error.to_string()),
            status: Some(StatusCode::PAYLOAD_TOO_LARGE),
            permission: None,
            retry_after: None,
        },
        other => {
            tracing::error!(error = %other, "publish failed");
            Refusal::from(ApiError::new(ErrorCode::Internal).with_detail("the event store failed"))
        }
    })?;
    Ok(serde_json::json!({
        "accepted": published.accepted,
        "skipped": skipped,
        "queued": published.queued,
        "overflowed": published.overflowed,
    }))
}
