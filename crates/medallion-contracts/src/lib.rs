//! Event contracts of the Medallion pipeline.
//!
//! - [`schemas`]: the Avro schemas in `schemas/`, resolved into self-contained contracts.
//! - [`topics`]: the typed loader of `topic-config.yaml`.
//! - [`feeds`]: the feed catalog (`feeds.yaml`), checked against the raw contract.
//! - [`compat`]: the BACKWARD compatibility gate against the released schemas.
//! - [`json`]: the JSON form of events used by golden payloads and tools.
//! - [`wire`]: the Confluent wire format and its typed errors.
//! - [`columnar`]: Confluent-framed Avro ↔ Arrow `RecordBatch`.
//! - [`registry`]: the Schema Registry client.

pub mod columnar;
pub mod compat;
pub mod enums;
pub mod feeds;
pub mod json;
pub mod registry;
pub mod sample;
pub mod schemas;
pub mod shape;
pub mod topics;
pub mod wire;

pub use feeds::FeedCatalog;
pub use schemas::{Contract, ContractSet};
pub use topics::TopicConfig;
pub use wire::CodecError;

use std::path::{Path, PathBuf};

/// The repository root, where `schemas/` and `topic-config.yaml` live: `MEDALLION_HOME` if set,
/// else the nearest ancestor of the current directory holding `topic-config.yaml`, else the
/// root this crate was built from.
pub fn project_root() -> PathBuf {
    if let Some(home) = std::env::var_os("MEDALLION_HOME") {
        return PathBuf::from(home);
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            if dir.join("topic-config.yaml").is_file() && dir.join("schemas").is_dir() {
                return dir.to_path_buf();
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod writer_mix_tests;
