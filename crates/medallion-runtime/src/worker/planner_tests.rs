//! The planner without a broker: records framed by apache-avro (not the decoder's own
//! implementation), a stage written for each case, the outgoing records checked field by field.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::{Record, Value};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::Contract;
use rdkafka::message::{Headers, Timestamp};

use super::{Outgoing, Plan, Planner};
use crate::dedup::event_key;
use crate::error::{RecordFailure, StageError};
use crate::outbound::JsonEncoder;
use crate::record::{HeaderList, Inbound};
use crate::worker::stage::{Collector, Stage};
use crate::worker::topology::{Output, Topology};

const SCHEMA: &str = r#"{"type": "record", "name": "Event", "namespace": "test",
  "fields": [
    {"name": "event_id", "type": "string"},
    {"name": "org_id", "type": "long"},
    {"name": "value", "type": "string"}
  ]}"#;
const INPUT_ID: u32 = 7;
const OUTPUT_ID: u32 = 8;

fn contract() -> Contract {
    Contract {
        path: "test/event.avsc".into(),
        full_name: "test.Event".into(),
        contract_version: 1,
        json: serde_json::from_str(SCHEMA).expect("schema json"),
        text: SCHEMA.into(),
        schema: apache_avro::Schema::parse_str(SCHEMA).expect("schema"),
    }
}

fn planner() -> Planner {
    let topo = Arc::new(Topology {
        group: "test-group".into(),
        input_topic: "in".into(),
        dlq_topic: "in.dlq".into(),
        input: contract(),
        output: Some(Output {
            topic: "out".into(),
            contract: contract(),
            key: "org_id".into(),
        }),
        progress_topic: None,
    });
    let mut decoder = BatchDecoder::new("test.Event", SCHEMA).expect("decoder");
    decoder
        .add_writer_schema(INPUT_ID, SCHEMA)
        .expect("writer schema");
    let encoder = BatchEncoder::new(&decoder.schema(), SCHEMA, OUTPUT_ID).expect("encoder");
    let events = JsonEncoder::new("out", SCHEMA, OUTPUT_ID).expect("event encoder");
    // Every writer id is known: the registry is never asked.
    let registry = RegistryClient::new("http://127.0.0.1:9", Duration::from_millis(50))
        .expect("registry client");
    Planner::new(
        topo,
        Arc::new(registry),
        decoder,
        Some(encoder),
        Some(events),
        None,
    )
}

/// A Confluent-framed record written by apache-avro.
fn framed(event_id: &str, org: i64, value: &str) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(SCHEMA).expect("schema");
    let mut record = Record::new(&schema).expect("record");
    record.put("event_id", event_id);
    record.put("org_id", Value::Long(org));
    record.put("value", value);
    let mut out = vec![0];
    out.extend(INPUT_ID.to_be_bytes());
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .and_then(|w| w.write_value_to_vec(record))
        .expect("datum");
    out.extend(body);
    out
}

fn message(partition: i32, offset: i64, payload: Vec<u8>, trace: &str) -> Inbound {
    Inbound::new(
        "in",
        partition,
        offset,
        Timestamp::CreateTime(1_700_000_000_000),
        Some(b"42".to_vec()),
        Some(payload),
        Some(HeaderList::new().with("trace", trace.as_bytes())),
    )
}

/// `(event id, value)` records on partition 0 from offset 0.
fn batch(rows: &[(&str, &str)]) -> Vec<Inbound> {
    rows.iter()
        .enumerate()
        .map(|(i, (id, value))| message(0, i as i64, framed(id, 42, value), id))
        .collect()
}

/// The input's own columns (the meta columns dropped).
fn payload_columns(input: &RecordBatch) -> RecordBatch {
    input.project(&[0, 1, 2]).expect("projection")
}

fn values(batch: &RecordBatch) -> Vec<String> {
    let column = batch.column_by_name("value").expect("value column");
    let strings = column.as_string::<i32>();
    (0..strings.len())
        .map(|i| strings.value(i).to_string())
        .collect()
}

/// Passes every row through; fails a batch holding a row whose value is "poison", rejects a
/// row whose value is "bad", and defers one whose value is "later".
#[derive(Default)]
struct Passthrough {
    runs: usize,
}

