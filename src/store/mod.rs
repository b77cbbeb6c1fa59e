//! The event store: accepted events, per-subscription queues, dead letters, delivery
//! counters, and what the console shows of recent deliveries (a bounded log of attempts and
//! per-minute counts for a day). One small trait so that a distributed engine can replace the embedded
//! SQLite implementation (`sqlite`) when one pod is not enough (docs/design.md §6).

#[cfg(test)]
mod conformance;
pub mod jetstream;
#[cfg(test)]
pub mod memory;
pub mod sqlite;

use futures::future::BoxFuture;

/// Outcomes a subscription may have recorded but not yet committed before its worker
/// waits for the store: with `maxInFlight`, the bound on redeliveries after a crash.
pub const UNCOMMITTED_OUTCOMES_PER_SUBSCRIPTION: u64 = 64;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Attempts kept in each subscription's delivery log: the newest, older ones are dropped
/// as new ones are recorded.
pub const LOGGED_ATTEMPTS: usize = 100;

/// Minutes of per-minute attempt counts kept per subscription.
pub const MINUTES_KEPT: i64 = 24 * 60;

/// Bytes of the callback's answer kept in the delivery log.
pub const ANSWER_HEAD_BYTES: usize = 256;

/// One accepted event and the subscriptions it was matched to at publish time.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The event as stored (crate::event::StoredEvent serialised).
    pub body: String,
    pub subscriptions: Vec<i64>,
}

/// Where one event went for one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fanout {
    pub subscription_id: i64,
    pub distribution_id: i64,
    /// False when the subscription's backlog was full and the event went straight to
    /// its dead letters.
    pub queued: bool,
}

/// A queued delivery of one event to one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub subscription_id: i64,
    /// Queue position: delivery order within the subscription.
    pub position: i64,
    pub event_id: i64,
    pub distribution_id: i64,
    /// Attempts already made (and counted) for this delivery.
    pub attempts: u32,
    pub enqueued_at: Millis,
    pub body: String,
}

/// The result of one delivery attempt, recorded with its counters in one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Confirmed by the callback: the queue entry goes, `delivered` grows.
    Delivered,
    /// Failed; the entry stays for another attempt.
    Failed { error: String },
    /// Failed for the last time (or never attempted, when `attempted` is false, as for an
    /// expired entry): the entry moves to the dead letters.
    DeadLettered { error: String, reason: String, attempted: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub subscription_id: i64,
    pub position: i64,
    pub outcome: Outcome,
    pub at: Millis,
    pub exchange: Exchange,
}

/// What passed between herald and the callback in one attempt, for the delivery log.
/// Empty when no request was made (a missing signing key, an expired entry).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    /// The callback's HTTP status; None when no answer came (refused, timed out).
    pub http_status: Option<u16>,
    pub latency_ms: Option<u32>,
    /// The start of the answer's body (`ANSWER_HEAD_BYTES` at most, whole characters).
    pub answer_head: String,
}

impl Exchange {
    pub fn answered(http_status: u16, latency_ms: u32, body: &[u8]) -> Self {
        Exchange { http_status: Some(http_status), latency_ms: Some(latency_ms), answer_head: answer_head(body) }
    }

    pub fn unanswered(latency_ms: u32) -> Self {
        Exchange { http_status: None, latency_ms: Some(latency_ms), answer_head: String::new() }
    }
}

/// At most `ANSWER_HEAD_BYTES` of the start of an answer, whole characters: a character
/// the limit cuts is left out; bytes that are not UTF-8 become U+FFFD.
fn answer_head(body: &[u8]) -> String {
    let cut = &body[..body.len().min(ANSWER_HEAD_BYTES)];
    match std::str::from_utf8(cut) {
        Ok(text) => text.to_string(),
        // Valid up to a character the cut split.
        Err(error) if error.error_len().is_none() => String::from_utf8_lossy(&cut[..error.valid_up_to()]).into_owned(),
        Err(_) => {
            let lossy = String::from_utf8_lossy(cut);
            let mut end = lossy.len().min(ANSWER_HEAD_BYTES);
            while !lossy.is_char_boundary(end) {
                end -= 1;
            }
            lossy[..end].to_string()
        }
    }
}

