//! Backoff for transient failures: 0.5 s, 2 s, 8 s, 32 s, then the record is dead-lettered.

use std::time::Duration;

/// The waits between attempts; after the last one the failure is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    backoff: Vec<Duration>,
}

impl RetryPolicy {
    pub fn new(backoff: impl IntoIterator<Item = Duration>) -> Self {
        Self {
            backoff: backoff.into_iter().collect(),
        }
    }

    pub fn from_millis(ms: &[u64]) -> Self {
        Self::new(ms.iter().map(|m| Duration::from_millis(*m)))
    }

    /// The wait before retry number `retry` (1-based), or `None` when retries are exhausted.
    pub fn wait_before(&self, retry: usize) -> Option<Duration> {
        retry
            .checked_sub(1)
            .and_then(|i| self.backoff.get(i))
            .copied()
    }

    /// The wait before retry `retry` for a failure that is never given up on (a broker
    /// outage): the last backoff repeats.
    pub fn wait_forever(&self, retry: usize) -> Duration {
        self.wait_before(retry)
            .or_else(|| self.backoff.last().copied())
            .unwrap_or(Duration::from_secs(1))
    }

    /// Attempts in all: the first plus one per backoff step.
    pub fn max_attempts(&self) -> usize {
        self.backoff.len() + 1
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::from_millis(&[500, 2_000, 8_000, 32_000])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_backoff_then_give_up() {
        let policy = RetryPolicy::default();
        let waits: Vec<_> = (1..=5).map(|r| policy.wait_before(r)).collect();
        assert_eq!(
            waits,
            vec![
                Some(Duration::from_millis(500)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(8)),
                Some(Duration::from_secs(32)),
                None
            ]
        );
        assert_eq!(policy.max_attempts(), 5);
        assert_eq!(policy.wait_forever(9), Duration::from_secs(32));
    }
}
