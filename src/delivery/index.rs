//! What delivery knows about subscriptions, fed by the controller's verdicts: the
//! effective spec of each, whether it is Ready, and the (account, event name) index
//! that publish matches against; and each subscription's `regular` confirm pattern,
//! compiled once per generation.

use crate::crd::{ConfirmMode, SecretKeyRef};
use crate::effective::{Effective, compile_confirm_regex};
use parking_lot::RwLock;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;

/// One subscription as delivery sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscriber {
    pub id: i64,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub ready: bool,
    pub effective: Arc<Effective>,
    pub signing: Option<SecretKeyRef>,
    /// Counts from the system an imported subscription came from: its statistics start
    /// there.
    pub imported: Option<ImportedCounts>,
}

/// `total` and `failure` a subscription had before herald (`herald import`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ImportedCounts {
    #[serde(default)]
    pub total: i64,
    #[serde(default)]
    pub failure: i64,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<i64, Subscriber>,
    by_event: HashMap<(String, String), BTreeSet<i64>>,
}

/// A `regular` confirm pattern as one generation of a subscription has it.
struct CompiledConfirm {
    generation: i64,
    pattern: String,
    /// Compiled by the first attempt that needs it. None: it does not compile (validation
    /// keeps such a subscription from being Ready, so only a race would see that).
    regex: OnceLock<Option<Arc<regex::Regex>>>,
}

impl CompiledConfirm {
    fn is_for(&self, sub: &Subscriber) -> bool {
        self.generation == sub.generation && self.pattern == sub.effective.confirm_pattern
    }
}

pub struct SubscriptionIndex {
    entries: RwLock<Entries>,
    /// Ids whose entry changed, for the dispatcher.
    changes: mpsc::UnboundedSender<i64>,
    /// Compiled confirm patterns by subscription id, apart from `entries` so compiling never
    /// holds up publish's matching.
    confirms: RwLock<HashMap<i64, Arc<CompiledConfirm>>>,
    /// Patterns compiled so far (tests show attempts share them).
    compilations: AtomicU64,
}

impl SubscriptionIndex {
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<i64>) {
        let (changes, receiver) = mpsc::unbounded_channel();
        let index = SubscriptionIndex {
            entries: RwLock::default(),
            changes,
            confirms: RwLock::default(),
            compilations: AtomicU64::new(0),
        };
        (Arc::new(index), receiver)
    }

    /// Records the controller's latest view of a subscription.
    pub fn upsert(&self, subscriber: Subscriber) {
        let id = subscriber.id;
        {
            let mut entries = self.entries.write();
            if entries.by_id.get(&id) == Some(&subscriber) {
                return;
            }
            remove_keys(&mut entries, id);
            if subscriber.ready {
                for event in &subscriber.effective.events {
                    let key = (subscriber.effective.supplier_account.clone(), event.clone());
                    entries.by_event.entry(key).or_default().insert(id);
                }
            }
            entries.by_id.insert(id, subscriber.clone());
        }
        // A pattern the new spec no longer has is not kept around until the next attempt.
        let mut confirms = self.confirms.write();
        if confirms.get(&id).is_some_and(|c| !c.is_for(&subscriber)) {
            confirms.remove(&id);
        }
        drop(confirms);
        self.announce(id);
    }

    pub fn remove(&self, id: i64) {
        {
            let mut entries = self.entries.write();
            remove_keys(&mut entries, id);
            entries.by_id.remove(&id);
        }
        self.confirms.write().remove(&id);
        self.announce(id);
    }

    /// Tells the dispatcher. Once delivery has stopped nobody listens, and that is fine.
    fn announce(&self, id: i64) {
        if self.changes.send(id).is_err() {
            tracing::trace!(subscription = id, "no dispatcher to tell of the change");
        }
    }

    pub fn get(&self, id: i64) -> Option<Subscriber> {
        self.entries.read().by_id.get(&id).cloned()
    }

    pub fn ids(&self) -> Vec<i64> {
        self.entries.read().by_id.keys().copied().collect()
    }

    /// The compiled `regular` confirm pattern of `sub` (None in `httpstatus` mode, or when it
    /// does not compile). Compiled once per generation and shared by its attempts: a regex
    /// compiled per attempt cost CPU and up to 1 MiB each time.
    pub fn confirm_regex(&self, sub: &Subscriber) -> Option<Arc<regex::Regex>> {
        if sub.effective.confirm_mode != ConfirmMode::Regular {
            return None;
        }
        let known = self.confirms.read().get(&sub.id).filter(|c| c.is_for(sub)).cloned();
        let compiled = known.unwrap_or_else(|| {
            let mut confirms = self.confirms.write();
            match confirms.get(&sub.id) {
                // Another attempt got here first.
                Some(current) if current.is_for(sub) => current.clone(),
                _ => {
                    let fresh = Arc::new(CompiledConfirm {
                        generation: sub.generation,
                        pattern: sub.effective.confirm_pattern.clone(),
                        regex: OnceLock::new(),
                    });
                    confirms.insert(sub.id, fresh.clone());
                    fresh
                }
            }
        });
        // Compiled outside the map's lock; concurrent attempts of this generation wait for
        // the one compiling instead of compiling again.
        compiled
            .regex
            .get_or_init(|| {
                self.compilations.fetch_add(1, Ordering::Relaxed);
                compile_confirm_regex(&compiled.pattern).ok().map(Arc::new)
            })
            .clone()
    }

    /// How many confirm patterns have been compiled.
    pub fn confirm_compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
    }

    /// Ready subscriptions of `account` that list `event`, in id order.
    pub fn matching(&self, account: &str, event: &str) -> Vec<i64> {
        let entries = self.entries.read();
        entries
            .by_event
            .get(&(account.to_string(), event.to_string()))
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }
}

