//! notification-sender (`rules.alerts.triggered` → webhooks and log lines): routes each alert
//! by org and severity to the configured channels and delivers to every channel on its own,
//! so a slow or dead endpoint only delays its own alerts. The runtime commits an alert's
//! offset once every channel has it or it is dead-lettered; a delivery ledger (a compacted
//! changelog, kept in the local state store) keeps a restart from notifying a healthy endpoint
//! twice.

mod channel;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use medallion_contracts::columnar::BatchEncoder;
use medallion_runtime::audit::AuditAction;
use medallion_runtime::error::{RecordFailure, SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::retry::RetryPolicy;
use medallion_runtime::state::{KeyedState, StateValue};
use medallion_runtime::worker::{meta, Collector, Resolved, SideRecord, Stage, StageSetup};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;

pub use crate::rules::Severity;
pub use channel::{classify, dlq_header, header, signature, Attempt, Channel, Outcome, Webhook};

/// The consumer group, and so the binary's name.
pub const GROUP: &str = "notification-sender";

/// notification-sender's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Channels by name.
    pub channels: BTreeMap<String, ChannelConfig>,
    /// Every route an alert matches adds its channels.
    pub routes: Vec<Route>,
    /// How long a shutdown waits for deliveries in flight; the rest is redelivered later.
    pub shutdown_grace_ms: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            channels: [("log".to_string(), ChannelConfig::Log)].into(),
            routes: vec![Route {
                orgs: Vec::new(),
                min_severity: None,
                channels: vec!["log".into()],
            }],
            shutdown_grace_ms: 10_000,
        }
    }
}

/// One channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChannelConfig {
    /// HTTP POST of the alert as JSON, signed with HMAC-SHA256.
    Webhook {
        url: String,
        /// The signing secret itself (prefer `secret_env`).
        #[serde(default)]
        secret: Option<String>,
        /// The environment variable holding the signing secret.
        #[serde(default)]
        secret_env: Option<String>,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Requests in flight to this endpoint at once.
        #[serde(default = "default_max_in_flight")]
        max_in_flight: usize,
    },
    /// A structured log line per alert (target `medallion::notifications`).
    Log,
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn default_max_in_flight() -> usize {
    8
}

/// Alerts of these orgs (all when empty) at or above this severity go to these channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default)]
    pub orgs: Vec<i64>,
    #[serde(default)]
    pub min_severity: Option<Severity>,
    pub channels: Vec<String>,
}

impl NotifyConfig {
    /// The channels of an alert of `org` at `severity`, in configuration order, each once.
    pub fn channels_for(&self, org: i64, severity: Option<Severity>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for route in &self.routes {
            let org_ok = route.orgs.is_empty() || route.orgs.contains(&org);
            let severity_ok = match (route.min_severity, severity) {
                (None, _) => true,
                (Some(min), Some(s)) => s >= min,
                (Some(_), None) => false,
            };
            if org_ok && severity_ok {
                for channel in &route.channels {
                    if !out.contains(channel) {
                        out.push(channel.clone());
                    }
                }
            }
        }
        out
    }

