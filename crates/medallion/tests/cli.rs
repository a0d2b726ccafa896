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
        vec!["drift", "check"],
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
    let drift = |extra: &[&'static str]| {
        let mut args = vec![
            "drift",
            "check",
            b[0],
            b[1],
            "--registry",
            "http://127.0.0.1:9",
            "--snapshot",
            "/nonexistent/snapshot.jsonl",
        ];
        args.extend_from_slice(extra);
        args
    };
    fails_saying(&drift(&[]), "/nonexistent/snapshot.jsonl");
    fails_saying(
        &drift(&["--entity-type", "spaceship"]),
        "no feed of feeds.yaml has entity type `spaceship`",
    );
    fails_saying(
        &drift(&["--entity-type", "lead"]),
        "declares no entity.canonical",
    );
}

/// Runs `medallion args` with `env`, killing it after `limit`: a failure must come as an
/// answer, not as a hang.
fn medallion_within(args: &[&str], env: &[(&str, &str)], limit: std::time::Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args(args)
        .envs(env.iter().copied())
        .env(
            "MEDALLION_HOME",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../.."),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("medallion starts");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{args:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn kafka_properties_reach_the_admin_client_and_a_bad_one_is_named() {
    let broker = medallion_tests::broker().expect("broker starts");
    let limit = std::time::Duration::from_secs(20);
    // The broker answers: without the bad property the plan is read.
    let ok = medallion_within(
        &[
            "topics",
            "plan",
            "--bootstrap",
            &broker.address,
            "--max-replication",
            "1",
            "-X",
            "client.id=medallion-cli-test",
        ],
        &[],
        limit,
    );
    assert!(
        ok.status.success(),
        "plan on a reachable broker: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("topics to change"));
    // The same broker with a SASL mechanism librdkafka does not know: an answer naming it.
    for command in [["topics", "plan"], ["topics", "apply"]] {
        let out = medallion_within(
            &[
                command[0],
                command[1],
                "--bootstrap",
                &broker.address,
                "--max-replication",
                "1",
                "-X",
                "security.protocol=SASL_PLAINTEXT",
                "-X",
                "sasl.mechanisms=NO-SUCH-MECHANISM",
            ],
            &[],
            limit,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command:?} with a bad mechanism");
        assert!(
            stderr.contains("sasl.mechanisms") && stderr.contains("NO-SUCH-MECHANISM"),
            "{command:?}: the property is not named: {stderr}"
        );
    }
    // MEDALLION_KAFKA_PROPERTIES reaches the tools the same way.
    let out = medallion_within(
        &["lag", "--bootstrap", &broker.address],
        &[(
            "MEDALLION_KAFKA_PROPERTIES",
            "security.protocol=SASL_PLAINTEXT,sasl.mechanisms=NO-SUCH-MECHANISM",
        )],
        limit,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("sasl.mechanisms"), "{stderr}");
}

#[test]
fn a_property_the_runtime_owns_stops_every_kafka_command_with_its_name() {
    let b = ["--bootstrap", "127.0.0.1:9"];
    for (command, property) in [
        (vec!["topics", "plan"], "bootstrap.servers=elsewhere:9092"),
        (vec!["lag"], "group.id=mine"),
        (
            vec!["capture", "--topic", "t", "--out", "/tmp/x"],
            "enable.auto.commit=true",
        ),
        (
            vec!["replay", "--topic", "t", "--file", "/tmp/x"],
            "enable.idempotence=false",
        ),
        (
            vec!["dlq", "inspect", "--topic", "connector.data.raw"],
            "enable.partition.eof=false",
        ),
        (
            vec!["dlq", "redrive", "--topic", "connector.data.raw"],
            "acks=1",
        ),
    ] {
        let mut args = command.clone();
        args.extend([b[0], b[1], "-X", property]);
        let key = property.split('=').next().expect("key");
        fails_saying(&args, &format!("`{key}`"));
    }
}
