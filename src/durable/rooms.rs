//! The state of this node's durable rooms, under one lock: per room, the last position
//! delivered and the gate of each member that asked for positions.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Message;
use tokio::sync::mpsc;

use crate::config::{Config, Durability};
use crate::envelope::{self, Decoded};
use crate::position::Position;
use crate::registry::{Registry, SocketId};
use crate::room::RoomName;
use crate::stats::Counters;

/// A gap for the bus to read back: every message of `room` after `after`.
#[derive(Debug)]
pub(crate) struct Repair {
    pub(crate) room: RoomName,
    pub(crate) after: Position,
}

/// One socket that asked for positions in a durable room.
#[derive(Debug)]
pub(super) enum Gate {
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
pub(super) struct RoomState {
    pub(super) name: RoomName,
    /// The last position delivered to this node's members of the room.
    pub(super) last: Option<Position>,
    /// While nothing was delivered live (`last` is `None`): the furthest position a socket
    /// that joined with positions was brought to. Only for finding gaps (a live seq that skips
    /// past it, a lost link): unlike `last`, nothing at or before it is dropped, since a
    /// member without positions may still be waiting for it.
    pub(super) told: Option<Position>,
    /// Members that asked for positions (the others get plain frames and are not here).
    pub(super) members: HashMap<SocketId, Gate>,
    /// A repair is in flight: the live messages that arrived since, in order (bounded by the
    /// replay limit; what did not fit is read back from history after the repair).
    pub(super) repairing: Option<VecDeque<Decoded>>,
}

impl RoomState {
    /// `pos` was delivered live (or from a repair) to the room's members.
    pub(super) fn delivered(&mut self, pos: Position) {
        self.last = Some(pos);
        self.told = None;
    }

    /// Where the node stands in the room: what it delivered, else what a joining socket was
    /// told. Gaps are read back after it.
    pub(super) fn known(&self) -> Option<&Position> {
        self.last.as_ref().or(self.told.as_ref())
    }

    pub(super) fn new(name: RoomName) -> Self {
        Self {
            name,
            last: None,
            told: None,
            members: HashMap::new(),
            repairing: None,
        }
    }
}

pub(super) fn state_of<'a>(
    rooms: &'a mut HashMap<RoomName, RoomState>,
    room: &RoomName,
) -> &'a mut RoomState {
    rooms
        .entry(room.clone())
        .or_insert_with(|| RoomState::new(room.clone()))
}

/// Durable rooms on this node (see the `durable` module docs).
#[derive(Debug)]
pub(crate) struct Durable {
    pub(super) config: Arc<Config>,
    pub(super) registry: Arc<Registry>,
    pub(super) counters: Arc<Counters>,
    /// Every durable room's sequencing state. Lock order: the outermost of the node's locks;
    /// the registry's and sockets' are taken under it, to deliver in seq order.
    pub(super) rooms: Mutex<HashMap<RoomName, RoomState>>,
    /// Gaps for the bus to read. At most one per room is outstanding, so the queue holds at
    /// most one request per durable room of this node.
    pub(super) repairs: mpsc::UnboundedSender<Repair>,
    pub(super) repairs_rx: Mutex<Option<mpsc::UnboundedReceiver<Repair>>>,
    /// Turns for history reads ([`READS`](super::redis::READS) at once).
    pub(super) reads: tokio::sync::Semaphore,
    /// Reads waiting for a turn, which resumes of the same room and place join.
    pub(super) open_reads: Mutex<super::redis::OpenReads>,
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
            reads: tokio::sync::Semaphore::new(super::redis::READS),
            open_reads: Mutex::default(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<RoomName, RoomState>> {
        // Every critical section leaves the map consistent at each step.
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The repair requests, for the repair task (once).
    pub(crate) fn take_repairs(&self) -> Option<mpsc::UnboundedReceiver<Repair>> {
        self.repairs_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    pub(super) fn settings(&self, room: &str) -> Durability {
        self.config.durable_for(room).copied().unwrap_or_default()
    }

    /// Whether `room` is durable on this node.
    pub(crate) fn is_durable(&self, room: &str) -> bool {
        self.config.durable_for(room).is_some()
    }

    pub(super) fn decode(&self, room: &RoomName, raw: &[u8]) -> Option<Decoded> {
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
pub(super) mod testing {
    //! What the durable rooms' unit tests share.

    use super::*;
    use crate::config::FanoutBuilder;
    use crate::durable::Page;
    use crate::queue::{Limits, Outbox};

    pub(in crate::durable) fn setup() -> (Durable, Arc<Registry>) {
        let config = Arc::new(
            FanoutBuilder::new("redis://unused")
                .durable(Durability::default())
                .into_config_for_tests(),
        );
        let registry = Arc::new(Registry::default());
        let durable = Durable::new(config, registry.clone(), Arc::new(Counters::default()));
        (durable, registry)
    }

    pub(in crate::durable) fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(Limits {
            frames: 1000,
            bytes: 1 << 20,
        }))
    }

    pub(in crate::durable) fn env(epoch: &str, seq: u64) -> Vec<u8> {
        format!(r#"{{"pos":{{"epoch":"{epoch}","seq":{seq}}},"payload":{seq}}}"#).into_bytes()
    }

    /// A history page at `epoch:top` holding the messages `seqs`.
    pub(in crate::durable) fn page(
        epoch: &str,
        top: u64,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Page {
        Page {
            top: Position::new(epoch, top),
            entries: seqs.into_iter().map(|s| (s, env(epoch, s))).collect(),
        }
    }

    pub(in crate::durable) fn decoded(epoch: &str, seq: u64) -> Decoded {
        envelope::decode(&env(epoch, seq), "r", "n", 1 << 20).expect("valid")
    }
}
