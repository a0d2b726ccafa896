//! The second drift check: reconciliation of silver's entity state against an
//! authoritative snapshot exported from the system of record (`medallion drift check`).
//!
//! silver keeps, with each entity's state in its compacted changelog, the SHA-256 of the
//! entity's canonical fields (`entity.canonical` in `feeds.yaml`; for cases `case_id, title,
//! status, severity, updated_at`). The check reads that changelog to its end, computes the same
//! hash for every row of the snapshot (JSON lines or Parquet, its text normalized as bronze
//! normalizes the feed), and reports every entity whose hashes differ or that only one side
//! has; each finding is also recorded on `audit.events` (`drift.reconciled`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use medallion_contracts::feeds::{canonical_hash, Feed, FeedCatalog, Normalize};
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::{ContractSet, TopicConfig};
use medallion_runtime::audit::AuditAction;
use medallion_runtime::kafka::KafkaConnection;
use serde_json::Value as Json;

use super::state::EntityState;
use super::GROUP;

/// Why the check could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("snapshot {path}: {message}")]
    Snapshot { path: String, message: String },
    #[error("snapshot {path}, row {row}: {message}")]
    Row {
        path: String,
        row: usize,
        message: String,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Feeds(#[from] medallion_contracts::feeds::FeedError),
    #[error(transparent)]
    Restore(#[from] medallion_runtime::changelog::RestoreError),
    /// The audit topic's schema could not be registered or encoded.
    #[error(transparent)]
    Audit(#[from] medallion_runtime::error::SetupError),
    #[error("recording on audit.events: {0}")]
    Produce(String),
}

/// What differs for one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Both sides have the entity and its canonical hashes differ.
    HashMismatch,
    /// The snapshot has the entity, silver does not.
    MissingInSilver,
    /// silver has the entity (of an org the snapshot covers), the snapshot does not.
    MissingInSnapshot,
    /// silver's state was written before it kept hashes: reprocess to compare it.
    NoHash,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HashMismatch => "hash_mismatch",
            Kind::MissingInSilver => "missing_in_silver",
            Kind::MissingInSnapshot => "missing_in_snapshot",
            Kind::NoHash => "no_hash",
        }
    }
}

/// One side's view of an entity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Side {
    pub hash: Option<String>,
    pub updated_at: i64,
    /// The event that set silver's state (silver's side only).
    pub event_id: Option<String>,
}

/// One entity that does not reconcile.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub org_id: i64,
    pub entity_id: String,
    pub kind: Kind,
    pub silver: Option<Side>,
    pub snapshot: Option<Side>,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub entity_type: String,
    /// Entities of the type in silver's state, all orgs.
    pub in_silver: usize,
    pub in_snapshot: usize,
    /// Entities whose hashes agree.
    pub matched: usize,
    pub findings: Vec<Finding>,
}

/// A snapshot row, reduced to what the hash needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub org_id: i64,
    pub entity_id: String,
    pub updated_at: i64,
    pub hash: String,
}

/// The snapshot column a catalog expression reads: the field of a plain `$path` reference
/// (its last part, as a system of record names it) with how bronze normalizes that field, or
/// `fallback` unnormalized.
fn column_of(feed: &Feed, sql: &str, fallback: &str) -> (String, Option<Normalize>) {
    let refs = Feed::references(sql);
    match refs.as_slice() {
        [path] if sql.trim() == format!("${path}") => (
            path.rsplit('.').next().unwrap_or(path).to_string(),
            Some(feed.normalization(path)),
        ),
        _ => (fallback.to_string(), None),
    }
}

/// The text silver would carry for a snapshot value (text normalized, numbers as SQL casts
/// them), or `None` for null or absent.
fn text_of(value: Option<&Json>, normalize: Option<Normalize>) -> Option<String> {
    match value? {
        Json::Null => None,
        Json::String(s) => Some(normalize.map_or_else(|| s.clone(), |n| n.apply(s))),
        other => Some(other.to_string()),
    }
}

