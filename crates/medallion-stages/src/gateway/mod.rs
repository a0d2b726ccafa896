//! realtime-gateway: pushes an org's alerts, tenant metrics and entity updates to browsers and
//! services over Server-Sent Events (`GET /v1/events`) and WebSocket (`GET /v1/ws`).
//!
//! - **One consumer per replica**, assigned every partition of the feed topics (no group
//!   rebalancing: every replica reads everything, so replicas scale out behind any load
//!   balancer), starting at their end, fanned out in memory to the connections of each org.
//! - **Tenancy from the token**: the org comes from a claim of a verified JWT; a connection only
//!   ever gets its org's records.
//! - **Resume from Kafka**: every message's id is a signed cursor of Kafka positions; a client
//!   that comes back with it reads what it missed from Kafka itself, with an explicit `gap`
//!   message for what retention removed meanwhile.
//! - **Delivery per event type** (`hub`): alerts are never dropped (a client that falls behind
//!   is disconnected and resumes), metrics and entity updates are coalesced per key.

pub mod auth;
pub mod cursor;
pub mod feed;
pub mod http;
pub mod hub;
mod session;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medallion_contracts::registry::RegistryClient;
use medallion_runtime::config::WorkerConfig;
use medallion_runtime::http::{Condition, Health};
use medallion_runtime::kafka::{KafkaConnection, ReaderContext, Role};
use medallion_runtime::metrics as m;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use self::auth::{AuthConfig, Authenticator};
use self::cursor::{CursorCodec, Topology};
use self::feed::{Decoder, FeedConfig};
use self::hub::Hub;

/// The consumer group's name in topic-config.yaml, and so the binary's.
pub const GROUP: &str = "realtime-gateway";

/// realtime-gateway's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where clients connect (the operational endpoints stay on `http.listen`).
    pub listen: SocketAddr,
    pub auth: AuthConfig,
    /// Secret that signs cursors and tickets, at least 32 bytes; every replica behind one
    /// load balancer needs the same (`MEDALLION__STAGE__CURSOR_KEY`).
    pub cursor_key: Option<String>,
    /// Which topic feeds which event type.
    pub feeds: Vec<FeedConfig>,
    /// Messages a connection may have waiting; past it alerts disconnect, metrics coalesce.
    pub outbox_messages: usize,
    /// A heartbeat after this long without a message, so proxies keep the stream open.
    pub heartbeat_ms: u64,
    /// Connections this replica takes; beyond, 503.
    pub max_connections: usize,
    /// How long a resume may take to read back what a client missed.
    pub resume_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            auth: AuthConfig::default(),
            cursor_key: None,
            feeds: feed::default_feeds(),
            outbox_messages: 1_024,
            heartbeat_ms: 15_000,
            max_connections: 20_000,
            resume_timeout_ms: 30_000,
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Auth(#[from] auth::AuthSetupError),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), GatewayError> {
        feed::check_feeds(&self.feeds).map_err(GatewayError::Config)?;
        match self.cursor_key.as_deref() {
            None | Some("") => {
                return Err(GatewayError::Config(
                    "stage.cursor_key is not set (a secret of at least 32 bytes, the same on every replica)".into(),
                ))
            }
            Some(k) if k.len() < 32 => {
                return Err(GatewayError::Config(format!(
                    "stage.cursor_key is {} bytes, needs at least 32",
                    k.len()
                )))
            }
            Some(_) => {}
        }
        let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
        if !set(&self.auth.hs256_secret) && !set(&self.auth.jwks_url) {
            return Err(GatewayError::Config(
                "stage.auth: set hs256_secret or jwks_url (or both)".into(),
            ));
        }
        if self.outbox_messages == 0 || self.max_connections == 0 {
            return Err(GatewayError::Config(
                "stage.outbox_messages and stage.max_connections must be at least 1".into(),
            ));
        }
        if self.heartbeat_ms < 100 {
            return Err(GatewayError::Config(
                "stage.heartbeat_ms must be at least 100".into(),
            ));
        }
        Ok(())
    }
}

