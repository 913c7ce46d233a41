//! The Redis link under faults: restarts, killed connections, long outages, a frozen server,
//! Redis down at start-up, and graceful shutdown. Every test runs its own `redis-server`.

mod support;

use axum::extract::ws::close_code;
use std::time::{Duration, Instant};

use axum_fanout::{FanoutLayer, RoomHandle};
use support::*;

struct Node {
    server: TestServer,
    handle: RoomHandle,
}

fn layer(redis_url: &str, id: &str) -> FanoutLayer {
    FanoutLayer::builder(redis_url)
        .node_id(id)
        .probe_interval(Duration::from_millis(200))
        .probe_timeout(Duration::from_millis(500))
        .publish_timeout(Duration::from_millis(500))
        .build()
        .expect("layer")
}

async fn nodes(redis: &RedisServer, n: usize) -> Vec<Node> {
    let mut out = Vec::new();
    for i in 1..=n {
        let layer = layer(&redis.url(), &format!("n{i}"));
        let handle = layer.handle();
        out.push(Node {
            server: TestServer::start(room_app(layer)).await,
            handle,
        });
    }
    for node in &out {
        wait_until("node ready", || async { node.handle.is_ready() }).await;
    }
    out
}

async fn join(node: &Node, room: &str) -> Ws {
    let mut ws = connect(&node.server.ws_url(&format!("/ws?room={room}"))).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    ws
}

async fn all_ready(nodes: &[Node], ready: bool) {
    wait_until(
        if ready { "all ready" } else { "all not ready" },
        || async { nodes.iter().all(|n| n.handle.is_ready() == ready) },
    )
    .await;
}

/// Reads until `want`, returning what came before it.
async fn read_until(ws: &mut Ws, want: &str) -> Vec<String> {
    let mut before = Vec::new();
    loop {
        let text = recv_text(ws, want).await;
        if text == want {
            return before;
        }
        before.push(text);
    }
}

#[tokio::test]
async fn a_restart_mid_traffic_resubscribes_every_node_and_tells_every_membership() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, 3).await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(join(node, "live").await);
    }
    // Traffic flows while Redis goes away and comes back; failures are expected meanwhile.
    let publisher = nodes[0].handle.clone();
    let traffic = tokio::spawn(async move {
        for i in 0.. {
            let _ = publisher.broadcast("live", format!("t{i}")).await;
            tokio::time::sleep(Duration::from_millis(5)).await; // ok: a paced publisher, not a wait
        }
    });
    redis.restart();
    let back = Instant::now();
    all_ready(&nodes, true).await;
    wait_until("every node subscribed again", || async {
        redis.numsub("ws:room:live") == 3
    })
    .await;
    let resubscribed = back.elapsed();
    assert!(
        resubscribed < Duration::from_secs(3),
        "took {resubscribed:?}"
    );
    traffic.abort();
    for node in &nodes {
        assert!(node.handle.stats().reconnects >= 1);
    }
    // Every membership learns about the gap; after it, each marker arrives exactly once.
    nodes[1]
        .handle
        .broadcast("live", "marker")
        .await
        .expect("publish");
    for ws in &mut clients {
        let before = read_until(ws, "marker").await;
        assert!(
            before.iter().any(|t| t == "missed:live"),
            "loss notice before the marker: {before:?}"
        );
        let ts: Vec<&String> = before.iter().filter(|t| t.starts_with('t')).collect();
        let mut dedup = ts.clone();
        dedup.dedup();
        assert_eq!(ts, dedup, "no duplicates");
    }
    nodes[2]
        .handle
        .broadcast("live", "after")
        .await
        .expect("publish");
    for ws in &mut clients {
        assert!(
            read_until(ws, "after").await.is_empty(),
            "exactly the next message"
        );
    }
}

#[tokio::test]
async fn ten_restarts_resubscribe_within_three_seconds_each() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, 3).await;
    let _clients = [
        join(&nodes[0], "r").await,
        join(&nodes[1], "r").await,
        join(&nodes[2], "r").await,
    ];
    let mut times = Vec::new();
    for _ in 0..10 {
        redis.stop();
        all_ready(&nodes, false).await;
        redis.restart();
        let back = Instant::now();
        wait_until("resubscribed", || async {
            redis.numsub("ws:room:r") == 3 && nodes.iter().all(|n| n.handle.is_ready())
        })
        .await;
        times.push(back.elapsed());
    }
    times.sort();
    eprintln!(
        "redis back -> all 3 nodes resubscribed over 10 restarts: median {:?}, worst {:?}",
        times[5], times[9]
    );
    assert!(times[9] < Duration::from_secs(3), "{times:?}");
}

