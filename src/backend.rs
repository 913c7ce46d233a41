//! The Redis deployment the bus talks to: one server (PUBLISH / SUBSCRIBE) or, with the
//! `cluster` feature, a Redis Cluster (SPUBLISH / SSUBSCRIBE, Redis 7's sharded pub/sub).
//!
//! This is the crate's seam to Redis: `bus` only connects, publishes, subscribes and
//! unsubscribes through [`Backend`] and [`Conn`], and never needs to know which deployment it
//! has. Everything else (reconnecting, resubscribing from the registry, probing, shedding) is
//! the same code for both.
//!
//! # Cluster mode
//!
//! A message published with SPUBLISH is routed only to the shard (master and its replicas)
//! that owns the channel's hash slot, instead of being broadcast over the cluster bus to every
//! node. redis-rs's cluster client sends each SSUBSCRIBE to the node that owns the slot of its
//! first channel; Redis refuses one SSUBSCRIBE naming channels of different slots (CROSSSLOT),
//! so [`Conn::subscribe`] groups channels by slot and sends one command per slot, concurrently.
//!
//! Channel names carry no hash tag (`{...}`), so the shards of one room (`ws:room:42:shard0`,
//! `ws:room:42:shard1`, ...) hash to unrelated slots and spread over the masters. A room name or
//! a channel prefix that holds `{tag}` pins every channel containing it to one slot, which
//! co-locates them on purpose and undoes that spread.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, RedisError};

/// Where the node's two connections go. Cheap to clone.
#[derive(Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per node, built once: its size does not matter"
)]
pub(crate) enum Backend {
    Server(redis::Client),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster::ClusterClient),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither shows credentials: the server's address only, or just the kind.
        match self {
            Backend::Server(client) => f
                .debug_tuple("Server")
                .field(&client.get_connection_info().addr().to_string())
                .finish(),
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

/// One connection (a server's multiplexed connection, or a cluster connection that holds one
/// per master). Cheap to clone: clones share the connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Server(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Server(_) => f.write_str("Conn::Server"),
            #[cfg(feature = "cluster")]
            Conn::Cluster(_) => f.write_str("Conn::Cluster"),
        }
    }
}

/// A client for the same server, speaking RESP3 (pushes arrive on the same connection as
/// command replies, so one multiplexed connection can subscribe and be watched for loss), with
/// TCP_NODELAY (a PUBLISH must not wait for Nagle's algorithm) and TCP keepalive (a peer that
/// vanished without a FIN is noticed even on an idle link).
///
/// Everything else of the client's connection info is kept: the address (with its TLS
/// parameters and root certificate for `rediss://`), the user name and password (redis-rs sends
/// `HELLO 3 AUTH` / `AUTH` with them on every connection, publisher and subscriber alike) and
/// the database.
pub(crate) fn resp3(client: &redis::Client) -> Result<redis::Client, redis::RedisError> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(
        info.set_redis_settings(settings)
            .set_tcp_settings(tcp_settings()),
    )
}

/// TCP_NODELAY and keepalive, for every connection to Redis (see [`resp3`]).
pub(crate) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5));
    TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
}

/// Installs rustls' `ring` provider as the process-wide default unless one is installed.
///
/// redis-rs builds its rustls configuration with the process default provider and enables
/// none itself; without one the first TLS connect would panic. An application that installs
/// its own provider (e.g. aws-lc-rs) does so before it builds the layer, and keeps it.
#[cfg(feature = "tls")]
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in the meantime: there is one either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl Backend {
    /// Opens a connection whose pushes (messages, and a `Disconnection` when it closes) go to
    /// `push`, which must never block.
    pub(crate) async fn connect(
        &self,
        connect_timeout: Duration,
        push: impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static,
    ) -> Result<Conn, RedisError> {
        match self {
            Backend::Server(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    // Deadlines are applied per operation by the callers.
                    .set_response_timeout(None)
                    .set_push_sender(push);
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Conn::Server)
            }
            #[cfg(feature = "cluster")]
            Backend::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    // The callers' deadlines are shorter; this only bounds a request the
                    // client retries internally (redirects, a master being replaced).
                    .set_response_timeout(Duration::from_secs(30))
                    .set_push_sender(push);
                // The initial connection fetches the slot map from the first node that answers
                // and then connects to every master: bound the whole of it, not each step.
                match tokio::time::timeout(
                    connect_timeout * 2,
                    client.get_async_connection_with_config(config),
                )
                .await
                {
                    Ok(conn) => conn.map(Conn::Cluster),
                    Err(_) => Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no cluster node answered in time",
                    ))),
                }
            }
        }
    }

    /// The command family in use, for messages: `"PUBLISH"` or `"SPUBLISH"`.
    pub(crate) fn publish_command(&self) -> &'static str {
        match self {
            Backend::Server(_) => "PUBLISH",
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => "SPUBLISH",
        }
    }
}

