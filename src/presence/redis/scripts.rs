//! The presence scripts: their Lua text, and their invocation through the bus's one script
//! runner (`bus::script`: by SHA1, loaded again when Redis forgot them).

use std::sync::LazyLock;

use redis::Value;

use super::Failure;
use crate::bus::Conn;
use crate::bus::script::{self, Call, Script};

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

pub(super) struct Scripts {
    pub(super) sync: Script,
    pub(super) lease: Script,
    pub(super) expired: Script,
    pub(super) dead_rooms: Script,
    pub(super) reap: Script,
    pub(super) query: Script,
    pub(super) release: Script,
    pub(super) leave_if_absent: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
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

/// Runs one script call on `conn` (presence needs a single server: its scripts span a room's
/// keys and the fleet's lease set).
pub(super) async fn invoke(conn: &mut Conn, call: &Call<'_>) -> Result<Value, Failure> {
    single_server(conn)?;
    script::run(conn, call).await.map_err(Failure::Redis)
}

/// Refuses a cluster connection (presence needs a single server: its scripts span a room's
/// keys and the fleet's lease set).
pub(super) fn single_server(conn: &Conn) -> Result<(), Failure> {
    match conn {
        Conn::Server(_) => Ok(()),
        #[cfg(feature = "cluster")]
        Conn::Cluster(_) => Err(Failure::Cluster),
    }
}
