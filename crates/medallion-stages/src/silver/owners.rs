//! Which org owns each entity id: a consumer must check that an event's tenant matches the
//! entity it targets when that entity already exists. The events of two orgs sit on different
//! partitions, often on different replicas, so the partition's own merge state cannot tell.
//!
//! The owners live in a global table (`silver-processor.entity-owners`, compacted): key
//! `<entity_type>/<entity_id>`, value `<org>|<event_id>` of the claim, placed by key, so every
//! claim for one entity lands in one partition and the log orders them. Every replica reads
//! the whole table, and the first claim in the log owns the entity. An event for an entity
//! nobody owns claims it (a side record, acknowledged before its offset is committed); an
//! event for an entity another org owns is rejected (`tenant_mismatch`) and audited.
//!
//! The table lives in the local state store (one global table, with a checkpoint per topic
//! partition), not in memory: a replica that restarts on its disk reads only the claims made
//! since its checkpoints, and memory holds recently used claims only.
//!
//! Two replicas can claim one entity for two orgs before either reads the other's claim. The
//! log still decides: the replica whose claim came second learns it lost when it reads the
//! first, audits the event it accepted in between (`tenant.conflict`) and writes the winner's
//! claim again, so the winner stays the table's last record when the topic is compacted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medallion_runtime::error::StageError;
use medallion_runtime::kafka::io::{ReadError, TopicFollower};
use medallion_runtime::kafka::KafkaConnection;
use medallion_runtime::state::HotCache;
use medallion_runtime::store::{StoreError, Table};
use rdkafka::message::Message;

/// One org's claim on an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub org_id: i64,
    /// The event that made the claim.
    pub event_id: String,
}

impl Claim {
    pub fn encode(&self) -> Vec<u8> {
        format!("{}|{}", self.org_id, self.event_id).into_bytes()
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let (org, event) = std::str::from_utf8(value).ok()?.split_once('|')?;
        Some(Self {
            org_id: org.parse().ok()?,
            event_id: event.to_string(),
        })
    }
}

/// The table key of an entity.
pub fn owner_key(entity_type: &str, entity_id: &str) -> String {
    format!("{entity_type}/{entity_id}")
}

/// What an event may do to its entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Its org owns the entity (or has claimed it and not lost yet).
    Owned,
    /// Nobody owned it: produce this claim.
    Claim(Claim),
    /// Another org owns it.
    Mismatch { owner: Claim },
}

/// A claim of this replica that the log gave to another org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub key: String,
    pub winner: Claim,
    pub mine: Claim,
}

/// The table as this replica knows it: the first claim of each entity in the global table of
/// the local state store (with recently used claims in memory), this replica's own claims not
/// read back yet, and the claims it lost.
pub struct Owners {
    /// The first claim in the log, per entity.
    table: Table,
    hot: HotCache<Claim>,
    /// First claims read and not yet in the table ([`Self::flush`] stores them as one batch).
    unstored: HashMap<String, Claim>,
    /// Claims this replica made that it has not read back yet.
    mine: HashMap<String, Claim>,
    lost: Vec<Lost>,
}

impl Owners {
    pub fn new(table: Table, hot_entries: usize) -> Self {
        Self {
            table,
            hot: HotCache::new(hot_entries),
            unstored: HashMap::new(),
            mine: HashMap::new(),
            lost: Vec::new(),
        }
    }

    fn owner(&mut self, key: &str) -> Result<Option<Claim>, StoreError> {
        if let Some(claim) = self.unstored.get(key) {
            return Ok(Some(claim.clone()));
        }
        if let Some(claim) = self.hot.get(key.as_bytes()) {
            return Ok(Some(claim));
        }
        let claim = self
            .table
            .get(key.as_bytes())?
            .and_then(|v| Claim::decode(&v));
        if let Some(c) = &claim {
            self.hot.insert(key.as_bytes(), c.clone());
        }
        Ok(claim)
    }

