//! What every worker binary's `main` shares: flags, config, logging, HTTP, signals.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use medallion_runtime::config::WorkerConfig;
use medallion_runtime::http::Health;
use medallion_runtime::worker::{prepare, Stage, StageSetup};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Flags of every worker.
#[derive(Debug, clap::Parser)]
pub struct WorkerArgs {
    /// YAML config file; every key can be overridden by `MEDALLION__SECTION__KEY`.
    #[arg(long, short, env = "MEDALLION_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    pub json_logs: bool,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the worker of `group` until SIGTERM/SIGINT.
pub fn run_worker<S, C, F, Fut>(group: &str, args: WorkerArgs, make_stage: F) -> ExitCode
where
    S: Stage,
    C: Default + Serialize + DeserializeOwned + Clone + Send + 'static,
    F: FnOnce(StageSetup, C) -> Fut,
    Fut: Future<Output = Result<S, medallion_runtime::error::SetupError>>,
{
    init_logging(args.json_logs);
    let config = match WorkerConfig::<C>::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let metrics = medallion_runtime::metrics::install();
        let health = Health::new();
        match medallion_runtime::http::serve(config.http.listen, health.clone(), metrics).await {
            Ok(addr) => tracing::info!(%addr, "serving /metrics, /healthz, /readyz"),
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", config.http.listen);
                return ExitCode::FAILURE;
            }
        }
        let stage_config = config.stage.clone();
        let worker = match prepare(&config, group, health, |setup| {
            make_stage(setup, stage_config)
        })
        .await
        {
            Ok(w) => w,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            group,
            input = worker.input_topic(),
            output = ?worker.output_topic(),
            "worker started"
        );
        match worker.run(&config, shutdown_signal()).await {
            Ok(totals) => {
                tracing::info!(?totals, "worker stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
