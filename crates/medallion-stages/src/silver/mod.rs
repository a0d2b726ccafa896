//! silver-processor (`bronze.data.cleaned` → `silver.data.processed`, "clean and validate"):
//! conforms each event to the entity model (`schemas/common/entity.avsc`), applies the
//! data-quality expectations declared in config, and merges per entity with
//! latest-`updated_at`-wins. An update older than the entity's state is passed on
//! as `STALE`, never overwrites the state, and is recorded as drift (counter, log line and an
//! `audit.events` record). The merge state lives in the changelog topic declared in
//! topic-config.yaml and is restored from it when a partition is assigned.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, ListArray, MapArray, RecordBatch, StringArray, StructArray,
    TimestampMillisecondArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Int32Type, Int64Type, SchemaRef};
use medallion_runtime::error::{RecordFailure, SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::worker::{meta, Collector, SideRecord, Stage, StageSetup};
use serde::{Deserialize, Serialize};

use crate::feeds::{self, Conformance};
use crate::plan::{number_rows, struct_access, with_row_column, BatchPlan, ROW};

pub mod owners;
pub mod reconcile;
mod state;
#[cfg(test)]
mod tests;

pub use state::{Change, EntityState, Merge};

/// The consumer group, and so the binary's name.
pub const GROUP: &str = "silver-processor";

/// Rejection reason of an event that maps to no entity.
pub const NO_ENTITY: &str = "no_entity";
/// Rejection reason of an event for an entity id another org owns.
pub const TENANT_MISMATCH: &str = "tenant_mismatch";

/// What a failed expectation does to its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Count it and pass the event on, naming the expectation in `quality_warnings`.
    Warn,
    /// Count it and dead-letter the event with the expectation's name as reason.
    Drop,
    /// Stop the worker without committing the batch (alert through metrics and logs).
    FailBatch,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Warn => "warn",
            Action::Drop => "drop",
            Action::FailBatch => "fail_batch",
        }
    }
}

/// A data-quality expectation: an SQL boolean over the conformed event. Like an SQL CHECK
/// constraint, an event fails only when the expression is false (NULL passes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    pub name: String,
    pub expr: String,
    pub action: Action,
}

/// silver-processor's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SilverConfig {
    /// On equal `updated_at`, an update from this source system wins over the current state.
    pub authoritative_source: String,
    /// A YAML file of expectations (`expectations: [...]`) read at start-up; relative paths are
    /// under the contracts home.
    pub expectations_file: PathBuf,
    /// Expectations given inline: when set, they replace the file's.
    pub expectations: Option<Vec<Expectation>>,
}

impl Default for SilverConfig {
    fn default() -> Self {
        Self {
            // The case system `v4` is the system of record for cases: its updates win ties.
            authoritative_source: "v4".into(),
            expectations_file: PathBuf::from("rules/expectations.yaml"),
            expectations: None,
        }
    }
}

/// An expectations file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectationFile {
    expectations: Vec<Expectation>,
}

impl SilverConfig {
    /// The expectations in force: the inline ones, or those of the file.
    pub fn load_expectations(&self, home: &Path) -> Result<Vec<Expectation>, SetupError> {
        if let Some(inline) = &self.expectations {
            return Ok(inline.clone());
        }
        let path = if self.expectations_file.is_absolute() {
            self.expectations_file.clone()
        } else {
            home.join(&self.expectations_file)
        };
        let key = format!("stage.expectations_file {}", path.display());
        let text = std::fs::read_to_string(&path).map_err(|e| SetupError::config(&key, e))?;
        let file: ExpectationFile =
            serde_yaml_ng::from_str(&text).map_err(|e| SetupError::config(&key, e))?;
        Ok(file.expectations)
    }
}

/// The conformance step as SQL over table `input`: the event plus its entity, attribute and
/// metric columns, from the feed catalog.
fn conform_sql(conformance: &Conformance) -> String {
    format!(
        "SELECT *,\n  payload['source_system'] AS source_system,\n  {}\nFROM input",
        conformance.columns.join(",\n  ")
    )
}

/// The whole transform: conformance, then one boolean column per expectation.
fn sql(conformance: &Conformance, expectations: &[Expectation]) -> String {
    let checks: Vec<String> = expectations
        .iter()
        .enumerate()
        .map(|(i, e)| format!("coalesce(({}), true) AS \"_exp_{i}\"", e.expr))
        .collect();
    let mut select = vec!["*".to_string()];
    select.extend(checks);
    struct_access(&format!(
        "WITH conformed AS ({conform}) SELECT {select} FROM conformed",
        conform = conform_sql(conformance),
        select = select.join(", ")
    ))
}

