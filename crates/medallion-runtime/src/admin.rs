//! Creates the topics and DLQs of `topic-config.yaml` through the Kafka Admin API.

use std::time::Duration;

use medallion_contracts::topics::{PhysicalTopic, TopicConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::kafka::{KafkaConnection, Role};

/// Why topics could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Client(#[from] crate::kafka::ClientError),
    #[error("cannot read the cluster metadata from {bootstrap}: {message}")]
    Metadata { bootstrap: String, message: String },
    #[error("creating topic {topic} failed: {message}")]
    Create { topic: String, message: String },
}

fn admin_client(kafka: &KafkaConnection) -> Result<AdminClient<DefaultClientContext>, AdminError> {
    Ok(kafka.create(Role::Admin, "admin client")?)
}

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    AlreadyExists,
}

/// Creates every topic and DLQ of `config` that does not exist yet. Idempotent.
pub async fn apply_topics(
    kafka: &KafkaConnection,
    config: &TopicConfig,
    max_replication: u16,
) -> Result<Vec<(PhysicalTopic, Applied)>, AdminError> {
    let admin = admin_client(kafka)?;
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
    kafka: &KafkaConnection,
    names: &[String],
) -> Result<Vec<TopicState>, AdminError> {
    let admin = admin_client(kafka)?;
    let metadata = {
        let bootstrap = kafka.bootstrap().to_string();
        let client = admin.inner();
        client
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| AdminError::Metadata {
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

/// How a topic differs from `topic-config.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create,
    Retention {
        from: Option<u128>,
        to: u128,
    },
    CleanupPolicy {
        from: Option<String>,
        to: String,
    },
    AddPartitions {
        from: u32,
        to: u32,
    },
    /// Kafka cannot remove partitions: the plan names it, apply refuses it.
    FewerPartitions {
        have: u32,
        want: u32,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Create => write!(f, "create"),
            Change::Retention { from, to } => write!(
                f,
                "retention.ms {} -> {to}",
                from.map_or("(default)".to_string(), |v| v.to_string())
            ),
            Change::CleanupPolicy { from, to } => write!(
                f,
                "cleanup.policy {} -> {to}",
                from.as_deref().unwrap_or("(default)")
            ),
            Change::AddPartitions { from, to } => write!(f, "partitions {from} -> {to}"),
            Change::FewerPartitions { have, want } => write!(
                f,
                "has {have} partitions, wants {want}: Kafka cannot remove partitions (recreate the topic)"
            ),
        }
    }
}

/// Every declared topic and DLQ with what would change (empty: up to date).
pub async fn plan_topics(
    kafka: &KafkaConnection,
    config: &TopicConfig,
    max_replication: u16,
) -> Result<Vec<(PhysicalTopic, Vec<Change>)>, AdminError> {
    let wanted = config.physical_topics(max_replication);
    let names: Vec<String> = wanted.iter().map(|t| t.name.clone()).collect();
    let existing = describe_topics(kafka, &names).await?;
    let mut out = Vec::with_capacity(wanted.len());
    for topic in wanted {
        let Some(have) = existing.iter().find(|s| s.name == topic.name) else {
            out.push((topic, vec![Change::Create]));
            continue;
        };
        let mut changes = Vec::new();
        if have.partitions < topic.partitions {
            changes.push(Change::AddPartitions {
                from: have.partitions,
                to: topic.partitions,
            });
        } else if have.partitions > topic.partitions {
            changes.push(Change::FewerPartitions {
                have: have.partitions,
                want: topic.partitions,
            });
        }
        let policy = if topic.compacted { "compact" } else { "delete" };
        if have.cleanup_policy.as_deref().unwrap_or("delete") != policy {
            changes.push(Change::CleanupPolicy {
                from: have.cleanup_policy.clone(),
                to: policy.to_string(),
            });
        }
        if !topic.compacted && have.retention_ms != Some(topic.retention_ms) {
            changes.push(Change::Retention {
                from: have.retention_ms,
                to: topic.retention_ms,
            });
        }
        out.push((topic, changes));
    }
    Ok(out)
}

/// Brings the broker to the plan: creates missing topics, adds partitions, sets retention and
/// cleanup policy. Refuses (before changing anything) if a topic would need fewer partitions.
pub async fn reconcile_topics(
    kafka: &KafkaConnection,
    config: &TopicConfig,
    max_replication: u16,
) -> Result<Vec<(PhysicalTopic, Vec<Change>)>, AdminError> {
    let plan = plan_topics(kafka, config, max_replication).await?;
    if let Some((topic, change)) = plan.iter().find_map(|(t, c)| {
        c.iter()
            .find(|c| matches!(c, Change::FewerPartitions { .. }))
            .map(|c| (t, c))
    }) {
        return Err(AdminError::Create {
            topic: topic.name.clone(),
            message: change.to_string(),
        });
    }
    apply_topics(kafka, config, max_replication).await?;
    let admin = admin_client(kafka)?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for (topic, changes) in &plan {
        if changes.contains(&Change::Create) {
            continue;
        }
        for change in changes {
            if let Change::AddPartitions { to, .. } = change {
                let grow = rdkafka::admin::NewPartitions::new(&topic.name, *to as usize);
                let results = admin
                    .create_partitions([&grow], &options)
                    .await
                    .map_err(|e| AdminError::Create {
                        topic: topic.name.clone(),
                        message: e.to_string(),
                    })?;
                for r in results {
                    r.map_err(|(t, code)| AdminError::Create {
                        topic: t,
                        message: code.to_string(),
                    })?;
                }
            }
        }
        let configs = changes
            .iter()
            .any(|c| matches!(c, Change::Retention { .. } | Change::CleanupPolicy { .. }));
        if configs {
            let mut entries = vec![(
                "cleanup.policy",
                if topic.compacted { "compact" } else { "delete" }.to_string(),
            )];
            if !topic.compacted {
                entries.push(("retention.ms", topic.retention_ms.to_string()));
            }
            let (kafka, name) = (kafka.clone(), topic.name.clone());
            tokio::task::spawn_blocking(move || set_topic_configs(&kafka, &name, &entries))
                .await
                .map_err(|e| AdminError::Create {
                    topic: topic.name.clone(),
                    message: e.to_string(),
                })??;
        }
    }
    Ok(plan)
}

/// Sets `entries` on `topic` with IncrementalAlterConfigs (KIP-339): only the named keys change,
/// unlike the legacy AlterConfigs, which resets every other dynamic setting of the topic.
fn set_topic_configs(
    kafka: &KafkaConnection,
    topic: &str,
    entries: &[(&str, String)],
) -> Result<(), AdminError> {
    use std::ffi::{CStr, CString};

    use rdkafka::bindings as rd;

    let admin = admin_client(kafka)?;
    let error = |message: String| AdminError::Create {
        topic: topic.to_string(),
        message: format!("altering configs: {message}"),
    };
    let c = |text: &str| CString::new(text).map_err(|e| error(e.to_string()));
    let name = c(topic)?;
    let entries = entries
        .iter()
        .map(|(k, v)| Ok((c(k)?, c(v)?)))
        .collect::<Result<Vec<_>, AdminError>>()?;
    // SAFETY: every pointer comes from librdkafka and is destroyed once, after its last use;
    // strings outlive the calls that read them; the request copies the resource.
    unsafe {
        let rk = admin.inner().native_ptr();
        let resource = rd::rd_kafka_ConfigResource_new(
            rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
            name.as_ptr(),
        );
        for (key, value) in &entries {
            let failed = rd::rd_kafka_ConfigResource_add_incremental_config(
                resource,
                key.as_ptr(),
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                value.as_ptr(),
            );
            if !failed.is_null() {
                let message = CStr::from_ptr(rd::rd_kafka_error_string(failed))
                    .to_string_lossy()
                    .into_owned();
                rd::rd_kafka_error_destroy(failed);
                rd::rd_kafka_ConfigResource_destroy(resource);
                return Err(error(message));
            }
        }
        let queue = rd::rd_kafka_queue_new(rk);
        let options = rd::rd_kafka_AdminOptions_new(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
        );
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options,
            30_000,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let mut resources = [resource];
        rd::rd_kafka_IncrementalAlterConfigs(rk, resources.as_mut_ptr(), 1, options, queue);
        let event = rd::rd_kafka_queue_poll(queue, 40_000);
        let outcome = if event.is_null() {
            Err(error("no answer within 40 s".into()))
        } else if rd::rd_kafka_event_error(event)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            Err(error(
                CStr::from_ptr(rd::rd_kafka_event_error_string(event))
                    .to_string_lossy()
                    .into_owned(),
            ))
        } else {
            let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(event);
            let mut n = 0usize;
            let list = if result.is_null() {
                std::ptr::null_mut()
            } else {
                rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut n)
            };
            let mut outcome = Ok(());
            for i in 0..n {
                let r = *list.add(i);
                if rd::rd_kafka_ConfigResource_error(r)
                    != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    outcome = Err(error(
                        CStr::from_ptr(rd::rd_kafka_ConfigResource_error_string(r))
                            .to_string_lossy()
                            .into_owned(),
                    ));
                }
            }
            outcome
        };
        if !event.is_null() {
            rd::rd_kafka_event_destroy(event);
        }
        rd::rd_kafka_AdminOptions_destroy(options);
        rd::rd_kafka_queue_destroy(queue);
        rd::rd_kafka_ConfigResource_destroy(resource);
        outcome
    }
}
