//! `medallion`: the operator CLI and the one-command local mode.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medallion_contracts::{compat, registry::RegistryClient, ContractSet, TopicConfig};
use medallion_runtime::kafka::KafkaConnection;

#[derive(Parser)]
#[command(
    name = "medallion",
    version,
    about = "Medallion: a medallion pipeline over Apache Kafka"
)]
struct Cli {
    /// Repository root holding `schemas/` and `topic-config.yaml` (default: found upward from
    /// the current directory).
    #[arg(long, global = true, env = "MEDALLION_HOME")]
    home: Option<PathBuf>,
    /// Deployment prefix of every topic and consumer group of topic-config.yaml (`naming.prefix`
    /// of the workers), so two pipelines can share one cluster.
    #[arg(
        long,
        global = true,
        env = "MEDALLION__NAMING__PREFIX",
        default_value = ""
    )]
    naming_prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline locally on an embedded broker and registry.
    Demo(demo::DemoArgs),
    /// Schema contracts: the BACKWARD gate, releases and registration.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// Topics and DLQs of topic-config.yaml.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// The audit store written by audit-writer.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Copy a topic (keys, values, headers, timestamps, partitions) to a file.
    Capture {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        topic: String,
        /// The capture file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Produce a capture file into a topic, at a rate or as fast as possible.
    Replay {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        topic: String,
        /// A file written by `medallion capture`.
        #[arg(long)]
        file: PathBuf,
        /// Records per second (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<f64>,
        /// Partition by key instead of keeping each record's captured partition.
        #[arg(long)]
        by_key: bool,
        /// Let the broker stamp records instead of keeping the captured timestamps.
        #[arg(long)]
        new_timestamps: bool,
    },
    /// Consumer lag per group, topic and partition (committed offset vs high watermark).
    Lag {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Only these groups (default: every group of topic-config.yaml).
        #[arg(long)]
        group: Vec<String>,
        /// Print again every this many seconds until interrupted.
        #[arg(long)]
        watch: Option<u64>,
    },
    /// Dead-letter topics: what they hold, and putting records back.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Reconciliation of silver's entity state with the system of record.
    #[command(subcommand)]
    Drift(DriftCommand),
    /// Mint an HS256 token for the realtime gateway, for local clusters and development
    /// (production tokens come from the identity provider, e.g. Keycloak).
    Token {
        /// The org the token is for (its `org_id` claim).
        #[arg(long)]
        org: i64,
        /// The gateway's `stage.auth.hs256_secret`.
        #[arg(
            long,
            env = "MEDALLION__STAGE__AUTH__HS256_SECRET",
            hide_env_values = true
        )]
        secret: String,
        #[arg(long)]
        issuer: Option<String>,
        #[arg(long)]
        audience: Option<String>,
        #[arg(long, default_value = "medallion-cli")]
        subject: String,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Subcommand)]
enum DriftCommand {
    /// Compare the canonical hashes of silver's entity state with an authoritative snapshot,
    /// print every entity that differs and record each on audit.events. Exits 1 when one
    /// differs, 0 when all agree.
    Check {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Schema Registry URL (the audit records are Avro).
        #[arg(long, env = "MEDALLION_REGISTRY_URL")]
        registry: String,
        /// The system of record's export: JSON lines, or Parquet (`.parquet`); one row per
        /// entity with org_id, the id, the canonical fields and updated_at (epoch ms).
        #[arg(long)]
        snapshot: PathBuf,
        /// The entity type to reconcile (its feed must declare entity.canonical).
        #[arg(long, default_value = "case")]
        entity_type: String,
        /// Print only; record nothing on audit.events.
        #[arg(long)]
        no_audit: bool,
    },
}

/// How to reach Kafka.
#[derive(clap::Args)]
struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "MEDALLION_BOOTSTRAP")]
    bootstrap: String,
    /// Extra librdkafka properties, `key=value` (security.protocol, sasl.*, ...); added to
    /// those of MEDALLION_KAFKA_PROPERTIES, and winning over them.
    #[arg(long = "kafka-property", short = 'X', value_parser = parse_property)]
    properties: Vec<(String, String)>,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

