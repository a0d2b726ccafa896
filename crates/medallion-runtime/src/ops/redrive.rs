//! `medallion dlq inspect` and `medallion dlq redrive`: what a dead-letter topic holds, by
//! reason, and putting records back on the topic they came from once the cause is fixed.
//!
//! A redrive reads the DLQ as consumer group `medallion-redrive.<dlq topic>`: its committed
//! offset is the first record a filter left behind, and the commit metadata lists the records
//! past it already redriven, so a second run never sends a record twice and a later run with
//! another filter still finds what the first one left. Each redriven record carries
//! `medallion.redrive.count`; a record redriven `max_redrives` times already stays in the DLQ
//! (reported as looping), so a poison record cannot circle forever.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::kafka::io::{partition_ids, send_queued, Stretch, StretchReader};
use crate::kafka::{KafkaConnection, ReaderContext, Role};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::capture::{read_topic_now, CaptureError, Captured};
use crate::dlq::header;

/// Times a record has been redriven.
pub const REDRIVE_COUNT: &str = "medallion.redrive.count";
/// The DLQ record a redriven record came from (`topic/partition/offset`).
pub const REDRIVEN_FROM: &str = "medallion.redrive.from";

fn text(record: &Captured, key: &str) -> Option<String> {
    record
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Counts and samples of one reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReasonStats {
    pub count: u64,
    pub stages: BTreeMap<String, u64>,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    pub samples: Vec<Captured>,
}

/// What `dlq inspect` reports.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    pub total: u64,
    pub by_reason: BTreeMap<String, ReasonStats>,
}

