//! Fair scheduling of a worker's input across the orgs that share a partition.
//!
//! Partitioning by org promises only per-org order, so the worker need not take a partition in
//! log order. Records are queued per *flow* (partition, org: the record key) and each batch is
//! cut by deficit round robin over the flows that have records: every visit a flow may take
//! `quantum × weight` records more, so a batch holds several orgs' quanta and an org with a
//! backlog gets its share, not the whole worker.
//!
//! Reading is bounded per partition and per org, and the bound of one never stops the others:
//!
//! - **The head reader** (the group consumer) reads each partition in log order. A flow whose
//!   queue is full is *detached* at the record that found it full: its records from there on
//!   are passed over by the head, which keeps reading for the other orgs of the partition.
//! - **The catch-up reader** (a consumer of its own, partition by partition) reads a partition
//!   again from its earliest detached record and queues only detached flows' records, at the
//!   pace their queues drain: the hot org gets the worker's capacity that is left, from the
//!   log, without any copy of its backlog. When it has delivered the record before the head
//!   (or the head's own, in order), the flows are attached again and the head takes their
//!   records as before. Only records it delivers count: never where it says it stands, which
//!   can be left from an earlier assignment.
//! - The head of a partition is paused only when that partition's read-ahead (records, bytes,
//!   or its distance past the lowest record not done) is full.
//!
//! What may be committed is the lowest offset not done: a partition's [`Scheduler::floor`] (its
//! earliest queued or detached record, or the head) held back further by the flights the ledger
//! still waits for. What is done beyond the floor is described by [`Scheduler::exceptions`]: per
//! org, the first offset not done, so a restart passes over the rest ([`crate::progress`]).
//!
//! Pure: no Kafka, no clock. The batch source feeds it and applies what it asks for (pausing,
//! the catch-up reader's assignment).

use std::collections::{BTreeMap, HashMap, VecDeque};

use rdkafka::message::Message;

use crate::progress::Progress;
use crate::record::Inbound;

/// An org: the key its records carry (records without a key form one flow).
pub(super) type Org = Vec<u8>;

/// How the scheduler shares a worker among orgs.
#[derive(Debug, Clone)]
pub(super) struct FairShape {
    /// Off: one flow per partition, taken in log order (the behaviour before fair scheduling).
    pub(super) enabled: bool,
    /// Records a flow may take per visit of the round robin (times its weight).
    pub(super) quantum: usize,
    /// Records queued for one org before the head passes its records over, if the org
    /// dominates what the head reads (`read_past_percent`); otherwise its queue may grow up to
    /// the partition's read-ahead, and the head pauses there as in log order.
    pub(super) org_read_ahead: usize,
    /// The share (percent) of the records the head read since the org's queue began that the
    /// org must exceed to be read past: an org flooding its partition is, one among others in
    /// a backlog of all of them is not (reading past it would read most of the log twice for
    /// little gain: the others are behind on their own).
    pub(super) read_past_percent: u8,
    /// Records queued for one partition before its head is paused.
    pub(super) read_ahead_records: usize,
    /// Bytes queued for one partition before its head is paused.
    pub(super) read_ahead_bytes: usize,
    /// How far the head may run past the lowest record not done, in offsets; where the broker
    /// keeps commit metadata ([`Self::claims_kept`]), past what the recorded progress claims.
    pub(super) max_skip_ahead: i64,
    /// The broker keeps commit metadata, so what the progress claims is passed over after a
    /// restart: only done records beyond the claim are read again (and dropped by dedup).
    pub(super) claims_kept: bool,
    /// Weights of orgs (default 1).
    pub(super) weights: HashMap<Org, u32>,
}

