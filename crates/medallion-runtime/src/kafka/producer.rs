//! The flight producer: each [`BatchProducer::launch`] hands a batch of records to librdkafka
//! and returns at once; the delivery callback counts the flight's acknowledgements.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medallion_contracts::topics::Partitioner;
use medallion_contracts::TopicConfig;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use crate::record::HeaderList;

/// A batch of records produced together and acknowledged as one.
pub type FlightId = u32;

/// A producer of *flights*: each call to [`BatchProducer::launch`] hands a batch of records to
/// librdkafka and returns at once with the flight's id; the delivery callback counts the
/// flight's acknowledgements (one counter per flight, not one future per record), and a flight
/// whose every record is acknowledged or failed has *landed*. Any number of flights may be out.
pub struct BatchProducer {
    producer: Arc<ThreadedProducer<AckContext>>,
    flights: Arc<Flights>,
    marks: Arc<Marks>,
    placement: Placement,
}

/// The flight of records sent outside any batch ([`MarkedSender`]): no launch ever takes it.
const MARKED: FlightId = 0;

/// Acknowledgements of records sent by a [`MarkedSender`], by the mark each was sent with:
/// `true` acknowledged, `false` failed.
#[derive(Default)]
pub struct Marks {
    state: Mutex<HashMap<u32, bool>>,
    changed: std::sync::Condvar,
}

impl Marks {
    fn delivered(&self, mark: u32, ok: bool) {
        if let Ok(mut state) = self.state.lock() {
            state.insert(mark, ok);
        }
        self.changed.notify_all();
    }

    /// The outcomes that came back since the last call.
    pub fn take(&self) -> HashMap<u32, bool> {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    /// Blocks until some outcome is there to take, or `timeout`; whether one is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let Ok(state) = self.state.lock() else {
            return false;
        };
        self.changed
            .wait_timeout_while(state, timeout, |s| s.is_empty())
            .map(|(s, _)| !s.is_empty())
            .unwrap_or(false)
    }
}

/// Sends single records through a [`BatchProducer`]'s client, each with a mark its outcome
/// comes back under ([`Marks`]), outside the flights: nothing a batch waits for.
#[derive(Clone)]
pub struct MarkedSender {
    producer: Arc<ThreadedProducer<AckContext>>,
    marks: Arc<Marks>,
}

impl MarkedSender {
    /// Hands the record to librdkafka; `false` if it refused it at once (its queue full, say):
    /// no outcome comes back for that mark.
    pub fn send(&self, topic: &str, partition: i32, key: &[u8], value: &[u8], mark: u32) -> bool {
        let record = BaseRecord::with_opaque_to(topic, pack(MARKED, mark as usize))
            .partition(partition)
            .key(key)
            .payload(value);
        self.producer.send(record).is_ok()
    }

    /// The outcomes of what was sent.
    pub fn marks(&self) -> &Marks {
        &self.marks
    }
}

/// The partition of a keyed record for the topics whose `partitioner` librdkafka does not
/// implement (`java_long_hash`); the others are left to librdkafka's murmur2.
#[derive(Debug, Clone, Default)]
pub struct Placement(HashMap<String, (Partitioner, u32)>);

impl Placement {
    pub fn of(topics: &TopicConfig) -> Self {
        Self(
            topics
                .topics
                .iter()
                .filter(|(_, spec)| spec.partitioner != Partitioner::Murmur2)
                .map(|(name, spec)| (name.clone(), (spec.partitioner, spec.partitions)))
                .collect(),
        )
    }

    /// The partition `key` goes to on `topic`, where this placement decides it.
    pub fn partition(&self, topic: &str, key: Option<&[u8]>) -> Option<i32> {
        let (partitioner, partitions) = self.0.get(topic)?;
        partitioner.partition(key?, *partitions)
    }
}

/// The records of one batch that failed, by index, with the first error.
#[derive(Debug, Default)]
pub struct BatchFailures {
    pub indexes: Vec<usize>,
    pub first_error: Option<KafkaError>,
}

/// A landed flight.
#[derive(Debug)]
pub struct Landed {
    pub flight: FlightId,
    pub failures: BatchFailures,
}

/// The flights of one producer, shared with its delivery callback.
#[derive(Default)]
pub struct Flights {
    state: Mutex<FlightState>,
    /// Wakes tasks waiting for a landing.
    landing: Notify,
    /// Wakes threads waiting for a landing (a rebalance callback).
    landing_sync: std::sync::Condvar,
}

#[derive(Default)]
struct FlightState {
    next: FlightId,
    /// Records not yet acknowledged, and failures so far, by flight.
    out: HashMap<FlightId, (usize, BatchFailures)>,
    /// Flights landed and not yet taken.
    landed: Vec<Landed>,
    /// The highest acknowledged offset, by topic and partition (this producer's lifetime).
    acked: HashMap<String, BTreeMap<i32, i64>>,
}

