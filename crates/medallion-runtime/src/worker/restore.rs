//! The restorer: what the worker must know of a newly assigned partition before it plans a
//! record of it, rebuilt from Kafka (see [`crate::recovery`]): the dedup window of the input
//! before the committed offset (from its copy on disk and the input records after it, where
//! the worker has a state directory), what a previous owner produced and dead-lettered after
//! its last commit (not produced again), and the stage's own state ([`Stage::assign`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::message::Message;

use super::committer::Assigned;
use super::ledger::Ledger;
use super::planner::{Outgoing, Planner};
use super::stage::Stage;
use super::topology::Topology;
use super::WorkerError;
use crate::dedup::{DedupWindow, SavedWindow, WindowFiles};
use crate::kafka::KafkaConnection;
use crate::record::Inbound;
use crate::recovery::{Snapshot, Stretch};
use crate::retry::RetryPolicy;

/// What a replay dropped: outputs and dead letters a previous owner already produced. They
/// are counted as replayed, not again as outputs or dead letters.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Dropped {
    pub(super) outputs: u64,
    /// (input partition, offset) of the records whose dead letter was already written.
    pub(super) dead_letters: HashSet<(i32, i64)>,
}

impl Dropped {
    pub(super) fn total(&self) -> u64 {
        self.outputs + self.dead_letters.len() as u64
    }
}

/// The input tail before the committed offsets, as the dedup window needs it.
struct InputTail {
    /// (partition, offset, event key) of every record read.
    seen: Vec<(i32, i64, u128)>,
    read: u64,
    /// The earliest timestamp among them.
    earliest: Option<i64>,
}

/// Records of an input tail, read for the dedup window.
#[derive(Default)]
struct WindowChunk {
    /// (partition, offset, event key) of records that carry their key.
    keyed: Vec<(i32, i64, u128)>,
    undecoded: Vec<Inbound>,
}

pub(super) struct Restorer {
    kafka: KafkaConnection,
    topo: Arc<Topology>,
    window_capacity: usize,
    policy: RetryPolicy,
    /// Event keys of outputs a previous owner produced after its last commit, and the input
    /// records it dead-lettered then: not produced again.
    replayed: DedupWindow,
    dead_before: HashSet<(i32, i64)>,
    /// Copies of the dedup windows on local disk, with a state directory.
    files: Option<WindowFiles>,
}

impl Restorer {
    pub(super) fn new(
        kafka: KafkaConnection,
        topo: Arc<Topology>,
        window_capacity: usize,
        policy: RetryPolicy,
        files: Option<WindowFiles>,
    ) -> Self {
        Self {
            kafka,
            topo,
            window_capacity,
            policy,
            replayed: DedupWindow::new(window_capacity.saturating_mul(4)),
            dead_before: HashSet::new(),
            files,
        }
    }

