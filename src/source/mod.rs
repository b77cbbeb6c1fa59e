//! Event sources (docs/sources.md): herald reads bk-cmdb's resource watch, the pull API
//! that replaced push subscriptions in bk-cmdb 3.10, and publishes every change as a
//! bk-cmdb v3.5 event. Module map: `client` (one watch request and its answer), `convert`
//! (watch events as v3.5 events), `watch` (the loop per source and resource, exactly once
//! into the store), `status` (what each watch reports and the status built from it). This
//! file is the supervisor: it follows the CmdbSource objects, starts and stops their
//! watches, and writes their status.

pub mod client;
pub mod convert;
pub mod status;
pub mod watch;

use crate::conditions::{WriteBudget, now};
use crate::config::Config;
use crate::crd::{CmdbSource, CmdbSourceSpec, ExpiryPolicy, PUBLISH_ACCOUNTS_LABEL, StartFrom};
use crate::delivery::Delivery;
use crate::outbound::body::ByteBudget;
use crate::outbound::{GuardConfig, Outbound};
use crate::store::EventStore;
use crate::telemetry::Metrics;
use crate::tenancy::{Grant, Tenancy};
use client::{AppCredentials, Endpoint, Position};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use parking_lot::Mutex;
use status::{Health, Problem, desired_status, status_patch};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Field manager of CmdbSource status (only herald writes it).
pub const FIELD_MANAGER: &str = "herald-sources";

/// Default `preImageLimit`.
pub const DEFAULT_PRE_IMAGE_LIMIT: i64 = 200_000;
/// Default `retentionSeconds`: the 3 hours bk-cmdb documents.
pub const DEFAULT_RETENTION_SECONDS: i64 = 3 * 3600;

/// How often every source is checked again (tenancy can change under a running one).
const RESYNC: Duration = Duration::from_secs(5);
/// A source's status is written at most this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// What the sources need; tests build their own.
pub struct SourceContext {
    pub client: kube::Client,
    pub store: Arc<dyn EventStore>,
    pub delivery: Arc<Delivery>,
    pub tenancy: Tenancy,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub status_budget: Arc<WriteBudget>,
    /// Answer bytes every watch of every source holds at once (`sources.readBudgetBytes`).
    pub read_budget: ByteBudget,
}

/// One running source.
struct Running {
    generation: Option<i64>,
    /// Whether tenancy allowed it when started (a change restarts it).
    allowed: bool,
    refusal: Option<Problem>,
    watches: Vec<(crate::crd::WatchResource, Arc<Mutex<Health>>)>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The store keys of every resource the spec lists (refused or not).
    keys: Vec<String>,
    last_written: Option<Instant>,
}

impl Running {
    /// Stops the watches and waits for them: a page being committed is committed before
    /// anything else touches the same store keys.
    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "a watch task failed");
            }
        }
        self.keys
    }
}

/// Follows every CmdbSource until `shutdown`: one watch loop per listed resource, restarted
/// when the spec changes, stopped (and its store position dropped) when the object goes.
pub async fn run(ctx: Arc<SourceContext>, shutdown: CancellationToken) {
    let (sources, writer) = reflector::store::<CmdbSource>();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<CmdbSource>::all(ctx.client.clone()), watcher::Config::default().any_semantic()),
    )
    // Every event, InitDone included: that is when the first list is complete.
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            changed = stream.next() => {
                if let Some(Err(error)) = changed {
                    tracing::warn!(%error, "watching CmdbSources failed; retrying");
                }
            }
            _ = resync.tick() => {}
            () = shutdown.cancelled() => break,
        }
        // Only once the first list is complete: before, a missing object is not a deleted one.
        if futures::FutureExt::now_or_never(sources.wait_until_ready()).is_some() {
            sync(&ctx, &sources, &mut running, &shutdown).await;
            sweep(&ctx, &running).await;
            tokio::select! {
                () = write_statuses(&ctx, &sources, &mut running) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }
    for (_, source) in running.drain() {
        source.stop().await;
    }
    tracing::info!("sources stopped");
}

