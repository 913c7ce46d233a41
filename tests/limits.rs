//! Abuse limits: connections per node, rooms per socket, messages per second, and heartbeats
//! that close half-open connections.

mod support;

use axum::extract::ws::close_code;
use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum_fanout::{FanoutBuilder, FanoutLayer, RoomHandle};
use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite;

/// Joins every room of `?rooms=a,b,c` (answering `joined:<room>` or `refused:<room>:limit`),
/// then echoes each text it receives to the first room.
fn app(layer: FanoutLayer) -> Router {
    async fn ws(
        upgrade: WebSocketUpgrade,
        Query(q): Query<HashMap<String, String>>,
        rooms: RoomHandle,
    ) -> Response {
        let wanted: Vec<String> = q
            .get("rooms")
            .map(|r| r.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        rooms
            .clone()
            .on_upgrade(upgrade, move |mut socket| async move {
                for room in &wanted {
                    let reply = match socket.join(room).await {
                        Ok(()) => format!("joined:{room}"),
                        Err(e) if e.is_limit() => format!("refused:{room}:limit"),
                        Err(e) => format!("refused:{room}:{e}"),
                    };
                    let _ = socket.send(reply);
                }
                while let Some(Ok(Message::Text(t))) = socket.recv().await {
                    let _ = rooms.broadcast(&wanted[0], t.as_str()).await;
                }
            })
    }
    /// The other attach path: the handler upgrades itself and attaches the socket.
    async fn raw(upgrade: WebSocketUpgrade, rooms: RoomHandle) -> Response {
        rooms.configure(upgrade).on_upgrade(move |ws| async move {
            let mut socket = rooms.attach(ws);
            let _ = socket.join("r").await;
            while let Some(Ok(_)) = socket.recv().await {}
        })
    }
    Router::new()
        .route("/ws", get(ws))
        .route("/raw", get(raw))
        .layer(layer)
}

async fn node(
    redis: &RedisServer,
    configure: fn(FanoutBuilder) -> FanoutBuilder,
) -> (TestServer, RoomHandle) {
    let layer = configure(FanoutLayer::builder(redis.url()))
        .build()
        .expect("layer");
    let handle = layer.handle();
    let server = TestServer::start(app(layer)).await;
    wait_until("ready", || async { handle.is_ready() }).await;
    (server, handle)
}

#[tokio::test]
async fn a_full_node_refuses_the_upgrade_with_503() {
    let redis = RedisServer::start();
    let (server, handle) = node(&redis, |b| {
        b.max_connections(NonZeroUsize::new(2).expect("2"))
    })
    .await;
    let _a = connect(&server.ws_url("/ws?rooms=r")).await;
    let _b = connect(&server.ws_url("/ws?rooms=r")).await;
    wait_until("two attached", || async { handle.stats().connections == 2 }).await;
    match tokio_tungstenite::connect_async(server.ws_url("/ws?rooms=r")).await {
        Err(tungstenite::Error::Http(res)) => assert_eq!(res.status(), 503),
        other => panic!("expected a 503, got {other:?}"),
    }
    assert_eq!(handle.stats().rejected_connections, 1);
    drop(_a);
    wait_until("room for one more", || async {
        handle.stats().connections == 1
    })
    .await;
    let _c = connect(&server.ws_url("/ws?rooms=r")).await;
}

#[tokio::test]
async fn a_socket_attached_by_hand_to_a_full_node_is_closed_with_1013() {
    let redis = RedisServer::start();
    let (server, handle) = node(&redis, |b| {
        b.max_connections(NonZeroUsize::new(2).expect("2"))
    })
    .await;
    let _a = connect(&server.ws_url("/ws?rooms=r")).await;
    let _b = connect(&server.ws_url("/raw")).await;
    wait_until("two attached", || async { handle.stats().connections == 2 }).await;
    // `configure` + `attach` cannot answer 503 (the upgrade is done): the socket is closed.
    let mut third = connect(&server.ws_url("/raw")).await;
    let frame = recv_close(&mut third).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), close_code::AGAIN);
    assert_eq!(frame.reason.as_str(), "node full");
    assert_eq!(handle.stats().rejected_connections, 1);
    assert_eq!(handle.stats().connections, 2);
}

