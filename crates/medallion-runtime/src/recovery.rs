//! Idempotency across crashes and rebalances. A worker's memory of what it already did is
//! rebuilt from Kafka when it is assigned a partition, so a SIGKILL or a move to another
//! replica neither forgets the dedup window nor produces an output twice:
//!
//! - Every record a worker produces to its output topic carries its event key
//!   ([`EVENT_KEY`], 16 bytes), and dead letters carry their origin (the `medallion.dlq.original.*`
//!   headers).
//! - Every stored offset carries, in its commit metadata, where the worker's own outputs stood
//!   ([`Snapshot`]: the last acknowledged offset of each output and DLQ partition). Anything
//!   produced after that commit lies above those offsets.
//! - On assignment the new owner reads (1) the output and DLQ partitions from the snapshot to
//!   their end: what a crashed owner produced after its last commit, which it is about to be
//!   handed again; those outputs are not produced a second time; (2) the input partition's last
//!   `window` records before the committed offset: the dedup window as it stood.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

pub use crate::kafka::io::{read_stretches, ReadError as RecoveryError, Stretch};
use crate::kafka::{KafkaConnection, ReaderContext};

/// How long reading a partition's tail (or the outputs after a commit) may take.
pub const READ_WITHIN: Duration = Duration::from_secs(300);

/// Header holding an output record's event key (16 bytes, big-endian; see
/// [`crate::dedup::event_key`]).
pub const EVENT_KEY: &str = "medallion.eid";

/// The event key in `headers`, if stamped (the last one wins: a stage that derives a new
/// event appends its own).
pub fn event_key_of<H: Headers>(headers: &H) -> Option<u128> {
    headers
        .iter()
        .filter(|h| h.key == EVENT_KEY)
        .last()
        .and_then(|h| h.value)
        .and_then(|v| <[u8; 16]>::try_from(v).ok())
        .map(u128::from_be_bytes)
}

/// Where a worker's outputs stood when it stored an offset: the last acknowledged offset of
/// each partition of its output topic and of its DLQ.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub output: BTreeMap<i32, i64>,
    pub dlq: BTreeMap<i32, i64>,
}

/// Marks commit metadata written by this module: `medallion/1|<snapshot>|<stage metadata>`
/// (one line: a newline in commit metadata did not survive the round trip through the broker).
const VERSION: &str = "medallion/1";

fn format_offsets(offsets: &BTreeMap<i32, i64>) -> String {
    offsets
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_offsets(text: &str) -> Option<BTreeMap<i32, i64>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (p, o) = pair.split_once(':')?;
            Some((p.parse().ok()?, o.parse().ok()?))
        })
        .collect()
}

/// Commit metadata holding `snapshot` and the stage's own metadata.
pub fn wrap(snapshot: &Snapshot, stage: Option<&str>) -> String {
    wrap_progress(snapshot, None, stage)
}

/// Commit metadata holding `snapshot`, what is done beyond the offset (an encoded
/// [`crate::progress::Progress`]) and the stage's own metadata.
pub fn wrap_progress(snapshot: &Snapshot, progress: Option<&str>, stage: Option<&str>) -> String {
    let done = progress.map(|p| format!(";done={p}")).unwrap_or_default();
    format!(
        "{VERSION}|out={};dlq={}{done}|{}",
        format_offsets(&snapshot.output),
        format_offsets(&snapshot.dlq),
        stage.unwrap_or_default()
    )
}

/// The encoded progress in committed `metadata`, if any.
pub fn progress_text(metadata: &str) -> Option<&str> {
    let rest = metadata.strip_prefix(VERSION)?.strip_prefix('|')?;
    let (line, _) = rest.split_once('|').unwrap_or((rest, ""));
    line.split(';').find_map(|part| part.strip_prefix("done="))
}

/// The snapshot and the stage's metadata in committed `metadata`. Metadata written before
/// snapshots existed is the stage's alone.
pub fn unwrap(metadata: &str) -> (Option<Snapshot>, Option<String>) {
    let stage = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let Some(rest) = metadata
        .strip_prefix(VERSION)
        .and_then(|r| r.strip_prefix('|'))
    else {
        return (None, stage(metadata));
    };
    let (line, stage_part) = rest.split_once('|').unwrap_or((rest, ""));
    let mut parts = line.split(';');
    let snapshot = (|| {
        Some(Snapshot {
            output: parse_offsets(parts.next()?.strip_prefix("out=")?)?,
            dlq: parse_offsets(parts.next()?.strip_prefix("dlq=")?)?,
        })
    })();
    (snapshot, stage(stage_part))
}

