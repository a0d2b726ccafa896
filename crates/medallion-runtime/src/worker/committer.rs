//! The committer: every point where input offsets are stored or committed, in one place.
//!
//! An offset is stored only when it is on its partition's ack frontier ([`Ledger::frontier`]),
//! with the snapshot of the outputs in its metadata ([`crate::recovery`]). Stored offsets are
//! committed:
//! 1. on a timer: librdkafka commits what is stored every second (`auto.commit.interval.ms`,
//!    set by [`crate::kafka::Role::StageConsumer`]);
//! 2. at revocation ([`WorkerContext::pre_rebalance`]): after the revoked partitions' flights
//!    landed, their frontier is stored and committed before they go;
//! 3. at shutdown ([`Committer::close`]): after every flight landed, then the group is left;
//! 4. on the error path ([`Committer::commit_stored`]): what earlier batches delivered is
//!    committed before the worker stops; nothing of the failed batch is.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::ledger::Ledger;
use super::progress_log::ProgressLog;
use super::telemetry::Lag;
use super::WorkerError;
use crate::http::Health;
use crate::kafka::Flights;

/// Offsets (with metadata) stored for commit, by partition: what a commit sends.
pub(super) type Positions = Arc<Mutex<BTreeMap<i32, (i64, Option<String>)>>>;

/// The offset `partition` may be committed at, with the metadata that goes with it: the
/// snapshot of the outputs, the progress beyond the offset and the stage's own.
fn frontier_entry(topic: &str, ledger: &Ledger, partition: i32) -> Option<(i64, String)> {
    let frontier = ledger.frontier(partition)?;
    let progress = frontier
        .progress
        .as_ref()
        .map(|p| p.encode(topic, partition));
    let metadata = crate::recovery::wrap_progress(
        &frontier.outputs,
        progress.as_deref(),
        frontier.commit.metadata.as_deref(),
    );
    Some((frontier.commit.offset, metadata))
}

/// Stores, for each of `partitions`, its frontier (see [`Ledger::frontier`]) with the
/// snapshot of the outputs in its metadata, where it moved since the last store. With a
/// progress topic, a frontier is offered to it first and what is stored is what it has
/// written, for every partition (see [`ProgressLog`]).
fn store_frontiers<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    ledger: &Ledger,
    positions: &Positions,
    partitions: impl Iterator<Item = i32>,
    log: Option<&ProgressLog>,
) {
    let mut frontiers: BTreeMap<i32, (i64, String)> = partitions
        .filter_map(|p| frontier_entry(topic, ledger, p).map(|entry| (p, entry)))
        .collect();
    if let Some(log) = log {
        for (partition, (offset, metadata)) in &frontiers {
            log.offer(*partition, *offset, metadata);
        }
        frontiers = log.acked();
    }
    store_entries(consumer, topic, positions, frontiers);
}

