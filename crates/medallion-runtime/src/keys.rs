//! The record key of every `org_id`-keyed topic.
//!
//! Medallion writes the key as the decimal text of `org_id` (`"42"`, UTF-8, no padding), which
//! any client can read and which murmur2 partitions the same in every language. It also reads
//! the 8-byte big-endian two's-complement long that Java's `LongSerializer` writes, since
//! producers that key by a Java `Long` send that. A key of 8 bytes that are all ASCII digits is
//! read as text: as a long it would exceed 3.4 × 10^18, which is no org id.

use std::borrow::Cow;

/// The `org_id` a record key names, as decimal text; `None` for a key that is neither form.
pub fn org_key_text(key: &[u8]) -> Option<Cow<'_, str>> {
    if let Ok(text) = std::str::from_utf8(key) {
        let trimmed = text.trim();
        if is_decimal(trimmed) {
            return Some(Cow::Borrowed(trimmed));
        }
    }
    let bytes: [u8; 8] = key.try_into().ok()?;
    Some(Cow::Owned(i64::from_be_bytes(bytes).to_string()))
}

/// The `org_id` a record key names.
pub fn org_id(key: &[u8]) -> Option<i64> {
    org_key_text(key).and_then(|t| t.parse().ok())
}

fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_text_keys_are_read_as_written() {
        assert_eq!(org_id(b"42"), Some(42));
        assert_eq!(org_id(b" 7 "), Some(7));
        assert_eq!(org_id(b"-3"), Some(-3));
        assert_eq!(
            org_id(b"12345678"),
            Some(12_345_678),
            "8 ASCII digits are text"
        );
    }

    #[test]
    fn java_long_serializer_keys_are_read_big_endian() {
        // What org.apache.kafka.common.serialization.LongSerializer writes for 42L and -1L.
        assert_eq!(org_id(&[0, 0, 0, 0, 0, 0, 0, 42]), Some(42));
        assert_eq!(org_id(&[0xff; 8]), Some(-1));
        assert_eq!(org_id(&1_000_123_i64.to_be_bytes()), Some(1_000_123));
        assert_eq!(
            org_key_text(&[0, 0, 0, 0, 0, 0, 1, 0]).as_deref(),
            Some("256")
        );
    }

    #[test]
    fn other_keys_name_no_org() {
        assert_eq!(org_id(b""), None);
        assert_eq!(org_id(b"org-7"), None);
        assert_eq!(
            org_id(&[0, 0, 0, 42]),
            None,
            "a 4-byte int is not a key form"
        );
        assert_eq!(org_key_text(b"abcdefghi"), None);
    }
}
