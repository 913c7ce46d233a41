//! The socket's user: who it is across the fleet, and when its credentials expire.

use std::time::Duration;

use crate::error::Error;
use crate::presence::Member;
use crate::room::RoomName;
use crate::users::FleetSocketId;

use super::FanoutSocket;

impl FanoutSocket {
    /// Names the socket's user (from the application's authentication; the same id presence
    /// uses): from then on the socket receives what is sent to the user
    /// ([`RoomHandle::send_to_user`](crate::RoomHandle::send_to_user)) and obeys the fleet
    /// commands addressed to the user ([`RoomHandle::disconnect_user`](crate::RoomHandle::disconnect_user),
    /// [`join_user`](crate::RoomHandle::join_user), ...), on whichever node it is. Returns once
    /// this node receives the user's channel: a message sent to the user afterwards reaches it.
    ///
    /// A socket has one user: naming another one replaces it. Fails with
    /// [`Error::is_invalid_member`] for an empty, over-long (256 bytes) or odd id, and like
    /// [`join`](FanoutSocket::join) otherwise (the socket then has no user).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use axum_fanout::FanoutSocket;
    ///
    /// async fn serve(mut socket: FanoutSocket, user: String, token_ttl: Duration) {
    ///     if socket.identify(&user).await.is_err() || socket.expire_in(token_ttl).is_err() {
    ///         return socket.close(1011, "try again later");
    ///     }
    ///     while let Some(Ok(_)) = socket.recv().await {}
    /// }
    /// ```
    pub async fn identify(&mut self, user: impl AsRef<str>) -> Result<(), Error> {
        let user = user.as_ref();
        Member::new(user)?;
        if self.user.as_deref() == Some(user) {
            return Ok(());
        }
        let node = &self.shared.node;
        if let Some(old) = self.user.take() {
            let room = RoomName::of_user(&old);
            node.rooms.leave(self.id, &self.outbox, room.as_str());
        }
        let room = RoomName::of_user(user);
        node.rooms.join(self.id, &self.outbox, &room).await?;
        self.user = Some(user.into());
        Ok(())
    }

    /// The user the socket [`identify`](FanoutSocket::identify)ed as.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// This socket's address across the fleet, for
    /// [`Disconnect::socket`](crate::users::Disconnect::socket) and
    /// [`UserCommand::socket`](crate::users::UserCommand::socket) from any node.
    pub fn fleet_id(&self) -> FleetSocketId {
        FleetSocketId::new(&self.shared.node.config.node_id, self.id)
    }

    /// The socket's credentials expire `after` from now: the node then closes it with
    /// [`close::CREDENTIALS_EXPIRED`](crate::close::CREDENTIALS_EXPIRED) (4001,
    /// `"credentials expired"`), plus a jitter of at most a tenth of `after` and at most 1 s
    /// (so that tokens issued together do not close their sockets together), unless this is
    /// called again first: a refresh, after the application checked new credentials.
    ///
    /// Fails with [`Error::is_invalid_argument`] for a zero duration (an expiry in the past:
    /// close the socket instead) and [`Error::is_closed`] on a closing socket; nothing changes
    /// then.
    pub fn expire_in(&self, after: Duration) -> Result<(), Error> {
        self.shared
            .node
            .users
            .expire_in(self.id, &self.outbox, after)
    }

    /// The socket's credentials no longer expire: undoes [`expire_in`](FanoutSocket::expire_in),
    /// for a refresh whose new credentials do not expire. Does nothing on a socket without an
    /// expiry, or one that expired already (it is closing).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use axum_fanout::FanoutSocket;
    ///
    /// /// New credentials checked by the application: `None` when they do not expire.
    /// fn refreshed(socket: &FanoutSocket, expires_in: Option<Duration>) {
    ///     match expires_in {
    ///         Some(after) => {
    ///             let _ = socket.expire_in(after);
    ///         }
    ///         None => socket.expire_never(),
    ///     }
    /// }
    /// ```
    pub fn expire_never(&self) {
        self.shared.node.users.expire_never(self.id);
    }

    /// Closes the socket (1008) unless its credentials are set (an expiry, or none) `within`
    /// from now: a protocol socket that must `connect` first.
    pub(crate) fn expect_credentials_within(&self, within: Duration) {
        let users = &self.shared.node.users;
        users.expect_credentials(self.id, &self.outbox, within);
    }

    /// How long until the socket's credentials expire (jitter included), if they do.
    pub fn expires_in(&self) -> Option<Duration> {
        let at = self.shared.node.users.expires_at(self.id)?;
        Some(at.saturating_duration_since(tokio::time::Instant::now()))
    }

    /// Leaves every room `keep` refuses, and returns them: after a refresh, the rooms the new
    /// credentials no longer allow. Tell the client which (the socket gets no notice of its
    /// own).
    ///
    /// ```no_run
    /// # use axum_fanout::FanoutSocket;
    /// # fn refreshed(socket: &mut FanoutSocket, allowed: &[&str]) {
    /// for room in socket.retain_rooms(|room| allowed.contains(&room)) {
    ///     let _ = socket.send(format!(r#"{{"type":"left","room":"{room}"}}"#));
    /// }
    /// # }
    /// ```
    pub fn retain_rooms(&mut self, mut keep: impl FnMut(&str) -> bool) -> Vec<RoomName> {
        let mut left = Vec::new();
        for room in self.rooms() {
            if !keep(room.as_str()) && self.leave(room.as_str()) {
                left.push(room);
            }
        }
        left
    }
}
