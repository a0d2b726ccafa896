//! Merge rules (the broker tests in `tests/` cover the stage end to end).

use std::path::Path;

use medallion_runtime::state::KeyedState;

use super::state::{entity_key, Change, EntityState, Merge, Outcome};

/// A merge over a store in `dir`, with partitions `partitions` taken as the disk holds them.
fn merge_in(dir: &Path, partitions: &[i32]) -> Merge {
    let store =
        medallion_runtime::store::StateStore::open(medallion_runtime::store::StoreOptions {
            dir: dir.join("state"),
            identity: "silver-processor".into(),
            cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
        })
        .expect("store");
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain("127.0.0.1:9").expect("connection");
    let state = KeyedState::new(
        store,
        kafka,
        "silver-processor.changelog",
        &Default::default(),
    );
    let mut merge = Merge::new("v4".into(), state);
    for p in partitions {
        merge.adopt(*p).expect("adopt");
    }
    merge
}

fn merge() -> (tempfile::TempDir, Merge) {
    let dir = tempfile::tempdir().expect("temp dir");
    let merge = merge_in(dir.path(), &[0, 3]);
    (dir, merge)
}

fn event(id: &str, updated_at: i64, source: &str) -> EntityState {
    EntityState {
        updated_at,
        source_system: source.into(),
        event_id: id.into(),
        change: Change::Created,
        hash: None,
    }
}

#[test]
fn state_written_before_the_hash_still_decodes() {
    let old = EntityState::decode(b"100|UPDATED|e-1|v4").expect("decodes");
    assert_eq!(
        (
            old.updated_at,
            old.change,
            old.hash.as_deref(),
            old.source_system.as_str()
        ),
        (100, Change::Updated, None, "v4")
    );
    let new = EntityState {
        hash: Some("ab12".into()),
        source_system: "v|5".into(),
        ..old
    };
    assert_eq!(EntityState::decode(&new.encode()), Some(new));
}

#[test]
fn latest_updated_at_wins_and_older_updates_are_stale() {
    let (_dir, mut merge) = merge();
    let key = entity_key(7, "case", "CASE-1");
    assert_eq!(
        merge
            .apply(0, &key, event("a", 100, "v5"), || None)
            .expect("applies")
            .change(),
        Change::Created
    );
    assert_eq!(
        merge
            .apply(0, &key, event("b", 200, "v5"), || None)
            .expect("applies")
            .change(),
        Change::Updated
    );
    match merge
        .apply(0, &key, event("c", 150, "v4"), || None)
        .expect("applies")
    {
        Outcome::Stale(current) => assert_eq!(current.event_id, "b"),
        other => panic!("expected stale, got {other:?}"),
    }
    // The stale update did not overwrite: a newer one still compares against b.
    assert_eq!(
        merge
            .apply(0, &key, event("d", 201, "v5"), || None)
            .expect("applies")
            .change(),
        Change::Updated
    );
}

#[test]
fn ties_go_to_the_authoritative_source() {
    let (_dir, mut merge) = merge();
    let key = entity_key(7, "case", "CASE-2");
    merge
        .apply(0, &key, event("a", 100, "v4"), || None)
        .expect("applies");
    assert_eq!(
        merge
            .apply(0, &key, event("b", 100, "v5"), || None)
            .expect("applies")
            .change(),
        Change::Stale
    );
    let other = entity_key(7, "case", "CASE-3");
    merge
        .apply(0, &other, event("c", 100, "v5"), || None)
        .expect("applies");
    assert_eq!(
        merge
            .apply(0, &other, event("d", 100, "v4"), || None)
            .expect("applies")
            .change(),
        Change::Updated
    );
}

#[test]
fn a_redelivered_event_gets_its_first_decision_and_state_round_trips() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut merge = merge_in(dir.path(), &[3]);
    let key = entity_key(1, "lead", "l-1");
    let first = merge
        .apply(3, &key, event("a", 100, "crm"), || None)
        .expect("applies");
    let Outcome::Stored(stored) = first else {
        panic!("stored")
    };
    merge.after_batch().expect("stored");
    drop(merge);
    // The store reopened holds what was merged.
    let mut restored = merge_in(dir.path(), &[3]);
    assert_eq!(
        restored
            .apply(3, &key, event("a", 100, "crm"), || None)
            .expect("applies"),
        Outcome::Replayed(stored)
    );
}

mod stage {
    use serde_json::{json, Value as Json};

    use crate::silver::{Action, Expectation, Silver, SilverConfig, GROUP};
    use crate::testkit::{arrow_schema, contract, input_batch, offline_setup, output_json};

    const NOW: i64 = 1_735_207_200_000;

