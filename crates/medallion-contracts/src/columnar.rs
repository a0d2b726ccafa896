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
}

/// Decodes Confluent-framed messages of known writer schemas into Arrow in one reader schema.
pub struct BatchDecoder {
    reader_name: String,
    reader: AvroSchema,
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
        Ok(Self {
            reader_name: reader_name.to_string(),
            reader,
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
            let shape = Shape::compile(&parsed)?;
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
            Ok::<_, String>((avro, Writer { shape }))
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
            let decoder = ReaderBuilder::new()
                .with_batch_size(MAX_ROWS)
                .with_reader_schema(self.reader.clone())
                .with_writer_schema_store(store)
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
            .validate_exact(body)
            .map_err(|e| CodecError::from_datum(id, e))?;
        Ok(id)
    }

    /// Decodes `messages` into one batch; bad messages are returned in `rejected`.
    pub fn decode<'a>(
        &mut self,
        messages: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<DecodedBatch, CodecError> {
        let mut rows = Vec::new();
        let mut rejected = Vec::new();
        let mut accepted: Vec<&[u8]> = Vec::new();
        for (index, message) in messages.into_iter().enumerate() {
            match self.check(message) {
                Ok(_) => {
                    rows.push(index);
                    accepted.push(message);
                }
                Err(e) => rejected.push((index, e)),
            }
        }
        let internal = |e: arrow_avro::errors::AvroError| CodecError::SchemaMismatch {
            id: 0,
            reader: String::new(),
            reason: format!("columnar decoder failed on a checked message: {e}"),
        };
        let mut batches = Vec::new();
        if !accepted.is_empty() {
            let decoder = self.decoder()?;
            for message in accepted {
                let mut offset = 0;
                while offset < message.len() {
                    let n = decoder.decode(&message[offset..]).map_err(internal)?;
                    offset += n;
                    if offset < message.len() {
                        // A new writer schema (or a full batch) starts: flush and go on.
                        match decoder.flush().map_err(internal)? {
                            Some(b) => batches.push(b),
                            None if n == 0 => {
                                return Err(internal(arrow_avro::errors::AvroError::General(
                                    "decoder made no progress".into(),
                                )))
                            }
                            None => {}
                        }
                    }
                }
            }
            if let Some(b) = decoder.flush().map_err(internal)? {
                batches.push(b);
            }
        }
        let batch = match batches.len() {
            0 => RecordBatch::new_empty(self.arrow_schema.clone()),
            1 => batches
                .pop()
                .unwrap_or_else(|| RecordBatch::new_empty(self.arrow_schema.clone())),
            _ => arrow::compute::concat_batches(&self.arrow_schema, &batches).map_err(|e| {
                CodecError::SchemaMismatch {
                    id: 0,
                    reader: self.reader_name.clone(),
                    reason: e.to_string(),
                }
            })?,
        };
        if self.decoder.is_some() && batches.len() > 1 {
            // Keep the decoder's active schema on the most common writer next time.
            self.decoder = None;
        }
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
}

impl BatchEncoder {
    /// `arrow_schema` is the schema of the batches to encode; `writer_schema` the registered
    /// schema text; `id` its registry id.
    pub fn new(
        arrow_schema: &ArrowSchema,
        writer_schema: &str,
        id: u32,
    ) -> Result<Self, CodecError> {
        let mut metadata = arrow_schema.metadata().clone();
        metadata.insert(SCHEMA_METADATA_KEY.to_string(), writer_schema.to_string());
        let schema = ArrowSchema::new_with_metadata(arrow_schema.fields().clone(), metadata);
        let encoder = WriterBuilder::new(schema)
            .with_fingerprint_strategy(FingerprintStrategy::Id(id))
            .build_encoder::<AvroSoeFormat>()
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(Self { encoder })
    }

    /// One framed message per row of `batch`, in row order.
    pub fn encode(&mut self, batch: &RecordBatch) -> Result<Vec<bytes::Bytes>, CodecError> {
        self.encoder
            .encode(batch)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let rows = self.encoder.flush();
        Ok(rows.iter().collect())
    }
}

/// Arrow schema helper for tests and tools: the reader schema's Arrow form.
pub fn arrow_schema_of(name: &str, schema_text: &str) -> Result<SchemaRef, ColumnarSetupError> {
    BatchDecoder::new(name, schema_text).map(|d| d.schema())
}