impl Stage for Passthrough {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        self.runs += 1;
        let rows = values(&input);
        if rows.iter().any(|v| v == "poison") {
            return Err(StageError::Transform("poison in the batch".into()));
        }
        out.emit_one_to_one(payload_columns(&input))?;
        for (row, value) in rows.iter().enumerate() {
            match value.as_str() {
                "bad" => out.reject(
                    row as u32,
                    RecordFailure::poison("bad_value", "value is bad"),
                ),
                "later" => out.defer(row as u32),
                _ => {}
            }
        }
        Ok(())
    }
}

async fn plan<S: Stage>(planner: &mut Planner, stage: &mut S, batch: &[Inbound]) -> Plan {
    planner
        .plan(stage, batch, &|keys: &[(i32, u128)]| {
            Some(vec![false; keys.len()])
        })
        .await
        .expect("plan")
}

fn to<'a>(topic: &str, plan: &'a Plan) -> Vec<&'a Outgoing> {
    plan.outgoing.iter().filter(|o| o.topic == topic).collect()
}

fn header<'a>(o: &'a Outgoing, key: &str) -> Option<&'a [u8]> {
    o.headers
        .as_ref()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
}

/// What the planner's outputs decode to, read back with apache-avro.
fn decoded_values(outgoing: &[&Outgoing]) -> Vec<String> {
    let schema = apache_avro::Schema::parse_str(SCHEMA).expect("schema");
    outgoing
        .iter()
        .map(|o| {
            assert_eq!(o.value[0], 0, "magic byte");
            assert_eq!(&o.value[1..5], &OUTPUT_ID.to_be_bytes(), "schema id");
            let mut datum = &o.value[5..];
            let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
                .build()
                .and_then(|r| r.read_value(&mut datum))
                .expect("datum");
            match value {
                Value::Record(fields) => match &fields[2].1 {
                    Value::String(s) => s.clone(),
                    other => panic!("value field: {other:?}"),
                },
                other => panic!("not a record: {other:?}"),
            }
        })
        .collect()
}

#[tokio::test]
async fn every_record_becomes_one_output_keyed_by_org_with_its_headers_and_event_key() {
    let mut planner = planner();
    let batch = batch(&[("e1", "a"), ("e2", "b"), ("e3", "c")]);
    let plan = plan(&mut planner, &mut Passthrough::default(), &batch).await;
    let out = to("out", &plan);
    assert_eq!(decoded_values(&out), ["a", "b", "c"]);
    for (i, o) in out.iter().enumerate() {
        let id = format!("e{}", i + 1);
        assert_eq!(o.key.as_deref(), Some(&b"42"[..]));
        assert_eq!(o.source, Some(i));
        assert_eq!(header(o, "trace"), Some(id.as_bytes()), "source headers");
        assert_eq!(o.event_key, Some(event_key(&id)));
        assert_eq!(
            header(o, crate::recovery::EVENT_KEY),
            Some(&event_key(&id).to_be_bytes()[..])
        );
    }
    assert!(plan.dead.is_empty());
    assert!(plan.duplicates.is_empty());
    assert_eq!(
        plan.remember,
        [
            (0, 0, event_key("e1")),
            (0, 1, event_key("e2")),
            (0, 2, event_key("e3"))
        ]
    );
}

#[tokio::test]
async fn a_repeated_event_id_is_dropped_within_the_batch_and_against_the_window() {
    let mut planner = planner();
    let mut batch = batch(&[("e1", "a"), ("e2", "b"), ("e1", "a again"), ("e3", "c")]);
    // The same id on another partition is another org's stream: not a duplicate.
    batch.push(message(1, 0, framed("e1", 42, "other partition"), "e1"));
    let window: HashSet<(i32, u128)> = [(0, event_key("e3"))].into();
    let plan = planner
        .plan(&mut Passthrough::default(), &batch, &|keys: &[(
            i32,
            u128,
        )]| {
            Some(keys.iter().map(|k| window.contains(k)).collect())
        })
        .await
        .expect("plan");
    assert_eq!(
        decoded_values(&to("out", &plan)),
        ["a", "b", "other partition"]
    );
    assert_eq!(
        plan.duplicates,
        [2, 3],
        "the repeat in the batch and the one in the window"
    );
    assert_eq!(
        plan.remember,
        [
            (0, 0, event_key("e1")),
            (0, 1, event_key("e2")),
            (1, 0, event_key("e1"))
        ]
    );
}

