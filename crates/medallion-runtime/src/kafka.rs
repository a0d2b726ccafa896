//! Kafka client construction with the settings every Medallion process shares.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;
use tokio::sync::Notify;

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
    producer_settings(
        ClientConfig::new().set("bootstrap.servers", bootstrap),
        30_000,
    )
    .create()
    .map_err(|source| ClientError {
        kind: "producer",
        bootstrap: bootstrap.to_string(),
        source,
    })
}

/// The producer settings every Medallion producer shares: idempotent, all replicas, the Java
/// client's murmur2 partitioning, and `message_timeout_ms` before a delivery counts as failed.
pub fn producer_settings(config: &mut ClientConfig, message_timeout_ms: u64) -> &mut ClientConfig {
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("message.timeout.ms", message_timeout_ms.to_string())
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

/// A producer that acknowledges whole batches: the delivery callback updates one counter per
/// batch instead of completing one future (a boxed channel) per record. One batch is in flight
/// at a time; a late callback from an abandoned batch is recognised by its generation.
pub struct BatchProducer {
    producer: ThreadedProducer<AckContext>,
    acks: Arc<Acks>,
}

/// The records of one batch that failed, by index, with the first error.
#[derive(Debug, Default)]
pub struct BatchFailures {
    pub indexes: Vec<usize>,
    pub first_error: Option<KafkaError>,
}

#[derive(Default)]
struct Acks {
    state: Mutex<AckState>,
    done: Notify,
}

#[derive(Default)]
struct AckState {
    generation: u32,
    pending: usize,
    failures: BatchFailures,
}

struct AckContext {
    acks: Arc<Acks>,
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (generation, index) = unpack(opaque);
        let Ok(mut state) = self.acks.state.lock() else {
            return;
        };
        if state.generation != generation || state.pending == 0 {
            return;
        }
        if let Err((e, _)) = result {
            state.failures.indexes.push(index);
            state.failures.first_error.get_or_insert_with(|| e.clone());
        }
        state.pending -= 1;
        if state.pending == 0 {
            self.acks.done.notify_one();
        }
    }
}

// The opaque carries the batch generation in the high 32 bits and the record index in the low.
const _: () = assert!(
    usize::BITS >= 64,
    "BatchProducer packs two u32 into a usize"
);

fn pack(generation: u32, index: usize) -> usize {
    ((generation as usize) << 32) | (index & 0xffff_ffff)
}

fn unpack(opaque: usize) -> (u32, usize) {
    ((opaque >> 32) as u32, opaque & 0xffff_ffff)
}

/// One record of a batch.
pub struct BatchRecord<'a> {
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Option<&'a OwnedHeaders>,
}

impl BatchProducer {
    /// Builds the producer from `config` (bootstrap, credentials and producer settings).
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let acks = Arc::new(Acks::default());
        let producer = config.create_with_context(AckContext { acks: acks.clone() })?;
        Ok(Self { producer, acks })
    }

    /// Produces `records` (the indexes into the caller's list are `indexes`) and waits for
    /// every acknowledgement. Returns the indexes that failed, refused or not delivered.
    pub async fn send_all<'a>(
        &self,
        indexes: &[usize],
        record: impl Fn(usize) -> BatchRecord<'a>,
    ) -> BatchFailures {
        let generation = {
            let Ok(mut state) = self.acks.state.lock() else {
                return BatchFailures {
                    indexes: indexes.to_vec(),
                    first_error: None,
                };
            };
            state.generation = state.generation.wrapping_add(1);
            state.pending = indexes.len();
            state.failures = BatchFailures::default();
            state.generation
        };
        let mut refused = BatchFailures::default();
        for &i in indexes {
            let r = record(i);
            loop {
                let mut base =
                    BaseRecord::with_opaque_to(r.topic, pack(generation, i)).payload(r.value);
                if let Some(key) = r.key {
                    base = base.key(key);
                }
                if let Some(partition) = r.partition {
                    base = base.partition(partition);
                }
                if let Some(headers) = r.headers {
                    base = base.headers(headers.clone());
                }
                match self.producer.send(base) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        refused.indexes.push(i);
                        refused.first_error.get_or_insert(e);
                        if let Ok(mut state) = self.acks.state.lock() {
                            state.pending = state.pending.saturating_sub(1);
                        }
                        break;
                    }
                }
            }
        }
        loop {
            let notified = self.acks.done.notified();
            {
                let Ok(mut state) = self.acks.state.lock() else {
                    break;
                };
                if state.pending == 0 {
                    let mut failures = std::mem::take(&mut state.failures);
                    failures.indexes.append(&mut refused.indexes);
                    failures.indexes.sort_unstable();
                    if failures.first_error.is_none() {
                        failures.first_error = refused.first_error.take();
                    }
                    return failures;
                }
            }
            notified.await;
        }
        BatchFailures {
            indexes: indexes.to_vec(),
            first_error: None,
        }
    }
}