#[tokio::test]
async fn a_killed_pubsub_connection_is_replaced_and_resubscribed() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut a = join(&nodes[0], "k").await;
    let mut b = join(&nodes[1], "k").await;
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed.trim().parse::<u32>().unwrap_or(0) >= 2, "{killed}");
    wait_until("resubscribed", || async {
        redis.numsub("ws:room:k") == 2 && nodes.iter().all(|n| n.handle.stats().reconnects >= 1)
    })
    .await;
    all_ready(&nodes, true).await;
    nodes[0]
        .handle
        .broadcast("k", "again")
        .await
        .expect("publish");
    for ws in [&mut a, &mut b] {
        let before = read_until(ws, "again").await;
        assert!(before.iter().all(|t| t == "missed:k"), "{before:?}");
    }
}

#[tokio::test]
async fn an_outage_longer_than_the_client_librarys_retry_budget_is_survived() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut a = join(&nodes[0], "long").await;
    let mut b = join(&nodes[1], "long").await;
    redis.stop();
    all_ready(&nodes, false).await;
    // The outage itself is what this test is about (redis-rs gives up after about 6 s).
    tokio::time::sleep(Duration::from_secs(12)).await; // ok: a timed outage, not a wait
    assert!(
        nodes.iter().all(|n| !n.handle.is_ready()),
        "honest while down"
    );
    redis.restart();
    all_ready(&nodes, true).await;
    wait_until("resubscribed", || async {
        redis.numsub("ws:room:long") == 2
    })
    .await;
    nodes[1]
        .handle
        .broadcast("long", "back")
        .await
        .expect("publish");
    for ws in [&mut a, &mut b] {
        assert_eq!(read_until(ws, "back").await, ["missed:long"]);
    }
}

#[tokio::test]
async fn redis_down_at_start_up_then_everything_works_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let layer = layer(&redis.url(), "early");
    let handle = layer.handle();
    let server = TestServer::start(room_app(layer)).await;
    assert!(!handle.is_ready());
    let err = handle
        .broadcast("x", "nobody")
        .await
        .expect_err("redis is down");
    assert!(err.is_timeout(), "{err:?}");
    redis.restart();
    wait_until("ready after redis came up", || async { handle.is_ready() }).await;
    let mut ws = connect(&server.ws_url("/ws?room=x")).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    assert_eq!(handle.broadcast("x", "hello").await.expect("publish"), 1);
    assert_eq!(recv_text(&mut ws, "message").await, "hello");
}

#[tokio::test]
async fn a_frozen_redis_is_detected_by_the_probe_and_recovered_from() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut a = join(&nodes[0], "ice").await;
    let mut b = join(&nodes[1], "ice").await;
    redis.signal("STOP");
    let frozen = Instant::now();
    // TCP stays up; only the probe can tell.
    all_ready(&nodes, false).await;
    let detected = frozen.elapsed();
    eprintln!(
        "frozen redis detected by the probe after {detected:?} (interval 200 ms, timeout 500 ms)"
    );
    redis.signal("CONT");
    all_ready(&nodes, true).await;
    wait_until("resubscribed", || async {
        redis.numsub("ws:room:ice") == 2
    })
    .await;
    nodes[0]
        .handle
        .broadcast("ice", "thawed")
        .await
        .expect("publish");
    for ws in [&mut a, &mut b] {
        let before = read_until(ws, "thawed").await;
        assert!(before.iter().all(|t| t == "missed:ice"), "{before:?}");
        assert!(!before.is_empty(), "the frozen window is reported");
    }
}

#[tokio::test]
async fn joins_and_leaves_during_an_outage_end_in_exactly_the_right_subscriptions() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, 1).await;
    let leaving = join(&nodes[0], "gone").await;
    let _staying = join(&nodes[0], "kept").await;
    redis.stop();
    all_ready(&nodes, false).await;
    drop(leaving);
    wait_until("left while down", || async {
        nodes[0].handle.stats().rooms == 1
    })
    .await;
    // A join while Redis is down waits for the SUBSCRIBE (up to the subscribe timeout).
    let url = nodes[0].server.ws_url("/ws?room=new");
    let joiner = tokio::spawn(async move {
        let mut ws = connect(&url).await;
        let ack = recv_text(&mut ws, "join ack after redis is back").await;
        (ws, ack)
    });
    wait_until("join pending", || async {
        nodes[0].handle.stats().rooms == 2
    })
    .await;
    redis.restart();
    let (mut ws, ack) = joiner.await.expect("task");
    assert_eq!(ack, "joined");
    wait_until("exact subscriptions", || async {
        redis.channels("ws:room:*") == ["ws:room:kept", "ws:room:new"]
    })
    .await;
    nodes[0]
        .handle
        .broadcast("new", "hi")
        .await
        .expect("publish");
    assert_eq!(recv_text(&mut ws, "message").await, "hi");
}

