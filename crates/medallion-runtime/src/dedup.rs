//! Bounded per-partition memory of recently seen `event_id`s, so a redelivered batch does not
//! double the output. Ids are remembered once their records are handed to delivery, which
//! does not give up, so a retried batch is not mistaken for its own duplicate.
//!
//! A window is rebuilt, when its partition is assigned, from the input records before the
//! committed offset. With a state directory, [`WindowFiles`] keeps a copy of each window on
//! disk (what was taken below an offset that was stored for commit), so a restart on the
//! same disk reads only the records between that copy and the committed offset.

use std::collections::VecDeque;
use std::path::PathBuf;

/// Keys are hashed with foldhash, seeded per process: several times faster than the standard
/// SipHash on 128-bit keys, and still not predictable from outside.
type Hasher = foldhash::fast::RandomState;

/// 128-bit key of an event id: the UUID itself, or a hash of a non-UUID id.
pub fn event_key(event_id: &str) -> u128 {
    let trimmed = event_id.trim();
    match uuid::Uuid::try_parse(trimmed) {
        Ok(uuid) => uuid.as_u128(),
        Err(_) => {
            use std::hash::{Hash, Hasher};
            let mut a = std::collections::hash_map::DefaultHasher::new();
            trimmed.to_ascii_lowercase().hash(&mut a);
            let mut b = std::collections::hash_map::DefaultHasher::new();
            (trimmed.len(), trimmed.to_ascii_lowercase()).hash(&mut b);
            (u128::from(a.finish()) << 64) | u128::from(b.finish())
        }
    }
}

/// One remembered record: its event key and its input offset (24 bytes, not the 32 of a
/// `(u128, i64)` tuple).
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: [u64; 2],
    offset: i64,
}

impl Entry {
    fn new(key: u128, offset: i64) -> Self {
        Self {
            key: [(key >> 64) as u64, key as u64],
            offset,
        }
    }

    fn key(&self) -> u128 {
        (u128::from(self.key[0]) << 64) | u128::from(self.key[1])
    }
}

/// The last `capacity` event keys of one partition, each with the offset of its record.
///
/// The entries are a ring in insertion order; the index over them holds 32-bit sequence
/// numbers, not the keys: ~30 bytes per event id in all (24 in the ring, 4 and a control
/// byte per slot of the index), against ~40 for a ring of bare keys beside a set of them.
#[derive(Debug)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<Entry>,
    /// The sequence number of `order`'s front (each insert takes the next one).
    front: u64,
    /// The sequence numbers of the entries (modulo 2^32: a window holds fewer), by key.
    index: hashbrown::HashTable<u32>,
    hasher: Hasher,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.clamp(1, u32::MAX as usize / 2),
            order: VecDeque::new(),
            front: 0,
            index: hashbrown::HashTable::new(),
            hasher: Hasher::default(),
        }
    }

    fn hash(hasher: &Hasher, key: u128) -> u64 {
        use std::hash::BuildHasher;
        hasher.hash_one(key)
    }

    /// The entry of sequence number `seq` (modulo 2^32), in `order` beginning at `front`.
    fn entry(order: &VecDeque<Entry>, front: u64, seq: u32) -> Option<&Entry> {
        order.get(seq.wrapping_sub(front as u32) as usize)
    }

    pub fn contains(&self, key: u128) -> bool {
        let (order, front) = (&self.order, self.front);
        self.index
            .find(Self::hash(&self.hasher, key), |&s| {
                Self::entry(order, front, s).is_some_and(|e| e.key() == key)
            })
            .is_some()
    }

    /// Remembers `key`, the event key of the record at `offset`, forgetting the oldest key
    /// when full.
    pub fn insert(&mut self, key: u128, offset: i64) {
        if self.contains(key) {
            return;
        }
        if self.order.len() == self.order.capacity() {
            // Grow by doubling, but never past the capacity.
            let room = (self.capacity + 1).saturating_sub(self.order.len());
            self.order
                .reserve_exact(self.order.len().clamp(16, room.max(16)));
        }
        let seq = (self.front + self.order.len() as u64) as u32;
        self.order.push_back(Entry::new(key, offset));
        let (order, front, hasher) = (&self.order, self.front, &self.hasher);
        self.index
            .insert_unique(Self::hash(hasher, key), seq, |&s| {
                Self::entry(order, front, s).map_or(0, |e| Self::hash(hasher, e.key()))
            });
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                let old_seq = self.front as u32;
                if let Ok(found) = self
                    .index
                    .find_entry(Self::hash(&self.hasher, old.key()), |&s| s == old_seq)
                {
                    found.remove();
                }
                self.front += 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Heap bytes held, approximately (for the memory gauge).
    pub fn approx_bytes(&self) -> usize {
        self.order.capacity() * std::mem::size_of::<Entry>() + self.index.capacity() * (4 + 1)
    }

    /// (offset, key) of the remembered records below `upto`, oldest first: what a copy of the
    /// window may hold once `upto` is stored for commit (records at or above it may be read
    /// again after a crash, and must not be taken for their own duplicates then).
    pub fn below(&self, upto: i64) -> impl Iterator<Item = (i64, u128)> + '_ {
        self.order
            .iter()
            .filter(move |e| e.offset < upto)
            .map(|e| (e.offset, e.key()))
    }
}