/// Reads the snapshot at `path` (`.parquet`, else JSON lines) into rows of `feed`'s entity.
pub async fn load_snapshot(path: &Path, feed: &Feed) -> Result<Vec<SnapshotRow>, ReconcileError> {
    let name = path.display().to_string();
    let records = if path.extension().is_some_and(|e| e == "parquet") {
        parquet_records(path).await?
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| ReconcileError::Snapshot {
            path: name.clone(),
            message: e.to_string(),
        })?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str::<serde_json::Map<String, Json>>(line).map_err(|e| {
                    ReconcileError::Row {
                        path: name.clone(),
                        row: i + 1,
                        message: format!("not a JSON object: {e}"),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let (id_column, id_normalize) = column_of(feed, &feed.entity.id, "entity_id");
    let (updated_column, _) = column_of(feed, &feed.entity.updated_at, "updated_at");
    let canonical: Vec<(String, Option<Normalize>)> = feed
        .entity
        .canonical
        .iter()
        .map(|name| {
            let sql = feed.entity.attributes.get(name).map_or("", String::as_str);
            column_of(feed, sql, name)
        })
        .collect();
    records
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let row_error = |message: String| ReconcileError::Row {
                path: name.clone(),
                row: i + 1,
                message,
            };
            let org_id = record
                .get("org_id")
                .and_then(Json::as_i64)
                .ok_or_else(|| row_error("needs a numeric org_id".into()))?;
            let entity_id = text_of(record.get(&id_column), id_normalize)
                .ok_or_else(|| row_error(format!("needs {id_column}")))?;
            let updated_at = record
                .get(&updated_column)
                .and_then(Json::as_i64)
                .ok_or_else(|| {
                    row_error(format!("needs {updated_column} in epoch milliseconds"))
                })?;
            let values: Vec<Option<String>> = canonical
                .iter()
                .map(|(column, normalize)| text_of(record.get(column), *normalize))
                .collect();
            let values: Vec<Option<&str>> = values.iter().map(Option::as_deref).collect();
            Ok(SnapshotRow {
                hash: canonical_hash(&entity_id, &values, updated_at),
                org_id,
                entity_id,
                updated_at,
            })
        })
        .collect()
}

/// The rows of a Parquet file as JSON objects (integers as numbers, everything else as text).
async fn parquet_records(
    path: &Path,
) -> Result<Vec<serde_json::Map<String, Json>>, ReconcileError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Int64Type};
    let error = |message: String| ReconcileError::Snapshot {
        path: path.display().to_string(),
        message,
    };
    let ctx = datafusion::prelude::SessionContext::new();
    let batches = ctx
        .read_parquet(
            path.display().to_string(),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .map_err(|e| error(e.to_string()))?
        .collect()
        .await
        .map_err(|e| error(e.to_string()))?;
    let mut out = Vec::new();
    for batch in batches {
        let mut rows = vec![serde_json::Map::new(); batch.num_rows()];
        for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
            let integer = matches!(
                field.data_type(),
                DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::UInt8
                    | DataType::UInt16
                    | DataType::UInt32
            );
            let target = if integer {
                DataType::Int64
            } else {
                DataType::Utf8
            };
            let cast = arrow::compute::cast(column, &target)
                .map_err(|e| error(format!("column {}: {e}", field.name())))?;
            for (i, row) in rows.iter_mut().enumerate() {
                let value = if cast.is_null(i) {
                    Json::Null
                } else if integer {
                    Json::from(cast.as_primitive::<Int64Type>().value(i))
                } else {
                    Json::from(cast.as_string::<i32>().value(i))
                };
                row.insert(field.name().clone(), value);
            }
        }
        out.extend(rows);
    }
    Ok(out)
}

