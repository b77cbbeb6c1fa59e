//! The JetStream engine (`store.engine: jetstream`, docs/engines.md): herald's store kept in
//! NATS JetStream streams, replicated by JetStream (R3 by default), so that losing a pod or
//! a NATS node loses nothing that was acknowledged.
//!
//! Layout, with `R` the configured stream name (lower-cased for subjects):
//! - stream `R`: everything a publish or a watch page commits, so that one atomic batch
//!   commits it all: queue entries `r.q.<subscription>` (position = stream sequence),
//!   each subscription's head `r.h.<subscription>` (its last distribution id, rolled up to
//!   one message), dead letters `r.d.<subscription>`, watch positions `r.w.<watch>` and
//!   pre-images `r.p.<watch>.<instance>` (each rolled up to one message).
//! - stream `R_STATE`: each subscription's counters and per-minute counts `r.s.<subscription>`
//!   (one message per subject, written with compare-and-set on its sequence).
//! - stream `R_LOG`: the delivery log `r.l.<subscription>`, the newest 100 per subject.
//!
//! Distribution ids are assigned at publish: the batch carries each subscription's new
//! head with `Nats-Expected-Last-Subject-Sequence` set to the head it read, so two
//! publishers that race for a subscription cannot both commit; the loser reads the heads
//! again and retries. Ids are therefore contiguous per subscription and fixed for good.

use super::{
    ANSWER_HEAD_BYTES, Attempt, AttemptResult, Counters, DeadLetter, EngineError, EventStore, Exchange, Fanout,
    LOGGED_ATTEMPTS, Limits, LoggedAttempt, MINUTES_KEPT, Millis, MinuteCount, NewEvent, Outcome, Queued, StoreError,
    WatchPage, WatchPosition, minute_of, now_millis,
};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Messages in one atomic batch (the server's default ceiling).
const BATCH_MESSAGES: usize = 1000;

/// Settled entries of one outcome write deleted at once.
const PARALLEL_DELETES: usize = 64;

/// Settled positions each subscription's state remembers (`SubscriptionState::done`).
const DONE_KEPT: usize = 2048;

/// How long the writer keeps retrying outcomes JetStream refuses before it reports them lost.
const OUTCOME_RETRY: Duration = Duration::from_secs(60);

/// Attempts to create or update herald's streams at start.
const STREAM_SETUP_TRIES: usize = 10;

/// Longest a publish or a watch page commit may take before it answers 503.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest wait for JetStream to confirm a batch.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Reads of one queue page, at most.
const READ_PAGE: usize = 256;

/// How long a measured store size is reused before it is measured again.
const SIZE_TTL: Duration = Duration::from_secs(1);

/// Head-of-subscription conflicts (another replica published first) retried, with a
/// growing random pause, before a publish gives up (about 4 s in all).
const CONFLICT_RETRIES: usize = 40;

/// JetStream's error codes for a failed expected-last-sequence check: the head moved, or
/// another batch checking the same head is in flight.
const WRONG_LAST_SEQUENCE: [u64; 2] = [10071, 10164];

/// JetStream's error code for an atomic batch holding a message id it committed before.
const DUPLICATE_IN_BATCH: u64 = 10201;

/// Subscriptions whose batches one publish commits at once (JetStream allows 50 atomic
/// batches in flight per stream).
const PARALLEL_BATCHES: usize = 8;

/// How long a count of pending deliveries is reused for the backlog cap.
const PENDING_TTL: Duration = Duration::from_secs(5);

/// How to reach JetStream and how to lay out herald's streams.
#[derive(Clone, Debug)]
pub struct JetStreamSettings {
    pub urls: Vec<String>,
    /// Name of herald's streams (`R`, `R_STATE`, `R_LOG`); one per installation.
    pub stream: String,
    pub replicas: usize,
    /// Window in which JetStream drops a re-sent watch event (a page committed in several
    /// batches and read again after a crash).
    pub duplicate_window: Duration,
    pub auth: NatsAuth,
    /// PEM bundle of the CAs that sign the NATS servers' certificates; TLS is required
    /// when set.
    pub ca_file: Option<std::path::PathBuf>,
}

/// NATS credentials, each read from a file (a mounted Secret).
#[derive(Clone, Debug, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A `.creds` file (JWT and NKey seed).
    CredentialsFile(std::path::PathBuf),
    /// A file holding an NKey seed.
    NkeySeedFile(std::path::PathBuf),
    /// A file holding a token.
    TokenFile(std::path::PathBuf),
}

#[derive(Clone)]
struct Names {
    queue: String,
    state: String,
    log: String,
    root: String,
}

impl Names {
    fn new(stream: &str) -> Self {
        Names {
            queue: stream.to_string(),
            state: format!("{stream}_STATE"),
            log: format!("{stream}_LOG"),
            root: stream.to_lowercase(),
        }
    }
    fn queue_entry(&self, subscription: i64) -> String {
        format!("{}.q.{subscription}", self.root)
    }
    fn head(&self, subscription: i64) -> String {
        format!("{}.h.{subscription}", self.root)
    }
    fn dead(&self, subscription: i64) -> String {
        format!("{}.d.{subscription}", self.root)
    }
    fn state(&self, subscription: i64) -> String {
        format!("{}.s.{subscription}", self.root)
    }
    fn log(&self, subscription: i64) -> String {
        format!("{}.l.{subscription}", self.root)
    }
    fn position(&self, watch: &str) -> String {
        format!("{}.w.{}", self.root, token(watch))
    }
    fn pre_image(&self, watch: &str, instance: &str) -> String {
        format!("{}.p.{}.{}", self.root, token(watch), token(instance))
    }
    fn pre_images(&self, watch: &str) -> String {
        format!("{}.p.{}.*", self.root, token(watch))
    }
    /// Core NATS subject (not stored) on which publishers announce the subscriptions they
    /// queued for, so the replica delivering them wakes at once.
    fn wake(&self) -> String {
        format!("{}.wake", self.root)
    }
    /// The subscription a `r.<kind>.<id>` subject names.
    fn subscription_of(subject: &str) -> Option<i64> {
        subject.rsplit('.').next()?.parse().ok()
    }
}

/// A subject token for any text: hex of its bytes (watch keys and instance keys hold `/`,
/// `.` and spaces, which subjects cannot).
fn token(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn untoken(hex: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// One queued delivery as stored in `r.q.<subscription>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    id: i64,
    event: i64,
    at: Millis,
    body: String,
}

/// A subscription's head in `r.h.<subscription>`: the last distribution id given out, and
/// how many events went straight to dead letters because the backlog was full.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Head {
    last_id: i64,
    overflowed: i64,
}

/// A subscription's counters in `r.s.<subscription>`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SubscriptionState {
    total: i64,
    failure: i64,
    delivered: i64,
    dead_lettered: i64,
    consecutive_failures: i64,
    last_error: Option<String>,
    last_delivery_at: Option<Millis>,
    /// Attempts made so far of entries still queued, by position.
    attempts: BTreeMap<u64, u32>,
    /// The newest `DONE_KEPT` positions counted as delivered or dead-lettered: an entry
    /// whose deletion a crash prevented is deleted, not delivered again, and an outcome
    /// recorded twice (a previous shard holder's last attempt) is counted once.
    #[serde(default)]
    done: BTreeSet<u64>,
    /// minute → (attempts, failures), for `MINUTES_KEPT` minutes.
    minutes: BTreeMap<i64, (i64, i64)>,
}

/// A watch's position in `r.w.<watch>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredPosition {
    cursor: String,
    events_read: i64,
}

/// One attempt in `r.l.<subscription>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LogLine {
    at: Millis,
    distribution_id: i64,
    attempt: i64,
    result: String,
    error: String,
    http_status: Option<u16>,
    latency_ms: Option<u32>,
    answer_head: String,
}

/// A stored dead letter in `r.d.<subscription>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredLetter {
    id: i64,
    event: i64,
    attempts: u32,
    reason: String,
    error: String,
    dead_at: Millis,
    body: String,
}

