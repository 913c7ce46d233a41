//! On a Redis Cluster: noticing that a hash slot changed masters, and re-asserting the rooms
//! that live in it. A failover promotes a replica, which may lack the last writes it had not
//! received (Redis replicates asynchronously); a migration moves the keys whole. Either way the
//! nodes that hold connections in those rooms send their shares again, silently (as after a
//! Redis restart): nothing happens where nothing was lost, and what was lost is restored.
//! On one server there are no slots, and nothing to do.

use std::time::Duration;

use super::sync::Held;
use super::{FleetKeys, RoomKeys};
use crate::bus::Conn;
use crate::config::Config;
use crate::presence::Table;

/// Which master served each slot at the last look: `(first, last, master address)`, sorted.
#[derive(Debug, Default)]
pub(super) struct Owners(Option<Vec<(u16, u16, String)>>);

impl Owners {
    /// Looks again; marks for re-assertion the rooms (of `table`) whose slot has another
    /// master than at the last look, or every room when the fleet's own slot moved (its lease
    /// set and room sets may have lost writes: the room sets are written again too).
    /// `leave_after`: see [`Table::reassert_all`].
    pub(super) async fn check(
        &mut self,
        cfg: &Config,
        fleet: &FleetKeys,
        conn: &mut Conn,
        table: &Table,
        held: &mut Held,
        leave_after: Duration,
    ) {
        if !fleet.cluster {
            return;
        }
        let now = match conn.slot_owners().await {
            Ok(now) if !now.is_empty() => now,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(node = %cfg.node_id, error = %e, "cannot read the cluster's slot map");
                return;
            }
        };
        let Some(before) = self.0.replace(now) else {
            return; // the first look: nothing to compare with
        };
        let Some(now) = &self.0 else { return };
        if &before == now {
            return;
        }
        let master = |map: &[(u16, u16, String)], slot: u16| {
            map.iter()
                .find(|(first, last, _)| *first <= slot && slot <= *last)
                .map(|(_, _, m)| m.clone())
        };
        let moved = |key: &str| {
            let slot = slot_of(key);
            master(&before, slot) != master(now, slot)
        };
        if moved(&fleet.leases) {
            tracing::warn!(node = %cfg.node_id, "the presence lease set's slot changed masters; re-asserting every room");
            held.indexed.clear();
            table.reassert_all(true, Vec::new(), leave_after);
            return;
        }
        table.reassert_rooms(
            |room| {
                let hit = moved(&RoomKeys::new(cfg, fleet, room).members);
                if hit {
                    tracing::info!(node = %cfg.node_id, %room, "a presence room's slot changed masters; re-asserting it");
                }
                hit
            },
            true,
            leave_after,
        );
    }
}

#[cfg(feature = "cluster")]
fn slot_of(key: &str) -> u16 {
    crate::bus::script::key_slot(key)
}

/// Without the `cluster` feature no connection has slots (`check` returns early).
#[cfg(not(feature = "cluster"))]
fn slot_of(_key: &str) -> u16 {
    0
}
