//! Presence on a real Redis Cluster (README "Presence on Redis Cluster"): the presence
//! scenarios of `tests/presence.rs` run on three masters (members over several nodes, join and
//! leave notices, counts, listings, a clean shutdown, churn, a dead node's large share reaped
//! once by racing survivors, a node that stops), plus a presence room's slot migrated to
//! another master while members join and leave, a master failing over to a replica that
//! lacked the last join, and a sharded room (its presence lives with shard 0).
#![cfg(feature = "cluster")]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
#[allow(dead_code, unreachable_pub)]
mod presence_common;
mod support;

use std::time::Duration;

use presence_common::*;
use serde_json::{Value, json};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_on_three_nodes_join_once_and_leave_after_their_last_socket() {
    let cluster = RedisCluster::start(3, 0);
    two_users_on_three_nodes(&Redis::Cluster(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_takes_its_members_out_at_once() {
    let cluster = RedisCluster::start(3, 0);
    a_node_shutting_down(&Redis::Cluster(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_plus_newer_events_equal_redis_after_churn() {
    let cluster = RedisCluster::start(3, 0);
    snapshot_plus_newer_events_after_churn(&Redis::Cluster(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_share_larger_than_a_chunk_leaves_once_per_user_and_is_forgotten() {
    let cluster = RedisCluster::start(3, 0);
    let redis = Redis::Cluster(&cluster);
    let (_fleet, mut conn) = a_dead_nodes_large_share_leaves_once_per_user(&redis).await;
    // The lease set and the node's room set live in another slot than the room: once the
    // room is reaped, a reaper forgets the room there, then the dead node's lease.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let lease: Option<f64> = conn
            .run(
                redis::cmd("ZSCORE")
                    .arg(redis.fleet_key("leases"))
                    .arg("gone"),
            )
            .await;
        let rooms: u64 = conn
            .run(redis::cmd("SCARD").arg(redis.fleet_key("rooms:gone")))
            .await;
        if lease.is_none() && rooms == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead node is still known: lease {lease:?}, {rooms} rooms"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // deadline: polling interval
    }
}

/// The frames `ws` receives up to the marker `n` that `handle` broadcasts into `room`.
async fn frames_until_marker(
    ws: &mut Ws,
    handle: &axum_fanout::RoomHandle,
    room: &str,
    n: u64,
) -> Vec<Value> {
    handle
        .broadcast(room, json!({ "marker": n }))
        .await
        .expect("marker");
    let mut frames = Vec::new();
    loop {
        let frame = json_of(&recv_text(ws, "frames up to the marker").await);
        if frame["marker"] == n {
            return frames;
        }
        frames.push(frame);
    }
}

/// A presence room's slot moves to another master with its keys: a member joins and another
/// leaves while the keys already are on the target and the slot still belongs to the source
/// (their scripts are redirected with ASK), and more after the move. The listing is right on
/// every node throughout; the watcher gets each notice or a loss notice that covers it (the
/// ones published on the target before the nodes subscribed there reach no subscriber, as for
/// any message); versions keep growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_rooms_slot_moves_while_members_join_and_leave() {
    let cluster = RedisCluster::start(3, 0);
    let redis = Redis::Cluster(&cluster);
    let fleet = nodes(&redis, 2, Duration::from_secs(3)).await;
    let room = "moving";
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let alice = member(fleet[1].server.addr, room, "alice").await;
    wait_members(&fleet[1].handle, room, &[("alice", 1), ("watcher", 1)]).await;
    let before = frames_until_marker(&mut watcher, &fleet[1].handle, room, 1).await;
    let last_version = before
        .iter()
        .filter_map(|f| f["version"].as_u64())
        .max()
        .expect("joins with versions");

    let slot = cluster.slot_of("ws:room:moving");
    let from = cluster.master_of_slot(slot).port();
    let to = cluster.other_master(from);
    let moving = tokio::task::block_in_place(|| cluster.begin_slot_move(slot, to));
    let _bob = member(fleet[0].server.addr, room, "bob").await;
    drop(alice);
    for node in &fleet {
        wait_members(&node.handle, room, &[("bob", 1), ("watcher", 1)]).await;
    }
    tokio::task::block_in_place(|| cluster.finish_slot_move(&moving));
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.port() == to)
        .expect("the target");
    assert_eq!(
        node.cli(&["HLEN", "{ws:room:moving}:members"]).trim(),
        "2",
        "the room's keys live on the new master"
    );
    let _carol = member(fleet[1].server.addr, room, "carol").await;
    for node in &fleet {
        wait_members(
            &node.handle,
            room,
            &[("bob", 1), ("carol", 1), ("watcher", 1)],
        )
        .await;
    }
    wait_until("both nodes subscribed on the new master", || async {
        cluster.shard_numsub("ws:room:moving") == 2
    })
    .await;
    let seen = frames_until_marker(&mut watcher, &fleet[0].handle, room, 2).await;
    let notices: Vec<&Value> = seen
        .iter()
        .filter(|f| matches!(f["type"].as_str(), Some("fanout.join" | "fanout.leave")))
        .collect();
    let missed = seen.iter().any(|f| f["type"] == "fanout.missed");
    println!("during and after the move the watcher got {seen:?}");
    let told = |kind: &str, user: &str| {
        notices
            .iter()
            .any(|n| n["type"] == format!("fanout.{kind}") && n["user"] == user)
    };
    assert!(told("join", "carol"), "the join after the move: {seen:?}");
    assert!(
        missed || (told("join", "bob") && told("leave", "alice")),
        "every change told, or a loss notice that covers it: {seen:?}"
    );
    let versions: Vec<u64> = notices
        .iter()
        .map(|n| n["version"].as_u64().expect("version"))
        .collect();
    assert!(
        versions
            .iter()
            .zip(versions.iter().skip(1))
            .all(|(a, b)| a < b)
            && versions.iter().all(|v| *v > last_version),
        "versions keep growing across the move: {last_version} then {versions:?}"
    );
}

/// The master of a presence room's slot fails over to a replica that never received the last
/// join (Redis replicates asynchronously; the replica is cut off first): the new master lacks
/// it. The nodes see the slot change masters and re-assert the room, silently: the listing is
/// whole again, and the next notice's version is above every version sent before, so a client
/// that applies notices newer than what it saw misses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_a_join_is_reasserted() {
    let mut cluster = RedisCluster::start(3, 1);
    let redis = Redis::Cluster(&cluster);
    let fleet = nodes(&redis, 2, Duration::from_secs(3)).await;
    // A room whose slot is not on the master of the fleet's keys: that one failing over too
    // may lose lease renewals (with a TTL of 3 s, enough to reap live nodes; see the README).
    let master_of = |key: &str| cluster.master_of_slot(cluster.slot_of(key)).port();
    let fleet_master = master_of(&redis.fleet_key("leases"));
    let room = (0..)
        .map(|i| format!("fo{i}"))
        .find(|r| master_of(&format!("ws:room:{r}")) != fleet_master)
        .expect("a room on another master");
    let room = room.as_str();
    let members_key = format!("{{ws:room:{room}}}:members");
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let _alice = member(fleet[1].server.addr, room, "alice").await;
    wait_members(&fleet[0].handle, room, &[("alice", 1), ("watcher", 1)]).await;

    let slot = cluster.slot_of(&format!("ws:room:{room}"));
    let master = cluster.master_of_slot(slot);
    let dead = master.port();
    let replica = cluster.replica_of(dead);
    wait_until("the replica has caught up", || async {
        cluster.replicated(dead, replica)
    })
    .await;
    let denied = master.cli(&["ACL", "SETUSER", "default", "-psync", "-sync", "-replconf"]);
    assert_eq!(denied.trim(), "OK");
    master.cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    wait_until("the replica cut off", || async {
        master
            .cli(&["INFO", "replication"])
            .contains("connected_slaves:0")
    })
    .await;
    let _bob = member(fleet[1].server.addr, room, "bob").await;
    let all = [("alice", 1), ("bob", 1), ("watcher", 1)];
    wait_members(&fleet[0].handle, room, &all).await;
    let seen = frames_until_marker(&mut watcher, &fleet[1].handle, room, 1).await;
    let bob_version = seen
        .iter()
        .find(|f| f["type"] == "fanout.join" && f["user"] == "bob")
        .and_then(|f| f["version"].as_u64())
        .unwrap_or_else(|| panic!("bob's join: {seen:?}"));

    cluster.node_mut(dead).stop();
    tokio::task::block_in_place(|| cluster.wait_failover(slot, dead));
    let promoted = cluster.master_of_slot(slot);
    let lost = promoted.cli(&["HEXISTS", &members_key, "bob"]);
    println!(
        "bob on the promoted replica before re-assertion: {}",
        lost.trim()
    );
    for node in &fleet {
        wait_members(&node.handle, room, &all).await;
    }
    assert_eq!(
        promoted.cli(&["HGET", &members_key, "bob"]).trim(),
        "1",
        "re-asserted on the new master"
    );
    let _carol = member(fleet[0].server.addr, room, "carol").await;
    let deadline = tokio::time::Instant::now() + SOON;
    let carol = loop {
        let frame = json_of(&recv_text(&mut watcher, "carol's join").await);
        if frame["type"] == "fanout.join" && frame["user"] == "carol" {
            break frame;
        }
        assert!(
            frame["type"] != "fanout.leave",
            "nobody left, nobody is told so: {frame}"
        );
        assert!(tokio::time::Instant::now() < deadline, "no join for carol");
    };
    let v = carol["version"].as_u64().expect("version");
    assert!(
        v > bob_version,
        "versions keep growing across the lost writes: {bob_version} then {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_has_its_members_reaped_once_by_the_survivors() {
    let cluster = RedisCluster::start(3, 0);
    a_node_that_dies_is_reaped_once(&Redis::Cluster(&cluster)).await;
}

/// A sharded room's presence keys live in the slot of shard 0's channel, where its notices
/// go, so the scripts can publish them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_rooms_presence_lives_with_shard_0() {
    let cluster = RedisCluster::start(3, 0);
    let shards = std::num::NonZeroU16::new(4).expect("non-zero");
    let layers = ["n1", "n2"].map(|id| {
        Redis::Cluster(&cluster)
            .builder()
            .node_id(id)
            .presence(true)
            .shard_count(shards)
            .build()
            .expect("layer")
    });
    let fleet = start_nodes(layers, chat_app::app).await;
    let room = "wide";
    let mut watcher = member(fleet[0].0.addr, room, "watcher").await;
    let alice = member(fleet[1].0.addr, room, "alice").await;
    wait_members(&fleet[0].1, room, &[("alice", 1), ("watcher", 1)]).await;
    drop(alice);
    wait_members(&fleet[1].1, room, &[("watcher", 1)]).await;
    // Notices go to shard 0 alone: a marker on another shard would not be ordered with them.
    let mut told = Vec::new();
    while told.len() < 2 {
        let frame = json_of(&recv_text(&mut watcher, "alice's notices").await);
        if frame["user"] == "alice" {
            told.extend(kinds(&[frame]));
        }
    }
    assert_eq!(
        told,
        [pair("fanout.join", "alice"), pair("fanout.leave", "alice")]
    );
    let owner = cluster.master_of_slot(cluster.slot_of("ws:room:wide:shard0"));
    assert_eq!(
        owner.cli(&["HLEN", "{ws:room:wide:shard0}:members"]).trim(),
        "1"
    );
}
