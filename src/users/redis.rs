//! The users' directory in Redis: who is connected where, and the fleet's nodes, written by
//! each node from what it holds and read by any node in one or two round trips, never by asking
//! the other nodes (no scatter-gather, no timeout to guess).
//!
//! # Keys
//!
//! - `__axum_fanout:fleet:<prefix>` hash-tagged pair: `{..}:nodes`, a sorted set node -> the
//!   instant its record expires (ms, Redis's clock), and `{..}:info`, a hash node -> its record
//!   (`{"connections":N,"rooms":R,"users":U}`). Each node renews its own every third of
//!   `presence_ttl`; a reader lists only unexpired nodes, and every renewal removes the expired
//!   ones.
//! - `__axum_fanout:sockets:<prefix><user>`: a hash node -> that node's sockets of the user,
//!   written as absolute counts by one task per node (so a retry or a re-assertion cannot count
//!   twice), read together with the live nodes (a dead node's count is not counted). It expires
//!   a day after its last write: a user connected for longer is written again when the node
//!   re-asserts (a new link), and a dead node's leftovers go with it.

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Value;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::bus::script::{self, Script, int, items, text};
use crate::bus::{Bus, Conn, pause};
use crate::config::Config;
use crate::error::Error;
use crate::lifecycle::Lifecycle;
use crate::registry::Registry;
use crate::room::user_of;

/// How long a user's counts live after their last write.
const SOCKETS_TTL_MS: u64 = 24 * 3600 * 1000;

/// How often the node writes the users whose counts changed: joins and leaves between two
/// writes cost one pipeline.
const SYNC_EVERY: Duration = Duration::from_millis(100);

/// Renews the node's record (expiring `ARGV[2]` ms from Redis's now) and drops expired ones.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  redis.call('ZREM', KEYS[1], unpack(dead))
  redis.call('HDEL', KEYS[2], unpack(dead))
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return #dead
";

/// The unexpired nodes and their records: `{node, record, node, record, ..}`.
const LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, node in ipairs(live) do
  out[#out + 1] = node
  out[#out + 1] = redis.call('HGET', KEYS[2], node) or '{}'
end
return out
";

static SCRIPTS: LazyLock<(Script, Script)> =
    LazyLock::new(|| (Script::new(HEARTBEAT), Script::new(LIVE)));

fn fleet_keys(config: &Config) -> (String, String) {
    let tag = format!("{{__axum_fanout:fleet:{}}}", config.channel_prefix);
    (format!("{tag}:nodes"), format!("{tag}:info"))
}

fn sockets_key(config: &Config, user: &str) -> String {
    format!("__axum_fanout:sockets:{}{user}", config.channel_prefix)
}

/// A node of the fleet, as it last described itself: see
/// [`RoomHandle::fleet`](crate::RoomHandle::fleet).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// The node's id ([`FanoutBuilder::node_id`](crate::FanoutBuilder::node_id)).
    pub node: String,
    /// Its attached sockets.
    pub connections: usize,
    /// Its rooms with at least one local socket (users' own rooms not counted).
    pub rooms: usize,
    /// The users it holds sockets of.
    pub users: usize,
}

/// Where a user is connected: see [`RoomHandle::connected`](crate::RoomHandle::connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Connected {
    /// Live nodes that hold at least one socket of the user.
    pub nodes: usize,
    /// The user's sockets over those nodes.
    pub sockets: usize,
}

/// The publisher connection within the subscribe timeout.
async fn conn(bus: &Bus) -> Result<Conn, Error> {
    bus.connection(Instant::now() + bus.config().subscribe_timeout)
        .await
}

/// The live nodes and their records.
async fn live(bus: &Bus, conn: &mut Conn) -> Result<Vec<NodeInfo>, Error> {
    let (nodes, info) = fleet_keys(bus.config());
    let mut call = SCRIPTS.1.call();
    call.key(&nodes).key(&info);
    let reply = script::run(conn, &call).await.map_err(Error::redis)?;
    Ok(items(&reply)
        .chunks(2)
        .filter_map(|pair| {
            let node = text(pair.first()?)?;
            let record: serde_json::Value =
                serde_json::from_str(&text(pair.get(1)?)?).unwrap_or_default();
            let n = |k: &str| record[k].as_u64().unwrap_or(0) as usize;
            Some(NodeInfo {
                connections: n("connections"),
                rooms: n("rooms"),
                users: n("users"),
                node,
            })
        })
        .collect())
}

/// The fleet's live nodes, sorted by id.
pub(crate) async fn fleet(bus: &Bus) -> Result<Vec<NodeInfo>, Error> {
    let deadline = bus.config().subscribe_timeout;
    let run = async {
        let mut conn = conn(bus).await?;
        let mut nodes = live(bus, &mut conn).await?;
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    };
    timeout(deadline, run)
        .await
        .unwrap_or_else(|_| Err(Error::publish_timeout(true, "EVALSHA")))
}

