//! The stage worker. One record's way, each step a part with its own file:
//!
//! 1. [`source::BatchSource`] reads the input into the [`fair`] scheduler, which cuts batches
//!    across the orgs of each partition by deficit round robin;
//! 2. [`restore::Restorer`] sets up partitions newly assigned (dedup window, what a previous
//!    owner produced after its last commit, the stage's state) before any of their records is
//!    planned;
//! 3. [`planner::Planner`] decodes, drops redelivered events, runs the stage and encodes: the
//!    outgoing records of the batch, decided without a broker;
//! 4. [`flights::FlightTracker`] launches them as one flight without waiting, and takes the
//!    flights that landed (every record acknowledged), keeping the partition [`ledger`] told;
//! 5. [`committer::Committer`] stores each partition's ack frontier and holds every commit
//!    point: the timer, revocation, shutdown and the error path.
//!
//! [`StageWorker::run`] reads in that order. Records that fail go to `<input>.dlq` with their
//! original bytes and headers; nothing is dropped silently.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medallion_contracts::registry::RegistryError;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;

use crate::config::WorkerConfig;
use crate::error::{RecordFailure, SetupError, StageError};
use crate::http::{Condition, Health};
use crate::kafka::{BatchProducer, KafkaConnection, Placement, Role};
use crate::metrics as m;
use crate::record::Inbound;
use crate::retry::RetryPolicy;

mod committer;
mod fair;
mod flights;
mod ledger;
mod planner;
pub(crate) mod progress_log;
mod restore;
mod setup;
mod source;
mod stage;
mod tally;
mod telemetry;
mod topology;
mod windows;

use committer::{Committer, Positions, WorkerContext};
use fair::FairShape;
use flights::{Blocked, Booking, FlightTracker, InFlightLimits, Landing};
use ledger::{Booked, Commit, Ledger};
use planner::{Outgoing, Plan, Planner};
use progress_log::ProgressLog;
use restore::Restorer;
use source::{BatchShape, BatchSource, Cut, Polled};
use tally::{CountedThrough, Tally};
use telemetry::Lag;
use topology::Topology;

