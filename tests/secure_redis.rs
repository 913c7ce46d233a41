//! Redis with a password or an ACL user: the credentials in the URL authenticate both of the
//! node's connections (publisher and subscriber), and a wrong password leaves the node not
//! ready, with bounded broadcast failures, no panic and no password in the logs. Every test
//! runs its own `redis-server`.

mod support;

use axum::extract::ws::close_code;
use std::time::{Duration, Instant};

use axum_fanout::FanoutLayer;
use support::*;

const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

fn layer(url: &str) -> FanoutLayer {
    FanoutLayer::builder(url)
        .publish_timeout(PUBLISH_TIMEOUT)
        .subscribe_timeout(Duration::from_millis(500))
        .reconnect_backoff_max(Duration::from_millis(200))
        .build()
        .expect("a valid url")
}

/// Failed authentications the server logged (`ACL LOG`, summing the `count` of entries whose
/// reason is `auth`).
fn auth_failures(redis: &RedisServer) -> u64 {
    let out = redis.cli(&["ACL", "LOG"]);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let mut total = 0;
    let mut count = 0;
    for pair in lines.windows(2) {
        match pair {
            ["count", n] => count = n.parse().unwrap_or(0),
            ["reason", "auth"] => total += count,
            _ => {}
        }
    }
    total
}

/// A node on `url` becomes ready, a socket joins, and a broadcast reaches it; both of the
/// node's connections are authenticated as `user`.
async fn round_trip(redis: &RedisServer, url: &str, user: &str) {
    let server = assert_round_trip(redis, layer(url), "vault").await;
    assert_eq!(http(server.addr, "GET", "/healthz", "").await.0, 200);

    // Publisher and subscriber: two connections, both logged in as `user`.
    assert!(
        redis.clients_of(user) >= 2,
        "{}",
        redis.cli(&["CLIENT", "LIST"])
    );
}

#[tokio::test]
async fn a_password_in_the_url_authenticates_publisher_and_subscriber() {
    let redis = RedisServer::start_with_cli(&["--requirepass", "s3cret"], &["-a", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port());
    round_trip(&redis, &url, "default").await;
}

#[tokio::test]
async fn a_percent_encoded_password_is_decoded() {
    // `@`, `:` and `/` would end the user info or the authority unencoded.
    let password = "p@ss:w/rd";
    let redis = RedisServer::start_with_cli(&["--requirepass", password], &["-a", password]);
    let url = format!("redis://:p%40ss%3Aw%2Frd@127.0.0.1:{}", redis.port());
    round_trip(&redis, &url, "default").await;
}

fn acl_server() -> RedisServer {
    RedisServer::start_with_cli(
        &[
            "--user", "alice", "on", ">secret", "~*", "&*", "+@all", // may use every channel
            "--user", "default", "off", // so nothing works without logging in as alice
        ],
        &["--user", "alice", "--pass", "secret"],
    )
}

#[tokio::test]
async fn an_acl_user_in_the_url_authenticates_publisher_and_subscriber() {
    let redis = acl_server();
    let url = format!("redis://alice:secret@127.0.0.1:{}", redis.port());
    round_trip(&redis, &url, "alice").await;
}

/// A node whose URL has the wrong password: it keeps trying (the server logs the failures),
/// never becomes ready, answers 503 on `/healthz`, fails broadcasts with `is_timeout()` after
/// the publish timeout and joins after the subscribe timeout, logs the server's refusal
/// without the password, and becomes ready once the server accepts that password: its tasks
/// kept retrying instead of panicking.
async fn wrong_password(redis: &RedisServer, url: &str, accept_it: &[&str]) {
    let logs = Logs::default();
    let _capture = logs.capture();
    let layer = layer(url);
    let handle = layer.handle();
    let server = TestServer::start(room_app(layer)).await;

    // Both connections fail and are retried: at least two refusals each way.
    wait_until(
        "the server refused the node's logins, repeatedly",
        || async { auth_failures(redis) >= 4 },
    )
    .await;
    assert!(!handle.is_ready());
    assert_eq!(http(server.addr, "GET", "/healthz", "").await.0, 503);

    let started = Instant::now();
    let err = handle
        .broadcast("vault", r#"{"n":1}"#)
        .await
        .expect_err("no connection");
    let took = started.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        took >= PUBLISH_TIMEOUT - Duration::from_millis(50)
            && took < PUBLISH_TIMEOUT + Duration::from_secs(1),
        "failed after {took:?}, publish timeout {PUBLISH_TIMEOUT:?}"
    );

    let mut ws = connect(&server.ws_url("/ws?room=vault")).await;
    let close = recv_close(&mut ws).await.expect("a close frame");
    assert_eq!(u16::from(close.code), close_code::ERROR, "{close:?}");
    assert_eq!(redis.numsub("ws:room:vault"), 0);
    assert!(!handle.is_ready());
    assert_eq!(http(server.addr, "GET", "/healthz", "").await.0, 503);

    let text = logs.text();
    assert!(text.contains("cannot connect to redis"), "{text}");
    assert!(
        text.contains("WRONGPASS") || text.contains("invalid username-password"),
        "the server's reason is logged: {text}"
    );
    assert!(
        !text.contains("wr0ng"),
        "the password is not logged: {text}"
    );

    // The server now accepts that password: the node connects without any outside help.
    redis.cli(accept_it);
    wait_until("node ready once the password is right", || async {
        handle.is_ready()
    })
    .await;
    handle
        .broadcast("vault", r#"{"n":2}"#)
        .await
        .expect("publish");
}

#[tokio::test]
async fn a_wrong_password_never_becomes_ready_and_broadcasts_time_out() {
    let redis = RedisServer::start_with_cli(&["--requirepass", "s3cret"], &["-a", "s3cret"]);
    let url = format!("redis://:wr0ng@127.0.0.1:{}", redis.port());
    // `CONFIG SET requirepass` changes the password of the connection asking, too: add it.
    wrong_password(&redis, &url, &["ACL", "SETUSER", "default", ">wr0ng"]).await;
}

#[tokio::test]
async fn a_wrong_acl_password_never_becomes_ready_and_broadcasts_time_out() {
    let redis = acl_server();
    let url = format!("redis://alice:wr0ng@127.0.0.1:{}", redis.port());
    wrong_password(&redis, &url, &["ACL", "SETUSER", "alice", ">wr0ng"]).await;
}
