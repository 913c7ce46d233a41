//! Sockets with a deadline: one ordered set per node and one task that closes each socket at
//! its instant, unless it was moved (a refresh) or cleared first. Two deadlines use it: the
//! credentials' expiry (4001) and, for a fanout-protocol socket that must send its credentials
//! in a first command, the time it has to send them (1008).
//!
//! One timer for the whole node, not one per socket: a node of 100,000 sockets with tokens keeps
//! one sleeping task, and a refresh is a map update. A protocol socket (`Outbox::is_framed`) is
//! told why in a `fanout.disconnect` frame before the close frame; any other socket gets the
//! close frame only.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Utf8Bytes};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::close;
use crate::config::OverflowPolicy;
use crate::envelope::disconnect_frame;
use crate::queue::Outbox;
use crate::registry::SocketId;

/// Most jitter added to an expiry: tokens issued together (a fleet's deploy, a login burst)
/// must not close their sockets in the same instant, and a client may be late by this much.
pub(crate) const MAX_JITTER: Duration = Duration::from_secs(1);

/// What a socket's deadline is for, which says how it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// Its credentials expire: 4001 `"credentials expired"`; come back with new ones.
    Credentials,
    /// It has not sent its credentials yet (a protocol socket's `connect`): 1008
    /// `"credentials not sent in time"`; coming back the same way will not help.
    Connect,
}

impl Deadline {
    fn close_frame(self) -> (u16, &'static str, bool) {
        match self {
            Deadline::Credentials => (
                close::CREDENTIALS_EXPIRED,
                close::CREDENTIALS_EXPIRED_REASON,
                true,
            ),
            Deadline::Connect => (close::POLICY_VIOLATION, close::NO_CREDENTIALS_REASON, false),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Every socket's instant, in order: the task sleeps until the first.
    due: BTreeSet<(Instant, SocketId)>,
    /// Each socket's current instant, what it is for, and its queue.
    sockets: HashMap<SocketId, (Instant, Deadline, Arc<Outbox>)>,
}

/// The node's sockets with an expiry.
#[derive(Debug, Default)]
pub(crate) struct Expiries {
    /// A leaf lock: nothing else is taken while it is held.
    inner: Mutex<Inner>,
    /// Wakes the task when an earlier instant is set.
    changed: Notify,
}

impl Expiries {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every section leaves both maps in step; a panic elsewhere breaks nothing here.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes `socket` at `at` for `why` unless set again or cleared; replaces its earlier
    /// deadline.
    pub(crate) fn set(&self, socket: SocketId, outbox: &Arc<Outbox>, at: Instant, why: Deadline) {
        let mut inner = self.lock();
        if let Some((old, _, _)) = inner.sockets.insert(socket, (at, why, outbox.clone())) {
            inner.due.remove(&(old, socket));
        }
        inner.due.insert((at, socket));
        let first = inner
            .due
            .first()
            .is_some_and(|&(t, s)| t == at && s == socket);
        drop(inner);
        if first {
            self.changed.notify_one();
        }
    }

    /// The socket's instant, if it has one for `why`.
    pub(crate) fn get(&self, socket: SocketId, why: Deadline) -> Option<Instant> {
        let inner = self.lock();
        let (at, set_for, _) = inner.sockets.get(&socket)?;
        (*set_for == why).then_some(*at)
    }

    /// The socket closed, or no longer has a deadline: nothing closes it any more. The task
    /// is not woken: at worst it wakes once at the old instant and finds nothing due.
    pub(crate) fn forget(&self, socket: SocketId) {
        let mut inner = self.lock();
        if let Some((at, _, _)) = inner.sockets.remove(&socket) {
            inner.due.remove(&(at, socket));
        }
    }

    /// Takes out every socket due at `now`; returns them and the next instant.
    fn take_due(&self, now: Instant) -> (Vec<(Arc<Outbox>, Deadline)>, Option<Instant>) {
        let mut inner = self.lock();
        let mut due = Vec::new();
        while let Some(&(at, socket)) = inner.due.first() {
            if at > now {
                break;
            }
            inner.due.pop_first();
            if let Some((_, why, outbox)) = inner.sockets.remove(&socket) {
                due.push((outbox, why));
            }
        }
        let next = inner.due.first().map(|&(at, _)| at);
        (due, next)
    }
}

/// Closes every socket at its instant, until `stop` changes or is dropped.
pub(crate) async fn run(expiries: Arc<Expiries>, mut stop: watch::Receiver<()>) {
    loop {
        let (due, next) = expiries.take_due(Instant::now());
        for (outbox, why) in due {
            let (code, reason, reconnect) = why.close_frame();
            if outbox.is_framed() {
                // Dropped rather than closing for overflow: the close frame follows anyway.
                let told = disconnect_frame(code, reason, reconnect).into_frame();
                outbox.offer(told, OverflowPolicy::DropNewest);
            }
            outbox.close_after_flush(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            }));
        }
        // Far enough to mean "nothing due": a set() wakes the task before then.
        let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = expiries.changed.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::testing::outbox;

    #[test]
    fn a_later_instant_replaces_the_earlier_and_forget_removes_it() {
        let e = Expiries::default();
        let (a, b) = (outbox(), outbox());
        let now = Instant::now();
        let c = Deadline::Credentials;
        e.set(SocketId::from_wire(1), &a, now + Duration::from_secs(5), c);
        e.set(SocketId::from_wire(2), &b, now + Duration::from_secs(1), c);
        e.set(SocketId::from_wire(1), &a, now + Duration::from_secs(9), c);
        let (due, next) = e.take_due(now + Duration::from_secs(6));
        assert_eq!(due.len(), 1, "socket 2 only: socket 1 was refreshed");
        assert_eq!(next, Some(now + Duration::from_secs(9)));
        e.forget(SocketId::from_wire(1));
        let (due, next) = e.take_due(now + Duration::from_secs(60));
        assert!(due.is_empty());
        assert_eq!(next, None);
    }
}
