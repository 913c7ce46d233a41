//! [`Broadcast`]: one message on its way to every socket of a room, on every node.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::bus::{Guard, Published, Receipt, Terms};
use crate::channel;
use crate::envelope::{self, Payload};
use crate::error::Error;
use crate::node::Shared;
use crate::queue::Outbox;
use crate::registry::SocketId;
use crate::room::RoomName;

/// A broadcast being prepared; `.await` it to publish. From [`RoomHandle::broadcast`](crate::RoomHandle::broadcast) or
/// [`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast).
///
/// It resolves, after Redis replied, to the number of nodes subscribed to the room (PUBLISH's
/// reply); [`publish`](Broadcast::publish) also gives a durable room's position. Every node
/// delivers it from its subscriber, this one included: local sockets never receive it
/// inline, so each socket gets each message once and all see one order.
///
/// ## Zero nodes
/// The count is of the nodes that got it live, not of where it is kept. A plain room with no
/// sockets anywhere answers 0 and the message is gone. A [durable](crate::FanoutBuilder::durable)
/// room with no sockets also answers 0, yet its message was stored: a client that joins
/// later reads it from the history. Tell the two apart with [`publish`](Broadcast::publish), whose
/// [`position`](crate::Published::position) is `Some` once a durable message is stored.
///
/// ## Cancel safety
/// Dropping an awaited broadcast before it was written to Redis cancels it. A broadcast made
/// with [`queue`](Broadcast::queue) is sent whether or not its [`Receipt`] is still held.
///
/// ## Order and pipelining
/// Broadcasts reach Redis in the order they are *queued*, one publisher connection per node.
/// Awaiting a broadcast waits for Redis's reply, a round trip: fine for a plain HTTP handler,
/// slow for a socket whose client sends many messages in a row. [`queue`](Broadcast::queue)
/// returns as soon as the broadcast is queued, so the handler can read the client's next
/// frame while Redis works, and the client's messages still keep their order. A socket has at
/// most [`broadcasts_in_flight`](crate::FanoutBuilder::broadcasts_in_flight) unanswered
/// broadcasts; beyond, `queue` waits for the oldest reply.
#[must_use = "a broadcast does nothing until it is awaited"]
#[derive(Debug)]
pub struct Broadcast {
    shared: Arc<Shared>,
    room: Result<RoomName, Error>,
    payload: Payload,
    except: Option<SocketId>,
    sender: Option<SocketId>,
    /// The socket it comes from ([`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast)):
    /// told of failures nobody awaited, and bounding its broadcasts in flight.
    origin: Option<(Arc<Outbox>, Arc<Semaphore>)>,
    /// Published at most once under this key ([`Broadcast::once`]).
    guard: Option<Box<Guard>>,
}

impl Broadcast {
    pub(crate) fn new(shared: Arc<Shared>, room: &str, payload: Payload) -> Self {
        Self {
            shared,
            room: RoomName::new(room).map_err(Error::from),
            payload,
            except: None,
            sender: None,
            origin: None,
            guard: None,
        }
    }

    /// Publishes it only if `key` holds no outcome yet, and writes its outcome there (kept for
    /// `ttl`) in the same step in Redis: a retry under the same key, from any node, sends
    /// nothing, whatever happened to the node that sent the first. `key` must share the
    /// room's channel's hash slot (`bus::script::room_key_base`), so only a room with one
    /// shard can take it. A broadcast not sent because of its key fails (with a Redis error);
    /// the key then tells what the first one got.
    pub(crate) fn once(mut self, key: String, ttl: std::time::Duration) -> Self {
        self.guard = Some(Box::new(Guard { key, ttl }));
        self
    }

    /// From a socket: its failures go to its reader, its slots bound what it has in flight.
    pub(crate) fn with_origin(mut self, outbox: Arc<Outbox>, slots: Arc<Semaphore>) -> Self {
        self.origin = Some((outbox, slots));
        self
    }

    /// Queues the broadcast and returns once it is queued, without waiting for Redis's reply:
    /// its place in the order is then fixed. Await the [`Receipt`] for the reply, or drop it.
    ///
    /// Fails at once for an invalid room or an oversized payload, and with
    /// [`Error::is_timeout`] when it could not even be queued within the publish timeout
    /// (Redis away and the queue full). A failure after that resolves the receipt; if the
    /// receipt was dropped, a broadcast made with
    /// [`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast) is reported to that socket
    /// as [`Event::BroadcastFailed`](crate::Event::BroadcastFailed).
    ///
    /// ```no_run
    /// use axum::extract::ws::Message;
    /// use axum_fanout::{Event, FanoutSocket, Payload};
    ///
    /// async fn chat(mut socket: FanoutSocket) {
    ///     while let Some(Ok(event)) = socket.recv_event().await {
    ///         match event {
    ///             Event::Message(Message::Text(text)) => {
    ///                 let Ok(payload) = Payload::raw_json(text.as_str()) else { break };
    ///                 // Read the next frame at once; the order of this client's messages holds.
    ///                 let _ = socket.broadcast("lobby", payload).queue().await;
    ///             }
    ///             Event::BroadcastFailed { room, error, .. } => {
    ///                 eprintln!("a message to {room} was lost: {error}");
    ///             }
    ///             _ => {}
    ///         }
    ///     }
    /// }
    /// ```
    pub fn queue(self) -> impl Future<Output = Result<Receipt, Error>> + Send {
        // Boxed whole (one allocation per broadcast): a socket's read loop awaits
        // this, and a task keeps the size of its largest await for its whole life, which for
        // most sockets is spent idle in `recv`.
        Box::pin(self.enqueue(false))
    }

