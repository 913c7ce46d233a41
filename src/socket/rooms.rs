//! The socket's rooms: joining (plain, as a presence member, durable with resume) and leaving.

use tokio::time::Instant;

use crate::durable::Read;
use crate::durable::{Page, Resumed, Start};
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
        if self.outbox.has_room(&room) {
            return Ok(());
        }
        let node = &self.shared.node;
        if !node.bus.is_configured() {
            return Err(Error::no_redis());
        }
        if self.outbox.is_closing() || node.lifecycle.is_shutting_down() {
            return Err(Error::closed());
        }
        let max = node.config.max_rooms_per_socket.get();
        if self.outbox.room_count() >= max {
            return Err(Error::too_many_rooms(max));
        }
        let deadline = Instant::now() + node.config.subscribe_timeout;
        let subscribed = node.registry.insert(&room, self.id, self.outbox.clone());
        self.outbox.add_room(&room);
        if self.outbox.is_closing() {
            // Closed meanwhile: the node may already have taken it out of its rooms.
            self.leave(room.as_str());
            return Err(Error::closed());
        }
        if !subscribed && let Err(e) = node.registry.wait_subscribed(&room, deadline).await {
            self.leave(room.as_str());
            tracing::warn!(room = %room, socket = %self.id, error = %e, "join failed");
            return Err(e);
        }
        tracing::debug!(room = %room, socket = %self.id, "joined");
        Ok(())
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
        crate::presence::check(&self.shared.node.bus, &room)?;
        self.join(&room).await?;
        let node = &self.shared.node;
        let deadline = Instant::now() + node.config.subscribe_timeout;
        let generation = node.presence.add(&room, self.id, member);
        // Boxed, like the history read below: a socket's task keeps the size of its largest
        // await for its whole life, and most of that life is spent idle in `recv`.
        let counted =
            Box::pin(
                node.presence
                    .wait_synced(&room, member.user(), generation, deadline),
            );
        if let Err(e) = counted.await {
            self.leave(room.as_str());
            tracing::warn!(room = %room, socket = %self.id, error = %e, "join as a member failed");
            return Err(e);
        }
        Ok(())
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
        let shared = self.shared.clone();
        let node = &shared.node;
        let Some(settings) = node.config.durable_for(room.as_str()).copied() else {
            return Err(Error::not_durable(room.as_str()));
        };
        self.leave(room.as_str());
        // Held before joining, so that every message after the subscription is either
        // replayed or held (see the `durable` module).
        node.durable.hold(&room, self.id);
        if let Err(e) = self.join(room.as_str()).await {
            node.durable.forget(&room, self.id);
            return Err(e);
        }
        let limit = settings.replay_limit.get();
        let (read, since, fallback) = match start {
            Start::Now => (Read::Top, None, None),
            Start::After(since) => (Read::After(since.clone(), limit), Some(since), None),
            Start::Last(n) => (Read::Last(n.min(limit)), None, None),
            Start::AfterOrLast(since, n) => (
                Read::After(since.clone(), limit),
                Some(since),
                Some(n.min(limit)),
            ),
        };
        let last = matches!(read, Read::Last(_));
        // Boxed: the read's futures (a script call under a deadline) are large, and a socket's
        // task would keep their size for its whole life.
        let read = Box::pin(async {
            let page = node.durable.read(&node.bus, &room, &settings, read).await?;
            let refused = since.as_ref().and_then(|s| page.covers(s, limit).err());
            match (refused, fallback) {
                (Some(why), Some(n)) => {
                    let page = node
                        .durable
                        .read(&node.bus, &room, &settings, Read::Last(n));
                    let page = page.await?;
                    Ok((Some(before(&page)), page, Some(why)))
                }
                _ if last => Ok((Some(before(&page)), page, None)),
                _ => Ok((since, page, None)),
            }
        });
        match read.await {
            Ok((since, page, refused)) => {
                Ok(node
                    .durable
                    .finish_resume(&room, self.id, &self.outbox, since, page, refused))
            }
            Err(e) => {
                self.leave(room.as_str());
                Err(e)
            }
        }
    }

    /// Leaves `room`. Returns whether the socket was in it.
    pub fn leave(&mut self, room: &str) -> bool {
        let Some(room) = self.outbox.remove_room(room) else {
            return false;
        };
        quit(&self.shared, self.id, &room);
        tracing::debug!(room = %room, socket = %self.id, "left");
        true
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
        quit_all(&self.shared, self.id, &self.outbox, "connection closed");
    }
}

/// Takes the socket out of every room it is in: its connection closed, or it was dropped.
pub(super) fn quit_all(shared: &Shared, id: SocketId, outbox: &Outbox, why: &str) {
    for room in outbox.take_rooms() {
        quit(shared, id, &room);
        tracing::debug!(room = %room, socket = %id, "left ({why})");
    }
}

/// Takes the socket out of `room` on this node: its membership (if it joined as a member),
/// its registry entry (the last local socket unsubscribes the node) and its durable resume
/// state. One home for [`leave`](FanoutSocket::leave), for a closed connection and for
/// dropping the socket.
fn quit(shared: &Shared, id: SocketId, room: &RoomName) {
    let node = &shared.node;
    if node.config.has_presence(room.as_str()) {
        node.presence.remove(room, id);
    }
    node.registry.remove(room, id);
    if node.durable.is_durable(room.as_str()) {
        node.durable.forget(room, id);
    }
}

/// The position just before a page's first message (its top when it has none): where a
/// replay of the whole page starts.
fn before(page: &Page) -> Position {
    let first = page
        .entries
        .first()
        .map_or(page.top.seq(), |(seq, _)| seq.saturating_sub(1));
    page.top.at(first)
}
