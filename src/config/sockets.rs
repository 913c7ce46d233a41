//! The builder's per-socket knobs: queue bounds and overflow, batched writes, WebSocket
//! buffers, connection and room limits, rate limits and heartbeats.

use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use super::{FanoutBuilder, OverflowPolicy};
#[cfg(doc)]
use crate::error::Error;

impl FanoutBuilder {
    /// Most frames queued for one socket (queued plus handed to the writer, not yet flushed).
    ///
    /// Defaults to 4096.
    pub fn queue_frames(mut self, frames: NonZeroUsize) -> Self {
        self.config.queue_frames = frames;
        self
    }

    /// Most payload bytes queued for one socket (queued plus handed to the writer, not yet
    /// flushed). A single frame larger than this is still accepted into an empty queue.
    ///
    /// Defaults to 1 MiB.
    pub fn queue_bytes(mut self, bytes: NonZeroUsize) -> Self {
        self.config.queue_bytes = bytes;
        self
    }

    /// What happens to a socket whose queue is full.
    ///
    /// Defaults to [`OverflowPolicy::Disconnect`].
    pub fn overflow(mut self, policy: OverflowPolicy) -> Self {
        self.config.overflow = policy;
        self
    }

    /// Overrides the overflow policy for one room: a frame of `room` offered to a full queue
    /// gets `policy` instead of the layer's. A ticker room may prefer
    /// [`OverflowPolicy::DropOldest`] while chat rooms keep `Disconnect`.
    ///
    /// Defaults to no overrides.
    pub fn room_overflow(mut self, room: impl Into<String>, policy: OverflowPolicy) -> Self {
        self.config.room_overflow.insert(room.into(), policy);
        self
    }

    /// Most frames a socket's writer feeds before one flush.
    ///
    /// Defaults to 64.
    pub fn batch_frames(mut self, frames: NonZeroUsize) -> Self {
        self.config.batch_frames = frames;
        self
    }