impl FairShape {
    /// The shape the `fairness` section describes; `dedup_window` bounds the skip-ahead when
    /// the section does not.
    pub(super) fn from_config(f: &crate::config::FairnessConfig, dedup_window: usize) -> Self {
        Self {
            enabled: f.enabled,
            quantum: f.quantum,
            org_read_ahead: f.org_read_ahead,
            read_past_percent: f.read_past_percent,
            read_ahead_records: f.read_ahead_records,
            read_ahead_bytes: f.read_ahead_mib.saturating_mul(1 << 20),
            max_skip_ahead: f
                .max_skip_ahead
                .unwrap_or(i64::try_from(dedup_window).unwrap_or(i64::MAX)),
            claims_kept: false,
            weights: f
                .weights
                .iter()
                .map(|(org, w)| (org.as_bytes().to_vec(), *w))
                .collect(),
        }
    }
}

impl Default for FairShape {
    fn default() -> Self {
        Self::from_config(&crate::config::FairnessConfig::default(), 100_000)
    }
}

#[derive(Debug, Default)]
struct Flow {
    queue: VecDeque<Inbound>,
    bytes: usize,
    deficit: usize,
    /// Records of the org from this offset up to the head are not queued: the catch-up reader
    /// brings them.
    detached_from: Option<i64>,
    /// In the round robin (it has queued records).
    in_round: bool,
    /// The lane's head reads when the flow began, and the flow's own since (its share of
    /// what the head read).
    since: u64,
    head_reads: u64,
}

impl Flow {
    /// The first offset of the org not done: its first queued or detached record.
    fn first_open(&self) -> Option<i64> {
        let queued = self.queue.front().map(Message::offset);
        match (queued, self.detached_from) {
            (Some(q), Some(d)) => Some(q.min(d)),
            (q, d) => q.or(d),
        }
    }
}

/// What [`Scheduler::claim`] knows of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Claim {
    /// The lowest offset not taken into a batch.
    pub(super) floor: i64,
    pub(super) through: i64,
    /// Per org, the first offset below `through` not taken into a batch.
    pub(super) open: HashMap<Org, i64>,
}

/// What a partition's readers should do, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Readers {
    pub(super) head_paused: bool,
    /// Where the catch-up reader reads, and since which (re)start: a new `epoch` means seek.
    pub(super) catch_up: Option<CatchUp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CatchUp {
    pub(super) from: i64,
    pub(super) epoch: u64,
    pub(super) paused: bool,
}

#[derive(Debug, Default)]
struct Lane {
    /// The next offset the head reader delivers; `None` before its first record.
    head: Option<i64>,
    flows: HashMap<Org, Flow>,
    records: usize,
    bytes: usize,
    /// The catch-up reader's next offset, while a flow is detached.
    catch_up: Option<i64>,
    catch_up_epoch: u64,
    catch_up_paused: bool,
    /// Where the catch-up reader last found a record out of place, and how often.
    catch_up_gap: Option<i64>,
    catch_up_gap_seen: u32,
    head_paused: bool,
    /// Done records to pass over: the progress restored at assignment.
    done: Option<Progress>,
    /// Records passed over as done since the last [`Scheduler::take_passed`].
    passed: u64,
    /// Records the head delivered (the clock of the flows' shares).
    head_reads: u64,
}

impl Lane {
    fn floor(&self) -> Option<i64> {
        let head = self.head?;
        Some(
            self.flows
                .values()
                .filter_map(Flow::first_open)
                .fold(head, i64::min),
        )
    }

    /// A full read-ahead pauses the head; it resumes below half of every bound.
    fn head_full(&self, shape: &FairShape, hysteresis: bool) -> bool {
        let (records, bytes, skip) = if hysteresis {
            (
                shape.read_ahead_records / 2,
                shape.read_ahead_bytes / 2,
                shape.max_skip_ahead / 2,
            )
        } else {
            (
                shape.read_ahead_records,
                shape.read_ahead_bytes,
                shape.max_skip_ahead,
            )
        };
        let skipped = match (self.head, self.floor()) {
            // Measured from what a restart would read again: the floor where the broker drops
            // commit metadata; where it keeps it, what the progress cannot claim (only when the
            // floor alone is over the bound: the claim costs a pass over the open orgs).
            (Some(h), Some(f)) if shape.claims_kept && h - f >= skip.max(1) => {
                h - self.claim_through(h, f)
            }
            (Some(h), Some(f)) => h - f,
            _ => 0,
        };
        self.records >= records.max(1) || self.bytes >= bytes.max(1) || skipped >= skip.max(1)
    }

