//! Taking the members of dead nodes (whose lease ran out) out of their rooms, a bounded chunk
//! per script call, with a leave event per user.

use redis::Value;

use super::scripts::{SCRIPTS, invoke};
use super::{Failure, FleetKeys, RoomKeys, event_channel, int, items, text};
use crate::bus::Conn;
use crate::config::Config;
use crate::room::RoomName;

/// Finds nodes whose lease ran out and takes their members out of every room they held.
pub(super) async fn reap_dead(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
) -> Result<(), Failure> {
    let mut inv = SCRIPTS.expired.call();
    inv.key(&fleet.leases);
    let expired: Value = invoke(conn, &inv).await?;
    for dead in items(&expired).iter().filter_map(text) {
        let their_rooms = fleet.rooms(&dead);
        loop {
            let mut inv = SCRIPTS.dead_rooms.call();
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

/// Most users one reap script call takes out of a room: Redis runs nothing else while a script
/// runs, so a dead node's share is taken out a bounded chunk at a time (a call holds Redis
/// for a few milliseconds), not in one call whose length grows with the share.
pub(super) const REAP_CHUNK: usize = 256;

/// Takes `dead`'s members out of `room`, `REAP_CHUNK` at a time, until its share is gone (or
/// its lease is alive again). Returns how many users it took out. Safe to run from several
/// nodes at once: each user leaves once.
pub(super) async fn reap_room(
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
        let mut inv = SCRIPTS.reap.call();
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
