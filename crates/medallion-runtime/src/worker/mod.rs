//! The stage worker: poll a batch, decode (Avro → Arrow), drop redelivered events, run the
//! stage's transform, encode (Arrow → Avro), and launch the records derived from the batch as
//! one *flight* to the producer, without waiting: the next batch is polled and planned while
//! earlier flights are acknowledged. Records that fail go to `<input>.dlq` with their original
//! bytes and headers; nothing is dropped silently.
//!
//! Commit points. An input offset is stored for commit only when it is on its partition's
//! *ack frontier* ([`ledger`]): every flight carrying records derived from it or from an
//! earlier offset of its partition has landed (each record acknowledged by the broker), and no
//! earlier record of the partition is still deferred by the stage. The stage's position
//! ([`Stage::position`]) is taken when a batch is planned and becomes committable with that
//! batch's flight. Stored offsets are committed (1) every second by librdkafka, (2) in the
//! revocation callback, after the revoked partitions' flights landed, and (3) at shutdown,
//! after every flight landed. Nothing is committed past an unacknowledged record. In-flight
//! work is bounded by `batch.max_in_flight_records` and `batch.max_in_flight_bytes`.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::registry::{RegistryClient, RegistryError};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;

use crate::config::WorkerConfig;
use crate::dedup::DedupWindow;
use crate::error::{RecordFailure, SetupError, StageError};
use crate::http::Health;
use crate::kafka::{BatchProducer, FlightId, KafkaConnection, Role};
use crate::metrics as m;
use crate::record::Inbound;
use crate::retry::RetryPolicy;

mod ledger;
mod plan;
mod rebalance;
mod recover;
mod setup;
mod stage;
mod telemetry;
mod topology;

use ledger::{Commit, Ledger};
use plan::*;
use rebalance::*;
pub use setup::prepare;
pub use stage::*;
use telemetry::*;
use topology::*;

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
    /// Encodes the stage's [`OutputEvent`]s to the output contract (`None` for a sink group).
    event_encoder: Option<JsonEncoder>,
    telemetry: Option<Telemetry>,
    window_capacity: usize,
    policy: RetryPolicy,
    health: Arc<Health>,
    /// The consumer's assignment (updated by the rebalance hooks).
    assigned: Arc<Mutex<HashSet<i32>>>,
    positions: Positions,
    revoked: Arc<Mutex<Vec<i32>>>,
    /// Every assigned partition the stage has been told about (see [`ledger`]).
    ledger: Arc<Mutex<Ledger>>,
    /// Partitions of keyed records on topics with their own `partitioner`.
    placement: crate::kafka::Placement,
    /// Flights launched and not landed, with what to book when they land.
    in_flight: BTreeMap<FlightId, Flight>,
    limits: InFlightLimits,
    totals: RunTotals,
    progress: Arc<Progress>,
    /// Where this worker's outputs stood when it started (for partitions it has not produced
    /// to since).
    outputs_at_start: crate::recovery::Snapshot,
    /// Event keys of outputs a previous owner produced after its last commit, and the input
    /// records it dead-lettered then: not produced again (see [`crate::recovery`]).
    replayed: DedupWindow,
    dead_before: HashSet<(i32, i64)>,
}

/// Bounds on work in flight: beyond either, the worker waits for a landing before it polls.
#[derive(Debug, Clone, Copy)]
struct InFlightLimits {
    records: usize,
    bytes: usize,
}

/// A launched flight: its records (kept to send again what the broker refused) and what to
/// count once it lands.
struct Flight {
    outgoing: Vec<Outgoing>,
    /// The indexes of `outgoing` this flight carries (all, or those sent again).
    indexes: Vec<usize>,
    bytes: usize,
    booking: Booking,
    /// How many times its records were sent again.
    retries: usize,
}

