//! This node's presence table: which user each local socket is in each presence room, and
//! which changes Redis has not been told yet (see the module docs of `crate::presence`).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::Member;
use crate::error::Error;
use crate::registry::SocketId;
use crate::room::RoomName;

/// One user's entry in a sync of one room: this node's current connection count for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) user: String,
    pub(crate) count: u32,
    pub(crate) info: Option<Box<str>>,
    /// Whether the user's first connection in the fleet, if this is it, is announced with a
    /// join event. False only when re-asserting, after Redis lost its data, a user Redis had
    /// already been told about: clients saw it join before and nothing changed for them.
    pub(crate) announce: bool,
}

/// What one presence script call must tell Redis about one room.
#[derive(Debug)]
pub(crate) struct Sync {
    pub(crate) room: RoomName,
    /// Every user this node has in the room is listed, and Redis drops this node's entries
    /// for anyone else (a re-assertion).
    pub(crate) full: bool,
    /// With `full`: a re-assertion after Redis may have lost writes (see
    /// [`Table::reassert_all`]'s `silent`).
    pub(crate) silent: bool,
    pub(crate) entries: Vec<Entry>,
    /// The room's change generation this sync covers, for [`Table::confirm`].
    generation: u64,
}

#[derive(Debug, Default)]
struct Local {
    /// This node's sockets in the room as this user.
    count: u32,
    info: Option<Box<str>>,
    /// Redis has counted this node's share of the user since the last data loss.
    announced: bool,
    /// The room generation of the last sync of this user that Redis applied.
    synced: u64,
}

#[derive(Debug, Default)]
struct Room {
    users: HashMap<String, Local>,
    /// Users whose count changed since the last sync.
    changed: HashSet<String>,
    /// The next sync re-asserts every user (see [`Sync::full`]).
    full: bool,
    /// With `full`: users Redis already counted are re-asserted without a join event.
    silent: bool,
    /// Bumped by every change; a join waits until its user's `synced` reaches the value its
    /// change got.
    generation: u64,
}

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<RoomName, Room>,
    /// The user each socket is in each presence room as, to undo it when the socket leaves.
    sockets: HashMap<(SocketId, RoomName), String>,
    /// Rooms with a change Redis has not been told about (changed users, or `full`).
    dirty: HashSet<RoomName>,
    generation: u64,
    /// Users whose last local socket left while Redis was away and lost its data: the fleet
    /// saw them join, and Redis no longer knows they left. Each gets a leave once every live
    /// node has had time to re-assert, unless one of them still has the user.
    departed: Vec<(RoomName, String, Instant)>,
}

/// This node's presence table. See the module docs.
#[derive(Debug)]
pub(crate) struct Table {
    inner: Mutex<Inner>,
    /// Wakes the sync task when a room becomes dirty.
    changed: Notify,
    /// Bumped whenever a sync is confirmed, so joins waiting for theirs re-check.
    synced: watch::Sender<u64>,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changed: Notify::new(),
            synced: watch::Sender::new(0),
        }
    }
}

/// Most user entries handed to one script call: a re-assertion of a room of 100,000 users from
/// one node goes out as several calls, each short enough not to stall Redis.
pub(crate) const ENTRIES_PER_SYNC: usize = 2000;

impl Table {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section leaves the table consistent at every step.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves when a room became dirty.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Counts `socket` in `room` as `member`; returns the generation to wait for with
    /// [`Table::wait_synced`]. A socket already counted in the room is left as it is.
    pub(crate) fn add(&self, room: &RoomName, socket: SocketId, member: &Member) -> u64 {
        let mut inner = self.lock();
        let key = (socket, room.clone());
        if inner.sockets.contains_key(&key) {
            return inner.rooms.get(room).map_or(0, |r| r.generation);
        }
        inner.sockets.insert(key, member.user.clone());
        inner.generation += 1;
        let generation = inner.generation;
        let r = inner.rooms.entry(room.clone()).or_default();
        let local = r.users.entry(member.user.clone()).or_default();
        local.count += 1;
        if member.info.is_some() {
            local.info.clone_from(&member.info);
        }
        r.changed.insert(member.user.clone());
        r.generation = generation;
        inner.dirty.insert(room.clone());
        drop(inner);
        self.changed.notify_one();
        generation
    }

