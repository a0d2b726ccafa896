//! The Confluent wire format: magic byte 0, a 4-byte big-endian schema id, the Avro body.

use crate::shape::DatumError;

/// The magic byte of the Confluent wire format.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// Why one message could not be decoded. Every variant is poison: the same bytes will fail
/// the same way again, so the record belongs in the DLQ with [`CodecError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("message of {len} bytes is shorter than the 5-byte Confluent header")]
    MissingHeader { len: usize },
    #[error("unknown magic byte {found:#04x} (expected 0x00)")]
    UnknownMagicByte { found: u8 },
    #[error("schema id {id} is not known to the schema registry")]
    UnknownSchemaId { id: u32 },
    #[error("body truncated for schema id {id}: {source}")]
    TruncatedBody { id: u32, source: DatumError },
    #[error("body does not match writer schema id {id}: {source}")]
    MalformedBody { id: u32, source: DatumError },
    #[error("writer schema id {id} cannot be read as {reader}: {reason}")]
    SchemaMismatch {
        id: u32,
        reader: String,
        reason: String,
    },
    #[error("cannot encode: {0}")]
    Encode(String),
}

impl CodecError {
    /// A short, stable label for metrics and DLQ headers.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::MissingHeader { .. } => "missing_header",
            CodecError::UnknownMagicByte { .. } => "unknown_magic_byte",
            CodecError::UnknownSchemaId { .. } => "unknown_schema_id",
            CodecError::TruncatedBody { .. } => "truncated_body",
            CodecError::MalformedBody { .. } => "malformed_body",
            CodecError::SchemaMismatch { .. } => "schema_mismatch",
            CodecError::Encode(_) => "encode_failed",
        }
    }

    pub(crate) fn from_datum(id: u32, err: DatumError) -> Self {
        match err {
            DatumError::Truncated { .. } => CodecError::TruncatedBody { id, source: err },
            _ => CodecError::MalformedBody { id, source: err },
        }
    }
}

/// Splits a framed message into its schema id and Avro body.
pub fn parse_frame(message: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    match message {
        [] => Err(CodecError::MissingHeader { len: 0 }),
        [magic, ..] if *magic != MAGIC_BYTE => Err(CodecError::UnknownMagicByte { found: *magic }),
        [_, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        short => Err(CodecError::MissingHeader { len: short.len() }),
    }
}

/// Frames an Avro body with its schema id.
pub fn frame(id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips() {
        let framed = frame(0x01020304, b"body");
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(parse_frame(&framed), Ok((0x01020304, &b"body"[..])));
    }

    #[test]
    fn bad_headers_are_typed() {
        assert_eq!(parse_frame(&[]), Err(CodecError::MissingHeader { len: 0 }));
        assert_eq!(
            parse_frame(&[0, 0, 1]),
            Err(CodecError::MissingHeader { len: 3 })
        );
        assert_eq!(
            parse_frame(&[7, 0, 0, 0, 1, 2]),
            Err(CodecError::UnknownMagicByte { found: 7 })
        );
    }
}
