//! Recovery benchmark: bronze-processor (release) works through a backlog of connector events
//! while every connection it makes to the broker passes a proxy that injects one fault per run:
//! a 5.7 s and a 9.2 s black-hole (connections stay open, nothing moves), a 10 s refusal (the
//! port closed, open connections reset) and five resets of every open connection, 1 s apart.
//! Each run has its own topics (a naming prefix) and the worker's default session timeout
//! (10 s). Per fault it reports, from the worker's `/metrics` sampled every 100 ms:
//!
//! - **moves again**: from the broker's return to the first record acknowledged after it;
//! - **full rate**: from the broker's return until a 1 s window runs at ≥ 80% of the rate of
//!   the 2 s before the fault;
//! - **longest stall**: the longest time without an acknowledged record, fault included;
//! - **not ready**: how long `/readyz` answered 503, and whether it did during the fault.
//!
//! Targets: full rate within 3 s of the broker's return for faults shorter than the session
//! timeout (resets, black-holes), and within 15 s for a refusal (the session expires: the
//! group is joined again and the partitions rebuilt; see README, "Broker outages"); readiness
//! false during every fault of 5 s or more; nothing lost or repeated.
//!
//! `cargo bench -p medallion-stages --bench faults`; `MEDALLION_FAULT_EVENTS` sets the backlog
//! of each run (default 600,000); `MEDALLION_FAULTS` keeps the faults whose name contains one of
//! its comma-separated words (`refuse`, `blackhole`, `resets`); `MEDALLION_FAULT_WORKER_LOG`
//! is the worker's `RUST_LOG` (default `warn`).

use std::time::{Duration, Instant};

use medallion_tests::faults::{broker_behind_proxy, Fault};
use medallion_tests::{contracts, metric_sum, read_topic, registry, WorkerProcess};

// Shared with the other benchmarks, which use the rest of it.
#[allow(dead_code)]
mod support;
use support::now_ms;

const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";
const BIN: &str = env!("CARGO_BIN_EXE_bronze-processor");

/// Full rate within this long of the broker's return, in seconds.
fn target(fault: Fault) -> f64 {
    match fault {
        Fault::Refuse(_) => 15.0,
        _ => 3.0,
    }
}

/// One sample: seconds since the run started, records acknowledged, ready.
type Sample = (f64, f64, bool);

struct Recovery {
    moves_again: f64,
    full_rate: Option<f64>,
    longest_stall: f64,
    not_ready: f64,
    noticed: bool,
}

/// What the samples say about a fault from `from` to `to` (seconds since the run started).
fn recovery(samples: &[Sample], from: f64, to: f64) -> Recovery {
    let at = |t: f64| {
        samples
            .iter()
            .take_while(|s| s.0 <= t)
            .last()
            .map_or(0.0, |s| s.1)
    };
    let rate_before = (at(from) - at(from - 2.0)) / 2.0;
    let after: Vec<&Sample> = samples.iter().filter(|s| s.0 >= to).collect();
    let out_at_return = at(to);
    let moves_again = after
        .iter()
        .find(|s| s.1 > out_at_return)
        .map_or(f64::NAN, |s| s.0 - to);
    // The first 1 s window at 80% of the rate before the fault; a backlog finished sooner
    // than that counts as back at full rate where it finished.
    let (end, out_at_end) = samples.last().map_or((0.0, 0.0), |l| (l.0, l.1));
    let full_rate = after
        .iter()
        .find(|s| {
            (s.0 + 1.0 <= end && at(s.0 + 1.0) - s.1 >= 0.8 * rate_before)
                || (s.0 + 1.0 > end && s.1 >= out_at_end && s.1 > out_at_return)
        })
        .map(|s| s.0 - to);
    let until = to + full_rate.unwrap_or(60.0) + 1.0;
    let (mut longest, mut last_move, mut last_out) = (0.0f64, from, at(from));
    for s in samples.iter().filter(|s| s.0 >= from && s.0 <= until) {
        if s.1 > last_out {
            longest = longest.max(s.0 - last_move);
            last_move = s.0;
            last_out = s.1;
        }
    }
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.0 >= from && s.0 <= until)
        .collect();
    let step = 0.1;
    let not_ready = window.iter().filter(|s| !s.2).count() as f64 * step;
    let noticed = window.iter().any(|s| s.0 <= to + 0.5 && !s.2);
    Recovery {
        moves_again,
        full_rate,
        longest_stall: longest,
        not_ready,
        noticed,
    }
}

fn main() {
    support::run_bench(run);
}

