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

/// Caps glibc's malloc at `arenas` arenas, before the worker starts its threads. glibc gives
/// each thread that contends for malloc an arena of its own (up to eight per core), and each
/// keeps its freed memory: librdkafka's threads and, in the workers on the system allocator,
/// tokio's. Over 1,000,000 new leads in the pipeline benchmark the workers' peak RSS went from
/// 171/271-275/137-143 MiB (bronze/silver/gold) to 157/258/143 with two arenas and 152/252/128
/// with one, their CPU within the noise. `MALLOC_ARENA_MAX` in the environment overrides it.
pub fn limit_malloc_arenas(arenas: i32) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets one of glibc's malloc parameters; no pointers involved.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
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
