//! Contract tests over the real `schemas/` and `topic-config.yaml` of the repository.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, AsArray, Int64Array, StringArray, StructArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, TimestampMillisecondType};
use proptest::prelude::*;
use serde_json::{json, Value as Json};

use crate::columnar::{BatchDecoder, BatchEncoder};
use crate::compat::{self, Rule, Verdict};
use crate::json::{from_avro_binary, to_avro_binary, to_framed};
use crate::schemas::ContractSet;
use crate::topics::TopicConfig;
use crate::wire::{frame, CodecError};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn contracts() -> ContractSet {
    ContractSet::load(&root().join("schemas")).expect("schemas load")
}

fn topics() -> TopicConfig {
    TopicConfig::load(&root().join("topic-config.yaml")).expect("topic config loads")
}

fn goldens() -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    let dir = root().join("schemas/golden");
    fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, Json>) {
        for entry in std::fs::read_dir(dir).expect("golden dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                let rel = path
                    .strip_prefix(base)
                    .expect("under base")
                    .to_string_lossy()
                    .replace('\\', "/");
                let text = std::fs::read_to_string(&path).expect("golden readable");
                out.insert(rel, serde_json::from_str(&text).expect("golden is JSON"));
            }
        }
    }
    walk(&dir, &dir, &mut out);
    out
}

/// `connector/data-raw.case-sync.json` → `connector/data-raw.avsc`.
fn schema_of_golden(golden: &str) -> String {
    let stem = golden.strip_suffix(".json").expect(".json");
    let (dir, file) = stem.rsplit_once('/').expect("in a folder");
    let base = file.split('.').next().expect("name");
    format!("{dir}/{base}.avsc")
}

#[test]
fn every_topic_has_a_contract_with_its_key_field() {
    let contracts = contracts();
    let topics = topics();
    assert_eq!(
        topics.topics.len(),
        8,
        "eight declared topics: the five layers, config.changes, etl.execution, audit.events"
    );
    for (topic, spec) in &topics.topics {
        let contract = contracts
            .get(&spec.schema)
            .unwrap_or_else(|| panic!("{topic}: no schema {}", spec.schema));
        let mut node = &contract.json;
        for part in spec.key.split('.') {
            let field = node["fields"]
                .as_array()
                .and_then(|fields| fields.iter().find(|f| f["name"] == part))
                .unwrap_or_else(|| {
                    panic!("{topic}: key field {} not in {}", spec.key, spec.schema)
                });
            node = &field["type"];
        }
    }
}

#[test]
fn every_topic_schema_carries_the_envelope() {
    let contracts = contracts();
    let metadata = contracts.get("common/metadata.avsc").expect("metadata");
    let envelope = metadata.json["fields"].as_array().expect("fields");
    for (_, spec) in topics().topics {
        let contract = contracts.get(&spec.schema).expect("contract");
        let fields = contract.json["fields"].as_array().expect("fields");
        assert_eq!(
            &fields[..envelope.len()],
            &envelope[..],
            "{}: envelope differs from common/metadata.avsc",
            spec.schema
        );
        assert_eq!(fields[envelope.len()]["name"], "payload", "{}", spec.schema);
    }
}

#[test]
fn connector_feeds_and_pii_are_declared() {
    let contracts = contracts();
    let raw = contracts.get("connector/data-raw.avsc").expect("raw");
    let payload = &raw.json["fields"]
        .as_array()
        .expect("fields")
        .last()
        .expect("payload")["type"];
    let names: Vec<&str> = payload["fields"]
        .as_array()
        .expect("payload fields")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(names.contains(&"release_sync") && names.contains(&"case_sync"));
    assert_eq!(
        raw.pii_fields(),
        vec![
            "payload.case_sync.owner",
            "payload.lead_created.name",
            "payload.lead_created.email"
        ]
    );
}

