//! Confluent-framed Avro ↔ Arrow `RecordBatch`, for batches of events.
//!
//! Decoding resolves each message's writer schema (named by its id) against the stage's
//! reader schema through arrow-avro, the fastest path measured here. arrow-avro cannot roll
//! back a half-decoded row, so every message is first checked against its writer schema by a
//! compiled [`Shape`] walk; malformed messages are rejected with a typed [`CodecError`] and
//! never reach the columnar decoder.

use std::collections::{BTreeMap, HashMap};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema as ArrowSchema, SchemaRef};
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{
    AvroSchema, Fingerprint, FingerprintAlgorithm, FingerprintStrategy, SchemaStore,
    SCHEMA_METADATA_KEY,
};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder, WriterBuilder};

use crate::shape::Shape;
use crate::wire::{parse_frame, CodecError};

/// A setup error: the reader schema itself is unusable. Not a per-message error.
#[derive(Debug, thiserror::Error)]
#[error("reader schema {name}: {message}")]
pub struct ColumnarSetupError {
    pub name: String,
    pub message: String,
}

/// The result of decoding a batch of messages.
#[derive(Debug)]
pub struct DecodedBatch {
    /// One row per accepted message, in input order, in the reader schema.
    pub batch: RecordBatch,
    /// For each row of `batch`, the index of the message it came from.
    pub rows: Vec<usize>,
    /// Messages that could not be decoded, with why. Never silently dropped.
    pub rejected: Vec<(usize, CodecError)>,
}

struct Writer {
    shape: Shape,
    /// Same canonical form as the reader schema: no resolution needed.
    identical: bool,
}

/// Decodes Confluent-framed messages of known writer schemas into Arrow in one reader schema.
pub struct BatchDecoder {
    reader_name: String,
    reader: AvroSchema,
    reader_canonical: String,
    arrow_schema: SchemaRef,
    writers: BTreeMap<u32, (AvroSchema, Writer)>,
    mismatched: HashMap<u32, String>,
    decoder: Option<Decoder>,
}

const MAX_ROWS: usize = 1 << 20;

impl BatchDecoder {
    /// `reader_schema` is the self-contained schema text the stage expects.
    pub fn new(reader_name: &str, reader_schema: &str) -> Result<Self, ColumnarSetupError> {
        let reader = AvroSchema::new(reader_schema.to_string());
        // Decoding the reader schema against itself gives the output Arrow schema.
        let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        let setup = |message: String| ColumnarSetupError {
            name: reader_name.to_string(),
            message,
        };
        store
            .set(Fingerprint::Id(0), reader.clone())
            .map_err(|e| setup(e.to_string()))?;
        let probe = ReaderBuilder::new()
            .with_reader_schema(reader.clone())
            .with_writer_schema_store(store)
            .build_decoder()
            .map_err(|e| setup(e.to_string()))?;
        let reader_canonical = apache_avro::Schema::parse_str(reader_schema)
            .map(|s| s.canonical_form())
            .map_err(|e| setup(e.to_string()))?;
        Ok(Self {
            reader_name: reader_name.to_string(),
            reader,
            reader_canonical,
            arrow_schema: probe.schema(),
            writers: BTreeMap::new(),
            mismatched: HashMap::new(),
            decoder: None,
        })
    }

    /// The Arrow schema of decoded batches.
    pub fn schema(&self) -> SchemaRef {
        self.arrow_schema.clone()
    }

    /// Whether `id` has been added (resolvable or not).
    pub fn knows(&self, id: u32) -> bool {
        self.writers.contains_key(&id) || self.mismatched.contains_key(&id)
    }

    /// Adds the writer schema registered under `id`. If it cannot be resolved against the
    /// reader schema, messages with that id are rejected as [`CodecError::SchemaMismatch`].
    pub fn add_writer_schema(&mut self, id: u32, writer_schema: &str) -> Result<(), CodecError> {
        let mismatch = |reason: String| CodecError::SchemaMismatch {
            id,
            reader: self.reader_name.clone(),
            reason,
        };
        let result = (|| {
            let parsed =
                apache_avro::Schema::parse_str(writer_schema).map_err(|e| e.to_string())?;
            let shape = Shape::compile(&parsed).map_err(|e| e.to_string())?;
            let identical = parsed.canonical_form() == self.reader_canonical;
            let avro = AvroSchema::new(writer_schema.to_string());
            let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
            store
                .set(Fingerprint::Id(id), avro.clone())
                .map_err(|e| e.to_string())?;
            ReaderBuilder::new()
                .with_reader_schema(self.reader.clone())
                .with_writer_schema_store(store)
                .build_decoder()
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((avro, Writer { shape, identical }))
        })();
        self.decoder = None;
        match result {
            Ok(entry) => {
                self.mismatched.remove(&id);
                self.writers.insert(id, entry);
                Ok(())
            }
            Err(reason) => {
                self.writers.remove(&id);
                self.mismatched.insert(id, reason.clone());
                Err(mismatch(reason))
            }
        }
    }

