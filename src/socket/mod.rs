//! A WebSocket attached to the node: its identity, its queue, its own broadcasts and its
//! closing. Room membership is in `rooms`, the reading half in `read`; the writing half is a
//! task of its own (`writer`), fed through the socket's bounded queue.

mod read;
mod rooms;
mod user;

pub use read::Event;

use std::sync::{Arc, OnceLock};

use axum::extract::ws::{CloseFrame, Utf8Bytes, WebSocket};
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use crate::broadcast::Broadcast;
use crate::close;
use crate::envelope::Payload;
use crate::error::Error;
use crate::lifecycle::{Refused, Ticket};
use crate::node::{RoomHandle, Shared};
use crate::queue::{Limits, Offer, Outbox};
use crate::registry::SocketId;
use crate::writer::{going_away, write_loop};

use read::TokenBucket;

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
/// `"slow consumer"`; then [`recv`](FanoutSocket::recv) returns `None`. [`close`](crate::close)
/// lists every code the node closes with.
#[derive(Debug)]
pub struct FanoutSocket {
    id: SocketId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    bucket: TokenBucket,
    /// Slots for this socket's broadcasts in flight (`broadcasts_in_flight`), made on its
    /// first broadcast: most sockets of a big fleet only listen, and idle memory counts.
    in_flight: OnceLock<Arc<Semaphore>>,
    /// The user it [`identify`](FanoutSocket::identify)ed as.
    user: Option<Box<str>>,
}

impl FanoutSocket {
    /// Attaches an upgraded socket in the place `admitted` holds. A socket without one (the
    /// node is full or shutting down) is closed at once, with 1013 or 1001.
    pub(crate) fn attach(
        shared: Arc<Shared>,
        socket: WebSocket,
        admitted: Result<Ticket, Refused>,
    ) -> Self {
        let node = &shared.node;
        let cfg = &node.config;
        let outbox = Arc::new(Outbox::new(Limits {
            frames: cfg.queue_frames.get(),
            bytes: cfg.queue_bytes.get(),
        }));
        let id = node.lifecycle.new_id();
        let refused = match admitted {
            Ok(ticket) => (!node.lifecycle.attach(ticket, id, outbox.clone())).then(going_away),
            Err(Refused::ShuttingDown) => Some(going_away()),
            Err(Refused::Full) => {
                node.counters.rejected_connections.add(1);
                tracing::warn!(
                    max_connections = cfg.max_connections.get(),
                    "closed an attached websocket: node is full"
                );
                Some(CloseFrame {
                    code: close::TRY_AGAIN_LATER,
                    reason: Utf8Bytes::from_static(close::NODE_FULL_REASON),
                })
            }
        };
        if let Some(frame) = refused {
            outbox.close_after_flush(Some(frame));
        }
        let (sink, stream) = socket.split();
        outbox.park(Box::pin(sink));
        outbox.park_stream(stream);
        // The connection is over when the writer ends (closed by either side, dead, or too
        // slow): its rooms learn it then, not when the handler next reads or returns.
        let closed = rooms::LeaveOnClose {
            shared: shared.clone(),
            id,
            outbox: outbox.clone(),
        };
        tokio::spawn(write_loop(
            outbox.clone(),
            node.config.clone(),
            node.counters.clone(),
            id,
            (closed, node.lifecycle.writer_started()),
        ));
        let bucket = TokenBucket::new(cfg.messages_per_second.get(), cfg.message_burst.get());
        outbox.touch();
        Self {
            id,
            shared,
            outbox,
            bucket,
            in_flight: OnceLock::new(),
            user: None,
        }
    }

    /// A handle to this socket's node: to broadcast to other rooms, ask for presence or
    /// history, from inside the socket's handler without cloning one into it first.
    ///
    /// ```no_run
    /// use axum::{extract::ws::WebSocketUpgrade, response::Response};
    /// use axum_fanout::RoomHandle;
    ///
    /// async fn ws(upgrade: WebSocketUpgrade, rooms: RoomHandle) -> Response {
    ///     rooms.on_upgrade(upgrade, |mut socket| async move {
    ///         let rooms = socket.handle();
    ///         let _ = socket.join("lobby").await;
    ///         let _ = rooms.broadcast("audit", "someone joined the lobby").await;
    ///     })
    /// }
    /// ```
    pub fn handle(&self) -> RoomHandle {
        RoomHandle::from_shared(self.shared.clone())
    }

    /// From now on this socket takes each room's messages framed with the room (the fanout
    /// protocol, whose sockets carry many rooms).
    pub(crate) fn set_framed(&self) {
        self.outbox.set_framed();
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
    /// Queues a message for this socket only, behind what is already queued.
    ///
    /// The socket's overflow policy applies; fails with [`Error::is_closed`] when the socket is
    /// closing.
    pub fn send(&self, msg: impl Into<Payload>) -> Result<(), Error> {
        let frame = msg.into().into_frame();
        match self.outbox.offer(frame, self.shared.node.config.overflow) {
            Offer::Written | Offer::Queued | Offer::QueuedDroppingOldest(_) => Ok(()),
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
        node.rooms.quit_all(self.id, &self.outbox, "socket dropped");
        node.users.forget(self.id);
        self.shared.node.lifecycle.detach(self.id);
        self.outbox.close_after_flush(Some(CloseFrame {
            code: close::NORMAL,
            reason: Utf8Bytes::from_static(""),
        }));
    }
}
