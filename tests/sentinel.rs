//! Redis Sentinel against real processes: a master, its replica and three sentinels started by
//! each test (`support::SentinelGroup`). Nodes find the master through the sentinels, follow a
//! failover (the master killed under traffic) as a link loss, telling every loss or repairing
//! it, and never keep publishing to a master that was demoted.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/chat_app/mod.rs"]
mod chat_app;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum_fanout::durable::Durability;
use axum_fanout::{FanoutLayer, RoomHandle};
use serde_json::{Value, json};
use support::*;

const PLAIN: &str = "p";
const DURABLE: &str = "d";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A node on the group's sentinels: quick probes, and the default reconnect backoff (up to
/// 2 s): the node follows a failover sooner because the sentinels announce it. `DURABLE` keeps
/// its whole history.
fn layer(group: &SentinelGroup, id: &str) -> FanoutLayer {
    let whole = NonZeroUsize::new(100_000).expect("non-zero");
    FanoutLayer::builder(group.url())
        .node_id(id)
        .durable_room(
            DURABLE,
            Durability::default().history(whole).replay_limit(whole),
        )
        .probe_interval(Duration::from_millis(200))
        .probe_timeout(Duration::from_millis(500))
        .publish_timeout(Duration::from_millis(500))
        .subscribe_timeout(Duration::from_secs(2))
        .build()
        .expect("layer")
}

/// What one socket read until the end marker.
#[derive(Debug, Default)]
struct Seen {
    /// Payload `n`s in the order received.
    ns: Vec<u64>,
    /// Loss windows told (`fanout.missed`: since, until).
    windows: Vec<(u64, u64)>,
}

/// Reads `ws` until the `{"end":true}` payload. In the durable room (`positions=1`) checks as
/// it goes that seqs follow each other with no gap and no repeat, except across a loss notice
/// (the room may move to a new epoch, numbered from 1).
async fn read_to_end(mut ws: Ws, name: String) -> Seen {
    let mut seen = Seen::default();
    let mut last_seq: Option<u64> = None;
    loop {
        let text = recv_text(&mut ws, &format!("{name}: the end marker")).await;
        let frame: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
        match frame["type"].as_str() {
            Some("fanout.missed") => {
                let at = |k: &str| frame[k].as_u64().expect("since and until");
                seen.windows.push((at("since"), at("until")));
                last_seq = None;
                continue;
            }
            Some(_) => continue, // other notices (the join's position)
            None => {}
        }
        let payload = match frame.get("seq") {
            Some(seq) => {
                let seq = seq.as_u64().expect("seq");
                if let Some(last) = last_seq {
                    assert_eq!(seq, last + 1, "{name}: a gap or a repeat: {frame}");
                }
                last_seq = Some(seq);
                &frame["payload"]
            }
            None => &frame,
        };
        if payload["end"] == true {
            return seen;
        }
        seen.ns.push(payload["n"].as_u64().expect("n"));
    }
}

/// One broadcast of the stream: when it was made, by which node, and how it ended.
#[derive(Debug, Clone, Copy)]
struct Sent {
    before_ms: u64,
    node: usize,
    /// `Some((ok, when))` once its receipt resolved.
    outcome: Option<(bool, u64)>,
}

type Log = Arc<Mutex<BTreeMap<(&'static str, u64), Sent>>>;

/// Broadcasts `{"n":n}` to both rooms every 4 ms, from the nodes in turn, until `stop`.
fn stream(
    handles: Vec<RoomHandle>,
    log: Log,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(4));
        let mut receipts = Vec::new();
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            let node = (n % handles.len() as u64) as usize;
            for room in [PLAIN, DURABLE] {
                let before_ms = now_ms();
                let sent = Sent {
                    before_ms,
                    node,
                    outcome: None,
                };
                log.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert((room, n), sent);
                let Ok(receipt) = handles[node]
                    .broadcast(room, json!({ "n": n }))
                    .queue()
                    .await
                else {
                    continue;
                };
                let log = log.clone();
                receipts.push(tokio::spawn(async move {
                    let ok = receipt.await.is_ok();
                    if let Some(s) = log
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_mut(&(room, n))
                    {
                        s.outcome = Some((ok, now_ms()));
                    }
                }));
            }
        }
        for r in receipts {
            let _ = r.await;
        }
    })
}

