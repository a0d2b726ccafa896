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
    /// The registry could not be reached: retry the batch.
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
}

impl StageError {
    /// The stable label of a record dead-lettered with this error (`medallion.error.reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            StageError::Registry(_) => "registry_unreachable",
            StageError::Transform(_) => "transform_failed",
            StageError::Encode(_) => "encode_failed",
            StageError::Halt(_) => "halted",
            StageError::Arrow(_) | StageError::DataFusion(_) => "transform_failed",
            StageError::Internal(_) => "internal_error",
        }
    }

    /// Whether the error stops the worker: not a record's fault, and not transient.
    pub fn stops_the_worker(&self) -> bool {
        matches!(self, StageError::Halt(_) | StageError::Internal(_))
    }

    pub fn is_transient(&self) -> bool {
        match self {
            StageError::Registry(e) => e.is_transient(),
            StageError::Transform(_)
            | StageError::Encode(_)
            | StageError::Halt(_)
            | StageError::Arrow(_)
            | StageError::DataFusion(_)
            | StageError::Internal(_) => false,
        }
    }
}
