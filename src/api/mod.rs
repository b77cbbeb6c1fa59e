//! The HTTP server: the bk-cmdb REST API (`cmdb`), its ESB gateway flavour (`esb`),
//! event publishing (`publish`), dead letters (`admin`), the delivery log (`deliveries`),
//! health, readiness and metrics.
//! Authentication and authorisation live in `auth`.

pub mod admin;
pub mod auth;
pub mod cmdb;
pub mod deliveries;
pub mod esb;
pub mod limits;
pub mod publish;
pub mod subscriptions;

use crate::compat::{ApiError, ErrorCode, Lang, envelope};
use crate::config::{Config, TlsConfig};
use crate::controller::Context as ControllerContext;
use crate::delivery::Delivery;
use crate::outbound::Outbound;
use crate::telemetry::Metrics;
use auth::{Action, Authenticator, Identity};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use limits::ServerLimits;

/// What the handlers need once herald is leader and its caches are synced.
pub struct Services {
    pub controller: Arc<ControllerContext>,
    pub delivery: Arc<Delivery>,
    pub outbound: Outbound,
    pub auth: Arc<Authenticator>,
    pub names: subscriptions::NameLocks,
}

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Leader, store open, caches synced.
    pub ready: AtomicBool,
    pub services: OnceLock<Arc<Services>>,
}

impl AppState {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(AppState { config, metrics, ready: AtomicBool::new(false), services: OnceLock::new() })
    }

    /// The services, or 503 while herald is not ready (not leader or starting).
    pub fn services(&self) -> Result<Arc<Services>, Refusal> {
        match self.services.get() {
            Some(services) if self.ready.load(Ordering::Acquire) => Ok(services.clone()),
            _ => Err(Refusal::unavailable("herald is not ready (starting, or not the leader)")),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    use limits::{BodyBound, Flavour, bounded_body};
    // Publish takes batches of events; every other body is a small request (or none).
    let api = &state.config.api;
    let (direct, esb) = (BodyBound::small(api, Flavour::Direct), BodyBound::small(api, Flavour::Esb));
    let mut own = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi));
    if state.config.metrics.listen.is_none() {
        own = own.route("/metrics", get(metrics));
    }
    Router::new()
        .merge(bounded_body(own, direct.clone()))
        .merge(bounded_body(cmdb::routes(), direct.clone()))
        .merge(bounded_body(esb::routes(), esb))
        .merge(bounded_body(publish::routes(), BodyBound::publish(api)))
        .merge(bounded_body(admin::routes(), direct.clone()))
        .merge(bounded_body(deliveries::routes(), direct))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// `/metrics` alone, for `metrics.listen`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    use limits::{BodyBound, Flavour, bounded_body};
    let direct = BodyBound::small(&state.config.api, Flavour::Direct);
    bounded_body(Router::new().route("/metrics", get(metrics)), direct)
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for leadership, the store or the caches")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if let Some(services) = state.services.get() {
        services.delivery.measure().await;
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
}

/// The committed OpenAPI document of every route (a test checks it lists them all).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn unknown_route(headers: HeaderMap) -> Response {
    let call = Call::from_headers(&headers);
    call.direct_error(StatusCode::NOT_FOUND, &ApiError::invalid("path"), None)
}

async fn wrong_method(headers: HeaderMap) -> Response {
    let call = Call::from_headers(&headers);
    call.direct_error(StatusCode::METHOD_NOT_ALLOWED, &ApiError::invalid("method"), None)
}

/// Looks a header up under its underscore and hyphen spellings (common proxies drop
/// underscored names, so clients may send either).
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    let hyphen = lower.replace('_', "-");
    [lower.as_str(), hyphen.as_str()]
        .into_iter()
        .find_map(|n| headers.get(n))
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

pub const REQUEST_ID_HEADER: &str = "Cc_Request_Id";

/// Per-request facts from the headers.
#[derive(Clone)]
pub struct Call {
    pub request_id: String,
    pub lang: Lang,
    /// `BK_User`.
    pub user: Option<String>,
    /// `HTTP_BK_SUPPLIER_ACCOUNT`, else `HTTP_BLUEKING_SUPPLIER_ID`.
    pub owner: Option<String>,
    pub authorization: Option<String>,
    /// ESB app credentials of `X-Bkapi-Authorization` (code, secret, username).
    pub app_credentials: Option<AppCredentials>,
}

/// An ESB app's `bk_app_code`, `bk_app_secret` and optional `bk_username`.
pub type AppCredentials = (String, String, Option<String>);

