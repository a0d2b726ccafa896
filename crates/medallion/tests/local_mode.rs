//! The README's first command, end to end: `medallion demo` on the embedded broker and
//! registry runs every stage and accounts for every event.

use std::process::Command;

/// The number on a summary line after `label`, e.g. `in` in `bronze   in   20000  out ...`.
fn number_after(line: &str, label: &str) -> u64 {
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == label {
            return words
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(u64::MAX);
        }
    }
    u64::MAX
}

#[test]
fn the_local_mode_runs_every_layer_and_accounts_for_every_event() {
    let store = std::env::temp_dir().join(format!("medallion-demo-audit-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(["demo", "--events", "20000", "--audit-store"])
        .arg(&store)
        .env(
            "MEDALLION_HOME",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../.."),
        )
        .output()
        .expect("medallion demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |layer: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(layer) && l.contains(" in "))
            .unwrap_or_else(|| panic!("no {layer} line in:\n{stdout}"))
            .to_string()
    };
    let (bronze, silver, gold, rules) =
        (line("bronze"), line("silver"), line("gold"), line("rules"));
    // 20 000 produced: 200 malformed and 100 redelivered duplicates never reach silver.
    assert_eq!(number_after(&bronze, "in"), 20_000, "{stdout}");
    assert_eq!(number_after(&bronze, "dlq"), 200, "{stdout}");
    assert_eq!(number_after(&bronze, "duplicates"), 100, "{stdout}");
    assert_eq!(number_after(&bronze, "out"), 19_700, "{stdout}");
    // Each layer consumed everything the one before wrote.
    assert_eq!(number_after(&silver, "in"), 19_700, "{stdout}");
    assert_eq!(
        number_after(&silver, "out") + number_after(&silver, "dlq"),
        19_700,
        "{stdout}"
    );
    assert_eq!(
        number_after(&gold, "in"),
        number_after(&silver, "out"),
        "{stdout}"
    );
    assert!(
        number_after(&gold, "out") > 0,
        "windows were emitted:\n{stdout}"
    );
    assert_eq!(
        number_after(&rules, "in"),
        number_after(&gold, "out"),
        "{stdout}"
    );
    assert!(
        number_after(&rules, "out") > 0,
        "some rules fired:\n{stdout}"
    );
    assert!(stdout.contains("drift"), "{stdout}");
    assert!(stdout.contains("alerts fired"), "{stdout}");

    // Every alert reached the signed webhook, and its signature checked out.
    let alerts = number_after(&rules, "out");
    let notifications = line_with(&stdout, "notifications");
    assert_eq!(
        number_after(&notifications, "delivered"),
        alerts,
        "{stdout}"
    );
    assert_eq!(number_after(&notifications, "dead-lettered"), 0, "{stdout}");
    assert_eq!(number_after(&notifications, "verified"), alerts, "{stdout}");
    assert_eq!(number_after(&notifications, "rejected"), 0, "{stdout}");
    // The audit store holds every audit event: one per dead letter among them.
    let audit = line_with(&stdout, "audit store");
    let audited = number_after(&audit, "store");
    assert!(audited > 0, "{stdout}");
    assert!(
        audit.contains(&format!("from {audited} audit events")),
        "{stdout}"
    );
    let query = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(["audit", "query", "--store"])
        .arg(&store)
        .arg("SELECT action, count(*) AS n, count(DISTINCT event_id) AS d FROM audit_events WHERE action = 'dlq.routed' GROUP BY action")
        .output()
        .expect("query runs");
    let table = String::from_utf8_lossy(&query.stdout);
    assert!(
        query.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&query.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.contains("dlq.routed"))
        .unwrap_or_else(|| panic!("no dlq.routed row:\n{table}"));
    let cells: Vec<&str> = row
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells, ["dlq.routed", "200", "200"], "{table}");
    let bad = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(["audit", "query", "--store"])
        .arg(&store)
        .arg("SELECT nope FROM audit_events")
        .output()
        .expect("query runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope"));
    let _ = std::fs::remove_dir_all(&store);
}

/// The summary line that starts with `label`.
fn line_with(stdout: &str, label: &str) -> String {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in:\n{stdout}"))
        .to_string()
}
