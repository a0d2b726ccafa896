//! gold-processor (`silver.data.processed` → `gold.data.ready`, "aggregate and enrich"):
//! event-time tumbling windows per org and metric. Every measurement of a silver event is a
//! metric sample, and every event also counts as one sample of `events.<entity_type>`; STALE
//! (drift) events are not counted. Per batch, DataFusion SQL computes the partial aggregates
//! (count, sum, min, max per window and entity); the stage merges them into its open windows.
//!
//! Watermark per org (of a partition) = the org's max event time seen − allowed lateness. A
//! window is emitted once, when its org's watermark passes its end; an event whose window is
//! already closed is `late` and goes to the DLQ. Per org, because the runtime shares a partition
//! fairly among its orgs: an org held back behind its own backlog arrives after the others'
//! newer events, and those must not close its windows. An org that sends nothing for
//! `idle_close_ms` (wall clock) is brought up to the partition's newest watermark, so its last
//! windows close as they did when the watermark was the partition's.
//!
//! Exactly-once totals without a state store: the committed offset of a partition is the first
//! offset still feeding an open window, and the commit carries the watermark and the position
//! reached (`wm=<ms>;pos=<offset>`). After a crash or a rebalance the owner reads from that
//! offset with the watermark restored: records before `pos` whose window had closed are
//! skipped (already emitted or dead-lettered), the others rebuild the open windows exactly.
//! A window emitted between the last commit and a crash is emitted again with the same key,
//! event id and totals.

use std::collections::{BTreeMap, HashMap, HashSet};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int32Type, Int64Type};
use medallion_runtime::envelope::Envelope;
use medallion_runtime::error::{RecordFailure, SetupError, StageError};
use medallion_runtime::metrics as m;
use medallion_runtime::worker::{meta, Collector, OutputEvent, Stage, StageSetup};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::plan::{struct_access, BatchPlan};

#[cfg(test)]
mod tests;

/// The consumer group, and so the binary's name.
pub const GROUP: &str = "gold-processor";
/// DLQ reason of an event whose window had closed.
pub const LATE: &str = "late";

/// gold-processor's own settings (the `stage:` section of its config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoldConfig {
    /// Tumbling window size.
    pub window_ms: i64,
    /// How far behind the latest event time a window stays open.
    pub allowed_lateness_ms: i64,
    /// An org without events for this long (wall clock) has its watermark brought up to its
    /// partition's newest, closing its open windows. Unset: `window_ms + allowed_lateness_ms`.
    pub idle_close_ms: Option<u64>,
}

impl Default for GoldConfig {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            allowed_lateness_ms: 10_000,
            idle_close_ms: None,
        }
    }
}

/// Partial aggregates of one batch, as SQL over the events the stage counts.
fn sql(config: &GoldConfig) -> String {
    let w = config.window_ms;
    struct_access(&format!(
        r#"WITH counted AS (
  SELECT "{p}" AS p, "{o}" AS o, org_id, CAST("timestamp" AS BIGINT) AS t, trace_id,
         payload['entity']['entity_type'] AS entity_type,
         payload['entity']['entity_type'] || ':' || payload['entity']['entity_id'] AS entity,
         payload['measurements'] AS measurements
  FROM input),
samples AS (
  SELECT p, o, org_id, t, trace_id, entity, 'events.' || entity_type AS metric, 1.0 AS value
  FROM counted
  UNION ALL
  SELECT p, o, org_id, t, trace_id, entity, m['name'] AS metric, CAST(m['value'] AS DOUBLE) AS value
  FROM (SELECT p, o, org_id, t, trace_id, entity, unnest(measurements) AS m FROM counted))
SELECT p, org_id, metric, t - (t % {w}) AS window_start, entity,
       count(*) AS n, sum(value) AS total, min(value) AS lo, max(value) AS hi,
       min(o) AS first_offset, first_value(trace_id ORDER BY o) AS first_trace
FROM samples
GROUP BY p, org_id, metric, t - (t % {w}), entity"#,
        p = meta::PARTITION,
        o = meta::OFFSET,
    ))
}

/// One open window's running aggregate.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    count: i64,
    sum: f64,
    min: f64,
    max: f64,
    entities: HashSet<String>,
    first_offset: i64,
    first_trace: Option<String>,
}

/// (org, metric, window start).
type WindowKey = (i64, String, i64);

