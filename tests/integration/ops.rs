//! The operator tooling (`medallion capture|replay|lag|dlq|topics`) on a real broker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use medallion_runtime::admin::{plan_topics, reconcile_topics, Change};
use medallion_runtime::kafka::{KafkaConnection, Role};
use medallion_runtime::ops::capture::{capture, read_capture, replay, ReplayOptions};
use medallion_runtime::ops::lag::group_lag;
use medallion_runtime::ops::redrive::{inspect, redrive, RedriveOptions, REDRIVE_COUNT};
use medallion_tests::{broker, read_topic, read_until};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::bronze::{now_ms, sample, Pipeline};

const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";

fn client(bootstrap: &str) -> KafkaConnection {
    KafkaConnection::plain(bootstrap).expect("connection")
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(medallion_tests::unique(name))
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_then_replay_reproduces_a_topic_byte_for_byte() {
    let p = Pipeline::start().await;
    // Keys and no keys, headers and none, explicit partitions and timestamps.
    for n in 0..240i64 {
        let key = format!("org-{}", n % 7);
        let value = format!("value {n} {}", "x".repeat((n % 13) as usize));
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "n",
                value: Some(n.to_string().as_bytes()),
            })
            .insert(Header {
                key: "empty",
                value: None::<&[u8]>,
            });
        let mut record = FutureRecord::to(RAW)
            .payload(value.as_bytes())
            .partition((n % 5) as i32)
            .timestamp(1_700_000_000_000 + n);
        if n % 4 != 0 {
            record = record.key(key.as_bytes());
        }
        if n % 3 != 0 {
            record = record.headers(headers);
        }
        p.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
    let kafka = client(&p.broker.address);
    let (first, second) = (temp_file("capture-a"), temp_file("capture-b"));
    let (k, f) = (kafka.clone(), first.clone());
    let captured = tokio::task::spawn_blocking(move || capture(&k, RAW, &f, |_| {}))
        .await
        .expect("task")
        .expect("captured");
    assert_eq!(captured.records, 240);
    let records = read_capture(&first).expect("readable");
    let replayed = replay(
        &kafka,
        BRONZE,
        &records,
        &ReplayOptions::default(),
        |_, _| {},
    )
    .await
    .expect("replayed");
    assert_eq!((replayed.records, replayed.errors), (240, 0));
    let (k, f) = (kafka.clone(), second.clone());
    tokio::task::spawn_blocking(move || capture(&k, BRONZE, &f, |_| {}))
        .await
        .expect("task")
        .expect("captured");
    let (a, b) = (
        std::fs::read(&first).expect("first"),
        std::fs::read(&second).expect("second"),
    );
    assert_eq!(a, b, "the copy is the same, byte for byte (partitions, offsets, timestamps, keys, values, headers)");
    assert!(
        records.iter().any(|r| r.key.is_none()) && records.iter().any(|r| r.headers.is_empty())
    );
    // A paced replay keeps its rate.
    let started = std::time::Instant::now();
    let options = ReplayOptions {
        rate: Some(400.0),
        ..ReplayOptions::default()
    };
    replay(
        &kafka,
        "silver.data.processed",
        &records[..120],
        &options,
        |_, _| {},
    )
    .await
    .expect("paced");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let _ = (std::fs::remove_file(&first), std::fs::remove_file(&second));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_after_the_fix_brings_every_dead_letter_back_exactly_once() {
    let p = Pipeline::start().await;
    let kafka = client(&p.broker.address);
    let worker = p.worker(&[]);
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    // 20 good events, 10 from a producer whose clock runs an hour ahead, 3 garbage records.
    let good = sample(71, 20);
    let mut ahead = sample(72, 10);
    for e in &mut ahead {
        e["timestamp"] = serde_json::json!(now_ms() + 3_600_000);
    }
    for e in good.iter().chain(&ahead) {
        p.send(&e["org_id"].to_string(), &p.frame(e)).await;
    }
    let dlq = format!("{RAW}.dlq");
    // The garbage only once the skewed events are dead-lettered: the records a redrive leaves
    // behind then follow the ones it sends back on every DLQ partition, and its commit needs
    // no metadata (which the test broker drops) to remember what it did past them.
    read_topic(
        &p.broker.address,
        &dlq,
        10,
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .await
    .expect("the skewed events dead-lettered");
    for n in 0..3u8 {
        p.send("7", &[0, 0, 0, 0, 99, n]).await;
    }
    read_topic(
        &p.broker.address,
        &dlq,
        13,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("dead letters");
    let (k, d) = (kafka.clone(), dlq.clone());
    let report = tokio::task::spawn_blocking(move || inspect(&k, &d, 1))
        .await
        .expect("task")
        .expect("inspected");
    assert_eq!(report.total, 13);
    assert_eq!(report.by_reason["timestamp_out_of_range"].count, 10);
    assert_eq!(
        report
            .by_reason
            .values()
            .map(|r| r.samples.len())
            .sum::<usize>(),
        report.by_reason.len()
    );

    // A dry run names what would go back and changes nothing.
    let only_time = RedriveOptions {
        reasons: vec!["timestamp_out_of_range".into()],
        ..RedriveOptions::default()
    };
    let dry = redrive(
        &kafka,
        &dlq,
        &RedriveOptions {
            dry_run: true,
            ..only_time.clone()
        },
    )
    .await
    .expect("dry run");
    assert_eq!(dry.redriven, BTreeMap::from([(RAW.to_string(), 10)]));
    assert_eq!(dry.filtered, 3);

    // Fix the cause (allow the skew), then redrive: each event comes through once.
    drop(worker);
    let worker = p.worker(&[("MEDALLION__STAGE__MAX_FUTURE_SKEW_MS", "7200000".into())]);
    worker
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready again");
    let done = redrive(&kafka, &dlq, &only_time).await.expect("redriven");
    assert_eq!(done.redriven, BTreeMap::from([(RAW.to_string(), 10)]));
    let again = redrive(&kafka, &dlq, &only_time).await.expect("second run");
    assert!(again.redriven.is_empty(), "{again:?}");
    // Records past a left-behind one are remembered in the commit metadata, the rest by offset.
    assert!(again.already <= 10 && again.filtered == 3, "{again:?}");
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        30,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await
    .expect("bronze output");
    let ids: Vec<String> = p
        .bronze_json(&out)
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    let expected: BTreeSet<String> = good
        .iter()
        .chain(&ahead)
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 30, "each event exactly once");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), expected);

    // Garbage cannot loop: back once, dead again, then left alone.
    let once = RedriveOptions {
        max_redrives: 1,
        ..RedriveOptions::default()
    };
    let first = redrive(&kafka, &dlq, &once)
        .await
        .expect("garbage redriven");
    assert_eq!(first.redriven.get(RAW), Some(&3));
    let back = read_until(
        &p.broker.address,
        &dlq,
        |m| m.len() >= 16,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await
    .expect("dead again");
    let counted = back
        .iter()
        .filter(|m| {
            use rdkafka::message::Message;
            m.headers()
                .and_then(|h| medallion_runtime::dlq::header_value(h, REDRIVE_COUNT))
                .as_deref()
                == Some("1")
        })
        .count();
    assert_eq!(counted, 3);
    let last = redrive(&kafka, &dlq, &once).await.expect("third run");
    assert!(last.redriven.is_empty(), "{last:?}");
    assert_eq!(last.looping, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_plan_shows_the_difference_and_apply_removes_it() {
    let broker = broker().expect("broker");
    let (_, topics) = medallion_tests::contracts().expect("contracts");
    let plan = plan_topics(&client(&broker.address), &topics, 1)
        .await
        .expect("plan");
    assert!(plan.iter().all(|(_, c)| c == &vec![Change::Create]));
    reconcile_topics(&client(&broker.address), &topics, 1)
        .await
        .expect("applied");
    let plan = plan_topics(&client(&broker.address), &topics, 1)
        .await
        .expect("plan");
    assert!(plan.iter().all(|(_, c)| c.is_empty()), "{plan:?}");

    // Shorter retention and more partitions for one topic.
    let root = medallion_tests::workspace_root();
    let text = std::fs::read_to_string(root.join("topic-config.yaml")).expect("yaml");
    let changed = text.replacen(
        "  connector.data.raw:\n    partitions: 12\n    replication: 3\n    retention: 7d",
        "  connector.data.raw:\n    partitions: 12\n    replication: 3\n    retention: 3d",
        1,
    );
    assert_ne!(changed, text);
    let changed = medallion_contracts::TopicConfig::parse(&changed, "changed").expect("valid");
    let plan = plan_topics(&client(&broker.address), &changed, 1)
        .await
        .expect("plan");
    let raw: Vec<&Change> = plan
        .iter()
        .filter(|(t, _)| t.name == RAW)
        .flat_map(|(_, c)| c)
        .collect();
    assert_eq!(
        raw,
        [&Change::Retention {
            from: Some(7 * 86_400_000),
            to: 3 * 86_400_000
        }]
    );
    assert_eq!(plan.iter().filter(|(_, c)| !c.is_empty()).count(), 1);
    reconcile_topics(&client(&broker.address), &changed, 1)
        .await
        .expect("applied");
    let plan = plan_topics(&client(&broker.address), &changed, 1)
        .await
        .expect("plan");
    assert!(plan.iter().all(|(_, c)| c.is_empty()), "{plan:?}");
    // Fewer partitions cannot be applied, and nothing is changed trying.
    let fewer = medallion_contracts::TopicConfig::parse(
        &text.replacen("partitions: 12", "partitions: 4", 1),
        "fewer",
    )
    .expect("valid");
    let e = reconcile_topics(&client(&broker.address), &fewer, 1)
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("cannot remove partitions"), "{e}");
}

#[test]
fn lag_is_committed_offset_to_high_watermark_per_partition() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("t", 2, 1).expect("topic");
    let kafka = client(&cluster.bootstrap_servers());
    let producer: BaseProducer = kafka.config(Role::Admin).create().expect("producer");
    for n in 0..10 {
        let partition = if n < 6 { 0 } else { 1 };
        producer
            .send(
                BaseRecord::<(), [u8]>::to("t")
                    .payload(b"x".as_slice())
                    .partition(partition),
            )
            .map_err(|(e, _)| e)
            .expect("queued");
    }
    producer.flush(Duration::from_secs(10)).expect("flushed");
    let consumer: BaseConsumer = kafka
        .create(
            Role::Reader {
                group: "g",
                until_end: false,
            },
            "consumer",
        )
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("t", 0, rdkafka::Offset::Offset(4))
        .expect("tpl");
    consumer.commit(&tpl, CommitMode::Sync).expect("committed");
    let rows = group_lag(&kafka, "g", &["t".to_string()], None).expect("lag");
    let lag: Vec<(i32, Option<i64>, i64, i64)> = rows
        .iter()
        .map(|r| (r.partition, r.committed, r.high, r.lag))
        .collect();
    assert_eq!(lag, [(0, Some(4), 6, 2), (1, None, 4, 4)]);
    assert!(rows.iter().all(|r| r.read_past.is_none()));
    assert!(medallion_runtime::ops::lag::table(&rows).contains("(total)"));

    // A fair worker's commit: offset 1 is the lowest record not done; everything below 4 is
    // done but org "a"'s records from 2 on.
    let progress = medallion_runtime::progress::Progress::new(1, 4, [(b"a".to_vec(), 2)]);
    let metadata = medallion_runtime::recovery::wrap_progress(
        &medallion_runtime::recovery::Snapshot::default(),
        Some(&progress.encode("t", 1)),
        None,
    );
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("t", 1, rdkafka::Offset::Offset(1))
        .expect("tpl");
    tpl.find_partition("t", 1)
        .expect("element")
        .set_metadata(metadata);
    consumer.commit(&tpl, CommitMode::Sync).expect("committed");
    let rows = group_lag(&kafka, "g", &["t".to_string()], None).expect("lag");
    let past = rows.iter().find(|r| r.partition == 1).expect("row");
    assert_eq!((past.committed, past.lag), (Some(1), 3));
    assert_eq!(
        past.read_past,
        Some(medallion_runtime::ops::lag::ReadPast {
            through: 4,
            open_orgs: 1
        })
    );
    assert!(medallion_runtime::ops::lag::table(&rows).contains("all below 4 but 1 org"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_producer_acknowledges_a_batch_and_names_the_records_that_failed() {
    use medallion_runtime::kafka::{BatchProducer, BatchRecord};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("acks", 1, 1).expect("topic");
    let kafka = client(&cluster.bootstrap_servers());
    let producer = BatchProducer::new(&kafka.config(Role::Producer {
        message_timeout_ms: 30_000,
    }))
    .expect("producer");
    let values: Vec<Vec<u8>> = (0..50).map(|n| format!("v{n}").into_bytes()).collect();
    let indexes: Vec<usize> = (0..values.len()).collect();
    // Two batches on one producer: the second must not see the first's acknowledgements.
    for round in 0..2 {
        let failures = producer
            .send_all(&indexes, |i| BatchRecord {
                topic: "acks",
                // Record 7 goes to a partition the topic does not have.
                partition: Some(if i == 7 { 5 } else { 0 }),
                key: Some(b"1"),
                value: &values[i],
                headers: None,
            })
            .await;
        assert_eq!(failures.indexes, vec![7], "round {round}");
        assert!(failures.first_error.is_some());
    }
    let consumer: BaseConsumer = kafka
        .create(
            Role::Reader {
                group: "acks-reader",
                until_end: false,
            },
            "consumer",
        )
        .expect("consumer");
    consumer.subscribe(&["acks"]).expect("subscribe");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 98 && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            seen.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
        }
    }
    let mut expected: Vec<String> = (0..50)
        .filter(|n| *n != 7)
        .flat_map(|n| [format!("v{n}"), format!("v{n}")])
        .collect();
    expected.sort();
    seen.sort();
    assert_eq!(
        seen, expected,
        "every other record delivered, once per round"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_goes_past_records_it_cannot_place_or_send() {
    use rdkafka::message::Message;
    let p = Pipeline::start().await;
    let kafka = client(&p.broker.address);
    let dlq = format!("{RAW}.dlq");
    // A producer allowed bigger records than the redrive's own (1 MB) limit.
    let big_producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.broker.address)
        .set("message.max.bytes", "3000000")
        .create()
        .expect("producer");
    let big = vec![b'x'; 1_500_000];
    let cases: [(&str, &[u8]); 4] = [
        ("abc", b"unparsable partition"),
        ("99", b"no such partition"),
        ("4", b"partition four"),
        ("2", &big),
    ];
    for (partition, value) in cases {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: medallion_runtime::dlq::header::ORIGINAL_TOPIC,
                value: Some(RAW.as_bytes()),
            })
            .insert(Header {
                key: medallion_runtime::dlq::header::ORIGINAL_PARTITION,
                value: Some(partition.as_bytes()),
            })
            .insert(Header {
                key: medallion_runtime::dlq::header::ERROR_REASON,
                value: Some(b"decode_failed".as_slice()),
            });
        big_producer
            .send(
                FutureRecord::to(&dlq)
                    .key("7")
                    .payload(value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("dead letter written");
    }

    let report = redrive(&kafka, &dlq, &RedriveOptions::default())
        .await
        .expect("a redrive that goes on past bad records");
    assert_eq!(
        report.redriven,
        BTreeMap::from([(RAW.to_string(), 3)]),
        "{report:?}"
    );
    assert_eq!(report.repartitioned, 2, "{report:?}");
    assert_eq!(report.failed, 1, "{report:?}");
    assert!(
        report.failures[0].starts_with(&format!("{dlq}/")),
        "the failure names its record: {:?}",
        report.failures
    );

    let back = read_topic(
        &p.broker.address,
        RAW,
        3,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("redriven records");
    assert_eq!(back.len(), 3);
    let by_key = medallion_tests::java_partition(b"7", 12);
    let mut placed: Vec<(String, i32)> = back
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                m.partition(),
            )
        })
        .collect();
    placed.sort();
    assert_eq!(
        placed,
        vec![
            ("no such partition".to_string(), by_key),
            ("partition four".to_string(), 4),
            ("unparsable partition".to_string(), by_key),
        ]
    );

    // The refused record was left for the next run; the others are not sent twice.
    let again = redrive(&kafka, &dlq, &RedriveOptions::default())
        .await
        .expect("second run");
    assert!(again.redriven.is_empty(), "{again:?}");
    // The first three are before the committed position, so only the refused one is read again.
    assert_eq!((again.failed, again.already), (1, 0), "{again:?}");
}
