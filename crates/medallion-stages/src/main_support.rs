//! What every worker binary's `main` shares: flags, config, logging, HTTP, signals.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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

/// Turns transparent huge pages off for this process, before the worker starts. mimalloc
/// (silver's heap) asks for huge pages on its whole arena (`MADV_HUGEPAGE`), and where the
/// kernel grants them a 2 MiB page is resident as soon as one byte of it is used and stays
/// resident until all of it is free: in the state benchmark (5,000,000 new entities, THP in
/// `madvise` mode) 38 MiB of silver's heap was in huge pages 10 s after start and 94 MiB at
/// the end. Where THP is `always`, glibc's heap (the other workers', librdkafka's) would be
/// too. What this costs is TLB misses; no CPU cost showed in the state, replay and pipeline
/// benchmarks (the README's state-store section has the figures).
/// `MEDALLION_TRANSPARENT_HUGE_PAGES=system` leaves them as the system sets them. Returns
/// whether they are off (false where this is not Linux).
pub fn disable_transparent_huge_pages() -> bool {
    if std::env::var("MEDALLION_TRANSPARENT_HUGE_PAGES").as_deref() == Ok("system") {
        return false;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: sets a flag of this process; no pointers involved.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Gives back the pages of the worker's own executable that its start touched, once it has
/// started: setting up DataFusion's session and plans, the clients and the registry runs code
/// from all over a ~130 MB text, and the kernel maps each such page with its neighbours (fault
/// around), so every worker held ~62 MiB of its binary resident before its first record and
/// used only a fraction of it afterwards (RssFile 61.8 MiB at start, 66.4 MiB at the end of a
/// 400,000-event replay). The pages stay in the page cache; the code a worker runs from then
/// on is mapped again at its first use, without reading the disk. Only read-only mappings of
/// the executable with no private (copied-on-write) page are released, so nothing but page
/// table entries is dropped: what a later access reads is the file's own, unchanged content.
/// Returns the KiB released (0 where this is not Linux or `/proc` cannot be read).
pub fn release_startup_code() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
            return 0;
        };
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        let mut released = 0;
        for mapping in read_only_mappings_of(&smaps, &exe.to_string_lossy()) {
            // SAFETY: `mapping` is a read-only private mapping of our own executable with no
            // private page: MADV_DONTNEED only drops its page table entries, and the next
            // access maps the file's unchanged page again.
            let dropped = unsafe {
                libc::madvise(
                    mapping.start as *mut libc::c_void,
                    mapping.end - mapping.start,
                    libc::MADV_DONTNEED,
                )
            };
            if dropped == 0 {
                released += mapping.rss_kib;
            }
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// A mapping of `/proc/self/smaps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    rss_kib: u64,
}

/// The mappings of `path` in `smaps` that are neither writable nor hold a private page.
fn read_only_mappings_of(smaps: &str, path: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read: its range, whether it qualifies so far, its Rss.
    let mut current: Option<(Mapping, bool)> = None;
    let finish = |current: Option<(Mapping, bool)>, out: &mut Vec<Mapping>| {
        if let Some((mapping, true)) = current {
            out.push(mapping);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-').and_then(|(s, e)| {
            Some((
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            ))
        }) {
            finish(current.take(), &mut out);
            let perms = fields.next().unwrap_or_default();
            let named = fields.nth(3).is_some_and(|p| p == path);
            let read_only = perms.starts_with('r') && perms.get(1..2) == Some("-");
            current = Some((
                Mapping {
                    start,
                    end,
                    rss_kib: 0,
                },
                named && read_only,
            ));
            continue;
        }
        let Some((mapping, qualifies)) = current.as_mut() else {
            continue;
        };
        let value = fields.next().and_then(|v| v.parse::<u64>().ok());
        match (first, value) {
            ("Rss:", Some(kib)) => mapping.rss_kib = kib,
            ("Anonymous:", Some(kib)) if kib > 0 => *qualifies = false,
            _ => {}
        }
    }
    finish(current, &mut out);
    out
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
    run_service(args, |config: WorkerConfig<C>, health| async move {
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
        let released = release_startup_code();
        tracing::debug!(kib = released, "executable pages touched at start released");
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

/// What every worker process does around its own work: logging, its config (exit 2 with the
/// reason when it is rejected), the async runtime, the metrics recorder and `/metrics`,
/// `/healthz`, `/readyz` on `http.listen`; then `body` with the config and the health it
/// reports through, until it returns.
pub fn run_service<C, B, Fut>(args: WorkerArgs, body: B) -> ExitCode
where
    C: Default + Serialize + DeserializeOwned,
    B: FnOnce(WorkerConfig<C>, Arc<Health>) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    init_logging(args.json_logs);
    if !disable_transparent_huge_pages() {
        tracing::debug!("transparent huge pages left as the system sets them");
    }
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
    let code = runtime.block_on(async move {
        let metrics = medallion_runtime::metrics::install();
        let health = Health::new();
        match medallion_runtime::http::serve(config.http.listen, health.clone(), metrics).await {
            Ok(addr) => tracing::info!(%addr, "serving /metrics, /healthz, /readyz"),
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", config.http.listen);
                return ExitCode::FAILURE;
            }
        }
        body(config, health).await
    });
    // The worker has committed and left its group within `kafka.stop_timeout_ms`, or given up
    // on it; a blocking call still going (a consumer's close the broker never answers) is not
    // waited for: the process exits and it ends with it.
    runtime.shutdown_timeout(LINGER_AT_EXIT);
    code
}

/// How long the process waits at exit for blocking calls the worker no longer waits for.
const LINGER_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a1000000 r--p 00000000 fd:01 123 /opt/bin/worker
Size:              16384 kB
Rss:                 900 kB
Anonymous:             0 kB
55d0a1000000-55d0a8000000 r-xp 01000000 fd:01 123 /opt/bin/worker
Size:             114688 kB
Rss:               47000 kB
Anonymous:             0 kB
55d0a8000000-55d0a8400000 r--p 08000000 fd:01 123 /opt/bin/worker
Size:               4096 kB
Rss:                4096 kB
Anonymous:          4000 kB
55d0a8400000-55d0a8500000 rw-p 08400000 fd:01 123 /opt/bin/worker
Rss:                  64 kB
Anonymous:            64 kB
55d0a8500000-55d0a8600000 r-xp 00000000 fd:01 456 /usr/lib/libc.so.6
Rss:                1000 kB
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  20 kB
Anonymous:            20 kB
";

    #[test]
    fn only_the_executables_read_only_mappings_without_private_pages_are_released() {
        let got = read_only_mappings_of(SMAPS, "/opt/bin/worker");
        assert_eq!(
            got,
            vec![
                Mapping {
                    start: 0x55d0a0000000,
                    end: 0x55d0a1000000,
                    rss_kib: 900
                },
                Mapping {
                    start: 0x55d0a1000000,
                    end: 0x55d0a8000000,
                    rss_kib: 47000
                },
            ],
            "the relocated read-only data (private pages), the writable data and another file's code stay"
        );
        assert!(read_only_mappings_of(SMAPS, "/opt/bin/other").is_empty());
        assert!(read_only_mappings_of("", "/opt/bin/worker").is_empty());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn transparent_huge_pages_are_turned_off_for_the_process() {
        assert!(disable_transparent_huge_pages());
        // SAFETY: reads a flag of this process.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1);
    }

    #[test]
    fn released_code_runs_again() {
        let released = release_startup_code();
        // Whatever was released, the code that follows runs (mapped again from the file).
        let sum: u64 = (1..=100u64).map(|n| n * n).sum();
        assert_eq!(sum, 338_350);
        #[cfg(target_os = "linux")]
        assert!(released > 0, "a test binary has code resident");
    }
}
