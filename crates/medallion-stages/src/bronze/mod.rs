//! bronze-processor (`connector.data.raw` → `bronze.data.cleaned`): validates the envelope
//! (required fields, UUID `event_id`, event time within a sanity range, `org_id` > 0 and equal
//! to the record key, payload variant matching `event_type`, each feed's allowed values),
//! normalizes (trim, canonical case for enums and ids; times are UTC epoch milliseconds), and
//! hands valid events on. Personal data (schema fields marked `"pii": true`) is encrypted with
//! the active key before it leaves bronze; the record carries the key id in a header and each
//! encryption is recorded on `audit.events`. Dedup by `event_id` is the runtime's.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Fields, SchemaRef};
use medallion_contracts::feeds::{Feed, FeedCatalog};
use medallion_runtime::audit::{AuditEncoder, AuditFields};
use medallion_runtime::error::{RecordFailure, SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::pii::{Keyring, PiiConfig, KEY_ID_HEADER};
use medallion_runtime::worker::{meta, Collector, Stage, StageSetup};
use serde::{Deserialize, Serialize};

use crate::feeds;
use crate::plan::{number_rows, struct_access, with_row_column, BatchPlan, ROW};

/// The consumer group, and so the binary's name.
pub const GROUP: &str = "bronze-processor";

/// bronze-processor's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BronzeConfig {
    /// Oldest accepted event time, relative to processing time.
    pub max_event_age_ms: i64,
    /// Furthest accepted event time in the future (producer clock skew).
    pub max_future_skew_ms: i64,
    /// Keys that encrypt personal data; the worker refuses to start without one.
    pub pii: PiiConfig,
}

impl Default for BronzeConfig {
    fn default() -> Self {
        Self {
            max_event_age_ms: 30 * 86_400_000,
            max_future_skew_ms: 5 * 60_000,
            pii: PiiConfig::default(),
        }
    }
}

const REJECT: &str = "_reject";

/// Rejection reasons, stable labels for the DLQ and metrics.
pub mod reason {
    pub const MISSING_FIELD: &str = "missing_field";
    pub const INVALID_EVENT_ID: &str = "invalid_event_id";
    pub const INVALID_ORG_ID: &str = "invalid_org_id";
    pub const KEY_MISMATCH: &str = "key_mismatch";
    pub const TIMESTAMP_OUT_OF_RANGE: &str = "timestamp_out_of_range";
    pub const PAYLOAD_MISMATCH: &str = "payload_mismatch";
    pub const INVALID_VALUE: &str = "invalid_value";
}

fn describe(reason: &str, config: &BronzeConfig, catalog: &FeedCatalog) -> String {
    match reason {
        reason::MISSING_FIELD => "a required envelope field (event_id, event_type, event_version, correlation_id, source.service, source.instance) is empty".into(),
        reason::INVALID_EVENT_ID => "event_id is not a UUID".into(),
        reason::INVALID_ORG_ID => "org_id must be > 0".into(),
        reason::KEY_MISMATCH => "record key differs from org_id".into(),
        reason::TIMESTAMP_OUT_OF_RANGE => format!(
            "timestamp is more than {} ms old or more than {} ms in the future",
            config.max_event_age_ms, config.max_future_skew_ms
        ),
        reason::PAYLOAD_MISMATCH => format!(
            "the payload must carry exactly one feed variant, the one event_type names ({})",
            catalog
                .feeds
                .iter()
                .map(|f| format!("{} → {}", f.event_type, f.variant))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        reason::INVALID_VALUE => "a feed field is blank where required, outside its allowed values or range, fails a check or is not a SemVer version (see the feed's entry in feeds.yaml)".into(),
        other => other.to_string(),
    }
}

/// The transform, as SQL over table `input` (of `input` schema): the envelope checks, then
/// each feed's rules and normalization from the catalog.
pub fn sql(
    config: &BronzeConfig,
    catalog: &FeedCatalog,
    input: &SchemaRef,
    input_topic: &str,
) -> Result<String, SetupError> {
    Ok(struct_access(&sql_with_brackets(
        config,
        catalog,
        input,
        input_topic,
    )?))
}

/// The Arrow fields of each feed's branch of the input payload.
fn branch_fields<'a>(
    catalog: &'a FeedCatalog,
    input: &SchemaRef,
) -> Result<Vec<(&'a Feed, Fields)>, SetupError> {
    let payload = input
        .field_with_name("payload")
        .map_err(|_| SetupError::contracts("the bronze input has no payload"))?;
    let DataType::Struct(branches) = payload.data_type() else {
        return Err(SetupError::contracts(
            "the bronze input payload is not a record",
        ));
    };
    catalog
        .feeds
        .iter()
        .map(|feed| match branches.find(&feed.variant) {
            Some((_, f)) => match f.data_type() {
                DataType::Struct(fields) => Ok((feed, fields.clone())),
                other => Err(SetupError::contracts(format!(
                    "payload.{} is {other}, not a record",
                    feed.variant
                ))),
            },
            None => Err(SetupError::contracts(format!(
                "the bronze input payload has no branch {} (feed {})",
                feed.variant, feed.event_type
            ))),
        })
        .collect()
}