    /// A claim read from the log, in log order (reading the same claims again changes nothing).
    pub fn read(&mut self, key: String, claim: Claim) -> Result<(), StoreError> {
        // Our own claim coming back, with no other claim of its entity read since it was made:
        // when it was made the entity had no owner (`decide` looked), and every claim read
        // since would have taken it out of `mine`. So it is the first, without a lookup.
        if self.mine.get(&key) == Some(&claim) {
            self.mine.remove(&key);
            self.unstored.insert(key, claim);
            return Ok(());
        }
        match self.owner(&key)? {
            Some(owner) => {
                // A later claim by another org: ours, if it was ours, lost the race.
                if owner.org_id != claim.org_id && self.mine.get(&key).is_some_and(|m| *m == claim)
                {
                    if let Some(mine) = self.mine.remove(&key) {
                        self.lost.push(Lost {
                            key,
                            winner: owner,
                            mine,
                        });
                    }
                }
            }
            None => {
                if let Some(mine) = self.mine.remove(&key) {
                    if mine.org_id != claim.org_id {
                        self.lost.push(Lost {
                            key: key.clone(),
                            winner: claim.clone(),
                            mine,
                        });
                    }
                }
                self.unstored.insert(key, claim);
            }
        }
        Ok(())
    }

    /// Claims read and not yet stored.
    pub fn unstored(&self) -> usize {
        self.unstored.len()
    }

    /// Stores the claims read since the last call, as one batch.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.unstored.is_empty() {
            return Ok(());
        }
        let claims = std::mem::take(&mut self.unstored);
        self.table.apply(
            claims
                .iter()
                .map(|(k, c)| (k.as_bytes().to_vec(), Some(c.encode()))),
        )?;
        for (key, claim) in claims {
            self.hot.insert(key.as_bytes(), claim);
        }
        Ok(())
    }

    /// What an event of `org_id` may do to the entity at `key`.
    pub fn decide(
        &mut self,
        key: &str,
        org_id: i64,
        event_id: &str,
    ) -> Result<Decision, StoreError> {
        let known = match self.owner(key)? {
            Some(owner) => Some(owner),
            None => self.mine.get(key).cloned(),
        };
        Ok(match known {
            Some(owner) if owner.org_id == org_id => Decision::Owned,
            Some(owner) => Decision::Mismatch { owner },
            None => {
                let claim = Claim {
                    org_id,
                    event_id: event_id.to_string(),
                };
                self.mine.insert(key.to_string(), claim.clone());
                Decision::Claim(claim)
            }
        })
    }

    /// Claims this replica made and has not read back yet.
    pub fn unconfirmed(&self) -> usize {
        self.mine.len()
    }

    /// The claims this replica lost since the last call.
    pub fn take_lost(&mut self) -> Vec<Lost> {
        std::mem::take(&mut self.lost)
    }
}

/// The table, kept current by a reader task; `ready` once it has read what the topic held
/// when it started.
#[derive(Clone)]
pub struct OwnerTable {
    pub topic: String,
    pub owners: Arc<Mutex<Owners>>,
    pub ready: Arc<AtomicBool>,
    /// Claims read from the topic since the process started (all partitions).
    pub read: Arc<std::sync::atomic::AtomicU64>,
    table: Table,
    checkpoint_every: Duration,
    /// Stops the reader when the last handle is dropped (`None` in the reader's own copy).
    _reader: Option<Arc<Reader>>,
}