    /// Checks names, URLs and secrets; an error names the channel or route at fault.
    fn build_channels(&self) -> Result<HashMap<String, Arc<Channel>>, SetupError> {
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| SetupError::config("stage.channels", format!("HTTP client: {e}")))?;
        let mut out = HashMap::new();
        for (name, config) in &self.channels {
            let channel = match config {
                ChannelConfig::Log => Channel::Log,
                ChannelConfig::Webhook {
                    url,
                    secret,
                    secret_env,
                    timeout_ms,
                    max_in_flight,
                } => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(SetupError::config(
                            format!("stage.channels.{name}.url"),
                            format!("`{url}` must start with http:// or https://"),
                        ));
                    }
                    let secret = match (secret, secret_env) {
                        (Some(s), None) if !s.is_empty() => s.clone(),
                        (None, Some(var)) => std::env::var(var)
                            .ok()
                            .filter(|s| !s.is_empty())
                            .ok_or_else(|| {
                                SetupError::config(
                                    format!("stage.channels.{name}.secret_env"),
                                    format!("environment variable {var} is not set"),
                                )
                            })?,
                        _ => {
                            return Err(SetupError::config(
                                format!("stage.channels.{name}"),
                                "a webhook needs exactly one of `secret` or `secret_env`",
                            ))
                        }
                    };
                    if *max_in_flight == 0 || *timeout_ms == 0 {
                        return Err(SetupError::config(
                            format!("stage.channels.{name}"),
                            "timeout_ms and max_in_flight must be at least 1",
                        ));
                    }
                    Channel::Webhook(Webhook {
                        name: name.clone(),
                        url: url.clone(),
                        secret: secret.into_bytes(),
                        timeout: Duration::from_millis(*timeout_ms),
                        slots: tokio::sync::Semaphore::new(*max_in_flight),
                        client: client.clone(),
                    })
                }
            };
            out.insert(name.clone(), Arc::new(channel));
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("stage.routes[{i}]");
            if route.channels.is_empty() {
                return Err(SetupError::config(key, "names no channel"));
            }
            if let Some(unknown) = route.channels.iter().find(|c| !out.contains_key(*c)) {
                return Err(SetupError::config(
                    key,
                    format!("channel `{unknown}` is not declared under stage.channels"),
                ));
            }
        }
        Ok(out)
    }
}

/// The webhook body of a `restricted` alert: identifiers and severity only.
pub fn redact(alert: &Json) -> Json {
    let p = &alert["payload"];
    json!({
        "event_id": alert["event_id"],
        "event_type": alert["event_type"],
        "timestamp": alert["timestamp"],
        "org_id": alert["org_id"],
        "classification": alert["classification"],
        "redacted": true,
        "payload": {
            "rule_id": p["rule_id"],
            "severity": p["severity"],
            "window_start": p["window_start"],
            "window_end": p["window_end"],
        },
    })
}

/// Ledger key of one (alert, channel) delivery.
fn ledger_key(event_id: &str, channel: &str) -> String {
    format!("{event_id}|{channel}")
}

/// What the ledger knows of one (alert, channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Delivered,
    /// Dead-lettered from the record at this offset: a redriven copy (another offset) is
    /// delivered again; a redelivery of the same record is not.
    DeadLettered(i64),
}

impl StateValue for Entry {
    fn encode(&self) -> Vec<u8> {
        match self {
            Entry::Delivered => b"delivered".to_vec(),
            Entry::DeadLettered(offset) => format!("dead@{offset}").into_bytes(),
        }
    }

    fn decode(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        if text == "delivered" {
            return Some(Entry::Delivered);
        }
        text.strip_prefix("dead@")?
            .parse()
            .ok()
            .map(Entry::DeadLettered)
    }
}

/// One finished delivery, from its task.
#[derive(Debug)]
struct Done {
    partition: i32,
    offset: i64,
    event_id: String,
    channel: String,
    outcome: Outcome,
}

/// An alert with deliveries still running.
#[derive(Debug, Default)]
struct Pending {
    remaining: usize,
    failures: Vec<(RecordFailure, usize)>,
    tasks: Vec<tokio::task::AbortHandle>,
}

