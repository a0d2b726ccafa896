//! A rolling producer upgrade: two writer schemas of one topic interleaved in the backlog, so
//! every poll batch of bronze, silver and gold holds both. Nothing may be dead-lettered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use medallion_contracts::json::to_framed;
use medallion_contracts::registry::RegistryClient;
use medallion_runtime::dlq::{header, header_value};
use medallion_tests::read_topic;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value as Json};

use crate::bronze::{sample, Pipeline};
use crate::stages::{bronze_case, envelope, uuid, GOLD_BIN, MIN, SILVER_BIN, T0};

const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";
const SILVER: &str = "silver.data.processed";
const GOLD: &str = "gold.data.ready";

/// Version 2 of `topic`'s contract: one optional field more, registered (BACKWARD) under the
/// topic's subject. Returns its parsed schema and id.
async fn register_v2(p: &Pipeline, topic: &str) -> (apache_avro::Schema, u32) {
    let mut schema: Json = serde_json::from_str(&p.contract(topic).text).expect("contract JSON");
    schema["fields"]
        .as_array_mut()
        .expect("fields")
        .push(json!({"name": "rollout", "type": ["null", "string"], "default": null}));
    let text = schema.to_string();
    let v1 = &p.contract(topic).schema;
    let v2 = apache_avro::Schema::parse_str(&text).expect("v2 parses");
    let violations = medallion_contracts::compat::check_backward(v1, &v2).expect("gate runs");
    assert!(
        violations.is_empty(),
        "{topic}: v2 passes the BACKWARD gate: {violations:?}"
    );
    // rivven-schema 0.0.22 finds `timestamp-millis` incompatible with itself (see contracts.rs),
    // so the subject's own check is switched off once our gate has passed v2.
    let config = reqwest::Client::new()
        .put(format!(
            "{}/config/{}",
            p.registry.address,
            p.topics.subject(topic)
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(r#"{"compatibility":"NONE"}"#)
        .send()
        .await
        .expect("registry reachable");
    assert!(config.status().is_success(), "{}", config.status());
    let id = RegistryClient::new(&p.registry.address, Duration::from_secs(10))
        .expect("client")
        .register(&p.topics.subject(topic), &text)
        .await
        .expect("v2 is BACKWARD compatible");
    assert_ne!(id, p.ids[topic], "{topic}: v2 has its own id");
    (v2, id)
}

/// Produces `events` to `topic`, alternating between the registered v1 and `v2`.
async fn publish_alternating(
    p: &Pipeline,
    topic: &str,
    v2: &(apache_avro::Schema, u32),
    events: &[Json],
) {
    for (i, event) in events.iter().enumerate() {
        let value = if i % 2 == 0 {
            to_framed(event, &p.contract(topic).schema, p.ids[topic]).expect("v1 frame")
        } else {
            let mut event = event.clone();
            event["rollout"] = json!(format!("canary-{i}"));
            to_framed(&event, &v2.0, v2.1).expect("v2 frame")
        };
        p.producer
            .send(
                FutureRecord::to(topic)
                    .key(&event["org_id"].to_string())
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

async fn dead_letters(p: &Pipeline, dlq: &str) -> BTreeMap<String, String> {
    read_topic(
        &p.broker.address,
        dlq,
        0,
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
    .await
    .expect("DLQ read")
    .iter()
    .map(|m| {
        let reason = m
            .headers()
            .and_then(|h| header_value(h, header::ERROR_REASON))
            .unwrap_or_default();
        (format!("{}:{}", m.partition(), m.offset()), reason)
    })
    .collect()
}

fn event_ids(records: &[Json], pointer: &str) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            r.pointer(pointer)
                .and_then(Json::as_str)
                .expect("id")
                .to_string()
        })
        .collect()
}

fn once(ids: &[String]) -> BTreeSet<String> {
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "no event twice");
    set
}

async fn read(p: &Pipeline, topic: &str, n: usize) -> Vec<OwnedMessage> {
    read_topic(
        &p.broker.address,
        topic,
        n,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("output")
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_switching_mid_batch_flow_through_bronze_silver_and_gold() {
    let p = Pipeline::start().await;
    let raw_v2 = register_v2(&p, RAW).await;
    let bronze_v2 = register_v2(&p, BRONZE).await;
    let silver_v2 = register_v2(&p, SILVER).await;

    // gold: silver events of three orgs over four one-minute windows, ten per window, every
    // other one written with v2; a last event per org closes the windows.
    let orgs = [41i64, 42, 43];
    let mut scripted = Vec::new();
    let mut n = 50_000u64;
    for w in 0..4i64 {
        for i in 0..10i64 {
            for org in orgs {
                n += 1;
                let t = T0 + w * MIN + i * 5_000;
                let mut e = envelope(&uuid(n), org, t);
                e["payload"] = json!({
                    "entity": {"entity_type": "case", "entity_id": format!("C{}", i % 4), "org_id": org,
                               "source_system": "v4", "updated_at": t},
                    "change": if i % 3 == 0 { "CREATED" } else { "UPDATED" }, "attributes": {},
                    "measurements": [{"name": "load", "value": w as f64, "unit": null}],
                    "quality_warnings": [], "bronze_event_id": uuid(n)
                });
                scripted.push(e);
            }
        }
    }
    for org in orgs {
        n += 1;
        let mut e = envelope(&uuid(n), org, T0 + 6 * MIN);
        e["payload"] = json!({
            "entity": {"entity_type": "case", "entity_id": "flush", "org_id": org,
                       "source_system": "v4", "updated_at": T0},
            "change": "UPDATED", "attributes": {}, "measurements": [],
            "quality_warnings": [], "bronze_event_id": uuid(n)
        });
        scripted.push(e);
    }
    publish_alternating(&p, SILVER, &silver_v2, &scripted).await;
    let gold = p.worker_of(GOLD_BIN, &[]);
    gold.wait_ready(Duration::from_secs(90))
        .await
        .expect("gold ready");
    let expected_windows = orgs.len() * 4 * 2;
    let out = read(&p, GOLD, expected_windows).await;
    let mut windows = BTreeMap::new();
    for record in p.decode(GOLD, &out) {
        let pl = &record["payload"];
        let w = (pl["window_start"].as_i64().expect("window_start") - T0) / MIN;
        let key = (record["org_id"].to_string(), pl["metric"].to_string(), w);
        assert!(
            windows.insert(key, pl.clone()).is_none(),
            "window twice: {record}"
        );
    }
    assert_eq!(windows.len(), expected_windows, "{windows:?}");
    for ((_, metric, w), pl) in &windows {
        assert_eq!(pl["count"], json!(10), "{pl}");
        let want_sum = if metric == "\"load\"" {
            10.0 * *w as f64
        } else {
            10.0
        };
        assert_eq!(pl["sum"].as_f64(), Some(want_sum), "{pl}");
        assert_eq!(pl["distinct_entities"], json!(4), "{pl}");
    }
    assert_eq!(
        dead_letters(&p, "silver.data.processed.dlq").await,
        BTreeMap::new()
    );

    // bronze: connector events, every other one written with v2.
    let events = sample(71, 200);
    publish_alternating(&p, RAW, &raw_v2, &events).await;
    let bronze = p.worker(&[]);
    let out = read(&p, BRONZE, events.len()).await;
    assert_eq!(
        dead_letters(&p, "connector.data.raw.dlq").await,
        BTreeMap::new()
    );
    let cleaned = once(&event_ids(&p.bronze_json(&out), "/event_id"));
    assert_eq!(cleaned, once(&event_ids(&events, "/event_id")));
    drop(bronze);

    // silver: bronze's own v1 output followed by cases a v2 producer wrote to bronze's topic.
    let direct: Vec<Json> = (0..60u64)
        .map(|i| {
            let org = 31 + (i % 3) as i64;
            let case = format!("K{}", i % 9);
            bronze_case(
                60_000 + i,
                org,
                i as i64 * 1_000,
                (&case, i as i64 * 1_000, 0),
                3.0,
                "o",
            )
        })
        .collect();
    for (i, event) in direct.iter().enumerate() {
        // All of them v2: the switch happens between bronze's records and these.
        let mut event = event.clone();
        event["rollout"] = json!(format!("canary-{i}"));
        let value = to_framed(&event, &bronze_v2.0, bronze_v2.1).expect("v2 frame");
        p.producer
            .send(
                FutureRecord::to(BRONZE)
                    .key(&event["org_id"].to_string())
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
    let silver = p.worker_of(SILVER_BIN, &[]);
    silver
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("silver ready");
    let expected = events.len() + direct.len();
    let out = read(&p, SILVER, scripted.len() + expected).await;
    // What silver-processor wrote (the v1 id), not the scripted v2 events gold read.
    let written: Vec<OwnedMessage> = out
        .into_iter()
        .filter(|m| {
            m.payload()
                .is_some_and(|v| v.get(1..5) != Some(&silver_v2.1.to_be_bytes()[..]))
        })
        .collect();
    let produced: Vec<Json> = p
        .decode(SILVER, &written)
        .into_iter()
        .filter(|r| !orgs.contains(&r["org_id"].as_i64().unwrap_or_default()))
        .collect();
    assert_eq!(
        dead_letters(&p, "bronze.data.cleaned.dlq").await,
        BTreeMap::new()
    );
    let merged = once(&event_ids(&produced, "/payload/bronze_event_id"));
    let mut want = cleaned;
    want.extend(event_ids(&direct, "/event_id"));
    assert_eq!(merged.len(), expected);
    assert_eq!(merged, want);
}
