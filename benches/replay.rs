//! Replay benchmark: ≥ 1M Confluent-framed connector events through bronze-processor on a
//! real broker, side by side with a bare consume→produce passthrough of the same bytes in the
//! same run; then bronze's output through silver-processor and silver's through
//! gold-processor, each as its own process. Reports events/s, CPU seconds of the worker
//! process, events per CPU-second and peak RSS. Targets: bronze ≥ 0.5× the passthrough's
//! events/s and ≥ 150k events per CPU-second with PII on; silver ≥ 100k and gold ≥ 200k
//! events per CPU-second; peak RSS < 256 MiB. Event times rise
//! 2 ms per event, so gold closes a window every 30 000 events.
//!
//! `cargo bench -p medallion-stages --bench replay`; `MEDALLION_REPLAY_EVENTS` overrides the
//! count; `MEDALLION_TEST_BOOTSTRAP` / `MEDALLION_TEST_REGISTRY_URL` use external services.
//! `MEDALLION_REPLAY_BASELINE=<dir>` also runs the `bronze-processor`, `silver-processor` and
//! `gold-processor` found in `<dir>` (an earlier build) on the same events in the same run,
//! each right after this build's, under the naming prefix `base.`: a before/after comparison
//! on one machine state (`MEDALLION_REPLAY_BASELINE_FIRST=1` runs the baseline first).
//! `MEDALLION_REPLAY_BASELINE_ENV="KEY=value;KEY=value"` gives the baseline's workers those
//! settings on top of the environment; without `MEDALLION_REPLAY_BASELINE` the baseline is this
//! build with them: a setting's cost measured in one run (e.g.
//! `MEDALLION_REPLAY_BASELINE_ENV="MEDALLION__FAIRNESS__ENABLED=false"`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use medallion_runtime::ops::capture::{read_capture, CaptureWriter};
use medallion_tests::{broker, contracts, metric_sum, registry, WorkerProcess};

// Shared with the other benchmarks, which use the rest of it.
#[allow(dead_code)]
mod support;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message;
use support::{now_ms, usage, Usage};

const RAW: &str = "connector.data.raw";
const PASSTHROUGH_TOPIC: &str = "replay.passthrough";
const BIN: &str = env!("CARGO_BIN_EXE_bronze-processor");
const SILVER_BIN: &str = env!("CARGO_BIN_EXE_silver-processor");
const GOLD_BIN: &str = env!("CARGO_BIN_EXE_gold-processor");
/// Runs `bin` until it has consumed `expected` records; returns wall seconds from its first
/// record, its CPU and peak RSS, and its last `/metrics` scrape.
async fn measure(
    bin: &str,
    build: &Build,
    bootstrap: &str,
    registry: &str,
    expected: f64,
) -> (f64, Usage, String) {
    let mut batching = vec![
        ("MEDALLION__BATCH__MAX_RECORDS", "5000".to_string()),
        ("MEDALLION__BATCH__LINGER_MS", "20".to_string()),
        ("MEDALLION__NAMING__PREFIX", build.prefix.to_string()),
    ];
    batching.extend(build.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let worker = WorkerProcess::start(
        bin,
        bootstrap,
        registry,
        &if bin.ends_with("bronze-processor") {
            medallion_tests::bronze_env(&batching)
        } else {
            batching
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        },
    )
    .expect("worker starts");
    let pid = worker.pid().expect("pid");
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(1_800);
    loop {
        assert!(
            Instant::now() < deadline,
            "{bin} did not finish within 30 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(metrics) = worker.metrics().await else {
            continue;
        };
        let consumed = metric_sum(&metrics, "kafka_messages_in_total");
        if consumed > 0.0 && started.is_none() {
            started = Some(Instant::now());
        }
        if consumed >= expected {
            let consumed_at = Instant::now();
            let seconds = started
                .map(|s| s.elapsed().as_secs_f64())
                .unwrap_or_default();
            let mut usage = usage(pid).expect("worker usage");
            // Until the last records derived from the input are acknowledged (the counters
            // move as flights land): the run ends at the last move.
            let mut settled = metrics;
            let mut last_move = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(next) = worker.metrics().await else {
                    break;
                };
                let done = |m: &str| {
                    metric_sum(m, "medallion_records_out_total")
                        + metric_sum(m, "medallion_dlq_records_total")
                        + metric_sum(m, "medallion_duplicates_dropped_total")
                };
                let stable = done(&next) == done(&settled);
                settled = next;
                if !stable {
                    last_move = Instant::now();
                    if let Some(u) = self::usage(pid) {
                        usage = u;
                    }
                } else if last_move.elapsed() > Duration::from_millis(1_500) {
                    break;
                }
            }
            let seconds = seconds + last_move.duration_since(consumed_at).as_secs_f64();
            return (seconds, usage, settled);
        }
    }
}

