//! SQL built from the feed catalog (`feeds.yaml`): bronze's per-feed checks and
//! normalization, silver's entity and attribute columns and the metric samples each feed
//! contributes. The catalog's `$path` references become struct access into the feed's branch
//! of `payload`.

use arrow::datatypes::{DataType, Fields, SchemaRef};
use medallion_contracts::feeds::{Feed, FeedCatalog, FeedError, Normalize, SEMVER_PATTERN};
use medallion_runtime::error::SetupError;
use medallion_runtime::worker::StageSetup;

use crate::plan::{struct_access, BatchPlan};

/// Loads the catalog of the stage's home and checks it against the contracts.
pub fn load(setup: &StageSetup) -> Result<FeedCatalog, SetupError> {
    Ok(FeedCatalog::load(&setup.home, &setup.contracts)?)
}

/// A single-quoted SQL literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The SQL of the field at `path` of `feed`'s branch; `payload` is how the SQL names the
/// payload column (`"payload"` or `payload`).
pub fn access(payload: &str, feed: &Feed, path: &str) -> String {
    let mut out = format!("{payload}[{}]", literal(&feed.variant));
    for part in path.split('.') {
        out.push_str(&format!("[{}]", literal(part)));
    }
    out
}

/// `feed`'s branch.
pub fn branch(payload: &str, feed: &Feed) -> String {
    format!("{payload}[{}]", literal(&feed.variant))
}

/// A catalog expression with its `$path` references resolved.
pub fn expand(payload: &str, feed: &Feed, sql: &str) -> String {
    feed.expand(sql, |path| access(payload, feed, path))
}

/// `x` normalized as the catalog says.
pub fn normalized(how: Normalize, x: &str) -> String {
    match how {
        Normalize::Trim => format!("trim({x})"),
        Normalize::Lower => format!("lower(trim({x}))"),
        Normalize::Upper => format!("upper(trim({x}))"),
        Normalize::Title => format!("initcap(lower(trim({x})))"),
        Normalize::Semver => format!("regexp_replace(trim({x}), '^[vV]', '')"),
        Normalize::Keep => x.to_string(),
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// bronze: `named_struct` of a feed's branch with every text field normalized, recursing into
/// nested records; `fields` are the branch's Arrow fields.
pub fn normalized_branch(payload: &str, feed: &Feed, fields: &Fields, prefix: &str) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|f| {
            let path = if prefix.is_empty() {
                f.name().clone()
            } else {
                format!("{prefix}.{}", f.name())
            };
            let x = access(payload, feed, &path);
            let value = match f.data_type() {
                DataType::Struct(children) => normalized_branch(payload, feed, children, &path),
                t if is_text(t) => normalized(feed.normalization(&path), &x),
                _ => x,
            };
            format!("{}, {value}", literal(f.name()))
        })
        .collect();
    format!("named_struct({})", parts.join(", "))
}

/// bronze: a boolean SQL that is true when the event carries `feed`'s branch and the branch
/// breaks one of the entry's rules (required, allowed, ranges, checks, SemVer); `None` when
/// the entry has no rule.
pub fn broken_rules(payload: &str, feed: &Feed, text_fields: &[String]) -> Option<String> {
    let x = |path: &str| access(payload, feed, path);
    let mut conditions = Vec::new();
    for path in &feed.required {
        if text_fields.contains(path) {
            conditions.push(format!("({0} IS NULL OR trim({0}) = '')", x(path)));
        } else {
            conditions.push(format!("{} IS NULL", x(path)));
        }
    }
    for (path, values) in &feed.allowed {
        let values: Vec<String> = values.iter().map(|v| literal(v)).collect();
        conditions.push(format!(
            "{} NOT IN ({})",
            normalized(feed.normalization(path), &x(path)),
            values.join(", ")
        ));
    }
    for (path, range) in &feed.ranges {
        conditions.push(format!(
            "{} NOT BETWEEN {} AND {}",
            x(path),
            range.min,
            range.max
        ));
    }
    for (path, how) in &feed.normalize {
        if *how == Normalize::Semver {
            conditions.push(format!(
                "NOT regexp_like({}, {})",
                normalized(*how, &x(path)),
                literal(SEMVER_PATTERN)
            ));
        }
    }
    for sql in feed.checks.values() {
        conditions.push(format!(
            "NOT coalesce(({}), true)",
            expand(payload, feed, sql)
        ));
    }
    (!conditions.is_empty()).then(|| {
        format!(
            "({} IS NOT NULL AND ({}))",
            branch(payload, feed),
            conditions.join(" OR ")
        )
    })
}