/// One message of an atomic batch.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Outgoing {
    fn json<T: Serialize>(subject: String, value: &T) -> Self {
        let payload = Bytes::from(serde_json::to_vec(value).unwrap_or_default());
        Outgoing { subject, headers: HeaderMap::new(), payload }
    }
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }
    /// Replaces every earlier message on its subject when committed.
    fn rolled_up(self) -> Self {
        self.header("Nats-Rollup", "sub")
    }
}

/// Why a batch was not committed.
enum BatchRefusal {
    /// Another publisher moved a head first.
    Conflict,
    /// A message id in it was committed before (a page read again after a crash).
    Duplicate,
    Failed(StoreError),
}

impl BatchRefusal {
    fn into_error(self) -> StoreError {
        match self {
            BatchRefusal::Conflict => StoreError::Commit("a batch conflicted with another writer".into()),
            BatchRefusal::Duplicate => StoreError::Commit("a batch repeated committed messages".into()),
            BatchRefusal::Failed(error) => error,
        }
    }
}

fn query<E: std::error::Error + Send + Sync + 'static>(error: E) -> StoreError {
    StoreError::Query(Box::new(error) as EngineError)
}

/// A JetStream failure to reach or to commit, answered as 503 with a retry.
fn unavailable(detail: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { detail: detail.to_string() }
}

struct Shared {
    client: async_nats::Client,
    queue: stream::Stream,
    state: stream::Stream,
    log: stream::Stream,
    names: Names,
    limits: Limits,
    /// Heads this process last saw (id, sequence of the head message).
    heads: Mutex<HashMap<i64, (Head, u64)>>,
    /// Subscription states this process last saw, with the sequence they were read at.
    states: Mutex<HashMap<i64, (SubscriptionState, u64)>>,
    /// Entries handed to the worker, by (subscription, position), until their outcome.
    handed_out: Mutex<HashMap<(i64, u64), Entry>>,
    /// Serialises this process's publishes (heads are cached, so they never conflict
    /// with each other).
    publishing: tokio::sync::Mutex<()>,
    size: Mutex<(u64, Option<Instant>)>,
    pending: Mutex<Option<(HashMap<i64, i64>, Instant)>>,
    lost_outcomes: Mutex<HashSet<i64>>,
    /// The largest message the servers take, read once at connect (a cluster's servers
    /// share their configuration).
    max_payload: usize,
}

pub struct JetStreamStore {
    shared: Arc<Shared>,
    /// Subscriptions other replicas queued for, until delivery takes the feed.
    wakes: Mutex<Option<mpsc::UnboundedReceiver<i64>>>,
    records: mpsc::UnboundedSender<(u64, Attempt)>,
    next_ticket: Mutex<u64>,
    committed: watch::Receiver<u64>,
}

impl JetStreamStore {
    /// Connects and creates (or updates) herald's streams.
    pub async fn open(settings: &JetStreamSettings, limits: Limits) -> Result<Self, StoreError> {
        let client = connect(settings).await?;
        let context = jetstream::new(client.clone());
        let names = Names::new(&settings.stream);
        let root = &names.root;
        // The quota is herald's to enforce (growth is refused at the quota, a cursor may
        // still move). No stream byte limit: a clustered JetStream reserves a stream's limit
        // on its servers when it places it, whether used or not.
        let queue = stream::Config {
            name: names.queue.clone(),
            subjects: ["q", "h", "d", "w", "p"].iter().map(|kind| format!("{root}.{kind}.>")).collect(),
            num_replicas: settings.replicas,
            discard: stream::DiscardPolicy::New,
            duplicate_window: settings.duplicate_window,
            allow_rollup: true,
            allow_atomic_publish: true,
            description: Some("herald: queues, heads, dead letters, watch positions, pre-images".into()),
            ..Default::default()
        };
        let state = stream::Config {
            name: names.state.clone(),
            subjects: vec![format!("{root}.s.*")],
            num_replicas: settings.replicas,
            max_messages_per_subject: 1,
            description: Some("herald: delivery counters per subscription".into()),
            ..Default::default()
        };
        let log = stream::Config {
            name: names.log.clone(),
            subjects: vec![format!("{root}.l.*")],
            num_replicas: settings.replicas,
            max_messages_per_subject: i64::try_from(LOGGED_ATTEMPTS).unwrap_or(100),
            max_age: Duration::from_secs(u64::try_from(MINUTES_KEPT).unwrap_or(1440) * 60),
            description: Some("herald: the delivery log, newest attempts per subscription".into()),
            ..Default::default()
        };
        let (queue, state, log) =
            (set_up(&context, &queue).await?, set_up(&context, &state).await?, set_up(&context, &log).await?);
        let max_payload = client.server_info().max_payload;
        let shared = Arc::new(Shared {
            max_payload,
            queue,
            state,
            log,
            client,
            names,
            limits,
            heads: Mutex::default(),
            states: Mutex::default(),
            handed_out: Mutex::default(),
            publishing: tokio::sync::Mutex::new(()),
            size: Mutex::new((0, None)),
            pending: Mutex::default(),
            lost_outcomes: Mutex::default(),
        });
        let (records, pending) = mpsc::unbounded_channel();
        let (settled, committed) = watch::channel(0);
        tokio::spawn(write_outcomes(shared.clone(), pending, settled));
        tokio::spawn(measure_size(Arc::downgrade(&shared)));
        let woken = shared.client.subscribe(shared.names.wake()).await.map_err(|source| StoreError::Open {
            path: format!("NATS subject {}", shared.names.wake()),
            source: Box::new(source),
        })?;
        let (wake, wakes) = mpsc::unbounded_channel();
        tokio::spawn(forward_wakes(woken, wake));
        Ok(JetStreamStore { shared, wakes: Mutex::new(Some(wakes)), records, next_ticket: Mutex::new(1), committed })
    }
}

/// Creates or updates a stream and opens it. Replicas starting together create the same
/// streams at once, and a stream's first placement can outlast one request: a few tries
/// before giving up.
async fn set_up(context: &jetstream::Context, config: &stream::Config) -> Result<stream::Stream, StoreError> {
    let mut tries = 0;
    loop {
        let result = match context.create_or_update_stream(config.clone()).await {
            Ok(_) => context.get_stream(&config.name).await.map_err(EngineError::from),
            Err(error) => Err(EngineError::from(error)),
        };
        match result {
            Ok(stream) => return Ok(stream),
            Err(error) if tries < STREAM_SETUP_TRIES => {
                tries += 1;
                tracing::warn!(%error, stream = %config.name, "setting up the stream failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(source) => return Err(StoreError::Open { path: format!("JetStream stream {}", config.name), source }),
        }
    }
}

async fn connect(settings: &JetStreamSettings) -> Result<async_nats::Client, StoreError> {
    let open_failed =
        |source: EngineError| StoreError::Open { path: format!("NATS at {}", redacted_urls(&settings.urls)), source };
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source: Box::new(source) })
    };
    let mut options = async_nats::ConnectOptions::new()
        .name("herald")
        .request_timeout(Some(Duration::from_secs(10)))
        .retry_on_initial_connect()
        .max_reconnects(None);
    options = match &settings.auth {
        NatsAuth::None => options,
        NatsAuth::TokenFile(path) => options.token(read(path)?),
        NatsAuth::NkeySeedFile(path) => options.nkey(read(path)?),
        NatsAuth::CredentialsFile(path) => {
            options.credentials_file(path).await.map_err(|source| open_failed(Box::new(source)))?
        }
    };
    if let Some(ca) = &settings.ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let addresses: Vec<async_nats::ServerAddr> = settings
        .urls
        .iter()
        .map(|url| url.parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|source| open_failed(Box::new(source)))?;
    let client = options.connect(addresses).await.map_err(|source| open_failed(Box::new(source)))?;
    Ok(client)
}