/// Windowing state of one partition.
#[derive(Debug, Default)]
struct PartitionState {
    /// Per org: its max event time seen − lateness, and when (wall clock) it last had an event.
    orgs: HashMap<i64, (i64, std::time::Instant)>,
    /// The partition's max event time seen − lateness.
    newest: Option<i64>,
    /// Restored from the commit: every org's watermark was at least this.
    floor: Option<i64>,
    /// Records below this offset were processed before the restart that restored this state.
    replay_until: i64,
    windows: BTreeMap<WindowKey, Window>,
}

impl PartitionState {
    fn restore(metadata: &str) -> Option<Self> {
        let mut watermark = None;
        let mut pos = None;
        for part in metadata.split(';') {
            match part.split_once('=') {
                Some(("wm", v)) => watermark = Some(v.parse().ok()?),
                Some(("pos", v)) => pos = Some(v.parse().ok()?),
                _ => {}
            }
        }
        Some(Self {
            floor: watermark,
            newest: watermark,
            replay_until: pos?,
            ..Self::default()
        })
    }

    /// `org`'s watermark: its own, never below the restored floor; `None` before anything.
    fn watermark(&self, org: i64) -> Option<i64> {
        let own = self.orgs.get(&org).map(|(wm, _)| *wm);
        match (own, self.floor) {
            (Some(o), Some(f)) => Some(o.max(f)),
            (o, f) => o.or(f),
        }
    }

    /// What every org's watermark is at least (for the commit).
    fn lowest(&self) -> Option<i64> {
        // Each org's is at least the floor.
        self.orgs
            .keys()
            .filter_map(|o| self.watermark(*o))
            .min()
            .or(self.floor)
    }
}

/// The gold stage.
pub struct Gold {
    config: GoldConfig,
    plan: BatchPlan,
    partitions: HashMap<i32, PartitionState>,
}

/// What the stage decided for one input event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Count,
    Late,
    /// Read again after a restart; its window had closed before: already accounted for.
    Skip,
    /// A STALE (drift) event: passes through gold without counting.
    Ignore,
}

impl Gold {
    /// Plans the transform.
    pub async fn new(setup: StageSetup, config: GoldConfig) -> Result<Self, SetupError> {
        if config.window_ms <= 0 {
            return Err(SetupError::config(
                "stage.window_ms",
                format!("must be > 0 (has {})", config.window_ms),
            ));
        }
        if config.allowed_lateness_ms < 0 {
            return Err(SetupError::config(
                "stage.allowed_lateness_ms",
                format!("must be >= 0 (has {})", config.allowed_lateness_ms),
            ));
        }
        let plan = BatchPlan::new(&sql(&config), setup.input_schema.clone())
            .await
            .map_err(|e| SetupError::plan("the gold transform", e))?;
        Ok(Self {
            config,
            plan,
            partitions: HashMap::new(),
        })
    }

