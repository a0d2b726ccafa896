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

use rdkafka::message::Message;

use super::fair::{Claim, Org};
use crate::dedup::DedupWindow;
use crate::kafka::FlightId;
use crate::progress::Progress;
use crate::record::Inbound;
use crate::recovery::Snapshot;

/// What may be committed for a partition once a step has landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Commit {
    pub(super) offset: i64,
    /// The stage's own metadata (see [`super::Stage::position`]).
    pub(super) metadata: Option<String>,
}

/// What a step of a partition covers, as the worker booked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Booked {
    pub(super) commit: Commit,
    /// The lowest offset not taken into a batch when it was booked (what the stage was asked
    /// to position itself at); a commit below it is the stage's own hold.
    pub(super) floor: i64,
    /// Per org, the first offset of the records it carries.
    pub(super) open: Vec<(Org, i64)>,
    /// The highest offset it carries.
    pub(super) reach: Option<i64>,
}

impl Booked {
    /// A step carrying no record of the partition, only its position.
    pub(super) fn position(commit: Commit, floor: i64) -> Self {
        Self {
            commit,
            floor,
            open: Vec::new(),
            reach: None,
        }
    }
}

/// The commit point of a partition: the offset, the stage's metadata, what is done beyond the
/// offset, and where the outputs stood before anything not claimed done was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frontier {
    pub(super) commit: Commit,
    pub(super) outputs: Arc<Snapshot>,
    pub(super) progress: Option<Progress>,
}

#[derive(Debug)]
struct Step {
    flight: FlightId,
    commit: Commit,
    floor: i64,
    open: Vec<(Org, i64)>,
    seq: u64,
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
    /// The launch sequence of that step.
    outputs_after_landed_seq: u64,
    deferred: BTreeMap<i64, Deferred>,
    pub(super) window: DedupWindow,
    /// The floor the landed commit was booked at.
    landed_floor: Option<i64>,
    /// The lowest offset not taken into a batch yet.
    floor: Option<i64>,
    /// What the scheduler last knew of the partition beyond its floor.
    claim: Option<Claim>,
    /// Steps that carried a record past every earlier step's: (reach, launch sequence,
    /// outputs before it), reach increasing. The earliest step that carried a record at or
    /// past an offset is found here.
    highs: VecDeque<(i64, u64, Arc<Snapshot>)>,
    /// Where the outputs stood by the partition's last owner's commit, and the input's end when
    /// this owner took the partition over (see [`Ledger::inherit`]).
    inherited: Option<(i64, Arc<Snapshot>)>,
    /// What the last owner's commit claimed done beyond its offset.
    claimed_before: Option<Progress>,
}

impl PartitionLedger {
    fn new(window: DedupWindow) -> Self {
        Self {
            next_offset: None,
            steps: VecDeque::new(),
            landed: None,
            outputs_after_landed: Arc::new(Snapshot::default()),
            outputs_after_landed_seq: 0,
            deferred: BTreeMap::new(),
            window,
            landed_floor: None,
            floor: None,
            claim: None,
            highs: VecDeque::new(),
            inherited: None,
            claimed_before: None,
        }
    }

    /// Moves `landed` over the prefix of landed steps.
    fn advance(&mut self) -> bool {
        let mut moved = false;
        while self.steps.front().is_some_and(|s| s.landed) {
            if let Some(step) = self.steps.pop_front() {
                self.landed = Some(step.commit);
                self.landed_floor = Some(step.floor);
                moved = true;
            }
        }
        if let Some(landed) = &self.landed {
            while self.highs.front().is_some_and(|h| h.0 < landed.offset) {
                self.highs.pop_front();
            }
        }
        if moved {
            if let Some(next) = self.steps.front() {
                self.outputs_after_landed = next.outputs_before.clone();
                self.outputs_after_landed_seq = next.seq;
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
    steps: u64,
}

impl Ledger {
    /// Takes `partition` on, with its rebuilt dedup window.
    pub(super) fn assign(&mut self, partition: i32, window: DedupWindow) {
        self.partitions
            .insert(partition, PartitionLedger::new(window));
    }

    /// The partition was taken over with its last owner's commit saying where the outputs
    /// stood (`restored`; an empty snapshot where it said nothing), the input ending at `end`.
    /// The last owner may have done records anywhere below `end`, out of log order, and those
    /// this owner reads again are dropped as duplicates, not produced: their outputs are older
    /// than anything this owner launched, and such a record may still be open (its batch out)
    /// anywhere below `end`. Until this owner's commit passes `end`, its snapshot is no later
    /// than `restored`, so a restart reads those outputs back too.
    /// `claimed`, what that commit said was done beyond its offset, stays claimed by this
    /// owner's commits until they pass it.
    pub(super) fn inherit(
        &mut self,
        partition: i32,
        end: i64,
        restored: Arc<Snapshot>,
        claimed: Option<Progress>,
    ) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.inherited = Some((end, restored));
            p.claimed_before = claimed;
        }
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
    #[cfg(test)]
    pub(super) fn next_offset(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).and_then(|p| p.next_offset)
    }

    /// The lowest offset of `partition` not taken into a batch yet, as the scheduler last
    /// said (records are taken out of log order: the next offset consumed is not it).
    pub(super) fn set_floor(&mut self, partition: i32, floor: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.floor = Some(floor);
        }
    }

