//! The watch loop of one (source, resource): long-polls bk-cmdb from the stored cursor,
//! turns each page into v3.5 events and commits events, cursor and pre-images in one
//! store transaction (`Delivery::ingest`), so that a crash anywhere neither skips nor
//! repeats a watch event. Failures back off with jitter; an expired cursor is reported as a
//! gap and the watch resumes by the source's policy, never looping on it.

use super::SourceContext;
use super::client::{Endpoint, FULL_PAGE, Page, Position, WatchError};
use super::convert::{Rules, WatchEvent, convert, instance_key, resource_name};
use super::status::{Health, Problem};
use crate::crd::{ExpiryPolicy, PUBLISH_ACCOUNTS_LABEL, WatchEventType, WatchResource};
use crate::delivery::retry::backoff;
use crate::effective::RetryPolicy;
use crate::event::StoredEvent;
use crate::store::{StoreError, WatchPage};
use crate::telemetry::{SourceErrorLabels, SourceLabels};
use crate::tenancy::Grant;
use kube::runtime::events::{Event, EventType};
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Retries of failures that may pass by themselves (bk-cmdb down, the store full).
const TRANSIENT: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(30),
    jitter_percent: 20,
};

/// Retries of failures that need a change (credentials, spec, bk-cmdb's configuration):
/// slowly, so a wrong secret costs bk-cmdb a request every few minutes, not a loop.
const NEEDS_A_CHANGE: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    initial_backoff: Duration::from_secs(30),
    max_backoff: Duration::from_secs(300),
    jitter_percent: 20,
};

/// Resuming "from the oldest" after a gap starts this far inside the retention, so that
/// bk-cmdb does not refuse the start time as too old.
const RETENTION_MARGIN_SECONDS: i64 = 60;

/// Everything one watch loop needs of its source.
pub struct WatchPlan {
    /// Store key: `<source uid>/<resource>`.
    pub key: String,
    /// `namespace/name`, for logs, metrics and Events.
    pub source: String,
    pub reference: k8s_openapi::api::core::v1::ObjectReference,
    pub namespace: String,
    pub resource: WatchResource,
    pub fields: Vec<String>,
    pub event_types: Vec<WatchEventType>,
    pub objects: Vec<String>,
    pub supplier_account: String,
    /// Where the very first read starts.
    pub start: Position,
    pub on_expired: ExpiryPolicy,
    pub retention_seconds: i64,
    pub pre_images: bool,
    pub pre_image_limit: i64,
    pub endpoint: Endpoint,
    /// ESB credentials to read before the first request: (Secret name).
    pub credentials_secret: Option<String>,
}

/// Runs the watch until `stop` is cancelled.
pub async fn run(ctx: Arc<SourceContext>, plan: WatchPlan, health: Arc<Mutex<Health>>, stop: CancellationToken) {
    let mut watch = Watch { ctx, plan, health, stop, failures: 0, forget_pre_images: false, resume_oldest: false };
    watch.run().await;
}

struct Watch {
    ctx: Arc<SourceContext>,
    plan: WatchPlan,
    health: Arc<Mutex<Health>>,
    stop: CancellationToken,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// The next commit forgets the kept pre-images: they were switched off, or a gap made
    /// them stale.
    forget_pre_images: bool,
    /// After a gap, with policy `oldest`: every request asks for the oldest point anew
    /// until a page is committed.
    resume_oldest: bool,
}

/// What to do after a failed request.
enum Next {
    Retry(Position),
    /// Nothing will change until the spec does: wait for the source to be restarted.
    Park,
}

impl Watch {
    fn labels(&self) -> SourceLabels {
        SourceLabels { source: self.plan.source.clone(), resource: resource_name(self.plan.resource) }
    }

    async fn run(&mut self) {
        let Some(mut position) = self.starting_position().await else { return };
        // A read "from now" answers with bk-cmdb's latest event: where to start, not a change.
        let mut marker = position == Position::Now;
        while let Err(problem) = self.load_credentials().await {
            self.set_problem(Some(problem));
            if !self.pause(&NEEDS_A_CHANGE).await {
                return;
            }
        }
        let resource = resource_name(self.plan.resource);
        loop {
            if self.resume_oldest {
                position = self.oldest();
            }
            let answer = tokio::select! {
                answer = self.plan.endpoint.watch(resource, &position, &self.plan.fields) => answer,
                () = self.stop.cancelled() => return,
            };
            // Checked after the long poll too: a namespace that lost the account meanwhile
            // publishes nothing more. The supervisor restarts the source as refused; should
            // the account come back first, reading goes on from the same position.
            if !self.allowed_now().await {
                return;
            }
            let next = match answer {
                // Not raced against `stop`: a page being committed is committed whole, and the
                // supervisor waits for it before it starts the source again.
                Ok(page) => match self.commit(page, marker).await {
                    Ok(cursor) => {
                        self.failures = 0;
                        self.resume_oldest = false;
                        marker = false;
                        position = Position::Cursor(cursor);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(source = %self.plan.source, resource, %error, "committing a watch page failed; reading it again");
                        self.set_problem(Some(Problem::new("StoreRefused", error.to_string())));
                        if !self.pause(&TRANSIENT).await {
                            return;
                        }
                        Next::Retry(position.clone())
                    }
                },
                Err(error) => self.failed(error, &position).await,
            };
            match next {
                Next::Retry(retry_from) => {
                    if retry_from == Position::Now {
                        marker = true;
                    }
                    position = retry_from;
                }
                Next::Park => {
                    self.stop.cancelled().await;
                    return;
                }
            }
        }
    }

