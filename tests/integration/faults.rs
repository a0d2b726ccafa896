//! Broker faults on a stream: every connection bronze and silver (and the test's own
//! producer) make to the broker passes a proxy that refuses, black-holes and resets them while
//! events flow. What comes out must be what an undisturbed run gives: every valid event once in
//! bronze and in silver, the DLQ exactly the bad records, no good record dead-lettered; each
//! worker not ready while the broker is away and ready again after; and the counters equal to
//! what the topics hold. Recovery times are measured by `benches/faults.rs`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medallion_contracts::sample::SampleEvents;
use medallion_tests::faults::{broker_behind_proxy, Fault, FaultProxy};
use medallion_tests::{metric_sum, read_topic, read_until};
use serde_json::Value as Json;

use crate::bronze::{id_of, now_ms, Pipeline};
use crate::stages::{wait_metric, SILVER_BIN};

const RAW: &str = "connector.data.raw";
const RAW_DLQ: &str = "connector.data.raw.dlq";
const BRONZE: &str = "bronze.data.cleaned";
const BRONZE_DLQ: &str = "bronze.data.cleaned.dlq";
const SILVER: &str = "silver.data.processed";
/// The harness's session timeout is 6 s: faults longer than that cost the workers their
/// assignment (a rejoin and a rebuild), shorter ones must not.
const FAULTS: &[(f64, Fault)] = &[
    (5.0, Fault::Refuse(8.0)),
    (17.0, Fault::BlackHole(4.0)),
    (25.0, Fault::Resets(3)),
    (30.0, Fault::BlackHole(8.0)),
];
/// How long the stream is produced for.
const PRODUCING_FOR: Duration = Duration::from_secs(42);

/// Fields bronze encrypts in `event` (non-blank personal data).
fn personal_fields(event: &Json) -> u64 {
    let payload = &event["payload"];
    [
        &payload["lead_created"]["email"],
        &payload["lead_created"]["name"],
        &payload["case_sync"]["owner"],
    ]
    .iter()
    .filter(|v| v.as_str().is_some_and(|s| !s.trim().is_empty()))
    .count() as u64
}

/// Readiness of each worker, sampled every 200 ms: (seconds since start, ready per worker).
type Readiness = Arc<Mutex<Vec<(f64, Vec<bool>)>>>;

