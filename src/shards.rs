//! Delivery shards (docs/engines.md "Replicas"): with a shared store (JetStream) every herald
//! replica serves, and each subscription is delivered by exactly one of them at a time.
//! Subscriptions fall into `count` shards by id; each shard is a Kubernetes Lease
//! (`<lease>-shard-<n>`), taken and renewed with the same compare-and-swap as the leader
//! Lease (`crate::leader`). Each replica also renews a member Lease, holds its fair share
//! of the shards among the live members and hands the rest back, so a new replica gets shards and a dead one's shards
//! are taken over once their Leases expire.

use crate::leader::Leadership;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The shard a subscription belongs to.
pub fn shard_of(subscription_id: i64, count: u32) -> u32 {
    u32::try_from(subscription_id.rem_euclid(i64::from(count.max(1)))).unwrap_or(0)
}

/// What the shard owner tells delivery.
pub trait ShardEvents: Send + Sync {
    /// This replica now holds `shard`: start its subscriptions' workers.
    fn gained(&self, shard: u32);
    /// This replica no longer holds `shard` (or can no longer be sure it does): stop its
    /// workers before anyone else may take it.
    fn lost(&self, shard: u32);
    /// This replica is handing `shard` back: stop its workers and resolve once their
    /// attempts in flight have ended and those outcomes are durable (bounded by delivery's
    /// drain). The shard stays this replica's until then, so its next holder finds them
    /// settled and makes none of those attempts again.
    fn handed_back(&self, shard: u32) -> BoxFuture<'_, ()>;
    /// Resolves once delivery's shutdown drain is over: every worker has ended and its
    /// outcomes are durable.
    fn drained(&self) -> BoxFuture<'_, ()>;
}

/// A shard this replica holds.
struct Held {
    renewed: Instant,
    /// Being handed back: no new attempts, but outcomes are still recorded.
    leaving: bool,
}

pub struct Shards {
    count: u32,
    leases: Vec<Leadership>,
    /// This replica's presence (`<lease>-member-<identity>`): replicas holding no shard yet
    /// count towards the fair share too.
    member: Leadership,
    member_prefix: String,
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    held: Mutex<HashMap<u32, Held>>,
}

impl Shards {
    pub fn new(api: Api<Lease>, lease_prefix: &str, identity: String, count: u32, duration: Duration) -> Self {
        let leases = (0..count.max(1))
            .map(|n| Leadership::new(api.clone(), format!("{lease_prefix}-shard-{n}"), identity.clone(), duration))
            .collect();
        let member_prefix = format!("{lease_prefix}-member-");
        let member = Leadership::new(api.clone(), format!("{member_prefix}{identity}"), identity.clone(), duration);
        Shards { count: count.max(1), leases, member, member_prefix, api, identity, duration, held: Mutex::default() }
    }

    /// The shard `subscription_id` belongs to.
    pub fn of(&self, subscription_id: i64) -> u32 {
        shard_of(subscription_id, self.count)
    }

    /// Whether this replica delivers `subscription_id` now: it holds the shard and is not
    /// handing it back.
    pub fn owns(&self, subscription_id: i64) -> bool {
        self.held.lock().get(&self.of(subscription_id)).is_some_and(|held| !held.leaving)
    }

    /// Whether this replica still holds `subscription_id`'s shard, handing it back or not:
    /// an attempt that ends now is this replica's to record.
    pub fn holds(&self, subscription_id: i64) -> bool {
        self.held.lock().contains_key(&self.of(subscription_id))
    }

