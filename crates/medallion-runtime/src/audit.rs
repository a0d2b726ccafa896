//! Governance records for `audit.events`: every worker writes one when it
//! dead-letters a record, encrypts personal data, redacts an outgoing message or sees drift.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::error::SetupError;

/// One governance action, before it is framed for `audit.events`.
#[derive(Debug, Clone, Default)]
pub struct AuditAction {
    /// Deterministic, so a replayed action is recognised downstream (see [`crate::ids`]).
    pub event_id: String,
    /// e.g. `dlq.routed`, `pii.encrypted`, `notification.redacted`, `drift.detected`.
    pub action: String,
    /// The consumer group that acted.
    pub actor: String,
    pub org_id: i64,
    pub correlation_id: String,
    pub trace_id: Option<String>,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub details: BTreeMap<String, String>,
    /// The events the action covers, each with the fields acted on (`payload.subjects`).
    pub subjects: Vec<(String, Vec<String>)>,
}

/// An [`AuditAction`] over borrowed text, for hot paths that build one per event (bronze's
/// `pii.encrypted`): [`AuditEncoder::encode_fields`] encodes it without copying its fields.
#[derive(Debug, Clone, Copy)]
pub struct AuditFields<'a> {
    pub event_id: &'a str,
    pub action: &'a str,
    pub actor: &'a str,
    pub org_id: i64,
    pub correlation_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    pub outcome: &'a str,
    pub reason: Option<&'a str>,
    /// Written in this order; keys must be distinct (an Avro map).
    pub details: &'a [(&'a str, &'a str)],
    /// The events covered, each with the fields acted on.
    pub subjects: &'a [(&'a str, &'a [String])],
}

impl AuditAction {
    /// The `audit/events.avsc` event, as JSON for [`crate::outbound::JsonEncoder`].
    pub fn to_event(&self, now_ms: i64) -> Value {
        let event_type = format!("audit.{}", self.action);
        crate::envelope::Envelope {
            event_id: &self.event_id,
            event_type: &event_type,
            timestamp: now_ms,
            service: &self.actor,
            correlation_id: &self.correlation_id,
            org_id: self.org_id,
            trace_id: self.trace_id.as_deref(),
            classification: "internal",
        }
        .event(json!({
            "action": self.action,
            "actor": self.actor,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "outcome": self.outcome,
            "reason": self.reason,
            "details": self.details,
            "subjects": self
                .subjects
                .iter()
                .map(|(id, fields)| json!({"event_id": id, "fields": fields}))
                .collect::<Vec<_>>(),
        }))
    }
}

/// Registers the `telemetry.audit` topic's schema and returns an encoder for it: what every
/// worker and operator command that records on the audit trail starts with.
pub async fn register_encoder(
    registry: &medallion_contracts::registry::RegistryClient,
    topics: &medallion_contracts::TopicConfig,
    contracts: &medallion_contracts::ContractSet,
) -> Result<AuditEncoder, SetupError> {
    let topic = topics
        .telemetry
        .as_ref()
        .map(|t| t.audit.clone())
        .ok_or_else(|| SetupError::contracts("topic-config.yaml names no telemetry.audit topic"))?;
    let (text, id) = crate::outbound::register(registry, topics, contracts, &topic).await?;
    AuditEncoder::new(&topic, &text, id)
}

/// Encodes audit events straight to Avro binary (Confluent framing). They are on hot paths (one
/// per encrypted event in bronze, one per drift in silver) where JSON → Avro costs more than the
/// stage itself. The encoding follows `audit/events.avsc` field by field; [`AuditEncoder::new`]
/// checks it against the contract, so a contract change cannot go unnoticed.
#[derive(Debug, Clone)]
pub struct AuditEncoder {
    topic: String,
    id: u32,
}

