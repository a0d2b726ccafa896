//! notification-sender: `rules.alerts.triggered` → webhooks and log lines (consumer group
//! `notification-sender`).

use std::process::ExitCode;

use clap::Parser;
use medallion_stages::main_support::{limit_malloc_arenas, run_worker, WorkerArgs};
use medallion_stages::notify::{Notify, NotifyConfig, GROUP};

/// Routes each alert by org and severity to its channels: signed webhooks (retried on 5xx,
/// 429 and timeouts with backoff, dead-lettered on other 4xx or when retries run out) and
/// structured log lines. A slow endpoint only delays its own alerts.
#[derive(Debug, Parser)]
#[command(name = "notification-sender", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // Its own heap is on glibc's malloc too: two arenas, so tokio's threads share them.
    limit_malloc_arenas(2);
    let args = Args::parse();
    run_worker(GROUP, args.worker, |setup, config: NotifyConfig| {
        Notify::new(setup, config)
    })
}
