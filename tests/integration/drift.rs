//! Reconciliation against the system of record on a real broker and registry: silver merges cases, then
//! `medallion drift check`'s core compares its state with snapshots (JSON lines and Parquet)
//! holding known differences, and records each on audit.events.

use std::time::Duration;

use medallion_contracts::registry::RegistryClient;
use medallion_stages::silver::reconcile::{Check, Kind};
use medallion_tests::read_until;
use serde_json::json;

use crate::bronze::Pipeline;
use crate::stages::{bronze_case, SILVER_BIN, T0};

const ORG: i64 = 11;

#[tokio::test(flavor = "multi_thread")]
async fn drift_check_reports_and_audits_every_difference_from_the_snapshot() {
    let p = Pipeline::start().await;
    let silver = p.worker_of(SILVER_BIN, &[]);
    silver
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("silver ready");
    // C1 agrees with the snapshot, C2's title differs there, C3 is not in it.
    for (n, case) in [(1, "C1"), (2, "C2"), (3, "C3")] {
        p.publish(
            "bronze.data.cleaned",
            &bronze_case(
                n,
                ORG,
                n as i64 * 1_000,
                (case, 100 * n as i64, 0),
                4.0,
                "ann",
            ),
        )
        .await;
    }
    read_until(
        &p.broker.address,
        "silver.data.processed",
        |m| m.len() >= 3,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await
    .expect("silver output");

    let dir = std::env::temp_dir().join(format!("medallion-drift-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // As a system of record exports them: its own case, spacing and field names; C9 is
    // unknown to silver. bronze_case's title is "t" and status "Open".
    let rows = [
        json!({"org_id": ORG, "case_id": "c1", "title": " t ", "status": "open", "severity": 4, "updated_at": T0 + 100}),
        json!({"org_id": ORG, "case_id": "C2", "title": "renamed in v4", "status": "Open", "severity": 4, "updated_at": T0 + 200}),
        json!({"org_id": ORG, "case_id": "C9", "title": "t", "status": "Open", "severity": 1, "updated_at": T0 + 900}),
    ];
    let jsonl = dir.join("snapshot.jsonl");
    std::fs::write(
        &jsonl,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .expect("snapshot written");
    let parquet = dir.join("snapshot.parquet");
    let values: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "({}, '{}', '{}', '{}', {}, {})",
                r["org_id"],
                r["case_id"].as_str().unwrap_or(""),
                r["title"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or(""),
                r["severity"],
                r["updated_at"]
            )
        })
        .collect();
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.sql(&format!(
        "COPY (SELECT * FROM (VALUES {}) AS t(org_id, case_id, title, status, severity, updated_at)) \
         TO '{}' STORED AS PARQUET",
        values.join(", "),
        parquet.display()
    ))
    .await
    .expect("plans")
    .collect()
    .await
    .expect("parquet written");

    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&p.broker.address).expect("connection");
    let registry =
        RegistryClient::new(&p.registry.address, Duration::from_secs(10)).expect("client");
    let home = medallion_contracts::project_root();
    let expected = vec![
        ("C2".to_string(), Kind::HashMismatch),
        ("C3".to_string(), Kind::MissingInSnapshot),
        ("C9".to_string(), Kind::MissingInSilver),
    ];
    for (snapshot, record) in [(&jsonl, true), (&parquet, false)] {
        let report = Check {
            kafka: &kafka,
            registry: &registry,
            home: &home,
            contracts: &p.contracts,
            topics: &p.topics,
            entity_type: "case",
            snapshot,
            record,
        }
        .run()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", snapshot.display()));
        let got: Vec<(String, Kind)> = report
            .findings
            .iter()
            .map(|f| (f.entity_id.clone(), f.kind))
            .collect();
        assert_eq!(got, expected, "{}", snapshot.display());
        assert_eq!(
            (report.matched, report.in_silver, report.in_snapshot),
            (1, 3, 3)
        );
    }

    // Recorded once (the JSON-lines run), one audit record per finding.
    let mut recorded: Vec<(String, String)> = p
        .read_matching(
            "audit.events",
            |e| e["payload"]["action"] == "drift.reconciled",
            3,
            Duration::from_secs(2),
            Duration::from_secs(60),
        )
        .await
        .iter()
        .map(|e| {
            assert_eq!(e["org_id"], ORG);
            (
                e["payload"]["resource_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                e["payload"]["outcome"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        vec![
            ("C2".to_string(), "hash_mismatch".to_string()),
            ("C3".to_string(), "missing_in_snapshot".to_string()),
            ("C9".to_string(), "missing_in_silver".to_string()),
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
