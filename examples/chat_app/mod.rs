//! The chat application shared by `examples/chat.rs` (one node per process) and
//! `examples/demo.rs` (three nodes in one process). It speaks two wire formats, both in
//! `PROTOCOL.md` at the repository's root: the fanout protocol at `GET /fanout` (part 1: many
//! rooms per socket, for `clients/js`), and at `GET /ws` the chat example's own format (part
//! 2, one room per socket), which other checks depend on and which stays as it is:
//!
//! - `GET /` serves the chat page (`/?room=team&user=dana`, `/?rooms=a,b`), built on the
//!   fanout protocol's client (`GET /fanout.js`): several rooms over one socket, resumed after
//!   a reload, their members, and a note in a room's log when messages may be missing
//!   (`GET /rooms?..` redirects there, keeping its query);
//! - `GET /ws?room=NAME` joins room NAME (default `lobby`); each text frame must be one JSON
//!   value and is broadcast to every socket of the room on every node, the sender included;
//!   a frame that is not JSON closes that connection with 1007, a frame over the size limit
//!   with 1009, an invalid room name with 1008, a binary frame with 1003;
//! - `POST /rooms/{room}/messages` broadcasts its JSON body from plain HTTP;
//! - with `HISTORY=N` (N > 0) every room is durable (PROTOCOL.md, part 2, "Durable rooms"):
//!   `GET /ws?room=NAME&positions=1[&since=E:S]` numbers deliveries and resumes, and
//!   `GET /rooms/{room}/history?limit=K[&since=E:S]` reads the room's history;
//! - `GET /healthz` is 200 when the node's Redis link is up, 503 otherwise;
//! - `GET /stats` returns the node's counters as JSON;
//! - a client frame is queued as a broadcast without waiting for Redis (its order holds);
//!   when one fails later the client gets `{"type":"fanout.unsent","room":NAME,"reason":..}`;
//! - with presence (`PRESENCE=1`): `GET /ws?room=NAME&user=USER` joins as member USER (default:
//!   a per-socket id), every socket of the room gets `fanout.join` / `fanout.leave` notices,
//!   and `GET /rooms/{room}/presence` lists the members of every live node. Once the socket is
//!   counted and subscribed it gets `{"type":"fanout.member","room":NAME,"user":USER}` (its
//!   own user id): a list fetched after that, plus the notices newer than its `version`, is
//!   exact.
//! - users (`users`): `GET /ws?..&user=USER[&expires_in=S]` names the socket's user (and when
//!   its credentials expire: closed with 4001 unless a `{"type":"fanout.refresh",
//!   "expires_in":S}` frame moves it), `POST /users/{user}/messages` sends its JSON body to
//!   every socket of USER as `{"type":"fanout.direct","payload":V}`, and
//!   `POST /users/{user}/disconnect` closes them all with 4000.

mod users;

use std::collections::HashMap;
use std::num::NonZeroU32;

use axum::Json;
use axum::Router;
use axum::extract::ws::{Message, WebSocketUpgrade, close_code};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_fanout::durable::{Durability, Position};
use axum_fanout::presence::Member;
use axum_fanout::protocol::{Permissive, Protocol};
use axum_fanout::{Event, FanoutLayer, FanoutSocket, Missed, Payload, RoomHandle, RoomName};

/// The chat app's routes, wrapped in `layer`.
pub(crate) fn app(layer: FanoutLayer) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(ws))
        // The fanout protocol (PROTOCOL.md): many rooms per socket, replies by id, resume and
        // presence, for `clients/js`. A demo: every user may join and publish anywhere.
        .route("/fanout", Protocol::new(Permissive).route())
        .route("/rooms", get(rooms_page))
        .route("/fanout.js", get(client_module))
        .route("/rooms/{room}/messages", post(http_push))
        .route("/rooms/{room}/presence", get(presence))
        .route("/rooms/{room}/history", get(history))
        .route("/users/{user}/messages", post(users::direct))
        .route("/users/{user}/disconnect", post(users::disconnect))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .layer(layer)
}