#[tokio::test]
async fn unreadable_dedup_windows_fail_the_plan_instead_of_guessing() {
    let mut planner = planner();
    let batch = batch(&[("e1", "a")]);
    let result = planner
        .plan(&mut Passthrough::default(), &batch, &|_: &[(
            i32,
            u128,
        )]| None)
        .await;
    assert!(matches!(result, Err(StageError::Internal(_))), "{result:?}");
}

#[tokio::test]
async fn a_record_that_does_not_decode_is_dead_lettered_with_its_bytes_and_the_rest_go_on() {
    let mut planner = planner();
    let mut batch = batch(&[("e1", "a"), ("e2", "b")]);
    batch.insert(1, message(0, 9, b"not avro".to_vec(), "broken"));
    let plan = plan(&mut planner, &mut Passthrough::default(), &batch).await;
    assert_eq!(decoded_values(&to("out", &plan)), ["a", "b"]);
    let dlq = to("in.dlq", &plan);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].value.as_ref(), b"not avro");
    assert_eq!(dlq[0].dead_origin, Some((0, 9)));
    assert_eq!(header(dlq[0], "trace"), Some(&b"broken"[..]));
    assert_eq!(plan.dead.len(), 1);
    assert_eq!(plan.dead[0].0, 1);
    let reason = header(dlq[0], crate::dlq::header::ERROR_REASON).expect("the reason travels");
    assert_eq!(reason, plan.dead[0].1.reason.as_bytes());
    assert_eq!(
        header(dlq[0], crate::dlq::header::ORIGINAL_OFFSET),
        Some(&b"9"[..])
    );
}

#[tokio::test]
async fn a_failed_batch_is_bisected_to_the_records_at_fault_and_the_others_keep_their_order() {
    let mut planner = planner();
    let rows = [
        ("e0", "a"),
        ("e1", "poison"),
        ("e2", "b"),
        ("e3", "c"),
        ("e4", "d"),
        ("e5", "e"),
        ("e6", "poison"),
        ("e7", "f"),
    ];
    let batch = batch(&rows);
    let mut stage = Passthrough::default();
    let plan = plan(&mut planner, &mut stage, &batch).await;
    assert_eq!(
        decoded_values(&to("out", &plan)),
        ["a", "b", "c", "d", "e", "f"]
    );
    let dead: Vec<(usize, &str)> = plan
        .dead
        .iter()
        .map(|(i, f)| (*i, f.reason.as_str()))
        .collect();
    assert_eq!(dead, [(1, "transform_failed"), (6, "transform_failed")]);
    let dlq: Vec<Option<(i32, i64)>> = to("in.dlq", &plan).iter().map(|o| o.dead_origin).collect();
    assert_eq!(dlq, [Some((0, 1)), Some((0, 6))]);
    // Neither dead record is remembered: a corrected resend is not a duplicate.
    assert!(!plan
        .remember
        .iter()
        .any(|(p, _, k)| *p == 0 && *k == event_key("e1")));
    assert!(stage.runs <= 1 + 2 * 2 * 3, "{} runs", stage.runs);
}

#[tokio::test]
async fn rejected_and_deferred_rows_map_back_to_their_messages() {
    let mut planner = planner();
    let batch = batch(&[("e0", "a"), ("e1", "bad"), ("e2", "later"), ("e3", "b")]);
    let plan = plan(&mut planner, &mut Passthrough::default(), &batch).await;
    assert_eq!(plan.dead.len(), 1);
    assert_eq!(plan.dead[0].0, 1);
    assert_eq!(plan.dead[0].1.reason, "bad_value");
    assert_eq!(plan.deferred, [2]);
}

/// Emits the input rows in reverse order, plus one event derived from state.
struct Reverse;

impl Stage for Reverse {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let n = input.num_rows();
        let order = arrow::array::UInt32Array::from_iter_values((0..n as u32).rev());
        let reversed = arrow::compute::take_record_batch(&payload_columns(&input), &order)?;
        out.emit_rows(reversed, (0..n as u32).rev().map(Some).collect())?;
        out.header(0, "added", b"to the first output".to_vec());
        out.emit_event(
            "42",
            serde_json::json!({"event_id": "derived", "org_id": 42, "value": "from state"}),
        );
        Ok(())
    }
}