/// A window read back from disk for a committed offset. Its entries stay in the file's
/// encoding (24 bytes each) until they are put back into a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedWindow {
    /// The copy holds what was taken below this offset (at most the committed one): the
    /// records from here to the committed offset are read from the input.
    pub upto: i64,
    /// The commit metadata stored with the copy's offset, when that offset is the committed
    /// one: what a broker that drops commit metadata did not keep.
    pub metadata: Option<String>,
    /// The encoded entries of the file.
    body: Vec<u8>,
}

impl SavedWindow {
    /// (offset, key) of the records it holds, oldest first, all below `upto`.
    pub fn entries(&self) -> impl Iterator<Item = (i64, u128)> + '_ {
        let upto = self.upto;
        self.body
            .chunks_exact(ENTRY_BYTES)
            .map(|e| {
                let (offset, key) = e.split_at(8);
                (
                    i64::from_le_bytes(offset.try_into().unwrap_or_default()),
                    u128::from_le_bytes(key.try_into().unwrap_or_default()),
                )
            })
            .filter(move |(o, _)| *o < upto)
    }
}

/// Copies of the dedup windows of one consumer group's input on local disk: a file per
/// partition, `<dir>/partition-<n>`, written whole or not at all. A file names the group and
/// topic it belongs to and ends in a CRC-32 of its content: a foreign, damaged or truncated
/// file reads as absent, and the window is rebuilt from the input as without a copy.
///
/// Layout (little-endian): `MDLNWIN1`, identity length (u32) and bytes, partition (i32),
/// `upto` (i64), the commit metadata stored with `upto` (length as u32, `u32::MAX` for none,
/// and bytes), entry count (u64), each entry's offset (i64) and key (u128), CRC-32 (u32).
#[derive(Debug, Clone)]
pub struct WindowFiles {
    dir: PathBuf,
    identity: String,
}

const WINDOW_MAGIC: &[u8; 8] = b"MDLNWIN1";
const ENTRY_BYTES: usize = 24;

