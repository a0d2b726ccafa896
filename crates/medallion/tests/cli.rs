//! The operator CLI's help, error messages and exit codes (no broker needed: each of these
//! fails before connecting).

use std::process::{Command, Output};

fn medallion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(args)
        .env(
            "MEDALLION_HOME",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../.."),
        )
        .output()
        .expect("medallion runs")
}

fn fails_saying(args: &[&str], needle: &str) {
    let out = medallion(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        stderr.contains(needle),
        "{args:?}: `{needle}` not in: {stderr}"
    );
}

#[test]
fn every_command_has_help() {
    for command in [
        vec!["topics", "plan"],
        vec!["topics", "apply"],
        vec!["schemas", "check"],
        vec!["schemas", "register"],
        vec!["capture"],
        vec!["replay"],
        vec!["lag"],
        vec!["dlq", "inspect"],
        vec!["dlq", "redrive"],
        vec!["audit", "query"],
        vec!["audit", "retention"],
        vec!["demo"],
    ] {
        let mut args = command.clone();
        args.push("--help");
        let out = medallion(&args);
        assert!(out.status.success(), "{command:?} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: medallion"),
            "{command:?}"
        );
    }
}

#[test]
fn bad_input_is_named_with_a_failing_exit_code() {
    let b = ["--bootstrap", "127.0.0.1:9"];
    fails_saying(
        &["dlq", "redrive", b[0], b[1], "--topic", "no.such.topic"],
        "no.such.topic",
    );
    fails_saying(
        &[
            "dlq",
            "redrive",
            b[0],
            b[1],
            "--topic",
            "connector.data.raw",
            "--since",
            "yesterday",
        ],
        "yesterday",
    );
    fails_saying(
        &["lag", b[0], b[1], "--group", "no-such-group"],
        "no-such-group",
    );
    fails_saying(
        &[
            "replay",
            b[0],
            b[1],
            "--topic",
            "t",
            "--file",
            "/nonexistent/x.cap",
        ],
        "/nonexistent/x.cap",
    );
    fails_saying(
        &[
            "capture", b[0], b[1], "--topic", "t", "--out", "/x", "-X", "novalue",
        ],
        "novalue",
    );
    fails_saying(&["replay", "--topic", "t", "--file", "f"], "--bootstrap");
    fails_saying(
        &["audit", "query", "--store", "ftp://x", "SELECT 1"],
        "ftp://x",
    );
    fails_saying(&["audit", "retention", "--days", "many"], "many");
}
