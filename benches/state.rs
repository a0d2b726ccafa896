//! State benchmark: silver-processor over `MEDALLION_STATE_ENTITIES` (default 5,000,000)
//! bronze events that are every one a new entity (its own case id), on a real broker, release
//! build, its state in a store on disk (`state.dir`).
//!
//! 1. **Throughput and memory.** silver takes every event waiting in `bronze.data.cleaned`:
//!    events per CPU-second (goal ≥ 100k) and peak RSS (goal < 256 MiB, whatever the count).
//! 2. **Restart on its disk.** SIGKILL once every output is acknowledged and a checkpoint is
//!    due, 1,000 new events wait, silver starts again on the same directory: seconds from the
//!    start to `/readyz` and to its first output (goal < 10 s), and its peak RSS.
//! 3. **Rebuild.** The merge-state changelog restored into an empty store, every partition, in
//!    this process (`changelog::restore_into`, the worker's own code path, as many partitions at
//!    a time as `KeyedState::assign_all` restores): entries per second
//!    (goal ≥ 300k/s); and silver started on an empty directory: seconds to its first output,
//!    and its peak RSS.
//!
//! `MEDALLION_STATE_WORKER_LOG` sets the workers' `RUST_LOG`.
//!
//! `cargo bench -p medallion-stages --bench state`; `MEDALLION_TEST_BOOTSTRAP` /
//! `MEDALLION_TEST_REGISTRY_URL` use external services.

use std::time::{Duration, Instant};

use futures::StreamExt;

use medallion_runtime::ops::capture::Captured;
use medallion_tests::{broker, contracts, metric_sum, registry, WorkerProcess};
use serde_json::json;

// Shared with the replay and pipeline benchmarks, which use the rest of it.
#[allow(dead_code)]
mod support;
use support::{now_ms, usage};

const INPUT: &str = "bronze.data.cleaned";
const CHANGELOG: &str = "silver-processor.entity-state";
const SILVER_BIN: &str = env!("CARGO_BIN_EXE_silver-processor");
const ORGS: i64 = 16;
/// The case id of template events, rewritten in place per event (same length).
const CASE_MARK: &str = "CASE-000000000000";
/// The event id of template events: the last 12 characters are rewritten per event.
const ID_MARK: &str = "00000000-0000-4000-8000-000000000000";

/// A bronze case event of `org` with the marks in place of its ids.
fn template(org: i64, t: i64) -> serde_json::Value {
    json!({
        "event_id": ID_MARK, "event_type": "case.sync.v1", "event_version": "1.0.0",
        "timestamp": t, "source": {"service": "case-sync", "instance": "i-1"},
        "correlation_id": "corr-1", "org_id": org, "trace_id": "trace-1",
        "classification": "internal",
        "payload": {
            "connector_id": "c-1", "source_system": "v5",
            "release_sync": null, "lead_created": null,
            "case_sync": {
                "case_id": CASE_MARK, "title": "Broken build", "description": null,
                "severity": 3, "status": "Open", "owner": "analyst-1", "flag": false,
                "tlp": 1, "pap": 1, "created_at": t - 60_000, "updated_at": t,
                "custom_fields": {}
            },
            "measurements": [{"name": "case.severity", "value": 3.0, "unit": null}],
            "attributes": {}, "raw_topic": "connector.data.raw", "raw_partition": 0,
            "raw_offset": 1, "cleaned_at": t
        }
    })
}

/// Framed templates per org, with where their event id and case id sit.
struct Templates {
    framed: Vec<(String, Vec<u8>, usize, usize)>,
}

impl Templates {
    fn new(schema: &apache_avro::Schema, id: u32, t: i64) -> Self {
        let find = |bytes: &[u8], mark: &str| {
            bytes
                .windows(mark.len())
                .position(|w| w == mark.as_bytes())
                .expect("mark in the template")
        };
        let framed = (1..=ORGS)
            .map(|org| {
                let value = medallion_contracts::json::to_framed(&template(org, t), schema, id)
                    .expect("frame");
                let (at_id, at_case) = (find(&value, ID_MARK), find(&value, CASE_MARK));
                (org.to_string(), value, at_id, at_case)
            })
            .collect();
        Self { framed }
    }

