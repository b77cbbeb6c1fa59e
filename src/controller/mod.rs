//! The EventSubscription controller: validates each subscription, decides its id once,
//! mirrors the id label, and writes `Ready` and the other status fields by server-side
//! apply, only when they changed.

pub mod catalog;
pub mod desired;
pub mod ids;
pub mod validation;

use crate::FIELD_MANAGER;
use crate::conditions::now;
use crate::config::Config;
use crate::crd::{EventSubscription, IMPORTED_STATISTICS_ANNOTATION, SUBSCRIPTION_ID_LABEL, apply_body};
use crate::delivery::index::{ImportedCounts, Subscriber, SubscriptionIndex};
use crate::effective::{Effective, Invalid, name_key};
use crate::tenancy::{Grant, Tenancy};
use catalog::Catalog;
use futures::{StreamExt, TryStreamExt, future::BoxFuture};
use ids::IdAllocator;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading id counter {name}: {source}")]
    ReadIdCounter { name: String, source: kube::Error },
    #[error("id counter {name} is corrupt: {reason}")]
    CorruptIdCounter { name: String, reason: String },
    #[error("reserving ids from counter {name}: {source}")]
    ReserveIds { name: String, source: kube::Error },
    #[error("reserving ids from counter {name}: {source}")]
    IdsExhausted { name: String, source: ids::IdsExhausted },
    #[error("writing status of {name}: {source}")]
    WriteStatus { name: String, source: kube::Error },
    #[error("re-reading {name} after a conflicting status write: {source}")]
    Reread { name: String, source: kube::Error },
    #[error("writing the id label of {name}: {source}")]
    WriteLabel { name: String, source: kube::Error },
    #[error("the namespace cache stopped")]
    NamespaceCacheStopped,
}

impl Error {
    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::ReadIdCounter { .. } => "read_id_counter",
            Error::CorruptIdCounter { .. } => "corrupt_id_counter",
            Error::ReserveIds { .. } => "reserve_ids",
            Error::IdsExhausted { .. } => "ids_exhausted",
            Error::WriteStatus { .. } => "write_status",
            Error::Reread { .. } => "reread",
            Error::WriteLabel { .. } => "write_label",
            Error::NamespaceCacheStopped => "namespace_cache_stopped",
        }
    }
}

/// Everything reconcile needs; tests build their own.
pub struct Context {
    pub client: Client,
    pub config: Arc<Config>,
    /// Every EventSubscription in the cluster (the controller's own cache).
    pub subscriptions: Store<EventSubscription>,
    /// The same cache indexed by name, id and account, and its read-your-writes.
    pub catalog: Arc<Catalog>,
    /// Every Namespace, for the tenancy label.
    pub namespaces: Store<Namespace>,
    /// The tenancy rule over `namespaces`.
    pub tenancy: Tenancy,
    pub ids: IdAllocator,
    pub recorder: Recorder,
    /// Delivery's view of subscriptions, fed with every validation result.
    pub index: Arc<SubscriptionIndex>,
    /// Consecutive reconcile failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<EventSubscription>, u32>>,
    /// Whether this replica writes (ids, status, labels, Events). Followers, with a shared
    /// store, only feed their delivery index from what the leader wrote.
    leading: std::sync::atomic::AtomicBool,
    /// Re-reconciles everything (a follower that became the leader).
    rescan: futures::channel::mpsc::UnboundedSender<()>,
}

impl Context {
    /// This replica holds the leader Lease from now on: it writes, and reconciles every
    /// subscription once.
    pub fn lead(&self) {
        self.leading.store(true, std::sync::atomic::Ordering::Release);
        // Fails only when the controller has stopped.
        let _ = self.rescan.unbounded_send(());
    }

