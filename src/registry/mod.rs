//! The local registry: room -> sockets this node owns, and which rooms Redis has confirmed.
//!
//! It is the single source of truth for subscriptions. Joins and leaves only edit local
//! membership and mark the room *pending*; the subscription task (in [`bus`](crate::bus)) takes
//! pending rooms in batches, compares "has local sockets" with "subscribed", and sends the
//! SUBSCRIBE / UNSUBSCRIBE that reconcile them. Because the task always reads the *current*
//! membership, any interleaving of concurrent joins and leaves converges to: subscribed exactly
//! to the rooms that have a local socket. After a reconnect every room is pending again, which
//! is the whole resubscription logic.
//!
//! A room counts as subscribed only between a confirmed SUBSCRIBE and the moment its UNSUBSCRIBE
//! is *sent*, so a join never returns early on a subscription that is being torn down.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::Error;
use crate::queue::Outbox;
use crate::room::RoomName;
use crate::stats::Gauges;

mod fanout;
mod subscriptions;

use fanout::tell_gap;
pub(crate) use fanout::{Dispatched, Offers};
pub(crate) use subscriptions::Changes;

/// Identifies a socket within one node, unique for the node's lifetime: from
/// [`FanoutSocket::id`](crate::FanoutSocket::id), for
/// [`Broadcast::except`](crate::Broadcast::except) and [`Broadcast::sender`](crate::Broadcast::sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(u64);

impl SocketId {
    /// The id as a number, as written in envelopes (`except`).
    pub(crate) fn get(self) -> u64 {
        self.0
    }

    /// An id read back from an envelope this node published.
    pub(crate) fn from_wire(id: u64) -> Self {
        Self(id)
    }
}

impl std::fmt::Display for SocketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A room's local sockets, as a list.
pub(crate) type Members = Vec<(SocketId, Arc<Outbox>)>;

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<RoomName, HashMap<SocketId, Arc<Outbox>>>,
    /// Rooms whose SUBSCRIBE Redis confirmed on the current link (and not yet unsubscribed).
    subscribed: HashSet<RoomName>,
    /// Rooms whose membership changed since the subscription task last looked at them.
    pending: HashSet<RoomName>,
    /// Whether the subscription task has a link to hand pending rooms to.
    link_up: bool,
    /// Rooms whose subscription ended without being asked to (the link dropped, or a cluster
    /// slot moved), whose members are neither told of the gap nor repaired yet: that happens
    /// once the room is subscribed again (see `resubscribed`).
    lost: HashSet<RoomName>,
    /// When the link dropped, while rooms it took are in `lost`: the start of their gap.
    down_since: Option<SystemTime>,
    /// Users' rooms (`crate::users`) whose local socket count changed since the users'
    /// directory last wrote them to Redis.
    users_changed: HashSet<RoomName>,
    /// How many of `rooms` are users' rooms, and how many memberships the others hold: kept
    /// on each insert and remove, so that `Stats` and the users' directory heartbeat read two
    /// numbers instead of walking every room under the lock (100,000 users on a node made
    /// that a millisecond in which no message was dispatched).
    user_rooms: usize,
    app_memberships: usize,
}

#[derive(Debug)]
pub(crate) struct Registry {
    /// Lock order: taken after the durable rooms' lock and before any socket's (the dispatcher
    /// holds it across a room's fan-out, writing to idle sockets' parked sinks under it).
    inner: Mutex<Inner>,
    /// Wakes the subscription task when a room gains its first or loses its last local socket.
    changed: Notify,
    /// Bumped whenever `subscribed` changes or a room empties, so joins waiting for a
    /// confirmation and shutdowns waiting for quiet re-check.
    confirmed: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            changed: Notify::new(),
            confirmed: watch::Sender::new(0),
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section below leaves `Inner` consistent at each step, so a poisoned
        // lock (a panic elsewhere while holding it) carries no broken invariant.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves when a room gained its first or lost its last local socket (or a sharded
    /// subscription was lost): there may be SUBSCRIBE / UNSUBSCRIBE work to do.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Whether no socket is in any room and every UNSUBSCRIBE was confirmed: what a shutdown
    /// waits for.
    pub(crate) fn is_quiet(&self) -> bool {
        let inner = self.lock();
        inner.rooms.is_empty() && inner.subscribed.is_empty() && inner.pending.is_empty()
    }

