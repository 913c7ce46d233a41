//! [`RoomHandle`]'s calls on users across the fleet (see [`crate::users`]).

use std::future::Future;
use std::pin::Pin;

use crate::envelope::Payload;
use crate::error::Error;
use crate::node::RoomHandle;
use crate::users::{self, Connected, Disconnect, NodeInfo, UserCommand};

impl RoomHandle {
    /// Sends `payload` to every socket of `user` on every node (sockets that
    /// [`identify`](crate::FanoutSocket::identify)ed as `user`), each getting one frame
    /// `{"type":"fanout.direct","payload":V}` (`"text":T` or `"binary":B64` in place of
    /// `"payload"` for such payloads), whether it asked for positions or speaks the fanout
    /// protocol. Resolves to the number of nodes that held a socket of `user`: 0
    /// means it was delivered nowhere and kept nowhere. Messages from one sender arrive in the
    /// order it sent them.
    ///
    /// Fails with [`Error::is_invalid_member`] for an empty, over-long or odd user id, and like
    /// a broadcast otherwise (a timeout is an unknown outcome).
    ///
    /// ```no_run
    /// use axum::{Json, extract::Path};
    /// use axum_fanout::RoomHandle;
    /// use serde_json::{Value, json};
    ///
    /// // POST /users/{user}/notify
    /// async fn notify(fanout: RoomHandle, Path(user): Path<String>, Json(body): Json<Value>) -> String {
    ///     match fanout.send_to_user(&user, json!({ "kind": "notification", "body": body })).await {
    ///         Ok(0) => "not connected\n".to_owned(),
    ///         Ok(nodes) => format!("delivered on {nodes} node(s)\n"),
    ///         Err(e) => format!("failed: {e}\n"),
    ///     }
    /// }
    /// ```
    pub fn send_to_user(
        &self,
        user: impl AsRef<str>,
        payload: impl Into<Payload>,
    ) -> Pin<Box<dyn Future<Output = Result<usize, Error>> + Send>> {
        let node = &self.shared.node;
        // Boxed: the returned future must not borrow `user` or `payload`, which are generic.
        Box::pin(users::send_to_user(
            node.bus.clone(),
            &node.config.node_id,
            user.as_ref(),
            &payload.into(),
        ))
    }

    /// Closes every socket of `user` on every node, with [`close::DISCONNECTED`](crate::close::DISCONNECTED)
    /// (4000: do not reconnect) and `"disconnected"` unless the returned [`Disconnect`] says
    /// otherwise; await it for the number of nodes that held a socket of `user`. Other users'
    /// sockets are untouched, and `user` may connect again afterwards.
    ///
    /// ```no_run
    /// # async fn logout(fanout: axum_fanout::RoomHandle) -> Result<(), axum_fanout::Error> {
    /// let nodes = fanout.disconnect_user("alice").reason("logged out").await?;
    /// # Ok(()) }
    /// ```
    pub fn disconnect_user(&self, user: impl AsRef<str>) -> Disconnect {
        let node = &self.shared.node;
        Disconnect::user(node.bus.clone(), &node.config.node_id, user.as_ref())
    }

    /// Closes every socket of `room` on every node, as [`disconnect_user`](RoomHandle::disconnect_user)
    /// does a user's.
    pub fn disconnect_room(&self, room: impl AsRef<str>) -> Disconnect {
        let node = &self.shared.node;
        Disconnect::room(node.bus.clone(), &node.config.node_id, room.as_ref())
    }

    /// Makes every socket of `user` on every node join `room` as if it had joined itself: a
    /// durable room with its `fanout.position` notice and positions, a presence room as a member
    /// named `user`, under the same limits. Await it for the number of nodes that held a socket
    /// of `user`; each node joins its sockets once Redis confirmed the room there. A socket
    /// already in the room stays as it is.
    pub fn join_user(&self, user: impl AsRef<str>, room: impl AsRef<str>) -> UserCommand {
        self.user_command(user.as_ref(), room.as_ref(), true)
    }

    /// Makes every socket of `user` on every node leave `room` (as a member too).
    pub fn leave_user(&self, user: impl AsRef<str>, room: impl AsRef<str>) -> UserCommand {
        self.user_command(user.as_ref(), room.as_ref(), false)
    }

    fn user_command(&self, user: &str, room: &str, join: bool) -> UserCommand {
        let node = &self.shared.node;
        UserCommand::new(node.bus.clone(), &node.config.node_id, user, room, join)
    }

    /// Where `user` is connected: how many live nodes hold a socket of theirs, and how many
    /// sockets. Read from the counts each node keeps in Redis (written within 100 ms of a
    /// change, and again on every new link), counting only nodes whose record is alive: one
    /// round trip or two, never a question to every node.
    ///
    /// Fails with [`Error::is_invalid_member`] for an invalid user id, and with
    /// [`Error::is_timeout`] or [`Error::is_redis`] when Redis does not answer.
    pub async fn connected(&self, user: impl AsRef<str>) -> Result<Connected, Error> {
        crate::presence::Member::new(user.as_ref())?;
        users::connected(&self.shared.node.bus, user.as_ref()).await
    }

    /// The fleet's live nodes, sorted by id, each with its connection, room and user counts as
    /// it last wrote them (every third of
    /// [`presence_ttl`](crate::FanoutBuilder::presence_ttl); a node gone for longer than that
    /// TTL is not listed).
    pub async fn fleet(&self) -> Result<Vec<NodeInfo>, Error> {
        users::fleet(&self.shared.node.bus).await
    }
}
