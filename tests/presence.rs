//! Presence across the fleet (README "Presence", `PROTOCOL.md` part 2, "Presence"), against real,
//! throwaway `redis-server` processes and, for the crash, real `chat` processes killed with
//! SIGKILL: members with connection counts over several nodes, join and leave notices in order
//! with the room's messages, no ghosts after a crash, re-assertion after Redis lost its data,
//! snapshot plus events under churn, and the cost of a 10,000-member room.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use axum_fanout::{FanoutLayer, RoomHandle};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// One in-process chat node.
struct Node {
    server: TestServer,
    handle: RoomHandle,
}

/// `n` in-process chat nodes with presence for every room (ids `n1`, `n2`, ...).
async fn nodes(redis: &RedisServer, n: usize, ttl: Duration) -> Vec<Node> {
    let layers = (1..=n).map(|i| {
        FanoutLayer::builder(redis.url())
            .node_id(format!("n{i}"))
            .presence(true)
            .presence_ttl(ttl)
            .build()
            .expect("valid url")
    });
    start_nodes(layers, chat_app::app)
        .await
        .into_iter()
        .map(|(server, handle)| Node { server, handle })
        .collect()
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// user -> connections, from a `GET /rooms/NAME/presence` body or a snapshot.
fn members_of(body: &Value) -> BTreeMap<String, u64> {
    body["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user"].as_str().expect("user").to_owned(),
                m["connections"].as_u64().expect("connections"),
            )
        })
        .collect()
}

async fn presence_http(addr: SocketAddr, room: &str) -> Value {
    let (status, body) = http(addr, "GET", &format!("/rooms/{room}/presence"), "").await;
    assert_eq!(status, 200, "{body}");
    json_of(&body)
}

/// The members `handle` lists, or `None` while Redis does not answer (it is restarting).
async fn members(handle: &RoomHandle, room: &str) -> Option<BTreeMap<String, u64>> {
    let snapshot = handle.presence(room).await.ok()?;
    Some(
        snapshot
            .members
            .into_iter()
            .map(|m| (m.user, m.connections))
            .collect(),
    )
}

/// Waits until `room`'s members, as `handle` lists them, are exactly `want`.
async fn wait_members(handle: &RoomHandle, room: &str, want: &[(&str, u64)]) {
    let want: BTreeMap<String, u64> = want.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect();
    let deadline = Instant::now() + SOON;
    loop {
        let seen = members(handle, room).await;
        if seen.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members of {room}: want {want:?}, have {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // deadline: polling interval
    }
}

/// A socket in `room` as `user` on the server at `addr`.
async fn member(addr: SocketAddr, room: &str, user: &str) -> Ws {
    connect(&format!("ws://{addr}/ws?room={room}&user={user}")).await
}

/// Presence notices (`fanout.join` / `fanout.leave`) read from `ws` up to the marker `n`, which
/// `publish` broadcasts into the room: everything the room sent before the marker.
async fn notices_until_marker<F, Fut>(ws: &mut Ws, n: u64, publish: F) -> Vec<Value>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    publish().await;
    let mut notices = Vec::new();
    loop {
        let frame = json_of(&recv_text(ws, "frames up to the marker").await);
        if frame["marker"] == n {
            return notices;
        }
        let kind = frame["type"].as_str().unwrap_or_default();
        if kind == "fanout.join" || kind == "fanout.leave" {
            notices.push(frame);
        }
    }
}

/// A new member socket's first two frames: its own join (the user's first connection) and the
/// chat app's `fanout.member`, which may come in either order (the join travels through Redis,
/// the other is queued by the node once the join returned).
async fn first_notices(ws: &mut Ws) -> (Value, Value) {
    let a = json_of(&recv_text(ws, "own join or fanout.member").await);
    let b = json_of(&recv_text(ws, "own join or fanout.member").await);
    if a["type"] == "fanout.member" {
        (b, a)
    } else {
        (a, b)
    }
}

