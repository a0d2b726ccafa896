//! The batch source: polls the input topic and assembles batches of up to `batch.max_records`
//! records, closed `batch.linger_ms` after their first record. Consumer errors (a failed fetch,
//! a topic not there yet, a broker away) are counted and survived, with a short backoff for the
//! ones that are not the broker's absence; librdkafka reconnects and refetches by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;

use super::committer::WorkerContext;
use crate::metrics as m;
use crate::record::Inbound;
use crate::retry::RetryPolicy;

/// What a poll yielded.
#[derive(Debug)]
pub(super) enum Polled {
    Batch(Vec<Inbound>),
    /// No record arrived within the idle interval.
    Idle,
}

/// How batches are cut.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchShape {
    pub(super) max_records: usize,
    pub(super) linger: Duration,
    /// Without a record for this long, a poll reports [`Polled::Idle`].
    pub(super) idle_after: Duration,
}

pub(super) struct BatchSource {
    consumer: Arc<StreamConsumer<WorkerContext>>,
    shape: BatchShape,
    policy: RetryPolicy,
    group: String,
    /// The batch being assembled and when it closes: held here, so [`Self::next`] can be
    /// cancelled without losing a record it took.
    pending: Vec<Inbound>,
    deadline: Option<Instant>,
    errors_in_a_row: usize,
}

impl BatchSource {
    pub(super) fn new(
        consumer: Arc<StreamConsumer<WorkerContext>>,
        shape: BatchShape,
        policy: RetryPolicy,
        group: String,
    ) -> Self {
        Self {
            consumer,
            shape,
            policy,
            group,
            pending: Vec::new(),
            deadline: None,
            errors_in_a_row: 0,
        }
    }

