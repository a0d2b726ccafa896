//! Per-worker HTTP: `/metrics` (Prometheus text), `/healthz` (the processing loop is alive),
//! `/readyz` (the worker can make progress: see [`Condition`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

/// Why a worker cannot make progress now: each is a reason `/readyz` answers 503 and, but
/// for [`Condition::NoPartitions`], a `medallion_worker_degraded{reason}` of 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The group has given this worker no partition (yet).
    NoPartitions,
    /// The schema registry does not answer; consumption is paused.
    RegistryUnavailable,
    /// Requests to the broker fail or go unanswered (refused, reset, black-holed).
    BrokerUnreachable,
    /// The broker refused records; they are being sent again and consumption is paused.
    DeliveriesRefused,
    /// Records are out and none has been acknowledged for a while.
    DeliveriesStalled,
    /// The group went on without this worker (its session expired); it has not rejoined yet.
    AssignmentLost,
    /// Partitions are assigned whose state (dedup window, what was produced after the last
    /// commit, the stage's own state) is still being rebuilt: nothing of them is processed yet.
    Restoring,
}

impl Condition {
    pub const ALL: [Condition; 7] = [
        Condition::NoPartitions,
        Condition::RegistryUnavailable,
        Condition::BrokerUnreachable,
        Condition::DeliveriesRefused,
        Condition::DeliveriesStalled,
        Condition::AssignmentLost,
        Condition::Restoring,
    ];

