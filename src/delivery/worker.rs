//! The per-subscription worker: delivers the subscription's queue in order,
//! `maxInFlight` at a time, retries with backoff, dead-letters, and stops for deletion,
//! pause, 410 Gone and shutdown. One slow callback only ever holds its own worker (and one
//! slot of the global attempt budget).

use super::Delivery;
use super::budget::ANSWER_BUDGET_EXHAUSTED;
use super::callback::{self, Request};
use super::confirm::{Confirmation, judge};
use super::index::Subscriber;
use super::retry::backoff;
use crate::store::{Attempt, Exchange, Outcome, Queued, UNCOMMITTED_OUTCOMES_PER_SUBSCRIPTION, now_millis};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Queue entries fetched at once.
const PAGE: usize = 256;

pub struct WorkerHandle {
    pub wake: Notify,
    pub stop: CancellationToken,
    /// Outcomes recorded since the last wait for a commit, and the newest ticket.
    uncommitted: AtomicU64,
    last_ticket: AtomicU64,
    /// Generation whose callback answered 410: delivery waits for a spec change.
    gone_generation: AtomicI64,
}

impl WorkerHandle {
    pub fn new(stop: CancellationToken) -> Self {
        WorkerHandle {
            wake: Notify::new(),
            stop,
            uncommitted: AtomicU64::new(0),
            last_ticket: AtomicU64::new(0),
            gone_generation: AtomicI64::new(-1),
        }
    }

    /// The newest ticket of an outcome this worker recorded (0: none).
    pub fn last_ticket(&self) -> u64 {
        self.last_ticket.load(Ordering::Acquire)
    }
}

/// How handling one queue entry ended.
enum Handled {
    /// Delivered or dead-lettered: the entry is done.
    Done,
    /// Not done and not to be retried now (deleted, paused, gone, shutting down).
    Interrupted,
}

pub async fn run(delivery: Arc<Delivery>, id: i64, handle: Arc<WorkerHandle>) {
    let mut cursor = 0;
    loop {
        if handle.stop.is_cancelled() || !delivery.owns(id) {
            return;
        }
        let Some(sub) = delivery.index.get(id) else {
            idle(&handle).await;
            continue;
        };
        if !delivery.exists(&sub) {
            delivery.forget(id).await;
            return;
        }
        let gone = handle.gone_generation.load(Ordering::Acquire);
        if gone != -1 && gone != sub.generation {
            // The spec changed since the callback answered 410: try again.
            handle.gone_generation.store(-1, Ordering::Release);
            delivery.projector.set_gone(id, false);
        }
        if !deliverable(&delivery, &sub, &handle) {
            idle(&handle).await;
            continue;
        }
        if delivery.store.outcomes_lost(id) {
            // An outcome behind the cursor was not written: its entry is still queued.
            cursor = 0;
        }
        let page = match delivery.store.queued(id, cursor, PAGE).await {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, subscription = id, "reading the queue failed");
                idle(&handle).await;
                continue;
            }
        };
        if page.is_empty() {
            if cursor != 0 {
                // Drained: once this worker's outcomes have landed, read again from the
                // start. An entry behind the cursor that is still queued (its deletion
                // failed, or a previous shard holder's outcome for it was never recorded)
                // is then settled or delivered instead of counted as pending for good.
                wait_for_commit(&delivery, &handle, id).await;
                cursor = 0;
                continue;
            }
            idle(&handle).await;
            continue;
        }
        let in_flight = usize::try_from(sub.effective.max_in_flight).unwrap_or(1).max(1);
        let results: Vec<(i64, Handled)> = futures::stream::iter(page)
            .map(|item| {
                let delivery = delivery.clone();
                let handle = handle.clone();
                async move {
                    let position = item.position;
                    (position, deliver(&delivery, &handle, item).await)
                }
            })
            .buffered(in_flight)
            .collect()
            .await;
        // Advance past the entries done in order; an interrupted one is fetched again.
        for (position, handled) in results {
            match handled {
                Handled::Done => cursor = position,
                Handled::Interrupted => break,
            }
        }
    }
}

/// Waits for a wake-up (publish, spec change, replay), at most a few seconds.
async fn idle(handle: &WorkerHandle) {
    tokio::select! {
        _ = handle.wake.notified() => {}
        _ = handle.stop.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
    }
}

