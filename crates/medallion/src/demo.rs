//! The local mode: an embedded broker (librdkafka's mock cluster) and an embedded Confluent-
//! compatible registry in one process; contracts registered, topics created from
//! topic-config.yaml, a realistic connector stream produced (several orgs, the release, lead and
//! others of feeds.yaml, ~1% malformed, some duplicates) and run through bronze, silver, gold, the rule
//! evaluator, the notification sender (to a signed-webhook receiver the demo starts) and the
//! audit writer (to a local directory), in process.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arrow::array::Array as _;
use medallion_contracts::registry::RegistryClient;
use medallion_contracts::sample::{SampleEvents, SplitMix};
use medallion_contracts::{json, ContractSet, TopicConfig};
use medallion_runtime::config::WorkerConfig;
use medallion_runtime::http::Health;
use medallion_runtime::kafka::io::send_queued;
use medallion_runtime::pii::{KeySource, Keyring, PiiConfig};
use medallion_runtime::worker::{prepare, Progress, RunTotals, Stage, StageSetup};
use medallion_stages::audit_writer::{self, AuditStore, AuditWriter, AuditWriterConfig};
use medallion_stages::bronze::{self, Bronze, BronzeConfig};
use medallion_stages::gold::{self, Gold, GoldConfig};
use medallion_stages::notify::{self, ChannelConfig, Notify, NotifyConfig, Route};
use medallion_stages::rules::{self, Rules, RulesConfig};
use medallion_stages::silver::{self, Silver, SilverConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// Where the audit writer puts its Parquet files (emptied first; default
    /// target/medallion-demo/audit-store under the repository).
    #[arg(long)]
    audit_store: Option<std::path::PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz of all stages.
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics_listen: SocketAddr,
    /// Where the realtime gateway serves its clients and the console.
    #[arg(long, default_value = "127.0.0.1:0")]
    gateway_listen: SocketAddr,
    /// After the summary, keep serving the final /metrics (for a local Prometheus and the
    /// dashboards) until Ctrl-C or SIGTERM.
    #[arg(long)]
    keep_running: bool,
}

/// The demo's webhook endpoint: counts deliveries whose signature checks out.
#[derive(Default)]
struct Receiver {
    secret: String,
    accepted: std::sync::atomic::AtomicU64,
    bad_signature: std::sync::atomic::AtomicU64,
}

