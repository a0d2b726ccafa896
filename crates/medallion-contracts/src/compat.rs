//! The BACKWARD compatibility gate: a new schema must read data written with the
//! released one. Rules: a new field needs a default; a field without a default cannot be
//! removed; types do not change (an enum may gain symbols, a union may gain branches, a type
//! may become a union that contains it). A deliberate break is released by bumping the
//! top-level `contract_version`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use apache_avro::schema::{Name, ResolvedSchema, Schema};

use crate::schemas::{Contract, ContractSet};

/// Which rule a change breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    FieldAddedWithoutDefault,
    FieldRemovedWithoutDefault,
    TypeChanged,
    EnumSymbolRemoved,
    UnionBranchRemoved,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::FieldAddedWithoutDefault => "field added without default",
            Rule::FieldRemovedWithoutDefault => "field without default removed",
            Rule::TypeChanged => "type changed",
            Rule::EnumSymbolRemoved => "enum symbol removed",
            Rule::UnionBranchRemoved => "union branch removed",
        })
    }
}

/// One broken rule at one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted field path from the top-level record, e.g. `payload.release_sync`.
    pub field: String,
    pub rule: Rule,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {} ({})", self.field, self.rule, self.detail)
    }
}

/// Checks that `new` can read everything written with `old`.
pub fn check_backward(old: &Schema, new: &Schema) -> Result<Vec<Violation>, String> {
    let old_names = ResolvedSchema::try_from(old).map_err(|e| e.to_string())?;
    let new_names = ResolvedSchema::try_from(new).map_err(|e| e.to_string())?;
    let mut checker = Checker {
        old_names: old_names.get_names(),
        new_names: new_names.get_names(),
        violations: Vec::new(),
        visiting: Vec::new(),
    };
    checker.compare(old, new, "");
    Ok(checker.violations)
}

struct Checker<'a> {
    old_names: &'a HashMap<Name, &'a Schema>,
    new_names: &'a HashMap<Name, &'a Schema>,
    violations: Vec<Violation>,
    visiting: Vec<(Name, Name)>,
}

fn label(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {}", r.name),
        Schema::Enum(e) => format!("enum {}", e.name),
        Schema::Fixed(f) => format!("fixed {} ({} bytes)", f.name, f.size),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(_) => "union".into(),
        Schema::Ref { name } => name.to_string(),
        Schema::TimestampMillis => "timestamp-millis".into(),
        Schema::TimestampMicros => "timestamp-micros".into(),
        Schema::TimestampNanos => "timestamp-nanos".into(),
        Schema::LocalTimestampMillis => "local-timestamp-millis".into(),
        Schema::LocalTimestampMicros => "local-timestamp-micros".into(),
        Schema::LocalTimestampNanos => "local-timestamp-nanos".into(),
        Schema::Date => "date".into(),
        Schema::TimeMillis => "time-millis".into(),
        Schema::TimeMicros => "time-micros".into(),
        Schema::Uuid(_) => "uuid".into(),
        Schema::Decimal(_) | Schema::BigDecimal => "decimal".into(),
        Schema::Duration(_) => "duration".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

impl<'a> Checker<'a> {
    fn deref_old(&self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.old_names.get(name).copied().unwrap_or(s),
            _ => s,
        }
    }

    fn deref_new(&self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.new_names.get(name).copied().unwrap_or(s),
            _ => s,
        }
    }

    fn push(&mut self, field: &str, rule: Rule, detail: String) {
        self.violations.push(Violation {
            field: if field.is_empty() {
                "(top level)".into()
            } else {
                field.to_string()
            },
            rule,
            detail,
        });
    }

    fn same_kind(&self, old: &'a Schema, new: &'a Schema) -> bool {
        let (old, new) = (self.deref_old(old), self.deref_new(new));
        label(old) == label(new)
            || matches!(
                (old, new),
                (Schema::Array(_), Schema::Array(_)) | (Schema::Map(_), Schema::Map(_))
            )
    }

    fn compare(&mut self, old: &'a Schema, new: &'a Schema, path: &str) {
        let old = self.deref_old(old);
        let new = self.deref_new(new);
        match (old, new) {
            (Schema::Record(o), Schema::Record(n)) => {
                if o.name != n.name {
                    self.push(
                        path,
                        Rule::TypeChanged,
                        format!("record {} became record {}", o.name, n.name),
                    );
                    return;
                }
                let key = (o.name.clone(), n.name.clone());
                if self.visiting.contains(&key) {
                    return;
                }
                self.visiting.push(key);
                for nf in &n.fields {
                    match o.fields.iter().find(|of| of.name == nf.name) {
                        Some(of) => self.compare(&of.schema, &nf.schema, &join(path, &nf.name)),
                        None if nf.default.is_none() => self.push(
                            &join(path, &nf.name),
                            Rule::FieldAddedWithoutDefault,
                            format!("new field of type {} has no default", label(&nf.schema)),
                        ),
                        None => {}
                    }
                }
                for of in &o.fields {
                    if !n.fields.iter().any(|nf| nf.name == of.name) && of.default.is_none() {
                        self.push(
                            &join(path, &of.name),
                            Rule::FieldRemovedWithoutDefault,
                            format!("removed field of type {} had no default", label(&of.schema)),
                        );
                    }
                }
                self.visiting.pop();
            }
            (Schema::Enum(o), Schema::Enum(n)) => {
                if o.name != n.name {
                    self.push(
                        path,
                        Rule::TypeChanged,
                        format!("enum {} became enum {}", o.name, n.name),
                    );
                    return;
                }
                if n.default.is_none() {
                    for symbol in o.symbols.iter().filter(|s| !n.symbols.contains(s)) {
                        self.push(
                            path,
                            Rule::EnumSymbolRemoved,
                            format!(
                                "symbol {symbol} of enum {} is gone and the enum has no default",
                                o.name
                            ),
                        );
                    }
                }
            }
            (Schema::Array(o), Schema::Array(n)) => self.compare(&o.items, &n.items, path),
            (Schema::Map(o), Schema::Map(n)) => self.compare(&o.types, &n.types, path),
            (Schema::Union(o), Schema::Union(n)) => {
                for ob in o.variants() {
                    match n.variants().iter().find(|nb| self.same_kind(ob, nb)) {
                        Some(nb) => self.compare(ob, nb, path),
                        None => self.push(
                            path,
                            Rule::UnionBranchRemoved,
                            format!("branch {} is gone", label(self.deref_old(ob))),
                        ),
                    }
                }
            }
            (_, Schema::Union(n)) => match n.variants().iter().find(|nb| self.same_kind(old, nb)) {
                Some(nb) => self.compare(old, nb, path),
                None => self.push(
                    path,
                    Rule::TypeChanged,
                    format!("{} became a union without it", label(old)),
                ),
            },
            (Schema::Fixed(o), Schema::Fixed(n)) if o.name == n.name && o.size == n.size => {}
            _ if label(old) == label(new) => {}
            _ => self.push(
                path,
                Rule::TypeChanged,
                format!("{} became {}", label(old), label(new)),
            ),
        }
    }
}