    /// Event `i`: its own event id and its own case (a new entity).
    fn event(&self, i: u64) -> Captured {
        let (key, template, at_id, at_case) = &self.framed[(i % ORGS as u64) as usize];
        let mut value = template.clone();
        let suffix = format!("{i:012}");
        value[at_id + 24..at_id + 36].copy_from_slice(suffix.as_bytes());
        value[at_case + 5..at_case + 17].copy_from_slice(suffix.as_bytes());
        Captured {
            partition: 0,
            offset: i as i64,
            timestamp: None,
            key: Some(key.as_bytes().to_vec()),
            value: Some(value),
            headers: Vec::new(),
        }
    }
}

/// Produces events `from..to` in chunks (the bench never holds them all).
async fn produce(
    kafka: &medallion_runtime::kafka::KafkaConnection,
    t: &Templates,
    from: u64,
    to: u64,
) {
    let mut i = from;
    while i < to {
        let end = (i + 200_000).min(to);
        let chunk: Vec<Captured> = (i..end).map(|i| t.event(i)).collect();
        support::produce(kafka, INPUT, &chunk).await;
        i = end;
    }
}

fn silver(bootstrap: &str, registry: &str, dir: &std::path::Path) -> WorkerProcess {
    WorkerProcess::start(
        SILVER_BIN,
        bootstrap,
        registry,
        &[
            ("MEDALLION__BATCH__MAX_RECORDS", "5000".to_string()),
            ("MEDALLION__STATE__DIR", dir.display().to_string()),
            (
                "RUST_LOG",
                std::env::var("MEDALLION_STATE_WORKER_LOG")
                    .unwrap_or_else(|_| "warn,medallion_runtime::state=info".to_string()),
            ),
        ],
    )
    .expect("silver starts")
}

