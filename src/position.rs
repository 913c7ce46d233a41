//! [`Position`]: where a message sits in a durable room's history, and why a resume can fail.
//!
//! A position is `(epoch, seq)`. `seq` counts the room's messages, 1, 2, 3, ... with no gap;
//! `epoch` names the history those numbers belong to, and changes whenever that history was
//! lost (Redis restarted without persistence, the room's keys expired or were evicted), so a
//! position from a lost history is never mistaken for one in the new history. Its text form is
//! `EPOCH:SEQ`, what a client keeps and sends back to resume.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A message's place in a durable room's history: the history's epoch and the message's seq.
///
/// `seq` 0 is the position of a room before its first message. The text form is `EPOCH:SEQ`:
///
/// ```
/// use axum_fanout::durable::Position;
///
/// let p: Position = "3f2a9c:42".parse()?;
/// assert_eq!((p.epoch(), p.seq()), ("3f2a9c", 42));
/// assert_eq!(p.to_string(), "3f2a9c:42");
/// assert!("no-seq".parse::<Position>().is_err());
/// # Ok::<(), axum_fanout::durable::InvalidPosition>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    epoch: Arc<str>,
    seq: u64,
}

impl Position {
    /// The position `seq` of the history named `epoch`.
    pub fn new(epoch: impl Into<Arc<str>>, seq: u64) -> Self {
        Self {
            epoch: epoch.into(),
            seq,
        }
    }

    /// The name of the room's history this position belongs to.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The message's number in its history, from 1 (0: before the first message).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The same epoch at another seq.
    pub(crate) fn at(&self, seq: u64) -> Self {
        Self {
            epoch: self.epoch.clone(),
            seq,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

impl FromStr for Position {
    type Err = InvalidPosition;

    /// Reads `EPOCH:SEQ` (the last `:` separates them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidPosition(s.chars().take(64).collect());
        let (epoch, seq) = s.rsplit_once(':').ok_or_else(invalid)?;
        let seq = seq.parse().map_err(|_| invalid())?;
        if epoch.is_empty() {
            return Err(invalid());
        }
        Ok(Self::new(epoch, seq))
    }
}

/// A position that is not `EPOCH:SEQ` (from [`Position`]'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPosition(String);

impl fmt::Display for InvalidPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "position {:?} is not EPOCH:SEQ", self.0)
    }
}

impl std::error::Error for InvalidPosition {}

/// Why messages after a position cannot be replayed. Nothing is replayed then: the socket or
/// the caller learns the room's current position and continues from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unrecoverable {
    /// The position names a history that is gone (its epoch is not the room's epoch), or a
    /// seq the room never reached.
    EpochChanged,
    /// Messages right after the position were trimmed from the history (it keeps the last
    /// `history` messages of the room).
    Trimmed,
    /// The position is more than the replay limit behind the room's current position.
    TooFarBehind,
}

impl Unrecoverable {
    /// The reason as the wire contract spells it: `"epoch_changed"`, `"trimmed"` or
    /// `"too_far_behind"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrecoverable::EpochChanged => "epoch_changed",
            Unrecoverable::Trimmed => "trimmed",
            Unrecoverable::TooFarBehind => "too_far_behind",
        }
    }
}

impl fmt::Display for Unrecoverable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_at_the_last_colon() {
        let p: Position = "a:b:7".parse().expect("valid");
        assert_eq!((p.epoch(), p.seq()), ("a:b", 7));
        for bad in ["", "7", ":7", "e:", "e:-1", "e:x"] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
    }
}
