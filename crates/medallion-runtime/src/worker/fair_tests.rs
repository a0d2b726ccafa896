use std::collections::{BTreeMap, HashMap};

use rdkafka::message::{Message, Timestamp};

use super::*;

fn record(partition: i32, offset: i64, org: u8) -> Inbound {
    Inbound::new(
        "in",
        partition,
        offset,
        Timestamp::NotAvailable,
        Some(vec![b'a' + org]),
        Some(vec![0; 10]),
        None,
    )
}

fn shape(quantum: usize, org_read_ahead: usize, read_ahead: usize) -> FairShape {
    FairShape {
        enabled: true,
        quantum,
        org_read_ahead,
        read_past_percent: 0,
        read_ahead_records: read_ahead,
        read_ahead_bytes: usize::MAX,
        max_skip_ahead: i64::MAX,
        ..FairShape::default()
    }
}

fn orgs(batch: &[Inbound]) -> String {
    batch
        .iter()
        .map(|r| char::from(r.key().map_or(b'?', |k| k[0])))
        .collect()
}

#[test]
fn a_batch_is_cut_by_round_robin_over_the_orgs_each_in_order() {
    let mut s = Scheduler::new(shape(2, 100, 1_000));
    // a a a a a a b c b
    for (offset, org) in [0, 0, 0, 0, 0, 0, 1, 2, 1].into_iter().enumerate() {
        assert_eq!(s.offer(record(0, offset as i64, org)), Taken::Queued);
    }
    // a's 0 1, b's 6 8, c's 7, a's 2: in log order within the batch.
    let batch = s.cut(6);
    let offsets: Vec<i64> = batch.iter().map(Message::offset).collect();
    assert_eq!(offsets, [0, 1, 2, 6, 7, 8]);
    assert_eq!(orgs(&batch), "aaabcb");
    // `a` keeps its turn and the rest of its quantum.
    assert_eq!(orgs(&s.cut(10)), "aaa");
    assert_eq!(s.queued(), 0);
    assert_eq!(s.floor(0), Some(9));
}

#[test]
fn weights_scale_an_orgs_quantum() {
    let mut s = Scheduler::new(FairShape {
        weights: [(vec![b'a'], 3)].into_iter().collect(),
        ..shape(1, 100, 1_000)
    });
    for offset in 0..8 {
        s.offer(record(0, offset, 0));
    }
    for offset in 8..16 {
        s.offer(record(0, offset, 1));
    }
    let batch = s.cut(8);
    let a = batch.iter().filter(|r| r.key() == Some(&b"a"[..])).count();
    assert_eq!(a, 6, "three of a's for each of b's");
}

#[test]
fn off_it_takes_the_log_in_order() {
    let mut s = Scheduler::new(FairShape {
        enabled: false,
        ..shape(1, 2, 1_000)
    });
    for (offset, org) in [0, 0, 0, 1, 0, 2].into_iter().enumerate() {
        assert_eq!(s.offer(record(0, offset as i64, org)), Taken::Queued);
    }
    let offsets: Vec<i64> = s.cut(100).iter().map(Message::offset).collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
}

#[test]
fn a_full_org_is_passed_over_and_caught_up_from_the_log() {
    let mut s = Scheduler::new(shape(10, 2, 1_000));
    let log: Vec<u8> = vec![0, 0, 0, 0, 1, 0, 1];
    for (offset, &org) in log.iter().enumerate() {
        s.offer(record(0, offset as i64, org));
    }
    // `a` filled its two places at offset 2: passed over from there; `b` is not held up.
    let claim = s.claim(0).expect("read");
    assert_eq!((claim.floor, claim.through), (0, 7));
    assert_eq!(
        claim.open,
        [(vec![b'a'], 0), (vec![b'b'], 4)].into_iter().collect(),
        "a's first open record is queued at 0"
    );
    let readers = s.readers(0);
    let catch_up = readers.catch_up.expect("catching up");
    assert_eq!(catch_up.from, 2);
    assert!(catch_up.paused, "a's queue is full");
    assert_eq!(orgs(&s.cut(100)), "aabb");
    assert_eq!(s.floor(0), Some(2));
    let readers = s.readers(0);
    assert!(!readers.catch_up.is_some_and(|c| c.paused));
    // The catch-up reader reads 2.. again: a's records are queued, b's passed.
    for offset in 2..7 {
        let taken = s.offer_catch_up(record(0, offset, log[offset as usize]));
        let expect = if log[offset as usize] == 0 {
            Taken::Queued
        } else {
            Taken::Passed
        };
        assert_eq!(taken, expect, "offset {offset}");
    }
    assert!(s.readers(0).catch_up.is_none(), "caught up with the head");
    let offsets: Vec<i64> = s.cut(100).iter().map(Message::offset).collect();
    assert_eq!(offsets, [2, 3, 5]);
    assert_eq!(
        s.offer(record(0, 7, 0)),
        Taken::Queued,
        "a is attached again"
    );
    assert_eq!(s.cut(100)[0].offset(), 7);
}

