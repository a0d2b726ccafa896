//! Worker configuration: embedded defaults, then an optional YAML file, then environment
//! variables `MEDALLION__SECTION__KEY` (e.g. `MEDALLION__KAFKA__BOOTSTRAP`). Unknown keys are
//! rejected with their name, so a typo never silently becomes a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why the configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a stage worker needs, plus the stage's own section `S`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig<S> {
    pub kafka: KafkaConfig,
    pub registry: RegistryConfig,
    pub batch: BatchConfig,
    pub dedup: DedupConfig,
    pub retry: RetryConfig,
    pub http: HttpConfig,
    pub contracts: ContractsConfig,
    pub pipeline: PipelineConfig,
    /// Names of this deployment's topics and consumer groups.
    #[serde(default)]
    pub naming: NamingConfig,
    /// Where a stateful stage keeps its state on disk, and how much memory it may use.
    #[serde(default)]
    pub state: StateConfig,
    /// How the orgs that share a partition share the worker.
    #[serde(default)]
    pub fairness: FairnessConfig,
    /// The stage's own settings.
    pub stage: S,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub bootstrap: String,
    /// Consumer session timeout; a dead replica's partitions move after this long.
    pub session_timeout_ms: u32,
    /// How long a produce may wait for the broker before it counts as failed.
    pub produce_timeout_ms: u32,
    /// How long a worker told to stop (SIGTERM) may take to settle its work in flight, commit
    /// and leave the group. Half of it at most goes to waiting for produced records to be
    /// acknowledged; what is still unacknowledged then is not committed, and the partition's
    /// next owner reads it again (dedup drops what was written). Keep it under the pod's
    /// termination grace period (60 s in `deploy/`): a broker that stalls or refuses every
    /// connection otherwise holds the exit for the produce timeout, the last commit's attempt
    /// and the group's session on top of one another.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u32,
    /// Extra librdkafka properties (security.protocol, sasl.*, ...), applied to every client.
    pub properties: std::collections::BTreeMap<String, String>,
    /// Static group membership (`group.instance.id` of the stage's consumer): an id of this
    /// replica that outlives its process, such as a StatefulSet pod's name. A replica that
    /// restarts under the same id is given its partitions back as soon as it rejoins, instead
    /// of after its session expires and the group rebalances; the others keep theirs. Unset
    /// (the default): dynamic membership, for replicas without a stable name (a Deployment's
    /// pods), whose old ids would hold partitions until their sessions expire. Two live
    /// processes must never share an id: the broker fences the older one, which then stops.
    #[serde(default)]
    pub instance_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Confluent-compatible Schema Registry URL.
    pub url: String,
    pub timeout_ms: u64,
    /// HTTP basic credentials, e.g. from a Secret: `MEDALLION__REGISTRY__USERNAME` and
    /// `MEDALLION__REGISTRY__PASSWORD` (Confluent Cloud: API key and secret).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records per batch.
    pub max_records: usize,
    /// How long to wait for a batch to fill once its first record arrived.
    pub linger_ms: u64,
    /// Most records produced and not yet acknowledged: beyond it the worker waits for
    /// acknowledgements before it takes more input.
    #[serde(default = "default_in_flight_records")]
    pub max_in_flight_records: usize,
    /// Most bytes (record values) produced and not yet acknowledged.
    #[serde(default = "default_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
}

fn default_in_flight_records() -> usize {
    50_000
}

fn default_in_flight_bytes() -> usize {
    64 << 20
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Event ids remembered per partition (16 bytes each plus set overhead).
    pub window_per_partition: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Waits between attempts of a transient failure: 0.5 s, 2 s, 8 s, 32 s.
    pub backoff_ms: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractsConfig {
    /// Directory holding `topic-config.yaml` and `schemas/` (default: found upward from the
    /// working directory).
    pub home: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Names this deployment in `etl.execution` (its record key, `pipeline_id`).
    pub id: String,
}

/// A deployment prefix lets two pipelines (blue/green, staging beside production) share one
/// cluster: every topic, DLQ, changelog and consumer group of `topic-config.yaml` is named
/// `<prefix><name>`, and each subject follows its topic (`<prefix><topic>-value`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamingConfig {
    /// e.g. `blue.` or `staging-`; empty: the names of topic-config.yaml as they are.
    #[serde(default)]
    pub prefix: String,
}

