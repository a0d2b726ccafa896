//! `medallion lag`: per consumer group, topic and partition, the committed offset, the high
//! watermark and the difference, read from the broker (the workers' own
//! `kafka_consumer_lag` gauge says the same from inside). A worker that schedules orgs fairly
//! commits its lowest record not done and says in the commit metadata how far it is past it
//! for every org but a few ([`crate::progress`]): that is shown too, so a partition where one
//! org is being read past is not taken for a stuck one. Where the broker drops commit metadata
//! (tansu), the same is read from the group's progress topic: the entry written with the
//! committed offset.

use std::time::Duration;

use crate::kafka::{KafkaConnection, Role};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::capture::CaptureError;
use crate::kafka::io::partition_ids;
use crate::progress::Progress;
use crate::recovery::progress_text;

/// One partition of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagRow {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// `None` when the group never committed on this partition.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
    /// Records not consumed yet: from the committed offset (or the start) to the high watermark.
    pub lag: i64,
    /// What the commit says is done beyond the committed offset, if anything.
    pub read_past: Option<ReadPast>,
}

/// Beyond its committed offset, the group is done with every record below `through` but
/// those of `open_orgs` orgs (from their first open record on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPast {
    pub through: i64,
    pub open_orgs: usize,
}

/// How long `medallion lag` looks in a progress topic for the entries of committed offsets.
const PROGRESS_LOOKUP: Duration = Duration::from_secs(5);

/// The lag of `group` on each partition of `topics`; `progress`, the group's progress topic
/// (for a group of one input topic), is read where a commit came without its metadata.
pub fn group_lag(
    kafka: &KafkaConnection,
    group: &str,
    topics: &[String],
    progress: Option<&str>,
) -> Result<Vec<LagRow>, CaptureError> {
    let consumer: BaseConsumer = kafka.create(
        Role::Reader {
            group,
            until_end: false,
        },
        "lag reader",
    )?;
    let mut rows = Vec::new();
    for topic in topics {
        let partitions = partition_ids(&consumer, topic)?;
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        // Commits without metadata: their entries in the progress topic, if it has them.
        let kept = match progress.filter(|_| topics.len() == 1) {
            Some(progress) => {
                let wanted: Vec<(i32, i64)> = committed
                    .elements()
                    .iter()
                    .filter(|e| e.metadata().is_empty())
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect();
                crate::worker::progress_log::lookup(kafka, progress, &wanted, PROGRESS_LOOKUP)
            }
            None => Default::default(),
        };
        for p in partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            let element = committed.find_partition(topic, p);
            let committed = element.as_ref().and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            let read_past = element.as_ref().and_then(|e| {
                let metadata = match e.metadata() {
                    "" => kept.get(&p)?.as_str(),
                    metadata => metadata,
                };
                let progress = Progress::decode(progress_text(metadata)?, topic, p)?;
                (Some(progress.base) == committed
                    && progress.claims_anything()
                    && (progress.fits(high)
                        || crate::kafka::io::reaches(
                            kafka,
                            topic,
                            p,
                            progress.through,
                            PROGRESS_LOOKUP,
                        )))
                .then_some(ReadPast {
                    through: progress.through,
                    open_orgs: progress.open.len(),
                })
            });
            let from = committed.unwrap_or(low).max(low);
            rows.push(LagRow {
                group: group.to_string(),
                topic: topic.clone(),
                partition: p,
                committed,
                low,
                high,
                lag: (high - from).max(0),
                read_past,
            });
        }
    }
    Ok(rows)
}

/// The rows as an aligned table, with a total per group.
pub fn table(rows: &[LagRow]) -> String {
    let mut out = format!(
        "{:<22} {:<26} {:>9} {:>12} {:>12} {:>10}  {}\n",
        "GROUP", "TOPIC", "PARTITION", "COMMITTED", "HIGH", "LAG", "DONE PAST COMMITTED"
    );
    let mut total: std::collections::BTreeMap<&str, i64> = Default::default();
    for r in rows {
        let past = r.read_past.map_or("-".to_string(), |p| {
            format!(
                "all below {} but {} org{}",
                p.through,
                p.open_orgs,
                if p.open_orgs == 1 { "" } else { "s" }
            )
        });
        out.push_str(&format!(
            "{:<22} {:<26} {:>9} {:>12} {:>12} {:>10}  {past}\n",
            r.group,
            r.topic,
            r.partition,
            r.committed.map_or("-".to_string(), |c| c.to_string()),
            r.high,
            r.lag
        ));
        *total.entry(r.group.as_str()).or_default() += r.lag;
    }
    for (group, lag) in total {
        out.push_str(&format!(
            "{group:<22} {:<26} {:>9} {:>12} {:>12} {lag:>10}\n",
            "(total)", "", "", ""
        ));
    }
    out
}
