//! Partition state rebuilt on assignment (see [`crate::recovery`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::dedup::{event_key, DedupWindow};
use crate::error::StageError;
use crate::record::Inbound;

use super::*;

/// A newly assigned input partition, as its last owner committed it.
pub(super) struct Assigned {
    pub(super) partition: i32,
    pub(super) offset: Option<i64>,
    pub(super) snapshot: Option<crate::recovery::Snapshot>,
    /// The stage's own commit metadata.
    pub(super) metadata: Option<String>,
}

/// Records of an input tail, read for the dedup window.
#[derive(Default)]
pub(super) struct WindowChunk {
    /// (partition, offset, event key) of records that carry their key.
    pub(super) keyed: Vec<(i32, i64, u128)>,
    pub(super) undecoded: Vec<Inbound>,
}

impl<S: Stage> StageWorker<S> {
    /// Tells the stage about partitions it lost and partitions it sees for the first time
    /// (with the metadata committed with their offsets), after rebuilding what the worker
    /// knew of them: their dedup windows and what was produced after their last commit.
    pub(super) async fn sync_partitions(
        &mut self,
        consumer: &Arc<StreamConsumer<WorkerContext>>,
    ) -> Result<(), WorkerError> {
        self.apply_revocations();
        // Every partition assigned and not yet set up, not only those in this batch: one
        // rebuild for a whole assignment. A batch's record of a partition no longer assigned
        // is not set up (it is dropped before planning).
        let assigned_now = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        let fresh: Vec<i32> = match self.ledger.lock() {
            Ok(ledger) => assigned_now
                .into_iter()
                .filter(|p| !ledger.contains(*p))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            Err(_) => Vec::new(),
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for partition in &fresh {
            tpl.add_partition(&self.topo.input_topic, *partition);
        }
        // A blocking broker call, off the runtime's threads (works on any runtime flavour).
        let reader = Arc::clone(consumer);
        let committed = tokio::task::spawn_blocking(move || {
            reader.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|e| WorkerError::Rebuild(format!("reading committed offsets: {e}")))??;
        let assigned: Vec<Assigned> = fresh
            .into_iter()
            .map(|partition| {
                let elem = committed.find_partition(&self.topo.input_topic, partition);
                let offset = elem.as_ref().and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                let (snapshot, metadata) = elem
                    .as_ref()
                    .map(|e| crate::recovery::unwrap(e.metadata()))
                    .unwrap_or((None, None));
                Assigned {
                    partition,
                    offset,
                    snapshot,
                    metadata,
                }
            })
            .collect();
        self.recover_with_retry(&assigned).await?;
        for a in assigned {
            self.stage
                .assign(a.partition, a.metadata)
                .await
                .map_err(|source| WorkerError::Restore {
                    partition: a.partition,
                    source,
                })?;
        }
        Ok(())
    }

    /// [`Self::recover`], retried along the retry schedule while the broker or registry is
    /// away; then the worker stops (its replacement starts over).
    pub(super) async fn recover_with_retry(
        &mut self,
        assigned: &[Assigned],
    ) -> Result<(), WorkerError> {
        let mut attempt = 1usize;
        loop {
            match self.recover(assigned).await {
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
    /// dead-lettered: they were never taken), and reads the output and DLQ from the snapshot
    /// committed with it to their end (see [`crate::recovery`]).
    pub(super) async fn recover(&mut self, assigned: &[Assigned]) -> Result<(), WorkerError> {
        use crate::recovery::{read_stretches, Stretch};
        let started = Instant::now();
        let window = i64::try_from(self.window_capacity).unwrap_or(i64::MAX);
        let fresh: HashSet<i32> = assigned.iter().map(|a| a.partition).collect();

        // 1. The input's tail before each committed offset. Records stamped by an upstream
        // stage need no decoding; the others are decoded in chunks as they are read.
        let tail: Vec<Stretch> = assigned
            .iter()
            .filter_map(|a| {
                a.offset.map(|c| Stretch {
                    partition: a.partition,
                    from: c.saturating_sub(window).max(0),
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
            let read = read_stretches(&kafka, &input_topic, &tail, |m| {
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
                match self.event_keys(&chunk.undecoded).await {
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

        // 2. What was produced after the last commits, and the dead letters of the tail.
        let kafka = self.kafka.clone();
        let topics = crate::recovery::Topics {
            input: self.topo.input_topic.clone(),
            output: self.topo.output.as_ref().map(|o| o.topic.clone()),
            dlq: self.topo.dlq_topic.clone(),
        };
        let pending: Vec<(i32, Option<i64>, Option<crate::recovery::Snapshot>)> = assigned
            .iter()
            .map(|a| (a.partition, a.offset, a.snapshot.clone()))
            .collect();
        let scan_fresh = fresh.clone();
        let after = tokio::task::spawn_blocking(move || {
            // A partition never committed and still empty has produced nothing: it does not
            // widen the scan (an idle partition would otherwise send every rebuild to the
            // fallback of the last `window` records).
            let input = crate::recovery::watermarks(&kafka, &topics.input)?;
            let snapshots: Vec<Option<crate::recovery::Snapshot>> = pending
                .into_iter()
                .filter(|(p, offset, snapshot)| {
                    snapshot.is_some()
                        || offset.is_some()
                        || input.get(p).is_none_or(|(low, high)| high > low)
                })
                .map(|(_, _, snapshot)| snapshot)
                .collect();
            crate::recovery::after_commit(
                &kafka,
                &topics,
                &snapshots,
                &scan_fresh,
                window,
                earliest,
            )
        })
        .await
        .map_err(|e| WorkerError::Rebuild(format!("recovery reader: {e}")))??;

        let committed: HashMap<i32, i64> = assigned
            .iter()
            .filter_map(|a| a.offset.map(|c| (a.partition, c)))
            .collect();
        let dead: HashSet<(i32, i64)> = after.dead_letters.into_iter().collect();
        let mut windows: HashMap<i32, DedupWindow> = fresh
            .iter()
            .map(|p| (*p, DedupWindow::new(self.window_capacity)))
            .collect();
        seen.sort_unstable_by_key(|(p, o, _)| (*p, *o));
        for (partition, offset, key) in seen {
            if dead.contains(&(partition, offset)) {
                continue;
            }
            if let Some(w) = windows.get_mut(&partition) {
                w.insert(key);
            }
        }
        let remembered: usize = windows.values().map(DedupWindow::len).sum();
        if let Ok(mut ledger) = self.ledger.lock() {
            for (partition, window) in windows {
                ledger.assign(partition, window);
            }
        }
        let after_commit = after.output_keys.len();
        for key in after.output_keys {
            self.replayed.insert(key);
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
            input_records_read = read,
            remembered,
            outputs_after_last_commit = after_commit,
            dead_letters_after_last_commit = self.dead_before.len() - before,
            took_ms = started.elapsed().as_millis() as u64,
            "partition state rebuilt"
        );
        Ok(())
    }

    /// (partition, offset, event key) of `messages`, decoded with the input contract.
    pub(super) async fn event_keys(
        &mut self,
        messages: &[Inbound],
    ) -> Result<Vec<(i32, i64, u128)>, StageError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let decoded = self.decode(messages).await?;
        let Some(ids) = decoded
            .batch
            .column_by_name("event_id")
            .and_then(|c| c.as_string_opt::<i32>())
        else {
            return Ok(Vec::new());
        };
        Ok(decoded
            .rows
            .iter()
            .enumerate()
            .filter(|(row, _)| !ids.is_null(*row))
            .map(|(row, &index)| {
                let m = &messages[index];
                (m.partition(), m.offset(), event_key(ids.value(row)))
            })
            .collect())
    }

    /// Drops the output records a previous owner already produced and the dead letters it
    /// already wrote; returns how many.
    pub(super) fn drop_replayed(&mut self, outgoing: &mut Vec<Outgoing>) -> u64 {
        if self.replayed.is_empty() && self.dead_before.is_empty() {
            return 0;
        }
        let before = outgoing.len();
        let output = self.topo.output.as_ref().map(|o| o.topic.as_str());
        let (replayed, dead_before) = (&self.replayed, &mut self.dead_before);
        outgoing.retain(|o| {
            let produced = Some(o.topic.as_str()) == output
                && o.event_key.is_some_and(|k| replayed.contains(k));
            !(produced
                || o.dead_origin
                    .is_some_and(|origin| dead_before.remove(&origin)))
        });
        (before - outgoing.len()) as u64
    }

    /// The output and DLQ as they are now: the last offset of each partition.
    pub(super) async fn outputs_now(&self) -> Result<crate::recovery::Snapshot, WorkerError> {
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
            Ok::<_, crate::recovery::RecoveryError>(crate::recovery::Snapshot {
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
