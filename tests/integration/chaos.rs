//! The whole data path under crashes: bronze, silver and gold run as processes while a stream
//! flows, and each is SIGKILLed at random moments at least three times and restarted. What
//! comes out must be what an undisturbed run gives: no event lost, none twice (by event id)
//! in bronze or silver, every gold window once with the totals an independent computation of
//! silver's output gives, and the DLQ exactly the bad records put in.
//!
//! silver keeps its state on disk (`state.dir`): its first restart resumes its store from the
//! checkpoints, its second starts with the store deleted, its third on a fresh disk (a replica
//! moved to another node); at the end it is killed once more, its store deleted, and events
//! naming other orgs' entities must still be refused (`tenant_mismatch`), the owner table
//! rebuilt from its topic.
//!
//! Halfway through, one org floods: a burst half the stream's size, which the workers' fair
//! scheduling reads past and brings back from the log while the other orgs go on. While it
//! floods, a second bronze joins the group and leaves it again (SIGTERM): two rebalances
//! between live members mid-flood, beside the kills.
//!
//! `MEDALLION_CHAOS_EVENTS` sets the stream's size (default 20,000; the closing note of the
//! change that added this test reports a 1M-event run).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use medallion_contracts::sample::{SampleEvents, SplitMix};
use medallion_tests::{read_until, WorkerProcess};
use rdkafka::message::{Message, OwnedMessage};
use serde_json::Value as Json;

use crate::bronze::{id_of, now_ms, source_id, Pipeline};
use crate::stages::{GOLD_BIN, SILVER_BIN};

const RAW: &str = "connector.data.raw";
const BRONZE: &str = "bronze.data.cleaned";
const SILVER: &str = "silver.data.processed";
const GOLD: &str = "gold.data.ready";
/// Gold's default window and lateness.
const WINDOW: i64 = 60_000;
const ORGS: usize = 6;

fn json_org(org: i64) -> Json {
    Json::from(org)
}

