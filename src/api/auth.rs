//! Authentication and authorisation (docs/design.md §7), and where ESB app credentials
//! come from.
//!
//! Kubernetes bearer tokens are checked with a TokenReview for herald's audience, and
//! each (identity, supplier account, action) with a SubjectAccessReview on the virtual
//! resource `supplieraccounts.herald.dev` named after the account, so plain RBAC grants
//! access per account. ESB apps are checked against their configured accounts. Answers
//! are cached for a few seconds. The anonymous switch is for development only.

use crate::compat::{ApiError, ErrorCode};
use crate::config::ApiConfig;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

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

/// Review answers and when they were fetched.
type Cache<K, V> = Mutex<HashMap<K, (Instant, V)>>;

pub struct Authenticator {
    client: kube::Client,
    audience: String,
    kubernetes: bool,
    anonymous: bool,
    ttl: Duration,
    /// By token digest: the identity, or None for a token the API server refused.
    tokens: Cache<Vec<u8>, Option<Identity>>,
    decisions: Cache<DecisionKey, bool>,
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
}

impl AuthError {
    pub fn to_api(&self) -> (ApiError, Option<serde_json::Value>) {
        match self {
            AuthError::Unauthenticated => (ApiError::new(ErrorCode::IdentityMissing), None),
            AuthError::Forbidden(permission) => (ApiError::new(ErrorCode::NoPermission), Some(permission.clone())),
            AuthError::Review { .. } => (ApiError::new(ErrorCode::Internal).with_detail(self.to_string()), None),
        }
    }
}

impl Authenticator {
    pub fn new(client: kube::Client, config: &crate::config::AuthConfig, esb: EsbApps) -> Self {
        Authenticator {
            client,
            audience: config.audience.clone(),
            kubernetes: config.kubernetes,
            anonymous: config.anonymous,
            ttl: Duration::from_secs(config.cache_seconds),
            tokens: Mutex::default(),
            decisions: Mutex::default(),
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
        // Cache by digest: raw tokens are never kept.
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().to_vec();
        let cached = self.tokens.lock().get(&digest).cloned();
        if let Some((at, identity)) = cached
            && at.elapsed() < self.ttl
        {
            return identity.ok_or(AuthError::Unauthenticated);
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::Review { review: "TokenReview", source })?;
        let identity = reviewed_identity(answer.status, &self.audience);
        let mut cache = self.tokens.lock();
        cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
        cache.insert(digest, (Instant::now(), identity.clone()));
        drop(cache);
        identity.ok_or(AuthError::Unauthenticated)
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
                let cached = self.decisions.lock().get(&key).copied();
                match cached {
                    Some((at, allowed)) if at.elapsed() < self.ttl => allowed,
                    _ => {
                        let allowed = self.review_access(&key).await?;
                        let mut cache = self.decisions.lock();
                        cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
                        cache.insert(key, (Instant::now(), allowed));
                        allowed
                    }
                }
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
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::Review { review: "SubjectAccessReview", source })?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