/// NATS URLs as they may be logged: a user, password or token in one is replaced by `***`
/// (`nats://***@nats:4222`).
pub fn redacted_urls(urls: &[String]) -> String {
    let redact = |url: &String| {
        let (scheme, rest) = url.split_once("://").map_or(("", url.as_str()), |(scheme, rest)| (scheme, rest));
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        match authority.rfind('@') {
            Some(at) if scheme.is_empty() => format!("***{}", &rest[at..]),
            Some(at) => format!("{scheme}://***{}", &rest[at..]),
            None => url.clone(),
        }
    };
    urls.iter().map(redact).collect::<Vec<_>>().join(",")
}

impl Shared {
    /// Commits `messages` as one atomic batch; returns the sequence of the last one. Bounded
    /// in time: while the client reconnects its sends wait, and a publish must answer 503.
    async fn commit_batch(&self, messages: Vec<Outgoing>) -> Result<u64, BatchRefusal> {
        match tokio::time::timeout(COMMIT_TIMEOUT, self.send_batch(messages)).await {
            Ok(result) => result,
            Err(_) => Err(BatchRefusal::Failed(unavailable(format!(
                "JetStream did not confirm a batch within {COMMIT_TIMEOUT:?}"
            )))),
        }
    }

    async fn send_batch(&self, messages: Vec<Outgoing>) -> Result<u64, BatchRefusal> {
        let batch = format!("herald-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let count = messages.len();
        for (index, message) in messages.into_iter().enumerate() {
            let Outgoing { subject, mut headers, payload } = message;
            headers.insert("Nats-Batch-Id", batch.as_str());
            headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
            if index + 1 < count {
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|error| BatchRefusal::Failed(unavailable(error)))?;
                continue;
            }
            headers.insert("Nats-Batch-Commit", "1");
            let answer = self
                .client
                .request_with_headers(subject, headers, payload)
                .await
                .map_err(|error| BatchRefusal::Failed(unavailable(format!("committing a batch: {error}"))))?;
            return read_ack(&answer.payload);
        }
        Err(BatchRefusal::Failed(StoreError::Commit("an empty batch".into())))
    }

    /// The size the quota is judged on: the queue stream's bytes, measured at most
    /// `SIZE_TTL` ago.
    async fn size(&self) -> Result<u64, StoreError> {
        if let (size, Some(at)) = *self.size.lock()
            && at.elapsed() < SIZE_TTL
        {
            return Ok(size);
        }
        let info = self.queue.get_info().await.map_err(unavailable)?;
        *self.size.lock() = (info.state.bytes, Some(Instant::now()));
        Ok(info.state.bytes)
    }

    async fn check_quota(&self) -> Result<(), StoreError> {
        let size = self.size().await?;
        // At the quota, not only beyond it: an empty store is 0 bytes, and a quota of 0
        // must refuse the first write as the embedded engine's does.
        if size >= self.limits.quota_bytes {
            return Err(StoreError::OverQuota { size, quota: self.limits.quota_bytes });
        }
        Ok(())
    }