    /// Publishes it and waits for Redis's answer, like `.await`, with the message's position
    /// when the room is durable: what the client that sent it can keep, to resume after its
    /// own message. Dropping the future before the broadcast was written to Redis cancels it.
    ///
    /// ```no_run
    /// use axum::Json;
    /// use axum::extract::Path;
    /// use axum_fanout::{Error, RoomHandle};
    /// use serde_json::{Value, json};
    ///
    /// // POST /rooms/{room}: answers with the message's position in a durable room.
    /// async fn post(
    ///     fanout: RoomHandle,
    ///     Path(room): Path<String>,
    ///     Json(body): Json<Value>,
    /// ) -> Result<Json<Value>, String> {
    ///     let published = fanout
    ///         .broadcast(&room, body)
    ///         .publish()
    ///         .await
    ///         .map_err(|e: Error| e.to_string())?;
    ///     let position = published.position().map(ToString::to_string);
    ///     Ok(Json(json!({ "nodes": published.nodes(), "position": position })))
    /// }
    /// ```
    pub fn publish(self) -> impl Future<Output = Result<Published, Error>> + Send {
        // Boxed whole, like `queue`.
        Box::pin(self.published())
    }

    async fn published(self) -> Result<Published, Error> {
        self.enqueue(true).await?.published().await
    }

    /// Queues it; `abandonable`: see `bus::publisher::Outgoing`.
    async fn enqueue(self, abandonable: bool) -> Result<Receipt, Error> {
        let room = self.room?;
        let node = &self.shared.node;
        let bytes = envelope::encode(
            &node.config.node_id,
            room.as_str(),
            &self.payload,
            self.except.map(SocketId::get),
        );
        let sender =
            channel::sender_key(&node.config.node_id, self.sender.map_or(0, SocketId::get));
        // A durable room's message is stored and published in one step, numbered by Redis;
        // it takes its place in the same queue, so the order still holds.
        let durable = node.config.durable_for(room.as_str()).copied();
        let terms = Terms {
            durable,
            guard: self.guard,
        };
        // Not boxed here: `queue`, `send` and `.await` box the whole broadcast once.
        node.bus
            .enqueue(room, sender, bytes, self.origin, terms, abandonable)
            .await
    }

    /// Leaves out one socket of this node. Only that: it does not name the
    /// [`sender`](Broadcast::sender), so in a sharded room the broadcast keeps this node's
    /// shard for the room. Add `.sender(socket)` too when the socket is the one sending, or
    /// broadcast from it with [`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast) and
    /// [`except_sender`](Broadcast::except_sender).
    pub fn except(mut self, socket: SocketId) -> Self {
        self.except = Some(socket);
        self
    }

    /// Leaves out the [`sender`](Broadcast::sender): with [`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast), the
    /// socket that broadcasts. Does nothing when no sender was named.
    pub fn except_sender(mut self) -> Self {
        self.except = self.sender;
        self
    }

    /// Names the socket this broadcast comes from, without leaving it out
    /// ([`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast) does this for you). In a sharded room it picks the shard,
    /// so one sender's messages keep their order while different senders spread over the
    /// shards. Without it, all of this node's broadcasts to the room share one shard.
    pub fn sender(mut self, socket: SocketId) -> Self {
        self.sender = Some(socket);
        self
    }
}

impl IntoFuture for Broadcast {
    type Output = Result<usize, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    /// Publishes and resolves to the number of nodes that got the broadcast live; 0 for a
    /// durable room with no sockets, although its message was stored (see *Zero nodes* on
    /// [`Broadcast`]).
    fn into_future(self) -> Self::IntoFuture {
        // Awaited: if the caller stops waiting before Redis got it, it is not sent; a queued
        // broadcast is sent regardless.
        Box::pin(async move { self.published().await.map(|p| p.nodes()) })
    }
}

#[cfg(test)]
mod tests {
    use crate::FanoutLayer;
    use crate::registry::SocketId;

    #[tokio::test]
    async fn except_leaves_a_socket_out_without_naming_the_sender() {
        // Never connects (nothing listens on port 1): only the broadcast's fields are looked at.
        let rooms = FanoutLayer::new("redis://127.0.0.1:1").handle();
        let (a, b) = (SocketId::from_wire(1), SocketId::from_wire(2));
        let only_except = rooms.broadcast("r", "x").except(a);
        assert_eq!((only_except.except, only_except.sender), (Some(a), None));
        let both = rooms.broadcast("r", "x").sender(b).except(a);
        assert_eq!((both.except, both.sender), (Some(a), Some(b)));
        let from_socket = rooms.broadcast("r", "x").sender(b).except_sender();
        assert_eq!((from_socket.except, from_socket.sender), (Some(b), Some(b)));
    }
}
