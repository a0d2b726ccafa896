//! A stage's keyed state, per input partition, on the local store ([`crate::store`]): the
//! changelog topic stays the source of truth, the store is its copy on disk, and memory is a
//! bounded cache of recently used entries in front of it, whatever the number of keys.
//!
//! - [`KeyedState::assign`] brings a partition's table up to date from its changelog (the tail
//!   after its checkpoint, or the whole partition into an emptied table) before the stage
//!   decides anything on it.
//! - [`KeyedState::put`] writes the store; the stage produces the changelog update itself
//!   (with the batch, so it lands before the input offset is committed).
//! - [`KeyedState::after_batch`] records, every `state.checkpoint_interval_ms` for a partition
//!   whose state changed, the changelog offset its files hold: the changelog's end, fetched
//!   after the writes it covers were made, so the checkpoint never runs ahead of the files.
//!   A partition revoked while its end was being fetched keeps no checkpoint: another owner may
//!   write its changelog from then on, and the fetch may have come after the partition was
//!   lost (a session that expired before the revocation was seen), so its table is rebuilt the
//!   next time this disk serves it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::changelog::{restore_into, RestoreIntoError, Restored};
use crate::config::StateConfig;
use crate::error::{SetupError, StageError};
use crate::kafka::{KafkaConnection, ReaderContext};
use crate::store::{Found, StateStore, StoreError, StoreOptions, Table};

/// A value kept in keyed state: its changelog encoding.
pub trait StateValue: Clone + Send + 'static {
    fn encode(&self) -> Vec<u8>;
    /// `None` for a value that does not decode (read as absent, as a restore skips it).
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// Opens the store of `group` as `config` says: `<dir>/<group>`, or, without a `dir`, a
/// directory of this process under the temp directory (emptied first, so every start
/// rebuilds). `identity` names what the store holds (the group and its changelogs): a store
/// that holds anything else is discarded.
pub fn open_store(
    config: &StateConfig,
    group: &str,
    identity: &str,
) -> Result<StateStore, SetupError> {
    let dir = match &config.dir {
        Some(base) => base.join(group),
        None => {
            let base = std::env::temp_dir().join("medallion-state");
            remove_abandoned(&base, group);
            static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = OPENED.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("{group}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            dir
        }
    };
    let store = StateStore::open(StoreOptions {
        dir: dir.clone(),
        identity: identity.to_string(),
        cache_bytes: config.cache_mib << 20,
        write_buffer_bytes: config.write_buffer_mib << 20,
    })
    .map_err(|e| SetupError::config("state.dir", e))?;
    match store.found() {
        Found::Reopened => tracing::info!(dir = %dir.display(), "state store reopened"),
        Found::New => tracing::info!(dir = %dir.display(), "state store created"),
        Found::Discarded => {
            tracing::warn!(dir = %dir.display(), "state store discarded; rebuilt from the changelogs")
        }
    }
    Ok(store)
}

/// Removes temporary stores of `group` under `base` that no process holds any more (left by
/// a process that was killed).
fn remove_abandoned(base: &Path, group: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let prefix = format!("{group}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(lock) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".lock"))
            .map(|_| entry.path())
        else {
            continue;
        };
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&lock) else {
            continue;
        };
        if file.try_lock().is_ok() {
            let dir: PathBuf = lock.with_extension("");
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&lock);
        }
    }
}

/// Recently used entries, decoded, in two generations: a lookup promotes an entry of the old
/// generation into the young one, and when the young one is full the old one is dropped. At
/// most `capacity` entries in all, in O(1) per operation.
pub struct HotCache<V> {
    half: usize,
    young: HashMap<Box<[u8]>, V>,
    old: HashMap<Box<[u8]>, V>,
}

