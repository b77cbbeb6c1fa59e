//! The web console at `/console/`: the event push page bk-cmdb ≤ 3.9 had (docs/console.md).
//! One page of HTML, CSS and plain JavaScript compiled into the binary (nothing from a CDN,
//! no build step) that signs in for a session (`session`) and then calls herald's REST API
//! with it, so the console can do exactly what the REST API lets its user do. Besides the
//! session endpoints the console adds one read, its subscription list (and one row of it):
//! the REST search record with what the list shows beyond it (namespace, conditions, queue
//! counters).

pub mod session;

use crate::api::auth::Identity;
use crate::api::{AppState, Call, Refusal, json_body};
use crate::compat::subscription_record::subscription_record;
use crate::compat::time::format_cmdb;
use crate::compat::{ApiError, ErrorCode};
use crate::crd::EventSubscription;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use kube::ResourceExt;
use serde_json::{Value, json};
use session::{CSRF_HEADER, Credential, Sessions};
use std::sync::Arc;

/// What the console's handlers share: the API's state and the open sessions.
pub struct Console {
    app: Arc<AppState>,
    sessions: Sessions,
}

/// `api` with the console's routes, and the session bridge in front of both.
pub fn with_console(app: Arc<AppState>, api: Router) -> Router {
    let console = Arc::new(Console { app, sessions: Sessions::default() });
    api.merge(routes().with_state(console.clone())).layer(axum::middleware::from_fn_with_state(console, bridge))
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/console/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/console/session", get(whoami).post(sign_in).delete(sign_out))
        .route("/console/subscriptions/{account}", get(list))
        .route("/console/subscriptions/{account}/{id}", get(one))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (CONTENT_TYPE, content_type),
        (CACHE_CONTROL, "no-cache"),
        // Everything the page loads is its own; no inline script, no framing.
        (
            axum::http::header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, body).into_response()
}

/// Middleware on every route: a request with a live session's cookie and no credentials of
/// its own acts with the session's credential. A change (any method but GET and HEAD) must
/// then carry the session's CSRF token in `X-CSRF-Token`, except signing in again.
async fn bridge(State(console): State<Arc<Console>>, mut request: Request, next: Next) -> Response {
    let session = session::cookie_value(request.headers()).and_then(|id| console.sessions.get(id));
    // Signing in presents its own credential, never the session's.
    let signing_in = request.method() == Method::POST && request.uri().path() == "/console/session";
    if let Some(session) = session
        && !signing_in
        && !request.headers().contains_key(AUTHORIZATION)
    {
        let safe = matches!(*request.method(), Method::GET | Method::HEAD);
        let token = request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !safe && token != Some(session.csrf.as_str()) {
            let refusal =
                ApiError::new(ErrorCode::NoPermission).with_detail("the console's CSRF token is missing or wrong");
            return Call::from_headers(request.headers()).refuse(refusal.into());
        }
        let presented = match &session.credential {
            Credential::Bearer(token) => Some((AUTHORIZATION, format!("Bearer {token}"))),
            Credential::App { code, secret } if !request.headers().contains_key(APP_HEADER) => {
                Some((APP_HEADER, json!({"bk_app_code": code, "bk_app_secret": secret}).to_string()))
            }
            Credential::App { .. } | Credential::Anonymous => None,
        };
        if let Some((name, value)) = presented
            && let Ok(value) = HeaderValue::from_str(&value)
        {
            request.headers_mut().insert(name, value);
        }
    }
    next.run(request).await
}

/// The header ESB app credentials travel in.
const APP_HEADER: axum::http::HeaderName = axum::http::HeaderName::from_static("x-bkapi-authorization");

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    /// A Kubernetes token; empty, and no app code, for the anonymous development switch.
    #[serde(default)]
    token: String,
    /// ESB app credentials instead of a token.
    #[serde(default)]
    app_code: String,
    #[serde(default)]
    app_secret: String,
}

/// The session cookie, `Secure` when herald serves TLS or a proxy in front of it says the
/// browser's request was HTTPS (trusting that header can only make the cookie stricter).
fn session_cookie(console: &Console, headers: &HeaderMap, value: &str, max_age: u64) -> Option<HeaderValue> {
    let proxied_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    let secure = if console.app.config.api.tls.is_some() || proxied_https { "; Secure" } else { "" };
    let cookie = format!("{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}", session::COOKIE);
    HeaderValue::from_str(&cookie).ok()
}

