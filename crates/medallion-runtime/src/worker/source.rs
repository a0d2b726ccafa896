//! The batch source: reads the input topic into the fair [`Scheduler`] and cuts batches of up
//! to `batch.max_records` records from it, `batch.linger_ms` after the first record waiting.
//!
//! Two readers feed the scheduler: the group consumer (the *head*, each partition in log
//! order) and, while an org of a partition is passed over for having filled its queue, a
//! *catch-up* reader of that partition (a consumer of its own, assigned by hand) that reads the
//! org's records again from the log at the pace its queue drains (see [`super::fair`]). Only
//! the partition whose read-ahead is full is paused.
//!
//! Records of a partition the worker has not set up yet wait (their partition paused once
//! many) until it is: what was done beyond its committed offset must be known first
//! ([`BatchSource::ready`]). Consumer errors (a failed fetch, a topic not there yet, a broker
//! away) are counted and survived, with a short backoff for the ones that are not the broker's
//! absence; librdkafka reconnects and refetches by itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::committer::WorkerContext;
use super::fair::{Claim, FairShape, Readers, Scheduler};
use crate::kafka::{KafkaConnection, ReaderContext};
use crate::metrics as m;
use crate::progress::Progress;
use crate::record::Inbound;
use crate::retry::RetryPolicy;

/// What a poll yielded.
#[derive(Debug)]
pub(super) enum Polled {
    Batch(Cut),
    /// Records of partitions not set up yet wait for [`BatchSource::ready`].
    Unready,
    /// No record arrived within the idle interval.
    Idle,
    /// The consumer failed for good (librdkafka's fatal error, e.g. another live process
    /// with this replica's `kafka.instance_id` fenced it): the worker must stop.
    Fatal(String),
}

/// A batch and what the scheduler knew when it was cut.
#[derive(Debug)]
pub(super) struct Cut {
    pub(super) records: Vec<Inbound>,
    /// Every partition's lowest offset not taken into a batch.
    pub(super) floors: Vec<(i32, i64)>,
    /// What is known beyond the floors (at most every [`CLAIM_EVERY`]).
    pub(super) claims: Vec<(i32, Claim)>,
}

/// How often the claims beyond the floors are taken along with a batch: an older claim only
/// says less.
const CLAIM_EVERY: Duration = Duration::from_millis(200);

/// Records read from a reader in one go before the scheduler is looked at again.
const PUMP: usize = 2_048;

/// Records the head may read in one go while what it reads is passed over (an org read past,
/// done before): they cost a read and no copy, and the head reads past a flood only between
/// batches, so a bound of [`PUMP`] kept it to ~2,000 records a batch, slower than a burst
/// arrives.
const PUMP_PASSING: usize = 32_768;

/// Records a partition's head may lag behind the partition's end (as the last fetch saw it)
/// before the catch-up reader waits for it: while a burst arrives, or a backlog waits at the
/// start, the records of the orgs not read past are behind the head, and the worker's time
/// goes to reaching them first. A head paused by its read-ahead never holds the reader (the
/// reader is what lets it go on).
const HEAD_BEHIND: i64 = 32_768;

/// A head whose partition delivered nothing for this long is not reading: the catch-up reader
/// does not wait for it.
const HEAD_STILL: Duration = Duration::from_millis(200);

/// How long a wait for the head may last while the catch-up reader has records to bring.
const CATCH_UP_TICK: Duration = Duration::from_millis(5);

/// How long a move of the catch-up reader may take.
const SEEK_TIMEOUT: Duration = Duration::from_millis(500);

/// A partition of the catch-up reader's assignment.
#[derive(Debug, Clone, Copy)]
struct ReaderPart {
    /// The scheduler's catch-up it reads for; `None` while paused with nothing to read.
    epoch: Option<u64>,
    paused: bool,
    /// When it was added: a partition is paused only once it has been set up for a while
    /// (a pause right after an assignment was seen never to be undone).
    added: Instant,
}

