//! Windowing, lateness and restart semantics in process (broker tests are in `tests/`).

use medallion_runtime::worker::{OutputEvent, Stage};
use serde_json::{json, Value as Json};

use super::{Gold, GoldConfig, GROUP, LATE};
use crate::testkit::{arrow_schema, contract, input_batch, offline_setup};

const MINUTE: i64 = 60_000;

fn silver(id: &str, org: i64, t: i64, entity: &str, value: f64, change: &str) -> Json {
    json!({
        "event_id": id, "event_type": "case.sync.v1", "event_version": "1.0.0",
        "timestamp": t, "source": {"service": "s", "instance": "i"},
        "correlation_id": "c", "org_id": org, "trace_id": format!("trace-{id}"),
        "classification": "internal",
        "payload": {
            "entity": {"entity_type": "case", "entity_id": entity, "org_id": org,
                       "source_system": "v4", "updated_at": t},
            "change": change, "attributes": {},
            "measurements": [{"name": "case.severity", "value": value, "unit": null}],
            "quality_warnings": [], "bronze_event_id": id
        }
    })
}

async fn gold() -> Gold {
    let silver_contract = contract("silver/data-processed.avsc");
    let gold_contract = contract("gold/data-ready.avsc");
    let (_, input_schema) = input_batch(
        &silver_contract,
        &[silver("x", 1, 0, "e", 1.0, "CREATED")],
        0,
        0,
        0,
    );
    let setup = offline_setup(GROUP, input_schema, arrow_schema(&gold_contract));
    Gold::new(
        setup,
        GoldConfig {
            window_ms: MINUTE,
            allowed_lateness_ms: 10_000,
            idle_close_ms: None,
        },
    )
    .await
    .expect("plans")
}

/// The emitted windows, through the output contract and back (as the runtime encodes them).
fn decode(events: &[OutputEvent]) -> Vec<Json> {
    let c = contract("gold/data-ready.avsc");
    events
        .iter()
        .map(|e| {
            assert_eq!(e.key, e.event["org_id"].to_string(), "keyed by org");
            let binary = medallion_contracts::json::to_avro_binary(&e.event, &c.schema)
                .expect("a gold record");
            medallion_contracts::json::from_avro_binary(&binary, &c.schema, &c.schema)
                .expect("gold record")
        })
        .collect()
}

/// (org, metric, window_start, count, sum, min, max, distinct) of emitted windows.
type Summary = (i64, String, i64, i64, f64, f64, f64, i64);

