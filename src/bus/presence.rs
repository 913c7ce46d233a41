//! Presence in Redis: the keys, the Lua scripts that change them atomically, the per-node
//! lease, and the task that syncs this node's table (`crate::presence`) and removes the
//! members of dead nodes.
//!
//! # Keys
//!
//! Per room, under the hash tag of its channel name `{<prefix><room>}` (so that one room's
//! keys and channel share a slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{..}:members` | hash | user -> connections over the fleet (`HLEN` is the member count) |
//! | `{..}:info` | hash | user -> application info (JSON text), for users that have some |
//! | `{..}:version` | string | the version of the room's last join or leave event |
//! | `{..}:nodes` | set | nodes that hold connections in the room |
//! | `{..}:node:<node>` | hash | user -> connections on that node: what its death takes away |
//!
//! Per fleet, under `__axum_fanout:presence:<prefix>` (`<prefix>` is the channel prefix, so
//! two fleets with different prefixes share nothing): `leases`, a sorted set node -> expiry
//! (ms, Redis's clock); `epoch`, a random id written once, that changes only when Redis loses
//! its data; `rooms:<node>`, the rooms a node holds connections in (for the reaper).
//!
//! # Leases
//!
//! A node renews one lease (one `ZADD`) every third of the TTL, whatever its number of rooms
//! and members: O(1) per node. Every second each node asks for expired leases (a range of the
//! sorted set); for each it runs the reap script once per room of the dead node. The script
//! checks the lease again, takes the dead node's share out of the members, publishes the leave
//! events and deletes the share, atomically: with several survivors racing, each room is
//! reaped once, and the later scripts find nothing. A query that meets a dead node in a room
//! reaps it on the spot, so no listing ever shows a member of a node whose lease ran out.
//!
//! # Events
//!
//! Join and leave events are published by the same script that changes the counts, on the
//! room's channel (shard 0 of a sharded room), as ordinary envelopes: they reach sockets
//! through the one delivery path, in Redis's order with the room's messages. A user's
//! messages are published after the join that made them a member returned, so no client sees
//! them before the join.

use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use redis::{Cmd, RedisError, Value};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use super::backend::{Backend, Conn};
use super::backoff::Backoff;
use super::{Bus, pause};
use crate::channel;
use crate::config::Config;
use crate::error::Error;
use crate::presence::{Count, ENTRIES_PER_SYNC, MemberEntry, Snapshot, Table};
use crate::room::RoomName;

/// Shared by every script: the clock, leases, versions, events and the one way a count
/// changes.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function alive(leases, node, now)
  local exp = redis.call('ZSCORE', leases, node)
  return exp and tonumber(exp) >= now
end

-- Created from the clock (microseconds), so versions keep growing when Redis loses its data.
local function version(key)
  local v = redis.call('GET', key)
  if v then return v end
  v = string.format('%d', now_ms() * 1000)
  redis.call('SET', key, v)
  return v
end

local function publish(R, kind, user, info)
  version(R.version)
  local v = redis.call('INCR', R.version)
  local p = '{"type":"fanout.' .. kind .. '","room":' .. cjson.encode(R.room) ..
    ',"user":' .. cjson.encode(user) .. ',"version":' .. string.format('%d', v)
  if info and info ~= '' then p = p .. ',"info":' .. info end
  -- "control": a notice of the node's, which sockets that asked for positions get unwrapped.
  redis.call('PUBLISH', R.channel, '{"v":1,"origin":' .. cjson.encode(R.origin) ..
    ',"room":' .. cjson.encode(R.room) .. ',"control":true,"payload":' .. p .. '}}')
end

-- Sets one node's connection count of `user` (its share is the hash `mine`) and the user's
-- total; a join when the first connection in the fleet appears (if `announce`), a leave when
-- the last one goes.
local function set_count(R, mine, user, count, info, announce)
  local old = tonumber(redis.call('HGET', mine, user) or '0')
  if count == old then
    if count > 0 and info ~= '' then redis.call('HSET', R.info, user, info) end
    return
  end
  if count > 0 then redis.call('HSET', mine, user, count) else redis.call('HDEL', mine, user) end
  local before = tonumber(redis.call('HGET', R.members, user) or '0')
  local after = before + count - old
  if after > 0 then
    redis.call('HSET', R.members, user, after)
    if info ~= '' then redis.call('HSET', R.info, user, info) end
    if before <= 0 and announce then
      publish(R, 'join', user, redis.call('HGET', R.info, user))
    end
  else
    redis.call('HDEL', R.members, user)
    redis.call('HDEL', R.info, user)
    if before > 0 then publish(R, 'leave', user, nil) end
  end
