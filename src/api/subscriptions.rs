//! The subscription operations behind both REST flavours (direct bk-cmdb paths and ESB
//! paths): create, update, delete and search EventSubscription resources, and the
//! authorised entry to the ping and telnet probes (which live in `crate::outbound`).
//! Writes are server-side applies with the field manager `herald-api`, in herald's own
//! namespace. Reads come from the controller's catalog (so kubectl-made subscriptions
//! appear too) once it shows every write herald made: a read waits for that up to
//! `READ_WAIT`, and past it reads the API server instead (docs/design.md §3).

use super::auth::{Action, Identity};
use super::{Refusal, Services};
use crate::compat::input::{DialTarget, PingInput, SubscriptionInput};
use crate::compat::search::{InputOrder, SearchRequest, search};
use crate::compat::subscription_record::subscription_record;
use crate::compat::{ApiError, ErrorCode};
use crate::controller::catalog::Catalog;
use crate::crd::{EventSubscription, OPERATOR_ANNOTATION, apply_body};
use crate::effective::name_key;
use crate::outbound::probe::ProbeError;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub const FIELD_MANAGER: &str = "herald-api";
/// How long a REST create waits for the controller to decide the new object's id.
const ID_WAIT: Duration = Duration::from_secs(20);
/// How long a read waits for the catalog to show herald's latest writes before it reads
/// the API server instead.
const READ_WAIT: Duration = Duration::from_secs(2);

/// Serialises REST creates and renames that claim the same (account, name), so that
/// `subscription_name` stays unique per account; claims of different names proceed
/// concurrently. Under the lock, the name check reads a view that shows every earlier
/// write (read-your-writes), so the previous claimant's object is seen.
#[derive(Default)]
pub struct NameLocks {
    held: parking_lot::Mutex<HashMap<(String, String), NameMutex>>,
}

/// Held across the name check and the write, so an async lock.
type NameMutex = Arc<tokio::sync::Mutex<()>>;

/// One claimed (account, name); released on drop, and forgotten when nobody waits.
struct NameLock<'a> {
    locks: &'a NameLocks,
    key: (String, String),
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl NameLocks {
    async fn claim(&self, account: &str, name: &str) -> NameLock<'_> {
        let key = (account.to_string(), name.to_string());
        let lock = self.held.lock().entry(key.clone()).or_default().clone();
        let guard = lock.lock_owned().await;
        NameLock { locks: self, key, guard: Some(guard) }
    }
}

impl Drop for NameLock<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut held = self.locks.held.lock();
        // Only the map's own reference left: nobody holds or waits for this name.
        if held.get(&self.key).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            held.remove(&self.key);
        }
    }
}

/// What a read sees: the catalog once it shows herald's writes, or a LIST of the API
/// server when it does not within `READ_WAIT`.
enum View<'a> {
    Catalog(&'a Catalog),
    Listed(Vec<Arc<EventSubscription>>),
}

