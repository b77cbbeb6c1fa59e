//! The web console at `/console/`: the event push page bk-cmdb ≤ 3.9 had (docs/console.md).
//! One page of HTML, CSS and plain JavaScript compiled into the binary (nothing from a CDN,
//! no build step) that signs in for a session (`session`) and then calls herald's REST API
//! with it, so the console can do exactly what the REST API lets its user do. The session
//! keeps no token or app secret in the clear (`session` has how). Besides the
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
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use kube::ResourceExt;
use serde_json::{Value, json};
use session::{CSRF_HEADER, Credential, Live, Sessions};
use std::sync::Arc;

/// What the console's handlers share: the API's state and the open sessions.
pub struct Console {
    app: Arc<AppState>,
    sessions: Sessions,
}

/// `api` with the console's routes, and the session bridge in front of both.
pub fn with_console(app: Arc<AppState>, api: Router) -> Router {
    wire(Arc::new(Console { app, sessions: Sessions::default() }), api)
}

fn wire(console: Arc<Console>, api: Router) -> Router {
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
    let cookie = session::cookie_value(request.headers(), https(&console, request.headers())).map(str::to_owned);
    let session = cookie.as_deref().and_then(|cookie| console.sessions.get(cookie));
    // Signing in presents its own credential, never the session's.
    let signing_in = request.method() == Method::POST && request.uri().path() == "/console/session";
    if let Some(session) = session
        && !signing_in
        && !request.headers().contains_key(AUTHORIZATION)
    {
        let safe = matches!(*request.method(), Method::GET | Method::HEAD);
        if !safe && !session.csrf_matches(request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok())) {
            let refusal =
                ApiError::new(ErrorCode::NoPermission).with_detail("the console's CSRF token is missing or wrong");
            return Call::from_headers(request.headers()).refuse(refusal.into());
        }
        match presented(&console, &session, request.headers()) {
            Presented::Header(name, value) => {
                request.headers_mut().insert(name, value);
            }
            Presented::Nothing => {}
            // The request goes on as one without a cookie would.
            Presented::Ended(why) => {
                tracing::info!(user = %session.user, why, "a console session ended");
                if let Some(cookie) = &cookie {
                    console.sessions.close(cookie);
                }
            }
        }
    }
    next.run(request).await
}

/// How a request presents its session's credential to the REST API, which authenticates
/// every request from its headers alone.
enum Presented {
    Header(HeaderName, HeaderValue),
    /// Anonymous; the request's own app credentials; or herald is not ready, and the
    /// API answers 503 whatever is presented.
    Nothing,
    /// The credential can no longer be presented: the session ends.
    Ended(&'static str),
}

fn presented(console: &Console, session: &Live, headers: &HeaderMap) -> Presented {
    let value = match session.credential() {
        Ok(Credential::Token(token)) => match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(value) => (AUTHORIZATION, value),
            Err(_) => return Presented::Ended("its token is no header value"),
        },
        Ok(Credential::App(_)) if headers.contains_key(APP_HEADER) => return Presented::Nothing,
        Ok(Credential::App(identity)) => {
            let Ok(services) = console.app.services() else { return Presented::Nothing };
            match app_credentials(&services.auth.esb, &identity) {
                Some(value) => (APP_HEADER, value),
                None => return Presented::Ended("its ESB app is no longer configured with the same accounts"),
            }
        }
        Ok(Credential::Anonymous) => return Presented::Nothing,
        Err(_) => return Presented::Ended("its token does not unseal"),
    };
    let (name, mut value) = value;
    // Kept out of any Debug print of the request.
    value.set_sensitive(true);
    Presented::Header(name, value)
}

