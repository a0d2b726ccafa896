//! Stage state kept in a compacted Kafka topic (`changelogs:` in topic-config.yaml), never on
//! local disk. The state of input partition `p` lives in changelog partition `p`: a replica
//! that is assigned `p` restores it by reading that one partition to its end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::kafka::{KafkaConnection, ReaderContext, Role};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::worker::SideRecord;

/// Why a changelog could not be read.
#[derive(Debug, thiserror::Error)]
#[error("changelog {topic}[{partition}]: {message}")]
pub struct RestoreError {
    pub topic: String,
    pub partition: i32,
    pub message: String,
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
    tokio::task::spawn_blocking(move || restore_blocking(&kafka, &topic, partition))
        .await
        .map_err(|e| RestoreError {
            topic: String::new(),
            partition,
            message: e.to_string(),
        })?
}

fn restore_blocking(
    kafka: &KafkaConnection,
    topic: &str,
    partition: i32,
) -> Result<HashMap<Vec<u8>, Vec<u8>>, RestoreError> {
    let error = |message: String| RestoreError {
        topic: topic.to_string(),
        partition,
        message,
    };
    let group = format!("{topic}.restore");
    let consumer: BaseConsumer<ReaderContext> = kafka
        .create_with_context(
            Role::Reader {
                group: &group,
                until_end: true,
            },
            "changelog reader",
            ReaderContext,
        )
        .map_err(|e| error(e.to_string()))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(30))
        .map_err(|e| error(e.to_string()))?;
    tracing::debug!(topic, partition, low, high, "restoring changelog");
    let mut state = HashMap::new();
    if high <= low {
        return Ok(state);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .map_err(|e| error(e.to_string()))?;
    consumer.assign(&tpl).map_err(|e| error(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if Instant::now() > deadline {
            return Err(error(format!("not read to offset {high} within 300 s")));
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        // The end of the partition as of now: everything written before is in `state`.
        let message = match message {
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => return Ok(state),
            other => other.map_err(|e| error(e.to_string()))?,
        };
        if let Some(key) = message.key() {
            match message.payload() {
                Some(value) if !value.is_empty() => {
                    state.insert(key.to_vec(), value.to_vec());
                }
                _ => {
                    state.remove(key);
                }
            }
        }
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
