//! The reads and writes that several parts of Medallion make, written once: read partitions
//! to their end (state restore, recovery, capture, redrive), follow a whole topic from its
//! beginning (broadcast tables, configuration changes) and send with backpressure.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, ToBytes};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{ClientError, KafkaConnection, ReaderContext, Role};

/// A read of a topic that failed, naming the topic.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {topic}: {source}")]
    Client {
        topic: String,
        #[source]
        source: ClientError,
    },
    #[error("reading {topic}: {doing}: {source}")]
    Kafka {
        topic: String,
        doing: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("reading {topic}: partitions {partitions:?} not read to their end within {} s", .within.as_secs())]
    TooSlow {
        topic: String,
        partitions: Vec<i32>,
        within: Duration,
    },
    #[error("topic {0} does not exist or has no partitions")]
    NoPartitions(String),
    #[error("topic {topic} has no partition {partition}")]
    NoPartition { topic: String, partition: i32 },
    /// The blocking read's thread ended without an answer (the runtime shutting down).
    #[error("the read was interrupted: {0}")]
    Interrupted(String),
}

impl ReadError {
    fn kafka<'a>(topic: &'a str, doing: &'static str) -> impl FnOnce(KafkaError) -> Self + 'a {
        move |source| ReadError::Kafka {
            topic: topic.to_string(),
            doing,
            source,
        }
    }
}

/// A consumer that assigns partitions itself, in a group of its own that never commits; with
/// `until_end`, the end of each partition is reported.
pub fn reader<T>(
    kafka: &KafkaConnection,
    topic: &str,
    what: &'static str,
    until_end: bool,
) -> Result<T, ReadError>
where
    T: rdkafka::config::FromClientConfigAndContext<ReaderContext>,
{
    let group = format!("medallion-reader-{}", uuid::Uuid::new_v4());
    kafka
        .create_with_context(
            Role::Reader {
                group: &group,
                until_end,
            },
            what,
            ReaderContext,
        )
        .map_err(|source| ReadError::Client {
            topic: topic.to_string(),
            source,
        })
}

/// The partition ids of `topic`, in order; an error if it has none.
pub fn partition_ids<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
) -> Result<Vec<i32>, ReadError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(ReadError::kafka(topic, "fetching metadata"))?;
    let mut ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    ids.sort_unstable();
    if ids.is_empty() {
        return Err(ReadError::NoPartitions(topic.to_string()));
    }
    Ok(ids)
}

/// The partitions of `topic` with their (low, high) watermarks (blocking).
pub fn watermarks(
    kafka: &KafkaConnection,
    topic: &str,
) -> Result<BTreeMap<i32, (i64, i64)>, ReadError> {
    let consumer: BaseConsumer<ReaderContext> = reader(kafka, topic, "watermark reader", false)?;
    let mut out = BTreeMap::new();
    for partition in partition_ids(&consumer, topic)? {
        let marks = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(ReadError::kafka(topic, "fetching watermarks"))?;
        out.insert(partition, marks);
    }
    Ok(out)
}

/// The high watermark of `partition` as `client` last learnt it (from its fetch responses),
/// without asking the broker: `None` before it learnt one. rdkafka wraps only the broker
/// request (`fetch_watermarks`), which would cost a round trip per look.
pub fn known_end<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &std::ffi::CStr,
    partition: i32,
) -> Option<i64> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the handle lives as long as `client`; `topic` is NUL-terminated and outlives
    // the call; `low` and `high` are valid for writes. librdkafka only reads its own cache.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// The (low, high) watermarks of one partition of `topic` (blocking).
pub fn partition_watermarks(
    kafka: &KafkaConnection,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), ReadError> {
    let consumer: BaseConsumer<ReaderContext> = reader(kafka, topic, "watermark reader", false)?;
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| match e {
            KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownPartition) => {
                ReadError::NoPartition {
                    topic: topic.to_string(),
                    partition,
                }
            }
            e => ReadError::kafka(topic, "fetching watermarks")(e),
        })
}

/// A stretch of one partition: from `from` up to `until` (exclusive), or with `None` to the end
/// of the partition as it is when the read reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stretch {
    pub partition: i32,
    pub from: i64,
    pub until: Option<i64>,
}

impl Stretch {
    /// A whole partition, from its first record to its end.
    pub fn whole(partition: i32) -> Self {
        Self {
            partition,
            from: 0,
            until: None,
        }
    }
}

/// Reads stretches of partitions (blocking): each record once, in order per partition, until
/// every stretch is read or the time allowed runs out.
pub struct StretchReader {
    consumer: BaseConsumer<ReaderContext>,
    topic: String,
    /// The stretches not read to their end yet, by partition.
    open: BTreeMap<i32, Option<i64>>,
    within: Duration,
    deadline: Instant,
}

