//! The partition ledger: for each assigned input partition, the next offset to consume, the
//! flights of produced records still unacknowledged, the records whose outcome the stage
//! reports later, and the dedup window. It decides what may be committed: the ack frontier.
//!
//! Every batch (and every settle) becomes one *flight*: the records derived from it, produced
//! without waiting. For each input partition the flight touched, the ledger keeps a *step*:
//! the flight and the commit that becomes true once it has landed (the stage's position as it
//! was right after planning that batch, so a gold window closed by a later, unacknowledged
//! flight still holds its records). Flights land in any order; a partition's frontier is the
//! commit of the last step of its landed prefix, held back to the first record still deferred.
//! Revoking a partition is one `remove`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::dedup::DedupWindow;
use crate::kafka::FlightId;
use crate::record::Inbound;
use crate::recovery::Snapshot;

/// What may be committed for a partition once a step has landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Commit {
    pub(super) offset: i64,
    /// The stage's own metadata (see [`super::Stage::position`]).
    pub(super) metadata: Option<String>,
}

/// The commit point of a partition: the offset, the stage's metadata and where the outputs
/// stood before anything after that offset was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frontier {
    pub(super) commit: Commit,
    pub(super) outputs: Arc<Snapshot>,
}

#[derive(Debug)]
struct Step {
    flight: FlightId,
    commit: Commit,
    /// The acknowledged output positions just before the flight was launched.
    outputs_before: Arc<Snapshot>,
    landed: bool,
}

#[derive(Debug)]
struct Deferred {
    message: Inbound,
    /// The flight carrying its outcome (a dead letter, say); the hold ends when it lands.
    released_by: Option<FlightId>,
}

/// One input partition's state.
#[derive(Debug)]
pub(super) struct PartitionLedger {
    next_offset: Option<i64>,
    steps: VecDeque<Step>,
    /// The commit of the last landed step of the prefix.
    landed: Option<Commit>,
    /// Where the outputs stood before the first step after `landed` was launched.
    outputs_after_landed: Arc<Snapshot>,
    deferred: BTreeMap<i64, Deferred>,
    pub(super) window: DedupWindow,
}

impl PartitionLedger {
    fn new(window: DedupWindow) -> Self {
        Self {
            next_offset: None,
            steps: VecDeque::new(),
            landed: None,
            outputs_after_landed: Arc::new(Snapshot::default()),
            deferred: BTreeMap::new(),
            window,
        }
    }

    /// Moves `landed` over the prefix of landed steps.
    fn advance(&mut self) -> bool {
        let mut moved = false;
        while self.steps.front().is_some_and(|s| s.landed) {
            if let Some(step) = self.steps.pop_front() {
                self.landed = Some(step.commit);
                moved = true;
            }
        }
        if moved {
            if let Some(next) = self.steps.front() {
                self.outputs_after_landed = next.outputs_before.clone();
            }
        }
        moved
    }
}

/// The ledger of every assigned partition.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    partitions: BTreeMap<i32, PartitionLedger>,
    /// The partitions each unlanded flight has a step or a release in.
    flights: HashMap<FlightId, Vec<i32>>,
}

impl Ledger {
    /// Takes `partition` on, with its rebuilt dedup window.
    pub(super) fn assign(&mut self, partition: i32, window: DedupWindow) {
        self.partitions
            .insert(partition, PartitionLedger::new(window));
    }

    /// The partition went to another owner: everything the ledger held of it.
    pub(super) fn revoke(&mut self, partition: i32) -> Option<PartitionLedger> {
        self.partitions.remove(&partition)
    }

    pub(super) fn contains(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    pub(super) fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    pub(super) fn get(&self, partition: i32) -> Option<&PartitionLedger> {
        self.partitions.get(&partition)
    }

    pub(super) fn get_mut(&mut self, partition: i32) -> Option<&mut PartitionLedger> {
        self.partitions.get_mut(&partition)
    }

    /// Records that `offset` of `partition` was taken into a batch.
    pub(super) fn consumed(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.next_offset = Some(p.next_offset.map_or(offset + 1, |n| n.max(offset + 1)));
        }
    }

