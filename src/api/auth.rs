//! Authentication and authorisation (docs/design.md §7), and where ESB app credentials
//! come from.
//!
//! Kubernetes bearer tokens are checked with a TokenReview for herald's audience, and
//! each (identity, supplier account, action) with a SubjectAccessReview on the virtual
//! resource `supplieraccounts.herald.dev` named after the account, so plain RBAC grants
//! access per account. ESB apps are checked against their configured accounts. Answers
//! are cached for a few seconds. The anonymous switch is for development only.
//!
//! Unauthenticated callers choose the tokens, so reviews are bounded: tokens no
//! authenticator can accept are refused without a review, reviews in flight are limited
//! (a caller waits briefly, then is told to retry), concurrent reviews of one question are
//! made once, and answers, refusals included, sit in fixed-size caches with O(1) eviction.

use crate::compat::{ApiError, ErrorCode};
use crate::config::ApiConfig;
use crate::telemetry::{Metrics, ReviewLabels};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Who is calling.
#[derive(Clone, Debug, PartialEq)]
pub enum Identity {
    /// Only with `api.auth.anonymous: true`.
    Anonymous,
    /// A Kubernetes user or ServiceAccount, from a TokenReview.
    Kubernetes { username: String, uid: Option<String>, groups: Vec<String>, extra: BTreeMap<String, Vec<String>> },
    /// A BlueKing ESB app, from its app code and secret.
    /// `accounts` are those of the app entry whose secret matched: one app code may be
    /// listed twice, with different secrets and accounts (a rotation, or two teams).
    EsbApp { app_code: String, username: Option<String>, accounts: Vec<String> },
}

impl Identity {
    /// The name used as the operator when no `BK_User` header is given.
    pub fn name(&self) -> String {
        match self {
            Identity::Anonymous => "anonymous".into(),
            Identity::Kubernetes { username, .. } => username.clone(),
            Identity::EsbApp { app_code, username, .. } => username.clone().unwrap_or_else(|| app_code.clone()),
        }
    }
}

/// Actions on a supplier account: the SubjectAccessReview verbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    List,
    Create,
    Update,
    Delete,
    Publish,
    Replay,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::List => "list",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Publish => "publish",
            Action::Replay => "replay",
        }
    }
}

/// One ESB app: its code, secret and the supplier accounts it may use (`*` for all).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EsbApp {
    pub app_code: String,
    pub app_secret: String,
    #[serde(default)]
    pub accounts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EsbApps {
    #[serde(default)]
    pub apps: Vec<EsbApp>,
}

impl EsbApps {
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    /// The apps of `api.esbCredentialsFile` and of key `apps.yaml` of the Secret
    /// `api.esbCredentialsSecret` in `namespace`, together.
    pub async fn load(client: &kube::Client, config: &ApiConfig, namespace: &str) -> Result<Self, EsbCredentialsError> {
        let mut apps = EsbApps::default();
        if let Some(path) = &config.esb_credentials_file {
            let source_name = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|source| EsbCredentialsError::ReadFile { source_name: source_name.clone(), source })?;
            apps.apps.extend(Self::parsed(&text, source_name)?.apps);
        }
        if let Some(name) = &config.esb_credentials_secret {
            let source_name = format!("Secret {namespace}/{name}");
            let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                .get(name)
                .await
                .map_err(|source| EsbCredentialsError::ReadSecret { source_name: source_name.clone(), source })?;
            let text = secret
                .data
                .and_then(|d| d.get("apps.yaml").map(|v| String::from_utf8_lossy(&v.0).into_owned()))
                .ok_or_else(|| EsbCredentialsError::MissingKey { source_name: source_name.clone() })?;
            apps.apps.extend(Self::parsed(&text, source_name)?.apps);
        }
        Ok(apps)
    }

    fn parsed(text: &str, source_name: String) -> Result<Self, EsbCredentialsError> {
        Self::from_yaml(text).map_err(|source| EsbCredentialsError::Parse { source_name, source })
    }

    /// The app whose code and secret match. Secrets are compared as digests, byte by
    /// byte without an early exit, so timing does not reveal how much of one matched.
    pub fn verify(&self, app_code: &str, app_secret: &str) -> Option<&EsbApp> {
        let digest = |text: &str| ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let offered = digest(app_secret);
        self.apps.iter().find(|app| {
            let expected = digest(&app.app_secret);
            let difference = expected.as_ref().iter().zip(offered.as_ref()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            app.app_code == app_code && difference == 0
        })
    }
}

impl EsbApp {
    /// The identity of a caller that presented this app's secret.
    pub fn identity(&self, username: Option<String>) -> Identity {
        Identity::EsbApp { app_code: self.app_code.clone(), username, accounts: self.accounts.clone() }
    }
}

