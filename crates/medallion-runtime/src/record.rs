//! Records as the worker holds them. A consumed record is copied out of librdkafka once, into
//! Rust-owned memory ([`Inbound`]); its headers become a [`HeaderList`], which the worker
//! filters, extends and clones freely while it plans outputs and dead letters. librdkafka's own
//! header list is built once per produced record, when it is handed to the producer.
//!
//! (rdkafka's `OwnedMessage`/`OwnedHeaders` keep headers in librdkafka lists: detaching a
//! message, inheriting its headers, adding one and handing a copy to the producer each walked
//! and reallocated a C list. In the replay benchmark's profile of silver-processor, copying,
//! extending and destroying those lists took ~20% of the samples; with one list built per
//! produced record, ~5%.)

use rdkafka::message::{Header, Headers, Message, OwnedHeaders, Timestamp};

/// Record headers in order, as owned Rust values. Implements rdkafka's [`Headers`], so the
/// helpers that read headers (`event_key_of`, `header_value`) take it like any other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderList(Vec<(String, Option<Vec<u8>>)>);

impl HeaderList {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of `headers` (librdkafka's, or any other list).
    pub fn copy_of<H: Headers>(headers: &H) -> Self {
        Self(
            headers
                .iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect(),
        )
    }

    /// Appends a header (a key may repeat, as in Kafka).
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.0.push((key.into(), Some(value.into())));
    }

    /// Appends a header; builder style.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.push(key, value);
        self
    }

    /// librdkafka's list of the same headers, for a record handed to the producer.
    pub fn to_rdkafka(&self) -> OwnedHeaders {
        self.0.iter().fold(
            OwnedHeaders::new_with_capacity(self.0.len()),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: value.as_deref(),
                })
            },
        )
    }
}

impl Headers for HeaderList {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        self.0.get(idx).map(|(key, value)| Header {
            key,
            value: value.as_deref(),
        })
    }
}

/// A consumed record, owned: what a batch, a deferred record and a dead letter's source hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp: Timestamp,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Option<HeaderList>,
}

impl Inbound {
    /// Copies `message` out of librdkafka (key, payload, headers), so its buffer can go.
    pub fn copy_of<M: Message>(message: &M) -> Self {
        Self::new(
            message.topic(),
            message.partition(),
            message.offset(),
            message.timestamp(),
            message.key().map(<[u8]>::to_vec),
            message.payload().map(<[u8]>::to_vec),
            message
                .headers()
                .filter(|h| h.count() > 0)
                .map(HeaderList::copy_of),
        )
    }

    /// A record from its parts (tests, replays).
    pub fn new(
        topic: impl Into<String>,
        partition: i32,
        offset: i64,
        timestamp: Timestamp,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Option<HeaderList>,
    ) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            timestamp,
            key,
            payload,
            headers,
        }
    }
}

impl Message for Inbound {
    type Headers = HeaderList;

    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        self.payload.as_deref_mut()
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn partition(&self) -> i32 {
        self.partition
    }

    fn offset(&self) -> i64 {
        self.offset
    }

    fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    fn headers(&self) -> Option<&HeaderList> {
        self.headers.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_list_round_trips_through_librdkafka_in_order() {
        let list = HeaderList::new()
            .with("a", b"1".to_vec())
            .with("b", Vec::new())
            .with("a", b"2".to_vec());
        let native = list.to_rdkafka();
        assert_eq!(native.count(), 3);
        assert_eq!(HeaderList::copy_of(&native), list);
        let values: Vec<_> = native.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            values,
            [
                ("a", Some(&b"1"[..])),
                ("b", Some(&b""[..])),
                ("a", Some(&b"2"[..]))
            ]
        );
    }

    #[test]
    fn an_inbound_record_keeps_every_part() {
        let native = OwnedHeaders::new().insert(Header {
            key: "k",
            value: Some(&b"v"[..]),
        });
        let owned = rdkafka::message::OwnedMessage::new(
            Some(b"payload".to_vec()),
            Some(b"key".to_vec()),
            "t".into(),
            Timestamp::CreateTime(7),
            3,
            42,
            Some(native),
        );
        let inbound = Inbound::copy_of(&owned);
        assert_eq!(inbound.topic(), "t");
        assert_eq!((inbound.partition(), inbound.offset()), (3, 42));
        assert_eq!(inbound.timestamp(), Timestamp::CreateTime(7));
        assert_eq!(inbound.key(), Some(&b"key"[..]));
        assert_eq!(inbound.payload(), Some(&b"payload"[..]));
        assert_eq!(
            inbound.headers(),
            Some(&HeaderList::new().with("k", b"v".to_vec()))
        );
    }
}
