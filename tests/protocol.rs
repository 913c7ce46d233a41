//! The fanout protocol (`PROTOCOL.md`, `axum_fanout::protocol`) against real `redis-server`
//! processes and several in-process nodes: one socket in many rooms, replies by id, every
//! error path, the upgrade's refusals (origin, subprotocol, credentials), the application's
//! hooks, idempotent publish across nodes, durable resume and presence.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/board/app.rs"]
mod board_app;
mod support;

use std::num::NonZeroUsize;
use std::time::Duration;

use axum::Router;
use axum::http::request::Parts;
use axum_fanout::durable::Durability;
use axum_fanout::protocol::{Authorize, Denied, Grant, Permissive, Protocol};
use axum_fanout::{FanoutLayer, Payload, RoomName};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{ChatProcess, RedisServer, SOON, TestServer, Ws, chat_binary, start_nodes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A protocol client for tests: commands by id, pushes kept in arrival order.
struct Client {
    ws: Ws,
    next_id: u64,
    pushes: std::collections::VecDeque<Value>,
}

impl Client {
    async fn connect(server: &TestServer, query: &str) -> Self {
        Self::open(server.addr, query).await
    }

    /// Connects to `/fanout{query}` on the node at `addr`.
    async fn open(addr: std::net::SocketAddr, query: &str) -> Self {
        let mut request = format!("ws://{addr}/fanout{query}")
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "fanout.v1".parse().expect("header"),
        );
        let (ws, response) = tokio::time::timeout(SOON, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect in time")
            .expect("upgrade");
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.as_bytes()),
            Some(&b"fanout.v1"[..])
        );
        Self {
            ws,
            next_id: 1,
            pushes: Default::default(),
        }
    }

    async fn frame(&mut self) -> Value {
        let deadline = Instant::now() + SOON;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("timed out waiting for a frame"),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return serde_json::from_str(t.as_str()).expect("every frame is JSON");
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends `command` with the next id and returns its reply; pushes that come first are kept.
    async fn call(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = id.into();
        self.send(&command.to_string()).await;
        self.reply(id).await
    }

    async fn reply(&mut self, id: u64) -> Value {
        loop {
            let frame = self.frame().await;
            if frame["type"] == "reply" && frame["id"] == id {
                return frame;
            }
            assert_ne!(frame["type"], "reply", "a reply to another id: {frame}");
            self.pushes.push_back(frame);
        }
    }

    async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next push of `kind` (earlier pushes of other kinds are skipped).
    async fn push(&mut self, kind: &str) -> Value {
        loop {
            let frame = match self.pushes.pop_front() {
                Some(frame) => frame,
                None => self.frame().await,
            };
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    async fn close_frame(&mut self) -> (u16, String) {
        match support::recv_close(&mut self.ws).await {
            Some(frame) => (frame.code.into(), frame.reason.to_string()),
            None => (0, String::new()),
        }
    }
}

fn error_code(reply: &Value) -> &str {
    reply["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("an error reply: {reply}"))
}

fn layer(redis: &RedisServer) -> FanoutLayer {
    FanoutLayer::builder(redis.url())
        .durable_room(
            "log",
            Durability::default().history(NonZeroUsize::new(100).expect("n")),
        )
        .room_presence("team")
        .max_rooms_per_socket(NonZeroUsize::new(4).expect("n"))
        .max_envelope_bytes(NonZeroUsize::new(2048).expect("n"))
        .build()
        .expect("layer")
}

fn app(layer: FanoutLayer) -> Router {
    Router::new()
        .route("/fanout", Protocol::new(Permissive).route())
        .layer(layer)
}

async fn nodes(redis: &RedisServer, n: usize) -> Vec<TestServer> {
    let layers = (0..n).map(|_| layer(redis));
    start_nodes(layers, app)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[tokio::test]
async fn one_socket_carries_many_rooms_and_every_command_gets_its_reply() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut a = Client::connect(&nodes[0], "?user=ada").await;
    let mut b = Client::connect(&nodes[1], "?user=bob").await;
    for room in ["x", "y"] {
        let r = a.call(json!({"cmd": "join", "room": room})).await;
        assert_eq!(r["result"], json!({"room": room, "durable": false}), "{r}");
    }
    let r = b.call(json!({"cmd": "join", "room": "y"})).await;
    assert!(r["result"].is_object(), "{r}");
    let r = b
        .call(json!({"cmd": "publish", "room": "y", "data": {"n": 1}}))
        .await;
    assert_eq!(r["result"]["nodes"], 2, "{r}");
    let r = b
        .call(json!({"cmd": "publish", "room": "x", "data": "to x"}))
        .await;
    assert_eq!(r["result"]["nodes"], 1, "{r}");
    let m1 = a.push("message").await;
    let m2 = a.push("message").await;
    assert_eq!(
        m1,
        json!({"type": "message", "room": "y", "data": {"n": 1}})
    );
    assert_eq!(m2, json!({"type": "message", "room": "x", "data": "to x"}));
    // The sender gets its own message, framed the same way; not the one to a room it is not in.
    assert_eq!(b.push("message").await["room"], "y");
    let r = a.call(json!({"cmd": "leave", "room": "x"})).await;
    assert_eq!(r["result"], json!({"room": "x", "left": true}));
    let r = a.call(json!({"cmd": "leave", "room": "x"})).await;
    assert_eq!(r["result"]["left"], false);
    b.call(json!({"cmd": "publish", "room": "x", "data": "gone"}))
        .await;
    b.call(json!({"cmd": "publish", "room": "y", "data": "after"}))
        .await;
    assert_eq!(
        a.push("message").await["data"],
        "after",
        "nothing of x after leaving it"
    );
    // Commands whose replies wait for Redis are answered by id, in any order.
    let ids: Vec<u64> = (0..5).map(|i| 100 + i).collect();
    for id in &ids {
        let cmd = json!({"id": id, "cmd": "publish", "room": "y", "data": id});
        a.send(&cmd.to_string()).await;
    }
    for id in ids {
        assert_eq!(a.reply(id).await["result"]["nodes"], 2);
    }
    for id in 100..105 {
        assert_eq!(
            a.push("message").await["data"],
            id,
            "a socket's publishes keep their order"
        );
    }
}

#[tokio::test]
async fn fixable_mistakes_get_error_replies_and_the_socket_stays_open() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 1).await;
    let mut c = Client::connect(&nodes[0], "?user=ada").await;
    c.send(r#"{"cmd":"join","room":"x"}"#).await;
    let r = c.reply(0).await;
    assert_eq!(error_code(&r), "bad_request");
    c.send("[1,2]").await;
    assert_eq!(error_code(&c.reply(0).await), "bad_request");
    let cases = [
        (json!({"cmd": "fly"}), "unknown_command"),
        (json!({"cmd": "join"}), "bad_request"),
        (json!({"cmd": "join", "room": ""}), "invalid_room"),
        (
            json!({"cmd": "join", "room": "x", "since": "e:1"}),
            "not_durable",
        ),
        (
            json!({"cmd": "join", "room": "x", "last": 3}),
            "not_durable",
        ),
        (
            json!({"cmd": "join", "room": "x", "presence": true}),
            "presence_off",
        ),
        (
            json!({"cmd": "join", "room": "x", "since": 5}),
            "bad_request",
        ),
        (json!({"cmd": "history", "room": "x"}), "not_durable"),
        (json!({"cmd": "presence", "room": "x"}), "presence_off"),
        (json!({"cmd": "publish", "room": "x"}), "bad_request"),
        (
            json!({"cmd": "publish", "room": "x", "data": 1, "key": ""}),
            "bad_request",
        ),
        (
            json!({"cmd": "publish", "room": "x", "data": "z".repeat(4000)}),
            "payload_too_large",
        ),
        (
            json!({"cmd": "connect", "token": "bob"}),
            "already_connected",
        ),
        (
            json!({"cmd": "history", "room": "log", "since": "nope:1"}),
            "unrecoverable",
        ),
    ];
    for (command, code) in cases {
        let r = c.call(command.clone()).await;
        assert_eq!(error_code(&r), code, "{command} -> {r}");
    }
    for room in ["a", "b", "c", "d"] {
        c.call(json!({"cmd": "join", "room": room})).await;
    }
    let r = c.call(json!({"cmd": "join", "room": "e"})).await;
    assert_eq!(error_code(&r), "too_many_rooms", "{r}");
    // Still open and working.
    c.call(json!({"cmd": "leave", "room": "d"})).await;
    let r = c
        .call(json!({"cmd": "publish", "room": "a", "data": 1}))
        .await;
    assert_eq!(r["result"]["nodes"], 1, "{r}");
}

#[tokio::test]
async fn a_publish_without_an_id_gets_no_reply_and_a_failure_is_told_with_unsent() {
    let redis = RedisServer::start();
    let quick = FanoutLayer::builder(redis.url())
        .publish_timeout(Duration::from_millis(500))
        .max_envelope_bytes(NonZeroUsize::new(2048).expect("n"))
        .build()
        .expect("layer");
    let node = start_nodes([quick], app).await.remove(0).0;
    let mut c = Client::connect(&node, "?user=ada").await;
    c.call(json!({"cmd": "join", "room": "x"})).await;
    // Sent without ids, then one with: the messages arrive in order, and the only reply is
    // the last one's (`reply` fails on a reply to any other id).
    for n in 1..=3 {
        let unacked = json!({"cmd": "publish", "room": "x", "data": n});
        c.send(&unacked.to_string()).await;
    }
    let r = c
        .call(json!({"cmd": "publish", "room": "x", "data": 4}))
        .await;
    assert_eq!(r["result"]["nodes"], 1, "{r}");
    for n in 1..=4 {
        let m = c.push("message").await;
        assert_eq!(
            (m["room"].as_str(), m["data"].as_u64()),
            (Some("x"), Some(n))
        );
    }
    // Refused at once: told with fanout.unsent, its code and the room as named.
    let cases = [
        (
            json!({"cmd": "publish", "room": "", "data": 1}),
            "invalid_room",
        ),
        (json!({"cmd": "publish", "room": "x"}), "bad_request"),
        (
            json!({"cmd": "publish", "room": "x", "data": 1, "key": "k"}),
            "bad_request",
        ),
        (
            json!({"cmd": "publish", "room": "x", "data": "z".repeat(4000)}),
            "payload_too_large",
        ),
    ];
    for (command, code) in cases {
        c.send(&command.to_string()).await;
        let unsent = c.push("fanout.unsent").await;
        assert_eq!(unsent["code"], code, "{command} -> {unsent}");
        assert_eq!(unsent["room"], command["room"], "{unsent}");
        assert!(unsent["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
    // Only publishes may go without an id.
    c.send(r#"{"cmd":"leave","room":"x"}"#).await;
    assert_eq!(error_code(&c.reply(0).await), "bad_request");
    // Failed after it was queued (Redis frozen past the publish timeout): told once Redis
    // did not answer, with the room; the socket stays open.
    redis.signal("STOP");
    c.send(&json!({"cmd": "publish", "room": "x", "data": 5}).to_string())
        .await;
    let unsent = c.push("fanout.unsent").await;
    redis.signal("CONT");
    assert_eq!(
        (unsent["room"].as_str(), unsent["code"].as_str()),
        (Some("x"), Some("unavailable")),
        "{unsent}"
    );
    // Still open: the next command gets its reply (whatever Redis, thawing, answered).
    let r = c
        .call(json!({"cmd": "publish", "room": "x", "data": 6}))
        .await;
    assert_eq!(r["type"], "reply", "{r}");
}

#[tokio::test]
async fn garbage_and_binary_frames_close_with_a_disconnect_frame_first() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 1).await;
    let mut c = Client::connect(&nodes[0], "?user=ada").await;
    c.send("not json").await;
    let d = c.push("fanout.disconnect").await;
    assert_eq!(
        d,
        json!({"type": "fanout.disconnect", "code": 1007, "reason": "frame is not valid JSON", "reconnect": false})
    );
    assert_eq!(c.close_frame().await.0, 1007);
    let mut c = Client::connect(&nodes[0], "?user=ada").await;
    c.ws.send(Message::binary(vec![1, 2])).await.expect("send");
    assert_eq!(c.push("fanout.disconnect").await["code"], 1003);
    assert_eq!(c.close_frame().await.0, 1003);
}

/// A raw upgrade request: the response's status and body.
async fn upgrade_status(server: &TestServer, path: &str, extra: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        server.addr
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(SOON, tcp.read(&mut buf))
        .await
        .expect("answer")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn the_upgrade_checks_origin_and_subprotocol_before_anything() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 1).await;
    let s = &nodes[0];
    let proto = "Sec-WebSocket-Protocol: fanout.v1\r\n";
    let (status, body) = upgrade_status(
        s,
        "/fanout?user=a",
        &format!("{proto}Origin: http://evil.test\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let same = format!("{proto}Origin: http://{}\r\n", s.addr);
    assert_eq!(upgrade_status(s, "/fanout?user=a", &same).await.0, 101);
    assert_eq!(
        upgrade_status(s, "/fanout?user=a", proto).await.0,
        101,
        "no Origin: not a browser"
    );
    let (status, body) = upgrade_status(s, "/fanout?user=a", "").await;
    assert_eq!(status, 400);
    assert!(body.contains("fanout.v1"), "{body}");
    let (status, body) =
        upgrade_status(s, "/fanout?user=a", "Sec-WebSocket-Protocol: fanout.v2\r\n").await;
    assert_eq!(status, 400);
    assert!(
        body.contains("fanout.v1"),
        "the answer names what the node speaks: {body}"
    );
    // The toolkit path behind the same layer checks Origin too, and allowed_origins widens it.
    let layer = FanoutLayer::builder(redis.url())
        .allowed_origins(["http://app.test"])
        .build()
        .expect("layer");
    let toolkit = start_nodes([layer], support::room_app).await;
    let t = &toolkit[0].0;
    assert_eq!(
        upgrade_status(t, "/ws?room=r", "Origin: http://evil.test\r\n")
            .await
            .0,
        403
    );
    assert_eq!(
        upgrade_status(t, "/ws?room=r", "Origin: http://app.test\r\n")
            .await
            .0,
        101
    );
}

/// Closed by default except what it says: connect by header or token, join all but
/// `secret`, publish only to `open` (with the payload wrapped), refresh with a token.
struct Strict;

impl Authorize for Strict {
    async fn connect(&self, request: &Parts) -> Result<Option<Grant>, Denied> {
        match request.headers.get("x-user").and_then(|v| v.to_str().ok()) {
            Some("mallory") => Err(Denied::new("banned")),
            Some(user) => Ok(Some(Grant::new(user))),
            None => Ok(None),
        }
    }

    async fn connect_token(&self, token: &Value) -> Result<Grant, Denied> {
        match token.as_str() {
            Some("good") => Ok(Grant::new("tok").expires_in(Duration::from_millis(700))),
            _ => Err(Denied::new("bad token")),
        }
    }

    async fn may_join(&self, _user: &str, room: &RoomName) -> Result<(), Denied> {
        if room.as_str() == "secret" {
            Err(Denied::new("no"))
        } else {
            Ok(())
        }
    }

    async fn may_publish(
        &self,
        user: &str,
        room: &RoomName,
        payload: Payload,
    ) -> Result<Payload, Denied> {
        if room.as_str() != "open" {
            return Err(Denied::new("read only"));
        }
        let inner: Value =
            serde_json::from_str(payload.as_json().unwrap_or("null")).unwrap_or_default();
        Payload::json(&json!({"from": user, "body": inner})).map_err(|e| Denied::new(e.to_string()))
    }

    async fn refresh(&self, _user: &str, token: &Value) -> Result<Option<Duration>, Denied> {
        match token.as_str() {
            Some("again") => Ok(Some(Duration::from_millis(700))),
            _ => Err(Denied::new("bad token")),
        }
    }
}

#[tokio::test]
async fn the_application_decides_who_connects_and_what_they_may_do() {
    let redis = RedisServer::start();
    let layer = layer(&redis);
    let strict = |layer: FanoutLayer| {
        Router::new()
            .route("/fanout", Protocol::new(Strict).route())
            .layer(layer)
    };
    let nodes = start_nodes([layer], strict).await;
    let s = &nodes[0].0;
    let proto = "Sec-WebSocket-Protocol: fanout.v1\r\n";
    let (status, body) = upgrade_status(s, "/fanout", &format!("{proto}x-user: mallory\r\n")).await;
    assert_eq!(status, 401);
    assert!(body.contains("banned"), "{body}");
    // No credentials in the request: only connect is accepted, with a good token.
    let mut c = Client::connect(s, "").await;
    let r = c.call(json!({"cmd": "join", "room": "open"})).await;
    assert_eq!(error_code(&r), "not_connected");
    let r = c.call(json!({"cmd": "connect", "token": "bad"})).await;
    assert_eq!(error_code(&r), "not_allowed");
    let r = c.call(json!({"cmd": "connect", "token": "good"})).await;
    assert_eq!(r["result"]["user"], "tok", "{r}");
    let r = c.call(json!({"cmd": "join", "room": "secret"})).await;
    assert_eq!(error_code(&r), "not_allowed");
    let r = c.call(json!({"cmd": "history", "room": "secret"})).await;
    assert_eq!(error_code(&r), "not_allowed");
    c.call(json!({"cmd": "join", "room": "open"})).await;
    let r = c
        .call(json!({"cmd": "publish", "room": "closed", "data": 1}))
        .await;
    assert_eq!(error_code(&r), "not_allowed");
    c.call(json!({"cmd": "publish", "room": "open", "data": 7}))
        .await;
    assert_eq!(
        c.push("message").await["data"],
        json!({"from": "tok", "body": 7}),
        "rewritten"
    );
    // Refresh moves the expiry; a bad one leaves it; then it expires: 4001, after a frame.
    let r = c.call(json!({"cmd": "refresh", "token": "again"})).await;
    assert!(r["result"]["expires_in"].as_f64().is_some(), "{r}");
    let r = c.call(json!({"cmd": "refresh", "token": "nope"})).await;
    assert_eq!(error_code(&r), "not_allowed");
    let d = c.push("fanout.disconnect").await;
    assert_eq!(
        (d["code"].clone(), d["reconnect"].clone()),
        (json!(4001), json!(true)),
        "{d}"
    );
    assert_eq!(
        c.close_frame().await,
        (4001, "credentials expired".to_owned())
    );
    // Connected by the request: a second connect is refused.
    let mut request = s.ws_url("/fanout").into_client_request().expect("request");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "fanout.v1".parse().expect("h"));
    request
        .headers_mut()
        .insert("x-user", "ada".parse().expect("h"));
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    let mut c = Client {
        ws,
        next_id: 1,
        pushes: Default::default(),
    };
    let r = c.call(json!({"cmd": "connect", "token": "good"})).await;
    assert_eq!(error_code(&r), "already_connected");
}

/// Upgrades every socket without credentials; the `connect` token `"good"` connects as
/// `tok`, with credentials that do not expire.
struct Tokens;

impl Authorize for Tokens {
    async fn connect_token(&self, token: &Value) -> Result<Grant, Denied> {
        match token.as_str() {
            Some("good") => Ok(Grant::new("tok")),
            _ => Err(Denied::new("bad token")),
        }
    }

    async fn may_join(&self, _user: &str, _room: &RoomName) -> Result<(), Denied> {
        Ok(())
    }
}

#[tokio::test]
async fn a_socket_that_does_not_connect_in_time_is_closed_and_one_that_did_is_not() {
    let redis = RedisServer::start();
    let deadline = Duration::from_millis(400);
    let tokens = move |layer: FanoutLayer| {
        Router::new()
            .route(
                "/fanout",
                Protocol::new(Tokens).connect_timeout(deadline).route(),
            )
            .layer(layer)
    };
    let nodes = start_nodes([layer(&redis)], tokens).await;
    let s = &nodes[0].0;
    let mut connected = Client::connect(s, "").await;
    let r = connected
        .call(json!({"cmd": "connect", "token": "good"}))
        .await;
    assert_eq!(r["result"]["user"], "tok", "{r}");
    let mut silent = Client::connect(s, "").await;
    let mut refused = Client::connect(s, "").await;
    let r = refused.call(json!({"cmd": "join", "room": "a"})).await;
    assert_eq!(error_code(&r), "not_connected");
    let r = refused
        .call(json!({"cmd": "connect", "token": "bad"}))
        .await;
    assert_eq!(error_code(&r), "not_allowed");
    // Neither connected in time: told why (and not to come back), then closed with 1008.
    for c in [&mut silent, &mut refused] {
        assert_eq!(
            c.frame().await,
            json!({
                "type": "fanout.disconnect",
                "code": 1008,
                "reason": "credentials not sent in time",
                "reconnect": false,
            })
        );
        assert_eq!(
            c.close_frame().await,
            (1008, "credentials not sent in time".to_owned())
        );
    }
    // The one that connected in time (before the others opened) is past its deadline, open.
    let r = connected.call(json!({"cmd": "join", "room": "a"})).await;
    assert_eq!(r["result"]["room"], "a", "{r}");
}

/// Connects as `ada` with credentials that expire in 300 ms, and never answers whether a
/// socket may join room `stuck` (an authorization service that hangs).
struct Hangs;

impl Authorize for Hangs {
    async fn connect(&self, _request: &Parts) -> Result<Option<Grant>, Denied> {
        Ok(Some(
            Grant::new("ada").expires_in(Duration::from_millis(300)),
        ))
    }

    async fn may_join(&self, _user: &str, room: &RoomName) -> Result<(), Denied> {
        if room.as_str() == "stuck" {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn credentials_expire_on_time_even_while_a_command_hangs() {
    let redis = RedisServer::start();
    let hangs = |layer: FanoutLayer| {
        Router::new()
            .route("/fanout", Protocol::new(Hangs).route())
            .layer(layer)
    };
    let nodes = start_nodes([layer(&redis)], hangs).await;
    let mut c = Client::connect(&nodes[0].0, "").await;
    // The join's hook never returns; the node's expiry closes the socket regardless, told
    // first.
    c.send(r#"{"id":1,"cmd":"join","room":"stuck"}"#).await;
    let d = c.frame().await;
    assert_eq!(
        d,
        json!({"type": "fanout.disconnect", "code": 4001, "reason": "credentials expired", "reconnect": true})
    );
    assert_eq!(
        c.close_frame().await,
        (4001, "credentials expired".to_owned())
    );
}

#[tokio::test]
async fn a_publish_key_is_accepted_once_across_nodes_and_a_duplicate_gives_the_first_position() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut watcher = Client::connect(&nodes[1], "?user=w").await;
    watcher.call(json!({"cmd": "join", "room": "log"})).await;
    watcher.call(json!({"cmd": "join", "room": "x"})).await;
    let mut first = Client::connect(&nodes[0], "?user=ada").await;
    let r1 = first
        .call(json!({"cmd": "publish", "room": "log", "data": "once", "key": "k1"}))
        .await;
    let seq = r1["result"]["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("a position: {r1}"));
    assert!(r1["result"].get("duplicate").is_none(), "{r1}");
    // The retry lands on the other node, as after a reconnect.
    let mut retry = Client::connect(&nodes[1], "?user=ada").await;
    let r2 = retry
        .call(json!({"cmd": "publish", "room": "log", "data": "once", "key": "k1"}))
        .await;
    assert_eq!(r2["result"]["duplicate"], true, "{r2}");
    assert_eq!(
        (r2["result"]["seq"].as_u64(), &r2["result"]["epoch"]),
        (Some(seq), &r1["result"]["epoch"])
    );
    // Another user's same key is another message; a plain room dedupes too.
    let mut other = Client::connect(&nodes[1], "?user=bob").await;
    let r3 = other
        .call(json!({"cmd": "publish", "room": "log", "data": "bob's", "key": "k1"}))
        .await;
    assert!(r3["result"].get("duplicate").is_none(), "{r3}");
    first
        .call(json!({"cmd": "publish", "room": "x", "data": "plain", "key": "k2"}))
        .await;
    let r4 = retry
        .call(json!({"cmd": "publish", "room": "x", "data": "plain", "key": "k2"}))
        .await;
    assert_eq!(r4["result"]["duplicate"], true, "{r4}");
    first
        .call(json!({"cmd": "publish", "room": "x", "data": "end"}))
        .await;
    first
        .call(json!({"cmd": "publish", "room": "log", "data": "end"}))
        .await;
    let mut got = Vec::new();
    while got.iter().filter(|m: &&Value| m["data"] == "end").count() < 2 {
        let m = watcher.push("message").await;
        got.push(m);
    }
    let data: Vec<(String, Value)> = got
        .iter()
        .map(|m| {
            (
                m["room"].as_str().unwrap_or("").to_owned(),
                m["data"].clone(),
            )
        })
        .collect();
    let log: Vec<&Value> = data
        .iter()
        .filter(|(r, _)| r == "log")
        .map(|(_, d)| d)
        .collect();
    let x: Vec<&Value> = data
        .iter()
        .filter(|(r, _)| r == "x")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(log, [&json!("once"), &json!("bob's"), &json!("end")]);
    assert_eq!(x, [&json!("plain"), &json!("end")]);
}

#[tokio::test]
async fn a_durable_room_resumes_through_the_protocol_on_another_node() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut a = Client::connect(&nodes[0], "?user=ada").await;
    let r = a.call(json!({"cmd": "join", "room": "log"})).await;
    assert_eq!(r["result"]["durable"], true, "{r}");
    let p = a.push("fanout.position").await;
    let epoch = p["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(p["seq"], 0);
    for i in 1..=5 {
        a.call(json!({"cmd": "publish", "room": "log", "data": i}))
            .await;
    }
    for i in 1..=5 {
        let m = a.push("message").await;
        assert_eq!((m["seq"].as_u64(), &m["data"]), (Some(i), &json!(i)));
    }
    let mut b = Client::connect(&nodes[1], "?user=ada").await;
    let r = b
        .call(json!({"cmd": "join", "room": "log", "since": {"epoch": epoch, "seq": 2}}))
        .await;
    assert_eq!(
        (&r["result"]["recovered"], &r["result"]["seq"]),
        (&json!(true), &json!(2)),
        "{r}"
    );
    let n = b.push("fanout.resumed").await;
    assert_eq!(n["recovered"], true);
    for i in 3..=5 {
        assert_eq!(b.push("message").await["seq"], i);
    }
    // The last N, in one call; and a refused resume says why.
    let r = b
        .call(json!({"cmd": "join", "room": "log", "last": 2}))
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    for i in 4..=5 {
        assert_eq!(b.push("message").await["seq"], i);
    }
    let r = b
        .call(json!({"cmd": "join", "room": "log", "since": "gone:3"}))
        .await;
    assert_eq!(
        (&r["result"]["recovered"], &r["result"]["reason"]),
        (&json!(false), &json!("epoch_changed")),
        "{r}"
    );
    assert_eq!(
        b.push("fanout.resumed").await["seq"],
        5,
        "live from the top"
    );
    // A refused resume falls back to the last N in the same call.
    let r = b
        .call(json!({"cmd": "join", "room": "log", "since": "gone:3", "last": 2}))
        .await;
    assert_eq!(r["result"]["reason"], "epoch_changed", "{r}");
    assert_eq!(r["result"]["seq"], 3, "the position before the replay: {r}");
    let n = b.push("fanout.resumed").await;
    assert_eq!(
        (&n["recovered"], &n["seq"]),
        (&json!(false), &json!(3)),
        "{n}"
    );
    for i in 4..=5 {
        assert_eq!(b.push("message").await["seq"], i);
    }
    // A resume that can be served ignores the fallback.
    let since = json!({"epoch": epoch, "seq": 4});
    let r = b
        .call(json!({"cmd": "join", "room": "log", "since": since, "last": 3}))
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    assert_eq!(b.push("message").await["seq"], 5);
    a.call(json!({"cmd": "publish", "room": "log", "data": 6}))
        .await;
    let m = b.push("message").await;
    assert_eq!(m["seq"], 6, "live after the replay, nothing twice: {m}");
    let r = b
        .call(json!({"cmd": "history", "room": "log", "limit": 2}))
        .await;
    let seqs: Vec<&Value> = r["result"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| &m["seq"])
        .collect();
    assert_eq!(seqs, [&json!(5), &json!(6)], "{r}");
    assert_eq!(r["result"]["messages"][1]["data"], 6);
}

#[tokio::test]
async fn presence_members_and_events_across_nodes() {
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut a = Client::connect(&nodes[0], "?user=ada").await;
    let r = a
        .call(json!({"cmd": "join", "room": "team", "presence": true}))
        .await;
    assert!(r["result"].is_object(), "{r}");
    let mut b = Client::connect(&nodes[1], "?user=bob").await;
    b.call(json!({"cmd": "join", "room": "team", "presence": true}))
        .await;
    // A socket may see its own user's join first.
    let mut j = a.push("fanout.join").await;
    if j["user"] == "ada" {
        j = a.push("fanout.join").await;
    }
    assert_eq!(
        (&j["room"], &j["user"]),
        (&json!("team"), &json!("bob")),
        "{j}"
    );
    let r = b.call(json!({"cmd": "presence", "room": "team"})).await;
    let users: Vec<&Value> = r["result"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| &m["user"])
        .collect();
    assert_eq!(users, [&json!("ada"), &json!("bob")], "{r}");
    assert!(
        r["result"]["version"]
            .as_u64()
            .is_some_and(|v| v >= j["version"].as_u64().unwrap_or(0))
    );
    drop(b);
    let l = a.push("fanout.leave").await;
    assert_eq!(l["user"], "bob");
    assert!(l["version"].as_u64() > j["version"].as_u64());
}

/// `examples/board`: a read-only protocol endpoint fed by HTTP pushes, on two nodes.
#[tokio::test]
async fn the_board_example_serves_pushed_updates_to_read_only_clients() {
    let redis = RedisServer::start();
    let layers = (0..2).map(|_| board_app::layer(&redis.url()).expect("layer"));
    let nodes: Vec<TestServer> = start_nodes(layers, board_app::app)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    for n in 1..=3 {
        let body = json!({"n": n}).to_string();
        let (status, answer) = support::http(nodes[0].addr, "POST", "/boards/ops", &body).await;
        assert_eq!(
            (status, answer.trim()),
            (200, format!("{{\"seq\":{n}}}").as_str())
        );
    }
    let mut viewer = Client::connect(&nodes[1], "").await;
    let r = viewer
        .call(json!({"cmd": "join", "room": "board-ops", "last": 2}))
        .await;
    assert_eq!(r["result"]["recovered"], true, "{r}");
    for n in 2..=3 {
        assert_eq!(viewer.push("message").await["data"], json!({"n": n}));
    }
    let r = viewer
        .call(json!({"cmd": "publish", "room": "board-ops", "data": 1}))
        .await;
    assert_eq!(error_code(&r), "not_allowed", "pages only read");
    let r = viewer.call(json!({"cmd": "join", "room": "chat"})).await;
    assert_eq!(error_code(&r), "not_allowed");
    support::http(nodes[1].addr, "POST", "/boards/ops", "4").await;
    assert_eq!(viewer.push("message").await["data"], 4);
    let (status, js) = support::http(nodes[0].addr, "GET", "/fanout.js", "").await;
    assert_eq!(status, 200);
    assert!(
        js.contains("export class FanoutClient"),
        "the client module is served"
    );
}

/// Users reach protocol sockets too: a direct message arrives as `fanout.direct`, a
/// server-side join as if the socket had joined, and a fleet-wide disconnect is told with a
/// `fanout.disconnect` frame carrying the reconnect hint before the close.
#[tokio::test]
async fn the_users_feature_reaches_protocol_sockets() {
    let redis = RedisServer::start();
    let fleet = start_nodes([layer(&redis), layer(&redis)], app).await;
    let mut ada = [
        Client::connect(&fleet[0].0, "?user=ada").await,
        Client::connect(&fleet[1].0, "?user=ada").await,
    ];
    for c in &mut ada {
        // A reply means the session started, so the socket is the user's already.
        let r = c.call(json!({"cmd": "join", "room": "lobby"})).await;
        assert!(r["result"].is_object(), "{r}");
    }
    let handle = &fleet[0].1;
    let sent = handle.send_to_user("ada", json!({"hi": 1})).await;
    assert_eq!(sent.expect("sent"), 2);
    for c in &mut ada {
        assert_eq!(
            c.push("fanout.direct").await,
            json!({"type": "fanout.direct", "payload": {"hi": 1}})
        );
    }
    assert_eq!(handle.join_user("ada", "side").await.expect("join"), 2);
    support::wait_until("both sockets in side", || async {
        handle.broadcast("side", json!("probe")).await.ok() == Some(2)
    })
    .await;
    for c in &mut ada {
        let m = c.push("message").await;
        assert_eq!(m["room"], "side", "{m}");
    }
    let acted = handle
        .disconnect_user("ada")
        .reason("moved")
        .reconnect(true)
        .await;
    assert_eq!(acted.expect("disconnect"), 2);
    for c in &mut ada {
        assert_eq!(
            c.push("fanout.disconnect").await,
            json!({"type": "fanout.disconnect", "code": 4002, "reason": "moved", "reconnect": true})
        );
        assert_eq!(c.close_frame().await, (4002, "moved".to_owned()));
    }
}

/// A TCP proxy in front of Redis that forwards a node's commands, but on a connection where a
/// command held `marker`, none of Redis's replies from then on: the node never learns that
/// Redis ran that command, as if it had died the instant after Redis accepted it.
struct DeafProxy {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DeafProxy {
    async fn start(redis_port: u16, marker: &'static [u8]) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let deaf = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let commands = deaf.clone();
                tokio::spawn(async move {
                    // What came before this read: a marker split over two reads is seen.
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(marker.len()).any(|w| w == marker) {
                            // Before Redis can answer it.
                            commands.store(true, Ordering::SeqCst);
                        }
                        let keep = seen.len().saturating_sub(marker.len());
                        seen.drain(..keep);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !deaf.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for DeafProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A keyed publish that Redis ran, from a node that died before it heard back (so before it
/// could record anything after the fact): the client's retry with the same key, on another
/// node and after the in-flight claim has expired, must not send it again.
async fn a_keyed_publish_is_not_sent_twice_when_its_node_dies_after_redis_ran_it(
    env: &[(&str, &str)],
) {
    const MARKER: &str = "sent-once-then-the-node-died";
    let redis = RedisServer::start();
    let proxy = DeafProxy::start(redis.port(), MARKER.as_bytes()).await;
    let chat = chat_binary();
    let mut env_a = vec![("REDIS_URL", proxy.url())];
    env_a.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let env_a: Vec<(&str, &str)> = env_a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = ChatProcess::start(&chat, &redis, "dies", &env_a).await;
    let b = ChatProcess::start(&chat, &redis, "lives", env).await;
    let mut watcher = Client::open(b.addr, "?user=w").await;
    watcher.call(json!({"cmd": "join", "room": "once"})).await;
    let mut sender = Client::open(a.addr, "?user=ada").await;
    // Redis learns the node's scripts first: a NOSCRIPT answer unheard would send nothing.
    sender
        .call(json!({"cmd": "publish", "room": "once", "data": "warm", "key": "k0"}))
        .await;
    assert_eq!(watcher.push("message").await["data"], "warm");
    sender
        .send(
            &json!({"id": 1, "cmd": "publish", "room": "once", "data": MARKER, "key": "k1"})
                .to_string(),
        )
        .await;
    // Redis ran it: the watcher has it. The node that sent it never heard back; it dies now.
    let first = watcher.push("message").await;
    assert_eq!(first["data"], MARKER, "{first}");
    a.kill();
    // The client resends with the same key on the node that lives, until it is answered
    // with something else than "in flight" (at most the claim's expiry, 5 s by default).
    let mut retry = Client::open(b.addr, "?user=ada").await;
    let deadline = Instant::now() + SOON * 2;
    let answer = loop {
        let r = retry
            .call(json!({"cmd": "publish", "room": "once", "data": MARKER, "key": "k1"}))
            .await;
        if r["error"]["code"] != "unavailable" {
            break r;
        }
        assert!(Instant::now() < deadline, "still in flight: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await; // deadline: the client's resend pace
    };
    assert_eq!(answer["result"]["duplicate"], true, "sent again: {answer}");
    assert_eq!(answer["result"]["seq"], first["seq"], "{answer} {first}");
    retry
        .call(json!({"cmd": "publish", "room": "once", "data": "end"}))
        .await;
    loop {
        let m = watcher.push("message").await;
        assert_ne!(m["data"], MARKER, "delivered twice: {m}");
        if m["data"] == "end" {
            break;
        }
    }
}

#[tokio::test]
async fn a_keyed_publish_to_a_plain_room_lands_once_when_its_node_dies_before_hearing_back() {
    a_keyed_publish_is_not_sent_twice_when_its_node_dies_after_redis_ran_it(&[]).await;
}

#[tokio::test]
async fn a_keyed_publish_to_a_durable_room_lands_once_when_its_node_dies_before_hearing_back() {
    a_keyed_publish_is_not_sent_twice_when_its_node_dies_after_redis_ran_it(&[("HISTORY", "100")])
        .await;
}