/// Starts, restarts and stops watches to match the objects. A restarted source's old
/// watches have finished before its new ones start; positions of resources no longer
/// listed, and of deleted sources, are dropped once their watches have stopped.
async fn sync(
    ctx: &Arc<SourceContext>,
    sources: &Store<CmdbSource>,
    running: &mut HashMap<String, Running>,
    shutdown: &CancellationToken,
) {
    let mut live = HashSet::new();
    for source in sources.state() {
        let Some(uid) = source.uid() else { continue };
        if source.metadata.deletion_timestamp.is_some() {
            continue;
        }
        live.insert(uid.clone());
        let namespace = source.namespace().unwrap_or_default();
        let allowed = ctx.tenancy.grants(Grant::Publish, &source.spec.supplier_account, &namespace);
        let Some(current) = running.get(&uid) else {
            running.insert(uid.clone(), start(ctx, &source, &uid, allowed, shutdown).spawn(ctx));
            continue;
        };
        if current.generation == source.metadata.generation && current.allowed == allowed {
            // A watch ends only when stopped: one that has ended otherwise panicked. The
            // source is then shown as failed, not restarted into the same panic, until its
            // spec changes or herald restarts.
            if current.refusal.is_none() && current.tasks.iter().any(JoinHandle::is_finished) {
                tracing::error!(source = %source.name_any(), "a watch of this source failed; it stays stopped until its spec changes");
                let failed = Starting::idle(&source, &uid, allowed, shutdown).refused(Problem::new(
                    "WatchFailed",
                    "a watch failed (see herald's log); change the spec or restart herald to start it again",
                ));
                if let Some(old) = running.remove(&uid) {
                    old.stop().await;
                }
                running.insert(uid.clone(), failed.spawn(ctx));
            }
            continue;
        }
        let started = start(ctx, &source, &uid, allowed, shutdown);
        if let Some(old) = running.remove(&uid) {
            let listed: HashSet<&String> = started.running.keys.iter().collect();
            let dropped: Vec<String> = old.stop().await.into_iter().filter(|k| !listed.contains(k)).collect();
            drop_positions(ctx, dropped).await;
        }
        running.insert(uid.clone(), started.spawn(ctx));
    }
    let gone: Vec<String> = running.keys().filter(|uid| !live.contains(*uid)).cloned().collect();
    for uid in gone {
        if let Some(old) = running.remove(&uid) {
            let keys = old.stop().await;
            drop_positions(ctx, keys).await;
        }
    }
}

async fn drop_positions(ctx: &SourceContext, keys: Vec<String>) {
    for key in keys {
        if let Err(error) = ctx.store.drop_watch(&key).await {
            tracing::error!(%error, watch = %key, "dropping a watch position failed");
        }
    }
}

/// Drops every stored position no source lists: of sources deleted, or resources removed,
/// while herald was not running, and any whose drop failed before. After each sync, so
/// every listed key is in `running` (a small table read: one row per watch).
async fn sweep(ctx: &SourceContext, running: &HashMap<String, Running>) {
    let Ok(stored) = ctx.store.watches().await else { return };
    let listed: HashSet<&String> = running.values().flat_map(|r| &r.keys).collect();
    let stale: Vec<String> = stored.into_iter().filter(|key| !listed.contains(key)).collect();
    for key in &stale {
        tracing::info!(watch = %key, "dropping the position of a watch no source lists");
    }
    drop_positions(ctx, stale).await;
}

/// A source about to run: its state and the watch plans to spawn.
struct Starting {
    running: Running,
    plans: Vec<(watch::WatchPlan, Arc<Mutex<Health>>)>,
}

impl Starting {
    /// A source with no watches yet: its generation, tenancy verdict and store keys.
    fn idle(source: &CmdbSource, uid: &str, allowed: bool, shutdown: &CancellationToken) -> Starting {
        let keys = source.spec.resources.iter().map(|r| format!("{uid}/{}", convert::resource_name(r.resource)));
        Starting {
            running: Running {
                generation: source.metadata.generation,
                allowed,
                refusal: None,
                watches: Vec::new(),
                stop: shutdown.child_token(),
                tasks: Vec::new(),
                keys: keys.collect(),
                last_written: None,
            },
            plans: Vec::new(),
        }
    }

    /// Runs nothing and shows `problem` (its positions are kept).
    fn refused(mut self, problem: Problem) -> Starting {
        self.plans.clear();
        self.running.watches.clear();
        self.running.refusal = Some(problem);
        self
    }

    fn spawn(mut self, ctx: &Arc<SourceContext>) -> Running {
        for (plan, health) in self.plans {
            self.running.tasks.push(tokio::spawn(watch::run(ctx.clone(), plan, health, self.running.stop.clone())));
        }
        self.running
    }
}