/// The app credentials in an ESB credentials object (the `X-Bkapi-Authorization` header,
/// or an ESB request's body).
pub fn app_credentials(source: &serde_json::Map<String, serde_json::Value>) -> Option<AppCredentials> {
    let text = |key: &str| source.get(key).and_then(serde_json::Value::as_str).filter(|v| !v.is_empty());
    Some((
        text("bk_app_code")?.to_string(),
        text("bk_app_secret")?.to_string(),
        text("bk_username").map(str::to_string),
    ))
}

impl Call {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let request_id = header(headers, REQUEST_ID_HEADER).map(str::to_string).unwrap_or_else(new_request_id);
        Call {
            request_id,
            lang: Lang::from_header(header(headers, "HTTP_BLUEKING_LANGUAGE")),
            user: header(headers, "BK_User").map(str::to_string),
            owner: header(headers, "HTTP_BK_SUPPLIER_ACCOUNT")
                .or_else(|| header(headers, "HTTP_BLUEKING_SUPPLIER_ID"))
                .map(str::to_string),
            authorization: headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            app_credentials: header(headers, "X-Bkapi-Authorization")
                .and_then(|h| serde_json::from_str(h).ok())
                .and_then(|object| app_credentials(&object)),
        }
    }

    /// Who is calling: the ESB app of `X-Bkapi-Authorization`, else the bearer token's
    /// user (or anonymous, when allowed).
    pub async fn identity(&self, auth: &auth::Authenticator) -> Result<auth::Identity, auth::AuthError> {
        match &self.app_credentials {
            Some((code, secret, username)) => auth
                .esb
                .verify(code, secret)
                .map(|app| app.identity(username.clone()))
                .ok_or(auth::AuthError::Unauthenticated),
            None => auth.bearer(self.authorization.as_deref()).await,
        }
    }

    /// A direct-path answer with the request id echoed.
    pub fn direct(&self, status: StatusCode, body: serde_json::Value) -> Response {
        let mut response = (status, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            response.headers_mut().insert(HeaderName::from_static("cc_request_id"), value);
        }
        response
    }

    pub fn direct_ok(&self, data: serde_json::Value) -> Response {
        self.direct(StatusCode::OK, envelope::direct_ok(data))
    }

    pub fn direct_error(
        &self,
        status: StatusCode,
        error: &ApiError,
        permission: Option<serde_json::Value>,
    ) -> Response {
        self.direct(status, envelope::direct_err(error, self.lang, permission))
    }

    /// A direct-path answer: `data` in the envelope, or the refusal.
    pub fn answer(&self, result: Result<serde_json::Value, Refusal>) -> Response {
        match result {
            Ok(data) => self.direct_ok(data),
            Err(refusal) => self.refuse(refusal),
        }
    }

    pub fn refuse(&self, refusal: Refusal) -> Response {
        let status = refusal.status.unwrap_or_else(|| {
            StatusCode::from_u16(refusal.error.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST)
        });
        let mut response = self.direct_error(status, &refusal.error, refusal.permission);
        if let Some(seconds) = refusal.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn new_request_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// An error answer: the bk-cmdb error, and an HTTP status when it differs from the
/// code's usual one.
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub status: Option<StatusCode>,
    pub permission: Option<serde_json::Value>,
    pub retry_after: Option<u64>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Refusal { error, status: None, permission: None, retry_after: None }
    }
}

impl Refusal {
    pub fn unavailable(detail: &str) -> Self {
        Refusal {
            error: ApiError::new(ErrorCode::Internal).with_detail(detail),
            status: Some(StatusCode::SERVICE_UNAVAILABLE),
            permission: None,
            retry_after: Some(1),
        }
    }
}

impl From<auth::AuthError> for Refusal {
    fn from(error: auth::AuthError) -> Self {
        // Reviews are bounded in flight: a caller that found no turn retries shortly.
        if error.is_busy() {
            return Refusal::unavailable(&error.to_string());
        }
        let (error, permission) = error.to_api();
        Refusal { error, status: None, permission, retry_after: None }
    }
}

/// Authenticates the caller's bearer token and authorises `action` on `account`.
pub async fn authorize(services: &Services, call: &Call, account: &str, action: Action) -> Result<Identity, Refusal> {
    let identity = call.identity(&services.auth).await?;
    services.auth.authorize(&identity, account, action).await?;
    Ok(identity)
}

/// `Path`, answering a segment that does not decode (bad percent-encoding) in bk-cmdb's
/// envelope, 1199006 naming `path`, instead of axum's plain-text rejection.
pub struct CmdbPath<T>(pub T);