/// `POST /console/session {"token": "..."}` (or `{"app_code", "app_secret"}`): the
/// credential is reviewed as the REST API reviews it; the answer sets the session cookie
/// (ending the one the request came with) and carries the CSRF token. Only a JSON body is
/// taken, which a cross-site form cannot send: no other site can sign a browser in.
async fn sign_in(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let call = Call::from_headers(&headers);
    let result = async {
        let json =
            headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(ApiError::new(ErrorCode::JsonDecode).with_detail("a sign-in is application/json").into());
        }
        let services = console.app.services()?;
        let request: SignIn = json_body(&crate::api::publish::read_body(body)?)?;
        let (token, code) = (request.token.trim(), request.app_code.trim());
        let credential = match (token.is_empty(), code.is_empty()) {
            (_, false) => Credential::App { code: code.to_string(), secret: request.app_secret },
            (false, true) => Credential::Bearer(token.to_string()),
            (true, true) => Credential::Anonymous,
        };
        // Reviewed exactly as a REST call presenting the same credential.
        let (authorization, app_credentials) = match &credential {
            Credential::Bearer(token) => (Some(format!("Bearer {token}")), None),
            Credential::App { code, secret } => (None, Some((code.clone(), secret.clone(), None))),
            Credential::Anonymous => (None, None),
        };
        let call = Call { authorization, app_credentials, ..call.clone() };
        let identity = call.identity(&services.auth).await?;
        let user = identity.name();
        let (id, csrf) = console
            .sessions
            .open(credential, user.clone())
            .map_err(|e| Refusal::from(ApiError::new(ErrorCode::Internal).with_detail(e.to_string())))?;
        Ok::<_, Refusal>((id, csrf, user, identity))
    }
    .await;
    match result {
        Ok((id, csrf, user, identity)) => {
            let anonymous = identity == Identity::Anonymous;
            if let Some(previous) = session::cookie_value(&headers) {
                console.sessions.close(previous);
            }
            let mut response = call.direct_ok(json!({"user": user, "csrf": csrf, "anonymous": anonymous}));
            // The browser keeps it for the session's lifetime; herald ends it sooner when idle.
            if let Some(cookie) = session_cookie(&console, &headers, &id, session::LIFETIME.as_secs()) {
                response.headers_mut().insert(SET_COOKIE, cookie);
            }
            response
        }
        Err(refusal) => call.refuse(refusal),
    }
}

/// `GET /console/session`: who the cookie's session is, and its CSRF token (a reloaded
/// page has lost it); `user` null without a live session.
async fn whoami(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let call = Call::from_headers(&headers);
    match session::cookie_value(&headers).and_then(|id| console.sessions.get(id)) {
        Some(session) => call.direct_ok(json!({"user": session.user, "csrf": session.csrf})),
        None => call.direct_ok(json!({"user": null, "csrf": null})),
    }
}

/// `DELETE /console/session`: ends the session (its CSRF token checked by `bridge`).
async fn sign_out(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_value(&headers) {
        console.sessions.close(id);
    }
    let mut response = Call::from_headers(&headers).direct_ok(json!({}));
    if let Some(cookie) = session_cookie(&console, &headers, "", 0) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    response
}

/// `GET /console/subscriptions/{account}`: the account's subscriptions in id order, each
/// its REST search record and what the console list shows beyond it; exactly those a
/// search by the same caller finds.
async fn list(State(console): State<Arc<Console>>, headers: HeaderMap, Path(account): Path<String>) -> Response {
    let call = Call::from_headers(&headers);
    let result = async {
        let services = console.app.services()?;
        let identity = call.identity(&services.auth).await?;
        let visible = services.visible_subscriptions(&identity, &account).await?;
        let rows: Vec<Value> = visible.iter().map(|sub| row(&console.app, sub)).collect();
        Ok::<_, Refusal>(json!({"count": rows.len(), "info": rows}))
    }
    .await;
    call.answer(result)
}

/// `GET /console/subscriptions/{account}/{id}`: one row of that list, for the detail and
/// edit pages (1199006 when the caller's search would not show it).
async fn one(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Path((account, id)): Path<(String, i64)>,
) -> Response {
    let call = Call::from_headers(&headers);
    let result = async {
        let services = console.app.services()?;
        let identity = call.identity(&services.auth).await?;
        match services.visible_subscription(&identity, &account, id).await? {
            Some(sub) => Ok(row(&console.app, &sub)),
            None => Err(ApiError::invalid_because("subscription_id", format!("{id} not found")).into()),
        }
    }
    .await;
    call.answer(result)
}

fn row(state: &AppState, sub: &EventSubscription) -> Value {
    let tz = &state.config.time_zone;
    let mut record = subscription_record(sub, tz);
    let status = sub.status.clone().unwrap_or_default();
    let statistics = status.statistics.clone().unwrap_or_default();
    let time = |rfc3339: &Option<String>| {
        rfc3339.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(|t| format_cmdb(t, tz))
    };
    let conditions: Vec<Value> = status
        .conditions
        .iter()
        .map(|c| {
            json!({"type": c.type_, "status": c.status, "reason": c.reason, "message": c.message,
                   "observed_generation": c.observed_generation})
        })
        .collect();
    if let Some(fields) = record.as_object_mut() {
        fields.insert("namespace".into(), sub.namespace().unwrap_or_default().into());
        fields.insert("name".into(), sub.name_any().into());
        fields.insert("generation".into(), sub.metadata.generation.into());
        fields.insert("conditions".into(), conditions.into());
        fields.insert("delivered".into(), statistics.delivered.into());
        fields.insert("pending".into(), statistics.pending.into());
        fields.insert("dead_lettered".into(), statistics.dead_lettered.into());
        fields.insert("last_delivery".into(), time(&statistics.last_delivery_time).into());
        fields.insert("last_error".into(), statistics.last_error.into());
    }
    record
}
