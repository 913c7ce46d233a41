//! Users across the fleet (README "Users", `PROTOCOL.md` part 2, "Users"), against a real, throwaway
//! `redis-server` and several in-process chat nodes: direct messages to every socket of a user,
//! fleet-wide disconnects, server-side joins into durable and presence rooms, expiring
//! credentials and their refresh, a Redis restart under a command, and bad input.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::time::Duration;

use axum_fanout::durable::Durability;
use axum_fanout::{FanoutLayer, RoomHandle};
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// `n` in-process chat nodes (ids `n1`, ...): room `d` durable, room `p` with presence.
async fn fleet(redis: &RedisServer, n: usize) -> Vec<(TestServer, RoomHandle)> {
    let layers = (1..=n).map(|i| {
        FanoutLayer::builder(redis.url())
            .node_id(format!("n{i}"))
            .durable_room("d", Durability::default())
            .room_presence("p")
            .build()
            .expect("valid url")
    });
    start_nodes(layers, chat_app::app).await
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A chat socket in `room` as `user` (query `extra` appended).
async fn socket(server: &TestServer, room: &str, user: &str, extra: &str) -> Ws {
    connect(&server.ws_url(&format!("/ws?room={room}&user={user}{extra}"))).await
}

/// Text frames that arrive within `quiet` of each other, until none does.
async fn drain(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(quiet, ws.next()).await {
        if let Message::Text(t) = frame {
            out.push(json_of(&t));
        }
    }
    out
}

/// The next frame of type `kind` (about `user`, when given), skipping others (the watcher's
/// own presence notices).
async fn recv_type(ws: &mut Ws, kind: &str, user: Option<&str>) -> Value {
    loop {
        let frame = json_of(&recv_text(ws, kind).await);
        if frame["type"] == kind && user.is_none_or(|u| frame["user"] == u) {
            return frame;
        }
    }
}

/// Waits until `n` nodes subscribe to `channel` (each socket joins after its upgrade).
async fn subscribed(redis: &RedisServer, channel: &str, n: usize) {
    wait_until(&format!("{n} nodes on {channel}"), || async {
        redis.numsub(channel) == n
    })
    .await;
}

/// Waits until `user` has `sockets` sockets registered on `nodes` nodes (the users'
/// directory says so) and those nodes subscribe to the user's channel: each socket is reached.
async fn identified(
    handle: &RoomHandle,
    redis: &RedisServer,
    user: &str,
    nodes: usize,
    sockets: usize,
) {
    let want = axum_fanout::users::Connected { nodes, sockets };
    let channel = format!("__axum_fanout:user:ws:room:{user}");
    wait_until(
        &format!("{user} on {nodes} nodes, {sockets} sockets"),
        || async {
            handle.connected(user).await.ok() == Some(want) && redis.numsub(&channel) == nodes
        },
    )
    .await;
}

/// POSTs `body` to `path` on `server`; returns (status, body as JSON or Null).
async fn post(server: &TestServer, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = http(server.addr, "POST", path, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A socket that reads a marker sent to its room after everything else was sent: what came
/// before it, came; what did not, will not.
async fn frames_until_marker(ws: &mut Ws, handle: &RoomHandle, room: &str) -> Vec<Value> {
    handle
        .broadcast(room, json!({ "marker": true }))
        .await
        .expect("marker");
    let mut out = Vec::new();
    loop {
        let frame = json_of(&recv_text(ws, "the marker").await);
        if frame == json!({ "marker": true }) {
            return out;
        }
        out.push(frame);
    }
}

#[tokio::test]
async fn direct_messages_reach_every_socket_of_the_user_once_in_order() {
    let redis = RedisServer::start();
    let nodes = fleet(&redis, 4).await;
    let mut alice = Vec::new();
    for (server, _) in &nodes[..3] {
        alice.push(socket(server, "lobby", "alice", "").await);
    }
    let mut bob = socket(&nodes[0].0, "lobby", "bob", "").await;
    identified(&nodes[0].1, &redis, "alice", 3, 3).await;
    identified(&nodes[0].1, &redis, "bob", 1, 1).await;
    let sender = &nodes[3].0;
    for i in 0..20 {
        let (status, body) = post(
            sender,
            "/users/alice/messages",
            &json!({ "n": i }).to_string(),
        )
        .await;
        assert_eq!(
            (status, &body),
            (200, &json!({ "nodes": 3 })),
            "message {i}"
        );
    }
    let expected: Vec<Value> = (0..20)
        .map(|i| json!({ "type": "fanout.direct", "payload": { "n": i } }))
        .collect();
    for (i, ws) in alice.iter_mut().enumerate() {
        let got = frames_until_marker(ws, &nodes[i].1, "lobby").await;
        assert_eq!(got, expected, "alice's socket on n{}", i + 1);
    }
    assert_eq!(
        frames_until_marker(&mut bob, &nodes[0].1, "lobby").await,
        Vec::<Value>::new(),
        "bob gets nothing of alice's"
    );
    // A user with no socket anywhere: 0 nodes, nothing delivered, nothing kept.
    let (status, body) = post(sender, "/users/nobody/messages", r#"{"x":1}"#).await;
    assert_eq!((status, body), (200, json!({ "nodes": 0 })));
    let direct = nodes[3].1.send_to_user("nobody", json!({ "x": 2 })).await;
    assert_eq!(direct.expect("sent"), 0);
    assert_eq!(
        frames_until_marker(&mut bob, &nodes[0].1, "lobby").await,
        Vec::<Value>::new()
    );
}

#[tokio::test]
async fn disconnecting_a_user_closes_all_their_sockets_and_only_theirs() {
    let redis = RedisServer::start();
    let nodes = fleet(&redis, 3).await;
    let mut alice = Vec::new();
    for (server, _) in &nodes {
        alice.push(socket(server, "lobby", "alice", "").await);
        alice.push(socket(server, "other", "alice", "").await);
    }
    let mut bob = socket(&nodes[1].0, "lobby", "bob", "").await;
    identified(&nodes[0].1, &redis, "alice", 3, 6).await;
    identified(&nodes[0].1, &redis, "bob", 1, 1).await;
    let asked = Instant::now();
    let (status, body) = post(
        &nodes[2].0,
        "/users/alice/disconnect",
        r#"{"reason":"logged out"}"#,
    )
    .await;
    assert_eq!((status, body), (200, json!({ "nodes": 3 })));
    let mut slowest = Duration::ZERO;
    for ws in &mut alice {
        let close = recv_close(ws).await.expect("a close frame");
        slowest = slowest.max(asked.elapsed());
        assert_eq!(u16::from(close.code), 4000);
        assert_eq!(close.reason.as_str(), "logged out");
    }
    // The issue asks for 1 s on a healthy fleet; asserted generously (shared CI machines),
    // the figure is printed for the record.
    eprintln!("every socket of alice closed {slowest:?} after the request");
    assert!(slowest < Duration::from_secs(5), "closed after {slowest:?}");
    assert_eq!(
        frames_until_marker(&mut bob, &nodes[1].1, "lobby").await,
        Vec::<Value>::new(),
        "bob's socket is untouched"
    );
    // Alice may come back, and is reached again.
    let mut again = socket(&nodes[0].0, "lobby", "alice", "").await;
    identified(&nodes[1].1, &redis, "alice", 1, 1).await;
    let sent = nodes[1]
        .1
        .send_to_user("alice", json!({ "back": true }))
        .await;
    assert_eq!(sent.expect("sent"), 1);
    assert_eq!(
        json_of(&recv_text(&mut again, "the direct message").await),
        json!({ "type": "fanout.direct", "payload": { "back": true } })
    );
    // Default reason, and the reconnect hint.
    let mut carol = socket(&nodes[2].0, "lobby", "carol", "").await;
    subscribed(&redis, "__axum_fanout:user:ws:room:carol", 1).await;
    let (status, _) = post(&nodes[0].0, "/users/carol/disconnect", "").await;
    assert_eq!(status, 200);
    let close = recv_close(&mut carol).await.expect("close");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4000, "disconnected")
    );
    let mut dave = socket(&nodes[2].0, "lobby", "dave", "").await;
    subscribed(&redis, "__axum_fanout:user:ws:room:dave", 1).await;
    let nodes_acted = nodes[0].1.disconnect_user("dave").reconnect(true).await;
    assert_eq!(nodes_acted.expect("sent"), 1);
    let close = recv_close(&mut dave).await.expect("close");
    assert_eq!(u16::from(close.code), axum_fanout::close::RECONNECT);
}

#[tokio::test]
async fn one_socket_or_a_whole_room_can_be_disconnected_from_any_node() {
    let redis = RedisServer::start();
    let nodes = fleet(&redis, 2).await;
    let mut first = socket(&nodes[0].0, "lobby", "erin", "").await;
    let mut second = socket(&nodes[1].0, "lobby", "erin", "").await;
    // Every socket of room "kick" on every node, and no other.
    let mut kicked = socket(&nodes[1].0, "kick", "frank", "").await;
    subscribed(&redis, "ws:room:kick", 1).await;
    subscribed(&redis, "ws:room:lobby", 2).await;
    let acted = nodes[0]
        .1
        .disconnect_room("kick")
        .reason("room closed")
        .await;
    assert_eq!(acted.expect("sent"), 1);
    let close = recv_close(&mut kicked).await.expect("close");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4000, "room closed")
    );
    for (i, ws) in [&mut first, &mut second].into_iter().enumerate() {
        assert_eq!(
            frames_until_marker(ws, &nodes[i].1, "lobby").await,
            Vec::<Value>::new(),
            "erin's sockets stay"
        );
    }
}

