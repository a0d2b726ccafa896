//! The stage worker: poll a batch, decode (Avro → Arrow), drop redelivered events, run the
//! stage's transform, encode (Arrow → Avro), produce keyed by `org_id`, wait for every delivery,
//! and only then store the offsets for commit. Records that fail go to `<input>.dlq` with
//! their original bytes and headers; nothing is dropped silently.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType};
use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::registry::{RegistryClient, RegistryError};
use medallion_contracts::{Contract, ContractSet, TopicConfig};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::WorkerConfig;
use crate::dedup::{event_key, DedupWindow};
use crate::dlq::{dead_letter_headers, Origin};
use crate::error::{RecordFailure, StageError};
use crate::http::Health;
use crate::kafka::{BatchProducer, BatchRecord, KafkaConnection, Role};
use crate::metrics as m;
use crate::retry::RetryPolicy;

/// Columns the runtime appends to every decoded batch before the stage sees it.
pub mod meta {
    /// The record key as text (nullable).
    pub const KEY: &str = "_kafka_key";
    pub const PARTITION: &str = "_kafka_partition";
    pub const OFFSET: &str = "_kafka_offset";
    /// Processing time of the batch, epoch ms (a column, so a reused plan sees the present).
    pub const NOW_MS: &str = "_now_ms";
}

