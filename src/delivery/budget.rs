//! Bounds across all subscriptions (docs/design.md §5): callback attempts in flight and
//! bytes of callback answers held at once. `maxInFlight` bounds one subscription; these
//! bound the sum, so many subscriptions with slow or large answers cannot exhaust herald's
//! memory.

use crate::config::DeliveryConfig;
use crate::outbound::body::ByteBudget;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

/// Why a `regular` attempt failed when the answer budget cut its answer (its `lastError`).
pub const ANSWER_BUDGET_EXHAUSTED: &str = "answer not read: herald's answer buffer budget is exhausted";

/// The global attempt and answer-byte budgets.
pub struct Budgets {
    attempts: Semaphore,
    attempt_slots: usize,
    answers: ByteBudget,
}

impl Budgets {
    pub fn new(config: &DeliveryConfig) -> Self {
        // No slot at all would stall every subscription for good.
        let attempt_slots = config.max_attempts_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        if attempt_slots != config.max_attempts_in_flight {
            tracing::warn!(
                configured = config.max_attempts_in_flight,
                used = attempt_slots,
                "delivery.maxAttemptsInFlight is out of range"
            );
        }
        if config.answer_buffer_bytes < config.body_cap_bytes {
            tracing::warn!(
                answer_buffer_bytes = config.answer_buffer_bytes,
                body_cap_bytes = config.body_cap_bytes,
                "delivery.answerBufferBytes is below bodyCapBytes: a long answer is always cut"
            );
        }
        Budgets {
            attempts: Semaphore::new(attempt_slots),
            attempt_slots,
            answers: ByteBudget::new(config.answer_buffer_bytes),
        }
    }

    /// Waits for a slot of the attempt budget (fairly, first come first served), or until
    /// `stop` is cancelled (None). Callers hold no lock while waiting; the slot is given
    /// back when the permit is dropped.
    pub async fn attempt_slot(&self, stop: &CancellationToken) -> Option<SemaphorePermit<'_>> {
        tokio::select! {
            biased;
            () = stop.cancelled() => None,
            // Err only if the semaphore were closed, which nothing does.
            permit = self.attempts.acquire() => permit.ok(),
        }
    }

    pub fn answers(&self) -> &ByteBudget {
        &self.answers
    }

    /// Attempts holding a slot now.
    pub fn attempts_in_flight(&self) -> usize {
        self.attempt_slots.saturating_sub(self.attempts.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_an_attempt_slot_ends_when_stopped() {
        let config = DeliveryConfig { max_attempts_in_flight: 0, ..DeliveryConfig::default() };
        let budgets = Budgets::new(&config);
        let never = CancellationToken::new();
        let slot = budgets.attempt_slot(&never).await.expect("0 is taken as 1 slot");
        assert_eq!(budgets.attempts_in_flight(), 1);
        let stop = CancellationToken::new();
        let waiting = budgets.attempt_slot(&stop);
        stop.cancel();
        assert!(waiting.await.is_none(), "a stopped wait gets no slot");
        drop(slot);
        assert_eq!(budgets.attempts_in_flight(), 0);
    }
}