fn put_long(out: &mut Vec<u8>, value: i64) {
    let mut z = ((value << 1) ^ (value >> 63)) as u64;
    loop {
        if z < 0x80 {
            out.push(z as u8);
            return;
        }
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
}

fn put_str(out: &mut Vec<u8>, value: &str) {
    put_long(out, value.len() as i64);
    out.extend_from_slice(value.as_bytes());
}

fn put_optional(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => put_long(out, 0),
        Some(v) => {
            put_long(out, 1);
            put_str(out, v);
        }
    }
}

/// Index of `internal` in `io.medallion.common.Classification`.
const INTERNAL: i64 = 1;

impl AuditEncoder {
    /// An encoder for schema `id` of `topic`, checked against the contract `schema_text`.
    pub fn new(topic: &str, schema_text: &str, id: u32) -> Result<Self, SetupError> {
        let encoder = Self {
            topic: topic.to_string(),
            id,
        };
        let schema = apache_avro::Schema::parse_str(schema_text)
            .map_err(|e| SetupError::schema(topic, e))?;
        let sample = AuditAction {
            event_id: "e".into(),
            action: "check".into(),
            actor: "a".into(),
            org_id: -3,
            correlation_id: "c".into(),
            trace_id: Some("t".into()),
            resource_type: "r".into(),
            resource_id: "i".into(),
            outcome: "o".into(),
            reason: None,
            details: [
                ("k".to_string(), "v".to_string()),
                ("x".to_string(), String::new()),
            ]
            .into(),
            subjects: vec![
                ("e1".into(), vec!["payload.a".into(), "payload.b".into()]),
                ("e2".into(), Vec::new()),
            ],
        };
        let bytes = encoder.encode(&sample, 1_700_000_000_123);
        let decoded = medallion_contracts::json::from_avro_binary(&bytes[5..], &schema, &schema)
            .map_err(|e| {
                SetupError::schema(
                    topic,
                    format!("the audit encoding no longer matches it: {e}"),
                )
            })?;
        let expected = sample.to_event(1_700_000_000_123);
        if decoded != expected {
            return Err(SetupError::schema(
                topic,
                format!("the audit encoding no longer matches it: {decoded} != {expected}"),
            ));
        }
        Ok(encoder)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The framed Avro record of `action` at `now_ms`.
    pub fn encode(&self, action: &AuditAction, now_ms: i64) -> Vec<u8> {
        let details: Vec<(&str, &str)> = action
            .details
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let subjects: Vec<(&str, &[String])> = action
            .subjects
            .iter()
            .map(|(id, fields)| (id.as_str(), fields.as_slice()))
            .collect();
        self.encode_fields(
            &AuditFields {
                event_id: &action.event_id,
                action: &action.action,
                actor: &action.actor,
                org_id: action.org_id,
                correlation_id: &action.correlation_id,
                trace_id: action.trace_id.as_deref(),
                resource_type: &action.resource_type,
                resource_id: &action.resource_id,
                outcome: &action.outcome,
                reason: action.reason.as_deref(),
                details: &details,
                subjects: &subjects,
            },
            now_ms,
        )
    }

    /// The framed Avro record of `fields` at `now_ms`: what [`AuditEncoder::encode`] writes.
    pub fn encode_fields(&self, action: &AuditFields<'_>, now_ms: i64) -> Vec<u8> {
        const PREFIX: &str = "audit.";
        let mut out = Vec::with_capacity(256);
        out.push(0);
        out.extend_from_slice(&self.id.to_be_bytes());
        put_str(&mut out, action.event_id);
        put_long(&mut out, (PREFIX.len() + action.action.len()) as i64);
        out.extend_from_slice(PREFIX.as_bytes());
        out.extend_from_slice(action.action.as_bytes());
        put_str(&mut out, "1.0.0");
        put_long(&mut out, now_ms);
        put_str(&mut out, action.actor);
        put_str(&mut out, crate::envelope::instance());
        put_str(&mut out, action.correlation_id);
        put_long(&mut out, action.org_id);
        put_optional(&mut out, action.trace_id);
        put_long(&mut out, INTERNAL);
        // provenance: null.
        put_long(&mut out, 0);
        put_str(&mut out, action.action);
        put_str(&mut out, action.actor);
        put_str(&mut out, action.resource_type);
        put_str(&mut out, action.resource_id);
        put_str(&mut out, action.outcome);
        put_optional(&mut out, action.reason);
        if !action.details.is_empty() {
            put_long(&mut out, action.details.len() as i64);
            for (k, v) in action.details {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
        }
        put_long(&mut out, 0);
        if !action.subjects.is_empty() {
            put_long(&mut out, action.subjects.len() as i64);
            for (event_id, fields) in action.subjects {
                put_str(&mut out, event_id);
                if !fields.is_empty() {
                    put_long(&mut out, fields.len() as i64);
                    for f in *fields {
                        put_str(&mut out, f);
                    }
                }
                put_long(&mut out, 0);
            }
        }
        put_long(&mut out, 0);
        out
    }

    /// The `audit.events` record of `action`, keyed by its org.
    pub fn record(&self, action: &AuditAction, now_ms: i64) -> crate::outbound::SideRecord {
        self.side_record(action.org_id, self.encode(action, now_ms))
    }

    /// The `audit.events` record of `fields`, keyed by its org.
    pub fn record_fields(
        &self,
        fields: &AuditFields<'_>,
        now_ms: i64,
    ) -> crate::outbound::SideRecord {
        self.side_record(fields.org_id, self.encode_fields(fields, now_ms))
    }

    fn side_record(&self, org_id: i64, value: Vec<u8>) -> crate::outbound::SideRecord {
        crate::outbound::SideRecord {
            topic: self.topic.clone(),
            partition: None,
            key: Some(org_id.to_string().into_bytes()),
            value,
            headers: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hand_encoding_matches_the_audit_contract() {
        let root = medallion_contracts::project_root();
        let contracts =
            medallion_contracts::ContractSet::load(&root.join("schemas")).expect("schemas");
        let audit = contracts.get("audit/events.avsc").expect("audit contract");
        let encoder = AuditEncoder::new("audit.events", &audit.text, 9).expect("matches");
        let action = AuditAction {
            event_id: "00000000-0000-4000-8000-000000000001".into(),
            action: "pii.encrypted".into(),
            actor: "bronze-processor".into(),
            org_id: 123_456_789_012,
            correlation_id: "corr".into(),
            trace_id: None,
            resource_type: "lead.created".into(),
            resource_id: "x".repeat(300),
            outcome: "encrypted".into(),
            reason: Some("why".into()),
            subjects: Vec::new(),
            details: BTreeMap::new(),
        };
        let bytes = encoder.encode(&action, -5);
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 9]);
        let decoded =
            medallion_contracts::json::from_avro_binary(&bytes[5..], &audit.schema, &audit.schema)
                .expect("decodes");
        assert_eq!(decoded, action.to_event(-5));
        // The borrowed view writes the same bytes as the owned action.
        let mut detailed = action.clone();
        detailed.trace_id = Some("t-1".into());
        detailed.details = [("fields", "a,b"), ("key_id", "k1")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        let view = AuditFields {
            event_id: &detailed.event_id,
            action: &detailed.action,
            actor: &detailed.actor,
            org_id: detailed.org_id,
            correlation_id: &detailed.correlation_id,
            trace_id: Some("t-1"),
            resource_type: &detailed.resource_type,
            resource_id: &detailed.resource_id,
            outcome: &detailed.outcome,
            reason: Some("why"),
            subjects: &[],
            details: &[("fields", "a,b"), ("key_id", "k1")],
        };
        assert_eq!(
            encoder.encode_fields(&view, 7),
            encoder.encode(&detailed, 7)
        );
        // Another contract (a field more) is refused at construction.
        let mut other: serde_json::Value = serde_json::from_str(&audit.text).expect("JSON");
        if let Some(fields) = other["fields"].as_array_mut() {
            fields.insert(0, serde_json::json!({"name": "extra", "type": "int"}));
        }
        assert!(AuditEncoder::new("audit.events", &other.to_string(), 9).is_err());
    }
}
