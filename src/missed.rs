//! What a membership learns when some of its room's messages may not have reached it.
//!
//! Redis pub/sub is at-most-once: while a node's subscriber link is down, or when the node sheds
//! load, messages are lost. They are never lost silently: every affected socket gets a
//! [`Missed`] through [`FanoutSocket::recv_event`](crate::FanoutSocket::recv_event), so the application can
//! resync (reload history, tell the user). This is the same contract as tokio's broadcast
//! channel, whose receivers learn they lagged.

use std::fmt;
use std::time::SystemTime;

use crate::room::RoomName;
use crate::time::unix_ms;

/// Messages of `room` between `since` and `until` may not have reached this socket.
///
/// Causes: the node's Redis link was down, stalled or dropped by Redis, or the node itself was
/// paused (then `dropped` is `None`: nobody knows how many were published meanwhile), the node
/// shed load, or this socket's queue was full and its overflow policy dropped frames (then
/// `dropped` counts them).
///
/// # The window covers the loss
/// Times are publish stamps (the envelope's `ts`, the publisher's wall clock). A link loss's
/// window starts no later than the last instant the node knew its link was delivering (the
/// stamp of the newest message it read, or the send time of the newest probe that came back),
/// less the publish timeout, the longest a broadcast waits in its publisher's queue; not when
/// the loss was noticed, which may be seconds later. It ends once the room's subscription is
/// confirmed again. So every message lost for this socket has its stamp inside the window, as
/// long as the fleet's clocks agree and its nodes share the publish timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    room: RoomName,
    since: SystemTime,
    until: SystemTime,
    dropped: Option<u64>,
}

impl Missed {
    pub(crate) fn new(
        room: RoomName,
        since: SystemTime,
        until: SystemTime,
        dropped: Option<u64>,
    ) -> Self {
        Self {
            room,
            since,
            until,
            dropped,
        }
    }

    /// The room whose messages may be missing. For a window of what was sent to the socket's
    /// user ([`user`](Missed::user) is `Some`), the node's internal name of that user's room:
    /// show `user()` instead.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// `Some(user)` when what may be missing was sent to the socket's user (direct messages and
    /// fleet commands, [`crate::users`]) rather than to a room.
    pub fn user(&self) -> Option<&str> {
        crate::room::user_of(self.room.as_str())
    }

    /// Start of the window (no later than the last instant the link was known to deliver, or
    /// the first drop).
    pub fn since(&self) -> SystemTime {
        self.since
    }

    /// End of the window (when the link was back and resubscribed, or the last drop).
    pub fn until(&self) -> SystemTime {
        self.until
    }

    /// [`since`](Missed::since) in milliseconds since the Unix epoch, the unit of the seed's
    /// envelope `ts` (what a loss notice to a browser carries).
    pub fn since_ms(&self) -> u64 {
        unix_ms(self.since)
    }

    /// [`until`](Missed::until) in milliseconds since the Unix epoch.
    pub fn until_ms(&self) -> u64 {
        unix_ms(self.until)
    }

    /// How many messages were dropped, when that is known.
    pub fn dropped(&self) -> Option<u64> {
        self.dropped
    }

    /// Widens this window with another one for the same room.
    pub(crate) fn merge(&mut self, other: &Missed) {
        self.since = self.since.min(other.since);
        self.until = self.until.max(other.until);
        self.dropped = match (self.dropped, other.dropped) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }
}

impl fmt::Display for Missed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "messages of room {:?} may have been missed between {} and {} ms since the epoch",
            self.room.as_str(),
            self.since_ms(),
            self.until_ms()
        )?;
        if let Some(n) = self.dropped {
            write!(f, " ({n} dropped)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Missed {}