    /// Changes whenever a subscription is confirmed or a room empties.
    pub(crate) fn watch_confirmed(&self) -> watch::Receiver<u64> {
        self.confirmed.subscribe()
    }

    /// Adds a socket to a room. Returns `true` when the room is already subscribed (the join is
    /// complete); otherwise the caller waits with [`Registry::wait_subscribed`].
    pub(crate) fn insert(&self, room: &RoomName, socket: SocketId, outbox: Arc<Outbox>) -> bool {
        let mut inner = self.lock();
        let members = inner.rooms.entry(room.clone()).or_default();
        let first = members.is_empty();
        let new = members.insert(socket, outbox).is_none();
        if room.is_user() {
            inner.users_changed.insert(room.clone());
            inner.user_rooms += usize::from(first);
        } else {
            inner.app_memberships += usize::from(new);
        }
        let subscribed = inner.subscribed.contains(room);
        if first {
            inner.pending.insert(room.clone());
        }
        drop(inner);
        if first {
            self.changed.notify_one();
        }
        subscribed
    }

    /// The room's name and its local sockets, if it has any.
    pub(crate) fn members(&self, room: &str) -> Option<(RoomName, Members)> {
        let inner = self.lock();
        let (name, members) = inner.rooms.get_key_value(room)?;
        let members = members.iter().map(|(id, o)| (*id, o.clone())).collect();
        Some((name.clone(), members))
    }

    /// Removes a socket from a room. Returns whether it was a member.
    pub(crate) fn remove(&self, room: &RoomName, socket: SocketId) -> bool {
        let mut inner = self.lock();
        let Some(members) = inner.rooms.get_mut(room) else {
            return false;
        };
        let was_member = members.remove(&socket).is_some();
        let last = members.is_empty();
        if last {
            inner.rooms.remove(room);
            inner.pending.insert(room.clone());
        }
        if was_member && room.is_user() {
            inner.users_changed.insert(room.clone());
            inner.user_rooms = inner.user_rooms.saturating_sub(usize::from(last));
        } else if was_member {
            inner.app_memberships = inner.app_memberships.saturating_sub(1);
        }
        drop(inner);
        if last {
            self.changed.notify_one();
            self.confirmed.send_modify(|n| *n += 1);
        }
        was_member
    }