impl Conn {
    /// PUBLISH (SPUBLISH on a cluster); returns the number of subscribed connections (on a
    /// cluster: on the shard that owns the channel).
    pub(crate) async fn publish(
        &mut self,
        channel: &str,
        payload: impl redis::ToRedisArgs + Send + Sync,
    ) -> Result<usize, RedisError> {
        let mut cmd = redis::cmd(match self {
            Conn::Server(_) => "PUBLISH",
            #[cfg(feature = "cluster")]
            Conn::Cluster(_) => "SPUBLISH",
        });
        cmd.arg(channel).arg(payload);
        match self {
            Conn::Server(conn) => cmd.query_async(conn).await,
            // Routed by its first argument, the channel, to the master owning its slot.
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => cmd.query_async(conn).await,
        }
    }

    /// The channels this node's link probe uses, named from `base`: `base` itself on one
    /// server; on a cluster, one `base:<n>` per master, each chosen so that its hash slot is
    /// one that master serves, so the probe covers every master the connection talks to.
    pub(crate) async fn probe_channels(&mut self, base: &str) -> Result<Vec<String>, RedisError> {
        match self {
            Conn::Server(_) => Ok(vec![base.to_owned()]),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                let slots: redis::Value =
                    redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
                Ok(probe_channels_for(base, &master_slot_ranges(&slots)))
            }
        }
    }

    /// Publishes every `(channel, payload)`, in order; returns each one's subscriber count.
    /// On one server they go out as one pipeline (one write, one read for all of them). On a
    /// cluster they are sent concurrently, each to the master owning its channel's slot
    /// (a cluster pipeline must stay within one slot).
    pub(crate) async fn publish_many(
        &mut self,
        commands: &[(&str, &[u8])],
    ) -> Result<Vec<usize>, RedisError> {
        match self {
            Conn::Server(conn) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in commands {
                    pipe.cmd("PUBLISH").arg(*channel).arg(*payload);
                }
                pipe.query_async(conn).await
            }
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                let sends = commands.iter().map(|(channel, payload)| {
                    let mut conn = Conn::Cluster(conn.clone());
                    async move { conn.publish(channel, *payload).await }
                });
                futures_util::future::try_join_all(sends).await
            }
        }
    }

    /// SUBSCRIBE (SSUBSCRIBE on a cluster, one command per hash slot); returns once Redis
    /// confirmed every channel.
    pub(crate) async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        match self {
            Conn::Server(conn) => conn.subscribe(channels).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                per_slot(conn, channels, |mut conn, group| async move {
                    conn.ssubscribe(group).await
                })
                .await
            }
        }
    }

    /// UNSUBSCRIBE (SUNSUBSCRIBE on a cluster, one command per hash slot).
    pub(crate) async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        match self {
            Conn::Server(conn) => conn.unsubscribe(channels).await,
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                per_slot(conn, channels, |mut conn, group| async move {
                    conn.sunsubscribe(group).await
                })
                .await
            }
        }
    }
}

