//! Hot-room channel sharding on a single Redis: a room split over several channels still
//! delivers exactly once, keeps each sender's order, and its channels never collide with
//! another room's.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use axum::extract::ws::close_code;
use std::collections::HashMap;
use std::num::NonZeroU16;

use axum_fanout::{FanoutBuilder, FanoutLayer, RoomHandle};
use serde_json::{Value, json};
use support::*;

struct Fleet {
    redis: RedisServer,
    nodes: Vec<(TestServer, RoomHandle)>,
}

async fn fleet(configure: fn(FanoutBuilder) -> FanoutBuilder) -> Fleet {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let layer = configure(FanoutLayer::builder(redis.url()).node_id(format!("n{i}")))
            .build()
            .expect("layer");
        let handle = layer.handle();
        nodes.push((TestServer::start(chat_app::app(layer)).await, handle));
    }
    for (_, h) in &nodes {
        wait_until("ready", || async { h.is_ready() }).await;
    }
    Fleet { redis, nodes }
}

impl Fleet {
    async fn join(&self, node: usize, room: &str) -> Ws {
        let (server, handle) = &self.nodes[node];
        let before = handle.stats().memberships;
        let ws = connect(&server.ws_url(&format!("/ws?room={room}"))).await;
        wait_until("joined", || async { handle.stats().memberships > before }).await;
        ws
    }
}

fn shards(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn a_room_over_four_shards_delivers_once_in_per_sender_order() {
    let f = fleet(|b| b.shard_count(shards(4))).await;
    let mut senders = Vec::new();
    let mut listeners = Vec::new();
    for node in 0..3 {
        senders.push(f.join(node, "42").await);
        listeners.push(f.join(node, "42").await);
    }
    let channels: Vec<String> = (0..4).map(|n| format!("ws:room:42:shard{n}")).collect();
    wait_until("every node subscribed to every shard", || async {
        channels.iter().all(|ch| f.redis.numsub(ch) == 3)
    })
    .await;
    assert_eq!(f.redis.channels("ws:room:*"), channels);

    // A bystander watches which shard channels carry the traffic.
    let mut spy_conn = redis::Client::open(f.redis.url())
        .expect("url")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    spy_conn
        .psubscribe("ws:room:42:shard*")
        .await
        .expect("psubscribe");
    let spy = tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut seen = std::collections::BTreeSet::new();
        let mut stream = spy_conn.on_message();
        for _ in 0..3 * EACH {
            match tokio::time::timeout(SOON, stream.next()).await {
                Ok(Some(msg)) => {
                    seen.insert(msg.get_channel_name().to_owned());
                }
                _ => break,
            }
        }
        seen
    });
    const EACH: u64 = 40;
    let sends = senders.iter_mut().enumerate().map(|(s, ws)| async move {
        for i in 0..EACH {
            send_text(ws, &json!({"s": s, "i": i}).to_string()).await;
        }
        ws
    });
    let senders = futures_util::future::join_all(sends).await;
    for ws in listeners.iter_mut().chain(senders) {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for _ in 0..3 * EACH {
            let v = json_of(&recv_text(ws, "sharded message").await);
            let (s, i) = (v["s"].as_u64().expect("s"), v["i"].as_u64().expect("i"));
            if let Some(prev) = last.insert(s, i) {
                assert_eq!(i, prev + 1, "sender {s}: in order, no gap, no duplicate");
            } else {
                assert_eq!(i, 0, "sender {s} starts at 0");
            }
        }
        assert!(last.values().all(|&i| i == EACH - 1), "{last:?}");
    }
    // The three senders were spread over more than one shard. (Deterministic: the shard is a
    // stable hash of node id and socket id, and both are the same on every run.)
    let seen = spy.await.expect("spy task");
    assert!(seen.len() > 1, "shards used: {seen:?}");
    for (_, h) in &f.nodes {
        let s = h.stats();
        assert_eq!(s.delivered, 2 * 3 * EACH, "exactly once per socket: {s:?}");
        assert_eq!(s.malformed, 0);
    }
}

#[tokio::test]
async fn look_alike_rooms_never_share_a_channel() {
    let f = fleet(|b| b.shard_count(shards(4))).await;
    let mut plain = f.join(0, "42").await;
    let mut tricky = f.join(1, "42:shard").await;
    let mut colon = f.join(2, "42:").await;
    wait_until("all subscribed", || async {
        f.redis.channels("ws:room:*").len() == 12
    })
    .await;
    send_text(&mut plain, r#"{"to":"42"}"#).await;
    assert_eq!(json_of(&recv_text(&mut plain, "own").await)["to"], "42");
    send_text(&mut tricky, r#"{"to":"42:shard"}"#).await;
    send_text(&mut colon, r#"{"to":"42:"}"#).await;
    assert_eq!(
        json_of(&recv_text(&mut tricky, "first").await)["to"],
        "42:shard"
    );
    assert_eq!(json_of(&recv_text(&mut colon, "first").await)["to"], "42:");
    // The one name that would collide with a shard channel is refused before joining.
    let mut bad = connect(&f.nodes[0].0.ws_url("/ws?room=42:shard1")).await;
    let close = recv_close(&mut bad).await.expect("close frame");
    assert_eq!(u16::from(close.code), close_code::POLICY);
}

#[tokio::test]
async fn every_shard_channel_goes_away_with_the_last_socket() {
    let f = fleet(|b| b.shard_count(shards(4))).await;
    let a = f.join(0, "gone").await;
    let b = f.join(2, "gone").await;
    wait_until("subscribed", || async {
        f.redis.channels("ws:room:*").len() == 4 && f.redis.numsub("ws:room:gone:shard3") == 2
    })
    .await;
    drop(a);
    drop(b);
    wait_until("no shard channel left", || async {
        f.redis.channels("ws:room:*").is_empty()
    })
    .await;
}

#[tokio::test]
async fn only_the_hot_room_is_split_when_overridden_per_room() {
    let f = fleet(|b| b.room_shards("hot", shards(8))).await;
    let mut hot = f.join(0, "hot").await;
    let mut cold = f.join(1, "cold").await;
    wait_until("subscribed", || async {
        f.redis.channels("ws:room:*").len() == 9
    })
    .await;
    assert!(
        f.redis
            .channels("ws:room:*")
            .contains(&"ws:room:cold".to_owned())
    );
    assert_eq!(f.redis.channels("ws:room:hot:*").len(), 8);
    send_text(&mut hot, r#"{"t":"hot"}"#).await;
    send_text(&mut cold, r#"{"t":"cold"}"#).await;
    assert_eq!(json_of(&recv_text(&mut hot, "hot").await)["t"], "hot");
    assert_eq!(json_of(&recv_text(&mut cold, "cold").await)["t"], "cold");
}
