//! Subscription ids: cluster-unique integers, never reused, reserved in blocks from one
//! counter ConfigMap with optimistic concurrency (the write carries the resourceVersion
//! that was read, so two allocators can never reserve the same block).

use super::Error;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use std::ops::Range;
use tokio::sync::Mutex;

/// Key of the counter ConfigMap holding the next id that no allocator has reserved.
pub const NEXT_ID_KEY: &str = "next";

pub struct IdAllocator {
    api: Api<ConfigMap>,
    name: String,
    block_size: i64,
    state: Mutex<Reserved>,
}

/// The block this allocator reserved and has not handed out yet. An id handed out is
/// never handed out again, even when its status write fails: the write may have
/// happened with only its answer lost.
#[derive(Default)]
struct Reserved {
    block: Range<i64>,
    /// Imported ids claimed by this allocator, by object uid: one id goes to one object
    /// even before the cache shows the first claimant's status.
    claims: std::collections::HashMap<i64, String>,
}

/// The block `[start, start + block_size)` to reserve and the counter's new value, given
/// the counter's current value (absent when the counter does not exist yet) and `floor`,
/// one above the highest id seen on any subscription: a deleted or rolled-back counter
/// can then never hand out an id again.
pub fn next_block(current: Option<&str>, floor: i64, block_size: i64) -> Result<(i64, i64), String> {
    let next = match current {
        None => 1,
        Some(text) => text
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("{NEXT_ID_KEY}={text:?} is not a positive integer"))?,
    };
    let start = next.max(floor).max(1);
    Ok((start, start + block_size))
}

impl IdAllocator {
    pub fn new(api: Api<ConfigMap>, name: String, block_size: u32) -> Self {
        IdAllocator { api, name, block_size: i64::from(block_size.max(1)), state: Mutex::default() }
    }

    /// A fresh id, at least `floor`.
    pub async fn next_id(&self, floor: i64) -> Result<i64, Error> {
        let mut state = self.state.lock().await;
        if state.block.is_empty() || state.block.start < floor {
            state.block = self.reserve(floor).await?;
        }
        let id = state.block.start;
        state.block.start += 1;
        Ok(id)
    }

    /// Takes `wanted` (an imported id) for the object `uid`, unless another object holds
    /// it: `holder(wanted)` answers from the cache, and claims made here and not yet in
    /// the cache count too. The counter moves above `wanted`, so no later allocation can
    /// hand it out. None when the id is taken.
    pub async fn claim_imported(
        &self,
        wanted: i64,
        uid: &str,
        holder: impl Fn(i64) -> Option<String>,
    ) -> Result<Option<i64>, Error> {
        let mut state = self.state.lock().await;
        match state.claims.get(&wanted) {
            Some(claimant) if claimant != uid => return Ok(None),
            _ => {}
        }
        if holder(wanted).is_some_and(|other| other != uid) {
            return Ok(None);
        }
        if wanted >= state.block.end {
            state.block = self.reserve(wanted + 1).await?;
        } else if wanted >= state.block.start {
            state.block.start = wanted + 1;
        }
        state.claims.insert(wanted, uid.to_string());
        Ok(Some(wanted))
    }

    async fn reserve(&self, floor: i64) -> Result<Range<i64>, Error> {
        let name = &self.name;
        loop {
            let current =
                self.api.get_opt(name).await.map_err(|source| Error::ReadIdCounter { name: name.clone(), source })?;
            let value = current.as_ref().and_then(|cm| cm.data.as_ref()?.get(NEXT_ID_KEY).cloned());
            let (start, next) = next_block(value.as_deref(), floor, self.block_size)
                .map_err(|reason| Error::CorruptIdCounter { name: name.clone(), reason })?;
            let data = BTreeMap::from([(NEXT_ID_KEY.to_string(), next.to_string())]);
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
                    // `replace` sends the resourceVersion we read: a concurrent reservation
                    // makes this fail with 409 and we read again.
                    counter.data = Some(data);
                    self.api.replace(name, &PostParams::default(), &counter).await
                }
            };
            match written {
                Ok(_) => {
                    tracing::debug!(counter = %name, start, end = next, "reserved subscription ids");
                    return Ok(start..next);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(source) => return Err(Error::ReserveIds { name: name.clone(), source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_block;

    #[test]
    fn first_block_starts_at_one() {
        assert_eq!(next_block(None, 0, 10), Ok((1, 11)));
    }

    #[test]
    fn block_follows_the_counter() {
        assert_eq!(next_block(Some("41"), 0, 10), Ok((41, 51)));
    }

    #[test]
    fn floor_wins_over_a_counter_that_went_back() {
        // Ids up to 99 exist on subscriptions; a recreated counter says 1.
        assert_eq!(next_block(Some("1"), 100, 5), Ok((100, 105)));
        assert_eq!(next_block(None, 100, 5), Ok((100, 105)));
    }

    #[test]
    fn a_corrupt_counter_is_an_error_not_a_restart_from_one() {
        assert!(next_block(Some("banana"), 0, 10).is_err());
        assert!(next_block(Some("-4"), 0, 10).is_err());
    }
}
