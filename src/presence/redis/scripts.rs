//! The presence scripts: their Lua text, and their invocation through the bus's one script
//! runner (`bus::script`: by SHA1, loaded again when Redis forgot them).

use std::sync::LazyLock;

use redis::Value;

use super::Failure;
use crate::bus::Conn;
use crate::bus::script::{self, Call, Script};

/// Shared by every script: the clock, leases, versions, events and the one way a count
/// changes.
///
/// A room script declares one key, `KEYS[1]` = `<tag>:members`, and names the room's other
/// keys from the same tag (`room_keys`): they share its slot. One declared key keeps a room
/// script runnable while its slot migrates on a cluster: Redis refuses a command declaring
/// several keys with TRYAGAIN while some of them have moved and others have not or do not
/// exist, until the migration ends; with one key it redirects the call to wherever the keys
/// are. On one server the fleet's keys follow (`KEYS[2]`: the lease set, `KEYS[3]`: a node's
/// room set), read and written in the same atomic step.
///
/// A room script's `R` names the room's keys, its channel and how to publish there (`PUBLISH`,
/// or `SPUBLISH` on a cluster), and how to tell a dead node: on one server `R.fleet` is the
/// fleet's lease set; on a cluster (the lease set lives in another slot) `R.expired` holds the
/// nodes the caller found expired in the lease set just before, each with the expiry it saw.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The keys of the room whose `<tag>:members` key is `members`.
local function room_keys(members)
  local tag = string.sub(members, 1, #members - #':members')
  return { members = members, info = tag .. ':info', version = tag .. ':version',
           nodes = tag .. ':nodes', leases = tag .. ':leases', node = tag .. ':node:' }
end

-- The fleet key `name` (`epoch`, `rooms:<node>`) of the fleet whose lease set is `leases`:
-- the same base, so the same slot. Fleet scripts declare the lease set alone, for the reason
-- room scripts declare one key (see `room_keys`).
local function fleet_key(leases, name)
  return string.sub(leases, 1, #leases - #'leases') .. name
end

local function alive(leases, node, now)
  local exp = redis.call('ZSCORE', leases, node)
  return exp and tonumber(exp) >= now
end

-- Whether `node`'s share of the room belongs to a lease that ran out. On a cluster, a share
-- the node synced under a newer lease than the one the caller saw expire (`R.leases` keeps the
-- lease each node last synced under) is alive: the node renewed in between, and re-asserts.
local function dead(R, node, now)
  if R.fleet then return not alive(R.fleet, node, now) end
  local seen = R.expired[node]
  if not seen then return false end
  local synced = redis.call('HGET', R.leases, node)
  return not (synced and tonumber(synced) > tonumber(seen))
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
  redis.call(R.publish, R.channel, '{"v":1,"origin":' .. cjson.encode(R.origin) ..
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

-- A dead node's share is gone from the room: forget that it held one. `their_rooms` (the
-- node's room set) is nil on a cluster, where the caller updates it (another slot).
local function forget(R, dead_node, their_rooms)
  redis.call('SREM', R.nodes, dead_node)
  redis.call('HDEL', R.leases, dead_node)
  if their_rooms then redis.call('SREM', their_rooms, R.room) end
end

-- Takes a dead node's whole share out of a room (callers check that it is small).
local function reap(R, dead_node, theirs, their_rooms)
  local entries = redis.call('HGETALL', theirs)
  for i = 1, #entries, 2 do set_count(R, theirs, entries[i], 0, '', true) end
  redis.call('DEL', theirs)
  forget(R, dead_node, their_rooms)
  return #entries / 2
end

-- Takes at most `limit` users of a dead node's share out of a room, from HSCAN `cursor`, so
-- that no call blocks Redis for long whatever the share's size. Returns {users taken out,
-- the cursor to go on from, 1 once the share is gone}. Users taken out are deleted from the
-- share, so racing callers (each with its own cursor) never take a user out twice.
local function reap_some(R, dead_node, theirs, their_rooms, cursor, limit)
  local page = redis.call('HSCAN', theirs, cursor, 'COUNT', limit)
  local entries = page[2]
  local n = 0
  for i = 1, #entries, 2 do
    if n >= limit then break end
    set_count(R, theirs, entries[i], 0, '', true)
    n = n + 1
  end
  if redis.call('EXISTS', theirs) == 0 then
    forget(R, dead_node, their_rooms)
    return { n, '0', 1 }
  end
  -- A page larger than `limit` (HSCAN's COUNT is a hint): scan its cursor again.
  if n * 2 < #entries then return { n, cursor, 0 } end
  return { n, page[1], 0 }
end
"#;

/// KEYS: the room's members; on one server also the fleet's leases and my rooms. ARGV: node,
/// channel, room, full ('0', '1', or '2': full after Redis may have lost writes, so versions
/// jump past any it lost), publish command, my lease's end (ms, Redis's clock; on a cluster
/// only), then (user, count, info, announce 0/1) per entry. Returns 1 when this node holds a
/// share of the room after the call, else 0.
const SYNC: &str = r#"
local now = now_ms()
local single = #KEYS > 1
local held_until = tonumber(ARGV[6])
if (single and not alive(KEYS[2], ARGV[1], now)) or
   (not single and (not held_until or now >= held_until)) then
  return redis.error_reply('NOLEASE this node holds no presence lease')
end
local R = room_keys(KEYS[1])
R.channel, R.room, R.origin, R.publish = ARGV[2], ARGV[3], ARGV[1], ARGV[5]
local mine = R.node .. ARGV[1]
if ARGV[4] == '2' then
  local clock = now * 1000
  if clock > tonumber(version(R.version)) then
    redis.call('SET', R.version, string.format('%d', clock))
  end
end
local listed = {}
for i = 7, #ARGV, 4 do
  set_count(R, mine, ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3] == '1')
  listed[ARGV[i]] = true
end
if ARGV[4] ~= '0' then
  for _, user in ipairs(redis.call('HKEYS', mine)) do
    if not listed[user] then set_count(R, mine, user, 0, '', true) end
  end
end
if redis.call('EXISTS', mine) == 1 then
  redis.call('SADD', R.nodes, ARGV[1])
  if single then redis.call('SADD', KEYS[3], R.room)
  else redis.call('HSET', R.leases, ARGV[1], ARGV[6]) end
  return 1
end
redis.call('SREM', R.nodes, ARGV[1])
redis.call('HDEL', R.leases, ARGV[1])
if single then redis.call('SREM', KEYS[3], R.room) end
return 0
"#;

/// KEYS: leases. ARGV: node, ttl (ms), a fresh epoch, list my rooms (0/1). Returns {epoch,
/// whether the lease was alive, [my rooms], the lease's end (ms, Redis's clock)}.
const LEASE: &str = r#"
local now = now_ms()
local epoch = fleet_key(KEYS[1], 'epoch')
local e = redis.call('GET', epoch)
if not e then
  redis.call('SET', epoch, ARGV[3])
  e = ARGV[3]
end
local was = alive(KEYS[1], ARGV[1], now)
local until_ms = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
local rooms = {}
if ARGV[4] == '1' then rooms = redis.call('SMEMBERS', fleet_key(KEYS[1], 'rooms:' .. ARGV[1])) end
return { e, was and 1 or 0, rooms, until_ms }
"#;

/// KEYS: leases. ARGV: most nodes to return. Returns nodes whose lease ran out, each followed
/// by its expiry.
const EXPIRED: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms(), 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[1]))
"#;

