//! The flight tracker: launches each batch's records as one flight without waiting, takes the
//! flights that landed, sends again what the broker refused, and keeps the partition
//! [`Ledger`] told, so the committer knows each partition's ack frontier. In-flight work is
//! bounded by `batch.max_in_flight_records` and `batch.max_in_flight_bytes`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ledger::{Booked, Ledger};
use super::planner::Outgoing;
use crate::error::RecordFailure;
use crate::kafka::{BatchProducer, FlightId};
use crate::metrics as m;
use crate::recovery::Snapshot;
use crate::retry::RetryPolicy;

/// Bounds on work in flight: beyond either, the worker waits for a landing before it polls.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlightLimits {
    pub(super) records: usize,
    pub(super) bytes: usize,
}

/// What a landed flight adds to the totals and metrics.
#[derive(Debug, Default)]
pub(super) struct Booking {
    pub(super) consumed: u64,
    /// Records the dedup window dropped.
    pub(super) duplicates: u64,
    /// Outputs and dead letters not produced again: a previous owner produced them.
    pub(super) replayed: u64,
    pub(super) dead: Vec<RecordFailure>,
    /// Event timestamps (ms) of produced outputs, for the latency histogram.
    pub(super) event_times: Vec<i64>,
}

/// A launched flight: its records (kept to send again what the broker refused) and what to
/// count once it lands.
pub(super) struct Flight {
    pub(super) outgoing: Vec<Outgoing>,
    /// The indexes of `outgoing` this flight carries (all, or those sent again).
    indexes: Vec<usize>,
    bytes: usize,
    pub(super) booking: Booking,
    /// How many times its records were sent again.
    retries: usize,
}

/// Flights that landed in one call: the partitions whose frontier may have moved, and the
/// flights to book.
#[derive(Default)]
pub(super) struct Landing {
    pub(super) moved: Vec<i32>,
    pub(super) flights: Vec<Flight>,
}

/// How often, at most while flights are out, idle partitions take the outputs as they stand.
const IDLE_REFRESH: Duration = Duration::from_secs(5);

/// The longest wait before refused records go again: the broker is back within it, however
/// long it was away (the record retry schedule goes on to 8 s and 32 s).
const MAX_RESEND_WAIT: Duration = Duration::from_secs(2);

/// Why the worker takes no input now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blocked {
    /// Work in flight is at a limit.
    Full,
    /// The broker refused records, which are being sent again.
    Resending,
}

pub(super) struct FlightTracker {
    producer: BatchProducer,
    ledger: Arc<Mutex<Ledger>>,
    in_flight: BTreeMap<FlightId, Flight>,
    /// Flights with records the broker refused, each with when they go again (and the id the
    /// ledger knows them by).
    resend: Vec<(Instant, FlightId, Flight)>,
    /// When a flight last landed, or work went out with nothing out before.
    last_progress: Instant,
    limits: InFlightLimits,
    policy: RetryPolicy,
    group: String,
    output_topic: Option<String>,
    dlq_topic: String,
    /// Where the outputs stood when the worker started (for partitions this producer has not
    /// produced to since).
    outputs_at_start: Snapshot,
    /// When idle partitions were last given the outputs as they stand ([`Ledger::refresh_idle`]).
    idle_refreshed: Instant,
}