#[test]
fn the_head_pauses_only_its_own_partition_when_full() {
    let mut s = Scheduler::new(shape(10, 1_000, 4));
    for offset in 0..4 {
        s.offer(record(0, offset, offset as u8));
    }
    s.offer(record(1, 0, 0));
    assert!(s.readers(0).head_paused);
    assert!(!s.readers(1).head_paused);
    s.cut(1);
    assert!(s.readers(0).head_paused, "resumes below half, not at once");
    s.cut(2);
    assert!(!s.readers(0).head_paused);
}

#[test]
fn records_delivered_twice_and_revoked_partitions_are_dropped() {
    let mut s = Scheduler::new(shape(10, 100, 100));
    s.offer(record(0, 5, 0));
    assert_eq!(s.offer(record(0, 5, 0)), Taken::Stale);
    assert_eq!(s.offer(record(0, 3, 0)), Taken::Stale);
    s.offer(record(1, 0, 0));
    s.revoke(0);
    assert_eq!(s.queued(), 1);
    let batch = s.cut(10);
    assert_eq!((batch.len(), batch[0].partition()), (1, 1));
}

#[test]
fn restored_progress_passes_over_what_was_done() {
    let log = [0u8, 1, 0, 0, 1, 0, 1];
    let done = Progress::new(2, 6, [(vec![b'a'], 3)]);

    // The head starts past the claim; the open org's records come from the catch-up reader.
    let mut s = Scheduler::new(shape(10, 100, 100));
    assert_eq!(s.assign(0, Some(done.clone())), Some(6));
    assert_eq!((s.head(0), s.floor(0)), (Some(6), Some(3)));
    let claim = s.claim(0).expect("claim");
    assert_eq!((claim.floor, claim.through), (3, 6));
    assert_eq!(claim.open.get(&vec![b'a']), Some(&3));
    let catch_up = s.readers(0).catch_up.expect("catch-up reader");
    assert_eq!(catch_up.from, 3);
    assert_eq!(s.offer(record(0, 6, log[6])), Taken::Queued);
    let taken: Vec<Taken> = (3..6)
        .map(|offset| s.offer_catch_up(record(0, offset, log[offset as usize])))
        .collect();
    assert_eq!(taken, [Taken::Queued, Taken::Passed, Taken::Queued]);
    let offsets: Vec<i64> = s.cut(10).iter().map(Message::offset).collect();
    assert_eq!(offsets, [3, 5, 6]);

    // A head that reads from the committed offset anyway finds what is below the claim stale.
    let mut s = Scheduler::new(shape(10, 100, 100));
    s.assign(0, Some(done));
    let taken: Vec<Taken> = (2..7)
        .map(|offset| s.offer(record(0, offset, log[offset as usize])))
        .collect();
    assert_eq!(
        taken,
        [
            Taken::Stale,
            Taken::Stale,
            Taken::Stale,
            Taken::Stale,
            Taken::Queued
        ]
    );
    for offset in 3..6 {
        s.offer_catch_up(record(0, offset, log[offset as usize]));
    }
    let offsets: Vec<i64> = s.cut(10).iter().map(Message::offset).collect();
    assert_eq!(offsets, [3, 5, 6]);

    // In log order (fairness off), the head reads from the committed offset and passes over
    // what was done.
    let mut s = Scheduler::new(FairShape {
        enabled: false,
        ..shape(10, 100, 100)
    });
    assert_eq!(s.assign(0, Some(Progress::new(2, 6, []))), None);
    let taken: Vec<Taken> = (2..4)
        .map(|offset| s.offer(record(0, offset, log[offset as usize])))
        .collect();
    assert_eq!(taken, [Taken::Done, Taken::Done]);
    assert_eq!(s.take_passed(), 2);
}

/// A simulated partition log read by a head and a catch-up reader, with crashes.
struct Sim {
    log: Vec<Vec<u8>>,
    scheduler: Scheduler,
    head: BTreeMap<i32, i64>,
    catch_up: BTreeMap<i32, (u64, i64)>,
    /// Per (partition, org), the offsets taken into batches, in order.
    done: HashMap<(i32, u8), Vec<i64>>,
    repeats: usize,
    restored: HashMap<i32, Option<Progress>>,
}

