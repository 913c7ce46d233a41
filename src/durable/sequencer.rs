//! The room's sequencer.
//!
//! Per room the node remembers the last position it delivered. A live message with the next
//! seq is delivered; one with a seq already delivered is a duplicate and dropped; one further
//! ahead reveals a gap: the room's live messages are then held (at most the replay limit; more
//! are dropped and read back later, as they are in the history too), *one* read of the missing
//! range is asked of the bus, and when it comes back the range and then the held messages are
//! delivered in order. A gap the history cannot fill (trimmed, or the history was lost) is
//! reported to the room's members as [`Missed`](crate::Missed), as on a plain room. After the
//! subscriber link comes back, or a room's sharded subscription that Redis ended (its cluster
//! slot moved) is confirmed again where the slot now lives, the bus asks for the same repair
//! for each durable room that lost its subscription ([`Durable::repair_resubscribed`]).
//!
//! A history behind what the node delivered (a failover to a replica that had not received
//! the last writes: Redis replicates asynchronously) cannot fill the gap either: the repair
//! finds the room's top seq below the one asked after, reports it as unrecoverable, delivery
//! starts over from the next live message, and the bus moves the room to a new epoch (so the
//! lost seqs never name other messages).

use std::collections::VecDeque;

use axum::extract::ws::Message;

use super::history::Page;
use super::rooms::{Durable, Gate, Repair, RoomState, state_of};
use crate::envelope::Decoded;
use crate::position::{Position, Unrecoverable};
use crate::registry::{Dispatched, Offers, SocketId};
use crate::room::RoomName;

impl Durable {
    /// A live envelope of durable `room`, from the dispatcher: delivered in seq order, or held
    /// while a gap is read back. Never waits.
    pub(crate) fn on_live(&self, room: &str, decoded: Decoded, offers: &mut Offers) -> Dispatched {
        let mut rooms = self.lock();
        if let Some(state) = rooms.get_mut(room) {
            return self.sequence(state, decoded, offers);
        }
        // No local member: a message still on its way after the last one left. Remembering
        // its position would make the next subscription see a gap that no member missed.
        if !self.registry.has_members(room) {
            return Dispatched::default();
        }
        // The channel's room is a valid name (the dispatcher found it on a room channel).
        let Ok(name) = RoomName::new(room) else {
            return Dispatched::default();
        };
        self.sequence(state_of(&mut rooms, &name), decoded, offers)
    }

    fn sequence(&self, state: &mut RoomState, decoded: Decoded, offers: &mut Offers) -> Dispatched {
        let room = &state.name.clone();
        if let Some(held) = &mut state.repairing {
            if held.len() < self.settings(room.as_str()).replay_limit.get() {
                held.push_back(decoded);
            }
            // Else dropped here: it is in the history, and the next live message after the
            // repair reveals the gap again.
            return Dispatched::default();
        }
        let Some(pos) = decoded.pos.clone() else {
            // A seed node's envelope: delivered, not sequenced (it has no seq).
            return self.emit(state, &decoded, offers);
        };
        let skipped = state
            .known()
            .filter(|known| known.epoch() == pos.epoch() && pos.seq() > known.seq() + 1)
            .cloned();
        if let Some(after) = skipped {
            state.repairing = Some(VecDeque::from([decoded]));
            self.request_repair(room, after);
            return Dispatched::default();
        }
        match &state.last {
            Some(last) if last.epoch() == pos.epoch() && pos.seq() <= last.seq() => {
                Dispatched::default() // already delivered (replayed by a repair)
            }
            Some(last) if last.epoch() != pos.epoch() => {
                // The room's history was lost: what this node delivered before cannot be
                // related to what comes now.
                tracing::warn!(room = %room, old = %last, new = %pos, "durable room's history was lost (new epoch)");
                self.registry.tell_missed(room.as_str(), None);
                state.delivered(pos);
                self.emit(state, &decoded, offers)
            }
            _ => {
                state.delivered(pos);
                self.emit(state, &decoded, offers)
            }
        }
    }

    fn request_repair(&self, room: &RoomName, after: Position) {
        tracing::debug!(room = %room, after = %after, "reading a durable room's gap from its history");
        // The receiver lives as long as the node's bus; without it there is no one to read.
        let _ = self.repairs.send(Repair {
            room: room.clone(),
            after,
        });
    }

