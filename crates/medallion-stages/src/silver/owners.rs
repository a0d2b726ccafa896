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
//! Two replicas can claim one entity for two orgs before either reads the other's claim. The
//! log still decides: the replica whose claim came second learns it lost when it reads the
//! first, audits the event it accepted in between (`tenant.conflict`) and writes the winner's
//! claim again, so the winner stays the table's last record when the topic is compacted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medallion_runtime::kafka::io::{ReadError, TopicFollower};
use medallion_runtime::kafka::KafkaConnection;
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

/// The table as this replica knows it.
#[derive(Debug, Default)]
pub struct Owners {
    /// The first claim in the log, per entity.
    table: HashMap<String, Claim>,
    /// Claims this replica made that it has not read back yet.
    mine: HashMap<String, Claim>,
    lost: Vec<Lost>,
}

impl Owners {
    /// A claim read from the log, in log order.
    pub fn read(&mut self, key: String, claim: Claim) {
        match self.table.get(&key) {
            Some(owner) => {
                // A later claim by another org: ours, if it was ours, lost the race.
                if owner.org_id != claim.org_id && self.mine.get(&key).is_some_and(|m| *m == claim)
                {
                    if let Some(mine) = self.mine.remove(&key) {
                        self.lost.push(Lost {
                            key,
                            winner: owner.clone(),
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
                self.table.insert(key, claim);
            }
        }
    }

    /// What an event of `org_id` may do to the entity at `key`.
    pub fn decide(&mut self, key: &str, org_id: i64, event_id: &str) -> Decision {
        let known = self.table.get(key).or_else(|| self.mine.get(key));
        match known {
            Some(owner) if owner.org_id == org_id => Decision::Owned,
            Some(owner) => Decision::Mismatch {
                owner: owner.clone(),
            },
            None => {
                let claim = Claim {
                    org_id,
                    event_id: event_id.to_string(),
                };
                self.mine.insert(key.to_string(), claim.clone());
                Decision::Claim(claim)
            }
        }
    }

    /// The claims this replica lost since the last call.
    pub fn take_lost(&mut self) -> Vec<Lost> {
        std::mem::take(&mut self.lost)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The table, kept current by a reader task; `ready` once it has read what the topic held
/// when it started.
#[derive(Clone)]
pub struct OwnerTable {
    pub topic: String,
    pub owners: Arc<Mutex<Owners>>,
    pub ready: Arc<AtomicBool>,
}

impl OwnerTable {
    /// Starts reading `topic` from its beginning, for as long as the process runs.
    pub fn start(kafka: KafkaConnection, topic: String) -> Self {
        let table = Self {
            topic,
            owners: Arc::new(Mutex::new(Owners::default())),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let reader = table.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = reader.read(&kafka).await {
                    tracing::warn!(error = %e, topic = %reader.topic, "entity owner table reader failed; restarting in 2 s");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        table
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

    /// Follows the table's topic from its beginning; returns only when a read fails.
    async fn read(&self, kafka: &KafkaConnection) -> Result<(), ReadError> {
        let mut follower = TopicFollower::start(kafka, &self.topic, "entity owner reader")?;
        if follower.caught_up() {
            self.ready.store(true, Ordering::Release);
        }
        loop {
            let message = follower.next().await?;
            if let (Some(key), Some(claim)) = (
                message.key().and_then(|k| std::str::from_utf8(k).ok()),
                message.payload().and_then(Claim::decode),
            ) {
                if let Ok(mut owners) = self.owners.lock() {
                    owners.read(key.to_string(), claim);
                }
            }
            drop(message);
            if follower.caught_up() {
                self.ready.store(true, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(org: i64, event: &str) -> Claim {
        Claim {
            org_id: org,
            event_id: event.into(),
        }
    }

    #[test]
    fn the_first_claim_owns_and_another_org_is_refused() {
        let mut owners = Owners::default();
        let key = owner_key("case", "C-1");
        assert_eq!(
            owners.decide(&key, 7, "e1"),
            Decision::Claim(claim(7, "e1"))
        );
        // Until the claim is read back, this replica goes by its own claim.
        assert_eq!(owners.decide(&key, 7, "e2"), Decision::Owned);
        assert_eq!(
            owners.decide(&key, 8, "e3"),
            Decision::Mismatch {
                owner: claim(7, "e1")
            }
        );
        owners.read(key.clone(), claim(7, "e1"));
        assert_eq!(
            owners.decide(&key, 8, "e4"),
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
        let mut owners = Owners::default();
        let key = owner_key("case", "C-2");
        assert_eq!(
            owners.decide(&key, 8, "b1"),
            Decision::Claim(claim(8, "b1"))
        );
        owners.read(key.clone(), claim(7, "a1"));
        owners.read(key.clone(), claim(8, "b1"));
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
            owners.decide(&key, 8, "b2"),
            Decision::Mismatch {
                owner: claim(7, "a1")
            }
        );
        // The winner's claim written again (compaction) changes nothing.
        owners.read(key.clone(), claim(7, "a1"));
        assert!(owners.take_lost().is_empty());
        assert_eq!(owners.len(), 1);
    }

    #[test]
    fn another_replicas_lost_claim_is_not_ours_to_report() {
        let mut owners = Owners::default();
        let key = owner_key("case", "C-3");
        owners.read(key.clone(), claim(7, "a1"));
        owners.read(key.clone(), claim(8, "b1"));
        assert!(owners.take_lost().is_empty());
        assert_eq!(owners.decide(&key, 7, "a2"), Decision::Owned);
    }
}
