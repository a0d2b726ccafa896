//! The Avro contracts in `schemas/`: one `.avsc` per topic, a folder per layer, plus the shared
//! `common/` types. Files may reference named types defined in other files; loading inlines
//! them so every contract is a self-contained schema, which is what the registry receives.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use serde_json::{Map, Value as Json};

/// Why the schemas could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: unknown type `{name}` (not a primitive and not defined in any schema file)")]
    UnknownType { path: String, name: String },
    #[error("named type `{name}` is defined both in {first} and in {second}")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
    #[error("{path}: the top level must be a named record")]
    NotARecord { path: String },
    #[error("{path}: missing integer attribute `contract_version` on the top-level record")]
    MissingVersion { path: String },
    #[error("{path} is not a valid Avro schema: {message}")]
    Avro { path: String, message: String },
}

/// One contract: a self-contained Avro schema and where it came from.
#[derive(Debug, Clone)]
pub struct Contract {
    /// Path relative to `schemas/`, with `/` separators, e.g. `connector/data-raw.avsc`.
    pub path: String,
    /// Full name of the top-level record, e.g. `io.medallion.connector.DataRaw`.
    pub full_name: String,
    /// Bumped on a deliberate breaking change; the compatibility gate lets those through.
    pub contract_version: u32,
    /// The self-contained schema as JSON (named types from other files inlined).
    pub json: Json,
    /// `json` as text: what is registered in the Schema Registry.
    pub text: String,
    /// The parsed schema.
    pub schema: Schema,
}

impl Contract {
    /// Fields of the top-level record marked `"pii": true`, as dotted paths.
    pub fn pii_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect_pii(&self.json, "", &mut out);
        out
    }
}

fn collect_pii(node: &Json, prefix: &str, out: &mut Vec<String>) {
    match node {
        Json::Object(obj) => {
            if obj.get("type").and_then(Json::as_str) == Some("record") {
                for field in obj
                    .get("fields")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    let name = field.get("name").and_then(Json::as_str).unwrap_or_default();
                    let path = if prefix.is_empty() {
                        name.to_string()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    if field.get("pii").and_then(Json::as_bool) == Some(true) {
                        out.push(path.clone());
                    }
                    if let Some(t) = field.get("type") {
                        collect_pii(t, &path, out);
                    }
                }
            } else if let Some(t) = obj.get("type") {
                collect_pii(t, prefix, out);
            }
            for key in ["items", "values"] {
                if let Some(t) = obj.get(key) {
                    collect_pii(t, prefix, out);
                }
            }
        }
        Json::Array(branches) => branches.iter().for_each(|b| collect_pii(b, prefix, out)),
        _ => {}
    }
}

/// Every contract under a `schemas/` directory, keyed by relative path.
#[derive(Debug, Clone)]
pub struct ContractSet {
    contracts: BTreeMap<String, Contract>,
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

impl ContractSet {
    /// Loads every `*.avsc` under `dir` (recursively).
    pub fn load(dir: &Path) -> Result<Self, SchemaError> {
        let mut files = Vec::new();
        collect_avsc(dir, dir, &mut files)?;
        let mut sources = BTreeMap::new();
        for (rel, abs) in files {
            let text = std::fs::read_to_string(&abs).map_err(|source| SchemaError::Io {
                path: abs.clone(),
                source,
            })?;
            sources.insert(rel, text);
        }
        Self::from_sources(sources)
    }

    /// Builds the set from `(relative path, file text)` pairs.
    pub fn from_sources(sources: BTreeMap<String, String>) -> Result<Self, SchemaError> {
        let mut docs = BTreeMap::new();
        for (path, text) in &sources {
            let json: Json = serde_json::from_str(text).map_err(|source| SchemaError::Json {
                path: path.clone(),
                source,
            })?;
            docs.insert(path.clone(), json);
        }
        let mut definitions: HashMap<String, (String, Json)> = HashMap::new();
        for (path, json) in &docs {
            collect_definitions(json, None, path, &mut definitions)?;
        }
        let mut contracts = BTreeMap::new();
        for (path, json) in docs {
            let contract = build_contract(&path, json, &definitions)?;
            contracts.insert(path, contract);
        }
        Ok(Self { contracts })
    }

