//! What one client may cost the HTTP server, so that going slowly or sending much holds
//! neither herald's connections nor its memory:
//! - at most `maxConnections` connections are served at once; further ones are not
//!   accepted but wait in the kernel's listen backlog until a connection closes;
//! - a request's headers, and a TLS handshake, must arrive within
//!   `headerReadTimeoutSeconds` (hyper's timer, which also closes a kept-alive connection
//!   idle that long), else the connection is closed;
//! - a request's body must arrive within `bodyReadTimeoutSeconds` of its headers, else
//!   408 / 1199000 and the connection is closed;
//! - a response write that makes no progress for `writeTimeoutSeconds` closes the
//!   connection (a client that stops reading);
//! - bodies: publish takes up to `maxBodyBytes`, every other route up to
//!   `maxBodyBytesExceptPublish`; larger ones answer 413 / 1199000. An oversize body is
//!   read and discarded up to `maxBodyBytes` in all, so that a client still sending it
//!   reads the answer instead of a reset; one declared or found larger than that is not
//!   read further and the connection is closed.
//!
//! The server speaks HTTP/1.1 only: hyper's HTTP/2 server has no header or idle timeout,
//! so one idle HTTP/2 connection would hold a connection slot for ever.

use super::Call;
use crate::compat::{ApiError, ErrorCode, envelope};
use crate::config::{ApiConfig, TlsConfig};
use crate::outbound::body::{ByteBudget, HeldBytes};
use axum::Router;
use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::BytesMut;
use futures::{Stream, StreamExt};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// What one connection and one request may take (from `api` in the configuration; tests
/// build their own with short timeouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_connections: usize,
    /// Also bounds the TLS handshake.
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub write_timeout: Duration,
    /// The body limit of routes that set none (the console).
    pub default_body_bytes: usize,
}

impl ServerLimits {
    pub fn from_config(api: &ApiConfig) -> Self {
        // Zero would serve nothing or time out at once: at least one connection, one second.
        let seconds = |value: u64| Duration::from_secs(value.max(1));
        ServerLimits {
            max_connections: api.max_connections.max(1),
            header_read_timeout: seconds(api.header_read_timeout_seconds),
            body_read_timeout: seconds(api.body_read_timeout_seconds),
            write_timeout: seconds(api.write_timeout_seconds),
            default_body_bytes: small_body_bytes(api),
        }
    }
}

/// The body limit of every route but publish.
pub fn small_body_bytes(api: &ApiConfig) -> usize {
    api.max_body_bytes_except_publish.min(api.max_body_bytes)
}

/// Why a request body was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body could not be read: {0}")]
    Read(#[source] axum::Error),
    /// Bodies being handled hold the whole budget: retry shortly.
    #[error("herald holds {0} bytes of request bodies already; retry shortly")]
    Busy(usize),
}

