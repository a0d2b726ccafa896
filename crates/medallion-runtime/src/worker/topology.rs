//! Which topics and contracts a consumer group reads and writes (topic-config.yaml).

use medallion_contracts::{Contract, ContractSet, TopicConfig};

use super::WorkerError;

/// The topics and contracts of one consumer group.
#[derive(Debug)]
pub(super) struct Topology {
    pub(super) group: String,
    pub(super) input_topic: String,
    pub(super) dlq_topic: String,
    pub(super) input: Contract,
    pub(super) output: Option<Output>,
    /// Where the group's commit metadata is written too (see [`super::progress_log`]).
    pub(super) progress_topic: Option<String>,
}

/// The output topic of a group that has one.
#[derive(Debug)]
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
        progress_topic: topics.progress_topic_of(group),
    })
}

#[cfg(test)]
mod tests {
    use medallion_contracts::{project_root, ContractSet, TopicConfig};

    use super::*;

    fn config() -> (ContractSet, TopicConfig) {
        let root = project_root();
        (
            ContractSet::load(&root.join("schemas")).expect("schemas"),
            TopicConfig::load(&root.join("topic-config.yaml")).expect("topics"),
        )
    }

    #[test]
    fn a_group_reads_one_topic_and_writes_its_output_and_dlq() {
        let (contracts, topics) = config();
        let topo = topology(&contracts, &topics, "silver-processor").expect("topology");
        assert_eq!(topo.input_topic, "bronze.data.cleaned");
        assert_eq!(topo.dlq_topic, "bronze.data.cleaned.dlq");
        let output = topo.output.expect("silver writes");
        assert_eq!(output.topic, "silver.data.processed");
        assert_eq!(output.key, "org_id");
        assert_eq!(
            topo.progress_topic.as_deref(),
            Some("silver-processor.progress")
        );
        let sink = topology(&contracts, &topics, "audit-writer").expect("topology");
        assert!(sink.output.is_none(), "a sink group produces no topic");
    }

    #[test]
    fn an_unknown_group_or_a_group_of_two_inputs_is_refused_by_name() {
        let (contracts, mut topics) = config();
        let err = topology(&contracts, &topics, "no-such-group").expect_err("unknown");
        assert!(err.to_string().contains("no-such-group"), "{err}");
        let spec = topics
            .consumer_groups
            .get_mut("gold-processor")
            .expect("gold");
        spec.consumes.push("bronze.data.cleaned".into());
        let err = topology(&contracts, &topics, "gold-processor").expect_err("two inputs");
        assert!(err.to_string().contains("exactly one topic"), "{err}");
    }
}
