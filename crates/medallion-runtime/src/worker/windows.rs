//! The window keeper: with a state directory, the worker copies each partition's dedup window
//! to disk ([`WindowFiles`]) every `state.checkpoint_interval_ms`, off the loop's thread, and
//! once more at shutdown, at the offsets its last commit takes. A copy holds only what was taken below the
//! offset stored for commit when it was made, and the metadata stored with that offset, so a
//! restart on the same disk reads the input from that offset to the committed one instead of
//! the window's whole length, and knows where the outputs stood at that commit even from a
//! broker that drops commit metadata (see [`super::restore`]). Writing is best effort: a copy
//! that fails is logged and the window is rebuilt from the input as without one.
//!
//! A copy is encoded straight from the window, one partition at a time under the ledger's
//! lock (a couple of milliseconds for 100,000 ids), so what it costs in memory is one
//! partition's file, not a second copy of every window.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ledger::Ledger;
use crate::dedup::WindowFiles;

/// What is stored for commit of a partition: the offset and its metadata.
type Stored = (i64, Option<String>);

/// The partitions to copy, each with what was stored for its commit.
pub(super) type Due = Vec<(i32, Stored)>;

pub(super) struct WindowKeeper {
    files: Option<WindowFiles>,
    every: Duration,
    last: Instant,
    /// What was stored for commit of each partition when its copy on disk was made.
    written: HashMap<i32, Stored>,
    writing: Option<tokio::task::JoinHandle<()>>,
}

impl WindowKeeper {
    pub(super) fn new(files: Option<WindowFiles>, every: Duration) -> Self {
        Self {
            files,
            every,
            last: Instant::now(),
            written: HashMap::new(),
            writing: None,
        }
    }

    /// Whether a copy is due: there are files to keep, the interval passed and the last
    /// copy was written.
    pub(super) fn due(&self) -> bool {
        self.files.is_some()
            && self.last.elapsed() >= self.every
            && self.writing.as_ref().is_none_or(|w| w.is_finished())
    }

    /// Copies, in the background, the windows of the partitions whose `stored` offset (or its
    /// metadata) changed since their last copy.
    pub(super) fn copy(&mut self, ledger: &Arc<Mutex<Ledger>>, stored: &BTreeMap<i32, Stored>) {
        self.last = Instant::now();
        let Some(files) = self.files.clone() else {
            return;
        };
        let due = self.collect(ledger, stored);
        if !due.is_empty() {
            let ledger = ledger.clone();
            self.writing = Some(tokio::task::spawn_blocking(move || {
                write(&files, &ledger, due)
            }));
        }
    }

    /// At shutdown, at the offsets the last commit takes: copies `due` and waits for it.
    pub(super) async fn close(&mut self, ledger: &Arc<Mutex<Ledger>>, due: Due) {
        if let Some(writing) = self.writing.take() {
            let _ = writing.await;
        }
        if let (Some(files), false) = (self.files.clone(), due.is_empty()) {
            let ledger = ledger.clone();
            let _ = tokio::task::spawn_blocking(move || write(&files, &ledger, due)).await;
        }
    }

    /// The partitions to copy: those in the ledger whose stored offset or metadata changed.
    pub(super) fn collect(
        &mut self,
        ledger: &Mutex<Ledger>,
        stored: &BTreeMap<i32, Stored>,
    ) -> Due {
        if self.files.is_none() {
            return Vec::new();
        }
        let Ok(ledger) = ledger.lock() else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for (&partition, position) in stored {
            if self.written.get(&partition) == Some(position) || !ledger.contains(partition) {
                continue;
            }
            due.push((partition, position.clone()));
            self.written.insert(partition, position.clone());
        }
        due
    }
}

/// Writes the copies of `due`, each encoded from its window under the ledger's lock.
fn write(files: &WindowFiles, ledger: &Mutex<Ledger>, due: Due) {
    let started = Instant::now();
    let mut bytes_written = 0usize;
    for (partition, (upto, metadata)) in &due {
        let encoded = match ledger.lock() {
            Ok(ledger) => ledger.get(*partition).map(|p| {
                files.encode(
                    *partition,
                    *upto,
                    metadata.as_deref(),
                    p.window.below(*upto),
                )
            }),
            Err(_) => None,
        };
        // Revoked meanwhile: its next owner rebuilds it.
        let Some(encoded) = encoded else {
            continue;
        };
        match files.write_encoded(*partition, &encoded) {
            Ok(()) => bytes_written += encoded.len(),
            Err(error) => {
                tracing::warn!(partition, %error, "copying the dedup window to disk failed; a restart rebuilds it from the input");
            }
        }
    }
    tracing::debug!(
        partitions = due.len(),
        bytes_written,
        took_ms = started.elapsed().as_millis() as u64,
        "dedup windows copied to disk"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::DedupWindow;

    #[tokio::test]
    async fn copies_what_was_taken_below_the_stored_offset_of_partitions_that_moved() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = WindowFiles::new(dir.path(), "g t");
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        if let Ok(mut l) = ledger.lock() {
            for p in [0, 1] {
                let mut window = DedupWindow::new(100);
                for offset in 0..10 {
                    window.insert(u128::from(p as u32) << 64 | offset as u128, offset);
                }
                l.assign(p, window);
            }
        }
        let mut keeper = WindowKeeper::new(Some(files.clone()), Duration::ZERO);
        assert!(keeper.due());
        // Partition 2 is not this worker's any more: no copy.
        let at = |offset: i64, meta: &str| (offset, Some(meta.to_string()));
        let stored = BTreeMap::from([(0, at(4, "m4")), (1, at(7, "m7")), (2, at(3, "m3"))]);
        keeper.copy(&ledger, &stored);
        keeper.close(&ledger, Vec::new()).await;
        let zero = files.read(0, 4).expect("partition 0");
        assert_eq!(zero.upto, 4);
        assert_eq!(zero.metadata.as_deref(), Some("m4"));
        assert_eq!(
            zero.entries().collect::<Vec<_>>(),
            (0..4).map(|o| (o, o as u128)).collect::<Vec<_>>()
        );
        assert_eq!(files.read(1, 7).map(|w| w.entries().count()), Some(7));
        assert_eq!(files.read(2, 3), None);
        // Nothing changed: nothing to copy. Partition 1 moved, partition 0's metadata
        // changed: those two.
        assert!(keeper.collect(&ledger, &stored).is_empty());
        let moved = keeper.collect(
            &ledger,
            &BTreeMap::from([(0, at(4, "m4 again")), (1, at(9, "m9"))]),
        );
        assert_eq!(
            moved.iter().map(|(p, (o, _))| (*p, *o)).collect::<Vec<_>>(),
            [(0, 4), (1, 9)]
        );
        // Written at shutdown, awaited.
        keeper.close(&ledger, moved).await;
        assert_eq!(files.read(1, 9).map(|w| w.entries().count()), Some(9));
        assert_eq!(
            files.read(0, 4).and_then(|w| w.metadata).as_deref(),
            Some("m4 again")
        );
    }
}