/// The schema a stage sees: the decoded columns followed by the [`meta`] columns.
pub fn stage_input_schema(decoded: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = decoded
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(meta::KEY, DataType::Utf8, true));
    fields.push(Field::new(meta::PARTITION, DataType::Int32, false));
    fields.push(Field::new(meta::OFFSET, DataType::Int64, false));
    fields.push(Field::new(meta::NOW_MS, DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

/// Appends the [`meta`] columns to a decoded batch.
pub fn with_meta(
    decoded: &RecordBatch,
    keys: Vec<Option<String>>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    now_ms: i64,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let rows = decoded.num_rows();
    let mut columns: Vec<ArrayRef> = decoded.columns().to_vec();
    columns.push(Arc::new(StringArray::from(keys)));
    columns.push(Arc::new(Int32Array::from(partitions)));
    columns.push(Arc::new(Int64Array::from(offsets)));
    columns.push(Arc::new(Int64Array::from(vec![now_ms; rows])));
    RecordBatch::try_new(stage_input_schema(&decoded.schema()), columns)
}

/// What a stage made of one batch.
#[derive(Debug)]
pub struct StageOutput {
    /// Output rows, in the output topic's Arrow schema.
    pub batch: RecordBatch,
    /// For each output row, the input row it came from (its headers travel with it), or
    /// `None` for a row the stage derived from state (e.g. a closed window).
    pub source_rows: Vec<Option<u32>>,
    /// Input rows that did not make it, and why.
    pub rejected: Vec<(u32, RecordFailure)>,
    /// Records for other topics (audit events, changelog updates), already encoded. They are
    /// delivered with the batch, before its offsets are stored.
    pub side: Vec<SideRecord>,
    /// Input rows whose outcome the stage reports later through [`Stage::settle`] (a webhook
    /// still retrying, say). Their offsets are not committed before that.
    pub deferred: Vec<u32>,
    /// Headers added to single output rows: (output row, key, value).
    pub row_headers: Vec<(u32, String, Vec<u8>)>,
}

impl StageOutput {
    /// An output where input row `i` became output row `i`.
    pub fn one_to_one(batch: RecordBatch, rejected: Vec<(u32, RecordFailure)>) -> Self {
        Self {
            source_rows: (0..batch.num_rows() as u32).map(Some).collect(),
            batch,
            rejected,
            side: Vec::new(),
            deferred: Vec::new(),
            row_headers: Vec::new(),
        }
    }

    /// No output rows (a sink, or a batch that only fed state).
    pub fn empty(schema: SchemaRef) -> Self {
        Self::one_to_one(RecordBatch::new_empty(schema), Vec::new())
    }
}

/// The outcome of an input record the stage deferred (see [`StageOutput::deferred`]).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub partition: i32,
    pub offset: i64,
    /// `None`: done. `Some`: the runtime dead-letters the original record with this reason.
    pub failure: Option<RecordFailure>,
    pub attempts: usize,
}

/// What [`Stage::settle`] hands back: finished deferred records and records to deliver.
#[derive(Debug, Default)]
pub struct Settled {
    pub resolved: Vec<Resolved>,
    pub side: Vec<SideRecord>,
}

/// One record for a topic other than the stage's output.
#[derive(Debug, Clone)]
pub struct SideRecord {
    pub topic: String,
    /// An explicit partition (changelogs follow their input partition); `None` hashes the key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Option<OwnedHeaders>,
}

/// What a stage gets to build its transform once.
#[derive(Debug, Clone)]
pub struct StageSetup {
    pub group: String,
    /// Where `schemas/`, `topic-config.yaml` and other shipped files live.
    pub home: std::path::PathBuf,
    pub contracts: ContractSet,
    pub topics: TopicConfig,
    pub registry: Arc<RegistryClient>,
    /// How the worker reaches Kafka, for stage-owned clients such as changelog restore or a
    /// broadcast reader.
    pub kafka: KafkaConnection,
    /// Input rows: the input contract's columns followed by the [`meta`] columns.
    pub input_schema: SchemaRef,
    /// The output contract's Arrow schema (no fields for a sink group).
    pub output_schema: SchemaRef,
    pub input_topic: String,
    /// `None` for a sink group (`produces: []`), whose effects leave Kafka.
    pub output_topic: Option<String>,
    /// The worker's backoff for transient failures (0.5 s, 2 s, 8 s, 32 s), for stage-owned retries.
    pub retry: RetryPolicy,
}

impl StageSetup {
    /// The output topic, or an error naming the group if it is a sink.
    pub fn output(&self) -> Result<&str, String> {
        self.output_topic
            .as_deref()
            .ok_or_else(|| format!("consumer group {} produces no topic", self.group))
    }

    /// Registers the `telemetry.audit` topic's schema and returns an encoder for it.
    pub async fn audit_encoder(&self) -> Result<crate::audit::AuditEncoder, String> {
        let topic = self
            .topics
            .telemetry
            .as_ref()
            .map(|t| t.audit.clone())
            .ok_or("topic-config.yaml names no telemetry.audit topic")?;
        let (text, id) = self.register(&topic).await?;
        crate::audit::AuditEncoder::new(&topic, &text, id)
    }

    /// Registers `topic`'s value schema and returns an encoder of JSON events for it.
    pub async fn json_encoder(&self, topic: &str) -> Result<JsonEncoder, String> {
        let (text, id) = self.register(topic).await?;
        JsonEncoder::new(topic, &text, id)
    }

    /// Registers `topic`'s value schema: its text and id.
    async fn register(&self, topic: &str) -> Result<(String, u32), String> {
        let spec = self
            .topics
            .topic(topic)
            .ok_or_else(|| format!("topic {topic} is not in topic-config.yaml"))?;
        let contract = self
            .contracts
            .get(&spec.schema)
            .ok_or_else(|| format!("schema {} is not in schemas/", spec.schema))?;
        let id = self
            .registry
            .register(&self.topics.subject(topic), &contract.text)
            .await
            .map_err(|e| format!("registering {topic}: {e}"))?;
        Ok((contract.text.clone(), id))
    }
}

/// Encodes low-volume JSON events (audit records, alerts) to a topic's registered schema.
#[derive(Debug, Clone)]
pub struct JsonEncoder {
    topic: String,
    schema: apache_avro::Schema,
    id: u32,
}

impl JsonEncoder {
    /// An encoder for schema `id` already registered (or a test's fixed id).
    pub fn new(topic: &str, schema_text: &str, id: u32) -> Result<Self, String> {
        let schema = apache_avro::Schema::parse_str(schema_text)
            .map_err(|e| format!("schema of {topic}: {e}"))?;
        Ok(Self {
            topic: topic.to_string(),
            schema,
            id,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// A side record keyed by `key`, stamped with its event key (see [`crate::recovery`]).
    pub fn record(&self, key: &str, event: &serde_json::Value) -> Result<SideRecord, StageError> {
        let value = medallion_contracts::json::to_framed(event, &self.schema, self.id)
            .map_err(|e| StageError::Encode(format!("{}: {e}", self.topic)))?;
        let headers = event["event_id"].as_str().map(|id| {
            OwnedHeaders::new().insert(rdkafka::message::Header {
                key: crate::recovery::EVENT_KEY,
                value: Some(&event_key(id).to_be_bytes()),
            })
        });
        Ok(SideRecord {
            topic: self.topic.clone(),
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            value,
            headers,
        })
    }
}

/// A stage: how a batch becomes its output. Everything else is the runtime's.
pub trait Stage: Send + 'static {
    /// Transforms one batch. An error fails the batch as a whole: the runtime then runs the
    /// stage again on halves of it to find the records at fault, so a stage must leave its
    /// state as it was when it returns an error (compute first, then apply). A record the
    /// stage knows to be bad is better reported in [`StageOutput::rejected`] at once.
    fn process(
        &mut self,
        input: RecordBatch,
    ) -> impl Future<Output = Result<StageOutput, StageError>> + Send;

    /// Called before the first batch of a newly assigned partition, with the metadata that
    /// was committed with its offset. Stateful stages restore their state here.
    fn assign(
        &mut self,
        _partition: i32,
        _committed_metadata: Option<String>,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// The partition went to another replica: drop its state.
    fn revoke(&mut self, _partition: i32) {}

    /// The offset to commit for `partition` after a batch, and metadata to commit with it.
    /// By default everything consumed (`next_offset`); a stage holding open state may commit
    /// less, so the records that built the state are read again after a restart.
    fn position(&self, _partition: i32, next_offset: i64) -> (i64, Option<String>) {
        (next_offset, None)
    }

    /// Called after every batch, when no record arrived for a while, and once at shutdown
    /// (`closing`): a stage with work in flight hands over what finished, and a buffering stage
    /// flushes what is due, so offsets can advance without new input.
    fn settle(
        &mut self,
        _closing: bool,
    ) -> impl Future<Output = Result<Settled, StageError>> + Send {
        async { Ok(Settled::default()) }
    }

    /// Whether the runtime may plan the next part of a batch while the previous part's
    /// records are being acknowledged. Only for a stage whose output depends on nothing but
    /// its input: it keeps no state across batches, defers nothing and keeps the default
    /// `position`.
    fn pipelined(&self) -> bool {
        false
    }
}

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

struct Topology {
    group: String,
    input_topic: String,
    dlq_topic: String,
    input: Contract,
    output: Option<Output>,
}

/// The output topic of a group that has one.
struct Output {
    topic: String,
    contract: Contract,
    key: String,
}

fn topology(
    contracts: &ContractSet,
    topics: &TopicConfig,
    group: &str,
) -> Result<Topology, WorkerError> {
    let spec = topics
        .consumer_groups
        .get(group)
        .ok_or_else(|| WorkerError::UnknownGroup(group.to_string()))?;
    let (Some(input_topic), 1) = (spec.consumes.first(), spec.consumes.len()) else {
        return Err(WorkerError::Shape {
            group: group.to_string(),
            consumes: spec.consumes.len(),
        });
    };
    let contract = |topic: &str| -> Result<(Contract, String), WorkerError> {
        let t = topics
            .topic(topic)
            .ok_or_else(|| WorkerError::Contracts(format!("topic {topic} missing")))?;
        let c = contracts
            .get(&t.schema)
            .ok_or_else(|| WorkerError::MissingContract(t.schema.clone()))?;
        Ok((c.clone(), t.key.clone()))
    };
    let (input, _) = contract(input_topic)?;
    let output = match spec.produces.first() {
        Some(topic) => {
            let (contract, key) = contract(topic)?;
            Some(Output {
                topic: topic.clone(),
                contract,
                key,
            })
        }
        None => None,
    };
    Ok(Topology {
        group: group.to_string(),
        input_topic: input_topic.clone(),
        dlq_topic: topics.dlq_topic(input_topic),
        input,
        output,
    })
}

/// Offsets (with metadata) stored after each batch, by partition: what a commit sends.
type Positions = Arc<Mutex<BTreeMap<i32, (i64, Option<String>)>>>;

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

/// Rebalance hooks: commit before partitions go, track the assignment for `/readyz`.
struct WorkerContext {
    health: Arc<Health>,
    assigned: Arc<Mutex<HashSet<i32>>>,
    topic: String,
    positions: Positions,
    /// Partitions revoked since the last batch, for the stage to drop their state.
    revoked: Arc<Mutex<Vec<i32>>>,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Every batch is finished before the next poll, so the stored offsets are complete.
            let gone: Vec<i32> = partitions
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            if let Err(e) = commit_positions(consumer, &self.topic, &self.positions, Some(&gone)) {
                tracing::debug!(error = %e, "commit before revoke");
            }
            if let Ok(mut positions) = self.positions.lock() {
                positions.retain(|p, _| !gone.contains(p));
            }
            if let Ok(mut assigned) = self.assigned.lock() {
                for p in &gone {
                    assigned.remove(p);
                }
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
        tracing::info!(partitions = ?current, "assignment changed");
        if let Ok(mut assigned) = self.assigned.lock() {
            *assigned = current;
        }
    }
}

/// Wall-clock time, epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// One record to produce, with the input message it came from.
struct Outgoing {
    topic: String,
    partition: Option<i32>,
    key: Option<Vec<u8>>,
    /// Encoded rows share their batch's buffer: no copy per record.
    value: bytes::Bytes,
    headers: Option<OwnedHeaders>,
    /// Index of the input message it came from, if one.
    source: Option<usize>,
    /// The event key stamped on an output-topic record.
    event_key: Option<u128>,
    /// (input partition, offset) of the record a dead letter holds.
    dead_origin: Option<(i32, i64)>,
}

impl From<SideRecord> for Outgoing {
    fn from(side: SideRecord) -> Self {
        Outgoing {
            event_key: side
                .headers
                .as_ref()
                .and_then(crate::recovery::event_key_of),
            topic: side.topic,
            partition: side.partition,
            key: side.key,
            value: side.value.into(),
            headers: side.headers,
            source: None,
            dead_origin: None,
        }
    }
}

/// A newly assigned input partition, as its last owner committed it.
struct Assigned {
    partition: i32,
    offset: Option<i64>,
    snapshot: Option<crate::recovery::Snapshot>,
    /// The stage's own commit metadata.
    metadata: Option<String>,
}

/// Records of an input tail, read for the dedup window.
#[derive(Default)]
struct WindowChunk {
    /// (partition, offset, event key) of records that carry their key.
    keyed: Vec<(i32, i64, u128)>,
    undecoded: Vec<OwnedMessage>,
}

/// The work derived from one batch.
struct Plan {
    outgoing: Vec<Outgoing>,
    /// Message indexes whose outcome the stage reports later.
    deferred: Vec<usize>,
    /// Set when the whole batch failed and was dead-lettered.
    failed: Option<String>,
    /// (message index, reason) of dead letters, for metrics.
    dead: Vec<(usize, RecordFailure)>,
    /// Event keys to remember once delivered, by partition.
    remember: Vec<(i32, u128)>,
    duplicates: u64,
    /// Event timestamps (ms) of produced outputs, for the latency histogram.
    event_times: Vec<i64>,
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

/// Where the worker reports its batches and governance actions (`telemetry:` in
/// topic-config.yaml).
struct Telemetry {
    execution: JsonEncoder,
    audit: crate::audit::AuditEncoder,
    pipeline_id: String,
    instance: String,
}

/// Registers `topic`'s schema, waiting out an unreachable registry.
async fn register_with_retry(
    registry: &RegistryClient,
    topics: &TopicConfig,
    topic: &str,
    schema_text: &str,
    policy: &RetryPolicy,
    group: &str,
) -> Result<u32, WorkerError> {
    let subject = topics.subject(topic);
    let mut attempt = 0usize;
    loop {
        match registry.register(&subject, schema_text).await {
            Ok(id) => return Ok(id),
            Err(e) if e.is_transient() => {
                attempt += 1;
                metrics::counter!(m::RETRIES_TOTAL, "stage" => group.to_string(), "reason" => "registry_unreachable").increment(1);
                let wait = policy.wait_forever(attempt);
                tracing::warn!(error = %e, ?wait, "registry unreachable at start-up; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Prepares the worker for `group`; `make_stage` builds the stage's transform once.
pub async fn prepare<S, C, F, Fut>(
    config: &WorkerConfig<C>,
    group: &str,
    health: Arc<Health>,
    make_stage: F,
) -> Result<StageWorker<S>, WorkerError>
where
    S: Stage,
    C: Default + Serialize + DeserializeOwned,
    F: FnOnce(StageSetup) -> Fut,
    Fut: Future<Output = Result<S, String>>,
{
    let home = config.home();
    let contracts = ContractSet::load(&home.join("schemas"))
        .map_err(|e| WorkerError::Contracts(e.to_string()))?;
    let topics = TopicConfig::load(&home.join("topic-config.yaml"))
        .map_err(|e| WorkerError::Contracts(e.to_string()))?
        .with_prefix(&config.naming.prefix)
        .map_err(|e| WorkerError::Contracts(format!("naming.prefix: {e}")))?;
    let group = &topics.group_name(group);
    let kafka = config.kafka.connection()?;
    let topo = topology(&contracts, &topics, group)?;
    let registry = Arc::new(RegistryClient::with_basic_auth(
        &config.registry.url,
        Duration::from_millis(config.registry.timeout_ms),
        config
            .registry
            .username
            .clone()
            .zip(config.registry.password.clone()),
    )?);
    let policy = RetryPolicy::from_millis(&config.retry.backoff_ms);
    // Output schemas must be registered before anything is produced: wait for the registry.
    let (encoder, output_schema) = match &topo.output {
        Some(output) => {
            let id = register_with_retry(
                &registry,
                &topics,
                &output.topic,
                &output.contract.text,
                &policy,
                group,
            )
            .await?;
            let schema = BatchDecoder::new(&output.contract.full_name, &output.contract.text)
                .map_err(|e| WorkerError::Setup(e.to_string()))?
                .schema();
            let encoder = BatchEncoder::new(&schema, &output.contract.text, id)
                .map_err(|e| WorkerError::Setup(e.to_string()))?;
            (Some(encoder), schema)
        }
        None => (None, Arc::new(Schema::empty())),
    };
    let telemetry = match &topics.telemetry {
        Some(names) => {
            let mut registered = Vec::with_capacity(2);
            for topic in [&names.execution, &names.audit] {
                let contract = topics
                    .topic(topic)
                    .and_then(|t| contracts.get(&t.schema))
                    .ok_or_else(|| WorkerError::MissingContract(topic.clone()))?;
                let id =
                    register_with_retry(&registry, &topics, topic, &contract.text, &policy, group)
                        .await?;
                registered.push((topic.clone(), contract.text.clone(), id));
            }
            let (execution, audit) = (&registered[0], &registered[1]);
            Some(Telemetry {
                execution: JsonEncoder::new(&execution.0, &execution.1, execution.2)
                    .map_err(WorkerError::Setup)?,
                audit: crate::audit::AuditEncoder::new(&audit.0, &audit.1, audit.2)
                    .map_err(WorkerError::Setup)?,
                pipeline_id: config.pipeline.id.clone(),
                instance: crate::audit::instance(),
            })
        }
        None => None,
    };
    health.set_registry_ok(true);
    metrics::gauge!(m::SCHEMA_REGISTRY_SCHEMAS_TOTAL).set(1.0);
    let decoder = BatchDecoder::new(&topo.input.full_name, &topo.input.text)
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    let input_schema = stage_input_schema(&decoder.schema());
    let stage = make_stage(StageSetup {
        group: group.to_string(),
        home: home.clone(),
        contracts: contracts.clone(),
        topics: topics.clone(),
        registry: registry.clone(),
        kafka: kafka.clone(),
        input_schema: input_schema.clone(),
        output_schema: output_schema.clone(),
        input_topic: topo.input_topic.clone(),
        output_topic: topo.output.as_ref().map(|o| o.topic.clone()),
        retry: policy.clone(),
    })
    .await
    .map_err(WorkerError::Setup)?;
    Ok(StageWorker {
        stage,
        kafka,
        topo,
        registry,
        decoder,
        encoder,
        telemetry,
        windows: HashMap::new(),
        window_capacity: config.dedup.window_per_partition,
        policy,
        health,
        assigned: Arc::new(Mutex::new(HashSet::new())),
        positions: Arc::new(Mutex::new(BTreeMap::new())),
        revoked: Arc::new(Mutex::new(Vec::new())),
        initialized: HashSet::new(),
        next_offsets: BTreeMap::new(),
        deferred: HashMap::new(),
        totals: RunTotals::default(),
        progress: Arc::new(Progress::default()),
        outputs_at: crate::recovery::Snapshot::default(),
        outputs_at_start: crate::recovery::Snapshot::default(),
        replayed: DedupWindow::new(config.dedup.window_per_partition.saturating_mul(4)),
        dead_before: HashSet::new(),
    })
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

    /// One `etl.execution` record per partition of the batch, and one `audit.events` record per
    /// dead letter.
    fn batch_telemetry(
        &self,
        batch: &[OwnedMessage],
        plan: &Plan,
        duration: Duration,
    ) -> Vec<Outgoing> {
        let Some(telemetry) = &self.telemetry else {
            return Vec::new();
        };
        let output_topic = self.output_topic().unwrap_or_default();
        #[derive(Default)]
        struct Counts {
            first: i64,
            last: i64,
            records_in: i64,
            records_out: i64,
            records_dlq: i64,
        }
        let mut by_partition: BTreeMap<i32, Counts> = BTreeMap::new();
        for message in batch {
            let c = by_partition
                .entry(message.partition())
                .or_insert_with(|| Counts {
                    first: message.offset(),
                    last: message.offset(),
                    ..Counts::default()
                });
            c.first = c.first.min(message.offset());
            c.last = c.last.max(message.offset());
            c.records_in += 1;
        }
        let first_partition = by_partition.keys().next().copied().unwrap_or_default();
        for o in plan.outgoing.iter().filter(|o| o.topic == output_topic) {
            // Records derived from state (closed windows) count in the batch's first partition.
            let partition = o
                .source
                .and_then(|i| batch.get(i))
                .map_or(first_partition, Message::partition);
            if let Some(c) = by_partition.get_mut(&partition) {
                c.records_out += 1;
            }
        }
        for (index, _) in &plan.dead {
            if let Some(c) = batch
                .get(*index)
                .and_then(|m| by_partition.get_mut(&m.partition()))
            {
                c.records_dlq += 1;
            }
        }
        let now = now_ms();
        let group = &self.topo.group;
        let topic = &self.topo.input_topic;
        let mut out = Vec::with_capacity(by_partition.len() + plan.dead.len());
        for (partition, c) in &by_partition {
            let status = if plan.failed.is_some() {
                "FAILED"
            } else if c.records_dlq > 0 {
                "PARTIAL"
            } else {
                "SUCCEEDED"
            };
            let range = format!("{topic}/{partition}/{}-{}", c.first, c.last);
            let event = serde_json::json!({
                "event_id": crate::ids::stable_id(&["etl", group, &range]),
                "event_type": "etl.execution",
                "event_version": "1.0.0",
                "timestamp": now,
                "source": {"service": group, "instance": telemetry.instance},
                "correlation_id": range,
                "org_id": 0,
                "trace_id": null,
                "classification": "internal",
                "payload": {
                    "pipeline_id": telemetry.pipeline_id,
                    "stage": group,
                    "input_topic": topic,
                    "partition": partition,
                    "first_offset": c.first,
                    "last_offset": c.last,
                    "records_in": c.records_in,
                    "records_out": c.records_out,
                    "records_dlq": c.records_dlq,
                    "duration_ms": duration.as_millis() as i64,
                    "status": status,
                    "error": plan.failed,
                },
            });
            match telemetry.execution.record(&telemetry.pipeline_id, &event) {
                Ok(record) => out.push(record.into()),
                Err(e) => tracing::error!(error = %e, "etl.execution record not encoded"),
            }
        }
        for (index, failure) in &plan.dead {
            if let Some(message) = batch.get(*index) {
                out.extend(self.dead_letter_audit(message, failure, 1));
            }
        }
        out
    }

    /// The `audit.events` record of one dead letter (`dlq.routed`).
    fn dead_letter_audit(
        &self,
        message: &OwnedMessage,
        failure: &RecordFailure,
        attempts: usize,
    ) -> Option<Outgoing> {
        let telemetry = self.telemetry.as_ref()?;
        let group = &self.topo.group;
        let resource = format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let org_id = message.key().and_then(crate::keys::org_id).unwrap_or(0);
        let mut detail: String = failure.message.chars().take(256).collect();
        if detail.len() < failure.message.len() {
            detail.push('…');
        }
        let action = crate::audit::AuditAction {
            event_id: crate::ids::stable_id(&["dlq", group, &resource]),
            action: "dlq.routed".into(),
            actor: group.clone(),
            org_id,
            correlation_id: resource.clone(),
            trace_id: None,
            resource_type: "record".into(),
            resource_id: resource,
            outcome: "dead_lettered".into(),
            reason: Some(failure.reason.clone()),
            details: [
                ("class".to_string(), failure.class.as_str().to_string()),
                ("message".to_string(), detail),
                ("dlq_topic".to_string(), self.topo.dlq_topic.clone()),
                ("attempts".to_string(), attempts.to_string()),
            ]
            .into_iter()
            .collect(),
        };
        Some(telemetry.audit.record(&action, now_ms()).into())
    }

    /// Tells the stage about partitions it lost and partitions it sees for the first time
    /// (with the metadata committed with their offsets), after rebuilding what the worker
    /// knew of them: their dedup windows and what was produced after their last commit.
    async fn sync_partitions(
        &mut self,
        batch: &[OwnedMessage],
        consumer: &Arc<StreamConsumer<WorkerContext>>,
    ) -> Result<(), WorkerError> {
        self.apply_revocations();
        // Every partition assigned and not yet set up, not only those in this batch: one
        // rebuild for a whole assignment.
        let assigned_now = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        let fresh: Vec<i32> = batch
            .iter()
            .map(Message::partition)
            .chain(assigned_now)
            .filter(|p| !self.initialized.contains(p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for partition in &fresh {
            tpl.add_partition(&self.topo.input_topic, *partition);
        }
        // A blocking broker call, off the runtime's threads (works on any runtime flavour).
        let reader = Arc::clone(consumer);
        let committed = tokio::task::spawn_blocking(move || {
            reader.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|e| WorkerError::Setup(format!("reading committed offsets: {e}")))??;
        let assigned: Vec<Assigned> = fresh
            .into_iter()
            .map(|partition| {
                let elem = committed.find_partition(&self.topo.input_topic, partition);
                let offset = elem.as_ref().and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                let (snapshot, metadata) = elem
                    .as_ref()
                    .map(|e| crate::recovery::unwrap(e.metadata()))
                    .unwrap_or((None, None));
                Assigned {
                    partition,
                    offset,
                    snapshot,
                    metadata,
                }
            })
            .collect();
        self.recover_with_retry(&assigned).await?;
        for a in assigned {
            self.stage
                .assign(a.partition, a.metadata)
                .await
                .map_err(|e| {
                    WorkerError::Setup(format!("restoring partition {}: {e}", a.partition))
                })?;
            self.initialized.insert(a.partition);
        }
        Ok(())
    }

    /// [`Self::recover`], retried along the retry schedule while the broker or registry is
    /// away; then the worker stops (its replacement starts over).
    async fn recover_with_retry(&mut self, assigned: &[Assigned]) -> Result<(), WorkerError> {
        let mut attempt = 1usize;
        loop {
            match self.recover(assigned).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < self.policy.max_attempts() => {
                    let wait = self.policy.wait_forever(attempt);
                    tracing::warn!(error = %e, attempt, ?wait, "rebuilding partition state failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Rebuilds, for newly assigned partitions, the dedup window from the input's last
    /// `window_per_partition` records before the committed offset (less those that were
    /// dead-lettered: they were never taken), and reads the output and DLQ from the snapshot
    /// committed with it to their end (see [`crate::recovery`]).
    async fn recover(&mut self, assigned: &[Assigned]) -> Result<(), WorkerError> {
        use crate::recovery::{read_stretches, Stretch};
        let started = Instant::now();
        let window = i64::try_from(self.window_capacity).unwrap_or(i64::MAX);
        let fresh: HashSet<i32> = assigned.iter().map(|a| a.partition).collect();

        // 1. The input's tail before each committed offset. Records stamped by an upstream
        // stage need no decoding; the others are decoded in chunks as they are read.
        let tail: Vec<Stretch> = assigned
            .iter()
            .filter_map(|a| {
                a.offset.map(|c| Stretch {
                    partition: a.partition,
                    from: c.saturating_sub(window).max(0),
                    until: Some(c),
                })
            })
            .collect();
        let (send, mut chunks) = tokio::sync::mpsc::channel::<WindowChunk>(4);
        let kafka = self.kafka.clone();
        let input_topic = self.topo.input_topic.clone();
        let reading = tokio::task::spawn_blocking(move || {
            let mut chunk = WindowChunk::default();
            let mut earliest: Option<i64> = None;
            let read = read_stretches(&kafka, &input_topic, &tail, |m| {
                if let Some(t) = m.timestamp().to_millis() {
                    earliest = Some(earliest.map_or(t, |e| e.min(t)));
                }
                match m.headers().and_then(crate::recovery::event_key_of) {
                    Some(key) => chunk.keyed.push((m.partition(), m.offset(), key)),
                    None => chunk.undecoded.push(m.detach()),
                }
                if chunk.keyed.len() + chunk.undecoded.len() >= 2_000 {
                    let _ = send.blocking_send(std::mem::take(&mut chunk));
                }
            });
            let _ = send.blocking_send(chunk);
            read.map(|read| (read, earliest))
        });
        let mut seen: Vec<(i32, i64, u128)> = Vec::new();
        let mut decode_error = None;
        while let Some(chunk) = chunks.recv().await {
            seen.extend(chunk.keyed);
            if decode_error.is_none() {
                match self.event_keys(&chunk.undecoded).await {
                    Ok(decoded) => seen.extend(decoded),
                    Err(e) => decode_error = Some(e),
                }
            }
        }
        let (read, earliest) = reading
            .await
            .map_err(|e| WorkerError::Setup(format!("recovery reader: {e}")))??;
        if let Some(e) = decode_error {
            return Err(WorkerError::Setup(format!(
                "decoding the input tail for the dedup window: {e}"
            )));
        }

        // 2. What was produced after the last commits, and the dead letters of the tail.
        let kafka = self.kafka.clone();
        let topics = crate::recovery::Topics {
            input: self.topo.input_topic.clone(),
            output: self.topo.output.as_ref().map(|o| o.topic.clone()),
            dlq: self.topo.dlq_topic.clone(),
        };
        let pending: Vec<(i32, Option<i64>, Option<crate::recovery::Snapshot>)> = assigned
            .iter()
            .map(|a| (a.partition, a.offset, a.snapshot.clone()))
            .collect();
        let scan_fresh = fresh.clone();
        let after = tokio::task::spawn_blocking(move || {
            // A partition never committed and still empty has produced nothing: it does not
            // widen the scan (an idle partition would otherwise send every rebuild to the
            // fallback of the last `window` records).
            let input = crate::recovery::watermarks(&kafka, &topics.input)?;
            let snapshots: Vec<Option<crate::recovery::Snapshot>> = pending
                .into_iter()
                .filter(|(p, offset, snapshot)| {
                    snapshot.is_some()
                        || offset.is_some()
                        || input.get(p).is_none_or(|(low, high)| high > low)
                })
                .map(|(_, _, snapshot)| snapshot)
                .collect();
            crate::recovery::after_commit(
                &kafka,
                &topics,
                &snapshots,
                &scan_fresh,
                window,
                earliest,
            )
        })
        .await
        .map_err(|e| WorkerError::Setup(format!("recovery reader: {e}")))??;

        let committed: HashMap<i32, i64> = assigned
            .iter()
            .filter_map(|a| a.offset.map(|c| (a.partition, c)))
            .collect();
        let dead: HashSet<(i32, i64)> = after.dead_letters.into_iter().collect();
        let mut windows: HashMap<i32, DedupWindow> = fresh
            .iter()
            .map(|p| (*p, DedupWindow::new(self.window_capacity)))
            .collect();
        seen.sort_unstable_by_key(|(p, o, _)| (*p, *o));
        for (partition, offset, key) in seen {
            if dead.contains(&(partition, offset)) {
                continue;
            }
            if let Some(w) = windows.get_mut(&partition) {
                w.insert(key);
            }
        }
        let remembered: usize = windows.values().map(DedupWindow::len).sum();
        self.windows.extend(windows);
        let after_commit = after.output_keys.len();
        for key in after.output_keys {
            self.replayed.insert(key);
        }
        // Dead letters of records at or after the committed offset are not written again.
        let before = self.dead_before.len();
        self.dead_before.extend(
            dead.into_iter()
                .filter(|(p, o)| committed.get(p).is_none_or(|c| o >= c)),
        );
        tracing::info!(
            partitions = ?fresh,
            with_snapshot = assigned.iter().filter(|a| a.snapshot.is_some()).count(),
            committed = committed.len(),
            input_records_read = read,
            remembered,
            outputs_after_last_commit = after_commit,
            dead_letters_after_last_commit = self.dead_before.len() - before,
            took_ms = started.elapsed().as_millis() as u64,
            "partition state rebuilt"
        );
        Ok(())
    }

    /// (partition, offset, event key) of `messages`, decoded with the input contract.
    async fn event_keys(
        &mut self,
        messages: &[OwnedMessage],
    ) -> Result<Vec<(i32, i64, u128)>, StageError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let decoded = self.decode(messages).await?;
        let Some(ids) = decoded
            .batch
            .column_by_name("event_id")
            .and_then(|c| c.as_string_opt::<i32>())
        else {
            return Ok(Vec::new());
        };
        Ok(decoded
            .rows
            .iter()
            .enumerate()
            .filter(|(row, _)| !ids.is_null(*row))
            .map(|(row, &index)| {
                let m = &messages[index];
                (m.partition(), m.offset(), event_key(ids.value(row)))
            })
            .collect())
    }

    /// Drops the output records a previous owner already produced and the dead letters it
    /// already wrote; returns how many.
    fn drop_replayed(&mut self, outgoing: &mut Vec<Outgoing>) -> u64 {
        if self.replayed.is_empty() && self.dead_before.is_empty() {
            return 0;
        }
        let before = outgoing.len();
        let output = self.topo.output.as_ref().map(|o| o.topic.as_str());
        let (replayed, dead_before) = (&self.replayed, &mut self.dead_before);
        outgoing.retain(|o| {
            let produced = Some(o.topic.as_str()) == output
                && o.event_key.is_some_and(|k| replayed.contains(k));
            !(produced
                || o.dead_origin
                    .is_some_and(|origin| dead_before.remove(&origin)))
        });
        (before - outgoing.len()) as u64
    }

    /// Where this worker's outputs stand, from the producer's acknowledgements.
    fn note_acked(&mut self, producer: &BatchProducer) {
        let merge = |start: &BTreeMap<i32, i64>, acked: BTreeMap<i32, i64>| {
            let mut out = start.clone();
            for (p, o) in acked {
                let at = out.entry(p).or_insert(o);
                *at = (*at).max(o);
            }
            out
        };
        if let Some(out) = &self.topo.output {
            self.outputs_at.output =
                merge(&self.outputs_at_start.output, producer.acked(&out.topic));
        }
        self.outputs_at.dlq = merge(
            &self.outputs_at_start.dlq,
            producer.acked(&self.topo.dlq_topic),
        );
    }

    /// The output and DLQ as they are now: the last offset of each partition.
    async fn outputs_now(&self) -> Result<crate::recovery::Snapshot, WorkerError> {
        let kafka = self.kafka.clone();
        let dlq = self.topo.dlq_topic.clone();
        let output = self.topo.output.as_ref().map(|o| o.topic.clone());
        let last = |marks: BTreeMap<i32, (i64, i64)>| {
            marks
                .into_iter()
                .map(|(p, (_, high))| (p, high - 1))
                .collect()
        };
        let snapshot = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::recovery::RecoveryError>(crate::recovery::Snapshot {
                output: match output {
                    Some(topic) => last(crate::recovery::watermarks(&kafka, &topic)?),
                    None => BTreeMap::new(),
                },
                dlq: last(crate::recovery::watermarks(&kafka, &dlq)?),
            })
        })
        .await
        .map_err(|e| WorkerError::Setup(format!("recovery reader: {e}")))??;
        Ok(snapshot)
    }

    fn prune_windows(&mut self) {
        if let Ok(assigned) = self.assigned.lock() {
            self.windows.retain(|p, _| assigned.contains(p));
        }
    }

    fn dead_letter(
        &self,
        message: &OwnedMessage,
        failure: &RecordFailure,
        attempts: usize,
    ) -> Outgoing {
        let origin = Origin {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
        };
        Outgoing {
            topic: self.topo.dlq_topic.clone(),
            partition: None,
            key: message.key().map(<[u8]>::to_vec),
            value: message
                .payload()
                .map(bytes::Bytes::copy_from_slice)
                .unwrap_or_default(),
            headers: Some(dead_letter_headers(
                message.headers(),
                &self.topo.group,
                failure,
                &origin,
                attempts,
            )),
            source: None,
            event_key: None,
            dead_origin: Some((origin.partition, origin.offset)),
        }
    }

    fn dead_letter_all(
        &self,
        batch: &[OwnedMessage],
        failure: RecordFailure,
        attempts: usize,
    ) -> Plan {
        Plan {
            outgoing: batch
                .iter()
                .map(|m| self.dead_letter(m, &failure, attempts))
                .collect(),
            failed: Some(failure.message.clone()),
            dead: (0..batch.len()).map(|i| (i, failure.clone())).collect(),
            deferred: Vec::new(),
            remember: Vec::new(),
            duplicates: 0,
            event_times: Vec::new(),
        }
    }

    /// Decodes `messages` with the input contract, first fetching the writer schemas the
    /// decoder does not know yet. An id the registry does not have is reported per message in
    /// `rejected`, as is a schema the reader cannot resolve; an unreachable registry is an
    /// error (transient).
    async fn decode(
        &mut self,
        messages: &[OwnedMessage],
    ) -> Result<medallion_contracts::columnar::DecodedBatch, StageError> {
        let payloads: Vec<&[u8]> = messages
            .iter()
            .map(|m| m.payload().unwrap_or_default())
            .collect();
        for id in self.decoder.unknown_ids(payloads.iter().copied()) {
            match self.registry.schema_by_id(id).await {
                Ok(schema) => {
                    let _ = self.decoder.add_writer_schema(id, &schema);
                    metrics::gauge!(m::SCHEMA_REGISTRY_SCHEMAS_TOTAL).increment(1.0);
                }
                Err(RegistryError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.decoder
            .decode(payloads.iter().copied())
            .map_err(|e| StageError::Transform(e.to_string()))
    }

    /// Decode, dedup, transform, encode. Transient errors abort the whole plan (retried).
    async fn plan(&mut self, batch: &[OwnedMessage]) -> Result<Plan, StageError> {
        let decoded = self.decode(batch).await?;
        let mut dead: Vec<(usize, RecordFailure)> = decoded
            .rejected
            .iter()
            .map(|(i, e)| (*i, RecordFailure::from(e)))
            .collect();

        // Dedup by event_id: against the partition's window and within the batch.
        let event_ids = decoded
            .batch
            .column_by_name("event_id")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .cloned();
        let mut keep = Vec::with_capacity(decoded.rows.len());
        let mut keys = Vec::with_capacity(decoded.rows.len());
        let mut in_batch: foldhash::HashSet<(i32, u128)> = foldhash::HashSet::default();
        let mut duplicates = 0u64;
        for (row, &index) in decoded.rows.iter().enumerate() {
            let partition = batch[index].partition();
            let key = event_ids
                .as_ref()
                .filter(|ids| !ids.is_null(row))
                .map(|ids| event_key(ids.value(row)));
            let duplicate = key.is_some_and(|k| {
                self.windows.get(&partition).is_some_and(|w| w.contains(k))
                    || !in_batch.insert((partition, k))
            });
            if duplicate {
                duplicates += 1;
            }
            keep.push(!duplicate);
            keys.push(key);
        }
        let mask = BooleanArray::from(keep.clone());
        let kept_rows: Vec<usize> = decoded
            .rows
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(i, _)| *i)
            .collect();
        let kept_keys: Vec<Option<u128>> = keys
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(key, _)| *key)
            .collect();
        let filtered = arrow::compute::filter_record_batch(&decoded.batch, &mask)
            .map_err(|e| StageError::Transform(e.to_string()))?;

        // The stage sees the decoded columns plus where each row came from.
        let input = with_meta(
            &filtered,
            kept_rows
                .iter()
                .map(|i| {
                    // Decimal text or a Java long; anything else is kept as it came, so the
                    // stage can name it in its reason.
                    batch[*i].key().map(|k| match crate::keys::org_key_text(k) {
                        Some(text) => text.into_owned(),
                        None => String::from_utf8_lossy(k).into_owned(),
                    })
                })
                .collect(),
            kept_rows.iter().map(|i| batch[*i].partition()).collect(),
            kept_rows.iter().map(|i| batch[*i].offset()).collect(),
            now_ms(),
        )
        .map_err(|e| StageError::Transform(e.to_string()))?;

        let transformed = self.transform_isolating(batch, input, &kept_rows).await?;
        dead.extend(transformed.dead);
        let failed: HashSet<usize> = dead.iter().map(|(index, _)| *index).collect();
        // Every row the stage took (output or only state) is remembered against redelivery.
        let remember: Vec<(i32, u128)> = kept_rows
            .iter()
            .zip(&kept_keys)
            .filter(|(index, _)| !failed.contains(index))
            .filter_map(|(index, key)| key.map(|key| (batch[*index].partition(), key)))
            .collect();
        let mut outgoing = transformed.outgoing;
        dead.sort_by_key(|(i, _)| *i);
        for (index, failure) in &dead {
            outgoing.push(self.dead_letter(&batch[*index], failure, 1));
        }
        Ok(Plan {
            outgoing,
            deferred: transformed.deferred,
            failed: None,
            dead,
            remember,
            duplicates,
            event_times: transformed.event_times,
        })
    }

    /// Runs the stage on `input` (`rows[i]` is the message index of input row i). When the
    /// stage fails the batch as a whole, the batch is bisected until the records at fault are
    /// found: they are dead-lettered with the stage's own error, and every other record goes
    /// on, in order. A transient error or a halt is the batch's, not a record's: returned.
    async fn transform_isolating(
        &mut self,
        batch: &[OwnedMessage],
        input: RecordBatch,
        rows: &[usize],
    ) -> Result<Transformed, StageError> {
        let mut out = Transformed::default();
        let mut bisect = crate::isolate::Bisect::new(input.num_rows());
        let mut isolating = false;
        while let Some(piece) = bisect.next_piece() {
            let part = input.slice(piece.start, piece.len());
            match self.transform(batch, part, &rows[piece.clone()]).await {
                Ok(done) => out.append(done),
                Err(e) if e.is_transient() || matches!(e, StageError::Halt(_)) => return Err(e),
                Err(e) => {
                    if !isolating {
                        isolating = true;
                        tracing::warn!(error = %e, rows = input.num_rows(), "the stage failed a batch; looking for the records at fault");
                    }
                    if let Some(row) = bisect.failed(piece) {
                        let message = &batch[rows[row]];
                        tracing::error!(error = %e, partition = message.partition(), offset = message.offset(), "record at fault; dead-lettering it");
                        out.dead
                            .push((rows[row], RecordFailure::poison(e.reason(), e.to_string())));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Runs the stage once on `input` and encodes its output. `rows[i]` is the message index
    /// of input row i. An output row that cannot be encoded is dead-lettered with its source
    /// record; one with no source record (an aggregate) halts the worker, since no record is at
    /// fault and dropping it would lose data.
    async fn transform(
        &mut self,
        batch: &[OwnedMessage],
        input: RecordBatch,
        rows: &[usize],
    ) -> Result<Transformed, StageError> {
        let output = self.stage.process(input).await?;
        if output.source_rows.len() != output.batch.num_rows() {
            return Err(StageError::Transform(format!(
                "stage returned {} output rows but {} source rows",
                output.batch.num_rows(),
                output.source_rows.len()
            )));
        }
        let mut dead = Vec::with_capacity(output.rejected.len());
        for (row, failure) in output.rejected {
            if let Some(index) = rows.get(row as usize) {
                dead.push((*index, failure));
            }
        }
        let source_of =
            |source_row: Option<u32>| -> Result<Option<usize>, StageError> {
                match source_row {
                    None => Ok(None),
                    Some(row) => rows.get(row as usize).copied().map(Some).ok_or_else(|| {
                        StageError::Transform(format!("source row {row} out of range"))
                    }),
                }
            };
        let (encoded, out_keys, output_topic) = match (&mut self.encoder, &self.topo.output) {
            (Some(encoder), Some(out)) => {
                let encoded: Vec<Option<bytes::Bytes>> = match encoder.encode(&output.batch) {
                    Ok(values) => values.into_iter().map(Some).collect(),
                    Err(batch_error) => {
                        // One row at a time, to find which ones the output schema refuses.
                        let mut values = Vec::with_capacity(output.batch.num_rows());
                        for row in 0..output.batch.num_rows() {
                            match encoder.encode(&output.batch.slice(row, 1)) {
                                Ok(mut one) => values.push(one.pop()),
                                Err(e) => {
                                    let source = output.source_rows.get(row).copied().flatten();
                                    let Some(index) = source_of(source)? else {
                                        return Err(StageError::Halt(format!(
                                            "an output row with no source record cannot be encoded ({e}); batch error: {batch_error}"
                                        )));
                                    };
                                    dead.push((
                                        index,
                                        RecordFailure::poison("encode_failed", e.to_string()),
                                    ));
                                    values.push(None);
                                }
                            }
                        }
                        values
                    }
                };
                (
                    encoded,
                    key_column(&output.batch, &out.key),
                    out.topic.clone(),
                )
            }
            _ if output.batch.num_rows() > 0 => {
                return Err(StageError::Transform(format!(
                    "group {} produces no topic but its stage returned {} rows",
                    self.topo.group,
                    output.batch.num_rows()
                )))
            }
            _ => (Vec::new(), Vec::new(), String::new()),
        };
        let mut row_headers: HashMap<u32, Vec<(String, Vec<u8>)>> = HashMap::new();
        for (row, key, value) in output.row_headers {
            row_headers.entry(row).or_default().push((key, value));
        }
        let times = output
            .batch
            .column_by_name("timestamp")
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>().cloned());
        let output_ids = output
            .batch
            .column_by_name("event_id")
            .and_then(|c| c.as_string_opt::<i32>().cloned());
        let mut outgoing = Vec::with_capacity(encoded.len() + output.side.len());
        let mut event_times = Vec::with_capacity(encoded.len());
        for (row, value) in encoded.into_iter().enumerate() {
            let Some(&source_row) = output.source_rows.get(row) else {
                return Err(StageError::Transform(
                    "output row without a source row".into(),
                ));
            };
            let Some(value) = value else {
                continue;
            };
            let source = source_of(source_row)?;
            let mut headers = source.and_then(|index| batch[index].headers().cloned());
            if let Some(added) = row_headers.remove(&(row as u32)) {
                let mut h = headers.unwrap_or_default();
                for (key, value) in &added {
                    h = h.insert(rdkafka::message::Header {
                        key,
                        value: Some(value),
                    });
                }
                headers = Some(h);
            }
            if let Some(t) = times.as_ref().filter(|t| !t.is_null(row)) {
                event_times.push(t.value(row));
            }
            // The output's event key travels as a header, so a later owner of the input can
            // tell what was already produced (crate::recovery). An inherited equal one is kept.
            let key = output_ids
                .as_ref()
                .filter(|ids| !ids.is_null(row))
                .map(|ids| event_key(ids.value(row)));
            if let Some(key) = key {
                if headers.as_ref().and_then(crate::recovery::event_key_of) != Some(key) {
                    headers = Some(
                        headers
                            .unwrap_or_default()
                            .insert(rdkafka::message::Header {
                                key: crate::recovery::EVENT_KEY,
                                value: Some(&key.to_be_bytes()),
                            }),
                    );
                }
            }
            outgoing.push(Outgoing {
                topic: output_topic.clone(),
                partition: None,
                key: out_keys.get(row).cloned().flatten(),
                value,
                headers,
                source,
                event_key: key,
                dead_origin: None,
            });
        }
        outgoing.extend(output.side.into_iter().map(Outgoing::from));
        let deferred: Vec<usize> = output
            .deferred
            .iter()
            .filter_map(|row| rows.get(*row as usize).copied())
            .collect();
        Ok(Transformed {
            outgoing,
            dead,
            deferred,
            event_times,
        })
    }
}

/// What the stage made of (a piece of) a batch: message indexes, not input rows.
#[derive(Default)]
struct Transformed {
    /// Output and side records, in the stage's order.
    outgoing: Vec<Outgoing>,
    dead: Vec<(usize, RecordFailure)>,
    deferred: Vec<usize>,
    event_times: Vec<i64>,
}

impl Transformed {
    fn append(&mut self, other: Transformed) {
        self.outgoing.extend(other.outgoing);
        self.dead.extend(other.dead);
        self.deferred.extend(other.deferred);
        self.event_times.extend(other.event_times);
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

/// The record key of each output row: the value of `field` (top level or `payload.x`) as text.
fn key_column(batch: &RecordBatch, field: &str) -> Vec<Option<Vec<u8>>> {
    let mut parts = field.split('.');
    let Some(first) = parts.next() else {
        return vec![None; batch.num_rows()];
    };
    let mut column = batch.column_by_name(first).cloned();
    for part in parts {
        column = column.and_then(|c| {
            c.as_struct_opt()
                .and_then(|s| s.column_by_name(part).cloned())
        });
    }
    let Some(column) = column else {
        return vec![None; batch.num_rows()];
    };
    (0..batch.num_rows())
        .map(|row| {
            if column.is_null(row) {
                return None;
            }
            if let Some(a) = column.as_any().downcast_ref::<Int64Array>() {
                return Some(a.value(row).to_string().into_bytes());
            }
            if let Some(a) = column.as_any().downcast_ref::<StringArray>() {
                return Some(a.value(row).as_bytes().to_vec());
            }
            None
        })
        .collect()
}

/// Publishes `kafka_consumer_lag{group,topic,partition}` every few seconds: high watermark
/// minus committed offset, never negative.
async fn lag_loop(consumer: Arc<StreamConsumer<WorkerContext>>, group: String, topic: String) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        publish_lag(consumer.clone(), &group, &topic).await;
    }
}

/// Measures and publishes the lag of the assigned partitions once.
async fn publish_lag(consumer: Arc<StreamConsumer<WorkerContext>>, group: &str, topic: &str) {
    let topic_name = topic.to_string();
    let lags = tokio::task::spawn_blocking(move || -> Vec<(i32, i64)> {
        let Ok(assignment) = consumer.assignment() else {
            return Vec::new();
        };
        let Ok(committed) = consumer.committed_offsets(assignment, Duration::from_secs(5)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in committed.elements_for_topic(&topic_name) {
            let Ok((_, high)) =
                consumer.fetch_watermarks(&topic_name, e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let committed = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            out.push((e.partition(), (high - committed).max(0)));
        }
        out
    })
    .await
    .unwrap_or_default();
    for (partition, lag) in lags {
        metrics::gauge!(m::KAFKA_CONSUMER_LAG, "group" => group.to_string(), "topic" => topic.to_string(), "partition" => partition.to_string()).set(lag as f64);
    }
}