fn summary(rows: &[Json]) -> Vec<Summary> {
    rows.iter()
        .map(|r| {
            let p = &r["payload"];
            (
                r["org_id"].as_i64().unwrap_or(-1),
                p["metric"].as_str().unwrap_or("").to_string(),
                p["window_start"].as_i64().unwrap_or(-1),
                p["count"].as_i64().unwrap_or(-1),
                p["sum"].as_f64().unwrap_or(f64::NAN),
                p["min"].as_f64().unwrap_or(f64::NAN),
                p["max"].as_f64().unwrap_or(f64::NAN),
                p["distinct_entities"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

async fn feed(
    stage: &mut Gold,
    events: &[Json],
    first_offset: i64,
) -> (Vec<Json>, Vec<(u32, String)>) {
    let (batch, _) = input_batch(
        &contract("silver/data-processed.avsc"),
        events,
        0,
        first_offset,
        0,
    );
    let out = crate::testkit::process(stage, batch)
        .await
        .expect("processes");
    let rejected = out
        .rejected
        .iter()
        .map(|(r, f)| (*r, f.reason.clone()))
        .collect();
    (decode(&out.events), rejected)
}

fn stream() -> Vec<Json> {
    vec![
        silver("a", 7, 10_000, "C1", 2.0, "CREATED"),
        silver("b", 7, 20_000, "C2", 4.0, "CREATED"),
        silver("c", 8, 30_000, "C9", 1.0, "CREATED"),
        silver("d", 7, 50_000, "C1", 3.0, "UPDATED"),
        silver("s", 7, 55_000, "C1", 100.0, "STALE"),
        // Org 7's watermark 65 s - 10 s = 55 s: its first window [0, 60 s) stays open.
        silver("e", 7, 65_000, "C3", 5.0, "CREATED"),
        // Org 8's watermark 65 s closes org 8's [0, 60 s) only: watermarks are per org.
        silver("f", 8, 75_000, "C9", 6.0, "UPDATED"),
        // Org 7's own watermark 65 s closes its [0, 60 s).
        silver("i", 7, 75_000, "C3", 7.0, "UPDATED"),
        // In org 7's closed window: late.
        silver("g", 7, 59_000, "C1", 9.0, "UPDATED"),
        silver("h", 7, 130_000, "C4", 1.0, "CREATED"),
    ]
}

#[tokio::test]
async fn windows_close_once_on_the_watermark_and_late_events_are_rejected() {
    let mut stage = gold().await;
    let (emitted, rejected) = feed(&mut stage, &stream(), 0).await;
    assert_eq!(rejected, vec![(8, LATE.to_string())]);
    let got = summary(&emitted);
    let want = vec![
        (7, "case.severity".to_string(), 0, 3, 9.0, 2.0, 4.0, 2),
        (7, "events.case".to_string(), 0, 3, 3.0, 1.0, 1.0, 2),
        (8, "case.severity".to_string(), 0, 1, 1.0, 1.0, 1.0, 1),
        (8, "events.case".to_string(), 0, 1, 1.0, 1.0, 1.0, 1),
        // Org 7's watermark 120 s closes its [60 s, 120 s); org 8's (at 65 s) stays open.
        (7, "case.severity".to_string(), MINUTE, 2, 12.0, 5.0, 7.0, 1),
        (7, "events.case".to_string(), MINUTE, 2, 2.0, 1.0, 1.0, 1),
    ];
    assert_eq!(got, want);
    let first = &emitted[0];
    assert_eq!(
        first["event_id"],
        super::window_event_id(7, "case.severity", 0)
    );
    assert_eq!(first["payload"]["avg"], json!(3.0));
    assert_eq!(first["trace_id"], "trace-a");
    // Nothing more to close without newer events.
    let (again, _) = feed(&mut stage, &[], 9).await;
    assert!(again.is_empty());
}

#[tokio::test]
async fn a_restart_from_the_committed_position_re_emits_nothing_different() {
    let events = stream();
    // Reference: one uninterrupted run.
    let mut reference = gold().await;
    let (all, _) = feed(&mut reference, &events, 0).await;

    // Crash after the first 8 events: restart from what would have been committed.
    let mut first = gold().await;
    let (before, _) = feed(&mut first, &events[..8], 0).await;
    let (commit, metadata) = first.position(0, 8);
    assert!(
        commit < 8,
        "open windows hold the commit back (committed {commit})"
    );
    let mut second = gold().await;
    second.assign(0, metadata).await.expect("restores");
    let (after, rejected) = feed(&mut second, &events[commit as usize..], commit).await;
    assert_eq!(rejected, vec![(8 - commit as u32, LATE.to_string())]);
    let mut combined = summary(&before);
    combined.extend(summary(&after));
    assert_eq!(
        combined,
        summary(&all),
        "each window once, with the same totals"
    );
}

#[tokio::test]
async fn an_org_held_back_behind_its_backlog_loses_no_event_to_late_and_an_idle_org_closes() {
    let mut stage = gold().await;
    // Org 8's newer events come first (its records were not held back); org 7's older ones,
    // held back behind its own backlog, after them.
    let mut events = vec![
        silver("n1", 8, 600_000, "C1", 1.0, "CREATED"),
        silver("n2", 8, 700_000, "C1", 1.0, "UPDATED"),
    ];
    for i in 0..5 {
        events.push(silver(
            &format!("o{i}"),
            7,
            10_000 * i,
            "C2",
            1.0,
            "CREATED",
        ));
    }
    let (emitted, rejected) = feed(&mut stage, &events, 0).await;
    assert!(rejected.is_empty(), "nothing late: {rejected:?}");
    let orgs: Vec<i64> = emitted
        .iter()
        .map(|e| e["org_id"].as_i64().unwrap_or(0))
        .collect();
    assert!(
        orgs.iter().all(|o| *o == 8),
        "org 7's window is still open: {orgs:?}"
    );

    // Idle (wall clock) past idle_close_ms: org 7 follows the partition and its window closes.
    let mut stage = Gold::new(
        offline_setup(
            GROUP,
            input_batch(
                &contract("silver/data-processed.avsc"),
                &events[..1],
                0,
                0,
                0,
            )
            .1,
            arrow_schema(&contract("gold/data-ready.avsc")),
        ),
        GoldConfig {
            window_ms: MINUTE,
            allowed_lateness_ms: 10_000,
            idle_close_ms: Some(0),
        },
    )
    .await
    .expect("plans");
    feed(&mut stage, &events, 0).await;
    let mut out = medallion_runtime::worker::Collector::new();
    stage.settle(false, &mut out).await.expect("settles");
    let closed: Vec<i64> = out
        .events()
        .iter()
        .map(|e| e.event["org_id"].as_i64().unwrap_or(0))
        .collect();
    assert!(
        closed.contains(&7),
        "the idle org's window closed: {closed:?}"
    );
}
