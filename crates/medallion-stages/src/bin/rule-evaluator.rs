//! rule-evaluator: `gold.data.ready` → `rules.alerts.triggered` (consumer group
//! `rule-evaluator`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::main_support::{limit_malloc_arenas, run_worker, WorkerArgs};
use medallion_stages::rules::{Rules, RulesConfig, GROUP};

/// Evaluates the rule set (a file, hot-reloaded from config.changes) over gold records and
/// writes alerts to rules.alerts.triggered.
#[derive(Debug, Parser)]
#[command(name = "rule-evaluator", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // Its own heap is on glibc's malloc too: two arenas, so tokio's threads share them.
    limit_malloc_arenas(2);
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: RulesConfig| {
        Rules::new(setup, config)
    })
}
