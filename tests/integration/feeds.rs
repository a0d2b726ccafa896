//! Every feed of the catalog (`feeds.yaml`) flows raw → bronze → silver → gold on a real
//! broker, each as its golden payload, and a high-severity threat fires the default
//! `severe-threat` rule of `rules/default.yaml`.

use std::collections::BTreeMap;
use std::time::Duration;

use medallion_tests::{read_until, WorkerProcess};
use serde_json::{json, Value as Json};

use crate::bronze::{now_ms, Pipeline};
use crate::stages::{GOLD_BIN, MIN, RULES_BIN, SILVER_BIN};

const RAW: &str = "connector.data.raw";
const GOLD: &str = "gold.data.ready";
const ALERTS: &str = "rules.alerts.triggered";
const ORG: i64 = 4242;

/// The golden raw payload of every feed, in file order.
fn goldens() -> Vec<Json> {
    let dir = medallion_contracts::project_root().join("schemas/golden/connector");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("golden dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).expect("golden")).expect("JSON"))
        .collect()
}

async fn ready(worker: &WorkerProcess) {
    worker
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("worker ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_feed_reaches_gold_and_a_severe_threat_fires_the_default_rule() {
    let p = Pipeline::start().await;
    let workers = [
        p.worker(&[]),
        p.worker_of(SILVER_BIN, &[]),
        p.worker_of(GOLD_BIN, &[]),
        p.worker_of(RULES_BIN, &[]),
    ];
    for w in &workers {
        ready(w).await;
    }
    // One window, half an hour ago; a last event three minutes later closes it.
    let window = (now_ms() - 30 * MIN) / MIN * MIN;
    let events = goldens();
    let feeds: Vec<String> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(feeds.len(), 8, "a golden payload per feed: {feeds:?}");
    for (i, golden) in events.iter().enumerate() {
        let mut e = golden.clone();
        e["org_id"] = json!(ORG);
        e["timestamp"] = json!(window + 1_000 * i as i64);
        p.publish(RAW, &e).await;
    }
    let mut closer = events[0].clone();
    closer["org_id"] = json!(ORG);
    closer["event_id"] = json!("00000000-0000-4000-8000-00000000c105");
    closer["timestamp"] = json!(window + 3 * MIN);
    p.publish(RAW, &closer).await;

    // gold: a window per entity type, and the catalog's samples.
    let wanted = [
        "events.release",
        "events.case",
        "events.lead",
        "events.alert",
        "events.invoice",
        "events.payment",
        "events.task",
        "events.threat",
        "threat.severity",
        "invoice.amount",
        "payment.amount",
    ];
    let windows = |messages: &[rdkafka::message::OwnedMessage]| -> BTreeMap<String, Json> {
        p.decode(GOLD, messages)
            .into_iter()
            .filter(|r| r["org_id"] == ORG && r["payload"]["window_start"] == window)
            .map(|r| {
                (
                    r["payload"]["metric"].as_str().unwrap_or("").to_string(),
                    r["payload"].clone(),
                )
            })
            .collect()
    };
    let out = read_until(
        &p.broker.address,
        GOLD,
        |m| {
            let got = windows(m);
            wanted.iter().all(|w| got.contains_key(*w))
        },
        Duration::from_secs(1),
        Duration::from_secs(180),
    )
    .await
    .expect("gold windows of every feed");
    let got = windows(&out);
    for metric in wanted.iter().filter(|m| m.starts_with("events.")) {
        assert_eq!(got[*metric]["count"], 1, "{metric}: {:?}", got[*metric]);
    }
    // The golden threat is `high`: HIGH is 3.
    assert_eq!(got["threat.severity"]["max"], 3.0);
    assert_eq!(got["invoice.amount"]["sum"], 3500.0);
    assert_eq!(got["payment.amount"]["sum"], 3500.0);

    let alert = p
        .read_matching(
            ALERTS,
            |a| a["payload"]["rule_id"] == "severe-threat",
            1,
            Duration::from_secs(1),
            Duration::from_secs(120),
        )
        .await
        .remove(0);
    assert_eq!(alert["org_id"], ORG);
    assert_eq!(alert["payload"]["window_start"], window);
    assert_eq!(alert["payload"]["observed_value"], 3.0);
}
