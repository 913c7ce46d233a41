//! The presence scenarios that run on one Redis server (`tests/presence.rs`) and on a Redis
//! Cluster (`tests/presence_cluster.rs`): one body each, given the deployment, and the helpers
//! they share.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use axum_fanout::{FanoutBuilder, FanoutLayer, RoomHandle};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::chat_app;
use crate::support::*;

/// The Redis deployment a scenario runs on.
#[derive(Clone, Copy)]
pub enum Redis<'a> {
    Server(&'a RedisServer),
    #[cfg(feature = "cluster")]
    Cluster(&'a RedisCluster),
}

/// A direct connection to the deployment, to write presence keys as a node would.
pub enum Direct {
    Server(redis::aio::MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Direct {
    pub async fn run<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        match self {
            Direct::Server(c) => cmd.query_async(c).await.expect("redis command"),
            #[cfg(feature = "cluster")]
            Direct::Cluster(c) => cmd.query_async(c).await.expect("redis command"),
        }
    }
}

impl Redis<'_> {
    /// A layer builder for this deployment.
    pub fn builder(&self) -> FanoutBuilder {
        match self {
            Redis::Server(r) => FanoutLayer::builder(r.url()),
            #[cfg(feature = "cluster")]
            Redis::Cluster(c) => FanoutLayer::builder(c.urls()),
        }
    }

    /// The name of the fleet key `name` (`leases`, `epoch`, `rooms:<node>`): on a cluster the
    /// fleet's keys share a hash tag.
    pub fn fleet_key(&self, name: &str) -> String {
        match self {
            Redis::Server(_) => format!("__axum_fanout:presence:ws:room:{name}"),
            #[cfg(feature = "cluster")]
            Redis::Cluster(_) => format!("{{__axum_fanout:presence:ws:room:}}{name}"),
        }
    }

    pub async fn direct(&self) -> Direct {
        match self {
            Redis::Server(r) => {
                let client = redis::Client::open(r.url()).expect("url");
                Direct::Server(
                    client
                        .get_multiplexed_async_connection()
                        .await
                        .expect("connect"),
                )
            }
            #[cfg(feature = "cluster")]
            Redis::Cluster(c) => {
                let client = redis::cluster::ClusterClient::new(c.urls()).expect("urls");
                Direct::Cluster(client.get_async_connection().await.expect("connect"))
            }
        }
    }

    /// The running servers (on a cluster, every node: replicas report no calls).
    fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Redis::Server(r) => vec![r],
            #[cfg(feature = "cluster")]
            Redis::Cluster(c) => c.nodes.iter().filter(|n| n.is_running()).collect(),
        }
    }

    /// `CONFIG RESETSTAT` everywhere.
    pub fn reset_stats(&self) {
        for s in self.servers() {
            let _ = s.cli(&["CONFIG", "RESETSTAT"]);
        }
    }

    /// Script calls (`EVALSHA`) since the last reset, over every server.
    pub fn evalsha_calls(&self) -> u64 {
        self.servers()
            .iter()
            .filter_map(|s| {
                s.cli(&["INFO", "commandstats"])
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("cmdstat_evalsha:calls="))
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }
}

/// One in-process chat node.
pub struct Node {
    pub server: TestServer,
    pub handle: RoomHandle,
}

