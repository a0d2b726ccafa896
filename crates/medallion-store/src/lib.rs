//! Keyed stage state on local disk: the runtime's one state API (get / put / delete / prefix
//! scan), one table per (state name, input partition), each with a checkpoint: the changelog
//! offset its files hold. The tables of one state name share one engine tree, each under a
//! key prefix of its partition: one memtable per state rather than one per partition, so the
//! write buffers flush in large segments (twelve memtables sharing the buffers each flushed at
//! about a twelfth of them; the store of 1M silver entities is a third smaller since, while
//! compaction still takes about an eighth of the worker's CPU). The changelog topic stays the source of truth; the files are a copy
//! that saves reading it whole. A restart on the same disk reads the changelog from the
//! checkpoint on; a missing, foreign or damaged copy is discarded and rebuilt from the
//! changelog, streamed into the table, never into RAM.
//!
//! The engine is fjall (an LSM tree in Rust: no C++ build, ~30 s to compile here; writes of
//! new keys ~400k/s, a lookup that misses answered by bloom filters). Memory is its block cache
//! and write buffers, both bounded by [`StoreOptions`] whatever the number of keys.
//!
//! Layout of `dir`: `IDENTITY` (who the store belongs to; another owner's store is wiped),
//! fjall's files, and `checkpoints/<table>`, written only after the data it vouches for is on
//! disk, so a checkpoint never runs ahead of the files.

use std::io::Write;
use std::path::{Path, PathBuf};

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use sha2::{Digest, Sha256};

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {dir}: {source}")]
    Engine {
        dir: String,
        #[source]
        source: fjall::Error,
    },
    #[error(
        "state store {dir} is in use by another process (each worker needs a state.dir of its own)"
    )]
    InUse { dir: String },
    #[error("state store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the store lives and how much memory it may hold.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub dir: PathBuf,
    /// Who the store belongs to (the consumer group and its changelogs): a store written by
    /// anyone else is discarded at open.
    pub identity: String,
    /// The block cache, in bytes.
    pub cache_bytes: u64,
    /// All tables' write buffers together, in bytes.
    pub write_buffer_bytes: u64,
}

/// How a store was found at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing there: a new store.
    New,
    /// This owner's store, reopened.
    Reopened,
    /// Another owner's store, or one that would not open: wiped, a new store in its place.
    Discarded,
}

/// The state store of one worker.
#[derive(Clone)]
pub struct StateStore {
    keyspace: Keyspace,
    options: StoreOptions,
    found: Found,
    /// Held for as long as the store is open: an exclusive lock on `<dir>.lock`, so a second
    /// process cannot open the same files (the engine itself does not guard against it).
    _lock: std::sync::Arc<std::fs::File>,
}

const IDENTITY: &str = "IDENTITY";
const CHECKPOINTS: &str = "checkpoints";
const CHECKPOINT_FORMAT: &str = "medallion-checkpoint v1";
/// The layout of the files, recorded with the identity: a store of another layout is
/// discarded at open and rebuilt from the changelogs.
const LAYOUT: &str =
    "layout 3 (tables of a state share a tree, prefixed by partition; size-tiered compaction)";

