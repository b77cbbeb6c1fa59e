//! The BlueKing ESB gateway flavour (docs/design.md §3): `POST /api/c/compapi/v2/cc/<name>/`
//! with everything in the JSON body, app credentials from `X-Bkapi-Authorization` or the
//! body, and always HTTP 200 with the ESB envelope. `page.limit` is capped at 200 as
//! ESB does.

use super::auth::{Action, AuthError, Identity};
use super::publish::read_body;
use super::{AppCredentials, AppState, Call, Refusal, Services, app_credentials, header};
use crate::compat::input::{parse_subscription, parse_telnet};
use crate::compat::search::SearchRequest;
use crate::compat::{ApiError, ErrorCode, envelope};
use crate::effective::DEFAULT_SUPPLIER_ACCOUNT;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use serde_json::Value;
use std::sync::Arc;

const ESB_MAX_LIMIT: usize = 200;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/c/compapi/v2/cc/subscribe_event/", post(subscribe))
        .route("/api/c/compapi/v2/cc/unsubcribe_event/", post(unsubscribe))
        .route("/api/c/compapi/v2/cc/update_event_subscribe/", post(update))
        .route("/api/c/compapi/v2/cc/search_subscription/", post(search))
        .route("/api/c/compapi/v2/cc/testing_connection/", post(testing_connection))
}

type Body = Result<Bytes, BytesRejection>;

/// The request body as a JSON object, and the fields every ESB call carries.
struct EsbRequest {
    raw: Bytes,
    body: serde_json::Map<String, Value>,
    account: String,
    biz_id: i64,
}

fn parse(body: Body) -> Result<EsbRequest, Refusal> {
    let raw = read_body(body)?;
    let body: serde_json::Map<String, Value> = super::json_body(&raw)?;
    let account = match body.get("bk_supplier_account") {
        None | Some(Value::Null) => DEFAULT_SUPPLIER_ACCOUNT.to_string(),
        Some(Value::String(a)) if a.trim().is_empty() => DEFAULT_SUPPLIER_ACCOUNT.to_string(),
        Some(Value::String(a)) => a.trim().to_string(),
        Some(_) => {
            return Err(ApiError::new(ErrorCode::JsonDecode)
                .with_detail("bk_supplier_account must be a string")
                .into());
        }
    };
    let biz_id = match body.get("bk_biz_id") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => {
            n.as_i64().filter(|b| *b >= 0).ok_or_else(|| Refusal::from(ApiError::invalid("bk_biz_id")))?
        }
        Some(_) => return Err(ApiError::new(ErrorCode::JsonDecode).with_detail("bk_biz_id must be a number").into()),
    };
    Ok(EsbRequest { raw, body, account, biz_id })
}

impl EsbRequest {
    fn subscription_id(&self, code: ErrorCode) -> Result<i64, Refusal> {
        match self.body.get("subscription_id") {
            Some(Value::Number(n)) => {
                n.as_i64().ok_or_else(|| ApiError::new(code).with_detail("subscription_id must be an integer").into())
            }
            None | Some(Value::Null) => Err(ApiError::missing("subscription_id").into()),
            Some(_) => Err(ApiError::new(ErrorCode::JsonDecode).with_detail("subscription_id must be a number").into()),
        }
    }

    /// App credentials: the `X-Bkapi-Authorization` JSON header, else the body's keys.
    fn credentials(&self, headers: &HeaderMap) -> Option<AppCredentials> {
        let from_header: Option<serde_json::Map<String, Value>> =
            header(headers, "X-Bkapi-Authorization").and_then(|h| serde_json::from_str(h).ok());
        app_credentials(from_header.as_ref().unwrap_or(&self.body))
    }
}

/// The ESB caller: a configured app, or a Kubernetes bearer token.
async fn identify(
    services: &Services,
    call: &Call,
    request: &EsbRequest,
    headers: &HeaderMap,
) -> Result<Identity, Refusal> {
    match request.credentials(headers) {
        Some((app_code, app_secret, username)) => match services.auth.esb.verify(&app_code, &app_secret) {
            Some(app) => Ok(app.identity(username)),
            None => Err(AuthError::Unauthenticated.into()),
        },
        None => Ok(services.auth.bearer(call.authorization.as_deref()).await?),
    }
}

async fn answer<F, Fut>(state: &AppState, headers: HeaderMap, body: Body, operation: F) -> Response
where
    F: FnOnce(Arc<Services>, Identity, EsbRequest, Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Value, Refusal>>,
{
    let call = Call::from_headers(&headers);
    let result = async {
        let services = state.services()?;
        let request = parse(body)?;
        let identity = identify(&services, &call, &request, &headers).await?;
        let operator = call.user.clone().or_else(|| match &identity {
            Identity::EsbApp { username, .. } => username.clone(),
            _ => None,
        });
        operation(services, identity, request, operator).await
    }
    .await;
    let body = match result {
        Ok(data) => envelope::esb_ok(data, &call.request_id),
        Err(refusal) => envelope::esb_err(&refusal.error, call.lang, refusal.permission, &call.request_id),
    };
    call.direct(StatusCode::OK, body)
}

async fn subscribe(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(&state, headers, body, |services, identity, request, operator| async move {
        // Authorised before the subscription is parsed: parsing compiles a regular confirm_pattern.
        services.auth.authorize(&identity, &request.account, Action::Create).await?;
        let input = parse_subscription(&request.raw, &request.account, request.biz_id)?;
        let id = services.create(&identity, operator.as_deref(), input).await?;
        Ok(serde_json::json!({ "subscription_id": id }))
    })
    .await
}

async fn unsubscribe(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(&state, headers, body, |services, identity, request, _| async move {
        let id = request.subscription_id(ErrorCode::DeleteFailed)?;
        services.delete(&identity, &request.account, id).await?;
        Ok(Value::Null)
    })
    .await
}

async fn update(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(&state, headers, body, |services, identity, request, operator| async move {
        let id = request.subscription_id(ErrorCode::UpdateFailed)?;
        services.auth.authorize(&identity, &request.account, Action::Update).await?;
        let input = parse_subscription(&request.raw, &request.account, request.biz_id)?;
        services.update(&identity, operator.as_deref(), id, input).await?;
        Ok(Value::Null)
    })
    .await
}

async fn search(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    answer(&state, headers, body, |services, identity, request, _| async move {
        let parse = || SearchRequest::from_value(&Value::Object(request.body.clone()));
        services.search(&identity, &request.account, parse, Some(ESB_MAX_LIMIT)).await
    })
    .await
}

async fn testing_connection(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let timeout = state.config.api.probe_timeout();
    answer(&state, headers, body, |services, identity, request, _| async move {
        let target = parse_telnet(&request.raw)?;
        services.telnet(&identity, &request.account, target, timeout).await?;
        Ok(Value::from("success"))
    })
    .await
}
