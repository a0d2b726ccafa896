//! Creates the topics and DLQs of `topic-config.yaml` through the Kafka Admin API.

use std::time::Duration;

use medallion_contracts::topics::{PhysicalTopic, TopicConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

/// Why topics could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot create an admin client for {bootstrap}: {message}")]
    Client { bootstrap: String, message: String },
    #[error("creating topic {topic} failed: {message}")]
    Create { topic: String, message: String },
}

fn admin_client(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>, AdminError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| AdminError::Client {
            bootstrap: bootstrap.to_string(),
            message: e.to_string(),
        })
}

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    AlreadyExists,
}

/// Creates every topic and DLQ of `config` that does not exist yet. Idempotent.
pub async fn apply_topics(
    bootstrap: &str,
    config: &TopicConfig,
    max_replication: u16,
) -> Result<Vec<(PhysicalTopic, Applied)>, AdminError> {
    let admin = admin_client(bootstrap)?;
    let topics = config.physical_topics(max_replication);
    let retention: Vec<String> = topics.iter().map(|t| t.retention_ms.to_string()).collect();
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .zip(&retention)
        .map(|(t, retention)| {
            let topic = NewTopic::new(
                &t.name,
                t.partitions as i32,
                TopicReplication::Fixed(i32::from(t.replication)),
            );
            if t.compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic.set("retention.ms", retention)
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| AdminError::Create {
            topic: "(all)".into(),
            message: e.to_string(),
        })?;
    let mut out = Vec::with_capacity(topics.len());
    for (topic, result) in topics.into_iter().zip(results) {
        match result {
            Ok(_) => out.push((topic, Applied::Created)),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                out.push((topic, Applied::AlreadyExists))
            }
            Err((name, code)) => {
                return Err(AdminError::Create {
                    topic: name,
                    message: code.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// A topic as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicState {
    pub name: String,
    pub partitions: u32,
    pub retention_ms: Option<u128>,
    /// `cleanup.policy` (`delete`, `compact`), when the broker reports it.
    pub cleanup_policy: Option<String>,
}

/// Reads partition counts (metadata), `retention.ms` and `cleanup.policy` (DescribeConfigs)
/// of `names`.
/// A topic the broker does not know is left out.
pub async fn describe_topics(
    bootstrap: &str,
    names: &[String],
) -> Result<Vec<TopicState>, AdminError> {
    let admin = admin_client(bootstrap)?;
    let metadata = {
        let bootstrap = bootstrap.to_string();
        let client = admin.inner();
        client
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| AdminError::Client {
                bootstrap,
                message: e.to_string(),
            })?
    };
    let mut out = Vec::new();
    for name in names {
        let Some(topic) = metadata.topics().iter().find(|t| t.name() == name) else {
            continue;
        };
        if topic.partitions().is_empty() {
            continue;
        }
        out.push(TopicState {
            name: name.clone(),
            partitions: topic.partitions().len() as u32,
            retention_ms: None,
            cleanup_policy: None,
        });
    }
    let specifiers: Vec<ResourceSpecifier<'_>> = out
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.name.as_str()))
        .collect();
    if specifiers.is_empty() {
        return Ok(out);
    }
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let configs = admin
        .describe_configs(specifiers.iter(), &options)
        .await
        .map_err(|e| AdminError::Create {
            topic: "(describe configs)".into(),
            message: e.to_string(),
        })?;
    for (state, config) in out.iter_mut().zip(configs) {
        if let Ok(resource) = config {
            state.retention_ms = resource
                .get("retention.ms")
                .and_then(|e| e.value.as_deref())
                .and_then(|v| v.parse().ok());
            state.cleanup_policy = resource.get("cleanup.policy").and_then(|e| e.value.clone());
        }
    }
    Ok(out)
}
