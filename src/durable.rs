//! Durable rooms on this node: messages delivered in `seq` order with no gap, resumes merged
//! with live traffic, and gaps repaired from the room's history.
//!
//! Everything here runs under one `std::sync::Mutex` and never waits: the dispatcher calls
//! [`Durable::on_live`] for each positioned envelope, and the Redis reads (a resume's replay,
//! a gap's repair) happen elsewhere (`bus::history`, `socket`) and hand their results back
//! through [`Durable::finish_resume`] and [`Durable::repaired`]. Delivering under the lock is
//! what keeps one order: live, replayed and repaired messages reach each socket in `seq` order,
//! whichever task delivers them.
//!
//! # The room's sequencer
//!
//! Per room the node remembers the last position it delivered. A live message with the next
//! seq is delivered; one with a seq already delivered is a duplicate and dropped; one further
//! ahead reveals a gap: the room's live messages are then held (at most the replay limit; more
//! are dropped and read back later, as they are in the history too), *one* read of the missing
//! range is asked of the bus, and when it comes back the range and then the held messages are
//! delivered in order. A gap the history cannot fill (trimmed, or the history was lost) is
//! reported to the room's members as [`Missed`](crate::Missed), as on a plain room. After the
//! subscriber link comes back, the bus asks for the same repair for every durable room the
//! node held ([`Durable::repair_after_link_loss`]).
//!
//! # A resuming socket
//!
//! [`Durable::hold`] registers the socket *before* it joins: from its first live message on,
//! its frames are held (at most the replay limit) instead of queued. The socket then joins,
//! the history after its position is read, and [`Durable::finish_resume`] queues, in order:
//! the notice, the replay, the held frames not already replayed (by seq). From then on its
//! frames go straight to its queue. The hand-off has no gap because the read starts after the
//! subscription was confirmed (every later message reaches the held frames) and no duplicate
//! because held frames at or below the last replayed seq are skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Message;
use tokio::sync::mpsc;

use crate::config::{Config, Durability};
use crate::envelope::{self, Decoded, Payload};
use crate::position::{Position, Unrecoverable};
use crate::queue::Outbox;
use crate::registry::{Dispatched, Registry, SocketId};
use crate::room::RoomName;
use crate::stats::Counters;

/// What a durable join found: the socket's position and, when it asked to resume, whether the
/// messages it missed were replayed. From [`FanoutSocket::join_durable`](crate::FanoutSocket::join_durable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    room: RoomName,
    position: Position,
    since: Option<Position>,
    failure: Option<Unrecoverable>,
    replayed: u64,
}

impl Resumed {
    /// The room joined.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// The position of the last message before this socket's first delivery: the socket's
    /// `since` when it was recovered (the replay starts right after it), else the room's
    /// position when the socket joined.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// `None` for a join without `since`; else whether every message after it was replayed.
    pub fn recovered(&self) -> Option<bool> {
        self.since.as_ref().map(|_| self.failure.is_none())
    }

    /// Why the messages after `since` could not be replayed.
    pub fn failure(&self) -> Option<Unrecoverable> {
        self.failure
    }

    /// How many messages were replayed.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// The control notice a client receives first, as the wire contract spells it:
    /// `{"type":"fanout.position","room":R,"epoch":E,"seq":S}` after a join without `since`,
    /// `{"type":"fanout.resumed","room":R,"recovered":B,"epoch":E,"seq":S}` (with `"reason"`
    /// when not recovered) after a resume.
    pub fn notice(&self) -> String {
        let (room, epoch, seq) = (
            json_string(self.room.as_str()),
            json_string(self.position.epoch()),
            self.position.seq(),
        );
        match (&self.since, self.failure) {
            (None, _) => {
                format!(r#"{{"type":"fanout.position","room":{room},"epoch":{epoch},"seq":{seq}}}"#)
            }
            (Some(_), None) => format!(
                r#"{{"type":"fanout.resumed","room":{room},"recovered":true,"epoch":{epoch},"seq":{seq}}}"#
            ),
            (Some(_), Some(why)) => format!(
                r#"{{"type":"fanout.resumed","room":{room},"recovered":false,"reason":"{why}","epoch":{epoch},"seq":{seq}}}"#
            ),
        }
    }
}

/// Messages read from a durable room's history, with the room's current position. From
/// [`RoomHandle::history`](crate::RoomHandle::history) and
/// [`RoomHandle::history_since`](crate::RoomHandle::history_since).
#[derive(Debug, Clone)]
pub struct History {
    room: RoomName,
    position: Position,
    messages: Vec<(u64, Payload)>,
    failure: Option<Unrecoverable>,
}

impl History {
    /// The room read.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// The room's position when it was read: its epoch and the seq of its last message.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The messages, oldest first, each with its seq in [`position`](History::position)'s
    /// epoch. Empty when [`failure`](History::failure) says why.
    pub fn messages(&self) -> &[(u64, Payload)] {
        &self.messages
    }