pub use setup::prepare;
// Records for other topics are part of what a stage hands back.
pub use crate::outbound::{register, JsonEncoder, SideRecord};
pub use stage::{
    meta, stage_input_schema, with_meta, Collector, OutputEvent, Resolved, Stage, StageSetup,
};
pub use tally::{Progress, RunTotals};

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("consumer group `{0}` is not declared in topic-config.yaml")]
    UnknownGroup(String),
    #[error("consumer group `{group}` must consume exactly one topic (has {consumes})")]
    Shape { group: String, consumes: usize },
    #[error("schema {0} is not in schemas/")]
    MissingContract(String),
    #[error("contracts: {0}")]
    Contracts(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Client(#[from] crate::kafka::ClientError),
    #[error("{0}")]
    Connection(#[from] crate::kafka::ConnectionError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("stage setup: {0}")]
    Setup(#[from] SetupError),
    /// A stage could not restore the state of a newly assigned partition.
    #[error("restoring partition {partition}: {source}")]
    Restore {
        partition: i32,
        #[source]
        source: StageError,
    },
    /// The state of newly assigned partitions could not be rebuilt from Kafka.
    #[error("rebuilding partition state: {0}")]
    Rebuild(String),
    #[error("HTTP listener: {0}")]
    Http(#[from] std::io::Error),
    #[error("stage halted: {0}")]
    Halted(String),
    /// The consumer failed for good; a restart makes a new one.
    #[error("the Kafka consumer failed for good ({0}); if it was fenced, another live process uses this replica's kafka.instance_id")]
    ConsumerFatal(String),
    #[error("{0}")]
    Recovery(#[from] crate::recovery::RecoveryError),
}

/// Flights out this long with none landing make the worker not ready
/// ([`Condition::DeliveriesStalled`]): a healthy broker acknowledges within a second or two.
const DELIVERY_STALL: Duration = Duration::from_secs(10);

/// A step of the loop this long keeps the worker from its consumer (rebalances wait on a
/// poll): it is logged with what it waited on.
const SLOW_STEP: Duration = Duration::from_secs(5);

/// How often a worker that does not know yet whether its broker keeps commit metadata asks.
const CLAIMS_PROBE_EVERY: Duration = Duration::from_secs(30);
/// How long that question may take.
const CLAIMS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long reading the progress topic at an assignment may take; what was not found by then
/// is read again from the committed offset (dedup drops what was done).
const PROGRESS_LOOKUP: Duration = Duration::from_secs(10);
/// How long looking for a claim's last record in the log may take, where the claim reaches past
/// the partition's listed end.
const PROGRESS_REACH: Duration = Duration::from_secs(3);
/// How often positions the progress topic has written are stored without a landing to do it.
const PROGRESS_STORE_EVERY: Duration = Duration::from_millis(100);

/// Every commit of this worker carries metadata (where its outputs stood): a committed offset
/// of this group read back without any says the broker drops it (tansu), one with it that the
/// broker keeps it. Nothing is learnt from partitions never committed. With a progress topic
/// the metadata is kept there, whatever the broker does with it.
fn learn_claims_kept(
    committed: &[committer::Assigned],
    source: &mut BatchSource,
    committer: &Committer,
) {
    if committer.consumer().context().progress_log.is_some() {
        source.set_claims_kept(true);
        return;
    }
    let ours: Vec<&committer::Assigned> = committed.iter().filter(|a| a.offset.is_some()).collect();
    if !ours.is_empty() {
        source.set_claims_kept(ours.iter().any(|a| a.snapshot.is_some()));
    }
}

/// Logs `step`, begun at `since`, if it took [`SLOW_STEP`] or more.
fn slow(step: &'static str, since: Instant) {
    let took = since.elapsed();
    if took >= SLOW_STEP {
        tracing::warn!(
            step,
            seconds = took.as_secs_f64(),
            "a step of the worker loop took long"
        );
    }
}

/// A stage and the parts that run it.
pub struct StageWorker<S: Stage> {
    stage: S,
    kafka: KafkaConnection,
    topo: Arc<Topology>,
    planner: Planner,
    restorer: Restorer,
    tally: Tally,
    policy: RetryPolicy,
    health: Arc<Health>,
    /// The consumer's assignment (updated by the rebalance hooks).
    assigned: Arc<Mutex<HashSet<i32>>>,
    /// Partitions revoked since the stage was last told.
    revoked: Arc<Mutex<Vec<i32>>>,
    /// Every assigned partition the worker has set up (see [`ledger`]).
    ledger: Arc<Mutex<Ledger>>,
    /// Partitions of keyed records on topics with their own `partitioner`.
    placement: Placement,
    limits: InFlightLimits,
    shape: BatchShape,
    fair: FairShape,
    /// How long the worker waits for its flights to land before it commits without them
    /// (shutdown, an error, a revocation) or rebuilds a partition: the produce timeout.
    drain_timeout: Duration,
    /// What this process has counted, so a duplicate read again is not counted twice.
    counted: CountedThrough,
    /// Copies the dedup windows to disk, with a state directory.
    windows: windows::WindowKeeper,
}

/// Tasks that run beside the loop (lag, broker probe), stopped when it ends however it ends.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    /// Stops the tasks and waits until they are gone, so none of them holds a client any more
    /// (a call a task had started on a blocking thread may still be finishing).
    async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.0);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// How long the worker waits, as it stops on an error, for the calls still holding its
/// consumer to end and for the consumer to leave the group.
const CLOSE_WAIT: Duration = Duration::from_secs(15);

/// The least time given to leaving the group, even when the stop's budget is spent.
const CLOSE_AT_LEAST: Duration = Duration::from_secs(1);

/// Closes the consumer before the worker returns: it leaves the group while the broker is
/// there to be told, on a thread of its own (librdkafka's close polls until the group is left),
/// rather than wherever its last reference happens to be dropped, possibly after the runtime or
/// the broker is gone, where the close can wait for minutes. Waits until `deadline` (at least
/// [`CLOSE_AT_LEAST`]); a close still going then is left to finish as the process exits.
async fn close_consumer(mut consumer: Arc<StreamConsumer<WorkerContext>>, deadline: Instant) {
    let deadline = deadline.max(Instant::now() + CLOSE_AT_LEAST);
    let only = loop {
        match Arc::try_unwrap(consumer) {
            Ok(only) => break only,
            Err(shared) if Instant::now() < deadline => {
                consumer = shared;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "the consumer is still in use; it leaves the group when that call ends"
                );
                return;
            }
        }
    };
    let closing = tokio::task::spawn_blocking(move || drop(only));
    if tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), closing)
        .await
        .is_err()
    {
        tracing::warn!(
            "the consumer has not left the group yet; it goes on closing as the worker stops"
        );
    }
}

/// The parts that hold the Kafka clients, built when the worker starts.
struct Clients {
    source: BatchSource,
    flights: FlightTracker,
    committer: Committer,
}

impl<S: Stage> StageWorker<S> {
    pub fn input_topic(&self) -> &str {
        &self.topo.input_topic
    }

    /// `None` for a sink group.
    pub fn output_topic(&self) -> Option<&str> {
        self.topo.output.as_ref().map(|o| o.topic.as_str())
    }

    /// Live counters, updated as flights land.
    pub fn progress(&self) -> Arc<Progress> {
        self.tally.progress.clone()
    }

    /// Runs until `shutdown` resolves: then settles the stage, waits for every flight to land,
    /// commits and leaves the group (a static member, `kafka.instance_id`, keeps its place
    /// until its session expires, so its replacement under the same id takes its partitions
    /// back without a rebalance).
    pub async fn run<C>(
        mut self,
        config: &WorkerConfig<C>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunTotals, WorkerError> {
        let drain_timeout = self.drain_timeout;
        let Clients {
            mut source,
            mut flights,
            committer,
        } = self.start(config).await?;
        let lag = Arc::new(Lag::new(committer.consumer().clone(), self.topo.clone()));
        let store_written = committer.written_storer();
        let background = Background(vec![
            tokio::spawn(lag.clone().run()),
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROGRESS_STORE_EVERY);
                loop {
                    tick.tick().await;
                    store_written();
                }
            }),
            tokio::spawn(telemetry::probe_broker(
                committer.consumer().clone(),
                self.topo.input_topic.clone(),
                self.health.clone(),
            )),
        ]);
        let paused = metrics::gauge!(m::CONSUMPTION_PAUSED, "stage" => self.topo.group.clone());
        tokio::pin!(shutdown);
        let mut claims_probe: Option<Instant> = None;
        loop {
            self.health.beat();
            let landing = Instant::now();
            self.land(flights.land().await, &committer);
            slow("taking landed flights", landing);
            if self.windows.due() {
                self.windows.copy(&self.ledger, &committer.stored());
            }
            // Backpressure: with too much in flight, or refused records going again, the worker
            // waits for landings before it takes another batch (still polling: see `hold`).
            let blocked = flights.blocked();
            let resending = blocked == Some(Blocked::Resending);
            paused.set(if resending { 1.0 } else { 0.0 });
            self.health.set(Condition::DeliveriesRefused, resending);
            self.health.set(
                Condition::DeliveriesStalled,
                flights.stalled_for().is_some_and(|d| d >= DELIVERY_STALL),
            );
            self.health.set(
                Condition::AssignmentLost,
                committer.consumer().assignment_lost(),
            );
            let polled = tokio::select! {
                _ = &mut shutdown => break,
                _ = flights.landing(), if flights.busy() => continue,
                polled = async {
                    if blocked.is_some() {
                        source.hold(Duration::from_millis(500)).await;
                        None
                    } else {
                        Some(source.next().await)
                    }
                } => match polled {
                    Some(polled) => polled,
                    None => continue,
                },
            };
            if source.claims_kept().is_none()
                && claims_probe.is_none_or(|at: Instant| at.elapsed() >= CLAIMS_PROBE_EVERY)
            {
                claims_probe = Some(Instant::now());
                self.probe_claims_kept(&mut source, &committer).await;
            }
            let step = match polled {
                Polled::Batch(cut) => {
                    self.process_batch(cut, &mut flights, &mut source, &committer)
                        .await
                }
                // Records of partitions not set up yet: set them up (a failure is tried again
                // at the next poll, the worker not ready meanwhile).
                Polled::Unready => {
                    if let Err(e) = self
                        .sync_partitions(&mut flights, &mut source, &committer)
                        .await
                    {
                        tracing::warn!(error = %e, "restoring assigned partitions failed; trying again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(())
                }
                // An idle worker restores what it was assigned too, so it is ready (and takes
                // the first record at once) without waiting for one.
                // A failure here is tried again at the next poll (the worker stays not ready).
                Polled::Idle => {
                    if let Err(e) = self
                        .sync_partitions(&mut flights, &mut source, &committer)
                        .await
                    {
                        tracing::warn!(error = %e, "restoring assigned partitions failed; trying again");
                    }
                    self.settle(false, &mut flights).await
                }
                Polled::Fatal(reason) => Err(WorkerError::ConsumerFatal(reason)),
            };
            if let Err(e) = step {
                // What earlier batches delivered is committed; nothing of this one.
                self.land(flights.drain(drain_timeout).await, &committer);
                committer
                    .commit_stored_within(Instant::now() + CLOSE_WAIT)
                    .await;
                background.stop().await;
                let consumer = committer.consumer().clone();
                drop((source, committer, lag));
                close_consumer(consumer, Instant::now() + CLOSE_WAIT).await;
                return Err(e);
            }
        }
        // The stop has a budget (`kafka.stop_timeout_ms`): with the broker away, waiting for
        // acknowledgements, the last commit and the group's leave would otherwise add up past
        // the pod's grace period. Half of it at most for the acknowledgements.
        let stop_timeout = Duration::from_millis(u64::from(config.kafka.stop_timeout_ms));
        let stop_by = Instant::now() + stop_timeout;
        background.stop().await;
        tracing::info!(
            static_member = config.kafka.instance_id.is_some(),
            "shutting down: settling work in flight, committing and leaving the group (a static member keeps its place until its session expires)"
        );
        let settled = self.settle(true, &mut flights).await;
        let acknowledgements = drain_timeout
            .min(stop_timeout / 2)
            .min(stop_by.saturating_duration_since(Instant::now()));
        self.land(flights.drain(acknowledgements).await, &committer);
        // The windows are copied at the offsets about to be committed, before the group is
        // left (a copy ahead of a commit that then fails serves only what lies below it).
        let windows = self.windows.collect(&self.ledger, &committer.stored());
        self.windows.close(&self.ledger, windows).await;
        // The last commit gets half of what is left of the budget, leaving the group the rest.
        let left = stop_by.saturating_duration_since(Instant::now());
        let consumer = committer.close(&lag, Instant::now() + left / 2).await;
        drop((source, lag));
        close_consumer(consumer, stop_by).await;
        settled.map(|()| self.tally.totals)
    }

    /// Builds the producer, the consumer (with the rebalance hooks) and the parts that use
    /// them, notes where the outputs stand and subscribes.
    async fn start<C>(&mut self, config: &WorkerConfig<C>) -> Result<Clients, WorkerError> {
        let producer = BatchProducer::new(&self.kafka.config(Role::Producer {
            message_timeout_ms: u64::from(config.kafka.produce_timeout_ms),
        }))?
        .with_placement(self.placement.clone());
        let progress_log = match self.topo.progress_topic.clone() {
            Some(topic) => {
                let kafka = self.kafka.clone();
                let there = {
                    let topic = topic.clone();
                    tokio::task::spawn_blocking(move || progress_log::exists(&kafka, &topic))
                        .await
                        .unwrap_or(false)
                };
                if there {
                    Some(Arc::new(ProgressLog::new(topic, producer.marked())))
                } else {
                    tracing::warn!(
                        topic,
                        "progress topic missing (create it with `medallion topics apply`): where the broker drops commit metadata, records past the committed offsets are read again, and fair scheduling reads ahead only as far as the dedup window"
                    );
                    None
                }
            }
            None => None,
        };
        let positions = Positions::default();
        let consumer: Arc<StreamConsumer<WorkerContext>> =
            Arc::new(self.kafka.create_with_context(
                Role::StageConsumer {
                    group: &self.topo.group,
                    session_timeout_ms: config.kafka.session_timeout_ms,
                    instance_id: config.kafka.instance_id.as_deref(),
                },
                "consumer",
                WorkerContext {
                    health: self.health.clone(),
                    assigned: self.assigned.clone(),
                    topic: self.topo.input_topic.clone(),
                    positions: positions.clone(),
                    ledger: self.ledger.clone(),
                    flights: producer.flights(),
                    drain_timeout: self.drain_timeout,
                    revoked: self.revoked.clone(),
                    revoked_unseen: Mutex::default(),
                    progress_log,
                },
            )?);
        let outputs_at_start = self.restorer.outputs_now().await?;
        consumer.subscribe(&[&self.topo.input_topic])?;
        Ok(Clients {
            source: BatchSource::new(
                consumer.clone(),
                self.kafka.clone(),
                self.topo.input_topic.clone(),
                self.shape,
                self.fair.clone(),
                self.policy.clone(),
                self.topo.group.clone(),
            ),
            flights: FlightTracker::new(
                producer,
                self.ledger.clone(),
                self.limits,
                self.policy.clone(),
                self.topo.group.clone(),
                self.topo.output.as_ref().map(|o| o.topic.clone()),
                self.topo.dlq_topic.clone(),
                outputs_at_start,
            ),
            committer: Committer::new(consumer, self.topo.input_topic.clone(), positions),
        })
    }

    /// One batch: set up newly assigned partitions → plan → launch its flight (not waiting for
    /// it) → let the stage settle what is due.
    async fn process_batch(
        &mut self,
        cut: Cut,
        flights: &mut FlightTracker,
        source: &mut BatchSource,
        committer: &Committer,
    ) -> Result<(), WorkerError> {
        // Records polled before the assignment was lost are the next owner's (see
        // `BatchSource::take`): read again from the last commit, by whoever gets them.
        if committer.consumer().assignment_lost() {
            return Ok(());
        }
        let Cut {
            records: mut batch,
            floors,
            claims,
        } = cut;
        let started = Instant::now();
        telemetry::count_input(&self.topo, &batch);
        self.sync_partitions(flights, source, committer).await?;
        if let Ok(mut ledger) = self.ledger.lock() {
            for &(partition, floor) in &floors {
                ledger.set_floor(partition, floor);
            }
            for (partition, claim) in claims {
                ledger.claimed(partition, claim);
            }
        }
        slow("setting up assigned partitions", started);
        // Records of a partition revoked while the batch was polled belong to its next owner.
        if let Ok(ledger) = self.ledger.lock() {
            batch.retain(|m| ledger.contains(m.partition()));
        }
        if batch.is_empty() {
            return Ok(());
        }
        let planning = Instant::now();
        let mut plan = self.plan_with_retry(&batch).await?;
        slow("planning a batch", planning);
        let telemetry = self
            .planner
            .batch_telemetry(&batch, &plan, started.elapsed());
        plan.outgoing.extend(telemetry);
        let dropped = self.restorer.drop_replayed(&mut plan.outgoing);
        let commits = self.book_plan(&batch, &plan);
        // A duplicate this process dropped (and counted) before, read again: a replay.
        let again = plan
            .duplicates
            .iter()
            .filter(|i| {
                let m = &batch[**i];
                self.counted.already(m.partition(), m.offset())
            })
            .count() as u64;
        // Records are taken out of log order: what lies below a partition's floor was taken
        // (and counted), what lies above it may not have been.
        self.counted.book(
            floors
                .iter()
                .map(|(partition, floor)| (*partition, floor - 1)),
        );
        let booking = Booking {
            consumed: batch.len() as u64,
            duplicates: plan.duplicates.len() as u64 - again,
            replayed: dropped.total() + again,
            // A dead letter a previous owner already wrote is a replay, not a second one.
            dead: plan
                .dead
                .into_iter()
                .filter(|(index, _)| {
                    let m = &batch[*index];
                    !dropped.dead_letters.contains(&(m.partition(), m.offset()))
                })
                .map(|(_, failure)| failure)
                .collect(),
            event_times: plan.event_times,
        };
        let launching = Instant::now();
        flights.launch(plan.outgoing, commits, booking).await;
        slow("handing a batch to the producer", launching);
        metrics::histogram!(m::BATCH_DURATION_SECONDS, "stage" => self.topo.group.clone())
            .record(started.elapsed().as_secs_f64());
        if let Ok(ledger) = self.ledger.lock() {
            telemetry::dedup_gauges(&self.topo.group, &ledger);
        }
        self.settle(false, flights).await
    }

    /// Tells the stage about partitions it lost, and sets up those assigned and not yet in the
    /// ledger, from what was committed for them. Every flight lands first: a partition this
    /// worker lost and got back may have records of its own still in flight, and the rebuild
    /// must see them on the output to not produce them again.
    async fn sync_partitions(
        &mut self,
        flights: &mut FlightTracker,
        source: &mut BatchSource,
        committer: &Committer,
    ) -> Result<(), WorkerError> {
        self.apply_revocations();
        let assigned = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        let mut fresh: Vec<i32> = match self.ledger.lock() {
            Ok(ledger) => assigned
                .into_iter()
                .filter(|p| !ledger.contains(*p))
                .collect(),
            Err(_) => Vec::new(),
        };
        if fresh.is_empty() {
            self.health.set(Condition::Restoring, false);
            // Records of a partition set up already (read before the source learnt it), or
            // of one no longer assigned (its next owner reads them).
            for p in source.unready_partitions() {
                if self.ledger.lock().is_ok_and(|l| l.contains(p)) {
                    source.ready(p, None);
                } else {
                    source.discard(p);
                }
            }
            // A partition set up here that the source let go of (its assignment was feared
            // lost) is taken on again, so it reads again.
            let known: Vec<i32> = self
                .ledger
                .lock()
                .map(|l| l.partitions().collect())
                .unwrap_or_default();
            for p in known {
                if !source.has(p) {
                    source.ready(p, None);
                }
            }
            return Ok(());
        }
        fresh.sort_unstable();
        if flights.busy() {
            self.land(flights.drain(self.drain_timeout).await, committer);
        }
        let mut committed = committer.committed(&fresh).await?;
        learn_claims_kept(&committed, source, committer);
        let saved = self.restorer.saved_windows(&committed).await;
        for a in committed.iter_mut() {
            // A broker that dropped the commit metadata: the copy on disk made at the
            // committed offset kept it.
            if let (None, None, Some(metadata)) = (
                &a.snapshot,
                &a.metadata,
                saved.get(&a.partition).and_then(|s| s.metadata.as_deref()),
            ) {
                a.read_metadata(&self.topo.input_topic, metadata);
            }
        }
        // Or the progress topic kept it: the entry written with the committed offset.
        if let Some(log) = committer.consumer().context().progress_log.clone() {
            let wanted: Vec<(i32, i64)> = committed
                .iter()
                .filter(|a| a.snapshot.is_none() && a.metadata.is_none())
                .filter_map(|a| a.offset.map(|o| (a.partition, o)))
                .collect();
            if !wanted.is_empty() {
                let kafka = self.kafka.clone();
                let found = tokio::task::spawn_blocking(move || {
                    progress_log::lookup(&kafka, log.topic(), &wanted, PROGRESS_LOOKUP)
                })
                .await
                .unwrap_or_default();
                for a in committed.iter_mut() {
                    if let Some(metadata) = found.get(&a.partition) {
                        a.read_metadata(&self.topo.input_topic, metadata);
                    }
                }
            }
        }
        let ends = self.check_progress(&mut committed).await;
        let done: Vec<(i32, Option<crate::progress::Progress>)> = committed
            .iter()
            .map(|a| (a.partition, a.progress.clone()))
            .collect();
        let restored: Vec<(i32, Arc<crate::recovery::Snapshot>, _)> = committed
            .iter()
            .map(|a| {
                (
                    a.partition,
                    Arc::new(a.snapshot.clone().unwrap_or_default()),
                    a.progress.clone(),
                )
            })
            .collect();
        self.restorer
            .restore(
                committed,
                saved,
                &self.ledger,
                &mut self.planner,
                &mut self.stage,
            )
            .await?;
        if let Ok(mut ledger) = self.ledger.lock() {
            for (partition, snapshot, claimed) in restored {
                // An input whose end is not known: its end is not passed.
                let end = ends.get(&partition).copied().unwrap_or(i64::MAX);
                ledger.inherit(partition, end, snapshot, claimed);
            }
        }
        for (partition, progress) in done {
            if let Some(p) = &progress {
                tracing::info!(
                    partition,
                    committed = p.base,
                    through = p.through,
                    orgs_open = p.open.len(),
                    "records done past the committed offset are passed over"
                );
            }
            source.ready(partition, progress);
        }
        // Ready again unless the group assigned more meanwhile (the next call restores them).
        let assigned = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        let more = match self.ledger.lock() {
            Ok(ledger) => assigned.iter().any(|p| !ledger.contains(*p)),
            Err(_) => false,
        };
        self.health.set(Condition::Restoring, more);
        Ok(())
    }

    /// Asks the broker what this group committed on its assigned partitions, to learn whether
    /// it keeps commit metadata (a group's first run has not read any at assignment). Bounded
    /// in time: an unanswered question is asked again later.
    async fn probe_claims_kept(&self, source: &mut BatchSource, committer: &Committer) {
        let mut assigned: Vec<i32> = self
            .assigned
            .lock()
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default();
        if assigned.is_empty() {
            return;
        }
        assigned.sort_unstable();
        if let Ok(Ok(committed)) =
            tokio::time::timeout(CLAIMS_PROBE_TIMEOUT, committer.committed(&assigned)).await
        {
            learn_claims_kept(&committed, source, committer);
        }
    }

    /// Checks recorded progress against the log: one that reaches past a partition's end
    /// is another incarnation's, and its records are read again instead (dedup drops what was
    /// done). A failure to ask the broker drops every record of progress: the same.
    ///
    /// Returns the input's end of each partition (the high watermark), where it was learnt.
    async fn check_progress(
        &self,
        committed: &mut [committer::Assigned],
    ) -> std::collections::HashMap<i32, i64> {
        let kafka = self.kafka.clone();
        let topic = self.topo.input_topic.clone();
        let marks =
            tokio::task::spawn_blocking(move || crate::recovery::watermarks(&kafka, &topic))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
        // Claims found in the log past its listed end: the end is at least there.
        let mut reached = std::collections::HashMap::new();
        for a in committed.iter_mut() {
            let Some(through) = a.progress.as_ref().map(|p| p.through) else {
                continue;
            };
            let listed = marks
                .get(&a.partition)
                .is_some_and(|(_, high)| a.progress.as_ref().is_some_and(|p| p.fits(*high)));
            // Past the listed end: the log may still hold it (a broker that lists its end short).
            let fits = listed || {
                let (kafka, topic, partition) = (
                    self.kafka.clone(),
                    self.topo.input_topic.clone(),
                    a.partition,
                );
                tokio::task::spawn_blocking(move || {
                    crate::kafka::io::reaches(&kafka, &topic, partition, through, PROGRESS_REACH)
                })
                .await
                .unwrap_or(false)
            };
            if !fits {
                tracing::warn!(
                    partition = a.partition,
                    "recorded progress does not fit the log: its records are read again"
                );
                a.progress = None;
            } else if !listed {
                reached.insert(a.partition, through);
            }
        }
        marks
            .into_iter()
            .map(|(p, (_, high))| (p, high.max(reached.get(&p).copied().unwrap_or(high))))
            .collect()
    }

    /// The ledger learns what the batch consumed, remembers its event ids (before the next
    /// batch is planned, so a duplicate across batches is dropped) and holds what the stage
    /// deferred. Returns the stage's position now for each partition of the batch, with the
    /// orgs and offsets it carries: what its flight makes committable.
    fn book_plan(&self, batch: &[Inbound], plan: &Plan) -> Vec<(i32, Booked)> {
        let Ok(mut ledger) = self.ledger.lock() else {
            return Vec::new();
        };
        let mut touched = Vec::new();
        // Per partition: each org's first offset in the batch, and the highest offset.
        let mut carried: std::collections::BTreeMap<
            i32,
            (std::collections::HashMap<fair::Org, i64>, i64),
        > = std::collections::BTreeMap::new();
        for message in batch {
            ledger.consumed(message.partition(), message.offset());
            touched.push(message.partition());
            let entry = carried
                .entry(message.partition())
                .or_insert_with(|| (std::collections::HashMap::new(), message.offset()));
            entry.1 = entry.1.max(message.offset());
            let org = message.key().unwrap_or_default();
            match entry.0.get_mut(org) {
                Some(first) => *first = (*first).min(message.offset()),
                None => {
                    entry.0.insert(org.to_vec(), message.offset());
                }
            }
        }
        for (partition, offset, key) in &plan.remember {
            if let Some(p) = ledger.get_mut(*partition) {
                p.window.insert(*key, *offset);
            }
        }
        for &index in &plan.deferred {
            let message = &batch[index];
            ledger.defer(message.partition(), message.offset(), message.clone());
        }
        touched.sort_unstable();
        touched.dedup();
        positions_of(&self.stage, &ledger, touched.into_iter())
            .into_iter()
            .map(|(p, mut booked)| {
                if let Some((open, reach)) = carried.remove(&p) {
                    booked.open = open.into_iter().collect();
                    booked.reach = Some(reach);
                }
                (p, booked)
            })
            .collect()
    }

    /// Stores the frontiers a landing moved and books its flights.
    fn land(&mut self, landing: Landing, committer: &Committer) {
        if let Ok(ledger) = self.ledger.lock() {
            committer.store(&ledger, landing.moved.into_iter());
        }
        for flight in landing.flights {
            self.tally.book(flight);
        }
    }

    /// Plans `part`. A transient failure is of infrastructure every record needs (the
    /// registry): consumption pauses and the part is planned again, with the retry schedule's
    /// waits and then its last wait repeated, never dead-lettered; readiness is false and
    /// `medallion_consumption_paused` is 1 meanwhile. Records at fault were already set apart
    /// (by the decoder, or by bisecting the stage's batch), so any other failure is no record's
    /// fault: the worker stops without committing the part rather than dead-letter good records.
    async fn plan_with_retry(&mut self, part: &[Inbound]) -> Result<Plan, WorkerError> {
        let mut attempt = 1usize;
        let paused = metrics::gauge!(m::CONSUMPTION_PAUSED, "stage" => self.topo.group.clone());
        let ledger = &self.ledger;
        let seen = |keys: &[(i32, u128)]| -> Option<Vec<bool>> {
            let ledger = ledger.lock().ok()?;
            Some(
                keys.iter()
                    .map(|(p, k)| ledger.get(*p).is_some_and(|p| p.window.contains(*k)))
                    .collect(),
            )
        };
        let plan = loop {
            match self.planner.plan(&mut self.stage, part, &seen).await {
                Ok(plan) => break plan,
                Err(e) if e.is_transient() => {
                    metrics::counter!(m::RETRIES_TOTAL, "stage" => self.topo.group.clone(), "reason" => e.reason()).increment(1);
                    self.health.set_registry_ok(false);
                    paused.set(1.0);
                    let wait = self.policy.wait_forever(attempt);
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(error = %e, attempt, ?wait, "the registry is unavailable; consumption paused until it answers");
                    }
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the worker stops; nothing of this batch is committed");
                    self.health.set_assigned(false);
                    paused.set(0.0);
                    return Err(WorkerError::Halted(e.to_string()));
                }
            }
        };
        if attempt > 1 {
            tracing::info!(
                attempts = attempt,
                "the registry answers again; consumption resumed"
            );
        }
        paused.set(0.0);
        self.health.set_registry_ok(true);
        Ok(plan)
    }

    /// Asks the stage for finished deferred work and due flushes, and launches what it hands
    /// over (the dead letters of deferred records that failed among it) as one flight, with the
    /// stage's positions now. Nothing to send and no position moved: no flight.
    async fn settle(
        &mut self,
        closing: bool,
        flights: &mut FlightTracker,
    ) -> Result<(), WorkerError> {
        self.apply_revocations();
        let mut settled = Collector::new();
        match self.stage.settle(closing, &mut settled).await {
            Ok(()) => {}
            Err(StageError::Halt(message)) => {
                self.health.set_assigned(false);
                return Err(WorkerError::Halted(message));
            }
            Err(e) => {
                tracing::error!(error = %e, "settling deferred work failed; it stays uncommitted");
                return Ok(());
            }
        }
        if settled.rows.is_some() || !settled.rejected.is_empty() || !settled.deferred.is_empty() {
            // Rows, rejections and deferrals name input rows: there are none here.
            return Err(WorkerError::Halted(
                "the stage's settle emitted rows, rejections or deferrals, which belong to a batch"
                    .into(),
            ));
        }
        let mut outgoing: Vec<Outgoing> = settled.side.into_iter().map(Outgoing::from).collect();
        let mut event_times = Vec::new();
        if let Err(e) = self
            .planner
            .output_events(&settled.events, &mut outgoing, &mut event_times)
        {
            self.health.set_assigned(false);
            return Err(WorkerError::Halted(e.to_string()));
        }
        // (origin, reason) of the deferred records that failed.
        let mut dead: Vec<((i32, i64), RecordFailure)> = Vec::new();
        let mut resolved = Vec::new();
        for r in settled.resolved {
            let message = match self.ledger.lock() {
                Ok(ledger) => ledger.deferred(r.partition, r.offset).cloned(),
                Err(_) => None,
            };
            let Some(message) = message else {
                continue;
            };
            if let Some(failure) = r.failure {
                outgoing.push(self.planner.dead_letter(&message, &failure, r.attempts));
                outgoing.extend(
                    self.planner
                        .dead_letter_audit(&message, &failure, r.attempts),
                );
                dead.push(((r.partition, r.offset), failure));
            }
            resolved.push((r.partition, r.offset));
        }
        let dropped = self.restorer.drop_replayed(&mut outgoing);
        let dead: Vec<RecordFailure> = dead
            .into_iter()
            .filter(|(origin, _)| !dropped.dead_letters.contains(origin))
            .map(|(_, failure)| failure)
            .collect();
        // Only positions that moved since the partition's last launched step.
        let commits: Vec<(i32, Booked)> = match self.ledger.lock() {
            Ok(ledger) => positions_of(&self.stage, &ledger, ledger.partitions())
                .into_iter()
                .filter(|(p, booked)| ledger.last_commit(*p) != Some(&booked.commit))
                .collect(),
            Err(_) => Vec::new(),
        };
        if outgoing.is_empty() && resolved.is_empty() && commits.is_empty() {
            return Ok(());
        }
        let booking = Booking {
            replayed: dropped.total(),
            dead,
            event_times,
            ..Booking::default()
        };
        let flight = flights.launch(outgoing, commits, booking).await;
        if let Ok(mut ledger) = self.ledger.lock() {
            for (partition, offset) in resolved {
                ledger.release(partition, offset, flight);
            }
        }
        Ok(())
    }

    /// Lets the stage drop the state of partitions revoked since the last call (the ledger
    /// dropped theirs in the revocation callback); their records go to the next owner.
    fn apply_revocations(&mut self) {
        let revoked: Vec<i32> = self
            .revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        for partition in revoked {
            self.stage.revoke(partition);
        }
    }
}

/// The stage's commit for each of `partitions` (consumed from) as things stand now: asked at
/// the lowest offset not taken into a batch.
fn positions_of<S: Stage>(
    stage: &S,
    ledger: &Ledger,
    partitions: impl Iterator<Item = i32>,
) -> Vec<(i32, Booked)> {
    partitions
        .filter_map(|p| {
            let next = ledger.position_offset(p)?;
            let (offset, metadata) = stage.position(p, next);
            Some((p, Booked::position(Commit { offset, metadata }, next)))
        })
        .collect()
}