end

-- A dead node's share is gone from the room: forget that it held one.
local function forget(R, dead, their_rooms)
  redis.call('SREM', R.nodes, dead)
  redis.call('SREM', their_rooms, R.room)
end

-- Takes a dead node's whole share out of a room (callers check that it is small).
local function reap(R, dead, theirs, their_rooms)
  local entries = redis.call('HGETALL', theirs)
  for i = 1, #entries, 2 do set_count(R, theirs, entries[i], 0, '', true) end
  redis.call('DEL', theirs)
  forget(R, dead, their_rooms)
  return #entries / 2
end

-- Takes at most `limit` users of a dead node's share out of a room, from HSCAN `cursor`, so
-- that no call blocks Redis for long whatever the share's size. Returns {users taken out,
-- the cursor to go on from, 1 once the share is gone}. Users taken out are deleted from the
-- share, so racing callers (each with its own cursor) never take a user out twice.
local function reap_some(R, dead, theirs, their_rooms, cursor, limit)
  local page = redis.call('HSCAN', theirs, cursor, 'COUNT', limit)
  local entries = page[2]
  local n = 0
  for i = 1, #entries, 2 do
    if n >= limit then break end
    set_count(R, theirs, entries[i], 0, '', true)
    n = n + 1
  end
  if redis.call('EXISTS', theirs) == 0 then
    forget(R, dead, their_rooms)
    return { n, '0', 1 }
  end
  -- A page larger than `limit` (HSCAN's COUNT is a hint): scan its cursor again.
  if n * 2 < #entries then return { n, cursor, 0 } end
  return { n, page[1], 0 }
end
"#;

/// KEYS: members, info, version, nodes, mine, leases, my rooms.
/// ARGV: node, channel, room, full (0/1), then (user, count, info, announce 0/1) per entry.
const SYNC: &str = r#"
local now = now_ms()
if not alive(KEYS[6], ARGV[1], now) then
  return redis.error_reply('NOLEASE this node holds no presence lease')
end
local R = { members = KEYS[1], info = KEYS[2], version = KEYS[3], nodes = KEYS[4],
            channel = ARGV[2], room = ARGV[3], origin = ARGV[1] }
local listed = {}
for i = 5, #ARGV, 4 do
  set_count(R, KEYS[5], ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3] == '1')
  listed[ARGV[i]] = true
end
if ARGV[4] == '1' then
  for _, user in ipairs(redis.call('HKEYS', KEYS[5])) do
    if not listed[user] then set_count(R, KEYS[5], user, 0, '', true) end
  end
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('SADD', KEYS[4], ARGV[1])
  redis.call('SADD', KEYS[7], ARGV[3])
else
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('SREM', KEYS[7], ARGV[3])
end
return 1
"#;

/// KEYS: leases, epoch, my rooms. ARGV: node, ttl (ms), a fresh epoch, list my rooms (0/1).
/// Returns {epoch, whether the lease was alive, [my rooms]}.
const LEASE: &str = r#"
local now = now_ms()
local e = redis.call('GET', KEYS[2])
if not e then
  redis.call('SET', KEYS[2], ARGV[3])
  e = ARGV[3]
end
local was = alive(KEYS[1], ARGV[1], now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local rooms = {}
if ARGV[4] == '1' then rooms = redis.call('SMEMBERS', KEYS[3]) end
return { e, was and 1 or 0, rooms }
"#;

/// KEYS: leases. Returns up to 64 nodes whose lease ran out.
const EXPIRED: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms(), 'LIMIT', 0, 64)
"#;

/// KEYS: leases, the dead node's rooms. ARGV: dead node. Returns its rooms while its lease is
/// expired (empty when it came back); forgets its lease once no room is left.
const DEAD_ROOMS: &str = r#"
if alive(KEYS[1], ARGV[1], now_ms()) then return {} end
local rooms = redis.call('SRANDMEMBER', KEYS[2], 256)
if #rooms == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return rooms
"#;