    /// For [`history_since`](crate::RoomHandle::history_since): why the messages after the
    /// position cannot be read (nothing is returned then).
    pub fn failure(&self) -> Option<Unrecoverable> {
        self.failure
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A room's history as read from Redis: its epoch, its current top seq, and the entries read
/// (raw envelopes, oldest first).
#[derive(Debug, Clone)]
pub(crate) struct Page {
    pub(crate) top: Position,
    pub(crate) entries: Vec<(u64, Vec<u8>)>,
}

impl Page {
    /// Whether this page holds every message after `since`, up to its top; why not otherwise.
    /// The reader asks for at most `limit` entries after `since`.
    pub(crate) fn covers(&self, since: &Position, limit: usize) -> Result<(), Unrecoverable> {
        if since.epoch() != self.top.epoch() || since.seq() > self.top.seq() {
            return Err(Unrecoverable::EpochChanged);
        }
        let behind = self.top.seq() - since.seq();
        if behind > limit as u64 {
            return Err(Unrecoverable::TooFarBehind);
        }
        let contiguous = self
            .entries
            .iter()
            .zip(since.seq() + 1..)
            .all(|((seq, _), want)| *seq == want);
        if self.entries.len() as u64 != behind || !contiguous {
            return Err(Unrecoverable::Trimmed);
        }
        Ok(())
    }
}

/// A gap for the bus to read back: every message of `room` after `after`.
#[derive(Debug)]
pub(crate) struct Repair {
    pub(crate) room: RoomName,
    pub(crate) after: Position,
}

/// One socket that asked for positions in a durable room.
#[derive(Debug)]
enum Gate {
    /// Frames go to the socket's queue, except those at or before `through`: the replay
    /// (or the position the socket was told) already covers them, though their live copy may
    /// still be on its way to the dispatcher. Cleared by the first live frame after it.
    Open { through: Option<Position> },
    /// The socket is resuming: its frames wait here, at most the replay limit; `overflowed`
    /// is the last position that did not fit.
    Held {
        frames: VecDeque<(Option<Position>, Message)>,
        overflowed: Option<Position>,
    },
}

#[derive(Debug)]
struct RoomState {
    name: RoomName,
    /// The last position delivered to this node's members of the room.
    last: Option<Position>,
    /// Members that asked for positions (the others get plain frames and are not here).
    members: HashMap<SocketId, Gate>,
    /// A repair is in flight: the live messages that arrived since, in order (bounded by the
    /// replay limit; what did not fit is read back from history after the repair).
    repairing: Option<VecDeque<Decoded>>,
}

impl RoomState {
    fn new(name: RoomName) -> Self {
        Self {
            name,
            last: None,
            members: HashMap::new(),
            repairing: None,
        }
    }
}

fn state_of<'a>(rooms: &'a mut HashMap<RoomName, RoomState>, room: &RoomName) -> &'a mut RoomState {
    rooms
        .entry(room.clone())
        .or_insert_with(|| RoomState::new(room.clone()))
}

/// Durable rooms on this node (see the module docs).
#[derive(Debug)]
pub(crate) struct Durable {
    config: Arc<Config>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    rooms: Mutex<HashMap<RoomName, RoomState>>,
    /// Gaps for the bus to read. At most one per room is outstanding, so the queue holds at
    /// most one request per durable room of this node.
    repairs: mpsc::UnboundedSender<Repair>,
    repairs_rx: Mutex<Option<mpsc::UnboundedReceiver<Repair>>>,
}

impl Durable {
    pub(crate) fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        counters: Arc<Counters>,
    ) -> Self {
        let (repairs, repairs_rx) = mpsc::unbounded_channel();
        Self {
            config,
            registry,
            counters,
            rooms: Mutex::default(),
            repairs,
            repairs_rx: Mutex::new(Some(repairs_rx)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RoomName, RoomState>> {
        // Every critical section leaves the map consistent at each step.
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The repair requests, for the bus's reader task (once).
    pub(crate) fn take_repairs(&self) -> Option<mpsc::UnboundedReceiver<Repair>> {
        self.repairs_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn settings(&self, room: &str) -> Durability {
        self.config.durable_for(room).copied().unwrap_or_default()
    }

    /// Whether `room` is durable on this node.
    pub(crate) fn is_durable(&self, room: &str) -> bool {
        self.config.durable_for(room).is_some()
    }

    /// A live envelope of durable `room`, from the dispatcher: delivered in seq order, or held
    /// while a gap is read back. Never waits.
    pub(crate) fn on_live(
        &self,
        room: &str,
        decoded: Decoded,
        to_wake: &mut Vec<Arc<Outbox>>,
    ) -> Dispatched {
        let mut rooms = self.lock();
        if let Some(state) = rooms.get_mut(room) {
            return self.sequence(state, decoded, to_wake);
        }
        // No local member: a message still on its way after the last one left. Remembering
        // its position would make the next subscription see a gap that no member missed.
        if !self.registry.has_members(room) {
            return Dispatched::default();
        }
        // The channel's room is a valid name (the dispatcher found it on a room channel).
        let Ok(name) = RoomName::new(room) else {
            return Dispatched::default();
        };
        self.sequence(state_of(&mut rooms, &name), decoded, to_wake)
    }

    fn sequence(
        &self,
        state: &mut RoomState,
        decoded: Decoded,
        to_wake: &mut Vec<Arc<Outbox>>,
    ) -> Dispatched {
        let room = &state.name.clone();
        if let Some(held) = &mut state.repairing {
            if held.len() < self.settings(room.as_str()).replay_limit.get() {
                held.push_back(decoded);
            }
            // Else dropped here: it is in the history, and the next live message after the
            // repair reveals the gap again.
            return Dispatched::default();
        }
        let Some(pos) = decoded.pos.clone() else {
            // A seed node's envelope: delivered, not sequenced (it has no seq).
            return self.emit(state, &decoded, to_wake);
        };
        match &state.last {
            Some(last) if last.epoch() == pos.epoch() && pos.seq() <= last.seq() => {
                Dispatched::default() // already delivered (replayed by a repair)
            }
            Some(last) if last.epoch() == pos.epoch() && pos.seq() > last.seq() + 1 => {
                let after = last.clone();
                state.repairing = Some(VecDeque::from([decoded]));
                self.request_repair(room, after);
                Dispatched::default()
            }
            Some(last) if last.epoch() != pos.epoch() => {
                // The room's history was lost: what this node delivered before cannot be
                // related to what comes now.
                tracing::warn!(room = %room, old = %last, new = %pos, "durable room's history was lost (new epoch)");
                self.registry.tell_missed(room.as_str(), None);
                state.last = Some(pos);
                self.emit(state, &decoded, to_wake)
            }
            _ => {
                state.last = Some(pos);
                self.emit(state, &decoded, to_wake)
            }
        }
    }

    fn request_repair(&self, room: &RoomName, after: Position) {
        tracing::debug!(room = %room, after = %after, "reading a durable room's gap from its history");
        // The receiver lives as long as the node's bus; without it there is no one to read.
        let _ = self.repairs.send(Repair {
            room: room.clone(),
            after,
        });
    }

    /// Offers one message to every local member of `room`: the plain frame, or the positioned
    /// one, or into a resuming socket's held frames.
    fn emit(
        &self,
        state: &mut RoomState,
        decoded: &Decoded,
        to_wake: &mut Vec<Arc<Outbox>>,
    ) -> Dispatched {
        let room = &state.name;
        let positioned = (!state.members.is_empty()).then(|| decoded.positioned());
        let limit = self.settings(room.as_str()).replay_limit.get();
        let members = &mut state.members;
        self.registry.dispatch_with(
            room.as_str(),
            decoded.except.map(SocketId::from_wire),
            self.config.overflow_for(room.as_str()),
            to_wake,
            |id| match members.get_mut(&id) {
                None => Some(decoded.frame.clone()),
                Some(Gate::Open { through }) => {
                    if let (Some(t), Some(pos)) = (through.as_ref(), decoded.pos.as_ref()) {
                        if t.epoch() == pos.epoch() && pos.seq() <= t.seq() {
                            return None;
                        }
                        *through = None;
                    }
                    positioned.clone()
                }
                Some(Gate::Held { frames, overflowed }) => {
                    if frames.len() < limit {
                        if let Some(frame) = &positioned {
                            frames.push_back((decoded.pos.clone(), frame.clone()));
                        }
                    } else {
                        *overflowed = decoded.pos.clone().or(overflowed.take());
                    }
                    None
                }
            },
        )
    }

    /// The bus read the gap after `after` (or failed to): deliver it, then what was held.
    pub(crate) fn repaired(&self, room: &RoomName, after: &Position, page: Option<Page>) {
        let mut to_wake = Vec::new();
        let mut total = Dispatched::default();
        {
            let mut rooms = self.lock();
            let Some(state) = rooms.get_mut(room.as_str()) else {
                return; // everyone left meanwhile
            };
            let held = state.repairing.take().unwrap_or_default();
            let limit = self.settings(room.as_str()).replay_limit.get();
            match page.as_ref().map(|p| (p, p.covers(after, limit))) {
                Some((page, Ok(()))) => {
                    for (_, raw) in &page.entries {
                        if let Some(decoded) = self.decode(room, raw) {
                            state.last = decoded.pos.clone();
                            total += self.emit(state, &decoded, &mut to_wake);
                        }
                    }
                    tracing::info!(room = %room, after = %after, messages = page.entries.len(), "repaired a durable room's gap from its history");
                }
                outcome => {
                    let why = outcome.map_or("the history could not be read", |(_, r)| {
                        r.err().map_or("", Unrecoverable::as_str)
                    });
                    tracing::warn!(room = %room, after = %after, reason = why, "a durable room's gap cannot be repaired; members are told");
                    self.registry.tell_missed(room.as_str(), None);
                    // Start over from whatever comes next.
                    state.last = None;
                }
            }
            for decoded in held {
                total += self.sequence(state, decoded, &mut to_wake);
            }
        }
        self.finish_delivery(total, to_wake);
    }

    fn decode(&self, room: &RoomName, raw: &[u8]) -> Option<Decoded> {
        let config = &self.config;
        envelope::decode(
            raw,
            room.as_str(),
            &config.node_id,
            config.max_envelope_bytes.get(),
        )
        .inspect_err(
            |why| tracing::warn!(room = %room, reason = %why, "skipped a malformed history entry"),
        )
        .ok()
    }

    fn finish_delivery(&self, total: Dispatched, to_wake: Vec<Arc<Outbox>>) {
        let c = &self.counters;
        c.delivered.add(total.delivered);
        c.dropped.add(total.dropped);
        c.slow_disconnects.add(total.overflowed);
        for outbox in to_wake {
            outbox.wake();
        }
    }

    /// The subscriber link is back: read back what `rooms` may have missed meanwhile, one read
    /// per room (none when a repair is already in flight, or nothing was delivered yet).
    pub(crate) fn repair_after_link_loss(&self, rooms: &[RoomName]) {
        let mut state = self.lock();
        for room in rooms {
            let Some(room_state) = state.get_mut(room.as_str()) else {
                continue;
            };
            if room_state.repairing.is_some() {
                continue;
            }
            let Some(after) = room_state.last.clone() else {
                continue;
            };
            room_state.repairing = Some(VecDeque::new());
            self.request_repair(room, after);
        }
    }

    /// The dispatcher shed messages of `room` before decoding them: read them back.
    pub(crate) fn repair_shed(&self, room: &str) {
        if let Ok(room) = RoomName::new(room) {
            self.repair_after_link_loss(&[room]);
        }
    }

    /// A history read's result: `page`'s messages (all of them after `since`, when there are,
    /// or none and why not).
    pub(crate) fn history(&self, room: &RoomName, page: Page, since: Option<&Position>) -> History {
        let limit = self.settings(room.as_str()).replay_limit.get();
        let failure = since.and_then(|since| page.covers(since, limit).err());
        let messages = match failure {
            Some(_) => Vec::new(),
            None => page
                .entries
                .iter()
                .filter_map(|(seq, raw)| Some((*seq, self.decode(room, raw)?.into_payload())))
                .collect(),
        };
        History {
            room: room.clone(),
            position: page.top,
            messages,
            failure,
        }
    }

    /// `socket` is about to join `room` with positions: its frames are held from now on until
    /// [`finish_resume`](Durable::finish_resume).
    pub(crate) fn hold(&self, room: &RoomName, socket: SocketId) {
        let mut rooms = self.lock();
        let state = state_of(&mut rooms, room);
        if state.repairing.is_none() && !self.registry.has_members(room.as_str()) {
            // The node is not following the room (or stops now): what it last delivered says
            // nothing about the gap-free sequence of the subscription to come.
            state.last = None;
        }
        state.members.insert(
            socket,
            Gate::Held {
                frames: VecDeque::new(),
                overflowed: None,
            },
        );
    }

    /// Ends `socket`'s resume in `room`: queues the notice, the replay (`page`'s entries
    /// after `since` when they are all there) and the held frames after them, then opens the
    /// socket's gate. Returns what was decided.
    pub(crate) fn finish_resume(
        &self,
        room: &RoomName,
        socket: SocketId,
        outbox: &Outbox,
        since: Option<Position>,
        page: Page,
    ) -> Resumed {
        let limit = self.settings(room.as_str()).replay_limit.get();
        let policy = self.config.overflow_for(room.as_str());
        let mut rooms = self.lock();
        let state = state_of(&mut rooms, room);
        let gate = state.members.remove(&socket);
        let (held, overflowed) = match gate {
            Some(Gate::Held { frames, overflowed }) => (frames, overflowed),
            _ => (VecDeque::new(), None),
        };
        let failure = since.as_ref().and_then(|s| page.covers(s, limit).err());
        let mut resumed = Resumed {
            room: room.clone(),
            position: match (&since, failure) {
                (Some(since), None) => since.clone(),
                _ => page.top.clone(),
            },
            since,
            failure,
            replayed: 0,
        };
        if let Some(dropped) = overflowed {
            // More arrived during the read than the socket may hold: continue after the last.
            resumed.position = dropped;
            resumed.failure = Some(Unrecoverable::TooFarBehind);
            resumed.replayed = 0;
            outbox.offer(Message::Text(resumed.notice().into()), policy);
            let through = Some(resumed.position.clone());
            state.members.insert(socket, Gate::Open { through });
            return resumed;
        }
        let mut frames = vec![Message::Text(resumed.notice().into())];
        let mut last = resumed.position.clone();
        if resumed.since.is_some() && failure.is_none() {
            for (seq, raw) in &page.entries {
                if let Some(decoded) = self.decode(room, raw) {
                    frames.push(decoded.positioned());
                }
                last = last.at(*seq);
                resumed.replayed += 1;
            }
        }
        for (pos, frame) in held {
            let Some(pos) = pos else {
                frames.push(frame); // no position: a seed node's message, in arrival order
                continue;
            };
            if pos.epoch() == last.epoch() && pos.seq() <= last.seq() {
                continue; // replayed, or before the position the socket was told
            }
            last = pos;
            frames.push(frame);
        }
        // Queued under the lock, so that no live frame overtakes them.
        let n = frames.len() as u64;
        for frame in frames {
            outbox.offer(frame, policy);
        }
        let through = Some(last);
        state.members.insert(socket, Gate::Open { through });
        drop(rooms);
        self.counters.delivered.add(n.saturating_sub(1));
        resumed
    }

    /// `socket` left `room` (or failed to join it): forget its gate, and the room once this
    /// node has no member left in it.
    pub(crate) fn forget(&self, room: &RoomName, socket: SocketId) {
        let mut rooms = self.lock();
        if let Some(state) = rooms.get_mut(room.as_str()) {
            state.members.remove(&socket);
            if state.members.is_empty() && !self.registry.has_members(room.as_str()) {
                rooms.remove(room.as_str());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FanoutBuilder;
    use crate::queue::Limits;

    fn setup() -> (Durable, Arc<Registry>) {
        let config = Arc::new(
            FanoutBuilder::new("redis://unused")
                .durable(Durability::default())
                .into_config_for_tests(),
        );
        let registry = Arc::new(Registry::default());
        let durable = Durable::new(config, registry.clone(), Arc::new(Counters::default()));
        (durable, registry)
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Limits {
            frames: 1000,
            bytes: 1 << 20,
        }))
    }

    fn env(epoch: &str, seq: u64) -> Vec<u8> {
        format!(r#"{{"pos":{{"epoch":"{epoch}","seq":{seq}}},"payload":{seq}}}"#).into_bytes()
    }

    fn decoded(epoch: &str, seq: u64) -> Decoded {
        envelope::decode(&env(epoch, seq), "r", "n", 1 << 20).expect("valid")
    }

    #[tokio::test]
    async fn a_gap_is_held_and_repaired_once_then_duplicates_are_dropped() {
        let (durable, registry) = setup();
        let room = RoomName::new("r").expect("valid");
        let plain = outbox();
        registry.insert(&room, SocketId::from_wire(1), plain.clone());
        let mut wake = Vec::new();
        durable.on_live("r", decoded("e", 1), &mut wake);
        durable.on_live("r", decoded("e", 4), &mut wake); // 2 and 3 lost
        durable.on_live("r", decoded("e", 5), &mut wake);
        let mut rx = durable.take_repairs().expect("once");
        let repair = rx.try_recv().expect("one repair");
        assert_eq!(repair.after, Position::new("e", 1));
        assert!(rx.try_recv().is_err(), "one read per gap");
        let page = Page {
            top: Position::new("e", 4),
            entries: (2..=4).map(|s| (s, env("e", s))).collect(),
        };
        durable.repaired(&room, &repair.after, Some(page));
        durable.on_live("r", decoded("e", 5), &mut wake); // a duplicate
        durable.on_live("r", decoded("e", 6), &mut wake);
        assert_eq!(plain.take_texts().await, ["1", "2", "3", "4", "5", "6"]);
        assert!(plain.take_missed().is_none());
    }

    #[tokio::test]
    async fn a_resume_merges_the_replay_with_held_live_frames_by_seq() {
        let (durable, registry) = setup();
        let room = RoomName::new("r").expect("valid");
        let socket = SocketId::from_wire(2);
        let out = outbox();
        let mut wake = Vec::new();
        durable.on_live("r", decoded("e", 3), &mut wake);
        durable.hold(&room, socket);
        registry.insert(&room, socket, out.clone());
        durable.on_live("r", decoded("e", 4), &mut wake); // before the read: replayed too
        durable.on_live("r", decoded("e", 5), &mut wake); // after the read: held only
        let page = Page {
            top: Position::new("e", 4),
            entries: (3..=4).map(|s| (s, env("e", s))).collect(),
        };
        let resumed = durable.finish_resume(&room, socket, &out, Some(Position::new("e", 2)), page);
        assert_eq!(resumed.recovered(), Some(true));
        durable.on_live("r", decoded("e", 6), &mut wake);
        let got = out.take_texts().await;
        assert_eq!(
            got[0],
            r#"{"type":"fanout.resumed","room":"r","recovered":true,"epoch":"e","seq":2}"#
        );
        let seqs: Vec<&str> = got[1..].iter().map(String::as_str).collect();
        assert_eq!(
            seqs,
            [3, 4, 5, 6].map(|s| format!(r#"{{"seq":{s},"payload":{s}}}"#))
        );
    }

    #[test]
    fn pages_say_why_they_cannot_cover_a_position() {
        let page = Page {
            top: Position::new("e", 10),
            entries: (8..=10).map(|s| (s, Vec::new())).collect(),
        };
        assert_eq!(page.covers(&Position::new("e", 7), 5), Ok(()));
        assert_eq!(
            page.covers(&Position::new("x", 7), 5),
            Err(Unrecoverable::EpochChanged)
        );
        assert_eq!(
            page.covers(&Position::new("e", 11), 5),
            Err(Unrecoverable::EpochChanged)
        );
        assert_eq!(
            page.covers(&Position::new("e", 2), 5),
            Err(Unrecoverable::TooFarBehind)
        );
        assert_eq!(
            page.covers(&Position::new("e", 6), 5),
            Err(Unrecoverable::Trimmed)
        );
    }
}
