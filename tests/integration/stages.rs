//! silver-processor, gold-processor and rule-evaluator as separate processes on a real broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use medallion_runtime::dlq::{header, header_value};
use medallion_tests::{metric_sum_where, read_topic, read_until, WorkerProcess};
use rdkafka::message::Message;
use serde_json::{json, Value as Json};

use crate::bronze::Pipeline;

pub(crate) const SILVER_BIN: &str = env!("CARGO_BIN_EXE_silver-processor");
pub(crate) const GOLD_BIN: &str = env!("CARGO_BIN_EXE_gold-processor");
pub(crate) const RULES_BIN: &str = env!("CARGO_BIN_EXE_rule-evaluator");
const BRONZE: &str = "bronze.data.cleaned";
const SILVER: &str = "silver.data.processed";
const GOLD: &str = "gold.data.ready";
const ALERTS: &str = "rules.alerts.triggered";
const AUDIT: &str = "audit.events";
const CHANGES: &str = "config.changes";

/// A minute boundary, so windows start at T0.
pub(crate) const T0: i64 = 28_333_334 * 60_000;
pub(crate) const MIN: i64 = 60_000;

pub(crate) fn uuid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

pub(crate) fn envelope(id: &str, org: i64, t: i64) -> Json {
    json!({
        "event_id": id, "event_type": "case.sync.v1", "event_version": "1.0.0",
        "timestamp": t, "source": {"service": "case-sync", "instance": "i-1"},
        "correlation_id": format!("corr-{id}"), "org_id": org, "trace_id": format!("trace-{id}"),
        "classification": "internal",
    })
}

/// A bronze case event: `updated_at` and `created_at` in ms after T0.
pub(crate) fn bronze_case(
    n: u64,
    org: i64,
    t: i64,
    (case, updated, created): (&str, i64, i64),
    severity: f64,
    owner: &str,
) -> Json {
    let mut e = envelope(&uuid(n), org, T0 + t);
    e["payload"] = json!({
        "connector_id": "c-1", "source_system": "v5",
        "release_sync": null, "lead_created": null,
        "case_sync": {
            "case_id": case, "title": "t", "description": null, "severity": severity as i32,
            "status": "Open", "owner": owner, "flag": false, "tlp": 1, "pap": 1,
            "created_at": T0 + created, "updated_at": T0 + updated, "custom_fields": {}
        },
        "measurements": [{"name": "case.severity", "value": severity, "unit": null}],
        "attributes": {}, "raw_topic": "connector.data.raw", "raw_partition": 0,
        "raw_offset": n as i64, "cleaned_at": T0 + t
    });
    e
}

fn bronze_lead(n: u64, org: i64, t: i64, lead: &str) -> Json {
    let mut e = envelope(&uuid(n), org, T0 + t);
    e["event_type"] = json!("lead.created");
    e["payload"] = json!({
        "connector_id": "c-2", "source_system": "crm",
        "release_sync": null, "case_sync": null,
        "lead_created": {
            "lead_id": lead, "name": "N", "email": "n@example.com", "source": "web",
            "assigned_to": null, "created_at": T0 + t
        },
        "measurements": [], "attributes": {}, "raw_topic": "connector.data.raw",
        "raw_partition": 0, "raw_offset": n as i64, "cleaned_at": T0 + t
    });
    e
}

/// (org, metric, window start - T0).
type WindowKey = (i64, String, i64);
/// (count, sum, min, max, distinct entities).
type Totals = (i64, f64, f64, f64, i64);

async fn wait(worker: &WorkerProcess) {
    worker
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("worker ready");
}