/// KEYS: members, info, version, nodes, theirs, leases, their rooms.
/// ARGV: dead node, channel, room, origin, cursor, limit. Returns {users taken out, next
/// cursor, 1 when done} (done at once when the node is alive again).
const REAP: &str = r#"
if alive(KEYS[6], ARGV[1], now_ms()) then return { 0, '0', 1 } end
local R = { members = KEYS[1], info = KEYS[2], version = KEYS[3], nodes = KEYS[4],
            channel = ARGV[2], room = ARGV[3], origin = ARGV[4] }
return reap_some(R, ARGV[1], KEYS[5], KEYS[7], ARGV[5], tonumber(ARGV[6]))
"#;

/// KEYS: members, info, version, nodes, leases.
/// ARGV: channel, room, origin, per-node key prefix, per-node rooms prefix, 'count' | 'reap',
/// limit. Reaps the dead nodes met in the room first, so the answer never counts their
/// members, as long as that is at most `limit` users; returns {version, member count} or the
/// version alone (a listing reads the hashes after it, in the same transaction), or
/// {'dead', node, ...}: nodes whose larger shares the caller must reap (`REAP`) before
/// asking again.
const QUERY: &str = r#"
local now = now_ms()
local R = { members = KEYS[1], info = KEYS[2], version = KEYS[3], nodes = KEYS[4],
            channel = ARGV[1], room = ARGV[2], origin = ARGV[3] }
local budget = tonumber(ARGV[7])
local pending = { 'dead' }
for _, n in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if not alive(KEYS[5], n, now) then
    local theirs = ARGV[4] .. n
    local size = redis.call('HLEN', theirs)
    if size <= budget then
      budget = budget - reap(R, n, theirs, ARGV[5] .. n)
    else
      pending[#pending + 1] = n
    end
  end
end
if #pending > 1 then return pending end
local v = version(KEYS[3])
if ARGV[6] == 'count' then return { v, redis.call('HLEN', KEYS[1]) } end
return v
"#;

/// KEYS: members, info, version. ARGV: channel, room, origin, user. A leave for a user who
/// left while Redis was away and lost its data, unless some node re-asserted them since.
const LEAVE_IF_ABSENT: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[4]) == 1 then return 0 end
publish({ members = KEYS[1], info = KEYS[2], version = KEYS[3], channel = ARGV[1],
          room = ARGV[2], origin = ARGV[3] }, 'leave', ARGV[4], nil)
return 1
"#;

/// KEYS: leases, my rooms. ARGV: node. Drops the lease once no room holds this node's
/// connections (a clean shutdown); otherwise the lease runs out and survivors reap.
const RELEASE: &str = r#"
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"#;

/// One Lua script: sent once per Redis (`SCRIPT LOAD`, which names its SHA1), then run by
/// name (`EVALSHA`); loaded again when Redis forgot it (a restart).
struct Script {
    body: String,
    sha: Mutex<Option<String>>,
}

impl Script {
    fn new(body: &str) -> Self {
        Self {
            body: format!("{PRELUDE}\n{body}"),
            sha: Mutex::new(None),
        }
    }