impl StateStore {
    /// Opens the store in `options.dir`, creating it; a foreign or damaged one is wiped first.
    pub fn open(options: StoreOptions) -> Result<Self, StoreError> {
        let dir = &options.dir;
        let lock = lock(dir)?;
        let identity_path = dir.join(IDENTITY);
        let identity = format!("{}\n{LAYOUT}", options.identity);
        let mut found = match std::fs::read_to_string(&identity_path) {
            Ok(id) if id.trim_end() == identity => Found::Reopened,
            Ok(other) => {
                tracing::warn!(dir = %dir.display(), found = other.trim_end(), expected = %options.identity,
                    "state store belongs to someone else; discarded and rebuilt from the changelogs");
                wipe(dir)?;
                Found::Discarded
            }
            Err(_) if dir.exists() && dir_has_entries(dir) => {
                tracing::warn!(dir = %dir.display(), "state store without an identity; discarded");
                wipe(dir)?;
                Found::Discarded
            }
            Err(_) => Found::New,
        };
        let keyspace = match open_keyspace(&options) {
            Ok(k) => k,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error,
                    "state store would not open; discarded and rebuilt from the changelogs");
                wipe(dir)?;
                found = Found::Discarded;
                open_keyspace(&options)?
            }
        };
        std::fs::create_dir_all(dir.join(CHECKPOINTS)).map_err(io(dir))?;
        write_atomically(&identity_path, identity.as_bytes())?;
        Ok(Self {
            keyspace,
            options,
            found,
            _lock: std::sync::Arc::new(lock),
        })
    }

    pub fn found(&self) -> Found {
        self.found
    }

    /// The table of state `name` for input partition `partition`.
    pub fn table(&self, name: &str, partition: i32) -> Result<Table, StoreError> {
        self.open_table(
            format!("{}_parts", clean_name(name)),
            format!("{}_{partition}", clean_name(name)),
            partition.to_be_bytes().to_vec(),
        )
    }

    /// The one table of state `name`, fed by every partition of a topic (checkpoints per
    /// source partition: [`Table::source_checkpoint`]).
    pub fn global_table(&self, name: &str) -> Result<Table, StoreError> {
        let table = format!("{}_all", clean_name(name));
        self.open_table(table.clone(), table, Vec::new())
    }

    /// Table `table`, the keys under `prefix` of engine tree `tree`.
    fn open_table(
        &self,
        tree: String,
        table: String,
        prefix: Vec<u8>,
    ) -> Result<Table, StoreError> {
        let handle = self
            .keyspace
            .open_partition(&tree, table_options(&self.options))
            .map_err(engine(&self.options.dir))?;
        Ok(Table {
            _lock: self._lock.clone(),
            keyspace: self.keyspace.clone(),
            handle,
            prefix,
            checkpoint_path: self.options.dir.join(CHECKPOINTS).join(&table),
            dir: self.options.dir.clone(),
            identity: self.options.identity.clone(),
            name: table,
        })
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.keyspace.disk_space()
    }
}

/// One table: the state of one input partition, or a global table. A handle: clones share
/// the same table.
#[derive(Clone)]
pub struct Table {
    /// The store's lock, held while any table of it is in use.
    _lock: std::sync::Arc<std::fs::File>,
    keyspace: Keyspace,
    handle: PartitionHandle,
    /// The table's keys in the engine tree begin with it (empty: the tree is the table's own).
    prefix: Vec<u8>,
    checkpoint_path: PathBuf,
    dir: PathBuf,
    identity: String,
    name: String,
}

/// A change to a table: a value, or `None` to delete the key.
pub type Change = (Vec<u8>, Option<Vec<u8>>);