fn reasons(messages: &[rdkafka::message::OwnedMessage]) -> BTreeMap<String, String> {
    messages
        .iter()
        .map(|m| {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let reason = m
                .headers()
                .and_then(|h| header_value(h, header::ERROR_REASON))
                .unwrap_or_default();
            (format!("{key}:{}", m.offset()), reason)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn scripted_bronze_input_gives_known_silver_rows_gold_windows_and_alerts() {
    let p = Pipeline::start().await;
    let rules = tempfile_with(
        "rules:\n\
         \x20 - {id: severe-cases, description: Severe case activity, predicate: \"metric = 'case.severity' AND max >= 4 AND count >= 3\", severity: CRITICAL, observe: count, threshold: 3}\n\
         \x20 - {id: lead-pair, description: Two leads, predicate: \"metric = 'events.lead' AND count >= 2\", severity: LOW, org_id: 12}\n\
         \x20 - {id: other-org, description: Never for org 12, predicate: \"metric = 'events.lead'\", severity: LOW, org_id: 99}\n",
    );
    let rules_env = [("MEDALLION__STAGE__RULES_FILE", rules.display().to_string())];
    let silver = p.worker_of(SILVER_BIN, &[]);
    let gold = p.worker_of(GOLD_BIN, &[]);
    let evaluator = p.worker_of(RULES_BIN, &rules_env);
    wait(&silver).await;

    let s = 1_000;
    let script = [
        bronze_case(1, 11, s, ("C1", 100, 0), 4.0, "ann"),
        bronze_case(2, 11, 2 * s, ("C2", 100, 0), 4.0, ""), // warn: case_has_owner
        bronze_case(3, 11, 3 * s, ("C1", 300, 0), 4.0, "ann"), // newer: UPDATED
        bronze_case(4, 11, 4 * s, ("C1", 200, 0), 4.0, "ann"), // older: STALE, drift
        bronze_case(5, 11, 5 * s, ("C3", 100, 500), 4.0, "ann"), // drop: updated before created
        bronze_lead(6, 12, 10 * s, "L1"),
        bronze_lead(7, 12, 20 * s, "L2"),
        bronze_case(8, 11, 70 * s, ("C4", 100, 0), 2.0, "bob"), // second window
        // Watermarks reach 190 s: windows [0, 60) and [60, 120) close.
        bronze_case(9, 11, 200 * s, ("C5", 100, 0), 1.0, "bob"),
        bronze_lead(10, 12, 200 * s, "L3"),
        bronze_case(11, 11, 5 * s, ("C6", 100, 0), 4.0, "ann"), // late for gold
    ];
    for event in &script {
        p.publish(BRONZE, event).await;
    }

    // silver: every event but the dropped one, in order per org, with its merge decision.
    let out = read_topic(
        &p.broker.address,
        SILVER,
        10,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await
    .expect("silver output");
    let rows = p.decode(SILVER, &out);
    let got: BTreeSet<(String, String, String, String)> = rows
        .iter()
        .map(|r| {
            let pl = &r["payload"];
            (
                pl["bronze_event_id"].as_str().unwrap_or("").to_string(),
                pl["entity"]["entity_id"].as_str().unwrap_or("").to_string(),
                pl["change"].as_str().unwrap_or("").to_string(),
                pl["quality_warnings"].to_string(),
            )
        })
        .collect();
    let row = |n: u64, entity: &str, change: &str, warnings: &str| {
        (
            uuid(n),
            entity.to_string(),
            change.to_string(),
            warnings.to_string(),
        )
    };
    let want: BTreeSet<_> = [
        row(1, "C1", "CREATED", "[]"),
        row(2, "C2", "CREATED", "[\"case_has_owner\"]"),
        row(3, "C1", "UPDATED", "[]"),
        row(4, "C1", "STALE", "[]"),
        row(6, "L1", "CREATED", "[]"),
        row(7, "L2", "CREATED", "[]"),
        row(8, "C4", "CREATED", "[]"),
        row(9, "C5", "CREATED", "[]"),
        row(10, "L3", "CREATED", "[]"),
        row(11, "C6", "CREATED", "[]"),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    let c1 = rows
        .iter()
        .find(|r| r["payload"]["bronze_event_id"] == uuid(3))
        .expect("e3");
    assert_eq!(c1["payload"]["entity"]["updated_at"], json!(T0 + 300));
    assert_eq!(c1["payload"]["attributes"]["severity"], "4");

    // Per-expectation pass/fail counters on /metrics.
    for (labels, want) in [
        (
            r#"expectation="case_has_owner",action="warn",result="fail""#,
            1.0,
        ),
        (
            r#"expectation="case_has_owner",action="warn",result="pass""#,
            10.0,
        ),
        (
            r#"expectation="updated_at_not_before_creation",action="drop",result="fail""#,
            1.0,
        ),
    ] {
        wait_metric(&silver, "medallion_expectation_results_total", labels, want).await;
        let text = silver.metrics().await.expect("metrics");
        let value = metric_sum_where(&text, "medallion_expectation_results_total", labels);
        assert_eq!(value, want, "{labels}");
    }
    // The dropped event is on the bronze DLQ with the expectation's name.
    let dlq = read_topic(
        &p.broker.address,
        "bronze.data.cleaned.dlq",
        1,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("silver DLQ");
    assert_eq!(
        reasons(&dlq).into_values().collect::<Vec<_>>(),
        vec!["updated_at_not_before_creation"]
    );

    // Drift is audited.
    let audit = read_topic(
        &p.broker.address,
        AUDIT,
        1,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("audit");
    let audit = p.decode(AUDIT, &audit);
    let action = |e: &&Json, name: &str| e["payload"]["action"] == name;
    let drift: Vec<&Json> = audit
        .iter()
        .filter(|e| action(e, "drift.detected"))
        .collect();
    assert_eq!(drift.len(), 1, "{audit:?}");
    assert_eq!(drift[0]["payload"]["resource_id"], "C1");
    assert_eq!(drift[0]["payload"]["details"]["event_id"], uuid(4));
    assert_eq!(drift[0]["payload"]["details"]["current_event_id"], uuid(3));
    // Every dead letter is on the audit trail too.
    let routed: Vec<&Json> = audit.iter().filter(|e| action(e, "dlq.routed")).collect();
    assert!(
        routed.iter().any(
            |e| e["payload"]["reason"] == "updated_at_not_before_creation"
                && e["payload"]["actor"] == "silver-processor"
        ),
        "{routed:?}"
    );
    assert_eq!(drift.len() + routed.len(), audit.len(), "{audit:?}");

    // gold: exactly the closed windows, with known totals.
    wait(&gold).await;
    let out = read_topic(
        &p.broker.address,
        GOLD,
        5,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("gold output");
    let windows: BTreeMap<WindowKey, Totals> = p
        .decode(GOLD, &out)
        .iter()
        .map(|r| {
            let pl = &r["payload"];
            (
                (
                    r["org_id"].as_i64().unwrap_or(0),
                    pl["metric"].as_str().unwrap_or("").to_string(),
                    pl["window_start"].as_i64().unwrap_or(0) - T0,
                ),
                (
                    pl["count"].as_i64().unwrap_or(0),
                    pl["sum"].as_f64().unwrap_or(0.0),
                    pl["min"].as_f64().unwrap_or(0.0),
                    pl["max"].as_f64().unwrap_or(0.0),
                    pl["distinct_entities"].as_i64().unwrap_or(0),
                ),
            )
        })
        .collect();
    assert_eq!(out.len(), windows.len(), "each window once");
    let expected: BTreeMap<WindowKey, Totals> = [
        ((11, "case.severity".to_string(), 0), (3, 12.0, 4.0, 4.0, 2)),
        ((11, "events.case".to_string(), 0), (3, 3.0, 1.0, 1.0, 2)),
        (
            (11, "case.severity".to_string(), MIN),
            (1, 2.0, 2.0, 2.0, 1),
        ),
        ((11, "events.case".to_string(), MIN), (1, 1.0, 1.0, 1.0, 1)),
        ((12, "events.lead".to_string(), 0), (2, 2.0, 1.0, 1.0, 2)),
    ]
    .into_iter()
    .collect();
    assert_eq!(windows, expected);
    let late = read_topic(
        &p.broker.address,
        "silver.data.processed.dlq",
        1,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("gold DLQ");
    assert_eq!(
        reasons(&late).into_values().collect::<Vec<_>>(),
        vec!["late"]
    );
    assert!(p.decode(SILVER, &late)[0]["payload"]["bronze_event_id"] == uuid(11));

    // Alerts: the two rules whose predicates hold, once each.
    wait(&evaluator).await;
    let out = read_topic(
        &p.broker.address,
        ALERTS,
        2,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("alerts");
    let alerts = p.decode(ALERTS, &out);
    let got: BTreeSet<(String, i64, String, i64, String)> = alerts
        .iter()
        .map(|a| {
            let pl = &a["payload"];
            (
                pl["rule_id"].as_str().unwrap_or("").to_string(),
                a["org_id"].as_i64().unwrap_or(0),
                pl["severity"].as_str().unwrap_or("").to_string(),
                pl["window_start"].as_i64().unwrap_or(0) - T0,
                pl["observed_value"].to_string(),
            )
        })
        .collect();
    let want: BTreeSet<_> = [
        (
            "severe-cases".to_string(),
            11,
            "CRITICAL".to_string(),
            0,
            "3.0".to_string(),
        ),
        (
            "lead-pair".to_string(),
            12,
            "LOW".to_string(),
            0,
            "2.0".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    let severe = alerts
        .iter()
        .find(|a| a["payload"]["rule_id"] == "severe-cases")
        .expect("alert");
    // The trace of what triggered it: the window's first event.
    assert_eq!(severe["trace_id"], format!("trace-{}", uuid(1)));
    assert!(severe["payload"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("Severe case activity"));

    // silver's merge state survives a crash: restored from the changelog, an older update
    // for C1 is still recognised as stale.
    let mut silver = silver;
    silver.kill();
    let silver = p.worker_of(SILVER_BIN, &[]);
    wait(&silver).await;
    p.publish(
        BRONZE,
        &bronze_case(12, 11, 210 * s, ("C1", 250, 0), 4.0, "ann"),
    )
    .await;
    let out = read_until(
        &p.broker.address,
        SILVER,
        |m| m.len() >= 11,
        Duration::from_secs(1),
        Duration::from_secs(120),
    )
    .await
    .expect("silver after restart");
    let last = p.decode(SILVER, &out);
    let e12 = last
        .iter()
        .find(|r| r["payload"]["bronze_event_id"] == uuid(12))
        .expect("e12");
    assert_eq!(e12["payload"]["change"], "STALE");
}

#[tokio::test(flavor = "multi_thread")]
async fn rule_updates_apply_without_restart_and_invalid_ones_are_rejected() {
    let p = Pipeline::start().await;
    let rules = tempfile_with(
        "rules:\n  - {id: big, description: Big windows, predicate: 'count >= 100', severity: HIGH}\n",
    );
    let evaluator = p.worker_of(
        RULES_BIN,
        &[("MEDALLION__STAGE__RULES_FILE", rules.display().to_string())],
    );
    wait(&evaluator).await;
    let gold_record = |n: u64, org: i64, start: i64, count: i64| {
        let mut e = envelope(&uuid(n), org, T0 + start + MIN);
        e["event_type"] = json!("gold.metric.windowed");
        e["payload"] = json!({
            "metric": "events.case", "window_start": T0 + start, "window_end": T0 + start + MIN,
            "count": count, "sum": count as f64, "min": 1.0, "max": 1.0, "avg": 1.0,
            "distinct_entities": 1, "dimensions": {}
        });
        e
    };
    let change = |n: u64, version: i64, document: &str| {
        let mut e = envelope(&uuid(n), 0, T0);
        e["event_type"] = json!("config.changed");
        e["payload"] = json!({
            "target": "rules", "config_version": version, "format": "YAML",
            "document": document, "changed_by": "test", "reason": null
        });
        e
    };
    // Under the start-up rules, a window of 5 fires nothing.
    p.publish(GOLD, &gold_record(1, 5, 0, 5)).await;
    // An invalid update (names a column that does not exist) is rejected...
    p.publish(
        CHANGES,
        &change(
            2,
            1,
            "rules:\n  - {id: broken-rule, description: d, predicate: 'nope > 1', severity: LOW}\n",
        ),
    )
    .await;
    wait_metric(&evaluator, "medallion_rule_updates_total", "rejected", 1.0).await;
    p.publish(GOLD, &gold_record(3, 5, MIN, 150)).await; // the old rule still works
    read_topic(
        &p.broker.address,
        ALERTS,
        1,
        Duration::ZERO,
        Duration::from_secs(60),
    )
    .await
    .expect("alert under the old rules");
    // ...a valid one applies without a restart.
    p.publish(CHANGES, &change(4, 2, "rules:\n  - {id: small, description: Small windows, predicate: 'count >= 5', severity: MEDIUM}\n")).await;
    wait_metric(&evaluator, "medallion_rules_version", "", 2.0).await;
    p.publish(GOLD, &gold_record(5, 5, 2 * MIN, 7)).await;

    let out = read_topic(
        &p.broker.address,
        ALERTS,
        2,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("alerts");
    let got: Vec<(String, i64, String)> = p
        .decode(ALERTS, &out)
        .iter()
        .map(|a| {
            (
                a["payload"]["rule_id"].as_str().unwrap_or("").to_string(),
                a["payload"]["rule_version"].as_i64().unwrap_or(-1),
                a["payload"]["triggered_by_event_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("big".to_string(), 0, uuid(3)),
            ("small".to_string(), 2, uuid(5))
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gold_totals_stay_exact_and_single_across_sigkills() {
    let p = Pipeline::start().await;
    let orgs = [21i64, 22, 23];
    // 60 windows' worth of events per org, 20 per window, value = window index.
    let mut events = Vec::new();
    let mut n = 0u64;
    for w in 0..60i64 {
        for i in 0..20i64 {
            for org in orgs {
                n += 1;
                let t = w * MIN + i * 2_500;
                let mut e = envelope(&uuid(n), org, T0 + t);
                e["payload"] = json!({
                    "entity": {"entity_type": "case", "entity_id": format!("C{}", i % 7), "org_id": org,
                               "source_system": "v4", "updated_at": T0 + t},
                    "change": "UPDATED", "attributes": {},
                    "measurements": [{"name": "load", "value": w as f64, "unit": null}],
                    "quality_warnings": [], "bronze_event_id": uuid(n)
                });
                events.push(e);
            }
        }
    }
    // Closes every window above: watermark = 61.5 min - 10 s.
    for org in orgs {
        n += 1;
        let mut e = envelope(&uuid(n), org, T0 + 62 * MIN);
        e["payload"] = json!({
            "entity": {"entity_type": "case", "entity_id": "flush", "org_id": org,
                       "source_system": "v4", "updated_at": T0},
            "change": "UPDATED", "attributes": {}, "measurements": [],
            "quality_warnings": [], "bronze_event_id": uuid(n)
        });
        events.push(e);
    }
    let mut gold = p.worker_of(GOLD_BIN, &[("MEDALLION__BATCH__MAX_RECORDS", "100".into())]);
    wait(&gold).await;
    let chunk = events.len() / 4;
    for (round, part) in events.chunks(chunk).enumerate() {
        for e in part {
            p.publish(SILVER, e).await;
        }
        if round < 3 {
            // Kill mid-stream, once some windows are out.
            read_until(
                &p.broker.address,
                GOLD,
                |m| m.len() > round * 20,
                Duration::ZERO,
                Duration::from_secs(120),
            )
            .await
            .expect("some output");
            gold.kill();
            gold = p.worker_of(GOLD_BIN, &[("MEDALLION__BATCH__MAX_RECORDS", "100".into())]);
            wait(&gold).await;
        }
    }
    let expected_keys = orgs.len() * 60 * 2;
    let out = read_until(
        &p.broker.address,
        GOLD,
        |m| {
            m.iter()
                .filter_map(|m| m.payload().map(<[u8]>::to_vec))
                .collect::<BTreeSet<_>>()
                .len()
                >= expected_keys
        },
        Duration::from_secs(3),
        Duration::from_secs(240),
    )
    .await
    .expect("gold output");
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for record in p.decode(GOLD, &out) {
        by_key
            .entry(record["event_id"].as_str().unwrap_or("").to_string())
            .or_default()
            .insert(record["payload"].to_string());
    }
    assert_eq!(by_key.len(), expected_keys, "every window, no extra key");
    for (key, versions) in &by_key {
        assert_eq!(
            versions.len(),
            1,
            "window {key} was emitted with different totals: {versions:?}"
        );
    }
    for record in p.decode(GOLD, &out) {
        let pl = &record["payload"];
        let w = (pl["window_start"].as_i64().unwrap_or(0) - T0) / MIN;
        assert_eq!(pl["count"], json!(20), "{record}");
        let want_sum = if pl["metric"] == "load" {
            20.0 * w as f64
        } else {
            20.0
        };
        assert_eq!(pl["sum"].as_f64(), Some(want_sum), "{record}");
        assert_eq!(pl["distinct_entities"], json!(7));
    }
    let dlq = read_topic(
        &p.broker.address,
        "silver.data.processed.dlq",
        0,
        Duration::from_secs(1),
        Duration::from_secs(10),
    )
    .await
    .expect("DLQ read");
    assert!(
        dlq.is_empty(),
        "no event is late after restarts: {:?}",
        reasons(&dlq)
    );
}

/// Waits until `/metrics` shows `name` (with a label containing `label`) at least `at_least`.
pub async fn wait_metric(worker: &WorkerProcess, name: &str, label: &str, at_least: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = worker.metrics().await.unwrap_or_default();
        let value = metric_sum_where(&text, name, label);
        if value >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{{{label}}} never reached {at_least}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes `text` to a fresh file and returns its path.
fn tempfile_with(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.yaml", medallion_tests::unique("rules")));
    std::fs::write(&path, text).expect("writes");
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fail_batch_expectation_stops_silver_without_committing_the_batch() {
    let p = Pipeline::start().await;
    let config = tempfile_with(
        "stage:\n  expectations:\n    - {name: org_13_is_blocked, expr: 'org_id <> 13', action: fail_batch}\n",
    );
    let port = medallion_tests::free_port().expect("port");
    let start = |config: &std::path::Path| {
        std::process::Command::new(SILVER_BIN)
            .arg("--config")
            .arg(config)
            .env("MEDALLION__KAFKA__BOOTSTRAP", &p.broker.address)
            .env("MEDALLION__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .env("MEDALLION__REGISTRY__URL", &p.registry.address)
            .env("MEDALLION__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "MEDALLION__CONTRACTS__HOME",
                medallion_tests::workspace_root(),
            )
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("silver starts")
    };
    let mut child = start(&config);
    p.publish(
        BRONZE,
        &bronze_case(1, 13, 1_000, ("C1", 100, 0), 2.0, "ann"),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("status") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "silver did not stop on a fail_batch expectation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success());
    assert!(stderr.contains("org_13_is_blocked"), "{stderr}");
    // Nothing of the batch went out, and its offset was not committed: with the expectation
    // relaxed, a restart processes the same event.
    let relaxed = tempfile_with("stage:\n  expectations: []\n");
    let mut child = start(&relaxed);
    let out = read_topic(
        &p.broker.address,
        SILVER,
        1,
        Duration::from_secs(2),
        Duration::from_secs(90),
    )
    .await
    .expect("silver output after the fix");
    let _ = child.kill();
    let _ = child.wait();
    let rows = p.decode(SILVER, &out);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["payload"]["bronze_event_id"], uuid(1));
}
