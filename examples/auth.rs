//! Authorization: who may connect, and which rooms each user may join.
//!
//! ```sh
//! cargo run --example auth
//! # then, with any WebSocket client (browsers cannot set headers on a WebSocket, hence ?token=):
//! #   ws://127.0.0.1:3000/ws?room=general&token=alice-token   -> joins
//! #   ws://127.0.0.1:3000/ws?room=staff&token=bob-token       -> closed with 1008
//! #   ws://127.0.0.1:3000/ws?room=general                     -> 401, no upgrade
//! curl -H 'authorization: Bearer alice-token' -d '{"x":1}' http://127.0.0.1:3000/rooms/general/messages
//! ```
//!
//! Environment: `PORT` (default 3000), `REDIS_URL` (default `redis://127.0.0.1:6379`).
//!
//! The pattern:
//! 1. authenticate **before** the upgrade: a handler that returns 401 never upgrades, so an
//!    anonymous client costs one HTTP request, not a socket;
//! 2. authorize each room **before** `join`: a refused room closes the socket with 1008 (policy
//!    violation) and a reason, and nothing was subscribed;
//! 3. check plain-HTTP pushes the same way (403 for a room the caller may not post to).
//!
//! The token table is a stand-in for whatever the application uses (JWT, session store).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{Message, WebSocketUpgrade, close_code};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_fanout::{FanoutLayer, Payload, RoomHandle};

/// Who a token belongs to and which rooms they may use.
#[derive(Debug, Clone)]
pub(crate) struct User {
    name: &'static str,
    /// Rooms this user may join and post to; `*` means any room.
    rooms: &'static [&'static str],
}

impl User {
    fn may_use(&self, room: &str) -> bool {
        self.rooms.iter().any(|r| *r == "*" || *r == room)
    }
}

/// token -> user. In a real application: verify a signed token or look up a session.
pub(crate) type Users = Arc<HashMap<&'static str, User>>;

pub(crate) fn demo_users() -> Users {
    Arc::new(HashMap::from([
        (
            "alice-token",
            User {
                name: "alice",
                rooms: &["*"],
            },
        ),
        (
            "bob-token",
            User {
                name: "bob",
                rooms: &["general", "random"],
            },
        ),
    ]))
}

/// The bearer token from `Authorization: Bearer ..` or, for browsers, `?token=`.
fn token<'a>(headers: &'a HeaderMap, query: &'a HashMap<String, String>) -> Option<&'a str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| query.get("token").map(String::as_str))
}

/// The user behind the request's token, or the 401 to answer.
fn authenticate(
    users: &Users,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<User, (StatusCode, &'static str)> {
    let Some(token) = token(headers, query) else {
        return Err((StatusCode::UNAUTHORIZED, "missing bearer token\n"));
    };
    users
        .get(token)
        .cloned()
        .ok_or((StatusCode::UNAUTHORIZED, "unknown token\n"))
}

async fn ws(
    upgrade: WebSocketUpgrade,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(users): State<Users>,
    rooms: RoomHandle,
) -> Response {
    // 1. Authenticate before upgrading.
    let user = match authenticate(&users, &headers, &query) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    let room = query
        .get("room")
        .cloned()
        .unwrap_or_else(|| "general".into());
    rooms.on_upgrade(upgrade, move |mut socket| async move {
        // 2. Authorize the room before joining it.
        if !user.may_use(&room) {
            return socket.close(
                close_code::POLICY,
                &format!("{} may not join room {room:?}", user.name),
            );
        }
        if let Err(e) = socket.join(&room).await {
            return socket.close(
                if e.is_invalid_room() {
                    close_code::POLICY
                } else {
                    close_code::ERROR
                },
                &e.to_string(),
            );
        }
        while let Some(Ok(Message::Text(text))) = socket.recv().await {
            let Ok(payload) = Payload::raw_json(text.as_str()) else {
                return socket.close(close_code::INVALID, "frame is not valid JSON");
            };
            let _ = socket.broadcast(&room, payload).await;
        }
    })
}

async fn push(
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(users): State<Users>,
    rooms: RoomHandle,
    body: String,
) -> Response {
    let user = match authenticate(&users, &headers, &query) {
        Ok(user) => user,
        Err(refusal) => return refusal.into_response(),
    };
    // 3. The same room rule for plain HTTP.
    if !user.may_use(&room) {
        return (
            StatusCode::FORBIDDEN,
            format!("{} may not post to {room:?}\n", user.name),
        )
            .into_response();
    }
    let Ok(payload) = Payload::raw_json(body) else {
        return (StatusCode::BAD_REQUEST, "body must be one JSON value\n").into_response();
    };
    match rooms.broadcast(&room, payload).await {
        Ok(nodes) => format!("sent to {nodes} node(s)\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

pub(crate) fn app(layer: FanoutLayer, users: Users) -> Router {
    Router::new()
        .route("/ws", get(ws))
        .route("/rooms/{room}/messages", post(push))
        .with_state(users)
        .layer(layer)
}

#[allow(dead_code)] // the tests include this file for `app` and `demo_users` only
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let app = app(FanoutLayer::builder(redis_url).build()?, demo_users());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!(
        "listening on ws://{}/ws?room=general&token=alice-token",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}
