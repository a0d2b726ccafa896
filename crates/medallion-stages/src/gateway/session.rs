//! One client's stream, whatever the transport: what it missed read back from Kafka first, then
//! its outbox, with heartbeats, the cursor of each message, and the end of the stream when its
//! token expires or it falls too far behind.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medallion_runtime::kafka::ReaderContext;
use medallion_runtime::metrics as m;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use super::auth::{now_ms, Principal};
use super::cursor::{Cursor, CursorError};
use super::hub::{Closed, Connection, Message};
use super::Gateway;

/// What a client gets next.
#[derive(Debug)]
pub enum Frame {
    /// An event: its type and its JSON (whose `id` is the cursor after it).
    Event {
        id: String,
        event_type: String,
        json: String,
        timestamp_ms: i64,
    },
    /// A notice from the gateway (`gap`, `token_expired`, `slow_consumer`, `resume_failed`).
    Notice {
        id: Option<String>,
        kind: &'static str,
        json: String,
    },
    /// Nothing new: the cursor so far, and the stream is alive.
    Heartbeat { id: String },
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad cursor: {0}")]
    Cursor(#[from] CursorError),
    #[error("this replica holds its maximum of connections")]
    Full,
    #[error("the gateway is not ready: {0}")]
    NotReady(String),
}

/// One open stream.
pub struct Session {
    gateway: Arc<Gateway>,
    connection: Arc<Connection>,
    principal: Principal,
    org_label: String,
    /// Per slot, the next offset this client has not seen.
    next: Vec<Option<i64>>,
    replay: Option<Replay>,
    notices: VecDeque<Frame>,
    ended: bool,
}

impl Session {
    /// Registers the client and, with a cursor, prepares reading back what it missed.
    pub async fn open(
        gateway: Arc<Gateway>,
        principal: Principal,
        feeds: u64,
        cursor: Option<&str>,
    ) -> Result<Self, OpenError> {
        let mut topology_changed = false;
        let cursor = match cursor.map(str::trim).filter(|c| !c.is_empty()) {
            Some(text) => match gateway.cursors.decode(text, principal.org_id) {
                Ok(c) => Some(c),
                // Ours, but written before the topics changed: the stream starts from now,
                // and the client is told so.
                Err(CursorError::OtherTopology) => {
                    topology_changed = true;
                    None
                }
                Err(e) => {
                    metrics::counter!(m::GATEWAY_RESUMES_TOTAL, "outcome" => "refused")
                        .increment(1);
                    return Err(e.into());
                }
            },
            None => None,
        };
        let open = gateway
            .open
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if open >= gateway.config.max_connections {
            gateway
                .open
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return Err(OpenError::Full);
        }
        let (connection, live) = gateway.hub.register(principal.org_id, feeds);
        let org_label = gateway.org_label(principal.org_id);
        metrics::gauge!(m::GATEWAY_CONNECTIONS, "org" => org_label.clone()).increment(1.0);
        let mut session = Session {
            gateway: gateway.clone(),
            connection,
            principal,
            org_label,
            next: live.clone(),
            replay: None,
            notices: VecDeque::new(),
            ended: false,
        };
        if live.iter().any(Option::is_none) {
            return Err(OpenError::NotReady(
                "the consumer has no position yet".into(),
            ));
        }
        if topology_changed {
            metrics::counter!(m::GATEWAY_RESUMES_TOTAL, "outcome" => "gap").increment(1);
            session.notices.push_back(Frame::Notice {
                id: Some(session.cursor_text()),
                kind: "gap",
                json: json!({
                    "type": "gap",
                    "reason": "the gateway's topics changed since this id was written: the stream starts from now",
                })
                .to_string(),
            });
        }
        if let Some(cursor) = cursor {
            let replay = Replay::open(&gateway, &cursor, &live, feeds).await;
            match replay {
                Ok((replay, gaps)) => {
                    for (slot, from) in &replay.starts {
                        session.next[*slot] = Some(*from);
                    }
                    for (slot, until) in cursor.next.iter().enumerate() {
                        // A cursor ahead of this replica (another replica read further):
                        // what it already saw is not sent again.
                        if let (Some(c), Some(l)) = (until, live[slot]) {
                            if *c > l {
                                session.next[slot] = Some(*c);
                            }
                        }
                    }
                    let outcome = if gaps.is_empty() { "resumed" } else { "gap" };
                    metrics::counter!(m::GATEWAY_RESUMES_TOTAL, "outcome" => outcome).increment(1);
                    for gap in gaps {
                        session.notices.push_back(session.gap_notice(gap));
                    }
                    session.replay = Some(replay);
                }
                Err(reason) => {
                    // Nothing was read: the client keeps the id it came with.
                    for (next, (from, live)) in
                        session.next.iter_mut().zip(cursor.next.iter().zip(&live))
                    {
                        *next = from.or(*live);
                    }
                    metrics::counter!(m::GATEWAY_RESUMES_TOTAL, "outcome" => "failed").increment(1);
                    session.end_with("resume_failed", json!({ "reason": reason }));
                }
            }
        }
        Ok(session)
    }

