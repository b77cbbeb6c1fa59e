//! Event delivery (DESIGN.md §4-§5): publish matches events to subscriptions and stores
//! them durably; one worker per subscription delivers its queue; statistics flow back
//! into status. Module map: `index` (what delivery knows of subscriptions), `worker`
//! (order, retries, dead letters), `callback` (one HTTP attempt), `confirm` (httpstatus /
//! regular), `retry` (backoff), `guard` (refused destinations), `signing` (Standard
//! Webhooks), `status` (status projection under a write budget).

pub mod callback;
pub mod confirm;
pub mod guard;
pub mod index;
pub mod retry;
pub mod signing;
pub mod status;
pub mod worker;

use crate::config::{CallbackGuardConfig, DeliveryConfig};
use crate::crd::EventSubscription;
use crate::event::StoredEvent;
use crate::store::{EventStore, Fanout, NewEvent, StoreError, now_millis};
use crate::telemetry::Metrics;
use guard::{Guard, GuardedResolver};
use index::{Subscriber, SubscriptionIndex};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::WorkerHandle;

impl DeliveryConfig {
    pub fn max_age_millis(&self) -> i64 {
        i64::try_from(self.max_age_seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// How long shutdown waits for in-flight attempts (the chart's termination grace period
/// leaves room for it).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// How often deleted subscriptions' queues are swept and old dead letters expired.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid callbackGuard.allowCidrs: {0}")]
    Cidr(String),
    #[error("invalid callbackGuard.proxy: {0}")]
    Proxy(reqwest::Error),
    #[error("reading callbackGuard.caBundle {path}: {source}")]
    ReadCa { path: String, source: std::io::Error },
    #[error("callbackGuard.caBundle {path} holds no usable PEM certificate: {source}")]
    ParseCa { path: String, source: reqwest::Error },
    #[error("building the HTTP client: {0}")]
    Build(reqwest::Error),
}

/// The callback guard and the HTTP client every callback, ping and telnet goes through:
/// no redirects, no environment proxies unless configured, the guard in the resolver.
pub fn http_client(config: &CallbackGuardConfig) -> Result<(reqwest::Client, Arc<Guard>), ClientError> {
    let allowed =
        config.allow_cidrs.iter().map(|c| c.parse().map_err(ClientError::Cidr)).collect::<Result<Vec<_>, _>>()?;
    let guard = Arc::new(Guard::new(allowed));
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
    if let Some(proxy) = &config.proxy {
        builder = builder.proxy(reqwest::Proxy::all(proxy).map_err(ClientError::Proxy)?);
    }
    if let Some(path) = &config.ca_bundle {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| ClientError::ReadCa { path: shown.clone(), source })?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|source| ClientError::ParseCa { path: shown.clone(), source })?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok((builder.build().map_err(ClientError::Build)?, guard))
}

/// Summary of one publish call.
#[derive(Debug, Default, serde::Serialize)]
pub struct Published {
    /// Events stored.
    pub accepted: usize,
    /// Deliveries queued (events times matching subscriptions).
    pub queued: usize,
    /// Deliveries that went to dead letters because the backlog was full.
    pub overflowed: usize,
}

pub struct Delivery {
    pub store: Arc<dyn EventStore>,
    pub index: Arc<SubscriptionIndex>,
    pub http: reqwest::Client,
    pub guard: Arc<Guard>,
    pub config: DeliveryConfig,
    pub metrics: Arc<Metrics>,
    pub status: Arc<status::StatusProjector>,
    pub secrets: signing::SecretCache,
    /// The controller's cache: a subscription missing from it is deleted.
    subscriptions: Store<EventSubscription>,
    workers: Mutex<HashMap<i64, (Arc<WorkerHandle>, JoinHandle<()>)>>,
    dead_letter_retention: Duration,
    shutdown: CancellationToken,
}

impl Delivery {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn EventStore>,
        index: Arc<SubscriptionIndex>,
        http: reqwest::Client,
        guard: Arc<Guard>,
        client: kube::Client,
        subscriptions: Store<EventSubscription>,
        config: DeliveryConfig,
        dead_letter_retention: Duration,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Delivery {
            store,
            index,
            http,
            guard,
            status: Arc::new(status::StatusProjector::new(config.status_writes_per_second)),
            config,
            metrics,
            secrets: signing::SecretCache::new(client),
            subscriptions,
            workers: Mutex::default(),
            dead_letter_retention,
            shutdown,
        })
    }

    /// Matches each event (with its name) against the Ready subscriptions of its
    /// account, stores events and fan-out durably, and wakes the workers.
    pub async fn publish(self: &Arc<Self>, events: Vec<(StoredEvent, String)>) -> Result<Published, StoreError> {
        let new_events: Vec<NewEvent> = events
            .iter()
            .map(|(event, name)| {
                let subscriptions = self.index.matching(&event.bk_supplier_account, name);
                let body = serde_json::to_string(event).unwrap_or_default();
                NewEvent { body, subscriptions }
            })
            .collect();
        let fanouts = self.store.publish(new_events).await?;
        let mut summary = Published { accepted: events.len(), ..Default::default() };
        let mut woken = HashSet::new();
        for Fanout { subscription_id, queued, .. } in fanouts.into_iter().flatten() {
            if queued {
                summary.queued += 1;
                woken.insert(subscription_id);
            } else {
                summary.overflowed += 1;
            }
            self.status.touch(subscription_id, 0);
        }
        for id in woken {
            self.wake(id);
        }
        self.metrics.events_published.inc_by(u64::try_from(summary.accepted).unwrap_or(0));
        self.metrics.deliveries_queued.inc_by(u64::try_from(summary.queued).unwrap_or(0));
        Ok(summary)
    }

    /// Moves a subscription's dead letters (all, or the given distribution ids) to the
    /// tail of its queue.
    pub async fn replay(self: &Arc<Self>, id: i64, distribution_ids: Option<Vec<i64>>) -> Result<usize, StoreError> {
        let moved = self.store.replay(id, distribution_ids).await?;
        self.status.touch(id, 0);
        self.wake(id);
        Ok(moved)
    }

    /// Starts the subscription's worker if needed and tells it there is work.
    pub fn wake(self: &Arc<Self>, id: i64) {
        let Ok(mut workers) = self.workers.lock() else { return };
        if let Some((handle, task)) = workers.get(&id) {
            if !task.is_finished() {
                handle.wake.notify_one();
                return;
            }
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        let handle = Arc::new(WorkerHandle::new(self.shutdown.child_token()));
        let task = tokio::spawn(worker::run(self.clone(), id, handle.clone()));
        workers.insert(id, (handle, task));
    }

    /// Whether the subscription still exists as delivery knows it (same object, not
    /// being deleted), judged on the controller's cache.
    pub fn exists(&self, sub: &Subscriber) -> bool {
        self.subscriptions
            .get(&ObjectRef::new(&sub.name).within(&sub.namespace))
            .is_some_and(|o| o.uid().as_deref() == Some(sub.uid.as_str()) && o.metadata.deletion_timestamp.is_none())
    }

    /// Drops everything of a deleted subscription: worker, queue, dead letters, counters.
    pub async fn forget(&self, id: i64) {
        if let Ok(mut workers) = self.workers.lock() {
            if let Some((handle, _)) = workers.remove(&id) {
                handle.stop.cancel();
            }
        }
        self.index.remove(id);
        self.status.set_gone(id, false);
        match self.store.drop_subscription(id).await {
            Ok(()) => tracing::info!(subscription = id, "subscription deleted; its queue is dropped"),
            Err(error) => tracing::error!(%error, subscription = id, "dropping a deleted subscription's queue failed"),
        }
    }

    /// Drops queues of subscriptions that no longer exist and (re)starts workers for the
    /// rest; expires old dead letters. A subscription exists when the controller's cache
    /// shows an object with its id, or the object delivery knows it by (its id may have
    /// been written a moment ago, before the cache saw the status).
    async fn sweep(self: &Arc<Self>) {
        let live: HashSet<i64> = self
            .subscriptions
            .state()
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter_map(|s| s.status.as_ref()?.subscription_id)
            .collect();
        let exists = |id: i64| live.contains(&id) || self.index.get(id).is_some_and(|s| self.exists(&s));
        match self.store.subscriptions().await {
            Ok(stored) => {
                for id in stored {
                    if exists(id) {
                        self.wake(id);
                    } else {
                        self.forget(id).await;
                    }
                }
            }
            Err(error) => tracing::error!(%error, "sweep could not list the store's subscriptions"),
        }
        for id in self.index.ids() {
            if !exists(id) {
                self.forget(id).await;
            }
        }
        let cutoff =
            now_millis().saturating_sub(i64::try_from(self.dead_letter_retention.as_millis()).unwrap_or(i64::MAX));
        if let Err(error) = self.store.expire_dead_letters(cutoff).await {
            tracing::error!(%error, "expiring dead letters failed");
        }
        self.metrics.store_bytes.set(self.store.size_bytes());
    }

    /// Runs the dispatcher until shutdown: reacts to subscription changes, sweeps, and
    /// at the end waits for the workers' in-flight attempts.
    pub async fn run(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<i64>, client: kube::Client) {
        let projector = tokio::spawn(self.status.clone().run(
            client,
            self.store.clone(),
            self.index.clone(),
            self.subscriptions.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        self.sweep().await;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.tick().await;
        loop {
            tokio::select! {
                Some(id) = changes.recv() => {
                    // A running worker re-reads the spec; a Ready one without a worker gets one.
                    let has_worker = self.workers.lock().is_ok_and(|w| w.contains_key(&id));
                    if has_worker || self.index.get(id).is_some_and(|s| s.ready) {
                        self.wake(id);
                    }
                }
                _ = sweep.tick() => self.sweep().await,
                _ = self.shutdown.cancelled() => break,
            }
        }
        // In-flight attempts may finish within the drain; the rest are dropped without an
        // outcome and delivered again after the restart (at-least-once).
        let tasks: Vec<JoinHandle<()>> =
            self.workers.lock().map(|mut w| w.drain().map(|(_, (_, task))| task).collect()).unwrap_or_default();
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(SHUTDOWN_DRAIN, futures::future::join_all(tasks)).await.is_err() {
            tracing::warn!(drain = ?SHUTDOWN_DRAIN, "in-flight attempts did not finish; they will be delivered again after restart");
            for abort in aborts {
                abort.abort();
            }
        }
        let _ = projector.await;
        tracing::info!("delivery stopped");
    }
}