impl StretchReader {
    /// Starts reading `stretches` of `topic`; a stretch that is empty reads nothing.
    /// `what` names the reader in a client error.
    pub fn open(
        kafka: &KafkaConnection,
        topic: &str,
        stretches: &[Stretch],
        what: &'static str,
        within: Duration,
    ) -> Result<Self, ReadError> {
        let open: BTreeMap<i32, Option<i64>> = stretches
            .iter()
            .filter(|s| s.until.is_none_or(|u| u > s.from))
            .map(|s| (s.partition, s.until))
            .collect();
        let consumer: BaseConsumer<ReaderContext> = reader(kafka, topic, what, true)?;
        if !open.is_empty() {
            // A topic that is not there is named at once, not waited for.
            let exists = partition_ids(&consumer, topic)?;
            if let Some(missing) = open.keys().find(|p| !exists.contains(p)) {
                return Err(ReadError::NoPartition {
                    topic: topic.to_string(),
                    partition: *missing,
                });
            }
            let mut tpl = TopicPartitionList::new();
            for s in stretches.iter().filter(|s| open.contains_key(&s.partition)) {
                tpl.add_partition_offset(topic, s.partition, Offset::Offset(s.from.max(0)))
                    .map_err(ReadError::kafka(topic, "assigning"))?;
            }
            consumer
                .assign(&tpl)
                .map_err(ReadError::kafka(topic, "assigning"))?;
        }
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            open,
            within,
            deadline: Instant::now() + within,
        })
    }

    /// The next record of an open stretch; `None` once every stretch is read.
    pub fn next_record(&mut self) -> Option<Result<BorrowedMessage<'_>, ReadError>> {
        loop {
            if self.open.is_empty() {
                return None;
            }
            if Instant::now() > self.deadline {
                return Some(Err(ReadError::TooSlow {
                    topic: self.topic.clone(),
                    partitions: self.open.keys().copied().collect(),
                    within: self.within,
                }));
            }
            let message = match self.consumer.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    self.open.remove(&partition);
                    continue;
                }
                Some(Err(e)) => return Some(Err(ReadError::kafka(&self.topic, "reading")(e))),
                Some(Ok(message)) => message,
            };
            let partition = message.partition();
            let Some(until) = self.open.get(&partition).copied() else {
                continue;
            };
            if until.is_some_and(|u| message.offset() >= u) {
                self.open.remove(&partition);
                continue;
            }
            if until.is_some_and(|u| message.offset() + 1 >= u) {
                self.open.remove(&partition);
            }
            return Some(Ok(message));
        }
    }
}

/// Reads `stretches` of `topic` (blocking), handing each record to `each`; returns how many
/// were read.
pub fn read_stretches(
    kafka: &KafkaConnection,
    topic: &str,
    stretches: &[Stretch],
    within: Duration,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<u64, ReadError> {
    let mut reader = StretchReader::open(kafka, topic, stretches, "partition reader", within)?;
    let mut read = 0u64;
    while let Some(message) = reader.next_record() {
        each(&message?);
        read += 1;
    }
    Ok(read)
}

/// Whether `partition` of `topic` holds a record at `offset - 1`, so its end is at least
/// `offset` (blocking, within `within`; a failed read says no). For the broker that lists a
/// partition's end short of its last batch (tansu, until more is written): where its listed end
/// cannot tell, the log itself does.
pub fn reaches(
    kafka: &KafkaConnection,
    topic: &str,
    partition: i32,
    offset: i64,
    within: Duration,
) -> bool {
    if offset <= 0 {
        return true;
    }
    let last = offset - 1;
    let mut found = false;
    let stretch = Stretch {
        partition,
        from: last,
        until: Some(offset),
    };
    let read = read_stretches(kafka, topic, &[stretch], within, |m| {
        found |= m.offset() == last;
    });
    found && read.is_ok()
}

/// Follows every partition of a topic from its beginning, for as long as it is polled; knows
/// when it has read everything the topic held when it started (a table read whole is then
/// complete).
pub struct TopicFollower {
    consumer: StreamConsumer<ReaderContext>,
    topic: String,
    /// Per partition, the offset to reach before caught up.
    remaining: HashMap<i32, i64>,
}

impl TopicFollower {
    /// Starts following `topic` from its beginning; `what` names the reader in a client error.
    pub fn start(
        kafka: &KafkaConnection,
        topic: &str,
        what: &'static str,
    ) -> Result<Self, ReadError> {
        Self::start_at(kafka, topic, what, &HashMap::new())
    }

    /// Starts following `topic` from offset `from[p]` in each partition `p` it names, from
    /// the beginning in the others (blocking while it fetches the watermarks).
    pub fn start_at(
        kafka: &KafkaConnection,
        topic: &str,
        what: &'static str,
        from: &HashMap<i32, i64>,
    ) -> Result<Self, ReadError> {
        let consumer: StreamConsumer<ReaderContext> = reader(kafka, topic, what, false)?;
        let mut tpl = TopicPartitionList::new();
        let mut remaining = HashMap::new();
        for partition in partition_ids(&consumer, topic)? {
            let start = from.get(&partition).copied();
            tpl.add_partition_offset(
                topic,
                partition,
                start.map_or(Offset::Beginning, Offset::Offset),
            )
            .map_err(ReadError::kafka(topic, "assigning"))?;
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .map_err(ReadError::kafka(topic, "fetching watermarks"))?;
            if high > start.unwrap_or(low).max(low) {
                remaining.insert(partition, high);
            }
        }
        consumer
            .assign(&tpl)
            .map_err(ReadError::kafka(topic, "assigning"))?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            remaining,
        })
    }

    /// Whether every record the topic held at the start has been read.
    pub fn caught_up(&self) -> bool {
        self.remaining.is_empty()
    }

    /// The next record, waiting for one.
    pub async fn next(&mut self) -> Result<BorrowedMessage<'_>, ReadError> {
        let message = self
            .consumer
            .recv()
            .await
            .map_err(ReadError::kafka(&self.topic, "reading"))?;
        let partition = message.partition();
        if self
            .remaining
            .get(&partition)
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            self.remaining.remove(&partition);
        }
        Ok(message)
    }
}

