//! The Redis deployment the bus talks to: one server (PUBLISH / SUBSCRIBE), a master found
//! through Redis Sentinel (the same, on whichever server is the master: see `sentinel`) or,
//! with the `cluster` feature, a Redis Cluster (SPUBLISH / SSUBSCRIBE, Redis 7's sharded
//! pub/sub).
//!
//! This is the crate's seam to Redis: `bus::client` builds a [`Backend`] from the builder's
//! settings, and the rest of `bus` only connects,
//! publishes, subscribes and unsubscribes through [`Backend`] and [`Conn`], and never needs to
//! know which deployment it has: reconnecting, resubscribing from the registry, probing and
//! shedding are the same code for both.
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

use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, RedisError};

use super::sentinel::Sentinel;
pub(crate) use super::server::ServerConn;
use super::server::server_config;

#[cfg(feature = "cluster")]
use super::slots::{master_slot_ranges, per_slot, probe_channels_for};

/// Where the node's two connections go. Cheap to clone.
#[derive(Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per node, built once: its size does not matter"
)]
pub(crate) enum Backend {
    Server(redis::Client),
    Sentinel(Arc<Sentinel>),
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
            Backend::Sentinel(sentinel) => f.debug_tuple("Sentinel").field(sentinel).finish(),
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

/// One connection (a server's multiplexed connection, or a cluster connection that holds one
/// per master). Cheap to clone: clones share the connection.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One server, or the master found through Sentinel.
    Server(ServerConn),
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

impl Backend {
    /// Opens a connection whose pushes (messages, and a `Disconnection` when it closes) go to
    /// `push`, which must never block.
    pub(crate) async fn connect(
        &self,
        connect_timeout: Duration,
        push: impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static,
    ) -> Result<Conn, RedisError> {
        match self {
            Backend::Server(client) => client
                .get_multiplexed_async_connection_with_config(&server_config(
                    connect_timeout,
                    Arc::new(push),
                ))
                .await
                .map(|conn| Conn::Server(ServerConn::plain(conn))),
            Backend::Sentinel(sentinel) => sentinel
                .connect(connect_timeout, Arc::new(push))
                .await
                .map(Conn::Server),
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

    /// Resolves when the deployment announces that its master changed (Sentinel's
    /// `+switch-master`); never for one server or a cluster. Dropping it stops listening.
    pub(crate) async fn master_switched(&self) {
        match self {
            Backend::Sentinel(sentinel) => sentinel.switched().await,
            _ => std::future::pending().await,
        }
    }

    /// The publish command of this deployment, for messages: `"PUBLISH"` or `"SPUBLISH"`.
    pub(crate) fn publish_command(&self) -> &'static str {
        match self {
            Backend::Server(_) | Backend::Sentinel(_) => publish_command(true),
            #[cfg(feature = "cluster")]
            Backend::Cluster(_) => publish_command(false),
        }
    }
}

/// PUBLISH on one server; SPUBLISH (Redis 7's sharded pub/sub, routed to the shard that owns
/// the channel) on a cluster. The one place that says which.
const fn publish_command(single_server: bool) -> &'static str {
    if single_server { "PUBLISH" } else { "SPUBLISH" }
}

impl Conn {
    /// The publish command of this connection's deployment (see [`Backend::publish_command`]),
    /// for scripts that publish.
    pub(crate) fn publish_command(&self) -> &'static str {
        publish_command(matches!(self, Conn::Server(_)))
    }

    /// PUBLISH (SPUBLISH on a cluster); returns the number of subscribed connections (on a
    /// cluster: on the shard that owns the channel).
    pub(crate) async fn publish(
        &mut self,
        channel: &str,
        payload: impl redis::ToRedisArgs + Send + Sync,
    ) -> Result<usize, RedisError> {
        let mut cmd = redis::cmd(self.publish_command());
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

    /// Which master serves each slot, as `(first slot, last slot, master address)` from
    /// `CLUSTER SLOTS`, sorted; empty on one server. A slot whose master changed was failed
    /// over (its new master may lack the last writes) or migrated.
    pub(crate) async fn slot_owners(&mut self) -> Result<Vec<(u16, u16, String)>, RedisError> {
        match self {
            Conn::Server(_) => Ok(Vec::new()),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                let slots: redis::Value =
                    redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
                let mut ranges = master_slot_ranges(&slots);
                ranges.sort_unstable();
                Ok(ranges)
            }
        }
    }

