//! The chat example's wire contract (`PROTOCOL.md` part 2, and the close codes documented in
//! `examples/chat_app`) against a real, throwaway `redis-server`: close codes for bad input,
//! room name validation, `/healthz` across a Redis outage, `/stats`, the default room, and the
//! `chat` example binary run as three separate processes.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::close_code;
use axum_fanout::{FanoutLayer, RoomHandle};
use futures_util::SinkExt;
use serde_json::{Value, json};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// The default `max_message_size` of a layer.
const MAX_MESSAGE: usize = 64 * 1024;

/// One in-process chat node.
struct Node {
    server: TestServer,
    handle: RoomHandle,
}

/// `n` in-process chat nodes (ids `n1`, `n2`, ...) on one Redis.
struct Cluster {
    redis: RedisServer,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        let redis = RedisServer::start();
        let layers = (1..=n).map(|i| {
            FanoutLayer::builder(redis.url())
                .node_id(format!("n{i}"))
                .build()
                .expect("valid url")
        });
        let nodes = start_nodes(layers, chat_app::app)
            .await
            .into_iter()
            .map(|(server, handle)| Node { server, handle })
            .collect();
        Self { redis, nodes }
    }

    fn addr(&self, node: usize) -> SocketAddr {
        self.nodes[node].server.addr
    }

    fn stats(&self, node: usize) -> axum_fanout::Stats {
        self.nodes[node].handle.stats()
    }

    /// Connects a client to `/ws?room=<room>` on `node` and waits until the node counts it and
    /// Redis has the node subscribed to the room's channel.
    async fn join(&self, node: usize, room: &str) -> Ws {
        self.join_path(node, &format!("/ws?room={room}"), room)
            .await
    }

    /// Like [`join`](Cluster::join) with an explicit path; `room` is the room it should land in.
    async fn join_path(&self, node: usize, path: &str, room: &str) -> Ws {
        let handle = &self.nodes[node].handle;
        let before = handle.stats().memberships;
        let ws = connect(&self.nodes[node].server.ws_url(path)).await;
        wait_until("socket joined", || async {
            handle.stats().memberships > before
        })
        .await;
        let channel = format!("ws:room:{room}");
        wait_until("node subscribed", || async {
            handle.stats().subscriptions > 0 && self.redis.numsub(&channel) > 0
        })
        .await;
        ws
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Reads the close frame (panicking on any data frame first) and checks its code; returns the
/// reason.
async fn expect_close(ws: &mut Ws, code: u16, what: &str) -> String {
    let frame = recv_close(ws)
        .await
        .unwrap_or_else(|| panic!("{what}: connection ended without a close frame"));
    assert_eq!(
        u16::from(frame.code),
        code,
        "{what}: close code (reason {:?})",
        frame.reason.as_str()
    );
    frame.reason.to_string()
}

/// Polls `cond` every 20 ms until it holds, or panics with `what` after `within`.
async fn wait_within<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await; // deadline: polling interval
    }
}

/// `GET path`: status and body parsed as JSON.
async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http(addr, "GET", path, "").await;
    (status, json_of(&body))
}

async fn healthz(addr: SocketAddr) -> u16 {
    http(addr, "GET", "/healthz", "").await.0
}

/// How many SUBSCRIBE commands this Redis has executed since it started.
fn subscribe_calls(redis: &RedisServer) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_subscribe:calls="))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().expect("calls=<number>"))
        .unwrap_or(0)
}

/// A JSON string value whose encoding is exactly `len` bytes.
fn json_string_of_len(len: usize) -> String {
    assert!(len >= 2);
    format!("\"{}\"", "x".repeat(len - 2))
}

// ---------------------------------------------------------------------------------------------
// Close codes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_frame_that_is_not_json_closes_only_that_connection_with_1007() {
    let c = Cluster::start(2).await;
    let mut same_node = c.join(0, "j").await;
    let mut other_node = c.join(1, "j").await;
    let garbage = ["not json", "{\"unterminated\":", "{\"a\":1} {\"b\":2}", ""];
    for (i, g) in garbage.into_iter().enumerate() {
        let mut bad = c.join(0, "j").await;
        assert_eq!(c.stats(0).memberships, 2);
        send_text(&mut bad, g).await;
        let reason =
            expect_close(&mut bad, close_code::INVALID, &format!("text frame {g:?}")).await;
        assert!(!reason.is_empty(), "the close frame says why");
        wait_until("node n1 released the closed socket", || async {
            c.stats(0).memberships == 1
        })
        .await;
        // The others still work: the next frame each receives is this valid message (not the
        // garbage, which was not broadcast).
        send_text(&mut other_node, &json!({ "after": i }).to_string()).await;
        for ws in [&mut same_node, &mut other_node] {
            assert_eq!(
                json_of(&recv_text(ws, "message after the bad frame").await),
                json!({ "after": i })
            );
        }
    }
    // The connection on the bad frame's node can still send, too.
    send_text(&mut same_node, r#"{"from":"same node"}"#).await;
    for ws in [&mut same_node, &mut other_node] {
        assert_eq!(
            json_of(&recv_text(ws, "message from the same node").await),
            json!({ "from": "same node" })
        );
    }
    // Nothing but valid frames was published.
    wait_until("publish counters settle", || async {
        c.stats(0).published == 1 && c.stats(1).published == garbage.len() as u64
    })
    .await;
    assert_eq!(c.stats(0).publish_errors + c.stats(1).publish_errors, 0);
}

