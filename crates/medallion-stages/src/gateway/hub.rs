//! The fan-out: the replica's one consumer hands every decoded record to the connections of
//! its org, each through a bounded outbox with its event type's delivery policy.
//!
//! - `Reliable` (alerts): never dropped. An outbox that is full closes its connection with
//!   `slow_consumer`; the client resumes from the last id it saw and reads the rest back from
//!   Kafka.
//! - `Coalesce` (metrics, entity updates): a message replaces the queued one of the same key
//!   (metric and window, entity), keeping its place and the older offset for the cursor, so a
//!   resume reads the newer one again rather than skipping it. When the outbox is full of other
//!   keys the oldest coalescible message is dropped (counted).
//!
//! The dispatch position of every partition is published (after the record is in every outbox)
//! so a connection whose outbox holds nothing of a partition can move its cursor past it: a
//! resume then reads back only what came since.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// How an event type reaches a client that cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Reliable,
    Coalesce,
}

/// One decoded record, shared by every connection that gets it.
#[derive(Debug)]
pub struct Message {
    /// Index of its feed (event type) in the gateway's feeds.
    pub feed: usize,
    pub org_id: i64,
    /// Its partition's slot in the cursor topology.
    pub slot: usize,
    pub offset: i64,
    /// The Kafka timestamp (ms), for the end-to-end latency.
    pub timestamp_ms: i64,
    /// `Some` for a coalescing feed: what a newer message replaces.
    pub coalesce_key: Option<Box<str>>,
    /// The JSON object of the message without its id, from just after the opening brace.
    pub body: Box<str>,
}

/// Why an outbox closed its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    SlowConsumer,
}

struct Entry {
    message: Arc<Message>,
    /// The offset the cursor moves to once written: the first one of its key while coalesced.
    offset: i64,
    seq: u64,
}

/// What a connection has not written yet.
pub struct Outbox {
    queue: VecDeque<Entry>,
    next_seq: u64,
    keys: HashMap<(usize, Box<str>), u64>,
    /// Entries queued per slot.
    pending: Vec<u32>,
    closed: Option<Closed>,
}

/// What a push did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    Coalesced,
    /// The oldest coalescible message was dropped to make room.
    DroppedOldest,
    /// The connection is closed as too slow.
    Closed,
    /// Already closed: nothing done.
    Ignored,
}