impl Table {
    /// `key` as the engine tree holds it.
    fn stored_key<'k>(&self, key: &'k [u8]) -> std::borrow::Cow<'k, [u8]> {
        if self.prefix.is_empty() {
            std::borrow::Cow::Borrowed(key)
        } else {
            let mut k = Vec::with_capacity(self.prefix.len() + key.len());
            k.extend_from_slice(&self.prefix);
            k.extend_from_slice(key);
            std::borrow::Cow::Owned(k)
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.handle
            .get(self.stored_key(key))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(engine(&self.dir))
    }

    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.handle
            .insert(&*self.stored_key(key), value)
            .map_err(engine(&self.dir))
    }

    pub fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.handle
            .remove(&*self.stored_key(key))
            .map_err(engine(&self.dir))
    }

    /// Applies `changes` in order, atomically.
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) -> Result<(), StoreError> {
        let mut batch = self.keyspace.batch();
        for (key, value) in changes {
            let key = match self.stored_key(&key) {
                std::borrow::Cow::Owned(k) => k,
                std::borrow::Cow::Borrowed(_) => key,
            };
            match value {
                Some(v) => batch.insert(&self.handle, key, v),
                None => batch.remove(&self.handle, key),
            }
        }
        batch.commit().map_err(engine(&self.dir))
    }

    /// Every (key, value) whose key starts with `prefix`, in key order.
    pub fn prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + 'a {
        let skip = self.prefix.len();
        self.handle
            .prefix(self.stored_key(prefix).into_owned())
            .map(move |kv| {
                kv.map(|(k, v)| (k[skip..].to_vec(), v.to_vec()))
                    .map_err(engine(&self.dir))
            })
    }

    /// The changelog offset the table's files hold (the next offset to read), if a checkpoint
    /// of this owner and this table is there and intact; `None` means rebuild from the start.
    pub fn checkpoint(&self) -> Option<i64> {
        let text = std::fs::read_to_string(&self.checkpoint_path).ok()?;
        let parsed = parse_checkpoint(&text, &self.identity, &self.name);
        if parsed.is_none() {
            tracing::warn!(table = %self.name, "checkpoint foreign or damaged; the table is rebuilt");
        }
        parsed
    }

    /// Makes everything written so far durable, then records that the files hold the
    /// changelog up to `offset` (exclusive). Never the other way round: a crash between the
    /// two leaves the previous checkpoint, behind the files, which a restore reads past again.
    pub fn write_checkpoint(&self, offset: i64) -> Result<(), StoreError> {
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(engine(&self.dir))?;
        write_atomically(
            &self.checkpoint_path,
            checkpoint_text(&self.identity, &self.name, offset).as_bytes(),
        )
    }

    /// Removes the checkpoint: from here on the files may hold writes the changelog does not,
    /// so if the worker stops before the next checkpoint the table is rebuilt.
    pub fn forget_checkpoint(&self) -> Result<(), StoreError> {
        match std::fs::remove_file(&self.checkpoint_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&self.checkpoint_path)(e)),
        }
    }

    /// Empties the table and forgets its checkpoint, for a rebuild (deletes in batches of
    /// 10,000 keys, so memory stays bounded whatever the table holds).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.forget_checkpoint()?;
        self.forget_source_checkpoints()?;
        loop {
            let keys: Vec<Vec<u8>> = self
                .prefix(&[])
                .take(10_000)
                .map(|kv| kv.map(|(k, _)| k))
                .collect::<Result<_, _>>()?;
            if keys.is_empty() {
                return Ok(());
            }
            self.apply(keys.into_iter().map(|k| (k, None)))?;
        }
    }

    /// The offset of source partition `source` that the table's files hold, for a table fed
    /// by several partitions of one topic (a global table): as [`Self::checkpoint`], one per
    /// source.
    pub fn source_checkpoint(&self, source: i32) -> Option<i64> {
        let name = self.source_name(source);
        let text = std::fs::read_to_string(self.source_path(source)).ok()?;
        let parsed = parse_checkpoint(&text, &self.identity, &name);
        if parsed.is_none() {
            tracing::warn!(table = %name, "checkpoint foreign or damaged; the table is rebuilt");
        }
        parsed
    }

    /// As [`Self::write_checkpoint`], for source partition `source`.
    pub fn write_source_checkpoint(&self, source: i32, offset: i64) -> Result<(), StoreError> {
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(engine(&self.dir))?;
        write_atomically(
            &self.source_path(source),
            checkpoint_text(&self.identity, &self.source_name(source), offset).as_bytes(),
        )
    }

    fn source_name(&self, source: i32) -> String {
        format!("{}@{source}", self.name)
    }

    fn source_path(&self, source: i32) -> PathBuf {
        self.checkpoint_path
            .with_file_name(self.source_name(source))
    }

    fn forget_source_checkpoints(&self) -> Result<(), StoreError> {
        let Some(dir) = self.checkpoint_path.parent() else {
            return Ok(());
        };
        let prefix = format!("{}@", self.name);
        let entries = std::fs::read_dir(dir).map_err(io(dir))?;
        for entry in entries {
            let entry = entry.map_err(io(dir))?;
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// About how many keys the table's engine tree holds (cheap; counts a key written twice
    /// twice until the engine compacts it): for a partition's table, those of every partition
    /// of its state on this disk, assigned or not.
    pub fn approximate_len(&self) -> u64 {
        self.handle.approximate_len() as u64
    }

    /// Number of keys (a full scan: for tests and reports).
    pub fn count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.prefix(&[]) {
            kv?;
            n += 1;
        }
        Ok(n)
    }
}

