//! bronze-processor as its own process and consumer group on a real broker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use medallion_contracts::json::{from_avro_binary, to_framed};
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::sample::SampleEvents;
use medallion_contracts::Contract;
use medallion_runtime::dlq::{header, header_value};
use medallion_tests::{
    broker, contracts, metric_sum, metric_sum_where, read_topic, read_until, registry, Service,
    WorkerProcess,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value as Json};

const BIN: &str = env!("CARGO_BIN_EXE_bronze-processor");
const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";
const RAW_DLQ: &str = "connector.data.raw.dlq";

pub use medallion_runtime::clock::now_ms;

/// A broker and registry with every topic created and every schema registered.
pub struct Pipeline {
    pub broker: Service,
    pub registry: Service,
    pub raw: Contract,
    pub bronze: Contract,
    pub raw_id: u32,
    pub producer: FutureProducer,
    pub contracts: medallion_contracts::ContractSet,
    pub topics: medallion_contracts::TopicConfig,
    /// Registered schema id by topic.
    pub ids: HashMap<String, u32>,
}

impl Pipeline {
    pub async fn start() -> Pipeline {
        Self::start_on(broker().expect("broker starts")).await
    }

    /// A pipeline on `broker`.
    pub async fn start_on(broker: Service) -> Pipeline {
        let registry = registry().expect("registry starts");
        let (contracts, topics) = contracts().expect("contracts");
        medallion_runtime::admin::apply_topics(
            &medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection"),
            &topics,
            1,
        )
        .await
        .expect("topics");
        let client =
            RegistryClient::new(&registry.address, Duration::from_secs(10)).expect("client");
        let ids = client
            .register_all(&contracts, &topics)
            .await
            .expect("registered");
        let producer = medallion_runtime::kafka::producer(
            &medallion_runtime::kafka::KafkaConnection::plain(&broker.address).expect("connection"),
        )
        .expect("producer");
        Pipeline {
            raw: contracts
                .get("connector/data-raw.avsc")
                .expect("raw")
                .clone(),
            bronze: contracts
                .get("bronze/data-cleaned.avsc")
                .expect("bronze")
                .clone(),
            raw_id: ids[RAW],
            ids: ids.into_iter().collect(),
            contracts,
            topics,
            broker,
            registry,
            producer,
        }
    }

    pub fn worker(&self, env: &[(&str, String)]) -> WorkerProcess {
        WorkerProcess::start(
            BIN,
            &self.broker.address,
            &self.registry.address,
            &medallion_tests::bronze_env(env),
        )
        .expect("worker starts")
    }

    /// A worker process of another stage binary.
    pub fn worker_of(&self, binary: &str, env: &[(&str, String)]) -> WorkerProcess {
        WorkerProcess::start(binary, &self.broker.address, &self.registry.address, env)
            .expect("worker starts")
    }

    /// The contract of `topic`.
    pub fn contract(&self, topic: &str) -> &Contract {
        let spec = self.topics.topic(topic).expect("declared topic");
        self.contracts.get(&spec.schema).expect("contract")
    }

    /// Frames `event` with `topic`'s registered schema and produces it keyed by its org.
    pub async fn publish(&self, topic: &str, event: &Json) {
        let value =
            to_framed(event, &self.contract(topic).schema, self.ids[topic]).expect("frames");
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(&event["org_id"].to_string())
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }

    /// Reads `topic` until the connector events its records stand for ([`source_id`]) are
    /// exactly `expected`, decoding them as they arrive (the check is not quadratic), then
    /// `quiet` more. On `Err`, the reason and a short read of what is there, for the caller's
    /// assertions to say what differs.
    pub async fn read_sources(
        &self,
        topic: &str,
        expected: &BTreeSet<String>,
        quiet: Duration,
        within: Duration,
    ) -> Result<Vec<Json>, (String, Vec<Json>)> {
        let mut seen = BTreeSet::new();
        let out = medallion_tests::read_until(
            &self.broker.address,
            topic,
            |m| {
                if let Some(last) = m.last() {
                    seen.extend(
                        self.decode(topic, std::slice::from_ref(last))
                            .iter()
                            .map(|e| source_id(topic, e)),
                    );
                }
                seen.len() >= expected.len() && seen == *expected
            },
            quiet,
            within,
        )
        .await;
        match out {
            Ok(out) => Ok(self.decode(topic, &out)),
            Err(e) => {
                let short = medallion_tests::read_until(
                    &self.broker.address,
                    topic,
                    |m| m.len() >= expected.len(),
                    Duration::from_secs(3),
                    Duration::from_secs(60),
                )
                .await
                .unwrap_or_default();
                Err((format!("{topic}: {e}"), self.decode(topic, &short)))
            }
        }
    }

    /// Decodes records of `topic` to JSON.
    pub fn decode(&self, topic: &str, messages: &[OwnedMessage]) -> Vec<Json> {
        let contract = self.contract(topic);
        messages
            .iter()
            .map(|m| {
                let payload = m.payload().expect("payload");
                from_avro_binary(&payload[5..], &contract.schema, &contract.schema)
                    .expect("record of the topic's schema")
            })
            .collect()
    }