impl<V: Clone> HotCache<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            half: (capacity / 2).max(1),
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }

    pub fn get(&mut self, key: &[u8]) -> Option<V> {
        if let Some(v) = self.young.get(key) {
            return Some(v.clone());
        }
        let (key, value) = self.old.remove_entry(key)?;
        self.insert_boxed(key, value.clone());
        Some(value)
    }

    pub fn insert(&mut self, key: &[u8], value: V) {
        self.insert_boxed(key.into(), value);
    }

    fn insert_boxed(&mut self, key: Box<[u8]>, value: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.old.remove(&key);
        self.young.insert(key, value);
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Drops every entry whose key `drop` says.
    pub fn forget(&mut self, mut drop: impl FnMut(&[u8]) -> bool) {
        self.young.retain(|k, _| !drop(k));
        self.old.retain(|k, _| !drop(k));
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One assigned partition.
struct Part {
    table: Table,
    /// Set when the partition is revoked: a checkpoint being taken is dropped.
    revoked: Arc<AtomicBool>,
    /// Written since its last checkpoint began.
    dirty: bool,
}

impl Part {
    fn new(table: Table) -> Self {
        Self {
            table,
            revoked: Arc::new(AtomicBool::new(false)),
            dirty: false,
        }
    }
}

/// The keyed state of every assigned partition of one stage state (named by its changelog).
pub struct KeyedState<V> {
    store: StateStore,
    kafka: KafkaConnection,
    changelog: String,
    /// Recently used entries of every assigned partition, keyed by partition and key.
    cache: HotCache<V>,
    /// The cache key being looked up (partition, then key), reused.
    scratch: Vec<u8>,
    /// Writes not yet in the store, per partition: read before the cache, applied as one
    /// atomic batch per partition at the end of the stage's batch ([`Self::after_batch`]).
    pending: HashMap<i32, HashMap<Box<[u8]>, V>>,
    every: Duration,
    parts: HashMap<i32, Part>,
    last_round: Instant,
    round: Option<tokio::task::JoinHandle<()>>,
    /// The partitions of the round under way.
    in_round: Vec<i32>,
    /// Partitions revoked while a round that included them was under way: the end it fetched
    /// may postdate the loss of the partition (a session that expired before the revocation
    /// was seen), so their checkpoints are forgotten once it is over.
    forget: Vec<i32>,
    /// The client that fetches the changelog's end for a checkpoint, made at the first one.
    marks: Option<Arc<BaseConsumer<ReaderContext>>>,
}

/// Partitions restored at once by [`KeyedState::assign_all`]: each a reader of its own
/// (prefetch bounded to a few thousand records by `queued.min.messages`) and a blocking thread.
pub const RESTORES_AT_ONCE: usize = 6;

impl<V: StateValue> KeyedState<V> {
    pub fn new(
        store: StateStore,
        kafka: KafkaConnection,
        changelog: impl Into<String>,
        config: &StateConfig,
    ) -> Self {
        Self {
            store,
            kafka,
            changelog: changelog.into(),
            cache: HotCache::new(config.hot_entries),
            scratch: Vec::new(),
            pending: HashMap::new(),
            every: Duration::from_millis(config.checkpoint_interval_ms),
            parts: HashMap::new(),
            last_round: Instant::now(),
            round: None,
            in_round: Vec::new(),
            forget: Vec::new(),
            marks: None,
        }
    }

    /// The store the state lives in (for the stage's other tables).
    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Brings `partition`'s table up to date with its changelog; the stage may decide on the
    /// partition once this returns.
    pub async fn assign(&mut self, partition: i32) -> Result<Restored, StageError> {
        self.assign_all(&[partition])
            .await
            .map_err(|(_, e)| e)?
            .pop()
            .ok_or_else(|| StageError::Internal(format!("partition {partition} not restored")))
    }

    /// [`Self::assign`] for every partition of an assignment, up to [`RESTORES_AT_ONCE`] at
    /// a time: a restore mostly waits on the broker (a reader's start, its fetches), so twelve
    /// one after the other cost a restart ~3 s even with nothing to read. The tables are taken
    /// only once every restore succeeded; an error names its partition.
    pub async fn assign_all(
        &mut self,
        partitions: &[i32],
    ) -> Result<Vec<Restored>, (i32, StageError)> {
        use futures::StreamExt;
        // A checkpoint still being written must not race the restore of the same table.
        self.finish_round().await;
        // Collected first: a lazy iterator's closure held across the awaits below would make
        // the future not `Send`.
        let mut restores = Vec::with_capacity(partitions.len());
        for &partition in partitions {
            let table = self.store.table(&self.changelog, partition);
            let kafka = self.kafka.clone();
            let changelog = self.changelog.clone();
            restores.push(async move {
                let started = Instant::now();
                let table = table.map_err(|e| (partition, StageError::restore(partition, e)))?;
                let (table, restored) = restore_into(&kafka, &changelog, partition, table)
                    .await
                    .map_err(|e| {
                        let e = match e {
                            RestoreIntoError::Read(e) => StageError::from(e),
                            RestoreIntoError::Store { partition, source } => {
                                StageError::restore(partition, source)
                            }
                        };
                        (partition, e)
                    })?;
                tracing::info!(
                    changelog = %changelog,
                    partition,
                    from = restored.from,
                    to = restored.to,
                    applied = restored.applied,
                    rebuilt = restored.rebuilt,
                    seconds = started.elapsed().as_secs_f64(),
                    "state restored from the changelog into the state store"
                );
                Ok::<_, (i32, StageError)>((partition, table, restored))
            });
        }
        let done: Vec<_> = futures::stream::iter(restores)
            .buffer_unordered(RESTORES_AT_ONCE)
            .collect()
            .await;
        let done: Vec<_> = done.into_iter().collect::<Result<_, _>>()?;
        Ok(done
            .into_iter()
            .map(|(partition, table, restored)| {
                self.parts.insert(partition, Part::new(table));
                restored
            })
            .collect())
    }

    /// Takes `partition` with its table as the disk holds it, without reading the changelog:
    /// for a stage run without a broker (tests, tools), never for a worker's assignment.
    pub fn adopt(&mut self, partition: i32) -> Result<(), StageError> {
        let table = self.store.table(&self.changelog, partition)?;
        self.parts.insert(partition, Part::new(table));
        Ok(())
    }

    pub fn revoke(&mut self, partition: i32) {
        if let Err(error) = self.flush_partition(partition) {
            tracing::warn!(%error, changelog = %self.changelog, partition,
                "writes of a revoked partition not stored (the changelog has them)");
        }
        if let Some(part) = self.parts.remove(&partition) {
            part.revoked.store(true, Ordering::Release);
        }
        if self.in_round.contains(&partition) && self.round.is_some() {
            self.forget.push(partition);
        }
        let prefix = partition.to_be_bytes();
        self.cache.forget(|k| k.starts_with(&prefix));
    }

    pub fn is_assigned(&self, partition: i32) -> bool {
        self.parts.contains_key(&partition)
    }

    fn part(&self, partition: i32) -> Result<&Part, StageError> {
        self.parts.get(&partition).ok_or_else(|| {
            StageError::Internal(format!(
                "state of partition {partition} of {} asked for while it is not assigned",
                self.changelog
            ))
        })
    }

    /// The value of `key` in `partition`.
    pub fn get(&mut self, partition: i32, key: &[u8]) -> Result<Option<V>, StageError> {
        if let Some(v) = self.pending.get(&partition).and_then(|p| p.get(key)) {
            return Ok(Some(v.clone()));
        }
        self.set_scratch(partition, key);
        if let Some(v) = self.cache.get(&self.scratch) {
            return Ok(Some(v));
        }
        let Some(bytes) = self.part(partition)?.table.get(key)? else {
            return Ok(None);
        };
        let value = V::decode(&bytes);
        if let Some(v) = &value {
            self.cache.insert(&self.scratch, v.clone());
        }
        Ok(value)
    }

    fn set_scratch(&mut self, partition: i32, key: &[u8]) {
        self.scratch.clear();
        self.scratch.extend_from_slice(&partition.to_be_bytes());
        self.scratch.extend_from_slice(key);
    }

    /// Sets `key` in `partition` (the stage produces the changelog update); it reaches the
    /// store at the end of the batch.
    pub fn put(&mut self, partition: i32, key: &[u8], value: V) -> Result<(), StageError> {
        self.part(partition)?;
        self.pending
            .entry(partition)
            .or_default()
            .insert(key.into(), value);
        Ok(())
    }

    /// Applies `partition`'s pending writes to its table, as one batch, and to the cache.
    fn flush_partition(&mut self, partition: i32) -> Result<(), StageError> {
        let Some(writes) = self.pending.remove(&partition).filter(|w| !w.is_empty()) else {
            return Ok(());
        };
        let Some(part) = self.parts.get_mut(&partition) else {
            return Ok(());
        };
        part.table
            .apply(writes.iter().map(|(k, v)| (k.to_vec(), Some(v.encode()))))?;
        part.dirty = true;
        for (key, value) in writes {
            self.set_scratch(partition, &key);
            self.cache.insert(&self.scratch, value);
        }
        Ok(())
    }

    /// About how many keys the store holds for this state: every partition on this disk
    /// (their tables share one engine tree), 0 while none is assigned.
    pub fn approximate_len(&self) -> u64 {
        self.parts
            .values()
            .next()
            .map_or(0, |p| p.table.approximate_len())
    }

    /// Stores the batch's writes, then starts a checkpoint of the partitions written since the
    /// last one, if one is due and none is under way. Call it after each batch; it never waits
    /// for the broker.
    pub fn after_batch(&mut self) -> Result<(), StageError> {
        let written: Vec<i32> = self.pending.keys().copied().collect();
        for partition in written {
            self.flush_partition(partition)?;
        }
        if self.round.as_ref().is_some_and(|r| !r.is_finished()) {
            return Ok(());
        }
        self.round = None;
        self.forget_revoked();
        if self.last_round.elapsed() < self.every || !self.parts.values().any(|p| p.dirty) {
            return Ok(());
        }
        let marks = match &self.marks {
            Some(m) => m.clone(),
            None => match crate::kafka::io::reader::<BaseConsumer<ReaderContext>>(
                &self.kafka,
                &self.changelog,
                "state checkpointer",
                false,
            ) {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.marks = Some(c.clone());
                    c
                }
                Err(error) => {
                    tracing::warn!(%error, changelog = %self.changelog, "no checkpoint taken");
                    return Ok(());
                }
            },
        };
        let due: Vec<(i32, Table, Arc<AtomicBool>)> = self
            .parts
            .iter_mut()
            .filter(|(_, p)| p.dirty)
            .map(|(partition, p)| {
                p.dirty = false;
                (*partition, p.table.clone(), p.revoked.clone())
            })
            .collect();
        self.last_round = Instant::now();
        self.in_round = due.iter().map(|(p, _, _)| *p).collect();
        let topic = self.changelog.clone();
        self.round = Some(tokio::task::spawn_blocking(move || {
            checkpoint_round(&marks, &topic, due)
        }));
        Ok(())
    }

    /// Waits for a checkpoint under way, if any.
    pub async fn finish_round(&mut self) {
        if let Some(round) = self.round.take() {
            let _ = round.await;
        }
        self.forget_revoked();
    }

    /// Forgets the checkpoints of partitions revoked during the last round (none under way).
    fn forget_revoked(&mut self) {
        self.in_round.clear();
        for partition in std::mem::take(&mut self.forget) {
            let forgotten = self
                .store
                .table(&self.changelog, partition)
                .and_then(|t| t.forget_checkpoint());
            if let Err(error) = forgotten {
                tracing::warn!(%error, changelog = %self.changelog, partition,
                    "a checkpoint taken while the partition was lost could not be removed");
            }
        }
    }
}

/// Writes the checkpoint of each `(partition, table)`: the changelog's end as fetched now, so
/// it covers every write made to the table before it was produced. Skipped for a partition
/// revoked meanwhile.
fn checkpoint_round(
    marks: &BaseConsumer<ReaderContext>,
    topic: &str,
    due: Vec<(i32, Table, Arc<AtomicBool>)>,
) {
    for (partition, table, revoked) in due {
        let high = match marks.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok((_, high)) => high,
            Err(error) => {
                tracing::warn!(%error, topic, partition, "checkpoint skipped: the changelog's end is unknown");
                continue;
            }
        };
        if revoked.load(Ordering::Acquire) {
            continue;
        }
        match table.write_checkpoint(high) {
            Ok(()) => tracing::debug!(topic, partition, offset = high, "state checkpoint"),
            Err(error) => tracing::warn!(%error, topic, partition, "checkpoint not written"),
        }
    }
}

