//! notification-sender as a separate process on a real broker, delivering to a real HTTP server
//! that fails, stalls and recovers on cue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use medallion_runtime::dlq::{header, header_value};
use medallion_stages::notify::{dlq_header, signature};
use medallion_tests::{read_until, HookMode, WebhookReceiver};
use rdkafka::message::Message;
use serde_json::{json, Value as Json};

use crate::bronze::Pipeline;

const BIN: &str = env!("CARGO_BIN_EXE_notification-sender");
const ALERTS: &str = "rules.alerts.triggered";
const SECRET: &str = "s3cret-for-tests";

fn alert(n: u64, org: i64, severity: &str, classification: &str) -> Json {
    let id = format!("00000000-0000-4000-9000-{n:012}");
    json!({
        "event_id": id, "event_type": "rules.alert.triggered", "event_version": "1.0.0",
        "timestamp": 1_700_000_000_000i64 + n as i64, "source": {"service": "rule-evaluator", "instance": "t"},
        "correlation_id": format!("corr-{n}"), "org_id": org, "trace_id": null,
        "classification": classification,
        "payload": {
            "rule_id": "lead-spike", "rule_version": 1, "description": "Lead spike",
            "severity": severity, "metric": "events.lead",
            "window_start": 1_700_000_000_000i64, "window_end": 1_700_000_060_000i64,
            "observed_value": 12.0, "threshold": 10.0,
            "message": format!("owner alice@example.com saw {n}"),
            "triggered_by_event_id": format!("gold-{n}"), "suppression_window_ms": 0
        }
    })
}