/// Stores each partition's offset with its metadata, where it changed since the last store.
fn store_entries<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    positions: &Positions,
    entries: BTreeMap<i32, (i64, String)>,
) {
    for (partition, (offset, metadata)) in entries {
        let metadata = Some(metadata);
        let unchanged = positions
            .lock()
            .map(|p| p.get(&partition) == Some(&(offset, metadata.clone())))
            .unwrap_or(false);
        if unchanged {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        let stored = tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .and_then(|()| {
                if let (Some(metadata), Some(mut elem)) =
                    (metadata.as_ref(), tpl.find_partition(topic, partition))
                {
                    elem.set_metadata(metadata);
                }
                consumer.store_offsets(&tpl)
            });
        match stored {
            Ok(()) => {
                if let Ok(mut positions) = positions.lock() {
                    positions.insert(partition, (offset, metadata));
                }
            }
            // The partition moved to another replica meanwhile: it will redeliver.
            Err(e) => tracing::warn!(partition, offset, error = %e, "offset not stored"),
        }
    }
}

/// Commits `positions` of `partitions` (all when `None`) with their metadata. librdkafka's
/// commit of the "current state" drops stored metadata, so commits name their offsets.
fn commit_positions<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    positions: &Positions,
    partitions: Option<&[i32]>,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    if let Ok(positions) = positions.lock() {
        for (partition, (offset, metadata)) in positions.iter() {
            if partitions.is_some_and(|only| !only.contains(partition)) {
                continue;
            }
            let mut elem = tpl.add_partition(topic, *partition);
            elem.set_offset(Offset::Offset(*offset))?;
            if let Some(metadata) = metadata {
                elem.set_metadata(metadata);
            }
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.commit(&tpl, CommitMode::Sync)
}

/// Rebalance hooks: before partitions go, wait for their flights, commit their frontier and
/// drop their ledger; track the assignment for `/readyz`.
pub(super) struct WorkerContext {
    pub(super) health: Arc<Health>,
    pub(super) assigned: Arc<Mutex<HashSet<i32>>>,
    pub(super) topic: String,
    pub(super) positions: Positions,
    pub(super) ledger: Arc<Mutex<Ledger>>,
    pub(super) flights: Arc<Flights>,
    /// How long a revocation waits for the flights of its partitions.
    pub(super) drain_timeout: Duration,
    /// Partitions revoked since the last batch, for the stage to drop their state.
    pub(super) revoked: Arc<Mutex<Vec<i32>>>,
    /// Partitions revoked since the batch source last looked: records of theirs it holds
    /// were read before the revocation and are dropped (see [`super::source::BatchSource`]).
    pub(super) revoked_unseen: Mutex<Vec<i32>>,
    /// The group's progress topic, where the broker's commits may lose their metadata.
    pub(super) progress_log: Option<Arc<ProgressLog>>,
}

impl WorkerContext {
    /// Waits for the flights of `gone` to land (up to the drain timeout), then stores and
    /// commits their frontier. A flight that does not land in time, or lands with records
    /// refused, keeps the frontier before it: the next owner reads those records again.
    fn drain(&self, consumer: &BaseConsumer<Self>, gone: &[i32]) {
        let waiting: Vec<_> = match self.ledger.lock() {
            Ok(ledger) => {
                let mut w: Vec<_> = gone.iter().flat_map(|p| ledger.waiting_on(*p)).collect();
                w.sort_unstable();
                w.dedup();
                w
            }
            Err(_) => return,
        };
        if !waiting.is_empty() && !self.flights.wait_blocking(&waiting, self.drain_timeout) {
            tracing::warn!(
                flights = waiting.len(),
                "revoked partitions' records not all acknowledged in time; committing before them"
            );
        }
        if let Ok(mut ledger) = self.ledger.lock() {
            for flight in waiting {
                if self.flights.all_landed(&[flight]) && !self.flights.failed(flight) {
                    ledger.landed(flight);
                }
            }
            if let Some(log) = &self.progress_log {
                // The frontier's entry written before it is committed (or the last written).
                for p in gone {
                    if let Some((offset, metadata)) = frontier_entry(&self.topic, &ledger, *p) {
                        log.offer(*p, offset, &metadata);
                    }
                }
                log.wait_written(gone, self.drain_timeout);
            }
            store_frontiers(
                consumer,
                &self.topic,
                &ledger,
                &self.positions,
                gone.iter().copied(),
                self.progress_log.as_deref(),
            );
            for p in gone {
                ledger.revoke(*p);
            }
        }
        if let Err(e) = commit_positions(consumer, &self.topic, &self.positions, Some(gone)) {
            tracing::debug!(error = %e, "commit before revoke");
        }
    }

    /// Partitions lost, not handed over: the group went on without this worker (its session
    /// timed out, during a broker outage say), so nothing may be committed for them and their
    /// flights are not waited for here. Waiting would hold the rebalance, and with it the
    /// rejoin, for as long as the broker takes to acknowledge (up to the produce timeout); a
    /// commit would wait for a coordinator and then be refused. Their next owner reads them
    /// again from the last commit and drops what was already produced; when that is this
    /// worker, its flights land before it rebuilds them ([`super::StageWorker`]'s
    /// `sync_partitions`).
    fn lose(&self, gone: &[i32]) {
        tracing::warn!(
            partitions = ?gone,
            "assignment lost (the group's session expired): released without a commit; rejoining"
        );
        if let Ok(mut ledger) = self.ledger.lock() {
            for p in gone {
                ledger.revoke(*p);
            }
        }
    }
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let gone: Vec<i32> = partitions
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            if consumer.assignment_lost() {
                self.lose(&gone);
            } else {
                self.drain(consumer, &gone);
            }
            if let Ok(mut positions) = self.positions.lock() {
                positions.retain(|p, _| !gone.contains(p));
            }
            if let Some(log) = &self.progress_log {
                log.forget(&gone);
            }
            if let Ok(mut assigned) = self.assigned.lock() {
                for p in &gone {
                    assigned.remove(p);
                }
            }
            if let Ok(mut unseen) = self.revoked_unseen.lock() {
                unseen.extend(&gone);
            }
            if let Ok(mut revoked) = self.revoked.lock() {
                revoked.extend(gone);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        let current: HashSet<i32> = consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        self.health.set_assigned(!current.is_empty());
        // Newly assigned partitions are rebuilt before anything of them is processed; the
        // worker loop clears this once they are (`sync_partitions`).
        if !current.is_empty() {
            self.health.set(crate::http::Condition::Restoring, true);
        }
        tracing::info!(partitions = ?current, "assignment changed");
        if let Ok(mut assigned) = self.assigned.lock() {
            *assigned = current;
        }
    }
}

/// A newly assigned input partition, as its last owner committed it.
#[derive(Debug)]
pub(super) struct Assigned {
    pub(super) partition: i32,
    pub(super) offset: Option<i64>,
    /// Where the outputs stood when that offset was stored.
    pub(super) snapshot: Option<crate::recovery::Snapshot>,
    /// The stage's own commit metadata.
    pub(super) metadata: Option<String>,
    /// What was done beyond that offset, as recorded (not yet checked against the log).
    pub(super) progress: Option<crate::progress::Progress>,
}

impl Assigned {
    /// Takes what `metadata`, committed with the offset, says: where the outputs stood, the
    /// stage's own metadata, what was done beyond the offset.
    pub(super) fn read_metadata(&mut self, topic: &str, metadata: &str) {
        let partition = self.partition;
        (self.snapshot, self.metadata) = crate::recovery::unwrap(metadata);
        self.progress = crate::recovery::progress_text(metadata)
            .and_then(|text| {
                let decoded = crate::progress::Progress::decode(text, topic, partition);
                if decoded.is_none() {
                    tracing::warn!(
                        partition,
                        "committed progress is damaged or foreign: its records are read again"
                    );
                }
                decoded
            })
            // A record of progress that starts below the committed offset belongs to
            // another commit.
            .filter(|p| self.offset.is_some_and(|o| p.base == o));
    }
}

/// The worker's consumer, seen as the place offsets are stored and committed.
pub(super) struct Committer {
    consumer: Arc<StreamConsumer<WorkerContext>>,
    topic: String,
    positions: Positions,
}

impl Committer {
    pub(super) fn new(
        consumer: Arc<StreamConsumer<WorkerContext>>,
        topic: String,
        positions: Positions,
    ) -> Self {
        Self {
            consumer,
            topic,
            positions,
        }
    }

    pub(super) fn consumer(&self) -> &Arc<StreamConsumer<WorkerContext>> {
        &self.consumer
    }

    /// What was committed for each of `partitions`, read from the broker.
    pub(super) async fn committed(&self, partitions: &[i32]) -> Result<Vec<Assigned>, WorkerError> {
        let mut tpl = TopicPartitionList::new();
        for partition in partitions {
            tpl.add_partition(&self.topic, *partition);
        }
        // A blocking broker call, off the runtime's threads (works on any runtime flavour).
        let reader = Arc::clone(&self.consumer);
        let committed = tokio::task::spawn_blocking(move || {
            reader.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|e| WorkerError::Rebuild(format!("reading committed offsets: {e}")))??;
        Ok(partitions
            .iter()
            .map(|&partition| {
                let elem = committed.find_partition(&self.topic, partition);
                let offset = elem.as_ref().and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                let mut assigned = Assigned {
                    partition,
                    offset,
                    snapshot: None,
                    metadata: None,
                    progress: None,
                };
                if let Some(e) = &elem {
                    assigned.read_metadata(&self.topic, e.metadata());
                }
                assigned
            })
            .collect())
    }

    /// Stores the frontier of each of `partitions` that moved; the timer commits it.
    pub(super) fn store(&self, ledger: &Ledger, partitions: impl Iterator<Item = i32>) {
        store_frontiers(
            self.consumer.as_ref(),
            &self.topic,
            ledger,
            &self.positions,
            partitions,
            self.consumer.context().progress_log.as_deref(),
        );
    }

    /// What stores, when called, the positions the progress topic has written since the last
    /// store: called on a timer, so a worker that has nothing more to take still commits its
    /// last positions (without a progress topic it does nothing).
    pub(super) fn written_storer(&self) -> impl Fn() + Send + 'static {
        let (consumer, topic, positions) = (
            self.consumer.clone(),
            self.topic.clone(),
            self.positions.clone(),
        );
        move || {
            if let Some(log) = &consumer.context().progress_log {
                store_entries(consumer.as_ref(), &topic, &positions, log.acked());
            }
        }
    }

    /// The offset stored for commit of each partition (committed within a second).
    pub(super) fn stored_offsets(&self) -> BTreeMap<i32, i64> {
        self.positions
            .lock()
            .map(|p| {
                p.iter()
                    .map(|(partition, (offset, _))| (*partition, *offset))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The offset and metadata stored for commit of each partition.
    pub(super) fn stored(&self) -> BTreeMap<i32, (i64, Option<String>)> {
        self.positions.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Commits what is stored, waiting for the broker's answer until `deadline` at most: a
    /// broker that stalls every connection never answers, and the commit then goes on on its
    /// own; if it does not land, the partitions' next owner reads from the last commit that
    /// did, and dedup drops what was written.
    pub(super) async fn commit_stored_within(&self, deadline: std::time::Instant) {
        if let Some(log) = self.consumer.context().progress_log.clone() {
            // What the progress topic has not written yet is not committed: half of the wait
            // for it to be.
            let half = deadline.saturating_duration_since(std::time::Instant::now()) / 2;
            let until = std::time::Instant::now() + half;
            while log.pending(None) && std::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            store_entries(
                self.consumer.as_ref(),
                &self.topic,
                &self.positions,
                log.acked(),
            );
        }
        let (consumer, topic, positions) = (
            self.consumer.clone(),
            self.topic.clone(),
            self.positions.clone(),
        );
        let commit = tokio::task::spawn_blocking(move || {
            commit_positions(consumer.as_ref(), &topic, &positions, None)
        });
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(wait, commit).await {
            Ok(Ok(Err(e)))
                if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) =>
            {
                tracing::warn!(error = %e, "commit failed");
            }
            Ok(_) => {}
            Err(_) => tracing::warn!(
                waited_ms = wait.as_millis() as u64,
                "the last commit is not answered yet; stopping without waiting for it"
            ),
        }
    }

    /// Shutdown, once every flight landed (or the wait for them gave up): commits what is
    /// stored (until `deadline` at most, see [`Self::commit_stored_within`]), publishes the
    /// final lag (so a scrape after the drain sees where the group stopped) and unsubscribes;
    /// the consumer it gives back leaves the group when it is dropped.
    pub(super) async fn close(
        self,
        lag: &Lag,
        deadline: std::time::Instant,
    ) -> Arc<StreamConsumer<WorkerContext>> {
        self.commit_stored_within(deadline).await;
        lag.publish_final(&self.stored_offsets());
        self.consumer.unsubscribe();
        self.consumer.context().health.set_assigned(false);
        self.consumer
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rdkafka::mocking::MockCluster;

    use super::*;
    use crate::dedup::DedupWindow;
    use crate::kafka::{BatchProducer, KafkaConnection, Role};
    use crate::recovery::Snapshot;
    use crate::worker::ledger::{Booked, Commit};

    /// A committer over a consumer of `topic` (2 partitions on a mock cluster), partitions
    /// assigned by hand.
    fn committer(
        cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        ledger: Arc<Mutex<Ledger>>,
    ) -> Committer {
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer = BatchProducer::new(&kafka.config(Role::Producer {
            message_timeout_ms: 5_000,
        }))
        .expect("producer");
        let positions = Positions::default();
        let consumer: StreamConsumer<WorkerContext> = kafka
            .create_with_context(
                Role::StageConsumer {
                    group: "committer-test",
                    session_timeout_ms: 6_000,
                    instance_id: None,
                },
                "consumer",
                WorkerContext {
                    health: Health::new(),
                    assigned: Arc::default(),
                    topic: "in".into(),
                    positions: positions.clone(),
                    ledger,
                    flights: producer.flights(),
                    drain_timeout: Duration::from_secs(1),
                    revoked: Arc::default(),
                    revoked_unseen: Mutex::default(),
                    progress_log: None,
                },
            )
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("in", 0);
        tpl.add_partition("in", 1);
        consumer.assign(&tpl).expect("assigned");
        Committer::new(Arc::new(consumer), "in".into(), positions)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn only_a_landed_frontier_is_committed_with_the_outputs_snapshot_and_the_stages_metadata()
    {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("in", 2, 1).expect("topic");
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let committer = committer(&cluster, ledger.clone());
        let outputs = Arc::new(Snapshot {
            output: BTreeMap::from([(0, 41)]),
            dlq: BTreeMap::from([(3, 7)]),
        });
        {
            let mut l = ledger.lock().expect("ledger");
            for p in [0, 1] {
                l.assign(p, DedupWindow::new(8));
            }
            l.consumed(0, 9);
            l.consumed(1, 4);
            let commit = |offset, metadata: Option<&str>| {
                Booked::position(
                    Commit {
                        offset,
                        metadata: metadata.map(str::to_string),
                    },
                    offset,
                )
            };
            l.launched(1, 0, commit(10, Some("stage-state")), outputs.clone());
            l.launched(2, 1, commit(5, None), outputs.clone());
            // Flight 1 landed, flight 2 did not: only partition 0 may be committed.
            let moved = l.landed(1);
            committer.store(&l, moved.into_iter());
        }
        committer
            .commit_stored_within(std::time::Instant::now() + Duration::from_secs(10))
            .await;
        let committed = committer
            .committed(&[0, 1])
            .await
            .expect("committed offsets");
        let p0 = &committed[0];
        assert_eq!((p0.partition, p0.offset), (0, Some(10)));
        assert_eq!(p0.metadata.as_deref(), Some("stage-state"));
        assert_eq!(p0.snapshot.as_ref(), Some(outputs.as_ref()));
        let p1 = &committed[1];
        assert_eq!(
            (p1.partition, p1.offset),
            (1, None),
            "flight 2 is still out"
        );

        // Once it lands, partition 1 follows; storing twice changes nothing.
        {
            let mut l = ledger.lock().expect("ledger");
            let moved = l.landed(2);
            committer.store(&l, moved.clone().into_iter());
            committer.store(&l, moved.into_iter());
        }
        committer
            .commit_stored_within(std::time::Instant::now() + Duration::from_secs(10))
            .await;
        let committed = committer.committed(&[1]).await.expect("committed offsets");
        assert_eq!(committed[0].offset, Some(5));
        assert_eq!(committed[0].metadata, None);
    }
}
