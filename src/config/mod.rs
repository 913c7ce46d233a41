//! Configuration: every knob, its default and why.
//!
//! Defaults follow the seed where it names a value (channel prefix `ws:room:`, one shard,
//! reconnect backoff capped at 2000 ms) and are otherwise chosen for many small, mostly idle
//! sockets.

mod builder;
mod durability;
mod sockets;

pub use builder::FanoutBuilder;
pub use durability::Durability;

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::time::Duration;

use crate::room::user_of;

/// What to do when a socket's send queue is full (the client reads slower than its rooms talk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Close the socket with code 1013 and reason `"slow consumer"`.
    ///
    /// The default: a client that cannot keep up has already lost messages, and telling it (so
    /// it reconnects and resyncs) beats feeding it a history with silent holes.
    #[default]
    Disconnect,
    /// Drop the oldest queued frames to make room for the new one.
    DropOldest,
    /// Drop the new frame and keep what is queued.
    DropNewest,
}

/// Where the node connects: the Redis deployment and what TLS trusts. Plain values; the
/// backend (`bus::backend`) parses and checks them when the layer is built, and its `Debug`
/// (there too, beside the URL parsing) never shows a password.
#[derive(Clone)]
pub(crate) struct Connect {
    pub(crate) target: Target,
    /// PEM root certificate(s) to trust instead of the system's store, for `rediss://`.
    #[cfg(feature = "tls")]
    pub(crate) tls_root_certificate: Option<Vec<u8>>,
}

/// One Redis server, or the seed nodes of a Redis Cluster.
#[derive(Clone)]
pub(crate) enum Target {
    Server(String),
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
}

/// Where a node's Redis is, as [`FanoutLayer::new`](crate::FanoutLayer::new) and
/// [`FanoutLayer::builder`](crate::FanoutLayer::builder) take it: one server's URL (a `&str`
/// or `String`); under Redis Sentinel, the sentinels and the master's name as
/// `redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER` (the node asks them for the master and
/// follows a failover: see the README's "Redis Sentinel"); or, with the `cluster` feature, a
/// Redis Cluster's nodes (an array or `Vec` of URLs: any subset of its masters and replicas,
/// the rest is discovered; broadcasts then use Redis 7's sharded pub/sub).
///
/// ```
/// use axum_fanout::FanoutLayer;
///
/// let one_server = FanoutLayer::builder("redis://127.0.0.1:6379");
/// let under_sentinel =
///     FanoutLayer::builder("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster");
/// # #[cfg(feature = "cluster")]
/// let cluster = FanoutLayer::builder(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]);
/// ```
#[derive(Clone)]
pub struct RedisTarget(pub(crate) Target);

impl std::fmt::Debug for RedisTarget {
    // No URL: it may carry a password (the layer's own Debug redacts it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Target::Server(_) => f.write_str("RedisTarget::Server(..)"),
            #[cfg(feature = "cluster")]
            Target::Cluster(nodes) => write!(f, "RedisTarget::Cluster({} nodes)", nodes.len()),
        }
    }
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        Self(Target::Server(url.to_owned()))
    }
}

impl From<String> for RedisTarget {
    fn from(url: String) -> Self {
        Self(Target::Server(url))
    }
}

impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        Self(Target::Server(url.clone()))
    }
}

#[cfg(feature = "cluster")]
impl<S: Into<String>, const N: usize> From<[S; N]> for RedisTarget {
    fn from(nodes: [S; N]) -> Self {
        Self(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }
}

#[cfg(feature = "cluster")]
impl<S: Into<String>> From<Vec<S>> for RedisTarget {
    fn from(nodes: Vec<S>) -> Self {
        Self(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }
}

/// The settings the running node reads; built by [`FanoutBuilder`].
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) node_id: String,
    pub(crate) channel_prefix: String,
    pub(crate) shard_count: NonZeroU16,
    /// Per-room overrides of `shard_count` (hot rooms only).
    pub(crate) room_shards: HashMap<String, NonZeroU16>,
    pub(crate) queue_frames: NonZeroUsize,
    pub(crate) queue_bytes: NonZeroUsize,
    pub(crate) overflow: OverflowPolicy,
    /// Per-room overrides of `overflow` (hot rooms where dropping beats disconnecting).
    pub(crate) room_overflow: HashMap<String, OverflowPolicy>,
    pub(crate) batch_frames: NonZeroUsize,
    pub(crate) write_timeout: Duration,
    pub(crate) flush_interval: Duration,
    pub(crate) read_buffer_size: usize,
    pub(crate) write_buffer_size: usize,
    pub(crate) max_message_size: NonZeroUsize,
    pub(crate) publish_timeout: Duration,
    pub(crate) subscribe_timeout: Duration,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) inbound_capacity: NonZeroUsize,
    pub(crate) probe_interval: Duration,
    pub(crate) max_connections: NonZeroUsize,
    pub(crate) max_envelope_bytes: NonZeroUsize,
    pub(crate) max_rooms_per_socket: NonZeroUsize,
    /// Origins whose browsers may upgrade besides the node's own (`"*"`: any).
    pub(crate) allowed_origins: Vec<String>,
    pub(crate) broadcasts_in_flight: NonZeroUsize,
    pub(crate) messages_per_second: NonZeroU32,
    pub(crate) message_burst: NonZeroU32,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    /// How long a shutdown spreads its sockets' closes over.
    pub(crate) drain_window: Duration,
    /// Presence for every room, or only for `presence_rooms` (see `presence`).
    pub(crate) presence_all: bool,
    pub(crate) presence_rooms: HashSet<String>,
    pub(crate) presence_ttl: Duration,
    /// Durable rooms (`durable`): every room's settings, or none.
    pub(crate) durable: Option<Durability>,
    /// Per-room durable settings, overriding `durable`.
    pub(crate) durable_rooms: HashMap<String, Durability>,
}

impl Config {
    /// The overflow policy for frames of `room`.
    pub(crate) fn overflow_for(&self, room: &str) -> OverflowPolicy {
        if self.room_overflow.is_empty() {
            return self.overflow;
        }
        self.room_overflow
            .get(room)
            .copied()
            .unwrap_or(self.overflow)
    }

    /// Whether sockets of `room` may join it as members (presence is opted in for it).
    pub(crate) fn has_presence(&self, room: &str) -> bool {
        (self.presence_all && user_of(room).is_none()) || self.presence_rooms.contains(room)
    }

    /// Whether any room may have presence: the node then keeps a lease in Redis.
    pub(crate) fn uses_presence(&self) -> bool {
        self.presence_all || !self.presence_rooms.is_empty()
    }

    /// The durable settings of `room`, `None` for a plain room. One branch when no room is
    /// durable: plain rooms pay nothing more.
    pub(crate) fn durable_for(&self, room: &str) -> Option<&Durability> {
        // A user's room (`crate::users`) is never durable, whatever the default says.
        let default = || self.durable.as_ref().filter(|_| user_of(room).is_none());
        if self.durable_rooms.is_empty() {
            return default();
        }
        self.durable_rooms.get(room).or_else(default)
    }
}

// `NonZeroUsize::new(literal)` in a const: every literal passed below is non-zero.
pub(crate) const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

pub(crate) const fn nz32(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}
