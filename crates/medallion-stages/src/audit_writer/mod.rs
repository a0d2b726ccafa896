//! audit-writer (`audit.events` → the audit store): buffers events per input partition and
//! flushes them, on size or time, as Parquet files partitioned by org and day. A file is named
//! by topic, partition and offset range; offsets are committed only once the files of their
//! range are durable. Before a flush, its range joins the partition's recent ranges in a marker
//! object: after a crash the worker reads the uncommitted ranges again and rewrites each one
//! exactly, so a rewrite replaces files and never duplicates rows.

pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use medallion_runtime::error::{SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::worker::{meta, Collector, Stage, StageSetup};
use serde::{Deserialize, Serialize};

pub use store::{AuditStore, StoreError, TABLE};

/// The consumer group, and so the binary's name.
pub const GROUP: &str = "audit-writer";

/// audit-writer's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditWriterConfig {
    /// A directory, `file:///dir` or `s3://bucket/prefix`.
    pub store: String,
    /// Flush a partition's buffer at this many rows.
    pub flush_rows: usize,
    /// Flush a partition's buffer once its oldest row waited this long.
    pub flush_interval_ms: u64,
}

impl Default for AuditWriterConfig {
    fn default() -> Self {
        Self {
            store: "audit-store".into(),
            flush_rows: 50_000,
            flush_interval_ms: 10_000,
        }
    }
}

/// How long the audit trail is kept, in days.
pub const RETENTION_DAYS: u32 = 90;

/// Columns of the Parquet files (`org_id` and `day` are in the path).
pub fn parquet_schema() -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("event_id", false),
        text("event_type", false),
        text("event_version", false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
            false,
        ),
        text("source_service", false),
        text("source_instance", false),
        text("correlation_id", false),
        text("trace_id", true),
        text("classification", false),
        text("action", false),
        text("actor", false),
        text("resource_type", false),
        text("resource_id", false),
        text("outcome", false),
        text("reason", true),
        // Flattened `key=value` pairs, sorted, `;`-separated: readable in any SQL engine.
        text("details", false),
        // The events a record covers (`payload.subjects`): `event_id=field,field;…`, in the
        // record's order; null in files written before the field existed.
        text("subjects", true),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// `YYYY-MM-DD` (UTC) of epoch milliseconds.
