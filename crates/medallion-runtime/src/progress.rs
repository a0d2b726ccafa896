//! What a worker did beyond its committed offset, recorded compactly in the commit metadata.
//!
//! A worker that schedules orgs fairly ([`crate::worker`]) completes a partition's records out
//! of log order: the committed offset is the lowest record not done, and much beyond it may be
//! done (every other org's records while one org's backlog waits). A [`Progress`] says which:
//! every record below `base` is done; in `[base, through)` every record is done except, for each
//! org in `open`, its records from that org's offset on. A restart passes over what it says is
//! done instead of doing it again.
//!
//! Encoded as `done=<base>.<through>.<org>:<from>,….<crc>` (orgs in unpadded URL-safe base64),
//! within [`MAX_ENCODED`] bytes: when the orgs do not fit, `through` is lowered to the first org
//! left out, which only claims less. The checksum covers the topic and partition too, so an
//! entry copied from elsewhere or damaged fails [`Progress::decode`], and the record is checked
//! against the log ([`Progress::fits`]): a failed check means the records are read again (and
//! dedup drops what was done), never that any is passed over.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The most bytes an encoded progress takes (Kafka's `offset.metadata.max.bytes` is 4096 by
/// default, and the snapshot of the outputs and the stage's metadata share it).
pub const MAX_ENCODED: usize = 2_048;

/// Which records of one partition, beyond its committed offset, are done.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Progress {
    pub base: i64,
    pub through: i64,
    /// Per org, the first offset in `[base, through)` not done; its later records are not
    /// done either.
    pub open: HashMap<Vec<u8>, i64>,
}

impl Progress {
    /// From a partition's lowest record not done (`base`), how far the claim reaches
    /// (`through`) and per org its first record not done (`open`, any order): orgs whose first
    /// open record is at or past `through` are left out; the encoded size is then bounded by
    /// lowering `through`.
    pub fn new(base: i64, through: i64, open: impl IntoIterator<Item = (Vec<u8>, i64)>) -> Self {
        let mut open: Vec<(Vec<u8>, i64)> = open
            .into_iter()
            .filter(|(_, from)| *from < through)
            .collect();
        open.sort_unstable_by_key(|(_, from)| *from);
        let mut through = through.max(base);
        let mut size = 64;
        let mut kept = HashMap::with_capacity(open.len());
        for (org, from) in open {
            size += org.len().div_ceil(3) * 4 + 22;
            if size > MAX_ENCODED {
                through = from;
                break;
            }
            kept.insert(org, from.max(base));
        }
        kept.retain(|_, from| *from < through);
        Self {
            base,
            through,
            open: kept,
        }
    }

    /// What both say was done (each a fact): a record is done if either says so. Its base is
    /// this one's.
    pub fn union(&self, other: &Progress) -> Progress {
        let first_open = |p: &Progress, org: &[u8]| p.open.get(org).copied().unwrap_or(p.through);
        let orgs: std::collections::HashSet<&Vec<u8>> =
            self.open.keys().chain(other.open.keys()).collect();
        let open: Vec<(Vec<u8>, i64)> = orgs
            .into_iter()
            .map(|org| {
                (
                    org.clone(),
                    first_open(self, org).max(first_open(other, org)),
                )
            })
            .collect();
        Progress::new(self.base, self.through.max(other.through), open)
    }

    /// Says more than the committed offset alone.
    pub fn claims_anything(&self) -> bool {
        self.through > self.base
    }

    /// Whether the record of `org` at `offset` is done.
    pub fn is_done(&self, org: &[u8], offset: i64) -> bool {
        if offset < self.base {
            return true;
        }
        if offset >= self.through {
            return false;
        }
        self.open.get(org).is_none_or(|from| offset < *from)
    }