    /// Uncounts `socket` from `room`. Returns whether it was counted there.
    pub(crate) fn remove(&self, room: &RoomName, socket: SocketId) -> bool {
        let mut inner = self.lock();
        let Some(user) = inner.sockets.remove(&(socket, room.clone())) else {
            return false;
        };
        inner.generation += 1;
        let generation = inner.generation;
        if let Some(r) = inner.rooms.get_mut(room)
            && let Some(local) = r.users.get_mut(&user)
        {
            local.count = local.count.saturating_sub(1);
            r.changed.insert(user);
            r.generation = generation;
            inner.dirty.insert(room.clone());
        }
        drop(inner);
        self.changed.notify_one();
        true
    }

    /// Waits until Redis counted `user`'s connections in `room` as of `generation`, or
    /// `deadline`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits.
    pub(crate) async fn wait_synced(
        &self,
        room: &RoomName,
        user: &str,
        generation: u64,
        deadline: Instant,
    ) -> Result<(), Error> {
        let mut rx = self.synced.subscribe();
        loop {
            let synced = self
                .lock()
                .rooms
                .get(room)
                .and_then(|r| r.users.get(user))
                .is_none_or(|l| l.synced >= generation);
            if synced {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::closed()),
                Err(_) => return Err(Error::presence_timeout(room.as_str())),
            }
        }
    }

    /// Waits until Redis knows every change of every room (a shutdown's last step), or
    /// `deadline`. Returns whether it does.
    pub(crate) async fn wait_all_synced(&self, deadline: Instant) -> bool {
        let mut rx = self.synced.subscribe();
        loop {
            if self.lock().dirty.is_empty() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// Marks every room for re-assertion: after Redis lost its data (`silent`: users Redis
    /// had counted are restored without a join event), or after this node's lease ran out and
    /// others removed its members (not silent: they left, and now join again). `extra` names
    /// rooms Redis holds entries of this node for that the table does not know (left over by
    /// an earlier run with the same node id); re-asserting them empty removes those entries.
    ///
    /// When `silent`, users who left while Redis was away (their last leave not yet counted)
    /// are due a leave notice after `leave_after` (see [`Table::take_departed`]).
    pub(crate) fn reassert_all(&self, silent: bool, extra: Vec<RoomName>, leave_after: Duration) {
        self.reassert(|_| true, silent, extra, leave_after);
    }

    /// [`Table::reassert_all`] for the rooms `only` picks: on a Redis Cluster, those whose hash
    /// slot changed masters (a failover that may have lost writes, or a migration).
    pub(crate) fn reassert_rooms(
        &self,
        only: impl Fn(&RoomName) -> bool,
        silent: bool,
        leave_after: Duration,
    ) {
        self.reassert(only, silent, Vec::new(), leave_after);
    }

    fn reassert(
        &self,
        only: impl Fn(&RoomName) -> bool,
        silent: bool,
        extra: Vec<RoomName>,
        leave_after: Duration,
    ) {
        let mut inner = self.lock();
        for room in extra {
            inner.rooms.entry(room).or_default();
        }
        let due = Instant::now() + leave_after;
        let Inner {
            rooms,
            dirty,
            departed,
            ..
        } = &mut *inner;
        for (name, r) in rooms.iter_mut().filter(|(name, _)| only(name)) {
            r.full = true;
            r.silent = silent;
            dirty.insert(name.clone());
            if silent {
                departed.extend(
                    r.users
                        .iter()
                        .filter(|(_, l)| l.count == 0 && l.announced)
                        .map(|(user, _)| (name.clone(), user.clone(), due)),
                );
            }
        }
        drop(inner);
        self.changed.notify_one();
    }

    /// Takes dirty rooms for the sync task, up to about `max_entries` user entries in all (a
    /// room with more is split: its full flag goes with the first part).
    pub(crate) fn take_dirty(&self, max_entries: usize) -> Vec<Sync> {
        let mut inner = self.lock();
        let Inner { rooms, dirty, .. } = &mut *inner;
        let mut out = Vec::new();
        let mut budget = max_entries;
        let names: Vec<RoomName> = dirty.iter().cloned().collect();
        for name in names {
            if budget == 0 {
                break;
            }
            let Some(r) = rooms.get_mut(&name) else {
                dirty.remove(&name);
                continue;
            };
            let users: Vec<String> = if r.full {
                r.users.keys().cloned().collect()
            } else {
                r.changed.iter().cloned().collect()
            };
            if r.full && users.len() > budget && !out.is_empty() {
                break; // a full re-assertion goes in one piece: leave it for the next batch
            }
            let entries: Vec<Entry> = users
                .iter()
                .take(if r.full { usize::MAX } else { budget })
                .map(|user| {
                    let local = r.users.get(user);
                    Entry {
                        user: user.clone(),
                        count: local.map_or(0, |l| l.count),
                        info: local.and_then(|l| l.info.clone()),
                        announce: !(r.silent && local.is_some_and(|l| l.announced)),
                    }
                })
                .collect();
            for e in &entries {
                r.changed.remove(&e.user);
            }
            budget = budget.saturating_sub(entries.len());
            let full = std::mem::take(&mut r.full);
            if r.changed.is_empty() {
                dirty.remove(&name);
            }
            out.push(Sync {
                room: name,
                full,
                silent: full && r.silent,
                entries,
                generation: r.generation,
            });
        }
        out
    }

    /// The departed users whose leave is due by `now` (and who have no local socket again),
    /// and when the next one is due.
    pub(crate) fn take_departed(&self, now: Instant) -> (Vec<(RoomName, String)>, Option<Instant>) {
        let mut inner = self.lock();
        let Inner {
            rooms, departed, ..
        } = &mut *inner;
        let mut due = Vec::new();
        departed.retain(|(room, user, at)| {
            if *at > now {
                return true;
            }
            let back = rooms
                .get(room)
                .and_then(|r| r.users.get(user))
                .is_some_and(|l| l.count > 0);
            if !back {
                due.push((room.clone(), user.clone()));
            }
            false
        });
        let next = departed.iter().map(|(_, _, at)| *at).min();
        (due, next)
    }

    /// Redis applied `sync`.
    pub(crate) fn confirm(&self, sync: Sync) {
        let mut inner = self.lock();
        if let Some(r) = inner.rooms.get_mut(&sync.room) {
            for e in &sync.entries {
                if let Some(local) = r.users.get_mut(&e.user) {
                    if local.count == 0 {
                        if !r.changed.contains(&e.user) {
                            r.users.remove(&e.user);
                        }
                    } else {
                        local.synced = local.synced.max(sync.generation);
                        if local.count == e.count {
                            local.announced = true;
                        }
                    }
                }
            }
            if !r.full {
                r.silent = false;
            }
            if r.users.is_empty() && r.changed.is_empty() && !r.full {
                inner.rooms.remove(&sync.room);
            }
        }
        drop(inner);
        self.synced.send_modify(|n| *n += 1);
    }

    /// Redis did not apply `sync`: its users are changed again, for the next attempt.
    pub(crate) fn retry(&self, sync: Sync) {
        let mut inner = self.lock();
        let Inner { rooms, dirty, .. } = &mut *inner;
        if let Some(r) = rooms.get_mut(&sync.room) {
            r.full |= sync.full;
            r.changed.extend(sync.entries.into_iter().map(|e| e.user));
            dirty.insert(sync.room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomName {
        RoomName::new(s).expect("valid")
    }

    fn member(user: &str) -> Member {
        Member::new(user).expect("valid")
    }

    fn counts(syncs: &[Sync]) -> Vec<(String, String, u32)> {
        let mut v: Vec<_> = syncs
            .iter()
            .flat_map(|s| {
                s.entries
                    .iter()
                    .map(|e| (s.room.to_string(), e.user.clone(), e.count))
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn sockets_of_one_user_are_one_entry_with_a_count_and_syncs_send_current_counts() {
        let t = Table::default();
        let a = room("a");
        t.add(&a, SocketId::from_wire(1), &member("ann"));
        t.add(&a, SocketId::from_wire(2), &member("ann"));
        t.add(&a, SocketId::from_wire(3), &member("bob"));
        let syncs = t.take_dirty(100);
        assert_eq!(
            counts(&syncs),
            [("a".into(), "ann".into(), 2), ("a".into(), "bob".into(), 1)]
        );
        assert!(t.take_dirty(100).is_empty(), "nothing changed since");
        for s in syncs {
            t.confirm(s);
        }
        assert!(t.remove(&a, SocketId::from_wire(1)));
        assert!(!t.remove(&a, SocketId::from_wire(1)), "already uncounted");
        assert_eq!(counts(&t.take_dirty(100)), [("a".into(), "ann".into(), 1)]);
    }

    #[test]
    fn a_failed_sync_is_retried_with_the_counts_of_then() {
        let t = Table::default();
        let a = room("a");
        t.add(&a, SocketId::from_wire(1), &member("ann"));
        let mut syncs = t.take_dirty(100);
        t.add(&a, SocketId::from_wire(2), &member("ann"));
        t.retry(syncs.remove(0));
        assert_eq!(counts(&t.take_dirty(100)), [("a".into(), "ann".into(), 2)]);
    }

    #[test]
    fn a_reassertion_of_some_rooms_leaves_the_others_alone() {
        let t = Table::default();
        let (a, b) = (room("a"), room("b"));
        t.add(&a, SocketId::from_wire(1), &member("ann"));
        t.add(&b, SocketId::from_wire(2), &member("bob"));
        for s in t.take_dirty(100) {
            t.confirm(s);
        }
        t.reassert_rooms(|r| *r == b, true, Duration::ZERO);
        let syncs = t.take_dirty(100);
        assert_eq!(syncs.len(), 1, "{syncs:?}");
        assert_eq!(syncs[0].room, b);
        assert!(syncs[0].full && syncs[0].silent);
        assert_eq!(
            syncs[0]
                .entries
                .iter()
                .map(|e| e.announce)
                .collect::<Vec<_>>(),
            [false],
            "bob was counted before: restored without a join"
        );
    }

    #[test]
    fn reassertion_lists_everyone_and_is_silent_only_for_users_redis_had_counted() {
        let t = Table::default();
        let a = room("a");
        t.add(&a, SocketId::from_wire(1), &member("ann"));
        for s in t.take_dirty(100) {
            t.confirm(s);
        }
        // Redis is lost; meanwhile bob joins and his sync fails.
        t.add(&a, SocketId::from_wire(2), &member("bob"));
        let failed = t.take_dirty(100);
        for s in failed {
            t.retry(s);
        }
        t.remove(&a, SocketId::from_wire(1)); // ann leaves while Redis is away
        for s in t.take_dirty(100) {
            t.retry(s);
        }
        t.reassert_all(true, vec![room("stale")], Duration::ZERO);
        let (departed, next) = t.take_departed(Instant::now());
        assert_eq!(departed, [(a.clone(), "ann".to_owned())]);
        assert_eq!(next, None);
        let syncs = t.take_dirty(100);
        let stale = syncs.iter().find(|s| s.room.as_str() == "stale");
        assert!(stale.is_some_and(|s| s.full && s.entries.is_empty()));
        let a_sync = syncs.iter().find(|s| s.room == a).expect("room a");
        assert!(a_sync.full);
        let announce: Vec<(&str, bool)> = {
            let mut v: Vec<_> = a_sync
                .entries
                .iter()
                .map(|e| (e.user.as_str(), e.announce))
                .collect();
            v.sort();
            v
        };
        assert_eq!(announce, [("ann", false), ("bob", true)]);
        let ann = a_sync
            .entries
            .iter()
            .find(|e| e.user == "ann")
            .expect("ann");
        assert_eq!(
            ann.count, 0,
            "listed with no connection: nothing to restore"
        );
    }
}
