//! Kafka records → gateway messages: which topic feeds which event type, the registry decode
//! (Avro in, JSON out), the org filter and the coalescing key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use medallion_contracts::registry::RegistryClient;
use medallion_contracts::wire::parse_frame;
use medallion_runtime::metrics as m;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::hub::{Message, Policy};

/// One event type and where it comes from (`stage.feeds`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// The event type clients see and ask for (`?types=`).
    pub event: String,
    pub topic: String,
    /// Only records whose field at `filter_path` is one of these (empty: every record).
    #[serde(default)]
    pub filter_any_of: Vec<String>,
    /// A dotted path into the event, e.g. `payload.entity.entity_type`.
    #[serde(default)]
    pub filter_path: Option<String>,
    /// `reliable` (never dropped: a slow client is disconnected and resumes) or `coalesce`
    /// (a newer message of the same key replaces a queued one).
    pub delivery: Delivery,
    /// The coalescing key's fields, dotted paths into the event.
    #[serde(default)]
    pub coalesce_by: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Reliable,
    Coalesce,
}

impl Delivery {
    pub fn policy(self) -> Policy {
        match self {
            Delivery::Reliable => Policy::Reliable,
            Delivery::Coalesce => Policy::Coalesce,
        }
    }
}

/// The feeds of the source documents: alerts to the security console, tenant metrics to admin
/// dashboards, case updates to the workflow designer and lead updates to the CRM board.
pub fn default_feeds() -> Vec<FeedConfig> {
    let silver = |event: &str, types: &[&str]| FeedConfig {
        event: event.into(),
        topic: "silver.data.processed".into(),
        filter_path: Some("payload.entity.entity_type".into()),
        filter_any_of: types.iter().map(|t| t.to_string()).collect(),
        delivery: Delivery::Coalesce,
        coalesce_by: vec![
            "payload.entity.entity_type".into(),
            "payload.entity.entity_id".into(),
        ],
    };
    vec![
        FeedConfig {
            event: "alert.new".into(),
            topic: "rules.alerts.triggered".into(),
            filter_path: None,
            filter_any_of: Vec::new(),
            delivery: Delivery::Reliable,
            coalesce_by: Vec::new(),
        },
        FeedConfig {
            event: "tenant.metrics.update".into(),
            topic: "gold.data.ready".into(),
            filter_path: None,
            filter_any_of: Vec::new(),
            delivery: Delivery::Coalesce,
            coalesce_by: vec!["payload.metric".into(), "payload.window_start".into()],
        },
        silver("workflow.step.update", &["case"]),
        silver("crm.pipeline.refresh", &["lead"]),
    ]
}

/// Why the feeds are unusable.
pub fn check_feeds(feeds: &[FeedConfig]) -> Result<(), String> {
    if feeds.is_empty() {
        return Err("stage.feeds is empty".into());
    }
    if feeds.len() > 64 {
        return Err("stage.feeds: at most 64 event types".into());
    }
    for (i, feed) in feeds.iter().enumerate() {
        let key = format!("stage.feeds[{i}]");
        if feed.event.trim().is_empty() || feed.topic.trim().is_empty() {
            return Err(format!("{key}: event and topic must not be empty"));
        }
        // It is an SSE `event:` line and a `?types=` item.
        if !feed
            .event
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "{key}: event type `{}` may hold only letters, digits, `.`, `_` and `-`",
                feed.event
            ));
        }
        if feeds[..i].iter().any(|f| f.event == feed.event) {
            return Err(format!(
                "{key}: event type {} is declared twice",
                feed.event
            ));
        }
        if feed.filter_any_of.is_empty() != feed.filter_path.is_none() {
            return Err(format!("{key}: filter_path and filter_any_of go together"));
        }
        if (feed.delivery == Delivery::Coalesce) == feed.coalesce_by.is_empty() {
            return Err(format!(
                "{key}: coalesce_by is needed with delivery coalesce, and only with it"
            ));
        }
    }
    Ok(())
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The registry did not answer: infrastructure, retried, never skipped.
    #[error("the registry: {0}")]
    Registry(medallion_contracts::registry::RegistryError),
    /// The record itself is at fault: skipped and counted.
    #[error("{0}")]
    Record(String),
}

/// Decodes records of the feed topics through the registry.
pub struct Decoder {
    registry: Arc<RegistryClient>,
    schemas: Mutex<HashMap<u32, Arc<apache_avro::Schema>>>,
    feeds: Vec<FeedConfig>,
}

impl Decoder {
    pub fn new(registry: Arc<RegistryClient>, feeds: Vec<FeedConfig>) -> Self {
        Self {
            registry,
            schemas: Mutex::new(HashMap::new()),
            feeds,
        }
    }

    pub fn feeds(&self) -> &[FeedConfig] {
        &self.feeds
    }

