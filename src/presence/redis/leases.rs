//! The presence task of a node: it renews the node's lease (one `ZADD`, every third of the
//! TTL, whatever the node's rooms and members), tells from the fleet's epoch whether Redis
//! lost its data (then re-asserts the node's members), and between renewals syncs the node's
//! table (`sync`) and reaps dead nodes (`reaper`).

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use super::moves::Owners;
use super::queries::conn;
use super::reaper::reap_dead;
use super::scripts::{SCRIPTS, invoke};
use super::sync::{Held, leave_if_absent, sync_dirty};
use super::{Failure, FleetKeys, int, items, text};
use crate::bus::Backoff;
use crate::bus::Conn;
use crate::bus::{Bus, pause};
use crate::config::Config;
use crate::presence::Table;
use crate::random;
use crate::room::RoomName;

/// Drops this node's lease if none of its connections is left in Redis (a clean shutdown,
/// after every leave was synced).
pub(crate) async fn release(bus: &Bus) {
    let cfg = bus.config();
    let fleet = FleetKeys::new(cfg, bus.is_cluster() == Some(true));
    let run = async {
        let mut conn = conn(bus, Duration::from_secs(1)).await?;
        let mut inv = SCRIPTS.release.call();
        inv.key(&fleet.leases).arg(&cfg.node_id);
        invoke(&mut conn, &inv).await
    };
    let _ = timeout(Duration::from_secs(1), run).await;
}

/// Spawns the presence task when any room has presence.
pub(crate) fn start(
    bus: &Arc<Bus>,
    runtime: &tokio::runtime::Handle,
    table: Arc<Table>,
    stop: &watch::Sender<()>,
) {
    if !bus.is_configured() || !bus.config().uses_presence() {
        return;
    }
    runtime.spawn(run(bus.clone(), table, stop.subscribe()));
}

/// How often survivors look for expired leases: the "second or two to notice" on top of the
/// TTL.
fn reap_every(config: &Config) -> Duration {
    (config.presence_ttl / 3).min(Duration::from_secs(1))
}

