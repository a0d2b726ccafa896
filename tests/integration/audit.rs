//! audit-writer as a separate process on a real broker, writing real Parquet files.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow::array::{Array, Int64Array};
use medallion_stages::audit_writer::AuditStore;
use serde_json::{json, Value as Json};

use crate::bronze::Pipeline;

const BIN: &str = env!("CARGO_BIN_EXE_audit-writer");
const AUDIT: &str = "audit.events";
const DAY: i64 = 86_400_000;
/// 2026-11-20 00:00 UTC.
const T: i64 = 1_795_132_800_000;

fn event(n: i64) -> Json {
    json!({
        "event_id": format!("00000000-0000-4000-b000-{n:012}"), "event_type": "audit.dlq.routed",
        "event_version": "1.0.0", "timestamp": T + (n % 3) * DAY,
        "source": {"service": "bronze-processor", "instance": "i"}, "correlation_id": format!("c{n}"),
        "org_id": 1 + n % 5, "trace_id": null, "classification": "internal",
        "payload": {"action": "dlq.routed", "actor": "bronze-processor", "resource_type": "record",
                    "resource_id": format!("r{n}"), "outcome": "dead_lettered", "reason": "bad",
                    "details": {"n": n.to_string()}}
    })
}

/// (rows, distinct event ids) by org.
async fn counts(store: &AuditStore) -> BTreeMap<i64, (i64, i64)> {
    let Ok(batches) = store
        .query("SELECT org_id, count(*) AS n, count(DISTINCT event_id) AS d FROM audit_events GROUP BY org_id")
        .await
    else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for b in batches {
        let col = |name: &str| {
            let c = b.column_by_name(name).expect("column");
            arrow::compute::cast(c, &arrow::datatypes::DataType::Int64).expect("int")
        };
        let (org, n, d) = (col("org_id"), col("n"), col("d"));
        let as_i64 = |a: &std::sync::Arc<dyn Array>| {
            a.as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64")
                .clone()
        };
        let (org, n, d) = (as_i64(&org), as_i64(&n), as_i64(&d));
        for i in 0..org.len() {
            out.insert(org.value(i), (n.value(i), d.value(i)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkill_while_writing_leaves_every_event_exactly_once_in_the_store() {
    let p = Pipeline::start().await;
    let dir = std::env::temp_dir().join(medallion_tests::unique("audit-store"));
    let env = [
        ("MEDALLION__STAGE__STORE", dir.display().to_string()),
        ("MEDALLION__STAGE__FLUSH_ROWS", "150".to_string()),
        ("MEDALLION__STAGE__FLUSH_INTERVAL_MS", "400".to_string()),
        ("MEDALLION__BATCH__MAX_RECORDS", "100".to_string()),
    ];
    const N: i64 = 3_000;
    for n in 0..N {
        p.publish(AUDIT, &event(n)).await;
    }
    let store = AuditStore::open(&dir.display().to_string()).expect("store");
    let mut worker = p.worker_of(BIN, &env);
    // Kill it once it has written some files, mid-stream.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let files = store.files().await.unwrap_or_default().len();
        if files >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no files written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill();
    let written: i64 = counts(&store).await.values().map(|(n, _)| n).sum();
    assert!(written < N, "killed before the end ({written} rows)");

    let worker = p.worker_of(BIN, &env);
    worker
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("ready");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows: i64 = counts(&store).await.values().map(|(n, _)| n).sum();
        if rows >= N {
            break;
        }
        assert!(Instant::now() < deadline, "only {rows} rows");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by_org = counts(&store).await;
    let expected: BTreeMap<i64, (i64, i64)> = (1..=5).map(|org| (org, (N / 5, N / 5))).collect();
    assert_eq!(by_org, expected, "every event once, per org");
    // Files are laid out by org and day and named by topic, partition and offsets.
    let files = store.files().await.expect("files");
    assert!(files.iter().all(|f| {
        let parts: Vec<&str> = f.split('/').collect();
        parts.len() == 3
            && parts[0].starts_with("org_id=")
            && parts[1].starts_with("day=2026-11-2")
            && parts[2].starts_with("audit.events-")
            && parts[2].ends_with(".parquet")
    }));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_store_can_be_an_s3_compatible_bucket() {
    let s3 = medallion_tests::s3_server().expect("S3-compatible server");
    let p = Pipeline::start().await;
    let aws = [
        ("AWS_ENDPOINT", s3.address.clone()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "medallion".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "medallion-secret".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    for (k, v) in &aws {
        std::env::set_var(k, v);
    }
    let bucket = medallion_tests::unique("audit")
        .to_lowercase()
        .replace('_', "-");
    let created = reqwest::Client::new()
        .put(format!("{}/{bucket}", s3.address))
        .send()
        .await
        .expect("bucket");
    assert!(created.status().is_success(), "{}", created.status());
    let location = format!("s3://{bucket}/prod");
    let mut env: Vec<(&str, String)> = aws.to_vec();
    env.push(("MEDALLION__STAGE__STORE", location.clone()));
    env.push(("MEDALLION__STAGE__FLUSH_INTERVAL_MS", "300".to_string()));
    const N: i64 = 200;
    for n in 0..N {
        p.publish(AUDIT, &event(n)).await;
    }
    let _worker = p.worker_of(BIN, &env);
    let store = AuditStore::open(&location).expect("store");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows: i64 = counts(&store).await.values().map(|(n, _)| n).sum();
        if rows >= N {
            break;
        }
        assert!(Instant::now() < deadline, "only {rows} rows in {location}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let by_org = counts(&store).await;
    assert_eq!(
        by_org
            .values()
            .map(|(n, d)| (*n, *d))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
        (N, N)
    );
    let files = store.files().await.expect("files");
    assert!(
        !files.is_empty() && files.iter().all(|f| f.starts_with("org_id=")),
        "{files:?}"
    );
    // The objects really are in the bucket, under the prefix.
    let listing = reqwest::get(format!("{}/{bucket}?prefix=prod/org_id=", s3.address))
        .await
        .expect("list")
        .text()
        .await
        .expect("body");
    assert!(listing.contains(".parquet"), "{listing}");
}

/// The `subjects` text of the store: event id → sealed fields.
fn subjects_of(text: &str) -> Vec<(String, String)> {
    text.split(';')
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.split_once('='))
        .map(|(id, fields)| (id.to_string(), fields.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sealed_fields_are_one_audit_record_per_part_and_org_and_the_store_names_every_event() {
    let p = Pipeline::start().await;
    let dir = std::env::temp_dir().join(medallion_tests::unique("audit-store"));
    // A file written before `payload.subjects` existed: still read, its column null.
    {
        let mut old: Vec<arrow::datatypes::FieldRef> =
            medallion_stages::audit_writer::parquet_schema()
                .fields()
                .iter()
                .filter(|f| f.name() != "subjects")
                .cloned()
                .collect();
        old.shrink_to_fit();
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(old));
        let columns: Vec<arrow::array::ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                arrow::datatypes::DataType::Int32 => {
                    std::sync::Arc::new(arrow::array::Int32Array::from(vec![0])) as _
                }
                arrow::datatypes::DataType::Int64 => {
                    std::sync::Arc::new(Int64Array::from(vec![0])) as _
                }
                arrow::datatypes::DataType::Timestamp(..) => std::sync::Arc::new(
                    arrow::array::TimestampMillisecondArray::from(vec![T]).with_timezone("+00:00"),
                ) as _,
                _ => std::sync::Arc::new(arrow::array::StringArray::from(vec!["old"])) as _,
            })
            .collect();
        let batch = arrow::array::RecordBatch::try_new(schema.clone(), columns).expect("batch");
        let path = dir.join("org_id=1/day=2026-11-20");
        std::fs::create_dir_all(&path).expect("dir");
        let file = std::fs::File::create(path.join("audit.events-old.parquet")).expect("file");
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("writer");
        writer.write(&batch).expect("written");
        writer.close().expect("closed");
    }
    // A backlog, so bronze takes it in parts of 100.
    let events = crate::bronze::sample(31, 600);
    for event in &events {
        p.publish("connector.data.raw", event).await;
    }
    let bronze = p.worker(&[("MEDALLION__BATCH__MAX_RECORDS", "100".to_string())]);
    let writer = p.worker_of(
        BIN,
        &[
            ("MEDALLION__STAGE__STORE", dir.display().to_string()),
            ("MEDALLION__STAGE__FLUSH_INTERVAL_MS", "300".to_string()),
        ],
    );
    bronze
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("bronze ready");
    writer
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("audit-writer ready");
    // What bronze sealed, from its own output: every record with the key id header.
    let out = medallion_tests::read_topic(
        &p.broker.address,
        "bronze.data.cleaned",
        events.len() * 9 / 10,
        Duration::from_secs(3),
        Duration::from_secs(90),
    )
    .await
    .expect("bronze output");
    let sealed: std::collections::BTreeSet<String> = p
        .bronze_json(&out)
        .into_iter()
        .zip(&out)
        .filter(|(_, m)| {
            use rdkafka::message::{Headers, Message};
            m.headers().is_some_and(|h| {
                h.iter()
                    .any(|h| h.key == medallion_runtime::pii::KEY_ID_HEADER)
            })
        })
        .filter_map(|(e, _)| e["event_id"].as_str().map(str::to_string))
        .collect();
    assert!(
        sealed.len() > 100,
        "the sample carries personal data ({})",
        sealed.len()
    );

    let store = AuditStore::open(&dir.display().to_string()).expect("store");
    let query = "SELECT org_id, subjects, details FROM audit_events \
                 WHERE action = 'pii.encrypted' ORDER BY event_id";
    let deadline = Instant::now() + Duration::from_secs(90);
    let (records, listed) = loop {
        let mut records = 0usize;
        let mut listed: BTreeMap<String, (i64, String)> = BTreeMap::new();
        for b in store.query(query).await.unwrap_or_default() {
            let text = |name: &str| {
                arrow::compute::cast(
                    b.column_by_name(name).expect("column"),
                    &arrow::datatypes::DataType::Utf8,
                )
                .expect("text")
            };
            let (orgs, subjects, details) = (
                arrow::compute::cast(
                    b.column_by_name("org_id").expect("org"),
                    &arrow::datatypes::DataType::Int64,
                )
                .expect("org"),
                text("subjects"),
                text("details"),
            );
            let orgs = orgs.as_any().downcast_ref::<Int64Array>().expect("i64");
            let (subjects, details) = (
                subjects
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .expect("text"),
                details
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .expect("text"),
            );
            for row in 0..b.num_rows() {
                records += 1;
                assert!(
                    details.value(row).contains("key_id=k1"),
                    "the key is named: {}",
                    details.value(row)
                );
                for (id, fields) in subjects_of(subjects.value(row)) {
                    assert!(fields.starts_with("payload."), "{id}: {fields}");
                    listed.insert(id, (orgs.value(row), fields));
                }
            }
        }
        if listed.len() >= sealed.len() || Instant::now() > deadline {
            break (records, listed);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let listed_ids: std::collections::BTreeSet<String> = listed.keys().cloned().collect();
    assert_eq!(
        listed_ids, sealed,
        "the audit trail names exactly the sealed events"
    );
    assert!(
        records * 4 <= sealed.len(),
        "{records} audit records for {} sealed events",
        sealed.len()
    );
    // Each event is listed under its own org.
    let org_of: BTreeMap<String, i64> = events
        .iter()
        .filter_map(|e| Some((e["event_id"].as_str()?.to_string(), e["org_id"].as_i64()?)))
        .collect();
    assert!(listed
        .iter()
        .all(|(id, (org, _))| org_of.get(id) == Some(org)));
    // The old file's row reads with no subjects.
    let old = store
        .query("SELECT count(*) AS n FROM audit_events WHERE subjects IS NULL")
        .await
        .expect("query");
    let n = arrow::compute::cast(old[0].column(0), &arrow::datatypes::DataType::Int64).expect("n");
    assert_eq!(
        n.as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64")
            .value(0),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}
