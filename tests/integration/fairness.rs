//! Orgs that share a partition share the worker: one org's backlog ahead of the others in the
//! log does not hold them up (bronze-processor as its own process, on a real broker).

use std::collections::BTreeSet;
use std::time::Duration;

use medallion_tests::{metric_sum, read_topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::bronze::{ids_of, sample, Pipeline};

const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";
const FLOOD_ORG: i64 = 100;
const SMALL_ORGS: [i64; 5] = [211, 322, 433, 544, 655];

/// Produces `flood` events of one org and then four events of each small org (sample `seed`),
/// all to partition 0, each acknowledged; returns them in the order sent.
async fn produce_backlog(p: &Pipeline, seed: u64, flood: usize) -> Vec<serde_json::Value> {
    let mut events = sample(seed, flood + 4 * SMALL_ORGS.len());
    for (i, e) in events.iter_mut().enumerate() {
        let org = if i < flood {
            FLOOD_ORG
        } else {
            SMALL_ORGS[(i - flood) % SMALL_ORGS.len()]
        };
        e["org_id"] = json!(org);
    }
    let pending: Vec<_> = events
        .iter()
        .map(|e| {
            let key = e["org_id"].to_string();
            p.producer
                .send_result(
                    FutureRecord::to(RAW)
                        .partition(0)
                        .key(&key)
                        .payload(&p.frame(e)),
                )
                .map_err(|(e, _)| e)
                .expect("queued")
        })
        .collect();
    for delivery in pending {
        delivery.await.expect("not cancelled").expect("delivered");
    }
    events
}

/// Produces a backlog ([`produce_backlog`]); runs bronze over that backlog; returns how many of the flooding org's outputs
/// were produced before the last small-org output, and whether each org's events came out in
/// the order sent.
async fn flood_then_small(fair: bool, flood: usize) -> (usize, bool) {
    flood_then_small_within(fair, flood, 100_000).await
}

/// [`flood_then_small`] with a dedup window of `window` records per partition.
async fn flood_then_small_within(fair: bool, flood: usize, window: usize) -> (usize, bool) {
    let p = Pipeline::start().await;
    let events = produce_backlog(&p, 61, flood).await;
    let worker = p.worker(&[
        ("MEDALLION__FAIRNESS__ENABLED", fair.to_string()),
        ("MEDALLION__FAIRNESS__ORG_READ_AHEAD", "500".into()),
        ("MEDALLION__BATCH__MAX_RECORDS", "500".into()),
        ("MEDALLION__DEDUP__WINDOW_PER_PARTITION", window.to_string()),
    ]);
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        events.len(),
        Duration::from_secs(2),
        Duration::from_secs(240),
    )
    .await
    .expect("bronze output");
    let ids = ids_of(&p, &out);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), unique.len()),
        (events.len(), events.len()),
        "every event exactly once"
    );
    let org_of = |m: &OwnedMessage| -> String {
        String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned()
    };
    let produced_at = |m: &OwnedMessage| m.timestamp().to_millis().unwrap_or(i64::MAX);
    let last_small = out
        .iter()
        .filter(|m| org_of(m) != FLOOD_ORG.to_string())
        .map(produced_at)
        .max()
        .expect("small-org outputs");
    let flood_before = out
        .iter()
        .filter(|m| org_of(m) == FLOOD_ORG.to_string() && produced_at(m) < last_small)
        .count();
    let metrics = worker.metrics().await.expect("metrics");
    if fair {
        assert!(
            metric_sum(&metrics, "medallion_fair_queued_records") >= 0.0,
            "the scheduler's queues are exported"
        );
    }
    // Each org's events in the order sent (outputs of one org share a partition).
    let in_order = std::iter::once(FLOOD_ORG).chain(SMALL_ORGS).all(|org| {
        let sent: Vec<&str> = events
            .iter()
            .filter(|e| e["org_id"] == json!(org))
            .map(|e| e["event_id"].as_str().unwrap_or_default())
            .collect();
        let came: Vec<&str> = out
            .iter()
            .zip(&ids)
            .filter(|(m, _)| org_of(m) == org.to_string())
            .map(|(_, id)| id.as_str())
            .collect();
        sent == came
    });
    eprintln!(
        "fair={fair}: {flood_before} of {flood} flood outputs before the last small-org output"
    );
    (flood_before, in_order)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orgs_backlog_does_not_hold_up_the_orgs_behind_it_on_its_partition() {
    const FLOOD: usize = 20_000;
    let (before, in_order) = flood_then_small(true, FLOOD).await;
    assert!(in_order, "each org's events come out in the order sent");
    assert!(
        before < FLOOD / 2,
        "the small orgs were done after {before} of the flooding org's {FLOOD} records"
    );

    // Taken in log order instead, they wait for the whole backlog.
    let (before, in_order) = flood_then_small(false, FLOOD).await;
    assert!(in_order);
    assert!(
        before >= FLOOD * 9 / 10,
        "in log order the small orgs come after the backlog ({before} of {FLOOD} before them)"
    );
}

