//! The planner: what one batch becomes, decided without a broker. Decode (Avro → Arrow) → drop
//! records already seen (by `event_id`) → the stage's transform (bisected down to the records
//! at fault when it fails a whole batch) → encode (Arrow → Avro) → the outgoing records: outputs
//! carrying their source record's headers, the stage's events and side records, dead letters.
//! The only I/O is fetching a writer schema the decoder has not seen from the registry.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::TimestampMillisecondType;
use medallion_contracts::columnar::{BatchDecoder, BatchEncoder, DecodedBatch};
use medallion_contracts::registry::{RegistryClient, RegistryError};
use rdkafka::message::Message;

use super::stage::{with_meta, Collector, OutputEvent, Stage};
use super::telemetry::Telemetry;
use super::topology::Topology;
use crate::clock::now_ms;
use crate::dedup::event_key;
use crate::dlq::{dead_letter_headers, Origin};
use crate::error::{RecordFailure, StageError};
use crate::isolate::Bisect;
use crate::kafka::BatchRecord;
use crate::metrics as m;
use crate::outbound::{JsonEncoder, SideRecord};
use crate::record::{HeaderList, Inbound};

/// One record to produce, with the input message it came from.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) topic: String,
    pub(super) partition: Option<i32>,
    pub(super) key: Option<Vec<u8>>,
    /// Encoded rows share their batch's buffer: no copy per record.
    pub(super) value: bytes::Bytes,
    pub(super) headers: Option<HeaderList>,
    /// Index of the input message it came from, if one.
    pub(super) source: Option<usize>,
    /// The event key stamped on an output-topic record.
    pub(super) event_key: Option<u128>,
    /// (input partition, offset) of the record a dead letter holds.
    pub(super) dead_origin: Option<(i32, i64)>,
    /// Counters to grow when it lands (see [`Collector::count_delivered`]).
    pub(super) counts: Vec<(metrics::Counter, u64)>,
}

impl Outgoing {
    /// The record as the producer takes it.
    pub(super) fn record(&self) -> BatchRecord<'_> {
        BatchRecord {
            topic: &self.topic,
            partition: self.partition,
            key: self.key.as_deref(),
            value: self.value.as_ref(),
            headers: self.headers.as_ref(),
        }
    }
}

#[cfg(test)]
impl Outgoing {
    /// An empty record for `topic`, from no input message (tests set what they look at).
    pub(super) fn empty(topic: &str) -> Self {
        Outgoing {
            topic: topic.into(),
            partition: None,
            key: None,
            value: bytes::Bytes::new(),
            headers: None,
            source: None,
            event_key: None,
            dead_origin: None,
            counts: Vec::new(),
        }
    }
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
            counts: Vec::new(),
        }
    }
}

/// The work derived from one batch.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) outgoing: Vec<Outgoing>,
    /// Message indexes whose outcome the stage reports later.
    pub(super) deferred: Vec<usize>,
    /// (message index, reason) of dead letters, in message order.
    pub(super) dead: Vec<(usize, RecordFailure)>,
    /// Event keys to remember once delivered: (partition, offset, key).
    pub(super) remember: Vec<(i32, i64, u128)>,
    /// Message indexes of the records dropped as duplicates.
    pub(super) duplicates: Vec<usize>,
    /// Event timestamps (ms) of produced outputs, for the latency histogram.
    pub(super) event_times: Vec<i64>,
}

/// Decodes batches with the input contract and encodes the stage's output with the output
/// contract (none for a sink group).
pub(super) struct Planner {
    topo: Arc<Topology>,
    registry: Arc<RegistryClient>,
    decoder: BatchDecoder,
    encoder: Option<BatchEncoder>,
    /// Encodes the stage's [`super::OutputEvent`]s to the output contract.
    event_encoder: Option<JsonEncoder>,
    telemetry: Option<Telemetry>,
}

/// Which rows of a batch survive dedup: their message indexes and event keys.
struct Kept {
    mask: Vec<bool>,
    rows: Vec<usize>,
    keys: Vec<Option<u128>>,
    duplicates: Vec<usize>,
}

impl Planner {
    pub(super) fn new(
        topo: Arc<Topology>,
        registry: Arc<RegistryClient>,
        decoder: BatchDecoder,
        encoder: Option<BatchEncoder>,
        event_encoder: Option<JsonEncoder>,
        telemetry: Option<Telemetry>,
    ) -> Self {
        Self {
            topo,
            registry,
            decoder,
            encoder,
            event_encoder,
            telemetry,
        }
    }

