//! Governance records for `audit.events` (seeds 001 and 003): every worker writes one when it
//! dead-letters a record, encrypts personal data, redacts an outgoing message or sees drift.

use std::collections::BTreeMap;

use serde_json::{json, Value};

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
}

impl AuditAction {
    /// The `audit/events.avsc` event, as JSON for [`crate::worker::JsonEncoder`].
    pub fn to_event(&self, instance: &str, now_ms: i64) -> Value {
        json!({
            "event_id": self.event_id,
            "event_type": format!("audit.{}", self.action),
            "event_version": "1.0.0",
            "timestamp": now_ms,
            "source": {"service": self.actor, "instance": instance},
            "correlation_id": self.correlation_id,
            "org_id": self.org_id,
            "trace_id": self.trace_id,
            "classification": "internal",
            "payload": {
                "action": self.action,
                "actor": self.actor,
                "resource_type": self.resource_type,
                "resource_id": self.resource_id,
                "outcome": self.outcome,
                "reason": self.reason,
                "details": self.details,
            },
        })
    }
}

/// This replica's name in `source.instance`: the pod name in Kubernetes.
pub fn instance() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into())
}