impl From<StoreError> for StageError {
    fn from(e: StoreError) -> Self {
        StageError::Store(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;

    use super::*;
    use crate::kafka::io::send_queued;

    impl StateValue for String {
        fn encode(&self) -> Vec<u8> {
            self.as_bytes().to_vec()
        }

        fn decode(bytes: &[u8]) -> Option<Self> {
            String::from_utf8(bytes.to_vec()).ok()
        }
    }

    fn keyed(dir: &Path, kafka: &KafkaConnection) -> KeyedState<String> {
        let config = StateConfig {
            checkpoint_interval_ms: 1,
            hot_entries: 2,
            ..Default::default()
        };
        let store = StateStore::open(StoreOptions {
            dir: dir.join("state"),
            identity: "stage changelog".into(),
            cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
        })
        .expect("store");
        KeyedState::new(store, kafka.clone(), "changelog", &config)
    }

    /// Writes `key` = `value` as a stage does: the store, then the changelog.
    async fn write(
        state: &mut KeyedState<String>,
        producer: &FutureProducer,
        partition: i32,
        key: &str,
        value: &str,
    ) {
        state
            .put(partition, key.as_bytes(), value.to_string())
            .expect("put");
        send(producer, partition, key, value).await;
    }

    /// A mock cluster with a `changelog` topic of `partitions`, a connection and a producer.
    fn changelog_cluster(
        partitions: i32,
    ) -> (
        MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        KafkaConnection,
        FutureProducer,
    ) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic("changelog", partitions, 1)
            .expect("topic");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer: FutureProducer = crate::kafka::producer(&kafka).expect("producer");
        (cluster, kafka, producer)
    }

    /// `key` = `value` into the changelog only, as another owner of the partition writes it.
    async fn send(producer: &FutureProducer, partition: i32, key: &str, value: &str) {
        let record = rdkafka::producer::FutureRecord::to("changelog")
            .partition(partition)
            .key(key)
            .payload(value);
        send_queued(producer, record)
            .await
            .expect("queued")
            .await
            .expect("not cancelled")
            .expect("delivered");
    }

    async fn checkpoint(state: &mut KeyedState<String>) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        state.after_batch().expect("stored");
        state.finish_round().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_restart_on_its_disk_reads_only_the_changelog_after_its_checkpoint() {
        let (_cluster, kafka, producer) = changelog_cluster(2);
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut state = keyed(dir.path(), &kafka);
            let restored = state.assign(0).await.expect("assigned");
            assert_eq!((restored.applied, restored.to), (0, 0));
            for i in 0..5 {
                write(&mut state, &producer, 0, &format!("k{i}"), "v1").await;
            }
            checkpoint(&mut state).await;
            assert_eq!(
                state.store.table("changelog", 0).expect("t").checkpoint(),
                Some(5)
            );
            // Written after the checkpoint: on disk, and in the changelog.
            write(&mut state, &producer, 0, "k0", "v2").await;
            write(&mut state, &producer, 0, "k9", "v1").await;
            // Another owner's write while this one is gone must come back through the tail.
        }
        send(&producer, 0, "k1", "v3").await;
        let mut state = keyed(dir.path(), &kafka);
        let restored = state.assign(0).await.expect("assigned");
        assert_eq!(
            (
                restored.from,
                restored.to,
                restored.applied,
                restored.rebuilt
            ),
            (5, 8, 3, false),
            "only the tail after the checkpoint is read"
        );
        for (key, value) in [("k0", "v2"), ("k1", "v3"), ("k2", "v1"), ("k9", "v1")] {
            assert_eq!(
                state.get(0, key.as_bytes()).expect("get").as_deref(),
                Some(value),
                "{key}"
            );
        }
        assert!(state.get(1, b"k0").is_err(), "partition 1 is not assigned");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn partitions_restored_together_each_get_their_own_changelog() {
        let (_cluster, kafka, producer) = changelog_cluster(8);
        for partition in 0..8 {
            // Partition p holds p + 1 keys, each naming its partition.
            for i in 0..=partition {
                send(
                    &producer,
                    partition,
                    &format!("k{i}"),
                    &format!("p{partition}"),
                )
                .await;
            }
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = keyed(dir.path(), &kafka);
        let all: Vec<i32> = (0..8).collect();
        let restored = state.assign_all(&all).await.expect("assigned");
        let mut applied: Vec<u64> = restored.iter().map(|r| r.applied).collect();
        applied.sort_unstable();
        assert_eq!(applied, [1, 2, 3, 4, 5, 6, 7, 8]);
        for partition in 0..8 {
            assert!(state.is_assigned(partition));
            for i in 0..8 {
                let value = state
                    .get(partition, format!("k{i}").as_bytes())
                    .expect("get");
                let expected = (i <= partition).then(|| format!("p{partition}"));
                assert_eq!(value, expected, "partition {partition}, k{i}");
            }
        }

        // One partition that cannot be restored fails the assignment, named, and takes none.
        let other = tempfile::tempdir().expect("temp dir");
        let mut state = keyed(other.path(), &kafka);
        let Err((partition, _)) = state.assign_all(&[0, 42, 1]).await else {
            panic!("partition 42 of an 8-partition changelog restored");
        };
        assert_eq!(partition, 42);
        assert!(!state.is_assigned(0) && !state.is_assigned(1));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_partition_revoked_during_its_checkpoint_keeps_none() {
        let (_cluster, kafka, producer) = changelog_cluster(1);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = keyed(dir.path(), &kafka);
        state.assign(0).await.expect("assigned");
        write(&mut state, &producer, 0, "a", "1").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        state.after_batch().expect("stored");
        state.revoke(0);
        state.finish_round().await;
        // Whether the round fetched the end before or after the revocation, its checkpoint is
        // not kept: the partition is rebuilt the next time this disk serves it.
        let table = state.store.table("changelog", 0).expect("t");
        assert_eq!(table.checkpoint(), None);
        let restored = state.assign(0).await.expect("assigned again");
        assert_eq!((restored.to, restored.rebuilt), (1, true));
        assert_eq!(state.get(0, b"a").expect("get").as_deref(), Some("1"));
        // Nothing written since: no new round.
        state.after_batch().expect("nothing to store");
        assert!(state.round.is_none());
    }

    #[test]
    fn the_hot_cache_holds_at_most_its_capacity_and_keeps_what_is_used() {
        let mut cache = HotCache::new(4);
        for i in 0u8..100 {
            cache.insert(&[i], i);
            assert!(cache.len() <= 4, "{}", cache.len());
        }
        assert_eq!(cache.get(&[99]), Some(99));
        assert_eq!(cache.get(&[0]), None);
        // A key read again survives the turnover that drops the others.
        cache.insert(&[1], 1);
        cache.insert(&[2], 2);
        assert_eq!(cache.get(&[99]), Some(99));
        cache.insert(&[3], 3);
        cache.insert(&[4], 4);
        assert_eq!(cache.get(&[99]), Some(99));
        // Overwriting a key keeps one entry with the new value.
        cache.insert(&[99], 7);
        assert_eq!(cache.get(&[99]), Some(7));
        assert!(cache.len() <= 4);
    }

    #[test]
    fn an_abandoned_temporary_store_is_removed_and_a_held_one_kept() {
        let base = tempfile::tempdir().expect("temp dir");
        let held = base.path().join("g-1");
        let abandoned = base.path().join("g-2");
        let store = |dir: &Path| {
            StateStore::open(StoreOptions {
                dir: dir.to_path_buf(),
                identity: "g".into(),
                cache_bytes: 1 << 20,
                write_buffer_bytes: 1 << 20,
            })
            .expect("opens")
        };
        let keep = store(&held);
        drop(store(&abandoned));
        remove_abandoned(base.path(), "g");
        assert!(held.exists());
        assert!(!abandoned.exists());
        drop(keep);
    }
}