    /// How long a busy socket gathers frames between two writes.
    ///
    /// A socket that keeps up (each write carries one frame) writes every frame at once, so
    /// light traffic gets no added latency, and so does a short burst (a write of a few
    /// frames). When a write carried many frames (8, or a full batch when
    /// [`batch_frames`](FanoutBuilder::batch_frames) is smaller), traffic is outrunning the
    /// socket, and the writer waits this long before the next write so that it
    /// carries many frames: one syscall for many frames instead of one each, which is most of
    /// a busy node's CPU. A full batch ([`batch_frames`](FanoutBuilder::batch_frames)) already
    /// queued goes out at once: a burst such as a resume's replay is not slowed down. Zero
    /// writes as soon as the writer wakes, always.
    ///
    /// Defaults to 4 ms: long enough that a busy socket's write carries tens of frames, short
    /// enough to stay well under what a person notices.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.config.flush_interval = interval;
        self
    }

    /// How long one batched write may take before the client counts as a slow consumer and is
    /// closed.
    ///
    /// Defaults to 5 seconds.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// WebSocket read buffer per socket, applied by [`RoomHandle::on_upgrade`](crate::RoomHandle::on_upgrade).
    ///
    /// Defaults to 2 KiB (axum's default is 128 KiB, allocated up front for every socket, idle
    /// or not). It is allocated per socket and dominates an idle connection's cost; a larger
    /// message grows the buffer to its size while it is read.
    pub fn read_buffer_size(mut self, bytes: usize) -> Self {
        self.config.read_buffer_size = bytes;
        self
    }

    /// Bytes the WebSocket writer gathers before it writes to the TCP socket.
    ///
    /// Defaults to 16 KiB (axum's default is 128 KiB).
    pub fn write_buffer_size(mut self, bytes: usize) -> Self {
        self.config.write_buffer_size = bytes;
        self
    }

    /// Largest client message (and frame) accepted; a larger one closes the socket with 1009.
    ///
    /// Defaults to 64 KiB (axum's default is 64 MiB).
    pub fn max_message_size(mut self, bytes: NonZeroUsize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// Most WebSocket connections this node accepts; beyond it,
    /// [`RoomHandle::on_upgrade`](crate::RoomHandle::on_upgrade) answers 503 instead of
    /// upgrading.
    ///
    /// Defaults to 100,000.
    pub fn max_connections(mut self, connections: NonZeroUsize) -> Self {
        self.config.max_connections = connections;
        self
    }

    /// Origins whose pages may open WebSockets to this node, besides its own: each
    /// `scheme://host[:port]` as browsers send it in `Origin`, or `"*"` for any. Every
    /// WebSocket upgrade behind the layer ([`RoomHandle::on_upgrade`](crate::RoomHandle::on_upgrade)
    /// and the [`protocol`](crate::protocol) route) from a browser on another origin is answered
    /// 403 before upgrading: browsers send cookies with an upgrade from any site, so without
    /// this check a cookie-authenticated application is open to cross-site WebSocket hijacking.
    /// A request without `Origin` (not a browser) always passes.
    ///
    /// Defaults to none: the same origin only (the `Origin`'s host and port equal `Host`).
    pub fn allowed_origins<I, O>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = O>,
        O: Into<String>,
    {
        self.config
            .allowed_origins
            .extend(origins.into_iter().map(Into::into));
        self
    }

    /// Most rooms one socket may be in; a join beyond it fails with [`Error::is_limit`].
    ///
    /// Defaults to 100.
    pub fn max_rooms_per_socket(mut self, rooms: NonZeroUsize) -> Self {
        self.config.max_rooms_per_socket = rooms;
        self
    }

    /// Most broadcasts one socket may have queued and unanswered at once, with
    /// [`Broadcast::queue`](crate::Broadcast::queue) from
    /// [`FanoutSocket::broadcast`](crate::FanoutSocket::broadcast); beyond it, `queue` waits for
    /// the oldest reply (backpressure on that client's reader).
    ///
    /// Defaults to 64.
    pub fn broadcasts_in_flight(mut self, broadcasts: NonZeroUsize) -> Self {
        self.config.broadcasts_in_flight = broadcasts;
        self
    }

    /// Sustained client messages per second per socket (a token bucket that refills at this
    /// rate and holds [`message_burst`](FanoutBuilder::message_burst) tokens). A client that
    /// sends faster is closed with 1008 `"rate limit exceeded"`, and
    /// [`recv`](crate::FanoutSocket::recv) yields an error for which [`Error::is_limit`] is true.
    ///
    /// Defaults to 1000 per second: a ceiling against floods that leaves machine clients alone;
    /// a human chat wants far less.
    pub fn messages_per_second(mut self, rate: NonZeroU32) -> Self {
        self.config.messages_per_second = rate;
        self
    }

    /// Messages a client may send in a burst above the sustained rate.
    ///
    /// Defaults to 2000.
    pub fn message_burst(mut self, burst: NonZeroU32) -> Self {
        self.config.message_burst = burst;
        self
    }

    /// How often each socket is pinged. A client that sent nothing (not even a pong) for
    /// `ping_interval + pong_timeout` is closed with 1001, so half-open TCP connections do not
    /// stay in rooms forever. The node reads the client's pongs itself whenever the handler is
    /// not in [`recv`](crate::FanoutSocket::recv), so a handler that only pushes keeps its
    /// client alive without reading. The node pings its sockets a slice at a time (25 slices per interval),
    /// so that 100,000 sockets make a steady 4,000 pings a second, not a burst every interval.
    ///
    /// Defaults to 25 seconds; zero turns heartbeats off.
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.config.ping_interval = every;
        self
    }

    /// How long after a ping a client may stay silent before it is closed.
    ///
    /// Defaults to 10 seconds.
    pub fn pong_timeout(mut self, timeout: Duration) -> Self {
        self.config.pong_timeout = timeout;
        self
    }
}
