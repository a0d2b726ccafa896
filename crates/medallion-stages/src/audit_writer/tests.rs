use arrow::array::{Int64Array, StringArray};
use serde_json::{json, Value as Json};

use super::*;
use crate::testkit::{contract, input_batch, offline_setup};

const DAY: i64 = 86_400_000;
/// 2026-11-20 00:00 UTC.
const T: i64 = 1_795_132_800_000;

fn event(n: i64, org: i64, t: i64) -> Json {
    json!({
        "event_id": format!("00000000-0000-4000-a000-{n:012}"), "event_type": "audit.dlq.routed",
        "event_version": "1.0.0", "timestamp": t,
        "source": {"service": "bronze-processor", "instance": "i"}, "correlation_id": format!("c{n}"),
        "org_id": org, "trace_id": null, "classification": "internal",
        "payload": {"action": "dlq.routed", "actor": "bronze-processor", "resource_type": "record",
                    "resource_id": format!("r{n}"), "outcome": "dead_lettered", "reason": "bad",
                    "details": {"b": "2", "a": "1"}}
    })
}

struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!("medallion-audit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&p).expect("dir");
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn events(range: std::ops::Range<i64>) -> Vec<Json> {
    range
        .map(|n| event(n, 1 + n % 3, T + (n % 2) * DAY))
        .collect()
}

async fn writer(store: &str, flush_rows: usize) -> AuditWriter {
    let audit = contract("audit/events.avsc");
    let (_, schema) = input_batch(&audit, &events(0..1), 0, 0, T);
    let config = AuditWriterConfig {
        store: store.into(),
        flush_rows,
        flush_interval_ms: 3_600_000,
    };
    AuditWriter::new(
        offline_setup(GROUP, schema, Arc::new(Schema::empty())),
        config,
    )
    .await
    .expect("writer")
}

/// Feeds events `range` of partition 0 in batches of `size`.
async fn feed(w: &mut AuditWriter, range: std::ops::Range<i64>, size: usize) {
    let audit = contract("audit/events.avsc");
    let all = events(range.clone());
    for (i, chunk) in all.chunks(size).enumerate() {
        let first = range.start + (i * size) as i64;
        let (batch, _) = input_batch(&audit, chunk, 0, first, T);
        crate::testkit::process(w, batch).await.expect("processed");
    }
}

async fn counts(store: &AuditStore) -> (i64, i64) {
    let batches = store
        .query("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM audit_events")
        .await
        .expect("query");
    let col = |name: &str| {
        batches[0]
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().map(|a| a.value(0)))
            .expect("count")
    };
    (col("n"), col("d"))
}

#[test]
fn days_are_utc_calendar_dates() {
    assert_eq!(day_of_ms(0), "1970-01-01");
    assert_eq!(day_of_ms(T), "2026-11-20");
    assert_eq!(day_of_ms(T - 1), "2026-11-19");
    assert_eq!(ms_of_day("2024-02-29"), Some(1_709_164_800_000));
    assert_eq!(ms_of_day("2026-11-20"), Some(T));
    assert_eq!(ms_of_day("2023-02-29"), None);
    assert_eq!(ms_of_day("yesterday"), None);
}

#[tokio::test]
async fn a_restart_rewrites_unconfirmed_ranges_exactly_and_never_duplicates_rows() {
    let dir = TempDir::new();
    let location = dir.0.display().to_string();
    let mut first = writer(&location, 10).await;
    first.assign(0, None).await.expect("assigned");
    feed(&mut first, 0..30, 5).await;
    // Three ranges flushed; say only the first was committed (offset 10) before a crash.
    assert_eq!(first.position(0, 30).0, 30);
    drop(first);
    let store = AuditStore::open(&location).expect("store");
    let before = store.files().await.expect("files");
    assert_eq!(counts(&store).await, (30, 30));

    let mut second = writer(&location, 10).await;
    second.assign(0, None).await.expect("assigned");
    // Read again from offset 10, in other batch sizes, then new events.
    feed(&mut second, 10..23, 13).await;
    assert_eq!(
        second.position(0, 23).0,
        20,
        "the range 20..29 is not rewritten yet"
    );
    feed(&mut second, 23..35, 4).await;
    second
        .settle(true, &mut medallion_runtime::worker::Collector::new())
        .await
        .expect("closing flush");
    assert_eq!(second.position(0, 35).0, 35);

    let after = store.files().await.expect("files");
    assert_eq!(counts(&store).await, (35, 35));
    for file in &before {
        assert!(
            after.contains(file),
            "{file} was rewritten under the same name"
        );
    }
    assert!(after
        .iter()
        .any(|f| f.ends_with(&format!("audit.events-0-{:020}-{:020}.parquet", 30, 34))));
    assert!(after
        .iter()
        .all(|f| f.starts_with("org_id=") && f.contains("/day=2026-11-2")));

    let by_org = store
        .query("SELECT org_id, day, count(*) AS n, min(details) AS d FROM audit_events WHERE org_id = 2 GROUP BY org_id, day ORDER BY day")
        .await
        .expect("query");
    let days = by_org[0]
        .column_by_name("day")
        .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
        .expect("day");
    let days = days.as_any().downcast_ref::<StringArray>().expect("text");
    assert_eq!(days.value(0), "2026-11-20");
    let details = by_org[0].column_by_name("d").expect("details");
    let details = arrow::compute::cast(details, &DataType::Utf8).expect("text");
    assert_eq!(
        details
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("text")
            .value(0),
        "a=1;b=2"
    );
}

#[tokio::test]
async fn retention_removes_day_partitions_older_than_the_limit() {
    let dir = TempDir::new();
    let location = dir.0.display().to_string();
    let store = AuditStore::open(&location).expect("store");
    let batch = RecordBatch::new_empty(parquet_schema());
    let bytes = parquet_bytes(&batch).expect("parquet");
    for day in ["2026-08-20", "2026-08-24", "2026-11-20"] {
        for org in [1, 2] {
            store
                .put(&format!("org_id={org}/day={day}/f.parquet"), bytes.clone())
                .await
                .expect("put");
        }
    }
    let planned = store.retain(90, "2026-11-21", true).await.expect("dry run");
    assert_eq!(
        planned,
        ["org_id=1/day=2026-08-20", "org_id=2/day=2026-08-20"]
    );
    assert_eq!(
        store.files().await.expect("files").len(),
        6,
        "a dry run removes nothing"
    );
    store.retain(90, "2026-11-21", false).await.expect("retain");
    let left = store.files().await.expect("files");
    assert_eq!(left.len(), 4);
    assert!(left.iter().all(|f| !f.contains("2026-08-20")));
    assert!(!dir.0.join("org_id=1/day=2026-08-20").exists());
    assert!(store.retain(90, "21.11.2026", false).await.is_err());
}