/// Where `user` is connected, from the live nodes' counts.
pub(crate) async fn connected(bus: &Bus, user: &str) -> Result<Connected, Error> {
    let deadline = bus.config().subscribe_timeout;
    let key = sockets_key(bus.config(), user);
    let run = async {
        let mut conn = conn(bus).await?;
        let live: std::collections::HashSet<String> = live(bus, &mut conn)
            .await?
            .into_iter()
            .map(|n| n.node)
            .collect();
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&key);
        let reply = conn
            .pipeline(vec![(key.as_str(), cmd)])
            .await
            .map_err(Error::redis)?;
        let Some(Ok(counts)) = reply.into_iter().next() else {
            return Err(script::unexpected("HGETALL"));
        };
        let mut out = Connected::default();
        for pair in pairs(&counts) {
            if let (Some(node), Some(n)) = pair
                && live.contains(&node)
                && n > 0
            {
                out.nodes += 1;
                out.sockets += n as usize;
            }
        }
        Ok(out)
    };
    timeout(deadline, run)
        .await
        .unwrap_or_else(|_| Err(Error::publish_timeout(true, "HGETALL")))
}

/// A hash reply as (field, integer) pairs: RESP3 maps, or RESP2's flat arrays.
fn pairs(value: &Value) -> Vec<(Option<String>, Option<u64>)> {
    match value {
        Value::Map(entries) => entries.iter().map(|(k, v)| (text(k), int(v))).collect(),
        other => items(other)
            .chunks(2)
            .map(|p| (p.first().and_then(text), p.get(1).and_then(int)))
            .collect(),
    }
}

/// Writes this node's users and record until `stop`: changed users every [`SYNC_EVERY`], the
/// record every third of `presence_ttl`, and everything again on every new link (Redis may
/// have lost it: a restart, a failover).
pub(crate) async fn run(
    bus: Arc<Bus>,
    registry: Arc<Registry>,
    lifecycle: Arc<Lifecycle>,
    mut stop: watch::Receiver<()>,
) {
    let cfg = bus.config().clone();
    let renew_every = cfg.presence_ttl / 3;
    let mut conns = bus.connections();
    let mut next_renewal = Instant::now();
    let mut all = true;
    loop {
        let current = conns.borrow_and_update().clone();
        if let Some(mut conn) = current {
            let counts = registry.take_user_counts(all);
            let wrote = write_counts(&cfg, &mut conn, &counts).await;
            let renewed = if all || Instant::now() >= next_renewal {
                heartbeat(&cfg, &mut conn, &registry, &lifecycle).await
            } else {
                Ok(())
            };
            match (wrote, renewed) {
                (Ok(()), Ok(())) => {
                    if all || Instant::now() >= next_renewal {
                        next_renewal = Instant::now() + renew_every;
                    }
                    all = false;
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::debug!(error = %e, "users' directory not written; again on the next link");
                    all = true;
                }
            }
        }
        tokio::select! {
            slept = pause(SYNC_EVERY, &mut stop) => if !slept { return },
            changed = conns.changed() => {
                if changed.is_err() {
                    return;
                }
                all = true; // a new link: Redis may have lost everything
            }
        }
    }
}

/// One pipeline: `HSET` (and the key's expiry) for users this node holds, `HDEL` for those it
/// no longer does.
async fn write_counts(
    cfg: &Config,
    conn: &mut Conn,
    counts: &[(crate::room::RoomName, usize)],
) -> Result<(), Error> {
    if counts.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = counts
        .iter()
        .filter_map(|(room, _)| user_of(room.as_str()))
        .map(|user| sockets_key(cfg, user))
        .collect();
    let mut commands = Vec::with_capacity(keys.len() * 2);
    for (key, (_, n)) in keys.iter().zip(counts) {
        if *n == 0 {
            let mut cmd = redis::cmd("HDEL");
            cmd.arg(key).arg(&cfg.node_id);
            commands.push((key.as_str(), cmd));
        } else {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(key).arg(&cfg.node_id).arg(*n);
            commands.push((key.as_str(), cmd));
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(key).arg(SOCKETS_TTL_MS);
            commands.push((key.as_str(), cmd));
        }
    }
    let replies = timeout(cfg.publish_timeout, conn.pipeline(commands))
        .await
        .map_err(|_| Error::publish_timeout(true, "HSET"))?
        .map_err(Error::redis)?;
    match replies.into_iter().find_map(Result::err) {
        Some(e) => Err(Error::redis(e)),
        None => Ok(()),
    }
}

async fn heartbeat(
    cfg: &Config,
    conn: &mut Conn,
    registry: &Registry,
    lifecycle: &Lifecycle,
) -> Result<(), Error> {
    let (nodes, info) = fleet_keys(cfg);
    let (rooms, users) = registry.room_and_user_counts();
    let record = serde_json::json!({
        "connections": lifecycle.connections(),
        "rooms": rooms,
        "users": users,
    })
    .to_string();
    let mut call = SCRIPTS.0.call();
    call.key(&nodes)
        .key(&info)
        .arg(&cfg.node_id)
        .arg(cfg.presence_ttl.as_millis() as u64)
        .arg(record);
    timeout(cfg.publish_timeout, script::run(conn, &call))
        .await
        .map_err(|_| Error::publish_timeout(true, "EVALSHA"))?
        .map(drop)
        .map_err(Error::redis)
}