/// Whether `sub` may be sent anything now. Tenancy is judged again here, not only when
/// the controller last reconciled: a namespace that lost the account must not receive
/// its queued or replayed events in the meantime.
fn deliverable(delivery: &Delivery, sub: &Subscriber, handle: &WorkerHandle) -> bool {
    sub.ready
        && !sub.effective.paused
        && handle.gone_generation.load(Ordering::Acquire) != sub.generation
        && delivery.tenancy.allows(&sub.effective.supplier_account, &sub.namespace)
}

/// Attempts one entry until it is delivered, dead-lettered or interrupted. Each attempt
/// first waits for a slot of the global attempt budget (or for the worker to stop), then
/// reads the spec, so an update applies from the next attempt. The slot is given back when
/// the attempt has its answer judged, before the outcome is recorded or a backoff waited.
async fn deliver(delivery: &Delivery, handle: &WorkerHandle, mut item: Queued) -> Handled {
    let id = item.subscription_id;
    loop {
        if handle.stop.is_cancelled() {
            return Handled::Interrupted;
        }
        let Some(slot) = delivery.budgets.attempt_slot(&handle.stop).await else { return Handled::Interrupted };
        let step = attempt(delivery, handle, &item).await;
        drop(slot);
        let (sub, error, retry_after, exchange) = match step {
            Step::Interrupted => return Handled::Interrupted,
            Step::Expired => {
                let error = format!("not delivered within {} s", delivery.config.max_age_seconds);
                let outcome = Outcome::DeadLettered { error, reason: "Expired".into(), attempted: false };
                record_outcome(delivery, handle, &item, outcome, Exchange::default()).await;
                return Handled::Done;
            }
            Step::Unsent { sub, error } => (sub, error, None, Exchange::default()),
            Step::Judged { sub, confirmation, exchange, elapsed } => match confirmation {
                Confirmation::Confirmed => {
                    delivery.metrics.attempt("delivered", id, elapsed);
                    record_outcome(delivery, handle, &item, Outcome::Delivered, exchange).await;
                    return Handled::Done;
                }
                Confirmation::Gone => {
                    delivery.metrics.attempt("gone", id, elapsed);
                    let outcome = Outcome::Failed { error: "410 Gone".into() };
                    record_outcome(delivery, handle, &item, outcome, exchange).await;
                    handle.gone_generation.store(sub.generation, Ordering::Release);
                    delivery.projector.set_gone(id, true);
                    tracing::warn!(
                        subscription = id,
                        "callback answered 410 Gone; delivery stops until the spec changes"
                    );
                    return Handled::Interrupted;
                }
                Confirmation::Throttled { retry_after } => {
                    delivery.metrics.attempt("throttled", id, elapsed);
                    (sub, "429 Too Many Requests".to_string(), retry_after, exchange)
                }
                Confirmation::Failed(error) => {
                    delivery.metrics.attempt("failed", id, elapsed);
                    (sub, error, None, exchange)
                }
            },
        };
        if fail(delivery, handle, &sub, &mut item, error, retry_after, exchange).await {
            return Handled::Done;
        }
    }
}

/// What one attempt came to.
enum Step {
    /// Not to be attempted now (deleted, paused, gone, tenancy, shutting down).
    Interrupted,
    /// Too old: dead-lettered without an attempt.
    Expired,
    /// Could not be sent (the signing key is missing): a failed attempt.
    Unsent {
        sub: Subscriber,
        error: String,
    },
    Judged {
        sub: Subscriber,
        confirmation: Confirmation,
        exchange: Exchange,
        elapsed: f64,
    },
}