    /// Schema ids that appear in `messages` and have not been added yet: fetch them from the
    /// registry (and add them) before decoding, or they are rejected as unknown.
    pub fn unknown_ids<'a>(&self, messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<u32> {
        let mut ids: Vec<u32> = messages
            .into_iter()
            .filter_map(|m| parse_frame(m).ok().map(|(id, _)| id))
            .filter(|id| !self.knows(*id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn decoder(&mut self) -> Result<&mut Decoder, CodecError> {
        if self.decoder.is_none() {
            let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
            for (id, (avro, _)) in &self.writers {
                store.set(Fingerprint::Id(*id), avro.clone()).map_err(|e| {
                    CodecError::SchemaMismatch {
                        id: *id,
                        reader: self.reader_name.clone(),
                        reason: e.to_string(),
                    }
                })?;
            }
            let mut builder = ReaderBuilder::new()
                .with_batch_size(MAX_ROWS)
                .with_writer_schema_store(store);
            // Resolution costs ~30%: skip it when every writer is the reader schema itself.
            if !self.writers.values().all(|(_, w)| w.identical) {
                builder = builder.with_reader_schema(self.reader.clone());
            }
            let decoder = builder
                .build_decoder()
                .map_err(|e| CodecError::SchemaMismatch {
                    id: 0,
                    reader: self.reader_name.clone(),
                    reason: e.to_string(),
                })?;
            self.decoder = Some(decoder);
        }
        // Just built above when it was missing.
        self.decoder
            .as_mut()
            .ok_or(CodecError::Encode("no decoder".into()))
    }

    /// Checks one message: framing, known writer schema, exact well-formed body.
    pub fn check(&self, message: &[u8]) -> Result<u32, CodecError> {
        self.check_with(message, true)
    }

    fn check_with(&self, message: &[u8], check_utf8: bool) -> Result<u32, CodecError> {
        let (id, body) = parse_frame(message)?;
        if let Some(reason) = self.mismatched.get(&id) {
            return Err(CodecError::SchemaMismatch {
                id,
                reader: self.reader_name.clone(),
                reason: reason.clone(),
            });
        }
        let Some((_, writer)) = self.writers.get(&id) else {
            return Err(CodecError::UnknownSchemaId { id });
        };
        writer
            .shape
            .validate(body, check_utf8)
            .map_err(|e| CodecError::from_datum(id, e))?;
        Ok(id)
    }

    /// Decodes `messages` into one batch; bad messages are returned in `rejected`.
    pub fn decode<'a>(
        &mut self,
        messages: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<DecodedBatch, CodecError> {
        let messages: Vec<&[u8]> = messages.into_iter().collect();
        // Fast pass: strings are checked once, by the columnar decoder. Only if it refuses
        // the batch (invalid UTF-8 somewhere) is every message checked fully to find it.
        match self.decode_pass(&messages, false) {
            Ok(decoded) => Ok(decoded),
            Err(_) => {
                self.decoder = None;
                match self.decode_pass(&messages, true) {
                    Ok(decoded) => Ok(decoded),
                    Err(_) => {
                        // Refused though every message passed the full check (a decoder bug
                        // one message triggers): one at a time, so only that one is rejected.
                        self.decoder = None;
                        self.decode_each(&messages)
                    }
                }
            }
        }
    }

    /// Decodes each message alone; a message the decoder refuses is rejected with the error.
    pub(crate) fn decode_each(&mut self, messages: &[&[u8]]) -> Result<DecodedBatch, CodecError> {
        let mut rows = Vec::with_capacity(messages.len());
        let mut rejected = Vec::new();
        let mut batches = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            match self.decode_pass(std::slice::from_ref(message), true) {
                Ok(one) => {
                    if let Some((_, e)) = one.rejected.into_iter().next() {
                        rejected.push((index, e));
                    } else if one.batch.num_rows() == 1 {
                        rows.push(index);
                        batches.push(one.batch);
                    }
                }
                Err(e) => {
                    self.decoder = None;
                    rejected.push((index, e));
                }
            }
        }
        let batch = self.concat(batches)?;
        Ok(DecodedBatch {
            batch,
            rows,
            rejected,
        })
    }

    /// One batch of the reader's schema from batches of it (of different writers).
    fn concat(&self, batches: Vec<RecordBatch>) -> Result<RecordBatch, CodecError> {
        if batches.len() < 2 {
            return Ok(batches
                .into_iter()
                .next()
                .unwrap_or_else(|| RecordBatch::new_empty(self.arrow_schema.clone())));
        }
        // Sub-batches of different writers: concatenation merges their enum dictionaries,
        // so put enum columns back on the reader's symbol list.
        arrow::compute::concat_batches(&self.arrow_schema, &batches)
            .and_then(|batch| crate::enums::conform(batch, &self.arrow_schema))
            .map_err(|e| CodecError::SchemaMismatch {
                id: 0,
                reader: self.reader_name.clone(),
                reason: e.to_string(),
            })
    }

    fn decode_pass(
        &mut self,
        messages: &[&[u8]],
        check_utf8: bool,
    ) -> Result<DecodedBatch, CodecError> {
        let mut rows = Vec::with_capacity(messages.len());
        let mut rejected = Vec::new();
        let mut accepted: Vec<&[u8]> = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            match self.check_with(message, check_utf8) {
                Ok(_) => {
                    rows.push(index);
                    accepted.push(message);
                }
                Err(e) => rejected.push((index, e)),
            }
        }
        let reader_name = self.reader_name.clone();
        let internal = move |e: arrow_avro::errors::AvroError| CodecError::SchemaMismatch {
            id: 0,
            reader: reader_name.clone(),
            reason: format!("columnar decoder refused checked messages: {e}"),
        };
        let mut batches = Vec::new();
        if !accepted.is_empty() {
            let decoder = self.decoder()?;
            let result = (|| {
                for message in &accepted {
                    let mut offset = 0;
                    while offset < message.len() {
                        let n = decoder.decode(&message[offset..])?;
                        offset += n;
                        if offset < message.len() {
                            // A new writer schema (or a full batch) starts: flush and go on.
                            match decoder.flush()? {
                                Some(b) => batches.push(b),
                                None if n == 0 => {
                                    return Err(arrow_avro::errors::AvroError::General(
                                        "decoder made no progress".into(),
                                    ))
                                }
                                None => {}
                            }
                        }
                    }
                }
                if let Some(b) = decoder.flush()? {
                    batches.push(b);
                }
                Ok(())
            })();
            if let Err(e) = result {
                self.decoder = None;
                return Err(internal(e));
            }
        }
        let arrow_schema = self.arrow_schema.clone();
        let conform = |batch: RecordBatch| -> Result<RecordBatch, CodecError> {
            if batch.schema() == arrow_schema {
                Ok(batch)
            } else {
                RecordBatch::try_new(arrow_schema.clone(), batch.columns().to_vec()).map_err(|e| {
                    CodecError::SchemaMismatch {
                        id: 0,
                        reader: self.reader_name.clone(),
                        reason: e.to_string(),
                    }
                })
            }
        };
        let conformed = batches
            .into_iter()
            .map(conform)
            .collect::<Result<Vec<_>, _>>()?;
        let batch = self.concat(conformed)?;
        Ok(DecodedBatch {
            batch,
            rows,
            rejected,
        })
    }
}

