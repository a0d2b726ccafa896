//! Every metric a worker exports, named in one place so dashboards, alert rules and code can be
//! checked against the same list. Prometheus naming: `<name>_<unit>[_total]`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Consumer lag per group, topic and partition: high watermark minus committed, never negative.
pub const KAFKA_CONSUMER_LAG: &str = "kafka_consumer_lag";
/// Records consumed, by group and topic.
pub const KAFKA_MESSAGES_IN_TOTAL: &str = "kafka_messages_in_total";
/// Bytes of record values consumed, by group and topic.
pub const KAFKA_BYTES_IN_TOTAL: &str = "kafka_bytes_in_total";
/// Writer schemas known to the worker (fetched from or registered in the registry).
pub const SCHEMA_REGISTRY_SCHEMAS_TOTAL: &str = "schema_registry_schemas_total";
/// Records written to the output topic, by stage and topic.
pub const RECORDS_OUT_TOTAL: &str = "medallion_records_out_total";
/// Records dead-lettered, by stage, topic, class and reason.
pub const DLQ_RECORDS_TOTAL: &str = "medallion_dlq_records_total";
/// Redelivered records dropped by event-id dedup, by stage and topic.
pub const DUPLICATES_TOTAL: &str = "medallion_duplicates_dropped_total";
/// Outputs and dead letters of re-read records not produced again, because a previous owner
/// of the partition already produced them (after a restart or rebalance), by stage and input
/// topic. Counted apart, so the output and DLQ counters count each record once.
pub const REPLAYED_RECORDS_TOTAL: &str = "medallion_replayed_records_total";
/// Retries of transient failures, by stage and reason.
pub const RETRIES_TOTAL: &str = "medallion_retries_total";
/// Time to process one batch end to end (poll excluded), by stage.
pub const BATCH_DURATION_SECONDS: &str = "medallion_batch_duration_seconds";
/// Event time to output acknowledged, by stage.
pub const EVENT_LATENCY_SECONDS: &str = "medallion_event_to_output_latency_seconds";
/// Event ids held in dedup windows, by stage.
pub const DEDUP_WINDOW_EVENTS: &str = "medallion_dedup_window_events";
/// Approximate heap bytes of the dedup windows, by stage.
pub const DEDUP_WINDOW_BYTES: &str = "medallion_dedup_window_bytes";
/// Event ids put back into dedup windows when partitions were assigned, by stage and source:
/// `disk` (the window's copy in the state directory) or `input` (read from the input topic).
pub const DEDUP_WINDOW_RESTORED_TOTAL: &str = "medallion_dedup_window_restored_total";
/// 1 while the worker holds a partition assignment and the registry answered.
pub const WORKER_READY: &str = "medallion_worker_ready";
/// 1 while the worker cannot make progress for `reason` (broker_unreachable,
/// registry_unavailable, deliveries_refused, deliveries_stalled, assignment_lost), else 0.
pub const WORKER_DEGRADED: &str = "medallion_worker_degraded";

/// Data-quality expectation outcomes, by stage, expectation, action and result (pass|fail).
pub const EXPECTATION_RESULTS_TOTAL: &str = "medallion_expectation_results_total";
/// Updates older than the entity's current state (drift), by stage and entity type.
pub const DRIFT_TOTAL: &str = "medallion_drift_detected_total";
/// Entities in a stage's merge state on this worker's disk (about: an entity written twice counts
/// twice until the store compacts it), by stage.
pub const STATE_ENTITIES: &str = "medallion_state_entities";
/// Events that arrived after their window closed, by stage.
pub const LATE_EVENTS_TOTAL: &str = "medallion_late_events_total";
/// Windows open in gold, by stage.
pub const OPEN_WINDOWS: &str = "medallion_open_windows";
/// Windows emitted by gold, by stage.
pub const WINDOWS_EMITTED_TOTAL: &str = "medallion_windows_emitted_total";
/// Alerts fired, by rule and severity.
pub const ALERTS_TOTAL: &str = "medallion_alerts_fired_total";
/// Alerts held back by a rule's suppression window, by rule.
pub const ALERTS_SUPPRESSED_TOTAL: &str = "medallion_alerts_suppressed_total";
/// Version of the rule set in force.
pub const RULES_VERSION: &str = "medallion_rules_version";
/// Rule-set updates, by outcome (applied|rejected).
pub const RULE_UPDATES_TOTAL: &str = "medallion_rule_updates_total";

