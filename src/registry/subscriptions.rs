//! Reconciling the registry with Redis: which rooms need a SUBSCRIBE or UNSUBSCRIBE, what
//! Redis confirmed, and what a lost link or a lost subscription means for the rooms' members.

use std::time::SystemTime;

use super::{Registry, tell_gap};
use crate::room::RoomName;

/// What the subscription task must send to Redis next.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) subscribe: Vec<RoomName>,
    pub(crate) unsubscribe: Vec<RoomName>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.subscribe.is_empty() && self.unsubscribe.is_empty()
    }
}

impl Registry {
    /// Takes the pending rooms that need a command. Rooms to unsubscribe stop counting as
    /// subscribed right away. Returns nothing while the link is down.
    pub(crate) fn take_pending(&self, max: usize) -> Changes {
        let mut inner = self.lock();
        let mut changes = Changes::default();
        if !inner.link_up {
            return changes;
        }
        let batch: Vec<RoomName> = inner.pending.iter().take(max).cloned().collect();
        for room in batch {
            inner.pending.remove(&room);
            let wanted = inner.rooms.contains_key(&room);
            let subscribed = inner.subscribed.contains(&room);
            if wanted && !subscribed {
                changes.subscribe.push(room);
            } else if !wanted && subscribed {
                inner.subscribed.remove(&room);
                changes.unsubscribe.push(room);
            }
        }
        changes
    }

    /// Redis confirmed SUBSCRIBE for `rooms`.
    pub(crate) fn confirm_subscribed(&self, rooms: Vec<RoomName>) {
        let mut inner = self.lock();
        for room in rooms {
            // Everyone may have left while the command was in flight: look again.
            if !inner.rooms.contains_key(&room) {
                inner.pending.insert(room.clone());
            }
            inner.subscribed.insert(room);
        }
        drop(inner);
        self.confirmed.send_modify(|n| *n += 1);
    }

    /// Redis confirmed UNSUBSCRIBE for `rooms`.
    pub(crate) fn confirm_unsubscribed(&self, rooms: Vec<RoomName>) {
        let mut inner = self.lock();
        for room in rooms {
            // Someone may have joined while the command was in flight: subscribe again.
            if inner.rooms.contains_key(&room) {
                inner.pending.insert(room);
            }
        }
        drop(inner);
        self.confirmed.send_modify(|n| *n += 1);
    }

    /// A new link is up: every local room must be subscribed on it.
    pub(crate) fn link_up(&self) {
        let mut inner = self.lock();
        inner.link_up = true;
        inner.subscribed.clear();
        let rooms: Vec<RoomName> = inner.rooms.keys().cloned().collect();
        inner.pending.extend(rooms);
    }

    /// The link is gone, and with it every subscription. `since` is where the loss may have
    /// begun: no later than the last instant the link was known to deliver (the subscriber
    /// knows it), not the instant the loss was noticed, which may come seconds later.
    pub(crate) fn link_down(&self, since: SystemTime) {
        let mut inner = self.lock();
        inner.link_up = false;
        let was_subscribed = std::mem::take(&mut inner.subscribed);
        if !was_subscribed.is_empty() {
            // An outage that began before the previous one was told keeps the earlier start.
            inner.down_since = Some(inner.down_since.map_or(since, |s| s.min(since)));
            inner.lost.extend(was_subscribed);
        }
        drop(inner);
        self.confirmed.send_modify(|n| *n += 1);
    }

    /// Rooms lost with the link or a sharded subscription are handled once they are
    /// subscribed again: the members of each are told of the gap, except in the rooms for
    /// which `repairs` is true (durable rooms, whose gap the node reads back from history):
    /// those are returned, each once, for their repair. Also returns the number of memberships
    /// told. Rooms not subscribed yet wait for a later call; rooms nobody is in any more are
    /// forgotten.
    ///
    /// Called after each reconciliation: the gap is told before the node reports ready again,
    /// and a durable room is read back only after the new subscription was confirmed, so
    /// whatever the read misses arrives live.
    pub(crate) fn resubscribed(&self, repairs: impl Fn(&str) -> bool) -> (usize, Vec<RoomName>) {
        let mut inner = self.lock();
        if inner.lost.is_empty() {
            return (0, Vec::new());
        }
        let until = SystemTime::now();
        let since = inner.down_since.unwrap_or(until).min(until);
        let (mut told, mut repair) = (0, Vec::new());
        for room in std::mem::take(&mut inner.lost) {
            if !inner.rooms.contains_key(&room) {
                continue;
            }
            if !inner.subscribed.contains(&room) {
                inner.lost.insert(room);
            } else if repairs(room.as_str()) {
                repair.push(room);
            } else {
                told += tell_gap(&inner, room.as_str(), since, until, None);
            }
        }
        if inner.lost.is_empty() {
            inner.down_since = None;
        }
        (told, repair)
    }

    /// Redis ended the subscription of `room` on its own (a cluster slot moved). Returns
    /// `true` when the room was subscribed and still has members: it is then pending again
    /// (not subscribed, so joins wait for the new confirmation). Its members are told at once
    /// that messages may have been missed, unless `repairs` is true for it (a durable room):
    /// its gap is then read back once it is subscribed again (see
    /// [`resubscribed`](Registry::resubscribed)). Returns `false` for a room being
    /// unsubscribed on purpose. The window told starts at `since`, the last instant the link
    /// was known to deliver.
    pub(crate) fn subscription_lost(
        &self,
        room: &str,
        since: SystemTime,
        repairs: impl Fn(&str) -> bool,
    ) -> bool {
        let mut inner = self.lock();
        let Some(room) = inner.subscribed.get(room).cloned() else {
            return false;
        };
        if !inner.rooms.contains_key(&room) {
            return false;
        }
        if repairs(room.as_str()) {
            inner.lost.insert(room.clone());
        } else {
            let now = SystemTime::now();
            tell_gap(&inner, room.as_str(), since.min(now), now, None);
        }
        inner.subscribed.remove(&room);
        inner.pending.insert(room);
        drop(inner);
        self.changed.notify_one();
        true
    }

    /// Every room that has a local socket, for a final UNSUBSCRIBE.
    pub(crate) fn subscribed_rooms(&self) -> Vec<RoomName> {
        self.lock().subscribed.iter().cloned().collect()
    }
}