impl KafkaArgs {
    /// The connection every client of the command is built from: `MEDALLION_KAFKA_PROPERTIES`,
    /// then `-X`; a property the runtime owns stops the command with its name.
    fn client(&self) -> anyhow::Result<KafkaConnection> {
        let mut properties = std::collections::BTreeMap::new();
        if let Ok(text) = std::env::var(medallion_runtime::config::KAFKA_PROPERTIES_ENV) {
            for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = parse_property(pair).map_err(|e| {
                    anyhow::anyhow!("{}: {e}", medallion_runtime::config::KAFKA_PROPERTIES_ENV)
                })?;
                properties.insert(k, v);
            }
        }
        properties.extend(self.properties.iter().cloned());
        Ok(KafkaConnection::new(&self.bootstrap, properties)?)
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Counts by reason and stage, time span, and sample records with their error headers.
    Inspect {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// The dead-letter topic, or the topic whose DLQ to read.
        #[arg(long)]
        topic: String,
        /// Sample records shown per reason.
        #[arg(long, default_value_t = 2)]
        samples: usize,
    },
    /// Send dead letters back to the topic named in their headers, once each.
    Redrive {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// The dead-letter topic, or the topic whose DLQ to redrive.
        #[arg(long)]
        topic: String,
        /// Only records with this reason (repeatable).
        #[arg(long)]
        reason: Vec<String>,
        /// Only records dead-lettered since: epoch ms, or a duration ago (`30m`, `2h`, `7d`).
        #[arg(long)]
        since: Option<String>,
        /// Only records dead-lettered before: epoch ms, or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// Show what would be redriven; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave records already redriven this many times in the DLQ.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// Records per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Run SQL over table `audit_events` (partition columns `org_id` and `day` prune files).
    Query {
        /// e.g. "SELECT action, count(*) FROM audit_events WHERE org_id = 7 GROUP BY action".
        sql: String,
        /// A directory, file:///dir or s3://bucket/prefix (AWS_* variables for S3).
        #[arg(long, env = "MEDALLION_AUDIT_STORE", default_value = "audit-store")]
        store: String,
    },
    /// Remove day partitions older than the retention (90 days).
    Retention {
        #[arg(long, env = "MEDALLION_AUDIT_STORE", default_value = "audit-store")]
        store: String,
        #[arg(long, default_value_t = medallion_stages::audit_writer::RETENTION_DAYS)]
        days: u32,
        /// List what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum SchemasCommand {
    /// Fail if a schema breaks BACKWARD compatibility with its released version without a
    /// contract_version bump.
    Check {
        /// Released snapshots (default: schemas/released).
        #[arg(long)]
        released: Option<PathBuf>,
    },
    /// Record the current schemas as released.
    Release {
        #[arg(long)]
        released: Option<PathBuf>,
    },
    /// Register every topic's schema under `<topic>-value`.
    Register {
        /// Schema Registry URL.
        #[arg(long, env = "MEDALLION_REGISTRY_URL")]
        registry: String,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Show how the broker differs from topic-config.yaml (creates, partitions, retention).
    Plan {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, default_value_t = 3)]
        max_replication: u16,
    },
    /// Create missing topics and DLQs, add partitions, set retention and cleanup policy.
    Apply {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Cap replication (a development cluster may have fewer brokers than production).
        #[arg(long, default_value_t = 3)]
        max_replication: u16,
    },
}

/// Epoch ms of `text`: epoch ms, or a duration (`2h`) before now.
fn instant(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let ago = medallion_contracts::topics::parse_duration(text).map_err(|e| {
        anyhow::anyhow!("`{text}` is neither epoch milliseconds nor a duration like 2h: {e}")
    })?;
    Ok(medallion_runtime::clock::now_ms() - ago.as_millis() as i64)
}

/// The DLQ of `topic` (or `topic` itself if it is one); a name of topic-config.yaml gets the
/// deployment prefix.
fn dlq_of(topics: &TopicConfig, topic: &str) -> anyhow::Result<String> {
    let prefixed = format!("{}{topic}", topics.prefix);
    for name in [topic, prefixed.as_str()] {
        if topics
            .physical_topics(u16::MAX)
            .iter()
            .any(|t| t.name == name && t.dlq_of.is_some())
        {
            return Ok(name.to_string());
        }
        if topics.topic(name).is_some_and(|t| t.dlq.is_some()) {
            return Ok(topics.dlq_topic(name));
        }
    }
    anyhow::bail!("`{topic}` is neither a DLQ nor a topic with a DLQ in topic-config.yaml")
}

fn ms_text(ms: Option<i64>) -> String {
    ms.map_or("-".into(), |ms| {
        let day = medallion_stages::audit_writer::day_of_ms(ms);
        let in_day = ms.rem_euclid(86_400_000) / 1_000;
        format!(
            "{day}T{:02}:{:02}:{:02}Z",
            in_day / 3600,
            in_day / 60 % 60,
            in_day % 60
        )
    })
}

fn today() -> String {
    medallion_stages::audit_writer::day_of_ms(medallion_runtime::clock::now_ms())
}

fn load(home: &std::path::Path, prefix: &str) -> anyhow::Result<(ContractSet, TopicConfig)> {
    let contracts = ContractSet::load(&home.join("schemas"))
        .with_context(|| format!("loading schemas from {}", home.join("schemas").display()))?;
    let topics = TopicConfig::load(&home.join("topic-config.yaml"))?
        .with_prefix(prefix)
        .map_err(|e| anyhow::anyhow!("--naming-prefix: {e}"))?;
    Ok((contracts, topics))
}

/// Where the commands find the contracts, and the deployment prefix of topics and groups.
struct Deployment {
    home: PathBuf,
    prefix: String,
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = Deployment {
        home: cli.home.unwrap_or_else(medallion_contracts::project_root),
        prefix: cli.naming_prefix,
    };
    match cli.command {
        Command::Demo(args) => demo::run(&ctx.home, args).await,
        Command::Schemas(command) => schemas(&ctx, command).await,
        Command::Drift(command) => drift(&ctx, command).await,
        Command::Audit(command) => audit(command).await,
        Command::Topics(command) => topics(&ctx, command).await,
        Command::Capture { kafka, topic, out } => capture(kafka, topic, out).await,
        Command::Replay {
            kafka,
            topic,
            file,
            rate,
            by_key,
            new_timestamps,
        } => replay_file(kafka, topic, file, rate, by_key, new_timestamps).await,
        Command::Lag {
            kafka,
            group,
            watch,
        } => lag(&ctx, kafka, group, watch).await,
        Command::Dlq(command) => dlq(&ctx, command).await,
        Command::Token {
            org,
            secret,
            issuer,
            audience,
            subject,
            ttl,
        } => {
            if secret.is_empty() {
                anyhow::bail!("--secret is empty");
            }
            let token = medallion_stages::gateway::auth::mint_hs256(
                &secret,
                org,
                issuer.as_deref(),
                audience.as_deref(),
                &subject,
                ttl,
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `medallion schemas`: the BACKWARD gate, releasing and registering the contracts.
async fn schemas(ctx: &Deployment, command: SchemasCommand) -> anyhow::Result<ExitCode> {
    let home = ctx.home.clone();
    let load = |home: &std::path::Path| load(home, &ctx.prefix);
    match command {
        SchemasCommand::Check { released } => {
            let (contracts, _) = load(&home)?;
            let released = released.unwrap_or_else(|| home.join("schemas/released"));
            let report = compat::gate(&contracts, &released)?;
            print!("{report}");
            if report.passed() {
                println!("BACKWARD gate passed for {} schemas", contracts.len());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("BACKWARD gate failed");
                Ok(ExitCode::FAILURE)
            }
        }
        SchemasCommand::Release { released } => {
            let (contracts, _) = load(&home)?;
            let released = released.unwrap_or_else(|| home.join("schemas/released"));
            let report = compat::gate(&contracts, &released)?;
            if !report.passed() {
                print!("{report}");
                anyhow::bail!("refusing to release: fix the schemas or bump contract_version");
            }
            for path in compat::release(&contracts, &released)? {
                println!("released {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        SchemasCommand::Register { registry } => {
            let (contracts, topics) = load(&home)?;
            let client = RegistryClient::new(&registry, Duration::from_secs(10))?;
            for (topic, id) in client.register_all(&contracts, &topics).await? {
                println!("{:<32} id {id}", topics.subject(&topic));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `medallion drift check`: silver's entity state against the system of record.
async fn drift(ctx: &Deployment, command: DriftCommand) -> anyhow::Result<ExitCode> {
    let home = ctx.home.clone();
    let load = |home: &std::path::Path| load(home, &ctx.prefix);
    match command {
        DriftCommand::Check {
            kafka,
            registry,
            snapshot,
            entity_type,
            no_audit,
        } => {
            let (contracts, topics) = load(&home)?;
            let kafka = kafka.client()?;
            let registry = RegistryClient::new(&registry, Duration::from_secs(10))?;
            let report = medallion_stages::silver::reconcile::Check {
                kafka: &kafka,
                registry: &registry,
                home: &home,
                contracts: &contracts,
                topics: &topics,
                entity_type: &entity_type,
                snapshot: &snapshot,
                record: !no_audit,
            }
            .run()
            .await?;
            print!("{}", medallion_stages::silver::reconcile::table(&report));
            Ok(if report.findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `medallion audit`: querying the audit store and applying its retention.
async fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Query { sql, store } => {
            let store = medallion_stages::audit_writer::AuditStore::open(&store)?;
            let batches = store.query(&sql).await?;
            println!(
                "{}",
                datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Retention {
            store,
            days,
            dry_run,
        } => {
            let store = medallion_stages::audit_writer::AuditStore::open(&store)?;
            let removed = store.retain(days, &today(), dry_run).await?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for partition in &removed {
                println!("{verb} {partition}");
            }
            println!("{verb} {} partitions older than {days} days", removed.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `medallion topics`: planning and applying topic-config.yaml on a cluster.
async fn topics(ctx: &Deployment, command: TopicsCommand) -> anyhow::Result<ExitCode> {
    let home = ctx.home.clone();
    let load = |home: &std::path::Path| load(home, &ctx.prefix);
    match command {
        TopicsCommand::Plan {
            kafka,
            max_replication,
        } => {
            let (_, topics) = load(&home)?;
            let plan =
                medallion_runtime::admin::plan_topics(&kafka.client()?, &topics, max_replication)
                    .await?;
            let mut pending = 0;
            let mut impossible = false;
            for (topic, changes) in &plan {
                let what = if changes.is_empty() {
                    "up to date".to_string()
                } else {
                    pending += 1;
                    impossible |= changes.iter().any(|c| {
                        matches!(c, medallion_runtime::admin::Change::FewerPartitions { .. })
                    });
                    changes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                println!("{:<40} {what}", topic.name);
            }
            println!("{pending} of {} topics to change", plan.len());
            Ok(if impossible {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        TopicsCommand::Apply {
            kafka,
            max_replication,
        } => {
            let (_, topics) = load(&home)?;
            let applied = medallion_runtime::admin::reconcile_topics(
                &kafka.client()?,
                &topics,
                max_replication,
            )
            .await?;
            for (topic, changes) in applied {
                let what = if changes.is_empty() {
                    "up to date".to_string()
                } else {
                    changes
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                println!(
                    "{:<40} {:>3} partitions  rf {}  {what}",
                    topic.name, topic.partitions, topic.replication
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `medallion dlq`: inspecting a dead-letter topic and redriving its records.
async fn dlq(ctx: &Deployment, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let home = ctx.home.clone();
    let load = |home: &std::path::Path| load(home, &ctx.prefix);
    match command {
        DlqCommand::Inspect {
            kafka,
            topic,
            samples,
        } => {
            let dlq = dlq_of(&load(&home)?.1, &topic)?;
            let client = kafka.client()?;
            let name = dlq.clone();
            let report = tokio::task::spawn_blocking(move || {
                medallion_runtime::ops::redrive::inspect(&client, &name, samples)
            })
            .await??;
            println!("{dlq}: {} records", report.total);
            println!(
                "{:<34} {:>8}  {:<22} {:<22} stages",
                "REASON", "COUNT", "FIRST", "LAST"
            );
            for (reason, stats) in &report.by_reason {
                let stages: Vec<String> = stats
                    .stages
                    .iter()
                    .map(|(s, n)| format!("{s} {n}"))
                    .collect();
                println!(
                    "{reason:<34} {:>8}  {:<22} {:<22} {}",
                    stats.count,
                    ms_text(stats.first_ms),
                    ms_text(stats.last_ms),
                    stages.join(", ")
                );
            }
            for (reason, stats) in &report.by_reason {
                for sample in &stats.samples {
                    println!(
                        "\n[{reason}] partition {} offset {}",
                        sample.partition, sample.offset
                    );
                    for (k, v) in &sample.headers {
                        let v = v
                            .as_ref()
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default();
                        println!("  {k}: {v}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Redrive {
            kafka,
            topic,
            reason,
            since,
            until,
            dry_run,
            max_redrives,
            rate,
        } => {
            let dlq = dlq_of(&load(&home)?.1, &topic)?;
            let options = medallion_runtime::ops::redrive::RedriveOptions {
                reasons: reason,
                since_ms: since.as_deref().map(instant).transpose()?,
                until_ms: until.as_deref().map(instant).transpose()?,
                dry_run,
                max_redrives,
                rate,
            };
            let report =
                medallion_runtime::ops::redrive::redrive(&kafka.client()?, &dlq, &options).await?;
            let verb = if dry_run { "would redrive" } else { "redriven" };
            for (original, n) in &report.redriven {
                println!("{verb:<14} {n:>8} to {original}");
            }
            println!(
            "left in {dlq}: {} filtered out, {} redriven {max_redrives} times already, {} without an original topic; {} redriven before; {} postponed to the next run",
            report.filtered, report.looping, report.unroutable, report.already, report.postponed
        );
            if report.repartitioned > 0 {
                println!(
                "{} sent by key: their original-partition header named no partition of the topic",
                report.repartitioned
            );
            }
            if report.failed > 0 {
                eprintln!(
                    "{} refused by the broker and left in {dlq} for the next run:",
                    report.failed
                );
                for f in &report.failures {
                    eprintln!("  {f}");
                }
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `medallion capture`: a topic as it is now, into a file.
async fn capture(kafka: KafkaArgs, topic: String, out: PathBuf) -> anyhow::Result<ExitCode> {
    let client = kafka.client()?;
    let summary = tokio::task::spawn_blocking(move || {
        medallion_runtime::ops::capture::capture(&client, &topic, &out, |s| {
            eprint!("\r  captured {} records", s.records);
        })
    })
    .await??;
    eprintln!();
    println!("{}", summary.table());
    Ok(ExitCode::SUCCESS)
}

/// `medallion replay`: a capture file back into a topic.
async fn replay_file(
    kafka: KafkaArgs,
    topic: String,
    file: PathBuf,
    rate: Option<f64>,
    by_key: bool,
    new_timestamps: bool,
) -> anyhow::Result<ExitCode> {
    let kafka = kafka.client()?;
    let records = medallion_runtime::ops::capture::read_capture(&file)?;
    let options = medallion_runtime::ops::capture::ReplayOptions {
        rate,
        by_key,
        new_timestamps,
    };
    let summary =
        medallion_runtime::ops::capture::replay(&kafka, &topic, &records, &options, |s, total| {
            eprint!(
                "\r  {}",
                medallion_runtime::ops::capture::progress_line(s, total)
            );
        })
        .await?;
    eprintln!();
    println!("{}", summary.table());
    Ok(if summary.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `medallion lag`: the consumer lag of the pipeline's groups, once or every few seconds.
async fn lag(
    ctx: &Deployment,
    kafka: KafkaArgs,
    group: Vec<String>,
    watch: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let home = ctx.home.clone();
    let load = |home: &std::path::Path| load(home, &ctx.prefix);

    let (_, topics) = load(&home)?;
    let group: Vec<String> = group.iter().map(|g| topics.group_name(g)).collect();
    let groups: Vec<(String, Vec<String>, Option<String>)> = topics
        .consumer_groups
        .iter()
        .filter(|(name, _)| group.is_empty() || group.contains(name))
        .map(|(name, spec)| {
            (
                name.clone(),
                spec.consumes.clone(),
                topics.progress_topic_of(name),
            )
        })
        .collect();
    if let Some(unknown) = group
        .iter()
        .find(|g| !topics.consumer_groups.contains_key(*g))
    {
        anyhow::bail!("consumer group `{unknown}` is not in topic-config.yaml");
    }
    let client = kafka.client()?;
    loop {
        let (client, groups) = (client.clone(), groups.clone());
        let rows = tokio::task::spawn_blocking(move || {
            let mut rows = Vec::new();
            for (group, consumes, progress) in &groups {
                rows.extend(medallion_runtime::ops::lag::group_lag(
                    &client,
                    group,
                    consumes,
                    progress.as_deref(),
                )?);
            }
            Ok::<_, medallion_runtime::ops::capture::CaptureError>(rows)
        })
        .await??;
        print!("{}", medallion_runtime::ops::lag::table(&rows));
        let Some(every) = watch else {
            return Ok(ExitCode::SUCCESS);
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every.max(1))) => println!(),
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The local mode prints its own progress and summary (drift, late events and dead letters
    // included): per-record warnings would only bury them. RUST_LOG still wins.
    let default_filter = match cli.command {
        Command::Demo(_) => "error,librdkafka=off,rdkafka=off",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
