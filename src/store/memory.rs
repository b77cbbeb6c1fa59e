//! An in-memory `EventStore` for unit tests of delivery: the same semantics as the SQLite
//! store (fan-out with per-subscription distribution ids, queue order, counters moving
//! with the queue, backlog cap, dead letters and replay, quota), none of its durability.
//! Every write is "committed" when it returns.

use super::{
    Attempt, AttemptResult, Counters, DeadLetter, EventStore, Fanout, LOGGED_ATTEMPTS, Limits, LoggedAttempt,
    MINUTES_KEPT, Millis, MinuteCount, NewEvent, Outcome, Queued, StoreError, WatchPage, WatchPosition, minute_of,
    now_millis,
};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};

struct Entry {
    event_id: i64,
    distribution_id: i64,
    attempts: u32,
    enqueued_at: Millis,
}

struct Letter {
    event_id: i64,
    attempts: u32,
    reason: String,
    error: String,
    dead_at: Millis,
}

struct Subscription {
    next_distribution_id: i64,
    next_position: i64,
    counters: Counters,
    queue: BTreeMap<i64, Entry>,
    dead: BTreeMap<i64, Letter>,
    /// Newest last.
    log: VecDeque<LoggedAttempt>,
    /// minute → (attempts, failures).
    minutes: BTreeMap<i64, (i64, i64)>,
}

