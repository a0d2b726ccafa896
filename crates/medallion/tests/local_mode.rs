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
    let output = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(["demo", "--events", "20000"])
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
}