    fn case(id: &str, org: i64, case_id: &str, updated_at: i64, source: &str, owner: &str) -> Json {
        json!({
            "event_id": id, "event_type": "case.sync.v1", "event_version": "1.0.0",
            "timestamp": NOW, "source": {"service": "case-sync", "instance": "i-1"},
            "correlation_id": "corr-1", "org_id": org, "trace_id": "trace-1",
            "classification": "internal",
            "payload": {
                "connector_id": "c-1", "source_system": source,
                "release_sync": null, "lead_created": null,
                "case_sync": {
                    "case_id": case_id, "title": "Broken build", "description": null,
                    "severity": 3, "status": "Open", "owner": owner, "flag": false,
                    "tlp": 1, "pap": 1, "created_at": 1_000, "updated_at": updated_at,
                    "custom_fields": {}
                },
                "measurements": [{"name": "case.severity", "value": 3.0, "unit": null}],
                "attributes": {}, "raw_topic": "connector.data.raw", "raw_partition": 0,
                "raw_offset": 1, "cleaned_at": NOW
            }
        })
    }

    async fn silver(config: SilverConfig) -> Result<Silver, medallion_runtime::error::SetupError> {
        let bronze = contract("bronze/data-cleaned.avsc");
        let (_, input_schema) =
            input_batch(&bronze, &[case("e0", 1, "C", 2, "v4", "o")], 0, 0, NOW);
        let output_schema = arrow_schema(&contract("silver/data-processed.avsc"));
        let audit = contract("audit/events.avsc");
        let audit = medallion_runtime::audit::AuditEncoder::new("audit.events", &audit.text, 5)
            .expect("audit encoder");
        let mut stage = Silver::with_audit(
            offline_setup(GROUP, input_schema, output_schema),
            config,
            audit,
        )
        .await?;
        stage.merge.adopt(0).expect("partition 0");
        Ok(stage)
    }

