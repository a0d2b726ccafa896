//! The local mode: an embedded broker (librdkafka's mock cluster) and an embedded Confluent-
//! compatible registry in one process; contracts registered, topics created from
//! topic-config.yaml, a realistic connector stream produced (several orgs, the seed 000, 001 and
//! 004 feeds, ~1% malformed, some duplicates) and run through bronze, silver, gold and the rule
//! evaluator in process.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::sample::{SampleEvents, SplitMix};
use medallion_contracts::{json, ContractSet, TopicConfig};
use medallion_runtime::config::WorkerConfig;
use medallion_runtime::http::Health;
use medallion_runtime::worker::{prepare, Progress, RunTotals, Stage, StageSetup};
use medallion_stages::bronze::{self, Bronze, BronzeConfig};
use medallion_stages::gold::{self, Gold, GoldConfig};
use medallion_stages::rules::{self, Rules, RulesConfig};
use medallion_stages::silver::{self, Silver, SilverConfig};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

const RAW_TOPIC: &str = "connector.data.raw";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Connector events to generate.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Tenants (org ids) in the stream.
    #[arg(long, default_value_t = 8)]
    orgs: usize,
    /// Share of malformed events, in percent.
    #[arg(long, default_value_t = 1.0)]
    malformed_percent: f64,
    /// Use this Kafka cluster instead of the embedded one.
    #[arg(long, env = "MEDALLION_BOOTSTRAP")]
    bootstrap: Option<String>,
    /// Use this Schema Registry instead of the embedded one.
    #[arg(long, env = "MEDALLION_REGISTRY_URL")]
    registry: Option<String>,
}

/// What the malformed share of the stream looks like, in rotation.
const MALFORMED: [&str; 5] = [
    "bad magic byte",
    "truncated body",
    "unknown schema id",
    "garbage",
    "key mismatch",
];

async fn start_registry() -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port for the embedded registry")?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let registry = rivven_schema::SchemaRegistry::new(rivven_schema::RegistryConfig::memory())
        .await
        .map_err(|e| anyhow::anyhow!("embedded registry: {e}"))?;
    let server = rivven_schema::server::SchemaServer::new(
        registry,
        rivven_schema::server::ServerConfig::default(),
    );
    tokio::spawn(async move {
        if let Err(e) = server.run(addr).await {
            eprintln!("embedded registry stopped: {e}");
        }
    });
    let url = format!("http://{addr}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(url);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("embedded registry did not start on {addr}")
}