/// (type, user) of each notice, in order.
fn kinds(notices: &[Value]) -> Vec<(String, String)> {
    notices
        .iter()
        .map(|n| {
            (
                n["type"].as_str().unwrap_or_default().to_owned(),
                n["user"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pair(kind: &str, user: &str) -> (String, String) {
    (kind.to_owned(), user.to_owned())
}

#[tokio::test]
async fn two_users_on_three_nodes_join_once_and_leave_after_their_last_socket() {
    let redis = RedisServer::start();
    let fleet = nodes(&redis, 3, Duration::from_secs(30)).await;
    let room = "trio";
    let addr = |i: usize| fleet[i].server.addr;
    let mut watcher = member(addr(0), room, "watcher").await;
    wait_members(&fleet[0].handle, room, &[("watcher", 1)]).await;
    let (first, own) = first_notices(&mut watcher).await;
    assert_eq!(
        own,
        json!({ "type": "fanout.member", "room": room, "user": "watcher" })
    );
    assert_eq!(
        (&first["type"], &first["room"], &first["user"]),
        (&json!("fanout.join"), &json!(room), &json!("watcher")),
        "{first}"
    );

    let mut alice1 = member(addr(0), room, "alice").await;
    let alice2 = member(addr(1), room, "alice").await;
    let bob2 = member(addr(1), room, "bob").await;
    let mut bob3 = member(addr(2), room, "bob").await;
    let all = [("alice", 2), ("bob", 2), ("watcher", 1)];
    wait_members(&fleet[2].handle, room, &all).await;
    // Every node lists every member, over HTTP too, sorted by user.
    for i in 0..3 {
        let body = presence_http(addr(i), room).await;
        assert_eq!(body["room"], room);
        let users: Vec<&str> = body["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["user"].as_str().expect("user"))
            .collect();
        assert_eq!(users, ["alice", "bob", "watcher"]);
        assert_eq!(
            members_of(&body),
            all.iter().map(|(u, n)| (u.to_string(), *n)).collect()
        );
    }
    let marker = |n: u64| {
        let h = fleet[1].handle.clone();
        move || async move {
            h.broadcast(room, json!({ "marker": n }))
                .await
                .expect("marker");
        }
    };
    let seen = notices_until_marker(&mut watcher, 1, marker(1)).await;
    assert_eq!(
        kinds(&seen),
        [pair("fanout.join", "alice"), pair("fanout.join", "bob")],
        "one join per user, however many sockets and nodes: {seen:?}"
    );

    // One socket of each goes: both are still members, nobody is told anything.
    alice1.close(None).await.expect("close");
    bob3.send(Message::Close(None)).await.expect("close");
    wait_members(
        &fleet[0].handle,
        room,
        &[("alice", 1), ("bob", 1), ("watcher", 1)],
    )
    .await;
    let seen = notices_until_marker(&mut watcher, 2, marker(2)).await;
    assert!(seen.is_empty(), "no leave while a socket remains: {seen:?}");

    // Their last sockets go (one closed, one dropped without a close frame): one leave each.
    drop(alice2);
    drop(bob2);
    wait_members(&fleet[1].handle, room, &[("watcher", 1)]).await;
    let seen = notices_until_marker(&mut watcher, 3, marker(3)).await;
    let mut got = kinds(&seen);
    got.sort();
    assert_eq!(
        got,
        [pair("fanout.leave", "alice"), pair("fanout.leave", "bob")]
    );
    let versions: Vec<u64> = seen
        .iter()
        .map(|n| n["version"].as_u64().expect("v"))
        .collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
}

#[tokio::test]
async fn a_node_shutting_down_takes_its_members_out_at_once() {
    let redis = RedisServer::start();
    let fleet = nodes(&redis, 2, Duration::from_secs(30)).await;
    let room = "bye";
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let _erin = member(fleet[1].server.addr, room, "erin").await;
    let _erin_here = member(fleet[0].server.addr, room, "erin").await;
    let _frank = member(fleet[1].server.addr, room, "frank").await;
    wait_members(
        &fleet[0].handle,
        room,
        &[("erin", 2), ("frank", 1), ("watcher", 1)],
    )
    .await;
    assert!(fleet[1].handle.shutdown().await, "clean shutdown");
    // Synced before `shutdown` returned: no waiting for the lease to run out.
    let left = members(&fleet[0].handle, room).await.expect("members");
    assert_eq!(
        left,
        [("erin".to_owned(), 1), ("watcher".to_owned(), 1)]
            .into_iter()
            .collect()
    );
    let h = fleet[0].handle.clone();
    let seen = notices_until_marker(&mut watcher, 1, || async move {
        h.broadcast(room, json!({ "marker": 1 }))
            .await
            .expect("marker");
    })
    .await;
    let after_joins: Vec<_> = kinds(&seen)
        .into_iter()
        .filter(|(k, _)| k == "fanout.leave")
        .collect();
    assert_eq!(after_joins, [pair("fanout.leave", "frank")]);
}

#[tokio::test]
async fn presence_is_opt_in_per_room_and_members_are_validated() {
    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .room_presence("with")
        .build()
        .expect("valid url");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let err = handle.presence("without").await.expect_err("no presence");
    assert!(err.is_presence_off(), "{err:?}");
    let (status, _) = http(server.addr, "GET", "/rooms/without/presence", "").await;
    assert_eq!(status, 404);
    // A room without presence: the chat app falls back to a plain join, and no notices.
    let mut plain = member(server.addr, "without", "zed").await;
    let mut with = member(server.addr, "with", "amy").await;
    wait_members(&handle, "with", &[("amy", 1)]).await;
    assert_eq!(
        handle.presence_count("with").await.expect("count").members,
        1
    );
    handle
        .broadcast("without", json!({ "marker": 1 }))
        .await
        .expect("marker");
    assert_eq!(
        json_of(&recv_text(&mut plain, "marker").await),
        json!({ "marker": 1 })
    );
    assert_eq!(first_notices(&mut with).await.0["type"], "fanout.join");
    // A user id over 256 bytes closes the socket with 1008.
    let long = "x".repeat(300);
    let mut bad = member(server.addr, "with", &long).await;
    let close = recv_close(&mut bad).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1008);
}

#[tokio::test]
async fn redis_restarted_the_list_is_restored_without_spurious_notices() {
    let mut redis = RedisServer::start();
    let ttl = Duration::from_secs(3);
    let fleet = nodes(&redis, 2, ttl).await;
    let room = "phoenix";
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let _alice = member(fleet[0].server.addr, room, "alice").await;
    let _bob1 = member(fleet[1].server.addr, room, "bob").await;
    let _bob2 = member(fleet[0].server.addr, room, "bob").await;
    let gone = member(fleet[1].server.addr, room, "gone").await;
    let stay = [("alice", 1), ("bob", 2), ("watcher", 1)];
    let mut all = stay.to_vec();
    all.push(("gone", 1));
    wait_members(&fleet[1].handle, room, &all).await;
    let publish = |n: u64| {
        let h = fleet[1].handle.clone();
        move || async move {
            h.broadcast(room, json!({ "marker": n }))
                .await
                .expect("marker");
        }
    };
    notices_until_marker(&mut watcher, 1, publish(1)).await;
    let before = fleet[0].handle.presence(room).await.expect("snapshot");

    let epoch_key = "__axum_fanout:presence:ws:room:epoch";
    let epoch = redis.cli(&["GET", epoch_key]);
    // Redis goes away (--save "": every key is lost), and "gone" leaves meanwhile.
    redis.stop();
    drop(gone);
    wait_until("the node saw gone's socket close", || async {
        fleet[1].handle.stats().connections == 1
    })
    .await;
    redis.restart();
    let restarted = Instant::now();
    wait_until("both nodes subscribed again", || async {
        redis.numsub("ws:room:phoenix") == 2
    })
    .await;
    wait_members(&fleet[0].handle, room, &stay).await;
    let took = restarted.elapsed();
    println!("presence restored {took:?} after a redis restart (ttl {ttl:?})");
    assert_ne!(redis.cli(&["GET", epoch_key]), epoch, "redis lost its data");
    assert!(took <= ttl + Duration::from_secs(2), "restored in {took:?}");
    let after = fleet[1].handle.presence(room).await.expect("snapshot");
    assert!(
        after.version >= before.version,
        "versions keep growing across the data loss: {} then {}",
        before.version,
        after.version
    );
    // The watcher is told that "gone" left (once every node had time to re-assert), and
    // nothing about the members that did not change.
    let mut seen = Vec::new();
    loop {
        let frame = json_of(&recv_text(&mut watcher, "gone's leave").await);
        let kind = frame["type"].as_str().unwrap_or_default().to_owned();
        if kind == "fanout.join" || kind == "fanout.leave" {
            seen.push(frame);
            if kind == "fanout.leave" {
                break;
            }
        }
    }
    println!(
        "leave of a user gone during the outage: {:?} after the restart",
        restarted.elapsed()
    );
    seen.extend(notices_until_marker(&mut watcher, 2, publish(2)).await);
    assert_eq!(kinds(&seen), [pair("fanout.leave", "gone")], "{seen:?}");
}

#[tokio::test]
async fn snapshot_plus_newer_events_equal_redis_after_churn() {
    let redis = RedisServer::start();
    let fleet = nodes(&redis, 2, Duration::from_secs(30)).await;
    let room = "churn";
    let addrs = [fleet[0].server.addr, fleet[1].server.addr];
    let mut follower = member(addrs[0], room, "follower").await;
    wait_members(&fleet[0].handle, room, &[("follower", 1)]).await;

    // Churn: 8 clients each open a socket as the next of their 3 users on alternate nodes and
    // drop the previous one (a leave and a join each time); each keeps its last socket open.
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let churners: Vec<_> = (0..8usize)
        .map(|c| {
            let started = started.clone();
            tokio::spawn(async move {
                let mut last = None;
                for i in 0..12usize {
                    let user = format!("u{c}-{}", i % 3);
                    let ws = member(addrs[(c + i) % 2], room, &user).await;
                    started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    last = Some((user, ws)); // drops the previous socket
                }
                last.expect("a socket")
            })
        })
        .collect();
    // The client follows the events, and asks for the list mid-churn.
    wait_until("churn under way", || async {
        started.load(std::sync::atomic::Ordering::Relaxed) >= 20
    })
    .await;
    let snapshot = presence_http(addrs[1], room).await;
    let mut view: BTreeSet<String> = members_of(&snapshot).into_keys().collect();
    let mut version = snapshot["version"].as_u64().expect("version");
    let mut kept = Vec::new();
    for c in churners {
        kept.push(c.await.expect("churner"));
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (user, _) in &kept {
        *want.entry(user.clone()).or_default() += 1;
    }
    want.insert("follower".to_owned(), 1);
    let want_pairs: Vec<(&str, u64)> = want.iter().map(|(u, n)| (u.as_str(), *n)).collect();
    wait_members(&fleet[1].handle, room, &want_pairs).await;
    let h = fleet[0].handle.clone();
    let notices = notices_until_marker(&mut follower, 1, || async move {
        h.broadcast(room, json!({ "marker": 1 }))
            .await
            .expect("marker");
    })
    .await;
    let mut applied = 0;
    for n in &notices {
        let v = n["version"].as_u64().expect("version");
        if v <= version {
            continue; // already in the snapshot
        }
        version = v;
        applied += 1;
        let user = n["user"].as_str().expect("user").to_owned();
        match n["type"].as_str() {
            Some("fanout.join") => assert!(view.insert(user), "joined twice: {n}"),
            _ => assert!(view.remove(&user), "left without being there: {n}"),
        }
    }
    let redis_view: BTreeSet<String> = want.into_keys().collect();
    assert_eq!(view, redis_view, "snapshot + {applied} newer events");
    assert!(applied > 0, "the snapshot was taken mid-churn");
    let evalsha = redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_evalsha:").map(str::to_owned))
        .unwrap_or_default();
    println!(
        "churn: {} notices, {applied} newer than the snapshot; script calls (sync, lease, \
         reap, query): {evalsha}",
        notices.len()
    );
}

#[tokio::test]
async fn ten_thousand_members_cost_of_listing_counting_and_reaping() {
    let redis = RedisServer::start();
    let fleet = nodes(&redis, 1, Duration::from_secs(30)).await;
    for members in [1_000, 10_000] {
        big_room_costs(&redis, &fleet[0].handle, members).await;
    }
}

/// A node `holder` with `members` users (`user-00000`, ...) in `room`, written straight into
/// Redis as its sync script would, with a lease that does not run out. Returns a connection to
/// change the lease with.
async fn populate_share(
    redis: &RedisServer,
    room: &str,
    holder: &str,
    members: usize,
) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let tag = format!("{{ws:room:{room}}}");
    let mut members_cmd = redis::cmd("HSET");
    let mut share_cmd = redis::cmd("HSET");
    members_cmd.arg(format!("{tag}:members"));
    share_cmd.arg(format!("{tag}:node:{holder}"));
    for i in 0..members {
        let user = format!("user-{i:05}");
        members_cmd.arg(&user).arg(1);
        share_cmd.arg(&user).arg(1);
    }
    let fleet_base = "__axum_fanout:presence:ws:room:";
    let _: () = redis::pipe()
        .add_command(members_cmd)
        .ignore()
        .add_command(share_cmd)
        .ignore()
        .cmd("SADD")
        .arg(format!("{tag}:nodes"))
        .arg(holder)
        .ignore()
        .cmd("SADD")
        .arg(format!("{fleet_base}rooms:{holder}"))
        .arg(room)
        .ignore()
        .cmd("ZADD")
        .arg(format!("{fleet_base}leases"))
        .arg(i64::MAX / 2)
        .arg(holder)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("populate");
    conn
}

/// Lists and counts a room of `members` members many times, then lets their node die, and
/// prints what each cost the caller and Redis.
async fn big_room_costs(redis: &RedisServer, handle: &RoomHandle, members: usize) {
    let room = format!("big{members}");
    let room = room.as_str();
    let bulk = format!("bulk{members}");
    let mut conn = populate_share(redis, room, &bulk, members).await;
    let fleet_base = "__axum_fanout:presence:ws:room:";

    // Redis's own time (every command, `INFO commandstats`) since the last reset, in us.
    let redis_usec = |redis: &RedisServer| -> f64 {
        redis
            .cli(&["INFO", "commandstats"])
            .lines()
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_config"))
            .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
            .filter_map(|n| n.parse::<f64>().ok())
            .sum()
    };
    // Warm up (loads the scripts), then measure.
    assert_eq!(
        handle.presence(room).await.expect("list").members.len(),
        members
    );
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    let rounds = 20u32;
    let t = Instant::now();
    for _ in 0..rounds {
        let s = handle.presence(room).await.expect("list");
        assert_eq!(s.members.len(), members);
    }
    let list = t.elapsed() / rounds;
    let list_redis = redis_usec(redis) / f64::from(rounds);
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    let rounds = 200u32;
    let t = Instant::now();
    for _ in 0..rounds {
        let c = handle.presence_count(room).await.expect("count");
        assert_eq!(c.members, members as u64);
    }
    let count = t.elapsed() / rounds;
    let count_redis = redis_usec(redis) / f64::from(rounds);
    // The bulk node dies: the next query takes its 10,000 members out (10,000 leave events),
    // a chunk per script call; the slow log keeps the calls over 1 ms.
    let _ = redis.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "1000"]);
    let _ = redis.cli(&["CONFIG", "SET", "slowlog-max-len", "1000"]);
    let _ = redis.cli(&["SLOWLOG", "RESET"]);
    let _: () = redis::cmd("ZADD")
        .arg(format!("{fleet_base}leases"))
        .arg(0)
        .arg(&bulk)
        .query_async(&mut conn)
        .await
        .expect("expire");
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    let t = Instant::now();
    let after = handle.presence_count(room).await.expect("count");
    let reap = t.elapsed();
    let reap_redis = redis_usec(redis);
    assert_eq!(after.members, 0, "no ghost of the dead node");
    // Slow log entries: [id, time, duration (us), [command, args..], ..].
    let log: Vec<Vec<redis::Value>> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1000)
        .query_async(&mut conn)
        .await
        .expect("slowlog");
    let _ = redis.cli(&["CONFIG", "SET", "slowlog-log-slower-than", "10000"]);
    let calls = redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let scripts: Vec<i64> = log
        .iter()
        .filter(|e| {
            matches!(e.get(3), Some(redis::Value::Array(args))
                if matches!(args.first(), Some(redis::Value::BulkString(c)) if c.eq_ignore_ascii_case(b"evalsha")))
        })
        .filter_map(|e| match e.get(2) {
            Some(redis::Value::Int(us)) => Some(*us),
            _ => None,
        })
        .collect();
    let slowest = scripts.iter().copied().max().unwrap_or(0);
    println!(
        "presence, {members} members in one room: list {:.2} ms per call (redis {:.0} us), \
         count {:.3} ms per call (redis {:.1} us), reaping a dead node's {members} members \
         {:.1} ms (redis {:.0} us in {} script calls, the longest {slowest} us; {members} leave \
         events)",
        list.as_secs_f64() * 1e3,
        list_redis,
        count.as_secs_f64() * 1e3,
        count_redis,
        reap.as_secs_f64() * 1e3,
        reap_redis,
        calls,
    );
}

#[tokio::test]
async fn a_dead_nodes_share_larger_than_a_chunk_leaves_once_per_user_in_version_order() {
    // The dead node's 1,000 users are taken out a bounded chunk per script call (so Redis is
    // never blocked for long), by two nodes racing through their reapers and their queries:
    // every user still leaves exactly once, and the versions of the leaves follow one another.
    let redis = RedisServer::start();
    let fleet = nodes(&redis, 2, Duration::from_secs(30)).await;
    let room = "huge";
    let users = 1_000;
    let mut conn = populate_share(&redis, room, "gone", users).await;
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let (own_join, _) = first_notices(&mut watcher).await;
    let mut version = own_join["version"].as_u64().expect("version");
    assert_eq!(
        fleet[1]
            .handle
            .presence_count(room)
            .await
            .expect("count")
            .members,
        users as u64 + 1
    );

    let _: () = redis::cmd("ZADD")
        .arg("__axum_fanout:presence:ws:room:leases")
        .arg(0)
        .arg("gone")
        .query_async(&mut conn)
        .await
        .expect("expire the lease");
    let _ = redis.cli(&["CONFIG", "RESETSTAT"]);
    // Both nodes' reapers notice within a second; meanwhile both nodes' queries race them.
    let queries = fleet.iter().map(|n| {
        let h = n.handle.clone();
        async move { h.presence(room).await.expect("list") }
    });
    for snapshot in futures_util::future::join_all(queries).await {
        let users: Vec<&str> = snapshot.members.iter().map(|m| m.user.as_str()).collect();
        assert_eq!(
            users,
            ["watcher"],
            "a listing never shows the dead node's users"
        );
    }
    let mut left = BTreeSet::new();
    while left.len() < users {
        let frame = json_of(&recv_text(&mut watcher, "the dead node's leaves").await);
        assert_eq!(frame["type"], "fanout.leave", "{frame}");
        let v = frame["version"].as_u64().expect("version");
        assert_eq!(v, version + 1, "versions follow one another: {frame}");
        version = v;
        let user = frame["user"].as_str().expect("user").to_owned();
        assert!(left.insert(user), "left twice: {frame}");
    }
    let evalsha_calls: u64 = redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        evalsha_calls >= 4,
        "1,000 users take several bounded calls, not one: {evalsha_calls} script calls"
    );
    let h = fleet[1].handle.clone();
    let rest = notices_until_marker(&mut watcher, 1, || async move {
        h.broadcast(room, json!({ "marker": 1 }))
            .await
            .expect("marker");
    })
    .await;
    assert!(rest.is_empty(), "nothing after the last leave: {rest:?}");
    let count = fleet[0].handle.presence_count(room).await.expect("count");
    assert_eq!((count.members, count.version), (1, version));
}

// ---------------------------------------------------------------------------------------------
// The `chat` example as separate processes: a node killed with SIGKILL
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chat_process_killed_with_sigkill_leaves_no_ghosts() {
    let bin = chat_binary();
    let redis = RedisServer::start();
    let ttl_s = 2;
    let ttl = ttl_s.to_string();
    let mut procs = Vec::new();
    for i in 1..=3 {
        let env = [("PRESENCE", "1"), ("PRESENCE_TTL_S", ttl.as_str())];
        procs.push(ChatProcess::start(&bin, &redis, &format!("p{i}"), &env).await);
    }
    let room = "crash";
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let addr = |i: usize| addrs[i];
    let mut watcher = member(addr(0), room, "watcher").await;
    let _carol2 = member(addr(1), room, "carol").await;
    let _carol3 = member(addr(2), room, "carol").await;
    let _dave3 = member(addr(2), room, "dave").await;
    let _dave3b = member(addr(2), room, "dave").await;
    let want: BTreeMap<String, u64> = [("carol", 2), ("dave", 2), ("watcher", 1)]
        .iter()
        .map(|(u, n)| ((*u).to_owned(), *n))
        .collect();
    wait_until("every member listed", || async {
        members_of(&presence_http(addr(0), room).await) == want
    })
    .await;
    let post_marker = |n: u64| {
        let a = addr(0);
        move || async move {
            let (status, body) = http(
                a,
                "POST",
                &format!("/rooms/{room}/messages"),
                &json!({ "marker": n }).to_string(),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    notices_until_marker(&mut watcher, 1, post_marker(1)).await;

    // SIGKILL: no shutdown, no leave sent by the node itself.
    procs[2].kill();
    let killed = Instant::now();
    let bound = Duration::from_secs(ttl_s) + Duration::from_secs(3);
    let leave = loop {
        let frame = tokio::time::timeout_at(killed + bound, watcher.next())
            .await
            .unwrap_or_else(|_| panic!("no leave for dave within {bound:?}"));
        let Some(Ok(Message::Text(text))) = frame else {
            continue;
        };
        let frame = json_of(&text);
        if frame["type"] == "fanout.leave" {
            break frame;
        }
    };
    let took = killed.elapsed();
    println!("kill -9 to the leave notice: {took:?} (PRESENCE_TTL_S={ttl_s})");
    assert_eq!(leave["user"], "dave", "carol still has a socket: {leave}");
    assert_eq!(leave["room"], room);
    let rest = presence_http(addr(1), room).await;
    assert_eq!(
        members_of(&rest),
        [("carol".to_owned(), 1), ("watcher".to_owned(), 1)]
            .into_iter()
            .collect()
    );
    // Exactly once, though two survivors were looking: nothing else before the next marker.
    let seen = notices_until_marker(&mut watcher, 2, post_marker(2)).await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn in_a_durable_room_a_positions_socket_gets_presence_notices_as_they_are() {
    // Presence notices travel as envelopes on the room's channel; in a durable room a socket
    // that asked for positions must still get them as `fanout.*` notices, not as deliveries.
    let redis = RedisServer::start();
    let layer = FanoutLayer::builder(redis.url())
        .presence(true)
        .durable(axum_fanout::durable::Durability::default())
        .build()
        .expect("valid url");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let url = |user: &str| server.ws_url(&format!("/ws?room=both&user={user}&positions=1"));
    let mut a = connect(&url("a")).await;
    wait_members(&handle, "both", &[("a", 1)]).await;
    let _b = connect(&url("b")).await;
    loop {
        let frame = json_of(&recv_text(&mut a, "b's join").await);
        assert!(
            frame.get("payload").is_none_or(|p| p.get("type").is_none()),
            "a notice wrapped as a delivery: {frame}"
        );
        if frame["type"] == "fanout.join" && frame["user"] == "b" {
            break;
        }
    }
}
