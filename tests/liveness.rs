//! A socket's liveness belongs to the node, not to its handler's reading: a handler that joins
//! and never calls `recv` keeps a client that answers pings, a client that stops answering is
//! closed on time, and a closed connection leaves its rooms at once, while the handler still
//! sleeps. Every test runs its own `redis-server`.

mod support;

use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use axum::routing::get;
use axum_fanout::{FanoutLayer, RoomHandle};
use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// `GET /push` joins room `news`, says `joined`, then only sleeps: a push-only handler, such
/// as a dashboard's, that never reads its socket.
fn push_only_app(layer: FanoutLayer) -> Router {
    async fn push(upgrade: WebSocketUpgrade, rooms: RoomHandle) -> Response {
        rooms.on_upgrade(upgrade, |mut socket| async move {
            if socket.join("news").await.is_err() {
                return;
            }
            let _ = socket.send("joined");
            // The handler's own business, far longer than the test: it never reads.
            tokio::time::sleep(Duration::from_secs(3600)).await; // ok: a handler that only waits, not a test wait
            drop(socket);
        })
    }
    Router::new().route("/push", get(push)).layer(layer)
}

async fn push_node(redis: &RedisServer) -> (TestServer, RoomHandle) {
    let layer = FanoutLayer::builder(redis.url())
        .ping_interval(Duration::from_millis(200))
        .pong_timeout(Duration::from_millis(300))
        .build()
        .expect("layer");
    start_nodes([layer], push_only_app)
        .await
        .pop()
        .expect("one node")
}

#[tokio::test]
async fn a_handler_that_never_reads_keeps_a_client_that_answers_pings() {
    let redis = RedisServer::start();
    let (server, handle) = push_node(&redis).await;
    let mut ws = connect(&server.ws_url("/push")).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    // Ten ping intervals, five times the silence allowed: the client reads (and so answers
    // every ping) and keeps receiving.
    for n in 0..10 {
        handle
            .broadcast("news", format!("update {n}"))
            .await
            .expect("broadcast");
        assert_eq!(recv_text(&mut ws, "an update").await, format!("update {n}"));
        tokio::time::sleep(Duration::from_millis(200)).await; // ok: paced updates, not a wait
    }
    assert_eq!(handle.stats().heartbeat_timeouts, 0);
    assert_eq!(redis.numsub("ws:room:news"), 1, "still in its room");
}

#[tokio::test]
async fn a_client_that_stops_answering_is_closed_on_time_and_leaves_its_rooms() {
    let redis = RedisServer::start();
    let (server, handle) = push_node(&redis).await;
    let mut ws = connect(&server.ws_url("/push")).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    assert_eq!(redis.numsub("ws:room:news"), 1);
    // The client stops reading, so it answers no ping: after 200 + 300 ms (and a heartbeat
    // slice) the node closes it and takes it out of the room, its handler still asleep.
    let silent = std::time::Instant::now();
    wait_until("the silent client is closed and leaves", || async {
        handle.stats().heartbeat_timeouts == 1 && redis.numsub("ws:room:news") == 0
    })
    .await;
    let took = silent.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "closed {took:?} after it went silent (allowed: 500 ms plus a tick)"
    );
    // What the client finds when it reads again: the pings it missed, then the close.
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close frame with a code");
                assert_eq!(u16::from(frame.code), 1001);
                assert_eq!(frame.reason.as_str(), "no pong received");
                break;
            }
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected pings then a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_closes_leaves_its_rooms_at_once_while_its_handler_sleeps() {
    let redis = RedisServer::start();
    let (server, handle) = push_node(&redis).await;
    let mut ws = connect(&server.ws_url("/push")).await;
    assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
    assert_eq!(handle.stats().connections, 1);
    ws.close(None).await.expect("close");
    // The close handshake is answered and the room left: the node unsubscribes.
    loop {
        match tokio::time::timeout(SOON, ws.next())
            .await
            .expect("close reply")
        {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("{e}"),
        }
    }
    wait_until("the room is left", || async {
        redis.numsub("ws:room:news") == 0
    })
    .await;
    assert_eq!(handle.stats().memberships, 0);
}