async fn start_receiver(secret: String) -> anyhow::Result<(String, Arc<Receiver>)> {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    async fn hook(
        State(receiver): State<Arc<Receiver>>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        let timestamp = header(notify::header::TIMESTAMP)
            .parse::<u64>()
            .unwrap_or(0);
        let expected = notify::signature(receiver.secret.as_bytes(), timestamp, &body);
        if header(notify::header::SIGNATURE) == expected {
            receiver.accepted.fetch_add(1, Relaxed);
            StatusCode::NO_CONTENT
        } else {
            receiver.bad_signature.fetch_add(1, Relaxed);
            StatusCode::UNAUTHORIZED
        }
    }
    let receiver = Arc::new(Receiver {
        secret,
        ..Receiver::default()
    });
    let app = axum::Router::new()
        .route("/alerts", axum::routing::post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo webhook receiver")?;
    let url = format!("http://{}/alerts", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("demo webhook receiver stopped: {e}");
        }
    });
    Ok((url, receiver))
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
    let placement = medallion_runtime::kafka::Placement::of(&topics);

    // Broker.
    let cluster;
    let bootstrap = match &args.bootstrap {
        Some(b) => {
            let kafka = medallion_runtime::kafka::KafkaConnection::plain(b)?;
            medallion_runtime::admin::apply_topics(&kafka, &topics, 1).await?;
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
    let http = medallion_runtime::http::serve(args.metrics_listen, health.clone(), metrics.clone())
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_listen))?;
    println!("  metrics   http://{http}/metrics (all stages)");
    let base = Base {
        home: home.to_path_buf(),
        bootstrap: bootstrap.clone(),
        registry: registry_url.clone(),
        health,
    };
    let bronze_config = local_bronze();
    let secret = uuid::Uuid::new_v4().to_string();
    let (hook_url, receiver) = start_receiver(secret.clone()).await?;
    println!("  webhook   {hook_url} (signed with a secret made for this run)");
    let notify_config = local_notify(hook_url, secret);
    let store_dir = args
        .audit_store
        .clone()
        .unwrap_or_else(|| home.join("target/medallion-demo/audit-store"));
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir)
            .with_context(|| format!("emptying {}", store_dir.display()))?;
    }
    let audit_config = AuditWriterConfig {
        store: store_dir.display().to_string(),
        flush_interval_ms: 1_000,
        ..AuditWriterConfig::default()
    };
    println!(
        "  audit     {} (Parquet by org and day)",
        store_dir.display()
    );
    // The stages start together (each registers its schemas and plans its transform), and the
    // line says which are still starting.
    let starting = Starting::new(&[
        "bronze",
        "silver",
        "gold",
        "rules",
        "notifications",
        "audit",
    ]);
    let spawns = async {
        tokio::try_join!(
            starting.track(0, base.spawn(bronze::GROUP, bronze_config, Bronze::new)),
            starting.track(
                1,
                base.spawn(silver::GROUP, SilverConfig::default(), Silver::new)
            ),
            starting.track(2, base.spawn(gold::GROUP, GoldConfig::default(), Gold::new)),
            starting.track(
                3,
                base.spawn(rules::GROUP, RulesConfig::default(), Rules::new)
            ),
            starting.track(4, base.spawn(notify::GROUP, notify_config, Notify::new)),
            starting.track(
                5,
                base.spawn(audit_writer::GROUP, audit_config, AuditWriter::new)
            ),
        )
    };
    tokio::pin!(spawns);
    let (bronze, silver, gold, rules, notifier, auditor) = loop {
        tokio::select! {
            spawned = &mut spawns => break spawned?,
            _ = tokio::time::sleep(Duration::from_millis(250)) => starting.print(),
        }
    };
    let stages = [&bronze, &silver, &gold, &rules, &notifier];
    let live = start_gateway(&base, args.gateway_listen).await?;

    let producer = medallion_runtime::kafka::producer(
        &medallion_runtime::kafka::KafkaConnection::plain(&bootstrap)?,
    )?;
    let started = Instant::now();
    let sent = AtomicU64::new(0);
    let work = async {
        // Events are produced while the stages run; progress shows from the start.
        let produce = produce_stream(&producer, &raw, raw_id, &placement, &args, &sent);
        tokio::pin!(produce);
        let mut produced: Option<Produced> = None;
        let mut last = Instant::now() - Duration::from_secs(1);
        let mut settled_at: Option<Instant> = None;
        let mut audited = 0;
        loop {
            if produced.is_none() {
                tokio::select! {
                    done = &mut produce => produced = Some(done?),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Done when everything is produced, every stage has consumed everything its
            // upstream wrote, and the audit trail stopped growing, for a while.
            let mut upstream = sent.load(Relaxed);
            let mut settled = produced.is_some();
            for stage in &stages {
                settled &= stage.progress.consumed.load(Relaxed) >= upstream;
                upstream = stage.progress.produced.load(Relaxed);
            }
            let now_audited = auditor.progress.consumed.load(Relaxed);
            settled &= now_audited == audited;
            audited = now_audited;
            if last.elapsed() > Duration::from_millis(250) {
                last = Instant::now();
                print!(
                    "\r  progress  raw {} | bronze {} -> {} | silver {} -> {} | gold {} -> {} windows | alerts {} | audit {}   ",
                    sent.load(Relaxed),
                    bronze.progress.consumed.load(Relaxed),
                    bronze.progress.produced.load(Relaxed),
                    silver.progress.consumed.load(Relaxed),
                    silver.progress.produced.load(Relaxed),
                    gold.progress.consumed.load(Relaxed),
                    gold.progress.produced.load(Relaxed),
                    rules.progress.produced.load(Relaxed),
                    auditor.progress.consumed.load(Relaxed),
                );
                let _ = std::io::stdout().flush();
            }
            match (settled, settled_at) {
                (true, None) => settled_at = Some(Instant::now()),
                (false, _) => settled_at = None,
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the pipeline did not drain within 600 s");
            }
            if let (true, Some(produced)) = (settled, &produced) {
                if settled_at.is_some_and(|at| at.elapsed() > Duration::from_secs(2)) {
                    return Ok::<_, anyhow::Error>(*produced);
                }
            }
        }
    };
    let outcome = tokio::select! {
        result = work => Some(result?),
        _ = tokio::signal::ctrl_c() => None,
    };
    let elapsed = started.elapsed().as_secs_f64();
    drop(producer);
    let totals = stop_all(vec![
        ("bronze", bronze),
        ("silver", silver),
        ("gold", gold),
        ("rules", rules),
        ("notifications", notifier),
        ("audit", auditor),
    ])
    .await?;
    // Let the stopped workers' background clients close while the embedded broker still runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Some(produced) = outcome else {
        println!("\ninterrupted: every stage stopped cleanly and committed");
        return Ok(ExitCode::from(130));
    };
    let [bronze, silver, gold, rules, _notifier, auditor] = &totals[..] else {
        bail!("six stages expected");
    };
    let scrape = metrics.render();
    let pushed = live.received();
    println!(
        "  live stream       org {} received {} alerts, {} metric updates and {} entity updates from the gateway as they happened",
        live.org, pushed[0], pushed[1], pushed[2]
    );
    print_summary(&Summary {
        elapsed,
        produced: &produced,
        totals: [bronze, silver, gold, rules, auditor],
        scrape: &scrape,
        receiver: &receiver,
        store_dir: &store_dir,
    })
    .await?;
    for (name, t) in [
        ("bronze", bronze),
        ("silver", silver),
        ("gold", gold),
        ("rules", rules),
    ] {
        let dead: u64 = t.dead_lettered.values().sum();
        if name == "bronze" && t.produced + t.duplicates + t.replayed + dead != t.consumed {
            bail!(
                "bronze: {} of {} records accounted for",
                t.produced + t.duplicates + t.replayed + dead,
                t.consumed
            );
        }
    }
    if args.keep_running {
        println!("serving the final metrics at http://{http}/metrics until Ctrl-C");
        let _ = std::io::stdout().flush();
        medallion_stages::main_support::shutdown_signal().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// bronze's settings: personal data encrypted with a key made for this run.
fn local_bronze() -> BronzeConfig {
    BronzeConfig {
        pii: PiiConfig {
            active_key: "local".into(),
            keys: [(
                "local".to_string(),
                KeySource {
                    env: None,
                    value: Some(Keyring::generate_key()),
                },
            )]
            .into(),
        },
        ..BronzeConfig::default()
    }
}

/// notification-sender's settings: every alert to the local receiver, critical ones logged too.
fn local_notify(hook_url: String, secret: String) -> NotifyConfig {
    NotifyConfig {
        channels: [
            (
                "local-webhook".to_string(),
                ChannelConfig::Webhook {
                    url: hook_url,
                    secret: Some(secret),
                    secret_env: None,
                    timeout_ms: 5_000,
                    max_in_flight: 8,
                },
            ),
            ("log".to_string(), ChannelConfig::Log),
        ]
        .into(),
        routes: vec![
            Route {
                orgs: Vec::new(),
                min_severity: None,
                channels: vec!["local-webhook".into()],
            },
            Route {
                orgs: Vec::new(),
                min_severity: Some(notify::Severity::Critical),
                channels: vec!["log".into()],
            },
        ],
        ..NotifyConfig::default()
    }
}

/// Which stages are still starting, for the progress line.
struct Starting {
    names: Vec<&'static str>,
    done: Vec<std::sync::atomic::AtomicBool>,
    since: Instant,
}

impl Starting {
    fn new(names: &[&'static str]) -> Self {
        Self {
            names: names.to_vec(),
            done: names.iter().map(|_| Default::default()).collect(),
            since: Instant::now(),
        }
    }

    /// `spawn`, marking stage `i` started once it is.
    async fn track<T>(&self, i: usize, spawn: impl std::future::Future<Output = T>) -> T {
        let spawned = spawn.await;
        self.done[i].store(true, Relaxed);
        spawned
    }

    fn print(&self) {
        let waiting: Vec<&str> = self
            .names
            .iter()
            .zip(&self.done)
            .filter(|(_, done)| !done.load(Relaxed))
            .map(|(name, _)| *name)
            .collect();
        print!(
            "\r  progress  starting the stages: waiting for {} ({:.1} s)   ",
            waiting.join(", "),
            self.since.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    }
}

/// What the summary reports on.
struct Summary<'a> {
    elapsed: f64,
    produced: &'a Produced,
    /// bronze, silver, gold, rules and the audit writer.
    totals: [&'a RunTotals; 5],
    scrape: &'a str,
    receiver: &'a Receiver,
    store_dir: &'a Path,
}

/// Prints what each layer did, the expectation failures, drift, late events, alerts,
/// notifications, personal data and the audit store.
async fn print_summary(summary: &Summary<'_>) -> anyhow::Result<()> {
    let Summary {
        elapsed,
        produced,
        totals: [bronze, silver, gold, rules, auditor],
        scrape,
        receiver,
        store_dir,
    } = *summary;
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
        scrape,
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
    let total = |name: &str| -> u64 { series(scrape, name).iter().map(|(_, v)| *v as u64).sum() };
    let drift = total(medallion_runtime::metrics::DRIFT_TOTAL);
    println!("  drift             {drift} stale updates kept out of entity state (audited on audit.events)");
    let late = total(medallion_runtime::metrics::LATE_EVENTS_TOTAL);
    let open = total(medallion_runtime::metrics::OPEN_WINDOWS);
    println!("  late events       {late} (dead-lettered); {open} windows still open at the end of the stream");
    // Every counter is registered at zero with no labels at start-up: only rules that fired.
    let fired: Vec<_> = series(scrape, medallion_runtime::metrics::ALERTS_TOTAL)
        .into_iter()
        .filter(|(labels, n)| *n > 0.0 && !label(labels, "rule").is_empty())
        .collect();
    if fired.is_empty() {
        println!("  alerts fired      none");
    } else {
        println!("  alerts fired");
    }
    for (labels, n) in fired {
        println!(
            "    {:<28} {:<9} {n}",
            label(&labels, "rule"),
            label(&labels, "severity")
        );
    }
    let notified = |channel: &str, outcome: &str| -> u64 {
        series(scrape, medallion_runtime::metrics::NOTIFICATIONS_TOTAL)
            .iter()
            .filter(|(labels, _)| {
                label(labels, "channel") == channel && label(labels, "outcome") == outcome
            })
            .map(|(_, v)| *v as u64)
            .sum()
    };
    println!(
        "  notifications     webhook delivered {} dead-lettered {} | log delivered {} | signatures the receiver verified {} rejected {}",
        notified("local-webhook", "delivered"),
        notified("local-webhook", "dead_lettered"),
        notified("log", "delivered"),
        receiver.accepted.load(Relaxed),
        receiver.bad_signature.load(Relaxed),
    );
    println!(
        "  personal data     {} fields encrypted in bronze (AES-256-GCM, key `local`)",
        total(medallion_runtime::metrics::PII_FIELDS_ENCRYPTED_TOTAL)
    );
    let store = AuditStore::open(&store_dir.display().to_string())?;
    let rows = store
        .query("SELECT action, count(*) AS n FROM audit_events GROUP BY action ORDER BY action")
        .await?;
    println!(
        "  audit store       {} rows written in {} files from {} audit events; by action:",
        total(medallion_runtime::metrics::AUDIT_ROWS_WRITTEN_TOTAL),
        store.files().await?.len(),
        auditor.consumed,
    );
    for batch in &rows {
        let actions = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
        let counts = arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Int64)?;
        let (actions, counts) = (
            actions.as_any().downcast_ref::<arrow::array::StringArray>(),
            counts.as_any().downcast_ref::<arrow::array::Int64Array>(),
        );
        if let (Some(actions), Some(counts)) = (actions, counts) {
            for i in 0..actions.len() {
                println!("    {:<32} {}", actions.value(i), counts.value(i));
            }
        }
    }
    println!(
        "    query it: cargo run -p medallion -- audit query --store {} \"SELECT * FROM audit_events LIMIT 5\"",
        store_dir.display()
    );
    Ok(())
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

/// Stops every stage at once and waits for them together, saying which it still waits for;
/// the totals come back in the order given.
async fn stop_all(stages: Vec<(&'static str, Running)>) -> anyhow::Result<Vec<RunTotals>> {
    let started = Instant::now();
    let mut waiting = Vec::with_capacity(stages.len());
    for (i, (name, running)) in stages.into_iter().enumerate() {
        let _ = running.stop.send(());
        waiting.push((i, name, running.task));
    }
    let mut totals: Vec<Option<RunTotals>> = vec![None; waiting.len()];
    let mut last = Instant::now();
    while !waiting.is_empty() {
        let (done, still): (Vec<_>, Vec<_>) = waiting
            .into_iter()
            .partition(|(_, _, task)| task.is_finished());
        for (i, name, task) in done {
            let result = task
                .await
                .with_context(|| format!("the {name} worker task"))?;
            totals[i] = Some(result.with_context(|| format!("stopping {name}"))?);
        }
        waiting = still;
        if !waiting.is_empty() && last.elapsed() >= Duration::from_millis(500) {
            last = Instant::now();
            let names: Vec<&str> = waiting.iter().map(|(_, name, _)| *name).collect();
            print!(
                "\r  stopping  committing and leaving the group: waiting for {} ({:.1} s)   ",
                names.join(", "),
                started.elapsed().as_secs_f64()
            );
            let _ = std::io::stdout().flush();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    totals
        .into_iter()
        .map(|t| t.context("a stage left no totals"))
        .collect()
}

/// The org whose console the local mode opens.
const CONSOLE_ORG: i64 = 100;

/// The realtime gateway of the local mode and a client following one org's stream.
struct LiveStream {
    org: i64,
    /// Alerts, metric updates and entity updates received.
    counts: Arc<[AtomicU64; 3]>,
}

impl LiveStream {
    fn received(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.counts[i].load(Relaxed))
    }
}

/// Starts the gateway in process, prints the console's URL with a token for one org, and
/// follows that org's stream as a client would.
async fn start_gateway(base: &Base, listen: SocketAddr) -> anyhow::Result<LiveStream> {
    use medallion_stages::gateway::{self, auth, GatewayConfig};
    let secret = uuid::Uuid::new_v4().to_string();
    let mut config: WorkerConfig<GatewayConfig> = WorkerConfig::default();
    config.kafka.bootstrap = base.bootstrap.clone();
    config.registry.url = base.registry.clone();
    config.contracts.home = Some(base.home.clone());
    config.stage.listen = listen;
    config.stage.cursor_key = Some(format!("{}{}", uuid::Uuid::new_v4(), uuid::Uuid::new_v4()));
    config.stage.auth.hs256_secret = Some(secret.clone());
    let running = gateway::start(&config, Health::new())
        .await
        .context("starting the realtime gateway")?;
    let token = auth::mint_hs256(&secret, CONSOLE_ORG, None, None, "local-mode", 24 * 3600)?;
    println!(
        "\n  console   http://{}/console#token={token} (org {CONSOLE_ORG}, live)",
        running.addr
    );
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/events", running.addr))
        .bearer_auth(&token)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("following the gateway's stream")?;
    let tally = counts.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut body = response.bytes_stream();
        let mut pending = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            let Some(end) = pending.rfind('\n') else {
                continue;
            };
            for line in pending[..end].lines() {
                let kind = match line.strip_prefix("event: ") {
                    Some("alert.new") => 0,
                    Some("tenant.metrics.update") => 1,
                    Some(_) => 2,
                    None => continue,
                };
                tally[kind].fetch_add(1, Relaxed);
            }
            pending.drain(..=end);
        }
    });
    Ok(LiveStream {
        org: CONSOLE_ORG,
        counts,
    })
}

impl Base {
    async fn spawn<S, C, F, Fut>(&self, group: &str, stage: C, make: F) -> anyhow::Result<Running>
    where
        S: Stage + Sync,
        C: Default + Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce(StageSetup, C) -> Fut,
        Fut: std::future::Future<Output = Result<S, medallion_runtime::error::SetupError>>,
    {
        let mut config: WorkerConfig<C> = WorkerConfig::default();
        config.kafka.bootstrap = self.bootstrap.clone();
        config.registry.url = self.registry.clone();
        config.contracts.home = Some(self.home.clone());
        config.stage = stage;
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

#[derive(Debug, Clone, Copy)]
struct Produced {
    total: u64,
    malformed: u64,
    duplicates: u64,
}

async fn produce_stream(
    producer: &FutureProducer,
    raw: &medallion_contracts::Contract,
    raw_id: u32,
    placement: &medallion_runtime::kafka::Placement,
    args: &DemoArgs,
    sent: &AtomicU64,
) -> anyhow::Result<Produced> {
    let now = medallion_runtime::clock::now_ms();
    // Event times over the last hour, so bronze's sanity range accepts them.
    let mut events =
        SampleEvents::every_feed(42, args.orgs, now - 3_600_000 - args.events as i64 * 100);
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
        let partition = placement.partition(RAW_TOPIC, Some(key.as_bytes()));
        let mut record = FutureRecord::to(RAW_TOPIC).key(&key).payload(&value);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        pending.push(send_queued(producer, record).await?);
        sent.fetch_add(1, Relaxed);
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
