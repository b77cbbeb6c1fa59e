//! Subscription ids: cluster-unique integers, never reused, reserved in blocks from one
//! counter ConfigMap with optimistic concurrency (the write carries the resourceVersion
//! that was read, so two allocators can never reserve the same block).

use super::Error;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::Mutex;

/// Key of the counter ConfigMap holding the next id that no allocator has reserved.
pub const NEXT_ID_KEY: &str = "next";
/// Key listing the id blocks herald reserved (`1-20,104-113`): ids it may have handed out.
pub const RESERVED_KEY: &str = "reserved";
/// Key listing the imported ids and the object (uid) each went to (`100=<uid>,101=<uid>`).
pub const IMPORTED_KEY: &str = "imported";
/// Largest id accepted anywhere: ids are JSON numbers for bk-cmdb clients, and a double
/// holds every integer exactly only up to 2^53 - 1 (JavaScript's `MAX_SAFE_INTEGER`).
pub const MAX_ID: i64 = (1 << 53) - 1;

/// Most ids one counter write reserves for a burst of new subscriptions.
pub const MAX_BLOCK_SIZE: i64 = 1000;

pub struct IdAllocator {
    api: Api<ConfigMap>,
    name: String,
    block_size: i64,
    state: Mutex<Range<i64>>,
    /// Callers of `next_id` waiting for the block, to size the next reservation.
    waiting: AtomicI64,
}

/// How many ids to reserve when `waiting` callers want one: every caller waiting gets one
/// from the same counter write (a burst of 10,000 creates otherwise made 1,000 writes, one
/// after the other, which bounded how fast they all became Ready), never fewer than the
/// configured size, and at most `MAX_BLOCK_SIZE` (ids reserved and not handed out are a
/// gap after a restart).
fn reservation_size(configured: i64, waiting: i64) -> i64 {
    waiting.clamp(configured, MAX_BLOCK_SIZE.max(configured))
}

/// One caller counted in `IdAllocator::waiting` until dropped (also when its future is).
struct Waiter<'a>(&'a AtomicI64);

impl<'a> Waiter<'a> {
    fn join(waiting: &'a AtomicI64) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiter(waiting)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the counter ConfigMap records. Every id herald hands out comes from a reserved
/// block, and every imported id is recorded with its object, so an id is never given to a
/// second object: not by allocation, not by import, not after the first one was deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    next: i64,
    reserved: Vec<Range<i64>>,
    imported: BTreeMap<i64, String>,
}

impl Counter {
    /// Reads the ConfigMap's data (absent: a fresh counter). A counter written before the
    /// `reserved` key existed counts every id below `next` as reserved.
    pub fn parse(data: Option<&BTreeMap<String, String>>) -> Result<Self, String> {
        let Some(data) = data else { return Ok(Counter { next: 1, ..Counter::default() }) };
        let next = match data.get(NEXT_ID_KEY) {
            None => 1,
            Some(text) => text
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_ID + 1).contains(n))
                .ok_or_else(|| format!("{NEXT_ID_KEY}={text:?} is not a positive integer"))?,
        };
        let reserved = match data.get(RESERVED_KEY) {
            None if next > 1 => std::iter::once(1..next).collect(),
            None => Vec::new(),
            Some(text) => parse_ranges(text).ok_or_else(|| format!("{RESERVED_KEY}={text:?} is not a range list"))?,
        };
        let mut imported = BTreeMap::new();
        for entry in data.get(IMPORTED_KEY).map(String::as_str).unwrap_or_default().split(',').filter(|e| !e.is_empty())
        {
            let (id, uid) =
                entry.split_once('=').ok_or_else(|| format!("{IMPORTED_KEY} entry {entry:?} is not id=uid"))?;
            let id = id.parse().map_err(|_| format!("{IMPORTED_KEY} entry {entry:?} has no integer id"))?;
            imported.insert(id, uid.to_string());
        }
        Ok(Counter { next, reserved, imported })
    }

    pub fn to_data(&self) -> BTreeMap<String, String> {
        let reserved: Vec<String> = self.reserved.iter().map(|r| format!("{}-{}", r.start, r.end - 1)).collect();
        let imported: Vec<String> = self.imported.iter().map(|(id, uid)| format!("{id}={uid}")).collect();
        BTreeMap::from([
            (NEXT_ID_KEY.to_string(), self.next.to_string()),
            (RESERVED_KEY.to_string(), reserved.join(",")),
            (IMPORTED_KEY.to_string(), imported.join(",")),
        ])
    }

    /// Reserves `[start, start + block_size)`, at least `floor` (one above the highest id
    /// seen on any subscription: a deleted or rolled-back counter then never repeats an
    /// id). Imported ids are all below `next`, so a new block never covers one. A block
    /// is cut at `MAX_ID`; past it nothing is reserved and the counter is left as it was.
    pub fn reserve(&mut self, floor: i64, block_size: i64) -> Result<Range<i64>, IdsExhausted> {
        let start = self.next.max(floor).max(1);
        if start > MAX_ID {
            return Err(IdsExhausted { next: start });
        }
        let block = start..start.saturating_add(block_size).min(MAX_ID + 1);
        self.next = block.end;
        match self.reserved.last_mut() {
            Some(last) if last.end == block.start => last.end = block.end,
            _ => self.reserved.push(block.clone()),
        }
        Ok(block)
    }

    /// Records `wanted` as the imported id of `uid`. Refused when herald reserved it (it
    /// may have handed it out, to an object since deleted too) or it went to another
    /// object. Returns whether the counter changed.
    pub fn claim(&mut self, wanted: i64, uid: &str) -> Result<bool, String> {
        if !(1..=MAX_ID).contains(&wanted) {
            return Err(format!("id {wanted} is out of range"));
        }
        if self.reserved.iter().any(|r| r.contains(&wanted)) {
            return Err(format!("id {wanted} was handed out by herald"));
        }
        match self.imported.get(&wanted) {
            Some(holder) if holder == uid => Ok(false),
            Some(_) => Err(format!("id {wanted} was imported for another subscription")),
            None => {
                self.imported.insert(wanted, uid.to_string());
                self.next = self.next.max(wanted + 1);
                Ok(true)
            }
        }
    }
}