/// Compares silver's states (changelog key → state) of `entity_type` with the snapshot.
/// Entities of orgs the snapshot does not mention are not reported missing from it: a
/// snapshot may cover some tenants only.
pub fn compare(
    entity_type: &str,
    states: &HashMap<String, EntityState>,
    snapshot: &[SnapshotRow],
) -> Report {
    let mut silver: BTreeMap<(i64, &str), &EntityState> = BTreeMap::new();
    for (key, state) in states {
        let mut parts = key.splitn(3, '/');
        let (Some(org), Some(t), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if t != entity_type {
            continue;
        }
        if let Ok(org) = org.parse::<i64>() {
            silver.insert((org, id), state);
        }
    }
    let orgs: BTreeSet<i64> = snapshot.iter().map(|r| r.org_id).collect();
    let mut report = Report {
        entity_type: entity_type.to_string(),
        in_silver: silver.len(),
        in_snapshot: snapshot.len(),
        ..Report::default()
    };
    let mut seen = BTreeSet::new();
    for row in snapshot {
        seen.insert((row.org_id, row.entity_id.as_str()));
        let theirs = Side {
            hash: Some(row.hash.clone()),
            updated_at: row.updated_at,
            event_id: None,
        };
        let finding = |kind, silver: Option<Side>| Finding {
            org_id: row.org_id,
            entity_id: row.entity_id.clone(),
            kind,
            silver,
            snapshot: Some(theirs.clone()),
        };
        match silver.get(&(row.org_id, row.entity_id.as_str())) {
            None => report.findings.push(finding(Kind::MissingInSilver, None)),
            Some(state) => {
                let ours = side_of(state);
                match &state.hash {
                    None => report.findings.push(finding(Kind::NoHash, Some(ours))),
                    Some(h) if *h == row.hash => report.matched += 1,
                    Some(_) => report
                        .findings
                        .push(finding(Kind::HashMismatch, Some(ours))),
                }
            }
        }
    }
    for ((org, id), state) in &silver {
        if orgs.contains(org) && !seen.contains(&(*org, *id)) {
            report.findings.push(Finding {
                org_id: *org,
                entity_id: id.to_string(),
                kind: Kind::MissingInSnapshot,
                silver: Some(side_of(state)),
                snapshot: None,
            });
        }
    }
    report.findings.sort();
    report
}

fn side_of(state: &EntityState) -> Side {
    Side {
        hash: state.hash.clone(),
        updated_at: state.updated_at,
        event_id: Some(state.event_id.clone()),
    }
}

/// Every entity state of silver's changelog, read to its current end.
pub async fn read_states(
    kafka: &KafkaConnection,
    topics: &TopicConfig,
) -> Result<HashMap<String, EntityState>, ReconcileError> {
    let group = topics.group_name(GROUP);
    let changelog = topics.changelog_of(&group).ok_or_else(|| {
        ReconcileError::Setup(format!(
            "topic-config.yaml declares no changelog for {group}"
        ))
    })?;
    let partitions = topics
        .changelogs
        .get(changelog)
        .and_then(|c| topics.topic(&c.partitioned_like))
        .map(|t| t.partitions)
        .ok_or_else(|| {
            ReconcileError::Setup(format!("changelog {changelog}: no input topic to follow"))
        })?;
    let mut states = HashMap::new();
    for partition in 0..partitions as i32 {
        let entries = medallion_runtime::changelog::restore(kafka, changelog, partition).await?;
        states.extend(
            entries
                .into_iter()
                .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, EntityState::decode(&v)?))),
        );
    }
    Ok(states)
}

/// The `audit.events` record of a finding; the same finding gives the same event id, so a
/// check run twice over unchanged data records nothing new downstream.
pub fn audit_action(
    report: &Report,
    finding: &Finding,
    snapshot: &str,
    run_id: &str,
) -> AuditAction {
    let hash = |s: &Option<Side>| s.as_ref().and_then(|s| s.hash.clone()).unwrap_or_default();
    let updated = |s: &Option<Side>| {
        s.as_ref()
            .map(|s| s.updated_at.to_string())
            .unwrap_or_default()
    };
    let (ours, theirs) = (hash(&finding.silver), hash(&finding.snapshot));
    let org = finding.org_id.to_string();
    let mut details: BTreeMap<String, String> = [
        ("silver_hash", ours.clone()),
        ("snapshot_hash", theirs.clone()),
        ("silver_updated_at", updated(&finding.silver)),
        ("snapshot_updated_at", updated(&finding.snapshot)),
        ("snapshot", snapshot.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(event) = finding.silver.as_ref().and_then(|s| s.event_id.clone()) {
        details.insert("silver_event_id".into(), event);
    }
    AuditAction {
        event_id: medallion_runtime::ids::stable_id(&[
            "drift.reconciled",
            &org,
            &report.entity_type,
            &finding.entity_id,
            finding.kind.as_str(),
            &ours,
            &theirs,
        ]),
        action: "drift.reconciled".into(),
        actor: "medallion drift check".into(),
        org_id: finding.org_id,
        correlation_id: run_id.to_string(),
        trace_id: None,
        resource_type: report.entity_type.clone(),
        resource_id: finding.entity_id.clone(),
        outcome: finding.kind.as_str().into(),
        reason: Some(format!(
            "{} {} of org {}: {} against the snapshot",
            report.entity_type,
            finding.entity_id,
            finding.org_id,
            finding.kind.as_str().replace('_', " ")
        )),
        subjects: Vec::new(),
        details: details.into_iter().collect(),
    }
}

/// The report as the command prints it: one line per finding, then the totals.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    if !report.findings.is_empty() {
        out.push_str(&format!(
            "{:<8} {:<24} {:<20} {:<16} {:<16} {}\n",
            "org", "entity", "finding", "silver hash", "snapshot hash", "silver event"
        ));
    }
    let short = |s: &Option<Side>| {
        s.as_ref()
            .and_then(|s| s.hash.as_deref())
            .map(|h| h.chars().take(12).collect::<String>())
            .unwrap_or_else(|| "-".into())
    };
    for f in &report.findings {
        out.push_str(&format!(
            "{:<8} {:<24} {:<20} {:<16} {:<16} {}\n",
            f.org_id,
            f.entity_id,
            f.kind.as_str(),
            short(&f.silver),
            short(&f.snapshot),
            f.silver
                .as_ref()
                .and_then(|s| s.event_id.as_deref())
                .unwrap_or("-")
        ));
    }
    out.push_str(&format!(
        "{} {} entities in silver, {} in the snapshot: {} agree, {} differ\n",
        report.entity_type,
        report.in_silver,
        report.in_snapshot,
        report.matched,
        report.findings.len()
    ));
    out
}

