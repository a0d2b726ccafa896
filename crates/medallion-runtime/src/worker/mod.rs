//! The stage worker: poll a batch, decode (Avro → Arrow), drop redelivered events, run the
//! stage's transform, encode (Arrow → Avro), produce keyed by `org_id`, wait for every delivery,
//! and only then store the offsets for commit. Records that fail go to `<input>.dlq` with
//! their original bytes and headers; nothing is dropped silently.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::registry::{RegistryClient, RegistryError};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::WorkerConfig;
use crate::dedup::DedupWindow;
use crate::error::{RecordFailure, StageError};
use crate::http::Health;
use crate::kafka::{BatchProducer, BatchRecord, KafkaConnection, Role};
use crate::metrics as m;
use crate::retry::RetryPolicy;

mod plan;
mod rebalance;
mod recover;
mod setup;
mod stage;
mod telemetry;
mod topology;

use plan::*;
use rebalance::*;
pub use setup::prepare;
pub use stage::*;
use telemetry::*;
use topology::*;

/// A pipelined stage's batch goes in this many parts (fewer when that leaves a part smaller
/// than [`MIN_PIPELINE_PART`] records).
const PIPELINE_PARTS: usize = 4;
const MIN_PIPELINE_PART: usize = 256;

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
    Setup(String),
    #[error("HTTP listener: {0}")]
    Http(#[from] std::io::Error),
    #[error("stage halted: {0}")]
    Halted(String),
    #[error("{0}")]
    Recovery(#[from] crate::recovery::RecoveryError),
}

/// Live counters of a running worker, for the local mode's progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub consumed: std::sync::atomic::AtomicU64,
    pub produced: std::sync::atomic::AtomicU64,
    pub duplicates: std::sync::atomic::AtomicU64,
    pub dead_lettered: std::sync::atomic::AtomicU64,
}

/// Counts of one run, for the caller and the local mode.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunTotals {
    pub consumed: u64,
    pub produced: u64,
    pub duplicates: u64,
    pub dead_lettered: BTreeMap<String, u64>,
}

/// Wall-clock time, epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The runtime state of one worker.
pub struct StageWorker<S: Stage> {
    stage: S,
    kafka: KafkaConnection,
    topo: Topology,
    registry: Arc<RegistryClient>,
    decoder: BatchDecoder,
    /// `None` for a sink group.
    encoder: Option<BatchEncoder>,
    /// The output contract's Arrow schema (what the encoder takes).
    telemetry: Option<Telemetry>,
    windows: HashMap<i32, DedupWindow>,
    window_capacity: usize,
    policy: RetryPolicy,
    health: Arc<Health>,
    assigned: Arc<Mutex<HashSet<i32>>>,
    positions: Positions,
    revoked: Arc<Mutex<Vec<i32>>>,
    /// Partitions the stage has been told about (and has restored state for).
    initialized: HashSet<i32>,
    /// The next offset to consume, by partition.
    next_offsets: BTreeMap<i32, i64>,
    /// Records whose outcome the stage has not reported yet, by partition and offset.
    deferred: HashMap<i32, BTreeMap<i64, OwnedMessage>>,
    totals: RunTotals,
    progress: Arc<Progress>,
    /// Where this worker's outputs stood after its last delivery (stored with every offset),
    /// and where they stood when it started (for partitions it has not produced to).
    outputs_at: crate::recovery::Snapshot,
    outputs_at_start: crate::recovery::Snapshot,
    /// Event keys of outputs a previous owner produced after its last commit, and the input
    /// records it dead-lettered then: not produced again (see [`crate::recovery`]).
    replayed: DedupWindow,
    dead_before: HashSet<(i32, i64)>,
}

impl<S: Stage> StageWorker<S> {
    pub fn input_topic(&self) -> &str {
        &self.topo.input_topic
    }

    /// `None` for a sink group.
    pub fn output_topic(&self) -> Option<&str> {
        self.topo.output.as_ref().map(|o| o.topic.as_str())
    }