impl Sim {
    fn org(&self, partition: i32, offset: i64) -> u8 {
        self.log[partition as usize][offset as usize]
    }

    fn read_head(&mut self, partition: i32, n: usize) {
        for _ in 0..n {
            if self.scheduler.readers(partition).head_paused {
                return;
            }
            let at = self.head[&partition];
            if at as usize >= self.log[partition as usize].len() {
                return;
            }
            let org = self.org(partition, at);
            self.scheduler.offer(record(partition, at, org));
            self.head.insert(partition, at + 1);
        }
    }

    fn read_catch_up(&mut self, partition: i32, n: usize) {
        for _ in 0..n {
            let Some(c) = self.scheduler.readers(partition).catch_up else {
                self.catch_up.remove(&partition);
                return;
            };
            if c.paused {
                return;
            }
            let at = match self.catch_up.get(&partition) {
                Some((epoch, at)) if *epoch == c.epoch => *at,
                _ => c.from,
            };
            if at as usize >= self.log[partition as usize].len() {
                return;
            }
            let org = self.org(partition, at);
            self.scheduler.offer_catch_up(record(partition, at, org));
            self.catch_up.insert(partition, (c.epoch, at + 1));
        }
    }

    fn cut(&mut self, n: usize) {
        for r in self.scheduler.cut(n) {
            let org = r.key().map_or(0, |k| k[0] - b'a');
            let seen = self.done.entry((r.partition(), org)).or_default();
            if seen.contains(&r.offset()) {
                self.repeats += 1;
            }
            seen.push(r.offset());
        }
    }

    /// A crash after recording progress: a new scheduler resumes from it.
    fn crash(&mut self, shape: &FairShape) {
        let partitions: Vec<i32> = self.head.keys().copied().collect();
        let mut next = Scheduler::new(shape.clone());
        for p in partitions {
            // Nothing read since the last restart: the committed progress stands.
            let Some(claim) = self.scheduler.claim(p) else {
                next.assign(p, self.restored.get(&p).cloned().flatten());
                continue;
            };
            let progress = Progress::new(claim.floor, claim.through, claim.open);
            let progress = Progress::decode(&progress.encode("in", p), "in", p);
            // The head starts where the scheduler says (past the claim), else at the floor.
            let start = next.assign(p, progress.clone());
            self.restored.insert(p, progress);
            self.head.insert(p, start.unwrap_or(claim.floor));
        }
        self.scheduler = next;
        self.catch_up.clear();
    }
}

proptest::proptest! {
    /// Two partitions, a flooding org and small ones, readers and batches interleaved at
    /// random with crashes at random points (progress recorded, then resumed from): every
    /// record is taken exactly once, each org's records in log order, and no partition's
    /// queue outgrows its read-ahead by more than a reader's step.
    #[test]
    fn fair_scheduling_loses_nothing_repeats_nothing_and_keeps_org_order(
        logs in proptest::collection::vec(
            proptest::collection::vec(proptest::prop_oneof![6 => proptest::prelude::Just(0u8), 1 => 1u8..6], 0..300),
            2,
        ),
        steps in proptest::collection::vec((0u8..5, 0i32..2, 1usize..40), 1..200),
        quantum in 1usize..8,
        org_read_ahead in 1usize..12,
        read_ahead in 4usize..40,
        enabled in proptest::prelude::any::<bool>(),
    ) {
        let shape = FairShape { enabled, ..shape(quantum, org_read_ahead, read_ahead) };
        let mut sim = Sim {
            log: logs,
            scheduler: Scheduler::new(shape.clone()),
            head: [(0, 0), (1, 0)].into_iter().collect(),
            catch_up: BTreeMap::new(),
            done: HashMap::new(),
            repeats: 0,
            restored: HashMap::new(),
        };
        for p in 0..2 {
            sim.scheduler.assign(p, None);
        }
        for (action, p, n) in steps {
            match action {
                0 | 1 => sim.read_head(p, n),
                2 => sim.read_catch_up(p, n),
                3 => sim.cut(n),
                _ => sim.crash(&shape),
            }
            proptest::prop_assert!(sim.scheduler.queued() <= 2 * (read_ahead + 40));
        }
        // Drain.
        for _ in 0..10_000 {
            for p in 0..2 {
                sim.read_head(p, 50);
                sim.read_catch_up(p, 50);
            }
            sim.cut(50);
            let all_read = (0..2).all(|p| sim.head[&p] as usize == sim.log[p as usize].len());
            if all_read && sim.scheduler.queued() == 0
                && (0..2).all(|p| sim.scheduler.readers(p).catch_up.is_none())
            {
                break;
            }
        }
        proptest::prop_assert_eq!(sim.repeats, 0);
        for p in 0..2i32 {
            let log = &sim.log[p as usize];
            for org in 0..6u8 {
                let expect: Vec<i64> = (0..log.len() as i64).filter(|&o| log[o as usize] == org).collect();
                let got = sim.done.get(&(p, org)).cloned().unwrap_or_default();
                proptest::prop_assert_eq!(got, expect, "partition {} org {}", p, org);
            }
        }
    }
}

