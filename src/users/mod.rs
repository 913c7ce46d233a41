//! Users across the fleet: reach every socket of a user wherever it is connected, close them,
//! move them into or out of rooms, and close a socket whose credentials expire.
//!
//! # How it works
//!
//! A socket that [`identify`](crate::FanoutSocket::identify)s as user `U` joins the node's own
//! room for `U`, on the channel `__axum_fanout:user:<prefix>U`: the same registry, lazy
//! subscription, reconnect, resubscription, probe and loss notices as any room, and nothing on a
//! node that holds no socket of `U`. [`RoomHandle::send_to_user`](crate::RoomHandle::send_to_user)
//! publishes one envelope there; a fleet command (disconnect, join, leave) is one envelope too,
//! with a `command` object instead of a payload, which each node that holds sockets of `U`
//! applies to them (`command`). Each call answers with the number of nodes that held a socket
//! of `U` when Redis ran it: what PUBLISH counts.
//!
//! # Guarantees
//!
//! - A direct message reaches every socket of the user once, in the order its sender sent;
//!   a node whose link was down is not counted, and its sockets are told a
//!   [`Missed`](crate::Missed) window whose [`user`](crate::Missed::user) is theirs.
//! - A command is applied at most once per node, and is idempotent: a retry after a timeout
//!   (an unknown outcome, as for a broadcast) cannot apply it twice.
//! - A socket closed by a command gets the code and reason the caller chose
//!   ([`close::DISCONNECTED`](crate::close::DISCONNECTED) by default: do not reconnect).
//! - An expiring socket is closed with [`close::CREDENTIALS_EXPIRED`](crate::close::CREDENTIALS_EXPIRED)
//!   at its instant plus a jitter of at most 1 s, unless it was refreshed first.
//!
//! # Layout
//!
//! - `command`: the commands on the wire, [`FleetSocketId`];
//! - `expiry`: the node's expiring sockets and the task that closes them (a fanout-protocol
//!   socket is told why first);
//! - `send`: the public calls ([`Disconnect`], [`UserCommand`]) and their publishing;
//! - `redis`: the directory in Redis: where each user is connected ([`Connected`]) and the
//!   fleet's nodes ([`NodeInfo`]), written by each node, read by any;
//! - here: the node's half, which applies the commands the dispatcher hands it.

mod command;
mod expiry;
mod redis;
mod send;

pub use command::{FleetSocketId, InvalidFleetSocketId};
pub use redis::{Connected, NodeInfo};
pub(crate) use redis::{connected, fleet};
pub(crate) use send::send_to_user;
pub use send::{Disconnect, UserCommand};

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Utf8Bytes};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::dispatch::Commands;
use crate::error::Error;
use crate::membership::Rooms;
use crate::presence::Member;
use crate::queue::Outbox;
use crate::registry::{Members, SocketId};
use crate::room::{RoomName, user_of};
use command::Command;
use expiry::{Deadline, Expiries, MAX_JITTER};

/// A socket to move into or out of a room, for the task that does it (a join waits for Redis;
/// the dispatcher never waits).
#[derive(Debug)]
struct Move {
    join: bool,
    room: RoomName,
    user: String,
    socket: SocketId,
    outbox: Arc<Outbox>,
}

/// The node's half of the users feature.
#[derive(Debug)]
pub(crate) struct Users {
    node_id: String,
    expiries: Arc<Expiries>,
    moves: mpsc::UnboundedSender<Move>,
    /// The receiving end, until `start` hands it to its task.
    unstarted: Mutex<Option<mpsc::UnboundedReceiver<Move>>>,
}

impl Users {
    pub(crate) fn new(node_id: &str) -> Self {
        let (moves, rx) = mpsc::unbounded_channel();
        Self {
            node_id: node_id.to_owned(),
            expiries: Arc::default(),
            moves,
            unstarted: Mutex::new(Some(rx)),
        }
    }

    /// Closes the socket with 4001 `"credentials expired"` `after` from now, plus a jitter of
    /// at most a tenth of it and at most [`MAX_JITTER`]; replaces an earlier expiry.
    pub(crate) fn expire_in(
        &self,
        socket: SocketId,
        outbox: &Arc<Outbox>,
        after: Duration,
    ) -> Result<(), Error> {
        if after.is_zero() {
            return Err(Error::invalid_argument(
                "an expiry must be in the future (a duration above zero)",
            ));
        }
        if outbox.is_closing() {
            return Err(Error::closed());
        }
        let jitter_max = (after / 10).min(MAX_JITTER);
        let jitter = jitter_max.mul_f64(unit_random());
        let at = Instant::now() + after + jitter;
        self.expiries.set(socket, outbox, at, Deadline::Credentials);
        Ok(())
    }

    /// Closes the socket with 1008 `"credentials not sent in time"` `within` from now, unless
    /// an expiry ([`expire_in`](Users::expire_in), [`expire_never`](Users::expire_never))
    /// replaces this first: a protocol socket has that long to `connect`.
    pub(crate) fn expect_credentials(
        &self,
        socket: SocketId,
        outbox: &Arc<Outbox>,
        within: Duration,
    ) {
        let at = Instant::now() + within;
        self.expiries.set(socket, outbox, at, Deadline::Connect);
    }