/// Everything the connections share.
pub struct Gateway {
    hub: Hub,
    auth: Authenticator,
    cursors: CursorCodec,
    decoder: Decoder,
    kafka: KafkaConnection,
    config: GatewayConfig,
    open: std::sync::atomic::AtomicUsize,
    /// Orgs with a label of their own on the connection gauge (bounded: the rest are `other`).
    labelled_orgs: Mutex<HashSet<i64>>,
    /// Messages sent, per feed (handles looked up once: a delivery is the hot path).
    sent: Vec<metrics::Counter>,
    latency: metrics::Histogram,
}

/// Orgs that get a label of their own on `medallion_gateway_connections`.
const LABELLED_ORGS: usize = 100;

impl Gateway {
    /// The label of `org` on the connection gauge.
    fn org_label(&self, org: i64) -> String {
        let mut orgs = self
            .labelled_orgs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if orgs.contains(&org) || (orgs.len() < LABELLED_ORGS && orgs.insert(org)) {
            org.to_string()
        } else {
            "other".into()
        }
    }

    /// Whether records of `slot` can feed any feed of `mask`.
    fn slot_feeds(&self, slot: usize, mask: u64) -> bool {
        let Some((topic, _)) = self.cursors.topology().at(slot) else {
            return false;
        };
        self.decoder
            .feeds()
            .iter()
            .enumerate()
            .any(|(i, f)| mask & (1 << i) != 0 && f.topic == topic)
    }

    /// Bit mask of the feeds named in `types` (comma-separated; all when absent).
    fn feed_mask(&self, types: Option<&str>) -> Result<u64, String> {
        let all = (1u64 << self.config.feeds.len()) - 1;
        let Some(types) = types.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(all);
        };
        let mut mask = 0;
        for name in types.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let feed = self
                .config
                .feeds
                .iter()
                .position(|f| f.event == name)
                .ok_or_else(|| {
                    let known: Vec<&str> =
                        self.config.feeds.iter().map(|f| f.event.as_str()).collect();
                    format!("unknown event type `{name}` (known: {})", known.join(", "))
                })?;
            mask |= 1 << feed;
        }
        Ok(mask)
    }
}

/// A running gateway: where it listens.
pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
}