/// What a landed flight adds to the totals and metrics.
#[derive(Default)]
struct Booking {
    consumed: u64,
    duplicates: u64,
    dead: Vec<RecordFailure>,
    /// Event timestamps (ms) of produced outputs, for the latency histogram.
    event_times: Vec<i64>,
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
        self.progress.clone()
    }

    /// Runs until `shutdown` resolves: then finishes the batch in hand, waits for every flight
    /// to land, commits and leaves the group.
    pub async fn run<C>(
        mut self,
        config: &WorkerConfig<C>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<RunTotals, WorkerError> {
        let producer = BatchProducer::new(&self.kafka.config(Role::Producer {
            message_timeout_ms: u64::from(config.kafka.produce_timeout_ms),
        }))?
        .with_placement(self.placement.clone());
        let drain_timeout = Duration::from_millis(u64::from(config.kafka.produce_timeout_ms));
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
                    ledger: self.ledger.clone(),
                    flights: producer.flights(),
                    drain_timeout,
                    revoked: self.revoked.clone(),
                },
            )?);
        self.outputs_at_start = self.outputs_now().await?;
        consumer.subscribe(&[&self.topo.input_topic])?;
        let lag = tokio::spawn(lag_loop(
            consumer.clone(),
            self.topo.group.clone(),
            self.topo.input_topic.clone(),
        ));

        let paused = metrics::gauge!(m::CONSUMPTION_PAUSED, "stage" => self.topo.group.clone());
        paused.set(0.0);
        // Consumer errors in a row, for the backoff between them.
        let mut consumer_errors = 0usize;
        let max_records = config.batch.max_records;
        let linger = Duration::from_millis(config.batch.linger_ms);
        tokio::pin!(shutdown);
        loop {
            self.health.beat();
            self.land(&producer, &consumer).await;
            // Backpressure: too much in flight, or the broker refusing records, and the worker
            // waits for flights to land before it takes more input.
            if self.over_limits() || self.resending() {
                paused.set(if self.resending() { 1.0 } else { 0.0 });
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = producer.landing() => {},
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {},
                }
                continue;
            }
            paused.set(0.0);
            let first = tokio::select! {
                _ = &mut shutdown => break,
                _ = producer.landing(), if !self.in_flight.is_empty() => continue,
                polled = tokio::time::timeout(Duration::from_millis(500), consumer.recv()) => polled,
            };
            let Ok(first) = first else {
                self.settle(false, &producer).await?;
                continue;
            };
            let first = match first {
                Ok(message) => Inbound::copy_of(&message),
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
                    Ok(Ok(message)) => batch.push(Inbound::copy_of(&message)),
                    Ok(Err(e)) => {
                        // The batch so far is good; the error is dealt with after it.
                        consumer_errors = self.consumer_error(&e, consumer_errors).await;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = self.process_batch(batch, &producer, &consumer).await {
                // What earlier batches launched is still committed once it lands.
                self.drain(&producer, &consumer, drain_timeout).await;
                let _ = commit_positions(
                    consumer.as_ref(),
                    &self.topo.input_topic,
                    &self.positions,
                    None,
                );
                return Err(e);
            }
        }
        lag.abort();
        tracing::info!("shutting down: settling work in flight, committing and leaving the group");
        self.settle(true, &producer).await?;
        self.drain(&producer, &consumer, drain_timeout).await;
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

    /// One batch, top to bottom: set up newly assigned partitions → decode → dedup → stage →
    /// launch its flight (not waiting for it) → let the stage settle what is due.
    async fn process_batch(
        &mut self,
        mut batch: Vec<Inbound>,
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
        self.sync_partitions(consumer).await?;
        // Records of a partition revoked while the batch was polled belong to its next owner.
        if let Ok(ledger) = self.ledger.lock() {
            batch.retain(|m| ledger.contains(m.partition()));
        }
        if batch.is_empty() {
            return Ok(());
        }

        let mut plan = self.plan_with_retry(&batch).await?;
        let telemetry = self.batch_telemetry(&batch, &plan, started.elapsed());
        plan.outgoing.extend(telemetry);
        let replayed = self.drop_replayed(&mut plan.outgoing);

        // The ledger learns what the batch consumed, remembers its event ids (before the next
        // batch is planned, so a duplicate across batches is dropped) and holds what the stage
        // deferred; the stage's position now is what its flight makes committable.
        let mut touched = Vec::new();
        if let Ok(mut ledger) = self.ledger.lock() {
            for message in &batch {
                ledger.consumed(message.partition(), message.offset());
                touched.push(message.partition());
            }
            for (partition, key) in &plan.remember {
                if let Some(p) = ledger.get_mut(*partition) {
                    p.window.insert(*key);
                }
            }
            for &index in &plan.deferred {
                let message = &batch[index];
                ledger.defer(message.partition(), message.offset(), message.clone());
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let booking = Booking {
            consumed: batch.len() as u64,
            duplicates: plan.duplicates + replayed,
            dead: plan.dead.into_iter().map(|(_, failure)| failure).collect(),
            event_times: plan.event_times,
        };
        let commits = match self.ledger.lock() {
            Ok(ledger) => self.positions_of(&ledger, touched.into_iter()),
            Err(_) => Vec::new(),
        };
        self.launch(plan.outgoing, commits, booking, producer).await;
        metrics::histogram!(m::BATCH_DURATION_SECONDS, "stage" => group.clone())
            .record(started.elapsed().as_secs_f64());
        if let Ok(ledger) = self.ledger.lock() {
            let (events, bytes) = ledger
                .partitions()
                .filter_map(|p| ledger.get(p))
                .fold((0, 0), |(e, b), p| {
                    (e + p.window.len(), b + p.window.approx_bytes())
                });
            metrics::gauge!(m::DEDUP_WINDOW_EVENTS, "stage" => group.clone()).set(events as f64);
            metrics::gauge!(m::DEDUP_WINDOW_BYTES, "stage" => group).set(bytes as f64);
        }
        self.settle(false, producer).await
    }

    /// The stage's commit for each of `partitions` (consumed from) as things stand now.
    fn positions_of(
        &self,
        ledger: &Ledger,
        partitions: impl Iterator<Item = i32>,
    ) -> Vec<(i32, Commit)> {
        partitions
            .filter_map(|p| {
                let next = ledger.next_offset(p)?;
                let (offset, metadata) = self.stage.position(p, next);
                Some((p, Commit { offset, metadata }))
            })
            .collect()
    }

    /// Launches `outgoing` as one flight; once it lands, each of `commits` may be committed.
    async fn launch(
        &mut self,
        outgoing: Vec<Outgoing>,
        commits: Vec<(i32, Commit)>,
        booking: Booking,
        producer: &BatchProducer,
    ) -> FlightId {
        let outputs_before = Arc::new(self.outputs_acked(producer));
        let indexes: Vec<usize> = (0..outgoing.len()).collect();
        let flight = producer.launch(&indexes, |i| outgoing[i].record()).await;
        if let Ok(mut ledger) = self.ledger.lock() {
            for (partition, commit) in commits {
                ledger.launched(flight, partition, commit, outputs_before.clone());
            }
        }
        let bytes = outgoing.iter().map(|o| o.value.len()).sum();
        self.in_flight.insert(
            flight,
            Flight {
                outgoing,
                indexes,
                bytes,
                booking,
                retries: 0,
            },
        );
        flight
    }

    /// Books every flight that landed: advances the ledger, stores the frontiers that moved,
    /// counts what was delivered. A flight with records the broker refused is not booked: its
    /// refused records go again, with backoff (the broker is unavailable; no new input is taken
    /// meanwhile), and the ledger waits on the new flight instead.
    async fn land(&mut self, producer: &BatchProducer, consumer: &StreamConsumer<WorkerContext>) {
        let landed = producer.take_landed();
        if landed.is_empty() {
            return;
        }
        let mut moved = Vec::new();
        for l in landed {
            let Some(mut flight) = self.in_flight.remove(&l.flight) else {
                continue;
            };
            if !l.failures.indexes.is_empty() {
                flight.retries += 1;
                metrics::counter!(m::RETRIES_TOTAL, "stage" => self.topo.group.clone(), "reason" => "broker_unavailable").increment(1);
                let wait = self.policy.wait_forever(flight.retries);
                tracing::warn!(
                    error = ?l.failures.first_error,
                    records = l.failures.indexes.len(),
                    ?wait,
                    "delivery failed; the broker is unavailable: pausing consumption and sending them again"
                );
                tokio::time::sleep(wait).await;
                flight.indexes = l.failures.indexes;
                let retry = producer
                    .launch(&flight.indexes, |i| flight.outgoing[i].record())
                    .await;
                if let Ok(mut ledger) = self.ledger.lock() {
                    ledger.relaunched(l.flight, retry);
                }
                self.in_flight.insert(retry, flight);
                continue;
            }
            if let Ok(mut ledger) = self.ledger.lock() {
                moved.extend(ledger.landed(l.flight));
            }
            self.book(flight);
        }
        moved.sort_unstable();
        moved.dedup();
        if let Ok(ledger) = self.ledger.lock() {
            store_frontiers(
                consumer,
                &self.topo.input_topic,
                &ledger,
                &self.positions,
                moved.into_iter(),
            );
        }
    }

    /// Totals, progress and metrics of a landed flight.
    fn book(&mut self, flight: Flight) {
        let group = self.topo.group.clone();
        let output_topic = self.output_topic().unwrap_or_default().to_string();
        let produced = flight
            .outgoing
            .iter()
            .filter(|o| o.topic == output_topic)
            .count() as u64;
        let b = flight.booking;
        self.totals.consumed += b.consumed;
        self.totals.produced += produced;
        self.totals.duplicates += b.duplicates;
        {
            use std::sync::atomic::Ordering::Relaxed;
            self.progress.consumed.fetch_add(b.consumed, Relaxed);
            self.progress.produced.fetch_add(produced, Relaxed);
            self.progress.duplicates.fetch_add(b.duplicates, Relaxed);
        }
        if self.topo.output.is_some() && produced > 0 {
            metrics::counter!(m::RECORDS_OUT_TOTAL, "stage" => group.clone(), "topic" => output_topic).increment(produced);
        }
        metrics::counter!(m::DUPLICATES_TOTAL, "stage" => group.clone(), "topic" => self.topo.input_topic.clone())
            .increment(b.duplicates);
        self.count_dead_letters(b.dead.iter());
        let now = now_ms();
        let latency = metrics::histogram!(m::EVENT_LATENCY_SECONDS, "stage" => group);
        for t in &b.event_times {
            latency.record((now - t).max(0) as f64 / 1_000.0);
        }
    }

    /// Whether work in flight is at a limit.
    fn over_limits(&self) -> bool {
        let records: usize = self.in_flight.values().map(|f| f.indexes.len()).sum();
        let bytes: usize = self.in_flight.values().map(|f| f.bytes).sum();
        records >= self.limits.records || bytes >= self.limits.bytes
    }

    /// Whether refused records are being sent again.
    fn resending(&self) -> bool {
        self.in_flight.values().any(|f| f.retries > 0)
    }

    /// Waits (up to `timeout`) for every flight to land, booking them as they do.
    async fn drain(
        &mut self,
        producer: &BatchProducer,
        consumer: &StreamConsumer<WorkerContext>,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            self.land(producer, consumer).await;
            if self.in_flight.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    flights = self.in_flight.len(),
                    "records still unacknowledged at shutdown; committing before them"
                );
                return;
            }
            let _ = tokio::time::timeout(left, producer.landing()).await;
        }
    }

    /// Where the outputs stand by this producer's acknowledgements (from where they stood at
    /// start for partitions it has not produced to).
    fn outputs_acked(&self, producer: &BatchProducer) -> crate::recovery::Snapshot {
        let merge = |start: &BTreeMap<i32, i64>, acked: BTreeMap<i32, i64>| {
            let mut out = start.clone();
            for (p, o) in acked {
                let at = out.entry(p).or_insert(o);
                *at = (*at).max(o);
            }
            out
        };
        crate::recovery::Snapshot {
            output: match &self.topo.output {
                Some(out) => merge(&self.outputs_at_start.output, producer.acked(&out.topic)),
                None => BTreeMap::new(),
            },
            dlq: merge(
                &self.outputs_at_start.dlq,
                producer.acked(&self.topo.dlq_topic),
            ),
        }
    }

    /// Asks the stage for finished deferred work and due flushes, and launches what it hands
    /// over (the dead letters of deferred records that failed among it) as one flight, with the
    /// stage's positions now. Nothing to send and no position moved: no flight.
    async fn settle(&mut self, closing: bool, producer: &BatchProducer) -> Result<(), WorkerError> {
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
        let mut resolved = Vec::new();
        for r in settled.resolved {
            let message = match self.ledger.lock() {
                Ok(ledger) => ledger.deferred(r.partition, r.offset).cloned(),
                Err(_) => None,
            };
            let Some(message) = message else {
                continue;
            };
            if let Some(failure) = &r.failure {
                outgoing.push(self.dead_letter(&message, failure, r.attempts));
                outgoing.extend(self.dead_letter_audit(&message, failure, r.attempts));
                dead.push(failure.clone());
            }
            resolved.push((r.partition, r.offset));
        }
        let replayed = self.drop_replayed(&mut outgoing);
        // Only positions that moved since the partition's last launched step.
        let commits: Vec<(i32, Commit)> = match self.ledger.lock() {
            Ok(ledger) => self
                .positions_of(&ledger, ledger.partitions())
                .into_iter()
                .filter(|(p, commit)| ledger.last_commit(*p) != Some(commit))
                .collect(),
            Err(_) => Vec::new(),
        };
        if outgoing.is_empty() && resolved.is_empty() && commits.is_empty() {
            return Ok(());
        }
        let booking = Booking {
            duplicates: replayed,
            dead,
            ..Booking::default()
        };
        let flight = self.launch(outgoing, commits, booking, producer).await;
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
    /// Plans `part`. A transient failure is of infrastructure every record needs (the
    /// registry): consumption pauses and the part is planned again, with the retry schedule's
    /// waits and then its last wait repeated, never dead-lettered; readiness is false and
    /// `medallion_consumption_paused` is 1 meanwhile. Records at fault were already set apart
    /// (by the decoder, or by bisecting the stage's batch), so any other failure is no record's
    /// fault: the worker stops without committing the part rather than dead-letter good records.
    async fn plan_with_retry(&mut self, part: &[Inbound]) -> Result<Plan, WorkerError> {
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
}
