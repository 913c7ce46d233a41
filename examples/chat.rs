//! One chat node, speaking the chat example's wire format and the fanout protocol (both in
//! `PROTOCOL.md`).
//!
//! ```sh
//! PORT=3001 NODE_ID=n1 cargo run --example chat
//! PORT=3002 NODE_ID=n2 cargo run --example chat   # in another terminal
//! # open http://127.0.0.1:3001 and http://127.0.0.1:3002 and chat across them
//! ```
//!
//! On Redis Sentinel, give the sentinels and the master's name instead of `REDIS_URL`:
//!
//! ```sh
//! SENTINEL_URL=redis+sentinel://127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381/mymaster \
//!     PORT=3001 cargo run --example chat
//! ```
//!
//! Environment: `PORT` (default 3000), `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! `SENTINEL_URL` (`redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER`, replaces `REDIS_URL`:
//! the node asks the sentinels for the master and follows a failover),
//! `NODE_ID` (default random), `CHANNEL_PREFIX` (default `ws:room:`), `SHARD_COUNT`
//! (default 1), `HISTORY` (default 0; N > 0 makes every room durable, keeping at least its
//! last N messages), `HISTORY_TTL_S` (default 600), `PRESENCE` (`1`: members, join and leave
//! notices, `GET /rooms/NAME/presence`), `PRESENCE_TTL_S` (default 30: how long a crashed
//! node's members stay listed), `RUST_LOG` (default `info`). Outside the contract: `REDIS_CLUSTER`
//! (comma-separated node URLs of a Redis Cluster, used instead of `REDIS_URL`; needs
//! `--features cluster`) and `FLUSH_INTERVAL_MS` (the writer's flush interval).

mod chat_app;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let port: u16 = match std::env::var("PORT").map(|p| p.parse()) {
        Err(_) => 3000,
        Ok(Ok(port)) => port,
        Ok(Err(e)) => exit(&format!("PORT must be a port number: {e}")),
    };
    chat_app::install_metrics().unwrap_or_else(|e| exit(&e));
    let layer = chat_app::layer_from_env().unwrap_or_else(|e| exit(&e));
    let node_id = layer.handle().node_id().to_owned();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| exit(&format!("cannot listen on 127.0.0.1:{port}: {e}")));
    tracing::info!(node = %node_id, "chat node listening on http://127.0.0.1:{port}");
    let handle = layer.handle();
    let shutdown = async move {
        chat_app::shutdown_signal().await;
        // Close every socket with 1001 and unsubscribe before the server stops.
        handle.shutdown().await;
    };
    let listener = layer.handle().listener(listener);
    if let Err(e) = chat_app::serve_app(listener, chat_app::app(layer), shutdown).await {
        exit(&format!("server error: {e}"));
    }
}

fn exit(msg: &str) -> ! {
    eprintln!("chat: {msg}");
    std::process::exit(2)
}