    async fn last_on<T: for<'de> Deserialize<'de>>(
        &self,
        stream: &stream::Stream,
        subject: &str,
    ) -> Result<Option<(T, u64)>, StoreError> {
        match stream.raw_message_builder().last_by_subject(subject).send().await {
            Ok(message) => {
                let value = serde_json::from_slice(&message.payload).map_err(query)?;
                Ok(Some((value, message.sequence)))
            }
            Err(error) if is_absent(&error) => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Messages on `subject` after sequence `after`, up to `limit`, in order.
    async fn read_after(
        &self,
        stream: &stream::Stream,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<jetstream::message::StreamMessage>, StoreError> {
        let mut messages = Vec::new();
        let mut next = after + 1;
        while messages.len() < limit {
            match stream.raw_message_builder().sequence(next).next_by_subject(subject).send().await {
                Ok(message) => {
                    next = message.sequence + 1;
                    messages.push(message);
                }
                Err(error) if is_absent(&error) => break,
                Err(error) => return Err(unavailable(error)),
            }
        }
        Ok(messages)
    }

    /// Messages per subject matching `filter`.
    async fn subject_counts(
        &self,
        stream: &stream::Stream,
        filter: &str,
    ) -> Result<HashMap<String, usize>, StoreError> {
        let mut counts = HashMap::new();
        let mut subjects = stream.info_with_subjects(filter).await.map_err(unavailable)?;
        while let Some(subject) = subjects.next().await {
            let (subject, count) = subject.map_err(unavailable)?;
            counts.insert(subject, count);
        }
        Ok(counts)
    }

    async fn purge(&self, stream: &stream::Stream, filter: String, keep: Option<u64>) -> Result<(), StoreError> {
        let purge = stream.purge().filter(filter);
        let result = match keep {
            Some(keep) => purge.keep(keep).await,
            None => purge.await,
        };
        result.map(|_| ()).map_err(unavailable)
    }

    async fn head(&self, subscription: i64) -> Result<(Head, u64), StoreError> {
        if let Some(head) = self.heads.lock().get(&subscription) {
            return Ok(*head);
        }
        let head = self.last_on(&self.queue, &self.names.head(subscription)).await?.unwrap_or_default();
        self.heads.lock().insert(subscription, head);
        Ok(head)
    }

    /// Pending deliveries per subscription as last counted (at most `PENDING_TTL` ago),
    /// plus what this process queued since: the backlog cap is judged on it.
    async fn pending_counts(&self) -> Result<HashMap<i64, i64>, StoreError> {
        if let Some((counts, at)) = &*self.pending.lock()
            && at.elapsed() < PENDING_TTL
        {
            return Ok(counts.clone());
        }
        let counted = self.subject_counts(&self.queue, &format!("{}.q.*", self.names.root)).await?;
        let counts: HashMap<i64, i64> = counted
            .into_iter()
            .filter_map(|(subject, count)| Some((Names::subscription_of(&subject)?, i64::try_from(count).ok()?)))
            .collect();
        *self.pending.lock() = Some((counts.clone(), Instant::now()));
        Ok(counts)
    }

    /// Stores `events`' fan-out: each subscription's entries in chunks, each chunk one
    /// atomic batch ending with the subscription's new head, checked against the head the
    /// chunk was numbered from (the previous chunk's). A chunk whose head another publisher
    /// moved first is numbered again from the new head and retried, so ids stay contiguous
    /// even when a subscription's part spans batches. With `dedup` (watch pages) every entry
    /// carries a message id from its event's `request_id` and is a chunk of its own: an
    /// entry committed before a crash is refused as a repeat and skipped, never queued
    /// twice. `extra` (a page's position and pre-images) is committed once every entry is in.
    async fn publish_events(
        &self,
        events: Vec<NewEvent>,
        extra: Vec<Outgoing>,
        dedup: bool,
    ) -> Result<Vec<Vec<Fanout>>, StoreError> {
        let _serial = self.publishing.lock().await;
        let mut by_subscription: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            for &subscription in &event.subscriptions {
                by_subscription.entry(subscription).or_default().push(index);
            }
        }
        let pending = if by_subscription.is_empty() { HashMap::new() } else { self.pending_counts().await? };
        let chunk = if dedup { 1 } else { BATCH_MESSAGES - 1 };
        let now = now_millis();
        let parts = by_subscription.into_iter().map(|(subscription, indices)| {
            let backlog = pending.get(&subscription).copied().unwrap_or(0);
            self.publish_to(subscription, &events, indices, backlog, chunk, dedup, now)
        });
        let mut placed: HashMap<(usize, i64), Fanout> = HashMap::new();
        let mut queued: HashMap<i64, i64> = HashMap::new();
        let mut parts = futures::stream::iter(parts).buffer_unordered(PARALLEL_BATCHES);
        let mut failure = None;
        while let Some(part) = parts.next().await {
            match part {
                Ok((subscription, fanouts)) => {
                    *queued.entry(subscription).or_default() += fanouts.iter().filter(|(_, f)| f.queued).count() as i64;
                    placed.extend(fanouts.into_iter().map(|(i, f)| ((i, f.subscription_id), f)));
                }
                Err(error) => failure = Some(error),
            }
        }
        if let Some(error) = failure {
            *self.pending.lock() = None;
            return Err(error);
        }
        if let Some((counts, _)) = &mut *self.pending.lock() {
            for (subscription, added) in queued {
                *counts.entry(subscription).or_default() += added;
            }
        }
        if !extra.is_empty() {
            self.commit_messages(extra).await.map_err(BatchRefusal::into_error)?;
        }
        self.size.lock().1 = None;
        let woken: BTreeSet<i64> = placed.values().filter(|f| f.queued).map(|f| f.subscription_id).collect();
        if !woken.is_empty() {
            let ids: Vec<String> = woken.iter().map(i64::to_string).collect();
            // Best effort: a replica that misses it finds the entries on its next look.
            let _ = self.client.publish(self.names.wake(), Bytes::from(ids.join(","))).await;
        }
        Ok(events
            .iter()
            .enumerate()
            .map(|(index, event)| event.subscriptions.iter().filter_map(|id| placed.remove(&(index, *id))).collect())
            .collect())
    }

    /// One subscription's part of `publish_events`: its events (`indices`) in chunks.
    #[allow(clippy::too_many_arguments)]
    async fn publish_to(
        &self,
        subscription: i64,
        events: &[NewEvent],
        indices: Vec<usize>,
        mut backlog: i64,
        chunk: usize,
        dedup: bool,
        now: Millis,
    ) -> Result<(i64, Vec<(usize, Fanout)>), StoreError> {
        let mut fanouts = Vec::with_capacity(indices.len());
        let mut rest: &[usize] = &indices;
        let mut conflicts = 0;
        while !rest.is_empty() {
            let (head, head_seq) = self.head(subscription).await?;
            let part = &rest[..rest.len().min(chunk)];
            let mut next = head;
            let mut messages = Vec::with_capacity(part.len() + 1);
            let mut numbered = Vec::with_capacity(part.len());
            let mut added = 0;
            for &index in part {
                let event = &events[index];
                next.last_id += 1;
                let event_id = now.saturating_mul(1000).saturating_add(i64::try_from(index % 1000).unwrap_or(0));
                let fits = backlog + added < self.limits.backlog_cap;
                let message = if fits {
                    added += 1;
                    let entry = Entry { id: next.last_id, event: event_id, at: now, body: event.body.clone() };
                    Outgoing::json(self.names.queue_entry(subscription), &entry)
                } else {
                    next.overflowed += 1;
                    let letter = StoredLetter {
                        id: next.last_id,
                        event: event_id,
                        attempts: 0,
                        reason: "BacklogFull".into(),
                        error: format!("more than {} deliveries pending", self.limits.backlog_cap),
                        dead_at: now,
                        body: event.body.clone(),
                    };
                    Outgoing::json(self.names.dead(subscription), &letter)
                };
                messages.push(if dedup {
                    message.header("Nats-Msg-Id", &dedup_id(subscription, &event.body))
                } else {
                    message
                });
                numbered.push((
                    index,
                    Fanout { subscription_id: subscription, distribution_id: next.last_id, queued: fits },
                ));
            }
            messages.push(
                Outgoing::json(self.names.head(subscription), &next)
                    .header("Nats-Expected-Last-Subject-Sequence", &head_seq.to_string())
                    .rolled_up(),
            );
            match self.commit_batch(messages).await {
                Ok(last) => {
                    // The head is the batch's last message.
                    self.heads.lock().insert(subscription, (next, last));
                    backlog += added;
                    fanouts.extend(numbered);
                    rest = &rest[part.len()..];
                }
                Err(refusal) => {
                    self.heads.lock().remove(&subscription);
                    match refusal {
                        BatchRefusal::Conflict if conflicts < CONFLICT_RETRIES => {
                            conflicts += 1;
                            // Another replica's batch for this head is in flight: let it land.
                            let ceiling = 2u64 << conflicts.min(6);
                            tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=ceiling))).await;
                        }
                        BatchRefusal::Conflict => {
                            return Err(unavailable("other replicas kept publishing to the same subscription; retry"));
                        }
                        // Committed before a crash (a chunk of one entry): already queued.
                        BatchRefusal::Duplicate if dedup => rest = &rest[part.len()..],
                        other => return Err(other.into_error()),
                    }
                }
            }
        }
        Ok((subscription, fanouts))
    }

    /// Commits `messages` atomically when they fit one batch; otherwise in batches, in
    /// order (a failure part-way leaves the earlier batches committed).
    async fn commit_messages(&self, messages: Vec<Outgoing>) -> Result<u64, BatchRefusal> {
        let mut messages = messages.into_iter().peekable();
        let mut last = 0;
        while messages.peek().is_some() {
            let part: Vec<Outgoing> = messages.by_ref().take(BATCH_MESSAGES).collect();
            last = self.commit_batch(part).await?;
        }
        Ok(last)
    }

    /// Applies `change` to a subscription's state with compare-and-set, reading it again
    /// when another writer got there first (counters are deltas, so re-applying is right).
    async fn update_state(
        &self,
        subscription: i64,
        change: &(dyn Fn(&mut SubscriptionState) + Sync),
    ) -> Result<(), StoreError> {
        for _ in 0..CONFLICT_RETRIES {
            let cached = self.states.lock().get(&subscription).cloned();
            let (mut state, seq) = match cached {
                Some(cached) => cached,
                None => self.last_on(&self.state, &self.names.state(subscription)).await?.unwrap_or_default(),
            };
            change(&mut state);
            let payload = Bytes::from(serde_json::to_vec(&state).map_err(query)?);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
            let published = jetstream::new(self.client.clone())
                .publish_with_headers(self.names.state(subscription), headers, payload)
                .await
                .map_err(unavailable)?
                .await;
            match published {
                Ok(ack) => {
                    self.states.lock().insert(subscription, (state, ack.sequence));
                    return Ok(());
                }
                Err(error) if is_wrong_last_sequence(&error) => {
                    self.states.lock().remove(&subscription);
                }
                Err(error) => {
                    self.states.lock().remove(&subscription);
                    return Err(unavailable(error));
                }
            }
        }
        Err(unavailable("the subscription's counters kept changing under this writer"))
    }

    async fn state_of(&self, subscription: i64) -> Result<SubscriptionState, StoreError> {
        let stored = self.last_on(&self.state, &self.names.state(subscription)).await?;
        let (state, seq): (SubscriptionState, u64) = stored.unwrap_or_default();
        self.states.lock().insert(subscription, (state.clone(), seq));
        Ok(state)
    }

    async fn entry_at(&self, subscription: i64, position: u64) -> Result<Option<Entry>, StoreError> {
        if let Some(entry) = self.handed_out.lock().get(&(subscription, position)) {
            return Ok(Some(entry.clone()));
        }
        match self.queue.raw_message_builder().sequence(position).send().await {
            Ok(message) if message.subject.as_str() == self.names.queue_entry(subscription) => {
                Ok(Some(serde_json::from_slice(&message.payload).map_err(query)?))
            }
            Ok(_) => Ok(None),
            Err(error) if is_absent(&error) => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Deletes one message. Not erased: `Stream::delete_message` asks JetStream to overwrite
    /// the message on disk as well (`no_erase` false), which made every delivery cost a disk
    /// write on every replica and bounded the engine (BENCHMARKS.md "Store engines"); the
    /// bytes are reclaimed with their block all the same.
    async fn delete(&self, stream: &stream::Stream, sequence: u64) -> Result<(), StoreError> {
        use async_nats::jetstream::response::Response;
        let subject = format!("STREAM.MSG.DELETE.{}", stream.cached_info().config.name);
        let request = serde_json::json!({"seq": sequence, "no_erase": true});
        // An error answer is what matters; a success says only `success: true`.
        let answer: Response<serde::de::IgnoredAny> =
            jetstream::new(self.client.clone()).request(subject, &request).await.map_err(unavailable)?;
        match answer {
            Response::Ok(_) => Ok(()),
            // Already gone (deleted by this subscription's previous owner, a retried
            // outcome, a dropped subscription).
            Response::Err { error } if names_nothing(error.error_code()) => Ok(()),
            Response::Err { error } => Err(unavailable(error)),
        }
    }

    /// Writes one subscription's outcomes: log and dead letters, then counters, then the
    /// settled entries' deletion. Fails only before the counters are written, so it may
    /// be retried whole (a log line may then appear twice; nothing is counted twice).
    async fn write_outcomes_of(&self, subscription: i64, attempts: Vec<Attempt>) -> Result<(), StoreError> {
        let cached = self.states.lock().get(&subscription).map(|(state, _)| state.attempts.clone());
        let mut made = match cached {
            Some(made) => made,
            None => self.state_of(subscription).await?.attempts,
        };
        let js = jetstream::new(self.client.clone());
        let mut acks = Vec::new();
        let mut settled = Vec::new();
        let mut found = Vec::with_capacity(attempts.len());
        for attempt in &attempts {
            let position = u64::try_from(attempt.position).unwrap_or(0);
            // An outcome for an entry that is gone (settled already, or its subscription
            // dropped) counts for nothing.
            let Some(entry) = self.entry_at(subscription, position).await? else { continue };
            found.push(attempt.clone());
            let before = made.get(&position).copied().unwrap_or(0);
            let attempted = !matches!(attempt.outcome, Outcome::DeadLettered { attempted: false, .. });
            let now_made = before + u32::from(attempted);
            if let Some(result) = AttemptResult::of(&attempt.outcome) {
                let error = match &attempt.outcome {
                    Outcome::Delivered => String::new(),
                    Outcome::Failed { error } | Outcome::DeadLettered { error, .. } => error.clone(),
                };
                let line = LogLine {
                    at: attempt.at,
                    distribution_id: entry.id,
                    attempt: i64::from(now_made),
                    result: result.as_str().into(),
                    error,
                    http_status: attempt.exchange.http_status,
                    latency_ms: attempt.exchange.latency_ms,
                    answer_head: attempt.exchange.answer_head.chars().take(ANSWER_HEAD_BYTES).collect(),
                };
                let payload = Bytes::from(serde_json::to_vec(&line).map_err(query)?);
                acks.push(js.publish(self.names.log(subscription), payload).await.map_err(unavailable)?);
            }
            match &attempt.outcome {
                Outcome::Failed { .. } => {
                    made.insert(position, now_made);
                }
                Outcome::Delivered => {
                    made.remove(&position);
                    settled.push(position);
                }
                Outcome::DeadLettered { error, reason, .. } => {
                    made.remove(&position);
                    let letter = StoredLetter {
                        id: entry.id,
                        event: entry.event,
                        attempts: now_made,
                        reason: reason.clone(),
                        error: error.clone(),
                        dead_at: attempt.at,
                        body: entry.body.clone(),
                    };
                    let payload = Bytes::from(serde_json::to_vec(&letter).map_err(query)?);
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("dead-{subscription}-{position}").as_str());
                    js.publish_with_headers(self.names.dead(subscription), headers, payload)
                        .await
                        .map_err(unavailable)?
                        .await
                        .map_err(unavailable)?;
                    settled.push(position);
                }
            }
        }
        for ack in acks {
            ack.await.map_err(unavailable)?;
        }
        // Counted first, deleted after: a crash in between leaves entries that `queued`
        // finds in `done` and deletes instead of delivering them again.
        self.update_state(subscription, &|state: &mut SubscriptionState| apply_outcomes(state, &found)).await?;
        // An entry whose deletion fails here stays in `done`, and `queued` deletes it later
        // (so this write, which would count again, is never retried for it). In parallel:
        // one round trip after another, deletions bounded the delivery rate.
        let deletions = settled.into_iter().map(|position| async move {
            self.handed_out.lock().remove(&(subscription, position));
            if let Err(error) = self.delete(&self.queue, position).await {
                tracing::warn!(%error, subscription, position, "deleting a settled entry failed; it is deleted later");
            }
        });
        futures::stream::iter(deletions).buffer_unordered(PARALLEL_DELETES).collect::<Vec<()>>().await;
        self.size.lock().1 = None;
        Ok(())
    }
}