pub async fn run(home: &Path, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let contracts = ContractSet::load(&home.join("schemas"))?;
    let topics = TopicConfig::load(&home.join("topic-config.yaml"))?;
    let raw_spec = topics
        .topic(RAW_TOPIC)
        .with_context(|| format!("{RAW_TOPIC} is not in topic-config.yaml"))?;
    let raw = contracts
        .get(&raw_spec.schema)
        .with_context(|| format!("schema {} not found", raw_spec.schema))?
        .clone();

    // Broker.
    let cluster;
    let bootstrap = match &args.bootstrap {
        Some(b) => {
            medallion_runtime::admin::apply_topics(b, &topics, 1).await?;
            b.clone()
        }
        None => {
            cluster = MockCluster::new(1).context("starting the embedded Kafka mock cluster")?;
            for topic in topics.physical_topics(1) {
                cluster
                    .create_topic(&topic.name, topic.partitions as i32, 1)
                    .with_context(|| format!("creating {}", topic.name))?;
            }
            cluster.bootstrap_servers()
        }
    };
    // Registry.
    let registry_url = match &args.registry {
        Some(url) => url.clone(),
        None => start_registry().await?,
    };
    let registry = RegistryClient::new(&registry_url, Duration::from_secs(5))?;
    let ids = registry.register_all(&contracts, &topics).await?;
    let raw_id = ids[RAW_TOPIC];
    println!("medallion local mode");
    println!(
        "  broker    {bootstrap} ({})",
        if args.bootstrap.is_some() {
            "external"
        } else {
            "embedded mock cluster"
        }
    );
    println!(
        "  registry  {registry_url} ({})",
        if args.registry.is_some() {
            "external"
        } else {
            "embedded"
        }
    );
    println!(
        "  topics    {} (DLQs included)",
        topics.physical_topics(1).len()
    );
    println!(
        "  schemas   {} subjects registered, {RAW_TOPIC}-value = id {raw_id}",
        ids.len()
    );

    // The stage workers, in process, with the same runtime the worker binaries use.
    let metrics = medallion_runtime::metrics::install();
    let health = Health::new();
    let http = medallion_runtime::http::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        health.clone(),
        metrics.clone(),
    )
    .await?;
    println!("  metrics   http://{http}/metrics (all stages)");
    let base = Base {
        home: home.to_path_buf(),
        bootstrap: bootstrap.clone(),
        registry: registry_url.clone(),
        health,
    };
    let bronze = base
        .spawn(bronze::GROUP, |setup, c: BronzeConfig| {
            Bronze::new(setup, c)
        })
        .await?;
    let silver = base
        .spawn(silver::GROUP, |setup, c: SilverConfig| {
            Silver::new(setup, c)
        })
        .await?;
    let gold = base
        .spawn(gold::GROUP, |setup, c: GoldConfig| Gold::new(setup, c))
        .await?;
    let rules = base
        .spawn(rules::GROUP, |setup, c: RulesConfig| Rules::new(setup, c))
        .await?;
    let stages = [&bronze, &silver, &gold, &rules];

    let producer = medallion_runtime::kafka::producer(&bootstrap)?;
    let started = Instant::now();
    let work = async {
        let produced = produce_stream(&producer, &raw, raw_id, &args).await?;
        let mut last = Instant::now();
        let mut settled_at: Option<Instant> = None;
        loop {
            // Done when every stage has consumed everything its upstream wrote, for a while.
            let mut upstream = produced.total;
            let mut settled = true;
            for stage in &stages {
                settled &= stage.progress.consumed.load(Relaxed) >= upstream;
                upstream = stage.progress.produced.load(Relaxed);
            }
            if last.elapsed() > Duration::from_millis(250) {
                last = Instant::now();
                print!(
                    "\r  progress  raw {} | bronze {} -> {} | silver {} -> {} | gold {} -> {} windows | alerts {}   ",
                    produced.total,
                    bronze.progress.consumed.load(Relaxed),
                    bronze.progress.produced.load(Relaxed),
                    silver.progress.consumed.load(Relaxed),
                    silver.progress.produced.load(Relaxed),
                    gold.progress.consumed.load(Relaxed),
                    gold.progress.produced.load(Relaxed),
                    rules.progress.produced.load(Relaxed),
                );
                let _ = std::io::stdout().flush();
            }
            match (settled, settled_at) {
                (true, Some(at)) if at.elapsed() > Duration::from_secs(2) => break,
                (true, None) => settled_at = Some(Instant::now()),
                (false, _) => settled_at = None,
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the pipeline did not drain within 600 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, anyhow::Error>(produced)
    };
    let outcome = tokio::select! {
        result = work => Some(result?),
        _ = tokio::signal::ctrl_c() => None,
    };
    let elapsed = started.elapsed().as_secs_f64();
    drop(producer);
    let mut totals = Vec::new();
    for stage in [bronze, silver, gold, rules] {
        totals.push(stage.stop().await?);
    }
    // Let the stopped workers' background clients close while the embedded broker still runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Some(produced) = outcome else {
        println!("\ninterrupted: every stage stopped cleanly and committed");
        return Ok(ExitCode::from(130));
    };
    let [bronze, silver, gold, rules] = &totals[..] else {
        bail!("four stages expected");
    };
    let scrape = metrics.render();
    println!();
    println!(
        "summary ({elapsed:.1} s, {:.0} raw events/s end to end)",
        produced.total as f64 / elapsed
    );
    println!(
        "  produced          {} events to {RAW_TOPIC} ({} malformed, {} redelivered duplicates)",
        produced.total, produced.malformed, produced.duplicates
    );
    let layer = |name: &str, t: &RunTotals, out: &str| {
        let dead: u64 = t.dead_lettered.values().sum();
        println!(
            "  {name:<8} in {:>7}  out {:>7} {out:<9} dlq {:>5}  duplicates {:>4}",
            t.consumed, t.produced, dead, t.duplicates
        );
        for (reason, n) in &t.dead_lettered {
            println!("    dlq {reason:<34} {n}");
        }
    };
    layer("bronze", bronze, "events");
    layer("silver", silver, "events");
    layer("gold", gold, "windows");
    layer("rules", rules, "alerts");
    let failed: Vec<(String, f64)> = series(
        &scrape,
        medallion_runtime::metrics::EXPECTATION_RESULTS_TOTAL,
    )
    .into_iter()
    .filter(|(labels, n)| labels.contains("result=\"fail\"") && *n > 0.0)
    .collect();
    println!(
        "  expectation failures (silver): {}",
        if failed.is_empty() { "none" } else { "" }
    );
    for (labels, n) in failed {
        println!(
            "    {:<36} {:<10} {n}",
            label(&labels, "expectation"),
            label(&labels, "action")
        );
    }
    let total = |name: &str| -> u64 { series(&scrape, name).iter().map(|(_, v)| *v as u64).sum() };
    let drift = total(medallion_runtime::metrics::DRIFT_TOTAL);
    println!("  drift             {drift} stale updates kept out of entity state (audited on audit.events)");
    let late = total(medallion_runtime::metrics::LATE_EVENTS_TOTAL);
    let open = total(medallion_runtime::metrics::OPEN_WINDOWS);
    println!("  late events       {late} (dead-lettered); {open} windows still open at the end of the stream");
    println!("  alerts fired");
    for (labels, n) in series(&scrape, medallion_runtime::metrics::ALERTS_TOTAL) {
        println!(
            "    {:<28} {:<9} {n}",
            label(&labels, "rule"),
            label(&labels, "severity")
        );
    }
    for (name, t) in [
        ("bronze", bronze),
        ("silver", silver),
        ("gold", gold),
        ("rules", rules),
    ] {
        let dead: u64 = t.dead_lettered.values().sum();
        if name == "bronze" && t.produced + t.duplicates + dead != t.consumed {
            bail!(
                "bronze: {} of {} records accounted for",
                t.produced + t.duplicates + dead,
                t.consumed
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The samples of metric `name` in a Prometheus text scrape: (labels, value).
fn series(scrape: &str, name: &str) -> Vec<(String, f64)> {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            Some((head[name.len()..].to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of `key` in a `{k="v",...}` label set.
fn label(labels: &str, key: &str) -> String {
    let needle = format!("{key}=\"");
    labels
        .split_once(&needle)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(v, _)| v.to_string())
        .unwrap_or_default()
}

/// Where every in-process worker connects.
struct Base {
    home: std::path::PathBuf,
    bootstrap: String,
    registry: String,
    health: Arc<Health>,
}

/// A worker running in a task.
struct Running {
    progress: Arc<Progress>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<RunTotals, medallion_runtime::worker::WorkerError>>,
}

impl Running {
    async fn stop(self) -> anyhow::Result<RunTotals> {
        let _ = self.stop.send(());
        Ok(self.task.await.context("worker task")??)
    }
}

impl Base {
    async fn spawn<S, C, F, Fut>(&self, group: &str, make: F) -> anyhow::Result<Running>
    where
        S: Stage + Sync,
        C: Default + Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce(StageSetup, C) -> Fut,
        Fut: std::future::Future<Output = Result<S, String>>,
    {
        let mut config: WorkerConfig<C> = WorkerConfig::default();
        config.kafka.bootstrap = self.bootstrap.clone();
        config.registry.url = self.registry.clone();
        config.contracts.home = Some(self.home.clone());
        let stage_config = config.stage.clone();
        let worker = prepare(&config, group, self.health.clone(), |setup| {
            make(setup, stage_config)
        })
        .await
        .with_context(|| format!("starting {group}"))?;
        let progress = worker.progress();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            worker
                .run(&config, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Running {
            progress,
            stop,
            task,
        })
    }
}

struct Produced {
    total: u64,
    malformed: u64,
    duplicates: u64,
}

async fn produce_stream(
    producer: &FutureProducer,
    raw: &medallion_contracts::Contract,
    raw_id: u32,
    args: &DemoArgs,
) -> anyhow::Result<Produced> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    // Event times over the last hour, so bronze's sanity range accepts them.
    let mut events = SampleEvents::new(42, args.orgs, now - 3_600_000 - args.events as i64 * 100);
    let mut rng = SplitMix::new(7);
    let malformed_every = if args.malformed_percent > 0.0 {
        (100.0 / args.malformed_percent).round().max(1.0) as u64
    } else {
        u64::MAX
    };
    let mut out = Produced {
        total: 0,
        malformed: 0,
        duplicates: 0,
    };
    let mut previous: Option<(String, Vec<u8>)> = None;
    let mut pending = Vec::new();
    for i in 0..args.events {
        let (key, value) = if i % 200 == 199 && previous.is_some() {
            out.duplicates += 1;
            previous.clone().context("previous event")?
        } else {
            let event = events.next_event();
            let mut key = event["org_id"].to_string();
            let mut value = json::to_framed(&event, &raw.schema, raw_id)?;
            if i % malformed_every == malformed_every / 2 {
                out.malformed += 1;
                match MALFORMED[(out.malformed % MALFORMED.len() as u64) as usize] {
                    "bad magic byte" => value[0] = 0x7b,
                    "truncated body" => value.truncate(value.len() / 2),
                    "unknown schema id" => {
                        value[1..5].copy_from_slice(&(raw_id + 10_000).to_be_bytes())
                    }
                    "key mismatch" => key = "1".to_string(),
                    _ => {
                        value = (0..24).map(|_| rng.below(256) as u8).collect();
                        value[0] = 0;
                        value[1..5].copy_from_slice(&raw_id.to_be_bytes());
                    }
                }
            } else {
                previous = Some((key.clone(), value.clone()));
            }
            (key, value)
        };
        out.total += 1;
        loop {
            match producer.send_result(FutureRecord::to(RAW_TOPIC).key(&key).payload(&value)) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        if pending.len() >= 5_000 {
            await_deliveries(&mut pending).await?;
        }
    }
    await_deliveries(&mut pending).await?;
    Ok(out)
}

async fn await_deliveries(pending: &mut Vec<DeliveryFuture>) -> anyhow::Result<()> {
    for delivery in pending.drain(..) {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("delivery failed: {e}"),
            Err(_) => bail!("producer dropped a delivery"),
        }
    }
    Ok(())
}