fn sample_readiness(
    urls: Vec<String>,
    started: Instant,
) -> (Readiness, tokio::task::JoinHandle<()>) {
    let samples: Readiness = Arc::default();
    let out = samples.clone();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::new();
        loop {
            let mut ready = Vec::new();
            for url in &urls {
                let ok = client
                    .get(format!("{url}/readyz"))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                ready.push(ok);
            }
            if let Ok(mut s) = out.lock() {
                s.push((started.elapsed().as_secs_f64(), ready));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (samples, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn bronze_and_silver_lose_nothing_and_repeat_nothing_through_refusals_black_holes_and_resets()
{
    let (broker, proxy) = broker_behind_proxy().await.expect("broker behind a proxy");
    let p = Pipeline::start_on(broker).await;

    // The stream: valid events, ~1% exact duplicates of a recent one, ~1% undecodable.
    let n = 24_000usize;
    let mut generator = SampleEvents::new(27, 6, now_ms() - 3_600_000);
    let mut valid: Vec<Json> = Vec::with_capacity(n);
    let mut records: Vec<(String, Vec<u8>)> = Vec::with_capacity(n + n / 50);
    let mut poison = 0usize;
    let mut duplicates = 0usize;
    for i in 0..n {
        let e = generator.next_event();
        let key = e["org_id"].to_string();
        let frame = p.frame(&e);
        records.push((key.clone(), frame.clone()));
        valid.push(e);
        if i % 100 == 37 && i > 100 {
            let earlier = &valid[i - 1 - (i % 50)];
            records.push((earlier["org_id"].to_string(), p.frame(earlier)));
            duplicates += 1;
        }
        if i % 100 == 71 {
            let mut bad = frame;
            bad.truncate(bad.len() / 2);
            records.push((key, bad));
            poison += 1;
        }
    }
    let expected: BTreeSet<String> = valid.iter().map(id_of).collect();
    let pii: u64 = valid.iter().map(personal_fields).sum();

    let log = (
        "RUST_LOG",
        "warn,medallion_stages=error,medallion_runtime::worker=info".to_string(),
    );
    // Fair scheduling on: its readers must survive the faults too.
    let fair = ("MEDALLION__FAIRNESS__ENABLED", "true".to_string());
    let bronze = p.worker(&[log.clone(), fair.clone()]);
    let silver = p.worker_of(SILVER_BIN, &[log, fair]);
    for w in [&bronze, &silver] {
        w.wait_ready(Duration::from_secs(60)).await.expect("ready");
    }

    let started = Instant::now();
    let (readiness, sampling) =
        sample_readiness(vec![bronze.http.clone(), silver.http.clone()], started);
    // Produced at a steady pace through the proxy, faults and all (the producer retries).
    let production = p.produce_paced(RAW, records, started, PRODUCING_FOR);
    let mut windows = Vec::new();
    for (at, fault) in FAULTS {
        tokio::time::sleep_until((started + Duration::from_secs_f64(*at)).into()).await;
        let from = started.elapsed().as_secs_f64();
        fault.inject(&proxy).await;
        let to = started.elapsed().as_secs_f64();
        eprintln!("{from:>6.1}–{to:>5.1} s: {fault:?}");
        windows.push((from, to, *fault));
    }
    production.await.expect("production");

    let within = Duration::from_secs(240);
    let read = |topic: &'static str| {
        let (p, expected) = (&p, &expected);
        async move {
            p.read_sources(topic, expected, Duration::from_secs(4), within)
                .await
                .unwrap_or_else(|(e, _)| panic!("{e}"))
        }
    };
    let bronze_out = read(BRONZE).await;
    let silver_out = read(SILVER).await;
    assert_eq!(bronze_out.len(), expected.len(), "no event twice in bronze");
    assert_eq!(silver_out.len(), expected.len(), "no event twice in silver");
    let dlq = read_topic(
        &p.broker.address,
        RAW_DLQ,
        poison,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await
    .expect("bronze's dead letters");
    assert_eq!(dlq.len(), poison, "exactly the bad records, each once");
    let silver_dlq = read_until(
        &p.broker.address,
        BRONZE_DLQ,
        |_| true,
        Duration::from_secs(3),
        Duration::from_secs(30),
    )
    .await
    .expect("silver's dead letters");
    assert!(silver_dlq.is_empty(), "silver dead-lettered good records");
    sampling.abort();

    // Readiness: false while the broker was away long enough to be noticed (a probe every
    // 0.5 s, two failures in a row), true again once it is back and the work is done.
    let samples = readiness.lock().map(|s| s.clone()).unwrap_or_default();
    let mut last: Option<&Vec<bool>> = None;
    for (t, ready) in &samples {
        if last != Some(ready) {
            eprintln!("{t:>6.1} s: ready (bronze, silver) = {ready:?}");
            last = Some(ready);
        }
    }
    for (from, to, fault) in &windows {
        if fault.lasts() < 6.0 {
            continue;
        }
        for (worker, name) in [(0, "bronze"), (1, "silver")] {
            let noticed = samples
                .iter()
                .any(|(t, ready)| t >= from && *t <= to + 1.0 && !ready[worker]);
            assert!(
                noticed,
                "{name} stayed ready through {fault:?} ({from:.1}–{to:.1} s)"
            );
        }
    }
    for w in [&bronze, &silver] {
        w.wait_ready(Duration::from_secs(30))
            .await
            .expect("ready again");
    }

    // The counters equal the topics' contents: replays are counted apart, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (b, s) = (
            bronze.metrics().await.expect("bronze metrics"),
            silver.metrics().await.expect("silver metrics"),
        );
        let sum = |m: &str, name: &str| metric_sum(m, name) as u64;
        let accounted = |m: &str| {
            sum(m, "medallion_records_out_total")
                + sum(m, "medallion_dlq_records_total")
                + sum(m, "medallion_duplicates_dropped_total")
                + sum(m, "medallion_replayed_records_total")
        };
        let settled = [&b, &s]
            .iter()
            .all(|m| accounted(m) == sum(m, "kafka_messages_in_total"));
        if settled || Instant::now() > deadline {
            eprintln!(
                "bronze: consumed {}, replayed {}, duplicates {}; silver: consumed {}, replayed {}",
                sum(&b, "kafka_messages_in_total"),
                sum(&b, "medallion_replayed_records_total"),
                sum(&b, "medallion_duplicates_dropped_total"),
                sum(&s, "kafka_messages_in_total"),
                sum(&s, "medallion_replayed_records_total"),
            );
            assert!(settled, "every record consumed has one outcome:\n{b}\n{s}");
            assert_eq!(
                sum(&b, "medallion_records_out_total"),
                expected.len() as u64
            );
            assert_eq!(sum(&b, "medallion_dlq_records_total"), poison as u64);
            assert_eq!(sum(&b, "medallion_pii_fields_encrypted_total"), pii);
            // A duplicate read again after a lost session is a replay, not a second duplicate.
            assert_eq!(
                sum(&b, "medallion_duplicates_dropped_total"),
                duplicates as u64
            );
            assert_eq!(
                sum(&s, "medallion_records_out_total"),
                expected.len() as u64
            );
            assert_eq!(sum(&s, "medallion_dlq_records_total"), 0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop((bronze, silver));
}

/// The proxy itself: a reset breaks open connections, a black-hole holds bytes without
/// closing, a refusal closes the port; forwarding again restores each.
#[tokio::test(flavor = "multi_thread")]
async fn the_fault_proxy_resets_holds_and_refuses() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("echo");
    let upstream = echo.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let proxy = FaultProxy::start(&upstream).await.expect("proxy");
    let connect = || tokio::net::TcpStream::connect(proxy.address.clone());
    let round_trip = |mut s: tokio::net::TcpStream| async move {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok::<_, std::io::Error>((s, buf))
    };
    let (s, buf) = round_trip(connect().await.expect("connects"))
        .await
        .expect("echo");
    assert_eq!(&buf, b"ping");

    proxy.black_hole();
    let err = round_trip(s).await.expect_err("held");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    proxy.forward();

    let (mut s, _) = round_trip(connect().await.expect("connects"))
        .await
        .expect("echo");
    proxy.reset();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut buf = [0u8; 4];
    let read = s.read(&mut buf).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(read, Ok(0)),
        "{read:?}"
    );

    proxy.refuse();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = connect().await.expect_err("refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    proxy.forward();
    tokio::time::sleep(Duration::from_millis(100)).await;
    round_trip(connect().await.expect("connects again"))
        .await
        .expect("echo again");
    assert!(proxy.accepted() >= 3);
}

/// What a worker asked to stop has to finish within: well inside the pods' 60 s grace period,
/// after which Kubernetes kills it.
const STOPS_WITHIN: Duration = Duration::from_secs(30);

/// A worker told to stop while every broker connection stalls (or is refused) still exits,
/// on its own and within [`STOPS_WITHIN`]: the acknowledgements, the last commit and leaving
/// the group all need the broker, and waiting for them must be bounded. Without the bound the
/// wait for acknowledgements took the whole produce timeout, and a commit the broker never
/// answered had no bound at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_asked_to_stop_while_the_broker_is_away_exits_in_time() {
    let (broker, proxy) = broker_behind_proxy().await.expect("broker behind a proxy");
    let p = Pipeline::start_on(broker).await;
    let mut generator = SampleEvents::new(29, 6, now_ms() - 3_600_000);
    for stalled in [true, false] {
        let fault = if stalled { "stalled" } else { "refused" };
        proxy.forward();
        // A backlog, so the worker is mid-stream (batches in flight, output being produced)
        // when the broker goes away.
        let records: Vec<(String, Vec<u8>)> = (0..20_000)
            .map(|_| {
                let e = generator.next_event();
                (e["org_id"].to_string(), p.frame(&e))
            })
            .collect();
        futures::future::join_all(records.iter().map(|(key, value)| p.send(key, value))).await;
        let mut bronze = p.worker(&[]);
        bronze
            .wait_ready(Duration::from_secs(60))
            .await
            .expect("ready");
        wait_metric(&bronze, "medallion_records_out_total", "", 1.0).await;
        if stalled {
            proxy.black_hole();
        } else {
            proxy.refuse();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let asked = Instant::now();
        let stopped = tokio::task::spawn_blocking(move || bronze.terminate(STOPS_WITHIN))
            .await
            .expect("joined");
        eprintln!(
            "connections {fault}: stopped in {:.1} s: {stopped:?}",
            asked.elapsed().as_secs_f64()
        );
        assert!(
            stopped.is_ok(),
            "connections {fault}: the worker did not exit within {STOPS_WITHIN:?} of SIGTERM"
        );
    }
    proxy.forward();
}
