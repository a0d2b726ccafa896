//! Batch planning: decode → dedup → stage → outgoing records.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::TimestampMillisecondType;
use medallion_contracts::registry::RegistryError;
use rdkafka::message::Message;

use crate::dedup::event_key;
use crate::dlq::{dead_letter_headers, Origin};
use crate::error::{RecordFailure, StageError};
use crate::metrics as m;

use crate::kafka::BatchRecord;
use crate::record::{HeaderList, Inbound};

use super::*;

/// One record to produce, with the input message it came from.
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

/// The work derived from one batch.
pub(super) struct Plan {
    pub(super) outgoing: Vec<Outgoing>,
    /// Message indexes whose outcome the stage reports later.
    pub(super) deferred: Vec<usize>,
    /// (message index, reason) of dead letters, for metrics.
    pub(super) dead: Vec<(usize, RecordFailure)>,
    /// Event keys to remember once delivered, by partition.
    pub(super) remember: Vec<(i32, u128)>,
    pub(super) duplicates: u64,
    /// Event timestamps (ms) of produced outputs, for the latency histogram.
    pub(super) event_times: Vec<i64>,
}

impl<S: Stage> StageWorker<S> {
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
            .map_err(|e| StageError::Internal(format!("decoding checked messages: {e}")))
    }

    /// Decode, dedup, transform, encode. Transient errors abort the whole plan (retried).
    pub(super) async fn plan(&mut self, batch: &[Inbound]) -> Result<Plan, StageError> {
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
        let (keep, keys, duplicates) = {
            let ledger = self.ledger.lock().map_err(|_| {
                StageError::Internal("the partition ledger's lock is poisoned".into())
            })?;
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
                    ledger.get(partition).is_some_and(|p| p.window.contains(k))
                        || !in_batch.insert((partition, k))
                });
                if duplicate {
                    duplicates += 1;
                }
                keep.push(!duplicate);
                keys.push(key);
            }
            (keep, keys, duplicates)
        };
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
        let filtered = arrow::compute::filter_record_batch(&decoded.batch, &mask)?;

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
        )?;

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
    pub(super) async fn transform_isolating(
        &mut self,
        batch: &[Inbound],
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

    /// Runs the stage once on `input` and encodes its output. `rows[i]` is the message index
    /// of input row i. An output row that cannot be encoded is dead-lettered with its source
    /// record; one with no source record (an aggregate) halts the worker, since no record is at
    /// fault and dropping it would lose data.
    pub(super) async fn transform(
        &mut self,
        batch: &[Inbound],
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
        if !output.events.is_empty() {
            let Some(events) = &self.event_encoder else {
                return Err(StageError::Transform(format!(
                    "group {} produces no topic but its stage returned {} events",
                    self.topo.group,
                    output.events.len()
                )));
            };
            for e in &output.events {
                // Derived from state, no record is at fault: an event the output contract
                // refuses is a bug in the stage.
                let record = events.record(&e.key, &e.event).map_err(|err| {
                    StageError::Halt(format!("an output event does not encode: {err}"))
                })?;
                if let Some(t) = e.event["timestamp"].as_i64() {
                    event_times.push(t);
                }
                outgoing.push(Outgoing::from(record));
            }
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
pub(super) struct Transformed {
    /// Output and side records, in the stage's order.
    pub(super) outgoing: Vec<Outgoing>,
    pub(super) dead: Vec<(usize, RecordFailure)>,
    pub(super) deferred: Vec<usize>,
    pub(super) event_times: Vec<i64>,
}

impl Transformed {
    pub(super) fn append(&mut self, other: Transformed) {
        self.outgoing.extend(other.outgoing);
        self.dead.extend(other.dead);
        self.deferred.extend(other.deferred);
        self.event_times.extend(other.event_times);
    }
}

/// The record key of each output row: the value of `field` (top level or `payload.x`) as text.
pub(super) fn key_column(batch: &RecordBatch, field: &str) -> Vec<Option<Vec<u8>>> {
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