/// The process's Prometheus recorder, once installed by [`install_metrics`].
static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs a Prometheus recorder as the process's `metrics` recorder, so that `GET /metrics`
/// serves every counter, gauge and histogram the library reports. Call it before building
/// the layer. Process-wide: the demo's three nodes in one process add up.
pub(crate) fn install_metrics() -> Result<(), String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    let _ = METRICS.set(handle);
    Ok(())
}

/// `GET /metrics`: Prometheus's text format (404 when no recorder was installed). The node's
/// gauges are reported when its stats are read: read them first, so the scrape is current.
async fn metrics(rooms: RoomHandle) -> Response {
    let _ = rooms.stats();
    match METRICS.get() {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder installed\n").into_response(),
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// `GET /rooms?rooms=a,b&user=NAME`: where the many-rooms page was before the chat page at `/`
/// did the same; old links land there.
async fn rooms_page(uri: axum::http::Uri) -> Redirect {
    match uri.query() {
        Some(query) => Redirect::to(&format!("/?{query}")),
        None => Redirect::to("/"),
    }
}

/// `GET /fanout.js`: the client module (`clients/js`).
async fn client_module() -> Response {
    let js = include_str!("../../clients/js/fanout.js");
    ([("content-type", "text/javascript; charset=utf-8")], js).into_response()
}

async fn healthz(rooms: RoomHandle) -> Response {
    if rooms.is_ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "redis not ready\n").into_response()
    }
}

async fn stats(rooms: RoomHandle) -> Response {
    let mut body = serde_json::to_value(rooms.stats()).unwrap_or_default();
    body["node_id"] = rooms.node_id().into();
    body["ready"] = rooms.is_ready().into();
    Json(body).into_response()
}

async fn http_push(Path(room): Path<String>, rooms: RoomHandle, body: String) -> Response {
    let payload = match Payload::raw_json(body) {
        Ok(p) => p,
        Err(_) => {
            return (StatusCode::BAD_REQUEST, "body must be one JSON value\n").into_response();
        }
    };
    match rooms.broadcast(&room, payload).await {
        Ok(nodes) => Json(serde_json::json!({ "nodes": nodes })).into_response(),
        Err(e) => failure(&e),
    }
}