pub fn day_of_ms(ms: i64) -> String {
    // Howard Hinnant's civil-from-days.
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Epoch milliseconds of `YYYY-MM-DD` 00:00 UTC.
pub fn ms_of_day(day: &str) -> Option<i64> {
    let mut parts = day.splitn(3, '-');
    let (y, m, d): (i64, i64, i64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = days * 86_400_000;
    (day_of_ms(ms) == day).then_some(ms)
}

/// The offset range of one flush of a partition, recorded before its files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Range {
    first: i64,
    last: i64,
}

/// Flush ranges kept per partition: far more than can await a commit at once (offsets are
/// committed within a second of a flush).
const RANGES_KEPT: usize = 64;

/// Rows of one partition waiting for their flush.
#[derive(Debug)]
struct Buffer {
    batches: Vec<RecordBatch>,
    /// (org_id, offset) per row, in the order of `batches`.
    orgs: Vec<i64>,
    first: i64,
    last: i64,
    since: Instant,
}

/// The stage.
pub struct AuditWriter {
    config: AuditWriterConfig,
    store: AuditStore,
    topic: String,
    buffers: BTreeMap<i32, Buffer>,
    /// Recent flush ranges by partition, oldest first (the marker object's content).
    ranges: HashMap<i32, Vec<Range>>,
}

impl AuditWriter {
    pub async fn new(setup: StageSetup, config: AuditWriterConfig) -> Result<Self, SetupError> {
        if config.flush_rows == 0 {
            return Err(SetupError::config("stage.flush_rows", "must be at least 1"));
        }
        if config.flush_interval_ms == 0 {
            return Err(SetupError::config(
                "stage.flush_interval_ms",
                "must be at least 1",
            ));
        }
        let store =
            AuditStore::open(&config.store).map_err(|e| SetupError::config("stage.store", e))?;
        tracing::info!(store = store.url(), "audit store opened");
        Ok(Self {
            config,
            store,
            topic: setup.input_topic,
            buffers: BTreeMap::new(),
            ranges: HashMap::new(),
        })
    }

    fn marker_path(&self, partition: i32) -> String {
        format!("_markers/{}-{partition}.json", self.topic)
    }

    /// The range the next flush of `buffer` must cover: a recorded range it reads again
    /// (rewritten exactly), or else everything buffered.
    fn target(&self, partition: i32, buffer: &Buffer) -> (Range, bool) {
        let recorded = self
            .ranges
            .get(&partition)
            .and_then(|r| r.iter().find(|r| r.last >= buffer.first));
        match recorded {
            Some(r) if r.first >= buffer.first => (
                Range {
                    first: buffer.first,
                    last: if r.first > buffer.first {
                        r.first - 1
                    } else {
                        r.last
                    },
                },
                true,
            ),
            _ => (
                Range {
                    first: buffer.first,
                    last: buffer.last,
                },
                false,
            ),
        }
    }

    /// Whether `partition`'s buffer is due.
    fn due(&self, partition: i32, closing: bool) -> bool {
        let Some(buffer) = self.buffers.get(&partition) else {
            return false;
        };
        match self.target(partition, buffer) {
            // A recorded range is rewritten whole, never in part.
            (range, true) => buffer.last >= range.last,
            (_, false) => {
                closing
                    || buffer.orgs.len() >= self.config.flush_rows
                    || buffer.since.elapsed()
                        >= Duration::from_millis(self.config.flush_interval_ms)
            }
        }
    }

    async fn flush_due(&mut self, closing: bool) -> Result<(), StageError> {
        loop {
            let due = self.buffers.keys().copied().find(|p| self.due(*p, closing));
            match due {
                Some(partition) => self.flush(partition).await?,
                None => return Ok(()),
            }
        }
    }

    /// Writes the due range of `partition`'s buffer: the marker, then one file per org and day.
    async fn flush(&mut self, partition: i32) -> Result<(), StageError> {
        let Some(buffer) = self.buffers.get(&partition) else {
            return Ok(());
        };
        let (Range { first, last }, rewrite) = self.target(partition, buffer);
        let all = arrow::compute::concat_batches(&parquet_schema(), &buffer.batches)?;
        let offsets = all
            .column_by_name("kafka_offset")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>().cloned())
            .ok_or_else(|| StageError::Transform("no kafka_offset".into()))?;
        let times = all
            .column_by_name("timestamp")
            .and_then(|c| {
                c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>()
                    .cloned()
            })
            .ok_or_else(|| StageError::Transform("no timestamp".into()))?;
        let mut groups: BTreeMap<(i64, String), Vec<u32>> = BTreeMap::new();
        let mut rest: Vec<u32> = Vec::new();
        for row in 0..all.num_rows() {
            if offsets.value(row) > last {
                rest.push(row as u32);
                continue;
            }
            groups
                .entry((buffer.orgs[row], day_of_ms(times.value(row))))
                .or_default()
                .push(row as u32);
        }
        if !rewrite {
            let ranges = self.ranges.entry(partition).or_default();
            ranges.push(Range { first, last });
            let excess = ranges.len().saturating_sub(RANGES_KEPT);
            ranges.drain(..excess);
            let marker =
                serde_json::to_vec(&ranges).map_err(|e| StageError::Encode(e.to_string()))?;
            self.store
                .put(&self.marker_path(partition), marker)
                .await
                .map_err(|e| StageError::Transform(e.to_string()))?;
        }
        let mut rows = 0usize;
        for ((org, day), indices) in &groups {
            let take = arrow::array::UInt32Array::from(indices.clone());
            let part = arrow::compute::take_record_batch(&all, &take)?;
            let bytes = parquet_bytes(&part)?;
            let path = format!(
                "org_id={org}/day={day}/{}-{partition}-{first:020}-{last:020}.parquet",
                self.topic
            );
            self.store
                .put(&path, bytes)
                .await
                .map_err(|e| StageError::Transform(format!("writing {path}: {e}")))?;
            rows += indices.len();
            metrics::counter!(m::AUDIT_FILES_WRITTEN_TOTAL, "stage" => GROUP).increment(1);
        }
        metrics::counter!(m::AUDIT_ROWS_WRITTEN_TOTAL, "stage" => GROUP).increment(rows as u64);
        tracing::debug!(
            partition,
            first,
            last,
            rows,
            rewrite,
            files = groups.len(),
            "flushed"
        );
        // Rows past a rewritten range stay buffered for the next flush.
        if rest.is_empty() {
            self.buffers.remove(&partition);
        } else if let Some(buffer) = self.buffers.get_mut(&partition) {
            let take = arrow::array::UInt32Array::from(rest.clone());
            let kept = arrow::compute::take_record_batch(&all, &take)?;
            let kept_offsets = kept
                .column_by_name("kafka_offset")
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>().cloned())
                .ok_or_else(|| StageError::Transform("no kafka_offset".into()))?;
            buffer.orgs = rest.iter().map(|r| buffer.orgs[*r as usize]).collect();
            buffer.first = kept_offsets.value(0);
            buffer.batches = vec![kept];
            buffer.since = Instant::now();
        }
        Ok(())
    }
}

