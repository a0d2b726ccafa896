//! Bounded per-partition memory of recently seen `event_id`s, so a redelivered batch does not
//! double the output. Ids are remembered once their records are handed to delivery, which
//! does not give up, so a retried batch is not mistaken for its own duplicate.

use std::collections::VecDeque;

/// Keys are hashed with foldhash, seeded per process: several times faster than the standard
/// SipHash on 128-bit keys, and still not predictable from outside.
type KeySet = foldhash::HashSet<u128>;

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

/// The last `capacity` event keys of one partition.
#[derive(Debug)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<u128>,
    seen: KeySet,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            seen: KeySet::default(),
        }
    }

    pub fn contains(&self, key: u128) -> bool {
        self.seen.contains(&key)
    }

    /// Remembers `key`, forgetting the oldest key when full.
    pub fn insert(&mut self, key: u128) {
        if !self.seen.insert(key) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
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
        self.order.capacity() * 16 + self.seen.capacity() * (16 + 1)
    }
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
                window.insert(*k);
            }
            prop_assert!(window.len() <= cap);
            prop_assert_eq!(window.len(), window.seen.len());
            // The most recently inserted key is always remembered.
            if let Some(last) = keys.last() {
                prop_assert!(window.contains(*last));
            }
        }
    }
}
