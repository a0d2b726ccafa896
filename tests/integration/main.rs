//! Integration tests against a real broker (tansu), a real registry (rivven-schema) and the
//! worker binaries as separate processes.

mod audit;
mod bronze;
mod chaos;
mod contracts;
mod drift;
mod fairness;
mod faults;
mod feeds;
mod gateway;
mod isolation;
mod notify;
mod ops;
mod stages;
mod tenants;
mod writers;