/// The stage.
pub struct Notify {
    config: NotifyConfig,
    channels: HashMap<String, Arc<Channel>>,
    policy: RetryPolicy,
    /// Frames an alert row back to its contract, to render it as JSON.
    alert_encoder: BatchEncoder,
    alert_schema: apache_avro::Schema,
    alert_columns: usize,
    audit: medallion_runtime::audit::AuditEncoder,
    ledger_topic: String,
    /// What was delivered or dead-lettered, per (alert, channel): the state store's copy of
    /// the ledger changelog.
    ledger: KeyedState<Entry>,
    pending: BTreeMap<(i32, i64), Pending>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl Notify {
    /// Checks the channels and routes and registers the audit schema.
    pub async fn new(setup: StageSetup, config: NotifyConfig) -> Result<Self, SetupError> {
        let audit = setup.audit_encoder().await?;
        Self::with_audit(setup, config, audit)
    }

    /// Builds the stage with the `audit.events` encoder already at hand.
    pub fn with_audit(
        setup: StageSetup,
        config: NotifyConfig,
        audit: medallion_runtime::audit::AuditEncoder,
    ) -> Result<Self, SetupError> {
        let channels = config.build_channels()?;
        let contract = setup
            .topics
            .topic(&setup.input_topic)
            .and_then(|t| setup.contracts.get(&t.schema))
            .ok_or_else(|| SetupError::contracts(format!("no contract for {}", setup.input_topic)))?
            .clone();
        let alert_columns = setup
            .input_schema
            .fields()
            .iter()
            .position(|f| f.name() == meta::KEY)
            .ok_or_else(|| {
                SetupError::schema(&setup.input_topic, "input schema without meta columns")
            })?;
        let decoded_schema = Arc::new(
            setup
                .input_schema
                .project(&(0..alert_columns).collect::<Vec<_>>())
                .map_err(|e| SetupError::schema(&setup.input_topic, e))?,
        );
        let alert_encoder = BatchEncoder::new(&decoded_schema, &contract.text, 0)
            .map_err(|e| SetupError::schema(&setup.input_topic, e))?;
        let ledger_topic = setup
            .topics
            .changelog_of(GROUP)
            .ok_or_else(|| {
                SetupError::contracts(
                    "topic-config.yaml declares no changelog for notification-sender",
                )
            })?
            .to_string();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Self {
            config,
            channels,
            policy: setup.retry.clone(),
            alert_encoder,
            alert_schema: contract.schema.clone(),
            alert_columns,
            audit,
            ledger: KeyedState::new(
                setup.open_store()?,
                setup.kafka.clone(),
                ledger_topic.clone(),
                &setup.state,
            ),
            ledger_topic,
            pending: BTreeMap::new(),
            done_tx,
            done_rx,
        })
    }

    /// The alerts of `input` as JSON events of their contract.
    fn alerts(&mut self, input: &RecordBatch) -> Result<Vec<Json>, StageError> {
        let columns = (0..self.alert_columns).collect::<Vec<_>>();
        let decoded = input.project(&columns)?;
        let framed = self
            .alert_encoder
            .encode(&decoded)
            .map_err(|e| StageError::Encode(e.to_string()))?;
        framed
            .iter()
            .map(|m| {
                medallion_contracts::json::from_avro_binary(
                    m.get(5..).unwrap_or_default(),
                    &self.alert_schema,
                    &self.alert_schema,
                )
                .map_err(|e| StageError::Transform(format!("alert to JSON: {e}")))
            })
            .collect()
    }