#[tokio::test]
async fn publishing_while_redis_is_down_fails_within_the_publish_timeout() {
    let mut redis = RedisServer::start();
    let nodes = nodes(&redis, 1).await;
    redis.stop();
    all_ready(&nodes, false).await;
    let handle = nodes[0].handle.clone();
    let started = Instant::now();
    let attempts: Vec<_> = (0..50)
        .map(|i| {
            let h = handle.clone();
            tokio::spawn(async move { h.broadcast("down", format!("m{i}")).await })
        })
        .collect();
    for attempt in attempts {
        let err = attempt.await.expect("task").expect_err("redis is down");
        assert!(err.is_timeout() || err.is_redis(), "{err:?}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "bounded by the 500 ms publish timeout: {took:?}"
    );
    // Counted by the publisher when it gives each one up, which may follow the caller's own
    // timeout by a moment.
    wait_until("50 publish errors counted", || async {
        handle.stats().publish_errors >= 50
    })
    .await;
    assert_eq!(handle.stats().publish_errors, 50);

    // A caller told "timed out" never sees its message published later: once Redis is back,
    // the first message the room sees is a new one, not one of the 50.
    redis.restart();
    all_ready(&nodes, true).await;
    let mut ws = join(&nodes[0], "down").await;
    handle.broadcast("down", "after").await.expect("publish");
    assert_eq!(recv_text(&mut ws, "the first message after").await, "after");
}

#[tokio::test]
async fn graceful_shutdown_closes_sockets_with_1001_and_unsubscribes() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 1).await;
    let mut a = join(&nodes[0], "bye").await;
    let mut b = join(&nodes[0], "bye2").await;
    assert_eq!(redis.channels("ws:room:*").len(), 2);
    // Queued frames are flushed before the close frame.
    nodes[0]
        .handle
        .broadcast("bye", "last words")
        .await
        .expect("publish");
    assert_eq!(
        recv_text(&mut a, "queued before shutdown").await,
        "last words"
    );
    assert!(nodes[0].handle.shutdown().await, "clean shutdown in time");
    for ws in [&mut a, &mut b] {
        let close = recv_close(ws).await.expect("close frame");
        assert_eq!(u16::from(close.code), close_code::AWAY);
    }
    assert_eq!(redis.channels("ws:room:*"), Vec::<String>::new());
    // New sockets are refused with 1001 too.
    let mut late = connect(&nodes[0].server.ws_url("/ws?room=late")).await;
    let close = recv_close(&mut late).await.expect("close frame");
    assert_eq!(u16::from(close.code), close_code::AWAY);
}

#[tokio::test]
async fn a_shutdown_spreads_its_closes_over_the_drain_window() {
    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .node_id("draining")
        .drain_window(Duration::from_secs(2))
        .build()
        .expect("layer");
    let handle = layer.handle();
    let server = TestServer::start(room_app(layer)).await;
    wait_until("ready", || async { handle.is_ready() }).await;
    let node = Node { server, handle };
    let mut closed = Vec::new();
    for _ in 0..20 {
        let mut ws = join(&node, "herd").await;
        closed.push(tokio::spawn(async move {
            let frame = recv_close(&mut ws).await.expect("a close frame");
            (
                Instant::now(),
                u16::from(frame.code),
                frame.reason.to_string(),
            )
        }));
    }
    let start = Instant::now();
    assert!(node.handle.shutdown().await, "clean shutdown in time");
    let mut times = Vec::new();
    for c in closed {
        let (at, code, reason) = c.await.expect("reader");
        assert_eq!(code, close_code::AWAY);
        assert_eq!(reason, axum_fanout::close::SHUTTING_DOWN_REASON);
        times.push(at.duration_since(start));
    }
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    eprintln!("20 closes from {first:?} to {last:?} after the shutdown began (window 2 s)");
    assert!(
        last - first >= Duration::from_millis(1500),
        "the closes are spread over the window, not sent at once: {times:?}"
    );
    assert!(
        last < Duration::from_secs(4),
        "and end within the window (plus slack): {times:?}"
    );
}
