//! One home for a socket's joining and leaving of rooms (plain, as a presence member, durable
//! with resume), whoever asks: the socket's own handler (`FanoutSocket::join` and the rest)
//! or a fleet command that moves a user's sockets (`crate::users`). A socket is its id and its
//! [`Outbox`], which holds the rooms it is in; nothing here needs its handler.

use std::sync::Arc;

use tokio::time::Instant;

use crate::bus::Bus;
use crate::config::Config;
use crate::durable::{Durable, Page, Read, Resumed, Start};
use crate::error::Error;
use crate::lifecycle::Lifecycle;
use crate::position::Position;
use crate::presence::{self, Member};
use crate::queue::Outbox;
use crate::registry::{Registry, SocketId};
use crate::room::RoomName;

/// The parts of a node that membership changes touch. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Rooms {
    pub(crate) config: Arc<Config>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) bus: Arc<Bus>,
    pub(crate) presence: Arc<presence::Table>,
    pub(crate) durable: Arc<Durable>,
}

impl Rooms {
    /// Joins `room` (see `FanoutSocket::join`): registered here, then resolved once Redis
    /// confirmed the room's SUBSCRIBE.
    pub(crate) async fn join(
        &self,
        id: SocketId,
        outbox: &Arc<Outbox>,
        room: &RoomName,
    ) -> Result<(), Error> {
        if outbox.has_room(room) {
            return Ok(());
        }
        if !self.bus.is_configured() {
            return Err(Error::no_redis());
        }
        if outbox.is_closing() || self.lifecycle.is_shutting_down() {
            return Err(Error::closed());
        }
        let max = self.config.max_rooms_per_socket.get();
        // A user's own room (`crate::users`) is the node's, not the application's: not counted.
        if !room.is_user() && outbox.room_count() >= max {
            return Err(Error::too_many_rooms(max));
        }
        let deadline = Instant::now() + self.config.subscribe_timeout;
        let subscribed = self.registry.insert(room, id, outbox.clone());
        outbox.add_room(room);
        if outbox.is_closing() {
            // Closed meanwhile: the node may already have taken it out of its rooms.
            self.leave(id, outbox, room.as_str());
            return Err(Error::closed());
        }
        if !subscribed && let Err(e) = self.registry.wait_subscribed(room, deadline).await {
            self.leave(id, outbox, room.as_str());
            tracing::warn!(room = %room, socket = %id, error = %e, "join failed");
            return Err(e);
        }
        tracing::debug!(room = %room, socket = %id, "joined");
        Ok(())
    }

    /// Joins `room` as `member` (see `FanoutSocket::join_as`): resolved once Redis counted the
    /// connection.
    pub(crate) async fn join_as(
        &self,
        id: SocketId,
        outbox: &Arc<Outbox>,
        room: &RoomName,
        member: &Member,
    ) -> Result<(), Error> {
        presence::check(&self.bus, room)?;
        self.join(id, outbox, room).await?;
        let deadline = Instant::now() + self.config.subscribe_timeout;
        let generation = self.presence.add(room, id, member);
        if !outbox.has_room(room) {
            // The connection closed meanwhile and the node took the socket out of its rooms
            // (`quit_all`) before this add: take it out of the member list too, or the user
            // would stay counted for a socket that is gone.
            self.presence.remove(room, id);
            return Err(Error::closed());
        }
        // Boxed, like the history read below: a socket's task keeps the size of its largest
        // await for its whole life, and most of that life is spent idle in `recv`.
        let counted =
            Box::pin(
                self.presence
                    .wait_synced(room, member.user(), generation, deadline),
            );
        if let Err(e) = counted.await {
            self.leave(id, outbox, room.as_str());
            tracing::warn!(room = %room, socket = %id, error = %e, "join as a member failed");
            return Err(e);
        }
        Ok(())
    }

    /// Joins durable `room` with positions from `start` (see `FanoutSocket::join_durable` and
    /// `FanoutSocket::join_durable_from`).
    pub(crate) async fn join_durable(
        &self,
        id: SocketId,
        outbox: &Arc<Outbox>,
        room: &RoomName,
        start: Start,
    ) -> Result<Resumed, Error> {
        let Some(settings) = self.config.durable_for(room.as_str()).copied() else {
            return Err(Error::not_durable(room.as_str()));
        };
        self.leave(id, outbox, room.as_str());
        // Held before joining, so that every message after the subscription is either
        // replayed or held (see the `durable` module).
        self.durable.hold(room, id);
        if let Err(e) = self.join(id, outbox, room).await {
            self.durable.forget(room, id);
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
            let page = self.durable.read(&self.bus, room, &settings, read).await?;
            let refused = since.as_ref().and_then(|s| page.covers(s, limit).err());
            match (refused, fallback) {
                (Some(why), Some(n)) => {
                    let page = self.durable.read(&self.bus, room, &settings, Read::Last(n));
                    let page = page.await?;
                    Ok((Some(before(&page)), page, Some(why)))
                }
                _ if last => Ok((Some(before(&page)), page, None)),
                _ => Ok((since, page, None)),
            }
        });
        match read.await {
            Ok((since, page, refused)) => {
                let resumed = (self.durable).finish_resume(room, id, outbox, since, page, refused);
                if !outbox.has_room(room) {
                    // Closed meanwhile (see `join_as`): forget the socket's resume state.
                    self.durable.forget(room, id);
                }
                Ok(resumed)
            }
            Err(e) => {
                self.leave(id, outbox, room.as_str());
                Err(e)
            }
        }
    }

    /// Leaves `room`. Returns whether the socket was in it.
    pub(crate) fn leave(&self, id: SocketId, outbox: &Outbox, room: &str) -> bool {
        let Some(room) = outbox.remove_room(room) else {
            return false;
        };
        self.quit(id, &room);
        tracing::debug!(room = %room, socket = %id, "left");
        true
    }

    /// Takes the socket out of every room it is in: its connection closed, or it was dropped.
    pub(crate) fn quit_all(&self, id: SocketId, outbox: &Outbox, why: &str) {
        for room in outbox.take_rooms() {
            self.quit(id, &room);
            tracing::debug!(room = %room, socket = %id, "left ({why})");
        }
    }

    /// Takes the socket out of `room` on this node: its membership (if it joined as a member),
    /// its registry entry (the last local socket unsubscribes the node) and its durable resume
    /// state. One home for a leave, a closed connection and a dropped socket.
    fn quit(&self, id: SocketId, room: &RoomName) {
        if self.config.has_presence(room.as_str()) {
            self.presence.remove(room, id);
        }
        self.registry.remove(room, id);
        if self.durable.is_durable(room.as_str()) {
            self.durable.forget(room, id);
        }
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
