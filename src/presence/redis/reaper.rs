//! Taking the members of dead nodes (whose lease ran out) out of their rooms, a bounded chunk
//! per script call, with a leave event per user.

use redis::Value;

use super::scripts::{SCRIPTS, invoke};
use super::{Failure, FleetKeys, RoomKeys, event_channel, int, items, text};
use crate::bus::Conn;
use crate::config::Config;
use crate::room::RoomName;

/// A node whose lease ran out, with the expiry read from the lease set (a room script on a
/// cluster keeps a share synced under a newer lease: see `scripts`).
pub(super) struct Expired {
    pub(super) node: String,
    pub(super) expiry: String,
}

/// Up to `limit` nodes whose lease ran out, by Redis's clock.
pub(super) async fn expired(
    fleet: &FleetKeys,
    conn: &mut Conn,
    limit: usize,
) -> Result<Vec<Expired>, Failure> {
    let mut inv = SCRIPTS.expired.call();
    inv.key(&fleet.leases).arg(limit);
    let reply: Value = invoke(conn, &inv).await?;
    Ok(items(&reply)
        .chunks_exact(2)
        .filter_map(|pair| {
            Some(Expired {
                node: text(&pair[0])?,
                expiry: text(&pair[1])?,
            })
        })
        .collect())
}

/// Finds nodes whose lease ran out and takes their members out of every room they held.
pub(super) async fn reap_dead(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
) -> Result<(), Failure> {
    for dead in expired(fleet, conn, 64).await? {
        loop {
            let mut inv = SCRIPTS.dead_rooms.call();
            inv.key(&fleet.leases).arg(&dead.node);
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
            tracing::info!(node = %cfg.node_id, dead = %dead.node, rooms = rooms.len(), members = left, "removed the presence of a node whose lease ran out");
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
    dead: &Expired,
) -> Result<u64, Failure> {
    let keys = RoomKeys::new(cfg, fleet, room);
    let channel = event_channel(cfg, room);
    let mut cursor = String::from("0");
    let mut left = 0;
    loop {
        let mut inv = keys.call(&SCRIPTS.reap);
        fleet.same_slot(&mut inv, &dead.node);
        inv.arg(&dead.node)
            .arg(&channel)
            .arg(room.as_str())
            .arg(&cfg.node_id)
            .arg(conn.publish_command())
            .arg(&cursor)
            .arg(REAP_CHUNK)
            .arg(&dead.expiry);
        let reply: Value = invoke(conn, &inv).await?;
        let parts = items(&reply);
        left += parts.first().map_or(0, int);
        match parts.get(2).map(int) {
            Some(0) => {}
            // The share is gone. On a cluster the script could not take the room out of the
            // node's room set (another slot): done here, unless the node renewed meanwhile.
            Some(1) if fleet.cluster => {
                let mut inv = SCRIPTS.forget.call();
                inv.key(&fleet.leases).arg(&dead.node).arg(room.as_str());
                invoke(conn, &inv).await?;
                return Ok(left);
            }
            // Done, alive again, or a reply we cannot follow (the next round retries).
            _ => return Ok(left),
        }
        cursor = parts
            .get(1)
            .and_then(text)
            .unwrap_or_else(|| String::from("0"));
    }
}