/// One expectation alone, without the NULL-passes wrapper, to check that it plans and is boolean.
fn check_sql(conformance: &Conformance, expectation: &Expectation) -> String {
    struct_access(&format!(
        "WITH conformed AS ({conform}) SELECT ({expr}) AS \"_check\" FROM conformed",
        conform = conform_sql(conformance),
        expr = expectation.expr
    ))
}

/// What the merge decided for each row of a batch, for the output rows.
struct Merged<'a> {
    /// Whether the row goes on (not dead-lettered).
    keep: Vec<bool>,
    /// Per kept row: the change, the expectations it warned on, its attributes, the source
    /// system of the entity state and the feed's metric samples (column, value).
    changes: Vec<&'static str>,
    warnings: Vec<Vec<String>>,
    attributes: Vec<Vec<(&'a str, String)>>,
    entity_source: Vec<String>,
    samples: Vec<Vec<(usize, f64)>>,
}

/// The silver stage.
pub struct Silver {
    /// The data-quality expectations, in order (`_exp_{i}` is the check of the i-th).
    expectations: Vec<Expectation>,
    /// Entity, attribute and metric columns from the feed catalog.
    conformance: Conformance,
    plan: BatchPlan,
    plan_input: SchemaRef,
    output_schema: SchemaRef,
    merge: Merge,
    changelog: String,
    audit: medallion_runtime::audit::AuditEncoder,
    /// Which org owns each entity id (`None` without a broker, in unit tests).
    owners: Option<owners::OwnerTable>,
}

impl Silver {
    /// Registers the audit schema and plans the transform once; an expectation that does not
    /// plan is named in the error.
    pub async fn new(setup: StageSetup, config: SilverConfig) -> Result<Self, SetupError> {
        let audit = setup.audit_encoder().await?;
        let owners = setup
            .topics
            .global_table_of(&setup.group)
            .map(|topic| (setup.kafka.clone(), topic.to_string()));
        let state = setup.state.clone();
        let mut stage = Self::with_audit(setup, config, audit).await?;
        if let Some((kafka, topic)) = owners {
            let table = stage
                .merge
                .store()
                .global_table(&topic)
                .map_err(|e| SetupError::config("state.dir", e))?;
            stage.owners = Some(owners::OwnerTable::start(kafka, topic, table, &state));
        }
        Ok(stage)
    }

    /// Plans the transform with the `audit.events` encoder already at hand.
    pub async fn with_audit(
        setup: StageSetup,
        config: SilverConfig,
        audit: medallion_runtime::audit::AuditEncoder,
    ) -> Result<Self, SetupError> {
        let plan_input = with_row_column(&setup.input_schema);
        let catalog = feeds::load(&setup)?;
        let conformance = Conformance::new(&catalog);
        let expectations = config.load_expectations(&setup.home)?;
        if let Err(e) = BatchPlan::new(
            &struct_access(&conform_sql(&conformance)),
            plan_input.clone(),
        )
        .await
        {
            feeds::find_unplannable(&catalog, &plan_input, "payload", false).await?;
            return Err(SetupError::plan("the feed catalog's conformance", e));
        }
        for (i, expectation) in expectations.iter().enumerate() {
            let key = format!("stage.expectations[{i}]");
            let mut names = expectations[..i].iter().map(|e| &e.name);
            if expectation.name.trim().is_empty() || names.any(|n| *n == expectation.name) {
                return Err(SetupError::config(
                    key,
                    format!(
                        "needs a unique, non-empty name (has `{}`)",
                        expectation.name
                    ),
                ));
            }
            let alone = BatchPlan::new(&check_sql(&conformance, expectation), plan_input.clone())
                .await
                .map_err(|e| {
                    SetupError::config(&key, format!("expectation `{}`: {e}", expectation.name))
                })?;
            let column = alone.output_schema();
            let Ok(field) = column.field_with_name("_check") else {
                return Err(SetupError::config(
                    key,
                    format!("expectation `{}` yields no column", expectation.name),
                ));
            };
            if field.data_type() != &DataType::Boolean {
                return Err(SetupError::config(
                    key,
                    format!(
                        "expectation `{}` must be a boolean expression, is {}",
                        expectation.name,
                        field.data_type()
                    ),
                ));
            }
        }
        let plan = BatchPlan::new(&sql(&conformance, &expectations), plan_input.clone())
            .await
            .map_err(|e| SetupError::plan("the silver transform", e))?;
        let changelog = setup
            .topics
            .changelog_of(&setup.group)
            .ok_or_else(|| {
                SetupError::contracts(format!(
                    "topic-config.yaml declares no changelog for {}",
                    setup.group
                ))
            })?
            .to_string();
        let store = setup.open_store()?;
        let state = medallion_runtime::state::KeyedState::new(
            store,
            setup.kafka.clone(),
            changelog.clone(),
            &setup.state,
        );
        Ok(Self {
            merge: Merge::new(config.authoritative_source, state),
            expectations,
            conformance,
            plan,
            plan_input,
            output_schema: setup.output_schema,
            changelog,
            audit,
            owners: None,
        })
    }