/// What `attempts` do to a subscription's counters, attempts and per-minute counts.
fn apply_outcomes(state: &mut SubscriptionState, attempts: &[Attempt]) {
    for attempt in attempts {
        let position = u64::try_from(attempt.position).unwrap_or(0);
        if state.done.contains(&position) {
            // Settled already (an outcome recorded twice): counted once.
            continue;
        }
        if !matches!(attempt.outcome, Outcome::Failed { .. }) {
            state.done.insert(position);
        }
        let minute = minute_of(attempt.at);
        let attempted = !matches!(attempt.outcome, Outcome::DeadLettered { attempted: false, .. });
        if attempted {
            state.total += 1;
        }
        match &attempt.outcome {
            Outcome::Delivered => {
                state.delivered += 1;
                state.consecutive_failures = 0;
                state.last_delivery_at = Some(attempt.at);
                state.attempts.remove(&position);
                state.minutes.entry(minute).or_default().0 += 1;
            }
            Outcome::Failed { error } => {
                state.failure += 1;
                state.consecutive_failures += 1;
                state.last_error = Some(error.clone());
                *state.attempts.entry(position).or_default() += 1;
                let counts = state.minutes.entry(minute).or_default();
                counts.0 += 1;
                counts.1 += 1;
            }
            Outcome::DeadLettered { error, .. } => {
                if attempted {
                    state.failure += 1;
                    state.consecutive_failures += 1;
                    let counts = state.minutes.entry(minute).or_default();
                    counts.0 += 1;
                    counts.1 += 1;
                }
                state.dead_lettered += 1;
                state.last_error = Some(error.clone());
                state.attempts.remove(&position);
            }
        }
    }
    while state.done.len() > DONE_KEPT {
        state.done.pop_first();
    }
    if let Some(newest) = state.minutes.keys().next_back().copied() {
        state.minutes = state.minutes.split_off(&(newest - MINUTES_KEPT + 1));
    }
}

/// The message id of a watch event's entry for one subscription: its `request_id` (the
/// digest of its bk-cmdb cursor), so the same event read again after a crash is refused
/// by JetStream instead of queued twice. The body is hashed only when it has none.
fn dedup_id(subscription: i64, body: &str) -> String {
    let request_id = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|event| event.get("request_id")?.as_str().map(str::to_string));
    let key = request_id.unwrap_or_else(|| {
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
    });
    format!("w-{subscription}-{key}")
}

/// Whether a read found nothing: no such message, or a start beyond the stream's last
/// sequence (JetStream answers that as "sequence not found").
fn is_absent(error: &stream::RawMessageError) -> bool {
    match error.kind() {
        stream::RawMessageErrorKind::NoMessageFound => true,
        stream::RawMessageErrorKind::JetStream(error) => names_nothing(error.error_code()),
        _ => false,
    }
}

/// JetStream's answer for a sequence that holds no message (gone, or never there).
fn names_nothing(code: async_nats::jetstream::ErrorCode) -> bool {
    use async_nats::jetstream::ErrorCode;
    [ErrorCode::SEQUENCE_NOT_FOUND, ErrorCode::NO_MESSAGE_FOUND].contains(&code)
}

fn is_wrong_last_sequence(error: &jetstream::context::PublishError) -> bool {
    error.to_string().contains("wrong last sequence")
}