/// tansu drops commit metadata, so what a restart would pass over is known only from the
/// group's progress topic; with it, the head's read-ahead is bounded by what the progress cannot
/// claim, not by the dedup window (here a tenth of the flood: without the progress topic the
/// small orgs would wait for nine tenths of it).
#[tokio::test(flavor = "multi_thread")]
async fn the_head_reads_past_a_flood_ten_times_the_dedup_window() {
    const FLOOD: usize = 20_000;
    let (before, in_order) = flood_then_small_within(true, FLOOD, FLOOD / 10).await;
    assert!(in_order, "each org's events come out in the order sent");
    assert!(
        before < FLOOD / 2,
        "the small orgs were done after {before} of the flooding org's {FLOOD} records"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_while_reading_past_a_backlog_loses_and_repeats_nothing() {
    const FLOOD: usize = 20_000;
    let p = Pipeline::start().await;
    let events = produce_backlog(&p, 62, FLOOD).await;
    // A partition read-ahead barely above the org's: the head pauses and resumes often.
    let env = [
        ("MEDALLION__FAIRNESS__ENABLED", "true".to_string()),
        ("MEDALLION__FAIRNESS__ORG_READ_AHEAD", "500".to_string()),
        ("MEDALLION__FAIRNESS__READ_AHEAD_RECORDS", "520".to_string()),
        ("MEDALLION__BATCH__MAX_RECORDS", "500".to_string()),
    ];
    let mut worker = p.worker(&env);
    // Killed twice while the flooding org is being caught up.
    for wanted in [3_000usize, 9_000] {
        wait_for_outputs(&p, wanted).await;
        worker.kill();
        worker = p.worker(&env);
    }
    assert_exactly_once(&p, &events).await;
    drop(worker);
}

/// Waits until bronze's output topic holds `wanted` records.
async fn wait_for_outputs(p: &Pipeline, wanted: usize) {
    read_topic(
        &p.broker.address,
        BRONZE,
        wanted,
        Duration::ZERO,
        Duration::from_secs(120),
    )
    .await
    .expect("some output");
}

/// tansu drops commit metadata, so `medallion lag` reads what a fair worker did past its
/// committed offset from the group's progress topic: the entry written with that offset. The
/// claim reaches the partition's last record, which tansu lists one batch short of.
#[tokio::test(flavor = "multi_thread")]
async fn lag_shows_what_was_done_past_the_commit_from_the_progress_topic() {
    use medallion_runtime::progress::Progress;
    use medallion_runtime::recovery::{wrap_progress, Snapshot};
    let p = Pipeline::start().await;
    let events = produce_backlog(&p, 66, 30).await;
    let end = events.len() as i64;

    // Committed at 10: everything below the end is done but the flooding org's from 12 on.
    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.broker.address)
        .set("group.id", "bronze-processor")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(RAW, 0, Offset::Offset(10))
        .expect("tpl");
    group
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .expect("committed");
    let progress = Progress::new(10, end, [(FLOOD_ORG.to_string().into_bytes(), 12)]);
    let metadata = wrap_progress(&Snapshot::default(), Some(&progress.encode(RAW, 0)), None);
    // An entry of another offset first: only the committed offset's entry counts.
    for (offset, metadata) in [(9, metadata.clone()), (10, metadata)] {
        p.producer
            .send(
                FutureRecord::to("bronze-processor.progress")
                    .partition(0)
                    .key("0")
                    .payload(&format!("{offset} {metadata}")),
                Duration::from_secs(10),
            )
            .await
            .expect("entry written");
    }

    let row = lag_of_partition_0(&p).await;
    assert_eq!(row.committed, Some(10), "{row:?}");
    assert_eq!(
        row.read_past,
        Some(medallion_runtime::ops::lag::ReadPast {
            through: end,
            open_orgs: 1
        }),
        "{row:?}"
    );
    assert!(
        medallion_runtime::ops::lag::table(std::slice::from_ref(&row))
            .contains(&format!("all below {end} but 1 org"))
    );

    // Without the progress topic, the commit alone says nothing past itself.
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&p.broker.address).expect("connection");
    let rows = tokio::task::spawn_blocking(move || {
        medallion_runtime::ops::lag::group_lag(&kafka, "bronze-processor", &[RAW.to_string()], None)
    })
    .await
    .expect("joined")
    .expect("lag");
    assert!(rows.iter().all(|r| r.read_past.is_none()));
}

/// What `medallion lag` says of bronze on partition 0 of its input.
async fn lag_of_partition_0(p: &Pipeline) -> medallion_runtime::ops::lag::LagRow {
    let kafka =
        medallion_runtime::kafka::KafkaConnection::plain(&p.broker.address).expect("connection");
    tokio::task::spawn_blocking(move || {
        medallion_runtime::ops::lag::group_lag(
            &kafka,
            "bronze-processor",
            &[RAW.to_string()],
            Some("bronze-processor.progress"),
        )
    })
    .await
    .expect("joined")
    .expect("lag")
    .into_iter()
    .find(|r| r.partition == 0)
    .expect("partition 0")
}

