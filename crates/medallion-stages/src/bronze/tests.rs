//! bronze transform tests on real contracts, in process (the broker tests are in `tests/`).

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::RecordBatch;
use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::json::{from_avro_binary, to_framed};
use medallion_contracts::sample::SampleEvents;
use medallion_contracts::{Contract, ContractSet};
use medallion_runtime::worker::{stage_input_schema, with_meta};
use serde_json::{json, Value as Json};

use medallion_runtime::pii::{KeySource, Keyring, PiiConfig, KEY_ID_HEADER};

use super::{reason, Bronze, BronzeConfig};

fn test_config() -> BronzeConfig {
    BronzeConfig {
        pii: PiiConfig {
            active_key: "k1".into(),
            keys: [(
                "k1".to_string(),
                KeySource {
                    env: None,
                    value: Some(medallion_tests::TEST_PII_KEY.into()),
                },
            )]
            .into(),
        },
        ..BronzeConfig::default()
    }
}

fn contracts() -> ContractSet {
    ContractSet::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas"))
        .expect("schemas")
}

use medallion_runtime::clock::now_ms;

struct Fixture {
    raw: Contract,
    bronze: Contract,
    stage: Bronze,
    decoder: BatchDecoder,
}

async fn fixture() -> Fixture {
    let contracts = contracts();
    let raw = contracts
        .get("connector/data-raw.avsc")
        .expect("raw")
        .clone();
    let bronze = contracts
        .get("bronze/data-cleaned.avsc")
        .expect("bronze")
        .clone();
    let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text).expect("decoder");
    decoder.add_writer_schema(1, &raw.text).expect("writer");
    let output_schema = BatchDecoder::new(&bronze.full_name, &bronze.text)
        .expect("bronze decoder")
        .schema();
    let setup = crate::testkit::offline_setup(
        super::GROUP,
        stage_input_schema(&decoder.schema()),
        output_schema,
    );
    let audit = contracts.get("audit/events.avsc").expect("audit");
    let audit = medallion_runtime::audit::AuditEncoder::new("audit.events", &audit.text, 5)
        .expect("audit encoder");
    let stage = Bronze::with_audit(setup, test_config(), audit)
        .await
        .expect("plans");
    Fixture {
        raw,
        bronze,
        stage,
        decoder,
    }
}

/// Runs events (with their record keys) through bronze; returns output JSON and rejections.
async fn run(
    f: &mut Fixture,
    events: &[(Option<String>, Json)],
) -> (Vec<Json>, Vec<(u32, String)>) {
    let (out, output) = run_full(f, events).await;
    let rejected = output
        .rejected
        .iter()
        .map(|(row, failure)| (*row, failure.reason.clone()))
        .collect();
    (out, rejected)
}

/// Runs events through bronze; returns output JSON and the stage's whole output.
async fn run_full(
    f: &mut Fixture,
    events: &[(Option<String>, Json)],
) -> (Vec<Json>, crate::testkit::Output) {
    let messages: Vec<Vec<u8>> = events
        .iter()
        .map(|(_, e)| to_framed(e, &f.raw.schema, 1).expect("frames"))
        .collect();
    let decoded = f
        .decoder
        .decode(messages.iter().map(Vec::as_slice))
        .expect("decodes");
    assert!(decoded.rejected.is_empty());
    let n = decoded.batch.num_rows();
    let input: RecordBatch = with_meta(
        &decoded.batch,
        events.iter().map(|(k, _)| k.clone()).collect(),
        vec![3; n],
        (0..n as i64).map(|i| 100 + i).collect(),
        now_ms(),
    )
    .expect("meta");
    let output = crate::testkit::process(&mut f.stage, input)
        .await
        .expect("processes");
    let mut encoder =
        BatchEncoder::new(&output.batch.schema(), &f.bronze.text, 2).expect("encoder");
    let encoded = encoder.encode(&output.batch).expect("encodes");
    let out = encoded
        .iter()
        .map(|m| {
            from_avro_binary(&m[5..], &f.bronze.schema, &f.bronze.schema).expect("valid bronze")
        })
        .collect();
    assert_eq!(output.source_rows.len(), encoded.len());
    (out, output)
}