/// Notifications by channel and outcome (delivered|dead_lettered|skipped|unrouted).
pub const NOTIFICATIONS_TOTAL: &str = "medallion_notifications_total";
/// Duration of one webhook attempt, by channel.
pub const NOTIFICATION_ATTEMPT_SECONDS: &str = "medallion_notification_attempt_seconds";
/// Notifications queued or retrying, by stage.
pub const NOTIFICATIONS_IN_FLIGHT: &str = "medallion_notifications_in_flight";
/// Rows written to the audit store.
pub const AUDIT_ROWS_WRITTEN_TOTAL: &str = "medallion_audit_rows_written_total";
/// Parquet files written to the audit store.
pub const AUDIT_FILES_WRITTEN_TOTAL: &str = "medallion_audit_files_written_total";
/// Personal-data fields encrypted before leaving bronze, by key id.
pub const PII_FIELDS_ENCRYPTED_TOTAL: &str = "medallion_pii_fields_encrypted_total";
/// 1 while a stage waits for infrastructure every record needs (the registry), by stage.
pub const CONSUMPTION_PAUSED: &str = "medallion_consumption_paused";
/// Errors the consumer reported and the worker survived (fetch, metadata), by stage and error.
pub const CONSUMER_ERRORS_TOTAL: &str = "medallion_consumer_errors_total";
/// Records read and waiting for a batch, by stage and partition (the fair scheduler's queues).
pub const FAIR_QUEUED_RECORDS: &str = "medallion_fair_queued_records";
/// Orgs whose records the head of a partition passes over (their queue is full; a catch-up
/// reader brings them at their share), by stage and partition.
pub const FAIR_ORGS_PASSED_OVER: &str = "medallion_fair_orgs_passed_over";
/// Records queued for an org that is passed over, by stage and org: only such orgs are
/// named (0 once it caught up), so it appears only once an org was read past (not in [`ALL`]).
pub const FAIR_ORG_QUEUED_RECORDS: &str = "medallion_fair_org_queued_records";
/// Offsets between a partition's lowest record not done and where its head reads, by stage
/// and partition: how far the worker went past a backlog.
pub const FAIR_SKIP_AHEAD: &str = "medallion_fair_skip_ahead";
/// Records between where a partition's head reads and the partition's end as its last fetch
/// saw it, by stage and partition: how far the worker is from records just written by orgs
/// it does not read past (while over 32,768, the catch-up reader waits for the head).
pub const FAIR_HEAD_BEHIND: &str = "medallion_fair_head_behind_records";
/// Records passed over at a restart because the committed progress says they were done.
pub const FAIR_PASSED_DONE_TOTAL: &str = "medallion_fair_passed_done_total";
/// Records the fair scheduler put into batches, by stage and org: an org is named while it is
/// passed over (as in [`FAIR_ORG_QUEUED_RECORDS`]), every other org counts as `other`, so the
/// share a flooding org gets is its rate over the sum.
pub const FAIR_SCHEDULED_RECORDS_TOTAL: &str = "medallion_fair_scheduled_records_total";

/// Client connections open on a realtime-gateway replica, by org (the first 100 orgs a replica
/// sees are named, the rest count as `other`).
pub const GATEWAY_CONNECTIONS: &str = "medallion_gateway_connections";
/// Messages written to gateway clients, by event type.
pub const GATEWAY_MESSAGES_SENT_TOTAL: &str = "medallion_gateway_messages_sent_total";
/// Messages a slow gateway client did not get as such, by event type and outcome: `replaced`
/// by a newer one of the same key, or `dropped` to make room.
pub const GATEWAY_COALESCED_TOTAL: &str = "medallion_gateway_messages_coalesced_total";
/// Gateway clients disconnected because they fell behind on a never-dropped event type.
pub const GATEWAY_SLOW_DISCONNECTS_TOTAL: &str = "medallion_gateway_slow_disconnects_total";
/// Connections refused by the gateway's authentication, by reason.
pub const GATEWAY_AUTH_FAILURES_TOTAL: &str = "medallion_gateway_auth_failures_total";
/// Streams opened with a resume id, by outcome (resumed, gap, refused, failed).
pub const GATEWAY_RESUMES_TOTAL: &str = "medallion_gateway_resumes_total";
/// Records read back from Kafka for resuming clients.
pub const GATEWAY_RESUME_RECORDS_TOTAL: &str = "medallion_gateway_resume_records_total";
/// Kafka timestamp of a record → its message handed to the client's connection.
pub const GATEWAY_DELIVERY_SECONDS: &str = "medallion_gateway_delivery_latency_seconds";
/// Records of the feed topics the gateway could not decode (skipped), by topic.
pub const GATEWAY_UNDECODABLE_TOTAL: &str = "medallion_gateway_undecodable_records_total";