fn is_live(sub: &EventSubscription) -> bool {
    sub.metadata.deletion_timestamp.is_none()
}

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
    fn catalog(&self) -> &Catalog {
        &self.controller.catalog
    }

    /// A view showing every write herald made before this call; a failing LIST is the
    /// operation's failure `code`.
    async fn view(&self, code: ErrorCode) -> Result<View<'_>, Refusal> {
        if self.catalog().wait_caught_up(READ_WAIT).await {
            return Ok(View::Catalog(self.catalog()));
        }
        tracing::debug!("the catalog does not show herald's latest writes yet; reading the API server");
        let api = Api::<EventSubscription>::all(self.controller.client.clone());
        let listed = api
            .list(&ListParams::default())
            .await
            .map_err(|e| Refusal::from(ApiError::new(code).with_detail(kube_detail(&e))))?;
        Ok(View::Listed(listed.items.into_iter().map(Arc::new).collect()))
    }

    /// Whether `sub` counts for `account`: its namespace is allowed for the account.
    fn visible(&self, sub: &EventSubscription, account: &str) -> bool {
        self.controller.tenancy.allows(account, &sub.namespace().unwrap_or_default())
    }

    /// Whether `sub` is a live subscription of `account` in a namespace allowed for it:
    /// an object refused as `NamespaceNotAllowed` is not the account's to change, as it
    /// is not in its search.
    fn owned_by(&self, sub: &EventSubscription, account: &str) -> bool {
        is_live(sub) && name_key(&sub.spec).0 == account && self.visible(sub, account)
    }

    /// The subscription with `id` of `account`.
    fn find(&self, view: &View<'_>, account: &str, id: i64) -> Option<Arc<EventSubscription>> {
        let has_id = |s: &EventSubscription| s.status.as_ref().and_then(|st| st.subscription_id) == Some(id);
        match view {
            View::Catalog(catalog) => catalog.by_id(id),
            View::Listed(all) => all.iter().find(|s| has_id(s)).cloned(),
        }
        .filter(|s| self.owned_by(s, account))
    }

    /// The (namespace, object name) holding (`account`, `name`), if any.
    fn name_holder(&self, view: &View<'_>, account: &str, name: &str) -> Option<(String, String)> {
        let holds = |s: &EventSubscription| name_key(&s.spec) == (account, name) && self.owned_by(s, account);
        let holder = match view {
            View::Catalog(catalog) => catalog.holders(account, name).into_iter().find(|s| holds(s)),
            View::Listed(all) => all.iter().find(|s| holds(s)).cloned(),
        };
        holder.map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
    }

    /// Applies `input` as the spec of `object_name` in `namespace` under herald-api's
    /// field manager, recording the operator; the catalog is told to expect the result.
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
        let written = api.patch(object_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        self.catalog().expect_written(&written);
        Ok(written)
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
        let written = {
            let _claim = self.names.claim(&account, &input.subscription_name).await;
            let view = self.view(ErrorCode::CreateFailed).await?;
            if self.name_holder(&view, &account, &input.subscription_name).is_some() {
                return Err(ApiError::duplicated("subscription_name").into());
            }
            self.apply(&self.controller.config.namespace, &object_name, &input, &operator)
                .await
                .map_err(|e| write_refusal(e, ErrorCode::CreateFailed))?
        };
        self.wait_for_id(&written.uid().unwrap_or_default()).await
    }

    async fn wait_for_id(&self, uid: &str) -> Result<i64, Refusal> {
        let decided = || self.catalog().by_uid(uid).and_then(|s| s.status.as_ref()?.subscription_id);
        self.catalog().wait_for(ID_WAIT, decided).await.ok_or_else(|| {
            ApiError::new(ErrorCode::CreateFailed)
                .with_detail("the subscription was stored but got no id in time; search for it by name")
                .into()
        })
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
        let operator = operator.map(str::to_string).unwrap_or_else(|| identity.name());
        let _claim = self.names.claim(&account, &input.subscription_name).await;
        let view = self.view(ErrorCode::UpdateFailed).await?;
        let sub = self.find(&view, &account, id).ok_or_else(not_found)?;
        let this = (sub.namespace().unwrap_or_default(), sub.name_any());
        if self.name_holder(&view, &account, &input.subscription_name).is_some_and(|holder| holder != this) {
            return Err(ApiError::duplicated("subscription_name").into());
        }
        self.apply(&this.0, &this.1, &input, &operator).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => not_found(),
            other => write_refusal(other, ErrorCode::UpdateFailed),
        })?;
        Ok(())
    }

    pub async fn delete(&self, identity: &Identity, account: &str, id: i64) -> Result<(), Refusal> {
        self.auth.authorize(identity, account, Action::Delete).await?;
        let not_found = || {
            Refusal::from(ApiError::new(ErrorCode::DeleteFailed).with_detail(format!("subscription {id} not found")))
        };
        let view = self.view(ErrorCode::DeleteFailed).await?;
        let sub = self.find(&view, account, id).ok_or_else(not_found)?;
        let api =
            Api::<EventSubscription>::namespaced(self.controller.client.clone(), &sub.namespace().unwrap_or_default());
        let answer = api.delete(&sub.name_any(), &DeleteParams::default()).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => not_found(),
            other => Refusal::from(ApiError::new(ErrorCode::DeleteFailed).with_detail(kube_detail(&other))),
        })?;
        // A Status answer means the object is gone; an object answer means it is being
        // deleted (finalizers), which its resourceVersion shows.
        match answer.left() {
            Some(deleting) => self.catalog().expect_written(&deleting),
            None => self.catalog().expect_gone(&sub.uid().unwrap_or_default()),
        }
        Ok(())
    }

    /// `{count, info}` over the account's subscriptions. The body is parsed (and its
    /// regexes compiled) only once the caller is authorised: an unauthorised caller costs
    /// no more than reading its body. A failing API server (when the catalog lags) is a
    /// query failure (1103002).
    pub async fn search(
        &self,
        identity: &Identity,
        account: &str,
        parse: impl FnOnce() -> Result<SearchRequest, ApiError>,
        max_limit: Option<usize>,
    ) -> Result<serde_json::Value, Refusal> {
        self.auth.authorize(identity, account, Action::List).await?;
        let mut request = parse()?;
        let (count, info) = match self.view(ErrorCode::QueryFailed).await? {
            // The catalog's records are the account's own already (no owner condition).
            View::Catalog(catalog) => catalog.with_records(account, |records| {
                // Tenancy per namespace, decided once per search (records share a few).
                let mut allowed: Vec<(&str, bool)> = Vec::new();
                let visible = records.filter(|record| {
                    let namespace = record.namespace.as_str();
                    match allowed.iter().find(|(ns, _)| *ns == namespace) {
                        Some((_, verdict)) => *verdict,
                        None => {
                            let verdict = self.controller.tenancy.allows(account, namespace);
                            allowed.push((namespace, verdict));
                            verdict
                        }
                    }
                });
                search(visible.map(|record| &record.value), &request, max_limit, InputOrder::ById)
            }),
            View::Listed(all) => {
                request.condition.force_owner(account);
                let records: Vec<serde_json::Value> = all
                    .iter()
                    .filter(|s| self.owned_by(s, account))
                    .map(|s| subscription_record(s, &self.controller.config.time_zone))
                    .collect();
                search(&records, &request, max_limit, InputOrder::Unordered)
            }
        };
        Ok(serde_json::json!({ "count": count, "info": info }))
    }

    /// The account's subscriptions the caller may list, as a search sees them (the same
    /// authorisation, read-your-writes and tenancy), in id order: the console's list.
    pub async fn visible_subscriptions(
        &self,
        identity: &Identity,
        account: &str,
    ) -> Result<Vec<Arc<EventSubscription>>, Refusal> {
        self.auth.authorize(identity, account, Action::List).await?;
        let mut visible: Vec<Arc<EventSubscription>> = match self.view(ErrorCode::QueryFailed).await? {
            View::Catalog(catalog) => {
                let ids: Vec<i64> = catalog.with_records(account, |records| {
                    records.filter_map(|r| r.value["subscription_id"].as_i64()).collect()
                });
                // Account and tenancy checked on the object (it may have changed since the
                // records were read), as for a LIST.
                ids.into_iter().filter_map(|id| catalog.by_id(id)).filter(|s| self.owned_by(s, account)).collect()
            }
            View::Listed(all) => all.into_iter().filter(|s| self.owned_by(s, account)).collect(),
        };
        visible.sort_by_key(|s| s.status.as_ref().and_then(|st| st.subscription_id));
        Ok(visible)
    }

    /// The subscription `id` of the account, if the caller may list the account and a
    /// search would show it (as `find` does for an update or a delete).
    pub async fn visible_subscription(
        &self,
        identity: &Identity,
        account: &str,
        id: i64,
    ) -> Result<Option<Arc<EventSubscription>>, Refusal> {
        self.auth.authorize(identity, account, Action::List).await?;
        let view = self.view(ErrorCode::QueryFailed).await?;
        Ok(self.find(&view, account, id))
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
