//! What the presence API takes and gives: who a socket is in a room, and a room's members as
//! Redis lists or counts them.

use std::fmt;

use serde::Serialize;

use crate::envelope::Payload;
use crate::error::Error;

/// Longest user id, in bytes: ids travel in every join and leave event and in every snapshot.
pub const MAX_USER_LEN: usize = 256;

/// Largest member info, in bytes of JSON text: it travels in every join event and snapshot, so
/// it is meant for a display name or an avatar URL, not a profile.
pub const MAX_INFO_LEN: usize = 1024;

/// Who a socket is in a presence room: an application-given user id, plus optional small
/// application info (a JSON value, at most [`MAX_INFO_LEN`] bytes) that every member sees.
///
/// Several sockets with the same user id (tabs, devices, sockets on other nodes) are one member
/// of the room, with a connection count.
///
/// ```
/// use axum_fanout::presence::Member;
///
/// # fn main() -> Result<(), axum_fanout::Error> {
/// let alice = Member::new("alice")?.info(r##"{"name":"Alice","color":"#e33"}"##)?;
/// assert_eq!(alice.user(), "alice");
/// assert!(Member::new("").is_err());
/// assert!(Member::new("bob")?.info("not json").is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Member {
    pub(super) user: String,
    pub(super) info: Option<Box<str>>,
}

impl Member {
    /// A member named `user`: 1 to [`MAX_USER_LEN`] bytes, no control characters. Fails with
    /// [`Error::is_invalid_member`] otherwise.
    pub fn new(user: impl Into<String>) -> Result<Self, Error> {
        let user = user.into();
        if user.is_empty() || user.len() > MAX_USER_LEN {
            return Err(Error::invalid_member(format!(
                "a user id must be 1 to {MAX_USER_LEN} bytes, not {}",
                user.len()
            )));
        }
        if user.chars().any(char::is_control) {
            return Err(Error::invalid_member(
                "a user id must not hold control characters",
            ));
        }
        Ok(Self { user, info: None })
    }

    /// Attaches application info: one JSON value of at most [`MAX_INFO_LEN`] bytes, shown to
    /// every member in join events and snapshots. Fails with [`Error::is_invalid_member`] when
    /// it is not JSON or too large.
    pub fn info(mut self, json: impl Into<String>) -> Result<Self, Error> {
        let json = json.into();
        if json.len() > MAX_INFO_LEN {
            return Err(Error::invalid_member(format!(
                "member info is {} bytes; the limit is {MAX_INFO_LEN}",
                json.len()
            )));
        }
        // Checked as JSON here, so Redis's scripts can splice it into events as it is.
        Payload::raw_json(json.as_str())
            .map_err(|_| Error::invalid_member("member info must be one JSON value"))?;
        self.info = Some(json.into_boxed_str());
        Ok(self)
    }

    /// The user id.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("user", &self.user)
            .field("info", &self.info.as_deref())
            .finish()
    }
}

/// One member of a room, as [`RoomHandle::presence`](crate::RoomHandle::presence) lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemberEntry {
    /// The user id.
    pub user: String,
    /// Open sockets of this user in the room, over every live node.
    pub connections: u64,
    /// The info of the user's most recent socket to join, as JSON text, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
}

/// A room's members at one version: what [`RoomHandle::presence`](crate::RoomHandle::presence)
/// returns.
///
/// ## Versions
/// Every join and leave event of a room carries the room's presence `version`, which grows by
/// one per event; a snapshot carries the version of the last event it reflects. A client that
/// joins the room first, then fetches a snapshot, applies the events whose version is greater
/// than the snapshot's and ignores the others: it then neither misses nor counts twice a
/// change. Versions keep growing when Redis loses its data (they start from Redis's clock in
/// microseconds), so a snapshot taken after that is never older than an event seen before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The room.
    pub room: String,
    /// The version of the last join or leave event this snapshot reflects.
    pub version: u64,
    /// Every member on every live node, sorted by user id.
    pub members: Vec<MemberEntry>,
}

/// A room's member count, from [`RoomHandle::presence_count`](crate::RoomHandle::presence_count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Count {
    /// Members (distinct users) on every live node.
    pub members: u64,
    /// As in [`Snapshot::version`].
    pub version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str) -> Member {
        Member::new(user).expect("valid")
    }

    #[test]
    fn member_ids_and_info_are_bounded() {
        assert!(Member::new("x".repeat(MAX_USER_LEN)).is_ok());
        assert!(
            Member::new("x".repeat(MAX_USER_LEN + 1))
                .expect_err("too long")
                .is_invalid_member()
        );
        assert!(Member::new("a\nb").is_err());
        let big = format!("\"{}\"", "x".repeat(MAX_INFO_LEN));
        assert!(member("a").info(big).is_err());
        assert!(member("a").info("{\"n\":1}").is_ok());
    }
}
