//! The delivery worker without a cluster: the in-memory store, a receiver on loopback,
//! and the controller's cache filled by hand. Each test drives the real `Delivery`
//! (publish, workers, confirm, retries, dead letters, replay) and watches what the
//! receiver got and what the counters say. The end-to-end claims stay in tests/delivery.rs.

use super::index::{Subscriber, SubscriptionIndex};
use super::{Delivery, DeliveryParts};
use crate::config::DeliveryConfig;
use crate::crd::{ConfirmMode, EventSubscription, EventSubscriptionSpec};
use crate::effective::{Effective, RetryPolicy};
use crate::event::{EventData, StoredEvent};
use crate::outbound::{GuardConfig, Outbound};
use crate::store::memory::MemoryStore;
use crate::store::{Counters, EventStore, Limits};
use crate::telemetry::Metrics;
use crate::tenancy::Tenancy;
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ID: i64 = 7;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    distribution_id: i64,
    attempt: u32,
}

/// How the receiver answers its n-th request (0-based): status, extra headers, body.
type Script = dyn Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync;

/// A callback receiver on 127.0.0.1 that answers by script and records every request.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Arc<Script>>>,
    /// The most requests it was answering at once.
    most_at_once: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(
        script: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
    ) -> Self {
        Self::holding(Duration::ZERO, script).await
    }

    /// As `start`, holding each request `hold` before answering it.
    async fn holding(
        hold: Duration,
        script: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static,
    ) -> Self {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Arc<Mutex<Arc<Script>>> = Arc::new(Mutex::new(Arc::new(script)));
        let (at_once, most_at_once) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (log, answers, most) = (received.clone(), script.clone(), most_at_once.clone());
        let handler = move |headers: HeaderMap, body: axum::body::Bytes| {
            let (log, answers, at_once, most) = (log.clone(), answers.clone(), at_once.clone(), most.clone());
            async move {
                most.fetch_max(at_once.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                at_once.fetch_sub(1, Ordering::SeqCst);
                let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let attempt = headers.get("herald-attempt").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
                let n = {
                    let mut log = log.lock();
                    let distribution_id = event["distribution_id"].as_i64().unwrap_or(0);
                    log.push(Received { at: Instant::now(), distribution_id, attempt });
                    log.len() - 1
                };
                let answer = answers.lock().clone();
                let (status, headers, body) = answer(n);
                let mut response = axum::response::Response::new(axum::body::Body::from(body));
                *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                for (name, value) in headers {
                    response.headers_mut().insert(name, value.parse().expect("header value"));
                }
                response
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let url = format!("http://{}/callback", listener.local_addr().expect("bound address"));
        let app = axum::Router::new().fallback(handler);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, received, script, most_at_once }
    }

    fn answer(&self, script: impl Fn(usize) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync + 'static) {
        *self.script.lock() = Arc::new(script);
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().clone()
    }
}

fn status(code: u16) -> (u16, Vec<(&'static str, String)>, String) {
    (code, Vec::new(), String::new())
}

/// A Delivery over the in-memory store with subscription `ID` Ready, pointed at
/// `receiver`, with a fast retry schedule.
struct Harness {
    delivery: Arc<Delivery>,
    store: Arc<MemoryStore>,
    index: Arc<SubscriptionIndex>,
    subscriber: Subscriber,
    cache: Writer<EventSubscription>,
    shutdown: CancellationToken,
}

impl Harness {
    /// `herald_namespace`: the subscription lives in "team", so "team" allows it every
    /// account and anything else leaves it to the (empty) Namespace cache.
    fn new(
        receiver: &Receiver,
        config: DeliveryConfig,
        limits: Limits,
        herald_namespace: &str,
        tune: impl FnOnce(&mut Effective),
    ) -> Self {
        let mut object = EventSubscription::new("hosts", EventSubscriptionSpec::default());
        object.metadata.namespace = Some("team".into());
        object.metadata.uid = Some("uid-7".into());
        let (subscriptions, mut cache) = reflector::store::<EventSubscription>();
        cache.apply_watcher_event(&watcher::Event::Apply(object));

        let mut effective = Effective::from_spec(&EventSubscriptionSpec {
            subscription_name: "hosts".into(),
            callback_url: receiver.url.clone(),
            events: vec!["hostcreate".into()],
            ..Default::default()
        });
        effective.retry = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            jitter_percent: 0,
        };
        effective.timeout = Duration::from_secs(2);
        tune(&mut effective);
        let subscriber = Subscriber {
            id: ID,
            uid: "uid-7".into(),
            namespace: "team".into(),
            name: "hosts".into(),
            generation: 1,
            ready: true,
            effective: Arc::new(effective),
            signing: None,
            imported: None,
        };
        let (index, _changes) = SubscriptionIndex::new();
        index.upsert(subscriber.clone());

        let store = Arc::new(MemoryStore::new(limits));
        let guard = GuardConfig { allow_cidrs: vec!["127.0.0.0/8".parse().expect("a CIDR")], ..Default::default() };
        // Never contacted: these tests use no signing Secret and run no status projector.
        let unused_api_server = kube::Config::new("http://127.0.0.1:9".parse().expect("a URI"));
        let shutdown = CancellationToken::new();
        let delivery = Delivery::new(DeliveryParts {
            store: store.clone(),
            index: index.clone(),
            outbound: Outbound::new(&guard).expect("the HTTP client"),
            client: kube::Client::try_from(unused_api_server).expect("a client"),
            subscriptions,
            tenancy: Tenancy::new(reflector::store::<Namespace>().0, herald_namespace.into(), true),
            config,
            dead_letter_retention: Duration::from_secs(3600),
            metrics: Arc::new(Metrics::new(false)),
            status_budget: Arc::new(crate::conditions::WriteBudget::new(20.0)),
            shards: None,
            shutdown: shutdown.clone(),
        });
        Harness { delivery, store, index, subscriber, cache, shutdown }
    }

    fn with_defaults(receiver: &Receiver, tune: impl FnOnce(&mut Effective)) -> Self {
        let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
        Self::new(receiver, DeliveryConfig::default(), limits, "team", tune)
    }

    async fn publish(&self, events: usize) -> super::Published {
        let batch = (0..events)
            .map(|n| {
                let event = StoredEvent {
                    txn_id: format!("txn-{n}"),
                    event_type: "instdata".into(),
                    action: "create".into(),
                    action_time: "2026-12-01 00:00:00".into(),
                    obj_type: "host".into(),
                    data: vec![EventData {
                        cur_data: serde_json::json!({"bk_host_id": n}),
                        pre_data: serde_json::Value::Null,
                    }],
                    bk_supplier_account: "0".into(),
                    request_id: format!("req-{n}"),
                    request_time: "2026-12-01 00:00:00".into(),
                };
                (event, "hostcreate".to_string())
            })
            .collect();
        self.delivery.publish(batch).await.expect("published")
    }

    async fn counters(&self) -> Counters {
        self.store.counters(ID).await.expect("counters")
    }

    /// Polls until `done` holds for the counters (at most 10 s).
    async fn wait_for(&self, what: &str, done: impl Fn(&Counters) -> bool) -> Counters {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counters = self.counters().await;
            if done(&counters) {
                return counters;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {counters:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn one_in_flight_delivers_in_publish_order_with_contiguous_distribution_ids() {
    let receiver = Receiver::start(|_| status(200)).await;
    let harness = Harness::with_defaults(&receiver, |_| {});
    let published = harness.publish(30).await;
    assert_eq!((published.accepted, published.queued, published.overflowed), (30, 30, 0));
    let counters = harness.wait_for("30 deliveries", |c| c.delivered == 30).await;
    assert_eq!((counters.total, counters.failure, counters.pending), (30, 0, 0));
    let ids: Vec<i64> = receiver.received().iter().map(|r| r.distribution_id).collect();
    assert_eq!(ids, (1..=30).collect::<Vec<_>>());
}

#[tokio::test]
async fn failed_attempts_are_retried_after_a_doubling_backoff_then_confirmed() {
    let receiver = Receiver::start(|n| status(if n < 3 { 500 } else { 200 })).await;
    let harness = Harness::with_defaults(&receiver, |_| {});
    harness.publish(1).await;
    let counters = harness.wait_for("the fourth attempt", |c| c.delivered == 1).await;
    assert_eq!((counters.total, counters.failure, counters.consecutive_failures), (4, 3, 0));
    assert_eq!(counters.last_error.as_deref(), Some("status 500, expected 200"));
    let got = receiver.received();
    assert_eq!(
        got.iter().map(|r| (r.distribution_id, r.attempt)).collect::<Vec<_>>(),
        [(1, 1), (1, 2), (1, 3), (1, 4)]
    );
    // 100 ms, 200 ms, 400 ms (no jitter): each wait at least its step of the schedule.
    for (pair, wait) in got.windows(2).zip([100, 200, 400]) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(wait), "waited {gap:?}, schedule says {wait} ms");
    }
}

#[tokio::test]
async fn a_429_waits_at_least_its_retry_after() {
    let receiver = Receiver::start(|n| match n {
        0 => (429, vec![("retry-after", "1".into())], String::new()),
        _ => status(200),
    })
    .await;
    let harness = Harness::with_defaults(&receiver, |_| {});
    harness.publish(1).await;
    let counters = harness.wait_for("the retried delivery", |c| c.delivered == 1).await;
    assert_eq!((counters.total, counters.failure), (2, 1));
    assert_eq!(counters.last_error.as_deref(), Some("429 Too Many Requests"));
    let got = receiver.received();
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_secs(1), "Retry-After 1 s honoured over a 100 ms backoff, waited {gap:?}");
}

#[tokio::test]
async fn a_410_stops_delivery_until_the_spec_changes() {
    let receiver = Receiver::start(|_| status(410)).await;
    let harness = Harness::with_defaults(&receiver, |_| {});
    harness.publish(3).await;
    let counters = harness.wait_for("the 410", |c| c.failure == 1).await;
    assert_eq!(counters.last_error.as_deref(), Some("410 Gone"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.received().len(), 1, "nothing more is sent after 410 Gone");
    assert_eq!(harness.counters().await.pending, 3, "the queue is kept");

    receiver.answer(|_| status(200));
    let mut changed = harness.subscriber.clone();
    changed.generation = 2;
    harness.index.upsert(changed);
    harness.delivery.wake(ID);
    let counters = harness.wait_for("delivery after the spec change", |c| c.delivered == 3).await;
    assert_eq!(counters.pending, 0);
    let ids: Vec<i64> = receiver.received().iter().map(|r| r.distribution_id).collect();
    assert_eq!(ids, [1, 1, 2, 3], "the refused event is the first one sent again");
}

#[tokio::test]
async fn the_last_allowed_attempt_dead_letters_and_a_replay_delivers_with_the_same_id() {
    let receiver = Receiver::start(|_| status(503)).await;
    let harness = Harness::with_defaults(&receiver, |e| e.retry.max_attempts = 2);
    harness.publish(2).await;
    let counters = harness.wait_for("two dead letters", |c| c.dead_lettered == 2).await;
    assert_eq!((counters.total, counters.failure, counters.pending), (4, 4, 0));
    let letters = harness.delivery.dead_letters(ID, 10).await.expect("dead letters");
    let summary: Vec<_> = letters.iter().map(|l| (l.distribution_id, l.attempts, l.reason.as_str())).collect();
    assert_eq!(summary, [(1, 2, "MaxAttempts"), (2, 2, "MaxAttempts")]);
    assert_eq!(letters[0].error, "status 503, expected 200");

    receiver.answer(|_| status(200));
    let replayed = harness.delivery.replay(ID, Some(vec![2])).await.expect("replay");
    assert_eq!(replayed, 1);
    harness.wait_for("the replayed delivery", |c| c.delivered == 1).await;
    let last = receiver.received().last().cloned().expect("a request");
    assert_eq!((last.distribution_id, last.attempt), (2, 1), "same distribution id, attempts counted afresh");
    let left: Vec<i64> =
        harness.delivery.dead_letters(ID, 10).await.expect("dead letters").iter().map(|l| l.distribution_id).collect();
    assert_eq!(left, [1], "only the chosen dead letter was replayed");
}

#[tokio::test]
async fn an_entry_older_than_the_age_limit_is_dead_lettered_as_expired() {
    let receiver = Receiver::start(|_| status(500)).await;
    let config = DeliveryConfig { max_age_seconds: 1, ..DeliveryConfig::default() };
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
    let harness = Harness::new(&receiver, config, limits, "team", |e| e.retry.max_attempts = 1000);
    harness.publish(1).await;
    let counters = harness.wait_for("expiry", |c| c.dead_lettered == 1).await;
    assert_eq!(counters.pending, 0);
    let letters = harness.delivery.dead_letters(ID, 10).await.expect("dead letters");
    assert_eq!(letters[0].reason, "Expired");
    assert_eq!(letters[0].error, "not delivered within 1 s");
    assert!(
        counters.failure >= 1 && counters.failure == counters.total,
        "every attempt before expiry failed and counted"
    );
}

#[tokio::test]
async fn beyond_the_backlog_cap_new_events_go_straight_to_dead_letters() {
    let receiver = Receiver::start(|_| status(200)).await;
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 2 };
    let harness = Harness::new(&receiver, DeliveryConfig::default(), limits, "team", |e| e.paused = true);
    let published = harness.publish(5).await;
    assert_eq!((published.queued, published.overflowed), (2, 3));
    let counters = harness.counters().await;
    assert_eq!((counters.pending, counters.dead_lettered), (2, 3));
    let letters = harness.delivery.dead_letters(ID, 10).await.expect("dead letters");
    let summary: Vec<_> = letters.iter().map(|l| (l.distribution_id, l.reason.as_str())).collect();
    assert_eq!(summary, [(3, "BacklogFull"), (4, "BacklogFull"), (5, "BacklogFull")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.received().is_empty(), "a paused subscription is sent nothing");
}

#[tokio::test]
async fn regular_mode_confirms_on_the_body_whatever_the_status() {
    let receiver = Receiver::start(|n| match n {
        0 => (200, Vec::new(), r#"{"result": false}"#.into()),
        _ => (500, Vec::new(), r#"{"result": true}"#.into()),
    })
    .await;
    let harness = Harness::with_defaults(&receiver, |e| {
        e.confirm_mode = ConfirmMode::Regular;
        e.confirm_pattern = r#""result":\s*true"#.into();
    });
    harness.publish(1).await;
    let counters = harness.wait_for("the confirmed delivery", |c| c.delivered == 1).await;
    assert_eq!((counters.total, counters.failure), (2, 1));
}

#[tokio::test]
async fn an_outcome_whose_write_failed_is_delivered_again_not_stranded() {
    let receiver = Receiver::start(|_| status(200)).await;
    let harness = Harness::with_defaults(&receiver, |_| {});
    harness.store.fail_next_records(1);
    harness.publish(1).await;
    let counters = harness.wait_for("the delivery recorded", |c| c.delivered == 1).await;
    assert_eq!(counters.pending, 0);
    let ids: Vec<i64> = receiver.received().iter().map(|r| r.distribution_id).collect();
    assert_eq!(ids, [1, 1], "sent again because its first outcome was lost (at-least-once)");
}

#[tokio::test]
async fn a_namespace_that_does_not_allow_the_account_is_sent_nothing() {
    let receiver = Receiver::start(|_| status(200)).await;
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
    // Ready in the index (as the controller last saw it), but "team" is not herald's
    // namespace and lists no account.
    let harness = Harness::new(&receiver, DeliveryConfig::default(), limits, "herald-system", |_| {});
    harness.publish(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.received().is_empty(), "queued events wait while the namespace is not allowed");
    assert_eq!(harness.counters().await.pending, 2);
}

#[tokio::test]
async fn a_re_created_object_with_the_same_name_is_not_the_subscription_delivery_knows() {
    let receiver = Receiver::start(|_| status(200)).await;
    let mut harness = Harness::with_defaults(&receiver, |_| {});
    assert!(harness.delivery.live_object(&harness.subscriber).is_some());
    let mut successor = EventSubscription::new("hosts", EventSubscriptionSpec::default());
    successor.metadata.namespace = Some("team".into());
    successor.metadata.uid = Some("uid-of-a-new-object".into());
    harness.cache.apply_watcher_event(&watcher::Event::Apply(successor));
    assert!(harness.delivery.live_object(&harness.subscriber).is_none(), "statistics must not reach the new object");
}

/// A second subscription (id 8) beside `ID`, same account and event, pointed at the same
/// receiver: publish queues every event for both.
fn add_second_subscription(harness: &mut Harness) -> i64 {
    let mut object = EventSubscription::new("hosts-2", EventSubscriptionSpec::default());
    object.metadata.namespace = Some("team".into());
    object.metadata.uid = Some("uid-8".into());
    harness.cache.apply_watcher_event(&watcher::Event::Apply(object));
    let mut second = harness.subscriber.clone();
    (second.id, second.uid, second.name) = (8, "uid-8".into(), "hosts-2".into());
    harness.index.upsert(second);
    8
}

#[tokio::test]
async fn attempts_in_flight_across_subscriptions_never_exceed_the_global_budget() {
    let receiver = Receiver::holding(Duration::from_millis(300), |_| status(200)).await;
    // Two subscriptions of `maxInFlight` 2 could have 4 attempts out; the budget is 3.
    let config = DeliveryConfig { max_attempts_in_flight: 3, ..DeliveryConfig::default() };
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
    let mut harness = Harness::new(&receiver, config, limits, "team", |e| e.max_in_flight = 2);
    let second = add_second_subscription(&mut harness);
    let published = harness.publish(6).await;
    assert_eq!(published.queued, 12);
    harness.wait_for("the first subscription's deliveries", |c| c.delivered == 6).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while harness.store.counters(second).await.expect("counters").delivered < 6 {
        assert!(Instant::now() < deadline, "the second subscription's deliveries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.most_at_once.load(Ordering::SeqCst), 3, "at most the budget at once, and all of it used");
    assert_eq!(harness.delivery.budgets.attempts_in_flight(), 0, "every slot given back");
}

#[tokio::test]
async fn an_attempt_waiting_for_a_slot_ends_at_shutdown_without_sending() {
    let receiver = Receiver::start(|_| status(200)).await;
    let config = DeliveryConfig { max_attempts_in_flight: 1, ..DeliveryConfig::default() };
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
    let harness = Harness::new(&receiver, config, limits, "team", |_| {});
    let taken = harness.delivery.budgets.attempt_slot(&CancellationToken::new()).await.expect("the only slot");
    harness.publish(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.received().is_empty(), "no slot, no attempt");

    harness.shutdown.cancel();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let ended = harness.delivery.workers.lock().get(&ID).is_none_or(|(_, task)| task.is_finished());
        if ended {
            break;
        }
        assert!(Instant::now() < deadline, "the waiting worker did not end at shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(taken);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(receiver.received().is_empty(), "nothing sent after shutdown");
    assert_eq!(harness.counters().await.pending, 1, "the entry stays queued");
}

#[tokio::test]
async fn an_answer_larger_than_the_byte_budget_is_cut_fails_regular_and_is_retried() {
    // Would confirm if read whole (it is under the 1 MiB body cap), but the budget is 4 KiB.
    let long = format!("{}{{\"result\": true}}", " ".repeat(64 << 10));
    let receiver = Receiver::start(move |n| match n {
        0 => (200, Vec::new(), long.clone()),
        _ => (200, Vec::new(), r#"{"result": true}"#.into()),
    })
    .await;
    let config = DeliveryConfig { answer_buffer_bytes: 4 << 10, ..DeliveryConfig::default() };
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
    let harness = Harness::new(&receiver, config, limits, "team", |e| {
        e.confirm_mode = ConfirmMode::Regular;
        e.confirm_pattern = r#""result":\s*true"#.into();
    });
    harness.publish(1).await;
    let counters = harness.wait_for("the retried delivery", |c| c.delivered == 1).await;
    assert_eq!((counters.total, counters.failure), (2, 1));
    assert_eq!(
        counters.last_error.as_deref(),
        Some("status 200: answer not read: herald's answer buffer budget is exhausted")
    );
    assert_eq!(harness.delivery.metrics.answers_cut.get(), 1);
    assert_eq!(harness.delivery.budgets.answers().held(), 0, "the cut answer's bytes were given back");
}

#[tokio::test]
async fn in_httpstatus_mode_a_cut_answer_is_still_judged_by_its_status() {
    let receiver = Receiver::start(|_| (200, Vec::new(), "x".repeat(64 << 10))).await;
    let config = DeliveryConfig { answer_buffer_bytes: 1 << 10, ..DeliveryConfig::default() };
    let limits = Limits { quota_bytes: u64::MAX, backlog_cap: 1000 };
    let harness = Harness::new(&receiver, config, limits, "team", |_| {});
    harness.publish(1).await;
    let counters = harness.wait_for("the delivery", |c| c.delivered == 1).await;
    assert_eq!((counters.total, counters.failure), (1, 0));
    assert_eq!(harness.delivery.metrics.answers_cut.get(), 1);
    assert_eq!(harness.delivery.budgets.answers().held(), 0);
}

#[tokio::test]
async fn a_regular_pattern_is_compiled_once_per_generation_not_per_attempt() {
    let receiver = Receiver::start(|n| match n {
        0 | 1 => (200, Vec::new(), r#"{"result": false}"#.into()),
        _ => (200, Vec::new(), r#"{"result": true}"#.into()),
    })
    .await;
    let harness = Harness::with_defaults(&receiver, |e| {
        e.confirm_mode = ConfirmMode::Regular;
        e.confirm_pattern = r#""result":\s*true"#.into();
    });
    harness.publish(2).await;
    let counters = harness.wait_for("both deliveries", |c| c.delivered == 2).await;
    assert_eq!(counters.total, 4, "two failed attempts, then two confirmed");
    assert_eq!(harness.index.confirm_compilations(), 1, "four attempts of two entries, one compile");

    let mut changed = harness.subscriber.clone();
    changed.generation = 2;
    let mut effective = (*changed.effective).clone();
    effective.confirm_pattern = r#""result":\s*(true|1)"#.into();
    changed.effective = Arc::new(effective);
    harness.index.upsert(changed);
    harness.publish(1).await;
    harness.wait_for("the delivery under the new spec", |c| c.delivered == 3).await;
    assert_eq!(harness.index.confirm_compilations(), 2, "the new generation compiled its own");
}