/// One attempt in a subscription's delivery log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedAttempt {
    pub at: Millis,
    pub distribution_id: i64,
    /// 1 for the first attempt at this delivery.
    pub attempt: i64,
    pub result: AttemptResult,
    /// The error the attempt failed with; empty when delivered.
    pub error: String,
    pub exchange: Exchange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    Delivered,
    /// Failed, to be retried.
    Failed,
    /// Failed for the last time: the delivery is a dead letter now.
    DeadLettered,
}

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Delivered => "delivered",
            AttemptResult::Failed => "failed",
            AttemptResult::DeadLettered => "dead_lettered",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [AttemptResult::Delivered, AttemptResult::Failed, AttemptResult::DeadLettered]
            .into_iter()
            .find(|r| r.as_str() == text)
    }

    /// What an outcome logs: None for one that was not an attempt (an expired entry).
    fn of(outcome: &Outcome) -> Option<Self> {
        match outcome {
            Outcome::Delivered => Some(AttemptResult::Delivered),
            Outcome::Failed { .. } => Some(AttemptResult::Failed),
            Outcome::DeadLettered { attempted: true, .. } => Some(AttemptResult::DeadLettered),
            Outcome::DeadLettered { attempted: false, .. } => None,
        }
    }
}

/// Attempts and failures of one subscription in one minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinuteCount {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub attempts: i64,
    pub failures: i64,
}

pub fn minute_of(at: Millis) -> i64 {
    at.div_euclid(60_000)
}

/// Delivery counters of one subscription (status `statistics`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub total: i64,
    pub failure: i64,
    pub delivered: i64,
    pub dead_lettered: i64,
    pub pending: i64,
    pub consecutive_failures: i64,
    pub last_error: Option<String>,
    pub last_delivery_at: Option<Millis>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub subscription_id: i64,
    pub distribution_id: i64,
    pub event_id: i64,
    pub attempts: u32,
    pub reason: String,
    pub error: String,
    pub dead_at: Millis,
    pub body: String,
}

/// Where one watch of a bk-cmdb resource stands (`crate::source`), as last committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchPosition {
    /// bk-cmdb's cursor after the last committed page.
    pub cursor: String,
    /// Watch events committed so far, pushed or not.
    pub events_read: i64,
    /// Instances whose last detail is kept for pre-images.
    pub pre_images: i64,
}

/// One page of a watch: its events, the cursor after them and the pre-image changes they
/// make, committed in one transaction, so that a crash neither skips nor repeats a watch
/// event.
#[derive(Clone, Debug, Default)]
pub struct WatchPage {
    /// The watch's key: source uid and resource.
    pub watch: String,
    pub events: Vec<NewEvent>,
    pub cursor: String,
    /// Watch events the page held, pushed or not.
    pub read: i64,
    /// In the page's order: an instance's new detail, or None when it was deleted.
    pub pre_images: Vec<(String, Option<String>)>,
    /// Instances kept for this watch; the least recently changed beyond it are forgotten.
    pub pre_image_limit: i64,
    /// Forget every kept instance first (pre-images were switched off, or a gap made them
    /// untrustworthy).
    pub forget_pre_images: bool,
}

impl WatchPage {
    /// Whether the page adds to the store: queued events or kept instances. A page that only
    /// moves the cursor is taken even over the quota, so an idle watch never falls behind
    /// bk-cmdb's retention.
    pub fn grows_store(&self) -> bool {
        self.events.iter().any(|e| !e.subscriptions.is_empty()) || !self.pre_images.is_empty()
    }
}

/// Limits the store enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Publishes are refused (503) while the database is larger than this.
    pub quota_bytes: u64,
    /// Events beyond this many pending per subscription go to its dead letters.
    pub backlog_cap: i64,
}

/// An engine's own error (SQLite's, for example), kept as the source of a `StoreError`:
/// callers see what failed in herald's terms and never depend on the engine.
pub type EngineError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening store at {path}: {source}")]
    Open { path: String, source: EngineError },
    #[error("creating store directory {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("store directory {path} is locked by another herald process")]
    Locked { path: String },
    #[error("locking store directory {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("store schema version {found} is newer than this herald supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("migrating store schema to version {version}: {source}")]
    Migrate { version: i64, source: EngineError },
    #[error("store is over its quota ({size} of {quota} bytes)")]
    OverQuota { size: u64, quota: u64 },
    #[error("store query failed: {0}")]
    Query(#[source] EngineError),
    /// The disk under the store is full (the quota should have stopped publishes first):
    /// callers answer it like the quota, 503 and retry later.
    #[error("the store's disk is full: {detail}")]
    Full { detail: String },
    #[error("store commit failed: {0}")]
    Commit(String),
    #[error("the store writer stopped")]
    WriterStopped,
    /// A distributed engine could not be reached or did not confirm a write in time:
    /// callers answer 503 and retry later (whether the write landed is unknown).
    #[error("the store is unavailable: {detail}")]
    Unavailable { detail: String },
    /// An event the store can never hold (`EventStore::fits`); nothing was written.
    #[error("event {index} ({bytes} bytes) is larger than the event store holds")]
    TooLarge { index: usize, bytes: usize },
}

