//! The whole thing in one command: three chat nodes in one process, sharing one Redis.
//!
//! ```sh
//! cargo run --example demo
//! # then open two of the printed addresses in two browser tabs, same room, and chat
//! ```
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`); when nothing answers there,
//! the demo starts a private `redis-server` on a free port (if one is installed) and stops it
//! on exit. `DEMO_PORT` (default 3001): the first node's port, the others follow; a busy port
//! falls back to any free one. `RUST_LOG` (default `info`).
//!
//! Every room is durable (its last 256 messages kept for 10 minutes: a page that reconnects
//! gets what it missed, and a page that joins sees the recent past) and tracks presence (who
//! is in the room, on any node), as the chat example does with `HISTORY=256 PRESENCE=1`.

mod chat_app;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    if let Err(e) = chat_app::install_metrics() {
        eprintln!("{e}");
    }

    let configured = std::env::var("REDIS_URL").ok();
    let url = configured
        .clone()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let (url, _private) = if answers(&url).await {
        (url, None)
    } else {
        match PrivateRedis::start().await {
            Ok(private) => {
                println!(
                    "Nothing answers at {url}; started a private redis-server at {}",
                    private.url()
                );
                (private.url(), Some(private))
            }
            Err(why) => {
                eprintln!("demo: nothing answers at {url}, and {why}.");
                eprintln!(
                    "demo: install Redis (Debian/Ubuntu: `sudo apt-get install redis-server`, \
                     macOS: `brew install redis`) or set REDIS_URL to a Redis that is running."
                );
                std::process::exit(1);
            }
        }
    };
    let first_port: u16 = std::env::var("DEMO_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3001);

    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut servers = Vec::new();
    let mut first_addr = None;
    println!();
    for i in 0..3u16 {
        let layer = axum_fanout::FanoutLayer::builder(url.clone())
            .node_id(format!("demo-{}", i + 1))
            .durable(axum_fanout::durable::Durability::default())
            .presence(true)
            .build()
            .unwrap_or_else(|e| exit(&format!("REDIS_URL {url}: {e}")));
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", first_port + i)).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap_or_else(|e| exit(&format!("cannot listen on 127.0.0.1: {e}"))),
        };
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| exit(&format!("no local address: {e}")));
        println!("  node demo-{}: http://{addr}", i + 1);
        first_addr.get_or_insert(addr);
        let mut stop = stop_tx.subscribe();
        let handle = layer.handle();
        servers.push(tokio::spawn(chat_app::serve_app(
            handle.listener(listener),
            chat_app::app(layer),
            async move {
                let _ = stop.recv().await;
                handle.shutdown().await;
            },
        )));
    }
    let port = url
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .unwrap_or(6379);
    println!(
        "\nOpen two of them in two tabs, join the same room, and chat across nodes.\n\
         Watch the bus:   redis-cli -p {port} PUBSUB CHANNELS 'ws:room:*'\n\
         \x20                redis-cli -p {port} PUBSUB NUMSUB ws:room:lobby\n\
         Push from Redis: redis-cli -p {port} PUBLISH ws:room:lobby '{{\"payload\":{{\"type\":\"ping\"}}}}'\n\
         Push from HTTP:  curl -d '{{\"type\":\"chat\",\"user\":\"ops\",\"text\":\"deployed\"}}' http://{0}/rooms/lobby/messages\n\
         \x20                (the page shows {{\"type\":\"chat\",\"user\",\"text\"}} as a chat line, any other JSON as data)\n\
         Who is there:    curl http://{0}/rooms/lobby/presence\n\
         Recent history:  curl http://{0}/rooms/lobby/history?limit=10\n\
         Many rooms, one socket (the page is the fanout protocol's JS client): http://{0}/?rooms=lobby,news&user=ada\n\
         To a user (name yourself in the page first): curl -d '{{\"text\":\"psst\"}}' http://{0}/users/ada/messages\n\
         \x20                curl -d '{{\"reason\":\"logged out\"}}' http://{0}/users/ada/disconnect\n\
         Ctrl-C stops everything.\n",
        first_addr.map_or_else(String::new, |a| a.to_string())
    );
    // Ctrl-C or SIGTERM: either way the private redis-server must be stopped on the way out.
    chat_app::shutdown_signal().await;
    println!("stopping…");
    let _ = stop_tx.send(());
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(8), server).await;
    }
}

/// Whether a Redis answers PING at `url` within a second.
async fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Some(_))
    )
}

/// A `redis-server` child on a free port, stopped when dropped.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    async fn start() -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port for a private redis-server: {e}"))?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("`redis-server` could not be started ({e})"))?;
        let redis = Self { child, port };
        for _ in 0..100 {
            if answers(&redis.url()).await {
                return Ok(redis);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the private redis-server did not answer PING within 5 s".into())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exit(msg: &str) -> ! {
    eprintln!("demo: {msg}");
    std::process::exit(2)
}
