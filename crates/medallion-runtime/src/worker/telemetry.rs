//! What the worker reports: `etl.execution`, dead-letter audit records, consumer lag.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::Offset;

use crate::error::RecordFailure;
use crate::metrics as m;
use crate::record::Inbound;

use super::*;

/// Where the worker reports its batches and governance actions (`telemetry:` in
/// topic-config.yaml).
pub(super) struct Telemetry {
    pub(super) execution: JsonEncoder,
    pub(super) audit: crate::audit::AuditEncoder,
    pub(super) pipeline_id: String,
}

impl<S: Stage> StageWorker<S> {
    /// One `etl.execution` record per partition of the batch, and one `audit.events` record per
    /// dead letter.
    pub(super) fn batch_telemetry(
        &self,
        batch: &[Inbound],
        plan: &Plan,
        duration: Duration,
    ) -> Vec<Outgoing> {
        let Some(telemetry) = &self.telemetry else {
            return Vec::new();
        };
        let output_topic = self.output_topic().unwrap_or_default();
        #[derive(Default)]
        struct Counts {
            first: i64,
            last: i64,
            records_in: i64,
            records_out: i64,
            records_dlq: i64,
        }
        let mut by_partition: BTreeMap<i32, Counts> = BTreeMap::new();
        for message in batch {
            let c = by_partition
                .entry(message.partition())
                .or_insert_with(|| Counts {
                    first: message.offset(),
                    last: message.offset(),
                    ..Counts::default()
                });
            c.first = c.first.min(message.offset());
            c.last = c.last.max(message.offset());
            c.records_in += 1;
        }
        let first_partition = by_partition.keys().next().copied().unwrap_or_default();
        for o in plan.outgoing.iter().filter(|o| o.topic == output_topic) {
            // Records derived from state (closed windows) count in the batch's first partition.
            let partition = o
                .source
                .and_then(|i| batch.get(i))
                .map_or(first_partition, Message::partition);
            if let Some(c) = by_partition.get_mut(&partition) {
                c.records_out += 1;
            }
        }
        for (index, _) in &plan.dead {
            if let Some(c) = batch
                .get(*index)
                .and_then(|m| by_partition.get_mut(&m.partition()))
            {
                c.records_dlq += 1;
            }
        }
        let now = now_ms();
        let group = &self.topo.group;
        let topic = &self.topo.input_topic;
        let mut out = Vec::with_capacity(by_partition.len() + plan.dead.len());
        for (partition, c) in &by_partition {
            let status = if c.records_dlq > 0 {
                "PARTIAL"
            } else {
                "SUCCEEDED"
            };
            let range = format!("{topic}/{partition}/{}-{}", c.first, c.last);
            let event_id = crate::ids::stable_id(&["etl", group, &range]);
            let event = crate::envelope::Envelope {
                event_id: &event_id,
                event_type: "etl.execution",
                timestamp: now,
                service: group,
                correlation_id: &range,
                org_id: 0,
                trace_id: None,
                classification: "internal",
            }
            .event(serde_json::json!({
                "pipeline_id": telemetry.pipeline_id,
                "stage": group,
                "input_topic": topic,
                "partition": partition,
                "first_offset": c.first,
                "last_offset": c.last,
                "records_in": c.records_in,
                "records_out": c.records_out,
                "records_dlq": c.records_dlq,
                "duration_ms": duration.as_millis() as i64,
                "status": status,
                "error": serde_json::Value::Null,
            }));
            match telemetry.execution.record(&telemetry.pipeline_id, &event) {
                Ok(record) => out.push(record.into()),
                Err(e) => tracing::error!(error = %e, "etl.execution record not encoded"),
            }
        }
        for (index, failure) in &plan.dead {
            if let Some(message) = batch.get(*index) {
                out.extend(self.dead_letter_audit(message, failure, 1));
            }
        }
        out
    }

    /// The `audit.events` record of one dead letter (`dlq.routed`).
    pub(super) fn dead_letter_audit(
        &self,
        message: &Inbound,
        failure: &RecordFailure,
        attempts: usize,
    ) -> Option<Outgoing> {
        let telemetry = self.telemetry.as_ref()?;
        let group = &self.topo.group;
        let resource = format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let org_id = message.key().and_then(crate::keys::org_id).unwrap_or(0);
        let mut detail: String = failure.message.chars().take(256).collect();
        if detail.len() < failure.message.len() {
            detail.push('…');
        }
        let action = crate::audit::AuditAction {
            event_id: crate::ids::stable_id(&["dlq", group, &resource]),
            action: "dlq.routed".into(),
            actor: group.clone(),
            org_id,
            correlation_id: resource.clone(),
            trace_id: None,
            resource_type: "record".into(),
            resource_id: resource,
            outcome: "dead_lettered".into(),
            reason: Some(failure.reason.clone()),
            subjects: Vec::new(),
            details: [
                ("class".to_string(), failure.class.as_str().to_string()),
                ("message".to_string(), detail),
                ("dlq_topic".to_string(), self.topo.dlq_topic.clone()),
                ("attempts".to_string(), attempts.to_string()),
            ]
            .into_iter()
            .collect(),
        };
        Some(telemetry.audit.record(&action, now_ms()).into())
    }
}

/// Publishes `kafka_consumer_lag{group,topic,partition}` every few seconds: high watermark
/// minus committed offset, never negative.
pub(super) async fn lag_loop(
    consumer: Arc<StreamConsumer<WorkerContext>>,
    group: String,
    topic: String,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        publish_lag(consumer.clone(), &group, &topic).await;
    }
}

/// Measures and publishes the lag of the assigned partitions once.
pub(super) async fn publish_lag(
    consumer: Arc<StreamConsumer<WorkerContext>>,
    group: &str,
    topic: &str,
) {
    let topic_name = topic.to_string();
    let lags = tokio::task::spawn_blocking(move || -> Vec<(i32, i64)> {
        let Ok(assignment) = consumer.assignment() else {
            return Vec::new();
        };
        let Ok(committed) = consumer.committed_offsets(assignment, Duration::from_secs(5)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in committed.elements_for_topic(&topic_name) {
            let Ok((_, high)) =
                consumer.fetch_watermarks(&topic_name, e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let committed = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            out.push((e.partition(), (high - committed).max(0)));
        }
        out
    })
    .await
    .unwrap_or_default();
    for (partition, lag) in lags {
        metrics::gauge!(m::KAFKA_CONSUMER_LAG, "group" => group.to_string(), "topic" => topic.to_string(), "partition" => partition.to_string()).set(lag as f64);
    }
}