/// Reads `dlq_topic` to its end; keeps `samples` records per reason.
pub fn inspect(
    kafka: &KafkaConnection,
    dlq_topic: &str,
    samples: usize,
) -> Result<Inspection, CaptureError> {
    let mut out = Inspection::default();
    read_topic_now(kafka, dlq_topic, |record| {
        out.total += 1;
        let reason = text(&record, header::ERROR_REASON).unwrap_or_else(|| "(none)".into());
        let stats = out.by_reason.entry(reason).or_default();
        stats.count += 1;
        if let Some(stage) = text(&record, header::STAGE) {
            *stats.stages.entry(stage).or_default() += 1;
        }
        if let Some(t) = record.timestamp {
            stats.first_ms = Some(stats.first_ms.map_or(t, |f| f.min(t)));
            stats.last_ms = Some(stats.last_ms.map_or(t, |l| l.max(t)));
        }
        if stats.samples.len() < samples {
            stats.samples.push(record);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Which records a redrive takes, and how fast.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// Only records with these reasons (all when empty).
    pub reasons: Vec<String>,
    /// Only records dead-lettered at or after / before these times (epoch ms).
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Report what would happen; produce and commit nothing.
    pub dry_run: bool,
    /// Records already redriven this often stay in the DLQ.
    pub max_redrives: u32,
    /// Records per second; `None`: as fast as possible.
    pub rate: Option<f64>,
}

impl Default for RedriveOptions {
    fn default() -> Self {
        Self {
            reasons: Vec::new(),
            since_ms: None,
            until_ms: None,
            dry_run: false,
            max_redrives: 3,
            rate: None,
        }
    }
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Redriven (or, in a dry run, to be redriven), by original topic.
    pub redriven: BTreeMap<String, u64>,
    /// Left in the DLQ: filtered out by reason or time.
    pub filtered: u64,
    /// Left in the DLQ: redriven `max_redrives` times already.
    pub looping: u64,
    /// Left in the DLQ: no original topic header to send it back to.
    pub unroutable: u64,
    /// Skipped: redriven by an earlier run.
    pub already: u64,
    /// Not looked at in this run (too many scattered records to remember at once): run again.
    pub postponed: u64,
    /// Redriven by key because their original-partition header was unparsable or named a
    /// partition the topic does not have.
    pub repartitioned: u64,
    /// Left in the DLQ: the broker refused them (the first reasons are kept); run again.
    pub failed: u64,
    pub failures: Vec<String>,
}

/// Failure reasons a report keeps.
const MAX_FAILURES: usize = 5;

impl RedriveReport {
    fn fail(&mut self, from: &str, error: impl std::fmt::Display) {
        self.failed += 1;
        if self.failures.len() < MAX_FAILURES {
            self.failures.push(format!("{from}: {error}"));
        }
    }
}

/// The partition a redriven record goes to: its original one when the header names a partition
/// the topic has; otherwise `None` (the partitioner places it by key, as the first producer's did).
fn original_partition(header: Option<&str>, partitions: Option<usize>) -> Result<Option<i32>, ()> {
    let Some(header) = header else {
        return Ok(None);
    };
    match (header.trim().parse::<i32>(), partitions) {
        (Ok(p), Some(n)) if p >= 0 && (p as usize) < n => Ok(Some(p)),
        (Ok(p), None) if p >= 0 => Ok(Some(p)),
        _ => Err(()),
    }
}

/// Most offset ranges remembered per partition in the commit metadata (well under Kafka's
/// default 4 KiB metadata limit).
const MAX_RANGES: usize = 120;

/// `a-b,c-d` → ranges.
fn parse_ranges(text: &str) -> Vec<(i64, i64)> {
    text.split(',')
        .filter_map(|r| {
            let (a, b) = r.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// Sorted offsets → `a-b,c-d`.
fn format_ranges(offsets: &std::collections::BTreeSet<i64>) -> (String, usize) {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for &o in offsets {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == o => *end = o,
            _ => ranges.push((o, o)),
        }
    }
    let text = ranges
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",");
    (text, ranges.len())
}

/// Redrives the records of `dlq_topic` not redriven before (see the module docs).
pub async fn redrive(
    kafka: &KafkaConnection,
    dlq_topic: &str,
    options: &RedriveOptions,
) -> Result<RedriveReport, CaptureError> {
    let group = format!("medallion-redrive.{dlq_topic}");
    let consumer: BaseConsumer<ReaderContext> = kafka.create_with_context(
        Role::Reader {
            group: &group,
            until_end: true,
        },
        "DLQ reader",
        ReaderContext,
    )?;
    let partitions = partition_ids(&consumer, dlq_topic)?;
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(dlq_topic, *p);
    }
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let producer: FutureProducer = crate::kafka::producer(kafka)?;
    let mut report = RedriveReport::default();
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    // Partition counts of the topics records go back to, looked up once each.
    let mut original_partitions: BTreeMap<String, Option<usize>> = BTreeMap::new();
    for partition in partitions {
        let (start, done_before) = committed
            .find_partition(dlq_topic, partition)
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::Beginning,
                };
                (offset, parse_ranges(e.metadata()))
            })
            .unwrap_or((Offset::Beginning, Vec::new()));
        let already_done = |o: i64| done_before.iter().any(|(a, b)| (*a..=*b).contains(&o));
        // Offsets handled for good (redriven now or before, looping, unroutable), and the
        // first offset a filter left behind.
        let mut handled = std::collections::BTreeSet::new();
        let mut first_left: Option<i64> = None;
        let from = match start {
            Offset::Offset(o) => o,
            _ => 0,
        };
        let mut reader = StretchReader::open(
            kafka,
            dlq_topic,
            &[Stretch {
                partition,
                from,
                until: None,
            }],
            "DLQ reader",
            Duration::from_secs(600),
        )?;
        let mut next: Option<i64> = None;
        let mut deliveries = Vec::new();
        while let Some(message) = reader.next_record() {
            let message = message?;
            let offset = message.offset();
            if already_done(offset) {
                report.already += 1;
                handled.insert(offset);
                next = Some(offset + 1);
                continue;
            }
            if first_left.is_some() && format_ranges(&handled).1 >= MAX_RANGES {
                // Past a gap the metadata can hold no more: leave the rest for the next run.
                report.postponed += 1;
                continue;
            }
            next = Some(offset + 1);
            let record = Captured::from_message(partition, &message);
            let reason = text(&record, header::ERROR_REASON).unwrap_or_default();
            let at = record.timestamp.unwrap_or_default();
            if (!options.reasons.is_empty() && !options.reasons.contains(&reason))
                || options.since_ms.is_some_and(|s| at < s)
                || options.until_ms.is_some_and(|u| at >= u)
            {
                report.filtered += 1;
                first_left.get_or_insert(offset);
                continue;
            }
            let count: u32 = text(&record, REDRIVE_COUNT)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            if count >= options.max_redrives {
                report.looping += 1;
                handled.insert(offset);
                continue;
            }
            let Some(original) = text(&record, header::ORIGINAL_TOPIC) else {
                report.unroutable += 1;
                handled.insert(offset);
                continue;
            };
            handled.insert(offset);
            *report.redriven.entry(original.clone()).or_default() += 1;
            if options.dry_run {
                continue;
            }
            if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
                let due = started + Duration::from_secs_f64(sent as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            sent += 1;
            let from = format!("{dlq_topic}/{partition}/{}", record.offset);
            let count = (count + 1).to_string();
            let headers = redrive_headers(&record, &count, &from);
            let known = *original_partitions
                .entry(original.clone())
                .or_insert_with(|| partition_ids(&consumer, &original).ok().map(|p| p.len()));
            let original_partition =
                original_partition(text(&record, header::ORIGINAL_PARTITION).as_deref(), known)
                    .unwrap_or_else(|()| {
                        report.repartitioned += 1;
                        None
                    });
            let mut out: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&original).headers(headers);
            if let Some(key) = &record.key {
                out = out.key(key.as_slice());
            }
            if let Some(value) = &record.value {
                out = out.payload(value.as_slice());
            }
            if let Some(p) = original_partition {
                out = out.partition(p);
            }
            // One record the broker refuses stays in the DLQ; the others go on.
            let delivery = match send_queued(&producer, out).await {
                Ok(d) => Some(d),
                Err(e) => {
                    report.fail(&from, e);
                    None
                }
            };
            match delivery {
                Some(d) => deliveries.push((offset, from, original, d)),
                None => left_behind(
                    &mut report,
                    &mut handled,
                    &mut first_left,
                    offset,
                    &original,
                ),
            }
        }
        // Commit the partition only once everything taken from it is on its topic; what did
        // not get there is left for the next run.
        for (offset, from, original, d) in deliveries {
            let error = match d.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => e.to_string(),
                Err(_) => "the delivery was cancelled".to_string(),
            };
            report.fail(&from, error);
            left_behind(
                &mut report,
                &mut handled,
                &mut first_left,
                offset,
                &original,
            );
        }
        if let (Some(next), false) = (next, options.dry_run) {
            let commit = first_left.unwrap_or(next);
            let above: std::collections::BTreeSet<i64> =
                handled.into_iter().filter(|o| *o >= commit).collect();
            let metadata = format_ranges(&above).0;
            commit_confirmed(&consumer, dlq_topic, partition, commit, &metadata).await?;
        }
    }
    Ok(report)
}