/// The operations herald needs from a store. Writes that answer a caller (publish,
/// replay, drop) are durable when they return; `record_attempt` may be batched: its ticket
/// tells when it is durable.
pub trait EventStore: Send + Sync {
    /// Stores events and their fan-out atomically and durably.
    fn publish(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>>;
    /// Up to `limit` queued deliveries of a subscription after `after_position`, in order.
    fn queued(
        &self,
        subscription_id: i64,
        after_position: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Queued>, StoreError>>;
    /// Records an attempt; returns a ticket that `committed` resolves once it is durable.
    fn record_attempt(&self, attempt: Attempt) -> Result<u64, StoreError>;
    /// Resolves when every record up to `ticket` is durable.
    fn committed(&self, ticket: u64) -> BoxFuture<'_, Result<(), StoreError>>;
    /// The newest ticket up to which every record is settled: durable, or reported lost
    /// (`outcomes_lost`). Never waits.
    fn settled(&self) -> u64;
    fn counters(&self, subscription_id: i64) -> BoxFuture<'_, Result<Counters, StoreError>>;
    fn dead_letters(&self, subscription_id: i64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, StoreError>>;
    /// Up to `limit` of the subscription's logged attempts, newest first.
    fn delivery_log(&self, subscription_id: i64, limit: usize)
    -> BoxFuture<'_, Result<Vec<LoggedAttempt>, StoreError>>;
    /// The subscription's per-minute counts in `minutes` (minutes since the epoch), oldest
    /// first; minutes without attempts are absent.
    fn attempts_per_minute(
        &self,
        subscription_id: i64,
        minutes: std::ops::RangeInclusive<i64>,
    ) -> BoxFuture<'_, Result<Vec<MinuteCount>, StoreError>>;
    /// Moves dead letters (all, or the given distribution ids) to the queue's tail.
    fn replay(
        &self,
        subscription_id: i64,
        distribution_ids: Option<Vec<i64>>,
    ) -> BoxFuture<'_, Result<usize, StoreError>>;
    /// Forgets a deleted subscription: its queue, dead letters, counters and log.
    fn drop_subscription(&self, subscription_id: i64) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Every subscription the store holds anything for.
    fn subscriptions(&self) -> BoxFuture<'_, Result<Vec<i64>, StoreError>>;
    /// Deletes dead letters older than `before`.
    fn expire_dead_letters(&self, before: Millis) -> BoxFuture<'_, Result<usize, StoreError>>;
    /// A watch's position, None before its first page.
    fn watch_position(&self, watch: &str) -> BoxFuture<'_, Result<Option<WatchPosition>, StoreError>>;
    /// Commits a watch page: its events with their fan-out (as `publish`), its cursor and
    /// its pre-image changes, atomically and durably.
    fn ingest(&self, page: WatchPage) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>>;
    /// The kept details of those of `instances` the watch has seen.
    fn pre_images(
        &self,
        watch: &str,
        instances: Vec<String>,
    ) -> BoxFuture<'_, Result<std::collections::HashMap<String, String>, StoreError>>;
    /// Forgets a watch: its cursor and pre-images.
    fn drop_watch(&self, watch: &str) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Every watch the store holds a position for.
    fn watches(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;
    /// Deliveries pending across all subscriptions.
    fn pending_total(&self) -> BoxFuture<'_, Result<i64, StoreError>>;
    /// Size of the store on disk.
    fn size_bytes(&self) -> u64;
    /// Whether an outcome recorded for this subscription was lost (its write failed)
    /// since the last call. Its queue entry is then still queued behind the worker's
    /// cursor, and the worker must read its queue from the start again.
    fn outcomes_lost(&self, subscription_id: i64) -> bool;
    /// Subscriptions that other processes sharing the store queued deliveries for, as they
    /// do (taken once; None for an engine only one process uses).
    fn wakes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<i64>> {
        None
    }
    /// Whether an event with this body can be stored at all (a JetStream message holds at
    /// most the server's `max_payload`). An event that cannot is refused before anything
    /// is written, never retried into the same refusal.
    fn fits(&self, _body: &str) -> bool {
        true
    }
}

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