/// The local state store of a stateful stage (silver's merge state and owner table,
/// notification-sender's delivery ledger). The changelog topics stay the source of truth;
/// the store is a copy on disk, checkpointed against them, so a restart on the same disk reads
/// only their tail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The store's base directory: the worker keeps its store in `<dir>/<group>` and copies of
    /// its dedup windows in `<dir>/<group>.windows`, and one process at a time may use it.
    /// Unset: a store of its own under the system's temp directory, removed at exit, so every
    /// start rebuilds its state from the changelogs (and its dedup windows from the input).
    pub dir: Option<PathBuf>,
    /// The store's block cache, MiB.
    pub cache_mib: u64,
    /// The store's write buffers (all tables together), MiB.
    pub write_buffer_mib: u64,
    /// Entries kept decoded in memory in front of the store (recently used ones).
    pub hot_entries: usize,
    /// How often a partition whose state changed records the changelog offset its files hold:
    /// a restart on this disk reads the changelog from there. Also how often, with a `dir`,
    /// the dedup windows are copied to `<dir>/<group>.windows/`, so a restart reads the input
    /// from the last copy rather than the window's whole length.
    pub checkpoint_interval_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: None,
            cache_mib: 16,
            write_buffer_mib: 16,
            hot_entries: 20_000,
            checkpoint_interval_ms: 5_000,
        }
    }
}

/// How the orgs of a partition share the worker: records are queued per org and batches cut by
/// deficit round robin, so one org's backlog does not hold up the others (see the runtime's
/// `worker::fair`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FairnessConfig {
    /// On (the default): orgs share each partition by deficit round robin, an org with a
    /// backlog read past and caught up from the log (a second read of what was read past; see
    /// the README's Fair scheduling). Off: each partition is taken in log order.
    pub enabled: bool,
    /// Records an org may take per turn of the round robin (times its weight).
    pub quantum: usize,
    /// Records queued for one org before the worker reads past its records (a reader of its
    /// own brings them back as its queue drains), when the org makes up more than
    /// `read_past_percent` of what the worker read since its queue began.
    pub org_read_ahead: usize,
    /// An org is read past only while it floods its partition: more than this percentage of
    /// the records read since its queue began. One org among others in a backlog of all of
    /// them is not read past (that would read most of the log twice for little gain); its
    /// queue grows up to the partition's read-ahead instead. 0: any org with a full queue.
    pub read_past_percent: u8,
    /// Records queued for one partition before reading it pauses.
    pub read_ahead_records: usize,
    /// Bytes queued for one partition before reading it pauses, MiB.
    pub read_ahead_mib: usize,
    /// How far (in offsets) a partition may be read past what a restart would read again: its
    /// lowest record not done where the broker keeps no commit metadata, else what the
    /// recorded progress cannot claim. Unset: `dedup.window_per_partition`, so that a
    /// restart's replay of what was done stays within what dedup drops.
    pub max_skip_ahead: Option<i64>,
    /// Weights of orgs by org id (default 1): an org of weight 3 gets three quanta a turn.
    pub weights: std::collections::BTreeMap<String, u32>,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            quantum: 100,
            org_read_ahead: 1_000,
            read_past_percent: 50,
            read_ahead_records: 5_000,
            read_ahead_mib: 4,
            max_skip_ahead: None,
            weights: std::collections::BTreeMap::new(),
        }
    }
}

impl FairnessConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("fairness.quantum", self.quantum),
            ("fairness.org_read_ahead", self.org_read_ahead),
            ("fairness.read_ahead_records", self.read_ahead_records),
            ("fairness.read_ahead_mib", self.read_ahead_mib),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.max_skip_ahead.is_some_and(|m| m < 1) {
            return Err(ConfigError::Invalid(
                "fairness.max_skip_ahead must be at least 1".into(),
            ));
        }
        if let Some((org, _)) = self.weights.iter().find(|(_, w)| **w == 0) {
            return Err(ConfigError::Invalid(format!(
                "fairness.weights: the weight of `{org}` must be at least 1"
            )));
        }
        Ok(())
    }
}

