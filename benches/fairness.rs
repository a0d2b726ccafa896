//! Fairness benchmark: one partition of `connector.data.raw` shared by 11 orgs, through
//! bronze-processor (release build, its own process, a real broker).
//!
//! Org A has a standing backlog of `MEDALLION_FAIRNESS_BACKLOG` records (default 1,000,000)
//! when bronze starts, and keeps producing at 100× each of the ten small orgs (1,000/s against
//! 10/s each) for `MEDALLION_FAIRNESS_SECONDS` (default 30). Three runs, each on a broker of its
//! own, in one process run:
//!
//! 1. **quiet**: the small orgs alone: their produce → output latency without a flood;
//! 2. **log order** (`fairness.enabled: false`, the scheduling before fair scheduling);
//! 3. **fair** (the default settings; `MEDALLION_FAIRNESS_MAX_SKIP_AHEAD` sets
//!    `fairness.max_skip_ahead`).
//!
//! With `MEDALLION_FAIRNESS_BURST=1`, A's backlog is not waiting when bronze starts: it comes
//! as a burst into the running bronze (produced as fast as the broker takes it, from the
//! stream's start, beside the stream), the case of one org replaying a day onto a live
//! partition. A produces through a client of its own, the small orgs through another.
//! `MEDALLION_FAIRNESS_RESTART_AT=<s>` also SIGKILLs bronze that many seconds into
//! the stream and starts it again at once (a crash or a rolling update onto the standing
//! backlog, with what it did past its committed offset recorded).
//!
//! Reports the small orgs' p50/p99/max latency per run (goal: fair p99 ≤ 2× quiet p99) and A's
//! throughput while it had a backlog (goal: fair ≥ 90% of log order's, which gives A the whole
//! worker, less the small orgs' 100/s), and per second of the stream the small orgs' worst
//! latency and A's output. `MEDALLION_FAIRNESS_RUNS=fair` (a list of `quiet`, `log`, `fair`)
//! runs only those.
//!
//! `cargo bench -p medallion-stages --bench fairness`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use medallion_tests::{broker, contracts, registry, WorkerProcess};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, FutureRecord, Producer, ThreadedProducer};

#[allow(dead_code)]
mod support;
use support::now_ms;

const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";
/// Event numbers of the small orgs' events start here (A's are below).
const SMALL_BASE: usize = 100_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Quiet,
    LogOrder,
    Fair,
}

#[derive(Default)]
struct Outcome {
    small: Vec<i64>,
    /// Per second of the stream: the small orgs' worst latency among the events produced in
    /// it, and A's records output in it.
    by_second: Vec<(i64, usize)>,
    /// Per second of the stream: the small orgs' worst produce → broker acknowledgement, the
    /// part of their latency no worker can take away.
    acked_by_second: Vec<i64>,
    /// Of the small orgs' events produced after the warm-up.
    settled: Vec<i64>,
    /// A's backlog records per second, from bronze's first output to the last of them.
    a_rate: f64,
}