    pub fn get(&self, path: &str) -> Option<&Contract> {
        self.contracts.get(path)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Contract> {
        self.contracts.values()
    }

    pub fn len(&self) -> usize {
        self.contracts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contracts.is_empty()
    }
}

fn collect_avsc(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), SchemaError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SchemaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            collect_avsc(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "avsc") {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, path));
        }
    }
    Ok(())
}

fn split_name(name: &str, namespace: Option<&str>) -> (String, Option<String>) {
    match name.rsplit_once('.') {
        Some((ns, _)) => (name.to_string(), Some(ns.to_string())),
        None => match namespace.filter(|ns| !ns.is_empty()) {
            Some(ns) => (format!("{ns}.{name}"), Some(ns.to_string())),
            None => (name.to_string(), None),
        },
    }
}

fn is_named_definition(obj: &Map<String, Json>) -> bool {
    matches!(
        obj.get("type").and_then(Json::as_str),
        Some("record" | "enum" | "fixed" | "error")
    ) && obj.contains_key("name")
}

/// Name and namespace a named definition declares, given the enclosing namespace.
fn declared_name(obj: &Map<String, Json>, enclosing: Option<&str>) -> (String, Option<String>) {
    let name = obj.get("name").and_then(Json::as_str).unwrap_or_default();
    let ns = obj.get("namespace").and_then(Json::as_str).or(enclosing);
    split_name(name, ns)
}

fn collect_definitions(
    node: &Json,
    enclosing: Option<&str>,
    path: &str,
    out: &mut HashMap<String, (String, Json)>,
) -> Result<(), SchemaError> {
    match node {
        Json::Object(obj) => {
            let mut ns = enclosing.map(str::to_string);
            if is_named_definition(obj) {
                let (full, own_ns) = declared_name(obj, enclosing);
                let mut def = obj.clone();
                if let Some(own) = &own_ns {
                    def.insert("namespace".into(), Json::String(own.clone()));
                }
                if let Some((first, _)) = out.get(&full) {
                    return Err(SchemaError::DuplicateName {
                        name: full,
                        first: first.clone(),
                        second: path.to_string(),
                    });
                }
                out.insert(full, (path.to_string(), Json::Object(def)));
                ns = own_ns;
                for field in obj
                    .get("fields")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(t) = field.get("type") {
                        collect_definitions(t, ns.as_deref(), path, out)?;
                    }
                }
                return Ok(());
            }
            for key in ["type", "items", "values"] {
                if let Some(t) = obj.get(key) {
                    collect_definitions(t, ns.as_deref(), path, out)?;
                }
            }
            Ok(())
        }
        Json::Array(branches) => branches
            .iter()
            .try_for_each(|b| collect_definitions(b, enclosing, path, out)),
        _ => Ok(()),
    }
}

struct Inliner<'a> {
    path: &'a str,
    definitions: &'a HashMap<String, (String, Json)>,
    defined: HashSet<String>,
}