impl FlightState {
    fn land_if_done(&mut self, flight: FlightId) -> bool {
        if self
            .out
            .get(&flight)
            .is_some_and(|(pending, _)| *pending == 0)
        {
            if let Some((_, failures)) = self.out.remove(&flight) {
                self.landed.push(Landed { flight, failures });
                return true;
            }
        }
        false
    }
}

impl Flights {
    fn notify(&self) {
        self.landing.notify_waiters();
        self.landing.notify_one();
        self.landing_sync.notify_all();
    }

    /// Whether every flight of `flights` has landed (taken or not).
    pub fn all_landed(&self, flights: &[FlightId]) -> bool {
        self.state
            .lock()
            .map(|s| flights.iter().all(|f| !s.out.contains_key(f)))
            .unwrap_or(true)
    }

    /// Blocks the calling thread until every flight of `flights` has landed or `timeout`
    /// passed; returns whether they all landed. For callbacks that run outside the runtime.
    pub fn wait_blocking(&self, flights: &[FlightId], timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        loop {
            if flights.iter().all(|f| !state.out.contains_key(f)) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.landing_sync.wait_timeout(state, left) {
                Ok((s, _)) => state = s,
                Err(_) => return false,
            }
        }
    }

    /// Whether `flight` landed with records refused (looked up among flights not yet taken).
    pub fn failed(&self, flight: FlightId) -> bool {
        self.state
            .lock()
            .map(|s| {
                s.landed
                    .iter()
                    .any(|l| l.flight == flight && !l.failures.indexes.is_empty())
            })
            .unwrap_or(true)
    }
}

struct AckContext {
    flights: Arc<Flights>,
    marks: Arc<Marks>,
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    /// The flight and the record's index in it, packed (see [`pack`]).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (flight, index) = unpack(opaque);
        if flight == MARKED {
            self.marks.delivered(index as u32, result.is_ok());
            return;
        }
        let Ok(mut state) = self.flights.state.lock() else {
            return;
        };
        let state = &mut *state;
        let Some((pending, failures)) = state.out.get_mut(&flight) else {
            return;
        };
        match result {
            Err((e, _)) => {
                failures.indexes.push(index);
                failures.first_error.get_or_insert_with(|| e.clone());
            }
            Ok(message) => {
                let (topic, partition, offset) =
                    (message.topic(), message.partition(), message.offset());
                let high = match state.acked.get_mut(topic) {
                    Some(high) => high,
                    None => state.acked.entry(topic.to_string()).or_default(),
                };
                let at = high.entry(partition).or_insert(offset);
                *at = (*at).max(offset);
            }
        }
        *pending = pending.saturating_sub(1);
        if state.land_if_done(flight) {
            self.flights.notify();
        }
    }
}

// The opaque carries the flight in the high 32 bits and the record index in the low.
const _: () = assert!(
    usize::BITS >= 64,
    "BatchProducer packs two u32 into a usize"
);

fn pack(flight: FlightId, index: usize) -> usize {
    ((flight as usize) << 32) | (index & 0xffff_ffff)
}

fn unpack(opaque: usize) -> (FlightId, usize) {
    ((opaque >> 32) as FlightId, opaque & 0xffff_ffff)
}

/// One record of a batch.
pub struct BatchRecord<'a> {
    pub topic: &'a str,
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub headers: Option<&'a HeaderList>,
}

impl BatchProducer {
    /// Builds the producer from `config` (bootstrap, credentials and producer settings).
    pub fn new(config: &ClientConfig) -> Result<Self, KafkaError> {
        let flights = Arc::new(Flights::default());
        let marks = Arc::new(Marks::default());
        let producer = config.create_with_context(AckContext {
            flights: flights.clone(),
            marks: marks.clone(),
        })?;
        Ok(Self {
            producer: Arc::new(producer),
            flights,
            marks,
            placement: Placement::default(),
        })
    }

    /// Partitions keyed records of the topics `placement` covers by their own partitioner.
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// The flights, for a callback that must wait for some to land.
    pub fn flights(&self) -> Arc<Flights> {
        self.flights.clone()
    }

    /// A sender of single records outside the flights, on this producer's client.
    pub fn marked(&self) -> MarkedSender {
        MarkedSender {
            producer: self.producer.clone(),
            marks: self.marks.clone(),
        }
    }

