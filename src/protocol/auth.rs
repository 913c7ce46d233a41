//! What the application decides: who a socket is, and what it may do.

use std::future::Future;
use std::time::Duration;

use axum::http::request::Parts;
use serde_json::Value;

use crate::envelope::Payload;
use crate::room::RoomName;

/// Who a socket acts as, and for how long: what [`Authorize::connect`] and
/// [`Authorize::connect_token`] grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    user: String,
    expires_in: Option<Duration>,
}

impl Grant {
    /// `user`, with credentials that do not expire. The user is the socket's name in presence
    /// and the owner of its idempotent publish keys.
    pub fn new(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            expires_in: None,
        }
    }

    /// Credentials that expire after `expires_in`: the node closes the socket then (4001,
    /// `"credentials expired"`, plus the jitter of
    /// [`FanoutSocket::expire_in`](crate::FanoutSocket::expire_in), whose timer it is) unless
    /// the client sent a `refresh` first.
    pub fn expires_in(mut self, expires_in: Duration) -> Self {
        self.expires_in = Some(expires_in);
        self
    }

    /// The user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// When the credentials expire, from now; `None`: never.
    pub fn expiry(&self) -> Option<Duration> {
        self.expires_in
    }
}

/// A refusal, with the reason the client is told (in the reply's `reason`, or the 401's body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    reason: String,
}

impl Denied {
    /// A refusal the client is told `reason` for.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// What the client is told.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The application's side of the fanout protocol: authentication and authorization.
///
/// Every method has a default that refuses, so an implementation allows exactly what it
/// says: a protocol route is closed until the application opens it. [`Permissive`] allows
/// everything, for demos and tests.
///
/// ```
/// use std::time::Duration;
/// use axum::http::request::Parts;
/// use axum_fanout::RoomName;
/// use axum_fanout::protocol::{Authorize, Denied, Grant};
///
/// /// Users sign in with a session cookie; each may join only rooms named after them or
/// /// `public-*`, and publish only to `public-*`.
/// struct Sessions;
///
/// impl Authorize for Sessions {
///     async fn connect(&self, request: &Parts) -> Result<Option<Grant>, Denied> {
///         let cookie = request.headers.get("cookie").and_then(|c| c.to_str().ok());
///         match cookie.and_then(|c| c.strip_prefix("session=")) {
///             // A real application looks the session up.
///             Some(user) => Ok(Some(Grant::new(user).expires_in(Duration::from_secs(3600)))),
///             None => Ok(None), // the client sends a `connect` command with a token
///         }
///     }
///
///     async fn may_join(&self, user: &str, room: &RoomName) -> Result<(), Denied> {
///         if room.as_str() == user || room.as_str().starts_with("public-") {
///             Ok(())
///         } else {
///             Err(Denied::new("not your room"))
///         }
///     }
/// }
/// ```
pub trait Authorize: Send + Sync + 'static {
    /// Authenticates the upgrade request (its cookies, headers, query): `Ok(Some(grant))`
    /// connects the socket as `grant`'s user; `Ok(None)` upgrades it unauthenticated, and its
    /// first command must be `connect` with a token ([`connect_token`](Authorize::connect_token));
    /// `Err` answers the upgrade 401 with the reason.
    ///
    /// Defaults to `Ok(None)`.
    fn connect(
        &self,
        request: &Parts,
    ) -> impl Future<Output = Result<Option<Grant>, Denied>> + Send {
        let _ = request;
        async { Ok(None) }
    }

    /// Authenticates a `connect` command's `token` (any JSON value the client sent), which
    /// keeps credentials out of URLs and access logs.
    ///
    /// Defaults to refusing.
    fn connect_token(&self, token: &Value) -> impl Future<Output = Result<Grant, Denied>> + Send {
        let _ = token;
        async { Err(Denied::new("connect with a token is not enabled")) }
    }

    /// Whether `user` may join `room` (also asked before a `history` or `presence` read).
    ///
    /// Defaults to refusing.
    fn may_join(
        &self,
        user: &str,
        room: &RoomName,
    ) -> impl Future<Output = Result<(), Denied>> + Send {
        let _ = (user, room);
        async { Err(Denied::new("joining is not enabled")) }
    }

    /// Whether `user` may publish `payload` to `room`, and what to publish: `payload` as it
    /// is, or a rewritten one (a server timestamp, the sender's name, a sanitized text).
    ///
    /// Defaults to refusing.
    fn may_publish(
        &self,
        user: &str,
        room: &RoomName,
        payload: Payload,
    ) -> impl Future<Output = Result<Payload, Denied>> + Send {
        let _ = (user, room, payload);
        async { Err(Denied::new("publishing is not enabled")) }
    }

