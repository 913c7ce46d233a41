//! Counters: every message published, delivered, dropped or rejected is counted here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Monotonic counters, shared by the tasks of one node. Relaxed atomics: each counter is
/// independent and only read for reporting.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) slow_disconnects: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) inbound_dropped: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }
}

/// A snapshot of one node's activity, from [`RoomHandle::stats`](crate::RoomHandle::stats).
///
/// Counters are totals since the node started; `rooms`, `sockets` and `subscriptions` are
/// current values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Rooms with at least one local socket.
    pub rooms: usize,
    /// Local socket memberships (a socket in two rooms counts twice).
    pub sockets: usize,
    /// Room channels Redis confirmed for this node.
    pub subscriptions: usize,
    /// Envelopes this node published (PUBLISH replied).
    pub published: u64,
    /// Broadcasts that failed (Redis error or timeout).
    pub publish_errors: u64,
    /// Envelopes received from Redis and decoded.
    pub received: u64,
    /// Frames handed to local sockets' queues.
    pub delivered: u64,
    /// Frames dropped because a socket's queue was full.
    pub dropped: u64,
    /// Sockets closed because they could not keep up (queue full or write timeout).
    pub slow_disconnects: u64,
    /// Envelopes dropped because they could not be decoded.
    pub malformed: u64,
    /// Messages dropped between Redis and the dispatcher because it fell behind.
    pub inbound_dropped: u64,
    /// Times the subscriber link was lost and re-established.
    pub reconnects: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self, rooms: usize, sockets: usize, subscriptions: usize) -> Stats {
        Stats {
            rooms,
            sockets,
            subscriptions,
            published: self.published.load(Relaxed),
            publish_errors: self.publish_errors.load(Relaxed),
            received: self.received.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            slow_disconnects: self.slow_disconnects.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            inbound_dropped: self.inbound_dropped.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
        }
    }
}