/// Starts the gateway of `config`: checks the settings, fetches the JWKS, assigns the feed
/// topics at their end and serves clients. `health` becomes ready once the consumer is
/// assigned and the registry answered.
pub async fn start(
    config: &WorkerConfig<GatewayConfig>,
    health: Arc<Health>,
) -> Result<Running, GatewayError> {
    let stage = config.stage.clone();
    stage.validate()?;
    let kafka = config
        .kafka
        .connection()
        .map_err(|e| GatewayError::Kafka(e.to_string()))?;
    let registry = Arc::new(
        config
            .registry
            .client()
            .map_err(|e| GatewayError::Config(format!("registry.url: {e}")))?,
    );
    let key = stage.cursor_key.clone().unwrap_or_default();
    let auth = Authenticator::new(stage.auth.clone(), key.as_bytes()).await?;
    // The feeds' topics as named on the broker, with the deployment's prefix.
    let feeds: Vec<FeedConfig> = stage
        .feeds
        .iter()
        .map(|f| FeedConfig {
            topic: format!("{}{}", config.naming.prefix, f.topic),
            ..f.clone()
        })
        .collect();
    let mut topic_names: Vec<String> = feeds.iter().map(|f| f.topic.clone()).collect();
    topic_names.sort();
    topic_names.dedup();
    // The partitions and their ends, read before anything is served.
    let ends = {
        let kafka = kafka.clone();
        let names = topic_names.clone();
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .map(|t| {
                    medallion_runtime::kafka::io::watermarks(&kafka, t)
                        .map(|marks| (t.clone(), marks))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| GatewayError::Kafka(e.to_string()))?
        .map_err(|e| GatewayError::Kafka(e.to_string()))?
    };
    let topology = Topology::new(
        ends.iter()
            .map(|(t, marks)| (t.clone(), marks.len()))
            .collect(),
    );
    let policies = stage.feeds.iter().map(|f| f.delivery.policy()).collect();
    let hub = Hub::new(topology.slots(), policies, stage.outbox_messages);
    let mut assignment = TopicPartitionList::new();
    for (topic, marks) in &ends {
        for (partition, (_, high)) in marks {
            if let Some(slot) = topology.slot(topic, *partition) {
                hub.start_at(slot, *high);
                assignment
                    .add_partition_offset(topic, *partition, Offset::Offset(*high))
                    .map_err(|e| GatewayError::Kafka(e.to_string()))?;
            }
        }
    }
    let consumer = live_consumer(&kafka)?;
    consumer
        .assign(&assignment)
        .map_err(|e| GatewayError::Kafka(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(stage.listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: stage.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            addr: stage.listen,
            source,
        })?;
    let sent = stage
        .feeds
        .iter()
        .map(|f| metrics::counter!(m::GATEWAY_MESSAGES_SENT_TOTAL, "type" => f.event.clone()))
        .collect();
    let gateway = Arc::new(Gateway {
        hub,
        auth,
        cursors: CursorCodec::new(key.as_bytes(), topology),
        decoder: Decoder::new(registry.clone(), feeds),
        kafka,
        config: stage,
        open: std::sync::atomic::AtomicUsize::new(0),
        labelled_orgs: Mutex::new(HashSet::new()),
        sent,
        latency: metrics::histogram!(m::GATEWAY_DELIVERY_SECONDS),
    });
    register_metrics(&gateway);
    health.set_assigned(true);
    health.set_registry_ok(registry.subjects().await.is_ok());
    tokio::spawn(follow(gateway.clone(), consumer, health, registry));
    let app = http::router(gateway.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the gateway's HTTP server stopped");
        }
    });
    Ok(Running { addr, gateway })
}

/// Every series of the gateway at zero, so dashboards and alerts see them before the first
/// event of each kind.
fn register_metrics(gateway: &Gateway) {
    metrics::gauge!(m::GATEWAY_CONNECTIONS, "org" => "other").set(0.0);
    for reason in auth::Refusal::ALL {
        metrics::counter!(m::GATEWAY_AUTH_FAILURES_TOTAL, "reason" => reason.reason()).absolute(0);
    }
    for feed in gateway.decoder.feeds() {
        let kind = feed.event.clone();
        metrics::counter!(m::GATEWAY_MESSAGES_SENT_TOTAL, "type" => kind.clone()).absolute(0);
        metrics::counter!(m::GATEWAY_SLOW_DISCONNECTS_TOTAL, "type" => kind.clone()).absolute(0);
        for outcome in ["replaced", "dropped"] {
            metrics::counter!(m::GATEWAY_COALESCED_TOTAL, "type" => kind.clone(), "outcome" => outcome)
                .absolute(0);
        }
        metrics::counter!(m::GATEWAY_UNDECODABLE_TOTAL, "topic" => feed.topic.clone()).absolute(0);
    }
    for outcome in ["resumed", "gap", "refused", "failed"] {
        metrics::counter!(m::GATEWAY_RESUMES_TOTAL, "outcome" => outcome).absolute(0);
    }
    metrics::counter!(m::GATEWAY_RESUME_RECORDS_TOTAL).absolute(0);
}

/// The replica's one consumer: manual assignment (no group, nothing committed), fetches
/// answered as soon as a record is there (the gateway benchmark's floor uses the same).
pub fn live_consumer(
    kafka: &KafkaConnection,
) -> Result<StreamConsumer<ReaderContext>, GatewayError> {
    let group = format!("{GROUP}-{}", uuid::Uuid::new_v4());
    let mut config = kafka.config(Role::Reader {
        group: &group,
        until_end: false,
    });
    if kafka.property("fetch.wait.max.ms").is_none() {
        config.set("fetch.wait.max.ms", "50");
    }
    config
        .create_with_context(ReaderContext)
        .map_err(|e| GatewayError::Kafka(e.to_string()))
}