/// Every name above.
pub const ALL: [&str; 48] = [
    KAFKA_CONSUMER_LAG,
    KAFKA_MESSAGES_IN_TOTAL,
    KAFKA_BYTES_IN_TOTAL,
    SCHEMA_REGISTRY_SCHEMAS_TOTAL,
    RECORDS_OUT_TOTAL,
    DLQ_RECORDS_TOTAL,
    DUPLICATES_TOTAL,
    REPLAYED_RECORDS_TOTAL,
    RETRIES_TOTAL,
    BATCH_DURATION_SECONDS,
    EVENT_LATENCY_SECONDS,
    DEDUP_WINDOW_EVENTS,
    DEDUP_WINDOW_BYTES,
    WORKER_READY,
    WORKER_DEGRADED,
    EXPECTATION_RESULTS_TOTAL,
    DRIFT_TOTAL,
    STATE_ENTITIES,
    LATE_EVENTS_TOTAL,
    OPEN_WINDOWS,
    WINDOWS_EMITTED_TOTAL,
    ALERTS_TOTAL,
    ALERTS_SUPPRESSED_TOTAL,
    RULES_VERSION,
    RULE_UPDATES_TOTAL,
    NOTIFICATIONS_TOTAL,
    NOTIFICATION_ATTEMPT_SECONDS,
    NOTIFICATIONS_IN_FLIGHT,
    AUDIT_ROWS_WRITTEN_TOTAL,
    AUDIT_FILES_WRITTEN_TOTAL,
    PII_FIELDS_ENCRYPTED_TOTAL,
    CONSUMPTION_PAUSED,
    CONSUMER_ERRORS_TOTAL,
    FAIR_QUEUED_RECORDS,
    FAIR_ORGS_PASSED_OVER,
    FAIR_SKIP_AHEAD,
    FAIR_HEAD_BEHIND,
    FAIR_PASSED_DONE_TOTAL,
    FAIR_SCHEDULED_RECORDS_TOTAL,
    GATEWAY_CONNECTIONS,
    GATEWAY_MESSAGES_SENT_TOTAL,
    GATEWAY_COALESCED_TOTAL,
    GATEWAY_SLOW_DISCONNECTS_TOTAL,
    GATEWAY_AUTH_FAILURES_TOTAL,
    GATEWAY_RESUMES_TOTAL,
    GATEWAY_RESUME_RECORDS_TOTAL,
    GATEWAY_DELIVERY_SECONDS,
    GATEWAY_UNDECODABLE_TOTAL,
];

/// The counters above: exported at 0 from the start, so every name is scrapeable and `rate()`
/// sees the first increment.
pub const COUNTERS: [&str; 21] = [
    CONSUMER_ERRORS_TOTAL,
    KAFKA_MESSAGES_IN_TOTAL,
    KAFKA_BYTES_IN_TOTAL,
    RECORDS_OUT_TOTAL,
    DLQ_RECORDS_TOTAL,
    DUPLICATES_TOTAL,
    REPLAYED_RECORDS_TOTAL,
    RETRIES_TOTAL,
    EXPECTATION_RESULTS_TOTAL,
    DRIFT_TOTAL,
    LATE_EVENTS_TOTAL,
    WINDOWS_EMITTED_TOTAL,
    ALERTS_TOTAL,
    ALERTS_SUPPRESSED_TOTAL,
    RULE_UPDATES_TOTAL,
    NOTIFICATIONS_TOTAL,
    AUDIT_ROWS_WRITTEN_TOTAL,
    AUDIT_FILES_WRITTEN_TOTAL,
    PII_FIELDS_ENCRYPTED_TOTAL,
    FAIR_PASSED_DONE_TOTAL,
    FAIR_SCHEDULED_RECORDS_TOTAL,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a host process); ours still renders.
            if metrics::set_global_recorder(recorder).is_ok() {
                for name in COUNTERS {
                    metrics::counter!(name).absolute(0);
                }
            }
            handle
        })
        .clone()
}
