//! The feed catalog (`feeds.yaml`): one entry per connector event type, saying which branch of
//! the raw payload it carries, how bronze validates and normalizes it, which entity silver
//! merges it into and which metrics it contributes. The stages build their SQL from it; this
//! module loads it and checks every entry against the raw contract, so an entry that names a
//! missing field or a branch the schema lacks stops start-up naming the entry and the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::ContractSet;

/// The file name, next to `topic-config.yaml`.
pub const FILE: &str = "feeds.yaml";

/// Why the catalog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// An entry is wrong; `field` is its key inside the entry (`normalize.release.version`).
    #[error("feeds.yaml: feed `{feed}`, `{field}`: {message}")]
    Entry {
        feed: String,
        field: String,
        message: String,
    },
    /// The catalog as a whole disagrees with the raw contract.
    #[error("feeds.yaml: {0}")]
    Catalog(String),
}

impl FeedError {
    pub fn entry(feed: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        FeedError::Entry {
            feed: feed.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedCatalog {
    /// The contract (path under `schemas/`) whose `payload` holds one branch per feed.
    pub contract: String,
    pub feeds: Vec<Feed>,
}

/// One event type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feed {
    pub event_type: String,
    /// The branch of the raw `payload` this event type carries.
    pub variant: String,
    #[serde(default)]
    pub required: Vec<String>,
    #[serde(default)]
    pub allowed: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub ranges: BTreeMap<String, Range>,
    /// Named SQL booleans over the raw branch; an event for which one is false is rejected.
    #[serde(default)]
    pub checks: BTreeMap<String, String>,
    #[serde(default)]
    pub normalize: BTreeMap<String, Normalize>,
    #[serde(default)]
    pub pii: Vec<String>,
    pub entity: EntitySpec,
    #[serde(default)]
    pub metrics: Vec<MetricSpec>,
}

/// An inclusive numeric range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

/// How bronze normalizes a text field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// Leading and trailing blanks removed (the default for text).
    Trim,
    Lower,
    Upper,
    /// `open` → `Open`.
    Title,
    /// A leading `v` removed; anything then not a SemVer version is rejected.
    Semver,
    /// Left exactly as received.
    Keep,
}

/// The entity an event updates (silver's merge unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySpec {
    #[serde(rename = "type")]
    pub entity_type: String,
    /// SQL: the entity's id, text.
    pub id: String,
    /// SQL: when the entity state was last updated (a timestamp or epoch milliseconds).
    pub updated_at: String,
    /// Canonical attributes: name → SQL, carried as text.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The attributes that, with the entity id and `updated_at`, make the entity's canonical
    /// hash ([`canonical_hash`]): silver keeps it with the entity's state, and
    /// `medallion drift check` compares it with the system of record's.
    #[serde(default)]
    pub canonical: Vec<String>,
}

/// One metric sample an event contributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub name: String,
    /// SQL: a number; NULL contributes no sample.
    pub value: String,
    #[serde(default)]
    pub unit: Option<String>,
}

/// The broad type of a payload field, as the checks need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Text,
    Number,
    Boolean,
    Record,
    Other,
}

/// A regular expression a SemVer 2.0 version (without the leading `v`) matches.
pub const SEMVER_PATTERN: &str =
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$";

