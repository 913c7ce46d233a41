//! Redis Cluster mode against a real local cluster of `redis-server` processes: sharded
//! pub/sub across masters, a hot room's shards spread over them, delivery that resumes after a
//! master dies and its replica takes over, and a durable room whose slot moves with its
//! history while it is busy.
#![cfg(feature = "cluster")]

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::collections::BTreeSet;
use std::num::{NonZeroU16, NonZeroUsize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum_fanout::durable::{Durability, Position};
use axum_fanout::{FanoutBuilder, FanoutLayer, RoomHandle};
use serde_json::{Value, json};
use support::*;

/// `n` nodes on the cluster, each built with `configure`, once all are ready.
async fn nodes(
    cluster: &RedisCluster,
    n: usize,
    configure: impl Fn(FanoutBuilder) -> FanoutBuilder,
) -> Vec<(TestServer, RoomHandle)> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        let layer = configure(FanoutLayer::builder(cluster.urls()).node_id(format!("k{i}")))
            .build()
            .expect("layer");
        let handle = layer.handle();
        nodes.push((TestServer::start(room_app(layer)).await, handle));
    }
    for (_, h) in &nodes {
        wait_until("node ready on the cluster", || async { h.is_ready() }).await;
    }
    nodes
}

async fn join(node: &(TestServer, RoomHandle), room: &str) -> Ws {
    let mut ws = connect(&node.0.ws_url(&format!("/ws?room={room}"))).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_nodes_through_sharded_pubsub() {
    let cluster = RedisCluster::start(3, 0);
    let fleet = nodes(&cluster, 2, |b| b).await;
    let mut a = join(&fleet[0], "lobby").await;
    let mut b = join(&fleet[1], "lobby").await;

    // SSUBSCRIBE, not SUBSCRIBE: the channel is a shard channel on the master owning its slot,
    // held by both nodes, and classic pub/sub has no room channel anywhere.
    let owner = cluster
        .master_of_slot(cluster.slot_of("ws:room:lobby"))
        .port();
    assert_eq!(
        cluster.shard_channels("ws:room:*"),
        vec![(owner, "ws:room:lobby".to_owned())]
    );
    assert_eq!(cluster.shard_numsub("ws:room:lobby"), 2);
    assert_eq!(cluster.classic_channels("ws:room:*"), 0);

    // From a socket on node 1 and from a plain handle on node 2: every socket gets each once.
    send_text(&mut a, "from-a").await;
    assert_eq!(recv_text(&mut a, "a's own message").await, "from-a");
    assert_eq!(recv_text(&mut b, "a's message on node 2").await, "from-a");
    let subscribers = fleet[1]
        .1
        .broadcast("lobby", "from-handle")
        .await
        .expect("SPUBLISH");
    assert_eq!(subscribers, 2, "SPUBLISH reaches both nodes' connections");
    assert_eq!(recv_text(&mut a, "handle message").await, "from-handle");
    assert_eq!(recv_text(&mut b, "handle message").await, "from-handle");

    // Nothing more arrives: exactly once.
    send_text(&mut b, "last").await;
    assert_eq!(recv_text(&mut a, "last").await, "last");
    assert_eq!(recv_text(&mut b, "last").await, "last");

    // The last leave on each node ends the sharded subscription.
    drop(a);
    drop(b);
    wait_until("shard channel gone", || async {
        cluster.shard_channels("ws:room:*").is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_rooms_shards_spread_over_the_masters() {
    let cluster = RedisCluster::start(3, 0);
    let fleet = nodes(&cluster, 2, |b| {
        b.shard_count(NonZeroU16::new(16).expect("non-zero"))
    })
    .await;
    let mut listeners = Vec::new();
    for node in &fleet {
        listeners.push(join(node, "hot").await);
    }

    // All 16 shard channels are subscribed by both nodes, on more than one master: SSUBSCRIBE
    // went out grouped by slot (one command naming channels of several slots is CROSSSLOT).
    let channels = cluster.shard_channels("ws:room:hot:shard*");
    let names: BTreeSet<&str> = channels.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(names.len(), 16, "every shard subscribed: {channels:?}");
    let masters: BTreeSet<u16> = channels.iter().map(|(port, _)| *port).collect();
    assert!(
        masters.len() > 1,
        "shards of one room on one master: {channels:?}"
    );
    for name in &names {
        assert_eq!(cluster.shard_numsub(name), 2, "{name} on both nodes");
    }

    // Senders on both nodes, each on its own shard: every listener sees every message once,
    // each sender's in order.
    let mut senders = Vec::new();
    for node in fleet.iter().cycle().take(6) {
        senders.push(join(node, "hot").await);
    }
    for round in 0..5 {
        for (s, ws) in senders.iter_mut().enumerate() {
            send_text(ws, &format!("{s}:{round}")).await;
        }
    }
    for ws in &mut listeners {
        let mut next = vec![0; senders.len()];
        for _ in 0..senders.len() * 5 {
            let text = recv_text(ws, "a hot-room message").await;
            let (s, round) = text.split_once(':').expect("sender:round");
            let (s, round): (usize, usize) = (s.parse().expect("s"), round.parse().expect("r"));
            assert_eq!(round, next[s], "sender {s} out of order");
            next[s] += 1;
        }
        assert!(next.iter().all(|&n| n == 5));
    }

    drop(listeners);
    drop(senders);
    wait_until("every shard channel gone", || async {
        cluster.shard_channels("ws:room:*").is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_a_master_fails_over_to_its_replica() {
    let mut cluster = RedisCluster::start(3, 1);
    let fleet = nodes(&cluster, 2, |b| b).await;
    let mut a = join(&fleet[0], "failover").await;
    let mut b = join(&fleet[1], "failover").await;
    send_text(&mut a, "before").await;
    assert_eq!(recv_text(&mut b, "before the failover").await, "before");
    assert_eq!(recv_text(&mut a, "before the failover").await, "before");

    // Kill the master that owns the room's channel, like a crash.
    let slot = cluster.slot_of("ws:room:failover");
    let dead = cluster.master_of_slot(slot).port();
    let victim = cluster
        .nodes
        .iter_mut()
        .find(|n| n.port() == dead)
        .expect("victim");
    victim.stop();

    // Its replica is promoted, the nodes resubscribe where the slot now lives and tell their
    // sockets that messages may have been missed.
    cluster.wait_failover(slot, dead);
    for ws in [&mut a, &mut b] {
        assert_eq!(
            recv_text(ws, "loss notice after the failover").await,
            "missed:failover"
        );
    }
    for (_, h) in &fleet {
        wait_until("ready again after the failover", || async { h.is_ready() }).await;
    }
    assert_eq!(cluster.shard_numsub("ws:room:failover"), 2);

    send_text(&mut b, "after").await;
    assert_eq!(recv_text(&mut a, "after the failover").await, "after");
    assert_eq!(recv_text(&mut b, "after the failover").await, "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_follows_its_slot_to_another_master() {
    let cluster = RedisCluster::start(3, 0);
    let fleet = nodes(&cluster, 2, |b| b).await;
    let mut a = join(&fleet[0], "moving").await;
    let mut b = join(&fleet[1], "moving").await;

    // Move the channel's slot to another master. Redis ends the sharded subscriptions on the
    // old owner (a SUNSUBSCRIBE push nobody asked for); both nodes subscribe again where the
    // slot now lives and tell their sockets.
    let slot = cluster.slot_of("ws:room:moving");
    let from = cluster.master_of_slot(slot).port();
    let to = cluster.other_master(from);
    cluster.migrate_slot(slot, to);
    for ws in [&mut a, &mut b] {
        assert_eq!(
            recv_text(ws, "loss notice after the slot moved").await,
            "missed:moving"
        );
    }
    wait_until("subscribed on the new owner", || async {
        cluster.shard_channels("ws:room:*") == vec![(to, "ws:room:moving".to_owned())]
            && cluster.shard_numsub("ws:room:moving") == 2
    })
    .await;
    send_text(&mut a, "moved").await;
    assert_eq!(recv_text(&mut b, "after the move").await, "moved");
    assert_eq!(recv_text(&mut a, "after the move").await, "moved");
}

/// A durable room and a plain one share a slot (their names' hash tag), and the slot moves to
/// another master with its keys while a publisher keeps broadcasting to the durable room, and
/// while more broadcasts land on the new master before the nodes subscribe there (redirected
/// with ASK, they reach no subscriber live). Redis ends both rooms' sharded subscriptions; the
/// nodes subscribe again on the new master. The durable room's members are not told of a gap:
/// each node reads it back from the room's history, once, so every positioned socket gets
/// every seq exactly once, in order. The plain room's members are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_rooms_slot_moves_with_its_history_and_its_members_miss_nothing() {
    let cluster = RedisCluster::start(3, 0);
    // The whole run fits in the history and in one repair: nothing is trimmed.
    let whole = NonZeroUsize::new(100_000).expect("non-zero");
    let settings = Durability::default().history(whole).replay_limit(whole);
    let (durable, plain) = ("d{m}", "p{m}");
    let layers = ["k1", "k2"].map(|id| {
        FanoutLayer::builder(cluster.urls())
            .node_id(id)
            .durable_room(durable, settings)
            .build()
            .expect("layer")
    });
    let fleet = start_nodes(layers, chat_app::app).await;
    let channel = format!("ws:room:{durable}");
    let slot = cluster.slot_of(&channel);
    assert_eq!(slot, cluster.slot_of(&format!("ws:room:{plain}")));

    // A positioned socket of the durable room and a plain room's socket on each node.
    let mut watchers = Vec::new();
    let mut plains = Vec::new();
    for (server, handle) in &fleet {
        let url = server.ws_url(&format!("/ws?room={durable}&positions=1"));
        let mut ws = connect(&url).await;
        let notice = recv_json(&mut ws, "the join notice").await;
        assert_eq!(notice["type"], "fanout.position", "{notice}");
        watchers.push((ws, notice["seq"].as_u64().expect("seq")));
        let before = handle.stats().memberships;
        plains.push(connect(&server.ws_url(&format!("/ws?room={plain}"))).await);
        wait_until("plain socket joined", || async {
            handle.stats().memberships > before
        })
        .await;
    }
    wait_until("both rooms subscribed by both nodes", || async {
        cluster.shard_numsub(&channel) == 2
            && cluster.shard_numsub(&format!("ws:room:{plain}")) == 2
    })
    .await;

    // The publisher broadcasts one message after another until told to stop; each must
    // succeed, through the redirections of the move.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (handle, stop) = (fleet[0].1.clone(), stop.clone());
        tokio::spawn(async move {
            let mut positions = Vec::new();
            for n in 1u64.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let published = handle
                    .broadcast(durable, json!({ "n": n }))
                    .publish()
                    .await
                    .unwrap_or_else(|e| panic!("broadcast {n} during the move: {e}"));
                positions.push(published.position().expect("durable").clone());
            }
            positions
        })
    };
    // The nodes have delivered some before the move starts.
    for (ws, at) in &mut watchers {
        loop {
            let frame = recv_json(ws, "a delivery before the move").await;
            let seq = frame["seq"].as_u64().expect("a numbered delivery");
            assert_eq!(seq, *at + 1, "before the move: {frame}");
            *at = seq;
            if seq >= 20 {
                break;
            }
        }
    }

    // First move, the publisher running throughout.
    let from = cluster.master_of_slot(slot).port();
    let to = cluster.other_master(from);
    let mut gap = move_durable_slot(&cluster, &fleet[1].1, slot, to, durable).await;
    stop.store(true, Ordering::Release);
    let mut positions = publisher.await.expect("publisher");
    positions.append(&mut gap);
    let epoch = positions[0].epoch().to_owned();
    assert!(
        positions.iter().all(|p| p.epoch() == epoch),
        "one epoch: the history moved with the slot"
    );
    let top = positions
        .iter()
        .map(Position::seq)
        .max()
        .expect("published");
    assert_eq!(
        top as usize,
        positions.len(),
        "each broadcast got its own seq"
    );
    expect_every_seq(&mut watchers, top).await;
    for ws in &mut plains {
        expect_missed(ws, plain).await;
    }

    // Back again with nobody publishing once the nodes follow the slot: what was published
    // on the new master before they subscribed there reaches the sockets only if each node
    // reads it back once its new subscription is confirmed (no later live seq reveals it).
    let gap = move_durable_slot(&cluster, &fleet[1].1, slot, from, durable).await;
    let top = gap.last().expect("published in the gap").seq();
    expect_every_seq(&mut watchers, top).await;
    for ws in &mut plains {
        expect_missed(ws, plain).await;
    }
    let tail = fleet[0]
        .1
        .broadcast(durable, json!({ "n": "tail" }))
        .publish()
        .await
        .expect("broadcast after the moves");
    assert_eq!(
        tail.position(),
        Some(&Position::new(epoch.as_str(), top + 1))
    );
    expect_every_seq(&mut watchers, top + 1).await;
}

/// A failover to a replica that had not received the last messages (Redis replicates
/// asynchronously; here the replica is stopped while they are stored): the room's history on
/// the new master is behind what the node delivered. The node's repair finds that out and
/// tells the members, instead of waiting or delivering anything twice, and moves the room to
/// a new epoch: the lost seqs never name other messages, and a client resuming from one of
/// them is told its position is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_the_last_messages_is_told_not_hidden() {
    let mut cluster = RedisCluster::start(3, 1);
    let layer = FanoutLayer::builder(cluster.urls())
        .node_id("k1")
        .durable_room("lag", Durability::default())
        .build()
        .expect("layer");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready on the cluster", || async { handle.is_ready() }).await;
    let mut ws = connect(&server.ws_url("/ws?room=lag&positions=1")).await;
    let notice = recv_json(&mut ws, "the join notice").await;
    let epoch = notice["epoch"].as_str().expect("epoch").to_owned();
    let mut at = 0;
    for n in 1..=3 {
        at = publish_durable_and_read(&handle, "lag", n, &mut ws).await;
    }
    assert_eq!(at, 3);

    // The replica has 1 to 3, then loses its link to the master and may not sync again (a
    // stopped replica would not do: what the master sent meanwhile waits in its socket);
    // 4 to 6 are stored on the master only.
    let slot = cluster.slot_of("ws:room:lag");
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
    for n in 4..=6 {
        at = publish_durable_and_read(&handle, "lag", n, &mut ws).await;
    }
    assert_eq!(at, 6);
    cluster.node_mut(dead).stop();
    tokio::task::block_in_place(|| cluster.wait_failover(slot, dead));

    // The node reads after 6, finds the room at 3: the members are told.
    let frame = recv_json(&mut ws, "the loss notice").await;
    assert_eq!(frame["type"], "fanout.missed", "{frame}");
    assert_eq!(frame["room"], "lag", "{frame}");
    wait_until("ready again after the failover", || async {
        handle.is_ready()
    })
    .await;
    // 4 to 6 are gone, and the socket saw them: the room goes on in a new epoch, so that no
    // later message takes their seqs under the old one.
    wait_until("the room moved to a new epoch", || async {
        handle
            .history("lag", 1)
            .await
            .is_ok_and(|h| h.position().epoch() != epoch)
    })
    .await;
    let next = publish_durable_and_read(&handle, "lag", 7, &mut ws).await;
    assert_eq!(next, 1, "the new epoch numbers from 1");
    let top = handle.history("lag", 10).await.expect("history");
    assert_ne!(top.position().epoch(), epoch);
    assert_eq!(top.position().seq(), 1);
    // A client that saw the lost 6 and resumes from it is told, not fed another message 6.
    let mut late =
        connect(&server.ws_url(&format!("/ws?room=lag&positions=1&since={epoch}:6"))).await;
    let resumed = recv_json(&mut late, "the resume notice").await;
    assert_eq!(resumed["type"], "fanout.resumed", "{resumed}");
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_eq!(resumed["reason"], "epoch_changed", "{resumed}");
}

/// Moves `slot` to the master on `to` with its keys, broadcasting five messages to `room`
/// while its keys are on the new master and the nodes still subscribed on the old one (the
/// broadcasts are redirected with ASK; no subscriber gets them live). Returns their positions
/// once both nodes subscribed again on `to`.
async fn move_durable_slot(
    cluster: &RedisCluster,
    handle: &RoomHandle,
    slot: u16,
    to: u16,
    room: &str,
) -> Vec<Position> {
    // Blocking (redis-cli processes): the runtime hands this worker's tasks to another.
    let moving = tokio::task::block_in_place(|| cluster.begin_slot_move(slot, to));
    let mut in_the_gap = Vec::new();
    for n in 0..5 {
        let published = handle
            .broadcast(room, json!({ "gap": n }))
            .publish()
            .await
            .expect("broadcast redirected with ASK");
        in_the_gap.push(published.position().expect("durable").clone());
    }
    tokio::task::block_in_place(|| cluster.finish_slot_move(&moving));
    wait_until("every room subscribed again on the new master", || async {
        let channels = cluster.shard_channels("ws:room:*");
        !channels.is_empty()
            && channels.iter().all(|(port, _)| *port == to)
            && channels.len() == 2
            && cluster.shard_numsub(&format!("ws:room:{room}")) == 2
    })
    .await;
    in_the_gap
}

/// Reads each positioned socket up to seq `top`: every seq once, in order, and no loss notice.
async fn expect_every_seq(watchers: &mut [(Ws, u64)], top: u64) {
    for (i, (ws, at)) in watchers.iter_mut().enumerate() {
        while *at < top {
            let frame = recv_json(ws, &format!("socket {i}: seq {} of {top}", *at + 1)).await;
            assert_ne!(frame["type"], "fanout.missed", "socket {i}: {frame}");
            let seq = frame["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("socket {i}: {frame}"));
            assert_eq!(seq, *at + 1, "socket {i}: a gap or a duplicate: {frame}");
            *at = seq;
        }
    }
}

async fn expect_missed(ws: &mut Ws, room: &str) {
    let notice = recv_json(ws, "the plain room's loss notice").await;
    assert_eq!(notice["type"], "fanout.missed", "{notice}");
    assert_eq!(notice["room"], room, "{notice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_master_is_caught_by_the_probe_whichever_master_it_is() {
    // One probe channel per master: freezing any master (TCP stays up, nothing comes back)
    // makes the node not ready, and it recovers once the master answers again.
    let cluster = RedisCluster::start(3, 0);
    let fleet = nodes(&cluster, 2, |b| {
        b.probe_interval(Duration::from_millis(200))
            .probe_timeout(Duration::from_millis(500))
            .subscribe_timeout(Duration::from_secs(1))
    })
    .await;
    let mut a = join(&fleet[0], "frozen").await;
    let mut b = join(&fleet[1], "frozen").await;
    // Each node subscribes one probe channel on each master (and nothing else there).
    let probes = cluster.shard_channels("__axum_fanout:probe:*");
    let masters: BTreeSet<u16> = probes.iter().map(|(port, _)| *port).collect();
    assert_eq!(probes.len(), 6, "{probes:?}");
    assert_eq!(masters.len(), 3, "{probes:?}");

    let slot = cluster.slot_of("ws:room:frozen");
    let frozen = cluster.master_of_slot(slot);
    frozen.signal("STOP");
    for (_, h) in &fleet {
        wait_until("not ready while a master is frozen", || async {
            !h.is_ready()
        })
        .await;
    }
    frozen.signal("CONT");
    cluster.wait_ok();
    for (_, h) in &fleet {
        wait_until("ready again", || async { h.is_ready() }).await;
    }
    for ws in [&mut a, &mut b] {
        assert_eq!(recv_text(ws, "loss notice").await, "missed:frozen");
    }
    send_text(&mut a, "thawed").await;
    assert_eq!(recv_text(&mut b, "after the thaw").await, "thawed");
    assert_eq!(recv_text(&mut a, "after the thaw").await, "thawed");
}

#[tokio::test]
async fn an_empty_cluster_list_or_a_bad_node_url_is_a_clear_error() {
    let empty = FanoutLayer::builder(Vec::<String>::new())
        .build()
        .expect_err("no nodes");
    assert!(empty.is_invalid_url());
    let cause = std::error::Error::source(&empty)
        .expect("cause")
        .to_string();
    assert!(cause.contains("at least one node"), "{cause}");
    let bad = FanoutLayer::builder(["redis://127.0.0.1:7000", "http://nope"])
        .build()
        .expect_err("bad url");
    assert!(bad.is_invalid_url(), "{bad}");
}

/// One fanout-protocol command on `ws` and its reply (pushes before it are skipped).
async fn call(ws: &mut Ws, id: u64, mut command: Value) -> Value {
    use futures_util::{SinkExt, StreamExt};
    command["id"] = id.into();
    let text = command.to_string();
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .expect("send");
    loop {
        let frame = tokio::time::timeout(SOON, ws.next())
            .await
            .expect("a reply in time");
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = frame {
            let frame: Value = serde_json::from_str(t.as_str()).expect("JSON");
            if frame["type"] == "reply" && frame["id"] == id {
                return frame;
            }
        }
    }
}

async fn protocol_socket(node: &(TestServer, RoomHandle), user: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = node
        .0
        .ws_url(&format!("/fanout?user={user}"))
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "fanout.v1".parse().expect("h"));
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    ws
}

/// A keyed publish is published and recorded by one script call on the room's slot (plain and
/// durable rooms, and a sharded room whose key is recorded after the fact): no CROSSSLOT, and
/// a retry on another node is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_publishes_land_once_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let mut fleet = Vec::new();
    for i in 1..=2 {
        let layer = FanoutLayer::builder(cluster.urls())
            .node_id(format!("k{i}"))
            .durable_room("log", Durability::default())
            .room_shards("hot", NonZeroU16::new(4).expect("non-zero"))
            .build()
            .expect("layer");
        let handle = layer.handle();
        fleet.push((TestServer::start(chat_app::app(layer)).await, handle));
    }
    for (_, h) in &fleet {
        wait_until("node ready on the cluster", || async { h.is_ready() }).await;
    }
    let mut first = protocol_socket(&fleet[0], "ada").await;
    let mut retry = protocol_socket(&fleet[1], "ada").await;
    for (i, room) in (1..).zip(["plain", "log", "hot"]) {
        let publish = json!({"cmd": "publish", "room": room, "data": i, "key": "k"});
        let r1 = call(&mut first, i, publish.clone()).await;
        assert!(r1["result"]["nodes"].is_u64(), "{room}: {r1}");
        let r2 = call(&mut retry, i, publish).await;
        assert_eq!(r2["result"]["duplicate"], true, "{room}: {r2}");
        assert_eq!(r2["result"]["seq"], r1["result"]["seq"], "{room}: {r2}");
    }
}
