//! The chat's "Users" part (PROTOCOL.md part 2, "Users"): direct messages and fleet-wide disconnects
//! from plain HTTP, the socket's user and expiring credentials from `GET /ws`, and the
//! `fanout.refresh` frame.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum_fanout::presence::Member;
use axum_fanout::{FanoutSocket, Payload, RoomHandle};
use serde_json::{Value, json};

/// Longest reason `POST /users/{user}/disconnect` takes, in bytes.
const MAX_REASON: usize = 100;

/// The most `expires_in` may say: a day.
const MAX_EXPIRES_IN: u64 = 86_400;

/// What `GET /ws` says of the socket's user: `user=USER` and `expires_in=S`, both checked
/// before the upgrade (400 otherwise).
pub(crate) struct Identity {
    pub(crate) user: Option<String>,
    pub(crate) expires_in: Option<Duration>,
}

/// Reads `user=` and `expires_in=` from the upgrade's query; `Err` is why to answer 400.
pub(crate) fn identity(query: &HashMap<String, String>) -> Result<Identity, String> {
    let user = match query.get("user").filter(|u| !u.is_empty()) {
        Some(user) => match Member::new(user.as_str()) {
            Ok(_) => Some(user.clone()),
            Err(e) => return Err(reason_of(&e)),
        },
        None => None,
    };
    let expires_in = match query.get("expires_in") {
        Some(s) => Some(expiry(s)?),
        None => None,
    };
    Ok(Identity { user, expires_in })
}

/// `S`: whole seconds from 1 to a day.
fn expiry(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .and_then(seconds)
        .ok_or_else(|| {
            format!("expires_in must be whole seconds from 1 to {MAX_EXPIRES_IN}, not {s:?}")
        })
}

/// `n` seconds, when within 1 to a day.
fn seconds(n: u64) -> Option<Duration> {
    (1..=MAX_EXPIRES_IN)
        .contains(&n)
        .then(|| Duration::from_secs(n))
}

/// Names the socket's user and sets its expiry; `Err` once the socket has been closed.
pub(crate) async fn attach(socket: &mut FanoutSocket, identity: &Identity) -> Result<(), ()> {
    if let Some(user) = &identity.user
        && let Err(e) = socket.identify(user).await
    {
        tracing::warn!(error = %e, "could not subscribe the socket's user");
        socket.close(1011, "redis unavailable, try again later");
        return Err(());
    }
    if let Some(after) = identity.expires_in
        && socket.expire_in(after).is_err()
    {
        return Err(()); // closing already
    }
    Ok(())
}

/// A `{"type":"fanout.refresh","expires_in":S}` frame: the answer to send back, or `None`
/// when the frame is no refresh (then it is a chat message).
pub(crate) fn refresh(socket: &FanoutSocket, text: &str) -> Option<Value> {
    // Only frames that may be a refresh are parsed twice: chat messages stay on the fast path.
    if !text.contains("fanout.refresh") {
        return None;
    }
    let frame: Value = serde_json::from_str(text).ok()?;
    if frame.get("type").and_then(Value::as_str) != Some("fanout.refresh") {
        return None;
    }
    let requested = frame.get("expires_in");
    let checked = requested
        .and_then(Value::as_u64)
        .and_then(seconds)
        .ok_or_else(|| format!("expires_in must be whole seconds from 1 to {MAX_EXPIRES_IN}"));
    Some(match checked {
        Ok(after) => match socket.expire_in(after) {
            Ok(()) => json!({ "type": "fanout.refreshed", "expires_in": after.as_secs() }),
            Err(e) => json!({ "type": "fanout.refreshed", "error": e.to_string() }),
        },
        Err(why) => json!({ "type": "fanout.refreshed", "error": why }),
    })
}

/// `POST /users/{user}/messages`: every socket of USER on every node gets
/// `{"type":"fanout.direct","payload":V}`; answers `{"nodes":N}`.
pub(crate) async fn direct(Path(user): Path<String>, rooms: RoomHandle, body: String) -> Response {
    let Ok(payload) = Payload::raw_json(body) else {
        return bad_request("body must be one JSON value");
    };
    // The node frames it: `{"type":"fanout.direct","payload":V}`.
    answer(rooms.send_to_user(&user, payload).await)
}

/// `POST /users/{user}/disconnect` with an empty body or `{"reason":TEXT}` (at most 100
/// bytes): every socket of USER on every node closed with 4000 and the reason.
pub(crate) async fn disconnect(
    Path(user): Path<String>,
    rooms: RoomHandle,
    body: String,
) -> Response {
    let reason = if body.trim().is_empty() {
        axum_fanout::close::DISCONNECTED_REASON.to_owned()
    } else {
        let parsed: Result<HashMap<String, String>, _> = serde_json::from_str(&body);
        match parsed {
            Ok(mut fields) if fields.len() <= 1 => match fields.remove("reason") {
                Some(reason) if reason.len() <= MAX_REASON => reason,
                Some(_) => {
                    return bad_request(&format!("reason is at most {MAX_REASON} bytes"));
                }
                None if fields.is_empty() => axum_fanout::close::DISCONNECTED_REASON.to_owned(),
                None => return bad_request(r#"body must be empty or {"reason":TEXT}"#),
            },
            _ => return bad_request(r#"body must be empty or {"reason":TEXT}"#),
        }
    };
    answer(rooms.disconnect_user(&user).reason(reason).await)
}

/// `{"nodes":N}`, 400 for what the caller must fix, 503 when Redis could not answer.
fn answer(result: Result<usize, axum_fanout::Error>) -> Response {
    match result {
        Ok(nodes) => Json(json!({ "nodes": nodes })).into_response(),
        Err(e) if e.is_invalid_member() || e.is_invalid_argument() || e.is_invalid_payload() => {
            bad_request(&reason_of(&e))
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

fn reason_of(e: &axum_fanout::Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string)
}

pub(crate) fn bad_request(why: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
}
