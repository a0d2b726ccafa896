//! Latest-`updated_at`-wins merge state per entity, by input partition.

use std::collections::HashMap;

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

/// The merge state of every assigned partition.
#[derive(Debug)]
pub struct Merge {
    authoritative: String,
    partitions: HashMap<i32, HashMap<String, EntityState>>,
}

impl Merge {
    pub fn new(authoritative: String) -> Self {
        Self {
            authoritative,
            partitions: HashMap::new(),
        }
    }

    /// Replaces the state of `partition` with changelog entries; returns how many were read.
    pub fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>) -> usize {
        let state: HashMap<String, EntityState> = entries
            .into_iter()
            .filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, EntityState::decode(&v)?)))
            .collect();
        let n = state.len();
        self.partitions.insert(partition, state);
        n
    }

    pub fn drop_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Entities held, all partitions together.
    pub fn len(&self) -> usize {
        self.partitions.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    ) -> Outcome {
        let state = self.partitions.entry(partition).or_default();
        let Some(current) = state.get(key) else {
            incoming.change = Change::Created;
            incoming.hash = hash();
            state.insert(key.to_string(), incoming.clone());
            return Outcome::Stored(incoming);
        };
        if current.event_id == incoming.event_id {
            return Outcome::Replayed(current.clone());
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
            return Outcome::Stale(current.clone());
        }
        incoming.change = Change::Updated;
        incoming.hash = hash();
        state.insert(key.to_string(), incoming.clone());
        Outcome::Stored(incoming)
    }
}