/// Sends one record to partition 0 of the raw topic, waiting while the producer's queue is full.
fn send(
    producer: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    key: &str,
    value: &[u8],
) {
    support::send_waiting(
        producer,
        BaseRecord::to(RAW)
            .partition(0)
            .payload(value)
            .key(key.as_bytes()),
    );
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
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
    let backlog = env("MEDALLION_FAIRNESS_BACKLOG", 1_000_000) as usize;
    let seconds = env("MEDALLION_FAIRNESS_SECONDS", 30);
    let warmup = env("MEDALLION_FAIRNESS_WARMUP", 10).min(seconds.saturating_sub(1));
    let burst = env("MEDALLION_FAIRNESS_BURST", 0) == 1;
    let restart_at = std::env::var("MEDALLION_FAIRNESS_RESTART_AT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    // `MEDALLION_FAIRNESS_RUNS=fair` runs the fair scheduling alone (the others report empty).
    let runs = std::env::var("MEDALLION_FAIRNESS_RUNS").unwrap_or_else(|_| "quiet,log,fair".into());
    let quiet = if runs.contains("quiet") {
        one(Mode::Quiet, 0, seconds, warmup, false, restart_at).await
    } else {
        Outcome::default()
    };
    let log = if runs.contains("log") {
        one(Mode::LogOrder, backlog, seconds, warmup, burst, restart_at).await
    } else {
        Outcome::default()
    };
    let fair = one(Mode::Fair, backlog, seconds, warmup, burst, restart_at).await;
    if let Some(at) = restart_at {
        println!(
            "bronze SIGKILLed and started again {} s into the stream",
            at.as_secs()
        );
    }
    println!();
    println!(
        "A's {backlog} records {}",
        if burst {
            "as a burst into the running bronze"
        } else {
            "waiting when bronze starts"
        }
    );
    println!(
        "| run | small-org events | p50 ms | p99 ms | max ms | p99 ms after {warmup} s | A backlog events/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, o) in [("quiet", &quiet), ("log order", &log), ("fair", &fair)] {
        let mut s = o.small.clone();
        s.sort_unstable();
        let mut settled = o.settled.clone();
        settled.sort_unstable();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.0} |",
            s.len(),
            percentile(&s, 0.5),
            percentile(&s, 0.99),
            s.last().copied().unwrap_or(0),
            percentile(&settled, 0.99),
            o.a_rate
        );
    }
    println!("\nper second of the stream: the small orgs' worst latency (ms) of the events produced in it (worst broker acknowledgement) / A's records output in it");
    println!("| second | quiet | log order | fair |");
    println!("|---|---|---|---|");
    for s in 0..(seconds as usize).min(20) {
        let cell = |o: &Outcome| {
            o.by_second
                .get(s)
                .map(|(worst, a)| {
                    let acked = o.acked_by_second.get(s).copied().unwrap_or(0);
                    format!("{worst} ({acked}) / {a}")
                })
                .unwrap_or_default()
        };
        println!(
            "| {s} | {} | {} | {} |",
            cell(&quiet),
            cell(&log),
            cell(&fair)
        );
    }
    let p99 = |v: &[i64]| {
        let mut s = v.to_vec();
        s.sort_unstable();
        percentile(&s, 0.99).max(1) as f64
    };
    println!(
        "\nsmall orgs' p99, whole run: fair / quiet = {:.2} (goal <= 2), log order / quiet = {:.2}; after the warm-up: fair / quiet = {:.2}, log order / quiet = {:.2}",
        p99(&fair.small) / p99(&quiet.small),
        p99(&log.small) / p99(&quiet.small),
        p99(&fair.settled) / p99(&quiet.settled),
        p99(&log.settled) / p99(&quiet.settled),
    );
    println!(
        "A's backlog throughput: fair / (log order - 100/s) = {:.2} (goal >= 0.9)",
        fair.a_rate / (log.a_rate - 100.0).max(1.0)
    );
}

