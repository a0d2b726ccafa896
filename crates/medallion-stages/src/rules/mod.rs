//! rule-evaluator (`gold.data.ready` → `rules.alerts.triggered`): rules are data. Each rule is
//! an SQL predicate over gold records with a severity, an optional org scope and a suppression
//! window (no second alert for the same rule and org within it, in event time). The rule set
//! comes from a file at start-up and from `config.changes` records with `target: rules` while
//! running: every replica reads that topic in full. An update that fails validation is
//! rejected with the failing rule named and the previous set keeps running; a valid update
//! takes effect at the next batch, without a restart.
//!
//! Columns a rule sees: `org_id`, `metric`, `window_start`, `window_end` (epoch ms), `count`,
//! `sum`, `min`, `max`, `avg`, `distinct_entities`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use medallion_contracts::registry::RegistryClient;
use medallion_runtime::envelope::Envelope;
use medallion_runtime::error::{SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::worker::{Collector, OutputEvent, Stage, StageSetup};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::plan::{number_rows, struct_access, with_row_column, BatchPlan, ROW};

mod changes;
#[cfg(test)]
mod tests;

/// The consumer group, and so the binary's name.
pub const GROUP: &str = "rule-evaluator";
/// `config.changes` records for this stage carry this target.
pub const TARGET: &str = "rules";

/// `rules/alerts.avsc` severities, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
            Severity::Critical => "CRITICAL",
        }
    }

    /// The severity named `text` (as in the alert contract).
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Low, Self::Medium, Self::High, Self::Critical]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub description: String,
    /// SQL boolean over a gold record, e.g. `metric = 'events.case' AND count >= 10`.
    pub predicate: String,
    pub severity: Severity,
    /// Only this org's records, when set.
    #[serde(default)]
    pub org_id: Option<i64>,
    /// No repeat alert for the same rule and org within this many ms of event time.
    #[serde(default)]
    pub suppression_ms: i64,
    /// The observed value reported in the alert (SQL numeric expression).
    #[serde(default = "default_observe")]
    pub observe: String,
    /// The threshold the rule compares against, for the alert's reader.
    #[serde(default)]
    pub threshold: Option<f64>,
}

fn default_observe() -> String {
    "sum".into()
}

/// A rule-set document (the rules file, or a `config.changes` document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

/// rule-evaluator's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// A YAML rule-set file read at start-up; relative paths are under the contracts home.
    pub rules_file: Option<PathBuf>,
    /// Rules given inline (used when no file is named).
    pub rules: Vec<Rule>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            rules_file: Some(PathBuf::from("rules/default.yaml")),
            rules: Vec::new(),
        }
    }
}

/// The gold record, flattened for rules.
fn flat_sql() -> String {
    struct_access(
        r#"SELECT "_row", org_id, payload['metric'] AS metric,
  CAST(payload['window_start'] AS BIGINT) AS window_start,
  CAST(payload['window_end'] AS BIGINT) AS window_end,
  payload['count'] AS count, payload['sum'] AS sum, payload['min'] AS min,
  payload['max'] AS max, payload['avg'] AS avg,
  payload['distinct_entities'] AS distinct_entities
FROM input"#,
    )
}

fn rules_sql(rules: &[Rule]) -> String {
    let mut select = vec![
        "\"_row\"".to_string(),
        "org_id".into(),
        "metric".into(),
        "window_start".into(),
        "window_end".into(),
    ];
    for (i, rule) in rules.iter().enumerate() {
        let scope = rule
            .org_id
            .map_or_else(|| "TRUE".to_string(), |org| format!("org_id = {org}"));
        select.push(format!(
            "coalesce(({scope}) AND ({}), false) AS \"_match_{i}\"",
            rule.predicate
        ));
        select.push(format!(
            "CAST(({}) AS DOUBLE) AS \"_value_{i}\"",
            rule.observe
        ));
    }
    format!(
        "WITH gold AS ({}) SELECT {} FROM gold",
        flat_sql(),
        select.join(", ")
    )
}

/// A validated rule set with its plan.
pub struct Compiled {
    pub version: i64,
    pub rules: Vec<Rule>,
    plan: BatchPlan,
}

/// Why a rule set was refused (at start-up, or as an update that leaves the current set in
/// force). Names the rule at fault.
#[derive(Debug, thiserror::Error)]
pub enum RuleSetError {
    #[error("rule set: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("rule {rule}: {message}")]
    Rule { rule: String, message: String },
    #[error("rule set: {0}")]
    Plan(Box<datafusion::error::DataFusionError>),
    #[error("rule set version {version} is not newer than {current}")]
    NotNewer { version: i64, current: i64 },
}