    /// New credentials (`token`) for `user`'s socket before the old ones expire: when they
    /// expire from now (`None`: never). `Err` leaves the old expiry standing.
    ///
    /// Defaults to refusing.
    fn refresh(
        &self,
        user: &str,
        token: &Value,
    ) -> impl Future<Output = Result<Option<Duration>, Denied>> + Send {
        let _ = (user, token);
        async { Err(Denied::new("refresh is not enabled")) }
    }
}

/// Allows everything: for demos and tests, never for an application with users.
///
/// The upgrade connects as the `user` query parameter (`/fanout?user=ada`, with an optional
/// `&expires_in=S` in seconds); without one the client sends `connect`, whose token names the
/// user (`"ada"` or `{"user":"ada","expires_in":S}`; anything else: a guest with a random
/// name). A `refresh` token may carry `"expires_in"` too. That is how tests make credentials
/// expire.
#[derive(Debug, Clone, Copy, Default)]
pub struct Permissive;

fn expires_in(token: &Value) -> Option<Duration> {
    token
        .get("expires_in")
        .and_then(Value::as_f64)
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64)
}

impl Authorize for Permissive {
    async fn connect(&self, request: &Parts) -> Result<Option<Grant>, Denied> {
        let query = request.uri.query().unwrap_or("");
        let (mut user, mut expiry) = (None, None);
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "user" if !value.is_empty() => user = Some(value.into_owned()),
                "expires_in" => expiry = value.parse::<u64>().ok().filter(|s| *s > 0),
                _ => {}
            }
        }
        let Some(user) = user else {
            return Ok(None);
        };
        let grant = Grant::new(user);
        Ok(Some(match expiry {
            Some(s) => grant.expires_in(Duration::from_secs(s)),
            None => grant,
        }))
    }

    async fn connect_token(&self, token: &Value) -> Result<Grant, Denied> {
        let user = token
            .as_str()
            .or_else(|| token.get("user").and_then(Value::as_str))
            .filter(|u| !u.is_empty());
        let grant = match user {
            Some(user) => Grant::new(user),
            None => Grant::new(format!("guest-{:016x}", crate::random::u64())),
        };
        Ok(match expires_in(token) {
            Some(d) => grant.expires_in(d),
            None => grant,
        })
    }

    async fn may_join(&self, _user: &str, _room: &RoomName) -> Result<(), Denied> {
        Ok(())
    }

    async fn may_publish(
        &self,
        _user: &str,
        _room: &RoomName,
        payload: Payload,
    ) -> Result<Payload, Denied> {
        Ok(payload)
    }

    async fn refresh(&self, _user: &str, token: &Value) -> Result<Option<Duration>, Denied> {
        Ok(expires_in(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Parts {
        let request = axum::http::Request::builder().uri(uri).body(());
        request
            .map(|r| r.into_parts().0)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn the_default_is_closed_but_lets_a_socket_wait_for_a_connect() {
        struct Closed;
        impl Authorize for Closed {}
        let room = RoomName::new("r").expect("valid");
        assert_eq!(Closed.connect(&parts("/f?user=a")).await, Ok(None));
        assert!(Closed.connect_token(&Value::Null).await.is_err());
        assert!(Closed.may_join("a", &room).await.is_err());
        assert!(
            Closed
                .may_publish("a", &room, Payload::text("x"))
                .await
                .is_err()
        );
        assert!(Closed.refresh("a", &Value::Null).await.is_err());
    }

    #[tokio::test]
    async fn permissive_takes_the_user_and_expiry_from_the_query_decoded() {
        let grant = Permissive
            .connect(&parts("/f?user=ada%20l&expires_in=5"))
            .await;
        let expected = Grant::new("ada l").expires_in(Duration::from_secs(5));
        assert_eq!(grant, Ok(Some(expected)));
        assert_eq!(Permissive.connect(&parts("/f")).await, Ok(None));
        let token = serde_json::json!({"user": "bo", "expires_in": 2});
        let grant = Permissive.connect_token(&token).await;
        assert_eq!(
            grant,
            Ok(Grant::new("bo").expires_in(Duration::from_secs(2)))
        );
        let guest = Permissive.connect_token(&Value::Null).await;
        assert!(guest.is_ok_and(|g| g.user().starts_with("guest-")));
    }
}
