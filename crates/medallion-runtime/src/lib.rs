//! The shared runtime of Medallion's stage workers: Kafka clients and topic administration.

pub mod admin;
pub mod kafka;