    /// An invocation to add keys and arguments to.
    fn prepare_invoke(&'static self) -> Invocation {
        Invocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// A script call being built: `KEYS` and `ARGV`.
struct Invocation {
    script: &'static Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Invocation {
    fn key(&mut self, key: impl redis::ToRedisArgs) -> &mut Self {
        self.keys.extend(key.to_redis_args());
        self
    }

    fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    fn evalsha(&self, sha: &str) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

struct Scripts {
    sync: Script,
    lease: Script,
    expired: Script,
    dead_rooms: Script,
    reap: Script,
    query: Script,
    release: Script,
    leave_if_absent: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = Script::new;
    Scripts {
        sync: s(SYNC),
        lease: s(LEASE),
        expired: s(EXPIRED),
        dead_rooms: s(DEAD_ROOMS),
        reap: s(REAP),
        query: s(QUERY),
        release: s(RELEASE),
        leave_if_absent: s(LEAVE_IF_ABSENT),
    }
});

/// The key names of one room.
struct RoomKeys {
    members: String,
    info: String,
    version: String,
    nodes: String,
    /// Prefix of the per-node shares: `<tag>:node:` + node id.
    node_prefix: String,
}

impl RoomKeys {
    fn new(config: &Config, room: &str) -> Self {
        let tag = format!("{{{}{room}}}", config.channel_prefix);
        Self {
            members: format!("{tag}:members"),
            info: format!("{tag}:info"),
            version: format!("{tag}:version"),
            nodes: format!("{tag}:nodes"),
            node_prefix: format!("{tag}:node:"),
        }
    }

    fn node(&self, node: &str) -> String {
        format!("{}{node}", self.node_prefix)
    }
}

/// The fleet-wide key names.
struct FleetKeys {
    leases: String,
    epoch: String,
    /// Prefix of each node's room set: + node id.
    rooms_prefix: String,
}

impl FleetKeys {
    fn new(config: &Config) -> Self {
        let base = format!("__axum_fanout:presence:{}", config.channel_prefix);
        Self {
            leases: format!("{base}leases"),
            epoch: format!("{base}epoch"),
            rooms_prefix: format!("{base}rooms:"),
        }
    }

    fn rooms(&self, node: &str) -> String {
        format!("{}{node}", self.rooms_prefix)
    }
}

/// The channel presence events of `room` go to: the room's own (shard 0 when sharded).
fn event_channel(config: &Config, room: &RoomName) -> String {
    channel::for_sender(config, room, 0)
}

/// Runs one script invocation on `conn` (presence needs a single server: its scripts span a
/// room's keys and the fleet's lease set).
async fn invoke<T: redis::FromRedisValue>(
    conn: &mut Conn,
    invocation: &Invocation,
) -> Result<T, Failure> {
    let c = server(conn)?;
    let script = invocation.script;
    for fresh in [false, true] {
        let sha = loaded(c, script, fresh).await?;
        match invocation.evalsha(&sha).query_async(c).await {
            Err(e) if !fresh && is_noscript(&e) => {} // Redis restarted: load it again
            other => return other.map_err(Failure::Redis),
        }
    }
    Err(Failure::Unavailable)
}

/// The multiplexed connection of a single server (presence needs one: its scripts span a
/// room's keys and the fleet's lease set).
fn server(conn: &mut Conn) -> Result<&mut redis::aio::MultiplexedConnection, Failure> {
    match conn {
        Conn::Server(c) => Ok(c),
        #[cfg(feature = "cluster")]
        Conn::Cluster(_) => Err(Failure::Cluster),
    }
}

/// The SHA1 of `script` in Redis, loading it first when unknown or when `reload`.
async fn loaded(
    c: &mut redis::aio::MultiplexedConnection,
    script: &Script,
    reload: bool,
) -> Result<String, Failure> {
    let known = script
        .sha
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some(sha) = known.filter(|_| !reload) {
        return Ok(sha);
    }
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(&script.body)
        .query_async(c)
        .await
        .map_err(Failure::Redis)?;
    *script.sha.lock().unwrap_or_else(PoisonError::into_inner) = Some(sha.clone());
    Ok(sha)
}

/// The query script in a transaction with the two `HGETALL`s that read the members and their
/// info: [script reply, members, info].
async fn list(conn: &mut Conn, query: &Invocation, keys: &RoomKeys) -> Result<Value, Failure> {
    let c = server(conn)?;
    for fresh in [false, true] {
        let sha = loaded(c, query.script, fresh).await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(query.evalsha(&sha))
            .cmd("HGETALL")
            .arg(&keys.members)
            .cmd("HGETALL")
            .arg(&keys.info);
        match pipe.query_async::<Value>(c).await {
            Err(e) if !fresh && is_noscript(&e) => {}
            other => return other.map_err(Failure::Redis),
        }
    }
    Err(Failure::Unavailable)
}

/// The nodes a query script left for the caller to reap (its `{'dead', node, ...}` reply).
fn dead_nodes(reply: &Value) -> Vec<String> {
    match items(reply).split_first() {
        Some((first, rest)) if text(first).as_deref() == Some("dead") => {
            rest.iter().filter_map(text).collect()
        }
        _ => Vec::new(),
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        || e.to_string().contains("NOSCRIPT")
}

/// Why a presence command did not go through.
#[derive(Debug)]
enum Failure {
    Redis(RedisError),
    /// No connection, or no reply in time.
    Unavailable,
    /// This node's lease is gone: renew it (and re-assert) before syncing again.
    NoLease,
    #[cfg(feature = "cluster")]
    Cluster,
}

impl Failure {
    fn into_error(self, room: &str) -> Error {
        match self {
            Failure::Redis(e) => Error::redis(e),
            Failure::Unavailable | Failure::NoLease => Error::presence_timeout(room),
            #[cfg(feature = "cluster")]
            Failure::Cluster => Error::presence_off("presence needs a single redis server"),
        }
    }

    fn classify(self) -> Self {
        match self {
            Failure::Redis(e) if e.to_string().contains("NOLEASE") => Failure::NoLease,
            other => other,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Redis(e) => write!(f, "{e}"),
            Failure::Unavailable => f.write_str("no connection to redis"),
            Failure::NoLease => f.write_str("this node's presence lease ran out"),
            #[cfg(feature = "cluster")]
            Failure::Cluster => f.write_str("presence needs a single redis server"),
        }
    }
}

/// Parses a reply element as an integer (Redis integers, or the digits of a bulk string).
fn int(v: &Value) -> u64 {
    match v {
        Value::Int(n) => u64::try_from(*n).unwrap_or(0),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Value::SimpleString(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) => items,
        _ => &[],
    }
}

/// An `HGETALL` reply as (field, value) pairs: a map (RESP3) or a flat array (RESP2).
fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        _ => items(v).chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
    }
}

impl Bus {
    /// The publisher connection, waiting (up to `wait`) for one while Redis is away.
    async fn presence_conn(&self, wait: Duration) -> Result<Conn, Failure> {
        let mut conns = self.publisher.subscribe();
        match timeout(wait, conns.wait_for(Option::is_some)).await {
            Ok(Ok(conn)) => conn.clone().ok_or(Failure::Unavailable),
            Ok(Err(_)) | Err(_) => Err(Failure::Unavailable),
        }
    }