    /// Offers one message to every local member of `room`: the plain frame, or the positioned
    /// one, or into a resuming socket's held frames.
    fn emit(&self, state: &mut RoomState, decoded: &Decoded, offers: &mut Offers) -> Dispatched {
        let room = &state.name;
        let positioned = (!state.members.is_empty()).then(|| decoded.positioned());
        // Made once, for the room's fanout-protocol sockets (which carry many rooms).
        let mut framed = None;
        let mut frame_of = |outbox: &crate::queue::Outbox, positioned: &Option<Message>| {
            if outbox.is_framed() {
                Some(
                    framed
                        .get_or_insert_with(|| decoded.framed(room.as_str()))
                        .clone(),
                )
            } else {
                positioned.clone()
            }
        };
        let limit = self.settings(room.as_str()).replay_limit.get();
        let members = &mut state.members;
        self.registry.dispatch_with(
            room.as_str(),
            decoded.except.map(SocketId::from_wire),
            self.config.overflow_for(room.as_str()),
            offers,
            |id, outbox| match members.get_mut(&id) {
                None => frame_of(outbox, &Some(decoded.frame.clone())),
                Some(Gate::Open { through }) => {
                    if let (Some(t), Some(pos)) = (through.as_ref(), decoded.pos.as_ref()) {
                        if t.epoch() == pos.epoch() && pos.seq() <= t.seq() {
                            return None;
                        }
                        *through = None;
                    }
                    frame_of(outbox, &positioned)
                }
                Some(Gate::Held { frames, overflowed }) => {
                    if frames.len() < limit {
                        if let Some(frame) = frame_of(outbox, &positioned) {
                            frames.push_back((decoded.pos.clone(), frame));
                        }
                    } else {
                        *overflowed = decoded.pos.clone().or(overflowed.take());
                    }
                    None
                }
            },
        )
    }

    /// The bus read the gap after `after` (or failed to): deliver it, then what was held.
    ///
    /// Returns `after` when the history is behind it in the same epoch: messages this node
    /// delivered are gone from Redis (a failover to a replica that had not received them),
    /// and the bus must move the room to a new epoch (see `bus::history`).
    pub(crate) fn repaired(
        &self,
        room: &RoomName,
        after: &Position,
        page: Option<Page>,
    ) -> Option<Position> {
        let mut lost = None;
        let mut offers = Offers::queueing();
        let mut total = Dispatched::default();
        {
            let mut rooms = self.lock();
            let Some(state) = rooms.get_mut(room.as_str()) else {
                return None; // everyone left meanwhile
            };
            let held = state.repairing.take().unwrap_or_default();
            let limit = self.settings(room.as_str()).replay_limit.get();
            match page.as_ref().map(|p| (p, p.covers(after, limit))) {
                Some((page, Ok(()))) => {
                    for (_, raw) in &page.entries {
                        if let Some(decoded) = self.decode(room, raw) {
                            if let Some(pos) = decoded.pos.clone() {
                                state.delivered(pos);
                            }
                            total += self.emit(state, &decoded, &mut offers);
                        }
                    }
                    tracing::info!(room = %room, after = %after, messages = page.entries.len(), "repaired a durable room's gap from its history");
                }
                outcome => {
                    let why = match outcome {
                        None => "the history could not be read",
                        // Same epoch, fewer messages than delivered: a failover to a replica
                        // that had not received the last writes.
                        Some((page, _))
                            if page.top.epoch() == after.epoch()
                                && page.top.seq() < after.seq() =>
                        {
                            lost = Some(after.clone());
                            "the history is behind what this node delivered"
                        }
                        Some((_, r)) => r.err().map_or("", Unrecoverable::as_str),
                    };
                    tracing::warn!(room = %room, after = %after, reason = why, "a durable room's gap cannot be repaired; members are told");
                    self.registry.tell_missed(room.as_str(), None);
                    // Start over from whatever comes next.
                    state.last = None;
                    state.told = None;
                }
            }
            for decoded in held {
                total += self.sequence(state, decoded, &mut offers);
            }
        }
        self.finish_delivery(total, offers);
        lost
    }