    /// Reads `topic` until `at_least` decoded records match `wanted` (then `quiet` more), and
    /// returns every matching record. Each record is decoded once while waiting.
    pub async fn read_matching(
        &self,
        topic: &str,
        wanted: impl Fn(&Json) -> bool,
        at_least: usize,
        quiet: Duration,
        within: Duration,
    ) -> Vec<Json> {
        let (mut decoded, mut matched) = (0, 0);
        let out = medallion_tests::read_until(
            &self.broker.address,
            topic,
            |m| {
                matched += self
                    .decode(topic, &m[decoded..])
                    .iter()
                    .filter(|r| wanted(r))
                    .count();
                decoded = m.len();
                matched >= at_least
            },
            quiet,
            within,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        self.decode(topic, &out)
            .into_iter()
            .filter(|r| wanted(r))
            .collect()
    }

    pub fn frame(&self, event: &Json) -> Vec<u8> {
        to_framed(event, &self.raw.schema, self.raw_id).expect("frames")
    }

    pub async fn send(&self, key: impl AsRef<[u8]>, value: &[u8]) {
        self.send_to(RAW, key, value).await
    }

    /// Produces `value` keyed by `key` to `topic` (a prefixed deployment's raw topic, say).
    pub async fn send_to(&self, topic: &str, key: impl AsRef<[u8]>, value: &[u8]) {
        self.producer
            .send(
                FutureRecord::to(topic).key(key.as_ref()).payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }

    /// Produces `records` (key, value) to `topic` at an even pace from `started` over `over`,
    /// `chunk` records at a time, every one acknowledged (the task fails otherwise).
    pub fn produce_paced(
        &self,
        topic: &'static str,
        records: Vec<(String, Vec<u8>)>,
        started: std::time::Instant,
        over: Duration,
    ) -> tokio::task::JoinHandle<()> {
        const CHUNK: usize = 400;
        let producer = self.producer.clone();
        tokio::spawn(async move {
            let total = records.len().max(1);
            for (i, chunk) in records.chunks(CHUNK).enumerate() {
                let due = started + over.mul_f64((i * CHUNK) as f64 / total as f64);
                tokio::time::sleep_until(due.into()).await;
                let sends = chunk.iter().map(|(key, value)| {
                    producer.send(
                        FutureRecord::to(topic).key(key).payload(value),
                        Duration::from_secs(60),
                    )
                });
                for sent in futures::future::join_all(sends).await {
                    sent.map_err(|(e, _)| e).expect("produced");
                }
            }
        })
    }

    /// Decodes bronze output records to JSON (writer schema = the bronze contract).
    pub fn bronze_json(&self, messages: &[OwnedMessage]) -> Vec<Json> {
        messages
            .iter()
            .map(|m| {
                let payload = m.payload().expect("payload");
                from_avro_binary(&payload[5..], &self.bronze.schema, &self.bronze.schema)
                    .expect("bronze record")
            })
            .collect()
    }
}

pub fn sample(seed: u64, n: usize) -> Vec<Json> {
    let mut events = SampleEvents::new(seed, 6, now_ms() - 3_600_000);
    (0..n).map(|_| events.next_event()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn bronze_outputs_valid_unique_events_and_dead_letters_the_rest() {
    let p = Pipeline::start().await;
    let worker = p.worker(&[]);
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");

    let valid = sample(21, 400);
    let mut expected_dlq: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
    for (i, event) in valid.iter().enumerate() {
        // Every third producer keys by a Java Long (LongSerializer: 8 bytes, big-endian).
        let key = if i % 3 == 1 {
            event["org_id"]
                .as_i64()
                .expect("org")
                .to_be_bytes()
                .to_vec()
        } else {
            event["org_id"].to_string().into_bytes()
        };
        let value = p.frame(event);
        p.send(&key, &value).await;
        if i % 20 == 0 {
            // A redelivery: the same record again.
            p.send(&key, &value).await;
        }
    }
    // (key, value, reason) of records that must be dead-lettered.
    let mut poison: Vec<(Vec<u8>, Vec<u8>, &str)> = Vec::new();
    let mut bad_magic = p.frame(&valid[0]);
    bad_magic[0] = b'{';
    poison.push(("211".into(), bad_magic, "unknown_magic_byte"));
    let good = p.frame(&valid[1]);
    poison.push((
        "211".into(),
        good[..good.len() - 4].to_vec(),
        "truncated_body",
    ));
    let mut unknown = p.frame(&valid[2]);
    unknown[1..5].copy_from_slice(&3_000_000u32.to_be_bytes());
    poison.push(("211".into(), unknown, "unknown_schema_id"));
    let mut e = sample(22, 1).remove(0);
    e["event_id"] = json!("definitely-not-a-uuid");
    poison.push((
        e["org_id"].to_string().into_bytes(),
        p.frame(&e),
        "invalid_event_id",
    ));
    let mut e = sample(23, 1).remove(0);
    e["timestamp"] = json!(now_ms() - 400 * 86_400_000);
    poison.push((
        e["org_id"].to_string().into_bytes(),
        p.frame(&e),
        "timestamp_out_of_range",
    ));
    let e = sample(24, 1).remove(0);
    poison.push(("424242".into(), p.frame(&e), "key_mismatch"));
    let e = sample(26, 1).remove(0);
    let other_org = (e["org_id"].as_i64().expect("org") + 1).to_be_bytes();
    poison.push((other_org.to_vec(), p.frame(&e), "key_mismatch"));
    let mut e = sample(25, 1).remove(0);
    e["org_id"] = json!(-5);
    poison.push(("-5".into(), p.frame(&e), "invalid_org_id"));
    for (key, value, reason) in &poison {
        p.send(key, value).await;
        expected_dlq.insert(value.clone(), reason);
    }

    let out = read_topic(
        &p.broker.address,
        BRONZE,
        valid.len(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("bronze output");
    let out_json = p.bronze_json(&out);
    let out_ids: Vec<String> = out_json
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    let unique: BTreeSet<&String> = out_ids.iter().collect();
    assert_eq!(
        out_ids.len(),
        valid.len(),
        "exactly the valid events, once each"
    );
    let sent_ids: BTreeSet<String> = valid
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        sent_ids
    );
    // Keyed by org_id, normalized.
    let by_id: HashMap<&str, &Json> = valid
        .iter()
        .map(|e| (e["event_id"].as_str().expect("id"), e))
        .collect();
    for (message, record) in out.iter().zip(&out_json) {
        let sent = by_id[record["event_id"].as_str().expect("id")];
        let key = sent["org_id"].to_string();
        assert_eq!(message.key(), Some(key.as_bytes()));
        // Partitioned exactly as a Java producer would (murmur2), so mixed producers agree.
        assert_eq!(
            message.partition(),
            medallion_tests::java_partition(key.as_bytes(), 12),
            "org {key}"
        );
        assert_eq!(record["payload"]["raw_topic"], RAW);
        if let Some(release) = sent["payload"]["release_sync"].as_object() {
            assert_eq!(
                record["payload"]["release_sync"]["release"]["version"],
                release["release"]["version"]
                    .as_str()
                    .expect("v")
                    .trim()
                    .trim_start_matches('v')
            );
        }
    }

    let dlq = read_topic(
        &p.broker.address,
        RAW_DLQ,
        expected_dlq.len(),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("dlq");
    assert_eq!(dlq.len(), expected_dlq.len());
    for message in &dlq {
        let value = message.payload().expect("original bytes").to_vec();
        let reason = expected_dlq
            .get(&value)
            .unwrap_or_else(|| panic!("unexpected DLQ record"));
        let headers = message.headers().expect("headers");
        assert_eq!(
            header_value(headers, header::ERROR_REASON).as_deref(),
            Some(*reason)
        );
        assert_eq!(
            header_value(headers, header::ERROR_CLASS).as_deref(),
            Some("poison")
        );
        assert_eq!(
            header_value(headers, header::STAGE).as_deref(),
            Some("bronze-processor")
        );
        assert_eq!(
            header_value(headers, header::ORIGINAL_TOPIC).as_deref(),
            Some(RAW)
        );
        assert!(header_value(headers, header::ORIGINAL_OFFSET).is_some());
        assert_eq!(
            header_value(headers, header::ATTEMPTS).as_deref(),
            Some("1")
        );
    }

    let metrics = worker.metrics().await.expect("metrics");
    assert!(
        metrics.contains("medallion_duplicates_dropped_total"),
        "{metrics}"
    );
    assert!(metrics.contains("medallion_dlq_records_total"), "{metrics}");
}

pub(crate) fn ids_of(p: &Pipeline, messages: &[OwnedMessage]) -> Vec<String> {
    p.bronze_json(messages)
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect()
}

/// bronze's output once the ids of its events are `expected` (and at least as many records).
async fn until_ids(
    p: &Pipeline,
    expected: &BTreeSet<String>,
    within: Duration,
) -> Vec<OwnedMessage> {
    read_until(
        &p.broker.address,
        BRONZE,
        |m| {
            m.len() >= expected.len()
                && ids_of(p, m).into_iter().collect::<BTreeSet<_>>() == *expected
        },
        Duration::from_secs(3),
        within,
    )
    .await
    .expect("every expected event reaches bronze")
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_loses_nothing_and_repeats_nothing() {
    let p = Pipeline::start().await;
    let valid = sample(31, 3_000);
    let mut poison = BTreeSet::new();
    let mut worker = p.worker(&[("MEDALLION__BATCH__MAX_RECORDS", "100".into())]);
    for (i, event) in valid.iter().enumerate() {
        p.send(&event["org_id"].to_string(), &p.frame(event)).await;
        if i % 100 == 50 {
            let mut bad = p.frame(event);
            bad.truncate(bad.len() / 2);
            p.send(&event["org_id"].to_string(), &bad).await;
            poison.insert(bad);
        }
    }
    // Kill the worker without warning three times while it works through the backlog.
    for round in 0..3u64 {
        tokio::time::sleep(Duration::from_millis(1_500 + 400 * round)).await;
        worker.kill();
        worker = p.worker(&[("MEDALLION__BATCH__MAX_RECORDS", "100".into())]);
    }
    let expected: BTreeSet<String> = valid
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    let out = until_ids(&p, &expected, Duration::from_secs(180)).await;
    let ids = ids_of(&p, &out);
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, expected, "nothing missing, nothing foreign");
    let dlq = medallion_tests::read_until(
        &p.broker.address,
        RAW_DLQ,
        |m| {
            let seen: BTreeSet<Vec<u8>> = m
                .iter()
                .filter_map(|m| m.payload().map(<[u8]>::to_vec))
                .collect();
            seen == poison
        },
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("every poison record is dead-lettered");
    eprintln!(
        "after 3 SIGKILLs: {} outputs for {} events, {} dead letters for {} poison",
        ids.len(),
        expected.len(),
        dlq.len(),
        poison.len()
    );
    // A restarted worker rebuilds what its predecessor had produced after its last commit:
    // nothing is produced or dead-lettered twice.
    assert_eq!(ids.len(), expected.len(), "no event twice in bronze");
    assert_eq!(dlq.len(), poison.len(), "no dead letter twice");
}

/// A worker killed mid-backlog leaves work done after its last commit; its successor reads
/// those records again and does not produce their outputs or dead letters twice. Each record
/// the successor consumed is counted once: as an output, a dead letter, a dropped duplicate or
/// a replay, so `medallion_dlq_records_total` counts what the DLQ received from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_successor_counts_what_it_replays_apart_from_outputs_and_dead_letters() {
    let p = Pipeline::start().await;
    let valid = sample(57, 6_000);
    let mut poison = 0usize;
    for (i, event) in valid.iter().enumerate() {
        let key = event["org_id"].to_string();
        p.send(&key, &p.frame(event)).await;
        if i % 20 == 10 {
            let mut bad = p.frame(event);
            bad.truncate(bad.len() / 2);
            p.send(&key, &bad).await;
            poison += 1;
        }
    }
    let env = [("MEDALLION__BATCH__MAX_RECORDS", "50".to_string())];
    let mut first = p.worker(&env);
    // Killed while it works through the backlog: up to a second of work is not committed.
    read_until(
        &p.broker.address,
        BRONZE,
        |m| m.len() >= 1_500,
        Duration::from_millis(200),
        Duration::from_secs(120),
    )
    .await
    .expect("the first worker produced part of the backlog");
    first.kill();
    let second = p.worker(&env);
    let out = read_until(
        &p.broker.address,
        BRONZE,
        |m| m.len() >= valid.len(),
        Duration::from_secs(3),
        Duration::from_secs(180),
    )
    .await
    .expect("every valid event reaches bronze");
    assert_eq!(out.len(), valid.len(), "no event twice");
    let dlq = read_topic(
        &p.broker.address,
        RAW_DLQ,
        poison,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("dlq");
    assert_eq!(dlq.len(), poison, "no dead letter twice");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = second.metrics().await.expect("metrics");
        let sum = |name: &str| metric_sum(&metrics, name);
        let consumed = sum("kafka_messages_in_total");
        let replayed = sum("medallion_replayed_records_total");
        let accounted = sum("medallion_records_out_total")
            + sum("medallion_dlq_records_total")
            + sum("medallion_duplicates_dropped_total")
            + replayed;
        if consumed > 0.0 && accounted == consumed {
            eprintln!("the successor consumed {consumed}, {replayed} of them replays");
            assert!(
                replayed > 0.0,
                "the successor replayed its predecessor's tail"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "consumed {consumed} but accounted {accounted}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// bronze plans a large batch in parts, the next while the previous one's records are
/// acknowledged. A backlog taken in large batches, with each duplicate far behind its first
/// copy (another part) and poison among them, still comes out exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_taken_in_parts_comes_out_exactly_once_in_order() {
    let p = Pipeline::start().await;
    let valid = sample(41, 1_500);
    let mut records: Vec<(String, Vec<u8>)> = valid
        .iter()
        .map(|e| (e["org_id"].to_string(), p.frame(e)))
        .collect();
    // Every fifth of the first 1000 again, after all 1500: other parts of the batch.
    let duplicates: Vec<(String, Vec<u8>)> = records[..1_000].iter().step_by(5).cloned().collect();
    records.extend(duplicates.iter().cloned());
    let mut poison = BTreeSet::new();
    for i in [700usize, 1_400, 1_650] {
        let (key, value) = records[i].clone();
        let bad = value[..value.len() / 2].to_vec();
        records.insert(i, (key, bad.clone()));
        poison.insert(bad);
    }
    let pending: Vec<_> = records
        .iter()
        .map(|(key, value)| {
            p.producer
                .send_result(FutureRecord::to(RAW).key(key).payload(value))
                .map_err(|(e, _)| e)
                .expect("queued")
        })
        .collect();
    for delivery in pending {
        delivery.await.expect("not cancelled").expect("delivered");
    }
    // The whole backlog is on the broker before the worker starts: few, large batches.
    let worker = p.worker(&[
        ("MEDALLION__BATCH__MAX_RECORDS", "5000".into()),
        ("MEDALLION__BATCH__LINGER_MS", "1000".into()),
    ]);
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        valid.len(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("bronze output");
    let ids = ids_of(&p, &out);
    assert_eq!(ids.len(), valid.len(), "each valid event exactly once");
    // Per key (so per partition), in the order sent.
    let mut sent_by_key: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for e in &valid {
        sent_by_key
            .entry(e["org_id"].to_string())
            .or_default()
            .push(e["event_id"].as_str().expect("id"));
    }
    let mut out_by_key: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (message, id) in out.iter().zip(&ids) {
        let key = String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8");
        out_by_key.entry(key).or_default().push(id);
    }
    assert_eq!(out_by_key, sent_by_key);
    let dlq = read_topic(
        &p.broker.address,
        RAW_DLQ,
        poison.len(),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("dlq");
    let dead: BTreeSet<Vec<u8>> = dlq
        .iter()
        .filter_map(|m| m.payload().map(<[u8]>::to_vec))
        .collect();
    assert_eq!((dlq.len(), dead), (poison.len(), poison));
    let metrics = worker.metrics().await.expect("metrics");
    assert_eq!(
        metric_sum(&metrics, "medallion_duplicates_dropped_total"),
        duplicates.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_partitions_and_survive_one_leaving() {
    let p = Pipeline::start().await;
    let mut a = p.worker(&[]);
    let b = p.worker(&[]);
    a.wait_ready(Duration::from_secs(60))
        .await
        .expect("a ready");
    b.wait_ready(Duration::from_secs(60))
        .await
        .expect("b ready");
    let first = sample(41, 600);
    for e in &first {
        p.send(&e["org_id"].to_string(), &p.frame(e)).await;
    }
    read_topic(
        &p.broker.address,
        BRONZE,
        first.len(),
        Duration::from_millis(500),
        Duration::from_secs(90),
    )
    .await
    .expect("first half");
    let in_a = metric_sum(
        &a.metrics().await.expect("a metrics"),
        "kafka_messages_in_total",
    );
    let in_b = metric_sum(
        &b.metrics().await.expect("b metrics"),
        "kafka_messages_in_total",
    );
    assert!(
        in_a > 0.0 && in_b > 0.0,
        "both replicas consumed: a={in_a} b={in_b}"
    );
    assert_eq!(in_a + in_b, first.len() as f64, "each record consumed once");

    // A leaves cleanly (SIGTERM: drain, commit, leave the group); B takes its partitions.
    assert!(
        a.terminate(Duration::from_secs(30)).expect("a stops"),
        "clean exit on SIGTERM"
    );
    let second = sample(42, 600);
    for e in &second {
        p.send(&e["org_id"].to_string(), &p.frame(e)).await;
    }
    let all = first.len() + second.len();
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        all,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await
    .expect("everything");
    let ids: BTreeSet<String> = ids_of(&p, &out).into_iter().collect();
    let expected: BTreeSet<String> = first
        .iter()
        .chain(&second)
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(out.len(), all, "a clean handover redelivers nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_longer_than_the_retry_schedule_pauses_and_dead_letters_nothing() {
    let p = Pipeline::start().await;
    let upstream = p.registry.address.trim_start_matches("http://").to_string();
    let proxy = medallion_tests::Toggle::start(&upstream)
        .await
        .expect("proxy");
    // A schedule of 0.1 + 0.2 + 0.4 s: the outage below lasts ten times longer. The registry
    // is needed by every record, so the worker waits (capped at the last step) and never
    // dead-letters; the schedule-then-DLQ is for failures of one record or destination.
    let worker = WorkerProcess::start(
        BIN,
        &p.broker.address,
        &format!("http://{}", proxy.address),
        &medallion_tests::bronze_env(&[("MEDALLION__RETRY__BACKOFF_MS", "[100,200,400]".into())]),
    )
    .expect("worker");
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    let before = sample(51, 50);
    for e in &before {
        p.send(&e["org_id"].to_string(), &p.frame(e)).await;
    }
    read_topic(
        &p.broker.address,
        BRONZE,
        before.len(),
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .await
    .expect("before the outage");

    // A new writer schema version the worker has never seen, then the registry goes away.
    let (contracts, _) = contracts().expect("contracts");
    let v2_text = super::contracts::edited_raw(
        &contracts,
        r#"{"name": "connector_id", "type": "string"}"#,
        r#"{"name": "connector_id", "type": "string"}, {"name": "region", "type": ["null", "string"], "default": null}"#,
    );
    let v2 = apache_avro::Schema::parse_str(&v2_text).expect("v2");
    let client = RegistryClient::new(&p.registry.address, Duration::from_secs(5)).expect("client");
    // Registered under its own subject: rivven-schema 0.0.22 refuses any schema with
    // timestamp-millis under BACKWARD (a registry bug); ids are global, so the worker's lookup
    // by id is the same either way.
    let v2_id = client
        .register(&medallion_tests::unique("raw-v2-value"), &v2_text)
        .await
        .expect("v2 registered");
    proxy.set(false).await;
    let during = sample(52, 50);
    for e in &during {
        let mut e = e.clone();
        e["payload"]["region"] = json!("eu-west-1");
        let value = to_framed(&e, &v2, v2_id).expect("v2 frame");
        p.send(&e["org_id"].to_string(), &value).await;
    }
    // Ten times the schedule's length, or more on a loaded machine: the retries keep coming.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut metrics;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        metrics = worker.metrics().await.expect("metrics");
        let enough = metric_sum(&metrics, "medallion_retries_total") >= 4.0
            && metric_sum(&metrics, "medallion_consumption_paused") == 1.0;
        if enough || std::time::Instant::now() > deadline {
            break;
        }
    }
    let retries = metric_sum(&metrics, "medallion_retries_total");
    assert!(
        retries >= 4.0,
        "the worker kept retrying past its schedule while the registry was away: {retries} \
         retries, {} records out",
        metric_sum(&metrics, "medallion_records_out_total")
    );
    assert_eq!(
        metric_sum(&metrics, "medallion_consumption_paused"),
        1.0,
        "paused, and says so"
    );
    let ready = reqwest::get(format!("{}/readyz", worker.http))
        .await
        .expect("readyz answers");
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    proxy.set(true).await;

    let all = before.len() + during.len();
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        all,
        Duration::from_secs(2),
        Duration::from_secs(90),
    )
    .await
    .expect("after the outage");
    let ids: BTreeSet<String> = ids_of(&p, &out).into_iter().collect();
    for e in before.iter().chain(&during) {
        assert!(
            ids.contains(e["event_id"].as_str().expect("id")),
            "missing {}",
            e["event_id"]
        );
    }
    let dlq = read_topic(
        &p.broker.address,
        RAW_DLQ,
        0,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await
    .expect("dlq read");
    let reasons: Vec<Option<String>> = dlq
        .iter()
        .take(3)
        .map(|m| {
            m.headers()
                .and_then(|h| header_value(h, header::ERROR_REASON))
        })
        .collect();
    assert!(
        dlq.is_empty(),
        "nothing dead-lettered: {} records, the first for {reasons:?}",
        dlq.len()
    );
}

/// Exact lag needs exact watermarks, which librdkafka's mock cluster gives (tansu's lag reads
/// negative); the worker is still a separate process, talking to it over loopback.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_the_lag_of_a_backlog_falling_to_zero() {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let (contracts, topics) = contracts().expect("contracts");
    for t in topics.physical_topics(1) {
        cluster
            .create_topic(&t.name, t.partitions as i32, 1)
            .expect("topic");
    }
    let registry = registry().expect("registry");
    let client = RegistryClient::new(&registry.address, Duration::from_secs(10)).expect("client");
    let ids = client
        .register_all(&contracts, &topics)
        .await
        .expect("registered");
    let raw = contracts.get("connector/data-raw.avsc").expect("raw");
    let producer = medallion_runtime::kafka::producer(
        &medallion_runtime::kafka::KafkaConnection::plain(&bootstrap).expect("connection"),
    )
    .expect("producer");
    let backlog = sample(61, 20_000);
    let mut pending = Vec::new();
    for e in &backlog {
        let value = to_framed(e, &raw.schema, ids[RAW]).expect("frame");
        let key = e["org_id"].to_string();
        loop {
            match producer.send_result(FutureRecord::to(RAW).key(&key).payload(&value)) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for d in pending {
        d.await.expect("not cancelled").expect("delivered");
    }

    let worker = WorkerProcess::start(
        BIN,
        &bootstrap,
        &registry.address,
        &medallion_tests::bronze_env(&[("MEDALLION__BATCH__MAX_RECORDS", "25".into())]),
    )
    .expect("worker");
    let lag_of = |metrics: &str| -> Option<f64> {
        let lines: Vec<f64> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("kafka_consumer_lag{") && l.contains(&format!("topic=\"{RAW}\""))
            })
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
            .collect();
        (!lines.is_empty()).then(|| lines.iter().sum())
    };
    let mut peak = 0.0f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let last = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "lag never reached 0 (peak {peak})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(metrics) = worker.metrics().await else {
            continue;
        };
        let Some(lag) = lag_of(&metrics) else {
            continue;
        };
        assert!(lag >= 0.0, "lag is never negative");
        peak = peak.max(lag);
        if peak > 0.0 && lag == 0.0 {
            break metrics;
        }
    };
    assert!(peak > 0.0, "a backlog shows as lag");
    assert!(peak <= backlog.len() as f64);
    assert_eq!(
        metric_sum(&last, "kafka_messages_in_total"),
        backlog.len() as f64
    );
    eprintln!("peak lag {peak}, drained to 0");
}

#[test]
fn a_bad_config_stops_the_worker_with_a_message_naming_the_problem() {
    let missing = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/bronze.yaml"])
        .output()
        .expect("runs");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/bronze.yaml"));

    let typo = std::process::Command::new(BIN)
        .env("MEDALLION__KAFKA__BOOTSTRAPP", "localhost:9092")
        .output()
        .expect("runs");
    assert_eq!(typo.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(stderr.contains("bootstrapp"), "{stderr}");

    let flag = std::process::Command::new(BIN)
        .arg("--no-such-flag")
        .output()
        .expect("runs");
    assert!(!flag.status.success());
    assert!(String::from_utf8_lossy(&flag.stderr).contains("--no-such-flag"));

    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("runs");
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));
}

/// The lead and case fields marked `"pii": true` in connector/data-raw.avsc, with their values.
fn personal_values(event: &Json) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let p = &event["payload"];
    for (path, value) in [
        ("payload.lead_created.email", &p["lead_created"]["email"]),
        ("payload.lead_created.name", &p["lead_created"]["name"]),
        ("payload.case_sync.owner", &p["case_sync"]["owner"]),
    ] {
        if let Some(v) = value.as_str().map(str::trim).filter(|v| !v.is_empty()) {
            out.push((path, v.to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn personal_data_is_ciphertext_on_the_topic_and_keys_rotate() {
    use medallion_runtime::pii::{Keyring, KEY_ID_HEADER};
    let p = Pipeline::start().await;
    let key1 = base64_key(medallion_tests::TEST_PII_KEY);
    let key2 = vec![42u8; 32];
    // Without a key, bronze refuses to start and says what to configure.
    let keyless = std::process::Command::new(BIN)
        .env("MEDALLION__KAFKA__BOOTSTRAP", &p.broker.address)
        .env("MEDALLION__REGISTRY__URL", &p.registry.address)
        .env(
            "MEDALLION__CONTRACTS__HOME",
            medallion_tests::workspace_root(),
        )
        .env("MEDALLION__HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .expect("runs");
    assert!(!keyless.status.success());
    let stderr = String::from_utf8_lossy(&keyless.stderr);
    assert!(stderr.contains("stage.pii.active_key"), "{stderr}");
    let mut worker = p.worker(&[]);
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    let first = sample(61, 60);
    for e in &first {
        p.send(&e["org_id"].to_string(), &p.frame(e)).await;
    }
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        first.len(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("bronze output");
    worker.terminate(Duration::from_secs(30)).expect("stops");

    // Rotation: k2 encrypts from now on, k1 still decrypts what it wrote.
    let rotated_key = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&key2)
    };
    let worker = WorkerProcess::start(
        BIN,
        &p.broker.address,
        &p.registry.address,
        &[
            ("MEDALLION__STAGE__PII__ACTIVE_KEY", "k2".to_string()),
            (
                "MEDALLION__STAGE__PII__KEYS__K1__VALUE",
                medallion_tests::TEST_PII_KEY.to_string(),
            ),
            (
                "MEDALLION__STAGE__PII__KEYS__K2__ENV",
                "TEST_ROTATED_KEY".to_string(),
            ),
            ("TEST_ROTATED_KEY", rotated_key),
        ],
    )
    .expect("worker");
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    let second = sample(62, 60);
    for e in &second {
        p.send(&e["org_id"].to_string(), &p.frame(e)).await;
    }
    let all = read_topic(
        &p.broker.address,
        BRONZE,
        first.len() + second.len(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("bronze output");
    assert_eq!(out.len(), first.len());

    let old = Keyring::new("k1", [("k1".to_string(), key1.clone())]).expect("k1");
    let both =
        Keyring::new("k2", [("k1".to_string(), key1), ("k2".to_string(), key2)]).expect("k1+k2");
    let wrong = Keyring::new(
        "k1",
        [
            ("k1".to_string(), vec![7u8; 32]),
            ("k2".to_string(), vec![8u8; 32]),
        ],
    )
    .expect("wrong");
    let sent: HashMap<String, &Json> = first
        .iter()
        .chain(&second)
        .map(|e| (e["event_id"].as_str().expect("id").to_string(), e))
        .collect();
    let json = p.bronze_json(&all);
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    for (message, record) in all.iter().zip(&json) {
        let e = sent[record["event_id"].as_str().expect("id")];
        let values = personal_values(e);
        let header = message
            .headers()
            .and_then(|h| header_value(h, KEY_ID_HEADER));
        let bytes = message.payload().expect("value");
        for (path, plain) in &values {
            assert!(
                !bytes.windows(plain.len()).any(|w| w == plain.as_bytes()),
                "{path} `{plain}` is in the clear on {BRONZE}"
            );
            let segments: Vec<&str> = path.split('.').collect();
            let sealed = record[segments[0]][segments[1]][segments[2]]
                .as_str()
                .expect("text");
            let key = header.clone().expect("a key id header");
            assert!(sealed.starts_with(&format!("enc:v1:{key}:")), "{sealed}");
            assert_eq!(both.decrypt(path, sealed).as_deref(), Ok(plain.as_str()));
            assert!(wrong.decrypt(path, sealed).is_err());
            if key == "k1" {
                assert_eq!(old.decrypt(path, sealed).as_deref(), Ok(plain.as_str()));
            } else {
                assert!(
                    old.decrypt(path, sealed).is_err(),
                    "k1 alone cannot read k2's data"
                );
            }
        }
        if !values.is_empty() {
            *by_key.entry(header.expect("header")).or_default() += 1;
        } else {
            assert_eq!(header, None);
        }
    }
    assert!(by_key.get("k1").is_some_and(|n| *n > 10), "{by_key:?}");
    assert!(by_key.get("k2").is_some_and(|n| *n > 10), "{by_key:?}");

    // Each encryption is audited (one record per batch and org, listing its events under the
    // key that sealed them); each batch is reported on etl.execution, keyed by pipeline.
    let sealed_by_key = |messages: &[rdkafka::message::OwnedMessage]| {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for a in p.decode("audit.events", messages) {
            if a["payload"]["action"] != "pii.encrypted" {
                continue;
            }
            let key = a["payload"]["details"]["key_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            *out.entry(key).or_default() += a["payload"]["subjects"].as_array().map_or(0, Vec::len);
        }
        out
    };
    let audit = read_until(
        &p.broker.address,
        "audit.events",
        |m| sealed_by_key(m).values().sum::<usize>() >= by_key.values().sum::<usize>(),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("audit");
    assert_eq!(sealed_by_key(&audit), by_key);
    let records = p
        .decode("audit.events", &audit)
        .iter()
        .filter(|a| a["payload"]["action"] == "pii.encrypted")
        .count();
    assert!(
        records < by_key.values().sum::<usize>(),
        "fewer audit records ({records}) than sealed events"
    );
    let executions = read_until(
        &p.broker.address,
        "etl.execution",
        |m| {
            p.decode("etl.execution", m)
                .iter()
                .map(|e| e["payload"]["records_in"].as_i64().unwrap_or(0))
                .sum::<i64>()
                >= (first.len() + second.len()) as i64
        },
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("executions");
    let reports = p.decode("etl.execution", &executions);
    let sum = |field: &str| -> i64 {
        reports
            .iter()
            .map(|e| e["payload"][field].as_i64().expect("count"))
            .sum()
    };
    assert_eq!(sum("records_in"), (first.len() + second.len()) as i64);
    assert_eq!(sum("records_out"), all.len() as i64);
    assert_eq!(sum("records_dlq"), 0);
    for (message, report) in executions.iter().zip(&reports) {
        assert_eq!(message.key(), Some(b"medallion".as_slice()));
        assert_eq!(report["payload"]["stage"], "bronze-processor");
        assert_eq!(report["payload"]["status"], "SUCCEEDED");
    }
}

fn base64_key(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

#[tokio::test(flavor = "multi_thread")]
async fn two_deployments_share_one_cluster_under_their_prefixes() {
    let p = Pipeline::start().await;
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&p.broker.address).expect("connection");
    // A second deployment, `blue.`, on the same broker and registry.
    let blue = p.topics.clone().with_prefix("blue.").expect("prefix");
    medallion_runtime::admin::apply_topics(&kafka, &blue, 1)
        .await
        .expect("blue topics");
    let blue_ids: HashMap<String, u32> =
        RegistryClient::new(&p.registry.address, Duration::from_secs(10))
            .expect("client")
            .register_all(&p.contracts, &blue)
            .await
            .expect("blue subjects")
            .into_iter()
            .collect();
    let blue_raw = "blue.connector.data.raw";
    assert!(blue_ids.contains_key(blue_raw), "{blue_ids:?}");

    let green = p.worker(&[]);
    let blue_worker = p.worker(&[("MEDALLION__NAMING__PREFIX", "blue.".to_string())]);
    for w in [&green, &blue_worker] {
        w.wait_ready(Duration::from_secs(60)).await.expect("ready");
    }
    let green_events = sample(61, 40);
    let blue_events = sample(62, 25);
    for e in &green_events {
        p.send(e["org_id"].to_string(), &p.frame(e)).await;
    }
    for e in &blue_events {
        let value = to_framed(e, &p.raw.schema, blue_ids[blue_raw]).expect("frames");
        p.send_to(blue_raw, e["org_id"].to_string(), &value).await;
    }
    let ids = |events: &[Json]| -> BTreeSet<String> {
        events
            .iter()
            .map(|e| e["event_id"].as_str().expect("id").to_string())
            .collect()
    };
    for (topic, events) in [
        (BRONZE, &green_events),
        ("blue.bronze.data.cleaned", &blue_events),
    ] {
        let out = read_topic(
            &p.broker.address,
            topic,
            events.len(),
            Duration::from_secs(3),
            Duration::from_secs(90),
        )
        .await
        .expect("output");
        let got: BTreeSet<String> = p
            .bronze_json(&out)
            .iter()
            .map(|e| e["event_id"].as_str().expect("id").to_string())
            .collect();
        assert_eq!(
            out.len(),
            events.len(),
            "{topic}: each of its own events once"
        );
        assert_eq!(
            got,
            ids(events),
            "{topic}: exactly its own deployment's events"
        );
    }
    // Each deployment commits under its own group: blue's group holds blue's raw offsets, and
    // the unprefixed group never read the blue topic.
    let committed = |group: &str| {
        medallion_runtime::ops::lag::group_lag(&kafka, group, &[blue_raw.to_string()], None)
            .expect("lag")
            .iter()
            .filter_map(|r| r.committed)
            .sum::<i64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while committed("blue.bronze-processor") < blue_events.len() as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "blue.bronze-processor committed {} of {}",
            committed("blue.bronze-processor"),
            blue_events.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(committed("bronze-processor"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_before_its_topics_exist_carries_on_and_starts_when_they_do() {
    let p = Pipeline::start().await;
    let late = p.topics.clone().with_prefix("late.").expect("prefix");
    let ids = RegistryClient::new(&p.registry.address, Duration::from_secs(10))
        .expect("client")
        .register_all(&p.contracts, &late)
        .await
        .expect("late subjects");
    let worker = p.worker(&[("MEDALLION__NAMING__PREFIX", "late.".to_string())]);
    // The consumer reports the missing input topic: an error to log and survive.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let errors = match worker.metrics().await {
            Ok(text) => metric_sum(&text, "medallion_consumer_errors_total"),
            Err(_) => 0.0,
        };
        if errors >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no consumer error was reported (or the worker is gone)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker
        .metrics()
        .await
        .expect("the worker is still serving after consumer errors");

    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&p.broker.address).expect("connection");
    medallion_runtime::admin::apply_topics(&kafka, &late, 1)
        .await
        .expect("late topics");
    let events = sample(91, 30);
    let raw = "late.connector.data.raw";
    for e in &events {
        let value = to_framed(e, &p.raw.schema, ids[raw]).expect("frames");
        p.send_to(raw, e["org_id"].to_string(), &value).await;
    }
    let out = read_topic(
        &p.broker.address,
        "late.bronze.data.cleaned",
        events.len(),
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await
    .expect("the worker picked the topic up once it existed");
    let got: BTreeSet<String> = ids_of(&p, &out).into_iter().collect();
    let want: BTreeSet<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(got, want);
    assert_eq!(out.len(), events.len());
}

/// The connector event a record of `topic` stands for: its own event id in bronze (and the
/// input), the bronze event's in silver (whose event id is derived from it).
pub fn source_id(topic: &str, e: &Json) -> String {
    if topic.ends_with("silver.data.processed") {
        e["payload"]["bronze_event_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        id_of(e)
    }
}

/// A decoded record's own event id.
pub fn id_of(e: &Json) -> String {
    e["event_id"].as_str().unwrap_or_default().to_string()
}

/// With a state directory, bronze copies its dedup windows to disk (every 100 ms here). Killed
/// three times mid-backlog, with copies made at offsets stored but not yet committed, it
/// still produces every event once. Killed when idle and restarted on its disk, it takes its
/// windows from their copies instead of reading the input back (one copy damaged: that
/// partition's window is read from the input), and drops every event sent again.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_on_its_disk_takes_its_dedup_windows_from_their_copies() {
    let p = Pipeline::start().await;
    let disk = tempfile::tempdir().expect("temp dir");
    let env = [
        ("MEDALLION__BATCH__MAX_RECORDS", "100".to_string()),
        ("MEDALLION__STATE__DIR", disk.path().display().to_string()),
        ("MEDALLION__STATE__CHECKPOINT_INTERVAL_MS", "100".into()),
    ];
    let first = sample(67, 3_000);
    let mut worker = p.worker(&env);
    for event in &first {
        p.send(&event["org_id"].to_string(), &p.frame(event)).await;
    }
    for round in 0..3u64 {
        tokio::time::sleep(Duration::from_millis(1_500 + 400 * round)).await;
        worker.kill();
        worker = p.worker(&env);
    }
    let ids_sent = |events: &[Json]| -> BTreeSet<String> {
        events
            .iter()
            .map(|e| e["event_id"].as_str().expect("id").to_string())
            .collect()
    };
    let expected = ids_sent(&first);
    let out = until_ids(&p, &expected, Duration::from_secs(180)).await;
    assert_eq!(
        out.len(),
        expected.len(),
        "no event twice after three kills"
    );

    // Idle long enough for every offset to be committed and copied, then killed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    worker.kill();
    let copies_dir = disk.path().join("bronze-processor.windows");
    let mut copies: Vec<std::path::PathBuf> = std::fs::read_dir(&copies_dir)
        .expect("window copies")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_none())
        .collect();
    copies.sort();
    assert!(copies.len() > 1, "a copy per partition: {copies:?}");
    let damaged = &copies[0];
    let mut bytes = std::fs::read(damaged).expect("copy");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(damaged, &bytes).expect("damage");
    let damaged_partition: i32 = damaged
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("partition-"))
        .and_then(|n| n.parse().ok())
        .expect("partition-<n>");
    let raw = read_topic(
        &p.broker.address,
        RAW,
        first.len(),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("raw");
    let in_damaged = raw
        .iter()
        .filter(|m| m.partition() == damaged_partition)
        .count();

    // Restarted on its disk: a third of the events again, then new ones.
    let worker = p.worker(&env);
    let again: Vec<Json> = first.iter().step_by(3).cloned().collect();
    let new = sample(71, 300);
    for event in again.iter().chain(&new) {
        p.send(&event["org_id"].to_string(), &p.frame(event)).await;
    }
    let all: BTreeSet<String> = expected.union(&ids_sent(&new)).cloned().collect();
    let out = until_ids(&p, &all, Duration::from_secs(120)).await;
    assert_eq!(
        out.len(),
        all.len(),
        "no event sent again was produced again"
    );
    let metrics = worker.metrics().await.expect("metrics");
    let restored = |source: &str| {
        metric_sum_where(
            &metrics,
            "medallion_dedup_window_restored_total",
            &format!("source=\"{source}\""),
        )
    };
    assert_eq!(
        (restored("disk"), restored("input")),
        ((first.len() - in_damaged) as f64, in_damaged as f64),
        "every window from its copy but the damaged one's, read from the input"
    );
    assert_eq!(
        metric_sum(&metrics, "medallion_duplicates_dropped_total"),
        again.len() as f64
    );
}