impl WindowFiles {
    /// Files under `dir` for `identity` (the consumer group and its input topic).
    pub fn new(dir: impl Into<PathBuf>, identity: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            identity: identity.into(),
        }
    }

    fn path(&self, partition: i32) -> PathBuf {
        self.dir.join(format!("partition-{partition}"))
    }

    /// The file of the window of `partition`: `entries`, (offset, key) oldest first, all below
    /// `upto`, an offset stored for commit with `metadata`.
    pub fn encode(
        &self,
        partition: i32,
        upto: i64,
        metadata: Option<&str>,
        entries: impl Iterator<Item = (i64, u128)>,
    ) -> Vec<u8> {
        let most = entries.size_hint().1.unwrap_or(0);
        let mut bytes = Vec::with_capacity(
            40 + self.identity.len() + metadata.map_or(0, str::len) + most * ENTRY_BYTES,
        );
        bytes.extend_from_slice(WINDOW_MAGIC);
        bytes.extend_from_slice(&(self.identity.len() as u32).to_le_bytes());
        bytes.extend_from_slice(self.identity.as_bytes());
        bytes.extend_from_slice(&partition.to_le_bytes());
        bytes.extend_from_slice(&upto.to_le_bytes());
        match metadata {
            Some(m) => {
                bytes.extend_from_slice(&(m.len() as u32).to_le_bytes());
                bytes.extend_from_slice(m.as_bytes());
            }
            None => bytes.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
        let count_at = bytes.len();
        bytes.extend_from_slice(&0u64.to_le_bytes());
        let mut count = 0u64;
        for (offset, key) in entries {
            bytes.extend_from_slice(&offset.to_le_bytes());
            bytes.extend_from_slice(&key.to_le_bytes());
            count += 1;
        }
        bytes[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// Writes the file of `partition`, [`Self::encode`]d, in place of the one there.
    pub fn write_encoded(
        &self,
        partition: i32,
        bytes: &[u8],
    ) -> Result<(), crate::store::StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| crate::store::StoreError::Io {
            path: self.dir.display().to_string(),
            source,
        })?;
        crate::store::write_atomically(&self.path(partition), bytes)
    }

    /// Writes the window of `partition` (see [`Self::encode`]).
    #[cfg(test)]
    pub fn write(
        &self,
        partition: i32,
        upto: i64,
        metadata: Option<&str>,
        entries: &[(i64, u128)],
    ) -> Result<(), crate::store::StoreError> {
        let bytes = self.encode(partition, upto, metadata, entries.iter().copied());
        self.write_encoded(partition, &bytes)
    }

    /// The window of `partition` as far as it can serve a partition committed at
    /// `committed`: the entries below it, and the offset from which the input must be read.
    /// `None` when there is no usable copy (absent, foreign, damaged).
    pub fn read(&self, partition: i32, committed: i64) -> Option<SavedWindow> {
        let bytes = std::fs::read(self.path(partition)).ok()?;
        let parsed = parse_window(&bytes, &self.identity, partition);
        if parsed.is_none() {
            tracing::warn!(partition, dir = %self.dir.display(),
                "dedup window copy foreign or damaged; the window is rebuilt from the input");
        }
        let (upto, metadata, body) = parsed?;
        Some(SavedWindow {
            upto: upto.min(committed),
            metadata: metadata.filter(|_| upto == committed),
            body,
        })
    }
}

/// What a window file holds: its offset, the commit metadata stored with it, its entries
/// (encoded).
type Parsed = (i64, Option<String>, Vec<u8>);

