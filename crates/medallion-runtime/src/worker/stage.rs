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

/// The one way out of a stage: everything [`Stage::process`] and [`Stage::settle`] make is
/// handed to the collector, and the runtime turns it into records, dead letters and commits.
/// On an error the runtime drops what was collected (the batch is bisected or retried), so a
/// stage collects as it goes and leaves its own state as it was.
#[derive(Debug, Default)]
pub struct Collector {
    pub(super) rows: Option<RecordBatch>,
    pub(super) source_rows: Vec<Option<u32>>,
    pub(super) row_headers: Vec<(u32, String, Vec<u8>)>,
    pub(super) events: Vec<OutputEvent>,
    pub(super) side: Vec<SideRecord>,
    pub(super) rejected: Vec<(u32, RecordFailure)>,
    pub(super) deferred: Vec<u32>,
    pub(super) resolved: Vec<Resolved>,
    /// Counters the runtime increments when output rows land: (counter, [(output row, n)]).
    pub(super) delivered_counts: Vec<(metrics::Counter, Vec<(u32, u64)>)>,
}

impl Collector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Output rows in the output contract's Arrow schema; `source_rows[i]` is the input row
    /// output row `i` came from (its headers travel with it), or `None` for a row derived
    /// from state. Rows emitted by several calls are numbered in emission order.
    pub fn emit_rows(
        &mut self,
        batch: RecordBatch,
        source_rows: Vec<Option<u32>>,
    ) -> Result<(), StageError> {
        if source_rows.len() != batch.num_rows() {
            return Err(StageError::Transform(format!(
                "{} output rows with {} source rows",
                batch.num_rows(),
                source_rows.len()
            )));
        }
        self.rows = Some(match self.rows.take() {
            Some(earlier) if earlier.num_rows() > 0 => {
                arrow::compute::concat_batches(&earlier.schema(), [&earlier, &batch])?
            }
            _ => batch,
        });
        self.source_rows.extend(source_rows);
        Ok(())
    }

    /// Output rows where input row `i` became output row `i`.
    pub fn emit_one_to_one(&mut self, batch: RecordBatch) -> Result<(), StageError> {
        let sources = (0..batch.num_rows() as u32).map(Some).collect();
        self.emit_rows(batch, sources)
    }

    /// A header added to one output row (numbered as by [`Self::emit_rows`]).
    pub fn header(&mut self, output_row: u32, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.row_headers
            .push((output_row, key.into(), value.into()));
    }

    /// Counts an outcome that an output row carries (fields encrypted, say): `counter` grows by
    /// `n` for each `(output row, n)` when that row's record lands, and not when the row is
    /// not produced (a replay a previous owner produced, a row the output schema refuses), so
    /// the counter counts what reached the topic once.
    pub fn count_delivered(&mut self, counter: metrics::Counter, rows: Vec<(u32, u64)>) {
        if !rows.is_empty() {
            self.delivered_counts.push((counter, rows));
        }
    }

    /// An output-topic event derived from state (a closed window, an alert), as JSON in the
    /// output contract: the runtime encodes, keys, stamps and times it like an output row; one
    /// that does not encode halts the worker (no record is at fault).
    pub fn emit_event(&mut self, key: impl Into<String>, event: serde_json::Value) {
        self.events.push(OutputEvent {
            key: key.into(),
            event,
        });
    }

    /// A record for another topic (an audit event, a changelog update), already encoded: it
    /// is delivered with the batch, before its offsets are stored.
    pub fn side(&mut self, record: SideRecord) {
        self.side.push(record);
    }

    /// Input row `row` did not make it: the runtime dead-letters its record with `failure`.
    pub fn reject(&mut self, row: u32, failure: RecordFailure) {
        self.rejected.push((row, failure));
    }

    /// Input row `row`'s outcome comes later, through [`Self::resolve`] from
    /// [`Stage::settle`] (a webhook still retrying, say); its offset is not committed before.
    pub fn defer(&mut self, row: u32) {
        self.deferred.push(row);
    }

    /// The outcome of a deferred record.
    pub fn resolve(&mut self, resolved: Resolved) {
        self.resolved.push(resolved);
    }

    /// The output rows so far (none emitted: `None`).
    pub fn rows(&self) -> Option<&RecordBatch> {
        self.rows.as_ref()
    }

    pub fn source_rows(&self) -> &[Option<u32>] {
        &self.source_rows
    }

    pub fn row_headers(&self) -> &[(u32, String, Vec<u8>)] {
        &self.row_headers
    }

    pub fn events(&self) -> &[OutputEvent] {
        &self.events
    }

    pub fn side_records(&self) -> &[SideRecord] {
        &self.side
    }

    pub fn rejected(&self) -> &[(u32, RecordFailure)] {
        &self.rejected
    }

    pub fn deferred(&self) -> &[u32] {
        &self.deferred
    }

    pub fn resolved(&self) -> &[Resolved] {
        &self.resolved
    }

    /// What [`Self::count_delivered`] asked for, summed by output row.
    pub fn delivered_counts(&self) -> Vec<(u32, u64)> {
        let mut by_row = std::collections::BTreeMap::new();
        for (_, rows) in &self.delivered_counts {
            for (row, n) in rows {
                *by_row.entry(*row).or_default() += n;
            }
        }
        by_row.into_iter().collect()
    }
}

/// One output-topic event as JSON (see [`Collector::emit_event`]).
#[derive(Debug, Clone)]
pub struct OutputEvent {
    /// The record key (the output topic's key field, e.g. the org id as text).
    pub key: String,
    pub event: serde_json::Value,
}