/// One run on a broker of its own; with `burst`, A's backlog is produced once bronze runs.
async fn one(
    mode: Mode,
    backlog: usize,
    seconds: u64,
    warmup: u64,
    burst: bool,
    restart_at: Option<Duration>,
) -> Outcome {
    let broker = broker().expect("broker");
    let registry = registry().expect("registry");
    let (contracts, topics) = contracts().expect("contracts");
    let ids = support::provision(&broker.address, &registry.address, &contracts, &topics).await;
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection");
    let raw = contracts.get("connector/data-raw.avsc").expect("raw");
    let bronze_schema = contracts
        .get("bronze/data-cleaned.avsc")
        .expect("bronze")
        .schema
        .clone();
    let templates = support::templates(&raw.schema, ids[RAW], now_ms() - 3_600_000);
    // A is the first template's org; the small orgs are ten others.
    let a_org = templates[0].0.clone();
    let a: Vec<(String, Vec<u8>)> = templates
        .iter()
        .filter(|(k, _)| *k == a_org)
        .cloned()
        .collect();
    let mut small_orgs: Vec<String> = templates
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| *k != a_org)
        .collect();
    small_orgs.sort();
    small_orgs.dedup();
    small_orgs.truncate(10);
    let small: Vec<(String, Vec<u8>)> = templates
        .iter()
        .filter(|(k, _)| small_orgs.contains(k))
        .cloned()
        .collect();
    // A and the small orgs are clients of their own, as they would be: a small org's record
    // never waits in a producer queue behind A's burst, only where the broker and the worker
    // make it wait.
    let a_producer: std::sync::Arc<ThreadedProducer<_>> = std::sync::Arc::new(
        kafka
            .config(medallion_runtime::kafka::Role::Producer {
                message_timeout_ms: 60_000,
            })
            .create()
            .expect("producer"),
    );
    let producer: rdkafka::producer::FutureProducer = kafka
        .config(medallion_runtime::kafka::Role::Producer {
            message_timeout_ms: 60_000,
        })
        .create()
        .expect("producer");
    let mut acks = Vec::new();
    let load = {
        let (producer, a) = (a_producer.clone(), a.clone());
        move || {
            let loaded = Instant::now();
            for i in 0..backlog {
                let (key, value) = support::event(&a, i, now_ms() - 3_600_000);
                send(&producer, key, &value);
            }
            let _ = producer.flush(Duration::from_secs(120));
            if backlog > 0 {
                println!(
                    "{mode:?}: A's backlog of {backlog} loaded in {:.1} s",
                    loaded.elapsed().as_secs_f64()
                );
            }
        }
    };
    let mut load = Some(load);
    if !burst {
        if let Some(load) = load.take() {
            load();
        }
    }
    let mut env: Vec<(String, String)> = medallion_tests::bronze_env(&[]);
    env.push((
        "MEDALLION__FAIRNESS__ENABLED".into(),
        (mode != Mode::LogOrder).to_string(),
    ));
    if let Ok(log) = std::env::var("MEDALLION_BENCH_LOG") {
        env.push(("RUST_LOG".into(), log));
    }
    // The default read-ahead, unless told: with the group's progress topic, what a restart
    // would read again is what the progress cannot claim, whatever the broker keeps.
    if let Ok(skip) = std::env::var("MEDALLION_FAIRNESS_MAX_SKIP_AHEAD") {
        env.push(("MEDALLION__FAIRNESS__MAX_SKIP_AHEAD".into(), skip));
    }
    let start = || {
        WorkerProcess::start(
            env!("CARGO_BIN_EXE_bronze-processor"),
            &broker.address,
            &registry.address,
            &env,
        )
        .expect("bronze starts")
    };
    let mut worker = start();
    let mut restart_at = restart_at;
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    // The stream: every 10 ms one small-org event (100/s in all, 10/s per org) and, with a
    // flood, ten of A's (1,000/s).
    let burst = load.map(tokio::task::spawn_blocking);
    let mut sent_at: HashMap<usize, i64> = HashMap::new();
    let started = Instant::now();
    let started_ms = now_ms();
    let mut tick = 0usize;
    let mut a_next = backlog;
    while started.elapsed() < Duration::from_secs(seconds) {
        if restart_at.is_some_and(|at| started.elapsed() >= at) {
            restart_at = None;
            worker.kill();
            worker = start();
        }
        let due = (started.elapsed().as_millis() / 10) as usize;
        while tick < due {
            let i = SMALL_BASE + tick;
            let t = now_ms();
            let (key, value) = support::event(&small, i, t);
            let delivery = medallion_runtime::kafka::io::send_queued(
                &producer,
                FutureRecord::to(RAW).partition(0).payload(&value).key(key),
            )
            .await
            .expect("queued");
            acks.push(tokio::spawn(async move {
                let _ = delivery.await;
                (t, now_ms() - t)
            }));
            sent_at.insert(i, t);
            if mode != Mode::Quiet {
                for _ in 0..10 {
                    let (key, value) = support::event(&a, a_next, t);
                    send(&a_producer, key, &value);
                    a_next += 1;
                }
            }
            tick += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if let Some(burst) = burst {
        burst.await.expect("burst produced");
    }
    let _ = producer.flush(Duration::from_secs(60));
    let _ = a_producer.flush(Duration::from_secs(60));
    let expected = a_next + tick;
    let out = medallion_tests::read_topic(
        &broker.address,
        BRONZE,
        expected,
        Duration::from_secs(1),
        Duration::from_secs(600),
    )
    .await
    .expect("bronze output");
    let mut small_latency = Vec::new();
    let mut settled = Vec::new();
    let warm_from = started_ms + 1_000 * warmup as i64;
    let mut first_out = i64::MAX;
    let mut a_backlog_done = 0i64;
    let second_of = |t: i64| ((t - started_ms).max(0) / 1_000) as usize;
    let mut by_second = vec![(0i64, 0usize); seconds as usize + 1];
    let mut acked_by_second = vec![0i64; seconds as usize + 1];
    for ack in acks {
        if let Ok((t, took)) = ack.await {
            if let Some(s) = acked_by_second.get_mut(second_of(t)) {
                *s = (*s).max(took);
            }
        }
    }
    for m in &out {
        let Some(value) = m.payload() else { continue };
        let Ok(event) = medallion_contracts::json::from_avro_binary(
            &value[5..],
            &bronze_schema,
            &bronze_schema,
        ) else {
            continue;
        };
        let Some(id) = event["event_id"].as_str() else {
            continue;
        };
        let Ok(i) = usize::from_str_radix(&id[id.len() - 12..], 16) else {
            continue;
        };
        let at = m.timestamp().to_millis().unwrap_or(0);
        first_out = first_out.min(at);
        if i >= SMALL_BASE {
            if let Some(t) = sent_at.get(&i) {
                small_latency.push(at - t);
                if let Some(s) = by_second.get_mut(second_of(*t)) {
                    s.0 = s.0.max(at - t);
                }
                if *t >= warm_from {
                    settled.push(at - t);
                }
            }
        } else {
            if let Some(s) = by_second.get_mut(second_of(at)) {
                s.1 += 1;
            }
            if i < backlog {
                a_backlog_done = a_backlog_done.max(at);
            }
        }
    }
    let a_rate = if backlog > 0 && a_backlog_done > first_out {
        backlog as f64 / ((a_backlog_done - first_out) as f64 / 1_000.0)
    } else {
        0.0
    };
    println!(
        "{mode:?}: {} outputs of {expected}, {} small-org latencies",
        out.len(),
        small_latency.len()
    );
    drop(worker);
    Outcome {
        small: small_latency,
        by_second,
        acked_by_second,
        settled,
        a_rate,
    }
}
