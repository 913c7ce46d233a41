//! Interop with the seed's own Node.js implementation (`tests/seed-node`, a verbatim copy of
//! `shared/peers/seed-node`): an axum-fanout node and a seed node on one Redis share the room
//! channels, in both directions.
//!
//! Needs `node` and `npm` (`.ci/run` installs them when missing); `npm ci` fetches the seed's two
//! dependencies once into the cargo target directory.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use axum_fanout::FanoutLayer;
use serde_json::{Value, json};
use support::*;

/// The seed node's sources, installed once per target directory.
fn seed_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("seed-node-interop");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/seed-node");
    std::fs::create_dir_all(&dir).expect("create the seed node's directory");
    for file in ["server.js", "package.json", "package-lock.json"] {
        std::fs::copy(src.join(file), dir.join(file)).expect("copy the seed node");
    }
    if !dir.join("node_modules/ioredis").exists() || !dir.join("node_modules/ws").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status()
            .expect("npm on PATH (`apt-get install nodejs npm`)");
        assert!(status.success(), "npm ci for the seed node failed");
    }
    dir
}

/// A seed node process, killed on drop.
struct SeedNode {
    child: Child,
    port: u16,
}

impl SeedNode {
    fn start(redis_url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("node")
            .arg("server.js")
            .current_dir(seed_dir())
            .env("PORT", port.to_string())
            .env("REDIS_URL", redis_url)
            .env("NODE_ID", "seed")
            .env_remove("CHANNEL_PREFIX")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node on PATH (`apt-get install nodejs`)");
        Self { child, port }
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for SeedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn an_axum_fanout_node_and_a_seed_node_share_rooms_both_ways() {
    let redis = RedisServer::start();
    let seed = SeedNode::start(&redis.url());
    let layer = FanoutLayer::builder(redis.url())
        .node_id("rust")
        .build()
        .expect("layer");
    let handle = layer.handle();
    let ours = TestServer::start(chat_app::app(layer)).await;
    let seed_addr = seed.addr();
    wait_until("the seed node is ready", || async move {
        tokio::net::TcpStream::connect(seed_addr).await.is_ok()
            && http(seed_addr, "GET", "/healthz", "").await.0 == 200
    })
    .await;
    wait_until("our node is ready", || async { handle.is_ready() }).await;

    let mut on_ours = connect(&ours.ws_url("/ws?room=42")).await;
    let mut on_seed = connect(&format!("ws://{seed_addr}/ws?room=42")).await;
    wait_until("both nodes subscribed to ws:room:42", || async {
        redis.numsub("ws:room:42") == 2 && handle.stats().subscriptions == 1
    })
    .await;

    send_text(&mut on_ours, r#"{"from":"rust","n":1}"#).await;
    for ws in [&mut on_ours, &mut on_seed] {
        assert_eq!(
            json_of(&recv_text(ws, "our message").await),
            json!({"from": "rust", "n": 1})
        );
    }
    send_text(&mut on_seed, r#"{"from":"node","n":2}"#).await;
    for ws in [&mut on_ours, &mut on_seed] {
        assert_eq!(
            json_of(&recv_text(ws, "the seed's message").await),
            json!({"from": "node", "n": 2})
        );
    }
    // Our HTTP push reaches the seed's sockets too.
    let (status, body) = http(
        ours.addr,
        "POST",
        "/rooms/42/messages",
        r#"{"from":"http"}"#,
    )
    .await;
    assert_eq!((status, json_of(&body)["nodes"].as_u64()), (200, Some(2)));
    for ws in [&mut on_ours, &mut on_seed] {
        assert_eq!(
            json_of(&recv_text(ws, "pushed").await),
            json!({"from": "http"})
        );
    }
    assert_eq!(handle.stats().malformed, 0, "the seed's envelopes decode");
}