#[tokio::test]
async fn personal_data_leaves_bronze_encrypted_with_its_key_named_and_audited() {
    let mut f = fixture().await;
    let mut sample = SampleEvents::new(9, 3, now_ms() - 3_600_000);
    let events: Vec<_> = (0..90).map(|_| keyed(sample.next_event())).collect();
    let (out, output) = run_full(&mut f, &events).await;
    let keys = Keyring::from_config(&test_config().pii, "stage.pii").expect("keys");
    let wrong = Keyring::new("k1", [("k1".to_string(), vec![9u8; 32])]).expect("keys");
    let mut protected = 0;
    // (event_id, org_id, protected paths) of each protected event, in order.
    let mut audited = Vec::new();
    for (row, (o, (_, e))) in out.iter().zip(&events).enumerate() {
        let mut fields = Vec::new();
        if let Some(lead) = e["payload"]["lead_created"].as_object() {
            fields.push((
                "payload.lead_created.email",
                lead["email"].clone(),
                &o["payload"]["lead_created"]["email"],
            ));
            fields.push((
                "payload.lead_created.name",
                lead["name"].clone(),
                &o["payload"]["lead_created"]["name"],
            ));
        }
        if let Some(case) = e["payload"]["case_sync"].as_object() {
            fields.push((
                "payload.case_sync.owner",
                case["owner"].clone(),
                &o["payload"]["case_sync"]["owner"],
            ));
        }
        let mut any = false;
        let mut paths = Vec::new();
        for (path, sent, got) in fields {
            let (sent, got) = (
                sent.as_str().expect("text").trim(),
                got.as_str().expect("text"),
            );
            if sent.is_empty() {
                assert_eq!(got, "", "nothing to protect in an empty {path}");
                continue;
            }
            any = true;
            paths.push(path);
            assert!(
                !got.contains(sent),
                "{path} left bronze in the clear: {got}"
            );
            assert_eq!(keys.decrypt(path, got).expect("decrypts"), sent);
            assert!(wrong.decrypt(path, got).is_err(), "a wrong key must fail");
        }
        let header = output
            .row_headers
            .iter()
            .find(|(r, k, _)| *r as usize == row && k == KEY_ID_HEADER);
        assert_eq!(
            header.map(|(_, _, v)| v.as_slice()),
            any.then_some(b"k1".as_slice())
        );
        // Its fields are counted when its record lands, not before.
        let counted = output
            .delivered_counts
            .iter()
            .find(|(r, _)| *r as usize == row)
            .map(|(_, n)| *n);
        assert_eq!(counted, any.then_some(paths.len() as u64), "{row}");
        protected += usize::from(any);
        if any {
            paths.sort_unstable();
            audited.push((o["event_id"].clone(), o["org_id"].clone(), paths.join(",")));
        }
    }
    assert!(
        protected > 30,
        "the sample carries leads and cases ({protected})"
    );
    // One audit record per org of the batch, listing every protected event with its fields.
    let orgs: std::collections::BTreeSet<String> =
        audited.iter().map(|(_, org, _)| org.to_string()).collect();
    assert_eq!(output.side.len(), orgs.len(), "one record per org");
    assert!(output.side.len() < protected, "fewer records than events");
    assert!(output.side.iter().all(|r| r.topic == "audit.events"));
    let audit = contracts().get("audit/events.avsc").expect("audit").clone();
    let mut listed: Vec<(Json, Json, String)> = Vec::new();
    for record in &output.side {
        let a = from_avro_binary(&record.value[5..], &audit.schema, &audit.schema)
            .expect("an audit.events record");
        assert_eq!(
            record.key.as_deref(),
            Some(a["org_id"].to_string().as_bytes())
        );
        assert_eq!(a["event_type"], "audit.pii.encrypted");
        let p = &a["payload"];
        assert_eq!(
            (&p["action"], &p["actor"], &p["outcome"]),
            (
                &json!("pii.encrypted"),
                &json!(super::GROUP),
                &json!("encrypted")
            )
        );
        assert_eq!(p["details"]["key_id"], "k1");
        assert_eq!(p["details"]["algorithm"], "AES-256-GCM");
        let subjects = p["subjects"].as_array().expect("subjects");
        assert_eq!(p["details"]["events"], subjects.len().to_string());
        assert_eq!(p["resource_id"], subjects[0]["event_id"]);
        for subject in subjects {
            let mut fields: Vec<&str> = subject["fields"]
                .as_array()
                .expect("fields")
                .iter()
                .filter_map(Json::as_str)
                .collect();
            fields.sort_unstable();
            listed.push((
                subject["event_id"].clone(),
                a["org_id"].clone(),
                fields.join(","),
            ));
        }
    }
    // Exactly the protected events, each under its own org, with exactly its fields.
    let key = |e: &(Json, Json, String)| e.0.to_string();
    listed.sort_by_key(key);
    audited.sort_by_key(key);
    assert_eq!(listed, audited);
}

