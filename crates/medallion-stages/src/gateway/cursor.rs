//! The id of every message a client gets: a cursor of Kafka positions, bound to the client's
//! org and signed, so a client resumes exactly after the last message it saw and cannot forge
//! one to read another org or skip ahead.
//!
//! It holds the next offset to read of every partition of the gateway's topics (the order of
//! [`Topology`]): an org's records are keyed by `org_id`, but a producer keying by a Java
//! `Long` places them elsewhere than one keying by text, so the cursor does not guess which
//! partitions an org uses. Binary, then base64url: version, the topology's fingerprint, the
//! org, one varint per partition (offset + 1, 0 = not known), and the first 16 bytes of
//! HMAC-SHA256 over all of it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
/// Longer than any cursor of a real topology; refused before any decoding.
pub const MAX_TEXT_LEN: usize = 4_096;

/// The topics and partition counts the positions are laid out by, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    topics: Vec<(String, usize)>,
    fingerprint: u32,
}

impl Topology {
    pub fn new(mut topics: Vec<(String, usize)>) -> Self {
        topics.sort();
        topics.dedup_by(|a, b| a.0 == b.0);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"medallion.cursor.topology")
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        for (topic, partitions) in &topics {
            mac.update(topic.as_bytes());
            mac.update(&[0]);
            mac.update(&(*partitions as u64).to_be_bytes());
        }
        let digest = mac.finalize().into_bytes();
        let fingerprint = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        Self {
            topics,
            fingerprint,
        }
    }

    pub fn topics(&self) -> &[(String, usize)] {
        &self.topics
    }

    /// The index of `topic`'s partition `partition` in a position vector.
    pub fn slot(&self, topic: &str, partition: i32) -> Option<usize> {
        let mut base = 0;
        for (name, count) in &self.topics {
            if name == topic {
                return usize::try_from(partition)
                    .ok()
                    .filter(|p| p < count)
                    .map(|p| base + p);
            }
            base += count;
        }
        None
    }

    /// (topic, partition) of a slot.
    pub fn at(&self, slot: usize) -> Option<(&str, i32)> {
        let mut base = 0;
        for (name, count) in &self.topics {
            if slot < base + count {
                return Some((name, (slot - base) as i32));
            }
            base += count;
        }
        None
    }

    pub fn slots(&self) -> usize {
        self.topics.iter().map(|(_, c)| c).sum()
    }
}

/// Where a client stands: its org and the next offset to read per partition slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub org_id: i64,
    /// Per slot of the topology, the next offset to deliver (`None`: not known).
    pub next: Vec<Option<i64>>,
}

/// Why a cursor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("the cursor is not one this gateway wrote")]
    Malformed,
    #[error("the cursor's signature does not match")]
    BadSignature,
    #[error("the cursor belongs to another org")]
    WrongOrg,
    /// Signed by us, for a layout of topics that has changed since.
    #[error("the cursor was written for another set of topics")]
    OtherTopology,
}

impl CursorError {
    pub fn reason(&self) -> &'static str {
        match self {
            CursorError::Malformed => "malformed",
            CursorError::BadSignature => "bad_signature",
            CursorError::WrongOrg => "wrong_org",
            CursorError::OtherTopology => "other_topology",
        }
    }
}

/// Writes and checks cursors with one secret key.
#[derive(Clone)]
pub struct CursorCodec {
    key: Vec<u8>,
    topology: Topology,
}