    #[tokio::test]
    async fn conforms_merges_and_applies_expectations() {
        let mut stage = silver(SilverConfig::default()).await.expect("plans");
        let events = [
            case("e1", 7, "CASE-1", 2_000, "v5", "alice"),
            case("e2", 7, "CASE-1", 3_000, "v5", ""),
            case("e3", 7, "CASE-1", 2_500, "v4", "bob"),
            // updated before it was created: dropped by `updated_at_not_before_creation`.
            case("e4", 7, "CASE-2", 500, "v4", "carol"),
        ];
        let (batch, _) = input_batch(&contract("bronze/data-cleaned.avsc"), &events, 0, 0, NOW);
        let out = crate::testkit::process(&mut stage, batch)
            .await
            .expect("processes");
        let reasons: Vec<(u32, String)> = out
            .rejected
            .iter()
            .map(|(r, f)| (*r, f.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![(3, "updated_at_not_before_creation".to_string())]
        );
        assert_eq!(out.source_rows, vec![Some(0), Some(1), Some(2)]);
        let rows = output_json(&contract("silver/data-processed.avsc"), &out.batch);
        let changes: Vec<&str> = rows
            .iter()
            .map(|r| r["payload"]["change"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(changes, ["CREATED", "UPDATED", "STALE"]);
        assert_eq!(
            rows[0]["payload"]["entity"],
            json!({
                "entity_type": "case", "entity_id": "CASE-1", "org_id": 7,
                "source_system": "v5", "updated_at": 2_000
            })
        );
        assert_eq!(rows[0]["payload"]["attributes"]["status"], "Open");
        assert_eq!(rows[0]["payload"]["attributes"]["severity"], "3");
        assert_eq!(rows[0]["payload"]["bronze_event_id"], "e1");
        assert_ne!(rows[0]["event_id"], "e1");
        assert_eq!(
            rows[1]["payload"]["quality_warnings"],
            json!(["case_has_owner"])
        );
        assert_eq!(rows[0]["payload"]["quality_warnings"], json!([]));
        assert_eq!(
            rows[2]["payload"]["measurements"][0]["name"],
            "case.severity"
        );
        // Two state writes (CREATED, UPDATED); the stale update wrote nothing.
        let changelog: Vec<_> = out.side.iter().filter(|s| s.partition == Some(0)).collect();
        assert_eq!(changelog.len(), 2);
        // The stale update is audited.
        let audited: Vec<_> = out
            .side
            .iter()
            .filter(|s| s.topic == "audit.events")
            .collect();
        assert_eq!(audited.len(), 1);
    }

    #[tokio::test]
    async fn a_redelivered_event_gets_its_first_decision_and_writes_its_state_again() {
        let mut stage = silver(SilverConfig::default()).await.expect("plans");
        let events = [
            case("e1", 7, "CASE-1", 2_000, "v5", "alice"),
            case("e2", 7, "CASE-2", 3_000, "v5", "bob"),
        ];
        let (batch, _) = input_batch(&contract("bronze/data-cleaned.avsc"), &events, 0, 0, NOW);
        let first = crate::testkit::process(&mut stage, batch.clone())
            .await
            .expect("processes");
        let again = crate::testkit::process(&mut stage, batch)
            .await
            .expect("processes again");
        let state_writes = |out: &crate::testkit::Output| -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
            out.side
                .iter()
                .filter(|s| s.partition == Some(0))
                .map(|s| (s.key.clone(), s.value.clone()))
                .collect()
        };
        assert_eq!(state_writes(&first).len(), 2);
        assert_eq!(
            state_writes(&again),
            state_writes(&first),
            "the same state written again: a write lost the first time is made good"
        );
        let changes = |out: &crate::testkit::Output| -> Vec<String> {
            output_json(&contract("silver/data-processed.avsc"), &out.batch)
                .iter()
                .map(|r| r["payload"]["change"].as_str().unwrap_or("").to_string())
                .collect()
        };
        assert_eq!(changes(&first), ["CREATED", "CREATED"]);
        assert_eq!(changes(&again), changes(&first), "the first decision again");
    }

    #[tokio::test]
    async fn fail_batch_halts_and_a_bad_expression_is_named() {
        let halting = SilverConfig {
            expectations: Some(vec![Expectation {
                name: "org_allowed".into(),
                expr: "org_id <> 13".into(),
                action: Action::FailBatch,
            }]),
            ..SilverConfig::default()
        };
        let mut stage = silver(halting).await.expect("plans");
        let events = [case("e1", 13, "CASE-1", 2_000, "v5", "alice")];
        let (batch, _) = input_batch(&contract("bronze/data-cleaned.avsc"), &events, 0, 0, NOW);
        let err = crate::testkit::process(&mut stage, batch)
            .await
            .expect_err("halts");
        assert!(err.to_string().contains("org_allowed"), "{err}");

        for (expr, needle) in [
            ("no_such_column > 1", "no_such_column"),
            ("org_id + 1", "boolean"),
        ] {
            let bad = SilverConfig {
                expectations: Some(vec![Expectation {
                    name: "broken_rule".into(),
                    expr: expr.into(),
                    action: Action::Warn,
                }]),
                ..SilverConfig::default()
            };
            let err = silver(bad).await.err().expect("rejected").to_string();
            assert!(err.contains("broken_rule") && err.contains(needle), "{err}");
        }
    }

    #[tokio::test]
    async fn the_shipped_expectations_file_is_the_default_and_a_bad_file_is_named() {
        let shipped = SilverConfig::default()
            .load_expectations(&medallion_contracts::project_root())
            .expect("rules/expectations.yaml loads");
        let names: Vec<&str> = shipped.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "case_has_owner",
                "updated_at_not_before_creation",
                "release_has_environment"
            ]
        );
        let dir = std::env::temp_dir().join(format!("silver-exp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let typo = dir.join("typo.yaml");
        std::fs::write(
            &typo,
            "expectations:\n  - { name: x, expr: 'true', actoin: warn }\n",
        )
        .expect("write");
        for (file, needle) in [
            (typo.clone(), "actoin"),
            (dir.join("missing.yaml"), "missing.yaml"),
        ] {
            let config = SilverConfig {
                expectations_file: file,
                ..SilverConfig::default()
            };
            let err = silver(config).await.err().expect("rejected").to_string();
            assert!(
                err.contains("stage.expectations_file") && err.contains(needle),
                "{err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cleaned event of `event_type` carrying `branch` as `variant`.
    fn cleaned(id: &str, event_type: &str, variant: &str, branch: Json) -> Json {
        let mut e = case(id, 7, "unused", 1, "erp", "o");
        e["event_type"] = json!(event_type);
        e["payload"]["case_sync"] = Json::Null;
        e["payload"][variant] = branch;
        e["payload"]["measurements"] = json!([]);
        e["provenance"] = json!({"activity_id": format!("prov:activity:{id}"), "item_ids": [], "distribution_id": null});
        e
    }

    #[tokio::test]
    async fn the_catalog_names_entities_attributes_and_metric_samples() {
        let mut stage = silver(SilverConfig::default()).await.expect("plans");
        let events = [
            cleaned(
                "t1",
                "threat.detected",
                "threat_detected",
                json!({
                    "alert_id": "a-1", "severity": "HIGH", "source_system": "endpoint-agent",
                    "description": null, "detected_at": 5_000
                }),
            ),
            cleaned(
                "i1",
                "invoice.generated",
                "invoice_generated",
                json!({
                    "invoice_id": "INV-1", "amount": 3500.5, "currency": "USD", "status": "PENDING",
                    "issued_by": null, "issued_at": 6_000
                }),
            ),
            cleaned(
                "r1",
                "release.sync.created",
                "release_sync",
                json!({
                    "event_time": 7_000, "synced_at": null,
                    "release": {"name": "org/api", "version": "2.10.3-rc.1+build.5", "projecttype": "docker",
                                "gitcommit": null, "dockersha": null, "is_public": true},
                    "sbom_ref": {"cid": "Qm1", "storage_type": "ipfs", "content_sha": null, "uploaded_at": null},
                    "endpoint": {"name": "prod", "endpoint_type": "eks", "environment": "production", "is_public": true}
                }),
            ),
            cleaned(
                "a1",
                "alert.sync.v1",
                "alert_sync",
                json!({
                    "alert_id": "ALERT-9", "title": "Login burst", "type": "phishing", "source": "siem",
                    "sourceRef": "siem-1", "status": "New", "created_at": 1_000, "updated_at": 8_000
                }),
            ),
        ];
        let (batch, _) = input_batch(&contract("bronze/data-cleaned.avsc"), &events, 0, 0, NOW);
        let out = crate::testkit::process(&mut stage, batch)
            .await
            .expect("processes");
        assert!(
            out.rejected.is_empty(),
            "{:?}",
            out.rejected
                .iter()
                .map(|(_, f)| &f.reason)
                .collect::<Vec<_>>()
        );
        let rows = output_json(&contract("silver/data-processed.avsc"), &out.batch);
        let entity = |i: usize| {
            let e = &rows[i]["payload"]["entity"];
            (
                e["entity_type"].clone(),
                e["entity_id"].clone(),
                e["updated_at"].clone(),
            )
        };
        assert_eq!(entity(0), (json!("threat"), json!("a-1"), json!(5_000)));
        assert_eq!(entity(1), (json!("invoice"), json!("INV-1"), json!(6_000)));
        // No synced_at: the event's own time (see feeds.yaml).
        assert_eq!(
            entity(2),
            (
                json!("release"),
                json!("org/api@2.10.3-rc.1+build.5"),
                json!(7_000)
            )
        );
        assert_eq!(entity(3), (json!("alert"), json!("ALERT-9"), json!(8_000)));
        let attributes = &rows[2]["payload"]["attributes"];
        assert_eq!(
            (
                &attributes["version_major"],
                &attributes["version_minor"],
                &attributes["version_patch"],
                &attributes["version_prerelease"]
            ),
            (&json!("2"), &json!("10"), &json!("3"), &json!("rc.1"))
        );
        assert_eq!(rows[0]["payload"]["attributes"]["severity"], "HIGH");
        assert_eq!(rows[3]["payload"]["attributes"]["source_ref"], "siem-1");
        // Samples from the catalog: threat severity HIGH is 3, the invoice its amount.
        assert_eq!(
            rows[0]["payload"]["measurements"],
            json!([{"name": "threat.severity", "value": 3.0, "unit": null}])
        );
        assert_eq!(
            rows[1]["payload"]["measurements"],
            json!([{"name": "invoice.amount", "value": 3500.5, "unit": null}])
        );
        assert_eq!(rows[2]["payload"]["measurements"], json!([]));
        assert_eq!(rows[0]["provenance"]["activity_id"], "prov:activity:t1");
    }

    #[tokio::test]
    async fn a_catalog_expression_that_does_not_plan_names_its_feed_and_key() {
        let root = medallion_contracts::project_root();
        let contracts =
            medallion_contracts::ContractSet::load(&root.join("schemas")).expect("schemas");
        let text = std::fs::read_to_string(root.join("feeds.yaml")).expect("feeds.yaml");
        let bad = text.replace(
            "alert_source: $source",
            "alert_source: no_such_function($source)",
        );
        let catalog = medallion_contracts::FeedCatalog::parse(&bad, "feeds.yaml", &contracts)
            .expect("parses");
        let (_, input) = input_batch(
            &contract("bronze/data-cleaned.avsc"),
            &[case("e0", 1, "C", 2, "v4", "o")],
            0,
            0,
            NOW,
        );
        let input = crate::plan::with_row_column(&input);
        let err = crate::feeds::find_unplannable(&catalog, &input, "payload", false)
            .await
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("feed `alert.sync.v1`") && err.contains("entity.attributes.alert_source"),
            "{err}"
        );
    }
}