impl BodyError {
    fn status(&self) -> StatusCode {
        match self {
            BodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
            BodyError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The envelope a route answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Direct,
    /// HTTP 200 and the ESB envelope, whatever the outcome (as the ESB gateway answers).
    Esb,
}

/// The body limit of a group of routes and the envelope they answer in.
#[derive(Clone, Debug)]
pub struct BodyBound {
    bytes: usize,
    /// Most bytes of an oversize body read (and discarded) before the refusal.
    discard: usize,
    flavour: Flavour,
    /// Bytes all bodies of these routes hold at once, until their handler is done.
    budget: Option<ByteBudget>,
}

impl BodyBound {
    /// Publish: batches of events, up to `maxBodyBytes`.
    /// Read before the caller is authorised, so held within `api.publishBufferBytes`.
    pub fn publish(api: &ApiConfig) -> Self {
        let budget = ByteBudget::new(api.publish_buffer_bytes.max(api.max_body_bytes));
        BodyBound {
            bytes: api.max_body_bytes,
            discard: api.max_body_bytes,
            flavour: Flavour::Direct,
            budget: Some(budget),
        }
    }

    /// Every other route.
    pub fn small(api: &ApiConfig, flavour: Flavour) -> Self {
        let bytes = small_body_bytes(api);
        BodyBound { bytes, discard: api.max_body_bytes.max(bytes), flavour, budget: None }
    }
}

/// `routes` with their bodies read whole, within `bound`, before the handler runs: a larger
/// or late body is refused in the routes' envelope with 1199000. A route layer, so unknown
/// paths and wrong methods keep their own answers.
pub fn bounded_body<S>(routes: Router<S>, bound: BodyBound) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let bytes = bound.bytes;
    routes
        .route_layer(axum::middleware::from_fn_with_state(bound, read_whole))
        // The handlers' own extractors then take what was read (a route's limit replaces
        // the server-wide one).
        .route_layer(DefaultBodyLimit::max(bytes))
}

async fn read_whole(State(bound): State<BodyBound>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match collect(body, &parts.headers, &bound).await {
        Ok((whole, _held)) => next.run(Request::from_parts(parts, Body::from(whole))).await,
        Err(error) => refuse(&parts.headers, bound.flavour, &error),
    }
}

/// The body, and the budget bytes it holds (given back when dropped, after the handler).
async fn collect(body: Body, headers: &HeaderMap, bound: &BodyBound) -> Result<(Bytes, HeldBytes), BodyError> {
    let too_large = BodyError::TooLarge(bound.bytes);
    // A declared length past what would be discarded is refused before a byte is read.
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > bound.discard as u64) {
        return Err(too_large);
    }
    let mut stream = body.into_data_stream();
    // Grown as bytes arrive, never reserved from the declared length: memory follows
    // what was actually sent.
    let mut whole = BytesMut::new();
    let mut held = HeldBytes::default();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            // Already refused: the size is the answer, even if the rest came too late.
            Err(_) if seen > bound.bytes => return Err(too_large),
            Err(error) => return Err(read_error(error)),
        };
        seen = seen.saturating_add(chunk.len());
        if seen > bound.discard {
            return Err(too_large);
        }
        if seen > bound.bytes {
            // Read on only to let the client finish sending; nothing more is kept.
            whole = BytesMut::new();
            held = HeldBytes::default();
        } else {
            if let Some(budget) = &bound.budget
                && !budget.take(&mut held, chunk.len())
            {
                return Err(BodyError::Busy(budget.capacity()));
            }
            whole.extend_from_slice(&chunk);
        }
    }
    if seen > bound.bytes {
        return Err(too_large);
    }
    Ok((whole.freeze(), held))
}

/// A body stream's error: the server-wide deadline (`Deadline`, below, under the route's
/// reader), or a broken or malformed upload.
fn read_error(error: axum::Error) -> BodyError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(inner) = cause {
        if let Some(BodyError::TimedOut(after)) = inner.downcast_ref::<BodyError>() {
            return BodyError::TimedOut(*after);
        }
        cause = inner.source();
    }
    BodyError::Read(error)
}

fn refuse(headers: &HeaderMap, flavour: Flavour, error: &BodyError) -> Response {
    let call = Call::from_headers(headers);
    // A body refused for its size or pace is a bad request; one refused because herald is
    // holding too many is an overload, answered as every other (1199999).
    let code = if matches!(error, BodyError::Busy(_)) { ErrorCode::Internal } else { ErrorCode::JsonDecode };
    let refusal = ApiError::new(code).with_detail(error.to_string());
    let mut response = match flavour {
        Flavour::Direct => call.direct_error(error.status(), &refusal, None),
        Flavour::Esb => call.direct(StatusCode::OK, envelope::esb_err(&refusal, call.lang, None, &call.request_id)),
    };
    // What is left of the body is unread: the connection cannot carry another request, and
    // saying so keeps a pooled client from sending one on it.
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    if matches!(error, BodyError::Busy(_)) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The server-wide layers: every request body must arrive within the body timeout, and
/// routes without a limit of their own (the console) take small bodies only.
pub fn server_wide(router: Router, limits: &ServerLimits) -> Router {
    router
        .layer(axum::middleware::from_fn_with_state(limits.body_read_timeout, body_deadline))
        .layer(DefaultBodyLimit::max(limits.default_body_bytes))
}

async fn body_deadline(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let timed = Deadline {
        body: body.into_data_stream(),
        timer: Box::pin(tokio::time::sleep(timeout)),
        timeout,
        expired: false,
    };
    next.run(Request::from_parts(parts, Body::from_stream(timed))).await
}

/// A body that fails with `BodyError::TimedOut` once its deadline passes.
struct Deadline {
    body: BodyDataStream,
    timer: Pin<Box<Sleep>>,
    timeout: Duration,
    expired: bool,
}

impl Stream for Deadline {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = this.body.poll_next_unpin(cx) {
            return Poll::Ready(item.map(|chunk| chunk.map_err(BodyError::Read)));
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            this.expired = true;
            return Poll::Ready(Some(Err(BodyError::TimedOut(this.timeout))));
        }
        Poll::Pending
    }
}

