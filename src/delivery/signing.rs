//! Standard Webhooks signatures (`webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`), with the secret from a Kubernetes Secret.

use crate::crd::SecretKeyRef;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The signing key: a `whsec_`-prefixed value is base64 after the prefix (the Standard
/// Webhooks convention); anything else is used as raw bytes.
pub fn signing_key(secret: &[u8]) -> Vec<u8> {
    match secret.strip_prefix(b"whsec_") {
        Some(encoded) => STANDARD.decode(encoded.trim_ascii()).unwrap_or_else(|_| secret.to_vec()),
        None => secret.to_vec(),
    }
}

pub fn sign(key: &[u8], message_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(message_id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("v1,{}", STANDARD.encode(context.sign().as_ref()))
}

/// Signing keys read from Secrets. A key is re-read after a minute, so a rotated Secret
/// is picked up soon, in the background: deliveries keep the last good key meanwhile, so
/// a slow or unreachable API server neither stalls nor dead-letters signed deliveries.
/// No lock is held across a read.
pub struct SecretCache {
    client: kube::Client,
    ttl: Duration,
    retry: Duration,
    entries: Arc<Mutex<HashMap<SecretKeyId, CachedKey>>>,
}

/// (namespace, Secret name, key in the Secret).
type SecretKeyId = (String, String, String);

struct CachedKey {
    key: Vec<u8>,
    /// When to read the Secret again (after a failed refresh: a few seconds later).
    refresh_at: Instant,
    refreshing: bool,
}

const SECRET_TTL: Duration = Duration::from_secs(60);
const RETRY_REFRESH: Duration = Duration::from_secs(5);

/// Why a signing key could not be had. Errors name the Secret, never its data.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("reading signing Secret {namespace}/{name}: {}", crate::kube_error_summary(source))]
    Read { namespace: String, name: String, source: kube::Error },
    #[error("signing Secret {namespace}/{name} has no key {key}")]
    MissingKey { namespace: String, name: String, key: String },
}

impl SigningKeyError {
    /// The Secret or its key is gone, or herald may no longer read it: stop using the
    /// cached key. Anything else (timeouts, 5xx) is the API server's trouble, not the key's.
    fn is_definite(&self) -> bool {
        match self {
            // 401 is herald's own credentials failing, not the key: keep signing.
            SigningKeyError::Read { source: kube::Error::Api(status), .. } => [403, 404].contains(&status.code),
            SigningKeyError::Read { .. } => false,
            SigningKeyError::MissingKey { .. } => true,
        }
    }
}

impl SecretCache {
    pub fn new(client: kube::Client) -> Self {
        SecretCache::with_timing(client, SECRET_TTL, RETRY_REFRESH)
    }

    fn with_timing(client: kube::Client, ttl: Duration, retry: Duration) -> Self {
        SecretCache { client, ttl, retry, entries: Arc::default() }
    }

    /// The signing key of `secret` in `namespace`.
    pub async fn key(&self, namespace: &str, secret: &SecretKeyRef) -> Result<Vec<u8>, SigningKeyError> {
        let id = (namespace.to_string(), secret.name.clone(), secret.key.clone());
        {
            let mut entries = self.entries.lock();
            if let Some(cached) = entries.get_mut(&id) {
                if cached.refresh_at <= Instant::now() && !cached.refreshing {
                    cached.refreshing = true;
                    self.refresh_in_background(id.clone());
                }
                return Ok(cached.key.clone());
            }
        }
        let key = read_key(&self.client, &id).await?;
        let cached = CachedKey { key: key.clone(), refresh_at: Instant::now() + self.ttl, refreshing: false };
        self.entries.lock().insert(id, cached);
        Ok(key)
    }

    fn refresh_in_background(&self, id: SecretKeyId) {
        let (client, entries, ttl, retry) = (self.client.clone(), self.entries.clone(), self.ttl, self.retry);
        tokio::spawn(async move {
            let read = read_key(&client, &id).await;
            let mut entries = entries.lock();
            match read {
                Ok(key) => {
                    entries.insert(id, CachedKey { key, refresh_at: Instant::now() + ttl, refreshing: false });
                }
                Err(error) if error.is_definite() => {
                    tracing::warn!(%error, "signing key withdrawn");
                    entries.remove(&id);
                }
                Err(error) => {
                    tracing::warn!(%error, "refreshing a signing key failed; signing with the last good one");
                    if let Some(cached) = entries.get_mut(&id) {
                        cached.refreshing = false;
                        cached.refresh_at = Instant::now() + retry;
                    }
                }
            }
        });
    }
}

async fn read_key(client: &kube::Client, (namespace, name, key): &SecretKeyId) -> Result<Vec<u8>, SigningKeyError> {
    let api = kube::Api::<Secret>::namespaced(client.clone(), namespace);
    let found = api.get(name).await.map_err(|source| SigningKeyError::Read {
        namespace: namespace.clone(),
        name: name.clone(),
        source,
    })?;
    let value = found.data.and_then(|mut data| data.remove(key)).ok_or_else(|| SigningKeyError::MissingKey {
        namespace: namespace.clone(),
        name: name.clone(),
        key: key.clone(),
    })?;
    Ok(signing_key(&value.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification.
        let key = signing_key(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn raw_secrets_are_used_as_bytes() {
        assert_eq!(signing_key(b"plain"), b"plain");
    }

    /// A stand-in API server for this one function: serves the Secret, then fails or
    /// hangs as the test says.
    async fn api_server(
        mode: Arc<std::sync::atomic::AtomicU8>,
        reads: Arc<std::sync::atomic::AtomicUsize>,
    ) -> kube::Client {
        let handler = move || {
            let (mode, reads) = (mode.clone(), reads.clone());
            async move {
                reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match mode.load(std::sync::atomic::Ordering::SeqCst) {
                    0 => axum::Json(serde_json::json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "sign", "namespace": "team"},
                        "data": {"key": STANDARD.encode("first")},
                    }))
                    .into_response(),
                    1 => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    _ => std::future::pending().await,
                }
            }
        };
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/api/v1/namespaces/team/secrets/sign", axum::routing::get(handler));
        tokio::spawn(async move { axum::serve(listener, app).await });
        kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
    }

    #[tokio::test]
    async fn the_last_good_key_signs_while_the_api_server_fails_or_hangs() {
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = api_server(mode.clone(), reads.clone()).await;
        let cache = SecretCache::with_timing(client, Duration::from_millis(50), Duration::from_millis(50));
        let secret = SecretKeyRef { name: "sign".into(), key: "key".into() };
        assert_eq!(cache.key("team", &secret).await.unwrap(), b"first");
        for failing in [1, 2] {
            mode.store(failing, std::sync::atomic::Ordering::SeqCst);
            let before = reads.load(std::sync::atomic::Ordering::SeqCst);
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                let key = tokio::time::timeout(Duration::from_secs(1), cache.key("team", &secret)).await;
                assert_eq!(key.expect("answered without waiting for the API server").unwrap(), b"first");
            }
            let refreshes = reads.load(std::sync::atomic::Ordering::SeqCst) - before;
            assert!(refreshes >= 1, "mode {failing}: a refresh reached the API server");
        }
    }
}
