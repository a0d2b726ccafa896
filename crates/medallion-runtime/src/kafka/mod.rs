//! Kafka for every Medallion process: client construction with the settings each role
//! relies on ([`KafkaConnection`], [`Role`]), the flight producer ([`BatchProducer`]) and the
//! reads and writes written once ([`io`]).

pub mod io;
mod producer;

pub use producer::{
    BatchFailures, BatchProducer, BatchRecord, FlightId, Flights, Landed, MarkedSender, Marks,
    Placement,
};

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientContext;

/// Why a Kafka client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot create Kafka {kind} for {bootstrap}: {source}{}", operator_properties(.properties))]
pub struct ClientError {
    pub kind: &'static str,
    pub bootstrap: String,
    pub source: Box<rdkafka::error::KafkaError>,
    /// The properties the operator set (kafka.properties, MEDALLION_KAFKA_PROPERTIES, -X),
    /// secrets masked: librdkafka's message often names only the value it refused.
    pub properties: Vec<(String, String)>,
}

fn operator_properties(properties: &[(String, String)]) -> String {
    if properties.is_empty() {
        return String::new();
    }
    let listed: Vec<String> = properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(" (properties set by the operator: {})", listed.join(", "))
}

/// Whether a property's value is a credential that must not appear in an error message.
fn is_secret(key: &str) -> bool {
    ["password", "secret", "key", "token", "jaas"]
        .iter()
        .any(|word| key.contains(word))
}

/// Why the Kafka connection settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("the Kafka bootstrap servers are empty")]
    NoBootstrap,
    #[error(
        "Kafka property `{key}` cannot be set in kafka.properties, MEDALLION_KAFKA_PROPERTIES \
         or -X: Medallion sets it itself ({why}); please delete it"
    )]
    Owned { key: String, why: &'static str },
}

/// Properties the runtime sets on its clients, with the reason an operator may not: the
/// at-least-once accounting, the key-to-partition mapping and the typed settings depend on them.
const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use kafka.bootstrap or --bootstrap"),
    ("metadata.broker.list", "use kafka.bootstrap or --bootstrap"),
    (
        "group.id",
        "derived from the worker's group and naming.prefix",
    ),
    (
        "enable.auto.commit",
        "offsets are stored only once their outputs are acknowledged",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored only once their outputs are acknowledged",
    ),
    (
        "auto.commit.interval.ms",
        "offsets are stored only once their outputs are acknowledged",
    ),
    (
        "auto.offset.reset",
        "a new group starts from the earliest record so none is skipped",
    ),
    (
        "enable.partition.eof",
        "each reader decides where a partition ends",
    ),
    (
        "partition.assignment.strategy",
        "the rebalance callbacks assume cooperative-sticky",
    ),
    ("session.timeout.ms", "use kafka.session_timeout_ms"),
    (
        "enable.idempotence",
        "producers are idempotent so a retry never duplicates",
    ),
    (
        "acks",
        "a record counts as delivered only when every in-sync replica has it",
    ),
    (
        "partitioner",
        "keys map to partitions like the Java client's (murmur2)",
    ),
    ("message.timeout.ms", "use kafka.produce_timeout_ms"),
    ("delivery.timeout.ms", "use kafka.produce_timeout_ms"),
    ("isolation.level", "outputs are read as produced"),
    (
        "group.instance.id",
        "use kafka.instance_id: it belongs to the stage's consumer alone",
    ),
];

