//! Sending this node's presence table to Redis: each dirty room's current counts in one
//! script call (a batch of rooms at a time), and the leaves owed for users who left while
//! Redis was away and lost its data.

use std::collections::HashSet;

use redis::Value;
use tokio::time::timeout;

use super::scripts::{SCRIPTS, invoke};
use super::{Failure, FleetKeys, RoomKeys, event_channel, int};
use crate::bus::Conn;
use crate::bus::script::Scripting;
use crate::config::Config;
use crate::presence::{ENTRIES_PER_SYNC, Table};
use crate::room::RoomName;

/// What this node's syncs carry on a cluster, where a room script cannot read the fleet's keys
/// (another slot). Unused on one server, where the sync script reads and writes them itself.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// The end of this node's lease (ms, Redis's clock) as of its last renewal: a room script
    /// refuses a sync past it (`NOLEASE`), as it refuses one on one server when the lease ran
    /// out.
    pub(super) until_ms: u64,
    /// The rooms this node has put in its room set (what the reaper reads) since it last
    /// re-asserted: a room goes in before this node's share of it is first written, and out
    /// once the share is gone.
    pub(super) indexed: HashSet<RoomName>,
}

/// Sends every dirty room's changes, a batch of concurrent script calls at a time.
pub(super) async fn sync_dirty(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
    table: &Table,
    held: &mut Held,
) -> Result<(), Failure> {
    let my_rooms = fleet.rooms(&cfg.node_id);
    let publish = conn.publish_command();
    loop {
        let batch = table.take_dirty(ENTRIES_PER_SYNC);
        if batch.is_empty() {
            return Ok(());
        }
        if fleet.cluster {
            let new: Vec<&RoomName> = batch
                .iter()
                .filter(|s| s.entries.iter().any(|e| e.count > 0))
                .map(|s| &s.room)
                .filter(|room| !held.indexed.contains(*room))
                .collect();
            if !new.is_empty() {
                let mut cmd = redis::cmd("SADD");
                cmd.arg(&my_rooms);
                for room in &new {
                    cmd.arg(room.as_str());
                }
                let added = timeout(cfg.subscribe_timeout, conn.query(&cmd)).await;
                if !matches!(added, Ok(Ok(_))) {
                    for sync in batch {
                        table.retry(sync);
                    }
                    return Err(match added {
                        Ok(Err(e)) => Failure::Redis(e),
                        _ => Failure::Unavailable,
                    });
                }
                held.indexed.extend(new.into_iter().cloned());
            }
        }
        let until_ms = held.until_ms.to_string();
        let calls = batch.iter().map(|sync| {
            let mut conn = conn.clone();
            let until_ms = &until_ms;
            async move {
                let keys = RoomKeys::new(cfg, fleet, &sync.room);
                let mut inv = keys.call(&SCRIPTS.sync);
                fleet.same_slot(&mut inv, &cfg.node_id);
                let full = match (sync.full, sync.silent) {
                    (false, _) => "0",
                    (true, false) => "1",
                    (true, true) => "2",
                };
                inv.arg(&cfg.node_id)
                    .arg(event_channel(cfg, &sync.room))
                    .arg(sync.room.as_str())
                    .arg(full)
                    .arg(publish)
                    .arg(if fleet.cluster { until_ms.as_str() } else { "" });
                for e in &sync.entries {
                    inv.arg(&e.user)
                        .arg(e.count)
                        .arg(e.info.as_deref().unwrap_or(""))
                        .arg(if e.announce { "1" } else { "0" });
                }
                match timeout(cfg.subscribe_timeout, invoke(&mut conn, &inv)).await {
                    Ok(Ok(held)) => Ok(int(&held) == 1),
                    Ok(Err(f)) => Err(f.classify()),
                    Err(_) => Err(Failure::Unavailable),
                }
            }
        });
        let outcomes = futures_util::future::join_all(calls).await;
        let mut failure = None;
        let mut emptied = Vec::new();
        for (sync, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Ok(holds) => {
                    // A full sync may empty a room an earlier run of this node id listed.
                    let listed = held.indexed.contains(&sync.room) || sync.full;
                    if fleet.cluster && !holds && listed {
                        emptied.push(sync.room.clone());
                    }
                    table.confirm(sync);
                }
                Err(f) => {
                    table.retry(sync);
                    failure.get_or_insert(f);
                }
            }
        }
        if !emptied.is_empty() {
            unindex(cfg, conn, &my_rooms, emptied, held).await;
        }
        if let Some(f) = failure {
            return Err(f);
        }
    }
}

/// Takes rooms this node's share left (on a cluster) out of its room set. A failure leaves
/// them in: the reaper then visits a room with no share of the node's, which costs a call.
async fn unindex(
    cfg: &Config,
    conn: &mut Conn,
    my_rooms: &str,
    emptied: Vec<RoomName>,
    held: &mut Held,
) {
    let mut cmd = redis::cmd("SREM");
    cmd.arg(my_rooms);
    for room in &emptied {
        cmd.arg(room.as_str());
    }
    let removed: Result<Result<Value, _>, _> =
        timeout(cfg.subscribe_timeout, conn.query(&cmd)).await;
    if matches!(removed, Ok(Ok(_))) {
        for room in &emptied {
            held.indexed.remove(room);
        }
    }
}

/// Announces the leave of `user`, who left `room` while Redis was away, unless a node
/// re-asserted them.
pub(super) async fn leave_if_absent(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
    room: &RoomName,
    user: &str,
) -> Result<(), Failure> {
    let keys = RoomKeys::new(cfg, fleet, room);
    let mut inv = keys.call(&SCRIPTS.leave_if_absent);
    inv.arg(event_channel(cfg, room))
        .arg(room.as_str())
        .arg(&cfg.node_id)
        .arg(user)
        .arg(conn.publish_command());
    invoke(conn, &inv).await.map(drop)
}
