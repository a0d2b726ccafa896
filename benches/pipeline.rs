//! Whole-pipeline benchmark: bronze-processor, silver-processor, gold-processor and
//! rule-evaluator running at once on one broker, each its own process (release builds).
//!
//! 1. **Throughput.** `MEDALLION_PIPELINE_EVENTS` (default 1,000,000) connector events wait in
//!    `connector.data.raw` when the four workers start; the run ends when gold has taken every
//!    record silver produced and every counter stood still for 1.5 s. Reports sustained events/s
//!    end to end (goal ≥ 50k/s on 2 cores).
//! 2. **Latency.** A stream at half that rate for `MEDALLION_PIPELINE_LATENCY_SECONDS` (default
//!    40), each event stamped with the time it is produced. A gold window closes when an event
//!    `allowed_lateness_ms` past its end reaches gold, so a window's latency is its emission time
//!    (the gold record's timestamp) less its end and the lateness: the pipeline's own delay,
//!    after the window's own wait. Reports p50/p99 over the windows the stream closed (goal
//!    p99 < 1 s).
//! 3. Peak RSS of each worker (goal < 256 MiB).
//!
//! `MEDALLION_PIPELINE_NEW_LEADS=1` makes the backlog lead events only, every one a new lead
//! (its own lead id): silver's state then grows with every event, the case for its store.
//!
//! Gold runs with 10 s windows and 2 s lateness here, so the latency phase closes windows
//! every 10 s.
//!
//! `cargo bench -p medallion-stages --bench pipeline`; `MEDALLION_TEST_BOOTSTRAP` /
//! `MEDALLION_TEST_REGISTRY_URL` use external services.

use std::time::{Duration, Instant};

use medallion_tests::{broker, contracts, metric_sum, read_until, registry, WorkerProcess};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

mod support;
use support::{now_ms, usage};

const RAW: &str = "connector.data.raw";
const GOLD: &str = "gold.data.ready";
const WINDOW_MS: i64 = 10_000;
const LATENESS_MS: i64 = 2_000;

struct Workers {
    bronze: WorkerProcess,
    silver: WorkerProcess,
    gold: WorkerProcess,
    rules: WorkerProcess,
}

/// Counters of the four workers at one scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counts {
    bronze_in: f64,
    bronze_done: f64,
    silver_in: f64,
    silver_out: f64,
    gold_in: f64,
    gold_out: f64,
    rules_in: f64,
}

async fn counts(w: &Workers) -> Option<Counts> {
    let done = |m: &str| {
        metric_sum(m, "medallion_records_out_total")
            + metric_sum(m, "medallion_dlq_records_total")
            + metric_sum(m, "medallion_duplicates_dropped_total")
    };
    let (b, s, g, r) = (
        w.bronze.metrics().await.ok()?,
        w.silver.metrics().await.ok()?,
        w.gold.metrics().await.ok()?,
        w.rules.metrics().await.ok()?,
    );
    Some(Counts {
        bronze_in: metric_sum(&b, "kafka_messages_in_total"),
        bronze_done: done(&b),
        silver_in: metric_sum(&s, "kafka_messages_in_total"),
        silver_out: metric_sum(&s, "medallion_records_out_total"),
        gold_in: metric_sum(&g, "kafka_messages_in_total"),
        gold_out: metric_sum(&g, "medallion_records_out_total"),
        rules_in: metric_sum(&r, "kafka_messages_in_total"),
    })
}

fn main() {
    support::run_bench(run);
}

