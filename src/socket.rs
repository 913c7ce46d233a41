//! A WebSocket attached to the node: its room memberships and its reading half. The writing
//! half is a task of its own (`writer`), fed through the socket's bounded queue.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::broadcast::Broadcast;
use crate::bus::Read;
use crate::durable::Resumed;
use crate::envelope::Payload;
use crate::error::Error;
use crate::missed::Missed;
use crate::node::Shared;
use crate::position::Position;
use crate::presence::Member;
use crate::queue::{Limits, Notice, Offer, Outbox};
use crate::registry::SocketId;
use crate::room::RoomName;
use crate::writer::{going_away, write_loop};

/// What [`FanoutSocket::recv_event`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A text or binary message from the client.
    Message(Message),
    /// Messages of a room may not have reached this socket (see *Lagging* on
    /// [`FanoutSocket::recv_event`]).
    Missed(Missed),
    /// A broadcast this socket [queued](crate::Broadcast::queue) failed after its receipt was
    /// dropped: it did not reach `room`.
    #[non_exhaustive]
    BroadcastFailed {
        /// The room it was for.
        room: RoomName,
        /// Why it failed ([`Error::is_timeout`], [`Error::is_redis`], ...).
        error: Error,
    },
}

/// A WebSocket attached to a fan-out node, from [`RoomHandle::on_upgrade`](crate::RoomHandle::on_upgrade) or
/// [`RoomHandle::attach`](crate::RoomHandle::attach).
///
/// The socket's writing half belongs to a writer task that drains a bounded queue: frames from
/// the rooms the socket joined, and frames you [`send`](FanoutSocket::send) it directly. Read the
/// client's messages with [`recv`](FanoutSocket::recv).
///
/// ## Closing
/// Dropping the socket leaves every room (the last local socket of a room unsubscribes the
/// node from it), writes what is still queued and closes with 1000. [`close`](FanoutSocket::close)
/// chooses the code. A socket that cannot keep up is closed by the node with 1013
/// `"slow consumer"`; then [`recv`](FanoutSocket::recv) returns `None`.
#[derive(Debug)]
pub struct FanoutSocket {
    id: SocketId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    rooms: Vec<RoomName>,
    stream: SplitStream<WebSocket>,
    bucket: TokenBucket,
    /// Slots for this socket's broadcasts in flight (`broadcasts_in_flight`), made on its
    /// first broadcast: most sockets of a big fleet only listen, and idle memory counts.
    in_flight: OnceLock<Arc<Semaphore>>,
}

/// The per-socket message rate limit: refills at `rate` tokens per second up to `burst`.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes a token; `false` when the bucket is empty.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Close reason for a client over the message rate limit (with 1008, [`close_code::POLICY`]).
const RATE_LIMIT_REASON: &str = "rate limit exceeded";

impl FanoutSocket {
    pub(crate) fn attach(shared: Arc<Shared>, socket: WebSocket) -> Self {
        let node = &shared.node;
        let cfg = &node.config;
        let outbox = Arc::new(Outbox::new(Limits {
            frames: cfg.queue_frames.get(),
            bytes: cfg.queue_bytes.get(),
        }));
        let (id, accepted) = node.registry.attach(outbox.clone());
        if !accepted {
            outbox.close_after_flush(Some(going_away()));
        }
        let (sink, stream) = socket.split();
        tokio::spawn(write_loop(
            sink,
            outbox.clone(),
            node.config.clone(),
            node.counters.clone(),
            id,
            node.registry.writer_started(),
        ));
        let bucket = TokenBucket::new(cfg.messages_per_second.get(), cfg.message_burst.get());
        outbox.touch();
        Self {
            id,
            shared,
            outbox,
            rooms: Vec::new(),
            stream,
            bucket,
            in_flight: OnceLock::new(),
        }
    }

    /// This socket's id, unique within the node. [`broadcast`](FanoutSocket::broadcast) uses
    /// it for you; a broadcast made elsewhere can name it with
    /// [`Broadcast::except`](crate::Broadcast::except) or [`Broadcast::sender`].
    pub fn id(&self) -> SocketId {
        self.id
    }