fn parquet_bytes(batch: &RecordBatch) -> Result<Vec<u8>, StageError> {
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(properties))
        .map_err(|e| StageError::Encode(e.to_string()))?;
    writer
        .write(batch)
        .map_err(|e| StageError::Encode(e.to_string()))?;
    writer
        .close()
        .map_err(|e| StageError::Encode(e.to_string()))?;
    Ok(out)
}

/// A child column of struct column `parent`.
fn child(batch: &RecordBatch, parent: &str, name: &str) -> Result<ArrayRef, StageError> {
    batch
        .column_by_name(parent)
        .and_then(|c| c.as_struct_opt())
        .and_then(|s| s.column_by_name(name).cloned())
        .ok_or_else(|| StageError::Transform(format!("no column {parent}.{name}")))
}

fn column(batch: &RecordBatch, name: &str) -> Result<ArrayRef, StageError> {
    batch
        .column_by_name(name)
        .cloned()
        .ok_or_else(|| StageError::Transform(format!("no column {name}")))
}

fn as_text(array: &ArrayRef) -> Result<ArrayRef, StageError> {
    Ok(arrow::compute::cast(array, &DataType::Utf8)?)
}

/// `subjects` list → `event_id=field,field;event_id=field` (in order).
fn subjects_text(array: &ArrayRef) -> Result<ArrayRef, StageError> {
    let fail = || StageError::Transform("payload.subjects is not a list of subjects".into());
    let list = array.as_list_opt::<i32>().ok_or_else(fail)?;
    let subjects = list.values().as_struct_opt().ok_or_else(fail)?;
    let ids = as_text(subjects.column_by_name("event_id").ok_or_else(fail)?)?;
    let ids = ids.as_string::<i32>();
    let fields = subjects
        .column_by_name("fields")
        .and_then(|c| c.as_list_opt::<i32>())
        .ok_or_else(fail)?;
    let names = as_text(fields.values())?;
    let names = names.as_string::<i32>();
    let offsets = list.value_offsets();
    let mut out = Vec::with_capacity(list.len());
    for row in 0..list.len() {
        let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
        let text: Vec<String> = (start..end)
            .map(|i| {
                let (from, to) = (
                    fields.value_offsets()[i] as usize,
                    fields.value_offsets()[i + 1] as usize,
                );
                let listed: Vec<&str> = (from..to).map(|j| names.value(j)).collect();
                format!("{}={}", ids.value(i), listed.join(","))
            })
            .collect();
        out.push(text.join(";"));
    }
    Ok(Arc::new(StringArray::from(out)))
}

/// `details` map → `k=v;k=v` (keys sorted).
fn details_text(array: &ArrayRef) -> Result<ArrayRef, StageError> {
    let map = array
        .as_map_opt()
        .ok_or_else(|| StageError::Transform("payload.details is not a map".into()))?;
    let keys = as_text(map.keys())?;
    let values = as_text(map.values())?;
    let (keys, values) = (keys.as_string::<i32>(), values.as_string::<i32>());
    let offsets = map.value_offsets();
    let mut out = Vec::with_capacity(map.len());
    for row in 0..map.len() {
        let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
        let mut pairs: Vec<(&str, &str)> = (start..end)
            .map(|i| {
                (
                    keys.value(i),
                    if values.is_null(i) {
                        ""
                    } else {
                        values.value(i)
                    },
                )
            })
            .collect();
        pairs.sort();
        out.push(
            pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";"),
        );
    }
    Ok(Arc::new(StringArray::from(out)))
}