    fn cursor_text(&self) -> String {
        self.gateway.cursors.encode(&Cursor {
            org_id: self.principal.org_id,
            next: self.next.clone(),
        })
    }

    fn gap_notice(&self, gap: Gap) -> Frame {
        let (topic, partition) = self
            .gateway
            .cursors
            .topology()
            .at(gap.slot)
            .map_or(("", -1), |(t, p)| (t, p));
        Frame::Notice {
            id: Some(self.cursor_text()),
            kind: "gap",
            json: json!({
                "type": "gap",
                "topic": topic,
                "partition": partition,
                "from_offset": gap.from,
                "to_offset": gap.to,
                "lost_records": gap.to - gap.from,
                "reason": "the records were removed by the topic's retention before this client came back",
            })
            .to_string(),
        }
    }

    fn end_with(&mut self, kind: &'static str, detail: serde_json::Value) {
        let mut body = json!({ "type": kind });
        if let (Some(body), Some(detail)) = (body.as_object_mut(), detail.as_object()) {
            body.extend(detail.clone());
        }
        // The id holds whatever a resume read before it failed, so coming back with it makes
        // progress even when the whole gap cannot be read at once.
        self.notices.push_back(Frame::Notice {
            id: Some(self.cursor_text()),
            kind,
            json: body.to_string(),
        });
        self.ended = true;
    }

    /// The next frame, waiting for one; `None` once the stream is over.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.notices.pop_front() {
                return Some(frame);
            }
            if self.ended {
                return None;
            }
            if let Some(replay) = &mut self.replay {
                // Boxed: the read-back's state (a Kafka read, a registry request) would
                // otherwise sit in every idle connection's stream.
                match Box::pin(replay.next(&self.gateway)).await {
                    Ok(Some((record_slot, offset, messages))) => {
                        self.next[record_slot] = Some(offset + 1);
                        for message in messages {
                            if message.org_id == self.principal.org_id
                                && self.connection.feeds & (1 << message.feed) != 0
                            {
                                let frame = self.event_frame(&message);
                                self.notices.push_back(frame);
                            }
                        }
                        continue;
                    }
                    Ok(None) => {
                        for (slot, until) in &replay.until_at_start {
                            let next = self.next[*slot].get_or_insert(*until);
                            *next = (*next).max(*until);
                        }
                        self.replay = None;
                        continue;
                    }
                    Err(reason) => {
                        self.replay = None;
                        metrics::counter!(m::GATEWAY_RESUMES_TOTAL, "outcome" => "failed")
                            .increment(1);
                        self.end_with("resume_failed", json!({ "reason": reason }));
                        continue;
                    }
                }
            }
            let now = now_ms();
            let expires_ms = self.principal.expires_at.saturating_mul(1000);
            if now >= expires_ms {
                self.end_with(
                    "token_expired",
                    json!({"reason": "the token expired: connect again with a fresh one and this id"}),
                );
                continue;
            }
            let popped = {
                let mut outbox = self
                    .connection
                    .outbox
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match outbox.closed() {
                    Some(Closed::SlowConsumer) => Err(()),
                    None => Ok(outbox.pop()),
                }
            };
            match popped {
                Err(()) => {
                    self.end_with(
                        "slow_consumer",
                        json!({"reason": "this client fell too far behind: connect again with this id to read the rest from Kafka"}),
                    );
                    continue;
                }
                Ok(Some((message, cursor_offset))) => {
                    let slot = message.slot;
                    if self.next[slot].is_some_and(|n| message.offset < n) {
                        continue;
                    }
                    self.next[slot] = Some(cursor_offset + 1);
                    self.catch_up_idle_slots();
                    return Some(self.event_frame(&message));
                }
                Ok(None) => {}
            }
            let wait = Duration::from_millis(self.gateway.config.heartbeat_ms)
                .min(Duration::from_millis(expires_ms.saturating_sub(now).max(1)));
            tokio::select! {
                _ = self.connection.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {
                    if now_ms() < expires_ms {
                        self.catch_up_idle_slots();
                        return Some(Frame::Heartbeat { id: self.cursor_text() });
                    }
                }
            }
        }
    }

    /// Moves the cursor past every record dispatched in slots where nothing waits for this
    /// client: they held nothing of its org, so a resume need not read them again.
    fn catch_up_idle_slots(&mut self) {
        if self.replay.is_some() {
            return;
        }
        // Positions first, the outbox second: a record before a position read here is in the
        // outbox already if it is this client's.
        let positions = self.gateway.hub.positions();
        let outbox = self
            .connection
            .outbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (slot, position) in positions.into_iter().enumerate() {
            if let (Some(p), false) = (position, outbox.holds(slot)) {
                let next = self.next[slot].get_or_insert(p);
                *next = (*next).max(p);
            }
        }
    }

    fn event_frame(&self, message: &Message) -> Frame {
        let id = self.cursor_text();
        let event_type = self.gateway.config.feeds[message.feed].event.clone();
        if let Some(sent) = self.gateway.sent.get(message.feed) {
            sent.increment(1);
        }
        Frame::Event {
            json: format!("{{\"id\":\"{id}\",{}", message.body),
            id,
            event_type,
            timestamp_ms: message.timestamp_ms,
        }
    }

    /// Records the frame as written to the client (end-to-end latency).
    pub fn written(&self, frame: &Frame) {
        if let Frame::Event { timestamp_ms, .. } = frame {
            let seconds = (now_ms() as i64 - timestamp_ms).max(0) as f64 / 1000.0;
            self.gateway.latency.record(seconds);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gateway.hub.unregister(&self.connection);
        self.gateway
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        metrics::gauge!(m::GATEWAY_CONNECTIONS, "org" => self.org_label.clone()).decrement(1.0);
    }
}