/// The master killed under traffic from three nodes: the sentinels promote the replica and the
/// fleet follows within the failover time plus a second (every node ready again and publishing).
/// Nothing is lost silently: every message a socket lacks lies in a loss window it was told; the
/// durable room repairs its gap from history, or moves to a new epoch and says so. The old
/// master, started again (Sentinel turns it into a replica), gets no connection from the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_follows_a_failover_under_traffic_and_tells_every_loss() {
    let mut group = tokio::task::block_in_place(|| SentinelGroup::start(1000));
    let old = group.master.port();
    let nodes = start_nodes(
        ["s1", "s2", "s3"].map(|id| layer(&group, id)),
        chat_app::app,
    )
    .await;
    let handles: Vec<RoomHandle> = nodes.iter().map(|(_, h)| h.clone()).collect();
    let mut readers = Vec::new();
    let mut epoch = None;
    for (i, (server, _)) in nodes.iter().enumerate() {
        let mut ws = connect(&server.ws_url(&format!("/ws?room={DURABLE}&positions=1"))).await;
        let position: Value =
            serde_json::from_str(&recv_text(&mut ws, "the join's position").await).expect("json");
        assert_eq!(position["type"], "fanout.position", "{position}");
        epoch = position["epoch"].as_str().map(str::to_owned);
        readers.push((
            DURABLE,
            tokio::spawn(read_to_end(ws, format!("{DURABLE}@s{}", i + 1))),
        ));
        let ws = connect(&server.ws_url(&format!("/ws?room={PLAIN}"))).await;
        readers.push((
            PLAIN,
            tokio::spawn(read_to_end(ws, format!("{PLAIN}@s{}", i + 1))),
        ));
    }
    wait_until("every node subscribed on the master", || async {
        group.master.numsub(&format!("ws:room:{PLAIN}")) == 3
            && group.master.numsub(&format!("ws:room:{DURABLE}")) == 3
    })
    .await;

    let log: Log = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = stream(handles.clone(), log.clone(), stopped);
    tokio::time::sleep(Duration::from_millis(500)).await; // ok: timed traffic before the kill, not a wait
    let killed_at = now_ms();
    group.master.stop();
    let new = tokio::task::block_in_place(|| group.wait_switch(old));
    let switched_at = now_ms();
    assert_eq!(new, group.replica.port(), "the replica is promoted");
    wait_until("every node ready on the new master", || async {
        handles.iter().all(RoomHandle::is_ready)
    })
    .await;
    let ready_at = now_ms();
    // Both connections of every node, publisher and subscriber, are on the new master.
    wait_until("six connections on the new master", || async {
        group.replica.app_clients() == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // ok: timed traffic after the failover, not a wait

    // The old master comes back (empty, and a master until Sentinel demotes it): the fleet
    // follows the sentinels, not the address it used to know.
    let on_the_old = tokio::task::block_in_place(|| {
        group.master.restart();
        group.master.monitor()
    });
    tokio::time::sleep(Duration::from_millis(700)).await; // ok: timed traffic beside the restarted master, not a wait
    let on_the_old = tokio::task::block_in_place(|| {
        group.master.cli(&["ECHO", "seen-by-monitor"]);
        on_the_old.finish()
    });
    stop.send(true).expect("stream running");
    traffic.await.expect("stream");
    for room in [PLAIN, DURABLE] {
        handles[0]
            .broadcast(room, json!({ "end": true }))
            .publish()
            .await
            .expect("end marker");
    }
    let log = log.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut seen = Vec::new();
    for (room, reader) in readers {
        seen.push((room, reader.await.expect("reader")));
    }

    let failover_ms = switched_at - killed_at;
    eprintln!(
        "failover: sentinels switched {failover_ms} ms after the kill; every node ready {} ms \
         after the switch",
        ready_at.saturating_sub(switched_at)
    );
    assert!(
        ready_at <= switched_at + 1000,
        "the fleet took {} ms after the switch to be ready",
        ready_at - switched_at
    );
    // Each node's publisher follows too: its first broadcast acknowledged after the kill.
    for node in 0..handles.len() {
        let first = log
            .values()
            .filter(|s| s.node == node && s.before_ms > killed_at)
            .filter_map(|s| s.outcome.filter(|(ok, _)| *ok).map(|(_, at)| at))
            .min()
            .expect("the node published again");
        eprintln!(
            "s{}: publishing again {} ms after the switch",
            node + 1,
            first.saturating_sub(switched_at)
        );
        assert!(
            first <= switched_at + 1000,
            "s{}'s publisher took {} ms after the switch",
            node + 1,
            first - switched_at
        );
    }
    let ours: Vec<&str> = on_the_old
        .lines()
        .filter(|l| !l.contains("__sentinel__:hello") && !l.contains("\"MONITOR\""))
        .filter(|l| {
            ["\"PUBLISH\"", "SUBSCRIBE\"", "\"EVALSHA\"", "\"HELLO\""]
                .iter()
                .any(|c| l.contains(c))
        })
        .collect();
    assert!(
        ours.is_empty(),
        "the fleet reached the restarted old master: {ours:?}"
    );
    assert!(
        on_the_old.contains("seen-by-monitor"),
        "MONITOR saw what reached the old master: {on_the_old}"
    );

    for room in [PLAIN, DURABLE] {
        let sockets: Vec<&Seen> = seen
            .iter()
            .filter(|(r, _)| *r == room)
            .map(|(_, s)| s)
            .collect();
        // What must reach each socket or lie in a window it was told: every acknowledged
        // broadcast, and every one that reached any socket (a failed one may have been run).
        let must: BTreeSet<u64> = log
            .iter()
            .filter(|((r, _), s)| *r == room && s.outcome.is_some_and(|(ok, _)| ok))
            .map(|((_, n), _)| *n)
            .chain(sockets.iter().flat_map(|s| s.ns.iter().copied()))
            .collect();
        for (i, socket) in sockets.iter().enumerate() {
            let received: BTreeSet<u64> = socket.ns.iter().copied().collect();
            assert_eq!(
                received.len(),
                socket.ns.len(),
                "{room}@s{}: a message twice",
                i + 1
            );
            let uncovered: Vec<(u64, u64)> = must
                .difference(&received)
                .map(|n| (*n, log[&(room, *n)].before_ms))
                .filter(|(_, at)| {
                    !socket
                        .windows
                        .iter()
                        .any(|(since, until)| since <= at && at <= until)
                })
                .collect();
            eprintln!(
                "{room}@s{}: {} received, {} missing, windows {:?}",
                i + 1,
                received.len(),
                must.len() - received.len(),
                socket.windows
            );
            assert!(
                uncovered.is_empty(),
                "{room}@s{}: missing and outside every window told {:?}: {uncovered:?}",
                i + 1,
                socket.windows
            );
            if room == PLAIN {
                assert!(
                    !socket.windows.is_empty(),
                    "{room}@s{}: the link loss was not told",
                    i + 1
                );
            }
        }
    }
    let now = handles[0].history(DURABLE, 1).await.expect("history");
    eprintln!(
        "durable room: {}",
        if Some(now.position().epoch()) == epoch.as_deref() {
            "repaired in its epoch"
        } else {
            "moved to a new epoch"
        }
    );
}

/// The master is demoted behind Sentinel's back (an operator swaps the roles with REPLICAOF;
/// no client is killed): each node's connections leave it within about a second, since its
/// server says it is no longer the master, and nothing is published there any more. The nodes
/// stay not ready while the sentinels still name it; once they name the new master the fleet
/// delivers again there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_leave_a_master_demoted_behind_sentinels_back() {
    // The sentinels must not fail over by themselves during the test.
    let group = tokio::task::block_in_place(|| SentinelGroup::start(60_000));
    let (old, new) = (group.master.port(), group.replica.port());
    let nodes = start_nodes(["t1", "t2"].map(|id| layer(&group, id)), room_app).await;
    let mut sockets = Vec::new();
    for (server, _) in &nodes {
        let mut ws = connect(&server.ws_url("/ws?room=lobby")).await;
        assert_eq!(recv_text(&mut ws, "join ack").await, "joined");
        sockets.push(ws);
    }
    wait_until("both nodes subscribed on the master", || async {
        group.master.numsub("ws:room:lobby") == 2
    })
    .await;
    assert!(group.master.app_clients() >= 4, "two connections per node");

    group.replica.cli(&["REPLICAOF", "NO", "ONE"]);
    group
        .master
        .cli(&["REPLICAOF", "127.0.0.1", &new.to_string()]);
    let demoted = tokio::time::Instant::now();
    wait_until(
        "the fleet's connections leave the demoted master",
        || async { group.master.app_clients() == 0 },
    )
    .await;
    let left_after = demoted.elapsed();
    eprintln!("the fleet left the demoted master after {left_after:?}");
    assert!(left_after < Duration::from_millis(2500), "{left_after:?}");
    // The sentinels still name it: the nodes keep trying it, and each attempt stops at the
    // role check. Nothing is published or subscribed there; a broadcast fails instead.
    let monitor = group.master.monitor();
    let refused = nodes[0]
        .1
        .broadcast("lobby", json!({ "n": 0 }))
        .publish()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(!nodes[0].1.is_ready() && !nodes[1].1.is_ready());
    tokio::time::sleep(Duration::from_millis(500)).await; // ok: more of the nodes' attempts under MONITOR
    let seen = tokio::task::block_in_place(|| monitor.finish());
    let ours: Vec<&str> = seen
        .lines()
        .filter(|l| {
            l.contains("\"PUBLISH\"") || l.contains("SUBSCRIBE\"") || l.contains("\"EVALSHA\"")
        })
        .filter(|l| !l.contains("__sentinel__:hello"))
        .collect();
    assert!(ours.is_empty(), "sent to the demoted master: {ours:?}");
    assert!(
        seen.lines().any(|l| l.contains("\"HELLO\" \"3\"")),
        "the nodes tried the demoted master (the role check): {seen}"
    );

    // Sentinel is told of the new master: the fleet follows and delivers there.
    for s in &group.sentinels {
        assert_eq!(s.cli(&["SENTINEL", "REMOVE", SENTINEL_MASTER]).trim(), "OK");
        let port = new.to_string();
        let monitor = s.cli(&[
            "SENTINEL",
            "MONITOR",
            SENTINEL_MASTER,
            "127.0.0.1",
            &port,
            "2",
        ]);
        assert_eq!(monitor.trim(), "OK");
    }
    wait_until("both nodes ready on the new master", || async {
        nodes.iter().all(|(_, h)| h.is_ready()) && group.replica.numsub("ws:room:lobby") == 2
    })
    .await;
    nodes[0]
        .1
        .broadcast("lobby", json!({ "n": 1 }))
        .publish()
        .await
        .expect("broadcast on the new master");
    for ws in &mut sockets {
        // The gap is told once the link is back, before anything newer is delivered.
        assert_eq!(recv_text(ws, "the loss notice").await, "missed:lobby");
        assert_eq!(recv_text(ws, "the broadcast").await, r#"{"n":1}"#);
    }
    assert_eq!(group.master.app_clients(), 0, "nothing went back to {old}");
}

/// The chat example with `SENTINEL_URL` (PROTOCOL.md part 2, "Redis Sentinel") connects to the
/// master the sentinels name, not to `REDIS_URL` (here the replica), and delivers across nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_example_finds_the_master_through_sentinel_url() {
    let group = tokio::task::block_in_place(|| SentinelGroup::start(60_000));
    let bin = tokio::task::block_in_place(chat_binary);
    let url = group.url();
    let env = [("SENTINEL_URL", url.as_str())];
    let a = ChatProcess::start(&bin, &group.replica, "c1", &env).await;
    let b = ChatProcess::start(&bin, &group.replica, "c2", &env).await;
    let mut wa = connect(&a.ws_url("lobby")).await;
    let mut wb = connect(&b.ws_url("lobby")).await;
    wait_until("both chat nodes subscribed on the master", || async {
        group.master.numsub("ws:room:lobby") == 2
    })
    .await;
    assert_eq!(
        group.replica.numsub("ws:room:lobby"),
        0,
        "nothing on REDIS_URL's server"
    );
    send_text(&mut wa, r#"{"hi":1}"#).await;
    for ws in [&mut wa, &mut wb] {
        assert_eq!(recv_text(ws, "the message").await, r#"{"hi":1}"#);
    }
}

/// The replica is cut off from the master (it may not sync again) and the durable room's last
/// messages are stored on the master only; then the master dies and Sentinel promotes the
/// replica, which lacks them. The node neither waits for them nor numbers other messages with
/// their seqs: it tells its members, and the room goes on in a new epoch, so that a client
/// resuming from a lost position is told it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_the_last_messages_is_told_not_hidden() {
    let mut group = tokio::task::block_in_place(|| SentinelGroup::start(1000));
    let old = group.master.port();
    let layer = layer(&group, "e1");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let mut ws = connect(&server.ws_url(&format!("/ws?room={DURABLE}&positions=1"))).await;
    let notice = recv_json(&mut ws, "the join notice").await;
    let epoch = notice["epoch"].as_str().expect("epoch").to_owned();
    for n in 1..=3 {
        assert_eq!(
            publish_durable_and_read(&handle, DURABLE, n, &mut ws).await,
            n
        );
    }
    wait_until("the replica has caught up", || async { group.replicated() }).await;
    // The replica loses its link and may not sync again: 4 to 6 are on the master only.
    let denied = group
        .master
        .cli(&["ACL", "SETUSER", "default", "-psync", "-sync", "-replconf"]);
    assert_eq!(denied.trim(), "OK");
    group.master.cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    wait_until("the replica cut off", || async {
        group
            .master
            .cli(&["INFO", "replication"])
            .contains("connected_slaves:0")
    })
    .await;
    for n in 4..=6 {
        assert_eq!(
            publish_durable_and_read(&handle, DURABLE, n, &mut ws).await,
            n
        );
    }
    group.master.stop();
    let new = tokio::task::block_in_place(|| group.wait_switch(old));
    assert_eq!(new, group.replica.port());

    // The node reads after 6, finds the room at 3: the member is told.
    let frame = recv_json(&mut ws, "the loss notice").await;
    assert_eq!(frame["type"], "fanout.missed", "{frame}");
    assert_eq!(frame["room"], DURABLE, "{frame}");
    wait_until("the room moved to a new epoch", || async {
        handle
            .history(DURABLE, 1)
            .await
            .is_ok_and(|h| h.position().epoch() != epoch)
    })
    .await;
    assert_eq!(
        publish_durable_and_read(&handle, DURABLE, 7, &mut ws).await,
        1,
        "the new epoch numbers from 1"
    );
    let mut late =
        connect(&server.ws_url(&format!("/ws?room={DURABLE}&positions=1&since={epoch}:6"))).await;
    let resumed = recv_json(&mut late, "the resume notice").await;
    assert_eq!(resumed["type"], "fanout.resumed", "{resumed}");
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_eq!(resumed["reason"], "epoch_changed", "{resumed}");
}

/// Presence across a failover to a replica that missed the last join: the promoted replica
/// lacks it, and the node re-asserts its members on the new link, so the list shows the user
/// again (PROTOCOL.md part 2: "presence is re-asserted").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_a_join_is_re_asserted() {
    let mut group = tokio::task::block_in_place(|| SentinelGroup::start(1000));
    let old = group.master.port();
    let layer = FanoutLayer::builder(group.url())
        .node_id("p1")
        .presence(true)
        .presence_ttl(Duration::from_secs(3))
        .probe_interval(Duration::from_millis(200))
        .probe_timeout(Duration::from_millis(500))
        .build()
        .expect("layer");
    let handle = layer.handle();
    let server = TestServer::start(chat_app::app(layer)).await;
    wait_until("node ready", || async { handle.is_ready() }).await;
    let listed = async |user: &str| {
        handle.presence("lobby").await.is_ok_and(|snapshot| {
            serde_json::to_value(&snapshot).is_ok_and(|v| {
                v["members"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|e| e["user"] == user))
            })
        })
    };
    let mut early = connect(&server.ws_url("/ws?room=lobby&user=early")).await;
    let _ = recv_json(&mut early, "early's first notice").await;
    wait_until("early listed", || async { listed("early").await }).await;
    wait_until("the replica has caught up", || async { group.replicated() }).await;
    let denied = group
        .master
        .cli(&["ACL", "SETUSER", "default", "-psync", "-sync", "-replconf"]);
    assert_eq!(denied.trim(), "OK");
    group.master.cli(&["CLIENT", "KILL", "TYPE", "replica"]);
    wait_until("the replica cut off", || async {
        group
            .master
            .cli(&["INFO", "replication"])
            .contains("connected_slaves:0")
    })
    .await;
    // Counted on the master only.
    let _late = connect(&server.ws_url("/ws?room=lobby&user=late")).await;
    wait_until("late listed on the old master", || async {
        listed("late").await
    })
    .await;
    group.master.stop();
    let new = tokio::task::block_in_place(|| group.wait_switch(old));
    assert_eq!(new, group.replica.port());
    assert!(
        !group.replica.cli(&["KEYS", "*members*"]).is_empty(),
        "the replica has the room, from before the cut"
    );
    // Re-asserted on the new master, both members, with no leave told for either.
    wait_until("both listed on the new master", || async {
        handle.is_ready() && listed("early").await && listed("late").await
    })
    .await;
    let mut frames = Vec::new();
    while let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = tokio::time::timeout(
        Duration::from_millis(300),
        futures_util::StreamExt::next(&mut early),
    )
    .await
    {
        frames.push(t.to_string());
    }
    assert!(
        frames.iter().all(|f| !f.contains("fanout.leave")),
        "no spurious leave: {frames:?}"
    );
}

