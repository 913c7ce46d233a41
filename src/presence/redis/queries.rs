//! What a handler asks about a room's presence: whether it may have members, the member list
//! and the member count, each read from Redis in one round trip (plus the reaping of a dead
//! node's large share, when a query meets one).

use std::time::Duration;

use redis::Value;
use tokio::time::timeout;

use super::reaper::{self, Expired, REAP_CHUNK, reap_room};
use super::scripts::{SCRIPTS, invoke};
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

/// Whether `room` may have members: presence opted in for it, and a Redis to keep it in.
pub(crate) fn check(bus: &Bus, room: &RoomName) -> Result<(), Error> {
    if !bus.config().has_presence(room.as_str()) {
        return Err(Error::presence_off(format!(
            "room {:?} has no presence (FanoutBuilder::presence)",
            room.as_str()
        )));
    }
    match bus.is_cluster() {
        None => Err(Error::no_redis()),
        Some(_) => Ok(()),
    }
}

/// Runs the query script for `room` in `mode`: `count` (it returns the version and the
/// member count) or `reap` (the version only; within the same transaction, two native
/// `HGETALL`s read the members and their info: native commands build the reply far more
/// cheaply for Redis than Lua does, see BENCHMARKS.md).
///
/// On a cluster the lease set lives in another slot than the room: the expired leases are
/// read first, one round trip before the script (see the README's "Presence on Redis
/// Cluster" for what that leaves open).
async fn query(bus: &Bus, room: &str, mode: &str) -> Result<Value, Error> {
    let room = RoomName::new(room)?;
    let cfg = bus.config();
    check(bus, &room)?;
    let wait = cfg.subscribe_timeout;
    let fleet = FleetKeys::new(cfg, bus.is_cluster() == Some(true));
    let keys = RoomKeys::new(cfg, &fleet, &room);
    let run = async {
        let mut conn = conn(bus, wait).await?;
        loop {
            let expired = if fleet.cluster {
                reaper::expired(&fleet, &mut conn, EXPIRED_PER_QUERY).await?
            } else {
                Vec::new()
            };
            let publish = conn.publish_command();
            let call = |mode: &str| {
                let mut inv = keys.call(&SCRIPTS.query);
                if !fleet.cluster {
                    inv.key(&fleet.leases);
                }
                inv.arg(event_channel(cfg, &room))
                    .arg(room.as_str())
                    .arg(&cfg.node_id)
                    .arg(publish)
                    .arg(&fleet.rooms_prefix)
                    .arg(mode)
                    .arg(REAP_CHUNK);
                for e in &expired {
                    inv.arg(&e.node).arg(&e.expiry);
                }
                inv
            };
            let reply = if mode == "reap" {
                match list(&mut conn, &call("reap"), &keys).await {
                    // A transaction is not redirected while the room's slot migrates: the
                    // script alone is, and reads the hashes itself.
                    Err(_) if fleet.cluster => invoke(&mut conn, &call("list")).await?,
                    other => other?,
                }
            } else {
                invoke(&mut conn, &call(mode)).await?
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
                let expiry = expired
                    .iter()
                    .find(|e| e.node == node)
                    .map(|e| e.expiry.clone())
                    .unwrap_or_default();
                reap_room(cfg, &fleet, &mut conn, &room, &Expired { node, expiry }).await?;
            }
        }
    };
    match timeout(wait, run).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(f)) => Err(f.into_error(room.as_str())),
        Err(_) => Err(Error::presence_timeout(room.as_str())),
    }
}

/// Most expired leases a query on a cluster hands its script: more dead nodes than this at
/// once (each is forgotten once its rooms are reaped) may leave one listed until the reaper
/// or the next query takes it out.
const EXPIRED_PER_QUERY: usize = 1024;

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