    fn leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Builds the controller. Returns its context (whose caches the HTTP API reads too) and
/// the future that runs it until `shutdown` is cancelled. A controller built not
/// `leading` writes nothing until `Context::lead`.
pub fn build(
    client: Client,
    config: Arc<Config>,
    index: Arc<SubscriptionIndex>,
    leading: bool,
    shutdown: CancellationToken,
) -> (Arc<Context>, BoxFuture<'static, ()>) {
    let subscriptions_api = Api::<EventSubscription>::all(client.clone());
    // The controller's own watch, tapped: it feeds the catalog; reconcile never runs for
    // a deleted object, so its delete event is where delivery stops matching it (not at
    // the next sweep); and a change to one subscription can free or take a name another
    // one wants, so the other holders of its names are re-checked.
    let (subscriptions, subscription_writer) = reflector::store::<EventSubscription>();
    let catalog = Arc::new(Catalog::new(config.time_zone.clone()));
    let (recheck, rechecks) = futures::channel::mpsc::unbounded();
    let (fed, stored, deleted_from) = (catalog.clone(), subscriptions.clone(), index.clone());
    let watched = reflector::reflector(
        subscription_writer,
        watcher(subscriptions_api, watcher::Config::default().any_semantic()),
    )
    .backoff(WatchBackoff::default())
    .inspect_ok(move |event| {
        let applied = fed.apply(event, &stored);
        for id in applied.removed_ids {
            deleted_from.remove(id);
        }
        for object in applied.recheck {
            // Fails only when the controller has stopped.
            let _ = recheck.unbounded_send(object);
        }
    })
    .touched_objects();
    let controller = Controller::for_stream(watched, subscriptions.clone());

    // Namespace labels decide tenancy: one cache, and a change re-reconciles the
    // subscriptions in that namespace.
    let (namespaces, namespace_writer) = reflector::store::<Namespace>();
    let by_namespace = subscriptions.clone();
    let namespace_triggers = reflector::reflector(
        namespace_writer,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default().any_semantic()),
    )
    .backoff(WatchBackoff::default())
    .touched_objects()
    .filter_map(|ns| async move { ns.ok() })
    .flat_map(move |ns| {
        let name = ns.name_any();
        let refs: Vec<_> = by_namespace
            .state()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(name.as_str()))
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect();
        futures::stream::iter(refs)
    });

    let (rescan, rescans) = futures::channel::mpsc::unbounded();
    let controller = controller
        .trigger_backoff(WatchBackoff::default())
        .reconcile_on(namespace_triggers)
        .reconcile_on(rechecks)
        .reconcile_all_on(rescans);

    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: FIELD_MANAGER.into(), instance: Some(config.instance.clone()) },
    );
    let ids = IdAllocator::new(
        Api::<ConfigMap>::namespaced(client.clone(), &config.namespace),
        config.controller.id_counter.clone(),
        config.controller.id_block_size,
    );
    let tenancy = Tenancy::new(namespaces.clone(), config.namespace.clone(), config.controller.enforce_tenancy);
    let ctx = Arc::new(Context {
        client,
        config,
        subscriptions,
        catalog,
        namespaces,
        tenancy,
        ids,
        recorder,
        index,
        failures: Mutex::default(),
        leading: std::sync::atomic::AtomicBool::new(leading),
        rescan,
    });
    let run_ctx = ctx.clone();
    let run = async move {
        controller
            .graceful_shutdown_on(async move { shutdown.cancelled().await })
            .run(reconcile, error_policy, run_ctx)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "reconcile did not complete");
                }
            })
            .await;
        tracing::info!("controller stopped");
    };
    (ctx, Box::pin(run))
}

/// Backoff of the controller's watches: kube-runtime's default grows to 30 s, so after
/// an API-server outage changes were seen up to a minute late; cap it at 4 s.
#[derive(Default)]
struct WatchBackoff {
    next: Option<Duration>,
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next.unwrap_or(Duration::from_millis(500));
        self.next = Some((delay * 2).min(Duration::from_secs(4)));
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = None;
    }
}

fn ready_reason(sub: &EventSubscription) -> Option<&str> {
    sub.status.as_ref()?.conditions.iter().find(|c| c.type_ == desired::CONDITION_READY).map(|c| c.reason.as_str())
}

/// Waits until `store` has its initial list. `Store::wait_until_ready` wakes only the
/// last of several concurrent waiters (its oneshot keeps one waker), so poll again
/// every 100 ms rather than trust one wake-up.
pub async fn cache_ready<K>(store: &Store<K>) -> Result<(), reflector::store::WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) = tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            return result;
        }
    }
}

async fn reconcile(sub: Arc<EventSubscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    if sub.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    cache_ready(&ctx.namespaces).await.map_err(|_| Error::NamespaceCacheStopped)?;
    if !ctx.leading() {
        follow(&ctx, &sub);
        return Ok(Action::requeue(Duration::from_secs(ctx.config.controller.resync_seconds)));
    }
    let namespace = sub.namespace().unwrap_or_default();
    let api = Api::<EventSubscription>::namespaced(ctx.client.clone(), &namespace);
    let sub = ensure_status(&api, sub, &ctx).await?;
    mirror_id_label(&api, &sub).await?;
    ctx.failures.lock().remove(&ObjectRef::from_obj(sub.as_ref()));
    Ok(Action::requeue(Duration::from_secs(ctx.config.controller.resync_seconds)))
}