    async fn schema(&self, id: u32) -> Result<Arc<apache_avro::Schema>, DecodeError> {
        if let Some(s) = self.schemas.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(s);
        }
        let text = self.registry.schema_by_id(id).await.map_err(|e| {
            if e.is_transient() {
                DecodeError::Registry(e)
            } else {
                DecodeError::Record(format!("writer schema {id}: {e}"))
            }
        })?;
        let schema = Arc::new(
            apache_avro::Schema::parse_str(&text)
                .map_err(|e| DecodeError::Record(format!("writer schema {id}: {e}")))?,
        );
        if let Ok(mut m) = self.schemas.lock() {
            m.insert(id, schema.clone());
        }
        Ok(schema)
    }

    /// The event of a framed record as JSON.
    pub async fn event(&self, value: &[u8]) -> Result<Json, DecodeError> {
        let (id, body) = parse_frame(value).map_err(|e| DecodeError::Record(e.to_string()))?;
        let schema = self.schema(id).await?;
        medallion_contracts::json::from_avro_binary(body, &schema, &schema)
            .map_err(|e| DecodeError::Record(e.to_string()))
    }

    /// The messages of one record: `Err` only when the registry does not answer (the caller
    /// waits and asks again); a record at fault makes none, counted and logged.
    pub async fn record(
        &self,
        topic: &str,
        slot: usize,
        offset: i64,
        timestamp_ms: i64,
        value: Option<&[u8]>,
    ) -> Result<Vec<Message>, DecodeError> {
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        match self.event(value).await {
            Ok(event) => Ok(self.messages(topic, slot, offset, timestamp_ms, &event)),
            Err(DecodeError::Record(reason)) => {
                metrics::counter!(m::GATEWAY_UNDECODABLE_TOTAL, "topic" => topic.to_string())
                    .increment(1);
                tracing::warn!(%topic, slot, offset, %reason, "a record the gateway cannot decode was skipped");
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// The messages one record of `topic` makes (one per feed of the topic that takes it).
    pub fn messages(
        &self,
        topic: &str,
        slot: usize,
        offset: i64,
        timestamp_ms: i64,
        event: &Json,
    ) -> Vec<Message> {
        let Some(org_id) = event.get("org_id").and_then(Json::as_i64) else {
            return Vec::new();
        };
        self.feeds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.topic == topic)
            .filter(|(_, f)| match &f.filter_path {
                Some(path) => field_text(event, path).is_some_and(|v| f.filter_any_of.contains(&v)),
                None => true,
            })
            .map(|(feed, f)| {
                let coalesce_key = (!f.coalesce_by.is_empty()).then(|| {
                    f.coalesce_by
                        .iter()
                        .map(|p| field_text(event, p).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("|")
                        .into_boxed_str()
                });
                let body = serde_json::json!({
                    "type": f.event,
                    "org_id": org_id,
                    "event_id": event.get("event_id"),
                    "timestamp": event.get("timestamp"),
                    "payload": event.get("payload"),
                })
                .to_string();
                Message {
                    feed,
                    org_id,
                    slot,
                    offset,
                    timestamp_ms,
                    coalesce_key,
                    // Written after `{"id":"…",` at each connection.
                    body: body[1..].into(),
                }
            })
            .collect()
    }
}

/// The text of the field at a dotted path (a string as is, anything else as JSON).
fn field_text(event: &Json, path: &str) -> Option<String> {
    let mut at = event;
    for part in path.split('.') {
        at = at.get(part)?;
    }
    match at {
        Json::String(s) => Some(s.clone()),
        Json::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn decoder() -> Decoder {
        let registry =
            RegistryClient::new("http://127.0.0.1:9", std::time::Duration::from_millis(50))
                .expect("client");
        Decoder::new(Arc::new(registry), default_feeds())
    }

    #[test]
    fn the_default_feeds_are_valid_and_a_bad_one_is_named() {
        assert_eq!(check_feeds(&default_feeds()), Ok(()));
        let mut twice = default_feeds();
        twice.push(twice[0].clone());
        assert!(check_feeds(&twice).unwrap_err().contains("stage.feeds[4]"));
        let mut spaced = default_feeds();
        spaced[0].event = "alert new\n".into();
        assert!(check_feeds(&spaced).unwrap_err().contains("stage.feeds[0]"));
        let mut no_key = default_feeds();
        no_key[1].coalesce_by.clear();
        assert!(check_feeds(&no_key).unwrap_err().contains("coalesce_by"));
    }

    #[test]
    fn a_silver_record_feeds_the_event_type_of_its_entity() {
        let decoder = decoder();
        let lead = json!({"event_id": "e1", "org_id": 5, "timestamp": 1,
            "payload": {"entity": {"entity_type": "lead", "entity_id": "L-1"}}});
        let messages = decoder.messages("silver.data.processed", 3, 9, 1, &lead);
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert_eq!((m.feed, m.org_id, m.slot, m.offset), (3, 5, 3, 9));
        assert_eq!(m.coalesce_key.as_deref(), Some("lead|L-1"));
        let body: Json = serde_json::from_str(&format!("{{{}", m.body)).expect("JSON");
        assert_eq!(body["type"], "crm.pipeline.refresh");
        assert_eq!(body["payload"]["entity"]["entity_id"], "L-1");
        let release = json!({"org_id": 5, "payload": {"entity": {"entity_type": "release"}}});
        assert!(decoder
            .messages("silver.data.processed", 3, 10, 1, &release)
            .is_empty());
        let metric = json!({"org_id": 5, "payload": {"metric": "cpu", "window_start": 60000}});
        let m = decoder.messages("gold.data.ready", 0, 1, 1, &metric);
        assert_eq!(m[0].coalesce_key.as_deref(), Some("cpu|60000"));
    }
}
