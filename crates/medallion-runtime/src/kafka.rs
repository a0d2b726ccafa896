//! Kafka client construction with the settings every Medallion process shares.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::producer::FutureProducer;

/// Why a Kafka client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot create Kafka {kind} for {bootstrap}: {source}")]
pub struct ClientError {
    pub kind: &'static str,
    pub bootstrap: String,
    pub source: rdkafka::error::KafkaError,
}

/// An idempotent producer keyed by `org_id`, partitioned like the Java client (murmur2), so
/// Java and Rust producers put an org on the same partition.
pub fn producer(bootstrap: &str) -> Result<FutureProducer, ClientError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|source| ClientError {
            kind: "producer",
            bootstrap: bootstrap.to_string(),
            source,
        })
}

/// A consumer in `group` that commits only what the caller stores.
pub fn consumer(bootstrap: &str, group: &str) -> Result<StreamConsumer, ClientError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .map_err(|source| ClientError {
            kind: "consumer",
            bootstrap: bootstrap.to_string(),
            source,
        })
}
