//! The socket's rooms: joining (plain, as a presence member, durable with resume) and leaving.

use crate::durable::{Resumed, Start};
use crate::error::Error;
use crate::node::Shared;
use crate::position::Position;
use crate::presence::Member;
use crate::queue::Outbox;
use crate::registry::SocketId;
use crate::room::RoomName;

use super::FanoutSocket;

impl FanoutSocket {
    /// Joins `room`. Returns once this node receives the room's messages: when the socket is
    /// the node's first in the room, after Redis confirmed the SUBSCRIBE. A message broadcast
    /// after `join` returns reaches this socket.
    ///
    /// Joining a room twice is a no-op. Fails with [`Error::is_invalid_room`] for an invalid
    /// name (nothing is joined) and [`Error::is_timeout`] when Redis does not confirm within the
    /// subscribe timeout (the socket is not left in the room).
    ///
    /// # Cancel safety
    /// If the future is dropped before it completes the socket may or may not be in the room;
    /// [`rooms`](FanoutSocket::rooms) tells, and dropping the socket leaves it either way.
    pub async fn join(&mut self, room: impl AsRef<str>) -> Result<(), Error> {
        let room = RoomName::new(room)?;
        self.shared
            .node
            .rooms
            .join(self.id, &self.outbox, &room)
            .await
    }

    /// Joins `room` as `member`, in a room with presence (see the README's "Presence"): like
    /// [`join`](FanoutSocket::join), and the socket counts as one connection of
    /// `member.user()` in the room's member list, on every node. When it is the user's first
    /// connection in the fleet, every socket of the room (this one included) receives
    /// `{"type":"fanout.join","room":..,"user":..,"version":..}`; when the user's last
    /// connection leaves the room, closes or its node dies, a `fanout.leave`.
    ///
    /// Returns once Redis counted the connection: a [`RoomHandle::presence`](crate::RoomHandle::presence)
    /// made afterwards, on any node, lists the user, and anything this socket broadcasts
    /// afterwards reaches every socket after the join event. Joining a room the socket is
    /// already in as a member is a no-op.
    ///
    /// Fails like `join`, and with [`Error::is_presence_off`] for a room without presence or
    /// [`Error::is_timeout`] when Redis does not count the connection in time (the socket is
    /// then not left in the room).
    ///
    /// ```no_run
    /// use axum::extract::ws::Message;
    /// use axum_fanout::FanoutSocket;
    /// use axum_fanout::presence::Member;
    ///
    /// async fn chat(mut socket: FanoutSocket, user: String) {
    ///     let Ok(member) = Member::new(user) else { return socket.close(1008, "bad user") };
    ///     if socket.join_as("lobby", &member).await.is_err() {
    ///         return socket.close(1011, "try again later");
    ///     }
    ///     while let Some(Ok(Message::Text(_))) = socket.recv().await {}
    ///     // Dropping the socket leaves: the others get a leave if it was the user's last.
    /// }
    /// ```
    ///
    /// # Cancel safety
    /// As for `join`: the socket may or may not be in the room and counted; dropping the socket
    /// undoes both either way.
    pub async fn join_as(&mut self, room: impl AsRef<str>, member: &Member) -> Result<(), Error> {
        let room = RoomName::new(room)?;
        self.shared
            .node
            .rooms
            .join_as(self.id, &self.outbox, &room, member)
            .await
    }

