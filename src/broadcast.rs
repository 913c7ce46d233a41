//! [`Broadcast`]: one message on its way to every socket of a room, on every node.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use crate::channel;
use crate::envelope::{self, Payload};
use crate::error::Error;
use crate::node::Shared;
use crate::registry::SocketId;
use crate::room::RoomName;

/// A broadcast being prepared; `.await` it to publish. From [`RoomHandle::broadcast`](crate::RoomHandle::broadcast) or
/// [`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast).
///
/// It resolves, after Redis replied, to the number of nodes subscribed to the room (PUBLISH's
/// reply). Every node delivers it from its subscriber, this one included: local sockets never
/// receive it inline, so each socket gets each message once and all see one order.
#[must_use = "a broadcast does nothing until it is awaited"]
#[derive(Debug)]
pub struct Broadcast {
    shared: Arc<Shared>,
    room: Result<RoomName, Error>,
    payload: Payload,
    except: Option<SocketId>,
    sender: Option<SocketId>,
}

impl Broadcast {
    pub(crate) fn new(shared: Arc<Shared>, room: &str, payload: Payload) -> Self {
        Self {
            shared,
            room: RoomName::new(room).map_err(Error::from),
            payload,
            except: None,
            sender: None,
        }
    }

    /// Leaves out one socket of this node (usually the sender). It also counts as the
    /// [`sender`](Broadcast::sender) unless one was named.
    pub fn except(mut self, socket: SocketId) -> Self {
        self.except = Some(socket);
        self.sender.get_or_insert(socket);
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

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let room = self.room?;
            let node = &self.shared.node;
            let bytes = envelope::encode(
                &node.config.node_id,
                room.as_str(),
                &self.payload,
                self.except.map(SocketId::get),
            );
            if let Some(settings) = node.config.durable_for(room.as_str()) {
                // Stored and published in one step, numbered by Redis.
                let (_, nodes) = node.bus.publish_durable(&room, settings, bytes).await?;
                return Ok(nodes);
            }
            let sender =
                channel::sender_key(&node.config.node_id, self.sender.map_or(0, SocketId::get));
            node.bus.publish(&room, sender, bytes).await
        })
    }
}