impl FlightTracker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        producer: BatchProducer,
        ledger: Arc<Mutex<Ledger>>,
        limits: InFlightLimits,
        policy: RetryPolicy,
        group: String,
        output_topic: Option<String>,
        dlq_topic: String,
        outputs_at_start: Snapshot,
    ) -> Self {
        Self {
            producer,
            ledger,
            in_flight: BTreeMap::new(),
            resend: Vec::new(),
            last_progress: Instant::now(),
            limits,
            policy,
            group,
            output_topic,
            dlq_topic,
            outputs_at_start,
            idle_refreshed: Instant::now(),
        }
    }

    /// Launches `outgoing` as one flight; once it lands, each of `commits` may be committed.
    pub(super) async fn launch(
        &mut self,
        outgoing: Vec<Outgoing>,
        commits: Vec<(i32, Booked)>,
        booking: Booking,
    ) -> FlightId {
        if !self.busy() {
            self.last_progress = Instant::now();
        }
        let outputs_before = Arc::new(self.outputs_acked());
        let indexes: Vec<usize> = (0..outgoing.len()).collect();
        let flight = self
            .producer
            .launch(&indexes, |i| outgoing[i].record())
            .await;
        if let Ok(mut ledger) = self.ledger.lock() {
            for (partition, commit) in commits {
                ledger.launched(flight, partition, commit, outputs_before.clone());
            }
        }
        let bytes = outgoing.iter().map(|o| o.value.len()).sum();
        self.in_flight.insert(
            flight,
            Flight {
                outgoing,
                indexes,
                bytes,
                booking,
                retries: 0,
            },
        );
        flight
    }

    /// Takes every flight that landed and advances the ledger over it. A flight with records
    /// the broker refused is not landed: its refused records go again after a backoff (the
    /// broker is unavailable; no new input is taken meanwhile, see [`Self::blocked`]), and the
    /// ledger waits on the new flight instead. The backoff is not waited here: the worker keeps
    /// serving its consumer (a rebalance, a shutdown) while it runs.
    pub(super) async fn land(&mut self) -> Landing {
        self.resend_due().await;
        let mut landing = Landing::default();
        for l in self.producer.take_landed() {
            let Some(mut flight) = self.in_flight.remove(&l.flight) else {
                continue;
            };
            if l.failures.indexes.is_empty() {
                self.last_progress = Instant::now();
                if let Ok(mut ledger) = self.ledger.lock() {
                    landing.moved.extend(ledger.landed(l.flight));
                }
                landing.flights.push(flight);
                continue;
            }
            flight.retries += 1;
            metrics::counter!(m::RETRIES_TOTAL, "stage" => self.group.clone(), "reason" => "broker_unavailable").increment(1);
            let wait = self
                .policy
                .wait_forever(flight.retries)
                .min(MAX_RESEND_WAIT);
            tracing::warn!(
                error = ?l.failures.first_error,
                records = l.failures.indexes.len(),
                ?wait,
                "delivery failed; the broker is unavailable: pausing consumption and sending them again"
            );
            flight.indexes = l.failures.indexes;
            self.resend.push((Instant::now() + wait, l.flight, flight));
        }
        // Idle partitions take the outputs as they stand now, every few seconds and when the
        // last flight landed (their commit metadata changes: stored again with the rest).
        if !landing.flights.is_empty()
            && (!self.busy() || self.idle_refreshed.elapsed() >= IDLE_REFRESH)
        {
            self.idle_refreshed = Instant::now();
            let outputs = Arc::new(self.outputs_acked());
            if let Ok(mut ledger) = self.ledger.lock() {
                landing.moved.extend(ledger.refresh_idle(&outputs));
            }
        }
        landing.moved.sort_unstable();
        landing.moved.dedup();
        landing
    }

    /// Sends again the refused records whose backoff is over.
    async fn resend_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.resend)
            .into_iter()
            .partition(|(at, _, _)| *at <= now);
        self.resend = later;
        for (_, old, flight) in due {
            let retry = self
                .producer
                .launch(&flight.indexes, |i| flight.outgoing[i].record())
                .await;
            if let Ok(mut ledger) = self.ledger.lock() {
                ledger.relaunched(old, retry);
            }
            self.in_flight.insert(retry, flight);
        }
    }

    /// Waits (up to `timeout`) for every flight to land; returns what landed meanwhile.
    pub(super) async fn drain(&mut self, timeout: Duration) -> Landing {
        let deadline = Instant::now() + timeout;
        let mut all = Landing::default();
        loop {
            let landing = self.land().await;
            all.moved.extend(landing.moved);
            all.flights.extend(landing.flights);
            if !self.busy() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    flights = self.in_flight.len() + self.resend.len(),
                    "records still unacknowledged; committing before them"
                );
                break;
            }
            let next_resend = self
                .resend
                .iter()
                .map(|(at, _, _)| at.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(left);
            let _ = tokio::time::timeout(left.min(next_resend), self.producer.landing()).await;
        }
        all.moved.sort_unstable();
        all.moved.dedup();
        all
    }

    /// How long flights have been out with none landing (`None` when nothing is out): the
    /// broker takes no records while this grows.
    pub(super) fn stalled_for(&self) -> Option<Duration> {
        self.busy().then(|| self.last_progress.elapsed())
    }

    /// Whether the worker must wait for landings before it takes more input, and why.
    pub(super) fn blocked(&self) -> Option<Blocked> {
        if !self.resend.is_empty() || self.in_flight.values().any(|f| f.retries > 0) {
            return Some(Blocked::Resending);
        }
        let records: usize = self.in_flight.values().map(|f| f.indexes.len()).sum();
        let bytes: usize = self.in_flight.values().map(|f| f.bytes).sum();
        (records >= self.limits.records || bytes >= self.limits.bytes).then_some(Blocked::Full)
    }

    /// Whether any flight is out.
    pub(super) fn busy(&self) -> bool {
        !self.in_flight.is_empty() || !self.resend.is_empty()
    }

    /// Resolves when a landed flight is there to take.
    pub(super) async fn landing(&self) {
        self.producer.landing().await;
    }

    /// Where the outputs stand by this producer's acknowledgements (from where they stood at
    /// start for partitions it has not produced to).
    fn outputs_acked(&self) -> Snapshot {
        let merge = |start: &BTreeMap<i32, i64>, acked: BTreeMap<i32, i64>| {
            let mut out = start.clone();
            for (p, o) in acked {
                let at = out.entry(p).or_insert(o);
                *at = (*at).max(o);
            }
            out
        };
        Snapshot {
            output: match &self.output_topic {
                Some(topic) => merge(&self.outputs_at_start.output, self.producer.acked(topic)),
                None => BTreeMap::new(),
            },
            dlq: merge(
                &self.outputs_at_start.dlq,
                self.producer.acked(&self.dlq_topic),
            ),
        }
    }
}
