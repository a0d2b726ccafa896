//! What the worker reports besides its output: `etl.execution` per batch and partition,
//! `audit.events` per dead letter, the consumer lag, and whether the broker answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::Offset;

use super::committer::WorkerContext;
use super::ledger::Ledger;
use super::planner::{Outgoing, Plan};
use super::topology::Topology;
use crate::clock::now_ms;
use crate::error::RecordFailure;
use crate::http::{Condition, Health};
use crate::metrics as m;
use crate::outbound::JsonEncoder;
use crate::record::Inbound;

/// Where the worker reports its batches and governance actions (`telemetry:` in
/// topic-config.yaml).
pub(super) struct Telemetry {
    pub(super) execution: JsonEncoder,
    pub(super) audit: crate::audit::AuditEncoder,
    pub(super) pipeline_id: String,
}

impl Telemetry {
    /// One `etl.execution` record per partition of the batch, and one `audit.events` record per
    /// dead letter.
    pub(super) fn batch(
        &self,
        topo: &Topology,
        batch: &[Inbound],
        plan: &Plan,
        duration: Duration,
    ) -> Vec<Outgoing> {
        let telemetry = self;
        let output_topic = topo.output.as_ref().map_or("", |o| o.topic.as_str());
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
        let group = &topo.group;
        let topic = &topo.input_topic;
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
                out.push(self.dead_letter_audit(topo, message, failure, 1));
            }
        }
        out
    }

    /// The `audit.events` record of one dead letter (`dlq.routed`).
    pub(super) fn dead_letter_audit(
        &self,
        topo: &Topology,
        message: &Inbound,
        failure: &RecordFailure,
        attempts: usize,
    ) -> Outgoing {
        let group = &topo.group;
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
                ("dlq_topic".to_string(), topo.dlq_topic.clone()),
                ("attempts".to_string(), attempts.to_string()),
            ]
            .into_iter()
            .collect(),
        };
        self.audit.record(&action, now_ms()).into()
    }
}

/// Counts a polled batch: `medallion_kafka_messages_in_total` and bytes.
pub(super) fn count_input(topo: &Topology, batch: &[Inbound]) {
    let bytes: usize = batch
        .iter()
        .map(|m| m.payload().map_or(0, <[u8]>::len))
        .sum();
    metrics::counter!(m::KAFKA_MESSAGES_IN_TOTAL, "group" => topo.group.clone(), "topic" => topo.input_topic.clone())
        .increment(batch.len() as u64);
    metrics::counter!(m::KAFKA_BYTES_IN_TOTAL, "group" => topo.group.clone(), "topic" => topo.input_topic.clone())
        .increment(bytes as u64);
}

/// The dedup windows' size over every partition of the ledger.
pub(super) fn dedup_gauges(group: &str, ledger: &Ledger) {
    let (events, bytes) = ledger
        .partitions()
        .filter_map(|p| ledger.get(p))
        .fold((0, 0), |(e, b), p| {
            (e + p.window.len(), b + p.window.approx_bytes())
        });
    metrics::gauge!(m::DEDUP_WINDOW_EVENTS, "stage" => group.to_string()).set(events as f64);
    metrics::gauge!(m::DEDUP_WINDOW_BYTES, "stage" => group.to_string()).set(bytes as f64);
}

/// How long a probe waits for the broker's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the broker is probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Probes that must fail in a row before the broker counts as unreachable: a single reset
/// connection fails one, and librdkafka reconnects within milliseconds.
const PROBE_FAILURES: u32 = 2;

/// Asks the broker for the input topic's metadata every [`PROBE_EVERY`], on the consumer's own
/// connections, and keeps [`Condition::BrokerUnreachable`] told: set after
/// [`PROBE_FAILURES`] failed or unanswered requests in a row (a refused connection fails at
/// once, a black-holed one after [`PROBE_TIMEOUT`]), cleared by the first answer. So readiness
/// turns false within ~1–3 s of an outage's start and true within ~1 s of its end.
pub(super) async fn probe_broker(
    consumer: Arc<StreamConsumer<WorkerContext>>,
    topic: String,
    health: Arc<Health>,
) {
    let mut failures = 0u32;
    loop {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        let answered = tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), PROBE_TIMEOUT)
                .map(|_| ())
        })
        .await;
        match answered {
            Ok(Ok(())) => {
                if failures >= PROBE_FAILURES {
                    tracing::info!("the broker answers again");
                }
                failures = 0;
            }
            Ok(Err(error)) => {
                failures += 1;
                if failures == PROBE_FAILURES {
                    tracing::warn!(%error, "the broker does not answer; not ready until it does");
                }
            }
            Err(_) => failures += 1,
        }
        health.set(Condition::BrokerUnreachable, failures >= PROBE_FAILURES);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// `kafka_consumer_lag{group,topic,partition}`: high watermark minus committed offset, never