    fn window_end(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.config.window_ms) + self.config.window_ms
    }

    /// Decides, in offset order, which events count, which are late and which were already
    /// accounted for before a restart; advances the watermarks.
    fn fates(&mut self, input: &RecordBatch) -> Result<Vec<Fate>, StageError> {
        let col = |name: &str| {
            input
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| StageError::Transform(format!("no column {name}")))
        };
        let times = arrow::compute::cast(&col("timestamp")?, &DataType::Int64)?;
        let times = times.as_primitive::<Int64Type>();
        let partitions = col(meta::PARTITION)?;
        let partitions = partitions.as_primitive::<Int32Type>();
        let offsets = col(meta::OFFSET)?;
        let offsets = offsets.as_primitive::<Int64Type>();
        let payload = col("payload")?;
        let change = payload
            .as_struct()
            .column_by_name("change")
            .ok_or_else(|| StageError::Transform("no payload.change".into()))?;
        let change = arrow::compute::cast(change, &DataType::Utf8)?;
        let change = change.as_string::<i32>();
        let orgs = arrow::compute::cast(&col("org_id")?, &DataType::Int64)?;
        let orgs = orgs.as_primitive::<Int64Type>();
        let lateness = self.config.allowed_lateness_ms;
        let now = std::time::Instant::now();
        let mut fates = Vec::with_capacity(input.num_rows());
        for i in 0..input.num_rows() {
            if change.value(i) == "STALE" {
                fates.push(Fate::Ignore);
                continue;
            }
            let t = times.value(i);
            let end = self.window_end(t);
            let org = orgs.value(i);
            let state = self.partitions.entry(partitions.value(i)).or_default();
            let closed = state.watermark(org).is_some_and(|wm| end <= wm);
            let fate = if closed && offsets.value(i) < state.replay_until {
                Fate::Skip
            } else if closed {
                Fate::Late
            } else {
                Fate::Count
            };
            if fate == Fate::Count {
                let candidate = t - lateness;
                let own = state
                    .watermark(org)
                    .map_or(candidate, |wm| wm.max(candidate));
                state.orgs.insert(org, (own, now));
                state.newest = Some(state.newest.map_or(candidate, |n| n.max(candidate)));
            } else if let Some(entry) = state.orgs.get_mut(&org) {
                entry.1 = now;
            }
            fates.push(fate);
        }
        Ok(fates)
    }

    fn merge(&mut self, partials: &[RecordBatch]) -> Result<(), StageError> {
        for batch in partials {
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| StageError::Transform(format!("no column {name}")))
            };
            let (p, org, metric, start, entity) = (
                col("p")?,
                col("org_id")?,
                col("metric")?,
                col("window_start")?,
                col("entity")?,
            );
            let (n, total, lo, hi) = (col("n")?, col("total")?, col("lo")?, col("hi")?);
            let (first_offset, first_trace) = (col("first_offset")?, col("first_trace")?);
            let metric = arrow::compute::cast(&metric, &DataType::Utf8)?;
            let entity = arrow::compute::cast(&entity, &DataType::Utf8)?;
            let first_trace = arrow::compute::cast(&first_trace, &DataType::Utf8)?;
            let (metric, entity, first_trace) = (
                metric.as_string::<i32>(),
                entity.as_string::<i32>(),
                first_trace.as_string::<i32>(),
            );
            for i in 0..batch.num_rows() {
                if metric.is_null(i) {
                    continue;
                }
                let state = self
                    .partitions
                    .entry(p.as_primitive::<Int32Type>().value(i))
                    .or_default();
                let key = (
                    org.as_primitive::<Int64Type>().value(i),
                    metric.value(i).to_string(),
                    start.as_primitive::<Int64Type>().value(i),
                );
                let offset = first_offset.as_primitive::<Int64Type>().value(i);
                let trace = (!first_trace.is_null(i)).then(|| first_trace.value(i).to_string());
                let (count, sum) = (
                    n.as_primitive::<Int64Type>().value(i),
                    total.as_primitive::<Float64Type>().value(i),
                );
                let (min, max) = (
                    lo.as_primitive::<Float64Type>().value(i),
                    hi.as_primitive::<Float64Type>().value(i),
                );
                let window = state.windows.entry(key).or_insert_with(|| Window {
                    count: 0,
                    sum: 0.0,
                    min,
                    max,
                    entities: HashSet::new(),
                    first_offset: offset,
                    first_trace: trace.clone(),
                });
                window.count += count;
                window.sum += sum;
                window.min = window.min.min(min);
                window.max = window.max.max(max);
                if !entity.is_null(i) {
                    window.entities.insert(entity.value(i).to_string());
                }
                if offset < window.first_offset {
                    window.first_offset = offset;
                    window.first_trace = trace;
                }
            }
        }
        Ok(())
    }

    /// Brings orgs idle for `idle_close_ms` up to their partition's newest watermark.
    fn close_idle(&mut self) {
        let idle = std::time::Duration::from_millis(self.config.idle_close_ms.unwrap_or(
            u64::try_from(self.config.window_ms + self.config.allowed_lateness_ms).unwrap_or(0),
        ));
        for state in self.partitions.values_mut() {
            let Some(newest) = state.newest else { continue };
            for (wm, last) in state.orgs.values_mut() {
                if *wm < newest && last.elapsed() >= idle {
                    *wm = newest;
                }
            }
        }
    }

    /// Emits (and forgets) every window whose end its org's watermark has passed.
    fn close(&mut self) -> Vec<OutputEvent> {
        let mut closed: Vec<(i32, WindowKey, Window)> = Vec::new();
        for (p, state) in &mut self.partitions {
            let w = self.config.window_ms;
            let done: Vec<WindowKey> = state
                .windows
                .keys()
                .filter(|(org, _, start)| state.watermark(*org).is_some_and(|wm| start + w <= wm))
                .cloned()
                .collect();
            for key in done {
                if let Some(window) = state.windows.remove(&key) {
                    closed.push((*p, key, window));
                }
            }
        }
        closed.sort_by(|a, b| (a.1 .2, a.1 .0, &a.1 .1).cmp(&(b.1 .2, b.1 .0, &b.1 .1)));
        let mut out = Vec::with_capacity(closed.len());
        for (_, (org, metric, start), window) in closed {
            let end = start + self.config.window_ms;
            let id = window_event_id(org, &metric, start);
            let event = Envelope {
                event_id: &id,
                event_type: "gold.metric.windowed",
                timestamp: end,
                service: GROUP,
                correlation_id: &id,
                org_id: org,
                trace_id: window.first_trace.as_deref(),
                classification: "internal",
            }
            .event(json!({
                "metric": metric,
                "window_start": start,
                "window_end": end,
                "count": window.count,
                "sum": window.sum,
                "min": window.min,
                "max": window.max,
                "avg": window.sum / window.count.max(1) as f64,
                "distinct_entities": window.entities.len() as i64,
                "dimensions": {"window_ms": self.config.window_ms.to_string()},
            }));
            out.push(OutputEvent {
                key: org.to_string(),
                event,
            });
        }
        metrics::counter!(m::WINDOWS_EMITTED_TOTAL, "stage" => GROUP).increment(out.len() as u64);
        let open: usize = self.partitions.values().map(|s| s.windows.len()).sum();
        metrics::gauge!(m::OPEN_WINDOWS, "stage" => GROUP).set(open as f64);
        out
    }
}