/// Takes the exclusive lock of the store in `dir`, beside it so a wipe keeps it.
fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    let mut name = dir.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            dir: dir.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// The engine's settings. Writes are not pushed to the operating system one by one: a
/// checkpoint makes them durable first ([`Table::write_checkpoint`]), and what a crash loses
/// after the last checkpoint is read again from the changelog. One flush and one compaction
/// worker: the stage's own threads need the cores more.
fn open_keyspace(options: &StoreOptions) -> Result<Keyspace, StoreError> {
    Config::new(&options.dir)
        .cache_size(options.cache_bytes)
        .max_write_buffer_size(options.write_buffer_bytes)
        .manual_journal_persist(true)
        .flush_workers(1)
        .compaction_workers(1)
        .open()
        .map_err(engine(&options.dir))
}

/// Each engine tree's memtable (one per state name, whatever the partitions): half of all
/// write buffers, between 1 and 32 MiB. The engine also flushes the largest memtables once all
/// of them hold half the write buffers, so a store of a few states stays near its setting.
///
/// Size-tiered compaction rather than the engine's default (leveled): stage state is written
/// mostly as new keys and read by point lookups that bloom filters answer, so rewriting every
/// level ten times over buys little. Measured on these 2 cores with silver's two trees (a
/// lookup that misses in each, then a write in each, 5M entities): 77 CPU-s against 86 leveled,
/// peak RSS 144 against 209 MiB (the engine's memory grows with the keys either way),
/// lookups of present keys no slower (31k against 28k/s, 16 MiB cache). A store of the leveled
/// layout is rebuilt from its changelogs once ([`LAYOUT`]).
fn table_options(options: &StoreOptions) -> PartitionCreateOptions {
    let memtable = (options.write_buffer_bytes / 2).clamp(1 << 20, 32 << 20);
    PartitionCreateOptions::default()
        .manual_journal_persist(true)
        .max_memtable_size(memtable as u32)
        .compaction_strategy(fjall::compaction::Strategy::SizeTiered(
            fjall::compaction::SizeTiered::default(),
        ))
}

/// fjall table names: letters, digits, `_` and `-`.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn checkpoint_text(identity: &str, table: &str, offset: i64) -> String {
    let body = format!("{CHECKPOINT_FORMAT}\n{identity}\n{table}\n{offset}\n");
    format!("{body}{}\n", digest(&body))
}

fn parse_checkpoint(text: &str, identity: &str, table: &str) -> Option<i64> {
    let (body, sum) = text.trim_end().rsplit_once('\n')?;
    let body = format!("{body}\n");
    if digest(&body) != sum {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != CHECKPOINT_FORMAT || lines.next()? != identity || lines.next()? != table {
        return None;
    }
    lines.next()?.parse().ok().filter(|o: &i64| *o >= 0)
}

fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `path` so that it is either the old or the whole new content, durably.
pub fn write_atomically(path: &Path, content: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(content).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn wipe(dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
    }
}

fn dir_has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

fn engine(dir: &Path) -> impl Fn(fjall::Error) -> StoreError + '_ {
    move |source| StoreError::Engine {
        dir: dir.display().to_string(),
        source,
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests;