/// The text fields of a branch, as dotted paths.
pub fn text_paths(fields: &Fields, prefix: &str, out: &mut Vec<String>) {
    for f in fields {
        let path = if prefix.is_empty() {
            f.name().clone()
        } else {
            format!("{prefix}.{}", f.name())
        };
        match f.data_type() {
            DataType::Struct(children) => text_paths(children, &path, out),
            t if is_text(t) => out.push(path),
            _ => {}
        }
    }
}

/// bronze: true when the payload does not carry exactly the branch `event_type` names (an
/// event type no feed has never matches).
pub fn payload_mismatch(payload: &str, catalog: &FeedCatalog, event_type: &str) -> String {
    let only = |feed: &Feed| {
        let mut parts = vec![format!("{} IS NOT NULL", branch(payload, feed))];
        parts.extend(
            catalog
                .feeds
                .iter()
                .filter(|other| other.variant != feed.variant)
                .map(|other| format!("{} IS NULL", branch(payload, other))),
        );
        format!("({})", parts.join(" AND "))
    };
    let mut branches: Vec<String> = catalog
        .feeds
        .iter()
        .map(|feed| {
            format!(
                "{event_type} = {} AND NOT {}",
                literal(&feed.event_type),
                only(feed)
            )
        })
        .collect();
    let names: Vec<String> = catalog
        .feeds
        .iter()
        .map(|f| literal(&f.event_type))
        .collect();
    branches.push(format!(
        "COALESCE({event_type} NOT IN ({}), true)",
        names.join(", ")
    ));
    branches.join("\n           OR ")
}

/// silver: one output column of a value every feed may define, as
/// `CASE WHEN <branch> IS NOT NULL THEN CAST((<sql>) AS <cast>) ... END AS "<name>"`.
fn per_feed<'a>(
    catalog: &'a FeedCatalog,
    name: &str,
    cast: &str,
    sql_of: impl Fn(&'a Feed) -> Option<&'a str>,
) -> String {
    let whens: Vec<String> = catalog
        .feeds
        .iter()
        .filter_map(|feed| {
            sql_of(feed).map(|sql| {
                format!(
                    "WHEN {} IS NOT NULL THEN CAST(({}) AS {cast})",
                    branch("payload", feed),
                    expand("payload", feed, sql)
                )
            })
        })
        .collect();
    if whens.is_empty() {
        return format!("CAST(NULL AS {cast}) AS \"{name}\"");
    }
    format!("CASE {} END AS \"{name}\"", whens.join(" "))
}

/// What silver derives from the catalog: the entity columns, the canonical attributes and the
/// metric samples.
#[derive(Debug, Clone)]
pub struct Conformance {
    /// `entity_type`, `entity_id`, `updated_at`, then `attr.<name>` and `metric.<i>` columns.
    pub columns: Vec<String>,
    /// Attribute names, in column order.
    pub attributes: Vec<String>,
    /// (name, unit) of each `metric.<i>` column.
    pub metrics: Vec<(String, Option<String>)>,
    /// Per entity type with `entity.canonical`: the indexes of those attributes in
    /// [`Conformance::attributes`], in catalog order.
    pub canonical: std::collections::HashMap<String, Vec<usize>>,
}