/// Waits until `check` holds, polling; fails with `what` after `within`.
async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn keys(deliveries: &[medallion_tests::HookDelivery]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for d in deliveries {
        *out.entry(d.idempotency_key.clone()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn alerts_reach_every_channel_once_or_the_dlq_across_failures_and_a_restart() {
    let p = Pipeline::start().await;
    let hooks = WebhookReceiver::start().await.expect("receiver");
    // Two 429s asking for a 2 s pause: longer than the first backoff steps (0.2 s, 1 s).
    hooks.set(
        "flaky",
        HookMode::FailFirst {
            status: 429,
            times: 2,
            body: "slow down".into(),
            retry_after: Some(2),
        },
    );
    hooks.set(
        "broken",
        HookMode::Reject {
            status: 404,
            body: "no such hook".into(),
        },
    );
    hooks.set("stalled", HookMode::Stall);

    let dir = std::env::temp_dir().join(medallion_tests::unique("notify"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("notification-sender.yaml");
    let webhook = |name: &str, timeout: u64| {
        format!(
            "    {name}: {{ type: webhook, url: \"{}\", secret_env: TEST_HOOK_SECRET, timeout_ms: {timeout} }}\n",
            hooks.url(name)
        )
    };
    std::fs::write(
        &config,
        format!(
            "retry:\n  backoff_ms: [200, 1000, 3000, 8000]\nstage:\n  shutdown_grace_ms: 500\n  channels:\n{}{}{}{}    log: {{ type: log }}\n  routes:\n    - {{ orgs: [1], channels: [healthy, flaky, stalled] }}\n    - {{ orgs: [2], channels: [healthy, broken] }}\n    - {{ min_severity: CRITICAL, channels: [log] }}\n",
            webhook("healthy", 2_000),
            webhook("flaky", 2_000),
            webhook("broken", 2_000),
            webhook("stalled", 400),
        ),
    )
    .expect("config");
    let env = [
        (
            "RUST_LOG",
            "warn,medallion_stages::notify=info,medallion_runtime::worker=info".to_string(),
        ),
        ("MEDALLION_CONFIG", config.display().to_string()),
        ("TEST_HOOK_SECRET", SECRET.to_string()),
    ];

    let mut worker = p.worker_of(BIN, &env);
    worker
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("ready");
    let mut sent = Vec::new();
    for n in 0..10u64 {
        let org = if n < 6 { 1 } else { 2 };
        let classification = if n == 3 { "restricted" } else { "internal" };
        let severity = if n % 2 == 0 { "CRITICAL" } else { "HIGH" };
        let a = alert(n, org, severity, classification);
        p.publish(ALERTS, &a).await;
        sent.push(a);
    }
    let id = |a: &Json| a["event_id"].as_str().expect("id").to_string();
    let org1: Vec<String> = sent.iter().filter(|a| a["org_id"] == 1).map(id).collect();

    // A stalled endpoint holds back nobody else: healthy and flaky get everything meanwhile.
    eventually("healthy has all alerts", Duration::from_secs(60), || {
        hooks.accepted("healthy").len() >= 10
    })
    .await;
    eventually("flaky has org 1's alerts", Duration::from_secs(60), || {
        keys(&hooks.accepted("flaky")).len() >= org1.len()
    })
    .await;
    assert!(hooks.accepted("stalled").is_empty());
    for a in &org1 {
        let times = hooks.attempt_times("flaky", a);
        assert_eq!(times.len(), 3, "two 429s, then accepted");
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(1_900),
                "Retry-After: 2 honoured ({gap:?})"
            );
        }
    }

    // The worker dies while the stalled endpoint still retries; then the endpoint recovers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.kill();
    hooks.set("stalled", HookMode::Accept);
    let worker = p.worker_of(BIN, &env);
    worker
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("ready again");
    eventually(
        "stalled has org 1's alerts",
        Duration::from_secs(60),
        || keys(&hooks.accepted("stalled")).len() >= org1.len(),
    )
    .await;

    // Org 2's alerts are dead-lettered once each, with the endpoint's answer.
    let dlq = read_until(
        &p.broker.address,
        "rules.alerts.triggered.dlq",
        |m| m.len() >= 4,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await
    .expect("dead letters");
    let mut dead: Vec<String> = p
        .decode(ALERTS, &dlq)
        .iter()
        .map(|a| a["event_id"].as_str().expect("id").to_string())
        .collect();
    dead.sort();
    let mut org2: Vec<String> = sent.iter().filter(|a| a["org_id"] == 2).map(id).collect();
    org2.sort();
    assert_eq!(dead, org2);
    for m in &dlq {
        let h = m.headers().expect("headers");
        assert_eq!(
            header_value(h, header::ERROR_REASON).as_deref(),
            Some("webhook_rejected")
        );
        assert_eq!(
            header_value(h, dlq_header::CHANNEL).as_deref(),
            Some("broken")
        );
        assert_eq!(
            header_value(h, dlq_header::HTTP_STATUS).as_deref(),
            Some("404")
        );
        assert_eq!(
            header_value(h, dlq_header::RESPONSE).as_deref(),
            Some("no such hook")
        );
        assert_eq!(
            header_value(h, header::ORIGINAL_TOPIC).as_deref(),
            Some(ALERTS)
        );
    }

    // No healthy endpoint saw an alert twice, across the restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let healthy = keys(&hooks.accepted("healthy"));
    assert_eq!(healthy.len(), 10);
    assert!(healthy.values().all(|n| *n == 1), "{healthy:?}");
    let flaky = keys(&hooks.accepted("flaky"));
    assert_eq!(flaky.keys().cloned().collect::<Vec<_>>(), {
        let mut o = org1.clone();
        o.sort();
        o
    });
    assert!(flaky.values().all(|n| *n == 1), "{flaky:?}");

    // Bodies are signed, carry the alert, and the restricted one is redacted.
    for d in hooks.accepted("healthy") {
        let timestamp: u64 = d.timestamp.parse().expect("timestamp");
        assert_eq!(
            d.signature,
            signature(SECRET.as_bytes(), timestamp, &d.body)
        );
        let body: Json = serde_json::from_slice(&d.body).expect("JSON body");
        assert_eq!(body["event_id"].as_str(), Some(d.idempotency_key.as_str()));
        let text = String::from_utf8_lossy(&d.body);
        if body["classification"] == "restricted" {
            assert_eq!(body["redacted"], true);
            assert!(!text.contains("alice@example.com"), "{text}");
        } else {
            assert!(text.contains("alice@example.com"), "{text}");
            assert_eq!(body["payload"]["rule_id"], "lead-spike");
        }
    }

    // The redaction is on the audit trail.
    let redactions: Vec<Json> = p
        .read_matching(
            "audit.events",
            |e| e["payload"]["action"] == "notification.redacted",
            1,
            Duration::from_millis(10),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(redactions[0]["payload"]["resource_id"], id(&sent[3]));
    let _ = std::fs::remove_dir_all(&dir);
}