/// A connection's peer, for axum-server's accept loop over a [`SlotListener`].
#[derive(Clone, Copy, Debug)]
pub struct SlotAddr(pub SocketAddr);

impl axum_server::Address for SlotAddr {
    type Stream = Slotted<TcpStream>;
    type Listener = SlotListener;
}

/// A listener that accepts a connection only once it holds one of the server's
/// connection slots: beyond the bound, connections wait in the kernel's listen backlog
/// (and time out there, client side, if none frees up).
pub struct SlotListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max_connections: usize,
    write_timeout: Duration,
    /// Set while every slot is taken, so that a full server logs once, not per connection.
    full: AtomicBool,
}

impl SlotListener {
    pub fn new(listener: TcpListener, limits: &ServerLimits) -> Self {
        SlotListener {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            max_connections: limits.max_connections,
            write_timeout: limits.write_timeout,
            full: AtomicBool::new(false),
        }
    }

    async fn slot(&self) -> io::Result<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            self.full.store(false, Ordering::Relaxed);
            return Ok(slot);
        }
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_connections = self.max_connections,
                "every connection slot is taken; new connections wait until one closes"
            );
        }
        self.slots.clone().acquire_owned().await.map_err(|_| io::Error::other("the connection slots were closed"))
    }
}

impl axum_server::AddrListener<Slotted<TcpStream>, SlotAddr> for SlotListener {
    async fn bind_to(_: SlotAddr) -> io::Result<Self> {
        // Built from a bound listener only (`SlotListener::new`): the limits come with it.
        Err(io::Error::new(io::ErrorKind::Unsupported, "a SlotListener is made from a bound listener"))
    }

    async fn accept_stream(&self) -> io::Result<(Slotted<TcpStream>, SlotAddr)> {
        let slot = self.slot().await?;
        let (stream, peer) = self.listener.accept().await?;
        Ok((Slotted { io: stream, _slot: slot, write_timeout: self.write_timeout, stalled: None }, SlotAddr(peer)))
    }

    fn get_local_addr(&self) -> io::Result<SlotAddr> {
        self.listener.local_addr().map(SlotAddr)
    }
}