impl Conformance {
    pub fn new(catalog: &FeedCatalog) -> Self {
        let type_whens: Vec<String> = catalog
            .feeds
            .iter()
            .map(|feed| {
                format!(
                    "WHEN {} IS NOT NULL THEN {}",
                    branch("payload", feed),
                    literal(&feed.entity.entity_type)
                )
            })
            .collect();
        let mut columns = vec![
            format!("CASE {} END AS entity_type", type_whens.join(" ")),
            per_feed(catalog, "entity_id", "VARCHAR", |f| Some(&f.entity.id)),
            per_feed(catalog, "updated_at", "BIGINT", |f| {
                Some(&f.entity.updated_at)
            }),
        ];
        let mut attributes: Vec<String> = Vec::new();
        for feed in &catalog.feeds {
            for name in feed.entity.attributes.keys() {
                if !attributes.contains(name) {
                    attributes.push(name.clone());
                }
            }
        }
        for name in &attributes {
            columns.push(per_feed(catalog, &format!("attr.{name}"), "VARCHAR", |f| {
                f.entity.attributes.get(name).map(String::as_str)
            }));
        }
        let mut metrics = Vec::new();
        for feed in &catalog.feeds {
            for metric in &feed.metrics {
                let i = metrics.len();
                columns.push(format!(
                    "CASE WHEN {} IS NOT NULL THEN CAST(({}) AS DOUBLE) END AS \"metric.{i}\"",
                    branch("payload", feed),
                    expand("payload", feed, &metric.value)
                ));
                metrics.push((metric.name.clone(), metric.unit.clone()));
            }
        }
        let canonical = catalog
            .feeds
            .iter()
            .filter(|f| !f.entity.canonical.is_empty())
            .map(|f| {
                let at = f
                    .entity
                    .canonical
                    .iter()
                    .filter_map(|name| attributes.iter().position(|a| a == name))
                    .collect();
                (f.entity.entity_type.clone(), at)
            })
            .collect();
        Self {
            columns,
            attributes,
            metrics,
            canonical,
        }
    }
}

/// Plans every expression of the catalog alone over `input`, to name the entry and key of one
/// that does not plan (the whole transform's error names neither). `payload` as in [`access`];
/// `checks` selects the bronze expressions (the branch's raw fields) instead of silver's.
pub async fn find_unplannable(
    catalog: &FeedCatalog,
    input: &SchemaRef,
    payload: &str,
    checks: bool,
) -> Result<(), SetupError> {
    for feed in &catalog.feeds {
        for (key, sql) in feed.expressions() {
            if key.starts_with("checks.") != checks {
                continue;
            }
            let cast = if key.starts_with("checks.") {
                "BOOLEAN"
            } else if key == "entity.updated_at" {
                "BIGINT"
            } else if key.starts_with("metrics[") {
                "DOUBLE"
            } else {
                "VARCHAR"
            };
            let select = format!(
                "SELECT CAST(({}) AS {cast}) AS v FROM input",
                expand(payload, feed, sql)
            );
            if let Err(e) = BatchPlan::new(&struct_access(&select), input.clone()).await {
                return Err(FeedError::entry(
                    &feed.event_type,
                    key,
                    format!("does not plan as {cast}: {e}"),
                )
                .into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medallion_contracts::feeds::EntitySpec;
    use std::collections::BTreeMap;

    fn feed() -> Feed {
        Feed {
            event_type: "x.y".into(),
            variant: "xy".into(),
            required: vec!["id".into(), "n".into()],
            allowed: [("s".to_string(), vec!["A".to_string(), "B'C".to_string()])].into(),
            ranges: BTreeMap::new(),
            checks: BTreeMap::new(),
            normalize: [("s".to_string(), Normalize::Upper)].into(),
            pii: vec![],
            entity: EntitySpec {
                entity_type: "x".into(),
                id: "$id".into(),
                updated_at: "$t".into(),
                attributes: BTreeMap::new(),
                canonical: Vec::new(),
            },
            metrics: vec![],
        }
    }

    #[test]
    fn rules_compare_normalized_text_and_quote_literals() {
        let sql = broken_rules("p", &feed(), &["id".to_string(), "s".to_string()]).expect("rules");
        assert_eq!(
            sql,
            "(p['xy'] IS NOT NULL AND ((p['xy']['id'] IS NULL OR trim(p['xy']['id']) = '') \
             OR p['xy']['n'] IS NULL OR upper(trim(p['xy']['s'])) NOT IN ('A', 'B''C')))"
        );
    }

    #[test]
    fn an_entry_without_rules_adds_no_condition() {
        let mut f = feed();
        f.required.clear();
        f.allowed.clear();
        assert_eq!(broken_rules("p", &f, &[]), None);
    }
}
