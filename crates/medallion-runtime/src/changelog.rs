//! Stage state kept in a compacted Kafka topic (`changelogs:` in topic-config.yaml), the source
//! of truth. The state of input partition `p` lives in changelog partition `p`: a replica that
//! is assigned `p` restores it by reading that one partition to its end, into memory
//! ([`restore`]) or into a table of the local state store from the table's checkpoint on
//! ([`restore_into`]).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::Message;

use crate::kafka::io::{read_stretches, ReadError, Stretch};
use crate::kafka::KafkaConnection;
use crate::outbound::SideRecord;

/// How long restoring one partition may take.
const RESTORE_WITHIN: Duration = Duration::from_secs(300);

/// Why a changelog could not be read.
#[derive(Debug, thiserror::Error)]
#[error("restoring changelog partition {partition}: {source}")]
pub struct RestoreError {
    pub partition: i32,
    #[source]
    pub source: Box<ReadError>,
}

/// Reads changelog `topic` partition `partition` from the start to its current end: the latest
/// value of every key (an empty value deletes the key).
pub async fn restore(
    kafka: &KafkaConnection,
    topic: &str,
    partition: i32,
) -> Result<HashMap<Vec<u8>, Vec<u8>>, RestoreError> {
    let kafka = kafka.clone();
    let topic = topic.to_string();
    let read = tokio::task::spawn_blocking(move || {
        let mut state = HashMap::new();
        read_stretches(
            &kafka,
            &topic,
            &[Stretch::whole(partition)],
            RESTORE_WITHIN,
            |message| {
                let Some(key) = message.key() else {
                    return;
                };
                match message.payload() {
                    Some(value) if !value.is_empty() => {
                        state.insert(key.to_vec(), value.to_vec());
                    }
                    _ => {
                        state.remove(key);
                    }
                }
            },
        )
        .map(|_| state)
    });
    match read.await {
        Ok(result) => result.map_err(|source| RestoreError {
            partition,
            source: Box::new(source),
        }),
        Err(e) => Err(RestoreError {
            partition,
            source: Box::new(ReadError::Interrupted(e.to_string())),
        }),
    }
}

/// Why a changelog could not be restored into the state store.
#[derive(Debug, thiserror::Error)]
pub enum RestoreIntoError {
    #[error(transparent)]
    Read(#[from] RestoreError),
    #[error("restoring changelog partition {partition} into the state store: {source}")]
    Store {
        partition: i32,
        #[source]
        source: crate::store::StoreError,
    },
}

/// What [`restore_into`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The first changelog offset read.
    pub from: i64,
    /// The checkpoint written: the changelog's end when the restore began.
    pub to: i64,
    /// Changelog records applied.
    pub applied: u64,
    /// Whether the table was emptied first (no usable checkpoint).
    pub rebuilt: bool,
}

/// Changelog records applied to the table at a time.
const RESTORE_CHUNK: usize = 10_000;