    /// The `reason` label of `medallion_worker_degraded`.
    pub fn reason(self) -> &'static str {
        match self {
            Condition::NoPartitions => "no_partitions",
            Condition::RegistryUnavailable => "registry_unavailable",
            Condition::BrokerUnreachable => "broker_unreachable",
            Condition::DeliveriesRefused => "deliveries_refused",
            Condition::DeliveriesStalled => "deliveries_stalled",
            Condition::AssignmentLost => "assignment_lost",
            Condition::Restoring => "restoring_state",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Condition::NoPartitions => "no partitions assigned",
            Condition::RegistryUnavailable => "schema registry not answering",
            Condition::BrokerUnreachable => "broker unreachable",
            Condition::DeliveriesRefused => "broker refusing records (sending them again)",
            Condition::DeliveriesStalled => "records unacknowledged by the broker",
            Condition::AssignmentLost => "the group's session expired; not rejoined yet",
            Condition::Restoring => "restoring the state of assigned partitions",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Shared health state, written by the worker loop, its rebalance hooks and its broker probe.
#[derive(Debug)]
pub struct Health {
    /// The [`Condition`]s that hold, one bit each.
    conditions: AtomicU8,
    last_beat_ms: AtomicU64,
}

fn now_ms() -> u64 {
    u64::try_from(crate::clock::now_ms()).unwrap_or_default()
}

/// The loop is considered dead if it has not beaten for this long.
const STALL: Duration = Duration::from_secs(120);

impl Health {
    /// A worker starting: no partitions yet, the registry not reached yet.
    pub fn new() -> Arc<Self> {
        let health = Arc::new(Self {
            conditions: AtomicU8::new(
                Condition::NoPartitions.bit() | Condition::RegistryUnavailable.bit(),
            ),
            last_beat_ms: AtomicU64::new(0),
        });
        health.beat();
        health.publish();
        health
    }

    /// The processing loop is alive.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `condition` holds (`true`) or no longer does.
    pub fn set(&self, condition: Condition, holds: bool) {
        let before = if holds {
            self.conditions.fetch_or(condition.bit(), Ordering::Relaxed)
        } else {
            self.conditions
                .fetch_and(!condition.bit(), Ordering::Relaxed)
        };
        if (before & condition.bit() != 0) != holds {
            self.publish();
        }
    }

    pub fn set_assigned(&self, assigned: bool) {
        self.set(Condition::NoPartitions, !assigned);
    }

    pub fn set_registry_ok(&self, ok: bool) {
        self.set(Condition::RegistryUnavailable, !ok);
    }

    /// The conditions that hold now.
    pub fn conditions(&self) -> Vec<Condition> {
        let bits = self.conditions.load(Ordering::Relaxed);
        Condition::ALL
            .into_iter()
            .filter(|c| bits & c.bit() != 0)
            .collect()
    }

    fn publish(&self) {
        let holding = self.conditions();
        metrics::gauge!(crate::metrics::WORKER_READY).set(if holding.is_empty() {
            1.0
        } else {
            0.0
        });
        for condition in Condition::ALL {
            if condition != Condition::NoPartitions {
                metrics::gauge!(crate::metrics::WORKER_DEGRADED, "reason" => condition.reason())
                    .set(if holding.contains(&condition) {
                        1.0
                    } else {
                        0.0
                    });
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.conditions.load(Ordering::Relaxed) == 0
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

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let holding = state.health.conditions();
    if holding.is_empty() {
        return (StatusCode::OK, "ready\n".into());
    }
    let reasons: Vec<&str> = holding.iter().map(|c| c.describe()).collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}\n", reasons.join("; ")),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_no_condition_holds_and_each_reason_is_named() {
        let health = Health::new();
        assert!(!health.is_ready(), "a starting worker is not ready");
        assert_eq!(
            health.conditions(),
            [Condition::NoPartitions, Condition::RegistryUnavailable]
        );
        health.set_registry_ok(true);
        health.set_assigned(true);
        assert!(health.is_ready());
        health.set(Condition::BrokerUnreachable, true);
        health.set(Condition::DeliveriesStalled, true);
        assert!(!health.is_ready());
        assert_eq!(
            health.conditions(),
            [Condition::BrokerUnreachable, Condition::DeliveriesStalled]
        );
        health.set(Condition::BrokerUnreachable, false);
        health.set(Condition::BrokerUnreachable, false);
        assert_eq!(health.conditions(), [Condition::DeliveriesStalled]);
        health.set(Condition::DeliveriesStalled, false);
        assert!(health.is_ready());
        let reasons: Vec<&str> = Condition::ALL.iter().map(|c| c.reason()).collect();
        assert_eq!(
            reasons,
            [
                "no_partitions",
                "registry_unavailable",
                "broker_unreachable",
                "deliveries_refused",
                "deliveries_stalled",
                "assignment_lost",
                "restoring_state"
            ]
        );
        // Assigned but still rebuilding: not ready yet.
        health.set(Condition::Restoring, true);
        assert!(!health.is_ready());
        assert_eq!(health.conditions(), [Condition::Restoring]);
        assert_eq!(
            Condition::Restoring.describe(),
            "restoring the state of assigned partitions"
        );
    }

    #[tokio::test]
    async fn readyz_says_why_not_and_metrics_show_the_reason() {
        let metrics = crate::metrics::install();
        let health = Health::new();
        health.set_registry_ok(true);
        health.set_assigned(true);
        let addr = serve(
            "127.0.0.1:0".parse().expect("addr"),
            health.clone(),
            metrics,
        )
        .await
        .expect("serves");
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move {
                let r = reqwest::get(url).await.expect("answers");
                (r.status().as_u16(), r.text().await.expect("body"))
            }
        };
        assert_eq!(get("/readyz").await, (200, "ready\n".to_string()));
        health.set(Condition::BrokerUnreachable, true);
        let (status, body) = get("/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: broker unreachable\n")
        );
        let (_, page) = get("/metrics").await;
        assert!(
            page.lines()
                .any(|l| l.starts_with(crate::metrics::WORKER_DEGRADED)
                    && l.contains("reason=\"broker_unreachable\"")
                    && l.ends_with(" 1")),
            "{page}"
        );
        health.set(Condition::BrokerUnreachable, false);
        assert_eq!(get("/readyz").await.0, 200);
    }
}
