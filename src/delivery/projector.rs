//! Statistics in status as a projection of the store: written by server-side apply under
//! the field manager `herald-delivery` (which owns `statistics` and the
//! `CallbackHealthy` condition), only when changed, within a global budget of writes
//! per second, oldest change first. API-server writes therefore follow the number of
//! changed subscriptions, never the event rate.

use super::Delivery;
use super::index::ImportedCounts;
use crate::conditions::{WriteBudget, now, set_condition};
use crate::crd::{EventSubscription, Statistics, apply_body};
use crate::store::Counters;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const FIELD_MANAGER: &str = "herald-delivery";
pub const CONDITION_CALLBACK_HEALTHY: &str = "CallbackHealthy";

/// How long a status waits for the change that marked it to commit before it shows the
/// durable counters meanwhile.
const COMMIT_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Marks {
    /// Subscriptions whose counters changed: when they first did, and the store ticket
    /// of the newest change (the mark stays until that ticket is settled, so status is
    /// never left showing counters older than the change that marked it).
    dirty: HashMap<i64, (Instant, u64)>,
    gone: HashSet<i64>,
}

pub struct StatusProjector {
    marks: Mutex<Marks>,
    /// Writes per second across all status writers.
    budget: Arc<WriteBudget>,
}

impl StatusProjector {
    pub fn new(budget: Arc<WriteBudget>) -> Self {
        StatusProjector { marks: Mutex::default(), budget }
    }

    /// Marks `id` changed by the store write `ticket` (0 for writes already durable).
    pub fn touch(&self, id: i64, ticket: u64) {
        let mut marks = self.marks.lock();
        let mark = marks.dirty.entry(id).or_insert((Instant::now(), ticket));
        mark.1 = mark.1.max(ticket);
    }

    pub fn set_gone(&self, id: i64, gone: bool) {
        let mut marks = self.marks.lock();
        let changed = if gone { marks.gone.insert(id) } else { marks.gone.remove(&id) };
        if changed {
            marks.dirty.entry(id).or_insert((Instant::now(), 0));
        }
    }

    /// The longest-changed subscription: (id, ticket of its newest change, gone).
    fn take_oldest(&self) -> Option<(i64, u64, bool)> {
        let mut marks = self.marks.lock();
        let id = marks.dirty.iter().min_by_key(|(_, (since, _))| *since).map(|(id, _)| *id)?;
        let (_, ticket) = marks.dirty.remove(&id)?;
        Some((id, ticket, marks.gone.contains(&id)))
    }

    /// Writes changed statuses until `delivery` shuts down, at most `budget` per second.
    pub(super) async fn run(&self, delivery: &Delivery) {
        let Delivery { store, index, metrics, shutdown, client, .. } = delivery;
        loop {
            tokio::select! {
                () = self.budget.take() => {}
                () = shutdown.cancelled() => return,
            }
            // Skipping an unchanged status costs no budget: look further in this tick.
            for _ in 0..64 {
                let Some((id, ticket, gone)) = self.take_oldest() else { break };
                let Some(sub) = index.get(id) else { continue };
                // By uid: an object re-created under the same name must not get the old
                // one's statistics.
                let Some(object) = delivery.live_object(&sub) else { continue };
                // Most commits land within moments; the wait is bounded, because a slow
                // engine must not hold every other subscription's status.
                drop(tokio::time::timeout(COMMIT_WAIT, store.committed(ticket)).await);
                let unsettled = store.settled() < ticket;
                if unsettled {
                    // The change is still being written (a slow engine, JetStream failing
                    // over): show the durable counters now and keep the mark, so status is
                    // written again once it lands instead of staying behind for good.
                    self.touch(id, ticket);
                }
                let counters = store.counters(id).await;
                let counters = match counters {
                    Ok(counters) => counters,
                    Err(error) => {
                        tracing::warn!(%error, subscription = id, "reading counters failed");
                        self.touch(id, 0);
                        break;
                    }
                };
                let Some(patch) = projection(&object, &counters, sub.imported, gone, now()) else {
                    if unsettled {
                        // Looked at once per tick until it lands.
                        break;
                    }
                    continue;
                };
                let api = Api::<EventSubscription>::namespaced(client.clone(), &sub.namespace);
                let params = PatchParams::apply(FIELD_MANAGER).force();
                match api.patch_status(&sub.name, &params, &Patch::Apply(&patch)).await {
                    Ok(_) => {
                        metrics.status_writes.inc();
                    }
                    Err(error) => {
                        // Usually the API server is unreachable: retry, but slowly.
                        tracing::warn!(%error, subscription = id, "writing delivery status failed; will retry");
                        self.touch(id, 0);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = shutdown.cancelled() => return,
                        }
                    }
                };
                break;
            }
        }
    }
}

fn millis_to_rfc3339(millis: i64) -> Option<String> {
    jiff::Timestamp::from_second(millis / 1000).ok().map(|t| t.to_string())
}

