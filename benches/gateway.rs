//! Realtime gateway benchmark: `MEDALLION_GATEWAY_CONNECTIONS` (default 10,000) concurrent SSE
//! connections over 100 orgs on loopback to realtime-gateway (release build, its own process,
//! a real broker and registry), while alerts are produced at `MEDALLION_GATEWAY_RATE` (default
//! 1,000/s, 10/s per org) for `MEDALLION_GATEWAY_SECONDS` (default 20); every alert reaches
//! the connections of its org.
//!
//! A plain consumer of `rules.alerts.triggered` in the same run is the floor (tansu paces
//! fetches). Reports, over every delivery:
//! - Kafka timestamp → client receipt, p50/p99/max (goal: p99 < 250 ms);
//! - the plain consumer's Kafka timestamp → receipt, the floor;
//! - the gateway's own share, plain consumer receipt → client receipt (goal: p99 < 50 ms);
//! - the gateway's resident memory per idle connection (goal: < 20 KiB);
//! - the gateway's CPU seconds per 1,000,000 messages delivered.
//!
//! `cargo bench -p medallion-stages --bench gateway`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use medallion_contracts::json::to_framed;
use medallion_tests::{broker, contracts, free_port, registry, WorkerProcess};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;

#[allow(dead_code, unused_imports)]
mod support;

