//! The envelope every Medallion event carries (`common/metadata.avsc` fields at the top of each
//! contract), built in one place: the JSON events of gold, rules, `etl.execution` and
//! `audit.events` all come from [`Envelope::event`].

use serde_json::{json, Value};

/// The envelope fields of one event.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// When the event happened, epoch ms.
    pub timestamp: i64,
    /// The consumer group that produced it (`source.service`).
    pub service: &'a str,
    pub correlation_id: &'a str,
    pub org_id: i64,
    pub trace_id: Option<&'a str>,
    pub classification: &'a str,
}

/// The payload contracts' version every event is written with.
pub const EVENT_VERSION: &str = "1.0.0";

impl Envelope<'_> {
    /// The event with `payload`; `source.instance` is this replica ([`instance`]).
    pub fn event(&self, payload: Value) -> Value {
        json!({
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_version": EVENT_VERSION,
            "timestamp": self.timestamp,
            "source": {"service": self.service, "instance": instance()},
            "correlation_id": self.correlation_id,
            "org_id": self.org_id,
            "trace_id": self.trace_id,
            "classification": self.classification,
            // Evidence pointers belong to the events that carry evidence (connector → silver);
            // a derived event (a window, an alert, an audit record) has none of its own.
            "provenance": null,
            "payload": payload,
        })
    }
}

/// This replica's name in `source.instance`: the pod name in Kubernetes (`HOSTNAME`), else
/// `local`. Read once.
pub fn instance() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_names_this_replica_and_the_contract_version() {
        let e = Envelope {
            event_id: "e",
            event_type: "gold.metric.windowed",
            timestamp: 5,
            service: "gold-processor",
            correlation_id: "c",
            org_id: 7,
            trace_id: None,
            classification: "internal",
        }
        .event(json!({"x": 1}));
        assert_eq!(e["source"]["service"], "gold-processor");
        assert_eq!(e["source"]["instance"], instance());
        assert_ne!(e["source"]["instance"], "gold-processor");
        assert_eq!(e["event_version"], EVENT_VERSION);
        assert_eq!(e["trace_id"], Value::Null);
        assert_eq!(e["payload"]["x"], 1);
    }
}
