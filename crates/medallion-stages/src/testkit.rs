//! Helpers for in-process stage tests.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::{project_root, ContractSet, TopicConfig};
use medallion_runtime::kafka::KafkaConnection;
use medallion_runtime::worker::StageSetup;

/// A setup for `group` on the repository's contracts, with no broker or registry behind it.
pub fn offline_setup(group: &str, input_schema: SchemaRef, output_schema: SchemaRef) -> StageSetup {
    let root = project_root();
    let topics = TopicConfig::load(&root.join("topic-config.yaml")).expect("topic-config.yaml");
    let spec = topics.consumer_groups.get(group).expect("group").clone();
    StageSetup {
        group: group.to_string(),
        home: root.clone(),
        contracts: ContractSet::load(&root.join("schemas")).expect("schemas"),
        registry: Arc::new(
            RegistryClient::new("http://127.0.0.1:9", Duration::from_millis(100)).expect("client"),
        ),
        kafka: KafkaConnection::plain("127.0.0.1:9").expect("connection"),
        input_schema,
        output_schema,
        input_topic: spec.consumes[0].clone(),
        output_topic: spec.produces.first().cloned(),
        retry: Default::default(),
        state: Default::default(),
        topics,
    }
}

/// Frames JSON events of `contract` (schema id 1), decodes them and adds the meta columns
/// (key = org_id, partition `partition`, offsets from `first_offset`, processing time `now_ms`).
pub fn input_batch(
    contract: &medallion_contracts::Contract,
    events: &[serde_json::Value],
    partition: i32,
    first_offset: i64,
    now_ms: i64,
) -> (arrow::array::RecordBatch, SchemaRef) {
    use medallion_contracts::columnar::BatchDecoder;
    let mut decoder = BatchDecoder::new(&contract.full_name, &contract.text).expect("decoder");
    decoder
        .add_writer_schema(1, &contract.text)
        .expect("writer");
    let messages: Vec<Vec<u8>> = events
        .iter()
        .map(|e| medallion_contracts::json::to_framed(e, &contract.schema, 1).expect("frames"))
        .collect();
    let decoded = decoder
        .decode(messages.iter().map(Vec::as_slice))
        .expect("decodes");
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
    let n = decoded.batch.num_rows();
    let batch = medallion_runtime::worker::with_meta(
        &decoded.batch,
        events
            .iter()
            .map(|e| Some(e["org_id"].to_string()))
            .collect(),
        vec![partition; n],
        (first_offset..first_offset + n as i64).collect(),
        now_ms,
    )
    .expect("meta");
    let schema = medallion_runtime::worker::stage_input_schema(&decoder.schema());
    (batch, schema)
}

/// The Arrow schema of `contract`.
pub fn arrow_schema(contract: &medallion_contracts::Contract) -> SchemaRef {
    medallion_contracts::columnar::arrow_schema_of(&contract.full_name, &contract.text)
        .expect("arrow schema")
}

/// Encodes a stage's output batch with `contract` and reads it back as JSON.
pub fn output_json(
    contract: &medallion_contracts::Contract,
    batch: &arrow::array::RecordBatch,
) -> Vec<serde_json::Value> {
    let mut encoder =
        medallion_contracts::columnar::BatchEncoder::new(&batch.schema(), &contract.text, 2)
            .expect("encoder");
    encoder
        .encode(batch)
        .expect("encodes")
        .iter()
        .map(|m| {
            medallion_contracts::json::from_avro_binary(&m[5..], &contract.schema, &contract.schema)
                .expect("valid output")
        })
        .collect()
}

/// The repository's contract of `path` (e.g. `silver/data-processed.avsc`).
pub fn contract(path: &str) -> medallion_contracts::Contract {
    ContractSet::load(&project_root().join("schemas"))
        .expect("schemas")
        .get(path)
        .expect("contract")
        .clone()
}

/// What a stage handed its collector for one batch, laid out for assertions.
#[derive(Debug)]
pub struct Output {
    /// The output rows (an empty batch when none were emitted).
    pub batch: arrow::array::RecordBatch,
    pub source_rows: Vec<Option<u32>>,
    pub rejected: Vec<(u32, medallion_runtime::error::RecordFailure)>,
    pub side: Vec<medallion_runtime::worker::SideRecord>,
    pub row_headers: Vec<(u32, String, Vec<u8>)>,
    pub events: Vec<medallion_runtime::worker::OutputEvent>,
    /// (output row, n) counted as the row's record lands, summed by row.
    pub delivered_counts: Vec<(u32, u64)>,
}

/// Runs `stage` on one batch and returns what it collected.
pub async fn process<S: medallion_runtime::worker::Stage>(
    stage: &mut S,
    input: arrow::array::RecordBatch,
) -> Result<Output, medallion_runtime::error::StageError> {
    let mut out = medallion_runtime::worker::Collector::new();
    stage.process(input, &mut out).await?;
    Ok(Output {
        batch: out.rows().cloned().unwrap_or_else(|| {
            arrow::array::RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty()))
        }),
        source_rows: out.source_rows().to_vec(),
        rejected: out.rejected().to_vec(),
        side: out.side_records().to_vec(),
        row_headers: out.row_headers().to_vec(),
        events: out.events().to_vec(),
        delivered_counts: out.delivered_counts(),
    })
}