/// `n` in-process chat nodes with presence for every room (ids `n1`, `n2`, ...).
pub async fn nodes(redis: &Redis<'_>, n: usize, ttl: Duration) -> Vec<Node> {
    let layers = (1..=n).map(|i| {
        redis
            .builder()
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

pub fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// user -> connections, from a `GET /rooms/NAME/presence` body or a snapshot.
pub fn members_of(body: &Value) -> BTreeMap<String, u64> {
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

pub async fn presence_http(addr: SocketAddr, room: &str) -> Value {
    let (status, body) = http(addr, "GET", &format!("/rooms/{room}/presence"), "").await;
    assert_eq!(status, 200, "{body}");
    json_of(&body)
}

/// The members `handle` lists, or `None` while Redis does not answer (it is restarting).
pub async fn members(handle: &RoomHandle, room: &str) -> Option<BTreeMap<String, u64>> {
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
pub async fn wait_members(handle: &RoomHandle, room: &str, want: &[(&str, u64)]) {
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
pub async fn member(addr: SocketAddr, room: &str, user: &str) -> Ws {
    connect(&format!("ws://{addr}/ws?room={room}&user={user}")).await
}

/// Presence notices (`fanout.join` / `fanout.leave`) read from `ws` up to the marker `n`, which
/// `publish` broadcasts into the room: everything the room sent before the marker.
pub async fn notices_until_marker<F, Fut>(ws: &mut Ws, n: u64, publish: F) -> Vec<Value>
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
pub async fn first_notices(ws: &mut Ws) -> (Value, Value) {
    let a = json_of(&recv_text(ws, "own join or fanout.member").await);
    let b = json_of(&recv_text(ws, "own join or fanout.member").await);
    if a["type"] == "fanout.member" {
        (b, a)
    } else {
        (a, b)
    }
}

/// (type, user) of each notice, in order.
pub fn kinds(notices: &[Value]) -> Vec<(String, String)> {
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

pub fn pair(kind: &str, user: &str) -> (String, String) {
    (kind.to_owned(), user.to_owned())
}

/// A node `holder` with `members` users (`user-00000`, ...) in `room`, written straight into
/// Redis as its sync script would, with a lease that does not run out. Returns a connection to
/// change the lease with.
pub async fn populate_share(redis: &Redis<'_>, room: &str, holder: &str, members: usize) -> Direct {
    let mut conn = redis.direct().await;
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
    let _: () = conn.run(&members_cmd).await;
    let _: () = conn.run(&share_cmd).await;
    let _: () = conn
        .run(redis::cmd("SADD").arg(format!("{tag}:nodes")).arg(holder))
        .await;
    let _: () = conn
        .run(
            redis::cmd("SADD")
                .arg(redis.fleet_key(&format!("rooms:{holder}")))
                .arg(room),
        )
        .await;
    let _: () = conn
        .run(
            redis::cmd("ZADD")
                .arg(redis.fleet_key("leases"))
                .arg(i64::MAX / 2)
                .arg(holder),
        )
        .await;
    conn
}

/// Makes `holder`'s lease run out, as if it died.
pub async fn expire_lease(redis: &Redis<'_>, conn: &mut Direct, holder: &str) {
    let _: () = conn
        .run(
            redis::cmd("ZADD")
                .arg(redis.fleet_key("leases"))
                .arg(0)
                .arg(holder),
        )
        .await;
}

// ---------------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------------

pub async fn two_users_on_three_nodes(redis: &Redis<'_>) {
    let fleet = nodes(redis, 3, Duration::from_secs(30)).await;
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

pub async fn a_node_shutting_down(redis: &Redis<'_>) {
    let fleet = nodes(redis, 2, Duration::from_secs(30)).await;
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

pub async fn snapshot_plus_newer_events_after_churn(redis: &Redis<'_>) {
    let fleet = nodes(redis, 2, Duration::from_secs(30)).await;
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
    println!(
        "churn: {} notices, {applied} newer than the snapshot; script calls (sync, lease, \
         reap, query): {}",
        notices.len(),
        redis.evalsha_calls()
    );
}

/// Returns the fleet and the direct connection, for a caller that checks more.
pub async fn a_dead_nodes_large_share_leaves_once_per_user(
    redis: &Redis<'_>,
) -> (Vec<Node>, Direct) {
    // The dead node's 1,000 users are taken out a bounded chunk per script call (so Redis is
    // never blocked for long), by two nodes racing through their reapers and their queries:
    // every user still leaves exactly once, and the versions of the leaves follow one another.
    let fleet = nodes(redis, 2, Duration::from_secs(30)).await;
    let room = "huge";
    let users = 1_000;
    let mut conn = populate_share(redis, room, "gone", users).await;
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

    expire_lease(redis, &mut conn, "gone").await;
    redis.reset_stats();
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
    let evalsha_calls = redis.evalsha_calls();
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
    (fleet, conn)
}

/// A chat node on a runtime of its own (one worker thread, in a thread of its own) that can
/// freeze at once: a task that blocks the runtime's only worker stops every other one where
/// it is (no sync, no lease renewal, sockets left open and silent), as SIGSTOP stops a
/// process. Stopped for good on drop.
pub struct FrozenNode {
    pub addr: SocketAddr,
    tell: std::sync::mpsc::Sender<()>,
    thaw: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FrozenNode {
    /// Starts a node built from `builder`, on its own runtime (a layer starts its tasks on the
    /// runtime it is built in).
    pub async fn start(builder: FanoutBuilder) -> Self {
        let (ready, addr) = tokio::sync::oneshot::channel();
        let (tell, told) = std::sync::mpsc::channel::<()>();
        let (thaw, thawed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let node = runtime.block_on(async move {
                let layer = builder.build().expect("valid url");
                let handle = layer.handle();
                let server = TestServer::start(chat_app::app(layer)).await;
                wait_until("frozen node ready", || async { handle.is_ready() }).await;
                let _ = ready.send(server.addr);
                (server, handle)
            });
            // Freeze: the only worker blocks in this task until thawed.
            let _ = told.recv();
            runtime.spawn(async move {
                let _ = thawed.recv();
            });
            let _ = told.recv(); // the end
            drop(node);
            runtime.shutdown_background();
        });
        let addr = addr.await.expect("the node started");
        Self {
            addr,
            tell,
            thaw: Some(thaw),
            thread: Some(thread),
        }
    }

    /// Freezes the node (once).
    pub fn freeze(&self) {
        let _ = self.tell.send(());
    }
}

impl Drop for FrozenNode {
    fn drop(&mut self) {
        let _ = self.tell.send(());
        let _ = self.tell.send(());
        drop(self.thaw.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A node stops (frozen, as under SIGSTOP: it neither syncs nor renews its lease) with two
/// users connected: the one with a socket on a survivor stays, the other leaves, told once
/// although two survivors are looking, within the TTL plus the reaper's second.
pub async fn a_node_that_dies_is_reaped_once(redis: &Redis<'_>) {
    let ttl = Duration::from_secs(2);
    let fleet = nodes(redis, 2, ttl).await;
    let builder = redis
        .builder()
        .node_id("mortal")
        .presence(true)
        .presence_ttl(ttl);
    let mortal = FrozenNode::start(builder).await;
    let room = "crash";
    let mut watcher = member(fleet[0].server.addr, room, "watcher").await;
    let _carol = member(fleet[1].server.addr, room, "carol").await;
    let _carol_mortal = member(mortal.addr, room, "carol").await;
    let _dave = member(mortal.addr, room, "dave").await;
    let _dave_again = member(mortal.addr, room, "dave").await;
    let all = [("carol", 2), ("dave", 2), ("watcher", 1)];
    wait_members(&fleet[1].handle, room, &all).await;
    let marker = |n: u64| {
        let h = fleet[0].handle.clone();
        move || async move {
            h.broadcast(room, json!({ "marker": n }))
                .await
                .expect("marker");
        }
    };
    notices_until_marker(&mut watcher, 1, marker(1)).await;

    mortal.freeze();
    let stopped = Instant::now();
    let bound = ttl + Duration::from_secs(3);
    let leave = loop {
        let text =
            tokio::time::timeout_at(stopped + bound, recv_text(&mut watcher, "dave's leave"))
                .await
                .unwrap_or_else(|_| panic!("no leave for dave within {bound:?}"));
        let frame = json_of(&text);
        if frame["type"] == "fanout.leave" {
            break frame;
        }
    };
    let took = stopped.elapsed();
    println!("node stopped to the leave notice: {took:?} (ttl {ttl:?})");
    assert!(
        took >= ttl / 2,
        "told by the survivors' reaper once the lease ran out, not by the node: {took:?}"
    );
    assert_eq!(leave["user"], "dave", "carol still has a socket: {leave}");
    for node in &fleet {
        wait_members(&node.handle, room, &[("carol", 1), ("watcher", 1)]).await;
    }
    let seen = notices_until_marker(&mut watcher, 2, marker(2)).await;
    assert!(
        seen.is_empty(),
        "one leave, though two survivors reap: {seen:?}"
    );
}
