//! Delivering to a room's local sockets: frames offered to their queues, and notices of the
//! gaps they may have missed.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::ws::Message;

use super::{Inner, Registry, SocketId};
use crate::config::OverflowPolicy;
use crate::envelope::Decoded;
use crate::missed::Missed;
use crate::queue::{Offer, Outbox};
use crate::stats::Counters;

/// The outcome of dispatching one frame to a room's local sockets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dispatched {
    pub(crate) delivered: u64,
    /// Of those delivered, written straight to the socket (one write each).
    pub(crate) written: u64,
    pub(crate) dropped: u64,
    pub(crate) overflowed: u64,
}

impl Dispatched {
    /// Adds these outcomes to the node's counters (a frame written straight to a socket is one
    /// socket write of one frame).
    pub(crate) fn count(&self, c: &Counters) {
        c.delivered.add(self.delivered);
        c.dropped.add(self.dropped);
        c.slow_disconnects.add(self.overflowed);
        c.socket_writes.add(self.written);
        c.frames_written.add(self.written);
    }
}

impl std::ops::AddAssign for Dispatched {
    fn add_assign(&mut self, rhs: Self) {
        self.delivered += rhs.delivered;
        self.written += rhs.written;
        self.dropped += rhs.dropped;
        self.overflowed += rhs.overflowed;
    }
}

/// One batch of offers to sockets' queues: how many frames may still be written straight to
/// idle sockets, and the writers to wake once the batch is done.
///
/// A batch that writes frames itself saves each idle socket's writer a wake-up (and, on a
/// multi-threaded runtime, the sibling worker's); one that queues them lets writers on every
/// worker send many frames per flush. The dispatcher chooses per batch (see `dispatch`); a
/// room with more local members than the batch may still write is queued whole, as its
/// writers then run on every worker.
#[derive(Debug)]
pub(crate) struct Offers {
    write_budget: usize,
    to_wake: Vec<Arc<Outbox>>,
}

impl Offers {
    /// Offers that only queue (until [`start`](Offers::start) gives them a budget).
    pub(crate) fn queueing() -> Self {
        Self {
            write_budget: 0,
            to_wake: Vec::new(),
        }
    }

    /// Starts the next batch with a budget of `budget` frames to write, keeping the list of
    /// writers to wake (empty after [`wake`](Offers::wake)) and its capacity: the dispatcher
    /// reuses one `Offers` for every batch rather than allocate a list per message.
    pub(crate) fn start(&mut self, budget: usize) {
        self.write_budget = budget;
    }

    /// Whether a room of `members` local sockets is written to (and counted against the
    /// budget) rather than queued.
    fn may_write(&mut self, members: usize) -> bool {
        let write = members <= self.write_budget;
        if write {
            self.write_budget -= members;
        }
        write
    }

    /// Offers `frame` to `outbox`, first trying to write it when `write` (see
    /// [`Outbox::offer_or_write`]); its writer is woken by [`wake`](Offers::wake) if needed.
    fn offer(
        &mut self,
        outbox: &Arc<Outbox>,
        frame: Message,
        policy: OverflowPolicy,
        write: bool,
    ) -> Offer {
        let (offer, wake) = if write {
            outbox.offer_or_write(frame, policy)
        } else {
            outbox.offer_deferred(frame, policy)
        };
        if wake {
            self.to_wake.push(outbox.clone());
        }
        offer
    }

    /// Wakes every writer the batch's offers asked for, once.
    pub(crate) fn wake(&mut self) {
        for outbox in self.to_wake.drain(..) {
            outbox.wake();
        }
    }

    /// Writers waiting for [`wake`](Offers::wake) (tests).
    #[cfg(test)]
    pub(crate) fn to_wake(&self) -> usize {
        self.to_wake.len()
    }
}

impl Registry {
    /// Offers `frame` to every local socket of `room` except `except`. Never waits (tests).
    ///
    /// Writers are not woken here: `offers` keeps the ones that need a wake-up, for the caller
    /// to wake once it has dispatched its whole batch.
    #[cfg(test)]
    pub(crate) fn dispatch(
        &self,
        room: &str,
        frame: &Message,
        except: Option<SocketId>,
        policy: OverflowPolicy,
        offers: &mut Offers,
    ) -> Dispatched {
        // A clone of a `Message` shares its payload (reference-counted `Bytes`).
        self.dispatch_with(room, except, policy, offers, |_, _| Some(frame.clone()))
    }

    /// Dispatches a decoded envelope of a plain room: the bare frame to most sockets, the
    /// frame with its room (made once, on the first such socket) to fanout-protocol sockets.
    pub(crate) fn dispatch_decoded(
        &self,
        room: &str,
        decoded: &Decoded,
        policy: OverflowPolicy,
        offers: &mut Offers,
    ) -> Dispatched {
        let except = decoded.except.map(SocketId::from_wire);
        let mut framed = None;
        self.dispatch_with(room, except, policy, offers, |_, outbox| {
            Some(if outbox.is_framed() {
                framed.get_or_insert_with(|| decoded.framed(room)).clone()
            } else {
                decoded.frame.clone()
            })
        })
    }

    /// Like [`dispatch`](Registry::dispatch), with the frame chosen per socket by `frame_for`
    /// (`None`: this socket takes it some other way) from the socket's id and queue. Durable
    /// rooms use it: sockets that asked for positions get their own frame, and a resuming
    /// socket's frames are held.
    pub(crate) fn dispatch_with(
        &self,
        room: &str,
        except: Option<SocketId>,
        policy: OverflowPolicy,
        offers: &mut Offers,
        mut frame_for: impl FnMut(SocketId, &Outbox) -> Option<Message>,
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
        let write = offers.may_write(members.len());
        for (&id, outbox) in members {
            if Some(id) == except {
                continue;
            }
            let Some(frame) = frame_for(id, outbox) else {
                continue;
            };
            match offers.offer(outbox, frame, policy, write) {
                Offer::Written => {
                    out.delivered += 1;
                    out.written += 1;
                }
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