    /// Whether `room` may have members: presence opted in for it, on a single Redis server.
    pub(crate) fn check_presence(&self, room: &RoomName) -> Result<(), Error> {
        if !self.config.has_presence(room.as_str()) {
            return Err(Error::presence_off(format!(
                "room {:?} has no presence (FanoutBuilder::presence)",
                room.as_str()
            )));
        }
        match &self.backend {
            None => Err(Error::no_redis()),
            Some(Backend::Server(_)) => Ok(()),
            #[cfg(feature = "cluster")]
            Some(Backend::Cluster(_)) => Err(Error::presence_off(
                "presence needs a single redis server, not a cluster",
            )),
        }
    }

    /// Runs the query script for `room` in `mode`: `count` (it returns the version and the
    /// member count) or `reap` (the version only; within the same transaction, two native
    /// `HGETALL`s read the members and their info: three times cheaper for Redis than
    /// returning them through Lua, 1.4 against 4.7 ms for 10,000 members).
    async fn presence_query(&self, room: &str, mode: &str) -> Result<Value, Error> {
        let room = RoomName::new(room)?;
        let cfg = &self.config;
        self.check_presence(&room)?;
        let wait = cfg.subscribe_timeout;
        let keys = RoomKeys::new(cfg, room.as_str());
        let fleet = FleetKeys::new(cfg);
        let run = async {
            let mut conn = self.presence_conn(wait).await?;
            let mut inv = SCRIPTS.query.prepare_invoke();
            inv.key(&keys.members)
                .key(&keys.info)
                .key(&keys.version)
                .key(&keys.nodes)
                .key(&fleet.leases)
                .arg(event_channel(cfg, &room))
                .arg(room.as_str())
                .arg(&cfg.node_id)
                .arg(&keys.node_prefix)
                .arg(&fleet.rooms_prefix)
                .arg(mode)
                .arg(REAP_CHUNK);
            loop {
                let reply = if mode == "reap" {
                    list(&mut conn, &inv, &keys).await?
                } else {
                    invoke::<Value>(&mut conn, &inv).await?
                };
                let script_reply = if mode == "reap" {
                    items(&reply).first().unwrap_or(&Value::Nil)
                } else {
                    &reply
                };
                let dead = dead_nodes(script_reply);
                if dead.is_empty() {
                    return Ok::<_, Failure>(reply);
                }
                // Dead nodes with large shares: reap them a chunk at a time, then ask again.
                for node in dead {
                    reap_room(cfg, &fleet, &mut conn, &room, &node).await?;
                }
            }
        };
        match timeout(wait, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(f)) => Err(f.into_error(room.as_str())),
            Err(_) => Err(Error::presence_timeout(room.as_str())),
        }
    }

