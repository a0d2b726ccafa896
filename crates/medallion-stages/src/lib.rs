//! Medallion's stages. Each stage is a folder with the same shape (`mod.rs`: config and
//! transform; tests inline) and a thin binary in `src/bin/`; the shared runtime does the rest.

pub mod audit_writer;
pub mod bronze;
pub mod feeds;
pub mod gateway;
pub mod gold;
pub mod main_support;
pub mod notify;
pub mod plan;
pub mod rules;
pub mod silver;

#[cfg(test)]
mod testkit;
