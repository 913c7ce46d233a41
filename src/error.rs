//! The crate's one fallible-operation error, plus the small errors at its edges.

use std::error::Error as StdError;
use std::fmt;

type BoxError = Box<dyn StdError + Send + Sync>;

/// An error from a fan-out operation: joining a room, broadcasting, building the layer.
///
/// The error is opaque on purpose: match on it with the `is_*` predicates, which stay stable
/// while the causes behind them change. [`source`](StdError::source) carries the underlying
/// cause (a Redis error, an invalid room name, ...) when there is one.
///
/// Its `Display` says what failed and, when the cause is what the caller has to fix, why
/// (`limit reached: a socket may be in at most 100 rooms`). A failure elsewhere (a Redis error,
/// a timeout, the transport) is shown as what failed only, its cause left to `source`.
pub struct Error {
    kind: Kind,
    source: Option<BoxError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The Redis URL could not be parsed.
    InvalidUrl,
    /// A room name failed validation.
    InvalidRoom,
    /// A payload could not be carried (e.g. `Payload::json` given text that is not JSON).
    InvalidPayload,
    /// Redis answered with an error, or the connection failed mid-command.
    Redis,
    /// Redis did not answer (or was unreachable) within the configured deadline.
    Timeout,
    /// The socket or the node is closed; nothing more can be done with it.
    Closed,
    /// A message from the client exceeded the configured size limit.
    MessageTooBig,
    /// The WebSocket transport failed.
    WebSocket,
    /// A per-socket limit was reached (rooms per socket, messages per second).
    Limit,
    /// A presence member (user id or info) failed validation.
    InvalidMember,
    /// Presence was asked of a room (or a deployment) that does not have it.
    PresenceOff,
    /// A history operation on a room that is not durable.
    NotDurable,
    /// An argument of a fleet-wide user command (a close code or reason, an expiry) is unusable.
    InvalidArgument,
}

impl Error {
    fn new(kind: Kind) -> Self {
        Self { kind, source: None }
    }