/// Reads bronze's outputs (until every event is there, then 3 s more): every event of `events`
/// once, none twice, and each org's in the order sent.
async fn assert_exactly_once(p: &Pipeline, events: &[serde_json::Value]) {
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        events.len(),
        Duration::from_secs(3),
        Duration::from_secs(240),
    )
    .await
    .unwrap_or_default();
    let ids = ids_of(p, &out);
    let got: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    let missing: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .filter(|id| !got.contains(id))
        .collect();
    let first_missing: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event_id"].as_str().is_some_and(|id| !got.contains(id)))
        .map(|(i, _)| i)
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} lost, first at positions {first_missing:?}",
        missing.len(),
        events.len()
    );
    assert_eq!(ids.len(), events.len(), "none twice");
    // Each org's outputs in the order its events were sent.
    let position: std::collections::HashMap<&str, usize> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e["event_id"].as_str().map(|id| (id, i)))
        .collect();
    let mut last_of_org: std::collections::HashMap<i64, usize> = Default::default();
    for id in &ids {
        let at = position[id.as_str()];
        let org = events[at]["org_id"].as_i64().unwrap_or_default();
        if let Some(before) = last_of_org.insert(org, at) {
            assert!(
                before < at,
                "org {org}: event {at} came out after event {before}"
            );
        }
    }
}

/// The flooding org's partition changes hands while it is being read past: a second worker
/// joins (a rebalance), the first leaves on SIGTERM (its revocation hands the partition over
/// with what it claimed done), a third joins, and the second is SIGKILLed (its partitions wait
/// for its session and go to the third). Every event once, each org's in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_flooded_partition_handed_over_mid_flood_loses_and_repeats_nothing() {
    const FLOOD: usize = 20_000;
    let p = Pipeline::start().await;
    let events = produce_backlog(&p, 65, FLOOD).await;
    let env = [
        ("MEDALLION__FAIRNESS__ENABLED", "true".to_string()),
        ("MEDALLION__FAIRNESS__ORG_READ_AHEAD", "500".to_string()),
        ("MEDALLION__BATCH__MAX_RECORDS", "500".to_string()),
    ];
    let mut first = p.worker(&env);
    wait_for_outputs(&p, 3_000).await;
    let mut second = p.worker(&env);
    wait_for_outputs(&p, 7_000).await;
    assert!(
        first.terminate(Duration::from_secs(30)).expect("stopped"),
        "the first worker stops cleanly"
    );
    wait_for_outputs(&p, 11_000).await;
    let third = p.worker(&env);
    wait_for_outputs(&p, 14_000).await;
    second.kill();
    assert_exactly_once(&p, &events).await;
    drop(third);
}

/// tansu keeps a committed offset but drops its metadata (where the outputs stood, what was
/// done beyond the offset). The group's progress topic keeps it: every committed offset has its
/// entry there, written before the offset was stored, and a restart after a SIGKILL reads on
/// from it, losing and repeating nothing.
#[tokio::test(flavor = "multi_thread")]
async fn every_committed_offset_has_its_metadata_in_the_progress_topic() {
    let p = Pipeline::start().await;
    let events = produce_backlog(&p, 63, 3_000).await;
    let env = [("MEDALLION__BATCH__MAX_RECORDS", "500".to_string())];
    let mut worker = p.worker(&env);
    read_topic(
        &p.broker.address,
        BRONZE,
        events.len(),
        Duration::ZERO,
        Duration::from_secs(120),
    )
    .await
    .expect("bronze output");
    // Committed by the timer (one second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker.kill();

    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &p.broker.address)
        .set("group.id", "bronze-processor")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(RAW, 0);
    let committed = group
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let elem = committed.find_partition(RAW, 0).expect("partition 0");
    let Offset::Offset(offset) = elem.offset() else {
        panic!("partition 0 committed: {:?}", elem.offset());
    };
    assert_eq!(offset, events.len() as i64, "everything committed");
    assert_eq!(elem.metadata(), "", "tansu drops commit metadata");

    let entries = read_topic(
        &p.broker.address,
        "bronze-processor.progress",
        1,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await
    .expect("progress entries");
    let ours: Vec<String> = entries
        .iter()
        .filter(|m| m.partition() == 0 && m.key() == Some(&b"0"[..]))
        .filter_map(|m| m.payload().map(|v| String::from_utf8_lossy(v).into_owned()))
        .filter(|v| v.starts_with(&format!("{offset} ")))
        .collect();
    let metadata = ours.last().expect("an entry of the committed offset");
    assert!(
        metadata.contains("|out=") && metadata.contains(";dlq="),
        "the entry holds where the outputs stood: {metadata}"
    );

    // A restart reads on from there: the rest once, nothing again.
    let worker = p.worker(&env);
    let more = produce_backlog(&p, 64, 100).await;
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        events.len() + more.len(),
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_default();
    let ids = ids_of(&p, &out);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), unique.len()),
        (events.len() + more.len(), events.len() + more.len()),
        "every event exactly once"
    );
    drop(worker);
}