/// `Query`, answering a malformed query string (`?limit=abc`) in bk-cmdb's envelope,
/// 1199006 naming the query, instead of axum's plain-text rejection.
pub struct CmdbQuery<T>(pub T);

fn malformed(parts: &axum::http::request::Parts, what: &str, reason: impl std::fmt::Display) -> Response {
    Call::from_headers(&parts.headers).direct_error(
        StatusCode::BAD_REQUEST,
        &ApiError::invalid_because(what, reason),
        None,
    )
}

impl<T, S> axum::extract::FromRequestParts<S> for CmdbPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(CmdbPath(value)),
            Err(rejection) => Err(malformed(parts, "path", rejection.body_text())),
        }
    }
}

impl<T, S> axum::extract::FromRequestParts<S> for CmdbQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(CmdbQuery(value)),
            Err(rejection) => Err(malformed(parts, "query", rejection.body_text())),
        }
    }
}

/// Parses a JSON body, answering 1199000 for anything that is not the expected shape.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refusal> {
    serde_json::from_slice(body)
        .map_err(|e| Refusal::from(ApiError::new(ErrorCode::JsonDecode).with_detail(e.to_string())))
}

/// How long in-flight requests may take to finish after shutdown begins.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves HTTP/1.1 (HTTPS when `tls` is set) within `limits` (see `limits`) until
/// `shutdown` is cancelled, then lets in-flight requests finish for up to 10 s.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsConfig>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Loaded first: a bad certificate fails the start, not the first handshake.
    let tls = match tls {
        Some(tls) => Some(limits::tls_config(&tls).await?),
        None => None,
    };
    let service = limits::server_wide(router, &limits).into_make_service();
    let handle = axum_server::Handle::<limits::SlotAddr>::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopper.graceful_shutdown(Some(DRAIN));
    });
    let mut server =
        axum_server::Server::from_listener(limits::SlotListener::new(listener, &limits)).http1_only().handle(handle);
    server.http_builder().http1().header_read_timeout(limits.header_read_timeout);
    match tls {
        None => server.serve(service).await,
        Some(config) => {
            let acceptor =
                axum_server::tls_rustls::RustlsAcceptor::new(config).handshake_timeout(limits.header_read_timeout);
            server.acceptor(acceptor).serve(service).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The router on a loopback port, as `herald run` serves it before it is ready.
    async fn serve_unready() -> String {
        let config = Config::default();
        let limits = ServerLimits::from_config(&config.api);
        let state = AppState::new(Arc::new(config), Arc::new(Metrics::new(false)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, router(state), None, limits, CancellationToken::new()));
        url
    }

    #[tokio::test]
    async fn with_metrics_listen_the_metrics_leave_the_api_port_for_their_own() {
        let mut config = Config::default();
        config.metrics.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let limits = ServerLimits::from_config(&config.api);
        let state = AppState::new(Arc::new(config), Arc::new(Metrics::new(false)));
        let (api, own) =
            (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
        let (api_url, own_url) =
            (format!("http://{}", api.local_addr().unwrap()), format!("http://{}", own.local_addr().unwrap()));
        tokio::spawn(serve(api, router(state.clone()), None, limits, CancellationToken::new()));
        tokio::spawn(serve(own, metrics_router(state), None, limits, CancellationToken::new()));
        assert_eq!(reqwest::get(format!("{api_url}/metrics")).await.unwrap().status(), 404);
        assert_eq!(reqwest::get(format!("{api_url}/healthz")).await.unwrap().status(), 200);
        let metrics = reqwest::get(format!("{own_url}/metrics")).await.unwrap();
        assert_eq!(metrics.status(), 200);
        assert!(metrics.text().await.unwrap().contains("# EOF"));
        assert_eq!(reqwest::get(format!("{own_url}/healthz")).await.unwrap().status(), 404, "metrics only");
    }

    #[tokio::test]
    async fn malformed_paths_and_queries_answer_in_the_envelope() {
        let url = serve_unready().await;
        let http = reqwest::Client::new();
        let cases = [
            (http.get(format!("{url}/api/v3/herald/dead_letters/1?limit=abc")), "query"),
            (http.post(format!("{url}/api/v3/event/subscribe/%FF/0")).body("{}"), "path"),
            (http.delete(format!("{url}/api/v3/event/subscribe/0/0/%C0")), "path"),
        ];
        for (request, named) in cases {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 400);
            let body: serde_json::Value = response.json().await.expect("a JSON envelope, not plain text");
            assert_eq!(body["bk_error_code"], 1_199_006, "{body}");
            assert_eq!(body["result"], false);
            assert!(body["bk_error_msg"].as_str().unwrap().contains(named), "{body}");
        }
    }
}