    /// Decodes `messages` with the input contract, first fetching the writer schemas the
    /// decoder does not know yet. An id the registry does not have is reported per message in
    /// `rejected`, as is a schema the reader cannot resolve; a registry that does not answer
    /// (or refuses to) is an error of the batch, not of its records (transient: the worker
    /// pauses).
    pub(super) async fn decode(
        &mut self,
        messages: &[Inbound],
    ) -> Result<DecodedBatch, StageError> {
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
            .map_err(|e| StageError::Internal(format!("decoding checked messages: {e}")))
    }

    /// (partition, offset, event key) of `messages`, decoded with the input contract.
    pub(super) async fn event_keys(
        &mut self,
        messages: &[Inbound],
    ) -> Result<Vec<(i32, i64, u128)>, StageError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let decoded = self.decode(messages).await?;
        let Some(ids) = event_ids(&decoded.batch) else {
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

    /// Decode, dedup, transform, encode. `seen` answers, for (partition, event key) pairs in
    /// row order, whether each was taken before (the partitions' dedup windows); duplicates
    /// within the batch are found here. A transient error or a halt aborts the whole plan.
    pub(super) async fn plan<S: Stage>(
        &mut self,
        stage: &mut S,
        batch: &[Inbound],
        seen: &(impl Fn(&[(i32, u128)]) -> Option<Vec<bool>> + Sync),
    ) -> Result<Plan, StageError> {
        let decoded = self.decode(batch).await?;
        let mut dead: Vec<(usize, RecordFailure)> = decoded
            .rejected
            .iter()
            .map(|(i, e)| (*i, RecordFailure::from(e)))
            .collect();
        let kept = dedup(batch, &decoded, seen)
            .ok_or_else(|| StageError::Internal("the dedup windows cannot be read".into()))?;
        let filtered =
            arrow::compute::filter_record_batch(&decoded.batch, &BooleanArray::from(kept.mask))?;
        let input = stage_input(batch, &filtered, &kept.rows)?;

        let transformed = self
            .transform_isolating(stage, batch, input, &kept.rows)
            .await?;
        dead.extend(transformed.dead);
        let failed: HashSet<usize> = dead.iter().map(|(index, _)| *index).collect();
        // Every row the stage took (output or only state) is remembered against redelivery.
        let remember: Vec<(i32, i64, u128)> = kept
            .rows
            .iter()
            .zip(&kept.keys)
            .filter(|(index, _)| !failed.contains(index))
            .filter_map(|(index, key)| {
                key.map(|key| (batch[*index].partition(), batch[*index].offset(), key))
            })
            .collect();
        let mut outgoing = transformed.outgoing;
        dead.sort_by_key(|(i, _)| *i);
        for (index, failure) in &dead {
            outgoing.push(self.dead_letter(&batch[*index], failure, 1));
        }
        Ok(Plan {
            outgoing,
            deferred: transformed.deferred,
            dead,
            remember,
            duplicates: kept.duplicates,
            event_times: transformed.event_times,
        })
    }

    /// The dead letter of `message`: its original bytes and headers, plus the reason.
    pub(super) fn dead_letter(
        &self,
        message: &Inbound,
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
            counts: Vec::new(),
        }
    }

    /// The `audit.events` record of a dead letter, where the worker reports to one.
    pub(super) fn dead_letter_audit(
        &self,
        message: &Inbound,
        failure: &RecordFailure,
        attempts: usize,
    ) -> Option<Outgoing> {
        self.telemetry
            .as_ref()
            .map(|t| t.dead_letter_audit(&self.topo, message, failure, attempts))
    }

    /// The batch's `etl.execution` records and the audit records of its dead letters.
    pub(super) fn batch_telemetry(
        &self,
        batch: &[Inbound],
        plan: &Plan,
        duration: std::time::Duration,
    ) -> Vec<Outgoing> {
        self.telemetry
            .as_ref()
            .map(|t| t.batch(&self.topo, batch, plan, duration))
            .unwrap_or_default()
    }