#[test]
fn every_schema_has_a_golden_payload_and_every_golden_round_trips() {
    let contracts = contracts();
    let goldens = goldens();
    for contract in contracts.iter() {
        let expected = format!("{}.json", contract.path.trim_end_matches(".avsc"));
        assert!(
            goldens.contains_key(&expected),
            "no golden payload {expected}"
        );
    }
    for (golden, json) in &goldens {
        let path = schema_of_golden(golden);
        let contract = contracts
            .get(&path)
            .unwrap_or_else(|| panic!("golden {golden}: no schema {path}"));
        let binary = to_avro_binary(json, &contract.schema)
            .unwrap_or_else(|e| panic!("golden {golden} does not validate: {e}"));
        let back = from_avro_binary(&binary, &contract.schema, &contract.schema)
            .unwrap_or_else(|e| panic!("golden {golden} does not decode: {e}"));
        assert_eq!(&back, json, "golden {golden} changed in the round trip");
    }
}

#[test]
fn goldens_decode_to_arrow_and_encode_back_byte_for_byte() {
    let contracts = contracts();
    let goldens = goldens();
    for contract in contracts.iter() {
        let messages: Vec<Vec<u8>> = goldens
            .iter()
            .filter(|(g, _)| schema_of_golden(g) == contract.path)
            .map(|(_, json)| to_framed(json, &contract.schema, 7).expect("frames"))
            .collect();
        let mut decoder = BatchDecoder::new(&contract.full_name, &contract.text).expect("reader");
        decoder
            .add_writer_schema(7, &contract.text)
            .expect("writer");
        let decoded = decoder
            .decode(messages.iter().map(Vec::as_slice))
            .expect("decodes");
        assert!(
            decoded.rejected.is_empty(),
            "{}: {:?}",
            contract.path,
            decoded.rejected
        );
        assert_eq!(decoded.batch.num_rows(), messages.len());
        let mut encoder =
            BatchEncoder::new(&decoded.batch.schema(), &contract.text, 7).expect("encoder");
        let encoded = encoder.encode(&decoded.batch).expect("encodes");
        let encoded: Vec<Vec<u8>> = encoded.iter().map(|b| b.to_vec()).collect();
        assert_eq!(encoded, messages, "{}: Arrow → Avro differs", contract.path);
    }
}

