//! `topic-config.yaml`: the single source of topic names, partitions, replication,
//! retention, keys, DLQs and consumer groups. Code reads topic names from here only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why `topic-config.yaml` was rejected. Every message names the key and, where it can, the line.
#[derive(Debug, thiserror::Error)]
pub enum TopicConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
}

/// A retention or other duration written as `<n>ms|s|m|h|d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Duration);

impl Retention {
    pub fn as_millis(&self) -> u128 {
        self.0.as_millis()
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            ms if ms % 86_400_000 == 0 => write!(f, "{}d", ms / 86_400_000),
            ms if ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

/// A value in the topic configuration (a duration, a deployment prefix) that is not valid,
/// and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// Parses `7d`, `12h`, `30m`, `45s`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidValue> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        InvalidValue(format!(
            "duration `{text}` has no unit (use ms, s, m, h or d)"
        ))
    })?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| InvalidValue(format!("duration `{text}` does not start with a number")))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        other => {
            return Err(InvalidValue(format!(
                "duration `{text}` has unknown unit `{other}` (use ms, s, m, h or d)"
            )))
        }
    };
    if ms == 0 {
        return Err(InvalidValue(format!("duration `{text}` must be positive")));
    }
    Ok(Duration::from_millis(ms))
}

impl<'de> Deserialize<'de> for Retention {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Retention)
            .map_err(serde::de::Error::custom)
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub schema_registry: RegistryPolicy,
    pub dlq: DlqPolicy,
    pub topics: BTreeMap<String, TopicSpec>,
    pub consumer_groups: BTreeMap<String, ConsumerGroup>,
    /// Compacted state topics of stateful groups, one partition per input partition.
    #[serde(default)]
    pub changelogs: BTreeMap<String, ChangelogSpec>,
    /// Topics every worker reports to, beside its own output.
    #[serde(default)]
    pub telemetry: Option<Telemetry>,
    /// Where each consumer group records the metadata of its commits, for brokers that drop
    /// commit metadata.
    #[serde(default)]
    pub progress: Option<ProgressPolicy>,
    /// The deployment prefix applied by [`TopicConfig::with_prefix`]; empty as loaded.
    #[serde(skip)]
    pub prefix: String,
}

/// Checks a deployment prefix: Kafka's topic characters only (`a-z A-Z 0-9 . _ -`).
pub fn check_prefix(prefix: &str) -> Result<(), InvalidValue> {
    match prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(InvalidValue(format!(
            "`{prefix}` has `{c}`; topic names allow only a-z, A-Z, 0-9, `.`, `_` and `-`"
        ))),
        None if prefix.len() > 100 => Err(InvalidValue(format!(
            "`{prefix}` is longer than 100 characters"
        ))),
        None => Ok(()),
    }
}

/// Where every worker reports its batches and governance actions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// One record per processed batch and partition (`etl/execution.avsc`).
    pub execution: String,
    /// Governance actions: dead letters, personal-data encryption, redactions, drift.
    pub audit: String,
}

/// Each consumer group's progress topic, `<group><suffix>`: compacted, partitioned like the
/// topic the group consumes. Before a worker stores an offset for commit it writes that offset
/// with the commit's metadata (where its outputs stood, what it did beyond the offset) to the
/// matching partition here, so a broker that keeps the offset but drops the metadata loses
/// nothing a restart needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressPolicy {
    /// Appended to the consumer group's name: `.progress`.
    pub suffix: String,
    pub replication: u16,
}

