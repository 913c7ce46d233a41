//! Counters: every message published, delivered, dropped or rejected is counted here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// One monotonic counter, mirrored to the [`metrics`] facade under `name` so that any installed
/// recorder (a Prometheus exporter, say) sees the same numbers as [`Stats`].
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    name: &'static str,
}

impl Counter {
    const fn new(name: &'static str) -> Self {
        Self {
            value: AtomicU64::new(0),
            name,
        }
    }

    pub(crate) fn add(&self, n: u64) {
        if n > 0 {
            // Relaxed: each counter is independent and only read for reporting.
            self.value.fetch_add(n, Relaxed);
            metrics::counter!(self.name).increment(n);
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.value.load(Relaxed)
    }
}

/// The counters of one node, shared by its tasks. Metric names are listed in [`Stats`].
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) published: Counter,
    pub(crate) publish_errors: Counter,
    pub(crate) received: Counter,
    pub(crate) delivered: Counter,
    pub(crate) dropped: Counter,
    pub(crate) slow_disconnects: Counter,
    pub(crate) malformed: Counter,
    pub(crate) inbound_dropped: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) rejected_connections: Counter,
    pub(crate) rate_limited: Counter,
    pub(crate) heartbeat_timeouts: Counter,
    pub(crate) socket_writes: Counter,
    pub(crate) frames_written: Counter,
    pub(crate) accepts_out_of_fds: Counter,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            published: Counter::new("axum_fanout_published_total"),
            publish_errors: Counter::new("axum_fanout_publish_errors_total"),
            received: Counter::new("axum_fanout_received_total"),
            delivered: Counter::new("axum_fanout_delivered_total"),
            dropped: Counter::new("axum_fanout_dropped_total"),
            slow_disconnects: Counter::new("axum_fanout_slow_disconnects_total"),
            malformed: Counter::new("axum_fanout_malformed_total"),
            inbound_dropped: Counter::new("axum_fanout_inbound_dropped_total"),
            reconnects: Counter::new("axum_fanout_reconnects_total"),
            rejected_connections: Counter::new("axum_fanout_rejected_connections_total"),
            rate_limited: Counter::new("axum_fanout_rate_limited_total"),
            heartbeat_timeouts: Counter::new("axum_fanout_heartbeat_timeouts_total"),
            socket_writes: Counter::new("axum_fanout_socket_writes_total"),
            frames_written: Counter::new("axum_fanout_frames_written_total"),
            accepts_out_of_fds: Counter::new("axum_fanout_accepts_out_of_fds_total"),
        }
    }
}

/// A snapshot of one node's activity, from [`RoomHandle::stats`](crate::RoomHandle::stats).
///
/// Counters are totals since the node started; `rooms`, `sockets` and `subscriptions` are
/// current values. Each counter is also reported through the [`metrics`] facade as
/// `axum_fanout_<field>_total` (e.g. `axum_fanout_delivered_total`), so an installed recorder
/// such as a Prometheus exporter collects them with no further code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Rooms with at least one local socket.
    pub rooms: usize,
    /// WebSocket connections attached to this node, in rooms or not.
    pub connections: usize,
    /// (socket, room) memberships: a socket in two rooms counts twice.
    pub memberships: usize,
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
    /// Upgrades refused with 503 because the node was at `max_connections`.
    pub rejected_connections: u64,
    /// Sockets closed for sending faster than the message rate limit.
    pub rate_limited: u64,
    /// Sockets closed because the client stopped answering pings.
    pub heartbeat_timeouts: u64,
    /// Batched writes (one flush each) by the sockets' writers.
    pub socket_writes: u64,
    /// Frames those writes carried: `frames_written / socket_writes` is the batching achieved.
    pub frames_written: u64,
    /// Accepts that failed because the process or the system ran out of file descriptors
    /// (with [`FanoutListener`](crate::FanoutListener)): each left a connection waiting.
    pub accepts_out_of_fds: u64,
}

/// The current sizes of a node's registry: the part of [`Stats`] that is not a counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Gauges {
    pub(crate) rooms: usize,
    pub(crate) connections: usize,
    pub(crate) memberships: usize,
    pub(crate) subscriptions: usize,
}

impl Counters {
    pub(crate) fn snapshot(&self, gauges: Gauges) -> Stats {
        let Gauges {
            rooms,
            connections,
            memberships,
            subscriptions,
        } = gauges;
        Stats {
            rooms,
            connections,
            memberships,
            subscriptions,
            published: self.published.get(),
            publish_errors: self.publish_errors.get(),
            received: self.received.get(),
            delivered: self.delivered.get(),
            dropped: self.dropped.get(),
            slow_disconnects: self.slow_disconnects.get(),
            malformed: self.malformed.get(),
            inbound_dropped: self.inbound_dropped.get(),
            reconnects: self.reconnects.get(),
            rejected_connections: self.rejected_connections.get(),
            rate_limited: self.rate_limited.get(),
            heartbeat_timeouts: self.heartbeat_timeouts.get(),
            socket_writes: self.socket_writes.get(),
            frames_written: self.frames_written.get(),
            accepts_out_of_fds: self.accepts_out_of_fds.get(),
        }
    }
}