impl Outbox {
    pub fn new(slots: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            next_seq: 0,
            keys: HashMap::new(),
            pending: vec![0; slots],
            closed: None,
        }
    }

    pub fn push(&mut self, message: Arc<Message>, policy: Policy, capacity: usize) -> Pushed {
        if self.closed.is_some() {
            return Pushed::Ignored;
        }
        let key = match (&message.coalesce_key, policy) {
            (Some(k), Policy::Coalesce) => Some((message.feed, k.clone())),
            _ => None,
        };
        if let Some(key) = &key {
            if let Some(seq) = self.keys.get(key) {
                let front = self.queue.front().map_or(0, |e| e.seq);
                if let Some(entry) = self.queue.get_mut((seq - front) as usize) {
                    entry.message = message;
                    return Pushed::Coalesced;
                }
            }
        }
        let mut outcome = Pushed::Queued;
        if self.queue.len() >= capacity {
            let oldest_coalescible = self
                .queue
                .iter()
                .position(|e| e.message.coalesce_key.is_some());
            match (key.is_some(), oldest_coalescible) {
                (true, Some(at)) => {
                    self.remove_at(at);
                    outcome = Pushed::DroppedOldest;
                }
                _ => {
                    self.closed = Some(Closed::SlowConsumer);
                    self.queue.clear();
                    self.keys.clear();
                    self.pending.iter_mut().for_each(|p| *p = 0);
                    return Pushed::Closed;
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(key) = key {
            self.keys.insert(key, seq);
        }
        if let Some(p) = self.pending.get_mut(message.slot) {
            *p += 1;
        }
        self.queue.push_back(Entry {
            offset: message.offset,
            message,
            seq,
        });
        outcome
    }

    /// Removes the entry at `at` (sequence numbers of the later ones stay as they are, so the
    /// key index is rebuilt from the queue).
    fn remove_at(&mut self, at: usize) {
        if let Some(entry) = self.queue.remove(at) {
            if let Some(p) = self.pending.get_mut(entry.message.slot) {
                *p = p.saturating_sub(1);
            }
        }
        // Renumber so that index = seq - front seq holds again.
        let base = self.queue.front().map_or(self.next_seq, |e| e.seq);
        self.keys.clear();
        for (i, entry) in self.queue.iter_mut().enumerate() {
            entry.seq = base + i as u64;
            if let Some(k) = &entry.message.coalesce_key {
                self.keys.insert((entry.message.feed, k.clone()), entry.seq);
            }
        }
        self.next_seq = base + self.queue.len() as u64;
    }

    /// The next message to write and the offset its cursor moves to.
    pub fn pop(&mut self) -> Option<(Arc<Message>, i64)> {
        let entry = self.queue.pop_front()?;
        if let Some(k) = &entry.message.coalesce_key {
            let key = (entry.message.feed, k.clone());
            if self.keys.get(&key) == Some(&entry.seq) {
                self.keys.remove(&key);
            }
        }
        if let Some(p) = self.pending.get_mut(entry.message.slot) {
            *p = p.saturating_sub(1);
        }
        Some((entry.message, entry.offset))
    }

    pub fn closed(&self) -> Option<Closed> {
        self.closed
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether anything of `slot` waits to be written.
    pub fn holds(&self, slot: usize) -> bool {
        self.pending.get(slot).is_some_and(|p| *p > 0)
    }
}

/// One client connection as the hub sees it.
pub struct Connection {
    pub id: u64,
    pub org_id: i64,
    /// Bit i: the client wants feed i.
    pub feeds: u64,
    pub outbox: Mutex<Outbox>,
    pub wake: Notify,
}

/// Counts of one dispatch, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    pub queued: u32,
    pub coalesced: u32,
    pub dropped: u32,
    pub closed: u32,
}

/// Every connection of this replica, by org, and the consumer's position per slot.
pub struct Hub {
    connections: Mutex<HashMap<i64, Vec<Arc<Connection>>>>,
    /// Next offset the consumer dispatches, per slot (-1: not known yet).
    positions: Vec<AtomicI64>,
    policies: Vec<Policy>,
    capacity: usize,
    next_id: AtomicU64,
}

impl Hub {
    pub fn new(slots: usize, policies: Vec<Policy>, capacity: usize) -> Self {
        Self {
            connections: Mutex::new(HashMap::new()),
            positions: (0..slots).map(|_| AtomicI64::new(-1)).collect(),
            policies,
            capacity: capacity.max(1),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn slots(&self) -> usize {
        self.positions.len()
    }

    /// Sets where the consumer starts in `slot`.
    pub fn start_at(&self, slot: usize, offset: i64) {
        if let Some(p) = self.positions.get(slot) {
            p.store(offset, Ordering::Release);
        }
    }

    /// The consumer's positions (None where not known yet).
    pub fn positions(&self) -> Vec<Option<i64>> {
        self.positions
            .iter()
            .map(|p| Some(p.load(Ordering::Acquire)).filter(|v| *v >= 0))
            .collect()
    }

    /// Registers a connection and returns it with the positions it starts from: every record
    /// dispatched from then on reaches its outbox.
    pub fn register(&self, org_id: i64, feeds: u64) -> (Arc<Connection>, Vec<Option<i64>>) {
        let connection = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            org_id,
            feeds,
            outbox: Mutex::new(Outbox::new(self.slots())),
            wake: Notify::new(),
        });
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        connections
            .entry(org_id)
            .or_default()
            .push(connection.clone());
        // Read under the lock dispatch holds while it fills outboxes: a record is either
        // before these positions or in the outbox.
        let positions = self.positions();
        drop(connections);
        (connection, positions)
    }

    pub fn unregister(&self, connection: &Connection) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = connections.get_mut(&connection.org_id) {
            list.retain(|c| c.id != connection.id);
            if list.is_empty() {
                connections.remove(&connection.org_id);
            }
        }
    }

    /// Connections open, per org.
    pub fn connection_counts(&self) -> Vec<(i64, usize)> {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        connections.iter().map(|(o, l)| (*o, l.len())).collect()
    }

    /// Hands `message` to the connections of its org that want it, then moves its slot on.
    pub fn dispatch(&self, message: Arc<Message>) -> Dispatched {
        let mut counts = Dispatched::default();
        let policy = self
            .policies
            .get(message.feed)
            .copied()
            .unwrap_or(Policy::Reliable);
        {
            let connections = self
                .connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for connection in connections.get(&message.org_id).into_iter().flatten() {
                if connection.feeds & (1 << message.feed) == 0 {
                    continue;
                }
                let pushed = connection
                    .outbox
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(message.clone(), policy, self.capacity);
                match pushed {
                    Pushed::Queued => counts.queued += 1,
                    Pushed::Coalesced => counts.coalesced += 1,
                    Pushed::DroppedOldest => {
                        counts.queued += 1;
                        counts.dropped += 1;
                    }
                    Pushed::Closed => counts.closed += 1,
                    Pushed::Ignored => continue,
                }
                connection.wake.notify_one();
            }
            self.advance(message.slot, message.offset);
        }
        counts
    }

    /// Moves `slot` past `offset` (a record no connection gets: another org's, undecodable).
    pub fn advance(&self, slot: usize, offset: i64) {
        if let Some(p) = self.positions.get(slot) {
            p.fetch_max(offset + 1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(feed: usize, slot: usize, offset: i64, key: Option<&str>) -> Arc<Message> {
        Arc::new(Message {
            feed,
            org_id: 1,
            slot,
            offset,
            timestamp_ms: 0,
            coalesce_key: key.map(Into::into),
            body: format!("\"offset\":{offset}}}").into(),
        })
    }

    #[test]
    fn a_full_outbox_closes_for_a_reliable_message_and_never_drops_one() {
        let mut outbox = Outbox::new(2);
        assert_eq!(
            outbox.push(message(0, 0, 1, None), Policy::Reliable, 2),
            Pushed::Queued
        );
        assert_eq!(
            outbox.push(message(0, 0, 2, None), Policy::Reliable, 2),
            Pushed::Queued
        );
        assert_eq!(
            outbox.push(message(0, 0, 3, None), Policy::Reliable, 2),
            Pushed::Closed
        );
        assert_eq!(outbox.closed(), Some(Closed::SlowConsumer));
        assert!(outbox.is_empty(), "a closed outbox frees what it held");
        assert_eq!(
            outbox.push(message(0, 0, 4, None), Policy::Reliable, 2),
            Pushed::Ignored
        );
    }

    #[test]
    fn a_coalesced_message_replaces_its_key_in_place_and_keeps_the_first_offset() {
        let mut outbox = Outbox::new(2);
        outbox.push(message(1, 1, 10, Some("cpu|0")), Policy::Coalesce, 8);
        outbox.push(message(0, 0, 5, None), Policy::Reliable, 8);
        assert_eq!(
            outbox.push(message(1, 1, 11, Some("cpu|0")), Policy::Coalesce, 8),
            Pushed::Coalesced
        );
        outbox.push(message(1, 1, 12, Some("mem|0")), Policy::Coalesce, 8);
        assert_eq!(outbox.len(), 3);
        let (first, cursor_offset) = outbox.pop().expect("first");
        assert_eq!(
            (first.offset, cursor_offset),
            (11, 10),
            "newest value, oldest offset"
        );
        assert!(outbox.holds(1) && outbox.holds(0));
        assert_eq!(outbox.pop().map(|(m, _)| m.offset), Some(5));
        assert!(!outbox.holds(0));
        // The key is free again once written: a new value queues anew.
        assert_eq!(
            outbox.push(message(1, 1, 13, Some("cpu|0")), Policy::Coalesce, 8),
            Pushed::Queued
        );
        assert_eq!(outbox.pop().map(|(m, _)| m.offset), Some(12));
        assert_eq!(outbox.pop().map(|(m, _)| m.offset), Some(13));
        assert!(outbox.pop().is_none());
    }

    #[test]
    fn a_full_outbox_drops_its_oldest_coalescible_message_for_a_new_key() {
        let mut outbox = Outbox::new(2);
        outbox.push(message(0, 0, 1, None), Policy::Reliable, 3);
        outbox.push(message(1, 1, 2, Some("a")), Policy::Coalesce, 3);
        outbox.push(message(1, 1, 3, Some("b")), Policy::Coalesce, 3);
        assert_eq!(
            outbox.push(message(1, 1, 4, Some("c")), Policy::Coalesce, 3),
            Pushed::DroppedOldest
        );
        // "b" still coalesces after the renumbering.
        assert_eq!(
            outbox.push(message(1, 1, 5, Some("b")), Policy::Coalesce, 3),
            Pushed::Coalesced
        );
        let order: Vec<i64> = std::iter::from_fn(|| outbox.pop().map(|(m, _)| m.offset)).collect();
        assert_eq!(order, [1, 5, 4]);
    }

    #[test]
    fn dispatch_reaches_only_the_org_and_feeds_asked_for_and_moves_the_slot() {
        let hub = Hub::new(2, vec![Policy::Reliable, Policy::Coalesce], 4);
        hub.start_at(0, 100);
        let (mine, from) = hub.register(1, 0b01);
        let (other_feed, _) = hub.register(1, 0b10);
        let (other_org, _) = hub.register(2, 0b11);
        assert_eq!(from, vec![Some(100), None]);
        let counts = hub.dispatch(message(0, 0, 100, None));
        assert_eq!(counts.queued, 1);
        assert_eq!(hub.positions()[0], Some(101));
        assert_eq!(mine.outbox.lock().expect("lock").len(), 1);
        assert!(other_feed.outbox.lock().expect("lock").is_empty());
        assert!(other_org.outbox.lock().expect("lock").is_empty());
        hub.unregister(&mine);
        hub.dispatch(message(0, 0, 101, None));
        assert_eq!(
            mine.outbox.lock().expect("lock").len(),
            1,
            "gone: nothing more"
        );
        hub.advance(1, 7);
        assert_eq!(hub.positions()[1], Some(8));
    }
}