fn remove_keys(entries: &mut Entries, id: i64) {
    let Some(old) = entries.by_id.get(&id).cloned() else { return };
    for event in &old.effective.events {
        let key = (old.effective.supplier_account.clone(), event.clone());
        if let Some(ids) = entries.by_event.get_mut(&key) {
            ids.remove(&id);
            if ids.is_empty() {
                entries.by_event.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::EventSubscriptionSpec;

    fn subscriber(id: i64, account: &str, events: &[&str], ready: bool) -> Subscriber {
        let spec = EventSubscriptionSpec {
            supplier_account: Some(account.into()),
            subscription_name: format!("s{id}"),
            callback_url: "http://127.0.0.1/".into(),
            events: events.iter().map(std::string::ToString::to_string).collect(),
            ..Default::default()
        };
        Subscriber {
            id,
            uid: format!("u{id}"),
            namespace: "ns".into(),
            name: format!("s{id}"),
            generation: 1,
            ready,
            effective: Arc::new(Effective::from_spec(&spec)),
            signing: None,
            imported: None,
        }
    }

    #[test]
    fn matching_is_by_account_event_and_readiness() {
        let (index, _changes) = SubscriptionIndex::new();
        index.upsert(subscriber(1, "0", &["hostcreate", "hostupdate"], true));
        index.upsert(subscriber(2, "0", &["hostcreate"], false));
        index.upsert(subscriber(3, "9", &["hostcreate"], true));
        assert_eq!(index.matching("0", "hostcreate"), vec![1]);
        assert_eq!(index.matching("9", "hostcreate"), vec![3]);
        assert!(index.matching("0", "setcreate").is_empty());

        index.upsert(subscriber(1, "0", &["setcreate"], true));
        assert!(index.matching("0", "hostcreate").is_empty());
        assert_eq!(index.matching("0", "setcreate"), vec![1]);
        index.remove(1);
        assert!(index.matching("0", "setcreate").is_empty());
        assert!(index.get(1).is_none());
    }

    fn regular(mut sub: Subscriber, generation: i64, pattern: &str) -> Subscriber {
        let mut effective = (*sub.effective).clone();
        effective.confirm_mode = ConfirmMode::Regular;
        effective.confirm_pattern = pattern.into();
        sub.effective = Arc::new(effective);
        sub.generation = generation;
        sub
    }

    #[test]
    fn a_regular_pattern_is_compiled_once_per_generation() {
        let (index, _changes) = SubscriptionIndex::new();
        let first = regular(subscriber(1, "0", &["hostcreate"], true), 1, "ok");
        index.upsert(first.clone());
        let compiled = index.confirm_regex(&first).expect("compiles");
        let again = index.confirm_regex(&first).expect("compiles");
        assert!(Arc::ptr_eq(&compiled, &again), "the same generation shares one regex");
        assert_eq!(index.confirm_compilations(), 1);
        // A readiness change alone keeps it.
        let mut paused = first.clone();
        paused.ready = false;
        index.upsert(paused.clone());
        assert!(Arc::ptr_eq(&compiled, &index.confirm_regex(&paused).expect("compiles")));

        let second = regular(first.clone(), 2, "done");
        index.upsert(second.clone());
        let recompiled = index.confirm_regex(&second).expect("compiles");
        assert!(!Arc::ptr_eq(&compiled, &recompiled), "a new generation compiles its own");
        assert!(recompiled.is_match("all done") && !recompiled.is_match("ok"));
        assert_eq!(index.confirm_compilations(), 2);

        assert!(index.confirm_regex(&subscriber(2, "0", &["hostcreate"], true)).is_none(), "httpstatus: none");
        index.remove(1);
        assert!(index.confirms.read().is_empty(), "a removed subscription's pattern goes with it");
        assert_eq!(index.confirm_compilations(), 2);
    }
}