#[tokio::test]
async fn a_text_message_over_64_kib_closes_only_that_connection_with_1009() {
    let c = Cluster::start(2).await;
    let mut big = c.join(0, "big").await;
    let mut same_node = c.join(0, "big").await;
    let mut other_node = c.join(1, "big").await;

    // Exactly at the limit is accepted and broadcast (so the limit really is 64 KiB, and the
    // close below is about size, not about big messages in general).
    let at_limit = json_string_of_len(MAX_MESSAGE);
    send_text(&mut big, &at_limit).await;
    for ws in [&mut big, &mut same_node, &mut other_node] {
        assert_eq!(
            json_of(&recv_text(ws, "message of exactly 64 KiB").await),
            json_of(&at_limit)
        );
    }

    // One byte more: valid JSON, so only its size can be the reason for the close.
    send_text(&mut big, &json_string_of_len(MAX_MESSAGE + 1)).await;
    let reason = expect_close(&mut big, close_code::SIZE, "message of 64 KiB + 1").await;
    assert!(!reason.is_empty(), "the close frame says why");
    wait_until("node n1 released the closed socket", || async {
        c.stats(0).memberships == 1
    })
    .await;

    for (from, tag) in [(0, "same node"), (1, "other node")] {
        let msg = json!({ "after": "too big", "from": tag }).to_string();
        let sender = if from == 0 {
            &mut same_node
        } else {
            &mut other_node
        };
        send_text(sender, &msg).await;
        for ws in [&mut same_node, &mut other_node] {
            assert_eq!(
                recv_text(ws, "message after the oversized one").await,
                msg,
                "the oversized message was not broadcast"
            );
        }
    }
    wait_until("publish counters settle", || async {
        c.stats(0).published == 2 && c.stats(1).published == 1
    })
    .await;
}

