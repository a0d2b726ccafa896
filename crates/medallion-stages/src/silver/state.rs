//! Latest-`updated_at`-wins merge state per entity, by input partition.

use medallion_runtime::error::StageError;
use medallion_runtime::state::{KeyedState, StateValue};

/// What an event did to its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Stale,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "CREATED",
            Change::Updated => "UPDATED",
            Change::Stale => "STALE",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "CREATED" => Some(Change::Created),
            "UPDATED" => Some(Change::Updated),
            "STALE" => Some(Change::Stale),
            _ => None,
        }
    }
}

/// The current state of one entity: the event that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityState {
    pub updated_at: i64,
    pub source_system: String,
    pub event_id: String,
    /// How that event changed the entity (replayed as is).
    pub change: Change,
    /// SHA-256 of the canonical fields, for a feed that declares them (`entity.canonical`).
    pub hash: Option<String>,
}

impl EntityState {
    /// The changelog value: `v2|updated_at|change|event_id|hash|source_system` (hash empty when
    /// the feed has none). Values written before the hash existed
    /// (`updated_at|change|event_id|source_system`) still decode, without a hash.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "v2|{}|{}|{}|{}|{}",
            self.updated_at,
            self.change.as_str(),
            self.event_id,
            self.hash.as_deref().unwrap_or_default(),
            self.source_system
        )
        .into_bytes()
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        if let Some(rest) = text.strip_prefix("v2|") {
            let mut parts = rest.splitn(5, '|');
            return Some(Self {
                updated_at: parts.next()?.parse().ok()?,
                change: Change::parse(parts.next()?)?,
                event_id: parts.next()?.to_string(),
                hash: Some(parts.next()?.to_string()).filter(|h| !h.is_empty()),
                source_system: parts.next()?.to_string(),
            });
        }
        let mut parts = text.splitn(4, '|');
        Some(Self {
            updated_at: parts.next()?.parse().ok()?,
            change: Change::parse(parts.next()?)?,
            event_id: parts.next()?.to_string(),
            source_system: parts.next()?.to_string(),
            hash: None,
        })
    }
}

/// The changelog key of an entity.
pub fn entity_key(org_id: i64, entity_type: &str, entity_id: &str) -> String {
    format!("{org_id}/{entity_type}/{entity_id}")
}

/// What the merge decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event is the entity's new state (created or updated); write it to the changelog.
    Stored(EntityState),
    /// The event is the one that set the current state (a redelivery): same decision again.
    Replayed(EntityState),
    /// Older than the current state (returned): drift, not applied.
    Stale(EntityState),
}

impl Outcome {
    pub fn change(&self) -> Change {
        match self {
            Outcome::Stored(s) | Outcome::Replayed(s) => s.change,
            Outcome::Stale(_) => Change::Stale,
        }
    }
}

/// The merge state of every assigned partition, on the local state store.
pub struct Merge {
    authoritative: String,
    state: KeyedState<EntityState>,
}

impl StateValue for EntityState {
    fn encode(&self) -> Vec<u8> {
        EntityState::encode(self)
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        EntityState::decode(bytes)
    }
}

impl Merge {
    pub fn new(authoritative: String, state: KeyedState<EntityState>) -> Self {
        Self {
            authoritative,
            state,
        }
    }

    pub fn store(&self) -> &medallion_runtime::store::StateStore {
        self.state.store()
    }

    /// Brings the state of `partitions` up to date with its changelog, several at a time.
    pub async fn assign_all(&mut self, partitions: &[i32]) -> Result<(), (i32, StageError)> {
        self.state.assign_all(partitions).await.map(|_| ())
    }

    /// Takes `partition` as the disk holds it (tests without a broker).
    #[cfg(test)]
    pub fn adopt(&mut self, partition: i32) -> Result<(), StageError> {
        self.state.adopt(partition)
    }

    pub fn revoke(&mut self, partition: i32) {
        self.state.revoke(partition);
    }

    /// About how many entities the assigned partitions hold.
    pub fn approximate_len(&self) -> u64 {
        self.state.approximate_len()
    }

    /// Stores the batch's writes and checkpoints the partitions written, when due.
    pub fn after_batch(&mut self) -> Result<(), StageError> {
        self.state.after_batch()
    }

    /// Latest `updated_at` wins; on a tie the authoritative source wins over another source,
    /// otherwise the later arrival does. `incoming.change` and `incoming.hash` are ignored:
    /// the change is decided here, and `hash` is called only for a state that is stored (a
    /// stale or replayed update is never hashed).
    pub fn apply(
        &mut self,
        partition: i32,
        key: &str,
        mut incoming: EntityState,
        hash: impl FnOnce() -> Option<String>,
    ) -> Result<Outcome, StageError> {
        let Some(current) = self.state.get(partition, key.as_bytes())? else {
            incoming.change = Change::Created;
            incoming.hash = hash();
            self.state
                .put(partition, key.as_bytes(), incoming.clone())?;
            return Ok(Outcome::Stored(incoming));
        };
        if current.event_id == incoming.event_id {
            return Ok(Outcome::Replayed(current));
        }
        let newer = match incoming.updated_at.cmp(&current.updated_at) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                incoming.source_system == self.authoritative
                    || current.source_system != self.authoritative
            }
        };
        if !newer {
            return Ok(Outcome::Stale(current));
        }
        incoming.change = Change::Updated;
        incoming.hash = hash();
        self.state
            .put(partition, key.as_bytes(), incoming.clone())?;
        Ok(Outcome::Stored(incoming))
    }
}
