//! audit-writer: `audit.events` → the audit store (consumer group `audit-writer`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::audit_writer::{AuditWriter, AuditWriterConfig, GROUP};
use medallion_stages::main_support::{limit_malloc_arenas, run_worker, WorkerArgs};

/// Writes audit events as Parquet files partitioned by org and day to a local directory or an
/// S3-compatible bucket; a file's name carries its topic, partition and offset range, and
/// offsets are committed only once its files are durable.
#[derive(Debug, Parser)]
#[command(name = "audit-writer", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // Its own heap is on glibc's malloc too: two arenas, so tokio's threads share them.
    limit_malloc_arenas(2);
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: AuditWriterConfig| {
        AuditWriter::new(setup, config)
    })
}
