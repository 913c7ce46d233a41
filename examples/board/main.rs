//! A live board fed by HTTP pushes, read through the fanout protocol and its JavaScript
//! client: not a chat. A service `POST`s updates; every open page shows the last 20 and then
//! each new one, across nodes, resuming across reconnects without showing anything twice, and
//! saying so when updates may be missing.
//!
//! ```sh
//! PORT=3000 cargo run --example board     # and PORT=3001 in another terminal: one fleet
//! # open http://127.0.0.1:3000/?board=ops and http://127.0.0.1:3001/?board=ops, then:
//! curl -X POST -d '{"level":"warn","text":"disk 91%"}' http://127.0.0.1:3000/boards/ops
//! ```
//!
//! Environment: `PORT` (default 3000), `REDIS_URL` (default `redis://127.0.0.1:6379`).

mod app;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let layer = match app::layer(&url) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("board: REDIS_URL: {e}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("board: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(2);
        }
    };
    println!("board on http://127.0.0.1:{port}/?board=ops");
    if let Err(e) = axum::serve(listener, app::app(layer)).await {
        eprintln!("board: {e}");
    }
}
