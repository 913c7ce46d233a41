//! Sending this node's presence table to Redis: each dirty room's current counts in one
//! script call (a batch of rooms at a time), and the leaves owed for users who left while
//! Redis was away and lost its data.

use tokio::time::timeout;

use super::scripts::{SCRIPTS, invoke};
use super::{Failure, FleetKeys, RoomKeys, event_channel};
use crate::bus::Conn;
use crate::config::Config;
use crate::presence::{ENTRIES_PER_SYNC, Table};
use crate::room::RoomName;

/// Sends every dirty room's changes, a batch of concurrent script calls at a time.
pub(super) async fn sync_dirty(
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
                let mut inv = SCRIPTS.sync.call();
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
                match timeout(cfg.subscribe_timeout, invoke(&mut conn, &inv)).await {
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
pub(super) async fn leave_if_absent(
    cfg: &Config,
    conn: &mut Conn,
    room: &RoomName,
    user: &str,
) -> Result<(), Failure> {
    let keys = RoomKeys::new(cfg, room.as_str());
    let mut inv = SCRIPTS.leave_if_absent.call();
    inv.key(&keys.members)
        .key(&keys.info)
        .key(&keys.version)
        .arg(event_channel(cfg, room))
        .arg(room.as_str())
        .arg(&cfg.node_id)
        .arg(user);
    invoke(conn, &inv).await.map(drop)
}