/// Polls `worker` until `done(metrics)`; returns the seconds it took.
async fn until(worker: &WorkerProcess, within: Duration, done: impl Fn(&str) -> bool) -> f64 {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < within, "not within {within:?}");
        if let Ok(m) = worker.metrics().await {
            if done(&m) {
                return started.elapsed().as_secs_f64();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Time from `started` to `/readyz` 200 and to the first output record.
async fn restart(worker: &WorkerProcess, started: Instant) -> (f64, f64) {
    let mut ready = None;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no output within 10 min"
        );
        if ready.is_none() && worker.wait_ready(Duration::from_millis(1)).await.is_ok() {
            ready = Some(started.elapsed().as_secs_f64());
        }
        if let Ok(m) = worker.metrics().await {
            if metric_sum(&m, "medallion_records_out_total") > 0.0 {
                let out = started.elapsed().as_secs_f64();
                return (ready.unwrap_or(out), out);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn main() {
    support::run_bench(run);
}

async fn run() {
    let n: u64 = std::env::var("MEDALLION_STATE_ENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let broker = broker().expect("broker");
    let registry = registry().expect("registry");
    let (contracts, topics) = contracts().expect("contracts");
    let ids = support::provision(&broker.address, &registry.address, &contracts, &topics).await;
    let schema = &contracts
        .get("bronze/data-cleaned.avsc")
        .expect("bronze")
        .schema;
    let templates = Templates::new(schema, ids[INPUT], now_ms() - 3_600_000);
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection");
    let produced = Instant::now();
    produce(&kafka, &templates, 0, n).await;
    println!(
        "state: {n} events, each a new entity, produced in {:.1} s",
        produced.elapsed().as_secs_f64()
    );
    let disks = tempfile::tempdir().expect("temp dir");
    let disk = disks.path().join("node-a");

    // 1. Every event through silver.
    let mut worker = silver(&broker.address, &registry.address, &disk);
    let pid = worker.pid().expect("pid");
    let consumed = |m: &str| metric_sum(m, "kafka_messages_in_total") >= n as f64;
    let first = until(&worker, Duration::from_secs(600), |m| {
        metric_sum(m, "kafka_messages_in_total") > 0.0
    })
    .await;
    let started = Instant::now();
    until(&worker, Duration::from_secs(3_600), consumed).await;
    let mut last = 0.0;
    let mut still_since = Instant::now();
    let mut seconds = started.elapsed().as_secs_f64();
    while still_since.elapsed() < Duration::from_millis(1_500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(m) = worker.metrics().await else {
            continue;
        };
        let out = metric_sum(&m, "medallion_records_out_total");
        if out != last {
            last = out;
            still_since = Instant::now();
            seconds = started.elapsed().as_secs_f64();
        }
    }
    let use1 = usage(pid).expect("usage");
    let store_bytes = dir_bytes(&disk);
    println!();
    println!("| run | events | wall s | events/CPU-s | CPU s | peak RSS MiB | store MiB |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| silver, {n} new entities | {n} | {seconds:.1} | {:.0} | {:.1} | {:.1} | {:.0} |  (first record after {first:.1} s; out {last:.0})",
        n as f64 / use1.cpu_seconds.max(0.01),
        use1.cpu_seconds,
        use1.peak_rss_kib as f64 / 1024.0,
        store_bytes as f64 / 1_048_576.0
    );

    // 2. SIGKILL once a checkpoint is due, new events wait, restart on the same disk.
    tokio::time::sleep(Duration::from_secs(6)).await;
    worker.kill();
    produce(&kafka, &templates, n, n + 1_000).await;
    let started = Instant::now();
    let mut worker = silver(&broker.address, &registry.address, &disk);
    let (ready, out) = restart(&worker, started).await;
    println!(
        "| restart on its disk (SIGKILL) | 1000 | ready {ready:.1} s | first output {out:.1} s | | {} | |",
        peak_mib(&worker)
    );

    // 3. Rebuild: the changelog into an empty store, in this process.
    worker.kill();
    let store =
        medallion_runtime::store::StateStore::open(medallion_runtime::store::StoreOptions {
            dir: disks.path().join("rebuild"),
            identity: "bench".into(),
            cache_bytes: 32 << 20,
            write_buffer_bytes: 32 << 20,
        })
        .expect("store");
    let partitions = topics.topic(INPUT).expect("input").partitions as i32;
    let rebuilding = Instant::now();
    // As the worker restores an assignment: `RESTORES_AT_ONCE` partitions at a time.
    let restores: Vec<_> = (0..partitions)
        .map(|p| {
            let table = store.table(CHANGELOG, p).expect("table");
            let kafka = kafka.clone();
            async move {
                medallion_runtime::changelog::restore_into(&kafka, CHANGELOG, p, table)
                    .await
                    .expect("restored")
                    .1
                    .applied
            }
        })
        .collect();
    let entries: u64 = futures::stream::iter(restores)
        .buffer_unordered(medallion_runtime::state::RESTORES_AT_ONCE)
        .collect::<Vec<u64>>()
        .await
        .into_iter()
        .sum();
    let rebuild_s = rebuilding.elapsed().as_secs_f64();
    println!(
        "| rebuild into an empty store | {entries} entries | {rebuild_s:.1} s | {:.0} entries/s | | | |",
        entries as f64 / rebuild_s
    );
    drop(store);
    produce(&kafka, &templates, n + 1_000, n + 2_000).await;
    let started = Instant::now();
    let worker = silver(
        &broker.address,
        &registry.address,
        &disks.path().join("node-b"),
    );
    let (ready, out) = restart(&worker, started).await;
    println!(
        "| silver on an empty disk | | ready {ready:.1} s | first output {out:.1} s | | {} | |",
        peak_mib(&worker)
    );
    drop(worker);
}

/// `worker`'s peak RSS so far, in MiB, for the table ("?" if it cannot be read).
fn peak_mib(worker: &WorkerProcess) -> String {
    worker.pid().and_then(usage).map_or_else(
        || "?".to_string(),
        |u| format!("{:.1}", u.peak_rss_kib as f64 / 1024.0),
    )
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