    /// Joins durable `room` with positions, resuming after `since` when given.
    ///
    /// This socket's deliveries of the room become `{"seq":S,"payload":V}` text frames
    /// (`"text"` or `"binary"` in place of `"payload"` for such payloads; no `"seq"` for a
    /// message without a position, from a seed node or `redis-cli`). The first frame of the
    /// room is [`Resumed::notice`]: `fanout.position` without `since`; `fanout.resumed` with
    /// it, followed, when recovered, by every message after `since` in order, each once; then
    /// live messages, with no gap and no duplicate at the hand-off (live messages that arrive
    /// while the history is read are held, at most the replay limit, and merged by seq). When
    /// the messages after `since` cannot be replayed (its epoch is gone, they were trimmed, or
    /// they are more than the replay limit), nothing is replayed and live messages follow from
    /// the room's current position ([`Resumed::failure`] says why).
    ///
    /// A socket already in the room leaves it first. Fails with [`Error::is_not_durable`] for
    /// a plain room, and otherwise like [`join`](FanoutSocket::join), or with
    /// [`Error::is_redis`] / [`Error::is_timeout`] when the history cannot be read (the
    /// socket is then not in the room).
    ///
    /// ```no_run
    /// use axum_fanout::FanoutSocket;
    /// use axum_fanout::durable::Position;
    ///
    /// async fn serve(mut socket: FanoutSocket, since: Option<Position>) {
    ///     match socket.join_durable("lobby", since).await {
    ///         Ok(resumed) => tracing::info!(replayed = resumed.replayed(), "joined at {}", resumed.position()),
    ///         Err(e) => return socket.close(1011, &e.to_string()),
    ///     }
    ///     while let Some(Ok(_)) = socket.recv().await {}
    /// }
    /// ```
    ///
    /// # Cancel safety
    /// Like [`join`](FanoutSocket::join): dropping the future may leave the socket in the
    /// room with its frames held; leave the room (or drop the socket).
    pub async fn join_durable(
        &mut self,
        room: impl AsRef<str>,
        since: Option<Position>,
    ) -> Result<Resumed, Error> {
        let start = match since {
            Some(since) => Start::After(since),
            None => Start::Now,
        };
        self.join_durable_from(room, start).await
    }

    /// Joins durable `room` from `start`: live messages from now, after a position, the
    /// room's last N messages, or after a position falling back to the last N when that
    /// resume is refused, each with the gap-free hand-off of
    /// [`join_durable`](FanoutSocket::join_durable), whose frames and failures these are too.
    /// A replay of the last N is announced like a resume: `fanout.resumed` with the position
    /// before the first replayed message.
    ///
    /// ```no_run
    /// use axum_fanout::FanoutSocket;
    /// use axum_fanout::durable::{Position, Start};
    ///
    /// // A live board: the last 20 updates, or everything missed since `seen` when it can.
    /// async fn board(mut socket: FanoutSocket, seen: Option<Position>) {
    ///     let start = match seen {
    ///         Some(seen) => Start::AfterOrLast(seen, 20),
    ///         None => Start::Last(20),
    ///     };
    ///     if let Err(e) = socket.join_durable_from("board", start).await {
    ///         return socket.close(1011, &e.to_string());
    ///     }
    ///     while let Some(Ok(_)) = socket.recv().await {}
    /// }
    /// ```
    ///
    /// # Cancel safety
    /// As [`join_durable`](FanoutSocket::join_durable).
    pub async fn join_durable_from(
        &mut self,
        room: impl AsRef<str>,
        start: Start,
    ) -> Result<Resumed, Error> {
        let room = RoomName::new(room)?;
        self.shared
            .node
            .rooms
            .join_durable(self.id, &self.outbox, &room, start)
            .await
    }

    /// Leaves `room`. Returns whether the socket was in it.
    pub fn leave(&mut self, room: &str) -> bool {
        // A user's own room is left with the socket, never by name.
        if crate::room::user_of(room).is_some() {
            return false;
        }
        self.shared.node.rooms.leave(self.id, &self.outbox, room)
    }

    /// The rooms this socket is in. A socket whose connection closed is in none: the node
    /// takes it out of its rooms at once, whatever its handler is doing.
    pub fn rooms(&self) -> Vec<RoomName> {
        self.outbox.rooms()
    }
}

/// Takes the socket out of every room it is in when dropped: held by the socket's writer task,
/// which ends with the connection.
#[derive(Debug)]
pub(super) struct LeaveOnClose {
    pub(super) shared: std::sync::Arc<Shared>,
    pub(super) id: SocketId,
    pub(super) outbox: std::sync::Arc<Outbox>,
}

impl Drop for LeaveOnClose {
    fn drop(&mut self) {
        let node = &self.shared.node;
        node.rooms
            .quit_all(self.id, &self.outbox, "connection closed");
        node.users.forget(self.id);
    }
}
