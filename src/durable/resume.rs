//! A resuming socket.
//!
//! [`Durable::hold`] registers the socket *before* it joins: from its first live message on,
//! its frames are held (at most the replay limit) instead of queued. The socket then joins,
//! the history after its position is read, and [`Durable::finish_resume`] queues, in order:
//! the notice, the replay, the held frames not already replayed (by seq). From then on its
//! frames go straight to its queue. The hand-off has no gap because the read starts after the
//! subscription was confirmed (every later message reaches the held frames) and no duplicate
//! because held frames at or below the last replayed seq are skipped.

use std::collections::VecDeque;

use axum::extract::ws::Message;

use super::history::Page;
use super::rooms::{Durable, Gate, state_of};
use crate::position::{Position, Unrecoverable};
use crate::queue::Outbox;
use crate::registry::SocketId;
use crate::room::RoomName;

/// Where a durable join starts: [`FanoutSocket::join_durable_from`](crate::FanoutSocket::join_durable_from).
///
/// Every start has the same gap-free hand-off to live messages; they differ in what is
/// replayed first.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Start {
    /// Live messages only: the first frame is a `fanout.position` notice.
    Now,
    /// After this position (a resume): every message after it, when they can all be replayed;
    /// else none, and live messages from the room's current position.
    After(Position),
    /// The room's last `n` messages (at most the replay limit), then live ones: what a board
    /// that shows its latest updates on join needs, in one call.
    Last(usize),
    /// After this position; when that resume is refused, the room's last `n` messages instead
    /// (the notice says `recovered: false` and why, and the replay follows).
    AfterOrLast(Position, usize),
}

/// What a durable join found: the socket's position and, when it asked to resume, whether the
/// messages it missed were replayed. From [`FanoutSocket::join_durable`](crate::FanoutSocket::join_durable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    room: RoomName,
    position: Position,
    since: Option<Position>,
    failure: Option<Unrecoverable>,
    replayed: u64,
}

impl Resumed {
    /// The room joined.
    pub fn room(&self) -> &RoomName {
        &self.room
    }

    /// The position of the last message before this socket's first delivery: the socket's
    /// `since` when it was recovered (the replay starts right after it), else the room's
    /// position when the socket joined.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// `None` for a join without `since`; else whether every message after it was replayed.
    pub fn recovered(&self) -> Option<bool> {
        self.since.as_ref().map(|_| self.failure.is_none())
    }

    /// Why the messages after `since` could not be replayed. After a
    /// [`Start::AfterOrLast`] that fell back to the last messages, those were replayed all the
    /// same ([`replayed`](Resumed::replayed)), after [`position`](Resumed::position).
    pub fn failure(&self) -> Option<Unrecoverable> {
        self.failure
    }