/// Keeps this node's lease, syncs its table to Redis, and reaps dead nodes.
async fn run(bus: Arc<Bus>, table: Arc<Table>, mut stop: watch::Receiver<()>) {
    let cfg = bus.config().clone();
    let fleet = FleetKeys::new(&cfg, bus.is_cluster() == Some(true));
    let mut held = Held::default();
    let mut owners = Owners::default();
    let renew_every = cfg.presence_ttl / 3;
    let mut conns = bus.connections();
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // The epoch this node last saw: `None` until the first lease.
    let mut epoch: Option<String> = None;
    let mut leased_until: Option<Instant> = None;
    let mut next_reap = Instant::now();
    // A link this node has not renewed on yet: the server behind it may be another one (a
    // Sentinel failover, a restart from an older snapshot) that lacks recent writes.
    let mut new_link = false;
    loop {
        let conn = conns.borrow_and_update().clone();
        let Some(mut conn) = conn else {
            leased_until = None;
            tokio::select! {
                r = conns.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        };
        let now = Instant::now();
        if leased_until.is_none_or(|t| now + renew_every * 2 >= t) {
            match renew(
                &cfg, &fleet, &mut conn, &table, &mut epoch, &mut held, new_link,
            )
            .await
            {
                Ok(()) => {
                    new_link = false;
                    leased_until = Some(now + cfg.presence_ttl);
                    owners
                        .check(
                            &cfg,
                            &fleet,
                            &mut conn,
                            &table,
                            &mut held,
                            leave_after(&cfg),
                        )
                        .await;
                }
                Err(f) => {
                    tracing::warn!(node = %cfg.node_id, reason = %f, "cannot renew the presence lease; retrying");
                    leased_until = None;
                    if !pause(backoff.next(), &mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if let Err(f) = sync_dirty(&cfg, &fleet, &mut conn, &table, &mut held).await {
            if matches!(f, Failure::NoLease) {
                leased_until = None;
            } else {
                tracing::warn!(node = %cfg.node_id, reason = %f, "presence sync failed; retrying");
            }
            if !pause(backoff.next(), &mut stop).await {
                return;
            }
            continue;
        }
        let (departed, next_departure) = table.take_departed(Instant::now());
        for (room, user) in departed {
            if let Err(f) = leave_if_absent(&cfg, &fleet, &mut conn, &room, &user).await {
                tracing::warn!(node = %cfg.node_id, %room, reason = %f, "could not announce a leave from a redis outage");
            }
        }
        if Instant::now() >= next_reap {
            next_reap = Instant::now() + reap_every(&cfg);
            if let Err(f) = reap_dead(&cfg, &fleet, &mut conn).await {
                tracing::warn!(node = %cfg.node_id, reason = %f, "presence reaping failed");
            }
        }
        backoff.reset();
        let renew_at = leased_until.map_or(Instant::now(), |t| t - renew_every * 2);
        tokio::select! {
            _ = table.changed() => {}
            _ = tokio::time::sleep_until(
                renew_at.min(next_reap).min(next_departure.unwrap_or(next_reap))
            ) => {}
            // A new publisher connection: Redis may have restarted; renew at once, which
            // tells whether it lost its data.
            r = conns.changed() => {
                if r.is_err() { return }
                leased_until = None;
                // On a cluster, the slots' owners tell which rooms moved (`Owners::check`).
                new_link = bus.is_cluster() != Some(true);
            }
            _ = stop.changed() => return,
        }
    }
}

/// How long after a silent re-assertion a user who left meanwhile gets their leave: every live
/// node renews within a third of the TTL, sees the new epoch (or the moved slot) and
/// re-asserts; only then can a user who left be told apart from one not re-asserted yet.
fn leave_after(cfg: &Config) -> Duration {
    cfg.presence_ttl / 3 + reap_every(cfg)
}

/// Renews the lease, and starts a re-assertion when Redis lost its data (a new epoch), this
/// node's lease had run out (others took its members out), or on a `new_link` (the server may
/// have lost only its last writes: a Sentinel failover to a replica that lagged, which keeps
/// the epoch; re-asserting the node's current counts is idempotent, so it is done silently).
async fn renew(
    cfg: &Config,
    fleet: &FleetKeys,
    conn: &mut Conn,
    table: &Table,
    epoch: &mut Option<String>,
    held: &mut Held,
    new_link: bool,
) -> Result<(), Failure> {
    let first = epoch.is_none();
    let fresh = random::hex_id();
    let mut inv = SCRIPTS.lease.call();
    inv.key(&fleet.leases)
        .arg(&cfg.node_id)
        .arg(u64::try_from(cfg.presence_ttl.as_millis()).unwrap_or(u64::MAX))
        .arg(&fresh)
        .arg(if first { "1" } else { "0" });
    let reply: Value = timeout(cfg.subscribe_timeout, invoke(conn, &inv))
        .await
        .map_err(|_| Failure::Unavailable)??;
    let parts = items(&reply);
    let seen = parts.first().and_then(text).unwrap_or_default();
    let was_alive = parts.get(1).map(int) == Some(1);
    held.until_ms = parts.get(3).map_or(0, int);
    let reasserts = first || epoch.as_deref() != Some(seen.as_str()) || !was_alive || new_link;
    if reasserts {
        // Every room is synced again, and listed again in this node's room set.
        held.indexed.clear();
    }
    if first {
        // Rooms an earlier run under this node id left behind: re-assert them empty.
        let leftover: Vec<RoomName> = parts
            .get(2)
            .map(items)
            .unwrap_or_default()
            .iter()
            .filter_map(text)
            .filter_map(|r| RoomName::new(r).ok())
            .collect();
        if !leftover.is_empty() {
            tracing::info!(node = %cfg.node_id, rooms = leftover.len(), "removing presence left by an earlier run of this node");
        }
        table.reassert_all(false, leftover, Duration::ZERO);
    } else if epoch.as_deref() != Some(seen.as_str()) {
        tracing::warn!(node = %cfg.node_id, "redis lost its presence data; re-asserting this node's members");
        table.reassert_all(true, Vec::new(), leave_after(cfg));
    } else if !was_alive {
        tracing::warn!(node = %cfg.node_id, "this node's presence lease had run out; re-asserting its members");
        table.reassert_all(false, Vec::new(), Duration::ZERO);
    } else if new_link {
        tracing::info!(node = %cfg.node_id, "a new link to redis; re-asserting this node's members (a failover may have lost the last writes)");
        table.reassert_all(true, Vec::new(), leave_after(cfg));
    }
    *epoch = Some(seen);
    Ok(())
}
