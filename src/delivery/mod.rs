//! Event delivery (docs/design.md §4-§5): publish matches events to subscriptions and
//! stores them durably; one worker per subscription delivers its queue; statistics flow
//! back into status. Module map: `index` (what delivery knows of subscriptions), `worker`
//! (order, retries, dead letters), `callback` (one HTTP attempt), `confirm` (httpstatus /
//! regular), `retry` (the backoff schedule), `signing` (Standard Webhooks), `projector`
//! (statistics into status under a write budget), `budget` (attempts in flight and answer
//! bytes held across all subscriptions). Requests leave through `crate::outbound`.

pub mod budget;
pub mod callback;
pub mod confirm;
pub mod index;
pub mod projector;
pub mod retry;
pub mod signing;
#[cfg(test)]
mod tests;
pub mod worker;

use crate::config::DeliveryConfig;
use crate::crd::EventSubscription;
use crate::event::StoredEvent;
use crate::outbound::Outbound;
use crate::shards::Shards;
use crate::store::{
    DeadLetter, EventStore, Fanout, LoggedAttempt, MINUTES_KEPT, MinuteCount, NewEvent, StoreError, WatchPage,
    minute_of, now_millis,
};
use crate::telemetry::Metrics;
use crate::tenancy::Tenancy;
use index::{Subscriber, SubscriptionIndex};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use parking_lot::Mutex;
use projector::StatusProjector;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
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

/// The next subscription another replica woke, or never when the store has no such feed.
async fn next_wake(wakes: &mut Option<mpsc::UnboundedReceiver<i64>>) -> Option<i64> {
    match wakes {
        Some(wakes) => wakes.recv().await,
        None => std::future::pending().await,
    }
}

/// Delivery as the shard owner's listener.
pub struct ShardedDelivery(pub Arc<Delivery>);

impl crate::shards::ShardEvents for ShardedDelivery {
    fn gained(&self, shard: u32) {
        self.0.shard_gained(shard);
    }
    fn lost(&self, shard: u32) {
        self.0.shard_lost(shard);
    }
    fn handed_back(&self, shard: u32) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.0.shard_handed_back(shard))
    }
    fn drained(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.0.drained.cancelled())
    }
}

/// How long stopped workers' attempts in flight may take to finish, at shutdown or when a
/// shard is handed back, and then again their outcomes to commit (the chart's termination
/// grace period leaves room for both).
const DRAIN: Duration = Duration::from_secs(10);

/// How often deleted subscriptions' queues are swept and old dead letters expired.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

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

/// What delivery is built from.
pub struct DeliveryParts {
    pub store: Arc<dyn EventStore>,
    pub index: Arc<SubscriptionIndex>,
    pub outbound: Outbound,
    /// Reads signing Secrets and writes status.
    pub client: kube::Client,
    /// The controller's cache: a subscription missing from it is deleted.
    pub subscriptions: Store<EventSubscription>,
    /// Checked again before every attempt: a namespace can lose an account at any time.
    pub tenancy: Tenancy,
    pub config: DeliveryConfig,
    pub dead_letter_retention: Duration,
    pub metrics: Arc<Metrics>,
    /// API-server writes per second, shared with the sources' status writer.
    pub status_budget: Arc<crate::conditions::WriteBudget>,
    /// With a shared store, the shards this replica delivers; None: it delivers all.
    pub shards: Option<Arc<Shards>>,
    pub shutdown: CancellationToken,
}

/// The running worker of each subscription that has one.
type Workers = HashMap<i64, (Arc<WorkerHandle>, JoinHandle<()>)>;

/// A stopped worker that may still be finishing an attempt.
struct Stopping {
    id: i64,
    handle: Arc<WorkerHandle>,
    task: JoinHandle<()>,
}

pub struct Delivery {
    store: Arc<dyn EventStore>,
    index: Arc<SubscriptionIndex>,
    outbound: Outbound,
    client: kube::Client,
    config: DeliveryConfig,
    /// Bounds on attempts in flight and answer bytes held, across all subscriptions.
    budgets: budget::Budgets,
    metrics: Arc<Metrics>,
    projector: StatusProjector,
    secrets: signing::SecretCache,
    subscriptions: Store<EventSubscription>,
    tenancy: Tenancy,
    workers: Mutex<Workers>,
    dead_letter_retention: Duration,
    shards: Option<Arc<Shards>>,
    shutdown: CancellationToken,
    /// Cancelled when the dispatcher's shutdown drain is over.
    drained: CancellationToken,
}

