//! Storing and committing the ack frontier, and the rebalance hooks that do it before
//! partitions go.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::ledger::Ledger;
use crate::http::Health;
use crate::kafka::Flights;

/// Offsets (with metadata) stored for commit, by partition: what a commit sends.
pub(super) type Positions = Arc<Mutex<BTreeMap<i32, (i64, Option<String>)>>>;

/// Stores, for each of `partitions`, its frontier (see [`Ledger::frontier`]) with the
/// snapshot of the outputs in its metadata, where it moved since the last store.
pub(super) fn store_frontiers<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    ledger: &Ledger,
    positions: &Positions,
    partitions: impl Iterator<Item = i32>,
) {
    for partition in partitions {
        let Some(frontier) = ledger.frontier(partition) else {
            continue;
        };
        let offset = frontier.commit.offset;
        let metadata = Some(crate::recovery::wrap(
            &frontier.outputs,
            frontier.commit.metadata.as_deref(),
        ));
        let unchanged = positions
            .lock()
            .map(|p| p.get(&partition) == Some(&(offset, metadata.clone())))
            .unwrap_or(false);
        if unchanged {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        let stored = tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .and_then(|()| {
                if let (Some(metadata), Some(mut elem)) =
                    (metadata.as_ref(), tpl.find_partition(topic, partition))
                {
                    elem.set_metadata(metadata);
                }
                consumer.store_offsets(&tpl)
            });
        match stored {
            Ok(()) => {
                if let Ok(mut positions) = positions.lock() {
                    positions.insert(partition, (offset, metadata));
                }
            }
            // The partition moved to another replica meanwhile: it will redeliver.
            Err(e) => tracing::warn!(partition, offset, error = %e, "offset not stored"),
        }
    }
}

/// Commits `positions` of `partitions` (all when `None`) with their metadata. librdkafka's
/// commit of the "current state" drops stored metadata, so commits name their offsets.
pub(super) fn commit_positions<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topic: &str,
    positions: &Positions,
    partitions: Option<&[i32]>,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    if let Ok(positions) = positions.lock() {
        for (partition, (offset, metadata)) in positions.iter() {
            if partitions.is_some_and(|only| !only.contains(partition)) {
                continue;
            }
            let mut elem = tpl.add_partition(topic, *partition);
            elem.set_offset(Offset::Offset(*offset))?;
            if let Some(metadata) = metadata {
                elem.set_metadata(metadata);
            }
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer.commit(&tpl, CommitMode::Sync)
}

/// Rebalance hooks: before partitions go, wait for their flights, commit their frontier and
/// drop their ledger; track the assignment for `/readyz`.
pub(super) struct WorkerContext {
    pub(super) health: Arc<Health>,
    pub(super) assigned: Arc<Mutex<HashSet<i32>>>,
    pub(super) topic: String,
    pub(super) positions: Positions,
    pub(super) ledger: Arc<Mutex<Ledger>>,
    pub(super) flights: Arc<Flights>,
    /// How long a revocation waits for the flights of its partitions.
    pub(super) drain_timeout: Duration,
    /// Partitions revoked since the last batch, for the stage to drop their state.
    pub(super) revoked: Arc<Mutex<Vec<i32>>>,
}

impl WorkerContext {
    /// Waits for the flights of `gone` to land (up to the drain timeout), then stores and
    /// commits their frontier. A flight that does not land in time, or lands with records
    /// refused, keeps the frontier before it: the next owner reads those records again.
    fn drain(&self, consumer: &BaseConsumer<Self>, gone: &[i32]) {
        let waiting: Vec<_> = match self.ledger.lock() {
            Ok(ledger) => {
                let mut w: Vec<_> = gone.iter().flat_map(|p| ledger.waiting_on(*p)).collect();
                w.sort_unstable();
                w.dedup();
                w
            }
            Err(_) => return,
        };
        if !waiting.is_empty() && !self.flights.wait_blocking(&waiting, self.drain_timeout) {
            tracing::warn!(
                flights = waiting.len(),
                "revoked partitions' records not all acknowledged in time; committing before them"
            );
        }
        if let Ok(mut ledger) = self.ledger.lock() {
            for flight in waiting {
                if self.flights.all_landed(&[flight]) && !self.flights.failed(flight) {
                    ledger.landed(flight);
                }
            }
            store_frontiers(
                consumer,
                &self.topic,
                &ledger,
                &self.positions,
                gone.iter().copied(),
            );
            for p in gone {
                ledger.revoke(*p);
            }
        }
        if let Err(e) = commit_positions(consumer, &self.topic, &self.positions, Some(gone)) {
            tracing::debug!(error = %e, "commit before revoke");
        }
    }
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let gone: Vec<i32> = partitions
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            self.drain(consumer, &gone);
            if let Ok(mut positions) = self.positions.lock() {
                positions.retain(|p, _| !gone.contains(p));
            }
            if let Ok(mut assigned) = self.assigned.lock() {
                for p in &gone {
                    assigned.remove(p);
                }
            }
            if let Ok(mut revoked) = self.revoked.lock() {
                revoked.extend(gone);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        let current: HashSet<i32> = consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        self.health.set_assigned(!current.is_empty());
        tracing::info!(partitions = ?current, "assignment changed");
        if let Ok(mut assigned) = self.assigned.lock() {
            *assigned = current;
        }
    }
}