/// Validates `set` over `plan_input`; the error names the first failing rule.
pub async fn compile(
    set: RuleSet,
    version: i64,
    plan_input: SchemaRef,
) -> Result<Compiled, RuleSetError> {
    for (i, rule) in set.rules.iter().enumerate() {
        let name = if rule.id.trim().is_empty() {
            format!("#{}", i + 1)
        } else {
            format!("`{}`", rule.id)
        };
        let refused = |message: String| RuleSetError::Rule {
            rule: name.clone(),
            message,
        };
        if rule.id.trim().is_empty() || set.rules[..i].iter().any(|r| r.id == rule.id) {
            return Err(refused("needs a unique, non-empty id".into()));
        }
        if rule.suppression_ms < 0 {
            return Err(refused("suppression_ms must be >= 0".into()));
        }
        let plan = BatchPlan::new(&rules_sql(std::slice::from_ref(rule)), plan_input.clone())
            .await
            .map_err(|e| refused(e.to_string()))?;
        let schema = plan.output_schema();
        let predicate = schema
            .field_with_name("_match_0")
            .map_err(|e| refused(e.to_string()))?;
        if predicate.data_type() != &DataType::Boolean {
            return Err(refused("the predicate must be boolean".into()));
        }
    }
    let plan = BatchPlan::new(&rules_sql(&set.rules), plan_input)
        .await
        .map_err(|e| RuleSetError::Plan(Box::new(e)))?;
    Ok(Compiled {
        version,
        rules: set.rules,
        plan,
    })
}

/// Parses a rule-set document (YAML is a superset of JSON).
pub fn parse(document: &str) -> Result<RuleSet, RuleSetError> {
    Ok(serde_yaml_ng::from_str(document)?)
}

