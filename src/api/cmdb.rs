//! The direct bk-cmdb paths (docs/design.md §3): `/api/{version}/event/subscribe/...` with
//! bk-cmdb's envelope, codes and HTTP statuses. The supplier account is the owner header
//! (`HTTP_BK_SUPPLIER_ACCOUNT`, else `HTTP_BLUEKING_SUPPLIER_ID`) when given, else the
//! path's; the operator is `BK_User`, else the authenticated identity.

use super::auth::{Action, Identity};
use super::publish::read_body;
use super::{AppState, Call, CmdbPath, Refusal, Services};
use crate::compat::input::{parse_ping, parse_subscription, parse_telnet};
use crate::compat::search::SearchRequest;
use crate::compat::{ApiError, ErrorCode};
use crate::effective::DEFAULT_SUPPLIER_ACCOUNT;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{post, put};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/{version}/event/subscribe/{account}/{biz}", post(create))
        .route("/api/{version}/event/subscribe/{account}/{biz}/{id}", put(update).delete(delete))
        .route("/api/{version}/event/subscribe/search/{account}/{biz}", post(search))
        .route("/api/{version}/event/subscribe/ping", post(ping))
        .route("/api/{version}/event/subscribe/telnet", post(telnet))
}

type Body = Result<Bytes, BytesRejection>;

/// Authenticates, runs `operation`, and answers in bk-cmdb's envelope.
async fn answer<F, Fut>(state: &AppState, call: Call, operation: F) -> Response
where
    F: FnOnce(Arc<Services>, Identity) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, Refusal>>,
{
    let result = async {
        let services = state.services()?;
        let identity = call.identity(&services.auth).await?;
        operation(services, identity).await
    }
    .await;
    call.answer(result)
}

fn account(call: &Call, path_account: &str) -> String {
    call.owner.clone().unwrap_or_else(|| path_account.to_string())
}

fn biz_id(raw: &str) -> Result<i64, Refusal> {
    raw.parse().ok().filter(|b| *b >= 0).ok_or_else(|| ApiError::invalid("bk_biz_id").into())
}

fn subscription_id(raw: &str, code: ErrorCode) -> Result<i64, Refusal> {
    raw.parse().map_err(|_| ApiError::new(code).with_detail(format!("subscription_id {raw:?} is not a number")).into())
}

async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, path_account, biz)): CmdbPath<(String, String, String)>,
    body: Body,
) -> Response {
    let call = Call::from_headers(&headers);
    let account = account(&call, &path_account);
    let user = call.user.clone();
    answer(&state, call, |services, identity| async move {
        // Authorised before the body is parsed: parsing compiles a regular confirm_pattern.
        services.auth.authorize(&identity, &account, Action::Create).await?;
        let input = parse_subscription(&read_body(body)?, &account, biz_id(&biz)?)?;
        let id = services.create(&identity, user.as_deref(), input).await?;
        Ok(serde_json::json!({ "subscription_id": id }))
    })
    .await
}

async fn update(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, path_account, biz, id)): CmdbPath<(String, String, String, String)>,
    body: Body,
) -> Response {
    let call = Call::from_headers(&headers);
    let account = account(&call, &path_account);
    let user = call.user.clone();
    answer(&state, call, |services, identity| async move {
        let id = subscription_id(&id, ErrorCode::UpdateFailed)?;
        services.auth.authorize(&identity, &account, Action::Update).await?;
        let input = parse_subscription(&read_body(body)?, &account, biz_id(&biz)?)?;
        services.update(&identity, user.as_deref(), id, input).await?;
        Ok(serde_json::Value::Null)
    })
    .await
}

async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, path_account, _biz, id)): CmdbPath<(String, String, String, String)>,
) -> Response {
    let call = Call::from_headers(&headers);
    let account = account(&call, &path_account);
    answer(&state, call, |services, identity| async move {
        let id = subscription_id(&id, ErrorCode::DeleteFailed)?;
        services.delete(&identity, &account, id).await?;
        Ok(serde_json::Value::Null)
    })
    .await
}

async fn search(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    CmdbPath((_, path_account, _biz)): CmdbPath<(String, String, String)>,
    body: Body,
) -> Response {
    let call = Call::from_headers(&headers);
    let account = account(&call, &path_account);
    answer(&state, call, |services, identity| async move {
        let raw = read_body(body)?;
        services.search(&identity, &account, || SearchRequest::parse(&raw), None).await
    })
    .await
}

async fn ping(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let call = Call::from_headers(&headers);
    let account = call.owner.clone().unwrap_or_else(|| DEFAULT_SUPPLIER_ACCOUNT.to_string());
    let timeout = state.config.api.probe_timeout();
    let body_cap = state.config.delivery.body_cap_bytes;
    answer(&state, call, |services, identity| async move {
        let input = parse_ping(&read_body(body)?)?;
        services.ping(&identity, &account, input, timeout, body_cap).await
    })
    .await
}

async fn telnet(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let call = Call::from_headers(&headers);
    let account = call.owner.clone().unwrap_or_else(|| DEFAULT_SUPPLIER_ACCOUNT.to_string());
    let timeout = state.config.api.probe_timeout();
    answer(&state, call, |services, identity| async move {
        let target = parse_telnet(&read_body(body)?)?;
        services.telnet(&identity, &account, target, timeout).await?;
        // The API document's answer to a successful connectivity test.
        Ok(serde_json::json!("success"))
    })
    .await
}
