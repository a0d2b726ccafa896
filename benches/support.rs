//! What the benchmarks share: process usage from /proc, rewriting framed connector events in
//! place, and producing them.

pub const CLOCK_TICKS: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

pub fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())?;
    Some(Usage {
        cpu_seconds: (utime + stime) / CLOCK_TICKS,
        peak_rss_kib: peak,
    })
}

/// Reads an Avro zigzag varint at `pos`; returns it and the position after it.
pub fn varint(buf: &[u8], mut pos: usize) -> (i64, usize) {
    let mut value: u64 = 0;
    let mut shift = 0;
    while let Some(byte) = buf.get(pos) {
        value |= u64::from(byte & 0x7f) << shift;
        pos += 1;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    (((value >> 1) as i64) ^ -((value & 1) as i64), pos)
}

/// Where the envelope's `timestamp` starts and ends in a framed connector event (after
/// event_id, event_type and event_version).
pub fn timestamp_span(value: &[u8]) -> (usize, usize) {
    let mut pos = 5;
    for _ in 0..3 {
        let (len, after) = varint(value, pos);
        pos = after + len as usize;
    }
    let (_, end) = varint(value, pos);
    (pos, end)
}

/// Writes `t` as a zigzag varint of exactly `len` bytes (same magnitude as the template's).
pub fn write_varint_fixed(out: &mut [u8], t: i64) {
    let mut z = ((t << 1) ^ (t >> 63)) as u64;
    let len = out.len();
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = (z & 0x7f) as u8 | if i + 1 < len { 0x80 } else { 0 };
        z >>= 7;
    }
}

pub use medallion_runtime::clock::now_ms;

/// 10k realistic framed connector events (org key, value) to copy from.
pub fn templates(raw: &apache_avro::Schema, id: u32, base_ms: i64) -> Vec<(String, Vec<u8>)> {
    let mut sample = medallion_contracts::sample::SampleEvents::new(77, 16, base_ms);
    (0..10_000)
        .map(|_| {
            let e = sample.next_event();
            (
                e["org_id"].to_string(),
                medallion_contracts::json::to_framed(&e, raw, id).expect("frame"),
            )
        })
        .collect()
}

/// Lead events only: a lead id is a UUID, so a copy can be made a new lead by rewriting it in
/// place. Each with where its lead id sits in the frame.
pub fn lead_templates(
    raw: &apache_avro::Schema,
    id: u32,
    base_ms: i64,
) -> Vec<(String, Vec<u8>, usize)> {
    let mut sample = medallion_contracts::sample::SampleEvents::new(77, 16, base_ms);
    let mut out = Vec::new();
    while out.len() < 1_000 {
        let e = sample.next_event();
        let Some(lead) = e["payload"]["lead_created"]["lead_id"].as_str() else {
            continue;
        };
        let framed = medallion_contracts::json::to_framed(&e, raw, id).expect("frame");
        let at = framed
            .windows(lead.len())
            .position(|w| w == lead.as_bytes())
            .expect("the lead id in the frame");
        out.push((e["org_id"].to_string(), framed, at));
    }
    out
}

/// `n` events of `templates` as captured records, every one a new lead (its own lead id),
/// event times 2 ms apart from `base_ms`.
pub fn new_lead_stream(
    templates: &[(String, Vec<u8>, usize)],
    n: usize,
    base_ms: i64,
) -> Vec<medallion_runtime::ops::capture::Captured> {
    let plain: Vec<(String, Vec<u8>)> = templates
        .iter()
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    let mut records = stream(&plain, n, base_ms);
    for (i, r) in records.iter_mut().enumerate() {
        let at = templates[i % templates.len()].2;
        if let Some(value) = r.value.as_mut() {
            value[at + 24..at + 36].copy_from_slice(format!("{i:012x}").as_bytes());
        }
    }
    records
}

/// Event `i` of a stream: a copy of template `i % len` with its own event id and event time
/// `t` (ms).
pub fn event(templates: &[(String, Vec<u8>)], i: usize, t: i64) -> (&str, Vec<u8>) {
    let (key, template) = &templates[i % templates.len()];
    let mut value = template.clone();
    // event_id is the first field: a length byte, then 36 characters; rewrite the last 12.
    let suffix = format!("{:012x}", i);
    value[6 + 24..6 + 36].copy_from_slice(suffix.as_bytes());
    let (from, to) = timestamp_span(&value);
    write_varint_fixed(&mut value[from..to], t);
    (key, value)
}

/// Creates every topic of `topics` on `bootstrap` and registers every contract on `registry`:
/// the schema ids by topic.
pub async fn provision(
    bootstrap: &str,
    registry: &str,
    contracts: &medallion_contracts::ContractSet,
    topics: &medallion_contracts::TopicConfig,
) -> std::collections::BTreeMap<String, u32> {
    let kafka = medallion_runtime::kafka::KafkaConnection::plain(bootstrap).expect("connection");
    medallion_runtime::admin::apply_topics(&kafka, topics, 1)
        .await
        .expect("topics");
    medallion_contracts::registry::RegistryClient::new(registry, std::time::Duration::from_secs(10))
        .expect("client")
        .register_all(contracts, topics)
        .await
        .expect("registered")
}

/// `n` events of `templates` as captured records, keyed, event times 2 ms apart from
/// `base_ms`.
pub fn stream(
    templates: &[(String, Vec<u8>)],
    n: usize,
    base_ms: i64,
) -> Vec<medallion_runtime::ops::capture::Captured> {
    (0..n)
        .map(|i| {
            let (key, value) = event(templates, i, base_ms + 2 * i as i64);
            medallion_runtime::ops::capture::Captured {
                partition: 0,
                offset: i as i64,
                timestamp: None,
                key: Some(key.as_bytes().to_vec()),
                value: Some(value),
                headers: Vec::new(),
            }
        })
        .collect()
}

/// Produces `records` to `topic` through `medallion replay`'s own code path (by key, new
/// timestamps, as fast as the broker takes them); every record must be acknowledged. Returns
/// the bytes produced.
pub async fn produce(
    kafka: &medallion_runtime::kafka::KafkaConnection,
    topic: &str,
    records: &[medallion_runtime::ops::capture::Captured],
) -> u64 {
    let options = medallion_runtime::ops::capture::ReplayOptions {
        rate: None,
        by_key: true,
        new_timestamps: true,
    };
    let summary =
        medallion_runtime::ops::capture::replay(kafka, topic, records, &options, |_, _| {})
            .await
            .expect("replayed");
    assert_eq!(summary.errors, 0, "every record delivered");
    summary.bytes
}

/// Sends `record`, waiting while the producer's queue is full.
pub fn send_waiting(
    producer: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    mut record: rdkafka::producer::BaseRecord<'_, [u8], [u8]>,
) {
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((_, r)) => {
                record = r;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// Runs `body` on a multi-threaded runtime, only when run as a benchmark (`cargo bench` passes
/// `--bench`; `cargo test --benches` builds it and runs nothing).
pub fn run_bench<F: std::future::Future<Output = ()>>(body: impl FnOnce() -> F) {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body());
}