const BIN: &str = env!("CARGO_BIN_EXE_realtime-gateway");
const ALERTS: &str = "rules.alerts.triggered";
const SECRET: &str = "gateway-bench-secret";
const ORGS: u64 = 100;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Resident memory of `pid` now (not its peak), KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn alert(seq: u64) -> serde_json::Value {
    medallion_tests::envelope(
        &format!("00000000-0000-4000-c000-{seq:012}"),
        "rules.alert.triggered",
        "rule-evaluator",
        1 + (seq % ORGS) as i64,
        medallion_tests::alert_payload(seq),
    )
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Receipts of one client: (alert number, receipt µs).
type Receipts = Arc<Mutex<Vec<(u64, i64)>>>;

fn main() {
    support::run_bench(run);
}

async fn run() {
    let connections: u64 = env_or("MEDALLION_GATEWAY_CONNECTIONS", 10_000);
    let rate: u64 = env_or("MEDALLION_GATEWAY_RATE", 1_000);
    let seconds: u64 = env_or("MEDALLION_GATEWAY_SECONDS", 20);
    let broker = broker().expect("broker");
    let registry = registry().expect("registry");
    let (contracts, topics) = contracts().expect("contracts");
    let ids = support::provision(&broker.address, &registry.address, &contracts, &topics).await;
    let schema = contracts
        .get(&topics.topic(ALERTS).expect("alerts topic").schema)
        .expect("contract")
        .schema
        .clone();

    let port = free_port().expect("port");
    let gateway = WorkerProcess::start(
        BIN,
        &broker.address,
        &registry.address,
        &[
            ("MEDALLION__STAGE__LISTEN", format!("127.0.0.1:{port}")),
            (
                "MEDALLION__STAGE__CURSOR_KEY",
                "a-bench-cursor-key-of-more-than-32-bytes".to_string(),
            ),
            ("MEDALLION__STAGE__AUTH__HS256_SECRET", SECRET.to_string()),
            (
                "MEDALLION__STAGE__MAX_CONNECTIONS",
                (connections + 100).to_string(),
            ),
        ],
    )
    .expect("gateway starts");
    gateway
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("gateway ready");
    let pid = gateway.pid().expect("pid");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_before = rss_kib(pid);

    // The floor: a plain consumer of the topic, from its end.
    let floor: Arc<Mutex<HashMap<u64, (i64, i64)>>> = Arc::new(Mutex::new(HashMap::new()));
    let kafka = medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("kafka");
    // With the gateway's own consumer settings, so the difference is the gateway's work.
    let plain = medallion_stages::gateway::live_consumer(&kafka).expect("reader");
    {
        let marks = medallion_runtime::kafka::io::watermarks(&kafka, ALERTS).expect("marks");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (p, (_, high)) in marks {
            tpl.add_partition_offset(ALERTS, p, rdkafka::Offset::Offset(high))
                .expect("tpl");
        }
        plain.assign(&tpl).expect("assign");
    }
    let floor_task = {
        let floor = floor.clone();
        tokio::spawn(async move {
            while let Ok(m) = plain.recv().await {
                let received = now_us();
                let Some(payload) = m.payload() else { continue };
                let text = String::from_utf8_lossy(payload);
                // The event id is plain text inside the Avro body.
                if let Some(at) = text.find("00000000-0000-4000-c000-") {
                    if let Some(seq) = text.get(at + 24..at + 36).and_then(|s| s.parse().ok()) {
                        let kafka_ms = m.timestamp().to_millis().unwrap_or_default();
                        floor
                            .lock()
                            .expect("lock")
                            .insert(seq, (kafka_ms * 1000, received));
                    }
                }
            }
        })
    };

    // The clients.
    let tokens: Vec<String> = (1..=ORGS as i64)
        .map(|org| {
            medallion_stages::gateway::auth::mint_hs256(SECRET, org, None, None, "bench", 3600)
                .expect("token")
        })
        .collect();
    // Lean clients: a raw socket each, the response read as bytes and scanned for alert
    // numbers (an SSE parser per connection would take CPU from the gateway on these 2 cores).
    let opened = Instant::now();
    let receipts: Vec<Receipts> = (0..connections)
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let mut tasks = Vec::new();
    let open = futures::stream::iter(0..connections)
        .map(|i| {
            let token = tokens[(i % ORGS) as usize].clone();
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connected");
                let request = format!(
                    "GET /v1/events?types=alert.new HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
                );
                socket.write_all(request.as_bytes()).await.expect("sent");
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    socket.read_exact(&mut byte).await.expect("response head");
                    head.push(byte[0]);
                }
                assert!(
                    head.starts_with(b"HTTP/1.1 200"),
                    "connection {i} refused: {}",
                    String::from_utf8_lossy(&head)
                );
                (i, socket)
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    const MARK: &[u8] = b"\"event_id\":\"00000000-0000-4000-c000-";
    for (i, mut socket) in open {
        let receipts = receipts[i as usize].clone();
        tasks.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = vec![0u8; 64 * 1024];
            // The end of the previous read, in case a mark and its number straddle two reads.
            let mut carry = 0;
            loop {
                let n = match socket.read(&mut buffer[carry..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let received = now_us();
                let filled = carry + n;
                let mut at = 0;
                let mut found = Vec::new();
                while let Some(pos) = buffer[at..filled]
                    .windows(MARK.len())
                    .position(|w| w == MARK)
                {
                    let start = at + pos + MARK.len();
                    if start + 12 > filled {
                        break;
                    }
                    if let Some(seq) = std::str::from_utf8(&buffer[start..start + 12])
                        .ok()
                        .and_then(|t| t.parse().ok())
                    {
                        found.push((seq, received));
                    }
                    at = start + 12;
                }
                if !found.is_empty() {
                    receipts.lock().expect("lock").extend(found);
                }
                let keep = (filled - at).min(MARK.len() + 12);
                buffer.copy_within(filled - keep..filled, 0);
                carry = keep;
            }
        }));
    }
    let open_seconds = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_after = rss_kib(pid);
    let per_connection_kib = (idle_after as f64 - idle_before as f64) / connections as f64;
    let cpu_before = support::usage(pid).expect("usage").cpu_seconds;

    // The alerts, `rate` a second, in steps of 10 ms.
    let producer = medallion_runtime::kafka::producer(&kafka).expect("producer");
    let total = rate * seconds;
    let started = tokio::time::Instant::now();
    let mut deliveries = Vec::with_capacity(total as usize);
    for seq in 0..total {
        let due = started + Duration::from_micros(seq * 1_000_000 / rate);
        if tokio::time::Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        let event = alert(seq);
        let value = to_framed(&event, &schema, ids[ALERTS]).expect("framed");
        let key = event["org_id"].to_string();
        let record = FutureRecord::to(ALERTS).key(&key).payload(&value);
        deliveries.push(
            medallion_runtime::kafka::io::send_queued(&producer, record)
                .await
                .expect("queued"),
        );
    }
    for d in deliveries {
        let _ = d.await;
    }
    // Every alert reaches connections / orgs clients: wait for them (or 30 s).
    let expected = total * (connections / ORGS);
    let deadline = Instant::now() + Duration::from_secs(30);
    let delivered = loop {
        let n: usize = receipts.iter().map(|r| r.lock().expect("lock").len()).sum();
        if n as u64 >= expected || Instant::now() > deadline {
            break n as u64;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let cpu = support::usage(pid).expect("usage").cpu_seconds - cpu_before;
    let peak_kib = support::usage(pid).expect("usage").peak_rss_kib;
    let metrics = gateway.metrics().await.unwrap_or_default();
    floor_task.abort();
    for t in tasks {
        t.abort();
    }

    let floor = floor.lock().expect("lock");
    let mut end_to_end = Vec::new();
    let mut own = Vec::new();
    for r in &receipts {
        for (seq, received) in r.lock().expect("lock").iter() {
            if let Some((kafka_us, plain_us)) = floor.get(seq) {
                end_to_end.push(received - kafka_us);
                own.push(received - plain_us);
            }
        }
    }
    let mut floor_latency: Vec<i64> = floor.values().map(|(k, r)| r - k).collect();
    end_to_end.sort_unstable();
    own.sort_unstable();
    floor_latency.sort_unstable();
    let slow = medallion_tests::metric_sum(&metrics, "medallion_gateway_slow_disconnects_total");
    println!();
    println!(
        "realtime gateway: {connections} SSE connections over {ORGS} orgs (opened in {open_seconds:.1} s), {total} alerts at {rate}/s for {seconds} s"
    );
    println!("| measure | p50 ms | p99 ms | max ms | goal |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, v: &[i64], goal: &str| {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {goal} |",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        );
    };
    row("Kafka timestamp → client receipt", &end_to_end, "p99 < 250");
    row(
        "floor: Kafka timestamp → plain consumer",
        &floor_latency,
        "",
    );
    row("gateway's own: plain consumer → client", &own, "p99 < 50");
    println!();
    println!(
        "delivered {delivered} of {expected} messages ({:.1}%); slow disconnects {slow}",
        100.0 * delivered as f64 / expected.max(1) as f64
    );
    println!(
        "memory per idle connection: {per_connection_kib:.1} KiB (RSS {idle_before} → {idle_after} KiB; goal < 20 KiB); peak RSS {:.1} MiB",
        peak_kib as f64 / 1024.0
    );
    println!(
        "gateway CPU: {cpu:.2} s for {delivered} messages = {:.1} CPU-s per 1M messages delivered",
        cpu * 1e6 / delivered.max(1) as f64
    );
}
