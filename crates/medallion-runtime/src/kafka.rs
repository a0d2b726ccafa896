//! Kafka client construction with the settings every Medallion process shares.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medallion_contracts::topics::Partitioner;
use medallion_contracts::TopicConfig;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use crate::record::HeaderList;

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
];

/// What a client is for; each role owns the settings its guarantees rest on.
#[derive(Debug, Clone, Copy)]
pub enum Role<'a> {
    /// A stage worker's consumer: stores offsets itself, librdkafka commits what is stored.
    StageConsumer {
        group: &'a str,
        session_timeout_ms: u32,
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
        match role {
            // librdkafka prefetches up to 64 MiB by default. 32 MiB keeps the replay
            // benchmark's stages as fast (16 MiB halved gold's rate: its records are larger).
            Role::StageConsumer { .. } => {
                default("queued.max.messages.kbytes", "32768");
                // An input topic created after the worker started (or partitions added) is
                // seen within 10 s rather than librdkafka's 5 min.
                default("topic.metadata.refresh.interval.ms", "10000");
            }
            Role::Producer { .. } => default("linger.ms", "5"),
            // A reader to the end learns it is there when a fetch comes back empty: not after
            // the 500 ms a broker may hold an empty fetch by default (a worker's partition
            // rebuild makes several such reads).
            Role::Reader {
                until_end: true, ..
            } => default("fetch.wait.max.ms", "20"),
            Role::Admin | Role::Reader { .. } => {}
        }
        match role {
            Role::StageConsumer {
                group,
                session_timeout_ms,
            } => config
                .set("group.id", group)
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "1000")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", session_timeout_ms.to_string())
                .set("partition.assignment.strategy", "cooperative-sticky"),
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

/// A batch of records produced together and acknowledged as one.
pub type FlightId = u32;

/// A producer of *flights*: each call to [`BatchProducer::launch`] hands a batch of records to
/// librdkafka and returns at once with the flight's id; the delivery callback counts the
/// flight's acknowledgements (one counter per flight, not one future per record), and a flight
/// whose every record is acknowledged or failed has *landed*. Any number of flights may be out.
pub struct BatchProducer {
    producer: ThreadedProducer<AckContext>,
    flights: Arc<Flights>,
    placement: Placement,
}

/// The partition of a keyed record for the topics whose `partitioner` librdkafka does not
/// implement (`java_long_hash`); the others are left to librdkafka's murmur2.
#[derive(Debug, Clone, Default)]
pub struct Placement(HashMap<String, (Partitioner, u32)>);

impl Placement {
    pub fn of(topics: &TopicConfig) -> Self {
        Self(
            topics
                .topics
                .iter()
                .filter(|(_, spec)| spec.partitioner != Partitioner::Murmur2)
                .map(|(name, spec)| (name.clone(), (spec.partitioner, spec.partitions)))
                .collect(),
        )
    }

    /// The partition `key` goes to on `topic`, where this placement decides it.
    pub fn partition(&self, topic: &str, key: Option<&[u8]>) -> Option<i32> {
        let (partitioner, partitions) = self.0.get(topic)?;
        partitioner.partition(key?, *partitions)
    }
}

/// The records of one batch that failed, by index, with the first error.
#[derive(Debug, Default)]
pub struct BatchFailures {
    pub indexes: Vec<usize>,
    pub first_error: Option<KafkaError>,
}

/// A landed flight.
#[derive(Debug)]
pub struct Landed {
    pub flight: FlightId,
    pub failures: BatchFailures,
}

/// The flights of one producer, shared with its delivery callback.
#[derive(Default)]
pub struct Flights {
    state: Mutex<FlightState>,
    /// Wakes tasks waiting for a landing.
    landing: Notify,
    /// Wakes threads waiting for a landing (a rebalance callback).
    landing_sync: std::sync::Condvar,
}

#[derive(Default)]
struct FlightState {
    next: FlightId,
    /// Records not yet acknowledged, and failures so far, by flight.
    out: HashMap<FlightId, (usize, BatchFailures)>,
    /// Flights landed and not yet taken.
    landed: Vec<Landed>,
    /// The highest acknowledged offset, by topic and partition (this producer's lifetime).
    acked: HashMap<String, BTreeMap<i32, i64>>,
}

impl FlightState {
    fn land_if_done(&mut self, flight: FlightId) -> bool {
        if self
            .out
            .get(&flight)
            .is_some_and(|(pending, _)| *pending == 0)
        {
            if let Some((_, failures)) = self.out.remove(&flight) {
                self.landed.push(Landed { flight, failures });
                return true;
            }
        }
        false
    }
}

impl Flights {
    fn notify(&self) {
        self.landing.notify_waiters();
        self.landing.notify_one();
        self.landing_sync.notify_all();
    }

    /// Whether every flight of `flights` has landed (taken or not).
    pub fn all_landed(&self, flights: &[FlightId]) -> bool {
        self.state
            .lock()
            .map(|s| flights.iter().all(|f| !s.out.contains_key(f)))
            .unwrap_or(true)
    }

    /// Blocks the calling thread until every flight of `flights` has landed or `timeout`
    /// passed; returns whether they all landed. For callbacks that run outside the runtime.
    pub fn wait_blocking(&self, flights: &[FlightId], timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        loop {
            if flights.iter().all(|f| !state.out.contains_key(f)) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.landing_sync.wait_timeout(state, left) {
                Ok((s, _)) => state = s,
                Err(_) => return false,
            }
        }
    }

    /// Whether `flight` landed with records refused (looked up among flights not yet taken).
    pub fn failed(&self, flight: FlightId) -> bool {
        self.state
            .lock()
            .map(|s| {
                s.landed
                    .iter()
                    .any(|l| l.flight == flight && !l.failures.indexes.is_empty())
            })
            .unwrap_or(true)
    }
}

struct AckContext {
    flights: Arc<Flights>,
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    /// The flight and the record's index in it, packed (see [`pack`]).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (flight, index) = unpack(opaque);
        let Ok(mut state) = self.flights.state.lock() else {
            return;
        };
        let state = &mut *state;
        let Some((pending, failures)) = state.out.get_mut(&flight) else {
            return;
        };
        match result {
            Err((e, _)) => {
                failures.indexes.push(index);
                failures.first_error.get_or_insert_with(|| e.clone());
            }
            Ok(message) => {
                let (topic, partition, offset) =
                    (message.topic(), message.partition(), message.offset());
                let high = match state.acked.get_mut(topic) {
                    Some(high) => high,
                    None => state.acked.entry(topic.to_string()).or_default(),
                };
                let at = high.entry(partition).or_insert(offset);
                *at = (*at).max(offset);
            }
        }
        *pending = pending.saturating_sub(1);
        if state.land_if_done(flight) {
            self.flights.notify();
        }
    }
}