/// Whether `id` can be a static member's `group.instance.id`: Kafka allows at most 249 of
/// ASCII letters, digits, `.`, `_` and `-` (a pod name qualifies).
pub fn check_instance_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty (leave it unset for dynamic membership)".into());
    }
    if id.len() > 249 {
        return Err(format!("{} characters, at most 249", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{id}` has `{c}`; only letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// What a client is for; each role owns the settings its guarantees rest on.
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// A stage worker's consumer: stores offsets itself, librdkafka commits what is stored.
    StageConsumer {
        group: &'a str,
        session_timeout_ms: u32,
        /// Static membership: this replica's lasting id (`kafka.instance_id`).
        instance_id: Option<&'a str>,
    },
    /// An idempotent producer keyed like the Java client.
    Producer { message_timeout_ms: u64 },
    /// Topic administration.
    Admin,
    /// A tool or state reader: assigns partitions itself and never commits on its own;
    /// `until_end` reports the end of each partition.
    Reader { group: &'a str, until_end: bool },
}

/// How every Medallion process reaches Kafka: the bootstrap servers and the operator's extra
/// librdkafka properties (TLS, SASL, client tuning), applied to every client it builds. A
/// property the runtime owns is refused when the connection is made, never overwritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConnection {
    bootstrap: String,
    properties: BTreeMap<String, String>,
}

impl KafkaConnection {
    pub fn new(
        bootstrap: &str,
        properties: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConnectionError> {
        if bootstrap.trim().is_empty() {
            return Err(ConnectionError::NoBootstrap);
        }
        let properties: BTreeMap<String, String> = properties.into_iter().collect();
        if let Some((key, why)) = OWNED.iter().find(|(key, _)| properties.contains_key(*key)) {
            return Err(ConnectionError::Owned {
                key: key.to_string(),
                why,
            });
        }
        Ok(Self {
            bootstrap: bootstrap.trim().to_string(),
            properties,
        })
    }

    /// A connection with no extra properties.
    pub fn plain(bootstrap: &str) -> Result<Self, ConnectionError> {
        Self::new(bootstrap, [])
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The operator's value of `key`, if set.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// The settings of a client in `role`: the operator's properties, the runtime's defaults
    /// where the operator set nothing, and the role's own settings.
    pub fn config(&self, role: Role<'_>) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        let mut default = |key: &str, value: &str| {
            if !self.properties.contains_key(key) {
                config.set(key, value);
            }
        };
        // librdkafka backs off reconnecting to an unreachable broker exponentially, up to 10 s
        // by default: after an outage of that length a client found the broker back up to
        // 10 s late. 1 s bounds that wait; a connection attempt costs the broker little.
        default("reconnect.backoff.max.ms", "1000");
        match role {
            // librdkafka prefetches up to 64 MiB by default. 32 MiB keeps the replay
            // benchmark's stages as fast (16 MiB halved gold's rate: its records are larger).
            Role::StageConsumer { .. } => {
                default("queued.max.messages.kbytes", "32768");
                // librdkafka also keeps up to 100,000 messages per partition queued, each with
                // a few hundred bytes of bookkeeping the kbytes bound does not count. 30,000
                // is what a fair head reads past between two batches while a burst arrives:
                // at 10,000 it fell behind a burst of 350,000 records/s on one partition (the
                // other orgs' p99 ~650 ms against ~290 ms at 30,000). The kbytes bound, over
                // all partitions, holds first with more than a few partitions assigned.
                default("queued.min.messages", "30000");
                // A fetch brings up to 1 MiB of a partition by default: a head reading past a
                // backlog of 1,000,000 records at the start took 0.65-1.0 s, at 4 MiB 0.62-0.66
                // s. A response stays within 16 MiB over all partitions (50 MiB by default), so
                // a worker far behind on all of them holds little more than before.
                default("max.partition.fetch.bytes", "4194304");
                default("fetch.max.bytes", "16777216");
                // A partition over either bound waits this long before its next fetch: 1 s by
                // default, which a queue this short empties well before.
                default("fetch.queue.backoff.ms", "20");
                // An input topic created after the worker started (or partitions added) is
                // seen within 10 s rather than librdkafka's 5 min.
                default("topic.metadata.refresh.interval.ms", "10000");
            }
            Role::Producer { .. } => default("linger.ms", "5"),
            // A reader to the end learns it is there when a fetch comes back empty: not after
            // the 500 ms a broker may hold an empty fetch by default (a worker's partition
            // rebuild makes several such reads).
            // Readers restore and follow state topics beside a worker's own consumer: 16 MiB
            // of prefetch each instead of 64 MiB keeps a stateful worker's memory bounded.
            // State topics carry small records (an owner claim is ~100 bytes): the message count,
            // not the kbytes, bounds their bookkeeping (16 MiB of claims queued took ~35 MiB).
            Role::Reader { until_end, .. } => {
                if until_end {
                    default("fetch.wait.max.ms", "20");
                }
                default("queued.max.messages.kbytes", "16384");
                default("queued.min.messages", "2000");
                default("fetch.queue.backoff.ms", "20");
            }
            Role::Admin => {}
        }
        match role {
            Role::StageConsumer {
                group,
                session_timeout_ms,
                instance_id,
            } => {
                if let Some(id) = instance_id {
                    config.set("group.instance.id", id);
                }
                config
                    .set("group.id", group)
                    .set("enable.auto.commit", "true")
                    .set("auto.commit.interval.ms", "1000")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", "earliest")
                    .set("session.timeout.ms", session_timeout_ms.to_string())
                    .set("partition.assignment.strategy", "cooperative-sticky")
            }
            Role::Producer { message_timeout_ms } => config
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("partitioner", "murmur2_random")
                .set("message.timeout.ms", message_timeout_ms.to_string()),
            Role::Admin => &mut config,
            Role::Reader { group, until_end } => config
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("enable.partition.eof", until_end.to_string()),
        };
        config
    }

    /// Builds a client of type `T` in `role`; `kind` names it in the error.
    pub fn create<T: rdkafka::config::FromClientConfig>(
        &self,
        role: Role<'_>,
        kind: &'static str,
    ) -> Result<T, ClientError> {
        self.config(role)
            .create()
            .map_err(|source| self.error(kind, source))
    }

    /// Builds a client of type `T` with `context` in `role`.
    pub fn create_with_context<C, T>(
        &self,
        role: Role<'_>,
        kind: &'static str,
        context: C,
    ) -> Result<T, ClientError>
    where
        C: ClientContext,
        T: rdkafka::config::FromClientConfigAndContext<C>,
    {
        self.config(role)
            .create_with_context(context)
            .map_err(|source| self.error(kind, source))
    }

    fn error(&self, kind: &'static str, source: KafkaError) -> ClientError {
        ClientError {
            kind,
            bootstrap: self.bootstrap.clone(),
            source: Box::new(source),
            properties: self
                .properties
                .iter()
                .map(|(k, v)| {
                    let shown = if is_secret(k) {
                        "***".to_string()
                    } else {
                        v.clone()
                    };
                    (k.clone(), shown)
                })
                .collect(),
        }
    }
}

/// The context of a reader that reads partitions to their end: the end of a partition is news
/// it asked for, not an error (rdkafka's default context logs it at ERROR level).
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::PartitionEOF(partition) => {
                tracing::debug!(partition, "reached the end of a partition")
            }
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => {
                tracing::debug!(reason, "reached the end of a partition")
            }
            error => tracing::warn!(%error, reason, "Kafka client error"),
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// An idempotent producer keyed by `org_id`, partitioned like the Java client (murmur2), so
/// Java and Rust producers put an org on the same partition.
pub fn producer(kafka: &KafkaConnection) -> Result<FutureProducer, ClientError> {
    kafka.create(
        Role::Producer {
            message_timeout_ms: 30_000,
        },
        "producer",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_client_librdkafka_refuses_is_reported_with_the_operators_properties_secrets_masked() {
        let kafka = KafkaConnection::new(
            "127.0.0.1:9",
            props(&[
                ("security.protocol", "SASL_PLAINTEXT"),
                ("sasl.mechanisms", "NO-SUCH-MECHANISM"),
                ("sasl.password", "hunter2"),
            ]),
        )
        .expect("valid connection");
        let Err(error) = kafka
            .create::<rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>>(
                Role::Admin,
                "admin client",
            )
        else {
            panic!("librdkafka accepted an unknown SASL mechanism");
        };
        let message = error.to_string();
        assert!(message.contains("NO-SUCH-MECHANISM"), "{message}");
        assert!(
            message.contains("sasl.mechanisms=NO-SUCH-MECHANISM"),
            "{message}"
        );
        assert!(message.contains("sasl.password=***"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn every_role_carries_the_operators_properties_and_its_own() {
        let kafka = KafkaConnection::new(
            "b:9092",
            props(&[("security.protocol", "SASL_SSL"), ("linger.ms", "20")]),
        )
        .expect("valid");
        let roles = [
            Role::StageConsumer {
                group: "g",
                session_timeout_ms: 6000,
                instance_id: Some("silver-processor-0"),
            },
            Role::Producer {
                message_timeout_ms: 1000,
            },
            Role::Admin,
            Role::Reader {
                group: "r",
                until_end: true,
            },
        ];
        for role in roles {
            let config = kafka.config(role);
            assert_eq!(config.get("bootstrap.servers"), Some("b:9092"), "{role:?}");
            assert_eq!(
                config.get("security.protocol"),
                Some("SASL_SSL"),
                "{role:?}"
            );
        }
        let consumer = kafka.config(roles[0]);
        assert_eq!(consumer.get("group.id"), Some("g"));
        assert_eq!(
            consumer.get("group.instance.id"),
            Some("silver-processor-0")
        );
        for role in &roles[1..] {
            assert_eq!(
                kafka.config(*role).get("group.instance.id"),
                None,
                "static membership is the stage consumer's alone: {role:?}"
            );
        }
        let dynamic = kafka.config(Role::StageConsumer {
            group: "g",
            session_timeout_ms: 6000,
            instance_id: None,
        });
        assert_eq!(dynamic.get("group.instance.id"), None);
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("queued.max.messages.kbytes"), Some("32768"));
        // Prefetch bounded in messages too, and a full queue not left a second unfilled.
        assert_eq!(consumer.get("queued.min.messages"), Some("30000"));
        assert_eq!(consumer.get("max.partition.fetch.bytes"), Some("4194304"));
        assert_eq!(consumer.get("fetch.queue.backoff.ms"), Some("20"));
        let reader = kafka.config(roles[3]);
        assert_eq!(reader.get("queued.min.messages"), Some("2000"));
        assert_eq!(reader.get("fetch.queue.backoff.ms"), Some("20"));
        assert_eq!(reader.get("fetch.wait.max.ms"), Some("20"));
        let follower = kafka.config(Role::Reader {
            group: "r",
            until_end: false,
        });
        assert_eq!(follower.get("queued.min.messages"), Some("2000"));
        assert_eq!(
            follower.get("fetch.wait.max.ms"),
            None,
            "a follower may wait"
        );
        for role in roles {
            assert_eq!(
                kafka.config(role).get("reconnect.backoff.max.ms"),
                Some("1000"),
                "{role:?}"
            );
        }
        let producer = kafka.config(roles[1]);
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(
            producer.get("linger.ms"),
            Some("20"),
            "the operator's tuning wins"
        );
        let reader = kafka.config(roles[3]);
        assert_eq!(reader.get("enable.auto.commit"), Some("false"));
        assert_eq!(reader.get("enable.partition.eof"), Some("true"));
    }

    #[test]
    fn an_owned_property_is_refused_not_overwritten() {
        for key in [
            "group.id",
            "enable.auto.commit",
            "acks",
            "bootstrap.servers",
        ] {
            let err = KafkaConnection::new("b:9092", props(&[(key, "x")])).expect_err(key);
            assert!(
                matches!(&err, ConnectionError::Owned { key: k, .. } if k == key),
                "{err}"
            );
            assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
        }
        assert_eq!(
            KafkaConnection::plain(" "),
            Err(ConnectionError::NoBootstrap)
        );
    }
}