/// Brings `table` up to date with changelog `topic` partition `partition`, from the table's
/// checkpoint when it lies within the partition, else from the start into an emptied table (a
/// checkpoint past the end is another changelog's, one before the log start has lost records).
/// Records stream into the table in chunks; the checkpoint is written once the end is reached
/// and the files hold it, so a restore cut short starts again where the last checkpoint was.
///
/// The end is where the read meets the partition's end, not the high watermark a broker lists:
/// some Kafka-protocol brokers list one short of the end after a batch of several records.
/// A checkpoint past the listed end is read from the listed end (the records in between are
/// applied again, which leaves the same values) and is kept if the partition reaches it.
pub async fn restore_into(
    kafka: &KafkaConnection,
    topic: &str,
    partition: i32,
    table: crate::store::Table,
) -> Result<(crate::store::Table, Restored), RestoreIntoError> {
    let kafka = kafka.clone();
    let topic = topic.to_string();
    let read_error = move |source: ReadError| RestoreError {
        partition,
        source: Box::new(source),
    };
    let store_error = move |source| RestoreIntoError::Store { partition, source };
    let work = tokio::task::spawn_blocking(move || {
        let (low, listed) = crate::kafka::io::partition_watermarks(&kafka, &topic, partition)
            .map_err(read_error)?;
        let checkpoint = table.checkpoint().filter(|c| *c >= low);
        let mut rebuilt = checkpoint.is_none();
        if rebuilt {
            table.clear().map_err(store_error)?;
        }
        let mut from = checkpoint.map_or(low, |c| c.min(listed));
        let (mut applied, mut end) = apply_to_end(&kafka, &topic, partition, from, &table)
            .map_err(|e| e.into_error(partition))?;
        if checkpoint.is_some_and(|c| c > end) {
            tracing::warn!(topic = %topic, partition, checkpoint = ?checkpoint, end,
                "state checkpoint past the changelog's end (another changelog's); rebuilt");
            table.clear().map_err(store_error)?;
            rebuilt = true;
            from = low;
            (applied, end) = apply_to_end(&kafka, &topic, partition, low, &table)
                .map_err(|e| e.into_error(partition))?;
        }
        table.write_checkpoint(end).map_err(store_error)?;
        Ok((
            table,
            Restored {
                from,
                to: end,
                applied,
                rebuilt,
            },
        ))
    });
    match work.await {
        Ok(result) => result,
        Err(e) => Err(RestoreIntoError::Read(RestoreError {
            partition,
            source: Box::new(ReadError::Interrupted(e.to_string())),
        })),
    }
}

/// Why [`apply_to_end`] stopped.
enum ApplyError {
    Read(ReadError),
    Store(crate::store::StoreError),
}

impl ApplyError {
    fn into_error(self, partition: i32) -> RestoreIntoError {
        match self {
            ApplyError::Read(source) => RestoreIntoError::Read(RestoreError {
                partition,
                source: Box::new(source),
            }),
            ApplyError::Store(source) => RestoreIntoError::Store { partition, source },
        }
    }
}

/// Applies the partition's records from `from` to its end to `table`, in chunks; returns how
/// many were applied and the offset after the last one (`from` if there were none).
fn apply_to_end(
    kafka: &KafkaConnection,
    topic: &str,
    partition: i32,
    from: i64,
    table: &crate::store::Table,
) -> Result<(u64, i64), ApplyError> {
    let mut chunk: Vec<crate::store::Change> = Vec::with_capacity(RESTORE_CHUNK);
    let mut failed = None;
    let mut applied = 0u64;
    let mut end = from;
    read_stretches(
        kafka,
        topic,
        &[Stretch {
            partition,
            from,
            until: None,
        }],
        RESTORE_WITHIN,
        |message| {
            end = end.max(message.offset() + 1);
            let Some(key) = message.key() else {
                return;
            };
            let value = message.payload().filter(|v| !v.is_empty());
            chunk.push((key.to_vec(), value.map(<[u8]>::to_vec)));
            applied += 1;
            if chunk.len() >= RESTORE_CHUNK && failed.is_none() {
                if let Err(e) = table.apply(std::mem::take(&mut chunk)) {
                    failed = Some(e);
                }
            }
        },
    )
    .map_err(ApplyError::Read)?;
    if let Some(e) = failed {
        return Err(ApplyError::Store(e));
    }
    table.apply(chunk).map_err(ApplyError::Store)?;
    Ok((applied, end))
}