/// The reader task, aborted on drop.
struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl OwnerTable {
    /// Follows `topic` into `table` for as long as the process runs: from the table's
    /// checkpoints when the disk holds them (the tail only), else from the beginning into
    /// the emptied table.
    pub fn start(
        kafka: KafkaConnection,
        topic: String,
        table: Table,
        state: &medallion_runtime::config::StateConfig,
    ) -> Self {
        let owners = Owners::new(table.clone(), state.hot_entries);
        let mut owner_table = Self {
            topic,
            owners: Arc::new(Mutex::new(owners)),
            ready: Arc::new(AtomicBool::new(false)),
            read: Default::default(),
            table,
            checkpoint_every: Duration::from_millis(state.checkpoint_interval_ms),
            _reader: None,
        };
        let reader = owner_table.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = reader.read(&kafka).await {
                    tracing::warn!(error = %e, topic = %reader.topic, "entity owner table reader failed; restarting in 2 s");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        owner_table._reader = Some(Arc::new(Reader(task)));
        owner_table
    }

    /// Waits until the table holds every claim the topic had when reading started.
    pub async fn wait_ready(&self) {
        let mut waited = 0u32;
        while !self.ready.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
            if waited.is_multiple_of(500) {
                tracing::warn!(topic = %self.topic, "still reading the entity owner table before deciding ownership");
            }
        }
    }

    /// Waits while this replica has more than [`MAX_UNCONFIRMED`] claims not read back yet:
    /// they are held in memory until the reader reaches them, so a reader behind the stage
    /// would otherwise let memory grow with every new entity.
    pub async fn wait_confirmed(&self) -> Result<(), StageError> {
        let mut waited = 0u32;
        loop {
            let unconfirmed = self
                .owners
                .lock()
                .map_err(|_| StageError::Internal("entity owner table lock poisoned".into()))?
                .unconfirmed();
            if unconfirmed <= MAX_UNCONFIRMED {
                return Ok(());
            }
            if waited == 0 {
                tracing::debug!(
                    unconfirmed,
                    "waiting for the entity owner reader to catch up"
                );
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Where to start each partition: its checkpoint, when every partition has one within
    /// its log; otherwise the table is emptied and every partition read from its beginning
    /// (a claim is placed by key, but which partition a key lands on is the producer's).
    fn starts(&self, kafka: &KafkaConnection) -> Result<HashMap<i32, i64>, OwnerError> {
        let marks = medallion_runtime::kafka::io::watermarks(kafka, &self.topic)?;
        let mut starts = HashMap::new();
        for (&partition, &(low, high)) in &marks {
            match self.table.source_checkpoint(partition) {
                // Not compared with the listed end: a broker may list one short of the end
                // after a batch of several records (tansu), and a checkpoint is where the
                // reader got to. One past the real end (a topic deleted and created again
                // under the same name) is refused by the broker, and the reader starts over.
                Some(c) if c >= low => {
                    starts.insert(partition, c);
                }
                _ if high == low => {}
                _ => {
                    tracing::info!(topic = %self.topic, partition, "entity owner table rebuilt from the beginning");
                    self.table.clear()?;
                    return Ok(HashMap::new());
                }
            }
        }
        tracing::info!(topic = %self.topic, partitions = starts.len(), "entity owner table resumed from its checkpoints");
        Ok(starts)
    }

    /// Follows the table's topic; returns only when a read fails.
    async fn read(&self, kafka: &KafkaConnection) -> Result<(), OwnerError> {
        let starts = {
            let me = self.clone();
            let kafka = kafka.clone();
            tokio::task::spawn_blocking(move || me.starts(&kafka))
                .await
                .map_err(|e| OwnerError::Read(ReadError::Interrupted(e.to_string())))??
        };
        let mut follower =
            TopicFollower::start_at(kafka, &self.topic, "entity owner reader", &starts)?;
        if follower.caught_up() {
            self.ready.store(true, Ordering::Release);
        }
        // The next offset of each partition read since the last checkpoint.
        let mut read_to: HashMap<i32, i64> = HashMap::new();
        let mut last_checkpoint = Instant::now();
        let mut checkpointing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            // Waits for a claim at most until the next checkpoint is due, so a table that has
            // gone quiet still records how far it read.
            if let Ok(message) = tokio::time::timeout(self.checkpoint_every, follower.next()).await
            {
                let message = message?;
                let mut owners = self.owners.lock().map_err(|_| OwnerError::Poisoned)?;
                if let (Some(key), Some(claim)) = (
                    message.key().and_then(|k| std::str::from_utf8(k).ok()),
                    message.payload().and_then(Claim::decode),
                ) {
                    owners.read(key.to_string(), claim)?;
                }
                if owners.unstored() >= STORE_EVERY {
                    owners.flush()?;
                }
                self.read.fetch_add(1, Ordering::Relaxed);
                read_to.insert(message.partition(), message.offset() + 1);
            } else {
                // Quiet: what was read goes to the store now.
                self.owners
                    .lock()
                    .map_err(|_| OwnerError::Poisoned)?
                    .flush()?;
            }
            if follower.caught_up() {
                self.ready.store(true, Ordering::Release);
            }
            let idle = checkpointing.as_ref().is_none_or(|c| c.is_finished());
            if idle && last_checkpoint.elapsed() >= self.checkpoint_every && !read_to.is_empty() {
                // Every claim before these offsets is in the table: record them.
                self.owners
                    .lock()
                    .map_err(|_| OwnerError::Poisoned)?
                    .flush()?;
                let table = self.table.clone();
                let marks = std::mem::take(&mut read_to);
                let topic = self.topic.clone();
                checkpointing = Some(tokio::task::spawn_blocking(move || {
                    for (partition, offset) in marks {
                        if let Err(error) = table.write_source_checkpoint(partition, offset) {
                            tracing::warn!(%error, %topic, partition, "entity owner checkpoint not written");
                        }
                    }
                }));
                last_checkpoint = Instant::now();
            }
        }
    }
}

/// Claims of this replica not read back yet beyond which the stage waits for the reader.
pub const MAX_UNCONFIRMED: usize = 50_000;

/// Claims read are stored in batches of this many (and whenever the topic goes quiet).
const STORE_EVERY: usize = 5_000;

/// Why the owner table's reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("entity owner table lock poisoned")]
    Poisoned,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners() -> (tempfile::TempDir, Owners) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            medallion_runtime::store::StateStore::open(medallion_runtime::store::StoreOptions {
                dir: dir.path().join("state"),
                identity: "silver-processor".into(),
                cache_bytes: 1 << 20,
                write_buffer_bytes: 1 << 20,
            })
            .expect("store");
        let table = store.global_table("owners").expect("table");
        (dir, Owners::new(table, 4))
    }

    fn claim(org: i64, event: &str) -> Claim {
        Claim {
            org_id: org,
            event_id: event.into(),
        }
    }

    #[test]
    fn the_first_claim_owns_and_another_org_is_refused() {
        let (_dir, mut owners) = owners();
        let key = owner_key("case", "C-1");
        assert_eq!(
            owners.decide(&key, 7, "e1").expect("decides"),
            Decision::Claim(claim(7, "e1"))
        );
        // Until the claim is read back, this replica goes by its own claim.
        assert_eq!(
            owners.decide(&key, 7, "e2").expect("decides"),
            Decision::Owned
        );
        assert_eq!(
            owners.decide(&key, 8, "e3").expect("decides"),
            Decision::Mismatch {
                owner: claim(7, "e1")
            }
        );
        owners.read(key.clone(), claim(7, "e1")).expect("reads");
        assert_eq!(
            owners.decide(&key, 8, "e4").expect("decides"),
            Decision::Mismatch {
                owner: claim(7, "e1")
            }
        );
        assert!(owners.take_lost().is_empty());
        assert_eq!(
            Claim::decode(&claim(7, "e|1").encode()),
            Some(claim(7, "e|1"))
        );
    }

    #[test]
    fn a_claim_that_came_second_in_the_log_is_lost_and_reported_once() {
        // Replica of org 8 claims first locally, but org 7's claim is first in the log.
        let (_dir, mut owners) = owners();
        let key = owner_key("case", "C-2");
        assert_eq!(
            owners.decide(&key, 8, "b1").expect("decides"),
            Decision::Claim(claim(8, "b1"))
        );
        owners.read(key.clone(), claim(7, "a1")).expect("reads");
        owners.read(key.clone(), claim(8, "b1")).expect("reads");
        assert_eq!(
            owners.take_lost(),
            vec![Lost {
                key: key.clone(),
                winner: claim(7, "a1"),
                mine: claim(8, "b1")
            }]
        );
        assert!(owners.take_lost().is_empty());
        assert_eq!(
            owners.decide(&key, 8, "b2").expect("decides"),
            Decision::Mismatch {
                owner: claim(7, "a1")
            }
        );
        // The winner's claim written again (compaction) changes nothing.
        owners.read(key.clone(), claim(7, "a1")).expect("reads");
        assert!(owners.take_lost().is_empty());
    }

    #[test]
    fn another_replicas_lost_claim_is_not_ours_to_report() {
        let (_dir, mut owners) = owners();
        let key = owner_key("case", "C-3");
        owners.read(key.clone(), claim(7, "a1")).expect("reads");
        owners.read(key.clone(), claim(8, "b1")).expect("reads");
        assert!(owners.take_lost().is_empty());
        assert_eq!(
            owners.decide(&key, 7, "a2").expect("decides"),
            Decision::Owned
        );
    }

    async fn send_claim(producer: &rdkafka::producer::FutureProducer, key: &str, c: Claim) {
        let value = c.encode();
        let record = rdkafka::producer::FutureRecord::to("owners")
            .key(key)
            .payload(&value);
        medallion_runtime::kafka::io::send_queued(producer, record)
            .await
            .expect("queued")
            .await
            .expect("not cancelled")
            .expect("delivered");
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_replica_restarting_on_its_disk_reads_only_the_claims_after_its_checkpoints() {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("owners", 3, 1).expect("topic");
        let kafka = KafkaConnection::plain(&cluster.bootstrap_servers()).expect("connection");
        let producer = medallion_runtime::kafka::producer(&kafka).expect("producer");
        for i in 0..30 {
            send_claim(
                &producer,
                &owner_key("case", &format!("C-{i}")),
                claim(7, &format!("a{i}")),
            )
            .await;
        }
        // A later claim of another org does not take C-0.
        send_claim(&producer, &owner_key("case", "C-0"), claim(8, "b0")).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let state = medallion_runtime::config::StateConfig {
            checkpoint_interval_ms: 50,
            hot_entries: 4,
            ..Default::default()
        };
        // A dropped table's reader lets go of the store a moment after.
        let open = || async {
            for _ in 0..100 {
                match medallion_runtime::store::StateStore::open(
                    medallion_runtime::store::StoreOptions {
                        dir: dir.path().join("state"),
                        identity: "silver-processor owners".into(),
                        cache_bytes: 1 << 20,
                        write_buffer_bytes: 1 << 20,
                    },
                ) {
                    Ok(store) => return store,
                    Err(medallion_runtime::store::StoreError::InUse { .. }) => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("store: {e}"),
                }
            }
            panic!("the store stayed in use");
        };
        let start = |store: &medallion_runtime::store::StateStore| {
            OwnerTable::start(
                kafka.clone(),
                "owners".into(),
                store.global_table("owners").expect("table"),
                &state,
            )
        };
        let decide = |table: &OwnerTable, key: &str, org: i64| {
            table
                .owners
                .lock()
                .expect("lock")
                .decide(key, org, "probe")
                .expect("decides")
        };
        // C-0 stays org 7's, whatever was read again.
        let c0_is_org_7s = |table: &OwnerTable| {
            assert_eq!(
                decide(table, &owner_key("case", "C-0"), 8),
                Decision::Mismatch {
                    owner: claim(7, "a0")
                }
            );
        };
        {
            let store = open().await;
            let table = start(&store);
            table.wait_ready().await;
            assert_eq!(table.read.load(Ordering::Relaxed), 31);
            c0_is_org_7s(&table);
            let t = store.global_table("owners").expect("table");
            wait_until("checkpoints of every partition", || {
                (0..3)
                    .map(|p| t.source_checkpoint(p).unwrap_or(0))
                    .sum::<i64>()
                    == 31
            })
            .await;
        }
        // Claims made while the replica was away.
        send_claim(&producer, &owner_key("case", "C-100"), claim(9, "c1")).await;
        let store = open().await;
        let table = start(&store);
        table.wait_ready().await;
        assert_eq!(
            table.read.load(Ordering::Relaxed),
            1,
            "only the tail is read"
        );
        c0_is_org_7s(&table);
        assert_eq!(
            decide(&table, &owner_key("case", "C-29"), 7),
            Decision::Owned
        );
        assert_eq!(
            decide(&table, &owner_key("case", "C-100"), 9),
            Decision::Owned
        );
        // Checkpoints gone (a damaged disk): the table is read again from the beginning.
        drop(table);
        drop(store);
        std::fs::remove_dir_all(dir.path().join("state").join("checkpoints")).expect("removed");
        std::fs::create_dir_all(dir.path().join("state").join("checkpoints")).expect("made");
        let store = open().await;
        let table = start(&store);
        table.wait_ready().await;
        assert_eq!(table.read.load(Ordering::Relaxed), 32);
        c0_is_org_7s(&table);
    }
}