/// Whether an ESB app's account list (`*` for all) names `account`.
fn app_allows(accounts: &[String], account: &str) -> bool {
    accounts.iter().any(|a| a == "*" || a == account)
}

/// The permission details of a 9900403 answer, in bk-cmdb's shape.
pub fn permission_detail(identity: &Identity, account: &str, action: Action) -> serde_json::Value {
    serde_json::json!({
        "system_id": "herald",
        "system_name": "herald",
        "actions": [{
            "id": action.verb(),
            "name": action.verb(),
            "related_resource_types": [{
                "system_id": "herald",
                "type": "supplieraccounts",
                "type_name": "supplier account",
                "instances": [[{ "type": "supplieraccounts", "id": account, "name": account }]],
            }],
        }],
        "user": identity.name(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum EsbCredentialsError {
    #[error("reading ESB credentials {source_name}: {source}")]
    ReadFile { source_name: String, source: std::io::Error },
    // The API server's whole message: it names the missing permission, never Secret data.
    #[error("reading ESB credentials {source_name}: {source}")]
    ReadSecret { source_name: String, source: kube::Error },
    #[error("reading ESB credentials {source_name}: no key apps.yaml")]
    MissingKey { source_name: String },
    #[error("parsing ESB credentials {source_name}: {source}")]
    Parse { source_name: String, source: serde_yaml::Error },
}

/// A SubjectAccessReview's question: the whole identity (groups decide RBAC as much as
/// the name), the account and the verb.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    username: String,
    uid: Option<String>,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
    account: String,
    action: Action,
}

fn decision_key(
    username: &str,
    uid: &Option<String>,
    groups: &[String],
    extra: &BTreeMap<String, Vec<String>>,
    account: &str,
    action: Action,
) -> DecisionKey {
    DecisionKey {
        username: username.to_string(),
        uid: uid.clone(),
        groups: groups.to_vec(),
        extra: extra.clone(),
        account: account.to_string(),
        action,
    }
}

/// What answers are cached by: a SHA-256 digest, so raw tokens are never kept and an
/// entry costs the same whatever the size of the caller's account name or groups.
type Digest = [u8; 32];

fn sha256(bytes: &[u8]) -> Digest {
    digest_bytes(&ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn digest_bytes(digest: &ring::digest::Digest) -> Digest {
    // SHA-256 digests are always 32 bytes.
    let mut bytes = [0; 32];
    bytes.copy_from_slice(digest.as_ref());
    bytes
}

impl DecisionKey {
    /// Every field, each length-prefixed, so that no two questions share a digest input.
    fn digest(&self) -> Digest {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut field = |bytes: &[u8]| {
            context.update(&(bytes.len() as u64).to_le_bytes());
            context.update(bytes);
        };
        let count = |n: usize| (n as u64).to_le_bytes();
        field(self.username.as_bytes());
        match &self.uid {
            Some(uid) => {
                field(b"uid");
                field(uid.as_bytes());
            }
            None => field(b""),
        }
        field(&count(self.groups.len()));
        self.groups.iter().for_each(|group| field(group.as_bytes()));
        field(&count(self.extra.len()));
        for (key, values) in &self.extra {
            field(key.as_bytes());
            field(&count(values.len()));
            values.iter().for_each(|value| field(value.as_bytes()));
        }
        field(self.account.as_bytes());
        field(self.action.verb().as_bytes());
        digest_bytes(&context.finish())
    }
}

/// Longest bearer token sent for review: 16 KiB. ServiceAccount tokens are about 1 KiB and
/// OIDC ID tokens a few KiB; anything longer is no token an authenticator issues.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a bearer token was refused without a TokenReview.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedToken {
    #[error("the token is empty")]
    Empty,
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the token holds whitespace, a control character or a non-ASCII character")]
    Character,
    #[error("the token is shaped like a JWT but a segment is not base64url")]
    NotBase64Url,
}

/// Refuses, locally and cheaply, what no authenticator can accept, so that garbage costs
/// no TokenReview. Opaque tokens (static token files, bootstrap, webhook and cloud tokens,
/// some with `:` or `+`) stay allowed: only visible ASCII is required, which is all
/// herald's header parsing passes anyway, and the API server's own bearer parsing stops at
/// a space. A token that starts like a JWS header (`eyJ`, base64url of `{"`) and has three
/// segments must have base64url segments, as JWS compact form requires (no padding).
pub fn check_token_shape(token: &str) -> Result<(), MalformedToken> {
    if token.is_empty() {
        return Err(MalformedToken::Empty);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(MalformedToken::TooLong);
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(MalformedToken::Character);
    }
    let mut segments = token.split('.');
    if let (true, Some(header), Some(payload), Some(signature), None) =
        (token.starts_with("eyJ"), segments.next(), segments.next(), segments.next(), segments.next())
    {
        // A base64 text is never 1 more than a multiple of 4 long; the payload is never
        // empty (detached payloads are not tokens); an unsigned JWT has no signature.
        let base64url = |segment: &str| {
            segment.len() % 4 != 1 && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !(base64url(header) && base64url(payload) && !payload.is_empty() && base64url(signature)) {
            return Err(MalformedToken::NotBase64Url);
        }
    }
    Ok(())
}

/// Answers kept per kind of review: 10,000. The bound on reviews in flight bounds how fast
/// a flood can turn the cache over, so FIFO (no bookkeeping on reads) loses little that is
/// still fresh; an evicted answer costs one review more.
pub const CACHE_CAPACITY: usize = 10_000;

/// TokenReviews, and separately SubjectAccessReviews, in flight at once: 8 each, so a flood
/// of unknown tokens cannot hold up the authorisation of callers whose tokens are cached.
pub const REVIEWS_IN_FLIGHT: usize = 8;

/// Longest a caller waits for its turn to review before being told to retry: 1 s.
pub const REVIEW_WAIT: Duration = Duration::from_secs(1);

/// Reviews of each kind started per second, and the burst above that: however fast the
/// API server answers, a flood of unknown tokens costs it at most this many reviews.
pub const REVIEWS_PER_SECOND: f64 = 100.0;
pub const REVIEW_BURST: f64 = 200.0;

/// The bounds on one kind of review.
#[derive(Clone, Copy, Debug)]
struct ReviewBounds {
    capacity: usize,
    in_flight: usize,
    wait: Duration,
    per_second: f64,
    burst: f64,
}

const REVIEW_BOUNDS: ReviewBounds = ReviewBounds {
    capacity: CACHE_CAPACITY,
    in_flight: REVIEWS_IN_FLIGHT,
    wait: REVIEW_WAIT,
    per_second: REVIEWS_PER_SECOND,
    burst: REVIEW_BURST,
};

/// Reviews started per second: a token bucket.
struct ReviewRate {
    per_second: f64,
    burst: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl ReviewRate {
    fn new(per_second: f64, burst: f64) -> Self {
        ReviewRate { per_second, burst, bucket: Mutex::new((burst, Instant::now())) }
    }

    /// Takes one review's token, or says how long until one is there.
    fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock();
        let (tokens, at) = *bucket;
        let tokens = (tokens + now.saturating_duration_since(at).as_secs_f64() * self.per_second).min(self.burst);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            Ok(())
        } else {
            *bucket = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
        }
    }
}

/// Answers with a fixed capacity and a TTL checked on read. Eviction is FIFO in O(1): the
/// queue holds each key exactly once, in the order first inserted (a refreshed answer keeps
/// its place), so the oldest goes first and no operation scans. Expired entries stay until
/// refreshed or evicted; the capacity bounds them too.
struct BoundedCache<K, V> {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<K, (Instant, V)>,
    order: VecDeque<K>,
}

impl<K: Clone + Eq + Hash, V: Clone> BoundedCache<K, V> {
    fn new(capacity: usize, ttl: Duration) -> Self {
        BoundedCache { capacity, ttl, entries: HashMap::new(), order: VecDeque::new() }
    }

    /// The answer stored for `key` less than the TTL before `now`.
    fn get(&self, key: &K, now: Instant) -> Option<V> {
        let (stored, value) = self.entries.get(key)?;
        (now.saturating_duration_since(*stored) < self.ttl).then(|| value.clone())
    }

    fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        if let Some(entry) = self.entries.get_mut(&key) {
            *entry = (now, value);
            return;
        }
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.entries.remove(&oldest);
        }
        self.order.push_back(key.clone());
        self.entries.insert(key, (now, value));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Callers waiting on the same question, by digest: one review answers them all.
type Asking = Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>;

/// A caller's claim on a question while it waits for, or makes, the review. The last
/// caller to drop its claim forgets the question (the map's own reference and this one
/// are all that is left), so later callers of the same question keep sharing one turn even
/// when the first review failed, and the map holds only questions being asked, whatever
/// path the callers leave by.
struct Question<'a> {
    asking: &'a Asking,
    key: Digest,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> Question<'a> {
    fn join(asking: &'a Asking, key: Digest) -> Self {
        let turn = asking.lock().entry(key).or_default().clone();
        Question { asking, key, turn }
    }
}

impl Drop for Question<'_> {
    fn drop(&mut self) {
        let mut asking = self.asking.lock();
        // Counted under the map's lock, which every `join` takes: no claim can appear meanwhile.
        if asking.get(&self.key).is_some_and(|turn| Arc::ptr_eq(turn, &self.turn) && Arc::strong_count(turn) == 2) {
            asking.remove(&self.key);
        }
    }
}

/// One kind of review: its cached answers, the questions being asked, and the bound on
/// reviews in flight. Negative answers (a refused token, a denied account) are cached like
/// positive ones, so a repeated bad token or made-up account costs one review per TTL.
struct Reviews<V> {
    /// `TokenReview` or `SubjectAccessReview`.
    kind: &'static str,
    answers: Mutex<BoundedCache<Digest, V>>,
    asking: Asking,
    in_flight: Semaphore,
    rate: ReviewRate,
    wait: Duration,
    metrics: Arc<Metrics>,
}

impl<V: Clone> Reviews<V> {
    fn new(kind: &'static str, ttl: Duration, bounds: ReviewBounds, metrics: Arc<Metrics>) -> Self {
        let ReviewBounds { capacity, in_flight, wait, per_second, burst } = bounds;
        Reviews {
            rate: ReviewRate::new(per_second, burst),
            kind,
            metrics,
            answers: Mutex::new(BoundedCache::new(capacity, ttl)),
            asking: Mutex::default(),
            in_flight: Semaphore::new(in_flight),
            wait,
        }
    }

    fn cached(&self, key: &Digest) -> Option<V> {
        self.answers.lock().get(key, Instant::now())
    }

    /// The cached answer to `key`, or `review`'s, made once a review slot is free. Waiting
    /// (for the same question asked by another caller, then for a slot) ends at one
    /// deadline, after which the caller is told the API is busy.
    async fn answer(&self, key: Digest, review: impl Future<Output = Result<V, AuthError>>) -> Result<V, AuthError> {
        if let Some(value) = self.cached(&key) {
            return Ok(value);
        }
        let deadline = Instant::now() + self.wait;
        let question = Question::join(&self.asking, key);
        let Ok(_turn) = tokio::time::timeout_at(deadline, question.turn.lock()).await else {
            return Err(self.busy());
        };
        // The caller before this one may have asked the same question meanwhile.
        if let Some(value) = self.cached(&key) {
            return Ok(value);
        }
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.in_flight.acquire()).await else {
            return Err(self.busy());
        };
        loop {
            match self.rate.take(Instant::now()) {
                Ok(()) => break,
                Err(wait) if Instant::now() + wait <= deadline => tokio::time::sleep(wait).await,
                Err(_) => return Err(self.busy()),
            }
        }
        let value = review.await?;
        self.answers.lock().insert(key, value.clone(), Instant::now());
        Ok(value)
    }

    fn busy(&self) -> AuthError {
        self.count("busy");
        AuthError::Busy { review: self.kind }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.auth_reviews.get_or_create(&ReviewLabels { kind: self.kind, outcome }).inc();
    }
}

/// The identity a TokenReview vouches for, only when it is authenticated for herald's
/// audience: the API server lists the audiences it checked the token against, and an
/// empty list means the token is good for the API server itself, not for herald.
fn reviewed_identity(status: Option<TokenReviewStatus>, audience: &str) -> Option<Identity> {
    let status = status.filter(|s| s.authenticated == Some(true))?;
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return None;
    }
    let user = status.user?;
    Some(Identity::Kubernetes {
        username: user.username.unwrap_or_default(),
        uid: user.uid,
        groups: user.groups.unwrap_or_default(),
        extra: user.extra.unwrap_or_default(),
    })
}

