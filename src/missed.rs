//! What a membership learns when some of its room's messages may not have reached it.
//!
//! Redis pub/sub is at-most-once: while a node's subscriber link is down, or when the node sheds
//! load, messages are lost. They are never lost silently: every affected socket gets a
//! [`Missed`] through [`FanoutSocket::recv_event`](crate::FanoutSocket::recv_event), so the application can
//! resync (reload history, tell the user). This is the same contract as tokio's broadcast
//! channel, whose receivers learn they lagged.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::room::RoomName;

/// Messages of `room` between `since` and `until` may not have reached this socket.
///
/// Causes: the node's Redis link was down (then `dropped` is `None`: nobody knows how many
/// were published meanwhile), the node shed load, or this socket's queue was full and its
/// overflow policy dropped frames (then `dropped` counts them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    pub(crate) room: RoomName,
    pub(crate) since: SystemTime,
    pub(crate) until: SystemTime,
    pub(crate) dropped: Option<u64>,
}

impl Missed {
    /// The room whose messages may be missing.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// Start of the window (when the link dropped, or the first drop).
    pub fn since(&self) -> SystemTime {
        self.since
    }

    /// End of the window (when the link was back and resubscribed, or the last drop).
    pub fn until(&self) -> SystemTime {
        self.until
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

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl fmt::Display for Missed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "messages of room {:?} may have been missed between {} and {} ms since the epoch",
            self.room.as_str(),
            unix_ms(self.since),
            unix_ms(self.until)
        )?;
        if let Some(n) = self.dropped {
            write!(f, " ({n} dropped)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Missed {}
