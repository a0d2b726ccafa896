//! Errors typed by who caused them and whether waiting helps. The type decides the path:
//! poison goes to the DLQ at once, transient is retried with backoff and then dead-lettered,
//! and an unavailable broker pauses consumption (the DLQ lives on the same broker).

use medallion_contracts::registry::RegistryError;
use medallion_contracts::CodecError;

/// What to do with a record that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The record itself is bad: retrying gives the same answer. DLQ now.
    Poison,
    /// A dependency failed (registry, timeout): retry with backoff, then DLQ.
    Transient,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Poison => "poison",
            ErrorClass::Transient => "transient",
        }
    }
}

/// Why one record did not make it to the output topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFailure {
    pub class: ErrorClass,
    /// Stable label: metrics and the `medallion.error.reason` DLQ header.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Extra dead-letter headers naming the failure's specifics (e.g. an HTTP status).
    pub headers: Vec<(String, String)>,
}

impl RecordFailure {
    pub fn poison(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Poison,
            reason: reason.into(),
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn transient(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            reason: reason.into(),
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a dead-letter header.
    pub fn with_header(mut self, key: &str, value: &str) -> Self {
        self.headers.push((key.to_string(), value.to_string()));
        self
    }
}

impl From<&CodecError> for RecordFailure {
    fn from(e: &CodecError) -> Self {
        RecordFailure::poison(e.reason(), e.to_string())
    }
}

/// A failure of a whole batch step.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The registry did not answer a batch's request: wait and retry the batch.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The stage's transform failed on a whole batch (a bug or a resource limit, not a
    /// record's fault).
    #[error("transform failed: {0}")]
    Transform(String),
    /// Encoding to the output schema failed.
    #[error("encode failed: {0}")]
    Encode(String),
    /// The stage refuses to go on (a fail-batch expectation): the worker stops without
    /// committing the batch, so it is read again once the cause is fixed.
    #[error("halted: {0}")]
    Halt(String),
    /// An Arrow kernel failed on the batch.
    #[error("transform failed: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A DataFusion plan failed on the batch.
    #[error("transform failed: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// A bug in the runtime or the stage (a broken invariant): the worker stops without
    /// committing the batch rather than guess.
    #[error("internal error: {0}")]
    Internal(String),
    /// The local state store failed (a full disk, an I/O error): the worker stops without
    /// committing the batch; the store is rebuilt from the changelogs if it cannot be reopened.
    #[error("state store: {0}")]
    Store(String),
    /// A partition's state could not be read back (its changelog, a marker in a store).
    #[error("restoring partition {partition}: {source}")]
    Restore {
        partition: i32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<crate::changelog::RestoreError> for StageError {
    fn from(e: crate::changelog::RestoreError) -> Self {
        StageError::Restore {
            partition: e.partition,
            source: e.source,
        }
    }
}

impl StageError {
    /// The state of `partition` could not be read back because of `source`.
    pub fn restore(
        partition: i32,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StageError::Restore {
            partition,
            source: source.into(),
        }
    }

    /// The stable label of a record dead-lettered with this error (`medallion.error.reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            StageError::Registry(_) => "registry_unreachable",
            StageError::Transform(_) => "transform_failed",
            StageError::Encode(_) => "encode_failed",
            StageError::Halt(_) => "halted",
            StageError::Arrow(_) | StageError::DataFusion(_) => "transform_failed",
            StageError::Internal(_) => "internal_error",
            StageError::Restore { .. } => "restore_failed",
            StageError::Store(_) => "state_store_failed",
        }
    }

    /// Whether the error stops the worker: not a record's fault, and not transient.
    pub fn stops_the_worker(&self) -> bool {
        matches!(
            self,
            StageError::Halt(_)
                | StageError::Internal(_)
                | StageError::Restore { .. }
                | StageError::Store(_)
        )
    }

    pub fn is_transient(&self) -> bool {
        match self {
            // Fetching a writer schema is needed by every record: a registry that refuses
            // (401, 403, 5xx) is waited out like one that is down. An unknown id never gets
            // here: it is the record's fault and rejected with it.
            StageError::Registry(_) => true,
            StageError::Transform(_)
            | StageError::Encode(_)
            | StageError::Halt(_)
            | StageError::Arrow(_)
            | StageError::DataFusion(_)
            | StageError::Internal(_)
            | StageError::Restore { .. }
            | StageError::Store(_) => false,
        }
    }
}

/// Why a worker or its stage could not be built at start-up. Each variant names what is at
/// fault (the setting, the topic, the schema or the plan), so an operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A setting is wrong; `key` is its path in the config file (`stage.pii.keys`).
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// `topic-config.yaml` or `schemas/` lack something the stage needs.
    #[error("contracts: {0}")]
    Contracts(String),
    /// A schema could not be registered.
    #[error("registering the schema of {topic}: {source}")]
    Registry {
        topic: String,
        #[source]
        source: RegistryError,
    },
    /// A contract does not parse, or an encoder no longer matches it.
    #[error("schema of {topic}: {message}")]
    Schema { topic: String, message: String },
    /// A stage's DataFusion plan does not build (an expression or a rule that does not plan).
    #[error("planning {what}: {source}")]
    Plan {
        what: String,
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    /// The Arrow side of a contract (columnar decoder or encoder) could not be built.
    #[error(transparent)]
    Columnar(#[from] medallion_contracts::columnar::ColumnarSetupError),
    /// The personal-data keys are missing or wrong (the error names the setting).
    #[error(transparent)]
    Pii(#[from] crate::pii::PiiError),
    /// The feed catalog (`feeds.yaml`) is wrong: the error names the feed and its key.
    #[error(transparent)]
    Feeds(#[from] medallion_contracts::feeds::FeedError),
}

impl SetupError {
    /// A wrong setting at `key`.
    pub fn config(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        SetupError::Config {
            key: key.into(),
            message: message.to_string(),
        }
    }

    /// Something `topic-config.yaml` or `schemas/` should declare and do not.
    pub fn contracts(message: impl Into<String>) -> Self {
        SetupError::Contracts(message.into())
    }

    /// A contract of `topic` that does not parse, or an encoder that does not match it.
    pub fn schema(topic: impl Into<String>, message: impl std::fmt::Display) -> Self {
        SetupError::Schema {
            topic: topic.into(),
            message: message.to_string(),
        }
    }

    /// A plan of `what` that does not build.
    pub fn plan(what: impl Into<String>, source: datafusion::error::DataFusionError) -> Self {
        SetupError::Plan {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_that_refuses_a_batch_is_waited_out_not_blamed_on_its_records() {
        for e in [
            RegistryError::Unreachable {
                url: "http://r".into(),
                message: "connection refused".into(),
            },
            RegistryError::Rejected {
                what: "schema 7".into(),
                message: "401 Unauthorized".into(),
            },
        ] {
            let e = StageError::Registry(e);
            assert!(e.is_transient(), "{e}");
            assert!(!e.stops_the_worker(), "{e}");
        }
    }

    #[test]
    fn setup_errors_name_what_to_fix() {
        let e = SetupError::config("stage.window_ms", "must be > 0 (has 0)");
        assert_eq!(e.to_string(), "stage.window_ms: must be > 0 (has 0)");
        let e = SetupError::Registry {
            topic: "bronze.data.cleaned".into(),
            source: RegistryError::Incompatible {
                subject: "bronze.data.cleaned-value".into(),
                message: "field removed".into(),
            },
        };
        assert!(e
            .to_string()
            .starts_with("registering the schema of bronze.data.cleaned: "));
    }
}