impl StateConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("state.cache_mib", self.cache_mib),
            ("state.write_buffer_mib", self.write_buffer_mib),
            ("state.checkpoint_interval_ms", self.checkpoint_interval_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.hot_entries == 0 {
            return Err(ConfigError::Invalid(
                "state.hot_entries must be at least 1".into(),
            ));
        }
        if self.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(ConfigError::Invalid(
                "state.dir is empty (leave it out for a temporary store)".into(),
            ));
        }
        Ok(())
    }
}

impl RegistryConfig {
    /// The registry client of these settings (basic credentials when set).
    pub fn client(
        &self,
    ) -> Result<
        medallion_contracts::registry::RegistryClient,
        medallion_contracts::registry::RegistryError,
    > {
        medallion_contracts::registry::RegistryClient::with_basic_auth(
            &self.url,
            std::time::Duration::from_millis(self.timeout_ms),
            self.username.clone().zip(self.password.clone()),
        )
    }
}

impl KafkaConfig {
    /// The connection every client of the worker is built from; refuses a property the runtime
    /// owns.
    pub fn connection(
        &self,
    ) -> Result<crate::kafka::KafkaConnection, crate::kafka::ConnectionError> {
        crate::kafka::KafkaConnection::new(
            &self.bootstrap,
            self.properties.iter().map(|(k, v)| (k.clone(), v.clone())),
        )
    }
}

fn default_stop_timeout_ms() -> u32 {
    20_000
}

impl<S: Default> Default for WorkerConfig<S> {
    fn default() -> Self {
        Self {
            kafka: KafkaConfig {
                bootstrap: "localhost:9092".into(),
                session_timeout_ms: 10_000,
                produce_timeout_ms: 30_000,
                stop_timeout_ms: default_stop_timeout_ms(),
                properties: Default::default(),
                instance_id: None,
            },
            registry: RegistryConfig {
                url: "http://localhost:8081".into(),
                timeout_ms: 5_000,
                username: None,
                password: None,
            },
            batch: BatchConfig {
                max_records: 2_000,
                linger_ms: 20,
                max_in_flight_records: default_in_flight_records(),
                max_in_flight_bytes: default_in_flight_bytes(),
            },
            dedup: DedupConfig {
                window_per_partition: 100_000,
            },
            retry: RetryConfig {
                backoff_ms: vec![500, 2_000, 8_000, 32_000],
            },
            http: HttpConfig {
                listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
            },
            contracts: ContractsConfig { home: None },
            pipeline: PipelineConfig {
                id: "medallion".into(),
            },
            naming: NamingConfig::default(),
            state: StateConfig::default(),
            fairness: FairnessConfig::default(),
            stage: S::default(),
        }
    }
}

/// The environment prefix of overrides.
pub const ENV_PREFIX: &str = "MEDALLION__";
/// Extra librdkafka properties as `key=value,key=value` (e.g. `security.protocol=SASL_SSL`).
pub const KAFKA_PROPERTIES_ENV: &str = "MEDALLION_KAFKA_PROPERTIES";