    /// The audit record of an ownership decision: `event` of `org_id` on `entity_type`
    /// `entity_id`, which `owner` claimed first.
    fn tenant_audit(&self, audit: TenantAudit<'_>, now_ms: i64) -> SideRecord {
        let action = medallion_runtime::audit::AuditAction {
            event_id: medallion_runtime::ids::stable_id(&[audit.action, audit.event_id]),
            action: audit.action.into(),
            actor: GROUP.into(),
            org_id: audit.org_id,
            correlation_id: audit.correlation_id.to_string(),
            trace_id: audit.trace_id.map(str::to_string),
            resource_type: audit.entity_type.to_string(),
            resource_id: audit.entity_id.to_string(),
            outcome: audit.outcome.into(),
            reason: Some(audit.reason),
            subjects: Vec::new(),
            details: [
                ("event_id", audit.event_id.to_string()),
                ("owner_org_id", audit.owner.org_id.to_string()),
                ("owner_event_id", audit.owner.event_id.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        self.audit.record(&action, now_ms)
    }

    /// An event refused because another org owns its entity.
    fn tenant_mismatch_audit(
        &self,
        row: &Row<'_>,
        owner: &owners::Claim,
        now_ms: i64,
    ) -> SideRecord {
        let audit = TenantAudit {
            action: "tenant.mismatch",
            event_id: row.event_id,
            org_id: row.org_id,
            correlation_id: row.correlation_id,
            trace_id: row.trace_id,
            entity_type: row.entity_type,
            entity_id: row.entity_id,
            outcome: "rejected",
            reason: format!(
                "the entity belongs to org {}, the event names org {}",
                owner.org_id, row.org_id
            ),
            owner,
        };
        self.tenant_audit(audit, now_ms)
    }

    /// An event this replica accepted while its claim raced another org's, which came first.
    fn tenant_conflict_audit(&self, lost: &owners::Lost) -> SideRecord {
        let (entity_type, entity_id) = lost.key.split_once('/').unwrap_or(("", &lost.key));
        let audit = TenantAudit {
            action: "tenant.conflict",
            event_id: &lost.mine.event_id,
            org_id: lost.mine.org_id,
            correlation_id: &lost.mine.event_id,
            trace_id: None,
            entity_type,
            entity_id,
            outcome: "accepted_before_the_owner_was_known",
            reason: format!(
                "org {} claimed the entity first; event {} of org {} was accepted while the claims raced",
                lost.winner.org_id, lost.mine.event_id, lost.mine.org_id
            ),
            owner: &lost.winner,
        };
        self.tenant_audit(audit, medallion_runtime::clock::now_ms())
    }

    fn drift_audit(
        &self,
        row: &Row<'_>,
        current: &EntityState,
        now_ms: i64,
    ) -> Result<SideRecord, StageError> {
        let action = medallion_runtime::audit::AuditAction {
            event_id: medallion_runtime::ids::stable_id(&["drift", row.event_id]),
            action: "drift.detected".into(),
            actor: GROUP.into(),
            org_id: row.org_id,
            correlation_id: row.correlation_id.to_string(),
            trace_id: row.trace_id.map(str::to_string),
            resource_type: row.entity_type.to_string(),
            resource_id: row.entity_id.to_string(),
            outcome: "not_overwritten".into(),
            reason: Some(format!(
                "incoming updated_at {} from {} is older than the current {} from {}",
                row.updated_at, row.source_system, current.updated_at, current.source_system
            )),
            subjects: Vec::new(),
            details: [
                ("event_id", row.event_id.to_string()),
                ("incoming_updated_at", row.updated_at.to_string()),
                ("incoming_source", row.source_system.to_string()),
                ("current_updated_at", current.updated_at.to_string()),
                ("current_source", current.source_system.to_string()),
                ("current_event_id", current.event_id.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        Ok(self.audit.record(&action, now_ms))
    }
}

/// What an ownership audit record says.
struct TenantAudit<'a> {
    action: &'static str,
    event_id: &'a str,
    org_id: i64,
    correlation_id: &'a str,
    trace_id: Option<&'a str>,
    entity_type: &'a str,
    entity_id: &'a str,
    outcome: &'static str,
    reason: String,
    owner: &'a owners::Claim,
}

/// The columns of one conformed event that the merge needs.
struct Row<'a> {
    event_id: &'a str,
    correlation_id: &'a str,
    trace_id: Option<&'a str>,
    org_id: i64,
    partition: i32,
    entity_type: &'a str,
    entity_id: &'a str,
    updated_at: i64,
    source_system: &'a str,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, StageError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| StageError::Transform(format!("no column {name}")))
}

fn cast_to(array: &ArrayRef, field: &Field) -> Result<ArrayRef, StageError> {
    arrow::compute::cast(array, field.data_type())
        .map_err(|e| StageError::Transform(format!("{}: {e}", field.name())))
}

/// A struct array of `fields`, each child taken from `child(name)` and cast to its type.
/// The owner-table record of `claim`, placed by key so every claim for an entity is ordered
/// in one partition.
fn owner_claim(topic: &str, key: &str, claim: &owners::Claim) -> SideRecord {
    SideRecord {
        topic: topic.to_string(),
        partition: None,
        key: Some(key.as_bytes().to_vec()),
        value: claim.encode(),
        headers: None,
    }
}

fn build_struct(
    fields: &Fields,
    mut child: impl FnMut(&str) -> Result<ArrayRef, StageError>,
) -> Result<ArrayRef, StageError> {
    let columns = fields
        .iter()
        .map(|f| cast_to(&child(f.name())?, f))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(StructArray::try_new(
        fields.clone(),
        columns,
        None,
    )?))
}

fn struct_fields(field: &Field) -> Result<&Fields, StageError> {
    match field.data_type() {
        DataType::Struct(fields) => Ok(fields),
        other => Err(StageError::Transform(format!(
            "{} is {other}, expected a record",
            field.name()
        ))),
    }
}

/// The symbols of `ChangeKind` in schema order (an Avro enum column carries them all).
const CHANGE_SYMBOLS: [&str; 4] = ["CREATED", "UPDATED", "DELETED", "STALE"];

/// An Avro enum column: a dictionary whose values are every symbol, in schema order.
fn enum_column(symbols: &[&str], values: &[&str]) -> Result<ArrayRef, StageError> {
    let keys = values
        .iter()
        .map(|v| {
            symbols
                .iter()
                .position(|s| s == v)
                .map(|p| p as i32)
                .ok_or_else(|| StageError::Transform(format!("`{v}` is not one of {symbols:?}")))
        })
        .collect::<Result<Vec<i32>, _>>()?;
    Ok(Arc::new(
        arrow::array::DictionaryArray::<Int32Type>::try_new(
            arrow::array::Int32Array::from(keys),
            Arc::new(StringArray::from(symbols.to_vec())),
        )?,
    ))
}

/// A map column (`field`'s type) from per-row (key, value) pairs.
fn build_map(field: &Field, rows: &[Vec<(&str, String)>]) -> Result<ArrayRef, StageError> {
    let DataType::Map(entries, ordered) = field.data_type() else {
        return Err(StageError::Transform(format!(
            "{} is not a map",
            field.name()
        )));
    };
    let entry_fields = struct_fields(entries)?;
    let keys: Vec<&str> = rows.iter().flatten().map(|(k, _)| *k).collect();
    let values: Vec<&str> = rows.iter().flatten().map(|(_, v)| v.as_str()).collect();
    let key_array: ArrayRef = Arc::new(StringArray::from(keys));
    let value_array: ArrayRef = Arc::new(StringArray::from(values));
    let struct_array = StructArray::try_new(
        entry_fields.clone(),
        vec![
            cast_to(&key_array, &entry_fields[0])?,
            cast_to(&value_array, &entry_fields[1])?,
        ],
        None,
    )?;
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(Vec::len));
    Ok(Arc::new(MapArray::try_new(
        entries.clone(),
        offsets,
        struct_array,
        None,
        *ordered,
    )?))
}

/// A list-of-strings column (`field`'s type) from per-row lists.
/// Each row's measurements (`input`, a list) followed by the feed catalog's samples for it
/// (`extra`: metric index and value); `input` itself when the catalog added none.
fn append_samples(
    field: &Field,
    input: &ArrayRef,
    extra: &[Vec<(usize, f64)>],
    metrics: &[(String, Option<String>)],
) -> Result<ArrayRef, StageError> {
    if extra.iter().all(Vec::is_empty) {
        return Ok(input.clone());
    }
    let DataType::List(item) = field.data_type() else {
        return Err(StageError::Transform(format!(
            "{} is not a list",
            field.name()
        )));
    };
    let item_fields = struct_fields(item)?;
    let bad = |what: &str| StageError::Transform(format!("input measurements: {what}"));
    let list = input
        .as_list_opt::<i32>()
        .ok_or_else(|| bad("not a list"))?;
    let values = list
        .values()
        .as_struct_opt()
        .ok_or_else(|| bad("not records"))?;
    let child = |name: &str, to: &DataType| -> Result<ArrayRef, StageError> {
        let c = values.column_by_name(name).ok_or_else(|| bad(name))?;
        Ok(arrow::compute::cast(c, to)?)
    };
    let (names, numbers, units) = (
        child("name", &DataType::Utf8)?,
        child("value", &DataType::Float64)?,
        child("unit", &DataType::Utf8)?,
    );
    let (names, numbers, units) = (
        names.as_string::<i32>(),
        numbers.as_primitive::<arrow::datatypes::Float64Type>(),
        units.as_string::<i32>(),
    );
    let offsets = list.value_offsets();
    let (mut name_out, mut value_out, mut unit_out, mut lengths) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::with_capacity(extra.len()),
    );
    for (row, added) in extra.iter().enumerate() {
        let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
        for j in start..end {
            name_out.push(names.value(j));
            value_out.push(numbers.value(j));
            unit_out.push((!units.is_null(j)).then(|| units.value(j)));
        }
        for &(m, value) in added {
            let (name, unit) = metrics.get(m).ok_or_else(|| bad("unknown metric"))?;
            name_out.push(name.as_str());
            value_out.push(value);
            unit_out.push(unit.as_deref());
        }
        lengths.push(end - start + added.len());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(name_out)),
        Arc::new(arrow::array::Float64Array::from(value_out)),
        Arc::new(StringArray::from(unit_out)),
    ];
    let columns = item_fields
        .iter()
        .zip(&columns)
        .map(|(f, c)| cast_to(c, f))
        .collect::<Result<Vec<_>, _>>()?;
    let items = StructArray::try_new(item_fields.clone(), columns, None)?;
    Ok(Arc::new(ListArray::try_new(
        item.clone(),
        OffsetBuffer::from_lengths(lengths),
        Arc::new(items),
        None,
    )?))
}