/// What a resume reads back and what it cannot.
#[derive(Debug, PartialEq, Eq)]
struct ResumePlan {
    /// Per slot read: (slot, from, until the live stream's start).
    reads: Vec<(usize, i64, i64)>,
    /// Where each slot of the cursor starts, past any gap.
    starts: Vec<(usize, i64)>,
    gaps: Vec<Gap>,
}

/// The plan for `wanted` slots (slot, the cursor's next offset, where the live stream took
/// over), given each slot's first offset still held (`low_of`): what retention removed since
/// the cursor is a gap, and the read starts after it.
fn plan_resume(
    wanted: &[(usize, i64, i64)],
    mut low_of: impl FnMut(usize) -> Result<i64, String>,
) -> Result<ResumePlan, String> {
    let mut plan = ResumePlan {
        reads: Vec::new(),
        starts: Vec::new(),
        gaps: Vec::new(),
    };
    for &(slot, mut from, until) in wanted {
        let low = low_of(slot)?;
        if from < low {
            plan.gaps.push(Gap {
                slot,
                from,
                to: low.min(until),
            });
            from = low.min(until);
        }
        plan.starts.push((slot, from));
        if from < until {
            plan.reads.push((slot, from, until));
        }
    }
    Ok(plan)
}

/// Records a resume could not read: retention removed them.
#[derive(Debug, PartialEq, Eq)]
struct Gap {
    slot: usize,
    from: i64,
    to: i64,
}

/// What a resuming client missed, read back from Kafka: per slot from its cursor to where the
/// live stream took over when it registered.
struct Replay {
    consumer: StreamConsumer<ReaderContext>,
    /// Slots still being read, with the offset the live stream starts at.
    until: HashMap<usize, i64>,
    until_at_start: Vec<(usize, i64)>,
    /// Where each read slot starts (after any gap).
    starts: Vec<(usize, i64)>,
    deadline: Instant,
}

