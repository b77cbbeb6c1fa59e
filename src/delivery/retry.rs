//! The retry schedule: exponential backoff with jitter (docs/design.md §5).

use crate::effective::RetryPolicy;
use std::time::Duration;

/// Delay before the next attempt after `failed_attempts` failures (1 = the first
/// failure): initial backoff doubling per failure up to the maximum, plus up to
/// `jitter_percent` of it at random (`random` in [0, 1)).
pub fn backoff(policy: &RetryPolicy, failed_attempts: u32, random: f64) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(30);
    let base = policy.initial_backoff.saturating_mul(1u32 << exponent).min(policy.max_backoff);
    let jitter = base.mul_f64(f64::from(policy.jitter_percent) / 100.0 * random.clamp(0.0, 1.0));
    base + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter_percent: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            jitter_percent,
        }
    }

    #[test]
    fn doubles_from_the_initial_delay_to_the_cap() {
        let p = policy(0);
        let delays: Vec<u64> = (1..=10).map(|n| backoff(&p, n, 0.5).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoff(&p, 1000, 0.5), Duration::from_secs(300));
    }

    #[test]
    fn jitter_adds_at_most_its_share() {
        let p = policy(20);
        assert_eq!(backoff(&p, 3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(&p, 3, 0.999_999).as_millis(), 4799);
    }
}