    /// Hands `indexes` (into the caller's list; `record` builds each) to librdkafka as one
    /// flight and returns its id without waiting for acknowledgements. Waits only while
    /// librdkafka's own queue is full. A record librdkafka refuses at once counts as failed.
    /// An empty flight lands at once.
    pub async fn launch<'a>(
        &self,
        indexes: &[usize],
        record: impl Fn(usize) -> BatchRecord<'a>,
    ) -> FlightId {
        let flight = {
            let Ok(mut state) = self.flights.state.lock() else {
                return FlightId::MAX;
            };
            state.next = state.next.wrapping_add(1);
            if state.next == MARKED {
                state.next = MARKED + 1;
            }
            let flight = state.next;
            // One more than the records: the launch itself, released when every record is out,
            // so the flight cannot land half-launched.
            state
                .out
                .insert(flight, (indexes.len() + 1, BatchFailures::default()));
            flight
        };
        let mut refused = BatchFailures::default();
        for &i in indexes {
            let r = record(i);
            loop {
                let mut base =
                    BaseRecord::with_opaque_to(r.topic, pack(flight, i)).payload(r.value);
                if let Some(key) = r.key {
                    base = base.key(key);
                }
                if let Some(partition) = r
                    .partition
                    .or_else(|| self.placement.partition(r.topic, r.key))
                {
                    base = base.partition(partition);
                }
                if let Some(headers) = r.headers {
                    // librdkafka takes its own list: built once per send.
                    base = base.headers(headers.to_rdkafka());
                }
                match self.producer.send(base) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        refused.indexes.push(i);
                        refused.first_error.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        if let Ok(mut state) = self.flights.state.lock() {
            if let Some((pending, failures)) = state.out.get_mut(&flight) {
                *pending = pending.saturating_sub(1 + refused.indexes.len());
                failures.indexes.append(&mut refused.indexes);
                if failures.first_error.is_none() {
                    failures.first_error = refused.first_error.take();
                }
            }
            if state.land_if_done(flight) {
                self.flights.notify();
            }
        }
        flight
    }

    /// Flights that landed since the last call, failed indexes sorted.
    pub fn take_landed(&self) -> Vec<Landed> {
        let mut landed = self
            .flights
            .state
            .lock()
            .map(|mut s| std::mem::take(&mut s.landed))
            .unwrap_or_default();
        for l in &mut landed {
            l.failures.indexes.sort_unstable();
        }
        landed
    }

    /// Waits until a landed flight is there to take.
    pub async fn landing(&self) {
        loop {
            let notified = self.flights.landing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ready = self
                .flights
                .state
                .lock()
                .map(|s| !s.landed.is_empty())
                .unwrap_or(true);
            if ready {
                return;
            }
            notified.await;
        }
    }

    /// Produces `records` as one flight and waits for it to land. Returns the indexes that
    /// failed, refused or not delivered. For callers with one batch at a time.
    pub async fn send_all<'a>(
        &self,
        indexes: &[usize],
        record: impl Fn(usize) -> BatchRecord<'a>,
    ) -> BatchFailures {
        let flight = self.launch(indexes, record).await;
        loop {
            let notified = self.flights.landing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Ok(mut state) = self.flights.state.lock() {
                if let Some(at) = state.landed.iter().position(|l| l.flight == flight) {
                    let mut failures = state.landed.swap_remove(at).failures;
                    failures.indexes.sort_unstable();
                    return failures;
                }
                if !state.out.contains_key(&flight) {
                    break;
                }
            } else {
                break;
            }
            notified.await;
        }
        BatchFailures {
            indexes: indexes.to_vec(),
            first_error: None,
        }
    }

    /// The highest offset acknowledged so far in each partition of `topic`.
    pub fn acked(&self, topic: &str) -> BTreeMap<i32, i64> {
        self.flights
            .state
            .lock()
            .ok()
            .and_then(|state| state.acked.get(topic).cloned())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_with_the_java_partitioner_is_placed_by_org_and_the_others_by_librdkafka() {
        let text =
            std::fs::read_to_string(medallion_contracts::project_root().join("topic-config.yaml"))
                .expect("topic-config.yaml");
        let text = text.replacen(
            "    schema: bronze/data-cleaned.avsc\n",
            "    schema: bronze/data-cleaned.avsc\n    partitioner: java_long_hash\n",
            1,
        );
        let topics = TopicConfig::parse(&text, "t")
            .expect("valid")
            .with_prefix("blue.")
            .expect("prefix");
        let placement = Placement::of(&topics);
        // Long.valueOf(101).hashCode() = 101; 101 % 12 = 5. 123456789012 hashes to -1097262584.
        assert_eq!(
            placement.partition("blue.bronze.data.cleaned", Some(b"101")),
            Some(5)
        );
        assert_eq!(
            placement.partition("blue.bronze.data.cleaned", Some(b"123456789012")),
            Some(8)
        );
        assert_eq!(placement.partition("blue.bronze.data.cleaned", None), None);
        assert_eq!(
            placement.partition("blue.silver.data.processed", Some(b"101")),
            None
        );
    }
}
