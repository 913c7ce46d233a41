//! The builder: where the node connects, its identity and channels, its Redis-facing knobs
//! (timeouts, backoff, probes), durable rooms and presence. The per-socket knobs are in
//! `sockets`.

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU16, NonZeroUsize};
use std::time::Duration;

use super::{Config, Connect, Durability, OverflowPolicy, RedisTarget, Target, nz, nz32};
#[cfg(doc)]
use crate::error::Error;

/// Builds a [`FanoutLayer`](crate::FanoutLayer) with non-default settings.
///
/// ```
/// use std::num::NonZeroUsize;
/// use std::time::Duration;
/// use axum_fanout::{FanoutLayer, OverflowPolicy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = FanoutLayer::builder("redis://127.0.0.1:6379")
///     .node_id("eu-west-1a")
///     .channel_prefix("chat:room:")
///     .queue_bytes(NonZeroUsize::try_from(256 * 1024)?)
///     .overflow(OverflowPolicy::DropOldest)
///     .publish_timeout(Duration::from_secs(1))
///     .build()?;
/// # let _ = layer; Ok(()) }
/// ```
///
/// # Secure Redis
///
/// Credentials go in the URL, for both connections (publisher and subscriber):
/// `redis://:password@host:6379` (the `default` user, `requirepass`) or
/// `redis://user:password@host:6379` (an ACL user); percent-encode reserved characters in
/// them. With the `tls` cargo feature, a `rediss://` URL connects over TLS (rustls), verifying
/// the server's certificate against the system's trust store, or against the certificate
/// given to [`tls_root_certificate`](FanoutBuilder::tls_root_certificate). The builder's
/// `Debug` output and the crate's logs never show the password.
///
/// # Redis Cluster
///
/// With the `cluster` cargo feature, `FanoutLayer::builder([node URLs..])` starts the same
/// builder for a Redis Cluster (sharded pub/sub); every setting here applies unchanged.
#[derive(Clone, Debug)]
pub struct FanoutBuilder {
    pub(super) connect: Connect,
    pub(super) config: Config,
}

impl FanoutBuilder {
    pub(crate) fn new(redis: impl Into<RedisTarget>) -> Self {
        Self::with_target(redis.into().0)
    }

    fn with_target(target: Target) -> Self {
        Self {
            connect: Connect {
                target,
                #[cfg(feature = "tls")]
                tls_root_certificate: None,
            },
            config: Config {
                node_id: crate::random::hex_id(),
                channel_prefix: "ws:room:".to_owned(),
                shard_count: NonZeroU16::MIN,
                room_shards: HashMap::new(),
                // 1 MiB holds 4096 chat-sized (256 B) frames: the byte bound governs normal
                // traffic; the frame bound caps bookkeeping when frames are tiny.
                queue_frames: nz(4096),
                queue_bytes: nz(1024 * 1024),
                overflow: OverflowPolicy::Disconnect,
                room_overflow: HashMap::new(),
                // One flush per up to 64 frames: far fewer writes than a flush per frame
                // (BENCHMARKS.md), while a batch of 256-byte frames still fits one 16 KiB TCP
                // write.
                batch_frames: nz(64),
                write_timeout: Duration::from_secs(5),
                flush_interval: Duration::from_millis(4),
                read_buffer_size: 2 * 1024,
                write_buffer_size: 16 * 1024,
                max_message_size: nz(64 * 1024),
                publish_timeout: Duration::from_secs(2),
                subscribe_timeout: Duration::from_secs(5),
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(2000),
                inbound_capacity: nz(16 * 1024),
                probe_interval: Duration::from_secs(5),
                max_connections: nz(100_000),
                max_envelope_bytes: nz(1024 * 1024),
                max_rooms_per_socket: nz(100),
                // Enough to cover a Redis round trip at thousands of messages per second from
                // one client, small enough that a client cannot queue much while Redis is away.
                broadcasts_in_flight: nz(64),
                // A ceiling against floods, not a chat etiquette: lower it for human chat.
                messages_per_second: nz32(1000),
                message_burst: nz32(2000),
                ping_interval: Duration::from_secs(25),
                pong_timeout: Duration::from_secs(10),
                probe_timeout: Duration::from_secs(2),
                shutdown_timeout: Duration::from_secs(5),
                drain_window: Duration::from_secs(3),
                presence_all: false,
                presence_rooms: HashSet::new(),
                presence_ttl: Duration::from_secs(30),
                durable: None,
                durable_rooms: HashMap::new(),
                allowed_origins: Vec::new(),
            },
        }
    }

