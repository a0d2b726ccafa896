//! Records for topics other than a stage's output (audit events, changelog updates, alerts),
//! and the encoder of low-volume JSON events to a topic's registered schema.

use medallion_contracts::registry::RegistryClient;
use medallion_contracts::{ContractSet, TopicConfig};

use crate::dedup::event_key;
use crate::error::{SetupError, StageError};
use crate::record::HeaderList;

/// One record for a topic other than the stage's output.
#[derive(Debug, Clone)]
pub struct SideRecord {
    pub topic: String,
    /// An explicit partition (changelogs follow their input partition); `None` hashes the key.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Option<HeaderList>,
}

/// Registers `topic`'s value schema (from `topic-config.yaml` and `schemas/`): its text and id.
pub async fn register(
    registry: &RegistryClient,
    topics: &TopicConfig,
    contracts: &ContractSet,
    topic: &str,
) -> Result<(String, u32), SetupError> {
    let spec = topics.topic(topic).ok_or_else(|| {
        SetupError::contracts(format!("topic {topic} is not in topic-config.yaml"))
    })?;
    let contract = contracts.get(&spec.schema).ok_or_else(|| {
        SetupError::contracts(format!("schema {} is not in schemas/", spec.schema))
    })?;
    let id = registry
        .register(&topics.subject(topic), &contract.text)
        .await
        .map_err(|source| SetupError::Registry {
            topic: topic.to_string(),
            source,
        })?;
    Ok((contract.text.clone(), id))
}

/// Encodes low-volume JSON events (audit records, alerts) to a topic's registered schema.
#[derive(Debug, Clone)]
pub struct JsonEncoder {
    topic: String,
    schema: apache_avro::Schema,
    id: u32,
}

impl JsonEncoder {
    /// An encoder for schema `id` already registered (or a test's fixed id).
    pub fn new(topic: &str, schema_text: &str, id: u32) -> Result<Self, SetupError> {
        let schema = apache_avro::Schema::parse_str(schema_text)
            .map_err(|e| SetupError::schema(topic, e))?;
        Ok(Self {
            topic: topic.to_string(),
            schema,
            id,
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// A side record keyed by `key`, stamped with its event key (see [`crate::recovery`]).
    pub fn record(&self, key: &str, event: &serde_json::Value) -> Result<SideRecord, StageError> {
        let value = medallion_contracts::json::to_framed(event, &self.schema, self.id)
            .map_err(|e| StageError::Encode(format!("{}: {e}", self.topic)))?;
        let headers = event["event_id"].as_str().map(|id| {
            HeaderList::new().with(crate::recovery::EVENT_KEY, event_key(id).to_be_bytes())
        });
        Ok(SideRecord {
            topic: self.topic.clone(),
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            value,
            headers,
        })
    }
}