    /// The next batch, or [`Polled::Idle`]. Cancel-safe: a record taken before a cancellation
    /// stays in the batch being assembled and comes with the next call.
    pub(super) async fn next(&mut self) -> Polled {
        while self.pending.is_empty() {
            match self.poll_one(self.shape.idle_after).await {
                Ok(None) => return Polled::Idle,
                Err(e) => self.error(&e).await,
                Ok(Some(record)) => {
                    self.errors_in_a_row = 0;
                    self.take(record);
                }
            }
        }
        let deadline = self.deadline.unwrap_or_else(Instant::now);
        while self.pending.len() < self.shape.max_records {
            // A message already fetched is taken without arming a timer; the clock is read
            // every 256 messages so a steady stream still closes the batch on time.
            if self.pending.len().is_multiple_of(256) && Instant::now() >= deadline {
                break;
            }
            let next = match self.consumer.recv().now_or_never() {
                Some(polled) => Ok(polled),
                None => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::timeout(left, self.consumer.recv()).await
                }
            };
            match next {
                Ok(Ok(message)) => {
                    let record = Inbound::copy_of(&message);
                    drop(message);
                    self.take(record);
                }
                Ok(Err(e)) => {
                    // The batch so far is good; the error is dealt with before it goes.
                    self.error(&e).await;
                    break;
                }
                Err(_) => break,
            }
        }
        self.deadline = None;
        Polled::Batch(std::mem::take(&mut self.pending))
    }

    /// While the worker takes no new batch (work in flight at its limit, refused records going
    /// again): keeps polling for up to `wait`, because librdkafka hands over rebalances (a
    /// revocation, an assignment lost in a broker outage) only to a poll, and the group waits
    /// for them. Records that arrive meanwhile are kept, at most one batch, for the next
    /// [`Self::next`]; with a full batch held it only waits. Cancel-safe like [`Self::next`].
    pub(super) async fn hold(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while self.pending.len() < self.shape.max_records {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.poll_one(left).await {
                Ok(None) => return,
                Err(e) => self.error(&e).await,
                Ok(Some(record)) => {
                    self.errors_in_a_row = 0;
                    self.take(record);
                }
            }
        }
        tokio::time::sleep_until(until.into()).await;
    }

    /// The next record within `within` (`None` when none came), copied out of the consumer.
    async fn poll_one(&self, within: Duration) -> Result<Option<Inbound>, KafkaError> {
        match tokio::time::timeout(within, self.consumer.recv()).await {
            Err(_) => Ok(None),
            Ok(polled) => polled.map(|message| Some(Inbound::copy_of(&message))),
        }
    }

    /// Adds `record` to the batch being assembled. Records held of a partition revoked since
    /// the last message (the poll that returned this one served the revocation) are dropped
    /// first: they belong to the partition's next owner, which reads them again from the last
    /// commit, and if that is this worker, after it rebuilt the partition, in order.
    fn take(&mut self, record: Inbound) {
        let gone = self
            .consumer
            .context()
            .revoked_unseen
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        if !gone.is_empty() {
            self.pending.retain(|m| !gone.contains(&m.partition()));
        }
        // The group went on without this worker (its session expired in a broker outage):
        // every record fetched before is its next owner's, and the revocation that says so
        // waits in the queue behind them. They are passed over, not planned, so it is reached
        // at once instead of after working through everything fetched. Looked up every 256
        // records while the assignment holds, at every record once it is lost.
        if self.pending.len().is_multiple_of(256) && self.consumer.assignment_lost() {
            if !self.pending.is_empty() {
                tracing::info!(
                    records = self.pending.len(),
                    "assignment lost: records fetched before it are left to the next owner"
                );
            }
            self.pending.clear();
            self.deadline = None;
            return;
        }
        if self.pending.is_empty() {
            self.deadline = Some(Instant::now() + self.shape.linger);
        }
        self.pending.push(record);
    }

    /// Counts and logs a consumer error, then waits when waiting helps. A poll must come back
    /// soon whatever the error: librdkafka hands over a rebalance only to a poll, and after an
    /// outage the queue holds the errors reported during it ahead of the revocation. So a
    /// broker that cannot be reached (librdkafka reconnects by itself, and the next poll
    /// waits for the next event anyway) costs no wait at all; any other error backs off along
    /// the retry schedule, at most [`MAX_ERROR_WAIT`], so a lasting one does not spin.
    async fn error(&mut self, error: &KafkaError) {
        let code = error.rdkafka_error_code();
        let label = code.map_or_else(|| "client".to_string(), |c| format!("{c:?}"));
        metrics::counter!(m::CONSUMER_ERRORS_TOTAL, "stage" => self.group.clone(), "error" => label)
            .increment(1);
        self.errors_in_a_row += 1;
        let in_a_row = self.errors_in_a_row;
        let wait = error_wait(code, &self.policy, in_a_row);
        if in_a_row == 1 || in_a_row.is_multiple_of(100) {
            tracing::warn!(%error, in_a_row, ?wait, "consumer error; carrying on");
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The longest a consumer error holds the next poll.
const MAX_ERROR_WAIT: Duration = Duration::from_secs(1);

/// How long to wait after the `in_a_row`-th consumer error in a row, of code `code`.
fn error_wait(code: Option<RDKafkaErrorCode>, policy: &RetryPolicy, in_a_row: usize) -> Duration {
    use RDKafkaErrorCode as C;
    match code {
        Some(
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException,
        ) => Duration::ZERO,
        _ => policy.wait_forever(in_a_row).min(MAX_ERROR_WAIT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_broker_never_holds_the_poll_and_no_error_holds_it_long() {
        let policy = RetryPolicy::default();
        for n in [1, 2, 50, 10_000] {
            for code in [
                RDKafkaErrorCode::AllBrokersDown,
                RDKafkaErrorCode::BrokerTransportFailure,
                RDKafkaErrorCode::RequestTimedOut,
            ] {
                assert_eq!(error_wait(Some(code), &policy, n), Duration::ZERO);
            }
            let other = error_wait(Some(RDKafkaErrorCode::UnknownTopicOrPartition), &policy, n);
            assert!(!other.is_zero() && other <= MAX_ERROR_WAIT, "{other:?}");
            assert!(error_wait(None, &policy, n) <= MAX_ERROR_WAIT);
        }
        assert_eq!(
            error_wait(None, &policy, 1),
            Duration::from_millis(500),
            "the first wait follows the retry schedule"
        );
    }
}
