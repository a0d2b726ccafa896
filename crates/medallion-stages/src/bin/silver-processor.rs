//! silver-processor: `bronze.data.cleaned` → `silver.data.processed` (consumer group
//! `silver-processor`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::main_support::{run_worker, WorkerArgs};
use medallion_stages::silver::{Silver, SilverConfig, GROUP};

/// Conforms bronze events to the entity model, applies data-quality expectations and merges
/// per entity (latest updated_at wins, drift recorded) into silver.data.processed.
#[derive(Debug, Parser)]
#[command(name = "silver-processor", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: SilverConfig| {
        Silver::new(setup, config)
    })
}
