//! Logging. `RUST_LOG` filters (default `info`); `HERALD_LOG_FORMAT=json` switches to
//! JSON lines for log collectors.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f == "json");
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt::layer().json()).init();
    } else {
        registry.with(fmt::layer()).init();
    }
}

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label of delivery metrics: the outcome, and the subscription only when per-subscription
/// series are enabled (`metrics.perSubscription`), so 10,000 subscriptions do not make
/// 10,000 series by default.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub result: &'static str,
    pub subscription: String,
}

/// Labels of the event-source metrics: the CmdbSource (`namespace/name`) and the resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
    pub resource: &'static str,
}

/// Labels of watch errors: the source, the resource and the cause.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceErrorLabels {
    pub source: String,
    pub resource: &'static str,
    pub cause: &'static str,
}

/// Labels of `herald_auth_reviews_total`: TokenReview or SubjectAccessReview, and how it
/// ended (`busy`: not made, too many in flight).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

/// Every metric herald exports on `/metrics`.
pub struct Metrics {
    pub auth_reviews: Family<ReviewLabels, Counter>,
    /// Bearer tokens refused before any TokenReview.
    pub auth_rejected_tokens: Counter,
    registry: Registry,
    per_subscription: bool,
    pub attempts: Family<DeliveryLabels, Counter>,
    pub attempt_seconds: Histogram,
    pub events_published: Counter,
    pub deliveries_queued: Counter,
    pub queue_depth: Gauge,
    pub store_bytes: Gauge<u64, AtomicU64>,
    pub status_writes: Counter,
    /// Callback attempts holding a slot of `delivery.maxAttemptsInFlight` (set at scrape).
    pub attempts_in_flight: Gauge,
    /// Bytes of callback answers held of `delivery.answerBufferBytes` (set at scrape).
    pub answer_bytes_held: Gauge,
    /// Callback answers cut because `delivery.answerBufferBytes` was exhausted.
    pub answers_cut: Counter,
    pub source_events_read: Family<SourceLabels, Counter>,
    pub source_watch_errors: Family<SourceErrorLabels, Counter>,
    /// Watch events committed without being pushed, by cause (`undecodable`, `too_large`).
    pub source_events_skipped: Family<SourceErrorLabels, Counter>,
    pub source_lag_seconds: Family<SourceLabels, Gauge>,
    pub source_cursor_expiries: Family<SourceLabels, Counter>,
}

impl Metrics {
    pub fn new(per_subscription: bool) -> Self {
        let mut registry = Registry::with_prefix("herald");
        let attempts = Family::<DeliveryLabels, Counter>::default();
        let attempt_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let events_published = Counter::default();
        let deliveries_queued = Counter::default();
        let queue_depth = Gauge::default();
        let store_bytes = Gauge::<u64, AtomicU64>::default();
        let status_writes = Counter::default();
        registry.register("delivery_attempts", "Callback delivery attempts by result", attempts.clone());
        registry.register("delivery_attempt_seconds", "Duration of a callback attempt", attempt_seconds.clone());
        registry.register("events_published", "Events accepted by publish", events_published.clone());
        registry.register(
            "deliveries_queued",
            "Deliveries queued by publish (events times matching subscriptions)",
            deliveries_queued.clone(),
        );
        registry.register("queue_depth", "Deliveries pending across all subscriptions", queue_depth.clone());
        registry.register("store_bytes", "Size of the embedded store on disk", store_bytes.clone());
        registry.register("status_writes", "Status writes to the Kubernetes API by delivery", status_writes.clone());
        let (attempts_in_flight, answer_bytes_held, answers_cut) =
            (Gauge::default(), Gauge::default(), Counter::default());
        registry.register(
            "delivery_attempts_in_flight",
            "Callback attempts in flight across all subscriptions",
            attempts_in_flight.clone(),
        );
        registry.register(
            "delivery_answer_bytes_held",
            "Bytes of callback answers held at once across all attempts",
            answer_bytes_held.clone(),
        );
        registry.register(
            "delivery_answers_cut",
            "Callback answers cut because the answer buffer budget was exhausted",
            answers_cut.clone(),
        );
        let source_events_read = Family::<SourceLabels, Counter>::default();
        let source_watch_errors = Family::<SourceErrorLabels, Counter>::default();
        let source_events_skipped = Family::<SourceErrorLabels, Counter>::default();
        let source_lag_seconds = Family::<SourceLabels, Gauge>::default();
        let source_cursor_expiries = Family::<SourceLabels, Counter>::default();
        registry.register("source_events_read", "Watch events read from bk-cmdb", source_events_read.clone());
        registry.register("source_watch_errors", "Failed bk-cmdb watch requests by cause", source_watch_errors.clone());
        registry.register(
            "source_events_skipped",
            "Watch events skipped because they can never be pushed, by cause",
            source_events_skipped.clone(),
        );
        registry.register(
            "source_lag_seconds",
            "Seconds a watch has been behind the end of bk-cmdb's stream",
            source_lag_seconds.clone(),
        );
        registry.register(
            "source_cursor_expiries",
            "Times bk-cmdb no longer held a watch's cursor (changes may be missing)",
            source_cursor_expiries.clone(),
        );
        let auth_reviews = Family::<ReviewLabels, Counter>::default();
        let auth_rejected_tokens = Counter::default();
        registry.register(
            "auth_reviews",
            "TokenReviews and SubjectAccessReviews by kind and outcome (busy: not made, too many in flight)",
            auth_reviews.clone(),
        );
        registry.register(
            "auth_rejected_tokens",
            "Bearer tokens refused before any TokenReview: empty, oversized or malformed",
            auth_rejected_tokens.clone(),
        );
        Metrics {
            auth_reviews,
            auth_rejected_tokens,
            registry,
            per_subscription,
            attempts,
            attempt_seconds,
            events_published,
            deliveries_queued,
            queue_depth,
            store_bytes,
            status_writes,
            attempts_in_flight,
            answer_bytes_held,
            answers_cut,
            source_events_read,
            source_watch_errors,
            source_events_skipped,
            source_lag_seconds,
            source_cursor_expiries,
        }
    }

    pub fn attempt(&self, result: &'static str, subscription_id: i64, seconds: f64) {
        let subscription = if self.per_subscription { subscription_id.to_string() } else { String::new() };
        self.attempts.get_or_create(&DeliveryLabels { result, subscription }).inc();
        self.attempt_seconds.observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
