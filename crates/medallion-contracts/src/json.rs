//! The JSON form of events: natural JSON (a union value is written as its branch's value, an
//! enum as its symbol, a timestamp as epoch milliseconds). Golden payloads and operator tools
//! use it; it round-trips through Avro binary unchanged.

use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::Value as Json;

use crate::wire::{frame, parse_frame, CodecError};

/// Why a JSON document is not a valid event of a schema.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("JSON does not fit the schema: {0}")]
    Invalid(String),
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// JSON → Avro value, validated and resolved against `schema` (defaults filled in).
pub fn to_avro_value(json: &Json, schema: &Schema) -> Result<Value, JsonError> {
    let value = Value::try_from(json.clone()).map_err(|e| JsonError::Invalid(e.to_string()))?;
    value
        .resolve(schema)
        .map_err(|e| JsonError::Invalid(e.to_string()))
}

/// JSON → Avro binary body (no framing).
pub fn to_avro_binary(json: &Json, schema: &Schema) -> Result<Vec<u8>, JsonError> {
    let value = to_avro_value(json, schema)?;
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .map_err(|e| JsonError::Encode(e.to_string()))
}

/// JSON → Confluent-framed message under schema `id`.
pub fn to_framed(json: &Json, schema: &Schema, id: u32) -> Result<Vec<u8>, JsonError> {
    Ok(frame(id, &to_avro_binary(json, schema)?))
}

/// Avro value → JSON.
pub fn from_avro_value(value: Value) -> Result<Json, JsonError> {
    let value = strip_unions(value);
    Json::try_from(value).map_err(|e| JsonError::Encode(e.to_string()))
}

fn strip_unions(value: Value) -> Value {
    match value {
        Value::Union(_, inner) => strip_unions(*inner),
        Value::Record(fields) => Value::Record(
            fields
                .into_iter()
                .map(|(k, v)| (k, strip_unions(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_unions).collect()),
        Value::Map(items) => Value::Map(
            items
                .into_iter()
                .map(|(k, v)| (k, strip_unions(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Avro binary written with `writer`, read as `reader` → JSON.
pub fn from_avro_binary(body: &[u8], writer: &Schema, reader: &Schema) -> Result<Json, JsonError> {
    let mut cursor = body;
    let value = apache_avro::reader::datum::GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        .and_then(|r| r.read_value(&mut cursor))
        .map_err(|e| JsonError::Invalid(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(JsonError::Invalid(format!(
            "{} trailing bytes after the datum",
            cursor.len()
        )));
    }
    from_avro_value(value)
}

/// A framed message → (schema id, JSON), with the writer schema looked up by id.
pub fn from_framed<'s>(
    message: &[u8],
    writer_by_id: impl Fn(u32) -> Option<&'s Schema>,
    reader: &Schema,
) -> Result<(u32, Json), CodecError> {
    let (id, body) = parse_frame(message)?;
    let writer = writer_by_id(id).ok_or(CodecError::UnknownSchemaId { id })?;
    let json = from_avro_binary(body, writer, reader).map_err(|e| CodecError::SchemaMismatch {
        id,
        reader: String::new(),
        reason: e.to_string(),
    })?;
    Ok((id, json))
}