/// One attempt at `item` under the spec as it is now, its answer judged. The answer (and
/// the answer budget bytes it holds) is dropped before this returns.
async fn attempt(delivery: &Delivery, handle: &WorkerHandle, item: &Queued) -> Step {
    let id = item.subscription_id;
    if handle.stop.is_cancelled() {
        return Step::Interrupted;
    }
    let Some(sub) = delivery.index.get(id) else { return Step::Interrupted };
    if !deliverable(delivery, &sub, handle) || !delivery.exists(&sub) {
        return Step::Interrupted;
    }
    if now_millis().saturating_sub(item.enqueued_at) > delivery.config.max_age_millis() {
        return Step::Expired;
    }
    let effective = sub.effective.clone();
    let signing_key = match &sub.signing {
        Some(secret) => match delivery.secrets.key(&sub.namespace, secret).await {
            Ok(key) => Some(key),
            Err(error) => return Step::Unsent { sub, error: error.to_string() },
        },
        None => None,
    };
    let regex = delivery.index.confirm_regex(&sub);
    let started = Instant::now();
    let answer = callback::send(
        &delivery.outbound,
        Request {
            url: effective.callback.as_ref(),
            item,
            attempt: item.attempts + 1,
            timeout: effective.timeout,
            signing_key: signing_key.as_deref(),
            body_cap: delivery.config.body_cap_bytes,
            answer_budget: delivery.budgets.answers(),
            retry_after_cap: Duration::from_secs(delivery.config.retry_after_cap_seconds),
        },
    )
    .await;
    let took = started.elapsed();
    let latency_ms = u32::try_from(took.as_millis()).unwrap_or(u32::MAX);
    let (confirmation, exchange) = match answer {
        Ok(answer) => {
            if answer.cut {
                delivery.metrics.answers_cut.inc();
                tracing::debug!(subscription = id, read = answer.body.len(), "{ANSWER_BUDGET_EXHAUSTED}");
            }
            let body = (!answer.cut).then_some(answer.body.as_slice());
            let confirmation = judge(
                effective.confirm_mode,
                &effective.confirm_pattern,
                regex.as_deref(),
                answer.status,
                answer.retry_after,
                body,
            );
            (confirmation, Exchange::answered(answer.status, latency_ms, &answer.body))
        }
        Err(error) => (Confirmation::Failed(error.to_string()), Exchange::unanswered(latency_ms)),
    };
    Step::Judged { sub, confirmation, exchange, elapsed: took.as_secs_f64() }
}

/// Records a failed attempt; dead-letters the entry when it was the last allowed one
/// (returns true), otherwise waits out the backoff (at least `retry_after`).
async fn fail(
    delivery: &Delivery,
    handle: &WorkerHandle,
    sub: &Subscriber,
    item: &mut Queued,
    error: String,
    retry_after: Option<Duration>,
    exchange: Exchange,
) -> bool {
    let attempt = item.attempts + 1;
    if attempt >= sub.effective.retry.max_attempts {
        let reason = "MaxAttempts".to_string();
        let outcome = Outcome::DeadLettered { error, reason, attempted: true };
        record_outcome(delivery, handle, item, outcome, exchange).await;
        return true;
    }
    record_outcome(delivery, handle, item, Outcome::Failed { error }, exchange).await;
    item.attempts = attempt;
    let wait = backoff(&sub.effective.retry, attempt, fastrand::f64()).max(retry_after.unwrap_or_default());
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = handle.stop.cancelled() => {}
    }
    false
}

/// Hands an outcome to the store; once this worker has enough uncommitted outcomes, waits
/// for them to be durable, bounding what a crash can redeliver.
async fn record_outcome(
    delivery: &Delivery,
    handle: &WorkerHandle,
    item: &Queued,
    outcome: Outcome,
    exchange: Exchange,
) {
    if handle.stop.is_cancelled() && !delivery.holds(item.subscription_id) {
        // The shard moved while this attempt was out: its new holder delivers the entry
        // again and records that.
        return;
    }
    let (subscription_id, position, at) = (item.subscription_id, item.position, now_millis());
    let attempt = Attempt { subscription_id, position, outcome, at, exchange };
    match delivery.store.record_attempt(attempt) {
        Ok(ticket) => {
            delivery.projector.touch(item.subscription_id, ticket);
            handle.last_ticket.fetch_max(ticket, Ordering::AcqRel);
            if handle.uncommitted.fetch_add(1, Ordering::AcqRel) + 1 >= UNCOMMITTED_OUTCOMES_PER_SUBSCRIPTION {
                wait_for_commit(delivery, handle, item.subscription_id).await;
            }
        }
        Err(error) => tracing::error!(%error, subscription = item.subscription_id, "recording an attempt failed"),
    }
}

/// Waits until every outcome this worker recorded is durable (or it is stopped).
async fn wait_for_commit(delivery: &Delivery, handle: &WorkerHandle, subscription: i64) {
    let settled = delivery.store.committed(handle.last_ticket.load(Ordering::Acquire));
    tokio::select! {
        result = settled => if let Err(error) = result {
            tracing::warn!(%error, subscription, "waiting for outcomes to commit failed");
        },
        _ = handle.stop.cancelled() => {}
    }
    handle.uncommitted.store(0, Ordering::Release);
}