/// The partitions of `topic` with their (low, high) watermarks; none for a topic that is not
/// there yet (a worker may start before its topics are created).
pub fn watermarks(
    kafka: &KafkaConnection,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, RecoveryError> {
    match crate::kafka::io::watermarks(kafka, topic) {
        Err(RecoveryError::NoPartitions(_)) => Ok(BTreeMap::new()),
        other => other,
    }
}

/// The first offset of each partition of `topic` (in `marks`) whose timestamp is at or after
/// `since` (epoch ms); partitions with none are left out.
pub fn offsets_at(
    kafka: &KafkaConnection,
    topic: &str,
    marks: &BTreeMap<i32, (i64, i64)>,
    since: i64,
) -> Result<BTreeMap<i32, i64>, RecoveryError> {
    let error = |doing| {
        move |source| RecoveryError::Kafka {
            topic: topic.to_string(),
            doing,
            source,
        }
    };
    let consumer: BaseConsumer<ReaderContext> =
        crate::kafka::io::reader(kafka, topic, "recovery reader", true)?;
    let mut tpl = TopicPartitionList::new();
    for p in marks.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Offset(since))
            .map_err(error("looking up offsets by time"))?;
    }
    let found = consumer
        .offsets_for_times(tpl, Duration::from_secs(10))
        .map_err(error("looking up offsets by time"))?;
    Ok(found
        .elements_for_topic(topic)
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// Where to start reading each partition of a topic for what was produced after the last
/// commits of `snapshots` (one per newly assigned input partition; `None` where a partition
/// has no snapshot): after the oldest snapshot's offset, but never more than the last
/// `fallback` records (the whole read for a partition without a snapshot offset). A snapshot
/// that old belongs to an input partition idle since, which produced nothing after it.
pub fn scan_from(
    snapshots: &[Option<&BTreeMap<i32, i64>>],
    marks: &BTreeMap<i32, (i64, i64)>,
    fallback: i64,
) -> Vec<Stretch> {
    marks
        .iter()
        .map(|(&partition, &(low, high))| {
            let last_resort = low.max(high - fallback);
            let from = snapshots
                .iter()
                .map(|s| {
                    s.and_then(|s| s.get(&partition))
                        .map_or(last_resort, |acked| acked + 1)
                })
                .min()
                .unwrap_or(last_resort);
            Stretch {
                partition,
                from: from.max(last_resort),
                until: None,
            }
        })
        .collect()
}

/// The topics of a worker.
#[derive(Debug, Clone)]
pub struct Topics {
    pub input: String,
    /// `None` for a sink.
    pub output: Option<String>,
    pub dlq: String,
}

/// What earlier owners produced after their last commits of newly assigned partitions.
#[derive(Debug, Default)]
pub struct AfterCommit {
    /// Event keys of output records.
    pub output_keys: Vec<u128>,
    /// (input partition, offset) of dead letters of the newly assigned partitions.
    pub dead_letters: Vec<(i32, i64)>,
}

/// Reads the output and the DLQ from the oldest of `snapshots` (one per newly assigned input
/// partition in `fresh` that has a commit or records) to their end (blocking). The DLQ is read from `dead_since` (epoch ms)
/// too, if earlier: the dead letters of the input tail the dedup window is rebuilt from.
pub fn after_commit(
    kafka: &KafkaConnection,
    topics: &Topics,
    snapshots: &[Option<Snapshot>],
    fresh: &std::collections::HashSet<i32>,
    fallback: i64,
    dead_since: Option<i64>,
) -> Result<AfterCommit, RecoveryError> {
    use crate::dlq::{header, header_value};
    let mut found = AfterCommit::default();
    let mut scans = vec![(topics.dlq.as_str(), true)];
    if let Some(output) = &topics.output {
        scans.push((output.as_str(), false));
    }
    for (topic, is_dlq) in scans {
        let marks = watermarks(kafka, topic)?;
        let of: Vec<Option<&BTreeMap<i32, i64>>> = snapshots
            .iter()
            .map(|s| s.as_ref().map(|s| if is_dlq { &s.dlq } else { &s.output }))
            .collect();
        // No snapshot to go by (every newly assigned partition is empty and was never
        // committed): nothing was produced from them.
        let mut stretches = if of.is_empty() {
            Vec::new()
        } else {
            scan_from(&of, &marks, fallback)
        };
        if let (true, Some(since)) = (is_dlq, dead_since) {
            for (partition, o) in offsets_at(kafka, topic, &marks, since)? {
                match stretches.iter_mut().find(|s| s.partition == partition) {
                    Some(s) => s.from = s.from.min(o),
                    None => stretches.push(Stretch {
                        partition,
                        from: o,
                        until: None,
                    }),
                }
            }
        }
        read_stretches(kafka, topic, &stretches, READ_WITHIN, |m| {
            let Some(h) = m.headers() else {
                return;
            };
            if !is_dlq {
                found.output_keys.extend(event_key_of(h));
                return;
            }
            if header_value(h, header::ORIGINAL_TOPIC).as_deref() != Some(topics.input.as_str()) {
                return;
            }
            let number = |name| header_value(h, name).and_then(|v| v.parse::<i64>().ok());
            let partition = number(header::ORIGINAL_PARTITION).and_then(|p| i32::try_from(p).ok());
            if let (Some(p), Some(o)) = (partition, number(header::ORIGINAL_OFFSET)) {
                if fresh.contains(&p) {
                    found.dead_letters.push((p, o));
                }
            }
        })?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_topic_not_created_yet_has_no_partitions_to_recover_from() {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("there", 2, 1).expect("topic");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let (missing, there) = tokio::task::spawn_blocking(move || {
            (watermarks(&kafka, "not-yet"), watermarks(&kafka, "there"))
        })
        .await
        .expect("reader thread");
        assert!(missing.expect("no error").is_empty());
        assert_eq!(there.expect("watermarks").len(), 2);
    }

    #[test]
    fn metadata_round_trips_and_old_metadata_is_the_stages() {
        let snapshot = Snapshot {
            output: [(0, 12), (3, 40)].into(),
            dlq: [(1, 7)].into(),
        };
        let text = wrap(&snapshot, Some("wm=5;pos=9"));
        assert_eq!(text, "medallion/1|out=0:12,3:40;dlq=1:7|wm=5;pos=9");
        assert_eq!(
            unwrap(&text),
            (Some(snapshot.clone()), Some("wm=5;pos=9".into()))
        );
        assert_eq!(
            unwrap(&wrap(&snapshot, None)),
            (Some(snapshot.clone()), None)
        );
        assert_eq!(unwrap("wm=5;pos=9"), (None, Some("wm=5;pos=9".into())));
        assert_eq!(unwrap(""), (None, None));
        let empty = Snapshot::default();
        assert_eq!(unwrap(&wrap(&empty, None)), (Some(empty), None));
        // What is done beyond the offset rides along without disturbing the rest.
        let with = wrap_progress(&snapshot, Some("3.9.YQ:5.0badf00d"), Some("wm=5"));
        assert_eq!(unwrap(&with), (Some(snapshot.clone()), Some("wm=5".into())));
        assert_eq!(progress_text(&with), Some("3.9.YQ:5.0badf00d"));
        assert_eq!(progress_text(&text), None);
        assert_eq!(
            progress_text("done=1.2..3"),
            None,
            "only in a snapshot line"
        );
        // A damaged snapshot line is no snapshot; the stage's part survives.
        assert_eq!(
            unwrap("medallion/1|out=x;dlq=|wm=1"),
            (None, Some("wm=1".into()))
        );
    }

    #[test]
    fn the_scan_starts_after_the_oldest_snapshot_and_falls_back_to_the_tail() {
        let marks: BTreeMap<i32, (i64, i64)> =
            [(0, (0, 100)), (1, (50, 80)), (2, (0, 1_000))].into();
        let a: BTreeMap<i32, i64> = [(0, 90), (1, 60), (2, 990)].into();
        let b: BTreeMap<i32, i64> = [(0, 70), (1, 75)].into();
        let from = |s: &[Option<&BTreeMap<i32, i64>>]| {
            scan_from(s, &marks, 10)
                .into_iter()
                .map(|s| (s.partition, s.from))
                .collect::<Vec<_>>()
        };
        assert_eq!(from(&[Some(&a)]), vec![(0, 91), (1, 70), (2, 991)]);
        // The oldest snapshot decides, within the last 10 records; a partition one snapshot
        // lacks is read over its last 10.
        assert_eq!(
            from(&[Some(&a), Some(&b)]),
            vec![(0, 90), (1, 70), (2, 990)]
        );
        // No snapshot at all: the last 10 records, never below the log start.
        assert_eq!(from(&[None]), vec![(0, 90), (1, 70), (2, 990)]);
        assert_eq!(from(&[]), vec![(0, 90), (1, 70), (2, 990)]);
    }
}
