//! The shared runtime of Medallion's stage workers: Kafka IO, the Confluent/Arrow codec path,
//! dead letters, retries, dedup, metrics, health endpoints and configuration. A stage only says
//! how a batch becomes its output ([`worker::Stage`]).

pub mod admin;
pub mod audit;
pub mod changelog;
pub mod clock;
pub mod config;
pub mod dedup;
pub mod dlq;
pub mod envelope;
pub mod error;
pub mod http;
pub mod ids;
pub mod isolate;
pub mod kafka;
pub mod keys;
pub mod metrics;
pub mod ops;
pub mod outbound;
pub mod pii;
pub mod progress;
pub mod record;
pub mod recovery;
pub mod retry;
pub mod state;
/// Keyed stage state on local disk.
pub use medallion_store as store;
pub mod worker;