/// A compacted topic holding a group's state, partitioned like the topic it consumes: the
/// state of input partition `p` lives in changelog partition `p`, so whoever owns `p` can
/// restore it by reading one partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangelogSpec {
    /// The consumer group that owns the state.
    pub group: String,
    /// The consumed topic whose partitions the state follows.
    pub partitioned_like: String,
    pub replication: u16,
    /// A table every replica reads whole, its records placed by key (not by input
    /// partition): state that must be consistent across partitions, such as which org owns an
    /// entity id. It has as many partitions as `partitioned_like`.
    #[serde(default)]
    pub global: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryPolicy {
    /// Only BACKWARD is supported: consumers upgrade first, then producers.
    pub compatibility: Compatibility,
    pub subject_strategy: SubjectStrategy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Compatibility {
    #[serde(rename = "BACKWARD")]
    Backward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-value`.
    Topic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqPolicy {
    /// Appended to the source topic name: `.dlq`.
    pub suffix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub partitions: u32,
    pub replication: u16,
    pub retention: Retention,
    /// Field the record key is taken from: a top-level field, or `payload.<field>`.
    pub key: String,
    /// Schema file under `schemas/`.
    pub schema: String,
    /// The dead-letter topic `<name><suffix>`; required for every consumed topic.
    #[serde(default)]
    pub dlq: Option<DlqSpec>,
    /// How a keyed record picks its partition (default `murmur2`).
    #[serde(default)]
    pub partitioner: Partitioner,
}

/// How a producer maps a record key to a partition of the topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// Kafka's default: `(murmur2(key bytes) & 0x7fffffff) % partitions`, what the Java
    /// client, librdkafka's `murmur2_random` and every Confluent client do for a keyed record.
    #[default]
    Murmur2,
    /// The Java producers' `abs(orgId.hashCode()) % numPartitions`, with Java's `Long.hashCode`, for
    /// keys that are a decimal `long` (an org id). Where Java's formula is negative (a hash of
    /// `Integer.MIN_VALUE`, which `Math.abs` leaves negative) the magnitude 2^31 is used.
    JavaLongHash,
}

impl Partitioner {
    /// The partition this partitioner picks for `key`, or `None` where the producer client
    /// decides (murmur2, which librdkafka computes itself, or a key that is not a long).
    pub fn partition(self, key: &[u8], partitions: u32) -> Option<i32> {
        match self {
            Partitioner::Murmur2 => None,
            Partitioner::JavaLongHash => {
                let org: i64 = std::str::from_utf8(key).ok()?.trim().parse().ok()?;
                if partitions == 0 {
                    return None;
                }
                Some((java_long_hash_code(org).unsigned_abs() % partitions) as i32)
            }
        }
    }
}

/// Java's `Long.hashCode(value)`: `(int) (value ^ (value >>> 32))`.
pub fn java_long_hash_code(value: i64) -> i32 {
    (value ^ ((value as u64) >> 32) as i64) as i32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqSpec {
    pub partitions: u32,
    pub retention: Retention,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerGroup {
    pub purpose: String,
    /// Topics read as a member of the group (partitions shared among replicas).
    pub consumes: Vec<String>,
    /// Topics every replica reads in full, outside the group (e.g. configuration).
    #[serde(default)]
    pub broadcast: Vec<String>,
    pub produces: Vec<String>,
}

/// A topic to create: a declared topic or a DLQ derived from one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysicalTopic {
    pub name: String,
    pub partitions: u32,
    pub replication: u16,
    pub retention_ms: u128,
    /// The topic this is the DLQ of.
    pub dlq_of: Option<String>,
    /// `cleanup.policy=compact` (a changelog): keyed state, no time retention.
    pub compacted: bool,
}

fn line_of(source: &str, needles: &[&str]) -> usize {
    // The line of the last needle, searched in order after the previous one.
    let mut from = 0;
    let mut line = 1;
    for needle in needles {
        if let Some(pos) = source[from..].find(needle) {
            from += pos;
            line = source[..from].matches('\n').count() + 1;
            from += needle.len();
        }
    }
    line
}

impl TopicConfig {
    pub fn load(path: &Path) -> Result<Self, TopicConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopicConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, TopicConfigError> {
        let config: TopicConfig =
            serde_yaml_ng::from_str(text).map_err(|e| TopicConfigError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        config.validate(text, origin)?;
        Ok(config)
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), TopicConfigError> {
        let invalid = |needles: &[&str], message: String| TopicConfigError::Invalid {
            path: origin.to_string(),
            line: line_of(text, needles),
            message,
        };
        if self.dlq.suffix.is_empty() {
            return Err(invalid(
                &["dlq:", "suffix"],
                "dlq.suffix must not be empty".into(),
            ));
        }
        for (name, spec) in &self.topics {
            let key = format!("{name}:");
            if spec.partitions == 0 {
                return Err(invalid(
                    &["topics:", &key, "partitions"],
                    format!("topics.{name}.partitions must be at least 1"),
                ));
            }
            if spec.replication == 0 {
                return Err(invalid(
                    &["topics:", &key, "replication"],
                    format!("topics.{name}.replication must be at least 1"),
                ));
            }
            if name.ends_with(&self.dlq.suffix) {
                return Err(invalid(
                    &["topics:", &key],
                    format!("topics.{name}: DLQ topics are derived from their source topic's `dlq` entry, not declared"),
                ));
            }
            if let Some(dlq) = &spec.dlq {
                if dlq.partitions == 0 {
                    return Err(invalid(
                        &["topics:", &key, "dlq"],
                        format!("topics.{name}.dlq.partitions must be at least 1"),
                    ));
                }
            }
        }
        for (group, spec) in &self.consumer_groups {
            let key = format!("{group}:");
            for (kind, topics) in [
                ("consumes", &spec.consumes),
                ("broadcast", &spec.broadcast),
                ("produces", &spec.produces),
            ] {
                for topic in topics {
                    let Some(topic_spec) = self.topics.get(topic) else {
                        return Err(invalid(
                            &["consumer_groups:", &key, kind, topic],
                            format!("consumer_groups.{group}.{kind}: topic `{topic}` is not declared under `topics`"),
                        ));
                    };
                    if kind != "produces" && topic_spec.dlq.is_none() {
                        return Err(invalid(
                            &["topics:", &format!("{topic}:")],
                            format!("topics.{topic} is consumed by `{group}` but has no `dlq` (with partitions and retention)"),
                        ));
                    }
                }
            }
            // A group may read only outside the group (every replica every partition).
            if spec.consumes.is_empty() && spec.broadcast.is_empty() {
                return Err(invalid(
                    &["consumer_groups:", &key],
                    format!("consumer_groups.{group}.consumes must name at least one topic (or broadcast, for a group that reads outside the group)"),
                ));
            }
        }
        if let Some(telemetry) = &self.telemetry {
            for (field, topic) in [
                ("execution", &telemetry.execution),
                ("audit", &telemetry.audit),
            ] {
                if !self.topics.contains_key(topic) {
                    return Err(invalid(
                        &["telemetry:", field],
                        format!(
                            "telemetry.{field}: topic `{topic}` is not declared under `topics`"
                        ),
                    ));
                }
            }
        }
        for (name, spec) in &self.changelogs {
            let key = format!("{name}:");
            let Some(group) = self.consumer_groups.get(&spec.group) else {
                return Err(invalid(
                    &["changelogs:", &key, "group"],
                    format!(
                        "changelogs.{name}.group: consumer group `{}` is not declared",
                        spec.group
                    ),
                ));
            };
            if !group.consumes.contains(&spec.partitioned_like) {
                return Err(invalid(
                    &["changelogs:", &key, "partitioned_like"],
                    format!(
                        "changelogs.{name}.partitioned_like: `{}` is not consumed by `{}`",
                        spec.partitioned_like, spec.group
                    ),
                ));
            }
            if spec.replication == 0 || self.topics.contains_key(name) {
                return Err(invalid(
                    &["changelogs:", &key],
                    format!("changelogs.{name}: needs replication >= 1 and a name no topic uses"),
                ));
            }
        }
        if let Some(progress) = &self.progress {
            let clash = self.consumer_groups.keys().find_map(|group| {
                let name = format!("{group}{}", progress.suffix);
                (self.topics.contains_key(&name) || self.changelogs.contains_key(&name))
                    .then_some(name)
            });
            let problem = if progress.suffix.is_empty() {
                Some("progress.suffix must not be empty".to_string())
            } else if check_prefix(&progress.suffix).is_err() {
                Some(format!(
                    "progress.suffix `{}` allows only a-z, A-Z, 0-9, `.`, `_` and `-`",
                    progress.suffix
                ))
            } else if progress.replication == 0 {
                Some("progress.replication must be at least 1".to_string())
            } else {
                clash.map(|name| format!("progress: `{name}` is already a topic or changelog"))
            };
            if let Some(problem) = problem {
                return Err(invalid(&["progress:"], problem));
            }
        }
        Ok(())
    }

    /// The same configuration for a deployment whose every topic, DLQ, changelog and consumer
    /// group name starts with `prefix`, so two pipelines can share one cluster. Applied once,
    /// right after loading: everything read from the result is a name on the broker.
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, InvalidValue> {
        check_prefix(prefix)?;
        if prefix.is_empty() {
            return Ok(self);
        }
        let name = |n: &String| format!("{prefix}{n}");
        let names = |list: &[String]| list.iter().map(name).collect::<Vec<_>>();
        self.topics = std::mem::take(&mut self.topics)
            .into_iter()
            .map(|(n, spec)| (name(&n), spec))
            .collect();
        self.consumer_groups = std::mem::take(&mut self.consumer_groups)
            .into_iter()
            .map(|(n, mut g)| {
                g.consumes = names(&g.consumes);
                g.broadcast = names(&g.broadcast);
                g.produces = names(&g.produces);
                (name(&n), g)
            })
            .collect();
        self.changelogs = std::mem::take(&mut self.changelogs)
            .into_iter()
            .map(|(n, mut c)| {
                c.group = name(&c.group);
                c.partitioned_like = name(&c.partitioned_like);
                (name(&n), c)
            })
            .collect();
        if let Some(t) = &mut self.telemetry {
            t.execution = name(&t.execution);
            t.audit = name(&t.audit);
        }
        self.prefix = format!("{}{prefix}", self.prefix);
        Ok(self)
    }

    /// The broker name of a consumer group declared as `group` in the file.
    pub fn group_name(&self, group: &str) -> String {
        format!("{}{group}", self.prefix)
    }

    /// The changelog topic of `group`, if it keeps state.
    pub fn changelog_of(&self, group: &str) -> Option<&str> {
        self.changelogs
            .iter()
            .find(|(_, c)| c.group == group && !c.global)
            .map(|(name, _)| name.as_str())
    }

    /// The progress topic of consumer group `group` (see [`ProgressPolicy`]), if progress
    /// topics are declared and the group consumes a topic.
    pub fn progress_topic_of(&self, group: &str) -> Option<String> {
        let policy = self.progress.as_ref()?;
        self.consumer_groups
            .get(group)
            .filter(|g| !g.consumes.is_empty())
            .map(|_| format!("{group}{}", policy.suffix))
    }

    /// The global table (`global: true` changelog) of consumer group `group`, if it has one.
    pub fn global_table_of(&self, group: &str) -> Option<&str> {
        self.changelogs
            .iter()
            .find(|(_, c)| c.group == group && c.global)
            .map(|(name, _)| name.as_str())
    }

    pub fn topic(&self, name: &str) -> Option<&TopicSpec> {
        self.topics.get(name)
    }

    /// `<topic>-value`, the registry subject of a topic's value schema.
    pub fn subject(&self, topic: &str) -> String {
        format!("{topic}-value")
    }

    /// The DLQ topic name of `topic`.
    pub fn dlq_topic(&self, topic: &str) -> String {
        format!("{topic}{}", self.dlq.suffix)
    }

    /// The consumer group that consumes `topic`, if any.
    pub fn group_of(&self, topic: &str) -> Option<&str> {
        self.consumer_groups
            .iter()
            .find(|(_, g)| g.consumes.iter().any(|t| t == topic))
            .map(|(name, _)| name.as_str())
    }

    /// Every topic to create, DLQs included, with `replication` capped at `max_replication`
    /// (a single-broker development cluster has only one replica to give).
    pub fn physical_topics(&self, max_replication: u16) -> Vec<PhysicalTopic> {
        let mut out = Vec::new();
        for (name, spec) in &self.topics {
            out.push(PhysicalTopic {
                name: name.clone(),
                partitions: spec.partitions,
                replication: spec.replication.min(max_replication),
                retention_ms: spec.retention.as_millis(),
                dlq_of: None,
                compacted: false,
            });
            if let Some(dlq) = &spec.dlq {
                out.push(PhysicalTopic {
                    name: self.dlq_topic(name),
                    partitions: dlq.partitions,
                    replication: spec.replication.min(max_replication),
                    retention_ms: dlq.retention.as_millis(),
                    dlq_of: Some(name.clone()),
                    compacted: false,
                });
            }
        }
        for (name, spec) in &self.changelogs {
            let partitions = self
                .topics
                .get(&spec.partitioned_like)
                .map_or(1, |t| t.partitions);
            out.push(PhysicalTopic {
                name: name.clone(),
                partitions,
                replication: spec.replication.min(max_replication),
                retention_ms: 0,
                dlq_of: None,
                compacted: true,
            });
        }
        if let Some(policy) = &self.progress {
            for (group, spec) in &self.consumer_groups {
                let (Some(name), Some(input)) = (
                    self.progress_topic_of(group),
                    spec.consumes.first().and_then(|t| self.topics.get(t)),
                ) else {
                    continue;
                };
                out.push(PhysicalTopic {
                    name,
                    partitions: input.partitions,
                    replication: policy.replication.min(max_replication),
                    retention_ms: 0,
                    dlq_of: None,
                    compacted: true,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_names_every_topic_dlq_changelog_and_group_of_a_deployment() {
        let path = crate::project_root().join("topic-config.yaml");
        let plain = TopicConfig::load(&path).expect("loads");
        let blue = plain.clone().with_prefix("blue.").expect("valid prefix");
        assert_eq!(blue.topics.len(), plain.topics.len());
        for t in blue.physical_topics(1) {
            assert!(t.name.starts_with("blue."), "{}", t.name);
            if let Some(of) = &t.dlq_of {
                assert!(of.starts_with("blue."), "{of}");
            }
        }
        for (name, group) in &blue.consumer_groups {
            assert!(name.starts_with("blue."), "{name}");
            for t in group
                .consumes
                .iter()
                .chain(&group.produces)
                .chain(&group.broadcast)
            {
                assert!(blue.topic(t).is_some(), "{name} names undeclared {t}");
            }
        }
        for spec in blue.changelogs.values() {
            assert!(blue.consumer_groups.contains_key(&spec.group));
            assert!(blue.topic(&spec.partitioned_like).is_some());
        }
        let telemetry = blue.telemetry.as_ref().expect("telemetry");
        assert!(blue.topic(&telemetry.execution).is_some());
        assert!(blue.topic(&telemetry.audit).is_some());
        assert_eq!(blue.group_name("bronze-processor"), "blue.bronze-processor");
        assert!(blue
            .consumer_groups
            .contains_key(&blue.group_name("bronze-processor")));
        assert_eq!(
            blue.subject("blue.connector.data.raw"),
            "blue.connector.data.raw-value"
        );
        assert_eq!(plain.group_name("bronze-processor"), "bronze-processor");
        assert!(plain.clone().with_prefix("a b").is_err());
        assert!(plain.clone().with_prefix("ü.").is_err());
    }

    #[test]
    fn every_consuming_group_has_a_compacted_progress_topic_partitioned_like_its_input() {
        let path = crate::project_root().join("topic-config.yaml");
        let blue = TopicConfig::load(&path)
            .expect("loads")
            .with_prefix("blue.")
            .expect("valid prefix");
        let physical = blue.physical_topics(1);
        for (group, spec) in &blue.consumer_groups {
            if spec.consumes.is_empty() {
                // Reads outside its group only (the realtime gateway): it commits nothing.
                assert_eq!(blue.progress_topic_of(group), None, "{group}");
                assert!(!physical
                    .iter()
                    .any(|t| t.name == format!("{group}.progress")));
                continue;
            }
            let name = blue.progress_topic_of(group).expect("declared");
            assert_eq!(name, format!("{group}.progress"));
            let topic = physical
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("{name} is created"));
            let input = blue.topic(&spec.consumes[0]).expect("input");
            assert!(topic.compacted, "{name}");
            assert_eq!(topic.partitions, input.partitions, "{name}");
            assert_eq!(topic.replication, 1, "{name}: capped like every topic");
        }
        assert_eq!(blue.progress_topic_of("no-such-group"), None);

        let text = std::fs::read_to_string(&path).expect("readable");
        for (bad, says) in [
            ("suffix: .progress", "suffix: \"\""),
            ("suffix: .progress", "suffix: \"a b\""),
            ("replication: 3\n", "replication: 0\n"),
            ("suffix: .progress", "suffix: .entity-state"),
        ] {
            let (head, tail) = text.split_at(text.find("progress:\n").expect("section"));
            let changed = format!("{head}{}", tail.replacen(bad, says, 1));
            let err = TopicConfig::parse(&changed, "t.yaml").expect_err(says);
            assert!(err.to_string().contains("progress"), "{says}: {err}");
        }
    }

    const GOOD: &str = "\
schema_registry:
  compatibility: BACKWARD
  subject_strategy: topic
dlq:
  suffix: .dlq
topics:
  a.raw:
    partitions: 3
    replication: 3
    retention: 7d
    key: org_id
    schema: a.avsc
    dlq: { partitions: 1, retention: 14d }
  b.out:
    partitions: 3
    replication: 3
    retention: 12h
    key: org_id
    schema: b.avsc
consumer_groups:
  worker:
    purpose: test
    consumes: [a.raw]
    produces: [b.out]
";

    #[test]
    fn loads_and_derives_dlqs() {
        let config = TopicConfig::parse(GOOD, "t.yaml").expect("valid");
        let topics = config.physical_topics(1);
        assert_eq!(topics.len(), 3);
        let dlq = topics.iter().find(|t| t.name == "a.raw.dlq").expect("dlq");
        assert_eq!(dlq.retention_ms, 14 * 86_400_000);
        assert_eq!(dlq.replication, 1);
        assert_eq!(dlq.dlq_of.as_deref(), Some("a.raw"));
        assert_eq!(config.subject("a.raw"), "a.raw-value");
        assert_eq!(config.group_of("a.raw"), Some("worker"));
    }

    fn error_of(text: &str) -> String {
        TopicConfig::parse(text, "t.yaml")
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace(
            "    key: org_id\n    schema: a.avsc",
            "    key: org_id\n    retension: 7d\n    schema: a.avsc",
        );
        let err = error_of(&text);
        assert!(err.contains("retension"), "{err}");
        assert!(err.contains("line 12"), "{err}");
    }

    #[test]
    fn dlq_without_retention_is_rejected() {
        let err = error_of(&GOOD.replace(
            "dlq: { partitions: 1, retention: 14d }",
            "dlq: { partitions: 1 }",
        ));
        assert!(err.contains("retention"), "{err}");
        assert!(err.contains("line 13"), "{err}");
    }

    #[test]
    fn group_reading_an_undeclared_topic_is_rejected() {
        let err = error_of(&GOOD.replace("consumes: [a.raw]", "consumes: [a.rawx]"));
        assert!(err.contains("a.rawx"), "{err}");
        assert!(err.contains("t.yaml:23"), "{err}");
    }

    #[test]
    fn consumed_topic_without_dlq_is_rejected() {
        let err = error_of(&GOOD.replace("consumes: [a.raw]", "consumes: [b.out]"));
        assert!(err.contains("b.out") && err.contains("dlq"), "{err}");
    }

    #[test]
    fn bad_durations_are_explained() {
        assert!(parse_duration("7x")
            .expect_err("bad")
            .0
            .contains("unknown unit"));
        assert!(parse_duration("d").is_err());
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
    }

    /// Computed by Java 17 (`Long.valueOf(v).hashCode()`, `Math.abs(h) % n` for n = 3, 6, 12):
    /// `v hash p3 p6 p12`. The negative partitions are where Java's formula breaks.
    const JAVA: &str = "1 1 1 1 1
101 101 2 5 5
-1 0 0 0 0
2147483648 -2147483648 -2 -2 -8
4294967296 1 1 1 1
-2147483649 -2147483648 -2 -2 -8
9223372036854775807 -2147483648 -2 -2 -8
-9223372036854775808 -2147483648 -2 -2 -8
123456789012 -1097262584 2 2 8
4242 4242 0 0 6
211 211 1 1 7
987654321987 -188155994 2 2 2";

    #[test]
    fn the_java_long_hash_partitioner_agrees_with_java() {
        for line in JAVA.lines() {
            let v: Vec<i64> = line
                .split_whitespace()
                .map(|x| x.parse().expect("number"))
                .collect();
            assert_eq!(java_long_hash_code(v[0]) as i64, v[1], "hash of {}", v[0]);
            for (n, java) in [(3u32, v[2]), (6, v[3]), (12, v[4])] {
                let ours = Partitioner::JavaLongHash
                    .partition(v[0].to_string().as_bytes(), n)
                    .expect("a long key");
                if java >= 0 {
                    assert_eq!(ours as i64, java, "{} over {n}", v[0]);
                } else {
                    // Math.abs(Integer.MIN_VALUE) stays negative; 2^31 % n instead.
                    assert_eq!(ours as i64, (1i64 << 31) % n as i64, "{} over {n}", v[0]);
                }
            }
        }
        assert_eq!(Partitioner::JavaLongHash.partition(b"not-a-long", 12), None);
        assert_eq!(Partitioner::Murmur2.partition(b"101", 12), None);
    }

    #[test]
    fn a_topic_chooses_its_partitioner_and_an_unknown_one_is_refused() {
        let text = std::fs::read_to_string(crate::project_root().join("topic-config.yaml"))
            .expect("topic-config.yaml");
        let config = TopicConfig::parse(&text, "t").expect("valid");
        assert!(config
            .topics
            .values()
            .all(|t| t.partitioner == Partitioner::Murmur2));
        let java = text.replacen(
            "    schema: connector/data-raw.avsc\n",
            "    schema: connector/data-raw.avsc\n    partitioner: java_long_hash\n",
            1,
        );
        let config = TopicConfig::parse(&java, "t").expect("valid");
        assert_eq!(
            config.topic("connector.data.raw").map(|t| t.partitioner),
            Some(Partitioner::JavaLongHash)
        );
        let bad = java.replace("java_long_hash", "crc32");
        let message = TopicConfig::parse(&bad, "t")
            .expect_err("refused")
            .to_string();
        assert!(message.contains("crc32"), "{message}");
    }
}
