//! The progress topic: each commit's metadata, kept where a broker that drops commit metadata
//! (tansu) still keeps it.
//!
//! A commit's metadata says where the outputs stood ([`crate::recovery::Snapshot`]: a restart
//! rebuilds its dedup window from what came after) and which records beyond the offset were
//! done ([`crate::progress::Progress`]: a restart passes over them). A broker that keeps the
//! offset but not the metadata makes a restart read again everything past the offset, and
//! fair scheduling, which runs ahead of the offset, then has to stay within the dedup window.
//!
//! Each offset is written here, with its metadata, *before* it is stored for commit
//! ([`ProgressLog::offer`]; only what the broker acknowledged is stored, [`ProgressLog::acked`]),
//! so every committed offset has its entry. At assignment ([`lookup`]) the entry whose offset
//! is the committed one is taken; an entry of another offset (one written but never committed,
//! or one from before an offset reset) says nothing about the commit and is not used.
//!
//! Records: key the input partition (decimal), value `<offset> <metadata>`, to the progress
//! topic's partition of the same number; the topic is compacted, and read from its tail.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::message::Message;

use crate::kafka::io::{partition_ids, reader, watermarks, ReadError, Stretch, StretchReader};
use crate::kafka::{KafkaConnection, MarkedSender, ReaderContext};

/// Records read back from a partition's end first: entries are written about once per landed
/// batch and committed within a second, so the committed one is near the end.
const TAIL: i64 = 2_000;

/// The value of an entry.
fn encode(offset: i64, metadata: &str) -> String {
    format!("{offset} {metadata}")
}

/// An entry's offset and metadata; `None` if it is not one.
fn decode(value: &[u8]) -> Option<(i64, &str)> {
    let text = std::str::from_utf8(value).ok()?;
    let (offset, metadata) = text.split_once(' ')?;
    let offset: i64 = offset.parse().ok()?;
    (offset >= 0).then_some((offset, metadata))
}

/// One entry, as sent or acknowledged.
type Entry = (i64, String);

/// At most one entry of a partition is out at a time, and one is sent at most this often: a
/// worker lands many batches a second, and its commit timer takes one position a second.
const EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct LogState {
    next_mark: u32,
    /// Entries out, by mark.
    sent: HashMap<u32, (i32, Entry)>,
    /// The newest entry offered per partition (out, waiting or written).
    offered: HashMap<i32, Entry>,
    /// Entries offered while one of their partition was out or sent too recently: sent later.
    waiting: BTreeMap<i32, Entry>,
    /// When each partition's last entry was sent.
    last_sent: HashMap<i32, Instant>,
    /// The newest acknowledged entry per partition, with its mark (marks rise with sends).
    acked: HashMap<i32, (u32, Entry)>,
}

/// Writes a worker's commit positions to its group's progress topic.
pub(super) struct ProgressLog {
    topic: String,
    sender: MarkedSender,
    state: Mutex<LogState>,
}

impl ProgressLog {
    pub(super) fn new(topic: String, sender: MarkedSender) -> Self {
        Self {
            topic,
            sender,
            state: Mutex::default(),
        }
    }

    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes `offset` with `metadata` for `partition`, unless that entry was offered last:
    /// now, or once the partition's entry out is written ([`EVERY`] at most). Not waited for:
    /// [`Self::acked`] says when it is written.
    pub(super) fn offer(&self, partition: i32, offset: i64, metadata: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state
            .offered
            .get(&partition)
            .is_some_and(|(o, m)| *o == offset && m == metadata)
        {
            return;
        }
        let entry = (offset, metadata.to_string());
        state.offered.insert(partition, entry.clone());
        state.waiting.insert(partition, entry);
        self.collect(&mut state);
        self.send_waiting(&mut state, false);
    }

    /// Sends the waiting entries whose partition has none out and (unless `now`) sent none
    /// for [`EVERY`].
    fn send_waiting(&self, state: &mut LogState, now: bool) {
        let busy: Vec<i32> = state.sent.values().map(|(p, _)| *p).collect();
        let due: Vec<i32> = state
            .waiting
            .keys()
            .copied()
            .filter(|p| !busy.contains(p))
            .filter(|p| now || state.last_sent.get(p).is_none_or(|t| t.elapsed() >= EVERY))
            .collect();
        for partition in due {
            let Some((offset, metadata)) = state.waiting.remove(&partition) else {
                continue;
            };
            state.next_mark = state.next_mark.wrapping_add(1);
            let mark = state.next_mark;
            let key = partition.to_string();
            let value = encode(offset, &metadata);
            if self.sender.send(
                &self.topic,
                partition,
                key.as_bytes(),
                value.as_bytes(),
                mark,
            ) {
                state.sent.insert(mark, (partition, (offset, metadata)));
                state.last_sent.insert(partition, Instant::now());
            } else {
                // Refused at once (a full queue): offered again with the next position.
                state.offered.remove(&partition);
            }
        }
    }