/// A build of the workers to measure: this one, or an earlier one from a directory.
struct Build {
    label: &'static str,
    /// The naming prefix its topics and groups run under.
    prefix: &'static str,
    dir: Option<std::path::PathBuf>,
    /// Settings its workers get on top of the environment.
    env: Vec<(String, String)>,
}

impl Build {
    /// The path of worker `name` (this build's is `own`).
    fn bin(&self, name: &str, own: &str) -> String {
        match &self.dir {
            Some(dir) => dir.join(name).display().to_string(),
            None => own.to_string(),
        }
    }

    fn name(&self, worker: &str) -> String {
        if self.label.is_empty() {
            worker.to_string()
        } else {
            format!("{worker} ({})", self.label)
        }
    }
}

/// Counts the passthrough's acknowledgements.
struct Acked(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl rdkafka::ClientContext for Acked {}

impl rdkafka::producer::ProducerContext for Acked {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        assert!(result.is_ok(), "passthrough delivery failed: {result:?}");
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The passthrough role, the fair ceiling: consume `n` records and produce the same bytes as
/// they come, never waiting for an acknowledgement before taking the next record (the
/// producer's delivery callback counts them), with the workers' producer settings; offsets are
/// committed every second. Done when every record is acknowledged. Prints its figures.
async fn passthrough(bootstrap: &str, n: u64) {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "replay-passthrough")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[RAW]).expect("subscribe");
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer: ThreadedProducer<Acked> =
        medallion_runtime::kafka::KafkaConnection::plain(bootstrap)
            .expect("connection")
            .config(medallion_runtime::kafka::Role::Producer {
                message_timeout_ms: 30_000,
            })
            .create_with_context(Acked(acked.clone()))
            .expect("producer");
    let mut seen = 0u64;
    let mut started: Option<Instant> = None;
    while seen < n {
        let m = consumer.recv().await.expect("record");
        started.get_or_insert_with(Instant::now);
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(PASSTHROUGH_TOPIC).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        seen += 1;
    }
    while acked.load(std::sync::atomic::Ordering::Relaxed) < seen {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or_default();
    let _ = producer.flush(Duration::from_secs(10));
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    let usage = usage(std::process::id()).expect("own usage");
    println!(
        "PASSTHROUGH {seen} {seconds:.3} {:.3} {}",
        usage.cpu_seconds, usage.peak_rss_kib
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(spec) = std::env::var("MEDALLION_REPLAY_PASSTHROUGH") {
        let (bootstrap, n) = spec.split_once('|').expect("bootstrap|n");
        runtime.block_on(passthrough(bootstrap, n.parse().expect("n")));
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` would too: only run when benching.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    runtime.block_on(run());
}

async fn run() {
    let n: usize = std::env::var("MEDALLION_REPLAY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let broker = broker().expect("broker");
    let registry = registry().expect("registry");
    let (contracts, mut topics) = contracts().expect("contracts");
    // A scratch topic for the passthrough, shaped like the input.
    let mut scratch = topics.topics[RAW].clone();
    scratch.dlq = None;
    topics.topics.insert(PASSTHROUGH_TOPIC.into(), scratch);
    let ids = support::provision(&broker.address, &registry.address, &contracts, &topics).await;
    let raw = contracts.get("connector/data-raw.avsc").expect("raw");

    // n unique events: 10k realistic templates, each copy with its own event_id.
    let base_ms = now_ms() - 3_600_000;
    let templates = support::templates(&raw.schema, ids[RAW], base_ms);
    // The stream goes through a capture file and `medallion replay`'s own code path.
    let capture_path =
        std::env::temp_dir().join(format!("medallion-replay-{}.cap", std::process::id()));
    {
        let file = std::fs::File::create(&capture_path).expect("capture file");
        let mut writer = CaptureWriter::new(std::io::BufWriter::new(file)).expect("writer");
        for record in support::stream(&templates, n, base_ms) {
            writer.write(&record).expect("written");
        }
        writer.finish().expect("flushed");
    }
    let records = read_capture(&capture_path).expect("capture readable");
    let _ = std::fs::remove_file(&capture_path);
    let produce_started = Instant::now();
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection");
    let bytes = support::produce(&kafka, RAW, &records).await as usize;
    let mut builds = vec![Build {
        label: "",
        prefix: "",
        dir: None,
        env: Vec::new(),
    }];
    let baseline_env: Vec<(String, String)> = std::env::var("MEDALLION_REPLAY_BASELINE_ENV")
        .unwrap_or_default()
        .split(';')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => panic!("MEDALLION_REPLAY_BASELINE_ENV: {kv:?} is not KEY=value"),
        })
        .collect();
    let baseline_dir = std::env::var("MEDALLION_REPLAY_BASELINE").ok();
    if baseline_dir.is_some() || !baseline_env.is_empty() {
        let base = Build {
            label: "baseline",
            prefix: "base.",
            dir: baseline_dir.map(Into::into),
            env: baseline_env,
        };
        let prefixed = topics.clone().with_prefix(base.prefix).expect("prefix");
        support::provision(&broker.address, &registry.address, &contracts, &prefixed).await;
        support::produce(&kafka, &format!("{}{RAW}", base.prefix), &records).await;
        builds.push(base);
        // Which build runs first on each stage can be swapped, to see an order effect.
        if std::env::var_os("MEDALLION_REPLAY_BASELINE_FIRST").is_some() {
            builds.reverse();
        }
    }
    drop(records);
    let produce_seconds = produce_started.elapsed().as_secs_f64();
    println!(
        "replay: {n} events ({:.1} MB, {} B avg) produced in {produce_seconds:.1} s ({:.0} events/s)",
        bytes as f64 / 1e6,
        bytes / n.max(1),
        n as f64 / produce_seconds
    );

    // The broker shares the machine: its CPU per run shows what each run asks of it.
    let broker_cpu = || {
        broker
            .pid()
            .and_then(usage)
            .map_or(f64::NAN, |u| u.cpu_seconds)
    };

    // Passthrough, as its own process.
    let broker_before = broker_cpu();
    let exe = std::env::current_exe().expect("own path");
    let output = Command::new(exe)
        .env(
            "MEDALLION_REPLAY_PASSTHROUGH",
            format!("{}|{n}", broker.address),
        )
        .stderr(Stdio::inherit())
        .output()
        .expect("passthrough runs");
    let line = String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|l| l.starts_with("PASSTHROUGH"))
        .map(str::to_string)
        .expect("passthrough figures");
    let parts: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (pt_seconds, pt_cpu, pt_rss) = (parts[1], parts[2], parts[3]);
    let pt_broker = broker_cpu() - broker_before;

    // bronze-processor of each build, as its own process.
    let pt_rate = n as f64 / pt_seconds;
    println!();
    println!(
        "| run | events | wall s | events/s | CPU s | events/CPU-s | peak RSS MiB | broker CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| passthrough | {n} | {pt_seconds:.2} | {pt_rate:.0} | {pt_cpu:.2} | {:.0} | {:.1} | {pt_broker:.2} |",
        n as f64 / pt_cpu.max(0.01),
        pt_rss / 1024.0
    );
    let mut expected = Vec::new();
    let mut notes = Vec::new();
    for build in &builds {
        let broker_before = broker_cpu();
        let (seconds, usage, metrics) = measure(
            &build.bin("bronze-processor", BIN),
            build,
            &broker.address,
            &registry.address,
            n as f64,
        )
        .await;
        let bronze_broker = broker_cpu() - broker_before;
        let out = metric_sum(&metrics, "medallion_records_out_total");
        let dedup_bytes = metric_sum(&metrics, "medallion_dedup_window_bytes");
        let batches = metric_sum(&metrics, "medallion_batch_duration_seconds_count");
        let bronze_rate = n as f64 / seconds;
        println!(
            "| {} | {n} | {seconds:.2} | {bronze_rate:.0} | {:.2} | {:.0} | {:.1} | {bronze_broker:.2} |",
            build.name("bronze-processor"),
            usage.cpu_seconds,
            n as f64 / usage.cpu_seconds.max(0.01),
            usage.peak_rss_kib as f64 / 1024.0
        );
        notes.push(format!(
            "{}/passthrough = {:.2} (target >= 0.5); bronze out {out:.0}; dedup windows {:.1} MiB; {batches:.0} batches of {:.0} records on average",
            build.name("bronze"),
            bronze_rate / pt_rate,
            dedup_bytes / 1_048_576.0,
            n as f64 / batches.max(1.0)
        ));
        expected.push(out);
    }

    // silver on bronze's output, then gold on silver's, each build on its own.
    for (name, own) in [
        ("silver-processor", SILVER_BIN),
        ("gold-processor", GOLD_BIN),
    ] {
        for (build, expected) in builds.iter().zip(expected.iter_mut()) {
            let broker_before = broker_cpu();
            let (seconds, usage, metrics) = measure(
                &build.bin(name, own),
                build,
                &broker.address,
                &registry.address,
                *expected,
            )
            .await;
            let on_broker = broker_cpu() - broker_before;
            let produced = metric_sum(&metrics, "medallion_records_out_total");
            let dead = metric_sum(&metrics, "medallion_dlq_records_total").max(0.0);
            println!(
                "| {} | {expected:.0} | {seconds:.2} | {:.0} | {:.2} | {:.0} | {:.1} | {on_broker:.2} |  out {produced:.0}, DLQ {dead:.0}",
                build.name(name),
                *expected / seconds.max(0.001),
                usage.cpu_seconds,
                *expected / usage.cpu_seconds.max(0.01),
                usage.peak_rss_kib as f64 / 1024.0
            );
            *expected = produced;
        }
    }
    println!();
    for note in notes {
        println!("{note}");
    }
}
