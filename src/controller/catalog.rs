//! The controller's cache of EventSubscriptions, indexed the ways herald asks for them:
//! by (supplier account, subscription name) in age order for the name checks, by id for
//! REST updates and deletes, and per account as bk-cmdb search records in id order. Fed
//! from the controller's own watch, so each lookup costs O(1) (or O(holders of a name))
//! however many subscriptions there are.
//!
//! It also answers read-your-writes: REST writes record the resourceVersion they produced
//! (or, for a delete, the uid that must disappear), and a read waits until the watch has
//! shown them. Watch events arrive in resourceVersion order across the whole resource, so
//! once an event of revision R has been applied, every change up to R has been.

use crate::compat::subscription_record::subscription_record;
use crate::compat::time::TimeZoneSetting;
use crate::controller::validation::age_order;
use crate::crd::EventSubscription;
use crate::effective::name_key;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// (supplier account, subscription name), normalised as `effective::name_key` does.
type NameKey = (String, String);

/// A subscription as bk-cmdb's search shows it, with the namespace its visibility
/// depends on (tenancy is decided at search time: namespace labels change on their own).
#[derive(Debug)]
pub struct Record {
    pub namespace: String,
    pub value: serde_json::Value,
}

struct Held {
    object: Arc<EventSubscription>,
    key: NameKey,
    id: Option<i64>,
    /// Its place among its account's records, when it is live (not being deleted).
    record: Option<(String, (i64, String))>,
}

#[derive(Default)]
struct State {
    /// The initial list (or a relist) has been applied.
    ready: bool,
    /// By uid.
    objects: HashMap<String, Held>,
    /// Holders of each name, oldest first (`age_order`).
    by_name: HashMap<NameKey, Vec<Arc<EventSubscription>>>,
    /// Uid of the object with each id.
    by_id: HashMap<i64, String>,
    /// Live records of each account by (id, uid): ascending id is bk-cmdb's default order.
    by_account: HashMap<String, BTreeMap<(i64, String), Record>>,
    /// The highest id ever seen: ids are never handed out again.
    highest_id: i64,
    /// The highest resourceVersion applied; `None` once one was not a number (then reads
    /// cannot be judged caught up, and fall back to the API server).
    seen_revision: Option<u64>,
    /// The highest resourceVersion herald's own writes produced.
    expected_revision: u64,
    /// Uids herald deleted that the watch still shows.
    expected_gone: HashSet<String>,
}

/// What applying one watch event changed, for the controller to act on.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// Subscriptions whose name check may have changed: the other holders of the names
    /// the changed object held before and holds now.
    pub recheck: Vec<ObjectRef<EventSubscription>>,
    /// Ids of objects that are gone (deleted, or missing from a relist).
    pub removed_ids: Vec<i64>,
}

pub struct Catalog {
    state: RwLock<State>,
    /// Bumped after every applied event, to wake readers waiting for it.
    changed: tokio::sync::watch::Sender<u64>,
    time_zone: TimeZoneSetting,
}

fn revision(sub: &EventSubscription) -> Option<u64> {
    sub.metadata.resource_version.as_deref()?.parse().ok()
}

fn subscription_id(sub: &EventSubscription) -> Option<i64> {
    sub.status.as_ref()?.subscription_id
}

impl Catalog {
    pub fn new(time_zone: TimeZoneSetting) -> Self {
        let (changed, _) = tokio::sync::watch::channel(0);
        Catalog { state: RwLock::new(State { seen_revision: Some(0), ..State::default() }), changed, time_zone }
    }