impl FeedCatalog {
    /// Loads `feeds.yaml` from `home` and checks it against the contracts.
    pub fn load(home: &Path, contracts: &ContractSet) -> Result<Self, FeedError> {
        let path = home.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| FeedError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), contracts)
    }

    /// Parses and checks; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str, contracts: &ContractSet) -> Result<Self, FeedError> {
        let catalog: FeedCatalog = serde_yaml_ng::from_str(text).map_err(|e| FeedError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        catalog.check(contracts)?;
        Ok(catalog)
    }

    /// Every field path, type and value the entries name must exist in the raw contract,
    /// every branch of the raw payload must have exactly one entry, and the personal-data
    /// fields must be the ones the schema marks.
    pub fn check(&self, contracts: &ContractSet) -> Result<(), FeedError> {
        let contract = contracts.get(&self.contract).ok_or_else(|| {
            FeedError::Catalog(format!("contract `{}` is not in schemas/", self.contract))
        })?;
        let branches = payload_branches(&contract.json);
        let pii = contract.pii_fields();
        let mut event_types = BTreeSet::new();
        let mut variants = BTreeSet::new();
        for feed in &self.feeds {
            let name = feed.event_type.as_str();
            if name.trim().is_empty() || name != name.trim().to_lowercase() {
                return Err(FeedError::entry(
                    name,
                    "event_type",
                    "must be non-empty, lower case, without blanks",
                ));
            }
            if !event_types.insert(name) {
                return Err(FeedError::entry(name, "event_type", "listed twice"));
            }
            if !variants.insert(feed.variant.as_str()) {
                return Err(FeedError::entry(
                    name,
                    "variant",
                    format!("`{}` is already the branch of another feed", feed.variant),
                ));
            }
            let Some(record) = branches.get(&feed.variant) else {
                return Err(FeedError::entry(
                    name,
                    "variant",
                    format!(
                        "`{}` is not an optional record branch of {}'s payload (has: {})",
                        feed.variant,
                        self.contract,
                        branches.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            feed.check_fields(record)?;
            let marked: BTreeSet<String> = pii
                .iter()
                .filter_map(|p| p.strip_prefix(&format!("payload.{}.", feed.variant)))
                .map(str::to_string)
                .collect();
            let listed: BTreeSet<String> = feed.pii.iter().cloned().collect();
            if marked != listed {
                return Err(FeedError::entry(
                    name,
                    "pii",
                    format!(
                        "lists [{}] but the schema marks [{}] \"pii\": true",
                        listed.into_iter().collect::<Vec<_>>().join(", "),
                        marked.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let missing: Vec<&String> = branches
            .keys()
            .filter(|b| !variants.contains(b.as_str()))
            .collect();
        if !missing.is_empty() {
            return Err(FeedError::Catalog(format!(
                "{}'s payload has branches no feed carries: {}",
                self.contract,
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }
}

impl Feed {
    /// `text` with every `$path` replaced by `access(path)`. Paths are checked by
    /// [`Feed::check`]; an unknown one is reported there.
    pub fn expand(&self, text: &str, access: impl Fn(&str) -> String) -> String {
        let mut out = String::with_capacity(text.len() * 2);
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let tail = &rest[at + 1..];
            let len = reference_len(tail);
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(&access(&tail[..len]));
            }
            rest = &tail[len..];
        }
        out.push_str(rest);
        out
    }

    /// The field paths `text` refers to with `$`.
    pub fn references(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            let tail = &rest[at + 1..];
            let len = reference_len(tail);
            if len > 0 {
                out.push(&tail[..len]);
            }
            rest = &tail[len..];
        }
        out
    }

    /// Every expression of the entry with its key, for errors: `(key, sql)`.
    pub fn expressions(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = vec![
            ("entity.id".to_string(), self.entity.id.as_str()),
            ("entity.updated_at".to_string(), &self.entity.updated_at),
        ];
        out.extend(
            self.entity
                .attributes
                .iter()
                .map(|(k, v)| (format!("entity.attributes.{k}"), v.as_str())),
        );
        out.extend(
            self.metrics
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("metrics[{i}].value"), m.value.as_str())),
        );
        out.extend(
            self.checks
                .iter()
                .map(|(k, v)| (format!("checks.{k}"), v.as_str())),
        );
        out
    }

    /// How bronze normalizes the text field at `path`.
    pub fn normalization(&self, path: &str) -> Normalize {
        self.normalize.get(path).copied().unwrap_or(Normalize::Trim)
    }

    fn check_fields(&self, record: &Json) -> Result<(), FeedError> {
        let name = self.event_type.as_str();
        let kind = |key: String, path: &str| {
            field_kind(record, path).ok_or_else(|| {
                FeedError::entry(
                    name,
                    key,
                    format!("`{path}` is not a field of {}", self.variant),
                )
            })
        };
        for path in &self.required {
            kind(format!("required.{path}"), path)?;
        }
        for (path, values) in &self.allowed {
            if kind(format!("allowed.{path}"), path)? != FieldKind::Text {
                return Err(FeedError::entry(
                    name,
                    format!("allowed.{path}"),
                    "is not text",
                ));
            }
            if values.is_empty() {
                return Err(FeedError::entry(
                    name,
                    format!("allowed.{path}"),
                    "lists no value",
                ));
            }
        }
        for (path, range) in &self.ranges {
            if kind(format!("ranges.{path}"), path)? != FieldKind::Number {
                return Err(FeedError::entry(
                    name,
                    format!("ranges.{path}"),
                    "is not a number",
                ));
            }
            if range.min > range.max {
                return Err(FeedError::entry(
                    name,
                    format!("ranges.{path}"),
                    format!("min {} is above max {}", range.min, range.max),
                ));
            }
        }
        for path in self.normalize.keys() {
            if kind(format!("normalize.{path}"), path)? != FieldKind::Text {
                return Err(FeedError::entry(
                    name,
                    format!("normalize.{path}"),
                    "is not text",
                ));
            }
        }
        for path in &self.pii {
            if kind(format!("pii.{path}"), path)? != FieldKind::Text {
                return Err(FeedError::entry(name, format!("pii.{path}"), "is not text"));
            }
        }
        if self.entity.entity_type.is_empty()
            || !self
                .entity
                .entity_type
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
        {
            return Err(FeedError::entry(
                name,
                "entity.type",
                "must be lower-case letters and _",
            ));
        }
        for (key, attribute) in self.entity.attributes.keys().map(|k| (k, k)) {
            if attribute.is_empty()
                || !attribute
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(FeedError::entry(
                    name,
                    format!("entity.attributes.{key}"),
                    "an attribute name is letters, digits and _",
                ));
            }
        }
        for (i, attribute) in self.entity.canonical.iter().enumerate() {
            if !self.entity.attributes.contains_key(attribute) {
                return Err(FeedError::entry(
                    name,
                    format!("entity.canonical[{i}]"),
                    format!("`{attribute}` is not one of entity.attributes"),
                ));
            }
        }
        for (i, metric) in self.metrics.iter().enumerate() {
            if metric.name.trim().is_empty() || metric.name.contains(char::is_whitespace) {
                return Err(FeedError::entry(
                    name,
                    format!("metrics[{i}].name"),
                    "must be a non-empty name without blanks",
                ));
            }
        }
        for (key, sql) in self.expressions() {
            if sql.trim().is_empty() {
                return Err(FeedError::entry(name, key, "is empty"));
            }
            for path in Self::references(sql) {
                kind(key.clone(), path)?;
            }
        }
        Ok(())
    }
}

/// The SHA-256 (hex) of an entity's canonical fields: its id, the canonical attributes in
/// catalog order (absent ones empty) and `updated_at` in epoch milliseconds, separated by the
/// unit separator (0x1f), which no normalized field contains.
pub fn canonical_hash(entity_id: &str, attributes: &[Option<&str>], updated_at: i64) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(entity_id.as_bytes());
    for value in attributes {
        hasher.update([0x1f]);
        hasher.update(value.unwrap_or_default().as_bytes());
    }
    hasher.update([0x1f]);
    hasher.update(updated_at.to_string().as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in hasher.finalize() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

impl Normalize {
    /// What bronze's SQL makes of `text` (for values that did not come through bronze, such
    /// as a system of record's snapshot).
    pub fn apply(self, text: &str) -> String {
        match self {
            Normalize::Trim => text.trim().to_string(),
            Normalize::Lower => text.trim().to_lowercase(),
            Normalize::Upper => text.trim().to_uppercase(),
            Normalize::Title => {
                // initcap: the first letter of each alphanumeric run upper case, the rest lower.
                let mut out = String::with_capacity(text.len());
                let mut start = true;
                for c in text.trim().chars() {
                    if c.is_alphanumeric() {
                        if start {
                            out.extend(c.to_uppercase());
                        } else {
                            out.extend(c.to_lowercase());
                        }
                        start = false;
                    } else {
                        out.push(c);
                        start = true;
                    }
                }
                out
            }
            Normalize::Semver => {
                let t = text.trim();
                t.strip_prefix(['v', 'V']).unwrap_or(t).to_string()
            }
            Normalize::Keep => text.to_string(),
        }
    }
}

fn reference_len(tail: &str) -> usize {
    let mut len = 0;
    for (i, c) in tail.char_indices() {
        let ok = if i == 0 {
            c.is_ascii_alphabetic() || c == '_'
        } else {
            c.is_ascii_alphanumeric() || c == '_' || c == '.'
        };
        if !ok {
            break;
        }
        len = i + c.len_utf8();
    }
    // A path never ends in a dot: `$name.` is `$name` followed by a dot.
    tail[..len].trim_end_matches('.').len()
}

/// The optional record branches of the contract's `payload`: name → record schema.
fn payload_branches(contract: &Json) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    let Some(payload) = record_field(contract, "payload") else {
        return out;
    };
    for field in fields(&payload) {
        let Some(branches) = field.get("type").and_then(Json::as_array) else {
            continue;
        };
        let records: Vec<&Json> = branches
            .iter()
            .filter(|b| b.get("type").and_then(Json::as_str) == Some("record"))
            .collect();
        if let ([record], Some(name)) =
            (records.as_slice(), field.get("name").and_then(Json::as_str))
        {
            out.insert(name.to_string(), (*record).clone());
        }
    }
    out
}

fn fields(record: &Json) -> Vec<Json> {
    record
        .get("fields")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The record schema of `record`'s field `name` (through a `[null, record]` union).
fn record_field(record: &Json, name: &str) -> Option<Json> {
    let field = fields(record)
        .into_iter()
        .find(|f| f.get("name").and_then(Json::as_str) == Some(name))?;
    let t = field.get("type")?;
    non_null(t).filter(|t| t.get("type").and_then(Json::as_str) == Some("record"))
}

fn non_null(t: &Json) -> Option<Json> {
    match t {
        Json::Array(branches) => branches
            .iter()
            .find(|b| b.as_str() != Some("null"))
            .cloned(),
        other => Some(other.clone()),
    }
}

/// The kind of the field at dotted `path` inside `record`, if there is one.
pub fn field_kind(record: &Json, path: &str) -> Option<FieldKind> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let field = fields(record)
        .into_iter()
        .find(|f| f.get("name").and_then(Json::as_str) == Some(head))?;
    let t = non_null(field.get("type")?)?;
    match rest {
        Some(rest) => field_kind(&t, rest),
        None => Some(kind_of(&t)),
    }
}

fn kind_of(t: &Json) -> FieldKind {
    let name = match t {
        Json::String(s) => s.as_str(),
        Json::Object(o) => o.get("type").and_then(Json::as_str).unwrap_or_default(),
        _ => "",
    };
    match name {
        "string" => FieldKind::Text,
        "int" | "long" | "float" | "double" => FieldKind::Number,
        "boolean" => FieldKind::Boolean,
        "record" => FieldKind::Record,
        _ => FieldKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contracts() -> ContractSet {
        ContractSet::load(&crate::project_root().join("schemas")).expect("schemas load")
    }

    fn shipped() -> String {
        std::fs::read_to_string(crate::project_root().join(FILE)).expect("feeds.yaml")
    }

    fn error_of(text: &str) -> String {
        FeedCatalog::parse(text, "feeds.yaml", &contracts())
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn the_shipped_catalog_covers_every_branch_of_the_raw_payload() {
        let catalog = FeedCatalog::parse(&shipped(), "feeds.yaml", &contracts()).expect("valid");
        let types: Vec<&str> = catalog
            .feeds
            .iter()
            .map(|f| f.event_type.as_str())
            .collect();
        for expected in crate::sample::FEEDS {
            assert!(
                types.contains(&expected),
                "{expected} missing from {types:?}"
            );
        }
        assert_eq!(
            catalog
                .feeds
                .iter()
                .find(|f| f.event_type == "release.sync.created")
                .map(|f| f.normalization("release.version")),
            Some(Normalize::Semver)
        );
    }

    #[test]
    fn a_misspelt_field_names_the_feed_and_the_key() {
        let text = shipped().replace("release.version: semver", "release.versoin: semver");
        let message = error_of(&text);
        assert!(
            message.contains("feed `release.sync.created`")
                && message.contains("normalize.release.versoin")
                && message.contains("not a field of release_sync"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_reference_in_an_expression_is_named() {
        let text = shipped().replace("id: $case_id", "id: $case_identifier");
        let message = error_of(&text);
        assert!(
            message.contains("feed `case.sync.v1`") && message.contains("entity.id"),
            "{message}"
        );
    }

    #[test]
    fn a_branch_without_a_feed_and_a_feed_without_a_branch_are_refused() {
        let catalog: FeedCatalog = serde_yaml_ng::from_str(&shipped()).expect("yaml");
        let mut fewer = catalog.clone();
        fewer.feeds.retain(|f| f.variant != "threat_detected");
        let message = fewer.check(&contracts()).expect_err("refused").to_string();
        assert!(message.contains("threat_detected"), "{message}");
        let mut wrong = catalog;
        wrong.feeds[0].variant = "release_synced".into();
        let message = wrong.check(&contracts()).expect_err("refused").to_string();
        assert!(
            message.contains("`release_synced` is not an optional record branch"),
            "{message}"
        );
    }

    #[test]
    fn personal_data_must_match_the_schema_marks() {
        let text = shipped().replace("pii: [name, email]", "pii: [email]");
        let message = error_of(&text);
        assert!(
            message.contains("feed `lead.created`") && message.contains("`pii`"),
            "{message}"
        );
    }

    #[test]
    fn unknown_keys_and_normalizations_are_refused() {
        assert!(
            error_of(&shipped().replace("required: [lead_id]", "requird: [lead_id]"))
                .contains("requird")
        );
        assert!(
            error_of(&shipped().replace("email: lower", "email: lowercase")).contains("lowercase")
        );
    }

    #[test]
    fn references_expand_to_the_branch_and_stop_at_a_trailing_dot() {
        let feed = Feed {
            event_type: "x".into(),
            variant: "v".into(),
            required: vec![],
            allowed: BTreeMap::new(),
            ranges: BTreeMap::new(),
            checks: BTreeMap::new(),
            normalize: BTreeMap::new(),
            pii: vec![],
            entity: EntitySpec {
                entity_type: "x".into(),
                id: String::new(),
                updated_at: String::new(),
                attributes: BTreeMap::new(),
                canonical: Vec::new(),
            },
            metrics: vec![],
        };
        let sql = feed.expand("$a.b || '$' || $c. x", |p| format!("<{p}>"));
        assert_eq!(sql, "<a.b> || '$' || <c>. x");
        assert_eq!(Feed::references("$a.b + $c_1"), vec!["a.b", "c_1"]);
    }

    #[test]
    fn the_canonical_hash_is_sha256_of_the_separated_fields() {
        // printf 'CASE-1\x1fTitle\x1fOpen\x1f3\x1f1000' | sha256sum
        assert_eq!(
            canonical_hash("CASE-1", &[Some("Title"), Some("Open"), Some("3")], 1000),
            "ad923615b656318aa7c1e09f8b6c1937ac0a9a2f7c7c21e810038104030ac31f"
        );
        assert_ne!(
            canonical_hash("CASE-1", &[Some("Title"), None], 1000),
            canonical_hash("CASE-1", &[None, Some("Title")], 1000)
        );
    }

    #[test]
    fn normalizing_text_in_rust_matches_the_sql() {
        assert_eq!(Normalize::Title.apply("  rESOLVED "), "Resolved");
        assert_eq!(Normalize::Title.apply("in-progress now"), "In-Progress Now");
        assert_eq!(Normalize::Upper.apply(" case-7 "), "CASE-7");
        assert_eq!(Normalize::Semver.apply(" v1.2.3 "), "1.2.3");
        assert_eq!(Normalize::Keep.apply(" x "), " x ");
    }
}