    /// Whether the namespace may publish the account; while it may not, waits (false once
    /// stopped).
    async fn allowed_now(&mut self) -> bool {
        while !self.ctx.tenancy.grants(Grant::Publish, &self.plan.supplier_account, &self.plan.namespace) {
            self.set_problem(Some(Problem::new(
                "AccountNotAllowed",
                format!(
                    "the namespace may no longer publish into this account: its {PUBLISH_ACCOUNTS_LABEL} grant was withdrawn"
                ),
            )));
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.stop.cancelled() => return false,
            }
        }
        true
    }

    /// The stored cursor, or the spec's start for a watch herald has never read.
    async fn starting_position(&mut self) -> Option<Position> {
        loop {
            match self.ctx.store.watch_position(&self.plan.key).await {
                Ok(Some(stored)) => {
                    self.forget_pre_images = !self.plan.pre_images && stored.pre_images > 0;
                    let mut health = self.health.lock();
                    health.cursor = Some(stored.cursor.clone());
                    health.events_read = stored.events_read;
                    return Some(Position::Cursor(stored.cursor));
                }
                Ok(None) => return Some(self.plan.start.clone()),
                Err(error) => {
                    tracing::error!(source = %self.plan.source, %error, "reading the watch position failed");
                    self.set_problem(Some(Problem::new("StoreRefused", error.to_string())));
                    if !self.pause(&TRANSIENT).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn load_credentials(&mut self) -> Result<(), Problem> {
        let Some(secret) = &self.plan.credentials_secret else { return Ok(()) };
        let read = super::read_app_credentials(&self.ctx.client, &self.plan.namespace, secret);
        // Raced against `stop`: the supervisor waits for this task, and an API server that
        // never answers must not hold it.
        let app = tokio::select! {
            app = read => app?,
            () = self.stop.cancelled() => return Err(Problem::new("Stopping", "the source is being stopped")),
        };
        self.plan.endpoint.app = Some(app);
        Ok(())
    }

    /// Converts and commits a page; returns the cursor to continue after.
    async fn commit(&mut self, page: Page, marker: bool) -> Result<String, StoreError> {
        // `_held` keeps the answer's share of the read budget until the page is committed.
        let Page { events, cursor, undecodable, held: _held } = page;
        let read = i64::try_from(events.len() + undecodable.len()).unwrap_or(i64::MAX);
        let full = events.len() + undecodable.len() >= FULL_PAGE;
        let (converted, pre_images) = if marker { (Vec::new(), Vec::new()) } else { self.convert(&events).await? };
        let mut skipped: Vec<(String, String, &'static str)> = if marker {
            Vec::new()
        } else {
            let unknown = || "(unknown)".to_string();
            undecodable.into_iter().map(|odd| (odd.cursor.unwrap_or_else(unknown), odd.error, "undecodable")).collect()
        };
        let unchanged = events.is_empty()
            && !self.forget_pre_images
            && self.health.lock().cursor.as_deref() == Some(cursor.as_str());
        if !unchanged {
            let page = WatchPage {
                watch: self.plan.key.clone(),
                events: Vec::new(),
                cursor: cursor.clone(),
                read: if marker { 0 } else { read },
                pre_images,
                pre_image_limit: self.plan.pre_image_limit,
                forget_pre_images: self.forget_pre_images,
            };
            let cursors: Vec<String> = converted.iter().map(|(_, _, cursor)| cursor.clone()).collect();
            let events = converted.into_iter().map(|(event, name, _)| (event, name)).collect();
            let (_, too_large) = self.ctx.delivery.ingest(page, events).await?;
            self.forget_pre_images = false;
            skipped.extend(
                too_large.into_iter().map(|index| {
                    (cursors[index].clone(), "larger than the event store holds".to_string(), "too_large")
                }),
            );
        }
        self.report_skipped(skipped).await;
        let now = jiff::Timestamp::now();
        let mut health = self.health.lock();
        health.connected = Some(true);
        health.unreachable = None;
        health.problem = None;
        health.cursor = Some(cursor.clone());
        if !marker && read > 0 {
            health.events_read += read;
            health.last_event_at = Some(now);
            self.ctx.metrics.source_events_read.get_or_create(&self.labels()).inc_by(u64::try_from(read).unwrap_or(0));
        }
        if full {
            health.behind_since.get_or_insert(now);
        } else {
            health.behind_since = None;
        }
        let lag = health.behind_since.map(|since| (now - since).get_seconds()).unwrap_or(0);
        self.ctx.metrics.source_lag_seconds.get_or_create(&self.labels()).set(lag);
        Ok(cursor)
    }

    /// The page's v3.5 events and pre-image changes, in order.
    async fn convert(
        &self,
        events: &[WatchEvent],
    ) -> Result<(Vec<(StoredEvent, String, String)>, Vec<(String, Option<String>)>), StoreError> {
        let plan = &self.plan;
        let keys: Vec<Option<String>> = events.iter().map(|e| instance_key(plan.resource, &e.bk_detail)).collect();
        // What earlier pages left; changes within this page are seen through `latest`.
        let mut latest: HashMap<String, Option<Value>> = HashMap::new();
        if plan.pre_images && !self.forget_pre_images {
            let wanted: Vec<String> = keys.iter().flatten().cloned().collect();
            for (key, detail) in self.ctx.store.pre_images(&plan.key, wanted).await? {
                latest.insert(key, serde_json::from_str(&detail).ok());
            }
        }
        let rules = Rules {
            resource: plan.resource,
            event_types: &plan.event_types,
            objects: &plan.objects,
            supplier_account: &plan.supplier_account,
        };
        let now = crate::compat::time::format_cmdb(jiff::Timestamp::now(), &self.ctx.config.time_zone);
        let mut converted = Vec::new();
        let mut pre_images = Vec::new();
        for (event, key) in events.iter().zip(keys) {
            let previous = key.as_ref().and_then(|k| latest.get(k)).and_then(Option::as_ref);
            match convert(&rules, event, previous, &now) {
                Ok(c) => converted.push((c.event, c.name, event.bk_cursor.clone())),
                Err(skipped) => {
                    tracing::debug!(source = %plan.source, reason = skipped.as_str(), "watch event not pushed");
                }
            }
            if let (true, Some(key)) = (plan.pre_images, key) {
                let kept = (event.bk_event_type != "delete").then(|| event.bk_detail.clone());
                pre_images.push((key.clone(), kept.as_ref().map(Value::to_string)));
                latest.insert(key, kept);
            }
        }
        Ok((converted, pre_images))
    }

    /// Watch events committed without being pushed because they can never be (they do not
    /// decode, or the store cannot hold them): each is logged and counted, the last is
    /// recorded in the source's status (`eventsSkipped`, `lastSkipped`), and one Warning
    /// Event a page says how many, so that such an event never holds up the watch, is never
    /// lost silently, and costs the API server one write a page at most.
    async fn report_skipped(&self, skipped: Vec<(String, String, &'static str)>) {
        let resource = resource_name(self.plan.resource);
        let Some((cursor, why, _)) = skipped.last().cloned() else { return };
        for (cursor, why, cause) in &skipped {
            tracing::warn!(source = %self.plan.source, resource, %cursor, cause, %why, "watch event skipped");
            let labels = SourceErrorLabels { source: self.plan.source.clone(), resource, cause };
            self.ctx.metrics.source_events_skipped.get_or_create(&labels).inc();
        }
        let last = format!("{resource}: the watch event at cursor {cursor} was skipped: {why}");
        {
            let mut health = self.health.lock();
            health.events_skipped += i64::try_from(skipped.len()).unwrap_or(i64::MAX);
            health.last_skipped = Some(format!("{}: {last}", jiff::Timestamp::now()));
        }
        let note = match skipped.len() {
            1 => last,
            n => format!("{n} watch events of one page were skipped; the last: {last}"),
        };
        self.warn("EventSkipped", &note).await;
    }

    /// Reports a failed request and decides where to go on from.
    async fn failed(&mut self, error: WatchError, position: &Position) -> Next {
        let resource = resource_name(self.plan.resource);
        let labels = self.labels();
        let cause = SourceErrorLabels { source: labels.source.clone(), resource, cause: error.cause() };
        self.ctx.metrics.source_watch_errors.get_or_create(&cause).inc();
        match error {
            WatchError::CursorExpired { .. } => {
                // "Oldest" is recomputed for every request until a page is committed: a retry
                // minutes later must not ask for a time bk-cmdb no longer holds.
                self.resume_oldest = self.plan.on_expired == ExpiryPolicy::Oldest;
                let resume = if self.resume_oldest { self.oldest() } else { Position::Now };
                let last = self.health.lock().last_event_at;
                let since = last.map_or_else(|| "herald's last read".to_string(), |t| t.to_string());
                let gap = format!(
                    "bk-cmdb no longer held herald's cursor; changes since {since} (up to {} s) may be missing; resumed from {}",
                    self.plan.retention_seconds,
                    match self.plan.on_expired {
                        ExpiryPolicy::Oldest => "the oldest event bk-cmdb holds",
                        ExpiryPolicy::Now => "now",
                    }
                );
                tracing::warn!(source = %self.plan.source, resource, %gap, "watch cursor expired");
                self.ctx.metrics.source_cursor_expiries.get_or_create(&labels).inc();
                self.warn("CursorExpired", &format!("{resource}: {gap}")).await;
                self.health.lock().gap = Some(gap);
                // Changes were missed: a kept detail may no longer be the instance's last.
                self.forget_pre_images = true;
                Next::Retry(resume)
            }
            WatchError::StartOutOfRange { .. } if *position == self.plan.start => {
                let problem = Problem::new(
                    "StartOutsideRetention",
                    format!("{error}; set spec.start to a time within bk-cmdb's retention, or to now"),
                );
                self.warn("StartOutsideRetention", &format!("{resource}: {}", problem.message)).await;
                self.set_problem(Some(problem));
                Next::Park
            }
            // Resuming from the oldest event after a gap: bk-cmdb's retention is shorter
            // than the spec says. The present is all that is left; the gap says so.
            WatchError::StartOutOfRange { .. } => {
                self.resume_oldest = false;
                let note = "bk-cmdb no longer held the oldest point herald asked for either; resumed from now";
                if let Some(gap) = self.health.lock().gap.as_mut() {
                    gap.push_str("; ");
                    gap.push_str(note);
                }
                self.warn("CursorExpired", &format!("{resource}: {note}")).await;
                Next::Retry(Position::Now)
            }
            // Other watches hold the shared read budget: bk-cmdb is fine and so is this watch,
            // so nothing is reported as wrong; it asks again in a second or so.
            WatchError::ReadBudgetExhausted { .. } => {
                tracing::debug!(source = %self.plan.source, resource, "read budget spent; reading again shortly");
                let delay = Duration::from_millis(500 + fastrand::u64(..1000));
                tokio::select! {
                    () = tokio::time::sleep(delay) => Next::Retry(position.clone()),
                    () = self.stop.cancelled() => Next::Park,
                }
            }
            error => {
                let needs_a_change = error.needs_a_change();
                tracing::warn!(source = %self.plan.source, resource, %error, "watch request failed");
                {
                    let mut health = self.health.lock();
                    health.connected = Some(needs_a_change && !matches!(error, WatchError::Guard(_)));
                    health.unreachable = Some(error.to_string());
                    health.problem = needs_a_change.then(|| Problem::new(problem_reason(&error), error.to_string()));
                }
                if matches!(error, WatchError::AnswerTooLarge { .. } | WatchError::PageTooLarge) {
                    self.warn(problem_reason(&error), &format!("{resource}: {error}")).await;
                }
                let policy = if needs_a_change { &NEEDS_A_CHANGE } else { &TRANSIENT };
                if !self.pause(policy).await {
                    return Next::Park;
                }
                if needs_a_change && let Err(problem) = self.load_credentials().await {
                    self.set_problem(Some(problem));
                }
                Next::Retry(position.clone())
            }
        }
    }

    fn set_problem(&self, problem: Option<Problem>) {
        self.health.lock().problem = problem;
    }

    /// The oldest point bk-cmdb still holds, by the spec's retention, less a margin.
    fn oldest(&self) -> Position {
        Position::StartFrom(jiff::Timestamp::now().as_second() - self.plan.retention_seconds + RETENTION_MARGIN_SECONDS)
    }

    /// Sleeps the backoff of one more failure; false when stopped meanwhile.
    async fn pause(&mut self, policy: &RetryPolicy) -> bool {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(policy, self.failures, fastrand::f64());
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.stop.cancelled() => false,
        }
    }

    async fn warn(&self, reason: &str, note: &str) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: "Watch".into(),
            secondary: None,
        };
        tokio::select! {
            published = self.ctx.recorder.publish(&event, &self.plan.reference) => {
                if let Err(error) = published {
                    tracing::warn!(%error, source = %self.plan.source, "could not record a Warning event");
                }
            }
            () = self.stop.cancelled() => {}
        }
    }
}

fn problem_reason(error: &WatchError) -> &'static str {
    match error {
        WatchError::Guard(_) => "DestinationRefused",
        WatchError::Unauthorized { .. } => "CredentialsRefused",
        WatchError::AnswerTooLarge { .. } => "AnswerTooLarge",
        WatchError::PageTooLarge => "PageTooLarge",
        _ => "WatchRefused",
    }
}