fn events_wanted() -> usize {
    std::env::var("MEDALLION_CHAOS_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// One stage worker that can be killed and brought back.
struct Chaotic {
    name: &'static str,
    /// Starts the worker, given how many times it was killed before.
    start: Box<dyn Fn(usize) -> WorkerProcess>,
    process: WorkerProcess,
    kills: usize,
}

impl Chaotic {
    fn new(name: &'static str, start: Box<dyn Fn(usize) -> WorkerProcess>) -> Self {
        let process = start(0);
        Self {
            name,
            start,
            process,
            kills: 0,
        }
    }

    fn kill_and_restart(&mut self) {
        self.process.kill();
        self.kills += 1;
        self.process = (self.start)(self.kills);
    }
}

/// Source event ids of `records`, how many records there were and how many distinct event ids.
fn ids(topic: &str, records: &[Json]) -> (BTreeSet<String>, usize, usize) {
    let own: BTreeSet<String> = records.iter().map(id_of).collect();
    (
        records.iter().map(|e| source_id(topic, e)).collect(),
        records.len(),
        own.len(),
    )
}

/// Gold's windows computed from silver's output, independently of gold: per (org, metric,
/// window start), the count and sum of samples. Every non-STALE event is one sample of
/// `events.<entity_type>` and one of each of its measurements.
fn windows_of(silver: &[Json], before: i64) -> BTreeMap<(i64, String, i64), (i64, f64)> {
    let mut out: BTreeMap<(i64, String, i64), (i64, f64)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for e in silver {
        if !seen.insert(id_of(e)) || e["payload"]["change"] == "STALE" {
            continue;
        }
        let org = e["org_id"].as_i64().unwrap_or_default();
        let t = e["timestamp"].as_i64().unwrap_or_default();
        let start = t - t.rem_euclid(WINDOW);
        if start >= before {
            continue;
        }
        let entity_type = e["payload"]["entity"]["entity_type"]
            .as_str()
            .unwrap_or_default();
        let mut add = |metric: String, value: f64| {
            let w = out.entry((org, metric, start)).or_insert((0, 0.0));
            w.0 += 1;
            w.1 += value;
        };
        add(format!("events.{entity_type}"), 1.0);
        for m in e["payload"]["measurements"]
            .as_array()
            .into_iter()
            .flatten()
        {
            add(
                m["name"].as_str().unwrap_or_default().to_string(),
                m["value"].as_f64().unwrap_or_default(),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkills_of_every_stage_lose_nothing_repeat_nothing_and_keep_gold_exact() {
    let n = events_wanted();
    let p = Pipeline::start().await;

    // The stream: n valid events in event-time order, ~1% exact duplicates of a recent event
    // (what a retrying connector sends) and ~1% undecodable records.
    let mut generator = SampleEvents::new(97, ORGS, now_ms() - 3_600_000 - n as i64 * 101);
    let mut rng = SplitMix::new(97);
    let mut valid: Vec<Json> = Vec::with_capacity(n);
    let mut records: Vec<(String, Vec<u8>)> = Vec::with_capacity(n + n / 40);
    let mut poison: BTreeSet<Vec<u8>> = BTreeSet::new();
    for i in 0..n {
        let e = generator.next_event();
        let key = e["org_id"].to_string();
        let frame = p.frame(&e);
        records.push((key.clone(), frame.clone()));
        valid.push(e);
        if i % 100 == 37 && i > 200 {
            let earlier = &valid[i - 1 - rng.below(150) as usize];
            records.push((earlier["org_id"].to_string(), p.frame(earlier)));
        }
        if i % 100 == 71 {
            let mut bad = frame;
            bad.truncate(bad.len() / 2);
            bad.extend_from_slice(&(i as u64).to_be_bytes());
            records.push((key, bad.clone()));
            poison.insert(bad);
        }
    }
    // A flood: halfway through, one org sends a burst half the stream's size at once (its own
    // events, in event-time order from there), so the workers read past it and bring it back
    // from the log while the others go on; gold must lose none of its events to `late`.
    // The flooding org is one the stream does not have (its own events' times rise from there
    // as the others' do, so it is not late against itself).
    let middle = records.len() / 2;
    let flood_from = valid[valid.len() / 2]["timestamp"].as_i64().unwrap_or(0);
    let mut flooder = SampleEvents::new(98, ORGS + 1, flood_from);
    let flood_org = json_org(100 + 111 * ORGS as i64);
    let mut flood: Vec<Json> = Vec::with_capacity(n / 2);
    while flood.len() < n / 2 {
        let mut e = flooder.next_event();
        if e["org_id"] == flood_org {
            // 10 ms apart: a burst, and all of it in the past (bronze refuses the future).
            e["timestamp"] = (flood_from + 10 * flood.len() as i64).into();
            flood.push(e);
        }
    }
    let flood_records: Vec<(String, Vec<u8>)> = flood
        .iter()
        .map(|e| (e["org_id"].to_string(), p.frame(e)))
        .collect();
    records.splice(middle..middle, flood_records);
    valid.extend(flood);
    // One later event per org closes every window of the stream in gold.
    let last_t = valid
        .iter()
        .filter_map(|e| e["timestamp"].as_i64())
        .max()
        .unwrap_or(0);
    let flush_t = last_t + 2 * WINDOW;
    let cutoff = flush_t - flush_t.rem_euclid(WINDOW);
    let orgs: BTreeSet<i64> = valid.iter().filter_map(|e| e["org_id"].as_i64()).collect();
    for org in &orgs {
        // An event of that org's own: an entity id moved to another org is refused
        // (tenant_mismatch).
        let source = if flood_org == *org {
            &mut flooder
        } else {
            &mut generator
        };
        let mut e = loop {
            let e = source.next_event();
            if e["org_id"] == *org {
                break e;
            }
        };
        e["timestamp"] = flush_t.into();
        records.push((org.to_string(), p.frame(&e)));
        valid.push(e);
    }
    let expected: BTreeSet<String> = valid.iter().map(id_of).collect();
    assert_eq!(expected.len(), valid.len());

    // The workers log how long rebuilding their partitions' state took after each restart.
    let log = || {
        (
            "RUST_LOG",
            "warn,medallion_runtime::worker=info".to_string(),
        )
    };
    // Fair scheduling on, so the flood is read past and caught up while the kills happen.
    let fair = || ("MEDALLION__FAIRNESS__ENABLED", "true".to_string());
    let env = move || vec![log(), fair()];
    // silver's state directories: the first disk, and the one it moves to.
    let disks = tempfile::tempdir().expect("temp dir");
    let (disk, moved) = (disks.path().join("node-a"), disks.path().join("node-b"));
    let silver_env = {
        let (disk, moved) = (disk.clone(), moved.clone());
        move |kills: usize| {
            let dir = match kills {
                // Killed twice: the store is gone when it comes back.
                2 => {
                    let store = disk.join("silver-processor");
                    assert!(store.join("IDENTITY").exists(), "a store on the first disk");
                    std::fs::remove_dir_all(&store).expect("store deleted");
                    &disk
                }
                // Killed three times and more: it runs on another node's empty disk.
                k if k >= 3 => &moved,
                _ => &disk,
            };
            vec![
                log(),
                fair(),
                // As a StatefulSet's pod: static membership under its pod's name, kept when
                // it moves to another node's disk.
                (
                    "MEDALLION__KAFKA__INSTANCE_ID",
                    "silver-processor-0".to_string(),
                ),
                ("MEDALLION__STATE__DIR", dir.display().to_string()),
                // Checkpoints often, so restarts resume from one.
                (
                    "MEDALLION__STATE__CHECKPOINT_INTERVAL_MS",
                    "500".to_string(),
                ),
            ]
        }
    };
    let mut stages = vec![
        Chaotic::new("bronze", {
            let (b, r) = (p.broker.address.clone(), p.registry.address.clone());
            Box::new(move |_| {
                WorkerProcess::start(
                    env!("CARGO_BIN_EXE_bronze-processor"),
                    &b,
                    &r,
                    &medallion_tests::bronze_env(&[log(), fair()]),
                )
                .expect("bronze starts")
            })
        }),
        Chaotic::new("silver", {
            let (b, r) = (p.broker.address.clone(), p.registry.address.clone());
            Box::new(move |kills| {
                WorkerProcess::start(SILVER_BIN, &b, &r, &silver_env(kills)).expect("silver")
            })
        }),
        Chaotic::new("gold", {
            let (b, r) = (p.broker.address.clone(), p.registry.address.clone());
            Box::new(move |_| WorkerProcess::start(GOLD_BIN, &b, &r, &env()).expect("gold"))
        }),
    ];
    for s in &stages {
        s.process
            .wait_ready(Duration::from_secs(60))
            .await
            .expect("ready");
    }

    // Produce at a pace that keeps the stream flowing while the kills happen.
    let producing_for = Duration::from_secs(30).max(Duration::from_millis(n as u64 / 2));
    let total = records.len();
    let started = Instant::now();
    let production = p.produce_paced(RAW, records, started, producing_for);

    // Kill a random stage that has died fewer than three times, at random moments spread over
    // the production (every 2.5 s on average in the default size), until each has died three
    // times; then let the stream finish.
    // Mid-flood (the burst is produced over the middle third), a second bronze joins the
    // group and later leaves it on SIGTERM: the partitions change hands between live members
    // twice while the flood is read past and caught up.
    let mean_gap = producing_for.as_millis() as u64 / 12;
    let (join_at, leave_at) = (producing_for * 2 / 5, producing_for * 3 / 5);
    let mut joiner: Option<WorkerProcess> = None;
    let mut joined = false;
    while stages.iter().any(|s| s.kills < 3) || !joined || joiner.is_some() {
        tokio::time::sleep(Duration::from_millis(
            mean_gap / 2 + rng.below(mean_gap.max(1)),
        ))
        .await;
        let at = started.elapsed();
        if !joined && at >= join_at {
            joined = true;
            // Started as the first bronze is.
            joiner = Some((stages[0].start)(0));
            eprintln!("{:>6.1} s: a second bronze joined", at.as_secs_f64());
            continue;
        }
        if at >= leave_at {
            // It leaves once it has worked on records of partitions it took over.
            let took_over = match &joiner {
                Some(j) => j.metrics().await.is_ok_and(|m| {
                    medallion_tests::metric_sum(&m, "kafka_messages_in_total") > 0.0
                }),
                None => false,
            };
            assert!(
                took_over || joiner.is_none() || at < leave_at + Duration::from_secs(30),
                "the second bronze was given no partition within 30 s"
            );
            if let Some(mut leaving) = joiner.take_if(|_| took_over) {
                let left = leaving
                    .terminate(Duration::from_secs(30))
                    .expect("the second bronze stops");
                assert!(left, "the second bronze left on SIGTERM");
                eprintln!("{:>6.1} s: the second bronze left", at.as_secs_f64());
                continue;
            }
        }
        if stages.iter().all(|s| s.kills >= 3) {
            continue;
        }
        let pending: Vec<usize> = (0..stages.len()).filter(|i| stages[*i].kills < 3).collect();
        let victim = pending[rng.below(pending.len() as u64) as usize];
        stages[victim].kill_and_restart();
        eprintln!(
            "{:>6.1} s: killed {} (#{})",
            started.elapsed().as_secs_f64(),
            stages[victim].name,
            stages[victim].kills
        );
    }
    production.await.expect("production");
    let produced_in = started.elapsed();

    let drain = Duration::from_secs(120 + n as u64 / 200);
    let read_ids = |topic: &'static str| {
        let (p, expected) = (&p, &expected);
        async move {
            // Short of the condition, what is there (the assertions below say what differs).
            p.read_sources(topic, expected, Duration::from_secs(5), drain)
                .await
                .unwrap_or_else(|(e, short)| {
                    eprintln!("{e}");
                    short
                })
        }
    };
    let bronze = read_ids(BRONZE).await;
    let silver = read_ids(SILVER).await;
    let (bronze_ids, bronze_n, bronze_own) = ids(BRONZE, &bronze);
    let (silver_ids, silver_n, silver_own) = ids(SILVER, &silver);

    let want = windows_of(&silver, cutoff);
    let gold_out = read_until(
        &p.broker.address,
        GOLD,
        {
            let mut missing: BTreeSet<(i64, String, i64)> = want.keys().cloned().collect();
            let p = &p;
            move |m: &[OwnedMessage]| {
                if let Some(last) = m.last() {
                    for g in p.decode(GOLD, std::slice::from_ref(last)) {
                        missing.remove(&window_key(&g));
                    }
                }
                missing.is_empty()
            }
        },
        Duration::from_secs(5),
        drain,
    )
    .await
    .expect("every window out of gold");
    let gold = p.decode(GOLD, &gold_out);
    let bronze_dlq = read_until(
        &p.broker.address,
        "connector.data.raw.dlq",
        |m| m.len() >= poison.len(),
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await
    .expect("bronze DLQ");
    let quiet = |topic: &'static str| {
        let p = &p;
        async move {
            read_until(
                &p.broker.address,
                topic,
                |_| true,
                // Longer than joining the group and a first fetch take on this broker.
                Duration::from_secs(8),
                Duration::from_secs(30),
            )
            .await
            .expect(topic)
        }
    };
    let silver_dlq = quiet("bronze.data.cleaned.dlq").await;
    let gold_dlq = quiet("silver.data.processed.dlq").await;
    let kills: Vec<String> = stages
        .iter()
        .map(|s| format!("{} {}×", s.name, s.kills))
        .collect();
    eprintln!(
        "chaos: {n} events ({} records) produced in {:.1} s, drained in {:.1} s; kills: {}; \
         bronze {bronze_n} records / {} ids, silver {silver_n} / {}, gold {} records / {} windows, \
         DLQ {} for {} poison",
        total,
        produced_in.as_secs_f64(),
        (started.elapsed() - produced_in).as_secs_f64(),
        kills.join(", "),
        bronze_ids.len(),
        silver_ids.len(),
        gold.len(),
        want.len(),
        bronze_dlq.len(),
        poison.len(),
    );

    // Nothing lost, nothing twice.
    for (topic, got, records, own) in [
        (BRONZE, &bronze_ids, bronze_n, bronze_own),
        (SILVER, &silver_ids, silver_n, silver_own),
    ] {
        let missing: Vec<_> = expected.difference(got).take(5).collect();
        let foreign: Vec<_> = got.difference(&expected).take(5).collect();
        assert!(
            missing.is_empty() && foreign.is_empty(),
            "{topic}: {} missing (e.g. {missing:?}), {} foreign (e.g. {foreign:?})",
            expected.difference(got).count(),
            got.difference(&expected).count()
        );
        assert_eq!(records, expected.len(), "{topic}: no event twice");
        assert_eq!(own, records, "{topic}: no event id twice");
    }
    // The DLQ holds exactly the bad records, once each.
    let dead: Vec<Vec<u8>> = bronze_dlq
        .iter()
        .filter_map(|m| m.payload().map(<[u8]>::to_vec))
        .collect();
    assert_eq!(dead.len(), poison.len(), "no dead letter twice");
    assert_eq!(dead.into_iter().collect::<BTreeSet<_>>(), poison);
    let reasons = |dlq: &[OwnedMessage]| -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for m in dlq {
            *by.entry(reason_of(m)).or_default() += 1;
        }
        by
    };
    assert!(
        silver_dlq.is_empty() && gold_dlq.is_empty(),
        "no DLQ downstream: silver {:?}, gold {:?}",
        reasons(&silver_dlq),
        reasons(&gold_dlq)
    );
    // Every gold window once, with the independent totals.
    let mut got: BTreeMap<(i64, String, i64), Vec<(i64, f64)>> = BTreeMap::new();
    for g in gold.iter().filter(|g| window_key(g).2 < cutoff) {
        let pl = &g["payload"];
        got.entry(window_key(g)).or_default().push((
            pl["count"].as_i64().unwrap_or(-1),
            pl["sum"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    let twice: Vec<_> = got.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "windows emitted more than once: {twice:?}"
    );
    let got: BTreeMap<_, _> = got.into_iter().map(|(k, v)| (k, v[0])).collect();
    assert_eq!(got.len(), want.len(), "every window, no other");
    for (key, (count, sum)) in &want {
        let (c, s) = got[key];
        assert_eq!(c, *count, "count of {key:?}");
        assert!(
            (s - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "sum of {key:?}: {s} != {sum}"
        );
    }
    let gold_ids: BTreeSet<String> = gold.iter().map(id_of).collect();
    assert_eq!(
        gold_ids.len(),
        gold.len(),
        "no gold record twice by event id"
    );

    // silver killed once more and its store deleted; meanwhile events of one org name
    // another org's entities. The owner table comes back from its topic and refuses each.
    let silver = &mut stages[1];
    silver.process.kill();
    let store = moved.join("silver-processor");
    assert!(
        store.join("IDENTITY").exists(),
        "a store on the second disk"
    );
    std::fs::remove_dir_all(&store).expect("store deleted");
    let orgs: Vec<i64> = orgs.into_iter().collect();
    let mut foreign_ids = BTreeSet::new();
    for (i, owner) in orgs.iter().enumerate() {
        let intruder = orgs[(i + 1) % orgs.len()];
        let owned = valid
            .iter()
            .find(|e| e["org_id"] == *owner)
            .expect("an event of the org");
        // The owner's event under the intruder's org, with an id and a time of its own.
        let fresh = generator.next_event();
        let mut e = owned.clone();
        e["org_id"] = intruder.into();
        e["event_id"] = fresh["event_id"].clone();
        e["timestamp"] = fresh["timestamp"].clone();
        foreign_ids.insert(e["event_id"].as_str().unwrap_or_default().to_string());
        p.send(intruder.to_string(), &p.frame(&e)).await;
    }
    silver.process = WorkerProcess::start(
        SILVER_BIN,
        &p.broker.address,
        &p.registry.address,
        &[
            ("MEDALLION__STATE__DIR", moved.display().to_string()),
            (
                "MEDALLION__KAFKA__INSTANCE_ID",
                "silver-processor-0".to_string(),
            ),
        ],
    )
    .expect("silver");
    let refused = read_until(
        &p.broker.address,
        "bronze.data.cleaned.dlq",
        |m| m.len() >= foreign_ids.len(),
        Duration::from_secs(3),
        Duration::from_secs(180),
    )
    .await
    .expect("the foreign events refused");
    let refused_ids: BTreeSet<String> = p
        .decode(BRONZE, &refused)
        .iter()
        .map(|e| source_id(BRONZE, e))
        .collect();
    assert_eq!(refused_ids, foreign_ids, "each foreign event refused, once");
    assert_eq!(refused.len(), foreign_ids.len());
    for m in &refused {
        assert_eq!(reason_of(m), "tenant_mismatch");
    }
}

/// The reason a dead letter was written with (empty when it carries none).
fn reason_of(m: &OwnedMessage) -> String {
    m.headers()
        .and_then(|h| {
            medallion_runtime::dlq::header_value(h, medallion_runtime::dlq::header::ERROR_REASON)
        })
        .unwrap_or_default()
}

/// (org, metric, window start) of a gold record.
fn window_key(g: &Json) -> (i64, String, i64) {
    let pl = &g["payload"];
    (
        g["org_id"].as_i64().unwrap_or_default(),
        pl["metric"].as_str().unwrap_or_default().to_string(),
        pl["window_start"].as_i64().unwrap_or_default(),
    )
}