    fn checksum(&self, topic: &str, partition: i32, body: &str) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(topic.as_bytes());
        h.update(&partition.to_be_bytes());
        h.update(body.as_bytes());
        h.finalize()
    }

    /// The encoded form, for `partition` of `topic`.
    pub fn encode(&self, topic: &str, partition: i32) -> String {
        let mut open: Vec<(&Vec<u8>, &i64)> = self.open.iter().collect();
        open.sort_unstable();
        let orgs: Vec<String> = open
            .into_iter()
            .map(|(org, from)| format!("{}:{from}", URL_SAFE_NO_PAD.encode(org)))
            .collect();
        let body = format!("{}.{}.{}", self.base, self.through, orgs.join(","));
        let crc = self.checksum(topic, partition, &body);
        format!("{body}.{crc:08x}")
    }

    /// Decodes what [`Self::encode`] wrote for `partition` of `topic`; `None` for anything
    /// damaged, inconsistent or written for another partition.
    pub fn decode(text: &str, topic: &str, partition: i32) -> Option<Self> {
        let (body, crc) = text.rsplit_once('.')?;
        let crc = u32::from_str_radix(crc, 16).ok()?;
        let mut parts = body.splitn(3, '.');
        let base: i64 = parts.next()?.parse().ok()?;
        let through: i64 = parts.next()?.parse().ok()?;
        let orgs = parts.next()?;
        let mut open = HashMap::new();
        for pair in orgs.split(',').filter(|s| !s.is_empty()) {
            let (org, from) = pair.split_once(':')?;
            let from: i64 = from.parse().ok()?;
            if from < base || from >= through {
                return None;
            }
            open.insert(URL_SAFE_NO_PAD.decode(org).ok()?, from);
        }
        if base < 0 || through < base {
            return None;
        }
        let progress = Self {
            base,
            through,
            open,
        };
        (progress.checksum(topic, partition, body) == crc).then_some(progress)
    }

    /// Checked against the log: a claim reaching past the partition's end (`high`, the next
    /// offset to be written) belongs to another incarnation of the topic.
    pub fn fits(&self, high: i64) -> bool {
        self.through <= high
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn a_progress_says_what_is_done_and_round_trips() {
        let p = Progress::new(10, 100, [(org("a"), 10), (org("b"), 50), (org("c"), 100)]);
        assert_eq!(
            p.open.len(),
            2,
            "an org open only past `through` adds nothing"
        );
        assert!(p.is_done(b"a", 9));
        assert!(!p.is_done(b"a", 10));
        assert!(p.is_done(b"b", 49));
        assert!(!p.is_done(b"b", 50));
        assert!(p.is_done(b"c", 99));
        assert!(p.is_done(b"z", 60));
        assert!(!p.is_done(b"z", 100), "past `through` nothing is claimed");
        let text = p.encode("t", 3);
        assert_eq!(Progress::decode(&text, "t", 3), Some(p));
    }

    proptest::proptest! {
        /// The union claims a record done exactly where one of the two does (from the first's
        /// base on: below it the first claims everything).
        #[test]
        fn a_union_claims_what_either_claims(
            base in 0i64..20,
            a_len in 0i64..40,
            b_base in 0i64..20,
            b_len in 0i64..40,
            a_open in proptest::collection::vec((0u8..4, 0i64..70), 0..4),
            b_open in proptest::collection::vec((0u8..4, 0i64..70), 0..4),
        ) {
            let name = |o: u8| vec![b'a' + o];
            let a = Progress::new(base, base + a_len, a_open.iter().map(|(o, f)| (name(*o), *f)));
            let b = Progress::new(b_base, b_base + b_len, b_open.iter().map(|(o, f)| (name(*o), *f)));
            let u = a.union(&b);
            for o in 0..5u8 {
                for offset in base..80 {
                    let org = name(o);
                    proptest::prop_assert_eq!(
                        u.is_done(&org, offset),
                        a.is_done(&org, offset) || b.is_done(&org, offset),
                        "org {} offset {}", o, offset
                    );
                }
            }
        }
    }

    #[test]
    fn a_damaged_or_foreign_entry_is_refused() {
        let p = Progress::new(5, 9, [(org("a"), 6)]);
        let text = p.encode("t", 1);
        assert_eq!(Progress::decode(&text, "t", 2), None, "another partition");
        assert_eq!(Progress::decode(&text, "u", 1), None, "another topic");
        let damaged = text.replacen("9", "19", 1);
        assert_eq!(Progress::decode(&damaged, "t", 1), None);
        assert_eq!(Progress::decode("", "t", 1), None);
        assert_eq!(Progress::decode("1.2.3", "t", 1), None);
        assert!(
            p.fits(9) && !p.fits(8),
            "a claim past the log's end is foreign"
        );
    }

    #[test]
    fn too_many_orgs_lower_the_claim_instead_of_growing_the_entry() {
        let open: Vec<(Vec<u8>, i64)> = (0..1_000)
            .map(|i| (format!("org-{i:036}").into_bytes(), 1_000 + i))
            .collect();
        let p = Progress::new(1_000, 100_000, open);
        let text = p.encode("t", 0);
        assert!(text.len() <= MAX_ENCODED, "{}", text.len());
        assert!(p.through < 2_000 && !p.open.is_empty());
        // Whatever was left out is not claimed done.
        for i in 0..1_000 {
            let org = format!("org-{i:036}").into_bytes();
            assert!(!p.is_done(&org, 1_000 + i), "org {i}");
        }
        assert_eq!(Progress::decode(&text, "t", 0), Some(p));
    }

    proptest::proptest! {
        /// Whatever the orgs and offsets, a progress never claims a record done that was not:
        /// below each org's first open record or below base, and only within `through`.
        #[test]
        fn a_progress_claims_no_open_record(
            base in 0i64..50,
            span in 0i64..200,
            firsts in proptest::collection::vec((0u8..40, 0i64..300), 0..60),
            probes in proptest::collection::vec((0u8..40, 0i64..300), 1..100),
        ) {
            let mut open: HashMap<Vec<u8>, i64> = HashMap::new();
            for (o, f) in firsts {
                let f = base + f;
                let e = open.entry(vec![o; 40]).or_insert(f);
                *e = (*e).min(f);
            }
            let p = Progress::new(base, base + span, open.clone());
            proptest::prop_assert!(p.encode("t", 0).len() <= MAX_ENCODED);
            let back = Progress::decode(&p.encode("t", 0), "t", 0);
            proptest::prop_assert_eq!(back.as_ref(), Some(&p));
            for (o, offset) in probes {
                let org = vec![o; 40];
                let truly_done = offset < base
                    || (offset < base + span && open.get(&org).is_none_or(|f| offset < *f));
                if p.is_done(&org, offset) {
                    proptest::prop_assert!(truly_done, "org {} offset {}", o, offset);
                }
            }
        }
    }
}