impl Inliner<'_> {
    fn inline(&mut self, node: Json, enclosing: Option<&str>) -> Result<Json, SchemaError> {
        match node {
            Json::String(name) if PRIMITIVES.contains(&name.as_str()) => Ok(Json::String(name)),
            Json::String(name) => {
                let (full, _) = split_name(&name, enclosing);
                if self.defined.contains(&full) {
                    return Ok(Json::String(full));
                }
                let Some((_, def)) = self.definitions.get(&full) else {
                    return Err(SchemaError::UnknownType {
                        path: self.path.to_string(),
                        name: full,
                    });
                };
                self.inline(def.clone(), enclosing)
            }
            Json::Array(branches) => branches
                .into_iter()
                .map(|b| self.inline(b, enclosing))
                .collect::<Result<Vec<_>, _>>()
                .map(Json::Array),
            Json::Object(mut obj) => {
                if is_named_definition(&obj) {
                    let (full, own_ns) = declared_name(&obj, enclosing);
                    self.defined.insert(full);
                    if let Some(own) = &own_ns {
                        obj.insert("namespace".into(), Json::String(own.clone()));
                    }
                    if let Some(Json::Array(fields)) = obj.remove("fields") {
                        let mut inlined = Vec::with_capacity(fields.len());
                        for field in fields {
                            let Json::Object(mut field) = field else {
                                inlined.push(field);
                                continue;
                            };
                            if let Some(t) = field.remove("type") {
                                field.insert("type".into(), self.inline(t, own_ns.as_deref())?);
                            }
                            inlined.push(Json::Object(field));
                        }
                        obj.insert("fields".into(), Json::Array(inlined));
                    }
                    return Ok(Json::Object(obj));
                }
                for key in ["type", "items", "values"] {
                    let keyword = key == "type"
                        && obj.get(key).and_then(Json::as_str).is_some_and(|t| {
                            matches!(t, "array" | "map" | "record" | "enum" | "fixed")
                        });
                    if keyword {
                        continue;
                    }
                    if let Some(t) = obj.remove(key) {
                        obj.insert(key.into(), self.inline(t, enclosing)?);
                    }
                }
                Ok(Json::Object(obj))
            }
            other => Ok(other),
        }
    }
}

fn build_contract(
    path: &str,
    json: Json,
    definitions: &HashMap<String, (String, Json)>,
) -> Result<Contract, SchemaError> {
    let Json::Object(top) = &json else {
        return Err(SchemaError::NotARecord {
            path: path.to_string(),
        });
    };
    if top.get("type").and_then(Json::as_str) != Some("record") || !top.contains_key("name") {
        return Err(SchemaError::NotARecord {
            path: path.to_string(),
        });
    }
    let (full_name, _) = declared_name(top, None);
    let contract_version = top
        .get("contract_version")
        .and_then(Json::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| SchemaError::MissingVersion {
            path: path.to_string(),
        })?;
    let mut inliner = Inliner {
        path,
        definitions,
        defined: HashSet::new(),
    };
    let json = inliner.inline(json, None)?;
    let text = json.to_string();
    let schema = Schema::parse_str(&text).map_err(|e| SchemaError::Avro {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    Ok(Contract {
        path: path.to_string(),
        full_name,
        contract_version,
        json,
        text,
        schema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(files: &[(&str, &str)]) -> Result<ContractSet, SchemaError> {
        ContractSet::from_sources(
            files
                .iter()
                .map(|(p, t)| (p.to_string(), t.to_string()))
                .collect(),
        )
    }

    #[test]
    fn inlines_types_from_other_files_once() {
        let common = r#"{"type":"record","name":"Common","namespace":"a.b","contract_version":1,
            "fields":[{"name":"s","type":{"type":"record","name":"S","fields":[{"name":"x","type":"int"}]}}]}"#;
        let topic = r#"{"type":"record","name":"T","namespace":"c","contract_version":2,
            "fields":[{"name":"one","type":"a.b.S"},{"name":"two","type":"a.b.S"}]}"#;
        let contracts = set(&[("common.avsc", common), ("t.avsc", topic)]).expect("loads");
        let t = contracts.get("t.avsc").expect("present");
        assert_eq!(t.full_name, "c.T");
        assert_eq!(t.contract_version, 2);
        assert_eq!(t.json["fields"][0]["type"]["name"], "S");
        assert_eq!(t.json["fields"][1]["type"], "a.b.S");
    }

    #[test]
    fn unknown_type_is_named() {
        let topic = r#"{"type":"record","name":"T","contract_version":1,
            "fields":[{"name":"one","type":"nowhere.Missing"}]}"#;
        let err = set(&[("t.avsc", topic)]).expect_err("must fail");
        assert!(err.to_string().contains("nowhere.Missing"), "{err}");
        assert!(err.to_string().contains("t.avsc"), "{err}");
    }

    #[test]
    fn missing_contract_version_is_rejected() {
        let topic = r#"{"type":"record","name":"T","fields":[]}"#;
        let err = set(&[("t.avsc", topic)]).expect_err("must fail");
        assert!(matches!(err, SchemaError::MissingVersion { .. }), "{err}");
    }
}