    /// This node's identity, written as `origin` in every envelope it publishes.
    ///
    /// Defaults to 16 random hex digits, different on every start.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.config.node_id = id.into();
        self
    }

    /// Prefix of every room's Redis channel: room `42` lives on `<prefix>42`.
    ///
    /// Defaults to `ws:room:`.
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.channel_prefix = prefix.into();
        self
    }

    /// Number of channels every room's traffic is split over.
    ///
    /// With more than one shard, room `42` lives on `<prefix>42:shard0` .. `<prefix>42:shard<N-1>`;
    /// each broadcast goes to the shard of its sender ([`Broadcast::sender`](crate::Broadcast::sender)),
    /// and every node holding the room subscribes to all of them. Order then holds per sender,
    /// not across senders. Every node of a fleet must use the same value. Prefer
    /// [`room_shards`](FanoutBuilder::room_shards) for the few hot rooms that need it.
    ///
    /// Defaults to 1 (the seed's channel `<prefix><room>`).
    pub fn shard_count(mut self, shards: NonZeroU16) -> Self {
        self.config.shard_count = shards;
        self
    }

    /// Splits one room over `shards` channels, overriding [`shard_count`](FanoutBuilder::shard_count)
    /// for it (as the seed advises, for hot rooms only).
    ///
    /// Defaults to no overrides.
    pub fn room_shards(mut self, room: impl Into<String>, shards: NonZeroU16) -> Self {
        self.config.room_shards.insert(room.into(), shards);
        self
    }

    /// Makes every room durable: its messages are kept in a Redis stream and numbered, so a
    /// socket can resume where it stopped ([`FanoutSocket::join_durable`](crate::FanoutSocket::join_durable))
    /// and handlers can read the history ([`RoomHandle::history`](crate::RoomHandle::history)).
    /// Every node of a fleet must agree on which rooms are durable. Durable rooms are never
    /// sharded (one channel per room, so one order).
    ///
    /// Defaults to none: every room is plain pub/sub.
    pub fn durable(mut self, settings: Durability) -> Self {
        self.config.durable = Some(settings);
        self
    }

    /// Makes one room durable with `settings`, overriding [`durable`](FanoutBuilder::durable).
    ///
    /// Defaults to no overrides.
    pub fn durable_room(mut self, room: impl Into<String>, settings: Durability) -> Self {
        self.config.durable_rooms.insert(room.into(), settings);
        self
    }

    /// How long a broadcast waits for Redis (connection and reply) before it fails with
    /// [`Error::is_timeout`].
    ///
    /// Defaults to 2 seconds.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.config.publish_timeout = timeout;
        self
    }

    /// How long a join waits for Redis to confirm the room's SUBSCRIBE before it fails with
    /// [`Error::is_timeout`].
    ///
    /// Defaults to 5 seconds.
    pub fn subscribe_timeout(mut self, timeout: Duration) -> Self {
        self.config.subscribe_timeout = timeout;
        self
    }

    /// Longest pause between two reconnect attempts; pauses start at 50 ms and double.
    ///
    /// Defaults to 2000 ms, the seed's production value.
    pub fn reconnect_backoff_max(mut self, max: Duration) -> Self {
        self.config.backoff_max = max.max(self.config.backoff_min);
        self
    }

    /// Messages that may wait between the Redis connection and the dispatcher. Beyond it,
    /// messages are dropped and counted instead of growing memory.
    ///
    /// Defaults to 16384.
    pub fn inbound_capacity(mut self, messages: NonZeroUsize) -> Self {
        self.config.inbound_capacity = messages;
        self
    }

    /// Largest envelope this node publishes or accepts from Redis. A larger broadcast fails with
    /// [`Error::is_invalid_payload`]; a larger envelope on a room channel (from another
    /// publisher) is counted as malformed and dropped before it is parsed.
    ///
    /// Defaults to 1 MiB.
    pub fn max_envelope_bytes(mut self, bytes: NonZeroUsize) -> Self {
        self.config.max_envelope_bytes = bytes;
        self
    }

    /// How often the subscriber link is probed: the node publishes a token on its private
    /// channel (`__axum_fanout:probe:<node id>`) over the subscriber connection and expects it
    /// back. A connection that stays up at the TCP level but no longer delivers (a frozen or
    /// wedged Redis) is then detected, dropped and replaced. On a Redis Cluster there is one
    /// such channel per master (`__axum_fanout:probe:<node id>:<n>`, in a slot that master
    /// serves), and every one must come back.
    ///
    /// Defaults to 5 seconds (a stale link is detected within interval + probe timeout).
    pub fn probe_interval(mut self, every: Duration) -> Self {
        self.config.probe_interval = every.max(Duration::from_millis(10));
        self
    }

    /// How long a probe may take to come back before the link counts as stale.
    ///
    /// Defaults to 2 seconds.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.config.probe_timeout = timeout;
        self
    }

    /// How long [`RoomHandle::shutdown`](crate::RoomHandle::shutdown) waits, after the drain
    /// window, for sockets to flush and close and for the node's UNSUBSCRIBEs to be confirmed.
    ///
    /// Defaults to 5 seconds.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// How long [`RoomHandle::shutdown`](crate::RoomHandle::shutdown) spreads its sockets'
    /// closes over. A rolling restart closes every socket of a node; closed all at once, they
    /// all reconnect to the other nodes at once and resume at once, reading the same history
    /// pages (a reconnect herd). Spread evenly over the window, they arrive as a stream. Each
    /// socket is told to come back ([`close::GOING_AWAY`](crate::close::GOING_AWAY),
    /// [`close::SHUTTING_DOWN_REASON`](crate::close::SHUTTING_DOWN_REASON)); clients should
    /// still add their own jitter.
    ///
    /// Defaults to 3 seconds; zero closes every socket at once.
    pub fn drain_window(mut self, window: Duration) -> Self {
        self.config.drain_window = window;
        self
    }

    /// Presence for every room: sockets may join rooms as a [`Member`](crate::presence::Member) with
    /// [`FanoutSocket::join_as`](crate::FanoutSocket::join_as), every socket of a room
    /// receives join and leave events, and
    /// [`RoomHandle::presence`](crate::RoomHandle::presence) lists the members of the whole
    /// fleet. See the README's "Presence" section.
    ///
    /// Defaults to off: rooms without presence cost nothing extra.
    pub fn presence(mut self, on: bool) -> Self {
        self.config.presence_all = on;
        self
    }

    /// Presence for `room` only (as [`presence`](FanoutBuilder::presence) does for all).
    ///
    /// Defaults to no rooms.
    pub fn room_presence(mut self, room: impl Into<String>) -> Self {
        self.config.presence_rooms.insert(room.into());
        self
    }

    /// How long the members of a node that stopped answering (killed, frozen, cut off from
    /// Redis) stay listed before the surviving nodes remove them and send their leave events.
    /// Each node renews one lease of this length every third of it, whatever its number of
    /// rooms and members; survivors look for expired leases every second.
    ///
    /// Defaults to 30 seconds (at least 1 second).
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.config.presence_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Trusts the PEM certificate(s) in `pem` (one CA certificate or a bundle) for the
    /// `rediss://` server's certificate, *instead of* the system's trust store: for a Redis
    /// whose certificate is issued by a private CA. The certificate is still verified, host
    /// name included (`rediss://127.0.0.1:..` needs an IP address entry for 127.0.0.1 in it).
    ///
    /// [`build`](FanoutBuilder::build) fails with [`Error::is_invalid_url`] when `pem` holds no
    /// certificate or the URL is not `rediss://`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = axum_fanout::FanoutLayer::builder("rediss://:s3cret@redis.internal:6380")
    ///     .tls_root_certificate(std::fs::read("/etc/redis/ca.pem")?)
    ///     .build()?;
    /// # let _ = layer; Ok(()) }
    /// ```
    ///
    /// Defaults to none: the system's trust store (enough for a public CA).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_root_certificate(mut self, pem: Vec<u8>) -> Self {
        self.connect.tls_root_certificate = Some(pem);
        self
    }

    /// The settings as they are: the layer builds the backend and the node from them.
    pub(crate) fn into_parts(self) -> (Connect, Config) {
        (self.connect, self.config)
    }

    /// The settings as they are, without a Redis client (unit tests of the writer and queue).
    #[cfg(test)]
    pub(crate) fn into_config_for_tests(self) -> Config {
        self.config
    }
}