impl Replay {
    async fn open(
        gateway: &Arc<Gateway>,
        cursor: &Cursor,
        live: &[Option<i64>],
        feeds: u64,
    ) -> Result<(Self, Vec<Gap>), String> {
        let mut wanted = Vec::new();
        for (slot, (from, until)) in cursor.next.iter().zip(live).enumerate() {
            if let (Some(from), Some(until)) = (from, until) {
                // Partitions of topics the client does not ask for are not read back.
                if from < until && gateway.slot_feeds(slot, feeds) {
                    wanted.push((slot, *from, *until));
                }
            }
        }
        let topology = gateway.cursors.topology().clone();
        let kafka = gateway.kafka.clone();
        let deadline = Instant::now() + Duration::from_millis(gateway.config.resume_timeout_ms);
        tokio::task::spawn_blocking(move || {
            let consumer: StreamConsumer<ReaderContext> = medallion_runtime::kafka::io::reader(
                &kafka,
                "realtime gateway resume",
                "gateway resume reader",
                false,
            )
            .map_err(|e| e.to_string())?;
            let mut tpl = TopicPartitionList::new();
            let plan = plan_resume(&wanted, |slot| {
                let (topic, partition) = topology
                    .at(slot)
                    .ok_or_else(|| format!("no partition at slot {slot}"))?;
                consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(5))
                    .map(|(low, _)| low)
                    .map_err(|e| format!("{topic}/{partition}: {e}"))
            })?;
            let mut until = HashMap::new();
            for &(slot, from, end) in &plan.reads {
                if let Some((topic, partition)) = topology.at(slot) {
                    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
                        .map_err(|e| e.to_string())?;
                    until.insert(slot, end);
                }
            }
            let (starts, gaps) = (plan.starts, plan.gaps);
            if tpl.count() > 0 {
                consumer.assign(&tpl).map_err(|e| e.to_string())?;
            }
            let until_at_start = until.iter().map(|(s, u)| (*s, *u)).collect();
            Ok((
                Replay {
                    consumer,
                    until,
                    until_at_start,
                    starts,
                    deadline,
                },
                gaps,
            ))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The next record read back, as (slot, offset, its messages); `None` when every slot is
    /// read up to where the live stream took over.
    async fn next(
        &mut self,
        gateway: &Gateway,
    ) -> Result<Option<(usize, i64, Vec<Message>)>, String> {
        loop {
            if self.until.is_empty() {
                return Ok(None);
            }
            if Instant::now() >= self.deadline {
                return Err("reading back what this client missed took too long".into());
            }
            let received =
                tokio::time::timeout(Duration::from_millis(500), self.consumer.recv()).await;
            let message = match received {
                Err(_) => {
                    self.drop_reached_slots(gateway);
                    continue;
                }
                Ok(Err(e)) => return Err(format!("reading back: {e}")),
                Ok(Ok(message)) => message,
            };
            let topic = message.topic().to_string();
            let (partition, offset) = (message.partition(), message.offset());
            let Some(slot) = gateway.cursors.topology().slot(&topic, partition) else {
                continue;
            };
            let Some(until) = self.until.get(&slot).copied() else {
                continue;
            };
            if offset >= until {
                self.until.remove(&slot);
                continue;
            }
            if offset + 1 >= until {
                self.until.remove(&slot);
            }
            metrics::counter!(m::GATEWAY_RESUME_RECORDS_TOTAL).increment(1);
            let timestamp_ms = message.timestamp().to_millis().unwrap_or_default();
            let value = message.payload().map(<[u8]>::to_vec);
            drop(message);
            let mut attempts = 0;
            let messages = loop {
                match gateway
                    .decoder
                    .record(&topic, slot, offset, timestamp_ms, value.as_deref())
                    .await
                {
                    Ok(messages) => break messages,
                    Err(e) => {
                        attempts += 1;
                        if attempts >= 5 || Instant::now() >= self.deadline {
                            return Err(e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            return Ok(Some((slot, offset, messages)));
        }
    }

    /// Slots whose read position reached where the live stream took over (the last records
    /// before it may be transaction markers, never delivered).
    fn drop_reached_slots(&mut self, gateway: &Gateway) {
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for element in positions.elements() {
            let Some(slot) = gateway
                .cursors
                .topology()
                .slot(element.topic(), element.partition())
            else {
                continue;
            };
            if let (Offset::Offset(at), Some(until)) = (element.offset(), self.until.get(&slot)) {
                if at >= *until {
                    self.until.remove(&slot);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_reads_from_its_cursor_and_names_what_retention_took_as_a_gap() {
        // Slot 0: all still there. Slot 3: retention took offsets 10..25. Slot 5: it took
        // everything up to past where the live stream starts.
        let wanted = [(0, 100, 120), (3, 10, 40), (5, 7, 9)];
        let lows = [(0, 50), (3, 25), (5, 30)];
        let plan = plan_resume(&wanted, |slot| {
            lows.iter()
                .find(|(s, _)| *s == slot)
                .map(|(_, low)| *low)
                .ok_or_else(|| "unknown".to_string())
        })
        .expect("plan");
        assert_eq!(
            plan,
            ResumePlan {
                reads: vec![(0, 100, 120), (3, 25, 40)],
                starts: vec![(0, 100), (3, 25), (5, 9)],
                gaps: vec![
                    Gap {
                        slot: 3,
                        from: 10,
                        to: 25
                    },
                    Gap {
                        slot: 5,
                        from: 7,
                        to: 9
                    },
                ],
            }
        );
        let failed = plan_resume(&wanted, |_| Err("no broker".to_string()));
        assert_eq!(failed, Err("no broker".to_string()));
    }
}