const TOKEN_REVIEW: &str = "TokenReview";
const ACCESS_REVIEW: &str = "SubjectAccessReview";

pub struct Authenticator {
    client: kube::Client,
    audience: String,
    kubernetes: bool,
    anonymous: bool,
    /// By token digest: the identity, or None for a token the API server refused.
    tokens: Reviews<Option<Identity>>,
    /// By question digest: allowed or not.
    decisions: Reviews<bool>,
    metrics: Arc<Metrics>,
    pub esb: EsbApps,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no usable credentials")]
    Unauthenticated,
    #[error("not allowed")]
    Forbidden(serde_json::Value),
    #[error("{review} failed: {}", crate::kube_error_summary(source))]
    Review { review: &'static str, source: kube::Error },
    #[error("too many {review}s in flight, retry shortly")]
    Busy { review: &'static str },
}

impl AuthError {
    pub fn to_api(&self) -> (ApiError, Option<serde_json::Value>) {
        match self {
            AuthError::Unauthenticated => (ApiError::new(ErrorCode::IdentityMissing), None),
            AuthError::Forbidden(permission) => (ApiError::new(ErrorCode::NoPermission), Some(permission.clone())),
            AuthError::Review { .. } | AuthError::Busy { .. } => {
                (ApiError::new(ErrorCode::Internal).with_detail(self.to_string()), None)
            }
        }
    }

    /// Whether the API should answer this as it answers other overloads (docs/design.md §3):
    /// 1199999 with HTTP 503 and `Retry-After: 1` on direct paths, rather than 500.
    pub fn is_busy(&self) -> bool {
        matches!(self, AuthError::Busy { .. })
    }
}

impl Authenticator {
    pub fn new(client: kube::Client, config: &crate::config::AuthConfig, esb: EsbApps, metrics: Arc<Metrics>) -> Self {
        let ttl = Duration::from_secs(config.cache_seconds);
        Authenticator {
            client,
            audience: config.audience.clone(),
            kubernetes: config.kubernetes,
            anonymous: config.anonymous,
            tokens: Reviews::new(TOKEN_REVIEW, ttl, REVIEW_BOUNDS, metrics.clone()),
            decisions: Reviews::new(ACCESS_REVIEW, ttl, REVIEW_BOUNDS, metrics.clone()),
            metrics,
            esb,
        }
    }

    /// Identity from a bearer token (`Authorization: Bearer …`), or anonymous when the
    /// development switch is on and no token was sent.
    pub async fn bearer(&self, authorization: Option<&str>) -> Result<Identity, AuthError> {
        let token = authorization
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token.filter(|_| self.kubernetes) else {
            return if self.anonymous { Ok(Identity::Anonymous) } else { Err(AuthError::Unauthenticated) };
        };
        if let Err(malformed) = check_token_shape(token) {
            self.metrics.auth_rejected_tokens.inc();
            tracing::debug!(reason = %malformed, "bearer token refused without a TokenReview");
            return Err(AuthError::Unauthenticated);
        }
        // Cache by digest: raw tokens are never kept.
        let identity = self.tokens.answer(sha256(token.as_bytes()), self.review_token(token)).await?;
        identity.ok_or(AuthError::Unauthenticated)
    }

    /// Asks the API server who `token` is, for herald's audience.
    async fn review_token(&self, token: &str) -> Result<Option<Identity>, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone()).create(&PostParams::default(), &review).await;
        let answer = answer.map_err(|source| {
            self.tokens.count("error");
            AuthError::Review { review: TOKEN_REVIEW, source }
        })?;
        let identity = reviewed_identity(answer.status, &self.audience);
        self.tokens.count(if identity.is_some() { "authenticated" } else { "unauthenticated" });
        Ok(identity)
    }

