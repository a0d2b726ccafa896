//! A stage that fails whole batches: only the records at fault reach the DLQ, with the stage's
//! own error, and every other record comes out once. The worker runs in this process so the
//! stage can carry a deliberate fault; the broker and registry are real.

use std::collections::BTreeSet;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use medallion_runtime::config::WorkerConfig;
use medallion_runtime::error::StageError;
use medallion_runtime::pii::{KeySource, PiiConfig};
use medallion_runtime::worker::{prepare, Collector, RunTotals, Stage, StageWorker, WorkerError};
use medallion_stages::bronze::{Bronze, BronzeConfig, GROUP};
use medallion_tests::{read_topic, TEST_PII_KEY};
use rdkafka::message::Message;

use crate::bronze::{ids_of, sample, Pipeline};

const BRONZE: &str = "bronze.data.cleaned";
const RAW_DLQ: &str = "connector.data.raw.dlq";
/// The event ids the faulty stage cannot handle end with this.
const POISON: &str = "0000deadbeef";

/// bronze with a bug: any batch holding a poison event id fails as a whole.
struct Faulty {
    inner: Bronze,
}

impl Stage for Faulty {
    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let ids = input
            .column_by_name("event_id")
            .ok_or_else(|| StageError::Transform("no event_id".into()))?
            .as_string::<i32>();
        if let Some(id) = ids.iter().flatten().find(|id| id.ends_with(POISON)) {
            return Err(StageError::Transform(format!("cannot handle event {id}")));
        }
        self.inner.process(input, out).await
    }

    async fn settle(&mut self, closing: bool, out: &mut Collector) -> Result<(), StageError> {
        self.inner.settle(closing, out).await
    }
}

/// A worker running in this process until [`Running::stop`].
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<Result<RunTotals, WorkerError>>,
}

impl Running {
    fn start<S: Stage + Sync>(worker: StageWorker<S>, config: WorkerConfig<BronzeConfig>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(async move {
            worker
                .run(&config, async {
                    let _ = stopped.await;
                })
                .await
        });
        Self { stop, run }
    }

    /// Stops the worker (it finishes its batch and commits) and returns its totals.
    async fn stop(self) -> RunTotals {
        let _ = self.stop.send(());
        self.run.await.expect("worker task").expect("worker ran")
    }
}

/// An in-process bronze worker's configuration against the test pipeline.
fn bronze_config(p: &Pipeline) -> WorkerConfig<BronzeConfig> {
    let mut config: WorkerConfig<BronzeConfig> = WorkerConfig::default();
    config.kafka.bootstrap = p.broker.address.clone();
    config.registry.url = p.registry.address.clone();
    config.contracts.home = Some(medallion_tests::workspace_root());
    config.stage.pii = PiiConfig {
        active_key: "k1".into(),
        keys: [(
            "k1".to_string(),
            KeySource {
                env: None,
                value: Some(TEST_PII_KEY.to_string()),
            },
        )]
        .into(),
    };
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_stage_fails_dead_letters_only_the_records_at_fault() {
    let p = Pipeline::start().await;
    // k poison events at positions a fixed seed picks, among valid ones.
    let mut events = sample(83, 600);
    let mut rng = medallion_contracts::sample::SplitMix::new(83);
    let mut poisoned = BTreeSet::new();
    while poisoned.len() < 9 {
        poisoned.insert(rng.below(events.len() as u64) as usize);
    }
    let mut poison_ids = BTreeSet::new();
    for &i in &poisoned {
        let id = events[i]["event_id"].as_str().expect("id").to_string();
        let id = format!("{}{POISON}", &id[..id.len() - POISON.len()]);
        events[i]["event_id"] = id.clone().into();
        events[i]["correlation_id"] = id.clone().into();
        poison_ids.insert(id);
    }
    for e in &events {
        p.send(e["org_id"].to_string(), &p.frame(e)).await;
    }

    let config = bronze_config(&p);
    let stage_config = config.stage.clone();
    let worker = prepare(
        &config,
        GROUP,
        medallion_runtime::http::Health::new(),
        |setup| async move {
            Ok(Faulty {
                inner: Bronze::new(setup, stage_config).await?,
            })
        },
    )
    .await
    .expect("worker prepared");
    let running = Running::start(worker, config);

    let good = events.len() - poison_ids.len();
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        good,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await
    .expect("output");
    let dlq = read_topic(
        &p.broker.address,
        RAW_DLQ,
        poison_ids.len(),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await
    .expect("DLQ");
    let totals = running.stop().await;

    let produced = ids_of(&p, &out);
    let produced_set: BTreeSet<String> = produced.iter().cloned().collect();
    assert_eq!(produced.len(), produced_set.len(), "every good record once");
    let want: BTreeSet<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .filter(|id| !poison_ids.contains(id))
        .collect();
    assert_eq!(produced_set, want, "every good record reached bronze");
    let mut dead = BTreeSet::new();
    for m in &dlq {
        let headers = m.headers().expect("dead-letter headers");
        let header =
            |name: &str| medallion_runtime::dlq::header_value(headers, name).unwrap_or_default();
        assert_eq!(
            header(medallion_runtime::dlq::header::ERROR_REASON),
            "transform_failed"
        );
        let message = header(medallion_runtime::dlq::header::ERROR_MESSAGE);
        let event = medallion_contracts::json::from_avro_binary(
            &m.payload().expect("payload")[5..],
            &p.raw.schema,
            &p.raw.schema,
        )
        .expect("the original bytes");
        let id = event["event_id"].as_str().expect("id").to_string();
        assert!(
            message.contains(&id),
            "the stage's own error names it: {message}"
        );
        dead.insert(id);
    }
    assert_eq!(dlq.len(), poison_ids.len(), "only the records at fault");
    assert_eq!(dead, poison_ids);
    assert_eq!(totals.consumed, events.len() as u64);
}

/// The worker as a library on a single-threaded runtime (as an embedding application might run
/// it): assigning partitions must not need a multi-threaded runtime.
#[tokio::test(flavor = "current_thread")]
async fn a_worker_runs_on_a_current_thread_runtime() {
    let p = Pipeline::start().await;
    let events = sample(84, 60);
    for e in &events {
        p.send(e["org_id"].to_string(), &p.frame(e)).await;
    }
    let config = bronze_config(&p);
    let stage_config = config.stage.clone();
    let worker = prepare(
        &config,
        GROUP,
        medallion_runtime::http::Health::new(),
        |setup| async move { Bronze::new(setup, stage_config).await },
    )
    .await
    .expect("worker prepared");
    let running = Running::start(worker, config);
    let out = read_topic(
        &p.broker.address,
        BRONZE,
        events.len(),
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await
    .expect("output");
    let totals = running.stop().await;
    // The worker has left its group by the time it returns, not whenever its last client
    // reference is dropped (on this runtime, once the runtime itself goes, the broker with it).
    let members = group_members(&p.broker.address, GROUP);
    let ids: BTreeSet<String> = ids_of(&p, &out).into_iter().collect();
    let want: BTreeSet<String> = events
        .iter()
        .map(|e| e["event_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!((out.len(), ids), (events.len(), want));
    assert_eq!(totals.consumed, events.len() as u64);
    assert_eq!(
        members,
        Vec::<String>::new(),
        "members of {GROUP} after the worker returned"
    );
}

/// The members of `group`, as the broker describes it.
fn group_members(bootstrap: &str, group: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("client");
    let groups = client
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("group described");
    groups
        .groups()
        .iter()
        .flat_map(|g| g.members().iter().map(|m| m.id().to_string()))
        .collect()
}
