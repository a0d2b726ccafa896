//! Stage state kept in a compacted Kafka topic (`changelogs:` in topic-config.yaml), never on
//! local disk. The state of input partition `p` lives in changelog partition `p`: a replica
//! that is assigned `p` restores it by reading that one partition to its end.

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
        for u in &updates {
            let record = rdkafka::producer::FutureRecord::to(&u.topic)
                .partition(u.partition.expect("a changelog update names its partition"))
                .key(u.key.as_deref().unwrap_or_default())
                .payload(&u.value);
            send_queued(&producer, record)
                .await
                .expect("queued")
                .await
                .expect("not cancelled")
                .expect("delivered");
        }
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
}
