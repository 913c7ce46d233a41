//! `idle-rooms` (opt-in: `--scenario idle-rooms`, with `--protocol`): what a fanout protocol
//! socket that is in many rooms costs the nodes, the protocol's reason to exist (one socket
//! for many rooms, where the chat's `/ws` needs one socket per room).
//!
//! `--idle-rooms-conns N` connections (default 2,000), spread round-robin over 3 nodes, each
//! joins [`ROOMS_PER_CONN`] rooms out of [`DISTINCT_ROOMS`] (connection `i` joins rooms
//! `50 i .. 50 i + 49` modulo the total, so every room has members on every node) with one
//! `join` command per room, and is ready when every join was answered. Then nothing is sent.
//! Reported: the growth of the nodes' summed VmRSS divided by the connections and by the
//! memberships, and the joins per second while connecting. Protocol targets only; the
//! `idle` scenario gives the same figure for a socket in one room, for every target.

use futures_util::stream;
use futures_util::{FutureExt as _, StreamExt as _};
use serde_json::json;

use crate::load::{self, Footprint};
use crate::procs::{Cluster, ClusterConfig, Target};
use crate::report::{Better, fig};
use crate::scenarios::{Outcome, Params};
use crate::ws::{self, Proto};
use crate::{Result, bail};

/// Rooms each connection joins (the protocol's default limit is 100 per socket).
pub(crate) const ROOMS_PER_CONN: usize = 50;
/// Rooms in all: with 2,000 connections, each room has 200 members.
pub(crate) const DISTINCT_ROOMS: usize = 500;
/// Connections joining at once: each is 50 commands, so fewer than the plain idle fleet's.
const CONCURRENCY: usize = 32;

pub(crate) async fn idle_rooms(
    target: &Target,
    cc: &ClusterConfig,
    p: &Params,
    tag: &str,
) -> Result<Outcome> {
    if target.proto != (Proto::Fanout { acked: true }) {
        println!("{tag} skipped: many rooms per socket is the fanout protocol's (--protocol)");
        return Ok((
            Vec::new(),
            json!({ "skipped": "not a fanout protocol target" }),
        ));
    }
    let n = p.idle_rooms_conns;
    if n == 0 {
        bail!("--idle-rooms-conns must be positive");
    }
    let mut cluster = Cluster::start(target, cc).await?;
    let addrs = cluster.addrs.clone();
    let connect = stream::iter(0..n)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            let rooms: Vec<String> = (0..ROOMS_PER_CONN)
                .map(|k| format!("r{}", (i * ROOMS_PER_CONN + k) % DISTINCT_ROOMS))
                .collect();
            async move {
                let rooms: Vec<&str> = rooms.iter().map(String::as_str).collect();
                ws::connect_fanout_rooms(addr, &format!("idle-{i}"), &rooms, 4096).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .map(load::split_conns);
    let measured = Footprint::measure(&mut cluster, p.idle_settle, connect).await?;
    let (before, after) = (measured.before_kib, measured.after_kib);
    let (connected, failed) = (measured.open.len(), measured.errors.len());
    let (connect_secs, per_conn_kib) = (measured.connect_secs, measured.per_conn_kib());
    let per_membership_kib = per_conn_kib / ROOMS_PER_CONN as f64;
    let joins_per_s = (connected * ROOMS_PER_CONN) as f64 / connect_secs.max(1e-9);
    println!(
        "{tag} {connected} connected in {ROOMS_PER_CONN} rooms each ({} failed) in \
         {connect_secs:.1} s; node RSS {:.1} -> {:.1} MiB = {per_conn_kib:.2} KiB/connection, \
         {per_membership_kib:.3} KiB/membership",
        failed,
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    measured.print_first_error(tag);
    drop(measured);
    Ok((
        vec![
            fig(
                "rss_kib_per_conn",
                "node RSS per connection (KiB)",
                Better::Lower,
                per_conn_kib,
            ),
            fig(
                "rss_kib_per_membership",
                "node RSS per room joined (KiB)",
                Better::Lower,
                per_membership_kib,
            ),
            fig(
                "connected",
                "connections made",
                Better::Neither,
                connected as f64,
            ),
            fig(
                "joins_per_s",
                "joins/s while connecting",
                Better::Higher,
                joins_per_s,
            ),
        ],
        json!({ "connected": connected, "failed": failed, "rooms_per_conn": ROOMS_PER_CONN,
                "distinct_rooms": DISTINCT_ROOMS, "rss_before_kib": before,
                "rss_after_kib": after, "connect_s": connect_secs }),
    ))
}
