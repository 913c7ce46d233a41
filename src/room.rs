//! Validated room names.
//!
//! A room name ends up inside a Redis channel name (`<prefix><room>`, or
//! `<prefix><room>:shard<N>` once a room is split over shards), in log lines and in the envelope.
//! Validating it once, at the edge, keeps every layer below free of checks.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The longest room name accepted, in bytes.
///
/// Long enough for UUIDs and composite keys (`tenant:42:channel:general`), short enough that a
/// client cannot make every envelope and channel name carry kilobytes of room name.
pub const MAX_ROOM_LEN: usize = 128;

/// A room name that is safe to use as part of a Redis channel name.
///
/// Rules, checked by [`RoomName::new`]:
/// - 1 to [`MAX_ROOM_LEN`] bytes of UTF-8;
/// - no control characters (they break log lines and `redis-cli` output);
/// - it does not end in `:shard<digits>`, the suffix that names the channels of a sharded room.
///   Without this rule the room `42:shard1` and shard 1 of room `42` would share the channel
///   `ws:room:42:shard1`, and each would receive the other's messages.
///
/// Cloning is cheap (reference counted).
///
/// ```
/// use axum_fanout::RoomName;
///
/// assert!(RoomName::new("lobby").is_ok());
/// assert!(RoomName::new("").is_err());
/// assert!(RoomName::new("bad\nname").is_err());
/// assert!(RoomName::new("42:shard1").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `name` and wraps it.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidRoomName> {
        let name = name.as_ref();
        validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The node's internal room of a user's sockets (`crate::users`): the user id behind
    /// [`USER_MARK`], a control character no valid room name holds, so no client can name it.
    pub(crate) fn of_user(user: &str) -> Self {
        let mut name = String::with_capacity(user.len() + 1);
        name.push(USER_MARK);
        name.push_str(user);
        Self(Arc::from(name))
    }

    /// Whether this is a user's internal room rather than one of the application's.
    pub(crate) fn is_user(&self) -> bool {
        user_of(&self.0).is_some()
    }
}

/// Marks a user's internal room: sockets of a user are registered in it, so that the user's
/// channel shares the registry, subscriptions, reconnects and loss notices with rooms.
pub(crate) const USER_MARK: char = '\u{1}';

/// The user whose internal room `room` is, if it is one.
pub(crate) fn user_of(room: &str) -> Option<&str> {
    room.strip_prefix(USER_MARK)
}

fn validate(name: &str) -> Result<(), InvalidRoomName> {
    let reason = if name.is_empty() {
        Reason::Empty
    } else if name.len() > MAX_ROOM_LEN {
        Reason::TooLong(name.len())
    } else if name.chars().any(char::is_control) {
        Reason::ControlCharacter
    } else if has_shard_suffix(name) {
        Reason::ShardSuffix
    } else {
        return Ok(());
    };
    Err(InvalidRoomName {
        name: truncate(name),
        reason,
    })
}

/// `true` when `name` ends in `:shard` followed by one or more ASCII digits.
pub(crate) fn has_shard_suffix(name: &str) -> bool {
    let digits = name.bytes().rev().take_while(u8::is_ascii_digit).count();
    digits > 0 && name[..name.len() - digits].ends_with(":shard")
}

fn truncate(name: &str) -> String {
    // Keep the error message (which may be logged or sent as a close reason) short and on one line.
    name.chars()
        .take(32)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RoomName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for RoomName {
    type Error = InvalidRoomName;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for RoomName {
    type Error = InvalidRoomName;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// A room name was rejected by [`RoomName::new`].
///
/// The message names the rule that failed, so it can go back to the client as-is (it fits in a
/// WebSocket close reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRoomName {
    name: String,
    reason: Reason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Empty,
    TooLong(usize),
    ControlCharacter,
    ShardSuffix,
}

impl fmt::Display for InvalidRoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Empty => f.write_str("room name is empty"),
            Reason::TooLong(len) => {
                write!(f, "room name is {len} bytes, the limit is {MAX_ROOM_LEN}")
            }
            Reason::ControlCharacter => {
                write!(f, "room name {:?} contains a control character", self.name)
            }
            Reason::ShardSuffix => write!(
                f,
                "room name {:?} ends in `:shard<N>`, which is reserved for shard channels",
                self.name
            ),
        }
    }
}

impl std::error::Error for InvalidRoomName {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "lobby",
            "42",
            "tenant:7:general",
            "café ☕",
            "shard1",
            "a:shard",
            "x:shardy1",
        ] {
            assert!(RoomName::new(name).is_ok(), "{name}");
        }
        assert!(RoomName::new("x".repeat(MAX_ROOM_LEN)).is_ok());
    }

    #[test]
    fn rejects_each_rule_with_a_message_naming_it() {
        let cases = [
            ("", "empty"),
            (&*"x".repeat(MAX_ROOM_LEN + 1), "limit is 128"),
            ("a\u{0}b", "control character"),
            ("a\rb", "control character"),
            ("42:shard1", "reserved for shard channels"),
            ("42:shard007", "reserved for shard channels"),
        ];
        for (name, needle) in cases {
            let err = RoomName::new(name).expect_err(name);
            assert!(err.to_string().contains(needle), "{name:?}: {err}");
        }
    }

    #[test]
    fn error_message_stays_short_and_on_one_line() {
        let err = RoomName::new(format!("{}\n", "y".repeat(500))).expect_err("too long");
        let msg = err.to_string();
        assert!(msg.len() < 123, "fits a close reason: {msg}");
        assert!(!msg.contains('\n'));
    }
}