impl Delivery {
    pub fn new(parts: DeliveryParts) -> Arc<Self> {
        Arc::new(Delivery {
            projector: StatusProjector::new(parts.status_budget),
            secrets: signing::SecretCache::new(parts.client.clone()),
            store: parts.store,
            index: parts.index,
            outbound: parts.outbound,
            client: parts.client,
            budgets: budget::Budgets::new(&parts.config),
            config: parts.config,
            metrics: parts.metrics,
            subscriptions: parts.subscriptions,
            tenancy: parts.tenancy,
            workers: Mutex::default(),
            dead_letter_retention: parts.dead_letter_retention,
            shards: parts.shards,
            shutdown: parts.shutdown,
            drained: CancellationToken::new(),
        })
    }

    /// Whether this replica delivers `id` (with a shared store, it holds the id's shard).
    pub fn owns(&self, id: i64) -> bool {
        self.shards.as_ref().is_none_or(|shards| shards.owns(id))
    }

    /// Whether an attempt at `id` that ends now is this replica's to record: it still
    /// holds the shard, even while handing it back.
    fn holds(&self, id: i64) -> bool {
        self.shards.as_ref().is_none_or(|shards| shards.holds(id))
    }

    /// Whether `id` falls in delivery shard `shard` (never without shards).
    fn in_shard(&self, id: i64, shard: u32) -> bool {
        self.shards.as_ref().is_some_and(|shards| shards.of(id) == shard)
    }

    /// The supplier account of a subscription delivery knows.
    pub fn account_of(&self, id: i64) -> Option<String> {
        self.index.get(id).map(|s| s.effective.supplier_account.clone())
    }

    /// Up to `limit` of a subscription's dead letters, oldest event first.
    pub async fn dead_letters(&self, id: i64, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.store.dead_letters(id, limit).await
    }

    /// Up to `limit` of a subscription's logged attempts, newest first.
    pub async fn delivery_log(&self, id: i64, limit: usize) -> Result<Vec<LoggedAttempt>, StoreError> {
        self.store.delivery_log(id, limit).await
    }

    /// A subscription's per-minute attempts and failures over the last `MINUTES_KEPT`.
    pub async fn attempts_per_minute(&self, id: i64) -> Result<Vec<MinuteCount>, StoreError> {
        let now = minute_of(now_millis());
        self.store.attempts_per_minute(id, now - MINUTES_KEPT + 1..=now).await
    }