/// Runs `command` once per hash slot with that slot's channels, concurrently (one SSUBSCRIBE
/// naming channels of two slots is refused with CROSSSLOT).
#[cfg(feature = "cluster")]
async fn per_slot<'a, F, Fut>(
    conn: &redis::cluster_async::ClusterConnection,
    channels: &'a [String],
    command: F,
) -> Result<(), RedisError>
where
    F: Fn(redis::cluster_async::ClusterConnection, Vec<&'a str>) -> Fut,
    Fut: std::future::Future<Output = Result<(), RedisError>>,
{
    let mut groups: std::collections::BTreeMap<u16, Vec<&str>> = Default::default();
    for channel in channels {
        groups
            .entry(key_slot(channel.as_bytes()))
            .or_default()
            .push(channel);
    }
    let commands = groups
        .into_values()
        .map(|group| command(conn.clone(), group));
    futures_util::future::try_join_all(commands).await.map(drop)
}

/// `CLUSTER SLOTS` as `(first slot, last slot, master address)`; entries it cannot read are
/// skipped.
#[cfg(feature = "cluster")]
fn master_slot_ranges(reply: &redis::Value) -> Vec<(u16, u16, String)> {
    use redis::Value;
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(fields) = entry else {
                return None;
            };
            let (Value::Int(first), Value::Int(last), Value::Array(master)) =
                (fields.first()?, fields.get(1)?, fields.get(2)?)
            else {
                return None;
            };
            let port = match master.get(1)? {
                Value::Int(port) => *port,
                _ => return None,
            };
            let address = format!("{}:{port}", text(master.first()?)?);
            Some((
                u16::try_from(*first).ok()?,
                u16::try_from(*last).ok()?,
                address,
            ))
        })
        .collect()
}

/// One probe channel per master: `base:<n>` with the smallest `n` whose slot that master
/// serves. A `{tag}` in `base` pins every candidate to one slot; the search then gives up on
/// the other masters after a bounded number of tries (they are still watched through their
/// disconnection), and at least `base:0` is always probed.
#[cfg(feature = "cluster")]
fn probe_channels_for(base: &str, ranges: &[(u16, u16, String)]) -> Vec<String> {
    let mut masters: Vec<&str> = ranges.iter().map(|(_, _, m)| m.as_str()).collect();
    masters.sort_unstable();
    masters.dedup();
    let mut channels = Vec::with_capacity(masters.len());
    for master in masters {
        let found = (0..10_000u32)
            .map(|n| format!("{base}:{n}"))
            .find(|channel| {
                let slot = key_slot(channel.as_bytes());
                ranges
                    .iter()
                    .any(|(first, last, m)| m == master && (*first..=*last).contains(&slot))
            });
        channels.extend(found.filter(|c| !channels.contains(c)));
    }
    if channels.is_empty() {
        channels.push(format!("{base}:0"));
    }
    channels
}

/// Number of hash slots in a Redis Cluster.
#[cfg(any(feature = "cluster", test))]
pub(crate) const SLOTS: u16 = 16384;

/// The cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag (the part
/// between the first `{` and the next `}`, when not empty), modulo 16384, as Redis computes it.
#[cfg(any(feature = "cluster", test))]
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

#[cfg(any(feature = "cluster", test))]
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Reference values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        // An empty tag, or no closing brace, hashes the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn one_probe_channel_per_master_in_a_slot_it_serves() {
        let ranges = vec![
            (0, 5460, "a:1".to_owned()),
            (5461, 10922, "b:2".to_owned()),
            (10923, 16383, "c:3".to_owned()),
        ];
        let channels = probe_channels_for("__axum_fanout:probe:n1", &ranges);
        assert_eq!(channels.len(), 3, "{channels:?}");
        let mut slots: Vec<u16> = channels.iter().map(|c| key_slot(c.as_bytes())).collect();
        slots.sort_unstable();
        assert!(slots[0] <= 5460 && (5461..=10922).contains(&slots[1]) && slots[2] >= 10923);
        // A hash tag pins every candidate to one slot: one channel, not a search forever.
        let pinned = probe_channels_for("{tag}probe", &ranges);
        assert_eq!(pinned.len(), 1, "{pinned:?}");
        // Nothing readable from CLUSTER SLOTS: still one channel to probe.
        assert_eq!(probe_channels_for("p", &[]), ["p:0"]);
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_slots_replies_are_read_leniently() {
        use redis::Value;
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(100), node("10.0.0.1", 7000)]),
            Value::Array(vec![
                Value::Int(101),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![Value::Nil]),
            Value::Int(3),
        ]);
        assert_eq!(
            master_slot_ranges(&reply),
            [
                (0, 100, "10.0.0.1:7000".to_owned()),
                (101, 16383, "10.0.0.2:7001".to_owned())
            ]
        );
        assert!(master_slot_ranges(&Value::Nil).is_empty());
    }
}