/// Reads a batch commit's answer.
fn read_ack(payload: &[u8]) -> Result<u64, BatchRefusal> {
    let answer: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|error| BatchRefusal::Failed(StoreError::Commit(format!("unreadable batch answer: {error}"))))?;
    if let Some(error) = answer.get("error") {
        let code = error.get("err_code").and_then(serde_json::Value::as_u64).unwrap_or(0);
        let description = error.get("description").and_then(serde_json::Value::as_str).unwrap_or("").to_string();
        if WRONG_LAST_SEQUENCE.contains(&code) {
            return Err(BatchRefusal::Conflict);
        }
        if code == DUPLICATE_IN_BATCH {
            return Err(BatchRefusal::Duplicate);
        }
        if description.contains("maximum bytes") || description.contains("resource limits") {
            return Err(BatchRefusal::Failed(StoreError::Full { detail: description }));
        }
        return Err(BatchRefusal::Failed(unavailable(format!("JetStream refused a batch ({code}): {description}"))));
    }
    answer
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| BatchRefusal::Failed(StoreError::Commit("a batch answer without a sequence".into())))
}

/// Keeps `size_bytes` (metrics, the sweep) within a few seconds of the truth while the
/// store is open.
async fn measure_size(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else { return };
        if let Err(error) = shared.size().await {
            tracing::debug!(%error, "measuring the JetStream store failed");
        }
        drop(shared);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A publish or a page commit within `PUBLISH_TIMEOUT`, else 503: while the client
/// reconnects, its requests wait before their own timeouts start.
async fn bounded<T>(work: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(PUBLISH_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(unavailable(format!("JetStream did not answer within {PUBLISH_TIMEOUT:?}"))))
}

/// Writes recorded outcomes in the background, in runs, per subscription; a ticket is
/// settled once every outcome up to it is written (or reported lost).
async fn write_outcomes(
    shared: Arc<Shared>,
    mut pending: mpsc::UnboundedReceiver<(u64, Attempt)>,
    settled: watch::Sender<u64>,
) {
    while let Some(first) = pending.recv().await {
        let mut run = vec![first];
        while run.len() < 1024
            && let Ok(next) = pending.try_recv()
        {
            run.push(next);
        }
        let last_ticket = run.iter().map(|(ticket, _)| *ticket).max().unwrap_or(0);
        let mut by_subscription: BTreeMap<i64, Vec<Attempt>> = BTreeMap::new();
        for (_, attempt) in run {
            by_subscription.entry(attempt.subscription_id).or_default().push(attempt);
        }
        let writes = by_subscription.into_iter().map(|(subscription, attempts)| {
            let shared = shared.clone();
            async move {
                // While JetStream fails over (a node down, a leader being elected) the
                // outcomes wait here and the workers wait for their tickets, so an outage
                // costs no more redeliveries than a crash; only after `OUTCOME_RETRY` are
                // they given up as lost (the workers then read their queues again).
                let started = Instant::now();
                let mut pause = Duration::from_millis(100);
                loop {
                    match shared.write_outcomes_of(subscription, attempts.clone()).await {
                        Ok(()) => return,
                        Err(error) if started.elapsed() < OUTCOME_RETRY => {
                            tracing::warn!(%error, subscription, "writing delivery outcomes to JetStream failed; retrying");
                            shared.states.lock().remove(&subscription);
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(2));
                        }
                        Err(error) => {
                            tracing::error!(%error, subscription, "writing delivery outcomes to JetStream failed");
                            shared.states.lock().remove(&subscription);
                            shared.lost_outcomes.lock().insert(subscription);
                            return;
                        }
                    }
                }
            }
        });
        futures::stream::iter(writes).buffer_unordered(16).collect::<Vec<()>>().await;
        settled.send_if_modified(|settled| {
            let raised = last_ticket > *settled;
            *settled = (*settled).max(last_ticket);
            raised
        });
    }
}

/// The length of `text` as a JSON string, quotes and escapes included, as serde_json
/// writes it: counted on every publish, so without writing a copy.
fn json_string_len(text: &str) -> usize {
    let escaped = |c: char| match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    };
    2 + text.chars().map(escaped).sum::<usize>()
}

/// Bytes a stored message needs beside its event body: the entry's other fields, a dead
/// letter's reason and error, the batch and dedup headers.
const ENVELOPE_ALLOWANCE: usize = 4096;

impl EventStore for JetStreamStore {
    fn fits(&self, body: &str) -> bool {
        // The entry wraps the body as a JSON string (escaped) beside a few numbers; dead
        // letters and headers add a little more.
        json_string_len(body).saturating_add(ENVELOPE_ALLOWANCE) <= self.shared.max_payload
    }

