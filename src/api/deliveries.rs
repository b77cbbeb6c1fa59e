//! The delivery log: a subscription's latest attempts
//! (`GET /api/v3/herald/deliveries/{subscription_id}`, newest first, the last 100 kept) and
//! its attempts and failures per minute over the last 24 hours
//! (`GET /api/v3/herald/deliveries/{subscription_id}/minutes`). Authorised like reading
//! its dead letters (`list` on the subscription's supplier account).

use super::admin::{cmdb_time, on_subscription, query_failed};
use super::auth::Action;
use super::{AppState, CmdbPath, CmdbQuery};
use crate::store::LOGGED_ATTEMPTS;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/{version}/herald/deliveries/{subscription_id}", get(log))
        .route("/api/{version}/herald/deliveries/{subscription_id}/minutes", get(minutes))
}

#[derive(serde::Deserialize)]
struct LogQuery {
    limit: Option<usize>,
}

async fn log(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, raw_id)): CmdbPath<(String, String)>,
    CmdbQuery(query): CmdbQuery<LogQuery>,
) -> Response {
    let app: &AppState = &state;
    on_subscription(app, &headers, &raw_id, Action::List, |services, id| async move {
        let limit = query.limit.unwrap_or(LOGGED_ATTEMPTS).clamp(1, LOGGED_ATTEMPTS);
        let attempts = services.delivery.delivery_log(id, limit).await.map_err(query_failed)?;
        let info: Vec<Value> = attempts
            .into_iter()
            .map(|a| {
                json!({
                    "time": cmdb_time(app, a.at),
                    "distribution_id": a.distribution_id,
                    "attempt": a.attempt,
                    "result": a.result.as_str(),
                    "http_status": a.exchange.http_status,
                    "latency_ms": a.exchange.latency_ms,
                    "error": a.error,
                    "answer": a.exchange.answer_head,
                })
            })
            .collect();
        Ok(json!({ "count": info.len(), "info": info }))
    })
    .await
}

async fn minutes(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, raw_id)): CmdbPath<(String, String)>,
) -> Response {
    let app: &AppState = &state;
    on_subscription(app, &headers, &raw_id, Action::List, |services, id| async move {
        let counts = services.delivery.attempts_per_minute(id).await.map_err(query_failed)?;
        let info: Vec<Value> = counts
            .into_iter()
            .map(|m| {
                json!({
                    "minute": cmdb_time(app, m.minute * 60_000),
                    "epoch_minute": m.minute,
                    "attempts": m.attempts,
                    "failures": m.failures,
                })
            })
            .collect();
        Ok(json!({ "count": info.len(), "info": info }))
    })
    .await
}
