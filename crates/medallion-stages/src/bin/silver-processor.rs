//! silver-processor: `bronze.data.cleaned` → `silver.data.processed` (consumer group
//! `silver-processor`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::main_support::{limit_malloc_arenas, run_worker, WorkerArgs};
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

/// mimalloc's `mi_option_purge_delay`: in `mimalloc.h` the option just before
/// `mi_option_use_numa_nodes` (the bindings do not name it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// Gives freed memory back to the system at once instead of after mimalloc's delay (1 s in
/// the bundled v3): silver frees its batches' buffers between batches, and held that long they
/// are much of its resident size (peak RSS 364-371 → 283 MiB over a million new entities in
/// the state bench, CPU within the noise). Set only if the option reads as a delay (1 ms to
/// 10 s), so a renumbered option is left alone; `MIMALLOC_PURGE_DELAY` still overrides.
fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: plain getters and setters of mimalloc's options, no pointers involved.
    unsafe {
        if (1..=10_000).contains(&libmimalloc_sys::mi_option_get(PURGE_DELAY)) {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
        }
    }
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    // Its own heap is mimalloc's: glibc serves librdkafka alone, one arena is enough.
    limit_malloc_arenas(1);
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: SilverConfig| {
        Silver::new(setup, config)
    })
}