    /// Waits until Redis confirmed the room's subscription, or `deadline`.
    ///
    /// # Cancel safety
    /// Cancel safe: it only waits; membership is unchanged.
    pub(crate) async fn wait_subscribed(
        &self,
        room: &RoomName,
        deadline: Instant,
    ) -> Result<(), Error> {
        let mut rx = self.confirmed.subscribe();
        loop {
            if self.lock().subscribed.contains(room) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives as long as the registry, which outlives this borrow.
                Ok(Err(_)) => return Err(Error::closed()),
                Err(_) => return Err(Error::subscribe_timeout(room.as_str())),
            }
        }
    }

    /// Each user whose local socket count changed since the last call, with that count now
    /// (0: none left); with `all`, every user this node holds (to write them all again after
    /// Redis lost them).
    pub(crate) fn take_user_counts(&self, all: bool) -> Vec<(RoomName, usize)> {
        let mut inner = self.lock();
        let changed = std::mem::take(&mut inner.users_changed);
        let count = |room: &RoomName| inner.rooms.get(room).map_or(0, HashMap::len);
        if all {
            let mut out: Vec<_> = changed
                .iter()
                .filter(|room| !inner.rooms.contains_key(*room))
                .map(|room| (room.clone(), 0))
                .collect();
            out.extend(
                inner
                    .rooms
                    .iter()
                    .filter(|(room, _)| room.is_user())
                    .map(|(room, members)| (room.clone(), members.len())),
            );
            return out;
        }
        changed
            .into_iter()
            .map(|room| {
                let n = count(&room);
                (room, n)
            })
            .collect()
    }

    /// How many of the application's rooms, and how many users, have a local socket.
    pub(crate) fn room_and_user_counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let users = inner.user_rooms;
        (inner.rooms.len().saturating_sub(users), users)
    }

    /// Whether `room` has a local socket.
    pub(crate) fn has_members(&self, room: &str) -> bool {
        self.lock().rooms.contains_key(room)
    }

    /// The registry's current sizes, for [`Stats`](crate::Stats).
    pub(crate) fn gauges(&self) -> Gauges {
        let inner = self.lock();
        // Users' own rooms (`crate::users`) are the node's, not the application's: counted in
        // `subscriptions` (each is one), not in `rooms` or `memberships`.
        Gauges {
            rooms: inner.rooms.len().saturating_sub(inner.user_rooms),
            memberships: inner.app_memberships,
            subscriptions: inner.subscribed.len(),
            // The node's lifecycle counts connections, the dispatcher its lag.
            connections: 0,
            dispatch_lag_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use axum::extract::ws::Message;

    use crate::queue::testing::outbox;

    fn room(s: &str) -> RoomName {
        RoomName::new(s).expect("valid")
    }

    #[test]
    fn first_join_and_last_leave_produce_one_command_each() {
        let r = Registry::default();
        r.link_up();
        let a = room("a");
        assert!(!r.insert(&a, SocketId(1), outbox()));
        assert!(!r.insert(&a, SocketId(2), outbox()));
        let c = r.take_pending(100);
        assert_eq!(c.subscribe, std::slice::from_ref(&a));
        r.confirm_subscribed(c.subscribe);
        assert!(r.take_pending(100).is_empty());
        assert!(r.insert(&a, SocketId(3), outbox()), "already subscribed");
        r.remove(&a, SocketId(1));
        r.remove(&a, SocketId(2));
        assert!(r.take_pending(100).is_empty());
        r.remove(&a, SocketId(3));
        let c = r.take_pending(100);
        assert_eq!(c.unsubscribe, [a]);
        assert_eq!(r.gauges(), Gauges::default());
    }

    #[test]
    fn the_kept_counts_match_a_walk_over_every_room() {
        let r = Registry::default();
        let (a, b, ada) = (room("a"), room("b"), RoomName::of_user("ada"));
        let walk = |r: &Registry| {
            let inner = r.lock();
            let users = inner.rooms.keys().filter(|k| k.is_user()).count();
            let apps = inner.rooms.iter().filter(|(k, _)| !k.is_user());
            let memberships: usize = apps.map(|(_, m)| m.len()).sum();
            (inner.rooms.len() - users, users, memberships)
        };
        let kept = |r: &Registry| {
            let (rooms, users) = r.room_and_user_counts();
            let g = r.gauges();
            assert_eq!(g.rooms, rooms);
            (rooms, users, g.memberships)
        };
        let steps: [(&RoomName, u64, bool); 12] = [
            (&a, 1, true),
            (&a, 1, true), // again: no second membership
            (&a, 2, true),
            (&ada, 1, true),
            (&ada, 2, true),
            (&b, 2, true),
            (&a, 3, false), // never a member
            (&a, 1, false),
            (&ada, 1, false),
            (&ada, 2, false),
            (&ada, 2, false), // already gone
            (&a, 2, false),
        ];
        for (room, id, join) in steps {
            if join {
                r.insert(room, SocketId(id), outbox());
            } else {
                r.remove(room, SocketId(id));
            }
            assert_eq!(kept(&r), walk(&r), "after {room} {id} {join}");
        }
        assert_eq!(kept(&r), (1, 0, 1));
    }

    #[test]
    fn leave_and_rejoin_during_an_in_flight_subscribe_converges() {
        let r = Registry::default();
        r.link_up();
        let a = room("a");
        r.insert(&a, SocketId(1), outbox());
        let c = r.take_pending(100); // SUBSCRIBE a in flight
        r.remove(&a, SocketId(1));
        r.confirm_subscribed(c.subscribe);
        // Nobody is left: the next pass must unsubscribe.
        assert_eq!(r.take_pending(100).unsubscribe, std::slice::from_ref(&a));
        // A join while that UNSUBSCRIBE is in flight must not count as subscribed.
        assert!(!r.insert(&a, SocketId(2), outbox()));
        r.confirm_unsubscribed(vec![a.clone()]);
        assert_eq!(r.take_pending(100).subscribe, [a]);
    }

    #[test]
    fn reconnect_resubscribes_every_room_and_nothing_while_down() {
        let r = Registry::default();
        r.link_up();
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            r.insert(&room(name), SocketId(i as u64), outbox());
        }
        r.confirm_subscribed(r.take_pending(100).subscribe);
        r.link_down(SystemTime::now());
        r.insert(&room("d"), SocketId(9), outbox());
        assert!(r.take_pending(100).is_empty(), "no commands while down");
        r.link_up();
        let mut again = r.take_pending(100).subscribe;
        again.sort();
        assert_eq!(again, ["a", "b", "c", "d"].map(room));
    }

    /// A linked registry with one socket each in rooms `plain` and `durable`, both subscribed.
    fn plain_and_durable_subscribed() -> (Registry, [RoomName; 2], [Arc<Outbox>; 2]) {
        let r = Registry::default();
        r.link_up();
        let (plain, durable) = (room("plain"), room("durable"));
        let (p, d) = (outbox(), outbox());
        r.insert(&plain, SocketId(1), p.clone());
        r.insert(&durable, SocketId(2), d.clone());
        r.confirm_subscribed(r.take_pending(100).subscribe);
        (r, [plain, durable], [p, d])
    }

    #[test]
    fn a_lost_sharded_subscription_tells_a_plain_room_and_hands_a_durable_one_over_once_resubscribed()
     {
        let (r, [plain, durable], [p, d]) = plain_and_durable_subscribed();
        let repairs = |room: &str| room == "durable";

        // Redis ends both subscriptions (their slot moved): both must be subscribed again.
        assert!(r.subscription_lost("plain", SystemTime::now(), repairs));
        assert!(r.subscription_lost("durable", SystemTime::now(), repairs));
        assert!(p.take_missed().is_some(), "a plain room is told at once");
        assert!(d.take_missed().is_none(), "a durable room is not told");
        assert_eq!(
            r.resubscribed(repairs),
            (0, Vec::new()),
            "not subscribed yet"
        );

        let mut again = r.take_pending(100).subscribe;
        again.sort();
        assert_eq!(again, [durable.clone(), plain.clone()]);
        r.confirm_subscribed(again);
        assert_eq!(r.resubscribed(repairs), (0, vec![durable.clone()]));
        assert_eq!(r.resubscribed(repairs), (0, Vec::new()), "handed over once");
        assert!(d.take_missed().is_none());

        // Our own SUNSUBSCRIBE's confirmation is not a loss.
        r.remove(&plain, SocketId(1));
        assert_eq!(r.take_pending(100).unsubscribe, [plain]);
        assert!(!r.subscription_lost("plain", SystemTime::now(), repairs));
    }

    #[test]
    fn a_link_loss_tells_plain_rooms_and_hands_durable_ones_over_when_resubscribed() {
        let (r, [_, durable], [p, d]) = plain_and_durable_subscribed();
        let repairs = |room: &str| room == "durable";
        r.link_down(SystemTime::now());
        r.link_up();
        r.confirm_subscribed(r.take_pending(100).subscribe);
        assert_eq!(r.resubscribed(repairs), (1, vec![durable]));
        assert!(p.take_missed().is_some());
        assert!(d.take_missed().is_none());
    }

    #[test]
    fn dispatch_skips_the_excluded_socket_and_counts() {
        let r = Registry::default();
        let a = room("a");
        let (o1, o2) = (outbox(), outbox());
        r.insert(&a, SocketId(1), o1.clone());
        r.insert(&a, SocketId(2), o2.clone());
        let mut offers = Offers::queueing();
        let d = r.dispatch(
            "a",
            &Message::Text("hi".into()),
            Some(SocketId(1)),
            OverflowPolicy::Disconnect,
            &mut offers,
        );
        assert_eq!(offers.to_wake(), 1, "only socket 2 needs its writer woken");
        assert_eq!(d.delivered, 1);
        assert_eq!(o1.held().0, 0);
        assert_eq!(o2.held().0, 1);
        assert_eq!(
            r.dispatch(
                "nobody",
                &Message::Text("x".into()),
                None,
                OverflowPolicy::Disconnect,
                &mut offers,
            )
            .delivered,
            0
        );
    }

    #[tokio::test]
    async fn wait_subscribed_times_out_while_redis_is_away() {
        let r = Registry::default();
        let a = room("a");
        r.insert(&a, SocketId(1), outbox());
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let err = r.wait_subscribed(&a, deadline).await.expect_err("timeout");
        assert!(err.is_timeout());
    }
}