/// The answer to a request the node could not serve: 400 with the rule a bad room name broke,
/// 503 when Redis could not answer.
fn failure(e: &axum_fanout::Error) -> Response {
    if e.is_invalid_room() {
        let reason = std::error::Error::source(e).map(ToString::to_string);
        return (
            StatusCode::BAD_REQUEST,
            format!("{}\n", reason.unwrap_or_default()),
        )
            .into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn ws(
    upgrade: WebSocketUpgrade,
    Query(query): Query<HashMap<String, String>>,
    rooms: RoomHandle,
) -> Response {
    let room = query.get("room").map_or("lobby", String::as_str).to_owned();
    let identity = match users::identity(&query) {
        Ok(identity) => identity,
        Err(why) => return users::bad_request(&why),
    };
    let user = identity.user.clone();
    let node = rooms.node_id().to_owned();
    // `positions=1` (and `since=E:S`) only mean something in a durable room (HISTORY > 0).
    let positions = query.get("positions").is_some_and(|p| p == "1");
    // A `since` that does not parse names no history of this room: not recovered.
    let since = query
        .get("since")
        .map(|s| s.parse().unwrap_or_else(|_| Position::new(s.as_str(), 0)));
    let join = Join {
        room,
        user,
        node,
        positions,
        since,
        identity,
    };
    rooms.on_upgrade(upgrade, move |socket| serve(socket, join))
}

/// What the client asked for in `GET /ws`.
struct Join {
    room: String,
    user: Option<String>,
    node: String,
    positions: bool,
    since: Option<Position>,
    identity: users::Identity,
}

/// Joins the socket to its room (durable or plain, as a presence member or not); returns the
/// room, or `None` once the socket has been closed with the reason.
async fn join_room(socket: &mut FanoutSocket, join: Join) -> Option<RoomName> {
    let Join {
        room,
        user,
        node,
        positions,
        since,
        identity,
    } = join;
    // The user first: a message sent to them once the room's notice arrived reaches them.
    users::attach(socket, &identity).await.ok()?;
    let room = match RoomName::new(&room) {
        Ok(room) => room,
        Err(e) => {
            socket.close(close_code::POLICY, &e.to_string());
            return None;
        }
    };
    // With presence the socket joins as a member (a per-socket id when no user is given);
    // without, `join_as` says so at once and the plain join stands.
    let user = user.unwrap_or_else(|| format!("guest-{node}-{}", socket.id()));
    let member = match Member::new(user) {
        Ok(member) => member,
        Err(e) => {
            let reason = std::error::Error::source(&e).map(ToString::to_string);
            socket.close(close_code::POLICY, &reason.unwrap_or_default());
            return None;
        }
    };
    let joined = if positions {
        match socket.join_durable(&room, since).await {
            // The node queued the fanout.position / fanout.resumed notice first.
            Ok(_) => Ok(()),
            Err(e) if e.is_not_durable() => socket.join(&room).await,
            Err(e) => Err(e),
        }
    } else {
        socket.join(&room).await
    };
    let joined = match joined {
        Ok(()) => match socket.join_as(&room, &member).await {
            // Counted, and subscribed: tell the client its user id (it may be a default one),
            // and that a presence list it asks for from now on is followed by every later
            // notice.
            Ok(()) => socket.send(serde_json::json!({
                "type": "fanout.member",
                "room": room.as_str(),
                "user": member.user(),
            })),
            Err(e) if e.is_presence_off() => Ok(()),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = joined {
        tracing::warn!(room = %room, error = %e, "join failed");
        socket.close(close_code::ERROR, "redis unavailable, try again later");
        return None;
    }
    Some(room)
}

async fn serve(mut socket: FanoutSocket, join: Join) {
    // Boxed: a socket's task keeps the size of its largest await for its whole life, and the
    // join (a durable resume, a presence join) is far larger than the loop below, where an
    // idle socket spends that life (README, "Operations": 6.1 -> 5.5 KiB per idle socket).
    let Some(room) = Box::pin(join_room(&mut socket, join)).await else {
        return;
    };
    while let Some(event) = socket.recv_event().await {
        match event {
            Ok(Event::Message(Message::Text(text))) => {
                if let Some(answer) = users::refresh(&socket, text.as_str()) {
                    if socket.send(answer).is_err() {
                        return;
                    }
                    continue;
                }
                let Ok(payload) = Payload::raw_json(text.as_str()) else {
                    return socket.close(close_code::INVALID, "frame is not valid JSON");
                };
                // Queued, not awaited: the client's next frame is read at once while Redis
                // works, and its messages keep their order (fixed when queued). Broadcasting
                // as the socket keeps its messages on one shard of a sharded room, and
                // reports a later failure below.
                if let Err(e) = socket.broadcast(&room, payload).queue().await {
                    tracing::warn!(room = %room, error = %e, "broadcast not queued");
                }
            }
            Ok(Event::BroadcastFailed { room, error, .. }) => {
                // Logged and counted by the node; the client is told too, since it believes
                // its message went out.
                let notice = serde_json::json!({
                    "type": "fanout.unsent",
                    "room": room.as_str(),
                    "reason": error.to_string(),
                });
                if socket.send(notice).is_err() {
                    return;
                }
            }
            Ok(Event::Missed(missed)) => {
                // Tell the client, so it can reload what it missed (README: "Missed messages").
                if socket.send(missed_notice(&missed)).is_err() {
                    return;
                }
            }
            Ok(_) => {
                return socket.close(
                    close_code::UNSUPPORTED,
                    "only JSON text frames are accepted",
                );
            }
            // Over the size limit (the socket already closed itself with 1009) or a transport
            // failure: either way the connection is done.
            Err(_) => return,
        }
    }
}

/// `{"room":NAME,"version":V,"members":[{"user":USER,"connections":N},...]}`, sorted by user;
/// 404 when the node runs without presence.
async fn presence(Path(room): Path<String>, rooms: RoomHandle) -> Response {
    match rooms.presence(&room).await {
        Ok(snapshot) => Json(snapshot).into_response(),
        Err(e) if e.is_presence_off() => {
            (StatusCode::NOT_FOUND, "presence is off (PRESENCE=1)\n").into_response()
        }
        Err(e) => failure(&e),
    }
}

/// `GET /rooms/{room}/history?limit=K` (K default 50) or `?since=E:S`: the room's messages,
/// `{"room":..,"epoch":..,"seq":TOP,"messages":[{"seq":S,"payload":V},...]}`; 409 with
/// `"reason"` when the messages after `since` cannot be read; 404 when history is off.
async fn history(
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    rooms: RoomHandle,
) -> Response {
    let read = match query.get("since") {
        Some(since) => {
            let since = since
                .parse()
                .unwrap_or_else(|_| Position::new(since.as_str(), 0));
            rooms.history_since(&room, &since).await
        }
        None => {
            let limit = query
                .get("limit")
                .and_then(|k| k.parse().ok())
                .unwrap_or(50);
            rooms.history(&room, limit).await
        }
    };
    let history = match read {
        Ok(history) => history,
        Err(e) if e.is_not_durable() => {
            return (StatusCode::NOT_FOUND, "room history is off (HISTORY=0)\n").into_response();
        }
        Err(e) => return failure(&e),
    };
    let position = history.position();
    if let Some(why) = history.failure() {
        let body = serde_json::json!({
            "room": room,
            "reason": why.as_str(),
            "epoch": position.epoch(),
            "seq": position.seq(),
        });
        return (StatusCode::CONFLICT, Json(body)).into_response();
    }
    let messages: Vec<serde_json::Value> = history
        .messages()
        .iter()
        .map(|(seq, payload)| {
            let value = payload
                .as_json()
                .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
                .or_else(|| payload.as_text().map(serde_json::Value::from))
                .unwrap_or_default();
            serde_json::json!({ "seq": seq, "payload": value })
        })
        .collect();
    Json(serde_json::json!({
        "room": room,
        "epoch": position.epoch(),
        "seq": position.seq(),
        "messages": messages,
    }))
    .into_response()
}

/// `{"type":"fanout.missed","room":..,"since":ms,"until":ms,"dropped":n|null}` (`"user"` in
/// place of `"room"` for what was sent to the socket's user).
fn missed_notice(missed: &Missed) -> serde_json::Value {
    if let Some(user) = missed.user() {
        return serde_json::json!({
            "type": "fanout.missed",
            "user": user,
            "since": missed.since_ms(),
            "until": missed.until_ms(),
            "dropped": missed.dropped(),
        });
    }
    serde_json::json!({
        "type": "fanout.missed",
        "room": missed.room().as_str(),
        "since": missed.since_ms(),
        "until": missed.until_ms(),
        "dropped": missed.dropped(),
    })
}

/// Reads the contract's environment variables into a layer.
#[allow(dead_code)] // used by `chat`, not by `demo` (which runs three nodes with fixed ids)
pub(crate) fn layer_from_env() -> Result<FanoutLayer, String> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    // SENTINEL_URL (redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER) replaces REDIS_URL: the
    // node asks the sentinels for the master and follows a failover. Not part of the wire
    // contract: REDIS_CLUSTER (comma-separated node URLs) runs the node on a Redis Cluster
    // with sharded pub/sub instead.
    let (builder, source) = match (set("SENTINEL_URL"), set("REDIS_CLUSTER")) {
        (Some(_), Some(_)) => {
            return Err("set SENTINEL_URL or REDIS_CLUSTER, not both".to_owned());
        }
        (Some(sentinel), None) => {
            let sentinel = sentinel.trim();
            let scheme = sentinel.split_once("://").map_or("", |(s, _)| s);
            if !scheme.eq_ignore_ascii_case("redis+sentinel")
                && !scheme.eq_ignore_ascii_case("rediss+sentinel")
            {
                return Err(
                    "SENTINEL_URL must be redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER \
                     (rediss+sentinel:// for TLS)"
                        .to_owned(),
                );
            }
            (FanoutLayer::builder(sentinel), "SENTINEL_URL")
        }
        (None, Some(nodes)) => (cluster_builder(&nodes)?, "REDIS_CLUSTER"),
        (None, None) => (FanoutLayer::builder(url), "REDIS_URL"),
    };
    // The contract app is driven by load generators that publish thousands of messages per
    // second on one connection: keep the flood guard, well above that.
    let mut builder = builder
        .messages_per_second(NonZeroU32::new(20_000).unwrap_or(NonZeroU32::MIN))
        .message_burst(NonZeroU32::new(20_000).unwrap_or(NonZeroU32::MIN));
    if let Ok(id) = std::env::var("NODE_ID")
        && !id.trim().is_empty()
    {
        builder = builder.node_id(id.trim());
    }
    if let Ok(prefix) = std::env::var("CHANNEL_PREFIX") {
        builder = builder.channel_prefix(prefix);
    }
    if let Ok(shards) = std::env::var("SHARD_COUNT") {
        let shards = shards
            .trim()
            .parse()
            .map_err(|e| format!("SHARD_COUNT must be a whole number from 1 to 65535: {e}"))?;
        builder = builder.shard_count(shards);
    }
    if std::env::var("PRESENCE").is_ok_and(|p| p.trim() == "1") {
        builder = builder.presence(true);
    }
    if let Ok(ttl) = std::env::var("PRESENCE_TTL_S") {
        let secs: u64 = ttl
            .trim()
            .parse()
            .map_err(|e| format!("PRESENCE_TTL_S must be a whole number of seconds: {e}"))?;
        builder = builder.presence_ttl(std::time::Duration::from_secs(secs));
    }
    // HISTORY=N (N > 0) makes every room durable; HISTORY_TTL_S its idle lifetime.
    let history: usize = env_number("HISTORY", 0)?;
    if let Some(n) = std::num::NonZeroUsize::new(history) {
        let ttl = std::time::Duration::from_secs(env_number("HISTORY_TTL_S", 600)?);
        builder = builder.durable(Durability::default().history(n).ttl(ttl));
    }
    // Not part of the wire contract: a tuning knob for benchmarks and operators.
    if let Some(ms) = std::env::var("FLUSH_INTERVAL_MS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        builder = builder.flush_interval(std::time::Duration::from_millis(ms));
    }
    // DRAIN_S: the window a shutdown spreads its sockets' closes over (whole seconds; 0 closes
    // them all at once; default 3).
    if let Ok(drain) = std::env::var("DRAIN_S")
        && !drain.trim().is_empty()
    {
        let secs: u64 = drain
            .trim()
            .parse()
            .map_err(|e| format!("DRAIN_S must be a whole number of seconds: {e}"))?;
        builder = builder.drain_window(std::time::Duration::from_secs(secs));
    }
    // Not part of the wire contract: each socket's queue bound (frames, bytes), for operators
    // whose clients take bursts (a node that wakes from a pause delivers its backlog at once).
    if let Some(frames) = std::num::NonZeroUsize::new(env_number("QUEUE_FRAMES", 0)?) {
        builder = builder.queue_frames(frames);
    }
    if let Some(bytes) = std::num::NonZeroUsize::new(env_number("QUEUE_BYTES", 0)?) {
        builder = builder.queue_bytes(bytes);
    }
    // The error says what is wrong with the url and why.
    builder.build().map_err(|e| format!("{source}: {e}"))
}

/// The whole number in environment variable `name`, or `default` when it is unset.
#[allow(dead_code)] // used by `layer_from_env`, not by `demo`
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| format!("{name} must be a whole number: {e}")),
        _ => Ok(default),
    }
}

#[cfg(feature = "cluster")]
fn cluster_builder(nodes: &str) -> Result<axum_fanout::FanoutBuilder, String> {
    let nodes: Vec<&str> = nodes
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    Ok(FanoutLayer::builder(nodes))
}

#[cfg(not(feature = "cluster"))]
fn cluster_builder(_nodes: &str) -> Result<axum_fanout::FanoutBuilder, String> {
    Err("REDIS_CLUSTER needs the `cluster` feature: \
         cargo run --example chat --features cluster"
        .to_owned())
}

/// Serves `app` on `listener` until `shutdown` resolves. The node's listener sets TCP_NODELAY
/// (small frames must not wait for Nagle) and reports running out of file descriptors in the
/// log and in `/stats` (`accepts_out_of_fds`).
pub(crate) async fn serve_app(
    listener: axum_fanout::FanoutListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or SIGTERM (what process managers send).
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