#[tokio::test]
async fn a_server_side_join_is_as_if_the_sockets_had_joined_themselves() {
    let redis = RedisServer::start();
    let nodes = fleet(&redis, 2).await;
    let mut alice = [
        socket(&nodes[0].0, "lobby", "alice", "").await,
        socket(&nodes[1].0, "lobby", "alice", "").await,
    ];
    subscribed(&redis, "__axum_fanout:user:ws:room:alice", 2).await;
    subscribed(&redis, "ws:room:lobby", 2).await;
    // A presence watcher in `p`, and a message in durable `d` before the join.
    let mut watcher = socket(&nodes[1].0, "p", "watcher", "").await;
    recv_type(&mut watcher, "fanout.member", None).await;
    nodes[0]
        .1
        .broadcast("d", json!({ "before": 1 }))
        .await
        .expect("before");

    let joined = nodes[1].1.join_user("alice", "d").await;
    assert_eq!(joined.expect("sent"), 2);
    for ws in &mut alice {
        let notice = json_of(&recv_text(ws, "fanout.position").await);
        assert_eq!(
            (notice["type"].as_str(), notice["room"].as_str()),
            (Some("fanout.position"), Some("d"))
        );
        assert_eq!(
            notice["seq"], 1,
            "positioned after the message before the join"
        );
    }
    nodes[0]
        .1
        .broadcast("d", json!({ "after": 1 }))
        .await
        .expect("after");
    for ws in &mut alice {
        let frame = json_of(&recv_text(ws, "the durable message").await);
        assert_eq!(frame, json!({ "seq": 2, "payload": { "after": 1 } }));
    }

    let joined = nodes[0].1.join_user("alice", "p").await;
    assert_eq!(joined.expect("sent"), 2);
    recv_type(&mut watcher, "fanout.join", Some("alice")).await;
    wait_until("alice counted twice in p", || async {
        let snapshot = nodes[0].1.presence("p").await.expect("presence");
        let value = serde_json::to_value(&snapshot).expect("json");
        value["members"].as_array().is_some_and(|m| {
            m.iter()
                .any(|e| e["user"] == "alice" && e["connections"] == 2)
        })
    })
    .await;

    // And out again: no more of `d`, and a leave in `p` once both sockets left.
    assert_eq!(nodes[0].1.leave_user("alice", "d").await.expect("sent"), 2);
    assert_eq!(nodes[0].1.leave_user("alice", "p").await.expect("sent"), 2);
    recv_type(&mut watcher, "fanout.leave", Some("alice")).await;
    nodes[0]
        .1
        .broadcast("d", json!({ "gone": 1 }))
        .await
        .expect("gone");
    for (i, ws) in alice.iter_mut().enumerate() {
        // What came while in `p` (alice's own join there) is fine; nothing of `d` after leaving.
        let got = frames_until_marker(ws, &nodes[i].1, "lobby").await;
        assert!(
            got.iter()
                .all(|f| f["room"] == "p" && f["type"] != "fanout.position"),
            "{got:?}"
        );
    }
}