    /// Every member of `room` on every live node, with the room's version: one script call.
    pub(crate) async fn presence_snapshot(&self, room: &str) -> Result<Snapshot, Error> {
        let reply = self.presence_query(room, "reap").await?;
        let parts = items(&reply);
        let (Some(version), Some(members), info) = (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(Error::redis("unexpected reply to the presence query"));
        };
        let mut infos: std::collections::HashMap<String, String> = info
            .map(|i| {
                pairs(i)
                    .into_iter()
                    .filter_map(|(u, v)| Some((text(u)?, text(v)?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut members: Vec<MemberEntry> = pairs(members)
            .into_iter()
            .filter_map(|(user, n)| {
                let user = text(user)?;
                Some(MemberEntry {
                    info: infos.remove(&user),
                    user,
                    connections: int(n),
                })
            })
            .collect();
        members.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        Ok(Snapshot {
            room: room.to_owned(),
            version: int(version),
            members,
        })
    }

    /// The number of members of `room` on every live node, with the room's version.
    pub(crate) async fn presence_count(&self, room: &str) -> Result<Count, Error> {
        let reply = self.presence_query(room, "count").await?;
        let parts = items(&reply);
        match (parts.first(), parts.get(1)) {
            (Some(version), Some(members)) => Ok(Count {
                members: int(members),
                version: int(version),
            }),
            _ => Err(Error::redis("unexpected reply to the presence count")),
        }
    }

    /// Drops this node's lease if none of its connections is left in Redis (a clean
    /// shutdown, after every leave was synced).
    pub(crate) async fn presence_release(&self) {
        let cfg = &self.config;
        let fleet = FleetKeys::new(cfg);
        let run = async {
            let mut conn = self.presence_conn(Duration::from_secs(1)).await?;
            let mut inv = SCRIPTS.release.prepare_invoke();
            inv.key(&fleet.leases)
                .key(fleet.rooms(&cfg.node_id))
                .arg(&cfg.node_id);
            invoke::<Value>(&mut conn, &inv).await
        };
        let _ = timeout(Duration::from_secs(1), run).await;
    }

    /// Spawns the presence task when any room has presence.
    pub(crate) fn start_presence(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        table: Arc<Table>,
        stop: &watch::Sender<()>,
    ) {
        if self.backend.is_none() || !self.config.uses_presence() {
            return;
        }
        runtime.spawn(run(self.clone(), table, stop.subscribe()));
    }
}

/// How often survivors look for expired leases: the "second or two to notice" on top of the
/// TTL.
fn reap_every(config: &Config) -> Duration {
    (config.presence_ttl / 3).min(Duration::from_secs(1))
}

/// Keeps this node's lease, syncs its table to Redis, and reaps dead nodes.
async fn run(bus: Arc<Bus>, table: Arc<Table>, mut stop: watch::Receiver<()>) {
    let cfg = bus.config.clone();
    let fleet = FleetKeys::new(&cfg);
    let renew_every = cfg.presence_ttl / 3;
    let mut conns = bus.publisher.subscribe();
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // The epoch this node last saw: `None` until the first lease.
    let mut epoch: Option<String> = None;
    let mut leased_until: Option<Instant> = None;
    let mut next_reap = Instant::now();
    loop {
        let conn = conns.borrow_and_update().clone();
        let Some(mut conn) = conn else {
            leased_until = None;
            tokio::select! {
                r = conns.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        };
        let now = Instant::now();
        if leased_until.is_none_or(|t| now + renew_every * 2 >= t) {
            match renew(&cfg, &fleet, &mut conn, &table, &mut epoch).await {
                Ok(()) => leased_until = Some(now + cfg.presence_ttl),
                Err(f) => {
                    tracing::warn!(node = %cfg.node_id, reason = %f, "cannot renew the presence lease; retrying");
                    leased_until = None;
                    if !pause(backoff.next(), &mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if let Err(f) = sync_dirty(&cfg, &fleet, &mut conn, &table).await {
            if matches!(f, Failure::NoLease) {
                leased_until = None;
            } else {
                tracing::warn!(node = %cfg.node_id, reason = %f, "presence sync failed; retrying");
            }
            if !pause(backoff.next(), &mut stop).await {
                return;
            }
            continue;
        }
        let (departed, next_departure) = table.take_departed(Instant::now());
        for (room, user) in departed {
            if let Err(f) = leave_if_absent(&cfg, &mut conn, &room, &user).await {
                tracing::warn!(node = %cfg.node_id, %room, reason = %f, "could not announce a leave from a redis outage");
            }
        }
        if Instant::now() >= next_reap {
            next_reap = Instant::now() + reap_every(&cfg);
            if let Err(f) = reap_dead(&cfg, &fleet, &mut conn).await {
                tracing::warn!(node = %cfg.node_id, reason = %f, "presence reaping failed");
            }
        }
        backoff.reset();
        let renew_at = leased_until.map_or(Instant::now(), |t| t - renew_every * 2);
        tokio::select! {
            _ = table.changed() => {}
            _ = tokio::time::sleep_until(
                renew_at.min(next_reap).min(next_departure.unwrap_or(next_reap))
            ) => {}
            // A new publisher connection: Redis may have restarted; renew at once, which
            // tells whether it lost its data.
            r = conns.changed() => {
                if r.is_err() { return }
                leased_until = None;
            }
            _ = stop.changed() => return,
        }
    }
}

/// Renews the lease, and starts a re-assertion when Redis lost its data (a new epoch) or this
/// node's lease had run out (others took its members out).
async fn renew(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
    table: &Table,
    epoch: &mut Option<String>,
) -> Result<(), Failure> {
    let first = epoch.is_none();
    let fresh = format!("{:016x}", rand_u64());
    let mut inv = SCRIPTS.lease.prepare_invoke();
    inv.key(&fleet.leases)
        .key(&fleet.epoch)
        .key(fleet.rooms(&cfg.node_id))
        .arg(&cfg.node_id)
        .arg(u64::try_from(cfg.presence_ttl.as_millis()).unwrap_or(u64::MAX))
        .arg(&fresh)
        .arg(if first { "1" } else { "0" });
    let reply: Value = timeout(cfg.subscribe_timeout, invoke(conn, &inv))
        .await
        .map_err(|_| Failure::Unavailable)??;
    let parts = items(&reply);
    let seen = parts.first().and_then(text).unwrap_or_default();
    let was_alive = parts.get(1).map(int) == Some(1);
    if first {
        // Rooms an earlier run under this node id left behind: re-assert them empty.
        let leftover: Vec<RoomName> = parts
            .get(2)
            .map(items)
            .unwrap_or_default()
            .iter()
            .filter_map(text)
            .filter_map(|r| RoomName::new(r).ok())
            .collect();
        if !leftover.is_empty() {
            tracing::info!(node = %cfg.node_id, rooms = leftover.len(), "removing presence left by an earlier run of this node");
        }
        table.reassert_all(false, leftover, Duration::ZERO);
    } else if epoch.as_deref() != Some(seen.as_str()) {
        tracing::warn!(node = %cfg.node_id, "redis lost its presence data; re-asserting this node's members");
        // Every live node renews within a third of the TTL, sees the new epoch and re-asserts:
        // only then can a user who left meanwhile be told apart from one not re-asserted yet.
        let leave_after = cfg.presence_ttl / 3 + reap_every(cfg);
        table.reassert_all(true, Vec::new(), leave_after);
    } else if !was_alive {
        tracing::warn!(node = %cfg.node_id, "this node's presence lease had run out; re-asserting its members");
        table.reassert_all(false, Vec::new(), Duration::ZERO);
    }
    *epoch = Some(seen);
    Ok(())
}

/// Sends every dirty room's changes, a batch of concurrent script calls at a time.
async fn sync_dirty(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
    table: &Table,
) -> Result<(), Failure> {
    let my_rooms = fleet.rooms(&cfg.node_id);
    loop {
        let batch = table.take_dirty(ENTRIES_PER_SYNC);
        if batch.is_empty() {
            return Ok(());
        }
        let calls = batch.iter().map(|sync| {
            let mut conn = conn.clone();
            let my_rooms = &my_rooms;
            async move {
                let keys = RoomKeys::new(cfg, sync.room.as_str());
                let mut inv = SCRIPTS.sync.prepare_invoke();
                inv.key(&keys.members)
                    .key(&keys.info)
                    .key(&keys.version)
                    .key(&keys.nodes)
                    .key(keys.node(&cfg.node_id))
                    .key(&fleet.leases)
                    .key(my_rooms)
                    .arg(&cfg.node_id)
                    .arg(event_channel(cfg, &sync.room))
                    .arg(sync.room.as_str())
                    .arg(if sync.full { "1" } else { "0" });
                for e in &sync.entries {
                    inv.arg(&e.user)
                        .arg(e.count)
                        .arg(e.info.as_deref().unwrap_or(""))
                        .arg(if e.announce { "1" } else { "0" });
                }
                match timeout(cfg.subscribe_timeout, invoke::<Value>(&mut conn, &inv)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(f)) => Err(f.classify()),
                    Err(_) => Err(Failure::Unavailable),
                }
            }
        });
        let outcomes = futures_util::future::join_all(calls).await;
        let mut failure = None;
        for (sync, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Ok(()) => table.confirm(sync),
                Err(f) => {
                    table.retry(sync);
                    failure.get_or_insert(f);
                }
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
    }
}

/// Announces the leave of `user`, who left `room` while Redis was away, unless a node
/// re-asserted them.
async fn leave_if_absent(
    cfg: &Config,
    conn: &mut Conn,
    room: &RoomName,
    user: &str,
) -> Result<(), Failure> {
    let keys = RoomKeys::new(cfg, room.as_str());
    let mut inv = SCRIPTS.leave_if_absent.prepare_invoke();
    inv.key(&keys.members)
        .key(&keys.info)
        .key(&keys.version)
        .arg(event_channel(cfg, room))
        .arg(room.as_str())
        .arg(&cfg.node_id)
        .arg(user);
    invoke::<Value>(conn, &inv).await.map(drop)
}

/// Finds nodes whose lease ran out and takes their members out of every room they held.
async fn reap_dead(cfg: &Config, fleet: &FleetKeys, conn: &mut Conn) -> Result<(), Failure> {
    let mut inv = SCRIPTS.expired.prepare_invoke();
    inv.key(&fleet.leases);
    let expired: Value = invoke(conn, &inv).await?;
    for dead in items(&expired).iter().filter_map(text) {
        let their_rooms = fleet.rooms(&dead);
        loop {
            let mut inv = SCRIPTS.dead_rooms.prepare_invoke();
            inv.key(&fleet.leases).key(&their_rooms).arg(&dead);
            let rooms: Value = invoke(conn, &inv).await?;
            let rooms: Vec<String> = items(&rooms).iter().filter_map(text).collect();
            if rooms.is_empty() {
                break;
            }
            let mut left = 0u64;
            for room in &rooms {
                let Ok(name) = RoomName::new(room) else {
                    continue;
                };
                left += reap_room(cfg, fleet, conn, &name, &dead).await?;
            }
            tracing::info!(node = %cfg.node_id, dead = %dead, rooms = rooms.len(), members = left, "removed the presence of a node whose lease ran out");
            if rooms.len() < 256 {
                break; // that was the rest; the next round finds anything added meanwhile
            }
        }
    }
    Ok(())
}

/// Most users one reap script call takes out of a room (at about 10 us each, leave event
/// included, a call holds Redis for a few milliseconds; a dead node's 10,000 members in one
/// call held it for 100 ms).
const REAP_CHUNK: usize = 256;

/// Takes `dead`'s members out of `room`, `REAP_CHUNK` at a time, until its share is gone (or
/// its lease is alive again). Returns how many users it took out. Safe to run from several
/// nodes at once: each user leaves once.
async fn reap_room(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
    room: &RoomName,
    dead: &str,
) -> Result<u64, Failure> {
    let keys = RoomKeys::new(cfg, room.as_str());
    let their_rooms = fleet.rooms(dead);
    let theirs = keys.node(dead);
    let channel = event_channel(cfg, room);
    let mut cursor = String::from("0");
    let mut left = 0;
    loop {
        let mut inv = SCRIPTS.reap.prepare_invoke();
        inv.key(&keys.members)
            .key(&keys.info)
            .key(&keys.version)
            .key(&keys.nodes)
            .key(&theirs)
            .key(&fleet.leases)
            .key(&their_rooms)
            .arg(dead)
            .arg(&channel)
            .arg(room.as_str())
            .arg(&cfg.node_id)
            .arg(&cursor)
            .arg(REAP_CHUNK);
        let reply: Value = invoke(conn, &inv).await?;
        let parts = items(&reply);
        left += parts.first().map_or(0, int);
        if parts.get(2).map(int) != Some(0) {
            return Ok(left); // done (or a reply we cannot follow: the next round retries)
        }
        cursor = parts
            .get(1)
            .and_then(text)
            .unwrap_or_else(|| String::from("0"));
    }
}

/// A random number for a new epoch id (std's randomly seeded hasher; no extra dependency).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
