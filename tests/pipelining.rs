//! Broadcasts queued without waiting for Redis's reply (`Broadcast::queue`): one sender's
//! order holds, failures still reach the socket, and a socket's broadcasts in flight are
//! bounded. Real `redis-server`, nodes in one process.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum_fanout::{Event, FanoutBuilder, FanoutLayer, Payload, RoomHandle};
use serde_json::Value;
use support::*;

async fn ready(handle: &RoomHandle) {
    wait_until("node ready", || async { handle.is_ready() }).await;
}

/// Connects to `/ws?room=...` and waits until the node counts the socket in a room (its join
/// may still wait for Redis to confirm the room's SUBSCRIBE).
async fn join(server: &TestServer, handle: &RoomHandle, room: &str) -> Ws {
    let before = handle.stats().memberships;
    let ws = connect(&server.ws_url(&format!("/ws?room={room}"))).await;
    wait_until("socket joined", || async {
        handle.stats().memberships > before
    })
    .await;
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_that_do_not_wait_for_replies_keep_their_order_on_every_node() {
    // The chat example queues each client frame and reads the next one at once.
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let layer = FanoutLayer::builder(redis.url())
            .node_id(format!("n{i}"))
            .build()
            .expect("layer");
        let handle = layer.handle();
        ready(&handle).await;
        nodes.push((TestServer::start(chat_app::app(layer)).await, handle));
    }
    let mut clients = Vec::new();
    for (server, handle) in &nodes {
        clients.push(join(server, handle, "order").await);
    }
    // Counted in the room is not yet subscribed: wait for all three nodes' SUBSCRIBE.
    wait_until("three nodes subscribed", || async {
        redis.numsub("ws:room:order") == 3
    })
    .await;
    const N: u64 = 1000;
    // Two senders on two nodes write their frames back to back, never waiting.
    for (sender, ws) in [("a", 0), ("b", 1)] {
        for q in 0..N {
            send_text(&mut clients[ws], &format!(r#"{{"s":"{sender}","q":{q}}}"#)).await;
        }
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        let mut next: HashMap<String, u64> = HashMap::new();
        for _ in 0..2 * N {
            let v: Value = serde_json::from_str(&recv_text(ws, "a message").await).expect("json");
            let s = v["s"].as_str().expect("sender").to_owned();
            let q = v["q"].as_u64().expect("seq");
            let expected = next.entry(s.clone()).or_insert(0);
            assert_eq!(q, *expected, "client {i}: sender {s} out of order");
            *expected += 1;
        }
    }
    // Counted when the publisher reads Redis's reply, which may follow the deliveries.
    wait_until("every broadcast counted as published", || async {
        nodes.iter().map(|(_, h)| h.stats().published).sum::<u64>() == 2 * N
    })
    .await;
}

/// Each text frame is queued as a broadcast to the socket's room and its receipt dropped; the
/// handler tells the client `queued:<n>` when `queue` returned and `failed:<room>:<kind>` for
/// every `Event::BroadcastFailed`.
fn queue_app(layer: FanoutLayer) -> Router {
    async fn ws(
        upgrade: WebSocketUpgrade,
        Query(q): Query<HashMap<String, String>>,
        rooms: RoomHandle,
    ) -> Response {
        let room = q.get("room").cloned().unwrap_or_default();
        rooms.on_upgrade(upgrade, move |mut socket| async move {
            socket.join(&room).await.expect("join");
            socket.send("joined").expect("send");
            let mut n = 0;
            while let Some(Ok(event)) = socket.recv_event().await {
                match event {
                    Event::Message(Message::Text(text)) => {
                        let payload = Payload::raw_json(text.as_str()).expect("json");
                        match socket.broadcast(&room, payload).queue().await {
                            Ok(receipt) => drop(receipt),
                            Err(e) => panic!("not queued: {e}"),
                        }
                        socket.send(format!("queued:{n}")).expect("send");
                        n += 1;
                    }
                    Event::BroadcastFailed { room, error, .. } => {
                        let kind = if error.is_timeout() {
                            "timeout"
                        } else {
                            "other"
                        };
                        socket.send(format!("failed:{room}:{kind}")).expect("send");
                    }
                    _ => {}
                }
            }
        })
    }
    Router::new().route("/ws", get(ws)).layer(layer)
}

async fn queue_node(builder: FanoutBuilder) -> (TestServer, RoomHandle) {
    let layer = builder.build().expect("layer");
    let handle = layer.handle();
    ready(&handle).await;
    (TestServer::start(queue_app(layer)).await, handle)
}

/// A client of `queue_app` in `room`, once its join is confirmed.
async fn queue_client(server: &TestServer, room: &str) -> Ws {
    let mut ws = connect(&server.ws_url(&format!("/ws?room={room}"))).await;
    assert_eq!(recv_text(&mut ws, "join confirmed").await, "joined");
    ws
}

#[tokio::test]
async fn a_queued_broadcast_that_fails_is_reported_to_its_socket() {
    let mut redis = RedisServer::start();
    let (server, handle) =
        queue_node(FanoutLayer::builder(redis.url()).publish_timeout(Duration::from_millis(300)))
            .await;
    let mut ws = queue_client(&server, "lost").await;
    redis.stop();
    send_text(&mut ws, r#"{"n":1}"#).await;
    assert_eq!(recv_text(&mut ws, "queued").await, "queued:0");
    assert_eq!(
        recv_text(&mut ws, "the failure").await,
        "failed:lost:timeout"
    );
    assert_eq!(handle.stats().publish_errors, 1);
    assert_eq!(handle.stats().published, 0);
}

#[tokio::test]
async fn a_socket_has_at_most_its_bound_of_broadcasts_in_flight() {
    let redis = RedisServer::start();
    let (server, handle) = queue_node(
        FanoutLayer::builder(redis.url())
            .broadcasts_in_flight(NonZeroUsize::new(2).expect("non-zero"))
            .publish_timeout(Duration::from_secs(3)),
    )
    .await;
    let mut ws = queue_client(&server, "bound").await;
    // A frozen Redis: TCP stays up, nothing is answered.
    redis.signal("STOP");
    for n in 0..3 {
        send_text(&mut ws, &format!(r#"{{"n":{n}}}"#)).await;
    }
    assert_eq!(recv_text(&mut ws, "first queued").await, "queued:0");
    assert_eq!(recv_text(&mut ws, "second queued").await, "queued:1");
    // The third waits for a slot: none frees before the first two time out (3 s).
    let early = tokio::time::timeout(Duration::from_millis(1500), recv_text(&mut ws, "third"));
    assert!(
        early.await.is_err(),
        "a third broadcast was queued with two in flight"
    );
    // Redis answers again: the first two get their replies, which frees a slot for the third.
    redis.signal("CONT");
    let mut seen = Vec::new();
    while !seen.iter().any(|m| m == "queued:2") {
        seen.push(recv_text(&mut ws, "the third queued").await);
    }
    assert!(seen.iter().all(|m| !m.starts_with("failed")), "{seen:?}");
    wait_until("all three published", || async {
        handle.stats().published == 3
    })
    .await;
}

#[tokio::test]
async fn the_chat_example_tells_a_client_whose_message_could_not_be_sent() {
    let mut redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .publish_timeout(Duration::from_millis(300))
        .build()
        .expect("layer");
    let handle = layer.handle();
    ready(&handle).await;
    let server = TestServer::start(chat_app::app(layer)).await;
    let mut ws = join(&server, &handle, "cut").await;
    // A message that comes back proves the join completed (not only that Redis subscribed).
    wait_until("subscribed", || async { redis.numsub("ws:room:cut") == 1 }).await;
    send_text(&mut ws, r#"{"n":0}"#).await;
    assert_eq!(recv_text(&mut ws, "the echo").await, r#"{"n":0}"#);
    redis.stop();
    send_text(&mut ws, r#"{"type":"chat","text":"into the void"}"#).await;
    let v: Value =
        serde_json::from_str(&recv_text(&mut ws, "the unsent notice").await).expect("json");
    assert_eq!(v["type"], "fanout.unsent", "{v}");
    assert_eq!(v["room"], "cut");
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
}