fn build_string_list(field: &Field, rows: &[Vec<String>]) -> Result<ArrayRef, StageError> {
    let DataType::List(item) = field.data_type() else {
        return Err(StageError::Transform(format!(
            "{} is not a list",
            field.name()
        )));
    };
    let flat: Vec<&str> = rows.iter().flatten().map(String::as_str).collect();
    let values: ArrayRef = Arc::new(StringArray::from(flat));
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(Vec::len));
    Ok(Arc::new(ListArray::try_new(
        item.clone(),
        offsets,
        cast_to(&values, item)?,
        None,
    )?))
}

impl Stage for Silver {
    async fn assign(
        &mut self,
        partition: i32,
        committed_metadata: Option<String>,
    ) -> Result<(), StageError> {
        self.assign_all(vec![(partition, committed_metadata)])
            .await
            .map_err(|(_, e)| e)
    }

    async fn assign_all(
        &mut self,
        assigned: Vec<(i32, Option<String>)>,
    ) -> Result<(), (i32, StageError)> {
        let partitions: Vec<i32> = assigned.iter().map(|(p, _)| *p).collect();
        self.merge.assign_all(&partitions).await?;
        metrics::gauge!(m::STATE_ENTITIES, "stage" => GROUP)
            .set(self.merge.approximate_len() as f64);
        // The owner table too is state every batch needs: until it holds what its topic held
        // when it started, the partitions are still being restored (`/readyz` says so) rather
        // than ready and waiting in `process` (on an empty disk at 5M entities that was 17 s
        // of 200 while nothing could be decided).
        if let Some(table) = &self.owners {
            table.wait_ready().await;
        }
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.merge.revoke(partition);
        metrics::gauge!(m::STATE_ENTITIES, "stage" => GROUP)
            .set(self.merge.approximate_len() as f64);
    }

