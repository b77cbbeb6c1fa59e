//! Dead letters: list a subscription's and replay them to the tail of its queue
//! (`GET /api/v3/herald/dead_letters/{subscription_id}`,
//! `POST /api/v3/herald/dead_letters/{subscription_id}/replay` with an optional
//! `{"distribution_ids": [...]}`). Authorised on the subscription's supplier account
//! (`list`, `replay`).

use super::auth::Action;
use super::{AppState, Call, CmdbPath, CmdbQuery, Refusal, Services};
use crate::compat::{ApiError, ErrorCode};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
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

pub(super) fn subscription_id(raw: &str) -> Result<i64, Refusal> {
    raw.parse().map_err(|_| ApiError::invalid("subscription_id").into())
}

/// Authenticates the caller, then authorises `action` on the subscription's supplier
/// account. For an id herald does not know, the check is on every account (an empty
/// resource name, which only grants without `resourceNames` pass), so only callers
/// allowed everywhere learn that the id does not exist (1199006).
pub(super) async fn authorize_on(services: &Services, call: &Call, id: i64, action: Action) -> Result<(), Refusal> {
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

async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, raw_id)): CmdbPath<(String, String)>,
    CmdbQuery(query): CmdbQuery<ListQuery>,
) -> Response {
    let call = Call::from_headers(&headers);
    let result = async {
        let id = subscription_id(&raw_id)?;
        let services = state.services()?;
        authorize_on(&services, &call, id, Action::List).await?;
        let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
        let letters = services.delivery.dead_letters(id, limit)
            .await
            .map_err(|e| Refusal::from(ApiError::new(ErrorCode::QueryFailed).with_detail(e.to_string())))?;
        let info: Vec<serde_json::Value> = letters
            .into_iter()
            .map(|l| {
                serde_json::json!({
                    "subscription_id": l.subscription_id,
                    "distribution_id": l.distribution_id,
                    "attempts": l.attempts,
                    "reason": l.reason,
                    "error": l.error,
                    "dead_at": crate::compat::time::format_cmdb(jiff::Timestamp::from_millisecond(l.dead_at).unwrap_or_default(), &state.config.time_zone),
                    "event": serde_json::from_str::<serde_json::Value>(&l.body).unwrap_or_default(),
                })
            })
            .collect();
        Ok::<_, Refusal>(serde_json::json!({ "count": info.len(), "info": info }))
    }
    .await;
    call.answer(result)
}

async fn replay(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, raw_id)): CmdbPath<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let call = Call::from_headers(&headers);
    let result = async {
        let id = subscription_id(&raw_id)?;
        let services = state.services()?;
        authorize_on(&services, &call, id, Action::Replay).await?;
        let body = super::publish::read_body(body)?;
        let request: ReplayBody =
            if body.iter().all(u8::is_ascii_whitespace) { ReplayBody::default() } else { super::json_body(&body)? };
        let replayed = services
            .delivery
            .replay(id, request.distribution_ids)
            .await
            .map_err(|e| Refusal::from(ApiError::new(ErrorCode::UpdateFailed).with_detail(e.to_string())))?;
        Ok::<_, Refusal>(serde_json::json!({ "replayed": replayed }))
    }
    .await;
    call.answer(result)
}