    /// Broadcasts `payload` to every socket of `room` on every node, as this socket: like
    /// [`RoomHandle::broadcast`](crate::RoomHandle::broadcast), with this socket as the
    /// [`sender`](Broadcast::sender), so that in a sharded room its messages share one shard
    /// and keep their order. Add [`except_sender`](Broadcast::except_sender) to leave this
    /// socket out. The socket need not be in the room.
    ///
    /// ```no_run
    /// use axum::extract::ws::Message;
    /// use axum_fanout::{FanoutSocket, Payload};
    ///
    /// async fn echo_to_others(mut socket: FanoutSocket) {
    ///     while let Some(Ok(Message::Text(text))) = socket.recv().await {
    ///         let Ok(payload) = Payload::raw_json(text.as_str()) else { break };
    ///         let _ = socket.broadcast("lobby", payload).except_sender().await;
    ///     }
    /// }
    /// ```
    pub fn broadcast(&self, room: impl AsRef<str>, payload: impl Into<Payload>) -> Broadcast {
        Broadcast::new(self.shared.clone(), room.as_ref(), payload.into())
            .sender(self.id)
            .with_origin(self.outbox.clone(), self.slots())
    }

    fn slots(&self) -> Arc<Semaphore> {
        let max = self.shared.node.config.broadcasts_in_flight.get();
        self.in_flight
            .get_or_init(|| Arc::new(Semaphore::new(max)))
            .clone()
    }

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
        if self.rooms.contains(&room) {
            return Ok(());
        }
        let node = &self.shared.node;
        if !node.bus.is_configured() {
            return Err(Error::no_redis());
        }
        if self.outbox.is_closing() || node.registry.is_shutting_down() {
            return Err(Error::closed());
        }
        let max = node.config.max_rooms_per_socket.get();
        if self.rooms.len() >= max {
            return Err(Error::too_many_rooms(max));
        }
        let deadline = Instant::now() + node.config.subscribe_timeout;
        let subscribed = node.registry.insert(&room, self.id, self.outbox.clone());
        self.rooms.push(room.clone());
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
    /// use axum_fanout::{FanoutSocket, Member};
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
        self.shared.node.bus.check_presence(&room)?;
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
    /// use axum_fanout::{FanoutSocket, Position};
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
        let read = match &since {
            Some(since) => Read::After(since.clone(), settings.replay_limit.get()),
            None => Read::Top,
        };
        // Boxed: the read's futures (a script call under a deadline) are large, and a socket's
        // task would keep their size for its whole life.
        match Box::pin(node.bus.read_history(&room, &settings, read)).await {
            Ok(page) => Ok(node
                .durable
                .finish_resume(&room, self.id, &self.outbox, since, page)),
            Err(e) => {
                self.leave(room.as_str());
                Err(e)
            }
        }
    }

    /// Leaves `room`. Returns whether the socket was in it.
    pub fn leave(&mut self, room: &str) -> bool {
        let Some(at) = self.rooms.iter().position(|r| r.as_str() == room) else {
            return false;
        };
        let room = self.rooms.swap_remove(at);
        self.leave_presence(&room);
        let node = &self.shared.node;
        node.registry.remove(&room, self.id);
        if node.durable.is_durable(room.as_str()) {
            node.durable.forget(&room, self.id);
        }
        tracing::debug!(room = %room, socket = %self.id, "left");
        true
    }

    /// The rooms this socket is in.
    pub fn rooms(&self) -> impl Iterator<Item = &RoomName> {
        self.rooms.iter()
    }

    /// Receives the client's next text or binary message.
    ///
    /// Returns `None` once the connection is closed, by the client or by this node (a slow
    /// consumer, [`close`](FanoutSocket::close), [`RoomHandle::shutdown`](crate::RoomHandle::shutdown)). Pings are answered
    /// and pongs consumed for you. Loss notices and failures of queued broadcasts are
    /// discarded: use [`recv_event`](FanoutSocket::recv_event) to see them.
    ///
    /// A message over the size limit closes the socket with 1009 and yields an error for which
    /// [`Error::is_message_too_big`] is true; a transport failure yields
    /// [`Error::is_websocket`]. The next call returns `None`.
    ///
    /// # Cancel safety
    /// Cancel safe: a message is only taken from the socket when it is returned.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        loop {
            match self.recv_event().await? {
                Ok(Event::Message(msg)) => return Some(Ok(msg)),
                Ok(Event::Missed(missed)) => {
                    tracing::debug!(socket = %self.id, %missed, "loss notice discarded by recv()");
                }
                // Already logged and counted by the publisher.
                Ok(Event::BroadcastFailed { .. }) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Like [`recv`](FanoutSocket::recv), and also tells when messages may have been missed.
    ///
    /// ## Lagging
    /// Redis pub/sub is at-most-once. When messages of one of the socket's rooms may not have
    /// reached it (the node's Redis link was down, the node shed load, or this socket's queue
    /// overflowed under a dropping policy), this yields [`Event::Missed`] with the room and the
    /// time window, once per gap and room (gaps that overlap are merged). The socket keeps
    /// working; resync the room if the application needs every message.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is only taken when it is returned.
    pub async fn recv_event(&mut self) -> Option<Result<Event, Error>> {
        loop {
            match self.outbox.take_notice() {
                Some(Notice::Missed(missed)) => return Some(Ok(Event::Missed(missed))),
                Some(Notice::BroadcastFailed(room, error)) => {
                    return Some(Ok(Event::BroadcastFailed { room, error }));
                }
                None => {}
            }
            let next = tokio::select! {
                biased;
                _ = self.outbox.reader_event() => {
                    if self.outbox.is_closing() {
                        return None;
                    }
                    continue;
                }
                next = self.stream.next() => next,
            };
            if let Some(Ok(_)) = &next {
                self.outbox.touch();
            }
            match next? {
                Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                    if !self.bucket.take() {
                        self.shared.node.counters.rate_limited.add(1);
                        tracing::debug!(
                            socket = %self.id,
                            "client over the message rate limit; closing with 1008"
                        );
                        self.close(close_code::POLICY, RATE_LIMIT_REASON);
                        return Some(Err(Error::rate_limited(RATE_LIMIT_REASON)));
                    }
                    return Some(Ok(Event::Message(msg)));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) => {
                    // The transport answers the close handshake; stop the writer too.
                    self.outbox.close_after_flush(None);
                    return None;
                }
                Err(e) => return Some(Err(self.read_error(e))),
            }
        }
    }

    fn read_error(&mut self, e: axum::Error) -> Error {
        let inner = e.into_inner();
        let too_big = inner
            .downcast_ref::<tungstenite::Error>()
            .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)));
        if too_big {
            tracing::debug!(
                socket = %self.id,
                "client message over the size limit; closing with 1009"
            );
            self.close(close_code::SIZE, "message too big");
            Error::message_too_big(inner)
        } else {
            self.outbox.close_after_flush(None);
            Error::websocket(inner)
        }
    }

    /// Queues a message for this socket only, behind what is already queued.
    ///
    /// The socket's overflow policy applies; fails with [`Error::is_closed`] when the socket is
    /// closing.
    pub fn send(&self, msg: impl Into<Payload>) -> Result<(), Error> {
        let frame = msg.into().into_frame();
        match self.outbox.offer(frame, self.shared.node.config.overflow) {
            Offer::Queued | Offer::QueuedDroppingOldest(_) => Ok(()),
            Offer::Dropped => {
                self.shared.node.counters.dropped.add(1);
                Ok(())
            }
            Offer::Overflowed => {
                self.shared.node.counters.slow_disconnects.add(1);
                Err(Error::closed())
            }
            Offer::Closed => Err(Error::closed()),
        }
    }

    /// Closes the connection with `code` and `reason`, after what is already queued.
    ///
    /// `reason` is cut to the 123 bytes a close frame can carry. After this,
    /// [`recv`](FanoutSocket::recv) returns `None`.
    pub fn close(&mut self, code: u16, reason: &str) {
        let reason = truncate_reason(reason);
        self.outbox.close_after_flush(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
    }
}

impl FanoutSocket {
    /// Uncounts the socket from `room`'s members, if it joined as one.
    fn leave_presence(&self, room: &RoomName) {
        let node = &self.shared.node;
        if node.config.has_presence(room.as_str()) {
            node.presence.remove(room, self.id);
        }
    }
}

fn truncate_reason(reason: &str) -> &str {
    const MAX: usize = 123;
    if reason.len() <= MAX {
        return reason;
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

impl Drop for FanoutSocket {
    fn drop(&mut self) {
        let node = &self.shared.node;
        let registry = &node.registry;
        for room in std::mem::take(&mut self.rooms) {
            self.leave_presence(&room);
            registry.remove(&room, self.id);
            if node.durable.is_durable(room.as_str()) {
                node.durable.forget(&room, self.id);
            }
            tracing::debug!(room = %room, socket = %self.id, "left (socket dropped)");
        }
        registry.detach(self.id);
        self.outbox.close_after_flush(Some(CloseFrame {
            code: close_code::NORMAL,
            reason: Utf8Bytes::from_static(""),
        }));
    }
}