/// A changelog update for input partition `partition`.
pub fn update(topic: &str, partition: i32, key: &[u8], value: Vec<u8>) -> SideRecord {
    SideRecord {
        topic: topic.to_string(),
        partition: Some(partition),
        key: Some(key.to_vec()),
        value,
        headers: None,
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;

    use super::*;
    use crate::kafka::io::send_queued;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_partition_restores_to_the_latest_value_of_each_key_and_an_empty_value_deletes() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("state.changelog", 2, 1)
            .expect("topic created");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer: FutureProducer = crate::kafka::producer(&kafka).expect("producer");
        let updates = [
            update("state.changelog", 0, b"a", b"1".to_vec()),
            update("state.changelog", 0, b"b", b"1".to_vec()),
            update("state.changelog", 0, b"a", b"2".to_vec()),
            update("state.changelog", 0, b"b", Vec::new()),
            update("state.changelog", 1, b"other", b"x".to_vec()),
        ];
        send(&producer, &updates).await;
        let state = restore(&kafka, "state.changelog", 0)
            .await
            .expect("restored");
        assert_eq!(
            state,
            HashMap::from([(b"a".to_vec(), b"2".to_vec())]),
            "the latest value wins, a tombstone deletes, another partition stays out"
        );
        let empty = restore(&kafka, "state.changelog", 1)
            .await
            .expect("restored");
        assert_eq!(empty.len(), 1);
        let err = restore(&kafka, "no-such-changelog", 0)
            .await
            .expect_err("missing topic");
        assert_eq!(err.partition, 0);
    }

    /// Produces `updates` one at a time, each acknowledged before the next.
    async fn send(producer: &FutureProducer, updates: &[SideRecord]) {
        for u in updates {
            let record = rdkafka::producer::FutureRecord::to(&u.topic)
                .partition(u.partition.expect("a changelog update names its partition"))
                .key(u.key.as_deref().unwrap_or_default())
                .payload(&u.value);
            send_queued(producer, record)
                .await
                .expect("queued")
                .await
                .expect("not cancelled")
                .expect("delivered");
        }
    }

    fn store(dir: &std::path::Path) -> crate::store::StateStore {
        crate::store::StateStore::open(crate::store::StoreOptions {
            dir: dir.to_path_buf(),
            identity: "silver-processor".into(),
            cache_bytes: 1 << 20,
            write_buffer_bytes: 4 << 20,
        })
        .expect("store")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_table_restores_from_its_checkpoint_and_rebuilds_without_a_usable_one() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("merge.changelog", 1, 1)
            .expect("topic");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer: FutureProducer = crate::kafka::producer(&kafka).expect("producer");
        let t = "merge.changelog";
        send(
            &producer,
            &[
                update(t, 0, b"a", b"1".to_vec()),
                update(t, 0, b"b", b"1".to_vec()),
                update(t, 0, b"a", b"2".to_vec()),
            ],
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(dir.path());
        let table = s.table("merge", 0).expect("table");
        let (table, first) = restore_into(&kafka, t, 0, table).await.expect("restored");
        assert_eq!(
            first,
            Restored {
                from: 0,
                to: 3,
                applied: 3,
                rebuilt: true
            }
        );
        assert_eq!(table.checkpoint(), Some(3));

        // Only the tail is read on the next restore.
        send(
            &producer,
            &[
                update(t, 0, b"b", Vec::new()),
                update(t, 0, b"c", b"3".to_vec()),
            ],
        )
        .await;
        let (table, tail) = restore_into(&kafka, t, 0, table).await.expect("restored");
        assert_eq!(
            tail,
            Restored {
                from: 3,
                to: 5,
                applied: 2,
                rebuilt: false
            }
        );
        let contents: Vec<(Vec<u8>, Vec<u8>)> =
            table.prefix(b"").map(|kv| kv.expect("kv")).collect();
        assert_eq!(
            contents,
            [
                (b"a".to_vec(), b"2".to_vec()),
                (b"c".to_vec(), b"3".to_vec())
            ],
            "the latest value wins and a tombstone deletes"
        );

        // A checkpoint past the changelog's end is another changelog's: rebuilt from the start,
        // and a key only the local files had is gone.
        table.put(b"stray", b"x").expect("put");
        table.write_checkpoint(50).expect("checkpoint");
        let (table, again) = restore_into(&kafka, t, 0, table).await.expect("restored");
        assert_eq!(
            again,
            Restored {
                from: 0,
                to: 5,
                applied: 5,
                rebuilt: true
            }
        );
        assert_eq!(table.get(b"stray").expect("get"), None);
        assert_eq!(table.get(b"a").expect("get"), Some(b"2".to_vec()));

        // No checkpoint (writes ahead of the changelog when the worker stopped): rebuilt.
        table.forget_checkpoint().expect("forgotten");
        let (_, rebuilt) = restore_into(&kafka, t, 0, table).await.expect("restored");
        assert!(rebuilt.rebuilt && rebuilt.applied == 5);
    }
}