    /// The socket's credentials no longer expire (nor does it wait for them any more).
    pub(crate) fn expire_never(&self, socket: SocketId) {
        self.expiries.forget(socket);
    }

    /// When the socket's credentials expire, if they do.
    pub(crate) fn expires_at(&self, socket: SocketId) -> Option<Instant> {
        self.expiries.get(socket, Deadline::Credentials)
    }

    /// The socket closed: nothing of it is kept.
    pub(crate) fn forget(&self, socket: SocketId) {
        self.expiries.forget(socket);
    }
}

/// A uniform number in `[0, 1)`.
fn unit_random() -> f64 {
    (crate::random::u64() >> 11) as f64 / (1u64 << 53) as f64
}

impl Commands for Users {
    fn apply(&self, room: &RoomName, command: &str, members: Members) {
        let command: Command = match serde_json::from_str(command) {
            Ok(command) => command,
            Err(e) => {
                tracing::warn!(room = %room, error = %e, "dropped a fleet command this node does not understand");
                return;
            }
        };
        let target = command.target().cloned();
        let addressed = members
            .into_iter()
            .filter(|(socket, _)| target.as_ref().is_none_or(|t| t.is(&self.node_id, *socket)));
        match command {
            Command::Disconnect { code, reason, .. } => {
                // Built once for every socket addressed: the close frame, and what a
                // fanout-protocol socket is told first (why, and whether to come back).
                let reason = Utf8Bytes::from(reason);
                let reconnect = code == crate::close::RECONNECT;
                let told = crate::envelope::disconnect_frame(code, reason.as_str(), reconnect);
                let told = told.into_frame();
                let mut closed = 0;
                for (_, outbox) in addressed {
                    if outbox.is_framed() {
                        outbox.offer(told.clone(), crate::config::OverflowPolicy::DropNewest);
                    }
                    outbox.close_after_flush(Some(CloseFrame {
                        code,
                        reason: reason.clone(),
                    }));
                    closed += 1;
                }
                tracing::info!(room = %room, code, closed, "disconnected by a fleet command");
            }
            Command::Join { room: to, .. } => self.move_sockets(room, true, &to, addressed),
            Command::Leave { room: to, .. } => self.move_sockets(room, false, &to, addressed),
        }
    }
}

impl Users {
    /// Hands the addressed sockets of a user's room to the mover task.
    fn move_sockets(
        &self,
        room: &RoomName,
        join: bool,
        to: &str,
        addressed: impl Iterator<Item = (SocketId, Arc<Outbox>)>,
    ) {
        let (Some(user), Ok(to)) = (user_of(room.as_str()), RoomName::new(to)) else {
            tracing::warn!(room = %room, "dropped a join or leave not addressed to a user's sockets");
            return;
        };
        for (socket, outbox) in addressed {
            // The task is gone only when the node stops, and then nothing is to move.
            let _ = self.moves.send(Move {
                join,
                room: to.clone(),
                user: user.to_owned(),
                socket,
                outbox,
            });
        }
    }
}

/// Starts the users' tasks: the expiry timer and the mover of sockets; both end with `stop`.
pub(crate) fn start(
    users: &Users,
    rooms: Rooms,
    runtime: &tokio::runtime::Handle,
    stop: &watch::Sender<()>,
) {
    runtime.spawn(expiry::run(users.expiries.clone(), stop.subscribe()));
    if rooms.bus.is_configured() {
        runtime.spawn(redis::run(
            rooms.bus.clone(),
            rooms.registry.clone(),
            rooms.lifecycle.clone(),
            stop.subscribe(),
        ));
    }
    let unstarted = users
        .unstarted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(moves) = unstarted {
        runtime.spawn(mover(moves, rooms, stop.subscribe()));
    }
}

/// Applies each move in a task of its own: joins wait for Redis, and one slow room must not
/// hold the others back.
async fn mover(
    mut moves: mpsc::UnboundedReceiver<Move>,
    rooms: Rooms,
    mut stop: watch::Receiver<()>,
) {
    loop {
        let m = tokio::select! {
            m = moves.recv() => match m { Some(m) => m, None => return },
            _ = stop.changed() => return,
        };
        if !m.join {
            rooms.leave(m.socket, &m.outbox, m.room.as_str());
            continue;
        }
        let rooms = rooms.clone();
        tokio::spawn(async move {
            if let Err(e) = join_as_itself(&rooms, &m).await {
                tracing::warn!(room = %m.room, socket = %m.socket, error = %e, "a fleet join failed");
            }
        });
    }
}

/// Joins as the socket would have joined itself: durable rooms with their position notice,
/// presence rooms as its user, plain rooms plainly.
async fn join_as_itself(rooms: &Rooms, m: &Move) -> Result<(), Error> {
    if m.outbox.has_room(&m.room) {
        return Ok(());
    }
    if rooms.config.durable_for(m.room.as_str()).is_some() {
        rooms
            .join_durable(m.socket, &m.outbox, &m.room, crate::durable::Start::Now)
            .await
            .map(drop)
    } else if rooms.config.has_presence(m.room.as_str()) {
        let member = Member::new(m.user.as_str())?;
        rooms.join_as(m.socket, &m.outbox, &m.room, &member).await
    } else {
        rooms.join(m.socket, &m.outbox, &m.room).await
    }
}