    /// How far a progress recorded now would claim, from `floor` up to `head`: bounded by
    /// the encoded size, which the orgs still open take ([`Progress::new`]).
    fn claim_through(&self, head: i64, floor: i64) -> i64 {
        Progress::new(floor, head, self.open_orgs()).through
    }

    /// Each org with a record not taken into a batch, and its first such offset.
    fn open_orgs(&self) -> impl Iterator<Item = (Org, i64)> + '_ {
        self.flows
            .iter()
            .filter_map(|(org, f)| f.first_open().map(|o| (org.clone(), o)))
    }

    /// A detached flow with a full queue pauses the catch-up reader.
    fn catch_up_full(&self, shape: &FairShape, hysteresis: bool) -> bool {
        let limit = if hysteresis {
            shape.org_read_ahead / 2
        } else {
            shape.org_read_ahead
        };
        self.flows
            .values()
            .any(|f| f.detached_from.is_some() && f.queue.len() >= limit.max(1))
    }
}

/// Per-org queues of every assigned partition and the round robin over them.
#[derive(Debug)]
pub(super) struct Scheduler {
    shape: FairShape,
    lanes: BTreeMap<i32, Lane>,
    /// Flows with queued records, in round-robin order; the front is being visited.
    round: VecDeque<(i32, Org)>,
    /// The front flow got its quantum for this visit.
    visiting: bool,
    queued: usize,
    epochs: u64,
}

/// How a record offered by a reader was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    Queued,
    /// Done before (restored progress): passed over.
    Done,
    /// Its org is detached (the catch-up reader brings it), or it is not the catch-up reader's.
    Passed,
    /// Seen already (a reader delivered it twice).
    Stale,
}

impl Scheduler {
    pub(super) fn new(shape: FairShape) -> Self {
        Self {
            shape,
            lanes: BTreeMap::new(),
            round: VecDeque::new(),
            visiting: false,
            queued: 0,
            epochs: 0,
        }
    }

    pub(super) fn shape(&self) -> &FairShape {
        &self.shape
    }

    /// Whether the broker keeps commit metadata (see [`FairShape::claims_kept`]).
    pub(super) fn set_claims_kept(&mut self, kept: bool) {
        if self.shape.claims_kept != kept {
            tracing::info!(
                kept,
                "commit metadata kept by the broker: the head's read-ahead is bounded by what it cannot claim"
            );
        }
        self.shape.claims_kept = kept;
    }

    /// Takes `partition` on, passing over what `done` says was done. Where `done` claims
    /// records past the committed offset, returns where the head should read from (the
    /// claim's end, `through`): the orgs it names open start detached from their first open
    /// record, so the catch-up reader brings theirs and nothing done is read again. A head
    /// that reads from the committed offset anyway (its seek failed) finds what is below
    /// `through` stale, which is as right, only slower.
    pub(super) fn assign(&mut self, partition: i32, done: Option<Progress>) -> Option<i64> {
        self.revoke(partition);
        let mut lane = Lane {
            done,
            ..Lane::default()
        };
        let start = lane
            .done
            .as_ref()
            .filter(|d| self.shape.enabled && d.through > d.base)
            .map(|d| d.through);
        if let (Some(through), Some(done)) = (start, lane.done.as_ref()) {
            lane.head = Some(through);
            for (org, from) in done.open.iter().filter(|(_, from)| **from < through) {
                lane.flows.insert(
                    org.clone(),
                    Flow {
                        detached_from: Some(*from),
                        ..Flow::default()
                    },
                );
            }
            if let Some(first) = lane.flows.values().filter_map(|f| f.detached_from).min() {
                lane.catch_up = Some(first);
                self.epochs += 1;
                lane.catch_up_epoch = self.epochs;
            }
        }
        self.lanes.insert(partition, lane);
        start
    }

    /// Drops everything queued of `partition` (its next owner reads it again).
    pub(super) fn revoke(&mut self, partition: i32) {
        if let Some(lane) = self.lanes.remove(&partition) {
            self.queued -= lane.records;
            let front = self.round.front().map(|(p, _)| *p);
            self.round.retain(|(p, _)| *p != partition);
            if front == Some(partition) {
                self.visiting = false;
            }
        }
    }