/// No id is left below `MAX_ID` to reserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no subscription id is left: the next would be {next}, past {MAX_ID} (the largest JSON clients read exactly)")]
pub struct IdsExhausted {
    pub next: i64,
}

/// `1-20,104-113` (inclusive ends) into sorted ranges.
fn parse_ranges(text: &str) -> Option<Vec<Range<i64>>> {
    let mut ranges = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (start, end) = part.split_once('-')?;
        let (start, end): (i64, i64) = (start.parse().ok()?, end.parse().ok()?);
        if start > end {
            return None;
        }
        ranges.push(start..end + 1);
    }
    ranges.sort_by_key(|r| r.start);
    Some(ranges)
}

impl IdAllocator {
    pub fn new(api: Api<ConfigMap>, name: String, block_size: u32) -> Self {
        IdAllocator {
            api,
            name,
            block_size: i64::from(block_size.max(1)),
            state: Mutex::default(),
            waiting: AtomicI64::new(0),
        }
    }

    /// A fresh id, at least `floor`.
    pub async fn next_id(&self, floor: i64) -> Result<i64, Error> {
        let waiter = Waiter::join(&self.waiting);
        let mut block = self.state.lock().await;
        // This caller and those queued behind it.
        let waiting = self.waiting.load(Ordering::Relaxed);
        drop(waiter);
        if block.is_empty() || block.start < floor {
            let block_size = reservation_size(self.block_size, waiting);
            *block = self
                .update(|counter| counter.reserve(floor, block_size).map(|reserved| (reserved, true)))
                .await?
                .map_err(|source| Error::IdsExhausted { name: self.name.clone(), source })?;
        }
        let id = block.start;
        block.start += 1;
        Ok(id)
    }

    /// Takes `wanted` (an imported id) for the object `uid`, recorded in the counter so
    /// that no other object ever gets it. None when it is refused (see `Counter::claim`).
    pub async fn claim_imported(&self, wanted: i64, uid: &str) -> Result<Option<i64>, Error> {
        // Serialised with allocation: the in-memory block is below every imported id.
        let _block = self.state.lock().await;
        match self.update(|counter| counter.claim(wanted, uid).map(|changed| (wanted, changed))).await? {
            Ok(id) => Ok(Some(id)),
            Err(reason) => {
                tracing::info!(id = wanted, %reason, "imported id refused");
                Ok(None)
            }
        }
    }