impl<S: Default + Serialize + DeserializeOwned> WorkerConfig<S> {
    /// Defaults, then `file` (if given; it must exist), then `MEDALLION__*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.to_path_buf()));
            }
            figment = figment.merge(Yaml::file(file));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        let mut config: Self = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // librdkafka's dotted names cannot be segments of MEDALLION__A__B variables.
        if let Ok(text) = std::env::var(KAFKA_PROPERTIES_ENV) {
            for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{KAFKA_PROPERTIES_ENV}: `{pair}` is not key=value"
                    ))
                })?;
                config
                    .kafka
                    .properties
                    .insert(key.trim().to_string(), value.trim().to_string());
            }
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.bootstrap.trim().is_empty() {
            return Err(ConfigError::Invalid("kafka.bootstrap is empty".into()));
        }
        self.kafka
            .connection()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(id) = &self.kafka.instance_id {
            crate::kafka::check_instance_id(id)
                .map_err(|e| ConfigError::Invalid(format!("kafka.instance_id: {e}")))?;
        }
        medallion_contracts::topics::check_prefix(&self.naming.prefix)
            .map_err(|e| ConfigError::Invalid(format!("naming.prefix: {e}")))?;
        if self.pipeline.id.trim().is_empty() {
            return Err(ConfigError::Invalid("pipeline.id is empty".into()));
        }
        if self.registry.username.is_some() != self.registry.password.is_some() {
            return Err(ConfigError::Invalid(
                "registry.username and registry.password go together".into(),
            ));
        }
        if self.kafka.stop_timeout_ms < 1_000 {
            return Err(ConfigError::Invalid(
                "kafka.stop_timeout_ms must be at least 1000 (a stop needs time to commit and leave the group)".into(),
            ));
        }
        if self.batch.max_records == 0 {
            return Err(ConfigError::Invalid(
                "batch.max_records must be at least 1".into(),
            ));
        }
        if self.batch.max_in_flight_records == 0 || self.batch.max_in_flight_bytes == 0 {
            return Err(ConfigError::Invalid(
                "batch.max_in_flight_records and batch.max_in_flight_bytes must be at least 1"
                    .into(),
            ));
        }
        if self.dedup.window_per_partition == 0 {
            return Err(ConfigError::Invalid(
                "dedup.window_per_partition must be at least 1".into(),
            ));
        }
        self.state.validate()?;
        self.fairness.validate()?;
        if !(self.registry.url.starts_with("http://") || self.registry.url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "registry.url `{}` must start with http:// or https://",
                self.registry.url
            )));
        }
        Ok(())
    }

    /// The contracts home: configured, or found upward from the working directory.
    pub fn home(&self) -> PathBuf {
        self.contracts
            .home
            .clone()
            .unwrap_or_else(medallion_contracts::project_root)
    }
}