async fn run() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = env("MEDALLION_PIPELINE_EVENTS", 1_000_000) as usize;
    let latency_seconds = env("MEDALLION_PIPELINE_LATENCY_SECONDS", 40);
    let broker = broker().expect("broker");
    let registry = registry().expect("registry");
    let (contracts, topics) = contracts().expect("contracts");
    let ids = support::provision(&broker.address, &registry.address, &contracts, &topics).await;
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection");
    let raw = contracts.get("connector/data-raw.avsc").expect("raw");
    let gold_contract = contracts.get("gold/data-ready.avsc").expect("gold");

    // Phase 1: the backlog, event times 2 ms apart an hour ago.
    let base_ms = now_ms() - 3_600_000;
    let templates = support::templates(&raw.schema, ids[RAW], base_ms);
    let records = if std::env::var_os("MEDALLION_PIPELINE_NEW_LEADS").is_some() {
        let leads = support::lead_templates(&raw.schema, ids[RAW], base_ms);
        support::new_lead_stream(&leads, n, base_ms)
    } else {
        support::stream(&templates, n, base_ms)
    };
    let produced = Instant::now();
    support::produce(&kafka, RAW, &records).await;
    drop(records);
    println!(
        "backlog: {n} events produced in {:.1} s",
        produced.elapsed().as_secs_f64()
    );

    let gold_env = [
        ("MEDALLION__STAGE__WINDOW_MS", WINDOW_MS.to_string()),
        (
            "MEDALLION__STAGE__ALLOWED_LATENESS_MS",
            LATENESS_MS.to_string(),
        ),
    ];
    let rules_file = medallion_tests::workspace_root().join("rules/default.yaml");
    let start = |bin: &str, env: &[(String, String)]| {
        WorkerProcess::start(bin, &broker.address, &registry.address, env).expect("worker starts")
    };
    let own = |pairs: &[(&str, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let started = Instant::now();
    let workers = Workers {
        bronze: start(
            env!("CARGO_BIN_EXE_bronze-processor"),
            &medallion_tests::bronze_env(&[]),
        ),
        silver: start(env!("CARGO_BIN_EXE_silver-processor"), &[]),
        gold: start(env!("CARGO_BIN_EXE_gold-processor"), &own(&gold_env)),
        rules: start(
            env!("CARGO_BIN_EXE_rule-evaluator"),
            &own(&[(
                "MEDALLION__STAGE__RULES_FILE",
                rules_file.display().to_string(),
            )]),
        ),
    };
    let deadline = Instant::now() + Duration::from_secs(3_600);
    let mut first_in: Option<Instant> = None;
    let mut last = Counts::default();
    let mut last_move = Instant::now();
    let end = loop {
        assert!(
            Instant::now() < deadline,
            "the pipeline did not drain within an hour"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(c) = counts(&workers).await else {
            continue;
        };
        if c.bronze_in > 0.0 && first_in.is_none() {
            first_in = Some(Instant::now());
        }
        if c != last {
            last = c;
            last_move = Instant::now();
            continue;
        }
        let drained = c.bronze_in >= n as f64
            && c.bronze_done >= c.bronze_in
            && c.silver_in > 0.0
            && c.gold_in >= c.silver_out
            && c.rules_in >= c.gold_out;
        if drained && last_move.elapsed() > Duration::from_millis(1_500) {
            break last_move;
        }
    };
    let from = first_in.unwrap_or(started);
    let seconds = end.duration_since(from).as_secs_f64();
    let rate = n as f64 / seconds;
    println!(
        "throughput: {n} events through bronze, silver, gold and rules in {seconds:.1} s = {rate:.0} events/s (goal >= 50000); bronze in {:.0}, silver in {:.0} out {:.0}, gold in {:.0} out {:.0}, rules in {:.0}; workers up {:.1} s before the first record",
        last.bronze_in,
        last.silver_in,
        last.silver_out,
        last.gold_in,
        last.gold_out,
        last.rules_in,
        from.duration_since(started).as_secs_f64()
    );

    // Phase 2: a live stream at half that rate, event time = produce time.
    let target = (rate / 2.0).max(100.0);
    let producer: ThreadedProducer<_> = kafka
        .config(medallion_runtime::kafka::Role::Producer {
            message_timeout_ms: 30_000,
        })
        .create()
        .expect("producer");
    let stream_started_ms = now_ms();
    let stream_started = Instant::now();
    let mut sent = 0usize;
    let stream_for = Duration::from_secs(latency_seconds);
    while stream_started.elapsed() < stream_for {
        let due = (stream_started.elapsed().as_secs_f64() * target) as usize;
        while sent < due {
            let (key, value) = support::event(&templates, n + sent, now_ms());
            support::send_waiting(
                &producer,
                BaseRecord::to(RAW)
                    .payload(value.as_slice())
                    .key(key.as_bytes()),
            );
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = producer.flush(Duration::from_secs(30));
    let stream_ended_ms = now_ms();
    // Let the last windows the stream closed come out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let gold = read_until(
        &broker.address,
        GOLD,
        |m| m.len() as f64 >= last.gold_out,
        Duration::from_secs(3),
        Duration::from_secs(300),
    )
    .await
    .expect("gold read");
    let mut latencies: Vec<i64> = Vec::new();
    for m in &gold {
        let Some(emitted) = m.timestamp().to_millis() else {
            continue;
        };
        let Ok((_, window)) = medallion_contracts::json::from_framed(
            m.payload().unwrap_or_default(),
            |_| Some(&gold_contract.schema),
            &gold_contract.schema,
        ) else {
            continue;
        };
        let Some(end) = window["payload"]["window_end"].as_i64() else {
            continue;
        };
        // Windows the live stream opened and closed while it flowed.
        if end - WINDOW_MS >= stream_started_ms && end + LATENESS_MS <= stream_ended_ms {
            latencies.push(emitted - (end + LATENESS_MS));
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> i64 {
        if latencies.is_empty() {
            return -1;
        }
        let at = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[at.min(latencies.len() - 1)]
    };
    println!(
        "latency at {target:.0} events/s ({sent} events over {latency_seconds} s): {} windows, produce → gold window emission after its {LATENESS_MS} ms lateness: p50 {} ms, p99 {} ms, max {} ms (goal p99 < 1000 ms)",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or(-1)
    );
    println!();
    println!("| worker | CPU s | peak RSS MiB (goal < 256) |");
    println!("|---|---|---|");
    for (name, w) in [
        ("bronze-processor", &workers.bronze),
        ("silver-processor", &workers.silver),
        ("gold-processor", &workers.gold),
        ("rule-evaluator", &workers.rules),
    ] {
        if let Some(u) = w.pid().and_then(usage) {
            println!(
                "| {name} | {:.1} | {:.1} |",
                u.cpu_seconds,
                u.peak_rss_kib as f64 / 1024.0
            );
        }
    }
}