/// The decoded audit events as Parquet rows, and their orgs.
fn flatten(input: &RecordBatch) -> Result<(RecordBatch, Vec<i64>), StageError> {
    let timestamp = arrow::compute::cast(
        &column(input, "timestamp")?,
        &DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
    )?;
    let columns: Vec<ArrayRef> = vec![
        as_text(&column(input, "event_id")?)?,
        as_text(&column(input, "event_type")?)?,
        as_text(&column(input, "event_version")?)?,
        timestamp,
        as_text(&child(input, "source", "service")?)?,
        as_text(&child(input, "source", "instance")?)?,
        as_text(&column(input, "correlation_id")?)?,
        as_text(&column(input, "trace_id")?)?,
        as_text(&column(input, "classification")?)?,
        as_text(&child(input, "payload", "action")?)?,
        as_text(&child(input, "payload", "actor")?)?,
        as_text(&child(input, "payload", "resource_type")?)?,
        as_text(&child(input, "payload", "resource_id")?)?,
        as_text(&child(input, "payload", "outcome")?)?,
        as_text(&child(input, "payload", "reason")?)?,
        details_text(&child(input, "payload", "details")?)?,
        subjects_text(&child(input, "payload", "subjects")?)?,
        arrow::compute::cast(&column(input, meta::PARTITION)?, &DataType::Int32)?,
        arrow::compute::cast(&column(input, meta::OFFSET)?, &DataType::Int64)?,
    ];
    let batch = RecordBatch::try_new(parquet_schema(), columns)?;
    let orgs = column(input, "org_id")?;
    let orgs = orgs
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| StageError::Transform("org_id is not a long".into()))?;
    Ok((batch, orgs.iter().map(Option::unwrap_or_default).collect()))
}

impl Stage for AuditWriter {
    async fn process(
        &mut self,
        input: RecordBatch,
        _out: &mut Collector,
    ) -> Result<(), StageError> {
        let (rows, orgs) = flatten(&input)?;
        let partitions = rows
            .column_by_name("kafka_partition")
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>().cloned())
            .ok_or_else(|| StageError::Transform("no kafka_partition".into()))?;
        let offsets = rows
            .column_by_name("kafka_offset")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
            .ok_or_else(|| StageError::Transform("no kafka_offset".into()))?;
        let mut by_partition: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
        for row in 0..rows.num_rows() {
            by_partition
                .entry(partitions.value(row))
                .or_default()
                .push(row as u32);
        }
        for (partition, indices) in by_partition {
            let take = arrow::array::UInt32Array::from(indices.clone());
            let part = arrow::compute::take_record_batch(&rows, &take)?;
            let first = offsets.value(indices[0] as usize);
            let last = offsets.value(indices[indices.len() - 1] as usize);
            let buffer = self.buffers.entry(partition).or_insert_with(|| Buffer {
                batches: Vec::new(),
                orgs: Vec::new(),
                first,
                last,
                since: Instant::now(),
            });
            buffer.batches.push(part);
            buffer
                .orgs
                .extend(indices.iter().map(|i| orgs[*i as usize]));
            buffer.last = buffer.last.max(last);
        }
        self.flush_due(false).await?;
        Ok(())
    }

    async fn assign(
        &mut self,
        partition: i32,
        _committed_metadata: Option<String>,
    ) -> Result<(), StageError> {
        let ranges = self
            .store
            .get(&self.marker_path(partition))
            .await
            .map_err(|e| StageError::restore(partition, e))?
            .map(|bytes| serde_json::from_slice::<Vec<Range>>(&bytes))
            .transpose()
            .map_err(|e| StageError::restore(partition, e))?
            .unwrap_or_default();
        // Ranges the first offset read again lies past were committed (see `target`).
        self.ranges.insert(partition, ranges);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.buffers.remove(&partition);
        self.ranges.remove(&partition);
    }

    fn position(&self, partition: i32, next_offset: i64) -> (i64, Option<String>) {
        // Buffered rows are not durable yet: they are read again after a restart.
        let commit = self
            .buffers
            .get(&partition)
            .map_or(next_offset, |b| b.first.min(next_offset));
        (commit, None)
    }

    async fn settle(&mut self, closing: bool, _out: &mut Collector) -> Result<(), StageError> {
        self.flush_due(closing).await
    }
}
