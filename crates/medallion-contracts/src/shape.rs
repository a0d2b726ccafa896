//! A compiled walk over an Avro writer schema that checks a datum is well formed and finds its
//! exact length, without materialising it. The columnar decoder runs it before handing bytes
//! to arrow-avro, whose decoder must never see a malformed record (it cannot roll back a
//! half-decoded row).

use apache_avro::schema::{Name, ResolvedSchema, Schema, UuidSchema};
use std::collections::HashMap;

/// Why a datum does not match its writer schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatumError {
    #[error("body ends after {at} bytes, inside {what}")]
    Truncated { at: usize, what: &'static str },
    #[error("malformed body at byte {at}: {what}")]
    Malformed { at: usize, what: String },
    #[error("{extra} trailing bytes after a complete datum of {len} bytes")]
    TrailingBytes { len: usize, extra: usize },
}

/// The compiled shape of a schema.
#[derive(Debug, Clone)]
pub enum Shape {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(usize),
    Array(Box<Shape>),
    Map(Box<Shape>),
    Union(Vec<Shape>),
    Record(Vec<Shape>),
}

/// A schema whose shape cannot be compiled (a recursive or unresolvable schema), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(String);

impl Shape {
    /// Compiles `schema`; fails on recursive schemas, which the pipeline does not use.
    pub fn compile(schema: &Schema) -> Result<Shape, ShapeError> {
        let resolved = ResolvedSchema::try_from(schema).map_err(|e| ShapeError(e.to_string()))?;
        let mut stack = Vec::new();
        compile(schema, resolved.get_names(), &mut stack).map_err(ShapeError)
    }

    /// Checks that `buf` holds exactly one datum of this shape.
    pub fn validate_exact(&self, buf: &[u8]) -> Result<(), DatumError> {
        self.validate(buf, true)
    }

    /// Like [`Shape::validate_exact`]; with `check_utf8` false, string contents are not
    /// checked (the columnar decoder checks them again when it builds its arrays).
    pub fn validate(&self, buf: &[u8], check_utf8: bool) -> Result<(), DatumError> {
        let mut cursor = Cursor {
            buf,
            pos: 0,
            check_utf8,
        };
        cursor.skip(self)?;
        if cursor.pos != buf.len() {
            return Err(DatumError::TrailingBytes {
                len: cursor.pos,
                extra: buf.len() - cursor.pos,
            });
        }
        Ok(())
    }
}