/// An ACL user on the master and its replica (the default user off) and a password on the
/// sentinels: the URL's user info logs in to the master, `sentinel_password` to the sentinels,
/// and neither password shows in the layer's `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_and_the_sentinels_each_get_their_credentials() {
    let options = SentinelOptions {
        auth: Some(SentinelAuth {
            user: "alice",
            password: "s3cret",
            sentinel_password: "p@ss",
        }),
        tls: None,
    };
    let group = tokio::task::block_in_place(|| SentinelGroup::start_with(60_000, &options));
    let url = format!(
        "redis+sentinel://alice:s3cret@{}/{SENTINEL_MASTER}?sentinel_password=p%40ss",
        group.hosts()
    );
    let layer = FanoutLayer::builder(url)
        .node_id("a1")
        .build()
        .expect("layer");
    let shown = format!("{layer:?}");
    assert!(shown.contains("alice:***@"), "{shown}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("p%40ss"),
        "{shown}"
    );
    let _server = assert_round_trip(&group.master, layer, "lobby").await;
    // The sentinels and the replica log in as alice too: count the node's connections only.
    let clients = group.master.cli(&["CLIENT", "LIST"]);
    assert_eq!(
        group.master.app_clients(),
        2,
        "publisher and subscriber: {clients}"
    );

    // Without the sentinels' password nobody tells the node where the master is.
    let url = format!(
        "redis+sentinel://alice:s3cret@{}/{SENTINEL_MASTER}",
        group.hosts()
    );
    let layer = FanoutLayer::builder(url)
        .node_id("a2")
        .build()
        .expect("layer");
    let handle = layer.handle();
    let _server = TestServer::start(room_app(layer)).await;
    let refused = handle.broadcast("lobby", json!({ "n": 0 })).publish().await;
    assert!(refused.is_err_and(|e| e.is_timeout()));
    assert!(!handle.is_ready());
    assert_eq!(group.master.app_clients(), 2, "only the first node's");
}