    /// Refreshes the gauges (`store_bytes`, `queue_depth`, attempts in flight, answer bytes
    /// held) for a scrape.
    pub async fn measure(&self) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.attempts_in_flight.set(gauge(self.budgets.attempts_in_flight()));
        self.metrics.answer_bytes_held.set(gauge(self.budgets.answers().held()));
        self.metrics.store_bytes.set(self.store.size_bytes());
        if let Ok(pending) = self.store.pending_total().await {
            self.metrics.queue_depth.set(pending);
        }
    }

    /// Matches each event (with its name) against the Ready subscriptions of its
    /// account, stores events and fan-out durably, and wakes the workers.
    /// Refused whole (`StoreError::TooLarge`) when one of the events can never be stored.
    pub async fn publish(self: &Arc<Self>, events: Vec<(StoredEvent, String)>) -> Result<Published, StoreError> {
        let matched = self.matched(&events);
        // An event no subscription matches is acknowledged and never stored, whatever its size.
        if let Some(index) =
            matched.iter().position(|event| !event.subscriptions.is_empty() && !self.store.fits(&event.body))
        {
            return Err(StoreError::TooLarge { index, bytes: matched[index].body.len() });
        }
        let fanouts = self.store.publish(matched).await?;
        Ok(self.queued(events.len(), fanouts))
    }

    /// Publishes a watch page's events as `publish` does, in one transaction with the
    /// page's cursor and pre-images (`page.events` is filled here). An event the store can
    /// never hold is left out, so that it cannot hold up the watch; its index in `events`
    /// is returned with the outcome for the caller to report.
    pub async fn ingest(
        self: &Arc<Self>,
        mut page: WatchPage,
        events: Vec<(StoredEvent, String)>,
    ) -> Result<(Published, Vec<usize>), StoreError> {
        let mut too_large = Vec::new();
        let mut kept = Vec::with_capacity(events.len());
        for (index, event) in self.matched(&events).into_iter().enumerate() {
            if event.subscriptions.is_empty() || self.store.fits(&event.body) {
                kept.push(event);
            } else {
                too_large.push(index);
            }
        }
        page.events = kept;
        let fanouts = self.store.ingest(page).await?;
        Ok((self.queued(events.len() - too_large.len(), fanouts), too_large))
    }

    fn matched(&self, events: &[(StoredEvent, String)]) -> Vec<NewEvent> {
        events
            .iter()
            .map(|(event, name)| {
                let subscriptions = self.index.matching(&event.bk_supplier_account, name);
                let body = serde_json::to_string(event).unwrap_or_default();
                NewEvent { body, subscriptions }
            })
            .collect()
    }

    /// After a durable publish: wakes the workers with new entries, counts.
    fn queued(self: &Arc<Self>, accepted: usize, fanouts: Vec<Vec<Fanout>>) -> Published {
        let mut summary = Published { accepted, ..Default::default() };
        let mut woken = HashSet::new();
        for Fanout { subscription_id, queued, .. } in fanouts.into_iter().flatten() {
            if queued {
                summary.queued += 1;
                woken.insert(subscription_id);
            } else {
                summary.overflowed += 1;
            }
            if self.owns(subscription_id) {
                self.projector.touch(subscription_id, 0);
            }
        }
        for id in woken {
            self.wake(id);
        }
        self.metrics.events_published.inc_by(u64::try_from(summary.accepted).unwrap_or(0));
        self.metrics.deliveries_queued.inc_by(u64::try_from(summary.queued).unwrap_or(0));
        summary
    }

    /// Moves a subscription's dead letters (all, or the given distribution ids) to the
    /// tail of its queue.
    pub async fn replay(self: &Arc<Self>, id: i64, distribution_ids: Option<Vec<i64>>) -> Result<usize, StoreError> {
        let moved = self.store.replay(id, distribution_ids).await?;
        if self.owns(id) {
            self.projector.touch(id, 0);
        }
        self.wake(id);
        Ok(moved)
    }

    /// Starts the subscription's worker if needed and tells it there is work; with a
    /// shared store, only on the replica holding its shard (the others announce it there).
    pub fn wake(self: &Arc<Self>, id: i64) {
        if !self.owns(id) {
            return;
        }
        let mut workers = self.workers.lock();
        if let Some((handle, task)) = workers.get(&id)
            && !task.is_finished()
        {
            handle.wake.notify_one();
            return;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        let handle = Arc::new(WorkerHandle::new(self.shutdown.child_token()));
        let task = tokio::spawn(worker::run(self.clone(), id, handle.clone()));
        workers.insert(id, (handle, task));
    }

    /// The object delivery knows as `sub` in the controller's cache: the same object (a
    /// re-created one with the same name has another uid) and not being deleted.
    fn live_object(&self, sub: &Subscriber) -> Option<Arc<EventSubscription>> {
        self.subscriptions
            .get(&ObjectRef::new(&sub.name).within(&sub.namespace))
            .filter(|o| o.uid().as_deref() == Some(sub.uid.as_str()) && o.metadata.deletion_timestamp.is_none())
    }

    fn exists(&self, sub: &Subscriber) -> bool {
        self.live_object(sub).is_some()
    }

    /// Drops everything of a deleted subscription: worker, queue, dead letters, counters.
    async fn forget(&self, id: i64) {
        if let Some((handle, _)) = self.workers.lock().remove(&id) {
            handle.stop.cancel();
        }
        self.index.remove(id);
        self.projector.set_gone(id, false);
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
                for id in stored.into_iter().filter(|id| self.owns(*id)) {
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
            if !exists(id) && self.owns(id) {
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
    pub async fn run(self: Arc<Self>, mut changes: mpsc::UnboundedReceiver<i64>) {
        // Shards are handed back after this, however it ends.
        let _drained = self.drained.clone().drop_guard();
        let mut wakes = self.store.wakes();
        self.sweep().await;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.tick().await;
        loop {
            tokio::select! {
                Some(id) = changes.recv() => {
                    // A running worker re-reads the spec; a Ready one without a worker gets one.
                    let has_worker = self.workers.lock().contains_key(&id);
                    let sub = self.index.get(id);
                    if has_worker || sub.as_ref().is_some_and(|s| s.ready) {
                        self.wake(id);
                    }
                    // Imported statistics show before the first delivery (the projection
                    // writes nothing when status already shows them).
                    if sub.is_some_and(|s| s.imported.is_some()) && self.owns(id) {
                        self.projector.touch(id, 0);
                    }
                }
                Some(id) = next_wake(&mut wakes) => self.wake(id),
                _ = sweep.tick() => self.sweep().await,
                _ = self.shutdown.cancelled() => break,
            }
        }
        let workers: Vec<Stopping> =
            self.workers.lock().drain().map(|(id, (handle, task))| Stopping { id, handle, task }).collect();
        self.settle(workers).await;
        tracing::info!("delivery stopped");
    }

    /// Waits up to `DRAIN` for stopped workers to end: attempts in flight may finish; the
    /// rest are aborted, and awaited, without an outcome and delivered again later (at
    /// least once). Then waits up to `DRAIN` again for the outcomes they recorded to be
    /// durable.
    async fn settle(&self, mut workers: Vec<Stopping>) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        for worker in &mut workers {
            let ended = match tokio::time::timeout_at(deadline, &mut worker.task).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::warn!(subscription = worker.id, drain = ?DRAIN, "an attempt in flight did not finish; it will be made again");
                    worker.task.abort();
                    (&mut worker.task).await
                }
            };
            if let Err(error) = ended
                && !error.is_cancelled()
            {
                tracing::error!(subscription = worker.id, %error, "a delivery worker failed");
            }
        }
        let last_ticket = workers.iter().map(|w| w.handle.last_ticket()).max().unwrap_or(0);
        match tokio::time::timeout(DRAIN, self.store.committed(last_ticket)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the last outcomes did not commit; they will be delivered again"),
            Err(_) => tracing::warn!(wait = ?DRAIN, "the last outcomes did not commit in time"),
        }
    }

    /// This replica now holds `shard`: its subscriptions get workers, and their status is
    /// projected again (the previous holder may have died between counting its last
    /// outcomes and writing them into status).
    pub fn shard_gained(self: &Arc<Self>, shard: u32) {
        for id in self.index.ids().into_iter().filter(|id| self.in_shard(*id, shard)) {
            self.wake(id);
            self.projector.touch(id, 0);
        }
    }

    /// This replica lost `shard`: its workers stop. An attempt in flight may finish; the
    /// new holder may make it again, as after a crash.
    pub fn shard_lost(&self, shard: u32) {
        self.stop_shard(shard);
    }

    /// This replica is handing `shard` back: its workers stop, and this resolves once they
    /// have ended and their outcomes are durable (`settle`).
    pub async fn shard_handed_back(&self, shard: u32) {
        let stopped = self.stop_shard(shard);
        self.settle(stopped).await;
    }

    /// Stops the workers of `shard`'s subscriptions and hands them over, still running
    /// their attempts in flight.
    fn stop_shard(&self, shard: u32) -> Vec<Stopping> {
        let mut workers = self.workers.lock();
        let ids: Vec<i64> = workers.keys().copied().filter(|id| self.in_shard(*id, shard)).collect();
        let stopped: Vec<Stopping> = ids
            .into_iter()
            .filter_map(|id| workers.remove(&id).map(|(handle, task)| Stopping { id, handle, task }))
            .collect();
        for worker in &stopped {
            worker.handle.stop.cancel();
        }
        stopped
    }

    /// Writes statistics into status until shutdown (see `projector`).
    pub async fn project_status(self: Arc<Self>) {
        self.projector.run(&self).await;
    }
}