/// Every check beyond the schema, with `contenders` the subscriptions that may hold the
/// same (account, name): reconcile passes all of them, `prime_index` its own grouping.
fn validate<'a>(
    ctx: &Context,
    sub: &EventSubscription,
    effective: &Effective,
    id: i64,
    contenders: impl IntoIterator<Item = &'a EventSubscription>,
) -> Result<(), Invalid> {
    let allowed = |account: &str, namespace: &str| ctx.tenancy.allows(account, namespace);
    validation::check(sub, effective, contenders, &ctx.config.namespace, allowed)?;
    validation::check_imported_id(sub, id, |wanted| import_refusal(ctx, sub, wanted))
}

/// Why `sub`'s imported id `wanted` may not be claimed: its namespace holds no import
/// grant for the account, or the id is above `controller.maxImportedId`.
fn import_refusal(ctx: &Context, sub: &EventSubscription, wanted: i64) -> Option<Invalid> {
    let account = Effective::from_spec(&sub.spec).supplier_account;
    let namespace = sub.namespace().unwrap_or_default();
    let trusted = ctx.tenancy.grants(Grant::Import, &account, &namespace);
    validation::import_refusal(wanted, trusted, ctx.config.controller.max_imported_id, &account, &namespace)
}

/// The id to decide for an object that has none yet: its imported id when its namespace
/// may import for the account, the id is below the ceiling and no other object holds it;
/// otherwise (and for every object not imported) a fresh one.
async fn decide_id(sub: &EventSubscription, ctx: &Context) -> Result<i64, Error> {
    if let Some(wanted) = validation::imported_id(sub)
        && import_refusal(ctx, sub, wanted).is_none()
        && let Some(id) = ctx.ids.claim_imported(wanted, &sub.uid().unwrap_or_default()).await?
    {
        return Ok(id);
    }
    ctx.ids.next_id(ctx.catalog.highest_id() + 1).await
}

/// Writes the desired status when it differs from the current one. The first write of
/// an object's id carries the resourceVersion it was decided on: if another allocator
/// wrote an id first, the write fails with 409, and we re-read and keep the winner's id.
async fn ensure_status(
    api: &Api<EventSubscription>,
    mut sub: Arc<EventSubscription>,
    ctx: &Context,
) -> Result<Arc<EventSubscription>, Error> {
    let name = sub.name_any();
    loop {
        let decided = sub.status.as_ref().and_then(|s| s.subscription_id);
        let id = match decided {
            Some(id) => id,
            None => decide_id(&sub, ctx).await?,
        };
        let effective = Arc::new(Effective::from_spec(&sub.spec));
        let (account, subscription_name) = effective.name_key();
        let holders = ctx.catalog.holders(account, subscription_name);
        let validity = validate(ctx, &sub, &effective, id, holders.iter().map(AsRef::as_ref));
        let desired = desired::desired(&sub, id, &validity, now());
        if desired::ControllerStatus::current(&sub).as_ref() == Some(&desired) {
            publish_to_delivery(ctx, &sub, effective, id, validity.is_ok());
            return Ok(sub);
        }
        let precondition = if decided.is_none() { sub.resource_version() } else { None };
        // Delivery learns the result before clients can read it from status, so a
        // producer that sees Ready=True never publishes into a gap.
        publish_to_delivery(ctx, &sub, effective.clone(), id, validity.is_ok());
        match apply_status(api, &name, &desired, precondition).await {
            Ok(written) => {
                // The spec may have moved on while the status was written.
                let effective =
                    if written.spec == sub.spec { effective } else { Arc::new(Effective::from_spec(&written.spec)) };
                publish_to_delivery(ctx, &written, effective, id, validity.is_ok());
                announce_invalid(ctx, &sub, &validity).await;
                return Ok(Arc::new(written));
            }
            Err(kube::Error::Api(status)) if status.code == 409 && decided.is_none() => {
                // Our id lost: withdraw it from delivery, and never hand it out again
                // (events may already be queued under it; the sweep drops them). Only
                // allocators without leader election can race like this.
                ctx.index.remove(id);
                let fresh = api.get(&name).await.map_err(|source| Error::Reread { name: name.clone(), source })?;
                if let Some(winner) = fresh.status.as_ref().and_then(|s| s.subscription_id) {
                    tracing::info!(%name, id = winner, "another allocator decided the id first; keeping it");
                }
                sub = Arc::new(fresh);
            }
            Err(source) => {
                if decided.is_none() {
                    ctx.index.remove(id);
                }
                return Err(Error::WriteStatus { name, source });
            }
        }
    }
}

/// Fills delivery's index from the synced caches before herald reports ready, with the
/// same checks reconcile makes: readiness must mean that publish matching knows every
/// subscription that is Ready, and reconciles after a restart may take a while to reach
/// them all. Name checks read the catalog's holders of each name, so this costs O(n).
pub fn prime_index(ctx: &Context) -> usize {
    ctx.catalog.all().iter().filter(|sub| follow(ctx, sub)).count()
}