/// KEYS: leases. ARGV: dead node. Returns its rooms while its lease is expired (empty when it
/// came back); forgets its lease once no room is left.
const DEAD_ROOMS: &str = r#"
if alive(KEYS[1], ARGV[1], now_ms()) then return {} end
local rooms = redis.call('SRANDMEMBER', fleet_key(KEYS[1], 'rooms:' .. ARGV[1]), 256)
if #rooms == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return rooms
"#;

/// On a cluster, after `REAP` took a dead node's whole share out of a room: the room leaves
/// the node's room set, unless the node renewed its lease meanwhile (it re-asserts, and may
/// have listed the room again). KEYS: leases. ARGV: dead node, room.
const FORGET: &str = r#"
if not alive(KEYS[1], ARGV[1], now_ms()) then
  redis.call('SREM', fleet_key(KEYS[1], 'rooms:' .. ARGV[1]), ARGV[2])
end
return 1
"#;

/// KEYS: the room's members; on one server also the fleet's leases and their rooms. ARGV:
/// dead node, channel, room, origin, publish command, cursor, limit, the expiry the caller saw
/// (on a cluster). Returns {users taken out, next cursor, 0 | 1 once the share is gone | 2
/// when the node is alive (nothing done)}.
const REAP: &str = r#"
local single = #KEYS > 1
local R = room_keys(KEYS[1])
R.channel, R.room, R.origin, R.publish = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
R.fleet, R.expired = single and KEYS[2] or nil, { [ARGV[1]] = ARGV[8] }
if not dead(R, ARGV[1], now_ms()) then return { 0, '0', 2 } end
return reap_some(R, ARGV[1], R.node .. ARGV[1], single and KEYS[3] or nil, ARGV[6],
  tonumber(ARGV[7]))