    /// Reads the counter, applies `change` and, when it says so, writes it back with the
    /// resourceVersion it read (a concurrent writer makes this fail with 409: read again).
    /// `change` answers (value, whether to write), or why it refuses.
    async fn update<T, E>(
        &self,
        mut change: impl FnMut(&mut Counter) -> Result<(T, bool), E>,
    ) -> Result<Result<T, E>, Error> {
        let name = &self.name;
        loop {
            let current =
                self.api.get_opt(name).await.map_err(|source| Error::ReadIdCounter { name: name.clone(), source })?;
            let mut counter = Counter::parse(current.as_ref().and_then(|cm| cm.data.as_ref()))
                .map_err(|reason| Error::CorruptIdCounter { name: name.clone(), reason })?;
            let (value, write) = match change(&mut counter) {
                Ok(changed) => changed,
                Err(refused) => return Ok(Err(refused)),
            };
            if !write {
                return Ok(Ok(value));
            }
            let data = counter.to_data();
            let written = match current {
                None => {
                    let counter = ConfigMap {
                        metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                        data: Some(data),
                        ..Default::default()
                    };
                    self.api.create(&PostParams::default(), &counter).await
                }
                Some(mut counter) => {
                    counter.data = Some(data);
                    self.api.replace(name, &PostParams::default(), &counter).await
                }
            };
            match written {
                Ok(_) => return Ok(Ok(value)),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(source) => return Err(Error::ReserveIds { name: name.clone(), source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_reserves_an_id_for_every_caller_waiting_within_bounds() {
        assert_eq!(reservation_size(10, 1), 10, "never fewer than configured");
        assert_eq!(reservation_size(10, 64), 64, "one write serves every caller waiting");
        assert_eq!(reservation_size(10, 50_000), MAX_BLOCK_SIZE);
        assert_eq!(reservation_size(5000, 3), 5000, "a configured size above the cap stands");
    }

    fn counter(next: &str, reserved: Option<&str>) -> Counter {
        let mut data = BTreeMap::from([(NEXT_ID_KEY.to_string(), next.to_string())]);
        if let Some(reserved) = reserved {
            data.insert(RESERVED_KEY.to_string(), reserved.to_string());
        }
        Counter::parse(Some(&data)).unwrap()
    }

    #[test]
    fn blocks_start_at_one_follow_the_counter_and_respect_the_floor() {
        let mut fresh = Counter::parse(None).unwrap();
        assert_eq!(fresh.reserve(0, 10), Ok(1..11));
        assert_eq!(fresh.reserve(0, 10), Ok(11..21));
        assert_eq!(fresh.reserved, vec![1..21], "adjacent blocks merge");
        // Ids up to 99 exist on subscriptions; a recreated counter says 1.
        assert_eq!(counter("1", None).reserve(100, 5), Ok(100..105));
        assert_eq!(counter("41", None).reserve(0, 10), Ok(41..51));
    }

    #[test]
    fn a_corrupt_counter_is_an_error_not_a_restart_from_one() {
        for (next, reserved) in [("banana", None), ("-4", None), ("5", Some("9-3")), ("5", Some("x"))] {
            let mut data = BTreeMap::from([(NEXT_ID_KEY.to_string(), next.to_string())]);
            if let Some(reserved) = reserved {
                data.insert(RESERVED_KEY.to_string(), reserved.to_string());
            }
            assert!(Counter::parse(Some(&data)).is_err(), "{next} {reserved:?}");
        }
    }

    #[test]
    fn an_imported_id_goes_to_one_object_once_and_never_where_herald_allocated() {
        let mut c = Counter::parse(None).unwrap();
        assert_eq!(c.reserve(0, 10), Ok(1..11));
        assert_eq!(c.claim(5, "a"), Err("id 5 was handed out by herald".into()), "also after its object is deleted");
        assert_eq!(c.claim(103, "a"), Ok(true));
        assert_eq!(c.claim(102, "b"), Ok(true), "imports in any order");
        assert_eq!(c.claim(103, "a"), Ok(false), "the same object again");
        assert_eq!(c.claim(103, "c"), Err("id 103 was imported for another subscription".into()));
        assert_eq!(c.reserve(0, 10), Ok(104..114), "new ids above every imported one");
        for outside in [MAX_ID + 1, 0, -1] {
            assert!(c.claim(outside, "d").is_err(), "{outside}");
        }
        let round_trip = Counter::parse(Some(&c.to_data())).unwrap();
        assert_eq!(round_trip, c);
    }

    #[test]
    fn a_counter_from_before_the_reserved_key_counts_everything_below_next_as_handed_out() {
        let mut old = counter("21", None);
        assert!(old.claim(20, "a").is_err());
        assert_eq!(old.claim(21, "a"), Ok(true));
        assert!(counter("21", Some("")).claim(20, "a").is_ok(), "an explicit empty list is believed");
    }

    #[test]
    fn ids_end_at_the_largest_exact_json_integer_and_past_it_nothing_is_reserved() {
        assert_eq!(MAX_ID, 9_007_199_254_740_991);
        let mut near = counter(&(MAX_ID - 2).to_string(), Some(""));
        assert_eq!(near.reserve(0, 10), Ok(MAX_ID - 2..MAX_ID + 1), "the last block is cut at the maximum");
        let before = near.clone();
        assert_eq!(near.reserve(0, 10), Err(IdsExhausted { next: MAX_ID + 1 }));
        assert_eq!(near, before, "a refused reservation changes nothing");
        let mut fresh = Counter::parse(None).unwrap();
        assert!(fresh.reserve(MAX_ID + 1, 10).is_err(), "a floor past the maximum reserves nothing");
        assert_eq!(fresh, Counter::parse(None).unwrap());
    }
}
