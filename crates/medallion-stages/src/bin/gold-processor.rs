//! gold-processor: `silver.data.processed` → `gold.data.ready` (consumer group
//! `gold-processor`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::gold::{Gold, GoldConfig, GROUP};
use medallion_stages::main_support::{limit_malloc_arenas, run_worker, WorkerArgs};

/// Aggregates silver events into event-time tumbling windows per org and metric, emitted
/// once to gold.data.ready when the watermark passes their end; late events go to the DLQ.
#[derive(Debug, Parser)]
#[command(name = "gold-processor", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // Its own heap is on glibc's malloc too: two arenas, so tokio's threads share them.
    limit_malloc_arenas(2);
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: GoldConfig| {
        Gold::new(setup, config)
    })
}
