//! Presence in Redis: the keys, the Lua scripts that change them atomically (run by the bus's
//! one script runner, `bus::script`), the per-node lease, and the task that syncs this node's
//! table (`super::table`) and removes the members of dead nodes. With `bus/`, the only place
//! that names Redis.
//!
//! # Keys
//!
//! Per room, under the hash tag of its channel name `{<prefix><room>}` (so that one room's
//! keys and channel share a slot; on a cluster, the channel its events go to, shard 0's of a
//! sharded room):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{..}:members` | hash | user -> connections over the fleet (`HLEN` is the member count) |
//! | `{..}:info` | hash | user -> application info (JSON text), for users that have some |
//! | `{..}:version` | string | the version of the room's last join or leave event |
//! | `{..}:nodes` | set | nodes that hold connections in the room |
//! | `{..}:node:<node>` | hash | user -> connections on that node: what its death takes away |
//! | `{..}:leases` | hash | on a cluster: node -> end of the lease it last synced the room under |
//!
//! Per fleet, under `__axum_fanout:presence:<prefix>` (`<prefix>` is the channel prefix, so
//! two fleets with different prefixes share nothing): `leases`, a sorted set node -> expiry
//! (ms, Redis's clock); `epoch`, a random id written once, that changes only when Redis loses
//! its data; `rooms:<node>`, the rooms a node holds connections in (for the reaper). On a
//! cluster the base is a hash tag, `{__axum_fanout:presence:<prefix>}`, so that the fleet's
//! keys share one slot.
//!
//! Every script touches the keys of one slot: a room's, or the fleet's. On one server a room
//! script is also handed the fleet's lease set and room set, and checks a lease in the same
//! atomic step; on a cluster (another slot) it is handed what it needs instead (see
//! `scripts`), and the node's room set is written around it (`sync`, `reaper`).
//!
//! # Leases
//!
//! A node renews one lease (one `ZADD`) every third of the TTL, whatever its number of rooms
//! and members: O(1) per node. Every second each node asks for expired leases (a range of the
//! sorted set); for each it runs the reap script on every room of the dead node, at most 256
//! users per call (`reaper`), so that a share of 10,000 users never holds Redis for more than
//! a few milliseconds at a time. Each call checks the lease again (on a cluster: against the
//! lease it was synced under, see `scripts`), takes users out of the dead
//! node's share and the members, and publishes their leave events, atomically: with several
//! survivors racing, each user leaves once. A query that meets a dead node in a room reaps it
//! first (a small share in the query script itself, a larger one chunk by chunk before the
//! query runs again), so no listing ever shows a member of a node whose lease ran out.
//!
//! # Events
//!
//! Join and leave events are published by the same script that changes the counts, on the
//! room's channel (shard 0 of a sharded room), as ordinary envelopes: they reach sockets
//! through the one delivery path, in Redis's order with the room's messages. A user's
//! messages are published after the join that made them a member returned, so no client sees
//! them before the join.
//!
//! # Layout
//!
//! - `scripts`: the Lua scripts and how they are invoked (loaded once, run by SHA1);
//! - `queries`: the member list and count a handler asks for, and the checks before them;
//! - `leases`: the presence task: this node's lease, the epoch that tells a Redis data loss;
//! - `sync`: sending this node's table (`crate::presence`) to Redis;
//! - `reaper`: taking the members of nodes whose lease ran out out of their rooms;
//! - `moves`: on a cluster, re-asserting the rooms whose slot changed masters.

mod leases;
mod moves;
mod queries;
mod reaper;
mod scripts;
mod sync;

pub(crate) use leases::{release, start};
pub(crate) use queries::{check, count, snapshot};

use redis::{RedisError, Value};

use crate::bus::script::{self, Call, Script, items, text};
use crate::channel;
use crate::config::Config;
use crate::error::Error;
use crate::room::RoomName;

/// The key names of one room (the scripts name the others from the same tag: see `scripts`).
struct RoomKeys {
    members: String,
    info: String,
}

impl RoomKeys {
    fn new(config: &Config, fleet: &FleetKeys, room: &RoomName) -> Self {
        // The keys live in the hash slot of a channel, as the durable rooms' keys do. On a
        // cluster, the one presence events go to (shard 0 of a sharded room), so that the
        // scripts may SPUBLISH there; on one server, the room's own channel name, as every
        // earlier version named them (a fleet upgraded node by node keeps its data).
        let channel = if fleet.cluster {
            event_channel(config, room)
        } else {
            format!("{}{room}", config.channel_prefix)
        };
        let tag = script::room_key_base(&channel);
        Self {
            members: format!("{tag}:members"),
            info: format!("{tag}:info"),
        }
    }

    /// Starts a call of a room script: its one declared key.
    fn call<'a>(&self, script: &'a Script) -> Call<'a> {
        let mut call = script.call();
        call.key(&self.members);
        call
    }
}

/// The fleet-wide key names.
struct FleetKeys {
    /// The lease set; the scripts name the fleet's other keys (`epoch`, `rooms:<node>`) from
    /// it, as `rooms_prefix` does.
    leases: String,
    /// Prefix of each node's room set: + node id.
    rooms_prefix: String,
    /// On a Redis Cluster: the fleet's keys share one slot (a hash tag), which no room's keys
    /// share, so room scripts are handed what they need of them (see `scripts`).
    cluster: bool,
}

impl FleetKeys {
    fn new(config: &Config, cluster: bool) -> Self {
        let base = if cluster {
            format!("{{__axum_fanout:presence:{}}}", config.channel_prefix)
        } else {
            // Unchanged on one server (no hash tag), so an upgraded fleet keeps its leases.
            format!("__axum_fanout:presence:{}", config.channel_prefix)
        };
        Self {
            leases: format!("{base}leases"),
            rooms_prefix: format!("{base}rooms:"),
            cluster,
        }
    }

    fn rooms(&self, node: &str) -> String {
        format!("{}{node}", self.rooms_prefix)
    }

    /// Adds the fleet keys a room script reads in the same atomic step on one server: the
    /// lease set and `node`'s room set. On a cluster they live in another slot: none.
    fn same_slot(&self, call: &mut Call<'_>, node: &str) {
        if !self.cluster {
            call.key(&self.leases).key(self.rooms(node));
        }
    }
}

/// The channel presence events of `room` go to: the room's own (shard 0 when sharded).
fn event_channel(config: &Config, room: &RoomName) -> String {
    channel::for_sender(config, room, 0)
}

/// Why a presence command did not go through.
#[derive(Debug)]
enum Failure {
    Redis(RedisError),
    /// No connection, or no reply in time.
    Unavailable,
    /// This node's lease is gone: renew it (and re-assert) before syncing again.
    NoLease,
}

impl Failure {
    fn into_error(self, room: &str) -> Error {
        match self {
            Failure::Redis(e) => Error::redis(e),
            Failure::Unavailable | Failure::NoLease => Error::presence_timeout(room),
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
        }
    }
}

/// A reply element as a count or version (0 when it is none: a missing field).
fn int(v: &Value) -> u64 {
    script::int(v).unwrap_or(0)
}

/// An `HGETALL` reply as (field, value) pairs: a map (RESP3) or a flat array (RESP2).
fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
        _ => items(v).chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
    }
}