/// How long a partition stays in the catch-up reader's assignment before it may be paused.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// The catch-up reader is made anew when it has brought nothing for this long while it has
/// partitions to read and room to queue, and the head reads on.
const CATCH_UP_STALL: Duration = Duration::from_secs(10);

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
    kafka: KafkaConnection,
    topic: String,
    /// `topic` for librdkafka's own calls.
    topic_c: std::ffi::CString,
    shape: BatchShape,
    policy: RetryPolicy,
    group: String,
    scheduler: Scheduler,
    /// Records of partitions not set up yet, in the order read, and how many per partition.
    unready: Vec<Inbound>,
    unready_counts: BTreeMap<i32, usize>,
    /// Partitions whose head this source paused.
    head_paused: BTreeSet<i32>,
    /// The catch-up reader, made when first needed, and what it was told: partition →
    /// (epoch, paused).
    catch_up: Option<BaseConsumer<ReaderContext>>,
    /// The partitions it reads for, and whether an org of each has a full queue (then the
    /// reader is not polled).
    catching_up: BTreeMap<i32, bool>,
    /// The partitions in the catch-up reader's assignment.
    reader_parts: BTreeMap<i32, ReaderPart>,
    /// Since when the catch-up reader has had something to read and brought nothing.
    catch_up_since: Option<Instant>,
    /// A reading head is more than [`HEAD_BEHIND`] behind its partition's end: the catch-up
    /// reader waits.
    head_behind: bool,
    /// Per partition, where its head was last seen and since when it has been there.
    head_moved: BTreeMap<i32, (i64, Instant)>,
    /// Whether the broker's keeping of commit metadata was learnt.
    claims_known: bool,
    /// When the head last delivered a record.
    head_seen: Option<Instant>,
    /// When the oldest record waiting in the scheduler makes a batch due.
    deadline: Option<Instant>,
    last_claim: Option<Instant>,
    /// Orgs named in the per-org gauge at the last publish.
    named_orgs: std::collections::HashSet<String>,
    errors_in_a_row: usize,
    read: usize,
    /// The consumer's fatal error, once it had one.
    fatal: Option<String>,
}

