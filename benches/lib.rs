//! Shared setup of Medallion's benchmarks.

use medallion_contracts::json::to_framed;
use medallion_contracts::sample::SampleEvents;
use medallion_contracts::{Contract, ContractSet};

/// The connector contract of the repository.
pub fn connector_contract() -> Contract {
    contract("connector/data-raw.avsc")
}

/// A contract of the repository by path under `schemas/`.
pub fn contract(path: &str) -> Contract {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let contracts = match ContractSet::load(&root) {
        Ok(c) => c,
        Err(e) => panic!("schemas: {e}"),
    };
    match contracts.get(path) {
        Some(c) => c.clone(),
        None => panic!("{path} missing"),
    }
}

/// `n` Confluent-framed connector events under schema id `id` (`unique` distinct events,
/// repeated).
pub fn framed_events(contract: &Contract, id: u32, n: usize, unique: usize) -> Vec<Vec<u8>> {
    let mut events = SampleEvents::new(11, 16, 1_735_200_000_000);
    let distinct: Vec<Vec<u8>> = (0..unique.max(1))
        .map(
            |_| match to_framed(&events.next_event(), &contract.schema, id) {
                Ok(m) => m,
                Err(e) => panic!("frame: {e}"),
            },
        )
        .collect();
    distinct.iter().cycle().take(n).cloned().collect()
}
