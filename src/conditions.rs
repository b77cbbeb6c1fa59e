//! What the controller and delivery both need to write status conditions: the list-map
//! merge by type, and a clock at the API server's precision.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Sets `new` in `conditions` (keyed by type), keeping `lastTransitionTime` when the
/// condition's status did not change.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
        }
        None => conditions.push(new),
    }
}

/// Seconds-precision "now": the API server stores times to the second, and a desired
/// status built with nanoseconds would never equal what it read back.
pub fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

/// A budget of API-server writes per second, shared by every status writer (delivery's
/// statistics and the sources' status): each write first takes the next free slot.
pub struct WriteBudget {
    period: std::time::Duration,
    next: parking_lot::Mutex<tokio::time::Instant>,
}

impl WriteBudget {
    /// At least one write per 10 s and at most 1,000 per second, whatever the setting
    /// (a zero period would make the budget meaningless).
    pub fn new(writes_per_second: f64) -> Self {
        let budget = if writes_per_second >= 0.1 { writes_per_second.min(1000.0) } else { 0.1 };
        WriteBudget {
            period: std::time::Duration::from_secs_f64(1.0 / budget),
            next: parking_lot::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for the next free slot and takes it.
    pub async fn take(&self) {
        let slot = {
            let mut next = self.next.lock();
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.period;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_write_budget_gives_a_usable_period() {
        for setting in [f64::INFINITY, 1e300, 20.0, 0.0, -5.0, f64::NAN] {
            let period = WriteBudget::new(setting).period;
            let usable = period >= std::time::Duration::from_millis(1) && period <= std::time::Duration::from_secs(10);
            assert!(usable, "{setting}: {period:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn writers_sharing_a_budget_take_turns() {
        let budget = std::sync::Arc::new(WriteBudget::new(10.0));
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            budget.take().await;
        }
        // The first slot is now, then one per 100 ms.
        assert_eq!(start.elapsed(), std::time::Duration::from_millis(400));
    }
}