// The opaque carries the flight in the high 32 bits and the record index in the low.
const _: () = assert!(
    usize::BITS >= 64,
    "BatchProducer packs two u32 into a usize"
);

fn pack(flight: FlightId, index: usize) -> usize {
    ((flight as usize) << 32) | (index & 0xffff_ffff)
}

fn unpack(opaque: usize) -> (FlightId, usize) {
    ((opaque >> 32) as FlightId, opaque & 0xffff_ffff)
}

/// One record of a batch.
pub struct BatchRecord<'a> {
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Option<&'a HeaderList>,
}

impl BatchProducer {
    /// Builds the producer from `config` (bootstrap, credentials and producer settings).
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let flights = Arc::new(Flights::default());
        let producer = config.create_with_context(AckContext {
            flights: flights.clone(),
        })?;
        Ok(Self {
            producer,
            flights,
            placement: Placement::default(),
        })
    }

    /// Partitions keyed records of the topics `placement` covers by their own partitioner.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// The flights, for a callback that must wait for some to land.
    pub fn flights(&self) -> Arc<Flights> {
        self.flights.clone()
    }

    /// Hands `indexes` (into the caller's list; `record` builds each) to librdkafka as one
    /// flight and returns its id without waiting for acknowledgements. Waits only while
    /// librdkafka's own queue is full. A record librdkafka refuses at once counts as failed.
    /// An empty flight lands at once.
    pub async fn launch<'a>(
        &self,
        indexes: &[usize],
        record: impl Fn(usize) -> BatchRecord<'a>,
    ) -> FlightId {
        let flight = {
            let Ok(mut state) = self.flights.state.lock() else {
                return FlightId::MAX;
            };
            state.next = state.next.wrapping_add(1);
            let flight = state.next;
            // One more than the records: the launch itself, released when every record is out,
            // so the flight cannot land half-launched.
            state
                .out
                .insert(flight, (indexes.len() + 1, BatchFailures::default()));
            flight
        };
        let mut refused = BatchFailures::default();
        for &i in indexes {
            let r = record(i);
            loop {
                let mut base =
                    BaseRecord::with_opaque_to(r.topic, pack(flight, i)).payload(r.value);
                if let Some(key) = r.key {
                    base = base.key(key);
                }
                if let Some(partition) = r
                    .partition
                    .or_else(|| self.placement.partition(r.topic, r.key))
                {
                    base = base.partition(partition);
                }
                if let Some(headers) = r.headers {
                    // librdkafka takes its own list: built once per send.
                    base = base.headers(headers.to_rdkafka());
                }
                match self.producer.send(base) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        refused.indexes.push(i);
                        refused.first_error.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        if let Ok(mut state) = self.flights.state.lock() {
            if let Some((pending, failures)) = state.out.get_mut(&flight) {
                *pending = pending.saturating_sub(1 + refused.indexes.len());
                failures.indexes.append(&mut refused.indexes);
                if failures.first_error.is_none() {
                    failures.first_error = refused.first_error.take();
                }
            }
            if state.land_if_done(flight) {
                self.flights.notify();
            }
        }
        flight
    }

    /// Flights that landed since the last call, failed indexes sorted.
    pub fn take_landed(&self) -> Vec<Landed> {
        let mut landed = self
            .flights
            .state
            .lock()
            .map(|mut s| std::mem::take(&mut s.landed))
            .unwrap_or_default();
        for l in &mut landed {
            l.failures.indexes.sort_unstable();
        }
        landed
    }

    /// Waits until a landed flight is there to take.
    pub async fn landing(&self) {
        loop {
            let notified = self.flights.landing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ready = self
                .flights
                .state
                .lock()
                .map(|s| !s.landed.is_empty())
                .unwrap_or(true);
            if ready {
                return;
            }
            notified.await;
        }
    }

    /// Flights launched and not landed.
    pub fn in_flight(&self) -> usize {
        self.flights.state.lock().map(|s| s.out.len()).unwrap_or(0)
    }

    /// Produces `records` as one flight and waits for it to land. Returns the indexes that
    /// failed, refused or not delivered. For callers with one batch at a time.
    pub async fn send_all<'a>(
        &self,
        indexes: &[usize],
        record: impl Fn(usize) -> BatchRecord<'a>,
    ) -> BatchFailures {
        let flight = self.launch(indexes, record).await;
        loop {
            let notified = self.flights.landing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(mut state) = self.flights.state.lock() {
                if let Some(at) = state.landed.iter().position(|l| l.flight == flight) {
                    let mut failures = state.landed.swap_remove(at).failures;
                    failures.indexes.sort_unstable();
                    return failures;
                }
                if !state.out.contains_key(&flight) {
                    break;
                }
            } else {
                break;
            }
            notified.await;
        }
        BatchFailures {
            indexes: indexes.to_vec(),
            first_error: None,
        }
    }

    /// The highest offset acknowledged so far in each partition of `topic`.
    pub fn acked(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.flights
            .state
            .lock()
            .ok()
            .and_then(|state| state.acked.get(topic).cloned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_with_the_java_partitioner_is_placed_by_org_and_the_others_by_librdkafka() {
        let text =
            std::fs::read_to_string(medallion_contracts::project_root().join("topic-config.yaml"))
                .expect("topic-config.yaml");
        let text = text.replacen(
            "    schema: bronze/data-cleaned.avsc\n",
            "    schema: bronze/data-cleaned.avsc\n    partitioner: java_long_hash\n",
            1,
        );
        let topics = TopicConfig::parse(&text, "t")
            .expect("valid")
            .with_prefix("blue.")
            .expect("prefix");
        let placement = Placement::of(&topics);
        // Long.valueOf(101).hashCode() = 101; 101 % 12 = 5. 123456789012 hashes to -1097262584.
        assert_eq!(
            placement.partition("blue.bronze.data.cleaned", Some(b"101")),
            Some(5)
        );
        assert_eq!(
            placement.partition("blue.bronze.data.cleaned", Some(b"123456789012")),
            Some(8)
        );
        assert_eq!(placement.partition("blue.bronze.data.cleaned", None), None);
        assert_eq!(
            placement.partition("blue.silver.data.processed", Some(b"101")),
            None
        );
    }

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
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("queued.max.messages.kbytes"), Some("32768"));
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
