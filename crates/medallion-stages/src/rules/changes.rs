//! Reads `config.changes` in full (every replica, outside the consumer group) and validates
//! rule-set updates as they arrive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use medallion_contracts::json::from_avro_binary;
use medallion_contracts::wire::parse_frame;
use medallion_runtime::kafka::io::{ReadError, TopicFollower};
use medallion_runtime::kafka::KafkaConnection;
use medallion_runtime::metrics as m;
use rdkafka::message::Message;

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

/// What became of one `config.changes` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    OtherTarget,
    NotNewer,
    Applied,
    Rejected,
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

    /// Follows `config.changes` from its beginning; returns only when a read fails.
    async fn read(&mut self) -> Result<(), ReadError> {
        let reader_schema = self.reader_schema.clone();
        let mut follower = TopicFollower::start(&self.kafka, &self.topic, "config.changes reader")?;
        loop {
            let message = follower.next().await?;
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
            self.take(&change).await;
        }
    }

    /// Applies one decoded `config.changes` record: one for another target, or not newer
    /// than the set in force, is passed over; an invalid rule set is rejected (the set in
    /// force stays).
    async fn take(&mut self, change: &serde_json::Value) -> Taken {
        let payload = &change["payload"];
        if payload["target"].as_str() != Some(TARGET) {
            return Taken::OtherTarget;
        }
        let version = payload["config_version"].as_i64().unwrap_or(-1);
        if version <= self.applied_version {
            return Taken::NotNewer;
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
                metrics::counter!(m::RULE_UPDATES_TOTAL, "stage" => GROUP, "outcome" => "applied")
                    .increment(1);
                metrics::gauge!(m::RULES_VERSION, "stage" => GROUP).set(version as f64);
                tracing::info!(version, changed_by = by, "rule set update accepted");
                Taken::Applied
            }
            Err(e) => {
                metrics::counter!(m::RULE_UPDATES_TOTAL, "stage" => GROUP, "outcome" => "rejected")
                    .increment(1);
                tracing::error!(version, changed_by = by, error = %e, "rule set update rejected; the previous rules stay in force");
                Taken::Rejected
            }
        }
    }

    async fn decode(
        &self,
        bytes: &[u8],
        reader: &apache_avro::Schema,
    ) -> Result<serde_json::Value, ChangeDecodeError> {
        let (id, body) = parse_frame(bytes)?;
        let text = self.registry.schema_by_id(id).await?;
        let writer = apache_avro::Schema::parse_str(&text)?;
        Ok(from_avro_binary(body, &writer, reader)?)
    }
}

/// Why a record of `config.changes` could not be read (it is skipped, with a warning).
#[derive(Debug, thiserror::Error)]
enum ChangeDecodeError {
    #[error("not a framed Avro record: {0}")]
    Frame(#[from] medallion_contracts::wire::CodecError),
    #[error("its writer schema: {0}")]
    Registry(#[from] medallion_contracts::registry::RegistryError),
    #[error("its writer schema does not parse: {0}")]
    Schema(#[from] apache_avro::Error),
    #[error("its body: {0}")]
    Body(#[from] medallion_contracts::json::JsonError),
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::plan::with_row_column;
    use crate::testkit::{contract, input_batch};

    fn reader() -> Reader {
        let gold = contract("gold/data-ready.avsc");
        let (_, input_schema) = input_batch(&gold, &[], 0, 0, 0);
        Reader {
            kafka: KafkaConnection::plain("127.0.0.1:9").expect("connection"),
            topic: "config.changes".into(),
            registry: Arc::new(
                medallion_contracts::registry::RegistryClient::new(
                    "http://127.0.0.1:9",
                    Duration::from_millis(50),
                )
                .expect("client"),
            ),
            reader_schema: contract("config/changes.avsc").schema,
            plan_input: with_row_column(&input_schema),
            pending: Arc::new(Mutex::new(None)),
            applied_version: 1,
        }
    }

    fn change(target: &str, version: i64, document: &str) -> serde_json::Value {
        json!({"payload": {"target": target, "config_version": version,
                           "document": document, "changed_by": "ops"}})
    }

    const GOOD: &str = "rules:\n  - {id: r, description: d, predicate: \"count > 1\", severity: HIGH, observe: count}\n";

    #[tokio::test]
    async fn only_a_newer_valid_rule_set_for_this_target_is_queued() {
        let mut reader = reader();
        assert_eq!(
            reader.take(&change("bronze", 5, GOOD)).await,
            Taken::OtherTarget
        );
        assert_eq!(reader.take(&change(TARGET, 1, GOOD)).await, Taken::NotNewer);
        assert_eq!(
            reader.take(&change(TARGET, 2, "rules: [{id: x}]")).await,
            Taken::Rejected
        );
        assert!(reader.pending.lock().expect("slot").is_none());
        assert_eq!(reader.applied_version, 1, "a rejected set changes nothing");
        assert_eq!(reader.take(&change(TARGET, 3, GOOD)).await, Taken::Applied);
        assert_eq!(reader.applied_version, 3);
        let queued = reader.pending.lock().expect("slot").take();
        assert_eq!(queued.map(|c| c.version), Some(3));
        assert_eq!(reader.take(&change(TARGET, 3, GOOD)).await, Taken::NotNewer);
    }
}