/// Hands `record` to librdkafka, waiting while its queue is full: the producer's backpressure.
/// Any other refusal is returned.
pub async fn send_queued<'a, K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'a, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

    use super::*;

    /// A mock cluster with `topic` of `partitions`, holding `records` (key, value) per
    /// partition in order.
    async fn cluster_with(
        topic: &str,
        partitions: i32,
        records: &[(i32, &str, &str)],
    ) -> (
        MockCluster<'static, DefaultProducerContext>,
        KafkaConnection,
    ) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic(topic, partitions, 1)
            .expect("topic created");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer: FutureProducer = crate::kafka::producer(&kafka).expect("producer");
        for (partition, key, value) in records {
            let record = FutureRecord::to(topic)
                .partition(*partition)
                .key(*key)
                .payload(*value);
            let delivery = send_queued(&producer, record).await.expect("queued");
            delivery.await.expect("not cancelled").expect("delivered");
        }
        (cluster, kafka)
    }

    fn text(bytes: Option<&[u8]>) -> String {
        String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stretches_are_read_each_to_its_bound_and_whole_partitions_to_their_end() {
        let records = [
            (0, "a", "0-0"),
            (0, "b", "0-1"),
            (0, "c", "0-2"),
            (1, "d", "1-0"),
            (1, "e", "1-1"),
        ];
        let (_cluster, kafka) = cluster_with("t", 3, &records).await;
        let stretches = [
            Stretch {
                partition: 0,
                from: 1,
                until: Some(2),
            },
            Stretch::whole(1),
            // An empty partition read whole ends at once.
            Stretch::whole(2),
        ];
        let read = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            let n = read_stretches(&kafka, "t", &stretches, Duration::from_secs(30), |m| {
                seen.push((m.partition(), m.offset(), text(m.payload())));
            })
            .expect("read");
            (n, seen)
        })
        .await
        .expect("reader thread");
        let (n, mut seen) = read;
        seen.sort();
        assert_eq!(n, 3);
        assert_eq!(
            seen,
            [
                (0, 1, "0-1".to_string()),
                (1, 0, "1-0".to_string()),
                (1, 1, "1-1".to_string())
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_topic_that_is_not_there_is_named() {
        let (_cluster, kafka) = cluster_with("t", 1, &[]).await;
        let err = tokio::task::spawn_blocking(move || watermarks(&kafka, "no-such-topic"))
            .await
            .expect("reader thread")
            .expect_err("no partitions");
        assert!(err.to_string().contains("no-such-topic"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_follower_reads_every_partition_from_the_beginning_and_knows_when_it_caught_up() {
        let records = [(0, "k1", "v1"), (1, "k2", "v2"), (0, "k3", "v3")];
        let (_cluster, kafka) = cluster_with("table", 2, &records).await;
        let mut follower = TopicFollower::start(&kafka, "table", "test follower").expect("follow");
        assert!(!follower.caught_up());
        let mut seen = Vec::new();
        while !follower.caught_up() {
            let message = tokio::time::timeout(Duration::from_secs(30), follower.next())
                .await
                .expect("a record within 30 s")
                .expect("record");
            seen.push(text(message.key()));
        }
        seen.sort();
        assert_eq!(seen, ["k1", "k2", "k3"]);
    }
}
