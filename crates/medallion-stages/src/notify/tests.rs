use serde_json::json;

use super::*;

fn config(yaml: &str) -> NotifyConfig {
    serde_yaml_ng::from_str(yaml).expect("valid config")
}

#[test]
fn routes_by_org_and_severity_each_channel_once() {
    let c = config(
        r#"
channels:
  ops: { type: webhook, url: "http://127.0.0.1:1/ops", secret: s }
  log: { type: log }
routes:
  - { orgs: [1, 2], min_severity: HIGH, channels: [ops, log] }
  - { channels: [log] }
"#,
    );
    assert_eq!(c.channels_for(1, Some(Severity::Critical)), ["ops", "log"]);
    assert_eq!(c.channels_for(1, Some(Severity::Medium)), ["log"]);
    assert_eq!(c.channels_for(3, Some(Severity::Critical)), ["log"]);
    assert_eq!(c.channels_for(2, None), ["log"]);
}

#[test]
fn bad_channels_and_routes_are_named() {
    let err = |yaml: &str| {
        config(yaml)
            .build_channels()
            .expect_err("invalid")
            .to_string()
    };
    let e = err("channels: { a: { type: webhook, url: ftp://x, secret: s } }\nroutes: []");
    assert!(e.contains("stage.channels.a.url"), "{e}");
    let e = err("channels: { a: { type: webhook, url: http://x } }\nroutes: []");
    assert!(
        e.contains("stage.channels.a") && e.contains("secret"),
        "{e}"
    );
    let e = err("channels: { a: { type: webhook, url: http://x, secret_env: MEDALLION_TEST_UNSET_SECRET } }\nroutes: []");
    assert!(e.contains("MEDALLION_TEST_UNSET_SECRET"), "{e}");
    let e = err("channels: { log: { type: log } }\nroutes: [{ channels: [pager] }]");
    assert!(e.contains("`pager`"), "{e}");
    let typo = serde_yaml_ng::from_str::<NotifyConfig>("channels: { a: { type: webhok } }");
    assert!(typo
        .expect_err("unknown type")
        .to_string()
        .contains("webhok"));
}

#[test]
fn answers_are_classified_for_retry_or_dead_letter() {
    assert_eq!(classify(204, None, ""), Attempt::Ok);
    assert!(matches!(classify(503, None, ""), Attempt::Transient { .. }));
    assert_eq!(
        classify(429, Some("7"), ""),
        Attempt::Transient {
            message: "429 Too Many Requests".into(),
            not_before: Some(Duration::from_secs(7)),
        }
    );
    let long = "x".repeat(2_000);
    match classify(404, None, &long) {
        Attempt::Permanent { status, excerpt } => {
            assert_eq!(status, 404);
            assert!(excerpt.chars().count() <= 513, "{}", excerpt.len());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn signature_is_hmac_sha256_of_timestamp_and_body() {
    // Independent reference: `printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret`.
    assert_eq!(
        signature(b"secret", 1_700_000_000, br#"{"a":1}"#),
        "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
    );
    assert_ne!(
        signature(b"other", 1_700_000_000, br#"{"a":1}"#),
        signature(b"secret", 1_700_000_000, br#"{"a":1}"#)
    );
}

#[test]
fn restricted_alerts_keep_only_identifiers() {
    let alert = json!({
        "event_id": "e", "event_type": "rules.alert.triggered", "timestamp": 1, "org_id": 7,
        "classification": "restricted", "correlation_id": "c",
        "payload": {"rule_id": "r", "severity": "HIGH", "window_start": 0, "window_end": 60000,
                    "message": "owner alice@example.com", "description": "d", "observed_value": 3.0}
    });
    let body = redact(&alert).to_string();
    assert!(!body.contains("alice"), "{body}");
    assert!(!body.contains("observed_value"), "{body}");
    assert!(body.contains(r#""rule_id":"r""#) && body.contains(r#""redacted":true"#));
}

#[test]
fn ledger_entries_round_trip_and_several_failures_make_one_dead_letter() {
    for e in [Entry::Delivered, Entry::DeadLettered(42)] {
        assert_eq!(Entry::decode(&e.encode()), Some(e));
    }
    assert_eq!(Entry::decode(b"garbage"), None);
    let a = RecordFailure::poison("webhook_rejected", "a answered HTTP 404")
        .with_header(dlq_header::CHANNEL, "a");
    let b = RecordFailure::transient("webhook_unavailable", "b timed out")
        .with_header(dlq_header::CHANNEL, "b");
    let r = resolve((3, 9), vec![(a, 1), (b, 5)]);
    assert_eq!((r.partition, r.offset, r.attempts), (3, 9, 5));
    let f = r.failure.expect("dead letter");
    assert!(f.message.contains("404") && f.message.contains("timed out"));
    assert!(f
        .headers
        .contains(&(dlq_header::CHANNEL.to_string(), "a,b".to_string())));
}