/// What the check needs to run against a cluster.
pub struct Check<'a> {
    pub kafka: &'a KafkaConnection,
    pub registry: &'a RegistryClient,
    pub home: &'a Path,
    pub contracts: &'a ContractSet,
    pub topics: &'a TopicConfig,
    pub entity_type: &'a str,
    pub snapshot: &'a Path,
    /// Record each finding on `audit.events`.
    pub record: bool,
}

impl Check<'_> {
    /// Reads silver's state and the snapshot, compares them and records the findings.
    pub async fn run(&self) -> Result<Report, ReconcileError> {
        let catalog = FeedCatalog::load(self.home, self.contracts)?;
        let feed = catalog
            .feeds
            .iter()
            .find(|f| f.entity.entity_type == self.entity_type)
            .ok_or_else(|| {
                ReconcileError::Setup(format!(
                    "no feed of feeds.yaml has entity type `{}`",
                    self.entity_type
                ))
            })?;
        if feed.entity.canonical.is_empty() {
            return Err(ReconcileError::Setup(format!(
                "feed `{}` declares no entity.canonical fields to reconcile",
                feed.event_type
            )));
        }
        let rows = load_snapshot(self.snapshot, feed).await?;
        let states = read_states(self.kafka, self.topics).await?;
        let report = compare(self.entity_type, &states, &rows);
        if self.record && !report.findings.is_empty() {
            self.record_findings(&report).await?;
        }
        Ok(report)
    }

    async fn record_findings(&self, report: &Report) -> Result<(), ReconcileError> {
        let encoder =
            medallion_runtime::audit::register_encoder(self.registry, self.topics, self.contracts)
                .await?;
        let producer = medallion_runtime::kafka::producer(self.kafka)
            .map_err(|e| ReconcileError::Produce(e.to_string()))?;
        let run_id = uuid::Uuid::new_v4().to_string();
        let snapshot = self.snapshot.display().to_string();
        let now = medallion_runtime::clock::now_ms();
        for finding in &report.findings {
            let record = encoder.record(&audit_action(report, finding, &snapshot, &run_id), now);
            let mut out = rdkafka::producer::FutureRecord::to(&record.topic).payload(&record.value);
            if let Some(key) = &record.key {
                out = out.key(key);
            }
            producer
                .send(out, std::time::Duration::from_secs(30))
                .await
                .map_err(|(e, _)| ReconcileError::Produce(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::silver::state::Change;

    fn state(hash: Option<&str>, updated_at: i64) -> EntityState {
        EntityState {
            updated_at,
            source_system: "v4".into(),
            event_id: format!("e-{updated_at}"),
            change: Change::Created,
            hash: hash.map(str::to_string),
        }
    }

    fn row(org: i64, id: &str, hash: &str) -> SnapshotRow {
        SnapshotRow {
            org_id: org,
            entity_id: id.into(),
            updated_at: 5,
            hash: hash.into(),
        }
    }

    #[test]
    fn every_kind_of_difference_is_found_once() {
        let states: HashMap<String, EntityState> = [
            ("7/case/C-1", state(Some("h1"), 1)),
            ("7/case/C-2", state(Some("h2"), 2)),
            ("7/case/C-3", state(Some("h3"), 3)),
            ("7/case/C-4", state(None, 4)),
            ("7/lead/L-1", state(None, 4)),
            // An org the snapshot does not cover is not missing from it.
            ("8/case/C-9", state(Some("h9"), 9)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let snapshot = [
            row(7, "C-1", "h1"),
            row(7, "C-2", "other"),
            row(7, "C-4", "h4"),
            row(7, "C-5", "h5"),
        ];
        let report = compare("case", &states, &snapshot);
        let got: Vec<(&str, Kind)> = report
            .findings
            .iter()
            .map(|f| (f.entity_id.as_str(), f.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("C-2", Kind::HashMismatch),
                ("C-3", Kind::MissingInSnapshot),
                ("C-4", Kind::NoHash),
                ("C-5", Kind::MissingInSilver),
            ]
        );
        assert_eq!(
            (report.matched, report.in_silver, report.in_snapshot),
            (1, 5, 4)
        );
    }
}
