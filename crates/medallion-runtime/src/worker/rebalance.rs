//! Rebalance hooks and commits.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::http::Health;

/// Offsets (with metadata) stored after each batch, by partition: what a commit sends.
pub(super) type Positions = Arc<Mutex<BTreeMap<i32, (i64, Option<String>)>>>;

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

/// Rebalance hooks: commit before partitions go, track the assignment for `/readyz`.
pub(super) struct WorkerContext {
    pub(super) health: Arc<Health>,
    pub(super) assigned: Arc<Mutex<HashSet<i32>>>,
    pub(super) topic: String,
    pub(super) positions: Positions,
    /// Partitions revoked since the last batch, for the stage to drop their state.
    pub(super) revoked: Arc<Mutex<Vec<i32>>>,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Every batch is finished before the next poll, so the stored offsets are complete.
            let gone: Vec<i32> = partitions
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            if let Err(e) = commit_positions(consumer, &self.topic, &self.positions, Some(&gone)) {
                tracing::debug!(error = %e, "commit before revoke");
            }
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