    /// Holds, renews and balances shards until `shutdown`, then hands them back once
    /// delivery has drained, renewing them meanwhile.
    pub async fn run(&self, events: &dyn ShardEvents, shutdown: CancellationToken) {
        let period = self.period();
        loop {
            self.round(events).await;
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.renewing_until(events.drained(), events).await;
        let held: Vec<u32> = self.held.lock().drain().map(|(shard, _)| shard).collect();
        for shard in held {
            self.leases[shard as usize].release().await;
        }
        self.member.release().await;
    }

    /// Runs `work` while renewing the held Leases, so that waiting for delivery never lets
    /// one lapse.
    async fn renewing_until(&self, work: impl Future<Output = ()>, events: &dyn ShardEvents) {
        tokio::pin!(work);
        loop {
            tokio::select! {
                () = &mut work => return,
                () = tokio::time::sleep(self.period()) => self.renew(events).await,
            }
        }
    }

    /// How often held Leases are renewed: a third of their duration.
    fn period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(300))
    }

    /// Stops delivering `shards` and, once their last outcomes are durable (renewing the
    /// Leases meanwhile), releases them.
    async fn hand_back(&self, shards: Vec<u32>, events: &dyn ShardEvents, why: &str) {
        for shard in &shards {
            if let Some(held) = self.held.lock().get_mut(shard) {
                held.leaving = true;
                tracing::info!(shard, why, "handing the shard back");
            }
        }
        let settled = futures::future::join_all(shards.iter().map(|&shard| events.handed_back(shard)));
        self.renewing_until(
            async {
                settled.await;
            },
            events,
        )
        .await;
        for shard in shards {
            if self.held.lock().remove(&shard).is_some() {
                self.leases[shard as usize].release().await;
            }
        }
    }

    /// Renews what is held (dropping what cannot be renewed in time), then moves towards
    /// this replica's fair share.
    async fn round(&self, events: &dyn ShardEvents) {
        self.renew(events).await;
        self.balance(events).await;
    }

    /// Renews this replica's member Lease and every held shard's, giving up a shard whose
    /// Lease another replica holds or that could not be renewed for two thirds of its
    /// duration.
    async fn renew(&self, events: &dyn ShardEvents) {
        if let Err(error) = self.member.try_hold().await {
            tracing::warn!(%error, "renewing this replica's member Lease failed");
        }
        let held: Vec<u32> = self.held.lock().keys().copied().collect();
        for shard in held {
            match self.leases[shard as usize].try_hold().await {
                Ok(true) => {
                    if let Some(held) = self.held.lock().get_mut(&shard) {
                        held.renewed = Instant::now();
                    }
                }
                Ok(false) => self.drop_shard(shard, events, "another replica holds it"),
                Err(error) => {
                    // Stop well before the Lease can expire and be taken.
                    let renewed = self.held.lock().get(&shard).map(|held| held.renewed);
                    if renewed.is_some_and(|at| at.elapsed() > self.duration * 2 / 3) {
                        self.drop_shard(shard, events, "its Lease could not be renewed");
                    } else {
                        tracing::warn!(%error, shard, "renewing a shard Lease failed; still delivering");
                    }
                }
            }
        }
    }

    /// Takes free shards up to this replica's fair share among the live members, or
    /// hands its extras back.
    async fn balance(&self, events: &dyn ShardEvents) {
        let replicas = match self.live_holders().await {
            Ok(holders) => holders,
            Err(error) => {
                tracing::warn!(%error, "listing shard Leases failed");
                return;
            }
        };
        let fair = usize::try_from(self.count).unwrap_or(1).div_ceil(replicas.max(1));
        let held = self.held.lock().len();
        if held > fair {
            let extra: Vec<u32> = self.held.lock().keys().copied().take(held - fair).collect();
            self.hand_back(extra, events, "another replica's fair share").await;
            return;
        }
        let mut wanted = fair - held;
        // Start at a replica-specific place, so replicas starting together try different shards.
        let offset = self.identity.bytes().map(u32::from).sum::<u32>() % self.count;
        for step in 0..self.count {
            if wanted == 0 {
                break;
            }
            let shard = (offset + step) % self.count;
            if self.held.lock().contains_key(&shard) {
                continue;
            }
            if let Ok(true) = self.leases[shard as usize].try_hold().await {
                self.held.lock().insert(shard, Held { renewed: Instant::now(), leaving: false });
                tracing::info!(shard, identity = %self.identity, "shard acquired");
                events.gained(shard);
                wanted -= 1;
            }
        }
    }

    fn drop_shard(&self, shard: u32, events: &dyn ShardEvents, why: &str) {
        if self.held.lock().remove(&shard).is_some() {
            tracing::info!(shard, why, "shard given up");
            events.lost(shard);
        }
    }

    /// Live replicas: holders of a live member or shard Lease, this one counted always.
    async fn live_holders(&self) -> Result<usize, kube::Error> {
        let now = jiff::Timestamp::now();
        let names: HashSet<String> = self.leases.iter().map(|l| l.name().to_string()).collect();
        let mut holders = HashSet::from([self.identity.clone()]);
        for lease in self.api.list(&Default::default()).await? {
            let Some(name) = lease.metadata.name.as_deref() else { continue };
            let Some(spec) = lease.spec.as_ref() else { continue };
            if !names.contains(name) && !name.starts_with(&self.member_prefix) {
                continue;
            }
            let holder = spec.holder_identity.clone().unwrap_or_default();
            if !holder.is_empty() && !crate::leader::available(spec, &self.identity, now) {
                holders.insert(holder);
            }
        }
        Ok(holders.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_has_one_shard_in_range() {
        for id in [-7, 0, 1, 15, 16, 17, i64::MAX] {
            assert!(shard_of(id, 16) < 16);
        }
        assert_eq!(shard_of(17, 16), 1);
        assert_eq!(shard_of(5, 0), 0, "no shards count as one");
    }
}