    fn publish(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>> {
        Box::pin(bounded(async move {
            if events.iter().any(|e| !e.subscriptions.is_empty()) {
                self.shared.check_quota().await?;
            }
            self.shared.publish_events(events, Vec::new(), false).await
        }))
    }

    fn queued(
        &self,
        subscription_id: i64,
        after_position: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Queued>, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let subject = shared.names.queue_entry(subscription_id);
            let after = u64::try_from(after_position).unwrap_or(0);
            let messages = shared.read_after(&shared.queue, &subject, after, limit.min(READ_PAGE)).await?;
            let state = if messages.is_empty() {
                SubscriptionState::default()
            } else {
                shared.state_of(subscription_id).await?
            };
            let mut queued = Vec::with_capacity(messages.len());
            for message in messages {
                if state.done.contains(&message.sequence) {
                    // Settled before a crash took its deletion.
                    shared.delete(&shared.queue, message.sequence).await?;
                    continue;
                }
                let entry: Entry = serde_json::from_slice(&message.payload).map_err(query)?;
                queued.push(Queued {
                    subscription_id,
                    position: i64::try_from(message.sequence).unwrap_or(i64::MAX),
                    event_id: entry.event,
                    distribution_id: entry.id,
                    attempts: state.attempts.get(&message.sequence).copied().unwrap_or(0),
                    enqueued_at: entry.at,
                    body: entry.body.clone(),
                });
                shared.handed_out.lock().insert((subscription_id, message.sequence), entry);
            }
            Ok(queued)
        })
    }

    fn record_attempt(&self, attempt: Attempt) -> Result<u64, StoreError> {
        // Numbered and sent under one lock: the writer sees tickets in order, so a settled
        // ticket means every earlier one is settled too.
        let mut next_ticket = self.next_ticket.lock();
        let ticket = *next_ticket;
        self.records.send((ticket, attempt)).map_err(|_| StoreError::WriterStopped)?;
        *next_ticket += 1;
        Ok(ticket)
    }

    fn committed(&self, ticket: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut committed = self.committed.clone();
        Box::pin(async move {
            committed.wait_for(|settled| *settled >= ticket).await.map_err(|_| StoreError::WriterStopped)?;
            Ok(())
        })
    }

    fn settled(&self) -> u64 {
        *self.committed.borrow()
    }

    fn counters(&self, subscription_id: i64) -> BoxFuture<'_, Result<Counters, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let state = shared.state_of(subscription_id).await?;
            let head = shared.last_on::<Head>(&shared.queue, &shared.names.head(subscription_id)).await?;
            let subject = shared.names.queue_entry(subscription_id);
            let pending = shared.subject_counts(&shared.queue, &subject).await?.get(&subject).copied().unwrap_or(0);
            Ok(Counters {
                total: state.total,
                failure: state.failure,
                delivered: state.delivered,
                dead_lettered: state.dead_lettered + head.map_or(0, |(head, _)| head.overflowed),
                pending: i64::try_from(pending).unwrap_or(i64::MAX),
                consecutive_failures: state.consecutive_failures,
                last_error: state.last_error,
                last_delivery_at: state.last_delivery_at,
            })
        })
    }

    fn dead_letters(&self, subscription_id: i64, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let messages = shared.read_after(&shared.queue, &shared.names.dead(subscription_id), 0, limit).await?;
            let mut letters = Vec::with_capacity(messages.len());
            for message in messages {
                let letter: StoredLetter = serde_json::from_slice(&message.payload).map_err(query)?;
                letters.push(DeadLetter {
                    subscription_id,
                    distribution_id: letter.id,
                    event_id: letter.event,
                    attempts: letter.attempts,
                    reason: letter.reason,
                    error: letter.error,
                    dead_at: letter.dead_at,
                    body: letter.body,
                });
            }
            // Oldest first, as stored; a replayed event that died again comes after.
            letters.sort_by_key(|l| l.distribution_id);
            Ok(letters)
        })
    }

    fn delivery_log(
        &self,
        subscription_id: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<LoggedAttempt>, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let messages =
                shared.read_after(&shared.log, &shared.names.log(subscription_id), 0, LOGGED_ATTEMPTS).await?;
            let mut logged = Vec::with_capacity(messages.len());
            for message in messages.iter().rev().take(limit) {
                let line: LogLine = serde_json::from_slice(&message.payload).map_err(query)?;
                let Some(result) = AttemptResult::parse(&line.result) else { continue };
                logged.push(LoggedAttempt {
                    at: line.at,
                    distribution_id: line.distribution_id,
                    attempt: line.attempt,
                    result,
                    error: line.error,
                    exchange: Exchange {
                        http_status: line.http_status,
                        latency_ms: line.latency_ms,
                        answer_head: line.answer_head,
                    },
                });
            }
            Ok(logged)
        })
    }

    fn attempts_per_minute(
        &self,
        subscription_id: i64,
        minutes: std::ops::RangeInclusive<i64>,
    ) -> BoxFuture<'_, Result<Vec<MinuteCount>, StoreError>> {
        Box::pin(async move {
            let state = self.shared.state_of(subscription_id).await?;
            Ok(state
                .minutes
                .range(minutes)
                .map(|(minute, (attempts, failures))| MinuteCount {
                    minute: *minute,
                    attempts: *attempts,
                    failures: *failures,
                })
                .collect())
        })
    }

    fn replay(
        &self,
        subscription_id: i64,
        distribution_ids: Option<Vec<i64>>,
    ) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let wanted: Option<HashSet<i64>> = distribution_ids.map(|ids| ids.into_iter().collect());
            let messages = shared.read_after(&shared.queue, &shared.names.dead(subscription_id), 0, usize::MAX).await?;
            let mut replayed = Vec::new();
            let mut entries = Vec::new();
            let now = now_millis();
            for message in messages {
                let letter: StoredLetter = serde_json::from_slice(&message.payload).map_err(query)?;
                if wanted.as_ref().is_some_and(|ids| !ids.contains(&letter.id)) {
                    continue;
                }
                let entry = Entry { id: letter.id, event: letter.event, at: now, body: letter.body };
                entries.push(Outgoing::json(shared.names.queue_entry(subscription_id), &entry));
                replayed.push(message.sequence);
            }
            // The entries go in before the letters go: a failure in between leaves a
            // letter that was also replayed, never one that was lost.
            let count = replayed.len();
            shared.commit_messages(entries).await.map_err(BatchRefusal::into_error)?;
            for sequence in replayed {
                shared.delete(&shared.queue, sequence).await?;
            }
            shared.size.lock().1 = None;
            Ok(count)
        })
    }

    fn drop_subscription(&self, subscription_id: i64) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let names = &shared.names;
            for subject in
                [names.queue_entry(subscription_id), names.dead(subscription_id), names.head(subscription_id)]
            {
                shared.purge(&shared.queue, subject, None).await?;
            }
            shared.purge(&shared.state, names.state(subscription_id), None).await?;
            shared.purge(&shared.log, names.log(subscription_id), None).await?;
            shared.heads.lock().remove(&subscription_id);
            shared.states.lock().remove(&subscription_id);
            shared.handed_out.lock().retain(|(id, _), _| *id != subscription_id);
            Ok(())
        })
    }

    fn subscriptions(&self) -> BoxFuture<'_, Result<Vec<i64>, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let root = &shared.names.root;
            let mut ids = HashSet::new();
            for kind in ["q", "d", "h"] {
                let counts = shared.subject_counts(&shared.queue, &format!("{root}.{kind}.*")).await?;
                ids.extend(counts.keys().filter_map(|s| Names::subscription_of(s)));
            }
            let counts = shared.subject_counts(&shared.state, &format!("{root}.s.*")).await?;
            ids.extend(counts.keys().filter_map(|s| Names::subscription_of(s)));
            let mut ids: Vec<i64> = ids.into_iter().collect();
            ids.sort_unstable();
            Ok(ids)
        })
    }

    fn expire_dead_letters(&self, before: Millis) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let filter = format!("{}.d.*", shared.names.root);
            let mut expired = 0;
            let mut after = 0;
            loop {
                let messages = shared.read_after(&shared.queue, &filter, after, READ_PAGE).await?;
                let Some(last) = messages.last() else { break };
                after = last.sequence;
                for message in &messages {
                    let letter: StoredLetter = serde_json::from_slice(&message.payload).map_err(query)?;
                    if letter.dead_at < before {
                        shared.delete(&shared.queue, message.sequence).await?;
                        expired += 1;
                    }
                }
            }
            Ok(expired)
        })
    }

    fn watch_position(&self, watch: &str) -> BoxFuture<'_, Result<Option<WatchPosition>, StoreError>> {
        let watch = watch.to_string();
        Box::pin(async move {
            let shared = &self.shared;
            let Some((position, _)) =
                shared.last_on::<StoredPosition>(&shared.queue, &shared.names.position(&watch)).await?
            else {
                return Ok(None);
            };
            let kept = shared.subject_counts(&shared.queue, &shared.names.pre_images(&watch)).await?;
            let pre_images = i64::try_from(kept.len()).unwrap_or(i64::MAX);
            Ok(Some(WatchPosition { cursor: position.cursor, events_read: position.events_read, pre_images }))
        })
    }

    fn ingest(&self, page: WatchPage) -> BoxFuture<'_, Result<Vec<Vec<Fanout>>, StoreError>> {
        Box::pin(bounded(async move {
            let shared = &self.shared;
            if page.grows_store() {
                shared.check_quota().await?;
            }
            if page.forget_pre_images {
                shared.purge(&shared.queue, shared.names.pre_images(&page.watch), None).await?;
            }
            let previous = shared.last_on::<StoredPosition>(&shared.queue, &shared.names.position(&page.watch)).await?;
            let position = StoredPosition {
                cursor: page.cursor.clone(),
                events_read: previous.map_or(0, |(p, _)| p.events_read) + page.read,
            };
            // An instance's last change wins; a deletion is a tombstone purged afterwards.
            let mut latest: Vec<(String, Option<String>)> = Vec::new();
            for (instance, detail) in &page.pre_images {
                latest.retain(|(kept, _)| kept != instance);
                latest.push((instance.clone(), detail.clone()));
            }
            let mut extra: Vec<Outgoing> = latest
                .iter()
                .map(|(instance, detail)| {
                    Outgoing::json(shared.names.pre_image(&page.watch, instance), detail).rolled_up()
                })
                .collect();
            extra.push(Outgoing::json(shared.names.position(&page.watch), &position).rolled_up());
            let fanouts = shared.publish_events(page.events, extra, true).await?;
            for (instance, detail) in &latest {
                if detail.is_none() {
                    shared.purge(&shared.queue, shared.names.pre_image(&page.watch, instance), None).await?;
                }
            }
            if !latest.is_empty() {
                let keep = u64::try_from(page.pre_image_limit.max(0)).unwrap_or(0);
                let filter = shared.names.pre_images(&page.watch);
                // A limit of 0 keeps none: the purge without `keep`.
                shared.purge(&shared.queue, filter, (keep > 0).then_some(keep)).await?;
            }
            Ok(fanouts)
        }))
    }

    fn pre_images(
        &self,
        watch: &str,
        instances: Vec<String>,
    ) -> BoxFuture<'_, Result<HashMap<String, String>, StoreError>> {
        let watch = watch.to_string();
        Box::pin(async move {
            let shared = &self.shared;
            let mut kept = HashMap::new();
            for instance in instances {
                let subject = shared.names.pre_image(&watch, &instance);
                if let Some((Some(detail), _)) = shared.last_on::<Option<String>>(&shared.queue, &subject).await? {
                    kept.insert(instance, detail);
                }
            }
            Ok(kept)
        })
    }

    fn drop_watch(&self, watch: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let watch = watch.to_string();
        Box::pin(async move {
            let shared = &self.shared;
            shared.purge(&shared.queue, shared.names.pre_images(&watch), None).await?;
            shared.purge(&shared.queue, shared.names.position(&watch), None).await
        })
    }

    fn watches(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let counts = shared.subject_counts(&shared.queue, &format!("{}.w.*", shared.names.root)).await?;
            let mut watches: Vec<String> =
                counts.keys().filter_map(|subject| untoken(subject.rsplit('.').next()?)).collect();
            watches.sort();
            Ok(watches)
        })
    }

    fn pending_total(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let counts = shared.subject_counts(&shared.queue, &format!("{}.q.*", shared.names.root)).await?;
            Ok(i64::try_from(counts.values().sum::<usize>()).unwrap_or(i64::MAX))
        })
    }

    fn size_bytes(&self) -> u64 {
        self.shared.size.lock().0
    }

    fn outcomes_lost(&self, subscription_id: i64) -> bool {
        self.shared.lost_outcomes.lock().remove(&subscription_id)
    }

    fn wakes(&self) -> Option<mpsc::UnboundedReceiver<i64>> {
        self.wakes.lock().take()
    }
}

