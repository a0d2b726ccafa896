//! Reads `config.changes` in full (every replica, outside the consumer group) and validates
//! rule-set updates as they arrive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use medallion_contracts::json::from_avro_binary;
use medallion_contracts::wire::parse_frame;
use medallion_runtime::kafka::{KafkaConnection, Role};
use medallion_runtime::metrics as m;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{compile, parse, Compiled, Registry, RuleSetError, GROUP, TARGET};

/// Validates `document` as rule set `version` and queues it for the stage.
pub async fn offer(
    pending: &Mutex<Option<Compiled>>,
    plan_input: &SchemaRef,
    document: &str,
    version: i64,
    current: i64,
) -> Result<(), RuleSetError> {
    if version <= current {
        return Err(RuleSetError::NotNewer { version, current });
    }
    let set = parse(document)?;
    let compiled = compile(set, version, plan_input.clone()).await?;
    if let Ok(mut slot) = pending.lock() {
        *slot = Some(compiled);
    }
    Ok(())
}

pub struct Reader {
    pub kafka: KafkaConnection,
    pub topic: String,
    pub registry: Registry,
    pub reader_schema: apache_avro::Schema,
    pub plan_input: SchemaRef,
    pub pending: Arc<Mutex<Option<Compiled>>>,
    pub applied_version: i64,
}

impl Reader {
    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.read().await {
                tracing::warn!(error = %e, topic = %self.topic, "config.changes reader failed; restarting in 5 s");
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    async fn read(&mut self) -> Result<(), String> {
        let reader_schema = self.reader_schema.clone();
        let group = format!("{GROUP}.config.{}", uuid::Uuid::new_v4());
        let consumer: StreamConsumer = self
            .kafka
            .create(
                Role::Reader {
                    group: &group,
                    until_end: false,
                },
                "config.changes reader",
            )
            .map_err(|e| e.to_string())?;
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut tpl = TopicPartitionList::new();
        for topic in metadata.topics() {
            for p in topic.partitions() {
                tpl.add_partition_offset(&self.topic, p.id(), Offset::Beginning)
                    .map_err(|e| e.to_string())?;
            }
        }
        if tpl.count() == 0 {
            return Err(format!("topic {} has no partitions", self.topic));
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        loop {
            let message = consumer.recv().await.map_err(|e| e.to_string())?;
            let Some(bytes) = message.payload() else {
                continue;
            };
            let change = match self.decode(bytes, &reader_schema).await {
                Ok(change) => change,
                Err(e) => {
                    tracing::warn!(error = %e, offset = message.offset(), "unreadable config change skipped");
                    continue;
                }
            };
            let payload = &change["payload"];
            if payload["target"].as_str() != Some(TARGET) {
                continue;
            }
            let version = payload["config_version"].as_i64().unwrap_or(-1);
            if version <= self.applied_version {
                continue;
            }
            let document = payload["document"].as_str().unwrap_or_default();
            let by = payload["changed_by"].as_str().unwrap_or_default();
            match offer(
                &self.pending,
                &self.plan_input,
                document,
                version,
                self.applied_version,
            )
            .await
            {
                Ok(()) => {
                    self.applied_version = version;
                    metrics::counter!(m::RULE_UPDATES_TOTAL, "stage" => GROUP, "outcome" => "applied").increment(1);
                    metrics::gauge!(m::RULES_VERSION, "stage" => GROUP).set(version as f64);
                    tracing::info!(version, changed_by = by, "rule set update accepted");
                }
                Err(e) => {
                    metrics::counter!(m::RULE_UPDATES_TOTAL, "stage" => GROUP, "outcome" => "rejected").increment(1);
                    tracing::error!(version, changed_by = by, error = %e, "rule set update rejected; the previous rules stay in force");
                }
            }
        }
    }

    async fn decode(
        &self,
        bytes: &[u8],
        reader: &apache_avro::Schema,
    ) -> Result<serde_json::Value, String> {
        let (id, body) = parse_frame(bytes).map_err(|e| e.to_string())?;
        let text = self
            .registry
            .schema_by_id(id)
            .await
            .map_err(|e| e.to_string())?;
        let writer = apache_avro::Schema::parse_str(&text).map_err(|e| e.to_string())?;
        from_avro_binary(body, &writer, reader).map_err(|e| e.to_string())
    }
}
