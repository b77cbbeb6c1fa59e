//! Dead letters: list a subscription's and replay them to the tail of its queue
//! (`GET /api/v3/herald/dead_letters/{subscription_id}`,
//! `POST /api/v3/herald/dead_letters/{subscription_id}/replay` with an optional
//! `{"distribution_ids": [...]}`). Authorised on the subscription's supplier account
//! (`list`, `replay`).

use super::auth::Action;
use super::{AppState, Call, CmdbPath, CmdbQuery, Refusal, Services};
use crate::compat::time::format_cmdb;
use crate::compat::{ApiError, ErrorCode};
use crate::store::{Millis, StoreError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/{version}/herald/dead_letters/{subscription_id}", get(list))
        .route("/api/{version}/herald/dead_letters/{subscription_id}/replay", post(replay))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(default)]
    distribution_ids: Option<Vec<i64>>,
}

fn subscription_id(raw: &str) -> Result<i64, Refusal> {
    raw.parse().map_err(|_| ApiError::invalid("subscription_id").into())
}

/// Authenticates the caller, then authorises `action` on the subscription's supplier
/// account. For an id herald does not know, the check is on every account (an empty
/// resource name, which only grants without `resourceNames` pass), so only callers
/// allowed everywhere learn that the id does not exist (1199006).
async fn authorize_on(services: &Services, call: &Call, id: i64, action: Action) -> Result<(), Refusal> {
    let identity = call.identity(&services.auth).await?;
    // Delivery learns of a subscription after the catalog does: one just created is known
    // to the catalog first.
    let account = services.delivery.account_of(id).or_else(|| {
        let sub = services.controller.catalog.by_id(id).filter(|s| s.metadata.deletion_timestamp.is_none())?;
        let account = crate::effective::name_key(&sub.spec).0;
        let namespace = sub.metadata.namespace.as_deref().unwrap_or_default();
        services.controller.tenancy.allows(account, namespace).then(|| account.to_string())
    });
    services.auth.authorize(&identity, account.as_deref().unwrap_or_default(), action).await?;
    match account {
        Some(_) => Ok(()),
        None => Err(ApiError::invalid_because("subscription_id", format!("{id} not found")).into()),
    }
}

/// Answers an operation on the subscription `raw_id` names: the id parsed, `action`
/// authorised on its account (`authorize_on`), then `operation` with the services and the id.
pub(super) async fn on_subscription<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    raw_id: &str,
    action: Action,
    operation: F,
) -> Response
where
    F: FnOnce(Arc<Services>, i64) -> Fut,
    Fut: std::future::Future<Output = Result<Value, Refusal>>,
{
    let call = Call::from_headers(headers);
    let result = async {
        let id = subscription_id(raw_id)?;
        let services = state.services()?;
        authorize_on(&services, &call, id, action).await?;
        operation(services, id).await
    }
    .await;
    call.answer(result)
}

/// A store time in the bk-cmdb format, in herald's time zone.
pub(super) fn cmdb_time(state: &AppState, at: Millis) -> String {
    format_cmdb(jiff::Timestamp::from_millisecond(at).unwrap_or_default(), &state.config.time_zone)
}

/// A failed store read (1103002).
pub(super) fn query_failed(error: StoreError) -> Refusal {
    ApiError::new(ErrorCode::QueryFailed).with_detail(error.to_string()).into()
}

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, raw_id)): CmdbPath<(String, String)>,
    CmdbQuery(query): CmdbQuery<ListQuery>,
) -> Response {
    let app: &AppState = &state;
    on_subscription(app, &headers, &raw_id, Action::List, |services, id| async move {
        let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
        let letters = services.delivery.dead_letters(id, limit).await.map_err(query_failed)?;
        let info: Vec<Value> = letters
            .into_iter()
            .map(|l| {
                json!({
                    "subscription_id": l.subscription_id,
                    "distribution_id": l.distribution_id,
                    "attempts": l.attempts,
                    "reason": l.reason,
                    "error": l.error,
                    "dead_at": cmdb_time(app, l.dead_at),
                    "event": serde_json::from_str::<Value>(&l.body).unwrap_or_default(),
                })
            })
            .collect();
        Ok(json!({ "count": info.len(), "info": info }))
    })
    .await
}

async fn replay(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, raw_id)): CmdbPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    on_subscription(&state, &headers, &raw_id, Action::Replay, |services, id| async move {
        let body = super::publish::read_body(body)?;
        let request: ReplayBody =
            if body.iter().all(u8::is_ascii_whitespace) { ReplayBody::default() } else { super::json_body(&body)? };
        let replayed = services
            .delivery
            .replay(id, request.distribution_ids)
            .await
            .map_err(|e| Refusal::from(ApiError::new(ErrorCode::UpdateFailed).with_detail(e.to_string())))?;
        Ok(json!({ "replayed": replayed }))
    })
    .await
}