fn keyed(event: Json) -> (Option<String>, Json) {
    (Some(event["org_id"].to_string()), event)
}

/// Runs the rejected `cases` (each with its expected reason) followed by `good` events, checks
/// that exactly the cases are rejected, each for its reason, and returns the outputs.
async fn run_cases(
    f: &mut Fixture,
    cases: &[((Option<String>, Json), &str)],
    good: &[(Option<String>, Json)],
) -> Vec<Json> {
    let mut events: Vec<_> = cases.iter().map(|(e, _)| e.clone()).collect();
    events.extend(good.iter().cloned());
    let (out, rejected) = run(f, &events).await;
    let expected: BTreeMap<u32, String> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, r))| (i as u32, r.to_string()))
        .collect();
    let got: BTreeMap<u32, String> = rejected.into_iter().collect();
    assert_eq!(got, expected);
    assert_eq!(out.len(), good.len());
    out
}

#[tokio::test]
async fn valid_events_are_normalized() {
    let mut f = fixture().await;
    let mut sample = SampleEvents::every_feed(5, 4, now_ms() - 3_600_000);
    let events: Vec<_> = (0..120)
        .map(|i| {
            let mut e = sample.next_event();
            if i % 3 == 0 {
                e["provenance"] = json!({
                    "activity_id": format!("prov:activity:sync:{i}"),
                    "item_ids": ["stac:item:a", "dcat:dataset:b"],
                    "distribution_id": null
                });
            }
            keyed(e)
        })
        .collect();
    let (out, rejected) = run(&mut f, &events).await;
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(out.len(), events.len());
    for (o, (_, e)) in out.iter().zip(&events) {
        assert_eq!(o["event_id"], e["event_id"]);
        assert_eq!(o["org_id"], e["org_id"]);
        assert_eq!(o["payload"]["raw_topic"], "connector.data.raw");
        assert_eq!(o["payload"]["raw_partition"], 3);
        // The provenance record (activity, items, distribution) passes through untouched.
        let sent = if e["provenance"].is_object() {
            e["provenance"].clone()
        } else {
            Json::Null
        };
        assert_eq!(o["provenance"], sent);
        // Exactly the input's payload variant is present; the others stay null.
        for variant in medallion_contracts::sample::BRANCHES {
            assert_eq!(
                o["payload"][variant].is_null(),
                e["payload"][variant].is_null(),
                "{variant} of {}",
                e["event_id"]
            );
        }
        if let Some(release) = e["payload"]["release_sync"].as_object() {
            let version = release["release"]["version"].as_str().expect("version");
            // SemVer: trimmed, the leading v dropped.
            assert_eq!(
                o["payload"]["release_sync"]["release"]["version"],
                version.trim().trim_start_matches('v')
            );
            let storage = release["sbom_ref"]["storage_type"]
                .as_str()
                .expect("storage");
            assert_eq!(
                o["payload"]["release_sync"]["sbom_ref"]["storage_type"],
                storage.to_lowercase()
            );
            let env = release["endpoint"]["environment"].as_str().expect("env");
            assert_eq!(
                o["payload"]["release_sync"]["endpoint"]["environment"],
                env.to_lowercase()
            );
        }
        if let Some(case) = e["payload"]["case_sync"].as_object() {
            assert_eq!(
                o["payload"]["case_sync"]["title"],
                case["title"].as_str().expect("title").trim()
            );
            assert_eq!(o["payload"]["case_sync"]["status"], case["status"]);
        }
    }
}