    /// The next offset to consume, once a record of `partition` was consumed.
    pub(super) fn next_offset(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).and_then(|p| p.next_offset)
    }

    /// `flight` carries what was derived from `partition` up to `commit`.
    pub(super) fn launched(
        &mut self,
        flight: FlightId,
        partition: i32,
        commit: Commit,
        outputs_before: Arc<Snapshot>,
    ) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        if p.steps.is_empty() {
            p.outputs_after_landed = outputs_before.clone();
        }
        p.steps.push_back(Step {
            flight,
            commit,
            outputs_before,
            landed: false,
        });
        self.flights.entry(flight).or_default().push(partition);
    }

    /// The commit the partition's last launched step makes true (or its landed one).
    pub(super) fn last_commit(&self, partition: i32) -> Option<&Commit> {
        let p = self.partitions.get(&partition)?;
        p.steps.back().map(|s| &s.commit).or(p.landed.as_ref())
    }

    /// Holds `offset` open until the stage reports its outcome.
    pub(super) fn defer(&mut self, partition: i32, offset: i64, message: Inbound) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.deferred.insert(
                offset,
                Deferred {
                    message,
                    released_by: None,
                },
            );
        }
    }

    /// The stage reported the outcome of a deferred record: the hold ends when `flight` (what
    /// the outcome produced) lands. Returns the record, once.
    pub(super) fn release(
        &mut self,
        partition: i32,
        offset: i64,
        flight: FlightId,
    ) -> Option<Inbound> {
        let d = self
            .partitions
            .get_mut(&partition)?
            .deferred
            .get_mut(&offset)?;
        if d.released_by.is_some() {
            return None;
        }
        d.released_by = Some(flight);
        self.flights.entry(flight).or_default().push(partition);
        Some(d.message.clone())
    }

    /// The deferred record at `offset`, if the stage has not reported it yet.
    pub(super) fn deferred(&self, partition: i32, offset: i64) -> Option<&Inbound> {
        self.partitions
            .get(&partition)?
            .deferred
            .get(&offset)
            .filter(|d| d.released_by.is_none())
            .map(|d| &d.message)
    }

    /// Every record of `flight` is acknowledged. Returns the partitions whose frontier may
    /// have moved.
    pub(super) fn landed(&mut self, flight: FlightId) -> Vec<i32> {
        let Some(partitions) = self.flights.remove(&flight) else {
            return Vec::new();
        };
        let mut moved = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let Some(p) = self.partitions.get_mut(&partition) else {
                continue;
            };
            for step in p.steps.iter_mut().filter(|s| s.flight == flight) {
                step.landed = true;
            }
            let before = p.deferred.len();
            p.deferred.retain(|_, d| d.released_by != Some(flight));
            if p.advance() || p.deferred.len() != before {
                moved.push(partition);
            }
        }
        moved.sort_unstable();
        moved.dedup();
        moved
    }

    /// `failed` landed with records refused; `retry` carries them again. Steps and releases
    /// waiting on `failed` now wait on `retry`.
    pub(super) fn relaunched(&mut self, failed: FlightId, retry: FlightId) {
        let Some(partitions) = self.flights.remove(&failed) else {
            return;
        };
        for &partition in &partitions {
            if let Some(p) = self.partitions.get_mut(&partition) {
                for step in p.steps.iter_mut().filter(|s| s.flight == failed) {
                    step.flight = retry;
                }
                for d in p.deferred.values_mut() {
                    if d.released_by == Some(failed) {
                        d.released_by = Some(retry);
                    }
                }
            }
        }
        self.flights.entry(retry).or_default().extend(partitions);
    }

    /// The flights `partition` waits on.
    pub(super) fn waiting_on(&self, partition: i32) -> Vec<FlightId> {
        self.flights
            .iter()
            .filter(|(_, ps)| ps.contains(&partition))
            .map(|(f, _)| *f)
            .collect()
    }

    /// What may be committed for `partition`: the commit of its landed prefix, held back to
    /// the first record whose outcome has not landed. `None` before anything landed.
    pub(super) fn frontier(&self, partition: i32) -> Option<Frontier> {
        let p = self.partitions.get(&partition)?;
        let mut commit = p.landed.clone()?;
        if let Some(&first) = p.deferred.keys().next() {
            commit.offset = commit.offset.min(first);
        }
        Some(Frontier {
            commit,
            outputs: p.outputs_after_landed.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn message(partition: i32, offset: i64) -> Inbound {
        Inbound::new(
            "in",
            partition,
            offset,
            Timestamp::NotAvailable,
            None,
            Some(vec![1]),
            None,
        )
    }

    fn commit(offset: i64) -> Commit {
        Commit {
            offset,
            metadata: None,
        }
    }

    fn ledger(partitions: &[i32]) -> Ledger {
        let mut l = Ledger::default();
        for &p in partitions {
            l.assign(p, DedupWindow::new(16));
        }
        l
    }

    fn offset(l: &Ledger, p: i32) -> Option<i64> {
        l.frontier(p).map(|f| f.commit.offset)
    }

    fn snapshot(at: i64) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            output: [(0, at)].into_iter().collect(),
            dlq: BTreeMap::new(),
        })
    }

    #[test]
    fn the_frontier_never_passes_an_unlanded_flight() {
        let mut l = ledger(&[0]);
        l.launched(1, 0, commit(10), snapshot(0));
        l.launched(2, 0, commit(20), snapshot(5));
        l.launched(3, 0, commit(30), snapshot(9));
        assert_eq!(offset(&l, 0), None);
        // Flight 2 lands first: nothing may be committed while flight 1 is out.
        assert!(l.landed(2).is_empty());
        assert_eq!(offset(&l, 0), None);
        assert_eq!(l.landed(1), vec![0]);
        assert_eq!(offset(&l, 0), Some(20));
        // The outputs to scan after offset 20 start where they stood before flight 3 left.
        assert_eq!(l.frontier(0).map(|f| f.outputs), Some(snapshot(9)));
        l.landed(3);
        assert_eq!(offset(&l, 0), Some(30));
    }

    #[test]
    fn partitions_of_one_flight_advance_independently() {
        let mut l = ledger(&[0, 1]);
        l.launched(1, 0, commit(10), snapshot(0));
        l.launched(1, 1, commit(100), snapshot(0));
        l.launched(2, 1, commit(200), snapshot(3));
        assert_eq!(l.landed(1), vec![0, 1]);
        assert_eq!((offset(&l, 0), offset(&l, 1)), (Some(10), Some(100)));
        assert_eq!(l.waiting_on(1), vec![2]);
        assert!(l.waiting_on(0).is_empty());
    }

    #[test]
    fn the_commit_is_the_stages_position_at_planning_not_the_latest() {
        // A stateful stage held its commit at 5 after the first batch (an open window) and
        // released it to 40 after the second: while the second flight is out, 5 stands.
        let mut l = ledger(&[0]);
        l.launched(1, 0, commit(5), snapshot(0));
        l.launched(2, 0, commit(40), snapshot(0));
        l.landed(1);
        assert_eq!(offset(&l, 0), Some(5));
    }

    #[test]
    fn a_deferred_record_holds_the_frontier_until_its_outcome_lands() {
        let mut l = ledger(&[0]);
        l.consumed(0, 7);
        l.defer(0, 7, message(0, 7));
        l.launched(1, 0, commit(8), snapshot(0));
        l.landed(1);
        assert_eq!(offset(&l, 0), Some(7));
        assert!(l.deferred(0, 7).is_some());
        // The outcome (a dead letter) goes out in flight 2; until it lands, 7 is held.
        assert!(l.release(0, 7, 2).is_some());
        assert!(l.release(0, 7, 2).is_none(), "released once");
        assert!(l.deferred(0, 7).is_none());
        assert_eq!(offset(&l, 0), Some(7));
        assert_eq!(l.landed(2), vec![0]);
        assert_eq!(offset(&l, 0), Some(8));
    }

    #[test]
    fn a_relaunched_flight_carries_its_steps_and_releases() {
        let mut l = ledger(&[0]);
        l.defer(0, 3, message(0, 3));
        l.launched(1, 0, commit(4), snapshot(0));
        l.release(0, 3, 1);
        l.relaunched(1, 9);
        assert!(l.landed(1).is_empty(), "the failed flight no longer counts");
        assert_eq!(offset(&l, 0), None);
        l.landed(9);
        assert_eq!(offset(&l, 0), Some(4));
    }

    #[test]
    fn revoking_drops_everything_of_the_partition_in_one_remove() {
        let mut l = ledger(&[0, 1]);
        l.consumed(0, 41);
        if let Some(p) = l.get_mut(0) {
            p.window.insert(7);
        }
        l.launched(1, 0, commit(42), snapshot(0));
        l.launched(1, 1, commit(9), snapshot(0));
        let gone = l.revoke(0).expect("was assigned");
        assert!(gone.window.contains(7));
        assert!(!l.contains(0));
        // The flight still lands for the partition that stayed.
        assert_eq!(l.landed(1), vec![1]);
        assert_eq!(offset(&l, 1), Some(9));
        assert_eq!(l.next_offset(0), None);
    }

    #[test]
    fn consumed_offsets_only_move_forward() {
        let mut l = ledger(&[0]);
        l.consumed(0, 10);
        l.consumed(0, 4);
        assert_eq!(l.next_offset(0), Some(11));
        l.consumed(5, 1);
        assert_eq!(
            l.next_offset(5),
            None,
            "an unassigned partition is not tracked"
        );
    }

    proptest::proptest! {
        /// Flights over three partitions land in a random order: each partition's frontier is
        /// always the commit of its longest fully landed prefix, never more.
        #[test]
        fn the_frontier_is_the_longest_landed_prefix(
            touches in proptest::collection::vec(proptest::collection::btree_set(0i32..3, 1..3), 1..30),
            order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 30),
        ) {
            let mut l = ledger(&[0, 1, 2]);
            // Flight f (1-based) touches some partitions, with commit 10·f.
            for (i, ps) in touches.iter().enumerate() {
                let f = i as FlightId + 1;
                for &p in ps {
                    l.launched(f, p, commit(10 * i64::from(f)), snapshot(0));
                }
            }
            let mut out: Vec<FlightId> = (1..=touches.len() as FlightId).collect();
            let mut landed = std::collections::HashSet::new();
            for pick in order.iter().take(touches.len()) {
                let f = out.remove(pick.index(out.len()));
                l.landed(f);
                landed.insert(f);
                for p in 0..3 {
                    let mut expect = None;
                    for (i, ps) in touches.iter().enumerate() {
                        let f = i as FlightId + 1;
                        if !ps.contains(&p) {
                            continue;
                        }
                        if !landed.contains(&f) {
                            break;
                        }
                        expect = Some(10 * i64::from(f));
                    }
                    proptest::prop_assert_eq!(offset(&l, p), expect);
                }
            }
        }
    }
}