    fn redaction_audit(&self, alert: &Json, channels: &[String]) -> Result<SideRecord, StageError> {
        let event_id = alert["event_id"].as_str().unwrap_or_default();
        let org_id = alert["org_id"].as_i64().unwrap_or_default();
        let action = AuditAction {
            event_id: medallion_runtime::ids::stable_id(&["notification.redacted", event_id]),
            action: "notification.redacted".into(),
            actor: GROUP.into(),
            org_id,
            correlation_id: alert["correlation_id"].as_str().unwrap_or_default().into(),
            trace_id: alert["trace_id"].as_str().map(str::to_string),
            resource_type: "alert".into(),
            resource_id: event_id.into(),
            outcome: "redacted".into(),
            reason: Some(
                "classification restricted: only identifiers and severity leave the pipeline"
                    .into(),
            ),
            subjects: Vec::new(),
            details: [
                ("channels".to_string(), channels.join(",")),
                (
                    "rule_id".to_string(),
                    alert["payload"]["rule_id"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                ),
            ]
            .into_iter()
            .collect(),
        };
        Ok(self
            .audit
            .record(&action, medallion_runtime::clock::now_ms()))
    }

    /// Folds finished deliveries into their alerts; alerts with every channel done resolve.
    fn collect(&mut self, done: Done, out: &mut Collector) -> Result<(), StageError> {
        let key = (done.partition, done.offset);
        let entry = match &done.outcome {
            Outcome::Delivered { .. } => Entry::Delivered,
            Outcome::Failed { .. } => Entry::DeadLettered(done.offset),
        };
        let outcome = match entry {
            Entry::Delivered => "delivered",
            Entry::DeadLettered(_) => "dead_lettered",
        };
        metrics::counter!(m::NOTIFICATIONS_TOTAL, "channel" => done.channel.clone(), "outcome" => outcome).increment(1);
        let ledger_key = ledger_key(&done.event_id, &done.channel);
        out.side(medallion_runtime::changelog::update(
            &self.ledger_topic,
            done.partition,
            ledger_key.as_bytes(),
            entry.encode(),
        ));
        // A delivery that finishes after its partition was revoked: its record is read again
        // by the next owner, which finds this ledger update in the changelog.
        if self.ledger.is_assigned(done.partition) {
            self.ledger
                .put(done.partition, ledger_key.as_bytes(), entry)?;
        }
        let Some(pending) = self.pending.get_mut(&key) else {
            return Ok(());
        };
        if let Outcome::Failed { failure, attempts } = done.outcome {
            pending.failures.push((failure, attempts));
        }
        pending.remaining = pending.remaining.saturating_sub(1);
        if pending.remaining == 0 {
            if let Some(pending) = self.pending.remove(&key) {
                out.resolve(resolve(key, pending.failures));
            }
        }
        Ok(())
    }
}

/// One resolution per alert: several failed channels make one dead letter naming them all.
fn resolve((partition, offset): (i32, i64), mut failures: Vec<(RecordFailure, usize)>) -> Resolved {
    let attempts = failures.iter().map(|(_, a)| *a).max().unwrap_or(1);
    let failure = if failures.len() > 1 {
        let channels: Vec<String> = failures
            .iter()
            .flat_map(|(f, _)| {
                f.headers
                    .iter()
                    .filter(|(k, _)| k == dlq_header::CHANNEL)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        let message = failures
            .iter()
            .map(|(f, _)| f.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let (mut first, _) = failures.swap_remove(0);
        first.message = message;
        first.headers.retain(|(k, _)| k != dlq_header::CHANNEL);
        Some(first.with_header(dlq_header::CHANNEL, &channels.join(",")))
    } else {
        failures.pop().map(|(f, _)| f)
    };
    Resolved {
        partition,
        offset,
        failure,
        attempts,
    }
}

impl Stage for Notify {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let alerts = self.alerts(&input)?;
        let partitions = input
            .column_by_name(meta::PARTITION)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<arrow::array::Int32Array>()
                    .cloned()
            })
            .ok_or_else(|| StageError::Transform("no partition column".into()))?;
        let offsets = input
            .column_by_name(meta::OFFSET)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .cloned()
            })
            .ok_or_else(|| StageError::Transform("no offset column".into()))?;
        for (row, alert) in alerts.iter().enumerate() {
            let (partition, offset) = (partitions.value(row), offsets.value(row));
            let event_id = alert["event_id"].as_str().unwrap_or_default().to_string();
            let org = alert["org_id"].as_i64().unwrap_or_default();
            let severity = alert["payload"]["severity"]
                .as_str()
                .and_then(Severity::parse);
            let routed = self.config.channels_for(org, severity);
            if routed.is_empty() {
                metrics::counter!(m::NOTIFICATIONS_TOTAL, "channel" => "", "outcome" => "unrouted")
                    .increment(1);
                tracing::warn!(event_id, org, "alert matches no route");
                continue;
            }
            let restricted = alert["classification"].as_str() == Some("restricted");
            let body_json = if restricted {
                out.side(self.redaction_audit(alert, &routed)?);
                redact(alert)
            } else {
                alert.clone()
            };
            let body = Arc::new(
                serde_json::to_vec(&body_json).map_err(|e| StageError::Encode(e.to_string()))?,
            );
            let mut pending = Pending::default();
            for name in &routed {
                let known = self
                    .ledger
                    .get(partition, ledger_key(&event_id, name).as_bytes())?;
                let skip = match known {
                    Some(Entry::Delivered) => true,
                    Some(Entry::DeadLettered(at)) => at == offset,
                    None => false,
                };
                if skip {
                    metrics::counter!(m::NOTIFICATIONS_TOTAL, "channel" => name.clone(), "outcome" => "skipped").increment(1);
                    continue;
                }
                let Some(channel) = self.channels.get(name).cloned() else {
                    continue;
                };
                if let Channel::Log = channel.as_ref() {
                    tracing::info!(target: "medallion::notifications", channel = %name, event_id, org, severity = ?severity, body = %body_json, "alert");
                    metrics::counter!(m::NOTIFICATIONS_TOTAL, "channel" => name.clone(), "outcome" => "delivered").increment(1);
                    continue;
                }
                let tx = self.done_tx.clone();
                let policy = self.policy.clone();
                let body = body.clone();
                let (event, channel_name) = (event_id.clone(), name.clone());
                let task = tokio::spawn(async move {
                    let outcome = channel::deliver(channel, GROUP, &event, body, &policy).await;
                    let _ = tx.send(Done {
                        partition,
                        offset,
                        event_id: event,
                        channel: channel_name,
                        outcome,
                    });
                });
                pending.tasks.push(task.abort_handle());
                pending.remaining += 1;
            }
            if pending.remaining > 0 {
                self.pending.insert((partition, offset), pending);
                out.defer(row as u32);
            }
        }
        metrics::gauge!(m::NOTIFICATIONS_IN_FLIGHT, "stage" => GROUP)
            .set(self.pending.len() as f64);
        Ok(())
    }

    async fn assign(
        &mut self,
        partition: i32,
        _committed_metadata: Option<String>,
    ) -> Result<(), StageError> {
        self.ledger.assign(partition).await?;
        Ok(())
    }

    async fn assign_all(
        &mut self,
        assigned: Vec<(i32, Option<String>)>,
    ) -> Result<(), (i32, StageError)> {
        let partitions: Vec<i32> = assigned.iter().map(|(p, _)| *p).collect();
        self.ledger.assign_all(&partitions).await.map(|_| ())
    }

    fn revoke(&mut self, partition: i32) {
        self.ledger.revoke(partition);
        let gone: Vec<(i32, i64)> = self
            .pending
            .range((partition, i64::MIN)..=(partition, i64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            if let Some(pending) = self.pending.remove(&key) {
                pending
                    .tasks
                    .iter()
                    .for_each(tokio::task::AbortHandle::abort);
            }
        }
    }

    async fn settle(&mut self, closing: bool, out: &mut Collector) -> Result<(), StageError> {
        while let Ok(done) = self.done_rx.try_recv() {
            self.collect(done, out)?;
        }
        if closing && !self.pending.is_empty() {
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(self.config.shutdown_grace_ms);
            while !self.pending.is_empty() {
                match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                    Ok(Some(done)) => self.collect(done, out)?,
                    _ => break,
                }
            }
            // What is still retrying is read again after the restart; the ledger skips
            // the channels that already have it.
            for pending in std::mem::take(&mut self.pending).into_values() {
                pending
                    .tasks
                    .iter()
                    .for_each(tokio::task::AbortHandle::abort);
            }
        }
        self.ledger.after_batch()?;
        metrics::gauge!(m::NOTIFICATIONS_IN_FLIGHT, "stage" => GROUP)
            .set(self.pending.len() as f64);
        Ok(())
    }
}
