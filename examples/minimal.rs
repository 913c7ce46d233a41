//! The README's quickstart: one room-aware WebSocket endpoint and one HTTP push endpoint.
//!
//! ```sh
//! PORT=3000 cargo run --example minimal    # and again with PORT=3001 in another terminal
//! ```
//!
//! Environment: `PORT` (default 3000), `REDIS_URL` (default `redis://127.0.0.1:6379`).

use axum::Router;
use axum::extract::Path;
use axum::extract::ws::{Message, WebSocketUpgrade, close_code};
use axum::response::Response;
use axum::routing::{get, post};
use axum_fanout::{FanoutLayer, Payload, RoomHandle};

async fn ws_handler(Path(room): Path<String>, ws: WebSocketUpgrade, rooms: RoomHandle) -> Response {
    rooms.on_upgrade(ws, |mut socket| async move {
        if let Err(e) = socket.join(&room).await {
            return socket.close(close_code::ERROR, &e.to_string());
        }
        while let Some(Ok(Message::Text(text))) = socket.recv().await {
            // JSON travels as the envelope's `payload`, which seed (Node.js) nodes deliver too.
            let Ok(payload) = Payload::raw_json(text.as_str()) else {
                return socket.close(close_code::INVALID, "send one JSON value per frame");
            };
            // Goes through Redis: every socket in `room`, on every node, gets it once.
            let _ = socket.broadcast(&room, payload).await;
        }
    })
}

async fn http_push(Path(room): Path<String>, rooms: RoomHandle, body: String) -> String {
    let Ok(payload) = Payload::raw_json(body) else {
        return "not sent: the body must be one JSON value\n".to_owned();
    };
    match rooms.broadcast(&room, payload).await {
        // The nodes that got it live: 0 when no socket holds the room, even though a durable
        // room's message is stored all the same (`Broadcast`'s "Zero nodes").
        Ok(nodes) => format!("sent to {nodes} node(s)\n"),
        Err(e) => format!("not sent: {e}\n"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());

    let fanout = FanoutLayer::builder(redis_url).build()?;
    let rooms = fanout.handle();
    let app = Router::new()
        .route("/ws/{room}", get(ws_handler))
        .route("/rooms/{room}/messages", post(http_push))
        .layer(fanout);
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on ws://{}/ws/<room>", listener.local_addr()?);
    // TCP_NODELAY on every connection, and a graceful shutdown on Ctrl-C.
    axum::serve(rooms.listener(listener), app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            rooms.shutdown().await;
        })
        .await?;
    Ok(())
}
