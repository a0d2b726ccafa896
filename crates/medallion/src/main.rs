//! `medallion`: the operator CLI and the one-command local mode.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medallion_contracts::{compat, registry::RegistryClient, ContractSet, TopicConfig};

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
    /// Remove day partitions older than the retention (seed 002: 90 days).
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
    /// Create every topic and DLQ that does not exist yet.
    Apply {
        /// Kafka bootstrap servers.
        #[arg(long, env = "MEDALLION_BOOTSTRAP")]
        bootstrap: String,
        /// Cap replication (a development cluster may have fewer brokers than production).
        #[arg(long, default_value_t = 3)]
        max_replication: u16,
    },
}

fn today() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    medallion_stages::audit_writer::day_of_ms(now)
}

fn load(home: &std::path::Path) -> anyhow::Result<(ContractSet, TopicConfig)> {
    let contracts = ContractSet::load(&home.join("schemas"))
        .with_context(|| format!("loading schemas from {}", home.join("schemas").display()))?;
    let topics = TopicConfig::load(&home.join("topic-config.yaml"))?;
    Ok((contracts, topics))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let home = cli.home.unwrap_or_else(medallion_contracts::project_root);
    match cli.command {
        Command::Demo(args) => demo::run(&home, args).await,
        Command::Schemas(SchemasCommand::Check { released }) => {
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
        Command::Schemas(SchemasCommand::Release { released }) => {
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
        Command::Schemas(SchemasCommand::Register { registry }) => {
            let (contracts, topics) = load(&home)?;
            let client = RegistryClient::new(&registry, Duration::from_secs(10))?;
            for (topic, id) in client.register_all(&contracts, &topics).await? {
                println!("{:<32} id {id}", topics.subject(&topic));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Query { sql, store }) => {
            let store = medallion_stages::audit_writer::AuditStore::open(&store)?;
            let batches = store.query(&sql).await?;
            println!(
                "{}",
                datafusion::arrow::util::pretty::pretty_format_batches(&batches)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Retention {
            store,
            days,
            dry_run,
        }) => {
            let store = medallion_stages::audit_writer::AuditStore::open(&store)?;
            let removed = store.retain(days, &today(), dry_run).await?;
            let verb = if dry_run { "would remove" } else { "removed" };
            for partition in &removed {
                println!("{verb} {partition}");
            }
            println!("{verb} {} partitions older than {days} days", removed.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics(TopicsCommand::Apply {
            bootstrap,
            max_replication,
        }) => {
            let (_, topics) = load(&home)?;
            let applied =
                medallion_runtime::admin::apply_topics(&bootstrap, &topics, max_replication)
                    .await?;
            for (topic, outcome) in applied {
                println!(
                    "{:<36} {:>3} partitions  rf {}  retention {} ms  {:?}",
                    topic.name, topic.partitions, topic.replication, topic.retention_ms, outcome
                );
            }
            Ok(ExitCode::SUCCESS)
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
