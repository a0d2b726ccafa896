//! The tenant check across partitions: an entity id first seen under one org is
//! rejected under another (`tenant_mismatch`, dead-lettered and audited), although the two
//! orgs' events sit on different partitions, here served by two silver replicas.

use std::time::Duration;

use medallion_runtime::dlq::{header, header_value};
use medallion_tests::{java_partition, read_until};
use rdkafka::message::Message;

use crate::bronze::Pipeline;
use crate::stages::{bronze_case, uuid, SILVER_BIN};

#[tokio::test(flavor = "multi_thread")]
async fn an_entity_id_of_one_org_is_refused_under_another_on_another_partition() {
    let p = Pipeline::start().await;
    // Two orgs on different partitions of bronze.data.cleaned (12 partitions, murmur2).
    let first = 11i64;
    let second = (12..200)
        .find(|org| {
            java_partition(org.to_string().as_bytes(), 12)
                != java_partition(first.to_string().as_bytes(), 12)
        })
        .expect("an org on another partition");
    let replicas = [p.worker_of(SILVER_BIN, &[]), p.worker_of(SILVER_BIN, &[])];
    for r in &replicas {
        r.wait_ready(Duration::from_secs(90))
            .await
            .expect("silver ready");
    }
    p.publish(
        "bronze.data.cleaned",
        &bronze_case(1, first, 1_000, ("SHARED-1", 100, 0), 3.0, "ann"),
    )
    .await;
    read_until(
        &p.broker.address,
        "silver.data.processed",
        |m| !m.is_empty(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("the first org's event");
    // The other org names the same case id, later; and its own case stays its own.
    p.publish(
        "bronze.data.cleaned",
        &bronze_case(2, second, 2_000, ("SHARED-1", 200, 0), 3.0, "bob"),
    )
    .await;
    p.publish(
        "bronze.data.cleaned",
        &bronze_case(3, second, 3_000, ("OWN-2", 300, 0), 3.0, "bob"),
    )
    .await;

    let dlq = read_until(
        &p.broker.address,
        "bronze.data.cleaned.dlq",
        |m| !m.is_empty(),
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await
    .expect("the refused event");
    assert_eq!(dlq.len(), 1);
    let refused = &p.decode("bronze.data.cleaned", &dlq)[0];
    assert_eq!(refused["event_id"], uuid(2));
    let reason = dlq[0]
        .headers()
        .and_then(|h| header_value(h, header::ERROR_REASON))
        .unwrap_or_default();
    assert_eq!(reason, "tenant_mismatch");

    let out = read_until(
        &p.broker.address,
        "silver.data.processed",
        |m| m.len() >= 2,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("silver output");
    let mut passed: Vec<String> = p
        .decode("silver.data.processed", &out)
        .iter()
        .map(|r| {
            r["payload"]["bronze_event_id"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    passed.sort();
    assert_eq!(passed, vec![uuid(1), uuid(3)]);

    let mismatch = p
        .read_matching(
            "audit.events",
            |e| e["payload"]["action"] == "tenant.mismatch",
            1,
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
        .await
        .remove(0);
    assert_eq!(mismatch["org_id"], second);
    assert_eq!(mismatch["payload"]["resource_id"], "SHARED-1");
    assert!(
        mismatch["payload"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("belongs to org {first}")),
        "{mismatch}"
    );
}
