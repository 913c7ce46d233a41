//! Cross-node behaviour against a real `redis-server`: three nodes in one process, each with
//! its own layer (own publisher and subscriber connections), on 127.0.0.1:0.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::collections::HashMap;

use axum::Router;
use axum::extract::Query;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum_fanout::{FanoutLayer, Payload, RoomHandle};
use serde_json::{Value, json};
use support::*;

/// Three chat nodes on one Redis.
struct Cluster {
    redis: RedisServer,
    nodes: Vec<(TestServer, RoomHandle)>,
}

impl Cluster {
    async fn start(make_app: fn(FanoutLayer) -> Router) -> Self {
        let redis = RedisServer::start();
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let layer = FanoutLayer::builder(redis.url())
                .node_id(format!("n{i}"))
                .build()
                .expect("valid url");
            let handle = layer.handle();
            nodes.push((TestServer::start(make_app(layer)).await, handle));
        }
        for (_, h) in &nodes {
            let h = h.clone();
            wait_until("node ready", || {
                let h = h.clone();
                async move { h.is_ready() }
            })
            .await;
        }
        Self { redis, nodes }
    }

    fn url(&self, node: usize, room: &str) -> String {
        self.nodes[node].0.ws_url(&format!("/ws?room={room}"))
    }

    /// Connects a client to the chat app on `node` and waits until the node counts it in
    /// `room` (so its join completed).
    async fn join(&self, node: usize, room: &str) -> Ws {
        let handle = &self.nodes[node].1;
        let before = handle.stats().memberships;
        let ws = connect(&self.url(node, room)).await;
        wait_until("socket joined", || async {
            handle.stats().memberships > before
        })
        .await;
        let redis = &self.redis;
        wait_until("node subscribed", || async {
            handle.stats().subscriptions > 0 && redis.numsub(&format!("ws:room:{room}")) > 0
        })
        .await;
        ws
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn a_message_reaches_every_socket_on_every_node_exactly_once() {
    let c = Cluster::start(chat_app::app).await;
    let mut clients = Vec::new();
    for node in 0..3 {
        for _ in 0..2 {
            clients.push(c.join(node, "42").await);
        }
    }
    // Everyone must be joined before the first message, on all three nodes.
    wait_until("3 nodes subscribed", || async {
        c.redis.numsub("ws:room:42") == 3
    })
    .await;

    send_text(&mut clients[0], r#"{"n":1,"text":"hello"}"#).await;
    send_text(&mut clients[3], r#"{"n":2}"#).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        let first = json_of(&recv_text(ws, "first message").await);
        let second = json_of(&recv_text(ws, "second message").await);
        // Client 0's message was sent first, but 0 and 3 race to Redis: accept either order,
        // and no duplicates.
        let mut ns = [first["n"].as_i64(), second["n"].as_i64()];
        ns.sort();
        assert_eq!(ns, [Some(1), Some(2)], "client {i}");
    }
    // Exactly once: each node delivered each of the 2 messages to its 2 sockets, no more.
    for (_, h) in &c.nodes {
        wait_until("counters settle", || async { h.stats().delivered >= 4 }).await;
        assert_eq!(h.stats().delivered, 4, "node {}", h.node_id());
        assert_eq!(h.stats().received, 2);
    }
}

#[tokio::test]
async fn rooms_whose_names_prefix_each_other_stay_isolated() {
    let c = Cluster::start(chat_app::app).await;
    let mut chat = c.join(0, "chat").await;
    let mut chat2 = c.join(1, "chat2").await;
    let mut cha = c.join(2, "cha").await;

    send_text(&mut chat, r#"{"to":"chat"}"#).await;
    assert_eq!(
        json_of(&recv_text(&mut chat, "own message").await)["to"],
        "chat"
    );
    // Each other room gets a marker; its first frame must be that marker, not the leak.
    send_text(&mut chat2, r#"{"to":"chat2"}"#).await;
    send_text(&mut cha, r#"{"to":"cha"}"#).await;
    assert_eq!(
        json_of(&recv_text(&mut chat2, "chat2 marker").await)["to"],
        "chat2"
    );
    assert_eq!(
        json_of(&recv_text(&mut cha, "cha marker").await)["to"],
        "cha"
    );
}

#[tokio::test]
async fn subscriptions_follow_local_sockets_including_a_dropped_tcp_connection() {
    let c = Cluster::start(chat_app::app).await;
    let a = c.join(0, "lazy").await;
    let b = c.join(1, "lazy").await;
    let b2 = c.join(1, "lazy").await;
    assert_eq!(
        c.redis.numsub("ws:room:lazy"),
        2,
        "node 3 has no socket in the room"
    );
    assert_eq!(c.redis.channels("ws:room:*"), ["ws:room:lazy"]);

    drop(b); // TCP dropped without a close frame; node 2 still has b2
    wait_until("node 2 noticed", || async {
        c.nodes[1].1.stats().memberships == 1
    })
    .await;
    assert_eq!(c.redis.numsub("ws:room:lazy"), 2);

    let mut a = a;
    a.close(None).await.expect("close");
    drop(b2);
    wait_until("no node subscribed", || async {
        c.redis.numsub("ws:room:lazy") == 0 && c.redis.channels("ws:room:*").is_empty()
    })
    .await;
    for (_, h) in &c.nodes {
        let s = h.stats();
        assert_eq!(
            (s.rooms, s.memberships, s.subscriptions, s.connections),
            (0, 0, 0, 0)
        );
    }
}

#[tokio::test]
async fn redis_cli_publish_of_a_seed_envelope_reaches_every_socket() {
    let c = Cluster::start(chat_app::app).await;
    let mut clients = vec![
        c.join(0, "42").await,
        c.join(1, "42").await,
        c.join(2, "42").await,
    ];
    let out = c
        .redis
        .cli(&["PUBLISH", "ws:room:42", r#"{"payload":{"type":"ping"}}"#]);
    assert_eq!(out.trim(), "3", "three nodes subscribed");
    for ws in &mut clients {
        assert_eq!(recv_text(ws, "ping").await, r#"{"type":"ping"}"#);
    }
}

#[tokio::test]
async fn garbage_on_a_room_channel_is_counted_and_dropped() {
    let c = Cluster::start(chat_app::app).await;
    let mut ws = c.join(0, "g").await;
    let garbage = [
        "not json",
        "[1,2,3]",
        "{}",
        r#"{"payload":1,"text":"both"}"#,
        r#"{"binary":"%%%"}"#,
        r#"{"room":"other","payload":1}"#,
        "{\"payload\":",
        r#"{"v":2,"payload":{"from":"the future"}}"#,
    ];
    for g in garbage {
        c.redis.cli(&["PUBLISH", "ws:room:g", g]);
    }
    // Invalid UTF-8 straight from another publisher.
    let mut raw = redis::Client::open(c.redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: i64 = redis::cmd("PUBLISH")
        .arg("ws:room:g")
        .arg(&b"\xff\xfe{\x00"[..])
        .query_async(&mut raw)
        .await
        .expect("publish");
    c.redis
        .cli(&["PUBLISH", "ws:room:g", r#"{"payload":{"ok":true}}"#]);
    assert_eq!(
        recv_text(&mut ws, "the valid message").await,
        r#"{"ok":true}"#
    );
    let h = &c.nodes[0].1;
    assert_eq!(h.stats().malformed, garbage.len() as u64 + 1);
    assert!(h.is_ready(), "garbage does not take the link down");
    // The socket is still fine.
    send_text(&mut ws, r#"{"after":"garbage"}"#).await;
    assert_eq!(
        json_of(&recv_text(&mut ws, "echo").await)["after"],
        "garbage"
    );
}

#[tokio::test]
async fn every_receiver_sees_the_same_order_with_publishers_on_all_nodes() {
    let c = Cluster::start(chat_app::app).await;
    let mut publishers = Vec::new();
    let mut listeners = Vec::new();
    for node in 0..3 {
        publishers.push(c.join(node, "order").await);
        listeners.push(c.join(node, "order").await);
    }
    wait_until("3 nodes subscribed", || async {
        c.redis.numsub("ws:room:order") == 3
    })
    .await;
    const EACH: usize = 50;
    let sends = publishers.iter_mut().enumerate().map(|(p, ws)| async move {
        for i in 0..EACH {
            send_text(ws, &json!({"p": p, "i": i}).to_string()).await;
        }
        ws
    });
    let publishers = futures_util::future::join_all(sends).await;
    let mut sequences = Vec::new();
    for ws in listeners.iter_mut().chain(publishers) {
        let mut seq = Vec::new();
        for _ in 0..3 * EACH {
            let v = json_of(&recv_text(ws, "ordered message").await);
            seq.push((v["p"].as_u64(), v["i"].as_u64()));
        }
        sequences.push(seq);
    }
    for s in &sequences[1..] {
        assert_eq!(s, &sequences[0], "same order at every receiver");
    }
    // Each sender's own messages keep their order.
    for p in 0..3u64 {
        let mine: Vec<_> = sequences[0].iter().filter(|(q, _)| *q == Some(p)).collect();
        assert!(mine.windows(2).all(|w| w[0].1 < w[1].1));
        assert_eq!(mine.len(), EACH);
    }
}

#[tokio::test]
async fn a_plain_http_handler_broadcasts_to_the_room() {
    let c = Cluster::start(chat_app::app).await;
    let mut a = c.join(0, "news").await;
    let mut b = c.join(2, "news").await;
    let (status, body) = http(
        c.nodes[1].0.addr,
        "POST",
        "/rooms/news/messages",
        r#"{"headline":"hi"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["nodes"], 2, "nodes 1 and 3 are subscribed");
    for ws in [&mut a, &mut b] {
        assert_eq!(recv_text(ws, "pushed").await, r#"{"headline":"hi"}"#);
    }
    let (status, _) = http(
        c.nodes[1].0.addr,
        "POST",
        "/rooms/news/messages",
        "not json",
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_broadcasts_each_get_their_own_reply_and_all_arrive() {
    // Broadcasts queued together go to Redis as one pipeline; every caller still gets its own
    // PUBLISH count, and every message arrives once.
    let c = Cluster::start(chat_app::app).await;
    let mut a = c.join(0, "burst").await;
    let mut b = c.join(2, "burst").await;
    let handle = c.nodes[1].1.clone();
    let broadcasts: Vec<_> = (0..500)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.broadcast("burst", format!("{{\"n\":{i}}}")).await })
        })
        .collect();
    for (i, b) in broadcasts.into_iter().enumerate() {
        let nodes = b
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("broadcast {i}: {e}"));
        assert_eq!(nodes, 2, "broadcast {i}: nodes 1 and 3 hold the room");
    }
    for ws in [&mut a, &mut b] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let n = json_of(&recv_text(ws, "a burst message").await)["n"]
                .as_u64()
                .expect("n");
            assert!(seen.insert(n), "message {n} arrived twice");
        }
    }
    assert_eq!(handle.stats().published, 500);
}

/// A router for library features the chat contract does not expose: a join acknowledgement
/// and broadcasts that leave the sender out.
fn except_app(layer: FanoutLayer) -> Router {
    async fn ws(
        upgrade: WebSocketUpgrade,
        Query(q): Query<HashMap<String, String>>,
        rooms: RoomHandle,
    ) -> Response {
        let room = q.get("room").cloned().unwrap_or_default();
        let except = q.contains_key("except");
        rooms
            .clone()
            .on_upgrade(upgrade, move |mut socket| async move {
                socket.join(&room).await.expect("join");
                // Sent after `join` returned: a client that sees this may rely on delivery.
                socket
                    .send(Payload::raw_json(r#"{"joined":true}"#).expect("json"))
                    .expect("send");
                while let Some(Ok(Message::Text(text))) = socket.recv().await {
                    let b = rooms.broadcast(&room, Payload::text(text.as_str()));
                    let b = if except { b.except(socket.id()) } else { b };
                    b.await.expect("broadcast");
                }
            })
    }
    Router::new().route("/ws", get(ws)).layer(layer)
}

#[tokio::test]
async fn except_leaves_out_only_the_sending_socket() {
    let c = Cluster::start(except_app).await;
    let mut ws = Vec::new();
    for (node, q) in [(0, "&except"), (0, ""), (1, "")] {
        let mut s = connect(&c.nodes[node].0.ws_url(&format!("/ws?room=x{q}"))).await;
        assert_eq!(recv_text(&mut s, "join ack").await, r#"{"joined":true}"#);
        ws.push(s);
    }
    send_text(&mut ws[0], "from zero").await;
    send_text(&mut ws[1], "from one").await;
    assert_eq!(
        recv_text(&mut ws[0], "only the other message").await,
        "from one"
    );
    for s in &mut ws[1..] {
        assert_eq!(recv_text(s, "first").await, "from zero");
        assert_eq!(recv_text(s, "second").await, "from one");
    }
}

#[tokio::test]
async fn a_message_published_right_after_join_returns_is_delivered() {
    let c = Cluster::start(except_app).await;
    // Fresh rooms every round, so each join waits for a real SUBSCRIBE.
    for round in 0..20 {
        let room = format!("fresh{round}");
        let mut s = connect(&c.nodes[round % 3].0.ws_url(&format!("/ws?room={room}"))).await;
        assert_eq!(recv_text(&mut s, "join ack").await, r#"{"joined":true}"#);
        let publisher = &c.nodes[(round + 1) % 3].1;
        assert_eq!(
            publisher
                .broadcast(&room, "right after")
                .await
                .expect("publish"),
            1
        );
        assert_eq!(recv_text(&mut s, "message after join").await, "right after");
    }
}

#[tokio::test]
async fn binary_payloads_arrive_as_binary_frames() {
    let c = Cluster::start(chat_app::app).await;
    let mut ws = c.join(1, "bin").await;
    let bytes = vec![0u8, 1, 2, 255, 254, 10];
    c.nodes[0]
        .1
        .broadcast("bin", Payload::binary(bytes.clone()))
        .await
        .expect("publish");
    use futures_util::StreamExt;
    let frame = tokio::time::timeout(SOON, ws.next())
        .await
        .expect("in time");
    match frame {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => {
            assert_eq!(&b[..], &bytes[..])
        }
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

#[tokio::test]
async fn concurrent_joins_and_leaves_converge_to_exact_subscriptions() {
    let c = Cluster::start(chat_app::app).await;
    let rooms = ["c0", "c1", "c2", "c3"];
    // Many clients join and leave the same rooms at once on every node; the last of each
    // (node, room) pair with an odd index stays.
    let mut tasks = Vec::new();
    for i in 0..48usize {
        let url = c.url(i % 3, rooms[i % 4]);
        tasks.push(tokio::spawn(async move {
            let ws = connect(&url).await;
            (i, ws)
        }));
    }
    let mut kept = Vec::new();
    for t in tasks {
        let (i, ws) = t.await.expect("task");
        if i >= 36 && i % 2 == 1 {
            kept.push((i, ws));
        } // others dropped here, racing their own joins
    }
    let mut expected: HashMap<String, usize> = HashMap::new();
    let mut per_node_room = std::collections::HashSet::new();
    for (i, _) in &kept {
        per_node_room.insert((i % 3, rooms[i % 4]));
    }
    for (_, room) in &per_node_room {
        *expected.entry(format!("ws:room:{room}")).or_default() += 1;
    }
    let mut want: Vec<String> = expected.keys().cloned().collect();
    want.sort();
    wait_until("subscriptions match the surviving sockets", || async {
        c.redis.channels("ws:room:*") == want
            && expected.iter().all(|(ch, n)| c.redis.numsub(ch) == *n)
            && c.nodes
                .iter()
                .map(|(_, h)| h.stats().memberships)
                .sum::<usize>()
                == kept.len()
    })
    .await;
}

#[tokio::test]
async fn room_handle_without_the_layer_is_a_500_that_names_the_fix() {
    use tower::ServiceExt;
    let app = Router::new().route("/", get(|_: RoomHandle| async { "unreachable" }));
    let res = app
        .oneshot(axum::http::Request::new(axum::body::Body::empty()))
        .await
        .expect("infallible");
    assert_eq!(res.status(), 500);
    let body = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .expect("body");
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("FanoutLayer::new(redis_url)"), "{body}");
}