    /// Applies one event of the controller's watch, once `store` (the reflector the
    /// event came through) has applied it: the catalog shares the store's copies of the
    /// objects rather than holding a second one.
    pub fn apply(&self, event: &watcher::Event<EventSubscription>, store: &Store<EventSubscription>) -> Applied {
        let applied = {
            let mut state = self.state.write();
            match event {
                // The store swaps in a relist's objects at its end.
                watcher::Event::Init | watcher::Event::InitApply(_) => Applied::default(),
                watcher::Event::InitDone => self.replace_all(&mut state, store.state()),
                watcher::Event::Apply(sub) => {
                    note_revision(&mut state, sub);
                    let stored = store.get(&ObjectRef::from_obj(sub)).unwrap_or_else(|| Arc::new(sub.clone()));
                    self.upsert(&mut state, stored)
                }
                watcher::Event::Delete(sub) => {
                    note_revision(&mut state, sub);
                    remove(&mut state, &sub.uid().unwrap_or_default())
                }
            }
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        applied
    }

    fn replace_all(&self, state: &mut State, listed: Vec<Arc<EventSubscription>>) -> Applied {
        let listed_uids: HashSet<String> = listed.iter().filter_map(|s| s.uid()).collect();
        let vanished: Vec<String> = state.objects.keys().filter(|uid| !listed_uids.contains(*uid)).cloned().collect();
        let mut applied = Applied::default();
        for uid in vanished {
            let gone = remove(state, &uid);
            applied.removed_ids.extend(gone.removed_ids);
        }
        for sub in listed {
            note_revision(state, &sub);
            self.upsert(state, sub);
        }
        state.ready = true;
        // The initial list starts every reconcile anyway; no rechecks needed.
        applied
    }

    fn upsert(&self, state: &mut State, sub: Arc<EventSubscription>) -> Applied {
        let uid = sub.uid().unwrap_or_default();
        let (account, name) = name_key(&sub.spec);
        let key = (account.to_string(), name.to_string());
        let mut applied = Applied::default();
        if let Some(before) = state.objects.get(&uid).map(|held| held.key.clone()) {
            unlink(state, &uid);
            if before != key {
                applied.recheck.extend(others(state, &before, &uid));
            }
        }
        let id = subscription_id(&sub);
        if let Some(id) = id {
            // An id past MAX_ID (one forged before ids were bounded) must not drag every
            // later allocation past it; that subscription is refused instead.
            if id <= super::ids::MAX_ID {
                state.highest_id = state.highest_id.max(id);
            }
            state.by_id.insert(id, uid.clone());
        }
        let holders = state.by_name.entry(key.clone()).or_default();
        let at = holders.partition_point(|held| age_order(held, &sub).is_lt());
        holders.insert(at, sub.clone());
        applied.recheck.extend(others(state, &key, &uid));
        let record = sub.metadata.deletion_timestamp.is_none().then(|| {
            let slot = (id.unwrap_or(0), uid.clone());
            let record = Record {
                namespace: sub.namespace().unwrap_or_default(),
                value: subscription_record(&sub, &self.time_zone),
            };
            state.by_account.entry(key.0.clone()).or_default().insert(slot.clone(), record);
            (key.0.clone(), slot)
        });
        state.objects.insert(uid, Held { object: sub, key, id, record });
        applied
    }

    /// Waits until the initial list has been applied.
    pub async fn wait_ready(&self) {
        while self.wait_for(Duration::from_secs(60), || self.state.read().ready.then_some(())).await.is_none() {}
    }

    /// Every subscription the cache holds.
    pub fn all(&self) -> Vec<Arc<EventSubscription>> {
        self.state.read().objects.values().map(|held| held.object.clone()).collect()
    }

    /// The subscriptions holding (`account`, `name`), oldest first, including ones being
    /// deleted.
    pub fn holders(&self, account: &str, name: &str) -> Vec<Arc<EventSubscription>> {
        let state = self.state.read();
        state.by_name.get(&(account.to_string(), name.to_string())).cloned().unwrap_or_default()
    }

    /// The object with `id`, if the cache holds one.
    pub fn by_id(&self, id: i64) -> Option<Arc<EventSubscription>> {
        let state = self.state.read();
        let uid = state.by_id.get(&id)?;
        state.objects.get(uid).map(|held| held.object.clone())
    }

    /// The object with `uid`, if the cache holds it.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<EventSubscription>> {
        self.state.read().objects.get(uid).map(|held| held.object.clone())
    }