/// The deterministic event id of a window: the same org, metric and start give the same id.
pub fn window_event_id(org: i64, metric: &str, start: i64) -> String {
    medallion_runtime::ids::stable_id(&["gold", &org.to_string(), metric, &start.to_string()])
}

impl Stage for Gold {
    async fn assign(
        &mut self,
        partition: i32,
        committed_metadata: Option<String>,
    ) -> Result<(), StageError> {
        let state = committed_metadata
            .as_deref()
            .and_then(PartitionState::restore)
            .unwrap_or_default();
        tracing::info!(
            partition,
            watermark = ?state.floor,
            replay_until = state.replay_until,
            "gold partition assigned"
        );
        self.partitions.insert(partition, state);
        Ok(())
    }

    fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// The watermark is per partition: taken out of log order, an org held back behind
    /// another's backlog would find its windows closed by the others' later events.
    fn needs_log_order(&self) -> bool {
        true
    }

    fn position(&self, partition: i32, next_offset: i64) -> (i64, Option<String>) {
        let Some(state) = self.partitions.get(&partition) else {
            return (next_offset, None);
        };
        let first_open = state
            .windows
            .values()
            .map(|w| w.first_offset)
            .min()
            .unwrap_or(next_offset)
            .min(next_offset);
        let pos = next_offset.max(state.replay_until);
        let metadata = match state.lowest() {
            Some(wm) => format!("wm={wm};pos={pos}"),
            None => format!("pos={pos}"),
        };
        (first_open, Some(metadata))
    }

    async fn process(&mut self, input: RecordBatch, out: &mut Collector) -> Result<(), StageError> {
        let fates = self.fates(&input)?;
        for (row, fate) in fates.iter().enumerate() {
            if *fate == Fate::Late {
                metrics::counter!(m::LATE_EVENTS_TOTAL, "stage" => GROUP).increment(1);
                out.reject(
                    row as u32,
                    RecordFailure::poison(
                        LATE,
                        format!(
                            "event time is in a window that closed (watermark = max event time - {} ms)",
                            self.config.allowed_lateness_ms
                        ),
                    ),
                );
            }
        }
        let counted =
            BooleanArray::from(fates.iter().map(|f| *f == Fate::Count).collect::<Vec<_>>());
        let input = arrow::compute::filter_record_batch(&input, &counted)?;
        if input.num_rows() > 0 {
            let partials = self.plan.run(input).await?;
            self.merge(&partials)?;
        }
        for OutputEvent { key, event } in self.close() {
            out.emit_event(key, event);
        }
        Ok(())
    }

    async fn settle(&mut self, _closing: bool, out: &mut Collector) -> Result<(), StageError> {
        self.close_idle();
        for OutputEvent { key, event } in self.close() {
            out.emit_event(key, event);
        }
        Ok(())
    }
}
