//! The calls an application makes on users: a direct message, a fleet-wide disconnect, a
//! fleet-wide join or leave. Each publishes one envelope and answers with the number of nodes
//! that held an addressed socket.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::command::{Command, FleetSocketId};
use crate::bus::{Bus, Terms};
use crate::close;
use crate::envelope::{self, Payload};
use crate::error::Error;
use crate::presence::Member;
use crate::room::RoomName;

/// Longest close reason a WebSocket close frame carries, in bytes.
const MAX_REASON: usize = 123;

/// The room of `user`'s sockets, after checking the id as presence does.
fn user_room(user: &str) -> Result<RoomName, Error> {
    Member::new(user)?;
    Ok(RoomName::of_user(user))
}

/// Publishes `bytes` on `room`'s channel (shard 0 of a sharded room, which every node holding
/// the room subscribes to) and waits for Redis's count.
async fn publish(bus: Arc<Bus>, room: RoomName, bytes: Vec<u8>) -> Result<usize, Error> {
    // Never a durable room's store script: a command or a direct message is not history.
    let receipt = bus
        .enqueue(room, 0, bytes, None, Terms::default(), true)
        .await?;
    Ok(receipt.published().await?.nodes())
}

/// Sends `payload` to every socket of `user` on every node: see
/// [`RoomHandle::send_to_user`](crate::RoomHandle::send_to_user).
pub(crate) fn send_to_user(
    bus: Arc<Bus>,
    node_id: &str,
    user: &str,
    payload: &Payload,
) -> impl Future<Output = Result<usize, Error>> + Send + use<> {
    let prepared = user_room(user).map(|room| {
        let frame = envelope::direct_frame(payload);
        (
            envelope::encode_control(node_id, room.as_str(), &frame),
            room,
        )
    });
    async move {
        let (bytes, room) = prepared?;
        publish(bus, room, bytes).await
    }
}

/// Whom a [`Disconnect`] closes.
#[derive(Debug)]
enum Scope {
    User(String),
    Room(String),
}

/// A fleet-wide disconnect on its way: from
/// [`RoomHandle::disconnect_user`](crate::RoomHandle::disconnect_user) or
/// [`RoomHandle::disconnect_room`](crate::RoomHandle::disconnect_room). Await it for the number
/// of nodes that held an addressed socket; each closes them within a moment of Redis running
/// the command (after what is already queued for them is written).
///
/// Closes with [`close::DISCONNECTED`] (4000: do not reconnect) and
/// [`close::DISCONNECTED_REASON`] unless told otherwise.
#[must_use = "a disconnect does nothing until it is awaited"]
#[derive(Debug)]
pub struct Disconnect {
    bus: Arc<Bus>,
    node_id: Arc<str>,
    scope: Scope,
    code: u16,
    reason: String,
    socket: Option<FleetSocketId>,
}

impl Disconnect {
    pub(crate) fn user(bus: Arc<Bus>, node_id: &str, user: &str) -> Self {
        Self::new(bus, node_id, Scope::User(user.to_owned()))
    }

    pub(crate) fn room(bus: Arc<Bus>, node_id: &str, room: &str) -> Self {
        Self::new(bus, node_id, Scope::Room(room.to_owned()))
    }

    fn new(bus: Arc<Bus>, node_id: &str, scope: Scope) -> Self {
        Self {
            bus,
            node_id: Arc::from(node_id),
            scope,
            code: close::DISCONNECTED,
            reason: close::DISCONNECTED_REASON.to_owned(),
            socket: None,
        }
    }