#[tokio::test]
async fn each_invalid_event_is_rejected_with_its_reason() {
    let mut f = fixture().await;
    let mut sample = SampleEvents::new(9, 2, now_ms() - 60_000);
    let mut base = || sample.next_event();
    let mut cases: Vec<((Option<String>, Json), &str)> = Vec::new();
    let mut e = base();
    e["event_id"] = json!("   ");
    cases.push((keyed(e), reason::MISSING_FIELD));
    let mut e = base();
    e["event_id"] = json!("not-a-uuid");
    cases.push((keyed(e), reason::INVALID_EVENT_ID));
    let mut e = base();
    e["org_id"] = json!(0);
    cases.push((keyed(e), reason::INVALID_ORG_ID));
    let e = base();
    cases.push(((Some("999999".into()), e), reason::KEY_MISMATCH));
    let e = base();
    cases.push(((None, e), reason::KEY_MISMATCH));
    let mut e = base();
    e["timestamp"] = json!(now_ms() - 90 * 86_400_000);
    cases.push((keyed(e), reason::TIMESTAMP_OUT_OF_RANGE));
    let mut e = base();
    e["timestamp"] = json!(now_ms() + 3_600_000);
    cases.push((keyed(e), reason::TIMESTAMP_OUT_OF_RANGE));
    let mut e = base();
    e["event_type"] = json!(if e["payload"]["case_sync"].is_null() {
        "case.sync.v1"
    } else {
        "lead.created"
    });
    cases.push((keyed(e), reason::PAYLOAD_MISMATCH));
    // An event type no payload variant belongs to, with a variant set.
    let mut e = base();
    e["event_type"] = json!("something.else");
    cases.push((keyed(e), reason::PAYLOAD_MISMATCH));
    // No variant at all, under an event type no variant belongs to, and under a known one.
    let mut e = base();
    e["event_type"] = json!("connector.data.raw");
    for variant in ["release_sync", "case_sync", "lead_created"] {
        e["payload"][variant] = Json::Null;
    }
    cases.push((keyed(e.clone()), reason::PAYLOAD_MISMATCH));
    e["event_type"] = json!("case.sync.v1");
    cases.push((keyed(e), reason::PAYLOAD_MISMATCH));
    // Two variants set at once.
    let mut e = base();
    if e["payload"]["case_sync"].is_null() {
        let mut other = base();
        while other["payload"]["case_sync"].is_null() {
            other = base();
        }
        e["payload"]["case_sync"] = other["payload"]["case_sync"].clone();
    } else {
        let mut other = base();
        while other["payload"]["lead_created"].is_null() {
            other = base();
        }
        e["payload"]["lead_created"] = other["payload"]["lead_created"].clone();
    }
    cases.push((keyed(e), reason::PAYLOAD_MISMATCH));
    // An invalid value inside a case payload.
    let mut e = loop {
        let e = base();
        if !e["payload"]["case_sync"].is_null() {
            break e;
        }
    };
    e["payload"]["case_sync"]["severity"] = json!(9);
    cases.push((keyed(e), reason::INVALID_VALUE));
    let good = keyed(base());
    let out = run_cases(&mut f, &cases, std::slice::from_ref(&good)).await;
    assert_eq!(out[0]["event_id"], good.1["event_id"]);
}

#[tokio::test]
async fn ids_and_enums_get_canonical_case() {
    let mut f = fixture().await;
    let mut sample = SampleEvents::new(3, 1, now_ms() - 60_000);
    let mut e = sample.next_event();
    let id = e["event_id"].as_str().expect("id").to_uppercase();
    e["event_id"] = json!(format!("  {id} "));
    e["event_type"] = json!(format!(
        " {} ",
        e["event_type"].as_str().expect("type").to_uppercase()
    ));
    e["source"]["service"] = json!(" Connector-Service ");
    let (out, rejected) = run(&mut f, &[keyed(e)]).await;
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(out[0]["event_id"], id.to_lowercase());
    assert_eq!(out[0]["source"]["service"], "connector-service");
    assert!(out[0]["event_type"]
        .as_str()
        .expect("type")
        .chars()
        .all(|c| !c.is_uppercase()));
}

