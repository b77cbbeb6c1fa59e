//! The subscription operations behind both REST flavours (direct bk-cmdb paths and ESB
//! paths): create, update, delete and search EventSubscription resources, and the
//! authorised entry to the ping and telnet probes (which live in `crate::outbound`).
//! Writes are server-side applies with the field manager
//! `herald-api`, in herald's own namespace; reads come from the controller's cache, so
//! kubectl-made subscriptions appear too.

use super::auth::{Action, Identity};
use super::{Refusal, Services};
use crate::compat::input::{DialTarget, PingInput, SubscriptionInput};
use crate::compat::search::{SearchRequest, search};
use crate::compat::subscription_record::subscription_record;
use crate::compat::time::TimeZoneSetting;
use crate::compat::{ApiError, ErrorCode};
use crate::crd::{EventSubscription, OPERATOR_ANNOTATION, apply_body};
use crate::effective::name_key;
use crate::outbound::probe::ProbeError;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub const FIELD_MANAGER: &str = "herald-api";
/// How long a REST create waits for the controller to decide the new object's id.
const ID_WAIT: Duration = Duration::from_secs(20);
/// A name claimed by a REST write stays claimed this long, until the cache shows it.
const CLAIM_TTL: Duration = Duration::from_secs(30);

/// Serialises REST creates and renames so that `subscription_name` stays unique per
/// account under concurrency: the check and the claim happen under one lock, and a
/// claim covers the moment before the controller's cache shows the new object.
#[derive(Default)]
pub struct NameClaims {
    claims: Mutex<Claims>,
}

/// (account, subscription name) → (namespace, object name) of the claimant, and when.
type Claims = HashMap<(String, String), ((String, String), Instant)>;

/// A failed subscription write: the API server's refusal of the object itself (400, 422:
/// something input validation let through, such as control characters) is the caller's
/// invalid input; anything else is the server-side failure `code`.
fn write_refusal(error: kube::Error, code: ErrorCode) -> Refusal {
    match &error {
        kube::Error::Api(status) if status.code == 400 || status.code == 422 => {
            ApiError::invalid_because("subscription", &status.message).into()
        }
        _ => ApiError::new(code).with_detail(kube_detail(&error)).into(),
    }
}

fn kube_detail(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} {}: {}", status.code, status.reason, status.message),
        other => other.to_string(),
    }
}

impl Services {
    fn live_subscriptions(&self) -> Vec<Arc<EventSubscription>> {
        self.controller.subscriptions.state().into_iter().filter(|s| s.metadata.deletion_timestamp.is_none()).collect()
    }

    /// Whether `sub` counts for `account`: its namespace is allowed for the account.
    fn visible(&self, sub: &EventSubscription, account: &str) -> bool {
        self.controller.tenancy.allows(account, &sub.namespace().unwrap_or_default())
    }

    /// The live subscription with `id` of `account`, where `account` may have
    /// subscriptions: an object in a namespace not allowed for the account (refused as
    /// `NamespaceNotAllowed`) is not the account's to change, as it is not in its search.
    fn find(&self, account: &str, id: i64) -> Option<Arc<EventSubscription>> {
        self.live_subscriptions().into_iter().find(|s| {
            s.status.as_ref().and_then(|st| st.subscription_id) == Some(id)
                && name_key(&s.spec).0 == account
                && self.visible(s, account)
        })
    }

    /// The (namespace, object name) holding (`account`, `name`), if any.
    fn name_holder(&self, claims: &mut Claims, account: &str, name: &str) -> Option<(String, String)> {
        claims.retain(|_, (_, at)| at.elapsed() < CLAIM_TTL);
        if let Some((holder, _)) = claims.get(&(account.to_string(), name.to_string())) {
            return Some(holder.clone());
        }
        self.live_subscriptions()
            .into_iter()
            .find(|s| name_key(&s.spec) == (account, name) && self.visible(s, account))
            .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
    }