    /// How many messages were replayed.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// The control notice a client receives first, as the wire contract spells it:
    /// `{"type":"fanout.position","room":R,"epoch":E,"seq":S}` after a join without `since`,
    /// `{"type":"fanout.resumed","room":R,"recovered":B,"epoch":E,"seq":S}` (with `"reason"`
    /// when not recovered) after a resume.
    pub fn notice(&self) -> String {
        let (room, epoch, seq) = (
            json_string(self.room.as_str()),
            json_string(self.position.epoch()),
            self.position.seq(),
        );
        match (&self.since, self.failure) {
            (None, _) => {
                format!(r#"{{"type":"fanout.position","room":{room},"epoch":{epoch},"seq":{seq}}}"#)
            }
            (Some(_), None) => format!(
                r#"{{"type":"fanout.resumed","room":{room},"recovered":true,"epoch":{epoch},"seq":{seq}}}"#
            ),
            (Some(_), Some(why)) => format!(
                r#"{{"type":"fanout.resumed","room":{room},"recovered":false,"reason":"{why}","epoch":{epoch},"seq":{seq}}}"#
            ),
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

impl Durable {
    /// `socket` is about to join `room` with positions: its frames are held from now on until
    /// [`finish_resume`](Durable::finish_resume).
    pub(crate) fn hold(&self, room: &RoomName, socket: SocketId) {
        let mut rooms = self.lock();
        let state = state_of(&mut rooms, room);
        if state.repairing.is_none() && !self.registry.has_members(room.as_str()) {
            // The node is not following the room (or stops now): what it last delivered says
            // nothing about the gap-free sequence of the subscription to come.
            state.last = None;
            state.told = None;
        }
        state.members.insert(
            socket,
            Gate::Held {
                frames: VecDeque::new(),
                overflowed: None,
            },
        );
    }

    /// Ends `socket`'s resume in `room`: queues the notice, the replay (`page`'s entries
    /// after `since` when they are all there) and the held frames after them, then opens the
    /// socket's gate. Returns what was decided. `refused`: the resume this join falls back
    /// from (its replay starts at `since`, but the notice says why the first was refused).
    pub(crate) fn finish_resume(
        &self,
        room: &RoomName,
        socket: SocketId,
        outbox: &Outbox,
        since: Option<Position>,
        page: Page,
        refused: Option<Unrecoverable>,
    ) -> Resumed {
        let limit = self.settings(room.as_str()).replay_limit.get();
        let policy = self.config.overflow_for(room.as_str());
        let mut rooms = self.lock();
        let state = state_of(&mut rooms, room);
        let gate = state.members.remove(&socket);
        let (held, overflowed) = match gate {
            Some(Gate::Held { frames, overflowed }) => (frames, overflowed),
            _ => (VecDeque::new(), None),
        };
        let failure = since.as_ref().and_then(|s| page.covers(s, limit).err());
        let mut resumed = Resumed {
            room: room.clone(),
            position: match (&since, failure) {
                (Some(since), None) => since.clone(),
                _ => page.top.clone(),
            },
            since,
            failure,
            replayed: 0,
        };
        if refused.is_some() {
            resumed.failure = refused;
        }
        if let Some(dropped) = overflowed {
            // More arrived during the read than the socket may hold: continue after the last.
            resumed.position = dropped;
            resumed.failure = Some(Unrecoverable::TooFarBehind);
            resumed.replayed = 0;
            outbox.offer(Message::Text(resumed.notice().into()), policy);
            let through = Some(resumed.position.clone());
            state.members.insert(socket, Gate::Open { through });
            return resumed;
        }
        let mut frames = vec![Message::Text(resumed.notice().into())];
        let mut last = resumed.position.clone();
        if resumed.since.is_some() && failure.is_none() {
            for (seq, raw) in &page.entries {
                if let Some(decoded) = self.decode(room, raw) {
                    frames.push(if outbox.is_framed() {
                        decoded.framed(room.as_str())
                    } else {
                        decoded.positioned()
                    });
                }
                last = last.at(*seq);
                resumed.replayed += 1;
            }
        }
        for (pos, frame) in held {
            let Some(pos) = pos else {
                frames.push(frame); // no position: a seed node's message, in arrival order
                continue;
            };
            if pos.epoch() == last.epoch() && pos.seq() <= last.seq() {
                continue; // replayed, or before the position the socket was told
            }
            last = pos;
            frames.push(frame);
        }
        // Queued under the lock, so that no live frame overtakes them.
        let n = frames.len() as u64;
        for frame in frames {
            outbox.offer(frame, policy);
        }
        // A node that has delivered nothing live yet learns here where its members stand: a
        // live seq that skips past it, or a lost link, is then read back, not passed on.
        if state.last.is_none()
            && state
                .told
                .as_ref()
                .is_none_or(|t| t.epoch() != last.epoch() || t.seq() < last.seq())
        {
            state.told = Some(last.clone());
        }
        let through = Some(last);
        state.members.insert(socket, Gate::Open { through });
        drop(rooms);
        self.counters.delivered.add(n.saturating_sub(1));
        resumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::rooms::testing::{decoded, outbox, page, setup};
    use crate::registry::Offers;

    #[tokio::test]
    async fn a_resume_merges_the_replay_with_held_live_frames_by_seq() {
        let (durable, registry) = setup();
        let room = RoomName::new("r").expect("valid");
        let socket = SocketId::from_wire(2);
        let out = outbox();
        let mut wake = Offers::queueing();
        durable.on_live("r", decoded("e", 3), &mut wake);
        durable.hold(&room, socket);
        registry.insert(&room, socket, out.clone());
        durable.on_live("r", decoded("e", 4), &mut wake); // before the read: replayed too
        durable.on_live("r", decoded("e", 5), &mut wake); // after the read: held only
        let page = page("e", 4, 3..=4);
        let resumed =
            durable.finish_resume(&room, socket, &out, Some(Position::new("e", 2)), page, None);
        assert_eq!(resumed.recovered(), Some(true));
        durable.on_live("r", decoded("e", 6), &mut wake);
        let got = out.take_texts().await;
        assert_eq!(
            got[0],
            r#"{"type":"fanout.resumed","room":"r","recovered":true,"epoch":"e","seq":2}"#
        );
        let seqs: Vec<&str> = got[1..].iter().map(String::as_str).collect();
        assert_eq!(
            seqs,
            [3, 4, 5, 6].map(|s| format!(r#"{{"seq":{s},"payload":{s}}}"#))
        );
    }

    /// A socket joins a room the node has delivered nothing of yet (told: position 0), then
    /// the link drops before any live message: what was published meanwhile is read back
    /// after the position the socket was told, and a live seq that skips past it is a gap,
    /// not the next message (found by the chaos test under load: seq 10 after 0, untold).
    #[tokio::test]
    async fn a_join_tells_the_node_where_its_members_stand_before_any_live_message() {
        let (durable, registry) = setup();
        let room = RoomName::new("r").expect("valid");
        let socket = SocketId::from_wire(2);
        let out = outbox();
        let mut wake = Offers::queueing();
        durable.hold(&room, socket);
        registry.insert(&room, socket, out.clone());
        let top = page("e", 0, []);
        let resumed = durable.finish_resume(&room, socket, &out, None, top, None);
        assert_eq!(resumed.position(), &Position::new("e", 0));
        let mut rx = durable.take_repairs().expect("once");
        // The link came back: read after what the socket was told.
        durable.repair_resubscribed(std::slice::from_ref(&room));
        let repair = rx.try_recv().expect("a repair after the join's position");
        assert_eq!(repair.after, Position::new("e", 0));
        // Meanwhile 10 arrives live: held until the repair, never delivered ahead of 1 to 9.
        durable.on_live("r", decoded("e", 10), &mut wake);
        let page = page("e", 10, 1..=10);
        assert_eq!(durable.repaired(&room, &repair.after, Some(page)), None);
        let got = out.take_texts().await;
        let seqs: Vec<&str> = got[1..].iter().map(String::as_str).collect();
        assert_eq!(
            seqs,
            (1..=10)
                .map(|s| format!(r#"{{"seq":{s},"payload":{s}}}"#))
                .collect::<Vec<_>>()
        );
        assert!(out.take_missed().is_none());
    }
}
