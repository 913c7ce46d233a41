//! The authorization pattern of `examples/auth.rs`: a token checked before the upgrade (401
//! without one), a room check before `join` (close 1008), the same rule for HTTP pushes (403).

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/auth.rs"]
mod auth;
mod support;

use axum::extract::ws::close_code;
use axum_fanout::FanoutLayer;
use support::*;
use tokio_tungstenite::tungstenite;

async fn server(redis: &RedisServer) -> (TestServer, axum_fanout::RoomHandle) {
    let layer = FanoutLayer::builder(redis.url()).build().expect("layer");
    let handle = layer.handle();
    let server = TestServer::start(auth::app(layer, auth::demo_users())).await;
    wait_until("ready", || async { handle.is_ready() }).await;
    (server, handle)
}

async fn refused_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Err(tungstenite::Error::Http(res)) => res.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn no_token_or_an_unknown_one_gets_401_and_no_socket() {
    let redis = RedisServer::start();
    let (server, handle) = server(&redis).await;
    assert_eq!(
        refused_status(&server.ws_url("/ws?room=general")).await,
        401
    );
    assert_eq!(
        refused_status(&server.ws_url("/ws?room=general&token=nope")).await,
        401
    );
    assert_eq!(handle.stats().connections, 0, "no upgrade happened");
}

#[tokio::test]
async fn a_room_the_user_may_not_use_is_refused_before_joining() {
    let redis = RedisServer::start();
    let (server, handle) = server(&redis).await;
    let mut ws = connect(&server.ws_url("/ws?room=staff&token=bob-token")).await;
    let close = recv_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(close.code), close_code::POLICY);
    assert!(
        close.reason.contains("bob may not join"),
        "{}",
        close.reason
    );
    assert_eq!(handle.stats().rooms, 0);
    assert_eq!(redis.channels("ws:room:*"), Vec::<String>::new());
}

#[tokio::test]
async fn allowed_users_chat_and_http_pushes_follow_the_same_rule() {
    let redis = RedisServer::start();
    let (server, handle) = server(&redis).await;
    let mut bob = connect(&server.ws_url("/ws?room=general&token=bob-token")).await;
    wait_until("bob joined", || async { handle.stats().memberships == 1 }).await;
    wait_until("subscribed", || async {
        redis.numsub("ws:room:general") == 1
    })
    .await;

    let (status, _) = http(
        server.addr,
        "POST",
        "/rooms/general/messages?token=alice-token",
        r#"{"from":"alice"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        recv_text(&mut bob, "alice's push").await,
        r#"{"from":"alice"}"#
    );

    let (status, body) = http(
        server.addr,
        "POST",
        "/rooms/staff/messages?token=bob-token",
        "{}",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = http(server.addr, "POST", "/rooms/general/messages", "{}").await;
    assert_eq!(status, 401);
}
