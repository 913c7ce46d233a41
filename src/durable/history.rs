//! What a read of a durable room's history found: the raw [`Page`] from Redis, whether it
//! covers a position, and the [`History`] a handler gets.

use super::rooms::Durable;
use crate::envelope::Payload;
use crate::position::{Position, Unrecoverable};
use crate::room::RoomName;

/// Messages read from a durable room's history, with the room's current position. From
/// [`RoomHandle::history`](crate::RoomHandle::history) and
/// [`RoomHandle::history_since`](crate::RoomHandle::history_since).
#[derive(Debug, Clone)]
pub struct History {
    room: RoomName,
    position: Position,
    messages: Vec<(u64, Payload)>,
    failure: Option<Unrecoverable>,
}

impl History {
    /// The room read.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// The room's position when it was read: its epoch and the seq of its last message.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The messages, oldest first, each with its seq in [`position`](History::position)'s
    /// epoch. Empty when [`failure`](History::failure) says why.
    pub fn messages(&self) -> &[(u64, Payload)] {
        &self.messages
    }

    /// For [`history_since`](crate::RoomHandle::history_since): why the messages after the
    /// position cannot be read (nothing is returned then).
    pub fn failure(&self) -> Option<Unrecoverable> {
        self.failure
    }
}

/// A room's history as read from Redis: its epoch, its current top seq, and the entries read
/// (raw envelopes, oldest first).
#[derive(Debug, Clone)]
pub(crate) struct Page {
    pub(crate) top: Position,
    pub(crate) entries: Vec<(u64, Vec<u8>)>,
}

impl Page {
    /// Whether this page holds every message after `since`, up to its top; why not otherwise.
    /// The reader asks for at most `limit` entries after `since`.
    pub(crate) fn covers(&self, since: &Position, limit: usize) -> Result<(), Unrecoverable> {
        if since.epoch() != self.top.epoch() || since.seq() > self.top.seq() {
            return Err(Unrecoverable::EpochChanged);
        }
        let behind = self.top.seq() - since.seq();
        if behind > limit as u64 {
            return Err(Unrecoverable::TooFarBehind);
        }
        let contiguous = self
            .entries
            .iter()
            .zip(since.seq() + 1..)
            .all(|((seq, _), want)| *seq == want);
        if self.entries.len() as u64 != behind || !contiguous {
            return Err(Unrecoverable::Trimmed);
        }
        Ok(())
    }
}

impl Durable {
    /// A history read's result: `page`'s messages (all of them after `since`, when there are,
    /// or none and why not).
    pub(crate) fn history(&self, room: &RoomName, page: Page, since: Option<&Position>) -> History {
        let limit = self.settings(room.as_str()).replay_limit.get();
        let failure = since.and_then(|since| page.covers(since, limit).err());
        let messages = match failure {
            Some(_) => Vec::new(),
            None => page
                .entries
                .iter()
                .filter_map(|(seq, raw)| Some((*seq, self.decode(room, raw)?.into_payload())))
                .collect(),
        };
        History {
            room: room.clone(),
            position: page.top,
            messages,
            failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_say_why_they_cannot_cover_a_position() {
        let page = Page {
            top: Position::new("e", 10),
            entries: (8..=10).map(|s| (s, Vec::new())).collect(),
        };
        assert_eq!(page.covers(&Position::new("e", 7), 5), Ok(()));
        assert_eq!(
            page.covers(&Position::new("x", 7), 5),
            Err(Unrecoverable::EpochChanged)
        );
        assert_eq!(
            page.covers(&Position::new("e", 11), 5),
            Err(Unrecoverable::EpochChanged)
        );
        assert_eq!(
            page.covers(&Position::new("e", 2), 5),
            Err(Unrecoverable::TooFarBehind)
        );
        assert_eq!(
            page.covers(&Position::new("e", 6), 5),
            Err(Unrecoverable::Trimmed)
        );
    }
}