    /// Runs the stage on `input` (`rows[i]` is the message index of input row i). When the
    /// stage fails the batch as a whole, the batch is bisected until the records at fault are
    /// found: they are dead-lettered with the stage's own error, and every other record goes
    /// on, in order. A transient error or a halt is the batch's, not a record's: returned.
    async fn transform_isolating<S: Stage>(
        &mut self,
        stage: &mut S,
        batch: &[Inbound],
        input: RecordBatch,
        rows: &[usize],
    ) -> Result<Transformed, StageError> {
        let mut out = Transformed::default();
        let mut bisect = Bisect::new(input.num_rows());
        let mut isolating = false;
        while let Some(piece) = bisect.next_piece() {
            let part = input.slice(piece.start, piece.len());
            match self
                .transform(stage, batch, part, &rows[piece.clone()])
                .await
            {
                Ok(done) => out.append(done),
                Err(e) if e.is_transient() || e.stops_the_worker() => return Err(e),
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

    /// Runs the stage once on `input` and turns its output into outgoing records. `rows[i]` is
    /// the message index of input row i.
    async fn transform<S: Stage>(
        &mut self,
        stage: &mut S,
        batch: &[Inbound],
        input: RecordBatch,
        rows: &[usize],
    ) -> Result<Transformed, StageError> {
        let mut output = Collector::new();
        stage.process(input, &mut output).await?;
        let produced = output.rows.as_ref().map_or(0, RecordBatch::num_rows);
        if output.source_rows.len() != produced {
            return Err(StageError::Transform(format!(
                "stage returned {produced} output rows but {} source rows",
                output.source_rows.len()
            )));
        }
        let sources =
            output
                .source_rows
                .iter()
                .map(|source| match source {
                    None => Ok(None),
                    Some(row) => rows.get(*row as usize).copied().map(Some).ok_or_else(|| {
                        StageError::Transform(format!("source row {row} out of range"))
                    }),
                })
                .collect::<Result<Vec<Option<usize>>, StageError>>()?;
        let mut dead: Vec<(usize, RecordFailure)> = output
            .rejected
            .iter()
            .filter_map(|(row, failure)| {
                rows.get(*row as usize)
                    .map(|index| (*index, failure.clone()))
            })
            .collect();
        let encoded = self.encode_rows(&output, &sources, &mut dead)?;
        let mut outgoing = Vec::with_capacity(encoded.len() + output.side.len());
        let mut event_times = self.output_records(batch, &output, &sources, encoded, &mut outgoing);
        self.output_events(&output.events, &mut outgoing, &mut event_times)?;
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

    /// The stage's output rows encoded with the output contract, one value per row. A row the
    /// contract refuses is dead-lettered with its source record (`None` in its place); one with
    /// no source record (an aggregate) halts the worker, since no record is at fault and
    /// dropping it would lose data.
    fn encode_rows(
        &mut self,
        output: &Collector,
        sources: &[Option<usize>],
        dead: &mut Vec<(usize, RecordFailure)>,
    ) -> Result<Vec<Option<bytes::Bytes>>, StageError> {
        let Some(batch) = output.rows.as_ref().filter(|b| b.num_rows() > 0) else {
            return Ok(Vec::new());
        };
        let rows = batch.num_rows();
        let Some(encoder) = &mut self.encoder else {
            if rows > 0 {
                return Err(StageError::Transform(format!(
                    "group {} produces no topic but its stage returned {rows} rows",
                    self.topo.group
                )));
            }
            return Ok(Vec::new());
        };
        let batch_error = match encoder.encode(batch) {
            Ok(values) => return Ok(values.into_iter().map(Some).collect()),
            Err(e) => e,
        };
        // One row at a time, to find which ones the output contract refuses.
        let mut values = Vec::with_capacity(rows);
        for row in 0..rows {
            match encoder.encode(&batch.slice(row, 1)) {
                Ok(mut one) => values.push(one.pop()),
                Err(e) => {
                    let Some(index) = sources.get(row).copied().flatten() else {
                        return Err(StageError::Halt(format!(
                            "an output row with no source record cannot be encoded ({e}); batch error: {batch_error}"
                        )));
                    };
                    dead.push((index, RecordFailure::poison("encode_failed", e.to_string())));
                    values.push(None);
                }
            }
        }
        Ok(values)
    }

    /// Appends the output-topic records of the encoded rows to `outgoing`: keyed by the output
    /// key, carrying their source record's headers plus the stage's own and their event key.
    /// Returns the rows' event times.
    fn output_records(
        &self,
        batch: &[Inbound],
        output: &Collector,
        sources: &[Option<usize>],
        encoded: Vec<Option<bytes::Bytes>>,
        outgoing: &mut Vec<Outgoing>,
    ) -> Vec<i64> {
        let (Some(out), Some(rows)) = (&self.topo.output, &output.rows) else {
            return Vec::new();
        };
        let keys = key_column(rows, &out.key);
        let mut row_headers: HashMap<u32, Vec<(String, Vec<u8>)>> = HashMap::new();
        for (row, key, value) in &output.row_headers {
            row_headers
                .entry(*row)
                .or_default()
                .push((key.clone(), value.clone()));
        }
        let mut row_counts: HashMap<u32, Vec<(metrics::Counter, u64)>> = HashMap::new();
        for (counter, counted) in &output.delivered_counts {
            for (row, n) in counted {
                row_counts
                    .entry(*row)
                    .or_default()
                    .push((counter.clone(), *n));
            }
        }
        let times = rows
            .column_by_name("timestamp")
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>().cloned());
        let output_ids = event_ids(rows);
        let mut event_times = Vec::with_capacity(encoded.len());
        for (row, value) in encoded.into_iter().enumerate() {
            let Some(value) = value else {
                continue;
            };
            let source = sources.get(row).copied().flatten();
            let mut headers = source.and_then(|index| batch[index].headers().cloned());
            if let Some(added) = row_headers.remove(&(row as u32)) {
                let h = headers.get_or_insert_with(HeaderList::new);
                for (key, value) in added {
                    h.push(key, value);
                }
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
                    headers
                        .get_or_insert_with(HeaderList::new)
                        .push(crate::recovery::EVENT_KEY, key.to_be_bytes());
                }
            }
            outgoing.push(Outgoing {
                topic: out.topic.clone(),
                partition: None,
                key: keys.get(row).cloned().flatten(),
                value,
                headers,
                source,
                event_key: key,
                dead_origin: None,
                counts: row_counts.remove(&(row as u32)).unwrap_or_default(),
            });
        }
        event_times
    }

    /// Appends the stage's output events, encoded; derived from state, so no record is at
    /// fault: an event the output contract refuses is a bug in the stage and halts the worker.
    pub(super) fn output_events(
        &self,
        events: &[OutputEvent],
        outgoing: &mut Vec<Outgoing>,
        event_times: &mut Vec<i64>,
    ) -> Result<(), StageError> {
        if events.is_empty() {
            return Ok(());
        }
        let Some(encoder) = &self.event_encoder else {
            return Err(StageError::Transform(format!(
                "group {} produces no topic but its stage returned {} events",
                self.topo.group,
                events.len()
            )));
        };
        for e in events {
            let record = encoder.record(&e.key, &e.event).map_err(|err| {
                StageError::Halt(format!("an output event does not encode: {err}"))
            })?;
            if let Some(t) = e.event["timestamp"].as_i64() {
                event_times.push(t);
            }
            outgoing.push(Outgoing::from(record));
        }
        Ok(())
    }
}

/// The `event_id` column of a batch, if it has one.
fn event_ids(batch: &RecordBatch) -> Option<StringArray> {
    batch
        .column_by_name("event_id")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .cloned()
}

/// Which decoded rows are new: not in `seen` (the partitions' windows), not repeated earlier in
/// the batch. A row without an `event_id` is always new. `None` when `seen` cannot answer.
fn dedup(
    batch: &[Inbound],
    decoded: &DecodedBatch,
    seen: &impl Fn(&[(i32, u128)]) -> Option<Vec<bool>>,
) -> Option<Kept> {
    let ids = event_ids(&decoded.batch);
    let keys: Vec<Option<u128>> = (0..decoded.rows.len())
        .map(|row| {
            ids.as_ref()
                .filter(|ids| !ids.is_null(row))
                .map(|ids| event_key(ids.value(row)))
        })
        .collect();
    let keyed: Vec<(i32, u128)> = decoded
        .rows
        .iter()
        .zip(&keys)
        .filter_map(|(&index, key)| key.map(|k| (batch[index].partition(), k)))
        .collect();
    let mut before = seen(&keyed)?.into_iter();
    let mut in_batch: foldhash::HashSet<(i32, u128)> = foldhash::HashSet::default();
    let mut kept = Kept {
        mask: Vec::with_capacity(keys.len()),
        rows: Vec::with_capacity(keys.len()),
        keys: Vec::with_capacity(keys.len()),
        duplicates: Vec::new(),
    };
    for (&index, key) in decoded.rows.iter().zip(&keys) {
        let duplicate = key.is_some_and(|k| {
            let partition = batch[index].partition();
            let earlier = before.next().unwrap_or(false);
            // Both sides run: the pair is remembered for the rest of the batch either way.
            !in_batch.insert((partition, k)) || earlier
        });
        kept.mask.push(!duplicate);
        if duplicate {
            kept.duplicates.push(index);
        } else {
            kept.rows.push(index);
            kept.keys.push(*key);
        }
    }
    Some(kept)
}

/// The stage's input: the kept decoded rows plus where each came from (the meta columns).
fn stage_input(
    batch: &[Inbound],
    filtered: &RecordBatch,
    rows: &[usize],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    with_meta(
        filtered,
        rows.iter()
            .map(|i| {
                // Decimal text or a Java long; anything else is kept as it came, so the stage
                // can name it in its reason.
                batch[*i].key().map(|k| match crate::keys::org_key_text(k) {
                    Some(text) => text.into_owned(),
                    None => String::from_utf8_lossy(k).into_owned(),
                })
            })
            .collect(),
        rows.iter().map(|i| batch[*i].partition()).collect(),
        rows.iter().map(|i| batch[*i].offset()).collect(),
        now_ms(),
    )
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

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