/// A connection holding its slot until it is dropped; a write that makes no progress for
/// `write_timeout` fails (TLS runs above it, so this bounds HTTPS as well).
pub struct Slotted<S> {
    io: S,
    _slot: OwnedSemaphorePermit,
    write_timeout: Duration,
    /// Running while writes return Pending; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Slotted<S> {
    fn bound<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Slotted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Slotted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.bound(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.bound(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.bound(cx, polled)
    }
}

/// The certificate and key, offering HTTP/1.1 only in ALPN (the server speaks nothing
/// else; see the module's comment).
pub async fn tls_config(tls: &TlsConfig) -> io::Result<axum_server::tls_rustls::RustlsConfig> {
    let loaded = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert_file, &tls.key_file).await?;
    let mut config = (*loaded.get_inner()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AppState, router, serve};
    use crate::config::Config;
    use crate::telemetry::Metrics;
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::{Instant, timeout};
    use tokio_util::sync::CancellationToken;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn publish_bodies_held_at_once_stay_within_their_budget_until_handled() {
        let api = ApiConfig { max_body_bytes: 1000, publish_buffer_bytes: 1500, ..ApiConfig::default() };
        let bound = BodyBound::publish(&api);
        let headers = HeaderMap::new();
        let (first, held) = collect(Body::from(vec![b'x'; 1000]), &headers, &bound).await.unwrap();
        assert_eq!((first.len(), held.bytes()), (1000, 1000));
        let refused = collect(Body::from(vec![b'x'; 600]), &headers, &bound).await;
        assert!(matches!(refused, Err(BodyError::Busy(1500))), "{refused:?}");
        assert_eq!(refused.unwrap_err().status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        let (_, again) = collect(Body::from(vec![b'x'; 600]), &headers, &bound).await.unwrap();
        assert_eq!(again.bytes(), 600, "given back once the first was handled");
        let (_, unbounded) =
            collect(Body::from(vec![b'x'; 10]), &headers, &BodyBound::small(&api, Flavour::Direct)).await.unwrap();
        assert_eq!(unbounded.bytes(), 0, "small bodies hold no budget");
    }

    fn limits(max_connections: usize, header_read_timeout: Duration, body_read_timeout: Duration) -> ServerLimits {
        ServerLimits {
            max_connections,
            header_read_timeout,
            body_read_timeout,
            write_timeout: Duration::from_secs(5),
            default_body_bytes: small_body_bytes(&Config::default().api),
        }
    }

    /// herald's router as `herald run` serves it before it is ready, on a loopback port.
    async fn start(limits: ServerLimits, tls: Option<TlsConfig>) -> SocketAddr {
        let state = AppState::new(Arc::new(Config::default()), Arc::new(Metrics::new(false)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, router(state), tls, limits, CancellationToken::new()));
        addr
    }

    /// Reads into `seen` until it holds `needle` (true), or the connection ends or `within`
    /// passes (false).
    async fn read_until(stream: &mut TcpStream, seen: &mut Vec<u8>, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(seen).contains(needle) {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        true
    }

    /// Waits for the server to close the connection; how long that took, or None if it
    /// stayed open `within`.
    async fn closed_after(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> Option<(Duration, String)> {
        let started = Instant::now();
        let mut seen = Vec::new();
        // A reset counts as closed too.
        let _ = timeout(within, stream.read_to_end(&mut seen)).await.ok()?;
        Some((started.elapsed(), String::from_utf8_lossy(&seen).into_owned()))
    }

    #[tokio::test]
    async fn a_client_sending_its_headers_slowly_is_cut_off_at_the_header_timeout() {
        let addr = start(limits(8, 300 * MS, Duration::from_secs(5)), None).await;
        let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
        tokio::spawn(async move {
            let head = b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
            for byte in head {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(20 * MS).await;
            }
        });
        let (after, seen) = closed_after(&mut reader, Duration::from_secs(3)).await.expect("closed");
        assert!(after >= 250 * MS && after < Duration::from_secs(2), "closed after {after:?}");
        assert!(!seen.contains(" 200 "), "{seen}");
        // So is one that sends nothing at all (no protocol detection waits for it).
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let (after, _) = closed_after(&mut silent, Duration::from_secs(3)).await.expect("closed");
        assert!(after >= 250 * MS && after < Duration::from_secs(2), "closed after {after:?}");
        // A prompt client is served.
        let mut prompt = TcpStream::connect(addr).await.unwrap();
        prompt.write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n").await.unwrap();
        assert!(read_until(&mut prompt, &mut Vec::new(), "\r\n\r\nok", Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn over_tls_a_stalled_handshake_is_cut_off_and_http_1_1_is_served() {
        let dir = std::env::temp_dir().join(format!("herald-limits-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-days", "1", "-subj", "/CN=herald", "-addext", "subjectAltName=IP:127.0.0.1"])
            .args(["-keyout", "tls.key", "-out", "tls.crt"])
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(made.success());
        let tls = TlsConfig { cert_file: dir.join("tls.crt"), key_file: dir.join("tls.key") };
        let addr = start(limits(8, 300 * MS, Duration::from_secs(5)), Some(tls)).await;
        // The first bytes of a ClientHello, then nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        let (after, _) = closed_after(&mut stalled, Duration::from_secs(3)).await.expect("closed");
        assert!(after >= 250 * MS && after < Duration::from_secs(2), "closed after {after:?}");
        let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
        let response = client.get(format!("https://{addr}/healthz")).send().await.unwrap();
        assert_eq!((response.status(), response.version()), (StatusCode::OK, reqwest::Version::HTTP_11));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn a_body_that_arrives_too_slowly_is_answered_408_and_the_connection_closed() {
        let addr = start(limits(8, Duration::from_secs(5), 300 * MS), None).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = "POST /api/v3/event/subscribe/0/0 HTTP/1.1\r\nHost: herald\r\nContent-Length: 100\r\n\
            HTTP_BLUEKING_LANGUAGE: en\r\n\r\n{\"subscri";
        stream.write_all(head.as_bytes()).await.unwrap();
        let (after, seen) = closed_after(&mut stream, Duration::from_secs(3)).await.expect("closed");
        assert!(after >= 250 * MS && after < Duration::from_secs(2), "closed after {after:?}");
        assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
        assert!(seen.contains("1199000") && seen.contains("did not arrive within 300ms"), "{seen}");
    }

    #[tokio::test]
    async fn oversize_bodies_are_refused_in_their_envelope_and_publish_takes_hundreds_of_kib() {
        let addr = start(limits(8, Duration::from_secs(5), Duration::from_secs(5)), None).await;
        let url = |path: &str| format!("http://{addr}{path}");
        let http = reqwest::Client::new();
        let oversize = format!("{{\"subscription_name\": \"{}\"}}", "a".repeat(100 << 10));
        let send = |request: reqwest::RequestBuilder| async move {
            let response = request.header("HTTP_BLUEKING_LANGUAGE", "en").send().await.unwrap();
            let close = response.headers().get("connection").is_some_and(|v| v == "close");
            (response.status(), close, response.json::<Value>().await.unwrap())
        };

        let (status, close, body) = send(http.post(url("/api/v3/event/subscribe/0/0")).body(oversize.clone())).await;
        assert_eq!((status, close, &body["bk_error_code"]), (StatusCode::PAYLOAD_TOO_LARGE, true, &1_199_000.into()));
        assert!(body["bk_error_msg"].as_str().unwrap().contains("larger than 65536 bytes"), "{body}");
        // ESB paths answer 200 with their own envelope, as for any other refusal.
        let (status, _, body) =
            send(http.post(url("/api/c/compapi/v2/cc/subscribe_event/")).body(oversize.clone())).await;
        assert_eq!((status, &body["code"], &body["result"]), (StatusCode::OK, &1_199_000.into(), &false.into()));
        // A wrong method keeps its own answer.
        let (status, _, body) = send(http.get(url("/api/c/compapi/v2/cc/subscribe_event/")).body(oversize)).await;
        assert_eq!((status, &body["bk_error_code"]), (StatusCode::METHOD_NOT_ALLOWED, &1_199_006.into()));

        // 512 KiB of events pass publish's limit; the herald that is not ready then says so.
        let event = serde_json::json!({"event_type": "instdata", "action": "create", "obj_type": "host",
            "cur_data": {"blob": "x".repeat(4000)}});
        let events = Value::Array(vec![event; 128]).to_string();
        assert!(events.len() > 500 << 10);
        let (status, _, body) = send(http.post(url("/api/v3/event/publish")).body(events)).await;
        assert_eq!((status, &body["bk_error_code"]), (StatusCode::SERVICE_UNAVAILABLE, &1_199_999.into()), "{body}");

        // Without a declared length the bytes are counted as they come.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request = b"POST /api/v3/event/subscribe/0/0 HTTP/1.1\r\nHost: herald\r\n\
            Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        for _ in 0..5 {
            request.extend_from_slice(format!("4000\r\n{}\r\n", "a".repeat(0x4000)).as_bytes());
        }
        request.extend_from_slice(b"0\r\n\r\n");
        stream.write_all(&request).await.unwrap();
        let (_, seen) = closed_after(&mut stream, Duration::from_secs(3)).await.expect("closed");
        assert!(seen.starts_with("HTTP/1.1 413") && seen.contains("1199000"), "{seen}");
    }

    #[tokio::test]
    async fn beyond_the_connection_bound_a_connection_waits_until_one_closes() {
        let addr = start(limits(2, Duration::from_secs(5), Duration::from_secs(5)), None).await;
        let request = b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n";
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            assert!(read_until(&mut stream, &mut Vec::new(), "\r\n\r\nok", Duration::from_secs(2)).await);
            held.push(stream);
        }
        // Connected (the kernel's backlog), but not served while both are held open.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(request).await.unwrap();
        let mut seen = Vec::new();
        assert!(!read_until(&mut third, &mut seen, "\r\n\r\nok", 400 * MS).await, "served beyond the bound");
        drop(held.pop());
        assert!(read_until(&mut third, &mut seen, "\r\n\r\nok", Duration::from_secs(2)).await, "never served");
    }

    #[tokio::test]
    async fn a_response_the_client_never_reads_fails_after_the_write_timeout() {
        let slot = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        let (server, _client) = tokio::io::duplex(1024);
        let mut io = Slotted { io: server, _slot: slot, write_timeout: 200 * MS, stalled: None };
        let started = Instant::now();
        let error = io.write_all(&[0u8; 64 << 10]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= 200 * MS && started.elapsed() < Duration::from_secs(2));
    }
}