#[test]
fn the_gate_passes_on_the_repository_and_names_a_deliberate_break() {
    let contracts = contracts();
    let released = root().join("schemas/released");
    let report = compat::gate(&contracts, &released).expect("gate runs");
    assert!(report.passed(), "{report}");
    assert!(
        report
            .entries
            .iter()
            .all(|(_, v)| *v == Verdict::Compatible),
        "every contract is released: {report}"
    );

    // Deliberate breaks of the connector schema, one per rule.
    let raw_path = root().join("schemas/connector/data-raw.avsc");
    let raw_text = std::fs::read_to_string(&raw_path).expect("raw schema");
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for contract in contracts.iter() {
        let text = std::fs::read_to_string(root().join("schemas").join(&contract.path))
            .expect("schema text");
        sources.insert(contract.path.clone(), text);
    }
    let breaking = [
        (
            r#"{"name": "connector_id", "type": "string"}"#,
            r#"{"name": "connector_id", "type": "string"}, {"name": "region", "type": "string"}"#,
            "payload.region",
            Rule::FieldAddedWithoutDefault,
        ),
        (
            r#"{"name": "correlation_id", "type": "string", "doc": "Ties the events of one workflow together."},"#,
            "",
            "correlation_id",
            Rule::FieldRemovedWithoutDefault,
        ),
        (
            r#"{"name": "org_id", "type": "long","#,
            r#"{"name": "org_id", "type": "string","#,
            "org_id",
            Rule::TypeChanged,
        ),
    ];
    let compact = |s: &str| s.split_whitespace().collect::<String>();
    for (from, to, field, rule) in breaking {
        let edited = compact(&raw_text).replacen(&compact(from), &compact(to), 1);
        assert_ne!(edited, compact(&raw_text), "edit {field} applies");
        let mut edited_sources = sources.clone();
        edited_sources.insert("connector/data-raw.avsc".into(), edited.clone());
        let edited_set = ContractSet::from_sources(edited_sources).expect("still valid Avro");
        let report = compat::gate(&edited_set, &released).expect("gate runs");
        assert!(!report.passed(), "{field}: gate must fail");
        let text = report.to_string();
        assert!(text.contains("connector/data-raw.avsc"), "{text}");
        assert!(text.contains(&format!("field `{field}`")), "{text}");
        assert!(text.contains(&rule.to_string()), "{text}");

        // The same edit with a bumped contract_version is a released break.
        let bumped = edited.replacen(r#""contract_version":1"#, r#""contract_version":2"#, 1);
        let mut bumped_sources = sources.clone();
        bumped_sources.insert("connector/data-raw.avsc".into(), bumped);
        let bumped_set = ContractSet::from_sources(bumped_sources).expect("valid");
        let report = compat::gate(&bumped_set, &released).expect("gate runs");
        assert!(report.passed(), "{report}");
    }

    // A compatible edit passes without a bump.
    let compatible = compact(&raw_text).replacen(
        &compact(r#"{"name": "connector_id", "type": "string"}"#),
        &compact(r#"{"name": "connector_id", "type": "string"}, {"name": "region", "type": ["null", "string"], "default": null}"#),
        1,
    );
    let mut compatible_sources = sources.clone();
    compatible_sources.insert("connector/data-raw.avsc".into(), compatible);
    let set = ContractSet::from_sources(compatible_sources).expect("valid");
    assert!(compat::gate(&set, &released).expect("runs").passed());
}

pub(crate) fn raw() -> crate::Contract {
    contracts()
        .get("connector/data-raw.avsc")
        .expect("raw")
        .clone()
}

fn golden_raw() -> Json {
    goldens()["connector/data-raw.json"].clone()
}

#[test]
fn each_decode_failure_has_its_own_typed_error() {
    let raw = raw();
    let good = to_framed(&golden_raw(), &raw.schema, 1).expect("frame");
    let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
    decoder.add_writer_schema(1, &raw.text).expect("writer");
    // A writer schema that cannot be read as the connector schema: no envelope at all.
    let alien = r#"{"type":"record","name":"Alien","fields":[{"name":"x","type":"int"}]}"#;
    let mismatch = decoder.add_writer_schema(2, alien).expect_err("mismatch");
    assert_eq!(mismatch.reason(), "schema_mismatch");

    let mut bad_magic = good.clone();
    bad_magic[0] = 9;
    let mut unknown_id = good.clone();
    unknown_id[4] = 99;
    let truncated = good[..good.len() - 3].to_vec();
    let mut trailing = good.clone();
    trailing.push(0);
    let alien_msg = frame(2, &[2]);
    let messages = [
        good.clone(),
        bad_magic,
        unknown_id,
        truncated,
        alien_msg,
        vec![0, 0],
        trailing,
        good.clone(),
    ];
    let decoded = decoder
        .decode(messages.iter().map(Vec::as_slice))
        .expect("decode runs");
    assert_eq!(decoded.rows, vec![0, 7]);
    assert_eq!(decoded.batch.num_rows(), 2);
    let reasons: Vec<(usize, &str)> = decoded
        .rejected
        .iter()
        .map(|(i, e)| (*i, e.reason()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (1, "unknown_magic_byte"),
            (2, "unknown_schema_id"),
            (3, "truncated_body"),
            (4, "schema_mismatch"),
            (5, "missing_header"),
            (6, "malformed_body"),
        ]
    );
    assert!(matches!(
        decoded.rejected[1].1,
        CodecError::UnknownSchemaId { id: 99 }
    ));
    assert_eq!(
        decoder.unknown_ids(messages.iter().map(Vec::as_slice)),
        vec![99]
    );
}

#[test]
fn a_batch_the_decoder_refuses_is_decoded_one_message_at_a_time() {
    let raw = raw();
    let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
    decoder.add_writer_schema(1, &raw.text).expect("writer");
    let event = |id: &str| {
        let mut e = golden_raw();
        e["event_id"] = json!(id);
        to_framed(&e, &raw.schema, 1).expect("frame")
    };
    let (first, second) = (event("first"), event("second"));
    let truncated = first[..first.len() - 3].to_vec();
    let messages = [first, truncated, vec![0, 0], second];
    let slices: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    // The fallback path gives exactly what the batch path gives: only the bad ones set apart.
    let one_by_one = decoder.decode_each(&slices).expect("decodes");
    let batched = decoder.decode(slices.iter().copied()).expect("decodes");
    for decoded in [&one_by_one, &batched] {
        assert_eq!(decoded.rows, vec![0, 3]);
        let ids = decoded.batch.column_by_name("event_id").expect("ids");
        let ids: Vec<&str> = ids.as_string::<i32>().iter().flatten().collect();
        assert_eq!(ids, ["first", "second"]);
        let reasons: Vec<(usize, &str)> = decoded
            .rejected
            .iter()
            .map(|(i, e)| (*i, e.reason()))
            .collect();
        assert_eq!(reasons, [(1, "truncated_body"), (2, "missing_header")]);
    }
    assert_eq!(one_by_one.batch, batched.batch);
}

#[test]
fn an_older_writer_is_resolved_against_the_reader_schema() {
    let writer =
        r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"id","type":"string"}]}"#;
    let reader = r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"id","type":"string"},
        {"name":"region","type":"string","default":"eu"}]}"#;
    let writer_schema = apache_avro::Schema::parse_str(writer).expect("writer");
    let body = to_avro_binary(&json!({"id": "a"}), &writer_schema).expect("body");
    let mut decoder = BatchDecoder::new("t.E", reader).expect("decoder");
    decoder.add_writer_schema(3, writer).expect("resolvable");
    let message = frame(3, &body);
    let decoded = decoder.decode([message.as_slice()]).expect("decodes");
    let region = decoded.batch.column_by_name("region").expect("region");
    assert_eq!(region.as_string::<i32>().value(0), "eu");
}