/// negative, measured every few seconds while the worker runs.
pub(super) struct Lag {
    consumer: Arc<StreamConsumer<WorkerContext>>,
    topo: Arc<Topology>,
    /// The high watermarks last measured, by partition.
    highs: Mutex<BTreeMap<i32, i64>>,
}

impl Lag {
    pub(super) fn new(consumer: Arc<StreamConsumer<WorkerContext>>, topo: Arc<Topology>) -> Self {
        Self {
            consumer,
            topo,
            highs: Mutex::new(BTreeMap::new()),
        }
    }

    /// Measures and publishes the lag every 2 s, for as long as it runs.
    pub(super) async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            self.measure().await;
        }
    }

    /// Measures the lag of the assigned partitions once (committed offsets and watermarks
    /// read from the broker) and publishes it.
    async fn measure(&self) {
        let consumer = self.consumer.clone();
        let topic = self.topo.input_topic.clone();
        let measured = tokio::task::spawn_blocking(move || -> Vec<(i32, i64, i64)> {
            // An assignment the group took away is not asked about: the offset fetches would
            // queue at a coordinator that no longer knows the member.
            if consumer.assignment_lost() {
                return Vec::new();
            }
            let Ok(assignment) = consumer.assignment() else {
                return Vec::new();
            };
            let Ok(committed) = consumer.committed_offsets(assignment, Duration::from_secs(5))
            else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for e in committed.elements_for_topic(&topic) {
                let Ok((_, high)) =
                    consumer.fetch_watermarks(&topic, e.partition(), Duration::from_secs(5))
                else {
                    continue;
                };
                let committed = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                out.push((e.partition(), high, committed));
            }
            out
        })
        .await
        .unwrap_or_default();
        if let Ok(mut highs) = self.highs.lock() {
            for (partition, high, _) in &measured {
                highs.insert(*partition, *high);
            }
        }
        for (partition, high, committed) in measured {
            self.publish(partition, high - committed);
        }
    }

    /// The lag where the group stopped: the last measured high watermarks against the offsets
    /// just committed, without asking the broker again (a shutdown does not wait on it).
    /// A partition not measured yet (the worker stopped within its first seconds) is asked
    /// for once, within a second for all of them together.
    pub(super) fn publish_final(&self, committed: &BTreeMap<i32, i64>) {
        let highs = self.highs.lock().map(|h| h.clone()).unwrap_or_default();
        let budget = std::time::Instant::now() + Duration::from_secs(1);
        for (partition, offset) in committed {
            let high = highs.get(partition).copied().or_else(|| {
                let left = budget.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return None;
                }
                self.consumer
                    .fetch_watermarks(&self.topo.input_topic, *partition, left)
                    .ok()
                    .map(|(_, high)| high)
            });
            if let Some(high) = high {
                self.publish(*partition, high - offset);
            }
        }
    }

    fn publish(&self, partition: i32, lag: i64) {
        metrics::gauge!(m::KAFKA_CONSUMER_LAG, "group" => self.topo.group.clone(), "topic" => self.topo.input_topic.clone(), "partition" => partition.to_string())
            .set(lag.max(0) as f64);
    }
}

#[cfg(test)]
mod tests {
    use medallion_contracts::{project_root, ContractSet, TopicConfig};
    use rdkafka::message::Timestamp;

    use super::*;
    use crate::worker::topology::topology;