"#;

/// KEYS: the room's members; on one server also the fleet's leases. ARGV: channel, room,
/// origin, publish command, per-node rooms prefix (one server), 'count' | 'reap' | 'list',
/// limit, then on a cluster (node, expiry) for each node the caller found expired. Reaps the
/// dead nodes met in the room first, so the answer never counts their members, as long as
/// that is at most `limit` users; returns {version, member count}, the version alone (a
/// listing reads the hashes after it, in the same transaction), {version, members, info}
/// ('list': a listing the transaction could not run, during a slot migration), or {'dead',
/// node, ...}: nodes whose larger shares the caller must reap (`REAP`) before asking again.
const QUERY: &str = r#"
local now = now_ms()
local single = #KEYS > 1
local expired = {}
for i = 8, #ARGV, 2 do expired[ARGV[i]] = ARGV[i + 1] end
local R = room_keys(KEYS[1])
R.channel, R.room, R.origin, R.publish = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
R.fleet, R.expired = single and KEYS[2] or nil, expired
local budget = tonumber(ARGV[7])
local pending = { 'dead' }
for _, n in ipairs(redis.call('SMEMBERS', R.nodes)) do
  if dead(R, n, now) then
    local theirs = R.node .. n
    local size = redis.call('HLEN', theirs)
    if size <= budget then
      budget = budget - reap(R, n, theirs, single and (ARGV[5] .. n) or nil)
    else
      pending[#pending + 1] = n
    end
  end
end
if #pending > 1 then return pending end
local v = version(R.version)
if ARGV[6] == 'count' then return { v, redis.call('HLEN', R.members) } end
if ARGV[6] == 'list' then
  return { v, redis.call('HGETALL', R.members), redis.call('HGETALL', R.info) }
end
return v
"#;

/// KEYS: the room's members. ARGV: channel, room, origin, user, publish command. A leave for
/// a user who left while Redis was away and lost its data, unless some node re-asserted them
/// since.
const LEAVE_IF_ABSENT: &str = r#"
local R = room_keys(KEYS[1])
R.channel, R.room, R.origin, R.publish = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
if redis.call('HEXISTS', R.members, ARGV[4]) == 1 then return 0 end
publish(R, 'leave', ARGV[4], nil)
return 1
"#;

/// KEYS: leases. ARGV: node. Drops the lease once no room holds this node's connections (a
/// clean shutdown); otherwise the lease runs out and survivors reap.
const RELEASE: &str = r#"
if redis.call('SCARD', fleet_key(KEYS[1], 'rooms:' .. ARGV[1])) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
"#;

pub(super) struct Scripts {
    pub(super) sync: Script,
    pub(super) lease: Script,
    pub(super) expired: Script,
    pub(super) dead_rooms: Script,
    pub(super) forget: Script,
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
        forget: s(FORGET),
        reap: s(REAP),
        query: s(QUERY),
        release: s(RELEASE),
        leave_if_absent: s(LEAVE_IF_ABSENT),
    }
});

/// Runs one script call on `conn`.
pub(super) async fn invoke(conn: &mut Conn, call: &Call<'_>) -> Result<Value, Failure> {
    script::run(conn, call).await.map_err(Failure::Redis)
}