    fn finish_delivery(&self, total: Dispatched, mut offers: Offers) {
        total.count(&self.counters);
        offers.wake();
    }

    /// `rooms` lost their subscription (the link dropped, or a cluster slot moved) and are
    /// subscribed again: read back what they may have missed meanwhile, one read per room
    /// (none when a repair is already in flight, or nothing was delivered yet).
    pub(crate) fn repair_resubscribed(&self, rooms: &[RoomName]) {
        let mut state = self.lock();
        for room in rooms {
            let Some(room_state) = state.get_mut(room.as_str()) else {
                continue;
            };
            if room_state.repairing.is_some() {
                continue;
            }
            let Some(after) = room_state.known().cloned() else {
                continue;
            };
            room_state.repairing = Some(VecDeque::new());
            self.request_repair(room, after);
        }
    }

    /// The dispatcher shed messages of `room` before decoding them: read them back.
    pub(crate) fn repair_shed(&self, room: &str) {
        if let Ok(room) = RoomName::new(room) {
            self.repair_resubscribed(&[room]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::rooms::testing::{decoded, outbox, page, setup};

    #[tokio::test]
    async fn a_gap_is_held_and_repaired_once_then_duplicates_are_dropped() {
        let (durable, registry) = setup();
        let room = RoomName::new("r").expect("valid");
        let plain = outbox();
        registry.insert(&room, SocketId::from_wire(1), plain.clone());
        let mut wake = Offers::queueing();
        durable.on_live("r", decoded("e", 1), &mut wake);
        durable.on_live("r", decoded("e", 4), &mut wake); // 2 and 3 lost
        durable.on_live("r", decoded("e", 5), &mut wake);
        let mut rx = durable.take_repairs().expect("once");
        let repair = rx.try_recv().expect("one repair");
        assert_eq!(repair.after, Position::new("e", 1));
        assert!(rx.try_recv().is_err(), "one read per gap");
        let page = page("e", 4, 2..=4);
        assert_eq!(durable.repaired(&room, &repair.after, Some(page)), None);
        durable.on_live("r", decoded("e", 5), &mut wake); // a duplicate
        durable.on_live("r", decoded("e", 6), &mut wake);
        assert_eq!(plain.take_texts().await, ["1", "2", "3", "4", "5", "6"]);
        assert!(plain.take_missed().is_none());
    }

    /// A failover to a replica that had not received the last writes: the history's top is
    /// below what the node delivered. The repair tells the members, delivers nothing from the
    /// page and asks for a new epoch; the messages that take those seqs before the new epoch
    /// are delivered, not dropped as duplicates of the lost ones.
    #[tokio::test]
    async fn a_history_behind_what_was_delivered_is_told_not_replayed() {
        let (durable, registry) = setup();
        let room = RoomName::new("r").expect("valid");
        let plain = outbox();
        registry.insert(&room, SocketId::from_wire(1), plain.clone());
        let mut wake = Offers::queueing();
        for seq in 1..=5 {
            durable.on_live("r", decoded("e", seq), &mut wake);
        }
        assert_eq!(plain.take_texts().await, ["1", "2", "3", "4", "5"]);
        durable.repair_resubscribed(std::slice::from_ref(&room));
        let mut rx = durable.take_repairs().expect("once");
        let repair = rx.try_recv().expect("one repair");
        assert_eq!(repair.after, Position::new("e", 5));
        // The promoted replica only has 1 to 3; 4 arrives live meanwhile (the new 4).
        durable.on_live("r", decoded("e", 4), &mut wake);
        let page = page("e", 3, []);
        // The bus is asked to move the room to a new epoch: the lost seqs must not name other
        // messages for a socket resuming from one of them.
        assert_eq!(
            durable.repaired(&room, &repair.after, Some(page)),
            Some(Position::new("e", 5))
        );
        assert!(plain.take_missed().is_some(), "told it cannot be recovered");
        durable.on_live("r", decoded("e", 5), &mut wake);
        assert_eq!(plain.take_texts().await, ["4", "5"]);
        assert!(rx.try_recv().is_err(), "no further read");
    }
}