/// Hands on the subscription ids other replicas announce on `r.wake`.
async fn forward_wakes(mut woken: async_nats::Subscriber, wake: mpsc::UnboundedSender<i64>) {
    while let Some(message) = woken.next().await {
        let text = String::from_utf8_lossy(&message.payload);
        for id in text.split(',').filter_map(|id| id.parse::<i64>().ok()) {
            if wake.send(id).is_err() {
                return;
            }
        }
    }
}

/// Tests without NATS (the unit tier).
#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn credentials_in_nats_urls_never_reach_the_log() {
        let urls =
            ["nats://alice:s3cret@nats-0:4222".to_string(), "tls://tok3n@nats-1:4222/x@y".into(), "nats-2:4222".into()];
        let shown = redacted_urls(&urls);
        assert_eq!(shown, "nats://***@nats-0:4222,tls://***@nats-1:4222/x@y,nats-2:4222");
        assert!(!shown.contains("s3cret") && !shown.contains("tok3n") && !shown.contains("alice"));
    }

    #[test]
    fn the_json_length_of_a_body_is_what_serde_json_writes() {
        for text in ["", "plain", "\"quoted\" \\ slash", "tab\tline\nfeed\r\u{8}\u{c}", "\u{1}\u{1f}", "主机 ✓"] {
            assert_eq!(json_string_len(text), serde_json::to_string(text).unwrap().len(), "{text:?}");
        }
    }

    #[test]
    fn tokens_round_trip() {
        for text in ["", "uid-1/host", "a.b c*>", "主机"] {
            assert_eq!(untoken(&token(text)).as_deref(), Some(text));
        }
        assert_eq!(Names::subscription_of("herald.q.42"), Some(42));
    }
}

/// Tests against the NATS cluster tests/run.sh starts (the `nats` tier).
#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::conformance::conformance_suite;

    /// The cluster tests/run.sh starts (tests/nats/up.sh), and a fresh stream name, so
    /// each store starts empty.
    fn settings() -> JetStreamSettings {
        let urls = std::env::var("HERALD_TEST_NATS_URLS")
            .expect("HERALD_TEST_NATS_URLS names the NATS cluster (tests/run.sh starts one: tests/nats/up.sh)");
        JetStreamSettings {
            urls: urls.split(',').map(str::to_string).collect(),
            stream: format!("HERALDT{:08X}", fastrand::u32(..)),
            replicas: 3,
            duplicate_window: Duration::from_secs(120),
            auth: NatsAuth::None,
            ca_file: None,
        }
    }

    fn open(limits: Limits) -> Arc<dyn EventStore> {
        let settings = settings();
        let store = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(JetStreamStore::open(&settings, limits))
        });
        Arc::new(store.expect("JetStream store opens"))
    }

    async fn all_queued(store: &dyn EventStore, subscription: i64) -> Vec<Queued> {
        let mut all: Vec<Queued> = Vec::new();
        loop {
            let after = all.last().map_or(0, |q| q.position);
            let page = store.queued(subscription, after, 256).await.unwrap();
            if page.is_empty() {
                return all;
            }
            all.extend(page);
        }
    }

    /// Two replicas publishing to the same subscriptions at once: each subscription's ids
    /// run 1..=n with no gap or repeat, in queue order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(not(feature = "nats"), ignore = "needs NATS: tests/run.sh starts it (--features nats)")]
    async fn replicas_publishing_at_once_keep_ids_contiguous() {
        let settings = settings();
        let limits = crate::store::conformance::limits;
        let replicas = [
            Arc::new(JetStreamStore::open(&settings, limits()).await.unwrap()),
            Arc::new(JetStreamStore::open(&settings, limits()).await.unwrap()),
        ];
        let publishers = replicas.iter().enumerate().map(|(replica, store)| {
            let store = store.clone();
            tokio::spawn(async move {
                for request in 0..40 {
                    let events = (0..2)
                        .map(|n| NewEvent { body: format!("{replica}-{request}-{n}"), subscriptions: vec![1, 2] })
                        .collect();
                    store.publish(events).await.unwrap();
                }
            })
        });
        for publisher in futures::future::join_all(publishers).await {
            publisher.unwrap();
        }
        for subscription in [1, 2] {
            let queued = all_queued(&*replicas[1], subscription).await;
            let ids: Vec<i64> = queued.iter().map(|q| q.distribution_id).collect();
            assert_eq!(ids, (1..=160).collect::<Vec<_>>(), "subscription {subscription}");
            for replica in 0..2 {
                let own: Vec<&str> =
                    queued.iter().map(|q| q.body.as_str()).filter(|b| b.starts_with(&format!("{replica}-"))).collect();
                let published: Vec<String> =
                    (0..40).flat_map(|r| (0..2).map(move |n| format!("{replica}-{r}-{n}"))).collect();
                assert_eq!(own, published, "each replica's events keep their order");
            }
        }
    }

    /// A watch page whose entries were committed before a crash, but not its position, is
    /// read again: its entries are not queued twice and the position lands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(not(feature = "nats"), ignore = "needs NATS: tests/run.sh starts it (--features nats)")]
    async fn a_page_read_again_after_a_crash_is_queued_once() {
        let store = JetStreamStore::open(&settings(), crate::store::conformance::limits()).await.unwrap();
        // The same watch events read twice differ in `request_time`, not in `request_id`;
        // the second read is longer (more changes arrived meanwhile).
        let events = |read: &str, count: usize| -> Vec<NewEvent> {
            (1..=count)
                .map(|n| NewEvent {
                    body: format!("{{\"request_id\":\"{n}\",\"request_time\":\"{read}\"}}"),
                    subscriptions: vec![1, 2],
                })
                .collect()
        };
        // The crash: the entries went in, the closing batch (position) did not.
        store.shared.publish_events(events("first", 3), Vec::new(), true).await.unwrap();
        let page = WatchPage {
            watch: "w".into(),
            events: events("again", 5),
            cursor: "c".into(),
            read: 5,
            ..Default::default()
        };
        store.ingest(page).await.unwrap();
        for subscription in [1, 2] {
            let ids: Vec<i64> = all_queued(&store, subscription).await.iter().map(|q| q.distribution_id).collect();
            assert_eq!(ids, [1, 2, 3, 4, 5]);
        }
        assert_eq!(store.watch_position("w").await.unwrap().map(|p| p.cursor), Some("c".into()));
    }

    conformance_suite!(open, #[cfg_attr(not(feature = "nats"), ignore = "needs NATS: tests/run.sh starts it (--features nats)")]);
}