    /// Takes the outcomes that came back.
    fn collect(&self, state: &mut LogState) {
        for (mark, ok) in self.sender.marks().take() {
            let Some((partition, entry)) = state.sent.remove(&mark) else {
                continue;
            };
            if !ok {
                tracing::warn!(
                    topic = %self.topic,
                    partition,
                    offset = entry.0,
                    "progress not written: the offset is stored with a later position"
                );
                if state.offered.get(&partition) == Some(&entry) {
                    state.offered.remove(&partition);
                }
                continue;
            }
            let newer = state
                .acked
                .get(&partition)
                .is_none_or(|(m, _)| mark.wrapping_sub(*m) < u32::MAX / 2);
            if newer {
                state.acked.insert(partition, (mark, entry));
            }
        }
    }

    /// The newest written entry of each partition: what may be stored for commit.
    pub(super) fn acked(&self) -> BTreeMap<i32, Entry> {
        let Ok(mut state) = self.state.lock() else {
            return BTreeMap::new();
        };
        self.collect(&mut state);
        self.send_waiting(&mut state, false);
        state
            .acked
            .iter()
            .map(|(p, (_, entry))| (*p, entry.clone()))
            .collect()
    }

    /// Whether an entry offered is not written yet (of `partitions`, or of any when `None`);
    /// waiting ones are sent at once.
    pub(super) fn pending(&self, partitions: Option<&[i32]>) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        self.collect(&mut state);
        self.send_waiting(&mut state, true);
        let of = |p: &i32| partitions.is_none_or(|only| only.contains(p));
        state.sent.values().any(|(p, _)| of(p)) || state.waiting.keys().any(of)
    }

    /// Blocks until every entry offered of `partitions` is written (or failed), or `timeout`.
    pub(super) fn wait_written(&self, partitions: &[i32], timeout: Duration) {
        let until = Instant::now() + timeout;
        while self.pending(Some(partitions)) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    topic = %self.topic,
                    partitions = ?partitions,
                    "progress not acknowledged in time: the last position written is committed"
                );
                return;
            }
            self.sender
                .marks()
                .wait(left.min(Duration::from_millis(50)));
        }
    }

    /// Forgets `partitions` (revoked or lost): their next owner writes its own entries.
    pub(super) fn forget(&self, partitions: &[i32]) {
        if let Ok(mut state) = self.state.lock() {
            self.collect(&mut state);
            state.sent.retain(|_, (p, _)| !partitions.contains(p));
            state.offered.retain(|p, _| !partitions.contains(p));
            state.waiting.retain(|p, _| !partitions.contains(p));
            state.acked.retain(|p, _| !partitions.contains(p));
        }
    }
}

/// Whether `topic` (a progress topic) exists (blocking).
pub(super) fn exists(kafka: &KafkaConnection, topic: &str) -> bool {
    reader(kafka, topic, "progress reader", false)
        .and_then(|consumer: rdkafka::consumer::BaseConsumer<ReaderContext>| {
            partition_ids(&consumer, topic)
        })
        .is_ok()
}

/// For each `(partition, committed offset)`, the metadata written with that offset to the
/// progress `topic` (blocking, within `within`): the last entry of the offset in the partition's
/// tail, or in the whole partition if the tail has none. Partitions without one are left out;
/// a read that fails gives what was found so far.
pub(crate) fn lookup(
    kafka: &KafkaConnection,
    topic: &str,
    wanted: &[(i32, i64)],
    within: Duration,
) -> HashMap<i32, String> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let marks = match watermarks(kafka, topic) {
        Ok(marks) => marks,
        Err(e) => {
            tracing::warn!(topic, error = %e, "progress topic not read: records past the committed offsets are read again");
            return found;
        }
    };
    let deadline = Instant::now() + within;
    // The tail first, then (where the tail had nothing) the rest of the partition.
    for whole in [false, true] {
        let stretches: Vec<Stretch> = wanted
            .iter()
            .filter(|(p, _)| !found.contains_key(p))
            .filter_map(|(p, _)| {
                let (low, high) = *marks.get(p)?;
                let tail_from = low.max(high - TAIL);
                match whole {
                    false => Some(Stretch {
                        partition: *p,
                        from: tail_from,
                        until: None,
                    }),
                    true if tail_from > low => Some(Stretch {
                        partition: *p,
                        from: low,
                        until: Some(tail_from),
                    }),
                    true => None,
                }
            })
            .collect();
        if stretches.is_empty() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = read_entries(kafka, topic, &stretches, left, wanted, &mut found) {
            tracing::warn!(topic, error = %e, "progress topic read in part: records past the committed offsets of the rest are read again");
            break;
        }
    }
    found
}