impl CursorCodec {
    pub fn new(key: &[u8], topology: Topology) -> Self {
        Self {
            key: key.to_vec(),
            topology,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"))
    }

    pub fn encode(&self, cursor: &Cursor) -> String {
        let mut bytes = Vec::with_capacity(16 + cursor.next.len() * 4);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.topology.fingerprint.to_be_bytes());
        put_varint(&mut bytes, zigzag(cursor.org_id));
        for slot in 0..self.topology.slots() {
            let next = cursor.next.get(slot).copied().flatten();
            put_varint(&mut bytes, next.map_or(0, |n| n.max(0) as u64 + 1));
        }
        let mut mac = self.mac();
        mac.update(&bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes()[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The cursor `text` names, if it is ours, intact, and `org_id`'s.
    pub fn decode(&self, text: &str, org_id: i64) -> Result<Cursor, CursorError> {
        if text.len() > MAX_TEXT_LEN {
            return Err(CursorError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| CursorError::Malformed)?;
        if bytes.len() < 1 + 4 + MAC_LEN {
            return Err(CursorError::Malformed);
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| CursorError::BadSignature)?;
        if body[0] != VERSION {
            return Err(CursorError::Malformed);
        }
        let fingerprint = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        let mut rest = &body[5..];
        let org = unzigzag(get_varint(&mut rest).ok_or(CursorError::Malformed)?);
        if org != org_id {
            return Err(CursorError::WrongOrg);
        }
        if fingerprint != self.topology.fingerprint {
            return Err(CursorError::OtherTopology);
        }
        let mut next = Vec::with_capacity(self.topology.slots());
        for _ in 0..self.topology.slots() {
            let v = get_varint(&mut rest).ok_or(CursorError::Malformed)?;
            next.push(v.checked_sub(1).and_then(|n| i64::try_from(n).ok()));
        }
        if !rest.is_empty() {
            return Err(CursorError::Malformed);
        }
        Ok(Cursor { org_id: org, next })
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn topology() -> Topology {
        Topology::new(vec![
            ("rules.alerts.triggered".into(), 6),
            ("gold.data.ready".into(), 12),
        ])
    }

    fn codec() -> CursorCodec {
        CursorCodec::new(b"secret", topology())
    }

    #[test]
    fn slots_follow_the_sorted_topics() {
        let t = topology();
        assert_eq!(t.slots(), 18);
        assert_eq!(t.slot("gold.data.ready", 0), Some(0));
        assert_eq!(t.slot("rules.alerts.triggered", 5), Some(17));
        assert_eq!(t.slot("rules.alerts.triggered", 6), None);
        assert_eq!(t.slot("other", 0), None);
        assert_eq!(t.at(12), Some(("rules.alerts.triggered", 0)));
        assert_eq!(t.at(18), None);
    }

    #[test]
    fn a_cursor_reads_back_for_its_org_only() {
        let codec = codec();
        let mut next = vec![None; 18];
        next[3] = Some(0);
        next[12] = Some(1_234_567_890_123);
        let cursor = Cursor { org_id: 42, next };
        let text = codec.encode(&cursor);
        assert_eq!(codec.decode(&text, 42), Ok(cursor));
        assert_eq!(codec.decode(&text, 43), Err(CursorError::WrongOrg));
        let other_key = CursorCodec::new(b"other", topology());
        assert_eq!(other_key.decode(&text, 42), Err(CursorError::BadSignature));
        let other_topics = CursorCodec::new(
            b"secret",
            Topology::new(vec![("rules.alerts.triggered".into(), 6)]),
        );
        assert_eq!(
            other_topics.decode(&text, 42),
            Err(CursorError::OtherTopology)
        );
    }

    #[test]
    fn a_cursor_changed_anywhere_is_refused() {
        let codec = codec();
        let text = codec.encode(&Cursor {
            org_id: 7,
            next: vec![Some(5); 18],
        });
        let bytes = URL_SAFE_NO_PAD.decode(&text).expect("base64");
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x01;
            let result = codec.decode(&URL_SAFE_NO_PAD.encode(&changed), 7);
            assert!(
                matches!(result, Err(CursorError::BadSignature)),
                "byte {i}: {result:?}"
            );
        }
        assert_eq!(codec.decode("", 7), Err(CursorError::Malformed));
        assert_eq!(codec.decode("not base64!", 7), Err(CursorError::Malformed));
        assert_eq!(
            codec.decode(&"A".repeat(MAX_TEXT_LEN + 1), 7),
            Err(CursorError::Malformed)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn any_text_is_refused_or_read_never_a_panic(text in ".{0,300}", org in any::<i64>()) {
            let _ = codec().decode(&text, org);
        }

        #[test]
        fn any_bytes_are_refused_or_read_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let result = codec().decode(&URL_SAFE_NO_PAD.encode(&bytes), 1);
            prop_assert!(result.is_err(), "unsigned bytes were taken as a cursor");
        }

        #[test]
        fn every_cursor_round_trips(org in any::<i64>(), next in proptest::collection::vec(proptest::option::of(0i64..i64::MAX - 1), 18)) {
            let cursor = Cursor { org_id: org, next };
            let codec = codec();
            prop_assert_eq!(codec.decode(&codec.encode(&cursor), org), Ok(cursor));
        }
    }
}