#[test]
fn records_passed_over_are_never_copied() {
    let mut s = Scheduler::new(shape(10, 2, 1_000));
    let mut copies = 0;
    let offer = |s: &mut Scheduler, offset: i64, org: u8, copies: &mut usize| {
        s.offer_with(0, offset, Some(&[b'a' + org]), || {
            *copies += 1;
            record(0, offset, org)
        })
    };
    // a fills its queue (2) at offsets 0 and 1; its next records are read past uncopied.
    assert_eq!(offer(&mut s, 0, 0, &mut copies), Taken::Queued);
    assert_eq!(offer(&mut s, 1, 0, &mut copies), Taken::Queued);
    assert_eq!(offer(&mut s, 2, 0, &mut copies), Taken::Passed);
    assert_eq!(offer(&mut s, 3, 1, &mut copies), Taken::Queued);
    assert_eq!(offer(&mut s, 4, 0, &mut copies), Taken::Passed);
    assert_eq!(copies, 3, "only the queued records were copied");
    // The catch-up reader copies only the read-past org's records it brings.
    s.cut(10);
    let mut caught = 0;
    for (offset, org) in [(2, 0), (3, 1), (4, 0)] {
        s.offer_catch_up_with(0, offset, Some(&[b'a' + org]), || {
            caught += 1;
            record(0, offset, org)
        });
    }
    assert_eq!(
        caught, 2,
        "b's record at 3 was the head's: not copied again"
    );
    assert_eq!(orgs(&s.cut(10)), "aa");
}

#[test]
fn where_claims_are_kept_the_head_reads_past_an_org_beyond_the_skip_ahead() {
    for kept in [false, true] {
        let mut s = Scheduler::new(FairShape {
            max_skip_ahead: 10,
            ..shape(100, 3, 1_000)
        });
        s.set_claims_kept(kept);
        // a fills its queue and is read past from offset 3; b's records follow and are taken
        // as they come.
        for offset in 0..4 {
            s.offer(record(0, offset, 0));
        }
        s.cut(1_000);
        for offset in 4..40 {
            s.offer(record(0, offset, 1));
            s.cut(1_000);
        }
        let paused = s.readers(0).head_paused;
        assert_eq!(
            paused, !kept,
            "kept = {kept}: the floor is a's first open record, 37 behind the head"
        );
        let claim = s.claim(0).expect("claim");
        assert_eq!(claim.floor, 3);
        assert_eq!(claim.through, 40, "all but a is claimed up to the head");
        assert_eq!(claim.open.len(), 1, "{:?}", claim.open);
    }
}

#[test]
fn an_org_is_read_past_only_while_it_dominates_what_the_head_reads() {
    let mut s = Scheduler::new(FairShape {
        read_past_percent: 50,
        ..shape(100, 4, 1_000)
    });
    // A backlog of all orgs: a is one record in three, its queue fills and keeps growing
    // (nobody behind it is held up by a alone), and the head reads on in log order.
    for offset in 0..30 {
        let org = if offset % 3 == 0 {
            0
        } else {
            1 + (offset % 2) as u8
        };
        assert_eq!(
            s.offer(record(0, offset, org)),
            Taken::Queued,
            "offset {offset}"
        );
    }
    assert_eq!(s.readers(0).catch_up, None);
    s.cut(1_000);
    // A flood of a (the others quiet): once its queue is full, a is read past.
    let mut taken = Vec::new();
    for offset in 30..40 {
        taken.push(s.offer(record(0, offset, 0)));
    }
    assert_eq!(&taken[..4], &[Taken::Queued; 4]);
    assert!(taken[4..].iter().all(|t| *t == Taken::Passed), "{taken:?}");
    assert_eq!(
        s.offer(record(0, 40, 1)),
        Taken::Queued,
        "b is read behind the flood"
    );
    assert!(s.readers(0).catch_up.is_some());
}
