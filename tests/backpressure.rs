//! A client that stops reading is handled by its overflow policy, alone: the others get every
//! message, in order, and the counters say what happened.

mod support;

use axum::extract::ws::close_code;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use axum::routing::get;
use axum_fanout::{FanoutLayer, OverflowPolicy, Payload, RoomHandle};
use support::*;

/// Joins `?room=` and acknowledges; the client only listens.
fn listen_app(layer: FanoutLayer) -> Router {
    async fn ws(
        upgrade: WebSocketUpgrade,
        Query(q): Query<HashMap<String, String>>,
        rooms: RoomHandle,
    ) -> Response {
        let room = q.get("room").cloned().unwrap_or_default();
        rooms.on_upgrade(upgrade, move |mut socket| async move {
            socket.join(&room).await.expect("join");
            socket.send("joined").expect("ack");
            while socket.recv().await.is_some() {}
        })
    }
    Router::new().route("/ws", get(ws)).layer(layer)
}

const MSG: usize = 32 * 1024;
/// 640 x 32 KiB = 20 MiB toward each client: far more than the loopback socket buffers.
const COUNT: usize = 640;

async fn setup(policy: OverflowPolicy) -> (RedisServer, TestServer, RoomHandle, Ws, Ws) {
    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .queue_bytes(NonZeroUsize::new(256 * 1024).expect("non-zero"))
        .overflow(policy)
        // Only the overflow policy is under test: on a loaded machine the flood can outlast
        // the default 5 s write timeout, which would close the stalled client for another
        // reason (a slow consumer by time, not by queue).
        .write_timeout(Duration::from_secs(120))
        .build()
        .expect("layer");
    let handle = layer.handle();
    let server = TestServer::start(listen_app(layer)).await;
    let mut stalled = connect(&server.ws_url("/ws?room=flood")).await;
    let mut reader = connect(&server.ws_url("/ws?room=flood")).await;
    assert_eq!(recv_text(&mut stalled, "ack").await, "joined");
    assert_eq!(recv_text(&mut reader, "ack").await, "joined");
    (redis, server, handle, stalled, reader)
}

/// Publishes COUNT numbered messages while `reader` reads them all; returns what it read.
async fn flood(handle: &RoomHandle, reader: &mut Ws) -> Vec<usize> {
    let publish = async {
        for i in 0..COUNT {
            let mut body = format!("{i:06}");
            body.push_str(&"x".repeat(MSG - body.len()));
            handle
                .broadcast("flood", Payload::text(body))
                .await
                .expect("publish");
        }
    };
    let read = async {
        let mut seen = Vec::with_capacity(COUNT);
        while seen.len() < COUNT {
            let text = recv_text(reader, "flood message").await;
            seen.push(text[..6].parse::<usize>().expect("numbered"));
        }
        seen
    };
    let ((), seen) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(publish, read)
    })
    .await
    .expect("the reading client is not held back by the stalled one");
    seen
}

#[tokio::test]
async fn disconnect_policy_closes_the_stalled_client_with_1013_and_spares_the_others() {
    let (_redis, _server, handle, mut stalled, mut reader) =
        setup(OverflowPolicy::Disconnect).await;
    let seen = flood(&handle, &mut reader).await;
    assert_eq!(
        seen,
        (0..COUNT).collect::<Vec<_>>(),
        "every message, in order"
    );

    // The stalled client now reads: some frames, then the close frame.
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let close = loop {
        match tokio::time::timeout(SOON, stalled.next())
            .await
            .expect("frames then close")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("close frame with a code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), close_code::AGAIN);
    assert_eq!(
        close.reason.as_str(),
        axum_fanout::close::SLOW_CONSUMER_REASON
    );

    let s = handle.stats();
    assert_eq!(s.slow_disconnects, 1, "{s:?}");
    assert!(s.dropped >= 1, "{s:?}");
    wait_until("the stalled socket left the room", || async {
        handle.stats().memberships == 1
    })
    .await;
}

#[tokio::test]
async fn drop_newest_keeps_the_stalled_client_connected_and_counts_drops() {
    let (_redis, _server, handle, stalled, mut reader) = setup(OverflowPolicy::DropNewest).await;
    let seen = flood(&handle, &mut reader).await;
    assert_eq!(seen, (0..COUNT).collect::<Vec<_>>());
    let s = handle.stats();
    assert_eq!(s.slow_disconnects, 0, "{s:?}");
    assert_eq!(s.memberships, 2, "still connected: {s:?}");
    // The stalled client could take at most what the queue bound and the TCP buffers hold.
    assert!(s.dropped > 0, "{s:?}");
    assert_eq!(
        s.delivered + s.dropped,
        2 * COUNT as u64,
        "every offer is accounted for: {s:?}"
    );
    drop(stalled);
}