/// A load reads the process's environment, which one test sets: that test holds this for
/// writing, every other load in these tests for reading, so no load sees its variable.
#[cfg(test)]
static TEST_ENVIRONMENT: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct StageSettings {
        threshold: u32,
    }

    /// [`WorkerConfig::load`] while no test changes the environment.
    fn load(path: Option<&Path>) -> Result<WorkerConfig<StageSettings>, ConfigError> {
        let _reading = TEST_ENVIRONMENT
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        WorkerConfig::<StageSettings>::load(path)
    }

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.path.join("worker.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Self {
                let path =
                    std::env::temp_dir().join(format!("medallion-config-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&path).expect("temp dir");
                Self { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn file_overrides_defaults() {
        let (_dir, path) = write("kafka:\n  bootstrap: broker:9092\nstage:\n  threshold: 7\n");
        let config = load(Some(&path)).expect("valid");
        assert_eq!(config.kafka.bootstrap, "broker:9092");
        assert_eq!(config.stage.threshold, 7);
        assert_eq!(config.retry.backoff_ms, vec![500, 2_000, 8_000, 32_000]);
    }

    #[test]
    fn unknown_keys_are_named() {
        let (_dir, path) = write("kafka:\n  bootstrapp: broker:9092\n");
        let err = load(Some(&path)).expect_err("typo").to_string();
        assert!(err.contains("bootstrapp"), "{err}");
        let (_dir, path) = write("stage:\n  treshold: 1\n");
        let err = load(Some(&path)).expect_err("typo").to_string();
        assert!(err.contains("treshold"), "{err}");
    }

    #[test]
    fn a_kafka_property_the_runtime_owns_is_refused_with_its_name() {
        for (key, hint) in [
            ("group.id", "naming.prefix"),
            ("enable.auto.commit", "acknowledged"),
            ("session.timeout.ms", "kafka.session_timeout_ms"),
            ("enable.idempotence", "idempotent"),
            ("group.instance.id", "kafka.instance_id"),
        ] {
            let (_dir, path) = write(&format!("kafka:\n  properties:\n    {key}: x\n"));
            let err = load(Some(&path)).expect_err("owned property").to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains(hint),
                "{err}"
            );
        }
        let (_dir, path) = write("kafka:\n  properties:\n    security.protocol: SASL_SSL\n");
        assert!(load(Some(&path)).is_ok());
    }

    #[test]
    fn an_instance_id_kafka_would_refuse_is_named() {
        let (_dir, path) = write("kafka:\n  instance_id: silver-processor-0\n");
        let config = load(Some(&path)).expect("valid");
        assert_eq!(
            config.kafka.instance_id.as_deref(),
            Some("silver-processor-0")
        );
        for (bad, why) in [("''", "empty"), ("'pod 0'", "` `")] {
            let (_dir, path) = write(&format!("kafka:\n  instance_id: {bad}\n"));
            let err = load(Some(&path)).expect_err("bad id").to_string();
            assert!(
                err.contains("kafka.instance_id") && err.contains(why),
                "{err}"
            );
        }
    }

    #[test]
    fn a_naming_prefix_outside_kafkas_characters_is_refused() {
        let (_dir, path) = write("naming:\n  prefix: blue.\n");
        let config = load(Some(&path)).expect("valid");
        assert_eq!(config.naming.prefix, "blue.");
        let (_dir, path) = write("naming:\n  prefix: 'blue/'\n");
        let err = load(Some(&path)).expect_err("bad prefix").to_string();
        assert!(err.contains("naming.prefix") && err.contains('/'), "{err}");
    }

    #[test]
    fn missing_file_and_bad_values_are_explained() {
        let err = load(Some(Path::new("/nonexistent/w.yaml"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/w.yaml"));
        for (text, named) in [
            ("batch:\n  max_records: zero\n", "max_records"),
            ("registry:\n  url: localhost:8081\n", "registry.url"),
            ("kafka:\n  stop_timeout_ms: 10\n", "kafka.stop_timeout_ms"),
        ] {
            let (_dir, path) = write(text);
            let err = load(Some(&path)).expect_err(text).to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
        let (_dir, path) = write("kafka:\n  stop_timeout_ms: 45000\n");
        let config = load(Some(&path)).expect("valid");
        assert_eq!(config.kafka.stop_timeout_ms, 45_000);
        assert_eq!(config.kafka.produce_timeout_ms, 30_000);
    }

    #[test]
    fn the_state_section_is_read_and_checked() {
        let config = load(None).expect("defaults");
        assert_eq!(config.state, StateConfig::default());
        assert_eq!(config.state.dir, None);
        let (_dir, path) = write("state:\n  dir: /var/lib/medallion\n  cache_mib: 64\n");
        let config = load(Some(&path)).expect("valid");
        assert_eq!(config.state.dir, Some(PathBuf::from("/var/lib/medallion")));
        assert_eq!(config.state.cache_mib, 64);
        assert_eq!(config.state.hot_entries, 20_000);
        for (text, named) in [
            ("state:\n  cache_mib: 0\n", "state.cache_mib"),
            ("state:\n  hot_entries: 0\n", "state.hot_entries"),
            ("state:\n  dir: ''\n", "state.dir"),
            ("state:\n  cache: 1\n", "cache"),
        ] {
            let (_dir, path) = write(text);
            let err = load(Some(&path)).expect_err(text).to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    fn librdkafka_properties_come_from_one_environment_variable() {
        let _writing = TEST_ENVIRONMENT
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Dotted librdkafka names cannot be path segments of MEDALLION__A__B variables.
        std::env::set_var(
            KAFKA_PROPERTIES_ENV,
            "security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-512",
        );
        let config = WorkerConfig::<BTreeMapStage>::load(None);
        std::env::set_var(KAFKA_PROPERTIES_ENV, "security.protocol");
        let bad = WorkerConfig::<BTreeMapStage>::load(None);
        std::env::remove_var(KAFKA_PROPERTIES_ENV);
        let bad = bad.expect_err("not key=value").to_string();
        assert!(
            bad.contains(KAFKA_PROPERTIES_ENV) && bad.contains("security.protocol"),
            "{bad}"
        );
        let config = config.expect("valid");
        assert_eq!(
            config
                .kafka
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("SASL_SSL")
        );
        assert_eq!(
            config
                .kafka
                .properties
                .get("sasl.mechanism")
                .map(String::as_str),
            Some("SCRAM-SHA-512")
        );
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    struct BTreeMapStage {}
}