fn read_entries(
    kafka: &KafkaConnection,
    topic: &str,
    stretches: &[Stretch],
    within: Duration,
    wanted: &[(i32, i64)],
    found: &mut HashMap<i32, String>,
) -> Result<(), ReadError> {
    let wanted: HashMap<i32, i64> = wanted.iter().copied().collect();
    let mut reader = StretchReader::open(kafka, topic, stretches, "progress reader", within)?;
    while let Some(message) = reader.next_record() {
        let message = message?;
        let Some((offset, metadata)) = message.payload().and_then(decode) else {
            continue;
        };
        if wanted.get(&message.partition()) == Some(&offset) {
            found.insert(message.partition(), metadata.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;

    use super::*;
    use crate::kafka::{BatchProducer, Role};

    /// A log over a progress topic of 2 partitions on a mock cluster, and the cluster's
    /// connection.
    fn log(
        cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    ) -> (ProgressLog, KafkaConnection) {
        cluster.create_topic("g.progress", 2, 1).expect("topic");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer = BatchProducer::new(&kafka.config(Role::Producer {
            message_timeout_ms: 5_000,
        }))
        .expect("producer");
        (
            ProgressLog::new("g.progress".into(), producer.marked()),
            kafka,
        )
    }

    #[test]
    fn only_written_entries_are_acked_one_out_per_partition_and_the_committed_one_is_found() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let (log, kafka) = log(&cluster);
        assert!(exists(&kafka, "g.progress"));
        assert!(!exists(&kafka, "no.such.progress"));
        // Offered faster than written: the first goes out, the newest waits, the ones between
        // are never written.
        for offset in 1..=5 {
            log.offer(0, offset, &format!("m{offset}"));
        }
        log.offer(1, 7, "p1");
        assert!(log.pending(None));
        log.wait_written(&[0, 1], Duration::from_secs(10));
        assert!(!log.pending(None), "written, the waiting one too");
        let acked = log.acked();
        assert_eq!(acked.get(&0), Some(&(5, "m5".to_string())));
        assert_eq!(acked.get(&1), Some(&(7, "p1".to_string())));
        // The same entry again sends nothing.
        log.offer(0, 5, "m5");
        assert!(!log.pending(Some(&[0])));

        let found = lookup(
            &kafka,
            "g.progress",
            &[(0, 5), (1, 6)],
            Duration::from_secs(10),
        );
        assert_eq!(found.get(&0).map(String::as_str), Some("m5"));
        assert_eq!(found.get(&1), None, "no entry of offset 6: nothing claimed");
        let found = lookup(&kafka, "g.progress", &[(0, 1)], Duration::from_secs(10));
        assert_eq!(found.get(&0).map(String::as_str), Some("m1"));
        for offset in 2..=4 {
            let found = lookup(
                &kafka,
                "g.progress",
                &[(0, offset)],
                Duration::from_secs(10),
            );
            assert_eq!(found.get(&0), None, "offset {offset} was never written");
        }

        log.forget(&[0]);
        assert_eq!(log.acked().get(&0), None);
        assert!(log.acked().contains_key(&1));
    }

    #[test]
    fn an_entry_reads_back_and_anything_else_is_none() {
        let value = encode(42, "out=0:1;dlq=|done=1.2.x:3.abc|stage text");
        assert_eq!(
            decode(value.as_bytes()),
            Some((42, "out=0:1;dlq=|done=1.2.x:3.abc|stage text"))
        );
        assert_eq!(decode(encode(0, "").as_bytes()), Some((0, "")));
        for bad in [&b""[..], b"42", b"x 1", b"-1 a", b"\xff\xfe 1", b" 1"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }
}