/// The verdict for one contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No released version yet.
    New,
    /// Compatible with the released version (possibly identical).
    Compatible,
    /// Breaking, but `contract_version` was bumped from the released one.
    BreakingReleased {
        from: u32,
        to: u32,
        violations: Vec<Violation>,
    },
    /// Breaking without a version bump: the gate fails.
    Broken { violations: Vec<Violation> },
    /// `contract_version` is lower than the released one: the gate fails.
    VersionWentBack { released: u32, current: u32 },
    /// A released contract has no schema file any more: the gate fails.
    Removed,
}

/// The gate's report over every contract.
#[derive(Debug, Clone)]
pub struct GateReport {
    pub entries: Vec<(String, Verdict)>,
}

impl GateReport {
    pub fn passed(&self) -> bool {
        !self.entries.iter().any(|(_, v)| {
            matches!(
                v,
                Verdict::Broken { .. } | Verdict::VersionWentBack { .. } | Verdict::Removed
            )
        })
    }
}

impl fmt::Display for GateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (path, verdict) in &self.entries {
            match verdict {
                Verdict::New => writeln!(f, "new         {path} (no released version)")?,
                Verdict::Compatible => writeln!(f, "ok          {path}")?,
                Verdict::BreakingReleased {
                    from,
                    to,
                    violations,
                } => {
                    writeln!(
                        f,
                        "released    {path}: breaking change accepted, contract_version {from} -> {to}"
                    )?;
                    for v in violations {
                        writeln!(f, "              {v}")?;
                    }
                }
                Verdict::Broken { violations } => {
                    writeln!(f, "BROKEN      {path}: not BACKWARD compatible with its released version")?;
                    for v in violations {
                        writeln!(f, "              {v}")?;
                    }
                    writeln!(
                        f,
                        "              fix the schema, or bump contract_version to release a breaking change"
                    )?;
                }
                Verdict::VersionWentBack { released, current } => writeln!(
                    f,
                    "BROKEN      {path}: contract_version {current} is lower than the released {released}"
                )?,
                Verdict::Removed => writeln!(
                    f,
                    "BROKEN      {path}: released contract has no schema file any more"
                )?,
            }
        }
        Ok(())
    }
}

/// Why the gate could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot read released schema {path}: {message}")]
    Released { path: PathBuf, message: String },
    #[error("cannot write released schema {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot compare {path}: {message}")]
    Compare { path: String, message: String },
}

/// Where the released snapshot of a contract lives: `released/<path without .avsc>.json`.
pub fn released_path(released_dir: &Path, contract_path: &str) -> PathBuf {
    let stem = contract_path.strip_suffix(".avsc").unwrap_or(contract_path);
    released_dir.join(format!("{stem}.json"))
}

