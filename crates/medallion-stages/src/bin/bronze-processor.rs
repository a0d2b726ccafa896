//! bronze-processor: `connector.data.raw` → `bronze.data.cleaned` (consumer group
//! `bronze-processor`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::bronze::{Bronze, BronzeConfig, GROUP};
use medallion_stages::main_support::{limit_malloc_arenas, run_worker, WorkerArgs};

/// Validates, normalizes and deduplicates raw connector events into bronze.data.cleaned.
#[derive(Debug, Parser)]
#[command(name = "bronze-processor", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // Its own heap is on glibc's malloc too: two arenas, so tokio's threads share them.
    limit_malloc_arenas(2);
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: BronzeConfig| {
        Bronze::new(setup, config)
    })
}