#[tokio::test]
async fn a_socket_cannot_join_more_rooms_than_allowed() {
    let redis = RedisServer::start();
    let (server, handle) = node(&redis, |b| {
        b.max_rooms_per_socket(NonZeroUsize::new(2).expect("2"))
    })
    .await;
    let mut ws = connect(&server.ws_url("/ws?rooms=a,b,c")).await;
    assert_eq!(recv_text(&mut ws, "a").await, "joined:a");
    assert_eq!(recv_text(&mut ws, "b").await, "joined:b");
    assert_eq!(recv_text(&mut ws, "c").await, "refused:c:limit");
    assert_eq!(handle.stats().memberships, 2);
    assert_eq!(redis.channels("ws:room:*"), ["ws:room:a", "ws:room:b"]);
}

#[tokio::test]
async fn a_client_over_the_message_rate_is_closed_with_1008_and_others_are_not() {
    let redis = RedisServer::start();
    let (server, handle) = node(&redis, |b| {
        b.messages_per_second(NonZeroU32::new(5).expect("5"))
            .message_burst(NonZeroU32::new(5).expect("5"))
    })
    .await;
    let mut flood = connect(&server.ws_url("/ws?rooms=r")).await;
    let mut calm = connect(&server.ws_url("/ws?rooms=r")).await;
    assert_eq!(recv_text(&mut flood, "ack").await, "joined:r");
    assert_eq!(recv_text(&mut calm, "ack").await, "joined:r");
    for i in 0..20 {
        if futures_util::SinkExt::send(&mut flood, tungstenite::Message::text(format!("m{i}")))
            .await
            .is_err()
        {
            break;
        }
    }
    // The flood's first messages (the burst) are broadcast; then it is cut off.
    let mut got = Vec::new();
    let close = loop {
        match tokio::time::timeout(SOON, flood.next())
            .await
            .expect("in time")
        {
            Some(Ok(tungstenite::Message::Text(t))) => got.push(t.to_string()),
            Some(Ok(tungstenite::Message::Close(c))) => break c.expect("close frame"),
            Some(Ok(_)) => continue,
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), close_code::POLICY);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
    assert!(got.len() <= 6, "at most the burst got through: {got:?}");
    assert_eq!(handle.stats().rate_limited, 1);
    // The calm client is unaffected.
    send_text(&mut calm, "still here").await;
    loop {
        if recv_text(&mut calm, "own message").await == "still here" {
            break;
        }
    }
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed_and_leaves_its_rooms() {
    let redis = RedisServer::start();
    let (server, handle) = node(&redis, |b| {
        b.ping_interval(Duration::from_millis(100))
            .pong_timeout(Duration::from_millis(200))
    })
    .await;
    // Never polled after the handshake: it cannot answer pings, like a half-open connection.
    let _silent = connect(&server.ws_url("/ws?rooms=hb")).await;
    let mut alive = connect(&server.ws_url("/ws?rooms=hb")).await;
    // The live client keeps reading, which answers each ping with a pong.
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        while pings < 8 {
            match tokio::time::timeout(SOON, alive.next())
                .await
                .expect("a frame in time")
            {
                Some(Ok(tungstenite::Message::Ping(_))) => pings += 1,
                Some(Ok(tungstenite::Message::Text(_))) => {}
                other => panic!("the live client must stay open, got {other:?}"),
            }
        }
        alive
    });
    wait_until("the silent client was closed", || async {
        handle.stats().heartbeat_timeouts == 1
    })
    .await;
    wait_until("and left the room", || async {
        handle.stats().memberships == 1
    })
    .await;
    let _alive = reader.await.expect("8 pings answered without being closed");
    assert_eq!(handle.stats().heartbeat_timeouts, 1);
    assert_eq!(handle.stats().memberships, 1);
}
