//! What delivery knows about subscriptions, fed by the controller's verdicts: the
//! effective spec of each, whether it is Ready, and the (account, event name) index
//! that publish matches against.

use crate::crd::SecretKeyRef;
use crate::effective::Effective;
use parking_lot::RwLock;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
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

pub struct SubscriptionIndex {
    entries: RwLock<Entries>,
    /// Ids whose entry changed, for the dispatcher.
    changes: mpsc::UnboundedSender<i64>,
}

impl SubscriptionIndex {
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<i64>) {
        let (changes, receiver) = mpsc::unbounded_channel();
        (Arc::new(SubscriptionIndex { entries: RwLock::default(), changes }), receiver)
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
            entries.by_id.insert(id, subscriber);
        }
        self.announce(id);
    }

    pub fn remove(&self, id: i64) {
        {
            let mut entries = self.entries.write();
            remove_keys(&mut entries, id);
            entries.by_id.remove(&id);
        }
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
}