pub fn statistics(counters: &Counters) -> Statistics {
    Statistics {
        total: counters.total,
        failure: counters.failure,
        delivered: counters.delivered,
        dead_lettered: counters.dead_lettered,
        pending: counters.pending,
        last_delivery_time: counters.last_delivery_at.and_then(millis_to_rfc3339),
        last_error: counters.last_error.clone(),
        consecutive_failures: counters.consecutive_failures,
    }
}

/// `CallbackHealthy`: absent before the first attempt; False with reason `Gone` after
/// a 410, `Failing` while attempts fail; True once deliveries are confirmed.
pub fn callback_healthy(
    counters: &Counters,
    gone: bool,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> Option<Condition> {
    let (status, reason, message) = if gone {
        ("False", "Gone", "the callback answered 410 Gone; delivery resumes when the spec changes".to_string())
    } else if counters.total == 0 {
        return None;
    } else if counters.consecutive_failures > 0 {
        let error = counters.last_error.clone().unwrap_or_default();
        ("False", "Failing", format!("{} consecutive failed attempts; last: {error}", counters.consecutive_failures))
    } else {
        ("True", "Delivering", "the callback confirms deliveries".to_string())
    };
    Some(Condition {
        type_: CONDITION_CALLBACK_HEALTHY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    })
}

/// The status apply body, or None when the object already shows it.
/// `imported`: an imported subscription's old counts, which its statistics continue (its
/// health is judged on herald's own attempts only).
pub fn projection(
    object: &EventSubscription,
    counters: &Counters,
    imported: Option<ImportedCounts>,
    gone: bool,
    now: jiff::Timestamp,
) -> Option<serde_json::Value> {
    let mut statistics = statistics(counters);
    if let Some(imported) = imported {
        statistics.total = statistics.total.saturating_add(imported.total);
        statistics.failure = statistics.failure.saturating_add(imported.failure);
    }
    let current = object.status.clone().unwrap_or_default();
    let mut conditions = current.conditions.clone();
    let healthy = callback_healthy(counters, gone, object.metadata.generation, now);
    if let Some(condition) = healthy.clone() {
        set_condition(&mut conditions, condition);
    }
    let condition = conditions.into_iter().find(|c| Some(&c.type_) == healthy.as_ref().map(|h| &h.type_));
    let current_condition = current.conditions.iter().find(|c| c.type_ == CONDITION_CALLBACK_HEALTHY);
    if current.statistics.as_ref() == Some(&statistics) && current_condition == condition.as_ref() {
        return None;
    }
    let mut body = apply_body(&object.name_any(), serde_json::json!({}));
    body["status"] =
        serde_json::json!({ "statistics": statistics, "conditions": condition.into_iter().collect::<Vec<_>>() });
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EventSubscriptionSpec;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn health_follows_the_counters() {
        let none = Counters::default();
        assert!(callback_healthy(&none, false, Some(1), at(1)).is_none());
        let failing = Counters {
            total: 3,
            failure: 3,
            consecutive_failures: 3,
            last_error: Some("status 500".into()),
            ..Default::default()
        };
        let c = callback_healthy(&failing, false, Some(1), at(1)).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Failing"));
        assert!(c.message.contains("status 500"));
        let ok = Counters { total: 4, failure: 3, delivered: 1, ..Default::default() };
        assert_eq!(callback_healthy(&ok, false, Some(1), at(1)).unwrap().status, "True");
        assert_eq!(callback_healthy(&ok, true, Some(1), at(1)).unwrap().reason, "Gone");
    }

    #[test]
    fn imported_counts_start_the_statistics_but_health_waits_for_herald_s_own_attempts() {
        let object = EventSubscription::new("s", EventSubscriptionSpec::default());
        let imported = Some(ImportedCounts { total: 40, failure: 3 });
        let patch = projection(&object, &Counters::default(), imported, false, at(10)).expect("statistics to show");
        assert_eq!(
            (patch["status"]["statistics"]["total"].as_i64(), patch["status"]["statistics"]["failure"].as_i64()),
            (Some(40), Some(3))
        );
        assert_eq!(patch["status"]["conditions"], serde_json::json!([]), "no CallbackHealthy before an attempt");
        let own = Counters {
            total: 2,
            failure: 1,
            consecutive_failures: 1,
            last_error: Some("status 500".into()),
            ..Default::default()
        };
        let patch = projection(&object, &own, imported, false, at(10)).unwrap();
        assert_eq!(patch["status"]["statistics"]["total"], 42);
        assert_eq!(patch["status"]["conditions"][0]["reason"], "Failing");
    }

    #[test]
    fn an_unchanged_projection_is_not_written() {
        let mut object = EventSubscription::new("s", EventSubscriptionSpec::default());
        let counters = Counters { total: 2, delivered: 2, ..Default::default() };
        let patch = projection(&object, &counters, None, false, at(10)).expect("first write");
        object.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        assert!(projection(&object, &counters, None, false, at(20)).is_none());
        let more = Counters { total: 3, delivered: 3, ..Default::default() };
        let next = projection(&object, &more, None, false, at(30)).expect("changed counters");
        // The condition did not flip, so its transition time stays.
        assert_eq!(next["status"]["conditions"][0]["lastTransitionTime"], "1970-01-01T00:00:10Z");
    }
}