    /// Idle: the state written by the last batches gets its checkpoint too.
    async fn settle(&mut self, _closing: bool, _out: &mut Collector) -> Result<(), StageError> {
        self.merge.after_batch()
    }

    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        if let Some(table) = &self.owners {
            table.wait_ready().await;
            table.wait_confirmed().await?;
        }
        let input = number_rows(&self.plan_input, &input)?;
        let results = self.plan.run(input).await?;
        let batch = match results.len() {
            0 => return Ok(()),
            1 => results.into_iter().next().unwrap_or_else(|| unreachable!()),
            _ => arrow::compute::concat_batches(&results[0].schema(), &results)?,
        };
        self.merge_batch(&batch, out)
    }
}

impl Silver {
    /// Counts the expectations' results of the `decided` rows and logs the batch's drift once.
    fn report(&self, decided: u64, failed: &[u64], drift: u64, first_drift: Option<String>) {
        for (e, failures) in self.expectations.iter().zip(failed) {
            let labels = |result: &'static str| {
                [
                    ("stage", GROUP.to_string()),
                    ("expectation", e.name.clone()),
                    ("action", e.action.as_str().to_string()),
                    ("result", result.to_string()),
                ]
            };
            metrics::counter!(m::EXPECTATION_RESULTS_TOTAL, &labels("pass"))
                .increment(decided - failures);
            metrics::counter!(m::EXPECTATION_RESULTS_TOTAL, &labels("fail")).increment(*failures);
        }
        if let Some(example) = first_drift {
            tracing::warn!(
                stale_updates = drift,
                example = %example,
                "drift: updates older than the entity's current state were not applied (audited on audit.events)"
            );
        }
    }

    /// The output rows: the kept input rows with silver's event ids and payload (entity,
    /// change, attributes, quality warnings, measurements plus the feed's metric samples).
    fn output_batch(
        &self,
        batch: &RecordBatch,
        merged: Merged<'_>,
    ) -> Result<RecordBatch, StageError> {
        let Merged {
            keep,
            changes,
            warnings: warnings_out,
            attributes: attributes_out,
            entity_source,
            samples: samples_out,
        } = merged;
        let kept =
            arrow::compute::filter_record_batch(batch, &arrow::array::BooleanArray::from(keep))?;
        let payload_field = self.output_schema.field_with_name("payload")?;
        let payload_fields = struct_fields(payload_field)?;
        let in_payload = column(&kept, "payload")?.as_struct().clone();
        let silver_ids: Vec<String> = column(&kept, "event_id")?
            .as_string::<i32>()
            .iter()
            .map(|id| {
                let id = id.unwrap_or_default();
                medallion_runtime::ids::stable_id(&["silver", id])
            })
            .collect();
        let payload = build_struct(payload_fields, |name| match name {
            "entity" => {
                let field = payload_fields
                    .find("entity")
                    .map(|(_, f)| f.clone())
                    .ok_or_else(|| StageError::Transform("no payload.entity".into()))?;
                build_struct(struct_fields(&field)?, |child| match child {
                    "updated_at" => Ok(Arc::new(TimestampMillisecondArray::from(
                        column(&kept, "updated_at")?
                            .as_primitive::<Int64Type>()
                            .values()
                            .to_vec(),
                    )) as ArrayRef),
                    "source_system" => {
                        Ok(Arc::new(StringArray::from(entity_source.clone())) as ArrayRef)
                    }
                    other => column(&kept, other).cloned(),
                })
            }
            "change" => enum_column(&CHANGE_SYMBOLS, &changes),
            "attributes" => {
                let (_, field) = payload_fields
                    .find("attributes")
                    .ok_or_else(|| StageError::Transform("no payload.attributes".into()))?;
                build_map(field, &attributes_out)
            }
            "quality_warnings" => {
                let (_, field) = payload_fields
                    .find("quality_warnings")
                    .ok_or_else(|| StageError::Transform("no payload.quality_warnings".into()))?;
                build_string_list(field, &warnings_out)
            }
            "measurements" => {
                let (_, field) = payload_fields
                    .find("measurements")
                    .ok_or_else(|| StageError::Transform("no payload.measurements".into()))?;
                let input = in_payload
                    .column_by_name("measurements")
                    .ok_or_else(|| StageError::Transform("no input payload.measurements".into()))?;
                append_samples(field, input, &samples_out, &self.conformance.metrics)
            }
            "bronze_event_id" => column(&kept, "event_id").cloned(),
            other => Err(StageError::Transform(format!(
                "unknown payload field {other}"
            ))),
        })?;
        let out_columns = self
            .output_schema
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                "payload" => Ok(payload.clone()),
                "event_id" => Ok(Arc::new(StringArray::from(silver_ids.clone())) as ArrayRef),
                name => cast_to(column(&kept, name)?, f),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RecordBatch::try_new(
            self.output_schema.clone(),
            out_columns,
        )?)
    }

    fn merge_batch(
        &mut self,
        batch: &RecordBatch,
        collector: &mut Collector,
    ) -> Result<(), StageError> {
        let n = batch.num_rows();
        let strings = |name: &str| -> Result<StringArray, StageError> {
            let c = column(batch, name)?;
            Ok(arrow::compute::cast(c, &DataType::Utf8)?
                .as_string::<i32>()
                .clone())
        };
        let event_id = strings("event_id")?;
        let correlation_id = strings("correlation_id")?;
        let trace_id = strings("trace_id")?;
        let entity_type = strings("entity_type")?;
        let entity_id = strings("entity_id")?;
        let source_system = strings("source_system")?;
        let org_id = column(batch, "org_id")?.as_primitive::<Int64Type>().clone();
        let updated_at = column(batch, "updated_at")?
            .as_primitive::<Int64Type>()
            .clone();
        let partition = column(batch, meta::PARTITION)?
            .as_primitive::<Int32Type>()
            .clone();
        let now = column(batch, meta::NOW_MS)?
            .as_primitive::<Int64Type>()
            .clone();
        let source_row = column(batch, ROW)?
            .as_primitive::<arrow::datatypes::UInt32Type>()
            .clone();
        let checks: Vec<arrow::array::BooleanArray> = (0..self.expectations.len())
            .map(|i| column(batch, &format!("_exp_{i}")).map(|c| c.as_boolean().clone()))
            .collect::<Result<_, _>>()?;
        let attribute_names = &self.conformance.attributes;
        let attributes: Vec<StringArray> = attribute_names
            .iter()
            .map(|name| strings(&format!("attr.{name}")))
            .collect::<Result<_, _>>()?;
        let samples: Vec<arrow::array::Float64Array> = (0..self.conformance.metrics.len())
            .map(|i| {
                column(batch, &format!("metric.{i}"))
                    .map(|c| c.as_primitive::<arrow::datatypes::Float64Type>().clone())
            })
            .collect::<Result<_, _>>()?;
        let mut samples_out: Vec<Vec<(usize, f64)>> = Vec::with_capacity(n);

        let mut keep = Vec::with_capacity(n);
        let mut rejected = Vec::new();
        let mut side = Vec::new();
        let mut changes = Vec::with_capacity(n);
        let mut warnings_out = Vec::with_capacity(n);
        let mut attributes_out = Vec::with_capacity(n);
        let mut source_rows = Vec::with_capacity(n);
        let mut entity_source = Vec::with_capacity(n);
        // Expectation failures, counted per batch (a counter update per row costs more than
        // the check).
        let mut failed = vec![0u64; self.expectations.len()];
        // One log line per batch, not per event: a replay can carry a lot of drift.
        let mut drift = 0u64;
        let mut first_drift: Option<String> = None;
        if let Some(table) = &self.owners {
            let lost = table
                .owners
                .lock()
                .map(|mut o| o.take_lost())
                .map_err(|_| StageError::Internal("entity owner table lock poisoned".into()))?;
            for lost in lost {
                side.push(owner_claim(&table.topic, &lost.key, &lost.winner));
                side.push(self.tenant_conflict_audit(&lost));
            }
        }
        for i in 0..n {
            let row_id = source_row.value(i);
            // Expectations first: they decide whether the event goes on at all.
            let mut warnings = Vec::new();
            let mut dropped = None;
            for ((e, check), failures) in
                self.expectations.iter().zip(&checks).zip(failed.iter_mut())
            {
                if check.is_null(i) || check.value(i) {
                    continue;
                }
                *failures += 1;
                match e.action {
                    Action::Warn => warnings.push(e.name.clone()),
                    Action::Drop => {
                        dropped.get_or_insert_with(|| e.name.clone());
                    }
                    Action::FailBatch => {
                        return Err(StageError::Halt(format!(
                            "expectation `{}` ({}) failed for event {} (org {}); fix the data or the expectation and restart",
                            e.name,
                            e.expr,
                            event_id.value(i),
                            org_id.value(i)
                        )));
                    }
                }
            }
            if let Some(name) = dropped {
                rejected.push((
                    row_id,
                    RecordFailure::poison(name.clone(), format!("failed expectation `{name}`")),
                ));
                keep.push(false);
                continue;
            }
            if entity_type.is_null(i) || entity_id.is_null(i) || updated_at.is_null(i) {
                rejected.push((
                    row_id,
                    RecordFailure::poison(
                        NO_ENTITY,
                        "the event carries no payload branch of a feed in feeds.yaml to conform",
                    ),
                ));
                keep.push(false);
                continue;
            }
            let row = Row {
                event_id: event_id.value(i),
                correlation_id: correlation_id.value(i),
                trace_id: (!trace_id.is_null(i)).then(|| trace_id.value(i)),
                org_id: org_id.value(i),
                partition: partition.value(i),
                entity_type: entity_type.value(i),
                entity_id: entity_id.value(i),
                updated_at: updated_at.value(i),
                source_system: if source_system.is_null(i) {
                    ""
                } else {
                    source_system.value(i)
                },
            };
            if let Some(table) = &self.owners {
                let owner_key = owners::owner_key(row.entity_type, row.entity_id);
                let decision = table
                    .owners
                    .lock()
                    .map(|mut o| o.decide(&owner_key, row.org_id, row.event_id))
                    .map_err(|_| {
                        StageError::Internal("entity owner table lock poisoned".into())
                    })??;
                match decision {
                    owners::Decision::Owned => {}
                    owners::Decision::Claim(claim) => {
                        side.push(owner_claim(&table.topic, &owner_key, &claim));
                    }
                    owners::Decision::Mismatch { owner } => {
                        rejected.push((
                            row_id,
                            RecordFailure::poison(
                                TENANT_MISMATCH,
                                format!(
                                    "{} {} belongs to org {} (claimed by event {}), not to org {}",
                                    row.entity_type,
                                    row.entity_id,
                                    owner.org_id,
                                    owner.event_id,
                                    row.org_id
                                ),
                            ),
                        ));
                        side.push(self.tenant_mismatch_audit(&row, &owner, now.value(i)));
                        keep.push(false);
                        continue;
                    }
                }
            }
            let key = state::entity_key(row.org_id, row.entity_type, row.entity_id);
            let canonical = self.conformance.canonical.get(row.entity_type);
            let hash = || {
                canonical.map(|at| {
                    let values: Vec<Option<&str>> = at
                        .iter()
                        .map(|&a| {
                            let column = &attributes[a];
                            (!column.is_null(i)).then(|| column.value(i))
                        })
                        .collect();
                    medallion_contracts::feeds::canonical_hash(
                        row.entity_id,
                        &values,
                        row.updated_at,
                    )
                })
            };
            let incoming = EntityState {
                updated_at: row.updated_at,
                source_system: row.source_system.to_string(),
                event_id: row.event_id.to_string(),
                change: Change::Created,
                hash: None,
            };
            let outcome = self.merge.apply(row.partition, &key, incoming, hash)?;
            match &outcome {
                // A redelivered event writes its state again: the write made the first time
                // may not have reached the changelog (its batch failed after the merge, or the
                // worker stopped before it landed), and the changelog is the source of truth.
                state::Outcome::Stored(stored) | state::Outcome::Replayed(stored) => {
                    side.push(medallion_runtime::changelog::update(
                        &self.changelog,
                        row.partition,
                        key.as_bytes(),
                        stored.encode(),
                    ));
                }
                state::Outcome::Stale(current) => {
                    metrics::counter!(m::DRIFT_TOTAL, "stage" => GROUP, "entity_type" => row.entity_type.to_string()).increment(1);
                    tracing::debug!(
                        entity = %key,
                        event_id = row.event_id,
                        incoming_updated_at = row.updated_at,
                        current_updated_at = current.updated_at,
                        current_source = %current.source_system,
                        "drift: update older than the current state, not applied"
                    );
                    drift += 1;
                    first_drift.get_or_insert_with(|| key.clone());
                    side.push(self.drift_audit(&row, current, now.value(i))?);
                }
            }
            changes.push(outcome.change().as_str());
            entity_source.push(row.source_system.to_string());
            warnings_out.push(warnings);
            attributes_out.push(
                attribute_names
                    .iter()
                    .zip(&attributes)
                    .filter(|(_, a)| !a.is_null(i))
                    .map(|(name, a)| (name.as_str(), a.value(i).to_string()))
                    .collect::<Vec<_>>(),
            );
            samples_out.push(
                samples
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !c.is_null(i))
                    .map(|(m, c)| (m, c.value(i)))
                    .collect(),
            );
            source_rows.push(Some(row_id));
            keep.push(true);
        }
        self.merge.after_batch()?;
        metrics::gauge!(m::STATE_ENTITIES, "stage" => GROUP)
            .set(self.merge.approximate_len() as f64);
        self.report(n as u64, &failed, drift, first_drift);
        let out = self.output_batch(
            batch,
            Merged {
                keep,
                changes,
                warnings: warnings_out,
                attributes: attributes_out,
                entity_source,
                samples: samples_out,
            },
        )?;
        collector.emit_rows(out, source_rows)?;
        for (row, failure) in rejected {
            collector.reject(row, failure);
        }
        for record in side {
            collector.side(record);
        }
        Ok(())
    }
}
