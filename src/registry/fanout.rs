//! Delivering to a room's local sockets: frames offered to their queues, and notices of the
//! gaps they may have missed.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::ws::Message;

use super::{Inner, Registry, SocketId};
use crate::config::OverflowPolicy;
use crate::missed::Missed;
use crate::queue::{Offer, Outbox};

/// The outcome of dispatching one frame to a room's local sockets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dispatched {
    pub(crate) delivered: u64,
    pub(crate) dropped: u64,
    pub(crate) overflowed: u64,
}

impl std::ops::AddAssign for Dispatched {
    fn add_assign(&mut self, rhs: Self) {
        self.delivered += rhs.delivered;
        self.dropped += rhs.dropped;
        self.overflowed += rhs.overflowed;
    }
}

impl Registry {
    /// Offers `frame` to every local socket of `room` except `except`. Never waits.
    ///
    /// Writers are not woken here: the outboxes that need a wake-up are pushed to `to_wake`,
    /// for the caller to wake once it has dispatched its whole batch.
    pub(crate) fn dispatch(
        &self,
        room: &str,
        frame: &Message,
        except: Option<SocketId>,
        policy: OverflowPolicy,
        to_wake: &mut Vec<Arc<Outbox>>,
    ) -> Dispatched {
        // A clone of a `Message` shares its payload (reference-counted `Bytes`).
        self.dispatch_with(room, except, policy, to_wake, |_| Some(frame.clone()))
    }

    /// Like [`dispatch`](Registry::dispatch), with the frame chosen per socket by `frame_for`
    /// (`None`: this socket takes it some other way). Durable rooms use it: sockets that
    /// asked for positions get their own frame, and a resuming socket's frames are held.
    pub(crate) fn dispatch_with(
        &self,
        room: &str,
        except: Option<SocketId>,
        policy: OverflowPolicy,
        to_wake: &mut Vec<Arc<Outbox>>,
        mut frame_for: impl FnMut(SocketId) -> Option<Message>,
    ) -> Dispatched {
        let mut out = Dispatched::default();
        let inner = self.lock();
        let Some((room, members)) = inner.rooms.get_key_value(room) else {
            return out;
        };
        let missed = |n: u64| {
            let now = SystemTime::now();
            Missed::new(room.clone(), now, now, Some(n))
        };
        for (&id, outbox) in members {
            if Some(id) == except {
                continue;
            }
            let Some(frame) = frame_for(id) else {
                continue;
            };
            let (offer, wake) = outbox.offer_deferred(frame, policy);
            if wake {
                to_wake.push(outbox.clone());
            }
            match offer {
                Offer::Queued => out.delivered += 1,
                Offer::QueuedDroppingOldest(n) => {
                    out.delivered += 1;
                    out.dropped += n as u64;
                    outbox.record_missed(missed(n as u64));
                }
                Offer::Dropped => {
                    out.dropped += 1;
                    outbox.record_missed(missed(1));
                }
                Offer::Overflowed => {
                    out.dropped += 1;
                    out.overflowed += 1;
                }
                Offer::Closed => {}
            }
        }
        out
    }

    /// Tells the members of `room` that messages may be missing (`dropped` of them, when
    /// known): a durable room's gap that its history could not fill.
    pub(crate) fn tell_missed(&self, room: &str, dropped: Option<u64>) {
        let now = SystemTime::now();
        tell_gap(&self.lock(), room, now, now, dropped);
    }

    /// The node dropped `n` messages of `room` before dispatching them: tell its members.
    pub(crate) fn shed(&self, room: &str, since: SystemTime, until: SystemTime, n: u64) {
        tell_gap(&self.lock(), room, since, until, Some(n));
    }
}

/// Tells every local member of `room` that its messages between `since` and `until` may be
/// missing (`dropped` of them, when known); returns how many members were told. Every kind of
/// gap (link loss, load shed, a lost sharded subscription, a queue overflow) goes through here.
pub(super) fn tell_gap(
    inner: &Inner,
    room: &str,
    since: SystemTime,
    until: SystemTime,
    dropped: Option<u64>,
) -> usize {
    let Some((room, members)) = inner.rooms.get_key_value(room) else {
        return 0;
    };
    for outbox in members.values() {
        outbox.record_missed(Missed::new(room.clone(), since, until, dropped));
    }
    members.len()
}