#[tokio::test]
async fn each_output_row_carries_the_headers_of_the_record_it_came_from() {
    let mut planner = planner();
    let batch = batch(&[("e0", "a"), ("e1", "b"), ("e2", "c")]);
    let plan = plan(&mut planner, &mut Reverse, &batch).await;
    let out = to("out", &plan);
    assert_eq!(decoded_values(&out), ["c", "b", "a", "from state"]);
    let traces: Vec<Option<&[u8]>> = out.iter().map(|o| header(o, "trace")).collect();
    assert_eq!(
        traces,
        [Some(&b"e2"[..]), Some(&b"e1"[..]), Some(&b"e0"[..]), None]
    );
    assert_eq!(out[0].source, Some(2));
    assert_eq!(header(out[0], "added"), Some(&b"to the first output"[..]));
    assert_eq!(header(out[1], "added"), None);
    assert_eq!(out[3].source, None, "a derived event has no source record");
    assert_eq!(out[3].event_key, Some(event_key("derived")));
}

/// Claims a source row that the batch does not have.
struct OutOfRange;

impl Stage for OutOfRange {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let rows = input.num_rows() as u32;
        let mut sources: Vec<Option<u32>> = (0..rows).map(Some).collect();
        if let Some(first) = sources.first_mut() {
            *first = Some(99);
        }
        out.emit_rows(payload_columns(&input), sources)
    }
}

#[tokio::test]
async fn an_output_row_naming_a_source_outside_the_batch_is_not_sent() {
    let mut planner = planner();
    let batch = batch(&[("e0", "a")]);
    let plan = plan(&mut planner, &mut OutOfRange, &batch).await;
    assert!(to("out", &plan).is_empty());
    assert_eq!(plan.dead.len(), 1, "the record is dead-lettered, not lost");
}

#[test]
fn the_output_key_comes_from_a_top_level_or_nested_field() {
    let decoder = BatchDecoder::new("test.Event", SCHEMA).expect("decoder");
    let batch = RecordBatch::try_new(
        decoder.schema(),
        vec![
            Arc::new(arrow::array::StringArray::from(vec!["a", "b"])),
            Arc::new(arrow::array::Int64Array::from(vec![Some(7), Some(-1)])),
            Arc::new(arrow::array::StringArray::from(vec!["x", "y"])),
        ],
    )
    .expect("batch");
    assert_eq!(
        super::key_column(&batch, "org_id"),
        [Some(b"7".to_vec()), Some(b"-1".to_vec())]
    );
    assert_eq!(
        super::key_column(&batch, "value"),
        [Some(b"x".to_vec()), Some(b"y".to_vec())]
    );
    assert_eq!(super::key_column(&batch, "payload.missing"), [None, None]);
    let orgs = batch.column(1).as_primitive::<Int64Type>();
    assert_eq!(orgs.value(0), 7);
}

/// Counts one per character of each row's value, to be counted as the row lands.
struct Counting {
    counter: metrics::Counter,
}

impl Stage for Counting {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let rows = values(&input);
        out.emit_one_to_one(payload_columns(&input))?;
        let counted = rows
            .iter()
            .enumerate()
            .filter(|(_, v)| *v != "none")
            .map(|(row, v)| (row as u32, v.len() as u64))
            .collect();
        out.count_delivered(self.counter.clone(), counted);
        Ok(())
    }
}

#[tokio::test]
async fn what_a_row_counts_travels_with_its_record_and_only_with_it() {
    let mut planner = planner();
    let batch = batch(&[("e1", "abc"), ("e2", "none"), ("e1", "abc"), ("e3", "de")]);
    let mut stage = Counting {
        counter: metrics::Counter::noop(),
    };
    let plan = plan(&mut planner, &mut stage, &batch).await;
    let counts: Vec<(String, Vec<u64>)> = to("out", &plan)
        .iter()
        .zip(decoded_values(&to("out", &plan)))
        .map(|(o, value)| (value, o.counts.iter().map(|(_, n)| *n).collect()))
        .collect();
    // The duplicate of e1 never reached the stage; "none" counts nothing.
    assert_eq!(
        counts,
        [
            ("abc".to_string(), vec![3]),
            ("none".to_string(), vec![]),
            ("de".to_string(), vec![2])
        ]
    );
    assert!(plan
        .outgoing
        .iter()
        .filter(|o| o.topic != "out")
        .all(|o| o.counts.is_empty()));
}
