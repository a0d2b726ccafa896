//! The contract between the runtime and a stage: what it is given, what it hands back.

use std::future::Future;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::{ContractSet, TopicConfig};

use crate::error::{RecordFailure, SetupError, StageError};
use crate::kafka::KafkaConnection;
use crate::outbound::SideRecord;
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
    /// Output-topic events the stage derived from state (gold's closed windows, rule alerts),
    /// as JSON in the output contract. The runtime encodes, keys and stamps them and times
    /// them like output rows; one with no source record that does not encode halts the worker.
    pub events: Vec<OutputEvent>,
}

/// One output-topic event as JSON (see [`StageOutput::events`]).
#[derive(Debug, Clone)]
pub struct OutputEvent {
    /// The record key (the output topic's key field, e.g. the org id as text).
    pub key: String,
    pub event: serde_json::Value,
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
            events: Vec::new(),
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
    pub fn output(&self) -> Result<&str, SetupError> {
        self.output_topic.as_deref().ok_or_else(|| {
            SetupError::contracts(format!("consumer group {} produces no topic", self.group))
        })
    }

    /// Registers the `telemetry.audit` topic's schema and returns an encoder for it.
    pub async fn audit_encoder(&self) -> Result<crate::audit::AuditEncoder, SetupError> {
        crate::audit::register_encoder(&self.registry, &self.topics, &self.contracts).await
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
}
