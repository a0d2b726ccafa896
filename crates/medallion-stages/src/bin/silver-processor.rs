//! silver-processor: `bronze.data.cleaned` → `silver.data.processed` (consumer group
//! `silver-processor`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::main_support::{run_worker, WorkerArgs};
use medallion_stages::silver::{Silver, SilverConfig, GROUP};

/// silver allocates and frees small buffers per event (entity keys and states, changelog and
/// drift-audit records): under glibc malloc a third of its samples were in `malloc`, `free` and
/// `malloc_consolidate`, and mimalloc took it from ~49k to 66k-92k events per CPU-second in the
/// replay benchmark. bronze and gold measured no better with it (and ~40 MiB more resident),
/// so they keep the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