impl BatchSource {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        consumer: Arc<StreamConsumer<WorkerContext>>,
        kafka: KafkaConnection,
        topic: String,
        shape: BatchShape,
        fair: FairShape,
        policy: RetryPolicy,
        group: String,
    ) -> Self {
        Self {
            consumer,
            kafka,
            topic_c: std::ffi::CString::new(topic.as_str()).unwrap_or_default(),
            topic,
            shape,
            policy,
            group,
            scheduler: Scheduler::new(fair),
            unready: Vec::new(),
            unready_counts: BTreeMap::new(),
            head_paused: BTreeSet::new(),
            catch_up: None,
            catching_up: BTreeMap::new(),
            reader_parts: BTreeMap::new(),
            catch_up_since: None,
            head_behind: false,
            head_moved: BTreeMap::new(),
            claims_known: false,
            head_seen: None,
            deadline: None,
            last_claim: None,
            named_orgs: std::collections::HashSet::new(),
            errors_in_a_row: 0,
            read: 0,
            fatal: None,
        }
    }

    /// The next batch, [`Polled::Unready`] or [`Polled::Idle`]. Cancel-safe: every record
    /// taken is held by the scheduler and comes with a later call.
    pub(super) async fn next(&mut self) -> Polled {
        let idle_at = Instant::now() + self.shape.idle_after;
        loop {
            self.pump_catch_up();
            self.pump_head().await;
            if let Some(reason) = &self.fatal {
                return Polled::Fatal(reason.clone());
            }
            self.apply_revoked();
            self.steer();
            if !self.unready.is_empty() {
                return Polled::Unready;
            }
            let queued = self.scheduler.queued();
            let now = Instant::now();
            // Records the catch-up reader queued make a batch due as the head's do.
            if queued > 0 && self.deadline.is_none() {
                self.deadline = Some(now + self.shape.linger);
            }
            // A detached org's queue is full: the catch-up reader brings nothing more until a
            // batch takes from it, so lingering would only idle the worker.
            if queued >= self.shape.max_records
                || (queued > 0 && (self.catch_up_full() || self.deadline.is_some_and(|d| now >= d)))
            {
                return Polled::Batch(self.cut(now));
            }
            if queued == 0 && now >= idle_at {
                return Polled::Idle;
            }
            let until = if queued > 0 {
                self.deadline.unwrap_or(now)
            } else {
                idle_at
            };
            let mut wait = until.saturating_duration_since(now);
            if self.catch_up_wants_reading() {
                wait = wait.min(CATCH_UP_TICK);
            }
            self.wait_head(wait).await;
        }
    }

    /// While the worker takes no new batch (work in flight at its limit, refused records going
    /// again): keeps reading for up to `wait`, because librdkafka hands over rebalances (a
    /// revocation, an assignment lost in a broker outage) only to a poll, and the group waits
    /// for them. What is read is queued within the read-ahead. Cancel-safe like
    /// [`Self::next`].
    pub(super) async fn hold(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            self.pump_catch_up();
            self.pump_head().await;
            self.apply_revoked();
            self.steer();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let tick = if self.catch_up_wants_reading() {
                left.min(CATCH_UP_TICK)
            } else {
                left
            };
            self.wait_head(tick).await;
        }
    }

    /// Partitions with records waiting to be set up.
    pub(super) fn unready_partitions(&self) -> Vec<i32> {
        self.unready_counts.keys().copied().collect()
    }

    /// `partition` is set up: what `done` says was done beyond its committed offset is passed
    /// over, and the records waiting for it are queued.
    pub(super) fn ready(&mut self, partition: i32, done: Option<Progress>) {
        self.apply_revoked();
        if !self.scheduler.has(partition) {
            if let Some(start) = self.scheduler.assign(partition, done) {
                // What the progress claims is not read again: the head starts past it.
                match self.consumer.seek(
                    &self.topic,
                    partition,
                    Offset::Offset(start),
                    SEEK_TIMEOUT,
                ) {
                    Ok(()) => {
                        tracing::debug!(partition, start, "head starts past the claimed progress")
                    }
                    Err(e) => {
                        tracing::debug!(partition, start, error = %e, "head not moved past the claimed progress: it passes over it")
                    }
                }
            }
        }
        if self.unready_counts.remove(&partition).is_none() {
            return;
        }
        let (mine, rest): (Vec<Inbound>, Vec<Inbound>) = std::mem::take(&mut self.unready)
            .into_iter()
            .partition(|m| m.partition() == partition);
        self.unready = rest;
        for record in mine {
            self.offer(record);
        }
    }

    /// Drops the records waiting of `partition`, no longer assigned.
    pub(super) fn discard(&mut self, partition: i32) {
        self.forget(partition);
    }

    fn cut(&mut self, now: Instant) -> Cut {
        let records = self.scheduler.cut(self.shape.max_records);
        self.deadline = (self.scheduler.queued() > 0).then_some(now);
        let partitions: Vec<i32> = self.scheduler.partitions().collect();
        let floors = partitions
            .iter()
            .filter_map(|p| Some((*p, self.scheduler.floor(*p)?)))
            .collect();
        let claims = if self.last_claim.is_none_or(|t| now >= t + CLAIM_EVERY) {
            self.last_claim = Some(now);
            partitions
                .iter()
                .filter_map(|p| Some((*p, self.scheduler.claim(*p)?)))
                .collect()
        } else {
            Vec::new()
        };
        let passed = self.scheduler.take_passed();
        if passed > 0 {
            metrics::counter!(m::FAIR_PASSED_DONE_TOTAL, "stage" => self.group.clone())
                .increment(passed);
        }
        self.count_shares(&records);
        self.publish(&partitions);
        Cut {
            records,
            floors,
            claims,
        }
    }

    /// The records of a batch, per org passed over at the last publish and `other` for the
    /// rest (the label set stays as bounded as the orgs flooding at once).
    fn count_shares(&self, records: &[Inbound]) {
        if records.is_empty() {
            return;
        }
        let mut named: BTreeMap<&str, u64> = BTreeMap::new();
        let mut other = records.len() as u64;
        if !self.named_orgs.is_empty() {
            for record in records {
                let org = record.key().and_then(|k| std::str::from_utf8(k).ok());
                if let Some(org) = org.and_then(|o| self.named_orgs.get(o)) {
                    *named.entry(org.as_str()).or_default() += 1;
                    other -= 1;
                }
            }
        }
        for (org, n) in named {
            metrics::counter!(m::FAIR_SCHEDULED_RECORDS_TOTAL, "stage" => self.group.clone(), "org" => org.to_string())
                .increment(n);
        }
        if other > 0 {
            metrics::counter!(m::FAIR_SCHEDULED_RECORDS_TOTAL, "stage" => self.group.clone(), "org" => "other")
                .increment(other);
        }
    }

    /// Queue depths and passed-over orgs, per partition; an org is named only while it is
    /// passed over (bounded by the orgs flooding at once), and set to 0 once it caught up.
    fn publish(&mut self, partitions: &[i32]) {
        let mut named = std::collections::HashSet::new();
        for &p in partitions {
            let flows = self.scheduler.flows(p);
            for (org, queued, passed_over) in &flows {
                if *passed_over {
                    let org = String::from_utf8_lossy(org).into_owned();
                    metrics::gauge!(m::FAIR_ORG_QUEUED_RECORDS, "stage" => self.group.clone(), "org" => org.clone())
                        .set(*queued as f64);
                    named.insert(org);
                }
            }
            let queued: usize = flows.iter().map(|f| f.1).sum();
            let passed_over = flows.iter().filter(|f| f.2).count();
            let partition = p.to_string();
            metrics::gauge!(m::FAIR_QUEUED_RECORDS, "stage" => self.group.clone(), "partition" => partition.clone())
                .set(queued as f64);
            metrics::gauge!(m::FAIR_ORGS_PASSED_OVER, "stage" => self.group.clone(), "partition" => partition.clone())
                .set(passed_over as f64);
            let behind = match (self.scheduler.head(p), self.scheduler.floor(p)) {
                (Some(h), Some(f)) => (h - f) as f64,
                _ => 0.0,
            };
            metrics::gauge!(m::FAIR_SKIP_AHEAD, "stage" => self.group.clone(), "partition" => partition.clone())
                .set(behind);
            let to_end = self.head_to_end(p).map_or(0.0, |n| n.max(0) as f64);
            metrics::gauge!(m::FAIR_HEAD_BEHIND, "stage" => self.group.clone(), "partition" => partition)
                .set(to_end);
        }
        for org in self.named_orgs.difference(&named) {
            metrics::gauge!(m::FAIR_ORG_QUEUED_RECORDS, "stage" => self.group.clone(), "org" => org.clone())
                .set(0.0);
        }
        self.named_orgs = named;
    }

    /// Takes what the head has ready, without waiting: up to [`PUMP`] records kept (queued,
    /// or waiting for their partition), and up to [`PUMP_PASSING`] read in all.
    async fn pump_head(&mut self) {
        let consumer = self.consumer.clone();
        let mut took = false;
        let kept = |me: &Self| me.scheduler.queued() + me.unready.len();
        let enough = kept(self) + PUMP;
        for _ in 0..PUMP_PASSING {
            if kept(self) >= enough {
                break;
            }
            match consumer.recv().now_or_never() {
                None => break,
                Some(Ok(message)) => {
                    self.errors_in_a_row = 0;
                    took = true;
                    self.take(&message);
                }
                Some(Err(e)) => {
                    self.error(&e).await;
                    break;
                }
            }
        }
        // Once per pump, not per record: the catch-up reader's stall check only asks whether
        // the head delivered within the last second.
        if took {
            self.head_seen = Some(Instant::now());
        }
    }

    /// Waits up to `wait` for the head's next record.
    async fn wait_head(&mut self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        let consumer = self.consumer.clone();
        match tokio::time::timeout(wait, consumer.recv()).await {
            Err(_) => {}
            Ok(Ok(message)) => {
                self.errors_in_a_row = 0;
                self.head_seen = Some(Instant::now());
                self.take(&message);
            }
            Ok(Err(e)) => self.error(&e).await,
        }
    }

    /// Takes what the catch-up reader has ready, without waiting.
    fn pump_catch_up(&mut self) {
        // While a partition's org queue is full the reader is not polled, librdkafka's own
        // prefetch (`queued.min.messages` / `queued.max.messages.kbytes` of a reader) bounding
        // what waits.
        if !self.catch_up_wants_reading() {
            return;
        }
        let Some(reader) = self.catch_up.as_ref() else {
            return;
        };
        for _ in 0..PUMP {
            match reader.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => {
                    self.catch_up_since = Some(Instant::now());
                    let partition = message.partition();
                    if self.catching_up.contains_key(&partition) {
                        // Copied only when queued: most of what it reads is passed over.
                        self.scheduler.offer_catch_up_with(
                            partition,
                            message.offset(),
                            message.key(),
                            || Inbound::copy_of(&message),
                        );
                    }
                }
                Some(Err(e)) => {
                    metrics::counter!(m::CONSUMER_ERRORS_TOTAL, "stage" => self.group.clone(), "error" => "catch_up")
                        .increment(1);
                    tracing::debug!(error = %e, "catch-up reader error; carrying on");
                    break;
                }
            }
        }
    }

    /// The catch-up reader has partitions to read, none waits for a queue to drain, and no
    /// head is far behind.
    fn catch_up_wants_reading(&self) -> bool {
        !self.head_behind && !self.catching_up.is_empty() && !self.catch_up_full()
    }

    /// A partition the catch-up reader reads for has an org whose queue is full.
    fn catch_up_full(&self) -> bool {
        self.catching_up.values().any(|full| *full)
    }

    /// Records between `partition`'s head and its end as the client last learnt it (from its
    /// fetch responses: no broker request); `None` before either is known.
    fn head_to_end(&self, partition: i32) -> Option<i64> {
        let head = self.scheduler.head(partition)?;
        let end = crate::kafka::io::known_end(self.consumer.client(), &self.topic_c, partition)?;
        Some(end - head)
    }

    /// Whether a head that is not paused lags more than [`HEAD_BEHIND`] behind its partition's
    /// end, by the end the last fetch reported (kept by the client: no broker request), and
    /// moves: a head whose partition brought nothing for [`HEAD_STILL`] (an end it cannot
    /// reach, a broker that stopped answering for it) never holds the catch-up reader.
    fn find_head_behind(&mut self) -> bool {
        let now = Instant::now();
        // Called at every turn of the loop: the map is kept, not made anew.
        let scheduler = &self.scheduler;
        self.head_moved.retain(|p, _| scheduler.head(*p).is_some());
        let mut behind = false;
        for p in self.scheduler.partitions() {
            let Some(head) = self.scheduler.head(p) else {
                continue;
            };
            let moved = self.head_moved.entry(p).or_insert((head, now));
            if moved.0 != head {
                *moved = (head, now);
            }
            let still_for = now.duration_since(moved.1);
            behind |= !self.head_paused.contains(&p)
                && still_for < HEAD_STILL
                && self.head_to_end(p).is_some_and(|n| n > HEAD_BEHIND);
        }
        behind
    }

    /// Adds a record from the head: queued, or held until its partition is set up. Records
    /// held of a partition revoked since the last message (the poll that returned this one
    /// served the revocation) are dropped first: they belong to the partition's next owner,
    /// which reads them again from the last commit.
    fn take<M: Message>(&mut self, message: &M) {
        self.apply_revoked();
        // The group went on without this worker (its session expired in a broker outage):
        // every record fetched before is its next owner's, and the revocation that says so
        // waits in the queue behind them. They are passed over, so it is reached at once
        // instead of after working through everything fetched. Looked up every 256 records
        // while the assignment holds, at every record once it is lost.
        self.read += 1;
        if self.read.is_multiple_of(256) && self.consumer.assignment_lost() {
            let held = self.scheduler.queued() + self.unready.len();
            if held > 0 {
                tracing::info!(
                    records = held,
                    "assignment lost: records fetched before it are left to the next owner"
                );
            }
            let all: Vec<i32> = self.scheduler.partitions().collect();
            for p in all {
                self.forget(p);
            }
            self.unready.clear();
            self.unready_counts.clear();
            return;
        }
        if self.scheduler.queued() == 0 {
            self.deadline = Some(Instant::now() + self.shape.linger);
        }
        let partition = message.partition();
        if !self.scheduler.has(partition) {
            *self.unready_counts.entry(partition).or_default() += 1;
            self.unready.push(Inbound::copy_of(message));
            return;
        }
        // Copied only when queued: records of an org read past are not.
        self.scheduler
            .offer_with(partition, message.offset(), message.key(), || {
                Inbound::copy_of(message)
            });
    }

    /// Forgets the partitions revoked since the last look (the revocation was served by the
    /// last poll).
    fn apply_revoked(&mut self) {
        let gone = self
            .consumer
            .context()
            .revoked_unseen
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        for p in gone {
            self.forget(p);
        }
    }

    fn offer(&mut self, record: Inbound) {
        if self.scheduler.queued() == 0 {
            self.deadline = Some(Instant::now() + self.shape.linger);
        }
        if !self.scheduler.has(record.partition()) {
            *self.unready_counts.entry(record.partition()).or_default() += 1;
            self.unready.push(record);
            return;
        }
        self.scheduler.offer(record);
    }

    /// Drops everything of `partition` (revoked).
    fn forget(&mut self, partition: i32) {
        tracing::debug!(
            partition,
            queued = self.scheduler.queued(),
            "partition let go"
        );
        self.scheduler.revoke(partition);
        if self.unready_counts.remove(&partition).is_some() {
            self.unready.retain(|m| m.partition() != partition);
        }
        // librdkafka keeps a pause across rebalances, and a partition still assigned (the
        // assignment was only feared lost) must deliver again to be set up again.
        if self.head_paused.remove(&partition) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, partition);
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::debug!(partition, error = %e, "resuming a forgotten partition");
            }
        }
    }

    /// What the worker learnt of its broker's commit metadata (`None`: nothing yet).
    pub(super) fn claims_kept(&self) -> Option<bool> {
        self.claims_known
            .then_some(self.scheduler.shape().claims_kept)
    }

    /// The broker keeps commit metadata (or drops it): see [`FairShape::claims_kept`].
    pub(super) fn set_claims_kept(&mut self, kept: bool) {
        self.claims_known = true;
        self.scheduler.set_claims_kept(kept);
    }

    /// Whether `partition` is set up in the scheduler.
    pub(super) fn has(&self, partition: i32) -> bool {
        self.scheduler.has(partition)
    }

    /// Pauses and resumes the head of each partition and points the catch-up reader where
    /// the scheduler wants it.
    fn steer(&mut self) {
        let mut wants: BTreeMap<i32, Readers> = BTreeMap::new();
        let partitions: Vec<i32> = self.scheduler.partitions().collect();
        for p in partitions {
            wants.insert(p, self.scheduler.readers(p));
        }
        // A partition not set up yet reads on until a read-ahead's worth waits.
        let limit = self.scheduler.shape().read_ahead_records.max(1);
        for (p, n) in &self.unready_counts {
            wants.entry(*p).or_default().head_paused = *n >= limit;
        }
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for (p, want) in &wants {
            let paused = self.head_paused.contains(p);
            if want.head_paused && !paused {
                pause.add_partition(&self.topic, *p);
            } else if !want.head_paused && paused {
                resume.add_partition(&self.topic, *p);
            }
        }
        let stale: Vec<i32> = self
            .head_paused
            .iter()
            .filter(|p| !wants.contains_key(p))
            .copied()
            .collect();
        for p in stale {
            self.head_paused.remove(&p);
        }
        let head_paused = &mut self.head_paused;
        apply_pauses(
            &*self.consumer,
            "head",
            &pause,
            &resume,
            |partition, paused| {
                if paused {
                    head_paused.insert(partition);
                } else {
                    head_paused.remove(&partition);
                }
            },
        );
        let behind = self.find_head_behind();
        if behind != self.head_behind {
            tracing::debug!(
                behind,
                "the catch-up reader {} for the head",
                if behind { "waits" } else { "no longer waits" }
            );
            self.head_behind = behind;
        }
        self.steer_catch_up(&wants);
    }

    /// Points the catch-up reader where the scheduler wants it, without ever taking a partition
    /// out of its assignment while it is still set up: a partition is added once
    /// (`incremental_assign`), moved by seeking, paused when nothing of it is to be read again,
    /// and removed only once the worker let it go. Assigning anew at every move, as this once
    /// did, removes and adds every partition each time, and librdkafka (up to 2.15) aborts the
    /// process when a partition is removed again before its previous removal was served
    /// (`rd_kafka_assignment_partition_stopped: Assertion rktp->rktp_started failed`,
    /// librdkafka issue 5573), which a replay's frequent moves reached.
    fn steer_catch_up(&mut self, wants: &BTreeMap<i32, Readers>) {
        let desired: BTreeMap<i32, (u64, i64, bool)> = wants
            .iter()
            .filter_map(|(p, w)| w.catch_up.map(|c| (*p, (c.epoch, c.from, c.paused))))
            .collect();
        if self.catch_up.is_none() {
            if desired.is_empty() {
                return;
            }
            match crate::kafka::io::reader(&self.kafka, &self.topic, "catch-up reader", false) {
                Ok(reader) => self.catch_up = Some(reader),
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up reader could not be made; trying again");
                    return;
                }
            }
        }
        let Some(reader) = self.catch_up.as_ref() else {
            return;
        };
        // Partitions the worker let go leave the reader's assignment.
        let gone: Vec<i32> = self
            .reader_parts
            .keys()
            .filter(|p| !self.scheduler.has(**p))
            .copied()
            .collect();
        if !gone.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for p in &gone {
                tpl.add_partition(&self.topic, *p);
            }
            // librdkafka keeps a partition's pause across assignments: one that leaves paused
            // would come back paused and never deliver.
            if let Err(e) = reader.resume(&tpl) {
                tracing::debug!(error = %e, "catch-up reader: resuming partitions it lets go");
            }
            match reader.incremental_unassign(&tpl) {
                Ok(()) => {
                    for p in &gone {
                        self.reader_parts.remove(p);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "catch-up reader: removing partitions"),
            }
        }
        // New partitions are added at their offsets; assigned ones are moved.
        let mut add = TopicPartitionList::new();
        let mut added = Vec::new();
        for (p, (epoch, from, _)) in &desired {
            match self.reader_parts.get_mut(p) {
                None => {
                    if add
                        .add_partition_offset(&self.topic, *p, Offset::Offset(*from))
                        .is_ok()
                    {
                        added.push((*p, *epoch));
                    }
                }
                Some(part) if part.epoch != Some(*epoch) => {
                    if let Err(e) =
                        reader.seek(&self.topic, *p, Offset::Offset(*from), SEEK_TIMEOUT)
                    {
                        // Not set up yet, say: tried again at the next look.
                        tracing::debug!(partition = p, error = %e, "catch-up reader: seek");
                        continue;
                    }
                    part.epoch = Some(*epoch);
                    tracing::debug!(partition = p, from, epoch, "catch-up reader moved");
                }
                Some(_) => {}
            }
        }
        if add.count() > 0 {
            match reader.incremental_assign(&add) {
                Ok(()) => {
                    // Not paused from an earlier assignment (see above).
                    if let Err(e) = reader.resume(&add) {
                        tracing::debug!(error = %e, "catch-up reader: resuming added partitions");
                    }
                    for (p, epoch) in added {
                        self.reader_parts.insert(
                            p,
                            ReaderPart {
                                epoch: Some(epoch),
                                paused: false,
                                added: Instant::now(),
                            },
                        );
                    }
                    tracing::debug!(catching_up = ?desired, "catch-up reader: partitions added");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up reader could not be assigned; trying again")
                }
            }
        }
        // A partition is paused while nothing of it is to be read again (kept assigned). One
        // whose org has a full queue is not: a pause drops what librdkafka prefetched and the
        // resume fetches it again, which held a flooding org's catch-up to ~2k records/s on
        // tansu; instead the reader is not polled until the queue drains (its prefetch bounds
        // what waits). A partition set up less than a second ago is not paused either (a pause
        // right after an assignment was seen never to be undone).
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for (p, part) in self.reader_parts.iter_mut() {
            let idle = !desired.contains_key(p);
            if idle {
                part.epoch = None;
            }
            if idle && !part.paused && part.added.elapsed() >= PAUSE_AFTER {
                pause.add_partition(&self.topic, *p);
            } else if !idle && part.paused {
                resume.add_partition(&self.topic, *p);
            }
        }
        let parts = &mut self.reader_parts;
        apply_pauses(
            reader,
            "catch-up reader",
            &pause,
            &resume,
            |partition, paused| {
                if let Some(part) = parts.get_mut(&partition) {
                    part.paused = paused;
                }
            },
        );
        // What the reader reads for now: a partition counts once it is where it was asked;
        // one with a full queue holds the whole reader.
        let was_reading = self.catch_up_wants_reading();
        self.catching_up = desired
            .iter()
            .filter(|(p, (epoch, _, _))| {
                self.reader_parts.get(p).and_then(|part| part.epoch) == Some(*epoch)
            })
            .map(|(p, (_, _, full))| (*p, *full))
            .collect();
        if !self.catch_up_wants_reading() {
            self.catch_up_since = None;
        } else if !was_reading || self.catch_up_since.is_none() {
            self.catch_up_since = Some(Instant::now());
        } else if self
            .catch_up_since
            .is_some_and(|t| t.elapsed() >= CATCH_UP_STALL)
            // The broker answers the head meanwhile, or the head waits for the reader (an
            // outage stalls both and is no fault of the reader's).
            && (self
                .head_seen
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
                || !self.head_paused.is_empty())
        {
            tracing::warn!(
                catching_up = ?self.catching_up,
                "the catch-up reader brought nothing for {CATCH_UP_STALL:?}; making it anew"
            );
            self.catch_up = None;
            self.reader_parts.clear();
            self.catching_up.clear();
            self.catch_up_since = None;
        }
    }

    /// Counts and logs a consumer error, then waits when waiting helps. A poll must come back
    /// soon whatever the error: librdkafka hands over a rebalance only to a poll, and after an
    /// outage the queue holds the errors reported during it ahead of the revocation. So a
    /// broker that cannot be reached (librdkafka reconnects by itself, and the next poll
    /// waits for the next event anyway) costs no wait at all; any other error backs off along
    /// the retry schedule, at most [`MAX_ERROR_WAIT`], so a lasting one does not spin.
    async fn error(&mut self, error: &KafkaError) {
        if let Some(reason) = fatal_reason(error, || self.consumer.client().fatal_error()) {
            self.fatal.get_or_insert(reason);
            return;
        }
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

/// Pauses the partitions of `pause` and resumes those of `resume` on `consumer` (the head or
/// the catch-up reader, `who` in the log), then tells `set` of each partition whose call
/// succeeded and whether it is now paused. A call that fails changes nothing: the next steer
/// asks again.
fn apply_pauses<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    who: &str,
    pause: &TopicPartitionList,
    resume: &TopicPartitionList,
    mut set: impl FnMut(i32, bool),
) {
    for (list, paused) in [(pause, true), (resume, false)] {
        if list.count() == 0 {
            continue;
        }
        let done = if paused {
            consumer.pause(list)
        } else {
            consumer.resume(list)
        };
        match done {
            Ok(()) => {
                for e in list.elements() {
                    set(e.partition(), paused);
                }
            }
            Err(e) => tracing::debug!(error = %e, who, paused, "pausing or resuming partitions"),
        }
    }
}

