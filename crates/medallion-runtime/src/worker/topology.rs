//! Which topics and contracts a consumer group reads and writes (topic-config.yaml).

use medallion_contracts::{Contract, ContractSet, TopicConfig};

use super::*;

pub(super) struct Topology {
    pub(super) group: String,
    pub(super) input_topic: String,
    pub(super) dlq_topic: String,
    pub(super) input: Contract,
    pub(super) output: Option<Output>,
}

/// The output topic of a group that has one.
pub(super) struct Output {
    pub(super) topic: String,
    pub(super) contract: Contract,
    pub(super) key: String,
}

pub(super) fn topology(
    contracts: &ContractSet,
    topics: &TopicConfig,
    group: &str,
) -> Result<Topology, WorkerError> {
    let spec = topics
        .consumer_groups
        .get(group)
        .ok_or_else(|| WorkerError::UnknownGroup(group.to_string()))?;
    let (Some(input_topic), 1) = (spec.consumes.first(), spec.consumes.len()) else {
        return Err(WorkerError::Shape {
            group: group.to_string(),
            consumes: spec.consumes.len(),
        });
    };
    let contract = |topic: &str| -> Result<(Contract, String), WorkerError> {
        let t = topics
            .topic(topic)
            .ok_or_else(|| WorkerError::Contracts(format!("topic {topic} missing")))?;
        let c = contracts
            .get(&t.schema)
            .ok_or_else(|| WorkerError::MissingContract(t.schema.clone()))?;
        Ok((c.clone(), t.key.clone()))
    };
    let (input, _) = contract(input_topic)?;
    let output = match spec.produces.first() {
        Some(topic) => {
            let (contract, key) = contract(topic)?;
            Some(Output {
                topic: topic.clone(),
                contract,
                key,
            })
        }
        None => None,
    };
    Ok(Topology {
        group: group.to_string(),
        input_topic: input_topic.clone(),
        dlq_topic: topics.dlq_topic(input_topic),
        input,
        output,
    })
}