    /// The copies on disk of the windows of `assigned` that serve their committed offsets.
    pub(super) async fn saved_windows(&self, assigned: &[Assigned]) -> HashMap<i32, SavedWindow> {
        let Some(files) = self.files.clone() else {
            return HashMap::new();
        };
        let committed: Vec<(i32, i64)> = assigned
            .iter()
            .filter_map(|a| a.offset.map(|c| (a.partition, c)))
            .collect();
        tokio::task::spawn_blocking(move || {
            committed
                .into_iter()
                .filter_map(|(p, c)| files.read(p, c).map(|saved| (p, saved)))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Rebuilds what the worker knew of newly `assigned` partitions (their dedup windows, what
    /// was produced after their last commit), then tells the stage, with the metadata
    /// committed with each offset, so it restores its own state.
    pub(super) async fn restore<S: Stage>(
        &mut self,
        assigned: Vec<Assigned>,
        saved: HashMap<i32, SavedWindow>,
        ledger: &Mutex<Ledger>,
        planner: &mut Planner,
        stage: &mut S,
    ) -> Result<(), WorkerError> {
        self.recover_with_retry(&assigned, &saved, ledger, planner)
            .await?;
        stage
            .assign_all(
                assigned
                    .into_iter()
                    .map(|a| (a.partition, a.metadata))
                    .collect(),
            )
            .await
            .map_err(|(partition, source)| WorkerError::Restore { partition, source })
    }

    /// [`Self::recover`], retried along the retry schedule while the broker or registry is
    /// away; then the worker stops (its replacement starts over).
    async fn recover_with_retry(
        &mut self,
        assigned: &[Assigned],
        saved: &HashMap<i32, SavedWindow>,
        ledger: &Mutex<Ledger>,
        planner: &mut Planner,
    ) -> Result<(), WorkerError> {
        let mut attempt = 1usize;
        loop {
            match self.recover(assigned, saved, ledger, planner).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < self.policy.max_attempts() => {
                    let wait = self.policy.wait_forever(attempt);
                    tracing::warn!(error = %e, attempt, ?wait, "rebuilding partition state failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Rebuilds, for newly assigned partitions, the dedup window from the input's last
    /// `window_per_partition` records before the committed offset (less those that were
    /// dead-lettered: they were never taken): from the window's copy on disk and the records
    /// after it where there is one, else from the input alone. Then reads the output and DLQ
    /// from the snapshot committed with it to their end (see [`crate::recovery`]).
    async fn recover(
        &mut self,
        assigned: &[Assigned],
        saved: &HashMap<i32, SavedWindow>,
        ledger: &Mutex<Ledger>,
        planner: &mut Planner,
    ) -> Result<(), WorkerError> {
        let started = Instant::now();
        let fresh: HashSet<i32> = assigned.iter().map(|a| a.partition).collect();
        let tail = self.read_input_tail(assigned, saved, planner).await?;
        for a in assigned {
            tracing::debug!(partition = a.partition, committed = ?a.offset, outputs = ?a.snapshot,
                "where the outputs stood at the last commit");
        }
        let after = self.read_after_commit(assigned, tail.earliest).await?;

        let committed: HashMap<i32, i64> = assigned
            .iter()
            .filter_map(|a| a.offset.map(|c| (a.partition, c)))
            .collect();
        let dead: HashSet<(i32, i64)> = after.dead_letters.into_iter().collect();
        let mut windows: HashMap<i32, DedupWindow> = fresh
            .iter()
            .map(|p| (*p, DedupWindow::new(self.window_capacity)))
            .collect();
        let mut from_disk = 0usize;
        for (partition, saved) in saved {
            if let Some(w) = windows.get_mut(partition) {
                for (offset, key) in saved.entries() {
                    w.insert(key, offset);
                    from_disk += 1;
                }
            }
        }
        let mut seen = tail.seen;
        seen.sort_unstable_by_key(|(p, o, _)| (*p, *o));
        let mut from_input = 0usize;
        for (partition, offset, key) in seen {
            if dead.contains(&(partition, offset)) {
                continue;
            }
            if let Some(w) = windows.get_mut(&partition) {
                w.insert(key, offset);
                from_input += 1;
            }
        }
        let remembered: usize = windows.values().map(DedupWindow::len).sum();
        let restored = |source: &'static str, n: usize| {
            metrics::counter!(crate::metrics::DEDUP_WINDOW_RESTORED_TOTAL,
                "stage" => self.topo.group.clone(), "source" => source)
            .increment(n as u64);
        };
        restored("disk", from_disk);
        restored("input", from_input);
        if let Ok(mut ledger) = ledger.lock() {
            for (partition, window) in windows {
                ledger.assign(partition, window);
            }
        }
        let after_commit = after.output_keys.len();
        // Keys of output records: no input offset goes with them (the window is never copied).
        for key in after.output_keys {
            self.replayed.insert(key, -1);
        }
        // Dead letters of records at or after the committed offset are not written again.
        let before = self.dead_before.len();
        self.dead_before.extend(
            dead.into_iter()
                .filter(|(p, o)| committed.get(p).is_none_or(|c| o >= c)),
        );
        tracing::info!(
            partitions = ?fresh,
            with_snapshot = assigned.iter().filter(|a| a.snapshot.is_some()).count(),
            committed = committed.len(),
            input_records_read = tail.read,
            remembered_from_disk = from_disk,
            remembered,
            outputs_after_last_commit = after_commit,
            dead_letters_after_last_commit = self.dead_before.len() - before,
            took_ms = started.elapsed().as_millis() as u64,
            "partition state rebuilt"
        );
        Ok(())
    }

    /// The event keys of the input's last `window` records before each committed offset,
    /// after what a `saved` copy of the window holds. Records stamped by an upstream stage
    /// need no decoding; the others are decoded in chunks as they are read.
    async fn read_input_tail(
        &self,
        assigned: &[Assigned],
        saved: &HashMap<i32, SavedWindow>,
        planner: &mut Planner,
    ) -> Result<InputTail, WorkerError> {
        use crate::recovery::{read_stretches, READ_WITHIN};
        let window = i64::try_from(self.window_capacity).unwrap_or(i64::MAX);
        let tail: Vec<Stretch> = assigned
            .iter()
            .filter_map(|a| {
                let c = a.offset?;
                let from = c
                    .saturating_sub(window)
                    .max(saved.get(&a.partition).map_or(0, |s| s.upto));
                (from < c).then_some(Stretch {
                    partition: a.partition,
                    from,
                    until: Some(c),
                })
            })
            .collect();
        let (send, mut chunks) = tokio::sync::mpsc::channel::<WindowChunk>(4);
        let kafka = self.kafka.clone();
        let input_topic = self.topo.input_topic.clone();
        let reading = tokio::task::spawn_blocking(move || {
            let mut chunk = WindowChunk::default();
            let mut earliest: Option<i64> = None;
            let read = read_stretches(&kafka, &input_topic, &tail, READ_WITHIN, |m| {
                if let Some(t) = m.timestamp().to_millis() {
                    earliest = Some(earliest.map_or(t, |e| e.min(t)));
                }
                match m.headers().and_then(crate::recovery::event_key_of) {
                    Some(key) => chunk.keyed.push((m.partition(), m.offset(), key)),
                    None => chunk.undecoded.push(Inbound::copy_of(m)),
                }
                if chunk.keyed.len() + chunk.undecoded.len() >= 2_000 {
                    let _ = send.blocking_send(std::mem::take(&mut chunk));
                }
            });
            let _ = send.blocking_send(chunk);
            read.map(|read| (read, earliest))
        });
        let mut seen: Vec<(i32, i64, u128)> = Vec::new();
        let mut decode_error = None;
        while let Some(chunk) = chunks.recv().await {
            seen.extend(chunk.keyed);
            if decode_error.is_none() {
                match planner.event_keys(&chunk.undecoded).await {
                    Ok(decoded) => seen.extend(decoded),
                    Err(e) => decode_error = Some(e),
                }
            }
        }
        let (read, earliest) = reading
            .await
            .map_err(|e| WorkerError::Rebuild(format!("recovery reader: {e}")))??;
        if let Some(e) = decode_error {
            return Err(WorkerError::Rebuild(format!(
                "decoding the input tail for the dedup window: {e}"
            )));
        }
        Ok(InputTail {
            seen,
            read,
            earliest,
        })
    }

    /// What was produced after the last commits of `assigned`, and the dead letters of their
    /// input tail (written since `earliest`, the tail's first timestamp).
    async fn read_after_commit(
        &self,
        assigned: &[Assigned],
        earliest: Option<i64>,
    ) -> Result<crate::recovery::AfterCommit, WorkerError> {
        let window = i64::try_from(self.window_capacity).unwrap_or(i64::MAX);
        let kafka = self.kafka.clone();
        let topics = crate::recovery::Topics {
            input: self.topo.input_topic.clone(),
            output: self.topo.output.as_ref().map(|o| o.topic.clone()),
            dlq: self.topo.dlq_topic.clone(),
        };
        let pending: Vec<(i32, Option<i64>, Option<Snapshot>)> = assigned
            .iter()
            .map(|a| (a.partition, a.offset, a.snapshot.clone()))
            .collect();
        let fresh: HashSet<i32> = assigned.iter().map(|a| a.partition).collect();
        let after = tokio::task::spawn_blocking(move || {
            // A partition never committed and still empty has produced nothing: it does not
            // widen the scan (an idle partition would otherwise send every rebuild to the
            // fallback of the last `window` records).
            let input = crate::recovery::watermarks(&kafka, &topics.input)?;
            let snapshots: Vec<Option<Snapshot>> = pending
                .into_iter()
                .filter(|(p, offset, snapshot)| {
                    snapshot.is_some()
                        || offset.is_some()
                        || input.get(p).is_none_or(|(low, high)| high > low)
                })
                .map(|(_, _, snapshot)| snapshot)
                .collect();
            crate::recovery::after_commit(&kafka, &topics, &snapshots, &fresh, window, earliest)
        })
        .await
        .map_err(|e| WorkerError::Rebuild(format!("recovery reader: {e}")))??;
        Ok(after)
    }

    /// Drops the output records a previous owner already produced and the dead letters it
    /// already wrote; returns how many.
    pub(super) fn drop_replayed(&mut self, outgoing: &mut Vec<Outgoing>) -> Dropped {
        let mut dropped = Dropped::default();
        if self.replayed.is_empty() && self.dead_before.is_empty() {
            return dropped;
        }
        let output = self.topo.output.as_ref().map(|o| o.topic.as_str());
        let (replayed, dead_before) = (&self.replayed, &mut self.dead_before);
        outgoing.retain(|o| {
            if Some(o.topic.as_str()) == output && o.event_key.is_some_and(|k| replayed.contains(k))
            {
                dropped.outputs += 1;
                return false;
            }
            match o.dead_origin {
                Some(origin) if dead_before.remove(&origin) => {
                    dropped.dead_letters.insert(origin);
                    false
                }
                _ => true,
            }
        });
        dropped
    }

    /// The output and DLQ as they are now: the last offset of each partition.
    pub(super) async fn outputs_now(&self) -> Result<Snapshot, WorkerError> {
        let kafka = self.kafka.clone();
        let dlq = self.topo.dlq_topic.clone();
        let output = self.topo.output.as_ref().map(|o| o.topic.clone());
        let last = |marks: BTreeMap<i32, (i64, i64)>| {
            marks
                .into_iter()
                .map(|(p, (_, high))| (p, high - 1))
                .collect()
        };
        let snapshot = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::recovery::RecoveryError>(Snapshot {
                output: match output {
                    Some(topic) => last(crate::recovery::watermarks(&kafka, &topic)?),
                    None => BTreeMap::new(),
                },
                dlq: last(crate::recovery::watermarks(&kafka, &dlq)?),
            })
        })
        .await
        .map_err(|e| WorkerError::Rebuild(format!("recovery reader: {e}")))??;
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use medallion_contracts::{project_root, ContractSet, TopicConfig};

    use super::*;
    use crate::worker::topology::topology;

    fn restorer() -> Restorer {
        let root = project_root();
        let contracts = ContractSet::load(&root.join("schemas")).expect("schemas");
        let topics = TopicConfig::load(&root.join("topic-config.yaml")).expect("topics");
        let topo = topology(&contracts, &topics, "bronze-processor").expect("topology");
        Restorer::new(
            KafkaConnection::plain("127.0.0.1:9").expect("connection"),
            Arc::new(topo),
            16,
            RetryPolicy::default(),
            None,
        )
    }

    fn outgoing(topic: &str, event_key: Option<u128>, dead_origin: Option<(i32, i64)>) -> Outgoing {
        Outgoing {
            event_key,
            dead_origin,
            ..Outgoing::empty(topic)
        }
    }

    #[test]
    fn what_a_previous_owner_produced_after_its_commit_is_not_produced_again() {
        let mut restorer = restorer();
        let output = restorer.topo.output.as_ref().expect("output").topic.clone();
        let dlq = restorer.topo.dlq_topic.clone();
        restorer.replayed.insert(7, -1);
        restorer.dead_before.insert((2, 40));
        let mut batch = vec![
            outgoing(&output, Some(7), None),
            outgoing(&output, Some(8), None),
            // The same key on another topic (an audit record) is not an output.
            outgoing("audit.events", Some(7), None),
            outgoing(&dlq, None, Some((2, 40))),
            outgoing(&dlq, None, Some((2, 41))),
        ];
        let dropped = restorer.drop_replayed(&mut batch);
        assert_eq!(dropped.outputs, 1);
        assert_eq!(dropped.dead_letters, HashSet::from([(2, 40)]));
        type Left<'a> = (&'a str, Option<u128>, Option<(i32, i64)>);
        let left: Vec<Left<'_>> = batch
            .iter()
            .map(|o| (o.topic.as_str(), o.event_key, o.dead_origin))
            .collect();
        assert_eq!(
            left,
            [
                (output.as_str(), Some(8), None),
                ("audit.events", Some(7), None),
                (dlq.as_str(), None, Some((2, 41))),
            ]
        );
        // A dead letter is skipped once: the same record failing again later is written.
        let mut again = vec![outgoing(&dlq, None, Some((2, 40)))];
        assert_eq!(restorer.drop_replayed(&mut again).total(), 0);
        assert_eq!(again.len(), 1);
    }
}