/// The outcome of an input record the stage deferred (see [`Collector::defer`]).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub partition: i32,
    pub offset: i64,
    /// `None`: done. `Some`: the runtime dead-letters the original record with this reason.
    pub failure: Option<RecordFailure>,
    pub attempts: usize,
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
    /// Where a stateful stage keeps its state ([`Self::open_store`]).
    pub state: crate::config::StateConfig,
}

impl StageSetup {
    /// Opens the group's local state store (`state.dir`), bound to the group and its changelog
    /// and global-table topics: a store that holds anything else is discarded.
    pub fn open_store(&self) -> Result<crate::store::StateStore, SetupError> {
        let mut identity = vec![self.group.clone()];
        identity.extend(self.topics.changelog_of(&self.group).map(str::to_string));
        identity.extend(self.topics.global_table_of(&self.group).map(str::to_string));
        crate::state::open_store(&self.state, &self.group, &identity.join(" "))
    }

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

/// A stage: how a batch becomes its output. Everything else is the runtime's: offsets,
/// encoding, dead letters and delivery. A stage hands all it makes to the [`Collector`].
pub trait Stage: Send + 'static {
    /// Transforms one batch. An error fails the batch as a whole: the runtime then runs the
    /// stage again on halves of it to find the records at fault, so a stage must leave its
    /// state as it was when it returns an error (compute first, then apply). A record the
    /// stage knows to be bad is better rejected ([`Collector::reject`]) at once.
    fn process(
        &mut self,
        input: RecordBatch,
        out: &mut Collector,
    ) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Called before the first batch of a newly assigned partition, with the metadata that
    /// was committed with its offset. Stateful stages restore their state here.
    fn assign(
        &mut self,
        _partition: i32,
        _committed_metadata: Option<String>,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }

    /// [`Self::assign`] for all the partitions of one assignment, each with its committed
    /// metadata; an error names its partition. By default one after the other; a stage whose
    /// restore mostly waits on the broker restores them together.
    fn assign_all(
        &mut self,
        assigned: Vec<(i32, Option<String>)>,
    ) -> impl Future<Output = Result<(), (i32, StageError)>> + Send {
        async move {
            for (partition, metadata) in assigned {
                self.assign(partition, metadata)
                    .await
                    .map_err(|e| (partition, e))?;
            }
            Ok(())
        }
    }

    /// The partition went to another replica: drop its state.
    fn revoke(&mut self, _partition: i32) {}

    /// Whether the stage must see each partition in log order. By default not: only each
    /// org's order is kept, and the worker shares itself fairly among the orgs of a partition.
    /// A stage whose state orders a partition as a whole (an event-time watermark per
    /// partition) says so, and the worker reads it in log order whatever `fairness` says.
    fn needs_log_order(&self) -> bool {
        false
    }

    /// The offset to commit for `partition` after a batch, and metadata to commit with it.
    /// By default everything consumed (`next_offset`); a stage holding open state may commit
    /// less, so the records that built the state are read again after a restart.
    fn position(&self, _partition: i32, next_offset: i64) -> (i64, Option<String>) {
        (next_offset, None)
    }

    /// Called after every batch, when no record arrived for a while, and once at shutdown
    /// (`closing`): a stage with work in flight resolves what finished, a buffering stage
    /// flushes what is due (side records, events), so offsets can advance without new input.
    /// Rows, rejections and deferrals belong to a batch and are refused here.
    fn settle(
        &mut self,
        _closing: bool,
        _out: &mut Collector,
    ) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, Int64Array};

    use super::*;

    fn rows(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))])
            .expect("batch")
    }

    #[test]
    fn rows_emitted_in_several_calls_are_numbered_in_emission_order() {
        let mut out = Collector::new();
        out.emit_one_to_one(rows(&[10, 11])).expect("emitted");
        out.emit_rows(rows(&[99]), vec![None]).expect("emitted");
        out.header(2, "k", b"v".to_vec());
        let batch = out.rows().expect("rows");
        let values = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int64");
        assert_eq!(values.values().to_vec(), [10, 11, 99]);
        assert_eq!(out.source_rows(), [Some(0), Some(1), None]);
        assert_eq!(out.row_headers()[0].0, 2);
        assert_eq!(values.len(), out.source_rows().len());
    }

    #[test]
    fn rows_and_source_rows_must_agree() {
        let mut out = Collector::new();
        let err = out
            .emit_rows(rows(&[1, 2]), vec![Some(0)])
            .expect_err("one source for two rows");
        assert!(err.to_string().contains("2 output rows"), "{err}");
        assert!(out.rows().is_none(), "nothing was taken");
    }

    #[test]
    fn every_kind_of_outcome_is_kept_for_the_runtime() {
        let mut out = Collector::new();
        out.reject(3, RecordFailure::poison("bad", "bad record"));
        out.defer(4);
        out.emit_event("7", serde_json::json!({"event_id": "e"}));
        out.side(SideRecord {
            topic: "audit.events".into(),
            partition: None,
            key: None,
            value: Vec::new(),
            headers: None,
        });
        out.resolve(Resolved {
            partition: 0,
            offset: 9,
            failure: None,
            attempts: 1,
        });
        let c = out;
        assert_eq!(c.rejected.len(), 1);
        assert_eq!(c.deferred, [4]);
        assert_eq!(c.events[0].key, "7");
        assert_eq!(c.side.len(), 1);
        assert_eq!(c.resolved[0].offset, 9);
        assert!(c.rows.is_none());
    }
}