fn compile(
    schema: &Schema,
    names: &HashMap<Name, &Schema>,
    stack: &mut Vec<Name>,
) -> Result<Shape, String> {
    Ok(match schema {
        Schema::Null => Shape::Null,
        Schema::Boolean => Shape::Boolean,
        Schema::Int | Schema::Date | Schema::TimeMillis => Shape::Int,
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Shape::Long,
        Schema::Float => Shape::Float,
        Schema::Double => Shape::Double,
        Schema::Bytes | Schema::BigDecimal => Shape::Bytes,
        Schema::String => Shape::String,
        Schema::Uuid(UuidSchema::String) => Shape::String,
        Schema::Uuid(UuidSchema::Bytes) => Shape::Bytes,
        Schema::Uuid(UuidSchema::Fixed(f)) => Shape::Fixed(f.size),
        Schema::Fixed(f) | Schema::Duration(f) => Shape::Fixed(f.size),
        Schema::Decimal(d) => match &d.inner {
            apache_avro::schema::InnerDecimalSchema::Fixed(f) => Shape::Fixed(f.size),
            _ => Shape::Bytes,
        },
        Schema::Enum(e) => Shape::Enum(e.symbols.len()),
        Schema::Array(a) => Shape::Array(Box::new(compile(&a.items, names, stack)?)),
        Schema::Map(m) => Shape::Map(Box::new(compile(&m.types, names, stack)?)),
        Schema::Union(u) => Shape::Union(
            u.variants()
                .iter()
                .map(|v| compile(v, names, stack))
                .collect::<Result<_, _>>()?,
        ),
        Schema::Record(r) => {
            if stack.contains(&r.name) {
                return Err(format!("recursive type {} is not supported", r.name));
            }
            stack.push(r.name.clone());
            let fields = r
                .fields
                .iter()
                .map(|f| compile(&f.schema, names, stack))
                .collect::<Result<_, _>>();
            stack.pop();
            Shape::Record(fields?)
        }
        Schema::Ref { name } => {
            let target = names
                .get(name)
                .ok_or_else(|| format!("unresolved reference {name}"))?;
            compile(target, names, stack)?
        }
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    check_utf8: bool,
}

impl Cursor<'_> {
    #[inline(always)]
    fn varint(&mut self, what: &'static str) -> Result<i64, DatumError> {
        // Fast path: most varints are one byte.
        if let Some(&byte) = self.buf.get(self.pos) {
            if byte & 0x80 == 0 {
                self.pos += 1;
                let value = u64::from(byte);
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        self.varint_slow(what)
    }

    #[inline(never)]
    fn varint_slow(&mut self, what: &'static str) -> Result<i64, DatumError> {
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(DatumError::Truncated { at: self.pos, what });
            };
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(DatumError::Malformed {
                    at: self.pos - 1,
                    what: format!("varint of {what} overflows 64 bits"),
                });
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        Ok(((value >> 1) as i64) ^ -((value & 1) as i64))
    }

    #[inline(always)]
    fn int(&mut self, what: &'static str) -> Result<i64, DatumError> {
        let at = self.pos;
        let v = self.varint(what)?;
        if i32::try_from(v).is_err() {
            return Err(DatumError::Malformed {
                at,
                what: format!("{what} {v} does not fit an int"),
            });
        }
        Ok(v)
    }

    #[inline(always)]
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DatumError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DatumError::Truncated {
                at: self.buf.len(),
                what,
            })?;
        let slice = &self.buf[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    #[inline(always)]
    fn length(&mut self, what: &'static str) -> Result<usize, DatumError> {
        let at = self.pos;
        let len = self.varint(what)?;
        usize::try_from(len).map_err(|_| DatumError::Malformed {
            at,
            what: format!("negative length {len} of {what}"),
        })
    }

    /// Block count of an array or map; a negative count is followed by the block's byte size.
    fn block_count(&mut self, what: &'static str) -> Result<usize, DatumError> {
        let count = self.varint(what)?;
        if count < 0 {
            self.varint(what)?;
        }
        Ok(count.unsigned_abs() as usize)
    }

    fn skip(&mut self, shape: &Shape) -> Result<(), DatumError> {
        match shape {
            Shape::Null => {}
            Shape::Boolean => {
                let at = self.pos;
                let b = self.take(1, "boolean")?[0];
                if b > 1 {
                    return Err(DatumError::Malformed {
                        at,
                        what: format!("boolean byte {b}"),
                    });
                }
            }
            Shape::Int => {
                self.int("int")?;
            }
            Shape::Long => {
                self.varint("long")?;
            }
            Shape::Float => {
                self.take(4, "float")?;
            }
            Shape::Double => {
                self.take(8, "double")?;
            }
            Shape::Bytes => {
                let n = self.length("bytes")?;
                self.take(n, "bytes")?;
            }
            Shape::String => {
                let n = self.length("string")?;
                let at = self.pos;
                let check = self.check_utf8;
                let s = self.take(n, "string")?;
                if check && std::str::from_utf8(s).is_err() {
                    return Err(DatumError::Malformed {
                        at,
                        what: "string is not UTF-8".into(),
                    });
                }
            }
            Shape::Fixed(n) => {
                self.take(*n, "fixed")?;
            }
            Shape::Enum(symbols) => {
                let at = self.pos;
                let i = self.int("enum index")?;
                if i < 0 || i as usize >= *symbols {
                    return Err(DatumError::Malformed {
                        at,
                        what: format!("enum index {i} out of {symbols} symbols"),
                    });
                }
            }
            Shape::Array(items) => loop {
                let n = self.block_count("array block")?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.skip(items)?;
                }
            },
            Shape::Map(values) => loop {
                let n = self.block_count("map block")?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    self.skip(&Shape::String)?;
                    self.skip(values)?;
                }
            },
            Shape::Union(branches) => {
                let at = self.pos;
                let i = self.int("union index")?;
                let branch = usize::try_from(i)
                    .ok()
                    .and_then(|i| branches.get(i))
                    .ok_or_else(|| DatumError::Malformed {
                        at,
                        what: format!("union index {i} out of {} branches", branches.len()),
                    })?;
                self.skip(branch)?;
            }
            Shape::Record(fields) => {
                for field in fields {
                    self.skip(field)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;

    fn schema() -> Schema {
        Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"id","type":"string"},
                {"name":"n","type":"long"},
                {"name":"tags","type":{"type":"array","items":"string"}},
                {"name":"opt","type":["null","int"]},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"]}}]}"#,
        )
        .expect("schema")
    }

    fn datum() -> Vec<u8> {
        let value = Value::Record(vec![
            ("id".into(), Value::String("abc".into())),
            ("n".into(), Value::Long(-42)),
            (
                "tags".into(),
                Value::Array(vec![Value::String("x".into()), Value::String("y".into())]),
            ),
            ("opt".into(), Value::Union(1, Box::new(Value::Int(7)))),
            ("e".into(), Value::Enum(1, "B".into())),
        ]);
        crate::json::to_avro_binary(
            &crate::json::from_avro_value(value).expect("json"),
            &schema(),
        )
        .expect("encode")
    }

    #[test]
    fn accepts_a_valid_datum() {
        let shape = Shape::compile(&schema()).expect("compile");
        shape.validate_exact(&datum()).expect("valid");
    }

    #[test]
    fn every_truncation_is_detected() {
        let shape = Shape::compile(&schema()).expect("compile");
        let bytes = datum();
        for len in 0..bytes.len() {
            let err = shape.validate_exact(&bytes[..len]).expect_err("truncated");
            assert!(
                matches!(err, DatumError::Truncated { .. }),
                "len {len}: {err}"
            );
        }
    }

    #[test]
    fn trailing_bytes_and_bad_indexes_are_detected() {
        let shape = Shape::compile(&schema()).expect("compile");
        let mut bytes = datum();
        bytes.push(0);
        assert!(matches!(
            shape.validate_exact(&bytes),
            Err(DatumError::TrailingBytes { extra: 1, .. })
        ));
        let mut bad_enum = datum();
        let last = bad_enum.len() - 1;
        bad_enum[last] = 8; // zigzag 4: enum index 4 of 2 symbols
        assert!(matches!(
            shape.validate_exact(&bad_enum),
            Err(DatumError::Malformed { .. })
        ));
    }
}
