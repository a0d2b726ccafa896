//! Dead letters: the original key, value and headers, plus headers that say where the record
//! came from and why it failed, so a redrive can put it back.

use rdkafka::message::Headers;

use crate::error::RecordFailure;
use crate::record::HeaderList;

/// Header names added to every dead letter.
pub mod header {
    pub const STAGE: &str = "medallion.dlq.stage";
    pub const ERROR_CLASS: &str = "medallion.dlq.error.class";
    pub const ERROR_REASON: &str = "medallion.dlq.error.reason";
    pub const ERROR_MESSAGE: &str = "medallion.dlq.error.message";
    pub const ORIGINAL_TOPIC: &str = "medallion.dlq.original.topic";
    pub const ORIGINAL_PARTITION: &str = "medallion.dlq.original.partition";
    pub const ORIGINAL_OFFSET: &str = "medallion.dlq.original.offset";
    pub const ORIGINAL_TIMESTAMP: &str = "medallion.dlq.original.timestamp";
    pub const ATTEMPTS: &str = "medallion.dlq.attempts";
}

/// Where a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp, epoch ms, if the record had one.
    pub timestamp: Option<i64>,
}

/// Longest error message kept in a header.
const MAX_MESSAGE: usize = 1_024;

/// The original headers followed by the dead-letter headers.
pub fn dead_letter_headers(
    original: Option<&HeaderList>,
    stage: &str,
    failure: &RecordFailure,
    origin: &Origin,
    attempts: usize,
) -> HeaderList {
    let mut headers = original.cloned().unwrap_or_default();
    let mut message = failure.message.clone();
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let partition = origin.partition.to_string();
    let offset = origin.offset.to_string();
    let timestamp = origin.timestamp.map(|t| t.to_string()).unwrap_or_default();
    let attempts = attempts.to_string();
    let added: [(&str, &str); 9] = [
        (header::STAGE, stage),
        (header::ERROR_CLASS, failure.class.as_str()),
        (header::ERROR_REASON, &failure.reason),
        (header::ERROR_MESSAGE, &message),
        (header::ORIGINAL_TOPIC, &origin.topic),
        (header::ORIGINAL_PARTITION, &partition),
        (header::ORIGINAL_OFFSET, &offset),
        (header::ORIGINAL_TIMESTAMP, &timestamp),
        (header::ATTEMPTS, &attempts),
    ];
    for (key, value) in added {
        headers.push(key, value);
    }
    for (key, value) in &failure.headers {
        headers.push(key.as_str(), value.as_str());
    }
    headers
}

/// The value of header `key` (the last one, if repeated), as text.
pub fn header_value<H: Headers>(headers: &H, key: &str) -> Option<String> {
    headers
        .iter()
        .filter(|h| h.key == key)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_original_headers_and_adds_the_reason() {
        let original = HeaderList::new().with("traceparent", "00-abc");
        let failure = RecordFailure::poison("truncated_body", "x".repeat(5_000));
        let origin = Origin {
            topic: "connector.data.raw".into(),
            partition: 3,
            offset: 42,
            timestamp: Some(1_700_000_000_000),
        };
        let headers =
            dead_letter_headers(Some(&original), "bronze-processor", &failure, &origin, 1);
        assert_eq!(
            header_value(&headers, "traceparent").as_deref(),
            Some("00-abc")
        );
        assert_eq!(
            header_value(&headers, header::ERROR_REASON).as_deref(),
            Some("truncated_body")
        );
        assert_eq!(
            header_value(&headers, header::ERROR_CLASS).as_deref(),
            Some("poison")
        );
        assert_eq!(
            header_value(&headers, header::ORIGINAL_OFFSET).as_deref(),
            Some("42")
        );
        assert_eq!(
            header_value(&headers, header::ORIGINAL_PARTITION).as_deref(),
            Some("3")
        );
        assert_eq!(
            header_value(&headers, header::ATTEMPTS).as_deref(),
            Some("1")
        );
        assert_eq!(
            header_value(&headers, header::ERROR_MESSAGE).map(|m| m.len()),
            Some(1_024)
        );
    }
}