async fn run() {
    let n: usize = std::env::var("MEDALLION_FAULT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600_000);
    let (broker, proxy) = broker_behind_proxy().await.expect("broker behind a proxy");
    let proxy = std::sync::Arc::new(proxy);
    let registry = registry().expect("registry");
    let (contracts, topics) = contracts().expect("contracts");
    let only = std::env::var("MEDALLION_FAULTS").unwrap_or_default();
    let faults: Vec<Fault> = [
        Fault::BlackHole(5.7),
        Fault::BlackHole(9.2),
        Fault::Refuse(10.0),
        Fault::Resets(5),
    ]
    .into_iter()
    .filter(|f| {
        let name = format!("{f:?}").to_lowercase();
        only.is_empty() || only.split(',').any(|w| name.contains(w.trim()))
    })
    .collect();
    let log = std::env::var("MEDALLION_FAULT_WORKER_LOG").unwrap_or_else(|_| "warn".into());
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection");
    println!("| fault | moves again s | full rate s | target s | longest stall s | not ready s | readiness noticed | exact | worker CPU s | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut misses = Vec::new();
    for (run, fault) in faults.into_iter().enumerate() {
        let prefix = format!("f{run}.");
        let prefixed = topics.clone().with_prefix(&prefix).expect("prefix");
        let ids =
            support::provision(&broker.address, &registry.address, &contracts, &prefixed).await;
        let raw = contracts.get("connector/data-raw.avsc").expect("raw");
        let base_ms = now_ms() - 3_600_000;
        let templates = support::templates(&raw.schema, ids[&format!("{prefix}{RAW}")], base_ms);
        let records = support::stream(&templates, n, base_ms);
        support::produce(&kafka, &format!("{prefix}{RAW}"), &records).await;
        drop(records);

        let worker = WorkerProcess::start(
            BIN,
            &broker.address,
            &registry.address,
            &medallion_tests::bronze_env(&[
                ("MEDALLION__NAMING__PREFIX", prefix.clone()),
                ("MEDALLION__KAFKA__SESSION_TIMEOUT_MS", "10000".into()),
                ("MEDALLION__BATCH__MAX_RECORDS", "5000".into()),
                ("RUST_LOG", log.clone()),
            ]),
        )
        .expect("worker starts");
        let client = reqwest::Client::new();
        let started = Instant::now();
        let mut samples: Vec<Sample> = Vec::new();
        let mut window: Option<(f64, f64)> = None;
        let mut injecting: Option<tokio::task::JoinHandle<(f64, f64)>> = None;
        let mut first_output: Option<f64> = None;
        let (mut last_out, mut last_move) = (0.0f64, Instant::now());
        let deadline = started + Duration::from_secs(600);
        loop {
            assert!(
                Instant::now() < deadline,
                "run {run} did not finish in 10 min"
            );
            let t = started.elapsed().as_secs_f64();
            let out = worker
                .metrics()
                .await
                .map(|m| metric_sum(&m, "medallion_records_out_total"))
                .unwrap_or(f64::NAN);
            let ready = client
                .get(format!("{}/readyz", worker.http))
                .timeout(Duration::from_millis(300))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if out.is_finite() {
                samples.push((t, out, ready));
            }
            if first_output.is_none() && out > 0.0 {
                first_output = Some(t);
            }
            // The fault comes 2 s into the work; the run ends when the backlog is through.
            if let (Some(first), None) = (first_output, &injecting) {
                if t >= first + 2.0 {
                    let proxy = proxy.clone();
                    injecting = Some(tokio::spawn(async move {
                        let from = started.elapsed().as_secs_f64();
                        fault.inject(&proxy).await;
                        (from, started.elapsed().as_secs_f64())
                    }));
                }
            }
            if let Some(done) = injecting
                .as_mut()
                .filter(|h| window.is_none() && h.is_finished())
            {
                window = Some(done.await.expect("fault injected"));
            }
            // Done when the backlog is through; a worker that stops moving for 60 s after the
            // fault is reported as it stands.
            if out > last_out {
                (last_out, last_move) = (out, Instant::now());
            }
            if window.is_some()
                && (out >= n as f64 || last_move.elapsed() > Duration::from_secs(60))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (from, to) = window.expect("fault injected");
        let fault_name = format!("{fault:?}");
        let r = recovery(&samples, from, to);
        let (cpu, rss_mib) = worker
            .pid()
            .and_then(support::usage)
            .map_or((f64::NAN, f64::NAN), |u| {
                (u.cpu_seconds, u.peak_rss_kib as f64 / 1024.0)
            });
        drop(worker);
        // What bronze wrote, read back: every event once (a read that falls short says so).
        let exact = match read_topic(
            &broker.address,
            &format!("{prefix}{BRONZE}"),
            n,
            Duration::from_secs(3),
            Duration::from_secs(180),
        )
        .await
        {
            Ok(out) => {
                let ids: std::collections::BTreeSet<Vec<u8>> = out
                    .iter()
                    .filter_map(|m| rdkafka::Message::payload(m).map(|p| p[6..42].to_vec()))
                    .collect();
                if out.len() == n && ids.len() == n {
                    "yes".to_string()
                } else {
                    format!("no: {} records, {} ids", out.len(), ids.len())
                }
            }
            Err(e) => format!("no: {e}"),
        };
        let full = r
            .full_rate
            .map_or("never".to_string(), |f| format!("{f:.2}"));
        println!(
            "| {} | {:.2} | {full} | {:.0} | {:.2} | {:.1} | {} | {} | {cpu:.1} | {rss_mib:.0} |",
            fault_name,
            r.moves_again,
            target(fault),
            r.longest_stall,
            r.not_ready,
            r.noticed,
            exact
        );
        if r.full_rate.is_none_or(|f| f > target(fault)) {
            misses.push(format!(
                "{}: full rate after {full} s (target {} s)",
                fault_name,
                target(fault)
            ));
        }
        if !matches!(fault, Fault::Resets(_)) && !r.noticed {
            misses.push(format!(
                "{}: /readyz stayed 200 through the fault",
                fault_name
            ));
        }
        if exact != "yes" {
            misses.push(format!("{}: output not exactly once", fault_name));
        }
    }
    for miss in &misses {
        println!("MISSED: {miss}");
    }
    assert!(misses.is_empty(), "{} target(s) missed", misses.len());
}