    fn telemetry_and_topology() -> (Telemetry, Topology, ContractSet, TopicConfig) {
        let root = project_root();
        let contracts = ContractSet::load(&root.join("schemas")).expect("schemas");
        let topics = TopicConfig::load(&root.join("topic-config.yaml")).expect("topics");
        let names = topics.telemetry.clone().expect("telemetry topics");
        let text = |topic: &str| {
            let schema = &topics.topic(topic).expect("declared").schema;
            contracts.get(schema).expect("contract").text.clone()
        };
        let telemetry = Telemetry {
            execution: JsonEncoder::new(&names.execution, &text(&names.execution), 11)
                .expect("execution encoder"),
            audit: crate::audit::AuditEncoder::new(&names.audit, &text(&names.audit), 12)
                .expect("audit encoder"),
            pipeline_id: "test-pipeline".into(),
        };
        let topo = topology(&contracts, &topics, "bronze-processor").expect("topology");
        (telemetry, topo, contracts, topics)
    }

    fn message(partition: i32, offset: i64) -> Inbound {
        Inbound::new(
            "connector.data.raw",
            partition,
            offset,
            Timestamp::CreateTime(1),
            Some(b"7".to_vec()),
            Some(vec![0]),
            None,
        )
    }

    fn outgoing(topic: &str, source: Option<usize>) -> Outgoing {
        Outgoing {
            source,
            ..Outgoing::empty(topic)
        }
    }

    #[test]
    fn each_partition_of_a_batch_gets_its_counts_and_each_dead_letter_an_audit_record() {
        let (telemetry, topo, contracts, topics) = telemetry_and_topology();
        let output = topo
            .output
            .as_ref()
            .expect("bronze has an output")
            .topic
            .clone();
        let batch = vec![
            message(0, 10),
            message(0, 11),
            message(3, 5),
            message(0, 12),
        ];
        let failure = RecordFailure::poison("malformed_body", "bad");
        let plan = Plan {
            outgoing: vec![
                outgoing(&output, Some(0)),
                outgoing(&output, Some(2)),
                outgoing(&output, Some(3)),
                outgoing("somewhere.else", Some(3)),
            ],
            deferred: Vec::new(),
            dead: vec![(1, failure)],
            remember: Vec::new(),
            duplicates: Vec::new(),
            event_times: Vec::new(),
        };
        let out = telemetry.batch(&topo, &batch, &plan, Duration::from_millis(3));
        let names = topics.telemetry.as_ref().expect("telemetry");
        let executions: Vec<&Outgoing> =
            out.iter().filter(|o| o.topic == names.execution).collect();
        let audits: Vec<&Outgoing> = out.iter().filter(|o| o.topic == names.audit).collect();
        assert_eq!((executions.len(), audits.len()), (2, 1));

        // Read back with apache-avro, through the contract.
        let schema = &contracts
            .get(&topics.topic(&names.execution).expect("declared").schema)
            .expect("contract")
            .schema;
        let decoded: Vec<serde_json::Value> = executions
            .iter()
            .map(|o| {
                let (_, body) = medallion_contracts::wire::parse_frame(&o.value).expect("framed");
                medallion_contracts::json::from_avro_binary(body, schema, schema).expect("decodes")
            })
            .collect();
        let summary: Vec<(i64, i64, i64, i64, i64, i64, String)> = decoded
            .iter()
            .map(|e| {
                let p = &e["payload"];
                let n = |k: &str| p[k].as_i64().expect(k);
                (
                    n("partition"),
                    n("first_offset"),
                    n("last_offset"),
                    n("records_in"),
                    n("records_out"),
                    n("records_dlq"),
                    p["status"].as_str().expect("status").to_string(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, 10, 12, 3, 2, 1, "PARTIAL".to_string()),
                (3, 5, 5, 1, 1, 0, "SUCCEEDED".to_string())
            ]
        );
        // The same batch range gives the same event id: a replay is recognised downstream.
        let again = telemetry.batch(&topo, &batch, &plan, Duration::from_millis(9));
        assert_eq!(again[0].value.len(), out[0].value.len());
        assert_eq!(decoded[0]["event_id"], {
            let (_, body) =
                medallion_contracts::wire::parse_frame(&again[0].value).expect("framed");
            medallion_contracts::json::from_avro_binary(body, schema, schema).expect("decodes")
                ["event_id"]
                .clone()
        });
    }
}
