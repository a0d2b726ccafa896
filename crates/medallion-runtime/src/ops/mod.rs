//! Operator tooling behind the `medallion` CLI: capture and replay of topics, consumer lag,
//! dead-letter inspection and redrive. Library functions, so tests and the replay benchmark use
//! exactly what operators run.

pub mod capture;
pub mod lag;
pub mod redrive;