impl Default for Subscription {
    fn default() -> Self {
        Subscription {
            next_distribution_id: 1,
            next_position: 1,
            counters: Counters::default(),
            queue: BTreeMap::new(),
            dead: BTreeMap::new(),
            log: VecDeque::new(),
            minutes: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct State {
    /// Event bodies and how many queue entries and dead letters still refer to them.
    events: HashMap<i64, (String, usize)>,
    next_event_id: i64,
    subscriptions: BTreeMap<i64, Subscription>,
    next_ticket: u64,
    watches: BTreeMap<String, Watch>,
}

#[derive(Default)]
struct Watch {
    cursor: String,
    events_read: i64,
    /// instance → (detail, when it was last changed).
    pre_images: HashMap<String, (String, i64)>,
    next_touch: i64,
}

impl State {
    fn release(&mut self, event_id: i64) {
        if let Some((_, refs)) = self.events.get_mut(&event_id) {
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.events.remove(&event_id);
            }
        }
    }

    fn size(&self) -> u64 {
        self.events.values().map(|(body, _)| body.len() as u64).sum()
    }
}

pub struct MemoryStore {
    state: Mutex<State>,
    limits: Limits,
    /// How many of the next `record_attempt` calls fail to be written (a test's fault).
    failing_records: Mutex<usize>,
    lost_outcomes: Mutex<std::collections::HashSet<i64>>,
}

impl MemoryStore {
    pub fn new(limits: Limits) -> Self {
        MemoryStore {
            state: Mutex::default(),
            limits,
            failing_records: Mutex::default(),
            lost_outcomes: Mutex::default(),
        }
    }

    fn check_quota(&self, state: &State) -> Result<(), StoreError> {
        let size = state.size();
        if size > self.limits.quota_bytes {
            return Err(StoreError::OverQuota { size, quota: self.limits.quota_bytes });
        }
        Ok(())
    }

    /// Makes the next `count` outcome writes fail, as a failed commit would.
    pub fn fail_next_records(&self, count: usize) {
        *self.failing_records.lock() = count;
    }
}

fn publish(state: &mut State, events: Vec<NewEvent>, backlog_cap: i64) -> Vec<Vec<Fanout>> {
    let now = now_millis();
    let mut fanouts = Vec::with_capacity(events.len());
    for event in events {
        if event.subscriptions.is_empty() {
            fanouts.push(Vec::new());
            continue;
        }
        state.next_event_id += 1;
        let event_id = state.next_event_id;
        state.events.insert(event_id, (event.body, event.subscriptions.len()));
        let mut fanout = Vec::with_capacity(event.subscriptions.len());
        for subscription_id in event.subscriptions {
            let sub = state.subscriptions.entry(subscription_id).or_default();
            let distribution_id = sub.next_distribution_id;
            sub.next_distribution_id += 1;
            let queued = sub.counters.pending < backlog_cap;
            if queued {
                sub.queue.insert(sub.next_position, Entry { event_id, distribution_id, attempts: 0, enqueued_at: now });
                sub.next_position += 1;
                sub.counters.pending += 1;
            } else {
                let error = format!("backlog of {backlog_cap} pending events is full");
                let letter = Letter { event_id, attempts: 0, reason: "BacklogFull".into(), error, dead_at: now };
                sub.dead.insert(distribution_id, letter);
                sub.counters.dead_lettered += 1;
            }
            fanout.push(Fanout { subscription_id, distribution_id, queued });
        }
        fanouts.push(fanout);
    }
    fanouts
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl EventStore for MemoryStore {
    fn publish(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>> {
        let mut state = self.state.lock();
        ready(self.check_quota(&state).map(|()| publish(&mut state, events, self.limits.backlog_cap)))
    }

    fn watch_position(&self, watch: &str) -> BoxFuture<'_, Result<Option<WatchPosition>, StoreError>> {
        let state = self.state.lock();
        ready(Ok(state.watches.get(watch).map(|w| WatchPosition {
            cursor: w.cursor.clone(),
            events_read: w.events_read,
            pre_images: i64::try_from(w.pre_images.len()).unwrap_or(i64::MAX),
        })))
    }

    fn ingest(&self, page: WatchPage) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>> {
        let mut state = self.state.lock();
        if page.grows_store()
            && let Err(error) = self.check_quota(&state)
        {
            return ready(Err(error));
        }
        let fanouts = publish(&mut state, page.events, self.limits.backlog_cap);
        let watch = state.watches.entry(page.watch).or_default();
        watch.cursor = page.cursor;
        watch.events_read += page.read;
        if page.forget_pre_images {
            watch.pre_images.clear();
        }
        let changed = !page.pre_images.is_empty();
        for (instance, detail) in page.pre_images {
            match detail {
                Some(detail) => {
                    watch.pre_images.insert(instance, (detail, watch.next_touch));
                }
                None => {
                    watch.pre_images.remove(&instance);
                }
            }
            watch.next_touch += 1;
        }
        // As SQLite does: the limit is applied when a page changes pre-images.
        let limit = usize::try_from(page.pre_image_limit.max(0)).unwrap_or(usize::MAX);
        if changed && watch.pre_images.len() > limit {
            let mut ages: Vec<(i64, String)> = watch.pre_images.iter().map(|(k, (_, t))| (*t, k.clone())).collect();
            ages.sort();
            for (_, instance) in ages.into_iter().take(watch.pre_images.len() - limit) {
                watch.pre_images.remove(&instance);
            }
        }
        ready(Ok(fanouts))
    }

    fn pre_images(
        &self,
        watch: &str,
        instances: Vec<String>,
    ) -> BoxFuture<'_, Result<HashMap<String, String>, StoreError>> {
        let state = self.state.lock();
        let kept = state.watches.get(watch).map(|w| &w.pre_images);
        let found = instances
            .into_iter()
            .filter_map(|i| kept.and_then(|k| k.get(&i)).map(|(detail, _)| (i, detail.clone())))
            .collect();
        ready(Ok(found))
    }

    fn drop_watch(&self, watch: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        self.state.lock().watches.remove(watch);
        ready(Ok(()))
    }

    fn watches(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        ready(Ok(self.state.lock().watches.keys().cloned().collect()))
    }

    fn queued(
        &self,
        subscription_id: i64,
        after_position: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Queued>, StoreError>> {
        let state = self.state.lock();
        let page = state
            .subscriptions
            .get(&subscription_id)
            .map(|sub| {
                sub.queue
                    .range(after_position + 1..)
                    .take(limit)
                    .map(|(&position, entry)| Queued {
                        subscription_id,
                        position,
                        event_id: entry.event_id,
                        distribution_id: entry.distribution_id,
                        attempts: entry.attempts,
                        enqueued_at: entry.enqueued_at,
                        body: state.events.get(&entry.event_id).map(|(body, _)| body.clone()).unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ready(Ok(page))
    }

    fn record_attempt(&self, attempt: Attempt) -> Result<u64, StoreError> {
        let mut state = self.state.lock();
        state.next_ticket += 1;
        let ticket = state.next_ticket;
        {
            let mut failing = self.failing_records.lock();
            if *failing > 0 {
                *failing -= 1;
                self.lost_outcomes.lock().insert(attempt.subscription_id);
                return Ok(ticket);
            }
        }
        let Some(sub) = state.subscriptions.get_mut(&attempt.subscription_id) else { return Ok(ticket) };
        let Some(&Entry { distribution_id, attempts, .. }) = sub.queue.get(&attempt.position) else {
            return Ok(ticket);
        };
        if let Some(result) = AttemptResult::of(&attempt.outcome) {
            let error = match &attempt.outcome {
                Outcome::Delivered => String::new(),
                Outcome::Failed { error } | Outcome::DeadLettered { error, .. } => error.clone(),
            };
            sub.log.push_back(LoggedAttempt {
                at: attempt.at,
                distribution_id,
                attempt: i64::from(attempts) + 1,
                result,
                error,
                exchange: attempt.exchange.clone(),
            });
            if sub.log.len() > LOGGED_ATTEMPTS {
                sub.log.pop_front();
            }
            let minute = minute_of(attempt.at);
            let counts = sub.minutes.entry(minute).or_default();
            counts.0 += 1;
            counts.1 += i64::from(result != AttemptResult::Delivered);
            let newest = sub.minutes.keys().next_back().copied().unwrap_or(minute);
            sub.minutes.retain(|&m, _| m > newest - MINUTES_KEPT);
        }
        let released = match attempt.outcome {
            Outcome::Delivered => sub.queue.remove(&attempt.position).map(|entry| {
                let c = &mut sub.counters;
                c.total += 1;
                c.delivered += 1;
                c.pending -= 1;
                c.consecutive_failures = 0;
                c.last_delivery_at = Some(attempt.at);
                entry.event_id
            }),
            Outcome::Failed { error } => {
                if let Some(entry) = sub.queue.get_mut(&attempt.position) {
                    entry.attempts += 1;
                    let c = &mut sub.counters;
                    c.total += 1;
                    c.failure += 1;
                    c.consecutive_failures += 1;
                    c.last_error = Some(error);
                }
                None
            }
            Outcome::DeadLettered { error, reason, attempted } => {
                if let Some(entry) = sub.queue.remove(&attempt.position) {
                    let counted = i64::from(attempted);
                    let c = &mut sub.counters;
                    c.total += counted;
                    c.failure += counted;
                    c.consecutive_failures += counted;
                    c.last_error = Some(error.clone());
                    c.dead_lettered += 1;
                    c.pending -= 1;
                    let attempts = entry.attempts + u32::from(attempted);
                    let letter = Letter { event_id: entry.event_id, attempts, reason, error, dead_at: attempt.at };
                    sub.dead.insert(entry.distribution_id, letter);
                }
                None
            }
        };
        if let Some(event_id) = released {
            state.release(event_id);
        }
        Ok(ticket)
    }

    fn committed(&self, _ticket: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(Ok(()))
    }

    fn settled(&self) -> u64 {
        u64::MAX
    }

    fn counters(&self, subscription_id: i64) -> BoxFuture<'_, Result<Counters, StoreError>> {
        let state = self.state.lock();
        ready(Ok(state.subscriptions.get(&subscription_id).map(|s| s.counters.clone()).unwrap_or_default()))
    }

    fn delivery_log(
        &self,
        subscription_id: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<LoggedAttempt>, StoreError>> {
        let state = self.state.lock();
        let log =
            state.subscriptions.get(&subscription_id).map(|sub| sub.log.iter().rev().take(limit).cloned().collect());
        ready(Ok(log.unwrap_or_default()))
    }

    fn attempts_per_minute(
        &self,
        subscription_id: i64,
        minutes: std::ops::RangeInclusive<i64>,
    ) -> BoxFuture<'_, Result<Vec<MinuteCount>, StoreError>> {
        let state = self.state.lock();
        let counts = state.subscriptions.get(&subscription_id).map(|sub| {
            sub.minutes
                .range(minutes)
                .map(|(&minute, &(attempts, failures))| MinuteCount { minute, attempts, failures })
                .collect()
        });
        ready(Ok(counts.unwrap_or_default()))
    }

    fn dead_letters(&self, subscription_id: i64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, StoreError>> {
        let state = self.state.lock();
        let letters = state
            .subscriptions
            .get(&subscription_id)
            .map(|sub| {
                sub.dead
                    .iter()
                    .take(limit)
                    .map(|(&distribution_id, letter)| DeadLetter {
                        subscription_id,
                        distribution_id,
                        event_id: letter.event_id,
                        attempts: letter.attempts,
                        reason: letter.reason.clone(),
                        error: letter.error.clone(),
                        dead_at: letter.dead_at,
                        body: state.events.get(&letter.event_id).map(|(body, _)| body.clone()).unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ready(Ok(letters))
    }

    fn replay(
        &self,
        subscription_id: i64,
        distribution_ids: Option<Vec<i64>>,
    ) -> BoxFuture<'_, Result<usize, StoreError>> {
        let mut state = self.state.lock();
        let Some(sub) = state.subscriptions.get_mut(&subscription_id) else { return ready(Ok(0)) };
        let chosen: Vec<i64> = sub
            .dead
            .keys()
            .copied()
            .filter(|id| distribution_ids.as_ref().is_none_or(|wanted| wanted.contains(id)))
            .collect();
        let now = now_millis();
        for distribution_id in &chosen {
            if let Some(letter) = sub.dead.remove(distribution_id) {
                let entry = Entry {
                    event_id: letter.event_id,
                    distribution_id: *distribution_id,
                    attempts: 0,
                    enqueued_at: now,
                };
                sub.queue.insert(sub.next_position, entry);
                sub.next_position += 1;
                sub.counters.pending += 1;
            }
        }
        ready(Ok(chosen.len()))
    }

    fn drop_subscription(&self, subscription_id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut state = self.state.lock();
        if let Some(sub) = state.subscriptions.remove(&subscription_id) {
            let events = sub.queue.values().map(|e| e.event_id).chain(sub.dead.values().map(|l| l.event_id));
            for event_id in events.collect::<Vec<_>>() {
                state.release(event_id);
            }
        }
        ready(Ok(()))
    }

    fn subscriptions(&self) -> BoxFuture<'_, Result<Vec<i64>, StoreError>> {
        ready(Ok(self.state.lock().subscriptions.keys().copied().collect()))
    }

    fn expire_dead_letters(&self, before: Millis) -> BoxFuture<'_, Result<usize, StoreError>> {
        let mut state = self.state.lock();
        let mut released = Vec::new();
        for sub in state.subscriptions.values_mut() {
            sub.dead.retain(|_, letter| {
                let keep = letter.dead_at >= before;
                if !keep {
                    released.push(letter.event_id);
                }
                keep
            });
        }
        for event_id in &released {
            state.release(*event_id);
        }
        ready(Ok(released.len()))
    }

    fn pending_total(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        ready(Ok(self.state.lock().subscriptions.values().map(|s| s.counters.pending).sum()))
    }

    fn size_bytes(&self) -> u64 {
        self.state.lock().size()
    }

    fn outcomes_lost(&self, subscription_id: i64) -> bool {
        self.lost_outcomes.lock().remove(&subscription_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn open_fresh(limits: Limits) -> Arc<dyn EventStore> {
        Arc::new(MemoryStore::new(limits))
    }

    crate::store::conformance::conformance_suite!(open_fresh);
}