/// Encodes Arrow batches into Confluent-framed messages, one per row.
pub struct BatchEncoder {
    encoder: Encoder,
    /// The writer schema's Arrow form: its enum fields name their symbol lists.
    target: SchemaRef,
}

impl BatchEncoder {
    /// `arrow_schema` is the schema of the batches to encode; `writer_schema` the registered
    /// schema text; `id` its registry id.
    pub fn new(
        arrow_schema: &ArrowSchema,
        writer_schema: &str,
        id: u32,
    ) -> Result<Self, CodecError> {
        let target = arrow_schema_of("writer", writer_schema)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let mut metadata = arrow_schema.metadata().clone();
        metadata.insert(SCHEMA_METADATA_KEY.to_string(), writer_schema.to_string());
        let schema = ArrowSchema::new_with_metadata(arrow_schema.fields().clone(), metadata);
        let encoder = WriterBuilder::new(schema)
            .with_fingerprint_strategy(FingerprintStrategy::Id(id))
            .build_encoder::<AvroSoeFormat>()
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(Self { encoder, target })
    }

    /// One framed message per row of `batch`, in row order.
    pub fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<bytes::Bytes>, CodecError> {
        // A stage's concat, filter or cast may leave an enum column with a dictionary other
        // than the writer's symbol list, which the Avro encoder refuses.
        let batch = if batch.num_columns() == self.target.fields().len() {
            crate::enums::conform(batch.clone(), &self.target)
                .map_err(|e| CodecError::Encode(e.to_string()))?
        } else {
            batch.clone()
        };
        if let Err(e) = self.encoder.encode(&batch) {
            // Drop whatever the failed call left buffered, so the next batch starts clean.
            let _ = self.encoder.flush();
            return Err(CodecError::Encode(e.to_string()));
        }
        let rows = self.encoder.flush();
        Ok(rows.iter().collect())
    }
}

/// Arrow schema helper for tests and tools: the reader schema's Arrow form.
pub fn arrow_schema_of(name: &str, schema_text: &str) -> Result<SchemaRef, ColumnarSetupError> {
    BatchDecoder::new(name, schema_text).map(|d| d.schema())
}