/// Why the consumer is done for good, if `error` is librdkafka's fatal error: after it nothing
/// the consumer does works again (a static member fenced by another process with its
/// `group.instance.id`, say). `cause` asks librdkafka for the underlying error.
fn fatal_reason(
    error: &KafkaError,
    cause: impl FnOnce() -> Option<(RDKafkaErrorCode, String)>,
) -> Option<String> {
    if error.rdkafka_error_code() != Some(RDKafkaErrorCode::Fatal) {
        return None;
    }
    Some(match cause() {
        Some((code, text)) => format!("{code:?}: {text}"),
        None => error.to_string(),
    })
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
    fn only_a_fatal_error_stops_the_consumer_and_its_cause_is_named() {
        let fatal = KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal);
        let reason = fatal_reason(&fatal, || {
            Some((
                RDKafkaErrorCode::FencedInstanceId,
                "Fatal consumer error: fenced by another member".into(),
            ))
        })
        .expect("fatal");
        assert!(
            reason.contains("FencedInstanceId") && reason.contains("fenced"),
            "{reason}"
        );
        assert!(fatal_reason(&fatal, || None).is_some());
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::FencedInstanceId,
        ] {
            let error = KafkaError::MessageConsumption(code);
            assert_eq!(
                fatal_reason(&error, || panic!("not asked for {code:?}")),
                None,
                "carried on: {code:?}"
            );
        }
    }

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
