//! The local mode: an embedded broker (librdkafka's mock cluster) and an embedded Confluent-
//! compatible registry in one process; contracts registered, topics created from
//! topic-config.yaml, a realistic connector stream produced (several orgs, the seed 000, 001 and
//! 004 feeds, ~1% malformed, some duplicates) and run through bronze-processor in process.

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
use medallion_runtime::worker::prepare;
use medallion_stages::bronze::{self, Bronze, BronzeConfig};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::sync::atomic::Ordering::Relaxed;

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

    // bronze-processor, in process, with the same runtime the worker binary uses.
    let mut config: WorkerConfig<BronzeConfig> = WorkerConfig::default();
    config.kafka.bootstrap = bootstrap.clone();
    config.registry.url = registry_url.clone();
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.contracts.home = Some(home.to_path_buf());
    let health = Health::new();
    let metrics = medallion_runtime::metrics::install();
    let http = medallion_runtime::http::serve(config.http.listen, health.clone(), metrics).await?;
    println!("  bronze    /metrics /healthz /readyz on http://{http}");
    let worker = prepare(&config, bronze::GROUP, health, |setup| {
        Bronze::new(setup, config.stage.clone())
    })
    .await?;
    let progress = worker.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker_config = config.clone();
    let running = tokio::spawn(async move {
        worker
            .run(&worker_config, async {
                let _ = stopped.await;
            })
            .await
    });

    let producer = medallion_runtime::kafka::producer(&bootstrap)?;
    let started = Instant::now();
    let work = async {
        let produced = produce_stream(&producer, &raw, raw_id, &args).await?;
        let mut last = Instant::now();
        loop {
            let consumed = progress.consumed.load(Relaxed);
            if last.elapsed() > Duration::from_millis(250) || consumed >= produced.total {
                last = Instant::now();
                print!(
                    "\r  progress  {consumed} / {} consumed, {} to bronze, {} dead-lettered, {} duplicates dropped   ",
                    produced.total,
                    progress.produced.load(Relaxed),
                    progress.dead_lettered.load(Relaxed),
                    progress.duplicates.load(Relaxed),
                );
                let _ = std::io::stdout().flush();
            }
            if consumed >= produced.total {
                break;
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("bronze did not finish within 300 s");
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
    let _ = stop.send(());
    let totals = running.await.context("bronze worker task")??;
    let Some(produced) = outcome else {
        println!(
            "\ninterrupted: stopped cleanly after {} events",
            totals.consumed
        );
        return Ok(ExitCode::from(130));
    };
    println!();
    println!("summary");
    println!(
        "  produced          {} events to {RAW_TOPIC} ({} malformed, {} redelivered duplicates)",
        produced.total, produced.malformed, produced.duplicates
    );
    println!(
        "  bronze in         {} records in {elapsed:.2} s ({:.0} events/s)",
        totals.consumed,
        totals.consumed as f64 / elapsed
    );
    println!(
        "  bronze out        {} records to bronze.data.cleaned",
        totals.produced
    );
    println!(
        "  duplicates        {} dropped by event_id dedup",
        totals.duplicates
    );
    let dead: u64 = totals.dead_lettered.values().sum();
    println!("  dead-lettered     {dead} to {RAW_TOPIC}.dlq");
    for (reason, n) in &totals.dead_lettered {
        println!("    {reason:<24} {n}");
    }
    let accounted = totals.produced + totals.duplicates + dead;
    if accounted != totals.consumed {
        bail!("{accounted} of {} records accounted for", totals.consumed);
    }
    Ok(ExitCode::SUCCESS)
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
