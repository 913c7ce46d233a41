//! Redis Cluster mode against a real local cluster of `redis-server` processes: sharded
//! pub/sub across masters, a hot room's shards spread over them, and delivery that resumes
//! after a master dies and its replica takes over.
#![cfg(feature = "cluster")]

mod support;

use std::collections::BTreeSet;
use std::num::NonZeroU16;
use std::time::Duration;

use axum_fanout::{FanoutBuilder, FanoutLayer, RoomHandle};
use support::*;

/// `n` nodes on the cluster, each built with `configure`, once all are ready.
async fn nodes(
    cluster: &RedisCluster,
    n: usize,
    configure: impl Fn(FanoutBuilder) -> FanoutBuilder,
) -> Vec<(TestServer, RoomHandle)> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        let layer =
            configure(FanoutLayer::cluster_builder(cluster.urls()).node_id(format!("k{i}")))
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
    let to = *cluster
        .master_ports()
        .iter()
        .find(|&&p| p != from)
        .expect("another master");
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
    let empty = FanoutLayer::cluster_builder(Vec::<String>::new())
        .build()
        .expect_err("no nodes");
    assert!(empty.is_invalid_url());
    let cause = std::error::Error::source(&empty)
        .expect("cause")
        .to_string();
    assert!(cause.contains("at least one node"), "{cause}");
    let bad = FanoutLayer::cluster_builder(["redis://127.0.0.1:7000", "http://nope"])
        .build()
        .expect_err("bad url");
    assert!(bad.is_invalid_url(), "{bad}");
}
