//! The local mode: an embedded broker (librdkafka's mock cluster) and an embedded Confluent-
//! compatible registry in one process; contracts registered, topics created from
//! topic-config.yaml, a realistic connector stream produced (several orgs, the seed 000, 001 and
//! 004 feeds, ~1% malformed, some duplicates), consumed back and decoded into Arrow.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use medallion_contracts::columnar::BatchDecoder;
use medallion_contracts::registry::{RegistryClient, RegistryError};
use medallion_contracts::sample::{SampleEvents, SplitMix};
use medallion_contracts::{json, ContractSet, TopicConfig};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::Message;

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
const MALFORMED: [&str; 4] = [
    "bad magic byte",
    "truncated body",
    "unknown schema id",
    "garbage",
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

    let producer = medallion_runtime::kafka::producer(&bootstrap)?;
    let consumer = medallion_runtime::kafka::consumer(&bootstrap, "medallion-local")?;
    consumer.subscribe(&[RAW_TOPIC])?;

    let started = Instant::now();
    let produce = produce_stream(&producer, &raw, raw_id, &args);
    let consume = consume_stream(&consumer, &registry, &raw, args.events);
    let work = async {
        let produced = produce.await?;
        let consumed = consume.await?;
        Ok::<_, anyhow::Error>((produced, consumed))
    };
    let outcome = tokio::select! {
        result = work => Some(result?),
        _ = tokio::signal::ctrl_c() => None,
    };
    let Some((produced, consumed)) = outcome else {
        println!("\ninterrupted: stopping");
        return Ok(ExitCode::from(130));
    };
    let elapsed = started.elapsed().as_secs_f64();
    println!();
    println!("summary");
    println!(
        "  produced          {} events ({} malformed, {} duplicates)",
        produced.total, produced.malformed, produced.duplicates
    );
    println!(
        "  consumed          {} messages in {elapsed:.2} s ({:.0} msg/s)",
        consumed.messages,
        consumed.messages as f64 / elapsed
    );
    println!(
        "  decoded to Arrow  {} rows ({} distinct event ids)",
        consumed.rows, consumed.distinct
    );
    println!(
        "  rejected          {}",
        consumed.rejected.values().sum::<u64>()
    );
    for (reason, n) in &consumed.rejected {
        println!("    {reason:<22} {n}");
    }
    println!("  rows per org");
    for (org, n) in &consumed.per_org {
        println!("    org {org:<8} {n}");
    }
    let accounted = consumed.rows + consumed.rejected.values().sum::<u64>();
    if accounted != produced.total {
        bail!("{accounted} of {} messages accounted for", produced.total);
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
    let mut events = SampleEvents::new(42, args.orgs, 1_735_200_000_000);
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
            let key = event["org_id"].to_string();
            let mut value = json::to_framed(&event, &raw.schema, raw_id)?;
            if i % malformed_every == malformed_every / 2 {
                out.malformed += 1;
                match MALFORMED[(out.malformed % 4) as usize] {
                    "bad magic byte" => value[0] = 0x7b,
                    "truncated body" => value.truncate(value.len() / 2),
                    "unknown schema id" => {
                        value[1..5].copy_from_slice(&(raw_id + 10_000).to_be_bytes())
                    }
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

struct Consumed {
    messages: u64,
    rows: u64,
    distinct: u64,
    rejected: BTreeMap<&'static str, u64>,
    per_org: BTreeMap<i64, u64>,
}

async fn consume_stream(
    consumer: &StreamConsumer,
    registry: &RegistryClient,
    raw: &medallion_contracts::Contract,
    expected: u64,
) -> anyhow::Result<Consumed> {
    let mut decoder = BatchDecoder::new(&raw.full_name, &raw.text)?;
    let mut out = Consumed {
        messages: 0,
        rows: 0,
        distinct: 0,
        rejected: BTreeMap::new(),
        per_org: BTreeMap::new(),
    };
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_progress = Instant::now();
    while out.messages < expected {
        if Instant::now() > deadline {
            bail!(
                "timed out: consumed {} of {expected} messages",
                out.messages
            );
        }
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(1_000);
        let first = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await;
        let Ok(first) = first else { continue };
        batch.push(first?.payload().unwrap_or_default().to_vec());
        while batch.len() < 1_000 {
            match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                Ok(message) => batch.push(message?.payload().unwrap_or_default().to_vec()),
                Err(_) => break,
            }
        }
        for id in decoder.unknown_ids(batch.iter().map(Vec::as_slice)) {
            match registry.schema_by_id(id).await {
                Ok(schema) => {
                    // A schema the reader cannot resolve is reported per message below.
                    let _ = decoder.add_writer_schema(id, &schema);
                }
                Err(RegistryError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let decoded = decoder.decode(batch.iter().map(Vec::as_slice))?;
        out.messages += batch.len() as u64;
        out.rows += decoded.batch.num_rows() as u64;
        for (_, error) in &decoded.rejected {
            *out.rejected.entry(error.reason()).or_default() += 1;
        }
        let ids = decoded
            .batch
            .column_by_name("event_id")
            .context("event_id column")?
            .as_string::<i32>();
        let orgs = decoded
            .batch
            .column_by_name("org_id")
            .context("org_id column")?
            .as_primitive::<Int64Type>();
        for row in 0..ids.len() {
            if seen.insert(ids.value(row).to_string()) {
                out.distinct += 1;
            }
            *out.per_org.entry(orgs.value(row)).or_default() += 1;
        }
        if last_progress.elapsed() > Duration::from_millis(250) {
            last_progress = Instant::now();
            print!(
                "\r  progress  {} / {expected} consumed, {} rows, {} rejected",
                out.messages,
                out.rows,
                out.rejected.values().sum::<u64>()
            );
            let _ = std::io::stdout().flush();
        }
    }
    print!(
        "\r  progress  {} / {expected} consumed, {} rows, {} rejected",
        out.messages,
        out.rows,
        out.rejected.values().sum::<u64>()
    );
    Ok(out)
}