/// An envelope event of the connector schema with random field values.
pub(crate) fn arb_event() -> impl Strategy<Value = Json> {
    (
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        prop::sample::select(vec!["release.sync.created", "case.sync.v1", "lead.created"]),
        0i64..4_102_444_800_000,
        1i64..i64::MAX,
        proptest::option::of("[a-z0-9]{1,32}"),
        prop::sample::select(vec!["public", "internal", "confidential", "restricted"]),
        ".{0,24}",
        prop::collection::vec(("[a-z.]{1,12}", -1e9f64..1e9), 0..4),
        prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..3),
        proptest::option::of((
            "[a-z:]{1,16}",
            prop::collection::vec("[a-z:]{1,10}", 0..3),
        )),
    )
        .prop_map(
            |(id, event_type, ts, org, trace, class, connector, measurements, attributes, provenance)| {
                json!({
                    "event_id": id, "event_type": event_type, "event_version": "1.0.0",
                    "timestamp": ts,
                    "source": {"service": "connector-service", "instance": connector.clone()},
                    "correlation_id": id, "org_id": org, "trace_id": trace,
                    "classification": class,
                    "provenance": provenance.map(|(activity, items)| json!({
                        "activity_id": activity, "item_ids": items, "distribution_id": null
                    })),
                    "payload": {
                        "connector_id": connector, "source_system": "prop",
                        "release_sync": null, "case_sync": null, "lead_created": null,
                        "alert_sync": null, "invoice_generated": null, "payment_processed": null,
                        "task_completed": null, "threat_detected": null,
                        "measurements": measurements.iter().map(|(n, v)| json!({"name": n, "value": v, "unit": null})).collect::<Vec<_>>(),
                        "attributes": attributes,
                    }
                })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_events_round_trip_through_avro_and_arrow(events in prop::collection::vec(arb_event(), 1..20)) {
        let raw = raw();
        let messages: Vec<Vec<u8>> = events.iter().map(|e| to_framed(e, &raw.schema, 5).expect("frame")).collect();
        // Avro binary → JSON unchanged.
        for (event, message) in events.iter().zip(&messages) {
            let back = from_avro_binary(&message[5..], &raw.schema, &raw.schema).expect("decode");
            prop_assert_eq!(&back, event);
        }
        // Avro → Arrow: the envelope columns hold exactly what was sent.
        let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
        decoder.add_writer_schema(5, &raw.text).expect("writer");
        let decoded = decoder.decode(messages.iter().map(Vec::as_slice)).expect("decode");
        prop_assert!(decoded.rejected.is_empty());
        let batch = &decoded.batch;
        let ids = batch.column_by_name("event_id").expect("event_id").as_any().downcast_ref::<StringArray>().expect("utf8");
        let orgs = batch.column_by_name("org_id").expect("org_id").as_any().downcast_ref::<Int64Array>().expect("i64");
        let ts = batch.column_by_name("timestamp").expect("timestamp").as_primitive::<TimestampMillisecondType>();
        let traces = batch.column_by_name("trace_id").expect("trace_id").as_string::<i32>();
        let source = batch.column_by_name("source").expect("source").as_any().downcast_ref::<StructArray>().expect("struct");
        let instances = source.column_by_name("instance").expect("instance").as_string::<i32>();
        for (row, event) in events.iter().enumerate() {
            prop_assert_eq!(ids.value(row), event["event_id"].as_str().expect("id"));
            prop_assert_eq!(orgs.value(row), event["org_id"].as_i64().expect("org"));
            prop_assert_eq!(ts.value(row), event["timestamp"].as_i64().expect("ts"));
            prop_assert_eq!(traces.is_null(row), event["trace_id"].is_null());
            if let Some(trace) = event["trace_id"].as_str() {
                prop_assert_eq!(traces.value(row), trace);
            }
            prop_assert_eq!(instances.value(row), event["source"]["instance"].as_str().expect("instance"));
        }
        // Arrow → Avro gives back the same bytes.
        let mut encoder = BatchEncoder::new(&batch.schema(), &raw.text, 5).expect("encoder");
        let encoded: Vec<Vec<u8>> = encoder.encode(batch).expect("encode").iter().map(|b| b.to_vec()).collect();
        prop_assert_eq!(encoded, messages);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let raw = raw();
        let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
        decoder.add_writer_schema(0, &raw.text).expect("writer");
        let mut framed = bytes.clone();
        if framed.len() >= 5 { framed[..5].copy_from_slice(&[0, 0, 0, 0, 0]); }
        let decoded = decoder.decode([bytes.as_slice(), framed.as_slice()]).expect("decode runs");
        prop_assert_eq!(decoded.rows.len() + decoded.rejected.len(), 2);
        prop_assert_eq!(decoded.batch.num_rows(), decoded.rows.len());
    }
}

#[test]
fn timestamps_are_utc_arrow_timestamps() {
    let raw = raw();
    let schema = crate::columnar::arrow_schema_of(&raw.full_name, &raw.text).expect("schema");
    let field = schema.field_with_name("timestamp").expect("timestamp");
    assert!(
        matches!(field.data_type(), DataType::Timestamp(_, Some(tz)) if tz.as_ref() == "+00:00" || tz.as_ref() == "UTC"),
        "{:?}",
        field.data_type()
    );
    let _ = TimestampMillisecondArray::from(vec![0i64]).len();
}

#[test]
fn invalid_utf8_is_rejected_without_losing_the_rest_of_the_batch() {
    let raw = raw();
    let good = to_framed(&golden_raw(), &raw.schema, 1).expect("frame");
    let mut bad = good.clone();
    // Byte 5 is the length of event_id; byte 6 its first character.
    bad[6] = 0xff;
    let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
    decoder.add_writer_schema(1, &raw.text).expect("writer");
    let messages = [good.clone(), bad, good];
    let decoded = decoder
        .decode(messages.iter().map(Vec::as_slice))
        .expect("decode runs");
    assert_eq!(decoded.rows, vec![0, 2]);
    assert_eq!(decoded.batch.num_rows(), 2);
    assert_eq!(decoded.rejected.len(), 1);
    assert_eq!(decoded.rejected[0].0, 1);
    assert_eq!(decoded.rejected[0].1.reason(), "malformed_body");
    // The decoder is usable afterwards.
    let again = decoder
        .decode([messages[0].as_slice()])
        .expect("decode runs");
    assert_eq!(again.batch.num_rows(), 1);
}