    /// `partition` was taken on ([`Self::assign`]) and not revoked since.
    pub(super) fn has(&self, partition: i32) -> bool {
        self.lanes.contains_key(&partition)
    }

    pub(super) fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.lanes.keys().copied()
    }

    /// Records queued in all.
    pub(super) fn queued(&self) -> usize {
        self.queued
    }

    /// The flow key of `record`: its org, or one flow for all when fairness is off.
    fn org_of(enabled: bool, record: &Inbound) -> &[u8] {
        Self::flow_key(enabled, record.key())
    }

    /// The flow key of a record keyed `key`.
    fn flow_key(enabled: bool, key: Option<&[u8]>) -> &[u8] {
        if enabled {
            key.unwrap_or_default()
        } else {
            &[]
        }
    }

    /// A record from the head reader.
    pub(super) fn offer(&mut self, record: Inbound) -> Taken {
        let (partition, offset) = (record.partition(), record.offset());
        let key = record.key().map(<[u8]>::to_vec);
        self.offer_with(partition, offset, key.as_deref(), move || record)
    }

    /// A record from the head reader, by its place and key: `make` copies it only when it is
    /// queued (records passed over are never copied).
    pub(super) fn offer_with(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        make: impl FnOnce() -> Inbound,
    ) -> Taken {
        let enabled = self.shape.enabled;
        let org_limit = if enabled {
            self.shape.org_read_ahead.max(1)
        } else {
            usize::MAX
        };
        let lane = self.lanes.entry(partition).or_default();
        if lane.head.is_some_and(|h| offset < h) {
            return Taken::Stale;
        }
        lane.head = Some(offset + 1);
        let org = Self::flow_key(enabled, key);
        if lane.done.as_ref().is_some_and(|d| d.is_done(org, offset)) {
            lane.passed += 1;
            return Taken::Done;
        }
        lane.head_reads += 1;
        let reads = lane.head_reads;
        let percent = u64::from(self.shape.read_past_percent);
        if let Some(flow) = lane.flows.get_mut(org) {
            flow.head_reads += 1;
            if flow.detached_from.is_some() {
                return Taken::Passed;
            }
            let dominant = flow.head_reads * 100 > (reads - flow.since) * percent;
            if flow.queue.len() >= org_limit && dominant {
                flow.detached_from = Some(offset);
                if lane.catch_up.is_none() {
                    lane.catch_up = Some(offset);
                    self.epochs += 1;
                    lane.catch_up_epoch = self.epochs;
                    lane.catch_up_paused = false;
                }
                return Taken::Passed;
            }
        }
        self.push(partition, make());
        Taken::Queued
    }

    /// A record from the catch-up reader of its partition.
    #[cfg(test)]
    pub(super) fn offer_catch_up(&mut self, record: Inbound) -> Taken {
        let (partition, offset) = (record.partition(), record.offset());
        let key = record.key().map(<[u8]>::to_vec);
        self.offer_catch_up_with(partition, offset, key.as_deref(), move || record)
    }

    /// [`Self::offer_catch_up`] by place and key, copying the record only when it is queued.
    pub(super) fn offer_catch_up_with(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        make: impl FnOnce() -> Inbound,
    ) -> Taken {
        let enabled = self.shape.enabled;
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return Taken::Stale;
        };
        let (Some(at), Some(head)) = (lane.catch_up, lane.head) else {
            return Taken::Stale;
        };
        if offset < at {
            return Taken::Stale;
        }
        if offset > at {
            // Not the record expected next: one fetched for an earlier assignment of the
            // reader, or a gap in the log. Nothing is concluded from it: the reader starts
            // again where it stands, and only a gap found there twice more is stepped over.
            if lane.catch_up_gap == Some(at) && lane.catch_up_gap_seen >= 2 {
                lane.catch_up_gap = None;
                lane.catch_up_gap_seen = 0;
            } else {
                lane.catch_up_gap_seen = if lane.catch_up_gap == Some(at) {
                    lane.catch_up_gap_seen + 1
                } else {
                    0
                };
                lane.catch_up_gap = Some(at);
                self.epochs += 1;
                lane.catch_up_epoch = self.epochs;
                tracing::debug!(
                    partition,
                    offset,
                    expected = at,
                    "catch-up record out of place; reading again"
                );
                return Taken::Stale;
            }
        }
        if offset >= head {
            // Caught up: from here on the head brings every org's records.
            Self::attach_all(lane);
            return Taken::Stale;
        }
        lane.catch_up = Some(offset + 1);
        let org = Self::flow_key(enabled, key);
        let done = lane.done.as_ref().is_some_and(|d| d.is_done(org, offset));
        let taken = match lane.flows.get_mut(org) {
            Some(flow) if flow.detached_from.is_some_and(|d| offset >= d) => {
                flow.detached_from = Some(offset + 1);
                if done {
                    lane.passed += 1;
                    Taken::Done
                } else {
                    Taken::Queued
                }
            }
            _ => Taken::Passed,
        };
        if taken == Taken::Queued {
            self.push(partition, make());
        }
        if let Some(lane) = self.lanes.get_mut(&partition) {
            if lane.catch_up.is_some_and(|c| c >= head) {
                Self::attach_all(lane);
            }
        }
        taken
    }

    fn attach_all(lane: &mut Lane) {
        tracing::debug!(head = ?lane.head, at = ?lane.catch_up, "caught up: orgs read past are read by the head again");
        for flow in lane.flows.values_mut() {
            flow.detached_from = None;
        }
        lane.flows.retain(|_, f| !f.queue.is_empty());
        lane.catch_up = None;
        lane.catch_up_paused = false;
    }

    /// Queues `record` in its flow (allocating the flow's key only for a new flow).
    fn push(&mut self, partition: i32, record: Inbound) {
        let enabled = self.shape.enabled;
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return;
        };
        let size = record.payload().map_or(0, <[u8]>::len) + record.key().map_or(0, <[u8]>::len);
        let org = Self::org_of(enabled, &record);
        if !lane.flows.contains_key(org) {
            // Begun by the head's record just read (the catch-up reader only queues for flows
            // that exist).
            lane.flows.insert(
                org.to_vec(),
                Flow {
                    since: lane.head_reads.saturating_sub(1),
                    head_reads: 1,
                    ..Flow::default()
                },
            );
        }
        let Some(flow) = lane.flows.get_mut(org) else {
            return;
        };
        if !flow.in_round {
            flow.in_round = true;
            self.round.push_back((partition, org.to_vec()));
        }
        flow.queue.push_back(record);
        flow.bytes += size;
        lane.records += 1;
        lane.bytes += size;
        self.queued += 1;
    }

    /// Cuts a batch of at most `max` records by deficit round robin; each flow's records in
    /// order. Empty when nothing is queued.
    pub(super) fn cut(&mut self, max: usize) -> Vec<Inbound> {
        let mut batch = Vec::with_capacity(max.min(self.queued));
        while batch.len() < max {
            let Some((partition, org)) = self.round.front().cloned() else {
                break;
            };
            let weight = self.shape.weights.get(&org).copied().unwrap_or(1).max(1) as usize;
            let quantum = if self.shape.enabled {
                self.shape.quantum.max(1).saturating_mul(weight)
            } else {
                usize::MAX
            };
            let Some(lane) = self.lanes.get_mut(&partition) else {
                self.round.pop_front();
                self.visiting = false;
                continue;
            };
            let Some(flow) = lane.flows.get_mut(&org) else {
                self.round.pop_front();
                self.visiting = false;
                continue;
            };
            if !self.visiting {
                flow.deficit = flow.deficit.saturating_add(quantum);
                self.visiting = true;
            }
            let take = flow.deficit.min(flow.queue.len()).min(max - batch.len());
            for record in flow.queue.drain(..take) {
                let size =
                    record.payload().map_or(0, <[u8]>::len) + record.key().map_or(0, <[u8]>::len);
                flow.bytes -= size;
                lane.bytes -= size;
                batch.push(record);
            }
            flow.deficit -= take;
            lane.records -= take;
            self.queued -= take;
            if flow.queue.is_empty() {
                // An emptied flow leaves the round and keeps no credit.
                flow.deficit = 0;
                flow.in_round = false;
                if flow.detached_from.is_none() {
                    lane.flows.remove(&org);
                }
                self.round.pop_front();
                self.visiting = false;
            } else if flow.deficit == 0 {
                self.round.rotate_left(1);
                self.visiting = false;
            }
            // Otherwise the batch is full and the flow keeps its turn and credit.
        }
        // In log order within the batch: what the round robin chose is unchanged, but orgs
        // that are not held back come out as they were written (a stage that orders by event
        // time, a watermark say, sees no reordering it need not).
        batch.sort_unstable_by_key(|r| (r.partition(), r.offset()));
        batch
    }

    /// The lowest offset of `partition` not taken into a batch yet (its earliest queued or
    /// detached record, else the head); `None` before its first record.
    pub(super) fn floor(&self, partition: i32) -> Option<i64> {
        self.lanes.get(&partition)?.floor()
    }

    /// The next offset the head reader of `partition` delivers.
    pub(super) fn head(&self, partition: i32) -> Option<i64> {
        self.lanes.get(&partition)?.head
    }

    /// What is known of `partition` beyond its floor: every record below `through` that is
    /// not of an org in `open` at or past its offset was taken into a batch (or was done
    /// before the restored progress says so). `None` before the head's first record.
    pub(super) fn claim(&self, partition: i32) -> Option<Claim> {
        let lane = self.lanes.get(&partition)?;
        let head = lane.head?;
        if !self.shape.enabled {
            // One flow for every org: nothing beyond the floor is claimed (a claim naming the
            // one flow would not name the orgs a fair worker after a restart looks up).
            let floor = lane.floor().unwrap_or(head);
            return Some(Claim {
                floor,
                through: floor,
                open: HashMap::new(),
            });
        }
        let mut open: HashMap<Org, i64> = lane.open_orgs().collect();
        let mut through = head;
        // The restored progress still speaks for what the head has not reached: an org it
        // names open is open from there (or from the head, if the head passed its offset).
        if let Some(done) = lane.done.as_ref().filter(|d| d.through > head) {
            through = done.through;
            for (org, from) in &done.open {
                open.entry(org.clone()).or_insert((*from).max(head));
            }
        }
        Some(Claim {
            floor: lane.floor().unwrap_or(head),
            through,
            open,
        })
    }

    /// Records passed over as done (restored progress) since the last call.
    pub(super) fn take_passed(&mut self) -> u64 {
        self.lanes
            .values_mut()
            .map(|l| std::mem::take(&mut l.passed))
            .sum()
    }

    /// What `partition`'s readers should do now (pausing with hysteresis).
    pub(super) fn readers(&mut self, partition: i32) -> Readers {
        let shape = &self.shape;
        let Some(lane) = self.lanes.get_mut(&partition) else {
            return Readers::default();
        };
        lane.head_paused = lane.head_full(shape, lane.head_paused);
        if lane.catch_up.is_some() {
            lane.catch_up_paused = lane.catch_up_full(shape, lane.catch_up_paused);
        }
        Readers {
            head_paused: lane.head_paused,
            catch_up: lane.catch_up.map(|from| CatchUp {
                from,
                epoch: lane.catch_up_epoch,
                paused: lane.catch_up_paused,
            }),
        }
    }

    /// Queued records and detached state per org of `partition`: `(org, queued, detached)`.
    pub(super) fn flows(&self, partition: i32) -> Vec<(&[u8], usize, bool)> {
        self.lanes.get(&partition).map_or_else(Vec::new, |lane| {
            lane.flows
                .iter()
                .map(|(org, f)| (org.as_slice(), f.queue.len(), f.detached_from.is_some()))
                .collect()
        })
    }
}

#[cfg(test)]
#[path = "fair_tests.rs"]
mod tests;
