//! Reading an answer's body within bounds: a cap on one answer, and a `ByteBudget` shared
//! by many reads (every callback answer, every source's watch pages), so that many answers
//! at their cap cannot add up to more memory than herald has.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of answers held at once by every read that shares it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    bytes: Arc<Semaphore>,
    capacity: usize,
}

/// Budget bytes one answer holds; given back when dropped (with the answer).
#[derive(Debug, Default)]
pub struct HeldBytes(Option<OwnedSemaphorePermit>);

impl ByteBudget {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        ByteBudget { bytes: Arc::new(Semaphore::new(capacity)), capacity }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds `n` bytes to `held` if the budget has them now. Never waits: a read that
    /// already holds bytes waiting for more could deadlock with others doing the same, so
    /// a spent budget ends the read instead.
    pub fn take(&self, held: &mut HeldBytes, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let Ok(n) = u32::try_from(n) else { return false };
        match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(permit) => {
                match &mut held.0 {
                    Some(existing) => existing.merge(permit),
                    None => held.0 = Some(permit),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Bytes held by answers now.
    pub fn held(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.available_permits())
    }
}

impl HeldBytes {
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

/// How a bounded read ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// The whole answer was read.
    Whole,
    /// The answer is longer than the cap: `bytes` is its first `cap` bytes.
    Capped,
    /// The budget could not hold the next chunk: `bytes` is only the answer's start.
    BudgetSpent,
}

/// An answer read within bounds; its bytes count against the budget until dropped.
#[derive(Debug)]
pub struct Body {
    pub bytes: Vec<u8>,
    pub end: BodyEnd,
    pub held: HeldBytes,
}

/// Reads at most `cap` bytes of a response body, each chunk paid from `budget` (when
/// given) before it is kept. Nothing past the cap or the budget is read: the connection is
/// dropped with the response.
pub async fn read_body(
    response: &mut reqwest::Response,
    cap: usize,
    budget: Option<&ByteBudget>,
) -> Result<Body, reqwest::Error> {
    let mut body = Body { bytes: Vec::new(), end: BodyEnd::Whole, held: HeldBytes::default() };
    while let Some(chunk) = response.chunk().await? {
        let take = chunk.len().min(cap - body.bytes.len());
        if budget.is_some_and(|budget| !budget.take(&mut body.held, take)) {
            body.end = BodyEnd::BudgetSpent;
            break;
        }
        body.bytes.extend_from_slice(&chunk[..take]);
        if take < chunk.len() {
            body.end = BodyEnd::Capped;
            break;
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_bytes_are_taken_while_they_last_and_given_back_on_drop() {
        let budget = ByteBudget::new(100);
        let mut first = HeldBytes::default();
        assert!(budget.take(&mut first, 60));
        assert!(budget.take(&mut first, 0), "nothing to pay always passes");
        let mut second = HeldBytes::default();
        assert!(!budget.take(&mut second, 41), "only 40 left");
        assert!(budget.take(&mut second, 40));
        assert_eq!((first.bytes(), second.bytes(), budget.held()), (60, 40, 100));
        drop(first);
        assert_eq!(budget.held(), 40);
        drop(second);
        assert_eq!(budget.held(), 0);
    }
}