/// The rule-evaluator stage.
pub struct Rules {
    current: Compiled,
    /// The next rule set, validated by the `config.changes` reader.
    pending: Arc<Mutex<Option<Compiled>>>,
    plan_input: SchemaRef,
    /// (rule id, org) → window start of the last alert.
    last_alert: HashMap<(String, i64), i64>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Rules {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

impl Rules {
    /// Loads and validates the start-up rules, registers the output schema, and starts reading
    /// `config.changes`.
    pub async fn new(setup: StageSetup, config: RulesConfig) -> Result<Self, SetupError> {
        let mut stage = Self::offline(&setup, config).await?;
        let topic = setup
            .topics
            .consumer_groups
            .get(&setup.group)
            .and_then(|g| g.broadcast.first())
            .cloned()
            .ok_or_else(|| {
                SetupError::contracts(format!(
                    "{} has no broadcast topic for rule updates",
                    setup.group
                ))
            })?;
        let reader_schema = setup
            .topics
            .topic(&topic)
            .and_then(|t| setup.contracts.get(&t.schema))
            .map(|c| c.schema.clone())
            .ok_or_else(|| SetupError::contracts(format!("no schema for {topic}")))?;
        let reader = changes::Reader {
            kafka: setup.kafka.clone(),
            topic,
            registry: setup.registry.clone(),
            reader_schema,
            plan_input: stage.plan_input.clone(),
            pending: stage.pending.clone(),
            applied_version: stage.current.version,
        };
        stage.reader = Some(tokio::spawn(reader.run()));
        Ok(stage)
    }

    /// Everything but the `config.changes` reader (for tests that feed updates directly).
    pub async fn offline(setup: &StageSetup, config: RulesConfig) -> Result<Self, SetupError> {
        let set = match &config.rules_file {
            Some(path) => {
                let path = if path.is_absolute() {
                    path.clone()
                } else {
                    setup.home.join(path)
                };
                let key = format!("stage.rules_file {}", path.display());
                let text =
                    std::fs::read_to_string(&path).map_err(|e| SetupError::config(&key, e))?;
                parse(&text).map_err(|e| SetupError::config(&key, e))?
            }
            None => RuleSet {
                rules: config.rules.clone(),
            },
        };
        let plan_input = with_row_column(&setup.input_schema);
        let current = compile(set, 0, plan_input.clone())
            .await
            .map_err(|e| SetupError::config("stage.rules", e))?;
        metrics::gauge!(m::RULES_VERSION, "stage" => GROUP).set(0.0);
        Ok(Self {
            current,
            pending: Arc::new(Mutex::new(None)),
            plan_input,
            last_alert: HashMap::new(),
            reader: None,
        })
    }

    /// Offers a rule-set update as `config.changes` would (validated; rejected sets are named
    /// in the error and leave the current set in force).
    pub async fn offer(&self, document: &str, version: i64) -> Result<(), RuleSetError> {
        changes::offer(
            &self.pending,
            &self.plan_input,
            document,
            version,
            self.current.version,
        )
        .await
    }

    pub fn version(&self) -> i64 {
        self.current.version
    }

    fn alerts(
        &mut self,
        results: &[RecordBatch],
        input: &RecordBatch,
    ) -> Result<Vec<OutputEvent>, StageError> {
        let text = |name: &str| -> Result<arrow::array::StringArray, StageError> {
            let c = input
                .column_by_name(name)
                .ok_or_else(|| StageError::Transform(format!("no column {name}")))?;
            Ok(arrow::compute::cast(c, &DataType::Utf8)?
                .as_string::<i32>()
                .clone())
        };
        let (event_id, correlation_id, trace_id, classification) = (
            text("event_id")?,
            text("correlation_id")?,
            text("trace_id")?,
            text("classification")?,
        );
        let mut out = Vec::new();
        for batch in results {
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| StageError::Transform(format!("no column {name}")))
            };
            let rows = col(ROW)?;
            let rows = rows.as_primitive::<arrow::datatypes::UInt32Type>();
            let org = col("org_id")?;
            let org = org.as_primitive::<Int64Type>();
            let metric = arrow::compute::cast(&col("metric")?, &DataType::Utf8)?;
            let metric = metric.as_string::<i32>();
            let start = col("window_start")?;
            let start = start.as_primitive::<Int64Type>();
            let end = col("window_end")?;
            let end = end.as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                let source = rows.value(i) as usize;
                for (r, rule) in self.current.rules.iter().enumerate() {
                    let matched = col(&format!("_match_{r}"))?;
                    if !matched.as_boolean().value(i) {
                        continue;
                    }
                    let value = col(&format!("_value_{r}"))?;
                    let value = value.as_primitive::<Float64Type>();
                    let observed = if value.is_null(i) {
                        f64::NAN
                    } else {
                        value.value(i)
                    };
                    let (org_id, window_start) = (org.value(i), start.value(i));
                    let key = (rule.id.clone(), org_id);
                    if let Some(last) = self.last_alert.get(&key) {
                        if window_start >= *last && window_start < last + rule.suppression_ms {
                            metrics::counter!(m::ALERTS_SUPPRESSED_TOTAL, "rule" => rule.id.clone()).increment(1);
                            continue;
                        }
                    }
                    self.last_alert.insert(key, window_start);
                    metrics::counter!(m::ALERTS_TOTAL, "rule" => rule.id.clone(), "severity" => rule.severity.as_str()).increment(1);
                    let gold_id = event_id.value(source);
                    let id = medallion_runtime::ids::stable_id(&[
                        "alert",
                        &rule.id,
                        &self.current.version.to_string(),
                        gold_id,
                    ]);
                    let message = format!(
                        "[{}] {}: {} = {} for org {} in window {}..{}",
                        rule.severity.as_str(),
                        rule.description,
                        metric.value(i),
                        observed,
                        org_id,
                        window_start,
                        end.value(i)
                    );
                    let event = Envelope {
                        event_id: &id,
                        event_type: "rules.alert.triggered",
                        timestamp: end.value(i),
                        service: GROUP,
                        correlation_id: correlation_id.value(source),
                        org_id,
                        trace_id: (!trace_id.is_null(source)).then(|| trace_id.value(source)),
                        classification: classification.value(source),
                    }
                    .event(json!({
                        "rule_id": rule.id,
                        "rule_version": self.current.version,
                        "description": rule.description,
                        "severity": rule.severity.as_str(),
                        "metric": metric.value(i),
                        "window_start": window_start,
                        "window_end": end.value(i),
                        "observed_value": observed,
                        "threshold": rule.threshold,
                        "message": message,
                        "triggered_by_event_id": gold_id,
                        "suppression_window_ms": rule.suppression_ms,
                    }));
                    out.push(OutputEvent {
                        key: org_id.to_string(),
                        event,
                    });
                }
            }
        }
        Ok(out)
    }
}

impl Stage for Rules {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let next = self.pending.lock().ok().and_then(|mut p| p.take());
        if let Some(next) = next {
            tracing::info!(
                from = self.current.version,
                to = next.version,
                rules = next.rules.len(),
                "rule set updated"
            );
            self.current = next;
        }
        let with_rows = number_rows(&self.plan_input, &input)?;
        let results = if self.current.rules.is_empty() {
            Vec::new()
        } else {
            self.current.plan.run(with_rows).await?
        };
        for OutputEvent { key, event } in self.alerts(&results, &input)? {
            out.emit_event(key, event);
        }
        Ok(())
    }
}

/// Used by the reader to look writer schemas up.
pub(crate) type Registry = Arc<RegistryClient>;
