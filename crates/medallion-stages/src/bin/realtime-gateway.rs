//! realtime-gateway: `rules.alerts.triggered`, `gold.data.ready` and `silver.data.processed` →
//! browsers and services over Server-Sent Events and WebSocket (consumer group
//! `realtime-gateway`, manual assignment: every replica reads every partition).

use std::process::ExitCode;

use clap::Parser;
use medallion_runtime::config::WorkerConfig;
use medallion_stages::gateway::{self, GatewayConfig, GROUP};
use medallion_stages::main_support::{
    limit_malloc_arenas, release_startup_code, run_service, shutdown_signal, WorkerArgs,
};

/// Every connection holds a few buffers of its own (hyper's 8 KiB read and write buffers,
/// the stream's state) that stay mostly untouched while it is idle: mimalloc leaves untouched
/// pages of them out of the resident set, where glibc's heap had 23-25 KiB resident per idle
/// connection in the gateway benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Pushes each org's alerts, tenant metrics and entity updates to the clients of that org,
/// authenticated by JWT, resumable from Kafka by each message's signed id.
#[derive(Debug, Parser)]
#[command(name = "realtime-gateway", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // Its own heap is mimalloc's: glibc serves librdkafka alone, one arena is enough.
    limit_malloc_arenas(1);
    let args = Args::parse();
    run_service(
        args.worker,
        |config: WorkerConfig<GatewayConfig>, health| async move {
            if let Err(e) = config.stage.validate() {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let running = match gateway::start(&config, health).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(group = GROUP, addr = %running.addr, "serving /v1/events, /v1/ws, /v1/tickets, /console");
            release_startup_code();
            shutdown_signal().await;
            tracing::info!("gateway stopped");
            ExitCode::SUCCESS
        },
    )
}