    /// Whether `identity` may do `action` on supplier `account`.
    pub async fn authorize(&self, identity: &Identity, account: &str, action: Action) -> Result<(), AuthError> {
        let allowed = match identity {
            Identity::Anonymous => true,
            // What the ESB gateway offered apps: their accounts' subscriptions (and reading
            // their deliveries); publishing and replaying need a Kubernetes identity.
            Identity::EsbApp { accounts, .. } => {
                !matches!(action, Action::Publish | Action::Replay) && app_allows(accounts, account)
            }
            Identity::Kubernetes { username, uid, groups, extra } => {
                let key = decision_key(username, uid, groups, extra, account, action);
                self.decisions.answer(key.digest(), self.review_access(&key)).await?
            }
        };
        if allowed { Ok(()) } else { Err(AuthError::Forbidden(permission_detail(identity, account, action))) }
    }

    /// Asks the API server the question `key` is.
    async fn review_access(&self, key: &DecisionKey) -> Result<bool, AuthError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(key.username.clone()),
                uid: key.uid.clone(),
                groups: Some(key.groups.clone()),
                extra: Some(key.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(crate::crd::GROUP.into()),
                    resource: Some("supplieraccounts".into()),
                    name: Some(key.account.clone()),
                    verb: Some(key.action.verb().into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await;
        let answer = answer.map_err(|source| {
            self.decisions.count("error");
            AuthError::Review { review: ACCESS_REVIEW, source }
        })?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        self.decisions.count(if allowed { "allowed" } else { "denied" });
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn esb_apps_verify_secrets_and_accounts() {
        let apps = EsbApps::from_yaml("apps:\n- appCode: cmdb\n  appSecret: s3cret\n  accounts: ['0', '7']\n- appCode: ops\n  appSecret: x\n  accounts: ['*']\n").unwrap();
        assert!(apps.verify("cmdb", "s3cret").is_some());
        assert!(apps.verify("cmdb", "wrong").is_none());
        assert!(apps.verify("nobody", "s3cret").is_none());
        let accounts = |app: &EsbApp| app.accounts.clone();
        assert!(app_allows(&apps.verify("cmdb", "s3cret").map(accounts).unwrap(), "7"));
        assert!(!app_allows(&apps.verify("cmdb", "s3cret").map(accounts).unwrap(), "8"));
        assert!(app_allows(&apps.verify("ops", "x").map(accounts).unwrap(), "anything"));
    }

    #[test]
    fn an_app_listed_twice_gets_the_accounts_of_the_entry_whose_secret_matched() {
        let apps = EsbApps::from_yaml(
            "apps:\n- appCode: cmdb\n  appSecret: old\n  accounts: ['0']\n- appCode: cmdb\n  appSecret: new\n  accounts: ['7']\n",
        )
        .unwrap();
        let Identity::EsbApp { accounts, .. } = apps.verify("cmdb", "new").unwrap().identity(None) else {
            panic!("an ESB identity")
        };
        assert!(app_allows(&accounts, "7"));
        assert!(!app_allows(&accounts, "0"), "the first entry's accounts are not the second's");
    }

    fn review(authenticated: bool, audiences: Option<&[&str]>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: audiences.map(|a| a.iter().map(ToString::to_string).collect()),
            user: Some(k8s_openapi::api::authentication::v1::UserInfo {
                username: Some("system:serviceaccount:ns:caller".into()),
                groups: Some(vec!["system:serviceaccounts".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_token_review_counts_only_when_it_names_heralds_audience() {
        assert!(reviewed_identity(Some(review(true, Some(&["herald"]))), "herald").is_some());
        assert!(reviewed_identity(Some(review(true, Some(&["other", "herald"]))), "herald").is_some());
        // An empty list means "valid for the API server's own audience": not herald's.
        assert!(reviewed_identity(Some(review(true, None)), "herald").is_none());
        assert!(reviewed_identity(Some(review(true, Some(&[]))), "herald").is_none());
        assert!(reviewed_identity(Some(review(true, Some(&["other"]))), "herald").is_none());
        assert!(reviewed_identity(Some(review(false, Some(&["herald"]))), "herald").is_none());
        assert!(reviewed_identity(None, "herald").is_none());
    }

    #[test]
    fn authorisation_answers_are_cached_per_whole_identity() {
        let identity =
            |groups: &[&str]| (Some("uid-1".to_string()), groups.iter().map(ToString::to_string).collect::<Vec<_>>());
        let (uid, admins) = identity(&["admins"]);
        let (_, others) = identity(&["others"]);
        let extra = BTreeMap::new();
        let key = |groups: &Vec<String>| decision_key("alice", &uid, groups, &extra, "0", Action::List);
        assert_ne!(key(&admins), key(&others), "a group change is another decision");
        assert_ne!(key(&admins).digest(), key(&others).digest(), "and is cached apart");
        assert_eq!(key(&admins).digest(), key(&admins.clone()).digest());
    }

    #[test]
    fn question_digests_keep_fields_apart() {
        let extra = BTreeMap::new();
        let uid = None;
        let digest = |user: &str, groups: &[&str], account: &str| {
            let groups: Vec<String> = groups.iter().map(ToString::to_string).collect();
            decision_key(user, &uid, &groups, &extra, account, Action::List).digest()
        };
        assert_ne!(digest("ab", &[], "c"), digest("a", &[], "bc"), "name and account do not run together");
        assert_ne!(digest("a", &["b", "c"], "0"), digest("a", &["bc"], "0"), "nor do groups");
        assert_ne!(digest("a", &[""], "0"), digest("a", &[], "0"));
        let with_uid = decision_key("a", &Some(String::new()), &[], &extra, "0", Action::List).digest();
        assert_ne!(with_uid, digest("a", &[], "0"), "an empty uid is not no uid");
    }

    const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJhdWQiOlsiaGVyYWxkIl0sInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpuczpjYWxsZXIifQ.c2lnbmF0dXJlLWJ5dGVzLWhlcmU";

    #[test]
    fn tokens_any_authenticator_might_accept_pass_the_local_check() {
        let tokens = [
            JWT,
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", // unsigned: refused by the API server, not here
            "abcdef.0123456789abcdef",              // bootstrap token
            "31ada4fd-adec-460c-809a-9e56ceb75269", // static token file
            "k8s-aws-v1.aHR0cHM6Ly9zdHMuYW1hem9uYXdzLmNvbS8_QWN0aW9u", // webhook (AWS IAM)
            "kubeconfig-u-abc12:x7k9m2p4q8",        // Rancher, with ':'
            "ya29.a0AfH6SMBx~y+z/w==",              // opaque, base64 with padding
            "x",
        ];
        for token in tokens {
            assert_eq!(check_token_shape(token), Ok(()), "{token}");
        }
        assert_eq!(check_token_shape(&"a".repeat(MAX_TOKEN_BYTES)), Ok(()), "exactly the bound");
    }

    #[test]
    fn tokens_no_authenticator_can_accept_are_refused_locally() {
        let table = [
            (String::new(), MalformedToken::Empty),
            ("a".repeat(MAX_TOKEN_BYTES + 1), MalformedToken::TooLong),
            (format!("{JWT}{}", "A".repeat(20_000)), MalformedToken::TooLong),
            ("abc def".into(), MalformedToken::Character),
            ("abc\tdef".into(), MalformedToken::Character),
            ("abc\ndef".into(), MalformedToken::Character),
            ("abc\u{0}".into(), MalformedToken::Character),
            ("abc\u{7f}".into(), MalformedToken::Character),
            ("tøken".into(), MalformedToken::Character),
            (format!("{JWT} "), MalformedToken::Character),
            ("eyJhbGciOiJIUzI1NiJ9.eyJ+/w.c2ln".into(), MalformedToken::NotBase64Url),
            ("eyJhbGciOiJIUzI1NiJ9..c2ln".into(), MalformedToken::NotBase64Url),
            ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0=.c2ln".into(), MalformedToken::NotBase64Url),
            ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln:".into(), MalformedToken::NotBase64Url),
            ("eyJhb.eyJzdWIiOiJ4In0.c2ln".into(), MalformedToken::NotBase64Url),
        ];
        for (token, reason) in table {
            assert_eq!(check_token_shape(&token), Err(reason), "{token:?}");
        }
    }

    /// A client whose API server is a listener that never answers, to see whether a
    /// review was attempted at all.
    fn silent_api_server() -> (std::net::TcpListener, kube::Client) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
        (listener, client)
    }

    #[tokio::test]
    async fn a_malformed_bearer_token_is_refused_without_a_token_review() {
        let (listener, client) = silent_api_server();
        let metrics = Arc::new(Metrics::new(false));
        let auth =
            Authenticator::new(client, &crate::config::AuthConfig::default(), EsbApps::default(), metrics.clone());
        let oversized = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        for header in ["Bearer abc def", "Bearer abc\u{1}", oversized.as_str(), "Bearer eyJhbGciOiJIUzI1NiJ9.eyJ=.x"] {
            let refused = auth.bearer(Some(header)).await;
            assert!(matches!(refused, Err(AuthError::Unauthenticated)), "{refused:?}");
            let (error, _) = refused.unwrap_err().to_api();
            assert_eq!((error.code.code(), error.code.http_status()), (1_199_027, 401), "as an invalid token");
        }
        tokio::task::yield_now().await;
        assert!(listener.accept().is_err(), "the API server was never contacted");
        let metrics = metrics.encode();
        assert!(metrics.lines().any(|l| l == "herald_auth_rejected_tokens_total 4"), "{metrics}");
        // The contrast: a well-formed token is sent for review (which this server never answers).
        let token = format!("Bearer {JWT}");
        let reviewed = tokio::time::timeout(Duration::from_millis(500), auth.bearer(Some(&token))).await;
        assert!(reviewed.is_err(), "{reviewed:?}");
        assert!(listener.accept().is_ok(), "a TokenReview was attempted");
    }

    #[test]
    fn the_cache_holds_its_capacity_and_evicts_the_oldest_first() {
        const CAPACITY: usize = 10_000;
        const INSERTS: u32 = 100_000;
        let now = Instant::now();
        let mut cache = BoundedCache::new(CAPACITY, Duration::from_secs(60));
        for n in 0..INSERTS {
            cache.insert(n, n, now);
            assert!(cache.len() <= CAPACITY, "{} entries after {n}", cache.len());
            assert_eq!(cache.order.len(), cache.len(), "one queue slot per entry: nothing to scan");
        }
        assert_eq!(cache.len(), CAPACITY);
        let kept = INSERTS - CAPACITY as u32;
        assert!((0..kept).all(|n| cache.get(&n, now).is_none()), "the oldest went first");
        assert!((kept..INSERTS).all(|n| cache.get(&n, now) == Some(n)), "the newest stay");
    }

    #[test]
    fn refreshing_one_answer_does_not_grow_the_cache() {
        let now = Instant::now();
        let mut cache = BoundedCache::new(3, Duration::from_secs(60));
        for n in 0..100_000 {
            cache.insert("token", n, now);
        }
        assert_eq!((cache.len(), cache.order.len()), (1, 1));
        assert_eq!(cache.get(&"token", now), Some(99_999));
    }

    #[test]
    fn answers_expire_after_the_ttl() {
        let ttl = Duration::from_secs(5);
        let stored = Instant::now();
        let mut cache = BoundedCache::new(10, ttl);
        cache.insert(1, "identity", stored);
        assert_eq!(cache.get(&1, stored + ttl - Duration::from_millis(1)), Some("identity"));
        assert_eq!(cache.get(&1, stored + ttl), None, "expired on read");
        cache.insert(1, "again", stored + ttl);
        assert_eq!(cache.get(&1, stored + ttl), Some("again"), "a refreshed answer counts from its refresh");
        let mut uncached = BoundedCache::new(10, Duration::ZERO);
        uncached.insert(1, "identity", stored);
        assert_eq!((uncached.len(), uncached.get(&1, stored)), (0, None), "cacheSeconds 0 caches nothing");
    }

    fn key(n: u32) -> Digest {
        sha256(&n.to_le_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn reviews_in_flight_never_exceed_the_bound() {
        let reviews = Reviews::<u32>::new(
            "test",
            Duration::from_secs(5),
            ReviewBounds { capacity: 100, in_flight: REVIEWS_IN_FLIGHT, ..REVIEW_BOUNDS },
            Arc::new(Metrics::new(false)),
        );
        let (running, most) = (&AtomicUsize::new(0), &AtomicUsize::new(0));
        // 20 distinct questions of 300 ms each: three rounds, all within the 1 s wait.
        let asked = (0..20).map(|n| {
            reviews.answer(key(n), async move {
                most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(n)
            })
        });
        let answers = futures::future::join_all(asked).await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        assert_eq!(most.load(Ordering::SeqCst), REVIEWS_IN_FLIGHT);
        assert!(reviews.asking.lock().is_empty(), "no question left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_finds_every_slot_taken_is_told_to_retry_within_the_wait() {
        let metrics = Arc::new(Metrics::new(false));
        let reviews = Reviews::<u32>::new(
            "test",
            Duration::from_secs(5),
            ReviewBounds { capacity: 100, in_flight: REVIEWS_IN_FLIGHT, ..REVIEW_BOUNDS },
            metrics.clone(),
        );
        let made = &AtomicUsize::new(0);
        let started = Instant::now();
        let asked = (0..=REVIEWS_IN_FLIGHT as u32).map(|n| {
            reviews.answer(key(n), async move {
                made.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(n)
            })
        });
        let mut asked: Vec<_> = asked.map(Box::pin).collect();
        let (refused, index, _) = futures::future::select_all(asked.iter_mut()).await;
        assert_eq!(index, REVIEWS_IN_FLIGHT, "the last one asked is the one refused");
        assert!(matches!(refused, Err(AuthError::Busy { review: "test" })), "{refused:?}");
        assert!((REVIEW_WAIT..REVIEW_WAIT + Duration::from_millis(10)).contains(&started.elapsed()));
        assert_eq!(made.load(Ordering::SeqCst), REVIEWS_IN_FLIGHT, "its review was never made");
        let error = refused.unwrap_err();
        assert!(error.is_busy());
        assert_eq!(error.to_api().0.code, ErrorCode::Internal, "1199999, as other overloads");
        let metrics = metrics.encode();
        assert!(metrics.contains(r#"herald_auth_reviews_total{kind="test",outcome="busy"} 1"#), "{metrics}");
    }

    #[tokio::test(start_paused = true)]
    async fn reviews_started_per_second_are_bounded_however_fast_they_answer() {
        let bounds = ReviewBounds { in_flight: 64, per_second: 100.0, burst: 200.0, ..REVIEW_BOUNDS };
        let reviews = Reviews::<u32>::new("test", Duration::from_secs(5), bounds, Arc::new(Metrics::new(false)));
        let made = &AtomicUsize::new(0);
        let asked = (0..2000u32).map(|n| {
            reviews.answer(key(n), async move {
                made.fetch_add(1, Ordering::SeqCst);
                Ok(n)
            })
        });
        let answers = futures::future::join_all(asked).await;
        let busy = answers.iter().filter(|a| matches!(a, Err(AuthError::Busy { .. }))).count();
        // Everyone waited at most REVIEW_WAIT (1 s): the burst and one second's worth.
        assert_eq!(made.load(Ordering::SeqCst), 300);
        assert_eq!(busy, 1700);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_with_one_question_share_one_review_and_its_answer_is_cached() {
        let reviews = Reviews::<Option<u32>>::new(
            "test",
            Duration::from_secs(5),
            ReviewBounds { capacity: 100, in_flight: 1, ..REVIEW_BOUNDS },
            Arc::new(Metrics::new(false)),
        );
        let made = &AtomicUsize::new(0);
        let review = move || async move {
            made.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(None) // a refused token: cached as well
        };
        let answers = futures::future::join_all((0..50).map(|_| reviews.answer(key(7), review()))).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(None))), "{answers:?}");
        assert_eq!(made.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(matches!(reviews.answer(key(7), review()).await, Ok(None)));
        assert_eq!(made.load(Ordering::SeqCst), 1, "within the TTL");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(matches!(reviews.answer(key(7), review()).await, Ok(None)));
        assert_eq!(made.load(Ordering::SeqCst), 2, "after it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_review_is_not_cached() {
        let reviews = Reviews::<bool>::new(
            "test",
            Duration::from_secs(5),
            ReviewBounds { capacity: 100, in_flight: 1, ..REVIEW_BOUNDS },
            Arc::new(Metrics::new(false)),
        );
        let failed = reviews.answer(key(1), async { Err(AuthError::Unauthenticated) }).await;
        assert!(failed.is_err());
        assert!(matches!(reviews.answer(key(1), async { Ok(true) }).await, Ok(true)));
        assert!(reviews.asking.lock().is_empty());
    }
}