    /// Runs `read` over the live records of `account`, in ascending id, under the
    /// catalog's read lock: a search copies nothing but its page.
    pub fn with_records<T>(&self, account: &str, read: impl FnOnce(&mut dyn Iterator<Item = &Record>) -> T) -> T {
        let state = self.state.read();
        let mut records = state.by_account.get(account).into_iter().flat_map(BTreeMap::values);
        read(&mut records)
    }

    /// The highest id any subscription has had.
    pub fn highest_id(&self) -> i64 {
        self.state.read().highest_id
    }

    /// A write of herald's produced `object`: reads wait until the watch shows it.
    pub fn expect_written(&self, object: &EventSubscription) {
        let mut state = self.state.write();
        match revision(object) {
            Some(rv) => state.expected_revision = state.expected_revision.max(rv),
            None => state.seen_revision = None,
        }
    }

    /// Herald deleted `uid`: reads wait until the watch no longer shows it.
    pub fn expect_gone(&self, uid: &str) {
        let mut state = self.state.write();
        if state.objects.contains_key(uid) {
            state.expected_gone.insert(uid.to_string());
        }
    }

    fn caught_up(&self) -> bool {
        let state = self.state.read();
        state.ready
            && state.expected_gone.is_empty()
            && state.seen_revision.is_some_and(|seen| seen >= state.expected_revision)
    }

    /// Waits up to `bound` until the cache shows every write herald made; false when it
    /// does not by then (or cannot tell), and the caller reads the API server instead.
    pub async fn wait_caught_up(&self, bound: Duration) -> bool {
        self.wait_for(bound, || self.caught_up().then_some(())).await.is_some()
    }

    /// Waits up to `bound` for `check` to answer something, checking after every change.
    pub async fn wait_for<T>(&self, bound: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if let Some(found) = check() {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return check(),
            }
        }
    }
}

fn note_revision(state: &mut State, sub: &EventSubscription) {
    state.seen_revision = match (state.seen_revision, revision(sub)) {
        (Some(seen), Some(rv)) => Some(seen.max(rv)),
        _ => None,
    };
}

/// The other holders of `key`, to re-check.
fn others(state: &State, key: &NameKey, uid: &str) -> Vec<ObjectRef<EventSubscription>> {
    state
        .by_name
        .get(key)
        .into_iter()
        .flatten()
        .filter(|held| held.uid().as_deref() != Some(uid))
        .map(|held| ObjectRef::from_obj(held.as_ref()))
        .collect()
}

/// Takes `uid` out of every index but `objects`.
fn unlink(state: &mut State, uid: &str) {
    let Some(held) = state.objects.get(uid) else { return };
    let (key, id, record) = (held.key.clone(), held.id, held.record.clone());
    if let Some(holders) = state.by_name.get_mut(&key) {
        holders.retain(|h| h.uid().as_deref() != Some(uid));
        if holders.is_empty() {
            state.by_name.remove(&key);
        }
    }
    if let Some(id) = id
        && state.by_id.get(&id).is_some_and(|held| held == uid)
    {
        state.by_id.remove(&id);
    }
    if let Some((account, slot)) = record
        && let Some(records) = state.by_account.get_mut(&account)
    {
        records.remove(&slot);
        if records.is_empty() {
            state.by_account.remove(&account);
        }
    }
}