/// The headers of a redriven record: its original ones without the dead-letter headers, plus
/// the redrive trail (how many times, and from which DLQ record).
fn redrive_headers(record: &Captured, count: &str, from: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &record.headers {
        if k.starts_with("medallion.dlq.") || k == REDRIVE_COUNT || k == REDRIVEN_FROM {
            continue;
        }
        headers = headers.insert(Header {
            key: k,
            value: v.as_deref(),
        });
    }
    headers
        .insert(Header {
            key: REDRIVE_COUNT,
            value: Some(count.as_bytes()),
        })
        .insert(Header {
            key: REDRIVEN_FROM,
            value: Some(from.as_bytes()),
        })
}

/// Commits `commit` with `metadata` for `partition` and reads it back until the group holds
/// it: the commit is what makes a redrive happen once (a broker busy with other groups has been
/// seen to answer a commit before the next fetch of the group's offsets returns it).
async fn commit_confirmed(
    consumer: &BaseConsumer<ReaderContext>,
    dlq_topic: &str,
    partition: i32,
    commit: i64,
    metadata: &str,
) -> Result<(), CaptureError> {
    let mut done = TopicPartitionList::new();
    done.add_partition_offset(dlq_topic, partition, Offset::Offset(commit))?;
    if let Some(mut elem) = done.find_partition(dlq_topic, partition) {
        elem.set_metadata(metadata);
    }
    // A loaded broker has taken seconds to show a commit it acknowledged: ask for up to 15 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut seen = String::from("nothing");
    while std::time::Instant::now() < deadline {
        consumer.commit(&done, CommitMode::Sync)?;
        let mut ask = TopicPartitionList::new();
        ask.add_partition(dlq_topic, partition);
        let held = consumer.committed_offsets(ask, Duration::from_secs(10))?;
        if let Some(e) = held.find_partition(dlq_topic, partition) {
            if e.offset() == Offset::Offset(commit) && e.metadata() == metadata {
                return Ok(());
            }
            seen = format!(
                "{:?} with metadata {:?} ({:?})",
                e.offset(),
                e.metadata(),
                e.error()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(CaptureError::File {
        path: dlq_topic.to_string(),
        message: format!(
            "partition {partition}: the group does not hold the commit of offset {commit} \
             with metadata {metadata:?}; it holds {seen}"
        ),
    })
}

/// A record that did not get back to its topic: not redriven after all, and the committed
/// position may not pass it.
fn left_behind(
    report: &mut RedriveReport,
    handled: &mut std::collections::BTreeSet<i64>,
    first_left: &mut Option<i64>,
    offset: i64,
    original: &str,
) {
    handled.remove(&offset);
    *first_left = Some(first_left.map_or(offset, |f| f.min(offset)));
    if let Some(n) = report.redriven.get_mut(original) {
        *n -= 1;
        if *n == 0 {
            report.redriven.remove(original);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_partition_the_topic_has_is_kept() {
        assert_eq!(original_partition(None, Some(12)), Ok(None));
        assert_eq!(original_partition(Some("3"), Some(12)), Ok(Some(3)));
        assert_eq!(original_partition(Some("3"), None), Ok(Some(3)));
        assert_eq!(original_partition(Some("12"), Some(12)), Err(()));
        assert_eq!(original_partition(Some("-1"), Some(12)), Err(()));
        assert_eq!(original_partition(Some("three"), Some(12)), Err(()));
        assert_eq!(original_partition(Some(""), None), Err(()));
    }

    #[test]
    fn offset_ranges_round_trip() {
        let offsets: std::collections::BTreeSet<i64> = [3, 4, 5, 9, 11, 12].into();
        let (text, n) = format_ranges(&offsets);
        assert_eq!((text.as_str(), n), ("3-5,9-9,11-12", 3));
        assert_eq!(parse_ranges(&text), vec![(3, 5), (9, 9), (11, 12)]);
        assert!(parse_ranges("").is_empty());
    }
}
