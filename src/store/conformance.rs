//! The store conformance suite: what delivery and the event sources need of any
//! `EventStore`, in engine-neutral terms. Every engine runs all of it
//! (`conformance_suite!` in its test module); what only one engine can show (SQLite's
//! fsync settings, its disk-full handling, reopening a directory) stays with that engine.

use super::{Attempt, EventStore, Exchange, Fanout, Limits, NewEvent, Outcome, StoreError, WatchPage, WatchPosition};
use std::collections::HashMap;
use std::sync::Arc;

/// Opens a fresh, empty store of the engine under test with these limits.
pub type Opener<'a> = &'a dyn Fn(Limits) -> Arc<dyn EventStore>;

pub fn limits() -> Limits {
    Limits { quota_bytes: u64::MAX, backlog_cap: 1000 }
}

fn event(body: &str, subscriptions: &[i64]) -> NewEvent {
    NewEvent { body: body.into(), subscriptions: subscriptions.to_vec() }
}

async fn attempt(store: &dyn EventStore, subscription_id: i64, position: i64, outcome: Outcome) {
    let attempt = Attempt { subscription_id, position, outcome, at: 1, exchange: Exchange::default() };
    let ticket = store.record_attempt(attempt).unwrap();
    store.committed(ticket).await.unwrap();
    // What the status projector relies on to keep a change's mark until it lands.
    assert!(store.settled() >= ticket, "ticket {ticket} committed but settled is {}", store.settled());
}

/// Distribution ids count from 1 per subscription, queues keep publish order, events
/// nobody matched are not queued.
pub async fn fan_out_keeps_order_per_subscription(open: Opener<'_>) {
    let store = open(limits());
    let out = store.publish(vec![event("a", &[1, 2]), event("b", &[2]), event("none", &[])]).await.unwrap();
    assert_eq!(
        out[0],
        vec![
            Fanout { subscription_id: 1, distribution_id: 1, queued: true },
            Fanout { subscription_id: 2, distribution_id: 1, queued: true }
        ]
    );
    assert_eq!(out[1], vec![Fanout { subscription_id: 2, distribution_id: 2, queued: true }]);
    assert!(out[2].is_empty());
    let queued = store.queued(2, 0, 10).await.unwrap();
    let seen: Vec<(i64, &str)> = queued.iter().map(|q| (q.distribution_id, q.body.as_str())).collect();
    assert_eq!(seen, [(1, "a"), (2, "b")]);
    assert_eq!(store.queued(2, queued[0].position, 10).await.unwrap().len(), 1, "reads resume after a position");
    assert_eq!(store.counters(2).await.unwrap().pending, 2);
    assert_eq!(store.pending_total().await.unwrap(), 3);
}