fn start(
    ctx: &Arc<SourceContext>,
    source: &CmdbSource,
    uid: &str,
    allowed: bool,
    shutdown: &CancellationToken,
) -> Starting {
    let mut starting = Starting::idle(source, uid, allowed, shutdown);
    let namespace = source.namespace().unwrap_or_default();
    let name = format!("{namespace}/{}", source.name_any());
    if !allowed {
        tracing::warn!(source = %name, "source refused: its namespace may not publish its account");
        return starting.refused(Problem::new(
            "AccountNotAllowed",
            format!(
                "namespace {namespace} may not publish into supplier account {}: a cluster admin grants that with the namespace label {PUBLISH_ACCOUNTS_LABEL} (receiving the account's events is not enough)",
                source.spec.supplier_account
            ),
        ));
    }
    let endpoint = match endpoint(ctx, &source.spec, &namespace) {
        Ok(endpoint) => endpoint,
        Err(problem) => return starting.refused(problem),
    };
    let spec = &source.spec;
    let start = match spec.start.as_ref() {
        Some(s) if s.from == StartFrom::Time => match s.time.as_deref().map(str::parse::<jiff::Timestamp>) {
            Some(Ok(time)) => Position::StartFrom(time.as_second()),
            _ => {
                return starting.refused(Problem::new("InvalidSpec", "spec.start.time is not an RFC 3339 time"));
            }
        },
        _ => Position::Now,
    };
    let keys = starting.running.keys.clone();
    for (watched, key) in spec.resources.iter().zip(&keys) {
        let health = Arc::new(Mutex::new(Health::default()));
        let plan = watch::WatchPlan {
            key: key.clone(),
            source: name.clone(),
            reference: source.object_ref(&()),
            namespace: namespace.clone(),
            resource: watched.resource,
            fields: convert::watch_fields(watched.resource, &watched.fields),
            event_types: watched.event_types.clone(),
            objects: watched.objects.clone(),
            supplier_account: spec.supplier_account.clone(),
            start: start.clone(),
            on_expired: spec.on_cursor_expired.unwrap_or(ExpiryPolicy::Oldest),
            retention_seconds: spec.retention_seconds.unwrap_or(DEFAULT_RETENTION_SECONDS),
            pre_images: spec.pre_images.unwrap_or(false),
            pre_image_limit: spec.pre_image_limit.unwrap_or(DEFAULT_PRE_IMAGE_LIMIT),
            endpoint: endpoint.clone(),
            credentials_secret: spec.credentials_secret.clone(),
        };
        starting.running.watches.push((watched.resource, health.clone()));
        starting.plans.push((plan, health));
    }
    tracing::info!(source = %name, resources = starting.plans.len(), "source started");
    starting
}

/// The HTTP endpoint of a source: its URL, CA bundle and the guard's allowances (herald's
/// own namespace may reach `sources.ownNamespaceAllowCidrs` besides the callback guard's).
fn endpoint(ctx: &SourceContext, spec: &CmdbSourceSpec, namespace: &str) -> Result<Endpoint, Problem> {
    let config = &ctx.config;
    let base = reqwest::Url::parse(&spec.url).map_err(|e| Problem::new("InvalidSpec", format!("spec.url: {e}")))?;
    let mut guard: GuardConfig = config.callback_guard.clone();
    if namespace == config.namespace {
        guard.allow_cidrs.extend(config.sources.own_namespace_allow_cidrs.iter().copied());
    }
    let outbound = Outbound::with_roots(&guard, spec.ca_bundle.as_deref().map(str::as_bytes))
        .map_err(|e| Problem::new("InvalidSpec", e.to_string()))?;
    Ok(Endpoint {
        outbound,
        base,
        api: spec.api,
        supplier_account: spec.supplier_account.clone(),
        user: spec.user.clone().unwrap_or_else(|| "admin".into()),
        app: None,
        max_answer_bytes: config.sources.max_answer_bytes,
        read_budget: ctx.read_budget.clone(),
    })
}

/// ESB app credentials from keys `bk_app_code` and `bk_app_secret` of a Secret.
pub async fn read_app_credentials(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<AppCredentials, Problem> {
    let missing = |why: String| Problem::new("CredentialsMissing", format!("Secret {namespace}/{name}: {why}"));
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|e| missing(crate::kube_error_summary(&e)))?;
    let key = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| missing(format!("no key {k}")))
    };
    Ok(AppCredentials { code: key("bk_app_code")?, secret: key("bk_app_secret")? })
}

/// Writes each changed source status, at most every `STATUS_INTERVAL` per source, each
/// write taking a slot of the shared budget.
async fn write_statuses(ctx: &SourceContext, sources: &Store<CmdbSource>, running: &mut HashMap<String, Running>) {
    for source in sources.state() {
        let Some(uid) = source.uid() else { continue };
        let Some(current) = running.get_mut(&uid) else { continue };
        if current.last_written.is_some_and(|at| at.elapsed() < STATUS_INTERVAL) {
            continue;
        }
        let watches: Vec<_> = current.watches.iter().map(|(r, h)| (*r, h.lock().clone())).collect();
        let desired = desired_status(&source, current.refusal.as_ref(), &watches, now());
        let Some(patch) = status_patch(&source, &desired) else { continue };
        ctx.status_budget.take().await;
        let api = Api::<CmdbSource>::namespaced(ctx.client.clone(), &source.namespace().unwrap_or_default());
        match api
            .patch_status(&source.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                current.last_written = Some(Instant::now());
                ctx.metrics.status_writes.inc();
            }
            Err(error) => {
                tracing::warn!(error = %crate::kube_error_summary(&error), source = %source.name_any(), "writing source status failed; will retry");
            }
        }
    }
}