#[tokio::test]
async fn a_binary_frame_closes_only_that_connection_with_1003() {
    let c = Cluster::start(2).await;
    let mut bin = c.join(0, "b").await;
    let mut same_node = c.join(0, "b").await;
    let mut other_node = c.join(1, "b").await;

    // The bytes are valid JSON: the frame type alone is what is refused.
    bin.send(Message::binary(br#"{"a":1}"#.to_vec()))
        .await
        .expect("send binary");
    let reason = expect_close(&mut bin, close_code::UNSUPPORTED, "binary frame").await;
    assert!(!reason.is_empty(), "the close frame says why");
    wait_until("node n1 released the closed socket", || async {
        c.stats(0).memberships == 1
    })
    .await;

    send_text(&mut other_node, r#"{"after":"binary"}"#).await;
    for ws in [&mut same_node, &mut other_node] {
        assert_eq!(
            json_of(&recv_text(ws, "message after the binary frame").await),
            json!({ "after": "binary" }),
            "the binary frame was not broadcast"
        );
    }
    assert_eq!(c.stats(0).published, 0);
}

// ---------------------------------------------------------------------------------------------
// Room names
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_invalid_room_name_closes_with_1008_and_joins_nothing() {
    let c = Cluster::start(1).await;
    let too_long = "x".repeat(129);
    let cases = [
        ("/ws?room=".to_owned(), "empty"),
        ("/ws?room=a%0Ab".to_owned(), "control character"),
        ("/ws?room=%00".to_owned(), "control character"),
        (format!("/ws?room={too_long}"), "128"),
        ("/ws?room=42:shard1".to_owned(), "shard"),
        ("/ws?room=42%3Ashard007".to_owned(), "shard"),
    ];
    for (path, needle) in &cases {
        let mut ws = connect(&c.nodes[0].server.ws_url(path)).await;
        let reason = expect_close(&mut ws, close_code::POLICY, path).await;
        assert!(
            reason.contains(needle),
            "{path}: reason {reason:?} names the rule ({needle:?})"
        );
    }
    let s = c.stats(0);
    assert_eq!(
        (s.rooms, s.memberships, s.subscriptions, s.connections),
        (0, 0, 0, 0)
    );
    // Rooms only: the node's probe channel lives outside the room prefix.
    assert_eq!(c.redis.channels("ws:room:*"), Vec::<String>::new());
    assert_eq!(
        subscribe_calls(&c.redis),
        c.nodes.len() as u64,
        "no SUBSCRIBE was ever sent beyond each node's probe channel"
    );

    // Control: a valid name at the length limit joins, and the checks above see it.
    let longest = "y".repeat(128);
    let _ws = c.join(0, &longest).await;
    assert_eq!(c.stats(0).rooms, 1);
    assert_eq!(
        c.redis.channels("ws:room:*"),
        [format!("ws:room:{longest}")]
    );
    assert!(subscribe_calls(&c.redis) > c.nodes.len() as u64);
}

#[tokio::test]
async fn the_room_defaults_to_lobby() {
    let c = Cluster::start(2).await;
    let mut no_query = c.join_path(0, "/ws", "lobby").await;
    let mut other_param = c.join_path(0, "/ws?topic=x", "lobby").await;
    let mut explicit = c.join(1, "lobby").await;
    assert_eq!(c.redis.channels("ws:room:*"), ["ws:room:lobby"]);
    assert_eq!(c.redis.numsub("ws:room:lobby"), 2);
    assert_eq!(c.stats(0).rooms, 1);
    assert_eq!(c.stats(0).memberships, 2);

    send_text(&mut no_query, r#"{"from":"no query"}"#).await;
    send_text(&mut explicit, r#"{"from":"explicit"}"#).await;
    for ws in [&mut no_query, &mut other_param, &mut explicit] {
        let mut got = vec![
            json_of(&recv_text(ws, "first lobby message").await),
            json_of(&recv_text(ws, "second lobby message").await),
        ];
        got.sort_by_key(|v| v["from"].as_str().map(str::to_owned));
        assert_eq!(
            got,
            [json!({ "from": "explicit" }), json!({ "from": "no query" })]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// /healthz and /stats
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_follows_the_redis_link_and_sockets_resume_after_a_restart() {
    let mut c = Cluster::start(2).await;
    for node in 0..2 {
        assert_eq!(
            healthz(c.addr(node)).await,
            200,
            "node {node} with redis up"
        );
    }
    let mut a = c.join(0, "survivor").await;
    let mut b = c.join(1, "survivor").await;
    wait_until("both nodes subscribed", || async {
        c.redis.numsub("ws:room:survivor") == 2
    })
    .await;

    c.redis.stop();
    for node in 0..2 {
        let addr = c.addr(node);
        wait_within(
            Duration::from_secs(5),
            "healthz 503 with redis down",
            || async move { healthz(addr).await == 503 },
        )
        .await;
        assert!(!c.nodes[node].handle.is_ready());
    }
    // The sockets stay open and in their room while Redis is down.
    assert_eq!((c.stats(0).memberships, c.stats(1).memberships), (1, 1));

    c.redis.restart();
    assert_eq!(
        c.redis.numsub("ws:room:survivor"),
        0,
        "a fresh redis-server knows no subscribers"
    );
    for node in 0..2 {
        let addr = c.addr(node);
        wait_until("healthz 200 after the restart", || async move {
            healthz(addr).await == 200
        })
        .await;
    }
    wait_until("both nodes resubscribed", || async {
        c.redis.numsub("ws:room:survivor") == 2
    })
    .await;
    for node in 0..2 {
        assert!(
            c.stats(node).reconnects >= 1,
            "node {node} counted the loss"
        );
    }

    // Each socket that stayed connected is told about the gap, once, with a sane window.
    for ws in [&mut a, &mut b] {
        let notice = json_of(&recv_text(ws, "missed-messages notice").await);
        assert_eq!(notice["type"], "fanout.missed", "{notice}");
        assert_eq!(notice["room"], "survivor", "{notice}");
        let (since, until) = (notice["since"].as_u64(), notice["until"].as_u64());
        assert!(
            matches!((since, until), (Some(s), Some(u)) if s > 0 && s <= u),
            "{notice}"
        );
        assert!(
            notice["dropped"].is_null(),
            "unknown while the link was down: {notice}"
        );
    }

    // The sockets that stayed connected receive messages again, from either node.
    send_text(&mut a, r#"{"after":"restart","from":"a"}"#).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(
            json_of(&recv_text(ws, "message after the restart").await),
            json!({ "after": "restart", "from": "a" })
        );
    }
    send_text(&mut b, r#"{"after":"restart","from":"b"}"#).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(
            json_of(&recv_text(ws, "second message after the restart").await),
            json!({ "after": "restart", "from": "b" })
        );
    }
}

#[tokio::test]
async fn stats_returns_the_counters_as_json() {
    let c = Cluster::start(1).await;
    let (status, before) = get_json(c.addr(0), "/stats").await;
    assert_eq!(status, 200);
    assert_eq!(before["node_id"], "n1");
    assert_eq!(before["ready"], true);
    for counter in [
        "rooms",
        "connections",
        "memberships",
        "subscriptions",
        "published",
        "publish_errors",
        "received",
        "delivered",
        "dropped",
        "slow_disconnects",
        "malformed",
        "inbound_dropped",
        "reconnects",
    ] {
        assert_eq!(before[counter], 0, "{counter} starts at 0: {before}");
    }

    let mut a = c.join(0, "s").await;
    let mut b = c.join(0, "s").await;
    send_text(&mut a, r#"{"n":1}"#).await;
    for ws in [&mut a, &mut b] {
        assert_eq!(json_of(&recv_text(ws, "message").await), json!({ "n": 1 }));
    }
    let addr = c.addr(0);
    wait_until("/stats counts the message", || async move {
        let (_, s) = get_json(addr, "/stats").await;
        s["published"] == 1 && s["received"] == 1 && s["delivered"] == 2
    })
    .await;
    let (status, after) = get_json(addr, "/stats").await;
    assert_eq!(status, 200);
    assert_eq!(after["node_id"], "n1");
    assert_eq!(after["rooms"], 1);
    assert_eq!(after["connections"], 2);
    assert_eq!(after["memberships"], 2);
    assert_eq!(after["subscriptions"], 1);
    assert_eq!(after["publish_errors"], 0);
}

// ---------------------------------------------------------------------------------------------
// The `chat` example as separate processes
// ---------------------------------------------------------------------------------------------

/// Three `chat` processes on one Redis, one client each in one room: a message from one client
/// reaches every client (the sender included) exactly once, over the channel `prefix + room`.
async fn three_chat_processes(prefix: Option<&str>) {
    let bin = chat_binary();
    let redis = RedisServer::start();
    let room = "trio";
    let channel = format!("{}{room}", prefix.unwrap_or("ws:room:"));
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let env: Vec<(&str, &str)> = prefix.map(|p| ("CHANNEL_PREFIX", p)).into_iter().collect();
        nodes.push(ChatProcess::start(&bin, &redis, &format!("proc{i}"), &env).await);
    }
    for p in &nodes {
        let (status, stats) = get_json(p.addr, "/stats").await;
        assert_eq!(status, 200);
        assert_eq!(stats["node_id"], p.node_id.as_str(), "NODE_ID is honoured");
    }
    let mut clients = Vec::new();
    for p in &nodes {
        clients.push(connect(&p.ws_url(room)).await);
    }
    wait_until("the three processes subscribed", || async {
        redis.numsub(&channel) == 3
    })
    .await;
    let pattern = format!("{}*", prefix.unwrap_or("ws:room:"));
    assert_eq!(redis.channels(&pattern), [channel.as_str()]);
    // Besides the room, only the three nodes' private probe channels exist.
    assert_eq!(redis.channels("*").len(), 4);

    let message = json!({
        "text": "héllo ☕ \"quoted\" \\ \n",
        "n": [1, -2.5, 1e300, null, true],
        "nested": { "a": {}, "b": [] },
    });
    send_text(&mut clients[1], &message.to_string()).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(
            json_of(&recv_text(ws, "the message").await),
            message,
            "client on proc{}",
            i + 1
        );
    }
    // Exactly once: the next frame everyone gets is a later marker, not a duplicate.
    send_text(&mut clients[2], r#"{"marker":true}"#).await;
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(
            json_of(&recv_text(ws, "the marker").await),
            json!({ "marker": true }),
            "client on proc{}",
            i + 1
        );
    }
    assert_eq!(redis.numsub(&channel), 3);
    for p in &nodes {
        let addr = p.addr;
        wait_until("each process delivered two frames", || async move {
            let (_, s) = get_json(addr, "/stats").await;
            s["delivered"] == 2 && s["received"] == 2
        })
        .await;
    }
}

#[tokio::test]
async fn three_chat_processes_deliver_to_every_client_exactly_once() {
    three_chat_processes(None).await;
}

#[tokio::test]
async fn three_chat_processes_honour_channel_prefix() {
    three_chat_processes(Some("test:pfx:")).await;
}
