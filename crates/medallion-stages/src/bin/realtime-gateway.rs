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

/// Pushes each org's alerts, tenant metrics and entity updates to the clients of that org,
/// authenticated by JWT, resumable from Kafka by each message's signed id.
#[derive(Debug, Parser)]
#[command(name = "realtime-gateway", version, about)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    limit_malloc_arenas(2);
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