/// `X-Bkapi-Authorization` for an app session: the configured secret of the app entry that
/// gives `identity` (its code and accounts), the one the session signed in with or its
/// rotated successor; none once no entry does.
fn app_credentials(apps: &crate::api::auth::EsbApps, identity: &Identity) -> Option<HeaderValue> {
    let app = apps.apps.iter().find(|app| app.identity(None) == *identity)?;
    let credentials = json!({"bk_app_code": app.app_code, "bk_app_secret": app.app_secret});
    HeaderValue::from_str(&credentials.to_string()).ok()
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

/// Whether the browser's request came over HTTPS: herald serves TLS, or a proxy in front of
/// it says so (`X-Forwarded-Proto: https`, a TLS-terminating ingress). It decides the
/// session cookie's name and `Secure` (`session::COOKIE_HTTPS` has why). Trusting the header
/// can only make the cookie stricter: a browser that in fact spoke plain HTTP drops a
/// `Secure` cookie, and then has no session at all.
fn https(console: &Console, headers: &HeaderMap) -> bool {
    let proxied_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    console.app.config.api.tls.is_some() || proxied_https
}

fn session_cookie(console: &Console, headers: &HeaderMap, value: &str, max_age: u64) -> Option<HeaderValue> {
    HeaderValue::from_str(&session::set_cookie(https(console, headers), value, max_age)).ok()
}

/// What a session keeps to act as `identity`: a Kubernetes user's token (sealed by
/// `Sessions::open`), since the REST API reviews it on every request; an ESB app's
/// verified identity, never its secret; nothing for the anonymous switch, even when a
/// token was given (with Kubernetes authentication off it identifies no one).
fn credential_for(identity: &Identity, token: &str) -> Credential {
    match identity {
        Identity::Kubernetes { .. } => Credential::Token(token.to_string()),
        Identity::EsbApp { .. } => Credential::App(identity.clone()),
        Identity::Anonymous => Credential::Anonymous,
    }
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
        // Reviewed exactly as a REST call presenting the same credential.
        let (authorization, app_credentials) = match (token.is_empty(), code.is_empty()) {
            (_, false) => (None, Some((code.to_string(), request.app_secret, None))),
            (false, true) => (Some(format!("Bearer {token}")), None),
            (true, true) => (None, None),
        };
        let call = Call { authorization, app_credentials, ..call.clone() };
        let identity = call.identity(&services.auth).await?;
        let user = identity.name();
        let (id, csrf) = console
            .sessions
            .open(credential_for(&identity, token), user.clone())
            .map_err(|e| Refusal::from(ApiError::new(ErrorCode::Internal).with_detail(e.to_string())))?;
        Ok::<_, Refusal>((id, csrf, user, identity))
    }
    .await;
    match result {
        Ok((id, csrf, user, identity)) => {
            let anonymous = identity == Identity::Anonymous;
            if let Some(previous) = session::cookie_value(&headers, https(&console, &headers)) {
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
    match session::cookie_value(&headers, https(&console, &headers)).and_then(|id| console.sessions.get(id)) {
        Some(session) => call.direct_ok(json!({"user": session.user, "csrf": session.csrf})),
        None => call.direct_ok(json!({"user": null, "csrf": null})),
    }
}

/// `DELETE /console/session`: ends the session (its CSRF token checked by `bridge`).
async fn sign_out(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(id) = session::cookie_value(&headers, https(&console, &headers)) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;
    use crate::telemetry::Metrics;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWFsaWNl";

    /// The console's routes and bridge in front of `/echo`, which answers with the
    /// credentials a request reached the API with; herald not ready (no services).
    async fn serve() -> (Arc<Console>, String) {
        let app = AppState::new(Arc::new(Config::default()), Arc::new(Metrics::new(false)));
        let console = Arc::new(Console { app, sessions: Sessions::default() });
        let echo = |headers: HeaderMap| async move {
            let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            format!("{}|{}", text(&AUTHORIZATION), text(&APP_HEADER))
        };
        let api = Router::new().route("/echo", get(echo).post(echo));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(axum::serve(listener, wire(console.clone(), api)).into_future());
        (console, url)
    }

    async fn send(request: reqwest::RequestBuilder) -> (u16, String) {
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    #[tokio::test]
    async fn a_token_session_presents_its_unsealed_token_with_its_csrf_token_on_changes() {
        let (console, url) = serve().await;
        let (cookie, csrf) = console.sessions.open(Credential::Token(TOKEN.into()), "alice".into()).unwrap();
        let http = reqwest::Client::new();
        let plain = format!("{}={cookie}", session::COOKIE_HTTP);
        let echo = format!("{url}/echo");
        let (status, seen) = send(http.get(&echo).header("Cookie", &plain)).await;
        assert_eq!((status, seen.as_str()), (200, format!("Bearer {TOKEN}|").as_str()));
        let (status, _) = send(http.post(&echo).header("Cookie", &plain)).await;
        assert_eq!(status, 403, "a change without the CSRF token");
        let (status, _) = send(http.post(&echo).header("Cookie", &plain).header(CSRF_HEADER, "guess")).await;
        assert_eq!(status, 403, "a change with a wrong CSRF token");
        let (status, seen) = send(http.post(&echo).header("Cookie", &plain).header(CSRF_HEADER, &csrf)).await;
        assert_eq!((status, seen.as_str()), (200, format!("Bearer {TOKEN}|").as_str()));
        // A request's own credentials win.
        let (_, seen) = send(http.get(&echo).header("Cookie", &plain).header("Authorization", "Bearer mine")).await;
        assert_eq!(seen, "Bearer mine|");
    }

    #[tokio::test]
    async fn over_https_only_the_host_prefixed_cookie_is_read_and_sign_out_clears_it() {
        let (console, url) = serve().await;
        let (cookie, csrf) = console.sessions.open(Credential::Token(TOKEN.into()), "alice".into()).unwrap();
        let http = reqwest::Client::new();
        let proxied = |request: reqwest::RequestBuilder| request.header("X-Forwarded-Proto", "https");
        let echo = format!("{url}/echo");
        let planted = format!("{}={cookie}", session::COOKIE_HTTP);
        let (_, seen) = send(proxied(http.get(&echo)).header("Cookie", &planted)).await;
        assert_eq!(seen, "|", "a plain-named cookie is not read over HTTPS");
        let host = format!("{}={cookie}", session::COOKIE_HTTPS);
        let (_, seen) = send(proxied(http.get(&echo)).header("Cookie", &host)).await;
        assert_eq!(seen, format!("Bearer {TOKEN}|"));

        let signed_out = proxied(http.delete(format!("{url}/console/session")))
            .header("Cookie", &host)
            .header(CSRF_HEADER, &csrf)
            .send()
            .await
            .unwrap();
        assert_eq!(signed_out.status(), 200);
        let set_cookie = signed_out.headers()[SET_COOKIE].to_str().unwrap().to_string();
        assert!(set_cookie.starts_with("__Host-herald-session=;"), "{set_cookie}");
        for attribute in ["; Secure", "; HttpOnly", "; SameSite=Strict", "; Path=/", "; Max-Age=0"] {
            assert!(set_cookie.contains(attribute), "{attribute} in {set_cookie}");
        }
        assert!(!set_cookie.to_ascii_lowercase().contains("domain"), "{set_cookie}");
        assert!(console.sessions.get(&cookie).is_none(), "signed out");
        let (_, seen) = send(proxied(http.get(&echo)).header("Cookie", &host)).await;
        assert_eq!(seen, "|");
    }

    #[tokio::test]
    async fn an_app_session_presents_nothing_while_herald_is_not_ready() {
        let (console, url) = serve().await;
        let app = Identity::EsbApp { app_code: "cmdb".into(), username: None, accounts: vec!["0".into()] };
        let (cookie, _) = console.sessions.open(credential_for(&app, ""), "cmdb".into()).unwrap();
        let cookie = format!("{}={cookie}", session::COOKIE_HTTP);
        let (status, seen) = send(reqwest::Client::new().get(format!("{url}/echo")).header("Cookie", cookie)).await;
        assert_eq!((status, seen.as_str()), (200, "|"), "the API answers 503 itself");
    }

    #[test]
    fn an_app_session_presents_the_configured_secret_of_its_identity() {
        let yaml = "apps:\n- appCode: cmdb\n  appSecret: old\n  accounts: ['0']\n- appCode: cmdb\n  appSecret: new\n  accounts: ['7']\n";
        let apps = crate::api::auth::EsbApps::from_yaml(yaml).unwrap();
        let identity = |accounts: &[&str]| Identity::EsbApp {
            app_code: "cmdb".into(),
            username: None,
            accounts: accounts.iter().map(ToString::to_string).collect(),
        };
        let presented = app_credentials(&apps, &identity(&["7"])).unwrap();
        let presented: Value = serde_json::from_slice(presented.as_bytes()).unwrap();
        assert_eq!(presented, json!({"bk_app_code": "cmdb", "bk_app_secret": "new"}), "the entry of its accounts");
        assert!(app_credentials(&apps, &identity(&["0", "7"])).is_none(), "no entry gives these accounts");
        let rotated =
            crate::api::auth::EsbApps::from_yaml("apps:\n- appCode: cmdb\n  appSecret: newer\n  accounts: ['7']\n")
                .unwrap();
        let presented = app_credentials(&rotated, &identity(&["7"])).unwrap();
        assert!(presented.to_str().unwrap().contains("newer"), "a rotated secret keeps the session");
    }

    #[test]
    fn a_sign_in_keeps_a_token_only_for_a_kubernetes_identity_and_never_an_app_secret() {
        let alice = Identity::Kubernetes {
            username: "alice".into(),
            uid: None,
            groups: vec![],
            extra: std::collections::BTreeMap::new(),
        };
        assert_eq!(credential_for(&alice, TOKEN), Credential::Token(TOKEN.into()));
        assert_eq!(credential_for(&Identity::Anonymous, TOKEN), Credential::Anonymous, "no token kept");
        let app = Identity::EsbApp { app_code: "cmdb".into(), username: None, accounts: vec!["0".into()] };
        let kept = credential_for(&app, "");
        assert_eq!(kept, Credential::App(app));
        let sessions = Sessions::default();
        sessions.open(kept, "cmdb".into()).unwrap();
        let printed = format!("{sessions:?}");
        assert!(printed.contains("cmdb") && !printed.contains("secret"), "{printed}");
    }
}