fn remove(state: &mut State, uid: &str) -> Applied {
    let Some(key) = state.objects.get(uid).map(|held| held.key.clone()) else { return Applied::default() };
    unlink(state, uid);
    let held = state.objects.remove(uid);
    state.expected_gone.remove(uid);
    Applied { recheck: others(state, &key, uid), removed_ids: held.and_then(|h| h.id).into_iter().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EventSubscriptionSpec, EventSubscriptionStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::reflector::{self, store::Writer};

    struct Fixture {
        catalog: Catalog,
        store: Store<EventSubscription>,
        writer: Writer<EventSubscription>,
        revision: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let (store, writer) = reflector::store();
            let mut fixture = Fixture { catalog: Catalog::new(TimeZoneSetting::default()), store, writer, revision: 1 };
            fixture.event(watcher::Event::Init);
            fixture.event(watcher::Event::InitDone);
            fixture
        }

        fn event(&mut self, event: watcher::Event<EventSubscription>) -> Applied {
            self.writer.apply_watcher_event(&event);
            self.catalog.apply(&event, &self.store)
        }

        /// Applies `sub` with the next resourceVersion.
        fn apply(&mut self, mut sub: EventSubscription) -> Applied {
            self.revision += 1;
            sub.metadata.resource_version = Some(self.revision.to_string());
            self.event(watcher::Event::Apply(sub))
        }

        fn delete(&mut self, mut sub: EventSubscription) -> Applied {
            self.revision += 1;
            sub.metadata.resource_version = Some(self.revision.to_string());
            self.event(watcher::Event::Delete(sub))
        }

        fn holders(&self, name: &str) -> Vec<String> {
            self.catalog.holders("0", name).iter().map(|s| s.name_any()).collect()
        }
    }

    fn sub(name: &str, created: i64, subscription_name: &str, id: Option<i64>) -> EventSubscription {
        let mut s = EventSubscription::new(
            name,
            EventSubscriptionSpec {
                subscription_name: subscription_name.into(),
                callback_url: "http://127.0.0.1/cb".into(),
                events: vec!["hostcreate".into()],
                ..Default::default()
            },
        );
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some(format!("uid-{name}"));
        s.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        s.status = id.map(|id| EventSubscriptionStatus { subscription_id: Some(id), ..Default::default() });
        s
    }

    fn names(refs: &[ObjectRef<EventSubscription>]) -> Vec<&str> {
        refs.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn holders_of_a_name_come_oldest_first() {
        let mut f = Fixture::new();
        f.apply(sub("young", 300, "hosts", Some(3)));
        f.apply(sub("old", 100, "hosts", Some(1)));
        f.apply(sub("middle", 200, " hosts ", Some(2)));
        f.apply(sub("elsewhere", 50, "sets", Some(4)));
        assert_eq!(f.holders("hosts"), ["old", "middle", "young"]);
        assert_eq!(f.holders("sets"), ["elsewhere"]);
        assert!(f.holders("nothing").is_empty());
    }

    #[test]
    fn same_second_ties_order_by_namespace_then_name() {
        let mut f = Fixture::new();
        f.apply(sub("b", 100, "hosts", None));
        f.apply(sub("a", 100, "hosts", None));
        let mut other_namespace = sub("0", 100, "hosts", None);
        other_namespace.metadata.namespace = Some("zz".into());
        f.apply(other_namespace);
        let mut earlier_namespace = sub("z", 100, "hosts", None);
        earlier_namespace.metadata.namespace = Some("aa".into());
        f.apply(earlier_namespace);
        assert_eq!(f.holders("hosts"), ["z", "a", "b", "0"]);
    }

    #[test]
    fn inserting_a_holder_rechecks_the_others_of_its_name() {
        let mut f = Fixture::new();
        assert_eq!(f.apply(sub("first", 100, "hosts", Some(1))), Applied::default());
        let applied = f.apply(sub("second", 200, "hosts", None));
        assert_eq!(names(&applied.recheck), ["first"]);
        // An update that keeps the name rechecks the same holders, not itself.
        let applied = f.apply(sub("second", 200, "hosts", Some(2)));
        assert_eq!(names(&applied.recheck), ["first"]);
    }

    #[test]
    fn a_rename_moves_the_holder_and_rechecks_both_names() {
        let mut f = Fixture::new();
        f.apply(sub("old", 100, "hosts", Some(1)));
        f.apply(sub("refused", 200, "hosts", Some(2)));
        f.apply(sub("target", 50, "sets", Some(3)));
        let applied = f.apply(sub("old", 100, "sets", Some(1)));
        assert_eq!(names(&applied.recheck), ["refused", "target"]);
        assert_eq!(f.holders("hosts"), ["refused"]);
        assert_eq!(f.holders("sets"), ["target", "old"]);
    }

    #[test]
    fn a_delete_frees_the_name_and_reports_the_id() {
        let mut f = Fixture::new();
        let holder = sub("holder", 100, "hosts", Some(7));
        f.apply(holder.clone());
        f.apply(sub("refused", 200, "hosts", Some(8)));
        let applied = f.delete(holder);
        assert_eq!(names(&applied.recheck), ["refused"]);
        assert_eq!(applied.removed_ids, [7]);
        assert_eq!(f.holders("hosts"), ["refused"]);
        assert!(f.catalog.by_id(7).is_none());
        assert_eq!(f.catalog.by_id(8).map(|s| s.name_any()).as_deref(), Some("refused"));
        // Ids are never handed out again, so the highest stays.
        assert_eq!(f.catalog.highest_id(), 8);
    }

    #[test]
    fn records_are_per_account_in_id_order_and_leave_when_deletion_starts() {
        let mut f = Fixture::new();
        f.apply(sub("c", 100, "c", Some(30)));
        f.apply(sub("a", 100, "a", Some(10)));
        let mut other = sub("b", 100, "b", Some(20));
        other.spec.supplier_account = Some("7".into());
        f.apply(other);
        f.apply(sub("new", 100, "new", None));
        let ids = |f: &Fixture, account| -> Vec<i64> {
            f.catalog.with_records(account, |records| {
                records.map(|r| r.value["subscription_id"].as_i64().unwrap()).collect()
            })
        };
        assert_eq!(ids(&f, "0"), [0, 10, 30]);
        assert_eq!(ids(&f, "7"), [20]);
        let mut deleting = sub("a", 100, "a", Some(10));
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::from_second(500).unwrap()));
        f.apply(deleting);
        assert_eq!(ids(&f, "0"), [0, 30]);
        // Still a holder (validation skips it) and still found by id until it is gone.
        assert_eq!(f.holders("a"), ["a"]);
    }

    #[test]
    fn a_relist_drops_what_vanished_and_keeps_the_rest() {
        let mut f = Fixture::new();
        f.apply(sub("stays", 100, "hosts", Some(1)));
        f.apply(sub("vanishes", 100, "sets", Some(2)));
        f.event(watcher::Event::Init);
        let mut stays = sub("stays", 100, "hosts", Some(1));
        stays.metadata.resource_version = Some("50".into());
        f.event(watcher::Event::InitApply(stays));
        let applied = f.event(watcher::Event::InitDone);
        assert_eq!(applied.removed_ids, [2]);
        assert_eq!(f.catalog.all().len(), 1);
        assert!(f.holders("sets").is_empty());
    }

    #[tokio::test]
    async fn reads_wait_for_the_revision_of_herald_s_last_write() {
        let mut f = Fixture::new();
        let bound = Duration::from_millis(50);
        assert!(f.catalog.wait_caught_up(bound).await, "nothing written yet");
        let mut written = sub("a", 100, "a", None);
        written.metadata.resource_version = Some((f.revision + 1).to_string());
        f.catalog.expect_written(&written);
        assert!(!f.catalog.wait_caught_up(bound).await, "the watch has not shown the write");
        f.apply(sub("a", 100, "a", None));
        assert!(f.catalog.wait_caught_up(bound).await);
    }

    #[tokio::test]
    async fn reads_wait_until_a_deleted_object_is_gone() {
        let mut f = Fixture::new();
        let bound = Duration::from_millis(50);
        let victim = sub("a", 100, "a", Some(1));
        f.apply(victim.clone());
        f.catalog.expect_gone("uid-a");
        assert!(!f.catalog.wait_caught_up(bound).await);
        f.delete(victim);
        assert!(f.catalog.wait_caught_up(bound).await);
        // Expecting an object the catalog never had costs no wait.
        f.catalog.expect_gone("uid-unknown");
        assert!(f.catalog.wait_caught_up(Duration::ZERO).await);
    }

    #[tokio::test]
    async fn a_revision_that_is_not_a_number_sends_reads_to_the_api_server() {
        let mut f = Fixture::new();
        let mut odd = sub("a", 100, "a", None);
        odd.metadata.resource_version = Some("not-a-number".into());
        f.event(watcher::Event::Apply(odd));
        assert!(!f.catalog.wait_caught_up(Duration::from_millis(20)).await);
    }
}