fn sql_with_brackets(
    config: &BronzeConfig,
    catalog: &FeedCatalog,
    input: &SchemaRef,
    input_topic: &str,
) -> Result<String, SetupError> {
    let p = r#""payload""#;
    let blank = |e: &str| format!("({e} IS NULL OR trim({e}) = '')");
    let topic = input_topic.replace('\'', "''");
    let branches = branch_fields(catalog, input)?;
    let broken: Vec<String> = branches
        .iter()
        .filter_map(|(feed, fields)| {
            let mut text = Vec::new();
            feeds::text_paths(fields, "", &mut text);
            feeds::broken_rules(p, feed, &text)
        })
        .collect();
    let invalid = if broken.is_empty() {
        "false".to_string()
    } else {
        broken.join("\n      OR ")
    };
    let normalized: Vec<String> = branches
        .iter()
        .map(|(feed, fields)| {
            format!(
                "'{}', {}",
                feed.variant,
                feeds::normalized_branch(p, feed, fields, "")
            )
        })
        .collect();
    Ok(format!(
        r#"
SELECT
  -- The first failed check names the reason. One single-branch CASE per check, joined by
  -- COALESCE, evaluates each check once over the whole batch; a multi-branch CASE would copy
  -- the remaining rows before every branch.
  COALESCE(
    CASE WHEN {missing} THEN '{missing_field}' ELSE NULL END,
    CASE WHEN NOT regexp_like(trim("event_id"), '^[0-9a-fA-F]{{8}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{12}}$') THEN '{invalid_event_id}' ELSE NULL END,
    CASE WHEN "org_id" <= 0 THEN '{invalid_org_id}' ELSE NULL END,
    CASE WHEN "{key}" IS NULL OR trim("{key}") <> CAST("org_id" AS VARCHAR) THEN '{key_mismatch}' ELSE NULL END,
    CASE WHEN CAST("timestamp" AS BIGINT) < "{now}" - {max_age} OR CAST("timestamp" AS BIGINT) > "{now}" + {max_skew} THEN '{timestamp_out_of_range}' ELSE NULL END,
    -- Plain boolean logic, not `CASE event_type WHEN ...`: a CASE with a base expression
    -- copies the payloads of the rows of each branch before evaluating it.
    CASE WHEN {mismatch}
         THEN '{payload_mismatch}' ELSE NULL END,
    CASE WHEN {invalid}
      THEN '{invalid_value}' ELSE NULL END
  ) AS "{reject}",
  lower(trim("event_id")) AS "event_id",
  lower(trim("event_type")) AS "event_type",
  trim("event_version") AS "event_version",
  "timestamp",
  named_struct('service', lower(trim("source"['service'])), 'instance', trim("source"['instance'])) AS "source",
  lower(trim("correlation_id")) AS "correlation_id",
  "org_id",
  trim("trace_id") AS "trace_id",
  "classification",
  "provenance",
  named_struct(
    'connector_id', trim({p}['connector_id']),
    'source_system', lower(trim({p}['source_system'])),
    {normalized},
    'measurements', {p}['measurements'],
    'attributes', {p}['attributes'],
    'raw_topic', '{topic}',
    'raw_partition', "{partition}",
    'raw_offset', "{offset}",
    'cleaned_at', "{now}") AS "payload",
  "{row}"
FROM input
"#,
        missing = [
            blank(r#""event_id""#),
            blank(r#""event_type""#),
            blank(r#""event_version""#),
            blank(r#""correlation_id""#),
            blank(r#""source"['service']"#),
            blank(r#""source"['instance']"#),
        ]
        .join(" OR "),
        mismatch = feeds::payload_mismatch(p, catalog, r#"lower(trim("event_type"))"#),
        normalized = normalized.join(",\n    "),
        missing_field = reason::MISSING_FIELD,
        invalid_event_id = reason::INVALID_EVENT_ID,
        invalid_org_id = reason::INVALID_ORG_ID,
        key_mismatch = reason::KEY_MISMATCH,
        timestamp_out_of_range = reason::TIMESTAMP_OUT_OF_RANGE,
        payload_mismatch = reason::PAYLOAD_MISMATCH,
        invalid_value = reason::INVALID_VALUE,
        key = meta::KEY,
        now = meta::NOW_MS,
        partition = meta::PARTITION,
        offset = meta::OFFSET,
        max_age = config.max_event_age_ms,
        max_skew = config.max_future_skew_ms,
        reject = REJECT,
        row = ROW,
    ))
}

/// The bronze stage: one DataFusion plan, reused for every batch.
pub struct Bronze {
    plan: BatchPlan,
    plan_input: SchemaRef,
    output_schema: SchemaRef,
    keyring: Keyring,
    /// Dotted paths of the personal-data fields of the input contract.
    pii_fields: Vec<String>,
    audit: AuditEncoder,
    /// The payload branches, one per feed of the catalog.
    variants: Vec<String>,
    /// Why each rejection reason rejects, as the DLQ record says it.
    descriptions: std::collections::HashMap<&'static str, String>,
}

impl Bronze {
    /// Registers the audit schema, loads the keys and plans the transform once.
    pub async fn new(setup: StageSetup, config: BronzeConfig) -> Result<Self, SetupError> {
        let audit = setup.audit_encoder().await?;
        Self::with_audit(setup, config, audit).await
    }

    /// Plans the transform with the `audit.events` encoder already at hand.
    pub async fn with_audit(
        setup: StageSetup,
        config: BronzeConfig,
        audit: AuditEncoder,
    ) -> Result<Self, SetupError> {
        let keyring = Keyring::from_config(&config.pii, "stage.pii")?;
        let pii_fields = setup
            .topics
            .topic(&setup.input_topic)
            .and_then(|t| setup.contracts.get(&t.schema))
            .map(|c| c.pii_fields())
            .unwrap_or_default();
        let catalog = feeds::load(&setup)?;
        let plan_input = with_row_column(&setup.input_schema);
        let text = sql(&config, &catalog, &plan_input, &setup.input_topic)?;
        let plan = match BatchPlan::new(&text, plan_input.clone()).await {
            Ok(plan) => plan,
            Err(e) => {
                feeds::find_unplannable(&catalog, &plan_input, r#""payload""#, true).await?;
                return Err(SetupError::plan("the bronze transform", e));
            }
        };
        for field in setup.output_schema.fields() {
            let produced = plan.output_schema();
            let Ok(have) = produced.field_with_name(field.name()) else {
                return Err(SetupError::contracts(format!(
                    "bronze transform does not produce `{}`",
                    field.name()
                )));
            };
            if !arrow::compute::can_cast_types(have.data_type(), field.data_type()) {
                return Err(SetupError::contracts(format!(
                    "bronze transform produces `{}` as {}, the schema wants {}",
                    field.name(),
                    have.data_type(),
                    field.data_type()
                )));
            }
        }
        let descriptions = [
            reason::MISSING_FIELD,
            reason::INVALID_EVENT_ID,
            reason::INVALID_ORG_ID,
            reason::KEY_MISMATCH,
            reason::TIMESTAMP_OUT_OF_RANGE,
            reason::PAYLOAD_MISMATCH,
            reason::INVALID_VALUE,
        ]
        .into_iter()
        .map(|r| (r, describe(r, &config, &catalog)))
        .collect();
        Ok(Self {
            plan,
            plan_input,
            output_schema: setup.output_schema,
            keyring,
            pii_fields,
            audit,
            variants: catalog.feeds.iter().map(|f| f.variant.clone()).collect(),
            descriptions,
        })
    }

    /// Encrypts the personal data of `batch` (the rows `out` is about to get): the key id goes
    /// in a header of each record that had some, each encryption is recorded on
    /// `audit.events`, and the fields are counted as their records land.
    fn protect(&self, batch: RecordBatch, out: &mut Collector) -> Result<RecordBatch, StageError> {
        if self.pii_fields.is_empty() || batch.num_rows() == 0 {
            return Ok(batch);
        }
        let (batch, touched) = self
            .keyring
            .encrypt_columns(&batch, &self.pii_fields)
            .map_err(|e| StageError::Transform(e.to_string()))?;
        let text = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>().cloned())
                .ok_or_else(|| StageError::Transform(format!("no text column {name}")))
        };
        let (event_ids, correlations) = (text("event_id")?, text("correlation_id")?);
        let orgs = batch
            .column_by_name("org_id")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>().cloned())
            .ok_or_else(|| StageError::Transform("no org_id column".into()))?;
        let key_id = self.keyring.active_id().to_string();
        let now = medallion_runtime::clock::now_ms();
        // Rows are numbered after those `out` already has.
        let base = out.rows().map_or(0, |r| r.num_rows()) as u32;
        let mut fields = Vec::new();
        // One audit record per org of the batch part, listing its sealed events and fields.
        let mut by_org: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for (row, paths) in touched.iter().enumerate() {
            if paths.is_empty() {
                continue;
            }
            let output_row = base + row as u32;
            fields.push((output_row, paths.len() as u64));
            out.header(output_row, KEY_ID_HEADER, key_id.clone().into_bytes());
            by_org.entry(orgs.value(row)).or_default().push(row);
        }
        for (org, rows) in by_org {
            let (first, last) = (rows[0], rows[rows.len() - 1]);
            let subjects: Vec<(&str, &[String])> = rows
                .iter()
                .map(|&row| (event_ids.value(row), touched[row].as_slice()))
                .collect();
            // The same events give the same id, so a replayed part is recognised downstream.
            let count = rows.len().to_string();
            let mut id = uuid::Uuid::encode_buffer();
            let audit_id = medallion_runtime::ids::stable_uuid(&[
                "pii.encrypted",
                event_ids.value(first),
                event_ids.value(last),
                &count,
            ])
            .hyphenated()
            .encode_lower(&mut id);
            let action = AuditFields {
                event_id: audit_id,
                action: "pii.encrypted",
                actor: GROUP,
                org_id: org,
                correlation_id: correlations.value(first),
                trace_id: None,
                resource_type: "events",
                resource_id: event_ids.value(first),
                outcome: "encrypted",
                reason: None,
                // In key order, as the map of the owned AuditAction writes them.
                details: &[
                    ("algorithm", "AES-256-GCM"),
                    ("events", &count),
                    ("key_id", &key_id),
                ],
                subjects: &subjects,
            };
            out.side(self.audit.record_fields(&action, now));
        }
        out.count_delivered(
            metrics::counter!(m::PII_FIELDS_ENCRYPTED_TOTAL, "stage" => GROUP, "key_id" => key_id),
            fields,
        );
        Ok(batch)
    }

    /// Sets each payload variant of the plan's output null where the input's was. A
    /// `CASE WHEN variant IS NOT NULL` per variant in the SQL would do the same but copy the
    /// batch's payloads once per variant; this only builds three validity bitmaps.
    fn restore_variants(
        &self,
        input: &RecordBatch,
        out: &RecordBatch,
    ) -> Result<RecordBatch, StageError> {
        let fail =
            |what: &str| StageError::Transform(format!("restoring payload variants: {what}"));
        let rows = out
            .column_by_name(ROW)
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::UInt32Type>())
            .ok_or_else(|| fail("no _row column"))?;
        let source = input
            .column_by_name("payload")
            .and_then(|c| c.as_struct_opt())
            .ok_or_else(|| fail("no input payload"))?;
        let index = out
            .schema()
            .index_of("payload")
            .map_err(|_| fail("no output payload"))?;
        let payload = out
            .column(index)
            .as_struct_opt()
            .ok_or_else(|| fail("payload is not a struct"))?;
        let (fields, mut children, nulls) = payload.clone().into_parts();
        for variant in &self.variants {
            let (Some(at), Some(was)) = (
                fields.iter().position(|f| f.name() == variant),
                source.column_by_name(variant),
            ) else {
                continue;
            };
            let validity: arrow::buffer::BooleanBuffer = rows
                .values()
                .iter()
                .map(|row| was.is_valid(*row as usize))
                .collect();
            let Some(normalized) = children[at].as_struct_opt() else {
                return Err(fail(variant));
            };
            let (f, c, _) = normalized.clone().into_parts();
            children[at] = std::sync::Arc::new(
                arrow::array::StructArray::try_new(f, c, Some(validity.into()))
                    .map_err(|e| fail(&e.to_string()))?,
            );
        }
        let payload = arrow::array::StructArray::try_new(fields, children, nulls)
            .map_err(|e| fail(&e.to_string()))?;
        let mut columns = out.columns().to_vec();
        columns[index] = std::sync::Arc::new(payload);
        RecordBatch::try_new(out.schema(), columns).map_err(|e| fail(&e.to_string()))
    }

    fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch, StageError> {
        let columns = self
            .output_schema
            .fields()
            .iter()
            .map(|field| {
                let column = batch.column_by_name(field.name()).ok_or_else(|| {
                    StageError::Transform(format!("missing output column {}", field.name()))
                })?;
                arrow::compute::cast(column, field.data_type())
                    .map_err(|e| StageError::Transform(format!("{}: {e}", field.name())))
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        Ok(RecordBatch::try_new(self.output_schema.clone(), columns)?)
    }
}

impl Stage for Bronze {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let input = number_rows(&self.plan_input, &input)?;
        let results = self.plan.run(input.clone()).await?;
        let mut accepted = Vec::new();
        let mut source_rows = Vec::new();
        for batch in results {
            let batch = self.restore_variants(&input, &batch)?;
            let reject = batch
                .column_by_name(REJECT)
                .ok_or_else(|| StageError::Transform("no _reject column".into()))?
                .as_string::<i32>()
                .clone();
            let row = batch
                .column_by_name(ROW)
                .ok_or_else(|| StageError::Transform("no _row column".into()))?
                .as_primitive::<arrow::datatypes::UInt32Type>()
                .clone();
            for i in 0..batch.num_rows() {
                if reject.is_null(i) {
                    source_rows.push(Some(row.value(i)));
                } else {
                    let reason = reject.value(i);
                    out.reject(
                        row.value(i),
                        RecordFailure::poison(
                            reason,
                            self.descriptions
                                .get(reason)
                                .cloned()
                                .unwrap_or_else(|| reason.to_string()),
                        ),
                    );
                }
            }
            let keep = arrow::compute::is_null(&reject)?;
            let kept = arrow::compute::filter_record_batch(&batch, &keep)?;
            accepted.push(self.conform(&kept)?);
        }
        let batch = match accepted.len() {
            0 => RecordBatch::new_empty(self.output_schema.clone()),
            1 => accepted.remove(0),
            _ => arrow::compute::concat_batches(&self.output_schema, &accepted)?,
        };
        let batch = self.protect(batch, out)?;
        out.emit_rows(batch, source_rows)
    }
}

#[cfg(test)]
mod tests;
