//! Batches that mix writer schemas: what a rolling producer upgrade, or a catch-up over an old
//! backlog, looks like. Every record must resolve to the reader schema and encode again, and
//! the result must equal apache-avro's own per-record schema resolution.

use apache_avro::Schema;
use proptest::prelude::*;
use serde_json::{json, Value as Json};

use crate::columnar::{BatchDecoder, BatchEncoder};
use crate::contract_tests::{arb_event, raw};
use crate::json::{from_avro_binary, to_avro_binary};
use crate::wire::frame;

/// A writer version of the connector schema, and how an event is shaped for it.
#[derive(Clone, Copy, Debug)]
enum Version {
    /// The reader schema itself.
    Current,
    /// Older: no `trace_id` yet (the reader added it, with a default).
    NoTraceId,
    /// Older: `classification` had no `restricted` symbol (the reader added it).
    FewerSymbols,
    /// Older: carried `legacy_region`, which the reader removed (it had a default).
    LegacyRegion,
    /// Older: a measurement's `unit` was a plain string (the reader widened it to a union).
    PlainUnit,
}

const VERSIONS: [Version; 5] = [
    Version::Current,
    Version::NoTraceId,
    Version::FewerSymbols,
    Version::LegacyRegion,
    Version::PlainUnit,
];

fn fields_mut(record: &mut Json) -> &mut Vec<Json> {
    record["fields"].as_array_mut().expect("record fields")
}

fn field_mut<'a>(record: &'a mut Json, name: &str) -> &'a mut Json {
    fields_mut(record)
        .iter_mut()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("field {name}"))
}

/// The writer schema text of `version`, derived from the reader's.
fn writer_text(reader: &str, version: Version) -> String {
    let mut schema: Json = serde_json::from_str(reader).expect("reader is JSON");
    match version {
        Version::Current => {}
        Version::NoTraceId => fields_mut(&mut schema).retain(|f| f["name"] != "trace_id"),
        Version::FewerSymbols => {
            let enum_type = &mut field_mut(&mut schema, "classification")["type"];
            assert_eq!(
                enum_type["type"], "enum",
                "classification is defined inline"
            );
            enum_type["symbols"] = json!(["public", "internal", "confidential"]);
        }
        Version::LegacyRegion => fields_mut(&mut schema).push(json!(
            {"name": "legacy_region", "type": "string", "default": "eu"}
        )),
        Version::PlainUnit => {
            let payload = &mut field_mut(&mut schema, "payload")["type"];
            let items = &mut field_mut(payload, "measurements")["type"]["items"];
            let unit = field_mut(items, "unit");
            unit["type"] = json!("string");
            unit.as_object_mut().expect("field").remove("default");
        }
    }
    schema.to_string()
}

/// `event` (in the reader's shape) as `version` writes it.
fn shaped_for(event: &Json, version: Version, salt: usize) -> Json {
    let mut event = event.clone();
    let object = event.as_object_mut().expect("event object");
    match version {
        Version::Current => {}
        Version::NoTraceId => {
            object.remove("trace_id");
        }
        Version::FewerSymbols => {
            if object["classification"] == "restricted" {
                object.insert("classification".into(), json!("confidential"));
            }
        }
        Version::LegacyRegion => {
            object.insert("legacy_region".into(), json!(format!("region-{salt}")));
        }
        Version::PlainUnit => {
            for m in object["payload"]["measurements"]
                .as_array_mut()
                .expect("measurements")
            {
                m["unit"] = json!(format!("unit-{salt}"));
            }
        }
    }
    event
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_interleaving_of_writer_versions_decodes_to_the_reader_and_encodes_back(
        records in prop::collection::vec((arb_event(), 0..VERSIONS.len()), 1..40)
    ) {
        let raw = raw();
        let reader = raw.schema.clone();
        let writers: Vec<(String, Schema)> = VERSIONS
            .iter()
            .map(|v| {
                let text = writer_text(&raw.text, *v);
                let schema = Schema::parse_str(&text).expect("writer parses");
                (text, schema)
            })
            .collect();
        let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
        for (id, (text, _)) in writers.iter().enumerate() {
            decoder.add_writer_schema(id as u32 + 1, text).expect("resolvable writer");
        }
        let mut messages = Vec::new();
        let mut expected = Vec::new();
        for (salt, (event, version)) in records.iter().enumerate() {
            let (_, schema) = &writers[*version];
            let body = to_avro_binary(&shaped_for(event, VERSIONS[*version], salt), schema)
                .expect("event fits its writer");
            // The reference: apache-avro resolves this one record, writer → reader.
            expected.push(from_avro_binary(&body, schema, &reader).expect("apache-avro resolves"));
            messages.push(frame(*version as u32 + 1, &body));
        }
        let decoded = decoder.decode(messages.iter().map(Vec::as_slice)).expect("decode runs");
        prop_assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
        prop_assert_eq!(decoded.batch.schema(), decoder.schema());
        let mut encoder = BatchEncoder::new(&decoder.schema(), &raw.text, 9).expect("encoder");
        let encoded = encoder.encode(&decoded.batch).expect("a mixed batch encodes");
        prop_assert_eq!(encoded.len(), expected.len());
        for (message, want) in encoded.iter().zip(&expected) {
            let got = from_avro_binary(&message[5..], &reader, &reader).expect("re-encoded decodes");
            prop_assert_eq!(&got, want);
        }
    }
}