    /// Publishes every `(channel, payload)`, in order; returns each one's subscriber count.
    /// On one server they go out as one pipeline (one write, one read for all of them). On a
    /// cluster each channel's commands are sent in order, channels concurrently, each to the
    /// master owning its slot (a cluster pipeline must stay within one slot).
    pub(crate) async fn publish_many(
        &mut self,
        commands: &[(&str, &[u8])],
    ) -> Result<Vec<usize>, RedisError> {
        match self {
            Conn::Server(conn) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in commands {
                    pipe.cmd(publish_command(true)).arg(*channel).arg(*payload);
                }
                pipe.query_async(conn).await
            }
            // Concurrent across channels, in order within one: a sender's broadcasts to a room
            // can share a batch and must reach Redis in the order they were queued.
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                let mut by_channel: std::collections::HashMap<&str, Vec<usize>> =
                    std::collections::HashMap::new();
                for (i, (channel, _)) in commands.iter().enumerate() {
                    by_channel.entry(channel).or_default().push(i);
                }
                let sends = by_channel.into_values().map(|indices| {
                    let mut conn = Conn::Cluster(conn.clone());
                    async move {
                        let mut counts = Vec::with_capacity(indices.len());
                        for i in indices {
                            let (channel, payload) = commands[i];
                            counts.push((i, conn.publish(channel, payload).await?));
                        }
                        Ok::<_, RedisError>(counts)
                    }
                });
                let mut counts = vec![0; commands.len()];
                for group in futures_util::future::try_join_all(sends).await? {
                    for (i, n) in group {
                        counts[i] = n;
                    }
                }
                Ok(counts)
            }
        }
    }

    /// Sends every `(channel, command)` in order and returns each command's own reply; `Err`
    /// only when the connection failed (then nobody knows which commands ran). On one server
    /// they go out as one pipeline. On a cluster, as [`publish_many`](Conn::publish_many):
    /// each channel's commands in order, channels concurrently, routed by their first key.
    pub(crate) async fn pipeline(
        &mut self,
        commands: Vec<(&str, redis::Cmd)>,
    ) -> Result<Vec<Result<redis::Value, RedisError>>, RedisError> {
        match self {
            Conn::Server(conn) => {
                let mut pipe = redis::pipe();
                // A refused command (NOSCRIPT, OOM, ...) answers for itself, not for the run.
                pipe.ignore_errors();
                for (_, cmd) in commands {
                    pipe.add_command(cmd);
                }
                pipe.query_async(conn).await
            }
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => {
                let len = commands.len();
                let mut by_channel: std::collections::HashMap<&str, Vec<(usize, redis::Cmd)>> =
                    std::collections::HashMap::new();
                for (i, (channel, cmd)) in commands.into_iter().enumerate() {
                    by_channel.entry(channel).or_default().push((i, cmd));
                }
                let sends = by_channel.into_values().map(|group| {
                    let mut conn = conn.clone();
                    async move {
                        let mut replies = Vec::with_capacity(group.len());
                        for (i, cmd) in group {
                            replies.push((i, cmd.query_async(&mut conn).await));
                        }
                        replies
                    }
                });
                let mut replies: Vec<Result<redis::Value, RedisError>> =
                    (0..len).map(|_| Ok(redis::Value::Nil)).collect();
                for group in futures_util::future::join_all(sends).await {
                    for (i, reply) in group {
                        replies[i] = reply;
                    }
                }
                Ok(replies)
            }
        }
    }

    /// SCRIPT LOAD `script` (on a cluster: on every node).
    pub(crate) async fn load_script(&mut self, script: &redis::Script) -> Result<(), RedisError> {
        match self {
            Conn::Server(conn) => script.load_async(conn).await.map(drop),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => script.load_async(conn).await.map(drop),
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