fn read_released(path: &Path) -> Result<(u32, Schema), GateError> {
    let err = |message: String| GateError::Released {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let version = json
        .get("contract_version")
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| err("missing contract_version".into()))?;
    let schema = Schema::parse(&json).map_err(|e| err(e.to_string()))?;
    Ok((version, schema))
}

fn released_files(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            released_files(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            if let Ok(rel) = path.strip_prefix(root) {
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                if let Some(stem) = rel.strip_suffix(".json") {
                    out.push(format!("{stem}.avsc"));
                }
            }
        }
    }
}

/// Compares one contract with its released snapshot.
pub fn verdict(contract: &Contract, released_dir: &Path) -> Result<Verdict, GateError> {
    let path = released_path(released_dir, &contract.path);
    if !path.exists() {
        return Ok(Verdict::New);
    }
    let (released_version, released) = read_released(&path)?;
    let violations =
        check_backward(&released, &contract.schema).map_err(|message| GateError::Compare {
            path: contract.path.clone(),
            message,
        })?;
    Ok(match contract.contract_version {
        v if v < released_version => Verdict::VersionWentBack {
            released: released_version,
            current: v,
        },
        _ if violations.is_empty() => Verdict::Compatible,
        v if v > released_version => Verdict::BreakingReleased {
            from: released_version,
            to: v,
            violations,
        },
        _ => Verdict::Broken { violations },
    })
}

/// Runs the gate over every contract against `released_dir`.
pub fn gate(contracts: &ContractSet, released_dir: &Path) -> Result<GateReport, GateError> {
    let mut entries = Vec::new();
    for contract in contracts.iter() {
        entries.push((contract.path.clone(), verdict(contract, released_dir)?));
    }
    let mut released = Vec::new();
    released_files(released_dir, released_dir, &mut released);
    released.sort();
    for path in released {
        if contracts.get(&path).is_none() {
            entries.push((path, Verdict::Removed));
        }
    }
    Ok(GateReport { entries })
}

/// Records every contract as released: writes its self-contained schema as the snapshot the
/// gate compares against next time.
pub fn release(contracts: &ContractSet, released_dir: &Path) -> Result<Vec<PathBuf>, GateError> {
    let mut written = Vec::new();
    for contract in contracts.iter() {
        let path = released_path(released_dir, &contract.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| GateError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let mut text = serde_json::to_string_pretty(&contract.json).unwrap_or_default();
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| GateError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"E","namespace":"t","fields":[{fields}]}}"#
        ))
        .expect("schema")
    }

    fn rules(old: &str, new: &str) -> Vec<(String, Rule)> {
        check_backward(&schema(old), &schema(new))
            .expect("comparable")
            .into_iter()
            .map(|v| (v.field, v.rule))
            .collect()
    }

    const BASE: &str = r#"{"name":"id","type":"string"},{"name":"n","type":"long","default":0}"#;

    #[test]
    fn identical_and_additive_changes_pass() {
        assert!(rules(BASE, BASE).is_empty());
        let added = format!(r#"{BASE},{{"name":"x","type":["null","string"],"default":null}}"#);
        assert!(rules(BASE, &added).is_empty());
        let removed_defaulted = r#"{"name":"id","type":"string"}"#;
        assert!(rules(BASE, removed_defaulted).is_empty());
    }

    #[test]
    fn each_breaking_rule_is_named() {
        let added = format!(r#"{BASE},{{"name":"x","type":"string"}}"#);
        assert_eq!(
            rules(BASE, &added),
            vec![("x".to_string(), Rule::FieldAddedWithoutDefault)]
        );
        let removed = r#"{"name":"n","type":"long","default":0}"#;
        assert_eq!(
            rules(BASE, removed),
            vec![("id".to_string(), Rule::FieldRemovedWithoutDefault)]
        );
        let retyped = r#"{"name":"id","type":"int"},{"name":"n","type":"long","default":0}"#;
        assert_eq!(
            rules(BASE, retyped),
            vec![("id".to_string(), Rule::TypeChanged)]
        );
    }

    #[test]
    fn nested_records_enums_and_unions() {
        let old = r#"{"name":"p","type":{"type":"record","name":"P","fields":[
            {"name":"e","type":{"type":"enum","name":"K","symbols":["A","B"]}},
            {"name":"u","type":["null","string","long"],"default":null}]}}"#;
        let new = r#"{"name":"p","type":{"type":"record","name":"P","fields":[
            {"name":"e","type":{"type":"enum","name":"K","symbols":["A"]}},
            {"name":"u","type":["null","string"],"default":null}]}}"#;
        assert_eq!(
            rules(old, new),
            vec![
                ("p.e".to_string(), Rule::EnumSymbolRemoved),
                ("p.u".to_string(), Rule::UnionBranchRemoved)
            ]
        );
        // Widening to a union that contains the old type is readable.
        let widened = r#"{"name":"id","type":["null","string"],"default":null},{"name":"n","type":"long","default":0}"#;
        assert!(rules(BASE, widened).is_empty());
    }
}