/// The content of a window file of `identity` and `partition`.
fn parse_window(bytes: &[u8], identity: &str, partition: i32) -> Option<Parsed> {
    let (content, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(content).to_le_bytes() != crc {
        return None;
    }
    let mut rest = content.strip_prefix(WINDOW_MAGIC)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let id_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if take(id_len)? != identity.as_bytes() {
        return None;
    }
    if i32::from_le_bytes(take(4)?.try_into().ok()?) != partition {
        return None;
    }
    let upto = i64::from_le_bytes(take(8)?.try_into().ok()?);
    let metadata = match u32::from_le_bytes(take(4)?.try_into().ok()?) {
        u32::MAX => None,
        n => Some(String::from_utf8(take(n as usize)?.to_vec()).ok()?),
    };
    let count = usize::try_from(u64::from_le_bytes(take(8)?.try_into().ok()?)).ok()?;
    let body = take(count.checked_mul(ENTRY_BYTES)?)?.to_vec();
    if !rest.is_empty() {
        return None;
    }
    Some((upto, metadata, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uuid_keys_ignore_case_and_whitespace() {
        let a = event_key("550e8400-e29b-41d4-a716-446655440000");
        let b = event_key(" 550E8400-E29B-41D4-A716-446655440000 ");
        assert_eq!(a, b);
        assert_ne!(event_key("not-a-uuid"), event_key("not-a-uuid2"));
    }

    proptest! {
        #[test]
        fn window_is_bounded_and_remembers_the_latest(keys in prop::collection::vec(0u128..500, 0..2_000), cap in 1usize..300) {
            let mut window = DedupWindow::new(cap);
            for k in &keys {
                window.insert(*k, 0);
            }
            prop_assert!(window.len() <= cap);
            prop_assert_eq!(window.len(), window.index.len());
            // The most recently inserted key is always remembered.
            if let Some(last) = keys.last() {
                prop_assert!(window.contains(*last));
            }
        }

        /// The window against the plainest model of it: a list of the last `cap` distinct keys
        /// in the order they were first inserted.
        #[test]
        fn window_remembers_exactly_what_a_list_of_the_last_keys_does(
            keys in prop::collection::vec(0u128..64, 0..600),
            cap in 1usize..40,
        ) {
            let mut window = DedupWindow::new(cap);
            let mut model: VecDeque<(i64, u128)> = VecDeque::new();
            for (offset, k) in keys.iter().enumerate() {
                let offset = offset as i64;
                window.insert(*k, offset);
                if !model.iter().any(|(_, m)| m == k) {
                    model.push_back((offset, *k));
                    if model.len() > cap {
                        model.pop_front();
                    }
                }
                for probe in 0u128..64 {
                    prop_assert_eq!(
                        window.contains(probe),
                        model.iter().any(|(_, m)| *m == probe)
                    );
                }
            }
            let half = keys.len() as i64 / 2;
            let expected: Vec<(i64, u128)> = model.iter().copied().filter(|(o, _)| *o < half).collect();
            prop_assert_eq!(window.below(half).collect::<Vec<_>>(), expected);
            prop_assert!(window.order.capacity() <= (cap + 1).max(16) * 2);
        }
    }

    fn files() -> (tempfile::TempDir, WindowFiles) {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = WindowFiles::new(dir.path().join("windows"), "silver-processor bronze.events");
        (dir, files)
    }

    #[test]
    fn a_window_copy_holds_only_what_was_taken_below_its_offset() {
        let mut window = DedupWindow::new(10);
        // Taken out of log order, as the fair scheduler does.
        for (offset, key) in [(3, 30), (1, 10), (7, 70), (2, 20), (9, 90)] {
            window.insert(key, offset);
        }
        assert_eq!(
            window.below(7).collect::<Vec<_>>(),
            [(3, 30), (1, 10), (2, 20)]
        );
        assert_eq!(window.below(0).count(), 0);
    }

    #[test]
    fn a_window_file_is_read_back_for_a_commit_at_or_after_it() {
        let (_dir, files) = files();
        let entries = [(3, 30u128 << 70), (1, 10), (5, u128::MAX)];
        files
            .write(4, 6, Some("v1|out=0:5"), &entries)
            .expect("write");
        let read = |committed| {
            files
                .read(4, committed)
                .map(|w| (w.upto, w.entries().collect::<Vec<_>>(), w.metadata))
        };
        assert_eq!(
            read(6),
            Some((6, entries.to_vec(), Some("v1|out=0:5".into())))
        );
        // Committed further on (by another owner since): the records from the copy's offset
        // to the commit are read from the input, and the copy's commit metadata is not the
        // commit's.
        assert_eq!(read(9), Some((6, entries.to_vec(), None)));
        // Committed below the copy's offset (the process stopped between storing an offset
        // and its commit): the records from the commit on are read again, so the copy gives
        // only what lies below the commit, and the input is read from there.
        assert_eq!(read(3), Some((3, vec![(1, 10)], None)));
        assert_eq!(files.read(5, 9), None, "no file for another partition");
    }

    #[test]
    fn a_foreign_damaged_or_truncated_window_file_reads_as_absent() {
        let (_dir, files) = files();
        files
            .write(0, 100, None, &[(1, 1), (2, 2), (3, 3)])
            .expect("write");
        let path = files.path(0);
        let good = std::fs::read(&path).expect("read");
        let other = WindowFiles::new(files.dir.clone(), "gold-aggregator silver.entities");
        assert_eq!(other.read(0, 100), None, "another group's copy");
        // A file copied under another partition's name.
        std::fs::write(files.path(1), &good).expect("copy");
        assert_eq!(files.read(1, 100), None);
        for cut in [0, 1, 8, 20, good.len() - 5, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).expect("truncate");
            assert_eq!(files.read(0, 100), None, "truncated to {cut} bytes");
        }
        for flip in [0, 10, 40, good.len() - 30, good.len() - 2] {
            let mut bad = good.clone();
            bad[flip] ^= 0x20;
            std::fs::write(&path, &bad).expect("damage");
            assert_eq!(files.read(0, 100), None, "byte {flip} changed");
        }
    }

    proptest! {
        #[test]
        fn a_window_file_round_trips(
            entries in prop::collection::vec((0i64..1_000, any::<u128>()), 0..300),
            upto in 0i64..1_200,
            committed in 0i64..1_200,
            metadata in proptest::option::of(".{0,40}"),
        ) {
            let (_dir, files) = files();
            files.write(2, upto, metadata.as_deref(), &entries).expect("write");
            let read = files.read(2, committed).expect("read");
            prop_assert_eq!(read.upto, upto.min(committed));
            prop_assert_eq!(read.metadata.clone(), metadata.filter(|_| upto == committed));
            let expected: Vec<(i64, u128)> =
                entries.iter().copied().filter(|(o, _)| *o < upto.min(committed)).collect();
            prop_assert_eq!(read.entries().collect::<Vec<_>>(), expected);
        }
    }
}