#[tokio::test]
async fn expired_credentials_close_with_4001_unless_refreshed() {
    let redis = RedisServer::start();
    let nodes = fleet(&redis, 1).await;
    let server = &nodes[0].0;
    let opened = Instant::now();
    let mut expiring = socket(server, "lobby", "gina", "&expires_in=2").await;
    let mut refreshed = socket(server, "lobby", "hank", "&expires_in=2").await;
    send_text(
        &mut refreshed,
        r#"{"type":"fanout.refresh","expires_in":30}"#,
    )
    .await;
    assert_eq!(
        json_of(&recv_text(&mut refreshed, "fanout.refreshed").await),
        json!({ "type": "fanout.refreshed", "expires_in": 30 })
    );
    for bad in [
        r#"{"type":"fanout.refresh","expires_in":0}"#,
        r#"{"type":"fanout.refresh","expires_in":"x"}"#,
    ] {
        send_text(&mut refreshed, bad).await;
        let answer = json_of(&recv_text(&mut refreshed, "the refusal").await);
        assert_eq!(answer["type"], "fanout.refreshed", "{bad}");
        assert!(answer["error"].is_string(), "{bad}: {answer}");
    }
    let close = recv_close(&mut expiring).await.expect("close");
    let after = opened.elapsed();
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4001, "credentials expired")
    );
    // 2 s plus at most 0.2 s of jitter; the lower bound is the one that matters here.
    assert!(
        after >= Duration::from_secs(2),
        "closed early, after {after:?}"
    );
    eprintln!("closed {after:?} after the upgrade (expires_in=2)");
    // The refreshed one is still open past the first one's close.
    assert_eq!(
        frames_until_marker(&mut refreshed, &nodes[0].1, "lobby").await,
        Vec::<Value>::new()
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_nothing_half_done() {
    let redis = RedisServer::start();
    let nodes = fleet(&redis, 1).await;
    let (server, handle) = &nodes[0];
    let mut ivy = socket(server, "lobby", "ivy", "").await;
    subscribed(&redis, "ws:room:lobby", 1).await;
    let long_user = "u".repeat(300);
    for (path, body) in [
        ("/users/ivy/messages", "not json"),
        (&*format!("/users/{long_user}/messages"), "1"),
        (
            "/users/ivy/disconnect",
            &*format!(r#"{{"reason":"{}"}}"#, "r".repeat(101)),
        ),
        ("/users/ivy/disconnect", r#"{"why":"x"}"#),
        ("/users/ivy/disconnect", r#"{"reason":7}"#),
        ("/users/ivy/disconnect", "[1]"),
    ] {
        let (status, _) = post(server, path, body).await;
        assert_eq!(status, 400, "{path} {body}");
    }
    for query in [
        "&expires_in=0",
        "&expires_in=-1",
        "&expires_in=soon",
        "&expires_in=86401",
    ] {
        let url = server.ws_url(&format!("/ws?room=lobby&user=ivy{query}"));
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 400, "{query}")
            }
            other => panic!("{query}: expected 400, got {:?}", other.map(|_| ())),
        }
    }
    let err = handle
        .send_to_user("", json!(1))
        .await
        .expect_err("empty user");
    assert!(err.is_invalid_member(), "{err}");
    let err = handle
        .disconnect_user("ivy")
        .reason("r".repeat(124))
        .await
        .expect_err("reason too long");
    assert!(err.is_invalid_argument(), "{err}");
    let err = handle
        .disconnect_user("ivy")
        .code(1000)
        .await
        .expect_err("not an app code");
    assert!(err.is_invalid_argument(), "{err}");
    let err = handle
        .join_user("ivy", "bad\nroom")
        .await
        .expect_err("bad room");
    assert!(err.is_invalid_room(), "{err}");
    // Nothing of that reached ivy, who is still connected.
    assert_eq!(
        frames_until_marker(&mut ivy, handle, "lobby").await,
        Vec::<Value>::new()
    );
    // Garbage on a user's channel is dropped, and the user is still reached.
    redis.cli(&[
        "PUBLISH",
        "__axum_fanout:user:ws:room:ivy",
        "{\"command\":{\"op\":\"explode\"}}",
    ]);
    redis.cli(&["PUBLISH", "__axum_fanout:user:ws:room:ivy", "garbage"]);
    assert_eq!(
        handle
            .send_to_user("ivy", json!({ "ok": 1 }))
            .await
            .expect("sent"),
        1
    );
    assert_eq!(
        json_of(&recv_text(&mut ivy, "the direct message").await),
        json!({ "type": "fanout.direct", "payload": { "ok": 1 } })
    );
    assert!(drain(&mut ivy, Duration::from_millis(200)).await.is_empty());
}

#[tokio::test]
async fn a_command_across_a_redis_restart_is_applied_once_or_reported() {
    let mut redis = RedisServer::start();
    let nodes = fleet(&redis, 2).await;
    let mut jay = socket(&nodes[1].0, "lobby", "jay", "").await;
    subscribed(&redis, "__axum_fanout:user:ws:room:jay", 1).await;
    redis.stop();
    let sender = nodes[0].1.clone();
    let sent =
        tokio::spawn(async move { sender.send_to_user("jay", json!({ "once": true })).await });
    // Let the message wait in the publisher's queue for a while, then bring Redis back.
    tokio::time::sleep(Duration::from_millis(500)).await; // ok: the outage under test
    redis.restart();
    let outcome = sent.await.expect("task");
    wait_until("both nodes ready again", || async {
        nodes.iter().all(|(_, h)| h.is_ready())
    })
    .await;
    let frames = drain(&mut jay, Duration::from_secs(2)).await;
    let once = json!({ "type": "fanout.direct", "payload": { "once": true } });
    let received = frames.iter().filter(|f| **f == once).count();
    eprintln!("outcome {outcome:?}, received {received}");
    assert!(received <= 1, "applied twice: {frames:?}");
    match outcome {
        Ok(n) if n > 0 => assert_eq!(received, 1, "counted as delivered but not received"),
        Ok(_) => assert_eq!(received, 0),
        // Reported: not delivered (a timeout is an unknown outcome, so at most once).
        Err(e) => assert!(e.is_timeout() || e.is_redis(), "{e}"),
    }
    // Every frame other than the message is a notice of what may have been missed.
    for f in frames.iter().filter(|f| **f != once) {
        assert_eq!(f["type"], "fanout.missed", "{f}");
    }
}

/// A handler that joins `a` and `b` as user `kim` with a 30 s expiry; the text `refresh`
/// refreshes for 60 s with credentials that no longer allow `b`, and answers the rooms left;
/// `forever` refreshes with credentials that never expire.
fn refresh_app(layer: FanoutLayer) -> axum::Router {
    use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
    use axum::routing::get;
    use axum_fanout::Event;

    async fn ws(upgrade: WebSocketUpgrade, rooms: RoomHandle) -> axum::response::Response {
        rooms.on_upgrade(upgrade, |mut socket| async move {
            for room in ["a", "b"] {
                socket.join(room).await.expect("join");
            }
            socket.identify("kim").await.expect("identify");
            socket.expire_in(Duration::from_secs(30)).expect("expiry");
            let _ = socket.send("ready");
            while let Some(Ok(Event::Message(WsMessage::Text(t)))) = socket.recv_event().await {
                if t.as_str() == "refresh" {
                    // An expiry in the past is refused and changes nothing.
                    let past = socket.expire_in(Duration::ZERO).expect_err("zero");
                    assert!(past.is_invalid_argument(), "{past}");
                    socket.expire_in(Duration::from_secs(60)).expect("refresh");
                    let left = socket.retain_rooms(|room| room != "b");
                    let still = socket.expires_in().expect("an expiry");
                    let left: Vec<&str> = left.iter().map(|r| r.as_str()).collect();
                    let _ = socket.send(
                        json!({ "left": left, "more_than_30s": still > Duration::from_secs(30) }),
                    );
                } else if t.as_str() == "forever" {
                    // New credentials that do not expire: no expiry left.
                    socket.expire_never();
                    let _ = socket.send(json!({ "expires": socket.expires_in().is_some() }));
                }
            }
        })
    }
    axum::Router::new().route("/ws", get(ws)).layer(layer)
}

#[tokio::test]
async fn a_refresh_that_loses_a_room_leaves_that_room_only() {
    let redis = RedisServer::start();
    let layer = FanoutLayer::new(redis.url());
    let handle = layer.handle();
    let server = TestServer::start(refresh_app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let mut ws = connect(&server.ws_url("/ws")).await;
    assert_eq!(recv_text(&mut ws, "ready").await, "ready");
    send_text(&mut ws, "refresh").await;
    assert_eq!(
        json_of(&recv_text(&mut ws, "the rooms left").await),
        json!({ "left": ["b"], "more_than_30s": true })
    );
    handle
        .broadcast("b", json!({ "in": "b" }))
        .await
        .expect("b");
    handle
        .broadcast("a", json!({ "in": "a" }))
        .await
        .expect("a");
    assert_eq!(
        json_of(&recv_text(&mut ws, "a's message").await),
        json!({ "in": "a" })
    );
    // Still the user's: direct messages reach it.
    assert_eq!(
        handle
            .send_to_user("kim", json!({ "to": "kim" }))
            .await
            .expect("sent"),
        1
    );
    assert_eq!(
        json_of(&recv_text(&mut ws, "direct").await),
        json!({ "type": "fanout.direct", "payload": { "to": "kim" } })
    );
    send_text(&mut ws, "forever").await;
    assert_eq!(
        json_of(&recv_text(&mut ws, "no expiry").await),
        json!({ "expires": false })
    );
}

#[tokio::test]
async fn any_node_tells_where_a_user_is_and_which_nodes_are_alive() {
    let redis = RedisServer::start();
    let layers = ["n1", "n3"].map(|id| {
        FanoutLayer::builder(redis.url())
            .node_id(id)
            .presence_ttl(Duration::from_secs(2))
            .build()
            .expect("valid url")
    });
    let nodes = start_nodes(layers, chat_app::app).await;
    // n2 is a real process, so that it can die without a word (SIGKILL).
    let mut n2 = ChatProcess::start(&chat_binary(), &redis, "n2", &[("PRESENCE_TTL_S", "2")]).await;
    let _a = socket(&nodes[0].0, "lobby", "alice", "").await;
    let _b = socket(&nodes[0].0, "other", "alice", "").await;
    let _c = connect(&format!("ws://{}/ws?room=lobby&user=alice", n2.addr)).await;
    let _d = socket(&nodes[1].0, "lobby", "bob", "").await;
    let ask = nodes[1].1.clone();
    let want = axum_fanout::users::Connected {
        nodes: 2,
        sockets: 3,
    };
    wait_until("alice on 2 nodes, 3 sockets", || async {
        ask.connected("alice").await.ok() == Some(want)
    })
    .await;
    let fleet = ask.fleet().await.expect("fleet");
    let ids: Vec<&str> = fleet.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(ids, ["n1", "n2", "n3"]);
    wait_until("n1's record counts its sockets", || async {
        let fleet = ask.fleet().await.expect("fleet");
        fleet[0].connections == 2 && fleet[0].users == 1 && fleet[0].rooms == 2
    })
    .await;
    assert_eq!(
        ask.connected("nobody").await.expect("asked"),
        axum_fanout::users::Connected::default()
    );
    // n2 dies without a word: once its record expires, neither it nor its socket counts.
    n2.kill();
    wait_until("n2 gone from the fleet", || async {
        let fleet = ask.fleet().await.expect("fleet");
        fleet.iter().all(|n| n.node != "n2")
    })
    .await;
    let left = ask.connected("alice").await.expect("asked");
    assert_eq!(
        left,
        axum_fanout::users::Connected {
            nodes: 1,
            sockets: 2
        }
    );
    assert!(
        ask.connected("bad\nuser")
            .await
            .expect_err("invalid")
            .is_invalid_member()
    );
}