/// Tells delivery what the written status and the same checks as reconcile's say of `sub`,
/// without writing anything: priming, and a follower's whole reconcile. False when it has
/// no id yet (or is being deleted).
fn follow(ctx: &Context, sub: &EventSubscription) -> bool {
    let Some(id) = sub.status.as_ref().and_then(|s| s.subscription_id) else { return false };
    if sub.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let (account, name) = name_key(&sub.spec);
    let holders = ctx.catalog.holders(account, name);
    let effective = Arc::new(Effective::from_spec(&sub.spec));
    let validity = validate(ctx, sub, &effective, id, holders.iter().map(AsRef::as_ref));
    publish_to_delivery(ctx, sub, effective, id, validity.is_ok());
    true
}

/// Tells delivery the subscription's current effective spec and readiness.
fn publish_to_delivery(ctx: &Context, sub: &EventSubscription, effective: Arc<Effective>, id: i64, ready: bool) {
    ctx.index.upsert(Subscriber {
        id,
        uid: sub.uid().unwrap_or_default(),
        namespace: sub.namespace().unwrap_or_default(),
        name: sub.name_any(),
        generation: sub.metadata.generation.unwrap_or_default(),
        ready,
        effective,
        signing: sub.spec.signing.as_ref().map(|s| s.secret_ref.clone()),
        imported: imported_counts(sub),
    });
}

/// The statistics an imported subscription brought along (its annotation), if any.
fn imported_counts(sub: &EventSubscription) -> Option<ImportedCounts> {
    let text = sub.annotations().get(IMPORTED_STATISTICS_ANNOTATION)?;
    let counts: ImportedCounts = serde_json::from_str(text).ok()?;
    // User-writable: counts must be plausible (and leave room to add herald's own).
    let plausible = |n: i64| (0..=ids::MAX_ID).contains(&n);
    (plausible(counts.total) && plausible(counts.failure) && counts.failure <= counts.total).then_some(counts)
}

async fn apply_status(
    api: &Api<EventSubscription>,
    name: &str,
    status: &desired::ControllerStatus,
    resource_version: Option<String>,
) -> Result<EventSubscription, kube::Error> {
    let precondition = match resource_version {
        Some(rv) => serde_json::json!({ "resourceVersion": rv }),
        None => serde_json::json!({}),
    };
    let mut patch = apply_body(name, precondition);
    patch["status"] = serde_json::json!(status.to_patch());
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await
}

/// A Warning Event when a subscription becomes (or, after a spec change, stays) invalid.
async fn announce_invalid(ctx: &Context, before: &EventSubscription, validity: &Result<(), Invalid>) {
    let Err(invalid) = validity else { return };
    let same_generation = before.status.as_ref().and_then(|s| s.observed_generation) == before.metadata.generation;
    if same_generation && ready_reason(before) == Some(invalid.reason) {
        return;
    }
    let event = Event {
        type_: EventType::Warning,
        reason: invalid.reason.into(),
        note: Some(invalid.message.chars().take(1000).collect()),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &before.object_ref(&())).await {
        tracing::warn!(%error, name = %before.name_any(), "could not record Warning event");
    }
}

/// The id label is a mirror for `kubectl get -l`; a missing or forged value is corrected.
async fn mirror_id_label(api: &Api<EventSubscription>, sub: &EventSubscription) -> Result<(), Error> {
    let Some(id) = sub.status.as_ref().and_then(|s| s.subscription_id) else { return Ok(()) };
    let id = id.to_string();
    if sub.labels().get(SUBSCRIPTION_ID_LABEL) == Some(&id) {
        return Ok(());
    }
    let name = sub.name_any();
    let patch = apply_body(&name, serde_json::json!({ "labels": { SUBSCRIPTION_ID_LABEL: id } }));
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::WriteLabel { name, source })
}

/// Exponential backoff per object: 1 s doubling to 5 minutes.
fn error_policy(sub: Arc<EventSubscription>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut failures = ctx.failures.lock();
        let n = failures.entry(ObjectRef::from_obj(sub.as_ref())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff_delay(failures);
    tracing::warn!(name = %sub.name_any(), namespace = ?sub.namespace(), error = %error, kind = error.label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff_delay(consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(16);
    Duration::from_secs((1u64 << exponent).min(300))
}

#[cfg(test)]
mod tests {
    use super::backoff_delay;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(backoff_delay(1), Duration::from_secs(1));
        assert_eq!(backoff_delay(2), Duration::from_secs(2));
        assert_eq!(backoff_delay(5), Duration::from_secs(16));
        assert_eq!(backoff_delay(40), Duration::from_secs(300));
    }
}
