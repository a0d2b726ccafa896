//! Integration tests against a real broker (tansu), a real registry (rivven-schema) and the
//! worker binaries as separate processes.

mod bronze;
mod contracts;
mod stages;