    /// The reason the client sees: at most 123 bytes (what a close frame carries; a longer
    /// one fails with [`Error::is_invalid_argument`] and nothing is closed). Defaults to
    /// `"disconnected"`.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// Whether a client should reconnect by itself: `false` (a logout, a ban) closes with
    /// [`close::DISCONNECTED`] (4000), `true` (moved on, a changed permission) with
    /// [`close::RECONNECT`] (4002). Defaults to `false`.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.code = if reconnect {
            close::RECONNECT
        } else {
            close::DISCONNECTED
        };
        self
    }

    /// An application's own close code, in 4000..=4999 (others fail with
    /// [`Error::is_invalid_argument`]). Defaults to [`close::DISCONNECTED`].
    pub fn code(mut self, code: u16) -> Self {
        self.code = code;
        self
    }

    /// Only this socket of the user (see [`FanoutSocket::fleet_id`](crate::FanoutSocket::fleet_id)),
    /// not all of them. For a room's disconnect: only this socket of the room.
    pub fn socket(mut self, socket: FleetSocketId) -> Self {
        self.socket = Some(socket);
        self
    }

    async fn run(self) -> Result<usize, Error> {
        if self.reason.len() > MAX_REASON {
            return Err(Error::invalid_argument(format!(
                "a close reason is at most {MAX_REASON} bytes, not {}",
                self.reason.len()
            )));
        }
        if !(4000..=4999).contains(&self.code) {
            return Err(Error::invalid_argument(format!(
                "an application close code is in 4000..=4999, not {}",
                self.code
            )));
        }
        let room = match &self.scope {
            Scope::User(user) => user_room(user)?,
            Scope::Room(room) => RoomName::new(room)?,
        };
        let command = Command::Disconnect {
            code: self.code,
            reason: self.reason,
            socket: self.socket.as_ref().map(FleetSocketId::target),
        };
        publish_command(self.bus, &self.node_id, room, &command).await
    }
}

impl IntoFuture for Disconnect {
    type Output = Result<usize, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    /// Publishes the command; resolves to the number of nodes that held an addressed socket.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// A fleet-wide join or leave of a user's sockets on its way: from
/// [`RoomHandle::join_user`](crate::RoomHandle::join_user) or
/// [`RoomHandle::leave_user`](crate::RoomHandle::leave_user). Await it for the number of nodes
/// that held a socket of the user.
#[must_use = "a user command does nothing until it is awaited"]
#[derive(Debug)]
pub struct UserCommand {
    bus: Arc<Bus>,
    node_id: Arc<str>,
    user: String,
    room: String,
    join: bool,
    socket: Option<FleetSocketId>,
}

impl UserCommand {
    pub(crate) fn new(bus: Arc<Bus>, node_id: &str, user: &str, room: &str, join: bool) -> Self {
        Self {
            bus,
            node_id: Arc::from(node_id),
            user: user.to_owned(),
            room: room.to_owned(),
            join,
            socket: None,
        }
    }

    /// Only this socket of the user, not all of them.
    pub fn socket(mut self, socket: FleetSocketId) -> Self {
        self.socket = Some(socket);
        self
    }

    async fn run(self) -> Result<usize, Error> {
        let room = user_room(&self.user)?;
        // Checked here, so that a bad name fails the caller rather than every node.
        let to = RoomName::new(&self.room)?;
        let socket = self.socket.as_ref().map(FleetSocketId::target);
        let command = if self.join {
            Command::Join {
                room: to.as_str().to_owned(),
                socket,
            }
        } else {
            Command::Leave {
                room: to.as_str().to_owned(),
                socket,
            }
        };
        publish_command(self.bus, &self.node_id, room, &command).await
    }
}

impl IntoFuture for UserCommand {
    type Output = Result<usize, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    /// Publishes the command; resolves to the number of nodes that held a socket of the user.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

async fn publish_command(
    bus: Arc<Bus>,
    node_id: &str,
    room: RoomName,
    command: &Command,
) -> Result<usize, Error> {
    let json = serde_json::to_string(command)
        .ok()
        .and_then(|text| RawValue::from_string(text).ok())
        .ok_or_else(|| Error::invalid_argument("the command could not be encoded"))?;
    let bytes = envelope::encode_command(node_id, room.as_str(), &json);
    publish(bus, room, bytes).await
}
