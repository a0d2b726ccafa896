//! What a worker counts: run totals, live progress and the outcome metrics, booked once per
//! landed flight (a record is counted when the broker has it, not when it is planned).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::flights::Flight;
use crate::clock::now_ms;
use crate::error::RecordFailure;
use crate::metrics as m;

/// Live counters of a running worker, for the local mode's progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub consumed: AtomicU64,
    pub produced: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// Counts of one run, for the caller and the local mode.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunTotals {
    pub consumed: u64,
    pub produced: u64,
    /// Records the dedup window dropped (redelivered events).
    pub duplicates: u64,
    /// Outputs and dead letters not produced again after a restart or rebalance.
    pub replayed: u64,
    pub dead_lettered: BTreeMap<String, u64>,
}

/// The highest input offset, per partition, whose outcome this process has booked. Kept
/// across revocations: a record at or below it that is read again (its partition given back
/// after a lost session or a rebalance, and consumed again from the last commit) was counted
/// already, so dropping it as a duplicate again is a replay, not a second duplicate. A record
/// another process counted before it crashed is not known here and is counted again.
#[derive(Debug, Default)]
pub(super) struct CountedThrough(HashMap<i32, i64>);

impl CountedThrough {
    /// Whether the outcome of the record at `offset` of `partition` was counted already.
    pub(super) fn already(&self, partition: i32, offset: i64) -> bool {
        self.0
            .get(&partition)
            .is_some_and(|&through| offset <= through)
    }

    /// Notes records whose outcomes are booked.
    pub(super) fn book(&mut self, records: impl IntoIterator<Item = (i32, i64)>) {
        for (partition, offset) in records {
            let through = self.0.entry(partition).or_insert(offset);
            *through = (*through).max(offset);
        }
    }
}

pub(super) struct Tally {
    pub(super) totals: RunTotals,
    pub(super) progress: Arc<Progress>,
    group: String,
    input_topic: String,
    output_topic: Option<String>,
}

impl Tally {
    pub(super) fn new(group: String, input_topic: String, output_topic: Option<String>) -> Self {
        Self {
            totals: RunTotals::default(),
            progress: Arc::new(Progress::default()),
            group,
            input_topic,
            output_topic,
        }
    }

    /// Totals, progress and metrics of a landed flight.
    pub(super) fn book(&mut self, flight: Flight) {
        let produced = match &self.output_topic {
            Some(topic) => flight.outgoing.iter().filter(|o| &o.topic == topic).count() as u64,
            None => 0,
        };
        for outgoing in &flight.outgoing {
            for (counter, n) in &outgoing.counts {
                counter.increment(*n);
            }
        }
        let b = flight.booking;
        self.totals.consumed += b.consumed;
        self.totals.produced += produced;
        self.totals.duplicates += b.duplicates;
        self.totals.replayed += b.replayed;
        self.progress.consumed.fetch_add(b.consumed, Relaxed);
        self.progress.produced.fetch_add(produced, Relaxed);
        self.progress.duplicates.fetch_add(b.duplicates, Relaxed);
        if let Some(topic) = self.output_topic.as_ref().filter(|_| produced > 0) {
            metrics::counter!(m::RECORDS_OUT_TOTAL, "stage" => self.group.clone(), "topic" => topic.clone()).increment(produced);
        }
        metrics::counter!(m::DUPLICATES_TOTAL, "stage" => self.group.clone(), "topic" => self.input_topic.clone())
            .increment(b.duplicates);
        metrics::counter!(m::REPLAYED_RECORDS_TOTAL, "stage" => self.group.clone(), "topic" => self.input_topic.clone())
            .increment(b.replayed);
        self.count_dead_letters(&b.dead);
        let now = now_ms();
        let latency = metrics::histogram!(m::EVENT_LATENCY_SECONDS, "stage" => self.group.clone());
        for t in &b.event_times {
            latency.record((now - t).max(0) as f64 / 1_000.0);
        }
    }

    /// Counts dead letters that were delivered: run totals, progress and the DLQ metric.
    fn count_dead_letters(&mut self, failures: &[RecordFailure]) {
        for failure in failures {
            *self
                .totals
                .dead_lettered
                .entry(failure.reason.clone())
                .or_default() += 1;
            metrics::counter!(m::DLQ_RECORDS_TOTAL, "stage" => self.group.clone(), "topic" => self.input_topic.clone(), "class" => failure.class.as_str(), "reason" => failure.reason.clone()).increment(1);
        }
        self.progress
            .dead_lettered
            .fetch_add(failures.len() as u64, Relaxed);
    }
}

#[cfg(test)]
mod counted_tests {
    use super::CountedThrough;

    #[test]
    fn a_record_read_again_up_to_the_highest_booked_offset_was_counted_already() {
        let mut counted = CountedThrough::default();
        assert!(!counted.already(0, 0), "nothing booked yet");
        counted.book([(0, 5), (0, 9), (1, 3)]);
        counted.book([(0, 7)]);
        assert!(counted.already(0, 0) && counted.already(0, 9));
        assert!(!counted.already(0, 10), "past what was booked");
        assert!(counted.already(1, 3) && !counted.already(1, 4));
        assert!(!counted.already(2, 0), "another partition");
    }
}