/// The first event of `feed` the every-feed generator draws.
fn event_of(sample: &mut SampleEvents, feed: &str) -> Json {
    loop {
        let e = sample.next_event();
        if e["event_type"] == feed {
            break e;
        }
    }
}

#[tokio::test]
async fn every_feed_follows_its_catalog_entry() {
    let mut f = fixture().await;
    let mut sample = SampleEvents::every_feed(11, 2, now_ms() - 60_000);
    let mut cases: Vec<((Option<String>, Json), &str)> = Vec::new();
    let mut e = event_of(&mut sample, "threat.detected");
    e["payload"]["threat_detected"]["severity"] = json!("extreme");
    cases.push((keyed(e), reason::INVALID_VALUE));
    let mut e = event_of(&mut sample, "alert.sync.v1");
    e["payload"]["alert_sync"]["status"] = json!("Closed");
    cases.push((keyed(e), reason::INVALID_VALUE));
    let mut e = event_of(&mut sample, "alert.sync.v1");
    e["payload"]["alert_sync"]["updated_at"] = json!(0);
    cases.push((keyed(e), reason::INVALID_VALUE));
    let mut e = event_of(&mut sample, "invoice.generated");
    e["payload"]["invoice_generated"]["amount"] = json!(-1.0);
    cases.push((keyed(e), reason::INVALID_VALUE));
    let mut e = event_of(&mut sample, "payment.processed");
    e["payload"]["payment_processed"]["currency"] = json!("dollars");
    cases.push((keyed(e), reason::INVALID_VALUE));
    let mut e = event_of(&mut sample, "task.completed");
    e["payload"]["task_completed"]["task_id"] = json!("  ");
    cases.push((keyed(e), reason::INVALID_VALUE));
    let mut e = event_of(&mut sample, "release.sync.created");
    e["payload"]["release_sync"]["release"]["version"] = json!("v1.2");
    cases.push((keyed(e), reason::INVALID_VALUE));
    // A threat carried under the alert feed's event type.
    let mut e = event_of(&mut sample, "threat.detected");
    e["event_type"] = json!("alert.sync.v1");
    cases.push((keyed(e), reason::PAYLOAD_MISMATCH));
    let good: Vec<(Option<String>, Json)> = [
        "alert.sync.v1",
        "invoice.generated",
        "payment.processed",
        "task.completed",
        "threat.detected",
    ]
    .iter()
    .map(|feed| keyed(event_of(&mut sample, feed)))
    .collect();
    let out = run_cases(&mut f, &cases, &good).await;
    let by_type = |t: &str| {
        out.iter()
            .find(|o| o["event_type"] == t)
            .unwrap_or_else(|| panic!("no {t} out"))
    };
    let threat = &by_type("threat.detected")["payload"]["threat_detected"];
    assert!(
        ["LOW", "MEDIUM", "HIGH", "CRITICAL"].contains(&threat["severity"].as_str().unwrap_or(""))
    );
    assert_eq!(threat["source_system"], "endpoint-agent");
    let alert = &by_type("alert.sync.v1")["payload"]["alert_sync"];
    assert!(
        ["New", "Updated", "Ignored", "Imported"].contains(&alert["status"].as_str().unwrap_or(""))
    );
    assert!(alert["alert_id"]
        .as_str()
        .unwrap_or("")
        .starts_with("ALERT-"));
    let invoice = &by_type("invoice.generated")["payload"]["invoice_generated"];
    assert!(["USD", "EUR", "GBP"].contains(&invoice["currency"].as_str().unwrap_or("")));
    assert_eq!(
        by_type("payment.processed")["payload"]["payment_processed"]["status"]
            .as_str()
            .map(|s| s.chars().all(|c| c.is_ascii_uppercase())),
        Some(true)
    );
}
