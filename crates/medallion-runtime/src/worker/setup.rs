//! Building a worker: registering schemas, decoders and encoders, the stage itself.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::Schema;
use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::{ContractSet, TopicConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::fair::FairShape;
use super::flights::InFlightLimits;
use super::ledger::Ledger;
use super::planner::Planner;
use super::restore::Restorer;
use super::source::BatchShape;
use super::stage::{stage_input_schema, Stage, StageSetup};
use super::tally::{CountedThrough, Tally};
use super::telemetry::Telemetry;
use super::topology::topology;
use super::windows;
use super::{StageWorker, WorkerError};
use crate::config::WorkerConfig;
use crate::dedup::WindowFiles;
use crate::error::SetupError;
use crate::http::Health;
use crate::kafka::Placement;
use crate::metrics as m;
use crate::outbound::JsonEncoder;
use crate::retry::RetryPolicy;

/// Registers `topic`'s schema, waiting out an unreachable registry.
pub(super) async fn register_with_retry(
    registry: &RegistryClient,
    topics: &TopicConfig,
    topic: &str,
    schema_text: &str,
    policy: &RetryPolicy,
    group: &str,
) -> Result<u32, WorkerError> {
    let subject = topics.subject(topic);
    let mut attempt = 0usize;
    loop {
        match registry.register(&subject, schema_text).await {
            Ok(id) => return Ok(id),
            Err(e) if e.is_transient() => {
                attempt += 1;
                metrics::counter!(m::RETRIES_TOTAL, "stage" => group.to_string(), "reason" => "registry_unreachable").increment(1);
                let wait = policy.wait_forever(attempt);
                tracing::warn!(error = %e, ?wait, "registry unreachable at start-up; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Prepares the worker for `group`; `make_stage` builds the stage's transform once.
pub async fn prepare<S, C, F, Fut>(
    config: &WorkerConfig<C>,
    group: &str,
    health: Arc<Health>,
    make_stage: F,
) -> Result<StageWorker<S>, WorkerError>
where
    S: Stage,
    C: Default + Serialize + DeserializeOwned,
    F: FnOnce(StageSetup) -> Fut,
    Fut: Future<Output = Result<S, SetupError>>,
{
    let home = config.home();
    let contracts = ContractSet::load(&home.join("schemas"))
        .map_err(|e| WorkerError::Contracts(e.to_string()))?;
    let topics = TopicConfig::load(&home.join("topic-config.yaml"))
        .map_err(|e| WorkerError::Contracts(e.to_string()))?
        .with_prefix(&config.naming.prefix)
        .map_err(|e| SetupError::config("naming.prefix", e))?;
    let group = &topics.group_name(group);
    let kafka = config.kafka.connection()?;
    let topo = topology(&contracts, &topics, group)?;
    let registry = Arc::new(config.registry.client()?);
    let policy = RetryPolicy::from_millis(&config.retry.backoff_ms);
    // Output schemas must be registered before anything is produced: wait for the registry.
    let (encoder, event_encoder, output_schema) = match &topo.output {
        Some(output) => {
            let id = register_with_retry(
                &registry,
                &topics,
                &output.topic,
                &output.contract.text,
                &policy,
                group,
            )
            .await?;
            let schema = BatchDecoder::new(&output.contract.full_name, &output.contract.text)
                .map_err(SetupError::from)?
                .schema();
            let encoder = BatchEncoder::new(&schema, &output.contract.text, id)
                .map_err(|e| SetupError::schema(&output.topic, e))?;
            let events = JsonEncoder::new(&output.topic, &output.contract.text, id)?;
            (Some(encoder), Some(events), schema)
        }
        None => (None, None, Arc::new(Schema::empty())),
    };
    let telemetry = match &topics.telemetry {
        Some(names) => {
            let mut registered = Vec::with_capacity(2);
            for topic in [&names.execution, &names.audit] {
                let contract = topics
                    .topic(topic)
                    .and_then(|t| contracts.get(&t.schema))
                    .ok_or_else(|| WorkerError::MissingContract(topic.clone()))?;
                let id =
                    register_with_retry(&registry, &topics, topic, &contract.text, &policy, group)
                        .await?;
                registered.push((topic.clone(), contract.text.clone(), id));
            }
            let (execution, audit) = (&registered[0], &registered[1]);
            Some(Telemetry {
                execution: JsonEncoder::new(&execution.0, &execution.1, execution.2)?,
                audit: crate::audit::AuditEncoder::new(&audit.0, &audit.1, audit.2)?,
                pipeline_id: config.pipeline.id.clone(),
            })
        }
        None => None,
    };
    health.set_registry_ok(true);
    metrics::gauge!(m::SCHEMA_REGISTRY_SCHEMAS_TOTAL).set(1.0);
    let decoder =
        BatchDecoder::new(&topo.input.full_name, &topo.input.text).map_err(SetupError::from)?;
    let input_schema = stage_input_schema(&decoder.schema());
    let stage = make_stage(StageSetup {
        group: group.to_string(),
        home: home.clone(),
        contracts: contracts.clone(),
        topics: topics.clone(),
        registry: registry.clone(),
        kafka: kafka.clone(),
        input_schema: input_schema.clone(),
        output_schema: output_schema.clone(),
        input_topic: topo.input_topic.clone(),
        output_topic: topo.output.as_ref().map(|o| o.topic.clone()),
        retry: policy.clone(),
        state: config.state.clone(),
    })
    .await?;
    let fair = FairShape::from_config(&config.fairness, config.dedup.window_per_partition);
    let fair = FairShape {
        enabled: fair.enabled && !stage.needs_log_order(),
        ..fair
    };
    // With a state directory, the dedup windows are copied beside the store:
    // `<dir>/<group>.windows/`.
    let window_files = config.state.dir.as_ref().map(|dir| {
        WindowFiles::new(
            dir.join(format!("{group}.windows")),
            format!("{group} {}", topo.input_topic),
        )
    });
    let topo = Arc::new(topo);
    Ok(StageWorker {
        stage,
        planner: Planner::new(
            topo.clone(),
            registry,
            decoder,
            encoder,
            event_encoder,
            telemetry,
        ),
        restorer: Restorer::new(
            kafka.clone(),
            topo.clone(),
            config.dedup.window_per_partition,
            policy.clone(),
            window_files.clone(),
        ),
        windows: windows::WindowKeeper::new(
            window_files,
            Duration::from_millis(config.state.checkpoint_interval_ms),
        ),
        tally: Tally::new(
            topo.group.clone(),
            topo.input_topic.clone(),
            topo.output.as_ref().map(|o| o.topic.clone()),
        ),
        kafka,
        topo,
        policy,
        health,
        assigned: Arc::new(Mutex::new(HashSet::new())),
        revoked: Arc::new(Mutex::new(Vec::new())),
        ledger: Arc::new(Mutex::new(Ledger::default())),
        placement: Placement::of(&topics),
        limits: InFlightLimits {
            records: config.batch.max_in_flight_records,
            bytes: config.batch.max_in_flight_bytes,
        },
        drain_timeout: Duration::from_millis(u64::from(config.kafka.produce_timeout_ms)),
        counted: CountedThrough::default(),
        shape: BatchShape {
            max_records: config.batch.max_records,
            linger: Duration::from_millis(config.batch.linger_ms),
            idle_after: Duration::from_millis(500),
        },
        fair,
    })
}