    /// What the stage is positioned at: the floor, or before any, the next offset consumed.
    pub(super) fn position_offset(&self, partition: i32) -> Option<i64> {
        let p = self.partitions.get(&partition)?;
        p.floor.or(p.next_offset)
    }

    /// What the scheduler knows of `partition` beyond its floor now (see [`Claim`]).
    pub(super) fn claimed(&mut self, partition: i32, claim: Claim) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.claim = Some(claim);
        }
    }

    /// `flight` carries what was derived from `partition` up to `booked.commit`.
    pub(super) fn launched(
        &mut self,
        flight: FlightId,
        partition: i32,
        booked: Booked,
        outputs_before: Arc<Snapshot>,
    ) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        self.steps += 1;
        let seq = self.steps;
        if p.steps.is_empty() {
            p.outputs_after_landed = outputs_before.clone();
            p.outputs_after_landed_seq = seq;
        }
        if let Some(reach) = booked.reach {
            if p.highs.back().is_none_or(|h| reach > h.0) {
                p.highs.push_back((reach, seq, outputs_before.clone()));
            }
        }
        p.steps.push_back(Step {
            flight,
            commit: booked.commit,
            floor: booked.floor,
            open: booked.open,
            seq,
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

    /// Gives every idle partition (everything it took has landed, its commit is not held
    /// back by the stage, nothing is deferred) `outputs` as where its outputs stand: nothing
    /// of it is in flight, so nothing it produced lies beyond them. A restart then scans the
    /// outputs from there, not from before its last step: a partition drained long ago would
    /// otherwise send every restart and rebalance to the last `window` records of each output
    /// partition, whatever the others' snapshots say. Returns the partitions whose snapshot
    /// changed.
    pub(super) fn refresh_idle(&mut self, outputs: &Arc<Snapshot>) -> Vec<i32> {
        let mut changed = Vec::new();
        for (&partition, p) in self.partitions.iter_mut() {
            let idle = p.steps.is_empty()
                && p.deferred.is_empty()
                && p.landed
                    .as_ref()
                    .zip(p.next_offset)
                    .is_some_and(|(landed, next)| landed.offset >= next);
            if idle && *p.outputs_after_landed != **outputs {
                p.outputs_after_landed = outputs.clone();
                p.outputs_after_landed_seq = self.steps;
                changed.push(partition);
            }
        }
        changed
    }

    /// What may be committed for `partition`: the commit of its landed prefix, held back to
    /// the first record whose outcome has not landed, with what is done beyond it (none when
    /// the stage holds its commit back itself: it reads those records again to rebuild its
    /// state). The outputs snapshot precedes every output of a record not claimed done.
    /// `None` before anything landed.
    pub(super) fn frontier(&self, partition: i32) -> Option<Frontier> {
        let p = self.partitions.get(&partition)?;
        let mut commit = p.landed.clone()?;
        let held_by_stage = p.landed_floor.is_some_and(|f| commit.offset < f);
        if let Some(&first) = p.deferred.keys().next() {
            commit.offset = commit.offset.min(first);
        }
        let progress = match (&p.claim, held_by_stage) {
            (Some(claim), false) => {
                let mut open = claim.open.clone();
                let steps = p.steps.iter().filter(|s| !s.landed);
                let waiting =
                    steps
                        .flat_map(|s| s.open.iter().cloned())
                        .chain(p.deferred.values().map(|d| {
                            let org = d.message.key().map(<[u8]>::to_vec).unwrap_or_default();
                            (org, d.message.offset())
                        }));
                for (org, from) in waiting {
                    let e = open.entry(org).or_insert(from);
                    *e = (*e).min(from);
                }
                Some(Progress::new(commit.offset, claim.through, open))
                    .filter(Progress::claims_anything)
            }
            _ => None,
        };
        // What the last owner's commit said was done stays claimed until the commit passes it:
        // records this owner passed over are in none of its own batches.
        let progress = match (&p.claimed_before, held_by_stage) {
            (Some(before), false) if before.through > commit.offset => {
                let own =
                    progress.unwrap_or_else(|| Progress::new(commit.offset, commit.offset, []));
                Some(own.union(before)).filter(Progress::claims_anything)
            }
            _ => progress,
        };
        // Records from here on are read again: the outputs are scanned from before the first
        // step that carried any of them, or the first step not landed, whichever came first.
        let unclaimed = progress.as_ref().map_or(commit.offset, |g| g.through);
        let idx = p.highs.partition_point(|h| h.0 < unclaimed);
        let outputs = match (p.highs.get(idx), &p.inherited) {
            (_, Some((end, restored))) if commit.offset < *end => restored.clone(),
            (Some(h), _) if h.1 < p.outputs_after_landed_seq => h.2.clone(),
            _ => p.outputs_after_landed.clone(),
        };
        Some(Frontier {
            commit,
            outputs,
            progress,
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

    fn commit(offset: i64) -> Booked {
        Booked::position(
            Commit {
                offset,
                metadata: None,
            },
            offset,
        )
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
    fn a_taken_over_partition_keeps_its_last_owners_snapshot_until_it_has_passed_the_inputs_end() {
        // Taken over with the input ending at 50 and the last owner's outputs at 3: records
        // below 50 read again may have been produced by the last owner, before anything here.
        let mut l = ledger(&[0]);
        l.inherit(0, 50, snapshot(3), None);
        l.consumed(0, 19);
        l.launched(1, 0, commit(20), snapshot(7));
        l.launched(2, 0, commit(50), snapshot(8));
        l.landed(1);
        assert_eq!(offset(&l, 0), Some(20));
        assert_eq!(l.frontier(0).map(|f| f.outputs), Some(snapshot(3)));
        // Past the input's end as it was: this owner's own snapshot again.
        l.consumed(0, 49);
        l.landed(2);
        assert_eq!(offset(&l, 0), Some(50));
        assert_eq!(l.frontier(0).map(|f| f.outputs), Some(snapshot(8)));
    }

    #[test]
    fn what_the_last_owner_claimed_stays_claimed_until_the_commit_passes_it() {
        // The last owner committed 10 and had done everything up to 100 but org a's records
        // from 10: this owner passes those over, so none of its batches carries them.
        let mut l = ledger(&[0]);
        let before = Progress::new(10, 100, [(b"a".to_vec(), 10)]);
        l.inherit(0, 100, snapshot(3), Some(before));
        l.consumed(0, 19);
        l.launched(1, 0, commit(20), snapshot(7));
        l.landed(1);
        let progress = l.frontier(0).and_then(|f| f.progress).expect("claims");
        assert_eq!((progress.base, progress.through), (20, 100));
        assert!(
            progress.is_done(b"b", 60),
            "the last owner's claim carried on"
        );
        assert!(!progress.is_done(b"a", 60));
    }

    #[test]
    fn only_a_partition_with_nothing_out_takes_the_outputs_as_they_stand() {
        // 0: everything taken has landed. 1: a flight still out. 2: landed, but the stage holds
        // its commit at 5 (records from 5 on are read again, their outputs after snapshot(1)).
        // 3: nothing landed yet.
        let mut l = ledger(&[0, 1, 2, 3]);
        for (p, taken) in [(0, 9), (1, 19), (2, 29)] {
            l.consumed(p, taken);
        }
        l.launched(1, 0, commit(10), snapshot(1));
        l.launched(1, 1, commit(20), snapshot(1));
        l.launched(2, 1, commit(20), snapshot(2));
        l.launched(
            1,
            2,
            Booked::position(
                Commit {
                    offset: 5,
                    metadata: None,
                },
                30,
            ),
            snapshot(1),
        );
        l.landed(1);
        assert_eq!(l.refresh_idle(&snapshot(7)), vec![0]);
        assert_eq!(l.frontier(0).map(|f| f.outputs), Some(snapshot(7)));
        assert_eq!(l.frontier(1).map(|f| f.outputs), Some(snapshot(2)));
        assert_eq!(l.frontier(2).map(|f| f.outputs), Some(snapshot(1)));
        assert_eq!(l.frontier(3), None);
        // Unchanged: nothing to store again. Partition 1 idle once its last flight landed.
        assert!(l.refresh_idle(&snapshot(7)).is_empty());
        l.landed(2);
        assert_eq!(l.refresh_idle(&snapshot(8)), vec![0, 1]);
        assert_eq!(
            l.frontier(1).map(|f| (f.commit.offset, f.outputs)),
            Some((20, snapshot(8)))
        );
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
            p.window.insert(7, 0);
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

    fn step(commit_at: i64, floor: i64, open: &[(&str, i64)], reach: i64) -> Booked {
        Booked {
            commit: Commit {
                offset: commit_at,
                metadata: None,
            },
            floor,
            open: open
                .iter()
                .map(|(o, f)| (o.as_bytes().to_vec(), *f))
                .collect(),
            reach: Some(reach),
        }
    }

    fn claim(floor: i64, through: i64, open: &[(&str, i64)]) -> Claim {
        Claim {
            floor,
            through,
            open: open
                .iter()
                .map(|(o, f)| (o.as_bytes().to_vec(), *f))
                .collect(),
        }
    }

    #[test]
    fn the_frontier_claims_what_landed_past_the_commit_and_nothing_still_in_flight() {
        let mut l = ledger(&[0]);
        // Org a is held back at 10 (passed over); b's records 50.. and c's 70.. went out.
        l.claimed(0, claim(10, 100, &[("a", 10)]));
        l.launched(1, 0, step(10, 10, &[("b", 50)], 60), snapshot(0));
        l.launched(2, 0, step(10, 10, &[("c", 70)], 80), snapshot(5));
        l.landed(1);
        let f = l.frontier(0).expect("landed");
        assert_eq!(f.commit.offset, 10);
        let done = f.progress.expect("progress");
        assert_eq!((done.base, done.through), (10, 100));
        assert!(done.is_done(b"b", 55), "b's flight landed");
        assert!(!done.is_done(b"c", 75), "c's flight is still out");
        assert!(!done.is_done(b"a", 20), "a is held back");
        assert!(done.is_done(b"z", 99) && !done.is_done(b"z", 100));
        // Read again from the commit: c's records, whose outputs came after flight 2 left.
        assert_eq!(f.outputs, snapshot(5));
        l.landed(2);
        let done = l.frontier(0).and_then(|f| f.progress).expect("progress");
        assert!(done.is_done(b"c", 75));
        assert_eq!(done.open.len(), 1);
    }

    #[test]
    fn a_stage_holding_its_commit_back_gets_no_progress_and_the_outputs_of_every_record_past_it() {
        let mut l = ledger(&[0]);
        l.claimed(0, claim(40, 50, &[]));
        // The stage keeps its commit at 5 (an open window) though everything below 40 was taken.
        l.launched(1, 0, step(5, 40, &[("a", 0)], 39), snapshot(0));
        l.launched(2, 0, step(5, 50, &[("a", 40)], 49), snapshot(7));
        l.landed(1);
        l.landed(2);
        let f = l.frontier(0).expect("landed");
        assert_eq!((f.commit.offset, f.progress), (5, None));
        assert_eq!(
            f.outputs,
            snapshot(0),
            "records from 5 are read again: their outputs from flight 1 on are scanned"
        );
    }

    #[test]
    fn records_taken_out_of_order_are_scanned_for_from_the_first_flight_that_carried_one() {
        // No claim (where no progress can be recorded): the commit is held at 20 by org a,
        // while b's records 30..60 went out first, in flight 1.
        let mut l = ledger(&[0]);
        l.launched(1, 0, step(20, 20, &[("b", 30)], 60), snapshot(0));
        l.launched(2, 0, step(61, 61, &[("a", 20)], 29), snapshot(3));
        l.landed(1);
        let f = l.frontier(0).expect("landed");
        assert_eq!((f.commit.offset, f.outputs), (20, snapshot(0)));
        l.landed(2);
        let f = l.frontier(0).expect("landed");
        assert_eq!(f.commit.offset, 61);
        assert_eq!(f.progress, None);
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
