//! Rule evaluation, suppression and updates in process (broker tests are in `tests/`).

use medallion_runtime::error::SetupError;
use medallion_runtime::worker::OutputEvent;
use serde_json::{json, Value as Json};

use super::{Rule, Rules, RulesConfig, Severity, GROUP};
use crate::testkit::{arrow_schema, contract, input_batch, offline_setup};

fn gold(id: &str, org: i64, metric: &str, start: i64, count: i64, sum: f64) -> Json {
    json!({
        "event_id": id, "event_type": "gold.metric.windowed", "event_version": "1.0.0",
        "timestamp": start + 60_000, "source": {"service": "gold-processor", "instance": "g"},
        "correlation_id": format!("corr-{id}"), "org_id": org, "trace_id": format!("trace-{id}"),
        "classification": "internal",
        "payload": {
            "metric": metric, "window_start": start, "window_end": start + 60_000,
            "count": count, "sum": sum, "min": 0.0, "max": sum, "avg": sum / count as f64,
            "distinct_entities": 1, "dimensions": {}
        }
    })
}

fn rule(id: &str, predicate: &str, org: Option<i64>, suppression_ms: i64) -> Rule {
    Rule {
        id: id.into(),
        description: format!("{id} fired"),
        predicate: predicate.into(),
        severity: Severity::High,
        org_id: org,
        suppression_ms,
        observe: "count".into(),
        threshold: Some(3.0),
    }
}

async fn rules(set: Vec<Rule>) -> Result<Rules, SetupError> {
    let gold_contract = contract("gold/data-ready.avsc");
    let alerts = contract("rules/alerts.avsc");
    let (_, input_schema) = input_batch(&gold_contract, &[gold("x", 1, "m", 0, 1, 1.0)], 0, 0, 0);
    let setup = offline_setup(GROUP, input_schema, arrow_schema(&alerts));
    let config = RulesConfig {
        rules_file: None,
        rules: set,
    };
    Rules::offline(&setup, config).await
}

/// The alerts, through the output contract and back (as the runtime encodes them).
fn decode(events: &[OutputEvent]) -> Vec<Json> {
    let c = contract("rules/alerts.avsc");
    events
        .iter()
        .map(|e| {
            assert_eq!(e.key, e.event["org_id"].to_string(), "keyed by org");
            let binary =
                medallion_contracts::json::to_avro_binary(&e.event, &c.schema).expect("an alert");
            medallion_contracts::json::from_avro_binary(&binary, &c.schema, &c.schema)
                .expect("alert")
        })
        .collect()
}

async fn feed(stage: &mut Rules, events: &[Json]) -> Vec<Json> {
    let (batch, _) = input_batch(&contract("gold/data-ready.avsc"), events, 0, 0, 0);
    decode(
        &crate::testkit::process(stage, batch)
            .await
            .expect("processes")
            .events,
    )
}

#[tokio::test]
async fn rules_fire_with_scope_and_suppression() {
    let mut stage = rules(vec![
        rule(
            "many-cases",
            "metric = 'events.case' AND count >= 3",
            None,
            120_000,
        ),
        rule("org-9-only", "sum > 0", Some(9), 0),
    ])
    .await
    .expect("valid");
    let alerts = feed(
        &mut stage,
        &[
            gold("g1", 7, "events.case", 0, 5, 5.0),
            gold("g2", 7, "events.case", 60_000, 4, 4.0), // suppressed: within 120 s of g1
            gold("g3", 7, "events.case", 120_000, 3, 3.0), // fires again
            gold("g4", 8, "events.case", 0, 2, 2.0),      // below threshold
            gold("g5", 9, "events.lead", 0, 1, 1.0),      // only org 9's rule
        ],
    )
    .await;
    let got: Vec<(String, i64, i64, String)> = alerts
        .iter()
        .map(|a| {
            (
                a["payload"]["rule_id"].as_str().unwrap_or("").into(),
                a["org_id"].as_i64().unwrap_or(0),
                a["payload"]["window_start"].as_i64().unwrap_or(0),
                a["payload"]["triggered_by_event_id"]
                    .as_str()
                    .unwrap_or("")
                    .into(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("many-cases".into(), 7, 0, "g1".into()),
            ("many-cases".into(), 7, 120_000, "g3".into()),
            ("org-9-only".into(), 9, 0, "g5".into()),
        ]
    );
    let first = &alerts[0];
    assert_eq!(first["payload"]["severity"], "HIGH");
    assert_eq!(first["payload"]["observed_value"], json!(5.0));
    assert_eq!(first["correlation_id"], "corr-g1");
    assert_eq!(first["trace_id"], "trace-g1");
    assert!(first["payload"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("many-cases fired"));
}

#[tokio::test]
async fn an_invalid_update_is_rejected_by_rule_and_a_valid_one_applies() {
    let mut stage = rules(vec![rule("old", "count >= 100", None, 0)])
        .await
        .expect("valid");
    let bad = "rules:\n  - {id: fine, description: d, predicate: 'count > 1', severity: LOW}\n  - {id: broken, description: d, predicate: 'no_such_column > 1', severity: LOW}\n";
    let err = stage.offer(bad, 1).await.expect_err("rejected").to_string();
    assert!(err.contains("`broken`"), "{err}");
    let not_bool =
        "rules:\n  - {id: numeric, description: d, predicate: 'count + 1', severity: LOW}\n";
    assert!(stage
        .offer(not_bool, 2)
        .await
        .expect_err("rejected")
        .to_string()
        .contains("`numeric`"));
    // Still the old rules.
    assert!(feed(&mut stage, &[gold("a", 1, "m", 0, 5, 5.0)])
        .await
        .is_empty());
    let good =
        "rules:\n  - {id: new, description: d, predicate: 'count >= 5', severity: CRITICAL}\n";
    stage.offer(good, 3).await.expect("applies");
    let alerts = feed(&mut stage, &[gold("b", 1, "m", 60_000, 5, 5.0)]).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["payload"]["rule_id"], "new");
    assert_eq!(alerts[0]["payload"]["rule_version"], 3);
    assert_eq!(stage.version(), 3);
    assert!(
        stage.offer(good, 2).await.is_err(),
        "older versions are ignored"
    );
}

#[tokio::test]
async fn the_shipped_rule_file_is_valid() {
    let gold_contract = contract("gold/data-ready.avsc");
    let alerts = contract("rules/alerts.avsc");
    let (_, input_schema) = input_batch(&gold_contract, &[gold("x", 1, "m", 0, 1, 1.0)], 0, 0, 0);
    let setup = offline_setup(GROUP, input_schema, arrow_schema(&alerts));
    let stage = Rules::offline(&setup, RulesConfig::default())
        .await
        .expect("rules/default.yaml is valid");
    assert!(!stage.current.rules.is_empty());
}
