//! What a handler asks about a room's presence: whether it may have members, the member list
//! and the member count, each read from Redis in one round trip (plus the reaping of a dead
//! node's large share, when a query meets one).

use std::time::Duration;

use redis::Value;
use tokio::time::timeout;

use super::reaper::{REAP_CHUNK, reap_room};
use super::scripts::{SCRIPTS, invoke, single_server};
use super::{Failure, FleetKeys, RoomKeys, event_channel, int, items, pairs, text};
use crate::bus::Bus;
use crate::bus::Conn;
use crate::bus::script::{self, Call};
use crate::error::Error;
use crate::presence::{Count, MemberEntry, Snapshot};
use crate::room::RoomName;

/// The publisher connection, waiting (up to `wait`) for one while Redis is away.
pub(super) async fn conn(bus: &Bus, wait: Duration) -> Result<Conn, Failure> {
    let mut conns = bus.connections();
    match timeout(wait, conns.wait_for(Option::is_some)).await {
        Ok(Ok(conn)) => conn.clone().ok_or(Failure::Unavailable),
        Ok(Err(_)) | Err(_) => Err(Failure::Unavailable),
    }
}

/// Whether `room` may have members: presence opted in for it, on a single Redis server.
pub(crate) fn check(bus: &Bus, room: &RoomName) -> Result<(), Error> {
    if !bus.config().has_presence(room.as_str()) {
        return Err(Error::presence_off(format!(
            "room {:?} has no presence (FanoutBuilder::presence)",
            room.as_str()
        )));
    }
    match bus.is_cluster() {
        None => Err(Error::no_redis()),
        Some(false) => Ok(()),
        Some(true) => Err(Error::presence_off(
            "presence needs a single redis server, not a cluster",
        )),
    }
}

/// Runs the query script for `room` in `mode`: `count` (it returns the version and the
/// member count) or `reap` (the version only; within the same transaction, two native
/// `HGETALL`s read the members and their info: native commands build the reply far more
/// cheaply for Redis than Lua does, see BENCHMARKS.md).
async fn query(bus: &Bus, room: &str, mode: &str) -> Result<Value, Error> {
    let room = RoomName::new(room)?;
    let cfg = bus.config();
    check(bus, &room)?;
    let wait = cfg.subscribe_timeout;
    let keys = RoomKeys::new(cfg, room.as_str());
    let fleet = FleetKeys::new(cfg);
    let run = async {
        let mut conn = conn(bus, wait).await?;
        let mut inv = SCRIPTS.query.call();
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
                invoke(&mut conn, &inv).await?
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
pub(crate) async fn snapshot(bus: &Bus, room: &str) -> Result<Snapshot, Error> {
    let reply = query(bus, room, "reap").await?;
    let parts = items(&reply);
    let (Some(version), Some(members), info) = (parts.first(), parts.get(1), parts.get(2)) else {
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
pub(crate) async fn count(bus: &Bus, room: &str) -> Result<Count, Error> {
    let reply = query(bus, room, "count").await?;
    let parts = items(&reply);
    match (parts.first(), parts.get(1)) {
        (Some(version), Some(members)) => Ok(Count {
            members: int(members),
            version: int(version),
        }),
        _ => Err(Error::redis("unexpected reply to the presence count")),
    }
}

/// The query script in a transaction with the two `HGETALL`s that read the members and their
/// info: [script reply, members, info].
async fn list(conn: &mut Conn, query: &Call<'_>, keys: &RoomKeys) -> Result<Value, Failure> {
    single_server(conn)?;
    let mut pipe = redis::pipe();
    pipe.atomic()
        .add_command(query.cmd())
        .cmd("HGETALL")
        .arg(&keys.members)
        .cmd("HGETALL")
        .arg(&keys.info);
    script::run_pipeline(conn, query.script(), &pipe)
        .await
        .map_err(Failure::Redis)
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