    /// Applies `input` as the spec of `object_name` in `namespace` under herald-api's
    /// field manager, recording the operator.
    async fn apply(
        &self,
        namespace: &str,
        object_name: &str,
        input: &SubscriptionInput,
        operator: &str,
    ) -> Result<EventSubscription, kube::Error> {
        let api = Api::<EventSubscription>::namespaced(self.controller.client.clone(), namespace);
        let mut patch =
            apply_body(object_name, serde_json::json!({ "annotations": { OPERATOR_ANNOTATION: operator } }));
        patch["spec"] = serde_json::json!(input.to_spec());
        api.patch(object_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await
    }

    /// Creates a subscription; answers the id the object ends up with.
    pub async fn create(
        &self,
        identity: &Identity,
        operator: Option<&str>,
        input: SubscriptionInput,
    ) -> Result<i64, Refusal> {
        let account = input.supplier_account.clone();
        self.auth.authorize(identity, &account, Action::Create).await?;
        let operator = operator.map(str::to_string).unwrap_or_else(|| identity.name());
        let object_name = format!("cmdb-{:016x}", fastrand::u64(..));
        {
            let mut claims = self.names.claims.lock().await;
            if self.name_holder(&mut claims, &account, &input.subscription_name).is_some() {
                return Err(ApiError::duplicated("subscription_name").into());
            }
            self.apply(&self.controller.config.namespace, &object_name, &input, &operator)
                .await
                .map_err(|e| write_refusal(e, ErrorCode::CreateFailed))?;
            let holder = (self.controller.config.namespace.clone(), object_name.clone());
            claims.insert((account, input.subscription_name.clone()), (holder, Instant::now()));
        }
        self.wait_for_id(&object_name).await
    }

    async fn wait_for_id(&self, object_name: &str) -> Result<i64, Refusal> {
        let key = ObjectRef::new(object_name).within(&self.controller.config.namespace);
        let deadline = Instant::now() + ID_WAIT;
        while Instant::now() < deadline {
            if let Some(id) = self.controller.subscriptions.get(&key).and_then(|s| s.status.as_ref()?.subscription_id) {
                return Ok(id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(ApiError::new(ErrorCode::CreateFailed)
            .with_detail("the subscription was stored but got no id in time; search for it by name")
            .into())
    }

    /// Replaces a subscription's spec as bk-cmdb does, keeping its id and statistics.
    pub async fn update(
        &self,
        identity: &Identity,
        operator: Option<&str>,
        id: i64,
        input: SubscriptionInput,
    ) -> Result<(), Refusal> {
        let account = input.supplier_account.clone();
        self.auth.authorize(identity, &account, Action::Update).await?;
        let not_found = || {
            Refusal::from(ApiError::new(ErrorCode::UpdateFailed).with_detail(format!("subscription {id} not found")))
        };
        let sub = self.find(&account, id).ok_or_else(not_found)?;
        let object_name = sub.name_any();
        let namespace = sub.namespace().unwrap_or_default();
        let operator = operator.map(str::to_string).unwrap_or_else(|| identity.name());
        let mut claims = self.names.claims.lock().await;
        let this = (namespace.clone(), object_name.clone());
        if self.name_holder(&mut claims, &account, &input.subscription_name).is_some_and(|holder| holder != this) {
            return Err(ApiError::duplicated("subscription_name").into());
        }
        self.apply(&namespace, &object_name, &input, &operator).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => not_found(),
            other => write_refusal(other, ErrorCode::UpdateFailed),
        })?;
        claims.insert((account, input.subscription_name), (this, Instant::now()));
        Ok(())
    }

    pub async fn delete(&self, identity: &Identity, account: &str, id: i64) -> Result<(), Refusal> {
        self.auth.authorize(identity, account, Action::Delete).await?;
        let not_found = || {
            Refusal::from(ApiError::new(ErrorCode::DeleteFailed).with_detail(format!("subscription {id} not found")))
        };
        let sub = self.find(account, id).ok_or_else(not_found)?;
        let api =
            Api::<EventSubscription>::namespaced(self.controller.client.clone(), &sub.namespace().unwrap_or_default());
        api.delete(&sub.name_any(), &DeleteParams::default()).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => not_found(),
            other => Refusal::from(ApiError::new(ErrorCode::DeleteFailed).with_detail(kube_detail(&other))),
        })?;
        let this = (sub.namespace().unwrap_or_default(), sub.name_any());
        self.names.claims.lock().await.retain(|_, (holder, _)| *holder != this);
        Ok(())
    }

    /// `{count, info}` over the account's subscriptions. The body is parsed (and its
    /// regexes compiled) only once the caller is authorised: an unauthorised caller costs
    /// no more than reading its body.
    pub async fn search(
        &self,
        identity: &Identity,
        account: &str,
        parse: impl FnOnce() -> Result<SearchRequest, ApiError>,
        max_limit: Option<usize>,
        tz: &TimeZoneSetting,
    ) -> Result<serde_json::Value, Refusal> {
        self.auth.authorize(identity, account, Action::List).await?;
        let mut request = parse()?;
        request.condition.force_owner(account);
        // Read from the API server, not the cache: a search sees every write that
        // answered before it, and a failing API server is a query failure (1103002).
        let api = Api::<EventSubscription>::all(self.controller.client.clone());
        let listed = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| Refusal::from(ApiError::new(ErrorCode::QueryFailed).with_detail(kube_detail(&e))))?;
        let records: Vec<serde_json::Value> = listed
            .items
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter(|s| name_key(&s.spec).0 == account && self.visible(s, account))
            .map(|s| subscription_record(&s, tz))
            .collect();
        let (count, info) = search(records, &request, max_limit);
        Ok(serde_json::json!({ "count": count, "info": info }))
    }

    /// POSTs `data` verbatim to the URL; any HTTP answer is a result, only a transport
    /// failure is an error (1103004).
    pub async fn ping(
        &self,
        identity: &Identity,
        account: &str,
        input: PingInput,
        timeout: Duration,
        body_cap: usize,
    ) -> Result<serde_json::Value, Refusal> {
        self.auth.authorize(identity, account, Action::Create).await?;
        let answer = self
            .outbound
            .ping(&input.callback_url, input.data, timeout, body_cap)
            .await
            .map_err(|error| probe_refusal(error, ErrorCode::PingFailed))?;
        Ok(serde_json::json!({ "http_status": answer.status, "response_body": String::from_utf8_lossy(&answer.body) }))
    }

    /// Dials the callback's host and port and closes; sends nothing.
    pub async fn telnet(
        &self,
        identity: &Identity,
        account: &str,
        target: DialTarget,
        timeout: Duration,
    ) -> Result<(), Refusal> {
        self.auth.authorize(identity, account, Action::Create).await?;
        self.outbound
            .telnet(&target.host, target.port, timeout)
            .await
            .map_err(|error| probe_refusal(error, ErrorCode::TelnetFailed))
    }
}

/// A refused or malformed destination is the caller's invalid `callback_url`; any other
/// probe failure is the probe's own code.
fn probe_refusal(error: ProbeError, code: ErrorCode) -> Refusal {
    match error {
        // Without the address: a host name's resolution inside the cluster is not the
        // caller's business.
        ProbeError::Refused(refused) => {
            ApiError::invalid_because("callback_url", format!("the destination is {}, a refused range", refused.reason))
                .into()
        }
        ProbeError::InvalidUrl => ApiError::invalid("callback_url").into(),
        other => ApiError::new(code).with_detail(other.to_string()).into(),
    }
}