    /// Live counters, updated after every batch.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Runs until `shutdown` resolves: then finishes the batch in hand, commits, leaves the group.
    pub async fn run<C>(
        mut self,
        config: &WorkerConfig<C>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunTotals, WorkerError> {
        let consumer: Arc<StreamConsumer<WorkerContext>> =
            Arc::new(self.kafka.create_with_context(
                Role::StageConsumer {
                    group: &self.topo.group,
                    session_timeout_ms: config.kafka.session_timeout_ms,
                },
                "consumer",
                WorkerContext {
                    health: self.health.clone(),
                    assigned: self.assigned.clone(),
                    topic: self.topo.input_topic.clone(),
                    positions: self.positions.clone(),
                    revoked: self.revoked.clone(),
                },
            )?);
        let producer = BatchProducer::new(&self.kafka.config(Role::Producer {
            message_timeout_ms: u64::from(config.kafka.produce_timeout_ms),
        }))?;
        self.outputs_at_start = self.outputs_now().await?;
        self.outputs_at = self.outputs_at_start.clone();
        consumer.subscribe(&[&self.topo.input_topic])?;
        let lag = tokio::spawn(lag_loop(
            consumer.clone(),
            self.topo.group.clone(),
            self.topo.input_topic.clone(),
        ));

        metrics::gauge!(m::CONSUMPTION_PAUSED, "stage" => self.topo.group.clone()).set(0.0);
        // Consumer errors in a row, for the backoff between them.
        let mut consumer_errors = 0usize;
        let max_records = config.batch.max_records;
        let linger = Duration::from_millis(config.batch.linger_ms);
        tokio::pin!(shutdown);
        loop {
            self.health.beat();
            let first = tokio::select! {
                _ = &mut shutdown => break,
                polled = tokio::time::timeout(Duration::from_millis(500), consumer.recv()) => polled,
            };
            let Ok(first) = first else {
                self.settle(false, &producer, &consumer).await?;
                continue;
            };
            let first = match first {
                Ok(message) => message.detach(),
                Err(e) => {
                    consumer_errors = self.consumer_error(&e, consumer_errors).await;
                    continue;
                }
            };
            consumer_errors = 0;
            let mut batch = vec![first];
            let deadline = Instant::now() + linger;
            while batch.len() < max_records {
                // A message already fetched is taken without arming a timer; the clock is
                // read every 256 messages so a steady stream still closes the batch on time.
                if batch.len() % 256 == 0 && Instant::now() >= deadline {
                    break;
                }
                let next = match futures::FutureExt::now_or_never(consumer.recv()) {
                    Some(polled) => Ok(polled),
                    None => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::timeout(left, consumer.recv()).await
                    }
                };
                match next {
                    Ok(Ok(message)) => batch.push(message.detach()),
                    Ok(Err(e)) => {
                        // The batch so far is good; the error is dealt with after it.
                        consumer_errors = self.consumer_error(&e, consumer_errors).await;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.process_batch(&batch, &producer, &consumer).await?;
        }
        lag.abort();
        tracing::info!("shutting down: settling work in flight, committing and leaving the group");
        self.settle(true, &producer, &consumer).await?;
        if let Err(e) = commit_positions(
            consumer.as_ref(),
            &self.topo.input_topic,
            &self.positions,
            None,
        ) {
            if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                tracing::warn!(error = %e, "final commit failed");
            }
        }
        // The final lag, so a scrape after the drain sees where the group stopped.
        publish_lag(consumer.clone(), &self.topo.group, &self.topo.input_topic).await;
        consumer.unsubscribe();
        self.health.set_assigned(false);
        Ok(self.totals)
    }

    /// A consumer error (a failed fetch, a topic not there yet, a broker away): logged,
    /// counted and survived; librdkafka reconnects and refetches by itself. Consecutive errors
    /// back off along the retry schedule so a lasting one does not spin. Returns the new count.
    async fn consumer_error(&self, error: &KafkaError, in_a_row: usize) -> usize {
        let code = error
            .rdkafka_error_code()
            .map_or_else(|| "client".to_string(), |c| format!("{c:?}"));
        metrics::counter!(m::CONSUMER_ERRORS_TOTAL, "stage" => self.topo.group.clone(), "error" => code)
            .increment(1);
        let in_a_row = in_a_row + 1;
        let wait = self
            .policy
            .wait_forever(in_a_row)
            .min(Duration::from_secs(5));
        if in_a_row == 1 || in_a_row.is_multiple_of(20) {
            tracing::warn!(%error, in_a_row, ?wait, "consumer error; carrying on");
        }
        tokio::time::sleep(wait).await;
        in_a_row
    }

    async fn process_batch(
        &mut self,
        batch: &[OwnedMessage],
        producer: &BatchProducer,
        consumer: &Arc<StreamConsumer<WorkerContext>>,
    ) -> Result<(), WorkerError> {
        let started = Instant::now();
        let group = self.topo.group.clone();
        let topic = self.topo.input_topic.clone();
        let bytes: usize = batch
            .iter()
            .map(|m| m.payload().map_or(0, <[u8]>::len))
            .sum();
        metrics::counter!(m::KAFKA_MESSAGES_IN_TOTAL, "group" => group.clone(), "topic" => topic.clone()).increment(batch.len() as u64);
        metrics::counter!(m::KAFKA_BYTES_IN_TOTAL, "group" => group.clone(), "topic" => topic)
            .increment(bytes as u64);
        self.prune_windows();
        self.sync_partitions(batch, consumer).await?;

        // A pipelined stage takes the batch in parts: part k+1 is planned while part k's
        // records are acknowledged. The consumer is not polled meanwhile, so no rebalance
        // can come between a part's acknowledgement and its stored offset.
        let part_len = if self.stage.pipelined() {
            batch.len().div_ceil(PIPELINE_PARTS).max(MIN_PIPELINE_PART)
        } else {
            batch.len()
        };
        let mut parts = batch.chunks(part_len.max(1));
        let Some(first) = parts.next() else {
            return Ok(());
        };
        // (part, its plan, when its planning began): etl.execution reports each part's time.
        let mut current = (first, self.plan_with_retry(first).await?, started);
        loop {
            let (part, mut plan, part_started) = current;
            let telemetry = self.batch_telemetry(part, &plan, part_started.elapsed());
            plan.outgoing.extend(telemetry);
            plan.duplicates += self.drop_replayed(&mut plan.outgoing);
            // Remembered before the next part is planned, so a duplicate across parts is
            // dropped. Delivery does not give up (it pauses consumption), so nothing
            // remembered here goes unsent while the process lives.
            for (partition, key) in &plan.remember {
                self.windows
                    .entry(*partition)
                    .or_insert_with(|| DedupWindow::new(self.window_capacity))
                    .insert(*key);
            }
            let next = match parts.next() {
                Some(next_part) => {
                    let policy = self.policy.clone();
                    let next_started = Instant::now();
                    let (_, planned) = tokio::join!(
                        deliver(&policy, &group, &plan.outgoing, producer),
                        self.plan_with_retry(next_part)
                    );
                    Some((next_part, planned, next_started))
                }
                None => {
                    deliver(&self.policy, &group, &plan.outgoing, producer).await;
                    None
                }
            };
            // Everything derived from the part is acknowledged: store its offsets, with where
            // the outputs stand now.
            self.note_acked(producer);
            self.finish(part, plan, consumer);
            match next {
                Some((next_part, planned, next_started)) => {
                    current = (next_part, planned?, next_started)
                }
                None => break,
            }
        }
        metrics::histogram!(m::BATCH_DURATION_SECONDS, "stage" => group.clone())
            .record(started.elapsed().as_secs_f64());
        let (events, bytes) = self
            .windows
            .values()
            .fold((0, 0), |(e, b), w| (e + w.len(), b + w.approx_bytes()));
        metrics::gauge!(m::DEDUP_WINDOW_EVENTS, "stage" => group.clone()).set(events as f64);
        metrics::gauge!(m::DEDUP_WINDOW_BYTES, "stage" => group).set(bytes as f64);
        self.settle(false, producer, consumer).await
    }

    /// Plans `part`. A transient failure is of infrastructure every record needs (the
    /// registry): consumption pauses and the part is planned again, with the retry schedule's
    /// waits and then its last wait repeated, never dead-lettered; readiness is false and
    /// `medallion_consumption_paused` is 1 meanwhile. A halt stops the worker. Any other
    /// failure here happened before the stage (decoding the batch as a whole): the part is
    /// dead-lettered with it.
    async fn plan_with_retry(&mut self, part: &[OwnedMessage]) -> Result<Plan, WorkerError> {
        let mut attempt = 1usize;
        let paused = metrics::gauge!(m::CONSUMPTION_PAUSED, "stage" => self.topo.group.clone());
        let plan = loop {
            match self.plan(part).await {
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
                Err(StageError::Halt(message)) => {
                    tracing::error!(%message, "stage halted the pipeline; nothing of this batch is committed");
                    self.health.set_assigned(false);
                    paused.set(0.0);
                    return Err(WorkerError::Halted(message));
                }
                Err(e) => {
                    tracing::error!(error = %e, "batch failed before the stage; dead-lettering it");
                    break self.dead_letter_all(
                        part,
                        RecordFailure::poison(e.reason(), e.to_string()),
                        attempt,
                    );
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

    /// Books a delivered part: offsets, deferred records, totals and metrics.
    fn finish(
        &mut self,
        part: &[OwnedMessage],
        plan: Plan,
        consumer: &StreamConsumer<WorkerContext>,
    ) {
        let group = self.topo.group.clone();
        let topic = self.topo.input_topic.clone();
        let mut touched = BTreeMap::new();
        for message in part {
            let next = self.next_offsets.entry(message.partition()).or_insert(0);
            *next = (*next).max(message.offset() + 1);
            touched.insert(message.partition(), ());
        }
        for &index in &plan.deferred {
            let message = &part[index];
            self.deferred
                .entry(message.partition())
                .or_default()
                .insert(message.offset(), message.clone());
        }
        self.store_positions(touched.keys().copied(), consumer);

        let output_topic = self.output_topic().unwrap_or_default().to_string();
        let produced = plan
            .outgoing
            .iter()
            .filter(|o| o.topic == output_topic)
            .count() as u64;
        self.totals.consumed += part.len() as u64;
        self.totals.produced += produced;
        self.totals.duplicates += plan.duplicates;
        {
            use std::sync::atomic::Ordering::Relaxed;
            self.progress.consumed.fetch_add(part.len() as u64, Relaxed);
            self.progress.produced.fetch_add(produced, Relaxed);
            self.progress.duplicates.fetch_add(plan.duplicates, Relaxed);
        }
        if self.topo.output.is_some() {
            metrics::counter!(m::RECORDS_OUT_TOTAL, "stage" => group.clone(), "topic" => output_topic).increment(produced);
        }
        metrics::counter!(m::DUPLICATES_TOTAL, "stage" => group.clone(), "topic" => topic.clone())
            .increment(plan.duplicates);
        self.count_dead_letters(plan.dead.iter().map(|(_, failure)| failure));
        let now = now_ms();
        let latency = metrics::histogram!(m::EVENT_LATENCY_SECONDS, "stage" => group);
        for t in &plan.event_times {
            latency.record((now - t).max(0) as f64 / 1_000.0);
        }
    }

    /// Counts dead letters that were delivered: run totals, progress and the DLQ metric.
    fn count_dead_letters<'f>(&mut self, failures: impl Iterator<Item = &'f RecordFailure>) {
        let mut count = 0u64;
        for failure in failures {
            count += 1;
            *self
                .totals
                .dead_lettered
                .entry(failure.reason.clone())
                .or_default() += 1;
            metrics::counter!(m::DLQ_RECORDS_TOTAL, "stage" => self.topo.group.clone(), "topic" => self.topo.input_topic.clone(), "class" => failure.class.as_str(), "reason" => failure.reason.clone()).increment(1);
        }
        self.progress
            .dead_lettered
            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stores, for each of `partitions`, the offset to commit: the stage's position, held
    /// back to the first record whose outcome the stage has not reported yet.
    fn store_positions(
        &mut self,
        partitions: impl Iterator<Item = i32>,
        consumer: &StreamConsumer<WorkerContext>,
    ) {
        let topic = self.topo.input_topic.clone();
        let assigned = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        for partition in partitions {
            let Some(&next) = self.next_offsets.get(&partition) else {
                continue;
            };
            // A partition that moved to another replica is not ours to commit.
            if !assigned.contains(&partition) {
                continue;
            }
            let (mut commit, stage_metadata) = self.stage.position(partition, next);
            let metadata = Some(crate::recovery::wrap(
                &self.outputs_at,
                stage_metadata.as_deref(),
            ));
            if let Some(first) = self
                .deferred
                .get(&partition)
                .and_then(|d| d.keys().next().copied())
            {
                commit = commit.min(first);
            }
            let unchanged = self
                .positions
                .lock()
                .map(|p| p.get(&partition) == Some(&(commit, metadata.clone())))
                .unwrap_or(false);
            if unchanged {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            let stored = tpl
                .add_partition_offset(&topic, partition, Offset::Offset(commit))
                .and_then(|()| {
                    if let (Some(metadata), Some(mut elem)) =
                        (metadata.as_ref(), tpl.find_partition(&topic, partition))
                    {
                        elem.set_metadata(metadata);
                    }
                    consumer.store_offsets(&tpl)
                });
            match stored {
                Ok(()) => {
                    if let Ok(mut positions) = self.positions.lock() {
                        positions.insert(partition, (commit, metadata));
                    }
                }
                // The partition moved to another replica meanwhile: it will redeliver.
                Err(e) => tracing::warn!(partition, commit, error = %e, "offset not stored"),
            }
        }
    }

    /// Asks the stage for finished deferred work and due flushes, dead-letters what failed,
    /// delivers what it hands over and stores the offsets that can now advance.
    async fn settle(
        &mut self,
        closing: bool,
        producer: &BatchProducer,
        consumer: &StreamConsumer<WorkerContext>,
    ) -> Result<(), WorkerError> {
        self.apply_revocations();
        let settled = match self.stage.settle(closing).await {
            Ok(settled) => settled,
            Err(StageError::Halt(message)) => {
                self.health.set_assigned(false);
                return Err(WorkerError::Halted(message));
            }
            Err(e) => {
                tracing::error!(error = %e, "settling deferred work failed; it stays uncommitted");
                return Ok(());
            }
        };
        let mut outgoing: Vec<Outgoing> = settled.side.into_iter().map(Outgoing::from).collect();
        let mut dead = Vec::new();
        for resolved in settled.resolved {
            let Some(message) = self
                .deferred
                .get_mut(&resolved.partition)
                .and_then(|d| d.remove(&resolved.offset))
            else {
                continue;
            };
            if let Some(failure) = resolved.failure {
                outgoing.push(self.dead_letter(&message, &failure, resolved.attempts));
                outgoing.extend(self.dead_letter_audit(&message, &failure, resolved.attempts));
                dead.push(failure);
            }
        }
        self.drop_replayed(&mut outgoing);
        deliver(&self.policy, &self.topo.group, &outgoing, producer).await;
        self.note_acked(producer);
        self.count_dead_letters(dead.iter());
        let partitions: Vec<i32> = self.next_offsets.keys().copied().collect();
        self.store_positions(partitions.into_iter(), consumer);
        Ok(())
    }

    /// Forgets the state of partitions revoked since the last call; their records go to the
    /// next owner.
    fn apply_revocations(&mut self) {
        let revoked: Vec<i32> = self
            .revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        for partition in revoked {
            self.next_offsets.remove(&partition);
            self.deferred.remove(&partition);
            if self.initialized.remove(&partition) {
                self.stage.revoke(partition);
            }
        }
    }

    fn prune_windows(&mut self) {
        if let Ok(assigned) = self.assigned.lock() {
            self.windows.retain(|p, _| assigned.contains(p));
        }
    }
}

/// Produces every record and waits for every acknowledgement. A failed delivery means the
/// broker is unavailable: consumption pauses (this call does not return) and the failed
/// records are sent again with backoff until the broker takes them.
async fn deliver(
    policy: &RetryPolicy,
    group: &str,
    outgoing: &[Outgoing],
    producer: &BatchProducer,
) {
    let mut pending: Vec<usize> = (0..outgoing.len()).collect();
    let mut retry = 0usize;
    while !pending.is_empty() {
        let failures = producer
            .send_all(&pending, |i| {
                let o = &outgoing[i];
                BatchRecord {
                    topic: &o.topic,
                    partition: o.partition,
                    key: o.key.as_deref(),
                    value: o.value.as_ref(),
                    headers: o.headers.as_ref(),
                }
            })
            .await;
        let failed = failures.indexes;
        if let Some(e) = &failures.first_error {
            tracing::warn!(error = %e, records = failed.len(), "delivery failed");
        }
        if failed.is_empty() {
            break;
        }
        retry += 1;
        metrics::counter!(m::RETRIES_TOTAL, "stage" => group.to_string(), "reason" => "broker_unavailable").increment(1);
        let wait = policy.wait_forever(retry);
        tracing::warn!(
            records = failed.len(),
            ?wait,
            "broker unavailable; pausing consumption"
        );
        tokio::time::sleep(wait).await;
        pending = failed;
    }
}
