//! bronze-processor (`connector.data.raw` → `bronze.data.cleaned`): validates the envelope
//! (required fields, UUID `event_id`, event time within a sanity range, `org_id` > 0 and equal
//! to the record key, payload variant matching `event_type`, the seed's allowed values),
//! normalizes (trim, canonical case for enums and ids; times are UTC epoch milliseconds), and
//! hands valid events on. Personal data (schema fields marked `"pii": true`) is encrypted with
//! the active key before it leaves bronze; the record carries the key id in a header and each
//! encryption is recorded on `audit.events`. Dedup by `event_id` is the runtime's.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use medallion_runtime::audit::{AuditEncoder, AuditFields};
use medallion_runtime::error::{RecordFailure, SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::pii::{Keyring, PiiConfig, KEY_ID_HEADER};
use medallion_runtime::worker::{meta, SideRecord, Stage, StageOutput, StageSetup};
use serde::{Deserialize, Serialize};

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

fn describe(reason: &str, config: &BronzeConfig) -> String {
    match reason {
        reason::MISSING_FIELD => "a required envelope field (event_id, event_type, event_version, correlation_id, source.service, source.instance) is empty".into(),
        reason::INVALID_EVENT_ID => "event_id is not a UUID".into(),
        reason::INVALID_ORG_ID => "org_id must be > 0".into(),
        reason::KEY_MISMATCH => "record key differs from org_id".into(),
        reason::TIMESTAMP_OUT_OF_RANGE => format!(
            "timestamp is more than {} ms old or more than {} ms in the future",
            config.max_event_age_ms, config.max_future_skew_ms
        ),
        reason::PAYLOAD_MISMATCH => "the payload must carry exactly one feed variant, the one event_type names (release.sync.created → release_sync, case.sync.v1 → case_sync, lead.created → lead_created)".into(),
        reason::INVALID_VALUE => "a field holds a value outside the seed's allowed set".into(),
        other => other.to_string(),
    }
}

/// The payload variants (Avro unions with null); the SQL normalizes each one's fields for
/// every row, and [`Bronze::restore_variants`] then marks it null where the input's was.
const VARIANTS: [&str; 3] = ["release_sync", "case_sync", "lead_created"];

/// The transform, as SQL over table `input`.
pub fn sql(config: &BronzeConfig, input_topic: &str) -> String {
    struct_access(&sql_with_brackets(config, input_topic))
}

fn sql_with_brackets(config: &BronzeConfig, input_topic: &str) -> String {
    let p = r#""payload""#;
    let rs = format!("{p}['release_sync']");
    let cs = format!("{p}['case_sync']");
    let ls = format!("{p}['lead_created']");
    let only = |set: &str| {
        let others: Vec<String> = [&rs, &cs, &ls]
            .iter()
            .filter(|v| v.as_str() != set)
            .map(|v| format!("{v} IS NULL"))
            .collect();
        format!("({set} IS NOT NULL AND {})", others.join(" AND "))
    };
    let blank = |e: &str| format!("({e} IS NULL OR trim({e}) = '')");
    let topic = input_topic.replace('\'', "''");
    format!(
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
    CASE WHEN lower(trim("event_type")) = 'release.sync.created' AND NOT {only_release}
           OR lower(trim("event_type")) = 'case.sync.v1' AND NOT {only_case}
           OR lower(trim("event_type")) = 'lead.created' AND NOT {only_lead}
           -- Exactly one variant is set, the one event_type names: an event type no variant
           -- belongs to never matches, with or without a payload variant.
           OR COALESCE(lower(trim("event_type")) NOT IN ('release.sync.created', 'case.sync.v1', 'lead.created'), true)
         THEN '{payload_mismatch}' ELSE NULL END,
    CASE WHEN {rs} IS NOT NULL AND (
           lower(trim({rs}['sbom_ref']['storage_type'])) NOT IN ('ipfs', 's3')
           OR lower(trim({rs}['endpoint']['endpoint_type'])) NOT IN ('eks', 'lambda', 'gke', 'fargate', 'iot', 'mission_asset')
           OR {blank_release_name} OR {blank_release_version})
      OR {cs} IS NOT NULL AND (
           {cs}['severity'] NOT BETWEEN 1 AND 4
           OR lower(trim({cs}['status'])) NOT IN ('open', 'resolved', 'deleted')
           OR {cs}['tlp'] NOT BETWEEN 0 AND 3 OR {cs}['pap'] NOT BETWEEN 0 AND 3
           OR {blank_case_id})
      OR {ls} IS NOT NULL AND (NOT strpos(trim({ls}['email']), '@') > 1)
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
  named_struct(
    'connector_id', trim({p}['connector_id']),
    'source_system', lower(trim({p}['source_system'])),
    'release_sync', named_struct(
        'event_time', {rs}['event_time'],
        'synced_at', {rs}['synced_at'],
        'release', named_struct(
            'name', trim({rs}['release']['name']),
            'version', trim({rs}['release']['version']),
            'projecttype', lower(trim({rs}['release']['projecttype'])),
            'gitcommit', lower(trim({rs}['release']['gitcommit'])),
            'dockersha', lower(trim({rs}['release']['dockersha'])),
            'is_public', {rs}['release']['is_public']),
        'sbom_ref', named_struct(
            'cid', trim({rs}['sbom_ref']['cid']),
            'storage_type', lower(trim({rs}['sbom_ref']['storage_type'])),
            'content_sha', lower(trim({rs}['sbom_ref']['content_sha'])),
            'uploaded_at', {rs}['sbom_ref']['uploaded_at']),
        'endpoint', named_struct(
            'name', trim({rs}['endpoint']['name']),
            'endpoint_type', lower(trim({rs}['endpoint']['endpoint_type'])),
            'environment', lower(trim({rs}['endpoint']['environment'])),
            'is_public', {rs}['endpoint']['is_public'])),
    'case_sync', named_struct(
        'case_id', upper(trim({cs}['case_id'])),
        'title', trim({cs}['title']),
        'description', trim({cs}['description']),
        'severity', {cs}['severity'],
        'status', initcap(lower(trim({cs}['status']))),
        'owner', trim({cs}['owner']),
        'flag', {cs}['flag'],
        'tlp', {cs}['tlp'],
        'pap', {cs}['pap'],
        'created_at', {cs}['created_at'],
        'updated_at', {cs}['updated_at'],
        'custom_fields', {cs}['custom_fields']),
    'lead_created', named_struct(
        'lead_id', lower(trim({ls}['lead_id'])),
        'name', trim({ls}['name']),
        'email', lower(trim({ls}['email'])),
        'source', lower(trim({ls}['source'])),
        'assigned_to', trim({ls}['assigned_to']),
        'created_at', {ls}['created_at']),
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
        blank_release_name = blank(&format!("{rs}['release']['name']")),
        blank_release_version = blank(&format!("{rs}['release']['version']")),
        blank_case_id = blank(&format!("{cs}['case_id']")),
        only_release = only(&rs),
        only_case = only(&cs),
        only_lead = only(&ls),
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
    )
}

/// The bronze stage: one DataFusion plan, reused for every batch.
pub struct Bronze {
    config: BronzeConfig,
    plan: BatchPlan,
    plan_input: SchemaRef,
    output_schema: SchemaRef,
    keyring: Keyring,
    /// Dotted paths of the personal-data fields of the input contract.
    pii_fields: Vec<String>,
    audit: AuditEncoder,
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
        let plan_input = with_row_column(&setup.input_schema);
        let plan = BatchPlan::new(&sql(&config, &setup.input_topic), plan_input.clone())
            .await
            .map_err(|e| SetupError::plan("the bronze transform", e))?;
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
        Ok(Self {
            config,
            plan,
            plan_input,
            output_schema: setup.output_schema,
            keyring,
            pii_fields,
            audit,
        })
    }

    /// Encrypts the personal data of `batch`: the key id goes in a header of each record that
    /// had some, and each encryption is recorded on `audit.events`.
    #[allow(clippy::type_complexity)]
    fn protect(
        &self,
        batch: RecordBatch,
    ) -> Result<(RecordBatch, Vec<(u32, String, Vec<u8>)>, Vec<SideRecord>), StageError> {
        if self.pii_fields.is_empty() || batch.num_rows() == 0 {
            return Ok((batch, Vec::new(), Vec::new()));
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
        let now = medallion_runtime::worker::now_ms();
        let mut headers = Vec::new();
        let mut fields = 0u64;
        // One audit record per org of the batch part, listing its sealed events and fields.
        let mut by_org: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for (row, paths) in touched.iter().enumerate() {
            if paths.is_empty() {
                continue;
            }
            fields += paths.len() as u64;
            headers.push((
                row as u32,
                KEY_ID_HEADER.to_string(),
                key_id.clone().into_bytes(),
            ));
            by_org.entry(orgs.value(row)).or_default().push(row);
        }
        let mut side = Vec::with_capacity(by_org.len());
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
            side.push(self.audit.record_fields(&action, now));
        }
        metrics::counter!(m::PII_FIELDS_ENCRYPTED_TOTAL, "stage" => GROUP, "key_id" => key_id)
            .increment(fields);
        Ok((batch, headers, side))
    }

    /// Sets each payload variant of the plan's output null where the input's was. A
    /// `CASE WHEN variant IS NOT NULL` per variant in the SQL would do the same but copy the
    /// batch's payloads once per variant; this only builds three validity bitmaps.
    fn restore_variants(input: &RecordBatch, out: &RecordBatch) -> Result<RecordBatch, StageError> {
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
        for variant in VARIANTS {
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
    async fn process(&mut self, input: RecordBatch) -> Result<StageOutput, StageError> {
        let input = number_rows(&self.plan_input, &input)?;
        let results = self.plan.run(input.clone()).await?;
        let mut accepted = Vec::new();
        let mut source_rows = Vec::new();
        let mut rejected = Vec::new();
        for batch in results {
            let batch = Self::restore_variants(&input, &batch)?;
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
                    rejected.push((
                        row.value(i),
                        RecordFailure::poison(reason, describe(reason, &self.config)),
                    ));
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
        let (batch, row_headers, side) = self.protect(batch)?;
        Ok(StageOutput {
            batch,
            source_rows,
            rejected,
            side,
            deferred: Vec::new(),
            row_headers,
            events: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests;
