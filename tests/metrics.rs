//! The chat example serves `GET /metrics` in Prometheus's text format, through the `metrics`
//! facade's exporter: every counter the library keeps, and the dispatch lag histogram, whose
//! last value `/stats` shows too. Runs the chat example as a process on its own `redis-server`.

mod support;

use support::*;

#[tokio::test]
async fn the_chat_example_serves_every_counter_and_the_dispatch_lag_to_prometheus() {
    let redis = RedisServer::start();
    let chat = ChatProcess::start(&chat_binary(), &redis, "metered", &[]).await;
    let mut ws = connect(&chat.ws_url("lobby")).await;
    wait_until("subscribed", || async {
        redis.numsub("ws:room:lobby") == 1
    })
    .await;
    send_text(&mut ws, r#"{"hello":1}"#).await;
    assert_eq!(recv_text(&mut ws, "the echo").await, r#"{"hello":1}"#);

    let (status, body) = http(chat.addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    for name in [
        "axum_fanout_published_total",
        "axum_fanout_received_total",
        "axum_fanout_delivered_total",
        "axum_fanout_socket_writes_total",
        "axum_fanout_dispatch_lag_seconds",
        "axum_fanout_connections{node=\"metered\"} 1",
        "axum_fanout_dispatch_lag_ms",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    let (_, stats) = http(chat.addr, "GET", "/stats", "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    let lag = stats["dispatch_lag_ms"].as_u64().expect("dispatch_lag_ms");
    assert!(
        lag < 10_000,
        "a message on loopback lags by milliseconds, not {lag} ms"
    );
}