/// Reads the feed topics for as long as the process runs and fans each record out.
async fn follow(
    gateway: Arc<Gateway>,
    consumer: StreamConsumer<ReaderContext>,
    health: Arc<Health>,
    registry: Arc<RegistryClient>,
) {
    let mut failures = 0u32;
    loop {
        health.beat();
        let message = match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Err(_) => continue,
            Ok(Err(error)) => {
                failures += 1;
                health.set(Condition::BrokerUnreachable, failures >= 3);
                tracing::warn!(%error, "the gateway's consumer reported an error; carrying on");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Ok(Ok(message)) => message,
        };
        failures = 0;
        health.set(Condition::BrokerUnreachable, false);
        let topic = message.topic().to_string();
        let (partition, offset) = (message.partition(), message.offset());
        let Some(slot) = gateway.cursors.topology().slot(&topic, partition) else {
            continue;
        };
        let timestamp_ms = message.timestamp().to_millis().unwrap_or_default();
        let value = message.payload().map(<[u8]>::to_vec);
        drop(message);
        // The registry is infrastructure every record needs: wait for it, never skip.
        let messages = loop {
            match gateway
                .decoder
                .record(&topic, slot, offset, timestamp_ms, value.as_deref())
                .await
            {
                Ok(messages) => {
                    health.set_registry_ok(true);
                    break messages;
                }
                Err(error) => {
                    health.set_registry_ok(registry.subjects().await.is_ok());
                    tracing::warn!(%error, "the registry does not answer; the gateway waits");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    health.beat();
                }
            }
        };
        if messages.is_empty() {
            gateway.hub.advance(slot, offset);
        }
        for message in messages {
            let event_type = gateway.config.feeds[message.feed].event.clone();
            let counts = gateway.hub.dispatch(Arc::new(message));
            if counts.coalesced + counts.dropped > 0 {
                metrics::counter!(m::GATEWAY_COALESCED_TOTAL, "type" => event_type.clone(), "outcome" => "replaced")
                    .increment(u64::from(counts.coalesced));
                metrics::counter!(m::GATEWAY_COALESCED_TOTAL, "type" => event_type.clone(), "outcome" => "dropped")
                    .increment(u64::from(counts.dropped));
            }
            if counts.closed > 0 {
                metrics::counter!(m::GATEWAY_SLOW_DISCONNECTS_TOTAL, "type" => event_type)
                    .increment(u64::from(counts.closed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_key() {
        let good = GatewayConfig {
            cursor_key: Some("k".repeat(32)),
            auth: AuthConfig {
                hs256_secret: Some("s".into()),
                ..AuthConfig::default()
            },
            ..GatewayConfig::default()
        };
        assert!(good.validate().is_ok());
        let cases = [
            (
                GatewayConfig {
                    cursor_key: None,
                    ..good.clone()
                },
                "stage.cursor_key",
            ),
            (
                GatewayConfig {
                    cursor_key: Some("short".into()),
                    ..good.clone()
                },
                "needs at least 32",
            ),
            (
                GatewayConfig {
                    auth: AuthConfig {
                        hs256_secret: Some(String::new()),
                        ..AuthConfig::default()
                    },
                    ..good.clone()
                },
                "stage.auth",
            ),
            (
                GatewayConfig {
                    outbox_messages: 0,
                    ..good.clone()
                },
                "stage.outbox_messages",
            ),
            (
                GatewayConfig {
                    feeds: Vec::new(),
                    ..good.clone()
                },
                "stage.feeds",
            ),
        ];
        for (config, says) in cases {
            let err = config.validate().expect_err(says).to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}