    fn with(kind: Kind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    // Named constructors, one per way an operation fails (as hyper's `error.rs` does): the
    // message a user reads is written once, here, whatever module reports it.

    /// The Redis URL (or a TLS or cluster setting that goes with it) is unusable.
    pub(crate) fn invalid_url(why: impl Into<BoxError>) -> Self {
        Self::with(Kind::InvalidUrl, why)
    }

    /// The layer was built leniently from an invalid URL: this node never connects.
    pub(crate) fn no_redis() -> Self {
        Self::with(
            Kind::InvalidUrl,
            "the layer was built without a usable one (FanoutLayer::builder(..).build() reports why)",
        )
    }

    pub(crate) fn invalid_room(e: crate::room::InvalidRoomName) -> Self {
        Self::with(Kind::InvalidRoom, e)
    }

    pub(crate) fn invalid_payload(why: impl Into<BoxError>) -> Self {
        Self::with(Kind::InvalidPayload, why)
    }

    /// An envelope over `max_envelope_bytes`.
    pub(crate) fn envelope_too_large(len: usize, max: usize) -> Self {
        Self::invalid_payload(format!(
            "the envelope would be {len} bytes; the limit is {max} (max_envelope_bytes)"
        ))
    }

    /// Redis answered a command with an error, or the connection failed under it.
    pub(crate) fn redis(cause: impl Into<BoxError>) -> Self {
        Self::with(Kind::Redis, cause)
    }

    /// A broadcast got no reply within the publish timeout; `connected` says whether there was
    /// a connection to wait on at all.
    pub(crate) fn publish_timeout(connected: bool, command: &str) -> Self {
        let why = if connected {
            format!("redis did not reply to {command} in time")
        } else {
            "no connection to redis (it is down or unreachable)".to_owned()
        };
        Self::with(Kind::Timeout, why)
    }

    /// A join whose SUBSCRIBE Redis did not confirm within the subscribe timeout.
    pub(crate) fn subscribe_timeout(room: &str) -> Self {
        Self::with(
            Kind::Timeout,
            format!("redis did not confirm SUBSCRIBE for room {room:?} in time"),
        )
    }

    /// The socket is closing, or the node is shutting down or gone.
    pub(crate) fn closed() -> Self {
        Self::new(Kind::Closed)
    }

    pub(crate) fn message_too_big(cause: impl Into<BoxError>) -> Self {
        Self::with(Kind::MessageTooBig, cause)
    }

    pub(crate) fn websocket(cause: impl Into<BoxError>) -> Self {
        Self::with(Kind::WebSocket, cause)
    }

    /// A join beyond `max_rooms_per_socket`.
    pub(crate) fn too_many_rooms(max: usize) -> Self {
        Self::with(
            Kind::Limit,
            format!("a socket may be in at most {max} rooms"),
        )
    }

    /// A client over the message rate limit (closed with 1008 and `reason`).
    pub(crate) fn rate_limited(reason: &'static str) -> Self {
        Self::with(Kind::Limit, reason)
    }

    /// A presence [`Member`](crate::presence::Member) was rejected: an empty, too long or odd user id,
    /// or info that is not small JSON.
    pub(crate) fn invalid_member(why: impl Into<BoxError>) -> Self {
        Self::with(Kind::InvalidMember, why)
    }

    /// Presence asked of a room that was not opted in (`FanoutBuilder::presence`).
    pub(crate) fn presence_off(why: impl Into<BoxError>) -> Self {
        Self::with(Kind::PresenceOff, why)
    }

    /// A presence change or query Redis did not confirm within the subscribe timeout.
    pub(crate) fn presence_timeout(room: &str) -> Self {
        Self::with(
            Kind::Timeout,
            format!("redis did not confirm the presence of room {room:?} in time"),
        )
    }

    /// A history operation (a durable join, a history read) on a room that is not durable:
    /// see [`FanoutBuilder::durable`](crate::FanoutBuilder::durable).
    pub(crate) fn not_durable(room: &str) -> Self {
        Self::with(
            Kind::NotDurable,
            format!("room {room:?} keeps no history (FanoutBuilder::durable)"),
        )
    }

    /// An argument of a user command ([`crate::users`]) is unusable: a disconnect reason over
    /// the 123 bytes a close frame carries, a close code outside 4000..=4999, an expiry that
    /// is not in the future. Nothing was done.
    pub(crate) fn invalid_argument(why: impl Into<BoxError>) -> Self {
        Self::with(Kind::InvalidArgument, why)
    }

    /// An argument of a user command was unusable (see [`crate::users`]); nothing was done.
    pub fn is_invalid_argument(&self) -> bool {
        self.kind == Kind::InvalidArgument
    }

    /// The room is not durable on this node, so it has no history to read or resume from.
    pub fn is_not_durable(&self) -> bool {
        self.kind == Kind::NotDurable
    }

    /// The Redis URL given to the layer could not be parsed.
    pub fn is_invalid_url(&self) -> bool {
        self.kind == Kind::InvalidUrl
    }

    /// A room name was rejected; the source is an [`InvalidRoomName`](crate::InvalidRoomName).
    pub fn is_invalid_room(&self) -> bool {
        self.kind == Kind::InvalidRoom
    }

    /// A payload could not be carried, e.g. raw JSON that does not parse.
    pub fn is_invalid_payload(&self) -> bool {
        self.kind == Kind::InvalidPayload
    }

    /// Redis replied with an error or dropped the connection while a command was in flight.
    pub fn is_redis(&self) -> bool {
        self.kind == Kind::Redis
    }

    /// Redis did not confirm in time: it is down, unreachable or overloaded.
    ///
    /// Nothing was delivered for a timed-out `join`. A timed-out broadcast is an unknown
    /// outcome, not a failure to deliver: one still queued at its deadline is never sent, but
    /// one already written to a Redis that froze runs when Redis wakes and reaches the sockets
    /// of the nodes whose link survived (the others are told a [`Missed`](crate::Missed) window
    /// that covers it). Retry only what receivers can tell apart.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// The socket (or the node) is closed.
    pub fn is_closed(&self) -> bool {
        self.kind == Kind::Closed
    }

    /// A client message exceeded the size limit; the socket was closed with 1009.
    pub fn is_message_too_big(&self) -> bool {
        self.kind == Kind::MessageTooBig
    }

    /// The WebSocket transport failed (reset, protocol error, ...).
    pub fn is_websocket(&self) -> bool {
        self.kind == Kind::WebSocket
    }

    /// A per-socket limit was reached: too many rooms for one socket, or a client sending
    /// faster than the message rate limit (the socket was then closed with 1008).
    pub fn is_limit(&self) -> bool {
        self.kind == Kind::Limit
    }

    /// A presence [`Member`](crate::presence::Member) or a user id (a socket's
    /// [`identify`](crate::FanoutSocket::identify), a user command) was rejected.
    pub fn is_invalid_member(&self) -> bool {
        self.kind == Kind::InvalidMember
    }

    /// Presence was asked of a room without it: opt the room in with
    /// [`FanoutBuilder::presence`](crate::FanoutBuilder::presence) or
    /// [`FanoutBuilder::room_presence`](crate::FanoutBuilder::room_presence).
    pub fn is_presence_off(&self) -> bool {
        self.kind == Kind::PresenceOff
    }

    /// Whether the cause is what the caller has to fix (a rule broken, a limit, a setting
    /// missing): then `Display` shows it. The other kinds' causes are failures of something
    /// else (Redis, the network, the transport), which `source` carries.
    fn cause_explains(&self) -> bool {
        match self.kind {
            Kind::InvalidUrl
            | Kind::InvalidRoom
            | Kind::InvalidPayload
            | Kind::Limit
            | Kind::InvalidMember
            | Kind::PresenceOff
            | Kind::NotDurable
            | Kind::InvalidArgument => true,
            Kind::Redis | Kind::Timeout | Kind::Closed | Kind::MessageTooBig | Kind::WebSocket => {
                false
            }
        }
    }

    fn description(&self) -> &'static str {
        match self.kind {
            Kind::InvalidUrl => "invalid redis url",
            Kind::InvalidRoom => "invalid room name",
            Kind::InvalidPayload => "invalid payload",
            Kind::Redis => "redis command failed",
            Kind::Timeout => "redis did not answer in time",
            Kind::Closed => "socket closed",
            Kind::MessageTooBig => "message exceeds the size limit",
            Kind::WebSocket => "websocket transport error",
            Kind::Limit => "limit reached",
            Kind::InvalidMember => "invalid presence member",
            Kind::PresenceOff => "presence is off for this room",
            Kind::NotDurable => "room is not durable",
            Kind::InvalidArgument => "invalid argument",
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_tuple("axum_fanout::Error");
        d.field(&self.kind);
        if let Some(source) = &self.source {
            d.field(source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())?;
        // Hyper's rule, "Display never repeats its source", suits causes that are someone
        // else's failure, which a reporter walking `source()` shows. It hid the answer here:
        // most callers print `{e}` alone (a close reason, an HTTP body, a log field), and a
        // client was told "invalid room name" for `a:shard1` with nothing saying which rule
        // it broke. So a cause that is the caller's to fix is part of the message. `source()`
        // still returns it (an `InvalidRoomName` stays reachable), so a reporter that prints
        // the whole chain shows it twice for these kinds: the lesser cost.
        match &self.source {
            Some(cause) if self.cause_explains() => write!(f, ": {cause}"),
            _ => Ok(()),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_ref()
            .map(|e| &**e as &(dyn StdError + 'static))
    }
}

impl From<crate::room::InvalidRoomName> for Error {
    fn from(e: crate::room::InvalidRoomName) -> Self {
        Error::invalid_room(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_leaves_a_failure_elsewhere_to_the_source() {
        let e = Error::redis("connection refused");
        assert_eq!(e.to_string(), "redis command failed");
        assert_eq!(
            e.source().map(|s| s.to_string()).as_deref(),
            Some("connection refused")
        );
        assert!(e.is_redis() && !e.is_timeout());
        assert_eq!(
            Error::publish_timeout(false, "PUBLISH").to_string(),
            "redis did not answer in time"
        );
    }

    #[test]
    fn display_says_which_rule_a_caller_broke() {
        let e = Error::from(crate::room::RoomName::new("a:shard1").expect_err("reserved"));
        assert_eq!(
            e.to_string(),
            "invalid room name: room name \"a:shard1\" ends in `:shard<N>`, which is reserved \
             for shard channels"
        );
        let cause = e.source().expect("the rule, as the source too");
        assert!(cause.is::<crate::room::InvalidRoomName>(), "{cause:?}");

        assert_eq!(
            Error::too_many_rooms(2).to_string(),
            "limit reached: a socket may be in at most 2 rooms"
        );
        assert_eq!(
            Error::not_durable("chat").to_string(),
            "room is not durable: room \"chat\" keeps no history (FanoutBuilder::durable)"
        );
        assert_eq!(
            Error::envelope_too_large(10, 8).to_string(),
            "invalid payload: the envelope would be 10 bytes; the limit is 8 (max_envelope_bytes)"
        );
        assert_eq!(Error::closed().to_string(), "socket closed");
    }
}
