//! Standard Webhooks signatures (`webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`), with the secret from a Kubernetes Secret.

use crate::crd::SecretKeyRef;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use std::collections::HashMap;
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

/// Signing keys read from Secrets, kept for a minute so a busy subscription does not
/// read its Secret per delivery, and a rotated one is picked up soon.
pub struct SecretCache {
    client: kube::Client,
    entries: tokio::sync::Mutex<HashMap<SecretKeyId, (Instant, Vec<u8>)>>,
}

/// (namespace, Secret name, key in the Secret).
type SecretKeyId = (String, String, String);

const SECRET_TTL: Duration = Duration::from_secs(60);

/// Why a signing key could not be had. Errors name the Secret, never its data.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("reading signing Secret {namespace}/{name}: {}", crate::kube_error_summary(source))]
    Read { namespace: String, name: String, source: kube::Error },
    #[error("signing Secret {namespace}/{name} has no key {key}")]
    MissingKey { namespace: String, name: String, key: String },
}

impl SecretCache {
    pub fn new(client: kube::Client) -> Self {
        SecretCache { client, entries: tokio::sync::Mutex::default() }
    }

    /// The signing key of `secret` in `namespace`.
    pub async fn key(&self, namespace: &str, secret: &SecretKeyRef) -> Result<Vec<u8>, SigningKeyError> {
        let cache_key = (namespace.to_string(), secret.name.clone(), secret.key.clone());
        let mut entries = self.entries.lock().await;
        if let Some((read_at, key)) = entries.get(&cache_key)
            && read_at.elapsed() < SECRET_TTL
        {
            return Ok(key.clone());
        }
        let api = kube::Api::<Secret>::namespaced(self.client.clone(), namespace);
        let found = api.get(&secret.name).await.map_err(|source| SigningKeyError::Read {
            namespace: namespace.to_string(),
            name: secret.name.clone(),
            source,
        })?;
        let value =
            found.data.and_then(|mut data| data.remove(&secret.key)).ok_or_else(|| SigningKeyError::MissingKey {
                namespace: namespace.to_string(),
                name: secret.name.clone(),
                key: secret.key.clone(),
            })?;
        let key = signing_key(&value.0);
        entries.insert(cache_key, (Instant::now(), key.clone()));
        Ok(key)
    }
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
}