/// Outcomes move the counters with the queue; a dead letter replays to the tail with its
/// distribution id and fresh attempts; a committed ticket means the outcome is visible.
pub async fn outcomes_move_counters_and_dead_letters_replay(open: Opener<'_>) {
    let store = open(limits());
    store.publish(vec![event("a", &[7]), event("b", &[7])]).await.unwrap();
    // Positions are the engine's own; only their order is common.
    let positions: Vec<i64> = store.queued(7, 0, 10).await.unwrap().iter().map(|q| q.position).collect();
    assert!(positions[0] < positions[1]);
    attempt(&*store, 7, positions[0], Outcome::Failed { error: "500".into() }).await;
    assert_eq!(store.queued(7, 0, 1).await.unwrap()[0].attempts, 1, "a failed attempt is counted on its entry");
    let dead = Outcome::DeadLettered { error: "500".into(), reason: "MaxAttempts".into(), attempted: true };
    attempt(&*store, 7, positions[0], dead).await;
    attempt(&*store, 7, positions[1], Outcome::Delivered).await;
    let counters = store.counters(7).await.unwrap();
    assert_eq!(
        (counters.total, counters.failure, counters.delivered, counters.dead_lettered, counters.pending),
        (3, 2, 1, 1, 0)
    );
    let letters = store.dead_letters(7, 10).await.unwrap();
    assert_eq!((letters[0].distribution_id, letters[0].attempts, letters[0].body.as_str()), (1, 2, "a"));
    assert_eq!(store.delivery_log(7, 10).await.unwrap().len(), 3, "every attempt is logged");

    assert_eq!(store.replay(7, None).await.unwrap(), 1);
    let queued = store.queued(7, 0, 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert!(queued[0].position > positions[1], "a replayed letter goes to the queue's tail");
    assert_eq!((queued[0].distribution_id, queued[0].attempts, queued[0].body.as_str()), (1, 0, "a"));
    assert!(store.dead_letters(7, 10).await.unwrap().is_empty());
    assert!(!store.outcomes_lost(7), "nothing was lost");
}

/// Outcomes may be recorded without waiting: a ticket resolves once the outcome is
/// durable, and then its counters, log and queue show it, with every earlier ticket's.
pub async fn a_committed_ticket_shows_its_outcome_and_every_earlier_one(open: Opener<'_>) {
    let store = open(limits());
    let events: Vec<NewEvent> = (0..20).map(|n| event(&n.to_string(), &[3])).collect();
    store.publish(events).await.unwrap();
    let positions: Vec<i64> = store.queued(3, 0, 100).await.unwrap().iter().map(|q| q.position).collect();
    assert_eq!(positions.len(), 20);
    let mut tickets = Vec::new();
    for position in positions {
        let outcome =
            Attempt { subscription_id: 3, position, outcome: Outcome::Delivered, at: 1, exchange: Exchange::default() };
        tickets.push(store.record_attempt(outcome).unwrap());
    }
    assert!(tickets.windows(2).all(|w| w[0] < w[1]), "tickets grow: {tickets:?}");
    store.committed(*tickets.last().unwrap()).await.unwrap();
    let counters = store.counters(3).await.unwrap();
    assert_eq!((counters.delivered, counters.pending), (20, 0));
    assert!(store.queued(3, 0, 100).await.unwrap().is_empty());
    assert_eq!(store.delivery_log(3, 100).await.unwrap().len(), 20);
}

/// Beyond the backlog cap new events go straight to the dead letters, still numbered.
pub async fn a_full_backlog_dead_letters_new_events(open: Opener<'_>) {
    let store = open(Limits { quota_bytes: u64::MAX, backlog_cap: 1 });
    let out = store.publish(vec![event("a", &[1]), event("b", &[1])]).await.unwrap();
    assert!(out[0][0].queued);
    assert_eq!((out[1][0].queued, out[1][0].distribution_id), (false, 2));
    assert_eq!(store.dead_letters(1, 10).await.unwrap()[0].reason, "BacklogFull");
}

/// Over the quota a publish is refused whole, and so is a watch page that would add to
/// the store; one that only moves its cursor is taken.
pub async fn over_the_quota_growth_is_refused_whole(open: Opener<'_>) {
    let store = open(Limits { quota_bytes: 0, backlog_cap: 10 });
    // An engine may count its own structures: the first write may already be over.
    let _ = store.publish(vec![event("a", &[1])]).await;
    let before = store.queued(1, 0, 10).await.unwrap().len();
    assert!(matches!(store.publish(vec![event("b", &[1]), event("c", &[1])]).await, Err(StoreError::OverQuota { .. })));
    let grows =
        WatchPage { watch: "w".into(), events: vec![event("d", &[1])], cursor: "c".into(), ..Default::default() };
    assert!(matches!(store.ingest(grows).await, Err(StoreError::OverQuota { .. })));
    let keeps = WatchPage {
        watch: "w".into(),
        cursor: "c".into(),
        pre_images: vec![("1".into(), Some("one".into()))],
        pre_image_limit: 10,
        ..Default::default()
    };
    assert!(matches!(store.ingest(keeps).await, Err(StoreError::OverQuota { .. })));
    assert_eq!(store.watch_position("w").await.unwrap(), None, "a refused page moves no cursor");
    assert!(store.pre_images("w", vec!["1".into()]).await.unwrap().is_empty());
    assert_eq!(store.queued(1, 0, 10).await.unwrap().len(), before, "nothing of a refused write is kept");
    let moves = WatchPage { watch: "w".into(), cursor: "c2".into(), read: 1, ..Default::default() };
    store.ingest(moves).await.unwrap();
    assert_eq!(store.watch_position("w").await.unwrap().map(|p| p.cursor), Some("c2".into()));
}

/// Dropping a subscription forgets its queue, dead letters and counters, not what other
/// subscriptions share with it.
pub async fn dropping_a_subscription_keeps_the_others(open: Opener<'_>) {
    let store = open(limits());
    store.publish(vec![event("shared", &[1, 2]), event("own", &[1])]).await.unwrap();
    store.drop_subscription(1).await.unwrap();
    assert_eq!(store.subscriptions().await.unwrap(), vec![2]);
    assert!(store.queued(1, 0, 10).await.unwrap().is_empty());
    assert_eq!(store.queued(2, 0, 10).await.unwrap()[0].body, "shared");
}

/// A watch page commits its events, cursor, count and pre-images together; pre-images stay
/// within their limit (least recently changed forgotten first) and can be forgotten.
pub async fn watch_pages_commit_together_with_bounded_pre_images(open: Opener<'_>) {
    let store = open(limits());
    let image = |i: &str, d: Option<&str>| (i.to_string(), d.map(str::to_string));
    assert_eq!(store.watch_position("w").await.unwrap(), None);
    let page = WatchPage {
        watch: "w".into(),
        events: vec![event("a", &[1]), event("b", &[])],
        cursor: "c1".into(),
        read: 3,
        pre_images: vec![image("1", Some("one")), image("2", Some("two")), image("3", Some("three"))],
        pre_image_limit: 2,
        forget_pre_images: false,
    };
    let fanouts = store.ingest(page).await.unwrap();
    assert_eq!(fanouts[0], vec![Fanout { subscription_id: 1, distribution_id: 1, queued: true }]);
    let position = store.watch_position("w").await.unwrap().unwrap();
    assert_eq!(position, WatchPosition { cursor: "c1".into(), events_read: 3, pre_images: 2 });
    let kept = store.pre_images("w", vec!["1".into(), "2".into(), "3".into()]).await.unwrap();
    assert_eq!(kept, HashMap::from([("2".into(), "two".into()), ("3".into(), "three".into())]));
    // Changing 2 makes 3 the least recently changed: it is forgotten first, although 2 was
    // kept before it.
    let page = WatchPage {
        watch: "w".into(),
        cursor: "c2".into(),
        read: 2,
        pre_images: vec![image("4", Some("four")), image("2", Some("two'"))],
        pre_image_limit: 2,
        ..Default::default()
    };
    store.ingest(page).await.unwrap();
    let kept = store.pre_images("w", vec!["2".into(), "3".into(), "4".into()]).await.unwrap();
    assert_eq!(kept, HashMap::from([("2".into(), "two'".into()), ("4".into(), "four".into())]));
    let position = store.watch_position("w").await.unwrap().unwrap();
    assert_eq!(position, WatchPosition { cursor: "c2".into(), events_read: 5, pre_images: 2 });
    // Deleting frees a place.
    let page = WatchPage {
        watch: "w".into(),
        cursor: "c2b".into(),
        pre_images: vec![image("2", None), image("5", Some("five"))],
        pre_image_limit: 2,
        ..Default::default()
    };
    store.ingest(page).await.unwrap();
    let kept = store.pre_images("w", vec!["2".into(), "4".into(), "5".into()]).await.unwrap();
    assert_eq!(kept, HashMap::from([("4".into(), "four".into()), ("5".into(), "five".into())]));
    assert_eq!(store.watches().await.unwrap(), vec!["w".to_string()]);
    // Forgetting empties the kept instances before the page's own.
    let page = WatchPage {
        watch: "w".into(),
        cursor: "c3".into(),
        pre_images: vec![image("6", Some("six"))],
        pre_image_limit: 2,
        forget_pre_images: true,
        ..Default::default()
    };
    store.ingest(page).await.unwrap();
    let kept = store.pre_images("w", vec!["4".into(), "5".into(), "6".into()]).await.unwrap();
    assert_eq!(kept, HashMap::from([("6".into(), "six".into())]));
    assert_eq!(store.watch_position("w").await.unwrap().unwrap().pre_images, 1);
    // A page that only forgets (pre-images switched off) leaves none.
    let page = WatchPage { watch: "w".into(), cursor: "c4".into(), forget_pre_images: true, ..Default::default() };
    store.ingest(page).await.unwrap();
    assert!(store.pre_images("w", vec!["6".into()]).await.unwrap().is_empty());
    assert_eq!(store.watch_position("w").await.unwrap().unwrap().pre_images, 0);
    store.drop_watch("w").await.unwrap();
    assert_eq!(store.watch_position("w").await.unwrap(), None);
    assert_eq!(store.queued(1, 0, 10).await.unwrap().len(), 1, "the page's event stays queued");
}

/// One `#[tokio::test]` per conformance case for the engine `open` builds, each with the
/// extra attributes given (the JetStream engine's need NATS: `ignore` without the `nats`
/// feature).
macro_rules! conformance_suite {
    ($open:expr $(, #[$extra:meta])*) => {
        mod conformance {
            use super::*;
            use crate::store::conformance as suite;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn fan_out_keeps_order_per_subscription() {
                suite::fan_out_keeps_order_per_subscription(&$open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn outcomes_move_counters_and_dead_letters_replay() {
                suite::outcomes_move_counters_and_dead_letters_replay(&$open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn a_committed_ticket_shows_its_outcome_and_every_earlier_one() {
                suite::a_committed_ticket_shows_its_outcome_and_every_earlier_one(&$open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn a_full_backlog_dead_letters_new_events() {
                suite::a_full_backlog_dead_letters_new_events(&$open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn over_the_quota_growth_is_refused_whole() {
                suite::over_the_quota_growth_is_refused_whole(&$open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn dropping_a_subscription_keeps_the_others() {
                suite::dropping_a_subscription_keeps_the_others(&$open).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$extra])*
            async fn watch_pages_commit_together_with_bounded_pre_images() {
                suite::watch_pages_commit_together_with_bounded_pre_images(&$open).await;
            }
        }
    };
}
pub(crate) use conformance_suite;
