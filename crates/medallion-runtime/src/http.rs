//! Per-worker HTTP: `/metrics` (Prometheus text), `/healthz` (the processing loop is alive),
//! `/readyz` (partitions assigned and the registry answered).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

/// Shared health state, written by the worker loop.
#[derive(Debug, Default)]
pub struct Health {
    assigned: AtomicBool,
    registry_ok: AtomicBool,
    last_beat_ms: AtomicU64,
}

fn now_ms() -> u64 {
    u64::try_from(crate::clock::now_ms()).unwrap_or_default()
}

/// The loop is considered dead if it has not beaten for this long.
const STALL: Duration = Duration::from_secs(120);

impl Health {
    pub fn new() -> Arc<Self> {
        let health = Arc::new(Self::default());
        health.beat();
        health
    }

    /// The processing loop is alive.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn set_assigned(&self, assigned: bool) {
        self.assigned.store(assigned, Ordering::Relaxed);
        self.publish();
    }

    pub fn set_registry_ok(&self, ok: bool) {
        self.registry_ok.store(ok, Ordering::Relaxed);
        self.publish();
    }

    fn publish(&self) {
        metrics::gauge!(crate::metrics::WORKER_READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }

    pub fn is_ready(&self) -> bool {
        self.assigned.load(Ordering::Relaxed) && self.registry_ok.load(Ordering::Relaxed)
    }

    pub fn is_alive(&self) -> bool {
        now_ms().saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            < STALL.as_millis() as u64
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

async fn metrics_page(State(state): State<AppState>) -> String {
    state.metrics.run_upkeep();
    state.metrics.render()
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.is_alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "processing loop stalled\n")
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else if !state.health.registry_ok.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "schema registry not reachable yet\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no partitions assigned yet\n",
        )
    }
}

/// Binds `listen` and serves until the process ends. Returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, metrics });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(addr)
}
